//! The reconcile loop: per tenant, level-triggered and idempotent.
//!
//! Each tenant has a next check time. Reconciling a tenant plans it against live state (the
//! same `Workspace::plan` as the CLI), then, with `--auto-apply`, applies what differs;
//! either way it ends in a status and a *requeue after*: the interval (with a tenth of
//! jitter) on success, an exponential backoff on failure (doubling from `backoff_initial` to
//! `backoff_max`, reset by the next success), two seconds while the state lock is taken by
//! someone else. Nothing is edge-triggered: a missed event costs at most one interval.
//!
//! Tenants are reconciled in batches (every tenant due within a fifth of the interval, at
//! most [`MAX_BATCH`]), so that a provider is listed once per batch rather than once per
//! tenant; at most `concurrency` batches run at once on the blocking pool (the providers
//! are synchronous and must not run on the async runtime), plus one batch of urgent tenants
//! (changed by a commit, or asked for) when every slot is busy with routine checks. A tenant
//! is never in two batches at once; asked for again while in flight, it runs once more
//! right after.
//!
//! A new commit is read once (`Workspace::open`: the render cache re-renders only tenant
//! folders whose files changed, or all of them when shared files did); the tenants whose
//! desired resources changed (by fingerprint) are due at once, the others keep their
//! schedule and are marked synced at the new revision if they were synced.
//!
//! Applies hold the state lock (`StateStore::lock`), taken with a short wait; when a person's
//! `apply` holds it, the tenants wait (status `Progressing`, "waiting for the state lock: …"),
//! and are planned again under the lock once it is free, so the two never interleave. Within
//! the process, an apply excludes every plan (the providers take one session at a time).
//!
//! Self-heal: with `--auto-apply`, drift is applied away. Each heal counts; a check that finds
//! the tenant in sync without one resets the count. After `self_heal_attempts` heals in a row
//! (drift that keeps coming back, or heals that keep failing) the daemon stops healing the
//! tenant, reports it (status `Drifted`, an event) and goes on checking; a commit that
//! changes the tenant, or `POST /api/v1/tenants/{id}/reconcile`, lets it heal again.

use super::metrics::Metrics;
use super::notifications::{self as notif, Event, Notifier};
use super::status::{ApplyView, ChangeView, Handle, Status, TenantPlan, TenantState};
use crate::apply;
use crate::diff::{Action, Change, Severity};
use crate::drift::Difference;
use crate::engine::{self, Workspace};
use crate::model::{Address, Content, ResourceKind};
use crate::plan::Plan;
use crate::providers::{Providers, TenantScope};
use crate::state::StateStore;
use jiff::Timestamp;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// The most tenants in one batch.
pub const MAX_BATCH: usize = 1000;
/// A workspace is read again (same commit) after this long: licenses expire, secrets age.
const REOPEN_AFTER: Duration = Duration::from_secs(600);
/// The wait before trying the state lock again.
const LOCK_RETRY: Duration = Duration::from_secs(2);
/// How long one try for the state lock waits.
const LOCK_WAIT: Duration = Duration::from_millis(1500);

/// A number in [0, 1) from the operating system's generator.
pub fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// `d` give or take a tenth, at random.
pub fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.9 + 0.2 * random_unit())
}

/// What the command line sets.
#[derive(Debug, Clone)]
pub struct Config {
    pub auto_apply: bool,
    pub allow_delete: bool,
    pub interval: Option<Duration>,
    pub concurrency: Option<usize>,
    pub actor: String,
}

/// How often and how hard to try: `[daemon]` of the repository, under the command line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub interval: Duration,
    pub concurrency: usize,
    pub heal_attempts: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Policy {
    pub fn of(s: &crate::load::settings::DaemonSettings, cfg: &Config) -> Policy {
        let d = |v: &Option<String>, default: Duration| {
            v.as_deref().and_then(crate::load::settings::parse_duration).filter(|d| !d.is_zero()).unwrap_or(default)
        };
        Policy {
            interval: cfg.interval.unwrap_or_else(|| d(&s.interval, Duration::from_secs(60))),
            concurrency: cfg.concurrency.or(s.concurrency).unwrap_or(2).max(1),
            heal_attempts: s.self_heal_attempts.unwrap_or(5).max(1),
            backoff_initial: d(&s.backoff_initial, Duration::from_secs(5)),
            backoff_max: d(&s.backoff_max, Duration::from_secs(300)),
        }
    }

    /// The wait after `failures` failures in a row.
    pub fn backoff(&self, failures: u32) -> Duration {
        let doubled = self.backoff_initial.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
        jitter(doubled.min(self.backoff_max))
    }
}

/// Providers and state store, kept across commits while their settings stay the same.
pub struct Backends {
    key: String,
    pub providers: Providers,
    pub state: Box<dyn StateStore>,
}

/// The engine at one commit.
pub struct EngineCtx {
    pub revision: String,
    pub ws: Workspace,
    pub backends: Arc<Backends>,
    pub opened_at: Instant,
    /// Each tenant's desired resources, as one digest (what a commit changed).
    pub digests: BTreeMap<String, String>,
    /// Tenants with state records (some may no longer be desired), read when the store was
    /// opened (afterwards the reconciler knows them: it applied them).
    pub recorded: BTreeSet<String>,
    pub policy: Policy,
}

fn digest_of(entries: &[crate::model::DesiredEntry]) -> String {
    use sha2::{Digest, Sha256};
    let mut v: Vec<(String, &crate::fingerprint::Fingerprint)> =
        entries.iter().map(|e| (e.address.to_string(), &e.fingerprint)).collect();
    v.sort();
    let mut h = Sha256::new();
    for (a, f) in v {
        h.update(a.as_bytes());
        h.update([0]);
        f.with_str(|f| h.update(f.as_bytes()));
        h.update([0]);
    }
    crate::providers::local::hex(&h.finalize())
}

