//! Crash safety: `apply` killed with SIGKILL at random moments, round after round, on a
//! generated repository with the local providers. After every kill the state store opens,
//! reads and passes SQLite's integrity check, the lock is free, `plan` works and reports no
//! drift for the writes the killed apply completed (the journal decides what happened, also
//! after the repository moved on), and the next apply converges: the re-plan is empty, live
//! matches the records (`drift` finds nothing) and the journal is empty.
//!
//! Each round changes the desired state first, so that every apply has work: the
//! environments' log level (two updates per tenant), removing tenants (deletes, secrets
//! soft-deleted), bringing them back (creates, secrets revived), or time passing (rotations).
//! Kills land after a random number of writes have started (read from the trace log) plus a
//! random delay, or at a random time (also during planning). The randomness is seeded.

use crate::util::*;
use dotmac_gitops::providers::TenantScope;
use dotmac_gitops::state::sqlite::SqliteStore;
use dotmac_gitops::state::{AuditQuery, StateStore, lock};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const TENANTS: usize = 120;
const ROUNDS: usize = 10;

/// When to kill.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    /// After the k-th write has started, and then this long.
    AfterWrites(usize, Duration),
    /// This long after the start.
    After(Duration),
}

/// Runs `apply` and kills it with SIGKILL at `trigger`. Returns true if it was killed (false:
/// it finished first, which a late trigger allows).
fn killed_apply(repo: &Path, now: &str, trigger: Trigger) -> bool {
    let mut cmd = command(
        &["apply", "--auto-approve", "--allow-delete", "--now", now],
        repo,
        &[("DOTMAC_LOG", "warn,dotmac_gitops::apply=trace")],
    );
    cmd.stdout(Stdio::null());
    let mut child = cmd.spawn().expect("the binary runs");
    let pid = child.id() as i32;
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<()>();
    let k = match trigger {
        Trigger::AfterWrites(k, _) => k,
        Trigger::After(_) => usize::MAX,
    };
    // Reads the trace log: one `execute` line per write started. Keeps draining to the end.
    let reader = std::thread::spawn(move || {
        let mut writes = 0;
        let mut tail = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("execute") {
                writes += 1;
                if writes == k {
                    let _ = tx.send(());
                }
            } else if !line.contains("TRACE") {
                tail.push(line);
            }
        }
        tail
    });
    match trigger {
        Trigger::AfterWrites(_, delay) => {
            if rx.recv_timeout(HANG).is_ok() {
                std::thread::sleep(delay);
            }
        }
        Trigger::After(delay) => std::thread::sleep(delay),
    }
    // The child is not reaped yet, so its pid cannot have been reused.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let status = child.wait().unwrap();
    let other = reader.join().unwrap();
    let killed = status.signal() == Some(libc::SIGKILL);
    assert!(killed || status.success(), "apply failed on its own ({status}):\n{}", other.join("\n"));
    killed
}

/// What the state store holds after a kill: it must open, read and be intact, and the lock
/// must be free. Returns the journal's length (writes that were in flight).
fn check_store_and_lock(repo: &Path, what: &str) -> usize {
    let dir = repo.join(".dotmac/state");
    let store = SqliteStore::open(&dir).unwrap_or_else(|e| panic!("{what}: the state store does not open: {e:#}"));
    store.meta().unwrap_or_else(|e| panic!("{what}: meta: {e:#}"));
    store.records(&TenantScope::All).unwrap_or_else(|e| panic!("{what}: records: {e:#}"));
    store.audit(&AuditQuery::default()).unwrap_or_else(|e| panic!("{what}: audit: {e:#}"));
    let journal = store.journal().unwrap_or_else(|e| panic!("{what}: journal: {e:#}"));
    drop(store);
    let conn = rusqlite::Connection::open(dir.join("state.db")).unwrap();
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(integrity, "ok", "{what}: the state database is damaged");
    drop(conn);
    let guard = lock::acquire(&dir.join("lock"), "the crash test", Duration::ZERO)
        .unwrap_or_else(|e| panic!("{what}: the lock was not released by the dead apply: {e:#}"));
    drop(guard);
    journal.len()
}

