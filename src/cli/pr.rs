//! `diff` and `pr-comment`, and the CI reports `plan` shares with `diff`: a capped Markdown
//! comment, the job summary and step outputs.

use super::commands::{color, parse_now, print_diagnostics};
use super::{Format, Global, ReportArgs};
use crate::diff::{Action, Change, Violation};
use crate::github;
use crate::load;
use crate::plan::markdown::{self, GITHUB_SUMMARY_LIMIT};
use crate::prdiff;
use anyhow::{Context, Result, bail};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;

/// What a report is made of, whichever command made it.
pub struct Report<'a> {
    pub title: String,
    pub subtitle: String,
    pub changes: &'a [Change],
    pub violations: Vec<Violation>,
    pub errors: usize,
    /// How to get the whole report again, for a notice when even the job summary is cut.
    pub again: String,
}

pub fn check_report_args(r: &ReportArgs, format: Format) -> Result<()> {
    if format != Format::Markdown && (r.max_chars.is_some() || r.marker.is_some()) {
        bail!("--max-chars and --marker shape Markdown output: add --format markdown");
    }
    if let Some(m) = &r.marker {
        github::marker_line(m)?;
    }
    if let Some(n) = r.max_chars
        && n < 2000
    {
        bail!("--max-chars {n} is too small for a report; use at least 2000 (a GitHub comment holds 65536)");
    }
    Ok(())
}

/// The report as Markdown, within `max` if given.
pub fn markdown(rep: &Report<'_>, args: &ReportArgs, max: Option<usize>, marker: Option<&str>) -> String {
    let default_where = if args.summary_file.is_some() { "the job summary" } else { rep.again.as_str() };
    let full_report = args.full_report.as_deref().unwrap_or(default_where);
    markdown::render(
        rep.changes,
        &rep.violations,
        &markdown::Options {
            title: &rep.title,
            subtitle: Some(&rep.subtitle),
            max_chars: max,
            full_report: Some(full_report),
            marker: marker.or(args.marker.as_deref()),
            // A capped report is a comment: room goes to updates, not to whole resources.
            full_contents: max.is_none(),
        },
    )
}

/// Appends the full report to `--summary-file` and the outputs to `--github-output`.
pub fn write_ci_files(rep: &Report<'_>, args: &ReportArgs) -> Result<()> {
    if let Some(path) = &args.summary_file {
        let existing = std::fs::metadata(path).map(|m| m.len() as usize).unwrap_or(0);
        let room = GITHUB_SUMMARY_LIMIT.saturating_sub(existing + 1);
        if room < 4096 {
            eprintln!(
                "warning: {} already holds {existing} bytes, close to the job summary's limit of 1 MiB; the report is not added",
                path.display()
            );
        } else {
            let md = markdown::render(
                rep.changes,
                &rep.violations,
                &markdown::Options {
                    title: &rep.title,
                    subtitle: Some(&rep.subtitle),
                    max_chars: Some(room),
                    full_report: Some(&rep.again),
                    marker: None,
                    full_contents: true,
                },
            );
            append(path, &(if existing > 0 { format!("\n{md}") } else { md }))
                .with_context(|| format!("cannot write the summary to {}", path.display()))?;
        }
    }
    if let Some(path) = &args.github_output {
        let acting = rep.changes.iter().filter(|c| c.action != Action::Noop);
        let tenants: BTreeSet<&str> = acting.clone().map(|c| c.address.tenant.as_str()).collect();
        let highest = acting.map(|c| c.risk).max();
        let lines = format!(
            "changed-tenants={}\nhas-changes={}\nhighest-risk={}\nerrors={}\n",
            serde_json::to_string(&tenants)?,
            !tenants.is_empty(),
            highest.map(|r| r.as_str()).unwrap_or("none"),
            rep.errors
        );
        append(path, &lines).with_context(|| format!("cannot write the outputs to {}", path.display()))?;
    }
    Ok(())
}

fn append(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(text.as_bytes())
}

pub struct DiffArgs<'a> {
    pub base: &'a str,
    pub head: &'a str,
    pub format: Format,
    pub now: Option<&'a str>,
    pub detailed_exitcode: bool,
    pub report: &'a ReportArgs,
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

