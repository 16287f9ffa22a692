//! What the daemon knows, shared between the reconciler (which writes it) and the HTTP API
//! (which reads it): the revision followed, each tenant's status, its last plan, drift and
//! recent history. Shaped for `/api/v1/status`, `/api/v1/tenants/{id}` and a dashboard.
//!
//! Nothing here holds a secret value: changes are kept as the plan prints them (secrets as
//! `(sensitive)` and versions), errors as the engine words them (tokens already removed).

use crate::diff::{Action, Change};
use crate::drift::Difference;
use crate::model::TenantLabel;
use jiff::Timestamp;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

/// A tenant's state, as the status API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Status {
    /// Live equals the repository at the revision shown.
    Synced,
    /// The repository asks for changes that are not applied (no `--auto-apply`, or a change
    /// the daemon does not make on its own, such as a deletion without `--allow-delete`).
    OutOfSync,
    /// Live was changed out of band (and is not, or not yet, healed).
    Drifted,
    /// Being checked or applied (also: not checked yet, or waiting for the state lock).
    Progressing,
    /// The last check or apply failed; retried with backoff.
    Failed,
}

impl Status {
    pub const ALL: [Status; 5] =
        [Status::Synced, Status::OutOfSync, Status::Drifted, Status::Progressing, Status::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Synced => "Synced",
            Status::OutOfSync => "OutOfSync",
            Status::Drifted => "Drifted",
            Status::Progressing => "Progressing",
            Status::Failed => "Failed",
        }
    }
}

/// Diffs longer than this are cut in what the daemon keeps (the plan command shows them whole).
const MAX_DIFF: usize = 16 * 1024;
/// History entries kept per tenant.
pub const HISTORY: usize = 20;

/// One change of a tenant's last plan, as `plan --format json` shows it, without the full
/// before/after contents (the diff shows them; creates keep no diff, their content is the
/// repository's).
#[derive(Debug, Clone, Serialize)]
pub struct ChangeView {
    pub address: String,
    pub action: Action,
    pub drift: bool,
    pub risk: crate::diff::Risk,
    pub reason: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<crate::diff::FieldChange>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub diff: String,
}

impl ChangeView {
    pub fn of(c: &Change) -> ChangeView {
        let mut diff = if c.action == Action::Create { String::new() } else { c.diff.clone() };
        if diff.len() > MAX_DIFF {
            let mut cut = MAX_DIFF;
            while !diff.is_char_boundary(cut) {
                cut -= 1;
            }
            diff.truncate(cut);
            diff.push_str("\n… (cut; run `dotmac-gitops plan --tenant …` for the whole diff)\n");
        }
        ChangeView {
            address: c.address.to_string(),
            action: c.action,
            drift: c.drift,
            risk: c.risk,
            reason: c.reason.clone(),
            fields: c.fields.clone(),
            diff,
        }
    }
}

/// A tenant's part of the last plan the daemon made.
#[derive(Debug, Clone, Serialize)]
pub struct TenantPlan {
    pub plan_id: String,
    pub revision: String,
    pub at: Timestamp,
    pub changes: Vec<ChangeView>,
    /// Errors and warnings (missing secrets, placeholders, unreadable live state).
    pub violations: Vec<crate::diff::Violation>,
}

/// The last apply the daemon made for a tenant.
#[derive(Debug, Clone, Serialize)]
pub struct ApplyView {
    pub plan_id: String,
    pub revision: String,
    pub at: Timestamp,
    pub ok: bool,
    pub applied: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<bool>,
}

/// One step in a tenant's recent history (steps that repeat are counted on one entry).
#[derive(Debug, Clone, Serialize)]
pub struct HistoryEntry {
    /// The last time it happened.
    pub at: Timestamp,
    /// How many times in a row.
    pub count: u32,
    pub status: Status,
    /// What happened: "checked", "applied", "apply failed", "check failed", "waiting for lock", …
    pub event: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The wait before the next check, in seconds.
    pub requeue_after_s: f64,
}

