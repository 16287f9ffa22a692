//! Concurrency: writers of one state never interleave. Applies started together either wait
//! for the state lock (`--lock-timeout`) or fail at once naming the holder; the proof is the
//! lock trace every process logs (`took the state lock` … `releasing the state lock`, with
//! times), whose hold intervals must be disjoint, and the audit log, where each apply's
//! entries must form one block of ids. `secret put` takes the same lock.
//!
//! The daemon is one more holder of the same lock: `daemon.rs` shows a person's apply refused
//! while the daemon applies, the daemon waiting for a person's lock, and a daemon killed with
//! SIGKILL mid-apply leaving the lock free and the next apply converging.

use crate::util::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

/// One process's hold of the lock, from its log: (taken, released), RFC 3339 times.
fn hold_interval(log: &str) -> Option<(jiff::Timestamp, jiff::Timestamp)> {
    let time = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .and_then(|l| l.split_whitespace().next()?.parse::<jiff::Timestamp>().ok())
    };
    Some((time("took the state lock")?, time("releasing the state lock")?))
}

fn spawn(repo: &Path, args: &[&str]) -> Child {
    command(args, repo, &[("DOTMAC_LOG", "dotmac_gitops::state=info")]).spawn().expect("the binary runs")
}

fn finish(child: Child) -> Output {
    let out = child.wait_with_output().unwrap();
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn applies_started_together_take_turns_and_never_interleave() {
    let repo = generated_repo(60, 21);
    let r = repo.path();
    // Three applies of disjoint thirds of the tenants, all started at once, all willing to wait.
    let out = run(&["plan", "--format", "json", "--now", NOW], r);
    let plan: Value = serde_json::from_str(&out.stdout).unwrap();
    let mut tenants: Vec<String> =
        plan["changes"].as_array().unwrap().iter().map(|c| c["tenant"].as_str().unwrap().to_owned()).collect();
    tenants.dedup();
    let thirds: Vec<Vec<String>> = tenants.chunks(tenants.len().div_ceil(3)).map(<[String]>::to_vec).collect();
    assert_eq!(thirds.len(), 3);
    let children: Vec<Child> = thirds
        .iter()
        .enumerate()
        .map(|(i, ts)| {
            let actor = format!("applier-{i}");
            let mut args = vec!["apply", "--auto-approve", "--now", NOW, "--lock-timeout", "120s", "--actor", &actor];
            for t in ts {
                args.extend(["--tenant", t.as_str()]);
            }
            spawn(r, &args)
        })
        .collect();
    let outs: Vec<Output> = children.into_iter().map(finish).collect();
    let mut holds = Vec::new();
    for (i, o) in outs.iter().enumerate() {
        assert_eq!(o.code, 0, "applier-{i}:\n{}\n{}", o.stdout, o.stderr);
        holds.push(
            hold_interval(&o.stderr).unwrap_or_else(|| panic!("applier-{i} logged no lock trace:\n{}", o.stderr)),
        );
    }
    holds.sort();
    for w in holds.windows(2) {
        assert!(w[0].1 <= w[1].0, "two applies held the state lock at once: {:?} and {:?}", w[0], w[1]);
    }
    // The audit log: each apply's entries are one block, and each apply had its own plan.
    let audit: Value = serde_json::from_str(&run(&["audit", "--format", "json"], r).stdout).unwrap();
    let entries = audit["entries"].as_array().unwrap();
    assert_eq!(entries.len(), plan["changes"].as_array().unwrap().len());
    let mut blocks: Vec<&str> = entries.iter().map(|e| e["actor"].as_str().unwrap()).collect();
    blocks.dedup();
    assert_eq!(blocks.len(), 3, "the audit entries of the three applies interleave: {blocks:?}");
    let plans: BTreeMap<&str, &str> =
        entries.iter().map(|e| (e["actor"].as_str().unwrap(), e["correlation_id"].as_str().unwrap())).collect();
    assert_eq!(plans.len(), 3);
    assert_eq!(run(&["plan", "--detailed-exitcode", "--now", NOW], r).code, 0);
}

#[test]
fn an_apply_that_cannot_wait_fails_at_once_naming_the_running_one() {
    let repo = generated_repo(80, 22);
    let r = repo.path();
    let lock = r.join(".dotmac/state/lock");
    let first = spawn(r, &["apply", "--auto-approve", "--now", NOW, "--actor", "first"]);
    let pid = first.id();
    // Wait until the first apply holds the lock (it writes its name into the lock file).
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&lock).unwrap_or_default().contains("apply by") {
        assert!(start.elapsed() < HANG, "the first apply never took the lock");
        std::thread::sleep(Duration::from_millis(5));
    }
    let second = run(&["apply", "--auto-approve", "--now", NOW, "--actor", "second"], r);
    let put = {
        use std::io::Write;
        let mut child = command(&["secret", "put", "--tenant", "tenant-000000", "--name", "stripe/secret_key"], r, &[])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().map(|mut s| s.write_all(b"sk_test_concurrent"));
        finish(child)
    };
    let first = finish(first);
    assert_eq!(first.code, 0, "{}\n{}", first.stdout, first.stderr);
    assert_eq!(second.code, 1, "the second apply ran while the first held the lock:\n{}", second.stdout);
    let named = "the state is locked: apply by";
    assert!(second.stderr.contains(named) && second.stderr.contains(&format!("(pid {pid})")), "{}", second.stderr);
    assert!(second.stderr.contains("--lock-timeout"), "{}", second.stderr);
    // `secret put` writes the same secrets files as apply: it is refused too.
    assert_eq!(put.code, 1, "secret put ran while an apply held the lock:\n{}", put.stdout);
    assert!(put.stderr.contains(named) && put.stderr.contains(&format!("(pid {pid})")), "{}", put.stderr);
    // Nothing was written by the refused ones: only the first apply is in the audit log.
    let audit: Value = serde_json::from_str(&run(&["audit", "--format", "json"], r).stdout).unwrap();
    assert!(audit["entries"].as_array().unwrap().iter().all(|e| e["actor"] == "first"));
    // The lock is free again: the second apply runs, with nothing left to do.
    let again = run(&["apply", "--auto-approve", "--now", NOW, "--actor", "second"], r);
    assert_eq!(again.code, 0, "{}", again.stderr);
}
