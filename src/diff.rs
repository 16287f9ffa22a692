//! The three-way diff: desired (rendered) × live (providers) × last-applied (state) -> one
//! change per resource. Pure and synchronous: no I/O, no clock (the time comes in).
//!
//! | desired | live | last-applied | result |
//! | --- | --- | --- | --- |
//! | yes | no | no | create |
//! | yes | no | yes | create, drift (deleted out of band) |
//! | yes | = desired | any | noop (the record is refreshed if it differs) |
//! | yes | ≠ desired | = live | update (an intended change) |
//! | yes | ≠ desired | ≠ live or none | update, drift (changed out of band) |
//! | no | yes | yes | delete |
//! | no | no | yes | noop (already gone; the record is dropped) |
//! | no | yes | no | not ours: left alone |
//!
//! Secrets compare by version, never by value: a generated secret that is missing is
//! created, one older than its rotation interval is rotated; an external one that is
//! missing or old is reported as a violation.

use crate::load::yaml;
use crate::model::{Address, Content, DesiredEntry, ResourceKind, SecretSource, SecretSpec};
use crate::providers::LiveResource;
use crate::state::Record;
use crate::validate::checks::is_credential_key;
use crate::yamlfmt;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Create,
    Update,
    Rotate,
    Delete,
    Noop,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Rotate => "rotate",
            Action::Delete => "delete",
            Action::Noop => "noop",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Risk {
    Low,
    Medium,
    High,
    Critical,
}

impl Risk {
    pub fn as_str(self) -> &'static str {
        match self {
            Risk::Low => "low",
            Risk::Medium => "medium",
            Risk::High => "high",
            Risk::Critical => "critical",
        }
    }
}

/// One changed field of a structured resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldChange {
    pub pointer: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub before: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub after: Option<Value>,
}

/// What should happen to one resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub address: Address,
    pub action: Action,
    /// Live differs from what was last applied: someone changed it out of band.
    pub drift: bool,
    pub risk: Risk,
    /// One line for people: why this change.
    pub reason: String,
    /// What apply writes (none for deletes).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub desired: Option<Arc<Content>>,
    /// The fingerprint `desired` has once written (not for secrets: their versions are the
    /// store's to number).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub desired_fingerprint: Option<crate::fingerprint::Fingerprint>,
    /// The live fingerprint the plan saw; apply refuses if it moved.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub live_fingerprint: Option<crate::fingerprint::Fingerprint>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_fingerprint: Option<crate::fingerprint::Fingerprint>,
    /// The live content the plan saw (for display; apply re-reads before writing).
    #[serde(skip)]
    pub before: Option<Content>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldChange>,
    /// A unified diff for people; secrets appear as `(sensitive)`.
    #[serde(default)]
    pub diff: String,
    /// A noop that still updates the state record (live already equals desired).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refresh: bool,
}

impl Change {
    /// The unified diff for people: `diff`, or for a creation planned without one, the whole
    /// desired content as added lines.
    pub fn diff_text(&self) -> std::borrow::Cow<'_, str> {
        match (&self.desired, self.action) {
            (Some(d), Action::Create) if self.diff.is_empty() => unified(&self.address, None, Some(d)).into(),
            _ => self.diff.as_str().into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// A finding that is not a change: a missing or old external secret, a rotation overdue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub tenant: String,
    pub rule: String,
    pub severity: Severity,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub address: Option<String>,
}

/// How the plan treats secrets it cannot create.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Write a random development placeholder for a missing external secret (local only).
    pub dev_placeholders: bool,
    /// How to tell a person to create a missing external secret, given tenant and name.
    pub external_hint: Option<Hint>,
}

/// Tells a person how to create a missing external secret in the configured store, given
/// tenant and name (the store's settings, such as a mount, are captured inside).
#[derive(Clone)]
pub struct Hint(pub std::sync::Arc<dyn Fn(&str, &str) -> String + Send + Sync>);

impl Hint {
    pub fn new(f: impl Fn(&str, &str) -> String + Send + Sync + 'static) -> Hint {
        Hint(std::sync::Arc::new(f))
    }
    pub fn for_secret(&self, tenant: &str, name: &str) -> String {
        (self.0)(tenant, name)
    }
}

impl std::fmt::Debug for Hint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hint(..)")
    }
}

