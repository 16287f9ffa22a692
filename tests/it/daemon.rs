//! `dotmac-gitops daemon` end to end: the real binary in the background over temp git
//! repositories with the local providers, driven through its HTTP API (and signals), the
//! way an operator drives it with `curl`. Waits poll until convergence, with generous limits.

use crate::daemon_util::*;
use crate::util::*;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A tenant's ISP configuration in the local store (its entry in the tenant's shard file).
fn isp_config(repo: &Path, tenant: &str) -> Option<String> {
    live_entry(&repo.join(".dotmac"), &format!("{tenant}/isp.config"))
}

/// Edits a tenant's ISP configuration by hand, out of band.
fn edit_isp(repo: &Path, tenant: &str, from: &str, to: &str) {
    edit_live(&repo.join(".dotmac"), &format!("{tenant}/isp.config"), from, to);
}

/// Changes tenant-123's sync interval to `minutes` and commits; the new commit.
fn commit_interval(repo: &Path, minutes: u32) -> String {
    let path = repo.join("tenants/tenant-123/tenant.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text.lines().find(|l| l.contains("sync_interval_minutes:")).unwrap().to_owned();
    let indent = &line[..line.find('s').unwrap()];
    std::fs::write(&path, text.replace(&line, &format!("{indent}sync_interval_minutes: {minutes}"))).unwrap();
    git_commit_all(repo, &format!("interval {minutes}"))
}

/// Adds a `[daemon]` section to dotmac.toml (committed by the caller).
fn daemon_settings(repo: &Path, section: &str) {
    let p = repo.join("dotmac.toml");
    let mut text = std::fs::read_to_string(&p).unwrap();
    text.push_str(section);
    std::fs::write(p, text).unwrap();
}

fn apply_cli(repo: &Path, env: &[(&str, &str)]) -> Output {
    run_env(&["apply", "--auto-approve"], repo, env)
}

#[test]
fn the_daemon_syncs_reconciles_new_commits_and_heals_drift() {
    let (repo, c1) = committed_example();
    let r = repo.path();
    let d = Daemon::start(r, &["--auto-apply", "--interval", "1s"], &[]);
    // Ready after the first full reconcile, every tenant synced at HEAD.
    d.wait("ready", |d| (d.get("/readyz").0 == 200).then_some(()));
    let s = d.wait_all("Synced", &c1);
    assert_eq!(s["revision"], c1.as_str());
    assert_eq!(s["tenants"].as_array().unwrap().len(), 5);
    assert_eq!(s["summary"]["Synced"], 5);
    assert!(isp_config(r, "tenant-123").is_some(), "the apply wrote live state");

    // A new commit reaches the live state within seconds; only its tenant is rendered again.
    let c2 = commit_interval(r, 17);
    let t = d.wait_tenant("tenant-123", "synced at the new commit", |t| t["status"] == "Synced" && t["revision"] == c2);
    assert!(d.log().contains("changed=1 cached_units=4"), "{}", d.log());
    assert!(isp_config(r, "tenant-123").unwrap().contains("sync_interval_minutes: 17"));
    assert_eq!(t["last_apply"]["ok"], true);
    assert!(t["last_plan"]["changes"].as_array().unwrap().iter().any(|c| c["address"] == "tenant-123/isp.config"));
    // The other tenants did not change: synced at the new commit too.
    d.wait_all("Synced", &c2);
    let audit = d.json("/api/v1/audit?tenant=tenant-123");
    assert!(
        audit["entries"].as_array().unwrap().iter().any(|e| e["actor"] == "dotmac-gitops-daemon"
            && e["address"] == "tenant-123/isp.config"
            && e["action"] == "update"),
        "{audit}"
    );
    assert!(!t["audit"].as_array().unwrap().is_empty(), "the tenant's page carries its recent audit entries");

    // An out-of-band edit of a live resource is healed.
    let healed_before = d.metric("dotmac_drift_healed_total");
    edit_isp(r, "tenant-123", "sync_interval_minutes: 17", "sync_interval_minutes: 99");
    d.wait("the drift healed", |d| (d.metric("dotmac_drift_healed_total") > healed_before).then_some(()));
    assert!(isp_config(r, "tenant-123").unwrap().contains("sync_interval_minutes: 17"), "live restored");
    let t = d.wait_tenant("tenant-123", "synced", |t| t["status"] == "Synced");
    assert!(t["history"].as_array().unwrap().iter().any(|h| h["event"] == "applied (healed drift)"), "{t}");
    assert!(d.metric("dotmac_drift_detected_total") >= 1.0);

    // Metrics are Prometheus text, with the families the issue names.
    let (code, text) = d.get("/metrics");
    assert_eq!(code, 200);
    let samples = parse_metrics(&text);
    for family in [
        "dotmac_reconcile_duration_seconds_bucket",
        "dotmac_tenants{status=\"Synced\"}",
        "dotmac_drift_detected_total",
        "dotmac_drift_healed_total",
        "dotmac_apply_failures_total",
        "dotmac_last_successful_sync_timestamp_seconds",
        "dotmac_leader",
        "dotmac_ready",
    ] {
        assert!(samples.iter().any(|(s, _)| s.starts_with(family)), "no {family} in\n{text}");
    }
    assert_eq!(samples.iter().find(|(s, _)| s == "dotmac_tenants{status=\"Synced\"}").unwrap().1, 5.0);
    assert!(samples.iter().find(|(s, _)| s == "dotmac_last_successful_sync_timestamp_seconds").unwrap().1 > 1.7e9);

    let (code, log) = d.stop();
    assert_eq!(code, 0, "{log}");
    // A re-plan by hand agrees: nothing to do.
    let out = run(&["plan", "--detailed-exitcode"], r);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
}

#[test]
fn without_auto_apply_the_daemon_only_reports() {
    let (repo, c1) = committed_example();
    let r = repo.path();
    let out = apply_cli(r, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let d = Daemon::start(r, &["--interval", "1s"], &[]);
    d.wait_all("Synced", &c1);
    assert_eq!(d.status()["auto_apply"], false);

    // Drift is reported, not healed.
    edit_isp(r, "tenant-123", "sync_interval_minutes: 15", "sync_interval_minutes: 99");
    let t = d.wait_tenant("tenant-123", "drifted", |t| t["status"] == "Drifted");
    assert_eq!(t["drift"], json!(["tenant-123/isp.config"]));
    assert!(t["last_plan"]["changes"][0]["drift"].as_bool().unwrap());
    assert!(t["last_plan"]["changes"][0]["diff"].as_str().unwrap().contains("99"));
    assert_eq!(d.metric("dotmac_drift_healed_total"), 0.0);
    assert_eq!(d.metric("dotmac_drift_detected_total"), 1.0);
    edit_isp(r, "tenant-123", "sync_interval_minutes: 99", "sync_interval_minutes: 15");
    d.wait_tenant("tenant-123", "back in sync after the edit was undone", |t| t["status"] == "Synced");

    // A new commit is out of sync, not applied; the tenants it does not touch are synced at it.
    let c2 = commit_interval(r, 21);
    let t = d.wait_tenant("tenant-123", "out of sync at the new commit", |t| {
        t["status"] == "OutOfSync" && t["revision"] == c2
    });
    assert!(t["last_error"].is_null());
    assert!(isp_config(r, "tenant-123").unwrap().contains("sync_interval_minutes: 15"), "not applied");
    d.wait("the others synced at the new commit", |d| {
        let s = d.status();
        s["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["tenant"] != "tenant-123")
            .all(|t| t["status"] == "Synced" && t["revision"] == c2)
            .then_some(())
    });
    assert_eq!(d.metric("dotmac_applied_changes_total"), 0.0);
    let (code, log) = d.stop();
    assert_eq!(code, 0, "{log}");
    let audit = run(&["audit", "--format", "json"], r);
    assert!(!audit.stdout.contains("dotmac-gitops-daemon"), "the daemon applied nothing");
}

#[test]
fn a_failing_provider_backs_off_then_recovers_and_the_backoff_resets() {
    let (repo, _) = committed_example();
    let r = repo.path();
    daemon_settings(r, "\n[daemon]\nbackoff_initial = \"1s\"\nbackoff_max = \"10s\"\n");
    git_commit_all(r, "daemon settings");
    assert_eq!(apply_cli(r, &[]).code, 0);
    let c2 = commit_interval(r, 33);
    // The first two ISP writes fail; the third succeeds.
    let d = Daemon::start(r, &["--auto-apply", "--interval", "30s"], &[("DOTMAC_FAULTS", "isp:put:1,isp:put:2")]);
    let t = d.wait_tenant("tenant-123", "synced after the faults", |t| t["status"] == "Synced" && t["revision"] == c2);
    let history = t["history"].as_array().unwrap();
    let failed: Vec<&Value> = history.iter().filter(|h| h["event"] == "apply failed").collect();
    assert_eq!(failed.len(), 2, "{t:#}");
    assert_eq!(failed[0]["status"], "Failed");
    assert!(failed[0]["error"].as_str().unwrap().contains("injected fault"), "{t:#}");
    // Exponential: about 1 s, then about 2 s (a tenth of jitter either way).
    let (w1, w2) = (failed[0]["requeue_after_s"].as_f64().unwrap(), failed[1]["requeue_after_s"].as_f64().unwrap());
    assert!((0.9..=1.1).contains(&w1) && (1.8..=2.2).contains(&w2), "backoff {w1} then {w2}");
    // Then success resets it: the next check is an interval away, failures back to zero.
    let last = history.last().unwrap();
    assert_eq!(last["event"], "applied");
    assert!(last["requeue_after_s"].as_f64().unwrap() >= 27.0);
    assert_eq!(t["failures"], 0);
    assert!(t["last_error"].is_null());
    assert_eq!(t["last_apply"]["ok"], true);
    assert_eq!(d.metric("dotmac_apply_failures_total"), 2.0);
    assert_eq!(d.metric("dotmac_provider_request_errors_total{provider=\"isp\",operation=\"put\"}"), 2.0);
    assert!(isp_config(r, "tenant-123").unwrap().contains("sync_interval_minutes: 33"));
    let (code, log) = d.stop();
    assert_eq!(code, 0, "{log}");
}

#[test]
fn sigterm_during_an_apply_leaves_the_state_consistent_and_exits_zero() {
    let (repo, _) = committed_example();
    let r = repo.path();
    let p = r.join("dotmac.toml");
    std::fs::write(&p, std::fs::read_to_string(&p).unwrap() + "\n[apply]\nparallelism = 1\n").unwrap();
    let c = git_commit_all(r, "one tenant at a time");
    let creates = |r: &Path| {
        let plan = run(&["plan", "--format", "json"], r);
        let plan: Value = serde_json::from_str(&plan.stdout).unwrap();
        assert_eq!(plan["summary"]["drift"], 0);
        let mut per_tenant: std::collections::BTreeMap<String, usize> = Default::default();
        for ch in plan["changes"].as_array().unwrap() {
            assert_eq!(ch["action"], "create", "{ch}");
            *per_tenant.entry(ch["tenant"].as_str().unwrap().to_owned()).or_default() += 1;
        }
        per_tenant
    };
    let all = creates(r);
    assert_eq!(all.len(), 5);
    // Each ISP write takes a second: the first apply (five tenants) takes five seconds.
    let d = Daemon::start(r, &["--auto-apply", "--interval", "1m"], &[("DOTMAC_FAULTS", "isp:put:*:delay=1s")]);
    // The apply is under way once the daemon holds the state lock.
    let lock = r.join(".dotmac/state/lock");
    d.wait("the daemon applying", |_| {
        std::fs::read_to_string(&lock).ok().filter(|h| h.starts_with("daemon by")).map(|_| ())
    });
    // A person's apply meanwhile is refused, naming the daemon: they never interleave.
    let out = apply_cli(r, &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("the state is locked: daemon by"), "{}", out.stderr);
    let (code, log) = d.stop();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("shutting down"), "{log}");

    // Consistent: no drift (everything live is recorded), nothing half-recorded, and the
    // tenants not started are simply still to create.
    let drift = run(&["drift", "--format", "json"], r);
    assert_eq!(drift.code, 0, "{}{}", drift.stdout, drift.stderr);
    let drift: Value = serde_json::from_str(&drift.stdout).unwrap();
    assert_eq!(drift["drift_detected"], false, "{drift:#}");
    let left = creates(r);
    assert!(!left.is_empty(), "the shutdown stopped the apply before every tenant (else it came too late)");
    assert!(left.len() < 5, "at least one tenant was applied before the shutdown");
    for (t, n) in &left {
        assert_eq!(*n, all[t], "{t} is applied whole or not at all");
    }

    // A new daemon finishes the job.
    let d = Daemon::start(r, &["--auto-apply", "--interval", "1m"], &[]);
    d.wait_all("Synced", &c);
    assert_eq!(d.stop().0, 0);
}

#[test]
fn the_daemon_waits_for_the_state_lock_and_then_applies() {
    let (repo, _) = committed_example();
    let r = repo.path();
    assert_eq!(apply_cli(r, &[]).code, 0);
    let c2 = commit_interval(r, 44);
    let held = HeldLock::take(r, "apply by alice@laptop (pid 4242) since 2026-11-22T00:00:00Z");
    let d = Daemon::start(r, &["--auto-apply", "--interval", "1m"], &[]);
    let t = d.wait_tenant("tenant-123", "waiting for the lock", |t| {
        t["last_error"].as_str().is_some_and(|e| e.contains("waiting for the state lock") && e.contains("alice@laptop"))
    });
    assert_eq!(t["status"], "Progressing");
    assert!(isp_config(r, "tenant-123").unwrap().contains("sync_interval_minutes: 15"));
    assert!(d.log().contains("apply by alice@laptop"), "the log says who holds the lock");
    assert!(d.metric("dotmac_state_lock_waits_total") >= 1.0);
    drop(held);
    d.wait_tenant("tenant-123", "applied once the lock is free", |t| t["status"] == "Synced" && t["revision"] == c2);
    assert!(isp_config(r, "tenant-123").unwrap().contains("sync_interval_minutes: 44"));
    assert_eq!(d.stop().0, 0);
}

#[test]
fn a_commit_that_does_not_validate_is_reported_and_not_reconciled() {
    let (repo, c1) = committed_example();
    let r = repo.path();
    let d = Daemon::start(r, &["--auto-apply", "--interval", "1s"], &[]);
    d.wait_all("Synced", &c1);
    edit(&r.join("tenants/tenant-123/tenant.yaml"), "sync_interval_minutes:", "sync_interval_minutez:");
    let bad = git_commit_all(r, "a typo");
    let s = d.wait("the bad commit reported", |d| {
        let s = d.status();
        s["revision_error"].as_str().is_some_and(|e| e.contains(&bad[..12])).then_some(s)
    });
    assert_eq!(s["revision"], c1.as_str(), "still reconciling the last good commit");
    assert_eq!(s["source"]["head"], bad.as_str());
    assert!(s["revision_error"].as_str().unwrap().contains("tenants/tenant-123/tenant.yaml"), "{s}");
    // Drift is still healed against the last good commit.
    let before = d.metric("dotmac_drift_healed_total");
    edit_isp(r, "tenant-123", "sync_interval_minutes: 15", "sync_interval_minutes: 99");
    d.wait("healed", |d| (d.metric("dotmac_drift_healed_total") > before).then_some(()));
    assert_eq!(d.stop().0, 0);
}

/// A webhook receiver: records each request; answers the first `fail_first` with 500.
struct Receiver {
    pub url: String,
    pub seen: Arc<Mutex<Vec<(axum::http::HeaderMap, String)>>>,
    _rt: tokio::runtime::Runtime,
}

impl Receiver {
    fn start(fail_first: usize) -> Receiver {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let seen: Arc<Mutex<Vec<(axum::http::HeaderMap, String)>>> = Arc::default();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let s = seen.clone();
        rt.spawn(async move {
            let app = axum::Router::new().route(
                "/hook",
                axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                    let s = s.clone();
                    async move {
                        let mut v = s.lock().unwrap();
                        v.push((headers, body));
                        if v.len() <= fail_first {
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR
                        } else {
                            axum::http::StatusCode::OK
                        }
                    }
                }),
            );
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(l, app).await.unwrap();
        });
        Receiver { url, seen, _rt: rt }
    }

    fn events(&self) -> Vec<(axum::http::HeaderMap, Value)> {
        self.seen.lock().unwrap().iter().map(|(h, b)| (h.clone(), serde_json::from_str(b).unwrap())).collect()
    }
}

