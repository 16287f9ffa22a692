//! The plan for people on a terminal: per tenant, one line per change and the diff of
//! updates, then violations and a one-line summary.

use super::Plan;
use crate::diff::{Action, Change, Severity, Violation};
use rayon::prelude::*;
use std::fmt::Write;

struct Paint(bool);

impl Paint {
    /// `s` in the color `code` (an SGR code) when colors are on; written where it is
    /// printed, not into a string of its own (a plan of 130,000 changes prints a million).
    fn c<'a, T: std::fmt::Display>(&self, code: &'a str, s: T) -> Painted<'a, T> {
        self.maybe(Some(code), s)
    }

    /// `s` in the color `code`, if there is one and colors are on.
    fn maybe<'a, T: std::fmt::Display>(&self, code: Option<&'a str>, s: T) -> Painted<'a, T> {
        Painted { code: code.filter(|_| self.0), s }
    }
}

struct Painted<'a, T> {
    code: Option<&'a str>,
    s: T,
}

impl<T: std::fmt::Display> std::fmt::Display for Painted<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(code) => write!(f, "\x1b[{code}m{}\x1b[0m", self.s),
            None => self.s.fmt(f),
        }
    }
}

/// A change's flags as the plan prints them: `[create, low]`, `[update, high, drift]`.
struct Flags<'a>(&'a Change);

impl std::fmt::Display for Flags<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = self.0;
        write!(f, "[{}, {}{}]", c.action.as_str(), c.risk.as_str(), if c.drift { ", drift" } else { "" })
    }
}

fn symbol(c: &Change) -> (&'static str, &'static str) {
    match c.action {
        Action::Create => ("+", "32"),
        Action::Update => ("~", "33"),
        Action::Rotate => ("*", "35"),
        Action::Delete => ("-", "31"),
        Action::Noop => ("=", "36"),
    }
}

/// The plan as text. `max_diff_lines` bounds each diff (0: no limit).
pub fn render(plan: &Plan, color: bool, max_diff_lines: usize) -> String {
    let p = Paint(color);
    let mut out = changes(&plan.changes, &plan.violations, color, max_diff_lines);
    let s = &plan.summary;
    let _ = writeln!(out);
    if !plan.has_changes() && s.drift == 0 {
        let _ =
            writeln!(out, "{}", p.c("1;32", &format!("No changes. {} resources are as the repository says.", s.noop)));
    } else {
        let _ = writeln!(
            out,
            "{} {} to create, {} to update, {} to rotate, {} to delete; {} unchanged; {} drifted.",
            p.c("1", "Plan:"),
            s.create,
            s.update,
            s.rotate,
            s.delete,
            s.noop,
            s.drift
        );
    }
    // The leading blank lines go in place: a copy of a 10,000-tenant plan's text was 15 MB
    // of fresh memory.
    let blank = out.len() - out.trim_start_matches('\n').len();
    out.drain(..blank);
    out
}

/// Per tenant, one line per change and the diff of updates and deletes; then violations.
/// A plan of a hundred thousand changes is written in runs of whole tenants, side by side.
pub fn changes(changes: &[Change], violations: &[Violation], color: bool, max_diff_lines: usize) -> String {
    const RUN: usize = 4096;
    let mut runs: Vec<&[Change]> = Vec::with_capacity(changes.len() / RUN + 1);
    let mut rest = changes;
    while rest.len() > RUN {
        // The run ends where a tenant does, so that each starts with its tenant's heading.
        let last = &rest[RUN - 1].address.tenant;
        let end = RUN + rest[RUN..].iter().take_while(|c| &c.address.tenant == last).count();
        let (run, next) = rest.split_at(end);
        runs.push(run);
        rest = next;
    }
    runs.push(rest);
    let texts: Vec<String> = runs.into_par_iter().map(|run| tenant_changes(run, color, max_diff_lines)).collect();
    let mut out = String::with_capacity(texts.iter().map(String::len).sum::<usize>() + 64 * violations.len());
    texts.iter().for_each(|t| out.push_str(t));
    let p = Paint(color);
    if !violations.is_empty() {
        let _ = writeln!(out, "\n{}", p.c("1", "Violations"));
        for v in violations {
            let word = match v.severity {
                Severity::Error => p.c("1;31", "error"),
                Severity::Warning => p.c("1;33", "warning"),
            };
            let _ = writeln!(out, "  {word}[{}]: {}", v.rule, v.message);
        }
    }
    out
}

/// The changes' lines, a heading before each tenant's.
fn tenant_changes(changes: &[Change], color: bool, max_diff_lines: usize) -> String {
    let p = Paint(color);
    let mut out = String::new();
    let mut tenant = "";
    let mut address = String::new();
    for c in changes {
        if c.address.tenant != tenant {
            tenant = &c.address.tenant;
            let _ = writeln!(out, "\n{}", p.c("1", tenant));
        }
        let (sym, code) = symbol(c);
        c.address.write_text(&mut address);
        let local = &address[tenant.len() + 1..];
        let risk_code = match c.risk {
            crate::diff::Risk::Critical => "1;31",
            crate::diff::Risk::High => "31",
            crate::diff::Risk::Medium => "33",
            crate::diff::Risk::Low => "2",
        };
        let _ = writeln!(out, "  {} {:<48} {}  {}", p.c(code, sym), local, p.c(risk_code, Flags(c)), c.reason);
        if matches!(c.action, Action::Update | Action::Delete | Action::Rotate) || c.drift {
            let diff = c.diff_text();
            for (n, line) in diff.lines().skip(2).enumerate() {
                if max_diff_lines > 0 && n == max_diff_lines {
                    let _ = writeln!(out, "      … ({} more lines)", diff.lines().count() - 2 - n);
                    break;
                }
                let color = match line.as_bytes().first() {
                    Some(b'+') => Some("32"),
                    Some(b'-') => Some("31"),
                    Some(b'@') => Some("36"),
                    _ => None,
                };
                let colored = p.maybe(color, line);
                let _ = writeln!(out, "      {colored}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::Risk;
    use crate::plan::markdown::tests::change;

    #[test]
    fn a_long_plan_written_in_runs_reads_as_one() {
        // 9 changes per tenant: the runs of 4,096 changes end inside a tenant.
        let changes: Vec<Change> = (0..1000)
            .flat_map(|t| {
                (0..9).map(move |i| {
                    let action = if i % 3 == 0 { Action::Update } else { Action::Create };
                    change(&format!("t{t:04}/kubernetes.ConfigMap[c{i}]"), action, Risk::Low, 1)
                })
            })
            .collect();
        let text = changes_text(&changes);
        assert_eq!(text, tenant_changes(&changes, false, 200));
        assert_eq!(text.matches("\nt0455\n").count(), 1, "one heading per tenant");
        assert_eq!(text.lines().filter(|l| l.starts_with("t")).count(), 1000);
    }

    fn changes_text(changes: &[Change]) -> String {
        super::changes(changes, &[], false, 200)
    }
}