/// Everything the daemon keeps about one tenant.
#[derive(Debug, Clone, Serialize)]
pub struct TenantState {
    pub tenant: String,
    /// Name, plan and environment at the revision read (kept when the tenant leaves it).
    #[serde(flatten)]
    pub label: TenantLabel,
    pub status: Status,
    /// The commit the status refers to.
    pub revision: Option<String>,
    /// The last time live was found (or made) equal to the repository.
    pub last_sync: Option<Timestamp>,
    /// The commit it was equal to then.
    pub synced_revision: Option<String>,
    /// The desired resources at the revision read, as addresses without the tenant.
    pub resources: Vec<String>,
    pub last_check: Option<Timestamp>,
    pub last_error: Option<String>,
    /// Failures in a row (the backoff doubles with each; a success resets it).
    pub failures: u32,
    /// Self-heal applies in a row that drift followed again.
    pub heal_attempts: u32,
    /// The daemon stopped healing this tenant (drift kept coming back or healing kept failing).
    pub heal_stopped: bool,
    pub next_check: Option<Timestamp>,
    /// Resources whose live state differs from what was last applied (addresses).
    pub drift: Vec<String>,
    /// Management vs ISP disagreements last seen.
    pub inconsistencies: Vec<Difference>,
    pub last_plan: Option<TenantPlan>,
    pub last_apply: Option<ApplyView>,
    pub history: VecDeque<HistoryEntry>,
    /// A digest of the tenant's desired resources at `revision` (what a commit changes).
    #[serde(skip)]
    pub desired: Option<String>,
    #[serde(skip)]
    pub due: Instant,
    #[serde(skip)]
    pub in_flight: bool,
    /// Asked for again while in flight: run once more right after.
    #[serde(skip)]
    pub again: bool,
    /// Due because something changed (a commit, a request), not for a routine check: goes
    /// first, in a batch of its own if every slot is busy.
    #[serde(skip)]
    pub urgent: bool,
    #[serde(skip)]
    pub checked: bool,
}

impl TenantState {
    pub fn new(tenant: &str, now: Instant) -> TenantState {
        TenantState {
            tenant: tenant.to_owned(),
            status: Status::Progressing,
            label: TenantLabel::default(),
            revision: None,
            last_sync: None,
            synced_revision: None,
            resources: Vec::new(),
            last_check: None,
            last_error: None,
            failures: 0,
            heal_attempts: 0,
            heal_stopped: false,
            next_check: None,
            drift: Vec::new(),
            inconsistencies: Vec::new(),
            last_plan: None,
            last_apply: None,
            history: VecDeque::new(),
            desired: None,
            due: now,
            in_flight: false,
            again: false,
            urgent: true,
            checked: false,
        }
    }

    /// Asked for, or changed by a commit: check it as soon as a worker is free (again after
    /// the check under way, if any), forgetting past failures and a stopped self-heal.
    pub fn make_urgent(&mut self, now: Instant) {
        self.failures = 0;
        self.heal_attempts = 0;
        self.heal_stopped = false;
        self.urgent = true;
        if self.in_flight {
            self.again = true;
        } else {
            self.due = now;
        }
    }

    pub fn record(&mut self, event: impl Into<String>, requeue_after: std::time::Duration) {
        let event = event.into();
        let requeue_after_s = (requeue_after.as_millis() as f64) / 1000.0;
        // Steady checks (and steady failures) are one entry with a count, so that the
        // history shows changes rather than the last twenty identical checks.
        if let Some(last) = self.history.back_mut()
            && last.event == event
            && last.status == self.status
            && last.error == self.last_error
            && !event.starts_with("apply")
        {
            last.at = Timestamp::now();
            last.count = last.count.saturating_add(1);
            last.requeue_after_s = requeue_after_s;
            return;
        }
        if self.history.len() >= HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(HistoryEntry {
            at: Timestamp::now(),
            count: 1,
            status: self.status,
            event,
            error: self.last_error.clone(),
            requeue_after_s,
        });
    }

    /// The row of `/api/v1/status`.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "tenant": self.tenant,
            "name": self.label.name,
            "plan": self.label.plan,
            "environment": self.label.environment,
            "status": self.status,
            "revision": self.revision,
            "last_sync": self.last_sync,
            "synced_revision": self.synced_revision,
            "last_error": self.last_error,
            "drift": self.drift.len(),
            "failures": self.failures,
            "heal_stopped": self.heal_stopped,
            "next_check": self.next_check,
        })
    }
}

/// Where the desired state comes from and how reading it goes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceStatus {
    /// The repository (a path, or a URL with any credentials removed).
    pub repo: String,
    pub branch: String,
    /// The branch tip last seen.
    pub head: Option<String>,
    pub last_fetch: Option<Timestamp>,
    pub last_error: Option<String>,
}

