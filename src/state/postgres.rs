//! The shared state store: PostgreSQL, for several CI runners, people and daemon replicas that
//! must see one state. The same records, serial, lineage, audit log and journal as the embedded
//! SQLite store, in tables named `dotmac_*` (in the connection's schema: `options=-c
//! search_path=…` in the URL keeps two states apart in one database), with versioned
//! migrations recorded in `dotmac_schema_migrations`.
//!
//! The lock is a session-level advisory lock (`pg_try_advisory_lock`) taken on a connection of
//! its own: the server releases it when that session ends, however its holder died. While held,
//! the row in `dotmac_lock` names the holder for the message a second taker gets; a row whose
//! session no longer holds the lock is ignored. A commit made while this store holds the lock
//! first checks that the lock's session still holds it, so a holder whose lock connection broke
//! records nothing.
//!
//! Connections speak TLS through rustls (ring) when the URL asks for it: `sslmode=require` (or
//! `verify-full`) requires TLS, `prefer` (the default) uses it when the server offers it,
//! `disable` never does. The server's certificate is always verified, against the system's
//! roots or the CA file named by `sslrootcert=PATH`. The password never appears in a message:
//! every error and log line goes through [`PgUrl::mask`].

use super::{AuditEntry, AuditQuery, Commit, JournalEntry, JsonText, Record, Result, StateMeta, StateStore};
use crate::load::settings::StateSettings;
use crate::model::{Address, Content};
use crate::providers::TenantScope;
use anyhow::{anyhow, bail};
use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use postgres::types::ToSql;
use postgres::{Client, GenericClient};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Schema migrations, applied in order, each recorded in `dotmac_schema_migrations`.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "the first schema",
        r#"CREATE TABLE dotmac_state (
        id boolean PRIMARY KEY DEFAULT true CHECK (id),
        lineage text NOT NULL,
        serial bigint NOT NULL);
     CREATE TABLE dotmac_resources (
        address text COLLATE "C" PRIMARY KEY,
        tenant text COLLATE "C" NOT NULL,
        provider text NOT NULL,
        fingerprint text NOT NULL,
        content json,
        applied_at text NOT NULL,
        serial bigint NOT NULL);
     CREATE INDEX dotmac_resources_by_tenant ON dotmac_resources(tenant);
     CREATE TABLE dotmac_audit (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        time text COLLATE "C" NOT NULL,
        correlation_id text NOT NULL,
        actor text NOT NULL,
        tenant text COLLATE "C" NOT NULL,
        address text NOT NULL,
        action text NOT NULL,
        risk text NOT NULL,
        outcome text NOT NULL,
        before json,
        after json,
        message text);
     CREATE INDEX dotmac_audit_by_tenant_time ON dotmac_audit(tenant, time);
     CREATE INDEX dotmac_audit_by_time ON dotmac_audit(time);
     CREATE TABLE dotmac_journal (
        address text COLLATE "C" PRIMARY KEY,
        plan_id text NOT NULL,
        action text NOT NULL,
        intended text,
        started_at text NOT NULL);
     CREATE TABLE dotmac_lock (
        id boolean PRIMARY KEY DEFAULT true CHECK (id),
        holder text NOT NULL,
        backend_pid integer NOT NULL,
        since timestamptz NOT NULL DEFAULT now());"#,
    ),
    (
        "one journal entry per address and plan",
        // As in the embedded store: an apply recovering from a killed one journals its own
        // writes beside the killed one's, rather than over them.
        "ALTER TABLE dotmac_journal DROP CONSTRAINT dotmac_journal_pkey;
         ALTER TABLE dotmac_journal ADD PRIMARY KEY (address, plan_id);",
    ),
];

/// The transaction-level advisory lock that serialises migrations ("dmac" "migr").
const MIGRATION_KEY: i64 = 0x646d_6163_6d69_6772;
/// The high half of the state lock's key ("dmac"); the low half is `dotmac_state`'s oid, so
/// that states in different schemas of one database have different locks.
const LOCK_CLASS: u32 = 0x646d_6163;
/// Rows per statement when writing in bulk.
const CHUNK: usize = 5_000;

