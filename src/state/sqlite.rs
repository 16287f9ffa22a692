//! The embedded state store: one SQLite file (WAL, synchronous=FULL), versioned migrations.

use super::{AuditEntry, AuditQuery, Commit, JournalEntry, JsonText, Record, Result, StateMeta, StateStore};
use crate::model::{Address, Content};
use crate::providers::TenantScope;
use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Mutex;

pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// The folder of the database, where the lock file lives too.
    dir: std::path::PathBuf,
}

/// Schema migrations, applied in order; the user_version pragma says how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE resources (
        address TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        provider TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        content TEXT,
        applied_at TEXT NOT NULL,
        serial INTEGER NOT NULL);
     CREATE INDEX resources_by_tenant ON resources(tenant);
     CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time TEXT NOT NULL,
        correlation_id TEXT NOT NULL,
        actor TEXT NOT NULL,
        tenant TEXT NOT NULL,
        address TEXT NOT NULL,
        action TEXT NOT NULL,
        risk TEXT NOT NULL,
        outcome TEXT NOT NULL,
        before TEXT,
        after TEXT,
        message TEXT);
     CREATE INDEX audit_by_tenant_time ON audit(tenant, time);
     CREATE INDEX audit_by_time ON audit(time);
     CREATE TABLE journal (
        address TEXT PRIMARY KEY,
        plan_id TEXT NOT NULL,
        action TEXT NOT NULL,
        intended TEXT,
        started_at TEXT NOT NULL);",
    // 2: one journal entry per address and plan, so that an apply recovering from a killed
    // one does not overwrite what the killed one was doing
    "CREATE TABLE journal2 (
        address TEXT NOT NULL,
        plan_id TEXT NOT NULL,
        action TEXT NOT NULL,
        intended TEXT,
        started_at TEXT NOT NULL,
        PRIMARY KEY (address, plan_id));
     INSERT INTO journal2 SELECT address, plan_id, action, intended, started_at FROM journal;
     DROP TABLE journal;
     ALTER TABLE journal2 RENAME TO journal;",
    // 3: the journal keyed by its primary key alone (WITHOUT ROWID): an apply of 10,000
    // tenants writes and clears 130,000 entries, each now in one B-tree instead of a table
    // and its key's index
    "CREATE TABLE journal3 (
        address TEXT NOT NULL,
        plan_id TEXT NOT NULL,
        action TEXT NOT NULL,
        intended TEXT,
        started_at TEXT NOT NULL,
        PRIMARY KEY (address, plan_id)) WITHOUT ROWID;
     INSERT INTO journal3 SELECT address, plan_id, action, intended, started_at FROM journal;
     DROP TABLE journal;
     ALTER TABLE journal3 RENAME TO journal;",
    // 4: fewer B-trees written per record and audit entry (an apply of 10,000 tenants writes
    // 130,000 of each; committing them was the apply's longest serial part): a tenant's
    // records are found by the address prefix `tenant/` instead of an index on the tenant,
    // the tenants that have records are kept one row each, and audit entries are no longer
    // indexed by time (they are appended in time order and read in id order)
    "CREATE TABLE tenants (tenant TEXT PRIMARY KEY) WITHOUT ROWID;
     INSERT INTO tenants SELECT DISTINCT tenant FROM resources;
     DROP INDEX resources_by_tenant;
     DROP INDEX audit_by_time;",
    // 5: one B-tree fewer per record, one table fewer per audit entry. A record lives in a
    // table keyed by its address (WITHOUT ROWID) instead of a rowid table plus an index on
    // the address. Audit ids are the rowid without AUTOINCREMENT, which updated the
    // `sqlite_sequence` row at every insert; entries are never deleted, so each new id is
    // still one past the largest. (In a model of a 10,000-tenant apply with Python's
    // sqlite3, the two took committing 260,000 rows from 0.75 to 0.67 s of CPU.)
    "CREATE TABLE resources5 (
        address TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        provider TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        content TEXT,
        applied_at TEXT NOT NULL,
        serial INTEGER NOT NULL) WITHOUT ROWID;
     INSERT INTO resources5 SELECT address, tenant, provider, fingerprint, content, applied_at, serial FROM resources;
     DROP TABLE resources;
     ALTER TABLE resources5 RENAME TO resources;
     CREATE TABLE audit5 (
        id INTEGER PRIMARY KEY,
        time TEXT NOT NULL,
        correlation_id TEXT NOT NULL,
        actor TEXT NOT NULL,
        tenant TEXT NOT NULL,
        address TEXT NOT NULL,
        action TEXT NOT NULL,
        risk TEXT NOT NULL,
        outcome TEXT NOT NULL,
        before TEXT,
        after TEXT,
        message TEXT);
     INSERT INTO audit5 SELECT id, time, correlation_id, actor, tenant, address, action, risk, outcome, before, after, message
       FROM audit ORDER BY id;
     DROP TABLE audit;
     ALTER TABLE audit5 RENAME TO audit;
     CREATE INDEX audit_by_tenant_time ON audit(tenant, time);",
    // 6: the journal keeps one row per tenant and plan, its entries a JSON array of
    // `[address, action, intended, started_at]`. An apply of 10,000 tenants journals 130,000
    // writes before its first one is durable, on the thread that then commits the records:
    // as rows, about 0.2 s before its first batch (in a model, 0.26 s of SQLite's CPU against
    // 0.05 s for 10,000 rows; callgrind at 1,000 tenants, 93 against 49 M instructions).
    "CREATE TABLE journal6 (
        tenant TEXT NOT NULL,
        plan_id TEXT NOT NULL,
        entries TEXT NOT NULL,
        PRIMARY KEY (tenant, plan_id)) WITHOUT ROWID;
     INSERT INTO journal6
       SELECT substr(address, 1, instr(address, '/') - 1), plan_id,
              json_group_array(json_array(address, action, intended, started_at))
       FROM (SELECT * FROM journal ORDER BY address)
       GROUP BY 1, 2;
     DROP TABLE journal;
     ALTER TABLE journal6 RENAME TO journal;",
];

