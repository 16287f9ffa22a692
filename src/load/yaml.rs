//! A bounded YAML reader: text -> `serde_json::Value` documents.
//!
//! Built on the `granit-parser` event stream (the parser serde-saphyr uses) rather than a
//! serde front end, so that every rule of the repository format is enforced here, in one
//! place, with a line and column: duplicate keys are errors, aliases are expanded within a
//! node budget (no "billion laughs"), nesting is capped, and scalars resolve by the YAML 1.2
//! core schema (timestamps stay strings, `yes`/`no` stay strings). `locate` re-reads a
//! document to turn a JSON pointer back into a position, only when a diagnostic needs one.

use granit_parser::{Event, Marker, Options, Parser, ScalarStyle, Span};
use serde_json::{Map, Number, Value};
use std::collections::HashMap;

/// Nesting deeper than this is rejected (the repository format needs about 8).
pub const MAX_DEPTH: usize = 64;
/// Nodes that alias expansion may add to one file.
pub const MAX_ALIAS_NODES: usize = 100_000;

/// One YAML document of a file.
#[derive(Debug, Clone)]
pub struct YamlDoc {
    pub value: Value,
    /// 1-based line where the document's content starts.
    pub line: usize,
}

/// Why a file is not acceptable YAML. Lines are 1-based, columns 1-based.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for YamlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (line {}, column {})", self.message, self.line, self.column)
    }
}

fn err(at: Marker, message: impl Into<String>) -> YamlError {
    YamlError { line: at.line(), column: at.col() + 1, message: message.into() }
}

fn parser_options() -> Options {
    let mut o = Options::default();
    o.flow_nesting_limit = MAX_DEPTH;
    o.block_nesting_limit = MAX_DEPTH;
    o
}

enum Frame {
    Seq {
        items: Vec<Value>,
        anchor: usize,
        start: Marker,
    },
    Map {
        map: Map<String, Value>,
        anchor: usize,
        start: Marker,
        /// The key read, waiting for its value, and where it was.
        key: Option<(String, Marker)>,
        /// Keys that came from a `<<` merge and may still be overridden.
        merged: Vec<String>,
    },
}

struct Builder {
    stack: Vec<Frame>,
    anchors: HashMap<usize, (Value, usize)>,
    alias_nodes: usize,
    docs: Vec<YamlDoc>,
    doc_line: usize,
}

/// Parses every document of `text`. Empty documents (`---` alone, or only comments) are skipped.
/// Most texts are read by the fast path for the plain block style (`yaml_block.rs`); the
/// rest, and every error, by the full parser.
pub fn parse_documents(text: &str) -> Result<Vec<YamlDoc>, YamlError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if let Some(docs) = super::yaml_block::parse(text) {
        #[cfg(debug_assertions)]
        {
            let full = parse_full(text).map(|d| d.into_iter().map(|d| (d.value, d.line)).collect::<Vec<_>>());
            let fast: Vec<(Value, usize)> = docs.iter().map(|d| (d.value.clone(), d.line)).collect();
            // The text is not printed: it may be anything a repository or a template holds.
            assert!(
                Ok(&fast) == full.as_ref(),
                "the YAML fast path and the full parser disagree on a text of {} bytes",
                text.len()
            );
        }
        return Ok(docs);
    }
    parse_full(text)
}