/// The three-way diff of one resource. `None` when nothing is to be done or shown.
pub fn diff(
    address: &Address,
    desired: Option<&DesiredEntry>,
    live: Option<&LiveResource>,
    last: Option<&Record>,
    now: Timestamp,
    opts: &Options,
) -> (Option<Change>, Option<Violation>) {
    if let Some(Some(Content::Secret(spec))) = desired.map(|d| d.content.as_deref()) {
        return diff_secret(address, spec, live, last, now, opts);
    }
    let live_fp = live.map(|l| &l.fingerprint);
    let last_fp = last.map(|l| &l.fingerprint);
    let change = |action, drift, reason: String| Change {
        address: address.clone(),
        action,
        drift,
        risk: Risk::Low,
        reason,
        desired: None,
        desired_fingerprint: None,
        live_fingerprint: live_fp.cloned(),
        last_fingerprint: last_fp.cloned(),
        before: live.and_then(|l| l.content.as_deref().cloned()),
        fields: Vec::new(),
        diff: String::new(),
        refresh: false,
    };
    let mut c = match (desired, live) {
        (None, None) => {
            if last.is_none() {
                return (None, None);
            }
            let mut c = change(Action::Noop, true, "already gone; its record is dropped".into());
            c.refresh = true;
            c
        }
        (None, Some(l)) => {
            if last.is_none() {
                return (None, None); // not managed by us
            }
            let drift = last_fp != Some(&l.fingerprint);
            change(Action::Delete, drift, "no longer in the repository".into())
        }
        (Some(d), None) => {
            let mut c = if last.is_some() {
                change(Action::Create, true, "deleted out of band; it is created again".into())
            } else {
                change(Action::Create, false, "new".into())
            };
            c.desired = d.content.clone();
            c.desired_fingerprint = Some(d.fingerprint.clone());
            c
        }
        (Some(d), Some(l)) => {
            let desired_fp = &d.fingerprint;
            if *desired_fp == l.fingerprint {
                if last_fp == Some(desired_fp) {
                    return (None, None);
                }
                // Live already is what we want; only the record is behind.
                let mut c = change(Action::Noop, false, "already as desired; the record is updated".into());
                c.refresh = true;
                c.desired = d.content.clone();
                c.desired_fingerprint = Some(d.fingerprint.clone());
                c
            } else {
                let mut c = match last_fp {
                    Some(f) if *f == l.fingerprint => change(Action::Update, false, "changed in the repository".into()),
                    Some(_) => {
                        change(Action::Update, true, "changed out of band; the repository's version is restored".into())
                    }
                    None => change(
                        Action::Update,
                        false,
                        "exists but was not applied by this engine; it is taken over".into(),
                    ),
                };
                c.desired = d.content.clone();
                c.desired_fingerprint = Some(d.fingerprint.clone());
                c
            }
        }
    };
    if c.action != Action::Noop || c.drift {
        let before = c.before.as_ref();
        let after = c.desired.as_deref();
        // A creation's fields are all of `after`; only what moves is worth listing.
        if c.action == Action::Update {
            c.fields = fields(before, after);
        }
        // A creation's diff is all of `after`: it is written out when shown (`diff_text`),
        // not kept in every plan (all of a first apply's contents, a second time).
        if !(c.action == Action::Create && before.is_none()) {
            c.diff = unified(address, before, after);
        }
        c.risk = risk(address, c.action, &c.fields, before, after);
    }
    (Some(c), None)
}

/// The rule of a development placeholder standing in for an external secret.
pub const PLACEHOLDER_RULE: &str = "external-secret-placeholder";

/// One external secret that a development placeholder stands in for. Every tenant has
/// several and a plan of 100,000 tenants has half a million, so this is not the warning
/// shown: the plan merges a tenant's into one warning, which names them and gives the
/// advice. Its message is the secret's name.
fn placeholder(tenant: &str, name: &str) -> Violation {
    Violation {
        tenant: tenant.to_owned(),
        rule: PLACEHOLDER_RULE.to_owned(),
        severity: Severity::Warning,
        message: name.to_owned(),
        address: None,
    }
}

