//! `kind = "local"`: the embedded default. A real store on disk, not a test double.
//!
//! ```text
//! .dotmac/live/management/<tenant>/tenant.yaml, license.<plugin>.yaml
//! .dotmac/live/isp/<tenant>/isp_config.yaml
//! .dotmac/live/kubernetes/<tenant>/<Kind>.<name>.yaml
//! .dotmac/live/secrets/<tenant>/policy.<name>.hcl
//! .dotmac/live/secrets/<tenant>/secret/<name>.json     metadata in clear, values AES-256-GCM
//! .dotmac/secrets.key                                   the key (mode 0600), unless key_env is set
//! ```
//!
//! One resource per human-readable file, so that a person can read the live state and an
//! out-of-band edit (drift) is one text edit away. Writes go to a temp file that is renamed
//! over the target (readers see the old or the new file, never half of one); `flush` makes
//! them durable (`syncfs`) before the state store records them.

use super::secret_value::SecretValue;
use super::{Expect, LiveResource, Provider, ProviderError, Result, TenantScope};
use crate::fingerprint;
use crate::load::settings::ProviderSettings;
use crate::load::yaml;
use crate::model::{Address, Content, ProviderId, Resource, ResourceKind, SecretMeta};
use crate::yamlfmt;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct LocalStore {
    id: ProviderId,
    dir: PathBuf,
    /// Secrets only: the encryption key.
    cipher: Option<Aes256Gcm>,
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
        Ok(LocalStore { id, dir, cipher })
    }

    fn tenant_dir(&self, tenant: &str) -> PathBuf {
        self.dir.join(tenant)
    }

    /// The file of an address, relative to the tenant's folder.
    fn file_of(&self, a: &Address) -> Result<PathBuf> {
        let name = a.name.as_deref().unwrap_or_default();
        let safe = |s: &str| !s.is_empty() && !s.contains(['/', '\\', '\0']) && s != "." && s != "..";
        let rel = match &a.kind {
            ResourceKind::ManagementTenant => "tenant.yaml".to_owned(),
            ResourceKind::ManagementLicense if safe(name) => format!("license.{name}.yaml"),
            ResourceKind::IspConfig => "isp_config.yaml".to_owned(),
            ResourceKind::Kubernetes(k) if safe(name) && safe(k) && !k.contains('.') => format!("{k}.{name}.yaml"),
            ResourceKind::OpenbaoPolicy if safe(name) => format!("policy.{name}.hcl"),
            ResourceKind::OpenbaoSecret if crate::validate::checks::secret_name_problem(name).is_none() => {
                format!("secret/{name}.json")
            }
            _ => return Err(ProviderError::Other(format!("{a}: no local file for this address"))),
        };
        if !safe(&a.tenant) {
            return Err(ProviderError::Other(format!("{a}: unsafe tenant id")));
        }
        Ok(self.tenant_dir(&a.tenant).join(rel))
    }

    /// The address of a file in a tenant's folder (the inverse of `file_of`).
    fn address_of(&self, tenant: &str, rel: &str) -> Option<Address> {
        let (kind, name) = if rel == "tenant.yaml" {
            (ResourceKind::ManagementTenant, None)
        } else if rel == "isp_config.yaml" {
            (ResourceKind::IspConfig, None)
        } else if let Some(n) = rel.strip_prefix("license.").and_then(|r| r.strip_suffix(".yaml")) {
            (ResourceKind::ManagementLicense, Some(n))
        } else if let Some(n) = rel.strip_prefix("policy.").and_then(|r| r.strip_suffix(".hcl")) {
            (ResourceKind::OpenbaoPolicy, Some(n))
        } else if let Some(n) = rel.strip_prefix("secret/").and_then(|r| r.strip_suffix(".json")) {
            (ResourceKind::OpenbaoSecret, Some(n))
        } else if let Some(stem) = rel.strip_suffix(".yaml") {
            let (k, n) = stem.split_once('.')?;
            (ResourceKind::Kubernetes(k.to_owned()), Some(n))
        } else {
            return None;
        };
        let a = Address::new(tenant, kind, name);
        (a.provider() == self.id).then_some(a)
    }

    /// Reads one live file into a resource.
    fn read_file(&self, address: Address, path: &Path) -> Result<Option<LiveResource>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ProviderError::Other(format!("{}: {e}", path.display()))),
        };
        let content = match &address.kind {
            ResourceKind::IspConfig | ResourceKind::OpenbaoPolicy => Content::Text(text),
            ResourceKind::OpenbaoSecret => {
                let rec: SecretRecord = serde_json::from_str(&text)
                    .map_err(|e| ProviderError::Other(format!("{}: not a secret record: {e}", path.display())))?;
                Content::SecretMeta(rec.meta())
            }
            _ => match yaml::parse_documents(&text) {
                // A file a person broke is still live content: it shows as drift.
                Ok(mut docs) if docs.len() == 1 => Content::Json(docs.remove(0).value),
                _ => Content::Text(text),
            },
        };
        Ok(Some(LiveResource { fingerprint: fingerprint::of(&content), address, content: Some(content) }))
    }

    fn list_tenant(&self, tenant: &str) -> Result<Vec<LiveResource>> {
        let dir = self.tenant_dir(tenant);
        let mut files = Vec::new();
        collect_files(&dir, "", &mut files);
        let mut out = Vec::with_capacity(files.len());
        for rel in files {
            let Some(address) = self.address_of(tenant, &rel) else { continue };
            if let Some(r) = self.read_file(address, &dir.join(&rel))? {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn current(&self, a: &Address) -> Result<Option<LiveResource>> {
        let path = self.file_of(a)?;
        self.read_file(a.clone(), &path)
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

    fn cipher(&self) -> Result<&Aes256Gcm> {
        self.cipher.as_ref().ok_or_else(|| ProviderError::Other("not a secrets store".into()))
    }

    fn aad(a: &Address, version: u64) -> String {
        format!("dotmac-gitops/v1/{}/{}/{version}", a.tenant, a.name.as_deref().unwrap_or_default())
    }

    /// Adds a version holding `value` to the secret's record (creating the record).
    fn write_secret_version(
        &self,
        a: &Address,
        value: &[u8],
        expect: &Expect,
        placeholder: bool,
    ) -> Result<LiveResource> {
        let path = self.file_of(a)?;
        self.check(a, expect)?;
        let mut rec = match std::fs::read_to_string(&path) {
            Ok(t) => serde_json::from_str::<SecretRecord>(&t).map_err(ProviderError::other)?,
            Err(_) => SecretRecord::default(),
        };
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
        rec.updated = now.clone();
        rec.deleted = false;
        rec.placeholder = placeholder;
        rec.versions.push(StoredVersion { version, created: now, nonce: hex(&nonce), ciphertext: hex(&ciphertext) });
        let text = serde_json::to_string_pretty(&rec).map_err(ProviderError::other)?;
        write_atomic(&path, text.as_bytes())?;
        let content = Content::SecretMeta(rec.meta());
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
        self.write_secret_version(a, value.expose(), &Expect::Any, false)
    }

    /// The value of a secret's current version. Used only to deliver a secret where it is
    /// needed, and by tests that check values never leak.
    pub fn reveal(&self, a: &Address) -> Result<Option<SecretValue>> {
        let path = self.file_of(a)?;
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
        let rec: SecretRecord = serde_json::from_str(&text).map_err(ProviderError::other)?;
        if rec.deleted {
            return Ok(None);
        }
        self.read_version(a, &rec, rec.current_version).map(Some)
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
        let tenants: Vec<String> = match scope {
            TenantScope::Only(set) => set.iter().cloned().collect(),
            TenantScope::All => match std::fs::read_dir(&self.dir) {
                Ok(entries) => entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| !n.starts_with('.'))
                    .collect(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(ProviderError::Other(format!("{}: {e}", self.dir.display()))),
            },
        };
        let parts: Vec<Result<Vec<LiveResource>>> = tenants.par_iter().map(|t| self.list_tenant(t)).collect();
        let mut out = Vec::new();
        for p in parts {
            out.extend(p?);
        }
        Ok(out)
    }

    fn fetch(&self, addresses: &[Address]) -> Result<Vec<LiveResource>> {
        let mut out = Vec::new();
        for a in addresses {
            if let Some(r) = self.current(a)? {
                out.push(r);
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
            return self.write_secret_version(a, value.expose(), expect, placeholder);
        }
        self.check(a, expect)?;
        let text = match &r.content {
            Content::Text(t) => t.clone(),
            Content::Json(v) => yamlfmt::to_yaml(v),
            other => return Err(ProviderError::Other(format!("{a}: cannot store {other:?} here"))),
        };
        write_atomic(&self.file_of(a)?, text.as_bytes())?;
        let content = r.content.clone();
        Ok(LiveResource { address: a.clone(), fingerprint: fingerprint::of(&content), content: Some(content) })
    }

    fn delete(&self, a: &Address, expect: &Expect, destroy: bool) -> Result<()> {
        tracing::trace!(address = %a, ?expect, destroy, "local delete");
        let path = self.file_of(a)?;
        if self.check(a, expect)?.is_none() {
            return Ok(());
        }
        if a.kind == ResourceKind::OpenbaoSecret && !destroy {
            // Soft delete: the versions stay, the current one is marked deleted.
            let text = std::fs::read_to_string(&path).map_err(ProviderError::other)?;
            let mut rec: SecretRecord = serde_json::from_str(&text).map_err(ProviderError::other)?;
            rec.deleted = true;
            rec.updated = jiff::Timestamp::now().to_string();
            let text = serde_json::to_string_pretty(&rec).map_err(ProviderError::other)?;
            return write_atomic(&path, text.as_bytes());
        }
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ProviderError::Other(format!("{}: {e}", path.display()))),
        }
    }

    fn flush(&self) -> Result<()> {
        sync_fs(&self.dir)
    }

    fn restore_secret(&self, a: &Address, version: u64) -> Result<LiveResource> {
        let path = self.file_of(a)?;
        let text = std::fs::read_to_string(&path).map_err(ProviderError::other)?;
        let rec: SecretRecord = serde_json::from_str(&text).map_err(ProviderError::other)?;
        let value = self.read_version(a, &rec, version)?;
        self.write_secret_version(a, value.expose(), &Expect::Any, rec.placeholder)
    }
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

/// Every file under `dir`, relative to it, skipping dot-files (temp files).
fn collect_files(dir: &Path, rel: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.filter_map(|e| e.ok()) {
        let Ok(name) = e.file_name().into_string() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let child = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
        match e.file_type() {
            Ok(t) if t.is_dir() => collect_files(&e.path(), &child, out),
            Ok(t) if t.is_file() => out.push(child),
            _ => {}
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
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
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
        assert!(f.ends_with("t1/Deployment.isp.framework.yaml"));
        assert_eq!(s.address_of("t1", "Deployment.isp.framework.yaml"), Some(a));
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
        let on_disk = std::fs::read_to_string(s.file_of(&a).unwrap()).unwrap();
        assert!(!on_disk.contains("first-value-PLANTED"));
        // a stale expectation is a conflict, not an overwrite
        let v2 = SecretValue::from_bytes(b"second".to_vec());
        assert!(matches!(s.put(&r, Some(&v2), &Expect::Absent), Err(ProviderError::Conflict { .. })));
        s.put(&r, Some(&v2), &Expect::Fingerprint("v1".into())).unwrap();
        assert_eq!(s.reveal(&a).unwrap().unwrap().expose(), b"second");
        let back = s.restore_secret(&a, 1).unwrap();
        assert_eq!(back.fingerprint, "v3");
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
