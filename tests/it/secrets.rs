//! Secrets never leak: known values are planted in the secret store (external ones through
//! `secret put`, generated ones read back from the store), then every byte the engine writes
//! — stdout, stderr with trace logs, plan files, the state store, the audit log, the live
//! store, error messages — is searched for them.

use crate::util::*;
use dotmac_gitops::model::{Address, ProviderId};
use dotmac_gitops::providers::local::LocalStore;
use std::path::Path;

fn all_files(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            all_files(&p, out);
        } else if let Ok(bytes) = std::fs::read(&p) {
            out.push((p.display().to_string(), bytes));
        }
    }
}

#[test]
fn planted_secret_values_never_appear_in_anything_the_engine_writes() {
    let repo = example_repo();
    let r = repo.path();
    let externals = [
        ("tenant-123", "stripe/secret_key", "sk_live_PLANTEDexternal0001"),
        ("tenant-123", "stripe/webhook_secret", "whsec_PLANTEDexternal0002"),
        ("tenant-123", "plugin_licenses/advanced_analytics", "PLANTED-license-0003"),
        ("northwind-isp", "hubspot/api_key", "PLANTED-hubspot-0004"),
    ];
    for (t, n, v) in externals {
        put_secret(r, t, n, v);
    }
    let trace = [("DOTMAC_LOG", "trace")];
    let mut outputs: Vec<(String, String)> = Vec::new();
    let mut record = |what: &str, o: Output| outputs.push((what.to_owned(), format!("{}\n{}", o.stdout, o.stderr)));
    record("apply", run_env(&["apply", "--auto-approve", "--now", NOW, "-vvv"], r, &trace));
    // Generated secrets: read back from the store, the one place they live.
    let store = LocalStore::open(&r.join(".dotmac"), ProviderId::Secrets, &Default::default()).unwrap();
    let mut planted: Vec<String> = externals.iter().map(|(_, _, v)| v.to_string()).collect();
    for (t, n) in [
        ("tenant-123", "database/password"),
        ("tenant-123", "webhooks/platform"),
        ("northwind-isp", "database/password"),
    ] {
        let a = Address::parse(&format!("{t}/openbao.secret[{n}]")).unwrap();
        let v = store.reveal(&a).unwrap().expect("generated on apply");
        assert!(v.len() >= 32);
        planted.push(String::from_utf8(v.expose().to_vec()).unwrap());
    }
    let plan_file = r.join("p.plan");
    for (what, args) in [
        ("plan text", vec!["plan", "--now", "2027-06-01T00:00:00Z"]),
        ("plan json", vec!["plan", "--format", "json", "--now", "2027-06-01T00:00:00Z"]),
        ("plan markdown", vec!["plan", "--format", "markdown", "--now", "2027-06-01T00:00:00Z"]),
        ("plan out", vec!["plan", "--out", plan_file.to_str().unwrap(), "--now", "2027-06-01T00:00:00Z"]),
        ("apply rotation", vec!["apply", plan_file.to_str().unwrap(), "-vvv"]),
        ("rotate", vec!["rotate", "--tenant", "tenant-123", "--emergency", "-vvv"]),
        ("drift", vec!["drift", "--format", "json"]),
        ("audit", vec!["audit", "--format", "json"]),
        ("render", vec!["render", "--format", "json"]),
        ("validate", vec!["validate", "--format", "json"]),
    ] {
        record(what, run_env(&args, r, &trace));
    }
    // Rotation wrote new versions: plant those too.
    for (t, n) in [("tenant-123", "database/password"), ("tenant-123", "webhooks/platform")] {
        let a = Address::parse(&format!("{t}/openbao.secret[{n}]")).unwrap();
        planted.push(String::from_utf8(store.reveal(&a).unwrap().unwrap().expose().to_vec()).unwrap());
    }
    // Failures and their error messages.
    std::fs::write(
        r.join("tenants/tenant-123/tenant.yaml"),
        std::fs::read_to_string(r.join("tenants/tenant-123/tenant.yaml")).unwrap().replace("Demo ISP", "Demo ISP 2"),
    )
    .unwrap();
    record(
        "failing apply",
        run_env(
            &["apply", "--auto-approve", "--now", NOW, "-vvv"],
            r,
            &[("DOTMAC_LOG", "trace"), ("DOTMAC_FAULTS", "isp:put:*")],
        ),
    );
    record("stale apply", run_env(&["apply", plan_file.to_str().unwrap()], r, &trace));

    let mut files = Vec::new();
    all_files(r, &mut files);
    let mut leaks = Vec::new();
    for p in &planted {
        for (what, text) in &outputs {
            if text.contains(p.as_str()) {
                leaks.push(format!("{what} output contains a planted value"));
            }
        }
        for (path, bytes) in &files {
            if path.contains("/tenants/") || path.contains("/.git/") {
                continue;
            }
            if bytes.windows(p.len()).any(|w| w == p.as_bytes()) {
                leaks.push(format!("{path} contains a planted value"));
            }
        }
    }
    assert!(leaks.is_empty(), "{leaks:#?}");
    // The search would have found them: the store does hold the values, encrypted.
    assert!(files.iter().any(|(p, _)| p.ends_with("secrets/tenant-123.secrets.json")));
    // Trace logs were on, so they were searched too.
    let apply_out = &outputs.iter().find(|(w, _)| w == "apply").unwrap().1;
    assert!(apply_out.contains("TRACE") && apply_out.contains("put"), "no trace logs to search:\n{apply_out}");
}
