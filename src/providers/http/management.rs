//! `[providers.management] kind = "http"`: tenant records and plugin licenses on the
//! management platform (`platform-api.md`, base `.../api/v1/config`).
//!
//! | resource | read | write | delete |
//! | --- | --- | --- | --- |
//! | `management.tenant` | `GET /tenant/{id}/config` | `PUT /tenant/{id}/config/coordinate` (`If-Match`) | `DELETE /tenant/{id}/config` (`If-Match`) |
//! | `management.license[p]` | `GET /tenant/{id}/plugins` | `POST /tenant/{id}/plugins/provision` with the whole set, `p` replaced | the set without `p` |
//!
//! Listing is `GET /tenants` (every tenant and its etag, one call), then the record and the
//! licenses of each tenant in scope, [`READ_CONCURRENCY`](super::READ_CONCURRENCY) at a time.
//!
//! What the platform returns is normalised back to the engine's content (the `configuration`
//! without `tenant_id`/`etag`; licenses with our field names), so that a record written and
//! read back fingerprints exactly as rendered: a re-plan after apply is empty.

use super::{Client, Cond, HttpSettings, Reply, each, path_segment};
use crate::fingerprint::{self, Fingerprint};
use crate::load::settings::ProviderSettings;
use crate::model::{Address, Content, ProviderId, Resource, ResourceKind, Strategy};
use crate::providers::secret_value::SecretValue;
use crate::providers::{Expect, LiveResource, Provider, ProviderError, Result, Session, TenantScope};
use crate::state::{AuditEntry, JsonText};
use reqwest::Method;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

/// Our license fields and the platform's, both ways.
const LICENSE_FIELDS: [(&str, &str); 5] = [
    ("plugin", "plugin_id"),
    ("tier", "license_tier"),
    ("usage_limits", "usage_limits"),
    ("expires", "expiration_date"),
    ("auto_activate", "auto_activate"),
];

pub struct Management {
    api: Arc<Api>,
    session: RwLock<Session>,
    /// One read-modify-write of a tenant's license set at a time (the platform replaces the
    /// whole set and has no etag for it).
    license_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// The client and base URL, shared with the tasks that read tenants concurrently.
struct Api {
    client: Client,
    base: String,
    /// tenant → (fingerprint, etag) of the record, from the last read or write: a write that
    /// expects that fingerprint sends that etag, and the platform's 412 catches any move.
    etags: Mutex<HashMap<String, (Fingerprint, String)>>,
}

/// A tenant as read: the record (with its etag) and the licenses.
struct TenantRead {
    record: Option<(LiveResource, String)>,
    licenses: Vec<LiveResource>,
}

impl Management {
    pub fn new(p: &ProviderSettings) -> anyhow::Result<Management> {
        let settings = HttpSettings::from_settings("management", p)?;
        let base = settings.url.clone();
        Ok(Management {
            api: Arc::new(Api {
                client: Client::new("management platform", settings)?,
                base,
                etags: Mutex::new(HashMap::new()),
            }),
            session: RwLock::new(Session::default()),
            license_locks: Mutex::new(HashMap::new()),
        })
    }

    fn license_lock(&self, tenant: &str) -> Arc<Mutex<()>> {
        let mut locks = self.license_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(tenant.to_owned()).or_default().clone()
    }

    fn coordination(&self, tenant: &str) -> (Strategy, bool) {
        let s = self.session.read().unwrap_or_else(|p| p.into_inner());
        let c = s.coordination.get(tenant).cloned().unwrap_or_default();
        (c.strategy, c.rollback_on_failure)
    }
}

impl Api {
    fn label(&self) -> &'static str {
        self.client.label
    }

    fn url(&self, tenant: &str, rest: &str) -> Result<String> {
        Ok(format!("{}/tenant/{}{rest}", self.base, path_segment(tenant)?))
    }

    async fn call(&self, method: Method, url: &str, body: Option<&Value>, cond: Cond) -> Result<Reply> {
        self.client.call(&self.base, method, url, body, cond).await
    }

