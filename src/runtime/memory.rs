//! Memory trimming once a source graph is dropped.

/// Hands the allocator's free pages back to the OS. glibc serves allocations of up to 32 MB from
/// its heap once one of that size has been freed, and keeps freed heap pages resident: a dropped
/// source graph stays in the process's resident memory until trimmed.
pub(super) fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` takes glibc's own allocator locks and touches only free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}
