//! The plan for people on a terminal: per tenant, one line per change and the diff of
//! updates, then violations and a one-line summary.

use super::Plan;
use crate::diff::{Action, Change, Severity, Violation};
use std::fmt::Write;

struct Paint(bool);

impl Paint {
    fn c(&self, code: &str, s: &str) -> String {
        if self.0 { format!("\x1b[{code}m{s}\x1b[0m") } else { s.to_owned() }
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
    out.trim_start_matches('\n').to_owned()
}

/// Per tenant, one line per change and the diff of updates and deletes; then violations.
pub fn changes(changes: &[Change], violations: &[Violation], color: bool, max_diff_lines: usize) -> String {
    let p = Paint(color);
    let mut out = String::new();
    let mut tenant = "";
    for c in changes {
        if c.address.tenant != tenant {
            tenant = &c.address.tenant;
            let _ = writeln!(out, "\n{}", p.c("1", tenant));
        }
        let (sym, code) = symbol(c);
        let local = &c.address.to_string()[tenant.len() + 1..];
        let mut flags = vec![c.action.as_str().to_owned(), c.risk.as_str().to_owned()];
        if c.drift {
            flags.push("drift".into());
        }
        let risk_code = match c.risk {
            crate::diff::Risk::Critical => "1;31",
            crate::diff::Risk::High => "31",
            crate::diff::Risk::Medium => "33",
            crate::diff::Risk::Low => "2",
        };
        let _ = writeln!(
            out,
            "  {} {:<48} {}  {}",
            p.c(code, sym),
            local,
            p.c(risk_code, &format!("[{}]", flags.join(", "))),
            c.reason
        );
        if matches!(c.action, Action::Update | Action::Delete | Action::Rotate) || c.drift {
            let diff = c.diff_text();
            for (n, line) in diff.lines().skip(2).enumerate() {
                if max_diff_lines > 0 && n == max_diff_lines {
                    let _ = writeln!(out, "      … ({} more lines)", diff.lines().count() - 2 - n);
                    break;
                }
                let colored = match line.chars().next() {
                    Some('+') => p.c("32", line),
                    Some('-') => p.c("31", line),
                    Some('@') => p.c("36", line),
                    _ => line.to_owned(),
                };
                let _ = writeln!(out, "      {colored}");
            }
        }
    }
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
