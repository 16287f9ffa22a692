//! The pull-request diff: what moving from one revision to another does to the rendered
//! resources, desired against desired — no live system and no credentials, so it is safe
//! for pull requests from forks.
//!
//! Its cost follows the change, not the repository. The git tree diff (tree to tree, with
//! rename detection) names the files that changed, and they select the tenants to compare:
//!
//! | changed | tenants compared |
//! | --- | --- |
//! | a file under `tenants/<unit>/` (or `tenants/<unit>.yaml`) | the tenants of that unit, at both revisions (old and new path of a move) |
//! | `catalog/` or `environments/` | the tenants that use an entry whose meaning changed (a plan, resource tier, plugin or environment) |
//! | `templates/`, or `dotmac.toml` (its values, not its comments) | every tenant |
//! | anything else | none |
//!
//! Only the selected tenant folders are read (`Scope::Units`), except when a catalog or
//! environment change needs to know who uses the changed entry: then every tenant document
//! at the head revision is parsed (not validated or rendered) to find them.

use crate::diag::{self, Diagnostic};
use crate::diff::{Action, Change, Risk};
use crate::load::source::{self, FileRole, Scope, role_of, tenant_unit};
use crate::load::{self, Loaded};
use crate::model::{Address, Content, Desired, Resource, SecretSource, SecretSpec};
use crate::render::Renderer;
use crate::{diff, engine, fingerprint, validate};
use anyhow::{Context, Result, anyhow};
use jiff::Timestamp;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

/// One file the tree diff reports, with its path relative to the repository root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileChange {
    /// `added`, `deleted`, `modified`, `renamed`, `copied` or `typechange`.
    pub status: &'static str,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_path: Option<String>,
}

/// Which tenants a change reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every tenant (a template or settings change).
    All,
    /// The tenants of these units (first path segment under `tenants/`).
    Units(BTreeSet<String>),
}

impl Selection {
    pub fn contains(&self, unit: &str) -> bool {
        match self {
            Selection::All => true,
            Selection::Units(u) => u.contains(unit),
        }
    }
}

/// The outcome of comparing two revisions.
pub struct PrDiff {
    /// Full commit ids.
    pub base: String,
    pub head: String,
    pub files: Vec<FileChange>,
    pub selection: Selection,
    /// Why tenants were selected, for people ("tenants/t1/tenant.yaml modified", ...).
    pub reasons: Vec<String>,
    /// Every tenant compared (sorted).
    pub tenants: Vec<String>,
    /// Tenants that could not be compared because they have errors at the head revision.
    pub unchecked: Vec<String>,
    pub changes: Vec<Change>,
    /// Problems at the head revision in what was compared (positions resolved, sorted).
    pub diagnostics: Vec<Diagnostic>,
    /// Things to know that are not problems at head: tenants invalid at base, a provider
    /// switched off.
    pub notes: Vec<Note>,
    /// The head revision as read, for printing diagnostics with their source lines.
    pub head_loaded: Loaded,
}

/// A remark on the comparison (shown as a warning).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Note {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub rule: &'static str,
    pub message: String,
}

