//! `pr-comment` against a local stand-in for GitHub's REST API: one sticky comment, created
//! once and updated after; GitHub's refusals turned into what to check, with exit code 1;
//! the token never printed.

use crate::fake_github::{FakeGithub, TOKEN};
use crate::util::*;
use std::path::Path;

const REPO: &str = "acme/desired-state";

fn post(gh: &FakeGithub, repo: &str, dir: &Path, body: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let file = dir.join("body.md");
    std::fs::write(&file, body).unwrap();
    let mut args = vec!["pr-comment", "--pr", "7", "--body-file", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut vars: Vec<(String, String)> = gh.env(repo).into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    vars.push(("DOTMAC_GITHUB_RETRY_MS".into(), "20".into()));
    for (k, v) in env {
        vars.retain(|(x, _)| x != k);
        vars.push(((*k).to_owned(), (*v).to_owned()));
    }
    let pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = run_env(&args, dir, &pairs);
    for s in [&out.stdout, &out.stderr] {
        assert!(!s.contains(TOKEN), "the token was printed: {s}");
    }
    out
}

#[test]
fn the_comment_is_created_once_and_updated_after() {
    let gh = FakeGithub::start();
    gh.seed(REPO, 7, 130); // two pages of other people's comments
    let dir = tempfile::tempdir().unwrap();

    let out = post(&gh, REPO, dir.path(), "## dotmac-gitops diff\n\nfirst\n", &[], &[]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.starts_with("created comment https://github.example/acme/desired-state/pull/7#issuecomment-131")
    );
    let comments = gh.comments(REPO, 7);
    assert_eq!(comments.len(), 131);
    assert_eq!(comments[130].body, "<!-- dotmac-gitops -->\n## dotmac-gitops diff\n\nfirst\n");
    let requests = gh.requests();
    assert_eq!(requests.len(), 3, "{requests:?}");
    assert!(requests[0].starts_with("GET /repos/acme/desired-state/issues/7/comments?per_page=100"));
    assert!(requests[1].contains("page=2"), "the next page is followed: {requests:?}");
    assert_eq!(requests[2], "POST /repos/acme/desired-state/issues/7/comments");

    // Again, with a new body: the same comment is updated (it is on the second page).
    let out = post(&gh, REPO, dir.path(), "## dotmac-gitops diff\n\nsecond\n", &[], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.starts_with("updated comment https://github.example/acme/desired-state/pull/7#issuecomment-131")
    );
    let comments = gh.comments(REPO, 7);
    assert_eq!(comments.len(), 131);
    assert_eq!(comments[130].body, "<!-- dotmac-gitops -->\n## dotmac-gitops diff\n\nsecond\n");
    assert_eq!(gh.requests().last().unwrap(), "PATCH /repos/acme/desired-state/issues/comments/131");

    // The same body again: nothing to send.
    let before = gh.requests().len();
    let out = post(&gh, REPO, dir.path(), "## dotmac-gitops diff\n\nsecond\n", &[], &[]);
    assert!(
        out.stdout.starts_with("comment https://") && out.stdout.contains("is already up to date"),
        "{}",
        out.stdout
    );
    assert!(gh.requests()[before..].iter().all(|r| r.starts_with("GET ")));

    // A body that already starts with the marker (as `diff --marker` writes it) is posted as
    // it is; another marker is another comment.
    let out = post(
        &gh,
        REPO,
        dir.path(),
        "<!-- dotmac-gitops:plan:. -->\n## plan\n",
        &["--marker", "dotmac-gitops:plan:."],
        &[],
    );
    assert!(out.stdout.starts_with("created comment"), "{}", out.stdout);
    let comments = gh.comments(REPO, 7);
    assert_eq!(comments.len(), 132);
    assert_eq!(comments[131].body, "<!-- dotmac-gitops:plan:. -->\n## plan\n");
    assert_eq!(comments[130].body, "<!-- dotmac-gitops -->\n## dotmac-gitops diff\n\nsecond\n", "untouched");
    // Someone quoting the comment does not take it over: the marker must come first.
    gh.seed(REPO, 8, 0);
    let _ = gh.state.lock().map(|mut s| {
        s.next_id += 1;
        let id = s.next_id;
        s.comments
            .entry((REPO.into(), 8))
            .or_default()
            .push(crate::fake_github::Comment { id, body: "> <!-- dotmac-gitops -->\n> quoted".into() })
    });
    let file = dir.path().join("b8.md");
    std::fs::write(&file, "eight").unwrap();
    let env: Vec<(String, String)> = gh.env(REPO).into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = run_env(&["pr-comment", "--pr", "8", "--body-file", file.to_str().unwrap()], dir.path(), &pairs);
    assert!(out.stdout.starts_with("created comment"), "{}{}", out.stdout, out.stderr);
    assert_eq!(gh.comments(REPO, 8).len(), 2);
}

#[test]
fn refusals_say_what_to_check_and_exit_1() {
    let gh = FakeGithub::start();
    let dir = tempfile::tempdir().unwrap();
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: [Case; 5] = [
        (REPO, &[("GITHUB_TOKEN", "ghs_wrong")], &["401 Unauthorized", "Bad credentials", "GITHUB_TOKEN"]),
        ("acme/forbidden", &[], &["403 Forbidden", "Resource not accessible by integration", "pull-requests: write"]),
        ("acme/missing", &[], &["404 Not Found", "GITHUB_REPOSITORY=`acme/missing`", "GITHUB_API_URL"]),
        (
            "acme/invalid",
            &[],
            &["422 Unprocessable Entity", "body is too long", "creating a comment on pull request #7"],
        ),
        ("acme/ratelimited", &[], &["rate limit is exhausted", "2026-"]),
    ];
    for (repo, env, expected) in cases {
        let out = post(&gh, repo, dir.path(), "report", &[], env);
        assert_eq!(out.code, 1, "{repo}: {}{}", out.stdout, out.stderr);
        for e in expected {
            assert!(out.stderr.contains(e), "{repo}: expected `{e}` in: {}", out.stderr);
        }
        assert!(out.stdout.is_empty());
    }
    // The wrong token is not printed either.
    assert!(!gh.requests().is_empty());
}

#[test]
fn a_server_error_is_retried() {
    let gh = FakeGithub::start();
    let dir = tempfile::tempdir().unwrap();
    let out = post(&gh, "acme/flaky", dir.path(), "report", &[], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.starts_with("created comment"));
    let requests = gh.requests();
    assert_eq!(requests.iter().filter(|r| r.starts_with("GET ")).count(), 2, "{requests:?}");
}

#[test]
fn configuration_problems_are_named() {
    let gh = FakeGithub::start();
    let dir = tempfile::tempdir().unwrap();
    let out = post(&gh, REPO, dir.path(), "report", &[], &[("GITHUB_TOKEN", "")]);
    assert!(out.code == 1 && out.stderr.contains("GITHUB_TOKEN is not set"), "{}", out.stderr);
    let out = post(&gh, "not-a-repo", dir.path(), "report", &[], &[]);
    assert!(out.code == 1 && out.stderr.contains("is not owner/name"), "{}", out.stderr);
    let out = post(&gh, REPO, dir.path(), "  \n", &[], &[]);
    assert!(out.code == 1 && out.stderr.contains("is empty; nothing was posted"), "{}", out.stderr);
    let out = post(&gh, REPO, dir.path(), "report", &["--marker", "a --> b"], &[]);
    assert!(out.code == 1 && out.stderr.contains("cannot go in an HTML comment"), "{}", out.stderr);
    let big = "x".repeat(70_000);
    let out = post(&gh, REPO, dir.path(), &big, &[], &[]);
    assert!(out.code == 1 && out.stderr.contains("over GitHub's limit of 65536"), "{}", out.stderr);
    // Nothing reached the server but the checks that needed it.
    assert!(gh.comments(REPO, 7).is_empty());
    let out = run_env(
        &["pr-comment", "--pr", "7", "--body-file", dir.path().join("nope.md").to_str().unwrap()],
        dir.path(),
        &[],
    );
    assert!(out.code == 1 && out.stderr.contains("cannot read --body-file"), "{}", out.stderr);
}
