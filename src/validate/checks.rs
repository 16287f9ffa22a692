//! Content checks that no schema can express: secret references, credential-looking values,
//! safe secret names.

use regex::RegexSet;
use serde_json::Value;
use std::fmt::Write as _;
use std::sync::OnceLock;

/// A `${SECRET:name}` reference found in a document, or a malformed one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    Ok { name: String, pointer: String },
    Malformed { text: String, pointer: String },
}

/// Walks every string of `v`, calling `f(pointer, key, text)`; `key` is the mapping key the
/// string sits under, if any.
pub fn walk_strings<'v>(v: &'v Value, f: &mut impl FnMut(&str, Option<&str>, &'v str)) {
    fn go<'v>(v: &'v Value, ptr: &mut String, key: Option<&str>, f: &mut impl FnMut(&str, Option<&str>, &'v str)) {
        match v {
            Value::String(s) => f(ptr, key, s),
            Value::Array(a) => {
                for (i, item) in a.iter().enumerate() {
                    let len = ptr.len();
                    let _ = write!(ptr, "/{i}");
                    go(item, ptr, key, f);
                    ptr.truncate(len);
                }
            }
            Value::Object(m) => {
                for (k, item) in m {
                    let len = ptr.len();
                    ptr.push('/');
                    // RFC 6901 escapes, written only for the rare key that needs them.
                    if k.contains(['~', '/']) {
                        ptr.push_str(&k.replace('~', "~0").replace('/', "~1"));
                    } else {
                        ptr.push_str(k);
                    }
                    go(item, ptr, Some(k), f);
                    ptr.truncate(len);
                }
            }
            _ => {}
        }
    }
    go(v, &mut String::new(), None, f)
}

/// Every `${SECRET:...}` in the strings of `v`.
pub fn secret_refs(v: &Value) -> Vec<SecretRef> {
    let mut out = Vec::new();
    walk_strings(v, &mut |ptr, _, s| {
        let mut rest = s;
        // Found by its `$` (a byte search) rather than as a substring, set up per string.
        while let Some(i) = rest.match_indices('$').map(|(i, _)| i).find(|&i| rest[i..].starts_with("${SECRET:")) {
            let after = &rest[i + "${SECRET:".len()..];
            match after.find('}') {
                Some(end) if end > 0 => {
                    out.push(SecretRef::Ok { name: after[..end].to_owned(), pointer: ptr.to_owned() });
                    rest = &after[end + 1..];
                }
                _ => {
                    out.push(SecretRef::Malformed {
                        text: rest[i..].chars().take(60).collect(),
                        pointer: ptr.to_owned(),
                    });
                    break;
                }
            }
        }
    });
    out
}

/// Secret names are path segments under `dotmac/tenants/<tenant>/` in a store: keep them to
/// letters, digits, `_`, `-`, `.`, separated by single `/`, never `.` or `..`.
pub fn secret_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > 128 {
        return Some("must be 1 to 128 characters long");
    }
    for seg in name.split('/') {
        if seg.is_empty() {
            return Some("must not start or end with '/' or contain '//'");
        }
        if seg == "." || seg == ".." {
            return Some("must not contain '.' or '..' as a path segment");
        }
        if !seg.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) {
            return Some("may only use letters, digits, '_', '-', '.' and '/' between segments");
        }
    }
    None
}

/// The credential patterns, in one automaton (one pass over a string, which most strings
/// fail), and what each one looks like, in the same order.
struct Patterns {
    set: RegexSet,
    names: Vec<&'static str>,
}

fn patterns() -> &'static Patterns {
    static P: OnceLock<Patterns> = OnceLock::new();
    P.get_or_init(|| {
        let value = [
            (r"\b(sk|rk)_(live|test)_[0-9A-Za-z]{8,}", "a Stripe secret key"),
            (r"\bwhsec_[0-9A-Za-z]{8,}", "a Stripe webhook signing secret"),
            (r"-----BEGIN ([A-Z0-9]+ )*PRIVATE KEY-----", "a PEM private key"),
            (r"\bAKIA[0-9A-Z]{16}\b", "an AWS access key id"),
            (r"\bgh[pousr]_[0-9A-Za-z]{30,}", "a GitHub token"),
            (r"\bgithub_pat_[0-9A-Za-z_]{30,}", "a GitHub token"),
            (r"\bxox[abprs]-[0-9A-Za-z-]{10,}", "a Slack token"),
            (r"\bpat-(na|eu)[0-9]-[0-9a-f-]{20,}", "a HubSpot private app token"),
            (r"\beyJ[0-9A-Za-z_-]{8,}\.eyJ[0-9A-Za-z_-]{8,}\.[0-9A-Za-z_-]{8,}", "a JSON Web Token"),
            (r"://[^/\s:@]+:[^/\s@$]{3,}@", "a URL with a password in it"),
        ];
        Patterns {
            set: RegexSet::new(value.iter().map(|(re, _)| re)).expect("built-in patterns"),
            names: value.iter().map(|(_, what)| *what).collect(),
        }
    })
}

/// What a literal credential in `text` looks like, if it looks like one.
pub fn credential_pattern(text: &str) -> Option<&'static str> {
    if text.len() < 8 {
        return None;
    }
    // The first pattern in the list that matches names it.
    let p = patterns();
    // `matches` allocates its answer; almost no string matches, and `is_match` does not.
    if !p.set.is_match(text) {
        return None;
    }
    p.set.matches(text).iter().next().map(|i| p.names[i])
}

