//! `dotmac-gitops daemon`: keeps live state equal to a git branch, continuously.
//!
//! ```text
//! source (branch tip) ──tips──▶ reconcile::Controller ──batches──▶ blocking pool:
//!   local: notify + interval        │  per-tenant schedule,             Workspace::plan,
//!   remote: git fetch + webhook     │  backoff, self-heal limit         state lock + apply
//!                                   ├──▶ status::Shared ◀── http (axum): status, tenants, audit,
//!                                   │                        dashboard (HTML pages)
//!                                   ├──▶ metrics (prometheus-client) ◀── http /metrics
//!                                   └──▶ notifications (webhooks: HMAC, retries, breaker)
//! leader: a Kubernetes Lease or the state store's leader lock gates the controller.
//! ```
//!
//! One tokio runtime runs the HTTP server, the source, the controller, leader election and
//! notifications; everything that touches the engine (which is synchronous, and whose
//! providers may block on runtimes of their own) runs on the blocking pool.

pub mod dashboard;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod notifications;
pub mod reconcile;
pub mod source;
pub mod status;

use anyhow::{Context, Result};
use leader::Election;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, watch};

/// What the command line asks of the daemon.
#[derive(Debug, Clone)]
pub struct Options {
    /// A local work tree, or a URL (or bare repository) to clone.
    pub repo: String,
    pub branch: Option<String>,
    pub interval: Option<Duration>,
    pub listen: SocketAddr,
    pub auto_apply: bool,
    pub allow_delete: bool,
    pub concurrency: Option<usize>,
    pub cache_dir: Option<PathBuf>,
    pub election: Election,
    pub lease_name: String,
    pub lease_namespace: Option<String>,
    pub lease_duration: Duration,
    pub shutdown_timeout: Duration,
    pub actor: String,
    /// The token the HTTP endpoints ask for (`--auth-token-env`), if any.
    pub auth: Option<http::Auth>,
}

/// Runs the daemon until SIGTERM or SIGINT; the exit code.
pub fn run(opts: Options) -> Result<u8> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("dotmac-daemon")
        .enable_all()
        .build()
        .context("starting the daemon's runtime")?;
    let code = rt.block_on(serve(opts));
    rt.shutdown_timeout(Duration::from_secs(2));
    code
}

/// Turns SIGTERM and SIGINT into `shutdown`; a second signal ends the process at once.
fn on_signals(shutdown: watch::Sender<bool>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! { _ = term.recv() => "SIGTERM", _ = int.recv() => "SIGINT" };
        tracing::info!(signal = name, "shutting down");
        let _ = shutdown.send(true);
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::error!("second signal: exiting at once");
        std::process::exit(130);
    });
    Ok(())
}

