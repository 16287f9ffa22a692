//! Render: the desired state -> resources, through sandboxed MiniJinja templates.
//!
//! Sandboxed by construction: templates come from memory (the repository's `templates/`, read
//! by `load` with its symlink and size rules, over the built-in ones compiled into the binary),
//! so there is no loader that could reach the file system. The environment has the Jinja2
//! built-in filters and tests, no `debug()`, strict undefined, no auto-escaping, a fuel limit,
//! a recursion limit, an output limit and a memory budget. Values print the way Jinja2 prints
//! them. Nothing here reads the clock, the environment or the network.

pub(crate) mod budget;
pub mod format;

pub use budget::CountingAllocator;

use crate::diag::Diagnostic;
use crate::fingerprint;
use crate::load::yaml;
use crate::model::{Address, Content, Desired, DesiredEntry, Resource, ResourceKind, Tenant};
use minijinja::value::Value as MjValue;
use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use rayon::prelude::*;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// How built-in templates are named in diagnostics.
pub const BUILTIN_PREFIX: &str = "<built-in>/templates/";

/// The templates compiled into the binary (the project's top-level `templates/`).
pub const BUILTIN_TEMPLATES: &[(&str, &str)] = &[
    ("isp_config.yaml.j2", include_str!("../../templates/isp_config.yaml.j2")),
    ("database_config.j2", include_str!("../../templates/database_config.j2")),
    ("feature_config.j2", include_str!("../../templates/feature_config.j2")),
    ("kubernetes/namespace.yaml.j2", include_str!("../../templates/kubernetes/namespace.yaml.j2")),
    ("kubernetes/configmap.yaml.j2", include_str!("../../templates/kubernetes/configmap.yaml.j2")),
    ("kubernetes/deployment.yaml.j2", include_str!("../../templates/kubernetes/deployment.yaml.j2")),
    ("kubernetes/resourcequota.yaml.j2", include_str!("../../templates/kubernetes/resourcequota.yaml.j2")),
    ("openbao/read-secrets.hcl.j2", include_str!("../../templates/openbao/read-secrets.hcl.j2")),
    ("openbao/write-secrets.hcl.j2", include_str!("../../templates/openbao/write-secrets.hcl.j2")),
];

pub fn builtin_template(name: &str) -> Option<&'static str> {
    BUILTIN_TEMPLATES.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// The memory one render may hold.
const RENDER_MEMORY: usize = 256 * 1024 * 1024;
/// Nested calls (macros, includes) allowed in one render.
const RECURSION_LIMIT: usize = 100;

/// The label every manifest carries, so the engine can list what it manages.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "dotmac-gitops");
pub const TENANT_LABEL: &str = "dotmac.io/tenant";
/// On a Deployment's pod template: the fingerprint of the tenant's `isp.config`, so that a
/// configuration change rolls the pods (the seeds' hot reload).
pub const CONFIG_CHECKSUM: &str = "dotmac.io/config-checksum";

/// Checks a template name from `include`/`import`/`extends`: relative, inside the folders.
fn safe_name(name: &str) -> Result<&str, String> {
    if name.is_empty()
        || name.starts_with('/')
        || name.contains('\\')
        || name.contains('\0')
        || name.split('/').any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(format!(
            "template name `{name}` is not allowed: names are relative to templates/ and may not contain `..`, `.`, `//` or a leading `/`"
        ));
    }
    Ok(name)
}

/// Templates compiled once, with the per-catalog values converted once.
pub struct Renderer {
    env: Environment<'static>,
    k8s_templates: Vec<String>,
    /// (template name, policy stem)
    policy_templates: Vec<(String, String)>,
    repo_templates: BTreeSet<String>,
    max_output: usize,
    /// Per template, the longest output rendered so far: the size each render's buffer
    /// starts at (grown from nothing, 50,000 renders copied their output a few times over).
    sizes: HashMap<String, std::sync::atomic::AtomicUsize>,
    plans: HashMap<String, MjValue>,
    tiers: HashMap<String, MjValue>,
    environments: HashMap<String, MjValue>,
    env_values: HashMap<String, Value>,
}

