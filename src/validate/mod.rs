//! Validate: parsed documents -> the desired state, plus every problem found.
//!
//! Order: settings and each document against its JSON Schema (in parallel), then the
//! cross-checks between documents, then each tenant's entitlements and secrets (in parallel).
//! A tenant with errors is left out of the desired state; its problems are all reported.

pub mod checks;
pub mod schema;

use crate::diag::{Diagnostic, Target};
use crate::load::source::{FileRole, tenant_unit};
use crate::load::{Loaded, LoadedDoc, settings::Settings};
use crate::model::*;
use checks::SecretRef;
use indexmap::IndexMap;
use jiff::Timestamp;
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use schema::Kind;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// Validates a loaded repository at time `now` (licenses expire, secrets age).
pub fn validate(loaded: &Loaded, now: Timestamp) -> (Desired, Vec<Diagnostic>) {
    validate_with(loaded, now, &BTreeMap::new())
}

/// Like `validate`, for a repository read with some tenant folders left unparsed: `known`
/// maps the tenant ids those folders define to their folder, so that a parsed folder
/// reusing one of them, or naming one, is judged as with everything parsed.
pub fn validate_with(loaded: &Loaded, now: Timestamp, known: &BTreeMap<String, String>) -> (Desired, Vec<Diagnostic>) {
    let mut diags = loaded.diagnostics.clone();
    let settings = validate_settings(loaded.settings.as_ref(), &mut diags);

    // 1. Every document: a known kind, in the right folder, accepted by its schema.
    // Beside each document, the tenant it names (a Tenant's `id`, a tenant's other documents'
    // `tenant`): looked up here, on all cores, rather than in the passes below on one.
    let checked: Vec<(usize, Option<Kind>, Vec<Diagnostic>, Option<&str>)> = loaded
        .docs
        .par_iter()
        .enumerate()
        .map(|(i, d)| {
            let (kind, problems) = check_document(d);
            let names = match kind {
                Some(Kind::Tenant) => d.value.get("id").and_then(Value::as_str),
                Some(Kind::PluginLicenses | Kind::SecretRefs) => d.value.get("tenant").and_then(Value::as_str),
                _ => None,
            };
            (i, kind, problems, names)
        })
        .collect();
    let mut by_kind: BTreeMap<Kind, Vec<(&LoadedDoc, &str)>> = BTreeMap::new();
    // Tenant folders with a file that could not be read: their documents may name a tenant
    // whose own file is the broken one, so they are not reported as orphans.
    let broken_units: BTreeSet<String> =
        loaded.diagnostics.iter().filter_map(|d| d.file.as_deref().and_then(tenant_unit).map(str::to_owned)).collect();
    // Tenants whose own document is broken: their other documents are not "orphans".
    let mut broken_tenants: BTreeSet<String> = BTreeSet::new();
    for (i, kind, problems, names) in checked {
        let ok = problems.iter().all(|p| !p.is_error());
        diags.extend(problems);
        match (kind, ok) {
            // A document its schema accepts names its tenant with text ("" for the others).
            (Some(kind), true) => by_kind.entry(kind).or_default().push((&loaded.docs[i], names.unwrap_or_default())),
            (Some(Kind::Tenant), false) => {
                if let Some(id) = names {
                    broken_tenants.insert(id.to_owned());
                }
            }
            _ => {}
        }
    }
    let named_docs_of = |k: Kind| by_kind.get(&k).map(Vec::as_slice).unwrap_or(&[]);
    let docs_of = |k: Kind| named_docs_of(k).iter().map(|(d, _)| *d).collect::<Vec<_>>();

    // 2. Catalogs and environments.
    let mut catalog = Catalog::default();
    let plans = single(&docs_of(Kind::PlanCatalog), Kind::PlanCatalog, &mut diags);
    let plugins = single(&docs_of(Kind::PluginCatalog), Kind::PluginCatalog, &mut diags);
    let tiers = single(&docs_of(Kind::ResourceTierCatalog), Kind::ResourceTierCatalog, &mut diags);
    if let Some(d) = plans {
        catalog.plans = entries(&d.value, "plans");
        catalog.sources.insert("plans", d.at.clone());
    }
    if let Some(d) = plugins {
        catalog.plugins = entries(&d.value, "plugins");
        catalog.sources.insert("plugins", d.at.clone());
    }
    if let Some(d) = tiers {
        catalog.tiers = entries(&d.value, "tiers");
        catalog.sources.insert("tiers", d.at.clone());
    }
    let mut environments: BTreeMap<String, (DocRef, Arc<Value>)> = BTreeMap::new();
    for d in docs_of(Kind::Environment) {
        let name = d.value["name"].as_str().unwrap_or_default().to_owned();
        if let Some((first, _)) = environments.get(&name) {
            diags.push(
                Diagnostic::error("duplicate", format!("environment `{name}` is defined twice"))
                    .file(&*d.at.file)
                    .at(d.at.doc, "/name", Target::Value)
                    .help(format!("it is also defined in {}", first.file)),
            );
            continue;
        }
        environments.insert(name, (d.at.clone(), Arc::clone(&d.value)));
    }
    for d in loaded.docs.iter().filter(|d| d.role != FileRole::Tenant) {
        credential_scan(d, None, &mut diags);
    }

    // 3. Tenants and the documents that name them.
    let mut tenant_docs: BTreeMap<String, &LoadedDoc> = BTreeMap::new();
    for &(d, id) in named_docs_of(Kind::Tenant) {
        let id = id.to_owned();
        if let Some(unit) = known.get(&id) {
            diags.push(
                Diagnostic::error("duplicate", format!("tenant id `{id}` is used twice"))
                    .file(&*d.at.file)
                    .at(d.at.doc, "/id", Target::Value)
                    .tenant(&id)
                    .help(format!("it is also used in tenants/{unit}")),
            );
            continue;
        }
        if let Some(first) = tenant_docs.get(&id) {
            diags.push(
                Diagnostic::error("duplicate", format!("tenant id `{id}` is used twice"))
                    .file(&*d.at.file)
                    .at(d.at.doc, "/id", Target::Value)
                    .tenant(&id)
                    .help(format!("it is first used in {}", first.at.file)),
            );
            continue;
        }
        tenant_docs.insert(id, d);
    }
    let mut licenses: FxHashMap<&str, &LoadedDoc> = FxHashMap::default();
    let mut secret_refs: FxHashMap<&str, &LoadedDoc> = FxHashMap::default();
    for (kind, map) in [(Kind::PluginLicenses, &mut licenses), (Kind::SecretRefs, &mut secret_refs)] {
        for &(d, id) in named_docs_of(kind) {
            let Some(owner) = tenant_docs.get(id) else {
                if let Some(unit) = known.get(id) {
                    diags.push(
                        Diagnostic::error(
                            "tenant-layout",
                            format!(
                                "{} for tenant `{id}` is in `tenants/{}`, but the tenant is defined in `tenants/{unit}`",
                                kind.name(),
                                tenant_unit(&d.at.file).unwrap_or("?"),
                            ),
                        )
                        .file(&*d.at.file)
                        .at(d.at.doc, "/tenant", Target::Value)
                        .tenant(id)
                        .help("keep all of a tenant's documents in one folder under tenants/"),
                    );
                    continue;
                }
                if broken_tenants.contains(id) || tenant_unit(&d.at.file).is_some_and(|u| broken_units.contains(u)) {
                    continue;
                }
                let known = tenant_docs.keys().map(String::as_str);
                let mut diag = Diagnostic::error(
                    "unknown-tenant",
                    format!("{} names tenant `{id}`, which does not exist", kind.name()),
                )
                .file(&*d.at.file)
                .at(d.at.doc, "/tenant", Target::Value)
                .tenant(id);
                if let Some(s) = schema::closest(id, known) {
                    diag = diag.help(format!("did you mean `{s}`?"));
                }
                diags.push(diag);
                continue;
            };
            if tenant_unit(&d.at.file) != tenant_unit(&owner.at.file) {
                diags.push(
                    Diagnostic::error(
                        "tenant-layout",
                        format!(
                            "{} for tenant `{id}` is in `tenants/{}`, but the tenant is defined in `tenants/{}`",
                            kind.name(),
                            tenant_unit(&d.at.file).unwrap_or("?"),
                            tenant_unit(&owner.at.file).unwrap_or("?")
                        ),
                    )
                    .file(&*d.at.file)
                    .at(d.at.doc, "/tenant", Target::Value)
                    .tenant(id)
                    .help("keep all of a tenant's documents in one folder under tenants/ (so a change to one tenant is read without reading the others)"),
                );
                continue;
            }
            if let Some(first) = map.get(id) {
                diags.push(
                    Diagnostic::error("duplicate", format!("tenant `{id}` has a second {} document", kind.name()))
                        .file(&*d.at.file)
                        .at(d.at.doc, "/tenant", Target::Value)
                        .tenant(id)
                        .help(format!("merge it into the one in {}", first.at.file)),
                );
                continue;
            }
            map.insert(id, d);
        }
    }

    // 4. Each tenant: references, entitlements, secrets.
    let ctx = TenantCtx {
        catalog: &catalog,
        environments: &environments,
        now,
        have_plans: plans.is_some(),
        have_tiers: tiers.is_some(),
    };
    let results: Vec<(Option<Tenant>, Vec<Diagnostic>)> = tenant_docs
        .par_iter()
        .map(|(id, d)| ctx.tenant(id, d, licenses.get(id.as_str()).copied(), secret_refs.get(id.as_str()).copied()))
        .collect();
    let mut valid = Vec::with_capacity(results.len());
    for (t, d) in results {
        diags.extend(d);
        valid.extend(t.map(|t| (t.id.clone(), t)));
    }
    // In id order already (that of `tenant_docs`): the map is built at once, not by inserts.
    let tenants = BTreeMap::from_iter(valid);

    let desired = Desired { settings, catalog, environments, tenants, templates: loaded.templates.clone() };
    crate::diag::resolve_positions(&mut diags, |p| loaded.text_of(p));
    crate::diag::sort(&mut diags);
    (desired, diags)
}

