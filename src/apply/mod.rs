//! Apply: executes a plan's changes on the providers and records them.
//!
//! Per tenant, in the tenant's coordination strategy: `management_first` writes in apply
//! order (secrets, management, ISP, Kubernetes; deletes in reverse); `synchronized` writes
//! management and ISP at the same time. Before writing, the live resources are read again
//! and must still be what the plan saw. With `rollback_on_failure`, a failed tenant's writes
//! are undone from the live content read before writing. One tenant's failure never stops
//! another's. The whole plan is journaled before the first write; state records and audit
//! entries are committed per batch of tenants; the providers make every write durable once at
//! the end, and only then is the journal settled (see ARCHITECTURE.md, invariants).

use crate::diff::{Action, Change, Risk, Severity};
use crate::drift::Difference;
use crate::fingerprint::{Fingerprint, shown};
use crate::model::{
    Address, Charset, Content, Coordination, ProviderId, Resource, ResourceKind, SecretSource, Strategy,
};
use crate::plan::Plan;
use crate::providers::secret_value::SecretValue;
use crate::providers::{Expect, LiveResource, ProviderError, Providers, Session};
use crate::state::{AuditEntry, Commit, JournalEntry, JsonText, StateStore, Upsert};
use rayon::prelude::*;
use rustc_hash::{FxHashMap, FxHashSet};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct Options {
    pub allow_delete: bool,
    pub destroy_secrets: bool,
    pub parallelism: usize,
    pub actor: String,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// The plan compared every resource of its tenants (a plan made by `plan::build`, not a
    /// rotation): journal entries left by an interrupted apply for those tenants were taken
    /// into account by it, and are cleared once the tenant is applied (or has nothing to do).
    pub settle_journal: bool,
    /// When set (a shutdown), tenants not yet started are not started: they are reported
    /// as failed with "not started", and the tenants in flight finish (or roll back).
    pub cancel: Option<Arc<AtomicBool>>,
}

/// How one tenant's apply ended.
#[derive(Debug, Clone)]
pub struct TenantOutcome {
    pub tenant: String,
    pub ok: bool,
    pub applied: usize,
    pub error: Option<String>,
    /// `Some(true)`: rolled back; `Some(false)`: the rollback failed too.
    pub rolled_back: Option<bool>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub outcomes: Vec<TenantOutcome>,
    pub serial: u64,
    /// Problems found by reading back what was written (consistency validation).
    pub verification: Vec<String>,
    /// The management/ISP disagreements among them, one per difference.
    pub inconsistencies: Vec<Difference>,
}

impl Report {
    pub fn failed(&self) -> impl Iterator<Item = &TenantOutcome> {
        self.outcomes.iter().filter(|o| !o.ok)
    }
    pub fn applied(&self) -> usize {
        self.outcomes.iter().map(|o| o.applied).sum()
    }
}

/// Refuses a plan that may not be applied as asked, before anything is written.
pub fn preflight(plan: &Plan, opts: &Options) -> Result<(), String> {
    let deletes: Vec<String> =
        plan.changes.iter().filter(|c| c.action == Action::Delete).map(|c| c.address.text()).collect();
    if !deletes.is_empty() && !opts.allow_delete {
        let n = deletes.len();
        let shown: Vec<String> = deletes.into_iter().take(5).collect();
        return Err(format!(
            "the plan deletes {n} resource{} ({}{}), a critical change: nothing was applied; pass --allow-delete to apply it",
            if n == 1 { "" } else { "s" },
            shown.join(", "),
            if n > 5 { ", …" } else { "" }
        ));
    }
    Ok(())
}

/// One step done on a live system, kept for rollback.
struct Done<'a> {
    change: &'a Change,
    before: Option<LiveResource>,
    after: Option<LiveResource>,
}

struct TenantResult {
    outcome: TenantOutcome,
    commit: Commit,
    /// What was written and should now be live (address, fingerprint), for verification.
    written: Vec<(Address, Option<Fingerprint>)>,
}

struct Ctx<'a> {
    plan: &'a Plan,
    providers: &'a Providers,
    state: &'a dyn StateStore,
    opts: &'a Options,
    /// The plan's correlation id and the actor, shared by every audit entry of the apply.
    correlation: Arc<str>,
    actor: Arc<str>,
}

