//! The HTTP side of the OpenBao provider: one place that sends requests (through `vaultrs`),
//! classifies failures, retries what may succeed later, checks the server's health and keeps
//! the token alive.
//!
//! - **Retries** with exponential backoff and jitter on connection errors, timeouts, 5xx and
//!   429 answers; never on 403 (a token or policy problem does not fix itself) or 4xx.
//!   A write that is not idempotent (a check-and-set secret write) is retried only when the
//!   request surely did not reach the server (the connection was refused) or the server
//!   answered that it failed (5xx): after a timeout it may have landed, so the error says so.
//! - **Health**: `vaultrs::sys::health` cannot parse OpenBao's answer, so `/v1/sys/health` is
//!   called directly, once per process, before the first request: a sealed or uninitialised
//!   server is a clear error instead of a string of 503s.
//! - **Token**: looked up once (its policies go into 403 messages), renewed at first use when
//!   it is renewable, and again when half of its lease has passed.
//! - **Secrecy**: messages are built here from the status code, the server's error strings
//!   and the API path; the token (and any value the caller names) is cut out of them, and no
//!   response body, request body or `Debug` form of a `vaultrs` type is ever printed.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vaultrs::client::VaultClient;
use vaultrs::error::ClientError;

/// How many times a request is tried in all.
pub const ATTEMPTS: u32 = 4;
/// The first backoff delay; it doubles on every retry, up to `MAX_DELAY`.
const BASE_DELAY: Duration = Duration::from_millis(250);
const MAX_DELAY: Duration = Duration::from_secs(5);

/// What went wrong with one request, as the provider needs to tell it apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// 404: the path does not exist (KV v2 also answers so for a deleted version).
    NotFound,
    /// KV v2 refused a write whose `cas` did not match the current version.
    CasMismatch,
    /// 403: retrying will not help.
    Denied(String),
    /// The server could not be reached or failed; it may work later.
    Unavailable(String),
    Other(String),
}

impl Failure {
    /// The failure as reported once retrying stops: an unavailable server says how many
    /// attempts were made.
    fn after(self, attempts: u32) -> Failure {
        match self {
            Failure::Unavailable(m) if attempts > 1 => {
                Failure::Unavailable(format!("{m} (gave up after {attempts} attempts)"))
            }
            f => f,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Failure::NotFound => "not found".into(),
            Failure::CasMismatch => "check-and-set version mismatch".into(),
            Failure::Denied(m) | Failure::Unavailable(m) | Failure::Other(m) => m.clone(),
        }
    }
}

/// Whether a request may be sent again after a failure that left its fate unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotent {
    /// Reads, lists, policy writes, deletes: sending twice does no harm.
    Yes,
    /// Check-and-set writes: a second send after a lost answer would be refused by `cas`
    /// and look like someone else's write.
    No,
}

/// One request, for messages: what it does and the API path it does it on.
pub struct Op<'a> {
    pub verb: &'a str,
    pub path: String,
    pub idempotent: Idempotent,
}

impl<'a> Op<'a> {
    pub fn read(verb: &'a str, path: String) -> Self {
        Op { verb, path, idempotent: Idempotent::Yes }
    }
    pub fn write(verb: &'a str, path: String) -> Self {
        Op { verb, path, idempotent: Idempotent::No }
    }
}

/// What the token lookup told us.
#[derive(Debug, Clone, Default)]
struct TokenInfo {
    policies: Vec<String>,
}

