//! Plan: every change between the repository and what is live, with the state it was made
//! against, so that `apply` can refuse it when anything moved. Building a plan is pure.
//!
//! The plan type is also the plan file's format (`format_version`), written as JSON by
//! `plan --out`. It carries the desired content of every change (what apply writes) and the
//! live fingerprints it saw — never a secret value: secrets are declarations and versions.

pub mod markdown;
pub mod text;

use crate::diff::{self, Action, Change, Risk, Severity, Violation};
use crate::fingerprint::Fingerprint;
use crate::model::{Address, Content, Coordination, DesiredEntry, TenantId};
use crate::providers::{LiveResource, TenantScope};
use crate::state::{JournalEntry, Record};
use jiff::Timestamp;
use rayon::prelude::*;
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub create: usize,
    pub update: usize,
    pub rotate: usize,
    pub delete: usize,
    pub noop: usize,
    pub drift: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub format_version: u32,
    pub plan_id: String,
    pub created_at: String,
    /// The time secrets' ages and licenses were judged at.
    pub now: String,
    /// The commit planned, or null for a work tree with uncommitted changes.
    pub revision: Option<String>,
    /// A digest of every repository file read (detects a changed work tree).
    pub inputs_digest: String,
    pub lineage: String,
    pub serial: u64,
    /// The tenants targeted with `--tenant` (null: all).
    pub tenants: Option<Vec<String>>,
    pub summary: Summary,
    pub changes: Vec<Change>,
    pub violations: Vec<Violation>,
    /// How each tenant with changes is applied.
    #[serde(default)]
    pub coordination: BTreeMap<String, Coordination>,
    /// Every live fingerprint the plan saw, by address (plan files only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub live: BTreeMap<String, Fingerprint>,
}

/// What a plan is built from.
/// Where the desired resources of each tenant come from (a plain map, or the engine's
/// workspace, without copying it).
pub trait DesiredSource: Sync {
    fn tenant_ids(&self) -> Vec<&str>;
    fn entries_of(&self, tenant: &str) -> Option<&[DesiredEntry]>;
}

impl DesiredSource for BTreeMap<String, Vec<DesiredEntry>> {
    fn tenant_ids(&self) -> Vec<&str> {
        self.keys().map(String::as_str).collect()
    }
    fn entries_of(&self, tenant: &str) -> Option<&[DesiredEntry]> {
        self.get(tenant).map(Vec::as_slice)
    }
}

pub struct Inputs<'a> {
    pub desired: &'a dyn DesiredSource,
    pub coordination: BTreeMap<String, Coordination>,
    /// Live resources, one list per provider.
    pub live: &'a [Vec<LiveResource>],
    /// Tenants whose live state could not be read, with why: not planned, reported as errors.
    pub unreadable: &'a BTreeMap<String, String>,
    pub records: &'a [Record],
    pub journal: &'a [JournalEntry],
    pub scope: &'a TenantScope,
    pub now: Timestamp,
    pub options: diff::Options,
}

/// Identity of a plan, from the edges (clock, random id, repository, state).
#[derive(Clone)]
pub struct Meta {
    /// Keep every live fingerprint seen (for a plan file's staleness check).
    pub record_live: bool,
    pub plan_id: String,
    pub created_at: String,
    pub revision: Option<String>,
    pub inputs_digest: String,
    pub lineage: String,
    pub serial: u64,
    pub tenants: Option<Vec<String>>,
}

