//! The text of a shard file: which shard a tenant lives in, how an entry is framed, and how a
//! file is split back into entries.
//!
//! ```text
//! # dotmac-gitops local store: isp, shard 1f. One entry per resource, sorted by address;
//! # content is indented by two spaces; "(no final newline)" after an address marks content
//! # that does not end with a newline.
//! === tenant-123/isp.config
//!   # ISP Framework configuration for Demo ISP (tenant-123)
//!   tenant:
//!     id: tenant-123
//!
//!   plan:
//! === tenant-77/openbao.policy[tenant-77-read] (no final newline)
//!   path "secret/data/tenant-77/*" {
//!     capabilities = ["read"]
//!   }
//! ```
//!
//! An entry is a header line (`=== ` and the address) and every line up to the next header:
//! two spaces and a line of the content, or an empty line for an empty line. The content is
//! those lines, each ended by a newline unless the header says `(no final newline)`. So any
//! text round-trips exactly, trailing blank lines included, and a content line can never be
//! taken for a header. Lines starting with `#` are comments before the first header; any
//! other line is an error naming its number.

use crate::model::ProviderId;

/// How many shard files each provider's folder holds at most.
pub const SHARDS: usize = 64;

const HEADER: &str = "=== ";
const NO_EOL: &str = " (no final newline)";
/// What each content line of an entry starts with.
const INDENT: &str = "  ";

/// The shard holding a tenant: FNV-1a (64 bits) of its name, modulo [`SHARDS`]. Stored files
/// depend on it: it must never change.
pub fn shard_of(tenant: &str) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tenant.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % SHARDS as u64) as usize
}

/// The file name of a shard (`1f.live`).
pub fn file_name(shard: usize) -> String {
    format!("{shard:02x}.live")
}

/// The comment that starts every shard file.
pub fn preamble(provider: ProviderId, shard: usize) -> String {
    format!(
        "# dotmac-gitops local store: {provider}, shard {shard:02x}. One entry per resource, sorted by address;\n\
         # content is indented by two spaces; \"(no final newline)\" after an address marks content\n\
         # that does not end with a newline.\n"
    )
}

/// The entry for `address` holding `text`, in a buffer of its own.
pub fn framed(address: &str, text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER.len() + address.len() + NO_EOL.len() + text.len() + text.len() / 16 + 8);
    frame(&mut out, address, text);
    out
}

/// The entry for `address` holding `v` as YAML: what [`framed`] makes of
/// [`yamlfmt::to_yaml`]'s text, written straight into the entry (a cold apply frames 70,000
/// of them).
pub fn framed_yaml(address: &str, v: &serde_json::Value) -> Vec<u8> {
    let mut out = String::with_capacity(HEADER.len() + address.len() + 512);
    out.push_str(HEADER);
    out.push_str(address);
    out.push('\n');
    crate::yamlfmt::write_indented(v, INDENT.len(), &mut out);
    out.into_bytes()
}

/// Appends the entry for `address` holding `text`.
pub fn frame(out: &mut Vec<u8>, address: &str, text: &str) {
    out.extend_from_slice(HEADER.as_bytes());
    out.extend_from_slice(address.as_bytes());
    let body = match text.strip_suffix('\n') {
        Some(body) => Some(body),
        None if text.is_empty() => None,
        None => {
            out.extend_from_slice(NO_EOL.as_bytes());
            Some(text)
        }
    };
    out.push(b'\n');
    for line in body.into_iter().flat_map(|b| b.split('\n')) {
        if !line.is_empty() {
            out.extend_from_slice(INDENT.as_bytes());
            out.extend_from_slice(line.as_bytes());
        }
        out.push(b'\n');
    }
}

/// The address and content of one framed entry (as [`split`] cut it out of a file, or as
/// [`frame`] made it); `None` if it is not one.
pub fn unframe(entry: &str) -> Option<(&str, String)> {
    let (head, rest) = entry.split_once('\n').unwrap_or((entry, ""));
    let head = head.strip_prefix(HEADER)?;
    let (address, eol) = match head.strip_suffix(NO_EOL) {
        Some(a) => (a, false),
        None => (head, true),
    };
    let mut text = String::with_capacity(rest.len());
    // A file whose last line lost its newline (an editor's doing) reads as if it had it.
    let lines = (!rest.is_empty()).then(|| rest.strip_suffix('\n').unwrap_or(rest).split('\n'));
    for line in lines.into_iter().flatten() {
        if !line.is_empty() {
            text.push_str(line.strip_prefix(INDENT)?);
        }
        text.push('\n');
    }
    if !eol {
        text.pop();
    }
    Some((address, text))
}

/// One entry of a file: its address as written and where its bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Raw<'a> {
    pub address: &'a str,
    pub start: usize,
    pub end: usize,
    /// The header's line number (from 1).
    pub line: usize,
}

