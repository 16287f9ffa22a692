//! `validate` over the corpus of broken repositories in tests/fixtures: every case exits 1
//! with messages naming the file (snapshotted), never panics, never hangs, and stays within
//! the memory limit the harness sets.

use crate::util::*;

/// Cases that are valid on purpose (they show what is accepted).
const VALID: &[&str] = &["yaml-bom-crlf", "values-are-data", "yaml-many-documents"];

fn cases() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| !n.starts_with('_'))
        .collect();
    v.sort();
    v
}

#[test]
fn every_fixture_case_is_reported_with_its_file_and_the_right_exit_code() {
    let mut failures = Vec::new();
    for case in cases() {
        let repo = fixture_repo(&case);
        let path = repo.path().to_str().unwrap();
        let out = run(&["validate", "--repo", path, "--now", NOW], repo.path());
        let transcript = out.transcript(repo.path());
        insta::assert_snapshot!(format!("validate__{case}"), transcript);
        let want = if VALID.contains(&case.as_str()) { 0 } else { 1 };
        if out.code != want {
            failures.push(format!("{case}: exit {} (want {want})", out.code));
        }
        if transcript.contains("panicked") {
            failures.push(format!("{case}: panicked"));
        }
        // Hostile names and files never reach the terminal as control characters.
        if let Some(c) = transcript.chars().find(|c| c.is_control() && !matches!(c, '\n' | '\t')) {
            failures.push(format!("{case}: prints the control character {c:?}"));
        }
        if want == 1 && !(out.stdout.contains("-->") || out.stderr.contains("error")) {
            failures.push(format!("{case}: no located message"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn json_output_carries_file_line_pointer_and_tenant() {
    let repo = fixture_repo("unknown-references");
    let path = repo.path().to_str().unwrap();
    let out = run(&["validate", "--repo", path, "--now", NOW, "--format", "json"], repo.path());
    assert_eq!(out.code, 1);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    let d =
        v["diagnostics"].as_array().unwrap().iter().find(|d| d["pointer"] == "/plan").expect("a diagnostic at /plan");
    assert_eq!(d["file"], "tenants/t1/tenant.yaml");
    assert_eq!(d["line"], 5);
    assert_eq!(d["tenant"], "t1");
    assert_eq!(d["severity"], "error");
    assert!(d["help"].as_str().unwrap().contains("premium"), "{d}");
}

#[test]
fn a_sixty_megabyte_file_is_refused_quickly_without_reading_it() {
    let repo = fixture_repo("_base");
    let big = repo.path().join("tenants/t1/huge.yaml");
    let line = "# padding padding padding padding padding padding padding padding\n";
    let mut text = String::with_capacity(61 * 1024 * 1024);
    while text.len() < 60 * 1024 * 1024 {
        text.push_str(line);
    }
    std::fs::write(&big, text).unwrap();
    let out = run(&["validate", "--repo", repo.path().to_str().unwrap(), "--now", NOW], repo.path());
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stdout.contains("tenants/t1/huge.yaml"), "{}", out.stdout);
    assert!(out.stdout.contains("over the limit of 8388608 bytes"), "{}", out.stdout);
}

#[test]
fn the_example_repository_is_valid() {
    let repo = example_repo();
    let out = run(&["validate", "--now", NOW], repo.path());
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("valid: 5 tenants"), "{}", out.stdout);
}

#[test]
fn repo_is_found_upwards_from_a_subfolder() {
    let repo = example_repo();
    let sub = repo.path().join("tenants/tenant-123");
    let out = run(&["validate", "--now", NOW], &sub);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
}

#[test]
fn a_git_revision_is_read_from_its_tree_not_the_work_tree() {
    let repo = fixture_repo("_base");
    let first = git_commit_all(repo.path(), "first");
    // Break the work tree after the commit: the commit is still valid.
    let t = repo.path().join("tenants/t1/tenant.yaml");
    let text = std::fs::read_to_string(&t).unwrap().replace("plan: premium", "plan: nope");
    std::fs::write(&t, text).unwrap();
    let path = repo.path().to_str().unwrap();
    let worktree = run(&["validate", "--repo", path, "--now", NOW], repo.path());
    assert_eq!(worktree.code, 1);
    let at_rev = run(&["validate", "--repo", path, "--rev", &first, "--now", NOW], repo.path());
    assert_eq!(at_rev.code, 0, "{}{}", at_rev.stdout, at_rev.stderr);
    let head = run(&["validate", "--repo", path, "--rev", "HEAD", "--now", NOW], repo.path());
    assert_eq!(head.code, 0);
    let bad = run(&["validate", "--repo", path, "--rev", "no-such-branch", "--now", NOW], repo.path());
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("unknown revision `no-such-branch`"), "{}", bad.stderr);
}

#[test]
fn a_symlink_out_of_the_repository_in_a_commit_is_not_followed() {
    let repo = fixture_repo("_base");
    std::os::unix::fs::symlink("../../../../../../etc/passwd", repo.path().join("tenants/t1/passwd.yaml")).unwrap();
    let commit = git_commit_all(repo.path(), "with a link");
    let path = repo.path().to_str().unwrap();
    let out = run(&["validate", "--repo", path, "--rev", &commit, "--now", NOW], repo.path());
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("tenants/t1/passwd.yaml"), "{}", out.stdout);
    assert!(out.stdout.contains("outside the repository"), "{}", out.stdout);
    assert!(!out.stdout.contains("root:"), "the linked file's content leaked: {}", out.stdout);
}

#[test]
fn files_just_under_the_size_limit_are_read_within_the_memory_limit() {
    // One 7.5 MiB string, and a million-item list, each in a file just under 8 MiB: read,
    // validated and rendered (or refused) under the harness's address-space limit and hang
    // guard.
    let repo = fixture_repo("_base");
    let big = "x".repeat(7_500_000);
    std::fs::write(
        repo.path().join("environments/big.yaml"),
        format!("kind: Environment\nname: big\nvalues:\n  blob: \"{big}\"\n"),
    )
    .unwrap();
    let items = "1, ".repeat(1_000_000);
    std::fs::write(
        repo.path().join("environments/long.yaml"),
        format!("kind: Environment\nname: long\nvalues:\n  list: [{items}]\n"),
    )
    .unwrap();
    let out = run(&["validate", "--repo", repo.path().to_str().unwrap(), "--now", NOW], repo.path());
    assert!(out.code == 0 || out.code == 1, "{}{}", out.stdout, out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert_eq!(out.code, 0, "both files are valid:\n{}{}", out.stdout, out.stderr);
}
