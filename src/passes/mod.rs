//! Graph rewrites: each finds a pattern in a typed tract graph and swaps in one of our
//! operators (`crate::ops`). [`f32_rewrites`] runs them as one ordered list, [`PASSES`], the way
//! tract lists its own declutter and optimization passes; one file per rewrite.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::binary::{BinMiniOp, TypedBinOp};

use crate::ops::packed::Packer;

#[cfg(target_arch = "x86_64")]
pub(crate) mod attention;
pub(crate) mod contiguous_constants;
#[cfg(own_gemm)]
pub(crate) mod conv1x1;
pub(crate) mod conv_match;
pub(crate) mod einsum_permute;
pub(crate) mod embedding;
#[cfg(target_arch = "x86_64")]
pub(crate) mod gelu;
pub(crate) mod group_norm;
pub(crate) mod layer_norm;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod linear;
pub(crate) mod pow_const;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod softmax;
#[cfg(own_gemm)]
pub(crate) mod strided_conv;
pub(crate) mod winograd;

/// When a pass runs on the float32 graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// On the typed graph as imported, before tract's declutter (which turns a 1×1 convolution
    /// into an `EinSum` plus a bias `Add` that tract runs slower, and cuts attention's second
    /// product apart where its values are a concatenation).
    Imported,
    /// On the decluttered graph, before tract optimizes it: these passes need tract's
    /// convolutions as they are before optimization, and declutter has by then folded an
    /// exported `Pad` into the convolution after it.
    Decluttered,
}

/// One graph rewrite.
#[derive(Clone, Copy)]
pub(crate) struct Pass {
    /// Names the pass in errors and in [`Rewritten::replaced`].
    pub name: &'static str,
    pub stage: Stage,
    /// Whether the pass swaps convolutions, which `Convolution::Im2col` leaves to tract.
    pub convolutions: bool,
    /// Rewrites the graph in place; returns how many nodes (or patterns) it replaced.
    pub run: Run,
}

/// A pass's rewrite: one that swaps in operators with packed weights takes them from the
/// [`Packer`].
#[derive(Clone, Copy)]
pub(crate) enum Run {
    Plain(fn(&mut TypedModel) -> TractResult<usize>),
    Packing(fn(&mut TypedModel, &Packer) -> TractResult<usize>),
}

impl Run {
    fn on(self, model: &mut TypedModel, packer: &Packer) -> TractResult<usize> {
        match self {
            Run::Plain(f) => f(model),
            Run::Packing(f) => f(model, packer),
        }
    }
}

/// [`Pass::name`] of the Winograd rewrite.
pub(crate) const WINOGRAD: &str = "winograd";
/// [`Pass::name`] of the attention rewrite.
#[cfg(target_arch = "x86_64")]
pub(crate) const ATTENTION: &str = "attention";
/// [`Pass::name`] of the GroupNorm rewrite.
pub(crate) const GROUP_NORM: &str = "group norm";

/// The float32 rewrites, in the order they run. The x86-64 ones need AVX2 and FMA and replace
/// nothing on a CPU without them.
pub(crate) const PASSES: &[Pass] = &[
    #[cfg(target_arch = "x86_64")]
    Pass { name: ATTENTION, stage: Stage::Imported, convolutions: false, run: Run::Plain(attention::rewrite) },
    #[cfg(own_gemm)]
    Pass { name: "1x1 convolution", stage: Stage::Imported, convolutions: true, run: Run::Packing(conv1x1::rewrite) },
    Pass { name: "embedding", stage: Stage::Imported, convolutions: false, run: Run::Packing(embedding::rewrite) },
    // Linear layers first as imported: declutter would fold a following slice (GEGLU's two
    // halves) or scale into copies of their weights, which no initializer names, so a plan
    // file could not leave those weights out of the ONNX file. The rest after declutter.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    Pass { name: "linear", stage: Stage::Imported, convolutions: false, run: Run::Packing(linear::rewrite) },
    Pass { name: GROUP_NORM, stage: Stage::Decluttered, convolutions: false, run: Run::Plain(group_norm::rewrite) },
    Pass { name: "layer norm", stage: Stage::Decluttered, convolutions: false, run: Run::Plain(layer_norm::rewrite) },
    Pass {
        name: "einsum permutation",
        stage: Stage::Decluttered,
        convolutions: false,
        run: Run::Plain(einsum_permute::rewrite),
    },
    Pass {
        name: "constant power",
        stage: Stage::Decluttered,
        convolutions: false,
        run: Run::Plain(pow_const::rewrite),
    },
    #[cfg(target_arch = "x86_64")]
    Pass { name: ATTENTION, stage: Stage::Decluttered, convolutions: false, run: Run::Plain(attention::rewrite) },
    #[cfg(target_arch = "x86_64")]
    Pass {
        name: "attention moves",
        stage: Stage::Decluttered,
        convolutions: false,
        run: Run::Plain(attention::absorb_moves),
    },
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    Pass { name: "softmax", stage: Stage::Decluttered, convolutions: false, run: Run::Plain(softmax::rewrite) },
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    Pass { name: "linear", stage: Stage::Decluttered, convolutions: false, run: Run::Packing(linear::rewrite) },
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    Pass { name: "linear bias", stage: Stage::Decluttered, convolutions: false, run: Run::Plain(linear::fold_biases) },
    // After the linear layers, which take the bias `Add` a chain may start from.
    #[cfg(target_arch = "x86_64")]
    Pass { name: "gelu", stage: Stage::Decluttered, convolutions: false, run: Run::Plain(gelu::rewrite) },
    Pass { name: WINOGRAD, stage: Stage::Decluttered, convolutions: true, run: Run::Packing(winograd::rewrite) },
    #[cfg(own_gemm)]
    Pass {
        name: "strided convolution",
        stage: Stage::Decluttered,
        convolutions: true,
        run: Run::Packing(strided_conv::rewrite),
    },
];

