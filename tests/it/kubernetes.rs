//! `[providers.kubernetes]` and `[providers.isp]` with `kind = "kubernetes"`, end to end:
//! the real binary, a generated kubeconfig, and the fake API server of `kube_fake.rs`.

use crate::kube_fake::{Fake, Req, TOKEN};
use crate::util::*;
use serde_json::{Value, json};
use std::path::Path;

const NS: &str = "dotmac-tenant-tenant-123";

/// The example repository, with both providers on the fake cluster, plus a template of a
/// kind outside the provider's table (a PodDisruptionBudget, resolved through discovery).
fn setup(rollout_timeout: &str) -> (tempfile::TempDir, Fake) {
    let fake = Fake::start();
    let repo = example_repo();
    let r = repo.path();
    let kc = fake.kubeconfig(r);
    let kc = kc.display();
    std::fs::write(
        r.join("dotmac.toml"),
        format!(
            r#"format = 1
[state]
backend = "local"
[providers.management]
kind = "local"
[providers.isp]
kind = "kubernetes"
kubeconfig = "{kc}"
[providers.kubernetes]
kind = "kubernetes"
kubeconfig = "{kc}"
rollout_timeout = "{rollout_timeout}"
kinds = ["policy/v1/PodDisruptionBudget"]
[providers.secrets]
kind = "local"
dev_placeholders = true
"#
        ),
    )
    .unwrap();
    std::fs::create_dir_all(r.join("templates/kubernetes")).unwrap();
    std::fs::write(
        r.join("templates/kubernetes/pdb.yaml.j2"),
        "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata:\n  name: isp-framework\n  namespace: dotmac-tenant-{{ tenant.id }}\nspec:\n  maxUnavailable: 1\n  selector:\n    matchLabels:\n      app: isp-framework\n",
    )
    .unwrap();
    (repo, fake)
}

fn dm(repo: &Path, args: &[&str]) -> Output {
    run(args, repo)
}

fn applied(repo: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["apply", "--auto-approve", "--now", NOW];
    args.extend_from_slice(extra);
    let out = dm(repo, &args);
    assert!(!out.stdout.contains(TOKEN) && !out.stderr.contains(TOKEN), "the token was printed");
    out
}

fn plan_json(repo: &Path) -> Value {
    let out = dm(repo, &["plan", "--format", "json", "--now", NOW]);
    assert!(out.code == 0, "{}{}", out.stdout, out.stderr);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

fn changes(plan: &Value) -> Vec<(String, String, bool)> {
    plan["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (c["address"].as_str().unwrap().to_owned(), c["action"].as_str().unwrap().to_owned(), c["drift"] == true)
        })
        .collect()
}