/// Where a template's text comes from, for diagnostics.
pub fn template_path(repo_templates: &BTreeSet<String>, name: &str) -> String {
    if repo_templates.contains(name) { format!("templates/{name}") } else { format!("{BUILTIN_PREFIX}{name}") }
}

impl Renderer {
    pub fn new(desired: &Desired) -> Renderer {
        let repo: Arc<BTreeMap<String, Arc<str>>> = Arc::new(desired.templates.clone());
        let mut env = Environment::new();
        env.remove_global("debug");
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_formatter(format::python_formatter);
        env.set_fuel(Some(desired.settings.render.fuel));
        env.set_recursion_limit(RECURSION_LIMIT);
        let lookup = repo.clone();
        env.set_loader(move |name| {
            let name = safe_name(name).map_err(|m| minijinja::Error::new(ErrorKind::InvalidOperation, m))?;
            if let Some(t) = lookup.get(name) {
                return Ok(Some(t.to_string()));
            }
            Ok(builtin_template(name).map(str::to_owned))
        });

        let mut names: BTreeSet<String> = BUILTIN_TEMPLATES.iter().map(|(n, _)| (*n).to_owned()).collect();
        names.extend(repo.keys().cloned());
        let k8s_templates =
            names.iter().filter(|n| n.starts_with("kubernetes/") && n.ends_with(".yaml.j2")).cloned().collect();
        let policy_templates = names
            .iter()
            .filter_map(|n| {
                let stem = n.strip_prefix("openbao/")?.strip_suffix(".hcl.j2")?;
                (!stem.contains('/')).then(|| (n.clone(), stem.to_owned()))
            })
            .collect();

        let with_name = |name: &str, entry: &Value| {
            let mut m = entry.as_object().cloned().unwrap_or_default();
            m.insert("name".into(), Value::String(name.to_owned()));
            to_mj(&Value::Object(m))
        };
        let sizes = names.iter().map(|n| (n.clone(), std::sync::atomic::AtomicUsize::new(0))).collect();
        Renderer {
            env,
            sizes,
            k8s_templates,
            policy_templates,
            repo_templates: repo.keys().cloned().collect(),
            max_output: desired.settings.render.max_output_bytes,
            plans: desired.catalog.plans.iter().map(|(k, v)| (k.clone(), with_name(k, v))).collect(),
            tiers: desired.catalog.tiers.iter().map(|(k, v)| (k.clone(), with_name(k, v))).collect(),
            environments: desired.environments.iter().map(|(k, (_, v))| (k.clone(), to_mj(v))).collect(),
            env_values: desired
                .environments
                .iter()
                .map(|(k, (_, v))| (k.clone(), v.get("values").cloned().unwrap_or(Value::Object(Map::new()))))
                .collect(),
        }
    }

    /// The template context of a tenant: exactly the table of the repository format.
    pub fn context(&self, desired: &Desired, t: &Tenant) -> MjValue {
        let plan_values = desired
            .catalog
            .plans
            .get(&t.spec.plan)
            .and_then(|p| p.get("values"))
            .cloned()
            .unwrap_or(Value::Object(Map::new()));
        let env_values = self.env_values.get(&t.spec.environment).cloned().unwrap_or(Value::Object(Map::new()));
        let tenant_values = t.doc.get("values").cloned().unwrap_or(Value::Object(Map::new()));
        let values = deep_merge(deep_merge(env_values, plan_values), tenant_values);
        let secrets = MjValue::from_pairs(
            t.secrets
                .iter()
                .map(|s| (MjValue::from(s.name.as_str()), MjValue::from(format!("${{SECRET:{}}}", s.name)))),
        );
        MjValue::from_pairs([
            ("tenant", to_mj(&t.doc)),
            ("plan", self.plans.get(&t.spec.plan).cloned().unwrap_or_default()),
            ("environment", self.environments.get(&t.spec.environment).cloned().unwrap_or_default()),
            ("resource_tier", self.tiers.get(&t.spec.resource_tier).cloned().unwrap_or_default()),
            ("features", MjValue::from_iter(t.features.iter().map(|f| MjValue::from(f.as_str())))),
            ("licenses", MjValue::from_iter(t.valid_licenses.iter().map(to_mj))),
            ("values", to_mj(&values)),
            ("secrets", secrets),
        ])
    }

