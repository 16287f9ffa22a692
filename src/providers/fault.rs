//! Fault injection, for testing what a failed write or a crash leaves behind.
//!
//! `DOTMAC_FAULTS="isp:put:3,management:delete:1"` makes the 3rd `put` on the ISP provider
//! and the 1st `delete` on the management provider fail (counted across the whole process,
//! all threads). `*` as the count fails every call, `*` as the provider means each provider
//! (each counts its own calls). A fourth part says how the call fails:
//!
//! - `fail` (the default): the call fails without reaching the system;
//! - `lost`: the call reaches the system and is done there, then fails (its answer is lost,
//!   as when a connection drops after the server applied a request);
//! - `kill`: the call is done, then the process kills itself with SIGKILL (a crash right
//!   after a write, before anything else happens). A local store holds writes in memory until
//!   `flush`; `kill` flushes it first, so that the write (and the provider's earlier ones)
//!   survive the crash as a remote system's would. Writes not flushed when a process dies are
//!   lost: `kill-before` on a later call shows that;
//! - `kill-before`: the process kills itself with SIGKILL instead of making the call;
//! - `delay=500ms`: the call is slowed down by that much, not failed (to hold an apply open
//!   long enough for a test to act during it).
//!
//! The ops are `put`, `delete`, `list`, `fetch` and `flush` (`flush:1:kill-before`: a crash
//! after every write of an apply, before any is made durable). Nothing is injected unless
//! the variable is set; the wrapper is not installed at all then.

use super::secret_value::SecretValue;
use super::{Expect, LiveResource, Provider, ProviderError, Result, Session, TenantScope};
use crate::model::{Address, ProviderId, Resource};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Fail,
    Lost,
    Kill,
    KillBefore,
    Delay(std::time::Duration),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    op: String,
    /// `None`: every call.
    nth: Option<usize>,
    mode: Mode,
}

pub struct Faulty {
    inner: Arc<dyn Provider>,
    rules: Vec<Rule>,
    puts: AtomicUsize,
    deletes: AtomicUsize,
    lists: AtomicUsize,
    fetches: AtomicUsize,
    flushes: AtomicUsize,
}

/// Parses the rules of `spec` that concern `provider`.
fn rules_for(spec: &str, provider: ProviderId) -> Vec<Rule> {
    spec.split(',')
        .filter_map(|r| {
            let mut parts = r.trim().split(':');
            let (p, op, n) = (parts.next()?, parts.next()?, parts.next()?);
            let mode = parse_mode(parts.next())?;
            (p == provider.as_str() || p == "*").then(|| Rule { op: op.to_owned(), nth: n.parse().ok(), mode })
        })
        .collect()
}

fn parse_mode(m: Option<&str>) -> Option<Mode> {
    match m {
        None | Some("fail") => Some(Mode::Fail),
        Some("lost") => Some(Mode::Lost),
        Some("kill") => Some(Mode::Kill),
        Some("kill-before") => Some(Mode::KillBefore),
        Some(d) => d.strip_prefix("delay=").and_then(crate::load::settings::parse_duration).map(Mode::Delay),
    }
}

/// A rule that is not `provider:op:n[:mode]` with a known mode.
fn malformed(spec: &str) -> Option<&str> {
    spec.split(',').map(str::trim).find(|r| {
        let parts: Vec<&str> = r.split(':').collect();
        !(3..=4).contains(&parts.len()) || parse_mode(parts.get(3).copied()).is_none()
    })
}

/// Wraps `inner` if `DOTMAC_FAULTS` names faults for it.
pub fn wrap(inner: Arc<dyn Provider>) -> Arc<dyn Provider> {
    let Ok(spec) = std::env::var("DOTMAC_FAULTS") else { return inner };
    if let Some(bad) = malformed(&spec) {
        // A test facility: a typo must not quietly inject nothing.
        eprintln!("error: DOTMAC_FAULTS: `{bad}` is not provider:op:n[:fail|lost|kill|kill-before|delay=DUR]");
        std::process::exit(1);
    }
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
        flushes: AtomicUsize::new(0),
    })
}

