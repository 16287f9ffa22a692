//! `kind = "http"`: the management platform and the tenants' ISP Framework instances, over
//! the HTTP contract of `../shared/spec/platform-api.md`.
//!
//! This module is the shared client: the envelope (`{"success", "data"|"error"}`), the
//! headers every call carries, timeouts, retries (`Retry-After` on 429/503, exponential
//! backoff with jitter on other 5xx and transport errors, at most [`TRIES`] tries), 401/403
//! failing fast with the token variable's name, bodies that are not the envelope reported with
//! URL and status, and a circuit breaker per target. `management.rs` and `isp.rs` map the
//! engine's resources onto the calls.
//!
//! The `Provider` trait is synchronous; the client is async (reqwest) and runs on one small
//! tokio runtime shared by the http providers. Provider methods block on it, so they must be
//! called from ordinary threads, never from inside a tokio runtime.
//!
//! The token is read once from the variable `token_env` names; it is sent only in the
//! `Authorization` header (marked sensitive) and removed from any text a server sends back
//! before that text reaches an error or a log.

pub mod breaker;
pub mod isp;
pub mod management;

use super::secret_value::SecretValue;
use super::{ProviderError, Result};
use crate::load::settings::{ProviderSettings, parse_duration};
use breaker::Breaker;
use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::Value;
use std::sync::{OnceLock, RwLock};
use std::time::{Duration, Instant};

/// Tries per call (the first and two retries), for reads and for writes carrying `If-Match`.
pub const TRIES: u32 = 3;
/// The longest `Retry-After` honoured; a server asking for more fails the call.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Calls in flight at once when reading many tenants.
pub const READ_CONCURRENCY: usize = 16;

/// The settings of one http provider (`[providers.management]` or `[providers.isp]`).
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// `[providers.<slot>]`, for messages.
    pub slot: String,
    pub url: String,
    pub token_env: String,
    pub role: String,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub ca_cert: Option<String>,
    pub breaker_failures: u32,
    pub breaker_reset_after: Duration,
}

impl HttpSettings {
    pub fn from_settings(slot: &str, p: &ProviderSettings) -> anyhow::Result<HttpSettings> {
        let need = |key: &str| {
            p.str(key).map(str::to_owned).ok_or_else(|| {
                anyhow::anyhow!("[providers.{slot}] kind = \"http\" needs `{key}` (see the README, http providers)")
            })
        };
        let duration = |key: &str, default: Duration| -> anyhow::Result<Duration> {
            match p.str(key) {
                None => Ok(default),
                Some(s) => parse_duration(s)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| anyhow::anyhow!("[providers.{slot}] {key} = \"{s}\" is not a duration such as 5s")),
            }
        };
        let breaker = p.options.get("circuit_breaker").and_then(Value::as_object);
        let breaker_failures = breaker.and_then(|b| b.get("failures")).and_then(Value::as_u64).unwrap_or(5);
        let breaker_reset_after = match breaker.and_then(|b| b.get("reset_after")).and_then(Value::as_str) {
            None => Duration::from_secs(30),
            Some(s) => parse_duration(s).ok_or_else(|| {
                anyhow::anyhow!("[providers.{slot}] circuit_breaker.reset_after = \"{s}\" is not a duration")
            })?,
        };
        let url = need("url")?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            anyhow::bail!("[providers.{slot}] url = \"{url}\" must start with https:// (or http://)");
        }
        Ok(HttpSettings {
            slot: slot.to_owned(),
            url: url.trim_end_matches('/').to_owned(),
            token_env: need("token_env")?,
            role: p.str("role").unwrap_or("management-admin").to_owned(),
            connect_timeout: duration("connect_timeout", Duration::from_secs(5))?,
            timeout: duration("timeout", Duration::from_secs(30))?,
            ca_cert: p.str("ca_cert").map(str::to_owned),
            breaker_failures: u32::try_from(breaker_failures).unwrap_or(u32::MAX).max(1),
            breaker_reset_after,
        })
    }
}

/// The runtime the http providers' calls run on.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dotmac-http")
            .enable_all()
            .build()
            .expect("a tokio runtime can be started")
    })
}

/// Installs the process's TLS crypto provider (ring) unless one is installed already.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A conditional write: `If-Match: <etag>`, or `If-None-Match: *` for a create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    None,
    IfMatch(String),
    IfNoneMatchAny,
}

/// An answer in the envelope: `data` on success, the error otherwise (4xx the caller
/// interprets: 404 absent, 412 moved, ...).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub method: Method,
    pub url: String,
    pub outcome: std::result::Result<Value, ApiError>,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: String,
    pub message: String,
}

