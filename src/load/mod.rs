//! Load: repository files at a revision -> parsed documents.
//!
//! Nothing here judges the content beyond "is it readable YAML/TOML within the limits";
//! `validate` does the rest. Problems become diagnostics so one run reports all of them.

pub mod settings;
pub mod source;
pub mod yaml;
pub(crate) mod yaml_block;

use crate::diag::Diagnostic;
use crate::model::DocRef;
use rayon::prelude::*;
use serde_json::Value;
use source::{FileRole, RawFile, Scope};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which state of the repository was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The files on disk, as they are.
    WorkTree,
    /// The tree of this commit (full hex id).
    Commit(String),
}

/// A YAML or TOML file as read (kept for diagnostics).
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: Arc<str>,
    pub text: String,
}

/// One YAML document, parsed.
#[derive(Debug, Clone)]
pub struct LoadedDoc {
    pub at: DocRef,
    pub role: FileRole,
    /// 1-based line of the document's start.
    pub line: usize,
    /// Shared: a Tenant document is kept as the validated tenant's `doc` without a copy.
    pub value: Arc<Value>,
}

/// A repository read at one revision.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub root: PathBuf,
    pub origin: Origin,
    pub files: Vec<SourceFile>,
    pub docs: Vec<LoadedDoc>,
    /// `dotmac.toml` as a JSON value (for schema checks), if present and parseable.
    pub settings: Option<Value>,
    /// The repository's own templates, by name relative to `templates/`.
    pub templates: BTreeMap<String, Arc<str>>,
    pub diagnostics: Vec<Diagnostic>,
    /// A digest of each tenant folder's files (`tenants/<unit>/…`), by unit.
    pub unit_digests: BTreeMap<String, String>,
    /// Tenant folders that were read but, by the caller's choice, not parsed.
    pub skipped_units: BTreeSet<String>,
    /// Each file's `stat` as read from a work tree (empty for a commit).
    pub stats: Vec<(String, source::FileStat)>,
    /// Tenant folders of a work tree known unchanged by their files' `stat`, never read:
    /// they have a digest but no texts here (`subset` reads them when asked).
    pub unread_units: BTreeSet<String>,
    /// The `stat` of each tenant folder of a work tree that holds plain files only, taken
    /// before it was listed (see [`source::UnitsRead::folders`]).
    pub folders: Vec<(String, source::FileStat)>,
    /// When reading the work tree began (see [`source::FileStat::racy`]).
    pub read_started_ns: i128,
}

/// Which tenant folders to parse, given their name and digest (the rest are only hashed).
pub type ParseFilter<'a> = &'a (dyn Fn(&str, &str) -> bool + Sync);

/// Parse every folder.
pub fn parse_all(_: &str, _: &str) -> bool {
    true
}

/// A failure to read the repository at all (as opposed to a problem in one of its files).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("no dotmac.toml found in {0} or any folder above it; pass --repo DIR")]
    NoRoot(String),
    #[error("{0}")]
    Git(String),
}

/// Finds the repository root from `--repo` (or the current directory).
pub fn find_root(repo: Option<&Path>) -> Result<PathBuf, LoadError> {
    let start = match repo {
        Some(p) => p.to_path_buf(),
        None => std::env::current_dir().map_err(|e| LoadError::NoRoot(e.to_string()))?,
    };
    source::find_root(&start).ok_or_else(|| LoadError::NoRoot(start.display().to_string()))
}

/// Reads the repository at `root`: the work tree, or the commit `rev` names.
pub fn load(root: &Path, rev: Option<&str>, scope: &Scope) -> Result<Loaded, LoadError> {
    load_filtered(root, rev, scope, &parse_all)
}

/// Like `load`, parsing only the tenant folders `parse` chooses.
pub fn load_filtered(
    root: &Path,
    rev: Option<&str>,
    scope: &Scope,
    parse: ParseFilter<'_>,
) -> Result<Loaded, LoadError> {
    Ok(read(root, rev, scope)?.parse(parse))
}

/// A repository's files as read, before parsing.
pub struct Raw {
    pub root: PathBuf,
    pub origin: Origin,
    pub files: Vec<RawFile>,
    /// Tenant folders known unchanged and not read (work tree only).
    pub unread: Vec<source::UnreadUnit>,
    pub problems: Vec<source::FileProblem>,
    /// See [`source::UnitsRead::folders`] (work tree only).
    pub folders: Vec<(String, source::FileStat)>,
    pub started_ns: i128,
}

impl Raw {
    pub fn text(&self, path: &str) -> Option<&str> {
        self.files.iter().find(|f| f.path == path).map(|f| f.text.as_str())
    }

    /// Parses the files; tenant folders that `parse` declines are only hashed.
    pub fn parse(self, parse: ParseFilter<'_>) -> Loaded {
        let mut loaded = parse_files(&self.root, self.origin, self.files, self.problems, parse);
        loaded.read_started_ns = self.started_ns;
        loaded.folders = self.folders;
        // The folders not read come in name order: each set is built in one pass from them
        // and merged in, rather than by 100,000 inserts each searching the set.
        let mut digests = Vec::with_capacity(self.unread.len());
        for u in self.unread {
            loaded.stats.extend(u.files);
            digests.push((u.unit, u.digest));
        }
        let mut unread: BTreeSet<String> = digests.iter().map(|(u, _)| u.clone()).collect();
        loaded.skipped_units.append(&mut unread.clone());
        loaded.unit_digests.append(&mut digests.into_iter().collect());
        loaded.unread_units.append(&mut unread);
        loaded
    }
}

