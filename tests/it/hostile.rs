//! Hostile input, property-based (proptest): loading arbitrary bytes and arbitrary YAML,
//! validating arbitrary documents, rendering arbitrary values, and applying arbitrary or
//! mutated plan files. None of it may panic or hang; a repository value is never evaluated
//! as a template (the rendered output holds it as written); a plan file is either applied
//! exactly as the repository says, or refused with nothing changed.
//!
//! Each case runs under a watchdog (`bounded`): one that does not finish in time fails the
//! test. The seed is fixed so that CI repeats; `PROPTEST_RNG_SEED` picks another, and
//! `PROPTEST_CASES` raises the number of cases (proptest reads both).

use crate::util::*;
use dotmac_gitops::load::source::RawFile;
use dotmac_gitops::load::{self, Origin, yaml};
use dotmac_gitops::model::{Content, ResourceKind};
use dotmac_gitops::render::Renderer;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

/// How long one in-process case may take before it counts as a hang (generous: debug
/// builds on a loaded machine; a real hang never finishes).
const CASE_LIMIT: Duration = Duration::from_secs(30);

fn config(cases: u32) -> Config {
    let mut c = Config::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(cases));
    c.failure_persistence = None;
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        c.rng_seed = RngSeed::Fixed(0xD07_3AC);
    }
    c
}

/// Runs `f` on another thread and fails if it does not finish within `CASE_LIMIT`. A
/// panic inside is a failure too (and is reported as such).
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(CASE_LIMIT) {
        Ok(Ok(v)) => v,
        Ok(Err(_)) => panic!("{what}: panicked"),
        Err(_) => panic!("{what}: did not finish within {CASE_LIMIT:?}"),
    }
}

/// The base fixture's files, in memory.
fn base_files() -> Vec<RawFile> {
    fn walk(dir: &Path, rel: &str, out: &mut Vec<RawFile>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let rel = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), &rel, out);
            } else {
                out.push(RawFile::new(rel, std::fs::read_to_string(e.path()).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(&fixtures().join("_base"), "", &mut out);
    out
}

/// The base fixture with some files replaced or added, parsed.
fn loaded_with(files: Vec<(String, String)>) -> load::Loaded {
    let mut raw = base_files();
    for (path, text) in files {
        raw.retain(|f| f.path != path);
        raw.push(RawFile::new(path, text));
    }
    load::parse_files(Path::new("/repo"), Origin::WorkTree, raw, Vec::new(), &load::parse_all)
}

fn now() -> jiff::Timestamp {
    NOW.parse().unwrap()
}

/// The base tenant as a JSON value (JSON is YAML: any string embeds safely).
fn base_tenant() -> Value {
    let text = std::fs::read_to_string(fixtures().join("_base/tenants/t1/tenant.yaml")).unwrap();
    yaml::parse_documents(&text).unwrap().remove(0).value
}

// ------------------------------------------------------------------------------------------
// Strategies

/// Pieces of YAML syntax, for text that is YAML-like and often almost valid.
fn yaml_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("key: value".to_owned()),
        Just("- item".to_owned()),
        Just("a: &a [x, y, z]".to_owned()),
        Just("b: [*a, *a, *a, *a]".to_owned()),
        Just("<<: *a".to_owned()),
        Just("c: !!binary aGVsbG8=".to_owned()),
        Just("d: !custom {x: 1}".to_owned()),
        Just("e: |\n  block\n  text".to_owned()),
        Just("f: >-\n  folded".to_owned()),
        Just("g: \"esc\\u00e9\\x41\\n\"".to_owned()),
        Just("h: 'single ''quoted'''".to_owned()),
        Just("---".to_owned()),
        Just("...".to_owned()),
        Just("%YAML 1.2".to_owned()),
        Just("%TAG !e! tag:example.com,2000:".to_owned()),
        Just("? complex\n: key".to_owned()),
        Just("{a: [b, {c: d}]}".to_owned()),
        Just("[[[[[[[[[[".to_owned()),
        Just("]]]}}}".to_owned()),
        Just("kind: Tenant".to_owned()),
        Just("id: t1".to_owned()),
        Just("key: key".to_owned()),
        Just("yes: no".to_owned()),
        Just("1e400: -.inf".to_owned()),
        Just("0x1F: 0o17".to_owned()),
        Just("2026-11-22T00:00:00Z: ~".to_owned()),
        Just("# comment".to_owned()),
        Just("\t tab".to_owned()),
        Just("\u{feff}bom: x".to_owned()),
        "[a-z]{1,6}: [a-zA-Z0-9 ]{0,10}",
        ".{0,12}",
    ]
}