/// Held while this replica leads.
enum Leadership {
    Alone,
    StateLock(#[allow(dead_code)] Box<dyn crate::state::StateLock>),
    Lease(tokio::task::JoinHandle<()>, Arc<tokio::sync::Mutex<leader::LeaseElector>>),
}

/// Waits to lead (or for shutdown: `None`). `lost` turns true if a held Lease is lost.
async fn lead(
    opts: &Options,
    src: &source::Source,
    shared: &status::Handle,
    mut shutdown: watch::Receiver<bool>,
    lost: watch::Sender<bool>,
) -> Result<Option<Leadership>> {
    let me = leader::identity();
    let standby = |who: String| {
        let mut s = shared.write();
        if s.leader.as_deref() != Some(who.as_str()) {
            tracing::info!(leader = %who, "standing by: another replica leads");
        }
        s.leader = Some(who);
    };
    match opts.election.resolve() {
        Election::None | Election::Auto => Ok(Some(Leadership::Alone)),
        Election::State => {
            let head = src.head().await?;
            let root = src.root.clone();
            let store = tokio::task::spawn_blocking(move || -> Result<Box<dyn crate::state::StateStore>> {
                let (settings, dir) = crate::engine::settings_at(&root, Some(&head))?;
                crate::engine::open_state(&settings, &dir)
            })
            .await??;
            let store: Arc<dyn crate::state::StateStore> = Arc::from(store);
            let holder = crate::state::lock::holder_description("daemon");
            loop {
                let (s, h) = (store.clone(), holder.clone());
                let r = tokio::task::spawn_blocking(move || s.leader_lock(&h, Duration::from_secs(2))).await?;
                match r {
                    Ok(guard) => {
                        tracing::info!("leading (the state store's leader lock)");
                        return Ok(Some(Leadership::StateLock(guard)));
                    }
                    Err(e) if format!("{e}").contains("another daemon leads") => {
                        let msg = format!("{e}");
                        let who = msg.split_once(": ").map(|(_, w)| w).unwrap_or(&msg);
                        standby(who.split(" (waited").next().unwrap_or(who).to_owned());
                    }
                    Err(e) => return Err(e),
                }
                if *shutdown.borrow() {
                    return Ok(None);
                }
            }
        }
        Election::Lease => {
            let ns = leader::namespace(opts.lease_namespace.as_deref());
            let mut el = leader::LeaseElector::connect(&ns, &opts.lease_name, me, opts.lease_duration).await?;
            let retry = (opts.lease_duration / 5).max(Duration::from_millis(500));
            loop {
                match el.try_acquire().await {
                    Ok(None) => break,
                    Ok(Some(who)) => standby(who),
                    Err(e) => tracing::warn!("leader election: {e:#}"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = shutdown.changed() => {}
                }
                if *shutdown.borrow() {
                    return Ok(None);
                }
            }
            tracing::info!(lease = %opts.lease_name, namespace = %ns, identity = %el.me, "leading (Kubernetes Lease)");
            let el = Arc::new(tokio::sync::Mutex::new(el));
            let renew_every = opts.lease_duration / 3;
            let deadline = opts.lease_duration * 2 / 3;
            let renewer = el.clone();
            let task = tokio::spawn(async move {
                let mut last_ok = Instant::now();
                loop {
                    tokio::time::sleep(renew_every).await;
                    let r = renewer.lock().await.try_acquire().await;
                    match r {
                        Ok(None) => last_ok = Instant::now(),
                        Ok(Some(who)) => {
                            tracing::error!(leader = %who, "lost the leader Lease");
                            let _ = lost.send(true);
                            return;
                        }
                        Err(e) => {
                            tracing::warn!("renewing the leader Lease: {e:#}");
                            if last_ok.elapsed() >= deadline {
                                tracing::error!("could not renew the leader Lease in time: no longer leading");
                                let _ = lost.send(true);
                                return;
                            }
                        }
                    }
                }
            });
            Ok(Some(Leadership::Lease(task, el)))
        }
    }
}

async fn serve(opts: Options) -> Result<u8> {
    let metrics = Arc::new(metrics::Metrics::new());
    let src = Arc::new(source::Source::open(&opts.repo, opts.branch.as_deref(), opts.cache_dir.as_deref()).await?);
    let shared = status::Handle::new(
        opts.auto_apply,
        status::SourceStatus { repo: src.describe(), branch: src.branch.clone(), ..Default::default() },
    );
    let (shutdown_tx, shutdown) = watch::channel(false);
    on_signals(shutdown_tx.clone())?;
    let wake = Arc::new(Notify::new());
    let (commands_tx, commands) = mpsc::channel(1024);
    let audit = http::AuditSlot::default();
    let webhook_secret = std::env::var("DOTMAC_WEBHOOK_SECRET")
        .ok()
        .filter(|s| !s.is_empty())
        .map(|s| Arc::new(crate::providers::secret_value::SecretValue::from_bytes(s.into_bytes())));
    if webhook_secret.is_none() {
        tracing::info!("POST /api/v1/webhook/git is open: set DOTMAC_WEBHOOK_SECRET to require a signature");
    }
    let app = http::App {
        shared: shared.clone(),
        metrics: metrics.clone(),
        wake: wake.clone(),
        commands: commands_tx,
        webhook_secret,
        audit: audit.clone(),
        auth: opts.auth.clone(),
        loopback: opts.listen.ip().is_loopback(),
    };
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", opts.listen))?;
    if opts.auth.is_none() && !opts.listen.ip().is_loopback() {
        tracing::warn!(listen = %opts.listen,
            "the dashboard and the API are open to anyone who reaches this address: set --auth-token-env to require a token");
    }
    tracing::info!(listen = %listener.local_addr()?, repo = %src.describe(), branch = %src.branch,
        auto_apply = opts.auto_apply, "daemon started");
    let mut http_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        let r = axum::serve(listener, http::router(app))
            .with_graceful_shutdown(async move {
                let _ = http_shutdown.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!("the HTTP server stopped: {e}");
        }
    });

    let (lost_tx, lost) = watch::channel(false);
    let leadership = match lead(&opts, &src, &shared, shutdown.clone(), lost_tx).await? {
        Some(l) => l,
        None => {
            let _ = server.await;
            return Ok(0);
        }
    };
    {
        let mut s = shared.write();
        s.role = status::Role::Leader;
        s.leader = Some(leader::identity());
    }
    metrics.leader.set(1);
    // Leadership lost: stop reconciling (and exit non-zero, to be restarted as a candidate).
    let stop = shutdown_tx.clone();
    let mut lost_watch = lost.clone();
    tokio::spawn(async move {
        if lost_watch.wait_for(|l| *l).await.is_ok() {
            let _ = stop.send(true);
        }
    });

    let (tips_tx, tips) = watch::channel(None);
    let _watcher = src.watch(wake.clone())?;
    let interval = opts.interval.unwrap_or(Duration::from_secs(60));
    let follower = tokio::spawn(source::follow(
        src.clone(),
        interval,
        wake,
        tips_tx,
        shared.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let cfg = reconcile::Config {
        auto_apply: opts.auto_apply,
        allow_delete: opts.allow_delete,
        interval: opts.interval,
        concurrency: opts.concurrency,
        actor: opts.actor.clone(),
    };
    let controller = reconcile::Controller::new(
        cfg,
        shared.clone(),
        metrics.clone(),
        src.root.clone(),
        commands,
        opts.shutdown_timeout,
        audit.clone(),
    );
    let clean = controller.run(tips, shutdown.clone()).await;
    let _ = follower.await;
    if let Some(b) = audit.set(None) {
        let _ = tokio::task::spawn_blocking(move || drop(b)).await;
    }
    metrics.leader.set(0);
    let lost_lead = *lost.borrow();
    match leadership {
        Leadership::Alone | Leadership::StateLock(_) => {}
        Leadership::Lease(task, el) => {
            task.abort();
            if !lost_lead && let Err(e) = el.lock().await.release().await {
                tracing::warn!("releasing the leader Lease: {e:#}");
            }
        }
    }
    let _ = server.await;
    tracing::info!(clean, "stopped");
    Ok(if clean && !lost_lead { 0 } else { 1 })
}