/// Keys whose value is a credential: it must be a `${SECRET:...}` reference.
pub fn is_credential_key(key: &str) -> bool {
    // Most keys hold no upper case: lower-case a copy only for those that do.
    let lowered;
    let k = if key.bytes().any(|b| b.is_ascii_uppercase()) {
        lowered = key.to_ascii_lowercase();
        lowered.as_str()
    } else {
        key
    };
    if k == "publishable_key" || k == "public_key" {
        return false;
    }
    const EXACT: [&str; 13] = [
        "key",
        "api_key",
        "apikey",
        "secret_key",
        "private_key",
        "access_key",
        "license_key",
        "signing_key",
        "encryption_key",
        "client_key",
        "master_key",
        "client_secret",
        "credentials",
    ];
    if EXACT.contains(&k) {
        return true;
    }
    let last = k.rsplit(['_', '-']).next().unwrap_or(k);
    matches!(last, "password" | "passwd" | "pwd" | "secret" | "token" | "apikey" | "passphrase")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn refs_are_found_and_malformed_ones_reported() {
        let v = json!({"a": "${SECRET:db/password}", "b": ["x ${SECRET:one} y ${SECRET:two}"], "c": "${SECRET:oops"});
        let refs = secret_refs(&v);
        assert_eq!(refs.len(), 4);
        assert!(matches!(&refs[3], SecretRef::Malformed { pointer, .. } if pointer == "/c"));
        assert!(matches!(&refs[2], SecretRef::Ok { name, pointer } if name == "two" && pointer == "/b/0"));
    }

    #[test]
    fn secret_names() {
        assert_eq!(secret_name_problem("database/password"), None);
        assert!(secret_name_problem("../etc").is_some());
        assert!(secret_name_problem("a//b").is_some());
        assert!(secret_name_problem("a b").is_some());
        assert!(secret_name_problem("/abs").is_some());
    }

    #[test]
    fn credentials() {
        assert_eq!(credential_pattern("sk_live_abcdefgh1234"), Some("a Stripe secret key"));
        assert_eq!(credential_pattern("-----BEGIN RSA PRIVATE KEY-----\nMII"), Some("a PEM private key"));
        assert_eq!(credential_pattern("https://tenant.example/webhooks/stripe"), None);
        assert_eq!(credential_pattern("postgres://app:hunter22@db/x"), Some("a URL with a password in it"));
        assert_eq!(credential_pattern("postgres://app:${SECRET:db}@db/x"), None);
        assert!(is_credential_key("webhook_secret"));
        assert!(is_credential_key("password"));
        assert!(is_credential_key("access_token"));
        assert!(!is_credential_key("token_ttl"));
        assert!(!is_credential_key("publishable_key"));
        assert!(!is_credential_key("secrets"));
        // Upper case is folded (only such keys are copied to fold them).
        assert!(is_credential_key("Client_Secret"));
        assert!(is_credential_key("API_KEY"));
        assert!(!is_credential_key("Public_Key"));
    }

    #[test]
    fn every_pattern_is_named_and_the_first_one_that_matches_wins() {
        let examples = [
            ("rk_test_0123456789", "a Stripe secret key"),
            ("whsec_0123456789ab", "a Stripe webhook signing secret"),
            ("AKIAABCDEFGHIJKLMNOP", "an AWS access key id"),
            ("ghp_012345678901234567890123456789ab", "a GitHub token"),
            ("github_pat_012345678901234567890123456789", "a GitHub token"),
            ("xoxb-0123456789-abc", "a Slack token"),
            ("pat-na1-0123456789abcdef01234", "a HubSpot private app token"),
            ("eyJabcdefghij.eyJabcdefghij.abcdefghij", "a JSON Web Token"),
        ];
        for (text, what) in examples {
            assert_eq!(credential_pattern(text), Some(what), "{text}");
            assert_eq!(credential_pattern(&format!("see {text} here")), Some(what), "{text} inside a sentence");
        }
        // Two patterns in one string: the list's order decides.
        assert_eq!(credential_pattern("https://u:pass@x sk_live_abcdefgh1234"), Some("a Stripe secret key"));
        assert_eq!(credential_pattern("no credential in this sentence at all"), None);
    }

    #[test]
    fn pointers_escape_keys_and_count_array_items() {
        let v = json!({"a/b": {"c~d": ["x", {"e": "y"}]}, "plain": "z"});
        let mut seen = Vec::new();
        walk_strings(&v, &mut |ptr, key, text| seen.push((ptr.to_owned(), key.map(str::to_owned), text.to_owned())));
        assert_eq!(
            seen,
            vec![
                ("/a~1b/c~0d/0".to_owned(), Some("c~d".to_owned()), "x".to_owned()),
                ("/a~1b/c~0d/1/e".to_owned(), Some("e".to_owned()), "y".to_owned()),
                ("/plain".to_owned(), Some("plain".to_owned()), "z".to_owned()),
            ]
        );
        // The pointers resolve to the strings they name.
        for (ptr, _, text) in &seen {
            assert_eq!(v.pointer(ptr).and_then(Value::as_str), Some(text.as_str()), "{ptr}");
        }
    }
}