/// The plan after a kill: it works, and nothing the killed apply did reads as drift.
/// Returns how many writes it adopted from the journal.
fn check_plan_without_drift(repo: &Path, now: &str, what: &str) -> usize {
    let out = run(&["plan", "--format", "json", "--now", now], repo);
    assert_eq!(out.code, 0, "{what}: plan failed:\n{}", out.stderr);
    let plan: Value = serde_json::from_str(&out.stdout).unwrap();
    let changes = plan["changes"].as_array().unwrap();
    let drift: Vec<String> = changes
        .iter()
        .filter(|c| c["drift"] == true)
        .map(|c| format!("{} {}: {}", c["action"], c["address"], c["reason"]))
        .collect();
    assert!(
        drift.is_empty(),
        "{what}: the plan reports drift for the killed apply's own writes:\n{}",
        drift.join("\n")
    );
    changes.iter().filter(|c| c["reason"].as_str().is_some_and(|r| r.contains("interrupted"))).count()
}

/// The next apply converges: exit 0, an empty re-plan, no drift, an empty journal.
fn converge(repo: &Path, now: &str, what: &str) -> Duration {
    let t = Instant::now();
    let out = run(&["apply", "--auto-approve", "--allow-delete", "--now", now], repo);
    let took = t.elapsed();
    assert_eq!(out.code, 0, "{what}: the apply after the kill failed:\n{}\n{}", out.stdout, out.stderr);
    let applied = out;
    let out = run(&["plan", "--detailed-exitcode", "--now", now], repo);
    assert_eq!(out.code, 0, "{what}: the re-plan after converging is not empty:\n{}", out.stdout);
    let out = run(&["drift", "--detailed-exitcode"], repo);
    assert_eq!(out.code, 0, "{what}: live does not match the records:\n{}", out.stdout);
    let store = SqliteStore::open(&repo.join(".dotmac/state")).unwrap();
    let journal = store.journal().unwrap();
    assert!(
        journal.is_empty(),
        "{what}: {} journal entries outlived a converged apply, e.g. {:?}\n{}\n{}",
        journal.len(),
        &journal[..journal.len().min(3)],
        applied.stdout,
        applied.stderr
    );
    took
}

/// The desired state, moved on between applies.
struct World {
    repo: tempfile::TempDir,
    /// Tenant folders taken out of the repository, kept here to bring back.
    parked: tempfile::TempDir,
    removed: Vec<String>,
    level: usize,
}

impl World {
    fn path(&self) -> &Path {
        self.repo.path()
    }

    /// A new log level in every environment: two updates per tenant.
    fn change_environments(&mut self) -> String {
        self.level += 1;
        for e in std::fs::read_dir(self.path().join("environments")).unwrap() {
            let p = e.unwrap().path();
            let text = std::fs::read_to_string(&p).unwrap();
            let text: Vec<String> =
                text.lines()
                    .map(|l| {
                        if l.starts_with("  log_level:") {
                            format!("  log_level: crash{}", self.level)
                        } else {
                            l.into()
                        }
                    })
                    .collect();
            std::fs::write(&p, text.join("\n") + "\n").unwrap();
        }
        format!("log level crash{}", self.level)
    }

