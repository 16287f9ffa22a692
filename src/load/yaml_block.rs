//! The fast path of the YAML reader: the block style that repositories and rendered
//! manifests are written in, read line by line.
//!
//! It reads block mappings and sequences (indented with spaces), plain scalars, quoted
//! scalars without escapes, one-line flow sequences of scalars, `{}`, comments and `---`
//! separators. Anything else (anchors, aliases, tags, block scalars, escapes, a value that
//! continues on the next line, a duplicate or merge key, tabs, CRs) makes it answer `None`,
//! and the full parser (`yaml.rs`) reads the text instead: it alone reports errors. What this
//! reads, it reads as the full parser does (the same values, the same document lines);
//! debug builds check that on every call.

use super::yaml::{MAX_DEPTH, YamlDoc, key_text, resolve_plain};
use serde_json::{Map, Value};

/// A line with content: its 1-based number, its indentation, and its text after the
/// indentation without trailing spaces.
#[derive(Clone, Copy)]
struct Line<'a> {
    no: usize,
    indent: usize,
    text: &'a str,
}

/// The documents of `text` (a byte-order mark already removed), or `None` when it uses
/// anything this path leaves to the full parser.
pub fn parse(text: &str) -> Option<Vec<YamlDoc>> {
    if text.bytes().any(|b| b == b'\t' || b == b'\r') {
        return None;
    }
    let mut docs = Vec::new();
    let mut lines: Vec<Line<'_>> = Vec::new();
    for (i, raw) in text.split('\n').enumerate() {
        let body = raw.trim_start_matches(' ');
        let indent = raw.len() - body.len();
        let body = body.trim_end_matches(' ');
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        if indent == 0 {
            if let Some(rest) = body.strip_prefix("---") {
                if !rest.is_empty() && !rest.starts_with(" #") {
                    return None;
                }
                document(&mut lines, &mut docs)?;
                continue;
            }
            if body.starts_with("...") || body.starts_with('%') {
                return None;
            }
        }
        lines.push(Line { no: i + 1, indent, text: body });
    }
    document(&mut lines, &mut docs)?;
    Some(docs)
}

/// Reads the lines gathered for one document and clears them.
fn document(lines: &mut Vec<Line<'_>>, docs: &mut Vec<YamlDoc>) -> Option<()> {
    let Some(first) = lines.first().copied() else {
        return Some(());
    };
    let mut r = Reader { lines: std::mem::take(lines), at: 0, spare: Vec::new() };
    let value = r.node(first.indent, 0)?;
    if r.at != r.lines.len() {
        return None;
    }
    docs.push(YamlDoc { value, line: first.no });
    *lines = r.lines;
    lines.clear();
    Some(())
}

struct Reader<'a> {
    lines: Vec<Line<'a>>,
    at: usize,
    /// Entry buffers for the mappings being read, one per nesting level in use: a mapping's
    /// entries are gathered here and its map made once at its final size, instead of grown
    /// (and its index rehashed) entry by entry.
    spare: Vec<Vec<(String, Value)>>,
}

