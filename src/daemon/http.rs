//! The daemon's HTTP endpoints (axum):
//!
//! | endpoint | |
//! | --- | --- |
//! | `GET /healthz` | 200 while the process serves |
//! | `GET /readyz` | 200 once every tenant was checked after start (a standby: once it waits for the lead); 503 before and while shutting down |
//! | `GET /metrics` | Prometheus metrics (OpenMetrics text) |
//! | `GET /api/v1/status` | the revision and every tenant's status |
//! | `GET /api/v1/tenants/{id}` | one tenant: status, last plan, drift, last apply, history, recent audit entries |
//! | `POST /api/v1/tenants/{id}/reconcile` | check (and heal) the tenant now, clearing its backoff and a stopped self-heal |
//! | `GET /api/v1/audit?tenant=&since=&limit=` | the audit log |
//! | `POST /api/v1/webhook/git` | fetch the branch now (a push webhook) |
//!
//! The dashboard's pages (`GET /`, `/tenants/{id}`, `/audit`, `/assets/…`) are served here
//! too (`super::dashboard`).
//!
//! Every answer carries a Content-Security-Policy (only this daemon's own script, style and
//! images; no inline script; no frames, forms only to itself) and `nosniff`, `no-referrer`,
//! `no-store`. With `--auth-token-env VAR`, everything but the probes, the metrics and the git
//! webhook (which has its own secret) needs `Authorization: Bearer $VAR`, or, for GET, HTTP
//! Basic with `--auth-user` and `$VAR` as the password (what a browser asks for). While the
//! daemon listens on a loopback address, requests must name a loopback host (`Host:
//! 127.0.0.1…`, `localhost…`, `[::1]…`): a web page cannot read the dashboard through DNS
//! rebinding.
//!
//! When `$DOTMAC_WEBHOOK_SECRET` is set, the git webhook needs proof of it: GitHub's
//! `X-Hub-Signature-256` or our `X-DotMac-Signature-256` (HMAC-SHA256 of the body), or
//! GitLab's `X-Gitlab-Token`; without the variable it is open (it only triggers a fetch).
//! Answers never carry secret values: plans show `(sensitive)` and versions.

use super::metrics::Metrics;
use super::notifications;
use super::reconcile::{Backends, Command};
use super::status::{Handle, Role};
use crate::providers::secret_value::SecretValue;
use crate::state::AuditQuery;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, mpsc};

/// The state store the API reads the audit log from (set by the reconciler).
#[derive(Clone, Default)]
pub struct AuditSlot(Arc<Mutex<Option<Arc<Backends>>>>);

impl AuditSlot {
    /// Puts `b` in; the previous value is returned, for the caller to drop off the runtime.
    pub fn set(&self, b: Option<Arc<Backends>>) -> Option<Arc<Backends>> {
        std::mem::replace(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()), b)
    }

    fn get(&self) -> Option<Arc<Backends>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the audit log on a blocking thread; the error as people read it.
    pub async fn read(&self, q: AuditQuery) -> Result<Vec<crate::state::AuditEntry>, String> {
        let Some(b) = self.get() else {
            return Err("the state store is not open yet".into());
        };
        let r = tokio::task::spawn_blocking(move || {
            let r = b.state.audit(&q);
            drop(b);
            r
        })
        .await;
        match r {
            Ok(Ok(entries)) => Ok(entries),
            Ok(Err(e)) => Err(format!("reading the audit log: {e:#}")),
            Err(e) => Err(format!("reading the audit log: {e}")),
        }
    }
}

/// `--auth-token-env`: the token every protected request must show.
#[derive(Debug, Clone)]
pub struct Auth {
    /// The Basic user name (`--auth-user`).
    pub user: String,
    pub token: Arc<SecretValue>,
}

#[derive(Clone)]
pub struct App {
    pub shared: Handle,
    pub metrics: Arc<Metrics>,
    pub wake: Arc<Notify>,
    pub commands: mpsc::Sender<Command>,
    pub webhook_secret: Option<Arc<SecretValue>>,
    pub audit: AuditSlot,
    pub auth: Option<Auth>,
    /// Listening on a loopback address: requests must name a loopback host.
    pub loopback: bool,
}