/// Reads, validates and renders `commit`; a commit with errors is refused, naming them.
/// Providers and store are reused from `prev` when their settings did not change; rendered
/// content is kept only for tenants whose desired state differs from `prev`'s (the plans
/// about to run need it; the others render again on demand).
pub fn open_engine(
    root: &std::path::Path,
    commit: &str,
    prev: Option<Arc<EngineCtx>>,
    metrics: &Arc<Metrics>,
    cfg: &Config,
) -> anyhow::Result<EngineCtx> {
    let mut ws = Workspace::open(root, Some(commit), Timestamp::now())?;
    if ws.errors() > 0 {
        let mut diags: Vec<crate::diag::Diagnostic> = ws.diagnostics.iter().filter(|d| d.is_error()).cloned().collect();
        crate::diag::resolve_positions(&mut diags, |p| ws.loaded.text_of(p));
        crate::diag::sort(&mut diags);
        let shown: Vec<String> = diags
            .iter()
            .take(3)
            .map(|d| match (&d.file, d.line) {
                (Some(f), Some(l)) => format!("{f}:{l}: {}", d.message),
                (Some(f), None) => format!("{f}: {}", d.message),
                _ => d.message.clone(),
            })
            .collect();
        anyhow::bail!(
            "commit {} does not validate ({} error{}; `dotmac-gitops validate --rev {}` shows all): {}",
            crate::plan::short(commit),
            diags.len(),
            if diags.len() == 1 { "" } else { "s" },
            crate::plan::short(commit),
            shown.join("; ")
        );
    }
    let settings_json = ws.loaded.settings.clone().unwrap_or_default();
    let key = format!("{}|{}|{}", ws.state_dir.display(), settings_json["state"], settings_json["providers"]);
    let digests: BTreeMap<String, String> =
        ws.tenants.iter().map(|(id, t)| (id.clone(), digest_of(&t.entries))).collect();
    if let Some(p) = &prev {
        ws.shed(|id| p.digests.get(id) != digests.get(id));
    } else {
        ws.shed(|_| true);
    }
    let (backends, recorded) = match prev.map(|p| p.backends.clone()) {
        Some(b) if b.key == key => (b, BTreeSet::new()),
        _ => {
            let providers = Providers::from_settings(&ws.settings, &ws.state_dir)?;
            let state = engine::open_state(&ws.settings, &ws.state_dir)?;
            let recorded =
                state.records(&TenantScope::All)?.into_iter().map(|r| r.address.tenant.to_string()).collect();
            (Arc::new(Backends { key, providers: metrics.count_errors(providers), state }), recorded)
        }
    };
    let policy = Policy::of(&ws.settings.daemon, cfg);
    Ok(EngineCtx { revision: commit.to_owned(), ws, backends, opened_at: Instant::now(), digests, recorded, policy })
}

/// Plans exclude applies (and applies each other): the providers hold one session.
#[derive(Default)]
pub struct Gate(RwLock<()>);

/// Why a tenant's changes were not applied.
#[derive(Debug, Clone, PartialEq)]
pub enum Held {
    /// Deletions, and the daemon runs without `--allow-delete`.
    Deletes(usize),
    /// Self-heal stopped for this tenant.
    HealStopped,
}

/// What happened about applying, after the check.
#[derive(Debug, Clone)]
pub enum ApplyStep {
    /// Nothing to apply, or only reporting (no `--auto-apply`).
    None,
    Held(Held),
    /// The state lock is held by someone else (named).
    LockBusy(String),
    /// Shutting down: not applied.
    Cancelled,
    Applied(Applied),
}

#[derive(Debug, Clone)]
pub struct Applied {
    pub view: ApplyView,
    pub correlation_id: String,
    /// Drift was among the changes applied.
    pub healed: bool,
    /// The repository's changes applied (not drift).
    pub updates: Vec<ChangeView>,
}

/// One tenant's result in a batch.
#[derive(Debug, Clone)]
pub struct TenantOutcome {
    pub plan: TenantPlan,
    pub drift: Vec<String>,
    pub errors: Vec<String>,
    /// Changes that write (not only record catch-ups).
    pub has_changes: bool,
    pub deletes: usize,
    /// Neither desired nor recorded any more: forget the tenant.
    pub gone: bool,
    pub inconsistencies: Vec<Difference>,
    pub apply: ApplyStep,
}

/// A batch's result.
pub struct JobResult {
    pub revision: String,
    pub tenants: BTreeSet<String>,
    /// `Err`: the whole batch failed (a provider could not be listed, …).
    pub outcome: Result<BTreeMap<String, TenantOutcome>, String>,
    pub elapsed: Duration,
}

/// Everything a batch needs.
pub struct Job {
    pub ctx: Arc<EngineCtx>,
    pub tenants: BTreeSet<String>,
    /// Tenants whose self-heal stopped.
    pub no_heal: BTreeSet<String>,
    pub cfg: Arc<Config>,
    pub gate: Arc<Gate>,
    pub cancel: Arc<AtomicBool>,
    pub shared: Handle,
    pub metrics: Arc<Metrics>,
}

fn outcomes_of(plan: &Plan, tenants: &BTreeSet<String>, ws: &Workspace) -> BTreeMap<String, TenantOutcome> {
    let mut changes: BTreeMap<&str, Vec<&Change>> = BTreeMap::new();
    for c in &plan.changes {
        changes.entry(c.address.tenant.as_str()).or_default().push(c);
    }
    let mut violations: BTreeMap<&str, Vec<&crate::diff::Violation>> = BTreeMap::new();
    for v in &plan.violations {
        violations.entry(v.tenant.as_str()).or_default().push(v);
    }
    let revision = plan.revision.clone().unwrap_or_default();
    let at = Timestamp::now();
    tenants
        .iter()
        .map(|t| {
            let cs = changes.get(t.as_str()).cloned().unwrap_or_default();
            let vs = violations.get(t.as_str()).cloned().unwrap_or_default();
            let o = TenantOutcome {
                plan: TenantPlan {
                    plan_id: plan.plan_id.clone(),
                    revision: revision.clone(),
                    at,
                    changes: cs.iter().map(|c| ChangeView::of(c)).collect(),
                    violations: vs.iter().map(|v| (*v).clone()).collect(),
                },
                drift: cs.iter().filter(|c| c.drift).map(|c| c.address.to_string()).collect(),
                errors: vs.iter().filter(|v| v.severity == Severity::Error).map(|v| v.message.clone()).collect(),
                has_changes: cs.iter().any(|c| c.action != Action::Noop),
                deletes: cs.iter().filter(|c| c.action == Action::Delete).count(),
                gone: cs.is_empty() && vs.is_empty() && !ws.tenants.contains_key(t),
                inconsistencies: Vec::new(),
                apply: ApplyStep::None,
            };
            (t.clone(), o)
        })
        .collect()
}