/// Where to find the connection URL: `url_env` (the variable holding it) or `url`.
pub fn url_from_settings(s: &StateSettings) -> Result<String> {
    match (&s.url, &s.url_env) {
        (Some(_), Some(_)) => bail!("[state] sets both url and url_env; set one (url_env for a URL with a password)"),
        (None, Some(var)) => match std::env::var(var) {
            Ok(v) if v.trim().is_empty() => bail!("[state] url_env names ${var}, which is empty"),
            Ok(v) => Ok(v.trim().to_owned()),
            Err(_) => bail!("[state] url_env names ${var}, which is not set (it should hold postgres://…)"),
        },
        (Some(u), None) => Ok(u.clone()),
        (None, None) => bail!(
            "[state] backend = \"postgres\" needs url_env (the environment variable holding the connection URL) or url"
        ),
    }
}

/// How the connection uses TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsMode {
    Disable,
    Prefer,
    Require,
}

/// A parsed connection URL, with what is needed to keep its password out of every message.
#[derive(Clone)]
pub struct PgUrl {
    config: postgres::Config,
    tls: TlsMode,
    root_cert: Option<String>,
    /// The forms the password takes in text (as written and decoded), longest first.
    secrets: Vec<String>,
    /// The URL with its password masked, for messages.
    shown: String,
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl PgUrl {
    pub fn parse(url: &str) -> Result<PgUrl> {
        let url = url.trim();
        let Some(rest) = url.strip_prefix("postgres://").or_else(|| url.strip_prefix("postgresql://")) else {
            bail!("the state database URL must start with postgres:// or postgresql://");
        };
        let (base, query) = match url.find('?') {
            Some(i) => (&url[..i], Some(&url[i + 1..])),
            None => (url, None),
        };
        // The password as written: between the user name and the last `@` of the authority.
        let mut secrets = Vec::new();
        let authority = rest.split('?').next().unwrap_or_default();
        if let Some(at) = authority.rfind('@')
            && let Some((_, pw)) = authority[..at].split_once(':')
        {
            secrets.push(pw.to_owned());
            secrets.push(percent_decode(pw));
        }
        let mut tls = TlsMode::Prefer;
        let mut root_cert = None;
        let mut kept = Vec::new();
        for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "sslmode" => {
                    tls = match percent_decode(v).as_str() {
                        "disable" => TlsMode::Disable,
                        "prefer" => TlsMode::Prefer,
                        "require" | "verify-full" => TlsMode::Require,
                        other => bail!(
                            "the state database URL has sslmode={other}; use disable, prefer, require or verify-full \
                             (the server's certificate is always verified)"
                        ),
                    }
                }
                "sslrootcert" => root_cert = Some(percent_decode(v)),
                _ => {
                    if k == "password" {
                        secrets.push(v.to_owned());
                        secrets.push(percent_decode(v));
                    }
                    kept.push(pair);
                }
            }
        }
        secrets.retain(|s| !s.is_empty());
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        let mut u = PgUrl { config: postgres::Config::new(), tls, root_cert, secrets, shown: String::new() };
        u.shown = u.mask(url);
        let rebuilt = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
        let mut config: postgres::Config = rebuilt.parse().map_err(|e: postgres::Error| {
            anyhow!("the state database URL {} is invalid: {}", u.shown, u.mask_error(&e))
        })?;
        if let Some(pw) = config.get_password() {
            let pw = String::from_utf8_lossy(pw).into_owned();
            if !pw.is_empty() && !u.secrets.contains(&pw) {
                u.secrets.push(pw);
                u.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
            }
        }
        config.ssl_mode(match tls {
            TlsMode::Disable => postgres::config::SslMode::Disable,
            TlsMode::Prefer => postgres::config::SslMode::Prefer,
            TlsMode::Require => postgres::config::SslMode::Require,
        });
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("dotmac-gitops");
        }
        config.notice_callback(|n| tracing::debug!(target: "dotmac_gitops::state", "postgres: {}", n.message()));
        u.config = config;
        Ok(u)
    }

    /// `text` with every form of the password replaced.
    pub fn mask(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.secrets {
            out = out.replace(s.as_str(), "***");
        }
        out
    }

    /// The URL, password masked.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Whether the URL carries a password (in its user part or as `password=`).
    pub fn has_password(&self) -> bool {
        !self.secrets.is_empty()
    }

    /// An error and its causes on one line, password masked.
    fn mask_error(&self, e: &(dyn std::error::Error + 'static)) -> String {
        let mut text = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            let t = s.to_string();
            if !text.contains(&t) {
                text.push_str(": ");
                text.push_str(&t);
            }
            source = s.source();
        }
        self.mask(&text)
    }

    fn connect(&self) -> Result<Client> {
        let tls = if self.tls == TlsMode::Disable { None } else { Some(self.tls_config()?) };
        self.config.connect(RustlsConnect(tls)).map_err(|e| {
            let mut why = self.mask_error(&e);
            if why.contains("certificate") || why.contains("UnknownIssuer") {
                why.push_str(
                    "; if the server's certificate is signed by a private CA, add sslrootcert=/path/to/ca.pem to the URL",
                );
            }
            anyhow!("cannot connect to the state database {}: {why}", self.shown)
        })
    }

    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        match self.root_cert.as_deref() {
            Some(path) if path != "system" => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
                    .map_err(|e| anyhow!("sslrootcert={path} in the state database URL cannot be read: {e}"))?;
                if certs.is_empty() {
                    bail!("sslrootcert={path} in the state database URL holds no PEM certificate");
                }
                for c in certs {
                    roots.add(c).map_err(|e| anyhow!("sslrootcert={path}: {e}"))?;
                }
            }
            _ => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow!("TLS setup: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

/// tokio-postgres' TLS hooks over tokio-rustls. `None`: TLS is disabled (never called then).
#[derive(Clone)]
struct RustlsConnect(Option<Arc<rustls::ClientConfig>>);

struct RustlsConnector {
    config: Option<Arc<rustls::ClientConfig>>,
    name: rustls::pki_types::ServerName<'static>,
}

struct TlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type TlsConnect = RustlsConnector;
    type Error = std::io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> std::io::Result<RustlsConnector> {
        // Called for every connection, even with TLS disabled (then `connect` is never called).
        let config = self.0.clone();
        let name = rustls::pki_types::ServerName::try_from(domain.to_owned())
            .map_err(|e| std::io::Error::other(format!("`{domain}` is not a TLS server name: {e}")))?;
        Ok(RustlsConnector { config, name })
    }
}