    /// `GET /tenant/{id}/config`: the record and its etag, or nothing (404).
    async fn read_record(&self, tenant: &str) -> Result<Option<(LiveResource, String)>> {
        let url = self.url(tenant, "/config")?;
        let reply = self.call(Method::GET, &url, None, Cond::None).await?;
        if reply.is(404) {
            self.etags.lock().unwrap_or_else(|p| p.into_inner()).remove(tenant);
            return Ok(None);
        }
        let data = reply.data(self.label())?;
        let bad = |what: &str| ProviderError::Other(format!("{}: GET {url}: {what}", self.label()));
        if let Some(id) = data.get("tenant_id").and_then(Value::as_str)
            && id != tenant
        {
            return Err(bad(&format!("answered the record of tenant `{id}`")));
        }
        let etag = data.get("etag").and_then(Value::as_str).ok_or_else(|| bad("the answer has no `etag`"))?;
        let config =
            data.get("configuration").filter(|c| c.is_object()).ok_or_else(|| bad("no `configuration` object"))?;
        let content = Content::Json(config.clone());
        let live = LiveResource {
            address: Address::new(tenant, ResourceKind::ManagementTenant, None),
            fingerprint: fingerprint::of(&content),
            content: Some(Box::new(content)),
        };
        self.etags
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.to_owned(), (live.fingerprint.clone(), etag.to_owned()));
        Ok(Some((live, etag.to_owned())))
    }

    /// `GET /tenant/{id}/plugins`: the platform's license entries as it returns them.
    async fn read_license_entries(&self, tenant: &str) -> Result<Vec<Value>> {
        let url = self.url(tenant, "/plugins")?;
        let reply = self.call(Method::GET, &url, None, Cond::None).await?;
        if reply.is(404) {
            return Ok(Vec::new());
        }
        let data = reply.data(self.label())?;
        match data.get("licenses") {
            Some(Value::Array(a)) => Ok(a.clone()),
            Some(Value::Null) | None => Ok(Vec::new()),
            Some(_) => Err(ProviderError::Other(format!("{}: GET {url}: `licenses` is not a list", self.label()))),
        }
    }

    async fn read_tenant(&self, tenant: &str) -> Result<TenantRead> {
        let record = self.read_record(tenant).await?;
        let licenses =
            if record.is_some() { licenses_of(tenant, &self.read_license_entries(tenant).await?) } else { Vec::new() };
        Ok(TenantRead { record, licenses })
    }

    /// The condition to write the record under, checking `expect` (reading the record when
    /// the etag of the expected fingerprint is not known).
    async fn record_condition(&self, a: &Address, expect: &Expect) -> Result<Cond> {
        if let Expect::Fingerprint(fp) = expect {
            let cached = self.etags.lock().unwrap_or_else(|p| p.into_inner()).get(a.tenant.as_str()).cloned();
            if let Some((cfp, etag)) = cached
                && &cfp == fp
            {
                return Ok(Cond::IfMatch(etag));
            }
        }
        if *expect == Expect::Absent {
            return Ok(Cond::IfNoneMatchAny);
        }
        let current = self.read_record(&a.tenant).await?;
        let found = current.as_ref().map(|(l, _)| &l.fingerprint);
        expect.check(a, found)?;
        Ok(match current {
            Some((_, etag)) => Cond::IfMatch(etag),
            None => Cond::None,
        })
    }

    /// After a 412: what is live now. Our own earlier try may have landed (a retried write);
    /// then this is success, otherwise a conflict — never a blind overwrite.
    async fn after_precondition_failed(&self, r: &Resource, expect: &Expect) -> Result<LiveResource> {
        let now = self.read_record(&r.address.tenant).await?;
        let found = now.as_ref().map(|(l, _)| l.fingerprint.clone());
        match now {
            Some((l, _)) if l.fingerprint == fingerprint::of(&r.content) => Ok(l),
            _ => Err(expect.conflict(&r.address, found.as_ref())),
        }
    }

    async fn put_record(
        &self,
        r: &Resource,
        expect: &Expect,
        strategy: Strategy,
        rollback: bool,
    ) -> Result<LiveResource> {
        let a = &r.address;
        let Content::Json(config) = &*r.content else {
            return Err(ProviderError::Other(format!("{a}: a tenant record must be structured content")));
        };
        let cond = self.record_condition(a, expect).await?;
        let url = self.url(&a.tenant, "/config/coordinate")?;
        let body = json!({
            "configuration": config,
            "coordination_strategy": strategy,
            "rollback_on_failure": rollback,
            // The engine validates consistency itself once both sides are written.
            "validate_consistency": false,
        });
        let reply = self.call(Method::PUT, &url, Some(&body), cond).await?;
        if reply.is(412) {
            return self.after_precondition_failed(r, expect).await;
        }
        let data = reply.data(self.label())?;
        if let Some(status) = data.get("status").and_then(Value::as_str)
            && matches!(status, "failed" | "rolled_back" | "rejected")
        {
            return Err(ProviderError::Other(format!(
                "{a}: the management platform's coordination ended `{status}`: {}",
                self.client.redact(&data.to_string())
            )));
        }
        match self.read_record(&a.tenant).await? {
            Some((l, _)) => Ok(l),
            None => Err(ProviderError::Other(format!("{a}: written, but GET {} finds no record", url))),
        }
    }

    async fn delete_record(&self, a: &Address, expect: &Expect) -> Result<()> {
        let current = self.read_record(&a.tenant).await?;
        let found = current.as_ref().map(|(l, _)| l.fingerprint.clone());
        expect.check(a, found.as_ref())?;
        let Some((_, etag)) = current else { return Ok(()) };
        let url = self.url(&a.tenant, "/config")?;
        let reply = self.call(Method::DELETE, &url, None, Cond::IfMatch(etag)).await?;
        if reply.is(412) {
            let now = self.read_record(&a.tenant).await?;
            return match now {
                None => Ok(()),
                Some((l, _)) => Err(expect.conflict(a, Some(&l.fingerprint))),
            };
        }
        if !reply.is(404) {
            reply.data(self.label())?;
        }
        self.etags.lock().unwrap_or_else(|p| p.into_inner()).remove(a.tenant.as_str());
        Ok(())
    }

    /// Writes (`Some`) or removes (`None`) one license, keeping every other license of the
    /// tenant as the platform holds it.
    async fn change_license(&self, a: &Address, new: Option<&Value>, expect: &Expect) -> Result<Option<LiveResource>> {
        let plugin = a.name.as_deref().unwrap_or_default();
        let mut entries = self.read_license_entries(&a.tenant).await?;
        let pos = entries.iter().position(|e| e.get("plugin_id").and_then(Value::as_str) == Some(plugin));
        let found = pos.and_then(|i| license_from_platform(&entries[i])).map(|c| fingerprint::of(&Content::Json(c)));
        expect.check(a, found.as_ref())?;
        let auto_activate = match new {
            Some(content) => {
                let entry = license_to_platform(content);
                match pos {
                    Some(i) => entries[i] = entry,
                    None => entries.push(entry),
                }
                content.get("auto_activate").and_then(Value::as_bool).unwrap_or(false)
            }
            None => {
                let Some(i) = pos else { return Ok(None) };
                entries.remove(i);
                false
            }
        };
        let url = self.url(&a.tenant, "/plugins/provision")?;
        let body = json!({
            "licenses": entries,
            "auto_activate": auto_activate,
            // The engine delivers the ISP Framework's configuration itself.
            "sync_to_isp_framework": false,
        });
        self.call(Method::POST, &url, Some(&body), Cond::None).await?.data(self.label())?;
        let now = licenses_of(&a.tenant, &self.read_license_entries(&a.tenant).await?);
        let live = now.into_iter().find(|l| &l.address == a);
        match (new, &live) {
            (Some(_), None) => Err(ProviderError::Other(format!(
                "{a}: provisioned, but GET /tenant/{}/plugins does not list it",
                a.tenant
            ))),
            (None, Some(_)) => {
                Err(ProviderError::Other(format!("{a}: removed from the set, but the platform still lists it")))
            }
            _ => Ok(live),
        }
    }

    async fn post_audit(&self, e: &AuditEntry) -> Result<()> {
        let address = Address::parse(&e.address);
        let provider = address.as_ref().map(|a| a.provider());
        let target = match provider {
            Some(ProviderId::Management) => "management_platform",
            Some(ProviderId::Isp) => "tenant_isp_framework",
            Some(ProviderId::Kubernetes) => "kubernetes",
            Some(ProviderId::Secrets) => "openbao",
            None => "unknown",
        };
        let event_type = match (provider, &*e.action) {
            (Some(ProviderId::Secrets), "rotate") => "secret_rotation",
            (Some(ProviderId::Secrets), _) => "secret_operation",
            (_, "create") => "configuration_create",
            (_, "delete") => "configuration_delete",
            _ => "configuration_update",
        };
        let component = e.address.split_once('/').map(|(_, c)| c).unwrap_or(&e.address);
        let body = json!({
            "source_platform": "management_platform",
            "target_platform": target,
            "tenant_id": e.tenant,
            "event_type": event_type,
            "event_data": {
                "component": component,
                "change_type": e.action,
                "old_value": e.before.as_ref().map(JsonText::value),
                "new_value": e.after.as_ref().map(JsonText::value),
                "risk_level": e.risk,
            },
            "correlation_id": e.correlation_id,
            "metadata": {
                "user_id": e.actor,
                "change_reason": format!("dotmac-gitops apply: {} {}", e.action, e.address),
                "source": "dotmac-gitops",
                "applied_at": e.time,
            },
        });
        let url = format!("{}/audit/cross-platform", self.base);
        self.call(Method::POST, &url, Some(&body), Cond::None).await?.data(self.label())?;
        Ok(())
    }
}