/// The full parser: every document of `text` (without a byte-order mark).
pub(crate) fn parse_full(text: &str) -> Result<Vec<YamlDoc>, YamlError> {
    let mut b = Builder { stack: Vec::new(), anchors: HashMap::new(), alias_nodes: 0, docs: Vec::new(), doc_line: 1 };
    let mut doc_root: Option<Value> = None;
    for ev in Parser::new_from_str_with_options(text, parser_options()) {
        let (event, span) = ev.map_err(|e| {
            let info = e.info();
            if info.contains("recursion limit") {
                err(*e.marker(), format!("nesting deeper than {MAX_DEPTH} levels"))
            } else {
                err(*e.marker(), info)
            }
        })?;
        if b.stack.is_empty()
            && doc_root.is_none()
            && matches!(
                event,
                Event::Scalar(..) | Event::SequenceStart(..) | Event::MappingStart(..) | Event::Alias(..)
            )
        {
            b.doc_line = span.start.line();
        }
        match event {
            Event::DocumentStart(..) => {
                b.anchors.clear();
                b.doc_line = span.start.line();
                doc_root = None;
            }
            Event::DocumentEnd => {
                if let Some(value) = doc_root.take()
                    && !value.is_null()
                {
                    b.docs.push(YamlDoc { value, line: b.doc_line });
                }
            }
            Event::UnresolvedAlias(name) => {
                return Err(err(span.start, format!("alias `*{name}` names no anchor defined before it")));
            }
            Event::Alias(id) => {
                let Some((value, nodes)) = b.anchors.get(&id) else {
                    return Err(err(span.start, "an alias refers to a node that contains it (recursive alias)"));
                };
                b.alias_nodes += nodes;
                if b.alias_nodes > MAX_ALIAS_NODES {
                    return Err(err(
                        span.start,
                        format!("aliases expand to more than {MAX_ALIAS_NODES} nodes (a YAML alias bomb?)"),
                    ));
                }
                let value = value.clone();
                b.complete(value, 0, span, &mut doc_root)?;
            }
            Event::Scalar(text, style, anchor, tag) => {
                let value = resolve_scalar(&text, style, tag.as_deref(), span.start)?;
                b.complete(value, anchor, span, &mut doc_root)?;
            }
            Event::SequenceStart(_, anchor, tag) => {
                check_collection_tag(tag.as_deref(), "seq", span.start)?;
                b.push(Frame::Seq { items: Vec::new(), anchor, start: span.start })?;
            }
            Event::MappingStart(_, anchor, tag) => {
                check_collection_tag(tag.as_deref(), "map", span.start)?;
                b.push(Frame::Map { map: Map::new(), anchor, start: span.start, key: None, merged: Vec::new() })?;
            }
            Event::SequenceEnd => match b.stack.pop() {
                Some(Frame::Seq { items, anchor, start }) => {
                    b.complete(Value::Array(items), anchor, Span::new(start, span.end), &mut doc_root)?
                }
                _ => return Err(err(span.start, "unbalanced sequence end")),
            },
            Event::MappingEnd => match b.stack.pop() {
                Some(Frame::Map { map, anchor, start, .. }) => {
                    b.complete(Value::Object(map), anchor, Span::new(start, span.end), &mut doc_root)?
                }
                _ => return Err(err(span.start, "unbalanced mapping end")),
            },
            // Stream markers, anchor metadata and anything a newer parser adds.
            _ => {}
        }
    }
    Ok(b.docs)
}

impl Builder {
    fn push(&mut self, frame: Frame) -> Result<(), YamlError> {
        if self.stack.len() >= MAX_DEPTH {
            let at = match &frame {
                Frame::Seq { start, .. } | Frame::Map { start, .. } => *start,
            };
            return Err(err(at, format!("nesting deeper than {MAX_DEPTH} levels")));
        }
        // A collection used as a mapping key is not something the format has.
        if let Some(Frame::Map { key: None, .. }) = self.stack.last() {
            let at = match &frame {
                Frame::Seq { start, .. } | Frame::Map { start, .. } => *start,
            };
            return Err(err(at, "a mapping key must be a plain value, not a list or a mapping"));
        }
        self.stack.push(frame);
        Ok(())
    }

    /// A node is finished: record its anchor, then hand it to its parent.
    fn complete(
        &mut self,
        value: Value,
        anchor: usize,
        span: Span,
        doc_root: &mut Option<Value>,
    ) -> Result<(), YamlError> {
        if anchor != 0 {
            self.anchors.insert(anchor, (value.clone(), count_nodes(&value)));
        }
        match self.stack.last_mut() {
            None => *doc_root = Some(value),
            Some(Frame::Seq { items, .. }) => items.push(value),
            Some(Frame::Map { map, key, merged, .. }) => match key.take() {
                None => {
                    let k = key_text(value).ok_or_else(|| err(span.start, "a mapping key must be a plain value"))?;
                    *key = Some((k, span.start));
                }
                Some((k, at)) => {
                    if k == "<<" {
                        merge_into(map, merged, value, at)?;
                    } else if map.contains_key(&k) {
                        if let Some(pos) = merged.iter().position(|m| *m == k) {
                            merged.swap_remove(pos);
                            map.insert(k, value);
                        } else {
                            return Err(err(at, format!("duplicate key `{k}` in the same mapping")));
                        }
                    } else {
                        map.insert(k, value);
                    }
                }
            },
        }
        Ok(())
    }
}

/// A scalar as a mapping key: its text (`null`, `true`, `31` for `0x1F`); `None` for a
/// collection.
pub(super) fn key_text(value: Value) -> Option<String> {
    Some(match value {
        Value::String(s) => s,
        Value::Null => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    })
}