fn is_item(text: &str) -> bool {
    text == "-" || text.starts_with("- ")
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<Line<'a>> {
        self.lines.get(self.at).copied()
    }

    /// The block node whose first line is the current one, at `indent`.
    fn node(&mut self, indent: usize, depth: usize) -> Option<Value> {
        if depth + 2 >= MAX_DEPTH {
            return None;
        }
        let line = self.peek()?;
        if is_item(line.text) { self.sequence(indent, depth) } else { self.mapping(indent, depth) }
    }

    /// The value after a key or a dash with nothing more on its line: what the next lines
    /// hold, indented deeper (or, after a key, a sequence at the key's own indentation).
    fn block_value(&mut self, indent: usize, after_key: bool, depth: usize) -> Option<Value> {
        match self.peek() {
            Some(next) if next.indent > indent => self.node(next.indent, depth + 1),
            Some(next) if after_key && next.indent == indent && is_item(next.text) => self.sequence(indent, depth + 1),
            _ => Some(Value::Null),
        }
    }

    /// After a value that ended on its line: a deeper line would continue it.
    fn ends_line(&self, indent: usize) -> Option<()> {
        match self.peek() {
            Some(next) if next.indent > indent => None,
            _ => Some(()),
        }
    }

    fn sequence(&mut self, indent: usize, depth: usize) -> Option<Value> {
        let mut items = Vec::new();
        while let Some(line) = self.peek().filter(|l| l.indent == indent && is_item(l.text)) {
            let rest = &line.text[1..];
            let after = rest.trim_start_matches(' ');
            if after.is_empty() || after.starts_with('#') {
                self.at += 1;
                items.push(self.block_value(indent, false, depth)?);
            } else if is_item(after) {
                return None;
            } else if key_split(after).is_some() {
                // `- key: value`: a mapping whose first line starts after the dash.
                let column = indent + 1 + (rest.len() - after.len());
                self.lines[self.at] = Line { no: line.no, indent: column, text: after };
                items.push(self.mapping(column, depth + 1)?);
            } else {
                items.push(inline(after)?);
                self.at += 1;
                self.ends_line(indent)?;
            }
        }
        Some(Value::Array(items))
    }

    fn mapping(&mut self, indent: usize, depth: usize) -> Option<Value> {
        let mut entries = self.spare.pop().unwrap_or_default();
        let map = self.entries(indent, depth, &mut entries).and_then(|()| {
            let mut map = Map::with_capacity(entries.len());
            for (key, value) in entries.drain(..) {
                if map.insert(key, value).is_some() {
                    // A key given twice: the full parser's error.
                    return None;
                }
            }
            Some(map)
        });
        entries.clear();
        self.spare.push(entries);
        map.map(Value::Object)
    }

    fn entries(&mut self, indent: usize, depth: usize, entries: &mut Vec<(String, Value)>) -> Option<()> {
        while let Some(line) = self.peek().filter(|l| l.indent == indent) {
            let (key, rest) = key_split(line.text)?;
            // As the full parser keys a mapping: the resolved scalar, as text.
            let key = key_text(resolve_plain(key).ok()?)?;
            if key == "<<" {
                return None;
            }
            let rest = rest.trim_start_matches(' ');
            self.at += 1;
            let value = if rest.is_empty() || rest.starts_with('#') {
                self.block_value(indent, true, depth)?
            } else {
                let v = inline(rest)?;
                self.ends_line(indent)?;
                v
            };
            entries.push((key, value));
        }
        Some(())
    }
}

/// `key: rest` or `key:` into the key's text and the rest; `None` when the line is not a
/// plain key followed by `:`.
fn key_split(text: &str) -> Option<(&str, &str)> {
    let (key, rest) = match find_pair(text, b':', b' ') {
        Some(i) => (&text[..i], &text[i + 1..]),
        None => (text.strip_suffix(':')?, ""),
    };
    let first = *key.as_bytes().first()?;
    if starts_indicator(first) || key.contains('#') || key.ends_with(' ') {
        return None;
    }
    Some((key, rest))
}

/// Bytes that cannot start a plain scalar (or that this path leaves alone there).
pub(crate) fn starts_indicator(b: u8) -> bool {
    matches!(
        b,
        b'-' | b'?'
            | b':'
            | b','
            | b'['
            | b']'
            | b'{'
            | b'}'
            | b'#'
            | b'&'
            | b'*'
            | b'!'
            | b'|'
            | b'>'
            | b'\''
            | b'"'
            | b'%'
            | b'@'
            | b'`'
    )
}

/// What may follow a value on its line: nothing, or a comment after a space.
fn only_comment(rest: &str) -> Option<()> {
    let t = rest.trim_start_matches(' ');
    (t.is_empty() || (t.starts_with('#') && t.len() < rest.len())).then_some(())
}

/// A value that starts on the line of its key or dash, and ends there.
fn inline(text: &str) -> Option<Value> {
    match text.as_bytes()[0] {
        b'"' | b'\'' => {
            let (s, rest) = quoted(text)?;
            only_comment(rest)?;
            Some(Value::String(s))
        }
        b'[' => {
            let (v, rest) = flow_sequence(text)?;
            only_comment(rest)?;
            Some(v)
        }
        b'{' => {
            only_comment(text.strip_prefix("{}")?)?;
            Some(Value::Object(Map::new()))
        }
        b'-' if text.as_bytes().get(1).is_some_and(|b| b.is_ascii_digit() || *b == b'.') => plain(text),
        b if starts_indicator(b) => None,
        _ => plain(text),
    }
}