/// Ends the process as `kill -9` would: no destructors, no flushing, nothing written after.
fn die() -> ! {
    // SAFETY: sending a signal to our own process.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}

impl Faulty {
    /// Counts a call and runs it (`call`) as the rules say: untouched, failed before or after
    /// reaching the system, or with the process killed before or after it.
    fn call<T>(&self, op: &str, counter: &AtomicUsize, what: &str, call: impl FnOnce() -> Result<T>) -> Result<T> {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        let hits = || self.rules.iter().filter(|r| r.op == op && r.nth.is_none_or(|k| k == n));
        if let Some(d) = hits()
            .filter_map(|r| match r.mode {
                Mode::Delay(d) => Some(d),
                _ => None,
            })
            .max()
        {
            std::thread::sleep(d);
        }
        let Some(rule) = hits().find(|r| !matches!(r.mode, Mode::Delay(_))) else {
            return call();
        };
        let error = || ProviderError::Unavailable(format!("injected fault: {} {op} #{n} ({what})", self.inner.id()));
        match rule.mode {
            Mode::Fail => Err(error()),
            Mode::KillBefore => die(),
            Mode::Lost => call().and(Err(error())),
            Mode::Kill => {
                let _ = call();
                // Done means in the system: a store that holds writes until `flush` (the
                // local store) writes them out first. Without that, no crash could come
                // after a local write and before its record, the case the journal is for.
                if op != "flush" {
                    let _ = self.inner.flush();
                }
                die()
            }
            Mode::Delay(_) => call(),
        }
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
        self.call("list", &self.lists, "all", || self.inner.list(scope))
    }
    fn fetch(&self, addresses: &[Address]) -> Result<Vec<LiveResource>> {
        self.call("fetch", &self.fetches, "batch", || self.inner.fetch(addresses))
    }
    fn fingerprints(&self, addresses: &[&Address]) -> Result<Vec<Option<crate::fingerprint::Fingerprint>>> {
        // A read back is a fetch for the fault rules.
        self.call("fetch", &self.fetches, "batch", || self.inner.fingerprints(addresses))
    }
    fn put(&self, r: &Resource, secret: Option<&SecretValue>, expect: &Expect) -> Result<LiveResource> {
        self.call("put", &self.puts, &r.address.to_string(), || self.inner.put(r, secret, expect))
    }
    fn delete(&self, a: &Address, expect: &Expect, destroy: bool) -> Result<()> {
        self.call("delete", &self.deletes, &a.to_string(), || self.inner.delete(a, expect, destroy))
    }
    fn deletes_with_tenant(&self) -> bool {
        self.inner.deletes_with_tenant()
    }
    fn close(&self) {
        self.inner.close()
    }
    fn durable_on_flush(&self) -> bool {
        // `kill` flushes the store right after a write, which is then durable at once.
        self.inner.durable_on_flush() && !self.rules.iter().any(|r| r.mode == Mode::Kill)
    }
    fn discard(&self) {
        self.inner.discard()
    }
    fn flush(&self) -> Result<()> {
        self.call("flush", &self.flushes, "all", || self.inner.flush())
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
            vec![Rule { op: "put".into(), nth: Some(3), mode: Mode::Fail }]
        );
        assert_eq!(
            rules_for("isp:put:3,management:delete:*:lost", ProviderId::Management),
            vec![Rule { op: "delete".into(), nth: None, mode: Mode::Lost }]
        );
        assert_eq!(
            rules_for("*:put:2:kill,isp:put:1:kill-before", ProviderId::Isp),
            vec![
                Rule { op: "put".into(), nth: Some(2), mode: Mode::Kill },
                Rule { op: "put".into(), nth: Some(1), mode: Mode::KillBefore }
            ]
        );
        assert_eq!(
            rules_for("isp:put:*:delay=500ms", ProviderId::Isp),
            vec![Rule { op: "put".into(), nth: None, mode: Mode::Delay(std::time::Duration::from_millis(500)) }]
        );
        assert!(rules_for("isp:put:*:250ms", ProviderId::Isp).is_empty(), "a fourth part is delay=<duration>");
        assert!(rules_for("isp:put:3", ProviderId::Secrets).is_empty());
        assert_eq!(malformed("isp:put:3, isp:put:3:sometimes"), Some("isp:put:3:sometimes"));
        assert_eq!(malformed("isp:put"), Some("isp:put"));
        assert_eq!(malformed("isp:put:3,*:delete:*:lost"), None);
    }
}
