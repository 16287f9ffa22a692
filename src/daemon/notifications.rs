//! Webhook notifications: events POSTed as JSON to the `[[notifications.webhooks]]` of
//! `dotmac.toml`, signed with HMAC-SHA256, retried with backoff, behind a circuit breaker.
//!
//! Events: `tenant.configuration.updated` and `cross_platform.consistency.violation` (the
//! management platform's names, from its webhook API), `tenant.drift.detected`,
//! `tenant.drift.healed`, `tenant.apply.failed` and `tenant.self_heal.stopped`.
//!
//! A request carries `X-DotMac-Event`, `X-DotMac-Delivery` (the event id, the same on every
//! retry) and `X-DotMac-Signature-256: sha256=<hex>`, the HMAC-SHA256 of the body under the
//! key in the variable `secret_env` names; the body's `time` and `id` let a receiver refuse
//! replays. The key is read once, kept in a wiped-on-drop buffer, and never written anywhere.
//!
//! Each webhook has its own queue and task: events go out in order; a try that fails with a
//! transport error, a timeout, 408, 429 or 5xx is retried after 1 s, 2 s, 4 s… (at most
//! 30 s, plus up to a quarter again at random) up to `max_attempts`; any other answer is
//! final. The breaker (closed → open after `failures` failures in a row → half-open after
//! `reset_after`, one trial → closed) drops events at once while open, so a dead receiver
//! never holds the daemon up. A full queue (10,000 events) drops new events; every outcome
//! is counted in `dotmac_notifications_total{event, outcome}`.

use super::metrics::Metrics;
use crate::load::settings::{NotificationSettings, WebhookSettings, parse_duration};
use crate::providers::http::breaker::Breaker;
use crate::providers::secret_value::SecretValue;
use hmac::{KeyInit, Mac};
use jiff::Timestamp;
use serde::Serialize;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub const CONFIGURATION_UPDATED: &str = "tenant.configuration.updated";
pub const CONSISTENCY_VIOLATION: &str = "cross_platform.consistency.violation";
pub const DRIFT_DETECTED: &str = "tenant.drift.detected";
pub const DRIFT_HEALED: &str = "tenant.drift.healed";
pub const APPLY_FAILED: &str = "tenant.apply.failed";
pub const SELF_HEAL_STOPPED: &str = "tenant.self_heal.stopped";

pub const EVENTS: [&str; 6] =
    [CONFIGURATION_UPDATED, CONSISTENCY_VIOLATION, DRIFT_DETECTED, DRIFT_HEALED, APPLY_FAILED, SELF_HEAL_STOPPED];

const QUEUE: usize = 10_000;
pub const SIGNATURE_HEADER: &str = "x-dotmac-signature-256";

/// One notification.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub id: String,
    pub event: &'static str,
    pub time: Timestamp,
    pub tenant: String,
    pub revision: Option<String>,
    /// The plan's correlation id (plan id and revision), as in the audit log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    pub data: Value,
}

impl Event {
    pub fn new(event: &'static str, tenant: &str, revision: Option<&str>, data: Value) -> Event {
        Event {
            id: crate::plan::new_id("evt"),
            event,
            time: Timestamp::now(),
            tenant: tenant.to_owned(),
            revision: revision.map(str::to_owned),
            correlation_id: None,
            data,
        }
    }

    pub fn correlation(mut self, id: Option<String>) -> Event {
        self.correlation_id = id;
        self
    }
}

/// `sha256=<hex>`: the HMAC-SHA256 of `body` under `key`.
pub fn sign(key: &[u8], body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", crate::providers::local::hex(&mac.finalize().into_bytes()))
}

/// Whether `signature` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under `key`, compared
/// in constant time.
pub fn verify(key: &[u8], body: &[u8], signature: &str) -> bool {
    let Some(hex) = signature.trim().strip_prefix("sha256=") else { return false };
    if hex.len() != 64 || !hex.is_ascii() {
        return false;
    }
    let Some(bytes) = (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()).collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(body);
    mac.verify_slice(&bytes).is_ok()
}

/// A webhook ready to send to.
struct Hook {
    url: String,
    events: Vec<String>,
    tx: mpsc::Sender<Arc<Event>>,
}

/// The configured webhooks. Sending never blocks; delivery happens on each hook's task.
#[derive(Default)]
pub struct Notifier {
    hooks: Vec<Hook>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    metrics: Option<Arc<Metrics>>,
    /// The settings these hooks were made from (to rebuild only on a change).
    pub settings: NotificationSettings,
}

