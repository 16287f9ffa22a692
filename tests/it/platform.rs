//! A contract server for `../shared/spec/platform-api.md`: the management platform's
//! configuration API and a fleet of ISP Framework instances (one per tenant, under
//! `/isp/{tenant}/api/v1`), in one real HTTP server (axum) started inside the tests.
//!
//! It follows the spec, not the engine: it keeps state, answers in the envelope, checks the
//! three headers on every call (401/403/400), enforces `If-Match` on updates (428 without it,
//! 412 when the etag moved) and `If-None-Match: *` on creates, validates bodies, and enforces
//! the `Retry-After` it announces. Tests change its state out of band (drift) and inject
//! failures (statuses, `Retry-After`, bodies that are not the envelope, hangs, a concurrent
//! writer, a dead instance). Every request is recorded for the tests to inspect.

#![allow(dead_code)]

use axum::Router;
use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const ROLE: &str = "management-admin";
const MGMT: &str = "/api/v1/config";

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub correlation_id: Option<String>,
    pub if_match: Option<String>,
    pub authorization: Option<String>,
    pub body: String,
}

#[derive(Debug, Clone)]
pub enum FaultKind {
    /// Answer this status in the envelope.
    Status(u16),
    /// Answer this status (429 or 503) with `Retry-After: secs`, and keep answering 429 to
    /// anyone who comes back before the time is up.
    RetryAfter(u16, u64),
    /// Answer this status with an HTML body (a proxy's error page).
    NotEnvelope(u16),
    /// Answer nothing for this long, then handle the request.
    Hang(Duration),
    /// Just before handling the request, another writer changes the resource (its etag
    /// moves): the management record gets `name` = "Changed Concurrently".
    ConcurrentWrite,
    /// Answer this status with an error message that quotes the Authorization header back (a
    /// careless server): the client must not repeat it.
    EchoToken(u16),
}

#[derive(Debug, Clone)]
struct Fault {
    method: Option<Method>,
    path_contains: String,
    kind: FaultKind,
    /// `None`: every matching request.
    remaining: Option<usize>,
}

#[derive(Debug, Clone)]
struct TenantRec {
    etag: String,
    configuration: Value,
    licenses: Vec<Value>,
    coordination: Value,
}

#[derive(Debug, Clone, Default)]
pub struct Instance {
    pub etag: String,
    pub config: Option<String>,
    pub features: Value,
    /// The etag the instance last hot-reloaded.
    pub loaded: Option<String>,
    pub reloads: u32,
}

#[derive(Debug, Default)]
struct State {
    token: String,
    counter: u64,
    tenants: BTreeMap<String, TenantRec>,
    instances: BTreeMap<String, Instance>,
    audit: Vec<Value>,
    requests: Vec<Request>,
    faults: Vec<Fault>,
    /// path → until when 429 is answered (an announced Retry-After).
    not_before: BTreeMap<String, Instant>,
}

impl State {
    fn etag(&mut self) -> String {
        self.counter += 1;
        format!("W/\"{}\"", self.counter)
    }
}

type Shared = Arc<Mutex<State>>;

/// The platform's state at one moment (see `Platform::snapshot`).
pub struct PlatformSnapshot {
    counter: u64,
    tenants: BTreeMap<String, TenantRec>,
    instances: BTreeMap<String, Instance>,
}

pub struct Platform {
    pub addr: SocketAddr,
    state: Shared,
    _rt: tokio::runtime::Runtime,
}