/// Whether the daemon applies this tenant's plan on its own, or why not.
fn eligible(o: &TenantOutcome, tenant: &str, job: &Job) -> Result<bool, Held> {
    let refresh = o.plan.changes.iter().any(|c| c.action == Action::Noop);
    if !job.cfg.auto_apply || !o.errors.is_empty() || !(o.has_changes || refresh) {
        return Ok(false);
    }
    if o.deletes > 0 && !job.cfg.allow_delete {
        return Err(Held::Deletes(o.deletes));
    }
    if !o.drift.is_empty() && job.no_heal.contains(tenant) {
        return Err(Held::HealStopped);
    }
    Ok(true)
}

/// Management vs ISP for drifted tenants whose management record or ISP configuration
/// moved: both sides read in full, as `drift` does.
fn check_consistency(providers: &Providers, tenants: &BTreeSet<&str>) -> Vec<Difference> {
    let wanted: Vec<Address> = tenants
        .iter()
        .flat_map(|t| {
            [Address::new(t, ResourceKind::ManagementTenant, None), Address::new(t, ResourceKind::IspConfig, None)]
        })
        .collect();
    let live = match engine::fetch_all(providers, wanted.iter()) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("consistency check: {e:#}");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for t in tenants {
        let m = live.get(&Address::new(t, ResourceKind::ManagementTenant, None)).and_then(|l| l.content.as_deref());
        let i = live.get(&Address::new(t, ResourceKind::IspConfig, None)).and_then(|l| l.content.as_deref());
        if let (Some(Content::Json(m)), Some(Content::Text(i))) = (m, i) {
            out.extend(crate::drift::consistency(t, m, i));
        }
    }
    out
}

/// Reconciles one batch (on a blocking thread).
pub fn run_job(job: Job) -> JobResult {
    let start = Instant::now();
    let tenants = job.tenants.clone();
    let revision = job.ctx.revision.clone();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reconcile(&job)))
        .unwrap_or_else(|_| Err("internal error: the reconcile panicked (see the log)".into()));
    JobResult { revision, tenants, outcome, elapsed: start.elapsed() }
}

