//! The render cache: what each tenant folder rendered to, keyed by the digest of its files.
//!
//! Planning 10,000 tenants whose files did not change should not parse, validate and render
//! them again. A tenant folder (`tenants/<unit>/`) whose files hash to the digest recorded
//! here, under the same shared inputs (catalogs, environments, templates, settings, this
//! very binary), renders to the same resources — except that licenses expire: each entry
//! also records the window of time in which its licenses' validity stays as it was. Only
//! folders that validated without a single diagnostic are cached.
//!
//! Entries hold fingerprints (and secret declarations, which the diff reads, and each
//! tenant's name, plan and environment, which the daemon's dashboard shows), not content:
//! a tenant that turns out to need a change is rendered again. The cache lives in
//! `.dotmac/cache/render.bin`; losing it costs time, never correctness.

use crate::binfmt::{Reader, put_fingerprint, put_str};
use crate::load::source::FileStat;
use crate::model::{
    Address, Charset, Content, Coordination, DesiredEntry, SecretSource, SecretSpec, Strategy, TenantLabel,
};
use rustc_hash::FxHashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"DMRC0007";

#[derive(Debug, Clone, PartialEq)]
pub struct CachedTenant {
    pub id: String,
    pub coordination: Coordination,
    pub label: TenantLabel,
    /// The resources it renders, as the planner takes them: address and fingerprint, and
    /// the content of `openbao.secret` resources only (their declaration, which the diff
    /// reads every time).
    pub resources: Vec<DesiredEntry>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UnitEntry {
    /// The digest of the folder's files.
    pub digest: String,
    /// The entry holds from this time (unix seconds) ...
    pub not_before: i64,
    /// ... until just before this one.
    pub not_after: i64,
    /// The `stat` of each of the folder's files (by path) when they were read and hashed to
    /// `digest`; empty if some file could not vouch (changed just before, or a link). Equal
    /// `stat`s now mean the same files, as in git's index, so they need not be read.
    pub files: Vec<(String, FileStat)>,
    /// The folder's own `stat` when it held exactly the paths of `files` (and no folder):
    /// while it keeps it, the folder need not be listed again.
    pub folder: Option<FileStat>,
    pub tenants: Vec<CachedTenant>,
}

#[derive(Debug, Default)]
pub struct RenderCache {
    path: PathBuf,
    shared: String,
    pub units: FxHashMap<String, UnitEntry>,
    dirty: bool,
}

impl RenderCache {
    pub fn file(state_dir: &Path) -> PathBuf {
        state_dir.join("cache").join("render.bin")
    }

    /// Opens the cache of `state_dir`; entries made under other shared inputs are dropped.
    pub fn open(state_dir: &Path, shared: &str) -> RenderCache {
        let path = Self::file(state_dir);
        let units = match std::fs::File::open(&path) {
            Ok(f) => decode(f, shared).unwrap_or_default(),
            Err(_) => FxHashMap::default(),
        };
        RenderCache { path, shared: shared.to_owned(), units, dirty: false }
    }

    /// The entry of `unit` if it holds for these files at time `now` (unix seconds).
    pub fn hit(&self, unit: &str, digest: &str, now: i64) -> Option<&UnitEntry> {
        self.units.get(unit).filter(|e| e.digest == digest && e.not_before <= now && now < e.not_after)
    }

    /// The digest of `unit`'s files if their `stat`s are as recorded and the entry holds at
    /// `now`.
    pub fn known(&self, unit: &str, files: &[(String, FileStat)], now: i64) -> Option<String> {
        let e = self.units.get(unit)?;
        (!e.files.is_empty() && e.files == files && e.not_before <= now && now < e.not_after).then(|| e.digest.clone())
    }

    /// Records the files' `stat`s for an entry made from exactly those files.
    pub fn vouch(&mut self, unit: &str, digest: &str, files: Vec<(String, FileStat)>) {
        if let Some(e) = self.units.get_mut(unit)
            && e.digest == digest
            && e.files != files
        {
            e.files = files;
            self.dirty = true;
        }
    }

    /// The paths of `unit`'s files if the folder has the `stat` recorded with them.
    pub fn listing(&self, unit: &str, folder: &FileStat) -> Option<Vec<String>> {
        let e = self.units.get(unit)?;
        (e.folder.as_ref() == Some(folder) && !e.files.is_empty())
            .then(|| e.files.iter().map(|(p, _)| p.clone()).collect())
    }

