//! The engine's edges, put together: where the state lives, which providers and store a
//! repository uses, reading live state from all providers at once, and making a plan. The
//! CLI and the daemon both go through here.

use crate::cache::{CachedTenant, RenderCache, UnitEntry};
use crate::diag::Diagnostic;
use crate::diff::{self, Action};
use crate::load::settings::Settings;
use crate::load::source::{FileStat, RawFile, Scope, tenant_unit};
use crate::load::{self, Loaded};
use crate::model::{Address, Content, Coordination, DesiredEntry, ProviderId};
use crate::plan::{self, Plan};
use crate::providers::{LiveResource, ProviderError, Providers, Session, TenantScope};
use crate::render::Renderer;
use crate::state::{StateStore, postgres::PgStore, sqlite::SqliteStore};
use crate::validate;
use anyhow::{Context, Result};
use jiff::Timestamp;
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where live stores and the state live: `$DOTMAC_STATE_DIR`, else `[state] dir`, else
/// `.dotmac/` in the repository root.
pub fn state_dir(root: &Path, settings: &Settings) -> PathBuf {
    if let Some(d) = std::env::var_os("DOTMAC_STATE_DIR") {
        return PathBuf::from(d);
    }
    let dir = settings.state.dir.as_deref().unwrap_or(".dotmac");
    root.join(dir)
}

/// The state store `[state] backend` names: `local` (SQLite under `state_dir`) or `postgres`
/// (the URL in `url`, or in the variable `url_env` names).
pub fn open_state(settings: &Settings, state_dir: &Path) -> Result<Box<dyn StateStore>> {
    if let Some(dir) = local_state(settings, state_dir) {
        return Ok(Box::new(SqliteStore::open(&dir)?));
    }
    match settings.state.backend.as_str() {
        "postgres" => Ok(Box::new(PgStore::open(&crate::state::postgres::url_from_settings(&settings.state)?)?)),
        other => anyhow::bail!("[state] backend = \"{other}\" is not known; use \"local\" or \"postgres\""),
    }
}

/// The folder of the local (SQLite) state store, when the settings choose that backend.
pub fn local_state(settings: &Settings, state_dir: &Path) -> Option<PathBuf> {
    (settings.state.backend == "local").then(|| state_dir.join("state"))
}

/// Providers whose resources are not managed (`kind = "none"`).
pub fn disabled(settings: &Settings) -> Vec<ProviderId> {
    let mut v = Vec::new();
    if settings.providers.kubernetes.kind == "none" {
        v.push(ProviderId::Kubernetes);
    }
    v
}

/// Live state as read: the resources, and the tenants some provider could not read (a dead
/// target), with why. Those tenants are reported and left out; the others go on.
#[derive(Debug, Default)]
pub struct Live {
    /// One list per provider, as each returned it: joining them would copy a million
    /// resources into fresh memory for nothing.
    pub resources: Vec<Vec<LiveResource>>,
    pub unreadable: BTreeMap<String, String>,
}

