//! Regression tests for the bugs the crash test (`crash.rs`) found, each at one exact crash
//! point: `DOTMAC_FAULTS=<provider>:<op>:<n>:kill` kills the apply with SIGKILL right after
//! that call, `kill-before` instead of it.

use crate::util::*;
use dotmac_gitops::state::StateStore;
use dotmac_gitops::state::sqlite::SqliteStore;
use serde_json::Value;
use std::path::Path;

const LATER: &str = "2027-06-01T00:00:00Z";

fn apply_at(repo: &Path, now: &str, faults: &str) -> Output {
    let mut env = vec![];
    if !faults.is_empty() {
        env.push(("DOTMAC_FAULTS", faults));
    }
    run_env(&["apply", "--auto-approve", "--allow-delete", "--now", now, "--parallelism", "1"], repo, &env)
}

fn killed(repo: &Path, now: &str, faults: &str) {
    let out = apply_at(repo, now, faults);
    assert_eq!(out.code, -1, "the apply was to be killed by {faults}:\n{}\n{}", out.stdout, out.stderr);
}

fn plan_json(repo: &Path, now: &str) -> Value {
    let out = run(&["plan", "--format", "json", "--now", now], repo);
    assert_eq!(out.code, 0, "{}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap()
}

fn drifted(plan: &Value) -> Vec<String> {
    plan["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["drift"] == true)
        .map(|c| format!("{} {}: {}", c["action"], c["address"], c["reason"]))
        .collect()
}

fn change<'a>(plan: &'a Value, address: &str) -> Option<&'a Value> {
    plan["changes"].as_array().unwrap().iter().find(|c| c["address"] == address)
}

fn converges(repo: &Path) {
    let out = apply_at(repo, NOW, "");
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let out = run(&["plan", "--detailed-exitcode", "--now", NOW], repo);
    assert_eq!(out.code, 0, "{}", out.stdout);
    let journal = SqliteStore::open(&repo.join(".dotmac/state")).unwrap().journal().unwrap();
    assert!(journal.is_empty(), "{journal:?}");
}

#[test]
fn regression_a_delete_done_by_a_killed_apply_is_not_drift() {
    let repo = example_repo();
    let r = repo.path();
    assert_eq!(apply_at(r, NOW, "").code, 0);
    let parked = tempfile::tempdir().unwrap();
    std::fs::rename(r.join("tenants/bluesky-net"), parked.path().join("bluesky-net")).unwrap();
    // Deletes go in reverse apply order: the Deployment first. Die right after it.
    killed(r, NOW, "kubernetes:delete:1:kill");
    let gone = "bluesky-net/kubernetes.Deployment[isp-framework]";
    let plan = plan_json(r, NOW);
    assert_eq!(drifted(&plan), Vec::<String>::new(), "a resource our own apply deleted is not deleted out of band");
    assert!(change(&plan, gone).unwrap()["reason"].as_str().unwrap().contains("interrupted"), "{plan:#}");
    // The tenant comes back before anyone applied: the resource is new, not drift either.
    std::fs::rename(parked.path().join("bluesky-net"), r.join("tenants/bluesky-net")).unwrap();
    let plan = plan_json(r, NOW);
    assert_eq!(drifted(&plan), Vec::<String>::new());
    assert_eq!(change(&plan, gone).unwrap()["action"], "create");
    converges(r);
}

#[test]
fn regression_a_rotation_done_by_a_killed_apply_is_not_drift() {
    let repo = example_repo();
    let r = repo.path();
    assert_eq!(apply_at(r, NOW, "").code, 0);
    // Half a year on, generated secrets are due: the first rotation lands, then the crash.
    killed(r, LATER, "secrets:put:1:kill");
    let plan = plan_json(r, NOW);
    assert_eq!(drifted(&plan), Vec::<String>::new(), "our own rotation is not a version written out of band");
    converges(r);
}