fn hmac_hex(key: &[u8], body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    m.update(body);
    m.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn notifications_are_signed_retried_and_no_secret_leaks_anywhere() {
    const HOOK_KEY: &str = "hook-signing-key-0123456789abcdef";
    const GIT_TOKEN: &str = "ghp_gitTokenThatMustNeverShow42";
    const WEBHOOK_SECRET: &str = "git-webhook-secret-never-shown";
    const STRIPE: &str = "sk_live_51SuperSecretStripeValueXYZ";
    let rx = Receiver::start(1);
    let (repo, _) = committed_example();
    let r = repo.path();
    daemon_settings(
        r,
        &format!(
            "\n[[notifications.webhooks]]\nurl = \"{}\"\nsecret_env = \"DOTMAC_TEST_HOOK_KEY\"\nmax_attempts = 3\n",
            rx.url
        ),
    );
    let c = git_commit_all(r, "notifications");
    put_secret(r, "tenant-123", "stripe/secret_key", STRIPE);
    let env = [
        ("DOTMAC_TEST_HOOK_KEY", HOOK_KEY),
        ("DOTMAC_GIT_TOKEN", GIT_TOKEN),
        ("DOTMAC_WEBHOOK_SECRET", WEBHOOK_SECRET),
        ("DOTMAC_LOG", "dotmac_gitops=debug"),
    ];
    let d = Daemon::start(r, &["--auto-apply", "--interval", "1s"], &env);
    d.wait_all("Synced", &c);
    // Five tenants applied: five configuration events (the first try of the first failed).
    let updated = |rx: &Receiver| {
        let mut ids: Vec<String> = rx
            .events()
            .iter()
            .filter(|(_, e)| e["event"] == "tenant.configuration.updated")
            .map(|(_, e)| e["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids.dedup();
        ids.len()
    };
    d.wait("five configuration events", |_| (updated(&rx) == 5).then_some(()));
    let all = rx.seen.lock().unwrap().clone();
    assert_eq!(all[0].0["x-dotmac-delivery"], all[1].0["x-dotmac-delivery"], "the failed event was retried");
    for (h, body) in &all {
        let sig = h["x-dotmac-signature-256"].to_str().unwrap();
        assert_eq!(sig, format!("sha256={}", hmac_hex(HOOK_KEY.as_bytes(), body.as_bytes())));
        let e: Value = serde_json::from_str(body).unwrap();
        assert_eq!(h["x-dotmac-event"].to_str().unwrap(), e["event"].as_str().unwrap());
        assert_eq!(e["revision"], c.as_str());
    }
    // Drift: detected and healed, each an event.
    edit_isp(r, "tenant-123", "sync_interval_minutes: 15", "sync_interval_minutes: 99");
    d.wait("drift events", |_| {
        let ev = rx.events();
        let has = |name: &str| ev.iter().any(|(_, e)| e["event"] == name && e["tenant"] == "tenant-123");
        (has("tenant.drift.detected") && has("tenant.drift.healed")).then_some(())
    });
    assert!(d.metric("dotmac_notifications_total{event=\"tenant.drift.healed\",outcome=\"delivered\"}") >= 1.0);
    // The git webhook wants the signature.
    assert_eq!(d.post("/api/v1/webhook/git", &[], b"{}").0, 401);
    let sig = format!("sha256={}", hmac_hex(WEBHOOK_SECRET.as_bytes(), b"{}"));
    assert_eq!(d.post("/api/v1/webhook/git", &[("X-Hub-Signature-256", &sig)], b"{}").0, 202);

    // Search every output for the secrets.
    let mut outputs = vec![d.get("/api/v1/status").1, d.get("/metrics").1, d.get("/api/v1/audit").1];
    for t in ["tenant-123", "bluesky-net", "coastal-wireless", "northwind-isp", "pampas-telecom"] {
        outputs.push(d.get(&format!("/api/v1/tenants/{t}")).1);
    }
    let tenant = d.tenant("tenant-123");
    assert!(!tenant["last_plan"].is_null());
    for (h, b) in rx.seen.lock().unwrap().iter() {
        outputs.push(b.clone());
        for (k, v) in h {
            if k != "x-dotmac-signature-256" {
                outputs.push(format!("{k}: {}", v.to_str().unwrap_or("")));
            }
        }
    }
    let (code, log) = d.stop();
    assert_eq!(code, 0);
    outputs.push(log);
    for secret in [HOOK_KEY, GIT_TOKEN, WEBHOOK_SECRET, STRIPE] {
        for o in &outputs {
            assert!(!o.contains(secret), "a secret leaked into:\n{o}");
        }
    }
}

#[test]
fn a_remote_repository_is_cloned_fetched_and_fetched_at_once_on_the_webhook() {
    let dir = tempfile::tempdir().unwrap();
    let remote = dir.path().join("remote.git");
    git(dir.path(), &["init", "--quiet", "--bare", "--initial-branch=main", remote.to_str().unwrap()]);
    let (work, c1) = committed_example();
    let w = work.path();
    git(w, &["push", "--quiet", remote.to_str().unwrap(), "HEAD:refs/heads/main"]);
    let url = format!("file://{}", remote.display());
    let state = dir.path().join("state");
    let cache = dir.path().join("cache");
    let d = Daemon::start(
        Path::new(&url),
        &["--auto-apply", "--interval", "1h", "--cache-dir", cache.to_str().unwrap()],
        &[("DOTMAC_STATE_DIR", state.to_str().unwrap()), ("DOTMAC_GIT_TOKEN", "file-urls-ignore-it")],
    );
    let s = d.wait_all("Synced", &c1);
    assert_eq!(s["source"]["branch"], "main");
    assert!(live_entry(&state, "tenant-123/isp.config").is_some(), "state where DOTMAC_STATE_DIR says");
    // A push is seen at once through the webhook (the interval is an hour).
    let c2 = commit_interval(w, 55);
    git(w, &["push", "--quiet", remote.to_str().unwrap(), "HEAD:refs/heads/main"]);
    assert_eq!(d.post("/api/v1/webhook/git", &[], b"{\"ref\":\"refs/heads/main\"}").0, 202);
    d.wait_all("Synced", &c2);
    assert!(live_entry(&state, "tenant-123/isp.config").unwrap().contains("sync_interval_minutes: 55"));
    let (code, log) = d.stop();
    assert_eq!(code, 0, "{log}");
    assert!(!log.contains("file-urls-ignore-it"));
}

#[test]
fn two_daemons_on_one_state_elect_one_leader_through_the_state_store() {
    let (repo, c) = committed_example();
    let r = repo.path();
    let a = Daemon::start(r, &["--auto-apply", "--interval", "1s", "--leader-election", "state"], &[]);
    a.wait_all("Synced", &c);
    let b = Daemon::start(r, &["--auto-apply", "--interval", "1s", "--leader-election", "state"], &[]);
    let s = b.wait("the second standing by", |b| {
        let s = b.status();
        (s["role"] == "standby" && s["leader"].as_str().is_some_and(|l| l.starts_with("daemon by"))).then_some(s)
    });
    assert!(s["tenants"].as_array().unwrap().is_empty(), "a standby reconciles nothing");
    let (code, body) = b.get("/readyz");
    assert_eq!(code, 200, "a standby is ready to take over");
    assert!(body.starts_with("standby"));
    assert_eq!(b.metric("dotmac_leader"), 0.0);
    assert_eq!(a.status()["role"], "leader");
    // The leader goes: the standby takes over.
    assert_eq!(a.stop().0, 0);
    b.wait("the standby leading", |b| (b.status()["role"] == "leader").then_some(()));
    b.wait_all("Synced", &c);
    assert_eq!(b.metric("dotmac_leader"), 1.0);
    assert_eq!(b.stop().0, 0);
}

/// A fake API server holding Leases (GET, POST, PUT with resourceVersion preconditions,
/// bearer token required), for leader election without a cluster.
struct LeaseServer {
    url: String,
    leases: Arc<Mutex<std::collections::BTreeMap<String, Value>>>,
    _rt: tokio::runtime::Runtime,
}

impl LeaseServer {
    fn start() -> LeaseServer {
        use axum::extract::Path as P;
        use axum::http::{HeaderMap, StatusCode};
        use axum::routing::{get, post};
        type Db = Arc<Mutex<std::collections::BTreeMap<String, Value>>>;
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let leases: Db = Arc::default();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let status = |code: u16, reason: &str| {
            (
                StatusCode::from_u16(code).unwrap(),
                axum::Json(
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason}),
                ),
            )
        };
        let authorized = |h: &HeaderMap| h.get("authorization").is_some_and(|v| v == "Bearer lease-token");
        let db = leases.clone();
        rt.spawn(async move {
            let (g, p, c) = (db.clone(), db.clone(), db.clone());
            let app = axum::Router::new()
                .route(
                    "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}",
                    get(move |h: HeaderMap, P((ns, name)): P<(String, String)>| {
                        let db = g.clone();
                        async move {
                            if !authorized(&h) {
                                return status(401, "Unauthorized");
                            }
                            match db.lock().unwrap().get(&format!("{ns}/{name}")) {
                                Some(l) => (StatusCode::OK, axum::Json(l.clone())),
                                None => status(404, "NotFound"),
                            }
                        }
                    })
                    .put(
                        move |h: HeaderMap,
                              P((ns, name)): P<(String, String)>,
                              axum::Json(mut body): axum::Json<Value>| {
                            let db = p.clone();
                            async move {
                                if !authorized(&h) {
                                    return status(401, "Unauthorized");
                                }
                                let mut db = db.lock().unwrap();
                                let key = format!("{ns}/{name}");
                                let Some(cur) = db.get(&key) else { return status(404, "NotFound") };
                                if body["metadata"]["resourceVersion"] != cur["metadata"]["resourceVersion"] {
                                    return status(409, "Conflict");
                                }
                                let rv: u64 = cur["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
                                body["metadata"]["resourceVersion"] = json!((rv + 1).to_string());
                                body["metadata"]["namespace"] = json!(ns);
                                db.insert(key, body.clone());
                                (StatusCode::OK, axum::Json(body))
                            }
                        },
                    ),
                )
                .route(
                    "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
                    post(move |h: HeaderMap, P(ns): P<String>, axum::Json(mut body): axum::Json<Value>| {
                        let db = c.clone();
                        async move {
                            if !authorized(&h) {
                                return status(401, "Unauthorized");
                            }
                            let mut db = db.lock().unwrap();
                            let key = format!("{ns}/{}", body["metadata"]["name"].as_str().unwrap());
                            if db.contains_key(&key) {
                                return status(409, "AlreadyExists");
                            }
                            body["metadata"]["resourceVersion"] = json!("1");
                            body["metadata"]["namespace"] = json!(ns);
                            db.insert(key, body.clone());
                            (StatusCode::CREATED, axum::Json(body))
                        }
                    }),
                );
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(l, app).await.unwrap();
        });
        LeaseServer { url, leases, _rt: rt }
    }

    fn kubeconfig(&self, dir: &Path) -> std::path::PathBuf {
        let p = dir.join("kubeconfig");
        std::fs::write(
            &p,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: f\n  cluster:\n    server: {}\ncontexts:\n- name: f\n  context:\n    cluster: f\n    user: u\n    namespace: ops\ncurrent-context: f\nusers:\n- name: u\n  user:\n    token: lease-token\n",
                self.url
            ),
        )
        .unwrap();
        p
    }

    fn lease(&self) -> Option<Value> {
        self.leases.lock().unwrap().get("ops/dotmac-gitops").cloned()
    }
}

#[test]
fn two_daemons_elect_one_leader_through_a_kubernetes_lease() {
    let api = LeaseServer::start();
    let (repo, c) = committed_example();
    let r = repo.path();
    let kc = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(kc.path());
    let args = [
        "--auto-apply",
        "--interval",
        "1s",
        "--leader-election",
        "lease",
        "--lease-namespace",
        "ops",
        "--lease-duration",
        "4s",
    ];
    let env = [("KUBECONFIG", kubeconfig.to_str().unwrap()), ("POD_NAME", "dotmac-a")];
    let a = Daemon::start(r, &args, &env);
    a.wait_all("Synced", &c);
    let lease = api.lease().expect("the Lease was created");
    let holder_a = lease["spec"]["holderIdentity"].as_str().unwrap().to_owned();
    assert!(holder_a.starts_with("dotmac-a_"), "{lease}");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 4);
    let env_b = [("KUBECONFIG", kubeconfig.to_str().unwrap()), ("POD_NAME", "dotmac-b")];
    let b = Daemon::start(r, &args, &env_b);
    b.wait("b standing by", |b| (b.status()["leader"].as_str() == Some(holder_a.as_str())).then_some(()));
    assert_eq!(b.status()["role"], "standby");
    // The leader dies without a word (SIGKILL): b takes over once the Lease expires.
    let (code, _) = a.signal(libc::SIGKILL);
    assert_eq!(code, -1);
    b.wait("b leading", |b| (b.status()["role"] == "leader").then_some(()));
    let lease = api.lease().unwrap();
    assert!(lease["spec"]["holderIdentity"].as_str().unwrap().starts_with("dotmac-b_"), "{lease}");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    b.wait_all("Synced", &c);
    // A clean shutdown gives the Lease up.
    assert_eq!(b.stop().0, 0);
    let lease = api.lease().unwrap();
    assert!(lease["spec"]["holderIdentity"].is_null(), "{lease}");
}