/// A text parameter bound only when it is not the very text (same place, same length) the
/// previous row bound: SQLite keeps a statement's bindings from one execution to the next,
/// and binding copies the text. Rows of a commit share some texts (`Arc<str>`s of an apply
/// or a tenant), so equal content at another place is simply bound again.
#[derive(Default)]
struct Sticky<'a>(Option<&'a str>);

impl<'a> Sticky<'a> {
    fn bind(&mut self, st: &mut rusqlite::Statement<'_>, index: usize, v: &'a str) -> rusqlite::Result<()> {
        if self.0.is_some_and(|last| std::ptr::eq(last, v)) {
            return Ok(());
        }
        st.raw_bind_parameter(index, v)?;
        self.0 = Some(v);
        Ok(())
    }
}

/// A journal entry as a row keeps it: `[address, action, intended, started_at]`.
type JournalLine = (String, String, Option<String>, String);

/// A journal entry's line, as written.
fn journal_line(e: &JournalEntry) -> (&str, &str, Option<&str>, &str) {
    (&e.address, &e.action, e.intended.as_deref(), &e.started_at)
}

/// The tenant of an address (`tenant/…`).
fn tenant_of(address: &str) -> &str {
    address.as_bytes().iter().position(|&b| b == b'/').map_or(address, |i| &address[..i])
}

/// A journal row's entries, read back.
fn journal_lines(text: &str) -> rusqlite::Result<Vec<JournalLine>> {
    serde_json::from_str(text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into()))
}

/// A row of `SELECT plan_id, entries FROM journal …`: the plan and its entries.
fn journal_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, Vec<JournalLine>)> {
    Ok((r.get(0)?, journal_lines(r.get_ref(1)?.as_str()?)?))
}

/// The bounds of a tenant's addresses, `tenant/` included to `tenant0` excluded: every
/// address is `tenant/…` (a tenant id holds no `/`), and `0` is the byte after `/`.
fn tenant_range(tenant: &str) -> (String, String) {
    (format!("{tenant}/"), format!("{tenant}0"))
}

