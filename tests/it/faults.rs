//! Fault injection in every provider: for every k, the k-th write (put or delete) of one
//! provider fails during a whole apply, and after each run every tenant is either fully
//! applied or rolled back, and the state matches live. The oracle is the plan: the re-plan
//! after the run must show, for each tenant that failed, exactly the changes the plan before
//! the run showed (it was rolled back, and its records agree with live), for every other
//! tenant nothing at all (applied and recorded), and no drift anywhere.
//!
//! The apply is one of each kind of change on the example repository: updates (a rename, a
//! plan change), deletes (a tenant removed), secret rotations (secrets made old), under both
//! coordination strategies. Every provider slot is swept with the local providers, the
//! management and ISP slots over the http contract server, the ISP and Kubernetes slots on
//! the fake Kubernetes API, and the secrets slot on a real OpenBao (a few k: each needs a
//! server of its own). Faults come from `DOTMAC_FAULTS`: `fail` (the call never reaches
//! the system) and `lost` (it is done there, and the answer is lost).

use crate::bao::{Bao, TOKEN_ENV as BAO_TOKEN_ENV};
use crate::kube_fake::Fake;
use crate::platform::Platform;
use crate::util::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// What a plan wants, per tenant: (address, action), record-only changes included.
fn by_tenant(plan: &Value) -> BTreeMap<String, BTreeSet<(String, String)>> {
    let mut out: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for c in plan["changes"].as_array().unwrap() {
        out.entry(c["tenant"].as_str().unwrap().to_owned())
            .or_default()
            .insert((c["address"].as_str().unwrap().to_owned(), c["action"].as_str().unwrap().to_owned()));
    }
    out
}

/// Makes a tenant's local secrets look written `days` ago (their versions are unchanged, so
/// this is not drift): generated ones are then due for rotation.
pub fn age_secrets(repo: &Path, tenant: &str, days: i64) {
    let state = repo.join(".dotmac");
    let now: jiff::Timestamp = NOW.parse().unwrap();
    let then = now.checked_sub(jiff::SignedDuration::from_hours(days * 24)).unwrap().to_string();
    let secrets: Vec<String> = live_addresses(&state, dotmac_gitops::model::ProviderId::Secrets, tenant)
        .into_iter()
        .filter(|a| a.contains("/openbao.secret["))
        .collect();
    assert!(!secrets.is_empty(), "{tenant} has no local secrets");
    for address in secrets {
        let mut s: Value = serde_json::from_str(&live_entry(&state, &address).unwrap()).unwrap();
        s["updated"] = Value::String(then.clone());
        s["created"] = Value::String(then.clone());
        for v in s["versions"].as_array_mut().unwrap() {
            v["created"] = Value::String(then.clone());
        }
        set_live(&state, &address, Some(&(serde_json::to_string_pretty(&s).unwrap() + "\n")));
    }
}

/// The changes every sweep applies, on an example repository already applied.
fn change_the_repository(repo: &Path, parked: &Path) {
    edit_file(&repo.join("tenants/tenant-123/tenant.yaml"), "name: Demo ISP", "name: Demo ISP Renamed");
    edit_file(&repo.join("tenants/tenant-123/tenant.yaml"), "sync_interval_minutes: 15", "sync_interval_minutes: 20");
    edit_file(&repo.join("tenants/pampas-telecom/tenant.yaml"), "plan: basic", "plan: premium");
    std::fs::rename(repo.join("tenants/bluesky-net"), parked.join("bluesky-net")).unwrap();
    // A new generated secret in each coordination strategy's tenant: secret creates.
    let new = "  webhooks/partner: {generate: {length: 24}}\n";
    edit_file(
        &repo.join("tenants/tenant-123/secrets.yaml"),
        "  stripe/secret_key:",
        &format!("{new}  stripe/secret_key:"),
    );
    edit_file(
        &repo.join("tenants/northwind-isp/secrets.yaml"),
        "  stripe/secret_key:",
        &format!("{new}  stripe/secret_key:"),
    );
}

/// A repository applied, changed, and a way back to that moment for every run.
struct Scenario<'a> {
    name: &'a str,
    repo: tempfile::TempDir,
    _parked: tempfile::TempDir,
    /// A copy of the repository's `.dotmac` (state store and local live stores).
    saved: tempfile::TempDir,
    env: Vec<(String, String)>,
    /// Puts the remote systems back (the local ones are copied back here).
    reset_remote: Box<dyn Fn() + 'a>,
    /// The plan every run starts from.
    before: Value,
}