/// This replica's part in leader election.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Not leading yet: waiting for the lease or the leader lock.
    Standby,
    Leader,
    ShuttingDown,
}

/// The daemon's whole state.
#[derive(Debug)]
pub struct Shared {
    pub started_at: Timestamp,
    pub role: Role,
    /// Who leads, when known (for a standby's answers).
    pub leader: Option<String>,
    pub auto_apply: bool,
    pub source: SourceStatus,
    /// The revision reconciled (the last valid commit read).
    pub revision: Option<String>,
    /// Why the branch tip is not the revision reconciled (it does not validate, ...).
    pub revision_error: Option<String>,
    /// Every tenant was checked once after start.
    pub ready: bool,
    pub tenants: BTreeMap<String, TenantState>,
}

/// The shared state behind a lock; the HTTP side only reads.
#[derive(Debug, Clone)]
pub struct Handle(Arc<RwLock<Shared>>);

impl Handle {
    pub fn new(auto_apply: bool, source: SourceStatus) -> Handle {
        Handle(Arc::new(RwLock::new(Shared {
            started_at: Timestamp::now(),
            role: Role::Standby,
            leader: None,
            auto_apply,
            source,
            revision: None,
            revision_error: None,
            ready: false,
            tenants: BTreeMap::new(),
        })))
    }

    pub fn read(&self) -> RwLockReadGuard<'_, Shared> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, Shared> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl Shared {
    /// How many tenants are in each status.
    pub fn counts(&self) -> BTreeMap<Status, usize> {
        let mut c: BTreeMap<Status, usize> = Status::ALL.iter().map(|s| (*s, 0)).collect();
        for t in self.tenants.values() {
            *c.entry(t.status).or_default() += 1;
        }
        c
    }

    /// `/api/v1/status`.
    pub fn status_json(&self) -> serde_json::Value {
        let counts: BTreeMap<&str, usize> = self.counts().into_iter().map(|(s, n)| (s.as_str(), n)).collect();
        serde_json::json!({
            "revision": self.revision,
            "revision_error": self.revision_error,
            "ready": self.ready,
            "role": self.role,
            "leader": self.leader,
            "auto_apply": self.auto_apply,
            "started_at": self.started_at,
            "source": self.source,
            "summary": counts,
            "tenants": self.tenants.values().map(TenantState::summary).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_steps_are_counted_on_one_entry() {
        let mut t = TenantState::new("t1", Instant::now());
        t.status = Status::Synced;
        for _ in 0..5 {
            t.record("checked: in sync", std::time::Duration::from_secs(60));
        }
        assert_eq!(t.history.len(), 1);
        assert_eq!(t.history[0].count, 5);
        t.status = Status::Failed;
        t.last_error = Some("e".into());
        t.record("apply failed", std::time::Duration::from_secs(5));
        t.record("apply failed", std::time::Duration::from_secs(10));
        assert_eq!(t.history.len(), 3, "every apply is its own entry");
    }

    #[test]
    fn history_is_bounded_and_keeps_the_latest() {
        let mut t = TenantState::new("t1", Instant::now());
        for i in 0..(HISTORY + 5) {
            t.last_error = Some(format!("e{i}"));
            t.record("check failed", std::time::Duration::from_millis(1500));
        }
        assert_eq!(t.history.len(), HISTORY);
        assert_eq!(t.history.back().unwrap().error.as_deref(), Some(&*format!("e{}", HISTORY + 4)));
        assert_eq!(t.history.back().unwrap().requeue_after_s, 1.5);
    }

    #[test]
    fn the_status_lists_every_tenant_and_counts_every_status() {
        let h = Handle::new(true, SourceStatus::default());
        {
            let mut s = h.write();
            s.tenants.insert("a".into(), TenantState::new("a", Instant::now()));
            let mut b = TenantState::new("b", Instant::now());
            b.status = Status::Synced;
            s.tenants.insert("b".into(), b);
        }
        let v = h.read().status_json();
        assert_eq!(v["tenants"].as_array().unwrap().len(), 2);
        assert_eq!(v["tenants"][1]["status"], "Synced");
        assert_eq!(v["summary"]["Progressing"], 1);
        assert_eq!(v["summary"]["Failed"], 0);
    }
}