/// Takes entries out of the journal: every plan's of the addresses in `clear`, and one plan's
/// of an address in `dropped`. A row left with none is deleted.
fn settle_journal(
    tx: &rusqlite::Transaction<'_>,
    clear: BTreeSet<&str>,
    dropped: BTreeSet<(&str, &str)>,
) -> Result<()> {
    let tenants: BTreeSet<&str> = clear.iter().copied().chain(dropped.iter().map(|(a, _)| *a)).map(tenant_of).collect();
    let mut read = tx.prepare_cached("SELECT plan_id, entries FROM journal WHERE tenant = ?1")?;
    let mut write = tx.prepare_cached("UPDATE journal SET entries = ?3 WHERE tenant = ?1 AND plan_id = ?2")?;
    let mut delete = tx.prepare_cached("DELETE FROM journal WHERE tenant = ?1 AND plan_id = ?2")?;
    for tenant in tenants {
        let rows = read.query_map(params![tenant], journal_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        for (plan, lines) in rows {
            let before = lines.len();
            let kept: Vec<JournalLine> = lines
                .into_iter()
                .filter(|(a, ..)| !clear.contains(a.as_str()) && !dropped.contains(&(a.as_str(), plan.as_str())))
                .collect();
            if kept.is_empty() {
                delete.execute(params![tenant, plan])?;
            } else if kept.len() != before {
                write.execute(params![tenant, plan, serde_json::to_string(&kept)?])?;
            }
        }
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating and migrating) the store in `dir/state.db`.
    pub fn open(dir: &Path) -> Result<SqliteStore> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("state.db");
        let mut conn = Self::connect(&path)?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version as usize > MIGRATIONS.len() {
            anyhow::bail!(
                "{} was written by a newer dotmac-gitops (schema {version}, this one knows {}); upgrade",
                path.display(),
                MIGRATIONS.len()
            );
        }
        // The migrations due and a new state's lineage are one transaction: a new file is
        // made with one commit, one sync of the log instead of one per migration (opening a
        // new store, medians of 15 runs of `audit`: 56.9 -> 51.7 ms), and an upgrade cut
        // short leaves the file as it was.
        let tx = conn.transaction()?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(sql).with_context(|| format!("migration {} failed", i + 1))?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        }
        let has_lineage: Option<String> =
            tx.query_row("SELECT value FROM meta WHERE key = 'lineage'", [], |r| r.get(0)).optional()?;
        if has_lineage.is_none() {
            let mut b = [0u8; 16];
            getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
            let lineage = crate::providers::local::hex(&b);
            tx.execute("INSERT INTO meta(key, value) VALUES ('lineage', ?1), ('serial', '0')", params![lineage])?;
        }
        tx.commit()?;
        Ok(SqliteStore { conn: Mutex::new(conn), dir: dir.to_path_buf() })
    }

    /// The store in `dir` only if it exists and is of this build's schema, changing nothing
    /// (no file made, no migration): for reading beside a command's own `open`, which does
    /// whatever is due.
    pub fn open_current(dir: &Path) -> Result<Option<SqliteStore>> {
        let path = dir.join("state.db");
        if !path.is_file() {
            return Ok(None);
        }
        let conn = Self::connect(&path)?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        Ok((version as usize == MIGRATIONS.len())
            .then(|| SqliteStore { conn: Mutex::new(conn), dir: dir.to_path_buf() }))
    }

    /// A connection to `path` with the store's settings.
    fn connect(path: &Path) -> Result<Connection> {
        let conn = Connection::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        // For a new file only (an existing one keeps its size): 32 KiB pages. An apply of
        // 10,000 tenants writes 130,000 records, as many audit entries and journal entries,
        // and with the default 4 KiB pages SQLite spent a quarter of its time splitting and
        // checkpointing pages; 32 KiB took journaling from 0.20 to 0.14 s and recording
        // from about 1.25 to 1.05 s.
        conn.pragma_update(None, "page_size", 32768)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // The log is folded into the database file by SQLite's automatic checkpoints as writes
        // go on (every 1,000 pages), not again when the process closes the file: after an
        // apply of 10,000 tenants that last checkpoint copied and synced up to 32 MB, 0.1 s
        // the command waited for. What the log holds is as durable and is read through it.
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
        Ok(conn)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every record, in one read transaction. SQLite's scan and the building of the records
    /// (addresses parsed, fingerprints decoded, a million allocations) take about as long
    /// as each other, so they run side by side: this thread builds what a second one reads,
    /// passed over in batches of rows copied into one buffer.
    fn all_records(&self) -> Result<Vec<Record>> {
        const ROWS: usize = 4096;
        /// Rows of text: each row's address and fingerprint end at the offsets given.
        #[derive(Default)]
        struct Batch {
            text: String,
            rows: Vec<(usize, usize, i64)>,
        }
        // Sized once: doubling a vector of 100,000s of records copies it and leaves the old
        // copies behind. (A hint: the scan below is a statement, and a snapshot, of its own.)
        let n: i64 = self.conn().query_row("SELECT count(*) FROM resources", [], |r| r.get(0))?;
        let mut out = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
        let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Batch>(4);
        let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Batch>();
        std::thread::scope(|s| {
            let reader = s.spawn(move || -> Result<()> {
                let conn = self.conn();
                let mut st = conn.prepare("SELECT address, fingerprint, serial FROM resources")?;
                let mut rows = st.query([])?;
                let mut batch = Batch::default();
                while let Some(row) = rows.next()? {
                    batch.text.push_str(row.get_ref(0)?.as_str()?);
                    let address_end = batch.text.len();
                    batch.text.push_str(row.get_ref(1)?.as_str()?);
                    batch.rows.push((address_end, batch.text.len(), row.get(2)?));
                    if batch.rows.len() == ROWS {
                        let next = empty_rx.try_recv().unwrap_or_default();
                        if full_tx.send(std::mem::replace(&mut batch, next)).is_err() {
                            break;
                        }
                    }
                }
                let _ = full_tx.send(batch);
                Ok(())
            });
            for mut batch in full_rx {
                let mut start = 0;
                for &(address_end, end, serial) in &batch.rows {
                    out.extend(Record::from_row(
                        &batch.text[start..address_end],
                        &batch.text[address_end..end],
                        serial,
                    ));
                    start = end;
                }
                batch.text.clear();
                batch.rows.clear();
                let _ = empty_tx.send(batch);
            }
            reader.join().unwrap_or_else(|_| Err(anyhow::anyhow!("reading the state store failed")))?;
            Ok(out)
        })
    }
}

impl StateStore for SqliteStore {
    fn lock(&self, holder: &str, timeout: std::time::Duration) -> Result<Box<dyn super::StateLock>> {
        Ok(Box::new(super::lock::acquire(&self.dir.join("lock"), holder, timeout)?))
    }

    fn leader_lock(&self, holder: &str, timeout: std::time::Duration) -> Result<Box<dyn super::StateLock>> {
        Ok(Box::new(super::lock::acquire_as(&self.dir.join("leader.lock"), holder, timeout, "another daemon leads")?))
    }

