//! `/metrics`: Prometheus metrics (OpenMetrics text, `dotmac_` prefix), and the provider
//! wrapper that counts provider request errors.
//!
//! No metric carries a tenant label: with thousands of tenants that would be thousands of
//! series per metric. Per-tenant detail is in `/api/v1/status` and `/api/v1/tenants/{id}`.

use super::status::Status;
use crate::model::{Address, ProviderId, Resource};
use crate::providers::secret_value::SecretValue;
use crate::providers::{Expect, LiveResource, Provider, Providers, Session, TenantScope};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

type Labels = Vec<(&'static str, &'static str)>;

pub struct Metrics {
    registry: Registry,
    pub reconcile_duration: Histogram,
    pub reconciled_tenants: Counter,
    pub tenants: Family<Labels, Gauge>,
    pub drift_detected: Counter,
    pub drift_healed: Counter,
    pub self_heal_stopped: Counter,
    pub apply_failures: Counter,
    pub applied_changes: Counter,
    pub last_success: Gauge<f64, AtomicU64>,
    pub provider_errors: Family<Labels, Counter>,
    pub source_fetches: Family<Labels, Counter>,
    pub lock_waits: Counter,
    pub notifications: Family<Labels, Counter>,
    pub leader: Gauge,
    pub ready: Gauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("dotmac");
        let m = Metrics {
            reconcile_duration: Histogram::new(exponential_buckets(0.005, 2.0, 18)),
            reconciled_tenants: Counter::default(),
            tenants: Family::default(),
            drift_detected: Counter::default(),
            drift_healed: Counter::default(),
            self_heal_stopped: Counter::default(),
            apply_failures: Counter::default(),
            applied_changes: Counter::default(),
            last_success: Gauge::default(),
            provider_errors: Family::default(),
            source_fetches: Family::default(),
            lock_waits: Counter::default(),
            notifications: Family::default(),
            leader: Gauge::default(),
            ready: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register_with_unit(
            "reconcile_duration",
            "Time one reconcile of a batch of tenants took (plan, and apply when it applied)",
            Unit::Seconds,
            m.reconcile_duration.clone(),
        );
        registry.register("reconciled_tenants", "Tenant reconciles done", m.reconciled_tenants.clone());
        registry.register("tenants", "Tenants by status", m.tenants.clone());
        registry.register(
            "drift_detected",
            "Tenants found drifted (each time drift appears)",
            m.drift_detected.clone(),
        );
        registry.register("drift_healed", "Tenants whose drift the daemon healed", m.drift_healed.clone());
        registry.register(
            "self_heal_stopped",
            "Tenants the daemon stopped healing after too many attempts",
            m.self_heal_stopped.clone(),
        );
        registry.register("apply_failures", "Tenant applies that failed", m.apply_failures.clone());
        registry.register("applied_changes", "Changes applied", m.applied_changes.clone());
        registry.register_with_unit(
            "last_successful_sync_timestamp",
            "When a reconcile last ended with no tenant failed (Unix time)",
            Unit::Seconds,
            m.last_success.clone(),
        );
        registry.register(
            "provider_request_errors",
            "Provider calls that failed, by provider and operation",
            m.provider_errors.clone(),
        );
        registry.register("source_fetches", "Reads of the branch tip, by result", m.source_fetches.clone());
        registry.register("state_lock_waits", "Applies that found the state lock taken", m.lock_waits.clone());
        registry.register("notifications", "Webhook notifications, by event and outcome", m.notifications.clone());
        registry.register("leader", "1 when this replica reconciles", m.leader.clone());
        registry.register("ready", "1 once every tenant was checked after start", m.ready.clone());
        for s in Status::ALL {
            m.tenants.get_or_create(&vec![("status", s.as_str())]).set(0);
        }
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn set_counts(&self, counts: &std::collections::BTreeMap<Status, usize>) {
        for (s, n) in counts {
            self.tenants.get_or_create(&vec![("status", s.as_str())]).set(*n as i64);
        }
    }

    pub fn notification(&self, event: &'static str, outcome: &'static str) {
        self.notifications.get_or_create(&vec![("event", event), ("outcome", outcome)]).inc();
    }

    /// The providers, each wrapped to count its failed calls.
    pub fn count_errors(self: &Arc<Self>, p: Providers) -> Providers {
        let wrap =
            |inner: Arc<dyn Provider>| -> Arc<dyn Provider> { Arc::new(Counted { inner, metrics: self.clone() }) };
        Providers {
            secrets: wrap(p.secrets),
            management: wrap(p.management),
            isp: wrap(p.isp),
            kubernetes: wrap(p.kubernetes),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A provider whose failed calls are counted in `dotmac_provider_request_errors_total`.
struct Counted {
    inner: Arc<dyn Provider>,
    metrics: Arc<Metrics>,
}

impl Counted {
    fn count<T>(&self, op: &'static str, r: crate::providers::Result<T>) -> crate::providers::Result<T> {
        if r.is_err() {
            self.metrics
                .provider_errors
                .get_or_create(&vec![("provider", self.inner.id().as_str()), ("operation", op)])
                .inc();
        }
        r
    }
}

impl Provider for Counted {
    fn id(&self) -> ProviderId {
        self.inner.id()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn list(&self, scope: &TenantScope) -> crate::providers::Result<Vec<LiveResource>> {
        self.count("list", self.inner.list(scope))
    }
    fn fetch(&self, addresses: &[Address]) -> crate::providers::Result<Vec<LiveResource>> {
        self.count("fetch", self.inner.fetch(addresses))
    }
    fn fingerprints(
        &self,
        addresses: &[&Address],
    ) -> crate::providers::Result<Vec<Option<crate::fingerprint::Fingerprint>>> {
        self.count("fetch", self.inner.fingerprints(addresses))
    }
    fn put(
        &self,
        r: &Resource,
        secret: Option<&SecretValue>,
        expect: &Expect,
    ) -> crate::providers::Result<LiveResource> {
        self.count("put", self.inner.put(r, secret, expect))
    }
    fn delete(&self, a: &Address, expect: &Expect, destroy: bool) -> crate::providers::Result<()> {
        self.count("delete", self.inner.delete(a, expect, destroy))
    }
    fn flush(&self) -> crate::providers::Result<()> {
        self.count("flush", self.inner.flush())
    }
    fn restore_secret(&self, a: &Address, version: u64) -> crate::providers::Result<LiveResource> {
        self.count("restore", self.inner.restore_secret(a, version))
    }
    fn durable_on_flush(&self) -> bool {
        self.inner.durable_on_flush()
    }
    fn discard(&self) {
        self.inner.discard()
    }
    fn deletes_with_tenant(&self) -> bool {
        self.inner.deletes_with_tenant()
    }
    fn begin(&self, session: &Session) {
        self.inner.begin(session)
    }
    fn audit_event(&self, entry: &crate::state::AuditEntry) -> crate::providers::Result<()> {
        self.count("audit", self.inner.audit_event(entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_prefixed_and_every_status_is_present() {
        let m = Metrics::new();
        m.drift_detected.inc();
        m.reconcile_duration.observe(0.2);
        let text = m.encode();
        for s in Status::ALL {
            assert!(text.contains(&format!("dotmac_tenants{{status=\"{}\"}} 0", s.as_str())), "{text}");
        }
        assert!(text.contains("dotmac_drift_detected_total 1"), "{text}");
        assert!(text.contains("# TYPE dotmac_reconcile_duration_seconds histogram"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