fn diff_secret(
    address: &Address,
    spec: &SecretSpec,
    live: Option<&LiveResource>,
    last: Option<&Record>,
    now: Timestamp,
    opts: &Options,
) -> (Option<Change>, Option<Violation>) {
    let tenant = address.tenant.as_str();
    let name = spec.name.as_str();
    // Borrowed: most secrets are unchanged, and nothing is copied for them.
    let meta = live.and_then(|l| match l.content.as_deref() {
        Some(Content::SecretMeta(m)) => Some(m),
        _ => None,
    });
    let present = meta.is_some_and(|m| !m.deleted);
    let last_fp = last.map(|l| &l.fingerprint);
    let live_fp = live.map(|l| &l.fingerprint);
    // Out of band: the version moved past (or away from) the one last applied.
    let drift = matches!((last_fp, live_fp), (Some(a), Some(b)) if a != b) || (last_fp.is_some() && !present);
    // The age only matters to a rotation interval.
    let age_days = meta
        .filter(|_| spec.rotation_days.is_some())
        .and_then(|m| m.updated.parse::<Timestamp>().ok())
        .map(|t| (now.as_second() - t.as_second()) / 86_400);
    let overdue = matches!((spec.rotation_days, age_days), (Some(d), Some(a)) if a > i64::from(d));
    let make = |action: Action, risk: Risk, reason: String| {
        let before = meta.map(|m| format!("(sensitive) version {}, written {}", m.version, m.updated));
        let after = match action {
            Action::Noop => before.clone(),
            Action::Delete => None,
            _ => Some("(sensitive) a new version".to_owned()),
        };
        let diff = secret_diff(address, before.as_deref(), after.as_deref());
        Change {
            address: address.clone(),
            action,
            drift,
            risk,
            reason,
            desired: (action != Action::Delete).then(|| Arc::new(Content::Secret(spec.clone()))),
            desired_fingerprint: None,
            live_fingerprint: live_fp.cloned(),
            last_fingerprint: last_fp.cloned(),
            before: live.and_then(|l| l.content.as_deref().cloned()),
            fields: Vec::new(),
            diff,
            refresh: action == Action::Noop,
        }
    };
    let violation = |rule: &str, severity: Severity, message: String| Violation {
        tenant: tenant.to_owned(),
        rule: rule.to_owned(),
        severity,
        message,
        address: Some(address.to_string()),
    };
    match (&spec.source, present) {
        (SecretSource::Generated { .. }, false) => {
            let reason =
                if drift { "deleted out of band; a new value is generated" } else { "generated on first apply" };
            (Some(make(Action::Create, Risk::High, reason.into())), None)
        }
        (SecretSource::Generated { .. }, true) => {
            if overdue && spec.auto_rotation {
                let days = age_days.unwrap_or_default();
                let reason =
                    format!("{days} days old, over its rotation interval of {} days", spec.rotation_days.unwrap_or(0));
                return (Some(make(Action::Rotate, Risk::High, reason)), None);
            }
            let v = overdue.then(|| {
                violation(
                    "rotation-overdue",
                    Severity::Warning,
                    format!(
                        "tenant {tenant}: generated secret `{name}` is {} days old, over its rotation interval of {} days, and auto_rotation is off; run `dotmac-gitops rotate --tenant {tenant} --secret {name}`",
                        age_days.unwrap_or_default(),
                        spec.rotation_days.unwrap_or(0)
                    ),
                )
            });
            if drift || last_fp.is_none() {
                let reason = if drift {
                    "a new version was written out of band; it is adopted"
                } else {
                    "already present; recorded"
                };
                return (Some(make(Action::Noop, Risk::High, reason.into())), v);
            }
            (None, v)
        }
        (SecretSource::External, false) => {
            let hint = opts.external_hint.as_ref().map(|h| h.for_secret(tenant, name)).unwrap_or_default();
            if opts.dev_placeholders {
                let c = make(
                    Action::Create,
                    Risk::High,
                    "external secret missing: a random development placeholder is written (dev_placeholders)".into(),
                );
                return (Some(c), Some(placeholder(tenant, name)));
            }
            let what = if drift { "was deleted out of band" } else { "is missing" };
            (
                None,
                Some(violation(
                    "external-secret-missing",
                    Severity::Error,
                    format!("tenant {tenant}: external secret `{name}` {what}. {hint}"),
                )),
            )
        }
        (SecretSource::External, true) => {
            if meta.as_ref().is_some_and(|m| m.placeholder) {
                let c = (drift || last_fp.is_none())
                    .then(|| make(Action::Noop, Risk::High, "placeholder present; recorded".into()));
                return (c, Some(placeholder(tenant, name)));
            }
            let v = overdue.then(|| {
                violation(
                    "external-secret-age",
                    Severity::Warning,
                    format!(
                        "tenant {tenant}: external secret `{name}` is {} days old, over its rotation interval of {} days (a compliance finding: rotate it at the source)",
                        age_days.unwrap_or_default(),
                        spec.rotation_days.unwrap_or(0)
                    ),
                )
            });
            if drift || last_fp.is_none() {
                let reason = if drift {
                    "changed out of band (a person's new version); reported, not overwritten"
                } else {
                    "present; recorded"
                };
                return (Some(make(Action::Noop, Risk::High, reason.into())), v);
            }
            (None, v)
        }
    }
}

