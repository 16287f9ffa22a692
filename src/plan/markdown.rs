//! The plan as Markdown, for pull-request comments and job summaries: a header, a one-line
//! summary, a table per risk level, and one `<details>` per tenant with a `diff` fence.
//! Secrets appear only as `(sensitive)`. Output can be capped at a size: what does not fit
//! is summarised and a notice says how much was left out and where the full report is.

use crate::diff::{Action, Change, Risk, Severity, Violation};
use std::collections::BTreeMap;
use std::fmt::Write;

pub struct Options<'a> {
    pub title: &'a str,
    /// A line under the title (revisions compared, for instance).
    pub subtitle: Option<&'a str>,
    /// The most characters the result may have (GitHub comments: 65,536).
    pub max_chars: Option<usize>,
    /// Where the full report is, for the truncation notice.
    pub full_report: Option<&'a str>,
    /// A hidden marker to find the comment again (`<!-- … -->`), put first.
    pub marker: Option<&'a str>,
}

fn risk_title(r: Risk) -> &'static str {
    match r {
        Risk::Critical => "🔴 Critical",
        Risk::High => "🟠 High",
        Risk::Medium => "🟡 Medium",
        Risk::Low => "🟢 Low",
    }
}

fn symbol(a: Action) -> &'static str {
    match a {
        Action::Create => "+ create",
        Action::Update => "~ update",
        Action::Rotate => "* rotate",
        Action::Delete => "- delete",
        Action::Noop => "= noop",
    }
}

/// The one-line summary: tenants and resources added, changed, removed; the highest risk.
pub fn summary_line(changes: &[Change]) -> String {
    let shown: Vec<&Change> = changes.iter().filter(|c| c.action != Action::Noop || c.drift).collect();
    if shown.is_empty() {
        return "No changes.".to_owned();
    }
    let count = |a: Action| shown.iter().filter(|c| c.action == a).count();
    let tenants: BTreeMap<&str, ()> = shown.iter().map(|c| (c.address.tenant.as_str(), ())).collect();
    let highest = shown.iter().filter(|c| c.action != Action::Noop).map(|c| c.risk).max();
    let drift = shown.iter().filter(|c| c.drift).count();
    let mut s = format!(
        "**{} tenant{}**: {} resource{} added, {} changed, {} rotated, {} removed",
        tenants.len(),
        if tenants.len() == 1 { "" } else { "s" },
        count(Action::Create),
        if count(Action::Create) == 1 { "" } else { "s" },
        count(Action::Update),
        count(Action::Rotate),
        count(Action::Delete),
    );
    if drift > 0 {
        let _ = write!(s, ", {drift} drifted");
    }
    if let Some(r) = highest {
        let _ = write!(s, "; highest risk **{}**", r.as_str());
    }
    s.push('.');
    s
}