/// Builds the plan: the three-way diff of every address desired, recorded or (if recorded)
/// live, in apply order. Tenants are independent: each is merged on its own (sorted lists,
/// no global maps keyed by address), in parallel.
pub fn build(inputs: Inputs<'_>, meta: Meta) -> Plan {
    let scope = inputs.scope;
    let wanted = |t: &str| scope.contains(t) && !inputs.unreadable.contains_key(t);
    // In name order, as the desired state keeps them.
    let mut tenants: Vec<&str> = inputs.desired.tenant_ids().into_iter().filter(|t| wanted(t)).collect();
    debug_assert!(tenants.is_sorted(), "a desired state lists its tenants in name order");
    let live_by = runs_by_tenant(inputs.live.iter().map(Vec::as_slice), |l| &l.address.tenant, wanted, tenants.len());
    let rec_by = runs_by_tenant(std::iter::once(inputs.records), |r| &r.address.tenant, wanted, tenants.len());
    // A write that was in flight when an apply stopped: if live now holds what it intended,
    // it happened — treat it as recorded rather than as drift.
    let mut journal: FxHashMap<&str, Vec<&JournalEntry>> = FxHashMap::default();
    for j in inputs.journal {
        journal.entry(j.address.as_str()).or_default().push(j);
    }
    // And the recorded tenants the repository no longer has (usually none), found with a
    // hash set: at 100,000 tenants, adding every recorded one to an ordered set, each a
    // search comparing names, was over a quarter of `build`'s samples.
    let desired: FxHashSet<&str> = tenants.iter().copied().collect();
    let gone: Vec<&str> = rec_by.keys().copied().filter(|t| !desired.contains(t)).collect();
    if !gone.is_empty() {
        tenants.extend(gone);
        tenants.sort_unstable();
    }
    let empty_d: Vec<DesiredEntry> = Vec::new();
    let per_tenant: Vec<(Vec<Change>, Vec<Violation>, Summary)> = tenants
        .par_iter()
        .map(|t| {
            plan_tenant(
                inputs.desired.entries_of(t).unwrap_or(&empty_d),
                live_by.get(t).map(Runs::items).unwrap_or_default(),
                rec_by.get(t).map(Runs::items).unwrap_or_default(),
                &journal,
                inputs.now,
                &inputs.options,
            )
        })
        .collect();
    // Sized once: grown by doubling, a first plan's 130,000 changes were copied and touched
    // fresh memory several times over. Each tenant's changes are moved to their place by
    // the threads (45 MB of them for 10,000 tenants: one thread's copy and page faults were
    // the plan's longest serial part).
    let total = per_tenant.iter().map(|(c, _, _)| c.len()).sum();
    let mut changes: Vec<Change> = Vec::with_capacity(total);
    let mut violations = Vec::with_capacity(per_tenant.iter().map(|(_, v, _)| v.len()).sum());
    let mut summary = Summary::default();
    let mut places: Vec<(&mut [std::mem::MaybeUninit<Change>], Vec<Change>)> = Vec::with_capacity(per_tenant.len());
    let mut free = &mut changes.spare_capacity_mut()[..total];
    for (c, v, s) in per_tenant {
        let (place, rest) = free.split_at_mut(c.len());
        free = rest;
        places.push((place, c));
        violations.extend(v);
        summary.create += s.create;
        summary.update += s.update;
        summary.rotate += s.rotate;
        summary.delete += s.delete;
        summary.noop += s.noop;
        summary.drift += s.drift;
    }
    places.into_par_iter().for_each(|(place, c)| {
        for (slot, change) in place.iter_mut().zip(c) {
            slot.write(change);
        }
    });
    // SAFETY: the places split the first `total` slots of the capacity, each exactly as long
    // as the changes moved into it, and every one was written above.
    unsafe { changes.set_len(total) };
    for (tenant, why) in inputs.unreadable.iter().filter(|(t, _)| scope.contains(t)) {
        violations.push(Violation {
            tenant: tenant.clone(),
            rule: "live-unreadable".into(),
            severity: Severity::Error,
            message: format!("tenant {tenant}: its live state could not be read, so it is not planned: {why}"),
            address: None,
        });
    }
    violations.sort_by(|a, b| (&a.tenant, a.severity, &a.rule).cmp(&(&b.tenant, b.severity, &b.rule)));
    let changed: BTreeSet<&str> = changes.iter().map(|c| c.address.tenant.as_str()).collect();
    let coordination = inputs.coordination.into_iter().filter(|(t, _)| changed.contains(t.as_str())).collect();
    let live = if meta.record_live {
        inputs
            .live
            .iter()
            .flatten()
            .filter(|l| scope.contains(l.address.tenant.as_str()))
            .map(|l| (l.address.to_string(), l.fingerprint.clone()))
            .collect()
    } else {
        BTreeMap::new()
    };
    Plan {
        format_version: FORMAT_VERSION,
        plan_id: meta.plan_id,
        created_at: meta.created_at,
        now: inputs.now.to_string(),
        revision: meta.revision,
        inputs_digest: meta.inputs_digest,
        lineage: meta.lineage,
        serial: meta.serial,
        tenants: meta.tenants,
        summary,
        changes,
        violations,
        coordination,
        live,
    }
}