fn secret_diff(address: &Address, before: Option<&str>, after: Option<&str>) -> String {
    if before == after {
        return String::new();
    }
    let mut out = format!("--- {address}\n+++ {address}\n");
    if let Some(b) = before {
        out.push_str(&format!("-{b}\n"));
    }
    if let Some(a) = after {
        out.push_str(&format!("+{a}\n"));
    }
    out
}

/// The text people read for a content.
pub fn text_of(c: &Content) -> String {
    match c {
        Content::Text(t) => t.clone(),
        Content::Json(v) => yamlfmt::to_yaml(v),
        Content::Secret(_) | Content::SecretMeta(_) => "(sensitive)\n".to_owned(),
    }
}

/// A unified diff of two contents.
pub fn unified(address: &Address, before: Option<&Content>, after: Option<&Content>) -> String {
    let b = before.map(text_of).unwrap_or_default();
    let a = after.map(text_of).unwrap_or_default();
    if a == b {
        return String::new();
    }
    let name = address.to_string();
    if b.is_empty() || a.is_empty() {
        return whole(&name, &b, &a);
    }
    similar::TextDiff::from_lines(&b, &a)
        .unified_diff()
        .context_radius(3)
        .header(&name, &name)
        .missing_newline_hint(false)
        .to_string()
}

