//! x86-64 kernels: AVX2+FMA and AVX-512 intrinsics, each picked at run time by the CPU's
//! features (tract's builds target baseline x86-64).

pub(crate) mod attention;
pub(crate) mod gelu;
pub(crate) mod gemm;
pub(crate) mod group_norm;
pub(crate) mod linear;
pub(crate) mod softmax;
pub(crate) mod winograd;
