//! `plan`, `apply` and `rotate`.

use super::commands::{color, load_valid, parse_now, render_desired};
use super::{Format, Global, LockArgs, PlanArgs, ReportArgs};
use crate::apply;
use crate::diff::{Action, Change, Risk};
use crate::engine::{self, PlanRequest};
use crate::load::settings::parse_duration;
use crate::load::{self, Loaded, Origin, source};
use crate::model::{Address, Content, Desired, Resource, ResourceKind, SecretSource};
use crate::plan::{self, Plan};
use crate::providers::{Providers, TenantScope};
use crate::state::{StateStore, lock};
use anyhow::{Context, Result, bail};
use jiff::Timestamp;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

/// A repository loaded, validated and rendered, with its state and providers open.
pub struct Prepared {
    pub loaded: Loaded,
    pub desired: Desired,
    pub rendered: BTreeMap<String, Vec<Resource>>,
    pub state_dir: PathBuf,
    pub providers: Providers,
    pub state: Box<dyn StateStore>,
    pub scope: TenantScope,
    pub revision: Option<String>,
}

fn revision_of(loaded: &Loaded) -> Option<String> {
    match &loaded.origin {
        Origin::Commit(c) => Some(c.clone()),
        Origin::WorkTree => source::clean_worktree_revision(&loaded.root),
    }
}

fn scope_of(tenants: &[String]) -> TenantScope {
    if tenants.is_empty() { TenantScope::All } else { TenantScope::Only(tenants.iter().cloned().collect()) }
}

pub fn prepare(g: &Global, tenants: &[String], now: Timestamp) -> Result<Prepared> {
    let (loaded, desired, diags) = load_valid(g, &source::Scope::All, now)?;
    let state_dir = engine::state_dir(&loaded.root, &desired.settings);
    let state = engine::open_state(&desired.settings, &state_dir)?;
    // A tenant named with --tenant may be one that is only in the state (to delete it).
    let (known, only): (Vec<String>, Vec<String>) = {
        let recorded: BTreeSet<String> = if tenants.is_empty() {
            BTreeSet::new()
        } else {
            state.records(&scope_of(tenants))?.into_iter().map(|r| r.address.tenant).collect()
        };
        tenants.iter().cloned().partition(|t| recorded.contains(t) && !desired.tenants.contains_key(t))
    };
    let _ = known;
    let rendered = render_desired(&loaded, &desired, diags, &only, color(g))?;
    let providers = Providers::from_settings(&desired.settings, &state_dir)?;
    let revision = revision_of(&loaded);
    Ok(Prepared { loaded, desired, rendered, state_dir, providers, state, scope: scope_of(tenants), revision })
}

impl Prepared {
    pub fn plan(&self, now: Timestamp) -> Result<Plan> {
        engine::make_plan(
            PlanRequest {
                loaded: &self.loaded,
                desired: &self.desired,
                rendered: &self.rendered,
                scope: self.scope.clone(),
                now,
                revision: self.revision.clone(),
            },
            &self.providers,
            self.state.as_ref(),
        )
    }

    pub fn lock(&self, what: &str, l: &LockArgs) -> Result<lock::LockGuard> {
        let timeout = parse_duration(&l.lock_timeout)
            .with_context(|| format!("--lock-timeout `{}` is not a duration such as 30s or 5m", l.lock_timeout))?;
        lock::acquire(&engine::lock_path(&self.state_dir), &lock::holder_description(what), timeout)
    }
}

fn print_plan(plan: &Plan, format: Format, color: bool, report: &ReportArgs) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, &plan.to_json())?;
            writeln!(out)?;
        }
        Format::Markdown => {
            let md = super::pr::markdown(&plan_report(plan), report, report.max_chars, None);
            out.write_all(md.as_bytes())?;
        }
        Format::Text => {
            out.write_all(plan::text::render(plan, color, 200).as_bytes())?;
        }
    }
    Ok(())
}

fn plan_report(plan: &Plan) -> super::pr::Report<'_> {
    super::pr::Report {
        title: "dotmac-gitops plan".into(),
        subtitle: format!(
            "Revision `{}` · plan `{}` · state serial {}",
            plan.revision.as_deref().map(plan::short).unwrap_or("work tree"),
            plan.plan_id,
            plan.serial
        ),
        changes: &plan.changes,
        violations: plan.violations.clone(),
        errors: plan.errors().count(),
        again: "`dotmac-gitops plan --format json`".into(),
    }
}

