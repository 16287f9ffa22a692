//! `kind = "local"`: the embedded default. A real store on disk, not a test double.
//!
//! ```text
//! .dotmac/live/<provider>/<NN>.live   the resources of the tenants whose name hashes to NN
//!                                     (00 … 3f; provider: management, isp, kubernetes, secrets)
//! .dotmac/live/<provider>/.index      a cache of what each shard holds (index.rs)
//! .dotmac/secrets.key                 the key (mode 0600), unless key_env is set
//! ```
//!
//! A shard file is text a person can read and edit (`shard.rs` shows the format): one entry
//! per resource, sorted by address. JSON content (management records and licenses,
//! Kubernetes manifests) is written as YAML, texts (the ISP configuration, OpenBao policies)
//! verbatim, a secret as its record: metadata in clear, every version AES-256-GCM. An
//! out-of-band edit of an entry is drift; a YAML body a person broke is still live content
//! (it shows as drift, and apply heals it). `shard_path` names a tenant's file.
//!
//! **Why shards.** The first layout kept one file per resource, written through a temp file
//! and a rename. Creating files is what costs: 10,000 tenants are about 100,000 resources,
//! creating 10,000 small files alone took 0.7–1 s on the 2-core test machine, and a cold
//! apply of 1,000 tenants 5–7 s (its ext4 has no journal, and after some churn every inode
//! creation spends most of its time in `recently_deleted`). Hashing tenants into 64 shards per
//! provider bounds the folder at 64 files, whatever the size of the fleet.
//!
//! **Reads.** The store keeps an image of each shard in memory, loaded when first needed:
//! from the index when the file's `stat` matches it (and the file is older than the index:
//! git's racily clean rule), otherwise by reading the file, where entries whose bytes hash as
//! the index remembers keep their fingerprint and only the others are parsed. `list` costs one
//! `stat` per shard in scope and returns fingerprints (secrets: their metadata); `fetch` reads
//! content from the shard's bytes by range, checking the entry's hash. A clean image whose
//! file changed (a person's edit, another process) is read again by the next `list`, `fetch`
//! or `reveal`, so a long-running process sees edits made beside it.
//!
//! **Writes.** `put` and `delete` check the expectation against the image and change the
//! image: no file is read or written. `flush` writes every changed shard once — a temp file
//! (unchanged entries copied byte for byte from the old file), `fsync`, a rename over the
//! shard — shards in parallel, then one `fsync` of the folder, then the index. `close` and
//! dropping the store flush too. If a shard file changed on disk while its image held
//! unflushed writes, `flush` merges: the file's entries with this store's changes on top; a
//! change to an entry that someone else changed meanwhile is not written, and `flush`
//! reports the conflict.
//!
//! **Crashes.** Writes not yet flushed are lost with the process, and that is correct: apply
//! journals every write in the state store before the first one and clears the journal only
//! after `flush` returned, and the next plan takes a journaled address that live lost as
//! unfinished work and applies it again (`src/apply`, `src/plan`). A crash during `flush`
//! leaves each shard file old or new, never half written.

mod index;
mod migrate;
mod shard;

use super::secret_value::SecretValue;
use super::{Expect, LiveResource, Provider, ProviderError, Result, TenantScope};
use crate::fingerprint::{self, Fingerprint};
use crate::load::settings::ProviderSettings;
use crate::load::yaml;
use crate::model::{Address, Content, ProviderId, Resource, ResourceKind, SecretMeta};
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use index::Stamp;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

pub use shard::{SHARDS, shard_of};

/// The shard file holding `tenant`'s resources of `provider`, for a state folder (`.dotmac`).
pub fn shard_path(state_dir: &Path, provider: ProviderId, tenant: &str) -> PathBuf {
    state_dir.join("live").join(provider.as_str()).join(shard::file_name(shard_of(tenant)))
}

pub struct LocalStore {
    id: ProviderId,
    dir: PathBuf,
    /// Secrets only: the encryption key.
    cipher: Option<Aes256Gcm>,
    /// The image of each shard; `None` until first needed.
    shards: Vec<Mutex<Option<Shard>>>,
    /// Set once the folder was opened: an old layout migrated, the index loaded.
    ready: OnceLock<()>,
    /// The index as loaded (if any): a shard with no image yet is made from it when first
    /// needed, and a `list` of an unchanged shard reads it without making one.
    index: OnceLock<Option<index::Loaded>>,
    opening: Mutex<()>,
    /// The images hold something the index file does not (a shard read or written).
    index_stale: AtomicBool,
}

/// What the store knows of one shard file.
struct Shard {
    /// The file's `stat` when it was last read or written; `None`: no file.
    stamp: Option<Stamp>,
    /// `stamp` can be trusted to tell a change: the file is older than an index written after
    /// it was read (git's racily clean rule). An untrusted image is read again when checked.
    trusted: bool,
    /// The file's bytes, once read.
    bytes: Option<Vec<u8>>,
    /// The entries' ranges come from splitting `bytes` (not from the index).
    split: bool,
    /// By address text, which is the order in the file.
    entries: BTreeMap<String, Entry>,
    /// Entries put or deleted since the file was read or written, with what they replaced (for
    /// merging with an edit made on disk meanwhile). Not empty: the image is dirty. Hashed:
    /// it is looked up on every put and read in order only by a merge, which is rare.
    changed: FxHashMap<String, Option<Base>>,
    /// The image began with no file: every entry in it was put by this store over nothing,
    /// so `changed` holds only deletes. (A first apply puts 130,000 entries in such images;
    /// each copied its key into `changed` as well.)
    born: bool,
}

/// An entry before this store changed it.
struct Base {
    hash: [u8; 32],
    fingerprint: Fingerprint,
}

struct Entry {
    address: Address,
    fingerprint: Fingerprint,
    /// Secrets: the record's metadata.
    meta: Option<SecretMeta>,
    /// SHA-256 of the entry's bytes as framed (header line included).
    hash: [u8; 32],
    body: Body,
}

enum Body {
    /// Bytes `range` of the shard file.
    File(Range<usize>),
    /// Not written yet: the framed entry.
    New(Vec<u8>),
}

impl Shard {
    /// Whether any entry is the tenant's (its address starts with `tenant/`): one range
    /// lookup. `buf` is scratch space.
    fn holds_tenant(&self, tenant: &str, buf: &mut String) -> bool {
        buf.clear();
        buf.push_str(tenant);
        buf.push('/');
        let from = std::ops::Bound::Included(buf.as_str());
        self.entries
            .range::<str, _>((from, std::ops::Bound::Unbounded))
            .next()
            .is_some_and(|(k, _)| k.starts_with(buf.as_str()))
    }

    fn absent() -> Shard {
        Shard {
            stamp: None,
            trusted: true,
            bytes: None,
            split: true,
            entries: BTreeMap::new(),
            changed: FxHashMap::default(),
            born: true,
        }
    }

    fn dirty(&self) -> bool {
        !self.changed.is_empty() || (self.born && !self.entries.is_empty())
    }

    /// What this store changed, in address order, with what each change replaced.
    fn take_changes(&mut self) -> Vec<(String, Option<Base>)> {
        let mut changed: Vec<(String, Option<Base>)> = std::mem::take(&mut self.changed).into_iter().collect();
        if std::mem::take(&mut self.born) {
            changed.extend(self.entries.keys().map(|k| (k.clone(), None)));
        }
        changed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        changed
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn io_error(path: &Path, e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Other(format!("{}: {e}", path.display()))
}

/// Why no entry can hold this address, if none can: every part must read back from the
/// address text, and the text must fit on a header line.
fn address_problem(a: &Address) -> Option<&'static str> {
    // Asked for every address a store reads or writes: ASCII (nearly every one) byte by
    // byte, where whitespace and control characters are the bytes up to the space, and DEL.
    let bad = |c: char| c.is_whitespace() || c.is_control() || matches!(c, '/' | '\\' | '[' | ']');
    let plain = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && if s.is_ascii() {
                !s.bytes().any(|b| b <= b' ' || b == 0x7f || matches!(b, b'/' | b'\\' | b'[' | b']'))
            } else {
                !s.chars().any(bad)
            }
    };
    if !plain(&a.tenant) || a.tenant.starts_with('.') {
        return Some("the tenant cannot be stored");
    }
    let name = a.name.as_deref();
    let ok = match &a.kind {
        ResourceKind::ManagementTenant | ResourceKind::IspConfig => name.is_none(),
        ResourceKind::ManagementLicense | ResourceKind::OpenbaoPolicy => name.is_some_and(plain),
        ResourceKind::Kubernetes(k) => {
            k.chars().all(|c| c.is_ascii_alphanumeric()) && !k.is_empty() && name.is_some_and(plain)
        }
        ResourceKind::OpenbaoSecret => name.is_some_and(|n| crate::validate::checks::secret_name_problem(n).is_none()),
    };
    (!ok).then_some("the name cannot be stored")
}

/// The content an entry's text stands for.
fn decode(address: &Address, text: String) -> std::result::Result<Content, String> {
    Ok(match &address.kind {
        ResourceKind::IspConfig | ResourceKind::OpenbaoPolicy => Content::Text(text),
        ResourceKind::OpenbaoSecret => Content::SecretMeta(parse_record(&text)?.meta()),
        // A body a person broke is still live content: it shows as drift.
        _ => match yaml::parse_documents(&text) {
            Ok(mut docs) if docs.len() == 1 => Content::Json(docs.remove(0).value),
            _ => Content::Text(text),
        },
    })
}

fn parse_record(text: &str) -> std::result::Result<SecretRecord, String> {
    serde_json::from_str(text).map_err(|e| format!("not a secret record: {e}"))
}

impl LocalStore {
    pub fn open(state_dir: &Path, id: ProviderId, secrets: &ProviderSettings) -> anyhow::Result<LocalStore> {
        let dir = state_dir.join("live").join(id.as_str());
        let cipher = if id == ProviderId::Secrets {
            Some(
                Aes256Gcm::new_from_slice(&load_key(state_dir, secrets.str("key_env"))?)
                    .map_err(|_| anyhow::anyhow!("bad key length"))?,
            )
        } else {
            None
        };
        Ok(LocalStore {
            id,
            dir,
            cipher,
            shards: (0..SHARDS).map(|_| Mutex::new(None)).collect(),
            ready: OnceLock::new(),
            index: OnceLock::new(),
            opening: Mutex::new(()),
            index_stale: AtomicBool::new(false),
        })
    }

