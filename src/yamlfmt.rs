//! A small YAML writer for structured content shown to people (render output, plan diffs,
//! the local live store). Block style, keys in their order, strings quoted only when a YAML
//! 1.2 reader would otherwise see something else; what it writes reads back identical.

use crate::load::yaml::reads_as_text;
use serde_json::Value;

pub fn to_yaml(v: &Value) -> String {
    let mut out = String::with_capacity(512);
    write_indented(v, 0, &mut out);
    out
}

/// Appends `v` as [`to_yaml`] writes it, with every line indented by `level` more spaces (no
/// line it writes is empty, so this is exactly that text with `level` spaces before each
/// line): the local stores frame their entries' content this way as they write it.
pub fn write_indented(v: &Value, level: usize, out: &mut String) {
    match v {
        Value::Object(m) if !m.is_empty() => write_map(m, level, out),
        Value::Array(a) if !a.is_empty() => write_seq(a, level, out),
        other => {
            indent(level, out);
            scalar(other, out);
            out.push('\n');
        }
    }
}

fn indent(n: usize, out: &mut String) {
    out.extend(std::iter::repeat_n(' ', n));
}

fn write_map(m: &serde_json::Map<String, Value>, level: usize, out: &mut String) {
    for (k, v) in m {
        indent(level, out);
        string(k, out);
        out.push(':');
        write_child(v, level, out);
    }
}

fn write_seq(a: &[Value], level: usize, out: &mut String) {
    for v in a {
        indent(level, out);
        out.push('-');
        match v {
            Value::Object(m) if !m.is_empty() => {
                // First key on the dash line, the rest aligned under it.
                out.push(' ');
                let first = out.len();
                write_map(m, level + 2, out);
                out.replace_range(first..first + level + 2, "");
            }
            _ => write_child(v, level, out),
        }
    }
}

fn write_child(v: &Value, level: usize, out: &mut String) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            write_map(m, level + 2, out);
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            write_seq(a, level + 2, out);
        }
        other => {
            out.push(' ');
            scalar(other, out);
            out.push('\n');
        }
    }
}

fn scalar(v: &Value, out: &mut String) {
    use std::fmt::Write;
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Value::String(s) => string(s, out),
        Value::Array(_) => out.push_str("[]"),
        Value::Object(_) => out.push_str("{}"),
    }
}

/// A string plain where a YAML 1.2 reader reads it back as the same string, else quoted.
fn string(s: &str, out: &mut String) {
    if plain_ok(s) {
        out.push_str(s);
    } else {
        out.push_str(&serde_json::to_string(s).unwrap_or_default());
    }
}

/// Whether `s` can be written plain: `plain_ok_any` in one pass over the bytes, for ASCII
/// (nearly every key and value). The stores' YAML is a twentieth of a cold apply's CPU, and
/// this check had been two thirds of it.
fn plain_ok(s: &str) -> bool {
    let b = s.as_bytes();
    let (Some(&first), Some(&last)) = (b.first(), b.last()) else { return false };
    if !s.is_ascii() {
        return plain_ok_any(s);
    }
    // The reader's own list of what cannot start a plain scalar (it also names `#`, `'`
    // and `"`, which the loop below refuses anywhere).
    if first == b' ' || last == b' ' || last == b':' || crate::load::yaml_block::starts_indicator(first) {
        return false;
    }
    let mut after_colon = false;
    for &c in b {
        match PLAIN[usize::from(c)] {
            OTHER => after_colon = false,
            NEVER => return false,
            SPACE if after_colon => return false,
            SPACE => {}
            _ /* COLON */ => after_colon = true,
        }
    }
    reads_as_text(s)
}

/// What an ASCII byte is to [`plain_ok`], looked up once per byte: with a chain of
/// comparisons per byte instead, `string` was three quarters of the YAML writer's
/// instructions under callgrind (113.5 M of 148.8 M at 2,000 tenants; 82.7 M with this).
const OTHER: u8 = 0;
/// Never in a plain scalar as written here: control characters (every ASCII space but ' '
/// itself: tab, line breaks), DEL, and `#"'{}[],`.
const NEVER: u8 = 1;
const SPACE: u8 = 2;
const COLON: u8 = 3;
const PLAIN: [u8; 256] = {
    let mut t = [OTHER; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = NEVER;
        c += 1;
    }
    t[0x7f] = NEVER;
    let never = b"#\"'{}[],";
    let mut i = 0;
    while i < never.len() {
        t[never[i] as usize] = NEVER;
        i += 1;
    }
    t[b' ' as usize] = SPACE;
    t[b':' as usize] = COLON;
    t
};

/// Whether `s` can be written plain, for any string.
fn plain_ok_any(s: &str) -> bool {
    !s.is_empty()
        && s.trim() == s
        && !s.contains(['\n', '\r', '\t', '#', '"', '\''])
        && !s.contains(": ")
        && !s.ends_with(':')
        && !s.as_bytes().first().is_some_and(|&b| crate::load::yaml_block::starts_indicator(b))
        && !s.contains(['{', '}', '[', ']', ','])
        && s.chars().all(|c| !c.is_control())
        && reads_as_text(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::yaml::parse_documents;
    use serde_json::json;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]
        /// The one-pass check answers as the general one, on strings made of the characters
        /// that matter to it (and any other).
        #[test]
        fn the_fast_plain_check_agrees(s in "[-a-z0-9 :#,?&*!|>%@`'\"\\[\\]{}\t\n\r\x0b\x7f.~_/=+]{0,12}|\\PC{0,8}") {
            proptest::prop_assert_eq!(plain_ok(&s), plain_ok_any(&s), "{:?}", s);
        }
    }

    #[test]
    fn the_fast_plain_check_agrees_on_edges() {
        for s in [
            "",
            " ",
            "a",
            "a ",
            " a",
            "a:",
            "a: b",
            "a:b",
            "http://x",
            "-x",
            "x-",
            "#x",
            "x #y",
            "x#y",
            "true",
            "True",
            "null",
            "~",
            "1",
            "0x1f",
            "1.5",
            "1e3",
            ".inf",
            "yes",
            "no",
            "on",
            "a\tb",
            "\u{7f}",
            "a,b",
            "[x]",
            "x]",
            "{",
            "'",
            "\"",
            "\\",
            "ok",
            "enabled",
            "tenant-000001",
            "2026-11-22T00:00:00Z",
        ] {
            assert_eq!(plain_ok(s), plain_ok_any(s), "{s:?}");
        }
    }

    #[test]
    fn round_trips() {
        let v = json!({
            "apiVersion": "v1",
            "metadata": {"name": "x", "labels": {"a/b": "c"}},
            "spec": {"items": [{"name": "n", "value": "1"}, "plain", 3, true, null, "yes", "", "a: b", "-x"],
                     "empty": {}, "none": [], "text": "line1\nline2", "num": 1.5}
        });
        let text = to_yaml(&v);
        let back = parse_documents(&text).unwrap();
        assert_eq!(back[0].value, v, "{text}");
    }
}
