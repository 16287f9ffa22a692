//! The desired-state types: plain data, no I/O.
//!
//! Documents arrive as `serde_json::Value` (what templates see, "as written") and, once the
//! schema has accepted them, are also read into the typed views below for the fields the
//! engine itself acts on.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::load::settings::Settings;

/// Where a document came from: repository-relative file and its index among the file's
/// non-empty documents.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocRef {
    pub file: Arc<str>,
    pub doc: usize,
}

// ---------------------------------------------------------------------------------------------
// Typed views of the documents (fields the engine acts on)

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    Active,
    Suspended,
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    #[default]
    ManagementFirst,
    Synchronized,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Coordination {
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default = "yes")]
    pub rollback_on_failure: bool,
}

impl Default for Coordination {
    fn default() -> Self {
        Coordination { strategy: Strategy::ManagementFirst, rollback_on_failure: true }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
pub struct TenantDoc {
    pub id: String,
    pub name: String,
    pub environment: String,
    pub plan: String,
    pub resource_tier: String,
    pub domain: String,
    #[serde(default)]
    pub status: Status,
    #[serde(default)]
    pub features: IndexMap<String, bool>,
    #[serde(default)]
    pub coordination: Coordination,
}

/// What people call a tenant, besides its id: for status pages (the daemon's dashboard).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TenantLabel {
    pub name: String,
    pub plan: String,
    pub environment: String,
}

impl TenantLabel {
    pub fn of(spec: &TenantDoc) -> TenantLabel {
        TenantLabel { name: spec.name.clone(), plan: spec.plan.clone(), environment: spec.environment.clone() }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct LicensesDoc {
    pub tenant: String,
    pub licenses: Vec<LicenseDoc>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LicenseDoc {
    pub plugin: String,
    #[serde(default)]
    pub expires: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SecretRefsDoc {
    pub tenant: String,
    #[serde(default)]
    pub rotation: RotationDoc,
    pub secrets: IndexMap<String, SecretDeclDoc>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RotationDoc {
    pub interval_days: Option<u32>,
    pub auto_rotation: Option<bool>,
    #[serde(default)]
    pub notification_webhooks: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SecretDeclDoc {
    pub generate: Option<GenerateDoc>,
    #[serde(default)]
    pub external: bool,
    #[serde(default)]
    pub rotation: RotationDoc,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GenerateDoc {
    #[serde(default = "default_length")]
    pub length: u32,
    #[serde(default)]
    pub charset: Charset,
}

fn default_length() -> u32 {
    32
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Charset {
    #[default]
    Alphanumeric,
    Alpha,
    Numeric,
    Hex,
    Base64url,
    Ascii,
}

impl Charset {
    pub fn alphabet(self) -> &'static [u8] {
        match self {
            Charset::Alphanumeric => b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
            Charset::Alpha => b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
            Charset::Numeric => b"0123456789",
            Charset::Hex => b"0123456789abcdef",
            Charset::Base64url => b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
            Charset::Ascii => {
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#%&()*+,-./:;<=>?@[]^_{|}~"
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The validated desired state

/// A secret a tenant declares, resolved against the tenant's default rotation policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretSpec {
    pub name: String,
    #[serde(flatten)]
    pub source: SecretSource,
    /// Rotate (generated) or flag (external) when older than this many days.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rotation_days: Option<u32>,
    pub auto_rotation: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "lowercase")]
pub enum SecretSource {
    Generated { length: u32, charset: Charset },
    External,
}

/// One tenant, validated, with its entitlements resolved.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    /// The folder (or file) directly under `tenants/` that holds this tenant's documents.
    pub unit: String,
    pub spec: TenantDoc,
    /// The Tenant document as written: what templates see as `tenant` (shared with the
    /// loaded document it was validated from).
    pub doc: std::sync::Arc<Value>,
    pub source: DocRef,
    /// Enabled features, sorted.
    pub features: Vec<String>,
    /// Licenses valid at the time of validation, as written, sorted by plugin.
    pub valid_licenses: Vec<Value>,
    /// Declared secrets in declaration order.
    pub secrets: Vec<SecretSpec>,
    /// The time (unix seconds, from inclusive, to exclusive) in which the licenses valid now
    /// stay valid and the expired ones stay expired: what was resolved holds within it.
    pub window: (i64, i64),
}

/// The catalogs, as written (templates see the entries) and keyed by name.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub plans: IndexMap<String, Value>,
    pub plugins: IndexMap<String, Value>,
    pub tiers: IndexMap<String, Value>,
    /// Where each catalog came from (for diagnostics and change detection).
    pub sources: BTreeMap<&'static str, DocRef>,
}

/// Everything the repository asks for, validated.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    pub settings: Settings,
    pub catalog: Catalog,
    pub environments: BTreeMap<String, (DocRef, std::sync::Arc<Value>)>,
    pub tenants: BTreeMap<String, Tenant>,
    /// Template sources from the repository's own `templates/` (name -> text).
    pub templates: BTreeMap<String, Arc<str>>,
}

// ---------------------------------------------------------------------------------------------
// Resources

/// The live system a resource belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderId {
    Secrets,
    Management,
    Isp,
    Kubernetes,
}

impl ProviderId {
    pub const ALL: [ProviderId; 4] =
        [ProviderId::Secrets, ProviderId::Management, ProviderId::Isp, ProviderId::Kubernetes];
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderId::Secrets => "secrets",
            ProviderId::Management => "management",
            ProviderId::Isp => "isp",
            ProviderId::Kubernetes => "kubernetes",
        }
    }
}

impl fmt::Display for ProviderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a resource is. The order of the variants is the apply order within a tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    OpenbaoPolicy,
    OpenbaoSecret,
    ManagementTenant,
    ManagementLicense,
    IspConfig,
    /// A Kubernetes manifest of the given `kind`.
    Kubernetes(std::borrow::Cow<'static, str>),
}

/// The Kubernetes kinds a repository commonly renders: their names are shared, not copied
/// into each of a plan's hundreds of thousands of addresses.
const KUBERNETES_KINDS: &[&str] = &[
    "Namespace",
    "ResourceQuota",
    "LimitRange",
    "ServiceAccount",
    "Secret",
    "ConfigMap",
    "Role",
    "RoleBinding",
    "Service",
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "Job",
    "CronJob",
    "Ingress",
    "NetworkPolicy",
    "PersistentVolumeClaim",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
];

impl ResourceKind {
    /// A Kubernetes manifest of this kind.
    pub fn kubernetes(kind: &str) -> ResourceKind {
        match KUBERNETES_KINDS.iter().find(|k| **k == kind) {
            Some(k) => ResourceKind::Kubernetes(std::borrow::Cow::Borrowed(k)),
            None => ResourceKind::Kubernetes(std::borrow::Cow::Owned(kind.to_owned())),
        }
    }

    pub fn provider(&self) -> ProviderId {
        match self {
            ResourceKind::OpenbaoPolicy | ResourceKind::OpenbaoSecret => ProviderId::Secrets,
            ResourceKind::ManagementTenant | ResourceKind::ManagementLicense => ProviderId::Management,
            ResourceKind::IspConfig => ProviderId::Isp,
            ResourceKind::Kubernetes(_) => ProviderId::Kubernetes,
        }
    }

    /// The order of Kubernetes kinds within a tenant's apply: the namespace first, then what
    /// configures the workload, then the workload.
    fn k8s_rank(kind: &str) -> u8 {
        match kind {
            "Namespace" => 0,
            "ResourceQuota" | "LimitRange" => 1,
            "ServiceAccount" | "Role" | "RoleBinding" => 2,
            "ConfigMap" | "Secret" => 3,
            "Service" => 4,
            "Deployment" | "StatefulSet" => 5,
            _ => 6,
        }
    }

    /// The apply rank of this kind: lower is applied first (deletes go in reverse).
    pub fn rank(&self) -> (u8, u8) {
        match self {
            ResourceKind::OpenbaoPolicy => (0, 0),
            ResourceKind::OpenbaoSecret => (1, 0),
            ResourceKind::ManagementTenant => (2, 0),
            ResourceKind::ManagementLicense => (3, 0),
            ResourceKind::IspConfig => (4, 0),
            ResourceKind::Kubernetes(k) => (5, Self::k8s_rank(k)),
        }
    }
}

/// A tenant id inside an address. The text is shared: the million addresses of a plan of
/// 100,000 tenants hold 100,000 tenant ids, not a million copies of them. Addresses are
/// mostly made one tenant after another, so each thread remembers the last id it made.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Arc<str>);

impl TenantId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id's text, shared rather than copied.
    pub fn shared(&self) -> Arc<str> {
        Arc::clone(&self.0)
    }
}

impl From<&str> for TenantId {
    fn from(s: &str) -> Self {
        thread_local! {
            static LAST: std::cell::RefCell<Option<Arc<str>>> = const { std::cell::RefCell::new(None) };
        }
        LAST.with(|last| {
            let mut last = last.borrow_mut();
            match last.as_ref() {
                Some(l) if **l == *s => TenantId(Arc::clone(l)),
                _ => {
                    let t: Arc<str> = Arc::from(s);
                    *last = Some(Arc::clone(&t));
                    TenantId(t)
                }
            }
        })
    }
}

impl std::ops::Deref for TenantId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for TenantId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl PartialEq<&str> for TenantId {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

/// A resource's stable address: `tenant-123/management.license[advanced_analytics]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    pub tenant: TenantId,
    pub kind: ResourceKind,
    pub name: Option<String>,
}

impl Address {
    pub fn new(tenant: &str, kind: ResourceKind, name: Option<&str>) -> Self {
        Address { tenant: TenantId::from(tenant), kind, name: name.map(str::to_owned) }
    }

    /// Parses the textual form back.
    pub fn parse(s: &str) -> Option<Address> {
        let (tenant, rest) = s.split_once('/')?;
        Address::from_local(tenant, rest)
    }

    /// The address of `local` (`isp.config`, `kubernetes.Deployment[x]`) in `tenant`.
    pub fn from_local(tenant: &str, rest: &str) -> Option<Address> {
        let (what, name) = match rest.split_once('[') {
            Some((w, n)) => (w, Some(n.strip_suffix(']')?.to_owned())),
            None => (rest, None),
        };
        let kind = match what {
            "management.tenant" => ResourceKind::ManagementTenant,
            "management.license" => ResourceKind::ManagementLicense,
            "isp.config" => ResourceKind::IspConfig,
            "openbao.policy" => ResourceKind::OpenbaoPolicy,
            "openbao.secret" => ResourceKind::OpenbaoSecret,
            k => ResourceKind::kubernetes(k.strip_prefix("kubernetes.")?),
        };
        Some(Address { tenant: TenantId::from(tenant), kind, name })
    }

    pub fn provider(&self) -> ProviderId {
        self.kind.provider()
    }

    /// The address as text (what `Display` writes), in one allocation of the exact size:
    /// `to_string` grows its string piece by piece, four times for a typical address, and
    /// an apply of 10,000 tenants makes a million of these.
    pub fn text(&self) -> String {
        let mut out = String::new();
        self.write_text(&mut out);
        out
    }

    /// The address as text into `out`, which is cleared first: for lookups by text, one
    /// buffer for many addresses.
    pub fn write_text(&self, out: &mut String) {
        let (kind, k8s) = self.kind_text();
        let name = self.name.as_deref();
        let len = self.tenant.len() + 1 + kind.len() + k8s.len() + name.map_or(0, |n| n.len() + 2);
        out.clear();
        out.reserve_exact(len);
        out.push_str(&self.tenant);
        out.push('/');
        out.push_str(kind);
        out.push_str(k8s);
        if let Some(n) = name {
            out.push('[');
            out.push_str(n);
            out.push(']');
        }
    }

    /// The kind as an address spells it, in two parts: `kubernetes.` and the Kubernetes
    /// kind, or the whole name and nothing.
    fn kind_text(&self) -> (&'static str, &str) {
        match &self.kind {
            ResourceKind::OpenbaoPolicy => ("openbao.policy", ""),
            ResourceKind::OpenbaoSecret => ("openbao.secret", ""),
            ResourceKind::ManagementTenant => ("management.tenant", ""),
            ResourceKind::ManagementLicense => ("management.license", ""),
            ResourceKind::IspConfig => ("isp.config", ""),
            ResourceKind::Kubernetes(k) => ("kubernetes.", k.as_ref()),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, k8s) = self.kind_text();
        f.write_str(&self.tenant)?;
        f.write_str("/")?;
        f.write_str(kind)?;
        f.write_str(k8s)?;
        if let Some(n) = &self.name {
            write!(f, "[{n}]")?;
        }
        Ok(())
    }
}

impl PartialOrd for Address {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Address {
    /// Tenants in order, then apply order within the tenant, then name.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.tenant, self.kind.rank(), &self.kind, &self.name).cmp(&(
            &other.tenant,
            other.kind.rank(),
            &other.kind,
            &other.name,
        ))
    }
}

impl Serialize for Address {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Address::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("not a resource address: {s}")))
    }
}

