//! The dashboard's view models: what each page shows, built from the daemon's state (and
//! audit entries the caller read). Pure: no I/O, no clock (`now` comes in), no HTML — the
//! templates turn these into markup, escaping every string.
//!
//! Links are built here, percent-encoded, so that a template only prints them.

use crate::daemon::status::{Role, Shared, Status, TenantState};
use crate::diff::Action;
use crate::state::AuditEntry;
use jiff::Timestamp;
use serde::Serialize;

/// Rows per page unless the query asks otherwise; and the most it may ask.
pub const PER_PAGE: usize = 100;
pub const MAX_PER_PAGE: usize = 1000;
/// Audit entries per page, and the most a tenant page shows.
pub const AUDIT_PAGE: usize = 200;
pub const TENANT_AUDIT: usize = 50;
/// Errors in the tenant list are cut to this many characters (the tenant page has them whole).
const NOTE_CHARS: usize = 160;

/// Worst first: the order of the status sort and of the counts at the top.
const SEVERITY: [Status; 5] = [Status::Failed, Status::Drifted, Status::OutOfSync, Status::Progressing, Status::Synced];

/// A status as the pages show it: the word, and a class the stylesheet colours.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatusView {
    pub word: &'static str,
    pub class: &'static str,
}

impl StatusView {
    pub fn of(s: Status) -> StatusView {
        let class = match s {
            Status::Synced => "synced",
            Status::OutOfSync => "outofsync",
            Status::Drifted => "drifted",
            Status::Progressing => "progressing",
            Status::Failed => "failed",
        };
        StatusView { word: s.as_str(), class }
    }
}

pub fn parse_status(s: &str) -> Option<Status> {
    Status::ALL.into_iter().find(|x| x.as_str().eq_ignore_ascii_case(s))
}

/// A moment: the RFC 3339 time (for `<time datetime>` and a tooltip) and how long ago.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct When {
    pub iso: String,
    pub ago: String,
}

pub fn when(t: Timestamp, now: Timestamp) -> When {
    let secs = now.as_second() - t.as_second();
    let (n, future) = if secs < 0 { (-secs, true) } else { (secs, false) };
    let span = match n {
        0..=4 if !future => return When { iso: iso(t), ago: "just now".into() },
        0..=59 => format!("{n} s"),
        60..=3599 => format!("{} min", n / 60),
        3600..=172_799 => format!("{} h", n / 3600),
        _ => format!("{} d", n / 86_400),
    };
    When { iso: iso(t), ago: if future { format!("in {span}") } else { format!("{span} ago") } }
}

fn iso(t: Timestamp) -> String {
    // Whole seconds: the pages show times, not their nanoseconds.
    Timestamp::from_second(t.as_second()).map(|s| s.to_string()).unwrap_or_else(|_| t.to_string())
}

/// `12345` → `12,345`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn short(rev: &str) -> String {
    crate::plan::short(rev).to_owned()
}

/// The first line of `s`, at most `max` characters (an ellipsis says it was cut).
fn first_line(s: &str, max: usize) -> String {
    let line = s.lines().next().unwrap_or("");
    let mut out: String = line.chars().take(max).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// Percent-encodes a query value or path segment: everything but RFC 3986's unreserved.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn query_string(pairs: &[(&str, String)]) -> String {
    let parts: Vec<String> =
        pairs.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| format!("{k}={}", encode(v))).collect();
    if parts.is_empty() { String::new() } else { format!("?{}", parts.join("&")) }
}

pub fn tenant_href(id: &str) -> String {
    format!("/tenants/{}", encode(id))
}

/// The top of every page: what the daemon follows and how that goes.
#[derive(Debug, Clone, Serialize)]
pub struct Header {
    pub revision: Option<String>,
    pub revision_short: Option<String>,
    pub revision_error: Option<String>,
    pub repo: String,
    pub branch: String,
    pub head_short: Option<String>,
    pub last_fetch: Option<When>,
    pub source_error: Option<String>,
    pub ready: bool,
    pub role: &'static str,
    pub leader: Option<String>,
    pub auto_apply: bool,
    pub tenants: String,
    pub now: When,
}

pub fn header(s: &Shared, now: Timestamp) -> Header {
    Header {
        revision: s.revision.clone(),
        revision_short: s.revision.as_deref().map(short),
        revision_error: s.revision_error.clone(),
        repo: s.source.repo.clone(),
        branch: s.source.branch.clone(),
        head_short: s.source.head.as_deref().map(short),
        last_fetch: s.source.last_fetch.map(|t| when(t, now)),
        source_error: s.source.last_error.clone(),
        ready: s.ready,
        role: match s.role {
            Role::Leader => "leader",
            Role::Standby => "standby",
            Role::ShuttingDown => "shutting down",
        },
        leader: s.leader.clone(),
        auto_apply: s.auto_apply,
        tenants: thousands(s.tenants.len()),
        now: when(now, now),
    }
}

