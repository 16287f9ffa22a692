//! Providers: one per live system, behind one trait. They read and write; they never decide
//! what to change (that is `diff` and `plan`).
//!
//! The four slots (secrets, management, isp, kubernetes) are filled from `dotmac.toml`; the
//! embedded default for every slot is `local`, a real store under `.dotmac/live/`.

pub mod fault;
pub mod http;
pub mod kubernetes;
pub mod local;
pub mod openbao;
pub mod secret_value;

use crate::load::settings::Settings;
use crate::model::{Address, Content, Coordination, ProviderId, Resource};
use secret_value::SecretValue;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

/// A resource as a live system holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveResource {
    pub address: Address,
    /// `sha256:...` of the canonical content, or a secret's version (`v3`).
    pub fingerprint: crate::fingerprint::Fingerprint,
    /// The content, when it was read (listing may return fingerprints only).
    pub content: Option<Box<Content>>,
}

/// Which tenants a read covers.
#[derive(Debug, Clone)]
pub enum TenantScope {
    All,
    Only(BTreeSet<String>),
}

impl TenantScope {
    pub fn contains(&self, tenant: &str) -> bool {
        match self {
            TenantScope::All => true,
            TenantScope::Only(s) => s.contains(tenant),
        }
    }
}

/// What the caller believes is live before a write: the provider refuses the write if the
/// live resource moved (a concurrent writer), instead of overwriting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Write whatever is there.
    Any,
    /// The resource must not exist.
    Absent,
    /// The resource must have this fingerprint.
    Fingerprint(crate::fingerprint::Fingerprint),
}

impl Expect {
    pub fn from_live(fp: Option<&crate::fingerprint::Fingerprint>) -> Expect {
        match fp {
            None => Expect::Absent,
            Some(f) => Expect::Fingerprint(f.clone()),
        }
    }

    /// Whether live, holding `found` (its fingerprint, or nothing), is what was expected.
    pub fn met(&self, found: Option<&crate::fingerprint::Fingerprint>) -> bool {
        match self {
            Expect::Any => true,
            Expect::Absent => found.is_none(),
            Expect::Fingerprint(f) => found == Some(f),
        }
    }

    /// The error for a write refused because live holds `found`, not what was expected.
    pub fn conflict(&self, address: &Address, found: Option<&crate::fingerprint::Fingerprint>) -> ProviderError {
        ProviderError::Conflict {
            address: address.to_string(),
            expected: match self {
                Expect::Fingerprint(f) => f.to_string(),
                _ => "nothing".into(),
            },
            found: crate::fingerprint::shown(found, "nothing"),
        }
    }

