//! Reading the repository's files: from the work tree, or from a git commit's tree (blobs
//! read straight from the object database, never checked out). git2 lives here.
//!
//! Only the files the format defines are read: `dotmac.toml`, `catalog/`, `environments/`,
//! `tenants/` (YAML) and `templates/` (anything). Each file is checked on the way in: a size
//! limit, UTF-8, and symbolic links that stay inside the repository.

use crate::fingerprint::Fingerprint;
use rayon::prelude::*;
use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

/// Files above this size are rejected before they are read.
pub const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;

/// A file as read, with the path relative to the repository root (always `/`-separated).
#[derive(Debug, Clone)]
pub struct RawFile {
    pub path: String,
    pub text: String,
    /// The file's `stat` when read from a work tree (to tell whether git's index still
    /// describes it); `None` from a git tree.
    pub stat: Option<FileStat>,
}

impl RawFile {
    pub fn new(path: String, text: String) -> RawFile {
        RawFile { path, text, stat: None }
    }
}

/// What git's index remembers of a file to tell that it did not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStat {
    pub mtime: i64,
    pub mtime_ns: i64,
    pub ctime: i64,
    pub ctime_ns: i64,
    pub size: u64,
    pub ino: u64,
}

/// A file that could not be taken in, and why.
#[derive(Debug, Clone)]
pub struct FileProblem {
    pub path: String,
    pub message: String,
    pub line: Option<usize>,
}

/// Which tenant folders to read. A tenant "unit" is the first path segment under `tenants/`
/// (`tenants/<unit>/...`, or the file `tenants/<unit>.yaml` itself).
#[derive(Debug, Clone, Default)]
pub enum Scope {
    #[default]
    All,
    Units(BTreeSet<String>),
}

impl Scope {
    fn wants_unit(&self, unit: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Units(set) => set.contains(unit),
        }
    }
}

/// The unit of a repository-relative path under `tenants/`, if it is one.
pub fn tenant_unit(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("tenants/")?;
    Some(rest.split('/').next().unwrap_or(rest))
}

/// What kind of repository file a path is, by where it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRole {
    Settings,
    Catalog,
    Environment,
    Tenant,
    Template,
}

pub fn role_of(path: &str) -> Option<FileRole> {
    let yaml = path.ends_with(".yaml") || path.ends_with(".yml");
    if path == "dotmac.toml" {
        Some(FileRole::Settings)
    } else if path.starts_with("templates/") {
        Some(FileRole::Template)
    } else if yaml && path.starts_with("catalog/") {
        Some(FileRole::Catalog)
    } else if yaml && path.starts_with("environments/") {
        Some(FileRole::Environment)
    } else if yaml && path.starts_with("tenants/") {
        Some(FileRole::Tenant)
    } else {
        None
    }
}

const TOP_DIRS: [&str; 4] = ["catalog", "environments", "tenants", "templates"];

fn decode(path: &str, bytes: Vec<u8>) -> Result<String, FileProblem> {
    match String::from_utf8(bytes) {
        Ok(s) => Ok(s),
        Err(e) => {
            let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = good.iter().filter(|b| **b == b'\n').count() + 1;
            Err(FileProblem {
                path: path.to_owned(),
                message: format!(
                    "is not valid UTF-8 (invalid byte at offset {}); save it as UTF-8",
                    e.utf8_error().valid_up_to()
                ),
                line: Some(line),
            })
        }
    }
}

fn too_big(path: &str, size: u64) -> FileProblem {
    FileProblem {
        path: path.to_owned(),
        message: format!("is {size} bytes, over the limit of {MAX_FILE_BYTES} bytes; split it into smaller files"),
        line: None,
    }
}

/// Finds the repository root: the nearest directory at or above `start` holding `dotmac.toml`.
pub fn find_root(start: &Path) -> Option<PathBuf> {
    let start = start.canonicalize().ok()?;
    start.ancestors().find(|d| d.join("dotmac.toml").is_file()).map(Path::to_path_buf)
}

// ---------------------------------------------------------------------------------------------
// Work tree

/// Reads the work tree under `root`.
pub fn read_worktree(root: &Path, scope: &Scope) -> (Vec<RawFile>, Vec<FileProblem>) {
    let tree = Worktree::open(root);
    let (mut files, mut problems) = tree.shared();
    let units = tree.units(scope, KnownUnits::NONE);
    files.extend(units.files);
    problems.extend(units.problems);
    files.sort_by(|a, b| a.path.cmp(&b.path));
    (files, problems)
}

/// A tenant folder whose files were only `stat`ed: the caller knew them by their `stat`
/// (see [`Worktree::units`]) and vouched for their digest.
#[derive(Debug, Clone)]
pub struct UnreadUnit {
    pub unit: String,
    pub digest: String,
    pub files: Vec<(String, FileStat)>,
}

/// The tenant folders of a work tree as read: files, folders known unchanged, problems.
#[derive(Debug, Default)]
pub struct UnitsRead {
    pub files: Vec<RawFile>,
    pub unread: Vec<UnreadUnit>,
    pub problems: Vec<FileProblem>,
    /// The `stat` of each tenant folder that holds plain files only (no folder, no link),
    /// taken before it was listed and not changed just before this read: while the folder
    /// keeps it, nothing was added to it, removed or renamed (see [`KnownUnits::listing`]).
    /// Not given for a folder whose listing and files the cache already knew.
    pub folders: Vec<(String, FileStat)>,
}

/// What a render cache knows of the tenant folders.
#[derive(Clone, Copy)]
pub struct KnownUnits<'a> {
    /// Whether the folder has an entry at all: only then are its files `stat`ed.
    pub has: &'a (dyn Fn(&str) -> bool + Sync),
    /// From the `stat` of every file of a folder, the digest of the folder if it is known
    /// unchanged (`None`: read it).
    pub digest: &'a (dyn Fn(&str, &[(String, FileStat)]) -> Option<String> + Sync),
    /// The files a folder held when it had this `stat` (recorded from
    /// [`UnitsRead::folders`]): a folder's mtime moves whenever an entry is added, removed
    /// or renamed in it, so an equal `stat` stands in for listing it again. The files' own
    /// `stat`s are still taken (writing a file in place leaves its folder alone).
    pub listing: &'a (dyn Fn(&str, &FileStat) -> Option<Vec<String>> + Sync),
}

