//! `kind = "local"`: the embedded default. A real store on disk, not a test double.
//!
//! ```text
//! .dotmac/live/management/<tenant>.tenant.yaml, <tenant>.license.<plugin>.yaml
//! .dotmac/live/isp/<tenant>.isp_config.yaml
//! .dotmac/live/kubernetes/<tenant>.<Kind>.<name>.yaml
//! .dotmac/live/secrets/<tenant>.policy.<name>.hcl
//! .dotmac/live/secrets/<tenant>.secrets.json   metadata in clear, every version AES-256-GCM
//! .dotmac/live/<provider>/.index               a stat cache (see index.rs)
//! .dotmac/secrets.key                          the key (mode 0600), unless key_env is set
//! ```
//!
//! One resource per human-readable file (a tenant's secrets share one encrypted file), so a
//! person can read the live state and an out-of-band edit (drift) is one text edit away.
//! Each provider's files sit in one folder: listing it is one directory read plus one `stat`
//! per file, with the index sparing the reads of unchanged files. Writes go to a temp file
//! renamed over the target (readers see the old or the new file, never half of one);
//! `flush` makes them durable (`syncfs`) before the state store records them.

mod index;

use super::secret_value::SecretValue;
use super::{Expect, LiveResource, Provider, ProviderError, Result, TenantScope};
use crate::fingerprint;
use crate::load::settings::ProviderSettings;
use crate::load::yaml;
use crate::model::{Address, Content, ProviderId, Resource, ResourceKind, SecretMeta};
use crate::yamlfmt;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use index::{Entry, Held, Index, Stamp};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, RwLock};

pub struct LocalStore {
    id: ProviderId,
    dir: PathBuf,
    /// Secrets only: the encryption key.
    cipher: Option<Aes256Gcm>,
    index: OnceLock<RwLock<Index>>,
    dir_made: OnceLock<()>,
}

/// The name of the file holding a tenant's secrets.
const SECRETS_FILE: &str = "secrets.json";

/// What a file of a store holds, by its name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FileKind {
    /// One resource: its address without the tenant.
    One(String),
    /// A tenant's secrets file: many `openbao.secret[...]` resources.
    Secrets,
}

