//! 32-bit ARM kernels (armv7-A with NEON: Pi 2/3/Zero 2 on a 32-bit OS): the matrix
//! micro-kernel and the Winograd transforms' element-wise steps, in inline assembly, since Rust's
//! NEON intrinsics for 32-bit ARM are not stable. The armv7 targets do not assume NEON, so it is
//! detected at run time ([`neon`]).

pub(crate) mod gemm;
pub(crate) mod winograd;

/// Whether this CPU has NEON with 32 double registers (the micro-kernel holds its sums in
/// q4–q15, i.e. d8–d31): from the kernel's hardware capabilities where glibc reads them,
/// otherwise what the build targets.
pub(crate) fn neon() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // The Linux `HWCAP_NEON` and `HWCAP_VFPD32` bits of AT_HWCAP on 32-bit ARM.
        const HWCAP_NEON: libc::c_ulong = 1 << 12;
        const HWCAP_VFPD32: libc::c_ulong = 1 << 19;
        static NEON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *NEON.get_or_init(|| {
            // Safety: getauxval only reads the process's auxiliary vector.
            let caps = unsafe { libc::getauxval(libc::AT_HWCAP) };
            caps & HWCAP_NEON != 0 && caps & HWCAP_VFPD32 != 0
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    cfg!(all(target_feature = "neon", target_feature = "d32"))
}
