//! Plans: the source graph given the batch's input shapes, typed, rewritten by our passes (or
//! translated to f16), optimized by tract, and a run state over it.

use std::collections::HashMap;

use tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::floats::FloatPrecisionTranslator;
use tract_onnx::tract_core::transform::ModelTransform;
use tract_onnx::tract_hir::infer::InferenceModel;

use super::bind::TimestepShape;
use super::load::one_line;
use super::symbols::set_inputs;
use super::threads::executor_for;
use super::{Convolution, Denoiser, Precision};
use crate::ops::packed::Packer;
use crate::ops::scratch::install_scratch;
use crate::passes;

/// The optimized plan for one batch size.
pub(super) struct Plan {
    pub(super) state: TypedSimpleState,
    /// The optimized graph, shared (weights included) by every plan built from it.
    pub(super) model: Arc<TypedModel>,
    /// Two more plans over the same graph, each with its own half of the threads, for guidance
    /// branches run at once; built on first use.
    branches: Option<Box<[Branch; 2]>>,
    /// The graph as our passes left it, before tract's optimization: kept by the load that
    /// writes the plan file, until the proof saves it there (`Denoiser::prove_stand_ins`).
    pub(super) rewritten: Option<TypedModel>,
}

/// A plan's state and the executor it runs on.
pub(super) struct Branch {
    pub(super) state: TypedSimpleState,
    pub(super) executor: Executor,
}

/// A value reachable only through `&mut`: the plans, and a [`Graph`](super::Graph)'s state.
///
/// tract's run state holds `Box<dyn OpState>`, which is `Send` but not `Sync`, so a `Denoiser`
/// holding it directly could not be shared between threads even though nothing reads the state
/// through `&self`. This wrapper makes that guarantee structural: it has no `&self` access at
/// all, so a shared `&Exclusive` gives another thread nothing to touch (the pattern of the
/// standard library's unstable `std::sync::Exclusive`).
pub(super) struct Exclusive<T>(T);

// SAFETY: `Exclusive` exposes its contents only through `&mut self` (`get_mut`), and `&mut`
// access is exclusive, so no two threads can ever reach the inner value at once. Moving it
// between threads is left to the auto trait `Send`, which tract's state has.
unsafe impl<T> Sync for Exclusive<T> {}

impl<T> Exclusive<T> {
    pub(super) fn new(value: T) -> Self {
        Exclusive(value)
    }

    pub(super) fn get_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

/// The plans, by batch size.
pub(super) type Plans = Exclusive<HashMap<usize, Plan>>;

impl Plan {
    /// The two branch states over this plan's graph, built on first use, each on `threads / 2`
    /// threads of its own.
    pub(super) fn branches(&mut self, threads: usize) -> TractResult<&mut [Branch; 2]> {
        if self.branches.is_none() {
            let branch = || -> TractResult<Branch> {
                let executor = executor_for(threads / 2).1;
                let state = new_state(&self.model, &executor)?;
                Ok(Branch { state, executor })
            };
            let pair = [branch()?, branch()?];
            self.branches = Some(Box::new(pair));
        }
        Ok(self.branches.as_mut().expect("built above"))
    }
}

/// A run state over `model` on `executor`, with the buffers our operators share.
pub(super) fn new_state(model: &Arc<TypedModel>, executor: &Executor) -> TractResult<TypedSimpleState> {
    let options = RunOptions { executor: Some(executor.clone()), ..Default::default() };
    let plan = TypedSimplePlan::new_with_options(model.clone(), &options)?;
    let mut state = TypedSimpleState::new(&plan)?;
    install_scratch(&mut state);
    Ok(state)
}

/// Our float32 rewrites on a typed graph (`convolutions`: also the ones that swap convolutions);
/// with how many convolutions became Winograd and how many GroupNorms were fused.
pub(super) fn f32_rewrites(
    typed: TypedModel,
    convolutions: bool,
    packer: &Packer,
) -> TractResult<(TypedModel, usize, usize)> {
    let rewritten = passes::f32_rewrites(typed, convolutions, packer)?;
    let (winograd, group_norms) = (rewritten.replaced(passes::WINOGRAD), rewritten.replaced(passes::GROUP_NORM));
    Ok((rewritten.model, winograd, group_norms))
}

/// tract's optimization, then the constant-layout fix that our operators need.
pub(super) fn optimize(typed: TypedModel) -> TractResult<TypedModel> {
    let mut typed = typed.into_optimized()?;
    passes::contiguous_constants::rewrite(&mut typed)?;
    Ok(typed)
}

impl Denoiser {
    /// Whether `--precision f16` runs as float32 plans whose convolutions on our kernel
    /// (Winograd, 1×1, strided, direct) multiply and sum in float16 (aarch64 with FP16
    /// arithmetic), rather than as tract's translation of the whole graph to float16: those
    /// products are most of a call, and the float32 rest keeps our other operators and needs no
    /// conversions between them.
    pub(super) fn half_products(&self) -> bool {
        self.precision == Precision::F16 && self.convolution == Convolution::Winograd && crate::kernels::half_products()
    }