/// Compares the repository at `root` between the revisions `base` and `head`.
pub fn compare(root: &Path, base: &str, head: &str, now: Timestamp) -> Result<PrDiff> {
    let t = std::time::Instant::now();
    // Both revisions are validated: the schemas compile on the other core meanwhile.
    std::thread::spawn(validate::schema::compile_all);
    let (repo, prefix) = source::open_git(root).map_err(|e| anyhow!(e))?;
    let base_id = source::resolve_rev(&repo, base).map_err(|e| anyhow!("--base: {e}"))?;
    let head_id = source::resolve_rev(&repo, head).map_err(|e| anyhow!("--head: {e}"))?;
    tracing::debug!(elapsed = ?t.elapsed(), "opened the repository");
    // The largest reads of a diff are the two commits' `tenants/` trees (4 MB each at
    // 100,000 tenants), when they differ. They are read at once: the head revision goes
    // through a second handle on the repository, whose cache a thread fills with the head's
    // tree while this handle reads the base's; each handle then serves its own revision.
    let tenants_tree =
        |id| -> Option<git2::Oid> { root_tree(&repo, &prefix, id).ok()??.get_name("tenants").map(|e| e.id()) };
    let mut head_handle = None;
    if let (Some(b), Some(h)) = (tenants_tree(base_id), tenants_tree(head_id))
        && b != h
    {
        let path = repo.path().to_owned();
        let reading = std::thread::spawn(move || {
            let handle = git2::Repository::open(path).ok()?;
            let _ = handle.find_tree(h);
            Some(handle)
        });
        let _ = repo.find_tree(b);
        head_handle = reading.join().ok().flatten();
    }
    let head_repo = head_handle.as_ref().unwrap_or(&repo);
    let files = changed_files(&repo, head_repo, &prefix, base_id, head_id)
        .with_context(|| format!("comparing the trees of {} and {}", short(base_id), short(head_id)))?;
    tracing::info!(files = files.len(), elapsed = ?t.elapsed(), "tree diff");
    let touched = Touched::of(&files);
    let mut reasons = touched.reasons();
    let load = |id: git2::Oid, scope: &Scope| {
        load::load_commit(root, if id == head_id { head_repo } else { &repo }, &prefix, id, scope)
    };

    // What the shared files change: everything, some catalog entries, or nothing.
    let mut every = touched.templates.first().map(|p| format!("{p} changed: every tenant is compared"));
    if every.is_none()
        && touched.settings
        && settings_differ(&repo, &prefix, base_id, head_id).context("reading dotmac.toml")?
    {
        every = Some("dotmac.toml changed: every tenant is compared".to_owned());
    }
    let mut units: BTreeMap<String, Vec<String>> = touched.units.clone();
    let mut head_all: Option<Loaded> = None;
    if every.is_none() && touched.catalogs {
        let none = Scope::Units(BTreeSet::new());
        let (base_shared, _) = validate::validate(&load(base_id, &none), now);
        let (head_shared, _) = validate::validate(&load(head_id, &none), now);
        let changed = ChangedEntries::between(&base_shared, &head_shared);
        if changed.is_empty() {
            reasons.push("catalog and environment entries mean the same at both revisions".to_owned());
        } else {
            // Who uses a changed entry: read (not validate) every tenant document at head.
            // A tenant the change does not touch is the same at base.
            let all = load(head_id, &Scope::All);
            let mut users = 0usize;
            for (unit, refs) in unit_refs(&all) {
                let why = changed.used_by(&refs);
                if !why.is_empty() {
                    users += refs.ids.len().max(1);
                    units.entry(unit).or_default().extend(why);
                }
            }
            reasons.push(format!(
                "{} changed: {} tenant{} use{} {}",
                changed.describe(),
                users,
                plural(users),
                if users == 1 { "s" } else { "" },
                if changed.count() == 1 { "it" } else { "them" }
            ));
            head_all = Some(all);
        }
    }
    if let Some(why) = &every {
        reasons.push(why.clone());
    }
    let selection = match every {
        Some(_) => Selection::All,
        None => Selection::Units(units.keys().cloned().collect()),
    };

    // Read both revisions: the selected tenant folders (plus, at head, any folder named like
    // a selected tenant's id, so that a duplicate id is caught), and the shared files.
    let (head_loaded, base_loaded) = match &selection {
        Selection::All => (load(head_id, &Scope::All), load(base_id, &Scope::All)),
        Selection::Units(set) => {
            let head_loaded = match head_all {
                Some(mut all) => {
                    let present: BTreeSet<&str> = all.files.iter().filter_map(|f| tenant_unit(&f.path)).collect();
                    let extra = same_id_units(&all, set, |unit| present.contains(unit));
                    all.retain_units(&set.union(&extra).cloned().collect());
                    all
                }
                None => {
                    let first = load(head_id, &Scope::Units(set.clone()));
                    let head_tree = root_tree(head_repo, &prefix, head_id)?;
                    let extra = same_id_units(&first, set, |unit| {
                        head_tree.as_ref().is_some_and(|t| t.get_path(Path::new(&format!("tenants/{unit}"))).is_ok())
                    });
                    if extra.is_empty() {
                        first
                    } else {
                        load(head_id, &Scope::Units(set.union(&extra).cloned().collect()))
                    }
                }
            };
            (head_loaded, load(base_id, &Scope::Units(set.clone())))
        }
    };
    tracing::info!(head_files = head_loaded.files.len(), base_files = base_loaded.files.len(), elapsed = ?t.elapsed(), "loaded");

    let (head_desired, head_diags) = validate::validate(&head_loaded, now);
    let (base_desired, base_diags) = validate::validate(&base_loaded, now);
    let in_selection = |file: Option<&str>| file.and_then(tenant_unit).is_some_and(|u| selection.contains(u));

    // The tenants compared: those of the selected units at either revision, and any a head
    // problem in a selected unit names (a tenant whose document no longer reads).
    let mut tenants: BTreeSet<String> = head_desired
        .tenants
        .values()
        .chain(base_desired.tenants.values())
        .filter(|t| selection.contains(&t.unit))
        .map(|t| t.id.clone())
        .collect();
    tenants.extend(head_diags.iter().filter(|d| in_selection(d.file.as_deref())).filter_map(|d| d.tenant.clone()));

    let (head_rendered, head_render_diags) = render(&head_desired, &tenants);
    let (base_rendered, base_render_diags) = render(&base_desired, &tenants);
    tracing::info!(tenants = tenants.len(), elapsed = ?t.elapsed(), "validated and rendered");

    let mut diagnostics: Vec<Diagnostic> = head_diags;
    diagnostics.extend(head_render_diags);
    let relevant = |d: &Diagnostic| match d.file.as_deref().and_then(tenant_unit) {
        Some(u) => selection.contains(u) || d.tenant.as_ref().is_some_and(|t| tenants.contains(t)),
        None => d.tenant.as_ref().is_none_or(|t| tenants.contains(t)),
    };
    diagnostics.retain(relevant);
    diag::resolve_positions(&mut diagnostics, |p| head_loaded.text_of(p));
    diag::sort(&mut diagnostics);

    let head_broken = Broken::of(&diagnostics, &head_desired, &base_desired);
    let mut base_all_diags = base_diags;
    base_all_diags.extend(base_render_diags);
    let base_broken = Broken::of(&base_all_diags, &base_desired, &head_desired);

    let mut notes = Vec::new();
    // A provider switched off at head (`kind = "none"`) stops being managed: its resources
    // are left alone, not deleted, so they are compared on neither side.
    let skip = engine::disabled(&head_desired.settings);
    for p in engine::disabled(&head_desired.settings) {
        if !engine::disabled(&base_desired.settings).contains(&p) {
            notes.push(Note {
                tenant: None,
                rule: "provider-off",
                message: format!(
                    "the {p} provider is switched off at head: its resources are no longer managed (left as they are, not deleted)"
                ),
            });
        }
    }
    let unit_reasons = |t: &str| -> String {
        let unit = head_desired.tenants.get(t).or_else(|| base_desired.tenants.get(t)).map(|x| x.unit.as_str());
        match (&selection, unit.and_then(|u| units.get(u))) {
            (_, Some(why)) if !why.is_empty() => join_limited(why, 2),
            _ => reasons.last().cloned().unwrap_or_default(),
        }
    };

    let mut changes = Vec::new();
    let mut unchecked = Vec::new();
    for t in &tenants {
        if head_broken.contains(t) {
            unchecked.push(t.clone());
            continue;
        }
        let after: BTreeMap<&Address, &Content> = head_rendered
            .get(t)
            .into_iter()
            .flatten()
            .filter(|r| !skip.contains(&r.provider()))
            .map(|r| (&r.address, &*r.content))
            .collect();
        let before: BTreeMap<&Address, &Content> = if base_broken.contains(t) {
            notes.push(Note {
                tenant: Some(t.clone()),
                rule: "base-invalid",
                message: format!(
                    "tenant `{t}` has errors at the base revision; its resources are compared with nothing there"
                ),
            });
            BTreeMap::new()
        } else {
            base_rendered
                .get(t)
                .into_iter()
                .flatten()
                .filter(|r| !skip.contains(&r.provider()))
                .map(|r| (&r.address, &*r.content))
                .collect()
        };
        let why = unit_reasons(t);
        let addresses: BTreeSet<&Address> = after.keys().chain(before.keys()).copied().collect();
        for a in addresses {
            if let Some(c) = change(a, before.get(a).copied(), after.get(a).copied(), &why) {
                changes.push(c);
            }
        }
    }
    tracing::info!(changes = changes.len(), elapsed = ?t.elapsed(), "compared");
    Ok(PrDiff {
        base: base_id.to_string(),
        head: head_id.to_string(),
        files,
        selection,
        reasons,
        tenants: tenants.into_iter().collect(),
        unchecked,
        changes,
        diagnostics,
        notes,
        head_loaded,
    })
}