impl Live {
    pub fn len(&self) -> usize {
        self.resources.iter().map(Vec::len).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads every provider's live resources for the scope, the providers in parallel.
pub fn read_live(providers: &Providers, scope: &TenantScope, skip: &[ProviderId]) -> Result<Live> {
    let results: Vec<(ProviderId, crate::providers::Result<Vec<LiveResource>>)> = std::thread::scope(|s| {
        let handles: Vec<_> = ProviderId::ALL
            .iter()
            .filter(|p| !skip.contains(p))
            .map(|&p| (p, s.spawn(move || providers.get(p).list(scope))))
            .collect();
        handles.into_iter().map(|(p, h)| (p, h.join().unwrap_or_else(|_| Ok(Vec::new())))).collect()
    });
    let mut out = Live::default();
    for (p, r) in results {
        let r = match r {
            Err(ProviderError::Partial { found, failed }) => {
                for (t, why) in failed {
                    tracing::warn!(provider = %p, tenant = %t, "cannot read live state: {why}");
                    let e = out.unreadable.entry(t).or_default();
                    if !e.is_empty() {
                        e.push_str("; ");
                    }
                    e.push_str(&format!("{p}: {why}"));
                }
                Ok(found)
            }
            other => other,
        };
        if let Ok(v) = &r {
            tracing::debug!(provider = %p, resources = v.len(), "read live state");
        }
        out.resources.push(r.with_context(|| format!("reading live state from {}", providers.get(p).describe()))?);
    }
    Ok(out)
}

/// Tells the providers the correlation id, the tenants known (the repository's and the
/// state's: what `All` means to a system that cannot list its tenants) and the coordination.
pub fn begin_session(
    providers: &Providers,
    correlation_id: String,
    tenants: impl IntoIterator<Item = String>,
    coordination: BTreeMap<String, crate::model::Coordination>,
) {
    providers.begin(&Session { correlation_id, tenants: tenants.into_iter().collect(), coordination });
}

/// The full content of these addresses, read from their providers.
pub fn fetch_all<'a>(
    providers: &Providers,
    addresses: impl Iterator<Item = &'a Address>,
) -> Result<HashMap<Address, LiveResource>> {
    let mut by: BTreeMap<ProviderId, Vec<Address>> = BTreeMap::new();
    for a in addresses {
        by.entry(a.provider()).or_default().push(a.clone());
    }
    let mut out = HashMap::new();
    for (p, addrs) in by {
        let got = providers.get(p).fetch(&addrs).with_context(|| format!("reading {}", providers.get(p).describe()))?;
        out.extend(got.into_iter().map(|l| (l.address.clone(), l)));
    }
    Ok(out)
}

/// A digest of every file the repository was read from.
/// Tenant folders count by the digests `load` already made of them; the other files by
/// their text.
pub fn inputs_digest(loaded: &Loaded) -> String {
    use sha2::{Digest, Sha256};
    let mut parts: Vec<(&str, &str)> =
        loaded.files.iter().filter(|f| tenant_unit(&f.path).is_none()).map(|f| (&*f.path, f.text.as_str())).collect();
    for (name, text) in &loaded.templates {
        parts.push((name.as_str(), text));
    }
    parts.sort();
    let mut h = Sha256::new();
    let mut put = |a: &str, b: &str| {
        h.update((a.len() as u64).to_le_bytes());
        h.update(a.as_bytes());
        h.update((b.len() as u64).to_le_bytes());
        h.update(b.as_bytes());
    };
    for (p, t) in parts {
        put(p, t);
    }
    for (unit, digest) in &loaded.unit_digests {
        put(&format!("tenants/{unit}"), digest);
    }
    format!("sha256:{}", crate::providers::local::hex(&h.finalize()))
}

/// How to tell a person to create a missing external secret in the configured store: for
/// OpenBao, the exact `bao kv put` (mount, namespace and path included).
pub fn external_hint(settings: &Settings) -> diff::Hint {
    let secrets = &settings.providers.secrets;
    match secrets.kind.as_str() {
        "openbao" => match crate::providers::openbao::Config::from_settings(secrets) {
            Ok(cfg) => diff::Hint::new(move |t, n| {
                format!("Create it: {} (the value is read from stdin)", cfg.put_command(t, n))
            }),
            Err(_) => diff::Hint::new(|t, n| {
                format!("Create it in OpenBao at <mount>/{}", crate::providers::openbao::Config::secret_path(t, n))
            }),
        },
        _ => diff::Hint::new(|t, n| {
            format!("Create it: dotmac-gitops secret put --tenant {t} --name {n} (the value is read from stdin)")
        }),
    }
}

/// A repository ready to plan: validated, and rendered where the render cache could not
/// answer. `tenants` holds every tenant's desired resources — with content for tenants
/// rendered in this run, fingerprints (and secret declarations) for cached ones.
pub struct Workspace {
    pub loaded: Loaded,
    pub settings: Settings,
    pub state_dir: PathBuf,
    pub tenants: BTreeMap<String, DesiredTenant>,
    /// Problems found (only in what was parsed: cached folders had none).
    pub diagnostics: Vec<Diagnostic>,
    pub now: Timestamp,
    /// Tenant folders served from the render cache.
    pub cached_units: usize,
}

pub struct DesiredTenant {
    pub unit: String,
    pub coordination: Coordination,
    /// Name, plan and environment, for status pages.
    pub label: crate::model::TenantLabel,
    pub entries: Vec<DesiredEntry>,
}

impl plan::DesiredSource for BTreeMap<String, DesiredTenant> {
    fn tenant_ids(&self) -> Vec<&str> {
        self.keys().map(String::as_str).collect()
    }
    fn entries_of(&self, tenant: &str) -> Option<&[DesiredEntry]> {
        self.get(tenant).map(|t| t.entries.as_slice())
    }
}

/// The workspace's desired state with some tenants rendered again for one plan (the
/// workspace itself is shared by plans made at the same time, and is not changed).
struct Overlay<'a> {
    base: &'a BTreeMap<String, DesiredTenant>,
    fresh: &'a BTreeMap<String, Vec<DesiredEntry>>,
}

