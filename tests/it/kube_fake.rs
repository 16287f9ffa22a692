//! A fake Kubernetes API server at the HTTP layer, for driving the real binary through a
//! generated kubeconfig (no API server can be installed here).
//!
//! It keeps objects in a map and answers like kube-apiserver for what the engine uses:
//! discovery of a group version; GET of an object (404 `Status` when missing); LIST across
//! namespaces with label selectors (`=`, `!=`, `!key`, `key`, `in`, `notin`), a
//! `metadata.name` field selector and paging (`limit`/`continue`), items without
//! apiVersion/kind as the real server sends them; server-side apply (`PATCH` with
//! `application/apply-patch+yaml`): requires `fieldManager`, checks apiVersion/kind/name/
//! namespace of the body, 404 when the namespace is missing, `resourceVersion` precondition
//! (409), `fieldValidation=Strict` for unknown top-level fields, field ownership in
//! `managedFields` with conflicts (409) unless `force=true`, removal of fields the manager
//! no longer applies, merging of keyed lists (containers and env by name, ...); DELETE with a
//! `resourceVersion` precondition, a Namespace taking its objects with it. It adds what a
//! server adds: uid, creationTimestamp, resourceVersion, generation, defaulted fields, a
//! Namespace's label and status, a Deployment's revision annotation (owned by the
//! controller) and a status that progresses one step per GET (or stays stuck). A bearer
//! token is required. Tests can inject failures (any status for a method and resource),
//! deny verbs (403 like RBAC), and edit objects out of band as another field manager would
//! (an `Update` that takes ownership of the fields it changes).
//!
//! What it cannot show: the real merge and defaulting rules of every type, admission,
//! quantity normalisation, watches and their 410s, RBAC itself.

#![allow(dead_code)]

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub const TOKEN: &str = "fake-token-do-not-print";

/// (apiVersion, kind, plural, namespaced)
const RESOURCES: &[(&str, &str, &str, bool)] = &[
    ("v1", "Namespace", "namespaces", false),
    ("v1", "ConfigMap", "configmaps", true),
    ("v1", "ResourceQuota", "resourcequotas", true),
    ("v1", "Service", "services", true),
    ("apps/v1", "Deployment", "deployments", true),
    ("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets", true),
];

fn resource(plural: &str) -> Option<(&'static str, &'static str, &'static str, bool)> {
    RESOURCES.iter().copied().find(|r| r.2 == plural)
}

/// (plural, namespace or "", name)
pub type Key = (String, String, String);

#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: Option<String>,
    pub body: Option<Value>,
    pub status: u16,
}

struct Fault {
    method: String,
    plural: String,
    name: Option<String>,
    status: u16,
    times: usize,
}

#[derive(Default)]
pub struct State {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    uid: u64,
    pub requests: Vec<Req>,
    faults: Vec<Fault>,
    denied: BTreeSet<(String, String)>,
    stuck: bool,
    /// GETs left before a Deployment's rollout completes.
    rollout: HashMap<Key, u8>,
}

/// The cluster's objects at one moment (see `Fake::snapshot`).
pub struct KubeSnapshot {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    uid: u64,
}

pub struct Fake {
    state: Arc<Mutex<State>>,
    pub url: String,
    _rt: tokio::runtime::Runtime,
}

impl Fake {
    pub fn start() -> Fake {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = shared.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let (status, value) = state.lock().unwrap().handle(&parts, &bytes);
                            let resp = hyper::Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(value.to_string())))
                                .unwrap();
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
                });
            }
        });
        Fake { state, url, _rt: rt }
    }

    /// Writes a kubeconfig for this server into `dir`.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig.yaml");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: ci\ncurrent-context: fake\nusers:\n- name: ci\n  user:\n    token: {TOKEN}\n",
            self.url
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    pub fn object(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.lock().objects.get(&(plural.into(), ns.into(), name.into())).cloned()
    }

    /// (namespace, name) of every object of a kind.
    pub fn names(&self, plural: &str) -> Vec<(String, String)> {
        self.lock().objects.keys().filter(|k| k.0 == plural).map(|k| (k.1.clone(), k.2.clone())).collect()
    }

    pub fn requests(&self) -> Vec<Req> {
        self.lock().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }

    /// The next `times` requests with `method` on `plural` (and `name`, if given) fail with `status`.
    pub fn fail(&self, method: &str, plural: &str, name: Option<&str>, status: u16, times: usize) {
        self.lock().faults.push(Fault {
            method: method.into(),
            plural: plural.into(),
            name: name.map(Into::into),
            status,
            times,
        });
    }

    /// The cluster's objects, to put back with `restore`.
    pub fn snapshot(&self) -> KubeSnapshot {
        let s = self.lock();
        KubeSnapshot { objects: s.objects.clone(), rv: s.rv, uid: s.uid }
    }

    /// Puts a snapshot's objects back and forgets requests, faults and rollouts in progress.
    pub fn restore(&self, snap: &KubeSnapshot) {
        let mut s = self.lock();
        s.objects = snap.objects.clone();
        s.rv = snap.rv;
        s.uid = snap.uid;
        s.requests.clear();
        s.faults.clear();
        s.rollout.clear();
    }

    /// RBAC says no to `verb` (get, list, patch, delete) on `plural`.
    pub fn deny(&self, verb: &str, plural: &str) {
        self.lock().denied.insert((verb.into(), plural.into()));
    }

    /// Deployments' rollouts stop making progress (or resume).
    pub fn set_stuck(&self, stuck: bool) {
        self.lock().stuck = stuck;
    }

    /// An out-of-band `Update` by `manager` (kubectl edit, scale, label...): it takes
    /// ownership of every field it changes.
    pub fn update(&self, plural: &str, ns: &str, name: &str, manager: &str, f: impl FnOnce(&mut Value)) {
        self.lock().update(&(plural.into(), ns.into(), name.into()), manager, f);
    }

    /// A change the server itself makes (status, defaulting): no field manager.
    pub fn edit_raw(&self, plural: &str, ns: &str, name: &str, f: impl FnOnce(&mut Value)) {
        let mut s = self.lock();
        let key = (plural.into(), ns.into(), name.into());
        let obj = s.objects.get_mut(&key).expect("object exists");
        f(obj);
        s.bump(&key);
    }
}