#[test]
fn a_self_heal_that_keeps_being_undone_stops_and_says_so() {
    let (repo, _) = committed_example();
    let r = repo.path();
    daemon_settings(r, "\n[daemon]\nself_heal_attempts = 2\n");
    let c = git_commit_all(r, "two heals at most");
    let d = Daemon::start(r, &["--auto-apply", "--interval", "1s"], &[]);
    d.wait_all("Synced", &c);
    // Something else (another controller, a person) keeps changing the ISP configuration back.
    let undo = || {
        if isp_config(r, "tenant-123").unwrap().contains("sync_interval_minutes: 15") {
            edit_isp(r, "tenant-123", "sync_interval_minutes: 15", "sync_interval_minutes: 99");
        }
    };
    let t = d.wait_tenant("tenant-123", "self-heal stopped", |t| {
        undo();
        t["heal_stopped"] == true
    });
    assert_eq!(t["status"], "Drifted");
    assert!(t["last_error"].as_str().unwrap().contains("self-heal stopped after 2 attempts"), "{t:#}");
    assert_eq!(d.metric("dotmac_self_heal_stopped_total"), 1.0);
    // It goes on checking, without healing.
    let healed = d.metric("dotmac_drift_healed_total");
    d.wait_tenant("tenant-123", "three checks without a heal", |t| {
        t["history"]
            .as_array()
            .unwrap()
            .last()
            .is_some_and(|h| h["event"] == "not applied" && h["count"].as_u64() >= Some(3))
    });
    assert_eq!(d.metric("dotmac_drift_healed_total"), healed);
    assert!(isp_config(r, "tenant-123").unwrap().contains("sync_interval_minutes: 99"));
    // An operator asks for it again: it heals.
    assert_eq!(d.post("/api/v1/tenants/tenant-123/reconcile", &[], b"").0, 202);
    d.wait_tenant("tenant-123", "healed on request", |t| t["status"] == "Synced" && t["heal_stopped"] == false);
    assert!(isp_config(r, "tenant-123").unwrap().contains("sync_interval_minutes: 15"));
    assert_eq!(d.post("/api/v1/tenants/nobody/reconcile", &[], b"").0, 404);
    assert_eq!(d.stop().0, 0);
}