    fn path_of(&self, n: usize) -> PathBuf {
        self.dir.join(shard::file_name(n))
    }

    fn lock(&self, n: usize) -> MutexGuard<'_, Option<Shard>> {
        self.shards[n].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens the folder, once: migrates an old layout, loads the index.
    fn ready(&self) -> Result<()> {
        if self.ready.get().is_some() {
            return Ok(());
        }
        let _opening = self.opening.lock().unwrap_or_else(|p| p.into_inner());
        if self.ready.get().is_some() {
            return Ok(());
        }
        self.index.get_or_init(|| index::load(&self.dir));
        migrate::run(self)?;
        let _ = self.ready.set(());
        Ok(())
    }

    /// The index as loaded when the folder was opened.
    fn index(&self) -> Option<&index::Loaded> {
        self.index.get().and_then(Option::as_ref)
    }

    /// Shard `n`, locked; an image not made yet is made from the index if it describes the
    /// shard (a shard whose entries do not parse stays without one).
    fn slot(&self, n: usize) -> MutexGuard<'_, Option<Shard>> {
        let mut slot = self.lock(n);
        if slot.is_none()
            && let Some(idx) = self.index()
            && let Some(cs) = idx.shard(n)
        {
            let mut entries = BTreeMap::new();
            for e in cs.entries {
                let Some(address) = Address::parse(&e.address) else { continue };
                let entry = Entry {
                    address,
                    fingerprint: e.fingerprint,
                    meta: e.meta,
                    hash: e.hash,
                    body: Body::File(e.start..e.end),
                };
                entries.insert(e.address, entry);
            }
            *slot = Some(Shard {
                stamp: Some(cs.stamp),
                trusted: cs.stamp.nanos() < idx.written,
                bytes: None,
                split: false,
                entries,
                changed: FxHashMap::default(),
                born: false,
            });
        }
        slot
    }

    /// Appends shard `n`'s resources in `scope` read straight from the index, if the shard
    /// has no image yet and its file is as the index describes it (same `stat`, older than
    /// the index): the common case of a plan, which then makes no image at all. `false`:
    /// nothing was appended, ask the image.
    fn list_from_index(&self, n: usize, scope: &TenantScope, out: &mut Vec<LiveResource>) -> Result<bool> {
        let slot = self.lock(n);
        let Some(idx) = self.index().filter(|_| slot.is_none()) else { return Ok(false) };
        let Some(stamp) = idx.stamp(n).filter(|s| s.nanos() < idx.written) else { return Ok(false) };
        if self.stat(n)? != Some(stamp) {
            return Ok(false);
        }
        let before = out.len();
        let mut whole = true;
        let decoded = idx.visit(n, |e| {
            let Some(tenant) = e.address.split_once('/').map(|(t, _)| t) else {
                whole = false;
                return;
            };
            if !scope.contains(tenant) {
                return;
            }
            match Address::parse(e.address) {
                Some(address) => out.push(LiveResource {
                    fingerprint: e.fingerprint,
                    address,
                    content: e.meta.map(|m| Box::new(Content::SecretMeta(m))),
                }),
                None => whole = false,
            }
        });
        drop(slot);
        if !(decoded && whole) {
            out.truncate(before);
            return Ok(false);
        }
        Ok(true)
    }

    /// The `stat` of shard `n`'s file now (`None`: absent).
    fn stat(&self, n: usize) -> Result<Option<Stamp>> {
        let path = self.path_of(n);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(Stamp::of(&m))),
            Ok(_) => Err(io_error(&path, "not a regular file")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(&path, e)),
        }
    }

    /// Shard `n`, loaded if it was not yet (for writes: the image is what they check).
    fn loaded(&self, n: usize) -> Result<MutexGuard<'_, Option<Shard>>> {
        self.ready()?;
        let mut slot = self.slot(n);
        if slot.is_none() {
            let now = self.stat(n)?;
            self.refresh(n, &mut slot, now)?;
        }
        Ok(slot)
    }

    /// Shard `n`, read again first if its file changed since (for reads).
    /// Addresses grouped by the shard that holds them, in shard order.
    fn by_shard<'a>(&self, addresses: &'a [Address]) -> Result<BTreeMap<usize, Vec<&'a Address>>> {
        let mut by_shard: BTreeMap<usize, Vec<&Address>> = BTreeMap::new();
        for a in addresses {
            by_shard.entry(self.home(a)?).or_default().push(a);
        }
        Ok(by_shard)
    }

    fn current(&self, n: usize) -> Result<MutexGuard<'_, Option<Shard>>> {
        self.ready()?;
        let mut slot = self.slot(n);
        if slot.as_ref().is_some_and(Shard::dirty) {
            // Left alone, as `refresh` would: no need to look at the file.
            return Ok(slot);
        }
        let now = self.stat(n)?;
        self.refresh(n, &mut slot, now)?;
        Ok(slot)
    }

    /// Brings a clean image up to date with the file, whose `stat` is `now`. A dirty image is
    /// left alone: its file is rewritten (merged) by the next flush.
    fn refresh(&self, n: usize, slot: &mut Option<Shard>, now: Option<Stamp>) -> Result<()> {
        if let Some(s) = slot.as_ref()
            && (s.dirty() || (s.stamp == now && (s.trusted || now.is_none())))
        {
            return Ok(());
        }
        let fresh = match now {
            None => Shard::absent(),
            Some(_) => self.read_shard(n, slot.as_ref())?,
        };
        // A shard with no file, now as before, changes nothing the index holds.
        let had_file =
            slot.as_ref().is_some_and(|s| s.stamp.is_some()) || self.index().and_then(|i| i.stamp(n)).is_some();
        if now.is_some() || had_file {
            self.index_stale.store(true, Ordering::Relaxed);
        }
        *slot = Some(fresh);
        Ok(())
    }

    /// Reads and splits shard `n`'s file; entries whose bytes hash as in `old` keep its
    /// fingerprint, the others are parsed.
    fn read_shard(&self, n: usize, old: Option<&Shard>) -> Result<Shard> {
        let path = self.path_of(n);
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Shard::absent()),
            Err(e) => return Err(io_error(&path, e)),
        };
        let m = f.metadata().map_err(|e| io_error(&path, e))?;
        let mut bytes = Vec::with_capacity(m.len() as usize);
        f.read_to_end(&mut bytes).map_err(|e| io_error(&path, e))?;
        self.parse(n, bytes, Stamp::of(&m), old)
    }

    fn parse(&self, n: usize, bytes: Vec<u8>, stamp: Stamp, old: Option<&Shard>) -> Result<Shard> {
        let path = self.path_of(n);
        let at = |line: usize, msg: &str| ProviderError::Other(format!("{}:{line}: {msg}", path.display()));
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            let line = bytes[..e.valid_up_to()].iter().filter(|b| **b == b'\n').count() + 1;
            at(line, "not UTF-8 text")
        })?;
        let raws = shard::split(text).map_err(|(line, msg)| at(line, &msg))?;
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        let mut lines: BTreeMap<&str, usize> = BTreeMap::new();
        for raw in raws {
            let address = self.address_in(n, raw.address).map_err(|msg| at(raw.line, &msg))?;
            if let Some(first) = lines.insert(raw.address, raw.line) {
                return Err(at(
                    raw.line,
                    &format!("a second entry for {} (the first is on line {first})", raw.address),
                ));
            }
            let framed = &text[raw.start..raw.end];
            let hash = digest(framed.as_bytes());
            let known = old.and_then(|o| o.entries.get(raw.address)).filter(|e| e.hash == hash);
            let (fingerprint, meta) = match known {
                Some(e) => (e.fingerprint.clone(), e.meta.clone()),
                None => {
                    let (_, body) = shard::unframe(framed).ok_or_else(|| at(raw.line, "not an entry"))?;
                    let content =
                        decode(&address, body).map_err(|msg| at(raw.line, &format!("{}: {msg}", raw.address)))?;
                    let meta = match &content {
                        Content::SecretMeta(m) => Some(m.clone()),
                        _ => None,
                    };
                    (fingerprint::of(&content), meta)
                }
            };
            let entry = Entry { address, fingerprint, meta, hash, body: Body::File(raw.start..raw.end) };
            entries.insert(raw.address.to_owned(), entry);
        }
        Ok(Shard {
            stamp: Some(stamp),
            trusted: false,
            bytes: Some(bytes),
            split: true,
            entries,
            changed: FxHashMap::default(),
            born: false,
        })
    }

    /// The address a header names, if it can live in shard `n` of this store.
    fn address_in(&self, n: usize, text: &str) -> std::result::Result<Address, String> {
        let a = Address::parse(text)
            .filter(|a| a.to_string() == text && address_problem(a).is_none())
            .ok_or_else(|| format!("`{text}` is not an address"))?;
        if a.provider() != self.id {
            return Err(format!("{text} belongs to the {} store, not {}", a.provider(), self.id));
        }
        let home = shard_of(&a.tenant);
        if home != n {
            return Err(format!("tenant {} belongs in {}, not here", a.tenant, shard::file_name(home)));
        }
        Ok(a)
    }

    /// Reads the file's bytes into a clean image that has none; an image whose file moved
    /// meanwhile is replaced by what the file holds now.
    fn load_bytes(&self, n: usize, s: &mut Shard) -> Result<()> {
        if s.bytes.is_some() || s.stamp.is_none() {
            return Ok(());
        }
        let path = self.path_of(n);
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                *s = Shard::absent();
                self.index_stale.store(true, Ordering::Relaxed);
                return Ok(());
            }
            Err(e) => return Err(io_error(&path, e)),
        };
        let m = f.metadata().map_err(|e| io_error(&path, e))?;
        let mut bytes = Vec::with_capacity(m.len() as usize);
        f.read_to_end(&mut bytes).map_err(|e| io_error(&path, e))?;
        if s.stamp == Some(Stamp::of(&m)) && s.trusted {
            s.bytes = Some(bytes);
        } else {
            *s = self.parse(n, bytes, Stamp::of(&m), Some(s))?;
            self.index_stale.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Makes the ranges of a clean image come from splitting the file's bytes, so that they
    /// can be copied into a new file (the index's ranges are checked only one at a time).
    fn split_bytes(&self, n: usize, s: &mut Shard) -> Result<()> {
        self.load_bytes(n, s)?;
        if !s.split {
            let (Some(bytes), Some(stamp)) = (s.bytes.take(), s.stamp) else { return Ok(()) };
            let trusted = s.trusted;
            *s = self.parse(n, bytes, stamp, Some(s))?;
            s.trusted = trusted;
        }
        Ok(())
    }

    /// The content text of an entry (`None`: no such entry).
    fn entry_text(&self, n: usize, s: &mut Shard, key: &str) -> Result<Option<String>> {
        for attempt in 0..2 {
            let Some(e) = s.entries.get(key) else { return Ok(None) };
            if let Body::New(framed) = &e.body {
                let text = std::str::from_utf8(framed).ok().and_then(shard::unframe).map(|(_, t)| t);
                return text.map(Some).ok_or_else(|| ProviderError::Other(format!("{key}: a bad entry in memory")));
            }
            self.load_bytes(n, s)?;
            let Some(e) = s.entries.get(key) else { return Ok(None) };
            if let (Body::File(r), Some(bytes)) = (&e.body, &s.bytes)
                && let Some(framed) = bytes.get(r.clone())
                && digest(framed) == e.hash
                && let Ok(framed) = std::str::from_utf8(framed)
                && let Some((address, text)) = shard::unframe(framed)
                && address == key
            {
                return Ok(Some(text));
            }
            if attempt == 0 && !s.split {
                // The index does not describe the file (an edit that kept its `stat`).
                let (bytes, stamp) = (s.bytes.take().unwrap_or_default(), s.stamp.unwrap_or(Stamp::ZERO));
                *s = self.parse(n, bytes, stamp, None)?;
                self.index_stale.store(true, Ordering::Relaxed);
            }
        }
        Err(ProviderError::Other(format!("{}: the entry for {key} is not where it was", self.path_of(n).display())))
    }

    fn check(&self, s: &Shard, a: &Address, key: &str, expect: &Expect) -> Result<()> {
        expect.check(a, s.entries.get(key).map(|e| &e.fingerprint))
    }

    /// Readies a shard for a change: a clean image gets the file's bytes, split (a flush
    /// copies unchanged entries from them).
    fn prepare(&self, n: usize, s: &mut Shard) -> Result<()> {
        if !s.dirty() {
            self.split_bytes(n, s)?;
        }
        Ok(())
    }

    /// Changes the image: `key` now holds the framed entry (`shard::framed`, with this
    /// fingerprint and metadata), or nothing.
    fn set(&self, s: &mut Shard, a: &Address, key: String, new: Option<(Vec<u8>, Fingerprint, Option<SecretMeta>)>) {
        let base_of = |e: &Entry| Some(Base { hash: e.hash, fingerprint: e.fingerprint.clone() });
        match new {
            Some((framed, fingerprint, meta)) => {
                let entry =
                    Entry { address: a.clone(), fingerprint, meta, hash: digest(&framed), body: Body::New(framed) };
                if s.born {
                    // Over nothing, as every entry of the image: nothing to note.
                    s.entries.insert(key, entry);
                    return;
                }
                // One search of the entries: the insert hands back what it replaced.
                let old = s.entries.insert(key.clone(), entry);
                s.changed.entry(key).or_insert_with(|| old.as_ref().and_then(base_of));
            }
            None => {
                if let Some(old) = s.entries.remove(&key) {
                    let base = if s.born { None } else { base_of(&old) };
                    s.changed.entry(key).or_insert(base);
                }
            }
        }
    }

    fn cipher(&self) -> Result<&Aes256Gcm> {
        self.cipher.as_ref().ok_or_else(|| ProviderError::Other("not a secrets store".into()))
    }

    fn aad(a: &Address, version: u64) -> String {
        format!("dotmac-gitops/v1/{}/{}/{version}", a.tenant, a.name.as_deref().unwrap_or_default())
    }

    /// A secret's record (`None`: no such secret).
    fn record(&self, n: usize, s: &mut Shard, key: &str) -> Result<Option<SecretRecord>> {
        match self.entry_text(n, s, key)? {
            None => Ok(None),
            Some(text) => parse_record(&text)
                .map(Some)
                .map_err(|e| ProviderError::Other(format!("{}: {key}: {e}", self.path_of(n).display()))),
        }
    }

    fn put_record(&self, s: &mut Shard, a: &Address, key: String, rec: &SecretRecord) -> Result<LiveResource> {
        let mut text = serde_json::to_string_pretty(rec).map_err(ProviderError::other)?;
        text.push('\n');
        let meta = rec.meta();
        let content = Content::SecretMeta(meta.clone());
        let fp = fingerprint::of(&content);
        let framed = shard::framed(&key, &text);
        self.set(s, a, key, Some((framed, fp.clone(), Some(meta))));
        Ok(LiveResource { address: a.clone(), fingerprint: fp, content: Some(Box::new(content)) })
    }

    /// Adds a version to a secret (creating it).
    fn write_secret_version(
        &self,
        n: usize,
        s: &mut Shard,
        a: &Address,
        v: NewVersion<'_>,
        expect: &Expect,
    ) -> Result<LiveResource> {
        let NewVersion { value, placeholder, written } = v;
        let key = a.text();
        self.prepare(n, s)?;
        self.check(s, a, &key, expect)?;
        let mut rec = self.record(n, s, &key)?.unwrap_or_default();
        let now = jiff::Timestamp::now().to_string();
        let version = rec.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
        let mut nonce = [0u8; 12];
        crate::providers::secret_value::random_fill(&mut nonce).map_err(ProviderError::other)?;
        let aad = Self::aad(a, version);
        let ciphertext = self
            .cipher()?
            .encrypt(&Nonce::from(nonce), Payload { msg: value, aad: aad.as_bytes() })
            .map_err(|_| ProviderError::Other(format!("{a}: encryption failed")))?;
        if rec.created.is_empty() {
            rec.created = now.clone();
        }
        rec.current_version = version;
        rec.updated = written.unwrap_or_else(|| now.clone());
        rec.deleted = false;
        rec.placeholder = placeholder;
        rec.versions.push(StoredVersion { version, created: now, nonce: hex(&nonce), ciphertext: hex(&ciphertext) });
        self.put_record(s, a, key, &rec)
    }

    /// Decrypts a version (only inside the store: for restoring it).
    fn read_version(&self, a: &Address, rec: &SecretRecord, version: u64) -> Result<SecretValue> {
        let v = rec
            .versions
            .iter()
            .find(|v| v.version == version)
            .ok_or_else(|| ProviderError::Other(format!("{a}: version {version} does not exist")))?;
        let nonce: [u8; 12] = unhex(&v.nonce)
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| ProviderError::Other(format!("{a}: bad nonce")))?;
        let ct = unhex(&v.ciphertext).ok_or_else(|| ProviderError::Other(format!("{a}: bad ciphertext")))?;
        let aad = Self::aad(a, version);
        let plain = self
            .cipher()?
            .decrypt(&Nonce::from(nonce), Payload { msg: &ct, aad: aad.as_bytes() })
            .map_err(|_| ProviderError::Other(format!("{a}: version {version} cannot be decrypted with this key")))?;
        Ok(SecretValue::from_bytes(plain))
    }

    /// Refuses an address no entry of this store can hold.
    fn home(&self, a: &Address) -> Result<usize> {
        if a.provider() != self.id {
            return Err(ProviderError::Other(format!("{a} does not belong to the {} store", self.id)));
        }
        if let Some(problem) = address_problem(a) {
            return Err(ProviderError::Other(format!("{a}: {problem} in a local store")));
        }
        Ok(shard_of(&a.tenant))
    }

    /// Puts a value for a secret a person owns (an external secret), as `secret put` does.
    /// Like every write, it is made durable by `flush` (or `close`).
    pub fn put_external(&self, a: &Address, value: &SecretValue) -> Result<LiveResource> {
        let n = self.home(a)?;
        let mut slot = self.loaded(n)?;
        let s = slot.get_or_insert_with(Shard::absent);
        let v = NewVersion { value: value.expose(), placeholder: false, written: None };
        self.write_secret_version(n, s, a, v, &Expect::Any)
    }

    /// The value of a secret's current version. Used only to deliver a secret where it is
    /// needed, and by tests that check values never leak.
    pub fn reveal(&self, a: &Address) -> Result<Option<SecretValue>> {
        let n = self.home(a)?;
        let mut slot = self.current(n)?;
        let s = slot.get_or_insert_with(Shard::absent);
        let Some(rec) = self.record(n, s, &a.text())? else { return Ok(None) };
        if rec.deleted {
            return Ok(None);
        }
        self.read_version(a, &rec, rec.current_version).map(Some)
    }

    /// Writes every changed shard (see the module comment) and the index.
    fn write_out(&self) -> Result<()> {
        let dirty: Vec<usize> = (0..SHARDS).filter(|n| self.lock(*n).as_ref().is_some_and(Shard::dirty)).collect();
        let mut problems: Vec<ProviderError> = Vec::new();
        if !dirty.is_empty() {
            std::fs::create_dir_all(&self.dir).map_err(|e| io_error(&self.dir, e))?;
            // Threads beyond the cores: the time goes to waiting for fsync.
            let next = AtomicU64::new(0);
            let results = Mutex::new(Vec::new());
            let spent = Mutex::new(Vec::new());
            std::thread::scope(|scope| {
                for _ in 0..dirty.len().min(8) {
                    scope.spawn(|| {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                            let Some(&n) = dirty.get(i) else { break };
                            let r = self.write_shard(n, &spent);
                            results.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                        }
                    });
                }
            });
            // The written entries' bytes (a first apply's 130,000 small buffers, made by the
            // apply's threads) are freed on a thread of their own, not on the path to the end
            // of the flush.
            let spent = spent.into_inner().unwrap_or_else(|p| p.into_inner());
            if !spent.is_empty() {
                crate::engine::drop_later(spent);
            }
            for r in results.into_inner().unwrap_or_else(|p| p.into_inner()) {
                if let Err(e) = r {
                    problems.push(e);
                }
            }
            // The renames are durable once the folder is.
            if let Err(e) = std::fs::File::open(&self.dir).and_then(|d| d.sync_all()) {
                problems.push(io_error(&self.dir, e));
            }
            self.index_stale.store(true, Ordering::Relaxed);
        }
        self.save_index();
        match problems.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Writes one dirty shard: temp file, fsync, rename. The file is streamed from the
    /// entries (unchanged ones straight from the old file's bytes); the image then drops the
    /// bytes and keeps the new ranges, and reads the file again if content is asked for.
    /// The framed bytes of the entries written are handed to `spent`.
    fn write_shard(&self, n: usize, spent: &Mutex<Vec<Vec<u8>>>) -> Result<()> {
        let mut slot = self.lock(n);
        let Some(s) = slot.as_mut().filter(|s| s.dirty()) else { return Ok(()) };
        let path = self.path_of(n);
        let conflict = if self.stat(n)? != s.stamp { self.merge(n, s)? } else { None };
        if !s.dirty() {
            // Nothing of ours left to write (someone else's change won).
            return conflict.map_or(Ok(()), Err);
        }
        if s.entries.is_empty() {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&path, e)),
            }
            *s = Shard::absent();
            return conflict.map_or(Ok(()), Err);
        }
        let old = s.bytes.as_deref().unwrap_or_default();
        let mut ranges: Vec<(Range<usize>, Option<[u8; 32]>)> = Vec::with_capacity(s.entries.len());
        let write = |w: &mut dyn Write| -> std::io::Result<()> {
            let preamble = shard::preamble(self.id, n);
            w.write_all(preamble.as_bytes())?;
            let mut pos = preamble.len();
            for e in s.entries.values() {
                let chunk = match &e.body {
                    Body::File(r) => &old[r.clone()],
                    Body::New(framed) => framed.as_slice(),
                };
                w.write_all(chunk)?;
                let start = pos;
                pos += chunk.len();
                let mut rehash = None;
                if !chunk.ends_with(b"\n") {
                    // The last entry of a file whose final newline an editor removed.
                    w.write_all(b"\n")?;
                    pos += 1;
                    rehash = Some(Sha256::new().chain_update(chunk).chain_update(b"\n").finalize().into());
                }
                ranges.push((start..pos, rehash));
            }
            Ok(())
        };
        // On failure the image keeps its changes: the next flush tries again.
        let stamp = write_durably(&self.dir, &path, write)?;
        let mut bodies = Vec::new();
        for (e, (range, rehash)) in s.entries.values_mut().zip(ranges) {
            if let Body::New(framed) = std::mem::replace(&mut e.body, Body::File(range)) {
                bodies.push(framed);
            }
            if let Some(h) = rehash {
                e.hash = h;
            }
        }
        s.stamp = Some(stamp);
        s.bytes = None;
        s.split = true;
        s.trusted = false;
        s.changed.clear();
        s.born = false;
        spent.lock().unwrap_or_else(|p| p.into_inner()).append(&mut bodies);
        conflict.map_or(Ok(()), Err)
    }

    /// The file of a dirty shard changed on disk: take its entries, with this store's
    /// changes on top. A change to an entry that someone else also changed is dropped, and
    /// returned as a conflict.
    fn merge(&self, n: usize, s: &mut Shard) -> Result<Option<ProviderError>> {
        let mut disk = self.read_shard(n, Some(s))?;
        let mut conflict = None;
        // In address order, so that the conflict reported is the same whatever the hashing.
        for (key, base) in s.take_changes() {
            let now = disk.entries.get(&key).map(|e| (e.hash, e.fingerprint.clone()));
            if now.as_ref().map(|n| n.0) != base.as_ref().map(|b| b.hash) {
                tracing::warn!(address = %key, file = %self.path_of(n).display(), "changed on disk while being written; the other change is kept");
                conflict.get_or_insert(ProviderError::Conflict {
                    address: key,
                    expected: base.map_or_else(|| "nothing".into(), |b| b.fingerprint.to_string()),
                    found: now.map_or_else(|| "nothing".into(), |n| n.1.to_string()),
                });
                continue;
            }
            match s.entries.remove(&key) {
                Some(e) => disk.entries.insert(key.clone(), e),
                None => disk.entries.remove(&key),
            };
            disk.changed.insert(key, base);
        }
        tracing::info!(file = %self.path_of(n).display(), "changed on disk while this process held writes for it: merged");
        *s = disk;
        Ok(conflict)
    }

    /// Saves the index if the images hold something it does not (a cache: errors are ignored).
    fn save_index(&self) {
        if !self.index_stale.swap(false, Ordering::Relaxed) || !self.dir.is_dir() {
            return;
        }
        let mut w = match index::Writer::create(&self.dir) {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!(dir = %self.dir.display(), "cannot save the index: {e}");
                return;
            }
        };
        let mut saved: Vec<(usize, Stamp)> = Vec::new();
        for n in 0..SHARDS {
            let slot = self.lock(n);
            let Some(s) = slot.as_ref() else {
                // Never needed an image: the index's part stands as it was.
                if let Some(idx) = self.index() {
                    w.copy(idx, n);
                }
                continue;
            };
            let Some(stamp) = s.stamp.filter(|_| !s.dirty()) else { continue };
            let entries = s.entries.iter().filter_map(|(key, e)| match &e.body {
                Body::File(r) => Some(index::Cached {
                    address: key,
                    start: r.start,
                    end: r.end,
                    hash: &e.hash,
                    fingerprint: &e.fingerprint,
                    meta: e.meta.as_ref(),
                }),
                Body::New(_) => None,
            });
            w.shard(n, &stamp, entries.collect::<Vec<_>>().into_iter());
            saved.push((n, stamp));
        }
        match w.save() {
            Ok(written) => {
                for (n, stamp) in saved {
                    if let Some(s) = self.lock(n).as_mut()
                        && s.stamp == Some(stamp)
                        && stamp.nanos() < written
                    {
                        s.trusted = true;
                    }
                }
            }
            Err(e) => tracing::debug!(dir = %self.dir.display(), "cannot save the index: {e}"),
        }
    }
}

