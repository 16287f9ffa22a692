//! Jinja2 parity: for a repository from the shared generator, every tenant's rendered
//! `isp.config` equals, byte for byte, what the seeds' Python/Jinja2 peer writes.
//! Needs python3 with jinja2 and pyyaml (`.ci/run` installs them).

use crate::util::*;
use std::process::Command;

fn python_has_jinja2() -> bool {
    Command::new("python3").args(["-c", "import jinja2, yaml"]).status().map(|s| s.success()).unwrap_or(false)
}

#[test]
fn isp_config_renders_equal_jinja2_byte_for_byte() {
    if !python_has_jinja2() {
        skip_unless_required("the Jinja2 parity test", "python3 with jinja2 and pyyaml", "scripts/test-deps.sh");
        return;
    }
    let bench = project().join("bench/peer");
    let repo = tempfile::tempdir().unwrap();
    let status = Command::new("python3")
        .arg(bench.join("gen_repo.py"))
        .args(["--tenants", "300", "--seed", "11", "--out"])
        .arg(repo.path())
        .status()
        .unwrap();
    assert!(status.success());
    let peer_out = tempfile::tempdir().unwrap();
    let live = tempfile::tempdir().unwrap();
    let status = Command::new("python3")
        .arg(bench.join("peer_plan.py"))
        .arg(repo.path())
        .arg("--live")
        .arg(live.path())
        .arg("--render-out")
        .arg(peer_out.path())
        .args(["--now", NOW])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let ours = tempfile::tempdir().unwrap();
    let out = run(
        &["render", "--repo", repo.path().to_str().unwrap(), "--now", NOW, "--out", ours.path().to_str().unwrap()],
        repo.path(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let mut compared = 0;
    for e in std::fs::read_dir(peer_out.path()).unwrap() {
        let e = e.unwrap();
        let tenant = e.file_name().into_string().unwrap().trim_end_matches(".yaml").to_owned();
        let theirs = std::fs::read(e.path()).unwrap();
        let mine = std::fs::read(ours.path().join(&tenant).join("isp.config.yaml")).unwrap();
        assert!(
            theirs == mine,
            "{tenant}: render differs from Jinja2\n--- jinja2\n{}\n--- ours\n{}",
            String::from_utf8_lossy(&theirs),
            String::from_utf8_lossy(&mine)
        );
        compared += 1;
    }
    assert_eq!(compared, 300);
}