/// Applies `plan`. The caller holds the state lock and has checked the plan is not stale.
pub fn apply(plan: &Plan, providers: &Providers, state: &dyn StateStore, opts: &Options) -> anyhow::Result<Report> {
    preflight(plan, opts).map_err(anyhow::Error::msg)?;
    let mut by_tenant: BTreeMap<&str, Vec<&Change>> = BTreeMap::new();
    for c in &plan.changes {
        by_tenant.entry(c.address.tenant.as_str()).or_default().push(c);
    }
    let blocked: FxHashMap<&str, String> = plan
        .violations
        .iter()
        .filter(|v| v.severity == Severity::Error)
        .map(|v| (v.tenant.as_str(), v.message.clone()))
        .collect();
    // Journal entries of interrupted applies, by tenant, that this plan has settled.
    let prior = state.journal()?;
    let journal_was_empty = prior.is_empty();
    let mut stale: FxHashMap<String, Vec<String>> = FxHashMap::default();
    if opts.settle_journal {
        for j in prior.into_iter().filter(|j| *j.plan_id != *plan.plan_id) {
            let Some(tenant) = Address::parse(&j.address).map(|a| a.tenant.to_string()) else { continue };
            let in_scope = plan.tenants.as_ref().is_none_or(|ts| ts.contains(&tenant));
            if in_scope && !blocked.contains_key(tenant.as_str()) {
                stale.entry(tenant).or_default().push(j.address);
            }
        }
    }
    // Tenants with nothing to do: the plan found live, records and the repository agreeing,
    // so what their old journal entries said no longer matters.
    let settled = Commit {
        clear_journal: stale
            .iter()
            .filter(|(t, _)| !by_tenant.contains_key(t.as_str()))
            .flat_map(|(_, a)| a.iter().cloned())
            .collect(),
        ..Commit::default()
    };
    let mut report = Report::default();
    for (t, why) in &blocked {
        by_tenant.remove(t);
        report.outcomes.push(TenantOutcome {
            tenant: (*t).to_owned(),
            ok: false,
            applied: 0,
            error: Some(format!("not applied: {why}")),
            rolled_back: None,
        });
    }
    if by_tenant.is_empty() {
        report.serial = state.meta()?.serial;
        state.commit(report.serial, &settled)?;
        return Ok(report);
    }
    let serial = state.begin_apply()?;
    report.serial = serial;
    // The journal: every write this apply may do, recorded before the first one is durable,
    // and cleared only once all of them are. An apply that dies leaves it for the next plan,
    // which treats those addresses as in flight (finished or not), not as drift. Providers
    // that keep writes in memory until `flush` (local stores) are written to while the
    // journal is; it is durable before they flush. Others wait for it.
    let started_at = std::time::Instant::now();
    let journaled: Vec<&Change> = by_tenant.values().flatten().filter(|c| c.action != Action::Noop).copied().collect();
    let write_journal = || -> anyhow::Result<()> {
        let started: Arc<str> = jiff::Timestamp::now().to_string().into();
        let plan_id: Arc<str> = plan.plan_id.as_str().into();
        let journal: Vec<JournalEntry> = journaled
            .iter()
            .map(|c| JournalEntry {
                address: c.address.text(),
                plan_id: Arc::clone(&plan_id),
                action: Cow::Borrowed(c.action.as_str()),
                intended: intended_fingerprint(c, opts.destroy_secrets).map(|f| f.to_string()),
                started_at: Arc::clone(&started),
            })
            .collect();
        state.journal_add(&journal)?;
        tracing::debug!(entries = journal.len(), elapsed = ?started_at.elapsed(), rss_mib = crate::engine::rss_mib(), "journaled");
        Ok(())
    };
    let buffered = ProviderId::ALL.iter().all(|p| providers.get(*p).durable_on_flush());
    if !buffered {
        write_journal()?;
    }
    let ctx = Ctx {
        plan,
        providers,
        state,
        opts,
        correlation: plan.correlation_id().into(),
        actor: opts.actor.as_str().into(),
    };
    providers.begin(&Session {
        correlation_id: ctx.correlation.to_string(),
        tenants: by_tenant.keys().map(|t| (*t).to_owned()).collect(),
        coordination: plan.coordination.clone(),
    });

    let bar = progress_bar(opts.progress, by_tenant.len() as u64);
    let queue = Mutex::new(by_tenant.into_iter());
    let (tx, rx) = mpsc::channel::<TenantResult>();
    let workers = workers(opts.parallelism, buffered);
    let mut written_all: Vec<(Address, Option<Fingerprint>)> = Vec::with_capacity(plan.changes.len());
    let mut commit_error: Option<anyhow::Error> = None;
    // What the journal learns from this apply, committed only once every write is durable.
    let mut settle = settled;
    let mut durable: crate::providers::Result<()> = Ok(());
    // Set when the journal could not be written: no tenant starts, nothing is flushed.
    let unjournaled = AtomicBool::new(false);
    let mut journal_error: Option<anyhow::Error> = None;
    let mut expected: FxHashMap<&str, Vec<Difference>> = FxHashMap::default();
    std::thread::scope(|s| {
        let mut working = Vec::with_capacity(workers);
        for _ in 0..workers {
            let tx = tx.clone();
            let queue = &queue;
            let ctx = &ctx;
            let stale = &stale;
            let unjournaled = &unjournaled;
            working.push(s.spawn(move || {
                behind_the_committer();
                loop {
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                    let Some((tenant, changes)) = next else { break };
                    if unjournaled.load(Ordering::SeqCst)
                        || ctx.opts.cancel.as_ref().is_some_and(|c| c.load(Ordering::SeqCst))
                    {
                        let r = TenantResult {
                            outcome: TenantOutcome {
                                tenant: tenant.to_owned(),
                                ok: false,
                                applied: 0,
                                error: Some("not started: the apply was cancelled".into()),
                                rolled_back: None,
                            },
                            commit: Commit::default(),
                            written: Vec::new(),
                        };
                        if tx.send(r).is_err() {
                            break;
                        }
                        continue;
                    }
                    let coord = ctx.plan.coordination.get(tenant).cloned().unwrap_or_default();
                    let settles = stale.get(tenant).map(Vec::as_slice).unwrap_or_default();
                    let r = apply_tenant(ctx, tenant, changes, &coord, settles);
                    if tx.send(r).is_err() {
                        break;
                    }
                }
            }));
        }
        drop(tx);
        // Once every write is done and the journal is durable, the providers make the writes
        // durable (a local store: each changed shard file once) while the committer records
        // what it has not yet: it trails the workers by some batches. Neither needs the
        // other; the journal is settled only once both are over. Meanwhile, what consistency
        // validation will find where both sides are read back as planned: the cores have
        // room while the flush waits for the disk.
        let (journaled_tx, journaled_rx) = mpsc::channel::<bool>();
        let finishing = s.spawn(move || {
            // The committer is what the apply waits for at its end: the flush, its threads
            // (which inherit this nice value) and the check take what it leaves.
            behind_the_committer();
            for w in working {
                // A worker's panic is the apply's, as when the scope joined it.
                if let Err(p) = w.join() {
                    std::panic::resume_unwind(p);
                }
            }
            if journaled_rx.recv() != Ok(true) {
                return None;
            }
            tracing::debug!(elapsed = ?started_at.elapsed(), "all writes done");
            let flushing = s.spawn(|| flush_all(providers));
            // On two threads of this one's priority, not the global pool's (which is the
            // committer's). A panic here only loses the head start: every tenant is then
            // compared below.
            let expected = std::panic::catch_unwind(|| planned_consistency(plan)).unwrap_or_default();
            let durable =
                flushing.join().unwrap_or_else(|_| Err(ProviderError::Other("flushing the providers panicked".into())));
            Some((durable, expected))
        });
        if buffered && let Err(e) = write_journal() {
            unjournaled.store(true, Ordering::SeqCst);
            journal_error = Some(e);
        }
        let _ = journaled_tx.send(journal_error.is_none());
        // The committer: records and audit entries, a batch of tenants at a time. A batch
        // committed is freed on a thread of its own (a million small allocations for 10,000
        // tenants, a tenth of the committing thread's time), behind the committer too.
        let (spent_tx, spent_rx) = mpsc::channel::<Vec<Commit>>();
        s.spawn(move || {
            behind_the_committer();
            spent_rx.into_iter().for_each(drop);
        });
        let mut batch: Vec<TenantResult> = Vec::new();
        let mut flush = |batch: &mut Vec<TenantResult>, report: &mut Report| {
            if batch.is_empty() || journal_error.is_some() {
                return;
            }
            // Each tenant's records and audit entries are committed as its worker made them.
            let mut parts: Vec<Commit> = Vec::with_capacity(batch.len());
            for mut r in batch.drain(..) {
                settle.clear_journal.append(&mut r.commit.clear_journal);
                settle.drop_journal.append(&mut r.commit.drop_journal);
                parts.push(r.commit);
                written_all.extend(r.written);
                report.outcomes.push(r.outcome);
            }
            if let Err(e) = ctx.state.commit_parts(serial, &parts)
                && commit_error.is_none()
            {
                commit_error = Some(e);
            }
            if crate::engine::keeps_memory() {
                std::mem::forget(parts);
            } else {
                // Freed here instead if the freeing thread is gone.
                let _ = spent_tx.send(parts);
            }
        };
        loop {
            match rx.recv_timeout(std::time::Duration::from_millis(200)) {
                Ok(r) => {
                    if let Some(b) = &bar {
                        b.inc(1);
                        if !r.outcome.ok {
                            b.println(format!("failed: {}", r.outcome.tenant));
                        }
                    }
                    batch.push(r);
                    if batch.len() >= 256 {
                        flush(&mut batch, &mut report);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => flush(&mut batch, &mut report),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    tracing::debug!(elapsed = ?started_at.elapsed(), waiting = batch.len(), "all tenants done");
                    break;
                }
            }
        }
        flush(&mut batch, &mut report);
        match finishing.join() {
            Ok(Some((d, e))) => (durable, expected) = (d, e),
            Ok(None) => {}
            Err(p) => std::panic::resume_unwind(p),
        }
        // The freeing thread ends once the committer lets go of its sender.
        drop(spent_tx);
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if let Some(e) = journal_error {
        // What the tenants that had started wrote is in memory only: it is forgotten.
        for p in ProviderId::ALL {
            providers.get(p).discard();
        }
        return Err(e.context("could not journal the apply's writes; nothing was written"));
    }
    tracing::debug!(tenants = report.outcomes.len(), elapsed = ?started_at.elapsed(), rss_mib = crate::engine::rss_mib(), "applied and recorded");
    // The journal is settled once everything written is durable: until then the next plan
    // knows these writes were in flight. When it held nothing before and every tenant
    // applied, all it holds is settled.
    if journal_was_empty && report.outcomes.iter().all(|o| o.ok) {
        settle = Commit { clear_whole_journal: true, ..Commit::default() };
    } else {
        // This plan's entries of the tenants that applied (each failed tenant's own commit
        // dropped or cleared its entries one by one).
        let applied: FxHashSet<&str> = report.outcomes.iter().filter(|o| o.ok).map(|o| o.tenant.as_str()).collect();
        settle
            .clear_journal
            .extend(journaled.iter().filter(|c| applied.contains(c.address.tenant.as_str())).map(|c| c.address.text()));
    }
    let cleared = durable.map_err(anyhow::Error::from).and_then(|_| state.commit(serial, &settle));
    if let Err(e) = cleared
        && commit_error.is_none()
    {
        commit_error = Some(e);
    }
    if let Some(e) = commit_error {
        return Err(e.context("the changes were applied but could not be recorded in the state store; the next plan re-reads live state and records them"));
    }
    tracing::debug!(elapsed = ?started_at.elapsed(), rss_mib = crate::engine::rss_mib(), "durable, journal settled");
    let (problems, read_back) = verify(providers, &written_all);
    report.verification = problems;
    tracing::debug!(elapsed = ?started_at.elapsed(), rss_mib = crate::engine::rss_mib(), "read back");
    // What was written and read back unchanged (same fingerprint, so the same content) is
    // compared as the plan had it; only the other side of a tenant is read again.
    let known: FxHashMap<&Address, &Content> = plan
        .changes
        .iter()
        .filter(|c| matches!(c.address.kind, ResourceKind::ManagementTenant | ResourceKind::IspConfig))
        .filter_map(|c| {
            let written = c.desired_fingerprint.as_ref()?;
            (read_back.get(&c.address) == Some(written)).then_some((&c.address, c.desired.as_deref()?))
        })
        .collect();
    match consistency(providers, &written_all, &known, &expected) {
        Ok(differences) => {
            report.verification.extend(differences.iter().map(|d| {
                format!(
                    "tenant {}: management and ISP framework disagree on {}: {} vs {} (impact {}): {}",
                    d.tenant, d.path, d.management_value, d.isp_framework_value, d.impact, d.recommendation
                )
            }));
            report.inconsistencies = differences;
        }
        Err(e) => report.verification.push(e),
    }
    report.outcomes.sort_by(|a, b| a.tenant.cmp(&b.tenant));
    tracing::debug!(elapsed = ?started_at.elapsed(), rss_mib = crate::engine::rss_mib(), "checked consistency");
    Ok(report)
}

/// How many tenants are applied at once: `parallelism`, the most a user allows. Where every
/// provider keeps its writes in memory until the flush (local stores), a tenant's apply
/// never waits on a network: it is all CPU, and workers beyond the cores only take turns
/// on them and on the stores' shard locks. A cold apply of 10,000 tenants on 2 cores took
/// 2.94 s with 8 workers, 2.82 s with 4 and 2.75 s with 2 (medians of 6, alternated).
fn workers(parallelism: usize, buffered: bool) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    if buffered { parallelism.clamp(1, cores) } else { parallelism.max(1) }
}

/// Lowers the calling thread's scheduling priority (nice 10, this thread only): apply's
/// workers get the cores the journal and the committer (one thread, which the whole apply
/// waits for at the end) leave idle, instead of taking eight ninths of them.
fn behind_the_committer() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid has no arguments; setpriority with PRIO_PROCESS and a thread id changes
    // only that thread's nice value (raising it needs no privilege). A failure changes nothing.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
}

/// Makes every provider's completed writes durable, one provider after another (each local
/// store's flush has threads of its own for its shards; four stores' worth at once went past
/// the address space of the tests' 1.5 GiB limit).
fn flush_all(providers: &Providers) -> crate::providers::Result<()> {
    ProviderId::ALL.iter().try_for_each(|p| {
        let t = std::time::Instant::now();
        let r = providers.get(*p).flush();
        tracing::debug!(provider = %p, elapsed = ?t.elapsed(), "flushed");
        r
    })
}

fn progress_bar(enabled: bool, len: u64) -> Option<indicatif::ProgressBar> {
    if !enabled {
        return None;
    }
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template("{spinner} applying {pos}/{len} tenants [{bar:30}] {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    Some(b)
}

/// Applies one tenant's changes. `settles`: journal entries of interrupted applies for this
/// tenant, cleared if it applies (its plan took them into account).
fn apply_tenant(
    ctx: &Ctx<'_>,
    tenant: &str,
    mut changes: Vec<&Change>,
    coord: &Coordination,
    settles: &[String],
) -> TenantResult {
    let _span = tracing::debug_span!("apply", tenant).entered();
    let now: Arc<str> = jiff::Timestamp::now().to_string().into();
    let mut commit = Commit::default();
    let mut written = Vec::new();
    // Writes in apply order, then deletes in reverse apply order.
    changes.sort_by(|a, b| a.address.cmp(&b.address));
    let (mut deletes, rest): (Vec<&Change>, Vec<&Change>) =
        changes.into_iter().partition(|c| c.action == Action::Delete);
    deletes.reverse();
    // A Namespace goes last: deleting it takes everything inside with it, the ISP
    // configuration too when it is a ConfigMap there, which a rollback could not bring back.
    deletes.sort_by_key(|c| matches!(&c.address.kind, ResourceKind::Kubernetes(k) if k == "Namespace"));
    let (refreshes, writes): (Vec<&Change>, Vec<&Change>) = rest.into_iter().partition(|c| c.action == Action::Noop);

    // This plan's journal entries for the tenant (written before any tenant started, or,
    // with local stores only, before anything is flushed). Those of a tenant that applies are
    // cleared by `apply` at the end.
    let drop_mine = |commit: &mut Commit| {
        let mine = writes.iter().chain(&deletes).map(|c| (c.address.text(), ctx.plan.plan_id.clone()));
        commit.drop_journal.extend(mine);
    };
    let fail = |msg: String, mut commit: Commit| TenantResult {
        outcome: TenantOutcome {
            tenant: tenant.to_owned(),
            ok: false,
            applied: 0,
            error: Some(msg),
            rolled_back: None,
        },
        commit: {
            drop_mine(&mut commit);
            commit
        },
        written: Vec::new(),
    };

    // 1. Read live again: it must still be what the plan saw.
    let mut live_now: FxHashMap<Address, LiveResource> = FxHashMap::default();
    for p in ProviderId::ALL {
        let addrs: Vec<Address> =
            writes.iter().chain(&deletes).filter(|c| c.address.provider() == p).map(|c| c.address.clone()).collect();
        if addrs.is_empty() {
            continue;
        }
        match ctx.providers.get(p).fetch(&addrs) {
            Ok(found) => live_now.extend(found.into_iter().map(|l| (l.address.clone(), l))),
            Err(e) => return fail(format!("could not read {p} before writing: {e}"), commit),
        }
    }
    for c in writes.iter().chain(&deletes) {
        let now_fp = live_now.get(&c.address).map(|l| l.fingerprint.clone());
        if now_fp != c.live_fingerprint {
            let mut commit = Commit::default();
            commit.audit.push(audit(ctx, &now, c, "skipped", Some("live state moved since the plan".into())));
            return fail(
                format!(
                    "{} changed since the plan (was {}, now {}); nothing was written for this tenant: re-plan",
                    c.address,
                    shown(c.live_fingerprint.as_ref(), "absent"),
                    shown(now_fp.as_ref(), "absent")
                ),
                commit,
            );
        }
    }

    // 2. Write (the whole plan was journaled before any tenant started).
    let result = match coord.strategy {
        Strategy::ManagementFirst => run_sequence(ctx, writes.iter().chain(&deletes).copied(), &live_now),
        Strategy::Synchronized => run_synchronized(ctx, &writes, &deletes, &live_now),
    };
    let (done, failure) = result;
    commit.audit.reserve(done.len() + 1);
    commit.upserts.reserve(done.len() + refreshes.len());
    written.reserve(done.len());
    let mut outcome = TenantOutcome {
        tenant: tenant.to_owned(),
        ok: failure.is_none(),
        applied: done.len(),
        error: None,
        rolled_back: None,
    };

    tracing::debug!(applied = done.len(), failed = failure.is_some(), "tenant applied");
    match failure {
        None => {
            for d in &done {
                record_done(&mut commit, d);
                commit.audit.push(applied(ctx, &now, d.change));
                written.push((d.change.address.clone(), d.after.as_ref().map(|a| a.fingerprint.clone())));
            }
            for c in refreshes {
                match (&c.desired, &c.live_fingerprint) {
                    (Some(d), Some(fp)) => commit.upserts.push(Upsert::new(c.address.clone(), fp.clone(), Some(d))),
                    _ => commit.forget.push(c.address.clone()),
                }
            }
            commit.clear_journal.extend(settles.iter().cloned());
        }
        Some((failed, err)) => {
            // This plan's entries did not happen or are undone; an interrupted apply's entries
            // for the same addresses stay, unless the address is recorded below.
            drop_mine(&mut commit);
            commit.audit.push(audit(ctx, &now, failed, "failed", Some(err.clone())));
            outcome.error = Some(format!("{}: {err}", failed.address));
            if coord.rollback_on_failure && !done.is_empty() {
                let mut rollback_failed = false;
                for d in done.iter().rev() {
                    match undo(ctx, d) {
                        Ok(restored) => {
                            commit.audit.push(audit(ctx, &now, d.change, "rolled_back", None));
                            record_restored(&mut commit, d, restored);
                        }
                        Err(e) => {
                            rollback_failed = true;
                            // What is live now is what this apply wrote: record it as such.
                            record_done(&mut commit, d);
                            commit.clear_journal.push(d.change.address.text());
                            commit.audit.push(audit(ctx, &now, d.change, "rollback_failed", Some(e.clone())));
                            outcome.error = Some(format!(
                                "{}; rolling back {} failed too: {e}",
                                outcome.error.take().unwrap_or_default(),
                                d.change.address
                            ));
                        }
                    }
                }
                outcome.rolled_back = Some(!rollback_failed);
                outcome.applied = 0;
            } else {
                // No rollback asked: what was written stays, and is recorded.
                for d in &done {
                    record_done(&mut commit, d);
                    commit.clear_journal.push(d.change.address.text());
                    commit.audit.push(applied(ctx, &now, d.change));
                }
            }
        }
    }
    TenantResult { outcome, commit, written }
}

/// The audit entry of an applied change, also handed to the management provider (the
/// platform's cross-platform audit); a failure to hand it over is a warning: the change is
/// applied and recorded here.
fn applied(ctx: &Ctx<'_>, now: &Arc<str>, c: &Change) -> AuditEntry {
    let entry = audit(ctx, now, c, "applied", None);
    if let Err(e) = ctx.providers.management.audit_event(&entry) {
        tracing::warn!(address = %c.address, "the audit event could not be sent to the management platform: {e}");
    }
    entry
}

/// The fingerprint a change will leave live, for the journal: the desired content's, a
/// secret's next version (`v<n+1>`: stores number versions one up from the current one, kept
/// across soft deletes), `v<n>-deleted` for a soft-deleted secret, and `None` for gone.
/// The live state a change starts from is the plan's (apply refuses a tenant whose live
/// state moved since), so `c.before` tells a secret's current version.
fn intended_fingerprint(c: &Change, destroy_secrets: bool) -> Option<Fingerprint> {
    let version = || match c.before.as_ref() {
        Some(Content::SecretMeta(m)) => m.version,
        _ => 0,
    };
    let secret = c.address.kind == ResourceKind::OpenbaoSecret;
    match (c.action, c.desired.as_deref()) {
        (Action::Delete, _) if secret && !destroy_secrets && c.live_fingerprint.is_some() => {
            Some(Fingerprint::from(format!("v{}-deleted", version())))
        }
        (Action::Delete, _) => None,
        (_, Some(Content::Secret(_) | Content::SecretMeta(_))) => {
            Some(Fingerprint::from(format!("v{}", version() + 1)))
        }
        (_, Some(other)) => c.desired_fingerprint.clone().or_else(|| Some(crate::fingerprint::of(other))),
        (_, None) => None,
    }
}

/// After a step was undone: live is what it was before the apply. If the plan took that for
/// what was last applied (the record, or a write an interrupted apply completed), the record
/// says so now, with the fingerprint live has again (a restored secret is a new version of
/// the old value). Otherwise it was drift before, and stays drift.
fn record_restored(commit: &mut Commit, d: &Done<'_>, restored: Option<Fingerprint>) {
    let before = d.before.as_ref().map(|b| &b.fingerprint);
    if d.change.last_fingerprint.as_ref() != before {
        return;
    }
    let a = &d.change.address;
    match restored {
        Some(fp) => {
            commit.upserts.push(Upsert::new(a.clone(), fp, d.before.as_ref().and_then(|b| b.content.as_deref())));
        }
        None => commit.forget.push(a.clone()),
    }
    commit.clear_journal.push(a.text());
}

fn record_done(commit: &mut Commit, d: &Done<'_>) {
    match (&d.after, d.change.action) {
        (_, Action::Delete) => commit.forget.push(d.change.address.clone()),
        (Some(after), _) => commit.upserts.push(Upsert::new(
            d.change.address.clone(),
            after.fingerprint.clone(),
            d.change.desired.as_deref(),
        )),
        (None, _) => {}
    }
}

type Failure<'a> = Option<(&'a Change, String)>;

fn run_sequence<'a>(
    ctx: &Ctx<'_>,
    changes: impl Iterator<Item = &'a Change>,
    live: &FxHashMap<Address, LiveResource>,
) -> (Vec<Done<'a>>, Failure<'a>) {
    let mut done = Vec::new();
    for c in changes {
        let before = live.get(&c.address).cloned();
        match execute(ctx, c, before.as_ref()) {
            Ok(after) => done.push(Done { change: c, before, after }),
            // Someone else changed it: theirs, not ours to undo.
            Err(e @ ProviderError::Conflict { .. }) => return (done, Some((c, e.to_string()))),
            Err(e) => {
                // A call can fail after the system did it (the answer was lost): if live holds
                // what this write leaves, the step is undone (or recorded) with the others.
                let e = match landed(ctx, c, before.as_ref()) {
                    Ok(Some(after)) => {
                        done.push(Done { change: c, before, after });
                        format!("{e} (it was done nevertheless)")
                    }
                    Ok(None) => e.to_string(),
                    Err(why) => format!("{e}; whether it was done could not be read back: {why}"),
                };
                return (done, Some((c, e)));
            }
        }
    }
    (done, None)
}

