//! The http providers end to end: the real binary against the contract server of
//! `platform.rs` (management platform and ISP instances per `platform-api.md`).

use crate::platform::{FaultKind, Platform};
use crate::util::*;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

const TOKEN_ENV: &str = "DOTMAC_TEST_PLATFORM_TOKEN";
const TOKEN: &str = "tok-PLANTED-3f9a1c77e2b04d58";

/// The example repository, switched to the http providers of `p` (secrets and Kubernetes
/// stay local). `extra` is added to both http provider sections.
fn http_repo(p: &Platform, extra: &str) -> tempfile::TempDir {
    let repo = example_repo();
    let toml = format!(
        r#"format = 1

[providers.management]
kind = "http"
url = "{mgmt}"
token_env = "{TOKEN_ENV}"
timeout = "5s"
{extra}

[providers.isp]
kind = "http"
url = "{isp}"
token_env = "{TOKEN_ENV}"
timeout = "5s"
{extra}

[providers.kubernetes]
kind = "local"

[providers.secrets]
kind = "local"
dev_placeholders = true
"#,
        mgmt = p.management_url(),
        isp = p.isp_url(),
    );
    std::fs::write(repo.path().join("dotmac.toml"), toml).unwrap();
    repo
}

fn dm(repo: &Path, args: &[&str]) -> Output {
    run_env(args, repo, &[(TOKEN_ENV, TOKEN)])
}

fn apply(repo: &Path) -> Output {
    dm(repo, &["apply", "--auto-approve", "--now", NOW])
}

fn plan_json(repo: &Path) -> Value {
    let out = dm(repo, &["plan", "--format", "json", "--now", NOW]);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}{}", out.stdout, out.stderr))
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no `{from}`", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

fn both(o: &Output) -> String {
    format!("{}{}", o.stdout, o.stderr)
}