struct HookConfig {
    url: String,
    key: SecretValue,
    timeout: Duration,
    max_attempts: u32,
    breaker_failures: u32,
    breaker_reset_after: Duration,
}

fn hook_config(w: &WebhookSettings) -> Result<HookConfig, String> {
    let name = &w.secret_env;
    let key =
        std::env::var(name).map_err(|_| format!("webhook {}: secret_env names ${name}, which is not set", w.url))?;
    if key.trim().is_empty() {
        return Err(format!("webhook {}: ${name} is empty", w.url));
    }
    let duration = |what: &str, v: &Option<String>, default: Duration| match v {
        None => Ok(default),
        Some(s) => parse_duration(s).ok_or_else(|| format!("webhook {}: {what} `{s}` is not a duration", w.url)),
    };
    let breaker = w.circuit_breaker.clone().unwrap_or_default();
    Ok(HookConfig {
        url: w.url.clone(),
        key: SecretValue::from_bytes(key.into_bytes()),
        timeout: duration("timeout", &w.timeout, Duration::from_secs(10))?,
        max_attempts: w.max_attempts.unwrap_or(5).max(1),
        breaker_failures: breaker.failures.unwrap_or(5).max(1),
        breaker_reset_after: duration("circuit_breaker.reset_after", &breaker.reset_after, Duration::from_secs(60))?,
    })
}

/// True for a URL that stays on this machine (where plain http is fine).
fn loopback(url: &str) -> bool {
    let rest = url.strip_prefix("http://").unwrap_or("");
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = host.rsplit_once('@').map(|(_, h)| h).unwrap_or(host);
    let host = if host.starts_with('[') {
        host.split(']').next().unwrap_or("").trim_start_matches('[')
    } else {
        host.split(':').next().unwrap_or("")
    };
    host == "localhost" || host == "::1" || host.starts_with("127.")
}

impl Notifier {
    /// Starts one delivery task per webhook (on the current runtime). Webhooks that cannot
    /// be set up are left out and named in the returned problems.
    pub fn start(settings: &NotificationSettings, metrics: Arc<Metrics>) -> (Notifier, Vec<String>) {
        let mut n = Notifier { metrics: Some(metrics.clone()), settings: settings.clone(), ..Notifier::default() };
        let mut problems = Vec::new();
        for w in &settings.webhooks {
            let cfg = match hook_config(w) {
                Ok(c) => c,
                Err(e) => {
                    problems.push(e);
                    continue;
                }
            };
            if cfg.url.starts_with("http://") && !loopback(&cfg.url) {
                tracing::warn!(url = %cfg.url, "a notification webhook uses plain http: events travel unencrypted (they are signed, not hidden)");
            }
            let (tx, rx) = mpsc::channel(QUEUE);
            n.hooks.push(Hook { url: cfg.url.clone(), events: w.events.clone(), tx });
            n.tasks.push(tokio::spawn(deliver(cfg, rx, metrics.clone())));
        }
        (n, problems)
    }

    /// Queues `event` for every webhook that wants it.
    pub fn send(&self, event: Event) {
        if self.hooks.is_empty() {
            return;
        }
        let event = Arc::new(event);
        tracing::debug!(event = event.event, tenant = %event.tenant, id = %event.id, "notify");
        for h in &self.hooks {
            if !h.events.is_empty() && !h.events.iter().any(|e| e == event.event) {
                continue;
            }
            if h.tx.try_send(event.clone()).is_err() {
                tracing::warn!(url = %h.url, event = event.event, "the notification queue is full; event dropped");
                if let Some(m) = &self.metrics {
                    m.notification(event.event, "dropped");
                }
            }
        }
    }

