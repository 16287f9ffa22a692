//! `diff --base --head` on repositories committed with git2: which tenants a change reaches,
//! what changes, the Markdown for a pull-request comment and its size cap.

use crate::util::*;
use serde_json::Value;
use std::path::Path;

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no `{from}`", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

/// `diff --format json` between two commits; the exit code must be `code`.
fn diff_json(repo: &Path, base: &str, head: &str, code: i32) -> Value {
    let out = run(&["diff", "--base", base, "--head", head, "--format", "json", "--now", NOW], repo);
    assert_eq!(out.code, code, "{}{}", out.stdout, out.stderr);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_owned()).collect()
}

fn addresses(d: &Value) -> Vec<String> {
    d["changes"].as_array().unwrap().iter().map(|c| c["address"].as_str().unwrap().to_owned()).collect()
}

/// The example repository committed once; returns it and the commit.
fn example_committed() -> (tempfile::TempDir, String) {
    let repo = example_repo();
    let base = git_commit_all(repo.path(), "example");
    (repo, base)
}

const ALL_FIVE: [&str; 5] = ["bluesky-net", "coastal-wireless", "northwind-isp", "pampas-telecom", "tenant-123"];

#[test]
fn a_tenant_edit_reaches_only_that_tenant() {
    let (repo, base) = example_committed();
    let r = repo.path();
    edit(&r.join("tenants/tenant-123/tenant.yaml"), "sync_interval_minutes: 15", "sync_interval_minutes: 20");
    let head = git_commit_all(r, "tenant-123: sync every 20 minutes");
    let d = diff_json(r, &base, &head, 0);
    assert_eq!(strings(&d["tenants"]), ["tenant-123"]);
    assert_eq!(d["files"][0]["path"], "tenants/tenant-123/tenant.yaml");
    assert_eq!(d["files"][0]["status"], "modified");
    assert_eq!(addresses(&d), ["tenant-123/isp.config", "tenant-123/kubernetes.Deployment[isp-framework]"]);
    let isp = &d["changes"][0];
    assert_eq!((isp["action"].as_str(), isp["risk"].as_str()), (Some("update"), Some("medium")));
    assert!(isp["diff"].as_str().unwrap().contains("+    sync_interval_minutes: 20"));
    assert_eq!(d["summary"]["highest_risk"], "medium");
    assert_eq!(strings(&d["changed_tenants"]), ["tenant-123"]);
    assert_eq!(d["valid"], true);

    // Branch names work as revisions, and --detailed-exitcode says "changes" with 2.
    let out = run(&["diff", "--base", &base, "--head", "HEAD", "--detailed-exitcode", "--now", NOW], r);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stdout.contains("Diff: 0 to create, 2 to update, 0 to delete on 1 tenant; highest risk medium."));
}