#[test]
fn applies_replans_empty_and_heals_drift_on_both_sides() {
    let p = Platform::start(TOKEN);
    let repo = http_repo(&p, "");
    let r = repo.path();

    let out = apply(r);
    assert_eq!(out.code, 0, "{}", both(&out));
    assert!(out.stdout.contains("Apply complete: 60 changes on 5 tenants"), "{}", out.stdout);
    assert_eq!(p.tenants(), ["bluesky-net", "coastal-wireless", "northwind-isp", "pampas-telecom", "tenant-123"]);

    // The record is the rendered management record; the seed's coordination comes along.
    let rec = p.record("tenant-123").unwrap();
    assert_eq!((rec["name"].as_str(), rec["plan"].as_str()), (Some("Demo ISP"), Some("premium")));
    assert_eq!(
        p.coordination("tenant-123").unwrap(),
        json!({"coordination_strategy": "management_first", "rollback_on_failure": true})
    );
    assert_eq!(p.coordination("northwind-isp").unwrap()["coordination_strategy"], "synchronized");
    // Licenses in the platform's shape, both kept although written one at a time.
    let lic = p.licenses("tenant-123");
    assert_eq!(lic.len(), 2, "{lic:?}");
    assert_eq!(lic[0]["plugin_id"], "advanced_analytics");
    assert_eq!(lic[0]["license_tier"], "enterprise");
    assert_eq!(lic[0]["expiration_date"], "2027-12-31T23:59:59Z");
    assert_eq!(lic[1]["plugin_id"], "white_labeling");
    // Every instance got its configuration and loaded it.
    for t in p.tenants() {
        let i = p.instance(&t);
        assert!(i.config.as_deref().unwrap().contains(&format!("id: {t}")));
        assert_eq!(i.loaded.as_ref(), Some(&i.etag), "{t} runs what was delivered");
        assert_eq!(i.reloads, 1);
    }
    // The instance is told the features its configuration enables: the record's features.
    let features = p.instance("tenant-123").features;
    let enabled: Vec<&str> = rec["features"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert_eq!(features.as_object().unwrap().keys().map(String::as_str).collect::<Vec<_>>(), enabled);
    assert!(enabled.contains(&"advanced_analytics") && features["advanced_analytics"] == "enabled");

    // One audit event per applied change, joined to the plan by its correlation id, which
    // every call of the run carried.
    let audit: Value = serde_json::from_str(&dm(r, &["audit", "--format", "json"]).stdout).unwrap();
    let correlation = audit["entries"][0]["correlation_id"].as_str().unwrap().to_owned();
    assert!(correlation.starts_with("plan-"), "{correlation}");
    let events = p.audit_events();
    assert_eq!(events.len(), 60);
    assert!(events.iter().all(|e| e["correlation_id"] == correlation.as_str()));
    let isp_event = events.iter().find(|e| e["event_data"]["component"] == "isp.config").unwrap();
    assert_eq!(isp_event["target_platform"], "tenant_isp_framework");
    assert_eq!(isp_event["event_type"], "configuration_create");
    assert!(p.requests().iter().all(|q| q.correlation_id.as_deref() == Some(correlation.as_str())));

    // Written and read back, everything fingerprints as rendered: nothing to do, twice.
    for _ in 0..2 {
        let out = dm(r, &["plan", "--detailed-exitcode", "--now", NOW]);
        assert_eq!(out.code, 0, "{}", both(&out));
        assert!(out.stdout.contains("No changes."), "{}", out.stdout);
    }
    assert_eq!(dm(r, &["drift", "--detailed-exitcode"]).code, 0);

    // Drift on the management side: found, with the management/ISP inconsistency, and healed
    // with If-Match (the server refuses unconditional updates).
    p.set_record_field("tenant-123", "plan", json!("basic"));
    let out = dm(r, &["drift", "--detailed-exitcode"]);
    assert_eq!(out.code, 2, "{}", both(&out));
    assert!(out.stdout.contains("tenant-123/management.tenant changed"), "{}", out.stdout);
    assert!(
        out.stdout.contains("tenant-123 plan: management \"basic\" vs ISP framework \"premium\""),
        "{}",
        out.stdout
    );
    let plan = plan_json(r);
    assert_eq!(plan["summary"]["drift"], 1);
    assert_eq!(plan["changes"][0]["address"], "tenant-123/management.tenant");
    let out = apply(r);
    assert_eq!(out.code, 0, "{}", both(&out));
    assert_eq!(p.record("tenant-123").unwrap()["plan"], "premium");
    assert!(p.requests().iter().any(|q| q.method == "PUT" && q.if_match.is_some()));

    // Drift on the ISP side: found and healed, and the instance reloads what it got.
    p.edit_isp_config("tenant-123", "level: info", "level: debug");
    let out = dm(r, &["drift", "--detailed-exitcode"]);
    assert_eq!(out.code, 2, "{}", both(&out));
    assert!(out.stdout.contains("tenant-123/isp.config changed"), "{}", out.stdout);
    let out = apply(r);
    assert_eq!(out.code, 0, "{}", both(&out));
    let i = p.instance("tenant-123");
    assert!(i.config.unwrap().contains("level: info"));
    assert_eq!((i.reloads, i.loaded.as_ref()), (2, Some(&i.etag)));

    // A license removed out of band comes back; the tenant's other license is untouched.
    p.remove_license("tenant-123", "white_labeling");
    let plan = plan_json(r);
    assert_eq!(plan["changes"][0]["address"], "tenant-123/management.license[white_labeling]");
    assert_eq!(plan["changes"][0]["action"], "create");
    assert_eq!(apply(r).code, 0);
    assert_eq!(p.licenses("tenant-123").len(), 2);
    let out = dm(r, &["plan", "--detailed-exitcode", "--now", NOW]);
    assert_eq!(out.code, 0, "{}", both(&out));
    assert_eq!(dm(r, &["drift", "--detailed-exitcode"]).code, 0);
}

#[test]
fn an_isp_failure_rolls_the_management_write_back_and_other_tenants_apply() {
    let p = Platform::start(TOKEN);
    let repo = http_repo(&p, "");
    let r = repo.path();
    assert_eq!(apply(r).code, 0);
    edit(&r.join("tenants/tenant-123/tenant.yaml"), "name: Demo ISP", "name: Demo ISP Renamed");
    edit(&r.join("tenants/pampas-telecom/tenant.yaml"), "plan: basic", "plan: premium");
    let reloads = p.instance("tenant-123").reloads;
    let events = p.audit_events().len();
    p.clear_requests();

    // tenant-123's instance fails every write: management is written first, then the ISP
    // write fails (3 tries), and the management record is put back.
    p.fault(Some("PUT"), "/isp/tenant-123/", FaultKind::Status(500), None);
    let out = apply(r);
    assert_eq!(out.code, 1, "{}", both(&out));
    assert!(out.stdout.contains("on 1 tenant, 1 failed"), "{}", out.stdout);
    assert!(out.stderr.contains("failed: tenant-123 (rolled back)"), "{}", out.stderr);
    assert!(out.stderr.contains("500 Internal Server Error"), "{}", out.stderr);
    assert_eq!(p.count("PUT", "/isp/tenant-123/api/v1/config"), 3, "at most 3 tries");
    assert_eq!(p.count("PUT", "/tenant/tenant-123/config/coordinate"), 2, "written, then put back");
    assert_eq!(p.record("tenant-123").unwrap()["name"], "Demo ISP");
    assert_eq!(p.instance("tenant-123").reloads, reloads);
    // The other tenant applied, and only its changes were posted to the platform's audit.
    assert_eq!(p.record("pampas-telecom").unwrap()["plan"], "premium");
    let new_events = &p.audit_events()[events..];
    assert!(!new_events.is_empty());
    assert!(new_events.iter().all(|e| e["tenant_id"] == "pampas-telecom"), "{new_events:?}");

    // The state matches live: the failed tenant's changes are planned again, without drift.
    let plan = plan_json(r);
    assert_eq!(plan["summary"]["drift"], 0, "{plan}");
    assert!(plan["changes"].as_array().unwrap().iter().all(|c| c["tenant"] == "tenant-123"));
    p.clear_faults();
    assert_eq!(apply(r).code, 0);
    assert_eq!(p.record("tenant-123").unwrap()["name"], "Demo ISP Renamed");
    assert_eq!(dm(r, &["plan", "--detailed-exitcode", "--now", NOW]).code, 0);
}

#[test]
fn a_moved_etag_refuses_a_stale_plan_and_a_concurrent_write_is_never_overwritten() {
    let p = Platform::start(TOKEN);
    let repo = http_repo(&p, "");
    let r = repo.path();
    assert_eq!(apply(r).code, 0);
    edit(&r.join("tenants/tenant-123/tenant.yaml"), "name: Demo ISP", "name: Demo ISP Renamed");
    let file = r.join("change.plan");
    let out = dm(r, &["plan", "--out", file.to_str().unwrap(), "--now", NOW]);
    assert_eq!(out.code, 0, "{}", both(&out));

    // Someone changes the record on the platform: its etag moves; the saved plan is stale.
    p.set_record_field("tenant-123", "domain", json!("elsewhere.example"));
    let out = dm(r, &["apply", file.to_str().unwrap()]);
    assert_eq!(out.code, 1, "{}", both(&out));
    assert!(out.stderr.contains("stale plan"), "{}", out.stderr);
    assert!(out.stderr.contains("tenant-123/management.tenant changed"), "{}", out.stderr);
    assert_eq!(p.record("tenant-123").unwrap()["domain"], "elsewhere.example", "not overwritten");

    // A writer that gets in between apply's re-read and its write: the platform answers 412
    // to our If-Match; the engine re-reads and reports instead of overwriting.
    p.clear_requests();
    p.fault(Some("PUT"), "/tenant/tenant-123/config/coordinate", FaultKind::ConcurrentWrite, Some(1));
    let out = apply(r);
    assert_eq!(out.code, 1, "{}", both(&out));
    assert!(out.stderr.contains("failed: tenant-123"), "{}", out.stderr);
    assert!(out.stderr.contains("changed by someone else since it was read"), "{}", out.stderr);
    assert_eq!(p.record("tenant-123").unwrap()["name"], "Changed Concurrently");
    assert_eq!(p.count("PUT", "/tenant/tenant-123/config/coordinate"), 1, "no second, blind write");
    assert_eq!(p.count("PUT", "/isp/tenant-123/"), 0, "nothing after the refused write");

    // Re-planned, the repository wins.
    assert_eq!(apply(r).code, 0);
    let rec = p.record("tenant-123").unwrap();
    assert_eq!((rec["name"].as_str(), rec["domain"].as_str()), (Some("Demo ISP Renamed"), Some("demo-isp.dotmac.app")));
}

#[test]
fn a_refused_token_fails_fast_naming_the_variable() {
    let p = Platform::start(TOKEN);
    let repo = http_repo(&p, "");
    let r = repo.path();
    let out = run_env(&["plan", "--now", NOW], r, &[(TOKEN_ENV, "not-the-token")]);
    assert_eq!(out.code, 1, "{}", both(&out));
    assert!(out.stderr.contains("401 Unauthorized"), "{}", out.stderr);
    assert!(out.stderr.contains(&format!("the token in ${TOKEN_ENV} was not accepted")), "{}", out.stderr);
    let reqs = p.requests();
    assert!(!reqs.is_empty());
    let mut paths: Vec<&str> = reqs.iter().map(|q| q.path.as_str()).collect();
    paths.sort();
    let n = paths.len();
    paths.dedup();
    assert_eq!(paths.len(), n, "no call was retried: {paths:?}");

    // The variable not set at all.
    let out = run(&["plan", "--now", NOW], r);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains(&format!("token_env names ${TOKEN_ENV}, which is not set")), "{}", out.stderr);

    // A token without the role: 403, also not retried.
    let toml = std::fs::read_to_string(r.join("dotmac.toml")).unwrap();
    std::fs::write(r.join("dotmac.toml"), toml.replacen("timeout = \"5s\"", "timeout = \"5s\"\nrole = \"viewer\"", 1))
        .unwrap();
    p.clear_requests();
    let out = dm(r, &["plan", "--now", NOW]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("403 Forbidden") && out.stderr.contains("X-Platform-Role: viewer"), "{}", out.stderr);
    assert_eq!(p.count("GET", "/tenants"), 1);
}