/// Where a tenant's items lie in a few long lists: its runs, stretches of consecutive items
/// of that tenant. Stores list a tenant's resources together, so a tenant has about one run
/// per list, and a million items are grouped with one map entry per run rather than per item.
struct Runs<'a, T> {
    first: &'a [T],
    more: Vec<&'a [T]>,
}

impl<'a, T> Runs<'a, T> {
    fn items(&self) -> Vec<&'a T> {
        let mut v = Vec::with_capacity(self.first.len() + self.more.iter().map(|r| r.len()).sum::<usize>());
        v.extend(self.first);
        for r in &self.more {
            v.extend(r.iter());
        }
        v
    }
}

fn runs_by_tenant<'a, T>(
    lists: impl Iterator<Item = &'a [T]>,
    tenant: impl Fn(&T) -> &TenantId,
    wanted: impl Fn(&str) -> bool,
    tenants: usize,
) -> FxHashMap<&'a str, Runs<'a, T>> {
    // Sized for the tenants expected rather than grown (and rehashed) as they come.
    let mut by: FxHashMap<&str, Runs<'a, T>> = FxHashMap::with_capacity_and_hasher(tenants, Default::default());
    for list in lists {
        let mut rest = list;
        while let Some(head) = rest.first() {
            let t = tenant(head);
            let len = rest.iter().position(|x| tenant(x) != t).unwrap_or(rest.len());
            let (run, after) = rest.split_at(len);
            rest = after;
            if !wanted(t) {
                continue;
            }
            match by.entry(t.as_str()) {
                std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().more.push(run),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(Runs { first: run, more: Vec::new() });
                }
            }
        }
    }
    by
}

/// Order within a tenant: apply order (the tenant is the same for all).
fn local_cmp(a: &Address, b: &Address) -> std::cmp::Ordering {
    // The same kind (most comparisons while a tenant's lists are walked): the names decide,
    // without working out the kind's rank.
    if a.kind == b.kind {
        return a.name.cmp(&b.name);
    }
    (a.kind.rank(), &a.kind).cmp(&(b.kind.rank(), &b.kind))
}

/// The journal entry intended what live now holds (a delete intends nothing).
fn intends(j: &JournalEntry, live: Option<&Fingerprint>) -> bool {
    match (j.intended.as_deref(), live) {
        (Some(i), Some(l)) => *l == *i,
        (None, None) => true,
        _ => false,
    }
}

