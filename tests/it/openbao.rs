//! `[providers.secrets] kind = "openbao"` against a real OpenBao (`bao server -dev`, see
//! `bao.rs`): plan/apply/re-plan on generated repositories, the layout, drift, rotation,
//! check-and-set, deletion, failures, and that no value or token ever leaks.

use crate::bao::{Bao, TOKEN_ENV};
use crate::util::*;
use dotmac_gitops::load::settings::ProviderSettings;
use dotmac_gitops::model::{Address, Charset, Content, Resource, SecretSource, SecretSpec};
use dotmac_gitops::providers::openbao::OpenBao;
use dotmac_gitops::providers::secret_value::SecretValue;
use dotmac_gitops::providers::{Expect, Provider, ProviderError};
use serde_json::Value;
use std::path::Path;

/// Starts a server, or skips the test (loudly; failing under DOTMAC_REQUIRE_ALL).
macro_rules! bao_or_skip {
    ($name:expr) => {
        match Bao::start($name) {
            Some(b) => b,
            None => return,
        }
    };
}

fn dm(bao: &Bao, repo: &Path, args: &[&str]) -> Output {
    run_env(args, repo, &[(TOKEN_ENV, bao.token.as_str())])
}

fn dm_env(bao: &Bao, repo: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut all = vec![(TOKEN_ENV, bao.token.as_str())];
    all.extend_from_slice(env);
    run_env(args, repo, &all)
}

fn json_of(o: &Output) -> Value {
    serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}\n{}", o.stdout, o.stderr))
}

/// A generated repository whose secrets provider is this OpenBao (no dev placeholders).
fn openbao_repo(bao: &Bao, tenants: usize, seed: u64) -> tempfile::TempDir {
    let repo = generated_repo(tenants, seed);
    let toml = repo.path().join("dotmac.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    let local = "[providers.secrets]\nkind = \"local\"\ndev_placeholders = true\n";
    assert!(text.contains(local), "{text}");
    std::fs::write(&toml, text.replace(local, &bao.settings_toml())).unwrap();
    repo
}

/// The `bao kv put …` a plan's missing-secret message asks for.
fn hinted_command(message: &str) -> Vec<String> {
    let start = message.find("bao kv put").unwrap_or_else(|| panic!("no bao command in: {message}"));
    let rest = &message[start..];
    let end = rest.find(" (the value is read from stdin)").unwrap_or(rest.len());
    rest[..end].split_whitespace().skip(1).map(str::to_owned).collect()
}

/// Puts every missing external secret the plan reports, by running the exact command the
/// plan's message gives, with a value made from `prefix`. Returns (address, value).
fn put_missing_externals(bao: &Bao, repo: &Path, prefix: &str) -> Vec<(String, String)> {
    let out = dm(bao, repo, &["plan", "--format", "json", "--now", NOW]);
    assert_eq!(out.code, 1, "a missing external secret fails the plan:\n{}\n{}", out.stdout, out.stderr);
    let plan = json_of(&out);
    let mut put = Vec::new();
    for v in plan["violations"].as_array().unwrap() {
        if v["rule"] != "external-secret-missing" {
            continue;
        }
        let address = v["address"].as_str().unwrap().to_owned();
        let cmd = hinted_command(v["message"].as_str().unwrap());
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let value = format!("{prefix}-{}-PLANTED", put.len());
        let o = bao.run(&args, Some(&value));
        assert!(o.ok, "the hinted command failed: bao {}: {}", args.join(" "), o.stderr);
        put.push((address, value));
    }
    assert!(!put.is_empty(), "the generated repository declares external secrets");
    put
}

/// The OpenBao path of a secret address.
fn path_of(address: &str) -> String {
    let a = Address::parse(address).unwrap();
    format!("dotmac/tenants/{}/{}", a.tenant, a.name.unwrap())
}

fn rendered(bao: &Bao, repo: &Path) -> Vec<Value> {
    json_of(&dm(bao, repo, &["render", "--format", "json", "--now", NOW]))["resources"].as_array().unwrap().clone()
}

fn change<'a>(plan: &'a Value, address: &str) -> &'a Value {
    plan["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["address"] == address)
        .unwrap_or_else(|| panic!("no change for {address} in {plan:#}"))
}