/// Cuts a shard file into entries. An error is a line number and what is wrong there.
pub fn split(text: &str) -> Result<Vec<Raw<'_>>, (usize, String)> {
    let mut out: Vec<Raw<'_>> = Vec::new();
    let mut pos = 0;
    let mut line_no = 0;
    while pos < text.len() {
        let end = text[pos..].find('\n').map_or(text.len(), |i| pos + i + 1);
        let line = &text[pos..end];
        let line = line.strip_suffix('\n').unwrap_or(line);
        line_no += 1;
        if let Some(head) = line.strip_prefix(HEADER) {
            if let Some(last) = out.last_mut() {
                last.end = pos;
            }
            let address = head.strip_suffix(NO_EOL).unwrap_or(head);
            out.push(Raw { address, start: pos, end: text.len(), line: line_no });
        } else if line.is_empty() || (line.starts_with('#') && out.is_empty()) {
        } else if line.starts_with(INDENT) {
            if out.is_empty() {
                return Err((line_no, "content before the first `=== <address>` header".into()));
            }
        } else {
            let shown: String = line.chars().take(60).collect();
            return Err((
                line_no,
                format!(
                    "expected a `=== <address>` header, a content line indented by two spaces, or an empty line; found {shown:?}"
                ),
            ));
        }
        pos = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(text: &str) {
        let mut out = preamble(ProviderId::Isp, 3).into_bytes();
        frame(&mut out, "t1/isp.config", text);
        frame(&mut out, "t2/isp.config", "after\n");
        let file = String::from_utf8(out).unwrap();
        let raws = split(&file).unwrap();
        assert_eq!(raws.len(), 2, "{file}");
        let (a, back) = unframe(&file[raws[0].start..raws[0].end]).unwrap();
        assert_eq!((a, back.as_str()), ("t1/isp.config", text), "{file}");
        let (_, after) = unframe(&file[raws[1].start..raws[1].end]).unwrap();
        assert_eq!(after, "after\n");
    }

    #[test]
    fn yaml_framed_as_written_is_the_yaml_text_framed() {
        use serde_json::json;
        for v in [
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "t", "labels": {"a": "b"}}}),
            json!({"spec": {"containers": [{"name": "c", "ports": [{"port": 80}, 443]}, "x", [], {}], "e": []}}),
            json!([{"a": 1, "b": [1, 2]}, [3, [4]], null, "multi\nline", "  padded", ""]),
            json!({}),
            json!([]),
            json!("text"),
            json!(1.5),
            json!(null),
        ] {
            let mut expected = Vec::new();
            frame(&mut expected, "t/kubernetes.Deployment[x]", &crate::yamlfmt::to_yaml(&v));
            let written = framed_yaml("t/kubernetes.Deployment[x]", &v);
            assert_eq!(String::from_utf8(written).unwrap(), String::from_utf8(expected).unwrap(), "{v}");
        }
    }

    #[test]
    fn any_text_round_trips() {
        for text in [
            "",
            "\n",
            "\n\n",
            "a",
            "a\n",
            "a\n\n",
            "a\n\n\n",
            "\na",
            "a\n\nb",
            "  indented\n\tx\n=== not a header\n# not a comment\n",
            "crlf\r\nlines\r\n",
            "   \n",
            "é ✓\n",
        ] {
            round_trip(text);
        }
    }

    #[test]
    fn a_last_line_without_newline_reads_as_if_it_had_one() {
        let (_, t) = unframe("=== t/isp.config\n  a\n  b").unwrap();
        assert_eq!(t, "a\nb\n");
        let (_, t) = unframe("=== t/isp.config (no final newline)\n  a\n  b").unwrap();
        assert_eq!(t, "a\nb");
    }

    #[test]
    fn framing_errors_name_the_line() {
        let (line, msg) = split("# c\n=== t/isp.config\n  a\nb\n").unwrap_err();
        assert_eq!(line, 4);
        assert!(msg.contains("indented by two spaces") && msg.contains("\"b\""), "{msg}");
        assert_eq!(split("  a\n").unwrap_err().0, 1);
        assert_eq!(split("=== t/isp.config\n# late comment\n").unwrap_err().0, 2);
        assert_eq!(split("=== t/isp.config\n\ttab\n").unwrap_err().0, 2);
    }

    #[test]
    fn the_shard_function_never_changes() {
        // Files on disk depend on these values.
        assert_eq!(shard_of(""), (0xcbf2_9ce4_8422_2325u64 % 64) as usize);
        assert_eq!((shard_of("tenant-123"), shard_of("northwind-isp"), shard_of("")), (56, 63, 37));
        assert_eq!(shard_of("a"), (0xaf63_dc4c_8601_ec8cu64 % 64) as usize);
        assert_eq!(file_name(31), "1f.live");
    }
}