/// YAML merge keys (`<<: *defaults`): keys already present win.
fn merge_into(
    map: &mut Map<String, Value>,
    merged: &mut Vec<String>,
    value: Value,
    at: Marker,
) -> Result<(), YamlError> {
    let sources = match value {
        Value::Object(m) => vec![m],
        Value::Array(items) => {
            let mut out = Vec::new();
            for item in items {
                match item {
                    Value::Object(m) => out.push(m),
                    _ => {
                        return Err(err(at, "`<<` (merge) takes a mapping or a list of mappings"));
                    }
                }
            }
            out
        }
        _ => {
            return Err(err(at, "`<<` (merge) takes a mapping or a list of mappings"));
        }
    };
    for source in sources {
        for (k, v) in source {
            if !map.contains_key(&k) {
                merged.push(k.clone());
                map.insert(k, v);
            }
        }
    }
    Ok(())
}

fn count_nodes(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(count_nodes).sum::<usize>(),
        Value::Object(m) => 1 + m.values().map(count_nodes).sum::<usize>(),
        _ => 1,
    }
}

fn check_collection_tag(tag: Option<&granit_parser::Tag>, want: &str, at: Marker) -> Result<(), YamlError> {
    match tag {
        None => Ok(()),
        Some(t) if t.is_yaml_core_schema_tag(want) => Ok(()),
        Some(t) if t.handle() == "!" && t.suffix().is_empty() => Ok(()),
        Some(t) => Err(err(at, format!("unsupported YAML tag `{}{}`", t.handle(), t.suffix()))),
    }
}

fn resolve_scalar(
    text: &str,
    style: ScalarStyle,
    tag: Option<&granit_parser::Tag>,
    at: Marker,
) -> Result<Value, YamlError> {
    if let Some(t) = tag {
        if t.handle() == "!" && t.suffix().is_empty() {
            return Ok(Value::String(text.to_owned()));
        }
        if !t.is_yaml_core_schema() {
            return Err(err(at, format!("unsupported YAML tag `{}{}`", t.handle(), t.suffix())));
        }
        let forced = match t.suffix() {
            "str" => Some(Value::String(text.to_owned())),
            "null" => parse_null(text).then_some(Value::Null),
            "bool" => parse_bool(text).map(Value::Bool),
            "int" => parse_int(text).map_err(|m| err(at, m))?,
            "float" => parse_float(text).or_else(|| parse_int(text).ok().flatten()),
            other => {
                return Err(err(at, format!("tag `!!{other}` cannot apply to a plain value")));
            }
        };
        return forced.ok_or_else(|| err(at, format!("`{text}` is not a valid !!{}", t.suffix())));
    }
    if style != ScalarStyle::Plain {
        return Ok(Value::String(text.to_owned()));
    }
    resolve_plain(text).map_err(|m| err(at, m))
}

/// The YAML 1.2 core schema. Everything else is a string.
pub fn resolve_plain(text: &str) -> Result<Value, String> {
    Ok(resolve_typed(text)?.unwrap_or_else(|| Value::String(text.to_owned())))
}

/// A plain scalar as null, a boolean or a number; `None` when it is text.
fn resolve_typed(text: &str) -> Result<Option<Value>, String> {
    // Every typed scalar of the core schema starts with one of these (or is empty): most
    // text (names, domains, words) is told at its first byte, without trying each form.
    if let Some(&first) = text.as_bytes().first()
        && !(first.is_ascii_digit()
            || matches!(first, b'+' | b'-' | b'.' | b'~' | b'n' | b'N' | b't' | b'T' | b'f' | b'F'))
    {
        return Ok(None);
    }
    if parse_null(text) {
        return Ok(Some(Value::Null));
    }
    if let Some(b) = parse_bool(text) {
        return Ok(Some(Value::Bool(b)));
    }
    if let Some(v) = parse_int(text)? {
        return Ok(Some(v));
    }
    Ok(parse_float(text))
}

/// `t`, written plain, reads back as the string `t` (what `resolve_plain` would make text).
pub fn reads_as_text(t: &str) -> bool {
    matches!(resolve_typed(t), Ok(None))
}

fn parse_null(t: &str) -> bool {
    matches!(t, "" | "~" | "null" | "Null" | "NULL")
}

