//! Where the daemon reads the desired state: the tip of one branch, as a commit id. The
//! reconciler reads that commit's blobs (`Workspace::open` with a revision), never a work
//! tree, so uncommitted edits are not applied.
//!
//! - A **local repository** (`--repo PATH`, a work tree): its refs are watched with `notify`
//!   (`refs/` and `packed-refs` of the git folder, debounced), and read again every interval
//!   in case an event was missed.
//! - A **remote repository** (`--repo URL`, or the path of a bare repository): cloned once
//!   into a cache folder (shallow, no checkout) and fetched every interval, or at once on
//!   `POST /api/v1/webhook/git`. Fetching goes through the `git` command line, not git2: our
//!   git2 is built without its https and ssh transports (they need OpenSSL and libssh2, and
//!   minutes of build), while `git` has both and is in every image. Credentials come from
//!   the environment: `DOTMAC_GIT_TOKEN` (https; sent as a Basic authorization header with
//!   the user `DOTMAC_GIT_USERNAME`, default `x-access-token`, through `GIT_CONFIG_*`
//!   variables, never on the command line or in `.git/config`) or `DOTMAC_GIT_SSH_KEY_FILE`
//!   (ssh, with `DOTMAC_GIT_KNOWN_HOSTS` for the host keys; without it, a host's key is
//!   trusted the first time it is seen). Credentials in a URL are removed from everything the
//!   daemon prints.

use super::metrics::Metrics;
use super::status::Handle;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// How long one `git clone` or `git fetch` may take.
const GIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Events closer together than this are read as one.
const DEBOUNCE: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
enum Kind {
    Local,
    Remote { url: String },
}

/// A branch of a repository, local or remote.
#[derive(Debug, Clone)]
pub struct Source {
    kind: Kind,
    pub branch: String,
    /// The folder `Workspace::open` reads commits from: the local work tree (or the folder
    /// of the repository inside it), or the cache clone.
    pub root: PathBuf,
}

/// `url` without any `user:password@` part.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match authority.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://(credentials)@{host}{path}"),
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    }
}

/// Credentials for `git` from the environment, as variables for the child process.
fn git_env() -> Vec<(String, String)> {
    use base64::Engine;
    let mut env = vec![("GIT_TERMINAL_PROMPT".to_owned(), "0".to_owned()), ("LC_ALL".to_owned(), "C".to_owned())];
    if let Ok(token) = std::env::var("DOTMAC_GIT_TOKEN")
        && !token.trim().is_empty()
    {
        let user = std::env::var("DOTMAC_GIT_USERNAME").unwrap_or_else(|_| "x-access-token".into());
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", token.trim()));
        env.push(("GIT_CONFIG_COUNT".into(), "1".into()));
        env.push(("GIT_CONFIG_KEY_0".into(), "http.extraHeader".into()));
        env.push(("GIT_CONFIG_VALUE_0".into(), format!("Authorization: Basic {basic}")));
    }
    if let Ok(key) = std::env::var("DOTMAC_GIT_SSH_KEY_FILE")
        && !key.is_empty()
    {
        let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
        let hosts = match std::env::var("DOTMAC_GIT_KNOWN_HOSTS") {
            Ok(kh) if !kh.is_empty() => format!("-o UserKnownHostsFile={} -o StrictHostKeyChecking=yes", quote(&kh)),
            _ => "-o StrictHostKeyChecking=accept-new".to_owned(),
        };
        env.push((
            "GIT_SSH_COMMAND".into(),
            format!("ssh -i {} -o IdentitiesOnly=yes -o BatchMode=yes {hosts}", quote(&key)),
        ));
    }
    env
}

/// `text` without the credentials `git_env` hands to git.
fn scrub(text: &str, url: &str) -> String {
    let mut out = text.replace(url, &redact_url(url));
    for (k, v) in git_env() {
        if k == "GIT_CONFIG_VALUE_0" {
            out = out.replace(&v, "(credentials)");
        }
    }
    if let Ok(token) = std::env::var("DOTMAC_GIT_TOKEN")
        && !token.trim().is_empty()
    {
        out = out.replace(token.trim(), "(token)");
    }
    out
}

