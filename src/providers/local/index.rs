//! The cache beside a store's shard files (`.index`), like git's index: for every shard, the
//! `stat` data its file had when it was last read or written, and for every entry in it the
//! address, the byte range, a SHA-256 of the entry's bytes, the fingerprint and (secrets) the
//! metadata. A `list` then costs one `stat` per shard instead of reading and parsing it; a
//! shard whose `stat` changed, or whose mtime is not older than the index file itself (git's
//! "racily clean" rule), is read again, and only its entries whose bytes changed are parsed.
//!
//! The index is a cache: losing it, or a stale one, costs time, never correctness.

use crate::binfmt::{Reader, put_fingerprint, put_str};
use crate::fingerprint::Fingerprint;
use crate::model::SecretMeta;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"DMLIDX03";

/// The `stat` data that says a file is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub mtime: i64,
    pub mtime_ns: i64,
    pub size: u64,
    pub ino: u64,
}

impl Stamp {
    pub const ZERO: Stamp = Stamp { mtime: 0, mtime_ns: 0, size: 0, ino: 0 };

    pub fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp { mtime: m.mtime(), mtime_ns: m.mtime_nsec(), size: m.size(), ino: m.ino() }
    }
    pub fn nanos(&self) -> i128 {
        i128::from(self.mtime) * 1_000_000_000 + i128::from(self.mtime_ns)
    }
}

/// One entry as the index remembers it.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedEntry {
    pub address: String,
    pub start: usize,
    pub end: usize,
    pub hash: [u8; 32],
    pub fingerprint: crate::fingerprint::Fingerprint,
    pub meta: Option<SecretMeta>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CachedShard {
    pub shard: usize,
    pub stamp: Stamp,
    pub entries: Vec<CachedEntry>,
}

/// An index as opened: the file (kept open, so a newer index renamed over it does not
/// matter), where each shard's part is, and the file's mtime (nanoseconds), against which the
/// racily clean rule judges the shards. A shard's part is read and decoded only when asked
/// for, so memory holds one part at a time: a `list` of unchanged shards reads them straight
/// from the file, without building the store's image.
#[derive(Debug)]
pub struct Loaded {
    file: std::fs::File,
    /// By shard: its `stat` stamp, the number of entries and where they are in the file.
    parts: Vec<Option<Part>>,
    pub written: i128,
}

#[derive(Debug, Clone)]
struct Part {
    stamp: Stamp,
    count: usize,
    range: std::ops::Range<usize>,
}

/// One entry, its address borrowed from the index's bytes.
pub struct EntryRef<'a> {
    pub address: &'a str,
    pub start: usize,
    pub end: usize,
    pub hash: &'a [u8; 32],
    pub fingerprint: Fingerprint,
    pub meta: Option<SecretMeta>,
}

impl Loaded {
    /// Shard `n`'s stamp, if the index describes it.
    pub fn stamp(&self, n: usize) -> Option<Stamp> {
        self.parts.get(n)?.as_ref().map(|p| p.stamp)
    }

    /// The number of entries the index gives shard `n`.
    pub fn count(&self, n: usize) -> usize {
        self.parts.get(n).and_then(Option::as_ref).map_or(0, |p| p.count)
    }

