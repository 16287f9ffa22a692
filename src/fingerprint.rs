//! Content fingerprints: `sha256:<hex>` of a canonical form, so that two resources with the
//! same meaning have the same fingerprint whatever their key order or whitespace.
//! Secrets are fingerprinted by version metadata, never by value.

use crate::model::{Content, SecretMeta, SecretSpec};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::providers::local::hex(&Sha256::digest(bytes))
}

/// JSON with object keys sorted, no insignificant whitespace.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push(':');
                write_canonical(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, item) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
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
pub fn secret_meta(m: &SecretMeta) -> String {
    format!("v{}{}", m.version, if m.deleted { "-deleted" } else { "" })
}

/// The fingerprint of a secret declaration (what the repository asks for, not a value).
pub fn secret_spec(s: &SecretSpec) -> String {
    let v = serde_json::to_value(s).unwrap_or(Value::Null);
    format!("spec:{}", &sha256_hex(canonical_json(&v).as_bytes())[..16])
}

/// The fingerprint of any content.
pub fn of(content: &Content) -> String {
    match content {
        Content::Text(t) => format!("sha256:{}", sha256_hex(t.as_bytes())),
        Content::Json(v) => format!("sha256:{}", sha256_hex(canonical_json(v).as_bytes())),
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
}
