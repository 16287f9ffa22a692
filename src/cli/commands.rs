//! One function per command.

use super::{Cli, Command, Format, Global};
use crate::diag::{self, Diagnostic};
use crate::load::{self, Loaded, source::Scope};
use crate::model::{Content, Desired, Resource};
use crate::render::Renderer;
use crate::{validate, yamlfmt};
use anyhow::{Context, Result, bail};
use jiff::Timestamp;
use serde_json::json;
use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::path::Path;

pub fn run(cli: Cli) -> Result<u8> {
    let g = cli.global;
    match cli.command {
        Command::Validate { format, now } => cmd_validate(&g, format, parse_now(now.as_deref())?),
        Command::Render { tenants, out, format, now } => {
            cmd_render(&g, &tenants, out.as_deref(), format, parse_now(now.as_deref())?)
        }
        Command::Plan { args, out, format, detailed_exitcode, report } => {
            super::plan_apply::cmd_plan(&g, &args, out.as_deref(), format, detailed_exitcode, &report)
        }
        Command::Diff { base, head, format, now, detailed_exitcode, report } => super::pr::cmd_diff(
            &g,
            super::pr::DiffArgs {
                base: &base,
                head: &head,
                format,
                now: now.as_deref(),
                detailed_exitcode,
                report: &report,
            },
        ),
        Command::PrComment { pr, body_file, marker } => super::pr::cmd_pr_comment(pr, &body_file, &marker),
        Command::Apply { plan_file, args, auto_approve, allow_delete, destroy_secrets, parallelism, lock } => {
            super::plan_apply::cmd_apply(
                &g,
                super::plan_apply::ApplyArgs {
                    plan_file: plan_file.as_deref(),
                    args: &args,
                    auto_approve,
                    allow_delete,
                    destroy_secrets,
                    parallelism,
                    lock: &lock,
                },
            )
        }
        Command::Rotate { tenants, secrets, emergency, lock } => {
            super::plan_apply::cmd_rotate(&g, &tenants, &secrets, emergency, &lock)
        }
        Command::Drift { tenants, format, detailed_exitcode } => {
            super::ops::cmd_drift(&g, &tenants, format, detailed_exitcode)
        }
        Command::Audit { tenants, since, format } => super::ops::cmd_audit(&g, &tenants, since.as_deref(), format),
        Command::Secret(super::SecretCommand::Put { tenant, name, lock_timeout }) => {
            super::ops::cmd_secret_put(&g, &tenant, &name, &lock_timeout)
        }
        Command::BenchParse => {
            let root = load::find_root(g.repo.as_deref())?;
            let loaded = load::load(&root, g.rev.as_deref(), &Scope::All)?;
            println!(
                "{} files, {} documents, {} problems",
                loaded.files.len(),
                loaded.docs.len(),
                loaded.diagnostics.len()
            );
            std::mem::forget(loaded);
            Ok(0)
        }
        Command::Daemon(args) => cmd_daemon(&g, args),
    }
}

fn cmd_daemon(g: &Global, a: super::DaemonArgs) -> Result<u8> {
    use crate::load::settings::parse_duration;
    if g.rev.is_some() {
        bail!("the daemon follows a branch (--branch); --rev does not apply");
    }
    let duration = |flag: &str, v: &str| {
        parse_duration(v)
            .filter(|d| !d.is_zero())
            .with_context(|| format!("--{flag} `{v}` is not a duration such as 30s, 5m or 1h"))
    };
    let interval = a.interval.as_deref().map(|v| duration("interval", v)).transpose()?;
    if a.concurrency == Some(0) {
        bail!("--concurrency must be at least 1");
    }
    let repo = g.repo.clone().unwrap_or_else(|| std::path::PathBuf::from("."));
    let auth = match &a.auth_token_env {
        None => None,
        Some(var) => {
            let token = std::env::var(var).ok().filter(|t| !t.is_empty()).with_context(|| {
                format!("--auth-token-env names `{var}`, which is not set or empty: export the token in it")
            })?;
            if a.auth_user.contains(':') {
                bail!("--auth-user cannot contain `:` (HTTP Basic separates user and password with it)");
            }
            Some(crate::daemon::http::Auth {
                user: a.auth_user.clone(),
                token: std::sync::Arc::new(crate::providers::secret_value::SecretValue::from_bytes(token.into_bytes())),
            })
        }
    };
    crate::daemon::run(crate::daemon::Options {
        repo: repo.to_string_lossy().into_owned(),
        branch: a.branch,
        interval,
        listen: a.listen,
        auto_apply: a.auto_apply,
        allow_delete: a.allow_delete,
        concurrency: a.concurrency,
        cache_dir: a.cache_dir,
        election: a.leader_election,
        lease_name: a.lease_name,
        lease_namespace: a.lease_namespace,
        lease_duration: duration("lease-duration", &a.lease_duration)?,
        shutdown_timeout: duration("shutdown-timeout", &a.shutdown_timeout)?,
        actor: a.actor,
        auth,
    })
}