impl KnownUnits<'static> {
    /// Knows no folder: every one is read.
    pub const NONE: KnownUnits<'static> = KnownUnits { has: &|_| false, digest: &|_, _| None, listing: &|_, _| None };
}

/// One tenant unit as listed (see [`Worktree::list_unit`]): its files with whether each
/// is a link, the problems met, the folder's `stat` if it may vouch for this listing, and
/// whether the listing came from the cache.
struct Listing {
    found: Vec<(String, bool)>,
    problems: Vec<FileProblem>,
    folder: Option<FileStat>,
    from_cache: bool,
}

/// A work tree being read: the shared files first, then the tenant folders.
pub struct Worktree {
    root: Result<PathBuf, FileProblem>,
    /// The clock when reading began: a file changed less than [`RACY_NS`] before it may
    /// change again within the same file-system clock tick, so its `stat` vouches for nothing.
    pub started_ns: i128,
}

/// How close to the start of a read a file's mtime makes its `stat` untrustworthy
/// (file-system clocks tick coarsely; one second is generous).
pub const RACY_NS: i128 = 1_000_000_000;

impl FileStat {
    pub fn of(m: &std::fs::Metadata) -> FileStat {
        use std::os::unix::fs::MetadataExt;
        FileStat {
            mtime: m.mtime(),
            mtime_ns: m.mtime_nsec(),
            ctime: m.ctime(),
            ctime_ns: m.ctime_nsec(),
            size: m.size(),
            ino: m.ino(),
        }
    }

    /// The `stat` of `rel` (a path without `..`) under the folder `dir`, not following a
    /// final link, with whether it is a plain file and whether it is a folder.
    ///
    /// Relative to an open folder, the kernel walks the path's own one or two components
    /// instead of the repository's whole path again: a no-op plan of 100,000 tenants takes
    /// 400,000 `stat`s, which spent most of their time looking up the same leading folders.
    fn at(dir: &std::fs::File, rel: &str) -> Option<(FileStat, bool, bool)> {
        use std::os::fd::AsRawFd;
        let path = std::ffi::CString::new(rel).ok()?;
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: a valid folder descriptor, a NUL-terminated path and a buffer of the
        // struct's size; the struct is read only after the call succeeded.
        let st = unsafe {
            if libc::fstatat(dir.as_raw_fd(), path.as_ptr(), st.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) != 0 {
                return None;
            }
            st.assume_init()
        };
        let kind = st.st_mode & libc::S_IFMT;
        let stat = FileStat {
            mtime: st.st_mtime,
            mtime_ns: st.st_mtime_nsec,
            ctime: st.st_ctime,
            ctime_ns: st.st_ctime_nsec,
            size: st.st_size as u64,
            ino: st.st_ino,
        };
        Some((stat, kind == libc::S_IFREG, kind == libc::S_IFDIR))
    }

    /// Changed so recently before `started_ns` (or after it) that an equal `stat` later does
    /// not prove equal content.
    pub fn racy(&self, started_ns: i128) -> bool {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        ns(self.mtime, self.mtime_ns).max(ns(self.ctime, self.ctime_ns)) + RACY_NS >= started_ns
    }
}

impl Worktree {
    pub fn open(root: &Path) -> Worktree {
        let started_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        let root = root.canonicalize().map_err(|e| FileProblem {
            path: root.display().to_string(),
            message: format!("cannot be read: {e}"),
            line: None,
        });
        Worktree { root, started_ns }
    }

    /// `dotmac.toml`, catalogs, environments and templates.
    pub fn shared(&self) -> (Vec<RawFile>, Vec<FileProblem>) {
        let root = match &self.root {
            Ok(r) => r,
            Err(p) => return (Vec::new(), vec![p.clone()]),
        };
        let mut paths: Vec<(String, bool)> = Vec::new();
        let mut problems = Vec::new();
        if root.join("dotmac.toml").exists() {
            paths.push(("dotmac.toml".to_owned(), false));
        }
        for top in TOP_DIRS.into_iter().filter(|t| *t != "tenants") {
            let dir = root.join(top);
            if dir.is_dir() {
                walk(&dir, top, &mut paths, &mut problems, 0);
            }
        }
        paths.retain(|(p, _)| role_of(p).is_some());
        let mut files = Vec::with_capacity(paths.len());
        for r in paths.par_iter().map(|(rel, link)| read_one(root, rel, *link)).collect::<Vec<_>>() {
            match r {
                Ok(f) => files.push(f),
                Err(p) => problems.push(p),
            }
        }
        (files, problems)
    }

    /// The entries of one tenant unit (a folder, or a file directly under `tenants/`). A
    /// folder's own `stat` is taken before it is listed, and its listing comes from `known`
    /// while the folder keeps the `stat` recorded with it; it is kept (to be recorded) only
    /// for a folder of plain files not changed just before this read.
    fn list_unit(
        &self,
        tenants: Option<&std::fs::File>,
        name: &str,
        path: &Path,
        ft: &std::fs::FileType,
        known: KnownUnits<'_>,
    ) -> Listing {
        let rel = format!("tenants/{name}");
        let mut l = Listing { found: Vec::new(), problems: Vec::new(), folder: None, from_cache: false };
        if !ft.is_dir() {
            entry(path, rel, ft, &mut l.found, &mut l.problems);
            return l;
        }
        // Taken before the listing: an entry added after it moves the mtime past the one
        // recorded.
        l.folder = match tenants {
            Some(dir) => FileStat::at(dir, name).filter(|&(_, _, is_dir)| is_dir).map(|(st, ..)| st),
            None => std::fs::symlink_metadata(path).ok().filter(|m| m.is_dir()).map(|m| FileStat::of(&m)),
        }
        .filter(|st| !st.racy(self.started_ns));
        let cached = l.folder.as_ref().filter(|_| (known.has)(name)).and_then(|st| (known.listing)(name, st));
        if let Some(paths) = cached {
            l.found = paths.into_iter().map(|p| (p, false)).collect();
            l.from_cache = true;
        } else if !walk(path, &rel, &mut l.found, &mut l.problems, 0) || l.found.iter().any(|(_, link)| *link) {
            l.folder = None;
        }
        l
    }

