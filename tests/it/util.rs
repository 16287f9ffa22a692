//! Helpers: repositories in temp folders, the binary, git.

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const NOW: &str = "2026-11-22T00:00:00Z";

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn project() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Copies a folder tree (symlinks are copied as symlinks).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let src = e.path();
        let dst = to.join(e.file_name());
        let ft = e.file_type().unwrap();
        if ft.is_symlink() {
            let target = std::fs::read_link(&src).unwrap();
            let _ = std::fs::remove_file(&dst);
            std::os::unix::fs::symlink(target, &dst).unwrap();
        } else if ft.is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// A temp repository: the base fixture with a case's files laid over it. A case may list
/// files to delete in `_remove`.
pub fn fixture_repo(case: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixtures().join("_base"), dir.path());
    let case_dir = fixtures().join(case);
    copy_tree(&case_dir, dir.path());
    let remove = dir.path().join("_remove");
    if remove.exists() {
        for line in std::fs::read_to_string(&remove).unwrap().lines() {
            let _ = std::fs::remove_file(dir.path().join(line));
        }
        std::fs::remove_file(remove).unwrap();
    }
    dir
}

/// A copy of the project's example-repo.
pub fn example_repo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&project().join("example-repo"), dir.path());
    dir
}

pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Both streams and the exit code, with the temp path replaced, for snapshots.
    pub fn transcript(&self, repo: &Path) -> String {
        let clean = |s: &str| s.replace(&repo.display().to_string(), "<repo>");
        format!("exit: {}\n--- stdout\n{}--- stderr\n{}", self.code, clean(&self.stdout), clean(&self.stderr))
    }
}

/// How long any command may take before the test calls it a hang.
pub const HANG: Duration = Duration::from_secs(60);
/// The address space any command may use (a few hundred MiB of heap, plus thread stacks).
pub const MEMORY_LIMIT: u64 = 1536 * 1024 * 1024;

/// Runs the binary with a memory limit and a hang guard.
pub fn run(args: &[&str], cwd: &Path) -> Output {
    run_env(args, cwd, &[])
}

/// The binary, ready to spawn with `args` in `cwd`: the memory limit set, stdin empty, both
/// streams piped, no colour, `DOTMAC_LOG` unset unless `env` sets it.
pub fn command(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dotmac-gitops"));
    cmd.args(args)
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        .env_remove("DOTMAC_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: MEMORY_LIMIT, rlim_max: MEMORY_LIMIT };
            libc::setrlimit(libc::RLIMIT_AS, &lim);
            Ok(())
        });
    }
    cmd
}

pub fn run_env(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Output {
    let child = command(args, cwd, env).spawn().expect("the binary runs");
    let start = Instant::now();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(HANG) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("`dotmac-gitops {}` did not finish within {:?}", args.join(" "), HANG);
        }
    };
    let _ = start;
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "test")
        .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
        .env("GIT_COMMITTER_NAME", "test")
        .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Makes `dir` a git repository (with git2) and commits everything in it; returns the commit.
pub fn git_commit_all(dir: &Path, message: &str) -> String {
    let repo = match git2::Repository::open(dir) {
        Ok(r) => r,
        Err(_) => git2::Repository::init(dir).unwrap(),
    };
    let mut index = repo.index().unwrap();
    index.add_all(["*"].iter(), git2::IndexAddOption::DEFAULT, None).unwrap();
    index.update_all(["*"].iter(), None).unwrap();
    index.write().unwrap();
    let tree_id = index.write_tree().unwrap();
    let tree = repo.find_tree(tree_id).unwrap();
    let sig = git2::Signature::now("test", "test@example.invalid").unwrap();
    let parent = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
    let parents: Vec<&git2::Commit> = parent.iter().collect();
    let id = repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &parents).unwrap();
    id.to_string()
}