/// After a failed step: `Some(live now)` if the system holds what the step leaves (and
/// something else than before it): the step was done, only its answer was lost.
fn landed(ctx: &Ctx<'_>, c: &Change, before: Option<&LiveResource>) -> Result<Option<Option<LiveResource>>, String> {
    let now =
        ctx.providers.get(c.address.provider()).fetch(std::slice::from_ref(&c.address)).map_err(|e| e.to_string())?;
    let now = now.into_iter().find(|l| l.address == c.address);
    let fp = now.as_ref().map(|l| l.fingerprint.clone());
    let moved = fp.as_ref() != before.map(|b| &b.fingerprint);
    let ours = fp == intended_fingerprint(c, ctx.opts.destroy_secrets);
    Ok((moved && ours).then_some(now))
}

/// Secrets first; management and ISP at the same time; then Kubernetes; deletes in reverse.
fn run_synchronized<'a>(
    ctx: &Ctx<'_>,
    writes: &[&'a Change],
    deletes: &[&'a Change],
    live: &FxHashMap<Address, LiveResource>,
) -> (Vec<Done<'a>>, Failure<'a>) {
    let of = |p: ProviderId| writes.iter().copied().filter(move |c| c.address.provider() == p);
    let (mut done, failure) = run_sequence(ctx, of(ProviderId::Secrets), live);
    if failure.is_some() {
        return (done, failure);
    }
    let ((m_done, m_fail), (i_done, i_fail)) = std::thread::scope(|s| {
        let m = s.spawn(|| run_sequence(ctx, of(ProviderId::Management), live));
        let i = run_sequence(ctx, of(ProviderId::Isp), live);
        (m.join().unwrap_or_else(|_| (Vec::new(), None)), i)
    });
    done.extend(m_done);
    done.extend(i_done);
    if let Some(f) = m_fail.or(i_fail) {
        return (done, Some(f));
    }
    let (k_done, failure) = run_sequence(ctx, of(ProviderId::Kubernetes).chain(deletes.iter().copied()), live);
    done.extend(k_done);
    (done, failure)
}

/// Performs one change; returns what is live afterwards.
fn execute(ctx: &Ctx<'_>, c: &Change, before: Option<&LiveResource>) -> Result<Option<LiveResource>, ProviderError> {
    tracing::trace!(address = %c.address, action = c.action.as_str(), "execute");
    let provider = ctx.providers.get(c.address.provider());
    let expect = Expect::from_live(before.map(|b| &b.fingerprint));
    match c.action {
        Action::Delete => {
            let destroy = ctx.opts.destroy_secrets;
            provider.delete(&c.address, &expect, destroy)?;
            Ok(None)
        }
        Action::Create | Action::Update | Action::Rotate => {
            let desired = c
                .desired
                .as_ref()
                .ok_or_else(|| ProviderError::Other(format!("{}: the plan has no content to write", c.address)))?;
            let resource = Resource {
                address: c.address.clone(),
                content: Arc::clone(desired),
                fingerprint: c.desired_fingerprint.clone(),
            };
            let value = match &**desired {
                Content::Secret(spec) => Some(
                    match spec.source {
                        SecretSource::Generated { length, charset } => SecretValue::generate(length, charset),
                        // A development placeholder for a missing external secret.
                        SecretSource::External => SecretValue::generate(32, Charset::Alphanumeric),
                    }
                    .map_err(|e| ProviderError::Other(format!("no randomness for a new secret: {e}")))?,
                ),
                _ => None,
            };
            provider.put(&resource, value.as_ref(), &expect).map(Some)
        }
        Action::Noop => Ok(before.cloned()),
    }
}

/// Undoes one step from the live content read before it; returns the fingerprint live has
/// then (`None`: gone).
fn undo(ctx: &Ctx<'_>, d: &Done<'_>) -> Result<Option<Fingerprint>, String> {
    let a = &d.change.address;
    let provider = ctx.providers.get(a.provider());
    let expect_after = Expect::from_live(d.after.as_ref().map(|x| &x.fingerprint));
    match (&d.before, a.kind == ResourceKind::OpenbaoSecret) {
        (None, _) => provider.delete(a, &expect_after, true).map(|_| None).map_err(|e| e.to_string()),
        (Some(b), true) => {
            let version = match b.content.as_deref() {
                Some(Content::SecretMeta(m)) => m.version,
                _ => return Err(format!("{a}: no version to restore")),
            };
            provider.restore_secret(a, version).map(|l| Some(l.fingerprint)).map_err(|e| e.to_string())
        }
        (Some(b), false) => {
            let content = b.content.clone().ok_or_else(|| format!("{a}: the content before was not read"))?;
            let r = Resource { fingerprint: None, address: a.clone(), content: content.into() };
            provider.put(&r, None, &expect_after).map(|l| Some(l.fingerprint)).map_err(|e| e.to_string())
        }
    }
}

/// Addresses read back per call from a store that answers from memory. Debug builds (the
/// tests) cut far smaller pieces, so that every apply in the tests reads back in several.
const READ_BACK_PIECE: usize = if cfg!(debug_assertions) { 5 } else { 8192 };

/// Reads back what was written and compares fingerprints, providers (and pieces of them) on
/// the cores at once: the problems, and the fingerprints live has now of the written
/// management records and ISP configurations (what the consistency check compares).
fn verify(
    providers: &Providers,
    written: &[(Address, Option<Fingerprint>)],
) -> (Vec<String>, FxHashMap<Address, Fingerprint>) {
    // Each provider's writes, in pieces: a store that keeps its image in memory answers a
    // piece as fast as the whole, so its pieces are shared out over the cores (a first apply
    // of 10,000 tenants reads back 59,000 secrets and 10,000 ISP configurations: one thread
    // per provider left a core idle for most of the read-back); any other is asked once.
    type Piece<'w> = (ProviderId, Vec<&'w (Address, Option<Fingerprint>)>);
    let mut pieces: Vec<Piece<'_>> = Vec::new();
    for p in ProviderId::ALL {
        let mine: Vec<&(Address, Option<Fingerprint>)> = written.iter().filter(|(a, _)| a.provider() == p).collect();
        if mine.is_empty() {
            continue;
        }
        if providers.get(p).durable_on_flush() {
            pieces.extend(mine.chunks(READ_BACK_PIECE).map(|c| (p, c.to_vec())));
        } else {
            pieces.push((p, mine));
        }
    }
    let one = |(p, mine): &Piece<'_>| -> (Vec<String>, Vec<(Address, Fingerprint)>) {
        let p = *p;
        let addrs: Vec<&Address> = mine.iter().map(|(a, _)| a).collect();
        let live: Vec<Option<Fingerprint>> = match providers.get(p).fingerprints(&addrs) {
            Ok(l) if l.len() == addrs.len() => l,
            Ok(l) => {
                let e = format!("could not read {p} back: {} answers for {} resources", l.len(), addrs.len());
                return (vec![e], Vec::new());
            }
            Err(e) => return (vec![format!("could not read {p} back: {e}")], Vec::new()),
        };
        let mut problems = Vec::new();
        let mut compared = Vec::new();
        for ((a, fp), now) in mine.iter().zip(live) {
            let ok = match (fp, &now) {
                (Some(f), Some(n)) => f == n || (a.kind == ResourceKind::OpenbaoSecret),
                (None, None) => true,
                (None, Some(n)) => {
                    n.text().is_some_and(|t| t.ends_with("-deleted")) || providers.get(p).deletes_with_tenant()
                }
                _ => false,
            };
            if !ok {
                problems.push(format!(
                    "{a}: read back {} after writing {}",
                    shown(now.as_ref(), "nothing"),
                    shown(fp.as_ref(), "nothing")
                ));
            }
            if let Some(now) = now
                && matches!(a.kind, ResourceKind::ManagementTenant | ResourceKind::IspConfig)
            {
                compared.push((a.clone(), now));
            }
        }
        (problems, compared)
    };
    let per_piece: Vec<(Vec<String>, Vec<(Address, Fingerprint)>)> = pieces.par_iter().map(one).collect();
    let mut problems = Vec::new();
    let mut read_back = FxHashMap::default();
    read_back.reserve(per_piece.iter().map(|(_, r)| r.len()).sum());
    for (p, r) in per_piece {
        problems.extend(p);
        read_back.extend(r);
    }
    // A store that could not be read says so once, not once per piece.
    problems.dedup();
    (problems, read_back)
}