/// The platform's license entry → our license content (fields we do not manage are left out).
pub fn license_from_platform(entry: &Value) -> Option<Value> {
    let obj = entry.as_object()?;
    obj.get("plugin_id")?.as_str()?;
    let mut out = Map::new();
    for (ours, theirs) in LICENSE_FIELDS {
        if let Some(v) = obj.get(theirs).filter(|v| !v.is_null()) {
            out.insert(ours.to_owned(), v.clone());
        }
    }
    Some(Value::Object(out))
}

/// Our license content → the platform's entry.
pub fn license_to_platform(content: &Value) -> Value {
    let mut out = Map::new();
    for (ours, theirs) in LICENSE_FIELDS {
        if let Some(v) = content.get(ours).filter(|v| !v.is_null()) {
            out.insert(theirs.to_owned(), v.clone());
        }
    }
    Value::Object(out)
}

fn licenses_of(tenant: &str, entries: &[Value]) -> Vec<LiveResource> {
    entries
        .iter()
        .filter_map(|e| {
            let c = license_from_platform(e)?;
            let plugin = c.get("plugin")?.as_str()?.to_owned();
            let content = Content::Json(c);
            Some(LiveResource {
                address: Address::new(tenant, ResourceKind::ManagementLicense, Some(&plugin)),
                fingerprint: fingerprint::of(&content),
                content: Some(Box::new(content)),
            })
        })
        .collect()
}