    /// Stops taking events and gives the queued ones until `deadline` to go out.
    pub async fn close(self, deadline: Duration) {
        drop(self.hooks);
        let all = futures_join(self.tasks);
        if tokio::time::timeout(deadline, all).await.is_err() {
            tracing::warn!("notifications still queued at shutdown were not sent");
        }
    }
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

/// How a delivery try went.
enum Try {
    Delivered,
    /// Retry later (transport error, timeout, 408, 429, 5xx).
    Retry(String),
    /// Final (any other answer).
    Rejected(String),
}

async fn deliver(cfg: HookConfig, mut rx: mpsc::Receiver<Arc<Event>>, metrics: Arc<Metrics>) {
    crate::providers::http::install_crypto_provider();
    let client = match reqwest::Client::builder()
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
        .user_agent(concat!("dotmac-gitops/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(url = %cfg.url, "cannot set up the notification client: {e}");
            return;
        }
    };
    let breaker = Breaker::new(cfg.breaker_failures, cfg.breaker_reset_after);
    let mut said_open = false;
    while let Some(event) = rx.recv().await {
        let body = match serde_json::to_vec(&*event) {
            Ok(b) => b,
            Err(_) => continue,
        };
        let signature = sign(cfg.key.expose(), &body);
        let mut attempt = 0;
        let outcome = loop {
            attempt += 1;
            if let Err(refused) = breaker.allow(&cfg.url, Instant::now()) {
                if !said_open {
                    tracing::warn!(url = %cfg.url, failures = refused.consecutive_failures, retry_in = ?refused.retry_in,
                        "notification webhook circuit open: events are dropped until it half-opens");
                    said_open = true;
                }
                break "breaker_open";
            }
            let r = client
                .post(&cfg.url)
                .header("content-type", "application/json")
                .header("x-dotmac-event", event.event)
                .header("x-dotmac-delivery", &event.id)
                .header(SIGNATURE_HEADER, &signature)
                .body(body.clone())
                .send()
                .await;
            let result = match r {
                Ok(resp) => {
                    let s = resp.status().as_u16();
                    if resp.status().is_success() {
                        Try::Delivered
                    } else if s == 408 || s == 429 || s >= 500 {
                        Try::Retry(format!("answered {s}"))
                    } else {
                        Try::Rejected(format!("answered {s}"))
                    }
                }
                Err(e) => {
                    Try::Retry(if e.is_timeout() { "timed out".to_owned() } else { "could not be reached".to_owned() })
                }
            };
            match result {
                Try::Delivered => {
                    breaker.success(&cfg.url);
                    said_open = false;
                    break "delivered";
                }
                Try::Rejected(why) => {
                    // The receiver is up and said no: not a breaker failure, and no retry.
                    breaker.success(&cfg.url);
                    tracing::warn!(url = %cfg.url, event = event.event, id = %event.id, "notification refused: {why}");
                    break "rejected";
                }
                Try::Retry(why) => {
                    breaker.failure(&cfg.url, Instant::now());
                    if attempt >= cfg.max_attempts {
                        tracing::warn!(url = %cfg.url, event = event.event, id = %event.id, attempts = attempt,
                            "notification not delivered: {why}");
                        break "failed";
                    }
                    let wait = backoff(attempt);
                    tracing::debug!(url = %cfg.url, id = %event.id, attempt, ?wait, "notification try failed ({why}); retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        };
        metrics.notification(event.event, outcome);
    }
}

/// 1 s, 2 s, 4 s … at most 30 s, plus up to a quarter again at random.
fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_secs(1u64 << attempt.saturating_sub(1).min(5)).min(Duration::from_secs(30));
    base + base.mul_f64(super::reconcile::random_unit() * 0.25)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_and_verify_in_constant_time() {
        // RFC 4231, test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let s = sign(b"key", b"body");
        assert!(verify(b"key", b"body", &s));
        assert!(!verify(b"key", b"body!", &s));
        assert!(!verify(b"other", b"body", &s));
        assert!(!verify(b"key", b"body", "sha256=zz"));
        assert!(!verify(b"key", b"body", &s.replace("sha256=", "sha1=")));
    }

    #[test]
    fn plain_http_is_quiet_only_on_this_machine() {
        assert!(loopback("http://127.0.0.1:8080/hook"));
        assert!(loopback("http://localhost/hook"));
        assert!(loopback("http://[::1]:9/x"));
        assert!(!loopback("http://hooks.example.net/x"));
        assert!(!loopback("https://127.0.0.1/x"));
    }

    #[test]
    fn backoff_doubles_up_to_thirty_seconds() {
        assert!(backoff(1) >= Duration::from_secs(1) && backoff(1) <= Duration::from_millis(1250));
        assert!(backoff(3) >= Duration::from_secs(4));
        assert!(backoff(20) <= Duration::from_millis(37_500));
    }

    #[test]
    fn a_missing_key_variable_is_named() {
        let w = WebhookSettings {
            url: "https://hooks.example.net/x".into(),
            events: Vec::new(),
            secret_env: "DOTMAC_TEST_SURELY_UNSET_VARIABLE".into(),
            timeout: None,
            max_attempts: None,
            circuit_breaker: None,
        };
        let e = hook_config(&w).err().unwrap();
        assert!(e.contains("$DOTMAC_TEST_SURELY_UNSET_VARIABLE"), "{e}");
    }
}