fn reconcile(job: &Job) -> Result<BTreeMap<String, TenantOutcome>, String> {
    let ctx = &job.ctx;
    let b = &ctx.backends;
    let scope = TenantScope::Only(job.tenants.clone());
    let mut outcomes = {
        let _read = job.gate.0.read().unwrap_or_else(|p| p.into_inner());
        let plan = ctx
            .ws
            .plan(&b.providers, b.state.as_ref(), &scope, Some(ctx.revision.clone()), false, None)
            .map_err(|e| format!("{e:#}"))?;
        let mut outcomes = outcomes_of(&plan, &job.tenants, &ctx.ws);
        let touched: BTreeSet<&str> = plan
            .changes
            .iter()
            .filter(|c| c.drift && matches!(c.address.kind, ResourceKind::ManagementTenant | ResourceKind::IspConfig))
            .map(|c| c.address.tenant.as_str())
            .collect();
        if !touched.is_empty() {
            for d in check_consistency(&b.providers, &touched) {
                if let Some(o) = outcomes.get_mut(&d.tenant) {
                    o.inconsistencies.push(d);
                }
            }
        }
        outcomes
    };
    let mut candidates = BTreeSet::new();
    for (t, o) in outcomes.iter_mut() {
        match eligible(o, t, job) {
            Ok(true) => {
                candidates.insert(t.clone());
            }
            Ok(false) => {}
            Err(h) => o.apply = ApplyStep::Held(h),
        }
    }
    if candidates.is_empty() {
        return Ok(outcomes);
    }
    if job.cancel.load(Ordering::SeqCst) {
        for t in &candidates {
            outcomes.get_mut(t).expect("candidate").apply = ApplyStep::Cancelled;
        }
        return Ok(outcomes);
    }
    {
        let mut s = job.shared.write();
        for t in &candidates {
            if let Some(ts) = s.tenants.get_mut(t) {
                ts.status = Status::Progressing;
            }
        }
    }
    let _write = job.gate.0.write().unwrap_or_else(|p| p.into_inner());
    let holder = crate::state::lock::holder_description("daemon");
    let _lock = match b.state.lock(&holder, LOCK_WAIT) {
        Ok(l) => l,
        Err(e) => {
            let msg = format!("{e:#}");
            job.metrics.lock_waits.inc();
            tracing::warn!(tenants = candidates.len(), "not applying yet: {msg}; trying again shortly");
            for t in &candidates {
                outcomes.get_mut(t).expect("candidate").apply = ApplyStep::LockBusy(msg.clone());
            }
            return Ok(outcomes);
        }
    };
    // Under the lock: plan again (someone may have applied meanwhile), apply what is left.
    let scope = TenantScope::Only(candidates.clone());
    let plan = match ctx.ws.plan(&b.providers, b.state.as_ref(), &scope, Some(ctx.revision.clone()), false, None) {
        Ok(p) => p,
        Err(e) => return Err(format!("{e:#}")),
    };
    let fresh = outcomes_of(&plan, &candidates, &ctx.ws);
    let mut apply_set = BTreeSet::new();
    for (t, mut o) in fresh {
        o.inconsistencies = std::mem::take(&mut outcomes.get_mut(&t).expect("candidate").inconsistencies);
        match eligible(&o, &t, job) {
            Ok(true) => {
                apply_set.insert(t.clone());
            }
            Ok(false) => {}
            Err(h) => o.apply = ApplyStep::Held(h),
        }
        outcomes.insert(t, o);
    }
    if apply_set.is_empty() {
        return Ok(outcomes);
    }
    let mut sub = plan;
    sub.changes.retain(|c| apply_set.contains(c.address.tenant.as_str()));
    sub.violations.retain(|v| apply_set.contains(&v.tenant));
    sub.tenants = Some(apply_set.iter().cloned().collect());
    let opts = apply::Options {
        allow_delete: job.cfg.allow_delete,
        destroy_secrets: false,
        parallelism: ctx.ws.settings.apply.parallelism.unwrap_or(8),
        actor: job.cfg.actor.clone(),
        progress: false,
        settle_journal: true,
        cancel: Some(job.cancel.clone()),
    };
    tracing::info!(plan = %sub.plan_id, tenants = apply_set.len(), changes = sub.changes.len(), "applying");
    let at = Timestamp::now();
    let correlation_id = sub.correlation_id();
    let report = match apply::apply(&sub, &b.providers, b.state.as_ref(), &opts) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("{e:#}");
            tracing::error!(plan = %sub.plan_id, "apply failed: {msg}");
            apply::Report {
                outcomes: apply_set
                    .iter()
                    .map(|t| apply::TenantOutcome {
                        tenant: t.clone(),
                        ok: false,
                        applied: 0,
                        error: Some(msg.clone()),
                        rolled_back: None,
                    })
                    .collect(),
                ..Default::default()
            }
        }
    };
    for d in &report.inconsistencies {
        if let Some(o) = outcomes.get_mut(&d.tenant) {
            o.inconsistencies.push(d.clone());
        }
    }
    for r in &report.outcomes {
        let Some(o) = outcomes.get_mut(&r.tenant) else { continue };
        if r.error.as_deref().is_some_and(|e| e.starts_with("not started")) {
            o.apply = ApplyStep::Cancelled;
            continue;
        }
        // Read-back problems of this tenant's resources ("<tenant>/<resource>: read back …").
        // Management/ISP disagreements are the repository's to fix: reported as
        // inconsistencies, not retried.
        let prefix = format!("{}/", r.tenant);
        let readback: Vec<&String> = report.verification.iter().filter(|v| v.starts_with(&prefix)).collect();
        let ok = r.ok && readback.is_empty();
        let error = match (&r.error, readback.is_empty()) {
            (Some(e), _) => Some(e.clone()),
            (None, false) => Some(format!(
                "applied, but reading back found: {}",
                readback.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("; ")
            )),
            (None, true) => None,
        };
        let views: Vec<&ChangeView> = o.plan.changes.iter().filter(|c| c.action != Action::Noop).collect();
        o.apply = ApplyStep::Applied(Applied {
            view: ApplyView {
                plan_id: sub.plan_id.clone(),
                revision: ctx.revision.clone(),
                at,
                ok,
                applied: r.applied,
                error,
                rolled_back: r.rolled_back,
            },
            correlation_id: correlation_id.clone(),
            healed: ok && views.iter().any(|c| c.drift),
            updates: if ok { views.into_iter().filter(|c| !c.drift).cloned().collect() } else { Vec::new() },
        });
    }
    Ok(outcomes)
}

/// Asks of the reconciler from the HTTP side.
#[derive(Debug)]
pub enum Command {
    /// Check (and heal) this tenant now, clearing its backoff and any stopped self-heal.
    Reconcile(String),
}

/// Drops `value` on a blocking thread: the providers may own a tokio runtime, which must not
/// be dropped inside the async runtime.
fn drop_blocking<T: Send + 'static>(value: T) {
    tokio::task::spawn_blocking(move || drop(value));
}

/// The reconciler: owns the schedule, runs batches, turns their results into statuses,
/// metrics and notifications.
pub struct Controller {
    pub cfg: Arc<Config>,
    pub shared: Handle,
    pub metrics: Arc<Metrics>,
    pub root: PathBuf,
    pub commands: mpsc::Receiver<Command>,
    pub shutdown_timeout: Duration,
    ctx: Option<Arc<EngineCtx>>,
    gate: Arc<Gate>,
    cancel: Arc<AtomicBool>,
    jobs: JoinSet<JobResult>,
    notifier: Notifier,
    /// The last commit that could not be opened, and when.
    failed_open: Option<(String, Instant)>,
    audit: super::http::AuditSlot,
}

type Opening = tokio::task::JoinHandle<(String, anyhow::Result<EngineCtx>)>;

impl Controller {
    pub fn new(
        cfg: Config,
        shared: Handle,
        metrics: Arc<Metrics>,
        root: PathBuf,
        commands: mpsc::Receiver<Command>,
        shutdown_timeout: Duration,
        audit: super::http::AuditSlot,
    ) -> Controller {
        Controller {
            cfg: Arc::new(cfg),
            shared,
            metrics,
            root,
            commands,
            shutdown_timeout,
            ctx: None,
            gate: Arc::new(Gate::default()),
            cancel: Arc::new(AtomicBool::new(false)),
            jobs: JoinSet::new(),
            notifier: Notifier::default(),
            failed_open: None,
            audit,
        }
    }

    fn policy(&self) -> Policy {
        self.ctx.as_ref().map(|c| c.policy).unwrap_or_else(|| Policy::of(&Default::default(), &self.cfg))
    }

    /// When the commit `tip` is to be read (now or later), if at all.
    fn open_due(&self, tip: Option<&str>) -> Option<Instant> {
        let tip = tip?;
        if let Some((bad, at)) = &self.failed_open
            && bad == tip
        {
            // A commit that could not be read (it does not validate, most likely) is tried
            // again only now and then: its files will not change.
            return Some(*at + self.policy().interval.max(Duration::from_secs(60)));
        }
        match &self.ctx {
            Some(c) if c.revision == tip => Some(c.opened_at + REOPEN_AFTER),
            _ => Some(Instant::now()),
        }
    }