pub fn router(app: App) -> Router {
    let guard = Guard { auth: app.auth.clone(), loopback: app.loopback };
    Router::new()
        .merge(super::dashboard::routes())
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .route("/api/v1/tenants/{id}", get(tenant))
        .route("/api/v1/tenants/{id}/reconcile", post(reconcile))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/webhook/git", post(webhook_git))
        .layer(axum::middleware::from_fn_with_state(guard, check_access))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(app)
}

/// The policy of every answer: this daemon's own script, style and images only; no inline
/// script or style, no plugins, frames or other origins; forms submit only to it.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
    connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

async fn security_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, header::HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, header::HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, header::HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, header::HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    }
    res
}

#[derive(Clone)]
struct Guard {
    auth: Option<Auth>,
    loopback: bool,
}

/// Paths open without the token: probes, metrics (counts only, no tenant names), and the
/// git webhook (it has a secret of its own).
fn open_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics" | "/api/v1/webhook/git")
}

/// Whether `host` (a Host header) names this machine's loopback interface.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host
            .rsplit_once(':')
            .map_or(host, |(h, port)| if port.bytes().all(|b| b.is_ascii_digit()) { h } else { host }),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name == "::1"
        || name.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// Why a request is refused: (status, message, ask for Basic credentials).
#[derive(Debug, PartialEq)]
enum Refusal {
    Host,
    NoCredentials,
    Wrong,
    BasicForWrite,
}

fn access(
    auth: Option<&Auth>,
    loopback: bool,
    method: &http::Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<(), Refusal> {
    if loopback && !open_path(path) {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        if !loopback_host(host) {
            return Err(Refusal::Host);
        }
    }
    let Some(auth) = auth else { return Ok(()) };
    if open_path(path) {
        return Ok(());
    }
    let Some(given) = headers.get(header::AUTHORIZATION).and_then(|h| h.to_str().ok()) else {
        return Err(Refusal::NoCredentials);
    };
    let (scheme, rest) = given.split_once(' ').unwrap_or((given, ""));
    let token = auth.token.expose();
    if scheme.eq_ignore_ascii_case("bearer") {
        return if ct_eq(rest.trim().as_bytes(), token) { Ok(()) } else { Err(Refusal::Wrong) };
    }
    if scheme.eq_ignore_ascii_case("basic") {
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD.decode(rest.trim()).unwrap_or_default();
        let (user, password) = match decoded.iter().position(|b| *b == b':') {
            Some(i) => (&decoded[..i], &decoded[i + 1..]),
            None => (&decoded[..], &[][..]),
        };
        // Both compared, always: the time does not tell which one was wrong.
        let ok = ct_eq(user, auth.user.as_bytes()) & ct_eq(password, token);
        if !ok {
            return Err(Refusal::Wrong);
        }
        // A browser sends Basic credentials by itself, also for a form another site posts:
        // only reading is allowed with them.
        return if matches!(*method, http::Method::GET | http::Method::HEAD) {
            Ok(())
        } else {
            Err(Refusal::BasicForWrite)
        };
    }
    Err(Refusal::Wrong)
}

async fn check_access(State(g): State<Guard>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match access(g.auth.as_ref(), g.loopback, req.method(), req.uri().path(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(Refusal::Host) => {
            (StatusCode::MISDIRECTED_REQUEST, "this daemon listens on a loopback address: use 127.0.0.1 or localhost\n")
                .into_response()
        }
        Err(r) => {
            let message = match r {
                Refusal::BasicForWrite => "this request needs the token as `Authorization: Bearer …`\n",
                Refusal::NoCredentials => "authentication required\n",
                _ => "wrong credentials\n",
            };
            let mut res = (StatusCode::UNAUTHORIZED, message).into_response();
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"dotmac-gitops\", charset=\"UTF-8\""),
            );
            res
        }
    }
}

fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": message.into()}))).into_response()
}

async fn readyz(State(app): State<App>) -> Response {
    let s = app.shared.read();
    match s.role {
        Role::Leader if s.ready => (StatusCode::OK, "ready\n").into_response(),
        Role::Leader => {
            (StatusCode::SERVICE_UNAVAILABLE, "not ready: the first reconcile is under way\n").into_response()
        }
        Role::Standby => {
            (StatusCode::OK, format!("standby: {} leads\n", s.leader.as_deref().unwrap_or("another replica")))
                .into_response()
        }
        Role::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response(),
    }
}

async fn metrics(State(app): State<App>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], app.metrics.encode())
        .into_response()
}

async fn status(State(app): State<App>) -> Response {
    let v = app.shared.read().status_json();
    axum::Json(v).into_response()
}

async fn tenant(State(app): State<App>, Path(id): Path<String>) -> Response {
    let Some(mut v) = app.shared.read().tenants.get(&id).and_then(|t| serde_json::to_value(t).ok()) else {
        return problem(StatusCode::NOT_FOUND, format!("no tenant `{id}`"));
    };
    let since = jiff::Timestamp::now().checked_sub(jiff::SignedDuration::from_hours(24 * 7)).ok();
    let q = AuditQuery {
        tenants: vec![id.clone()],
        since: since.map(|t| t.to_string()),
        limit: Some(50),
        newest: true,
        ..Default::default()
    };
    if let Ok(entries) = app.audit.read(q).await {
        v["audit"] = json!(entries);
    }
    axum::Json(v).into_response()
}

async fn reconcile(State(app): State<App>, Path(id): Path<String>) -> Response {
    if !app.shared.read().tenants.contains_key(&id) {
        return problem(StatusCode::NOT_FOUND, format!("no tenant `{id}`"));
    }
    if app.commands.send(Command::Reconcile(id.clone())).await.is_err() {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "the reconciler is not running");
    }
    (StatusCode::ACCEPTED, axum::Json(json!({"tenant": id, "queued": true}))).into_response()
}

#[derive(Debug, Deserialize)]
struct AuditParams {
    tenant: Option<String>,
    since: Option<String>,
    limit: Option<usize>,
    action: Option<String>,
    outcome: Option<String>,
    actor: Option<String>,
    /// `true`: the latest `limit` entries rather than the first.
    #[serde(default)]
    newest: bool,
}

