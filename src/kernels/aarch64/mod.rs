//! aarch64 kernels: NEON intrinsics (NEON is part of the base instruction set, so nothing is
//! detected at run time), and the float16 product in assembly where the CPU has FP16 arithmetic.

pub(crate) mod gemm;
pub(crate) mod gemm_f16;
pub(crate) mod softmax;
pub(crate) mod winograd;