    fn meta(&self) -> Result<StateMeta> {
        let conn = self.conn();
        let get = |k: &str| -> Result<String> {
            Ok(conn.query_row("SELECT value FROM meta WHERE key = ?1", params![k], |r| r.get::<_, String>(0))?)
        };
        Ok(StateMeta { lineage: get("lineage")?, serial: get("serial")?.parse()? })
    }

    fn records(&self, scope: &TenantScope) -> Result<Vec<Record>> {
        match scope {
            TenantScope::All => self.all_records(),
            TenantScope::Only(tenants) => {
                let conn = self.conn();
                let mut out = Vec::new();
                let mut st = conn.prepare(
                    "SELECT address, fingerprint, serial FROM resources WHERE address >= ?1 AND address < ?2",
                )?;
                for t in tenants {
                    let (from, to) = tenant_range(t);
                    let mut rows = st.query(params![from, to])?;
                    while let Some(row) = rows.next()? {
                        out.extend(Record::from_row(row.get_ref(0)?.as_str()?, row.get_ref(1)?.as_str()?, row.get(2)?));
                    }
                }
                Ok(out)
            }
        }
    }

    fn recorded_tenants(&self) -> Result<BTreeSet<String>> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT tenant FROM tenants")?;
        let tenants = st.query_map([], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<_>>()?;
        Ok(tenants)
    }

