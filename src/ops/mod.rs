//! The tract operators this crate adds: each unpacks its tensors, shares its work out on the
//! plan's thread pool, and runs a kernel (`crate::kernels`) on plain slices. The graph rewrites
//! that put them in a plan are in `crate::passes`.

use tract_linalg::multithread::current_tract_executor;
#[cfg(feature = "multithread")]
use tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

#[cfg(target_arch = "x86_64")]
pub(crate) mod attention;
pub(crate) mod conv;
#[cfg(own_gemm)]
pub(crate) mod direct_conv;
pub(crate) mod embedding;
#[cfg(target_arch = "x86_64")]
pub(crate) mod gelu;
pub(crate) mod group_norm;
pub(crate) mod layer_norm;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod linear;
pub(crate) mod packed;
pub(crate) mod scratch;
pub(crate) mod serial;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod softmax;
pub(crate) mod winograd3x3;

/// A float32 tensor's elements, in C order; `op` names the operator in the error.
pub(crate) fn f32s<'t>(t: &'t Tensor, op: &str) -> TractResult<&'t [f32]> {
    ensure!(t.strides() == &*Tensor::natural_strides(t.shape()), "{op}: a strided tensor");
    t.try_as_plain_ram()?.as_slice::<f32>()
}

/// Threads of the executor the plan runs on.
pub(crate) fn threads() -> usize {
    match current_tract_executor() {
        #[cfg(feature = "multithread")]
        Executor::MultiThread(pool) => pool.current_num_threads(),
        _ => 1,
    }
}

/// Runs `f` on each item, on the plan's thread pool when it has one.
pub(crate) fn for_each<T: Send>(items: Vec<T>, f: impl Fn(T) + Send + Sync) {
    match current_tract_executor() {
        #[cfg(feature = "multithread")]
        Executor::MultiThread(pool) if items.len() > 1 => {
            use rayon::prelude::*;
            pool.install(|| items.into_par_iter().for_each(f))
        }
        _ => items.into_iter().for_each(f),
    }
}

/// Where element `flat` (a C-order index over axes of sizes `dims`) lies in a tensor whose
/// axes are `strides` elements apart.
pub(crate) fn strided_offset(flat: usize, dims: &[usize], strides: &[usize]) -> usize {
    let (mut rest, mut at) = (flat, 0);
    for (&d, &s) in dims.iter().zip(strides).rev() {
        at += rest % d * s;
        rest /= d;
    }
    at
}

/// An output that several threads write at once, each only the elements of its own items.
#[cfg(own_gemm)]
#[derive(Clone, Copy)]
pub(crate) struct Output(*mut f32, usize);

#[cfg(own_gemm)]
impl Output {
    /// A method, not a field access, so that closures capture the whole (`Sync`) value.
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }

    pub(crate) fn len(self) -> usize {
        self.1
    }
}

// Safety: see the type's docs; items do not overlap.
#[cfg(own_gemm)]
unsafe impl Send for Output {}
#[cfg(own_gemm)]
unsafe impl Sync for Output {}
