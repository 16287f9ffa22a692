//! `kind = "openbao"`: secrets and ACL policies in a real OpenBao (or Vault) server.
//!
//! ```text
//! <mount>/dotmac/tenants/<tenant>/<name>     KV v2, the value under the key `value`
//! sys/policies/acl/<tenant>-<template stem>  the rendered openbao/*.hcl.j2 (an ACL policy)
//! ```
//!
//! - **Live state is metadata only**: a secret's current version, when that version was
//!   written, when the secret was created and whether the current version is deleted or
//!   destroyed. Values are never read, except by `restore_secret` (a rollback), which reads an
//!   old version and writes it back as a new one without the value leaving this module.
//! - **Listing**: one LIST per folder of a tenant (names may contain `/`), then one metadata
//!   read per secret, many at a time; policies with one LIST of `sys/policy` and one read
//!   per policy whose name starts with a tenant in scope (`a-b-x` may be tenant `a`'s or
//!   tenant `a-b`'s: it is offered under both, and the plan ignores the one that neither
//!   wants nor recorded it). With `TenantScope::All`, only the tenants the session names
//!   (the repository's and the state's) are read: the others are not ours.
//! - **Writes use check-and-set**: `Expect::Absent` writes with `cas=0`, an expected `vN`
//!   with `cas=N`; another writer in between makes KV v2 refuse the write, which becomes a
//!   `ProviderError::Conflict`. Policies (through `sys/policies/acl`) are read and compared
//!   with the expectation, then written with OpenBao's `cas` on the version read (Vault has
//!   no policy versions: there, the read-and-compare is all).
//! - **Deletes** are soft (KV v2 delete of the current version, which keeps every version)
//!   unless `destroy` is asked (`--destroy-secrets`), which removes the metadata and every
//!   version.
//!
//! The `Provider` trait is synchronous. This provider owns a small tokio runtime and blocks
//! on it, so **it must not be called from inside a tokio runtime** (a daemon calls it
//! through `spawn_blocking`); doing so is an error, not a panic.

mod transport;

use super::secret_value::SecretValue;
use super::{Expect, LiveResource, Provider, ProviderError, Result, Session, TenantScope};
use crate::fingerprint;
use crate::load::settings::{ProviderSettings, parse_duration};
use crate::model::{Address, Content, ProviderId, Resource, ResourceKind, SecretMeta};
use anyhow::{Context, bail};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use transport::{Failure, Op, Transport};
use vaultrs::api::kv2::requests::SetSecretRequestOptions;
use vaultrs::api::kv2::responses::ReadSecretMetadataResponse;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::{kv2, sys};

/// Where a tenant's secrets live, under the mount.
pub const TENANTS_ROOT: &str = "dotmac/tenants";
/// The KV v2 key holding a secret's value.
pub const VALUE_KEY: &str = "value";
/// Requests in flight at once while listing.
const CONCURRENCY: usize = 16;

/// The settings of `[providers.secrets]` that this provider reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub address: String,
    pub mount: String,
    pub token_env: String,
    pub namespace: Option<String>,
    pub ca_cert: Option<String>,
    pub timeout: Duration,
}

impl Config {
    pub fn from_settings(s: &ProviderSettings) -> anyhow::Result<Config> {
        let address = s
            .str("address")
            .context(
                "[providers.secrets] kind = \"openbao\" needs `address`, such as \"https://bao.example.net:8200\"",
            )?
            .trim_end_matches('/')
            .to_owned();
        if !(address.starts_with("http://") || address.starts_with("https://")) {
            bail!("[providers.secrets] address `{address}` must start with http:// or https://");
        }
        let mount = s.str("mount").unwrap_or("secret").trim_matches('/').to_owned();
        if mount.is_empty() {
            bail!("[providers.secrets] mount must name a KV v2 mount, such as \"secret\"");
        }
        let timeout = match s.str("timeout") {
            None => Duration::from_secs(30),
            Some(t) => parse_duration(t)
                .filter(|d| !d.is_zero())
                .with_context(|| format!("[providers.secrets] timeout `{t}` is not a duration such as 30s"))?,
        };
        Ok(Config {
            address,
            mount,
            token_env: s.str("token_env").unwrap_or("BAO_TOKEN").to_owned(),
            namespace: s.str("namespace").map(|n| n.trim_matches('/').to_owned()).filter(|n| !n.is_empty()),
            ca_cert: s.str("ca_cert").map(str::to_owned),
            timeout,
        })
    }

    /// The path of a tenant's secret under the mount: `dotmac/tenants/<tenant>/<name>`.
    pub fn secret_path(tenant: &str, name: &str) -> String {
        format!("{TENANTS_ROOT}/{tenant}/{name}")
    }

    /// The command a person runs to create an external secret (the value from stdin, so it
    /// stays out of the shell history).
    pub fn put_command(&self, tenant: &str, name: &str) -> String {
        let ns = self.namespace.as_deref().map(|n| format!(" -namespace={n}")).unwrap_or_default();
        format!("bao kv put{ns} -mount={} {} {VALUE_KEY}=-", self.mount, Self::secret_path(tenant, name))
    }
}