impl plan::DesiredSource for Overlay<'_> {
    fn tenant_ids(&self) -> Vec<&str> {
        self.base.keys().map(String::as_str).collect()
    }
    fn entries_of(&self, tenant: &str) -> Option<&[DesiredEntry]> {
        match self.fresh.get(tenant) {
            Some(e) => Some(e.as_slice()),
            None => self.base.entries_of(tenant),
        }
    }
}

impl DesiredTenant {
    pub fn has_content(&self) -> bool {
        self.entries.iter().all(|e| e.content.is_some())
    }
}

/// The settings file read quickly, before validation, for the state folder; an invalid
/// one yields the defaults (validation reports it, and nothing is planned then).
fn quick_settings(files: &[RawFile]) -> Settings {
    files
        .iter()
        .find(|f| f.path == "dotmac.toml")
        .map(|f| f.text.as_str())
        .and_then(|t| toml::from_str::<toml::Table>(t).ok())
        .and_then(|t| serde_json::to_value(t).ok())
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default()
}

/// The settings at `rev` (or in the work tree) and the state folder they give, read without
/// validating or reading any tenant (invalid settings give the defaults).
pub fn settings_at(root: &Path, rev: Option<&str>) -> Result<(Settings, PathBuf)> {
    let raw = load::read(root, rev, &Scope::Units(BTreeSet::new()))?;
    let settings = quick_settings(&raw.files);
    let dir = state_dir(root, &settings);
    Ok((settings, dir))
}

/// The tenant folders read from the work tree this time whose every file can vouch for
/// its content by its `stat` (a plain file, not changed just before the read), with those
/// `stat`s in path order.
fn vouching(loaded: &Loaded) -> Vec<(&str, Vec<(String, FileStat)>)> {
    if loaded.origin != load::Origin::WorkTree {
        return Vec::new();
    }
    let mut files: BTreeMap<&str, usize> = BTreeMap::new();
    for f in &loaded.files {
        if let Some(u) = tenant_unit(&f.path) {
            *files.entry(u).or_default() += 1;
        }
    }
    let mut stats: BTreeMap<&str, Vec<(String, FileStat)>> = BTreeMap::new();
    let mut racy: BTreeSet<&str> = BTreeSet::new();
    for (path, st) in &loaded.stats {
        let Some(u) = tenant_unit(path) else { continue };
        if loaded.unread_units.contains(u) {
            continue;
        }
        if st.racy(loaded.read_started_ns) {
            racy.insert(u);
        }
        stats.entry(u).or_default().push((path.clone(), *st));
    }
    stats.into_iter().filter(|(u, s)| !racy.contains(u) && files.get(u) == Some(&s.len())).collect()
}

/// What every tenant's render depends on besides its own folder: this binary, the
/// settings, catalogs, environments and templates.
fn shared_digest(files: &[RawFile]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"dotmac-gitops render cache 1\0");
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    if let Ok(m) = std::env::current_exe().and_then(std::fs::metadata) {
        use std::os::unix::fs::MetadataExt;
        h.update(m.mtime().to_le_bytes());
        h.update(m.mtime_nsec().to_le_bytes());
        h.update(m.size().to_le_bytes());
        h.update(m.ino().to_le_bytes());
    }
    for f in files.iter().filter(|f| crate::load::source::tenant_unit(&f.path).is_none()) {
        h.update((f.path.len() as u64).to_le_bytes());
        h.update(f.path.as_bytes());
        h.update((f.text.len() as u64).to_le_bytes());
        h.update(f.text.as_bytes());
    }
    crate::providers::local::hex(&h.finalize())
}