/// A repository from the shared generator (`bench/peer/gen_repo.py`), with development
/// placeholders for its external secrets so that it applies offline.
pub fn generated_repo(tenants: usize, seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("python3")
        .arg(project().join("bench/peer/gen_repo.py"))
        .args(["--tenants", &tenants.to_string(), "--seed", &seed.to_string(), "--out"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .status()
        .expect("python3 runs");
    assert!(status.success());
    let toml = dir.path().join("dotmac.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(
        &toml,
        text.replace(
            "[providers.secrets]\nkind = \"local\"\n",
            "[providers.secrets]\nkind = \"local\"\ndev_placeholders = true\n",
        ),
    )
    .unwrap();
    dir
}

/// `secret put` with the value on stdin; checks the value is not echoed.
pub fn put_secret(repo: &Path, tenant: &str, name: &str, value: &str) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_dotmac-gitops"))
        .args(["secret", "put", "--tenant", tenant, "--name", name])
        .current_dir(repo)
        .env("DOTMAC_LOG", "trace")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(value.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for s in [&out.stdout, &out.stderr] {
        assert!(!String::from_utf8_lossy(s).contains(value.trim()), "secret put printed the value");
    }
}

/// A small seeded random number generator (splitmix64), so that a randomized test repeats
/// exactly: the seed comes from `$DOTMAC_TEST_SEED` or the test's default, and is printed.
pub struct Rng(u64);

impl Rng {
    pub fn seeded(test: &str, default: u64) -> Rng {
        let seed = std::env::var("DOTMAC_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
        eprintln!("{test}: seed {seed} (set DOTMAC_TEST_SEED to repeat another)");
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

/// Replaces `from` by `to` in a file (the first occurrence), which must contain it.
pub fn edit_file(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no `{from}`", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

/// The file of a local store that holds `address` (`tenant-123/isp.config`), under a state
/// folder (`<repo>/.dotmac`): the tenant's shard of the address's provider.
pub fn live_file(state_dir: &Path, address: &str) -> PathBuf {
    let a = dotmac_gitops::model::Address::parse(address).unwrap_or_else(|| panic!("`{address}` is not an address"));
    dotmac_gitops::providers::local::shard_path(state_dir, a.provider(), &a.tenant)
}

/// Where the entry for `address` is in a shard file's text: its header line and its
/// content lines (up to the next header), and whether the header says `(no final newline)`.
/// Read the way a person reads the file, not through the store's code.
fn find_entry(text: &str, address: &str) -> Option<(std::ops::Range<usize>, bool)> {
    let plain = format!("=== {address}\n");
    let no_eol = format!("=== {address} (no final newline)\n");
    let mut pos = 0;
    let mut found: Option<(usize, bool)> = None;
    for line in text.split_inclusive('\n') {
        if let Some((start, eol)) = found {
            if line.starts_with("=== ") {
                return Some((start..pos, eol));
            }
        } else if line == plain || line == no_eol {
            found = Some((pos, line == no_eol));
        }
        pos += line.len();
    }
    found.map(|(start, eol)| (start..text.len(), eol))
}

/// The content of `address`'s entry in its shard file (indentation removed), if there is one.
pub fn live_entry(state_dir: &Path, address: &str) -> Option<String> {
    let text = std::fs::read_to_string(live_file(state_dir, address)).ok()?;
    let (range, no_eol) = find_entry(&text, address)?;
    let body = text[range].split_once('\n').map_or("", |(_, b)| b);
    let mut content: String =
        body.split_inclusive('\n').map(|l| if l == "\n" { l } else { l.strip_prefix("  ").unwrap() }).collect();
    if no_eol {
        content.pop();
    }
    Some(content)
}

/// Edits `address`'s entry in its shard file by hand, as a person would (an out-of-band
/// change): replaces `from` by `to` in the entry's content (first occurrence), writing the
/// lines back indented; the rest of the file is untouched.
pub fn edit_live(state_dir: &Path, address: &str, from: &str, to: &str) {
    let content = live_entry(state_dir, address)
        .unwrap_or_else(|| panic!("no entry for {address} in {}", live_file(state_dir, address).display()));
    assert!(content.contains(from), "{address} has no `{from}`:\n{content}");
    set_live(state_dir, address, Some(&content.replacen(from, to, 1)));
}

/// Replaces `address`'s entry by one holding `content`, or removes it (`None`), by hand.
pub fn set_live(state_dir: &Path, address: &str, content: Option<&str>) {
    let path = live_file(state_dir, address);
    let text = std::fs::read_to_string(&path).unwrap();
    let Some((range, _)) = find_entry(&text, address) else { panic!("no entry for {address} in {}", path.display()) };
    let mut entry = String::new();
    if let Some(c) = content {
        let (body, no_eol) = match c.strip_suffix('\n') {
            Some(b) => (Some(b), false),
            None => ((!c.is_empty()).then_some(c), !c.is_empty()),
        };
        entry = format!("=== {address}{}\n", if no_eol { " (no final newline)" } else { "" });
        for line in body.into_iter().flat_map(|b| b.split('\n')) {
            if !line.is_empty() {
                entry.push_str("  ");
                entry.push_str(line);
            }
            entry.push('\n');
        }
    }
    // Through a rename, as many editors save: a daemon reading beside the test never sees
    // half a file.
    let tmp = path.with_extension("edit");
    std::fs::write(&tmp, format!("{}{entry}{}", &text[..range.start], &text[range.end..])).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

/// The addresses of `tenant`'s entries in its shard file of a local store, in file order.
pub fn live_addresses(state_dir: &Path, provider: dotmac_gitops::model::ProviderId, tenant: &str) -> Vec<String> {
    let path = dotmac_gitops::providers::local::shard_path(state_dir, provider, tenant);
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mine = format!("{tenant}/");
    text.lines()
        .filter_map(|l| l.strip_prefix("=== "))
        .map(|a| a.strip_suffix(" (no final newline)").unwrap_or(a))
        .filter(|a| a.starts_with(&mine))
        .map(str::to_owned)
        .collect()
}

/// A test's outside component is missing: a loud skip, or a failure under
/// `DOTMAC_REQUIRE_ALL` (as `.ci/run` sets it, after installing everything).
pub fn skip_unless_required(test: &str, what: &str, how: &str) {
    assert!(
        std::env::var_os("DOTMAC_REQUIRE_ALL").is_none(),
        "DOTMAC_REQUIRE_ALL: {what} is required for {test} ({how})"
    );
    eprintln!("SKIPPED {test}: {what} is not installed ({how})");
}
