//! Diagnostics: every problem found in a repository, with where it is and what to do.
//!
//! Checks create diagnostics that name a file, a document and a JSON pointer; positions
//! (line, column) are filled in afterwards by `resolve_positions`, which re-reads only the
//! documents that have problems. `render_human` prints them the way rustc does.

use crate::load::yaml;
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// What part of a node a diagnostic points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Key,
    Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    /// A short, stable identifier of the check (`schema`, `unknown-reference`, ...).
    pub rule: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pointer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
    #[serde(skip)]
    pub len: usize,
    /// Which document of the file the pointer is in, and what to underline.
    #[serde(skip)]
    pub anchor: Option<(usize, Target)>,
}

impl Diagnostic {
    pub fn new(severity: Severity, rule: &'static str, message: impl Into<String>) -> Self {
        Diagnostic {
            severity,
            rule,
            file: None,
            line: None,
            column: None,
            pointer: None,
            tenant: None,
            message: message.into(),
            help: None,
            len: 1,
            anchor: None,
        }
    }
    pub fn error(rule: &'static str, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, rule, message)
    }
    pub fn warning(rule: &'static str, message: impl Into<String>) -> Self {
        Self::new(Severity::Warning, rule, message)
    }
    pub fn file(mut self, path: impl Into<String>) -> Self {
        self.file = Some(path.into());
        self
    }
    /// Points at the node `pointer` of document `doc` in the diagnostic's file.
    pub fn at(mut self, doc: usize, pointer: impl Into<String>, target: Target) -> Self {
        self.pointer = Some(pointer.into());
        self.anchor = Some((doc, target));
        self
    }
    pub fn line(mut self, line: usize, column: usize) -> Self {
        self.line = Some(line);
        self.column = Some(column);
        self
    }
    pub fn tenant(mut self, id: impl Into<String>) -> Self {
        self.tenant = Some(id.into());
        self
    }
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// Fills in line and column for diagnostics that carry a pointer, using the file texts.
pub fn resolve_positions<'a>(diags: &mut [Diagnostic], text_of: impl Fn(&str) -> Option<&'a str>) {
    for d in diags.iter_mut() {
        if d.line.is_some() {
            continue;
        }
        let (Some(file), Some(pointer), Some((doc, target))) = (&d.file, &d.pointer, d.anchor) else {
            continue;
        };
        let Some(text) = text_of(file) else { continue };
        if file.ends_with(".toml") {
            if let Some((line, col, len)) = locate_toml(text, pointer) {
                d.line = Some(line);
                d.column = Some(col);
                d.len = len;
            }
            continue;
        }
        if let Some(loc) = yaml::locate(text, doc, pointer) {
            let p = match (target, loc.key) {
                (Target::Key, Some(k)) => k,
                _ => loc.value,
            };
            d.line = Some(p.line);
            d.column = Some(p.column);
            d.len = p.len;
        }
    }
}

/// Best-effort position of a pointer like `/providers/isp/kind` in a TOML file:
/// the line of `kind = ...` under `[providers.isp]`.
pub fn locate_toml(text: &str, pointer: &str) -> Option<(usize, usize, usize)> {
    let segs = yaml::pointer_segments(pointer);
    let (key, table) = segs.split_last()?;
    let want_table = table.join(".");
    let mut current = String::new();
    let mut table_line = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(h) = line.strip_prefix('[') {
            current = h.trim_end_matches(']').trim().to_owned();
            if current == want_table {
                table_line = Some((i + 1, 1, raw.len().max(1)));
            }
            continue;
        }
        if current == want_table
            && let Some((k, _)) = line.split_once('=')
            && k.trim().trim_matches('"') == key
        {
            let col = raw.len() - raw.trim_start().len() + 1;
            return Some((i + 1, col, k.trim().len().max(1)));
        }
    }
    // The key may be missing (a required setting) or itself be a table.
    let full = segs.join(".");
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().trim_start_matches('[').trim_end_matches(']').trim() == full {
            return Some((i + 1, 1, raw.len().max(1)));
        }
    }
    table_line
}

/// Sorts diagnostics for output: by file, line, then message; errors before warnings
/// where nothing else tells them apart.
pub fn sort(diags: &mut [Diagnostic]) {
    diags.sort_by(|a, b| {
        (a.file.as_deref().unwrap_or(""), a.line.unwrap_or(0), a.column.unwrap_or(0), a.severity, &a.message).cmp(&(
            b.file.as_deref().unwrap_or(""),
            b.line.unwrap_or(0),
            b.column.unwrap_or(0),
            b.severity,
            &b.message,
        ))
    });
}