impl Workspace {
    /// Reads, validates and renders the repository at `root` (or `rev`), using and updating
    /// the render cache unless `DOTMAC_NO_CACHE` is set.
    pub fn open(root: &Path, rev: Option<&str>, now: Timestamp) -> Result<Workspace> {
        Self::open_with(root, rev, now, &|_, _| {})
    }

    /// `open`, calling `early` with the settings as read (not yet validated: invalid ones
    /// give the defaults) and the state folder they name, as soon as the shared files are
    /// read and before any tenant folder is: a caller can start on the state meanwhile.
    pub fn open_with(
        root: &Path,
        rev: Option<&str>,
        now: Timestamp,
        early: &dyn Fn(&Settings, &Path),
    ) -> Result<Workspace> {
        let t = std::time::Instant::now();
        let use_cache = std::env::var_os("DOTMAC_NO_CACHE").is_none();
        let now_s = now.as_second();
        let open_cache = |files: &[RawFile]| {
            let settings = quick_settings(files);
            let state_dir = state_dir(root, &settings);
            early(&settings, &state_dir);
            let cache =
                if use_cache { RenderCache::open(&state_dir, &shared_digest(files)) } else { RenderCache::default() };
            (state_dir, cache)
        };
        let (raw, state_dir, mut cache) = match rev {
            // The work tree: the shared files first (the cache depends on them), then the
            // tenant folders, not reading those the cache knows by their files' `stat`.
            None => {
                let tree = load::source::Worktree::open(root);
                let (shared, problems) = tree.shared();
                let (state_dir, cache) = open_cache(&shared);
                tracing::debug!(units = cache.units.len(), elapsed = ?t.elapsed(), rss_mib = rss_mib(), "opened the render cache");
                let units = tree.units(
                    &Scope::All,
                    load::source::KnownUnits {
                        has: &|u| cache.units.contains_key(u),
                        digest: &|u, files| cache.known(u, files, now_s),
                        listing: &|u, folder| cache.listing(u, folder),
                    },
                );
                (load::Raw::from_worktree(root, &tree, shared, problems, units), state_dir, cache)
            }
            Some(_) => {
                let raw = load::read(root, rev, &Scope::All)?;
                let (state_dir, cache) = open_cache(&raw.files);
                (raw, state_dir, cache)
            }
        };
        let mut loaded = raw.parse(&|u, d| cache.hit(u, d, now_s).is_none());
        tracing::debug!(files = loaded.files.len(), cached = loaded.skipped_units.len(), unread = loaded.unread_units.len(), elapsed = ?t.elapsed(), rss_mib = rss_mib(), "read");
        let mut known: BTreeMap<String, String> = BTreeMap::new();
        for u in &loaded.skipped_units {
            if let Some(e) = cache.units.get(u) {
                known.extend(e.tenants.iter().map(|t| (t.id.clone(), u.clone())));
            }
        }
        let (desired, mut diagnostics) = validate::validate_with(&loaded, now, &known);
        // The parsed documents are not read past validation (a tenant rendered again later is
        // parsed again from its texts): freed now, beside the rendering, whose threads take
        // their memory back as they allocate.
        drop_later(std::mem::take(&mut loaded.docs));
        let renderer = Renderer::new(&desired);
        // Each tenant's fingerprints (a hash of each resource's canonical form) are worked
        // out as it is rendered.
        let (rendered, render_diags) = renderer.render_entries(&desired, None);
        diagnostics.extend(render_diags);
        tracing::debug!(rendered = rendered.len(), elapsed = ?t.elapsed(), rss_mib = rss_mib(), "validated and rendered");
        let mut tenants: BTreeMap<String, DesiredTenant> = BTreeMap::new();
        for (id, entries) in rendered {
            let t = &desired.tenants[&id];
            tenants.insert(
                id,
                DesiredTenant {
                    unit: t.unit.clone(),
                    coordination: t.spec.coordination.clone(),
                    label: crate::model::TenantLabel::of(&t.spec),
                    entries,
                },
            );
        }
        if use_cache && !diagnostics.iter().any(|d| d.rule == "settings" || d.rule == "toml") {
            // Folders that validated and rendered without a single diagnostic are cached.
            let mut troubled: BTreeSet<String> =
                diagnostics.iter().filter_map(|d| d.file.as_deref().and_then(tenant_unit)).map(str::to_owned).collect();
            troubled.extend(
                diagnostics
                    .iter()
                    .filter_map(|d| d.tenant.as_ref())
                    .filter_map(|t| desired.tenants.get(t).map(|t| t.unit.clone()).or_else(|| known.get(t).cloned())),
            );
            let mut per_unit: BTreeMap<&str, Vec<&crate::model::Tenant>> = BTreeMap::new();
            for t in desired.tenants.values() {
                per_unit.entry(t.unit.as_str()).or_default().push(t);
            }
            // Built in parallel (130,000 entries for 10,000 tenants; one thread left the other
            // core idle), stored in order.
            let fresh: Vec<(&String, UnitEntry)> = loaded
                .unit_digests
                .par_iter()
                .filter(|(u, _)| !loaded.skipped_units.contains(*u) && !troubled.contains(*u))
                .map(|(u, digest)| {
                    let ts: &[&crate::model::Tenant] = per_unit.get(u.as_str()).map_or(&[], Vec::as_slice);
                    let entry = UnitEntry {
                        digest: digest.clone(),
                        files: Vec::new(),
                        folder: None,
                        not_before: ts.iter().map(|t| t.window.0).max().unwrap_or(i64::MIN),
                        not_after: ts.iter().map(|t| t.window.1).min().unwrap_or(i64::MAX),
                        tenants: ts
                            .iter()
                            .map(|t| CachedTenant {
                                id: t.id.clone(),
                                coordination: t.spec.coordination.clone(),
                                label: crate::model::TenantLabel::of(&t.spec),
                                resources: tenants[&t.id]
                                    .entries
                                    .iter()
                                    .map(|e| DesiredEntry {
                                        address: e.address.clone(),
                                        fingerprint: e.fingerprint.clone(),
                                        content: e
                                            .content
                                            .as_ref()
                                            .filter(|c| matches!(c.as_ref(), Content::Secret(_)))
                                            .map(Arc::clone),
                                    })
                                    .collect(),
                            })
                            .collect(),
                    };
                    (u, entry)
                })
                .collect();
            for (u, entry) in fresh {
                cache.put(u.clone(), entry);
            }
            // Folders read this time vouch for their entry by their files' `stat`s.
            for (u, files) in vouching(&loaded) {
                if let Some(digest) = loaded.unit_digests.get(u)
                    && !troubled.contains(u)
                {
                    cache.vouch(u, digest, files);
                }
            }
            // And folders of plain files by their own `stat`, for the next read to take their
            // listing from (10,000 folders not listed: a `stat` each instead of five calls).
            for (u, folder) in &loaded.folders {
                if let Some(digest) = loaded.unit_digests.get(u)
                    && !troubled.contains(u)
                {
                    cache.vouch_folder(u, digest, *folder);
                }
            }
            cache.retain(|u| loaded.unit_digests.contains_key(u));
            tracing::debug!(elapsed = ?t.elapsed(), rss_mib = rss_mib(), "render cache updated");
            if let Err(e) = cache.save() {
                tracing::warn!(error = %e, "could not save the render cache");
            }
            tracing::debug!(elapsed = ?t.elapsed(), "render cache saved");
        }
        // The cached folders' tenants, moved out of the cache (saved above if it changed), each
        // folder's on its own (in parallel), then inserted in order.
        let mut cached: Vec<(String, crate::cache::UnitEntry)> = Vec::with_capacity(loaded.skipped_units.len());
        cached.extend(loaded.skipped_units.iter().filter_map(|u| cache.units.remove_entry(u)));
        let mut cached: Vec<(String, DesiredTenant)> = cached
            .into_par_iter()
            .flat_map_iter(|(u, e)| {
                e.tenants.into_iter().map(move |ct| {
                    let entries = ct.resources;
                    let t = DesiredTenant { unit: u.clone(), coordination: ct.coordination, label: ct.label, entries };
                    (ct.id, t)
                })
            })
            .collect();
        cached.par_sort_unstable_by(|a, b| a.0.cmp(&b.0));
        if tenants.is_empty() {
            tenants = cached.into_iter().collect(); // built at once from sorted entries
        } else {
            tenants.extend(cached);
        }
        tracing::info!(tenants = tenants.len(), cached_units = loaded.skipped_units.len(), elapsed = ?t.elapsed(), rss_mib = rss_mib(), "desired state ready");
        let cached_units = loaded.skipped_units.len();
        let crate::model::Desired { settings, catalog, environments, tenants: validated, templates } = desired;
        // The validated tenants and the cache's entries (a hundred thousand small allocations
        // after a first render of 10,000 tenants) are freed while the command goes on.
        drop_later((catalog, environments, validated, templates, cache, renderer));
        let mut ws = Workspace { loaded, settings, state_dir, tenants, diagnostics, now, cached_units };
        ws.drop_disabled();
        Ok(ws)
    }

