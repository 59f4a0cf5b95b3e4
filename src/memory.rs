//! Keeping the daemon's resident memory small (SPEC §13: ≤ 64 MB) on glibc.
//!
//! glibc gives every thread that contends for the heap its own arena (up to 8 per core),
//! and each arena keeps freed pages. A daemon with tokio workers, sled's I/O pool and
//! our flush thread ends up holding tens of MB that are free but never returned.

/// Caps glibc's malloc arenas. Call first thing in `main`, before any thread starts.
pub fn limit_arenas(arenas: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(
                param: std::os::raw::c_int,
                value: std::os::raw::c_int,
            ) -> std::os::raw::c_int;
        }
        /// `M_ARENA_MAX` from glibc's malloc.h.
        const M_ARENA_MAX: std::os::raw::c_int = -8;
        // SAFETY: `int mallopt(int, int)` is glibc's exact signature (this block only
        // builds for linux-gnu); it takes no pointers and only changes allocator tuning.
        unsafe {
            mallopt(M_ARENA_MAX, arenas);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = arenas;
}

/// Returns free heap pages to the OS (after a large free, and from the sweeper).
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::os::raw::c_int;
        }
        // SAFETY: `malloc_trim(size_t)` is a glibc function with this exact signature (this
        // block only builds for linux-gnu). It takes no pointers, is thread-safe (it locks
        // each arena), and only returns free memory to the OS; live allocations are untouched.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// The process's resident set size in bytes, from `/proc/self/statm` (resident pages
/// × page size), read when asked (the `/metrics` scrape); `None` where there is no
/// procfs.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    pages.checked_mul(page_size()?)
}

fn page_size() -> Option<u64> {
    #[cfg(unix)]
    {
        // SAFETY: `sysconf` takes an int and returns a long; no pointers, thread-safe.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(size).ok().filter(|s| *s > 0)
    }
    #[cfg(not(unix))]
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn resident_bytes_reads_procfs() {
        if !std::path::Path::new("/proc/self/statm").exists() {
            eprintln!("skipped: no /proc/self/statm");
            return;
        }
        let rss = super::resident_bytes().expect("statm parses");
        // A test binary holds at least a megabyte and far less than a terabyte.
        assert!(rss > 1 << 20 && rss < 1 << 40, "{rss}");
    }
}
