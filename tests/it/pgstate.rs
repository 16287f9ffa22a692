//! The shared state backend (`[state] backend = "postgres"`) against a real PostgreSQL
//! (`pg.rs`): the store behaves like the embedded one, migrations run once, the example
//! repository plans, applies and re-plans empty, two machines share records and the audit log,
//! the advisory lock names its holder, waits, and dies with a `kill -9`ed holder, and the
//! password never shows.

use crate::pg::Pg;
use crate::util::*;
use dotmac_gitops::model::{Address, Content, SecretMeta};
use dotmac_gitops::providers::TenantScope;
use dotmac_gitops::state::postgres::PgStore;
use dotmac_gitops::state::sqlite::SqliteStore;
use dotmac_gitops::state::{AuditEntry, AuditQuery, Commit, JournalEntry, StateStore, Upsert};
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The variable the tests' `dotmac.toml` names in `url_env`.
const URL_ENV: &str = "DOTMAC_TEST_STATE_URL";

/// Every output of the binary, checked for the password on the way.
fn dm(repo: &Path, pg: &Pg, url: &str, args: &[&str], extra: &[(&str, &str)]) -> Output {
    let mut env = vec![(URL_ENV, url), ("DOTMAC_LOG", "debug")];
    env.extend_from_slice(extra);
    let out = run_env(args, repo, &env);
    assert_no_password(pg, &format!("{}{}", out.stdout, out.stderr));
    out
}

fn assert_no_password(pg: &Pg, text: &str) {
    assert!(!text.contains(&pg.password), "the password leaked:\n{text}");
}