pub fn cmd_diff(g: &Global, a: DiffArgs<'_>) -> Result<u8> {
    if g.rev.is_some() {
        bail!("--rev does not apply to diff: name the two revisions with --base and --head");
    }
    check_report_args(a.report, a.format)?;
    let now = parse_now(a.now)?;
    let root = load::find_root(g.repo.as_deref())?;
    let d = prdiff::compare(&root, a.base, a.head, now)?;
    let short = |s: &str| s[..s.len().min(12)].to_owned();
    let compared = d.tenants.len() - d.unchecked.len();
    let why = if d.reasons.is_empty() { "no file the engine reads changed".to_owned() } else { d.reasons.join("; ") };
    let mut subtitle = format!(
        "Base `{}` → head `{}` · {compared} tenant{} compared: {why}.",
        short(&d.base),
        short(&d.head),
        plural(compared),
    );
    if !d.unchecked.is_empty() {
        subtitle.push_str(&format!(
            " {} tenant{} with errors at head could not be compared.",
            d.unchecked.len(),
            plural(d.unchecked.len())
        ));
    }
    let report = Report {
        title: "dotmac-gitops diff".into(),
        subtitle,
        changes: &d.changes,
        violations: d.violations(),
        errors: d.errors(),
        again: format!("the output of `dotmac-gitops diff --base {} --head {}`", short(&d.base), short(&d.head)),
    };
    if a.format != Format::Json {
        print_diagnostics(&d.head_loaded, &d.diagnostics, color(g));
    }
    let mut out = std::io::stdout().lock();
    match a.format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, &d.to_json())?;
            writeln!(out)?;
        }
        Format::Markdown => {
            out.write_all(markdown(&report, a.report, a.report.max_chars, None).as_bytes())?;
        }
        Format::Text => {
            writeln!(out, "Comparing {} → {}: {}", short(&d.base), short(&d.head), report.subtitle_text())?;
            let body = crate::plan::text::changes(&d.changes, &report.violations, color(g), 200);
            out.write_all(body.as_bytes())?;
            writeln!(out)?;
            if d.changes.is_empty() {
                writeln!(out, "No changes in the rendered resources of the tenants compared.")?;
            } else {
                writeln!(
                    out,
                    "Diff: {} to create, {} to update, {} to delete on {} tenant{}; highest risk {}.",
                    d.count(Action::Create),
                    d.count(Action::Update),
                    d.count(Action::Delete),
                    d.changed_tenants().len(),
                    plural(d.changed_tenants().len()),
                    d.highest_risk().map(|r| r.as_str()).unwrap_or("none")
                )?;
            }
        }
    }
    drop(out);
    write_ci_files(&report, a.report)?;
    if d.errors() > 0 {
        eprintln!("error: the head revision has {} error{} in what the change touches", d.errors(), plural(d.errors()));
        return Ok(1);
    }
    Ok(if a.detailed_exitcode && !d.changes.is_empty() { 2 } else { 0 })
}

impl Report<'_> {
    /// The subtitle without Markdown code marks, for the terminal.
    fn subtitle_text(&self) -> String {
        let s = self.subtitle.replace('`', "");
        s.split_once(" · ").map(|(_, rest)| rest.to_owned()).unwrap_or(s)
    }
}

pub fn cmd_pr_comment(pr: u64, body_file: &Path, marker: &str) -> Result<u8> {
    let body = if body_file == Path::new("-") {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("cannot read the comment from standard input")?;
        s
    } else {
        std::fs::read_to_string(body_file)
            .with_context(|| format!("cannot read --body-file {}", body_file.display()))?
    };
    if body.trim().is_empty() {
        bail!("the comment body ({}) is empty; nothing was posted", body_file.display());
    }
    let cfg = github::Config::from_env()?;
    let poster = github::Poster::new(cfg)?;
    match poster.upsert(pr, &body, marker)? {
        github::Outcome::Created { url, .. } => println!("created comment {url}"),
        github::Outcome::Updated { url, .. } => println!("updated comment {url}"),
        github::Outcome::Unchanged { url, .. } => println!("comment {url} is already up to date"),
    }
    Ok(0)
}