/// The differences between each tenant's planned management record and ISP configuration,
/// for the tenants whose plan writes both.
fn planned_consistency(plan: &Plan) -> FxHashMap<&str, Vec<Difference>> {
    let mut pairs: FxHashMap<&str, (Option<&Value>, Option<&str>)> = FxHashMap::default();
    for c in &plan.changes {
        match (&c.address.kind, c.desired.as_deref()) {
            (ResourceKind::ManagementTenant, Some(Content::Json(v))) => {
                pairs.entry(c.address.tenant.as_str()).or_default().0 = Some(v);
            }
            (ResourceKind::IspConfig, Some(Content::Text(t))) => {
                pairs.entry(c.address.tenant.as_str()).or_default().1 = Some(t);
            }
            _ => {}
        }
    }
    let pairs: Vec<(&str, &Value, &str)> = pairs.into_iter().filter_map(|(t, (m, i))| Some((t, m?, i?))).collect();
    fn compare<'p>(part: &[(&'p str, &'p Value, &'p str)]) -> Vec<(&'p str, Vec<Difference>)> {
        part.iter().map(|&(t, m, i)| (t, crate::drift::consistency(t, m, i))).collect()
    }
    let (first, second) = pairs.split_at(pairs.len() / 2);
    let (mut a, b) = std::thread::scope(|s| {
        let other = s.spawn(|| compare(second));
        let mine = compare(first);
        (mine, other.join())
    });
    match b {
        Ok(b) => a.extend(b),
        Err(p) => std::panic::resume_unwind(p),
    }
    a.into_iter().collect()
}

