//! `[providers.isp] kind = "http"`: each tenant's ISP Framework instance, at `url` with
//! `{tenant}` standing for the tenant id (`platform-api.md`).
//!
//! `isp.config` is the rendered `isp_config.yaml` text: read with `GET /config` (404 before
//! the first delivery), written with `PUT /config` (`{"config", "features"}`, `If-Match`),
//! then `POST /config/hot-reload` `{"component": "all"}`. If the reload fails, the previous
//! configuration is put back (and reloaded) before the write is reported as failed, so an
//! instance is never left holding a configuration it did not load.
//!
//! Every instance is its own circuit-breaker target: a dead instance fails its own tenant
//! fast and leaves the others alone. The instances cannot be listed, so
//! `TenantScope::All` means the tenants of the engine's session (the repository's and the
//! state's).

use super::{Client, Cond, HttpSettings, Reply, each, path_segment};
use crate::fingerprint::{self, Fingerprint};
use crate::load::settings::ProviderSettings;
use crate::load::yaml;
use crate::model::{Address, Content, ProviderId, Resource, ResourceKind};
use crate::providers::secret_value::SecretValue;
use crate::providers::{Expect, LiveResource, Provider, ProviderError, Result, Session, TenantScope};
use reqwest::Method;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};

pub struct Isp {
    api: Arc<Api>,
    session: RwLock<Option<Session>>,
}

struct Api {
    client: Client,
    /// The URL template, with `{tenant}`.
    template: String,
    /// tenant → (fingerprint, etag, text) of the config, from the last read or write.
    seen: Mutex<HashMap<String, (Fingerprint, String, String)>>,
}

impl Isp {
    pub fn new(p: &ProviderSettings) -> anyhow::Result<Isp> {
        let settings = HttpSettings::from_settings("isp", p)?;
        if !settings.url.contains("{tenant}") {
            anyhow::bail!(
                "[providers.isp] url = \"{}\" must contain {{tenant}}: each tenant has its own ISP Framework instance",
                settings.url
            );
        }
        let template = settings.url.clone();
        Ok(Isp {
            api: Arc::new(Api {
                client: Client::new("ISP instance", settings)?,
                template,
                seen: Mutex::new(HashMap::new()),
            }),
            session: RwLock::new(None),
        })
    }
}

/// The `features` an instance is told along with its configuration: the rendered config's
/// own `features` mapping (empty when it has none).
pub fn features_of(config: &str) -> Value {
    match yaml::parse_documents(config) {
        Ok(mut docs) if docs.len() == 1 => match docs.remove(0).value.get("features") {
            Some(Value::Object(m)) => Value::Object(m.clone()),
            _ => Value::Object(Map::new()),
        },
        _ => Value::Object(Map::new()),
    }
}