impl<S> TlsConnect<S> for RustlsConnector
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = std::io::Result<TlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let config = self.config.ok_or_else(|| std::io::Error::other("TLS is disabled (sslmode=disable)"))?;
            let s = tokio_rustls::TlsConnector::from(config).connect(self.name, stream).await?;
            Ok(TlsStream(s))
        })
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncRead for TlsStream<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for TlsStream<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> postgres::tls::TlsStream for TlsStream<S> {
    /// No SCRAM channel binding (it would need an X.509 parser); the certificate is verified.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

/// The lock's session while this store holds it: its backend pid.
type Held = Arc<Mutex<Option<i32>>>;

pub struct PgStore {
    url: PgUrl,
    conn: Mutex<Client>,
    lock_key: i64,
    held: Held,
}

/// The two halves of an advisory lock key as `pg_locks` shows them (classid, objid).
fn key_halves(key: i64) -> (u32, u32) {
    ((key >> 32) as u32, key as u32)
}

impl PgStore {
    /// Connects, applies the migrations this binary knows that the database lacks, and makes
    /// the lineage on first use. Refuses a schema newer than this binary.
    pub fn open(url: &str) -> Result<PgStore> {
        let url = PgUrl::parse(url)?;
        let mut client = url.connect()?;
        let e = |what: &str, err: postgres::Error| {
            anyhow!("{what} in the state database {}: {}", url.shown, url.mask_error(&err))
        };
        let known = MIGRATIONS.len() as i32;
        if schema_version(&mut client).map_err(|err| e("reading the schema version", err))? != known {
            // A session lock taken before the transaction starts, so that the transaction
            // sees what a migrator that held it before us committed.
            client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_KEY]).map_err(|err| e("migrating", err))?;
            let migrated = migrate(&mut client, &url);
            let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_KEY]);
            migrated?;
            unlocked.map_err(|err| e("migrating", err))?;
        }
        let row = client
            .query_one("SELECT 'dotmac_state'::regclass::oid, (SELECT count(*) FROM dotmac_state)", &[])
            .map_err(|err| e("reading the state", err))?;
        let oid: u32 = row.get(0);
        if row.get::<_, i64>(1) == 0 {
            let mut b = [0u8; 16];
            getrandom::fill(&mut b).map_err(|e| anyhow!("no randomness: {e}"))?;
            let lineage = crate::providers::local::hex(&b);
            client
                .execute(
                    "INSERT INTO dotmac_state(id, lineage, serial) VALUES (true, $1, 0) ON CONFLICT (id) DO NOTHING",
                    &[&lineage],
                )
                .map_err(|err| e("creating the lineage", err))?;
        }
        tracing::debug!(url = %url.shown, "opened the state database");
        let lock_key = ((LOCK_CLASS as i64) << 32) | oid as i64;
        Ok(PgStore { url, conn: Mutex::new(client), lock_key, held: Arc::new(Mutex::new(None)) })
    }

    /// The URL, password masked.
    pub fn shown(&self) -> &str {
        self.url.shown()
    }

    /// The connection, opened again if it broke since the last call.
    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Client>> {
        let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if c.is_closed() {
            tracing::warn!(url = %self.url.shown, "the connection to the state database closed; connecting again");
            *c = self.url.connect()?;
        }
        Ok(c)
    }

    fn err<'a>(&'a self, what: &'a str) -> impl Fn(postgres::Error) -> anyhow::Error + 'a {
        move |e| anyhow!("{what} in the state database {}: {}", self.url.shown, self.url.mask_error(&e))
    }

    /// While this store holds the lock, checks (inside the caller's transaction) that the lock's
    /// session still holds it.
    fn check_lock(&self, c: &mut impl GenericClient) -> Result<()> {
        let Some(pid) = *self.held.lock().unwrap_or_else(|p| p.into_inner()) else { return Ok(()) };
        let (class, obj) = key_halves(self.lock_key);
        let held: bool = c
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = $1
                   AND classid = $2 AND objid = $3 AND objsubid = 1)",
                &[&pid, &class, &obj],
            )
            .map_err(self.err("checking the lock"))?
            .get(0);
        if !held {
            bail!(
                "the state lock was lost: its database session (pid {pid}) ended, so another run may hold it now; \
                 nothing was recorded"
            );
        }
        Ok(())
    }
}