// ---------------------------------------------------------------------------------------
// GET /

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Sort {
    /// By id.
    #[default]
    Id,
    /// By name, then id.
    Name,
    /// Worst status first, then id.
    Status,
    /// Longest unsynced first (never synced first of all), then id.
    Sync,
}

impl Sort {
    const ALL: [Sort; 4] = [Sort::Id, Sort::Name, Sort::Status, Sort::Sync];

    fn as_str(self) -> &'static str {
        match self {
            Sort::Id => "id",
            Sort::Name => "name",
            Sort::Status => "status",
            Sort::Sync => "sync",
        }
    }

    fn parse(s: &str) -> Option<Sort> {
        Sort::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// What the tenant list was asked for. Anything it does not understand falls back to the
/// default (a bookmark with an old parameter still shows the list).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListQuery {
    pub status: Option<Status>,
    /// Searched for in ids and names, ignoring case.
    pub q: String,
    pub sort: Sort,
    /// 1-based.
    pub page: usize,
    pub per: usize,
}

impl ListQuery {
    pub fn parse(
        status: Option<&str>,
        q: Option<&str>,
        sort: Option<&str>,
        page: Option<&str>,
        per: Option<&str>,
    ) -> ListQuery {
        ListQuery {
            status: status.and_then(parse_status),
            q: q.unwrap_or("").trim().chars().take(200).collect(),
            sort: sort.and_then(Sort::parse).unwrap_or_default(),
            page: page.and_then(|p| p.parse().ok()).filter(|p| *p >= 1).unwrap_or(1),
            per: per.and_then(|p| p.parse().ok()).filter(|p| *p >= 1).unwrap_or(PER_PAGE).min(MAX_PER_PAGE),
        }
    }

    /// The list's address with these settings (defaults left out).
    pub fn href(&self) -> String {
        let page = if self.page > 1 { self.page.to_string() } else { String::new() };
        let per = if self.per != PER_PAGE { self.per.to_string() } else { String::new() };
        let sort = if self.sort != Sort::Id { self.sort.as_str().to_owned() } else { String::new() };
        let status = self.status.map(|s| s.as_str().to_owned()).unwrap_or_default();
        format!(
            "/{}",
            query_string(&[("status", status), ("q", self.q.clone()), ("sort", sort), ("page", page), ("per", per)])
        )
    }

    fn with(&self, f: impl FnOnce(&mut ListQuery)) -> ListQuery {
        let mut q = self.clone();
        f(&mut q);
        q
    }
}