    /// Renders one template with the sandbox limits; errors name the template and line.
    pub fn render_template(&self, name: &str, ctx: &MjValue, tenant: &str) -> Result<String, Diagnostic> {
        let tmpl = self.env.get_template(name).map_err(|e| self.error(e, tenant, name))?;
        let size = self.sizes.get(name);
        let start = size.map_or(0, |s| s.load(std::sync::atomic::Ordering::Relaxed));
        let mut out = Capped { buf: Vec::with_capacity(start.min(self.max_output)), max: self.max_output };
        {
            let _guard = budget::Guard::new(RENDER_MEMORY, format_args!("{name} for tenant {tenant}"));
            tmpl.render_captured_to(ctx.clone(), &mut out).map_err(|e| self.error(e, tenant, name))?;
        }
        if let Some(s) = size
            && out.buf.len() > start
        {
            s.fetch_max(out.buf.len(), std::sync::atomic::Ordering::Relaxed);
        }
        String::from_utf8(out.buf).map_err(|_| {
            Diagnostic::error("template", format!("template `{name}` produced invalid UTF-8")).tenant(tenant)
        })
    }

    fn error(&self, e: minijinja::Error, tenant: &str, entry: &str) -> Diagnostic {
        // An error inside an included template arrives wrapped ("could not render include"):
        // report the innermost one, which names the template and line at fault.
        let mut e = &e;
        while let Some(inner) = std::error::Error::source(e).and_then(|s| s.downcast_ref::<minijinja::Error>()) {
            e = inner;
        }
        let name = e.name().unwrap_or(entry).to_owned();
        let detail = e.detail().map(str::to_owned).unwrap_or_default();
        let message = match e.kind() {
            ErrorKind::OutOfFuel => {
                "the template ran out of fuel (too many steps: an endless or very long loop?)".to_owned()
            }
            ErrorKind::WriteFailure => format!("the template's output is larger than {} bytes", self.max_output),
            ErrorKind::UndefinedError if detail.is_empty() => {
                "undefined value (strict mode: use `is defined` or `| default(...)`)".to_owned()
            }
            ErrorKind::TemplateNotFound => format!("template not found: {detail}"),
            kind if detail.is_empty() => kind.to_string(),
            kind => format!("{kind}: {detail}"),
        };
        let mut d = Diagnostic::error("template", format!("in template `{name}`: {message}"))
            .file(template_path(&self.repo_templates, &name))
            .tenant(tenant);
        if let Some(line) = e.line() {
            d = d.line(line, 1);
        }
        if name != entry {
            d = d.help(format!("reached from `{entry}`"));
        }
        d
    }