fn short(id: git2::Oid) -> String {
    id.to_string()[..12].to_owned()
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn join_limited(items: &[String], max: usize) -> String {
    let mut s = items.iter().take(max).cloned().collect::<Vec<_>>().join("; ");
    if items.len() > max {
        s.push_str(&format!("; and {} more", items.len() - max));
    }
    s
}

fn render(desired: &Desired, only: &BTreeSet<String>) -> (BTreeMap<String, Vec<Resource>>, Vec<Diagnostic>) {
    let present: BTreeSet<String> = only.iter().filter(|t| desired.tenants.contains_key(*t)).cloned().collect();
    if present.is_empty() {
        return (BTreeMap::new(), Vec::new());
    }
    Renderer::new(desired).render_all(desired, Some(&present))
}

// ---------------------------------------------------------------------------------------------
// The tree diff

/// The tree of the repository root at a commit (`None` if the root does not exist there).
fn root_tree<'r>(repo: &'r git2::Repository, prefix: &str, id: git2::Oid) -> Result<Option<git2::Tree<'r>>> {
    let tree = repo.find_commit(id)?.tree()?;
    if prefix.is_empty() {
        return Ok(Some(tree));
    }
    match tree.get_path(Path::new(prefix)) {
        Ok(entry) if entry.kind() == Some(git2::ObjectType::Tree) => Ok(Some(repo.find_tree(entry.id())?)),
        _ => Ok(None),
    }
}