fn validate_settings(value: Option<&Value>, diags: &mut Vec<Diagnostic>) -> Settings {
    let Some(value) = value else {
        return Settings::default();
    };
    let problems = schema::check(Kind::Settings, value);
    if problems.is_empty() {
        match serde_json::from_value::<Settings>(value.clone()) {
            Ok(s) => {
                // Not pointed at: the diagnostic's excerpt would print the password.
                if s.state
                    .url
                    .as_deref()
                    .and_then(|u| crate::state::postgres::PgUrl::parse(u).ok())
                    .is_some_and(|u| u.has_password())
                {
                    diags.push(
                        Diagnostic::error("settings", "[state] url holds a password; secrets never live in git")
                            .file("dotmac.toml")
                            .help("put the URL in an environment variable and name it in [state] url_env"),
                    );
                }
                return s;
            }
            Err(e) => diags.push(Diagnostic::error("settings", format!("invalid settings: {e}")).file("dotmac.toml")),
        }
    }
    for v in problems {
        let mut d = Diagnostic::error("settings", v.message).file("dotmac.toml").at(0, v.pointer, v.target);
        if let Some(h) = v.help {
            d = d.help(h);
        }
        diags.push(d);
    }
    Settings::default()
}

/// Kind, placement and schema of one document.
fn check_document(d: &LoadedDoc) -> (Option<Kind>, Vec<Diagnostic>) {
    let file = &*d.at.file;
    let mut out = Vec::new();
    let kind_name = match d.value.get("kind") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            out.push(
                Diagnostic::error("kind", format!("`kind` must be text, found {}", schema::describe(other)))
                    .file(file)
                    .at(d.at.doc, "/kind", Target::Value),
            );
            return (None, out);
        }
        None => {
            let what = if d.value.is_object() { "document has no `kind`" } else { "document is not a mapping" };
            out.push(
                Diagnostic::error("kind", what.to_string())
                    .file(file)
                    .line(d.line, 1)
                    .help(format!("every document starts with `kind:`, one of: {}", kind_list())),
            );
            return (None, out);
        }
    };
    let Some(kind) = Kind::from_name(kind_name) else {
        let mut diag = Diagnostic::error("kind", format!("unknown kind `{kind_name}`")).file(file).at(
            d.at.doc,
            "/kind",
            Target::Value,
        );
        diag = match schema::closest(kind_name, Kind::DOCUMENT_KINDS.iter().map(|k| k.name())) {
            Some(s) => diag.help(format!("did you mean `{s}`?")),
            None => diag.help(format!("expected one of: {}", kind_list())),
        };
        out.push(diag);
        return (None, out);
    };
    let expected_role = match kind {
        Kind::Tenant | Kind::PluginLicenses | Kind::SecretRefs => FileRole::Tenant,
        Kind::Environment => FileRole::Environment,
        _ => FileRole::Catalog,
    };
    if d.role != expected_role {
        out.push(
            Diagnostic::error("placement", format!("a {} document does not belong here", kind.name()))
                .file(file)
                .at(d.at.doc, "/kind", Target::Value)
                .help(format!("move it under {}", kind.folder())),
        );
        return (Some(kind), out);
    }
    for v in schema::check(kind, &d.value) {
        let mut diag = Diagnostic::error("schema", v.message).file(file).at(d.at.doc, v.pointer, v.target);
        if let Some(t) = d.value.get("id").or_else(|| d.value.get("tenant")).and_then(Value::as_str)
            && matches!(kind, Kind::Tenant | Kind::PluginLicenses | Kind::SecretRefs)
        {
            diag = diag.tenant(t);
        }
        if let Some(h) = v.help {
            diag = diag.help(h);
        }
        out.push(diag);
    }
    (Some(kind), out)
}