    /// Records the `stat` of `unit`'s folder, listed holding the files whose digest is
    /// `digest`. The entry's files have the same paths (the digest covers them), so the
    /// `stat` vouches for that listing.
    pub fn vouch_folder(&mut self, unit: &str, digest: &str, folder: FileStat) {
        if let Some(e) = self.units.get_mut(unit)
            && e.digest == digest
            && !e.files.is_empty()
            && e.folder != Some(folder)
        {
            e.folder = Some(folder);
            self.dirty = true;
        }
    }

    pub fn put(&mut self, unit: String, entry: UnitEntry) {
        if self.units.get(&unit) != Some(&entry) {
            self.units.insert(unit, entry);
            self.dirty = true;
        }
    }

    /// Forgets folders that no longer exist.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        let before = self.units.len();
        self.units.retain(|u, _| keep(u));
        self.dirty |= self.units.len() != before;
    }

    pub fn save(&mut self) -> std::io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".render.{}.tmp", std::process::id()));
        {
            let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
            encode(&mut f, &self.units, &self.shared)?;
            f.flush()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        self.dirty = false;
        Ok(())
    }
}

/// Writes the cache in runs of units, each run's units encoded side by side (the whole file
/// in memory would be 140 MB at 100,000 tenants, every page of it fresh).
fn encode(w: &mut impl Write, units: &FxHashMap<String, UnitEntry>, shared: &str) -> std::io::Result<()> {
    use rayon::prelude::*;
    const RUN: usize = 1024;
    let mut head = Vec::with_capacity(64 + shared.len());
    head.extend_from_slice(MAGIC);
    put_str(&mut head, shared);
    head.extend_from_slice(&(units.len() as u32).to_le_bytes());
    w.write_all(&head)?;
    let all: Vec<(&String, &UnitEntry)> = units.iter().collect();
    for run in all.chunks(RUN) {
        let encoded: Vec<Vec<u8>> = run
            .par_chunks(RUN / 8)
            .map(|part| {
                let mut out = Vec::with_capacity(part.len() * 1536);
                for (unit, e) in part {
                    encode_unit(&mut out, unit, e);
                }
                out
            })
            .collect();
        for out in &encoded {
            w.write_all(out)?;
        }
    }
    Ok(())
}

/// One unit, its length first so that units decode in parallel.
fn encode_unit(out: &mut Vec<u8>, unit: &str, e: &UnitEntry) {
    let at = out.len();
    out.extend_from_slice(&0u32.to_le_bytes());
    put_str(out, unit);
    put_str(out, &e.digest);
    out.extend_from_slice(&e.not_before.to_le_bytes());
    out.extend_from_slice(&e.not_after.to_le_bytes());
    out.extend_from_slice(&(e.files.len() as u32).to_le_bytes());
    let put_stat = |out: &mut Vec<u8>, st: &FileStat| {
        for v in [st.mtime, st.mtime_ns, st.ctime, st.ctime_ns] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&st.size.to_le_bytes());
        out.extend_from_slice(&st.ino.to_le_bytes());
    };
    for (path, st) in &e.files {
        put_str(out, path);
        put_stat(out, st);
    }
    match &e.folder {
        Some(st) => {
            out.push(1);
            put_stat(out, st);
        }
        None => out.push(0),
    }
    out.extend_from_slice(&(e.tenants.len() as u32).to_le_bytes());
    for t in &e.tenants {
        put_str(out, &t.id);
        out.push(match t.coordination.strategy {
            Strategy::ManagementFirst => 0,
            Strategy::Synchronized => 1,
        });
        out.push(u8::from(t.coordination.rollback_on_failure));
        put_str(out, &t.label.name);
        put_str(out, &t.label.plan);
        put_str(out, &t.label.environment);
        out.extend_from_slice(&(t.resources.len() as u32).to_le_bytes());
        for r in &t.resources {
            // The address without the tenant, which every resource of the entry shares.
            let whole = r.address.text();
            put_str(out, &whole[t.id.len() + 1..]);
            put_fingerprint(out, &r.fingerprint);
            match r.content.as_deref() {
                Some(Content::Secret(s)) => {
                    out.push(1);
                    put_str(out, &s.name);
                    match s.source {
                        SecretSource::Generated { length, charset } => {
                            out.push(1);
                            out.extend_from_slice(&length.to_le_bytes());
                            out.push(charset_code(charset));
                        }
                        SecretSource::External => out.push(2),
                    }
                    out.extend_from_slice(&s.rotation_days.unwrap_or(u32::MAX).to_le_bytes());
                    out.push(u8::from(s.auto_rotation));
                }
                _ => out.push(0),
            }
        }
    }
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

const CHARSETS: [Charset; 6] =
    [Charset::Alphanumeric, Charset::Alpha, Charset::Numeric, Charset::Hex, Charset::Base64url, Charset::Ascii];