    fn start_open(&self, commit: String) -> Opening {
        let root = self.root.clone();
        let prev = self.ctx.clone();
        let metrics = self.metrics.clone();
        let cfg = self.cfg.clone();
        tokio::task::spawn_blocking(move || {
            let r = open_engine(&root, &commit, prev, &metrics, &cfg);
            (commit, r)
        })
    }

    /// Runs until `shutdown` turns true, then stops starting work, lets in-flight tenants
    /// finish (or roll back) within the shutdown timeout, and returns whether they did.
    pub async fn run(mut self, mut tips: watch::Receiver<Option<String>>, mut shutdown: watch::Receiver<bool>) -> bool {
        let mut opening: Option<Opening> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let tip = tips.borrow().clone();
            let mut open_at = None;
            if opening.is_none()
                && let Some(at) = self.open_due(tip.as_deref())
            {
                if at <= Instant::now() {
                    opening = Some(self.start_open(tip.clone().expect("due")));
                } else {
                    open_at = Some(at);
                }
            }
            self.dispatch();
            let wake = open_at.map_or(self.next_wake(), |at| self.next_wake().min(at));
            tokio::select! {
                _ = shutdown.changed() => {}
                r = tips.changed() => { if r.is_err() { break; } }
                r = async { opening.as_mut().expect("guarded").await }, if opening.is_some() => {
                    opening = None;
                    match r {
                        Ok((commit, result)) => self.adopt(commit, result),
                        Err(e) => tracing::error!("reading the repository panicked: {e}"),
                    }
                }
                Some(r) = self.jobs.join_next(), if !self.jobs.is_empty() => match r {
                    Ok(r) => self.finish(r),
                    Err(e) => tracing::error!("a reconcile task failed: {e}"),
                },
                Some(cmd) = self.commands.recv() => self.command(cmd),
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        // Shutdown: no new tenant starts; those in flight finish or roll back.
        self.cancel.store(true, Ordering::SeqCst);
        self.shared.write().role = super::status::Role::ShuttingDown;
        let in_flight = self.jobs.len();
        if in_flight > 0 {
            tracing::info!(batches = in_flight, "shutting down: letting the tenants in flight finish or roll back");
        }
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        let mut clean = true;
        while !self.jobs.is_empty() {
            match tokio::time::timeout_at(deadline, self.jobs.join_next()).await {
                Ok(Some(Ok(r))) => self.finish(r),
                Ok(Some(Err(e))) => tracing::error!("a reconcile task failed: {e}"),
                Ok(None) => break,
                Err(_) => {
                    tracing::error!(
                        "shutdown timeout: a tenant is still being applied; its journal lets the next run finish the record"
                    );
                    clean = false;
                    break;
                }
            }
        }
        if let Some(o) = opening {
            o.abort();
        }
        std::mem::take(&mut self.notifier).close(Duration::from_secs(3)).await;
        if let Some(c) = self.ctx.take() {
            let _ = tokio::task::spawn_blocking(move || drop(c)).await;
        }
        clean
    }

    fn next_wake(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let at = if self.ctx.is_some() {
            self.shared.read().tenants.values().filter(|t| !t.in_flight).map(|t| t.due).min().unwrap_or(far)
        } else {
            far
        };
        at.max(Instant::now() + Duration::from_millis(10))
    }

    /// Starts batches of due tenants while there is room.
    fn dispatch(&mut self) {
        let Some(ctx) = self.ctx.clone() else { return };
        if self.cancel.load(Ordering::SeqCst) {
            return;
        }
        let policy = ctx.policy;
        // Tenants due within a fifth of the interval go together: the jitter spreads a batch's
        // next checks over that much, so a batch stays one batch instead of crumbling.
        let window = (policy.interval / 5).clamp(Duration::from_millis(100), Duration::from_secs(30));
        // One batch beyond `concurrency` may run, of urgent tenants only (a commit changed
        // them, someone asked): routine checks never hold a change up for long.
        while self.jobs.len() <= policy.concurrency {
            let only_urgent = self.jobs.len() == policy.concurrency;
            let horizon = Instant::now() + window;
            let (tenants, no_heal) = {
                let mut s = self.shared.write();
                let mut due: Vec<(bool, Instant, &String)> = s
                    .tenants
                    .iter()
                    .filter(|(_, t)| !t.in_flight && t.due <= horizon && (t.urgent || !only_urgent))
                    .map(|(id, t)| (!t.urgent, t.due, id))
                    .collect();
                due.sort();
                let tenants: BTreeSet<String> = due.into_iter().take(MAX_BATCH).map(|(_, _, id)| id.clone()).collect();
                let mut no_heal = BTreeSet::new();
                for id in &tenants {
                    let t = s.tenants.get_mut(id).expect("listed");
                    t.in_flight = true;
                    t.urgent = false;
                    if t.heal_stopped || t.heal_attempts >= policy.heal_attempts {
                        no_heal.insert(id.clone());
                    }
                }
                (tenants, no_heal)
            };
            if tenants.is_empty() {
                break;
            }
            tracing::debug!(tenants = tenants.len(), revision = %ctx.revision, "reconciling");
            let job = Job {
                ctx: ctx.clone(),
                tenants,
                no_heal,
                cfg: self.cfg.clone(),
                gate: self.gate.clone(),
                cancel: self.cancel.clone(),
                shared: self.shared.clone(),
                metrics: self.metrics.clone(),
            };
            self.jobs.spawn_blocking(move || run_job(job));
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Reconcile(id) => {
                let mut s = self.shared.write();
                if let Some(t) = s.tenants.get_mut(&id) {
                    t.make_urgent(Instant::now());
                    tracing::info!(tenant = %id, "reconcile requested");
                }
            }
        }
    }

    /// Takes a newly read commit into use (or reports why it cannot be).
    fn adopt(&mut self, commit: String, result: anyhow::Result<EngineCtx>) {
        let ctx = match result {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::error!(commit = %commit, "not reconciling this commit: {msg}");
                self.shared.write().revision_error = Some(msg);
                self.failed_open = Some((commit, Instant::now()));
                return;
            }
        };
        self.failed_open = None;
        let ctx = Arc::new(ctx);
        let now = Instant::now();
        let first = self.ctx.is_none();
        let same = self.ctx.as_ref().is_some_and(|c| c.revision == ctx.revision);
        {
            let mut s = self.shared.write();
            s.revision = Some(ctx.revision.clone());
            s.revision_error = None;
            let mut changed = 0usize;
            for (id, digest) in &ctx.digests {
                let t = s.tenants.entry(id.clone()).or_insert_with(|| TenantState::new(id, now));
                if let Some(d) = ctx.ws.tenants.get(id)
                    && t.label != d.label
                {
                    t.label = d.label.clone();
                }
                if t.desired.as_deref() == Some(digest.as_str()) {
                    if t.status == Status::Synced {
                        t.revision = Some(ctx.revision.clone());
                        t.synced_revision = Some(ctx.revision.clone());
                    }
                    continue;
                }
                t.desired = Some(digest.clone());
                if let Some(d) = ctx.ws.tenants.get(id) {
                    let prefix = id.len() + 1;
                    t.resources = d.entries.iter().map(|e| e.address.to_string().split_off(prefix)).collect();
                    t.resources.sort();
                }
                changed += 1;
                // The repository changed this tenant: check it now, forgetting old failures.
                t.make_urgent(now);
            }
            // Tenants no longer desired: their resources are to be deleted (or were).
            let gone: Vec<String> = s.tenants.keys().filter(|id| !ctx.digests.contains_key(*id)).cloned().collect();
            for id in gone {
                let t = s.tenants.get_mut(&id).expect("listed");
                if t.desired.take().is_some() {
                    t.due = now;
                    t.urgent = true;
                }
            }
            for id in ctx.recorded.iter().filter(|id| !ctx.digests.contains_key(*id)) {
                s.tenants.entry(id.clone()).or_insert_with(|| TenantState::new(id, now));
            }
            if !same {
                tracing::info!(revision = %ctx.revision, tenants = ctx.digests.len(), changed, cached_units = ctx.ws.cached_units,
                    first, "reconciling a new commit");
            }
        }
        if self.notifier.settings != ctx.ws.settings.notifications || first {
            let (n, problems) = Notifier::start(&ctx.ws.settings.notifications, self.metrics.clone());
            for p in problems {
                tracing::error!("notifications: {p}");
            }
            let old = std::mem::replace(&mut self.notifier, n);
            tokio::spawn(old.close(Duration::from_secs(10)));
        }
        if let Some(old) = self.audit.set(Some(ctx.backends.clone())) {
            drop_blocking(old);
        }
        if let Some(old) = self.ctx.replace(ctx) {
            drop_blocking(old);
        }
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let s = self.shared.read();
        self.metrics.set_counts(&s.counts());
        self.metrics.ready.set(i64::from(s.ready));
    }