/// The files that differ between two commits under the repository root, renames detected.
///
/// libgit2's tree-to-tree diff walks every blob of both trees; with thousands of tenant
/// folders that is most of the cost. So the trees are compared here, skipping every subtree
/// whose id is the same on both sides; libgit2 is asked only to find renames, among the
/// files added and deleted, when there are both.
///
/// The base revision is read through `repo`, the head through `head_repo` (two handles on
/// the same repository, or the same one twice).
pub fn changed_files(
    repo: &git2::Repository,
    head_repo: &git2::Repository,
    prefix: &str,
    base: git2::Oid,
    head: git2::Oid,
) -> Result<Vec<FileChange>> {
    let old = root_tree(repo, prefix, base)?;
    let new = root_tree(head_repo, prefix, head)?;
    let mut found = Vec::new();
    differing_paths((repo, head_repo), old.as_ref(), new.as_ref(), "", &mut found)?;
    let mut out = Vec::new();
    let (mut added, mut deleted) = (Vec::new(), Vec::new());
    for d in found {
        match (d.old, d.new) {
            (Some(o), Some(n)) => {
                let link = |m: i32| m == 0o120000;
                let status = if link(o) != link(n) { "typechange" } else { "modified" };
                out.push(FileChange { status, path: d.path, old_path: None });
            }
            (None, Some(_)) => added.push(d.path),
            (Some(_), None) => deleted.push(d.path),
            (None, None) => {}
        }
    }
    if !added.is_empty() && !deleted.is_empty() {
        let mut opts = git2::DiffOptions::new();
        opts.skip_binary_check(true).disable_pathspec_match(true);
        for p in added.iter().chain(&deleted) {
            opts.pathspec(p);
        }
        // Both trees through one handle, as libgit2's diff looks their subtrees up in it.
        let new = root_tree(repo, prefix, head)?;
        let mut diff = repo.diff_tree_to_tree(old.as_ref(), new.as_ref(), Some(&mut opts))?;
        let mut find = git2::DiffFindOptions::new();
        find.renames(true);
        diff.find_similar(Some(&mut find))?;
        let path = |f: git2::DiffFile<'_>| f.path().map(|p| p.to_string_lossy().replace('\\', "/"));
        for d in diff.deltas() {
            let (old_path, new_path) = (path(d.old_file()), path(d.new_file()));
            out.push(match d.status() {
                git2::Delta::Renamed | git2::Delta::Copied => FileChange {
                    status: if d.status() == git2::Delta::Renamed { "renamed" } else { "copied" },
                    path: new_path.unwrap_or_default(),
                    old_path,
                },
                git2::Delta::Deleted => {
                    FileChange { status: "deleted", path: old_path.unwrap_or_default(), old_path: None }
                }
                _ => FileChange { status: "added", path: new_path.or(old_path).unwrap_or_default(), old_path: None },
            });
        }
    } else {
        out.extend(added.into_iter().map(|path| FileChange { status: "added", path, old_path: None }));
        out.extend(deleted.into_iter().map(|path| FileChange { status: "deleted", path, old_path: None }));
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// A file (blob or link) that differs, with its mode on each side it exists on.
struct Differing {
    path: String,
    old: Option<i32>,
    new: Option<i32>,
}

/// Git's order of tree entries: by name, a tree's name read as if it ended in `/`.
fn git_order(a: &git2::TreeEntry<'_>, b: &git2::TreeEntry<'_>) -> std::cmp::Ordering {
    let (x, y) = (a.name_bytes(), b.name_bytes());
    let l = x.len().min(y.len());
    match x[..l].cmp(&y[..l]) {
        std::cmp::Ordering::Equal => {}
        other => return other,
    }
    let next = |s: &[u8], e: &git2::TreeEntry<'_>| {
        s.get(l).copied().or((e.kind() == Some(git2::ObjectType::Tree)).then_some(b'/'))
    };
    next(x, a).cmp(&next(y, b))
}

/// The files that differ between two trees; subtrees with the same id are not read. Each
/// side's subtrees are read through its own handle (base, head).
fn differing_paths<'r>(
    repos: (&'r git2::Repository, &'r git2::Repository),
    old: Option<&git2::Tree<'_>>,
    new: Option<&git2::Tree<'_>>,
    at: &str,
    out: &mut Vec<Differing>,
) -> Result<()> {
    let mut o = old.map(|t| t.iter()).into_iter().flatten().peekable();
    let mut n = new.map(|t| t.iter()).into_iter().flatten().peekable();
    loop {
        let (left, right) = match (o.peek(), n.peek()) {
            (None, None) => return Ok(()),
            (Some(_), None) => (o.next(), None),
            (None, Some(_)) => (None, n.next()),
            (Some(a), Some(b)) => match git_order(a, b) {
                std::cmp::Ordering::Less => (o.next(), None),
                std::cmp::Ordering::Greater => (None, n.next()),
                std::cmp::Ordering::Equal => {
                    let (a, b) = (o.next(), n.next());
                    if let (Some(x), Some(y)) = (&a, &b)
                        && x.id() == y.id()
                        && x.filemode() == y.filemode()
                    {
                        continue;
                    }
                    (a, b)
                }
            },
        };
        let any = left.as_ref().or(right.as_ref()).expect("one side has the entry");
        let name = String::from_utf8_lossy(any.name_bytes()).into_owned();
        let path = if at.is_empty() { name } else { format!("{at}/{name}") };
        let tree = |e: &Option<git2::TreeEntry<'_>>, repo: &'r git2::Repository| -> Result<Option<git2::Tree<'r>>> {
            match e {
                Some(e) if e.kind() == Some(git2::ObjectType::Tree) => Ok(Some(repo.find_tree(e.id())?)),
                _ => Ok(None),
            }
        };
        let (lt, rt) = (tree(&left, repos.0)?, tree(&right, repos.1)?);
        if lt.is_some() || rt.is_some() {
            differing_paths(repos, lt.as_ref(), rt.as_ref(), &path, out)?;
        } else {
            let mode = |e: &Option<git2::TreeEntry<'_>>| {
                e.as_ref().filter(|e| e.kind() == Some(git2::ObjectType::Blob)).map(|e| e.filemode())
            };
            out.push(Differing { path, old: mode(&left), new: mode(&right) });
        }
    }
}

/// What the changed files touch, by the role the loader gives them.
#[derive(Debug, Default)]
struct Touched {
    /// Tenant units, with what changed in each.
    units: BTreeMap<String, Vec<String>>,
    settings: bool,
    templates: Vec<String>,
    catalogs: bool,
    catalog_files: Vec<String>,
}