fn plan_tenant(
    desired: &[DesiredEntry],
    live: Vec<&LiveResource>,
    records: Vec<&Record>,
    journal: &FxHashMap<&str, Vec<&JournalEntry>>,
    now: Timestamp,
    options: &diff::Options,
) -> (Vec<Change>, Vec<Violation>, Summary) {
    fn sorted<T>(items: Vec<T>, addr: impl Fn(&T) -> &Address) -> Vec<T> {
        let mut items = items;
        // Rendered resources come sorted already; stores usually list in a stable order.
        if !items.is_sorted_by(|a, b| local_cmp(addr(a), addr(b)).is_le()) {
            items.sort_by(|a, b| local_cmp(addr(a), addr(b)));
        }
        items
    }
    let d = sorted(desired.iter().collect::<Vec<&DesiredEntry>>(), |x| &x.address);
    let l = sorted(live, |x| &x.address);
    let r = sorted(records, |x| &x.address);
    // Every address desired or recorded, in order: a merge of two sorted lists.
    let mut keys: Vec<&Address> = Vec::with_capacity(d.len().max(r.len()));
    let (mut i, mut j) = (0, 0);
    while i < d.len() || j < r.len() {
        let next = match (d.get(i), r.get(j)) {
            (Some(x), Some(y)) => match local_cmp(&x.address, &y.address) {
                std::cmp::Ordering::Less => {
                    i += 1;
                    &x.address
                }
                std::cmp::Ordering::Greater => {
                    j += 1;
                    &y.address
                }
                std::cmp::Ordering::Equal => {
                    i += 1;
                    j += 1;
                    &x.address
                }
            },
            (Some(x), None) => {
                i += 1;
                &x.address
            }
            (None, Some(y)) => {
                j += 1;
                &y.address
            }
            (None, None) => break,
        };
        keys.push(next);
    }
    // The keys come in order, so each list is walked once alongside them.
    fn at<'a, T>(items: &[&'a T], i: &mut usize, a: &Address, addr: impl Fn(&T) -> &Address) -> Option<&'a T> {
        while let Some(x) = items.get(*i) {
            match local_cmp(addr(x), a) {
                std::cmp::Ordering::Less => *i += 1,
                std::cmp::Ordering::Equal => return Some(*x),
                std::cmp::Ordering::Greater => return None,
            }
        }
        None
    }
    let (mut di, mut li, mut ri) = (0, 0, 0);
    let mut changes = Vec::new();
    let mut violations = Vec::new();
    let mut summary = Summary::default();
    for a in keys {
        let (dl, ll, rl) = (
            at(&d, &mut di, a, |x| &x.address),
            at(&l, &mut li, a, |x| &x.address),
            at(&r, &mut ri, a, |x| &x.address),
        );
        // Live holds what a journaled write intended: it happened.
        let happened = if journal.is_empty() {
            None
        } else {
            journal
                .get(a.to_string().as_str())
                .and_then(|js| js.iter().rev().find(|j| intends(j, ll.map(|l| &l.fingerprint))).copied())
        };
        let done = happened.is_some();
        // A completed delete (gone, or a soft-deleted secret) is as if it was never recorded.
        let deleted = happened.is_some_and(|j| j.action == "delete");
        if deleted {
            let (c, v) = diff::diff(a, dl, ll.filter(|_| dl.is_some()), None, now, options);
            let c = match (c, rl) {
                (None, Some(_)) if dl.is_none() => Some(forget(a)),
                (c, _) => c,
            };
            push(&mut changes, &mut violations, &mut summary, c, v, true);
            continue;
        }
        if let (true, Some(l)) = (done, ll) {
            let mut adopted =
                rl.cloned().unwrap_or(Record { address: a.clone(), fingerprint: Default::default(), serial: 0 });
            adopted.fingerprint = l.fingerprint.clone();
            let (c, v) = diff::diff(a, dl, Some(l), Some(&adopted), now, options);
            // Nothing more to do, but the state store must learn what happened: once the
            // tenant is applied, the journal entry is gone.
            let behind = rl.map(|r| &r.fingerprint) != Some(&l.fingerprint);
            let c = match c {
                None if behind => Some(catch_up(a, dl, l, rl)),
                c => c,
            };
            push(&mut changes, &mut violations, &mut summary, c, v, true);
            continue;
        }
        let (mut c, v) = diff::diff(a, dl, ll, rl, now, options);
        if !journal.is_empty()
            && journal.contains_key(a.to_string().as_str())
            && let Some(c) = c.as_mut()
            && c.drift
        {
            // An interrupted apply was writing this address: what differs from the record
            // is its half-done work, not someone else's change.
            c.drift = false;
            c.reason = "an interrupted apply did not finish this; it is applied now".into();
        }
        push(&mut changes, &mut violations, &mut summary, c, v, false);
    }
    (changes, merge_placeholder_warnings(violations), summary)
}