impl Raw {
    /// A work tree read in two steps: the shared files, then the tenant folders.
    pub fn from_worktree(
        root: &Path,
        tree: &source::Worktree,
        shared: Vec<RawFile>,
        mut problems: Vec<source::FileProblem>,
        units: source::UnitsRead,
    ) -> Raw {
        let mut files = shared;
        files.extend(units.files);
        files.sort_by(|a, b| a.path.cmp(&b.path));
        problems.extend(units.problems);
        Raw {
            root: root.to_path_buf(),
            origin: Origin::WorkTree,
            files,
            unread: units.unread,
            problems,
            folders: units.folders,
            started_ns: tree.started_ns,
        }
    }
}

/// Reads the repository's files (work tree or commit) without parsing them.
pub fn read(root: &Path, rev: Option<&str>, scope: &Scope) -> Result<Raw, LoadError> {
    let (raw, problems, origin) = match rev {
        None => {
            let (raw, problems) = source::read_worktree(root, scope);
            (raw, problems, Origin::WorkTree)
        }
        Some(rev) => {
            let (repo, prefix) = source::open_git(root).map_err(LoadError::Git)?;
            let commit = source::resolve_rev(&repo, rev).map_err(LoadError::Git)?;
            let tree = source::GitTree { repo: &repo, commit, prefix };
            let (raw, problems) = tree.read(scope);
            (raw, problems, Origin::Commit(commit.to_string()))
        }
    };
    Ok(Raw {
        root: root.to_path_buf(),
        origin,
        files: raw,
        unread: Vec::new(),
        problems,
        folders: Vec::new(),
        started_ns: 0,
    })
}

/// Reads the repository at a commit of an already open git repository.
pub fn load_commit(root: &Path, repo: &git2::Repository, prefix: &str, commit: git2::Oid, scope: &Scope) -> Loaded {
    let tree = source::GitTree { repo, commit, prefix: prefix.to_owned() };
    let (raw, problems) = tree.read(scope);
    parse_files(root, Origin::Commit(commit.to_string()), raw, problems, &parse_all)
}

/// A digest of each tenant folder's files: sha256 over every (path, text), in path order.
fn unit_digests(raw: &[RawFile]) -> BTreeMap<String, String> {
    let mut units: BTreeMap<&str, Vec<&RawFile>> = BTreeMap::new();
    for f in raw {
        if let Some(u) = source::tenant_unit(&f.path) {
            units.entry(u).or_default().push(f);
        }
    }
    let units: Vec<(&str, Vec<&RawFile>)> = units.into_iter().collect();
    units
        .par_iter()
        .map(|(u, files)| {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            for f in files {
                h.update((f.path.len() as u64).to_le_bytes());
                h.update(f.path.as_bytes());
                h.update((f.text.len() as u64).to_le_bytes());
                h.update(f.text.as_bytes());
            }
            let d = h.finalize();
            ((*u).to_owned(), crate::providers::local::hex(&d))
        })
        .collect()
}