#[test]
fn a_template_edit_reaches_every_tenant() {
    let (repo, base) = example_committed();
    let r = repo.path();
    edit(&r.join("templates/kubernetes/deployment.yaml.j2"), "app: isp-framework", "app: isp-framework-v2");
    let head = git_commit_all(r, "template");
    let d = diff_json(r, &base, &head, 0);
    assert_eq!(strings(&d["tenants"]), ALL_FIVE);
    assert_eq!(strings(&d["changed_tenants"]), ALL_FIVE);
    assert!(
        d["changes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["address"].as_str().unwrap().ends_with("kubernetes.Deployment[isp-framework]"))
    );
    assert!(d["reasons"][0].as_str().unwrap().contains("every tenant"));

    // A comment in dotmac.toml means nothing; a value does (every tenant is compared).
    std::fs::write(r.join("dotmac.toml"), std::fs::read_to_string(r.join("dotmac.toml")).unwrap() + "# a note\n")
        .unwrap();
    let h2 = git_commit_all(r, "comment");
    assert_eq!(strings(&diff_json(r, &head, &h2, 0)["tenants"]), Vec::<String>::new());
    edit(
        &r.join("dotmac.toml"),
        "kind = \"local\"                # or \"kubernetes\"",
        "kind = \"none\"                # or \"kubernetes\"",
    );
    let h3 = git_commit_all(r, "no kubernetes");
    let d = diff_json(r, &h2, &h3, 0);
    assert_eq!(strings(&d["tenants"]), ALL_FIVE);
    // Resources of a provider switched off are no longer managed: they do not show as deletes.
    assert_eq!(addresses(&d), Vec::<String>::new());
    assert_eq!(d["notes"][0]["rule"], "provider-off");
    assert!(d["notes"][0]["message"].as_str().unwrap().contains("kubernetes provider is switched off"));
}

#[test]
fn a_catalog_edit_reaches_the_tenants_on_the_changed_plan() {
    let (repo, base) = example_committed();
    let r = repo.path();
    edit(&r.join("catalog/plans.yaml"), "api_rate_limit: 1000\n", "api_rate_limit: 2000\n");
    let head = git_commit_all(r, "premium: more API calls");
    let d = diff_json(r, &base, &head, 0);
    assert_eq!(strings(&d["tenants"]), ["coastal-wireless", "tenant-123"], "the tenants on plan premium");
    assert!(d["reasons"].to_string().contains("plan `premium`"), "{}", d["reasons"]);
    assert!(addresses(&d).iter().all(|a| a.starts_with("coastal-wireless/") || a.starts_with("tenant-123/")));
    assert!(!addresses(&d).is_empty());

    // An environment: the tenants in it.
    let env = std::fs::read_to_string(r.join("environments/staging.yaml")).unwrap();
    let users: Vec<&str> = ALL_FIVE
        .iter()
        .copied()
        .filter(|t| {
            std::fs::read_to_string(r.join(format!("tenants/{t}/tenant.yaml")))
                .unwrap()
                .contains("environment: staging")
        })
        .collect();
    assert!(!users.is_empty());
    std::fs::write(r.join("environments/staging.yaml"), env.replace("values:\n", "values:\n  extra_flag: on\n"))
        .unwrap();
    let h2 = git_commit_all(r, "staging");
    assert_eq!(strings(&diff_json(r, &head, &h2, 0)["tenants"]), users);

    // Reformatting a catalog changes no entry: nothing is compared.
    std::fs::write(
        r.join("catalog/plans.yaml"),
        std::fs::read_to_string(r.join("catalog/plans.yaml")).unwrap() + "\n# note\n",
    )
    .unwrap();
    let h3 = git_commit_all(r, "note");
    let d = diff_json(r, &h2, &h3, 0);
    assert_eq!(strings(&d["tenants"]), Vec::<String>::new());
    assert_eq!(d["files"][0]["path"], "catalog/plans.yaml");
}

#[test]
fn a_deleted_tenant_shows_as_deletes_and_an_added_one_as_creates() {
    let (repo, base) = example_committed();
    let r = repo.path();
    std::fs::remove_dir_all(r.join("tenants/bluesky-net")).unwrap();
    let head = git_commit_all(r, "bluesky-net leaves");
    let d = diff_json(r, &base, &head, 0);
    assert_eq!(strings(&d["tenants"]), ["bluesky-net"]);
    let changes = d["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 10);
    assert!(changes.iter().all(|c| c["action"] == "delete" && c["risk"] == "critical"));
    assert_eq!(d["files"].as_array().unwrap().len(), 3);
    assert!(d["files"].as_array().unwrap().iter().all(|f| f["status"] == "deleted"));

    // Back again: everything is created.
    let back = diff_json(r, &head, &base, 0);
    assert!(back["changes"].as_array().unwrap().iter().all(|c| c["action"] == "create"));
    assert_eq!(back["changes"].as_array().unwrap().len(), 10);
}

#[test]
fn a_renamed_file_reaches_both_folders() {
    let (repo, base) = example_committed();
    let r = repo.path();
    // A move with the id unchanged: both folders are read, nothing changes.
    std::fs::rename(r.join("tenants/pampas-telecom"), r.join("tenants/pampas")).unwrap();
    let head = git_commit_all(r, "move");
    let d = diff_json(r, &base, &head, 0);
    assert_eq!(d["files"][0]["status"], "renamed");
    assert_eq!(d["files"][0]["path"], "tenants/pampas/tenant.yaml");
    assert_eq!(d["files"][0]["old_path"], "tenants/pampas-telecom/tenant.yaml");
    assert!(d["reasons"][0].as_str().unwrap().contains("tenants/pampas, tenants/pampas-telecom"));
    assert_eq!(strings(&d["tenants"]), ["pampas-telecom"]);
    assert_eq!(addresses(&d), Vec::<String>::new());

    // A move that changes the id: the old id's resources go, the new id's come.
    std::fs::rename(r.join("tenants/pampas"), r.join("tenants/pampas-net")).unwrap();
    let t = r.join("tenants/pampas-net/tenant.yaml");
    std::fs::write(&t, std::fs::read_to_string(&t).unwrap().replace(": pampas-telecom", ": pampas-net")).unwrap();
    let h2 = git_commit_all(r, "rename the tenant");
    let d = diff_json(r, &head, &h2, 0);
    assert_eq!(strings(&d["tenants"]), ["pampas-net", "pampas-telecom"]);
    let changes = d["changes"].as_array().unwrap();
    assert!(changes.iter().filter(|c| c["tenant"] == "pampas-telecom").all(|c| c["action"] == "delete"));
    assert!(changes.iter().filter(|c| c["tenant"] == "pampas-net").all(|c| c["action"] == "create"));
    assert!(changes.iter().any(|c| c["tenant"] == "pampas-net"));
}

#[test]
fn errors_at_head_are_reported_and_fail() {
    let (repo, base) = example_committed();
    let r = repo.path();
    edit(&r.join("tenants/tenant-123/tenant.yaml"), "plan: premium", "plan: premum");
    edit(&r.join("tenants/coastal-wireless/tenant.yaml"), "name:", "name:");
    let head = git_commit_all(r, "typo");
    let d = diff_json(r, &base, &head, 1);
    assert_eq!(d["valid"], false);
    assert_eq!(d["errors"], 1);
    assert_eq!(d["diagnostics"][0]["tenant"], "tenant-123");
    assert!(d["diagnostics"][0]["message"].as_str().unwrap().contains("plan `premum` does not exist"));
    assert_eq!(d["diagnostics"][0]["file"], "tenants/tenant-123/tenant.yaml");
    assert!(d["diagnostics"][0]["line"].as_u64().is_some());
    // A tenant that does not validate is not compared (it would look deleted).
    assert_eq!(strings(&d["unchecked"]), ["tenant-123"]);
    assert_eq!(addresses(&d), Vec::<String>::new());

    // Markdown lists it, stderr shows it with its source line, the exit code is 1.
    let out = run(&["diff", "--base", &base, "--head", &head, "--format", "markdown", "--now", NOW], r);
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("| ❌ error | `tenant-123` | unknown-reference |"), "{}", out.stdout);
    assert!(out.stderr.contains("tenants/tenant-123/tenant.yaml:"), "{}", out.stderr);
    assert!(out.stderr.contains("plan: premum"), "{}", out.stderr);

    // A folder named like a selected tenant's id is read too: a duplicate id is caught.
    let (repo, base) = example_committed();
    let r = repo.path();
    std::fs::create_dir_all(r.join("tenants/zz-copy")).unwrap();
    std::fs::copy(r.join("tenants/tenant-123/tenant.yaml"), r.join("tenants/zz-copy/tenant.yaml")).unwrap();
    let head = git_commit_all(r, "copy");
    let d = diff_json(r, &base, &head, 1);
    assert!(d["diagnostics"].to_string().contains("tenant id `tenant-123` is used twice"), "{}", d["diagnostics"]);
}

#[test]
fn secrets_are_compared_by_declaration_and_shown_as_sensitive() {
    let (repo, base) = example_committed();
    let r = repo.path();
    let secrets = r.join("tenants/tenant-123/secrets.yaml");
    edit(&secrets, "webhooks/platform: {generate: {length: 48}}", "webhooks/platform: {generate: {length: 64}}");
    edit(
        &secrets,
        "plugin_licenses/white_labeling: {external: true}",
        "plugin_licenses/white_labeling: {external: true}\n  crm/token: {generate: {length: 40, charset: hex}}",
    );
    let head = git_commit_all(r, "secrets");
    let d = diff_json(r, &base, &head, 0);
    let secret = |name: &str| {
        d["changes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["address"] == format!("tenant-123/openbao.secret[{name}]"))
            .cloned()
            .unwrap()
    };
    let changed = secret("webhooks/platform");
    assert_eq!((changed["action"].as_str(), changed["risk"].as_str()), (Some("update"), Some("high")));
    let diff = changed["diff"].as_str().unwrap();
    assert!(
        diff.contains("-(sensitive) generated, 48 alphanumeric characters, rotated every 30 days (automatically)"),
        "{diff}"
    );
    assert!(diff.contains("+(sensitive) generated, 64 alphanumeric"), "{diff}");
    assert_eq!(changed["after"]["value"], "(sensitive)");
    let added = secret("crm/token");
    assert_eq!((added["action"].as_str(), added["risk"].as_str()), (Some("create"), Some("high")));
    assert!(added["diff"].as_str().unwrap().contains("+(sensitive) generated, 40 hex characters"));
}

#[test]
fn what_the_engine_does_not_read_changes_nothing() {
    let (repo, base) = example_committed();
    let r = repo.path();
    std::fs::write(r.join("README.md"), "changed\n").unwrap();
    std::fs::write(r.join("tenants/tenant-123/NOTES.md"), "notes\n").unwrap();
    let head = git_commit_all(r, "docs");
    let d = diff_json(r, &base, &head, 0);
    assert_eq!(strings(&d["tenants"]), Vec::<String>::new());
    assert_eq!(d["files"].as_array().unwrap().len(), 2);
    let out = run(&["diff", "--base", &base, "--head", &head, "--now", NOW], r);
    assert!(out.stdout.contains("No changes in the rendered resources of the tenants compared."), "{}", out.stdout);

    // Bad input is named.
    let out = run(&["diff", "--base", "no-such-branch", "--head", &head], r);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("--base: unknown revision `no-such-branch`"), "{}", out.stderr);
    let out = run(&["--rev", &head, "diff", "--base", &base, "--head", &head], r);
    assert!(out.code == 1 && out.stderr.contains("--rev does not apply to diff"), "{}", out.stderr);
    let out = run(&["diff", "--base", &base, "--head", &head, "--max-chars", "60000"], r);
    assert!(out.code == 1 && out.stderr.contains("add --format markdown"), "{}", out.stderr);
}

#[test]
fn a_repository_in_a_subfolder_of_the_git_repository() {
    let outer = tempfile::tempdir().unwrap();
    copy_tree(&project().join("example-repo"), &outer.path().join("desired"));
    std::fs::write(outer.path().join("app.txt"), "1\n").unwrap();
    let base = git_commit_all(outer.path(), "base");
    let r = outer.path().join("desired");
    edit(&r.join("tenants/tenant-123/tenant.yaml"), "status: active", "status: suspended");
    std::fs::write(outer.path().join("app.txt"), "2\n").unwrap();
    let head = git_commit_all(outer.path(), "suspend tenant-123");
    let d = diff_json(&r, &base, &head, 0);
    assert_eq!(d["files"].as_array().unwrap().len(), 1, "{}", d["files"]);
    assert_eq!(d["files"][0]["path"], "tenants/tenant-123/tenant.yaml");
    assert_eq!(strings(&d["tenants"]), ["tenant-123"]);
    assert_eq!(d["summary"]["highest_risk"], "critical", "a suspension is critical");
}

/// Base and head ids vary between runs (commit times): name them for the snapshot.
fn stable(md: &str, base: &str, head: &str) -> String {
    md.replace(&base[..12], "<base>").replace(&head[..12], "<head>")
}

#[test]
fn markdown_for_a_pull_request_comment() {
    let (repo, base) = example_committed();
    let r = repo.path();
    edit(&r.join("tenants/tenant-123/tenant.yaml"), "sync_interval_minutes: 15", "sync_interval_minutes: 20");
    edit(&r.join("tenants/tenant-123/secrets.yaml"), "{generate: {length: 48}}", "{generate: {length: 64}}");
    std::fs::remove_dir_all(r.join("tenants/pampas-telecom")).unwrap();
    let head = git_commit_all(r, "a pull request");
    let args = [
        "diff",
        "--base",
        &base,
        "--head",
        &head,
        "--format",
        "markdown",
        "--marker",
        "dotmac-gitops:diff:.",
        "--max-chars",
        "65536",
        "--now",
        NOW,
    ];
    let out = run(&args, r);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.starts_with("<!-- dotmac-gitops:diff:. -->\n## dotmac-gitops diff\n"));
    insta::assert_snapshot!("prdiff__markdown_comment", stable(&out.stdout, &base, &head));
}

