//! `plan`, `apply` and `rotate`.

use super::commands::{color, parse_now, print_diagnostics};
use super::{Format, Global, LockArgs, PlanArgs, ReportArgs};
use crate::apply;
use crate::diff::{Action, Change, Risk};
use crate::engine::{self, Workspace};
use crate::load::settings::parse_duration;
use crate::load::{self, Origin, source};
use crate::model::{Address, Content, ResourceKind, SecretSource};
use crate::plan::{self, Plan};
use crate::providers::{Providers, TenantScope};
use crate::state::{StateStore, lock};
use anyhow::{Context, Result, bail};
use jiff::Timestamp;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

/// A repository validated and rendered (through the render cache), with its state and
/// providers open.
pub struct Prepared {
    pub ws: Workspace,
    pub providers: Providers,
    pub state: Box<dyn StateStore>,
    pub scope: TenantScope,
    pub revision: Option<String>,
    /// The records in scope, read while the work tree was (`Early::Records`); the plan
    /// takes them instead of reading them again.
    records: Option<Vec<crate::state::Record>>,
}

/// What `prepare` may start on while the repository is read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Early {
    Nothing,
    /// The state's records, from a local state store that exists already. Only for a
    /// command that takes no lock (`plan`): a command that plans under the state lock must
    /// read the records after taking it.
    Records,
}

fn scope_of(tenants: &[String]) -> TenantScope {
    if tenants.is_empty() { TenantScope::All } else { TenantScope::Only(tenants.iter().cloned().collect()) }
}

/// Where an answer about git's index is remembered (`WorktreeIndex`): `git-clean`, whether
/// the work tree is its commit; `git-staged`, whether anything is staged.
fn git_cache(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("cache").join(name)
}

/// Opens the repository; with `strict`, any error in it stops here (after printing them).
pub fn prepare(g: &Global, tenants: &[String], now: Timestamp, strict: bool, early: Early) -> Result<Prepared> {
    let root = load::find_root(g.repo.as_deref())?;
    let scope = scope_of(tenants);
    // git's index is read while the repository is; whether the work tree is its commit is
    // then told from the files as read. With `Early::Records`, so are the records, once the
    // settings name the state folder (tenant folders are `stat`ed meanwhile, and the
    // render cache's tenants made desired ones, which leave a core free).
    let (ws, worktree_revision, early_records) = std::thread::scope(|s| {
        // Where an earlier run's answer about git's index is kept is known once the
        // settings name the state folder; the thread reading the index waits for that.
        let (state_dir_tx, state_dir_rx) = std::sync::mpsc::channel::<PathBuf>();
        let root = &root;
        let status = g.rev.is_none().then(|| {
            s.spawn(move || {
                let t = std::time::Instant::now();
                let i = source::worktree_index(root, || Some(git_cache(&state_dir_rx.recv().ok()?, "git-clean")));
                tracing::debug!(elapsed = ?t.elapsed(), read = i.as_ref().map(|i| i.was_read()), "git's index");
                i
            })
        });
        let reading = std::sync::Mutex::new(None);
        let start = |settings: &crate::load::settings::Settings, state_dir: &Path| {
            let _ = state_dir_tx.send(state_dir.to_path_buf());
            let Some(dir) = engine::local_state(settings, state_dir).filter(|_| early == Early::Records) else {
                return;
            };
            let scope = &scope;
            let h = s.spawn(move || {
                let t = std::time::Instant::now();
                // Only a store that exists, of this build's schema: this read changes nothing.
                let r = crate::state::sqlite::SqliteStore::open_current(&dir)
                    .and_then(|st| st.map(|st| st.records(scope)).transpose());
                tracing::debug!(elapsed = ?t.elapsed(), "read the records early");
                (dir, r)
            });
            *reading.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
        };
        let ws = Workspace::open_with(root, g.rev.as_deref(), now, &start);
        // Settings that never named the state folder: the index thread stops waiting.
        drop(state_dir_tx);
        let records = reading.into_inner().unwrap_or_else(|p| p.into_inner()).and_then(|h| h.join().ok());
        (ws, status.and_then(|h| h.join().ok().flatten()), records)
    });
    let ws = ws?;
    if strict && !ws.diagnostics.is_empty() {
        let mut diags = ws.diagnostics.clone();
        crate::diag::resolve_positions(&mut diags, |p| ws.loaded.text_of(p));
        crate::diag::sort(&mut diags);
        print_diagnostics(&ws.loaded, &diags, color(g));
        let errors = ws.errors();
        if errors > 0 {
            bail!("the repository has {errors} error{}; nothing was done", if errors == 1 { "" } else { "s" });
        }
    }
    let state = engine::open_state(&ws.settings, &ws.state_dir)?;
    if !tenants.is_empty() {
        let recorded: BTreeSet<String> =
            state.records(&scope_of(tenants))?.into_iter().map(|r| r.address.tenant.to_string()).collect();
        let missing: Vec<&String> =
            tenants.iter().filter(|t| !ws.tenants.contains_key(*t) && !recorded.contains(*t)).collect();
        if !missing.is_empty() {
            bail!(
                "no tenant {} in the repository or the state",
                missing.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(", ")
            );
        }
    }
    let providers = Providers::from_settings(&ws.settings, &ws.state_dir)?;
    let revision = match &ws.loaded.origin {
        Origin::Commit(c) => Some(c.clone()),
        Origin::WorkTree => {
            let cache = git_cache(&ws.state_dir, "git-staged");
            // A file of a tenant folder known by its `stat` was not read: it is read now.
            let text_of = |p: &str| {
                ws.loaded
                    .text_of(p)
                    .map(Cow::Borrowed)
                    .or_else(|| std::fs::read_to_string(ws.loaded.root.join(p)).ok().map(Cow::Owned))
            };
            let remember = git_cache(&ws.state_dir, "git-clean");
            worktree_revision.and_then(|i| {
                i.commit_if_clean(&ws.loaded.stats, text_of, Some(&cache), Some((&remember, ws.loaded.read_started_ns)))
            })
        }
    };
    // Records read early count if they came from the store the validated settings name.
    let records = early_records.and_then(|(dir, r)| {
        (engine::local_state(&ws.settings, &ws.state_dir) == Some(dir)).then(|| r.ok().flatten()).flatten()
    });
    Ok(Prepared { ws, providers, state, scope, revision, records })
}