fn safe_part(s: &str) -> bool {
    !s.is_empty() && !s.contains(['/', '\\', '\0']) && s != "." && s != ".." && !s.starts_with('.')
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
        Ok(LocalStore { id, dir, cipher, index: OnceLock::new(), dir_made: OnceLock::new() })
    }

    fn index(&self) -> &RwLock<Index> {
        self.index.get_or_init(|| RwLock::new(Index::load(&self.dir)))
    }

    fn ensure_dir(&self) -> Result<()> {
        if self.dir_made.get().is_none() {
            std::fs::create_dir_all(&self.dir)
                .map_err(|e| ProviderError::Other(format!("{}: {e}", self.dir.display())))?;
            let _ = self.dir_made.set(());
        }
        Ok(())
    }

    /// The file holding an address.
    fn file_of(&self, a: &Address) -> Result<String> {
        let bad = || ProviderError::Other(format!("{a}: no local file can hold this address"));
        if !safe_part(&a.tenant) || a.tenant.contains('.') {
            return Err(bad());
        }
        let name = a.name.as_deref().unwrap_or_default();
        let local = match &a.kind {
            ResourceKind::ManagementTenant => "tenant.yaml".to_owned(),
            ResourceKind::ManagementLicense if safe_part(name) => format!("license.{name}.yaml"),
            ResourceKind::IspConfig => "isp_config.yaml".to_owned(),
            ResourceKind::Kubernetes(k) if safe_part(name) && safe_part(k) && !k.contains('.') => {
                format!("{k}.{name}.yaml")
            }
            ResourceKind::OpenbaoPolicy if safe_part(name) => format!("policy.{name}.hcl"),
            ResourceKind::OpenbaoSecret if crate::validate::checks::secret_name_problem(name).is_none() => {
                SECRETS_FILE.to_owned()
            }
            _ => return Err(bad()),
        };
        Ok(format!("{}.{local}", a.tenant))
    }

    /// The tenant and what a file holds, from its name (the inverse of `file_of`).
    fn parse_name(&self, file: &str) -> Option<(String, FileKind)> {
        let (tenant, rest) = file.split_once('.')?;
        let local = match self.id {
            ProviderId::Management if rest == "tenant.yaml" => "management.tenant".to_owned(),
            ProviderId::Management => {
                format!("management.license[{}]", rest.strip_prefix("license.")?.strip_suffix(".yaml")?)
            }
            ProviderId::Isp if rest == "isp_config.yaml" => "isp.config".to_owned(),
            ProviderId::Kubernetes => {
                let (kind, name) = rest.strip_suffix(".yaml")?.split_once('.')?;
                format!("kubernetes.{kind}[{name}]")
            }
            ProviderId::Secrets if rest == SECRETS_FILE => return Some((tenant.to_owned(), FileKind::Secrets)),
            ProviderId::Secrets => format!("openbao.policy[{}]", rest.strip_prefix("policy.")?.strip_suffix(".hcl")?),
            _ => return None,
        };
        Some((tenant.to_owned(), FileKind::One(local)))
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Reads a live file: its resources with content, or `None` if it does not exist.
    fn read_file(&self, file: &str) -> Result<Option<Vec<LiveResource>>> {
        let Some((tenant, kind)) = self.parse_name(file) else { return Ok(Some(Vec::new())) };
        let path = self.path(file);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ProviderError::Other(format!("{}: {e}", path.display()))),
        };
        let local = match kind {
            FileKind::Secrets => {
                let recs = parse_secrets(&text, &path)?;
                let out = recs
                    .secrets
                    .iter()
                    .map(|(name, rec)| {
                        let content = Content::SecretMeta(rec.meta());
                        LiveResource {
                            address: Address::new(&tenant, ResourceKind::OpenbaoSecret, Some(name)),
                            fingerprint: fingerprint::of(&content),
                            content: Some(content),
                        }
                    })
                    .collect();
                return Ok(Some(out));
            }
            FileKind::One(local) => local,
        };
        let Some(address) = Address::from_local(&tenant, &local) else { return Ok(Some(Vec::new())) };
        let content = match &address.kind {
            ResourceKind::IspConfig | ResourceKind::OpenbaoPolicy => Content::Text(text),
            _ => match yaml::parse_documents(&text) {
                // A file a person broke is still live content: it shows as drift.
                Ok(mut docs) if docs.len() == 1 => Content::Json(docs.remove(0).value),
                _ => Content::Text(text),
            },
        };
        Ok(Some(vec![LiveResource { fingerprint: fingerprint::of(&content), address, content: Some(content) }]))
    }

    /// The current live resource at an address (read from its file).
    fn current(&self, a: &Address) -> Result<Option<LiveResource>> {
        let file = self.file_of(a)?;
        Ok(self.read_file(&file)?.and_then(|rs| rs.into_iter().find(|r| &r.address == a)))
    }

    fn check(&self, a: &Address, expect: &Expect) -> Result<Option<LiveResource>> {
        let cur = self.current(a)?;
        let found = cur.as_ref().map(|c| c.fingerprint.clone());
        let ok = match expect {
            Expect::Any => true,
            Expect::Absent => found.is_none(),
            Expect::Fingerprint(f) => found.as_deref() == Some(f.as_str()),
        };
        if !ok {
            return Err(ProviderError::Conflict {
                address: a.to_string(),
                expected: match expect {
                    Expect::Fingerprint(f) => f.clone(),
                    _ => "nothing".into(),
                },
                found: found.unwrap_or_else(|| "nothing".into()),
            });
        }
        Ok(cur)
    }

    /// Writes a file and records it in the index with the resources it now holds.
    fn write_file(&self, file: &str, bytes: &[u8], held: Vec<Held>) -> Result<()> {
        self.ensure_dir()?;
        let path = self.path(file);
        write_in_place(&self.dir, &path, bytes)?;
        if let Ok(m) = std::fs::symlink_metadata(&path) {
            let mut idx = self.index().write().unwrap_or_else(|p| p.into_inner());
            idx.record(file.to_owned(), Entry { stamp: Stamp::of(&m), held });
        }
        Ok(())
    }

    fn remove_file(&self, file: &str) -> Result<()> {
        let path = self.path(file);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ProviderError::Other(format!("{}: {e}", path.display()))),
        }
        self.index().write().unwrap_or_else(|p| p.into_inner()).forget(file);
        Ok(())
    }

    fn cipher(&self) -> Result<&Aes256Gcm> {
        self.cipher.as_ref().ok_or_else(|| ProviderError::Other("not a secrets store".into()))
    }

    fn aad(a: &Address, version: u64) -> String {
        format!("dotmac-gitops/v1/{}/{}/{version}", a.tenant, a.name.as_deref().unwrap_or_default())
    }

    fn read_secrets(&self, tenant: &str) -> Result<SecretsFile> {
        let path = self.path(&format!("{tenant}.{SECRETS_FILE}"));
        match std::fs::read_to_string(&path) {
            Ok(t) => parse_secrets(&t, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SecretsFile::default()),
            Err(e) => Err(ProviderError::Other(format!("{}: {e}", path.display()))),
        }
    }

    fn write_secrets(&self, tenant: &str, recs: &SecretsFile) -> Result<()> {
        let file = format!("{tenant}.{SECRETS_FILE}");
        if recs.secrets.is_empty() {
            return self.remove_file(&file);
        }
        let held = recs
            .secrets
            .iter()
            .map(|(name, rec)| {
                let meta = rec.meta();
                Held {
                    local: format!("openbao.secret[{name}]"),
                    fingerprint: fingerprint::secret_meta(&meta),
                    meta: Some(meta),
                }
            })
            .collect();
        let text = serde_json::to_string_pretty(recs).map_err(ProviderError::other)?;
        self.write_file(&file, text.as_bytes(), held)
    }

    /// Adds a version holding `value` to a secret (creating it). `written`: when the value
    /// was first written, for a restored old value (its age, and so its rotation, goes on
    /// from then); `None`: now.
    fn write_secret_version(
        &self,
        a: &Address,
        value: &[u8],
        expect: &Expect,
        placeholder: bool,
        written: Option<String>,
    ) -> Result<LiveResource> {
        self.check(a, expect)?;
        let name = a.name.clone().unwrap_or_default();
        let mut recs = self.read_secrets(&a.tenant)?;
        let rec = recs.secrets.entry(name).or_default();
        let now = jiff::Timestamp::now().to_string();
        let version = rec.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(ProviderError::other)?;
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
        let content = Content::SecretMeta(rec.meta());
        self.write_secrets(&a.tenant, &recs)?;
        Ok(LiveResource { address: a.clone(), fingerprint: fingerprint::of(&content), content: Some(content) })
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

    /// Puts a value for a secret a person owns (an external secret), as `secret put` does.
    pub fn put_external(&self, a: &Address, value: &SecretValue) -> Result<LiveResource> {
        self.write_secret_version(a, value.expose(), &Expect::Any, false, None)
    }

    /// The value of a secret's current version. Used only to deliver a secret where it is
    /// needed, and by tests that check values never leak.
    pub fn reveal(&self, a: &Address) -> Result<Option<SecretValue>> {
        let recs = self.read_secrets(&a.tenant)?;
        let Some(rec) = recs.secrets.get(a.name.as_deref().unwrap_or_default()) else { return Ok(None) };
        if rec.deleted {
            return Ok(None);
        }
        self.read_version(a, rec, rec.current_version).map(Some)
    }

    /// The live resources a file holds, from the index when its `stat` is unchanged.
    fn resources_of(&self, tenant: &str, held: &[Held]) -> Vec<LiveResource> {
        held.iter()
            .filter_map(|h| {
                Some(LiveResource {
                    address: Address::from_local(tenant, &h.local)?,
                    fingerprint: h.fingerprint.clone(),
                    content: h.meta.clone().map(Content::SecretMeta),
                })
            })
            .collect()
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
        let names: Vec<String> = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| !n.starts_with('.'))
                .filter(|n| n.split_once('.').is_some_and(|(t, _)| scope.contains(t)))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(ProviderError::Other(format!("{}: {e}", self.dir.display()))),
        };
        // One directory handle: each file is then a `stat` of one path component.
        let dir = match std::fs::File::open(&self.dir) {
            Ok(d) => Some(d),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(ProviderError::Other(format!("{}: {e}", self.dir.display()))),
        };
        type Acc = (Vec<LiveResource>, Vec<(String, Option<Entry>)>);
        let (out, updates): Acc = {
            let idx = self.index().read().unwrap_or_else(|p| p.into_inner());
            names
                .par_iter()
                .try_fold(
                    || (Vec::new(), Vec::new()),
                    |(mut out, mut updates): Acc, name| -> Result<Acc> {
                        let Some((tenant, _)) = name.split_once('.') else { return Ok((out, updates)) };
                        let Some(stamp) = dir.as_ref().and_then(|d| stat_at(d, name)) else {
                            updates.push((name.clone(), None));
                            return Ok((out, updates));
                        };
                        let Some(stamp) = stamp else { return Ok((out, updates)) };
                        if let Some(e) = idx.valid(name, &stamp) {
                            out.extend(self.resources_of(tenant, &e.held));
                            return Ok((out, updates));
                        }
                        let Some(rs) = self.read_file(name)? else {
                            updates.push((name.clone(), None));
                            return Ok((out, updates));
                        };
                        let held = rs
                            .iter()
                            .map(|r| Held {
                                local: r.address.to_string()[tenant.len() + 1..].to_owned(),
                                fingerprint: r.fingerprint.clone(),
                                meta: match &r.content {
                                    Some(Content::SecretMeta(m)) => Some(m.clone()),
                                    _ => None,
                                },
                            })
                            .collect();
                        out.extend(rs);
                        updates.push((name.clone(), Some(Entry { stamp, held })));
                        Ok((out, updates))
                    },
                )
                .try_reduce(
                    || (Vec::new(), Vec::new()),
                    |(mut a, mut b), (c, d)| {
                        a.extend(c);
                        b.extend(d);
                        Ok((a, b))
                    },
                )?
        };
        let present: HashSet<&str> = names.iter().map(String::as_str).collect();
        let mut idx = self.index().write().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<String> = idx
            .entries
            .keys()
            .filter(|k| !present.contains(k.as_str()))
            .filter(|k| k.split_once('.').is_some_and(|(t, _)| scope.contains(t)))
            .cloned()
            .collect();
        for k in gone {
            idx.forget(&k);
        }
        for (name, entry) in updates {
            match entry {
                Some(e) => idx.record(name, e),
                None => idx.forget(&name),
            }
        }
        if idx.dirty && self.dir.exists() {
            let _ = idx.save(&self.dir);
        }
        Ok(out)
    }

    fn fetch(&self, addresses: &[Address]) -> Result<Vec<LiveResource>> {
        let mut files: BTreeMap<String, Vec<&Address>> = BTreeMap::new();
        for a in addresses {
            files.entry(self.file_of(a)?).or_default().push(a);
        }
        let mut out = Vec::new();
        for (file, wanted) in files {
            if let Some(rs) = self.read_file(&file)? {
                out.extend(rs.into_iter().filter(|r| wanted.contains(&&r.address)));
            }
        }
        Ok(out)
    }

    fn put(&self, r: &Resource, secret: Option<&SecretValue>, expect: &Expect) -> Result<LiveResource> {
        let a = &r.address;
        tracing::trace!(address = %a, ?expect, secret = ?secret, "local put");
        if a.provider() != self.id {
            return Err(ProviderError::Other(format!("{a} does not belong to the {} store", self.id)));
        }
        if let ResourceKind::OpenbaoSecret = a.kind {
            let value = secret.ok_or_else(|| ProviderError::Other(format!("{a}: no value to write")))?;
            let placeholder =
                matches!(&r.content, Content::Secret(s) if matches!(s.source, crate::model::SecretSource::External));
            return self.write_secret_version(a, value.expose(), expect, placeholder, None);
        }
        self.check(a, expect)?;
        let text = match &r.content {
            Content::Text(t) => t.clone(),
            Content::Json(v) => yamlfmt::to_yaml(v),
            other => return Err(ProviderError::Other(format!("{a}: cannot store {other:?} here"))),
        };
        let content = r.content.clone();
        let fp = fingerprint::of(&content);
        let file = self.file_of(a)?;
        let local = a.to_string()[a.tenant.len() + 1..].to_owned();
        self.write_file(&file, text.as_bytes(), vec![Held { local, fingerprint: fp.clone(), meta: None }])?;
        Ok(LiveResource { address: a.clone(), fingerprint: fp, content: Some(content) })
    }

    fn delete(&self, a: &Address, expect: &Expect, destroy: bool) -> Result<()> {
        tracing::trace!(address = %a, ?expect, destroy, "local delete");
        if self.check(a, expect)?.is_none() {
            return Ok(());
        }
        if a.kind == ResourceKind::OpenbaoSecret {
            let mut recs = self.read_secrets(&a.tenant)?;
            let name = a.name.clone().unwrap_or_default();
            if destroy {
                recs.secrets.remove(&name);
            } else if let Some(rec) = recs.secrets.get_mut(&name) {
                // Soft delete: the versions stay, the current one is marked deleted.
                rec.deleted = true;
                rec.updated = jiff::Timestamp::now().to_string();
            }
            return self.write_secrets(&a.tenant, &recs);
        }
        self.remove_file(&self.file_of(a)?)
    }

    fn close(&self) {
        self.save_index();
    }

    fn flush(&self) -> Result<()> {
        if !self.dir.exists() {
            return Ok(());
        }
        sync_fs(&self.dir)
    }

    fn restore_secret(&self, a: &Address, version: u64) -> Result<LiveResource> {
        let recs = self.read_secrets(&a.tenant)?;
        let rec = recs
            .secrets
            .get(a.name.as_deref().unwrap_or_default())
            .ok_or_else(|| ProviderError::Other(format!("{a}: no such secret to restore")))?;
        let value = self.read_version(a, rec, version)?;
        let written = rec.versions.iter().find(|v| v.version == version).map(|v| v.created.clone());
        self.write_secret_version(a, value.expose(), &Expect::Any, rec.placeholder, written)
    }
}