fn kind_list() -> String {
    Kind::DOCUMENT_KINDS.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
}

/// Exactly one catalog document of a kind.
fn single<'a>(docs: &[&'a LoadedDoc], kind: Kind, diags: &mut Vec<Diagnostic>) -> Option<&'a LoadedDoc> {
    // With two of them, which one counts is unclear: report it, and check nothing against either.
    for extra in docs.iter().skip(1) {
        diags.push(
            Diagnostic::error("duplicate", format!("a second {} document", kind.name()))
                .file(&*extra.at.file)
                .at(extra.at.doc, "/kind", Target::Value)
                .help(format!("keep one {} (the first is in {})", kind.name(), docs[0].at.file)),
        );
    }
    match docs {
        [one] => Some(*one),
        _ => None,
    }
}

fn entries(doc: &Value, field: &str) -> IndexMap<String, Value> {
    doc.get(field)
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

/// Literal credentials in a document, by pattern everywhere and by field name outside
/// SecretRefs (whose keys are secret names).
fn credential_scan(d: &LoadedDoc, tenant: Option<&str>, diags: &mut Vec<Diagnostic>) {
    let names_count = d.value.get("kind").and_then(Value::as_str) != Some("SecretRefs");
    checks::walk_strings(&d.value, &mut |ptr, key, text| {
        let what = checks::credential_pattern(text).map(|w| format!("looks like {w}")).or_else(|| {
            (names_count
                && key.is_some_and(checks::is_credential_key)
                && !text.is_empty()
                && !text.contains("${SECRET:"))
            .then(|| format!("is a plain value in the credential field `{}`", key.unwrap_or_default()))
        });
        if let Some(what) = what {
            let mut diag =
                Diagnostic::error("plain-credential", format!("this value {what}; secrets never live in git"))
                    .file(&*d.at.file)
                    .at(d.at.doc, ptr, Target::Value)
                    .help("declare the secret in the tenant's SecretRefs and write `${SECRET:<name>}` here");
            if let Some(t) = tenant {
                diag = diag.tenant(t);
            }
            diags.push(diag);
        }
    });
}

struct TenantCtx<'a> {
    catalog: &'a Catalog,
    environments: &'a BTreeMap<String, (DocRef, Arc<Value>)>,
    now: Timestamp,
    have_plans: bool,
    have_tiers: bool,
}

