//! `kind = "kubernetes"`: the rendered manifests (`[providers.kubernetes]`) and the tenants'
//! `isp_config.yaml` as a ConfigMap (`[providers.isp]`, see `isp.rs`), on a real API server
//! through `kube`.
//!
//! - **Connection**: `kubeconfig` (a path) and `context`, else what `kube` infers
//!   (`$KUBECONFIG`, `~/.kube/config`, then the in-cluster service account).
//! - **Writes** are server-side apply (`PATCH` with `application/apply-patch+yaml`) under our
//!   field manager (`field_manager`, default `dotmac-gitops`), with `force=true` because the
//!   repository is the owner of what it declares (healing drift must take back a field
//!   someone else changed), with `fieldValidation=Strict` (an unknown field is an error, not
//!   a silently dropped one that would diff forever), and with the `resourceVersion` read
//!   before the write as a precondition, so a concurrent writer makes it a 409 conflict
//!   instead of being overwritten.
//! - **Reads** list each kind once with the label selector
//!   `app.kubernetes.io/managed-by=dotmac-gitops` (and `dotmac.io/tenant in (...)` for a few
//!   tenants), paged; never one GET per object.
//! - **Drift** is judged on the fields our manager owns (`project.rs`).
//! - A **Deployment** write waits for its rollout (`rollout_timeout`, default 5m); a rollout
//!   that fails or times out restores the Deployment as it was before the write (or removes
//!   one the write created), so a failed write leaves nothing behind.
//! - **Deletes** remove the object (namespaced objects before their Namespace: the apply
//!   order does that), with the `resourceVersion` as a precondition; already gone is done.
//!
//! The `Provider` trait is synchronous: each provider owns a small tokio runtime and blocks
//! on it. It must not be called from inside an async runtime (it says so instead of
//! panicking); an async caller uses `spawn_blocking`.

pub mod isp;
pub mod kinds;
pub mod project;
pub mod rollout;

use super::secret_value::SecretValue;
use super::{Expect, LiveResource, Provider, ProviderError, Result, TenantScope};
use crate::fingerprint;
use crate::load::settings::{ProviderSettings, parse_duration};
use crate::model::{Address, Content, ProviderId, Resource, ResourceKind};
use crate::render::{MANAGED_BY, TENANT_LABEL};
use anyhow::Context as _;
use kinds::Kind;
use kube::core::Request;
use kube::core::params::{DeleteParams, GetParams, ListParams, Patch, PatchParams, Preconditions, PropagationPolicy};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The label that marks an object written by another slot than `[providers.kubernetes]`
/// (the ISP ConfigMap: `dotmac.io/resource=isp.config`); the manifests' lists leave it out.
pub const RESOURCE_LABEL: &str = "dotmac.io/resource";
/// Objects per list page.
const PAGE: u32 = 500;
/// At most this many tenants go into a `dotmac.io/tenant in (...)` selector; more are
/// filtered after listing.
const SELECTOR_TENANTS: usize = 100;

/// A connection to one cluster: a runtime, a client, our field manager.
pub struct Cluster {
    rt: tokio::runtime::Runtime,
    client: kube::Client,
    server: String,
    /// "context X" or "the in-cluster service account", for messages.
    identity: String,
    pub manager: String,
}