/// Runs `git` with the credentials of the environment; its error output is scrubbed.
async fn git(args: &[&str], cwd: Option<&Path>, url: &str) -> Result<String> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.args(args).kill_on_drop(true).stdin(std::process::Stdio::null());
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    for (k, v) in git_env() {
        cmd.env(k, v);
    }
    let what = format!("git {}", scrub(&args.join(" "), url));
    let out = tokio::time::timeout(GIT_TIMEOUT, cmd.output())
        .await
        .map_err(|_| anyhow::anyhow!("`{what}` took more than {}s", GIT_TIMEOUT.as_secs()))?
        .with_context(|| format!("cannot run `git` (is it installed?) for `{what}`"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("`{what}` failed: {}", scrub(err.trim(), url));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn default_cache() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("dotmac-gitops");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".cache/dotmac-gitops");
    }
    std::env::temp_dir().join("dotmac-gitops-cache")
}

fn is_bare(path: &Path) -> bool {
    git2::Repository::open_bare(path).is_ok_and(|r| r.is_bare())
}

/// The commit `reference` points at, in the git repository of `root`.
fn resolve(root: &Path, reference: &str) -> Result<String> {
    let (repo, _) = crate::load::source::open_git(root).map_err(anyhow::Error::msg)?;
    let r = repo.find_reference(reference).map_err(|e| anyhow::anyhow!("no {reference}: {}", e.message()))?;
    let c = r.peel_to_commit().map_err(|e| anyhow::anyhow!("{reference} is not a commit: {}", e.message()))?;
    Ok(c.id().to_string())
}

impl Source {
    /// Opens `repo`: a local work tree, or a URL (or bare repository) to clone into the cache.
    pub async fn open(repo: &str, branch: Option<&str>, cache: Option<&Path>) -> Result<Source> {
        let path = Path::new(repo);
        let remote = repo.contains("://")
            || (path.exists() && is_bare(path))
            || (!path.exists() && repo.contains('@') && repo.contains(':'));
        if !remote {
            if !path.is_dir() {
                bail!("--repo {repo}: no such folder (a local repository, or a URL to clone)");
            }
            // The folder holding dotmac.toml, searched upwards as every command does.
            let root = crate::load::find_root(Some(path)).unwrap_or(path.canonicalize()?);
            let (repo_, _) = crate::load::source::open_git(&root)
                .map_err(|e| anyhow::anyhow!("--repo {}: {e}; the daemon follows a git branch", root.display()))?;
            let branch = match branch {
                Some(b) => b.to_owned(),
                None => match repo_.head() {
                    Ok(h) if h.is_branch() => h.shorthand().unwrap_or("main").to_owned(),
                    _ => bail!("{}: HEAD is not on a branch; pass --branch", root.display()),
                },
            };
            let s = Source { kind: Kind::Local, branch, root };
            s.local_head()?;
            return Ok(s);
        }
        let url = if path.exists() { path.canonicalize()?.display().to_string() } else { repo.to_owned() };
        let dir = {
            use sha2::{Digest, Sha256};
            let h = Sha256::digest(url.as_bytes());
            cache.map(Path::to_path_buf).unwrap_or_else(default_cache).join(&crate::providers::local::hex(&h)[..16])
        };
        if dir.join(".git").is_dir() {
            let origin = git(&["config", "--get", "remote.origin.url"], Some(&dir), &url).await.unwrap_or_default();
            if origin != url {
                bail!(
                    "the cache folder {} holds a clone of another repository ({}); remove it or pass --cache-dir",
                    dir.display(),
                    redact_url(&origin)
                );
            }
        } else {
            if let Some(parent) = dir.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
            }
            let _ = std::fs::remove_dir_all(&dir);
            let target = dir.display().to_string();
            let mut args = vec!["clone", "--quiet", "--no-checkout", "--depth", "1", "--single-branch"];
            if let Some(b) = branch {
                args.extend(["--branch", b]);
            }
            args.extend(["--", &url, &target]);
            tracing::info!(repo = %redact_url(&url), into = %dir.display(), "cloning");
            git(&args, None, &url).await?;
        }
        let branch = match branch {
            Some(b) => b.to_owned(),
            None => git(&["symbolic-ref", "--short", "HEAD"], Some(&dir), &url).await?,
        };
        Ok(Source { kind: Kind::Remote { url }, branch, root: dir })
    }

    /// The repository for people: the path, or the URL without credentials.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Local => self.root.display().to_string(),
            Kind::Remote { url } => redact_url(url),
        }
    }

    pub fn is_remote(&self) -> bool {
        matches!(self.kind, Kind::Remote { .. })
    }

    fn local_head(&self) -> Result<String> {
        resolve(&self.root, &format!("refs/heads/{}", self.branch))
            .with_context(|| format!("branch {} of {}", self.branch, self.root.display()))
    }

    /// The branch tip now: fetched first for a remote repository.
    pub async fn head(&self) -> Result<String> {
        match &self.kind {
            Kind::Local => {
                let s = self.clone();
                tokio::task::spawn_blocking(move || s.local_head()).await?
            }
            Kind::Remote { url } => {
                let refspec = format!("+refs/heads/{0}:refs/remotes/origin/{0}", self.branch);
                git(&["fetch", "--quiet", "--prune", "--depth", "1", "origin", &refspec], Some(&self.root), url)
                    .await?;
                let root = self.root.clone();
                let reference = format!("refs/remotes/origin/{}", self.branch);
                tokio::task::spawn_blocking(move || resolve(&root, &reference)).await?
            }
        }
    }

    /// For a local repository: a watcher that wakes `wake` when the git folder's refs move.
    pub fn watch(&self, wake: Arc<Notify>) -> Result<Option<notify::RecommendedWatcher>> {
        use notify::{EventKind, RecursiveMode, Watcher};
        if self.is_remote() {
            return Ok(None);
        }
        let (repo, _) = crate::load::source::open_git(&self.root).map_err(anyhow::Error::msg)?;
        let common = repo.commondir().to_path_buf();
        let refs = common.join("refs");
        let mut w = notify::recommended_watcher(move |r: notify::Result<notify::Event>| {
            let Ok(ev) = r else { return };
            // Linux reports opening and reading files too; only changes matter.
            if matches!(ev.kind, EventKind::Access(_)) {
                return;
            }
            let relevant = ev
                .paths
                .iter()
                .any(|p| p.starts_with(&refs) || p.file_name().is_some_and(|n| n == "packed-refs" || n == "HEAD"));
            if relevant {
                wake.notify_one();
            }
        })?;
        w.watch(&common.join("refs"), RecursiveMode::Recursive)?;
        w.watch(&common, RecursiveMode::NonRecursive)?;
        Ok(Some(w))
    }
}