impl Platform {
    pub fn start(token: &str) -> Platform {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let state: Shared = Arc::new(Mutex::new(State { token: token.to_owned(), ..State::default() }));
        let app = Router::new().fallback(handle).with_state(state.clone());
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Platform { addr, state, _rt: rt }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn management_url(&self) -> String {
        format!("http://{}{MGMT}", self.addr)
    }

    pub fn isp_url(&self) -> String {
        format!("http://{}/isp/{{tenant}}/api/v1", self.addr)
    }

    /// Injects a failure for requests whose path contains `path_contains` (and whose
    /// method is `method`, if given), `times` times or forever.
    pub fn fault(&self, method: Option<&str>, path_contains: &str, kind: FaultKind, times: Option<usize>) {
        self.lock().faults.push(Fault {
            method: method.map(|m| m.parse().unwrap()),
            path_contains: path_contains.to_owned(),
            kind,
            remaining: times,
        });
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    pub fn tenants(&self) -> Vec<String> {
        self.lock().tenants.keys().cloned().collect()
    }

    pub fn record(&self, tenant: &str) -> Option<Value> {
        self.lock().tenants.get(tenant).map(|t| t.configuration.clone())
    }

    pub fn coordination(&self, tenant: &str) -> Option<Value> {
        self.lock().tenants.get(tenant).map(|t| t.coordination.clone())
    }

    /// An out-of-band change to a tenant's record (a person in the platform's UI).
    pub fn set_record_field(&self, tenant: &str, field: &str, value: Value) {
        let mut s = self.lock();
        let etag = s.etag();
        let t = s.tenants.get_mut(tenant).expect("the tenant exists");
        t.configuration[field] = value;
        t.etag = etag;
    }

    pub fn licenses(&self, tenant: &str) -> Vec<Value> {
        self.lock().tenants.get(tenant).map(|t| t.licenses.clone()).unwrap_or_default()
    }

    pub fn remove_license(&self, tenant: &str, plugin: &str) {
        let mut s = self.lock();
        let t = s.tenants.get_mut(tenant).expect("the tenant exists");
        t.licenses.retain(|l| l["plugin_id"] != plugin);
    }

    pub fn instance(&self, tenant: &str) -> Instance {
        self.lock().instances.get(tenant).cloned().unwrap_or_default()
    }

    /// An out-of-band change to an instance's configuration.
    pub fn edit_isp_config(&self, tenant: &str, from: &str, to: &str) {
        let mut s = self.lock();
        let etag = s.etag();
        let i = s.instances.get_mut(tenant).expect("the instance has a configuration");
        let text = i.config.as_ref().expect("the instance has a configuration");
        assert!(text.contains(from), "the live configuration has no `{from}`");
        i.config = Some(text.replacen(from, to, 1));
        i.etag = etag;
    }

    pub fn audit_events(&self) -> Vec<Value> {
        self.lock().audit.clone()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }

    /// The platform's and the instances' data, to put back with `restore`.
    pub fn snapshot(&self) -> PlatformSnapshot {
        let s = self.lock();
        PlatformSnapshot { counter: s.counter, tenants: s.tenants.clone(), instances: s.instances.clone() }
    }

    /// Puts the data of a snapshot back (etags included) and forgets requests, audit events
    /// and faults.
    pub fn restore(&self, snap: &PlatformSnapshot) {
        let mut s = self.lock();
        s.counter = snap.counter;
        s.tenants = snap.tenants.clone();
        s.instances = snap.instances.clone();
        s.audit.clear();
        s.requests.clear();
        s.faults.clear();
        s.not_before.clear();
    }

    /// How many requests with this method had a path containing `path_contains`.
    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        self.lock().requests.iter().filter(|r| r.method == method && r.path.contains(path_contains)).count()
    }
}

fn envelope_ok(status: StatusCode, data: Value) -> Response {
    (status, [("content-type", "application/json")], json!({"success": true, "data": data}).to_string()).into_response()
}

fn envelope_err(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"success": false, "error": {"code": code, "message": message, "details": {}}});
    (status, [("content-type", "application/json")], body.to_string()).into_response()
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap()
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