    fn tenants(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.path().join("tenants"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn remove_some(&mut self, rng: &mut Rng) -> String {
        let all = self.tenants();
        for t in all.iter().filter(|_| rng.chance(1, 8)) {
            std::fs::rename(self.path().join("tenants").join(t), self.parked.path().join(t)).unwrap();
            self.removed.push(t.clone());
        }
        format!("{} tenants removed", self.removed.len())
    }

    fn restore(&mut self) -> String {
        let n = self.removed.len();
        for t in self.removed.drain(..) {
            std::fs::rename(self.parked.path().join(&t), self.repo.path().join("tenants").join(&t)).unwrap();
        }
        format!("{n} tenants back")
    }

    /// Changes the desired state; says how, and the time to apply at: 95 days on, generated
    /// secrets are overdue and rotate. (Only the killed apply and the checks after it run then:
    /// a rotation writes the clock's time, so at a `--now` that far ahead they would rotate
    /// again on every apply; the converging apply runs at the usual time.)
    fn step(&mut self, rng: &mut Rng) -> (String, String) {
        let now = NOW.to_owned();
        match rng.below(4) {
            0 if !self.removed.is_empty() => (self.restore(), now),
            0 => (self.remove_some(rng), now),
            1 => {
                let later: jiff::Timestamp = NOW.parse().unwrap();
                let later = later.checked_add(jiff::SignedDuration::from_hours(95 * 24)).unwrap().to_string();
                (format!("at {later}, generated secrets rotate"), later)
            }
            _ => (self.change_environments(), now),
        }
    }
}

fn writes_planned(repo: &Path, now: &str) -> usize {
    let out = run(&["plan", "--format", "json", "--now", now], repo);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let plan: Value = serde_json::from_str(&out.stdout).unwrap();
    plan["changes"].as_array().unwrap().iter().filter(|c| c["action"] != "noop").count()
}

fn pick_trigger(rng: &mut Rng, writes: usize, typical: Duration) -> Trigger {
    if writes == 0 || rng.chance(1, 4) {
        // Any moment, planning included.
        Trigger::After(Duration::from_micros(rng.below(typical.as_micros() as u64 + 1)))
    } else {
        // After a random write, and up to 20 ms more (sometimes up to 300 ms: the commit).
        let max_delay = if rng.chance(1, 5) { 300_000 } else { 20_000 };
        Trigger::AfterWrites(1 + rng.below(writes as u64) as usize, Duration::from_micros(rng.below(max_delay)))
    }
}

#[test]
fn applies_killed_at_random_moments_always_recover_and_converge() {
    let mut rng = Rng::seeded("crash", 0xC0FFEE);
    let mut world = World {
        repo: generated_repo(TENANTS, 11),
        parked: tempfile::tempdir().unwrap(),
        removed: Vec::new(),
        level: 0,
    };
    let r: PathBuf = world.path().to_owned();
    let mut typical = Duration::from_secs(3);
    let (mut kills, mut in_flight, mut adopted) = (0, 0, 0);
    for round in 0..ROUNDS {
        let (change, at) = if round == 0 { ("first apply".to_owned(), NOW.to_owned()) } else { world.step(&mut rng) };
        let now = at.as_str();
        let writes = writes_planned(&r, now);
        let trigger = pick_trigger(&mut rng, writes, typical);
        let what = format!("round {round} ({change}, {writes} writes, killed at {trigger:?})");
        eprintln!("crash: {what}");
        if killed_apply(&r, now, trigger) {
            kills += 1;
        }
        let journal = check_store_and_lock(&r, &what);
        in_flight += usize::from(journal > 0);
        // Sometimes the repository moves on before anyone re-plans: the journal, not the
        // desired state, must tell the killed apply's completed writes from drift.
        let what = if rng.chance(1, 2) { format!("{what}, then {}", world.change_environments()) } else { what };
        adopted += check_plan_without_drift(&r, now, &what);
        // Sometimes the recovering apply is killed too.
        if rng.chance(1, 4) {
            let writes = writes_planned(&r, now);
            let trigger = pick_trigger(&mut rng, writes, typical);
            let what = format!("{what}; the next apply killed at {trigger:?}");
            killed_apply(&r, now, trigger);
            check_store_and_lock(&r, &what);
            adopted += check_plan_without_drift(&r, now, &what);
        }
        let took = converge(&r, NOW, &what);
        if writes > TENANTS {
            typical = took;
        }
    }
    eprintln!("crash: {kills} kills, {in_flight} with writes in flight, {adopted} writes adopted from the journal");
    assert!(kills >= ROUNDS / 2, "too few applies were killed ({kills}): the test did not test");
    assert!(in_flight >= 1, "no kill landed while writes were in flight: the test did not test");
}
