//! A memory budget for template rendering.
//!
//! Fuel bounds the instructions a template runs, not the memory it uses: a handful of
//! `{% set a = a ~ a %}` doubles a string past any machine. The process allocator counts the
//! bytes a thread holds while it renders; a render that goes over its budget ends the process
//! at once with exit code 1 and a message naming the template and tenant — a clear error in
//! bounded memory, instead of the kernel's OOM killer later. Outside a render nothing is
//! counted beyond one thread-local check per allocation.

use mimalloc::MiMalloc;
use std::alloc::{GlobalAlloc, Layout};

/// The allocator underneath: mimalloc, much faster than the C library's for the many small
/// allocations of planning thousands of tenants on several threads.
static INNER: MiMalloc = MiMalloc;
use std::cell::Cell;

// mimalloc's option API (built into the library the `mimalloc` crate links; the crate
// exposes no binding for it).
unsafe extern "C" {
    #[cfg(test)]
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc 3's `mimalloc.h`: how long freed memory stays with the
/// process before it is returned to the system, in ms (-1: never; 1000 by default).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Keeps the memory the process frees for its own reuse instead of returning it to the
/// system after a second. For a command that runs for seconds and exits: memory given back
/// and taken again comes back zeroed by the kernel, 2 MiB at a time, at about a second per
/// GB on the machines measured (a cold apply of 10,000 tenants took 500 such pages instead
/// of 410). The daemon keeps the default and gives memory back between reconciles.
pub fn keep_freed_memory() {
    // SAFETY: setting a mimalloc option, which takes effect on the next purge decision.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

/// Has the process take its memory in 4 KiB pages instead of transparent huge pages
/// (Linux; elsewhere a no-op). For `apply`, which builds about 800 MB for 10,000 tenants:
/// on a VM whose balloon driver hands free memory back to the host (the 2-core test machine
/// does), a huge page is usually one the host took back, and its first touch costs about
/// 2.3 ms per 2 MiB against 0.36 ms in small pages. A cold apply started after the machine
/// sat still took 3.6–4.0 s with huge pages and 2.8–3.2 s without; right after another
/// large process, about the same either way. Plans, run again and again, keep huge pages
/// (ARCHITECTURE.md, Decisions).
pub fn small_pages_only() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_THP_DISABLE takes integer arguments only and changes this
    // process's page policy for the faults to come.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// mimalloc's current purge delay (ms), to check which option the number names.
#[cfg(test)]
fn purge_delay() -> std::ffi::c_long {
    // SAFETY: reading a mimalloc option.
    unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) }
}

pub struct CountingAllocator;

const NO_LIMIT: isize = isize::MAX;

thread_local! {
    /// (bytes held by this thread since the render started, limit)
    static USED: Cell<(isize, isize)> = const { Cell::new((0, NO_LIMIT)) };
    /// What is being rendered, for the message (fixed buffer: no allocation here).
    static WHAT: Cell<([u8; 160], usize)> = const { Cell::new(([0; 160], 0)) };
}

#[inline]
fn charge(delta: isize) {
    let _ = USED.try_with(|u| {
        let (used, limit) = u.get();
        if limit == NO_LIMIT {
            return;
        }
        let used = used + delta;
        u.set((used, limit));
        if used > limit {
            u.set((0, NO_LIMIT));
            over_budget(limit);
        }
    });
}

#[cold]
fn over_budget(limit: isize) -> ! {
    let (buf, len) = WHAT.try_with(Cell::get).unwrap_or(([0; 160], 0));
    let mut msg = [0u8; 400];
    let mut n = 0;
    let mut put = |bytes: &[u8]| {
        let take = bytes.len().min(msg.len() - n);
        msg[n..n + take].copy_from_slice(&bytes[..take]);
        n += take;
    };
    put(b"error[template-memory]: rendering ");
    put(&buf[..len]);
    put(b" used more than ");
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = (limit / (1024 * 1024)) as usize;
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b" MiB of memory; the template builds values too large to be a configuration\n");
    // SAFETY: writing a stack buffer to stderr and leaving without running destructors or
    // allocating; nothing else is sound from inside the allocator.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), n);
        libc::_exit(1);
    }
}

// SAFETY: delegates every call to mimalloc; only counts sizes.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        charge(layout.size() as isize);
        unsafe { INNER.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        charge(layout.size() as isize);
        unsafe { INNER.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        charge(-(layout.size() as isize));
        unsafe { INNER.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        charge(new_size as isize - layout.size() as isize);
        unsafe { INNER.realloc(ptr, layout, new_size) }
    }
}

/// While alive, this thread's allocations count against `limit` bytes.
pub struct Guard(());

impl Guard {
    /// `what` is written straight into the fixed buffer (cut at its size): no allocation per
    /// render.
    pub fn new(limit: usize, what: std::fmt::Arguments<'_>) -> Guard {
        struct Fixed([u8; 160], usize);
        impl std::fmt::Write for Fixed {
            fn write_str(&mut self, s: &str) -> std::fmt::Result {
                let n = s.len().min(self.0.len() - self.1);
                self.0[self.1..self.1 + n].copy_from_slice(&s.as_bytes()[..n]);
                self.1 += n;
                Ok(())
            }
        }
        let mut fixed = Fixed([0u8; 160], 0);
        let _ = std::fmt::Write::write_fmt(&mut fixed, what);
        let Fixed(buf, len) = fixed;
        let _ = WHAT.try_with(|w| w.set((buf, len)));
        let _ = USED.try_with(|u| u.set((0, limit.min(NO_LIMIT as usize - 1) as isize)));
        Guard(())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = USED.try_with(|u| u.set((0, NO_LIMIT)));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_purge_delay_option_is_the_one_named() {
        // mimalloc 3's default purge delay; another option at this number would read
        // otherwise (the test process never calls keep_freed_memory).
        assert_eq!(super::purge_delay(), 1000);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn small_pages_only_turns_transparent_huge_pages_off() {
        // (for the whole test process, which is harmless)
        let thp = || {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            status.lines().find_map(|l| l.strip_prefix("THP_enabled:")).map(|v| v.trim().to_owned())
        };
        super::small_pages_only();
        // Kernels before 5.0 do not show the line.
        if let Some(v) = thp() {
            assert_eq!(v, "0");
        }
    }
}
