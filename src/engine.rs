//! The engine's edges, put together: where the state lives, which providers and store a
//! repository uses, reading live state from all providers at once, and making a plan. The
//! CLI and the daemon both go through here.

use crate::diff;
use crate::fingerprint;
use crate::load::Loaded;
use crate::load::settings::Settings;
use crate::model::{Desired, ProviderId, Resource};
use crate::plan::{self, Plan};
use crate::providers::{LiveResource, Providers, TenantScope};
use crate::state::{StateStore, sqlite::SqliteStore};
use anyhow::{Context, Result};
use jiff::Timestamp;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where live stores and the state live: `$DOTMAC_STATE_DIR`, else `[state] dir`, else
/// `.dotmac/` in the repository root.
pub fn state_dir(root: &Path, settings: &Settings) -> PathBuf {
    if let Some(d) = std::env::var_os("DOTMAC_STATE_DIR") {
        return PathBuf::from(d);
    }
    let dir = settings.state.dir.as_deref().unwrap_or(".dotmac");
    root.join(dir)
}

pub fn open_state(settings: &Settings, state_dir: &Path) -> Result<Box<dyn StateStore>> {
    match settings.state.backend.as_str() {
        "local" => Ok(Box::new(SqliteStore::open(&state_dir.join("state"))?)),
        other => anyhow::bail!("[state] backend = \"{other}\" is not available in this build; use \"local\""),
    }
}

/// The path of the state lock.
pub fn lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("state").join("lock")
}

/// Providers whose resources are not managed (`kind = "none"`).
pub fn disabled(settings: &Settings) -> Vec<ProviderId> {
    let mut v = Vec::new();
    if settings.providers.kubernetes.kind == "none" {
        v.push(ProviderId::Kubernetes);
    }
    v
}

/// Reads every provider's live resources for the scope, the providers in parallel.
pub fn read_live(providers: &Providers, scope: &TenantScope, skip: &[ProviderId]) -> Result<Vec<LiveResource>> {
    let results: Vec<(ProviderId, crate::providers::Result<Vec<LiveResource>>)> = std::thread::scope(|s| {
        let handles: Vec<_> = ProviderId::ALL
            .iter()
            .filter(|p| !skip.contains(p))
            .map(|&p| (p, s.spawn(move || providers.get(p).list(scope))))
            .collect();
        handles.into_iter().map(|(p, h)| (p, h.join().unwrap_or_else(|_| Ok(Vec::new())))).collect()
    });
    let mut out = Vec::new();
    for (p, r) in results {
        if let Ok(v) = &r {
            tracing::debug!(provider = %p, resources = v.len(), "read live state");
        }
        out.extend(r.with_context(|| format!("reading live state from {}", providers.get(p).describe()))?);
    }
    Ok(out)
}

/// A digest of every file the repository was read from.
pub fn inputs_digest(loaded: &Loaded) -> String {
    let mut parts: Vec<(&str, &str)> = loaded.files.iter().map(|f| (&*f.path, f.text.as_str())).collect();
    for (name, text) in &loaded.templates {
        parts.push((name.as_str(), text));
    }
    parts.sort();
    let mut all = Vec::new();
    for (p, t) in parts {
        all.extend_from_slice(p.as_bytes());
        all.push(0);
        all.extend_from_slice(t.as_bytes());
        all.push(0);
    }
    format!("sha256:{}", fingerprint::sha256_hex(&all))
}

/// How to tell a person to create a missing external secret in the configured store: for
/// OpenBao, the exact `bao kv put` (mount, namespace and path included).
pub fn external_hint(settings: &Settings) -> diff::Hint {
    let secrets = &settings.providers.secrets;
    match secrets.kind.as_str() {
        "openbao" => match crate::providers::openbao::Config::from_settings(secrets) {
            Ok(cfg) => diff::Hint::new(move |t, n| {
                format!("Create it: {} (the value is read from stdin)", cfg.put_command(t, n))
            }),
            Err(_) => diff::Hint::new(|t, n| {
                format!("Create it in OpenBao at <mount>/{}", crate::providers::openbao::Config::secret_path(t, n))
            }),
        },
        _ => diff::Hint::new(|t, n| {
            format!("Create it: dotmac-gitops secret put --tenant {t} --name {n} (the value is read from stdin)")
        }),
    }
}

/// Everything needed to plan one repository.
pub struct PlanRequest<'a> {
    pub loaded: &'a Loaded,
    pub desired: &'a Desired,
    pub rendered: &'a BTreeMap<String, Vec<Resource>>,
    pub scope: TenantScope,
    pub now: Timestamp,
    pub revision: Option<String>,
}

/// Reads live state and the state store, and builds the plan.
pub fn make_plan(req: PlanRequest<'_>, providers: &Providers, state: &dyn StateStore) -> Result<Plan> {
    let settings = &req.desired.settings;
    let skip = disabled(settings);
    let live = read_live(providers, &req.scope, &skip)?;
    let records = state.records(&req.scope)?;
    let journal = state.journal()?;
    let meta = state.meta()?;
    let rendered: BTreeMap<String, Vec<Resource>> = req
        .rendered
        .iter()
        .map(|(t, rs)| (t.clone(), rs.iter().filter(|r| !skip.contains(&r.provider())).cloned().collect()))
        .collect();
    let coordination = req.desired.tenants.values().map(|t| (t.id.clone(), t.spec.coordination.clone())).collect();
    let options = diff::Options {
        dev_placeholders: settings.providers.secrets.kind == "local"
            && settings.providers.secrets.options.get("dev_placeholders").and_then(|v| v.as_bool()).unwrap_or(false),
        external_hint: Some(external_hint(settings)),
    };
    let tenants = match &req.scope {
        TenantScope::All => None,
        TenantScope::Only(s) => Some(s.iter().cloned().collect()),
    };
    let plan = plan::build(
        plan::Inputs {
            desired: &rendered,
            coordination,
            live: &live,
            records: &records,
            journal: &journal,
            scope: &req.scope,
            now: req.now,
            options,
        },
        plan::Meta {
            plan_id: plan::new_id("plan"),
            created_at: Timestamp::now().to_string(),
            revision: req.revision,
            inputs_digest: inputs_digest(req.loaded),
            lineage: meta.lineage,
            serial: meta.serial,
            tenants,
        },
    );
    tracing::info!(plan = %plan.plan_id, create = plan.summary.create, update = plan.summary.update,
        rotate = plan.summary.rotate, delete = plan.summary.delete, drift = plan.summary.drift, "planned");
    Ok(plan)
}
