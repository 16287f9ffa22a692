//! A real PostgreSQL for tests: a private cluster made with `initdb` in a temp folder, served
//! by `postgres` on a free 127.0.0.1 port with password (SCRAM) authentication and no Unix
//! socket, one per test, stopped by its process id when the fixture is dropped.
//!
//! The binaries are Debian's (`apt-get install postgresql`, scripts/test-deps.sh): found in
//! `$DOTMAC_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`, else `initdb` on PATH. As
//! root they run as the `postgres` user (PostgreSQL refuses root). Without them the tests skip
//! loudly, or fail under `DOTMAC_REQUIRE_ALL=1`.

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The folder holding `initdb` and `postgres`, if PostgreSQL is installed.
pub fn pg_bin() -> Option<PathBuf> {
    let ok = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(p) = std::env::var_os("DOTMAC_PG_BIN") {
        return Some(PathBuf::from(p)).filter(|p| ok(p));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path().join("bin"))))
        .filter(|(_, p)| ok(p))
        .collect();
    versions.sort();
    if let Some((_, p)) = versions.pop() {
        return Some(p);
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join("initdb"))
        .find(|p| p.is_file())
        .and_then(|p| std::fs::canonicalize(p).ok())
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .filter(|d| ok(d))
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).unwrap();
    dotmac_gitops::providers::local::hex(&b)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The uid and gid to run PostgreSQL as: `postgres` when we are root, else ourselves.
fn run_as() -> Option<(u32, u32)> {
    // SAFETY: getuid cannot fail; getpwnam returns a pointer to static storage or null.
    unsafe {
        if libc::geteuid() != 0 {
            return None;
        }
        let pw = libc::getpwnam(c"postgres".as_ptr());
        assert!(!pw.is_null(), "running as root, PostgreSQL needs a `postgres` user (Debian's package makes it)");
        Some(((*pw).pw_uid, (*pw).pw_gid))
    }
}

fn chown(path: &Path, ids: Option<(u32, u32)>) {
    if let Some((u, g)) = ids {
        std::os::unix::fs::chown(path, Some(u), Some(g)).unwrap();
    }
}

/// A TLS setup for the server: a private CA and a certificate for 127.0.0.1 it signed.
pub struct Certs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct Pg {
    child: Child,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub certs: Option<Certs>,
    pub bin: PathBuf,
    dir: tempfile::TempDir,
}

fn run_ok(cmd: &mut Command, what: &str) {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pg {
    /// Starts a private cluster, or returns `None` (after saying so) when PostgreSQL is not
    /// installed.
    pub fn start(test: &str) -> Option<Pg> {
        Self::start_with(test, false)
    }

    /// A cluster that speaks TLS, with a certificate signed by a CA of its own.
    pub fn start_tls(test: &str) -> Option<Pg> {
        Self::start_with(test, true)
    }

    fn start_with(test: &str, tls: bool) -> Option<Pg> {
        let Some(bin) = pg_bin() else {
            crate::util::skip_unless_required(test, "PostgreSQL", "apt-get install postgresql; scripts/test-deps.sh");
            return None;
        };
        let ids = run_as();
        let dir = tempfile::tempdir().unwrap();
        chown(dir.path(), ids);
        let password = format!("pw-{}", random_hex(12));
        let user = "dotmac_admin".to_owned();
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, &password).unwrap();
        chown(&pwfile, ids);
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", &user, "-A", "scram-sha-256", "--no-sync", "-E", "UTF8", "--no-instructions"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .env("LC_ALL", "C.UTF-8");
        if let Some((u, g)) = ids {
            initdb.uid(u).gid(g);
        }
        run_ok(&mut initdb, "initdb");
        std::fs::remove_file(&pwfile).unwrap();
        let certs = tls.then(|| make_certs(dir.path(), ids));
        // A port can be taken between our probe and the server's bind: try a few.
        for _ in 0..5 {
            let port = free_port();
            if let Some(child) = Self::try_start(&bin, dir.path(), port, ids, certs.as_ref(), &user, &password) {
                return Some(Pg { child, port, user, password, certs, bin, dir });
            }
        }
        panic!("postgres did not start; see the logs above");
    }

    fn try_start(
        bin: &Path,
        dir: &Path,
        port: u16,
        ids: Option<(u32, u32)>,
        certs: Option<&Certs>,
        user: &str,
        password: &str,
    ) -> Option<Child> {
        let log_path = dir.join(format!("server-{port}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new(bin.join("postgres"));
        cmd.arg("-D").arg(dir.join("data")).args([
            "-p",
            &port.to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "unix_socket_directories=",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "shared_buffers=32MB",
            "-c",
            "max_connections=40",
        ]);
        if let Some(c) = certs {
            cmd.args(["-c", "ssl=on"])
                .arg("-c")
                .arg(format!("ssl_cert_file={}", c.cert.display()))
                .arg("-c")
                .arg(format!("ssl_key_file={}", c.key.display()));
        }
        cmd.env("LC_ALL", "C.UTF-8").stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        if let Some((u, g)) = ids {
            cmd.uid(u).gid(g);
        }
        // SAFETY: prctl is async-signal-safe. The server dies with the test thread that
        // started it, even if the test process is killed before `Drop` runs. (It runs after
        // the change of user, which would clear it.)
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("postgres runs");
        let start = Instant::now();
        let mut probe = postgres::Config::new();
        probe.host("127.0.0.1").port(port).user(user).password(password).dbname("postgres");
        probe.connect_timeout(Duration::from_secs(2));
        while start.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(_)) = child.try_wait() {
                let _ = child.wait();
                eprintln!("postgres exited early:\n{}", std::fs::read_to_string(&log_path).unwrap_or_default());
                return None;
            }
            if probe.connect(postgres::NoTls).is_ok() {
                return Some(child);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("postgres did not answer within 60s:\n{}", std::fs::read_to_string(&log_path).unwrap_or_default());
    }

    /// The connection URL (TLS off unless `query` says otherwise).
    pub fn url(&self, query: &str) -> String {
        let q = if query.is_empty() { "sslmode=disable" } else { query };
        format!("postgres://{}:{}@127.0.0.1:{}/postgres?{q}", self.user, self.password, self.port)
    }

    /// A client for checks made by the test itself.
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url(""), postgres::NoTls).unwrap()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("server-") {
                out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        out
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown (the data is thrown away with the folder).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGQUIT) };
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

/// A CA and a server certificate for 127.0.0.1 (IP address SAN), made with `openssl` (Debian's
/// postgresql depends on it through ssl-cert).
fn make_certs(dir: &Path, ids: Option<(u32, u32)>) -> Certs {
    let openssl = |args: &[&str]| {
        run_ok(Command::new("openssl").args(args).current_dir(dir), &format!("openssl {}", args.join(" ")));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut args = vec!["req", "-x509", "-days", "2", "-subj", "/CN=dotmac test CA", "-keyout", "ca.key"];
    args.extend(ec);
    args.extend(["-out", "ca.pem", "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign"]);
    openssl(&args);
    let mut args = vec!["req", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr"];
    args.extend(ec);
    openssl(&args);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-days",
        "2",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-extfile",
        "server.ext",
        "-out",
        "server.pem",
    ]);
    let key = dir.join("server.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    chown(&key, ids);
    chown(&dir.join("server.pem"), ids);
    Certs { ca: dir.join("ca.pem"), cert: dir.join("server.pem"), key }
}