/// Where `a` first comes right before `b` (two ASCII bytes, so a char boundary). `str::find`
/// with a two-byte pattern sets up a substring searcher at each call: 3 % of a cold apply's
/// instructions went to that over the short lines of 20,000 files and their renders.
pub(crate) fn find_pair(text: &str, a: u8, b: u8) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(i) = bytes[from..].iter().position(|&c| c == a) {
        let at = from + i;
        if bytes.get(at + 1) == Some(&b) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// A plain scalar in block context, up to a comment.
fn plain(text: &str) -> Option<Value> {
    let text = match find_pair(text, b' ', b'#') {
        Some(i) => text[..i].trim_end_matches(' '),
        None => text,
    };
    if find_pair(text, b':', b' ').is_some() || text.ends_with(':') {
        return None;
    }
    resolve_plain(text).ok()
}

/// A quoted scalar that closes on its line, and what follows it. Double quotes take no
/// escapes here; single quotes take `''`.
fn quoted(text: &str) -> Option<(String, &str)> {
    let q = text.as_bytes()[0];
    let body = &text[1..];
    if q == b'"' {
        let end = body.find('"')?;
        if body[..end].contains('\\') {
            return None;
        }
        return Some((body[..end].to_owned(), &body[end + 1..]));
    }
    let mut out = String::new();
    let mut rest = body;
    loop {
        let end = rest.find('\'')?;
        out.push_str(&rest[..end]);
        if rest[end + 1..].starts_with('\'') {
            out.push('\'');
            rest = &rest[end + 2..];
        } else {
            return Some((out, &rest[end + 1..]));
        }
    }
}

/// `[a, "b", 3]` on one line: scalars only, no trailing comma.
fn flow_sequence(text: &str) -> Option<(Value, &str)> {
    let mut rest = text[1..].trim_start_matches(' ');
    let mut items = Vec::new();
    if let Some(after) = rest.strip_prefix(']') {
        return Some((Value::Array(items), after));
    }
    loop {
        let first = *rest.as_bytes().first()?;
        if first == b'"' || first == b'\'' {
            let (s, after) = quoted(rest)?;
            items.push(Value::String(s));
            rest = after.trim_start_matches(' ');
        } else {
            if starts_indicator(first) {
                return None;
            }
            let end = rest.find([',', ']'])?;
            let item = rest[..end].trim_end_matches(' ');
            if item.contains([':', '#', '[', '{', '}']) {
                return None;
            }
            items.push(resolve_plain(item).ok()?);
            rest = &rest[end..];
        }
        if let Some(after) = rest.strip_prefix(']') {
            return Some((Value::Array(items), after));
        }
        rest = rest.strip_prefix(',')?.trim_start_matches(' ');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(text: &str) -> Option<Vec<(Value, usize)>> {
        let fast = parse(text)?;
        let full = super::super::yaml::parse_full(text).expect("the full parser accepts what the fast path read");
        let fast: Vec<(Value, usize)> = fast.into_iter().map(|d| (d.value, d.line)).collect();
        let full: Vec<(Value, usize)> = full.into_iter().map(|d| (d.value, d.line)).collect();
        assert_eq!(fast, full, "the two readers disagree on:\n{text}");
        Some(fast)
    }

    #[test]
    fn reads_the_block_style_as_the_full_parser_does() {
        let texts = [
            "kind: Tenant\nid: t-1\nname: \"ISP 1\"\nport: 5432\nratio: 1.5\non: yes\nempty:\nnull_v: ~\n",
            "# a comment\n\nlabels:\n  region: us   # trailing\n  tier: 'it''s'\nlist: [card, \"ach\", 3, 'x y']\nnone: []\nobj: {}\n",
            "a:\n- 1\n- two\nb:\n  - c: 1\n    d: [x]\n  -   e: f\n      g:\n        h: i\n  -\n  - ~\n",
            "---\nkind: A\n---\n# only a comment\n---\nkind: B\nn: -5\nf: -.5\nurl: http://x.example/a#b\nk8s: a[0],b\n",
            "1: one\ntrue: t\nnull: n\n0x1F: hex\n1.50: f\n",
            "  indented: root\n  more:\n      deeper: 1\n",
            "- a\n- - nested\n",
            "key: \"quoted # not a comment\"  # but this is\nsecret: ${SECRET:db/password}\n",
            "--- # first\na: 1\n...\n",
        ];
        let mut read = 0;
        for t in texts {
            if both(t).is_some() {
                read += 1;
            }
        }
        // All but the nested dash and the document end marker.
        assert_eq!(read, texts.len() - 2);
    }

    #[test]
    fn random_texts_are_read_as_the_full_parser_reads_them_or_left_to_it() {
        // Lines put together from pieces YAML treats specially, at random indentations: what
        // the fast path reads must be what the full parser reads (`both` asserts it).
        const KEYS: &[&str] =
            &["a", "b", "k8s", "1", "0x1F", "true", "null", "~", "a:b", "a b", "-x", "\"q\"", "<<", "a#b"];
        const SEPS: &[&str] = &[": ", ":", " : ", ":  ", ": # c"];
        const VALUES: &[&str] = &[
            "",
            "v",
            "12",
            "-3",
            "1.5e3",
            ".inf",
            "yes",
            "'s''q'",
            "\"d\"",
            "\"e\\n\"",
            "[x, 'y', 2]",
            "[]",
            "[a,]",
            "{}",
            "{a: 1}",
            "&x v",
            "*x",
            "|",
            ">-",
            "a: b",
            "x # c",
            "x#c",
            "- y",
            "\"un",
            "'un",
            "@x",
            "%x",
            "v:",
            "http://h/p",
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let (mut read, mut total) = (0, 0);
        for _ in 0..20_000 {
            let mut text = String::new();
            for _ in 0..1 + next(6) {
                let indent = [0, 0, 2, 2, 4, 1, 3][next(7)];
                text.push_str(&" ".repeat(indent));
                match next(10) {
                    0 => text.push_str(&format!("- {}", VALUES[next(VALUES.len())])),
                    1 => text.push_str(&format!(
                        "- {}{}{}",
                        KEYS[next(KEYS.len())],
                        SEPS[next(SEPS.len())],
                        VALUES[next(VALUES.len())]
                    )),
                    2 => text.push_str(["---", "# comment", "", "-", "..."][next(5)]),
                    _ => text.push_str(&format!(
                        "{}{}{}",
                        KEYS[next(KEYS.len())],
                        SEPS[next(SEPS.len())],
                        VALUES[next(VALUES.len())]
                    )),
                }
                text.push('\n');
            }
            total += 1;
            if parse(&text).is_some() {
                let full = super::super::yaml::parse_full(&text);
                assert!(full.is_ok(), "the fast path read what the full parser refuses:\n{text}");
                both(&text);
                read += 1;
            }
        }
        // Enough of them are read for the comparison to mean something.
        assert!(read > total / 20, "{read} of {total}");
    }

    #[test]
    fn leaves_everything_else_to_the_full_parser() {
        for t in [
            "a: &x 1\nb: *x\n",
            "a: !!str 1\n",
            "a: |\n  text\n",
            "a: >\n  text\n",
            "a: \"esc\\n\"\n",
            "a: b\n  continued\n",
            "a: 1\na: 2\n",
            "<<: {}\n",
            "a:\tb\n",
            "a: 1\r\n",
            "a: b: c\n",
            "a: [x, [y]]\n",
            "a: [x,]\n",
            "a: {b: 1}\n",
            "\"quoted key\": 1\n",
            "? complex\n: key\n",
            "%YAML 1.2\n---\na: 1\n",
            "scalar document\n",
            "a: 'open\n  quote'\n",
            "a:\n    b: 1\n  c: 2\n",
            "a: @x\n",
        ] {
            assert!(parse(t).is_none(), "the fast path should not read:\n{t}");
        }
    }
}
