//! aarch64 kernels: NEON intrinsics (NEON is part of the base instruction set, so nothing is
//! detected at run time).

pub(crate) mod gemm;
pub(crate) mod winograd;