/// The record of a resource an interrupted apply wrote: set to what is live, without drift.
fn catch_up(a: &Address, desired: Option<&DesiredEntry>, live: &LiveResource, record: Option<&Record>) -> Change {
    Change {
        address: a.clone(),
        action: Action::Noop,
        drift: false,
        risk: Risk::Low,
        reason: String::new(),
        desired: desired.and_then(|d| d.content.clone()),
        desired_fingerprint: desired.map(|d| d.fingerprint.clone()),
        live_fingerprint: Some(live.fingerprint.clone()),
        last_fingerprint: record.map(|r| r.fingerprint.clone()),
        before: live.content.as_deref().cloned(),
        fields: Vec::new(),
        diff: String::new(),
        refresh: true,
    }
}

/// The record of a resource an interrupted apply deleted: dropped, without drift.
fn forget(a: &Address) -> Change {
    Change {
        address: a.clone(),
        action: Action::Noop,
        drift: false,
        risk: Risk::Low,
        reason: String::new(),
        desired: None,
        desired_fingerprint: None,
        live_fingerprint: None,
        last_fingerprint: None,
        before: None,
        fields: Vec::new(),
        diff: String::new(),
        refresh: true,
    }
}

/// One warning per tenant for its development placeholders, rather than one per secret (a
/// tenant's violations at a time, while it is planned).
fn merge_placeholder_warnings(violations: Vec<Violation>) -> Vec<Violation> {
    const RULE: &str = diff::PLACEHOLDER_RULE;
    if !violations.iter().any(|v| v.rule == RULE) {
        return violations;
    }
    let (placeholders, mut rest): (Vec<Violation>, Vec<Violation>) =
        violations.into_iter().partition(|v| v.rule == RULE);
    // Each placeholder's message is the secret's name.
    let mut by_tenant: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for v in placeholders {
        by_tenant.entry(v.tenant).or_default().push(v.message);
    }
    for (tenant, names) in by_tenant {
        rest.push(Violation {
            message: format!(
                "tenant {tenant}: {} external secret{} stand{} in as development placeholder{} (dev_placeholders): {}. Put the real values with `dotmac-gitops secret put --tenant {tenant} --name <name>`",
                names.len(),
                if names.len() == 1 { "" } else { "s" },
                if names.len() == 1 { "s" } else { "" },
                if names.len() == 1 { "" } else { "s" },
                names.join(", ")
            ),
            tenant,
            rule: RULE.into(),
            severity: Severity::Warning,
            address: None,
        });
    }
    rest
}

fn push(
    changes: &mut Vec<Change>,
    violations: &mut Vec<Violation>,
    summary: &mut Summary,
    c: Option<Change>,
    v: Option<Violation>,
    journaled: bool,
) {
    if let Some(v) = v {
        violations.push(v);
    }
    let Some(mut c) = c else {
        summary.noop += 1;
        return;
    };
    if journaled && c.action == Action::Noop {
        c.reason = if c.desired.is_none() {
            "deleted by an apply that was interrupted; its record is dropped now".into()
        } else {
            "written by an apply that was interrupted; recorded now".into()
        };
    }
    match c.action {
        Action::Create => summary.create += 1,
        Action::Update => summary.update += 1,
        Action::Rotate => summary.rotate += 1,
        Action::Delete => summary.delete += 1,
        Action::Noop => summary.noop += 1,
    }
    if c.drift {
        summary.drift += 1;
    }
    changes.push(c);
}

impl Plan {
    /// Changes that write or delete something (not record-only noops).
    pub fn actionable(&self) -> impl Iterator<Item = &Change> {
        self.changes.iter().filter(|c| c.action != Action::Noop)
    }

    pub fn has_changes(&self) -> bool {
        self.actionable().next().is_some()
    }

    /// Changes or drift: what `--detailed-exitcode` reports as 2.
    pub fn has_changes_or_drift(&self) -> bool {
        self.has_changes() || self.summary.drift > 0
    }

    pub fn errors(&self) -> impl Iterator<Item = &Violation> {
        self.violations.iter().filter(|v| v.severity == Severity::Error)
    }

    pub fn highest_risk(&self) -> Option<Risk> {
        self.actionable().map(|c| c.risk).max()
    }