    /// The `stat`s of a folder's files in path order, if every one can vouch for its content
    /// by it: plain files (not links), none changed just before this read.
    fn vouching_stats(
        &self,
        root: &Path,
        tenants: Option<&std::fs::File>,
        found: &[(String, bool)],
    ) -> Option<Vec<(String, FileStat)>> {
        if found.is_empty() || found.iter().any(|(_, link)| *link) {
            return None;
        }
        let mut stats = Vec::with_capacity(found.len());
        for (p, _) in found {
            let st = match (tenants, p.strip_prefix("tenants/")) {
                (Some(dir), Some(rel)) => FileStat::at(dir, rel).filter(|&(_, is_file, _)| is_file)?.0,
                _ => FileStat::of(&std::fs::symlink_metadata(root.join(p)).ok().filter(|m| m.is_file())?),
            };
            if st.racy(self.started_ns) {
                return None;
            }
            stats.push((p.clone(), st));
        }
        stats.sort_by(|a, b| a.0.cmp(&b.0));
        Some(stats)
    }

    /// The tenant folders in `scope`, each walked in parallel. A folder of plain files whose
    /// `stat`s `known` recognises is not read (the `stat` is git's test of "unchanged", and
    /// a file changed just before this read is never offered).
    pub fn units(&self, scope: &Scope, known: KnownUnits<'_>) -> UnitsRead {
        let root = match &self.root {
            Ok(r) => r,
            Err(_) => return UnitsRead::default(),
        };
        let dir = root.join("tenants");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return UnitsRead::default();
        };
        let mut units: Vec<(String, PathBuf, std::fs::FileType)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path(), e.file_type().ok()?)))
            .filter(|(name, _, _)| scope.wants_unit(name) && !name.starts_with('.'))
            .collect();
        units.sort_by(|a, b| a.0.cmp(&b.0));
        // The folder the `stat`s are taken relative to (without it, by their whole paths).
        let tenants = std::fs::File::open(&dir).ok();
        let tenants = tenants.as_ref();
        enum One {
            Read(Vec<Result<RawFile, FileProblem>>, Vec<FileProblem>),
            Unread(UnreadUnit),
        }
        let per_unit: Vec<(One, Option<FileStat>, bool)> = on_io_threads(|| {
            units
                .par_iter()
                .map(|(name, path, ft)| {
                    let Listing { mut found, problems, folder, from_cache } =
                        self.list_unit(tenants, name, path, ft, known);
                    found.retain(|(p, _)| role_of(p).is_some());
                    if problems.is_empty()
                        && (known.has)(name)
                        && let Some(stats) = self.vouching_stats(root, tenants, &found)
                        && let Some(digest) = (known.digest)(name, &stats)
                    {
                        // A folder listed from the cache and not read keeps its entry as it is:
                        // its `stat` is not recorded again (at 100,000 tenants, 40 ms under
                        // `perf` spent looking up what was already there).
                        let folder = folder.filter(|_| !from_cache);
                        return (
                            One::Unread(UnreadUnit { unit: name.clone(), digest, files: stats }),
                            folder,
                            from_cache,
                        );
                    }
                    let folder = folder.filter(|_| problems.is_empty());
                    let files = found.iter().map(|(rel, link)| read_one(root, rel, *link)).collect();
                    (One::Read(files, problems), folder, from_cache)
                })
                .collect()
        });
        let listed = per_unit.iter().filter(|(.., from_cache)| *from_cache).count();
        tracing::debug!(folders = units.len(), listed_from_cache = listed, "tenant folders");
        let mut out = UnitsRead::default();
        for ((name, ..), (one, folder, _)) in units.iter().zip(per_unit) {
            if let Some(st) = folder {
                out.folders.push((name.clone(), st));
            }
            match one {
                One::Read(files, probs) => {
                    for r in files {
                        match r {
                            Ok(f) => out.files.push(f),
                            Err(p) => out.problems.push(p),
                        }
                    }
                    out.problems.extend(probs);
                }
                One::Unread(u) => out.unread.push(u),
            }
        }
        out
    }
}

/// The threads that read the work tree. Reading a folder is mostly waiting: for the disk
/// when the page cache has lost the files (this VM's cache gives them up within minutes),
/// and for system calls otherwise. With the two threads of the cores, a cold read of 10,000
/// tenant folders took 1.9–2.3 s; with eight, 1.0–1.2 s, and the same as with two once
/// the files are cached.
fn on_io_threads<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(8)
            // Walking folders and reading files needs little stack.
            .stack_size(512 * 1024)
            .thread_name(|i| format!("dotmac-read-{i}"))
            .build()
            .ok()
    });
    // Where no thread can be started, the cores' threads do it.
    match pool {
        Some(p) => p.install(work),
        None => work(),
    }
}

/// Adds a directory entry that is not a folder: a file, or a link to one.
fn entry(
    path: &Path,
    rel: String,
    ft: &std::fs::FileType,
    out: &mut Vec<(String, bool)>,
    problems: &mut Vec<FileProblem>,
) {
    if ft.is_symlink() {
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => problems.push(FileProblem {
                path: rel,
                message: "is a symbolic link to a folder; such links are not followed".into(),
                line: None,
            }),
            _ => out.push((rel, true)),
        }
    } else {
        out.push((rel, false));
    }
}