impl Touched {
    fn of(files: &[FileChange]) -> Touched {
        let mut t = Touched::default();
        let mut statuses: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
        for f in files {
            let what = match &f.old_path {
                Some(old) => format!("{} {} from {old}", f.path, f.status),
                None => format!("{} {}", f.path, f.status),
            };
            for p in std::iter::once(&f.path).chain(f.old_path.as_ref()) {
                // The loader skips hidden files and folders.
                if p.split('/').any(|s| s.starts_with('.')) {
                    continue;
                }
                match role_of(p) {
                    Some(FileRole::Tenant) => {
                        let unit = tenant_unit(p).unwrap_or_default().to_owned();
                        statuses.entry(unit.clone()).or_default().insert(f.status);
                        let list = t.units.entry(unit).or_default();
                        if !list.contains(&what) {
                            list.push(what.clone());
                        }
                    }
                    Some(FileRole::Template) if !t.templates.contains(p) => t.templates.push(p.clone()),
                    Some(FileRole::Settings) => t.settings = true,
                    Some(FileRole::Catalog | FileRole::Environment) => {
                        t.catalogs = true;
                        if !t.catalog_files.contains(p) {
                            t.catalog_files.push(p.clone());
                        }
                    }
                    _ => {}
                }
            }
        }
        // Several files of one tenant: one line for people.
        for (unit, list) in t.units.iter_mut() {
            if list.len() > 1 {
                let how = match statuses.get(unit).map(|s| s.iter().copied().collect::<Vec<_>>()) {
                    Some(s) if s.len() == 1 => s[0].to_owned(),
                    _ => "changed".to_owned(),
                };
                *list = vec![format!("{} files {how} in tenants/{unit}", list.len())];
            }
        }
        t
    }

    fn reasons(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.units.is_empty() {
            let n = self.units.len();
            let names: Vec<String> = self.units.keys().take(5).map(|u| format!("tenants/{u}")).collect();
            out.push(format!(
                "files changed in {}{}",
                names.join(", "),
                if n > 5 { format!(" and {} more tenant folders", n - 5) } else { String::new() }
            ));
        }
        if self.catalogs {
            out.push(format!("{} changed", join_limited(&self.catalog_files, 3)));
        }
        out
    }
}

/// Whether `dotmac.toml` means something else at head (comments and layout do not count).
fn settings_differ(repo: &git2::Repository, prefix: &str, base: git2::Oid, head: git2::Oid) -> Result<bool> {
    let text = |id| -> Result<Option<String>> {
        let Some(tree) = root_tree(repo, prefix, id)? else { return Ok(None) };
        let Some(entry) = tree.get_name("dotmac.toml") else { return Ok(None) };
        let blob = repo.find_blob(entry.id())?;
        Ok(Some(String::from_utf8_lossy(blob.content()).into_owned()))
    };
    let (a, b) = (text(base)?, text(head)?);
    if a == b {
        return Ok(false);
    }
    let parse = |t: &Option<String>| t.as_deref().and_then(|t| toml::from_str::<toml::Table>(t).ok());
    Ok(match (parse(&a), parse(&b)) {
        (Some(x), Some(y)) => x != y,
        _ => true,
    })
}

// ---------------------------------------------------------------------------------------------
// Catalog and environment changes, and who they reach

/// The catalog and environment entries whose content differs between two revisions.
#[derive(Debug, Default)]
struct ChangedEntries {
    plans: BTreeSet<String>,
    tiers: BTreeSet<String>,
    plugins: BTreeSet<String>,
    environments: BTreeSet<String>,
}