    /// Every resource of one tenant, or the problems that prevented it.
    pub fn render_tenant(&self, desired: &Desired, t: &Tenant) -> Result<Vec<Resource>, Vec<Diagnostic>> {
        let ctx = self.context(desired, t);
        let id = t.id.as_str();
        let mut out = Vec::new();
        let mut errors = Vec::new();

        out.push(Resource {
            fingerprint: None,
            address: Address::new(id, ResourceKind::ManagementTenant, None),
            content: Content::Json(management_record(t)).into(),
        });
        for l in &t.valid_licenses {
            let mut l = l.as_object().cloned().unwrap_or_default();
            l.remove("license_key");
            let plugin = l.get("plugin").and_then(Value::as_str).unwrap_or_default().to_owned();
            out.push(Resource {
                fingerprint: None,
                address: Address::new(id, ResourceKind::ManagementLicense, Some(&plugin)),
                content: Content::Json(Value::Object(l)).into(),
            });
        }
        let isp = match self.render_template("isp_config.yaml.j2", &ctx, id) {
            Ok(text) => Some(text),
            Err(d) => {
                errors.push(d);
                None
            }
        };
        for (name, stem) in &self.policy_templates {
            match self.render_template(name, &ctx, id) {
                Ok(text) => out.push(Resource {
                    fingerprint: None,
                    address: Address::new(id, ResourceKind::OpenbaoPolicy, Some(&format!("{id}-{stem}"))),
                    content: Content::Text(text).into(),
                }),
                Err(d) => errors.push(d),
            }
        }
        let checksum = isp.as_ref().map(|t| fingerprint::sha256_hex(t.as_bytes())[..16].to_owned());
        let mut seen = BTreeSet::new();
        for name in &self.k8s_templates {
            let text = match self.render_template(name, &ctx, id) {
                Ok(t) => t,
                Err(d) => {
                    errors.push(d);
                    continue;
                }
            };
            match manifests(&text, id, checksum.as_deref()) {
                Ok(ms) => {
                    for (kind, mname, m) in ms {
                        let address = Address::new(id, ResourceKind::kubernetes(&kind), Some(&mname));
                        if !seen.insert(address.to_string()) {
                            errors.push(
                                Diagnostic::error(
                                    "template",
                                    format!("template `{name}` renders {address} a second time"),
                                )
                                .file(template_path(&self.repo_templates, name))
                                .tenant(id),
                            );
                            continue;
                        }
                        out.push(Resource { fingerprint: None, address, content: Content::Json(m).into() });
                    }
                }
                Err(msg) => errors.push(
                    Diagnostic::error("template", format!("template `{name}` did not render valid manifests: {msg}"))
                        .file(template_path(&self.repo_templates, name))
                        .tenant(id)
                        .help("each document must be a mapping with `kind` and `metadata.name`"),
                ),
            }
        }
        if let Some(text) = isp {
            out.push(Resource {
                fingerprint: None,
                address: Address::new(id, ResourceKind::IspConfig, None),
                content: Content::Text(text).into(),
            });
        }
        for s in &t.secrets {
            out.push(Resource {
                fingerprint: None,
                address: Address::new(id, ResourceKind::OpenbaoSecret, Some(&s.name)),
                content: Content::Secret(s.clone()).into(),
            });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        out.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(out)
    }

    /// Renders the given tenants (all when `only` is `None`) in parallel.
    pub fn render_all(
        &self,
        desired: &Desired,
        only: Option<&BTreeSet<String>>,
    ) -> (BTreeMap<String, Vec<Resource>>, Vec<Diagnostic>) {
        self.render_each(desired, only, |r| r)
    }

    /// `render_all` with each tenant's resources made into desired entries (their
    /// fingerprints worked out) by the thread that rendered them, while they are still in
    /// its cache, rather than in a second pass over 130,000 resources.
    pub fn render_entries(
        &self,
        desired: &Desired,
        only: Option<&BTreeSet<String>>,
    ) -> (BTreeMap<String, Vec<DesiredEntry>>, Vec<Diagnostic>) {
        self.render_each(desired, only, |r| r.into_iter().map(DesiredEntry::rendered).collect())
    }

    fn render_each<T: Send>(
        &self,
        desired: &Desired,
        only: Option<&BTreeSet<String>>,
        then: impl Fn(Vec<Resource>) -> T + Sync,
    ) -> (BTreeMap<String, T>, Vec<Diagnostic>) {
        let tenants: Vec<&Tenant> =
            desired.tenants.values().filter(|t| only.is_none_or(|o| o.contains(&t.id))).collect();
        let results: Vec<(String, Result<T, Vec<Diagnostic>>)> =
            tenants.par_iter().map(|t| (t.id.clone(), self.render_tenant(desired, t).map(&then))).collect();
        let mut ok = BTreeMap::new();
        let mut diags = Vec::new();
        for (id, r) in results {
            match r {
                Ok(res) => {
                    ok.insert(id, res);
                }
                Err(d) => diags.extend(d),
            }
        }
        (ok, diags)
    }
}

/// The management platform's record of a tenant.
pub fn management_record(t: &Tenant) -> Value {
    let d = &t.doc;
    let mut m = Map::new();
    for key in ["name", "plan", "resource_tier", "domain"] {
        m.insert(key.into(), d.get(key).cloned().unwrap_or(Value::Null));
    }
    m.insert("status".into(), d.get("status").cloned().unwrap_or(Value::String("active".into())));
    m.insert("features".into(), Value::Array(t.features.iter().map(|f| Value::String(f.clone())).collect()));
    m.insert("billing".into(), d.get("billing").cloned().unwrap_or(Value::Null));
    Value::Object(m)
}

/// Parses rendered manifests and adds what the engine needs on them: the managed-by and
/// tenant labels, and on Deployments the configuration checksum.
fn manifests(text: &str, tenant: &str, checksum: Option<&str>) -> Result<Vec<(String, String, Value)>, String> {
    let docs = yaml::parse_documents(text).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for d in docs {
        let mut m = d.value;
        let kind = m.get("kind").and_then(Value::as_str).ok_or("a document has no `kind`")?.to_owned();
        let name = m
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .ok_or_else(|| format!("the {kind} has no `metadata.name`"))?
            .to_owned();
        if m.get("apiVersion").and_then(Value::as_str).is_none() {
            return Err(format!("the {kind} `{name}` has no `apiVersion`"));
        }
        let meta = m["metadata"].as_object_mut().ok_or("`metadata` is not a mapping")?;
        let labels = meta.entry("labels").or_insert_with(|| Value::Object(Map::new()));
        let labels = labels.as_object_mut().ok_or("`metadata.labels` is not a mapping")?;
        labels.insert(MANAGED_BY.0.into(), Value::String(MANAGED_BY.1.into()));
        labels.insert(TENANT_LABEL.into(), Value::String(tenant.into()));
        if kind == "Deployment"
            && let Some(sum) = checksum
            && let Some(tmeta) = m
                .get_mut("spec")
                .and_then(|s| s.get_mut("template"))
                .and_then(|t| t.get_mut("metadata"))
                .and_then(Value::as_object_mut)
        {
            let ann = tmeta.entry("annotations").or_insert_with(|| Value::Object(Map::new()));
            if let Some(ann) = ann.as_object_mut() {
                ann.insert(CONFIG_CHECKSUM.into(), Value::String(sum.to_owned()));
            }
        }
        out.push((kind, name, m));
    }
    Ok(out)
}

/// Maps merge, anything else replaces (Python's `deep_merge` of the peer).
pub fn deep_merge(a: Value, b: Value) -> Value {
    match (a, b) {
        (Value::Object(mut a), Value::Object(b)) => {
            for (k, v) in b {
                // Update in place: Python keeps a key where it was first inserted.
                match a.get_mut(&k) {
                    Some(slot) => {
                        let old = std::mem::take(slot);
                        *slot = match (old, v) {
                            (old @ Value::Object(_), v @ Value::Object(_)) => deep_merge(old, v),
                            (_, v) => v,
                        };
                    }
                    None => {
                        a.insert(k, v);
                    }
                }
            }
            Value::Object(a)
        }
        (_, b) => b,
    }
}

/// serde_json -> MiniJinja, keeping map order and number types.
pub fn to_mj(v: &Value) -> MjValue {
    match v {
        Value::Null => MjValue::from(()),
        Value::Bool(b) => MjValue::from(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                MjValue::from(i)
            } else if let Some(u) = n.as_u64() {
                MjValue::from(u)
            } else {
                MjValue::from(n.as_f64().unwrap_or(0.0))
            }
        }
        Value::String(s) => MjValue::from(s.as_str()),
        Value::Array(a) => MjValue::from_iter(a.iter().map(to_mj)),
        Value::Object(m) => MjValue::from_pairs(m.iter().map(|(k, v)| (MjValue::from(k.as_str()), to_mj(v)))),
    }
}

/// An output sink that refuses to grow past a size.
struct Capped {
    buf: Vec<u8>,
    max: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.max {
            return Err(std::io::Error::other("output limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