async fn audit(State(app): State<App>, Query(p): Query<AuditParams>) -> Response {
    if let Some(s) = &p.since
        && s.parse::<jiff::Timestamp>().is_err()
    {
        return problem(StatusCode::BAD_REQUEST, format!("since `{s}` is not an RFC 3339 time"));
    }
    if app.audit.get().is_none() {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "the state store is not open yet");
    }
    let q = AuditQuery {
        tenants: p.tenant.into_iter().collect(),
        since: p.since,
        limit: Some(p.limit.unwrap_or(500).clamp(1, 10_000)),
        newest: p.newest,
        before: None,
        action: p.action,
        outcome: p.outcome,
        actor: p.actor,
    };
    match app.audit.read(q).await {
        Ok(entries) => axum::Json(json!({"entries": entries})).into_response(),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Equal bytes, in time that depends only on the lengths.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the request proves it knows the webhook secret.
fn authentic(secret: &SecretValue, headers: &HeaderMap, body: &[u8]) -> bool {
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(sig) = h("x-hub-signature-256").or_else(|| h(notifications::SIGNATURE_HEADER)) {
        return notifications::verify(secret.expose(), body, sig);
    }
    if let Some(token) = h("x-gitlab-token") {
        return ct_eq(token.as_bytes(), secret.expose());
    }
    false
}

async fn webhook_git(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(secret) = &app.webhook_secret
        && !authentic(secret, &headers, &body)
    {
        tracing::warn!("git webhook refused: no valid signature");
        return problem(StatusCode::UNAUTHORIZED, "missing or wrong webhook signature");
    }
    app.wake.notify_one();
    (StatusCode::ACCEPTED, axum::Json(json!({"fetch": "queued"}))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_proofs() {
        let secret = SecretValue::from_bytes(b"hook-secret".to_vec());
        let body = b"{\"ref\":\"refs/heads/main\"}";
        let mut h = HeaderMap::new();
        assert!(!authentic(&secret, &h, body));
        h.insert("x-hub-signature-256", notifications::sign(b"hook-secret", body).parse().unwrap());
        assert!(authentic(&secret, &h, body));
        assert!(!authentic(&secret, &h, b"{}"));
        let mut g = HeaderMap::new();
        g.insert("x-gitlab-token", "hook-secret".parse().unwrap());
        assert!(authentic(&secret, &g, body));
        g.insert("x-gitlab-token", "hook-secreT".parse().unwrap());
        assert!(!authentic(&secret, &g, body));
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_loopback_listener_answers_only_loopback_host_names() {
        for ok in ["127.0.0.1:9090", "localhost:9090", "LOCALHOST", "[::1]:9090", "127.1.2.3", "app.localhost:1"] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in ["evil.example:9090", "10.0.0.1", "127.0.0.1.nip.io", "", "[::2]:80", "localhost.evil.example"] {
            assert!(!loopback_host(bad), "{bad}");
        }
        let get = http::Method::GET;
        assert_eq!(access(None, true, &get, "/", &headers(&[("host", "attacker.example")])), Err(Refusal::Host));
        assert_eq!(access(None, true, &get, "/", &headers(&[("host", "127.0.0.1:1")])), Ok(()));
        assert_eq!(access(None, true, &get, "/healthz", &HeaderMap::new()), Ok(()), "probes use any name");
        assert_eq!(access(None, false, &get, "/", &headers(&[("host", "dotmac.example")])), Ok(()));
    }

    #[test]
    fn the_token_is_needed_as_bearer_or_as_the_basic_password_for_reading() {
        use base64::Engine;
        let auth = Auth { user: "ops".into(), token: Arc::new(SecretValue::from_bytes(b"t0ken-value".to_vec())) };
        let a = Some(&auth);
        let (get, post) = (http::Method::GET, http::Method::POST);
        let basic = |u: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(u));
        let check = |m: &http::Method, path: &str, authz: Option<&str>| {
            let mut h = headers(&[("host", "localhost")]);
            if let Some(v) = authz {
                h.insert("authorization", v.parse().unwrap());
            }
            access(a, true, m, path, &h)
        };
        assert_eq!(check(&get, "/", None), Err(Refusal::NoCredentials));
        assert_eq!(check(&get, "/api/v1/status", Some("Bearer t0ken-value")), Ok(()));
        assert_eq!(check(&get, "/", Some("bearer t0ken-value")), Ok(()));
        assert_eq!(check(&get, "/", Some("Bearer t0ken-valuE")), Err(Refusal::Wrong));
        assert_eq!(check(&get, "/", Some(&basic("ops:t0ken-value"))), Ok(()));
        assert_eq!(check(&get, "/", Some(&basic("root:t0ken-value"))), Err(Refusal::Wrong));
        assert_eq!(check(&get, "/", Some(&basic("ops:"))), Err(Refusal::Wrong));
        assert_eq!(check(&get, "/", Some("Basic !!!")), Err(Refusal::Wrong));
        assert_eq!(
            check(&post, "/api/v1/tenants/t/reconcile", Some(&basic("ops:t0ken-value"))),
            Err(Refusal::BasicForWrite)
        );
        assert_eq!(check(&post, "/api/v1/tenants/t/reconcile", Some("Bearer t0ken-value")), Ok(()));
        for open in ["/healthz", "/readyz", "/metrics", "/api/v1/webhook/git"] {
            assert_eq!(check(&get, open, None), Ok(()), "{open}");
        }
        assert_eq!(format!("{auth:?}").matches("t0ken").count(), 0, "Debug hides the token");
    }
}