    /// The float type of the plans' inputs and outputs.
    pub(super) fn graph_float(&self) -> DatumType {
        if self.half_products() {
            f32::datum_type()
        } else {
            self.precision.float_type()
        }
    }

    /// The facts of the graph's inputs for a plan of `batch` images.
    fn input_facts(&self, batch: usize) -> std::result::Result<Vec<(usize, InferenceFact)>, String> {
        let [_, h, w] = self.chw;
        let b = &self.bindings;
        let mut facts = vec![(b.sample, f32::fact([batch, self.in_channels, h, w]).into())];
        let ts_shape: TVec<usize> = match b.timestep_input.shape {
            TimestepShape::Scalar => tvec![],
            TimestepShape::One => tvec![1],
            TimestepShape::Batch => tvec![batch],
        };
        facts.push((b.timestep, InferenceFact::dt_shape(b.timestep_input.datum_type, ts_shape)));
        if let Some((ix, dt)) = b.class_labels {
            facts.push((ix, InferenceFact::dt_shape(dt, tvec![batch])));
        }
        if let Some((ix, [Some(tokens), Some(dim)])) = b.context {
            facts.push((ix, f32::fact([batch, tokens, dim]).into()));
        } else if b.context.is_some() {
            return Err("encoder_hidden_states has no fixed [tokens, dim] in the ONNX file: give them (a text encoder's output gives them)".into());
        }
        for c in &b.conditioning {
            let mut shape: TVec<usize> = tvec![batch];
            shape.extend(c.dims.iter().copied());
            facts.push((c.index, InferenceFact::dt_shape(c.datum_type, shape)));
        }
        Ok(facts)
    }

    /// What a plan of `batch` images is built from: its input facts and the settings. Two
    /// builds of one graph with the same signature are the same plan.
    pub(super) fn signature(&self, batch: usize) -> std::result::Result<String, String> {
        Ok(format!("{} {} {:?}", self.precision, self.convolution, self.input_facts(batch)?))
    }

    /// The plan, and how many convolutions in it run as Winograd and how many GroupNorms are
    /// fused.
    pub(super) fn build_plan(
        &self,
        batch: usize,
        model: InferenceModel,
        packer: &Packer,
    ) -> std::result::Result<(Plan, usize, usize), String> {
        let (typed, winograd_convs, group_norms) = self.rewritten(batch, model, packer)?;
        Ok((self.finish(batch, typed)?, winograd_convs, group_norms))
    }

    /// The typed graph of `model` for `batch` images, rewritten by our passes (or translated to
    /// f16), before tract's optimization.
    pub(super) fn rewritten(
        &self,
        batch: usize,
        mut model: InferenceModel,
        packer: &Packer,
    ) -> std::result::Result<(TypedModel, usize, usize), String> {
        let b = &self.bindings;
        let err = |e: TractError| one_line(&format!("{e:#}"));
        let facts = self.input_facts(batch)?;
        set_inputs(&mut model, facts).map_err(err)?;
        let out_outlet = model.output_outlets().map_err(err)?[b.output];
        model.select_output_outlets(&[out_outlet]).map_err(err)?;
        let optimizing = |e: TractError| format!("optimizing for batch {batch}: {}", err(e));
        // The f16 translation must come before tract fuses operators into kernels picked for f32.
        let typed = model.into_typed().map_err(optimizing)?;
        // Where the CPU has FP16 arithmetic, an f16 plan is a float32 plan whose convolutions
        // on our kernel multiply in float16 (`half_products`).
        packer.set_half_products(self.half_products());
        let (typed, winograd_convs, group_norms) = match self.precision {
            Precision::F16 if !self.half_products() => {
                let mut typed = typed.into_decluttered().map_err(optimizing)?;
                FloatPrecisionTranslator::new(f32::datum_type(), f16::datum_type())
                    .transform(&mut typed)
                    .map_err(|e| format!("translating to f16: {}", err(e)))?;
                (typed, 0, 0)
            }
            _ => {
                let ours = self.convolution == Convolution::Winograd;
                f32_rewrites(typed, ours, packer).map_err(optimizing)?
            }
        };
        Ok((typed, winograd_convs, group_norms))
    }

    /// The plan over the rewritten graph `typed`: optimized by tract, its output checked.
    pub(super) fn finish(&self, batch: usize, typed: TypedModel) -> std::result::Result<Plan, String> {
        let [c, h, w] = self.chw;
        let err = |e: TractError| one_line(&format!("{e:#}"));
        let optimizing = |e: TractError| format!("optimizing for batch {batch}: {}", err(e));
        let typed = optimize(typed).map_err(optimizing)?;
        let out_fact = typed.output_fact(0).map_err(err)?;
        let expected = [batch, c, h, w];
        let ok = out_fact.datum_type == self.graph_float()
            && out_fact.shape.as_concrete().map(|s| s == expected).unwrap_or(false);
        if !ok {
            return Err(format!(
                "the output is {out_fact:?}, expected float {expected:?} (the sample's shape): not a denoiser for this card's [image]"
            ));
        }
        let model = Arc::new(typed);
        let state = new_state(&model, &self.executor).map_err(err)?;
        Ok(Plan { state, model, branches: None, rewritten: None })
    }
}