/// When a license stops entitling: RFC 3339, or a bare date meaning the end of that day (UTC).
pub fn expiry(s: &str) -> Option<Timestamp> {
    if let Ok(t) = s.parse::<Timestamp>() {
        return Some(t);
    }
    let date: jiff::civil::Date = s.parse().ok()?;
    let end = date.at(23, 59, 59, 0);
    end.to_zoned(jiff::tz::TimeZone::UTC).ok().map(|z| z.timestamp())
}

impl TenantCtx<'_> {
    fn tenant(
        &self,
        id: &str,
        d: &LoadedDoc,
        lic: Option<&LoadedDoc>,
        sec: Option<&LoadedDoc>,
    ) -> (Option<Tenant>, Vec<Diagnostic>) {
        let mut out = Vec::new();
        let file = &*d.at.file;
        let err = |rule: &'static str, msg: String, ptr: &str| {
            Diagnostic::error(rule, msg).file(file).at(d.at.doc, ptr, Target::Value).tenant(id)
        };
        let spec: TenantDoc = match TenantDoc::deserialize(&*d.value) {
            Ok(s) => s,
            Err(e) => {
                out.push(err("schema", format!("cannot read the tenant: {e}"), ""));
                return (None, out);
            }
        };
        credential_scan(d, Some(id), &mut out);
        for other in [lic, sec].into_iter().flatten() {
            credential_scan(other, Some(id), &mut out);
        }

        // References into the catalogs and environments.
        let mut reference = |what: &str, name: &str, known: Vec<&str>, ptr: &str, where_: &str, present: bool| {
            if known.contains(&name) {
                return;
            }
            let mut diag = if present {
                err("unknown-reference", format!("{what} `{name}` does not exist"), ptr)
            } else {
                err(
                    "unknown-reference",
                    format!("{what} `{name}` cannot be checked: {where_} is missing or defined twice"),
                    ptr,
                )
            };
            diag = match schema::closest(name, known.iter().copied()) {
                Some(s) => diag.help(format!("did you mean `{s}`? ({what}s are defined in {where_})")),
                None if present => diag.help(format!("expected one of: {} (from {where_})", known.join(", "))),
                None => diag,
            };
            out.push(diag);
        };
        reference(
            "plan",
            &spec.plan,
            self.catalog.plans.keys().map(String::as_str).collect(),
            "/plan",
            "catalog/plans.yaml",
            self.have_plans,
        );
        reference(
            "resource tier",
            &spec.resource_tier,
            self.catalog.tiers.keys().map(String::as_str).collect(),
            "/resource_tier",
            "catalog/resource-tiers.yaml",
            self.have_tiers,
        );
        reference(
            "environment",
            &spec.environment,
            self.environments.keys().map(String::as_str).collect(),
            "/environment",
            "environments/",
            true,
        );

        // Licenses: known plugins, no duplicates, which are valid now.
        let mut valid_licenses: Vec<Value> = Vec::new();
        let mut window = (i64::MIN, i64::MAX);
        let mut expired: HashMap<String, String> = HashMap::new();
        if let Some(l) = lic {
            let lerr = |rule: &'static str, msg: String, ptr: String| {
                Diagnostic::error(rule, msg).file(&*l.at.file).at(l.at.doc, ptr, Target::Value).tenant(id)
            };
            let doc: LicensesDoc = match LicensesDoc::deserialize(&*l.value) {
                Ok(doc) => doc,
                Err(e) => {
                    out.push(lerr("schema", format!("cannot read the licenses: {e}"), String::new()));
                    LicensesDoc { tenant: id.to_owned(), licenses: Vec::new() }
                }
            };
            let mut seen = BTreeSet::new();
            for (i, license) in doc.licenses.iter().enumerate() {
                let ptr = format!("/licenses/{i}/plugin");
                if !self.catalog.plugins.contains_key(&license.plugin) {
                    let mut diag =
                        lerr("unknown-reference", format!("plugin `{}` does not exist", license.plugin), ptr.clone());
                    if let Some(s) = schema::closest(&license.plugin, self.catalog.plugins.keys().map(String::as_str)) {
                        diag = diag.help(format!("did you mean `{s}`? (plugins are defined in catalog/plugins.yaml)"));
                    }
                    out.push(diag);
                    continue;
                }
                if !seen.insert(license.plugin.clone()) {
                    out.push(lerr("duplicate", format!("plugin `{}` is licensed twice", license.plugin), ptr));
                    continue;
                }
                let valid = match &license.expires {
                    None => true,
                    Some(e) => match expiry(e) {
                        Some(t) => t > self.now,
                        None => {
                            out.push(lerr(
                                "schema",
                                format!("`{e}` is not a valid time"),
                                format!("/licenses/{i}/expires"),
                            ));
                            false
                        }
                    },
                };
                if valid {
                    valid_licenses.push(l.value["licenses"][i].clone());
                } else if let Some(e) = &license.expires {
                    expired.insert(license.plugin.clone(), e.clone());
                }
                // How long what is valid stays valid, and what expired stays expired.
                if let Some(t) = license.expires.as_deref().and_then(expiry) {
                    if valid {
                        window.1 = window.1.min(t.as_second());
                    } else {
                        window.0 = window.0.max(t.as_second() + 1);
                    }
                }
            }
            valid_licenses.sort_by(|a, b| a["plugin"].as_str().cmp(&b["plugin"].as_str()));
        }

        // Entitlements: plan features + features of validly licensed plugins.
        let mut entitled: BTreeSet<String> = BTreeSet::new();
        if let Some(plan) = self.catalog.plans.get(&spec.plan) {
            entitled.extend(strings(&plan["features"]));
        }
        for l in &valid_licenses {
            if let Some(p) = l["plugin"].as_str().and_then(|p| self.catalog.plugins.get(p)) {
                entitled.extend(strings(&p["features"]));
            }
        }
        for (feature, on) in &spec.features {
            if !*on || entitled.contains(feature) {
                continue;
            }
            let ptr = format!("/features/{feature}");
            let providers: Vec<&str> = self
                .catalog
                .plugins
                .iter()
                .filter(|(_, p)| strings(&p["features"]).any(|f| &f == feature))
                .map(|(name, _)| name.as_str())
                .collect();
            let in_some_plan = self.catalog.plans.values().any(|p| strings(&p["features"]).any(|f| &f == feature));
            let diag = if let Some((plugin, when)) = providers.iter().find_map(|p| expired.get(*p).map(|w| (*p, w))) {
                err(
                    "not-entitled",
                    format!("feature `{feature}` is not entitled: the license for plugin `{plugin}` expired on {when}"),
                    &ptr,
                )
                .help("renew the license (a later `expires`) or set the feature to false")
            } else if providers.is_empty() && !in_some_plan {
                err("unknown-feature", format!("feature `{feature}` is not offered by any plan or plugin"), &ptr)
            } else {
                let mut how = Vec::new();
                if !providers.is_empty() {
                    how.push(format!(
                        "a license for plugin {}",
                        providers.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(" or ")
                    ));
                }
                if in_some_plan {
                    how.push("a plan that includes it".into());
                }
                err("not-entitled", format!("feature `{feature}` is not entitled by plan `{}`", spec.plan), &ptr)
                    .help(format!("it needs {}", how.join(", or ")))
            };
            out.push(diag);
        }
        let features: Vec<String> = entitled.into_iter().filter(|f| spec.features.get(f) != Some(&false)).collect();

        // Secrets: declared properly, safely named, and every reference declared.
        let mut secrets = Vec::new();
        let mut declared: BTreeSet<String> = BTreeSet::new();
        if let Some(s) = sec {
            let serr = |msg: String, ptr: String| {
                Diagnostic::error("secret", msg).file(&*s.at.file).at(s.at.doc, ptr, Target::Key).tenant(id)
            };
            match SecretRefsDoc::deserialize(&*s.value) {
                Err(e) => out.push(serr(format!("cannot read the secrets: {e}"), String::new())),
                Ok(doc) => {
                    for (name, decl) in &doc.secrets {
                        let ptr = format!("/secrets/{}", name.replace('~', "~0").replace('/', "~1"));
                        declared.insert(name.clone());
                        if let Some(problem) = checks::secret_name_problem(name) {
                            out.push(
                                serr(format!("secret name `{name}` {problem}"), ptr)
                                    .help("secret names become store paths under dotmac/tenants/<tenant>/"),
                            );
                            continue;
                        }
                        let source = match (&decl.generate, decl.external) {
                            (Some(g), false) => SecretSource::Generated { length: g.length, charset: g.charset },
                            (None, true) => SecretSource::External,
                            (Some(_), true) => {
                                out.push(serr(format!("secret `{name}` is both generated and external"), ptr).help("keep `generate:` (the engine creates it) or `external: true` (a person puts it there), not both"));
                                continue;
                            }
                            (None, false) => {
                                out.push(
                                    serr(
                                        format!(
                                            "secret `{name}` says neither how it is generated nor that it is external"
                                        ),
                                        ptr,
                                    )
                                    .help("add `generate: {length: 32}` or `external: true`"),
                                );
                                continue;
                            }
                        };
                        secrets.push(SecretSpec {
                            name: name.clone(),
                            source,
                            rotation_days: decl.rotation.interval_days.or(doc.rotation.interval_days),
                            auto_rotation: decl.rotation.auto_rotation.or(doc.rotation.auto_rotation).unwrap_or(true),
                        });
                    }
                }
            }
        }
        for (doc, value) in [(Some(d), &*d.value), (lic, lic.map(|l| &*l.value).unwrap_or(&Value::Null))] {
            let Some(doc) = doc else { continue };
            for r in checks::secret_refs(value) {
                let diag = match r {
                    SecretRef::Ok { name, pointer } if !declared.contains(&name) => {
                        Diagnostic::error("secret-undeclared", format!("secret `{name}` is used but not declared"))
                            .file(&*doc.at.file)
                            .at(doc.at.doc, pointer, Target::Value)
                            .tenant(id)
                            .help(format!(
                                "declare it under `secrets:` in the SecretRefs document of tenant {id}{}",
                                sec.map(|s| format!(" ({})", s.at.file)).unwrap_or_default()
                            ))
                    }
                    SecretRef::Ok { .. } => continue,
                    SecretRef::Malformed { text, pointer } => {
                        Diagnostic::error("secret-ref", format!("malformed secret reference `{text}`"))
                            .file(&*doc.at.file)
                            .at(doc.at.doc, pointer, Target::Value)
                            .tenant(id)
                            .help("write it as ${SECRET:name}")
                    }
                };
                out.push(diag);
            }
        }

        let ok = out.iter().all(|d| !d.is_error());
        let tenant = ok.then(|| Tenant {
            id: id.to_owned(),
            unit: tenant_unit(file).unwrap_or_default().to_owned(),
            spec,
            doc: d.value.clone(),
            source: d.at.clone(),
            features,
            valid_licenses,
            secrets,
            window,
        });
        (tenant, out)
    }
}

fn strings(v: &Value) -> impl Iterator<Item = String> + '_ {
    v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_owned))
}

use serde::Deserialize;