/// Parses raw files into documents (in parallel), collecting every problem. Tenant folders
/// that `parse` declines are hashed but not parsed.
pub fn parse_files(
    root: &Path,
    origin: Origin,
    raw: Vec<RawFile>,
    problems: Vec<source::FileProblem>,
    parse: ParseFilter<'_>,
) -> Loaded {
    let unit_digests = unit_digests(&raw);
    let stats = raw.iter().filter_map(|f| Some((f.path.clone(), f.stat?))).collect();
    let skipped_units: BTreeSet<String> =
        unit_digests.iter().filter(|(u, d)| !parse(u, d)).map(|(u, _)| u.clone()).collect();
    let mut diagnostics: Vec<Diagnostic> = problems
        .into_iter()
        .map(|p| {
            let d = Diagnostic::error("unreadable-file", format!("`{}` {}", p.path, p.message)).file(p.path);
            match p.line {
                Some(l) => d.line(l, 1),
                None => d,
            }
        })
        .collect();
    let mut templates = BTreeMap::new();
    let mut yaml_files = Vec::new();
    let mut skipped = Vec::new();
    let mut settings_file = None;
    for f in raw {
        match source::role_of(&f.path) {
            Some(FileRole::Template) => {
                let name = f.path["templates/".len()..].to_owned();
                templates.insert(name, Arc::from(f.text));
            }
            Some(FileRole::Settings) => settings_file = Some(f),
            Some(FileRole::Tenant) if source::tenant_unit(&f.path).is_some_and(|u| skipped_units.contains(u)) => {
                skipped.push(f)
            }
            Some(role) => yaml_files.push((role, f)),
            None => {}
        }
    }

    type Parsed = (SourceFile, Result<Vec<LoadedDoc>, Diagnostic>);
    let parsed: Vec<Parsed> = yaml_files
        .into_par_iter()
        .map(|(role, f)| {
            let path: Arc<str> = Arc::from(f.path.as_str());
            let result = match yaml::parse_documents(&f.text) {
                Ok(docs) => Ok(docs
                    .into_iter()
                    .enumerate()
                    .map(|(i, d)| LoadedDoc {
                        at: DocRef { file: path.clone(), doc: i },
                        role,
                        line: d.line,
                        value: Arc::new(d.value),
                    })
                    .collect()),
                Err(e) => Err(Diagnostic::error("yaml", format!("invalid YAML: {}", e.message))
                    .file(f.path.clone())
                    .line(e.line, e.column)),
            };
            (SourceFile { path, text: f.text }, result)
        })
        .collect();

    let mut files = Vec::with_capacity(parsed.len() + skipped.len() + 1);
    files.extend(skipped.into_iter().map(|f| SourceFile { path: Arc::from(f.path.as_str()), text: f.text }));
    let mut docs = Vec::new();
    for (file, result) in parsed {
        match result {
            Ok(d) => docs.extend(d),
            Err(diag) => diagnostics.push(diag),
        }
        files.push(file);
    }

    let settings = match settings_file {
        None => {
            diagnostics.push(
                Diagnostic::error("settings", "the repository has no dotmac.toml")
                    .file("dotmac.toml")
                    .help("create it with at least `format = 1`"),
            );
            None
        }
        Some(f) => {
            let value = match toml::from_str::<toml::Table>(&f.text) {
                Ok(table) => serde_json::to_value(table).ok(),
                Err(e) => {
                    let (line, col) = e.span().map(|s| line_col(&f.text, s.start)).unwrap_or((1, 1));
                    diagnostics.push(
                        Diagnostic::error("toml", format!("invalid TOML: {}", e.message()))
                            .file("dotmac.toml")
                            .line(line, col),
                    );
                    None
                }
            };
            files.push(SourceFile { path: Arc::from("dotmac.toml"), text: f.text });
            value
        }
    };

    Loaded {
        root: root.to_path_buf(),
        origin,
        files,
        docs,
        settings,
        templates,
        diagnostics,
        unit_digests,
        skipped_units,
        stats,
        unread_units: BTreeSet::new(),
        folders: Vec::new(),
        read_started_ns: 0,
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, col)
}

impl Loaded {
    /// The text of a repository file (YAML, TOML or template), for diagnostics.
    pub fn text_of(&self, path: &str) -> Option<&str> {
        if let Some(name) = path.strip_prefix("templates/") {
            return self.templates.get(name).map(|t| &**t);
        }
        if let Some(name) = path.strip_prefix(crate::render::BUILTIN_PREFIX) {
            return crate::render::builtin_template(name);
        }
        self.files.iter().find(|f| &*f.path == path).map(|f| f.text.as_str())
    }

    /// The same repository with only these tenant folders parsed: from the texts in memory,
    /// or for folders that were not read, from the work tree — which must still hold what
    /// was planned (the same digest), or this fails.
    pub fn subset(&self, units: &BTreeSet<String>) -> Result<Loaded, String> {
        let mut raw: Vec<RawFile> = self
            .files
            .iter()
            .filter(|f| source::tenant_unit(&f.path).is_none_or(|u| units.contains(u)))
            .map(|f| RawFile::new(f.path.to_string(), f.text.clone()))
            .collect();
        raw.extend(self.templates.iter().map(|(n, t)| RawFile::new(format!("templates/{n}"), t.to_string())));
        let unread: BTreeSet<String> = units.intersection(&self.unread_units).cloned().collect();
        if !unread.is_empty() {
            let read =
                source::Worktree::open(&self.root).units(&Scope::Units(unread.clone()), source::KnownUnits::NONE);
            if let Some(p) = read.problems.first() {
                return Err(format!("`{}` {}", p.path, p.message));
            }
            let mut files = read.files;
            files.sort_by(|a, b| a.path.cmp(&b.path));
            let digests = unit_digests(&files);
            for u in &unread {
                if digests.get(u) != self.unit_digests.get(u) {
                    return Err(format!("tenants/{u} changed on disk while it was being planned; plan again"));
                }
            }
            raw.extend(files);
        }
        Ok(parse_files(&self.root, self.origin.clone(), raw, Vec::new(), &parse_all))
    }

    /// Keeps the shared files (settings, catalogs, environments, templates) and the tenant
    /// units in `units`; drops every other tenant folder's files, documents and problems.
    pub fn retain_units(&mut self, units: &BTreeSet<String>) {
        let keep = |p: &str| source::tenant_unit(p).is_none_or(|u| units.contains(u));
        self.files.retain(|f| keep(&f.path));
        self.docs.retain(|d| keep(&d.at.file));
        self.diagnostics.retain(|d| d.file.as_deref().is_none_or(keep));
    }

    pub fn revision(&self) -> Option<&str> {
        match &self.origin {
            Origin::Commit(c) => Some(c),
            Origin::WorkTree => None,
        }
    }
}