    /// `Ok` when live holds what was expected, else the conflict.
    pub fn check(&self, address: &Address, found: Option<&crate::fingerprint::Fingerprint>) -> Result<()> {
        if self.met(found) { Ok(()) } else { Err(self.conflict(address, found)) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The live resource is not what the caller expected (someone changed it meanwhile).
    #[error("{address}: changed by someone else since it was read (expected {expected}, found {found}); re-plan")]
    Conflict { address: String, expected: String, found: String },
    /// Authentication or authorization failed: retrying will not help.
    #[error("{0}")]
    Denied(String),
    /// The system could not be reached or failed; it may work later.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(String),
    /// Some tenants could not be read (their target failed); the others were. The engine
    /// plans and applies the others and reports these.
    #[error("{}", describe_partial(.failed))]
    Partial { found: Vec<LiveResource>, failed: BTreeMap<String, String> },
}

fn describe_partial(failed: &BTreeMap<String, String>) -> String {
    let shown: Vec<String> = failed.iter().take(5).map(|(t, e)| format!("tenant {t}: {e}")).collect();
    let more = if failed.len() > 5 { format!("; and {} more", failed.len() - 5) } else { String::new() };
    format!(
        "could not read {} tenant{}: {}{more}",
        failed.len(),
        if failed.len() == 1 { "" } else { "s" },
        shown.join("; ")
    )
}

/// What the engine tells the providers before it reads or writes (see [`Provider::begin`]).
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// The plan's correlation id (plan id and revision), sent with every call to a platform
    /// so that its audit can join ours.
    pub correlation_id: String,
    /// The tenants the repository and the state know: what `TenantScope::All` means to a
    /// system that cannot list its tenants itself (ISP instances, one per tenant).
    pub tenants: BTreeSet<String>,
    /// How each tenant is coordinated, for systems that take it with a write.
    pub coordination: BTreeMap<String, Coordination>,
}

impl ProviderError {
    pub fn other(e: impl std::fmt::Display) -> Self {
        ProviderError::Other(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, ProviderError>;

/// A live system. Implementations must be safe to call from several threads at once.
pub trait Provider: Send + Sync {
    fn id(&self) -> ProviderId;

    /// A short description for logs and errors ("local store .dotmac/live/isp").
    fn describe(&self) -> String;

    /// Every resource this provider holds for the tenants in scope, with fingerprints, in as
    /// few calls as the system allows. Content may be left out.
    fn list(&self, scope: &TenantScope) -> Result<Vec<LiveResource>>;

    /// These resources with their content (absent ones are left out).
    fn fetch(&self, addresses: &[Address]) -> Result<Vec<LiveResource>>;

    /// The fingerprints of these resources as live now, one per address in its order (`None`:
    /// absent): what apply reads back after writing. By default a `fetch`; a store that
    /// keeps fingerprints answers without reading content again.
    fn fingerprints(&self, addresses: &[&Address]) -> Result<Vec<Option<crate::fingerprint::Fingerprint>>> {
        let owned: Vec<Address> = addresses.iter().map(|a| (*a).clone()).collect();
        let mut found: rustc_hash::FxHashMap<Address, crate::fingerprint::Fingerprint> =
            self.fetch(&owned)?.into_iter().map(|l| (l.address, l.fingerprint)).collect();
        Ok(addresses.iter().map(|a| found.remove(*a)).collect())
    }

    /// Creates or replaces a resource. `secret` carries the value of a generated secret being
    /// written (only for `openbao.secret`). Returns the resource as now live (its content
    /// may be left out: the caller has it).
    fn put(&self, resource: &Resource, secret: Option<&SecretValue>, expect: &Expect) -> Result<LiveResource>;

    /// Removes a resource. For secrets, `destroy` removes every version (otherwise a soft
    /// delete that keeps versions).
    fn delete(&self, address: &Address, expect: &Expect, destroy: bool) -> Result<()>;

    /// Makes every completed write durable (called before the state store records them).
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Makes the secret's version `version` current again (a rollback of a secret write), by
    /// writing its value as a new version inside the store; the value never leaves it.
    fn restore_secret(&self, address: &Address, version: u64) -> Result<LiveResource> {
        let _ = version;
        Err(ProviderError::Other(format!("{address}: {} cannot restore secret versions", self.describe())))
    }

    /// True when a write becomes durable only at `flush` (a local store keeps its writes in
    /// memory until then): apply may then journal while the writes go on, as long as the
    /// journal is durable before the flush.
    fn durable_on_flush(&self) -> bool {
        false
    }

    /// Forgets the writes not yet flushed (for a store that is `durable_on_flush`): the image
    /// goes back to what is durable. Apply calls it when it could not journal its writes.
    fn discard(&self) {}

    /// Called once when the engine is done with the provider (a local store keeps its index).
    fn close(&self) {}

    /// True when a delete leaves the resource to go away with the tenant's instance (the ISP
    /// API has no delete): the engine stops managing it rather than expecting it gone.
    fn deletes_with_tenant(&self) -> bool {
        false
    }

    /// Called before a plan reads and before an apply writes.
    fn begin(&self, session: &Session) {
        let _ = session;
    }

    /// Called by apply on the management provider after each applied change, with the audit
    /// entry as the state store keeps it (masked: fields, fingerprints or versions, never a
    /// secret value). The management platform keeps the cross-platform audit trail.
    fn audit_event(&self, entry: &crate::state::AuditEntry) -> Result<()> {
        let _ = entry;
        Ok(())
    }
}

/// The four providers of a repository.
#[derive(Clone)]
pub struct Providers {
    pub secrets: Arc<dyn Provider>,
    pub management: Arc<dyn Provider>,
    pub isp: Arc<dyn Provider>,
    pub kubernetes: Arc<dyn Provider>,
}

impl Providers {
    pub fn get(&self, id: ProviderId) -> &Arc<dyn Provider> {
        match id {
            ProviderId::Secrets => &self.secrets,
            ProviderId::Management => &self.management,
            ProviderId::Isp => &self.isp,
            ProviderId::Kubernetes => &self.kubernetes,
        }
    }

    pub fn close(&self) {
        for p in ProviderId::ALL {
            self.get(p).close();
        }
    }

    pub fn begin(&self, session: &Session) {
        for p in ProviderId::ALL {
            self.get(p).begin(session);
        }
    }

    /// Builds the providers `dotmac.toml` asks for, with live stores under `state_dir`.
    pub fn from_settings(settings: &Settings, state_dir: &Path) -> anyhow::Result<Providers> {
        let p = &settings.providers;
        let local = |id: ProviderId| -> anyhow::Result<Arc<dyn Provider>> {
            Ok(Arc::new(local::LocalStore::open(state_dir, id, &settings.providers.secrets)?))
        };
        let pick = |id: ProviderId, kind: &str| -> anyhow::Result<Arc<dyn Provider>> {
            match kind {
                "local" => local(id),
                "openbao" if id == ProviderId::Secrets => Ok(Arc::new(openbao::OpenBao::open(&p.secrets)?)),
                "none" if id == ProviderId::Kubernetes => Ok(Arc::new(Nothing(id))),
                "kubernetes" if id == ProviderId::Kubernetes => {
                    Ok(Arc::new(kubernetes::KubeProvider::connect(&p.kubernetes)?))
                }
                "kubernetes" if id == ProviderId::Isp => {
                    let isp = kubernetes::isp::KubeIspProvider::connect(&p.isp)?;
                    let k8s_manager = p.kubernetes.str("field_manager").unwrap_or(crate::render::MANAGED_BY.1);
                    if p.kubernetes.kind == "kubernetes" && isp.field_manager() == k8s_manager {
                        anyhow::bail!(
                            "[providers.isp] field_manager must differ from [providers.kubernetes] field_manager (both are \"{k8s_manager}\"): each provider owns its own fields"
                        );
                    }
                    Ok(Arc::new(isp))
                }
                "http" if id == ProviderId::Management => {
                    Ok(Arc::new(http::management::Management::new(&settings.providers.management)?))
                }
                "http" if id == ProviderId::Isp => Ok(Arc::new(http::isp::Isp::new(&settings.providers.isp)?)),
                other => {
                    anyhow::bail!("[providers.{id}] kind = \"{other}\" is not available in this build; use \"local\"")
                }
            }
        };
        Ok(Providers {
            secrets: fault::wrap(pick(ProviderId::Secrets, &p.secrets.kind)?),
            management: fault::wrap(pick(ProviderId::Management, &p.management.kind)?),
            isp: fault::wrap(pick(ProviderId::Isp, &p.isp.kind)?),
            kubernetes: fault::wrap(pick(ProviderId::Kubernetes, &p.kubernetes.kind)?),
        })
    }
}

/// `kind = "none"`: resources of this provider are not managed; nothing is live.
pub struct Nothing(pub ProviderId);

impl Provider for Nothing {
    fn id(&self) -> ProviderId {
        self.0
    }
    fn describe(&self) -> String {
        format!("{} (kind = \"none\")", self.0)
    }
    fn list(&self, _: &TenantScope) -> Result<Vec<LiveResource>> {
        Ok(Vec::new())
    }
    fn fetch(&self, _: &[Address]) -> Result<Vec<LiveResource>> {
        Ok(Vec::new())
    }
    fn put(&self, r: &Resource, _: Option<&SecretValue>, _: &Expect) -> Result<LiveResource> {
        Ok(LiveResource {
            address: r.address.clone(),
            fingerprint: crate::fingerprint::of(&r.content),
            content: Some(Box::new((*r.content).clone())),
        })
    }
    fn delete(&self, _: &Address, _: &Expect, _: bool) -> Result<()> {
        Ok(())
    }
}
