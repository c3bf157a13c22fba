//! Scaled dot-product attention as one operator: `softmax(scale · Q Kᵀ) V` per head, on x86-64
//! with AVX2 and FMA.
//!
//! Why: exported attention is a product (`MatMul` or `Einsum`), maybe a scale, a `Softmax` and a
//! second product. tract runs them as three nodes: the first writes every head's tokens × tokens
//! scores, the softmax passes over them, and the second product packs them again as its left
//! operand. At 4 096 tokens that matrix is 64 MiB a head and the packing alone took a quarter
//! of a call. Here each block of queries (32 with AVX-512, 16 with AVX2) gets its scores, their
//! exponentials and its output while the scores are in cache
//! (`crate::kernels::x86_64::attention`); the keys and values of a head are packed once per
//! call, and no score matrix is ever whole.
//!
//! The inputs come in whatever axis order the export uses; [`Layout`] says where each role's
//! axes are, and the operator reads them through strides: keys and values as it packs them,
//! queries as it gathers each block.
//! An additive mask on the scaled scores (a causal or a padding mask), when the graph has one,
//! is a fourth input read through strides as well, an axis of 1 broadcast.
//! `crate::passes::attention` finds the pattern.
//! Float32; the sums run in another order than tract's, so results differ in the last bits.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::scratch::{with_scratch, Scratch};
use super::{f32s, for_each, strided_offset, threads, Output};
use crate::kernels::gemm;
use crate::kernels::split;
use crate::kernels::x86_64::attention::{block, lanes, pack_keys, pack_values, Head, Mask};

/// Where the roles' axes are. Each permutation lists, for each axis of the operator's own
/// order, the axis of the tensor it comes from (as `ndarray`'s `permuted_axes` takes it):
/// `q` to `[batch…, depth, query]`, `k` to `[batch…, key, depth]`, `v` to
/// `[batch…, feature, key]`; `out[i]` is the axis of `[batch…, feature, query]` that the
/// output's axis `i` is. The batch axes (heads among them) come in the same order in all four.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) struct Layout {
    #[serde(with = "super::serial::tvec")]
    pub q: TVec<usize>,
    #[serde(with = "super::serial::tvec")]
    pub k: TVec<usize>,
    #[serde(with = "super::serial::tvec")]
    pub v: TVec<usize>,
    #[serde(with = "super::serial::tvec")]
    pub out: TVec<usize>,
    /// With an additive mask (the operator's fourth input, of the scores' rank, each axis of the
    /// scores' size or 1): its axes as `[batch…, query, key]`. Empty without one.
    #[serde(default, with = "super::serial::tvec")]
    pub mask: TVec<usize>,
}

impl Layout {
    fn batch_rank(&self) -> usize {
        self.q.len() - 2
    }

    /// The output's shape from its inputs' (batch and query from `q`, feature from `v`).
    fn output_shape<D: Clone>(&self, q: &[D], v: &[D]) -> TVec<D> {
        let nb = self.batch_rank();
        let canonical: TVec<D> = self.q[..nb]
            .iter()
            .map(|&a| q[a].clone())
            .chain([v[self.v[nb]].clone(), q[self.q[nb + 1]].clone()])
            .collect();
        self.out.iter().map(|&a| canonical[a].clone()).collect()
    }
}

/// Attention as one node; see the module docs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Attention {
    pub(crate) layout: Layout,
    /// Multiplies the scores before the softmax; positive.
    pub(crate) scale: f32,
}

impl Eq for Attention {}

impl std::hash::Hash for Attention {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.layout.hash(state);
        self.scale.to_bits().hash(state);
    }
}

/// A float32 tensor read in the operator's axis order: sizes and element strides per axis.
struct View<'t> {
    data: &'t [f32],
    dims: TVec<usize>,
    strides: TVec<usize>,
}

