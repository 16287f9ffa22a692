//! `[providers.isp] kind = "kubernetes"`: each tenant's `isp_config.yaml` as the key
//! `isp_config.yaml` of the ConfigMap `isp-config` in the tenant's namespace
//! `dotmac-tenant-<id>`, written with server-side apply under its own field manager
//! (`field_manager`, default `dotmac-gitops-isp`).
//!
//! The live content is the text under that key, whoever wrote it: an out-of-band edit of the
//! configuration is drift. The instance picks a new configuration up when its Deployment
//! rolls, which the Deployment's `dotmac.io/config-checksum` annotation (a digest of the same
//! text) makes happen in the same apply.
//!
//! On a new tenant the ISP configuration is written before the Kubernetes manifests (apply
//! order), so the namespace may not exist yet: the provider then creates it with a minimal
//! manifest (its name and our two labels) under its own field manager, and the Kubernetes
//! provider's apply of the full Namespace manifest later shares those labels without
//! conflict. Deleting the configuration deletes the ConfigMap only; the namespace goes with
//! the tenant's Namespace manifest.

use super::kinds::Kind;
use super::{Cluster, RESOURCE_LABEL, label, resource_version, selector, terminating};
use crate::fingerprint;
use crate::load::settings::ProviderSettings;
use crate::model::{Address, Content, ProviderId, Resource, ResourceKind};
use crate::providers::secret_value::SecretValue;
use crate::providers::{Expect, LiveResource, Provider, ProviderError, Result, TenantScope};
use crate::render::{MANAGED_BY, TENANT_LABEL};
use serde_json::{Value, json};
use std::collections::BTreeSet;

pub const CONFIGMAP: &str = "isp-config";
pub const KEY: &str = "isp_config.yaml";
pub const RESOURCE: &str = "isp.config";
pub const DEFAULT_MANAGER: &str = "dotmac-gitops-isp";

/// The tenant's namespace (the repository format's `dotmac-tenant-<id>`).
pub fn namespace(tenant: &str) -> String {
    format!("dotmac-tenant-{tenant}")
}

pub struct KubeIspProvider {
    cluster: Cluster,
    configmaps: Kind,
    namespaces: Kind,
}

impl KubeIspProvider {
    pub fn connect(s: &ProviderSettings) -> anyhow::Result<KubeIspProvider> {
        let cluster = Cluster::connect(s, "isp", DEFAULT_MANAGER)?;
        let known = |k| Kind::well_known("v1", k).ok_or_else(|| anyhow::anyhow!("v1 {k} missing from the kind table"));
        Ok(KubeIspProvider { cluster, configmaps: known("ConfigMap")?, namespaces: known("Namespace")? })
    }

    pub fn field_manager(&self) -> &str {
        &self.cluster.manager
    }

    fn address(tenant: &str) -> Address {
        Address::new(tenant, ResourceKind::IspConfig, None)
    }

    fn live(tenant: &str, obj: &Value) -> LiveResource {
        let text = obj.pointer("/data").and_then(|d| d.get(KEY)).and_then(Value::as_str).unwrap_or_default();
        let content = Content::Text(text.to_owned());
        LiveResource {
            address: Self::address(tenant),
            fingerprint: fingerprint::of(&content),
            content: Some(Box::new(content)),
        }
    }

    /// Whether a live object is a tenant's ISP configuration, as this provider writes it.
    fn is_ours(tenant: &str, obj: &Value) -> bool {
        !terminating(obj)
            && label(obj, RESOURCE_LABEL) == Some(RESOURCE)
            && obj.pointer("/metadata/name").and_then(Value::as_str) == Some(CONFIGMAP)
            && obj.pointer("/metadata/namespace").and_then(Value::as_str) == Some(namespace(tenant).as_str())
    }

    async fn list_tenants(&self, tenants: Option<&BTreeSet<String>>) -> Result<Vec<LiveResource>> {
        let base = format!("{}={},{RESOURCE_LABEL}={RESOURCE}", MANAGED_BY.0, MANAGED_BY.1);
        let items = self.cluster.list(&self.configmaps, &selector(&base, tenants)).await?;
        Ok(items
            .iter()
            .filter_map(|obj| {
                let tenant = label(obj, TENANT_LABEL)?;
                (tenants.is_none_or(|ts| ts.contains(tenant)) && Self::is_ours(tenant, obj))
                    .then(|| Self::live(tenant, obj))
            })
            .collect())
    }