    /// Turns a batch's result into statuses, requeue times, metrics and events.
    fn finish(&mut self, r: JobResult) {
        self.metrics.reconcile_duration.observe(r.elapsed.as_secs_f64());
        self.metrics.reconciled_tenants.inc_by(r.tenants.len() as u64);
        let policy = self.policy();
        let auto_apply = self.cfg.auto_apply;
        let mut events = Vec::new();
        let mut any_failed = r.outcome.is_err();
        {
            let mut s = self.shared.write();
            for id in &r.tenants {
                let outcome = match &r.outcome {
                    Ok(map) => map.get(id),
                    Err(_) => None,
                };
                if outcome.is_some_and(|o| o.gone) {
                    s.tenants.remove(id);
                    continue;
                }
                let Some(t) = s.tenants.get_mut(id) else { continue };
                t.in_flight = false;
                let (requeue, mut evs) = match (&r.outcome, outcome) {
                    (Err(e), _) => {
                        let requeue = fail(t, e.clone(), &policy);
                        t.record("check failed", requeue);
                        (requeue, Vec::new())
                    }
                    (Ok(_), Some(o)) => transition(t, o, &policy, auto_apply, &r.revision, &self.metrics),
                    (Ok(_), None) => (jitter(policy.interval), Vec::new()),
                };
                any_failed |= t.status == Status::Failed;
                t.revision = Some(r.revision.clone());
                t.due = if std::mem::take(&mut t.again) {
                    t.urgent = true;
                    Instant::now()
                } else {
                    Instant::now() + requeue
                };
                t.next_check = Timestamp::now().checked_add(requeue).ok();
                events.append(&mut evs);
            }
            if let Err(e) = &r.outcome {
                tracing::warn!(tenants = r.tenants.len(), "reconcile failed: {e}");
            }
            if !s.ready && self.ctx.is_some() && s.tenants.values().all(|t| t.checked) {
                s.ready = true;
                tracing::info!(tenants = s.tenants.len(), "ready: every tenant was checked once");
            }
        }
        if !any_failed {
            self.metrics.last_success.set(Timestamp::now().as_millisecond() as f64 / 1000.0);
        }
        for e in events {
            self.notifier.send(e);
        }
        self.update_gauges();
    }
}

/// A failure: status `Failed`, one more failure in a row, the backoff as requeue.
fn fail(t: &mut TenantState, error: String, policy: &Policy) -> Duration {
    t.status = Status::Failed;
    t.failures = t.failures.saturating_add(1);
    t.last_error = Some(error);
    t.checked = true;
    t.last_check = Some(Timestamp::now());
    policy.backoff(t.failures)
}