    /// These tenants rendered again, so that their entries carry content. The workspace is
    /// not changed (plans made at the same time share it).
    pub fn rendered(&self, ids: &BTreeSet<String>) -> Result<BTreeMap<String, Vec<DesiredEntry>>> {
        let units: BTreeSet<String> = ids.iter().filter_map(|t| self.tenants.get(t)).map(|t| t.unit.clone()).collect();
        if units.is_empty() {
            return Ok(BTreeMap::new());
        }
        let sub = self.loaded.subset(&units).map_err(|e| anyhow::anyhow!(e))?;
        let known: BTreeMap<String, String> = self
            .tenants
            .iter()
            .filter(|(_, t)| !units.contains(&t.unit))
            .map(|(id, t)| (id.clone(), t.unit.clone()))
            .collect();
        let (desired, mut diags) = validate::validate_with(&sub, self.now, &known);
        let (rendered, render_diags) = Renderer::new(&desired).render_entries(&desired, None);
        diags.extend(render_diags);
        if let Some(d) = diags.iter().find(|d| d.is_error()) {
            anyhow::bail!(
                "rendering {} again failed: {}",
                units.iter().cloned().collect::<Vec<_>>().join(", "),
                d.message
            );
        }
        Ok(rendered.into_iter().filter(|(id, _)| self.tenants.contains_key(id)).collect())
    }

