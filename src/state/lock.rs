//! The state lock: an operating-system file lock (`flock`), so it is released when its holder
//! dies, even by `kill -9`. The file holds a line naming the holder, for the message a second
//! writer gets.

use anyhow::{Result, bail};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Held while alive; dropping it releases the lock.
pub struct LockGuard {
    file: File,
    path: PathBuf,
}

/// Who holds (or wants) the lock.
pub fn holder_description(what: &str) -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host =
        std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "localhost".into());
    format!("{what} by {user}@{host} (pid {}) since {}", std::process::id(), jiff::Timestamp::now())
}

/// Takes the lock at `path`, waiting up to `timeout` (zero: fail at once).
pub fn acquire(path: &Path, holder: &str, timeout: Duration) -> Result<LockGuard> {
    acquire_as(path, holder, timeout, "the state is locked")
}

/// Like [`acquire`]; a refusal begins with `taken` ("the state is locked").
pub fn acquire_as(path: &Path, holder: &str, timeout: Duration, taken: &str) -> Result<LockGuard> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
    let start = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) => {
                if start.elapsed() >= timeout {
                    let mut who = String::new();
                    let _ = file.rewind();
                    let _ = file.read_to_string(&mut who);
                    let who = who.trim();
                    bail!(
                        "{taken}: {}{}",
                        if who.is_empty() { "by another process" } else { who },
                        if timeout.is_zero() {
                            " (use --lock-timeout to wait for it)".to_owned()
                        } else {
                            format!(" (waited {}s)", timeout.as_secs())
                        }
                    );
                }
                std::thread::sleep(
                    Duration::from_millis(100)
                        .min(timeout.saturating_sub(start.elapsed()).max(Duration::from_millis(10))),
                );
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
    }
    file.set_len(0)?;
    file.rewind()?;
    file.write_all(holder.as_bytes())?;
    file.write_all(b"\n")?;
    file.flush()?;
    tracing::info!(lock = %path.display(), holder, "took the state lock");
    Ok(LockGuard { file, path: path.to_path_buf() })
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        tracing::info!(lock = %self.path.display(), "releasing the state lock");
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_taker_is_told_who_holds_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lock");
        let g = acquire(&p, "apply by alice", Duration::ZERO).unwrap();
        let e = acquire(&p, "apply by bob", Duration::ZERO).err().unwrap().to_string();
        assert!(e.contains("apply by alice"), "{e}");
        let t = Instant::now();
        let e = acquire(&p, "apply by bob", Duration::from_millis(300)).err().unwrap().to_string();
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert!(e.contains("waited"), "{e}");
        drop(g);
        acquire(&p, "apply by bob", Duration::ZERO).unwrap();
    }
}