/// One tenant's new state after a check (and maybe an apply); the requeue and the events.
fn transition(
    t: &mut TenantState,
    o: &TenantOutcome,
    policy: &Policy,
    auto_apply: bool,
    revision: &str,
    metrics: &Metrics,
) -> (Duration, Vec<Event>) {
    let rev = Some(revision);
    let mut events = Vec::new();
    let now = Timestamp::now();
    t.checked = true;
    t.last_check = Some(now);
    t.last_plan = Some(o.plan.clone());
    let was_drifted = !t.drift.is_empty();
    t.drift = o.drift.clone();
    if !o.drift.is_empty() && !was_drifted {
        metrics.drift_detected.inc();
        events.push(Event::new(
            notif::DRIFT_DETECTED,
            &t.tenant,
            rev,
            json!({"resources": o.drift, "plan_id": o.plan.plan_id, "auto_apply": auto_apply}),
        ));
    }
    if !o.inconsistencies.is_empty() && o.inconsistencies != t.inconsistencies {
        events.push(Event::new(
            notif::CONSISTENCY_VIOLATION,
            &t.tenant,
            rev,
            json!({"differences": o.inconsistencies}),
        ));
    }
    t.inconsistencies = o.inconsistencies.clone();
    if !o.errors.is_empty() {
        let requeue = fail(t, o.errors.join("; "), policy);
        t.record("check failed", requeue);
        return (requeue, events);
    }
    let pending = if o.drift.is_empty() { Status::OutOfSync } else { Status::Drifted };
    let requeue = match &o.apply {
        ApplyStep::None => {
            if o.has_changes {
                t.status = pending;
                t.last_error = None;
            } else {
                t.status = Status::Synced;
                t.last_sync = Some(now);
                t.synced_revision = Some(revision.to_owned());
                t.last_error = None;
                t.failures = 0;
                // In sync without a heal: the drift (if any came before) did not come back.
                t.heal_attempts = 0;
                t.heal_stopped = false;
            }
            let r = jitter(policy.interval);
            t.record(if o.has_changes { "checked: changes pending" } else { "checked: in sync" }, r);
            r
        }
        ApplyStep::Held(h) => {
            t.status = pending;
            t.last_error = Some(match h {
                Held::Deletes(n) => format!(
                    "the plan deletes {n} resource{} (a critical change); the daemon deletes only with --allow-delete: apply it by hand or restart the daemon with --allow-delete",
                    if *n == 1 { "" } else { "s" }
                ),
                Held::HealStopped => format!(
                    "self-heal stopped after {} attempts in a row (drift keeps coming back, or healing keeps failing): find what changes it, then commit a change to the tenant or POST /api/v1/tenants/{}/reconcile",
                    t.heal_attempts, t.tenant
                ),
            });
            if *h == Held::HealStopped && !t.heal_stopped {
                t.heal_stopped = true;
                metrics.self_heal_stopped.inc();
                tracing::warn!(tenant = %t.tenant, attempts = t.heal_attempts, "self-heal stopped");
                events.push(Event::new(
                    notif::SELF_HEAL_STOPPED,
                    &t.tenant,
                    rev,
                    json!({"attempts": t.heal_attempts, "resources": o.drift}),
                ));
            }
            let r = jitter(policy.interval);
            t.record("not applied", r);
            r
        }
        ApplyStep::LockBusy(why) => {
            t.status = Status::Progressing;
            t.last_error = Some(format!("waiting for the state lock: {why}"));
            t.record("waiting for the state lock", LOCK_RETRY);
            LOCK_RETRY
        }
        ApplyStep::Cancelled => {
            t.status = pending;
            t.last_error = Some("not applied: the daemon is shutting down".into());
            let r = jitter(policy.interval);
            t.record("not applied (shutdown)", r);
            r
        }
        ApplyStep::Applied(a) => {
            t.last_apply = Some(a.view.clone());
            if !o.drift.is_empty() {
                t.heal_attempts = t.heal_attempts.saturating_add(1);
            }
            if a.view.ok {
                t.status = Status::Synced;
                t.last_sync = Some(now);
                t.synced_revision = Some(revision.to_owned());
                t.last_error = None;
                t.failures = 0;
                metrics.applied_changes.inc_by(a.view.applied as u64);
                if a.healed {
                    metrics.drift_healed.inc();
                    events.push(
                        Event::new(
                            notif::DRIFT_HEALED,
                            &t.tenant,
                            rev,
                            json!({"resources": o.drift, "plan_id": a.view.plan_id, "attempt": t.heal_attempts}),
                        )
                        .correlation(Some(a.correlation_id.clone())),
                    );
                    t.drift.clear();
                }
                if !a.updates.is_empty() {
                    let changes: Vec<serde_json::Value> = a
                        .updates
                        .iter()
                        .map(|c| json!({"address": c.address, "action": c.action, "risk": c.risk}))
                        .collect();
                    events.push(
                        Event::new(
                            notif::CONFIGURATION_UPDATED,
                            &t.tenant,
                            rev,
                            json!({"changes": changes, "plan_id": a.view.plan_id}),
                        )
                        .correlation(Some(a.correlation_id.clone())),
                    );
                }
                let r = jitter(policy.interval);
                t.record(if a.healed { "applied (healed drift)" } else { "applied" }, r);
                r
            } else {
                metrics.apply_failures.inc();
                let error = a.view.error.clone().unwrap_or_else(|| "apply failed".into());
                if t.last_error.as_deref() != Some(error.as_str()) || t.status != Status::Failed {
                    events.push(
                        Event::new(
                            notif::APPLY_FAILED,
                            &t.tenant,
                            rev,
                            json!({"error": error, "rolled_back": a.view.rolled_back, "plan_id": a.view.plan_id, "failures": t.failures + 1}),
                        )
                        .correlation(Some(a.correlation_id.clone())),
                    );
                }
                tracing::warn!(tenant = %t.tenant, failures = t.failures + 1, "apply failed: {error}");
                let r = fail(t, error, policy);
                t.record("apply failed", r);
                r
            }
        }
    };
    (requeue, events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            interval: Duration::from_secs(60),
            concurrency: 2,
            heal_attempts: 3,
            backoff_initial: Duration::from_secs(5),
            backoff_max: Duration::from_secs(60),
        }
    }

    fn outcome(drift: bool, changes: bool, apply: ApplyStep) -> TenantOutcome {
        TenantOutcome {
            plan: TenantPlan {
                plan_id: "plan-1".into(),
                revision: "abc".into(),
                at: Timestamp::now(),
                changes: Vec::new(),
                violations: Vec::new(),
            },
            drift: if drift { vec!["t1/isp.config".into()] } else { Vec::new() },
            errors: Vec::new(),
            has_changes: changes,
            deletes: 0,
            gone: false,
            inconsistencies: Vec::new(),
            apply,
        }
    }

    fn applied(ok: bool) -> ApplyStep {
        ApplyStep::Applied(Applied {
            view: ApplyView {
                plan_id: "plan-2".into(),
                revision: "abc".into(),
                at: Timestamp::now(),
                ok,
                applied: 1,
                error: (!ok).then(|| "injected".into()),
                rolled_back: (!ok).then_some(true),
            },
            correlation_id: "plan-2@abc".into(),
            healed: ok,
            updates: Vec::new(),
        })
    }

    #[test]
    fn backoff_doubles_is_capped_and_resets_on_success() {
        let p = policy();
        let m = Metrics::new();
        let mut t = TenantState::new("t1", Instant::now());
        let mut waits = Vec::new();
        for _ in 0..6 {
            let (r, _) = transition(&mut t, &outcome(false, true, applied(false)), &p, true, "abc", &m);
            waits.push(r);
        }
        assert_eq!(t.failures, 6);
        assert_eq!(t.status, Status::Failed);
        for (i, w) in waits.iter().enumerate() {
            let base = Duration::from_secs(5 * (1 << i)).min(Duration::from_secs(60));
            assert!(*w >= base.mul_f64(0.9) && *w <= base.mul_f64(1.1), "wait {i}: {w:?} vs {base:?}");
        }
        let (r, _) = transition(&mut t, &outcome(false, true, applied(true)), &p, true, "abc", &m);
        assert_eq!((t.status, t.failures, t.last_error.as_deref()), (Status::Synced, 0, None));
        assert!(r >= Duration::from_secs(54) && r <= Duration::from_secs(66));
    }

    #[test]
    fn drift_is_reported_once_healed_and_counted() {
        let p = policy();
        let m = Metrics::new();
        let mut t = TenantState::new("t1", Instant::now());
        let (_, ev) = transition(&mut t, &outcome(true, true, ApplyStep::None), &p, false, "abc", &m);
        assert_eq!(t.status, Status::Drifted);
        assert_eq!(ev.iter().map(|e| e.event).collect::<Vec<_>>(), [notif::DRIFT_DETECTED]);
        let (_, ev) = transition(&mut t, &outcome(true, true, ApplyStep::None), &p, false, "abc", &m);
        assert!(ev.is_empty(), "drift that stays is not reported again");
        let (_, ev) = transition(&mut t, &outcome(true, true, applied(true)), &p, true, "abc", &m);
        assert_eq!(t.status, Status::Synced);
        assert_eq!(ev.iter().map(|e| e.event).collect::<Vec<_>>(), [notif::DRIFT_HEALED]);
        assert_eq!(t.heal_attempts, 1);
        assert_eq!(m.drift_healed.get(), 1);
        // A check in sync without a heal resets the count.
        transition(&mut t, &outcome(false, false, ApplyStep::None), &p, true, "abc", &m);
        assert_eq!(t.heal_attempts, 0);
    }

    #[test]
    fn self_heal_stops_and_says_so_once() {
        let p = policy();
        let m = Metrics::new();
        let mut t = TenantState::new("t1", Instant::now());
        for _ in 0..3 {
            transition(&mut t, &outcome(true, true, applied(true)), &p, true, "abc", &m);
        }
        assert_eq!(t.heal_attempts, 3);
        let (_, ev) = transition(&mut t, &outcome(true, true, ApplyStep::Held(Held::HealStopped)), &p, true, "abc", &m);
        assert!(t.heal_stopped);
        assert_eq!(t.status, Status::Drifted);
        assert!(t.last_error.as_deref().unwrap().contains("self-heal stopped after 3 attempts"));
        assert!(ev.iter().any(|e| e.event == notif::SELF_HEAL_STOPPED));
        let (_, ev) = transition(&mut t, &outcome(true, true, ApplyStep::Held(Held::HealStopped)), &p, true, "abc", &m);
        assert!(!ev.iter().any(|e| e.event == notif::SELF_HEAL_STOPPED), "said once");
        assert_eq!(m.self_heal_stopped.get(), 1);
    }

    #[test]
    fn a_taken_lock_is_a_wait_not_a_failure() {
        let p = policy();
        let m = Metrics::new();
        let mut t = TenantState::new("t1", Instant::now());
        let (r, _) =
            transition(&mut t, &outcome(false, true, ApplyStep::LockBusy("apply by bob".into())), &p, true, "abc", &m);
        assert_eq!((t.status, t.failures, r), (Status::Progressing, 0, LOCK_RETRY));
        assert!(t.last_error.as_deref().unwrap().contains("apply by bob"));
    }

    #[test]
    fn policy_takes_the_command_line_over_the_repository() {
        let s = crate::load::settings::DaemonSettings {
            interval: Some("5m".into()),
            concurrency: Some(4),
            self_heal_attempts: Some(2),
            backoff_initial: Some("1s".into()),
            backoff_max: Some("10s".into()),
        };
        let cfg = Config {
            auto_apply: true,
            allow_delete: false,
            interval: Some(Duration::from_secs(7)),
            concurrency: None,
            actor: "d".into(),
        };
        let p = Policy::of(&s, &cfg);
        assert_eq!(p.interval, Duration::from_secs(7));
        assert_eq!((p.concurrency, p.heal_attempts), (4, 2));
        assert!(p.backoff(10) <= Duration::from_secs(11));
    }
}