    /// Calls `f` with each entry of shard `n` (in the file's order); `false` if the index does
    /// not describe the shard or its part does not read or decode.
    pub fn visit(&self, n: usize, mut f: impl FnMut(EntryRef<'_>)) -> bool {
        let Some((part, bytes)) = self.raw(n) else { return false };
        let mut r = Reader::new(&bytes);
        for _ in 0..part.count {
            match entry(&mut r) {
                Some(e) => f(e),
                None => return false,
            }
        }
        r.at_end()
    }

    /// Shard `n`'s entries, owned.
    pub fn shard(&self, n: usize) -> Option<CachedShard> {
        let stamp = self.stamp(n)?;
        let mut entries = Vec::new();
        let ok = self.visit(n, |e| {
            entries.push(CachedEntry {
                address: e.address.to_owned(),
                start: e.start,
                end: e.end,
                hash: *e.hash,
                fingerprint: e.fingerprint,
                meta: e.meta,
            })
        });
        ok.then_some(CachedShard { shard: n, stamp, entries })
    }

    /// Shard `n`'s part as it is in the file.
    fn raw(&self, n: usize) -> Option<(&Part, Vec<u8>)> {
        use std::os::unix::fs::FileExt;
        let part = self.parts.get(n)?.as_ref()?;
        let mut bytes = vec![0; part.range.len()];
        self.file.read_exact_at(&mut bytes, part.range.start as u64).ok()?;
        Some((part, bytes))
    }
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(".index")
}

/// Loads the index of a store folder; `None` if absent, unreadable or of another version.
pub fn load(dir: &Path) -> Option<Loaded> {
    let file = std::fs::File::open(path(dir)).ok()?;
    let meta = file.metadata().ok()?;
    let parts = split(&file, meta.size())?;
    Some(Loaded { file, parts, written: Stamp::of(&meta).nanos() })
}

/// The index being written, one shard at a time, straight to its temp file: built whole in
/// memory (20 MB for a first apply of 10,000 tenants), its buffer was copied and touched
/// about twice over as it grew, at the end of the apply.
pub struct Writer {
    /// The temp file, in the store folder, and the index's path there.
    tmp: PathBuf,
    dest: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    /// One shard's part, encoded before it is written (its length comes first).
    part: Vec<u8>,
    shards: u32,
    /// The newest mtime of the shards written in (nanoseconds).
    newest: i128,
    /// The first write that failed: the index is then not saved.
    failed: Option<std::io::Error>,
}

impl Writer {
    /// Starts the index of the store folder `dir` in a temp file there.
    pub fn create(dir: &Path) -> std::io::Result<Writer> {
        let tmp = dir.join(format!(".index.{}.tmp", std::process::id()));
        let mut out = std::io::BufWriter::with_capacity(1 << 18, std::fs::File::create(&tmp)?);
        out.write_all(MAGIC)?;
        // The number of shards, written again once known.
        out.write_all(&0u32.to_le_bytes())?;
        Ok(Writer { tmp, dest: path(dir), out, part: Vec::new(), shards: 0, newest: 0, failed: None })
    }

    pub fn shard<'a>(&mut self, shard: usize, stamp: &Stamp, entries: impl ExactSizeIterator<Item = Cached<'a>>) {
        let count = entries.len();
        let out = &mut self.part;
        out.clear();
        for e in entries {
            put_str(out, e.address);
            out.extend_from_slice(&(e.start as u64).to_le_bytes());
            out.extend_from_slice(&(e.end as u64).to_le_bytes());
            out.extend_from_slice(e.hash);
            // Most fingerprints are `sha256:` and 64 hex digits: kept as 32 bytes.
            put_fingerprint(out, e.fingerprint);
            match e.meta {
                None => out.push(0),
                Some(m) => {
                    out.push(1);
                    out.extend_from_slice(&m.version.to_le_bytes());
                    put_str(out, &m.updated);
                    put_str(out, &m.created);
                    out.push(u8::from(m.deleted) | (u8::from(m.placeholder) << 1));
                }
            }
        }
        let part = std::mem::take(&mut self.part);
        self.write_part(shard, stamp, count, &part);
        self.part = part;
    }

    /// A shard's part copied from a loaded index, unchanged.
    pub fn copy(&mut self, from: &Loaded, shard: usize) {
        let Some((part, bytes)) = from.raw(shard) else { return };
        self.write_part(shard, &part.stamp, part.count, &bytes);
    }

    /// A shard's head, then its part's length and bytes.
    fn write_part(&mut self, shard: usize, stamp: &Stamp, count: usize, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        self.shards += 1;
        self.newest = self.newest.max(stamp.nanos());
        let head: [&[u8]; 7] = [
            &[shard as u8],
            &stamp.mtime.to_le_bytes(),
            &stamp.mtime_ns.to_le_bytes(),
            &stamp.size.to_le_bytes(),
            &stamp.ino.to_le_bytes(),
            &(count as u32).to_le_bytes(),
            &(bytes.len() as u64).to_le_bytes(),
        ];
        if let Err(e) = head.iter().chain([&bytes]).try_for_each(|b| self.out.write_all(b)) {
            self.failed = Some(e);
        }
    }

