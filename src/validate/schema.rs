//! The JSON Schemas of `schemas/`, compiled once, and their errors turned into messages a
//! person can act on (the unknown field and what was expected, rather than a schema path).

use crate::diag::Target;
use jsonschema::error::{TypeKind, ValidationErrorKind};
use serde_json::Value;
use std::sync::OnceLock;

/// A document kind of the repository format, with its schema file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Tenant,
    PluginLicenses,
    SecretRefs,
    PlanCatalog,
    PluginCatalog,
    ResourceTierCatalog,
    Environment,
    Settings,
}

impl Kind {
    pub const DOCUMENT_KINDS: [Kind; 7] = [
        Kind::Tenant,
        Kind::PluginLicenses,
        Kind::SecretRefs,
        Kind::PlanCatalog,
        Kind::PluginCatalog,
        Kind::ResourceTierCatalog,
        Kind::Environment,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Tenant => "Tenant",
            Kind::PluginLicenses => "PluginLicenses",
            Kind::SecretRefs => "SecretRefs",
            Kind::PlanCatalog => "PlanCatalog",
            Kind::PluginCatalog => "PluginCatalog",
            Kind::ResourceTierCatalog => "ResourceTierCatalog",
            Kind::Environment => "Environment",
            Kind::Settings => "Settings",
        }
    }

    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::DOCUMENT_KINDS.into_iter().find(|k| k.name() == s)
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The schema text, as published in `schemas/`.
    pub fn schema_text(self) -> &'static str {
        match self {
            Kind::Tenant => include_str!("../../schemas/tenant.schema.json"),
            Kind::PluginLicenses => include_str!("../../schemas/plugin-licenses.schema.json"),
            Kind::SecretRefs => include_str!("../../schemas/secret-refs.schema.json"),
            Kind::PlanCatalog => include_str!("../../schemas/plan-catalog.schema.json"),
            Kind::PluginCatalog => include_str!("../../schemas/plugin-catalog.schema.json"),
            Kind::ResourceTierCatalog => {
                include_str!("../../schemas/resource-tier-catalog.schema.json")
            }
            Kind::Environment => include_str!("../../schemas/environment.schema.json"),
            Kind::Settings => include_str!("../../schemas/settings.schema.json"),
        }
    }

    /// Where in the repository documents of this kind belong.
    pub fn folder(self) -> &'static str {
        match self {
            Kind::Tenant | Kind::PluginLicenses | Kind::SecretRefs => "tenants/",
            Kind::PlanCatalog | Kind::PluginCatalog | Kind::ResourceTierCatalog => "catalog/",
            Kind::Environment => "environments/",
            Kind::Settings => "dotmac.toml",
        }
    }
}

struct Compiled {
    schema: Value,
    validator: jsonschema::Validator,
}

/// A kind's compiled schema, compiled on first use: a plan that validates no tenant
/// document (every tenant from the render cache) never compiles the tenant schemas.
fn compiled(kind: Kind) -> &'static Compiled {
    const N: usize = Kind::DOCUMENT_KINDS.len() + 1;
    static ALL: [OnceLock<Compiled>; N] = [const { OnceLock::new() }; N];
    ALL[kind.index()].get_or_init(|| {
        let schema: Value = serde_json::from_str(kind.schema_text()).expect("built-in schema is JSON");
        let validator = jsonschema::draft202012::new(&schema).expect("built-in schema compiles");
        Compiled { schema, validator }
    })
}

/// Compiles every kind's schema now, instead of on first use. `diff` has a thread of its
/// own do it while it reads the two commits' trees: compiling them (and the regular
/// expressions of their patterns) took about 10 ms of a 45 ms diff at 100,000 tenants,
/// most of the rest reading a 4 MB `tenants/` tree object at each commit.
pub fn compile_all() {
    for kind in Kind::DOCUMENT_KINDS.into_iter().chain([Kind::Settings]) {
        compiled(kind);
    }
}

