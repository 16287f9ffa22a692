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
}

pub fn router(app: App) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .route("/api/v1/tenants/{id}", get(tenant))
        .route("/api/v1/tenants/{id}/reconcile", post(reconcile))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/webhook/git", post(webhook_git))
        .with_state(app)
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
}