fn changed_keys<'a, V: PartialEq + 'a>(
    a: impl IntoIterator<Item = (&'a String, V)>,
    b: impl IntoIterator<Item = (&'a String, V)>,
) -> BTreeSet<String> {
    let a: HashMap<&String, V> = a.into_iter().collect();
    let b: HashMap<&String, V> = b.into_iter().collect();
    a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).map(|k| (*k).clone()).collect()
}

impl ChangedEntries {
    fn between(base: &Desired, head: &Desired) -> ChangedEntries {
        ChangedEntries {
            plans: changed_keys(&base.catalog.plans, &head.catalog.plans),
            tiers: changed_keys(&base.catalog.tiers, &head.catalog.tiers),
            plugins: changed_keys(&base.catalog.plugins, &head.catalog.plugins),
            environments: changed_keys(
                base.environments.iter().map(|(k, (_, v))| (k, v)),
                head.environments.iter().map(|(k, (_, v))| (k, v)),
            ),
        }
    }

    fn count(&self) -> usize {
        self.plans.len() + self.tiers.len() + self.plugins.len() + self.environments.len()
    }

    fn is_empty(&self) -> bool {
        self.count() == 0
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (what, set) in [
            ("plan", &self.plans),
            ("resource tier", &self.tiers),
            ("plugin", &self.plugins),
            ("environment", &self.environments),
        ] {
            if set.is_empty() {
                continue;
            }
            let names: Vec<String> = set.iter().take(5).map(|n| format!("`{n}`")).collect();
            let more = if set.len() > 5 { format!(" and {} more", set.len() - 5) } else { String::new() };
            parts.push(format!("{what}{} {}{more}", plural(set.len()), names.join(", ")));
        }
        parts.join(", ")
    }

    /// Why a tenant unit is reached by these changes (empty: it is not).
    fn used_by(&self, r: &UnitRefs) -> Vec<String> {
        let mut why = Vec::new();
        let mut check = |what: &str, used: &BTreeSet<String>, changed: &BTreeSet<String>| {
            for n in used.intersection(changed) {
                why.push(format!("{what} `{n}` changed"));
            }
        };
        check("plan", &r.plans, &self.plans);
        check("resource tier", &r.tiers, &self.tiers);
        check("plugin", &r.plugins, &self.plugins);
        check("environment", &r.environments, &self.environments);
        why
    }
}

/// What the tenant documents of one unit refer to, read from the documents as written.
#[derive(Debug, Default)]
struct UnitRefs {
    ids: BTreeSet<String>,
    plans: BTreeSet<String>,
    tiers: BTreeSet<String>,
    plugins: BTreeSet<String>,
    environments: BTreeSet<String>,
}

fn unit_refs(loaded: &Loaded) -> BTreeMap<String, UnitRefs> {
    let mut out: BTreeMap<String, UnitRefs> = BTreeMap::new();
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    for d in &loaded.docs {
        let Some(unit) = tenant_unit(&d.at.file) else { continue };
        let r = out.entry(unit.to_owned()).or_default();
        match d.value.get("kind").and_then(Value::as_str) {
            Some("Tenant") => {
                r.ids.extend(text(&d.value, "id"));
                r.plans.extend(text(&d.value, "plan"));
                r.tiers.extend(text(&d.value, "resource_tier"));
                r.environments.extend(text(&d.value, "environment"));
            }
            Some("PluginLicenses") => {
                for l in d.value.get("licenses").and_then(Value::as_array).into_iter().flatten() {
                    r.plugins.extend(text(l, "plugin"));
                }
            }
            _ => {}
        }
    }
    // A unit whose documents do not read at head is left out: the pull request did not touch
    // it (or it would be selected by its files), so it was as broken at base.
    out
}

/// Tenant units outside `selected` that may hold a tenant with the id of one in `selected`:
/// the folder named like the id, when `exists` says it is there. Read at head, they let
/// validation catch a duplicate tenant id without reading every tenant.
fn same_id_units(loaded: &Loaded, selected: &BTreeSet<String>, exists: impl Fn(&str) -> bool) -> BTreeSet<String> {
    let mut ids_elsewhere: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (unit, refs) in unit_refs(loaded) {
        for id in refs.ids {
            ids_elsewhere.entry(id).or_default().insert(unit.clone());
        }
    }
    let mut out = BTreeSet::new();
    for (id, holders) in &ids_elsewhere {
        if !holders.iter().any(|u| selected.contains(u)) {
            continue;
        }
        // Loaded with every unit: the other holders are known. Otherwise: the conventional
        // folder names for the id.
        for u in holders.iter().filter(|u| !selected.contains(*u)) {
            out.insert(u.clone());
        }
        for u in [id.clone(), format!("{id}.yaml")] {
            if !selected.contains(&u) && exists(&u) {
                out.insert(u);
            }
        }
    }
    out
}

/// Tenants that cannot be compared on one side: an error names them, or an error is in a
/// file of their unit.
struct Broken(BTreeSet<String>);

impl Broken {
    fn of(diags: &[Diagnostic], this: &Desired, other: &Desired) -> Broken {
        let errors = diags.iter().filter(|d| d.is_error());
        let mut set: BTreeSet<String> = errors.clone().filter_map(|d| d.tenant.clone()).collect();
        let units: BTreeSet<&str> = errors.filter_map(|d| d.file.as_deref().and_then(tenant_unit)).collect();
        for t in this.tenants.values().chain(other.tenants.values()) {
            if units.contains(t.unit.as_str()) {
                set.insert(t.id.clone());
            }
        }
        Broken(set)
    }

    fn contains(&self, t: &str) -> bool {
        self.0.contains(t)
    }
}

// ---------------------------------------------------------------------------------------------
// One resource, desired at base against desired at head

fn change(address: &Address, before: Option<&Content>, after: Option<&Content>, why: &str) -> Option<Change> {
    let action = match (before, after) {
        (None, None) => return None,
        (None, Some(_)) => Action::Create,
        (Some(_), None) => Action::Delete,
        (Some(b), Some(a)) => {
            if fingerprint::of(b) == fingerprint::of(a) {
                return None;
            }
            Action::Update
        }
    };
    let (fields, text) = match (before, after) {
        (Some(Content::Secret(_)), _) | (_, Some(Content::Secret(_))) => {
            (Vec::new(), secret_diff(address, secret_of(before), secret_of(after)))
        }
        _ => (diff::fields(before, after), diff::unified(address, before, after)),
    };
    let risk = diff::risk(address, action, &fields, before, after);
    // The action says what; the reason says why (which change in the repository).
    let reason = if action == Action::Update && address.kind == crate::model::ResourceKind::OpenbaoSecret {
        format!("{why}; the declaration changed, the stored value is kept until it rotates")
    } else {
        why.to_owned()
    };
    Some(Change {
        address: address.clone(),
        action,
        drift: false,
        risk,
        reason,
        desired: after.cloned().map(Arc::new),
        desired_fingerprint: None,
        live_fingerprint: None,
        last_fingerprint: None,
        before: before.cloned(),
        fields,
        diff: text,
        refresh: false,
    })
}

fn secret_of(c: Option<&Content>) -> Option<&SecretSpec> {
    match c {
        Some(Content::Secret(s)) => Some(s),
        _ => None,
    }
}

/// A secret declaration for people: how it is made and rotated; never a value.
pub fn describe_secret(s: &SecretSpec) -> String {
    let how = match &s.source {
        SecretSource::Generated { length, charset } => {
            let cs = serde_json::to_value(charset).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
            format!("generated, {length} {cs} characters")
        }
        SecretSource::External => "external".to_owned(),
    };
    let rotation = match s.rotation_days {
        Some(d) => format!(", rotated every {d} days{}", if s.auto_rotation { " (automatically)" } else { "" }),
        None => String::new(),
    };
    format!("(sensitive) {how}{rotation}")
}

fn secret_diff(address: &Address, before: Option<&SecretSpec>, after: Option<&SecretSpec>) -> String {
    let mut out = format!("--- {address}\n+++ {address}\n");
    if let Some(b) = before {
        out.push_str(&format!("-{}\n", describe_secret(b)));
    }
    if let Some(a) = after {
        out.push_str(&format!("+{}\n", describe_secret(a)));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Summaries and the JSON form

impl PrDiff {
    pub fn errors(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.is_error()).count()
    }

    pub fn warnings(&self) -> usize {
        self.diagnostics.len() - self.errors()
    }

    pub fn highest_risk(&self) -> Option<Risk> {
        self.changes.iter().map(|c| c.risk).max()
    }

    /// Tenants with at least one change, sorted.
    pub fn changed_tenants(&self) -> Vec<&str> {
        let set: BTreeSet<&str> = self.changes.iter().map(|c| c.address.tenant.as_str()).collect();
        set.into_iter().collect()
    }

    pub fn count(&self, a: Action) -> usize {
        self.changes.iter().filter(|c| c.action == a).count()
    }

    /// The problems and notes as plan violations (what the Markdown and text outputs list).
    pub fn violations(&self) -> Vec<diff::Violation> {
        let mut out: Vec<diff::Violation> = self
            .diagnostics
            .iter()
            .map(|d| {
                let at = match (&d.file, d.line) {
                    (Some(f), Some(l)) => format!("{f}:{l}: "),
                    (Some(f), None) => format!("{f}: "),
                    _ => String::new(),
                };
                let help = d.help.as_deref().map(|h| format!(" (help: {h})")).unwrap_or_default();
                diff::Violation {
                    tenant: d.tenant.clone().unwrap_or_default(),
                    rule: d.rule.to_owned(),
                    severity: if d.is_error() { diff::Severity::Error } else { diff::Severity::Warning },
                    message: format!("{at}{}{help}", d.message),
                    address: None,
                }
            })
            .collect();
        for n in &self.notes {
            out.push(diff::Violation {
                tenant: n.tenant.clone().unwrap_or_default(),
                rule: n.rule.into(),
                severity: diff::Severity::Warning,
                message: n.message.clone(),
                address: None,
            });
        }
        out
    }

    /// `diff --format json`: the plan's change shape, with what was compared and why.
    pub fn to_json(&self) -> Value {
        json!({
            "format_version": 1,
            "base": self.base,
            "head": self.head,
            "valid": self.errors() == 0,
            "errors": self.errors(),
            "warnings": self.warnings(),
            "files": self.files,
            "reasons": self.reasons,
            "tenants": self.tenants,
            "unchecked": self.unchecked,
            "changed_tenants": self.changed_tenants(),
            "summary": {
                "create": self.count(Action::Create),
                "update": self.count(Action::Update),
                "delete": self.count(Action::Delete),
                "tenants": self.changed_tenants().len(),
                "highest_risk": self.highest_risk(),
            },
            "changes": self.changes.iter().map(crate::plan::change_json).collect::<Vec<_>>(),
            "diagnostics": self.diagnostics,
            "notes": self.notes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Charset;

    fn fc(status: &'static str, path: &str, old: Option<&str>) -> FileChange {
        FileChange { status, path: path.into(), old_path: old.map(Into::into) }
    }

    #[test]
    fn files_select_by_role() {
        let t = Touched::of(&[
            fc("modified", "tenants/t1/tenant.yaml", None),
            fc("renamed", "tenants/t3/x.yaml", Some("tenants/t2/x.yaml")),
            fc("modified", "tenants/t4/README.md", None),
            fc("modified", "tenants/.hidden/tenant.yaml", None),
            fc("modified", "README.md", None),
            fc("added", "catalog/plans.yaml", None),
        ]);
        assert_eq!(t.units.keys().collect::<Vec<_>>(), ["t1", "t2", "t3"]);
        assert_eq!(t.units["t2"], ["tenants/t3/x.yaml renamed from tenants/t2/x.yaml"]);
        assert!(t.catalogs && !t.settings && t.templates.is_empty());
        let t = Touched::of(&[fc("modified", "templates/kubernetes/deployment.yaml.j2", None)]);
        assert_eq!(t.templates, ["templates/kubernetes/deployment.yaml.j2"]);
    }

    #[test]
    fn secrets_are_described_never_valued() {
        let s = SecretSpec {
            name: "db".into(),
            source: SecretSource::Generated { length: 32, charset: Charset::Hex },
            rotation_days: Some(90),
            auto_rotation: true,
        };
        assert_eq!(
            describe_secret(&s),
            "(sensitive) generated, 32 hex characters, rotated every 90 days (automatically)"
        );
        let a = Address::parse("t1/openbao.secret[db]").unwrap();
        let mut longer = s.clone();
        longer.source = SecretSource::Generated { length: 48, charset: Charset::Hex };
        let c = change(&a, Some(&Content::Secret(s)), Some(&Content::Secret(longer)), "why").unwrap();
        assert_eq!((c.action, c.risk), (Action::Update, Risk::High));
        assert!(c.diff.contains("-(sensitive) generated, 32 hex") && c.diff.contains("+(sensitive) generated, 48 hex"));
    }

    /// Builds nested trees from (path, mode, text) and returns the root's id.
    fn tree_of(repo: &git2::Repository, files: &[(&str, i32, &str)]) -> git2::Oid {
        let mut here = repo.treebuilder(None).unwrap();
        let mut below: BTreeMap<&str, Vec<(&str, i32, &str)>> = BTreeMap::new();
        for &(path, mode, text) in files {
            match path.split_once('/') {
                Some((dir, rest)) => below.entry(dir).or_default().push((rest, mode, text)),
                None => {
                    here.insert(path, repo.blob(text.as_bytes()).unwrap(), mode).unwrap();
                }
            }
        }
        for (dir, files) in below {
            here.insert(dir, tree_of(repo, &files), 0o040000).unwrap();
        }
        here.write().unwrap()
    }

    #[test]
    fn the_tree_walk_finds_what_libgit2_finds() {
        let dir = tempfile::tempdir().unwrap();
        let repo = git2::Repository::init(dir.path()).unwrap();
        let base = tree_of(
            &repo,
            &[
                ("a/b.yaml", 0o100644, "1"),
                ("a/same.yaml", 0o100644, "same"),
                ("a-b", 0o100644, "x"),
                ("a.c", 0o100644, "file, then a folder"),
                ("link", 0o120000, "target"),
                ("run.sh", 0o100644, "echo"),
                ("tenants/t1/tenant.yaml", 0o100644, "t1"),
                ("tenants/t2/tenant.yaml", 0o100644, "t2"),
                ("tenants/t2/more/deep.yaml", 0o100644, "deep"),
                ("untouched/deep/z.yaml", 0o100644, "z"),
                ("ünïcode", 0o100644, "u"),
            ],
        );
        let head = tree_of(
            &repo,
            &[
                ("a/b.yaml", 0o100644, "2"),
                ("a/same.yaml", 0o100644, "same"),
                ("a.c/d.yaml", 0o100644, "now inside a folder"),
                ("a0", 0o100644, "added after the folder a in git's order"),
                ("link", 0o100644, "target"),
                ("run.sh", 0o100755, "echo"),
                ("tenants/t1/tenant.yaml", 0o100644, "t1"),
                ("tenants/t3/tenant.yaml", 0o100644, "t3"),
                ("untouched/deep/z.yaml", 0o100644, "z"),
                ("ünïcode", 0o100644, "v"),
            ],
        );
        let mut ours = Vec::new();
        let (old, new) = (repo.find_tree(base).unwrap(), repo.find_tree(head).unwrap());
        differing_paths((&repo, &repo), Some(&old), Some(&new), "", &mut ours).unwrap();
        let ours: Vec<(String, Option<i32>, Option<i32>)> = ours.into_iter().map(|d| (d.path, d.old, d.new)).collect();

        let mut opts = git2::DiffOptions::new();
        opts.include_typechange(true);
        let diff = repo.diff_tree_to_tree(Some(&old), Some(&new), Some(&mut opts)).unwrap();
        let mut theirs: Vec<(String, Option<i32>, Option<i32>)> = diff
            .deltas()
            .map(|d| {
                let side =
                    |f: git2::DiffFile<'_>| (f.mode() != git2::FileMode::Unreadable).then(|| i32::from(f.mode()));
                let path = d.new_file().path().or(d.old_file().path()).unwrap().to_string_lossy().into_owned();
                (path, side(d.old_file()), side(d.new_file()))
            })
            .collect();
        theirs.sort();
        let mut sorted = ours.clone();
        sorted.sort();
        assert_eq!(sorted, theirs);
        assert_eq!(ours.len(), 11, "{ours:?}");
        assert!(ours.contains(&("link".into(), Some(0o120000), Some(0o100644))));
        assert!(ours.contains(&("run.sh".into(), Some(0o100644), Some(0o100755))));
        assert!(ours.contains(&("tenants/t2/more/deep.yaml".into(), Some(0o100644), None)));
    }

    #[test]
    fn equal_content_is_no_change() {
        let a = Address::parse("t1/management.tenant").unwrap();
        let x = Content::Json(json!({"a": 1, "b": 2}));
        let y = Content::Json(json!({"b": 2, "a": 1}));
        assert!(change(&a, Some(&x), Some(&y), "").is_none());
        let c = change(&a, Some(&x), None, "gone").unwrap();
        assert_eq!((c.action, c.risk, c.reason.as_str()), (Action::Delete, Risk::Critical, "gone"));
    }
}