impl<'a> Scenario<'a> {
    /// `repo`: the example repository with `dotmac.toml` set; `secrets_local`: whether
    /// secrets are in the local store (then they are made old, so that they rotate).
    fn new(
        name: &'a str,
        repo: tempfile::TempDir,
        env: Vec<(String, String)>,
        secrets_local: bool,
        snapshot_remote: impl FnOnce() -> Box<dyn Fn() + 'a>,
    ) -> Scenario<'a> {
        let r = repo.path();
        let envs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let out = run_env(&["apply", "--auto-approve", "--now", NOW], r, &envs);
        assert_eq!(out.code, 0, "{name}: the first apply failed:\n{}\n{}", out.stdout, out.stderr);
        let parked = tempfile::tempdir().unwrap();
        change_the_repository(r, parked.path());
        if secrets_local {
            for t in ["tenant-123", "northwind-isp"] {
                age_secrets(r, t, 200);
            }
        }
        let saved = tempfile::tempdir().unwrap();
        copy_tree(&r.join(".dotmac"), saved.path());
        let reset_remote = snapshot_remote();
        let out = run_env(&["plan", "--format", "json", "--now", NOW], r, &envs);
        assert_eq!(out.code, 0, "{name}: {}", out.stderr);
        let before: Value = serde_json::from_str(&out.stdout).unwrap();
        let s = Scenario { name, repo, _parked: parked, saved, env, reset_remote, before };
        let wanted = by_tenant(&s.before);
        assert!(wanted.len() >= 4, "{name}: the apply should touch several tenants: {wanted:?}");
        s
    }

    fn reset(&self) {
        let dotmac = self.repo.path().join(".dotmac");
        std::fs::remove_dir_all(&dotmac).unwrap();
        copy_tree(self.saved.path(), &dotmac);
        (self.reset_remote)();
    }

    /// One apply with `faults`; checks the outcome. Returns false when no fault was hit
    /// (every tenant applied: k was past the last call).
    fn run_once(&self, faults: &str) -> bool {
        self.reset();
        let r = self.repo.path();
        let mut env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        env.push(("DOTMAC_FAULTS", faults));
        let args = ["apply", "--auto-approve", "--allow-delete", "--parallelism", "1", "--now", NOW];
        let out = run_env(&args, r, &env);
        let what = format!("{} with {faults}", self.name);
        let failed: BTreeSet<String> = out
            .stderr
            .lines()
            .filter_map(|l| l.trim().strip_prefix("failed: "))
            .map(|l| l.split([':', ' ']).next().unwrap().to_owned())
            .collect();
        assert!(!out.stderr.contains("ROLLBACK FAILED"), "{what}: a rollback failed:\n{}", out.stderr);
        assert!(!out.stderr.contains("verification:"), "{what}: read-back found problems:\n{}", out.stderr);
        match out.code {
            0 => assert!(failed.is_empty()),
            1 => assert!(!failed.is_empty(), "{what}: exit 1 without a failed tenant:\n{}\n{}", out.stdout, out.stderr),
            c => panic!("{what}: exit {c}:\n{}\n{}", out.stdout, out.stderr),
        }
        env.pop();
        let plan = run_env(&["plan", "--format", "json", "--now", NOW], r, &env);
        assert_eq!(plan.code, 0, "{what}: the plan after the run failed:\n{}", plan.stderr);
        let after: Value = serde_json::from_str(&plan.stdout).unwrap();
        assert_eq!(after["summary"]["drift"], 0, "{what}: drift after the run:\n{}", plan.stdout);
        let (wanted, left) = (by_tenant(&self.before), by_tenant(&after));
        let none = BTreeSet::new();
        for t in wanted.keys().chain(left.keys()) {
            let (w, l) = (wanted.get(t).unwrap_or(&none), left.get(t).unwrap_or(&none));
            if failed.contains(t) {
                assert_eq!(
                    l, w,
                    "{what}: {t} failed but was not rolled back completely (or its records disagree with live)"
                );
            } else {
                assert!(l.is_empty(), "{what}: {t} applied but the re-plan still wants {l:?}");
            }
        }
        out.code == 1
    }

    /// Every k for one provider and operation, until a run hits no fault.
    fn sweep(&self, provider: &str, op: &str, mode: &str) -> usize {
        for k in 1..=200 {
            if !self.run_once(&format!("{provider}:{op}:{k}:{mode}")) {
                return k - 1;
            }
        }
        panic!("{}: {provider}:{op} never ran out of calls", self.name);
    }

    /// Sweeps every (provider, op) pair named; returns the runs made.
    fn sweep_all(&self, pairs: &[(&str, &str)], modes: &[&str]) -> usize {
        let mut runs = 0;
        for (provider, op) in pairs {
            for mode in modes {
                let n = self.sweep(provider, op, mode);
                eprintln!("{}: {provider}:{op}:{mode}: {n} faulty runs", self.name);
                runs += n + 1;
            }
        }
        runs
    }
}

