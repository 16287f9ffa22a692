//! A small YAML writer for structured content shown to people (render output, plan diffs,
//! the local live store). Block style, keys in their order, strings quoted only when a YAML
//! 1.2 reader would otherwise see something else; what it writes reads back identical.

use crate::load::yaml::reads_as_text;
use serde_json::Value;

pub fn to_yaml(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Object(m) if !m.is_empty() => write_map(m, 0, &mut out),
        Value::Array(a) if !a.is_empty() => write_seq(a, 0, &mut out),
        other => {
            scalar(other, &mut out);
            out.push('\n');
        }
    }
    out
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
    let plain_ok = !s.is_empty()
        && s.trim() == s
        && !s.contains(['\n', '\r', '\t', '#', '"', '\''])
        && !s.contains(": ")
        && !s.ends_with(':')
        && !s.starts_with(['-', '?', ':', ',', '[', ']', '{', '}', '&', '*', '!', '|', '>', '%', '@', '`'])
        && !s.contains(['{', '}', '[', ']', ','])
        && s.chars().all(|c| !c.is_control())
        && reads_as_text(s);
    if plain_ok {
        out.push_str(s);
    } else {
        out.push_str(&serde_json::to_string(s).unwrap_or_default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::yaml::parse_documents;
    use serde_json::json;

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