struct Style {
    color: bool,
}

impl Style {
    fn paint(&self, code: &str, s: &str) -> String {
        if self.color { format!("\x1b[{code}m{s}\x1b[0m") } else { s.to_owned() }
    }
}

/// Text from a repository, made safe for a terminal: control characters (but tabs) and the
/// bidirectional overrides that reorder what a reader sees are shown escaped, so a file or
/// name cannot move the cursor, set a window title or disguise what a line says.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char =
        |c: char| (c.is_control() && c != '\t') || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !s.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Human output in the manner of rustc: a headline, the place, the line with a caret, notes.
pub fn render_human<'a>(diags: &[Diagnostic], text_of: impl Fn(&str) -> Option<&'a str>, color: bool) -> String {
    let st = Style { color };
    let mut cache: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut out = String::new();
    for d in diags {
        let (word, code) = match d.severity {
            Severity::Error => ("error", "1;31"),
            Severity::Warning => ("warning", "1;33"),
        };
        let _ = writeln!(
            out,
            "{}{}",
            st.paint(code, &format!("{word}[{}]", d.rule)),
            st.paint("1", &format!(": {}", printable(&d.message)))
        );
        let gutter_width = d.line.map(|l| l.to_string().len()).unwrap_or(1);
        let pad = " ".repeat(gutter_width);
        if let Some(file) = &d.file {
            let place = match (d.line, d.column) {
                (Some(l), Some(c)) => format!("{file}:{l}:{c}"),
                (Some(l), None) => format!("{file}:{l}"),
                _ => file.clone(),
            };
            let place = printable(&place);
            let _ = writeln!(out, "{pad}{} {place}", st.paint("1;34", "-->"));
            if let (Some(l), Some(text)) = (d.line, text_of(file)) {
                let lines = cache.entry(file.as_str()).or_insert_with(|| text.lines().collect());
                if let Some(src) = lines.get(l - 1) {
                    let src = src.trim_end_matches('\r');
                    let col = d.column.unwrap_or(1);
                    let shown: String = src.chars().take(200).collect();
                    let shown = printable(&shown);
                    let _ = writeln!(out, "{pad} {}", st.paint("1;34", "|"));
                    let _ = writeln!(out, "{} {} {shown}", st.paint("1;34", &l.to_string()), st.paint("1;34", "|"));
                    let lead: String =
                        src.chars().take(col.saturating_sub(1)).map(|c| if c == '\t' { '\t' } else { ' ' }).collect();
                    let _ = writeln!(
                        out,
                        "{pad} {} {lead}{}",
                        st.paint("1;34", "|"),
                        st.paint(code, &"^".repeat(d.len.clamp(1, 120)))
                    );
                }
            }
        }
        let mut notes = Vec::new();
        if let Some(p) = &d.pointer {
            notes.push(format!("at {}", if p.is_empty() { "/" } else { p }));
        }
        if let Some(t) = &d.tenant {
            notes.push(format!("tenant {t}"));
        }
        if !notes.is_empty() {
            let _ = writeln!(out, "{pad} {} {}", st.paint("1;34", "="), printable(&notes.join(", ")));
        }
        if let Some(h) = &d.help {
            let _ = writeln!(out, "{pad} {} help: {}", st.paint("1;34", "="), printable(h));
        }
        out.push('\n');
    }
    let errors = diags.iter().filter(|d| d.is_error()).count();
    let warnings = diags.len() - errors;
    if errors > 0 || warnings > 0 {
        let _ = writeln!(
            out,
            "{}",
            st.paint(
                if errors > 0 { "1;31" } else { "1;33" },
                &format!(
                    "{errors} error{}, {warnings} warning{}",
                    if errors == 1 { "" } else { "s" },
                    if warnings == 1 { "" } else { "s" }
                )
            )
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_text_is_escaped_for_terminals() {
        assert_eq!(printable("plain\ttext é"), "plain\ttext é");
        assert_eq!(printable("a\x1b]0;title\x07b"), "a\\u{1b}]0;title\\u{7}b");
        assert_eq!(printable("x\u{202e}y\nz\0"), "x\\u{202e}y\\u{a}z\\u{0}");
    }

    #[test]
    fn toml_keys_are_found_under_their_table() {
        let text = "format = 1\n\n[providers.isp]\nkind = \"ftp\"\n";
        assert_eq!(locate_toml(text, "/providers/isp/kind"), Some((4, 1, 4)));
        assert_eq!(locate_toml(text, "/format"), Some((1, 1, 6)));
    }
}