/// Renders the changes; with `max_chars`, stays within it.
pub fn render(changes: &[Change], violations: &[Violation], o: &Options<'_>) -> String {
    let shown: Vec<&Change> = changes.iter().filter(|c| c.action != Action::Noop || c.drift).collect();
    let mut head = String::new();
    if let Some(m) = o.marker {
        let _ = writeln!(head, "<!-- {m} -->");
    }
    let _ = writeln!(head, "## {}\n", o.title);
    if let Some(s) = o.subtitle {
        let _ = writeln!(head, "{s}\n");
    }
    let _ = writeln!(head, "{}\n", summary_line(changes));

    let mut blocks: Vec<String> = Vec::new();
    if !violations.is_empty() {
        let mut v =
            String::from("### Violations\n\n| severity | tenant | rule | message |\n| --- | --- | --- | --- |\n");
        for x in violations {
            let sev = if x.severity == Severity::Error { "❌ error" } else { "⚠️ warning" };
            let _ = writeln!(v, "| {sev} | `{}` | {} | {} |", x.tenant, x.rule, cell(&x.message));
        }
        v.push('\n');
        blocks.push(v);
    }
    for risk in [Risk::Critical, Risk::High, Risk::Medium, Risk::Low] {
        let rows: Vec<&&Change> = shown.iter().filter(|c| c.risk == risk && c.action != Action::Noop).collect();
        if rows.is_empty() {
            continue;
        }
        let mut t = format!(
            "### {} ({})\n\n| tenant | resource | action | why |\n| --- | --- | --- | --- |\n",
            risk_title(risk),
            rows.len()
        );
        for c in rows {
            let whole = c.address.to_string();
            let _ = writeln!(
                t,
                "| `{}` | `{}` | {}{} | {} |",
                c.address.tenant,
                &whole[c.address.tenant.len() + 1..],
                symbol(c.action),
                if c.drift { " (drift)" } else { "" },
                cell(&c.reason)
            );
        }
        t.push('\n');
        blocks.push(t);
    }
    let mut per_tenant: BTreeMap<&str, Vec<&Change>> = BTreeMap::new();
    for c in &shown {
        per_tenant.entry(c.address.tenant.as_str()).or_default().push(c);
    }
    let mut details: Vec<(String, String)> = Vec::new();
    for (tenant, cs) in &per_tenant {
        let mut d = format!(
            "<details><summary><code>{tenant}</code>: {}</summary>\n\n```diff\n",
            cs.iter()
                .map(|c| c.action.as_str())
                .fold(BTreeMap::<&str, usize>::new(), |mut m, a| {
                    *m.entry(a).or_default() += 1;
                    m
                })
                .iter()
                .map(|(a, n)| format!("{n} {a}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for c in cs {
            let whole = c.address.to_string();
            let _ = writeln!(d, "# {} {}", symbol(c.action), &whole[tenant.len() + 1..]);
            if c.action == Action::Create {
                continue;
            }
            for line in c.diff.lines().skip(2) {
                d.push_str(&fence_safe(line));
                d.push('\n');
            }
        }
        d.push_str("```\n\n</details>\n");
        details.push((tenant.to_string(), d));
    }

    let Some(max) = o.max_chars else {
        let mut out = head;
        for b in blocks {
            out.push_str(&b);
        }
        for (_, d) in details {
            out.push_str(&d);
        }
        return out;
    };

    // Within the cap: head, then whole blocks and tenant details while they fit, then a
    // notice of what was left out. The notice's room is kept free throughout.
    let notice_room = 400;
    let budget = max.saturating_sub(notice_room);
    let mut out = head;
    let mut left_blocks = 0;
    for b in blocks {
        if out.chars().count() + b.chars().count() <= budget {
            out.push_str(&b);
        } else {
            let table = truncate_table(&b, budget.saturating_sub(out.chars().count()));
            if let Some(t) = table {
                out.push_str(&t);
            } else {
                left_blocks += 1;
            }
        }
    }
    let mut left_tenants = 0;
    let mut used = out.chars().count();
    for (_, d) in &details {
        let n = d.chars().count();
        if used + n <= budget {
            out.push_str(d);
            used += n;
        } else {
            left_tenants += 1;
        }
    }
    if left_tenants > 0 || left_blocks > 0 {
        let _ = write!(
            out,
            "\n> **Truncated**: {} of {} tenants' diffs{} left out to stay within {} characters.",
            left_tenants,
            details.len(),
            if left_blocks > 0 { format!(" and {left_blocks} table(s)") } else { String::new() },
            max
        );
        if let Some(w) = o.full_report {
            let _ = write!(out, " The full report is in {w}.");
        }
        out.push('\n');
    }
    out
}

/// Keeps the first rows of a table that fit in `room`, with a line counting the rest.
fn truncate_table(block: &str, room: usize) -> Option<String> {
    let lines: Vec<&str> = block.lines().collect();
    if lines.len() < 5 || room < 200 {
        return None;
    }
    let mut out = String::new();
    let rows = lines.len() - 4; // title, blank, header, separator
    let mut kept = 0;
    for (i, l) in lines.iter().enumerate() {
        if i >= 4 && out.chars().count() + l.chars().count() + 80 > room {
            break;
        }
        out.push_str(l);
        out.push('\n');
        if i >= 4 {
            kept += 1;
        }
    }
    let _ = writeln!(out, "| … | {} more | | |\n", rows.saturating_sub(kept));
    Some(out)
}

/// Text inside a table cell: no pipes or newlines.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// A diff line inside a ```` ``` ```` fence: a line of backticks would close it early.
fn fence_safe(line: &str) -> String {
    if line.trim_start_matches(['+', '-', ' ']).starts_with("```") {
        line.replacen("```", "ˋˋˋ", 1)
    } else {
        line.to_owned()
    }
}
