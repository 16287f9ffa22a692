//! `drift`, `audit` and `secret put`.

use super::commands::color;
use super::{Format, Global};
use crate::drift::{self, Difference};
use crate::engine;
use crate::load::{self, source};
use crate::model::{Address, Content, ProviderId, ResourceKind};
use crate::providers::local::LocalStore;
use crate::providers::secret_value::SecretValue;
use crate::providers::{LiveResource, Provider, Providers, TenantScope};
use crate::state::AuditQuery;
use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Read};

/// Settings, state store and providers of the repository, without rendering it.
fn open(g: &Global) -> Result<(crate::load::settings::Settings, std::path::PathBuf)> {
    let root = load::find_root(g.repo.as_deref())?;
    let loaded = load::load(&root, g.rev.as_deref(), &source::Scope::All)?;
    let (desired, diags) = crate::validate::validate(&loaded, jiff::Timestamp::now());
    if diags.iter().any(|d| d.rule == "settings" || d.rule == "toml") {
        bail!("dotmac.toml is invalid; run `dotmac-gitops validate`");
    }
    let state_dir = engine::state_dir(&root, &desired.settings);
    Ok((desired.settings, state_dir))
}

/// One resource whose live state is not what was last applied.
#[derive(Debug, Serialize)]
struct Drifted {
    tenant: String,
    address: String,
    /// changed | deleted
    kind: &'static str,
    last_applied: crate::fingerprint::Fingerprint,
    live: Option<crate::fingerprint::Fingerprint>,
    impact: &'static str,
    recommendation: String,
}