pub fn parse_now(now: Option<&str>) -> Result<Timestamp> {
    match now {
        None => Ok(Timestamp::now()),
        Some(s) => s
            .parse::<Timestamp>()
            .with_context(|| format!("--now `{s}` is not an RFC 3339 time such as 2026-11-22T00:00:00Z")),
    }
}

pub fn color(g: &Global) -> bool {
    !g.no_color && std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Loads and validates the repository the global flags name.
pub fn load_valid(g: &Global, scope: &Scope, now: Timestamp) -> Result<(Loaded, Desired, Vec<Diagnostic>)> {
    let root = load::find_root(g.repo.as_deref())?;
    let t = std::time::Instant::now();
    let loaded = load::load(&root, g.rev.as_deref(), scope)?;
    tracing::info!(root = %root.display(), files = loaded.files.len(), docs = loaded.docs.len(), elapsed = ?t.elapsed(), "loaded");
    let (desired, diags) = validate::validate(&loaded, now);
    tracing::info!(tenants = desired.tenants.len(), problems = diags.len(), elapsed = ?t.elapsed(), "validated");
    Ok((loaded, desired, diags))
}

pub fn print_diagnostics(loaded: &Loaded, diags: &[Diagnostic], color: bool) {
    if diags.is_empty() {
        return;
    }
    let text = diag::render_human(diags, |p| loaded.text_of(p), color);
    let _ = std::io::stderr().write_all(text.as_bytes());
}

fn cmd_validate(g: &Global, format: Format, now: Timestamp) -> Result<u8> {
    let (loaded, desired, mut diags) = load_valid(g, &Scope::All, now)?;
    let renderer = Renderer::new(&desired);
    let (rendered, render_diags) = renderer.render_all(&desired, None);
    diags.extend(render_diags);
    diag::resolve_positions(&mut diags, |p| loaded.text_of(p));
    diag::sort(&mut diags);
    let errors = diags.iter().filter(|d| d.is_error()).count();
    let resources: usize = rendered.values().map(Vec::len).sum();
    match format {
        Format::Json => {
            let out = json!({
                "valid": errors == 0,
                "errors": errors,
                "warnings": diags.len() - errors,
                "tenants": desired.tenants.len(),
                "resources": resources,
                "diagnostics": diags,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        _ => {
            let text = diag::render_human(&diags, |p| loaded.text_of(p), color(g));
            print!("{text}");
            if errors == 0 {
                println!(
                    "valid: {} tenants, {} resources rendered{}",
                    desired.tenants.len(),
                    resources,
                    if diags.is_empty() { String::new() } else { format!(" ({} warnings)", diags.len()) }
                );
            }
        }
    }
    Ok(if errors == 0 { 0 } else { 1 })
}

/// Renders the chosen tenants, failing on any validation or template error.
pub fn render_desired(
    loaded: &Loaded,
    desired: &Desired,
    mut diags: Vec<Diagnostic>,
    tenants: &[String],
    color: bool,
) -> Result<std::collections::BTreeMap<String, Vec<Resource>>> {
    let only: Option<BTreeSet<String>> = (!tenants.is_empty()).then(|| tenants.iter().cloned().collect());
    if let Some(only) = &only {
        let missing: Vec<&String> = only.iter().filter(|t| !desired.tenants.contains_key(*t)).collect();
        let has_errors = diags.iter().any(Diagnostic::is_error);
        if !missing.is_empty() && !has_errors {
            bail!(
                "no tenant {} in the repository",
                missing.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(", ")
            );
        }
    }
    let renderer = Renderer::new(desired);
    let (rendered, render_diags) = renderer.render_all(desired, only.as_ref());
    diags.extend(render_diags);
    diag::resolve_positions(&mut diags, |p| loaded.text_of(p));
    diag::sort(&mut diags);
    print_diagnostics(loaded, &diags, color);
    let errors = diags.iter().filter(|d| d.is_error()).count();
    if errors > 0 {
        bail!("the repository has {errors} error{}; nothing was done", if errors == 1 { "" } else { "s" });
    }
    Ok(rendered)
}

/// The human form of a resource's content.
pub fn content_text(c: &Content) -> String {
    match c {
        Content::Text(t) => t.clone(),
        Content::Json(v) => yamlfmt::to_yaml(v),
        Content::Secret(s) => yamlfmt::to_yaml(&serde_json::to_value(s).unwrap_or_default()),
        Content::SecretMeta(m) => yamlfmt::to_yaml(&serde_json::to_value(m).unwrap_or_default()),
    }
}

/// The JSON form of a resource's content: text stays text, structures stay structures.
pub fn content_json(c: &Content) -> serde_json::Value {
    match c {
        Content::Text(t) => json!(t),
        Content::Json(v) => v.clone(),
        Content::Secret(s) => serde_json::to_value(s).unwrap_or_default(),
        Content::SecretMeta(m) => serde_json::to_value(m).unwrap_or_default(),
    }
}

fn cmd_render(g: &Global, tenants: &[String], out: Option<&Path>, format: Format, now: Timestamp) -> Result<u8> {
    let (loaded, desired, diags) = load_valid(g, &Scope::All, now)?;
    let rendered = render_desired(&loaded, &desired, diags, tenants, color(g))?;
    if let Some(dir) = out {
        let mut n = 0;
        for r in rendered.values().flatten() {
            let path = dir.join(resource_file_name(r));
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
            }
            std::fs::write(&path, content_text(&r.content))
                .with_context(|| format!("cannot write {}", path.display()))?;
            n += 1;
        }
        eprintln!("wrote {n} resources under {}", dir.display());
        return Ok(0);
    }
    let mut stdout = std::io::stdout().lock();
    match format {
        Format::Json => {
            let resources: Vec<serde_json::Value> = rendered
                .values()
                .flatten()
                .map(|r| {
                    json!({
                        "address": r.address.to_string(),
                        "tenant": r.address.tenant,
                        "provider": r.provider(),
                        "content": content_json(&r.content),
                    })
                })
                .collect();
            serde_json::to_writer_pretty(&mut stdout, &json!({ "resources": resources }))?;
            writeln!(stdout)?;
        }
        _ => {
            for r in rendered.values().flatten() {
                writeln!(stdout, "# --- {} ({})", r.address, r.provider())?;
                let text = content_text(&r.content);
                stdout.write_all(text.as_bytes())?;
                if !text.ends_with('\n') {
                    writeln!(stdout)?;
                }
            }
        }
    }
    Ok(0)
}

/// `tenant-123/kubernetes.Deployment[isp-framework]` -> `tenant-123/kubernetes.Deployment.isp-framework.yaml`
pub fn resource_file_name(r: &Resource) -> String {
    let a = &r.address;
    let whole = a.to_string();
    let local = &whole[a.tenant.len() + 1..];
    let flat = local.replace('[', ".").replace(']', "").replace('/', "__");
    let ext = match (&*r.content, &a.kind) {
        (_, crate::model::ResourceKind::OpenbaoPolicy) => "hcl",
        (Content::Text(_), _) => "yaml",
        _ => "yaml",
    };
    format!("{}/{flat}.{ext}", a.tenant)
}