impl Api {
    fn label(&self) -> &'static str {
        self.client.label
    }

    /// The instance's base URL: the breaker's target.
    fn base(&self, tenant: &str) -> Result<String> {
        Ok(self.template.replace("{tenant}", path_segment(tenant)?))
    }

    async fn call(&self, tenant: &str, method: Method, rest: &str, body: Option<&Value>, cond: Cond) -> Result<Reply> {
        let base = self.base(tenant)?;
        let url = format!("{base}{rest}");
        self.client.call(&base, method, &url, body, cond).await
    }

    fn remember(&self, tenant: &str, seen: Option<(Fingerprint, String, String)>) {
        let mut m = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen {
            Some(s) => m.insert(tenant.to_owned(), s),
            None => m.remove(tenant),
        };
    }

    /// `GET /config`: the configuration and its etag, or nothing (404).
    async fn read(&self, tenant: &str) -> Result<Option<(LiveResource, String)>> {
        let reply = self.call(tenant, Method::GET, "/config", None, Cond::None).await?;
        if reply.is(404) {
            self.remember(tenant, None);
            return Ok(None);
        }
        let url = reply.url.clone();
        let data = reply.data(self.label())?;
        let bad = |what: &str| ProviderError::Other(format!("{}: GET {url}: {what}", self.label()));
        let etag = data.get("etag").and_then(Value::as_str).ok_or_else(|| bad("the answer has no `etag`"))?;
        let text = data.get("config").and_then(Value::as_str).ok_or_else(|| bad("the answer has no `config` text"))?;
        let content = Content::Text(text.to_owned());
        let live = LiveResource {
            address: Address::new(tenant, ResourceKind::IspConfig, None),
            fingerprint: fingerprint::of(&content),
            content: Some(Box::new(content)),
        };
        self.remember(tenant, Some((live.fingerprint.clone(), etag.to_owned(), text.to_owned())));
        Ok(Some((live, etag.to_owned())))
    }

    /// The condition to write under and the text live before (for putting it back).
    async fn condition(&self, a: &Address, expect: &Expect) -> Result<(Cond, Option<String>)> {
        if let Expect::Fingerprint(fp) = expect {
            let cached = self.seen.lock().unwrap_or_else(|p| p.into_inner()).get(a.tenant.as_str()).cloned();
            if let Some((cfp, etag, text)) = cached
                && &cfp == fp
            {
                return Ok((Cond::IfMatch(etag), Some(text)));
            }
        }
        if *expect == Expect::Absent {
            return Ok((Cond::IfNoneMatchAny, None));
        }
        let current = self.read(&a.tenant).await?;
        let found = current.as_ref().map(|(l, _)| &l.fingerprint);
        expect.check(a, found)?;
        Ok(match current {
            Some((l, etag)) => (Cond::IfMatch(etag), text_of(&l)),
            None => (Cond::None, None),
        })
    }

    async fn write(&self, tenant: &str, text: &str, cond: Cond) -> Result<Reply> {
        let body = json!({"config": text, "features": features_of(text)});
        self.call(tenant, Method::PUT, "/config", Some(&body), cond).await
    }

    async fn reload(&self, tenant: &str) -> Result<()> {
        let body = json!({"component": "all"});
        let data =
            self.call(tenant, Method::POST, "/config/hot-reload", Some(&body), Cond::None).await?.data(self.label())?;
        match data.get("status").and_then(Value::as_str) {
            None | Some("reloaded") => Ok(()),
            Some(other) => Err(ProviderError::Other(format!("{}: hot-reload answered status `{other}`", self.label()))),
        }
    }

    async fn put(&self, r: &Resource, expect: &Expect) -> Result<LiveResource> {
        let a = &r.address;
        let Content::Text(text) = &*r.content else {
            return Err(ProviderError::Other(format!("{a}: an ISP configuration must be text")));
        };
        let (cond, before) = self.condition(a, expect).await?;
        let reply = self.write(&a.tenant, text, cond).await?;
        if reply.is(412) {
            // Someone wrote meanwhile (or our own retried write landed): re-read, never
            // overwrite blindly.
            let now = self.read(&a.tenant).await?;
            let found = now.as_ref().map(|(l, _)| l.fingerprint.clone());
            return match now {
                Some((l, _)) if l.fingerprint == fingerprint::of(&r.content) => Ok(l),
                _ => Err(expect.conflict(a, found.as_ref())),
            };
        }
        reply.data(self.label())?;
        if let Err(e) = self.reload(&a.tenant).await {
            let restored = match &before {
                Some(old) => match self.read(&a.tenant).await {
                    Ok(Some((_, etag))) => match self.write(&a.tenant, old, Cond::IfMatch(etag)).await {
                        Ok(rep) if rep.outcome.is_ok() => {
                            self.reload(&a.tenant).await.map(|_| "the previous configuration was put back")
                        }
                        Ok(rep) => rep.data(self.label()).map(|_| "the previous configuration was put back"),
                        Err(e) => Err(e),
                    },
                    Ok(None) => Ok("the instance holds no configuration now"),
                    Err(e) => Err(e),
                },
                None => Ok("this was the first delivery; the instance holds it without having loaded it"),
            };
            let what = match restored {
                Ok(s) => s.to_owned(),
                Err(e2) => format!("putting the previous configuration back failed too: {e2}"),
            };
            return Err(ProviderError::Unavailable(format!("{a}: written, but the hot-reload failed: {e}; {what}")));
        }
        match self.read(&a.tenant).await? {
            Some((l, _)) => Ok(l),
            None => Err(ProviderError::Other(format!("{a}: written, but GET /config finds nothing"))),
        }
    }

    async fn delete(&self, a: &Address, expect: &Expect) -> Result<()> {
        let current = self.read(&a.tenant).await?;
        let found = current.as_ref().map(|(l, _)| l.fingerprint.clone());
        expect.check(a, found.as_ref())?;
        let Some((_, etag)) = current else { return Ok(()) };
        let reply = self.call(&a.tenant, Method::DELETE, "/config", None, Cond::IfMatch(etag)).await?;
        match reply.status {
            404 => Ok(()),
            // platform-api.md defines no delete for an instance's configuration: it goes away
            // with the instance itself (its Kubernetes resources, deleted with the tenant).
            // The engine stops managing it; the record is dropped.
            405 | 501 => {
                tracing::warn!(
                    address = %a,
                    url = %reply.url,
                    "the ISP instance cannot remove its configuration ({}); it goes away with the instance",
                    super::status_text(reply.status)
                );
                self.remember(&a.tenant, None);
                Ok(())
            }
            412 => Err(expect.conflict(a, None)),
            _ => {
                reply.data(self.label())?;
                self.remember(&a.tenant, None);
                Ok(())
            }
        }
    }
}