impl Provider for LocalStore {
    fn id(&self) -> ProviderId {
        self.id
    }

    fn describe(&self) -> String {
        format!("local store {}", self.dir.display())
    }

    fn list(&self, scope: &TenantScope) -> Result<Vec<LiveResource>> {
        self.ready()?;
        let shards: Vec<usize> = match scope {
            TenantScope::All => (0..SHARDS).collect(),
            TenantScope::Only(tenants) => {
                let mut v: Vec<usize> = tenants.iter().map(|t| shard_of(t)).collect();
                v.sort_unstable();
                v.dedup();
                v
            }
        };
        // One vector, sized from the index, filled shard after shard: the providers are
        // listed in parallel already, and per-shard vectors joined at the end cost a second
        // copy of everything.
        let mut out = Vec::with_capacity(shards.iter().map(|&n| self.index().map_or(0, |i| i.count(n))).sum());
        for n in shards {
            if self.list_from_index(n, scope, &mut out)? {
                continue;
            }
            let slot = self.current(n)?;
            let Some(s) = slot.as_ref() else { continue };
            out.extend(s.entries.values().filter(|e| scope.contains(e.address.tenant.as_str())).map(|e| {
                LiveResource {
                    address: e.address.clone(),
                    fingerprint: e.fingerprint.clone(),
                    content: e.meta.clone().map(|m| Box::new(Content::SecretMeta(m))),
                }
            }));
        }
        self.save_index();
        Ok(out)
    }