fn assert_no_changes(repo: &Path) {
    let out = dm(repo, &["plan", "--detailed-exitcode", "--now", NOW]);
    assert_eq!(out.code, 0, "expected no changes:\n{}{}", out.stdout, out.stderr);
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no `{from}`", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

fn owned_by(obj: &Value, manager: &str, pointer: &[&str]) -> bool {
    obj["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["manager"] == manager && pointer.iter().try_fold(&e["fieldsV1"], |n, seg| n.get(*seg)).is_some())
}

fn checksum(d: &Value) -> String {
    d.pointer("/spec/template/metadata/annotations/dotmac.io~1config-checksum").unwrap().as_str().unwrap().to_owned()
}

fn is_object_get(r: &Req, plural: &str, name: &str) -> bool {
    r.method == "GET" && r.path.ends_with(&format!("/{plural}/{name}"))
}

#[test]
fn apply_then_replan_is_empty_and_drift_counts_only_our_fields() {
    let (repo, fake) = setup("30s");
    let r = repo.path();
    let out = applied(r, &[]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("Apply complete: 65 changes on 5 tenants"), "{}", out.stdout);

    // What was sent: server-side apply bodies under our field managers, label-selected lists.
    let reqs = fake.requests();
    let patches: Vec<&Req> = reqs.iter().filter(|r| r.method == "PATCH" && r.status != 404).collect();
    assert_eq!(patches.len(), 5 * 6 + 5, "5 tenants × (5 manifests + isp-config) + 5 namespaces made for isp-config");
    // isp.config comes first in the apply order: its namespace is missing (404), so the ISP
    // provider creates it and writes again.
    let missing: Vec<&Req> = reqs.iter().filter(|r| r.status == 404 && r.method == "PATCH").collect();
    assert_eq!(missing.len(), 5);
    assert!(missing.iter().all(|r| r.path.ends_with("/configmaps/isp-config")));
    for p in &patches {
        assert_eq!(p.content_type.as_deref(), Some("application/apply-patch+yaml"), "{}", p.path);
        assert_eq!(p.query.get("force").map(String::as_str), Some("true"));
        assert_eq!(p.query.get("fieldValidation").map(String::as_str), Some("Strict"));
        let body = p.body.as_ref().unwrap();
        assert!(body["apiVersion"].is_string() && body["kind"].is_string(), "{body}");
        let manager = p.query.get("fieldManager").unwrap();
        let isp = p.path.ends_with("/configmaps/isp-config")
            || (body["kind"] == "Namespace" && body["metadata"]["labels"].get("dotmac.io/plan").is_none());
        assert_eq!(manager, if isp { "dotmac-gitops-isp" } else { "dotmac-gitops" }, "{}", p.path);
        assert_eq!(p.status / 100, 2, "{} answered {}", p.path, p.status);
    }
    let discovery: Vec<&Req> = reqs.iter().filter(|r| r.path == "/apis/policy/v1").collect();
    assert!(!discovery.is_empty(), "a kind outside the table is resolved through discovery");

    // The fake added what a server adds.
    let d = fake.object("deployments", NS, "isp-framework").unwrap();
    assert!(d["metadata"]["uid"].is_string() && d["metadata"]["creationTimestamp"].is_string());
    assert_eq!(d["spec"]["revisionHistoryLimit"], 10);
    assert_eq!(d["metadata"]["annotations"]["deployment.kubernetes.io/revision"], "1");
    assert_eq!(d["status"]["observedGeneration"], d["metadata"]["generation"]);
    let ns = fake.object("namespaces", "", NS).unwrap();
    assert_eq!(ns["metadata"]["labels"]["kubernetes.io/metadata.name"], NS);
    assert!(owned_by(&ns, "dotmac-gitops", &["f:metadata", "f:labels", "f:dotmac.io/plan"]));
    let cm = fake.object("configmaps", NS, "isp-config").unwrap();
    assert!(cm["data"]["isp_config.yaml"].as_str().unwrap().contains("tenant-123"));
    assert!(!cm["data"]["isp_config.yaml"].as_str().unwrap().contains("sk_live"), "placeholders only");

    // A re-plan is empty, twice, and reads with one list per kind: no GET per object.
    fake.clear_requests();
    assert_no_changes(r);
    assert_no_changes(r);
    let reqs = fake.requests();
    assert!(reqs.iter().all(|q| q.method == "GET"), "a plan only reads");
    let lists: Vec<&Req> = reqs.iter().filter(|q| q.path != "/apis/policy/v1").collect();
    assert_eq!(lists.len(), 2 * 6, "two plans × (5 kinds + the ISP ConfigMaps)");
    for l in lists {
        let sel = l.query.get("labelSelector").unwrap_or_else(|| panic!("{} without a label selector", l.path));
        assert!(sel.starts_with("app.kubernetes.io/managed-by=dotmac-gitops,"), "{sel}");
        assert!(
            !l.path.contains("/namespaces/") || l.path == "/api/v1/namespaces",
            "{}: one list across namespaces",
            l.path
        );
    }

    // Out-of-band changes to what we do not manage are not drift: another manager's label,
    // a defaulted field someone changed, the status, the controller's annotation.
    fake.update("deployments", NS, "isp-framework", "kubectl-edit", |d| {
        d["spec"]["revisionHistoryLimit"] = json!(3);
        d["metadata"]["labels"]["team"] = json!("noc");
    });
    fake.update("namespaces", "", NS, "kubectl-label", |n| n["metadata"]["labels"]["owner"] = json!("ops"));
    fake.edit_raw("deployments", NS, "isp-framework", |d| d["status"]["readyReplicas"] = json!(0));
    fake.edit_raw("resourcequotas", NS, "tenant-quota", |q| q["status"]["used"]["pods"] = json!("2"));
    assert_no_changes(r);

    // A field we manage, changed out of band (kubectl scale), is drift, and so is an edit of
    // the ISP configuration; apply heals both and takes the field back.
    let replicas = d["spec"]["replicas"].clone();
    fake.update("deployments", NS, "isp-framework", "kubectl-scale", |d| d["spec"]["replicas"] = json!(7));
    fake.update("configmaps", NS, "isp-config", "kubectl-edit", |c| {
        let text = c["data"]["isp_config.yaml"].as_str().unwrap().replace("level: info", "level: debug");
        c["data"]["isp_config.yaml"] = json!(text);
    });
    let p = plan_json(r);
    assert_eq!(
        changes(&p),
        [
            ("tenant-123/isp.config".to_owned(), "update".to_owned(), true),
            ("tenant-123/kubernetes.Deployment[isp-framework]".to_owned(), "update".to_owned(), true),
        ]
    );
    let dep = p["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["address"].as_str().unwrap().contains("Deployment"))
        .unwrap();
    assert_eq!(dep["fields"][0]["pointer"], "/spec/replicas", "{dep}");
    let out = dm(r, &["drift", "--detailed-exitcode"]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    let out = applied(r, &[]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let d = fake.object("deployments", NS, "isp-framework").unwrap();
    assert_eq!(d["spec"]["replicas"], replicas);
    assert!(owned_by(&d, "dotmac-gitops", &["f:spec", "f:replicas"]));
    assert!(!owned_by(&d, "kubectl-scale", &["f:spec", "f:replicas"]));
    assert_eq!(d["spec"]["revisionHistoryLimit"], 3, "what we do not manage is left alone");
    assert_eq!(d["metadata"]["labels"]["team"], "noc");
    assert!(
        fake.object("configmaps", NS, "isp-config").unwrap()["data"]["isp_config.yaml"]
            .as_str()
            .unwrap()
            .contains("level: info")
    );
    assert_no_changes(r);
    assert_eq!(dm(r, &["drift", "--detailed-exitcode"]).code, 0);
}

#[test]
fn a_config_change_rolls_the_deployment_and_apply_waits_for_the_rollout() {
    let (repo, fake) = setup("30s");
    let r = repo.path();
    assert_eq!(applied(r, &[]).code, 0);
    let before = fake.object("deployments", NS, "isp-framework").unwrap();

    edit(&r.join("tenants/tenant-123/tenant.yaml"), "sync_interval_minutes: 15", "sync_interval_minutes: 20");
    let p = plan_json(r);
    assert_eq!(
        changes(&p),
        [
            ("tenant-123/isp.config".to_owned(), "update".to_owned(), false),
            ("tenant-123/kubernetes.Deployment[isp-framework]".to_owned(), "update".to_owned(), false),
        ]
    );
    fake.clear_requests();
    let out = applied(r, &[]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("Apply complete: 2 changes on 1 tenant"), "{}", out.stdout);

    let after = fake.object("deployments", NS, "isp-framework").unwrap();
    assert_ne!(checksum(&after), checksum(&before), "the checksum annotation changed");
    assert_eq!(after["metadata"]["generation"].as_i64(), before["metadata"]["generation"].as_i64().map(|g| g + 1));
    assert_eq!(after["metadata"]["annotations"]["deployment.kubernetes.io/revision"], "2", "the pods rolled");
    assert_eq!(after["status"]["observedGeneration"], after["metadata"]["generation"]);
    assert_eq!(after["status"]["updatedReplicas"], after["spec"]["replicas"]);
    let cm = fake.object("configmaps", NS, "isp-config").unwrap();
    assert!(cm["data"]["isp_config.yaml"].as_str().unwrap().contains("sync_interval_minutes: 20"));

    // The fake completes a rollout on the second GET after the write: apply read it until then.
    let reqs = fake.requests();
    let patched =
        reqs.iter().position(|q| q.method == "PATCH" && q.path.ends_with("/deployments/isp-framework")).unwrap();
    let polls = reqs[patched..].iter().filter(|q| is_object_get(q, "deployments", "isp-framework")).count();
    assert!(polls >= 2, "apply waited for the rollout ({polls} status reads)");
    assert_no_changes(r);
}

#[test]
fn a_rollout_that_never_completes_times_out_and_the_tenant_is_rolled_back() {
    let (repo, fake) = setup("1s");
    let r = repo.path();
    assert_eq!(applied(r, &[]).code, 0);
    let before = fake.object("deployments", NS, "isp-framework").unwrap();
    let config_before = fake.object("configmaps", NS, "isp-config").unwrap()["data"].clone();

    fake.set_stuck(true);
    edit(&r.join("tenants/tenant-123/tenant.yaml"), "sync_interval_minutes: 15", "sync_interval_minutes: 20");
    let out = applied(r, &[]);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("failed: tenant-123 (rolled back)")
            && out.stderr.contains("the rollout did not complete within 1s")
            && out.stderr.contains("restored to what it was before this write"),
        "{}",
        out.stderr
    );
    let d = fake.object("deployments", NS, "isp-framework").unwrap();
    assert_eq!(checksum(&d), checksum(&before), "the Deployment was restored");
    assert_eq!(
        fake.object("configmaps", NS, "isp-config").unwrap()["data"],
        config_before,
        "isp.config was rolled back"
    );
    // Nothing moved out of band: the same two changes are planned again.
    fake.set_stuck(false);
    let p = plan_json(r);
    assert_eq!(changes(&p).iter().filter(|c| !c.2).count(), 2, "{:?}", changes(&p));
}

#[test]
fn deleting_a_tenant_removes_its_objects_namespaced_first() {
    let (repo, fake) = setup("30s");
    let r = repo.path();
    assert_eq!(applied(r, &[]).code, 0);
    let ns = "dotmac-tenant-bluesky-net";
    std::fs::remove_dir_all(r.join("tenants/bluesky-net")).unwrap();
    fake.clear_requests();
    let out = applied(r, &["--allow-delete"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    for plural in ["namespaces", "configmaps", "deployments", "resourcequotas", "poddisruptionbudgets"] {
        assert!(fake.names(plural).iter().all(|(n, name)| n != ns && name != ns), "{plural} left in {ns}");
    }
    assert_eq!(fake.names("deployments").len(), 4, "the other tenants keep theirs");
    let deletes: Vec<String> = fake
        .requests()
        .iter()
        .filter(|q| q.method == "DELETE")
        .map(|q| q.path.rsplit('/').nth(1).unwrap().to_owned())
        .collect();
    // The Namespace goes last, after the ISP configuration's ConfigMap inside it (a rollback
    // could not bring back what a namespace's deletion takes along).
    assert_eq!(
        deletes,
        ["poddisruptionbudgets", "deployments", "configmaps", "resourcequotas", "configmaps", "namespaces"]
    );
    assert!(fake.requests().iter().filter(|q| q.method == "DELETE").all(|q| q.status == 200));
    assert_no_changes(r);
}

#[test]
fn forbidden_is_a_clear_error() {
    let (repo, fake) = setup("30s");
    let r = repo.path();
    fake.deny("list", "deployments");
    let out = dm(r, &["plan", "--now", NOW]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("listing apps/v1 Deployment")
            && out.stderr.contains("forbidden (403)")
            && out.stderr.contains("cannot list resource \"deployments\"")
            && out.stderr.contains("needs RBAC permission"),
        "{}",
        out.stderr
    );

    let (repo, fake) = setup("30s");
    let r = repo.path();
    fake.deny("patch", "deployments");
    let out = applied(r, &[]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("failed: tenant-123 (rolled back): tenant-123/kubernetes.Deployment[isp-framework]: applying apps/v1 Deployment dotmac-tenant-tenant-123/isp-framework: forbidden (403)"),
        "{}",
        out.stderr
    );
    // Every tenant was rolled back: what each had created is gone again.
    for plural in ["configmaps", "resourcequotas", "namespaces", "deployments"] {
        assert_eq!(fake.names(plural), Vec::<(String, String)>::new(), "{plural}");
    }
}

#[test]
fn a_conflict_or_a_server_error_fails_only_that_tenant_and_rolls_it_back() {
    let (repo, fake) = setup("30s");
    let r = repo.path();
    assert_eq!(applied(r, &[]).code, 0);
    edit(&r.join("tenants/tenant-123/tenant.yaml"), "sync_interval_minutes: 15", "sync_interval_minutes: 20");
    edit(&r.join("environments/production.yaml"), "log_level: info", "log_level: warning");
    let planned = changes(&plan_json(r));
    assert!(planned.len() > 2, "{planned:?}");
    let config_before = fake.object("configmaps", NS, "isp-config").unwrap()["data"].clone();

    // Someone else writes tenant-123's Deployment between our read and our write: 409.
    fake.fail("PATCH", "deployments", Some("isp-framework"), 409, 1);
    let out = applied(r, &[]);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let failed: Vec<&str> = out.stderr.lines().filter(|l| l.contains("failed: ")).collect();
    assert_eq!(failed.len(), 1, "{}", out.stderr);
    assert!(failed[0].contains("(rolled back)") && failed[0].contains("changed by someone else"), "{}", failed[0]);
    let who = failed[0].split("failed: ").nth(1).unwrap().split(' ').next().unwrap();
    let tenant_ns = format!("dotmac-tenant-{who}");
    if who == "tenant-123" {
        assert_eq!(fake.object("configmaps", NS, "isp-config").unwrap()["data"], config_before);
    }
    let remaining = changes(&plan_json(r));
    assert!(
        !remaining.is_empty() && remaining.iter().all(|c| c.0.starts_with(&format!("{who}/")) && !c.2),
        "{remaining:?}"
    );
    assert!(fake.object("namespaces", "", &tenant_ns).is_some());

    // A 500 on the ISP ConfigMap: that tenant fails, the next apply converges.
    fake.fail("PATCH", "configmaps", Some("isp-config"), 500, 1);
    let out = applied(r, &[]);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("failed (500 InternalError)"), "{}", out.stderr);
    let out = applied(r, &[]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_no_changes(r);
}

#[test]
fn an_unreachable_api_server_is_named() {
    let (repo, fake) = setup("30s");
    let url = fake.url.clone();
    drop(fake);
    let out = dm(repo.path(), &["plan", "--now", NOW]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains(&format!("the Kubernetes API at {url} cannot be reached")), "{}", out.stderr);
}

/// A limit stated in the README: the engine compares manifests as written, so a value the
/// server stores in another form (a quantity in canonical form) shows as an update on every
/// plan. Apply says so, naming the field.
#[test]
fn a_manifest_the_server_normalises_is_reported() {
    let (repo, fake) = setup("30s");
    let r = repo.path();
    edit(&r.join("catalog/resource-tiers.yaml"), "medium: {cpu: \"1\"", "medium: {cpu: \"1000m\"");
    let out = dm(r, &["apply", "--auto-approve", "--now", NOW, "--tenant", "coastal-wireless"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("coastal-wireless/kubernetes.Deployment[isp-framework]: the API server stores this manifest differently from how it is written (at /spec/template/spec/containers/0/resources/limits/cpu: sent \"1000m\", stored \"1\")"),
        "{}",
        out.stderr
    );
    let d = fake.object("deployments", "dotmac-tenant-coastal-wireless", "isp-framework").unwrap();
    assert_eq!(d.pointer("/spec/template/spec/containers/0/resources/requests/cpu"), Some(&json!("1")));
}

#[test]
fn setting_mistakes_are_named() {
    let (repo, _fake) = setup("30s");
    let r = repo.path();
    // A kind the templates render but plans would not read.
    std::fs::write(
        r.join("templates/kubernetes/service.yaml.j2"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: isp-framework\n  namespace: dotmac-tenant-{{ tenant.id }}\nspec:\n  selector:\n    app: isp-framework\n  ports:\n    - port: 80\n",
    )
    .unwrap();
    let out = applied(r, &["--tenant", "tenant-123"]);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("kind Service is not read by plans; add \"v1/Service\" to [providers.kubernetes] kinds"),
        "{}",
        out.stderr
    );
    // Both providers under one field manager would strip each other's fields.
    edit(
        &r.join("dotmac.toml"),
        "[providers.isp]\nkind = \"kubernetes\"\n",
        "[providers.isp]\nkind = \"kubernetes\"\nfield_manager = \"dotmac-gitops\"\n",
    );
    let out = dm(r, &["plan", "--now", NOW]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("[providers.isp] field_manager must differ"), "{}", out.stderr);
}
