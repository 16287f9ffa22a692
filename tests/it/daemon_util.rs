//! Running `dotmac-gitops daemon` in the background and talking HTTP to it.
//!
//! The daemon listens on `127.0.0.1:0`; the port it got is read from its log. Waits poll
//! the status API until a condition holds, with a generous limit (never a fixed sleep).

#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long convergence may take before a test fails.
pub const CONVERGE: Duration = Duration::from_secs(60);

pub struct Daemon {
    child: Option<Child>,
    pub addr: String,
    log: Arc<Mutex<String>>,
}

/// A minimal HTTP/1.1 exchange: (status, body).
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let (status, _, body) = exchange(addr, method, path, headers, body);
    (status, body)
}

/// A minimal HTTP/1.1 exchange with the answer's headers: (status, headers with lowercase
/// names, body). A `Host` in `headers` replaces the default (`addr`).
pub fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let host = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("host")).map_or(addr, |(_, v)| *v);
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers.iter().filter(|(k, _)| !k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut r = rest;
        while let Some((size, tail)) = r.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            r = &tail[n + 2..];
        }
        out
    } else {
        rest.to_owned()
    };
    let fields = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, fields, body)
}

impl Daemon {
    /// Starts the daemon on `repo` with `args` (besides `daemon --repo --listen`) and `env`.
    pub fn start(repo: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dotmac-gitops"));
        cmd.arg("daemon")
            .arg("--repo")
            .arg(repo)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("NO_COLOR", "1")
            .env_remove("DOTMAC_LOG")
            .env_remove("DOTMAC_FAULTS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("the binary runs");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find("listen=") {
                    let addr: String = line[i + 7..].split_whitespace().next().unwrap_or("").to_owned();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut d = Daemon { child: Some(child), addr: String::new(), log };
        match rx.recv_timeout(CONVERGE) {
            Ok(addr) => d.addr = addr,
            Err(_) => panic!("the daemon did not start listening:\n{}", d.log()),
        }
        d
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http(&self.addr, "GET", path, &[], b"")
    }

    pub fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
        http(&self.addr, "POST", path, headers, body)
    }

    pub fn json(&self, path: &str) -> Value {
        let (code, body) = self.get(path);
        assert_eq!(code, 200, "GET {path}: {body}\n{}", self.log());
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    pub fn status(&self) -> Value {
        self.json("/api/v1/status")
    }

    pub fn tenant(&self, id: &str) -> Value {
        self.json(&format!("/api/v1/tenants/{id}"))
    }

    /// Polls `probe` until it returns `Some`, or fails the test after [`CONVERGE`].
    pub fn wait<T>(&self, what: &str, mut probe: impl FnMut(&Daemon) -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = probe(self) {
                return v;
            }
            if start.elapsed() > CONVERGE {
                let status = self.get("/api/v1/status").1;
                panic!("waited {CONVERGE:?} for {what}\nstatus: {status}\nlog:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every tenant is `status` at `revision`.
    pub fn wait_all(&self, status: &str, revision: &str) -> Value {
        self.wait(&format!("every tenant {status} at {revision}"), |d| {
            let s = d.status();
            let all = s["tenants"].as_array().unwrap();
            (!all.is_empty() && all.iter().all(|t| t["status"] == status && t["revision"] == revision)).then_some(s)
        })
    }

    /// Waits until tenant `id` satisfies `f`.
    pub fn wait_tenant(&self, id: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        self.wait(&format!("{id}: {what}"), |d| {
            let (code, body) = d.get(&format!("/api/v1/tenants/{id}"));
            if code != 200 {
                return None;
            }
            let v: Value = serde_json::from_str(&body).ok()?;
            f(&v).then_some(v)
        })
    }

    /// A metric's value (the sample line starting with `series`).
    pub fn metric(&self, series: &str) -> f64 {
        let (code, text) = self.get("/metrics");
        assert_eq!(code, 200, "GET /metrics: {text}\n{}", self.log());
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Sends `signal` and waits for the exit: (exit code, log).
    pub fn signal(mut self, signal: i32) -> (i32, String) {
        let mut child = self.child.take().unwrap();
        unsafe { libc::kill(child.id() as i32, signal) };
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return (st.code().unwrap_or(-1), self.log());
            }
            if start.elapsed() > CONVERGE {
                let _ = child.kill();
                panic!("the daemon did not exit after signal {signal}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, and the exit code and log.
    pub fn stop(self) -> (i32, String) {
        self.signal(libc::SIGTERM)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Checks `text` is Prometheus/OpenMetrics text exposition: every line a `# HELP`, `# TYPE`,
/// `# UNIT` or `# EOF` comment or a sample `name{labels} value`, every sample of a declared
/// family, `# EOF` last. Returns the samples (series → value).
pub fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .enumerate()
                .all(|(i, c)| c == '_' || c == ':' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()))
    };
    let mut families: Vec<(String, String)> = Vec::new();
    let mut samples = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "the exposition ends with # EOF");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            assert!(["HELP", "TYPE", "UNIT"].contains(&kind), "unknown comment: {line}");
            assert!(name_ok(name), "bad metric name in: {line}");
            if kind == "TYPE" {
                let t = parts.next().unwrap_or("");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "info", "stateset", "unknown"].contains(&t),
                    "{line}"
                );
                families.push((name.to_owned(), t.to_owned()));
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(name_ok(name), "bad sample name: {line}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels.strip_prefix('{').and_then(|l| l.strip_suffix('}')).unwrap_or_else(|| panic!("{line}"));
            for pair in inner.split(',') {
                let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("bad label in {line}"));
                assert!(name_ok(k), "bad label name in {line}");
                assert!(v.len() >= 2 && v.starts_with('"') && v.ends_with('"'), "unquoted label value in {line}");
            }
        }
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let declared = families.iter().any(|(f, t)| {
            name == f
                || (t == "counter" && (name == format!("{f}_total") || name == format!("{f}_created")))
                || (t == "histogram"
                    && ["_bucket", "_sum", "_count", "_created"].iter().any(|s| name == format!("{f}{s}")))
        });
        assert!(declared, "a sample of an undeclared family: {line}");
        samples.push((series.to_owned(), v));
    }
    samples
}

/// Holds the state lock the way `apply` does (flock on `.dotmac/state/lock`, the holder's
/// description inside), until dropped.
pub struct HeldLock(std::fs::File);

impl HeldLock {
    pub fn take(repo: &Path, holder: &str) -> HeldLock {
        let path = repo.join(".dotmac/state/lock");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut f =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).unwrap();
        f.try_lock().expect("the state lock is free");
        f.set_len(0).unwrap();
        writeln!(f, "{holder}").unwrap();
        HeldLock(f)
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        let _ = self.0.set_len(0);
        let _ = self.0.unlock();
    }
}

/// An example repository committed with git (with `.dotmac/` ignored), and its commit.
pub fn committed_example() -> (tempfile::TempDir, String) {
    let repo = crate::util::example_repo();
    std::fs::write(repo.path().join(".gitignore"), ".dotmac/\n").unwrap();
    let c = crate::util::git_commit_all(repo.path(), "example");
    (repo, c)
}

/// Replaces `from` with `to` in a file (which must contain it).
pub fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no `{from}`", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}