impl Reply {
    pub fn is(&self, status: u16) -> bool {
        self.status == status
    }

    /// The data of a successful answer; any other answer is an error naming the call.
    pub fn data(self, label: &str) -> Result<Value> {
        match self.outcome {
            Ok(v) => Ok(v),
            Err(e) => Err(ProviderError::Other(format!(
                "{label}: {} {} answered {}: {} {}",
                self.method,
                self.url,
                status_text(self.status),
                e.code,
                e.message
            ))),
        }
    }
}

pub(crate) fn status_text(status: u16) -> String {
    match reqwest::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()) {
        Some(r) => format!("{status} {r}"),
        None => status.to_string(),
    }
}

/// One platform API: its base URL, credentials, timeouts and breaker.
pub struct Client {
    http: reqwest::Client,
    /// "management platform", "ISP instance": for messages.
    pub label: &'static str,
    pub settings: HttpSettings,
    token: SecretValue,
    auth: HeaderValue,
    correlation: RwLock<String>,
    breaker: Breaker,
}

impl Client {
    pub fn new(label: &'static str, settings: HttpSettings) -> anyhow::Result<Client> {
        install_crypto_provider();
        let var = &settings.token_env;
        let slot = &settings.slot;
        let token = std::env::var(var)
            .map_err(|_| anyhow::anyhow!("[providers.{slot}] token_env names ${var}, which is not set"))?;
        let token = token.trim().to_owned();
        if token.is_empty() {
            anyhow::bail!("[providers.{slot}] token_env names ${var}, which is empty");
        }
        let mut auth = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| anyhow::anyhow!("${var} holds characters that cannot be sent in a header"))?;
        auth.set_sensitive(true);
        let mut builder = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.timeout)
            .user_agent(concat!("dotmac-gitops/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &settings.ca_cert {
            let pem = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("[providers.{slot}] ca_cert = \"{path}\" cannot be read: {e}"))?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                anyhow::anyhow!("[providers.{slot}] ca_cert = \"{path}\" is not a PEM certificate: {e}")
            })?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder.build().map_err(|e| anyhow::anyhow!("cannot set up the HTTP client: {e}"))?;
        Ok(Client {
            http,
            label,
            breaker: Breaker::new(settings.breaker_failures, settings.breaker_reset_after),
            settings,
            token: SecretValue::from_bytes(token.into_bytes()),
            auth,
            correlation: RwLock::new(crate::plan::new_id("dotmac-gitops")),
        })
    }

    pub fn set_correlation_id(&self, id: &str) {
        *self.correlation.write().unwrap_or_else(|p| p.into_inner()) = id.to_owned();
    }

    pub fn correlation_id(&self) -> String {
        self.correlation.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `text` with the token removed, for anything a server or a library says.
    pub fn redact(&self, text: &str) -> String {
        match std::str::from_utf8(self.token.expose()) {
            Ok(t) if !t.is_empty() => text.replace(t, "(token)"),
            _ => text.to_owned(),
        }
    }

    fn headers(&self, cond: &Cond) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(reqwest::header::AUTHORIZATION, self.auth.clone());
        if let Ok(v) = HeaderValue::from_str(&self.settings.role) {
            h.insert("x-platform-role", v);
        }
        if let Ok(v) = HeaderValue::from_str(&self.correlation_id()) {
            h.insert("x-correlation-id", v);
        }
        h.insert(reqwest::header::ACCEPT, HeaderValue::from_static("application/json"));
        match cond {
            Cond::None => {}
            Cond::IfMatch(etag) => {
                if let Ok(v) = HeaderValue::from_str(etag) {
                    h.insert(reqwest::header::IF_MATCH, v);
                }
            }
            Cond::IfNoneMatchAny => {
                h.insert(reqwest::header::IF_NONE_MATCH, HeaderValue::from_static("*"));
            }
        }
        h
    }

    /// Makes one call, with retries, the breaker of `target` and the envelope checked.
    /// Returns 2xx answers and 4xx answers in the envelope; everything else is an error.
    pub async fn call(
        &self,
        target: &str,
        method: Method,
        url: &str,
        body: Option<&Value>,
        cond: Cond,
    ) -> Result<Reply> {
        let label = self.label;
        let mut last = String::new();
        for attempt in 1..=TRIES {
            if let Err(r) = self.breaker.allow(target, Instant::now()) {
                let mut msg = format!(
                    "{label} {target}: circuit breaker open after {} consecutive failures; no call before {}s have passed",
                    r.consecutive_failures,
                    r.retry_in.as_secs().max(1)
                );
                if !last.is_empty() {
                    msg.push_str(&format!(" (last: {last})"));
                }
                return Err(ProviderError::Unavailable(msg));
            }
            let mut req = self.http.request(method.clone(), url).headers(self.headers(&cond));
            if let Some(b) = body {
                req = req.json(b);
            }
            tracing::debug!(method = %method, url, attempt, "http call");
            let sent = req.send().await;
            let (status, retry_after, bytes) = match sent {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_retry_after);
                    match resp.bytes().await {
                        Ok(b) => (status, retry_after, b),
                        Err(e) => {
                            last = self.transport_error(&method, url, &e);
                            self.failed(target);
                            self.pause(attempt, None, &last).await?;
                            continue;
                        }
                    }
                }
                Err(e) => {
                    last = self.transport_error(&method, url, &e);
                    self.failed(target);
                    self.pause(attempt, None, &last).await?;
                    continue;
                }
            };
            tracing::debug!(method = %method, url, status, "http answer");
            if status >= 500 {
                self.failed(target);
            } else {
                self.breaker.success(target);
            }
            match status {
                401 | 403 => return Err(self.denied(status, &method, url, &bytes)),
                429 | 500..=599 => {
                    let envelope = parse_envelope(&bytes).and_then(|o| o.err());
                    last = format!(
                        "{method} {url} answered {}{}",
                        status_text(status),
                        envelope.map(|e| format!(": {} {}", e.code, self.redact(&e.message))).unwrap_or_default()
                    );
                    let honour = if status == 429 || status == 503 { retry_after } else { None };
                    self.pause(attempt, honour, &last).await?;
                    continue;
                }
                _ => {}
            }
            return match parse_envelope(&bytes) {
                Some(outcome) => Ok(Reply {
                    status,
                    method,
                    url: url.to_owned(),
                    outcome: outcome.map_err(|e| ApiError { code: e.code, message: self.redact(&e.message) }),
                }),
                None => Err(ProviderError::Other(format!(
                    "{label}: {method} {url} answered {} with a body that is not the platform API's envelope \
                     ({{\"success\", \"data\"|\"error\"}}): {}; is [providers.{}] url right?",
                    status_text(status),
                    self.snippet(&bytes),
                    self.settings.slot
                ))),
            };
        }
        Err(ProviderError::Unavailable(format!("{label}: {last} (gave up after {TRIES} tries)")))
    }

    /// Waits before the next try, or fails when there is none.
    async fn pause(&self, attempt: u32, retry_after: Option<Duration>, last: &str) -> Result<()> {
        if attempt >= TRIES {
            return Err(ProviderError::Unavailable(format!("{}: {last} (gave up after {TRIES} tries)", self.label)));
        }
        let wait = match retry_after {
            Some(d) if d > MAX_RETRY_AFTER => {
                return Err(ProviderError::Unavailable(format!(
                    "{}: {last}, asking to retry after {}s (longer than the {}s this engine waits)",
                    self.label,
                    d.as_secs(),
                    MAX_RETRY_AFTER.as_secs()
                )));
            }
            Some(d) => d,
            None => backoff(attempt),
        };
        tracing::info!(wait_ms = wait.as_millis() as u64, attempt, "{}: {last}; retrying", self.label);
        tokio::time::sleep(wait).await;
        Ok(())
    }

    fn failed(&self, target: &str) {
        if self.breaker.failure(target, Instant::now()) {
            tracing::warn!("{} {target}: circuit breaker opened", self.label);
        }
    }

    fn transport_error(&self, method: &Method, url: &str, e: &reqwest::Error) -> String {
        let what = if e.is_timeout() {
            format!("timed out (timeout {}s)", self.settings.timeout.as_secs_f64())
        } else if e.is_connect() {
            "could not connect".to_owned()
        } else {
            "failed".to_owned()
        };
        // The innermost cause says what happened ("Connection refused", ...).
        let mut cause: &dyn std::error::Error = e;
        while let Some(inner) = cause.source() {
            cause = inner;
        }
        self.redact(&format!("{method} {url} {what}: {cause}"))
    }

    fn denied(&self, status: u16, method: &Method, url: &str, body: &[u8]) -> ProviderError {
        let var = &self.settings.token_env;
        let said = match parse_envelope(body) {
            Some(Err(e)) => format!(" ({} {})", e.code, self.redact(&e.message)),
            _ => String::new(),
        };
        let why = if status == 401 {
            format!("the token in ${var} was not accepted; set ${var} to a valid token")
        } else {
            format!(
                "the token in ${var} is not allowed this call (X-Platform-Role: {}); give it the role or use another token",
                self.settings.role
            )
        };
        ProviderError::Denied(format!(
            "{}: {method} {url} answered {}{said}: {why} (not retried)",
            self.label,
            status_text(status)
        ))
    }

    fn snippet(&self, body: &[u8]) -> String {
        if body.is_empty() {
            return "an empty body".into();
        }
        let text = String::from_utf8_lossy(body);
        let mut s: String = text.chars().take(120).map(|c| if c.is_control() && c != ' ' { ' ' } else { c }).collect();
        if text.chars().count() > 120 {
            s.push('…');
        }
        format!("`{}`", self.redact(s.trim()))
    }

    /// Runs `fut` on the shared runtime from a synchronous provider method.
    pub fn block_on<F: std::future::Future>(fut: F) -> F::Output {
        runtime().block_on(fut)
    }
}