/// The unified diff of a creation or a deletion: every line added or removed. The same text
/// `similar` makes, without the line-matching work (a cold plan is all creations).
fn whole(name: &str, before: &str, after: &str) -> String {
    let (text, sign) = if before.is_empty() { (after, '+') } else { (before, '-') };
    let n = text.split_inclusive('\n').count();
    let range = if n == 1 { "1".to_owned() } else { format!("1,{n}") };
    let hunk = if sign == '+' { format!("@@ -0,0 +{range} @@") } else { format!("@@ -{range} +0,0 @@") };
    let mut out = String::with_capacity(text.len() + n + name.len() * 2 + 32);
    out.push_str(&format!("--- {name}\n+++ {name}\n{hunk}\n"));
    for line in text.split_inclusive('\n') {
        out.push(sign);
        out.push_str(line);
        if !line.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// The structured value of a content, for field comparisons (YAML text is read as YAML).
fn structured(c: &Content) -> Option<Value> {
    match c {
        Content::Json(v) => Some(v.clone()),
        Content::Text(t) => yaml::parse_documents(t).ok().and_then(|mut d| (d.len() == 1).then(|| d.remove(0).value)),
        _ => None,
    }
}

/// The changed leaves of two contents, as JSON pointers.
pub fn fields(before: Option<&Content>, after: Option<&Content>) -> Vec<FieldChange> {
    let b = before.and_then(structured);
    let a = after.and_then(structured);
    let mut out = Vec::new();
    if b.is_none() && a.is_none() {
        return out;
    }
    walk("", b.as_ref(), a.as_ref(), &mut out);
    out
}

fn walk(ptr: &str, b: Option<&Value>, a: Option<&Value>, out: &mut Vec<FieldChange>) {
    match (b, a) {
        (Some(Value::Object(bm)), Some(Value::Object(am))) => {
            for (k, bv) in bm {
                walk(&format!("{ptr}/{}", escape(k)), Some(bv), am.get(k), out);
            }
            for (k, av) in am {
                if !bm.contains_key(k) {
                    walk(&format!("{ptr}/{}", escape(k)), None, Some(av), out);
                }
            }
        }
        (Some(x), Some(y)) if x == y => {}
        (None, None) => {}
        (b, a) => out.push(FieldChange { pointer: ptr.to_owned(), before: b.cloned(), after: a.cloned() }),
    }
}

fn escape(k: &str) -> String {
    k.replace('~', "~0").replace('/', "~1")
}

/// Risk, as the configuration-schema seed assigns it: low for ordinary settings, medium for
/// endpoints and integrations, high for credentials and secrets, critical for deletions and
/// a tenant's suspension or cancellation.
pub fn risk(
    address: &Address,
    action: Action,
    fields: &[FieldChange],
    _before: Option<&Content>,
    after: Option<&Content>,
) -> Risk {
    if action == Action::Delete {
        return Risk::Critical;
    }
    match &address.kind {
        ResourceKind::OpenbaoSecret | ResourceKind::OpenbaoPolicy => return Risk::High,
        ResourceKind::ManagementTenant => {
            let suspends = fields.iter().any(|f| {
                f.pointer == "/status"
                    && matches!(f.after.as_ref().and_then(Value::as_str), Some("suspended" | "cancelled"))
            });
            if suspends && action == Action::Update {
                return Risk::Critical;
            }
        }
        _ => {}
    }
    if action == Action::Create {
        let _ = after;
        return Risk::Low;
    }
    fields.iter().map(field_risk).max().unwrap_or(Risk::Low)
}

fn field_risk(f: &FieldChange) -> Risk {
    let last = f.pointer.rsplit('/').next().unwrap_or_default().replace("~1", "/").replace("~0", "~");
    let has_ref = |v: &Option<Value>| v.as_ref().is_some_and(|v| v.to_string().contains("${SECRET:"));
    if is_credential_key(&last) || has_ref(&f.before) || has_ref(&f.after) {
        return Risk::High;
    }
    let p = f.pointer.to_ascii_lowercase();
    if ["webhook", "endpoint", "url", "integrations", "gateway", "billing", "domain"].iter().any(|w| p.contains(w)) {
        return Risk::Medium;
    }
    Risk::Low
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_file_diffs_are_the_ones_similar_makes() {
        let similar_of = |b: &str, a: &str| {
            similar::TextDiff::from_lines(b, a)
                .unified_diff()
                .context_radius(3)
                .header("x", "x")
                .missing_newline_hint(false)
                .to_string()
        };
        for text in ["one\n", "one", "one\ntwo\n", "one\n\nthree", "a\nb\nc\nd\ne\nf\ng\nh\n", "\n\n"] {
            assert_eq!(whole("x", "", text), similar_of("", text), "create {text:?}");
            assert_eq!(whole("x", text, ""), similar_of(text, ""), "delete {text:?}");
        }
    }
    use crate::model::{Charset, SecretMeta};
    use serde_json::json;

    fn addr(s: &str) -> Address {
        Address::parse(s).unwrap()
    }
    fn res(a: &str, v: Value) -> DesiredEntry {
        DesiredEntry::rendered(crate::model::Resource {
            fingerprint: None,
            address: addr(a),
            content: Content::Json(v).into(),
        })
    }
    fn live(r: &DesiredEntry) -> LiveResource {
        LiveResource {
            address: r.address.clone(),
            fingerprint: r.fingerprint.clone(),
            content: r.content.as_deref().cloned().map(Box::new),
        }
    }
    fn record(l: &LiveResource) -> Record {
        Record { address: l.address.clone(), fingerprint: l.fingerprint.clone(), serial: 1 }
    }
    fn now() -> Timestamp {
        "2026-11-22T00:00:00Z".parse().unwrap()
    }
    const A: &str = "t1/management.tenant";

    #[test]
    fn a_creation_keeps_no_diff_and_shows_all_of_its_content_when_asked() {
        let d = res(A, json!({"name": "T", "status": "active"}));
        let (c, _) = diff(&addr(A), Some(&d), None, None, now(), &Options::default());
        let c = c.unwrap();
        assert_eq!((c.action, c.diff.as_str()), (Action::Create, ""));
        let shown = c.diff_text();
        assert_eq!(shown, unified(&addr(A), None, d.content.as_deref()));
        assert!(shown.contains("+name: T\n+status: active\n"), "{shown}");
        assert_eq!(crate::plan::change_json(&c)["diff"], json!(shown));
    }

    #[test]
    fn the_table() {
        let o = Options::default();
        let d = res(A, json!({"name": "T", "status": "active"}));
        let old = res(A, json!({"name": "Old", "status": "active"}));
        let a = addr(A);
        // create
        let (c, _) = diff(&a, Some(&d), None, None, now(), &o);
        assert_eq!((c.as_ref().unwrap().action, c.unwrap().drift), (Action::Create, false));
        // deleted out of band
        let (c, _) = diff(&a, Some(&d), None, Some(&record(&live(&d))), now(), &o);
        assert_eq!((c.as_ref().unwrap().action, c.unwrap().drift), (Action::Create, true));
        // in sync
        assert!(diff(&a, Some(&d), Some(&live(&d)), Some(&record(&live(&d))), now(), &o).0.is_none());
        // intended change
        let (c, _) = diff(&a, Some(&d), Some(&live(&old)), Some(&record(&live(&old))), now(), &o);
        let c = c.unwrap();
        assert_eq!((c.action, c.drift, c.risk), (Action::Update, false, Risk::Low));
        assert_eq!(
            c.fields,
            vec![FieldChange { pointer: "/name".into(), before: Some(json!("Old")), after: Some(json!("T")) }]
        );
        assert!(c.diff.contains("-name: Old\n+name: T\n"), "{}", c.diff);
        // drift healed
        let (c, _) = diff(&a, Some(&d), Some(&live(&old)), Some(&record(&live(&d))), now(), &o);
        assert_eq!((c.as_ref().unwrap().action, c.unwrap().drift), (Action::Update, true));
        // delete, critical
        let (c, _) = diff(&a, None, Some(&live(&d)), Some(&record(&live(&d))), now(), &o);
        assert_eq!((c.as_ref().unwrap().action, c.unwrap().risk), (Action::Delete, Risk::Critical));
        // unmanaged: left alone
        assert!(diff(&a, None, Some(&live(&d)), None, now(), &o).0.is_none());
        // suspension is critical
        let s = res(A, json!({"name": "T", "status": "suspended"}));
        let (c, _) = diff(&a, Some(&s), Some(&live(&d)), Some(&record(&live(&d))), now(), &o);
        assert_eq!(c.unwrap().risk, Risk::Critical);
    }

    #[test]
    fn secrets_rotate_by_age_and_never_show_values() {
        let a = addr("t1/openbao.secret[db]");
        let spec = SecretSpec {
            name: "db".into(),
            source: SecretSource::Generated { length: 32, charset: Charset::Alphanumeric },
            rotation_days: Some(30),
            auto_rotation: true,
        };
        let d = DesiredEntry::rendered(crate::model::Resource {
            fingerprint: None,
            address: a.clone(),
            content: Content::Secret(spec.clone()).into(),
        });
        let meta = |updated: &str| LiveResource {
            address: a.clone(),
            fingerprint: "v2".into(),
            content: Some(Box::new(Content::SecretMeta(SecretMeta {
                version: 2,
                updated: updated.into(),
                created: updated.into(),
                deleted: false,
                placeholder: false,
            }))),
        };
        let fresh = meta("2026-11-01T00:00:00Z");
        let old = meta("2026-09-01T00:00:00Z");
        let o = Options::default();
        assert!(diff(&a, Some(&d), Some(&fresh), Some(&record(&fresh)), now(), &o).0.is_none());
        let (c, _) = diff(&a, Some(&d), Some(&old), Some(&record(&old)), now(), &o);
        let c = c.unwrap();
        assert_eq!((c.action, c.risk), (Action::Rotate, Risk::High));
        assert!(c.diff.contains("(sensitive)"));
        // an external secret that is missing is an error violation naming it
        let ext = DesiredEntry::rendered(crate::model::Resource {
            fingerprint: None,
            address: a.clone(),
            content: Content::Secret(SecretSpec { source: SecretSource::External, ..spec }).into(),
        });
        let (c, v) = diff(&a, Some(&ext), None, None, now(), &o);
        assert!(c.is_none());
        let v = v.unwrap();
        assert_eq!((v.severity, v.rule.as_str()), (Severity::Error, "external-secret-missing"));
        assert!(v.message.contains("`db`"));
    }
}