/// Follows the branch until shutdown: reads its tip on start, every `interval` (with a
/// tenth of jitter), and whenever `wake` fires (a ref event or the git webhook), publishing
/// each tip on `tips`.
pub async fn follow(
    source: Arc<Source>,
    interval: Duration,
    wake: Arc<Notify>,
    tips: watch::Sender<Option<String>>,
    shared: Handle,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let r = source.head().await;
        let now = jiff::Timestamp::now();
        match r {
            Ok(commit) => {
                metrics.source_fetches.get_or_create(&vec![("result", "ok")]).inc();
                {
                    let mut s = shared.write();
                    s.source.head = Some(commit.clone());
                    s.source.last_fetch = Some(now);
                    s.source.last_error = None;
                }
                tips.send_if_modified(|t| {
                    if t.as_deref() == Some(commit.as_str()) {
                        return false;
                    }
                    tracing::info!(branch = %source.branch, commit = %commit, "new branch tip");
                    *t = Some(commit.clone());
                    true
                });
            }
            Err(e) => {
                metrics.source_fetches.get_or_create(&vec![("result", "error")]).inc();
                let msg = format!("{e:#}");
                tracing::warn!(repo = %source.describe(), "cannot read the branch tip: {msg}");
                let mut s = shared.write();
                s.source.last_fetch = Some(now);
                s.source.last_error = Some(msg);
            }
        }
        let wait = interval.mul_f64(0.9 + 0.2 * super::reconcile::random_unit());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = wake.notified() => tokio::time::sleep(DEBOUNCE).await,
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_urls_are_removed() {
        assert_eq!(
            redact_url("https://bot:s3cr3t@git.example.net/org/repo.git"),
            "https://(credentials)@git.example.net/org/repo.git"
        );
        assert_eq!(redact_url("https://git.example.net/org/repo.git"), "https://git.example.net/org/repo.git");
        assert_eq!(redact_url("git@github.com:org/repo.git"), "git@github.com:org/repo.git");
        assert_eq!(redact_url("file:///srv/repo.git"), "file:///srv/repo.git");
    }
}