/// A tenant id as a URL path segment: the repository format makes them DNS labels; anything
/// else is refused rather than escaped.
pub fn path_segment(tenant: &str) -> Result<&str> {
    let ok = !tenant.is_empty()
        && tenant.len() <= 63
        && tenant.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok { Ok(tenant) } else { Err(ProviderError::Other(format!("tenant id `{tenant}` cannot be used in a URL"))) }
}

/// The envelope: `Some(Ok(data))`, `Some(Err(error))`, or `None` when the body is not one.
fn parse_envelope(body: &[u8]) -> Option<std::result::Result<Value, ApiError>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let obj = v.as_object()?;
    match obj.get("success")? {
        Value::Bool(true) => Some(Ok(obj.get("data").cloned().unwrap_or(Value::Null))),
        Value::Bool(false) => {
            let e = obj.get("error")?.as_object()?;
            let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
            Some(Err(ApiError { code: text("code"), message: text("message") }))
        }
        _ => None,
    }
}

/// `Retry-After`: seconds, or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = jiff::fmt::rfc2822::DateTimeParser::new().parse_timestamp(v).ok()?;
    let ms = at.as_millisecond() - jiff::Timestamp::now().as_millisecond();
    Some(Duration::from_millis(ms.max(0) as u64))
}

/// Exponential backoff with jitter: 250 ms, 500 ms, 1 s, ... (at most 4 s), plus up to half
/// of that at random, so that many clients do not retry in step.
fn backoff(attempt: u32) -> Duration {
    let base = 250u64.saturating_mul(1 << attempt.saturating_sub(1).min(4)).min(4000);
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    let jitter = u64::from(u16::from_le_bytes(b)) % (base / 2 + 1);
    Duration::from_millis(base + jitter)
}