impl Cluster {
    /// Builds the client from a provider's settings (`kubeconfig`, `context`, `timeout`).
    /// Nothing is sent to the server yet.
    pub fn connect(s: &ProviderSettings, slot: &str, default_manager: &str) -> anyhow::Result<Cluster> {
        let timeout = duration_setting(s, slot, "timeout", Duration::from_secs(30))?;
        let manager = s.str("field_manager").unwrap_or(default_manager).to_owned();
        if manager.is_empty() || manager.len() > 128 {
            anyhow::bail!("[providers.{slot}] field_manager must be 1 to 128 characters");
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kube")
            .enable_all()
            .build()
            .context("starting the Kubernetes client's runtime")?;
        let context = s.str("context").map(str::to_owned);
        let kubeconfig = s.str("kubeconfig").map(expand_home);
        let mut config = rt.block_on(async {
            let opts = kube::config::KubeConfigOptions { context: context.clone(), ..Default::default() };
            match &kubeconfig {
                Some(path) => {
                    let kc = kube::config::Kubeconfig::read_from(path)
                        .with_context(|| format!("[providers.{slot}] kubeconfig: cannot read {path}"))?;
                    kube::Config::from_custom_kubeconfig(kc, &opts)
                        .await
                        .with_context(|| format!("[providers.{slot}] kubeconfig {path}"))
                }
                None if context.is_some() => kube::Config::from_kubeconfig(&opts)
                    .await
                    .with_context(|| format!("[providers.{slot}] the default kubeconfig")),
                None => kube::Config::infer().await.with_context(|| {
                    format!(
                        "[providers.{slot}] no kubeconfig: set kubeconfig (and context), $KUBECONFIG, or run in a cluster"
                    )
                }),
            }
        })?;
        config.connect_timeout = Some(timeout.min(Duration::from_secs(10)));
        config.read_timeout = Some(timeout);
        config.write_timeout = Some(timeout);
        let server = config.cluster_url.to_string().trim_end_matches('/').to_owned();
        let identity = match (&context, &kubeconfig) {
            (Some(c), _) => format!("context `{c}`"),
            (None, Some(_)) => "the kubeconfig's current context".to_owned(),
            (None, None) => "the inferred kubeconfig context or in-cluster service account".to_owned(),
        };
        let client = {
            let _guard = rt.enter();
            kube::Client::try_from(config).with_context(|| format!("[providers.{slot}] a client for {server}"))?
        };
        Ok(Cluster { rt, client, server, identity, manager })
    }

    pub fn describe(&self) -> String {
        format!("Kubernetes API {} ({}, field manager {})", self.server, self.identity, self.manager)
    }

    /// Runs a future to completion on our runtime.
    pub fn block_on<T>(&self, f: impl Future<Output = Result<T>>) -> Result<T> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(ProviderError::Other(
                "the Kubernetes provider blocks and must not be called from inside an async runtime; call it through spawn_blocking".into(),
            ));
        }
        self.rt.block_on(f)
    }

    /// Turns a client error into a provider error naming what was being done.
    pub fn error(&self, e: kube::Error, what: &str, address: &str, read_version: Option<&str>) -> ProviderError {
        let server = &self.server;
        match e {
            kube::Error::Api(s) => {
                let msg = if s.message.is_empty() { s.reason.clone() } else { s.message.clone() };
                let code = s.code;
                match code {
                    401 => ProviderError::Denied(format!(
                        "{what}: the Kubernetes API at {server} rejected the credentials of {} (401 Unauthorized): {msg}",
                        self.identity
                    )),
                    403 => ProviderError::Denied(format!(
                        "{what}: forbidden (403) by the Kubernetes API at {server}: {msg}. The identity of {} needs RBAC permission for this (see the README's Kubernetes section); retrying will not help",
                        self.identity
                    )),
                    409 => ProviderError::Conflict {
                        address: address.to_owned(),
                        expected: match read_version {
                            Some(v) => format!("resourceVersion {v}"),
                            None => "no object".to_owned(),
                        },
                        found: format!("another version on the server: {msg}"),
                    },
                    429 | 500..=599 => ProviderError::Unavailable(format!(
                        "{what}: the Kubernetes API at {server} failed ({code} {}): {msg}",
                        s.reason
                    )),
                    _ => ProviderError::Other(format!(
                        "{what}: the Kubernetes API at {server} refused it ({code} {}): {msg}",
                        s.reason
                    )),
                }
            }
            e @ (kube::Error::HyperError(_) | kube::Error::Service(_)) => {
                ProviderError::Unavailable(format!("{what}: the Kubernetes API at {server} cannot be reached: {e}"))
            }
            other => ProviderError::Other(format!("{what}: {other}")),
        }
    }

    async fn send(
        &self,
        req: std::result::Result<http::Request<Vec<u8>>, kube::core::request::Error>,
    ) -> kube::Result<Value> {
        let req = req.map_err(kube::Error::BuildRequest)?;
        self.client.request::<Value>(req).await
    }

    /// One object, or `None` when it does not exist.
    pub async fn get(&self, kind: &Kind, ns: Option<&str>, name: &str, address: &str) -> Result<Option<Value>> {
        let what = format!("reading {} {}", kind.label(), obj_name(ns, name));
        match self.send(Request::new(kind.collection(ns)).get(name, &GetParams::default())).await {
            Ok(v) => Ok(Some(v)),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
            Err(e) => Err(self.error(e, &what, address, None)),
        }
    }

    /// Every object of `kind` (across namespaces) matching the selector, page by page.
    pub async fn list(&self, kind: &Kind, selector: &str) -> Result<Vec<Value>> {
        let what = format!("listing {} with labels {selector}", kind.label());
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut lp = ListParams::default().labels(selector).limit(PAGE);
            if let Some(t) = &token {
                lp = lp.continue_token(t);
            }
            let page = self
                .send(Request::new(kind.collection(None)).list(&lp))
                .await
                .map_err(|e| self.error(e, &what, &kind.label(), None))?;
            let items = page.get("items").and_then(Value::as_array).cloned().unwrap_or_default();
            out.extend(items);
            token =
                page.pointer("/metadata/continue").and_then(Value::as_str).filter(|t| !t.is_empty()).map(str::to_owned);
            if token.is_none() {
                return Ok(out);
            }
        }
    }

    /// Server-side apply of `body` under our field manager; returns the object as stored.
    pub async fn apply(&self, kind: &Kind, ns: Option<&str>, name: &str, body: &Value, address: &str) -> Result<Value> {
        self.apply_in(kind, ns, name, body, address).await?.ok_or_else(|| {
            ProviderError::Other(format!(
                "{address}: namespace {} does not exist; the tenant's Namespace manifest creates it (kubernetes.Namespace[{0}] comes first in the apply order)",
                ns.unwrap_or("?")
            ))
        })
    }

    /// As `apply`, with `None` when the server answers 404 (the namespace does not exist).
    pub async fn apply_in(
        &self,
        kind: &Kind,
        ns: Option<&str>,
        name: &str,
        body: &Value,
        address: &str,
    ) -> Result<Option<Value>> {
        let what = format!("applying {} {}", kind.label(), obj_name(ns, name));
        let rv = body.pointer("/metadata/resourceVersion").and_then(Value::as_str);
        let pp = PatchParams::apply(&self.manager).force().validation_strict();
        match self.send(Request::new(kind.collection(ns)).patch(name, &pp, &Patch::Apply(body))).await {
            Ok(v) => Ok(Some(v)),
            Err(kube::Error::Api(s)) if s.code == 404 && rv.is_none() => Ok(None),
            Err(e) => Err(self.error(e, &what, address, rv)),
        }
    }

    /// Deletes an object if it still has `resource_version`; already gone is fine.
    pub async fn delete(
        &self,
        kind: &Kind,
        ns: Option<&str>,
        name: &str,
        resource_version: Option<&str>,
        address: &str,
    ) -> Result<()> {
        let what = format!("deleting {} {}", kind.label(), obj_name(ns, name));
        let mut dp = DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() };
        if let Some(rv) = resource_version {
            dp.preconditions = Some(Preconditions { resource_version: Some(rv.to_owned()), uid: None });
        }
        match self.send(Request::new(kind.collection(ns)).delete(name, &dp)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(self.error(e, &what, address, resource_version)),
        }
    }

    /// The group version's discovery document (`APIResourceList`).
    pub async fn discover(&self, api_version: &str) -> Result<Value> {
        let path = match Kind::group_version(api_version) {
            ("", v) => format!("/api/{v}"),
            (g, v) => format!("/apis/{g}/{v}"),
        };
        let req = http::Request::get(&path).body(Vec::new()).map_err(|e| ProviderError::Other(e.to_string()))?;
        self.client
            .request::<Value>(req)
            .await
            .map_err(|e| self.error(e, &format!("discovering the kinds of {api_version}"), api_version, None))
    }
}