fn yaml_text() -> impl Strategy<Value = String> {
    prop::collection::vec((0usize..6, yaml_piece()), 0..40)
        .prop_map(|lines| lines.into_iter().map(|(indent, l)| format!("{}{l}\n", " ".repeat(indent))).collect())
}

/// Billion laughs, of random width and depth.
fn yaml_bomb() -> impl Strategy<Value = String> {
    (2usize..12, 2usize..14).prop_map(|(width, depth)| {
        let mut s = "l0: &l0 [\"lol\"]\n".to_owned();
        for d in 1..depth {
            let refs = vec![format!("*l{}", d - 1); width].join(", ");
            s.push_str(&format!("l{d}: &l{d} [{refs}]\n"));
        }
        s
    })
}

/// Any JSON value, nested a little.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,20}".prop_map(Value::from),
        hostile_string().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Strings that template engines, shells and YAML care about.
fn hostile_string() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("{{".to_owned()),
            Just("}}".to_owned()),
            Just("{%".to_owned()),
            Just("%}".to_owned()),
            Just("{#".to_owned()),
            Just("#}".to_owned()),
            Just(" 7*7 ".to_owned()),
            Just("lipsum".to_owned()),
            Just("range(999999999)".to_owned()),
            Just("self.__init__.__globals__".to_owned()),
            Just("cycler.__init__".to_owned()),
            Just("config".to_owned()),
            Just("raw".to_owned()),
            Just("endraw".to_owned()),
            Just("include '/etc/passwd'".to_owned()),
            Just("${SECRET:".to_owned()),
            Just("$(id)".to_owned()),
            Just("`id`".to_owned()),
            Just("'".to_owned()),
            Just("\"".to_owned()),
            Just("\\".to_owned()),
            Just("\n".to_owned()),
            Just("\t".to_owned()),
            Just(": ".to_owned()),
            Just("- ".to_owned()),
            Just("&a *a".to_owned()),
            Just("../".to_owned()),
            "[a-zA-Z0-9 ]{0,8}",
            any::<char>().prop_map(String::from),
        ],
        1..12,
    )
    .prop_map(|parts| parts.concat())
}

// ------------------------------------------------------------------------------------------
// Loading

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_bytes_never_panic_the_yaml_reader(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        bounded("yaml::parse_documents on arbitrary bytes", move || {
            let _ = yaml::parse_documents(&text);
        });
    }

    #[test]
    fn arbitrary_yaml_never_panics_and_errors_carry_a_position(text in yaml_text()) {
        let t = text.clone();
        let r = bounded("yaml::parse_documents on YAML-like text", move || yaml::parse_documents(&t));
        if let Err(e) = r {
            prop_assert!(e.line >= 1 && e.line <= text.lines().count() + 2, "line {} of:\n{text}", e.line);
        }
    }
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn yaml_bombs_are_refused_or_read_within_the_alias_budget(text in yaml_bomb()) {
        let t = text.clone();
        let r = bounded("a YAML bomb", move || yaml::parse_documents(&t).map(|d| d.len()));
        if let Err(e) = &r {
            prop_assert!(e.message.contains("alias"), "{}", e.message);
        }
    }

    /// The whole load from disk: arbitrary bytes (invalid UTF-8 included) in a tenant file.
    #[test]
    fn arbitrary_bytes_in_a_repository_file_load_and_validate_without_panicking(
        bytes in prop::collection::vec(any::<u8>(), 0..2048)
    ) {
        let repo = fixture_repo("_base");
        std::fs::write(repo.path().join("tenants/t1/extra.yaml"), &bytes).unwrap();
        let root = repo.path().to_owned();
        let problems = bounded("load and validate", move || {
            let loaded = load::load(&root, None, &load::source::Scope::All).unwrap();
            let (_, diags) = dotmac_gitops::validate::validate(&loaded, now());
            diags.into_iter().chain(loaded.diagnostics).filter(|d| d.is_error()).collect::<Vec<_>>()
        });
        if std::str::from_utf8(&bytes).is_err() {
            prop_assert!(problems.iter().any(|d| d.message.contains("is not valid UTF-8")));
        }
        for d in &problems {
            prop_assert!(d.file.is_some(), "a problem without a file: {}", d.message);
        }
    }
}

// ------------------------------------------------------------------------------------------
// Validation and rendering

