//! Changes as Markdown, for pull-request comments and job summaries: a header, a one-line
//! summary, a table per risk level, and one `<details>` per tenant with a `diff` fence.
//! Secrets appear only as `(sensitive)`.
//!
//! Output can be capped (`max_chars`; GitHub refuses a comment over 65,536 characters and a
//! job summary over 1 MiB). The cap is counted in UTF-8 bytes, which are never fewer than
//! characters or UTF-16 units, so a result within it is within either count. What does not
//! fit is summarised first (the per-resource tables become one row per kind of change, with
//! how many tenants it reaches), then left out tenant by tenant, the riskiest tenants first;
//! a notice says how much was left out and where the full report is.

use crate::diff::{Action, Change, Risk, Severity, Violation};
use std::collections::BTreeMap;
use std::fmt::Write;

pub struct Options<'a> {
    pub title: &'a str,
    /// Lines under the title (revisions compared, for instance).
    pub subtitle: Option<&'a str>,
    /// The most bytes the result may have (a GitHub comment: 65,536).
    pub max_chars: Option<usize>,
    /// Where the full report is, for the truncation notice (a URL, or "the job summary").
    pub full_report: Option<&'a str>,
    /// A hidden marker to find the comment again (`<!-- … -->`), put first.
    pub marker: Option<&'a str>,
    /// Show the whole content of created and deleted resources (a job summary), not only
    /// their addresses (a comment, where room is short).
    pub full_contents: bool,
}

/// GitHub's limit on an issue or pull-request comment body.
pub const GITHUB_COMMENT_LIMIT: usize = 65_536;
/// GitHub's limit on one step's job summary.
pub const GITHUB_SUMMARY_LIMIT: usize = 1024 * 1024;

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

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn shown(changes: &[Change]) -> Vec<&Change> {
    changes.iter().filter(|c| c.action != Action::Noop || c.drift).collect()
}