impl<'t> View<'t> {
    /// `x` with its axis `perm[i]` as axis `i`.
    fn new(x: &'t Tensor, perm: &[usize]) -> TractResult<Self> {
        let natural = Tensor::natural_strides(x.shape());
        Ok(View {
            data: f32s(x, "Attention")?,
            dims: perm.iter().map(|&a| x.shape()[a]).collect(),
            strides: perm.iter().map(|&a| natural[a] as usize).collect(),
        })
    }

    /// Where head `h` (a flat index over the first `nb` axes, in C order) starts.
    fn head(&self, h: usize, nb: usize) -> usize {
        strided_offset(h, &self.dims[..nb], &self.strides[..nb])
    }
}

impl Attention {
    /// Queries, keys and values, and the mask when the layout has one.
    fn input_count(&self) -> usize {
        3 + usize::from(!self.layout.mask.is_empty())
    }

    /// `mask` is given exactly when the layout has one (the input count is checked first).
    /// `scratch` holds the packed keys and values.
    fn run(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        scratch: &mut Scratch,
    ) -> TractResult<Tensor> {
        let nb = self.layout.batch_rank();
        let shape = self.layout.output_shape(q.shape(), v.shape());
        let (q, k, v) = (View::new(q, &self.layout.q)?, View::new(k, &self.layout.k)?, View::new(v, &self.layout.v)?);
        let batch = &q.dims[..nb];
        ensure!(
            k.dims[..nb] == *batch && v.dims[..nb] == *batch,
            "Attention: batch axes {batch:?}, {:?} and {:?} differ",
            &k.dims[..nb],
            &v.dims[..nb]
        );
        let [d, t] = [q.dims[nb], q.dims[nb + 1]];
        let [s, kd] = [k.dims[nb], k.dims[nb + 1]];
        let [dv, vs] = [v.dims[nb], v.dims[nb + 1]];
        ensure!(kd == d && vs == s, "Attention: queries of depth {d}, keys {s} × {kd}, values {dv} × {vs}");
        ensure!(gemm::available(), "Attention: this CPU lacks AVX2 and FMA");
        let heads: usize = batch.iter().product();
        if heads * t * dv == 0 {
            return Tensor::zero::<f32>(&shape);
        }
        ensure!(s > 0 && d > 0, "Attention: {s} keys of depth {d}");
        let kernel = gemm::Kernel::detect();
        let head = Head { keys: s, depth: d, features: dv };
        // Each head's keys and values packed once for all its query blocks, into buffers kept
        // from call to call: allocated afresh, they were zero-filled by one thread on every call.
        let (klen, vlen) = (head.keys_len(kernel), head.values_len(kernel));
        let (keys, values) = scratch.floats(heads * (klen + vlen)).split_at_mut(heads * klen);
        // Heads packed on the threads too: the packing reads across strides, and serial it kept
        // the second thread idle for part of every call.
        let per_head: Vec<_> = keys.chunks_exact_mut(klen).zip(values.chunks_exact_mut(vlen)).enumerate().collect();
        let (kv, vv) = (&k, &v);
        let depth: Vec<usize> = (0..d).map(|i| i * k.strides[nb + 1]).collect();
        let key_at: Vec<usize> = (0..s).map(|j| j * v.strides[nb + 1]).collect();
        for_each(per_head, |(h, (kp, vp))| {
            let (k0, v0) = (kv.head(h, nb), vv.head(h, nb));
            pack_keys(kernel, head, kv.data, |j| k0 + j * kv.strides[nb], &depth, kp);
            pack_values(kernel, head, vv.data, |f| v0 + f * vv.strides[nb], &key_at, vp);
        });
        let (keys, values) = (&*keys, &*values);
        let n = lanes(kernel);
        let blocks = t.div_ceil(n);
        let ranges = split(heads * blocks, threads());
        let olen = head.out_len(kernel);
        let [q_depth, q_token] = [q.strides[nb], q.strides[nb + 1]];
        // The mask read as [batch…, query, key], an axis of 1 broadcast (stride 0).
        let mask = match mask {
            Some(m) => {
                let view = View::new(m, &self.layout.mask)?;
                let wanted = batch.iter().chain([&t, &s]);
                for (axis, (&n, &want)) in view.dims.iter().zip(wanted).enumerate() {
                    ensure!(n == want || n == 1, "Attention: mask axis {axis} of {n}, expected {want} or 1");
                }
                let strides: TVec<usize> =
                    view.dims.iter().zip(&view.strides).map(|(&n, &st)| if n == 1 { 0 } else { st }).collect();
                Some((view.data, strides))
            }
            None => None,
        };
        // The output's strides in the operator's order [batch…, feature, query].
        let natural = Tensor::natural_strides(&shape);
        let mut strides = tvec![0usize; nb + 2];
        for (axis, &role) in self.layout.out.iter().enumerate() {
            strides[role] = natural[axis] as usize;
        }
        let [feature, token] = [strides[nb], strides[nb + 1]];
        // Every element is written below: each (head, query, feature) by exactly one item.
        let mut y = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        let dst = {
            let mut plain = y.try_as_plain_ram_mut()?;
            let ys = plain.as_slice_mut::<f32>()?;
            Output(ys.as_mut_ptr(), ys.len())
        };
        // Each thread writes its blocks' outputs straight into `y`: gathered and written by one
        // thread after the blocks, they kept the other idle.
        for_each(ranges, |items| {
            let mut scores = vec![0f32; head.scores_len(kernel)];
            let mut panel = vec![0f32; d * n];
            let mut out = vec![0f32; olen];
            for item in items {
                let (h, t0) = (item / blocks, item % blocks * n);
                let at = q.head(h, nb) + t0 * q_token;
                let width = n.min(t - t0);
                // The block's queries as the kernel's panel: d rows of n (zero past the last),
                // read a query at a time: where the queries lie a multiple of 4 KiB apart (a
                // token-major ViT-H input), reading across them evicted each line before its
                // next value was used.
                if width < n {
                    panel.fill(0.0);
                }
                for j in 0..width {
                    let query = at + j * q_token;
                    for (c, x) in panel.iter_mut().skip(j).step_by(n).enumerate() {
                        *x = q.data[query + c * q_depth];
                    }
                }
                let (kp, vp) = (&keys[h * klen..][..klen], &values[h * vlen..][..vlen]);
                let mask = mask.as_ref().map(|(values, strides)| {
                    let at = strided_offset(h, batch, &strides[..nb]) + t0 * strides[nb];
                    Mask { values: &values[at..], query: strides[nb], key: strides[nb + 1], queries: width }
                });
                block(kernel, head, kp, vp, &panel, self.scale, mask, &mut scores, &mut out);
                let at = strided_offset(h, batch, &strides[..nb]) + t0 * token;
                // A query at a time, for the reason the panel is read so.
                for j in 0..width {
                    for (f, &x) in out.iter().skip(j).step_by(n).take(dv).enumerate() {
                        let i = at + f * feature + j * token;
                        assert!(i < dst.len());
                        // Safety: inside `y` (checked), and no other item writes this element.
                        unsafe { *dst.at(i) = x };
                    }
                }
            }
        });
        Ok(y)
    }
}

impl Op for Attention {
    fn name(&self) -> StaticName {
        "Attention".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let mask = if self.layout.mask.is_empty() { "" } else { ", masked" };
        Ok(vec![format!("scale {}, {} batch axes{mask}", self.scale, self.layout.batch_rank())])
    }

    op_as_typed_op!();
}

impl EvalOp for Attention {
    op_out_of_plan!();

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == self.input_count(), "Attention: {} inputs", inputs.len());
        let mask = inputs.get(3).map(|m| &**m);
        let y = with_scratch(ctx, |scratch| self.run(&inputs[0], &inputs[1], &inputs[2], mask, scratch))??;
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for Attention {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == self.input_count() && inputs.iter().all(|f| f.datum_type == f32::datum_type()));
        Ok(tvec!(f32::fact(self.layout.output_shape(&inputs[0].shape, &inputs[2].shape))))
    }
}
