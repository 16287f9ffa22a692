//! Secrets never leak. Known values are planted in every provider — external secrets through
//! `secret put` or `bao kv put`, generated ones read back from their store, the tokens of the
//! management platform, the ISP instances, the Kubernetes API and OpenBao — and every byte
//! the engine writes is collected as evidence and searched for them: stdout and stderr of
//! every command (trace logs, text and JSON), plan files, PR markdown, rendered files, the
//! state store and every other file under the repository, error messages of failing,
//! refused and stale applies and of provider errors, and the requests the engine sent to
//! the platform and the Kubernetes API (only OpenBao, the store, may receive a value).
//!
//! A value leaks if any 16-byte piece of it (or of its base64, hex or JSON-escaped form)
//! appears: a truncated or re-encoded value is a leak too.
//!
//! The daemon (issue 8) adds its HTTP answers with `Evidence::add(label, bytes)`.

use crate::bao::{Bao, TOKEN_ENV as BAO_TOKEN_ENV};
use crate::kube_fake::{Fake, TOKEN as KUBE_TOKEN};
use crate::platform::{FaultKind, Platform};
use crate::util::*;
use dotmac_gitops::model::{Address, ProviderId};
use dotmac_gitops::providers::local::LocalStore;
use std::collections::HashSet;
use std::path::Path;

/// The pieces searched for: windows of this many bytes.
const PIECE: usize = 16;

/// Values that must never appear, by name.
#[derive(Default)]
pub struct Planted {
    names: Vec<String>,
    /// Every `PIECE`-byte window of every form of every value, with the value's name.
    pieces: std::collections::HashMap<Vec<u8>, usize>,
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

impl Planted {
    pub fn add(&mut self, name: &str, value: &str) {
        assert!(value.len() >= PIECE, "{name}: planted values must be at least {PIECE} bytes");
        let id = self.names.len();
        self.names.push(name.to_owned());
        let json = serde_json::to_string(value).unwrap();
        let forms = [
            value.to_owned(),
            json[1..json.len() - 1].to_owned(),
            base64(value.as_bytes()),
            dotmac_gitops::providers::local::hex(value.as_bytes()),
        ];
        for form in forms {
            for w in form.as_bytes().windows(PIECE) {
                self.pieces.insert(w.to_vec(), id);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }
}

/// Everything the engine wrote, by where it was seen.
#[derive(Default)]
pub struct Evidence {
    items: Vec<(String, Vec<u8>)>,
}

impl Evidence {
    pub fn add(&mut self, label: impl Into<String>, bytes: impl Into<Vec<u8>>) {
        self.items.push((label.into(), bytes.into()));
    }

    pub fn output(&mut self, label: &str, o: &Output) {
        self.add(format!("{label}: stdout"), o.stdout.clone());
        self.add(format!("{label}: stderr"), o.stderr.clone());
    }

    /// Every file under `dir`, except those `skip` names.
    pub fn files(&mut self, dir: &Path, skip: &dyn Fn(&str) -> bool) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let label = p.display().to_string();
            if skip(&label) {
                continue;
            }
            if p.is_dir() {
                self.files(&p, skip);
            } else if let Ok(bytes) = std::fs::read(&p) {
                self.add(label, bytes);
            }
        }
    }

    pub fn bytes(&self) -> usize {
        self.items.iter().map(|(_, b)| b.len()).sum()
    }