/// Installs rustls' process-wide crypto provider (ring) if none is installed yet. `reqwest`
/// is built without one, so that exactly one provider is compiled in.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub struct OpenBao {
    /// Always `Some` until dropped.
    rt: Option<tokio::runtime::Runtime>,
    t: Arc<Transport>,
    cfg: Config,
    /// The tenants the repository and the state know (from `begin`): what
    /// `TenantScope::All` needs to read. `None` until a session begins: then every tenant
    /// folder and every policy named like a tenant's is read.
    known: std::sync::RwLock<Option<std::collections::BTreeSet<String>>>,
}

impl std::fmt::Debug for OpenBao {
    /// Names the server and the token's variable, never the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenBao").field("config", &self.cfg).field("transport", &self.t).finish()
    }
}

impl OpenBao {
    /// Reads the token from `$token_env` and prepares the client. Nothing is sent yet: the
    /// first request checks the server's health and looks the token up.
    pub fn open(settings: &ProviderSettings) -> anyhow::Result<OpenBao> {
        let cfg = Config::from_settings(settings)?;
        let token = std::env::var(&cfg.token_env).ok().filter(|t| !t.trim().is_empty()).with_context(|| {
            format!(
                "[providers.secrets] token_env names ${}, which is not set: export the OpenBao token in it",
                cfg.token_env
            )
        })?;
        let token = token.trim().to_owned();
        if let Some(ca) = &cfg.ca_cert {
            std::fs::metadata(ca).with_context(|| format!("[providers.secrets] ca_cert `{ca}` cannot be read"))?;
        }
        install_crypto_provider();
        let mut b = VaultClientSettingsBuilder::default();
        b.address(&cfg.address)
            .token(token.clone())
            .timeout(Some(cfg.timeout))
            .namespace(cfg.namespace.clone())
            .ca_certs(cfg.ca_cert.iter().cloned().collect())
            .identity(None)
            .verify(true);
        let vs = b.build().map_err(|e| anyhow::anyhow!("[providers.secrets] address `{}`: {e}", cfg.address))?;
        let vault = VaultClient::new(vs).map_err(|e| anyhow::anyhow!("OpenBao client for {}: {e}", cfg.address))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("openbao")
            .enable_all()
            .build()
            .context("starting the OpenBao client's runtime")?;
        let t = Arc::new(Transport::new(vault, cfg.address.clone(), cfg.token_env.clone(), token, cfg.timeout));
        Ok(OpenBao { rt: Some(rt), t, cfg, known: std::sync::RwLock::new(None) })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Runs a future on the provider's runtime.
    fn block<T>(&self, f: impl Future<Output = Result<T>>) -> Result<T> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(ProviderError::Other(
                "the OpenBao provider was called from inside a tokio runtime; call it through spawn_blocking".into(),
            ));
        }
        match &self.rt {
            Some(rt) => rt.block_on(f),
            None => Err(ProviderError::Other("the OpenBao provider is shutting down".into())),
        }
    }

    fn describe_path(&self, path: &str) -> String {
        format!("{}/{path}", self.cfg.mount)
    }

    /// `<mount>/metadata/<path>`, the API path in messages.
    fn metadata_api(&self, path: &str) -> String {
        format!("{}/metadata/{path}", self.cfg.mount)
    }
}

impl Drop for OpenBao {
    /// Without waiting for the runtime's threads, so that a daemon may drop the provider
    /// inside async code (dropping a runtime there would panic).
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A failure as the trait reports it, for `address` (empty: the messages say enough).
fn to_provider(f: Failure, address: &str) -> ProviderError {
    match f {
        Failure::Denied(m) => ProviderError::Denied(m),
        Failure::Unavailable(m) => ProviderError::Unavailable(m),
        Failure::Other(m) if address.is_empty() => ProviderError::Other(m),
        Failure::Other(m) => ProviderError::Other(format!("{address}: {m}")),
        Failure::NotFound => ProviderError::Other(format!("{address}: not found in OpenBao")),
        Failure::CasMismatch => ProviderError::Other(format!("{address}: check-and-set refused the write")),
    }
}

/// Tenant ids as the repository format allows them (lower case, digits, inner dashes).
fn is_tenant_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// OpenBao stores policy names in lower case; names are also part of the API path.
fn is_policy_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
        && !s.starts_with('.')
}

/// The tenants a policy name may belong to: every prefix before a `-` that is a tenant id
/// (`a-b-read-secrets` may be tenant `a`'s `b-read-secrets` or tenant `a-b`'s
/// `read-secrets`). Addresses of tenants that neither want nor recorded the policy are
/// ignored by the plan, so offering every reading is safe.
pub fn policy_tenants(name: &str) -> Vec<&str> {
    name.match_indices('-').map(|(i, _)| &name[..i]).filter(|p| is_tenant_id(p)).collect()
}

