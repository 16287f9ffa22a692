//! Content fingerprints: `sha256:<hex>` of a canonical form, so that two resources with the
//! same meaning have the same fingerprint whatever their key order or whitespace.
//! Secrets are fingerprinted by version metadata, never by value.

use crate::model::{Content, SecretMeta, SecretSpec};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fmt;

/// A fingerprint as it is held in memory. Nearly all are `sha256:` and 64 hex digits: those
/// are kept as their 32 bytes (40 bytes in all, against 104 for the text in a `String`, for
/// each of the millions a plan of 100,000 tenants holds). Any other text (a secret's `v3`,
/// `v3-deleted`, `spec:…`) is kept as written. It reads, prints, compares and serialises as
/// its text, so files and databases see the same strings as before.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Fingerprint(Repr);

#[derive(Clone, PartialEq, Eq, Hash)]
enum Repr {
    Sha256([u8; 32]),
    Text(Box<str>),
}

impl Default for Repr {
    fn default() -> Self {
        Repr::Text(Box::from(""))
    }
}

const SHA_PREFIX: &str = "sha256:";
const SHA_LEN: usize = SHA_PREFIX.len() + 64;

impl Fingerprint {
    /// The fingerprint `sha256:<hex of digest>`.
    pub fn sha256(digest: [u8; 32]) -> Self {
        Fingerprint(Repr::Sha256(digest))
    }

    /// The SHA-256 these bytes hash to, as a fingerprint.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Fingerprint::sha256(Sha256::digest(bytes).into())
    }

    /// The 32 bytes of a `sha256:` fingerprint.
    pub fn digest(&self) -> Option<&[u8; 32]> {
        match &self.0 {
            Repr::Sha256(d) => Some(d),
            Repr::Text(_) => None,
        }
    }

    /// The text of a fingerprint that is not `sha256:`.
    pub fn text(&self) -> Option<&str> {
        match &self.0 {
            Repr::Sha256(_) => None,
            Repr::Text(t) => Some(t),
        }
    }

    /// Calls `f` with the text, written on the stack for a `sha256:` fingerprint.
    pub fn with_str<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        match &self.0 {
            Repr::Text(t) => f(t),
            Repr::Sha256(d) => {
                let mut buf = [0u8; SHA_LEN];
                buf[..SHA_PREFIX.len()].copy_from_slice(SHA_PREFIX.as_bytes());
                for (i, b) in d.iter().enumerate() {
                    buf[SHA_PREFIX.len() + 2 * i] = HEX[usize::from(b >> 4)];
                    buf[SHA_PREFIX.len() + 2 * i + 1] = HEX[usize::from(b & 15)];
                }
                f(std::str::from_utf8(&buf).unwrap_or_default())
            }
        }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// A fingerprint as a message shows it, or `none` (`nothing`, `absent`) when there is none.
pub fn shown(fp: Option<&Fingerprint>, none: &str) -> String {
    fp.map_or_else(|| none.to_owned(), ToString::to_string)
}

/// `sha256:` and 64 lowercase hex digits, as bytes; anything else (upper case too) is kept as
/// text, so that the text read back is always the text given.
fn parse_sha(s: &str) -> Option<[u8; 32]> {
    let hex = s.strip_prefix(SHA_PREFIX)?.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    // A table and one check at the end rather than a branch per digit: a no-op plan of
    // 100,000 tenants reads 1.3 million recorded fingerprints, and this was 5 % of its CPU.
    let mut out = [0u8; 32];
    let mut bad = 0u8;
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let (hi, lo) = (HEX_VALUE[usize::from(pair[0])], HEX_VALUE[usize::from(pair[1])]);
        bad |= hi | lo;
        *o = (hi << 4) | lo;
    }
    (bad < 16).then_some(out)
}

/// The value of a lower-case hex digit; 0xff for any other byte.
const HEX_VALUE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

impl From<&str> for Fingerprint {
    fn from(s: &str) -> Self {
        match parse_sha(s) {
            Some(d) => Fingerprint(Repr::Sha256(d)),
            None => Fingerprint(Repr::Text(Box::from(s))),
        }
    }
}

impl From<String> for Fingerprint {
    fn from(s: String) -> Self {
        match parse_sha(&s) {
            Some(d) => Fingerprint(Repr::Sha256(d)),
            None => Fingerprint(Repr::Text(s.into_boxed_str())),
        }
    }
}

impl From<&String> for Fingerprint {
    fn from(s: &String) -> Self {
        Fingerprint::from(s.as_str())
    }
}

impl PartialEq<str> for Fingerprint {
    fn eq(&self, other: &str) -> bool {
        match &self.0 {
            Repr::Text(t) => **t == *other,
            Repr::Sha256(d) => parse_sha(other).is_some_and(|o| o == *d),
        }
    }
}

impl PartialEq<&str> for Fingerprint {
    fn eq(&self, other: &&str) -> bool {
        *self == **other
    }
}