/// What a resource holds. Secrets are described, never carried: `Secret` is the declaration
/// (desired) and `SecretMeta` what a store says about the secret (live).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Content {
    Text(String),
    Json(Value),
    Secret(SecretSpec),
    SecretMeta(SecretMeta),
}

/// Metadata of a stored secret; never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretMeta {
    /// The current version (1 for the first write).
    pub version: u64,
    /// When the current version was written (RFC 3339).
    pub updated: String,
    pub created: String,
    /// The current version is deleted (KV v2 soft delete).
    #[serde(default)]
    pub deleted: bool,
    /// A development placeholder standing in for an external secret (local store only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub placeholder: bool,
}

/// A desired resource, rendered. The content is shared, not copied, on its way through the
/// plan, the provider's write and the state record.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub address: Address,
    pub content: Arc<Content>,
    /// `fingerprint::of(content)` when the caller has it already (apply has the plan's), so
    /// that a store need not work it out again; `None`: the store does.
    pub fingerprint: Option<crate::fingerprint::Fingerprint>,
}

impl Resource {
    pub fn provider(&self) -> ProviderId {
        self.address.provider()
    }
}

/// A desired resource as the planner sees it: always its fingerprint; its content when it
/// was rendered in this run (a tenant served from the render cache has fingerprints only,
/// and secret declarations).
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredEntry {
    pub address: Address,
    pub fingerprint: crate::fingerprint::Fingerprint,
    pub content: Option<Arc<Content>>,
}