/// The one-line summary: tenants and resources added, changed, removed; the highest risk.
pub fn summary_line(changes: &[Change]) -> String {
    let shown = shown(changes);
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
        plural(tenants.len()),
        count(Action::Create),
        plural(count(Action::Create)),
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

/// The address without its tenant (`kubernetes.Deployment[isp-framework]`).
fn local(c: &Change) -> String {
    let whole = c.address.to_string();
    whole[c.address.tenant.len() + 1..].to_owned()
}

/// Renders the changes; with `max_chars`, stays within it.
pub fn render(changes: &[Change], violations: &[Violation], o: &Options<'_>) -> String {
    let shown = shown(changes);
    let mut head = String::new();
    if let Some(m) = o.marker {
        let _ = writeln!(head, "<!-- {m} -->");
    }
    let _ = writeln!(head, "## {}\n", o.title);
    if let Some(s) = o.subtitle {
        let _ = writeln!(head, "{s}\n");
    }
    let _ = writeln!(head, "{}\n", summary_line(changes));

    let violations_block = violations_table(violations);
    let tables: Vec<String> = [Risk::Critical, Risk::High, Risk::Medium, Risk::Low]
        .into_iter()
        .filter_map(|r| risk_table(&shown, r))
        .collect();
    let details = tenant_details(&shown, o.full_contents);

    let Some(max) = o.max_chars else {
        let mut out = head;
        out.push_str(&violations_block);
        out.extend(tables);
        out.extend(details.into_iter().map(|(_, _, d)| d));
        return out;
    };

    // Within the cap: the head; the violations; the risk tables whole, else summarised per
    // kind of change; then whole tenant details while they fit (the riskiest first), one
    // more cut short if there is room; then the notice. Room for the notice is kept free.
    const NOTICE_ROOM: usize = 700;
    let budget = max.saturating_sub(NOTICE_ROOM);
    let mut out = head;
    let mut left_violations = 0;
    if out.len() + violations_block.len() <= budget {
        out.push_str(&violations_block);
    } else if let Some((t, left)) = truncate_table(&violations_block, budget.saturating_sub(out.len()) / 2) {
        out.push_str(&t);
        left_violations = left;
    } else {
        left_violations = violations.len();
    }
    let all_tables: usize = tables.iter().map(String::len).sum();
    let mut summarised = false;
    let mut left_rows = 0;
    if out.len() + all_tables <= budget {
        out.extend(tables);
    } else {
        summarised = true;
        for r in [Risk::Critical, Risk::High, Risk::Medium, Risk::Low] {
            let Some(t) = grouped_table(&shown, r) else { continue };
            if out.len() + t.len() <= budget {
                out.push_str(&t);
            } else if let Some((t, left)) = truncate_table(&t, budget.saturating_sub(out.len())) {
                out.push_str(&t);
                left_rows += left;
            } else {
                left_rows += t.lines().count().saturating_sub(4);
            }
        }
    }
    let mut left_tenants = 0;
    let mut left_changes = 0;
    let mut cut_short = None;
    for (tenant, n, d) in &details {
        if left_tenants == 0 && out.len() + d.len() <= budget {
            out.push_str(d);
            continue;
        }
        if left_tenants == 0 && cut_short.is_none() {
            let room = budget.saturating_sub(out.len());
            if let Some(part) = cut_details(d, room) {
                out.push_str(&part);
                cut_short = Some(tenant.clone());
                continue;
            }
        }
        left_tenants += 1;
        left_changes += n;
    }
    if left_tenants > 0 || cut_short.is_some() || summarised || left_violations > 0 {
        let mut what = Vec::new();
        if summarised {
            what.push("the per-resource tables are summarised per kind of change".to_owned());
        }
        if left_rows > 0 {
            what.push(format!("{left_rows} summary row{} are left out", plural(left_rows)));
        }
        if left_violations > 0 {
            what.push(format!("{left_violations} violation{} are left out", plural(left_violations)));
        }
        if let Some(t) = &cut_short {
            what.push(format!("the diff of `{t}` is cut short"));
        }
        if left_tenants > 0 {
            what.push(format!(
                "the diffs of {left_tenants} of {} tenants ({left_changes} change{}) are left out",
                details.len(),
                plural(left_changes)
            ));
        }
        let _ = write!(out, "\n> **Truncated** to stay within {max} characters: {}.", what.join("; "));
        if let Some(w) = o.full_report {
            let _ = write!(out, " The full report is in {w}.");
        }
        out.push('\n');
    }
    out
}

fn violations_table(violations: &[Violation]) -> String {
    if violations.is_empty() {
        return String::new();
    }
    let mut v = String::from("### Violations\n\n| severity | tenant | rule | message |\n| --- | --- | --- | --- |\n");
    let mut sorted: Vec<&Violation> = violations.iter().collect();
    sorted.sort_by_key(|x| x.severity);
    for x in sorted {
        let sev = if x.severity == Severity::Error { "❌ error" } else { "⚠️ warning" };
        let tenant = if x.tenant.is_empty() { "—".to_owned() } else { format!("`{}`", code(&x.tenant)) };
        let _ = writeln!(v, "| {sev} | {tenant} | {} | {} |", cell(&x.rule), cell(&x.message));
    }
    v.push('\n');
    v
}

fn risk_table(shown: &[&Change], risk: Risk) -> Option<String> {
    let rows: Vec<&&Change> = shown.iter().filter(|c| c.risk == risk && c.action != Action::Noop).collect();
    if rows.is_empty() {
        return None;
    }
    let mut t = format!(
        "### {} ({})\n\n| tenant | resource | action | why |\n| --- | --- | --- | --- |\n",
        risk_title(risk),
        rows.len()
    );
    for c in rows {
        let _ = writeln!(
            t,
            "| `{}` | `{}` | {}{} | {} |",
            code(&c.address.tenant),
            code(&local(c)),
            symbol(c.action),
            if c.drift { " (drift)" } else { "" },
            cell(&c.reason)
        );
    }
    t.push('\n');
    Some(t)
}

/// One row per kind of change at a risk level: the address with the tenant's id replaced by
/// `<tenant>`, the action, and how many tenants (and which, the first few).
fn grouped_table(shown: &[&Change], risk: Risk) -> Option<String> {
    let rows: Vec<&&Change> = shown.iter().filter(|c| c.risk == risk && c.action != Action::Noop).collect();
    if rows.is_empty() {
        return None;
    }
    let mut groups: BTreeMap<(String, Action), Vec<&str>> = BTreeMap::new();
    for c in &rows {
        let pattern = local(c).replace(c.address.tenant.as_str(), "<tenant>");
        groups.entry((pattern, c.action)).or_default().push(&c.address.tenant);
    }
    let tenants: BTreeMap<&str, ()> = rows.iter().map(|c| (c.address.tenant.as_str(), ())).collect();
    let mut t = format!(
        "### {} ({} change{} on {} tenant{})\n\n| resource | action | tenants |\n| --- | --- | --- |\n",
        risk_title(risk),
        rows.len(),
        plural(rows.len()),
        tenants.len(),
        plural(tenants.len())
    );
    for ((pattern, action), ts) in groups {
        let first: Vec<String> = ts.iter().take(3).map(|t| format!("`{}`", code(t))).collect();
        let more = if ts.len() > 3 { format!(" and {} more", ts.len() - 3) } else { String::new() };
        let _ = writeln!(t, "| `{}` | {} | {}: {}{more} |", code(&pattern), symbol(action), ts.len(), first.join(", "));
    }
    t.push('\n');
    Some(t)
}

/// One `<details>` per tenant, the riskiest tenants first: (tenant, changes, text).
fn tenant_details(shown: &[&Change], full_contents: bool) -> Vec<(String, usize, String)> {
    let mut per_tenant: BTreeMap<&str, Vec<&Change>> = BTreeMap::new();
    for c in shown {
        per_tenant.entry(c.address.tenant.as_str()).or_default().push(c);
    }
    let mut details: Vec<(Risk, String, usize, String)> = Vec::new();
    for (tenant, cs) in &per_tenant {
        let counts = cs
            .iter()
            .fold(BTreeMap::<&str, usize>::new(), |mut m, c| {
                *m.entry(c.action.as_str()).or_default() += 1;
                m
            })
            .iter()
            .map(|(a, n)| format!("{n} {a}"))
            .collect::<Vec<_>>()
            .join(", ");
        let highest = cs.iter().map(|c| c.risk).max().unwrap_or(Risk::Low);
        let mut d = format!(
            "<details><summary><code>{}</code>: {counts} · risk {}</summary>\n\n```diff\n",
            html(tenant),
            highest.as_str()
        );
        for c in cs {
            let _ = writeln!(d, "# {} {}", symbol(c.action), local(c));
            if !full_contents && matches!(c.action, Action::Create | Action::Delete) {
                continue;
            }
            for line in c.diff_text().lines().skip(2) {
                d.push_str(&fence_safe(line));
                d.push('\n');
            }
        }
        d.push_str("```\n\n</details>\n\n");
        details.push((highest, tenant.to_string(), cs.len(), d));
    }
    details.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    details.into_iter().map(|(_, t, n, d)| (t, n, d)).collect()
}

/// A tenant's details cut to `room` bytes at a line, the fence closed, with a count of the
/// lines left out; `None` if too little room to be worth it.
fn cut_details(d: &str, room: usize) -> Option<String> {
    const CLOSE: &str = "```\n\n</details>\n\n";
    if room < 1500 {
        return None;
    }
    let lines: Vec<&str> = d.lines().collect();
    let mut out = String::new();
    let mut kept = 0;
    for l in &lines {
        if out.len() + l.len() + 1 + CLOSE.len() + 80 > room {
            break;
        }
        out.push_str(l);
        out.push('\n');
        kept += 1;
    }
    let left = lines.len().saturating_sub(kept + 3);
    let _ = writeln!(out, "# … {left} more line{} in the full report", plural(left));
    out.push_str(CLOSE);
    Some(out)
}

/// Keeps the first rows of a table that fit in `room`, with a row counting the rest:
/// (text, rows left out). `None` if not even a few rows fit.
fn truncate_table(block: &str, room: usize) -> Option<(String, usize)> {
    let lines: Vec<&str> = block.lines().collect();
    if lines.len() < 5 || room < 300 {
        return None;
    }
    let columns = lines[2].matches('|').count().saturating_sub(1);
    let mut out = String::new();
    let rows = lines.len() - 4; // title, blank, header, separator
    let mut kept = 0;
    for (i, l) in lines.iter().enumerate() {
        if i >= 4 && out.len() + l.len() + 120 > room {
            break;
        }
        out.push_str(l);
        out.push('\n');
        if i >= 4 {
            kept += 1;
        }
    }
    let left = rows.saturating_sub(kept);
    if left == 0 {
        out.push('\n');
        return Some((out, 0));
    }
    let _ = writeln!(out, "| … {left} more |{}\n", " |".repeat(columns.saturating_sub(1)));
    Some((out, left))
}

/// Text inside a table cell: no pipes, newlines or HTML.
fn cell(s: &str) -> String {
    html(s).replace('|', "\\|").replace('\n', " ")
}

/// Text inside a `code` span in a table cell: GitHub shows it as written (no HTML, no
/// entities), so only what would end the span or the cell is replaced.
fn code(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ").replace('`', "'")
}

/// Text that GitHub must not take for HTML.
fn html(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A diff line inside a ```` ``` ```` fence: a line of backticks would close it early.
fn fence_safe(line: &str) -> String {
    if line.trim_start_matches(['+', '-', ' ']).starts_with("```") {
        line.replacen("```", "ˋˋˋ", 1)
    } else {
        line.to_owned()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::model::{Address, Content};

    /// A change of `lines` changed lines, for the plan's output tests.
    pub(in crate::plan) fn change(a: &str, action: Action, risk: Risk, lines: usize) -> Change {
        let address = Address::parse(a).unwrap();
        let mut diff = format!("--- {a}\n+++ {a}\n@@ -1,{lines} +1,{lines} @@\n");
        for i in 0..lines {
            diff.push_str(&format!("-old line {i}\n+new line {i}\n"));
        }
        Change {
            address,
            action,
            drift: false,
            risk,
            reason: "changed | in <templates>".into(),
            desired: Some(Content::Text(String::new()).into()),
            desired_fingerprint: None,
            live_fingerprint: None,
            last_fingerprint: None,
            before: None,
            fields: Vec::new(),
            diff,
            refresh: false,
        }
    }

    fn opts(max: Option<usize>) -> Options<'static> {
        Options {
            title: "t",
            subtitle: None,
            max_chars: max,
            full_report: Some("the job summary"),
            marker: Some("m"),
            full_contents: false,
        }
    }

    #[test]
    fn cells_are_escaped_and_fences_stay_closed() {
        let mut c = change("t1/isp.config", Action::Update, Risk::Low, 1);
        c.diff.push_str("+```\n");
        let md = render(&[c], &[], &opts(None));
        assert!(md.starts_with("<!-- m -->\n## t\n"), "{md}");
        assert!(md.contains("changed \\| in &lt;templates&gt;"), "{md}");
        assert!(md.contains("+ˋˋˋ"), "{md}");
        assert_eq!(md.matches("```").count(), 2, "{md}");
    }

    #[test]
    fn a_cap_summarises_then_truncates_with_a_notice() {
        let mut cs = Vec::new();
        for t in 0..400 {
            cs.push(change(&format!("tenant-{t:04}/isp.config"), Action::Update, Risk::Medium, 20));
            cs.push(change(
                &format!("tenant-{t:04}/kubernetes.Namespace[dotmac-tenant-{t:04}]"),
                Action::Update,
                Risk::Low,
                2,
            ));
        }
        cs.push(change("tenant-0399/management.tenant", Action::Delete, Risk::Critical, 3));
        let full = render(&cs, &[], &opts(None));
        assert!(full.len() > GITHUB_COMMENT_LIMIT);
        let md = render(&cs, &[], &opts(Some(GITHUB_COMMENT_LIMIT)));
        assert!(md.len() <= GITHUB_COMMENT_LIMIT, "{}", md.len());
        assert!(md.contains("| `kubernetes.Namespace[dotmac-<tenant>]` | ~ update | 400: `tenant-0000`"), "{md}");
        assert!(md.contains("> **Truncated** to stay within 65536 characters"), "{md}");
        assert!(md.contains("The full report is in the job summary."));
        // The riskiest tenant's diff comes first.
        let first = md.find("<details>").unwrap();
        assert!(md[first..].starts_with("<details><summary><code>tenant-0399</code>"), "{}", &md[first..first + 80]);
        // Every fence opened is closed.
        assert_eq!(md.matches("```diff").count() * 2, md.matches("```").count());
        assert_eq!(md.matches("<details>").count(), md.matches("</details>").count());
    }

    #[test]
    fn many_violations_are_cut_to_fit() {
        let vs: Vec<Violation> = (0..3000)
            .map(|i| Violation {
                tenant: format!("t{i}"),
                rule: "unknown-reference".into(),
                severity: Severity::Error,
                message: format!("tenants/t{i}/tenant.yaml:9: plan `premum` does not exist"),
                address: None,
            })
            .collect();
        let cs = vec![change("t1/isp.config", Action::Update, Risk::Low, 2)];
        let md = render(&cs, &vs, &opts(Some(GITHUB_COMMENT_LIMIT)));
        assert!(md.len() <= GITHUB_COMMENT_LIMIT);
        assert!(md.contains("| ❌ error | `t0` | unknown-reference |"));
        assert!(md.contains(" more | | | |"), "a row counts the rest");
        assert!(md.contains("violations are left out"), "{}", &md[md.len() - 400..]);
        assert!(md.contains("<details><summary><code>t1</code>"), "the changes still have room");
    }
}