    /// Forgets what a long-lived workspace need not hold: the parsed documents (plans parse
    /// again from the texts when they render) and the rendered content of the tenants `keep`
    /// declines (fingerprints and secret declarations stay, as for a tenant served from the
    /// render cache; a plan renders such a tenant again if it has changes).
    pub fn shed(&mut self, keep: impl Fn(&str) -> bool) {
        self.loaded.docs = Vec::new();
        for (_, t) in self.tenants.iter_mut().filter(|(id, _)| !keep(id)) {
            for e in &mut t.entries {
                if !matches!(e.content.as_deref(), Some(Content::Secret(_))) {
                    e.content = None;
                }
            }
        }
    }

    pub fn errors(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.is_error()).count()
    }

    /// Drops the resources of providers of kind `none`: nothing manages them.
    fn drop_disabled(&mut self) {
        let skip = disabled(&self.settings);
        if skip.is_empty() {
            return;
        }
        for t in self.tenants.values_mut() {
            t.entries.retain(|e| !skip.contains(&e.address.provider()));
        }
    }

    /// Reads live state and the state store, and builds the plan for `scope`. Tenants served
    /// from the cache that turn out to change are rendered again, so every change carries
    /// the content apply writes.
    pub fn plan(
        &self,
        providers: &Providers,
        state: &dyn StateStore,
        scope: &TenantScope,
        revision: Option<String>,
        record_live: bool,
        records: Option<Vec<crate::state::Record>>,
    ) -> Result<Plan> {
        let t = std::time::Instant::now();
        let skip = disabled(&self.settings);
        // The providers learn the tenants known (the repository's and the state's) first;
        // then the records are read while the providers list live state.
        let recorded = state.recorded_tenants()?;
        let plan_id = plan::new_id("plan");
        let coordination: BTreeMap<String, Coordination> =
            self.tenants.iter().map(|(id, t)| (id.clone(), t.coordination.clone())).collect();
        let known: BTreeSet<&str> =
            self.tenants.keys().map(String::as_str).chain(recorded.iter().map(String::as_str)).collect();
        let known = known.into_iter().map(str::to_owned);
        begin_session(
            providers,
            format!("{plan_id}@{}", revision.as_deref().unwrap_or("worktree")),
            known,
            coordination.clone(),
        );
        // The records, unless the caller read them already (`plan` reads them while the
        // work tree is read).
        let (records, live) = std::thread::scope(|s| {
            let records = s.spawn(|| match records {
                Some(r) => Ok(r),
                None => state.records(scope),
            });
            let live = read_live(providers, scope, &skip);
            (records.join().unwrap_or_else(|_| Err(anyhow::anyhow!("reading the state store failed"))), live)
        });
        let (records, mut live) = (records?, live?);
        let unreadable = std::mem::take(&mut live.unreadable);
        tracing::debug!(live = live.len(), records = records.len(), elapsed = ?t.elapsed(), rss_mib = rss_mib(), "read live state");
        let journal = state.journal()?;
        let meta = state.meta()?;
        tracing::debug!(live = live.len(), records = records.len(), elapsed = ?t.elapsed(), rss_mib = rss_mib(), "read live state and records");
        let options = diff::Options {
            dev_placeholders: self.settings.providers.secrets.kind == "local"
                && self
                    .settings
                    .providers
                    .secrets
                    .options
                    .get("dev_placeholders")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false),
            external_hint: Some(external_hint(&self.settings)),
        };
        let meta = plan::Meta {
            record_live,
            plan_id,
            created_at: Timestamp::now().to_string(),
            revision,
            inputs_digest: inputs_digest(&self.loaded),
            lineage: meta.lineage,
            serial: meta.serial,
            tenants: match scope {
                TenantScope::All => None,
                TenantScope::Only(s) => Some(s.iter().cloned().collect()),
            },
        };
        let now = self.now;
        let build = |entries: &dyn plan::DesiredSource, live: &[Vec<LiveResource>], meta: plan::Meta| {
            plan::build(
                plan::Inputs {
                    desired: entries,
                    coordination: coordination.clone(),
                    live,
                    unreadable: &unreadable,
                    records: &records,
                    journal: &journal,
                    scope,
                    now,
                    options: options.clone(),
                },
                meta,
            )
        };
        let mut fresh: BTreeMap<String, Vec<DesiredEntry>> = BTreeMap::new();
        let mut plan = build(&Overlay { base: &self.tenants, fresh: &fresh }, &live.resources, meta.clone());
        // What changes needs its content: desired (render again if cached) and live (read).
        let need_render: BTreeSet<String> = plan
            .changes
            .iter()
            .filter(|c| c.desired.is_none() && c.action != Action::Delete)
            .filter(|c| self.tenants.get(c.address.tenant.as_str()).is_some_and(|t| !t.has_content()))
            .map(|c| c.address.tenant.to_string())
            .collect();
        let need_live: Vec<&Address> = plan
            .changes
            .iter()
            .filter(|c| c.live_fingerprint.is_some() && c.before.is_none())
            .map(|c| &c.address)
            .collect();
        if !need_render.is_empty() || !need_live.is_empty() {
            if !need_render.is_empty() {
                for (id, mut entries) in self.rendered(&need_render)? {
                    entries.retain(|e| !skip.contains(&e.address.provider()));
                    fresh.insert(id, entries);
                }
            }
            let fetched = fetch_all(providers, need_live.into_iter())?;
            for l in live.resources.iter_mut().flatten() {
                if let Some(f) = fetched.get(&l.address) {
                    *l = f.clone();
                }
            }
            plan = build(&Overlay { base: &self.tenants, fresh: &fresh }, &live.resources, meta);
        }
        tracing::info!(plan = %plan.plan_id, create = plan.summary.create, update = plan.summary.update,
            rotate = plan.summary.rotate, delete = plan.summary.delete, drift = plan.summary.drift, elapsed = ?t.elapsed(), rss_mib = rss_mib(), "planned");
        drop_later((records, live));
        Ok(plan)
    }
}