impl LocalStore {
    /// Keeps the index of what this process wrote (a cache: losing it costs only time).
    fn save_index(&self) {
        if let Some(lock) = self.index.get() {
            let mut idx = lock.write().unwrap_or_else(|p| p.into_inner());
            if idx.dirty && self.dir.exists() {
                let _ = idx.save(&self.dir);
            }
        }
    }
}

impl Drop for LocalStore {
    fn drop(&mut self) {
        self.save_index();
    }
}

/// A tenant's secrets file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SecretsFile {
    secrets: BTreeMap<String, SecretRecord>,
}

fn parse_secrets(text: &str, path: &Path) -> Result<SecretsFile> {
    serde_json::from_str(text).map_err(|e| ProviderError::Other(format!("{}: not a secrets file: {e}", path.display())))
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

/// The `stat` of `name` in the folder `dir` (`None` if absent; `Some(None)` if not a regular
/// file), without following links and without walking the folder's path again.
fn stat_at(dir: &std::fs::File, name: &str) -> Option<Option<Stamp>> {
    use std::os::fd::AsRawFd;
    let c = std::ffi::CString::new(name).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: a valid directory descriptor, a NUL-terminated name, and a buffer for the result.
    let rc = unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), st.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    if rc != 0 {
        return None;
    }
    // SAFETY: fstatat returned 0, so the buffer is filled.
    let st = unsafe { st.assume_init() };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Some(None);
    }
    Some(Some(Stamp { mtime: st.st_mtime, mtime_ns: st.st_mtime_nsec, size: st.st_size as u64, ino: st.st_ino }))
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes through a temp file in `dir` (which exists) and a rename.
fn write_in_place(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".tmp.{}.{n}", std::process::id()));
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

