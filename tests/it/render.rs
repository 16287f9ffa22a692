//! `render` on the example repository: snapshots of what every tenant becomes.

use crate::util::*;

#[test]
fn example_repo_renders_to_the_snapshot() {
    let repo = example_repo();
    let out = run(&["render", "--now", NOW], repo.path());
    assert_eq!(out.code, 0, "{}", out.stderr);
    insta::assert_snapshot!("render__example_repo", out.stdout);
}

#[test]
fn render_json_has_address_tenant_provider_and_content() {
    let repo = example_repo();
    let out = run(&["render", "--now", NOW, "--format", "json", "--tenant", "tenant-123"], repo.path());
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let resources = v["resources"].as_array().unwrap();
    let isp = resources.iter().find(|r| r["address"] == "tenant-123/isp.config").unwrap();
    assert_eq!(isp["provider"], "isp");
    assert!(isp["content"].as_str().unwrap().contains("tenant-123"));
    let mgmt = resources.iter().find(|r| r["address"] == "tenant-123/management.tenant").unwrap();
    assert_eq!(mgmt["content"]["plan"], "premium");
    assert!(resources.iter().all(|r| r["tenant"] == "tenant-123"));
    let deploy = resources.iter().find(|r| r["address"] == "tenant-123/kubernetes.Deployment[isp-framework]").unwrap();
    // the repository's override of the built-in template is used
    assert!(deploy["content"]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"].is_object());
    assert_eq!(deploy["content"]["metadata"]["labels"]["app.kubernetes.io/managed-by"], "dotmac-gitops");
}

#[test]
fn render_out_writes_one_file_per_resource() {
    let repo = example_repo();
    let out_dir = tempfile::tempdir().unwrap();
    let out = run(
        &["render", "--now", NOW, "--out", out_dir.path().to_str().unwrap(), "--tenant", "bluesky-net"],
        repo.path(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let isp = std::fs::read_to_string(out_dir.path().join("bluesky-net/isp.config.yaml")).unwrap();
    assert!(isp.contains("licenses: []"), "the expired license entitles nothing:\n{isp}");
    assert!(out_dir.path().join("bluesky-net/openbao.secret.database__password.yaml").exists());
}

#[test]
fn an_unknown_tenant_is_an_error() {
    let repo = example_repo();
    let out = run(&["render", "--now", NOW, "--tenant", "nobody"], repo.path());
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("no tenant `nobody`"), "{}", out.stderr);
}