    fn fingerprints(&self, addresses: &[&Address]) -> Result<Vec<Option<Fingerprint>>> {
        self.ready()?;
        // The positions of the addresses, by shard: each shard is locked once.
        // Only the provider is checked: an address a put would refuse is in no image, and
        // is answered `None` like any other address not there. (Checking each address again
        // was a third of reading back a first apply's 130,000 writes.)
        let mut by_shard: Vec<(usize, usize)> = Vec::with_capacity(addresses.len());
        for (i, a) in addresses.iter().enumerate() {
            if a.provider() != self.id {
                return Err(ProviderError::Other(format!("{a} does not belong to the {} store", self.id)));
            }
            by_shard.push((shard_of(&a.tenant), i));
        }
        by_shard.sort_unstable();
        let mut out = vec![None; addresses.len()];
        let mut key = String::new();
        for run in by_shard.chunk_by(|a, b| a.0 == b.0) {
            let slot = self.current(run[0].0)?;
            let Some(s) = slot.as_ref() else { continue };
            for &(_, i) in run {
                addresses[i].write_text(&mut key);
                out[i] = s.entries.get(&key).map(|e| e.fingerprint.clone());
            }
        }
        Ok(out)
    }

    fn fetch(&self, addresses: &[Address]) -> Result<Vec<LiveResource>> {
        let by_shard = self.by_shard(addresses)?;
        let mut out = Vec::new();
        let mut key = String::new();
        for (n, wanted) in by_shard {
            let mut slot = self.current(n)?;
            let Some(s) = slot.as_mut() else { continue };
            // Whether the shard holds anything of the tenant, asked once per tenant: apply
            // fetches a tenant's resources before writing them, and a first apply's 130,000
            // lookups found nothing, each comparing a dozen addresses with a long common prefix.
            let mut tenant: Option<(&str, bool)> = None;
            for a in wanted {
                let has = match tenant {
                    Some((t, has)) if t == a.tenant.as_str() => has,
                    _ => s.holds_tenant(&a.tenant, &mut key),
                };
                tenant = Some((a.tenant.as_str(), has));
                if !has {
                    continue;
                }
                a.write_text(&mut key);
                let Some(e) = s.entries.get(&key) else { continue };
                let content = match &e.meta {
                    Some(m) => Content::SecretMeta(m.clone()),
                    None => {
                        let Some(text) = self.entry_text(n, s, &key)? else { continue };
                        decode(a, text).map_err(|msg| ProviderError::Other(format!("{key}: {msg}")))?
                    }
                };
                out.push(LiveResource {
                    address: a.clone(),
                    fingerprint: fingerprint::of(&content),
                    content: Some(Box::new(content)),
                });
            }
        }
        Ok(out)
    }