    /// Where any planted value (a piece of it, in any form) appears.
    pub fn leaks(&self, planted: &Planted) -> Vec<String> {
        let mut found = Vec::new();
        for (label, bytes) in &self.items {
            let hits: HashSet<usize> = bytes.windows(PIECE).filter_map(|w| planted.pieces.get(w).copied()).collect();
            for id in hits {
                found.push(format!("{label} contains {}", planted.names[id]));
            }
        }
        found.sort();
        found
    }
}

/// Not the engine's output: the repository's own documents and git data.
fn not_engine_output(path: &str) -> bool {
    path.contains("/tenants/") || path.contains("/.git/") || path.ends_with("/kubeconfig.yaml")
}

fn reveal(store: &LocalStore, tenant: &str, name: &str) -> String {
    let a = Address::parse(&format!("{tenant}/openbao.secret[{name}]")).unwrap();
    let v = store.reveal(&a).unwrap().expect("the secret is in the store");
    String::from_utf8(v.expose().to_vec()).unwrap()
}

#[test]
fn planted_secret_values_never_appear_in_anything_the_engine_writes() {
    let repo = example_repo();
    let r = repo.path();
    let mut planted = Planted::default();
    let externals = [
        ("tenant-123", "stripe/secret_key", "sk_live_PLANTEDexternal0001"),
        ("tenant-123", "stripe/webhook_secret", "whsec_PLANTEDexternal0002"),
        ("tenant-123", "plugin_licenses/advanced_analytics", "PLANTED-license-0003-x"),
        ("northwind-isp", "hubspot/api_key", "PLANTED-hubspot-0004-x"),
    ];
    for (t, n, v) in externals {
        put_secret(r, t, n, v);
        planted.add(&format!("external {t}/{n}"), v);
    }
    let trace = [("DOTMAC_LOG", "trace")];
    let mut ev = Evidence::default();
    ev.output("apply", &run_env(&["apply", "--auto-approve", "--now", NOW, "-vvv"], r, &trace));
    // Generated secrets: read back from the store, the one place they live.
    let store = LocalStore::open(&r.join(".dotmac"), ProviderId::Secrets, &Default::default()).unwrap();
    let generated = [
        ("tenant-123", "database/password"),
        ("tenant-123", "webhooks/platform"),
        ("northwind-isp", "database/password"),
    ];
    for (t, n) in generated {
        planted.add(&format!("generated {t}/{n}"), &reveal(&store, t, n));
    }
    let plan_file = r.join("p.plan");
    let pf = plan_file.to_str().unwrap();
    let later = "2027-06-01T00:00:00Z";
    for (what, args) in [
        ("plan text", vec!["plan", "--now", later]),
        ("plan json", vec!["plan", "--format", "json", "--now", later]),
        ("plan markdown", vec!["plan", "--format", "markdown", "--now", later]),
        ("plan out", vec!["plan", "--out", pf, "--now", later]),
        ("apply rotation", vec!["apply", pf, "-vvv"]),
        ("rotate", vec!["rotate", "--tenant", "tenant-123", "--emergency", "-vvv"]),
        ("rotate json logs", vec!["rotate", "--tenant", "northwind-isp", "-vvv", "--log-format", "json"]),
        ("drift", vec!["drift"]),
        ("drift json", vec!["drift", "--format", "json"]),
        ("audit", vec!["audit"]),
        ("audit json", vec!["audit", "--format", "json"]),
        ("render", vec!["render", "--format", "json"]),
        ("render out", vec!["render", "--out", "rendered"]),
        ("validate", vec!["validate", "--format", "json"]),
        ("validate text", vec!["validate"]),
    ] {
        ev.output(what, &run_env(&args, r, &trace));
    }
    // Rotation wrote new versions: plant those too.
    for (t, n) in generated {
        planted.add(&format!("rotated {t}/{n}"), &reveal(&store, t, n));
    }
    // Failures and their error messages: a failing write, a stale plan, a conflict, a
    // damaged secrets file, a refused secret put.
    edit_file(&r.join("tenants/tenant-123/tenant.yaml"), "Demo ISP", "Demo ISP 2");
    let failing = [("DOTMAC_LOG", "trace"), ("DOTMAC_FAULTS", "isp:put:*")];
    ev.output("failing apply", &run_env(&["apply", "--auto-approve", "--now", NOW, "-vvv"], r, &failing));
    ev.output("stale apply", &run_env(&["apply", pf], r, &trace));
    let lost = [("DOTMAC_LOG", "trace"), ("DOTMAC_FAULTS", "secrets:put:1:lost")];
    ev.output("lost answer", &run_env(&["rotate", "--tenant", "tenant-123", "-vvv"], r, &lost));
    let secrets_file = live_file(&r.join(".dotmac"), "tenant-123/openbao.secret[database/password]");
    let intact = std::fs::read(&secrets_file).unwrap();
    std::fs::write(&secrets_file, &intact[..intact.len() / 2]).unwrap();
    ev.output("damaged store", &run_env(&["apply", "--auto-approve", "--now", NOW, "-vvv"], r, &trace));
    std::fs::write(&secrets_file, &intact).unwrap();
    ev.output("bad secret name", &run_env(&["secret", "put", "--tenant", "tenant-123", "--name", "../x"], r, &trace));

    ev.files(r, &not_engine_output);
    let leaks = ev.leaks(&planted);
    assert!(leaks.is_empty(), "{leaks:#?}");
    // The search would have found them: the store holds them (encrypted), and the search
    // finds a piece of a value in any of its forms.
    assert!(planted.len() >= 10);
    let mut probe = Evidence::default();
    probe.add("probe", format!("x{}y", &base64(reveal(&store, "tenant-123", "database/password").as_bytes())[3..23]));
    assert_eq!(probe.leaks(&planted).len(), 1, "the search misses a re-encoded piece");
    // Trace logs were on, so they were searched too.
    let traced = ev.items.iter().any(|(l, b)| l.starts_with("apply:") && String::from_utf8_lossy(b).contains("TRACE"));
    assert!(traced, "no trace logs to search");
    eprintln!(
        "secrets: searched {} outputs and files, {} bytes, for {} values",
        ev.items.len(),
        ev.bytes(),
        planted.len()
    );
}

/// The remote providers: the management platform and ISP instances over http, Kubernetes
/// on the fake API, secrets in OpenBao. Values and tokens are planted in each.
#[test]
fn planted_values_and_tokens_of_every_remote_provider_never_appear() {
    let Some(bao) = Bao::start("secrets: remote providers") else { return };
    const PLATFORM_TOKEN: &str = "tok-PLANTED-platform-7b1e2c9d4a";
    let p = Platform::start(PLATFORM_TOKEN);
    let fake = Fake::start();
    let repo = example_repo();
    let r = repo.path();
    let kc = fake.kubeconfig(r);
    let toml = format!(
        "format = 1\n[providers.management]\nkind = \"http\"\nurl = \"{}\"\ntoken_env = \"PLANT_TOKEN\"\n\
         [providers.isp]\nkind = \"http\"\nurl = \"{}\"\ntoken_env = \"PLANT_TOKEN\"\n\
         [providers.kubernetes]\nkind = \"kubernetes\"\nkubeconfig = \"{}\"\nrollout_timeout = \"30s\"\n{}",
        p.management_url(),
        p.isp_url(),
        kc.display(),
        bao.settings_toml()
    );
    std::fs::write(r.join("dotmac.toml"), toml).unwrap();
    let mut planted = Planted::default();
    planted.add("the platform token", PLATFORM_TOKEN);
    planted.add("the Kubernetes token", KUBE_TOKEN);
    planted.add("the OpenBao token", &bao.token);
    let externals = crate::bao::EXAMPLE_EXTERNALS;
    for (i, (t, n)) in externals.iter().enumerate() {
        let mut noise = [0u8; 8];
        getrandom::fill(&mut noise).unwrap();
        let value = format!("PLANTED-{i:02}-{}", dotmac_gitops::providers::local::hex(&noise));
        bao.kv_put(&format!("dotmac/tenants/{t}/{n}"), &value);
        planted.add(&format!("external {t}/{n}"), &value);
    }
    let env = [("PLANT_TOKEN", PLATFORM_TOKEN), (BAO_TOKEN_ENV, bao.token.as_str()), ("DOTMAC_LOG", "trace")];
    let mut ev = Evidence::default();
    let dm = |args: &[&str]| run_env(args, r, &env);
    let out = dm(&["apply", "--auto-approve", "--now", NOW, "-vvv"]);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    ev.output("apply", &out);
    for (t, n) in [
        ("tenant-123", "database/password"),
        ("tenant-123", "webhooks/platform"),
        ("northwind-isp", "database/password"),
    ] {
        planted.add(&format!("generated {t}/{n}"), &bao.kv_value(&format!("dotmac/tenants/{t}/{n}")));
    }
    let pf = r.join("p.plan");
    let pf = pf.to_str().unwrap();
    for (what, args) in [
        ("plan json", vec!["plan", "--format", "json", "--now", NOW]),
        ("plan markdown", vec!["plan", "--format", "markdown", "--now", NOW]),
        ("drift", vec!["drift", "--format", "json"]),
        ("rotate", vec!["rotate", "--tenant", "tenant-123", "--emergency", "-vvv"]),
        ("audit", vec!["audit", "--format", "json"]),
    ] {
        ev.output(what, &dm(&args));
    }
    // Errors from each provider: a platform that quotes the token back, a Kubernetes API
    // that fails, a saved plan gone stale, an OpenBao token that is refused.
    edit_file(&r.join("tenants/tenant-123/tenant.yaml"), "name: Demo ISP", "name: Demo ISP Renamed");
    ev.output("plan out", &dm(&["plan", "--out", pf, "--now", NOW]));
    p.fault(Some("PUT"), "/isp/tenant-123/", FaultKind::EchoToken(500), None);
    let failed = |o: Output| {
        assert_eq!(o.code, 1, "this step was to fail:\n{}\n{}", o.stdout, o.stderr);
        o
    };
    ev.output("platform error", &failed(dm(&["apply", "--auto-approve", "--now", NOW, "-vvv"])));
    p.clear_faults();
    fake.fail("PATCH", "deployments", None, 500, 10);
    ev.output("kubernetes error", &failed(dm(&["apply", "--auto-approve", "--now", NOW, "-vvv"])));
    ev.output("stale plan", &failed(dm(&["apply", pf, "-vvv"])));
    let refused =
        [("PLANT_TOKEN", PLATFORM_TOKEN), (BAO_TOKEN_ENV, "s.not-the-token-0000000000"), ("DOTMAC_LOG", "trace")];
    ev.output("openbao refused", &failed(run_env(&["plan", "--now", NOW, "-vvv"], r, &refused)));

    ev.files(r, &not_engine_output);
    // What the engine sent: to the platform (token only in the Authorization header) and
    // to the Kubernetes API (the bearer token is not recorded by the fake).
    for q in p.requests() {
        ev.add(
            format!("platform request {} {}", q.method, q.path),
            format!("{} {:?} {}", q.path, q.correlation_id, q.body),
        );
    }
    for e in p.audit_events() {
        ev.add("platform audit event", e.to_string());
    }
    for q in fake.requests() {
        ev.add(format!("kubernetes request {} {}", q.method, q.path), format!("{:?} {:?}", q.query, q.body));
    }
    let leaks = ev.leaks(&planted);
    assert!(leaks.is_empty(), "{leaks:#?}");
    assert!(p.requests().iter().any(|q| q.authorization.as_deref() == Some(&format!("Bearer {PLATFORM_TOKEN}"))));
    eprintln!(
        "secrets: searched {} outputs, files and requests, {} bytes, for {} values",
        ev.items.len(),
        ev.bytes(),
        planted.len()
    );
}