#[test]
fn a_tenant_removed_from_the_repository_is_deleted_only_with_allow_delete() {
    let (repo, _) = committed_example();
    let r = repo.path();
    assert_eq!(apply_cli(r, &[]).code, 0);
    std::fs::remove_dir_all(r.join("tenants/pampas-telecom")).unwrap();
    let c2 = git_commit_all(r, "pampas-telecom leaves");
    let d = Daemon::start(r, &["--auto-apply", "--interval", "1s"], &[]);
    let t =
        d.wait_tenant("pampas-telecom", "deletion held", |t| t["status"] == "OutOfSync" && !t["last_error"].is_null());
    assert!(t["last_error"].as_str().unwrap().contains("--allow-delete"), "{t:#}");
    assert!(isp_config(r, "pampas-telecom").is_some());
    assert_eq!(d.stop().0, 0);

    let d = Daemon::start(r, &["--auto-apply", "--allow-delete", "--interval", "1s"], &[]);
    d.wait("pampas-telecom deleted and forgotten", |d| {
        let s = d.status();
        let ts = s["tenants"].as_array().unwrap();
        (ts.len() == 4 && ts.iter().all(|t| t["status"] == "Synced" && t["revision"] == c2)).then_some(())
    });
    assert!(isp_config(r, "pampas-telecom").is_none());
    assert_eq!(d.get("/api/v1/tenants/pampas-telecom").0, 404);
    assert_eq!(d.stop().0, 0);
    assert_eq!(run(&["plan", "--detailed-exitcode"], r).code, 0);
}