/// The live metadata of a secret, as the diff reads it.
pub fn meta_of(m: &ReadSecretMetadataResponse, now: Timestamp) -> SecretMeta {
    let current = m.versions.get(&m.current_version.to_string());
    let deleted = match current {
        None => true,
        Some(v) => {
            v.destroyed
                || (!v.deletion_time.is_empty()
                    && v.deletion_time.parse::<Timestamp>().map(|t| t <= now).unwrap_or(true))
        }
    };
    SecretMeta {
        version: m.current_version,
        updated: current.map(|v| v.created_time.clone()).unwrap_or_else(|| m.updated_time.clone()),
        created: m.created_time.clone(),
        deleted,
        placeholder: false,
    }
}

fn secret_live(address: Address, meta: SecretMeta) -> LiveResource {
    let content = Content::SecretMeta(meta);
    LiveResource { address, fingerprint: fingerprint::of(&content), content: Some(Box::new(content)) }
}

fn policy_live(address: Address, text: String) -> LiveResource {
    let content = Content::Text(text);
    LiveResource { address, fingerprint: fingerprint::of(&content), content: Some(Box::new(content)) }
}

/// The version a fingerprint (`v3`, `v3-deleted`) names.
fn version_of(fp: &str) -> Option<u64> {
    fp.strip_prefix('v')?.trim_end_matches("-deleted").parse().ok()
}

/// The value of a secret as written: `{"value": "..."}`.
#[derive(Serialize)]
struct Payload<'a> {
    value: &'a str,
}

/// A stored version's value, read only to restore it; moved straight into a `SecretValue`.
struct Stored(SecretValue);

impl<'de> Deserialize<'de> for Stored {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Stored(SecretValue::from_bytes(s.into_bytes())))
    }
}

#[derive(Deserialize)]
struct StoredPayload {
    value: Stored,
}

/// What one address is, in OpenBao terms.
enum Target {
    Secret { path: String },
    Policy { name: String },
}

fn target(a: &Address) -> Result<Target> {
    let name = a.name.as_deref().unwrap_or_default();
    match a.kind {
        ResourceKind::OpenbaoSecret
            if is_tenant_id(&a.tenant) && crate::validate::checks::secret_name_problem(name).is_none() =>
        {
            Ok(Target::Secret { path: Config::secret_path(&a.tenant, name) })
        }
        ResourceKind::OpenbaoPolicy if is_policy_name(name) => Ok(Target::Policy { name: name.to_owned() }),
        ResourceKind::OpenbaoPolicy => Err(ProviderError::Other(format!(
            "{a}: `{name}` cannot be an OpenBao policy name (OpenBao keeps policy names in lower case; use lower-case letters, digits, '-', '_' and '.' in the template's file name)"
        ))),
        _ => Err(ProviderError::Other(format!("{a}: not an OpenBao resource"))),
    }
}

/// Runs `f` over `items`, `CONCURRENCY` at a time; the results in the items' order. The
/// first failure stops the rest.
async fn each<I, T, F, Fut>(items: Vec<I>, f: F) -> std::result::Result<Vec<T>, Failure>
where
    F: Fn(I) -> Fut,
    Fut: Future<Output = std::result::Result<T, Failure>> + Send + 'static,
    T: Send + 'static,
{
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut set = tokio::task::JoinSet::new();
    let n = items.len();
    for (i, item) in items.into_iter().enumerate() {
        let fut = f(item);
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            (i, fut.await)
        });
    }
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((i, Ok(v))) => out[i] = Some(v),
            Ok((_, Err(e))) => {
                set.abort_all();
                return Err(e);
            }
            Err(e) => {
                set.abort_all();
                return Err(Failure::Other(format!("an OpenBao request task failed: {e}")));
            }
        }
    }
    Ok(out.into_iter().flatten().collect())
}

/// The requests, as free functions over a shared transport (so they can run as tasks).
mod ops {
    use super::*;

