//! Kernels in plain Rust, for every target: loops over contiguous rows that the compiler
//! vectorizes with whatever the target has (SSE/AVX on x86-64 where the x86-64 kernels do not
//! apply, NEON on ARM).

pub(crate) mod group_norm;
pub(crate) mod winograd;