#[test]
fn regression_an_apply_killed_while_recovering_keeps_the_first_ones_journal() {
    let repo = example_repo();
    let r = repo.path();
    assert_eq!(apply_at(r, NOW, "").code, 0);
    let tenant = r.join("tenants/tenant-123/tenant.yaml");
    edit_file(&tenant, "name: Demo ISP", "name: Demo ISP One");
    // The management record is written, then the apply dies.
    killed(r, NOW, "management:put:1:kill");
    // The repository moves on, and the apply that would record it dies before writing.
    edit_file(&tenant, "name: Demo ISP One", "name: Demo ISP Two");
    killed(r, NOW, "management:put:1:kill-before");
    // What the first apply wrote is still known to be ours.
    let plan = plan_json(r, NOW);
    assert_eq!(drifted(&plan), Vec::<String>::new());
    assert_eq!(change(&plan, "tenant-123/management.tenant").unwrap()["action"], "update");
    converges(r);
}

#[test]
fn regression_a_write_adopted_from_the_journal_is_recorded_so_later_drift_shows() {
    let repo = example_repo();
    let r = repo.path();
    assert_eq!(apply_at(r, NOW, "").code, 0);
    let state = r.join(".dotmac");
    let before = live_entry(&state, "tenant-123/isp.config").unwrap();
    edit_file(&r.join("tenants/tenant-123/tenant.yaml"), "sync_interval_minutes: 15", "sync_interval_minutes: 20");
    // ISP configuration written, then the crash: only the Deployment is left to do.
    killed(r, NOW, "isp:put:1:kill");
    converges(r);
    // Someone puts the old configuration back by hand: that is drift, and must say so.
    set_live(&state, "tenant-123/isp.config", Some(&before));
    let plan = plan_json(r, NOW);
    let c = change(&plan, "tenant-123/isp.config").expect("the edit is seen");
    assert_eq!(c["drift"], true, "{c:#}");
}

#[test]
fn regression_a_rolled_back_rotation_is_recorded_not_drift() {
    let repo = example_repo();
    let r = repo.path();
    assert_eq!(apply_at(r, NOW, "").code, 0);
    edit_file(&r.join("tenants/tenant-123/tenant.yaml"), "name: Demo ISP", "name: Demo ISP Renamed");
    // tenant-123 rotates its generated secrets (they are due by then), then its management
    // write fails: the tenant is rolled back, the secrets restored to their old values.
    let out = apply_at(r, LATER, "management:put:1");
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("failed: tenant-123 (rolled back)"), "{}", out.stderr);
    let plan = plan_json(r, NOW);
    assert_eq!(drifted(&plan), Vec::<String>::new(), "a restored secret is recorded as such");
    converges(r);
}

#[test]
fn regression_a_write_whose_answer_was_lost_is_rolled_back_too() {
    let repo = example_repo();
    let r = repo.path();
    assert_eq!(apply_at(r, NOW, "").code, 0);
    let state = r.join(".dotmac");
    let before = live_entry(&state, "tenant-123/management.tenant").unwrap();
    edit_file(&r.join("tenants/tenant-123/tenant.yaml"), "name: Demo ISP", "name: Demo ISP Renamed");
    // The management write is done, then reported failed: the tenant is rolled back, that
    // write included.
    let out = apply_at(r, NOW, "management:put:1:lost");
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("(it was done nevertheless)"), "{}", out.stderr);
    assert!(out.stderr.contains("failed: tenant-123 (rolled back)"), "{}", out.stderr);
    assert_eq!(live_entry(&state, "tenant-123/management.tenant").unwrap(), before);
    assert_eq!(drifted(&plan_json(r, NOW)), Vec::<String>::new());
    converges(r);
}