async fn handle(
    AxState(state): AxState<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let fault = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.requests.push(Request {
            method: method.to_string(),
            path: path.clone(),
            correlation_id: header(&headers, "x-correlation-id"),
            if_match: header(&headers, "if-match"),
            authorization: header(&headers, "authorization"),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
        let found = s.faults.iter_mut().find(|f| {
            f.method.as_ref().is_none_or(|m| *m == method)
                && path.contains(&f.path_contains)
                && f.remaining.is_none_or(|n| n > 0)
        });
        found.map(|f| {
            if let Some(n) = &mut f.remaining {
                *n -= 1;
            }
            f.kind.clone()
        })
    };
    match fault {
        Some(FaultKind::Status(code)) => {
            return envelope_err(status(code), "INJECTED", "injected failure");
        }
        Some(FaultKind::RetryAfter(code, secs)) => {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            s.not_before.insert(path.clone(), Instant::now() + Duration::from_secs(secs));
            let mut r = envelope_err(status(code), "RATE_LIMITED", "slow down");
            r.headers_mut().insert("retry-after", secs.to_string().parse().unwrap());
            return r;
        }
        Some(FaultKind::NotEnvelope(code)) => {
            return (
                status(code),
                [("content-type", "text/html")],
                "<html><body><h1>502 Bad Gateway</h1>nginx</body></html>",
            )
                .into_response();
        }
        Some(FaultKind::Hang(d)) => tokio::time::sleep(d).await,
        Some(FaultKind::EchoToken(code)) => {
            let auth = header(&headers, "authorization").unwrap_or_default();
            return envelope_err(status(code), "INTERNAL", &format!("backend failed for request with {auth}"));
        }
        Some(FaultKind::ConcurrentWrite) | None => {}
    }
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    if matches!(fault, Some(FaultKind::ConcurrentWrite))
        && let Some(t) = tenant_of_management_path(&path)
        && s.tenants.contains_key(&t)
    {
        let etag = s.etag();
        let rec = s.tenants.get_mut(&t).unwrap();
        rec.configuration["name"] = json!("Changed Concurrently");
        rec.etag = etag;
    }
    if let Some(until) = s.not_before.get(&path).copied() {
        if Instant::now() < until {
            let mut r = envelope_err(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED", "retried before Retry-After");
            r.headers_mut().insert("retry-after", "1".parse().unwrap());
            return r;
        }
        s.not_before.remove(&path);
    }
    // Headers every call carries.
    if header(&headers, "authorization").as_deref() != Some(&format!("Bearer {}", s.token)) {
        return envelope_err(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "invalid or missing bearer token");
    }
    if header(&headers, "x-platform-role").as_deref() != Some(ROLE) {
        return envelope_err(StatusCode::FORBIDDEN, "FORBIDDEN", "platform administrative privileges required");
    }
    if header(&headers, "x-correlation-id").is_none_or(|c| c.is_empty()) {
        return envelope_err(StatusCode::BAD_REQUEST, "MISSING_CORRELATION_ID", "X-Correlation-Id is required");
    }
    let body: Option<Value> = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => Some(v),
            Err(_) => return envelope_err(StatusCode::BAD_REQUEST, "INVALID_JSON", "the body is not JSON"),
        }
    };
    let cond = Cond { if_match: header(&headers, "if-match"), if_none_match: header(&headers, "if-none-match") };
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if let Some(rest) = path.strip_prefix(MGMT) {
        let rest: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
        return management(&mut s, &method, &rest, body, &cond, header(&headers, "x-correlation-id"));
    }
    if segs.len() >= 4 && segs[0] == "isp" && segs[2] == "api" && segs[3] == "v1" {
        return isp(&mut s, segs[1], &method, &segs[4..], body, &cond);
    }
    envelope_err(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint")
}

fn tenant_of_management_path(path: &str) -> Option<String> {
    let rest = path.strip_prefix(MGMT)?.strip_prefix("/tenant/")?;
    Some(rest.split('/').next()?.to_owned())
}

struct Cond {
    if_match: Option<String>,
    if_none_match: Option<String>,
}

impl Cond {
    /// RFC 9110 preconditions against the current etag (`None`: absent). Updates must be
    /// conditional: an update without `If-Match` is refused with 428.
    fn check(&self, current: Option<&str>, is_update: bool) -> Option<Response> {
        if let Some(m) = &self.if_match
            && current != Some(m.as_str())
            && !(m == "*" && current.is_some())
        {
            return Some(envelope_err(
                StatusCode::PRECONDITION_FAILED,
                "PRECONDITION_FAILED",
                "the resource changed since it was read (etag mismatch)",
            ));
        }
        if self.if_none_match.as_deref() == Some("*") && current.is_some() {
            return Some(envelope_err(StatusCode::PRECONDITION_FAILED, "PRECONDITION_FAILED", "the resource exists"));
        }
        if is_update && current.is_some() && self.if_match.is_none() {
            return Some(envelope_err(
                StatusCode::PRECONDITION_REQUIRED,
                "PRECONDITION_REQUIRED",
                "updates must send If-Match with the etag read",
            ));
        }
        None
    }
}

const TIERS: [&str; 4] = ["free", "basic", "premium", "enterprise"];
const STRATEGIES: [&str; 2] = ["management_first", "synchronized"];

fn management(
    s: &mut State,
    method: &Method,
    rest: &[&str],
    body: Option<Value>,
    cond: &Cond,
    correlation: Option<String>,
) -> Response {
    let not_found = || envelope_err(StatusCode::NOT_FOUND, "TENANT_NOT_FOUND", "no such tenant");
    let invalid = |m: &str| envelope_err(StatusCode::BAD_REQUEST, "VALIDATION_ERROR", m);
    match (method.as_str(), rest) {
        ("GET", ["tenants"]) => {
            let list: Vec<Value> = s.tenants.iter().map(|(id, t)| json!({"tenant_id": id, "etag": t.etag})).collect();
            envelope_ok(StatusCode::OK, Value::Array(list))
        }
        ("GET", ["tenant", id, "config"]) => match s.tenants.get(*id) {
            Some(t) => {
                envelope_ok(StatusCode::OK, json!({"tenant_id": id, "etag": t.etag, "configuration": t.configuration}))
            }
            None => not_found(),
        },
        ("PUT", ["tenant", id, "config", "coordinate"]) => {
            let Some(b) = body else { return invalid("a body is required") };
            let Some(config) = b.get("configuration").filter(|c| c.is_object()) else {
                return invalid("`configuration` must be an object");
            };
            if !b["coordination_strategy"].as_str().is_some_and(|x| STRATEGIES.contains(&x)) {
                return invalid("`coordination_strategy` must be management_first or synchronized");
            }
            if !b["rollback_on_failure"].is_boolean() || !b["validate_consistency"].is_boolean() {
                return invalid("`rollback_on_failure` and `validate_consistency` must be booleans");
            }
            let current = s.tenants.get(*id).map(|t| t.etag.clone());
            if let Some(r) = cond.check(current.as_deref(), true) {
                return r;
            }
            let etag = s.etag();
            let coordination = json!({"coordination_strategy": b["coordination_strategy"],
                "rollback_on_failure": b["rollback_on_failure"]});
            let licenses = s.tenants.get(*id).map(|t| t.licenses.clone()).unwrap_or_default();
            s.tenants
                .insert((*id).to_owned(), TenantRec { etag, configuration: config.clone(), licenses, coordination });
            envelope_ok(
                StatusCode::OK,
                json!({
                    "coordination_id": format!("coord_{}", s.counter),
                    "status": "completed",
                    "execution_order": [{"platform": "management", "status": "success", "timestamp": "2026-11-22T00:00:00Z"}],
                    "consistency_validation": {"status": "skipped"},
                }),
            )
        }
        ("DELETE", ["tenant", id, "config"]) => {
            let Some(current) = s.tenants.get(*id).map(|t| t.etag.clone()) else { return not_found() };
            if let Some(r) = cond.check(Some(&current), false) {
                return r;
            }
            s.tenants.remove(*id);
            envelope_ok(StatusCode::OK, json!({"tenant_id": id, "deleted": true}))
        }
        ("GET", ["tenant", id, "plugins"]) => match s.tenants.get(*id) {
            Some(t) => envelope_ok(StatusCode::OK, json!({"licenses": t.licenses})),
            None => not_found(),
        },
        ("POST", ["tenant", id, "plugins", "provision"]) => {
            let Some(b) = body else { return invalid("a body is required") };
            let Some(list) = b.get("licenses").and_then(Value::as_array) else {
                return invalid("`licenses` must be a list");
            };
            if !b["auto_activate"].is_boolean() || !b["sync_to_isp_framework"].is_boolean() {
                return invalid("`auto_activate` and `sync_to_isp_framework` must be booleans");
            }
            let mut seen = std::collections::BTreeSet::new();
            for l in list {
                let Some(p) = l.get("plugin_id").and_then(Value::as_str) else {
                    return invalid("every license needs a `plugin_id`");
                };
                if !l["license_tier"].as_str().is_some_and(|t| TIERS.contains(&t)) {
                    return invalid("`license_tier` must be free, basic, premium or enterprise");
                }
                if !seen.insert(p) {
                    return invalid("a plugin is listed twice");
                }
            }
            let Some(t) = s.tenants.get_mut(*id) else { return not_found() };
            t.licenses = list.clone();
            envelope_ok(StatusCode::OK, json!({"tenant_id": id, "provisioned": list.len()}))
        }
        ("POST", ["audit", "cross-platform"]) => {
            let Some(b) = body else { return invalid("a body is required") };
            for k in ["source_platform", "target_platform", "tenant_id", "event_type", "correlation_id"] {
                if !b[k].is_string() {
                    return invalid(&format!("`{k}` is required"));
                }
            }
            if !b["event_data"].is_object() || !b["metadata"].is_object() {
                return invalid("`event_data` and `metadata` must be objects");
            }
            if b["correlation_id"].as_str() != correlation.as_deref() {
                return invalid("`correlation_id` differs from X-Correlation-Id");
            }
            s.audit.push(b);
            envelope_ok(StatusCode::CREATED, json!({"event_id": format!("evt_{}", s.audit.len())}))
        }
        _ => envelope_err(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint"),
    }
}

fn isp(s: &mut State, tenant: &str, method: &Method, rest: &[&str], body: Option<Value>, cond: &Cond) -> Response {
    let invalid = |m: &str| envelope_err(StatusCode::BAD_REQUEST, "VALIDATION_ERROR", m);
    match (method.as_str(), rest) {
        ("GET", ["health"]) => envelope_ok(StatusCode::OK, json!({"status": "healthy"})),
        ("GET", ["config"]) => match s.instances.get(tenant).filter(|i| i.config.is_some()) {
            Some(i) => envelope_ok(StatusCode::OK, json!({"etag": i.etag, "config": i.config, "features": i.features})),
            None => envelope_err(StatusCode::NOT_FOUND, "CONFIG_NOT_FOUND", "no configuration delivered yet"),
        },
        ("PUT", ["config"]) => {
            let Some(b) = body else { return invalid("a body is required") };
            let Some(text) = b.get("config").and_then(Value::as_str) else {
                return invalid("`config` must be the configuration text");
            };
            if !b["features"].is_object() {
                return invalid("`features` must be an object");
            }
            let current = s.instances.get(tenant).filter(|i| i.config.is_some()).map(|i| i.etag.clone());
            if let Some(r) = cond.check(current.as_deref(), true) {
                return r;
            }
            let etag = s.etag();
            let i = s.instances.entry(tenant.to_owned()).or_default();
            i.etag = etag.clone();
            i.config = Some(text.to_owned());
            i.features = b["features"].clone();
            envelope_ok(StatusCode::OK, json!({"etag": etag}))
        }
        ("POST", ["config", "hot-reload"]) => {
            if body.as_ref().and_then(|b| b.get("component")).and_then(Value::as_str).is_none() {
                return invalid("`component` is required");
            }
            match s.instances.get_mut(tenant).filter(|i| i.config.is_some()) {
                Some(i) => {
                    i.loaded = Some(i.etag.clone());
                    i.reloads += 1;
                    envelope_ok(StatusCode::OK, json!({"status": "reloaded"}))
                }
                None => envelope_err(StatusCode::CONFLICT, "NO_CONFIG", "nothing to reload"),
            }
        }
        _ => envelope_err(StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED", "not part of the instance API"),
    }
}