#[test]
fn a_dead_isp_instance_opens_its_breaker_and_the_others_apply() {
    let p = Platform::start(TOKEN);
    let repo = http_repo(&p, "circuit_breaker = { failures = 2, reset_after = \"10m\" }");
    let r = repo.path();
    // coastal-wireless's instance is gone; its load balancer answers with an error page.
    p.fault(None, "/isp/coastal-wireless/", FaultKind::NotEnvelope(502), None);
    let out = apply(r);
    assert_eq!(out.code, 1, "{}", both(&out));
    assert!(out.stdout.contains("on 4 tenants, 1 failed"), "{}", out.stdout);
    let all = both(&out);
    assert!(all.contains("tenant coastal-wireless: its live state could not be read"), "{all}");
    assert!(all.contains("circuit breaker open after 2 consecutive failures"), "{all}");
    assert!(all.contains("502 Bad Gateway"), "{all}");
    // Two failed calls opened the breaker; nothing more was sent to the dead instance, and
    // nothing was written for its tenant anywhere.
    assert_eq!(p.count("GET", "/isp/coastal-wireless/"), 2);
    assert_eq!(p.requests().iter().filter(|q| q.path.contains("/isp/coastal-wireless/")).count(), 2);
    assert!(p.record("coastal-wireless").is_none());
    assert_eq!(p.tenants().len(), 4);

    // The instance comes back: everything converges.
    p.clear_faults();
    let out = apply(r);
    assert_eq!(out.code, 0, "{}", both(&out));
    assert_eq!(dm(r, &["plan", "--detailed-exitcode", "--now", NOW]).code, 0);

    // It dies again: the drift report says which tenant it cannot judge, and judges the rest.
    p.fault(None, "/isp/coastal-wireless/", FaultKind::NotEnvelope(502), None);
    let out = dm(r, &["drift", "--format", "json"]);
    assert_eq!(out.code, 1, "{}", both(&out));
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    let unreadable = report["unreadable"].as_object().unwrap();
    assert_eq!(unreadable.keys().collect::<Vec<_>>(), ["coastal-wireless"]);
    assert_eq!(report["drift_detected"], false, "{report}");
}