/// Every file under the folder `dir` (`rel` in the repository), with whether it is a link.
/// `true` if the folder could be listed and holds no folder (hidden ones aside).
fn walk(dir: &Path, rel: &str, out: &mut Vec<(String, bool)>, problems: &mut Vec<FileProblem>, depth: usize) -> bool {
    if depth > 32 {
        problems.push(FileProblem {
            path: rel.to_owned(),
            message: "is nested more than 32 folders deep".into(),
            line: None,
        });
        return false;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let mut flat = true;
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let Ok(name) = e.file_name().into_string() else {
            problems.push(FileProblem {
                path: format!("{rel}/{}", e.file_name().to_string_lossy()),
                message: "has a name that is not valid UTF-8".into(),
                line: None,
            });
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let child = format!("{rel}/{name}");
        let Ok(ft) = e.file_type() else {
            flat = false;
            continue;
        };
        if ft.is_dir() {
            flat = false;
            walk(&e.path(), &child, out, problems, depth + 1);
        } else {
            entry(&e.path(), child, &ft, out, problems);
        }
    }
    flat
}

/// Reads one file: a regular one directly (open, read, close), a link only if it stays
/// inside the repository. At most the size limit is read.
fn read_one(root: &Path, rel: &str, link: bool) -> Result<RawFile, FileProblem> {
    use std::io::Read;
    let path = root.join(rel);
    let problem = |message: String| FileProblem { path: rel.to_owned(), message, line: None };
    let target = if link {
        let real = path.canonicalize().map_err(|_| problem("is a symbolic link that points nowhere".into()))?;
        if !real.starts_with(root) {
            return Err(problem("is a symbolic link to a file outside the repository; it is not followed".into()));
        }
        let meta = std::fs::metadata(&real).map_err(|e| problem(format!("cannot be read: {e}")))?;
        if !meta.is_file() {
            return Err(problem("is not a regular file".into()));
        }
        real
    } else {
        path
    };
    let mut bytes = Vec::new();
    let stat = std::fs::File::open(&target)
        .and_then(|mut f| {
            let m = f.metadata()?;
            if m.len() > MAX_FILE_BYTES {
                return Ok(Err(m.len()));
            }
            // The size the `stat` gives, as git reads a file: into a buffer of exactly that
            // size (20,000 tenant files held in 8 KiB buffers were three times their text),
            // in one `read` where the file system allows, without a second one to find the
            // end (20,000 system calls at 10,000 tenants). A file written meanwhile has an
            // mtime that keeps its `stat` from vouching for it (`FileStat::racy`).
            bytes.resize(m.len() as usize, 0);
            let mut filled = 0;
            while filled < bytes.len() {
                match f.read(&mut bytes[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            bytes.truncate(filled);
            Ok(Ok(FileStat::of(&m)))
        })
        .map_err(|e| problem(format!("cannot be read: {e}")))?
        .map_err(|size| too_big(rel, size))?;
    // A symbolic link's index entry describes the link, not its target.
    let stat = (!link).then_some(stat);
    Ok(RawFile { path: rel.to_owned(), text: decode(rel, bytes)?, stat })
}

// ---------------------------------------------------------------------------------------------
// Git

/// A resolved git revision of the repository.
pub struct GitTree<'r> {
    pub repo: &'r git2::Repository,
    pub commit: git2::Oid,
    /// The repository root's path inside the git tree (`""` when they coincide).
    pub prefix: String,
}

/// Opens the git repository that contains `root`, and the prefix of `root` inside it.
pub fn open_git(root: &Path) -> Result<(git2::Repository, String), String> {
    let repo = git2::Repository::discover(root)
        .map_err(|e| format!("{} is not inside a git repository: {}", root.display(), e.message()))?;
    let workdir = repo
        .workdir()
        .ok_or_else(|| "the git repository is bare; pass --repo to a work tree".to_owned())?
        .canonicalize()
        .map_err(|e| e.to_string())?;
    let root = root.canonicalize().map_err(|e| e.to_string())?;
    let prefix = root
        .strip_prefix(&workdir)
        .map_err(|_| "the repository root is outside the git work tree".to_owned())?
        .to_string_lossy()
        .replace('\\', "/");
    Ok((repo, prefix))
}

/// Resolves `rev` (any revision git understands) to a commit id.
pub fn resolve_rev(repo: &git2::Repository, rev: &str) -> Result<git2::Oid, String> {
    let obj = repo.revparse_single(rev).map_err(|e| format!("unknown revision `{rev}`: {}", e.message()))?;
    let commit = obj.peel_to_commit().map_err(|e| format!("revision `{rev}` is not a commit: {}", e.message()))?;
    Ok(commit.id())
}

impl GitTree<'_> {
    fn root_tree(&self) -> Result<Option<git2::Tree<'_>>, String> {
        let commit = self.repo.find_commit(self.commit).map_err(|e| e.message().to_owned())?;
        let tree = commit.tree().map_err(|e| e.message().to_owned())?;
        if self.prefix.is_empty() {
            return Ok(Some(tree));
        }
        match tree.get_path(Path::new(&self.prefix)) {
            Ok(entry) => Ok(Some(self.repo.find_tree(entry.id()).map_err(|e| e.message().to_owned())?)),
            Err(_) => Ok(None),
        }
    }

    /// Reads the repository's files at this commit.
    pub fn read(&self, scope: &Scope) -> (Vec<RawFile>, Vec<FileProblem>) {
        let mut files = Vec::new();
        let mut problems = Vec::new();
        let tree = match self.root_tree() {
            Ok(Some(t)) => t,
            Ok(None) => {
                problems.push(FileProblem {
                    path: self.prefix.clone(),
                    message: format!("does not exist at commit {}", self.commit),
                    line: None,
                });
                return (files, problems);
            }
            Err(e) => {
                problems.push(FileProblem { path: ".".into(), message: e, line: None });
                return (files, problems);
            }
        };
        let mut entries: Vec<(String, git2::Oid, i32)> = Vec::new();
        if let Some(e) = tree.get_name("dotmac.toml") {
            entries.push(("dotmac.toml".into(), e.id(), e.filemode()));
        }
        for top in TOP_DIRS {
            let Some(e) = tree.get_name(top) else {
                continue;
            };
            let Ok(sub) = self.repo.find_tree(e.id()) else {
                continue;
            };
            if top == "tenants" {
                match scope {
                    // A few units of many: looked up by name, not by reading the whole list.
                    Scope::Units(units) => {
                        for name in units.iter().filter(|n| !n.starts_with('.')) {
                            if let Some(unit) = sub.get_name(name) {
                                self.collect(&unit, &format!("tenants/{name}"), &mut entries, 0);
                            }
                        }
                    }
                    Scope::All => {
                        for unit in sub.iter() {
                            let Ok(name) = unit.name() else { continue };
                            if name.starts_with('.') {
                                continue;
                            }
                            self.collect(&unit, &format!("tenants/{name}"), &mut entries, 0);
                        }
                    }
                }
            } else {
                self.collect(&e, top, &mut entries, 0);
            }
        }
        entries.retain(|(p, ..)| role_of(p).is_some());
        let odb = match self.repo.odb() {
            Ok(o) => o,
            Err(e) => {
                problems.push(FileProblem { path: ".".into(), message: e.message().to_owned(), line: None });
                return (files, problems);
            }
        };
        for (path, oid, mode) in entries {
            match self.read_blob(&odb, &tree, &path, oid, mode) {
                Ok(text) => files.push(RawFile::new(path, text)),
                Err(p) => problems.push(p),
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        (files, problems)
    }

    fn collect(&self, entry: &git2::TreeEntry<'_>, rel: &str, out: &mut Vec<(String, git2::Oid, i32)>, depth: usize) {
        match entry.kind() {
            Some(git2::ObjectType::Tree) if depth <= 32 => {
                let Ok(tree) = self.repo.find_tree(entry.id()) else {
                    return;
                };
                for child in tree.iter() {
                    let Ok(name) = child.name() else { continue };
                    if name.starts_with('.') {
                        continue;
                    }
                    self.collect(&child, &format!("{rel}/{name}"), out, depth + 1);
                }
            }
            Some(git2::ObjectType::Blob) => out.push((rel.to_owned(), entry.id(), entry.filemode())),
            _ => {}
        }
    }

    fn read_blob(
        &self,
        odb: &git2::Odb<'_>,
        tree: &git2::Tree<'_>,
        path: &str,
        oid: git2::Oid,
        mode: i32,
    ) -> Result<String, FileProblem> {
        let problem = |message: String| FileProblem { path: path.to_owned(), message, line: None };
        let (oid, mode) = if mode == 0o120000 {
            // A symbolic link: its blob is the target path. Follow it only inside the tree.
            let blob = self.repo.find_blob(oid).map_err(|e| problem(e.message().to_owned()))?;
            let target = String::from_utf8_lossy(blob.content()).into_owned();
            let resolved = resolve_link(path, &target).ok_or_else(|| {
                problem(format!("is a symbolic link to `{target}`, outside the repository; it is not followed"))
            })?;
            let entry = tree
                .get_path(Path::new(&resolved))
                .map_err(|_| problem(format!("is a symbolic link to `{target}`, which does not exist")))?;
            if entry.filemode() == 0o120000 || entry.kind() != Some(git2::ObjectType::Blob) {
                return Err(problem(format!("is a symbolic link to `{target}`, which is not a regular file")));
            }
            (entry.id(), entry.filemode())
        } else {
            (oid, mode)
        };
        let _ = mode;
        let (size, _) = odb.read_header(oid).map_err(|e| problem(e.message().to_owned()))?;
        if size as u64 > MAX_FILE_BYTES {
            return Err(too_big(path, size as u64));
        }
        let blob = self.repo.find_blob(oid).map_err(|e| problem(e.message().to_owned()))?;
        decode(path, blob.content().to_vec())
    }
}

/// Resolves a link target relative to the link's folder; `None` if it leaves the root.
pub fn resolve_link(link_path: &str, target: &str) -> Option<String> {
    if target.starts_with('/') || target.contains('\\') {
        return None;
    }
    let mut parts: Vec<&str> = link_path.split('/').collect();
    parts.pop();
    for c in Path::new(target).components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str()?),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            _ => return None,
        }
    }
    Some(parts.join("/"))
}