    /// Finishes the index (its shard count, then a rename over the old one) and returns its
    /// mtime, which is made later than every shard's: a shard written just before is then
    /// trusted by the next run instead of being read again as "racily clean".
    pub fn save(self) -> std::io::Result<i128> {
        let Writer { tmp, dest, out, shards, newest, failed, .. } = self;
        let written = (|| {
            if let Some(e) = failed {
                return Err(e);
            }
            let f = out.into_inner().map_err(std::io::IntoInnerError::into_error)?;
            {
                use std::os::unix::fs::FileExt;
                f.write_all_at(&shards.to_le_bytes(), MAGIC.len() as u64)?;
            }
            let mut written = Stamp::of(&f.metadata()?).nanos();
            // File times come from a clock that ticks every few milliseconds: wait out the tick.
            for _ in 0..50 {
                if written > newest {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
                f.set_modified(std::time::SystemTime::now())?;
                written = Stamp::of(&f.metadata()?).nanos();
            }
            Ok(written)
        })();
        match written {
            Ok(w) => {
                std::fs::rename(&tmp, &dest)?;
                Ok(w)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }
}

/// An entry as it goes into the index (borrowed from the store's image).
pub struct Cached<'a> {
    pub address: &'a str,
    pub start: usize,
    pub end: usize,
    pub hash: &'a [u8; 32],
    pub fingerprint: &'a Fingerprint,
    pub meta: Option<&'a SecretMeta>,
}

/// Where each shard's part of an index file is, from the headers alone (`None`: another
/// version, or damaged).
fn split(file: &std::fs::File, size: u64) -> Option<Vec<Option<Part>>> {
    use std::os::unix::fs::FileExt;
    const HEAD: usize = 1 + 8 * 4 + 4 + 8;
    let mut start = [0u8; 12];
    file.read_exact_at(&mut start, 0).ok()?;
    let mut r = Reader::new(&start);
    if r.take(8)? != MAGIC {
        return None;
    }
    let n = r.u32()? as usize;
    let mut parts = vec![None; super::shard::SHARDS];
    let mut at = start.len() as u64;
    let mut head = [0u8; HEAD];
    for _ in 0..n {
        file.read_exact_at(&mut head, at).ok()?;
        let mut r = Reader::new(&head);
        let shard = usize::from(r.u8()?);
        let stamp = Stamp { mtime: r.i64()?, mtime_ns: r.i64()?, size: r.u64()?, ino: r.u64()? };
        let count = r.u32()? as usize;
        let len = r.u64()?;
        let from = at + HEAD as u64;
        at = from.checked_add(len).filter(|end| *end <= size)?;
        if let Some(slot) = parts.get_mut(shard) {
            *slot = Some(Part { stamp, count, range: usize::try_from(from).ok()?..usize::try_from(at).ok()? });
        }
    }
    (at == size).then_some(parts)
}

/// One entry at the reader's position.
fn entry<'a>(r: &mut Reader<'a>) -> Option<EntryRef<'a>> {
    let address = r.str()?;
    let start = usize::try_from(r.u64()?).ok()?;
    let end = usize::try_from(r.u64()?).ok()?;
    let hash: &[u8; 32] = r.take(32)?.try_into().ok()?;
    let fingerprint = r.fingerprint()?;
    let meta = match r.u8()? {
        0 => None,
        _ => {
            let version = r.u64()?;
            let updated = r.str()?.to_owned();
            let created = r.str()?.to_owned();
            let flags = r.u8()?;
            Some(SecretMeta { version, updated, created, deleted: flags & 1 != 0, placeholder: flags & 2 != 0 })
        }
    };
    Some(EntryRef { address, start, end, hash, fingerprint, meta })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_is_newer_than_its_shards() {
        let d = tempfile::tempdir().unwrap();
        let shard_file = d.path().join("03.live");
        std::fs::write(&shard_file, b"x").unwrap();
        let stamp = Stamp::of(&std::fs::metadata(&shard_file).unwrap());
        let meta =
            SecretMeta { version: 2, updated: "u".into(), created: "c".into(), deleted: false, placeholder: true };
        let sha = format!("sha256:{}", "ab".repeat(32));
        let mut w = Writer::create(d.path()).unwrap();
        let entries = [
            Cached {
                address: "t1/openbao.secret[db]",
                start: 0,
                end: 10,
                hash: &[7; 32],
                fingerprint: &Fingerprint::from("v2"),
                meta: Some(&meta),
            },
            Cached {
                address: "t1/openbao.policy[p]",
                start: 10,
                end: 20,
                hash: &[8; 32],
                fingerprint: &Fingerprint::from(sha.as_str()),
                meta: None,
            },
        ];
        w.shard(3, &stamp, entries.into_iter());
        let written = w.save().unwrap();
        assert!(written > stamp.nanos(), "the index is newer than the shard it describes");
        let back = load(d.path()).unwrap();
        assert_eq!(back.written, written);
        assert_eq!((0..64).filter(|n| back.stamp(*n).is_some()).count(), 1);
        let s = &back.shard(3).unwrap();
        assert_eq!((s.shard, s.stamp), (3, stamp));
        assert_eq!(s.entries[0].meta.as_ref(), Some(&meta));
        assert_eq!((s.entries[1].fingerprint.to_string(), s.entries[1].start, s.entries[1].end), (sha.clone(), 10, 20));
        assert_eq!(s.entries[1].hash, [8; 32]);
        std::fs::write(path(d.path()), b"garbage").unwrap();
        assert!(load(d.path()).is_none());
    }
}