/// A schema violation, ready to become a diagnostic.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub pointer: String,
    pub target: Target,
    pub message: String,
    pub help: Option<String>,
}

/// Checks `value` against the schema of `kind`. Every violation is returned.
pub fn check(kind: Kind, value: &Value) -> Vec<Violation> {
    let c = compiled(kind);
    if c.validator.is_valid(value) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for e in c.validator.iter_errors(value) {
        let path = e.instance_path().as_str().to_owned();
        let schema_path = e.schema_path().as_str().to_owned();
        match e.kind() {
            ValidationErrorKind::AdditionalProperties { unexpected } => {
                let allowed = allowed_properties(&c.schema, &schema_path);
                for key in unexpected {
                    let suggestion = closest(key, allowed.iter().map(String::as_str));
                    out.push(Violation {
                        pointer: format!("{path}/{}", escape(key)),
                        target: Target::Key,
                        message: match &suggestion {
                            Some(s) => format!("unknown field `{key}` (did you mean `{s}`?)"),
                            None => format!("unknown field `{key}`"),
                        },
                        help: (!allowed.is_empty()).then(|| format!("expected one of: {}", allowed.join(", "))),
                    });
                }
            }
            ValidationErrorKind::Required { property } => out.push(Violation {
                pointer: path,
                target: Target::Key,
                message: format!("missing required field `{}`", property.as_str().unwrap_or("?")),
                help: None,
            }),
            ValidationErrorKind::Type { kind: t } => out.push(Violation {
                message: format!("expected {}, found {}", type_words(t), describe(e.instance())),
                pointer: path,
                target: Target::Value,
                help: None,
            }),
            ValidationErrorKind::Enum { options } => {
                let opts: Vec<String> = options
                    .as_array()
                    .map(|a| a.iter().map(|v| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())).collect())
                    .unwrap_or_default();
                let got = e.instance().as_str().map(str::to_owned).unwrap_or_else(|| e.instance().to_string());
                let suggestion = closest(&got, opts.iter().map(String::as_str));
                out.push(Violation {
                    pointer: path,
                    target: Target::Value,
                    message: match suggestion {
                        Some(s) => format!("`{got}` is not allowed here (did you mean `{s}`?)"),
                        None => format!("`{got}` is not allowed here"),
                    },
                    help: Some(format!("expected one of: {}", opts.join(", "))),
                });
            }
            ValidationErrorKind::Constant { .. } if path == "/format" => out.push(Violation {
                pointer: path,
                target: Target::Value,
                message: format!("repository format {} is not supported; this engine reads format 1", e.instance()),
                help: Some("set `format = 1`".into()),
            }),
            ValidationErrorKind::Constant { expected_value } => out.push(Violation {
                pointer: path,
                target: Target::Value,
                message: format!("expected {}, found {}", expected_value, describe(e.instance())),
                help: None,
            }),
            ValidationErrorKind::Pattern { pattern } => {
                let got = e.instance().as_str().unwrap_or_default().to_owned();
                let (message, help) = pattern_message(&got, pattern, &path);
                out.push(Violation { pointer: path, target: Target::Value, message, help });
            }
            ValidationErrorKind::FalseSchema => {
                let key = path.rsplit('/').next().unwrap_or_default().replace("~1", "/").replace("~0", "~");
                out.push(Violation {
                    pointer: path,
                    target: Target::Key,
                    message: format!("field `{key}` is not allowed here"),
                    help: e
                        .schema_path()
                        .as_str()
                        .contains("/then/")
                        .then(|| "it does not apply to this `kind`; the schema's description says which".to_owned()),
                })
            }
            _ => out.push(Violation { pointer: path, target: Target::Value, message: e.to_string(), help: None }),
        }
    }
    out
}

