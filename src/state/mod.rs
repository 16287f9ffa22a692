//! The state store: the last-applied record of every resource, a serial that moves on every
//! apply, a lineage id, the audit log, a journal of in-flight writes, and the lock.
//!
//! The embedded default is SQLite under `.dotmac/state/` (`sqlite.rs`) with an OS file lock
//! (`lock.rs`); `[state] backend = "postgres"` shares one state between machines
//! (`postgres.rs`, with a session-level advisory lock). Secrets are recorded by version only;
//! their content is never stored.

pub mod lock;
pub mod postgres;
pub mod sqlite;

use crate::model::{Address, Content};
use crate::providers::TenantScope;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

pub type Result<T> = anyhow::Result<T>;

/// The identity and position of a state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMeta {
    /// Random id made when the state was created; a plan from another state is refused.
    pub lineage: String,
    /// Moves on every apply.
    pub serial: u64,
}

/// What was last applied to one resource: its fingerprint and the apply's serial (the
/// content applied, for the diff, is read on demand with [`StateStore::contents`]; a plan
/// of a million resources holds a million of these).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub address: Address,
    pub fingerprint: crate::fingerprint::Fingerprint,
    pub serial: u64,
}

impl Record {
    /// A record from a row's columns; `None` for an address this engine cannot read.
    pub fn from_row(address: &str, fingerprint: &str, serial: i64) -> Option<Record> {
        Some(Record { address: Address::parse(address)?, fingerprint: fingerprint.into(), serial: serial as u64 })
    }
}

/// One line of the audit log. Values in `before`/`after` are masked: secrets never appear.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    #[serde(default)]
    pub id: i64,
    /// `time`, `correlation_id`, `actor` and `tenant` are shared by the entries of an apply
    /// (of a tenant), not copied into each of 130,000.
    pub time: Arc<str>,
    /// The plan id and the repository revision: `plan-…@<commit>`.
    pub correlation_id: Arc<str>,
    pub actor: Arc<str>,
    pub tenant: Arc<str>,
    pub address: String,
    pub action: Cow<'static, str>,
    pub risk: Cow<'static, str>,
    /// applied | failed | rolled_back | rollback_failed | skipped
    pub outcome: Cow<'static, str>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub before: Option<JsonText>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub after: Option<JsonText>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
}

/// A JSON value kept as its text: an audit entry's `before` and `after`, made once where the
/// entry is made and stored as it is (a cold apply of 10,000 tenants makes 130,000 of them;
/// as `serde_json::Value`s they were a tenth of the committing thread's work, built, written
/// out and freed). Serialized as the value it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonText(String);

impl JsonText {
    pub fn of(v: &impl Serialize) -> JsonText {
        JsonText(serde_json::to_string(v).unwrap_or_else(|_| "null".into()))
    }

    /// `{"fingerprint": <fp>}`, what most entries hold: written straight to text.
    pub fn fingerprint(fp: &crate::fingerprint::Fingerprint) -> JsonText {
        #[derive(Serialize)]
        struct Only<'a> {
            fingerprint: &'a crate::fingerprint::Fingerprint,
        }
        JsonText::of(&Only { fingerprint: fp })
    }

    /// Text made as JSON by the caller (checked in debug builds).
    pub fn from_json(text: String) -> JsonText {
        debug_assert!(serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok(), "not JSON: {text}");
        JsonText(text)
    }

    /// Text a store kept: `None` unless it is JSON.
    pub fn parse(text: String) -> Option<JsonText> {
        serde_json::from_str::<serde::de::IgnoredAny>(&text).ok().map(|_| JsonText(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn value(&self) -> serde_json::Value {
        serde_json::from_str(&self.0).unwrap_or(serde_json::Value::Null)
    }
}

impl Serialize for JsonText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.value().serialize(s)
    }
}

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<JsonText, D::Error> {
        serde_json::Value::deserialize(d).map(|v| JsonText(v.to_string()))
    }
}

impl From<serde_json::Value> for JsonText {
    fn from(v: serde_json::Value) -> JsonText {
        JsonText(v.to_string())
    }
}

/// A write about to happen: recorded before the write, cleared with the state commit, so
/// that after a crash the next run knows what may have happened. An address may have one
/// entry per plan: an apply that dies while recovering from another leaves both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub address: String,
    /// `plan_id`, `action` and `started_at` are shared by an apply's entries (130,000 for
    /// 10,000 tenants), not copied into each.
    pub plan_id: Arc<str>,
    pub action: Cow<'static, str>,
    /// The fingerprint the resource will have once written (`None` for a delete).
    pub intended: Option<String>,
    pub started_at: Arc<str>,
}

/// One transaction: records to upsert and forget, audit entries, journal entries to clear.
#[derive(Debug, Default)]
pub struct Commit {
    pub upserts: Vec<Upsert>,
    pub forget: Vec<Address>,
    pub audit: Vec<AuditEntry>,
    /// Addresses whose journal entries (of every plan) are settled: their records say what is live.
    pub clear_journal: Vec<String>,
    /// (address, plan id): one plan's entries that did not happen or were undone; entries of
    /// other plans for the address stay.
    pub drop_journal: Vec<(String, String)>,
    /// Every journal entry is settled: the journal held none before this apply, whose writes
    /// all landed, so what it holds is this apply's alone. It is emptied in one statement
    /// instead of address by address (130,000 of them for 10,000 tenants).
    pub clear_whole_journal: bool,
}