fn text_of(l: &LiveResource) -> Option<String> {
    match l.content.as_deref() {
        Some(Content::Text(t)) => Some(t.clone()),
        _ => None,
    }
}

async fn read_tenants(api: Arc<Api>, tenants: Vec<String>) -> Result<Vec<LiveResource>> {
    let results = each(tenants, |t| {
        let api = api.clone();
        async move { api.read(&t).await }
    })
    .await;
    let mut found = Vec::new();
    let mut failed = BTreeMap::new();
    for (t, r) in results {
        match r {
            Ok(l) => found.extend(l.map(|(l, _)| l)),
            Err(e @ ProviderError::Denied(_)) => return Err(e),
            Err(e) => {
                failed.insert(t, e.to_string());
            }
        }
    }
    if failed.is_empty() { Ok(found) } else { Err(ProviderError::Partial { found, failed }) }
}

impl Provider for Isp {
    fn id(&self) -> ProviderId {
        ProviderId::Isp
    }

    fn describe(&self) -> String {
        format!("ISP instances {}", self.api.template)
    }

    fn list(&self, scope: &TenantScope) -> Result<Vec<LiveResource>> {
        let tenants: BTreeSet<String> = match scope {
            TenantScope::Only(s) => s.clone(),
            TenantScope::All => match &*self.session.read().unwrap_or_else(|p| p.into_inner()) {
                Some(s) => s.tenants.clone(),
                None => {
                    return Err(ProviderError::Other(
                        "the ISP instances cannot be listed: no tenant list was given (internal error)".into(),
                    ));
                }
            },
        };
        Client::block_on(read_tenants(self.api.clone(), tenants.into_iter().collect()))
    }

    fn fetch(&self, addresses: &[Address]) -> Result<Vec<LiveResource>> {
        let mut tenants: Vec<String> =
            addresses.iter().filter(|a| a.kind == ResourceKind::IspConfig).map(|a| a.tenant.to_string()).collect();
        tenants.sort();
        tenants.dedup();
        Client::block_on(read_tenants(self.api.clone(), tenants))
    }

    fn put(&self, r: &Resource, _secret: Option<&SecretValue>, expect: &Expect) -> Result<LiveResource> {
        tracing::trace!(address = %r.address, ?expect, "isp put");
        if r.address.kind != ResourceKind::IspConfig {
            return Err(ProviderError::Other(format!("{} does not belong to an ISP instance", r.address)));
        }
        Client::block_on(self.api.put(r, expect))
    }

    fn deletes_with_tenant(&self) -> bool {
        true
    }

    fn delete(&self, a: &Address, expect: &Expect, _destroy: bool) -> Result<()> {
        tracing::trace!(address = %a, ?expect, "isp delete");
        Client::block_on(self.api.delete(a, expect))
    }

    fn begin(&self, session: &Session) {
        self.api.client.set_correlation_id(&session.correlation_id);
        *self.session.write().unwrap_or_else(|p| p.into_inner()) = Some(session.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_come_from_the_rendered_config() {
        assert_eq!(features_of("plan:\n  name: x\nfeatures:\n  analytics: enabled\n"), json!({"analytics": "enabled"}));
        assert_eq!(features_of("features: {}\n"), json!({}));
        assert_eq!(features_of("not: [valid"), json!({}));
    }
}