pub fn cmd_plan(
    g: &Global,
    args: &PlanArgs,
    out: Option<&Path>,
    format: Format,
    detailed: bool,
    report: &ReportArgs,
) -> Result<u8> {
    super::pr::check_report_args(report, format)?;
    let now = parse_now(args.now.as_deref())?;
    let p = prepare(g, &args.tenants, now)?;
    let plan = p.plan(now)?;
    if let Some(path) = out {
        save_plan(&plan, path)?;
    }
    print_plan(&plan, format, color(g), report)?;
    super::pr::write_ci_files(&plan_report(&plan), report)?;
    if let Some(path) = out
        && format == Format::Text
    {
        println!("\nSaved the plan to {}; apply it with `dotmac-gitops apply {}`.", path.display(), path.display());
    }
    if plan.errors().next().is_some() {
        return Ok(1);
    }
    Ok(if detailed && plan.has_changes_or_drift() { 2 } else { 0 })
}

fn save_plan(plan: &Plan, path: &Path) -> Result<()> {
    let text = serde_json::to_vec(plan)?;
    crate::providers::local::write_atomic(path, &text).map_err(|e| anyhow::anyhow!("cannot save the plan: {e}"))
}

fn load_plan(path: &Path) -> Result<Plan> {
    let text = std::fs::read(path).with_context(|| format!("cannot read the plan file {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is not a dotmac-gitops plan file", path.display()))
}

pub struct ApplyArgs<'a> {
    pub plan_file: Option<&'a Path>,
    pub args: &'a PlanArgs,
    pub auto_approve: bool,
    pub allow_delete: bool,
    pub destroy_secrets: bool,
    pub parallelism: Option<usize>,
    pub lock: &'a LockArgs,
}

fn actor(l: &LockArgs) -> String {
    l.actor.clone().or_else(|| std::env::var("USER").ok()).or_else(login_name).unwrap_or_else(|| "unknown".into())
}

/// The name of the user running the process, from the password database.
fn login_name() -> Option<String> {
    // SAFETY: getpwuid returns a pointer into static storage or null; it is read at once.
    unsafe {
        let pw = libc::getpwuid(libc::getuid());
        if pw.is_null() || (*pw).pw_name.is_null() {
            return None;
        }
        std::ffi::CStr::from_ptr((*pw).pw_name).to_str().ok().map(str::to_owned)
    }
}

fn confirm(auto_approve: bool) -> Result<()> {
    if auto_approve {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!("refusing to apply without confirmation: stdin is not a terminal; pass --auto-approve");
    }
    eprint!("\nApply these changes? Only 'yes' is accepted: ");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if line.trim() != "yes" {
        bail!("apply cancelled; nothing was changed");
    }
    Ok(())
}

pub fn cmd_apply(g: &Global, a: ApplyArgs<'_>) -> Result<u8> {
    let now = parse_now(a.args.now.as_deref())?;
    let color = color(g);
    let (prepared, plan, _guard) = match a.plan_file {
        Some(file) => {
            let plan = load_plan(file)?;
            if !a.args.tenants.is_empty() {
                bail!("--tenant cannot narrow a saved plan; plan again with --tenant");
            }
            // The repository as it is now: only to check it did not move.
            let root = load::find_root(g.repo.as_deref())?;
            let loaded = load::load(&root, g.rev.as_deref(), &source::Scope::All)?;
            let settings = crate::validate::validate(&loaded, now).0.settings;
            let state_dir = engine::state_dir(&root, &settings);
            let state = engine::open_state(&settings, &state_dir)?;
            let providers = Providers::from_settings(&settings, &state_dir)?;
            let scope = match &plan.tenants {
                None => TenantScope::All,
                Some(t) => TenantScope::Only(t.iter().cloned().collect()),
            };
            let revision = revision_of(&loaded);
            let prepared = Prepared {
                loaded,
                desired: Desired { settings, ..Desired::default() },
                rendered: BTreeMap::new(),
                state_dir,
                providers,
                state,
                scope,
                revision,
            };
            let guard = prepared.lock("apply", a.lock)?;
            let live =
                engine::read_live(&prepared.providers, &prepared.scope, &engine::disabled(&prepared.desired.settings))?;
            let why = plan::staleness(
                &plan,
                prepared.revision.as_deref(),
                &engine::inputs_digest(&prepared.loaded),
                &prepared.state.meta()?,
                &live,
            );
            if !why.is_empty() {
                bail!("stale plan, not applied: {}", why.join("; "));
            }
            (prepared, plan, guard)
        }
        None => {
            let prepared = prepare(g, &a.args.tenants, now)?;
            let guard = prepared.lock("apply", a.lock)?;
            let plan = prepared.plan(now)?;
            print_plan(&plan, Format::Text, color, &ReportArgs::default())?;
            (prepared, plan, guard)
        }
    };
    if plan.errors().next().is_some() && a.plan_file.is_none() {
        eprintln!("\nTenants with errors above are not applied.");
    }
    let opts = apply::Options {
        allow_delete: a.allow_delete,
        destroy_secrets: a.destroy_secrets,
        parallelism: a.parallelism.or(prepared.desired.settings.apply.parallelism).unwrap_or(8),
        actor: actor(a.lock),
        progress: std::io::stderr().is_terminal(),
    };
    if !plan.has_changes() && !plan.changes.iter().any(|c| c.refresh) && plan.errors().next().is_none() {
        return Ok(0);
    }
    apply::preflight(&plan, &opts).map_err(anyhow::Error::msg)?;
    if plan.has_changes() && a.plan_file.is_none() {
        confirm(a.auto_approve)?;
    }
    let report = apply::apply(&plan, &prepared.providers, prepared.state.as_ref(), &opts)?;
    Ok(print_report(&report))
}