#[test]
fn transient_failures_are_retried_and_bad_answers_are_named() {
    let p = Platform::start(TOKEN);
    let repo = http_repo(&p, "");
    let r = repo.path();
    // Rate limited once (the server refuses anyone who comes back before Retry-After), a
    // 503 and a 500 on writes, a failed reload: all retried, all converge.
    p.fault(Some("GET"), "/api/v1/config/tenants", FaultKind::RetryAfter(429, 1), Some(1));
    p.fault(Some("PUT"), "/tenant/tenant-123/config/coordinate", FaultKind::Status(503), Some(1));
    p.fault(Some("PUT"), "/isp/pampas-telecom/api/v1/config", FaultKind::Status(500), Some(2));
    p.fault(Some("POST"), "/isp/bluesky-net/api/v1/config/hot-reload", FaultKind::Status(502), Some(1));
    let out = apply(r);
    assert_eq!(out.code, 0, "{}", both(&out));
    assert_eq!(p.count("GET", "/api/v1/config/tenants"), 2, "retried once, after Retry-After");
    assert_eq!(p.count("PUT", "/isp/pampas-telecom/api/v1/config"), 3);
    assert_eq!(p.instance("bluesky-net").loaded.as_ref(), Some(&p.instance("bluesky-net").etag));
    assert_eq!(dm(r, &["plan", "--detailed-exitcode", "--now", NOW]).code, 0);

    // A body that is not the envelope: an error naming the URL and the status.
    p.fault(Some("GET"), "/api/v1/config/tenants", FaultKind::NotEnvelope(200), Some(1));
    let out = dm(r, &["plan", "--now", NOW]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains(&format!("GET {}/tenants answered 200 OK with a body that is not", p.management_url())),
        "{}",
        out.stderr
    );

    // An instance that does not answer: timed out, its tenant reported, the others planned.
    let toml = std::fs::read_to_string(r.join("dotmac.toml")).unwrap();
    std::fs::write(r.join("dotmac.toml"), toml.replace("timeout = \"5s\"", "timeout = \"1s\"")).unwrap();
    p.fault(Some("GET"), "/isp/northwind-isp/", FaultKind::Hang(Duration::from_secs(5)), None);
    edit(&r.join("tenants/tenant-123/tenant.yaml"), "name: Demo ISP", "name: Demo ISP Renamed");
    let plan = plan_json(r);
    let errors: Vec<&Value> =
        plan["violations"].as_array().unwrap().iter().filter(|v| v["severity"] == "error").collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["tenant"], "northwind-isp");
    assert!(errors[0]["message"].as_str().unwrap().contains("timed out"), "{}", errors[0]);
    assert!(plan["changes"].as_array().unwrap().iter().any(|c| c["tenant"] == "tenant-123"));
}