/// What git's index says of the work tree, read while the repository itself is read: the
/// checked-out commit (when nothing the engine reads is staged) and the index entries of
/// the engine's files. [`WorktreeIndex::commit_if_clean`] then compares them with the
/// `stat` of each file as the engine read it — git's own test, without walking the folders
/// again.
pub struct WorktreeIndex {
    head: String,
    /// What the index says, `None` while a remembered answer may stand in for it: it is
    /// read only if that does not.
    index: Option<IndexRead>,
    /// The answer of an earlier run under the same index file and HEAD, with the digest of
    /// the files' `stat`s it was given for.
    remembered: Option<(Fingerprint, Option<String>)>,
    /// When the index file was written: an entry not older than it may hide a change made
    /// in the same clock tick (git's "racily clean" entries), so its content is compared.
    written_ns: i128,
    /// The index file's `stat` (git replaces the file to change it) and what staged changes
    /// are looked for in, to tell whether anything is staged (see [`WorktreeIndex::staged`]).
    stamp: String,
    repo: PathBuf,
    prefix: String,
}

type IndexEntries = rustc_hash::FxHashMap<String, (i64, i64, u32, u32, git2::Oid)>;

/// Git's index as read.
struct IndexRead {
    /// The engine's files by path relative to the repository root: (mtime, mtime ns, size,
    /// inode, blob), as git keeps them (32-bit size and inode).
    entries: IndexEntries,
    /// The index records HEAD's tree as its own: nothing at all is staged.
    holds_head_tree: bool,
}

/// The index entries of the engine's files.
fn index_entries(index: &git2::Index, prefix: &str) -> IndexEntries {
    index
        .iter()
        .filter_map(|e| {
            let path = String::from_utf8(e.path).ok()?;
            let rel = if prefix.is_empty() { path } else { path.strip_prefix(&format!("{prefix}/"))?.to_owned() };
            role_of(&rel)?;
            let stat = (i64::from(e.mtime.seconds()), i64::from(e.mtime.nanoseconds()), e.file_size, e.ino, e.id);
            Some((rel, stat))
        })
        .collect()
}