#[test]
fn the_comment_fits_when_every_tenant_changes() {
    let repo = generated_repo(300, 5);
    let r = repo.path();
    let base = git_commit_all(r, "generated");
    // A template edit that changes every tenant's ConfigMap-free resources: the
    // namespace label and the deployment.
    edit(
        &r.join("templates/kubernetes/namespace.yaml.j2"),
        "dotmac.io/plan: {{ plan.name }}",
        "dotmac.io/plan: {{ plan.name }}\n    dotmac.io/region: {{ tenant.region }}",
    );
    edit(
        &r.join("templates/kubernetes/deployment.yaml.j2"),
        "value: \"{{ plan.name }}\"",
        "value: \"{{ plan.name | upper }}\"",
    );
    let head = git_commit_all(r, "label every namespace with its region");
    let summary = r.join("summary.md");
    std::fs::write(&summary, "earlier steps wrote this\n").unwrap();
    let outputs = r.join("outputs.txt");
    let out = run(
        &[
            "diff",
            "--base",
            &base,
            "--head",
            &head,
            "--format",
            "markdown",
            "--max-chars",
            "65536",
            "--marker",
            "m",
            "--summary-file",
            summary.to_str().unwrap(),
            "--github-output",
            outputs.to_str().unwrap(),
            "--full-report",
            "the job summary (https://example.invalid/run/1)",
            "--now",
            NOW,
        ],
        r,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let md = &out.stdout;
    assert!(md.len() <= 65_536 && md.encode_utf16().count() <= 65_536, "{} bytes", md.len());
    assert!(md.contains("**300 tenants**: 0 resources added, 600 changed"), "{}", &md[..600]);
    assert!(md.contains("| `kubernetes.Namespace[dotmac-tenant-<tenant>]` | ~ update | 300: "), "{}", &md[..3000]);
    assert!(md.contains("> **Truncated** to stay within 65536 characters:"), "{}", &md[md.len() - 800..]);
    assert!(
        md.contains("tenants (")
            && md.contains("are left out. The full report is in the job summary (https://example.invalid/run/1).")
    );
    assert_eq!(md.matches("```diff").count() * 2, md.matches("```").count(), "fences are closed");
    assert_eq!(md.matches("<details>").count(), md.matches("</details>").count());

    // The job summary has the whole report, after what was there.
    let full = std::fs::read_to_string(&summary).unwrap();
    assert!(full.starts_with("earlier steps wrote this\n\n## dotmac-gitops diff"));
    assert!(full.len() <= 1024 * 1024);
    assert_eq!(full.matches("<details>").count(), 300);
    assert!(!full.contains("Truncated"));
    assert!(!full.contains("<!-- m -->"), "the marker belongs to the comment only");

    let outputs = std::fs::read_to_string(&outputs).unwrap();
    assert!(outputs.contains("has-changes=true\nhighest-risk=low\nerrors=0\n"), "{outputs}");
    assert!(outputs.starts_with("changed-tenants=[\"tenant-000000\",\"tenant-000001\","));
}