/// Runs `f` over `items` with at most [`READ_CONCURRENCY`] in flight, keeping each item's
/// result (a failure of one item never hides the others').
pub async fn each<T, R, F, Fut>(items: Vec<T>, f: F) -> Vec<(T, R)>
where
    T: Clone + Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = R> + Send + 'static,
{
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(READ_CONCURRENCY));
    let mut set = tokio::task::JoinSet::new();
    for (i, item) in items.iter().cloned().enumerate() {
        let fut = f(item);
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            (i, fut.await)
        });
    }
    let mut out: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        if let Ok((i, r)) = r {
            out[i] = Some(r);
        }
    }
    items.into_iter().zip(out).filter_map(|(t, r)| r.map(|r| (t, r))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes() {
        assert!(matches!(parse_envelope(br#"{"success": true, "data": {"a": 1}}"#), Some(Ok(v)) if v["a"] == 1));
        let e = parse_envelope(br#"{"success": false, "error": {"code": "NOT_FOUND", "message": "no"}}"#);
        assert!(matches!(e, Some(Err(ApiError { code, .. })) if code == "NOT_FOUND"));
        assert!(parse_envelope(b"<html>502 Bad Gateway</html>").is_none());
        assert!(parse_envelope(br#"{"data": 1}"#).is_none());
        assert!(parse_envelope(br#"{"success": false}"#).is_none());
    }

    #[test]
    fn retry_after_and_backoff() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon"), None);
        for attempt in 1..=6 {
            let d = backoff(attempt).as_millis() as u64;
            let base = (250u64 << (attempt - 1).min(4)).min(4000);
            assert!(d >= base && d <= base + base / 2, "attempt {attempt}: {d} ms");
        }
    }
}