#[test]
fn no_token_or_secret_value_in_outputs_logs_or_requests() {
    let p = Platform::start(TOKEN);
    let repo = http_repo(&p, "");
    let r = repo.path();
    let planted = "sk_live_PLANTED_d8c1e0a94b7f";
    put_secret(r, "tenant-123", "stripe/secret_key", planted);
    // A careless server that quotes the Authorization header in its error messages.
    p.fault(Some("PUT"), "/isp/tenant-123/", FaultKind::EchoToken(500), None);
    let mut outputs = Vec::new();
    for args in [
        &["plan", "-vvv", "--now", NOW][..],
        &["apply", "--auto-approve", "-vvv", "--now", NOW],
        &["drift", "-vvv"],
        &["audit", "--format", "json"],
    ] {
        outputs.push(dm(r, args));
        outputs.push(run_env(args, r, &[(TOKEN_ENV, TOKEN), ("DOTMAC_LOG", "trace")]));
    }
    let apply_out = &outputs[2];
    assert!(apply_out.stderr.contains("backend failed for request with Bearer (token)"), "{}", apply_out.stderr);
    for o in &outputs {
        let text = both(o);
        assert!(!text.contains(TOKEN), "the token leaked:\n{text}");
        assert!(!text.contains(planted), "a secret value leaked:\n{text}");
    }
    // Nothing sent to the platform carries a secret value; the token travels only in the
    // Authorization header.
    let reqs = p.requests();
    assert!(reqs.iter().any(|q| q.body.contains("${SECRET:stripe/secret_key}")), "the ISP gets references");
    for q in &reqs {
        assert!(!q.body.contains(planted) && !q.body.contains(TOKEN), "{} {}: {}", q.method, q.path, q.body);
        assert_eq!(q.authorization.as_deref(), Some(format!("Bearer {TOKEN}").as_str()));
    }
    for e in p.audit_events() {
        assert!(!e.to_string().contains(planted));
    }
}

#[test]
fn removing_a_tenant_removes_its_record_and_leaves_the_instance_config_to_the_instance() {
    let p = Platform::start(TOKEN);
    let repo = http_repo(&p, "");
    let r = repo.path();
    assert_eq!(apply(r).code, 0);
    std::fs::remove_dir_all(r.join("tenants/pampas-telecom")).unwrap();
    // The spec's instance API has no delete: the instance answers 405, which means its
    // configuration goes away with the instance itself; the engine stops managing it.
    let out = dm(r, &["apply", "--auto-approve", "--allow-delete", "--now", NOW]);
    assert_eq!(out.code, 0, "{}", both(&out));
    assert!(p.record("pampas-telecom").is_none(), "the management record is deleted");
    assert_eq!(dm(r, &["plan", "--detailed-exitcode", "--now", NOW]).code, 0, "nothing left to plan");
}