impl DesiredEntry {
    pub fn rendered(r: Resource) -> DesiredEntry {
        DesiredEntry { fingerprint: crate::fingerprint::of(&r.content), address: r.address, content: Some(r.content) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_and_sort_in_apply_order() {
        for s in [
            "t1/management.tenant",
            "t1/management.license[advanced_analytics]",
            "t1/isp.config",
            "t1/kubernetes.Deployment[isp-framework]",
            "t1/openbao.policy[t1-read-secrets]",
            "t1/openbao.secret[database/password]",
            "tenant-000123/kubernetes.MyCustomKind[a]",
        ] {
            let a = Address::parse(s).unwrap();
            assert_eq!(a.to_string(), s);
            let text = a.text();
            assert_eq!((text.as_str(), text.capacity()), (s, s.len()), "one allocation of the exact size");
        }
        let mut v: Vec<Address> =
            ["t1/kubernetes.Deployment[x]", "t1/isp.config", "t1/kubernetes.Namespace[n]", "t1/openbao.policy[p]"]
                .iter()
                .map(|s| Address::parse(s).unwrap())
                .collect();
        v.sort();
        let got: Vec<String> = v.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            ["t1/openbao.policy[p]", "t1/isp.config", "t1/kubernetes.Namespace[n]", "t1/kubernetes.Deployment[x]"]
        );
    }
}
