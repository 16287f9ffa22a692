//! Printing values the way Jinja2 (that is, Python's `str()`) does, so that renders match the
//! seeds' Jinja2 output byte for byte: `None`, `True`, `['a', 'b']`, `{'k': 1}`, `1e+20`.

use minijinja::value::{Value, ValueKind};
use minijinja::{Error, Output, State};
use std::fmt::Write;

/// The formatter installed in the environment (no auto-escaping is ever configured).
pub fn python_formatter(out: &mut Output, _state: &mut State, value: &Value) -> Result<(), Error> {
    // Most printed values are strings (a render of 10,000 tenants prints 600,000): they go
    // to the output as they are, not through a buffer of their own.
    if value.kind() == ValueKind::String {
        return out.write_str(value.as_str().unwrap_or_default()).map_err(Error::from);
    }
    let mut s = String::new();
    python_str(value, &mut s);
    out.write_str(&s).map_err(Error::from)
}

/// Python's `str(value)`: strings as they are, containers as `repr`.
pub fn python_str(v: &Value, out: &mut String) {
    match v.kind() {
        ValueKind::String => out.push_str(v.as_str().unwrap_or_default()),
        _ => python_repr(v, out),
    }
}

/// Python's `repr(value)`.
pub fn python_repr(v: &Value, out: &mut String) {
    match v.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number => {
            if v.is_integer() {
                let _ = write!(out, "{v}");
            } else {
                match f64::try_from(v.clone()) {
                    Ok(f) => python_float(f, out),
                    Err(_) => {
                        let _ = write!(out, "{v}");
                    }
                }
            }
        }
        ValueKind::String => python_str_repr(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            if let Ok(iter) = v.try_iter() {
                for (i, item) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    python_repr(&item, out);
                }
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(iter) = v.try_iter() {
                for (i, key) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    python_repr(&key, out);
                    out.push_str(": ");
                    let item = v.get_item(&key).unwrap_or_default();
                    python_repr(&item, out);
                }
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{v}");
        }
    }
}

/// `repr(str)`: single quotes unless the text has a `'` and no `"`.
fn python_str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// `repr(float)`: shortest round-trip digits, exponent form outside 1e-4..1e16.
pub fn python_float(f: f64, out: &mut String) {
    if f.is_nan() {
        out.push_str("nan");
        return;
    }
    if f.is_infinite() {
        out.push_str(if f > 0.0 { "inf" } else { "-inf" });
        return;
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        let e = format!("{f:e}"); // e.g. 1.5e-7, 1e20
        let (mantissa, exp) = e.split_once('e').unwrap_or((&e, "0"));
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        let _ = write!(out, "{mantissa}e{sign}{digits:0>2}");
    } else {
        let s = format!("{f}");
        out.push_str(&s);
        if !s.contains('.') {
            out.push_str(".0");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repr(v: Value) -> String {
        let mut s = String::new();
        python_str(&v, &mut s);
        s
    }

    #[test]
    fn like_python() {
        assert_eq!(repr(Value::from(())), "None");
        assert_eq!(repr(Value::from(true)), "True");
        assert_eq!(repr(Value::from(vec!["a", "b'"])), "['a', \"b'\"]");
        assert_eq!(repr(Value::from(1.0)), "1.0");
        assert_eq!(repr(Value::from(1e20)), "1e+20");
        assert_eq!(repr(Value::from(1.5e-7)), "1.5e-07");
        assert_eq!(repr(Value::from(0.1)), "0.1");
        assert_eq!(repr(Value::from(123456789.25)), "123456789.25");
        let m: Value = serde_json::from_str::<serde_json::Value>(r#"{"b": 1, "a": [null, 2.5]}"#)
            .map(|j| crate::render::to_mj(&j))
            .unwrap();
        assert_eq!(repr(m), "{'b': 1, 'a': [None, 2.5]}");
    }
}