/// Applies the migrations the database lacks, in one transaction (the caller holds the
/// migration lock).
fn migrate(client: &mut Client, url: &PgUrl) -> Result<()> {
    let e = |what: &str, err: postgres::Error| {
        anyhow!("{what} in the state database {}: {}", url.shown, url.mask_error(&err))
    };
    let known = MIGRATIONS.len() as i32;
    let mut tx = client.transaction().map_err(|err| e("migrating", err))?;
    let version = schema_version(&mut tx).map_err(|err| e("reading the schema version", err))?;
    if version > known {
        bail!(
            "the state database {} was written by a newer dotmac-gitops (schema {version}, this one knows {known}); upgrade",
            url.shown
        );
    }
    if version == 0 {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS dotmac_schema_migrations (
                version integer PRIMARY KEY,
                description text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .map_err(|err| e("creating dotmac_schema_migrations", err))?;
    }
    for (i, (what, sql)) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let n = i as i32 + 1;
        tx.batch_execute(sql).map_err(|err| e(&format!("migration {n} ({what})"), err))?;
        tx.execute("INSERT INTO dotmac_schema_migrations(version, description) VALUES ($1, $2)", &[&n, what])
            .map_err(|err| e(&format!("recording migration {n}"), err))?;
        tracing::info!(version = n, "migrated the state database: {what}");
    }
    tx.commit().map_err(|err| e("migrating", err))?;
    Ok(())
}

/// Journals these entries in one statement (an entry for an address already there replaces it).
fn journal_rows(c: &mut impl GenericClient, rows: &[&JournalEntry]) -> std::result::Result<u64, postgres::Error> {
    let col = |f: fn(&JournalEntry) -> &str| rows.iter().map(|j| f(j)).collect::<Vec<&str>>();
    let intended: Vec<Option<&str>> = rows.iter().map(|j| j.intended.as_deref()).collect();
    c.execute(
        "INSERT INTO dotmac_journal(address, plan_id, action, intended, started_at)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
         ON CONFLICT (address, plan_id) DO UPDATE SET action = excluded.action,
            intended = excluded.intended, started_at = excluded.started_at",
        &[&col(|j| &j.address), &col(|j| &j.plan_id), &col(|j| &j.action), &intended, &col(|j| &j.started_at)],
    )
}