/// The digest of the files' `stat`s (paths included) an answer is remembered for.
fn stats_digest(stats: &[(String, FileStat)]) -> Fingerprint {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for (path, st) in stats {
        h.update((path.len() as u64).to_le_bytes());
        h.update(path.as_bytes());
        for n in [st.mtime, st.mtime_ns, st.ctime, st.ctime_ns] {
            h.update(n.to_le_bytes());
        }
        h.update(st.size.to_le_bytes());
        h.update(st.ino.to_le_bytes());
    }
    Fingerprint::sha256(h.finalize().into())
}

/// A remembered answer, if `file` holds one for `stamp`: `(digest, commit or none)`.
fn remembered_answer(file: &Path, stamp: &str) -> Option<(Fingerprint, Option<String>)> {
    let text = std::fs::read_to_string(file).ok()?;
    let mut lines = text.lines();
    if lines.next()? != stamp {
        return None;
    }
    let digest = Fingerprint::from(lines.next()?);
    let answer = match lines.next()? {
        "-" => None,
        commit => Some(commit.to_owned()),
    };
    Some((digest, answer))
}

/// Reads git's index for the work tree at `root`; `None` outside git or without a commit.
///
/// `remembered` names the file where an earlier run left its answer (once the caller knows
/// where the state folder is; `None` if it never does): while the index file and HEAD are
/// the ones it was given under, the index is not read now, and read later only if the
/// files' `stat`s are not the remembered ones either. At 100,000 tenants reading it took a
/// core for half a second.
pub fn worktree_index(root: &Path, remembered: impl FnOnce() -> Option<PathBuf>) -> Option<WorktreeIndex> {
    use std::os::unix::fs::MetadataExt;
    let (repo, prefix) = open_git(root).ok()?;
    let head = repo.head().ok()?.peel_to_commit().ok()?;
    let index_path = repo.path().join("index");
    let m = std::fs::metadata(&index_path).ok()?;
    let written_ns = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
    let stamp = format!(
        "{} {} {} {} {} {} {}",
        head.id(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
        m.size(),
        m.ino()
    );
    let remembered = remembered().and_then(|file| remembered_answer(&file, &stamp));
    let index = match remembered {
        Some(_) => None,
        None => Some(read_index(&repo, head.tree_id(), &prefix)?),
    };
    Some(WorktreeIndex {
        head: head.id().to_string(),
        index,
        remembered,
        written_ns,
        stamp,
        repo: repo.path().to_path_buf(),
        prefix,
    })
}

/// Reads git's index: the engine's files in it, and whether it records `head_tree`.
fn read_index(repo: &git2::Repository, head_tree: git2::Oid, prefix: &str) -> Option<IndexRead> {
    let mut index = repo.index().ok()?;
    let holds_head_tree = cached_tree(&mut index) == Some(head_tree);
    Some(IndexRead { entries: index_entries(&index, prefix), holds_head_tree })
}

/// The tree `index` would commit, when git's record of it (the cache-tree extension) is
/// whole: after a commit, a checkout or a clone, until something is staged. `None`
/// otherwise. Asked of a repository with no object store, so that an index whose record is
/// not whole is never written out as trees into the user's repository: it only fails here.
fn cached_tree(index: &mut git2::Index) -> Option<git2::Oid> {
    let nowhere = git2::Repository::from_odb(git2::Odb::new().ok()?).ok()?;
    index.write_tree_to(&nowhere).ok()
}

impl WorktreeIndex {
    /// Whether the index was read (`false`: an answer of an earlier run may stand in).
    pub fn was_read(&self) -> bool {
        self.index.is_some()
    }

    /// Something the engine reads is staged but not committed (`true` also when git cannot
    /// tell). `holds_head_tree`: the index records HEAD's tree as its own.
    fn staged(&self, cache: Option<&Path>, holds_head_tree: bool) -> bool {
        if holds_head_tree {
            return false;
        }
        let remembered = cache.and_then(|c| std::fs::read_to_string(c).ok());
        if let Some(r) = remembered.as_deref().and_then(|r| r.strip_prefix(&self.stamp)) {
            match r {
                " staged\n" => return true,
                " clean\n" => return false,
                _ => {}
            }
        }
        // Comparing HEAD's tree with the index reads every tree object and the index file
        // once more: 2 % of a first plan's instructions at 10,000 tenants (callgrind).
        let staged = self.diff_head_to_index().unwrap_or(true);
        if let Some(c) = cache {
            remember_in(c, &format!("{} {}\n", self.stamp, if staged { "staged" } else { "clean" }));
        }
        staged
    }

    fn diff_head_to_index(&self) -> Option<bool> {
        let repo = git2::Repository::open(&self.repo).ok()?;
        let head = repo.find_commit(git2::Oid::from_str(&self.head).ok()?).ok()?;
        let index = repo.index().ok()?;
        let under = |p: &str| if self.prefix.is_empty() { p.to_owned() } else { format!("{}/{p}", self.prefix) };
        let mut opts = git2::DiffOptions::new();
        opts.disable_pathspec_match(true).pathspec(under("dotmac.toml"));
        for top in TOP_DIRS {
            opts.pathspec(under(top));
        }
        let staged = repo.diff_tree_to_index(Some(&head.tree().ok()?), Some(&index), Some(&mut opts)).ok()?;
        Some(staged.deltas().len() > 0)
    }

    /// The commit, if every file the engine read (`stats`, with their text from `text_of`)
    /// is in the index unchanged and no indexed file of the engine's is missing.
    ///
    /// Whether anything is staged is remembered in `cache` (a file) under the index file's
    /// `stat` and HEAD: comparing HEAD's tree with the index reads every tree object, which
    /// for 100,000 tenant folders takes most of a second.
    ///
    /// The answer is remembered in `remember` (a file) under the index file's `stat`, HEAD
    /// and the digest of `stats`, unless a file changed so recently before `started_ns`
    /// that an equal `stat` later would not prove equal content (as the render cache's
    /// rule): the same index and the same `stat`s give the same answer.
    pub fn commit_if_clean<'a>(
        self,
        stats: &[(String, FileStat)],
        text_of: impl Fn(&str) -> Option<std::borrow::Cow<'a, str>>,
        cache: Option<&Path>,
        remember: Option<(&Path, i128)>,
    ) -> Option<String> {
        let digest = stats_digest(stats);
        if let Some((d, answer)) = &self.remembered
            && *d == digest
        {
            return answer.clone();
        }
        let answer = self.compare(stats, text_of, cache);
        if let Some((file, started_ns)) = remember
            && !stats.iter().any(|(_, st)| st.racy(started_ns))
        {
            remember_in(file, &format!("{}\n{digest}\n{}\n", self.stamp, answer.as_deref().unwrap_or("-")));
        }
        answer
    }

    fn compare<'a>(
        &self,
        stats: &[(String, FileStat)],
        text_of: impl Fn(&str) -> Option<std::borrow::Cow<'a, str>>,
        cache: Option<&Path>,
    ) -> Option<String> {
        let read;
        let index = match &self.index {
            Some(i) => i,
            None => {
                let repo = git2::Repository::open(&self.repo).ok()?;
                let head_tree = repo.find_commit(git2::Oid::from_str(&self.head).ok()?).ok()?.tree_id();
                read = read_index(&repo, head_tree, &self.prefix)?;
                &read
            }
        };
        let entries = &index.entries;
        if stats.len() != entries.len() {
            return None; // a file untracked, ignored or deleted
        }
        // The files first: a work tree that differs from the index (the usual case while
        // someone edits) is told at its first changed file, without the staged check.
        let unchanged = stats.iter().all(|(path, st)| {
            let Some(&(mtime, mtime_ns, size, ino, blob)) = entries.get(path) else { return false };
            let racy = i128::from(mtime) * 1_000_000_000 + i128::from(mtime_ns) >= self.written_ns;
            let same_stat =
                mtime == st.mtime && mtime_ns == st.mtime_ns && size == st.size as u32 && ino == st.ino as u32;
            (same_stat && !racy)
                || text_of(path).is_some_and(|t| {
                    git2::Oid::hash_object(git2::ObjectType::Blob, t.as_bytes()).is_ok_and(|id| id == blob)
                })
        });
        (unchanged && !self.staged(cache, index.holds_head_tree)).then(|| self.head.clone())
    }
}

