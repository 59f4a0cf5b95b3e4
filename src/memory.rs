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
