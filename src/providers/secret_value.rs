//! A secret value in memory: generated from the operating system's CSPRNG, handed to a
//! provider, wiped on drop, and impossible to print by accident (`Debug` and `Display` say
//! `(sensitive)`; there is no `Serialize`).

use crate::model::Charset;
use std::fmt;

pub struct SecretValue(Vec<u8>);

/// Fills `dest` with bytes of the operating system's CSPRNG, taken from a per-thread block of
/// 4 KiB read with one `getrandom` call. A first apply generates some 60,000 secret values
/// and as many nonces; one system call each was 1 % of its CPU. Each byte is handed out once
/// and wiped from the block as it is.
pub fn random_fill(dest: &mut [u8]) -> std::io::Result<()> {
    use std::cell::RefCell;
    const BLOCK: usize = 4096;
    thread_local! {
        /// (bytes, how many of them are handed out already)
        static POOL: RefCell<(Box<[u8; BLOCK]>, usize)> = RefCell::new((Box::new([0; BLOCK]), BLOCK));
    }
    let from_os = |b: &mut [u8]| getrandom::fill(b).map_err(|e| std::io::Error::other(e.to_string()));
    if dest.len() > BLOCK / 4 {
        return from_os(dest);
    }
    POOL.with(|pool| {
        let (bytes, used) = &mut *pool.borrow_mut();
        if BLOCK - *used < dest.len() {
            from_os(&mut bytes[..])?;
            *used = 0;
        }
        let taken = &mut bytes[*used..*used + dest.len()];
        dest.copy_from_slice(taken);
        taken.fill(0);
        *used += dest.len();
        Ok(())
    })
}

impl SecretValue {
    /// A new random value of `length` characters from `charset`, without modulo bias.
    pub fn generate(length: u32, charset: Charset) -> std::io::Result<SecretValue> {
        let alphabet = charset.alphabet();
        let n = alphabet.len() as u32;
        // Accept bytes below the largest multiple of n that fits in a byte.
        let limit = (256 / n * n) as u8;
        let mut out = Vec::with_capacity(length as usize);
        let mut buf = [0u8; 64];
        while out.len() < length as usize {
            random_fill(&mut buf)?;
            for &b in &buf {
                if (limit == 0 || b < limit) && out.len() < length as usize {
                    out.push(alphabet[(b as u32 % n) as usize]);
                }
            }
        }
        buf.fill(0);
        Ok(SecretValue(out))
    }

    pub fn from_bytes(bytes: Vec<u8>) -> SecretValue {
        SecretValue(bytes)
    }

    /// The value, for the one place that must have it: the store.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for SecretValue {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: a volatile write to memory we own, so the wipe is not optimised away.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(sensitive)")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(sensitive)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_are_never_handed_out_twice() {
        // Across refills of the per-thread block too: 200 draws of 64 bytes are 3 blocks.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let mut b = [0u8; 64];
            super::random_fill(&mut b).unwrap();
            assert!(seen.insert(b), "a 64-byte draw repeated");
        }
        let mut big = vec![0u8; 8192];
        super::random_fill(&mut big).unwrap();
        assert!(big.iter().any(|&b| b != 0));
    }

    #[test]
    fn generated_values_have_the_length_and_alphabet_and_differ() {
        let a = SecretValue::generate(48, Charset::Hex).unwrap();
        let b = SecretValue::generate(48, Charset::Hex).unwrap();
        assert_eq!(a.len(), 48);
        assert!(a.expose().iter().all(|c| b"0123456789abcdef".contains(c)));
        assert_ne!(a.expose(), b.expose());
        assert_eq!(format!("{a:?} {a}"), "(sensitive) (sensitive)");
    }
}