fn charset_code(c: Charset) -> u8 {
    CHARSETS.iter().position(|x| *x == c).unwrap_or(0) as u8
}

fn charset_of(code: u8) -> Option<Charset> {
    CHARSETS.get(usize::from(code)).copied()
}

/// Reads the cache in batches of units (a few MiB, decoded in parallel) through one reused
/// buffer rather than reading the whole file into memory first.
fn decode(f: impl std::io::Read, shared: &str) -> Option<FxHashMap<String, UnitEntry>> {
    use rayon::prelude::*;
    use std::io::Read;
    // Small in unit tests, so that they cross batches.
    const BATCH: usize = if cfg!(test) { 512 } else { 4 << 20 };
    fn u32_at(f: &mut impl Read) -> Option<u32> {
        let mut b = [0u8; 4];
        f.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }
    let mut f = std::io::BufReader::with_capacity(1 << 16, f);
    let mut magic = [0u8; 8];
    f.read_exact(&mut magic).ok()?;
    let n = u32_at(&mut f)? as usize;
    if magic != *MAGIC || n != shared.len() {
        return None;
    }
    let mut buf = Vec::new();
    (&mut f).take(n as u64).read_to_end(&mut buf).ok()?;
    if buf != shared.as_bytes() {
        return None;
    }
    let n = u32_at(&mut f)? as usize;
    let mut units = FxHashMap::with_capacity_and_hasher(n.min(1 << 22), Default::default());
    let mut ends: Vec<usize> = Vec::new();
    buf.clear();
    for i in 0..n {
        let len = u32_at(&mut f)? as usize;
        // Grows only as bytes arrive: a damaged length cannot ask for gigabytes.
        if (&mut f).take(len as u64).read_to_end(&mut buf).ok()? != len {
            return None;
        }
        ends.push(buf.len());
        if buf.len() >= BATCH || i + 1 == n {
            let parts: Vec<&[u8]> = ends
                .iter()
                .scan(0, |start, &end| {
                    let part = &buf[*start..end];
                    *start = end;
                    Some(part)
                })
                .collect();
            let decoded: Option<Vec<(String, UnitEntry)>> = parts.par_iter().map(|b| decode_unit(b)).collect();
            units.extend(decoded?);
            buf.clear();
            ends.clear();
        }
    }
    // Nothing after the last unit.
    (f.read(&mut [0u8; 1]).ok()? == 0).then_some(units)
}