fn applied_repo(bao: &Bao, tenants: usize, seed: u64) -> (tempfile::TempDir, Vec<(String, String)>) {
    let repo = openbao_repo(bao, tenants, seed);
    let externals = put_missing_externals(bao, repo.path(), "ext");
    let out = dm(bao, repo.path(), &["apply", "--auto-approve", "--now", NOW]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    (repo, externals)
}

#[test]
fn a_generated_repository_plans_applies_and_replans_empty_against_openbao() {
    let bao = bao_or_skip!("openbao: generated repository");
    let repo = openbao_repo(&bao, 8, 5);
    let r = repo.path();

    // Missing external secrets fail the plan, naming tenant, secret and the exact command.
    let out = dm(&bao, r, &["plan", "--now", NOW]);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains(
            "tenant tenant-000000: external secret `stripe/secret_key` is missing. Create it: bao kv put -mount=secret dotmac/tenants/tenant-000000/stripe/secret_key value=-"
        ),
        "{}",
        out.stdout
    );
    // `secret put` is for the local store; it points at the same command.
    let out = dm(&bao, r, &["secret", "put", "--tenant", "tenant-000000", "--name", "stripe/secret_key"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("bao kv put -mount=secret dotmac/tenants/tenant-000000/stripe/secret_key value=-"),
        "{}",
        out.stderr
    );
    let externals = put_missing_externals(&bao, r, "ext");

    let out = dm(&bao, r, &["plan", "--detailed-exitcode", "--now", NOW]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    let out = dm(&bao, r, &["apply", "--auto-approve", "--now", NOW]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("on 8 tenants"), "{}", out.stdout);
    for _ in 0..2 {
        let out = dm(&bao, r, &["plan", "--detailed-exitcode", "--now", NOW]);
        assert_eq!(out.code, 0, "a re-plan after apply is empty:\n{}{}", out.stdout, out.stderr);
        assert!(out.stdout.contains("No changes."), "{}", out.stdout);
    }
    assert_eq!(dm(&bao, r, &["drift", "--detailed-exitcode"]).code, 0);
    // What this engine did not write is left alone: a policy named like a tenant's, a
    // secret in an unknown tenant's folder.
    bao.policy_write("tenant-000000-by-hand", "path \"secret/data/x\" {\n  capabilities = [\"read\"]\n}");
    bao.kv_put("dotmac/tenants/stranger/api_key", "not-ours");
    let out = dm(&bao, r, &["plan", "--detailed-exitcode", "--now", NOW]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let out = dm(&bao, r, &["apply", "--auto-approve", "--allow-delete", "--now", NOW]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(bao.policy("tenant-000000-by-hand").is_some());
    assert_eq!(bao.kv_value("dotmac/tenants/stranger/api_key"), "not-ours");

    // Everything is where the layout says.
    let resources = rendered(&bao, r);
    let mut policies = 0;
    let mut generated = 0;
    for res in &resources {
        let address = res["address"].as_str().unwrap();
        if address.contains("/openbao.policy[") {
            let name = Address::parse(address).unwrap().name.unwrap();
            assert_eq!(bao.policy(&name).as_deref(), res["content"].as_str(), "policy {name} reads back as written");
            policies += 1;
        } else if address.contains("/openbao.secret[") && res["content"]["source"] == "generated" {
            let path = path_of(address);
            assert_eq!(bao.current_version(&path), 1, "{path}");
            let v = bao.kv_value(&path);
            assert_eq!(v.len() as u64, res["content"]["length"].as_u64().unwrap(), "{path}");
            assert!(v.chars().all(|c| c.is_ascii_alphanumeric()), "{path}");
            generated += 1;
        }
    }
    assert_eq!(policies, 16);
    assert_eq!(generated, 8);
    // External secrets were recorded, not rewritten.
    for (address, value) in &externals {
        assert_eq!(&bao.kv_value(&path_of(address)), value);
        assert_eq!(bao.current_version(&path_of(address)), 1);
    }
    let all = bao.policies();
    assert!(
        all.contains(&"tenant-000003-read-secrets".to_owned())
            && all.contains(&"tenant-000003-write-secrets".to_owned())
    );
}

#[test]
fn out_of_band_changes_are_drift_and_apply_heals_what_it_owns() {
    let bao = bao_or_skip!("openbao: drift");
    let (repo, externals) = applied_repo(&bao, 2, 7);
    let r = repo.path();
    let t = "tenant-000000";
    let db = format!("dotmac/tenants/{t}/database/password");
    let db_addr = format!("{t}/openbao.secret[database/password]");
    let policy = format!("{t}-read-secrets");
    let policy_addr = format!("{t}/openbao.policy[{policy}]");
    let policy_text = bao.policy(&policy).unwrap();
    let first_value = bao.kv_value(&db);

    // A generated secret soft-deleted, a policy edited and another deleted, by hand.
    bao.ok(&["kv", "delete", "-mount=secret", &db]);
    bao.policy_write(&policy, "path \"secret/data/*\" {\n  capabilities = [\"read\"]\n}\n");
    bao.ok(&["policy", "delete", &format!("{t}-write-secrets")]);
    let plan = json_of(&dm(&bao, r, &["plan", "--format", "json", "--now", NOW]));
    let c = change(&plan, &db_addr);
    assert_eq!((c["action"].as_str(), c["drift"].as_bool()), (Some("create"), Some(true)), "{c:#}");
    let c = change(&plan, &policy_addr);
    assert_eq!(
        (c["action"].as_str(), c["drift"].as_bool(), c["risk"].as_str()),
        (Some("update"), Some(true), Some("high")),
        "{c:#}"
    );
    assert!(c["diff"].as_str().unwrap().contains("+path \"secret/data/dotmac/tenants/tenant-000000/*\""), "{c:#}");
    let c = change(&plan, &format!("{t}/openbao.policy[{t}-write-secrets]"));
    assert_eq!((c["action"].as_str(), c["drift"].as_bool()), (Some("create"), Some(true)), "{c:#}");
    let out = dm(&bao, r, &["drift", "--detailed-exitcode"]);
    assert_eq!(out.code, 2, "{}", out.stdout);
    assert!(out.stdout.contains(&format!("{db_addr} deleted")), "{}", out.stdout);
    assert!(out.stdout.contains(&format!("{policy_addr} changed")), "{}", out.stdout);

    // Apply heals them: a new version for the secret (the deleted one kept), the policies back.
    let out = dm(&bao, r, &["apply", "--auto-approve", "--now", NOW]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(bao.current_version(&db), 2);
    assert_ne!(bao.kv_value(&db), first_value);
    let meta = bao.metadata(&db).unwrap();
    assert_ne!(meta["versions"]["1"]["deletion_time"], "", "the deleted version is kept, deleted");
    assert_eq!(bao.policy(&policy).unwrap(), policy_text);
    assert!(bao.policy(&format!("{t}-write-secrets")).is_some());
    assert_eq!(dm(&bao, r, &["plan", "--detailed-exitcode", "--now", NOW]).code, 0);

    // An external secret changed by a person: reported as drift, recorded, never overwritten.
    let (ext_addr, _) = externals.iter().find(|(a, _)| a.starts_with(t)).unwrap();
    let ext = path_of(ext_addr);
    bao.kv_put(&ext, "rotated-by-a-person-PLANTED");
    let plan = json_of(&dm(&bao, r, &["plan", "--format", "json", "--now", NOW]));
    let c = change(&plan, ext_addr);
    assert_eq!((c["action"].as_str(), c["drift"].as_bool()), (Some("noop"), Some(true)), "{c:#}");
    assert!(c["reason"].as_str().unwrap().contains("not overwritten"), "{c:#}");
    assert_eq!(dm(&bao, r, &["apply", "--auto-approve", "--now", NOW]).code, 0);
    assert_eq!(bao.kv_value(&ext), "rotated-by-a-person-PLANTED");
    assert_eq!(bao.current_version(&ext), 2);
    assert_eq!(dm(&bao, r, &["plan", "--detailed-exitcode", "--now", NOW]).code, 0);

    // An external secret removed entirely fails the plan with its name.
    bao.ok(&["kv", "metadata", "delete", "-mount=secret", &ext]);
    let out = dm(&bao, r, &["plan", "--now", NOW]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    let name = Address::parse(ext_addr).unwrap().name.unwrap();
    assert!(out.stdout.contains(&format!("external secret `{name}` was deleted out of band")), "{}", out.stdout);
    assert!(out.stdout.contains(&format!("bao kv put -mount=secret {ext} value=-")), "{}", out.stdout);
}

#[test]
fn rotation_writes_new_versions() {
    let bao = bao_or_skip!("openbao: rotation");
    let (repo, _) = applied_repo(&bao, 2, 9);
    let r = repo.path();
    let db = "dotmac/tenants/tenant-000001/database/password";
    let v1 = bao.kv_value(db);
    // Months on, generated secrets are past their interval: rotate, high risk; external
    // ones are compliance warnings.
    let later = "2027-06-01T00:00:00Z";
    let plan = json_of(&dm(&bao, r, &["plan", "--format", "json", "--now", later]));
    let rotations: Vec<&Value> =
        plan["changes"].as_array().unwrap().iter().filter(|c| c["action"] == "rotate").collect();
    assert_eq!(rotations.len(), 2, "{plan:#}");
    assert!(rotations.iter().all(|c| c["risk"] == "high"));
    assert!(plan["violations"].as_array().unwrap().iter().any(|v| v["rule"] == "external-secret-age"), "{plan:#}");
    let out = dm(&bao, r, &["apply", "--auto-approve", "--now", later]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(bao.current_version(db), 2);
    let v2 = bao.kv_value(db);
    assert_ne!(v1, v2);
    assert_eq!(dm(&bao, r, &["plan", "--detailed-exitcode", "--now", NOW]).code, 0);

    // Emergency rotation: a new version now, critical in the audit log.
    let out = dm(&bao, r, &["rotate", "--tenant", "tenant-000001", "--emergency"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(bao.current_version(db), 3);
    assert_ne!(bao.kv_value(db), v2);
    let audit = json_of(&dm(&bao, r, &["audit", "--format", "json"]));
    let emergency = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "rotate" && e["risk"] == "critical" && e["outcome"] == "applied")
        .count();
    assert_eq!(emergency, 1);
    assert_eq!(dm(&bao, r, &["plan", "--detailed-exitcode", "--now", NOW]).code, 0, "the rotation is recorded");
}

fn provider_for(bao: &Bao, token_var: &str) -> OpenBao {
    // SAFETY: the variable's name is unique to the calling test.
    unsafe { std::env::set_var(token_var, &bao.token) };
    let settings: ProviderSettings = serde_json::from_value(serde_json::json!({
        "kind": "openbao", "address": bao.addr, "token_env": token_var, "timeout": "10s"
    }))
    .unwrap();
    OpenBao::open(&settings).unwrap()
}

#[test]
fn a_concurrent_writer_is_a_conflict_not_an_overwrite() {
    let bao = bao_or_skip!("openbao: check-and-set");
    let p = provider_for(&bao, "DOTMAC_TEST_BAO_TOKEN_CAS");
    let a = Address::parse("t1/openbao.secret[db/password]").unwrap();
    let r = Resource {
        fingerprint: None,
        address: a.clone(),
        content: Content::Secret(SecretSpec {
            name: "db/password".into(),
            source: SecretSource::Generated { length: 24, charset: Charset::Alphanumeric },
            rotation_days: None,
            auto_rotation: true,
        })
        .into(),
    };
    let path = "dotmac/tenants/t1/db/password";
    let mine = "mine-first-PLANTED-value";
    let live = p.put(&r, Some(&SecretValue::from_bytes(mine.into())), &Expect::Absent).unwrap();
    assert_eq!(live.fingerprint, "v1");
    // Someone else writes a version meanwhile.
    bao.kv_put(path, "theirs-PLANTED-value");
    let mut errors = Vec::new();
    for expect in [Expect::Fingerprint("v1".into()), Expect::Absent] {
        let e = p.put(&r, Some(&SecretValue::from_bytes(b"would-overwrite-PLANTED".to_vec())), &expect).unwrap_err();
        match &e {
            ProviderError::Conflict { found, .. } => assert_eq!(found, "v2"),
            other => panic!("not a conflict: {other}"),
        }
        errors.push(e.to_string());
    }
    assert!(errors[0].contains("expected v1, found v2"), "{}", errors[0]);
    assert_eq!(bao.kv_value(path), "theirs-PLANTED-value", "not overwritten");
    // With the right expectation the write goes through.
    let live = p
        .put(&r, Some(&SecretValue::from_bytes(b"third-PLANTED".to_vec())), &Expect::Fingerprint("v2".into()))
        .unwrap();
    assert_eq!(live.fingerprint, "v3");
    // A rollback restores an old version as a new one, inside OpenBao.
    let back = p.restore_secret(&a, 1).unwrap();
    assert_eq!(back.fingerprint, "v4");
    assert_eq!(bao.kv_value(path), mine);
    // Deletes check the expectation too; soft delete keeps the versions; destroy removes all.
    let e = p.delete(&a, &Expect::Fingerprint("v3".into()), false).unwrap_err();
    assert!(matches!(e, ProviderError::Conflict { .. }), "{e}");
    errors.push(e.to_string());
    p.delete(&a, &Expect::Fingerprint("v4".into()), false).unwrap();
    let now = p.fetch(std::slice::from_ref(&a)).unwrap();
    assert_eq!(now[0].fingerprint, "v4-deleted");
    assert_eq!(bao.current_version(path), 4);
    p.delete(&a, &Expect::Fingerprint("v4-deleted".into()), true).unwrap();
    assert!(p.fetch(std::slice::from_ref(&a)).unwrap().is_empty());
    assert!(bao.metadata(path).is_none());
    // Policies: read, compared, then written with OpenBao's check-and-set.
    let pa = Address::parse("t1/openbao.policy[t1-read-secrets]").unwrap();
    let text =
        |t: &str| Resource { fingerprint: None, address: pa.clone(), content: Content::Text(t.to_owned()).into() };
    let first = p.put(&text("path \"a\" {\n  capabilities = [\"read\"]\n}"), None, &Expect::Absent).unwrap();
    assert_eq!(bao.policy("t1-read-secrets").as_deref(), Some("path \"a\" {\n  capabilities = [\"read\"]\n}"));
    bao.policy_write("t1-read-secrets", "path \"b\" {\n  capabilities = [\"read\"]\n}");
    for expect in [Expect::Fingerprint(first.fingerprint.clone()), Expect::Absent] {
        let e = p.put(&text("path \"c\" {}"), None, &expect).unwrap_err();
        assert!(matches!(e, ProviderError::Conflict { .. }), "{e}");
    }
    assert!(bao.policy("t1-read-secrets").unwrap().contains("\"b\""), "not overwritten");
    let e = p.delete(&pa, &Expect::Fingerprint(first.fingerprint), false).unwrap_err();
    assert!(matches!(e, ProviderError::Conflict { .. }), "{e}");
    // No message carries a value or the token.
    let debug = format!("{p:?}");
    for text in errors.iter().chain([&debug]) {
        for secret in [mine, "theirs-PLANTED-value", "would-overwrite-PLANTED", "third-PLANTED", bao.token.as_str()] {
            assert!(!text.contains(secret), "{text}");
        }
    }
}

#[test]
fn a_saved_plan_is_refused_when_a_secret_moved_since() {
    let bao = bao_or_skip!("openbao: stale plan");
    let (repo, _) = applied_repo(&bao, 1, 11);
    let r = repo.path();
    let plan_file = r.join("rotate.plan");
    let out = dm(&bao, r, &["plan", "--out", plan_file.to_str().unwrap(), "--now", "2027-06-01T00:00:00Z"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let db = "dotmac/tenants/tenant-000000/database/password";
    bao.kv_put(db, "written-meanwhile-PLANTED");
    let out = dm(&bao, r, &["apply", plan_file.to_str().unwrap()]);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("tenant-000000/openbao.secret[database/password] changed"), "{}", out.stderr);
    assert_eq!(bao.kv_value(db), "written-meanwhile-PLANTED");
}

#[test]
fn removed_tenants_soft_delete_secrets_unless_destroy_is_asked() {
    let bao = bao_or_skip!("openbao: deletion");
    let (repo, _) = applied_repo(&bao, 3, 13);
    let r = repo.path();
    std::fs::remove_dir_all(r.join("tenants/tenant-000001")).unwrap();
    let plan = json_of(&dm(&bao, r, &["plan", "--format", "json", "--now", NOW]));
    let deletes: Vec<&Value> = plan["changes"].as_array().unwrap().iter().filter(|c| c["action"] == "delete").collect();
    assert!(deletes.iter().all(|c| c["risk"] == "critical"));
    assert!(deletes.iter().any(|c| c["address"] == "tenant-000001/openbao.secret[database/password]"), "{plan:#}");
    let out = dm(&bao, r, &["apply", "--auto-approve", "--allow-delete", "--now", NOW]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let meta = bao.metadata("dotmac/tenants/tenant-000001/database/password").expect("soft delete keeps it");
    assert_ne!(meta["versions"]["1"]["deletion_time"], "", "{meta:#}");
    assert_eq!(meta["versions"]["1"]["destroyed"], false);
    assert!(bao.policy("tenant-000001-read-secrets").is_none());
    assert_eq!(dm(&bao, r, &["plan", "--detailed-exitcode", "--now", NOW]).code, 0);

    std::fs::remove_dir_all(r.join("tenants/tenant-000002")).unwrap();
    let out = dm(&bao, r, &["apply", "--auto-approve", "--allow-delete", "--destroy-secrets", "--now", NOW]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(bao.metadata("dotmac/tenants/tenant-000002/database/password").is_none(), "destroyed");
    assert!(bao.policy("tenant-000002-write-secrets").is_none());
    assert_eq!(dm(&bao, r, &["plan", "--detailed-exitcode", "--now", NOW]).code, 0);
    assert!(bao.metadata("dotmac/tenants/tenant-000000/database/password").is_some(), "other tenants untouched");
}

/// The policy an operator would give the engine's token.
const ENGINE_POLICY: &str = r#"path "secret/data/dotmac/tenants/*" { capabilities = ["create", "update", "read", "delete"] }
path "secret/metadata/dotmac/tenants/*" { capabilities = ["list", "read", "delete"] }
path "sys/policy" { capabilities = ["read", "list"] }
path "sys/policies/acl/*" { capabilities = ["create", "update", "read", "delete"] }
"#;

#[test]
fn failures_are_clear_and_only_transient_ones_are_retried() {
    let bao = bao_or_skip!("openbao: failures");
    let repo = openbao_repo(&bao, 2, 17);
    let r = repo.path();
    let toml = r.join("dotmac.toml");

    // The token's variable unset: named.
    let out = run_env(&["plan", "--now", NOW], r, &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains(&format!("token_env names ${TOKEN_ENV}, which is not set")), "{}", out.stderr);

    // A token whose policies do not reach the secrets: 403 at once, naming the variable,
    // the path and the token's policies; no retry.
    let weak = bao.token_create(&["-policy=default"]);
    let out = run_env(&["plan", "--now", NOW], r, &[(TOKEN_ENV, weak.as_str())]);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("403"), "{}", out.stderr);
    assert!(out.stderr.contains(&format!("${TOKEN_ENV}")), "{}", out.stderr);
    assert!(out.stderr.contains("secret/metadata/dotmac/tenants"), "{}", out.stderr);
    assert!(out.stderr.contains("its policies: default"), "{}", out.stderr);
    assert!(!out.stderr.contains("retrying"), "403 is not retried: {}", out.stderr);
    assert!(!out.stderr.contains(&weak), "the token is never printed");

    // A renewable token with the engine's policy works, and is renewed when used.
    bao.policy_write("dotmac-gitops", ENGINE_POLICY);
    let renewable = bao.token_create(&["-policy=dotmac-gitops", "-ttl=1h"]);
    let before = bao.run(&["token", "lookup", "-format=json", &renewable], None);
    let before: Value = serde_json::from_str(&before.stdout).unwrap();
    assert_eq!(before["data"]["renewable"], true);
    let out = run_env(&["plan", "--now", NOW], r, &[(TOKEN_ENV, renewable.as_str())]);
    assert_eq!(out.code, 1, "only the missing external secrets fail it:\n{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("is missing"), "{}", out.stdout);
    let after = bao.run(&["token", "lookup", "-format=json", &renewable], None);
    let after: Value = serde_json::from_str(&after.stdout).unwrap();
    assert!(after["data"]["last_renewal_time"].as_i64().unwrap_or(0) > 0, "renewed: {after:#}");
    assert!(!out.stderr.contains(&renewable));
    // The policy the README gives the engine is enough to apply, and to delete a tenant.
    put_missing_externals(&bao, r, "failures");
    let engine = [(TOKEN_ENV, renewable.as_str())];
    let out = run_env(&["apply", "--auto-approve", "--now", NOW], r, &engine);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    std::fs::remove_dir_all(r.join("tenants/tenant-000001")).unwrap();
    let out = run_env(&["apply", "--auto-approve", "--allow-delete", "--destroy-secrets", "--now", NOW], r, &engine);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(run_env(&["plan", "--detailed-exitcode", "--now", NOW], r, &engine).code, 0);
    assert!(bao.policy("tenant-000001-read-secrets").is_none());

    // Nothing listens: retried with backoff, then a clear error.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let original = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(&toml, original.replace(&bao.addr, &format!("http://127.0.0.1:{closed}"))).unwrap();
    let out = dm(&bao, r, &["plan", "--now", NOW]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains(&format!("cannot reach OpenBao at http://127.0.0.1:{closed}")), "{}", out.stderr);
    assert!(out.stderr.contains("gave up after 4 attempts") && out.stderr.contains("retrying"), "{}", out.stderr);
    std::fs::write(&toml, &original).unwrap();

    // A sealed server answers 503: retried, then reported as sealed.
    bao.ok(&["operator", "seal"]);
    let out = dm(&bao, r, &["plan", "--now", NOW]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("is sealed"), "{}", out.stderr);
    assert!(out.stderr.contains("retrying"), "{}", out.stderr);
    assert!(!out.stderr.contains(&bao.token));
}

#[test]
fn tls_with_a_private_ca_and_a_namespace() {
    let bao = match Bao::start_tls("openbao: tls and namespace") {
        Some(b) => b,
        None => return,
    };
    bao.ok(&["namespace", "create", "isp"]);
    bao.ok(&["secrets", "enable", "-namespace=isp", "-path=secret", "kv-v2"]);
    let repo = openbao_repo(&bao, 1, 23);
    let r = repo.path();
    let toml = r.join("dotmac.toml");
    let base = std::fs::read_to_string(&toml).unwrap();
    let ca = bao.ca.as_ref().unwrap().display().to_string();
    std::fs::write(&toml, base.replace("mount = \"secret\"\n", "mount = \"secret\"\nnamespace = \"isp\"\n")).unwrap();

    // Without the CA the certificate is refused: said at once, with the setting to use.
    let out = dm(&bao, r, &["plan", "--now", NOW]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("UnknownIssuer") && out.stderr.contains("set [providers.secrets] ca_cert"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("retrying"), "a certificate problem is not retried: {}", out.stderr);

    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(&toml, text.replace("namespace = ", &format!("ca_cert = \"{ca}\"\nnamespace = "))).unwrap();
    // The hint names the namespace; the tests run it as given.
    let externals = put_missing_externals(&bao, r, "tls");
    let ext = path_of(&externals[0].0);
    assert!(bao.run(&["kv", "get", "-mount=secret", &ext], None).stdout.is_empty(), "not in the root namespace");
    let out = dm(&bao, r, &["apply", "--auto-approve", "--now", NOW]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(dm(&bao, r, &["plan", "--detailed-exitcode", "--now", NOW]).code, 0);
    let o = bao.run(
        &["kv", "metadata", "get", "-namespace=isp", "-mount=secret", "dotmac/tenants/tenant-000000/database/password"],
        None,
    );
    assert!(o.ok, "{}", o.stderr);
    assert!(bao.run(&["policy", "read", "-namespace=isp", "tenant-000000-read-secrets"], None).ok);
    assert!(bao.policy("tenant-000000-read-secrets").is_none(), "policies live in the namespace");
}

/// Every byte the engine writes, searched for planted values: external secrets put with the
/// `bao` CLI, generated ones read back from OpenBao, and the token.
#[test]
fn planted_values_and_the_token_never_appear_in_anything_the_engine_writes() {
    let bao = bao_or_skip!("openbao: leaks");
    let (repo, externals) = applied_repo(&bao, 3, 19);
    let r = repo.path();
    let trace = [("DOTMAC_LOG", "trace")];
    let mut outputs: Vec<(String, String)> = Vec::new();
    let mut record = |what: &str, o: Output| outputs.push((what.to_owned(), format!("{}\n{}", o.stdout, o.stderr)));
    let mut planted: Vec<String> = externals.iter().map(|(_, v)| v.clone()).collect();
    let later = "2027-06-01T00:00:00Z";
    let plan_file = r.join("p.plan");
    let stale_file = r.join("stale.plan");
    for (what, args) in [
        ("plan text", vec!["plan", "--now", later, "-vvv"]),
        ("plan json", vec!["plan", "--format", "json", "--now", later]),
        ("plan markdown", vec!["plan", "--format", "markdown", "--now", later]),
        ("plan out", vec!["plan", "--out", plan_file.to_str().unwrap(), "--now", later]),
        ("plan out 2", vec!["plan", "--out", stale_file.to_str().unwrap(), "--now", later]),
        ("apply rotation", vec!["apply", plan_file.to_str().unwrap(), "-vvv"]),
        ("rotate", vec!["rotate", "--tenant", "tenant-000000", "--tenant", "tenant-000002", "--emergency", "-vvv"]),
        ("drift", vec!["drift", "--format", "json"]),
        ("audit", vec!["audit", "--format", "json"]),
        ("render", vec!["render", "--format", "json"]),
        ("stale apply", vec!["apply", stale_file.to_str().unwrap(), "-vvv"]),
    ] {
        record(what, dm_env(&bao, r, &args, &trace));
    }
    // Failures: a tenant whose management write fails after its secrets were rotated (they
    // are rolled back inside OpenBao, which reads the old values), a token refused.
    let tenant_yaml = r.join("tenants/tenant-000000/tenant.yaml");
    let text = std::fs::read_to_string(&tenant_yaml).unwrap();
    std::fs::write(&tenant_yaml, text.replacen("name: \"ISP 0 Networks\"", "name: \"ISP 0 Networks Two\"", 1)).unwrap();
    record(
        "failing apply",
        dm_env(
            &bao,
            r,
            &["apply", "--auto-approve", "--now", "2028-01-01T00:00:00Z", "-vvv"],
            &[("DOTMAC_LOG", "trace"), ("DOTMAC_FAULTS", "management:put:*")],
        ),
    );
    let weak = bao.token_create(&["-policy=default"]);
    record(
        "denied plan",
        run_env(&["plan", "--now", NOW, "-vvv"], r, &[(TOKEN_ENV, weak.as_str()), ("DOTMAC_LOG", "trace")]),
    );
    // Every value the generated secrets ever had: first ones, rotations, the rotations
    // rolled back, and the rollbacks' copies of the old values.
    for i in 0..3 {
        let path = format!("dotmac/tenants/tenant-00000{i}/database/password");
        for v in 1..=bao.current_version(&path) {
            let value = bao.ok(&["kv", "get", "-mount=secret", "-field=value", &format!("-version={v}"), &path]);
            planted.push(value.trim_end_matches('\n').to_owned());
        }
    }
    planted.sort();
    planted.dedup();
    planted.push(bao.token.clone());
    planted.push(weak);

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
    // The search was not empty-handed: there were values, trace logs, a state store and plans.
    // 3 tenants' first values, a rotation of each, an emergency rotation of two, a failed
    // rotation of the three (rolled back), externals, two tokens.
    assert!(planted.len() >= externals.len() + 3 + 3 + 2 + 3 + 2, "{}", planted.len());
    let apply_out = &outputs.iter().find(|(w, _)| w == "apply rotation").unwrap().1;
    assert!(apply_out.contains("TRACE") && apply_out.contains("OpenBao"), "no trace logs to search:\n{apply_out}");
    assert!(files.iter().any(|(p, _)| p.ends_with("state.db")));
    let failing = &outputs.iter().find(|(w, _)| w == "failing apply").unwrap().1;
    assert!(failing.contains("rolled back"), "{failing}");
    let denied = &outputs.iter().find(|(w, _)| w == "denied plan").unwrap().1;
    assert!(denied.contains("403"), "{denied}");
}

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