    fn contents(&self, addresses: &[Address]) -> Result<HashMap<Address, Content>> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT content FROM resources WHERE address = ?1 AND content IS NOT NULL")?;
        let mut out = HashMap::new();
        for a in addresses {
            let text: Option<String> = st.query_row(params![a.to_string()], |r| r.get(0)).optional()?;
            if let Some(t) = text
                && let Ok(c) = serde_json::from_str::<Content>(&t)
            {
                out.insert(a.clone(), c);
            }
        }
        Ok(out)
    }

    fn begin_apply(&self) -> Result<u64> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let serial: String = tx.query_row("SELECT value FROM meta WHERE key = 'serial'", [], |r| r.get(0))?;
        let next = serial.parse::<u64>()? + 1;
        tx.execute("UPDATE meta SET value = ?1 WHERE key = 'serial'", params![next.to_string()])?;
        tx.commit()?;
        Ok(next)
    }

    fn commit_parts(&self, serial: u64, parts: &[Commit]) -> Result<()> {
        if parts.iter().all(Commit::is_empty) {
            return Ok(());
        }
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let now = jiff::Timestamp::now().to_string();
            let mut up = tx.prepare_cached(
                "INSERT INTO resources(address, tenant, provider, fingerprint, content, applied_at, serial)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(address) DO UPDATE SET fingerprint = excluded.fingerprint, content = excluded.content,
                    applied_at = excluded.applied_at, serial = excluded.serial",
            )?;
            let mut known = tx.prepare_cached("INSERT OR IGNORE INTO tenants(tenant) VALUES (?1)")?;
            let mut last: Option<&str> = None;
            // The time and serial are the transaction's, bound once; a tenant's name and a
            // provider's once per run of rows that share them.
            up.raw_bind_parameter(6, &now)?;
            up.raw_bind_parameter(7, serial as i64)?;
            let (mut tenant_bound, mut provider_bound) = (Sticky::default(), Sticky::default());
            for u in parts.iter().flat_map(|c| &c.upserts) {
                let tenant = u.address.tenant.as_str();
                up.raw_bind_parameter(1, &u.address_text)?;
                tenant_bound.bind(&mut up, 2, tenant)?;
                provider_bound.bind(&mut up, 3, u.address.provider().as_str())?;
                up.raw_bind_parameter(4, &u.fingerprint_text)?;
                up.raw_bind_parameter(5, &u.content)?;
                up.raw_execute()?;
                // A tenant's records come one after another: one row each.
                if last != Some(tenant) {
                    known.execute(params![tenant])?;
                    last = Some(tenant);
                }
            }
            let mut del = tx.prepare_cached("DELETE FROM resources WHERE address = ?1")?;
            let mut emptied = BTreeSet::new();
            for a in parts.iter().flat_map(|c| &c.forget) {
                del.execute(params![a.text()])?;
                emptied.insert(a.tenant.as_str());
            }
            let mut gone = tx.prepare_cached(
                "DELETE FROM tenants WHERE tenant = ?1
                   AND NOT EXISTS (SELECT 1 FROM resources WHERE address >= ?2 AND address < ?3)",
            )?;
            for t in emptied {
                let (from, to) = tenant_range(t);
                gone.execute(params![t, from, to])?;
            }
            let mut au = tx.prepare_cached(
                "INSERT INTO audit(time, correlation_id, actor, tenant, address, action, risk, outcome, before, after, message)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?;
            // An apply's entries share their time, correlation id and actor, and a tenant's
            // its name (one text each, not copies): bound again only where the text changes.
            let mut shared: [Sticky<'_>; 4] = Default::default();
            for e in parts.iter().flat_map(|c| &c.audit) {
                for (i, (bound, v)) in
                    shared.iter_mut().zip([&e.time, &e.correlation_id, &e.actor, &e.tenant]).enumerate()
                {
                    bound.bind(&mut au, i + 1, v)?;
                }
                au.raw_bind_parameter(5, &e.address)?;
                au.raw_bind_parameter(6, e.action.as_ref())?;
                au.raw_bind_parameter(7, e.risk.as_ref())?;
                au.raw_bind_parameter(8, e.outcome.as_ref())?;
                au.raw_bind_parameter(9, e.before.as_ref().map(JsonText::as_str))?;
                au.raw_bind_parameter(10, e.after.as_ref().map(JsonText::as_str))?;
                au.raw_bind_parameter(11, &e.message)?;
                au.raw_execute()?;
            }
            if parts.iter().any(|c| c.clear_whole_journal) {
                tx.execute("DELETE FROM journal", [])?;
            } else {
                let clear: BTreeSet<&str> = parts.iter().flat_map(|c| &c.clear_journal).map(String::as_str).collect();
                let dropped: BTreeSet<(&str, &str)> =
                    parts.iter().flat_map(|c| &c.drop_journal).map(|(a, p)| (a.as_str(), p.as_str())).collect();
                if !clear.is_empty() || !dropped.is_empty() {
                    settle_journal(&tx, clear, dropped)?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn journal_add(&self, entries: &[JournalEntry]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            // Rows of these plans already there are merged with (an apply of a saved plan
            // started again); otherwise, the usual case, there is nothing to read.
            let mut has_plan = tx.prepare_cached("SELECT EXISTS (SELECT 1 FROM journal WHERE plan_id = ?1)")?;
            let mut known: BTreeSet<&str> = BTreeSet::new();
            for plan in entries.iter().map(|e| &*e.plan_id).collect::<BTreeSet<_>>() {
                if has_plan.query_row(params![plan], |r| r.get::<_, bool>(0))? {
                    known.insert(plan);
                }
            }
            let mut read = tx.prepare_cached("SELECT entries FROM journal WHERE tenant = ?1 AND plan_id = ?2")?;
            let mut write =
                tx.prepare_cached("INSERT OR REPLACE INTO journal(tenant, plan_id, entries) VALUES (?1, ?2, ?3)")?;
            let mut written: BTreeSet<(&str, &str)> = BTreeSet::new();
            // A run of entries of one tenant and plan is a row (an apply gives each tenant's
            // entries one after another, in address order).
            for run in entries.chunk_by(|a, b| tenant_of(&a.address) == tenant_of(&b.address) && a.plan_id == b.plan_id)
            {
                let key = (tenant_of(&run[0].address), &*run[0].plan_id);
                let old: Vec<JournalLine> = if known.contains(key.1) || written.contains(&key) {
                    match read.query_row(params![key.0, key.1], |r| r.get::<_, String>(0)).optional()? {
                        Some(t) => journal_lines(&t)?,
                        None => Vec::new(),
                    }
                } else {
                    Vec::new()
                };
                let text = if old.is_empty() && run.windows(2).all(|w| w[0].address < w[1].address) {
                    serde_json::to_string(&run.iter().map(journal_line).collect::<Vec<_>>())?
                } else {
                    // Merged by address: a later entry replaces an earlier one.
                    let mut lines: BTreeMap<&str, (&str, &str, Option<&str>, &str)> = BTreeMap::new();
                    for (a, action, intended, at) in &old {
                        lines.insert(a, (a, action, intended.as_deref(), at));
                    }
                    for e in run {
                        lines.insert(&e.address, journal_line(e));
                    }
                    serde_json::to_string(&lines.into_values().collect::<Vec<_>>())?
                };
                write.execute(params![key.0, key.1, text])?;
                written.insert(key);
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn journal(&self) -> Result<Vec<JournalEntry>> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT plan_id, entries FROM journal")?;
        let rows = st.query_map([], journal_row)?;
        let mut out = Vec::new();
        for row in rows {
            let (plan_id, lines) = row?;
            let plan_id: std::sync::Arc<str> = plan_id.into();
            out.extend(lines.into_iter().map(|(address, action, intended, started_at)| JournalEntry {
                address,
                plan_id: std::sync::Arc::clone(&plan_id),
                action: action.into(),
                intended,
                started_at: started_at.into(),
            }));
        }
        out.sort_by(|a, b| (&a.address, &a.started_at, &a.plan_id).cmp(&(&b.address, &b.started_at, &b.plan_id)));
        Ok(out)
    }

    fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>> {
        let conn = self.conn();
        let mut sql = String::from(
            "SELECT id, time, correlation_id, actor, tenant, address, action, risk, outcome, before, after, message
             FROM audit WHERE time >= ?1
               AND (?2 = '[]' OR tenant IN (SELECT value FROM json_each(?2)))
               AND (?3 IS NULL OR id < ?3) AND (?4 IS NULL OR action = ?4)
               AND (?5 IS NULL OR outcome = ?5) AND (?6 IS NULL OR actor = ?6)",
        );
        sql.push_str(if q.newest { " ORDER BY id DESC" } else { " ORDER BY id" });
        if let Some(l) = q.limit {
            sql.push_str(&format!(" LIMIT {l}"));
        }
        let mut st = conn.prepare(&sql)?;
        let tenants = serde_json::to_string(&q.tenants)?;
        let args = params![q.since.clone().unwrap_or_default(), tenants, q.before, q.action, q.outcome, q.actor];
        let rows = st.query_map(args, |r| {
            let json = |i: usize| -> rusqlite::Result<Option<JsonText>> {
                Ok(r.get::<_, Option<String>>(i)?.and_then(JsonText::parse))
            };
            Ok(AuditEntry {
                id: r.get(0)?,
                time: r.get(1)?,
                correlation_id: r.get(2)?,
                actor: r.get(3)?,
                tenant: r.get(4)?,
                address: r.get(5)?,
                action: r.get::<_, String>(6)?.into(),
                risk: r.get::<_, String>(7)?.into(),
                outcome: r.get::<_, String>(8)?.into(),
                before: json(9)?,
                after: json(10)?,
                message: r.get(11)?,
            })
        })?;
        let mut entries = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        if q.newest {
            entries.reverse();
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Upsert;
    use serde_json::json;

    /// A state file in `dir` as a store of schema `version` left it, to be filled by the test.
    fn store_of_schema(dir: &Path, version: usize) -> Connection {
        let conn = Connection::open(dir.join("state.db")).unwrap();
        for sql in &MIGRATIONS[..version] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", version as i64).unwrap();
        conn
    }

    /// The read beside a command's own `open` changes nothing: no file where there is
    /// none, no migration of an older schema; a current store is read.
    #[test]
    fn a_store_opened_as_current_is_never_made_or_migrated() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("none");
        assert!(SqliteStore::open_current(&missing).unwrap().is_none());
        assert!(!missing.exists());
        drop(store_of_schema(d.path(), 5));
        assert!(SqliteStore::open_current(d.path()).unwrap().is_none());
        let version: i64 = Connection::open(d.path().join("state.db"))
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, 5);
        let store = SqliteStore::open(d.path()).unwrap();
        let a = Address::parse("t1/isp.config").unwrap();
        store
            .commit(1, &Commit { upserts: vec![Upsert::new(a, "sha256:1".into(), None)], ..Commit::default() })
            .unwrap();
        let current = SqliteStore::open_current(d.path()).unwrap().expect("a store of this schema");
        assert_eq!(current.records(&TenantScope::All).unwrap().len(), 1);
    }

    #[test]
    fn a_store_of_an_older_schema_is_migrated_and_keeps_its_journal() {
        let d = tempfile::tempdir().unwrap();
        {
            let conn = store_of_schema(d.path(), 2);
            conn.execute_batch(
                "INSERT INTO journal VALUES ('t1/isp.config', 'plan-1', 'create', 'sha256:ab', '2026-11-22T00:00:00Z');
                 INSERT INTO journal VALUES ('t1/isp.config', 'plan-2', 'update', 'sha256:cd', '2026-11-22T00:01:00Z');
                 INSERT INTO journal VALUES ('t1/management.tenant', 'plan-1', 'delete', NULL, '2026-11-22T00:00:00Z');
                 INSERT INTO journal VALUES ('t2/isp.config', 'plan-1', 'create', 'sha256:ef', '2026-11-22T00:00:00Z');",
            )
            .unwrap();
        }
        let s = SqliteStore::open(d.path()).unwrap();
        let version: i64 = s.conn().pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version as usize, MIGRATIONS.len());
        let page: i64 = s.conn().pragma_query_value(None, "page_size", |r| r.get(0)).unwrap();
        assert_eq!(page, 4096, "an existing file keeps its page size");
        // Every entry is kept (schema 6 groups them by tenant and plan), the missing intended
        // fingerprint of a delete too.
        let j: Vec<String> = s
            .journal()
            .unwrap()
            .iter()
            .map(|j| format!("{} {} {} {:?} {}", j.address, j.plan_id, j.action, j.intended, j.started_at))
            .collect();
        assert_eq!(
            j,
            [
                "t1/isp.config plan-1 create Some(\"sha256:ab\") 2026-11-22T00:00:00Z",
                "t1/isp.config plan-2 update Some(\"sha256:cd\") 2026-11-22T00:01:00Z",
                "t1/management.tenant plan-1 delete None 2026-11-22T00:00:00Z",
                "t2/isp.config plan-1 create Some(\"sha256:ef\") 2026-11-22T00:00:00Z",
            ]
        );
        let rows: i64 = s.conn().query_row("SELECT count(*) FROM journal", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 3, "one row per tenant and plan");
    }

    #[test]
    fn a_new_store_has_large_pages() {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(d.path()).unwrap();
        let page: i64 = s.conn().pragma_query_value(None, "page_size", |r| r.get(0)).unwrap();
        assert_eq!(page, 32768);
        drop(s);
        let page: i64 =
            SqliteStore::open(d.path()).unwrap().conn().pragma_query_value(None, "page_size", |r| r.get(0)).unwrap();
        assert_eq!(page, 32768, "and keeps them when opened again");
    }

    #[test]
    fn the_journal_replaces_clears_and_drops_entries_one_by_one() {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(d.path()).unwrap();
        let e = |address: &str, plan: &str, intended: Option<&str>, at: &str| JournalEntry {
            address: address.into(),
            plan_id: plan.into(),
            action: "create".into(),
            intended: intended.map(str::to_owned),
            started_at: at.into(),
        };
        let seen = |s: &SqliteStore| -> Vec<String> {
            s.journal().unwrap().iter().map(|j| format!("{} {} {:?}", j.address, j.plan_id, j.intended)).collect()
        };
        s.journal_add(&[
            e("t1/isp.config", "p1", Some("sha256:a"), "1"),
            e("t1/management.tenant", "p1", None, "1"),
            e("t2/isp.config", "p1", Some("x"), "1"),
        ])
        .unwrap();
        // The same address and plan again replaces the entry; another plan adds one.
        s.journal_add(&[
            e("t1/isp.config", "p1", Some("sha256:b"), "2"),
            e("t1/isp.config", "p2", Some("sha256:c"), "3"),
        ])
        .unwrap();
        assert_eq!(
            seen(&s),
            [
                "t1/isp.config p1 Some(\"sha256:b\")",
                "t1/isp.config p2 Some(\"sha256:c\")",
                "t1/management.tenant p1 None",
                "t2/isp.config p1 Some(\"x\")",
            ]
        );
        // Dropped: one plan's entry of an address. Cleared: every plan's of another.
        s.commit(
            0,
            &Commit {
                drop_journal: vec![("t1/isp.config".into(), "p2".into())],
                clear_journal: vec!["t2/isp.config".into()],
                ..Commit::default()
            },
        )
        .unwrap();
        assert_eq!(seen(&s), ["t1/isp.config p1 Some(\"sha256:b\")", "t1/management.tenant p1 None"]);
        s.commit(
            0,
            &Commit { clear_journal: vec!["t1/isp.config".into(), "t1/management.tenant".into()], ..Commit::default() },
        )
        .unwrap();
        assert!(s.journal().unwrap().is_empty());
        // One call whose entries of a tenant and plan are not all together, nor in order.
        s.journal_add(&[
            e("t1/management.tenant", "p3", None, "4"),
            e("t2/isp.config", "p3", None, "4"),
            e("t1/isp.config", "p3", None, "4"),
            e("t1/management.tenant", "p3", Some("sha256:d"), "5"),
        ])
        .unwrap();
        assert_eq!(
            seen(&s),
            ["t1/isp.config p3 None", "t1/management.tenant p3 Some(\"sha256:d\")", "t2/isp.config p3 None"]
        );
    }

    #[test]
    fn records_commit_and_survive_reopening() {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(d.path()).unwrap();
        let m0 = s.meta().unwrap();
        assert_eq!(m0.serial, 0);
        let serial = s.begin_apply().unwrap();
        let a = Address::parse("t1/management.tenant").unwrap();
        let b = Address::parse("t1/openbao.secret[x]").unwrap();
        s.commit(
            serial,
            &Commit {
                upserts: vec![
                    Upsert::new(a.clone(), "sha256:1".into(), Some(&Content::Json(json!({"k": 1})))),
                    Upsert::new(b.clone(), "v1".into(), None),
                ],
                audit: vec![AuditEntry {
                    id: 0,
                    time: "2026-01-01T00:00:00Z".into(),
                    correlation_id: "c".into(),
                    actor: "me".into(),
                    tenant: "t1".into(),
                    address: a.to_string(),
                    action: "create".into(),
                    risk: "low".into(),
                    outcome: "applied".into(),
                    before: None,
                    after: Some(json!({"k": 1}).into()),
                    message: None,
                }],
                ..Commit::default()
            },
        )
        .unwrap();
        drop(s);
        let wal = std::fs::metadata(d.path().join("state.db-wal")).map(|m| m.len()).unwrap_or(0);
        assert!(wal > 0, "closing the store leaves the log to the next automatic checkpoint");
        let s = SqliteStore::open(d.path()).unwrap();
        let m = s.meta().unwrap();
        assert_eq!((m.lineage.clone(), m.serial), (m0.lineage, 1));
        let recs = s.records(&TenantScope::All).unwrap();
        assert_eq!(recs.len(), 2);
        let c = s.contents(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(c.get(&a), Some(&Content::Json(json!({"k": 1}))));
        assert!(!c.contains_key(&b));
        let audit = s.audit(&AuditQuery { tenants: vec!["t1".into()], ..Default::default() }).unwrap();
        assert_eq!(audit.len(), 1);
        assert!(s.audit(&AuditQuery { tenants: vec!["t2".into()], ..Default::default() }).unwrap().is_empty());
    }

    /// Tenants whose ids share a prefix (`t1`, `t1-b`, `t10`): each one's records and no other's.
    #[test]
    fn a_tenant_s_records_are_its_own_and_a_tenant_without_records_is_forgotten() {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(d.path()).unwrap();
        let addr = |t: &str| Address::parse(&format!("{t}/management.tenant")).unwrap();
        let secret = Address::parse("t1/openbao.secret[x]").unwrap();
        let ids = ["t1", "t1-b", "t10", "t0"];
        let mut upserts: Vec<Upsert> = ids.iter().map(|t| Upsert::new(addr(t), "sha256:1".into(), None)).collect();
        upserts.push(Upsert::new(secret.clone(), "v1".into(), None));
        s.commit(s.begin_apply().unwrap(), &Commit { upserts, ..Commit::default() }).unwrap();
        assert_eq!(s.recorded_tenants().unwrap(), ids.iter().map(|t| t.to_string()).collect());
        let only = |t: &str| -> Vec<String> {
            let mut v: Vec<String> = s
                .records(&TenantScope::Only([t.to_string()].into_iter().collect()))
                .unwrap()
                .into_iter()
                .map(|r| r.address.to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(only("t1"), ["t1/management.tenant", "t1/openbao.secret[x]"]);
        assert_eq!(only("t10"), ["t10/management.tenant"]);
        assert!(only("t2").is_empty());

        // One of t1's two records forgotten: t1 still has records. t10's only one: it has none.
        let forget = vec![addr("t1"), addr("t10")];
        s.commit(s.begin_apply().unwrap(), &Commit { forget, ..Commit::default() }).unwrap();
        assert_eq!(s.recorded_tenants().unwrap(), ["t0", "t1", "t1-b"].iter().map(|t| t.to_string()).collect());
        assert_eq!(only("t1"), ["t1/openbao.secret[x]"]);
    }

    #[test]
    fn a_store_of_schema_4_keeps_its_records_and_audit_ids() {
        let d = tempfile::tempdir().unwrap();
        {
            let conn = store_of_schema(d.path(), 4);
            conn.execute_batch(
                "INSERT INTO resources VALUES
                    ('t1/isp.config', 't1', 'isp', 'sha256:a', '{\"type\":\"text\",\"value\":\"x\"}', '2026-01-01T00:00:00Z', 1);
                 INSERT INTO tenants VALUES ('t1');
                 INSERT INTO audit(id, time, correlation_id, actor, tenant, address, action, risk, outcome, before, after, message)
                    VALUES (7, '2026-01-01T00:00:00Z', 'c', 'me', 't1', 't1/isp.config', 'create', 'low', 'applied', NULL, '{\"k\":1}', NULL);",
            )
            .unwrap();
        }
        let s = SqliteStore::open(d.path()).unwrap();
        let a = Address::parse("t1/isp.config").unwrap();
        assert_eq!(s.contents(std::slice::from_ref(&a)).unwrap().get(&a), Some(&Content::Text("x".into())));
        let entry = |id: i64| AuditEntry {
            id,
            time: "2026-01-02T00:00:00Z".into(),
            correlation_id: "c2".into(),
            actor: "me".into(),
            tenant: "t1".into(),
            address: a.to_string(),
            action: "update".into(),
            risk: "low".into(),
            outcome: "applied".into(),
            before: None,
            after: None,
            message: None,
        };
        s.commit(s.begin_apply().unwrap(), &Commit { audit: vec![entry(0)], ..Commit::default() }).unwrap();
        let ids: Vec<i64> = s.audit(&AuditQuery::default()).unwrap().iter().map(|e| e.id).collect();
        assert_eq!(ids, [7, 8], "the old entry keeps its id and the next one follows it");
        let sql: String = s
            .conn()
            .query_row(
                "SELECT group_concat(sql, ';') FROM sqlite_master WHERE name IN ('resources', 'audit')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(sql.contains("WITHOUT ROWID") && !sql.contains("AUTOINCREMENT"), "{sql}");
    }

    #[test]
    fn a_store_of_schema_3_keeps_its_records_and_knows_their_tenants() {
        let d = tempfile::tempdir().unwrap();
        {
            let conn = store_of_schema(d.path(), 3);
            conn.execute_batch(
                "INSERT INTO resources VALUES
                    ('t1/isp.config', 't1', 'isp', 'sha256:a', '{\"type\":\"text\",\"value\":\"x\"}', '2026-01-01T00:00:00Z', 1),
                    ('t2/management.tenant', 't2', 'management', 'sha256:b', NULL, '2026-01-01T00:00:00Z', 1);",
            )
            .unwrap();
        }
        let s = SqliteStore::open(d.path()).unwrap();
        assert_eq!(s.recorded_tenants().unwrap(), ["t1", "t2"].iter().map(|t| t.to_string()).collect());
        assert_eq!(s.records(&TenantScope::All).unwrap().len(), 2);
        let a = Address::parse("t1/isp.config").unwrap();
        assert_eq!(s.contents(std::slice::from_ref(&a)).unwrap().get(&a), Some(&Content::Text("x".into())));
        let indexes: Vec<String> = s
            .conn()
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_autoindex%' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(indexes, ["audit_by_tenant_time"], "two indexes fewer to write");
    }
}