    /// The tenant's ConfigMap as live now (`None`: absent, or not one of ours).
    async fn current(&self, tenant: &str, addr: &str) -> Result<Option<Value>> {
        let ns = namespace(tenant);
        let obj = self.cluster.get(&self.configmaps, Some(&ns), CONFIGMAP, addr).await?;
        Ok(obj.filter(|o| Self::is_ours(tenant, o)))
    }

    fn labels(tenant: &str) -> Value {
        json!({MANAGED_BY.0: MANAGED_BY.1, TENANT_LABEL: tenant, RESOURCE_LABEL: RESOURCE})
    }
}

impl Provider for KubeIspProvider {
    fn id(&self) -> ProviderId {
        ProviderId::Isp
    }

    fn describe(&self) -> String {
        format!("ISP configuration as ConfigMaps {CONFIGMAP} on the {}", self.cluster.describe())
    }

    fn list(&self, scope: &TenantScope) -> Result<Vec<LiveResource>> {
        let tenants = match scope {
            TenantScope::All => None,
            TenantScope::Only(s) if s.is_empty() => return Ok(Vec::new()),
            TenantScope::Only(s) => Some(s),
        };
        self.cluster.block_on(self.list_tenants(tenants))
    }

    fn fetch(&self, addresses: &[Address]) -> Result<Vec<LiveResource>> {
        let tenants: BTreeSet<String> =
            addresses.iter().filter(|a| a.kind == ResourceKind::IspConfig).map(|a| a.tenant.to_string()).collect();
        if tenants.is_empty() {
            return Ok(Vec::new());
        }
        self.cluster.block_on(self.list_tenants(Some(&tenants)))
    }

    fn put(&self, r: &Resource, _secret: Option<&SecretValue>, expect: &Expect) -> Result<LiveResource> {
        let a = &r.address;
        let Content::Text(text) = &*r.content else {
            return Err(ProviderError::Other(format!("{a}: the ISP configuration must be text")));
        };
        let tenant = a.tenant.as_str();
        let ns = namespace(tenant);
        let addr = a.to_string();
        self.cluster.block_on(async {
            let current = self.current(tenant, &addr).await?;
            let before = current.as_ref().map(|c| Self::live(tenant, c).fingerprint);
            expect.check(a, before.as_ref())?;
            let mut body = json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": CONFIGMAP, "namespace": ns, "labels": Self::labels(tenant)},
                "data": {KEY: text},
            });
            if let Some(rv) = current.as_ref().and_then(resource_version) {
                body["metadata"]["resourceVersion"] = Value::String(rv.to_owned());
            }
            let stored = match self.cluster.apply_in(&self.configmaps, Some(&ns), CONFIGMAP, &body, &addr).await? {
                Some(stored) => stored,
                None => {
                    // The namespace does not exist yet: create it, then write.
                    let namespace = json!({
                        "apiVersion": "v1",
                        "kind": "Namespace",
                        "metadata": {"name": ns, "labels": {MANAGED_BY.0: MANAGED_BY.1, TENANT_LABEL: tenant}},
                    });
                    self.cluster.apply(&self.namespaces, None, &ns, &namespace, &addr).await?;
                    self.cluster.apply(&self.configmaps, Some(&ns), CONFIGMAP, &body, &addr).await?
                }
            };
            Ok(Self::live(tenant, &stored))
        })
    }

    fn delete(&self, a: &Address, expect: &Expect, _destroy: bool) -> Result<()> {
        let tenant = a.tenant.as_str();
        let addr = a.to_string();
        self.cluster.block_on(async {
            let Some(cur) = self.current(tenant, &addr).await? else { return Ok(()) };
            expect.check(a, Some(&Self::live(tenant, &cur).fingerprint))?;
            let ns = namespace(tenant);
            self.cluster.delete(&self.configmaps, Some(&ns), CONFIGMAP, resource_version(&cur), &addr).await
        })
    }
}
