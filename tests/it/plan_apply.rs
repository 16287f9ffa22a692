//! Plan and apply end to end, on temp copies of repositories made with git2, against the
//! embedded local providers and state store.

use crate::util::*;
use serde_json::Value;
use std::path::Path;

fn dm(repo: &Path, args: &[&str]) -> Output {
    run(args, repo)
}

fn plan_json(repo: &Path) -> Value {
    let out = dm(repo, &["plan", "--format", "json", "--now", NOW]);
    assert!(out.code == 0 || out.code == 1, "{}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

fn changed_addresses(plan: &Value) -> Vec<String> {
    plan["changes"].as_array().unwrap().iter().map(|c| c["address"].as_str().unwrap().to_owned()).collect()
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no `{from}`", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn the_whole_sequence_on_the_example_repository() {
    let repo = example_repo();
    let r = repo.path();
    git_commit_all(r, "example");

    // A fresh machine: everything is to be created.
    let out = dm(r, &["plan", "--detailed-exitcode", "--now", NOW]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    insta::assert_snapshot!("plan__example_first_plan", out.stdout);
    let first = plan_json(r);
    assert_eq!(first["summary"]["create"], 60);
    assert_eq!(first["revision"].as_str().map(str::len), Some(40), "a clean work tree plans its commit");

    // Apply, then a re-plan is empty, every time.
    let out = dm(r, &["apply", "--auto-approve", "--now", NOW]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("Apply complete: 60 changes on 5 tenants"), "{}", out.stdout);
    for _ in 0..2 {
        let out = dm(r, &["plan", "--detailed-exitcode", "--now", NOW]);
        assert_eq!(out.code, 0, "{}", out.stdout);
        assert!(out.stdout.contains("No changes."), "{}", out.stdout);
    }

    // Edit one tenant: only its resources change.
    edit(&r.join("tenants/tenant-123/tenant.yaml"), "sync_interval_minutes: 15", "sync_interval_minutes: 20");
    git_commit_all(r, "tenant-123: sync every 20 minutes");
    let p = plan_json(r);
    let addrs = changed_addresses(&p);
    assert_eq!(addrs, ["tenant-123/isp.config", "tenant-123/kubernetes.Deployment[isp-framework]"]);
    let isp = &p["changes"][0];
    assert_eq!(
        (isp["action"].as_str(), isp["risk"].as_str(), isp["drift"].as_bool()),
        (Some("update"), Some("medium"), Some(false))
    );
    assert!(isp["diff"].as_str().unwrap().contains("+    sync_interval_minutes: 20"));
    assert_eq!(isp["fields"][0]["pointer"], "/integrations/stripe/sync_interval_minutes");
    insta::assert_snapshot!("plan__example_one_tenant_edited", dm(r, &["plan", "--now", NOW]).stdout);

    // A saved plan applies exactly its changes.
    let plan_file = r.join("saved.plan");
    let out = dm(r, &["plan", "--out", plan_file.to_str().unwrap(), "--now", NOW]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let saved = std::fs::read_to_string(&plan_file).unwrap();
    assert!(saved.contains("\"format_version\":1"));
    let out = dm(r, &["apply", plan_file.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("Apply complete: 2 changes on 1 tenant"), "{}", out.stdout);
    assert_eq!(dm(r, &["plan", "--detailed-exitcode", "--now", NOW]).code, 0);

    // Applying it again is refused: the state moved.
    let out = dm(r, &["apply", plan_file.to_str().unwrap()]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("stale plan") && out.stderr.contains("the state moved from serial"), "{}", out.stderr);

    // A saved plan whose live resource moved is refused, saying what moved.
    edit(&r.join("tenants/tenant-123/tenant.yaml"), "sync_interval_minutes: 20", "sync_interval_minutes: 25");
    let out = dm(r, &["plan", "--out", plan_file.to_str().unwrap(), "--now", NOW]);
    assert_eq!(out.code, 0);
    // By hand, in the tenant's shard file of the local ISP store.
    let state = r.join(".dotmac");
    edit_live(&state, "tenant-123/isp.config", "level: info", "level: debug");
    let out = dm(r, &["apply", plan_file.to_str().unwrap()]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("live state moved: tenant-123/isp.config changed"), "{}", out.stderr);

    // The out-of-band edit is drift: the plan says so and apply heals it.
    let p = plan_json(r);
    let isp = p["changes"].as_array().unwrap().iter().find(|c| c["address"] == "tenant-123/isp.config").unwrap();
    assert_eq!(isp["drift"], true);
    assert_eq!(p["summary"]["drift"], 1);
    let out = dm(r, &["drift", "--detailed-exitcode"]);
    assert_eq!(out.code, 2, "{}", out.stdout);
    assert!(out.stdout.contains("tenant-123/isp.config changed"), "{}", out.stdout);
    let out = dm(r, &["apply", "--auto-approve", "--now", NOW]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(live_entry(&state, "tenant-123/isp.config").unwrap().contains("level: info"));
    assert_eq!(dm(r, &["drift", "--detailed-exitcode"]).code, 0);
    assert_eq!(dm(r, &["plan", "--detailed-exitcode", "--now", NOW]).code, 0);

    // Removing a tenant: critical deletes, refused without --allow-delete.
    std::fs::remove_dir_all(r.join("tenants/bluesky-net")).unwrap();
    git_commit_all(r, "bluesky-net leaves");
    let p = plan_json(r);
    let deletes: Vec<&Value> = p["changes"].as_array().unwrap().iter().filter(|c| c["action"] == "delete").collect();
    assert_eq!(deletes.len(), 10);
    assert!(deletes.iter().all(|c| c["risk"] == "critical" && c["tenant"] == "bluesky-net"));
    let out = dm(r, &["apply", "--auto-approve", "--now", NOW]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("pass --allow-delete"), "{}", out.stderr);
    assert!(live_entry(&state, "bluesky-net/management.tenant").is_some(), "nothing was deleted");
    let out = dm(r, &["apply", "--auto-approve", "--allow-delete", "--now", NOW]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(live_entry(&state, "bluesky-net/management.tenant").is_none());
    assert_eq!(dm(r, &["plan", "--detailed-exitcode", "--now", NOW]).code, 0);

    // The audit log holds every change applied.
    let out = dm(r, &["audit", "--format", "json"]);
    let audit: Value = serde_json::from_str(&out.stdout).unwrap();
    let applied: Vec<&Value> =
        audit["entries"].as_array().unwrap().iter().filter(|e| e["outcome"] == "applied").collect();
    // creates; the first edit (isp.config, Deployment); the second edit with the healed drift
    // (isp.config, Deployment); the deletes
    assert_eq!(applied.len(), 60 + 2 + 2 + 10);
    assert_eq!(audit["summary"]["bluesky-net"]["changes"], 10 + 10);
    assert!(applied.iter().all(|e| e["correlation_id"].as_str().unwrap().starts_with("plan-")));
    let out = dm(r, &["audit", "--tenant", "tenant-123", "--since", "2000-01-01T00:00:00Z", "--format", "json"]);
    let a: Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(a["entries"].as_array().unwrap().iter().all(|e| e["tenant"] == "tenant-123"));
}

#[test]
fn apply_refuses_without_confirmation_when_not_on_a_terminal() {
    let repo = example_repo();
    let out = dm(repo.path(), &["apply", "--now", NOW]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("pass --auto-approve"), "{}", out.stderr);
    assert!(!repo.path().join(".dotmac/live/management").exists(), "nothing was written");
}

#[test]
fn a_failure_mid_apply_rolls_the_tenant_back_and_leaves_state_consistent() {
    let repo = example_repo();
    let r = repo.path();
    assert_eq!(dm(r, &["apply", "--auto-approve", "--now", NOW]).code, 0);
    edit(&r.join("tenants/tenant-123/tenant.yaml"), "name: Demo ISP", "name: Demo ISP Renamed");
    edit(&r.join("tenants/northwind-isp/tenant.yaml"), "name: Northwind Broadband", "name: Northwind Two");
    let before_mgmt = live_entry(&r.join(".dotmac"), "tenant-123/management.tenant").unwrap();
    // tenant-123 is applied management first: its management write succeeds, then the ISP
    // write fails. Every ISP write fails, so both tenants fail and are rolled back.
    let out = run_env(&["apply", "--auto-approve", "--now", NOW], r, &[("DOTMAC_FAULTS", "isp:put:*")]);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("failed: northwind-isp (rolled back)"), "{}", out.stderr);
    assert!(out.stderr.contains("failed: tenant-123 (rolled back)"), "{}", out.stderr);
    assert_eq!(live_entry(&r.join(".dotmac"), "tenant-123/management.tenant").unwrap(), before_mgmt);
    // State matches live: the next plan shows the same changes again, and no drift.
    let p = plan_json(r);
    assert_eq!(p["summary"]["drift"], 0, "{p}");
    assert_eq!(p["summary"]["update"], 6);
    let audit: Value = serde_json::from_str(&dm(r, &["audit", "--format", "json"]).stdout).unwrap();
    let outcomes: Vec<&str> =
        audit["entries"].as_array().unwrap().iter().map(|e| e["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes.iter().filter(|o| **o == "failed").count(), 2);
    assert_eq!(outcomes.iter().filter(|o| **o == "rolled_back").count(), 2);
    // Without the fault it converges.
    assert_eq!(dm(r, &["apply", "--auto-approve", "--now", NOW]).code, 0);
    assert_eq!(dm(r, &["plan", "--detailed-exitcode", "--now", NOW]).code, 0);
}

#[test]
fn an_apply_killed_mid_way_or_before_its_writes_are_durable_heals_on_the_next_plan() {
    let repo = example_repo();
    let r = repo.path();
    let state = r.join(".dotmac");
    // Killed right after its first write (which the local store had not flushed, so it is
    // lost with the process): the journal stays, and the next plan neither calls anything
    // drift nor misses the write.
    let out = run_env(&["apply", "--auto-approve", "--now", NOW], r, &[("DOTMAC_FAULTS", "management:put:1:kill")]);
    assert_ne!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let p = plan_json(r);
    assert_eq!(p["summary"]["drift"], 0, "{p}");
    assert_eq!(dm(r, &["apply", "--auto-approve", "--now", NOW]).code, 0);
    assert_eq!(dm(r, &["plan", "--detailed-exitcode", "--now", NOW]).code, 0);

    // Killed after recording but before the final flush: the local store's writes die with
    // the process (as a power loss would take them). The record says "renamed", live says
    // otherwise, and the journal says an apply was writing it, so it is applied again, not
    // drift. (The flush starts while the last batch is being recorded: the delay lets the
    // recording finish first.)
    let before = live_entry(&state, "tenant-123/management.tenant").unwrap();
    edit(&r.join("tenants/tenant-123/tenant.yaml"), "name: Demo ISP", "name: Demo ISP Renamed");
    let faults = "management:flush:1:delay=1s,management:flush:1:kill-before";
    let out = run_env(&["apply", "--auto-approve", "--now", NOW], r, &[("DOTMAC_FAULTS", faults)]);
    assert_ne!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(live_entry(&state, "tenant-123/management.tenant").unwrap(), before, "nothing was made durable");
    let p = plan_json(r);
    assert_eq!(p["summary"]["drift"], 0, "{p}");
    // The management store is flushed first, so the ISP and Kubernetes writes died unflushed
    // too: all three are applied again.
    let again =
        ["tenant-123/management.tenant", "tenant-123/isp.config", "tenant-123/kubernetes.Deployment[isp-framework]"];
    assert_eq!(changed_addresses(&p), again, "{p}");
    for c in p["changes"].as_array().unwrap() {
        assert!(c["reason"].as_str().unwrap().contains("interrupted apply"), "{c}");
    }
    assert_eq!(dm(r, &["apply", "--auto-approve", "--now", NOW]).code, 0);
    assert_eq!(dm(r, &["plan", "--detailed-exitcode", "--now", NOW]).code, 0);
    assert!(live_entry(&state, "tenant-123/management.tenant").unwrap().contains("Demo ISP Renamed"));
}

#[test]
fn one_tenants_failure_does_not_stop_the_others() {
    let repo = example_repo();
    let r = repo.path();
    // The 3rd management write fails: one tenant fails, the four others apply.
    let out = run_env(
        &["apply", "--auto-approve", "--now", NOW, "--parallelism", "1"],
        r,
        &[("DOTMAC_FAULTS", "management:put:3")],
    );
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("on 4 tenants, 1 failed"), "{}", out.stdout);
    let out = dm(r, &["apply", "--auto-approve", "--now", NOW]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(dm(r, &["plan", "--detailed-exitcode", "--now", NOW]).code, 0);
}

#[test]
fn a_second_apply_fails_at_once_naming_the_holder_or_waits() {
    let repo = example_repo();
    let r = repo.path();
    let lock = dotmac_gitops::state::lock::acquire(
        &r.join(".dotmac/state/lock"),
        "apply by test-holder (pid 4242)",
        std::time::Duration::ZERO,
    )
    .unwrap();
    let out = dm(r, &["apply", "--auto-approve", "--now", NOW]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("the state is locked: apply by test-holder (pid 4242)"), "{}", out.stderr);
    let t = std::time::Instant::now();
    let out = dm(r, &["apply", "--auto-approve", "--now", NOW, "--lock-timeout", "1s"]);
    assert_eq!(out.code, 1);
    assert!(t.elapsed() >= std::time::Duration::from_secs(1));
    assert!(out.stderr.contains("waited 1s"), "{}", out.stderr);
    drop(lock);
    assert_eq!(dm(r, &["apply", "--auto-approve", "--now", NOW]).code, 0);
}

#[test]
fn rotation_by_age_and_on_demand() {
    let repo = example_repo();
    let r = repo.path();
    put_secret(r, "tenant-123", "stripe/secret_key", "sk_test_value_for_age_check");
    assert_eq!(dm(r, &["apply", "--auto-approve", "--now", NOW]).code, 0);
    // Half a year on, generated secrets are past their intervals: rotate, high risk.
    let out = dm(r, &["plan", "--format", "json", "--now", "2027-06-01T00:00:00Z"]);
    let p: Value = serde_json::from_str(&out.stdout).unwrap();
    let rotations: Vec<&Value> = p["changes"].as_array().unwrap().iter().filter(|c| c["action"] == "rotate").collect();
    assert_eq!(rotations.len(), 4, "{}", out.stdout);
    assert!(rotations.iter().all(|c| c["risk"] == "high"));
    // External secrets past their interval are compliance warnings.
    assert!(p["violations"].as_array().unwrap().iter().any(|v| v["rule"] == "external-secret-age"));
    // rotate --emergency writes new versions now.
    let out = dm(r, &["rotate", "--tenant", "tenant-123", "--tenant", "northwind-isp", "--emergency"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let audit: Value = serde_json::from_str(&dm(r, &["audit", "--format", "json"]).stdout).unwrap();
    let emergency: Vec<&Value> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "rotate" && e["risk"] == "critical")
        .collect();
    assert_eq!(emergency.len(), 3);
    assert_eq!(dm(r, &["plan", "--detailed-exitcode", "--now", NOW]).code, 0, "rotation is recorded");
    let out = dm(r, &["rotate", "--tenant", "tenant-123", "--secret", "stripe/secret_key"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("is external"), "{}", out.stderr);
}

#[test]
fn a_missing_external_secret_fails_the_plan_with_its_name() {
    let repo = example_repo();
    let r = repo.path();
    edit(&r.join("dotmac.toml"), "dev_placeholders = true", "dev_placeholders = false");
    let out = dm(r, &["plan", "--now", NOW, "--tenant", "coastal-wireless"]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        out.stdout.contains("tenant coastal-wireless: external secret `quickbooks/client_secret` is missing"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("secret put --tenant coastal-wireless --name quickbooks/client_secret"));
    // Put it: the plan passes.
    put_secret(r, "coastal-wireless", "quickbooks/client_secret", "qb-secret-value\n");
    let out = dm(r, &["plan", "--now", NOW, "--tenant", "coastal-wireless", "--detailed-exitcode"]);
    assert_eq!(out.code, 2, "{}", out.stdout);
    let out = dm(r, &["apply", "--auto-approve", "--now", NOW, "--tenant", "coastal-wireless"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
}

#[test]
fn a_generated_repository_plans_applies_and_replans_empty() {
    let repo = generated_repo(40, 3);
    let r = repo.path();
    let out = dm(r, &["apply", "--auto-approve", "--now", NOW]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = dm(r, &["plan", "--detailed-exitcode", "--now", NOW]);
    assert_eq!(out.code, 0, "{}", out.stdout);
}

#[test]
fn apply_reports_management_and_isp_disagreeing_after_it_wrote_them() {
    let repo = example_repo();
    let r = repo.path();
    // A repository template that prints another plan into the ISP configuration than the
    // management record holds.
    let template = std::fs::read_to_string(project().join("templates/isp_config.yaml.j2")).unwrap();
    assert!(template.contains("  name: {{ plan.name }}"));
    std::fs::write(
        r.join("templates/isp_config.yaml.j2"),
        template.replace("  name: {{ plan.name }}", "  name: basic"),
    )
    .unwrap();
    let out = dm(r, &["apply", "--auto-approve", "--now", NOW]);
    // Both sides were written (and read back unchanged), so both are compared as written.
    assert_eq!(out.code, 1, "a disagreement is reported with exit code 1:\n{}", out.stderr);
    let lines: Vec<&str> =
        out.stderr.lines().filter(|l| l.contains("management and ISP framework disagree on plan")).collect();
    assert_eq!(lines.len(), 3, "one per tenant whose plan is not basic:\n{}", out.stderr);
    assert!(
        lines.iter().any(|l| l.contains("tenant tenant-123:") && l.contains("\"premium\" vs \"basic\"")),
        "{lines:?}"
    );

    // Only the ISP side changes now: the management record is read from the store.
    let t = std::fs::read_to_string(r.join("templates/isp_config.yaml.j2")).unwrap();
    std::fs::write(r.join("templates/isp_config.yaml.j2"), t.replace("  name: basic", "  name: enterprise")).unwrap();
    let plan = plan_json(r);
    // (The Deployments roll with the configuration's checksum.)
    assert!(changed_addresses(&plan).iter().all(|a| !a.contains("/management.")), "{plan:#}");
    let out = dm(r, &["apply", "--auto-approve", "--now", NOW]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.lines().any(|l| l.contains("tenant tenant-123: management and ISP framework disagree on plan")
            && l.contains("\"premium\" vs \"enterprise\"")),
        "{}",
        out.stderr
    );
}

/// A tenant folder whose files have the `stat`s the render cache recorded is not read again
/// (git's test of "unchanged"), nor listed while the folder keeps its own `stat`. A change
/// is still seen even if it keeps the file's size and mtime, a file removed is seen, and a
/// folder not read is read when the plan needs its content.
#[test]
fn tenant_folders_known_by_stat_are_not_read_and_every_change_is_still_seen() {
    let repo = example_repo();
    let r = repo.path();
    let debug = [("DOTMAC_LOG", "dotmac_gitops=debug")];
    // A file changed less than a second before a read cannot vouch by its `stat`.
    let settle = || std::thread::sleep(std::time::Duration::from_millis(1100));
    settle();
    let out = run_env(&["apply", "--auto-approve", "--now", NOW], r, &debug);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains(" unread=0 "), "the first run reads everything: {}", out.stderr);
    let out = run_env(&["plan", "--detailed-exitcode", "--now", NOW], r, &debug);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains(" unread=5 "), "no tenant folder read: {}", out.stderr);
    assert!(out.stderr.contains(" listed_from_cache=5\n"), "no tenant folder listed again: {}", out.stderr);

    // Drift in a tenant whose files were not read: the plan renders it from the files.
    let state = r.join(".dotmac");
    edit_live(&state, "tenant-123/isp.config", "level: info", "level: debug");
    let p = plan_json(r);
    assert_eq!(changed_addresses(&p), ["tenant-123/isp.config"]);
    assert_eq!(p["changes"][0]["drift"], true);
    assert!(p["changes"][0]["diff"].as_str().unwrap().contains("+  level: info"), "{}", p["changes"][0]);

    // The same size and the same mtime, other content: the ctime tells.
    let file = r.join("tenants/tenant-123/tenant.yaml");
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    edit(&file, "sync_interval_minutes: 15", "sync_interval_minutes: 16");
    std::fs::File::options().write(true).open(&file).unwrap().set_modified(mtime).unwrap();
    settle();
    let p = plan_json(r);
    let isp = p["changes"].as_array().unwrap().iter().find(|c| c["address"] == "tenant-123/isp.config").unwrap();
    assert!(isp["diff"].as_str().unwrap().contains("+    sync_interval_minutes: 16"), "{isp}");

    // A file removed from a folder known by its `stat` (its listing taken from the cache):
    // the folder's own `stat` moved, so it is listed again and the file is gone (not a file
    // that cannot be read).
    std::fs::remove_file(r.join("tenants/tenant-123/licenses.yaml")).unwrap();
    settle();
    let out = run_env(&["plan", "--now", NOW], r, &debug);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(!out.stderr.contains(" listed_from_cache=5\n"), "{}", out.stderr);
    assert!(
        out.stderr.contains("error[not-entitled]: feature `white_labeling`") && !out.stderr.contains("licenses.yaml`"),
        "the features its licenses gave are no longer entitled, and the file is not missed: {}",
        out.stderr
    );
}

#[test]
fn a_plan_names_the_commit_only_when_the_files_it_reads_are_that_commit() {
    let repo = example_repo();
    let r = repo.path();
    let commit = git_commit_all(r, "example");
    let revision = |r: &Path| plan_json(r)["revision"].clone();
    assert_eq!(revision(r), commit.as_str(), "a clean work tree plans its commit");
    // Live state and other files the engine does not read change nothing.
    std::fs::create_dir_all(r.join(".dotmac/x")).unwrap();
    std::fs::write(r.join(".dotmac/x/y"), "untracked").unwrap();
    std::fs::write(r.join("NOTES.txt"), "untracked").unwrap();
    assert_eq!(revision(r), commit.as_str());
    type Change<'a> = (&'a str, &'a dyn Fn(&Path));
    let cases: [Change; 5] = [
        ("a modified tenant file", &|r| edit_file(&r.join("tenants/tenant-123/tenant.yaml"), "15", "16")),
        ("a modified dotmac.toml", &|r| {
            let p = r.join("dotmac.toml");
            std::fs::write(&p, std::fs::read_to_string(&p).unwrap() + "\n# a comment\n").unwrap();
        }),
        ("an untracked template", &|r| {
            std::fs::create_dir_all(r.join("templates/extra")).unwrap();
            std::fs::write(r.join("templates/extra/x.j2"), "{# x #}").unwrap();
        }),
        ("an ignored template the engine reads", &|r| {
            std::fs::write(r.join("templates/x.ignored.j2"), "{# x #}").unwrap();
        }),
        ("a deleted template", &|r| std::fs::remove_file(r.join("templates/kubernetes/deployment.yaml.j2")).unwrap()),
    ];
    std::fs::write(r.join(".gitignore"), "*.ignored.j2\n.dotmac/\n").unwrap();
    let commit = git_commit_all(r, "ignore");
    for (what, change) in cases {
        change(r);
        assert_eq!(revision(r), Value::Null, "{what}: not the commit");
        git(r, &["reset", "-q", "--hard"]);
        git(r, &["clean", "-qfdX", "templates"]);
        git(r, &["clean", "-qfd", "templates"]);
        assert_eq!(revision(r), commit.as_str(), "after undoing {what}");
    }
    // Staged but not committed is not the commit either.
    edit_file(&r.join("tenants/tenant-123/tenant.yaml"), "15", "16");
    git(r, &["add", "tenants"]);
    assert_eq!(revision(r), Value::Null, "a staged change");
}