pub fn cmd_drift(g: &Global, tenants: &[String], format: Format, detailed: bool) -> Result<u8> {
    let (settings, state_dir) = open(g)?;
    let state = engine::open_state(&settings, &state_dir)?;
    let providers = Providers::from_settings(&settings, &state_dir)?;
    let scope =
        if tenants.is_empty() { TenantScope::All } else { TenantScope::Only(tenants.iter().cloned().collect()) };
    let records = state.records(&scope)?;
    engine::begin_session(
        &providers,
        crate::plan::new_id("drift"),
        records.iter().map(|r| r.address.tenant.to_string()),
        BTreeMap::new(),
    );
    let engine::Live { resources: live, unreadable } =
        engine::read_live(&providers, &scope, &engine::disabled(&settings))?;
    let mut live: Vec<LiveResource> = live.into_iter().flatten().collect();
    // The consistency check reads the records in full (listing gives fingerprints).
    let wanted: Vec<Address> = live
        .iter()
        .filter(|l| {
            l.content.is_none() && matches!(l.address.kind, ResourceKind::ManagementTenant | ResourceKind::IspConfig)
        })
        .map(|l| l.address.clone())
        .collect();
    let fetched = engine::fetch_all(&providers, wanted.iter())?;
    for l in live.iter_mut() {
        if let Some(f) = fetched.get(&l.address) {
            *l = f.clone();
        }
    }
    let by_addr: HashMap<&Address, &LiveResource> = live.iter().map(|l| (&l.address, l)).collect();
    let mut drifted = Vec::new();
    for r in records.iter().filter(|r| !unreadable.contains_key(r.address.tenant.as_str())) {
        let l = by_addr.get(&r.address);
        let deleted = match l {
            None => true,
            Some(l) => matches!(l.content.as_deref(), Some(Content::SecretMeta(m)) if m.deleted),
        };
        if !deleted && l.map(|l| &l.fingerprint) == Some(&r.fingerprint) {
            continue;
        }
        let secret = r.address.kind == ResourceKind::OpenbaoSecret;
        let (impact, recommendation) = match (secret, deleted) {
            (true, true) => (
                "high",
                "run apply: a generated secret is created again; an external one must be put back by its owner"
                    .to_owned(),
            ),
            (true, false) => {
                ("high", "a new version was written out of band: confirm it was intended; apply records it".to_owned())
            }
            (false, true) => ("high", "run apply to create it again from the repository".to_owned()),
            (false, false) => (
                "medium",
                "run apply to restore the repository's version, or commit the live change to the repository".to_owned(),
            ),
        };
        drifted.push(Drifted {
            tenant: r.address.tenant.to_string(),
            address: r.address.to_string(),
            kind: if deleted { "deleted" } else { "changed" },
            last_applied: r.fingerprint.clone(),
            live: l.map(|l| l.fingerprint.clone()),
            impact,
            recommendation,
        });
    }
    // Management vs ISP, per tenant that has both live.
    let mut mgmt: BTreeMap<&str, &serde_json::Value> = BTreeMap::new();
    let mut isp: BTreeMap<&str, &str> = BTreeMap::new();
    for l in &live {
        match (&l.address.kind, l.content.as_deref()) {
            (ResourceKind::ManagementTenant, Some(Content::Json(v))) => {
                mgmt.insert(&l.address.tenant, v);
            }
            (ResourceKind::IspConfig, Some(Content::Text(t))) => {
                isp.insert(&l.address.tenant, t);
            }
            _ => {}
        }
    }
    let mut consistency: Vec<Difference> = Vec::new();
    for (t, m) in &mgmt {
        if let Some(i) = isp.get(t) {
            consistency.extend(drift::consistency(t, m, i));
        }
    }
    let any = !drifted.is_empty() || !consistency.is_empty();
    match format {
        Format::Json => {
            let out = json!({
                "drift_detected": any,
                "resources": drifted,
                "consistency": consistency,
                "checked": {"resources": records.len(), "tenants": mgmt.len()},
                "unreadable": unreadable,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        _ => {
            let paint = |code: &str, s: &str| if color(g) { format!("\x1b[{code}m{s}\x1b[0m") } else { s.to_owned() };
            for d in &drifted {
                println!(
                    "{} {} {}: last applied {}, live {}\n    impact {}; {}",
                    paint("1;33", "~"),
                    d.address,
                    d.kind,
                    d.last_applied,
                    crate::fingerprint::shown(d.live.as_ref(), "absent"),
                    d.impact,
                    d.recommendation
                );
            }
            for (t, why) in &unreadable {
                println!("{} tenant {t}: live state could not be read: {why}", paint("1;31", "!"));
            }
            for c in &consistency {
                println!(
                    "{} {} {}: management {} vs ISP framework {}\n    impact {}; {}",
                    paint("1;31", "≠"),
                    c.tenant,
                    c.path,
                    c.management_value,
                    c.isp_framework_value,
                    c.impact,
                    c.recommendation
                );
            }
            if any {
                println!(
                    "\nDrift: {} resource{} differ from what was last applied; {} management/ISP inconsistenc{}.",
                    drifted.len(),
                    if drifted.len() == 1 { "" } else { "s" },
                    consistency.len(),
                    if consistency.len() == 1 { "y" } else { "ies" }
                );
            } else {
                println!(
                    "No drift: {} resources as last applied; management and ISP agree for {} tenants.",
                    records.len(),
                    mgmt.len()
                );
            }
        }
    }
    if !unreadable.is_empty() {
        eprintln!(
            "error: the live state of {} tenant(s) could not be read; drift is unknown for them",
            unreadable.len()
        );
        return Ok(1);
    }
    Ok(if detailed && any { 2 } else { 0 })
}

pub fn cmd_audit(g: &Global, tenants: &[String], since: Option<&str>, format: Format) -> Result<u8> {
    if let Some(s) = since {
        s.parse::<jiff::Timestamp>().with_context(|| format!("--since `{s}` is not an RFC 3339 time"))?;
    }
    let (settings, state_dir) = open(g)?;
    let state = engine::open_state(&settings, &state_dir)?;
    let entries = state.audit(&AuditQuery {
        tenants: tenants.to_vec(),
        since: since.map(str::to_owned),
        ..Default::default()
    })?;
    #[derive(Default, Serialize)]
    struct PerTenant {
        changes: usize,
        failures: usize,
        rollbacks: usize,
        rotations: usize,
        by_risk: BTreeMap<String, usize>,
        last_change: Option<String>,
    }
    let mut summary: BTreeMap<String, PerTenant> = BTreeMap::new();
    for e in &entries {
        let s = summary.entry(e.tenant.to_string()).or_default();
        match &*e.outcome {
            "applied" => {
                s.changes += 1;
                s.last_change = Some(e.time.to_string());
                *s.by_risk.entry(e.risk.to_string()).or_default() += 1;
                if e.action == "rotate" {
                    s.rotations += 1;
                }
            }
            "failed" | "rollback_failed" => s.failures += 1,
            "rolled_back" => s.rollbacks += 1,
            _ => {}
        }
    }
    match format {
        Format::Json => {
            println!("{}", serde_json::to_string_pretty(&json!({"entries": entries, "summary": summary}))?);
        }
        _ => {
            for e in &entries {
                println!(
                    "{}  {:<12} {:<8} {:<9} {:<14} {}  ({}, {})",
                    e.time,
                    e.actor,
                    e.action,
                    e.risk,
                    e.outcome,
                    e.address,
                    e.correlation_id,
                    e.message.as_deref().unwrap_or("-")
                );
            }
            println!("\n{} entries.", entries.len());
            for (t, s) in &summary {
                println!(
                    "  {t}: {} changes, {} rotations, {} failures, {} rollbacks; last change {}",
                    s.changes,
                    s.rotations,
                    s.failures,
                    s.rollbacks,
                    s.last_change.as_deref().unwrap_or("-")
                );
            }
        }
    }
    Ok(0)
}

pub fn cmd_secret_put(g: &Global, tenant: &str, name: &str, lock_timeout: &str) -> Result<u8> {
    let (settings, state_dir) = open(g)?;
    if settings.providers.secrets.kind == "openbao" {
        let cfg = crate::providers::openbao::Config::from_settings(&settings.providers.secrets)?;
        bail!(
            "`secret put` writes to the local store; [providers.secrets] is kind = \"openbao\": put the value there with `{}` (it reads the value from stdin)",
            cfg.put_command(tenant, name)
        );
    }
    if settings.providers.secrets.kind != "local" {
        bail!(
            "`secret put` writes to the local store; [providers.secrets] is kind = \"{}\": use that system's own tools",
            settings.providers.secrets.kind
        );
    }
    if let Some(problem) = crate::validate::checks::secret_name_problem(name) {
        bail!("secret name `{name}` {problem}");
    }
    if std::io::stdin().is_terminal() {
        eprintln!("Type the value and end with Ctrl-D (it is not echoed anywhere else):");
    }
    let mut raw = Vec::new();
    std::io::stdin().lock().read_to_end(&mut raw)?;
    while raw.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        raw.pop();
    }
    if raw.is_empty() {
        bail!("no value on stdin");
    }
    let value = SecretValue::from_bytes(raw);
    // An apply rewrites the tenant's secrets file too: without the lock, one of the two
    // writes would be lost.
    let timeout = crate::load::settings::parse_duration(lock_timeout)
        .with_context(|| format!("--lock-timeout `{lock_timeout}` is not a duration such as 30s or 5m"))?;
    let state = engine::open_state(&settings, &state_dir)?;
    let _guard = state.lock(&crate::state::lock::holder_description("secret put"), timeout)?;
    let store = LocalStore::open(&state_dir, ProviderId::Secrets, &settings.providers.secrets)?;
    let address = Address::new(tenant, ResourceKind::OpenbaoSecret, Some(name));
    let live = store.put_external(&address, &value)?;
    store.flush()?;
    println!("{address}: stored as {} ({} bytes, encrypted)", live.fingerprint, value.len());
    Ok(0)
}