    fn put(&self, r: &Resource, secret: Option<&SecretValue>, expect: &Expect) -> Result<LiveResource> {
        let a = &r.address;
        tracing::trace!(address = %a, ?expect, secret = ?secret, "local put");
        let n = self.home(a)?;
        if let ResourceKind::OpenbaoSecret = a.kind {
            let mut slot = self.loaded(n)?;
            let s = slot.get_or_insert_with(Shard::absent);
            let value = secret.ok_or_else(|| ProviderError::Other(format!("{a}: no value to write")))?;
            let placeholder =
                matches!(&*r.content, Content::Secret(s) if matches!(s.source, crate::model::SecretSource::External));
            let v = NewVersion { value: value.expose(), placeholder, written: None };
            return self.write_secret_version(n, s, a, v, expect);
        }
        // The entry and its fingerprint are made before the shard is locked.
        let key = a.text();
        let framed = match &*r.content {
            Content::Text(t) => shard::framed(&key, t),
            Content::Json(v) => shard::framed_yaml(&key, v),
            other => return Err(ProviderError::Other(format!("{a}: cannot store {other:?} here"))),
        };
        let fp = r.fingerprint.clone().unwrap_or_else(|| fingerprint::of(&r.content));
        debug_assert_eq!(fp, fingerprint::of(&r.content), "{a}: the caller's fingerprint is the content's");
        let mut slot = self.loaded(n)?;
        let s = slot.get_or_insert_with(Shard::absent);
        self.prepare(n, s)?;
        self.check(s, a, &key, expect)?;
        self.set(s, a, key, Some((framed, fp.clone(), None)));
        // The content is the caller's already: it is not copied back.
        Ok(LiveResource { address: a.clone(), fingerprint: fp, content: None })
    }

    fn delete(&self, a: &Address, expect: &Expect, destroy: bool) -> Result<()> {
        tracing::trace!(address = %a, ?expect, destroy, "local delete");
        let n = self.home(a)?;
        let mut slot = self.loaded(n)?;
        let s = slot.get_or_insert_with(Shard::absent);
        let key = a.text();
        self.check(s, a, &key, expect)?;
        if !s.entries.contains_key(&key) {
            return Ok(());
        }
        self.prepare(n, s)?;
        self.check(s, a, &key, expect)?;
        if a.kind == ResourceKind::OpenbaoSecret && !destroy {
            // Soft delete: the versions stay, the current one is marked deleted.
            let Some(mut rec) = self.record(n, s, &key)? else { return Ok(()) };
            rec.deleted = true;
            rec.updated = jiff::Timestamp::now().to_string();
            self.put_record(s, a, key, &rec)?;
            return Ok(());
        }
        self.set(s, a, key, None);
        Ok(())
    }

    fn close(&self) {
        if let Err(e) = self.flush() {
            tracing::error!(store = %self.dir.display(), "could not write the local store: {e}");
        }
    }

    fn flush(&self) -> Result<()> {
        if self.ready.get().is_none() {
            return Ok(());
        }
        self.write_out()
    }

    fn durable_on_flush(&self) -> bool {
        true
    }

    fn discard(&self) {
        // A shard without an image is made again from its file (or the index) when needed.
        for n in 0..SHARDS {
            let mut slot = self.lock(n);
            if slot.as_ref().is_some_and(Shard::dirty) {
                *slot = None;
            }
        }
    }

    fn restore_secret(&self, a: &Address, version: u64) -> Result<LiveResource> {
        let n = self.home(a)?;
        let mut slot = self.loaded(n)?;
        let s = slot.get_or_insert_with(Shard::absent);
        let rec = self
            .record(n, s, &a.text())?
            .ok_or_else(|| ProviderError::Other(format!("{a}: no such secret to restore")))?;
        let value = self.read_version(a, &rec, version)?;
        // The restored value is as old as the version it comes from: its age, and so its
        // rotation, goes on from then.
        let written = rec.versions.iter().find(|v| v.version == version).map(|v| v.created.clone());
        let v = NewVersion { value: value.expose(), placeholder: rec.placeholder, written };
        self.write_secret_version(n, s, a, v, &Expect::Any)
    }
}

impl Drop for LocalStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// Writes a file at `path` through a temp file in `dir` (what `write` writes, buffered),
/// synced before the rename; returns the new file's `stat`.
fn write_durably(dir: &Path, path: &Path, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<Stamp> {
    static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("shard");
    let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let written = (|| {
        let mut w = std::io::BufWriter::with_capacity(1 << 18, std::fs::File::create(&tmp)?);
        write(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        Ok::<_, std::io::Error>(Stamp::of(&f.metadata()?))
    })();
    #[cfg(test)]
    if tests::crashes_before_rename(dir) {
        // As if the process died here: the temp file stays, the rename never happens.
        return Err(io_error(path, "the process died before the rename (a test's doing)"));
    }
    written.and_then(|stamp| std::fs::rename(&tmp, path).map(|()| stamp)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_error(path, e)
    })
}

/// A secret version to add.
struct NewVersion<'a> {
    value: &'a [u8],
    /// It stands in for an external secret nobody has put yet.
    placeholder: bool,
    /// When the value was first written, for a restored old value (its age, and so its
    /// rotation, goes on from then); `None`: now.
    written: Option<String>,
}

/// The on-disk record of one secret.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SecretRecord {
    current_version: u64,
    created: String,
    updated: String,
    #[serde(default)]
    deleted: bool,
    /// A development placeholder for an external secret (`dev_placeholders`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    placeholder: bool,
    versions: Vec<StoredVersion>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredVersion {
    version: u64,
    created: String,
    nonce: String,
    ciphertext: String,
}

impl SecretRecord {
    fn meta(&self) -> SecretMeta {
        SecretMeta {
            version: self.current_version,
            updated: self.updated.clone(),
            created: self.created.clone(),
            deleted: self.deleted,
            placeholder: self.placeholder,
        }
    }
}

/// Writes `bytes` to `path` through a temp file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().ok_or_else(|| ProviderError::Other(format!("{}: no folder", path.display())))?;
    std::fs::create_dir_all(dir).map_err(|e| ProviderError::Other(format!("{}: {e}", dir.display())))?;
    let mut suffix = [0u8; 6];
    let _ = getrandom::fill(&mut suffix);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{}.tmp", hex(&suffix)));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ProviderError::Other(format!("{}: {e}", path.display()))
    })
}