#[test]
fn regression_a_rolled_back_rotation_keeps_the_old_values_age() {
    let repo = example_repo();
    let r = repo.path();
    assert_eq!(apply_at(r, NOW, "").code, 0);
    crate::faults::age_secrets(r, "tenant-123", 200);
    edit_file(&r.join("tenants/tenant-123/tenant.yaml"), "name: Demo ISP", "name: Demo ISP Renamed");
    let due = |plan: &Value| change(plan, "tenant-123/openbao.secret[database/password]").map(|c| c["action"].clone());
    assert_eq!(due(&plan_json(r, NOW)), Some(Value::from("rotate")));
    // Rotated, then the tenant fails and is rolled back: the old value is back, and it is
    // as old as it was: still due, not fresh for another interval.
    let out = apply_at(r, NOW, "management:put:1");
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert_eq!(due(&plan_json(r, NOW)), Some(Value::from("rotate")), "the rollback put the rotation off");
    converges(r);
}

#[test]
fn an_apply_that_cannot_journal_writes_nothing() {
    // Local stores are written to while the journal is (their writes are durable only at the
    // flush): a journal that cannot be written must stop the apply before any flush.
    let repo = example_repo();
    let r = repo.path();
    assert_eq!(apply_at(r, NOW, "").code, 0);
    let state = r.join(".dotmac");
    let before = live_entry(&state, "tenant-123/management.tenant").unwrap();
    let refuse =
        "CREATE TRIGGER refuse_journal BEFORE INSERT ON journal BEGIN SELECT RAISE(FAIL, 'disk says no'); END;";
    let db = rusqlite::Connection::open(state.join("state/state.db")).unwrap();
    db.execute_batch(refuse).unwrap();
    edit_file(&r.join("tenants/tenant-123/tenant.yaml"), "name: Demo ISP", "name: Demo ISP Renamed");
    let out = apply_at(r, NOW, "");
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("could not journal the apply's writes; nothing was written"), "{}", out.stderr);
    assert_eq!(live_entry(&state, "tenant-123/management.tenant").unwrap(), before, "nothing was flushed");
    let plan = plan_json(r, NOW);
    assert_eq!(drifted(&plan), Vec::<String>::new());
    assert_eq!(change(&plan, "tenant-123/management.tenant").unwrap()["action"], "update", "still to do");
    db.execute_batch("DROP TRIGGER refuse_journal").unwrap();
    drop(db);
    converges(r);
}

/// An apply that finds the journal empty and applies every tenant empties it in one statement;
/// one that finds entries of an interrupted apply clears only what it settles.
#[test]
fn a_scoped_apply_after_a_killed_one_leaves_the_other_tenants_journal() {
    let repo = example_repo();
    let r = repo.path();
    assert_eq!(apply_at(r, NOW, "").code, 0);
    edit_file(&r.join("tenants/tenant-123/tenant.yaml"), "name: Demo ISP", "name: Demo ISP One");
    edit_file(&r.join("tenants/northwind-isp/tenant.yaml"), "name: Northwind Broadband", "name: Northwind Two");
    // Every write is done and recorded, and journaled; the process dies before the flush.
    killed(r, NOW, "management:flush:1:delay=1s,management:flush:1:kill-before");
    let journal = || SqliteStore::open(&r.join(".dotmac/state")).unwrap().journal().unwrap();
    let tenants = |entries: &[dotmac_gitops::state::JournalEntry]| -> std::collections::BTreeSet<String> {
        entries.iter().map(|e| e.address.split('/').next().unwrap().to_owned()).collect()
    };
    assert_eq!(tenants(&journal()), ["northwind-isp", "tenant-123"].map(String::from).into());

    let out = run(&["apply", "--auto-approve", "--now", NOW, "--tenant", "tenant-123"], r);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert_eq!(
        tenants(&journal()),
        ["northwind-isp"].map(String::from).into(),
        "northwind-isp's writes are still in flight"
    );
    let plan = plan_json(r, NOW);
    assert_eq!(drifted(&plan), Vec::<String>::new());
    assert!(
        change(&plan, "northwind-isp/management.tenant").unwrap()["reason"].as_str().unwrap().contains("interrupted")
    );
    converges(r);
}