fn print_report(report: &apply::Report) -> u8 {
    let ok = report.outcomes.iter().filter(|o| o.ok).count();
    let failed: Vec<&apply::TenantOutcome> = report.failed().collect();
    println!(
        "\nApply complete: {} change{} on {} tenant{}{}; state serial {}.",
        report.applied(),
        if report.applied() == 1 { "" } else { "s" },
        ok,
        if ok == 1 { "" } else { "s" },
        if failed.is_empty() { String::new() } else { format!(", {} failed", failed.len()) },
        report.serial
    );
    for f in &failed {
        let rb = match f.rolled_back {
            Some(true) => " (rolled back)",
            Some(false) => " (ROLLBACK FAILED: live state is partly applied)",
            None => "",
        };
        eprintln!("  failed: {}{rb}: {}", f.tenant, f.error.as_deref().unwrap_or("?"));
    }
    for v in &report.verification {
        eprintln!("  verification: {v}");
    }
    if failed.is_empty() && report.verification.is_empty() { 0 } else { 1 }
}

pub fn cmd_rotate(g: &Global, tenants: &[String], secrets: &[String], emergency: bool, l: &LockArgs) -> Result<u8> {
    let now = Timestamp::now();
    let p = prepare(g, tenants, now)?;
    for t in tenants {
        if !p.desired.tenants.contains_key(t) {
            bail!("no tenant `{t}` in the repository");
        }
    }
    let _guard = p.lock(if emergency { "emergency rotation" } else { "rotation" }, l)?;
    let live = p.providers.secrets.list(&p.scope)?;
    let records = p.state.records(&p.scope)?;
    let mut changes = Vec::new();
    for t in tenants {
        let tenant = &p.desired.tenants[t];
        for name in secrets {
            match tenant.secrets.iter().find(|s| &s.name == name) {
                None => bail!("tenant {t} declares no secret `{name}`"),
                Some(s) if matches!(s.source, SecretSource::External) => {
                    bail!(
                        "secret `{name}` of tenant {t} is external: it is rotated by the person who owns it, then recorded by apply"
                    )
                }
                Some(_) => {}
            }
        }
        for s in tenant.secrets.iter().filter(|s| matches!(s.source, SecretSource::Generated { .. })) {
            if !secrets.is_empty() && !secrets.contains(&s.name) {
                continue;
            }
            let address = Address::new(t, ResourceKind::OpenbaoSecret, Some(&s.name));
            let l = live.iter().find(|x| x.address == address);
            let present = matches!(l.and_then(|l| l.content.as_ref()), Some(Content::SecretMeta(m)) if !m.deleted);
            changes.push(Change {
                address: address.clone(),
                action: if present { Action::Rotate } else { Action::Create },
                drift: false,
                risk: if emergency { Risk::Critical } else { Risk::High },
                reason: if emergency { "emergency rotation".into() } else { "rotation requested".into() },
                desired: Some(Content::Secret(s.clone())),
                live_fingerprint: l.map(|l| l.fingerprint.clone()),
                last_fingerprint: records.iter().find(|r| r.address == address).map(|r| r.fingerprint.clone()),
                before: l.and_then(|l| l.content.clone()),
                fields: Vec::new(),
                diff: String::new(),
                refresh: false,
            });
        }
    }
    if changes.is_empty() {
        println!("No generated secrets to rotate.");
        return Ok(0);
    }
    let meta = p.state.meta()?;
    let plan = Plan {
        format_version: plan::FORMAT_VERSION,
        plan_id: plan::new_id(if emergency { "emergency" } else { "rotate" }),
        created_at: now.to_string(),
        now: now.to_string(),
        revision: p.revision.clone(),
        inputs_digest: engine::inputs_digest(&p.loaded),
        lineage: meta.lineage,
        serial: meta.serial,
        tenants: Some(tenants.to_vec()),
        summary: plan::Summary { rotate: changes.len(), ..Default::default() },
        coordination: BTreeMap::new(),
        changes,
        violations: Vec::new(),
        live: BTreeMap::new(),
    };
    for c in &plan.changes {
        println!("  * {}  [{}]", c.address, c.risk.as_str());
    }
    let opts = apply::Options {
        allow_delete: false,
        destroy_secrets: false,
        parallelism: if emergency { tenants.len().max(1) } else { 4 },
        actor: actor(l),
        progress: false,
    };
    let report = apply::apply(&plan, &p.providers, p.state.as_ref(), &opts)?;
    Ok(print_report(&report))
}
