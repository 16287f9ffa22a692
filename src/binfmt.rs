//! The little-endian binary encoding of the engine's caches (the render cache and the local
//! stores' indexes): fixed-width integers and length-prefixed UTF-8 text. A reader answers
//! `None` on anything short or malformed, and a cache that does not decode is rebuilt.

use crate::fingerprint::Fingerprint;

/// Appends `s` as a `u32` length and its bytes.
pub fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends a fingerprint: `1` and the 32 bytes of a `sha256:` one, else `0` and its text.
pub fn put_fingerprint(out: &mut Vec<u8>, f: &Fingerprint) {
    match (f.digest(), f.text()) {
        (Some(d), _) => {
            out.push(1);
            out.extend_from_slice(d);
        }
        (None, t) => {
            out.push(0);
            put_str(out, t.unwrap_or_default());
        }
    }
}

pub struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Reader { b, at: 0 }
    }
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    pub fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    pub fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    /// How many bytes were read so far.
    pub fn position(&self) -> usize {
        self.at
    }
    /// Everything was read: no bytes left over.
    pub fn at_end(&self) -> bool {
        self.at == self.b.len()
    }
    pub fn str(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
    /// A fingerprint written by `put_fingerprint`.
    pub fn fingerprint(&mut self) -> Option<Fingerprint> {
        match self.u8()? {
            1 => Some(Fingerprint::sha256(self.take(32)?.try_into().ok()?)),
            0 => Some(Fingerprint::from(self.str()?)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_short_input() {
        let mut out = vec![7u8];
        out.extend_from_slice(&42u32.to_le_bytes());
        out.extend_from_slice(&(-3i64).to_le_bytes());
        put_str(&mut out, "tenant-123");
        let mut r = Reader::new(&out);
        assert_eq!((r.u8(), r.u32(), r.i64(), r.str()), (Some(7), Some(42), Some(-3), Some("tenant-123")));
        assert!(r.at_end());
        assert_eq!(r.u8(), None);
        let mut short = Reader::new(&out[..out.len() - 1]);
        assert_eq!((short.u8(), short.u32(), short.i64(), short.str()), (Some(7), Some(42), Some(-3), None));
    }
}