fn status(code: u16, reason: &str, message: String) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}),
    )
}

enum Route {
    Discovery(String),
    Collection { plural: String, ns: Option<String> },
    Object { plural: String, ns: Option<String>, name: String },
}

/// Parses an API path; `None` for anything the fake does not serve.
fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (api_version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ((*v).to_owned(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let r = match rest {
        [] => return Some(Route::Discovery(api_version)),
        ["namespaces"] => Route::Collection { plural: "namespaces".into(), ns: None },
        ["namespaces", name] => Route::Object { plural: "namespaces".into(), ns: None, name: (*name).into() },
        ["namespaces", ns, plural] => Route::Collection { plural: (*plural).into(), ns: Some((*ns).into()) },
        ["namespaces", ns, plural, name] => {
            Route::Object { plural: (*plural).into(), ns: Some((*ns).into()), name: (*name).into() }
        }
        [plural] => Route::Collection { plural: (*plural).into(), ns: None },
        [plural, name] => Route::Object { plural: (*plural).into(), ns: None, name: (*name).into() },
        _ => return None,
    };
    let plural = match &r {
        Route::Collection { plural, .. } | Route::Object { plural, .. } => plural,
        Route::Discovery(_) => unreachable!(),
    };
    let res = resource(plural)?;
    (res.0 == api_version).then_some(r)
}

fn query_map(q: Option<&str>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for pair in q.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(decode(k), decode(v));
    }
    out
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%' && i + 2 < b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()))
            .flatten();
        match (hex, b[i]) {
            (Some(c), _) => {
                out.push(c);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, c) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Label selectors

fn split_terms(sel: &str) -> Vec<String> {
    let mut terms = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in sel.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.is_empty() {
        terms.push(cur);
    }
    terms.into_iter().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).collect()
}

/// Whether `labels` match the selector; `Err` for a selector the real server would refuse.
fn matches(sel: &str, labels: &Map<String, Value>) -> Result<bool, String> {
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    for t in split_terms(sel) {
        let ok = if let Some(k) = t.strip_prefix('!') {
            get(k.trim()).is_none()
        } else if let Some((k, v)) = t.split_once("!=") {
            get(k.trim()) != Some(v.trim())
        } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
            get(k.trim()) == Some(v.trim())
        } else if let Some((k, set)) = t.split_once(" notin ") {
            let set = parse_set(set)?;
            get(k.trim()).is_none_or(|v| !set.contains(v))
        } else if let Some((k, set)) = t.split_once(" in ") {
            let set = parse_set(set)?;
            get(k.trim()).is_some_and(|v| set.contains(v))
        } else if t.chars().all(|c| c.is_ascii_alphanumeric() || "./-_".contains(c)) {
            get(&t).is_some()
        } else {
            return Err(format!("unable to parse requirement: {t}"));
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

fn parse_set(s: &str) -> Result<BTreeSet<String>, String> {
    let inner = s.trim().strip_prefix('(').and_then(|s| s.strip_suffix(')')).ok_or("a set needs parentheses")?;
    Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
}

// ---------------------------------------------------------------------------------------------
// Field sets: paths of fieldsV1 keys (`f:spec`, `k:{"name":"x"}`, `v:"a"`, `.`)

type FieldPath = Vec<String>;

enum ListType {
    Keyed(&'static [&'static str]),
    Set,
    Atomic,
}

/// The list semantics of a field, as the OpenAPI schema gives them (for the fields the
/// engine's templates use).
fn list_type(field: &str, items: &[Value]) -> ListType {
    match field {
        "containers" | "initContainers" | "env" | "volumes" | "imagePullSecrets" => ListType::Keyed(&["name"]),
        "volumeMounts" => ListType::Keyed(&["mountPath"]),
        "ports" if items.iter().any(|i| i.get("containerPort").is_some()) => {
            ListType::Keyed(&["containerPort", "protocol"])
        }
        "ports" => ListType::Keyed(&["port", "protocol"]),
        "finalizers" => ListType::Set,
        _ => ListType::Atomic,
    }
}

fn item_key(item: &Value, keys: &[&str]) -> String {
    let mut m = Map::new();
    for k in keys {
        if let Some(v) = item.get(*k) {
            m.insert((*k).to_owned(), v.clone());
        }
    }
    format!("k:{}", Value::Object(m))
}

fn walk(v: &Value, prefix: &FieldPath, field: &str, out: &mut BTreeSet<FieldPath>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                let mut p = prefix.clone();
                p.push(format!("f:{k}"));
                walk(c, &p, k, out);
            }
        }
        Value::Array(items) => match list_type(field, items) {
            ListType::Keyed(keys) => {
                for item in items {
                    let mut p = prefix.clone();
                    p.push(item_key(item, keys));
                    let mut dot = p.clone();
                    dot.push(".".into());
                    out.insert(dot);
                    if let Value::Object(m) = item {
                        for (k, c) in m {
                            let mut q = p.clone();
                            q.push(format!("f:{k}"));
                            walk(c, &q, k, out);
                        }
                    }
                }
            }
            ListType::Set => {
                for item in items {
                    let mut p = prefix.clone();
                    p.push(format!("v:{item}"));
                    out.insert(p);
                }
            }
            ListType::Atomic => {
                out.insert(prefix.clone());
            }
        },
        _ => {
            out.insert(prefix.clone());
        }
    }
}