/// Reads every tenant concurrently; one tenant's failure is reported, not fatal.
async fn read_tenants(api: Arc<Api>, tenants: Vec<String>) -> Result<Vec<LiveResource>> {
    let results = each(tenants, |t| {
        let api = api.clone();
        async move { api.read_tenant(&t).await }
    })
    .await;
    let mut found = Vec::new();
    let mut failed = BTreeMap::new();
    for (t, r) in results {
        match r {
            Ok(read) => {
                found.extend(read.record.map(|(l, _)| l));
                found.extend(read.licenses);
            }
            // A refused token is the same for every tenant: fail the whole read.
            Err(e @ ProviderError::Denied(_)) => return Err(e),
            Err(e) => {
                failed.insert(t, e.to_string());
            }
        }
    }
    if failed.is_empty() { Ok(found) } else { Err(ProviderError::Partial { found, failed }) }
}

impl Provider for Management {
    fn id(&self) -> ProviderId {
        ProviderId::Management
    }

    fn describe(&self) -> String {
        format!("management platform {}", self.api.base)
    }

    fn list(&self, scope: &TenantScope) -> Result<Vec<LiveResource>> {
        let api = self.api.clone();
        // Tenants the platform has but neither the repository nor the state knows are not
        // managed here: listed, not read.
        let known: Option<std::collections::BTreeSet<String>> = {
            let s = self.session.read().unwrap_or_else(|p| p.into_inner());
            (!s.correlation_id.is_empty()).then(|| s.tenants.clone())
        };
        Client::block_on(async move {
            let url = format!("{}/tenants", api.base);
            let data = api.call(Method::GET, &url, None, Cond::None).await?.data(api.label())?;
            let Value::Array(items) = data else {
                return Err(ProviderError::Other(format!("{}: GET {url}: `data` is not a list", api.label())));
            };
            let tenants: Vec<String> = items
                .iter()
                .filter_map(|t| t.get("tenant_id").and_then(Value::as_str))
                .filter(|t| scope.contains(t) && known.as_ref().is_none_or(|k| k.contains(*t)))
                .map(str::to_owned)
                .collect();
            read_tenants(api, tenants).await
        })
    }