impl Commit {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty()
            && self.forget.is_empty()
            && self.audit.is_empty()
            && self.clear_journal.is_empty()
            && self.drop_journal.is_empty()
            && !self.clear_whole_journal
    }
}

#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub tenants: Vec<String>,
    /// RFC 3339; entries at or after it.
    pub since: Option<String>,
    pub limit: Option<usize>,
    /// With `limit`: the latest entries rather than the first (still returned oldest first).
    pub newest: bool,
    /// Entries older than this id (a timeline's next page).
    pub before: Option<i64>,
    /// Only entries with this action (`create`, `update`, …), outcome (`applied`,
    /// `failed`, …) or actor.
    pub action: Option<String>,
    pub outcome: Option<String>,
    pub actor: Option<String>,
}

/// A held state lock: released when dropped, and by the operating system (or the database
/// session) if its holder dies.
pub trait StateLock: Send {}

impl StateLock for lock::LockGuard {}

/// A record to write: the address, the fingerprint live has, and the content as the store
/// keeps it (JSON text; none for secrets, whose versions are the record). The texts are
/// made where the record is, on the apply's worker threads, not by the one thread committing.
#[derive(Debug, Clone, PartialEq)]
pub struct Upsert {
    pub address: Address,
    pub content: Option<String>,
    /// `address` and the fingerprint as the stores write them.
    pub address_text: String,
    pub fingerprint_text: String,
}

impl Upsert {
    pub fn new(address: Address, fingerprint: crate::fingerprint::Fingerprint, content: Option<&Content>) -> Upsert {
        Upsert {
            address_text: address.text(),
            fingerprint_text: fingerprint.to_string(),
            address,
            content: content.and_then(content_to_text),
        }
    }
}

/// The content recorded for a resource: none for secrets (their versions are the record).
fn content_to_text(c: &Content) -> Option<String> {
    match c {
        Content::Secret(_) | Content::SecretMeta(_) => None,
        other => serde_json::to_string(other).ok(),
    }
}

pub trait StateStore: Send + Sync {
    /// Takes the state's lock for `holder` (a description naming who), waiting up to
    /// `timeout` (zero: fail at once, naming the current holder).
    fn lock(&self, holder: &str, timeout: std::time::Duration) -> Result<Box<dyn StateLock>>;
    /// Takes the daemons' leader lock, apart from the state lock (a leader holds it for its
    /// whole life while people still apply): the daemon replica holding it reconciles.
    /// Released like the state lock when its holder dies. A backend without one says so.
    fn leader_lock(&self, holder: &str, timeout: std::time::Duration) -> Result<Box<dyn StateLock>> {
        let _ = (holder, timeout);
        anyhow::bail!("this state backend has no leader lock; run one daemon replica with --leader-election none")
    }
    fn meta(&self) -> Result<StateMeta>;
    /// Records (without content) of the tenants in scope.
    fn records(&self, scope: &TenantScope) -> Result<Vec<Record>>;
    /// The tenants that have records.
    fn recorded_tenants(&self) -> Result<BTreeSet<String>>;
    /// The recorded content of these addresses (those that have one).
    fn contents(&self, addresses: &[Address]) -> Result<HashMap<Address, Content>>;
    /// Starts an apply: moves the serial and returns the new one.
    fn begin_apply(&self) -> Result<u64>;
    /// Applies one transaction at `serial`.
    fn commit(&self, serial: u64, commit: &Commit) -> Result<()> {
        self.commit_parts(serial, std::slice::from_ref(commit))
    }
    /// Applies `parts` in one transaction at `serial`, as [`commit`](Self::commit) would
    /// their concatenation: the apply commits a batch of tenants' results at a time, each as
    /// its worker made it (merged first, the batches' vectors were grown and copied on the
    /// thread the apply waits for).
    fn commit_parts(&self, serial: u64, parts: &[Commit]) -> Result<()>;
    fn journal_add(&self, entries: &[JournalEntry]) -> Result<()>;
    fn journal(&self) -> Result<Vec<JournalEntry>>;
    fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::Fingerprint;
    use serde_json::json;

    #[test]
    fn json_text_holds_the_text_serde_json_would_write() {
        for fp in [Fingerprint::sha256([7; 32]), Fingerprint::from("v3-deleted"), Fingerprint::from("a \"quoted\" ü")]
        {
            let made = JsonText::fingerprint(&fp);
            assert_eq!(made.as_str(), json!({ "fingerprint": fp }).to_string());
            assert_eq!(made.value(), json!({ "fingerprint": fp }));
        }
        // Serialized as the value, in its order; read back from any JSON value.
        let v = json!({"z": 1, "a": [1, 2], "ünï": "cødé"});
        let t = JsonText::from(v.clone());
        assert_eq!(serde_json::to_string(&t).unwrap(), v.to_string());
        assert_eq!(serde_json::from_value::<JsonText>(v).unwrap(), t);
        assert_eq!(JsonText::parse("{\"k\": 1}".into()).map(|t| t.value()), Some(json!({"k": 1})));
        assert_eq!(JsonText::parse("not json".into()), None);
    }
}
