//! The first layout — one file per resource (`<tenant>.tenant.yaml`, `<tenant>.isp_config.yaml`,
//! `<tenant>.<Kind>.<name>.yaml`, `<tenant>.policy.<name>.hcl`, one `<tenant>.secrets.json`
//! per tenant) — moved into shards, once, when a store folder is first opened.
//!
//! The old files' texts become entries as they are (a secrets file becomes one entry per
//! secret, its record unchanged); the shards are written and synced, and only then are the
//! old files removed. Interrupted, it starts again next time from the files still there.

use super::shard::shard_of;
use super::{LocalStore, SecretRecord, decode, io_error};
use crate::fingerprint;
use crate::model::{Address, Content, ProviderId};
use crate::providers::{ProviderError, Result};
use std::collections::BTreeMap;

/// Whether a file name is one of the first layout's.
fn is_old(name: &str) -> bool {
    !name.starts_with('.')
        && name.contains('.')
        && (name.ends_with(".yaml") || name.ends_with(".hcl") || name.ends_with(".secrets.json"))
}

/// The resources an old file holds: address and content text.
fn entries_of(id: ProviderId, name: &str, text: &str) -> std::result::Result<Vec<(Address, String)>, String> {
    let bad = || format!("not a file name this store ever wrote ({id})");
    let (tenant, rest) = name.split_once('.').ok_or_else(bad)?;
    let local = match id {
        ProviderId::Management if rest == "tenant.yaml" => "management.tenant".to_owned(),
        ProviderId::Management => format!(
            "management.license[{}]",
            rest.strip_prefix("license.").and_then(|r| r.strip_suffix(".yaml")).ok_or_else(bad)?
        ),
        ProviderId::Isp if rest == "isp_config.yaml" => "isp.config".to_owned(),
        ProviderId::Kubernetes => {
            let (kind, n) = rest.strip_suffix(".yaml").and_then(|r| r.split_once('.')).ok_or_else(bad)?;
            format!("kubernetes.{kind}[{n}]")
        }
        ProviderId::Secrets if rest == "secrets.json" => {
            #[derive(serde::Deserialize)]
            struct SecretsFile {
                secrets: BTreeMap<String, SecretRecord>,
            }
            let file: SecretsFile = serde_json::from_str(text).map_err(|e| format!("not a secrets file: {e}"))?;
            return file
                .secrets
                .iter()
                .map(|(secret, rec)| {
                    let a = Address::from_local(tenant, &format!("openbao.secret[{secret}]")).ok_or_else(bad)?;
                    let mut json = serde_json::to_string_pretty(rec).map_err(|e| e.to_string())?;
                    json.push('\n');
                    Ok((a, json))
                })
                .collect();
        }
        ProviderId::Secrets => format!(
            "openbao.policy[{}]",
            rest.strip_prefix("policy.").and_then(|r| r.strip_suffix(".hcl")).ok_or_else(bad)?
        ),
        _ => return Err(bad()),
    };
    let a = Address::from_local(tenant, &local).ok_or_else(bad)?;
    Ok(vec![(a, text.to_owned())])
}

/// Moves the old layout's files of `store` into shards, if there are any.
pub(super) fn run(store: &LocalStore) -> Result<()> {
    let dir = &store.dir;
    let listing = match std::fs::read_dir(dir) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(dir, e)),
    };
    let mut old: Vec<String> = Vec::new();
    for e in listing.flatten() {
        let Ok(name) = e.file_name().into_string() else { continue };
        if is_old(&name) {
            old.push(name);
        } else if name.starts_with('.') && name.ends_with(".tmp") {
            // A temp file a crashed process left; one an hour old is not anyone's any more.
            let stale = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if stale.is_some_and(|age| age.as_secs() > 3600) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    if old.is_empty() {
        return Ok(());
    }
    old.sort();
    let mut moved = 0;
    for name in &old {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).map_err(|e| io_error(&path, e))?;
        let entries = entries_of(store.id, name, &text).map_err(|msg| {
            ProviderError::Other(format!(
                "{}: {msg}; it is in the folder of the first local store layout, which this version moves into shard files: move it out of the folder and run again",
                path.display()
            ))
        })?;
        for (a, text) in entries {
            if let Some(problem) = super::address_problem(&a) {
                return Err(io_error(&path, format!("{a}: {problem}; move the file out of the folder and run again")));
            }
            let content = decode(&a, text.clone()).map_err(|msg| io_error(&path, msg))?;
            let meta = match &content {
                Content::SecretMeta(m) => Some(m.clone()),
                _ => None,
            };
            let n = shard_of(&a.tenant);
            let mut slot = store.slot(n);
            if slot.is_none() {
                let now = store.stat(n)?;
                store.refresh(n, &mut slot, now)?;
            }
            let s = slot.get_or_insert_with(super::Shard::absent);
            store.prepare(n, s)?;
            let key = a.to_string();
            let framed = super::shard::framed(&key, &text);
            store.set(s, &a, key, Some((framed, fingerprint::of(&content), meta)));
        }
        moved += 1;
    }
    store.write_out()?;
    for name in &old {
        let path = dir.join(name);
        std::fs::remove_file(&path).map_err(|e| io_error(&path, e))?;
    }
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error(dir, e))?;
    tracing::info!(dir = %dir.display(), files = moved, "moved the first layout's files into shard files");
    Ok(())
}