/// A float32 graph after [`f32_rewrites`], decluttered, not yet optimized.
pub(crate) struct Rewritten {
    pub model: TypedModel,
    /// How many nodes each pass that ran replaced, in [`PASSES`] order.
    pub replaced: Vec<(&'static str, usize)>,
}

impl Rewritten {
    /// How many nodes the pass named `name` replaced (0 when it did not run).
    pub(crate) fn replaced(&self, name: &str) -> usize {
        self.replaced.iter().filter(|(pass, _)| *pass == name).map(|(_, n)| n).sum()
    }
}

/// Runs [`PASSES`] on a float32 graph, with packed weights from `packer`, and declutters it between the two stages;
/// `convolutions: false` skips the passes that swap convolutions (`Convolution::Im2col`).
pub(crate) fn f32_rewrites(model: TypedModel, convolutions: bool, packer: &Packer) -> TractResult<Rewritten> {
    let mut replaced = Vec::new();
    let wanted = |stage| PASSES.iter().filter(move |p| p.stage == stage && (convolutions || !p.convolutions));
    let mut model = model;
    for pass in wanted(Stage::Imported) {
        replaced.push((pass.name, pass.run.on(&mut model, packer).map_err(|e| e.context(pass.name))?));
    }
    let mut model = model.into_decluttered()?;
    for pass in wanted(Stage::Decluttered) {
        replaced.push((pass.name, pass.run.on(&mut model, packer).map_err(|e| e.context(pass.name))?));
    }
    Ok(Rewritten { model, replaced })
}

/// The name of the constant at `outlet` when nothing but one node reads it: the initializer a
/// packed weight comes from, which a later load may leave out of the graph (`crate::runtime`).
pub(crate) fn origin(model: &TypedModel, outlet: OutletId) -> Option<&str> {
    let node = model.node(outlet.node);
    let only_reader = model.outlet_successors(outlet).len() == 1 && node.outputs.len() == 1;
    (node.op_is::<tract_onnx::tract_core::ops::konst::Const>() && only_reader).then_some(&*node.name)
}

/// Whether `outlet` feeds exactly one node and is not a model output: a pattern's
/// intermediates must not be needed elsewhere.
pub(crate) fn single_use(model: &TypedModel, outlet: OutletId) -> TractResult<bool> {
    Ok(model.outlet_successors(outlet).len() == 1 && !model.output_outlets()?.contains(&outlet))
}

/// Whether `node` is a binary operator of kind `O`.
pub(crate) fn is_bin<O: BinMiniOp>(node: &TypedNode) -> bool {
    node.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<O>())
}

/// For a binary node of kind `O` with one constant input: the other input and the constant.
pub(crate) fn bin_by_const<O: BinMiniOp>(
    model: &TypedModel,
    node: &TypedNode,
) -> TractResult<Option<(OutletId, Arc<Tensor>)>> {
    if !is_bin::<O>(node) || node.inputs.len() != 2 {
        return Ok(None);
    }
    for (this, other) in [(0, 1), (1, 0)] {
        if let Some(k) = model.outlet_fact(node.inputs[other])?.konst.clone() {
            if model.outlet_fact(node.inputs[this])?.konst.is_none() {
                return Ok(Some((node.inputs[this], k)));
            }
        }
    }
    Ok(None)
}

/// tract convolutions for the pass tests.
#[cfg(test)]
pub(crate) mod testing {
    use tract_onnx::prelude::*;
    use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
    use tract_onnx::tract_core::ops::nn::DataFormat;

    /// tract's 1×1, unpadded NCHW convolution from `c` to `k` channels with `strides` (OIHW
    /// weights, bias as its third input).
    #[cfg(own_gemm)]
    pub(crate) fn conv(c: usize, k: usize, strides: Option<TVec<usize>>) -> Conv {
        let pool_spec = PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec![1, 1],
            padding: PaddingSpec::Valid,
            dilations: None,
            strides,
            input_channels: c,
            output_channels: k,
        };
        Conv { pool_spec, kernel_fmt: KernelFormat::OIHW, group: 1, q_params: None }
    }

    /// tract's 3×3, stride-1, padding-1 NCHW convolution from `c` to `k` channels (OIHW weights,
    /// bias as its third input): what `winograd::rewrite` looks for.
    pub(crate) fn conv3x3(c: usize, k: usize) -> tract_onnx::tract_core::ops::cnn::Conv {
        let pool_spec = PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec![3, 3],
            padding: PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1]),
            dilations: None,
            strides: None,
            input_channels: c,
            output_channels: k,
        };
        Conv { pool_spec, kernel_fmt: KernelFormat::OIHW, group: 1, q_params: None }
    }
}