/// How many migrations the database has (0: none, or no table yet).
fn schema_version(c: &mut impl GenericClient) -> std::result::Result<i32, postgres::Error> {
    let exists: bool = c.query_one("SELECT to_regclass('dotmac_schema_migrations') IS NOT NULL", &[])?.get(0);
    if !exists {
        return Ok(0);
    }
    c.query_one("SELECT coalesce(max(version), 0) FROM dotmac_schema_migrations", &[]).map(|r| r.get(0))
}

/// A held lock: its own session. Dropping it clears the holder row and unlocks; if the process
/// dies instead, the server ends the session and the lock with it.
pub struct PgLock {
    client: Client,
    key: i64,
    held: Held,
}

impl super::StateLock for PgLock {}

impl Drop for PgLock {
    fn drop(&mut self) {
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let _ = self.client.execute("DELETE FROM dotmac_lock WHERE backend_pid = pg_backend_pid()", &[]);
        let _ = self.client.execute("SELECT pg_advisory_unlock($1)", &[&self.key]);
    }
}

impl StateStore for PgStore {
    fn lock(&self, holder: &str, timeout: Duration) -> Result<Box<dyn super::StateLock>> {
        let mut client = self.url.connect()?;
        let e = self.err("taking the lock");
        // A holder whose machine vanishes is noticed by the server within about a minute.
        client
            .batch_execute(
                "SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3;
                 SET application_name = 'dotmac-gitops lock'",
            )
            .map_err(&e)?;
        let start = Instant::now();
        loop {
            let got: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&self.lock_key]).map_err(&e)?.get(0);
            if got {
                let pid: i32 = client
                    .query_one(
                        "INSERT INTO dotmac_lock(id, holder, backend_pid, since) VALUES (true, $1, pg_backend_pid(), now())
                         ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, backend_pid = excluded.backend_pid,
                            since = excluded.since
                         RETURNING backend_pid",
                        &[&holder],
                    )
                    .map_err(&e)?
                    .get(0);
                *self.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(pid);
                return Ok(Box::new(PgLock { client, key: self.lock_key, held: self.held.clone() }));
            }
            if start.elapsed() >= timeout {
                let (class, obj) = key_halves(self.lock_key);
                let who = client
                    .query_opt(
                        "SELECT k.pid, l.holder FROM pg_locks k LEFT JOIN dotmac_lock l ON l.backend_pid = k.pid
                         WHERE k.locktype = 'advisory' AND k.granted AND k.classid = $1 AND k.objid = $2
                           AND k.objsubid = 1
                         LIMIT 1",
                        &[&class, &obj],
                    )
                    .map_err(&e)?
                    .map(|r| match r.get::<_, Option<String>>(1) {
                        Some(h) => h,
                        None => format!("by another session of the state database (pid {})", r.get::<_, i32>(0)),
                    })
                    .unwrap_or_else(|| "by another session of the state database".into());
                bail!(
                    "the state is locked: {}{}",
                    self.url.mask(&who),
                    if timeout.is_zero() {
                        " (use --lock-timeout to wait for it)".to_owned()
                    } else {
                        format!(" (waited {}s)", timeout.as_secs())
                    }
                );
            }
            std::thread::sleep(
                Duration::from_millis(250).min(timeout.saturating_sub(start.elapsed()).max(Duration::from_millis(10))),
            );
        }
    }

    fn meta(&self) -> Result<StateMeta> {
        let row = self
            .conn()?
            .query_one("SELECT lineage, serial FROM dotmac_state", &[])
            .map_err(self.err("reading the serial"))?;
        Ok(StateMeta { lineage: row.get(0), serial: row.get::<_, i64>(1) as u64 })
    }

    fn records(&self, scope: &TenantScope) -> Result<Vec<Record>> {
        let mut c = self.conn()?;
        let e = self.err("reading the records");
        let tenants: Vec<&str>;
        let (sql, params): (&str, Vec<&(dyn ToSql + Sync)>) = match scope {
            TenantScope::All => ("SELECT address, fingerprint, serial FROM dotmac_resources", vec![]),
            TenantScope::Only(set) => {
                tenants = set.iter().map(String::as_str).collect();
                ("SELECT address, fingerprint, serial FROM dotmac_resources WHERE tenant = ANY($1)", vec![&tenants])
            }
        };
        // One query, all rows in one go (a row-by-row iterator costs a runtime round per row).
        let rows = c.query(sql, &params).map_err(&e)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.extend(Record::from_row(row.get(0), row.get(1), row.get(2)));
        }
        Ok(out)
    }

    fn recorded_tenants(&self) -> Result<BTreeSet<String>> {
        let mut c = self.conn()?;
        let rows =
            c.query("SELECT DISTINCT tenant FROM dotmac_resources", &[]).map_err(self.err("reading the records"))?;
        Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
    }

    fn contents(&self, addresses: &[Address]) -> Result<HashMap<Address, Content>> {
        let mut out = HashMap::new();
        if addresses.is_empty() {
            return Ok(out);
        }
        let by_text: HashMap<String, &Address> = addresses.iter().map(|a| (a.to_string(), a)).collect();
        let keys: Vec<&str> = by_text.keys().map(String::as_str).collect();
        let mut c = self.conn()?;
        for chunk in keys.chunks(CHUNK) {
            let rows = c
                .query(
                    "SELECT address, content::text FROM dotmac_resources WHERE address = ANY($1) AND content IS NOT NULL",
                    &[&chunk],
                )
                .map_err(self.err("reading recorded content"))?;
            for row in rows {
                let text: String = row.get(1);
                if let Some(a) = by_text.get(row.get::<_, &str>(0))
                    && let Ok(content) = serde_json::from_str::<Content>(&text)
                {
                    out.insert((*a).clone(), content);
                }
            }
        }
        Ok(out)
    }

    fn begin_apply(&self) -> Result<u64> {
        let mut c = self.conn()?;
        let e = self.err("moving the serial");
        let mut tx = c.transaction().map_err(&e)?;
        self.check_lock(&mut tx)?;
        let serial: i64 =
            tx.query_one("UPDATE dotmac_state SET serial = serial + 1 RETURNING serial", &[]).map_err(&e)?.get(0);
        tx.commit().map_err(&e)?;
        Ok(serial as u64)
    }

    fn commit_parts(&self, serial: u64, parts: &[Commit]) -> Result<()> {
        if parts.iter().all(Commit::is_empty) {
            return Ok(());
        }
        let upserts: Vec<&super::Upsert> = parts.iter().flat_map(|c| &c.upserts).collect();
        let audit: Vec<&AuditEntry> = parts.iter().flat_map(|c| &c.audit).collect();
        let clear_journal: Vec<&String> = parts.iter().flat_map(|c| &c.clear_journal).collect();
        let drop_journal: Vec<&(String, String)> = parts.iter().flat_map(|c| &c.drop_journal).collect();
        let mut conn = self.conn()?;
        let e = self.err("recording the apply");
        let mut tx = conn.transaction().map_err(&e)?;
        self.check_lock(&mut tx)?;
        let now = jiff::Timestamp::now().to_string();
        let serial = serial as i64;
        // One row per address, the last upsert winning (as one statement cannot touch a row twice).
        let mut last: HashMap<&str, usize> = HashMap::new();
        let texts: Vec<&str> = upserts.iter().map(|u| u.address_text.as_str()).collect();
        for (i, t) in texts.iter().enumerate() {
            last.insert(t, i);
        }
        let keep: Vec<usize> = (0..texts.len()).filter(|i| last.get(&texts[*i]) == Some(i)).collect();
        for chunk in keep.chunks(CHUNK) {
            let mut address = Vec::with_capacity(chunk.len());
            let mut tenant = Vec::with_capacity(chunk.len());
            let mut provider = Vec::with_capacity(chunk.len());
            let mut fingerprint: Vec<&str> = Vec::with_capacity(chunk.len());
            let mut content: Vec<Option<&str>> = Vec::with_capacity(chunk.len());
            for &i in chunk {
                let u = upserts[i];
                address.push(texts[i]);
                tenant.push(u.address.tenant.as_str());
                provider.push(u.address.provider().as_str());
                fingerprint.push(u.fingerprint_text.as_str());
                content.push(u.content.as_deref());
            }
            tx.execute(
                "INSERT INTO dotmac_resources(address, tenant, provider, fingerprint, content, applied_at, serial)
                 SELECT a, t, p, f, c::json, $6, $7
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) AS u(a, t, p, f, c)
                 ON CONFLICT (address) DO UPDATE SET fingerprint = excluded.fingerprint, content = excluded.content,
                    applied_at = excluded.applied_at, serial = excluded.serial",
                &[&address, &tenant, &provider, &fingerprint, &content, &now, &serial],
            )
            .map_err(&e)?;
        }
        let forget: Vec<String> = parts.iter().flat_map(|c| &c.forget).map(Address::to_string).collect();
        for chunk in forget.chunks(CHUNK) {
            tx.execute("DELETE FROM dotmac_resources WHERE address = ANY($1)", &[&chunk]).map_err(&e)?;
        }
        for chunk in audit.chunks(CHUNK) {
            let col = |f: fn(&AuditEntry) -> &str| chunk.iter().map(|a| f(a)).collect::<Vec<&str>>();
            let json = |f: fn(&AuditEntry) -> &Option<JsonText>| {
                chunk.iter().map(|a| f(a).as_ref().map(JsonText::as_str)).collect::<Vec<Option<&str>>>()
            };
            // PostgreSQL text cannot hold NUL; a message from a provider might.
            let message: Vec<Option<String>> =
                chunk.iter().map(|a| a.message.as_ref().map(|m| m.replace('\0', "\u{fffd}"))).collect();
            tx.execute(
                "INSERT INTO dotmac_audit(time, correlation_id, actor, tenant, address, action, risk, outcome,
                    before, after, message)
                 SELECT tm, ci, ac, te, ad, an, ri, ou, be::json, af::json, me
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                    $8::text[], $9::text[], $10::text[], $11::text[]) WITH ORDINALITY
                    AS u(tm, ci, ac, te, ad, an, ri, ou, be, af, me, n)
                 ORDER BY n",
                &[
                    &col(|a| &a.time),
                    &col(|a| &a.correlation_id),
                    &col(|a| &a.actor),
                    &col(|a| &a.tenant),
                    &col(|a| &a.address),
                    &col(|a| &a.action),
                    &col(|a| &a.risk),
                    &col(|a| &a.outcome),
                    &json(|a| &a.before),
                    &json(|a| &a.after),
                    &message,
                ],
            )
            .map_err(&e)?;
        }
        if parts.iter().any(|c| c.clear_whole_journal) {
            tx.execute("DELETE FROM dotmac_journal", &[]).map_err(&e)?;
        }
        for chunk in clear_journal.chunks(CHUNK) {
            tx.execute("DELETE FROM dotmac_journal WHERE address = ANY($1)", &[&chunk]).map_err(&e)?;
        }
        for chunk in drop_journal.chunks(CHUNK) {
            let addresses: Vec<&str> = chunk.iter().map(|(a, _)| a.as_str()).collect();
            let plans: Vec<&str> = chunk.iter().map(|(_, p)| p.as_str()).collect();
            tx.execute(
                "DELETE FROM dotmac_journal WHERE (address, plan_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                &[&addresses, &plans],
            )
            .map_err(&e)?;
        }
        tx.commit().map_err(&e)?;
        Ok(())
    }

    fn journal_add(&self, entries: &[JournalEntry]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        // One statement may not touch a row twice: of entries for the same address and
        // plan, the last one is written.
        let mut last: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, j) in entries.iter().enumerate() {
            last.insert((j.address.as_str(), &*j.plan_id), i);
        }
        let keep: Vec<&JournalEntry> = entries
            .iter()
            .enumerate()
            .filter(|(i, j)| last.get(&(j.address.as_str(), &*j.plan_id)) == Some(i))
            .map(|(_, j)| j)
            .collect();
        let mut c = self.conn()?;
        let e = self.err("journaling the writes");
        // One statement needs no transaction of its own (one tenant's writes: the usual case).
        if keep.len() <= CHUNK {
            journal_rows(&mut *c, &keep).map_err(&e)?;
            return Ok(());
        }
        let mut tx = c.transaction().map_err(&e)?;
        for chunk in keep.chunks(CHUNK) {
            journal_rows(&mut tx, chunk).map_err(&e)?;
        }
        tx.commit().map_err(&e)?;
        Ok(())
    }

    fn journal(&self) -> Result<Vec<JournalEntry>> {
        let rows = self
            .conn()?
            .query(
                "SELECT address, plan_id, action, intended, started_at FROM dotmac_journal
                 ORDER BY address, started_at, plan_id",
                &[],
            )
            .map_err(self.err("reading the journal"))?;
        Ok(rows
            .iter()
            .map(|r| JournalEntry {
                address: r.get(0),
                plan_id: r.get::<_, &str>(1).into(),
                action: std::borrow::Cow::Owned(r.get(2)),
                intended: r.get(3),
                started_at: r.get::<_, &str>(4).into(),
            })
            .collect())
    }

    fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>> {
        let since = q.since.clone().unwrap_or_default();
        let limit = q.limit.map(|l| l.min(i64::MAX as usize) as i64);
        let sql = format!(
            "SELECT id, time, correlation_id, actor, tenant, address, action, risk, outcome, before::text,
                after::text, message
             FROM dotmac_audit
             WHERE time >= $1 AND (cardinality($2::text[]) = 0 OR tenant = ANY($2))
               AND ($4::bigint IS NULL OR id < $4) AND ($5::text IS NULL OR action = $5)
               AND ($6::text IS NULL OR outcome = $6) AND ($7::text IS NULL OR actor = $7)
             ORDER BY id {} LIMIT $3",
            if q.newest { "DESC" } else { "ASC" }
        );
        let rows = self
            .conn()?
            .query(&sql, &[&since, &q.tenants, &limit, &q.before, &q.action, &q.outcome, &q.actor])
            .map_err(self.err("reading the audit log"))?;
        let json = |t: Option<String>| t.and_then(JsonText::parse);
        let mut entries: Vec<AuditEntry> = rows
            .iter()
            .map(|r| AuditEntry {
                id: r.get(0),
                time: r.get::<_, String>(1).into(),
                correlation_id: r.get::<_, String>(2).into(),
                actor: r.get::<_, String>(3).into(),
                tenant: r.get::<_, String>(4).into(),
                address: r.get(5),
                action: r.get::<_, String>(6).into(),
                risk: r.get::<_, String>(7).into(),
                outcome: r.get::<_, String>(8).into(),
                before: json(r.get(9)),
                after: json(r.get(10)),
                message: r.get(11),
            })
            .collect();
        if q.newest {
            entries.reverse();
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_masked_in_every_form() {
        let u = PgUrl::parse("postgres://app:s%40cret-pw@db.example:5433/state?sslmode=require&application_name=x")
            .unwrap();
        assert_eq!(u.shown(), "postgres://app:***@db.example:5433/state?sslmode=require&application_name=x");
        assert_eq!(u.mask("a s@cret-pw and s%40cret-pw"), "a *** and ***");
        assert_eq!(u.config.get_password(), Some(&b"s@cret-pw"[..]));
        assert_eq!(u.tls, TlsMode::Require);
        let u = PgUrl::parse("postgresql://app@db/state?password=hunter22&sslmode=disable").unwrap();
        assert!(!u.shown().contains("hunter22"), "{}", u.shown());
        assert_eq!(u.tls, TlsMode::Disable);
    }

    #[test]
    fn bad_urls_are_named_without_their_password() {
        let e = PgUrl::parse("mysql://app:pw@db/x").err().unwrap().to_string();
        assert!(e.contains("postgres://"), "{e}");
        let e = PgUrl::parse("postgres://app:topsecret@db/x?sslmode=verify-ca").err().unwrap().to_string();
        assert!(e.contains("verify-full") && !e.contains("topsecret"), "{e}");
        let e = PgUrl::parse("postgres://app:topsecret@db/x?bogus=1").err().unwrap().to_string();
        assert!(e.contains("app:***@db") && !e.contains("topsecret"), "{e}");
    }

    #[test]
    fn the_url_comes_from_the_variable_url_env_names() {
        let s = StateSettings {
            backend: "postgres".into(),
            dir: None,
            url: None,
            url_env: Some("DOTMAC_TEST_UNSET_STATE_URL".into()),
        };
        let e = url_from_settings(&s).err().unwrap().to_string();
        assert!(e.contains("$DOTMAC_TEST_UNSET_STATE_URL") && e.contains("not set"), "{e}");
        let s = StateSettings { url_env: None, ..s };
        assert!(url_from_settings(&s).err().unwrap().to_string().contains("url_env"));
        let s = StateSettings { url: Some("postgres://db/x".into()), ..s };
        assert_eq!(url_from_settings(&s).unwrap(), "postgres://db/x");
    }
}
