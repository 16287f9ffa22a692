//! The template sandbox: what a hostile template cannot do, each failing fast with a clear
//! error that names the template (the fixtures' snapshots hold the full messages).

use crate::util::*;

fn validate(case: &str) -> Output {
    let repo = fixture_repo(case);
    run(&["validate", "--repo", repo.path().to_str().unwrap(), "--now", NOW], repo.path())
}

#[test]
fn include_traversal_and_absolute_names_are_refused() {
    for case in ["template-include-traversal", "template-include-absolute"] {
        let out = validate(case);
        assert_eq!(out.code, 1);
        assert!(out.stdout.contains("is not allowed: names are relative to templates/"), "{case}: {}", out.stdout);
        assert!(out.stdout.contains("templates/feature_config.j2"), "{case}: {}", out.stdout);
        assert!(!out.stdout.contains("root:"), "{case}: file content leaked");
    }
}

#[test]
fn endless_loops_run_out_of_fuel() {
    let out = validate("template-infinite-loop");
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("ran out of fuel"), "{}", out.stdout);
}

#[test]
fn runaway_recursion_is_stopped() {
    let out = validate("template-runaway-recursion");
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("recursion"), "{}", out.stdout);
}

#[test]
fn python_style_escapes_reach_nothing() {
    let out = validate("template-python-escapes");
    assert_eq!(out.code, 1);
    // Each of the four templates fails on an undefined name, and nothing was executed.
    assert_eq!(out.stdout.matches("error[template]").count(), 4, "{}", out.stdout);
    assert!(!out.stdout.contains("uid="), "{}", out.stdout);
}

#[test]
fn output_and_memory_are_bounded() {
    let out = validate("template-output-limit");
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("larger than 2048 bytes"), "{}", out.stdout);
    let out = validate("template-memory-bomb");
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("error[template-memory]"), "{}", out.stderr);
    assert!(out.stderr.contains("isp_config.yaml.j2 for tenant t1"), "{}", out.stderr);
}

#[test]
fn symlinked_templates_and_documents_out_of_the_repo_are_not_read() {
    let out = validate("symlink-outside");
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("templates/feature_config.j2"), "{}", out.stdout);
    assert!(out.stdout.contains("tenants/t1/passwd.yaml"), "{}", out.stdout);
    assert!(!out.stdout.contains("root:"), "{}", out.stdout);
}

#[test]
fn repository_values_are_data_never_templates() {
    let repo = fixture_repo("values-are-data");
    let out = run(&["render", "--repo", repo.path().to_str().unwrap(), "--now", NOW, "--tenant", "t1"], repo.path());
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("{{ 7*7 }} {% raw %}x{% endraw %} {{ lipsum }}"), "{}", out.stdout);
    assert!(!out.stdout.contains("49"), "{}", out.stdout);
}