impl PartialOrd for Fingerprint {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Fingerprint {
    /// The order of the texts.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match (&self.0, &other.0) {
            (Repr::Sha256(a), Repr::Sha256(b)) => a.cmp(b),
            (Repr::Text(a), Repr::Text(b)) => a.cmp(b),
            _ => self.with_str(|a| other.with_str(|b| a.cmp(b))),
        }
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.with_str(|s| f.write_str(s))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.with_str(|s| fmt::Debug::fmt(s, f))
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.with_str(|t| s.serialize_str(t))
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Fingerprint::from(String::deserialize(d)?))
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::providers::local::hex(&Sha256::digest(bytes))
}

/// JSON with object keys sorted, no insignificant whitespace.
pub fn canonical_json(v: &Value) -> String {
    // serde_json writes UTF-8 only.
    String::from_utf8(canonical_bytes(v)).unwrap_or_default()
}

/// The bytes of `canonical_json`, which are what a fingerprint hashes.
fn canonical_bytes(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    write_canonical(v, &mut out);
    out
}

/// Writes `v` as canonical JSON. Each object's entries are sorted once, as pairs, and keys
/// and scalars are written straight into `out` (no text of their own).
fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let _ = serde_json::to_writer(&mut *out, k);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, item) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        other => {
            let _ = serde_json::to_writer(&mut *out, other);
        }
    }
}

/// Sorts object keys recursively (for stable, readable output of structured content).
pub fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Value::Object(keys.into_iter().map(|k| (k.clone(), sorted(&m[k]))).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

/// The fingerprint of a secret as stored: its version and whether that version is deleted.
pub fn secret_meta(m: &SecretMeta) -> Fingerprint {
    Fingerprint::from(format!("v{}{}", m.version, if m.deleted { "-deleted" } else { "" }))
}

/// The fingerprint of a secret declaration (what the repository asks for, not a value).
pub fn secret_spec(s: &SecretSpec) -> Fingerprint {
    let v = serde_json::to_value(s).unwrap_or(Value::Null);
    Fingerprint::from(format!("spec:{}", &sha256_hex(canonical_json(&v).as_bytes())[..16]))
}

/// The fingerprint of any content.
pub fn of(content: &Content) -> Fingerprint {
    match content {
        Content::Text(t) => Fingerprint::of_bytes(t.as_bytes()),
        Content::Json(v) => Fingerprint::of_bytes(&canonical_bytes(v)),
        Content::Secret(s) => secret_spec(s),
        Content::SecretMeta(m) => secret_meta(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_does_not_matter() {
        let a = of(&Content::Json(json!({"a": 1, "b": [1, {"y": 2, "x": 1}]})));
        let b = of(&Content::Json(json!({"b": [1, {"x": 1, "y": 2}], "a": 1})));
        assert_eq!(a, b);
        assert_ne!(a, of(&Content::Json(json!({"a": 2, "b": [1, {"x": 1, "y": 2}]}))));
    }

    #[test]
    fn a_fingerprint_reads_back_as_the_text_it_was_given() {
        let sha = format!("sha256:{}", sha256_hex(b"x"));
        for text in [sha.as_str(), "v3", "v3-deleted", "spec:0123456789abcdef", "", "sha256:ABCD", &sha.to_uppercase()]
        {
            let f = Fingerprint::from(text);
            assert_eq!(f.to_string(), text);
            assert_eq!(f, text);
            assert_eq!(serde_json::to_string(&f).unwrap(), serde_json::to_string(text).unwrap());
            assert_eq!(serde_json::from_str::<Fingerprint>(&serde_json::to_string(text).unwrap()).unwrap(), f);
        }
        assert!(Fingerprint::from(sha.as_str()).digest().is_some(), "kept as bytes");
        assert!(Fingerprint::from(sha.to_uppercase()).digest().is_none(), "upper case is kept as written");
        for bad in ["g", "/", ":", "`", "G", "\u{e9}"] {
            // The last digit (or two bytes, for the two-byte `é`) replaced: the same length.
            let text = format!("{}{bad}", &sha[..sha.len() - bad.len()]);
            assert!(Fingerprint::from(text.as_str()).digest().is_none(), "{text}: not hex, kept as written");
            assert_eq!(Fingerprint::from(text.as_str()).to_string(), text);
        }
        assert_eq!(of(&Content::Text("x".into())).to_string(), sha);
        assert_ne!(Fingerprint::from(sha.as_str()), *"v3");
    }

    #[test]
    fn fingerprints_order_as_their_texts() {
        let mut texts = vec![
            format!("sha256:{}", sha256_hex(b"a")),
            format!("sha256:{}", sha256_hex(b"b")),
            "v2".to_owned(),
            "spec:00".to_owned(),
            "sha256:zz".to_owned(),
        ];
        let mut fps: Vec<Fingerprint> = texts.iter().map(Fingerprint::from).collect();
        texts.sort();
        fps.sort();
        assert_eq!(fps.iter().map(ToString::to_string).collect::<Vec<_>>(), texts);
    }
}