/// Consistency validation: for every tenant whose management record or ISP configuration
/// was written, both sides are read again and compared (plan, features, billing gateway);
/// an error when the two sides could not be read. Where both sides were read back as the
/// plan wrote them (`known`), the comparison is the plan's, made during the flush
/// (`expected`).
fn consistency(
    providers: &Providers,
    written: &[(Address, Option<Fingerprint>)],
    known: &FxHashMap<&Address, &Content>,
    expected: &FxHashMap<&str, Vec<Difference>>,
) -> Result<Vec<Difference>, String> {
    let mut tenants: Vec<&str> = written
        .iter()
        .filter(|(a, _)| matches!(a.kind, ResourceKind::ManagementTenant | ResourceKind::IspConfig))
        .map(|(a, _)| a.tenant.as_str())
        .collect();
    if tenants.is_empty() {
        return Ok(Vec::new());
    }
    tenants.sort_unstable();
    tenants.dedup();
    // Which of each tenant's two sides were read back as planned: bit 1 the management
    // record, bit 2 the ISP configuration (asked of the known addresses once, rather than an
    // address made and hashed per tenant and side).
    let mut sides: FxHashMap<&str, u8> = FxHashMap::default();
    sides.reserve(tenants.len());
    for a in known.keys() {
        let bit = match a.kind {
            ResourceKind::ManagementTenant => 1,
            ResourceKind::IspConfig => 2,
            _ => continue,
        };
        *sides.entry(a.tenant.as_str()).or_default() |= bit;
    }
    let as_planned = |t: &str| expected.contains_key(t) && sides.get(t) == Some(&3);
    let (planned, others): (Vec<&str>, Vec<&str>) = tenants.into_iter().partition(|t| as_planned(t));
    let mut found = compare_live(providers, &others.into_iter().collect(), known)?;
    found.extend(planned.into_iter().flat_map(|t| expected[t].iter().cloned()));
    // In tenant order, as one pass over all of them would give.
    found.sort_by(|a, b| a.tenant.cmp(&b.tenant));
    Ok(found)
}