fn parse_bool(t: &str) -> Option<bool> {
    match t {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

fn parse_int(t: &str) -> Result<Option<Value>, String> {
    let (neg, digits) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, body) = if let Some(rest) = t.strip_prefix("0x") {
        (16, rest)
    } else if let Some(rest) = t.strip_prefix("0o") {
        (8, rest)
    } else {
        (10, digits)
    };
    if body.is_empty() || !body.chars().all(|c| c.is_digit(radix)) {
        return Ok(None);
    }
    let out_of_range = || format!("integer `{t}` is out of range (quote it to keep it as text)");
    let magnitude = u128::from_str_radix(body, radix).map_err(|_| out_of_range())?;
    if neg && radix == 10 {
        let v = i64::try_from(magnitude)
            .map(|v| -v)
            .or_else(|_| if magnitude == 1u128 << 63 { Ok(i64::MIN) } else { Err(out_of_range()) })?;
        Ok(Some(Value::Number(v.into())))
    } else {
        let v = u64::try_from(magnitude).map_err(|_| out_of_range())?;
        Ok(Some(Value::Number(v.into())))
    }
}

fn parse_float(t: &str) -> Option<Value> {
    let special = match t {
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => Some(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => Some(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => Some(f64::NAN),
        _ => None,
    };
    if let Some(f) = special {
        // JSON has no infinities or NaN; keep the text so nothing is lost silently.
        let _ = f;
        return Some(Value::String(t.to_owned()));
    }
    // [-+]? ( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?
    let b = t.as_bytes();
    let mut i = 0;
    if matches!(b.first(), Some(b'-' | b'+')) {
        i += 1;
    }
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = i - int_start;
    let mut frac_digits = 0;
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let s = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        frac_digits = i - s;
    } else if int_digits == 0 {
        return None;
    }
    if int_digits == 0 && frac_digits == 0 {
        return None;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if matches!(b.get(i), Some(b'-' | b'+')) {
            i += 1;
        }
        let s = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == s {
            return None;
        }
    }
    if i != b.len() {
        return None;
    }
    let f: f64 = t.parse().ok()?;
    Number::from_f64(f).map(Value::Number)
}

/// Where a node is: the span of its key (inside a mapping) and of its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    pub key: Option<Pos>,
    pub value: Pos,
}

/// A 1-based line and column, with the length of the token on that line (for carets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
    pub len: usize,
}

fn pos(span: Span) -> Pos {
    let len =
        if span.end.line() == span.start.line() { span.end.col().saturating_sub(span.start.col()).max(1) } else { 1 };
    Pos { line: span.start.line(), column: span.start.col() + 1, len }
}

/// Splits a JSON pointer (`/a/0/b~1c`) into its unescaped segments.
pub fn pointer_segments(pointer: &str) -> Vec<String> {
    if pointer.is_empty() {
        return Vec::new();
    }
    pointer.trim_start_matches('/').split('/').map(|s| s.replace("~1", "/").replace("~0", "~")).collect()
}

enum LocFrame {
    Seq(usize),
    Map { key: Option<(String, Span)> },
}

