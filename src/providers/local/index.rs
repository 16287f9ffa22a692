//! A stat cache for a local store, like git's index: for every live file, the `stat` data
//! it had when it was last read or written, and the resources (fingerprints, secret
//! metadata) it held. Listing a store then costs one `stat` per file instead of reading and
//! parsing it; a file whose `stat` changed, or whose mtime is not older than the index file
//! itself (git's "racily clean" rule), is read again.
//!
//! The index is a cache: losing it, or a stale one, costs time, never correctness.

use crate::model::SecretMeta;
use rustc_hash::FxHashMap as HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"DMIDX001";

/// The `stat` data that says a file is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub mtime: i64,
    pub mtime_ns: i64,
    pub size: u64,
    pub ino: u64,
}

impl Stamp {
    pub fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp { mtime: m.mtime(), mtime_ns: m.mtime_nsec(), size: m.size(), ino: m.ino() }
    }
    fn nanos(&self) -> i128 {
        i128::from(self.mtime) * 1_000_000_000 + i128::from(self.mtime_ns)
    }
}

/// One resource a file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    /// The address without its tenant prefix (`isp.config`, `openbao.secret[db]`).
    pub local: String,
    pub fingerprint: String,
    pub meta: Option<SecretMeta>,
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub stamp: Stamp,
    pub held: Vec<Held>,
}

#[derive(Debug, Default)]
pub struct Index {
    pub entries: HashMap<String, Entry>,
    /// The index file's mtime when it was loaded (nanoseconds); entries not older are re-read.
    written: i128,
    pub dirty: bool,
}

impl Index {
    /// The entry for `name` if it still describes the file with `stamp`.
    pub fn valid(&self, name: &str, stamp: &Stamp) -> Option<&Entry> {
        let e = self.entries.get(name)?;
        (e.stamp == *stamp && stamp.nanos() < self.written).then_some(e)
    }

    pub fn record(&mut self, name: String, entry: Entry) {
        self.entries.insert(name, entry);
        self.dirty = true;
    }

    pub fn forget(&mut self, name: &str) {
        if self.entries.remove(name).is_some() {
            self.dirty = true;
        }
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(".index")
    }

    /// Loads the index of a store folder; an absent or unreadable one is empty.
    pub fn load(dir: &Path) -> Index {
        let path = Self::path(dir);
        let Ok(mut f) = std::fs::File::open(&path) else { return Index::default() };
        let Ok(meta) = f.metadata() else { return Index::default() };
        let mut bytes = Vec::with_capacity(meta.size() as usize);
        if f.read_to_end(&mut bytes).is_err() {
            return Index::default();
        }
        match decode(&bytes) {
            Some(entries) => Index { entries, written: Stamp::of(&meta).nanos(), dirty: false },
            None => Index::default(),
        }
    }

    /// Writes the index (atomically) if it changed.
    pub fn save(&mut self, dir: &Path) -> std::io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let bytes = encode(&self.entries);
        let tmp = dir.join(format!(".index.{}.tmp", std::process::id()));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
        }
        std::fs::rename(&tmp, Self::path(dir))?;
        self.dirty = false;
        Ok(())
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn encode(entries: &HashMap<String, Entry>) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 160);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (name, e) in entries {
        put_str(&mut out, name);
        out.extend_from_slice(&e.stamp.mtime.to_le_bytes());
        out.extend_from_slice(&e.stamp.mtime_ns.to_le_bytes());
        out.extend_from_slice(&e.stamp.size.to_le_bytes());
        out.extend_from_slice(&e.stamp.ino.to_le_bytes());
        out.extend_from_slice(&(e.held.len() as u32).to_le_bytes());
        for h in &e.held {
            put_str(&mut out, &h.local);
            put_str(&mut out, &h.fingerprint);
            match &h.meta {
                None => out.push(0),
                Some(m) => {
                    out.push(1);
                    out.extend_from_slice(&m.version.to_le_bytes());
                    put_str(&mut out, &m.updated);
                    put_str(&mut out, &m.created);
                    out.push(u8::from(m.deleted) | (u8::from(m.placeholder) << 1));
                }
            }
        }
    }
    out
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

fn decode(b: &[u8]) -> Option<HashMap<String, Entry>> {
    let mut r = Reader { b, at: 0 };
    if r.take(8)? != MAGIC {
        return None;
    }
    let n = r.u32()? as usize;
    let mut entries = HashMap::with_capacity_and_hasher(n.min(1 << 24), Default::default());
    for _ in 0..n {
        let name = r.str()?;
        let stamp = Stamp { mtime: r.i64()?, mtime_ns: r.i64()?, size: r.u64()?, ino: r.u64()? };
        let k = r.u32()? as usize;
        let mut held = Vec::with_capacity(k.min(4096));
        for _ in 0..k {
            let local = r.str()?;
            let fingerprint = r.str()?;
            let meta = match r.u8()? {
                0 => None,
                _ => {
                    let version = r.u64()?;
                    let updated = r.str()?;
                    let created = r.str()?;
                    let flags = r.u8()?;
                    Some(SecretMeta { version, updated, created, deleted: flags & 1 != 0, placeholder: flags & 2 != 0 })
                }
            };
            held.push(Held { local, fingerprint, meta });
        }
        entries.insert(name, Entry { stamp, held });
    }
    (r.at == b.len()).then_some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_judges_staleness() {
        let d = tempfile::tempdir().unwrap();
        let mut idx = Index::default();
        let stamp = Stamp { mtime: 1, mtime_ns: 5, size: 10, ino: 7 };
        idx.record(
            "t1.secrets.json".into(),
            Entry {
                stamp,
                held: vec![Held {
                    local: "openbao.secret[db]".into(),
                    fingerprint: "v2".into(),
                    meta: Some(SecretMeta {
                        version: 2,
                        updated: "u".into(),
                        created: "c".into(),
                        deleted: false,
                        placeholder: true,
                    }),
                }],
            },
        );
        idx.save(d.path()).unwrap();
        let back = Index::load(d.path());
        let e = back.valid("t1.secrets.json", &stamp).expect("valid: older than the index file");
        assert!(e.held[0].meta.as_ref().unwrap().placeholder);
        assert!(back.valid("t1.secrets.json", &Stamp { size: 11, ..stamp }).is_none());
        // a file modified as late as the index was written is not trusted
        let late = Stamp { mtime: i64::MAX / 2_000_000_000, ..stamp };
        let mut idx2 = back;
        idx2.record("x".into(), Entry { stamp: late, held: vec![] });
        assert!(idx2.valid("x", &late).is_none());
        std::fs::write(Index::path(d.path()), b"garbage").unwrap();
        assert!(Index::load(d.path()).entries.is_empty());
    }
}