/// Reads both sides of these tenants (the plan's content where it was read back unchanged)
/// and compares them.
fn compare_live(
    providers: &Providers,
    tenants: &BTreeSet<&str>,
    known: &FxHashMap<&Address, &Content>,
) -> Result<Vec<Difference>, String> {
    if tenants.is_empty() {
        return Ok(Vec::new());
    }
    // Each side: the content the plan wrote where it was read back unchanged, else fetched.
    let read = |kind: ResourceKind| -> crate::providers::Result<Vec<(Address, Cow<'_, Content>)>> {
        let mut have = Vec::new();
        let mut fetch = Vec::new();
        for t in tenants {
            let a = Address::new(t, kind.clone(), None);
            match known.get(&a) {
                Some(c) => have.push((a, Cow::Borrowed(*c))),
                None => fetch.push(a),
            }
        }
        if !fetch.is_empty() {
            let fetched = providers.get(kind.provider()).fetch(&fetch)?;
            have.extend(fetched.into_iter().filter_map(|l| Some((l.address, Cow::Owned(*l.content?)))));
        }
        Ok(have)
    };
    let (mgmt, isp) = match (read(ResourceKind::ManagementTenant), read(ResourceKind::IspConfig)) {
        (Ok(m), Ok(i)) => (m, i),
        (Err(e), _) | (_, Err(e)) => return Err(format!("consistency validation could not read both sides: {e}")),
    };
    let isp: FxHashMap<&str, &str> = isp
        .iter()
        .filter_map(|(a, c)| match c.as_ref() {
            Content::Text(t) => Some((a.tenant.as_str(), t.as_str())),
            _ => None,
        })
        .collect();
    Ok(mgmt
        .par_iter()
        .flat_map_iter(|(a, c)| match (c.as_ref(), isp.get(a.tenant.as_str())) {
            (Content::Json(record), Some(text)) => crate::drift::consistency(&a.tenant, record, text),
            _ => Vec::new(),
        })
        .collect())
}