/// Flushes the file system holding `dir` (Linux `syncfs`; `fsync` of the folder elsewhere).
pub fn sync_fs(dir: &Path) -> Result<()> {
    let Ok(f) = std::fs::File::open(dir) else { return Ok(()) };
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid descriptor we own for the duration of the call.
        if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
            return Err(ProviderError::Other(format!("{}: {}", dir.display(), std::io::Error::last_os_error())));
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        f.sync_all().map_err(|e| ProviderError::Other(format!("{}: {e}", dir.display())))
    }
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

    fn store(dir: &Path, id: ProviderId) -> LocalStore {
        LocalStore::open(dir, id, &ProviderSettings::default()).unwrap()
    }

    #[test]
    fn files_and_addresses_map_both_ways() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path(), ProviderId::Kubernetes);
        let a = Address::parse("t1/kubernetes.Deployment[isp.framework]").unwrap();
        let f = s.file_of(&a).unwrap();
        assert_eq!(f, "t1.Deployment.isp.framework.yaml");
        assert_eq!(s.parse_name(&f), Some(("t1".into(), FileKind::One("kubernetes.Deployment[isp.framework]".into()))));
        let sec = store(d.path(), ProviderId::Secrets);
        let p = Address::parse("t1/openbao.policy[t1-read.secrets]").unwrap();
        assert_eq!(
            sec.parse_name(&sec.file_of(&p).unwrap()),
            Some(("t1".into(), FileKind::One(p.to_string()[3..].into())))
        );
        assert!(s.file_of(&Address::new("t.1", ResourceKind::Kubernetes("Pod".into()), Some("p"))).is_err());
        assert!(s.file_of(&Address::new("..", ResourceKind::Kubernetes("Pod".into()), Some("p"))).is_err());
        assert!(s.file_of(&Address::new("t1", ResourceKind::Kubernetes("Pod".into()), Some("../p"))).is_err());
    }

    #[test]
    fn secrets_are_encrypted_versioned_and_restorable() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path(), ProviderId::Secrets);
        let a = Address::parse("t1/openbao.secret[db/password]").unwrap();
        let r = Resource {
            address: a.clone(),
            content: Content::Secret(SecretSpec {
                name: "db/password".into(),
                source: SecretSource::Generated { length: 20, charset: Charset::Alphanumeric },
                rotation_days: None,
                auto_rotation: true,
            }),
        };
        let v1 = SecretValue::from_bytes(b"first-value-PLANTED".to_vec());
        let live = s.put(&r, Some(&v1), &Expect::Absent).unwrap();
        assert_eq!(live.fingerprint, "v1");
        let on_disk = std::fs::read_to_string(s.path(&s.file_of(&a).unwrap())).unwrap();
        assert!(!on_disk.contains("first-value-PLANTED"));
        // a stale expectation is a conflict, not an overwrite
        let v2 = SecretValue::from_bytes(b"second".to_vec());
        assert!(matches!(s.put(&r, Some(&v2), &Expect::Absent), Err(ProviderError::Conflict { .. })));
        s.put(&r, Some(&v2), &Expect::Fingerprint("v1".into())).unwrap();
        assert_eq!(s.reveal(&a).unwrap().unwrap().expose(), b"second");
        let back = s.restore_secret(&a, 1).unwrap();
        assert_eq!(back.fingerprint, "v3");
        // The restored value is as old as version 1: its rotation is not put off.
        let recs = s.read_secrets("t1").unwrap();
        let rec = &recs.secrets["db/password"];
        assert_eq!(rec.updated, rec.versions[0].created);
        assert_eq!(s.reveal(&a).unwrap().unwrap().expose(), b"first-value-PLANTED");
        s.delete(&a, &Expect::Any, false).unwrap();
        assert_eq!(s.current(&a).unwrap().unwrap().fingerprint, "v3-deleted");
        s.delete(&a, &Expect::Any, true).unwrap();
        assert!(s.current(&a).unwrap().is_none());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(d.path().join("secrets.key")).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
}
