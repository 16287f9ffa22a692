//! The engine's edges, put together: where the state lives, which providers and store a
//! repository uses, reading live state from all providers at once, and making a plan. The
//! CLI and the daemon both go through here.

use crate::diff;
use crate::fingerprint;
use crate::load::Loaded;
use crate::load::settings::Settings;
use crate::model::{Desired, ProviderId, Resource};
use crate::plan::{self, Plan};
use crate::providers::{LiveResource, ProviderError, Providers, Session, TenantScope};
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

/// Live state as read: the resources, and the tenants some provider could not read (a dead
/// target), with why. Those tenants are reported and left out; the others go on.
#[derive(Debug, Default)]
pub struct Live {
    pub resources: Vec<LiveResource>,
    pub unreadable: BTreeMap<String, String>,
}

/// Reads every provider's live resources for the scope, the providers in parallel.
pub fn read_live(providers: &Providers, scope: &TenantScope, skip: &[ProviderId]) -> Result<Live> {
    let results: Vec<(ProviderId, crate::providers::Result<Vec<LiveResource>>)> = std::thread::scope(|s| {
        let handles: Vec<_> = ProviderId::ALL
            .iter()
            .filter(|p| !skip.contains(p))
            .map(|&p| (p, s.spawn(move || providers.get(p).list(scope))))
            .collect();
        handles.into_iter().map(|(p, h)| (p, h.join().unwrap_or_else(|_| Ok(Vec::new())))).collect()
    });
    let mut out = Live::default();
    for (p, r) in results {
        let r = match r {
            Err(ProviderError::Partial { found, failed }) => {
                for (t, why) in failed {
                    tracing::warn!(provider = %p, tenant = %t, "cannot read live state: {why}");
                    let e = out.unreadable.entry(t).or_default();
                    if !e.is_empty() {
                        e.push_str("; ");
                    }
                    e.push_str(&format!("{p}: {why}"));
                }
                Ok(found)
            }
            other => other,
        };
        if let Ok(v) = &r {
            tracing::debug!(provider = %p, resources = v.len(), "read live state");
        }
        out.resources.extend(r.with_context(|| format!("reading live state from {}", providers.get(p).describe()))?);
    }
    Ok(out)
}

/// Tells the providers the correlation id, the tenants known (the repository's and the
/// state's: what `All` means to a system that cannot list its tenants) and the coordination.
pub fn begin_session(
    providers: &Providers,
    correlation_id: String,
    tenants: impl IntoIterator<Item = String>,
    coordination: BTreeMap<String, crate::model::Coordination>,
) {
    providers.begin(&Session { correlation_id, tenants: tenants.into_iter().collect(), coordination });
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

/// How to tell a person to create a missing external secret in the configured store.
pub fn external_hint(settings: &Settings) -> fn(&str, &str) -> String {
    match settings.providers.secrets.kind.as_str() {
        "openbao" => |t, n| format!("Create it: bao kv put <mount>/dotmac/tenants/{t}/{n} value=…"),
        _ => {
            |t, n| format!("Create it: dotmac-gitops secret put --tenant {t} --name {n} (the value is read from stdin)")
        }
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
    let records = state.records(&req.scope)?;
    let plan_id = plan::new_id("plan");
    let coordination: BTreeMap<String, crate::model::Coordination> =
        req.desired.tenants.values().map(|t| (t.id.clone(), t.spec.coordination.clone())).collect();
    let known = req.rendered.keys().cloned().chain(records.iter().map(|r| r.address.tenant.clone()));
    begin_session(
        providers,
        format!("{plan_id}@{}", req.revision.as_deref().unwrap_or("worktree")),
        known,
        coordination.clone(),
    );
    let live = read_live(providers, &req.scope, &skip)?;
    let journal = state.journal()?;
    let meta = state.meta()?;
    let rendered: BTreeMap<String, Vec<Resource>> = req
        .rendered
        .iter()
        .map(|(t, rs)| (t.clone(), rs.iter().filter(|r| !skip.contains(&r.provider())).cloned().collect()))
        .collect();
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
            live: &live.resources,
            unreadable: &live.unreadable,
            records: &records,
            journal: &journal,
            scope: &req.scope,
            now: req.now,
            options,
        },
        plan::Meta {
            plan_id,
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