proptest! {
    #![proptest_config(config(96))]

    /// A tenant document with arbitrary values in known and unknown fields: validation
    /// reports problems (with a file) or accepts it, and what it accepts renders.
    #[test]
    fn arbitrary_tenant_documents_validate_and_render_without_panicking(
        fields in prop::collection::vec(
            (prop_oneof![
                Just("name"), Just("plan"), Just("environment"), Just("resource_tier"), Just("domain"),
                Just("features"), Just("billing"), Just("database"), Just("integrations"), Just("values"),
                Just("coordination"), Just("labels"), Just("status"), Just("webhooks"), Just("id"), Just("bogus"),
            ], json_value()),
            0..5,
        )
    ) {
        let mut doc = base_tenant();
        for (k, v) in fields {
            doc[k] = v;
        }
        let text = serde_json::to_string(&doc).unwrap();
        bounded("validate and render a tenant", move || {
            let loaded = loaded_with(vec![("tenants/t1/tenant.yaml".into(), text)]);
            let (desired, diags) = dotmac_gitops::validate::validate(&loaded, now());
            for d in &diags {
                assert!(d.file.is_some() || d.tenant.is_some(), "a problem with no place: {}", d.message);
            }
            let (_, render_diags) = Renderer::new(&desired).render_all(&desired, None);
            for d in &render_diags {
                assert!(!d.message.is_empty());
            }
        });
    }

    /// A value in the repository is data: whatever template syntax it holds, the rendered
    /// output holds it as written, and the management record holds it exactly.
    #[test]
    fn repository_values_are_never_evaluated_as_templates(name in hostile_string(), level in hostile_string()) {
        let mut doc = base_tenant();
        doc["name"] = Value::from(name.clone());
        let env = json!({"kind": "Environment", "name": "production", "values": {"log_level": level}});
        let files = vec![
            ("tenants/t1/tenant.yaml".into(), serde_json::to_string(&doc).unwrap()),
            ("environments/production.yaml".into(), serde_json::to_string(&env).unwrap()),
        ];
        let (name2, level2) = (name.clone(), level.clone());
        let outcome = bounded("render hostile values", move || {
            let loaded = loaded_with(files);
            let (desired, diags) = dotmac_gitops::validate::validate(&loaded, now());
            if diags.iter().any(|d| d.is_error()) {
                return None; // refused by validation (e.g. a control character): also fine
            }
            let (rendered, render_diags) = Renderer::new(&desired).render_all(&desired, None);
            // A value can break the YAML a template prints it into (a quote inside a quoted
            // scalar): that is refused with a clear error, never evaluated.
            for d in &render_diags {
                assert!(d.message.contains("did not render valid manifests"), "{}", d.message);
            }
            rendered.into_values().next()
        });
        let Some(resources) = outcome else { return Ok(()) };
        let isp = resources.iter().find(|r| r.address.kind == ResourceKind::IspConfig).unwrap();
        let Content::Text(text) = &*isp.content else { panic!("isp.config is text") };
        prop_assert!(text.contains(&name2), "the name was not printed as written:\n{name2:?}\n{text}");
        prop_assert!(text.contains(&format!("level: {level2}")), "the log level was not printed as written:\n{level2:?}\n{text}");
        let record = resources.iter().find(|r| r.address.kind == ResourceKind::ManagementTenant).unwrap();
        let Content::Json(record) = &*record.content else { panic!("the record is JSON") };
        prop_assert_eq!(&record["name"], &Value::from(name2));
    }
}

// ------------------------------------------------------------------------------------------
// Plan files

/// A repository applied, then changed, with a plan saved for the change; `.dotmac` kept to
/// go back to before each case.
struct PlanFixture {
    repo: tempfile::TempDir,
    saved: tempfile::TempDir,
    plan: Value,
    /// The plan's changes as the repository wants them.
    wanted: Value,
}

impl PlanFixture {
    fn new() -> PlanFixture {
        let repo = example_repo();
        let r = repo.path();
        assert_eq!(run(&["apply", "--auto-approve", "--now", NOW], r).code, 0);
        edit_file(&r.join("tenants/tenant-123/tenant.yaml"), "name: Demo ISP", "name: Demo ISP Renamed");
        edit_file(&r.join("tenants/pampas-telecom/tenant.yaml"), "plan: basic", "plan: premium");
        let file = r.join("saved.plan");
        assert_eq!(run(&["plan", "--out", file.to_str().unwrap(), "--now", NOW], r).code, 0);
        let plan: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        std::fs::remove_file(&file).unwrap();
        let saved = tempfile::tempdir().unwrap();
        copy_tree(&r.join(".dotmac"), saved.path());
        let wanted = changes_of(r);
        PlanFixture { repo, saved, plan, wanted }
    }