/// The fields of an object that a manager can own: everything but identity, server fields
/// and status.
fn ownable(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Value::Object(m) = &mut o {
        m.remove("apiVersion");
        m.remove("kind");
        m.remove("status");
        if let Some(Value::Object(meta)) = m.get_mut("metadata") {
            for k in ["name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp", "managedFields"]
            {
                meta.remove(k);
            }
            if meta.is_empty() {
                m.remove("metadata");
            }
        }
    }
    o
}

fn fieldset(obj: &Value) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    walk(&ownable(obj), &Vec::new(), "", &mut out);
    out.remove(&Vec::new());
    out
}

fn to_tree(set: &BTreeSet<FieldPath>) -> Value {
    let mut root = Map::new();
    for p in set {
        let mut node = &mut root;
        for seg in p {
            node = node.entry(seg.clone()).or_insert_with(|| Value::Object(Map::new())).as_object_mut().unwrap();
        }
    }
    Value::Object(root)
}

fn from_tree(tree: &Value) -> BTreeSet<FieldPath> {
    fn rec(v: &Value, prefix: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
        match v.as_object() {
            Some(m) if !m.is_empty() => {
                for (k, c) in m {
                    prefix.push(k.clone());
                    rec(c, prefix, out);
                    prefix.pop();
                }
            }
            _ => {
                if !prefix.is_empty() {
                    out.insert(prefix.clone());
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    rec(tree, &mut Vec::new(), &mut out);
    out
}

fn find_item(items: &[Value], seg: &str) -> Option<usize> {
    if let Some(k) = seg.strip_prefix("k:") {
        let want: Map<String, Value> = serde_json::from_str(k).ok()?;
        return items.iter().position(|i| want.iter().all(|(f, v)| i.get(f) == Some(v)));
    }
    if let Some(v) = seg.strip_prefix("v:") {
        let want: Value = serde_json::from_str(v).ok()?;
        return items.iter().position(|i| *i == want);
    }
    None
}

fn value_at<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = v;
    for seg in path {
        cur = if seg == "." {
            cur
        } else if let Some(f) = seg.strip_prefix("f:") {
            cur.get(f)?
        } else {
            let items = cur.as_array()?;
            &items[find_item(items, seg)?]
        };
    }
    Some(cur)
}

fn remove_at(v: &mut Value, path: &[String]) {
    let Some((last, parent)) = path.split_last() else { return };
    let (last, parent) = if last == "." {
        match parent.split_last() {
            Some((item, p)) => (item, p),
            None => return,
        }
    } else {
        (last, parent)
    };
    let mut cur = v;
    for seg in parent {
        let next = if let Some(f) = seg.strip_prefix("f:") {
            cur.get_mut(f)
        } else {
            match cur.as_array_mut() {
                Some(items) => match find_item(items, seg) {
                    Some(i) => items.get_mut(i),
                    None => None,
                },
                None => None,
            }
        };
        let Some(n) = next else { return };
        cur = n;
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Some(m) = cur.as_object_mut() {
            m.remove(f);
        }
    } else if let Some(items) = cur.as_array_mut()
        && let Some(i) = find_item(items, last)
    {
        items.remove(i);
    }
}

/// Server-side apply's merge: maps merge, keyed lists merge item by item, the rest replaces.
fn merge(live: &mut Value, applied: &Value, field: &str) {
    match (live, applied) {
        (Value::Object(l), Value::Object(a)) => {
            for (k, v) in a {
                match l.get_mut(k) {
                    Some(x) => merge(x, v, k),
                    None => {
                        l.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(l), Value::Array(a)) => match list_type(field, a) {
            ListType::Keyed(keys) => {
                let mut out = Vec::new();
                let mut used = BTreeSet::new();
                for item in a {
                    let key = item_key(item, keys);
                    match l.iter().position(|x| item_key(x, keys) == key) {
                        Some(i) => {
                            used.insert(i);
                            let mut x = l[i].clone();
                            merge(&mut x, item, "");
                            out.push(x);
                        }
                        None => out.push(item.clone()),
                    }
                }
                out.extend(l.iter().enumerate().filter(|(i, _)| !used.contains(i)).map(|(_, x)| x.clone()));
                *l = out;
            }
            ListType::Set => {
                for item in a {
                    if !l.contains(item) {
                        l.push(item.clone());
                    }
                }
            }
            ListType::Atomic => *l = a.clone(),
        },
        (l, a) => *l = a.clone(),
    }
}

fn path_text(p: &FieldPath) -> String {
    p.iter()
        .filter(|s| *s != ".")
        .map(|s| s.strip_prefix("f:").map(|f| format!(".{f}")).unwrap_or(format!("[{s}]")))
        .collect()
}

fn now() -> String {
    "2026-11-22T00:00:00Z".into()
}

// ---------------------------------------------------------------------------------------------
// The server

impl State {
    fn next_rv(&mut self) -> String {
        self.rv += 1;
        self.rv.to_string()
    }

    fn bump(&mut self, key: &Key) {
        let rv = self.next_rv();
        if let Some(o) = self.objects.get_mut(key) {
            o["metadata"]["resourceVersion"] = Value::String(rv);
        }
    }

    fn handle(&mut self, parts: &http::request::Parts, body: &[u8]) -> (u16, Value) {
        let method = parts.method.as_str().to_owned();
        let path = parts.uri.path().to_owned();
        let query = query_map(parts.uri.query());
        let content_type = parts.headers.get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let json_body = serde_json::from_slice::<Value>(body).ok();
        let auth_ok = parts.headers.get("authorization").and_then(|v| v.to_str().ok())
            == Some(format!("Bearer {TOKEN}").as_str());
        let (code, value) = if auth_ok {
            self.dispatch(&method, &path, &query, content_type.as_deref(), body)
        } else {
            status(401, "Unauthorized", "Unauthorized".into())
        };
        self.requests.push(Req { method, path, query, content_type, body: json_body, status: code });
        (code, value)
    }

    fn dispatch(
        &mut self,
        method: &str,
        path: &str,
        query: &BTreeMap<String, String>,
        content_type: Option<&str>,
        body: &[u8],
    ) -> (u16, Value) {
        let Some(r) = route(path) else {
            return status(404, "NotFound", format!("the server could not find the requested resource ({path})"));
        };
        if let Route::Discovery(gv) = &r {
            let resources: Vec<Value> = RESOURCES
                .iter()
                .filter(|x| x.0 == gv)
                .map(|x| json!({"name": x.2, "singularName": x.1.to_lowercase(), "namespaced": x.3, "kind": x.1, "verbs": ["get", "list", "patch", "delete"]}))
                .collect();
            return (
                200,
                json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
            );
        }
        let (plural, ns, name) = match &r {
            Route::Collection { plural, ns } => (plural.clone(), ns.clone(), None),
            Route::Object { plural, ns, name } => (plural.clone(), ns.clone(), Some(name.clone())),
            Route::Discovery(_) => unreachable!(),
        };
        let res = resource(&plural).unwrap();
        if let Some(i) = self.faults.iter().position(|f| {
            f.times > 0 && f.method == method && f.plural == plural && (f.name.is_none() || f.name == name)
        }) {
            self.faults[i].times -= 1;
            let code = self.faults[i].status;
            let reason = match code {
                409 => "Conflict",
                500 => "InternalError",
                _ => "Injected",
            };
            return status(code, reason, format!("injected failure: {code} for {method} {path}"));
        }
        let verb = match (method, &name) {
            ("GET", None) => "list",
            ("GET", Some(_)) => "get",
            ("PATCH", _) => "patch",
            ("DELETE", _) => "delete",
            _ => "other",
        };
        if self.denied.contains(&(verb.to_owned(), plural.clone())) {
            let group = res.0.split_once('/').map(|(g, _)| g).unwrap_or("");
            let where_ = match &ns {
                Some(ns) => format!(" in the namespace \"{ns}\""),
                None => " at the cluster scope".into(),
            };
            return status(
                403,
                "Forbidden",
                format!(
                    "{plural}{} is forbidden: User \"system:serviceaccount:ci:dotmac\" cannot {verb} resource \"{plural}\" in API group \"{group}\"{where_}",
                    name.as_ref().map(|n| format!(" \"{n}\"")).unwrap_or_default()
                ),
            );
        }
        let ns_key = if res.3 { ns.clone().unwrap_or_default() } else { String::new() };
        match (method, name) {
            ("GET", None) => self.list(res, ns.as_deref(), query),
            ("GET", Some(n)) => {
                let key = (plural.clone(), ns_key, n.clone());
                self.progress(&key);
                match self.objects.get(&key) {
                    Some(o) => (200, o.clone()),
                    None => status(404, "NotFound", format!("{plural} \"{n}\" not found")),
                }
            }
            ("PATCH", Some(n)) => {
                if content_type != Some("application/apply-patch+yaml") {
                    return status(
                        415,
                        "UnsupportedMediaType",
                        format!("the fake only serves server-side apply, not {content_type:?}"),
                    );
                }
                let Ok(body) = serde_json::from_slice::<Value>(body) else {
                    return status(400, "BadRequest", "the apply body is not JSON".into());
                };
                self.apply(res, ns.as_deref(), &n, body, query)
            }
            ("DELETE", Some(n)) => {
                let key = (plural.clone(), ns_key, n.clone());
                let Some(obj) = self.objects.get(&key) else {
                    return status(404, "NotFound", format!("{plural} \"{n}\" not found"));
                };
                let opts: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                if let Some(want) = opts.pointer("/preconditions/resourceVersion").and_then(Value::as_str) {
                    let have = obj.pointer("/metadata/resourceVersion").and_then(Value::as_str).unwrap_or_default();
                    if want != have {
                        return status(
                            409,
                            "Conflict",
                            format!(
                                "Operation cannot be fulfilled on {plural} \"{n}\": the ResourceVersion in the precondition ({want}) does not match the ResourceVersion in record ({have}). The object might have been modified"
                            ),
                        );
                    }
                }
                self.objects.remove(&key);
                self.rollout.remove(&key);
                if plural == "namespaces" {
                    self.objects.retain(|k, _| k.1 != n);
                }
                (
                    200,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": {"name": n, "kind": plural}}),
                )
            }
            _ => status(405, "MethodNotAllowed", format!("the fake does not serve {method} {path}")),
        }
    }

    fn list(&self, res: (&str, &str, &str, bool), ns: Option<&str>, query: &BTreeMap<String, String>) -> (u16, Value) {
        let sel = query.get("labelSelector").map(String::as_str).unwrap_or("");
        let field = query.get("fieldSelector").map(String::as_str).unwrap_or("");
        let mut items = Vec::new();
        for ((plural, ons, _), o) in &self.objects {
            if plural != res.2 || ns.is_some_and(|n| n != ons) {
                continue;
            }
            let labels = o.pointer("/metadata/labels").and_then(Value::as_object).cloned().unwrap_or_default();
            match matches(sel, &labels) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => return status(400, "BadRequest", e),
            }
            if let Some(name) = field.strip_prefix("metadata.name=")
                && o.pointer("/metadata/name").and_then(Value::as_str) != Some(name)
            {
                continue;
            }
            let mut item = o.clone();
            let m = item.as_object_mut().unwrap();
            m.remove("apiVersion");
            m.remove("kind");
            items.push(item);
        }
        let start: usize = query.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
        let limit: usize = query.get("limit").and_then(|l| l.parse().ok()).unwrap_or(usize::MAX);
        let end = start.saturating_add(limit).min(items.len());
        let page: Vec<Value> = items[start.min(end)..end].to_vec();
        let mut meta = json!({"resourceVersion": self.rv.to_string()});
        if end < items.len() {
            meta["continue"] = Value::String(end.to_string());
        }
        (200, json!({"kind": format!("{}List", res.1), "apiVersion": res.0, "metadata": meta, "items": page}))
    }

    fn apply(
        &mut self,
        res: (&str, &str, &str, bool),
        ns: Option<&str>,
        name: &str,
        body: Value,
        query: &BTreeMap<String, String>,
    ) -> (u16, Value) {
        let Some(manager) = query.get("fieldManager").filter(|m| !m.is_empty()).cloned() else {
            return status(400, "BadRequest", "PATCH /apply: fieldManager is required for apply requests".into());
        };
        let force = query.get("force").map(String::as_str) == Some("true");
        if body.get("apiVersion").and_then(Value::as_str) != Some(res.0)
            || body.get("kind").and_then(Value::as_str) != Some(res.1)
        {
            return status(
                400,
                "BadRequest",
                format!("apiVersion and kind must be set and match the request ({} {})", res.0, res.1),
            );
        }
        if body.pointer("/metadata/name").and_then(Value::as_str) != Some(name) {
            return status(400, "BadRequest", "the name of the object does not match the name on the URL".into());
        }
        if query.get("fieldValidation").map(String::as_str) == Some("Strict")
            && let Some(k) = body.as_object().unwrap().keys().find(|k| {
                !["apiVersion", "kind", "metadata", "spec", "data", "binaryData", "immutable"].contains(&k.as_str())
            })
        {
            return status(400, "BadRequest", format!("strict decoding error: unknown field \"{k}\""));
        }
        let ns_key = if res.3 {
            let ns = ns.unwrap_or_default().to_owned();
            if body.pointer("/metadata/namespace").and_then(Value::as_str).is_some_and(|b| b != ns) {
                return status(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request".into(),
                );
            }
            if !self.objects.contains_key(&("namespaces".into(), String::new(), ns.clone())) {
                return status(404, "NotFound", format!("namespaces \"{ns}\" not found"));
            }
            ns
        } else {
            String::new()
        };
        let key: Key = (res.2.into(), ns_key.clone(), name.into());
        let existing = self.objects.get(&key).cloned();
        if let Some(want) = body.pointer("/metadata/resourceVersion").and_then(Value::as_str) {
            let have = existing.as_ref().and_then(|e| e.pointer("/metadata/resourceVersion")).and_then(Value::as_str);
            match have {
                None => return status(404, "NotFound", format!("{} \"{name}\" not found", res.2)),
                Some(h) if h != want => {
                    return status(
                        409,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                            res.2
                        ),
                    );
                }
                _ => {}
            }
        }
        let mut applied = body.clone();
        if let Some(m) = applied.pointer_mut("/metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        let new_set = fieldset(&applied);
        let creating = existing.is_none();
        let mut obj = existing.clone().unwrap_or_else(|| {
            let mut meta = json!({"name": name});
            if res.3 {
                meta["namespace"] = Value::String(ns_key.clone());
            }
            json!({"apiVersion": res.0, "kind": res.1, "metadata": meta})
        });
        // Field ownership: conflicts with other managers, then what we no longer apply.
        let mut entries: Vec<Value> =
            obj.pointer("/metadata/managedFields").and_then(Value::as_array).cloned().unwrap_or_default();
        let ours = |e: &Value| {
            e.get("manager").and_then(Value::as_str) == Some(manager.as_str())
                && e.get("operation").and_then(Value::as_str) == Some("Apply")
                && e.get("subresource").is_none()
        };
        let old_set = entries.iter().find(|e| ours(e)).map(|e| from_tree(&e["fieldsV1"])).unwrap_or_default();
        let mut conflicts = Vec::new();
        for e in entries.iter_mut().filter(|e| !ours(e) && e.get("subresource").is_none()) {
            let mut set = from_tree(&e["fieldsV1"]);
            let shared: Vec<FieldPath> =
                set.intersection(&new_set).filter(|p| p.last().is_some_and(|l| l != ".")).cloned().collect();
            for p in shared {
                if value_at(&obj, &p) != value_at(&applied, &p) {
                    conflicts.push(format!(
                        "conflict with \"{}\": {}",
                        e["manager"].as_str().unwrap_or("?"),
                        path_text(&p)
                    ));
                    set.remove(&p);
                }
            }
            e["fieldsV1"] = to_tree(&set);
        }
        if !conflicts.is_empty() && !force {
            return status(
                409,
                "Conflict",
                format!("Apply failed with {} conflicts: {}", conflicts.len(), conflicts.join("; ")),
            );
        }
        entries.retain(|e| ours(e) || e.get("fieldsV1").and_then(Value::as_object).is_some_and(|m| !m.is_empty()));
        let others: BTreeSet<FieldPath> =
            entries.iter().filter(|e| !ours(e)).flat_map(|e| from_tree(&e["fieldsV1"])).collect();
        let mut removed: Vec<&FieldPath> = old_set.difference(&new_set).filter(|p| !others.contains(*p)).collect();
        removed.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in removed {
            remove_at(&mut obj, p);
        }
        merge(&mut obj, &applied, "");
        defaults(res.1, &mut obj, name);
        entries.retain(|e| !ours(e));
        entries.insert(0, json!({"manager": manager, "operation": "Apply", "apiVersion": res.0, "time": now(), "fieldsType": "FieldsV1", "fieldsV1": to_tree(&new_set)}));
        obj["metadata"]["managedFields"] = Value::Array(entries);
        let changed = existing.as_ref().is_none_or(|e| strip_rv(e) != strip_rv(&obj));
        if creating {
            self.uid += 1;
            obj["metadata"]["uid"] = Value::String(format!("00000000-0000-4000-8000-{:012}", self.uid));
            obj["metadata"]["creationTimestamp"] = Value::String(now());
        }
        if changed {
            obj["metadata"]["resourceVersion"] = Value::String(self.next_rv());
        }
        if res.1 == "Deployment" {
            let spec_changed = existing.as_ref().is_none_or(|e| e.get("spec") != obj.get("spec"));
            if spec_changed {
                let g = obj.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0) + 1;
                obj["metadata"]["generation"] = json!(g);
                start_rollout(&mut obj, creating);
                self.rollout.insert(key.clone(), 2);
            }
        }
        self.objects.insert(key, obj.clone());
        (if creating { 201 } else { 200 }, obj)
    }

    /// One step of a Deployment's rollout, on each GET.
    fn progress(&mut self, key: &Key) {
        let Some(left) = self.rollout.get(key).copied() else { return };
        let stuck = self.stuck;
        let Some(d) = self.objects.get_mut(key) else { return };
        let want = d.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
        let g = d.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(1);
        let st = d["status"].as_object_mut().unwrap();
        st.insert("observedGeneration".into(), json!(g));
        if stuck || left == 2 {
            st.insert("updatedReplicas".into(), json!(1.min(want)));
            st.insert("replicas".into(), json!(want + 1));
            if !stuck {
                self.rollout.insert(key.clone(), 1);
            }
        } else {
            for k in ["updatedReplicas", "replicas", "readyReplicas", "availableReplicas"] {
                st.insert(k.into(), json!(want));
            }
            st.insert(
                "conditions".into(),
                json!([{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                       {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]),
            );
            self.rollout.remove(key);
        }
        self.bump(key);
    }

    fn update(&mut self, key: &Key, manager: &str, f: impl FnOnce(&mut Value)) {
        let obj = self.objects.get_mut(key).expect("object exists");
        let before = obj.clone();
        f(obj);
        let old = fieldset(&before);
        let new = fieldset(obj);
        let changed: BTreeSet<FieldPath> =
            new.iter().filter(|p| !old.contains(*p) || value_at(&before, p) != value_at(obj, p)).cloned().collect();
        let gone: BTreeSet<FieldPath> = old.difference(&new).cloned().collect();
        let mut entries: Vec<Value> =
            obj.pointer("/metadata/managedFields").and_then(Value::as_array).cloned().unwrap_or_default();
        for e in entries.iter_mut() {
            let set: BTreeSet<FieldPath> =
                from_tree(&e["fieldsV1"]).into_iter().filter(|p| !changed.contains(p) && !gone.contains(p)).collect();
            e["fieldsV1"] = to_tree(&set);
        }
        let idx = entries.iter().position(|e| {
            e.get("manager").and_then(Value::as_str) == Some(manager)
                && e.get("operation").and_then(Value::as_str) == Some("Update")
        });
        let mut mine = idx.map(|i| from_tree(&entries[i]["fieldsV1"])).unwrap_or_default();
        mine.extend(changed);
        let entry = json!({"manager": manager, "operation": "Update", "apiVersion": obj["apiVersion"], "time": now(), "fieldsType": "FieldsV1", "fieldsV1": to_tree(&mine)});
        match idx {
            Some(i) => entries[i] = entry,
            None => entries.push(entry),
        }
        entries.retain(|e| e.get("fieldsV1").and_then(Value::as_object).is_some_and(|m| !m.is_empty()));
        obj["metadata"]["managedFields"] = Value::Array(entries);
        if obj["kind"] == "Deployment" && before.get("spec") != obj.get("spec") {
            let g = obj.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0) + 1;
            obj["metadata"]["generation"] = json!(g);
            start_rollout(obj, false);
            self.rollout.insert(key.clone(), 2);
        }
        self.bump(key);
    }
}

fn strip_rv(o: &Value) -> Value {
    let mut o = o.clone();
    if let Some(m) = o.pointer_mut("/metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        if let Some(Value::Array(es)) = m.get_mut("managedFields") {
            for e in es {
                if let Some(e) = e.as_object_mut() {
                    e.remove("time");
                }
            }
        }
    }
    o
}

fn set_default(obj: &mut Value, pointer: &str, value: Value) {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    if let Some(Value::Object(m)) = obj.pointer_mut(parent) {
        m.entry(key.to_owned()).or_insert(value);
    }
}

/// What the real server's defaulting adds (a sample of it).
fn defaults(kind: &str, obj: &mut Value, name: &str) {
    match kind {
        "Namespace" => {
            set_default(obj, "/metadata/labels", json!({}));
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = Value::String(name.into());
            set_default(obj, "/spec", json!({}));
            set_default(obj, "/spec/finalizers", json!(["kubernetes"]));
            set_default(obj, "/status", json!({"phase": "Active"}));
        }
        "ResourceQuota" => {
            let hard = obj.pointer("/spec/hard").cloned().unwrap_or(json!({}));
            let used: Map<String, Value> =
                hard.as_object().into_iter().flatten().map(|(k, _)| (k.clone(), json!("0"))).collect();
            obj["status"] = json!({"hard": hard, "used": used});
        }
        "Deployment" => {
            set_default(obj, "/spec/progressDeadlineSeconds", json!(600));
            set_default(obj, "/spec/revisionHistoryLimit", json!(10));
            set_default(
                obj,
                "/spec/strategy",
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}),
            );
            set_default(obj, "/spec/template/metadata/creationTimestamp", Value::Null);
            for (k, v) in [
                ("restartPolicy", json!("Always")),
                ("dnsPolicy", json!("ClusterFirst")),
                ("schedulerName", json!("default-scheduler")),
                ("securityContext", json!({})),
                ("terminationGracePeriodSeconds", json!(30)),
            ] {
                set_default(obj, &format!("/spec/template/spec/{k}"), v);
            }
            if let Some(Value::Array(cs)) = obj.pointer_mut("/spec/template/spec/containers") {
                for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                    c.entry("imagePullPolicy").or_insert(json!("IfNotPresent"));
                    c.entry("terminationMessagePath").or_insert(json!("/dev/termination-log"));
                    c.entry("terminationMessagePolicy").or_insert(json!("File"));
                    // Quantities are stored in canonical form: "1000m" is kept as "1".
                    for which in ["requests", "limits"] {
                        if let Some(Value::String(cpu)) =
                            c.get_mut("resources").and_then(|r| r.get_mut(which)).and_then(|r| r.get_mut("cpu"))
                            && let Some(whole) = cpu
                                .strip_suffix("000m")
                                .filter(|w| !w.is_empty() && w.chars().all(|d| d.is_ascii_digit()))
                        {
                            *cpu = whole.to_owned();
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

/// A new template: the controller records a revision and the status starts over.
fn start_rollout(d: &mut Value, creating: bool) {
    let revision = d
        .pointer("/metadata/annotations/deployment.kubernetes.io~1revision")
        .and_then(Value::as_str)
        .and_then(|r| r.parse::<u64>().ok())
        .unwrap_or(0)
        + 1;
    set_default(d, "/metadata/annotations", json!({}));
    d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = Value::String(revision.to_string());
    let controller = json!({"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "apps/v1", "time": now(),
        "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:deployment.kubernetes.io/revision": {}}}}});
    let status_entry = json!({"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "apps/v1", "time": now(),
        "fieldsType": "FieldsV1", "subresource": "status", "fieldsV1": {"f:status": {"f:observedGeneration": {}, "f:replicas": {}, "f:updatedReplicas": {}}}});
    if let Some(Value::Array(es)) = d.pointer_mut("/metadata/managedFields") {
        es.retain(|e| e.get("manager").and_then(Value::as_str) != Some("kube-controller-manager"));
        es.push(controller);
        es.push(status_entry);
    }
    if creating || d.get("status").is_none() {
        d["status"] = json!({"replicas": 0, "updatedReplicas": 0, "availableReplicas": 0});
    } else {
        d["status"]["updatedReplicas"] = json!(0);
    }
}

#[test]
fn the_fakes_own_rules() {
    let labels = json!({"a": "1", "t": "x"});
    let l = labels.as_object().unwrap();
    assert_eq!(matches("a=1,!b,t in (x,y)", l), Ok(true));
    assert_eq!(matches("a=1,t notin (x)", l), Ok(false));
    assert_eq!(matches("a!=1", l), Ok(false));
    assert!(matches("a ~ 1", l).is_err());
    assert_eq!(decode("a%3D1%2C%21b+c"), "a=1,!b c");
    let d = json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "i", "env": [{"name": "E", "value": "v"}]}]}}}});
    let set = fieldset(&d);
    assert!(set.contains(&vec![
        "f:spec".to_owned(),
        "f:template".into(),
        "f:spec".into(),
        "f:containers".into(),
        "k:{\"name\":\"c\"}".into(),
        "f:env".into(),
        "k:{\"name\":\"E\"}".into(),
        "f:value".into()
    ]));
    assert_eq!(from_tree(&to_tree(&set)), set);
    let mut live = json!({"spec": {"template": {"spec": {"containers": [{"name": "side", "image": "s"}, {"name": "c", "image": "old"}]}}}});
    merge(&mut live, &d, "");
    assert_eq!(live.pointer("/spec/template/spec/containers/0/image"), Some(&json!("i")));
    assert_eq!(live.pointer("/spec/template/spec/containers/1/name"), Some(&json!("side")));
}