fn obj_name(ns: Option<&str>, name: &str) -> String {
    match ns {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

fn expand_home(p: &str) -> String {
    match (p.strip_prefix("~/"), std::env::var("HOME")) {
        (Some(rest), Ok(home)) => format!("{home}/{rest}"),
        _ => p.to_owned(),
    }
}

fn duration_setting(s: &ProviderSettings, slot: &str, key: &str, default: Duration) -> anyhow::Result<Duration> {
    match s.str(key) {
        None => Ok(default),
        Some(text) => parse_duration(text)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| anyhow::anyhow!("[providers.{slot}] {key} = \"{text}\" is not a duration like 30s or 5m")),
    }
}

/// Whether the object is being deleted (it counts as gone).
pub fn terminating(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp").is_some_and(|v| !v.is_null())
}

pub fn label<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj.pointer("/metadata/labels").and_then(|l| l.get(key)).and_then(Value::as_str)
}

pub fn resource_version(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/resourceVersion").and_then(Value::as_str)
}

/// The selector of what the engine manages, optionally for some tenants only.
pub fn selector(base: &str, tenants: Option<&BTreeSet<String>>) -> String {
    let label_value = |t: &str| {
        !t.is_empty()
            && t.len() <= 63
            && t.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && t.starts_with(|c: char| c.is_ascii_alphanumeric())
            && t.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    match tenants {
        Some(ts) if !ts.is_empty() && ts.len() <= SELECTOR_TENANTS && ts.iter().all(|t| label_value(t)) => {
            format!("{base},{TENANT_LABEL} in ({})", ts.iter().cloned().collect::<Vec<_>>().join(","))
        }
        _ => base.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// [providers.kubernetes]

pub struct KubeProvider {
    cluster: Cluster,
    /// The configured kinds, (apiVersion, Kind), in the order given.
    wanted: Vec<(String, String)>,
    /// Resolved on first use (discovery for kinds outside the table).
    resolved: Mutex<Option<Vec<Kind>>>,
    rollout_timeout: Duration,
}

/// A live object of ours: where it is and what of it is ours.
struct Found {
    namespace: Option<String>,
    resource_version: Option<String>,
    projection: Value,
}

impl KubeProvider {
    pub fn connect(s: &ProviderSettings) -> anyhow::Result<KubeProvider> {
        let cluster = Cluster::connect(s, "kubernetes", MANAGED_BY.1)?;
        let rollout_timeout = duration_setting(s, "kubernetes", "rollout_timeout", Duration::from_secs(300))?;
        let mut wanted: Vec<(String, String)> =
            kinds::DEFAULT_KINDS.iter().filter_map(|e| kinds::parse_entry(e)).collect();
        if let Some(extra) = s.options.get("kinds") {
            let list =
                extra.as_array().ok_or_else(|| anyhow::anyhow!("[providers.kubernetes] kinds must be a list"))?;
            for e in list {
                let text = e.as_str().unwrap_or_default();
                let (api, kind) = kinds::parse_entry(text).ok_or_else(|| {
                    anyhow::anyhow!(
                        "[providers.kubernetes] kinds: `{text}` is not apiVersion/Kind (like \"v1/Service\" or \"policy/v1/PodDisruptionBudget\")"
                    )
                })?;
                if kind == "Secret" {
                    anyhow::bail!(
                        "[providers.kubernetes] kinds: Secret manifests are not managed (secrets go to OpenBao; a manifest would hold only placeholders)"
                    );
                }
                if let Some((a, _)) = wanted.iter().find(|(_, k)| *k == kind) {
                    if *a != api {
                        anyhow::bail!(
                            "[providers.kubernetes] kinds: {kind} appears as {a} and as {api}; addresses name the kind only, so keep one"
                        );
                    }
                    continue;
                }
                wanted.push((api, kind));
            }
        }
        Ok(KubeProvider { cluster, wanted, resolved: Mutex::new(None), rollout_timeout })
    }

    /// The configured kinds, resolved (once).
    async fn kinds(&self) -> Result<Vec<Kind>> {
        if let Some(k) = self.resolved.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(k);
        }
        let mut out = Vec::new();
        let mut docs: HashMap<String, Value> = HashMap::new();
        for (api, kind) in &self.wanted {
            if let Some(k) = Kind::well_known(api, kind) {
                out.push(k);
                continue;
            }
            if !docs.contains_key(api) {
                docs.insert(api.clone(), self.cluster.discover(api).await?);
            }
            let k = kinds::from_discovery(&docs[api], api, kind).ok_or_else(|| {
                ProviderError::Other(format!(
                    "[providers.kubernetes] kinds: the API server at {} does not serve {kind} in {api}",
                    self.cluster.server
                ))
            })?;
            out.push(k);
        }
        *self.resolved.lock().unwrap_or_else(|p| p.into_inner()) = Some(out.clone());
        Ok(out)
    }

    /// The resolved kind of an address's kind name.
    async fn kind_of(&self, a: &Address, api_version: Option<&str>) -> Result<Kind> {
        let ResourceKind::Kubernetes(name) = &a.kind else {
            return Err(ProviderError::Other(format!("{a} is not a Kubernetes resource")));
        };
        if name == "Secret" {
            return Err(ProviderError::Other(format!(
                "{a}: Secret manifests are not managed: secrets are delivered through OpenBao, and a manifest would hold only ${{SECRET:..}} placeholders"
            )));
        }
        let all = self.kinds().await?;
        match all.into_iter().find(|k| &k.kind == name) {
            Some(k) if api_version.is_none_or(|v| v == k.api_version) => Ok(k),
            Some(k) => Err(ProviderError::Other(format!(
                "{a}: the manifest says apiVersion {}, but [providers.kubernetes] kinds reads {} as {}",
                api_version.unwrap_or_default(),
                name,
                k.api_version
            ))),
            None => Err(ProviderError::Other(format!(
                "{a}: kind {name} is not read by plans; add \"{}/{name}\" to [providers.kubernetes] kinds",
                api_version.or_else(|| kinds::api_version_of(name)).unwrap_or("<apiVersion>")
            ))),
        }
    }

    fn base_selector() -> String {
        format!("{}={},!{RESOURCE_LABEL}", MANAGED_BY.0, MANAGED_BY.1)
    }

    /// Our live objects of one kind, for some tenants (all when `None`), by address.
    async fn list_kind(&self, kind: &Kind, tenants: Option<&BTreeSet<String>>) -> Result<BTreeMap<Address, Found>> {
        let items = self.cluster.list(kind, &selector(&Self::base_selector(), tenants)).await?;
        let mut out: BTreeMap<Address, Found> = BTreeMap::new();
        for obj in items {
            if terminating(&obj) {
                continue;
            }
            let Some(tenant) = label(&obj, TENANT_LABEL) else { continue };
            if tenants.is_some_and(|ts| !ts.contains(tenant)) {
                continue;
            }
            let Some(projection) = project::project(&obj, &self.cluster.manager, &kind.api_version, &kind.kind) else {
                continue;
            };
            let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
            let namespace = obj.pointer("/metadata/namespace").and_then(Value::as_str).map(str::to_owned);
            let address = Address::new(tenant, ResourceKind::kubernetes(&kind.kind), Some(name));
            if let Some(other) = out.get(&address) {
                return Err(ProviderError::Other(format!(
                    "{address}: two live {} objects named {name} carry tenant {tenant} (namespaces {} and {}); delete the one the repository does not declare",
                    kind.kind,
                    other.namespace.as_deref().unwrap_or("-"),
                    namespace.as_deref().unwrap_or("-"),
                )));
            }
            out.insert(
                address,
                Found { namespace, resource_version: resource_version(&obj).map(str::to_owned), projection },
            );
        }
        Ok(out)
    }

    fn live(address: Address, projection: Value) -> LiveResource {
        let content = Content::Json(projection);
        LiveResource { address, fingerprint: fingerprint::of(&content), content: Some(Box::new(content)) }
    }

    /// Waits for a Deployment's rollout of `generation`.
    async fn wait_rollout(
        &self,
        kind: &Kind,
        ns: Option<&str>,
        name: &str,
        generation: i64,
        a: &str,
    ) -> std::result::Result<(), String> {
        let deadline = Instant::now() + self.rollout_timeout;
        let mut delay = Duration::from_millis(100);
        loop {
            let obj = match self.cluster.get(kind, ns, name, a).await {
                Ok(Some(o)) => o,
                Ok(None) => return Err("the Deployment was deleted during its rollout".into()),
                Err(e) => return Err(format!("reading its rollout status failed: {e}")),
            };
            let last = match rollout::status(&obj, generation) {
                rollout::Rollout::Complete => return Ok(()),
                rollout::Rollout::Failed(m) => return Err(format!("the rollout failed: {m}")),
                rollout::Rollout::Progressing(m) => m,
            };
            if Instant::now() + delay > deadline {
                return Err(format!(
                    "the rollout did not complete within {} (last seen: {last})",
                    human(self.rollout_timeout)
                ));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_millis() != 0 || s == 0 {
        format!("{}ms", d.as_millis())
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// The first place where two JSON values differ: (pointer, left, right).
pub fn first_difference(a: &Value, b: &Value) -> Option<(String, String, String)> {
    fn rec(a: Option<&Value>, b: Option<&Value>, at: &str) -> Option<(String, String, String)> {
        let show = |v: Option<&Value>| v.map_or("nothing".to_owned(), Value::to_string);
        match (a, b) {
            (Some(Value::Object(x)), Some(Value::Object(y))) => {
                let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                keys.into_iter()
                    .find_map(|k| rec(x.get(k), y.get(k), &format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"))))
            }
            (Some(Value::Array(x)), Some(Value::Array(y))) if x.len() == y.len() => {
                x.iter().zip(y).enumerate().find_map(|(i, (p, q))| rec(Some(p), Some(q), &format!("{at}/{i}")))
            }
            (x, y) if x == y => None,
            (x, y) => Some((if at.is_empty() { "/".into() } else { at.to_owned() }, show(x), show(y))),
        }
    }
    rec(Some(a), Some(b), "")
}

/// Checks a manifest before it is sent, and returns (apiVersion, namespace).
fn check_manifest(a: &Address, obj: &Map<String, Value>, kind: &Kind) -> Result<Option<String>> {
    let name = a.name.as_deref().unwrap_or_default();
    let meta = obj.get("metadata").and_then(Value::as_object);
    if meta.and_then(|m| m.get("name")).and_then(Value::as_str) != Some(name) {
        return Err(ProviderError::Other(format!("{a}: the manifest's metadata.name is not `{name}`")));
    }
    if obj.get("kind").and_then(Value::as_str) != Some(kind.kind.as_str()) {
        return Err(ProviderError::Other(format!("{a}: the manifest's kind is not {}", kind.kind)));
    }
    let labels = meta.and_then(|m| m.get("labels")).and_then(Value::as_object);
    if labels.and_then(|l| l.get(TENANT_LABEL)).and_then(Value::as_str) != Some(a.tenant.as_str())
        || labels.and_then(|l| l.get(MANAGED_BY.0)).and_then(Value::as_str) != Some(MANAGED_BY.1)
    {
        return Err(ProviderError::Other(format!(
            "{a}: the manifest must carry the labels {}={} and {TENANT_LABEL}={} (rendering adds them)",
            MANAGED_BY.0, MANAGED_BY.1, a.tenant
        )));
    }
    let ns = meta.and_then(|m| m.get("namespace")).and_then(Value::as_str).filter(|s| !s.is_empty());
    match (kind.namespaced, ns) {
        (true, None) => Err(ProviderError::Other(format!(
            "{a}: a {} is namespaced: its manifest must set metadata.namespace (for example dotmac-tenant-{})",
            kind.kind, a.tenant
        ))),
        (false, Some(ns)) => Err(ProviderError::Other(format!(
            "{a}: a {} is not namespaced; remove metadata.namespace ({ns}) from its manifest",
            kind.kind
        ))),
        (_, ns) => Ok(ns.map(str::to_owned)),
    }
}

impl Provider for KubeProvider {
    fn id(&self) -> ProviderId {
        ProviderId::Kubernetes
    }

    fn describe(&self) -> String {
        self.cluster.describe()
    }

    fn list(&self, scope: &TenantScope) -> Result<Vec<LiveResource>> {
        let tenants = match scope {
            TenantScope::All => None,
            TenantScope::Only(s) => Some(s),
        };
        if tenants.is_some_and(BTreeSet::is_empty) {
            return Ok(Vec::new());
        }
        self.cluster.block_on(async {
            let mut out = Vec::new();
            for kind in self.kinds().await? {
                for (address, found) in self.list_kind(&kind, tenants).await? {
                    out.push(Self::live(address, found.projection));
                }
            }
            Ok(out)
        })
    }

    fn fetch(&self, addresses: &[Address]) -> Result<Vec<LiveResource>> {
        self.cluster.block_on(async {
            let mut by_kind: BTreeMap<String, (Kind, BTreeSet<String>)> = BTreeMap::new();
            for a in addresses {
                let kind = self.kind_of(a, None).await?;
                by_kind
                    .entry(kind.kind.clone())
                    .or_insert_with(|| (kind, BTreeSet::new()))
                    .1
                    .insert(a.tenant.to_string());
            }
            let wanted: BTreeSet<&Address> = addresses.iter().collect();
            let mut out = Vec::new();
            for (kind, tenants) in by_kind.values() {
                for (address, found) in self.list_kind(kind, Some(tenants)).await? {
                    if wanted.contains(&address) {
                        out.push(Self::live(address, found.projection));
                    }
                }
            }
            Ok(out)
        })
    }

    fn put(&self, r: &Resource, _secret: Option<&SecretValue>, expect: &Expect) -> Result<LiveResource> {
        let a = &r.address;
        let Content::Json(Value::Object(obj)) = &*r.content else {
            return Err(ProviderError::Other(format!("{a}: a Kubernetes manifest must be a mapping")));
        };
        let api_version = obj.get("apiVersion").and_then(Value::as_str);
        let name = a.name.clone().unwrap_or_default();
        let addr = a.to_string();
        self.cluster.block_on(async {
            let kind = self.kind_of(a, api_version).await?;
            let ns = check_manifest(a, obj, &kind)?;
            let ns = ns.as_deref();
            let current = self.cluster.get(&kind, ns, &name, &addr).await?;
            if let Some(cur) = current.as_ref().filter(|c| terminating(c)) {
                return Err(ProviderError::Unavailable(format!(
                    "{a}: {} {} is being deleted (since {}); apply again once it is gone",
                    kind.kind,
                    obj_name(ns, &name),
                    cur.pointer("/metadata/deletionTimestamp").and_then(Value::as_str).unwrap_or("?")
                )));
            }
            let before = current.as_ref().and_then(|c| project::project(c, &self.cluster.manager, &kind.api_version, &kind.kind));
            let before_fp = before.as_ref().map(|b| fingerprint::of(&Content::Json(b.clone())));
            expect.check(a, before_fp.as_ref())?;
            let mut body = Value::Object(obj.clone());
            if let Some(rv) = current.as_ref().and_then(resource_version) {
                body["metadata"]["resourceVersion"] = Value::String(rv.to_owned());
            }
            let stored = self.cluster.apply(&kind, ns, &name, &body, &addr).await?;
            let after = project::project(&stored, &self.cluster.manager, &kind.api_version, &kind.kind).ok_or_else(|| {
                ProviderError::Other(format!(
                    "{a}: the API server did not record field manager {} on the applied object (is server-side apply available?)",
                    self.cluster.manager
                ))
            })?;
            if let Some((pointer, sent, stored)) = first_difference(&Value::Object(obj.clone()), &after) {
                tracing::warn!(
                    "{a}: the API server stores this manifest differently from how it is written (at {pointer}: sent {sent}, stored {stored}); write it the way the server does, or every plan will show an update"
                );
            }
            if kind.kind == "Deployment" {
                let generation = stored.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0);
                if let Err(why) = self.wait_rollout(&kind, ns, &name, generation, &addr).await {
                    let undone = match &before {
                        Some(b) => self.cluster.apply(&kind, ns, &name, b, &addr).await.map(|_| "restored to what it was before this write"),
                        None => self.cluster.delete(&kind, ns, &name, None, &addr).await.map(|_| "that this write created was removed"),
                    };
                    let tail = match undone {
                        Ok(done) => format!("the Deployment {done}"),
                        Err(e) => format!("undoing the write failed too: {e}"),
                    };
                    return Err(ProviderError::Unavailable(format!(
                        "{a}: Deployment {}: {why}; {tail}",
                        obj_name(ns, &name)
                    )));
                }
            }
            Ok(Self::live(a.clone(), after))
        })
    }

    fn delete(&self, a: &Address, expect: &Expect, _destroy: bool) -> Result<()> {
        let addr = a.to_string();
        self.cluster.block_on(async {
            let kind = self.kind_of(a, None).await?;
            let tenants = BTreeSet::from([a.tenant.to_string()]);
            let mut found = self.list_kind(&kind, Some(&tenants)).await?;
            let Some(f) = found.remove(a) else { return Ok(()) };
            let fp = fingerprint::of(&Content::Json(f.projection));
            expect.check(a, Some(&fp))?;
            let name = a.name.as_deref().unwrap_or_default();
            self.cluster.delete(&kind, f.namespace.as_deref(), name, f.resource_version.as_deref(), &addr).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let base = KubeProvider::base_selector();
        assert_eq!(base, "app.kubernetes.io/managed-by=dotmac-gitops,!dotmac.io/resource");
        let ts: BTreeSet<String> = ["b".to_owned(), "a-1".to_owned()].into();
        assert_eq!(selector(&base, Some(&ts)), format!("{base},dotmac.io/tenant in (a-1,b)"));
        let odd: BTreeSet<String> = ["-x".to_owned()].into();
        assert_eq!(selector(&base, Some(&odd)), base, "a value that is not a label value is filtered after listing");
        assert_eq!(selector(&base, None), base);
    }

    #[test]
    fn expectations() {
        let a = Address::parse("t/kubernetes.ConfigMap[c]").unwrap();
        assert!(Expect::Absent.check(&a, None).is_ok());
        assert!(matches!(Expect::Absent.check(&a, Some(&"sha256:x".into())), Err(ProviderError::Conflict { .. })));
        assert!(Expect::Fingerprint("f".into()).check(&a, Some(&"f".into())).is_ok());
        assert!(Expect::Any.check(&a, Some(&"f".into())).is_ok());
    }

    #[test]
    fn manifests_are_checked_before_sending() {
        let a = Address::parse("t/kubernetes.ConfigMap[c]").unwrap();
        let cm = Kind::well_known("v1", "ConfigMap").unwrap();
        let good = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "dotmac-tenant-t",
            "labels": {"app.kubernetes.io/managed-by": "dotmac-gitops", "dotmac.io/tenant": "t"}}});
        assert_eq!(check_manifest(&a, good.as_object().unwrap(), &cm).unwrap().as_deref(), Some("dotmac-tenant-t"));
        let mut no_ns = good.clone();
        no_ns["metadata"].as_object_mut().unwrap().remove("namespace");
        let e = check_manifest(&a, no_ns.as_object().unwrap(), &cm).unwrap_err().to_string();
        assert!(e.contains("must set metadata.namespace"), "{e}");
        let mut wrong_tenant = good.clone();
        wrong_tenant["metadata"]["labels"]["dotmac.io/tenant"] = "u".into();
        assert!(check_manifest(&a, wrong_tenant.as_object().unwrap(), &cm).is_err());
    }

    #[test]
    fn differences_are_located() {
        use serde_json::json;
        let sent = json!({"spec": {"containers": [{"cpu": "1000m", "name": "a"}], "x/y": 1}});
        let stored = json!({"spec": {"containers": [{"cpu": "1", "name": "a"}], "x/y": 1}});
        assert_eq!(
            first_difference(&sent, &stored),
            Some(("/spec/containers/0/cpu".into(), "\"1000m\"".into(), "\"1\"".into()))
        );
        assert_eq!(first_difference(&sent, &sent), None);
        assert_eq!(
            first_difference(&json!({"a/b": 1}), &json!({})),
            Some(("/a~1b".into(), "1".into(), "nothing".into()))
        );
    }

    #[test]
    fn durations_print_as_written() {
        assert_eq!(human(Duration::from_secs(300)), "5m");
        assert_eq!(human(Duration::from_secs(2)), "2s");
        assert_eq!(human(Duration::from_millis(1500)), "1500ms");
    }
}