    pub fn tenants_changed(&self) -> BTreeSet<&str> {
        self.changes.iter().map(|c| c.address.tenant.as_str()).collect()
    }

    /// The correlation id of everything this plan does: plan id and revision.
    pub fn correlation_id(&self) -> String {
        format!("{}@{}", self.plan_id, self.revision.as_deref().unwrap_or("worktree"))
    }

    /// The JSON people and tools read (`plan --format json`): the stable shape of the CLI
    /// contract, without the apply-only fields.
    pub fn to_json(&self) -> Value {
        let changes: Vec<Value> = self.changes.iter().map(change_json).collect();
        json!({
            "format_version": self.format_version,
            "plan_id": self.plan_id,
            "created_at": self.created_at,
            "now": self.now,
            "revision": self.revision,
            "lineage": self.lineage,
            "serial": self.serial,
            "tenants": self.tenants,
            "summary": self.summary,
            "changes": changes,
            "violations": self.violations,
        })
    }
}

/// One change as `plan --format json` (and `diff --format json`) shows it; secrets masked.
pub fn change_json(c: &Change) -> Value {
    json!({
        "address": c.address.to_string(),
        "tenant": c.address.tenant,
        "provider": c.address.provider(),
        "action": c.action,
        "drift": c.drift,
        "risk": c.risk,
        "reason": c.reason,
        "diff": c.diff_text(),
        "before": c.before.as_ref().map(masked).unwrap_or(Value::Null),
        "after": c.desired.as_deref().filter(|_| c.action != Action::Delete).map(masked).unwrap_or(Value::Null),
        "fields": c.fields,
    })
}

/// A content as JSON for output: structures as they are, text as a string, secrets as
/// metadata and `(sensitive)`.
pub fn masked(c: &Content) -> Value {
    match c {
        Content::Text(t) => Value::String(t.clone()),
        Content::Json(v) => v.clone(),
        Content::Secret(s) => json!({"secret": s.name, "source": s.source, "value": "(sensitive)"}),
        Content::SecretMeta(m) => {
            json!({"version": m.version, "updated": m.updated, "deleted": m.deleted, "value": "(sensitive)"})
        }
    }
}

/// A random id (`plan-` and 12 hex digits).
pub fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 6];
    let _ = getrandom::fill(&mut b);
    format!("{prefix}-{}", crate::providers::local::hex(&b))
}

/// Why a saved plan may no longer be applied.
pub fn staleness(
    plan: &Plan,
    revision: Option<&str>,
    inputs_digest: &str,
    state: &crate::state::StateMeta,
    live: &[Vec<LiveResource>],
    unreadable: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut why = Vec::new();
    if plan.format_version != FORMAT_VERSION {
        why.push(format!("the plan file has format {}; this engine reads {FORMAT_VERSION}", plan.format_version));
    }
    if plan.lineage != state.lineage {
        why.push(format!("the plan was made against another state (lineage {} ≠ {})", plan.lineage, state.lineage));
    } else if plan.serial != state.serial {
        why.push(format!("the state moved from serial {} to {} (someone applied since)", plan.serial, state.serial));
    }
    match (plan.revision.as_deref(), revision) {
        (Some(p), Some(c)) if p != c => why.push(format!("the repository moved from {} to {}", short(p), short(c))),
        _ if plan.inputs_digest != inputs_digest => why.push("the repository's files changed since the plan".into()),
        _ => {}
    }
    let now: HashMap<String, &Fingerprint> =
        live.iter().flatten().map(|l| (l.address.to_string(), &l.fingerprint)).collect();
    let mut moved: Vec<String> = Vec::new();
    // A tenant that cannot be read now is not judged here: apply re-reads each tenant before
    // writing and fails that one alone.
    let readable = |a: &str| !unreadable.contains_key(a.split_once('/').map(|(t, _)| t).unwrap_or(a));
    for (a, fp) in plan.live.iter().filter(|(a, _)| readable(a)) {
        match now.get(a) {
            Some(f) if *f == fp => {}
            Some(_) => moved.push(format!("{a} changed")),
            None => moved.push(format!("{a} disappeared")),
        }
    }
    for (a, _) in now.iter().filter(|(a, _)| !plan.live.contains_key(*a)) {
        if plan.changes.iter().any(|c| &c.address.to_string() == a) {
            moved.push(format!("{a} appeared"));
        }
    }
    moved.sort();
    if !moved.is_empty() {
        let n = moved.len();
        let shown: Vec<String> = moved.into_iter().take(10).collect();
        why.push(format!(
            "live state moved: {}{}",
            shown.join(", "),
            if n > 10 { format!(" and {} more", n - 10) } else { String::new() }
        ));
    }
    why
}