/// Writes a remembered answer whole or not at all (a temporary file renamed over it); a
/// cache, so a failure only costs the next run the work again.
fn remember_in(file: &Path, text: &str) {
    if let Some(dir) = file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let tmp = file.with_extension(format!("{}.tmp", std::process::id()));
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_resolve_only_inside() {
        assert_eq!(resolve_link("templates/a.j2", "b.j2").as_deref(), Some("templates/b.j2"));
        assert_eq!(resolve_link("templates/k/a.j2", "../b.j2").as_deref(), Some("templates/b.j2"));
        assert_eq!(resolve_link("templates/a.j2", "../../etc/passwd"), None);
        assert_eq!(resolve_link("templates/a.j2", "/etc/passwd"), None);
    }

    #[test]
    fn units_and_roles() {
        assert_eq!(tenant_unit("tenants/t1/tenant.yaml"), Some("t1"));
        assert_eq!(tenant_unit("tenants/all.yaml"), Some("all.yaml"));
        assert_eq!(role_of("tenants/a/b/c.yml"), Some(FileRole::Tenant));
        assert_eq!(role_of("tenants/a/README.md"), None);
        assert_eq!(role_of("templates/x/README.md"), Some(FileRole::Template));
    }

    /// A tenant folder of plain files is recorded by its `stat`; while it keeps it, its
    /// listing is taken from what was recorded, and a file added is seen because the
    /// folder's `stat` moved. A folder holding a folder is never recorded.
    #[test]
    fn a_folder_known_by_its_stat_is_not_listed_again_and_an_added_file_is_seen() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        for (path, text) in [
            ("tenants/t1/tenant.yaml", "id: t1\n"),
            ("tenants/t2/tenant.yaml", "id: t2\n"),
            ("tenants/t2/more/x.yaml", "x: 1\n"),
        ] {
            std::fs::create_dir_all(root.join(path).parent().unwrap()).unwrap();
            std::fs::write(root.join(path), text).unwrap();
        }
        // As if read well after the files were written (nothing is racy).
        let read = || {
            let mut tree = Worktree::open(root);
            tree.started_ns += 10 * RACY_NS;
            tree
        };
        let paths = |u: &UnitsRead| u.files.iter().map(|f| f.path.clone()).collect::<Vec<_>>();
        let first = read().units(&Scope::All, KnownUnits::NONE);
        assert_eq!(paths(&first), ["tenants/t1/tenant.yaml", "tenants/t2/more/x.yaml", "tenants/t2/tenant.yaml"]);
        let recorded: std::collections::BTreeMap<String, FileStat> = first.folders.into_iter().collect();
        assert_eq!(recorded.keys().collect::<Vec<_>>(), ["t1"], "t2 holds a folder");

        // The recorded listing is what is read while the folder keeps its `stat`: here one
        // that names a file that is not there, to show that the folder was not listed.
        let listing = |told: &'static str| {
            let recorded = recorded.clone();
            move |u: &str, st: &FileStat| (recorded.get(u) == Some(st)).then(|| vec![told.to_owned()])
        };
        let lying = listing("tenants/t1/gone.yaml");
        let known = KnownUnits { has: &|_| true, digest: &|_, _| None, listing: &lying };
        let second = read().units(&Scope::All, known);
        assert_eq!(paths(&second), ["tenants/t2/more/x.yaml", "tenants/t2/tenant.yaml"]);
        assert_eq!(second.problems.iter().map(|p| p.path.as_str()).collect::<Vec<_>>(), ["tenants/t1/gone.yaml"]);

        // A file added moves the folder's `stat`: it is listed again.
        std::fs::write(root.join("tenants/t1/extra.yaml"), "x: 2\n").unwrap();
        let honest = listing("tenants/t1/tenant.yaml");
        let known = KnownUnits { has: &|_| true, digest: &|_, _| None, listing: &honest };
        let third = read().units(&Scope::All, known);
        assert!(third.problems.is_empty());
        assert_eq!(
            paths(&third),
            ["tenants/t1/extra.yaml", "tenants/t1/tenant.yaml", "tenants/t2/more/x.yaml", "tenants/t2/tenant.yaml"]
        );
        assert_ne!(third.folders[0].1, recorded["t1"]);
    }

    /// The index's own record of its tree answers "nothing staged" while it is whole and
    /// HEAD's; once something is staged the trees are compared, and nothing is ever written
    /// into the repository's objects to find out.
    #[test]
    fn the_index_s_cached_tree_answers_only_while_it_is_whole() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let (repo, tree, _) = committed(root);
        let objects = || files_under(&root.join(".git/objects"));
        let staged = || {
            let i = worktree_index(root, || None).unwrap();
            i.staged(None, i.index.as_ref().unwrap().holds_head_tree)
        };

        assert_eq!(cached_tree(&mut repo.index().unwrap()), Some(tree));
        assert!(!staged());

        // A file added again unchanged: the record is no longer whole, the trees are compared
        // and agree.
        let mut index = repo.index().unwrap();
        index.add_path(Path::new("dotmac.toml")).unwrap();
        index.write().unwrap();
        assert_eq!(cached_tree(&mut repo.index().unwrap()), None);
        assert!(!staged());

        // Staged: the record is no longer whole, and the trees are compared.
        std::fs::write(root.join("tenants/t1/tenant.yaml"), "id: t1\nname: x\n").unwrap();
        let mut index = repo.index().unwrap();
        index.add_path(Path::new("tenants/t1/tenant.yaml")).unwrap();
        index.write().unwrap();
        let before = objects();
        assert_eq!(cached_tree(&mut repo.index().unwrap()), None);
        assert_eq!(objects(), before, "nothing written to find out");
        assert!(staged());

        // Whole again but not HEAD's tree (a `git write-tree`): still staged.
        let mut index = repo.index().unwrap();
        let other = index.write_tree().unwrap();
        index.write().unwrap();
        assert_eq!(cached_tree(&mut repo.index().unwrap()), Some(other));
        assert!(staged());
    }

    /// A repository at `root` holding `dotmac.toml` and one tenant, committed as `git commit`
    /// leaves it: the index written after its tree, so that the file keeps its record of
    /// the tree. Returns the tree and the commit.
    fn committed(root: &Path) -> (git2::Repository, git2::Oid, String) {
        std::fs::create_dir_all(root.join("tenants/t1")).unwrap();
        std::fs::write(root.join("dotmac.toml"), "[render]\n").unwrap();
        std::fs::write(root.join("tenants/t1/tenant.yaml"), "id: t1\n").unwrap();
        let repo = git2::Repository::init(root).unwrap();
        let mut index = repo.index().unwrap();
        index.add_all(["*"].iter(), git2::IndexAddOption::DEFAULT, None).unwrap();
        let tree = index.write_tree().unwrap();
        index.write().unwrap();
        let sig = git2::Signature::now("t", "t@example.invalid").unwrap();
        let head = repo.commit(Some("HEAD"), &sig, &sig, "c", &repo.find_tree(tree).unwrap(), &[]).unwrap();
        (repo, tree, head.to_string())
    }

    fn files_under(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() { files_under(&e.path()) } else { 1 }
            })
            .sum()
    }

    /// Whether the work tree is its commit is remembered under git's index file, HEAD and
    /// the files' `stat`s: while all three are the same the index is not read and the
    /// remembered answer stands; a file whose `stat` moved brings the index back.
    #[test]
    fn the_work_tree_answer_is_remembered_while_index_head_and_stats_stay() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let (repo, _, head) = committed(root);
        let stats = || -> Vec<(String, FileStat)> {
            ["dotmac.toml", "tenants/t1/tenant.yaml"]
                .iter()
                .map(|p| (p.to_string(), FileStat::of(&std::fs::symlink_metadata(root.join(p)).unwrap())))
                .collect()
        };
        let text = |p: &str| std::fs::read_to_string(root.join(p)).ok().map(std::borrow::Cow::Owned);
        let memo = root.join(".dotmac/cache/git-clean");
        let staged = root.join(".dotmac/cache/git-staged");
        // As if read well after the files were written (nothing is racy).
        let later = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i128
            + 10 * RACY_NS;
        let ask = |started_ns: i128| {
            let i = worktree_index(root, || Some(memo.clone())).unwrap();
            let read = i.was_read();
            (read, i.commit_if_clean(&stats(), text, Some(&staged), Some((&memo, started_ns))))
        };

        // A file changed just before the read: answered, not remembered.
        assert_eq!(ask(0), (true, Some(head.clone())));
        assert!(!memo.exists());
        assert_eq!(ask(later), (true, Some(head.clone())));
        assert!(memo.exists());
        assert_eq!(ask(later), (false, Some(head.clone())), "the index is not read again");

        // What is remembered is what is answered (shown by a doctored answer).
        let kept = std::fs::read_to_string(&memo).unwrap();
        std::fs::write(&memo, kept.replace(&format!("{head}\n"), "-\n")).unwrap();
        assert_eq!(ask(later), (false, None));

        // A file's `stat` moved: the index is read after all, and the new answer kept.
        std::fs::write(root.join("tenants/t1/tenant.yaml"), "id: t1\nname: x\n").unwrap();
        assert_eq!(ask(later), (false, None), "modified, not the commit");
        std::fs::write(root.join("tenants/t1/tenant.yaml"), "id: t1\n").unwrap();
        assert_eq!(ask(later), (false, Some(head.clone())), "the same content again: git's content check");
        assert_eq!(ask(later), (false, Some(head.clone())));

        // The index written again (a stage): its `stat` moved, and it is read.
        let mut index = repo.index().unwrap();
        index.add_path(Path::new("tenants/t1/tenant.yaml")).unwrap();
        index.write().unwrap();
        assert!(ask(later).0, "a new index is read");
    }
}
