//! Fault injection, for testing what a failed write leaves behind.
//!
//! `DOTMAC_FAULTS="isp:put:3,management:delete:1"` makes the 3rd `put` on the ISP provider
//! and the 1st `delete` on the management provider fail (counted across the whole process,
//! all threads). `*` as the count fails every call. A fourth part `delay=500ms` slows the
//! chosen calls down instead of failing them (`isp:put:*:delay=500ms`), to hold an apply
//! open long enough for a test to act during it. Nothing is injected unless the variable
//! is set; the wrapper is not installed at all then.

use super::secret_value::SecretValue;
use super::{Expect, LiveResource, Provider, ProviderError, Result, Session, TenantScope};
use crate::model::{Address, ProviderId, Resource};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    op: String,
    /// `None`: every call.
    nth: Option<usize>,
    /// Slow the call down by this much instead of failing it.
    delay: Option<std::time::Duration>,
}

pub struct Faulty {
    inner: Arc<dyn Provider>,
    rules: Vec<Rule>,
    puts: AtomicUsize,
    deletes: AtomicUsize,
    lists: AtomicUsize,
    fetches: AtomicUsize,
}

/// Parses the rules of `spec` that concern `provider`.
fn rules_for(spec: &str, provider: ProviderId) -> Vec<Rule> {
    spec.split(',')
        .filter_map(|r| {
            let mut parts = r.trim().split(':');
            let (p, op, n) = (parts.next()?, parts.next()?, parts.next()?);
            let delay = match parts.next() {
                None => None,
                Some(d) => Some(crate::load::settings::parse_duration(d.strip_prefix("delay=")?)?),
            };
            (p == provider.as_str() || p == "*").then(|| Rule { op: op.to_owned(), nth: n.parse().ok(), delay })
        })
        .collect()
}

/// Wraps `inner` if `DOTMAC_FAULTS` names faults for it.
pub fn wrap(inner: Arc<dyn Provider>) -> Arc<dyn Provider> {
    let Ok(spec) = std::env::var("DOTMAC_FAULTS") else { return inner };
    let rules = rules_for(&spec, inner.id());
    if rules.is_empty() {
        return inner;
    }
    Arc::new(Faulty {
        inner,
        rules,
        puts: AtomicUsize::new(0),
        deletes: AtomicUsize::new(0),
        lists: AtomicUsize::new(0),
        fetches: AtomicUsize::new(0),
    })
}

impl Faulty {
    fn check(&self, op: &str, counter: &AtomicUsize, what: &str) -> Result<()> {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        let hits = || self.rules.iter().filter(|r| r.op == op && r.nth.is_none_or(|k| k == n));
        if let Some(d) = hits().filter_map(|r| r.delay).max() {
            std::thread::sleep(d);
        }
        if hits().any(|r| r.delay.is_none()) {
            return Err(ProviderError::Unavailable(format!("injected fault: {} {op} #{n} ({what})", self.inner.id())));
        }
        Ok(())
    }
}

impl Provider for Faulty {
    fn id(&self) -> ProviderId {
        self.inner.id()
    }
    fn describe(&self) -> String {
        format!("{} with injected faults", self.inner.describe())
    }
    fn list(&self, scope: &TenantScope) -> Result<Vec<LiveResource>> {
        self.check("list", &self.lists, "all")?;
        self.inner.list(scope)
    }
    fn fetch(&self, addresses: &[Address]) -> Result<Vec<LiveResource>> {
        self.check("fetch", &self.fetches, "batch")?;
        self.inner.fetch(addresses)
    }
    fn put(&self, r: &Resource, secret: Option<&SecretValue>, expect: &Expect) -> Result<LiveResource> {
        self.check("put", &self.puts, &r.address.to_string())?;
        self.inner.put(r, secret, expect)
    }
    fn delete(&self, a: &Address, expect: &Expect, destroy: bool) -> Result<()> {
        self.check("delete", &self.deletes, &a.to_string())?;
        self.inner.delete(a, expect, destroy)
    }
    fn deletes_with_tenant(&self) -> bool {
        self.inner.deletes_with_tenant()
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn restore_secret(&self, a: &Address, version: u64) -> Result<LiveResource> {
        self.inner.restore_secret(a, version)
    }
    fn begin(&self, session: &Session) {
        self.inner.begin(session)
    }
    fn audit_event(&self, entry: &crate::state::AuditEntry) -> Result<()> {
        self.inner.audit_event(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse() {
        assert_eq!(
            rules_for("isp:put:3,management:delete:*", ProviderId::Isp),
            vec![Rule { op: "put".into(), nth: Some(3), delay: None }]
        );
        assert_eq!(
            rules_for("isp:put:3,management:delete:*", ProviderId::Management),
            vec![Rule { op: "delete".into(), nth: None, delay: None }]
        );
        assert_eq!(
            rules_for("isp:put:*:delay=250ms", ProviderId::Isp),
            vec![Rule { op: "put".into(), nth: None, delay: Some(std::time::Duration::from_millis(250)) }]
        );
        assert!(rules_for("isp:put:*:250ms", ProviderId::Isp).is_empty(), "a fourth part is delay=<duration>");
        assert!(rules_for("isp:put:3", ProviderId::Secrets).is_empty());
    }
}
