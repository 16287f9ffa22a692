//! Leader election: when several daemon replicas run, exactly one reconciles.
//!
//! - **In a Kubernetes cluster, a Lease** (`coordination.k8s.io/v1`), as client-go's leader
//!   election does it: the holder renews `renewTime` every third of the lease duration; a
//!   candidate takes the lease over when its record (holder, renew time, resource version)
//!   has not changed for a whole lease duration *by the candidate's own clock* (so clock
//!   skew between nodes does not matter); every write is a replace carrying the
//!   `resourceVersion` read, so two candidates cannot both win (the loser gets a 409). A
//!   leader that cannot renew for two thirds of the duration stops leading; the daemon then
//!   exits (non-zero) and Kubernetes restarts it as a candidate. On a clean shutdown the
//!   leader empties `holderIdentity`, so another replica takes over at once.
//! - **Elsewhere, the state store's leader lock** (`StateStore::leader_lock`: for the local
//!   store, a file lock beside the state lock, released by the kernel when the holder dies).
//!   It is a separate lock from the state lock, which the leader takes only around applies.

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use std::time::{Duration, Instant};

/// How replicas agree on a leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Election {
    /// A Lease in a cluster (the service account's environment is present), the state
    /// store's leader lock elsewhere.
    Auto,
    /// A Kubernetes Lease.
    Lease,
    /// The state store's leader lock.
    State,
    /// No election: only ever run one replica.
    None,
}

impl Election {
    /// What `Auto` means here.
    pub fn resolve(self) -> Election {
        match self {
            Election::Auto if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => Election::Lease,
            Election::Auto => Election::State,
            other => other,
        }
    }
}

/// This replica's name in the election: `$POD_NAME` (the downward API), else the host
/// name, with the process id.
pub fn identity() -> String {
    let host = std::env::var("POD_NAME").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "localhost".into())
    });
    format!("{host}_{}", std::process::id())
}

/// The namespace for the Lease: the flag, `$POD_NAMESPACE`, the service account's, else `default`.
pub fn namespace(flag: Option<&str>) -> String {
    flag.map(str::to_owned)
        .or_else(|| std::env::var("POD_NAMESPACE").ok().filter(|s| !s.is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "default".into())
}

/// What a candidate last saw of the lease, and when (by its own clock).
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    holder: Option<String>,
    renew: Option<String>,
    version: Option<String>,
}

/// The decision for one look at the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Someone else holds it and renewed it recently enough.
    Held(String),
    /// Ours to take (free, expired, or already ours).
    Take,
}

/// Pure: whether `me` may take a lease held by `holder`, unchanged since `unchanged_for`.
pub fn judge(me: &str, holder: Option<&str>, unchanged_for: Duration, lease: Duration) -> Verdict {
    match holder {
        Some(h) if !h.is_empty() && h != me && unchanged_for < lease => Verdict::Held(h.to_owned()),
        _ => Verdict::Take,
    }
}

/// A Lease-based elector.
pub struct LeaseElector {
    api: Api<Lease>,
    name: String,
    pub me: String,
    duration: Duration,
    seen: Option<(Seen, Instant)>,
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

impl LeaseElector {
    pub async fn connect(namespace: &str, name: &str, me: String, duration: Duration) -> Result<LeaseElector> {
        let client = kube::Client::try_default()
            .await
            .context("leader election needs the Kubernetes API (in-cluster, or $KUBECONFIG)")?;
        Ok(LeaseElector { api: Api::namespaced(client, namespace), name: name.to_owned(), me, duration, seen: None })
    }

    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// One round: takes or renews the lease. `Ok(None)`: we hold it; `Ok(Some(holder))`:
    /// someone else does.
    pub async fn try_acquire(&mut self) -> Result<Option<String>> {
        let secs = i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let current = self.api.get_opt(&self.name).await.context("reading the leader Lease")?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.me.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now_micro()),
                    renew_time: Some(now_micro()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(None),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Some("(another replica, just now)".into())),
                Err(e) => Err(e).context("creating the leader Lease"),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let seen = Seen {
            holder: spec.holder_identity.clone(),
            renew: spec.renew_time.as_ref().map(|t| t.0.to_string()),
            version: lease.metadata.resource_version.clone(),
        };
        let since = match &self.seen {
            Some((s, at)) if *s == seen => *at,
            _ => Instant::now(),
        };
        self.seen = Some((seen, since));
        let their = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(secs).max(1) as u64);
        if let Verdict::Held(h) = judge(&self.me, spec.holder_identity.as_deref(), since.elapsed(), their) {
            return Ok(Some(h));
        }
        let ours = spec.holder_identity.as_deref() == Some(self.me.as_str());
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.me.clone()),
            lease_duration_seconds: Some(secs),
            acquire_time: if ours { spec.acquire_time.clone() } else { Some(now_micro()) },
            renew_time: Some(now_micro()),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!ours)),
            ..spec
        });
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(l) => {
                self.seen = None;
                if !ours {
                    tracing::info!(lease = %self.name, "took over the leader Lease");
                }
                let _ = l;
                Ok(None)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Some("(another replica, just now)".into())),
            Err(e) => Err(e).context("updating the leader Lease"),
        }
    }

    /// Gives the lease up (on shutdown), so that another replica takes over at once.
    pub async fn release(&mut self) -> Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else { return Ok(()) };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.me.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now_micro());
        lease.spec = Some(spec);
        self.api.replace(&self.name, &PostParams::default(), &lease).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_taken_only_when_free_ours_or_stale() {
        let lease = Duration::from_secs(15);
        assert_eq!(judge("a", None, Duration::ZERO, lease), Verdict::Take);
        assert_eq!(judge("a", Some(""), Duration::ZERO, lease), Verdict::Take);
        assert_eq!(judge("a", Some("a"), Duration::ZERO, lease), Verdict::Take);
        assert_eq!(judge("a", Some("b"), Duration::from_secs(14), lease), Verdict::Held("b".into()));
        assert_eq!(judge("a", Some("b"), Duration::from_secs(15), lease), Verdict::Take);
    }

    #[test]
    fn auto_means_lease_only_in_a_cluster() {
        assert_eq!(Election::State.resolve(), Election::State);
        assert_eq!(Election::None.resolve(), Election::None);
    }
}