/// How a saved plan differs from the plan made now of the same repository, state and live
/// resources (which `staleness` found unmoved, so the two must be the same): changes left
/// out, added or edited, errors removed, coordination changed. A plan file is data too: an
/// edited one must not write what the repository does not say, nor half of a tenant.
pub fn differences(saved: &Plan, fresh: &Plan) -> Vec<String> {
    let (s, f) = (change_keys(saved), change_keys(fresh));
    let mut out = Vec::new();
    for (a, k) in &s {
        match f.get(a) {
            None => out.push(format!("{a} ({}) is not planned", k.0)),
            Some(fk) if fk != k => out.push(format!("{a} ({}) is not what the repository says", k.0)),
            Some(_) => {}
        }
    }
    for (a, k) in f.iter().filter(|(a, _)| !s.contains_key(*a)) {
        out.push(format!("{a} ({}) is missing", k.0));
    }
    let errors =
        |p: &Plan| -> BTreeSet<(String, String)> { p.errors().map(|v| (v.tenant.clone(), v.rule.clone())).collect() };
    for (t, rule) in errors(fresh).difference(&errors(saved)) {
        out.push(format!("the error {rule} of tenant {t} is missing"));
    }
    if saved.coordination != fresh.coordination {
        out.push("the coordination of the tenants differs".into());
    }
    out
}

/// What must match between a saved plan and the plan made again, per address: action, the
/// content's fingerprint, the live and recorded fingerprints, whether it only records.
type ChangeKey<'p> = (&'p str, Option<Fingerprint>, Option<&'p Fingerprint>, Option<&'p Fingerprint>, bool);

fn change_keys(p: &Plan) -> BTreeMap<String, ChangeKey<'_>> {
    p.changes
        .iter()
        .map(|c| {
            let key = (
                c.action.as_str(),
                c.desired.as_deref().map(crate::fingerprint::of),
                c.live_fingerprint.as_ref(),
                c.last_fingerprint.as_ref(),
                c.refresh,
            );
            (c.address.to_string(), key)
        })
        .collect()
}

pub fn short(rev: &str) -> &str {
    &rev[..rev.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(a: &str) -> Record {
        Record { address: Address::parse(a).unwrap(), fingerprint: "v1".into(), serial: 1 }
    }

    #[test]
    fn a_tenant_split_over_lists_and_runs_keeps_every_item() {
        // t1 in two runs of the first list and in the second; t3 not wanted.
        let a = vec![rec("t1/isp.config"), rec("t2/isp.config"), rec("t1/management.tenant"), rec("t3/isp.config")];
        let b = vec![rec("t2/openbao.secret[x]"), rec("t1/openbao.secret[x]"), rec("t1/openbao.secret[y]")];
        let by = runs_by_tenant([a.as_slice(), b.as_slice()].into_iter(), |r| &r.address.tenant, |t| t != "t3", 0);
        let names = |t: &str| -> Vec<String> { by[t].items().iter().map(|r| r.address.to_string()).collect() };
        assert_eq!(
            names("t1"),
            ["t1/isp.config", "t1/management.tenant", "t1/openbao.secret[x]", "t1/openbao.secret[y]"]
        );
        assert_eq!(names("t2"), ["t2/isp.config", "t2/openbao.secret[x]"]);
        assert!(!by.contains_key("t3"));
        assert_eq!(by.len(), 2);
    }
}