/// A count at the top: a status, how many tenants have it, and the link that lists them.
#[derive(Debug, Clone, Serialize)]
pub struct Count {
    pub status: Option<StatusView>,
    pub n: usize,
    pub shown: String,
    pub href: String,
    pub active: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub id: String,
    pub href: String,
    pub name: String,
    pub status: StatusView,
    pub plan: String,
    pub environment: String,
    pub synced_revision: Option<String>,
    pub synced_revision_short: Option<String>,
    pub last_sync: Option<When>,
    pub drift: usize,
    pub heal_stopped: bool,
    /// The last error's first line, cut.
    pub note: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SortLink {
    pub value: &'static str,
    pub label: &'static str,
    pub href: String,
    pub active: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Pager {
    /// 1-based positions shown, of `matched`.
    pub from: String,
    pub to: String,
    pub matched: String,
    pub page: usize,
    pub pages: usize,
    pub first: Option<String>,
    pub prev: Option<String>,
    pub next: Option<String>,
    pub last: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ListPage {
    pub header: Header,
    /// Every tenant, then one count per status (worst first); the same numbers as
    /// `/api/v1/status`'s `summary`.
    pub all: Count,
    pub counts: Vec<Count>,
    pub rows: Vec<Row>,
    pub pager: Pager,
    /// The query, for the filter form.
    pub q: String,
    pub status: String,
    pub sort: &'static str,
    pub per: usize,
    pub sorts: Vec<SortLink>,
    /// The status words, for the filter's choices.
    pub statuses: Vec<StatusView>,
    /// The filter or search matched nothing (while there are tenants).
    pub none_matched: bool,
    pub href: String,
}

fn row(t: &TenantState, now: Timestamp) -> Row {
    Row {
        id: t.tenant.clone(),
        href: tenant_href(&t.tenant),
        name: t.label.name.clone(),
        status: StatusView::of(t.status),
        plan: t.label.plan.clone(),
        environment: t.label.environment.clone(),
        synced_revision: t.synced_revision.clone(),
        synced_revision_short: t.synced_revision.as_deref().map(short),
        last_sync: t.last_sync.map(|at| when(at, now)),
        drift: t.drift.len(),
        heal_stopped: t.heal_stopped,
        note: t.last_error.as_deref().map(|e| first_line(e, NOTE_CHARS)).unwrap_or_default(),
    }
}

fn rank(s: Status) -> usize {
    SEVERITY.iter().position(|x| *x == s).unwrap_or(SEVERITY.len())
}

/// The tenant list: filtered, searched, sorted, one page of it.
pub fn list(s: &Shared, q: &ListQuery, now: Timestamp) -> ListPage {
    let counts = s.counts();
    let needle = q.q.to_lowercase();
    let mut matched: Vec<&TenantState> = s
        .tenants
        .values()
        .filter(|t| q.status.is_none_or(|st| t.status == st))
        .filter(|t| needle.is_empty() || t.tenant.contains(&needle) || t.label.name.to_lowercase().contains(&needle))
        .collect();
    // The map is ordered by id: the sorts are stable, ties stay in id order.
    match q.sort {
        Sort::Id => {}
        Sort::Name => matched.sort_by_cached_key(|t| t.label.name.to_lowercase()),
        Sort::Status => matched.sort_by_key(|t| rank(t.status)),
        Sort::Sync => matched.sort_by_key(|t| t.last_sync),
    }
    let total = matched.len();
    let pages = total.div_ceil(q.per).max(1);
    let page = q.page.min(pages);
    let start = (page - 1) * q.per;
    let rows: Vec<Row> = matched.iter().skip(start).take(q.per).map(|t| row(t, now)).collect();
    let at = |p: usize| q.with(|x| x.page = p).href();
    let pager = Pager {
        from: thousands(if rows.is_empty() { 0 } else { start + 1 }),
        to: thousands(start + rows.len()),
        matched: thousands(total),
        page,
        pages,
        first: (page > 1).then(|| at(1)),
        prev: (page > 1).then(|| at(page - 1)),
        next: (page < pages).then(|| at(page + 1)),
        last: (page < pages).then(|| at(pages)),
    };
    let count = |st: Option<Status>, n: usize| Count {
        status: st.map(StatusView::of),
        n,
        shown: thousands(n),
        href: q
            .with(|x| {
                x.status = st;
                x.page = 1;
            })
            .href(),
        active: q.status == st,
    };
    let sorts = [("id", Sort::Id), ("name", Sort::Name), ("status", Sort::Status), ("last sync", Sort::Sync)]
        .into_iter()
        .map(|(label, sort)| SortLink {
            value: sort.as_str(),
            label,
            href: q
                .with(|x| {
                    x.sort = sort;
                    x.page = 1;
                })
                .href(),
            active: q.sort == sort,
        })
        .collect();
    ListPage {
        header: header(s, now),
        all: count(None, s.tenants.len()),
        counts: SEVERITY.iter().map(|st| count(Some(*st), counts.get(st).copied().unwrap_or(0))).collect(),
        none_matched: rows.is_empty() && !s.tenants.is_empty(),
        rows,
        pager,
        q: q.q.clone(),
        status: q.status.map(|s| s.as_str().to_owned()).unwrap_or_default(),
        sort: q.sort.as_str(),
        per: q.per,
        sorts,
        statuses: SEVERITY.iter().map(|s| StatusView::of(*s)).collect(),
        href: q.with(|x| x.page = page).href(),
    }
}

// ---------------------------------------------------------------------------------------
// GET /tenants/{id}

#[derive(Debug, Clone, Serialize)]
pub struct DiffLine {
    /// add | del | hunk | meta | ctx
    pub class: &'static str,
    pub text: String,
}

/// A unified diff, line by line, with the class that colours each line.
pub fn diff_lines(diff: &str) -> Vec<DiffLine> {
    diff.lines()
        .map(|l| {
            let class = if l.starts_with("+++") || l.starts_with("---") {
                "meta"
            } else if l.starts_with("@@") {
                "hunk"
            } else if l.starts_with('+') {
                "add"
            } else if l.starts_with('-') {
                "del"
            } else {
                "ctx"
            };
            DiffLine { class, text: l.to_owned() }
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct FieldView {
    pub pointer: String,
    pub before: String,
    pub after: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChangeRow {
    pub address: String,
    pub action: &'static str,
    pub risk: &'static str,
    pub drift: bool,
    pub reason: String,
    pub fields: Vec<FieldView>,
    pub lines: Vec<DiffLine>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ViolationView {
    pub severity: String,
    pub rule: String,
    pub message: String,
    pub address: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanView {
    pub plan_id: String,
    pub revision_short: String,
    pub at: When,
    /// The daemon applied this plan (successfully).
    pub applied: bool,
    pub changes: Vec<ChangeRow>,
    pub violations: Vec<ViolationView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResourceRow {
    pub address: String,
    /// The provider part of the address (`isp`, `kubernetes`, …).
    pub provider: String,
    pub state: &'static str,
    pub class: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct DifferenceView {
    pub path: String,
    pub management: String,
    pub isp: String,
    pub impact: String,
    pub recommendation: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApplyRow {
    pub plan_id: String,
    pub revision_short: String,
    pub at: When,
    pub ok: bool,
    pub applied: usize,
    pub error: Option<String>,
    pub rolled_back: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HistoryRow {
    pub at: When,
    pub count: u32,
    pub status: StatusView,
    pub event: String,
    pub error: Option<String>,
    pub requeue: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditRow {
    pub id: i64,
    pub at: Option<When>,
    pub time: String,
    pub tenant: String,
    pub tenant_href: String,
    pub address: String,
    pub action: String,
    pub risk: String,
    pub outcome: String,
    /// `ok` for applied, `bad` for failures, `warn` for rollbacks and skips.
    pub outcome_class: &'static str,
    pub actor: String,
    pub correlation_id: String,
    /// The plan id part of the correlation id (`plan-…@revision`), what the table shows.
    pub plan: String,
    pub message: Option<String>,
}

pub fn audit_row(e: &AuditEntry, now: Timestamp) -> AuditRow {
    AuditRow {
        id: e.id,
        at: e.time.parse::<Timestamp>().ok().map(|t| when(t, now)),
        time: e.time.to_string(),
        tenant: e.tenant.to_string(),
        tenant_href: tenant_href(&e.tenant),
        address: e.address.strip_prefix(&format!("{}/", e.tenant)).unwrap_or(&e.address).to_owned(),
        action: e.action.to_string(),
        risk: e.risk.to_string(),
        outcome: e.outcome.to_string(),
        outcome_class: match &*e.outcome {
            "applied" => "ok",
            "failed" | "rollback_failed" => "bad",
            _ => "warn",
        },
        actor: e.actor.to_string(),
        correlation_id: e.correlation_id.to_string(),
        plan: e.correlation_id.split('@').next().unwrap_or("").to_owned(),
        message: e.message.clone(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TenantPage {
    pub header: Header,
    pub id: String,
    pub href: String,
    pub name: String,
    pub plan: String,
    pub environment: String,
    pub status: StatusView,
    pub revision_short: Option<String>,
    pub synced_revision_short: Option<String>,
    pub last_sync: Option<When>,
    pub last_check: Option<When>,
    pub next_check: Option<When>,
    pub last_error: Option<String>,
    pub failures: u32,
    pub heal_attempts: u32,
    pub heal_stopped: bool,
    pub resources: Vec<ResourceRow>,
    pub plan_view: Option<PlanView>,
    /// The changes that are drift (live changed out of band), with their risk and reason.
    pub drift: Vec<ChangeRow>,
    /// Drifted addresses the last plan no longer lists (healed since, or cut).
    pub drift_addresses: Vec<String>,
    pub inconsistencies: Vec<DifferenceView>,
    pub last_apply: Option<ApplyRow>,
    pub history: Vec<HistoryRow>,
    pub audit: Vec<AuditRow>,
    /// Why there are no audit entries to show, if the log could not be read.
    pub audit_error: Option<String>,
    pub audit_href: String,
}

fn show(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "(absent)".into(),
        other => other.to_string(),
    }
}

fn opt_show(v: &Option<serde_json::Value>) -> String {
    v.as_ref().map(show).unwrap_or_else(|| "(absent)".into())
}

fn change_row(c: &crate::daemon::status::ChangeView) -> ChangeRow {
    ChangeRow {
        address: c.address.clone(),
        action: c.action.as_str(),
        risk: c.risk.as_str(),
        drift: c.drift,
        reason: c.reason.clone(),
        fields: c
            .fields
            .iter()
            .map(|f| FieldView { pointer: f.pointer.clone(), before: opt_show(&f.before), after: opt_show(&f.after) })
            .collect(),
        lines: diff_lines(&c.diff),
    }
}

/// One tenant's page; `None` if the daemon does not know it. `audit` holds its recent
/// entries (oldest first), or why they could not be read.
pub fn tenant(s: &Shared, id: &str, audit: Result<Vec<AuditEntry>, String>, now: Timestamp) -> Option<TenantPage> {
    let t = s.tenants.get(id)?;
    let prefix = format!("{id}/");
    let local = |a: &str| a.strip_prefix(&prefix).unwrap_or(a).to_owned();
    let plan = t.last_plan.as_ref();
    let applied = match (plan, &t.last_apply) {
        (Some(p), Some(a)) => a.ok && a.plan_id == p.plan_id,
        _ => false,
    };
    let changes: Vec<&crate::daemon::status::ChangeView> = plan.map(|p| p.changes.iter().collect()).unwrap_or_default();
    let state_of = |address: &str| -> (&'static str, &'static str) {
        let Some(c) = changes.iter().find(|c| local(&c.address) == address) else {
            return if plan.is_some() { ("in sync", "synced") } else { ("not checked yet", "progressing") };
        };
        if applied && c.action != Action::Noop {
            return ("applied", "synced");
        }
        if c.drift {
            return ("drifted", "drifted");
        }
        match c.action {
            Action::Create => ("to create", "outofsync"),
            Action::Update => ("to update", "outofsync"),
            Action::Rotate => ("to rotate", "outofsync"),
            Action::Delete => ("to delete", "outofsync"),
            Action::Noop => ("in sync (record to refresh)", "synced"),
        }
    };
    let mut resources: Vec<ResourceRow> = t
        .resources
        .iter()
        .map(|a| {
            let (state, class) = state_of(a);
            ResourceRow { address: a.clone(), provider: provider_of(a), state, class }
        })
        .collect();
    // Resources the plan deletes are no longer desired: list them too.
    for c in &changes {
        let a = local(&c.address);
        if !t.resources.contains(&a) {
            let (state, class) = state_of(&a);
            resources.push(ResourceRow { provider: provider_of(&a), address: a, state, class });
        }
    }
    let drift: Vec<ChangeRow> = changes.iter().filter(|c| c.drift).map(|c| change_row(c)).collect();
    let drift_addresses =
        t.drift.iter().filter(|a| !changes.iter().any(|c| c.drift && &c.address == *a)).map(|a| local(a)).collect();
    let (audit, audit_error) = match audit {
        Ok(entries) => (entries.iter().rev().take(TENANT_AUDIT).map(|e| audit_row(e, now)).collect(), None),
        Err(e) => (Vec::new(), Some(e)),
    };
    Some(TenantPage {
        header: header(s, now),
        id: t.tenant.clone(),
        href: tenant_href(&t.tenant),
        name: t.label.name.clone(),
        plan: t.label.plan.clone(),
        environment: t.label.environment.clone(),
        status: StatusView::of(t.status),
        revision_short: t.revision.as_deref().map(short),
        synced_revision_short: t.synced_revision.as_deref().map(short),
        last_sync: t.last_sync.map(|x| when(x, now)),
        last_check: t.last_check.map(|x| when(x, now)),
        next_check: t.next_check.map(|x| when(x, now)),
        last_error: t.last_error.clone(),
        failures: t.failures,
        heal_attempts: t.heal_attempts,
        heal_stopped: t.heal_stopped,
        resources,
        plan_view: plan.map(|p| PlanView {
            plan_id: p.plan_id.clone(),
            revision_short: short(&p.revision),
            at: when(p.at, now),
            applied,
            changes: p.changes.iter().map(change_row).collect(),
            violations: p
                .violations
                .iter()
                .map(|v| ViolationView {
                    severity: format!("{:?}", v.severity).to_lowercase(),
                    rule: v.rule.clone(),
                    message: v.message.clone(),
                    address: v.address.as_deref().map(local),
                })
                .collect(),
        }),
        drift,
        drift_addresses,
        inconsistencies: t
            .inconsistencies
            .iter()
            .map(|d| DifferenceView {
                path: d.path.clone(),
                management: show(&d.management_value),
                isp: show(&d.isp_framework_value),
                impact: d.impact.clone(),
                recommendation: d.recommendation.clone(),
            })
            .collect(),
        last_apply: t.last_apply.as_ref().map(|a| ApplyRow {
            plan_id: a.plan_id.clone(),
            revision_short: short(&a.revision),
            at: when(a.at, now),
            ok: a.ok,
            applied: a.applied,
            error: a.error.clone(),
            rolled_back: a.rolled_back,
        }),
        history: t
            .history
            .iter()
            .rev()
            .map(|h| HistoryRow {
                at: when(h.at, now),
                count: h.count,
                status: StatusView::of(h.status),
                event: h.event.clone(),
                error: h.error.clone(),
                requeue: format!("{:.1} s", h.requeue_after_s),
            })
            .collect(),
        audit,
        audit_error,
        audit_href: format!("/audit{}", query_string(&[("tenant", t.tenant.clone())])),
    })
}

fn provider_of(local_address: &str) -> String {
    local_address.split(['.', '[']).next().unwrap_or("").to_owned()
}

// ---------------------------------------------------------------------------------------
// GET /audit

/// The time ranges the audit filter offers (label, hours; 0 = all time).
pub const RANGES: [(&str, &str, i64); 5] = [
    ("1h", "the last hour", 1),
    ("24h", "the last day", 24),
    ("7d", "the last week", 168),
    ("30d", "the last 30 days", 720),
    ("all", "all time", 0),
];

/// The audit timeline's filters, as asked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditFilter {
    pub tenant: String,
    pub action: String,
    pub outcome: String,
    pub actor: String,
    /// One of [`RANGES`]' keys.
    pub range: String,
    /// Older than this entry id (the next page).
    pub before: Option<i64>,
}

/// The actions and outcomes the audit log records, for the filter's choices.
pub const ACTIONS: [&str; 5] = ["create", "update", "rotate", "delete", "noop"];
pub const OUTCOMES: [&str; 5] = ["applied", "failed", "rolled_back", "rollback_failed", "skipped"];

impl AuditFilter {
    pub fn parse(
        tenant: Option<&str>,
        action: Option<&str>,
        outcome: Option<&str>,
        actor: Option<&str>,
        range: Option<&str>,
        before: Option<&str>,
    ) -> AuditFilter {
        let text = |v: Option<&str>| v.unwrap_or("").trim().chars().take(200).collect::<String>();
        let pick =
            |v: Option<&str>, from: &[&str]| v.filter(|v| from.contains(v)).map(str::to_owned).unwrap_or_default();
        AuditFilter {
            tenant: text(tenant),
            action: pick(action, &ACTIONS),
            outcome: pick(outcome, &OUTCOMES),
            actor: text(actor),
            range: RANGES.iter().find(|r| Some(r.0) == range).map(|r| r.0).unwrap_or("7d").to_owned(),
            before: before.and_then(|b| b.parse().ok()).filter(|b| *b > 0),
        }
    }

    /// The store query for this filter at `now`: the newest page (plus one, to know if
    /// there is more).
    pub fn query(&self, now: Timestamp) -> crate::state::AuditQuery {
        let hours = RANGES.iter().find(|r| r.0 == self.range).map(|r| r.2).unwrap_or(168);
        let since = (hours > 0)
            .then(|| now.checked_sub(jiff::SignedDuration::from_hours(hours)).ok().map(|t| t.to_string()))
            .flatten();
        let opt = |s: &String| (!s.is_empty()).then(|| s.clone());
        crate::state::AuditQuery {
            tenants: opt(&self.tenant).into_iter().collect(),
            since,
            limit: Some(AUDIT_PAGE + 1),
            newest: true,
            before: self.before,
            action: opt(&self.action),
            outcome: opt(&self.outcome),
            actor: opt(&self.actor),
        }
    }

    fn href(&self, before: Option<i64>) -> String {
        let range = if self.range == "7d" { String::new() } else { self.range.clone() };
        format!(
            "/audit{}",
            query_string(&[
                ("tenant", self.tenant.clone()),
                ("action", self.action.clone()),
                ("outcome", self.outcome.clone()),
                ("actor", self.actor.clone()),
                ("range", range),
                ("before", before.map(|b| b.to_string()).unwrap_or_default()),
            ])
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    pub value: &'static str,
    pub label: &'static str,
    pub selected: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditPage {
    pub header: Header,
    pub tenant: String,
    pub actor: String,
    pub actions: Vec<Choice>,
    pub outcomes: Vec<Choice>,
    pub ranges: Vec<Choice>,
    pub rows: Vec<AuditRow>,
    /// The page of older entries, and the first page (when this is not it).
    pub older: Option<String>,
    pub newest: Option<String>,
    pub error: Option<String>,
    pub href: String,
}

/// The audit timeline, newest first. `entries` is what [`AuditFilter::query`] returned
/// (oldest first, one more than a page when there are older ones), or why it failed.
pub fn audit(s: &Shared, f: &AuditFilter, entries: Result<Vec<AuditEntry>, String>, now: Timestamp) -> AuditPage {
    let choices = |all: &[&'static str], chosen: &str| {
        let mut v = vec![Choice { value: "", label: "any", selected: chosen.is_empty() }];
        v.extend(all.iter().map(|a| Choice { value: a, label: a, selected: *a == chosen }));
        v
    };
    let (rows, older, error) = match entries {
        Ok(mut e) => {
            let more = e.len() > AUDIT_PAGE;
            if more {
                e.drain(..e.len() - AUDIT_PAGE);
            }
            let rows: Vec<AuditRow> = e.iter().rev().map(|e| audit_row(e, now)).collect();
            let older = more.then(|| f.href(rows.last().map(|r| r.id)));
            (rows, older, None)
        }
        Err(e) => (Vec::new(), None, Some(e)),
    };
    AuditPage {
        header: header(s, now),
        tenant: f.tenant.clone(),
        actor: f.actor.clone(),
        actions: choices(&ACTIONS, &f.action),
        outcomes: choices(&OUTCOMES, &f.outcome),
        ranges: RANGES.iter().map(|r| Choice { value: r.0, label: r.1, selected: r.0 == f.range }).collect(),
        rows,
        older,
        newest: f.before.map(|_| f.href(None)),
        error,
        href: f.href(f.before),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::status::{ChangeView, Handle, SourceStatus, TenantPlan};
    use crate::diff::Risk;
    use std::time::Instant;

    const NOW: i64 = 1_800_000_000;

    fn now() -> Timestamp {
        Timestamp::from_second(NOW).unwrap()
    }

    fn shared(n: usize) -> Handle {
        let h = Handle::new(false, SourceStatus { repo: "/repo".into(), branch: "main".into(), ..Default::default() });
        {
            let mut s = h.write();
            s.revision = Some("0123456789abcdef0123".into());
            for i in 0..n {
                let id = format!("t{i:05}");
                let mut t = TenantState::new(&id, Instant::now());
                t.label.name = format!("Tenant {i} <ISP>");
                t.label.plan = if i % 2 == 0 { "basic".into() } else { "premium".into() };
                t.label.environment = "production".into();
                t.status = match i % 10 {
                    0 => Status::Failed,
                    1 | 2 => Status::Drifted,
                    3 => Status::OutOfSync,
                    _ => Status::Synced,
                };
                if t.status == Status::Synced {
                    t.last_sync = Timestamp::from_second(NOW - 120 - i as i64).ok();
                    t.synced_revision = s.revision.clone();
                }
                s.tenants.insert(id, t);
            }
        }
        h
    }

    #[test]
    fn counts_are_the_status_summary_and_link_to_their_filter() {
        let h = shared(250);
        let s = h.read();
        let page = list(&s, &ListQuery::parse(None, None, None, None, None), now());
        let api = s.status_json();
        assert_eq!(page.all.n, 250);
        for c in &page.counts {
            let st = c.status.as_ref().unwrap();
            assert_eq!(api["summary"][st.word], c.n, "{}", st.word);
            assert_eq!(c.href, format!("/?status={}", st.word));
        }
        assert_eq!(page.counts[0].status.as_ref().unwrap().word, "Failed", "worst first");
        assert_eq!(page.rows.len(), PER_PAGE);
        assert_eq!((page.pager.page, page.pager.pages), (1, 3));
        assert_eq!(page.pager.next.as_deref(), Some("/?page=2"));
        assert_eq!(page.pager.prev, None);
    }

    #[test]
    fn filter_search_sort_and_paging_compose() {
        let h = shared(250);
        let s = h.read();
        let q = ListQuery::parse(Some("drifted"), Some(" TENANT 1"), Some("name"), Some("9"), Some("10"));
        assert_eq!(q.status, Some(Status::Drifted));
        let page = list(&s, &q, now());
        assert!(page.rows.iter().all(|r| r.status.word == "Drifted" && r.name.starts_with("Tenant 1")));
        // Tenants 1..=199 starting with "1" that are drifted (i % 10 in {1, 2}).
        let expected = (0..250).filter(|i| i.to_string().starts_with('1') && matches!(i % 10, 1 | 2)).count();
        assert_eq!(page.pager.matched, expected.to_string());
        assert_eq!(page.pager.page, page.pager.pages, "a page past the end shows the last one");
        assert!(page.href.starts_with("/?status=Drifted&q=TENANT%201&sort=name"), "{}", page.href);
        // A search by id, another status, the sort by status.
        let page = list(&s, &ListQuery::parse(None, Some("t0012"), Some("status"), None, None), now());
        let ids: Vec<&str> = page.rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids.len(), 10);
        assert_eq!(ids[0], "t00120", "Failed first");
        assert_eq!(page.rows.last().unwrap().status.word, "Synced");
        // Nonsense parameters fall back to the defaults.
        let q = ListQuery::parse(Some("bogus"), None, Some("x"), Some("-1"), Some("100000"));
        assert_eq!((q.status, q.sort, q.page, q.per), (None, Sort::Id, 1, MAX_PER_PAGE));
        let none = list(&s, &ListQuery::parse(None, Some("zzz"), None, None, None), now());
        assert!(none.none_matched && none.rows.is_empty());
        assert_eq!(none.pager.from, "0");
    }

    #[test]
    fn sort_by_last_sync_puts_never_synced_first() {
        let h = shared(20);
        let s = h.read();
        let page = list(&s, &ListQuery::parse(None, None, Some("sync"), None, None), now());
        assert!(page.rows[0].last_sync.is_none());
        let synced: Vec<&Row> = page.rows.iter().filter(|r| r.last_sync.is_some()).collect();
        assert!(
            synced.windows(2).all(|w| w[0].last_sync.as_ref().unwrap().iso <= w[1].last_sync.as_ref().unwrap().iso)
        );
    }

    #[test]
    fn times_numbers_and_links() {
        let t = |s: i64| Timestamp::from_second(NOW - s).unwrap();
        assert_eq!(when(t(2), now()).ago, "just now");
        assert_eq!(when(t(42), now()).ago, "42 s ago");
        assert_eq!(when(t(3 * 60 + 5), now()).ago, "3 min ago");
        assert_eq!(when(t(5 * 3600), now()).ago, "5 h ago");
        assert_eq!(when(t(3 * 86_400), now()).ago, "3 d ago");
        assert_eq!(when(t(-30), now()).ago, "in 30 s");
        assert_eq!(when(t(0), now()).iso, "2027-01-15T08:00:00Z");
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(10_000), "10,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(encode("a b&c=d/é<"), "a%20b%26c%3Dd%2F%C3%A9%3C");
        assert_eq!(tenant_href("tenant-123"), "/tenants/tenant-123");
        assert_eq!(first_line("one\ntwo", 100), "one…");
        assert_eq!(first_line("abcdef", 3), "abc…");
        assert_eq!(first_line("abc", 3), "abc");
    }

    fn change(address: &str, action: Action, drift: bool, diff: &str) -> ChangeView {
        ChangeView {
            address: address.into(),
            action,
            drift,
            risk: Risk::Medium,
            reason: "live differs".into(),
            fields: Vec::new(),
            diff: diff.into(),
        }
    }

    #[test]
    fn a_tenant_page_has_its_resources_diff_and_drift() {
        let h = shared(3);
        {
            let mut s = h.write();
            let t = s.tenants.get_mut("t00001").unwrap();
            t.resources = vec!["isp.config".into(), "management.tenant".into(), "openbao.secret[db/password]".into()];
            t.drift = vec!["t00001/isp.config".into()];
            t.last_plan = Some(TenantPlan {
                plan_id: "plan-1".into(),
                revision: "0123456789abcdef0123".into(),
                at: now(),
                changes: vec![
                    change(
                        "t00001/isp.config",
                        Action::Update,
                        true,
                        "--- live\n+++ desired\n@@ -1 +1 @@\n-interval: 99\n+interval: 15\n",
                    ),
                    change("t00001/openbao.secret[db/password]", Action::Rotate, false, "(sensitive)\n"),
                    change("t00001/kubernetes.Deployment[old]", Action::Delete, false, ""),
                ],
                violations: Vec::new(),
            });
        }
        let s = h.read();
        assert!(tenant(&s, "nobody", Ok(Vec::new()), now()).is_none());
        let p = tenant(&s, "t00001", Err("the state store is not open yet".into()), now()).unwrap();
        let states: Vec<(&str, &str)> = p.resources.iter().map(|r| (r.address.as_str(), r.state)).collect();
        assert_eq!(
            states,
            [
                ("isp.config", "drifted"),
                ("management.tenant", "in sync"),
                ("openbao.secret[db/password]", "to rotate"),
                ("kubernetes.Deployment[old]", "to delete"),
            ]
        );
        assert_eq!(p.resources[2].provider, "openbao");
        let plan = p.plan_view.unwrap();
        let classes: Vec<&str> = plan.changes[0].lines.iter().map(|l| l.class).collect();
        assert_eq!(classes, ["meta", "meta", "hunk", "del", "add"]);
        assert_eq!(plan.changes[1].lines[0].text, "(sensitive)");
        assert_eq!(p.drift.len(), 1);
        assert_eq!(p.drift[0].risk, "medium");
        assert_eq!(p.audit_error.as_deref(), Some("the state store is not open yet"));
        assert_eq!(p.audit_href, "/audit?tenant=t00001");
        // Never checked: every resource says so.
        let p = tenant(&s, "t00002", Ok(Vec::new()), now()).unwrap();
        assert!(p.plan_view.is_none());
    }

    fn entry(id: i64, tenant: &str, outcome: &str) -> AuditEntry {
        AuditEntry {
            id,
            time: format!("2027-01-15T07:{:02}:00Z", id % 60).into(),
            correlation_id: "plan-1@abc".into(),
            actor: "dotmac-gitops-daemon".into(),
            tenant: tenant.into(),
            address: format!("{tenant}/isp.config"),
            action: "update".into(),
            risk: "medium".into(),
            outcome: outcome.to_owned().into(),
            before: None,
            after: None,
            message: None,
        }
    }

    #[test]
    fn the_audit_timeline_is_newest_first_and_pages_back() {
        let h = shared(1);
        let s = h.read();
        let f = AuditFilter::parse(Some("t1"), Some("update"), Some("bogus"), None, Some("24h"), None);
        assert_eq!((f.action.as_str(), f.outcome.as_str(), f.range.as_str()), ("update", "", "24h"));
        let q = f.query(now());
        assert_eq!(q.since.as_deref(), Some("2027-01-14T08:00:00Z"));
        assert!(q.newest && q.limit == Some(AUDIT_PAGE + 1));
        assert_eq!((q.tenants, q.action.as_deref(), q.outcome), (vec!["t1".to_owned()], Some("update"), None));
        let entries: Vec<AuditEntry> = (1..=(AUDIT_PAGE as i64 + 1)).map(|i| entry(i, "t1", "applied")).collect();
        let page = audit(&s, &f, Ok(entries), now());
        assert_eq!(page.rows.len(), AUDIT_PAGE);
        assert_eq!(page.rows[0].id, AUDIT_PAGE as i64 + 1, "newest first");
        assert_eq!(page.rows[0].address, "isp.config");
        assert_eq!(page.rows[0].plan, "plan-1");
        assert_eq!(page.older.as_deref(), Some("/audit?tenant=t1&action=update&range=24h&before=2"));
        assert!(page.newest.is_none());
        let f = AuditFilter::parse(None, None, None, None, None, Some("2"));
        let page = audit(&s, &f, Ok(vec![entry(1, "t1", "failed")]), now());
        assert_eq!(page.rows[0].outcome_class, "bad");
        assert_eq!((page.older, page.newest.as_deref()), (None, Some("/audit")));
        assert!(f.query(now()).since.is_some(), "a week by default");
        assert!(AuditFilter::parse(None, None, None, None, Some("all"), None).query(now()).since.is_none());
    }
}