    fn fetch(&self, addresses: &[Address]) -> Result<Vec<LiveResource>> {
        let mut tenants: Vec<String> = addresses.iter().map(|a| a.tenant.to_string()).collect();
        tenants.sort();
        tenants.dedup();
        let all = Client::block_on(read_tenants(self.api.clone(), tenants))?;
        Ok(all.into_iter().filter(|l| addresses.contains(&l.address)).collect())
    }

    fn put(&self, r: &Resource, _secret: Option<&SecretValue>, expect: &Expect) -> Result<LiveResource> {
        let a = &r.address;
        tracing::trace!(address = %a, ?expect, "management put");
        match a.kind {
            ResourceKind::ManagementTenant => {
                let (strategy, rollback) = self.coordination(&a.tenant);
                Client::block_on(self.api.put_record(r, expect, strategy, rollback))
            }
            ResourceKind::ManagementLicense => {
                let Content::Json(content) = &*r.content else {
                    return Err(ProviderError::Other(format!("{a}: a license must be structured content")));
                };
                let lock = self.license_lock(&a.tenant);
                let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
                Client::block_on(self.api.change_license(a, Some(content), expect))?
                    .ok_or_else(|| ProviderError::Other(format!("{a}: not live after writing")))
            }
            _ => Err(ProviderError::Other(format!("{a} does not belong to the management platform"))),
        }
    }

    fn delete(&self, a: &Address, expect: &Expect, _destroy: bool) -> Result<()> {
        tracing::trace!(address = %a, ?expect, "management delete");
        match a.kind {
            ResourceKind::ManagementTenant => Client::block_on(self.api.delete_record(a, expect)),
            ResourceKind::ManagementLicense => {
                let lock = self.license_lock(&a.tenant);
                let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
                Client::block_on(self.api.change_license(a, None, expect)).map(|_| ())
            }
            _ => Err(ProviderError::Other(format!("{a} does not belong to the management platform"))),
        }
    }

    fn begin(&self, session: &Session) {
        self.api.client.set_correlation_id(&session.correlation_id);
        *self.session.write().unwrap_or_else(|p| p.into_inner()) = session.clone();
    }

    fn audit_event(&self, entry: &AuditEntry) -> Result<()> {
        Client::block_on(self.api.post_audit(entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn licenses_map_both_ways_and_fingerprint_as_rendered() {
        let ours = json!({"plugin": "advanced_analytics", "tier": "enterprise",
            "usage_limits": {"users": "unlimited", "storage_gb": 500},
            "expires": "2027-12-31T23:59:59Z", "auto_activate": true});
        let theirs = license_to_platform(&ours);
        assert_eq!(
            theirs,
            json!({"plugin_id": "advanced_analytics", "license_tier": "enterprise",
                "usage_limits": {"users": "unlimited", "storage_gb": 500},
                "expiration_date": "2027-12-31T23:59:59Z", "auto_activate": true})
        );
        // What the platform adds (status, activation time) is not ours: left out.
        let mut returned = theirs.clone();
        returned["status"] = json!("active");
        returned["activated_at"] = json!("2026-01-01T00:00:00Z");
        let back = license_from_platform(&returned).unwrap();
        assert_eq!(fingerprint::of(&Content::Json(back)), fingerprint::of(&Content::Json(ours)));
        assert!(license_from_platform(&json!({"license_tier": "basic"})).is_none());
    }
}