/// An audit entry for a change, with before/after masked: fields for updates, fingerprints
/// for the rest, versions for secrets; never a value.
fn audit(ctx: &Ctx<'_>, time: &Arc<str>, c: &Change, outcome: &'static str, message: Option<String>) -> AuditEntry {
    let is_secret = c.address.kind == ResourceKind::OpenbaoSecret;
    let (before, after) = if is_secret {
        (
            c.before.as_ref().map(|b| JsonText::of(&crate::plan::masked(b))),
            // The action is a plain word: nothing in it to escape.
            (c.action != Action::Delete)
                .then(|| JsonText::from_json(format!(r#"{{"value":"(sensitive)","action":"{}"}}"#, c.action.as_str()))),
        )
    } else if c.action == Action::Update && !c.fields.is_empty() {
        let pick = |after: bool| {
            JsonText::of(&Value::Object(
                c.fields
                    .iter()
                    .take(50)
                    .map(|f| {
                        (f.pointer.clone(), mask(if after { f.after.clone() } else { f.before.clone() }, &f.pointer))
                    })
                    .collect(),
            ))
        };
        (Some(pick(false)), Some(pick(true)))
    } else {
        (
            c.live_fingerprint.as_ref().map(JsonText::fingerprint),
            c.desired.as_ref().filter(|_| c.action != Action::Delete).map(|d| match &c.desired_fingerprint {
                Some(f) => JsonText::fingerprint(f),
                None => JsonText::fingerprint(&crate::fingerprint::of(d)),
            }),
        )
    };
    AuditEntry {
        id: 0,
        time: Arc::clone(time),
        correlation_id: Arc::clone(&ctx.correlation),
        actor: Arc::clone(&ctx.actor),
        tenant: c.address.tenant.shared(),
        address: c.address.text(),
        action: Cow::Borrowed(c.action.as_str()),
        risk: Cow::Borrowed(c.risk.as_str()),
        outcome: Cow::Borrowed(outcome),
        before,
        after,
        message,
    }
}

/// Hides a field's value when its name says it is a credential (it should only ever hold a
/// `${SECRET:…}` reference, but the audit log does not rely on that).
fn mask(v: Option<Value>, pointer: &str) -> Value {
    let last = pointer.rsplit('/').next().unwrap_or_default();
    match v {
        None => Value::Null,
        Some(Value::String(s)) if crate::validate::checks::is_credential_key(last) && !s.starts_with("${SECRET:") => {
            Value::String("(sensitive)".into())
        }
        Some(other) => other,
    }
}

/// The risk of the plan's most dangerous change, for summaries.
pub fn highest(plan: &Plan) -> Option<Risk> {
    plan.highest_risk()
}