impl Prepared {
    /// Ends the command: providers close (a local store saves its index) and the state store
    /// closes; the rest — hundreds of thousands of small allocations for a big repository — is
    /// left to the process exit, which frees it at once.
    pub fn finish(self) {
        let Prepared { ws, providers, state, .. } = self;
        providers.close();
        drop(state);
        std::mem::forget(providers);
        std::mem::forget(ws);
    }

    /// The plan; `record_live` keeps every live fingerprint (for a saved plan).
    pub fn plan(&mut self, record_live: bool) -> Result<Plan> {
        let records = self.records.take();
        self.ws.plan(&self.providers, self.state.as_ref(), &self.scope, self.revision.clone(), record_live, records)
    }

    pub fn lock(&self, what: &str, l: &LockArgs) -> Result<Box<dyn crate::state::StateLock>> {
        let timeout = parse_duration(&l.lock_timeout)
            .with_context(|| format!("--lock-timeout `{}` is not a duration such as 30s or 5m", l.lock_timeout))?;
        self.state.lock(&lock::holder_description(what), timeout)
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
    let mut p = prepare(g, &args.tenants, now, true, Early::Records)?;
    let plan = p.plan(out.is_some())?;
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
    let code = if plan.errors().next().is_some() {
        1
    } else if detailed && plan.has_changes_or_drift() {
        2
    } else {
        0
    };
    p.finish();
    std::mem::forget(plan);
    Ok(code)
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
    // With --auto-approve the plan is printed while the apply starts (nothing waits for a
    // person to read it); the report follows it on stdout either way.
    let print_beside = a.plan_file.is_none() && a.auto_approve;
    let (prepared, plan, _guard) = match a.plan_file {
        Some(file) => {
            let plan = load_plan(file)?;
            if !a.args.tenants.is_empty() {
                bail!("--tenant cannot narrow a saved plan; plan again with --tenant");
            }
            // The repository as it is now, judged at the plan's time: to check that nothing
            // moved, and that planning again gives this very plan.
            let planned_at: Timestamp =
                plan.now.parse().with_context(|| format!("{} is not a dotmac-gitops plan file", file.display()))?;
            let mut prepared = prepare(g, &[], planned_at, false, Early::Nothing)?;
            prepared.scope = match &plan.tenants {
                None => TenantScope::All,
                Some(t) => TenantScope::Only(t.iter().cloned().collect()),
            };
            let guard = prepared.lock("apply", a.lock)?;
            let mut known: BTreeSet<String> = prepared.state.recorded_tenants()?;
            known.retain(|t| prepared.scope.contains(t));
            known.extend(plan.live.keys().filter_map(|a| a.split_once('/')).map(|(t, _)| t.to_owned()));
            known.extend(plan.changes.iter().map(|c| c.address.tenant.to_string()));
            engine::begin_session(&prepared.providers, plan.correlation_id(), known, plan.coordination.clone());
            let live =
                engine::read_live(&prepared.providers, &prepared.scope, &engine::disabled(&prepared.ws.settings))?;
            let why = plan::staleness(
                &plan,
                prepared.revision.as_deref(),
                &engine::inputs_digest(&prepared.ws.loaded),
                &prepared.state.meta()?,
                &live.resources,
                &live.unreadable,
            );
            if !why.is_empty() {
                bail!("stale plan, not applied: {}", why.join("; "));
            }
            // Nothing moved: planning again must give this very plan (at its time).
            let fresh = prepared.plan(true)?;
            let edited = plan::differences(&plan, &fresh);
            if !edited.is_empty() {
                let n = edited.len();
                let shown: Vec<String> = edited.into_iter().take(5).collect();
                bail!(
                    "the plan file does not match the repository it was made from (edited by hand?), not applied: {}{}",
                    shown.join("; "),
                    if n > 5 { format!("; and {} more", n - 5) } else { String::new() }
                );
            }
            (prepared, plan, guard)
        }
        None => {
            let mut prepared = prepare(g, &a.args.tenants, now, true, Early::Nothing)?;
            let guard = prepared.lock("apply", a.lock)?;
            let plan = prepared.plan(false)?;
            // The repository's texts and parsed documents are not needed past the plan: their
            // memory is given back before the apply allocates its own.
            drop(std::mem::take(&mut prepared.ws.loaded.files));
            drop(std::mem::take(&mut prepared.ws.loaded.docs));
            if !print_beside {
                print_plan(&plan, Format::Text, color, &ReportArgs::default())?;
            }
            (prepared, plan, guard)
        }
    };
    let print = || print_plan(&plan, Format::Text, color, &ReportArgs::default());
    if plan.errors().next().is_some() && a.plan_file.is_none() {
        if print_beside {
            print()?;
        }
        eprintln!("\nTenants with errors above are not applied.");
    }
    let print_beside = print_beside && plan.errors().next().is_none();
    let opts = apply::Options {
        allow_delete: a.allow_delete,
        destroy_secrets: a.destroy_secrets,
        parallelism: a.parallelism.or(prepared.ws.settings.apply.parallelism).unwrap_or(8),
        actor: actor(a.lock),
        progress: std::io::stderr().is_terminal(),
        settle_journal: true,
        cancel: None,
    };
    // Nothing to write, record or settle (an interrupted apply's journal is settled by an
    // apply, even one with nothing left to write).
    if !plan.has_changes()
        && !plan.changes.iter().any(|c| c.refresh)
        && plan.errors().next().is_none()
        && prepared.state.journal()?.is_empty()
    {
        if print_beside {
            print()?;
        }
        return Ok(0);
    }
    if let Err(e) = apply::preflight(&plan, &opts) {
        if print_beside {
            print()?;
        }
        return Err(anyhow::Error::msg(e));
    }
    if plan.has_changes() && a.plan_file.is_none() {
        confirm(a.auto_approve)?;
    }
    let report = if print_beside {
        std::thread::scope(|s| {
            let printing = s.spawn(print);
            let report = apply::apply(&plan, &prepared.providers, prepared.state.as_ref(), &opts);
            let printed = printing.join().unwrap_or_else(|_| Err(anyhow::anyhow!("printing the plan panicked")));
            // The apply's own error first; a plan that could not be printed after it.
            report.and_then(|r| printed.map(|()| r))
        })?
    } else {
        apply::apply(&plan, &prepared.providers, prepared.state.as_ref(), &opts)?
    };
    let code = print_report(&report);
    prepared.finish();
    std::mem::forget(plan);
    Ok(code)
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
    let p = prepare(g, tenants, now, true, Early::Nothing)?;
    for t in tenants {
        if !p.ws.tenants.contains_key(t) {
            bail!("no tenant `{t}` in the repository");
        }
    }
    let _guard = p.lock(if emergency { "emergency rotation" } else { "rotation" }, l)?;
    let live = p.providers.secrets.list(&p.scope)?;
    let records = p.state.records(&p.scope)?;
    let mut changes = Vec::new();
    for t in tenants {
        let declared: Vec<&crate::model::SecretSpec> = p.ws.tenants[t]
            .entries
            .iter()
            .filter_map(|e| match e.content.as_deref() {
                Some(Content::Secret(s)) => Some(s),
                _ => None,
            })
            .collect();
        for name in secrets {
            match declared.iter().find(|s| &s.name == name) {
                None => bail!("tenant {t} declares no secret `{name}`"),
                Some(s) if matches!(s.source, SecretSource::External) => {
                    bail!(
                        "secret `{name}` of tenant {t} is external: it is rotated by the person who owns it, then recorded by apply"
                    )
                }
                Some(_) => {}
            }
        }
        for s in declared.iter().filter(|s| matches!(s.source, SecretSource::Generated { .. })) {
            if !secrets.is_empty() && !secrets.contains(&s.name) {
                continue;
            }
            let address = Address::new(t, ResourceKind::OpenbaoSecret, Some(&s.name));
            let l = live.iter().find(|x| x.address == address);
            let present = matches!(l.and_then(|l| l.content.as_deref()), Some(Content::SecretMeta(m)) if !m.deleted);
            changes.push(Change {
                address: address.clone(),
                action: if present { Action::Rotate } else { Action::Create },
                drift: false,
                risk: if emergency { Risk::Critical } else { Risk::High },
                reason: if emergency { "emergency rotation".into() } else { "rotation requested".into() },
                desired: Some(Content::Secret((*s).clone()).into()),
                desired_fingerprint: None,
                live_fingerprint: l.map(|l| l.fingerprint.clone()),
                last_fingerprint: records.iter().find(|r| r.address == address).map(|r| r.fingerprint.clone()),
                before: l.and_then(|l| l.content.as_deref().cloned()),
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
        inputs_digest: engine::inputs_digest(&p.ws.loaded),
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
        settle_journal: false,
        cancel: None,
    };
    let report = apply::apply(&plan, &p.providers, p.state.as_ref(), &opts)?;
    Ok(print_report(&report))
}