    /// Applies `bytes` as a plan file from the saved moment; returns the exit code and the
    /// re-plan's changes afterwards.
    fn apply(&self, bytes: &[u8]) -> (Output, Value) {
        let r = self.repo.path();
        std::fs::remove_dir_all(r.join(".dotmac")).unwrap();
        copy_tree(self.saved.path(), &r.join(".dotmac"));
        let file = r.join("case.plan");
        std::fs::write(&file, bytes).unwrap();
        let out = run(&["apply", file.to_str().unwrap()], r);
        std::fs::remove_file(&file).unwrap();
        (out, changes_of(r))
    }
}

/// (address, action) of every change a plan of the repository shows now.
fn changes_of(repo: &Path) -> Value {
    let out = run(&["plan", "--format", "json", "--now", NOW], repo);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let plan: Value = serde_json::from_str(&out.stdout).unwrap();
    plan["changes"].as_array().unwrap().iter().map(|c| json!([c["address"], c["action"], c["drift"]])).collect()
}

/// Every JSON pointer to a value inside `v`.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            m.iter().for_each(|(k, x)| pointers(x, format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")), out))
        }
        Value::Array(a) => a.iter().enumerate().for_each(|(i, x)| pointers(x, format!("{at}/{i}"), out)),
        _ => {}
    }
}

/// The changes of one tenant in a `changes_of` list.
fn of_tenant(changes: &Value, tenant: &str) -> Vec<Value> {
    changes
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c[0].as_str().unwrap().starts_with(&format!("{tenant}/")))
        .cloned()
        .collect()
}

/// Per tenant, exactly what the repository says was applied (nothing left to do), or
/// nothing at all (what was to do is still to do); exit 0 only when every tenant applied.
fn check_plan_outcome(what: &str, out: &Output, after: &Value, fx: &PlanFixture) -> Result<(), TestCaseError> {
    prop_assert!(!out.stderr.contains("panicked"), "{what}: panicked:\n{}", out.stderr);
    prop_assert!(out.code == 0 || out.code == 1, "{what}: exit {}:\n{}", out.code, out.stderr);
    for tenant in ["tenant-123", "pampas-telecom", "northwind-isp", "bluesky-net", "coastal-wireless"] {
        let (left, wanted) = (of_tenant(after, tenant), of_tenant(&fx.wanted, tenant));
        prop_assert!(
            left.is_empty() || left == wanted,
            "{what}: {tenant} is neither applied as the repository says nor untouched: {left:?}\n{}",
            out.stderr
        );
        if out.code == 0 {
            prop_assert!(left.is_empty(), "{what}: exit 0 with {tenant} not applied");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(24))]

    #[test]
    fn arbitrary_plan_files_are_refused_cleanly(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..512),
            json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        ]
    ) {
        let fx = PLAN.with(|f| f.clone());
        let (out, after) = fx.apply(&bytes);
        prop_assert_eq!(out.code, 1, "an arbitrary plan file was applied:\n{}", out.stdout);
        check_plan_outcome("an arbitrary plan file", &out, &after, &fx)?;
    }

    #[test]
    fn mutated_plan_files_apply_exactly_what_the_repository_says_or_nothing(
        pick in any::<prop::sample::Index>(),
        value in json_value(),
        delete in any::<bool>(),
    ) {
        let fx = PLAN.with(|f| f.clone());
        let mut plan = fx.plan.clone();
        let mut all = Vec::new();
        pointers(&plan, String::new(), &mut all);
        let at = pick.get(&all[1..]).clone();
        let (parent, key) = at.rsplit_once('/').unwrap();
        match plan.pointer_mut(parent).unwrap() {
            Value::Object(m) if delete => { m.remove(&key.replace("~1", "/").replace("~0", "~")); }
            Value::Array(a) if delete => { a.remove(key.parse::<usize>().unwrap()); }
            _ => *plan.pointer_mut(&at).unwrap() = value,
        }
        let (out, after) = fx.apply(&serde_json::to_vec(&plan).unwrap());
        check_plan_outcome(&format!("the plan with {at} {}", if delete { "removed" } else { "replaced" }), &out, &after, &fx)?;
    }
}

thread_local! {
    /// One fixture per test thread (proptest runs the cases of a test on one thread).
    static PLAN: std::rc::Rc<PlanFixture> = std::rc::Rc::new(PlanFixture::new());
}

#[test]
fn the_unmutated_plan_file_applies() {
    let fx = PlanFixture::new();
    let (out, after) = fx.apply(&serde_json::to_vec(&fx.plan).unwrap());
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert_eq!(after, json!([]));
}