const ALL_WRITES: &[(&str, &str)] = &[
    ("secrets", "put"),
    ("secrets", "delete"),
    ("management", "put"),
    ("management", "delete"),
    ("isp", "put"),
    ("isp", "delete"),
    ("kubernetes", "put"),
    ("kubernetes", "delete"),
];

#[test]
fn every_write_of_every_local_provider_failing_leaves_tenants_applied_or_rolled_back() {
    let s = Scenario::new("local", example_repo(), Vec::new(), true, || Box::new(|| {}));
    let runs = s.sweep_all(ALL_WRITES, &["fail", "lost"]);
    assert!(runs > 40, "{runs} runs: the apply should have made many writes");
}

#[test]
fn every_write_to_the_http_platform_failing_leaves_tenants_applied_or_rolled_back() {
    const TOKEN: &str = "tok-faults-sweep";
    let p = Platform::start(TOKEN);
    let repo = example_repo();
    let toml = format!(
        "format = 1\n[providers.management]\nkind = \"http\"\nurl = \"{}\"\ntoken_env = \"FAULTS_TOKEN\"\n\
         [providers.isp]\nkind = \"http\"\nurl = \"{}\"\ntoken_env = \"FAULTS_TOKEN\"\n\
         [providers.kubernetes]\nkind = \"local\"\n[providers.secrets]\nkind = \"local\"\ndev_placeholders = true\n",
        p.management_url(),
        p.isp_url()
    );
    std::fs::write(repo.path().join("dotmac.toml"), toml).unwrap();
    let env = vec![("FAULTS_TOKEN".to_owned(), TOKEN.to_owned())];
    let s = Scenario::new("http", repo, env, true, || {
        let snap = p.snapshot();
        let p = &p;
        Box::new(move || p.restore(&snap))
    });
    s.sweep_all(
        &[("management", "put"), ("management", "delete"), ("isp", "put"), ("isp", "delete")],
        &["fail", "lost"],
    );
}

/// The example repository with the ISP and Kubernetes slots on `fake`.
fn kube_scenario(fake: &Fake) -> Scenario<'_> {
    let repo = example_repo();
    let kc = fake.kubeconfig(repo.path());
    let toml = format!(
        "format = 1\n[providers.management]\nkind = \"local\"\n\
         [providers.isp]\nkind = \"kubernetes\"\nkubeconfig = \"{kc}\"\n\
         [providers.kubernetes]\nkind = \"kubernetes\"\nkubeconfig = \"{kc}\"\nrollout_timeout = \"30s\"\n\
         [providers.secrets]\nkind = \"local\"\ndev_placeholders = true\n",
        kc = kc.display()
    );
    std::fs::write(repo.path().join("dotmac.toml"), toml).unwrap();
    Scenario::new("kubernetes", repo, Vec::new(), true, || {
        let snap = fake.snapshot();
        Box::new(move || fake.restore(&snap))
    })
}

#[test]
fn every_write_to_the_kubernetes_api_failing_leaves_tenants_applied_or_rolled_back() {
    let fake = Fake::start();
    let s = kube_scenario(&fake);
    s.sweep_all(
        &[("isp", "put"), ("isp", "delete"), ("kubernetes", "put"), ("kubernetes", "delete")],
        &["fail", "lost"],
    );
}

#[test]
fn regression_a_namespace_delete_that_fails_after_it_was_done_loses_no_isp_configuration() {
    // The Namespace was deleted before the ISP configuration inside it (a ConfigMap there,
    // taken along by the namespace's deletion): when that delete failed after the server
    // did it, the rollback could not bring the configuration back. Namespaces go last now.
    let fake = Fake::start();
    let s = kube_scenario(&fake);
    let namespace_deletes = s.before["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["action"] == "delete" && c["provider"] == "kubernetes")
        .count();
    assert!(s.run_once(&format!("kubernetes:delete:{namespace_deletes}:lost")));
}

#[test]
fn secret_writes_to_openbao_failing_leave_tenants_applied_or_rolled_back() {
    // OpenBao has no snapshot: each run gets a server of its own, so only a few k: the first
    // and second secret created (tenant-123's, northwind-isp's), and the deletes.
    for faults in ["secrets:put:1:fail", "secrets:put:2:lost", "secrets:delete:1:fail", "secrets:delete:3:lost"] {
        let Some(bao) = Bao::start("faults: openbao") else { return };
        let repo = example_repo();
        std::fs::write(repo.path().join("dotmac.toml"), format!("format = 1\n{}", bao.settings_toml())).unwrap();
        for (t, n) in crate::bao::EXAMPLE_EXTERNALS {
            bao.kv_put(&format!("dotmac/tenants/{t}/{n}"), "external-value");
        }
        let env = vec![(BAO_TOKEN_ENV.to_owned(), bao.token.clone())];
        let s = Scenario::new("openbao", repo, env, false, || Box::new(|| {}));
        assert!(s.run_once(faults), "{faults} hit no call");
    }
}