/// Frees `v` on a thread of its own: a million records and live resources take a quarter
/// of a second to free, which a command about to exit need not wait for (the daemon frees
/// them meanwhile). In a command that keeps memory (see [`keep_memory_below`]) and is still
/// under its bound, `v` is not freed at all.
pub fn drop_later<T: Send + 'static>(v: T) {
    if keeps_memory() {
        std::mem::forget(v);
        return;
    }
    // Without a thread, the closure and `v` in it are dropped here, as usual.
    let _ = std::thread::Builder::new().name("drop".into()).spawn(move || drop(v));
}

/// The resident size (MiB) under which [`drop_later`] and the apply's committed batches
/// leave what they are handed unfreed; 0, the default, frees everything.
static KEEP_BELOW_MIB: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// For a command that exits once done (`apply`; never the daemon): what its stages
/// hand over to be freed is left to the process's exit while the process is smaller than
/// `mib`. Freeing a cold apply's intermediate data (parsed documents, the validated tenants,
/// the committed batches, the stores' written entries: millions of small blocks made on
/// other threads) cost more CPU, on the freeing threads and on the threads that then
/// collect the freed blocks and allocate from them scattered, than the fresh pages used
/// instead: at 10,000 tenants, CPU medians 4.0-4.6 → 3.8-4.3 s and wall 2.24-2.57 →
/// 2.11-2.40 s (five sets of 8-10 alternated cold applies), peak RSS 700 → 950 MiB. Past
/// the bound (100,000 tenants, where a fresh page costs more) memory is freed as before.
/// `plan` frees as before: its no-op run took the same time either way (0.215 s at 10,000
/// tenants), and a no-op plan's peak memory has limits of its own (300 MiB; 2 GiB at
/// 100,000 tenants, where it is near 1 GiB).
pub fn keep_memory_below(mib: u64) {
    KEEP_BELOW_MIB.store(mib, std::sync::atomic::Ordering::Relaxed);
}