fn pattern_message(got: &str, pattern: &str, path: &str) -> (String, Option<String>) {
    if pattern.starts_with("^https://") {
        if got.starts_with("http://") {
            return (
                format!("`{got}` uses plain http; webhooks and endpoints must use https"),
                Some("change the scheme to https://".into()),
            );
        }
        return (format!("`{got}` is not an https:// URL"), Some("expected a URL such as https://host/path".into()));
    }
    if pattern == "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$" {
        let what = if path.ends_with("/tenant") || path.ends_with("/id") { "a tenant id" } else { "this name" };
        return (
            format!("`{got}` is not a valid DNS label for {what}"),
            Some("use lowercase letters, digits and '-', starting and ending with a letter or digit".into()),
        );
    }
    (format!("`{got}` does not have the expected form"), Some(format!("expected a value matching {pattern}")))
}

/// The property names a schema object at `schema_path/..` declares.
fn allowed_properties(schema: &Value, schema_path: &str) -> Vec<String> {
    let parent = schema_path.strip_suffix("/additionalProperties").unwrap_or(schema_path);
    let node = resolve_refs(schema, schema.pointer(parent));
    node.and_then(|n| n.get("properties"))
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn resolve_refs<'a>(schema: &'a Value, node: Option<&'a Value>) -> Option<&'a Value> {
    let node = node?;
    match node.get("$ref").and_then(Value::as_str) {
        Some(r) => schema.pointer(r.strip_prefix('#')?),
        None => Some(node),
    }
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn type_words(t: &TypeKind) -> String {
    let word = |s: String| match s.as_str() {
        "object" => "a mapping".to_owned(),
        "array" => "a list".to_owned(),
        "string" => "text".to_owned(),
        "integer" => "a whole number".to_owned(),
        "number" => "a number".to_owned(),
        "boolean" => "true or false".to_owned(),
        "null" => "nothing (null)".to_owned(),
        other => other.to_owned(),
    };
    match t {
        TypeKind::Single(one) => word(one.to_string()),
        TypeKind::Multiple(set) => set.iter().map(|t| word(t.to_string())).collect::<Vec<_>>().join(" or "),
    }
}

/// A short description of a value for "found ..." messages.
pub fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing (null)".into(),
        Value::Bool(b) => format!("`{b}`"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.chars().count() > 40 => {
            format!("text \"{}…\"", s.chars().take(40).collect::<String>())
        }
        Value::String(s) => format!("text \"{s}\""),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
    }
}

/// The candidate closest to `word` by edit distance, if it is close enough to be a typo.
pub fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<String> {
    let limit = (word.chars().count() / 3).clamp(1, 3);
    candidates.map(|c| (edit_distance(word, c), c)).filter(|(d, _)| *d <= limit).min().map(|(_, c)| c.to_owned())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_builtin_schema_compiles() {
        for k in Kind::DOCUMENT_KINDS {
            compiled(k);
        }
        compiled(Kind::Settings);
    }

    #[test]
    fn unknown_fields_name_the_field_and_suggest() {
        let v = check(Kind::Environment, &json!({"kind": "Environment", "name": "prod", "valeus": {}}));
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].pointer, "/valeus");
        assert_eq!(v[0].message, "unknown field `valeus` (did you mean `values`?)");
    }

    #[test]
    fn plain_http_webhooks_are_named() {
        let v = check(
            Kind::Tenant,
            &json!({"kind":"Tenant","id":"t1","name":"T","environment":"e","plan":"p","resource_tier":"r","domain":"t1.example.com",
                    "billing": {"stripe_webhook_endpoint": "http://t1.example.com/hook"}}),
        );
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("plain http"));
        assert_eq!(v[0].pointer, "/billing/stripe_webhook_endpoint");
    }

    #[test]
    fn typos_are_close() {
        assert_eq!(closest("premum", ["basic", "premium"].into_iter()).as_deref(), Some("premium"));
        assert_eq!(closest("zzz", ["basic", "premium"].into_iter()), None);
    }
}