/// One unit's entry.
fn decode_unit(b: &[u8]) -> Option<(String, UnitEntry)> {
    let mut r = Reader::new(b);
    let unit = r.str()?.to_owned();
    let digest = r.str()?.to_owned();
    let not_before = r.i64()?;
    let not_after = r.i64()?;
    let f = r.u32()? as usize;
    let mut files = Vec::with_capacity(f.min(1 << 16));
    fn stat(r: &mut Reader<'_>) -> Option<FileStat> {
        Some(FileStat {
            mtime: r.i64()?,
            mtime_ns: r.i64()?,
            ctime: r.i64()?,
            ctime_ns: r.i64()?,
            size: r.u64()?,
            ino: r.u64()?,
        })
    }
    for _ in 0..f {
        let path = r.str()?.to_owned();
        files.push((path, stat(&mut r)?));
    }
    let folder = match r.u8()? {
        0 => None,
        _ => Some(stat(&mut r)?),
    };
    let k = r.u32()? as usize;
    let mut tenants = Vec::with_capacity(k.min(1 << 16));
    for _ in 0..k {
        let id = r.str()?.to_owned();
        let strategy = if r.u8()? == 1 { Strategy::Synchronized } else { Strategy::ManagementFirst };
        let rollback_on_failure = r.u8()? != 0;
        let label =
            TenantLabel { name: r.str()?.to_owned(), plan: r.str()?.to_owned(), environment: r.str()?.to_owned() };
        let m = r.u32()? as usize;
        let mut resources = Vec::with_capacity(m.min(1 << 16));
        for _ in 0..m {
            let local = r.str()?;
            let address = Address::from_local(&id, local)?;
            let fingerprint = r.fingerprint()?;
            let secret = match r.u8()? {
                0 => None,
                _ => {
                    let name = r.str()?.to_owned();
                    let source = match r.u8()? {
                        1 => {
                            let length = r.u32()?;
                            SecretSource::Generated { length, charset: charset_of(r.u8()?)? }
                        }
                        _ => SecretSource::External,
                    };
                    let days = r.u32()?;
                    let auto_rotation = r.u8()? != 0;
                    Some(SecretSpec { name, source, rotation_days: (days != u32::MAX).then_some(days), auto_rotation })
                }
            };
            let content = secret.map(|s| Arc::new(Content::Secret(s)));
            resources.push(DesiredEntry { address, fingerprint, content });
        }
        tenants.push(CachedTenant {
            id,
            coordination: Coordination { strategy, rollback_on_failure },
            label,
            resources,
        });
    }
    r.at_end().then_some((unit, UnitEntry { digest, not_before, not_after, files, folder, tenants }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Charset, SecretSource};

    #[test]
    fn entries_round_trip_and_hold_only_in_their_window() {
        let d = tempfile::tempdir().unwrap();
        let mut c = RenderCache::open(d.path(), "shared-1");
        let entry = UnitEntry {
            digest: "abc".into(),
            not_before: 100,
            not_after: 200,
            files: vec![(
                "tenants/t1/tenant.yaml".into(),
                FileStat { mtime: 1, mtime_ns: 2, ctime: 3, ctime_ns: 4, size: 5, ino: 6 },
            )],
            folder: Some(FileStat { mtime: 7, mtime_ns: 8, ctime: 9, ctime_ns: 10, size: 4096, ino: 11 }),
            tenants: vec![CachedTenant {
                id: "t1".into(),
                coordination: Coordination::default(),
                label: TenantLabel {
                    name: "Tenant <1>".into(),
                    plan: "basic".into(),
                    environment: "production".into(),
                },
                resources: vec![
                    DesiredEntry {
                        address: Address::parse("t1/isp.config").unwrap(),
                        fingerprint: crate::fingerprint::Fingerprint::of_bytes(b"x"),
                        content: None,
                    },
                    DesiredEntry {
                        address: Address::parse("t1/openbao.secret[db/password]").unwrap(),
                        fingerprint: "spec:1".into(),
                        content: Some(Arc::new(Content::Secret(SecretSpec {
                            name: "db/password".into(),
                            source: SecretSource::Generated { length: 32, charset: Charset::Hex },
                            rotation_days: Some(30),
                            auto_rotation: true,
                        }))),
                    },
                ],
            }],
        };
        c.put("t1".into(), entry.clone());
        c.save().unwrap();
        let c = RenderCache::open(d.path(), "shared-1");
        assert_eq!(c.hit("t1", "abc", 150), Some(&entry));
        assert!(c.hit("t1", "abc", 200).is_none(), "a license expired: render again");
        assert!(c.hit("t1", "abd", 150).is_none(), "the files changed");
        assert_eq!(c.known("t1", &entry.files, 150).as_deref(), Some("abc"), "known by stat");
        let mut touched = entry.files.clone();
        touched[0].1.ctime_ns += 1;
        assert!(c.known("t1", &touched, 150).is_none(), "a stat changed: read the file");
        assert!(c.known("t1", &entry.files, 200).is_none(), "known, but a license expired");
        let folder = entry.folder.unwrap();
        assert_eq!(c.listing("t1", &folder), Some(vec!["tenants/t1/tenant.yaml".to_owned()]), "listed by stat");
        assert!(c.listing("t1", &FileStat { mtime_ns: 9, ..folder }).is_none(), "an entry added or removed");
        assert!(c.listing("t2", &folder).is_none());
        assert!(RenderCache::open(d.path(), "shared-2").units.is_empty(), "other templates or settings");
        // A damaged file is no cache at all: cut short, with bytes after its end, or
        // claiming a unit longer than the file.
        let file = RenderCache::file(d.path());
        let good = std::fs::read(&file).unwrap();
        let mut many = RenderCache::open(d.path(), "shared-1");
        for i in 0..300 {
            let mut e = entry.clone();
            e.digest = format!("d{i}");
            many.put(format!("u{i}"), e);
        }
        many.save().unwrap();
        let back = RenderCache::open(d.path(), "shared-1");
        assert_eq!(back.units.len(), 301, "units read back across batches");
        for i in [0, 127, 128, 299] {
            let mut e = entry.clone();
            e.digest = format!("d{i}");
            assert_eq!(back.units.get(&format!("u{i}")), Some(&e), "written in parallel runs, read back whole");
        }
        for bad in [good[..good.len() - 1].to_vec(), [good.as_slice(), b"x"].concat(), {
            let mut b = good.clone();
            let at = 8 + 4 + "shared-1".len() + 4; // magic, shared, count: the first unit's length
            b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
            b
        }] {
            std::fs::write(&file, bad).unwrap();
            assert!(RenderCache::open(d.path(), "shared-1").units.is_empty());
        }
    }
}