/// Whether what is handed over to be freed now is better left unfreed (see
/// [`keep_memory_below`]).
pub fn keeps_memory() -> bool {
    let bound = KEEP_BELOW_MIB.load(std::sync::atomic::Ordering::Relaxed);
    // Where the resident size cannot be read (0), nothing is kept.
    bound > 0 && (1..bound).contains(&rss_mib())
}

/// The process's resident memory in MiB, for the debug log of each stage (0 where
/// `/proc` is not there).
pub(crate) fn rss_mib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf only reads a constant of the system.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    pages * page / (1024 * 1024)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts its drops.
    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Waits (up to 5 s) for `n` drops.
    fn dropped(count: &AtomicUsize, n: usize) -> bool {
        (0..500).any(|_| {
            let done = count.load(Ordering::SeqCst) >= n;
            if !done {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            done
        })
    }

    #[test]
    fn what_is_handed_over_is_kept_only_under_the_bound() {
        // The bound is the process's: other tests running meanwhile keep or free theirs
        // by it too, which changes nothing they check.
        let count = Arc::new(AtomicUsize::new(0));
        super::keep_memory_below(0);
        assert!(!super::keeps_memory(), "no bound: everything is freed");
        super::drop_later(Counted(Arc::clone(&count)));
        assert!(dropped(&count, 1), "freed on its thread");

        super::keep_memory_below(u64::MAX);
        assert!(super::keeps_memory(), "under the bound");
        super::drop_later(Counted(Arc::clone(&count)));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(count.load(Ordering::SeqCst), 1, "kept: never freed");

        // A process of this size is past a bound of 1 MiB.
        super::keep_memory_below(1);
        assert!(!super::keeps_memory(), "past the bound");
        super::drop_later(Counted(Arc::clone(&count)));
        assert!(dropped(&count, 2), "freed again past the bound");
        super::keep_memory_below(0);
    }
}