pub struct Transport {
    pub vault: VaultClient,
    http: reqwest::Client,
    pub address: String,
    pub token_env: String,
    /// Only to cut it out of messages; never printed.
    token: String,
    timeout: Duration,
    attempts: u32,
    base_delay: Duration,
    session: tokio::sync::OnceCell<TokenInfo>,
    /// When the token is to be renewed next (renewable tokens only).
    renew_at: Mutex<Option<Instant>>,
    renewing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("address", &self.address)
            .field("token_env", &self.token_env)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Transport {
    pub fn new(vault: VaultClient, address: String, token_env: String, token: String, timeout: Duration) -> Self {
        let http = vault.http.http.clone();
        Transport {
            vault,
            http,
            address,
            token_env,
            token,
            timeout,
            attempts: ATTEMPTS,
            base_delay: BASE_DELAY,
            session: tokio::sync::OnceCell::new(),
            renew_at: Mutex::new(None),
            renewing: tokio::sync::Mutex::new(()),
        }
    }

    /// Cuts the token and `value` (when given) out of a message.
    pub fn scrub(&self, msg: String, value: Option<&[u8]>) -> String {
        let mut out = msg;
        if self.token.len() >= 4 && out.contains(&self.token) {
            out = out.replace(&self.token, "(token)");
        }
        if let Some(v) = value.and_then(|v| std::str::from_utf8(v).ok()).filter(|v| !v.is_empty())
            && out.contains(v)
        {
            out = out.replace(v, "(sensitive)");
        }
        out
    }

    /// Sends one request (through `f`), after the session is set up, with retries.
    pub async fn call<T, F, Fut>(&self, op: &Op<'_>, f: F) -> Result<T, Failure>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let info = self.session().await?;
        self.maybe_renew().await;
        let mut attempt = 1;
        loop {
            let (failure, retry) = match f().await {
                Ok(v) => return Ok(v),
                Err(e) => self.classify(e, op, &info),
            };
            if !retry || attempt >= self.attempts {
                return Err(failure.after(attempt));
            }
            let delay = self.backoff(attempt);
            tracing::warn!(
                "OpenBao: {} {} failed: {}; retrying in {} ms (attempt {} of {})",
                op.verb,
                op.path,
                failure.message(),
                delay.as_millis(),
                attempt + 1,
                self.attempts
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.base_delay.saturating_mul(1 << (attempt - 1).min(10)).min(MAX_DELAY);
        let mut b = [0u8; 2];
        let _ = getrandom::fill(&mut b);
        // ±25 % jitter, so that many clients do not retry in step.
        let jitter = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) * 0.5 + 0.75;
        base.mul_f64(jitter)
    }

    /// Turns a `vaultrs` error into a failure and whether to try again.
    fn classify(&self, e: ClientError, op: &Op<'_>, info: &TokenInfo) -> (Failure, bool) {
        let addr = &self.address;
        let what = format!("{} {}", op.verb, op.path);
        let server = |errors: &[String]| self.scrub(tidy(errors), None);
        match e {
            ClientError::APIError { code: 404, .. } => (Failure::NotFound, false),
            ClientError::APIError { code: 400, errors } if errors.iter().any(|e| e.contains("check-and-set")) => {
                (Failure::CasMismatch, false)
            }
            ClientError::APIError { code: 403, errors } => {
                let policies = if info.policies.is_empty() {
                    String::new()
                } else {
                    format!(" (its policies: {})", info.policies.join(", "))
                };
                let detail = server(&errors);
                (
                    Failure::Denied(format!(
                        "OpenBao at {addr} denied {what} (403 {}): the token in ${} is invalid or expired, or no policy of it{policies} allows this path",
                        if detail.is_empty() { "permission denied".to_owned() } else { detail },
                        self.token_env
                    )),
                    false,
                )
            }
            ClientError::APIError { code, errors } if code >= 500 || code == 429 || code == 412 => {
                let detail = server(&errors);
                let sealed = detail.to_ascii_lowercase().contains("sealed");
                let msg = if sealed {
                    format!("OpenBao at {addr} is sealed ({code}) while trying to {what}: unseal it")
                } else {
                    format!("OpenBao at {addr} failed to {what} ({code} {detail})")
                };
                (Failure::Unavailable(msg), true)
            }
            ClientError::APIError { code, errors } => {
                (Failure::Other(format!("OpenBao at {addr} refused to {what} ({code} {})", server(&errors))), false)
            }
            ClientError::RestClientError { source } => self.classify_transport(source, op),
            other => {
                // Display only: these variants carry no body, and `Debug` is never used.
                (Failure::Other(self.scrub(format!("OpenBao at {addr}: {what}: {other}"), None)), false)
            }
        }
    }

    fn classify_transport(&self, e: rustify::errors::ClientError, op: &Op<'_>) -> (Failure, bool) {
        use rustify::errors::ClientError as R;
        let addr = &self.address;
        let what = format!("{} {}", op.verb, op.path);
        match e {
            R::RequestError { source, .. } => {
                let (connect, timeout, cause) = match source.downcast_ref::<reqwest::Error>() {
                    Some(r) => (r.is_connect(), r.is_timeout(), root_cause(r)),
                    None => (false, false, source.to_string()),
                };
                let cause = self.scrub(cause, None);
                if let Some(tls) = source.downcast_ref::<reqwest::Error>().and_then(|r| self.tls_failure(r)) {
                    (tls, false)
                } else if timeout {
                    let msg = format!(
                        "OpenBao at {addr} did not answer within {:?} to {what}{}",
                        self.timeout,
                        if op.idempotent == Idempotent::No {
                            "; the write may or may not have happened: re-plan to see"
                        } else {
                            ""
                        }
                    );
                    (Failure::Unavailable(msg), op.idempotent == Idempotent::Yes)
                } else if connect {
                    (Failure::Unavailable(format!("cannot reach OpenBao at {addr} to {what}: {cause}")), true)
                } else {
                    let msg = format!("OpenBao at {addr}: {what} failed: {cause}");
                    (Failure::Unavailable(msg), op.idempotent == Idempotent::Yes)
                }
            }
            R::ServerResponseError { code, .. } => {
                // A body that is not the API's JSON (a proxy's page, say): never printed.
                let f = format!("OpenBao at {addr} answered {code} to {what}");
                if code >= 500 || code == 429 {
                    (Failure::Unavailable(f), true)
                } else if code == 403 {
                    (Failure::Denied(format!("{f}: the token in ${} is not allowed", self.token_env)), false)
                } else if code == 404 {
                    (Failure::NotFound, false)
                } else {
                    (Failure::Other(f), false)
                }
            }
            R::ResponseError { .. } => (
                Failure::Unavailable(format!("OpenBao at {addr}: the answer to {what} could not be read")),
                op.idempotent == Idempotent::Yes,
            ),
            // Parse errors carry the response body (which may hold a value): only the
            // variant's fixed text is used.
            other => (Failure::Other(format!("OpenBao at {addr}: {what}: {other}")), false),
        }
    }

    /// The health check and token lookup, once per process (until they succeed).
    async fn session(&self) -> Result<TokenInfo, Failure> {
        self.session.get_or_try_init(|| self.start_session()).await.cloned()
    }

    async fn start_session(&self) -> Result<TokenInfo, Failure> {
        self.health().await?;
        let mut info = TokenInfo::default();
        match vaultrs::token::lookup_self(&self.vault).await {
            Ok(t) => {
                info.policies = t.policies.clone();
                let renewable = t.renewable.unwrap_or(false) && t.ttl > 0;
                tracing::debug!(policies = ?t.policies, ttl = t.ttl, renewable, "OpenBao token looked up");
                if renewable {
                    self.renew().await;
                }
            }
            // A token without the default policy cannot look itself up; the requests that
            // follow say clearly whether it may do what they need.
            Err(e) => tracing::debug!("OpenBao token lookup failed: {}", self.scrub(e.to_string(), None)),
        }
        Ok(info)
    }

    /// `GET /v1/sys/health`, with the same retries as any request.
    pub async fn health(&self) -> Result<(), Failure> {
        let url = format!("{}/v1/sys/health?standbyok=true&perfstandbyok=true", self.address.trim_end_matches('/'));
        let addr = &self.address;
        let mut attempt = 1;
        loop {
            let (failure, retry) = match self.http.get(&url).send().await {
                Ok(r) => match r.status().as_u16() {
                    200 | 429 | 472 | 473 => return Ok(()),
                    501 => (
                        Failure::Unavailable(format!("OpenBao at {addr} is not initialised (bao operator init)")),
                        false,
                    ),
                    503 => (
                        Failure::Unavailable(format!("OpenBao at {addr} is sealed: unseal it (bao operator unseal)")),
                        true,
                    ),
                    code => (
                        Failure::Unavailable(format!("OpenBao at {addr}: /v1/sys/health answered {code}")),
                        code >= 500,
                    ),
                },
                Err(e) => match self.tls_failure(&e) {
                    Some(tls) => (tls, false),
                    None => {
                        let why = if e.is_timeout() {
                            format!("no answer within {:?}", self.timeout)
                        } else {
                            root_cause(&e)
                        };
                        (
                            Failure::Unavailable(format!("cannot reach OpenBao at {addr}: {}", self.scrub(why, None))),
                            true,
                        )
                    }
                },
            };
            if !retry || attempt >= self.attempts {
                return Err(failure.after(attempt));
            }
            let delay = self.backoff(attempt);
            tracing::warn!(
                "OpenBao: health check failed: {}; retrying in {} ms (attempt {} of {})",
                failure.message(),
                delay.as_millis(),
                attempt + 1,
                self.attempts
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// A TLS failure (an unknown issuer, a wrong name): retrying will not help, a setting will.
    fn tls_failure(&self, e: &reqwest::Error) -> Option<Failure> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            if let Some(tls) = err.downcast_ref::<rustls::Error>() {
                return Some(Failure::Other(format!(
                    "the TLS connection to OpenBao at {} failed: {tls}; if its certificate is signed by a private CA, set [providers.secrets] ca_cert to that CA's PEM file",
                    self.address
                )));
            }
            // `io::Error::source` skips the error it wraps: step into it instead.
            cur = match err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
                Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                None => err.source(),
            };
        }
        None
    }

    async fn maybe_renew(&self) {
        let due = matches!(*self.renew_at.lock().unwrap_or_else(|p| p.into_inner()), Some(at) if Instant::now() >= at);
        if due {
            self.renew().await;
        }
    }

    /// Renews the token (one renewal at a time); schedules the next one at half its lease.
    async fn renew(&self) {
        let _one = self.renewing.lock().await;
        {
            let at = self.renew_at.lock().unwrap_or_else(|p| p.into_inner());
            if matches!(*at, Some(t) if Instant::now() < t) {
                return; // another request renewed it meanwhile
            }
        }
        let next = match vaultrs::token::renew_self(&self.vault, None).await {
            Ok(auth) => {
                tracing::info!(lease_seconds = auth.lease_duration, "OpenBao token renewed");
                (auth.renewable && auth.lease_duration > 0)
                    .then(|| Instant::now() + Duration::from_secs(auth.lease_duration / 2))
            }
            Err(e) => {
                tracing::warn!(
                    "OpenBao: renewing the token in ${} failed: {}",
                    self.token_env,
                    self.scrub(e.to_string(), None)
                );
                None
            }
        };
        *self.renew_at.lock().unwrap_or_else(|p| p.into_inner()) = next;
    }
}

/// The server's error strings on one line: OpenBao wraps them as
/// "1 error occurred:\n\t* permission denied\n\n".
pub fn tidy(errors: &[String]) -> String {
    errors
        .iter()
        .flat_map(|e| e.lines())
        .map(|l| l.trim().trim_start_matches("* ").trim())
        .filter(|l| {
            let wrapper = l.ends_with("occurred:") && l.contains(" error");
            !l.is_empty() && !wrapper
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The innermost cause of a `reqwest` error, which says what happened ("Connection refused").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last: &dyn std::error::Error = e;
    let mut parts = vec![e.to_string()];
    while let Some(s) = last.source() {
        parts.push(s.to_string());
        last = s;
    }
    parts.pop().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A transport to nowhere whose session is already set up: only the classification and
    /// retry logic run, on errors made here.
    fn transport() -> Transport {
        crate::providers::openbao::install_crypto_provider();
        let mut b = vaultrs::client::VaultClientSettingsBuilder::default();
        b.address("http://127.0.0.1:1").token("s.SECRET-TOKEN-1234").verify(true);
        let vault = VaultClient::new(b.build().unwrap()).unwrap();
        let mut t = Transport::new(
            vault,
            "http://127.0.0.1:1".into(),
            "BAO_TOKEN".into(),
            "s.SECRET-TOKEN-1234".into(),
            Duration::from_secs(1),
        );
        t.base_delay = Duration::from_millis(1);
        t.session.set(TokenInfo { policies: vec!["dotmac".into()] }).unwrap();
        t
    }

    fn api(code: u16, errors: &[&str]) -> ClientError {
        ClientError::APIError { code, errors: errors.iter().map(|e| e.to_string()).collect() }
    }

    /// Runs `call` on a request that fails with `errors` in turn, then succeeds.
    fn attempts(t: &Transport, op: &Op<'_>, errors: Vec<ClientError>) -> (Result<(), Failure>, u32) {
        let n = AtomicU32::new(0);
        let errors = std::sync::Mutex::new(errors.into_iter());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let r = rt.block_on(t.call(op, || {
            n.fetch_add(1, Ordering::SeqCst);
            let next = errors.lock().unwrap().next();
            async move { next.map_or(Ok(()), Err) }
        }));
        (r, n.load(Ordering::SeqCst))
    }

    #[test]
    fn transient_failures_are_retried_and_403_is_not() {
        let t = transport();
        let read = Op::read("read", "secret/metadata/x".into());
        // 503 twice, then success: three attempts.
        let (r, n) = attempts(&t, &read, vec![api(503, &["Vault is sealed"]), api(500, &["boom"])]);
        assert_eq!((r, n), (Ok(()), 3));
        // Always 503: gives up after ATTEMPTS, saying so.
        let (r, n) = attempts(&t, &read, (0..ATTEMPTS).map(|_| api(503, &["Vault is sealed"])).collect());
        assert_eq!(n, ATTEMPTS);
        match r {
            Err(Failure::Unavailable(m)) => assert!(m.contains("sealed") && m.contains("gave up after 4"), "{m}"),
            other => panic!("{other:?}"),
        }
        // 403: once, and the message names the variable, the path and the policies.
        let (r, n) = attempts(&t, &read, vec![api(403, &["1 error occurred:\n\t* permission denied\n"])]);
        assert_eq!(n, 1);
        match r {
            Err(Failure::Denied(m)) => {
                assert!(
                    m.contains("$BAO_TOKEN") && m.contains("secret/metadata/x") && m.contains("its policies: dotmac")
                );
                assert!(m.contains("(403 permission denied)"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        // A check-and-set refusal and a 404 are answers, not failures to retry.
        let write = Op::write("write", "secret/data/x".into());
        let cas = api(400, &["check-and-set parameter did not match the current version"]);
        assert_eq!(attempts(&t, &write, vec![cas]), (Err(Failure::CasMismatch), 1));
        assert_eq!(attempts(&t, &read, vec![api(404, &[])]), (Err(Failure::NotFound), 1));
        assert!(matches!(attempts(&t, &read, vec![api(400, &["bad"])]), (Err(Failure::Other(_)), 1)));
        // A server message quoting the token is cut.
        let (r, _) = attempts(&t, &read, vec![api(400, &["token s.SECRET-TOKEN-1234 is odd"])]);
        let m = r.unwrap_err().message();
        assert!(!m.contains("SECRET-TOKEN") && m.contains("(token)"), "{m}");
    }

    #[test]
    fn server_errors_read_on_one_line() {
        assert_eq!(tidy(&["1 error occurred:\n\t* permission denied\n\n".into()]), "permission denied");
        assert_eq!(tidy(&["2 errors occurred:\n\t* a\n\t* b\n".into(), "c".into()]), "a; b; c");
        assert_eq!(tidy(&[]), "");
    }
}