/// A copy of the example repository whose state is in PostgreSQL, its URL in `$URL_ENV`.
fn pg_repo() -> tempfile::TempDir {
    let repo = example_repo();
    let toml = repo.path().join("dotmac.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    let from = "backend = \"local\"             # an embedded SQLite file under .dotmac/state/";
    assert!(text.contains(from));
    std::fs::write(&toml, text.replace(from, &format!("backend = \"postgres\"\nurl_env = \"{URL_ENV}\""))).unwrap();
    repo
}

fn audit_json(repo: &Path, pg: &Pg, url: &str, extra: &[(&str, &str)]) -> Value {
    let out = dm(repo, pg, url, &["audit", "--format", "json"], extra);
    assert_eq!(out.code, 0, "{}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

fn entries(audit: &Value) -> &Vec<Value> {
    audit["entries"].as_array().unwrap_or_else(|| panic!("no entries in {audit}"))
}

fn entry(time: &str, tenant: &str, address: &str, outcome: &str) -> AuditEntry {
    AuditEntry {
        id: 0,
        time: time.into(),
        correlation_id: "plan-1@abc".into(),
        actor: "tester".into(),
        tenant: tenant.into(),
        address: address.into(),
        action: "create".into(),
        risk: "low".into(),
        outcome: outcome.to_owned().into(),
        before: None,
        after: Some(json!({"z": 1, "a": [1, 2], "ünï": "cødé"}).into()),
        message: Some("it's \"quoted\"".into()),
    }
}

/// One scenario through the `StateStore` trait; returns what it saw (without the lineage,
/// times and ids, which differ between stores), for comparing the two stores.
fn exercise(s: &dyn StateStore) -> Vec<String> {
    let mut seen = Vec::new();
    let m0 = s.meta().unwrap();
    assert_eq!(m0.serial, 0);
    assert_eq!(m0.lineage.len(), 32);
    let a = Address::parse("t1/management.tenant").unwrap();
    let b = Address::parse("t1/openbao.secret[db]").unwrap();
    let c = Address::parse("t2/isp.config").unwrap();
    let serial = s.begin_apply().unwrap();
    assert_eq!(serial, 1);
    let journal = |addr: &Address, intended: Option<&str>| JournalEntry {
        address: addr.to_string(),
        plan_id: "plan-1".into(),
        action: "create".into(),
        intended: intended.map(str::to_owned),
        started_at: "2026-01-01T00:00:00Z".into(),
    };
    s.journal_add(&[journal(&a, Some("sha256:1")), journal(&b, None), journal(&c, Some("sha256:3"))]).unwrap();
    seen.push(format!("journal {:?}", s.journal().unwrap()));
    let meta = SecretMeta {
        version: 3,
        updated: "2026-01-01T00:00:00Z".into(),
        created: "2026-01-01T00:00:00Z".into(),
        deleted: false,
        placeholder: false,
    };
    s.commit(
        serial,
        &Commit {
            upserts: vec![
                Upsert::new(a.clone(), "sha256:0".into(), Some(&Content::Text("first".into()))),
                Upsert::new(
                    a.clone(),
                    "sha256:1".into(),
                    Some(&Content::Json(json!({"k": 1, "name": "Ünïcode \u{0}"}))),
                ),
                Upsert::new(b.clone(), "v3".into(), Some(&Content::SecretMeta(meta))),
                Upsert::new(c.clone(), "sha256:3".into(), Some(&Content::Text("plan: gold\n".into()))),
            ],
            audit: vec![
                entry("2026-01-01T00:00:00Z", "t1", &a.to_string(), "applied"),
                entry("2026-01-02T00:00:00Z", "t2", &c.to_string(), "failed"),
                entry("2026-01-03T00:00:00Z", "t1", &b.to_string(), "applied"),
            ],
            clear_journal: vec![a.to_string(), c.to_string()],
            ..Commit::default()
        },
    )
    .unwrap();
    seen.push(format!("journal {:?}", s.journal().unwrap()));
    // b journaled again by the same plan (replacing its entry) and by a second one; then the
    // second plan's entry dropped.
    let again = JournalEntry { started_at: "2026-01-01T00:00:01Z".into(), ..journal(&b, Some("sha256:2")) };
    let other = JournalEntry {
        plan_id: "plan-2".into(),
        started_at: "2026-01-01T00:00:02Z".into(),
        ..journal(&b, Some("sha256:9"))
    };
    s.journal_add(&[again, other]).unwrap();
    seen.push(format!("journal {:?}", s.journal().unwrap()));
    s.commit(serial, &Commit { drop_journal: vec![(b.to_string(), "plan-2".into())], ..Commit::default() }).unwrap();
    seen.push(format!("journal {:?}", s.journal().unwrap()));
    let fingerprints = |scope: &TenantScope| {
        let mut v: Vec<String> = s
            .records(scope)
            .unwrap()
            .into_iter()
            .map(|r| format!("{} {} serial {}", r.address, r.fingerprint, r.serial))
            .collect();
        v.sort();
        v
    };
    seen.push(format!("all {:?}", fingerprints(&TenantScope::All)));
    seen.push(format!("t2 {:?}", fingerprints(&TenantScope::Only(["t2".to_owned()].into()))));
    seen.push(format!("none {:?}", fingerprints(&TenantScope::Only(["t9".to_owned()].into()))));
    let contents = s.contents(&[a.clone(), b.clone(), c.clone()]).unwrap();
    assert!(!contents.contains_key(&b), "a secret's content is never recorded");
    let mut contents: Vec<String> = contents.iter().map(|(k, v)| format!("{k} = {v:?}")).collect();
    contents.sort();
    seen.push(format!("contents {contents:?}"));
    let audit = |q: AuditQuery| {
        s.audit(&q)
            .unwrap()
            .into_iter()
            .map(|e| {
                assert!(e.id > 0);
                format!("{} {} {} {} {:?} {:?}", e.time, e.tenant, e.address, e.outcome, e.after, e.message)
            })
            .collect::<Vec<_>>()
    };
    seen.push(format!("audit {:?}", audit(AuditQuery::default())));
    seen.push(format!("audit t1 {:?}", audit(AuditQuery { tenants: vec!["t1".into()], ..Default::default() })));
    seen.push(format!(
        "audit since {:?}",
        audit(AuditQuery { since: Some("2026-01-02T00:00:00Z".into()), ..Default::default() })
    ));
    seen.push(format!("audit limit {:?}", audit(AuditQuery { limit: Some(1), ..Default::default() })));
    // The dashboard's timeline: the latest first page, the page before it, filters.
    let newest = |limit: usize, before: Option<i64>| {
        let q = AuditQuery { limit: Some(limit), newest: true, before, ..Default::default() };
        s.audit(&q).unwrap().into_iter().map(|e| (e.id, e.time)).collect::<Vec<_>>()
    };
    let latest = newest(2, None);
    assert_eq!(latest.len(), 2);
    assert!(latest[0].0 < latest[1].0, "returned oldest first");
    seen.push(format!("audit newest {:?}", latest.iter().map(|e| &e.1).collect::<Vec<_>>()));
    seen.push(format!("audit before {:?}", newest(2, Some(latest[0].0)).iter().map(|e| &e.1).collect::<Vec<_>>()));
    seen.push(format!(
        "audit failed {:?}",
        audit(AuditQuery { outcome: Some("failed".into()), action: Some("create".into()), ..Default::default() })
    ));
    seen.push(format!("audit actor {:?}", audit(AuditQuery { actor: Some("nobody".into()), ..Default::default() })));
    // A second apply: forget one, keep the others.
    let serial = s.begin_apply().unwrap();
    assert_eq!(serial, 2);
    s.commit(serial, &Commit { forget: vec![c.clone()], ..Commit::default() }).unwrap();
    s.commit(serial, &Commit::default()).unwrap();
    seen.push(format!("after forget {:?}", fingerprints(&TenantScope::All)));
    seen.push(format!("journal {:?}", s.journal().unwrap()));
    let m = s.meta().unwrap();
    assert_eq!((m.lineage, m.serial), (m0.lineage, 2));
    seen
}

#[test]
fn the_postgres_store_behaves_like_the_embedded_one() {
    let Some(pg) = Pg::start("the_postgres_store_behaves_like_the_embedded_one") else { return };
    let store = PgStore::open(&pg.url("")).unwrap();
    let on_pg = exercise(&store);
    let d = tempfile::tempdir().unwrap();
    let on_sqlite = exercise(&SqliteStore::open(d.path()).unwrap());
    assert_eq!(on_pg, on_sqlite);
    // Reopened, everything is still there, under the same lineage.
    let lineage = store.meta().unwrap().lineage;
    drop(store);
    let store = PgStore::open(&pg.url("")).unwrap();
    assert_eq!(store.meta().unwrap().lineage, lineage);
    assert_eq!(store.records(&TenantScope::All).unwrap().len(), 2);
    assert_eq!(store.audit(&AuditQuery::default()).unwrap().len(), 3);
}

#[test]
fn migrations_run_once_and_a_newer_schema_is_refused() {
    let Some(pg) = Pg::start("migrations_run_once_and_a_newer_schema_is_refused") else { return };
    // Several first opens at once: one migrates, the others wait for it; one lineage.
    let url = pg.url("");
    let lineages: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> =
            (0..4).map(|_| s.spawn(|| PgStore::open(&url).unwrap().meta().unwrap().lineage)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(lineages.iter().all(|l| l == &lineages[0]), "{lineages:?}");
    let mut c = pg.client();
    let migrations = |c: &mut postgres::Client| -> Vec<(i32, String, String)> {
        c.query("SELECT version, description, applied_at::text FROM dotmac_schema_migrations ORDER BY version", &[])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    };
    let first = migrations(&mut c);
    assert_eq!(first.len(), 2, "{first:?}");
    assert_eq!(first[0].1, "the first schema");
    assert_eq!(first[1].1, "one journal entry per address and plan");
    // A re-open writes nothing: the migrations and the lineage stay as they were.
    // (A transaction that writes takes a transaction id; reads do not.)
    let xact = |c: &mut postgres::Client| -> i64 { c.query_one("SELECT txid_current()", &[]).unwrap().get(0) };
    let before = xact(&mut c);
    let store = PgStore::open(&pg.url("")).unwrap();
    assert_eq!(store.meta().unwrap().lineage, lineages[0]);
    let after = xact(&mut c);
    assert_eq!(after, before + 1, "re-opening the store wrote to the database");
    assert_eq!(migrations(&mut c), first);
    // A database migrated by a newer binary is refused, naming both versions.
    c.execute("INSERT INTO dotmac_schema_migrations(version, description) VALUES (99, 'from the future')", &[])
        .unwrap();
    let e = PgStore::open(&pg.url("")).err().expect("a newer schema is refused").to_string();
    assert!(e.contains("newer dotmac-gitops (schema 99, this one knows 2)"), "{e}");
    assert!(!e.contains(&pg.password) && e.contains("dotmac_admin:***@127.0.0.1"), "{e}");
}

#[test]
fn two_schemas_of_one_database_are_two_states_with_two_locks() {
    let Some(pg) = Pg::start("two_schemas_of_one_database_are_two_states_with_two_locks") else { return };
    pg.client().batch_execute("CREATE SCHEMA staging; CREATE SCHEMA prod").unwrap();
    let staging = PgStore::open(&pg.url("sslmode=disable&options=-c%20search_path%3Dstaging")).unwrap();
    let prod = PgStore::open(&pg.url("sslmode=disable&options=-c%20search_path%3Dprod")).unwrap();
    assert_ne!(staging.meta().unwrap().lineage, prod.meta().unwrap().lineage);
    staging.begin_apply().unwrap();
    assert_eq!((staging.meta().unwrap().serial, prod.meta().unwrap().serial), (1, 0));
    let _a = staging.lock("apply by staging", Duration::ZERO).unwrap();
    let _b = prod.lock("apply by prod", Duration::ZERO).unwrap();
}

#[test]
fn the_example_repository_plans_applies_and_replans_empty() {
    let Some(pg) = Pg::start("the_example_repository_plans_applies_and_replans_empty") else { return };
    let repo = pg_repo();
    let r = repo.path();
    git_commit_all(r, "example");
    let url = pg.url("");
    let out = dm(r, &pg, &url, &["plan", "--detailed-exitcode", "--now", NOW], &[]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("60 to create"), "{}", out.stdout);
    let out = dm(r, &pg, &url, &["apply", "--auto-approve", "--now", NOW], &[]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("state serial 1"), "{}", out.stdout);
    let out = dm(r, &pg, &url, &["plan", "--detailed-exitcode", "--now", NOW], &[]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    // The state is in the database, not in .dotmac/state/.
    assert!(!r.join(".dotmac/state").exists(), "the embedded store was written");
    let mut c = pg.client();
    let n: i64 = c.query_one("SELECT count(*) FROM dotmac_resources", &[]).unwrap().get(0);
    assert_eq!(n, 60);
    let secrets: Vec<(String, bool)> = c
        .query("SELECT address, content IS NOT NULL FROM dotmac_resources WHERE address LIKE '%/openbao.secret%'", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(!secrets.is_empty());
    assert!(secrets.iter().all(|(_, has)| !has), "a secret's content is never recorded: {secrets:?}");
    let audit: i64 = c.query_one("SELECT count(*) FROM dotmac_audit WHERE outcome = 'applied'", &[]).unwrap().get(0);
    assert_eq!(audit, 60);
    let out = dm(r, &pg, &url, &["drift", "--detailed-exitcode"], &[]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
}

#[test]
fn two_machines_share_the_records_and_the_audit_log() {
    let Some(pg) = Pg::start("two_machines_share_the_records_and_the_audit_log") else { return };
    let url = pg.url("");
    // Two work copies on two "machines" (their own .dotmac), writing to the same live
    // systems (one live folder, as real providers would be) and to one state database.
    let world = tempfile::tempdir().unwrap();
    let live = world.path().to_str().unwrap();
    let (a, b) = (pg_repo(), pg_repo());
    for repo in [&a, &b] {
        git_commit_all(repo.path(), "example");
    }
    let env = [("DOTMAC_STATE_DIR", live)];
    let out = dm(a.path(), &pg, &url, &["apply", "--auto-approve", "--now", NOW, "--actor", "alice"], &env);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    // Machine B's plan knows what A applied: nothing to do.
    let out = dm(b.path(), &pg, &url, &["plan", "--detailed-exitcode", "--now", NOW], &env);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    // B changes a tenant and applies; A sees B's entries in the audit log.
    let tenant_file = b.path().join("tenants/bluesky-net/tenant.yaml");
    let text = std::fs::read_to_string(&tenant_file).unwrap();
    let edited = text.replacen("name: BlueSky Networks", "name: BlueSky Networks (renamed)", 1);
    assert_ne!(text, edited);
    std::fs::write(&tenant_file, edited).unwrap();
    let out = dm(b.path(), &pg, &url, &["apply", "--auto-approve", "--now", NOW, "--actor", "bob"], &env);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("state serial 2"), "{}", out.stdout);
    assert!(!Path::new(live).join("state").exists(), "the embedded store was written");
    let audit = audit_json(a.path(), &pg, &url, &env);
    let actors: std::collections::BTreeMap<String, usize> =
        entries(&audit).iter().fold(Default::default(), |mut m, e| {
            *m.entry(e["actor"].as_str().unwrap().to_owned()).or_default() += 1;
            m
        });
    assert_eq!(actors.get("alice"), Some(&60), "{actors:?}");
    assert!(actors.get("bob").is_some_and(|n| *n >= 1), "{actors:?}");
    // A, whose copy is now behind, sees B's change as a change back (its records moved too).
    let out = dm(a.path(), &pg, &url, &["plan", "--detailed-exitcode", "--now", NOW], &env);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
}

/// Takes the lock through the library, as another machine would.
fn hold(pg: &Pg, who: &str) -> (PgStore, Box<dyn dotmac_gitops::state::StateLock>) {
    let store = PgStore::open(&pg.url("")).unwrap();
    let guard = store.lock(who, Duration::ZERO).unwrap();
    (store, guard)
}

/// Waits (bounded) until `sql` returns true.
fn wait_for(pg: &Pg, sql: &str, what: &str) {
    let mut c = pg.client();
    let start = Instant::now();
    while !c.query_one(sql, &[]).unwrap().get::<_, bool>(0) {
        assert!(start.elapsed() < Duration::from_secs(60), "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_lock_names_its_holder_fails_at_once_or_waits() {
    let Some(pg) = Pg::start("the_lock_names_its_holder_fails_at_once_or_waits") else { return };
    let repo = pg_repo();
    let r = repo.path();
    let url = pg.url("");
    let (store, guard) = hold(&pg, "apply by test-holder (pid 4242)");
    // Through the library: a second store is refused, then waits and gets it.
    let other = PgStore::open(&url).unwrap();
    let e = other.lock("apply by second", Duration::ZERO).err().unwrap().to_string();
    assert!(e.contains("the state is locked: apply by test-holder (pid 4242)") && e.contains("--lock-timeout"), "{e}");
    let e = other.lock("apply by second", Duration::from_millis(300)).err().unwrap().to_string();
    assert!(e.contains("apply by test-holder") && e.contains("waited"), "{e}");
    // Through the binary.
    let out = dm(r, &pg, &url, &["apply", "--auto-approve", "--now", NOW], &[]);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("the state is locked: apply by test-holder (pid 4242)"), "{}", out.stderr);
    let out = dm(r, &pg, &url, &["apply", "--auto-approve", "--now", NOW, "--lock-timeout", "1s"], &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("waited 1s"), "{}", out.stderr);
    // An apply waiting with --lock-timeout goes on once the holder lets go.
    std::thread::scope(|s| {
        let waiting =
            s.spawn(|| dm(r, &pg, &url, &["apply", "--auto-approve", "--now", NOW, "--lock-timeout", "5m"], &[]));
        wait_for(
            &pg,
            "SELECT count(*) = 2 FROM pg_stat_activity WHERE application_name = 'dotmac-gitops lock'",
            "the waiting apply's lock session",
        );
        drop(guard);
        let out = waiting.join().unwrap();
        assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    });
    // Released: the holder row is gone, and a new taker gets the lock at once.
    let rows: i64 = pg.client().query_one("SELECT count(*) FROM dotmac_lock", &[]).unwrap().get(0);
    assert_eq!(rows, 0);
    drop(store.lock("again", Duration::ZERO).unwrap());
}

#[test]
fn a_commit_is_refused_once_the_lock_session_is_gone() {
    let Some(pg) = Pg::start("a_commit_is_refused_once_the_lock_session_is_gone") else { return };
    let (store, _guard) = hold(&pg, "apply by a holder whose connection breaks");
    let serial = store.begin_apply().unwrap();
    // The lock's session ends (a network cut, a server restart, an operator).
    pg.client()
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'dotmac-gitops lock'",
        )
        .unwrap();
    // pg_terminate_backend only signals: the session, and its advisory lock, go a moment
    // later. Once they have gone, the commit must notice.
    wait_for(
        &pg,
        "SELECT NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted)",
        "the lock's session to end",
    );
    let a = Address::parse("t1/management.tenant").unwrap();
    let e = store
        .commit(serial, &Commit { upserts: vec![Upsert::new(a, "sha256:1".into(), None)], ..Commit::default() })
        .expect_err("nothing is recorded without the lock")
        .to_string();
    assert!(e.contains("the state lock was lost"), "{e}");
    assert!(store.records(&TenantScope::All).unwrap().is_empty());
}

#[test]
fn a_killed_holder_frees_the_lock() {
    let Some(pg) = Pg::start("a_killed_holder_frees_the_lock") else { return };
    let repo = pg_repo();
    let r = repo.path();
    let url = pg.url("");
    // A management platform that accepts connections and never answers: the apply takes the
    // lock, then hangs reading live state.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let toml = r.join("dotmac.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    let from =
        "[providers.management]        # the management platform's tenant records and licenses\nkind = \"local\"";
    assert!(text.contains(from));
    std::fs::write(
        &toml,
        text.replace(
            from,
            &format!(
                "[providers.management]\nkind = \"http\"\nurl = \"http://127.0.0.1:{port}/api/v1/config\"\n\
                 token_env = \"DOTMAC_TEST_TOKEN\"\ntimeout = \"5m\""
            ),
        ),
    )
    .unwrap();
    let other = PgStore::open(&url).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dotmac-gitops"))
        .args(["apply", "--auto-approve", "--now", NOW])
        .current_dir(r)
        .env(URL_ENV, &url)
        .env("DOTMAC_TEST_TOKEN", "t0ken")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    wait_for(&pg, "SELECT count(*) = 1 FROM dotmac_lock", "the apply to take the lock");
    let e = other.lock("apply by second", Duration::ZERO).err().unwrap().to_string();
    assert!(e.contains(&format!("(pid {pid})")), "the holder is named: {e}");
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    child.wait().unwrap();
    drop(silent);
    // The server ends the dead holder's session and its lock with it; a stale holder row
    // would be ignored.
    let guard = other.lock("apply by second", Duration::from_secs(30)).expect("the lock died with its holder");
    let holder: String = pg.client().query_one("SELECT holder FROM dotmac_lock", &[]).unwrap().get(0);
    assert_eq!(holder, "apply by second");
    drop(guard);
}

#[test]
fn the_password_never_shows() {
    let Some(pg) = Pg::start("the_password_never_shows") else { return };
    let repo = pg_repo();
    let r = repo.path();
    // A wrong password, a dead port, a bad option: the errors name the server, masked.
    let wrong = format!("postgres://{}:{}-wrong@127.0.0.1:{}/postgres?sslmode=disable", pg.user, pg.password, pg.port);
    let out = dm(r, &pg, &wrong, &["plan", "--now", NOW], &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("password authentication failed"), "{}", out.stderr);
    assert!(out.stderr.contains(&format!("dotmac_admin:***@127.0.0.1:{}", pg.port)), "{}", out.stderr);
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead = format!("postgres://{}:{}@127.0.0.1:{dead_port}/postgres?sslmode=disable", pg.user, pg.password);
    let out = dm(r, &pg, &dead, &["audit"], &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("cannot connect to the state database"), "{}", out.stderr);
    let bad = format!("{}&no_such_option=1", pg.url(""));
    let out = dm(r, &pg, &bad, &["plan", "--now", NOW], &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("is invalid"), "{}", out.stderr);
    // The variable unset: its name is the error.
    let out = run_env(&["plan", "--now", NOW], r, &[("DOTMAC_LOG", "debug")]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains(&format!("${URL_ENV}, which is not set")), "{}", out.stderr);
    // A literal URL with a password in dotmac.toml is refused, without printing it.
    let toml = r.join("dotmac.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(&toml, text.replace(&format!("url_env = \"{URL_ENV}\""), &format!("url = \"{}\"", pg.url(""))))
        .unwrap();
    let out = dm(r, &pg, "", &["validate"], &[]);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(
        format!("{}{}", out.stdout, out.stderr).contains("[state] url holds a password"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    // A working run, logging at trace level, says nothing of it either.
    std::fs::write(&toml, text).unwrap();
    let out = dm(r, &pg, &pg.url(""), &["apply", "--auto-approve", "--now", NOW], &[("DOTMAC_LOG", "trace")]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("dotmac_admin:***@127.0.0.1"), "the URL is logged, masked: {}", out.stderr);
}

#[test]
fn tls_is_verified_against_the_ca_the_url_names() {
    let Some(pg) = Pg::start_tls("tls_is_verified_against_the_ca_the_url_names") else { return };
    let ca = pg.certs.as_ref().unwrap().ca.display().to_string();
    let store = PgStore::open(&pg.url(&format!("sslmode=require&sslrootcert={ca}"))).unwrap();
    store.begin_apply().unwrap();
    let ssl: bool = {
        let mut c = pg.client();
        c.query_one("SELECT bool_or(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE application_name = 'dotmac-gitops'", &[])
            .unwrap()
            .get(0)
    };
    assert!(ssl, "the store's session is encrypted");
    // Not signed by a CA the client trusts: refused, with the way out, without the password.
    let e = PgStore::open(&pg.url("sslmode=require")).err().expect("an unknown CA is refused").to_string();
    assert!(e.contains("sslrootcert"), "{e}");
    assert_no_password(&pg, &e);
    let e = PgStore::open(&pg.url("sslmode=require&sslrootcert=/nonexistent/ca.pem")).err().unwrap().to_string();
    assert!(e.contains("/nonexistent/ca.pem"), "{e}");
}

#[test]
fn a_state_of_130k_records_is_written_in_bulk_and_read_in_one_pass() {
    let Some(pg) = Pg::start("a_state_of_130k_records_is_written_in_bulk_and_read_in_one_pass") else { return };
    let store = PgStore::open(&pg.url("")).unwrap();
    let _guard = store.lock("apply by the scale test", Duration::ZERO).unwrap();
    let serial = store.begin_apply().unwrap();
    // 10,000 tenants of 13 resources each, in one commit (several bulk statements).
    let kinds = ["management.tenant", "isp.config", "openbao.policy[app]", "openbao.secret[db]"];
    let mut upserts = Vec::new();
    for t in 0..10_000 {
        for i in 0..13 {
            let what = if i < kinds.len() { kinds[i].to_owned() } else { format!("kubernetes.Deployment[app-{i}]") };
            let a = Address::parse(&format!("tenant-{t:05}/{what}")).unwrap();
            let content = (i != 3).then(|| Content::Json(json!({"tenant": t, "i": i})));
            upserts.push(Upsert::new(a, format!("sha256:{t}-{i}").into(), content.as_ref()));
        }
    }
    let t = Instant::now();
    store.commit(serial, &Commit { upserts, ..Commit::default() }).unwrap();
    let wrote = t.elapsed();
    let t = Instant::now();
    let all = store.records(&TenantScope::All).unwrap();
    let read = t.elapsed();
    assert_eq!(all.len(), 130_000);
    assert!(all.iter().all(|r| r.serial == serial));
    let some: TenantScope = TenantScope::Only((0..100).map(|t| format!("tenant-{t:05}")).collect());
    let t = Instant::now();
    let part = store.records(&some).unwrap();
    let read_part = t.elapsed();
    assert_eq!(part.len(), 1_300);
    let n: i64 =
        pg.client().query_one("SELECT count(*) FROM dotmac_resources WHERE content IS NULL", &[]).unwrap().get(0);
    assert_eq!(n, 10_000, "the secrets' records carry no content");
    eprintln!(
        "130,000 records: written in one commit in {wrote:?}, read in {read:?}; 100 tenants' 1,300 read in {read_part:?}"
    );
}