#[test]
fn a_daemon_killed_mid_apply_leaves_no_lock_and_the_next_apply_converges() {
    let (repo, _) = committed_example();
    let r = repo.path();
    let p = r.join("dotmac.toml");
    std::fs::write(&p, std::fs::read_to_string(&p).unwrap() + "\n[apply]\nparallelism = 1\n").unwrap();
    let c = git_commit_all(r, "one tenant at a time");
    // Each ISP write takes a second, so the kill lands inside the apply of the five tenants.
    let d = Daemon::start(r, &["--auto-apply", "--interval", "1m"], &[("DOTMAC_FAULTS", "isp:put:*:delay=1s")]);
    let lock = r.join(".dotmac/state/lock");
    d.wait("the daemon applying", |_| {
        std::fs::read_to_string(&lock).ok().filter(|h| h.starts_with("daemon by")).map(|_| ())
    });
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let (code, log) = d.signal(libc::SIGKILL);
    assert_eq!(code, -1, "killed by the signal, not exited:\n{log}");

    // The lock died with the daemon: a person's apply takes it at once (no --lock-timeout),
    // and what the interrupted apply left is finished, not reported as someone else's drift.
    let plan = run(&["plan", "--format", "json"], r);
    assert_eq!(plan.code, 0, "{}", plan.stderr);
    let plan: Value = serde_json::from_str(&plan.stdout).unwrap();
    assert!(!plan["changes"].as_array().unwrap().is_empty(), "the kill came after the whole apply");
    let out = apply_cli(r, &[]);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert_eq!(run(&["plan", "--detailed-exitcode"], r).code, 0, "converged after one apply");
    let drift = run(&["drift", "--format", "json"], r);
    let drift: Value = serde_json::from_str(&drift.stdout).unwrap();
    assert_eq!(drift["drift_detected"], false, "{drift:#}");
    // The state store is whole: the audit log reads, and a new daemon finds nothing to do.
    let audit: Value = serde_json::from_str(&run(&["audit", "--format", "json"], r).stdout).unwrap();
    assert!(!audit["entries"].as_array().unwrap().is_empty());
    let d = Daemon::start(r, &["--auto-apply", "--interval", "1m"], &[]);
    d.wait_all("Synced", &c);
    assert_eq!(d.metric("dotmac_apply_failures_total"), 0.0);
    assert_eq!(d.stop().0, 0);
}