/// The local secrets key: 32 bytes from `$key_env` (hex), or the key file, created with
/// mode 0600 on first use.
fn load_key(state_dir: &Path, key_env: Option<&str>) -> anyhow::Result<Vec<u8>> {
    if let Some(var) = key_env {
        let text = std::env::var(var)
            .map_err(|_| anyhow::anyhow!("[providers.secrets] key_env names ${var}, which is not set"))?;
        return unhex(text.trim())
            .filter(|k| k.len() == 32)
            .ok_or_else(|| anyhow::anyhow!("${var} must hold 64 hex digits (a 256-bit key)"));
    }
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let path = state_dir.join("secrets.key");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                anyhow::bail!("{} is readable by others (mode {mode:o}); run chmod 600 on it", path.display());
            }
            unhex(text.trim())
                .filter(|k| k.len() == 32)
                .ok_or_else(|| anyhow::anyhow!("{} does not hold a 256-bit key in hex", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(state_dir)?;
            let mut key = [0u8; 32];
            getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
            f.write_all(hex(&key).as_bytes())?;
            f.sync_all()?;
            Ok(key.to_vec())
        }
        Err(e) => Err(e.into()),
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Charset, SecretSource, SecretSpec};
    use serde_json::json;

    fn store(dir: &Path, id: ProviderId) -> LocalStore {
        LocalStore::open(dir, id, &ProviderSettings::default()).unwrap()
    }

    fn res(address: &str, content: Content) -> Resource {
        Resource { fingerprint: None, address: Address::parse(address).unwrap(), content: content.into() }
    }

    /// Creates `{tenant}/isp.config` holding `text` for each tenant.
    fn create_configs(s: &LocalStore, tenants: &[&String], text: &str) {
        for t in tenants {
            s.put(&res(&format!("{t}/isp.config"), Content::Text(text.into())), None, &Expect::Absent).unwrap();
        }
    }

    fn fingerprints(s: &LocalStore) -> BTreeMap<String, Fingerprint> {
        s.list(&TenantScope::All).unwrap().into_iter().map(|r| (r.address.to_string(), r.fingerprint)).collect()
    }

    /// Two tenant names that share a shard, and one in another shard.
    fn neighbours() -> (String, String, String) {
        let first = "t0".to_owned();
        let same = (1..).map(|i| format!("t{i}")).find(|t| shard_of(t) == shard_of(&first)).unwrap();
        let other = (1..).map(|i| format!("t{i}")).find(|t| shard_of(t) != shard_of(&first)).unwrap();
        (first, same, other)
    }

    /// Store folders whose next shard write dies between the temp file and the rename.
    static CRASH_BEFORE_RENAME: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    pub(super) fn crashes_before_rename(dir: &Path) -> bool {
        CRASH_BEFORE_RENAME.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|d| d == dir)
    }

    /// A secret's whole record, as the store holds it.
    fn record_of(s: &LocalStore, a: &Address) -> SecretRecord {
        let n = shard_of(&a.tenant);
        let mut slot = s.current(n).unwrap();
        s.record(n, slot.as_mut().unwrap(), &a.to_string()).unwrap().unwrap()
    }

    fn edit(path: &Path, from: &str, to: &str) {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.contains(from), "{from:?} is not in {}:\n{text}", path.display());
        std::fs::write(path, text.replacen(from, to, 1)).unwrap();
    }

    #[test]
    fn every_kind_of_content_round_trips_through_a_shard_file() {
        let d = tempfile::tempdir().unwrap();
        let texts = ["", "\n", "no final newline", "trailing blank lines\n\n\n", "a\n\n  indented\n=== x\n"];
        let isp = store(d.path(), ProviderId::Isp);
        let secrets = store(d.path(), ProviderId::Secrets);
        let mgmt = store(d.path(), ProviderId::Management);
        let k8s = store(d.path(), ProviderId::Kubernetes);
        let mut written = Vec::new();
        for (i, t) in texts.iter().enumerate() {
            let r = res(&format!("t{i}/isp.config"), Content::Text((*t).into()));
            written.push((isp.put(&r, None, &Expect::Absent).unwrap(), r.content));
            let r = res(&format!("t{i}/openbao.policy[t{i}-read]"), Content::Text((*t).into()));
            written.push((secrets.put(&r, None, &Expect::Absent).unwrap(), r.content));
        }
        let tenant = json!({"id": "t1", "name": "Demo: \"quoted\"", "features": ["a", "b"], "limits": {"x": 1.5, "y": null}, "empty": {}});
        let r = res("t1/management.tenant", Content::Json(tenant));
        written.push((mgmt.put(&r, None, &Expect::Absent).unwrap(), r.content));
        let manifest = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "isp.framework", "labels": {"a": "yes"}}, "spec": {"replicas": 2, "text": "line one\nline two\n"}});
        let r = res("t1/kubernetes.Deployment[isp.framework]", Content::Json(manifest));
        written.push((k8s.put(&r, None, &Expect::Absent).unwrap(), r.content));
        for s in [&isp, &secrets, &mgmt, &k8s] {
            s.close();
        }
        // A new process reads them back: same fingerprints from listing, same content.
        let again: Vec<LiveResource> = ProviderId::ALL
            .iter()
            .flat_map(|p| {
                let s = store(d.path(), *p);
                let listed = fingerprints(&s);
                let addrs: Vec<Address> = listed.keys().map(|a| Address::parse(a).unwrap()).collect();
                let fetched = s.fetch(&addrs).unwrap();
                for f in &fetched {
                    assert_eq!(listed[&f.address.to_string()], f.fingerprint);
                }
                fetched
            })
            .collect();
        assert_eq!(again.len(), written.len());
        for (w, content) in &written {
            let back = again.iter().find(|r| r.address == w.address).unwrap();
            assert_eq!(back.content.as_deref(), Some(&**content), "{}", w.address);
            assert_eq!(back.fingerprint, w.fingerprint, "{}", w.address);
        }
        let file = std::fs::read_to_string(shard_path(d.path(), ProviderId::Isp, "t2")).unwrap();
        assert!(file.contains("=== t2/isp.config (no final newline)\n  no final newline\n"), "{file}");
    }

    #[test]
    fn fetch_and_fingerprints_find_a_tenant_s_entries_and_nothing_of_its_shard_neighbours() {
        let d = tempfile::tempdir().unwrap();
        let (t1, t2, _) = neighbours();
        // A tenant in the same shard whose name extends `t1`'s shares no entry with it.
        let longer = (0..).map(|i| format!("{t1}{i}")).find(|t| shard_of(t) == shard_of(&t1)).unwrap();
        let s = store(d.path(), ProviderId::Isp);
        create_configs(&s, &[&t1], "level: info\n");
        let addr = |t: &str| Address::parse(&format!("{t}/isp.config")).unwrap();
        let (a1, a2, a3) = (addr(&t1), addr(&t2), addr(&longer));
        let check = |s: &LocalStore, round: &str| {
            let got = s.fetch(&[a1.clone(), a2.clone(), a3.clone()]).unwrap();
            assert_eq!(got.iter().map(|l| l.address.to_string()).collect::<Vec<_>>(), [a1.to_string()], "{round}");
            let fps = s.fingerprints(&[&a2, &a1, &a3]).unwrap();
            assert_eq!(fps.iter().map(Option::is_some).collect::<Vec<_>>(), [false, true, false], "{round}");
        };
        check(&s, "in memory");
        s.flush().unwrap();
        check(&s, "flushed");
        check(&store(d.path(), ProviderId::Isp), "read again");
        let other = Address::parse(&format!("{t1}/management.tenant")).unwrap();
        assert!(s.fingerprints(&[&other]).is_err(), "an address of another provider is refused");
    }

    #[test]
    fn an_edit_of_one_entry_changes_only_its_fingerprint_even_in_a_long_running_store() {
        let d = tempfile::tempdir().unwrap();
        let (t1, t2, t3) = neighbours();
        let s = store(d.path(), ProviderId::Isp);
        create_configs(&s, &[&t1, &t2, &t3], "level: info\n");
        s.flush().unwrap();
        let before = fingerprints(&s);
        let reader = store(d.path(), ProviderId::Isp);
        assert_eq!(fingerprints(&reader), before);
        let path = shard_path(d.path(), ProviderId::Isp, &t2);
        edit(&path, &format!("=== {t2}/isp.config\n  level: info"), &format!("=== {t2}/isp.config\n  level: debug"));
        // The same store objects (a daemon keeps them) see the edit, and only that.
        for st in [&s, &reader] {
            let after = fingerprints(st);
            let moved: Vec<&String> = after.iter().filter(|(a, f)| before[*a] != **f).map(|(a, _)| a).collect();
            assert_eq!(moved, vec![&format!("{t2}/isp.config")]);
            let got = st.fetch(&[Address::parse(&format!("{t2}/isp.config")).unwrap()]).unwrap();
            assert_eq!(got[0].content.as_deref(), Some(&Content::Text("level: debug\n".into())));
        }
        // A broken YAML body is live content too: drift, not an error.
        let m = store(d.path(), ProviderId::Management);
        let r = res(&format!("{t1}/management.tenant"), Content::Json(json!({"id": t1})));
        m.put(&r, None, &Expect::Absent).unwrap();
        m.close();
        edit(&shard_path(d.path(), ProviderId::Management, &t1), &format!("  id: {t1}"), "  id: [broken");
        let got = m.fetch(std::slice::from_ref(&r.address)).unwrap();
        assert_eq!(got[0].content.as_deref(), Some(&Content::Text("id: [broken\n".into())));
    }

    #[test]
    fn a_framing_error_names_the_file_and_the_line() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path(), ProviderId::Isp);
        s.put(&res("t1/isp.config", Content::Text("a\nb\n".into())), None, &Expect::Absent).unwrap();
        s.close();
        let path = shard_path(d.path(), ProviderId::Isp, "t1");
        edit(&path, "  b\n", "b\n");
        let err = store(d.path(), ProviderId::Isp).list(&TenantScope::All).unwrap_err().to_string();
        let line = std::fs::read_to_string(&path).unwrap().lines().position(|l| l == "b").unwrap() + 1;
        assert!(err.contains(&format!("{}:{line}: expected", path.display())), "{err}");
        assert!(err.contains("indented by two spaces"), "{err}");
        // An entry in the wrong shard, or of another store, is refused the same way.
        std::fs::write(&path, "=== t1/management.tenant\n  id: t1\n").unwrap();
        let err = store(d.path(), ProviderId::Isp).list(&TenantScope::All).unwrap_err().to_string();
        assert!(err.contains(":1:") && err.contains("belongs to the management store"), "{err}");
    }

    #[test]
    fn stale_expectations_are_conflicts() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path(), ProviderId::Isp);
        let r1 = res("t1/isp.config", Content::Text("one\n".into()));
        let fp1 = s.put(&r1, None, &Expect::Absent).unwrap().fingerprint;
        assert!(matches!(s.put(&r1, None, &Expect::Absent), Err(ProviderError::Conflict { .. })));
        let r2 = res("t1/isp.config", Content::Text("two\n".into()));
        let wrong = Expect::Fingerprint("sha256:0".into());
        assert!(matches!(s.put(&r2, None, &wrong), Err(ProviderError::Conflict { .. })));
        assert!(matches!(s.delete(&r1.address, &wrong, false), Err(ProviderError::Conflict { .. })));
        let fp2 = s.put(&r2, None, &Expect::Fingerprint(fp1.clone())).unwrap().fingerprint;
        assert!(matches!(s.delete(&r1.address, &Expect::Fingerprint(fp1), false), Err(ProviderError::Conflict { .. })));
        s.delete(&r1.address, &Expect::Fingerprint(fp2), false).unwrap();
        s.delete(&r1.address, &Expect::Any, false).unwrap();
        assert!(s.list(&TenantScope::All).unwrap().is_empty());
        s.close();
        assert!(!shard_path(d.path(), ProviderId::Isp, "t1").exists(), "an empty shard has no file");
    }

    #[test]
    fn addresses_that_cannot_be_stored_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path(), ProviderId::Kubernetes);
        let pod = |t: &str, kind: &str, n: &str| Address::new(t, ResourceKind::kubernetes(kind), Some(n));
        for a in [
            pod("..", "Pod", "p"),
            pod("a/b", "Pod", "p"),
            pod("t1", "Pod", "../p"),
            pod("t1", "Pod", "p q"),
            pod("t1", "Po.d", "p"),
            pod("", "Pod", "p"),
            pod("t1", "Pod", "p]\n=== x"),
            pod("t1", "Pod", "p\tq"),
            pod("t1", "Pod", "p\x7fq"),
            pod("t\u{1}", "Pod", "p"),
            // Beyond ASCII: a no-break space and a line separator are whitespace too.
            pod("t1", "Pod", "é\u{a0}p"),
            pod("t\u{2028}é", "Pod", "p"),
        ] {
            let r = Resource { fingerprint: None, address: a.clone(), content: Content::Json(json!({})).into() };
            assert!(s.put(&r, None, &Expect::Any).is_err(), "{a:?}");
            assert!(s.fetch(std::slice::from_ref(&a)).is_err(), "{a:?}");
        }
        let ok = pod("t1", "Deployment", "isp.framework-é");
        s.put(
            &Resource { fingerprint: None, address: ok, content: Content::Json(json!({})).into() },
            None,
            &Expect::Any,
        )
        .unwrap();
        let sec = store(d.path(), ProviderId::Secrets);
        let bad = Address::new("t1", ResourceKind::OpenbaoSecret, Some("../x"));
        assert!(sec.reveal(&bad).is_err());
    }

    #[test]
    fn secrets_are_encrypted_versioned_and_restorable() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path(), ProviderId::Secrets);
        let a = Address::parse("t1/openbao.secret[db/password]").unwrap();
        let r = Resource {
            fingerprint: None,
            address: a.clone(),
            content: Content::Secret(SecretSpec {
                name: "db/password".into(),
                source: SecretSource::Generated { length: 20, charset: Charset::Alphanumeric },
                rotation_days: None,
                auto_rotation: true,
            })
            .into(),
        };
        let v1 = SecretValue::from_bytes(b"first-value-PLANTED".to_vec());
        let live = s.put(&r, Some(&v1), &Expect::Absent).unwrap();
        assert_eq!(live.fingerprint, "v1");
        s.flush().unwrap();
        let on_disk = std::fs::read_to_string(shard_path(d.path(), ProviderId::Secrets, "t1")).unwrap();
        assert!(on_disk.contains("=== t1/openbao.secret[db/password]\n"), "{on_disk}");
        assert!(!on_disk.contains("first-value-PLANTED"), "{on_disk}");
        // a stale expectation is a conflict, not an overwrite
        let v2 = SecretValue::from_bytes(b"second".to_vec());
        assert!(matches!(s.put(&r, Some(&v2), &Expect::Absent), Err(ProviderError::Conflict { .. })));
        s.put(&r, Some(&v2), &Expect::Fingerprint("v1".into())).unwrap();
        assert_eq!(s.reveal(&a).unwrap().unwrap().expose(), b"second");
        let back = s.restore_secret(&a, 1).unwrap();
        assert_eq!(back.fingerprint, "v3");
        // The restored value is as old as version 1: its rotation is not put off.
        let rec = record_of(&s, &a);
        assert_eq!(rec.updated, rec.versions[0].created);
        assert_eq!(s.reveal(&a).unwrap().unwrap().expose(), b"first-value-PLANTED");
        s.delete(&a, &Expect::Any, false).unwrap();
        assert_eq!(s.fetch(std::slice::from_ref(&a)).unwrap()[0].fingerprint, "v3-deleted");
        assert!(s.reveal(&a).unwrap().is_none());
        s.close();
        // Another process sees the soft delete, and can restore a version.
        let other = store(d.path(), ProviderId::Secrets);
        let listed = other.list(&TenantScope::All).unwrap();
        assert_eq!(listed[0].fingerprint, "v3-deleted");
        assert!(matches!(listed[0].content.as_deref(), Some(Content::SecretMeta(m)) if m.deleted && m.version == 3));
        other.restore_secret(&a, 2).unwrap();
        assert_eq!(other.reveal(&a).unwrap().unwrap().expose(), b"second");
        other.delete(&a, &Expect::Any, true).unwrap();
        assert!(other.fetch(std::slice::from_ref(&a)).unwrap().is_empty());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(d.path().join("secrets.key")).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_list_of_unchanged_shards_makes_no_image_and_a_later_index_keeps_their_part() {
        let d = tempfile::tempdir().unwrap();
        let (t1, _, t3) = neighbours();
        let s = store(d.path(), ProviderId::Isp);
        create_configs(&s, &[&t1, &t3], "x\n");
        s.close();
        let before = fingerprints(&s);
        drop(s);
        let s = store(d.path(), ProviderId::Isp);
        let listed: BTreeMap<String, Fingerprint> =
            s.list(&TenantScope::All).unwrap().into_iter().map(|l| (l.address.to_string(), l.fingerprint)).collect();
        assert_eq!(listed, before, "listed from the index as written");
        for t in [&t1, &t3] {
            assert!(s.lock(shard_of(t)).is_none(), "no image was made of {t}'s shard");
        }
        assert!(!s.index_stale.load(Ordering::Relaxed), "nothing new for the index");
        // A write to one shard: the new index keeps the other shard's part unread.
        let r = res(&format!("{t1}/isp.config"), Content::Text("changed\n".into()));
        s.put(&r, None, &Expect::Any).unwrap();
        s.close();
        assert!(s.lock(shard_of(&t3)).is_none(), "the untouched shard still has no image");
        let idx = index::load(&s.dir).unwrap();
        let part = idx.shard(shard_of(&t3)).expect("the untouched shard is in the new index");
        assert_eq!(part.entries.len(), 1);
        assert_eq!(Some(&part.entries[0].fingerprint), before.get(&format!("{t3}/isp.config")));
        drop(s);
        let s = store(d.path(), ProviderId::Isp);
        let after = fingerprints(&s);
        assert_eq!(after.get(&format!("{t3}/isp.config")), before.get(&format!("{t3}/isp.config")));
        assert_ne!(after.get(&format!("{t1}/isp.config")), before.get(&format!("{t1}/isp.config")));
    }

    #[test]
    fn discard_forgets_what_was_not_flushed() {
        let d = tempfile::tempdir().unwrap();
        let (t1, _, t3) = neighbours();
        let s = store(d.path(), ProviderId::Isp);
        create_configs(&s, &[&t1], "x\n");
        s.flush().unwrap();
        let kept = fingerprints(&s);
        s.put(&res(&format!("{t1}/isp.config"), Content::Text("y\n".into())), None, &Expect::Any).unwrap();
        create_configs(&s, &[&t3], "z\n");
        assert_eq!(fingerprints(&s).len(), 2);
        s.discard();
        assert_eq!(fingerprints(&s), kept, "back to what was flushed");
        s.flush().unwrap();
        assert!(!shard_path(d.path(), ProviderId::Isp, &t3).exists(), "nothing left to write");
        assert_eq!(fingerprints(&store(d.path(), ProviderId::Isp)), kept);
    }

    #[test]
    fn flush_writes_only_the_shards_that_changed() {
        let d = tempfile::tempdir().unwrap();
        let (t1, _, t3) = neighbours();
        let s = store(d.path(), ProviderId::Isp);
        create_configs(&s, &[&t1, &t3], "x\n");
        s.flush().unwrap();
        let stamp = |t: &str| Stamp::of(&std::fs::metadata(shard_path(d.path(), ProviderId::Isp, t)).unwrap());
        let (a, b) = (stamp(&t1), stamp(&t3));
        s.flush().unwrap();
        assert_eq!((stamp(&t1), stamp(&t3)), (a, b), "nothing to write");
        let r = res(&format!("{t1}/isp.config"), Content::Text("y\n".into()));
        s.put(&r, None, &Expect::Any).unwrap();
        assert_eq!(stamp(&t1), a, "a put writes no file");
        s.flush().unwrap();
        assert_ne!(stamp(&t1).ino, a.ino, "rewritten (a new file renamed over it)");
        assert_eq!(stamp(&t3), b, "untouched");
    }

    #[test]
    fn close_persists_and_a_crash_loses_only_unflushed_writes() {
        let d = tempfile::tempdir().unwrap();
        let (t1, t2, _) = neighbours();
        let s = store(d.path(), ProviderId::Isp);
        s.put(&res(&format!("{t1}/isp.config"), Content::Text("kept\n".into())), None, &Expect::Absent).unwrap();
        s.close();
        s.put(&res(&format!("{t2}/isp.config"), Content::Text("lost\n".into())), None, &Expect::Absent).unwrap();
        // The process dies: no flush, no drop.
        std::mem::forget(s);
        let again = store(d.path(), ProviderId::Isp);
        let listed = fingerprints(&again);
        assert_eq!(listed.keys().collect::<Vec<_>>(), vec![&format!("{t1}/isp.config")]);
        // Dropping the store flushes, like close.
        again.put(&res(&format!("{t2}/isp.config"), Content::Text("dropped\n".into())), None, &Expect::Absent).unwrap();
        drop(again);
        assert_eq!(fingerprints(&store(d.path(), ProviderId::Isp)).len(), 2);
    }

    #[test]
    fn an_edit_on_disk_while_writes_are_pending_is_merged_or_is_a_conflict() {
        let d = tempfile::tempdir().unwrap();
        let (t1, t2, _) = neighbours();
        let s = store(d.path(), ProviderId::Isp);
        create_configs(&s, &[&t1, &t2], "v1\n");
        s.flush().unwrap();
        let path = shard_path(d.path(), ProviderId::Isp, &t1);
        // Ours: t1. Someone else's, meanwhile: t2. Both survive.
        s.put(&res(&format!("{t1}/isp.config"), Content::Text("ours\n".into())), None, &Expect::Any).unwrap();
        edit(&path, &format!("=== {t2}/isp.config\n  v1"), &format!("=== {t2}/isp.config\n  theirs"));
        s.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("  ours\n") && text.contains("  theirs\n"), "{text}");
        // Both changed t1: theirs is kept, and flush says so.
        s.put(&res(&format!("{t1}/isp.config"), Content::Text("ours again\n".into())), None, &Expect::Any).unwrap();
        edit(&path, &format!("=== {t1}/isp.config\n  ours"), &format!("=== {t1}/isp.config\n  theirs too"));
        assert!(matches!(s.flush(), Err(ProviderError::Conflict { .. })));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("  theirs too\n") && !text.contains("ours again"), "{text}");
    }

    #[test]
    fn the_first_layout_is_moved_into_shards() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("live");
        std::fs::create_dir_all(dir.join("isp")).unwrap();
        std::fs::create_dir_all(dir.join("kubernetes")).unwrap();
        std::fs::write(dir.join("isp/t1.isp_config.yaml"), "level: info").unwrap();
        std::fs::write(dir.join("isp/.index"), "DMIDX001 an old index").unwrap();
        std::fs::write(dir.join("kubernetes/t1.Deployment.isp.framework.yaml"), "kind: Deployment\n").unwrap();
        // Secrets written by the first layout, through its own code path's format.
        let s = store(d.path(), ProviderId::Secrets);
        let a = Address::parse("t1/openbao.secret[db/password]").unwrap();
        s.put_external(&a, &SecretValue::from_bytes(b"PLANTED".to_vec())).unwrap();
        let rec = record_of(&s, &a);
        std::mem::forget(s);
        let old = json!({"secrets": {"db/password": rec}});
        std::fs::create_dir_all(dir.join("secrets")).unwrap();
        std::fs::write(dir.join("secrets/t1.secrets.json"), serde_json::to_string_pretty(&old).unwrap()).unwrap();
        std::fs::write(dir.join("secrets/t1.policy.t1-read.hcl"), "path \"x\" {}\n").unwrap();

        let isp = store(d.path(), ProviderId::Isp);
        let got = isp.fetch(&[Address::parse("t1/isp.config").unwrap()]).unwrap();
        assert_eq!(got[0].content.as_deref(), Some(&Content::Text("level: info".into())));
        assert!(!dir.join("isp/t1.isp_config.yaml").exists());
        assert!(shard_path(d.path(), ProviderId::Isp, "t1").exists());
        let k8s = store(d.path(), ProviderId::Kubernetes);
        assert_eq!(fingerprints(&k8s).len(), 1);
        let sec = store(d.path(), ProviderId::Secrets);
        assert_eq!(fingerprints(&sec).len(), 2);
        assert_eq!(sec.reveal(&a).unwrap().unwrap().expose(), b"PLANTED");
        let names: Vec<String> = std::fs::read_dir(dir.join("secrets"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with('.'))
            .collect();
        assert_eq!(names, vec![shard::file_name(shard_of("t1"))]);
    }

    #[test]
    fn an_editor_removing_the_final_newline_changes_nothing_and_the_next_flush_puts_it_back() {
        let d = tempfile::tempdir().unwrap();
        let (t1, t2, _) = neighbours();
        let s = store(d.path(), ProviderId::Isp);
        create_configs(&s, &[&t1, &t2], "a: 1\nb: 2\n");
        s.close();
        let before = fingerprints(&s);
        let path = shard_path(d.path(), ProviderId::Isp, &t1);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.strip_suffix('\n').unwrap()).unwrap();
        // The last entry reads as it did: no drift, in this store or a new one.
        let again = store(d.path(), ProviderId::Isp);
        for st in [&s, &again] {
            assert_eq!(fingerprints(st), before);
            let addrs: Vec<Address> = before.keys().map(|a| Address::parse(a).unwrap()).collect();
            for got in st.fetch(&addrs).unwrap() {
                assert_eq!(got.content.as_deref(), Some(&Content::Text("a: 1\nb: 2\n".into())), "{}", got.address);
            }
        }
        // A write to the other entry copies the edited one byte for byte, newline restored.
        let last = before.keys().last().unwrap().clone();
        let first = before.keys().next().unwrap().clone();
        again.put(&res(&first, Content::Text("a: 3\n".into())), None, &Expect::Any).unwrap();
        again.close();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with(&format!("=== {last}\n  a: 1\n  b: 2\n")), "{text}");
        let fresh = store(d.path(), ProviderId::Isp);
        assert_eq!(fingerprints(&fresh)[&last], before[&last]);
        assert_ne!(fingerprints(&fresh)[&first], before[&first]);
    }

    #[test]
    fn a_crash_between_the_temp_file_and_the_rename_leaves_the_old_shard() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path(), ProviderId::Isp);
        let a = "t1/isp.config";
        s.put(&res(a, Content::Text("old\n".into())), None, &Expect::Absent).unwrap();
        s.close();
        let path = shard_path(d.path(), ProviderId::Isp, "t1");
        let old = std::fs::read(&path).unwrap();
        let dir = d.path().join("live/isp");
        CRASH_BEFORE_RENAME.lock().unwrap().push(dir.clone());
        s.put(&res(a, Content::Text("new\n".into())), None, &Expect::Any).unwrap();
        assert!(s.flush().is_err());
        CRASH_BEFORE_RENAME.lock().unwrap().retain(|x| *x != dir);
        std::mem::forget(s);
        // The temp file is there, complete; the shard is the old one, and reads as such.
        let temps: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "tmp") && !p.ends_with(".index.tmp"))
            .collect();
        assert_eq!(temps.len(), 1, "{temps:?}");
        assert!(std::fs::read_to_string(&temps[0]).unwrap().contains("  new\n"));
        assert_eq!(std::fs::read(&path).unwrap(), old);
        let next = store(d.path(), ProviderId::Isp);
        let got = next.fetch(&[Address::parse(a).unwrap()]).unwrap();
        assert_eq!(got[0].content.as_deref(), Some(&Content::Text("old\n".into())));
        // The next process writes over it as usual; an hour on, the dead temp file is cleared.
        next.put(&res(a, Content::Text("newer\n".into())), None, &Expect::Any).unwrap();
        next.close();
        assert!(std::fs::read_to_string(&path).unwrap().contains("  newer\n"));
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        std::fs::File::options().write(true).open(&temps[0]).unwrap().set_modified(hour_ago).unwrap();
        fingerprints(&store(d.path(), ProviderId::Isp));
        assert!(!temps[0].exists());
    }

    #[test]
    fn a_stale_index_is_not_believed() {
        let d = tempfile::tempdir().unwrap();
        let (t1, t2, t3) = neighbours();
        let s = store(d.path(), ProviderId::Isp);
        create_configs(&s, &[&t1, &t2, &t3], "level: info\n");
        s.close();
        drop(s);
        let before = fingerprints(&store(d.path(), ProviderId::Isp));
        let path = shard_path(d.path(), ProviderId::Isp, &t2);
        let addr = |t: &str| Address::parse(&format!("{t}/isp.config")).unwrap();

        // An ordinary edit changes the file's stat: the index's view of that shard is
        // dropped, the file read again, and only the edited entry moves.
        edit(&path, &format!("=== {t2}/isp.config\n  level: info"), &format!("=== {t2}/isp.config\n  level: debug"));
        let s = store(d.path(), ProviderId::Isp);
        let after = fingerprints(&s);
        assert_ne!(after[&addr(&t2).to_string()], before[&addr(&t2).to_string()]);
        assert_eq!(after[&addr(&t1).to_string()], before[&addr(&t1).to_string()]);
        assert_eq!(after[&addr(&t3).to_string()], before[&addr(&t3).to_string()]);
        s.close();
        drop(s);

        // An edit that keeps the stat (same size, same inode, mtime put back) fools the
        // stat check, but not a read: the entry's bytes no longer hash as the index says, so
        // the file is parsed again and the edited content comes back.
        let trusted = fingerprints(&store(d.path(), ProviderId::Isp));
        let m = std::fs::metadata(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let edited = text.replacen("  level: debug", "  level: trace", 1);
        assert_eq!(edited.len(), text.len());
        std::fs::write(&path, &edited).unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(m.modified().unwrap()).unwrap();
        assert_eq!(Stamp::of(&std::fs::metadata(&path).unwrap()), Stamp::of(&m));
        // A put checks against what the file holds, not the index, even as its first call.
        let writer = store(d.path(), ProviderId::Isp);
        let stale = Expect::Fingerprint(trusted[&addr(&t2).to_string()].clone());
        let r = res(&format!("{t2}/isp.config"), Content::Text("x\n".into()));
        assert!(matches!(writer.put(&r, None, &stale), Err(ProviderError::Conflict { .. })));
        let s = store(d.path(), ProviderId::Isp);
        let got = s.fetch(&[addr(&t2), addr(&t1)]).unwrap();
        assert_eq!(got[0].content.as_deref(), Some(&Content::Text("level: trace\n".into())));
        assert_ne!(got[0].fingerprint, trusted[&addr(&t2).to_string()]);
        assert_eq!(got[1].content.as_deref(), Some(&Content::Text("level: info\n".into())));
        assert_eq!(fingerprints(&s)[&addr(&t2).to_string()], got[0].fingerprint, "listing agrees once read");
        writer.put(&r, None, &Expect::Fingerprint(got[0].fingerprint.clone())).unwrap();
    }

    #[test]
    fn two_stores_writing_one_shard_keep_each_others_entries() {
        let d = tempfile::tempdir().unwrap();
        let (t1, t2, _) = neighbours();
        let (a1, a2) = (format!("{t1}/isp.config"), format!("{t2}/isp.config"));
        let one = store(d.path(), ProviderId::Isp);
        let two = store(d.path(), ProviderId::Isp);
        // Both read the (empty) shard, then each adds its own tenant.
        assert!(fingerprints(&one).is_empty() && fingerprints(&two).is_empty());
        one.put(&res(&a1, Content::Text("one\n".into())), None, &Expect::Absent).unwrap();
        two.put(&res(&a2, Content::Text("two\n".into())), None, &Expect::Absent).unwrap();
        one.flush().unwrap();
        two.flush().unwrap();
        let both = fingerprints(&store(d.path(), ProviderId::Isp));
        assert_eq!(both.keys().collect::<Vec<_>>(), vec![&a1, &a2]);
        // Both change the same entry: the second flush keeps the first's and says so.
        one.put(&res(&a1, Content::Text("one again\n".into())), None, &Expect::Any).unwrap();
        two.put(&res(&a1, Content::Text("two's\n".into())), None, &Expect::Any).unwrap();
        one.flush().unwrap();
        match two.flush() {
            Err(ProviderError::Conflict { address, .. }) => assert_eq!(address, a1),
            other => panic!("{other:?}"),
        }
        let text = std::fs::read_to_string(shard_path(d.path(), ProviderId::Isp, &t1)).unwrap();
        assert!(text.contains("  one again\n") && !text.contains("two's"), "{text}");
        assert_eq!(fingerprints(&two), fingerprints(&one), "the loser sees the file as it is");
        // Both add the same entry to a shard that has no file yet (an image with nothing
        // under it, whose entries are all its own): the second flush is the conflict.
        let (_, _, t3) = neighbours();
        let a3 = format!("{t3}/isp.config");
        one.put(&res(&a3, Content::Text("one\n".into())), None, &Expect::Absent).unwrap();
        two.put(&res(&a3, Content::Text("two\n".into())), None, &Expect::Absent).unwrap();
        one.flush().unwrap();
        match two.flush() {
            Err(ProviderError::Conflict { address, .. }) => assert_eq!(address, a3),
            other => panic!("{other:?}"),
        }
        let text = std::fs::read_to_string(shard_path(d.path(), ProviderId::Isp, &t3)).unwrap();
        assert!(text.contains("  one\n") && !text.contains("  two\n"), "{text}");
    }
}