/// Finds the node at `pointer` in the `doc`-th non-empty document of `text`.
/// Returns the deepest existing ancestor when the pointer names something absent.
pub fn locate(text: &str, doc: usize, pointer: &str) -> Option<Located> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let target = pointer_segments(pointer);
    let mut path: Vec<String> = Vec::new();
    let mut stack: Vec<LocFrame> = Vec::new();
    let mut doc_index: isize = -1;
    let mut doc_has_content = false;
    let mut best: Option<(usize, Located)> = None;

    for ev in Parser::new_from_str_with_options(text, parser_options()) {
        let Ok((event, span)) = ev else { break };
        match &event {
            Event::DocumentStart(..) => {
                doc_has_content = false;
                path.clear();
                stack.clear();
            }
            Event::DocumentEnd if doc_has_content && doc_index as usize == doc => {
                break;
            }
            _ => {}
        }
        let is_node_start =
            matches!(event, Event::Scalar(..) | Event::Alias(..) | Event::SequenceStart(..) | Event::MappingStart(..));
        if is_node_start && stack.is_empty() && !doc_has_content {
            // The root node of a document: count documents the way parse_documents does
            // (null roots are skipped there, so skip an empty scalar root here too).
            let empty_root = matches!(&event, Event::Scalar(t, ScalarStyle::Plain, _, None) if parse_null(t));
            if !empty_root {
                doc_has_content = true;
                doc_index += 1;
            }
        }
        let in_doc = doc_has_content && doc_index as usize == doc;
        // Is this node a mapping key?
        let is_key = matches!(stack.last(), Some(LocFrame::Map { key: None }));
        if is_node_start {
            if is_key {
                if let (Event::Scalar(t, ..), Some(LocFrame::Map { key })) = (&event, stack.last_mut()) {
                    *key = Some((t.to_string(), span));
                }
                continue;
            }
            // The path segment of this node within its parent.
            let (segment, key_span) = match stack.last_mut() {
                Some(LocFrame::Seq(i)) => {
                    let s = i.to_string();
                    *i += 1;
                    (Some(s), None)
                }
                Some(LocFrame::Map { key }) => {
                    let (k, ks) = key.take().unwrap_or_default();
                    (Some(k), Some(ks))
                }
                None => (None, None),
            };
            if let Some(s) = &segment {
                path.push(s.clone());
            }
            if in_doc && target.starts_with(&path) {
                let here = Located { key: key_span.map(pos), value: pos(span) };
                if best.as_ref().is_none_or(|(d, _)| path.len() >= *d) {
                    best = Some((path.len(), here));
                }
                if path.len() == target.len() {
                    return Some(here);
                }
            }
            match event {
                Event::SequenceStart(..) => stack.push(LocFrame::Seq(0)),
                Event::MappingStart(..) => stack.push(LocFrame::Map { key: None }),
                _ => {
                    if segment.is_some() {
                        path.pop();
                    }
                }
            }
            continue;
        }
        if matches!(event, Event::SequenceEnd | Event::MappingEnd) {
            stack.pop();
            if !stack.is_empty() {
                path.pop();
            }
        }
    }
    best.map(|(_, l)| l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(text: &str) -> Value {
        let docs = parse_documents(text).unwrap();
        assert_eq!(docs.len(), 1);
        docs.into_iter().next().unwrap().value
    }

    #[test]
    fn core_schema_scalars_and_yaml_1_1_words_stay_text() {
        let v = one(
            "a: 1\nb: -2\nc: 1.5\nd: true\ne: ~\nf: yes\ng: 2027-12-31T23:59:59Z\nh: '3'\ni: 0x1F\nj: 1e3\nk: .inf\n\
             l: False\nm: NULL\nn: +12\no: Null\np: TRUE\nq: .5\nr: on\ns: Tenant\nt: -.inf\nu: 0o17\n",
        );
        assert_eq!(
            v,
            json!({"a":1,"b":-2,"c":1.5,"d":true,"e":null,"f":"yes","g":"2027-12-31T23:59:59Z","h":"3","i":31,"j":1000.0,"k":".inf",
                   "l":false,"m":null,"n":12,"o":null,"p":true,"q":0.5,"r":"on","s":"Tenant","t":"-.inf","u":15})
        );
    }

    #[test]
    fn duplicate_keys_are_errors_with_the_line_of_the_second() {
        let e = parse_documents("a: 1\nb:\n  c: 1\n  c: 2\n").unwrap_err();
        assert_eq!((e.line, e.column), (4, 3));
        assert!(e.message.contains("duplicate key `c`"), "{e}");
    }

    #[test]
    fn merge_keys_fill_in_and_explicit_keys_win() {
        let v = one("base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  y: 3\n");
        assert_eq!(v["use"], json!({"x": 1, "y": 3}));
    }

    #[test]
    fn alias_bombs_fail_fast() {
        let mut text = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let prev = (b'a' + i - 1) as char;
            let cur = (b'a' + i) as char;
            text.push_str(&format!("{cur}: &{cur} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
        }
        let e = parse_documents(&text).unwrap_err();
        assert!(e.message.contains("alias bomb"), "{e}");
    }

    #[test]
    fn deep_nesting_is_rejected() {
        let text = "[".repeat(10_000);
        assert!(parse_documents(&text).is_err());
        let mut block = String::new();
        for i in 0..100 {
            block.push_str(&" ".repeat(i));
            block.push_str("k:\n");
        }
        let e = parse_documents(&block).unwrap_err();
        assert!(e.message.contains("nesting"), "{e}");
    }

    #[test]
    fn bom_crlf_and_multiple_documents() {
        let docs = parse_documents("\u{feff}kind: A\r\nx: 1\r\n---\r\n---\r\nkind: B\r\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].value, json!({"kind": "A", "x": 1}));
        assert_eq!(docs[1].line, 5);
    }

    #[test]
    fn locate_finds_keys_and_values() {
        let text =
            "kind: Tenant\nid: t1\nbilling:\n  gateway: stripe\n  methods: [card, ach]\n---\nkind: X\nplan: nope\n";
        let l = locate(text, 0, "/billing/methods/1").unwrap();
        assert_eq!((l.value.line, l.value.column, l.value.len), (5, 19, 3));
        let l = locate(text, 0, "/billing/gateway").unwrap();
        assert_eq!(l.key.unwrap().line, 4);
        let l = locate(text, 1, "/plan").unwrap();
        assert_eq!((l.value.line, l.value.column), (8, 7));
        // absent: the nearest ancestor
        let l = locate(text, 0, "/billing/missing").unwrap();
        assert_eq!(l.value.line, 4);
    }
}