    pub async fn read_metadata(
        t: &Transport,
        mount: &str,
        path: &str,
    ) -> std::result::Result<Option<ReadSecretMetadataResponse>, Failure> {
        let op = Op::read("read the metadata of", format!("{mount}/metadata/{path}"));
        match t.call(&op, || kv2::read_metadata(&t.vault, mount, path)).await {
            Ok(m) => Ok(Some(m)),
            Err(Failure::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The keys directly under a folder (folders end in `/`); a missing folder is empty.
    pub async fn list(t: &Transport, mount: &str, folder: &str) -> std::result::Result<Vec<String>, Failure> {
        let op = Op::read("list", format!("{mount}/metadata/{folder}"));
        match t.call(&op, || kv2::list(&t.vault, mount, folder)).await {
            Ok(keys) => Ok(keys),
            Err(Failure::NotFound) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Every secret name under a tenant's folder, recursively.
    pub async fn tenant_names(t: &Transport, mount: &str, tenant: &str) -> std::result::Result<Vec<String>, Failure> {
        let base = format!("{TENANTS_ROOT}/{tenant}/");
        let mut names = Vec::new();
        let mut folders = vec![String::new()];
        while let Some(rel) = folders.pop() {
            for key in list(t, mount, &format!("{base}{rel}")).await? {
                if key.ends_with('/') {
                    // Bounded by the secret name rules: at most 128 characters.
                    if rel.len() + key.len() <= 128 {
                        folders.push(format!("{rel}{key}"));
                    }
                } else {
                    names.push(format!("{rel}{key}"));
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// A policy's text and, on OpenBao, its version (for check-and-set); `None` if absent.
    pub async fn read_policy(t: &Transport, name: &str) -> std::result::Result<Option<AclPolicy>, Failure> {
        let op = Op::read("read policy", format!("sys/policies/acl/{name}"));
        let read = || vaultrs::api::exec_with_result(&t.vault, AclPolicyRequest { name: name.to_owned() });
        match t.call(&op, read).await {
            Ok(p) => Ok(Some(p)),
            Err(Failure::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes a policy; with `cas`, only if its version is still `cas` (0: only if absent).
    pub async fn write_policy(
        t: &Transport,
        name: &str,
        text: &str,
        cas: Option<u64>,
    ) -> std::result::Result<(), Failure> {
        let op = Op::write("write policy", format!("sys/policies/acl/{name}"));
        let write = || {
            let body = WriteAclPolicy { name: name.to_owned(), policy: text.to_owned(), cas };
            vaultrs::api::exec_with_empty(&t.vault, body)
        };
        t.call(&op, write).await
    }
}

/// `GET sys/policies/acl/<name>`. Unlike `sys/policy/<name>` (which `vaultrs` wraps), it
/// tells OpenBao's policy version, which makes check-and-set writes possible.
struct AclPolicyRequest {
    name: String,
}

#[derive(Deserialize)]
pub struct AclPolicy {
    pub policy: String,
    /// OpenBao only; Vault has no policy versions.
    #[serde(default)]
    pub version: Option<u64>,
}

impl rustify::endpoint::Endpoint for AclPolicyRequest {
    type Response = AclPolicy;
    const REQUEST_BODY_TYPE: rustify::enums::RequestType = rustify::enums::RequestType::JSON;
    const RESPONSE_BODY_TYPE: rustify::enums::ResponseType = rustify::enums::ResponseType::JSON;
    fn path(&self) -> String {
        format!("sys/policies/acl/{}", self.name)
    }
    fn method(&self) -> rustify::enums::RequestMethod {
        rustify::enums::RequestMethod::GET
    }
}

/// `DELETE sys/policies/acl/<name>`.
struct DeleteAclPolicy {
    name: String,
}

impl rustify::endpoint::Endpoint for DeleteAclPolicy {
    type Response = ();
    const REQUEST_BODY_TYPE: rustify::enums::RequestType = rustify::enums::RequestType::JSON;
    const RESPONSE_BODY_TYPE: rustify::enums::ResponseType = rustify::enums::ResponseType::JSON;
    fn path(&self) -> String {
        format!("sys/policies/acl/{}", self.name)
    }
    fn method(&self) -> rustify::enums::RequestMethod {
        rustify::enums::RequestMethod::DELETE
    }
}

/// `PUT sys/policies/acl/<name>` with OpenBao's `cas`.
struct WriteAclPolicy {
    name: String,
    policy: String,
    cas: Option<u64>,
}

impl rustify::endpoint::Endpoint for WriteAclPolicy {
    type Response = ();
    const REQUEST_BODY_TYPE: rustify::enums::RequestType = rustify::enums::RequestType::JSON;
    const RESPONSE_BODY_TYPE: rustify::enums::ResponseType = rustify::enums::ResponseType::JSON;
    fn path(&self) -> String {
        format!("sys/policies/acl/{}", self.name)
    }
    fn method(&self) -> rustify::enums::RequestMethod {
        rustify::enums::RequestMethod::PUT
    }
    fn body(&self) -> std::result::Result<Option<Vec<u8>>, rustify::errors::ClientError> {
        let mut body = serde_json::json!({ "policy": self.policy });
        if let Some(c) = self.cas {
            body["cas"] = c.into();
        }
        serde_json::to_vec(&body)
            .map(Some)
            .map_err(|e| rustify::errors::ClientError::DataParseError { source: e.into() })
    }
}

impl OpenBao {
    async fn live_of(&self, a: Address) -> Result<Option<LiveResource>> {
        let t = &self.t;
        let mount = &self.cfg.mount;
        let s = a.to_string();
        match target(&a)? {
            Target::Secret { path } => Ok(ops::read_metadata(t, mount, &path)
                .await
                .map_err(|f| to_provider(f, &s))?
                .map(|m| secret_live(a, meta_of(&m, Timestamp::now())))),
            Target::Policy { name } => {
                Ok(ops::read_policy(t, &name).await.map_err(|f| to_provider(f, &s))?.map(|p| policy_live(a, p.policy)))
            }
        }
    }

    /// Writes `value` as a new version of the secret at `path`, with check-and-set.
    async fn write_secret(
        &self,
        a: &Address,
        path: &str,
        value: &SecretValue,
        cas: Option<u64>,
    ) -> Result<LiveResource> {
        let t = &self.t;
        let mount = self.cfg.mount.as_str();
        let s = a.to_string();
        let text = std::str::from_utf8(value.expose())
            .map_err(|_| ProviderError::Other(format!("{s}: the value is not UTF-8 text; OpenBao stores text")))?;
        let payload = Payload { value: text };
        let cas = match cas {
            Some(c) => {
                Some(u32::try_from(c).map_err(|_| ProviderError::Other(format!("{s}: version {c} is too large")))?)
            }
            None => None,
        };
        let op = Op::write("write a new version of", format!("{mount}/data/{path}"));
        let written = t
            .call(&op, || async {
                match cas {
                    Some(c) => {
                        let opts = SetSecretRequestOptions { cas: c };
                        kv2::set_with_options(&t.vault, mount, path, &payload, opts).await
                    }
                    None => kv2::set(&t.vault, mount, path, &payload).await,
                }
            })
            .await;
        let written = match written {
            Ok(w) => w,
            Err(Failure::CasMismatch) => {
                let now = ops::read_metadata(t, mount, path).await.ok().flatten();
                return Err(ProviderError::Conflict {
                    address: s,
                    expected: match cas {
                        Some(0) | None => "nothing".into(),
                        Some(c) => format!("v{c}"),
                    },
                    found: now
                        .map(|m| fingerprint::secret_meta(&meta_of(&m, Timestamp::now())).to_string())
                        .unwrap_or_else(|| "nothing".into()),
                });
            }
            Err(f) => {
                let e = to_provider(f, &s);
                // The server's messages never echo a value; this is the belt to those braces.
                return Err(match e {
                    ProviderError::Other(m) => ProviderError::Other(t.scrub(m, Some(value.expose()))),
                    ProviderError::Unavailable(m) => ProviderError::Unavailable(t.scrub(m, Some(value.expose()))),
                    ProviderError::Denied(m) => ProviderError::Denied(t.scrub(m, Some(value.expose()))),
                    other => other,
                });
            }
        };
        // The metadata says when the secret was first created; without it, the write's own
        // answer still tells the version and its time.
        let meta = match ops::read_metadata(t, mount, path).await {
            Ok(Some(m)) if m.current_version == written.version => meta_of(&m, Timestamp::now()),
            _ => SecretMeta {
                version: written.version,
                updated: written.created_time.clone(),
                created: written.created_time.clone(),
                deleted: false,
                placeholder: false,
            },
        };
        tracing::debug!(address = %s, version = meta.version, "OpenBao secret written");
        Ok(secret_live(a.clone(), meta))
    }

    async fn list_async(&self, scope: &TenantScope) -> Result<Vec<LiveResource>> {
        let t = self.t.clone();
        let mount = self.cfg.mount.clone();
        // A tenant neither the repository nor the state knows is not ours: not read.
        let known = self.known.read().unwrap_or_else(|p| p.into_inner()).clone();
        let wanted_tenant = |tenant: &str| scope.contains(tenant) && known.as_ref().is_none_or(|k| k.contains(tenant));
        let err = |f: Failure| match f {
            Failure::NotFound | Failure::CasMismatch => to_provider(f, &format!("OpenBao at {}", self.cfg.address)),
            f => to_provider(f, ""),
        };
        let tenants: Vec<String> = match scope {
            TenantScope::Only(s) => s.iter().filter(|t| is_tenant_id(t)).cloned().collect(),
            TenantScope::All => ops::list(&t, &mount, &format!("{TENANTS_ROOT}/"))
                .await
                .map_err(err)?
                .into_iter()
                .filter_map(|k| k.strip_suffix('/').map(str::to_owned))
                .filter(|k| is_tenant_id(k) && wanted_tenant(k))
                .collect(),
        };
        // 1. The names under each tenant's folder.
        let names = each(tenants, |tenant| {
            let (t, mount) = (t.clone(), mount.clone());
            async move {
                let names = ops::tenant_names(&t, &mount, &tenant).await?;
                Ok(names.into_iter().map(|n| (tenant.clone(), n)).collect::<Vec<_>>())
            }
        })
        .await
        .map_err(err)?;
        let names: Vec<(String, String)> = names
            .into_iter()
            .flatten()
            .filter(|(_, n)| crate::validate::checks::secret_name_problem(n).is_none())
            .collect();
        // 2. Their metadata.
        let mut out: Vec<LiveResource> = each(names, |(tenant, name)| {
            let (t, mount) = (t.clone(), mount.clone());
            async move {
                let path = Config::secret_path(&tenant, &name);
                let m = ops::read_metadata(&t, &mount, &path).await?;
                Ok(m.map(|m| {
                    let a = Address::new(&tenant, ResourceKind::OpenbaoSecret, Some(&name));
                    secret_live(a, meta_of(&m, Timestamp::now()))
                }))
            }
        })
        .await
        .map_err(err)?
        .into_iter()
        .flatten()
        .collect();
        // 3. Policies named after the tenants in scope.
        let op = Op::read("list", "sys/policy".into());
        let policies = t.call(&op, || sys::policy::list(&t.vault)).await.map_err(err)?.policies;
        let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for p in policies.into_iter().filter(|p| is_policy_name(p)) {
            let owners: Vec<String> =
                policy_tenants(&p).into_iter().filter(|t| wanted_tenant(t)).map(str::to_owned).collect();
            if !owners.is_empty() {
                wanted.insert(p, owners);
            }
        }
        let read = each(wanted.into_iter().collect(), |(name, owners)| {
            let t = t.clone();
            async move { Ok(ops::read_policy(&t, &name).await?.map(|p| (name, owners, p.policy))) }
        })
        .await
        .map_err(err)?;
        for (name, owners, text) in read.into_iter().flatten() {
            for owner in owners {
                let a = Address::new(&owner, ResourceKind::OpenbaoPolicy, Some(&name));
                out.push(policy_live(a, text.clone()));
            }
        }
        tracing::debug!(resources = out.len(), "OpenBao live state listed");
        Ok(out)
    }
}

impl Provider for OpenBao {
    fn id(&self) -> ProviderId {
        ProviderId::Secrets
    }

    fn describe(&self) -> String {
        let ns = self.cfg.namespace.as_deref().map(|n| format!(", namespace `{n}`")).unwrap_or_default();
        format!("OpenBao at {} (KV v2 mount `{}`{ns})", self.cfg.address, self.cfg.mount)
    }

    fn list(&self, scope: &TenantScope) -> Result<Vec<LiveResource>> {
        self.block(self.list_async(scope))
    }

    fn begin(&self, session: &Session) {
        *self.known.write().unwrap_or_else(|p| p.into_inner()) = Some(session.tenants.clone());
    }

    fn fetch(&self, addresses: &[Address]) -> Result<Vec<LiveResource>> {
        self.block(async {
            let mut out = Vec::new();
            // Few addresses per call (one tenant's writes): one after another is enough.
            for a in addresses {
                if let Some(l) = self.live_of(a.clone()).await? {
                    out.push(l);
                }
            }
            Ok(out)
        })
    }

    fn put(&self, r: &Resource, secret: Option<&SecretValue>, expect: &Expect) -> Result<LiveResource> {
        let a = &r.address;
        self.block(async {
            match (target(a)?, &*r.content) {
                (Target::Secret { path }, Content::Secret(_)) => {
                    let value = secret.ok_or_else(|| {
                        ProviderError::Other(format!(
                            "{a}: no value to write; an external secret is put by its owner: {}",
                            self.cfg.put_command(&a.tenant, a.name.as_deref().unwrap_or_default())
                        ))
                    })?;
                    let cas = match expect {
                        Expect::Any => None,
                        Expect::Absent => Some(0),
                        Expect::Fingerprint(f) => Some(f.text().and_then(version_of).ok_or_else(|| {
                            ProviderError::Other(format!("{a}: `{f}` is not a secret version such as v3"))
                        })?),
                    };
                    self.write_secret(a, &path, value, cas).await
                }
                (Target::Policy { name }, Content::Text(text)) => {
                    // Read and compare, then write with OpenBao's check-and-set on the
                    // version read, so that a writer in between is refused too.
                    let t = &self.t;
                    let s = a.to_string();
                    let now = ops::read_policy(t, &name).await.map_err(|f| to_provider(f, &s))?;
                    let version = now.as_ref().map(|p| p.version);
                    let live = now.map(|p| policy_live(a.clone(), p.policy));
                    expect.check(a, live.as_ref().map(|l| &l.fingerprint))?;
                    let cas = match (expect, version) {
                        (Expect::Any, _) => None,
                        (_, None) => Some(0),
                        (_, Some(v)) => v,
                    };
                    match ops::write_policy(t, &name, text, cas).await {
                        Ok(()) => Ok(policy_live(a.clone(), text.clone())),
                        Err(Failure::CasMismatch) => {
                            let found = ops::read_policy(t, &name).await.ok().flatten();
                            Err(ProviderError::Conflict {
                                address: s,
                                expected: live.map_or_else(|| "nothing".into(), |l| l.fingerprint.to_string()),
                                found: found
                                    .map(|p| fingerprint::of(&Content::Text(p.policy)).to_string())
                                    .unwrap_or_else(|| "nothing".into()),
                            })
                        }
                        Err(f) => Err(to_provider(f, &s)),
                    }
                }
                _ => Err(ProviderError::Other(format!("{a}: this content cannot be written to OpenBao"))),
            }
        })
    }

    fn delete(&self, a: &Address, expect: &Expect, destroy: bool) -> Result<()> {
        self.block(async {
            let now = self.live_of(a.clone()).await?;
            expect.check(a, now.as_ref().map(|l| &l.fingerprint))?;
            let Some(now) = now else { return Ok(()) };
            let t = &self.t;
            let mount = self.cfg.mount.as_str();
            let s = a.to_string();
            match target(a)? {
                Target::Secret { path } if destroy => {
                    let op = Op::read("destroy every version of", self.metadata_api(&path));
                    t.call(&op, || kv2::delete_metadata(&t.vault, mount, &path)).await
                }
                Target::Secret { path } => {
                    if matches!(now.content.as_deref(), Some(Content::SecretMeta(m)) if m.deleted) {
                        return Ok(());
                    }
                    let op = Op::read("delete the current version of", format!("{mount}/data/{path}"));
                    t.call(&op, || kv2::delete_latest(&t.vault, mount, &path)).await
                }
                Target::Policy { name } => {
                    let op = Op::read("delete policy", format!("sys/policies/acl/{name}"));
                    let delete = || vaultrs::api::exec_with_empty(&t.vault, DeleteAclPolicy { name: name.clone() });
                    t.call(&op, delete).await
                }
            }
            .map_err(|f| to_provider(f, &s))?;
            tracing::debug!(address = %s, destroy, "OpenBao resource deleted");
            Ok(())
        })
    }

    fn restore_secret(&self, a: &Address, version: u64) -> Result<LiveResource> {
        let Target::Secret { path } = target(a)? else {
            return Err(ProviderError::Other(format!("{a}: not a secret")));
        };
        let s = a.to_string();
        self.block(async {
            let t = &self.t;
            let mount = self.cfg.mount.as_str();
            let m = ops::read_metadata(t, mount, &path).await.map_err(|f| to_provider(f, &s))?.ok_or_else(|| {
                ProviderError::Other(format!("{s}: gone from {}; nothing to restore", self.describe_path(&path)))
            })?;
            let old = m.versions.get(&version.to_string());
            let now = Timestamp::now();
            let readable = old.is_some_and(|v| {
                !v.destroyed
                    && (v.deletion_time.is_empty() || v.deletion_time.parse::<Timestamp>().is_ok_and(|t| t > now))
            });
            if !readable {
                // The version before was deleted: deleting the current one restores that state.
                let current = meta_of(&m, Timestamp::now());
                if !current.deleted {
                    let op = Op::read("delete the current version of", format!("{mount}/data/{path}"));
                    t.call(&op, || kv2::delete_latest(&t.vault, mount, &path)).await.map_err(|f| to_provider(f, &s))?;
                }
                let m = ops::read_metadata(t, mount, &path).await.map_err(|f| to_provider(f, &s))?;
                return m
                    .map(|m| secret_live(a.clone(), meta_of(&m, Timestamp::now())))
                    .ok_or_else(|| ProviderError::Other(format!("{s}: gone while restoring it")));
            }
            let op = Op::read("read an earlier version of", format!("{mount}/data/{path}?version={version}"));
            let stored: StoredPayload = t
                .call(&op, || kv2::read_version(&t.vault, mount, &path, version))
                .await
                .map_err(|f| to_provider(f, &s))?;
            self.write_secret(a, &path, &stored.value.0, Some(m.current_version)).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings(v: serde_json::Value) -> ProviderSettings {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn settings_have_defaults_and_clear_errors() {
        let c =
            Config::from_settings(&settings(json!({"kind": "openbao", "address": "http://127.0.0.1:8200/"}))).unwrap();
        assert_eq!(c.address, "http://127.0.0.1:8200");
        assert_eq!((c.mount.as_str(), c.token_env.as_str()), ("secret", "BAO_TOKEN"));
        assert_eq!(c.timeout, Duration::from_secs(30));
        let e = Config::from_settings(&settings(json!({"kind": "openbao"}))).unwrap_err();
        assert!(e.to_string().contains("needs `address`"), "{e}");
        let e = Config::from_settings(&settings(json!({"kind": "openbao", "address": "http://x", "timeout": "soon"})))
            .unwrap_err();
        assert!(e.to_string().contains("timeout `soon`"), "{e}");
        let e = OpenBao::open(&settings(json!({
            "kind": "openbao", "address": "http://127.0.0.1:1", "token_env": "DOTMAC_TEST_UNSET_TOKEN_VAR"
        })))
        .unwrap_err();
        assert!(e.to_string().contains("$DOTMAC_TEST_UNSET_TOKEN_VAR, which is not set"), "{e}");
    }

    #[test]
    fn the_put_command_names_the_exact_path() {
        let mut c =
            Config::from_settings(&settings(json!({"kind": "openbao", "address": "http://h", "mount": "kv"}))).unwrap();
        assert_eq!(
            c.put_command("tenant-123", "stripe/secret_key"),
            "bao kv put -mount=kv dotmac/tenants/tenant-123/stripe/secret_key value=-"
        );
        c.namespace = Some("isp".into());
        assert!(c.put_command("t", "n").starts_with("bao kv put -namespace=isp -mount=kv "));
    }

    #[test]
    fn policy_names_map_to_every_possible_tenant() {
        assert_eq!(policy_tenants("tenant-123-read-secrets"), ["tenant", "tenant-123", "tenant-123-read"]);
        assert!(policy_tenants("default").is_empty());
        assert!(is_policy_name("tenant-123-read-secrets"));
        assert!(!is_policy_name("Tenant-Read"));
        assert!(!is_policy_name("a/b"));
    }

    #[test]
    fn metadata_becomes_secret_meta() {
        let m: ReadSecretMetadataResponse = serde_json::from_value(json!({
            "cas_required": false, "created_time": "2026-01-01T00:00:00.5Z", "current_version": 2,
            "delete_version_after": "0s", "max_versions": 0, "oldest_version": 0,
            "updated_time": "2026-03-01T00:00:00Z", "custom_metadata": null,
            "versions": {
                "1": {"created_time": "2026-01-01T00:00:00.5Z", "deletion_time": "", "destroyed": false},
                "2": {"created_time": "2026-02-01T00:00:00Z", "deletion_time": "", "destroyed": false}
            }
        }))
        .unwrap();
        let now: Timestamp = "2026-06-01T00:00:00Z".parse().unwrap();
        let meta = meta_of(&m, now);
        assert_eq!((meta.version, meta.deleted), (2, false));
        assert_eq!(meta.updated, "2026-02-01T00:00:00Z", "the current version's time, not the metadata's");
        assert_eq!(meta.created, "2026-01-01T00:00:00.5Z");
        assert_eq!(fingerprint::secret_meta(&meta), "v2");
        let mut m = m;
        m.versions.get_mut("2").unwrap().deletion_time = "2026-05-01T00:00:00Z".into();
        assert_eq!(fingerprint::secret_meta(&meta_of(&m, now)), "v2-deleted");
        // a deletion scheduled for later (delete_version_after) has not happened yet
        m.versions.get_mut("2").unwrap().deletion_time = "2026-07-01T00:00:00Z".into();
        assert!(!meta_of(&m, now).deleted);
        m.versions.get_mut("2").unwrap().destroyed = true;
        assert!(meta_of(&m, now).deleted);
        assert_eq!(version_of("v12-deleted"), Some(12));
        assert_eq!(version_of("sha256:ab"), None);
    }

    #[test]
    fn addresses_map_to_paths_or_are_refused() {
        let a = Address::parse("tenant-123/openbao.secret[database/password]").unwrap();
        assert!(
            matches!(target(&a), Ok(Target::Secret { path }) if path == "dotmac/tenants/tenant-123/database/password")
        );
        assert!(target(&Address::parse("t/openbao.secret[../x]").unwrap()).is_err());
        assert!(target(&Address::new("..", ResourceKind::OpenbaoSecret, Some("x"))).is_err());
        let e = target(&Address::parse("t/openbao.policy[t-Read]").unwrap()).err().unwrap();
        assert!(e.to_string().contains("lower case"), "{e}");
    }

    #[test]
    fn inside_a_tokio_runtime_calls_are_refused_and_drop_does_not_panic() {
        // SAFETY: the variable is unique to this test.
        unsafe { std::env::set_var("DOTMAC_TEST_RT_TOKEN", "t") };
        let p = OpenBao::open(&settings(json!({
            "kind": "openbao", "address": "http://127.0.0.1:1", "token_env": "DOTMAC_TEST_RT_TOKEN"
        })))
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async move {
            let e = p.list(&TenantScope::All).unwrap_err();
            assert!(e.to_string().contains("spawn_blocking"), "{e}");
            drop(p);
        });
    }

    #[test]
    fn debug_output_and_messages_never_carry_the_token() {
        let token = "s.PLANTED-token-0123456789";
        // SAFETY: the variable is unique to this test.
        unsafe { std::env::set_var("DOTMAC_TEST_DEBUG_TOKEN", token) };
        let p = OpenBao::open(&settings(json!({
            "kind": "openbao", "address": "http://127.0.0.1:1", "token_env": "DOTMAC_TEST_DEBUG_TOKEN"
        })))
        .unwrap();
        let shown = format!("{p:?} {}", p.describe());
        assert!(shown.contains("DOTMAC_TEST_DEBUG_TOKEN") && !shown.contains(token), "{shown}");
        assert_eq!(
            p.t.scrub(format!("bad token {token} and value hunter2"), Some(b"hunter2")),
            "bad token (token) and value (sensitive)"
        );
    }
}
