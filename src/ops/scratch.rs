//! The buffers our operators share within one plan state.

use std::sync::Mutex;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

/// Buffers for one call: the transformed input `V` and the products `M`. They grow only:
/// shrinking and growing again would zero-fill on every layer.
#[derive(Default)]
pub(crate) struct Scratch {
    pub(crate) v: Vec<f32>,
    pub(crate) m: Vec<f32>,
    /// `V` rounded to float16, for the float16 products.
    #[cfg(target_arch = "aarch64")]
    pub(crate) h: Vec<half::f16>,
}

/// One [`Scratch`] for all the Winograd nodes of a plan state, kept in its turn state.
///
/// Why there: it lives exactly as long as the state, whichever pool thread runs a call, so the
/// heap stops growing after the state's first call (a thread-local scratch grew again whenever
/// another pool worker first took a call, which made the 2-thread heap check flaky on a busy
/// machine), and states run side by side (concurrent guidance) each have their own. The lock
/// is never contended: a state runs one node at a time.
struct SharedScratch(Mutex<Scratch>);

/// Runs `f` on the scratch of the plan state that runs `ctx`, or on a fresh one when the state
/// has none.
pub(crate) fn with_scratch<R>(ctx: &EvalContext, f: impl FnOnce(&mut Scratch) -> R) -> TractResult<R> {
    match ctx.shared.and_then(|shared| shared.get::<SharedScratch>()) {
        Some(SharedScratch(held)) => {
            let mut scratch = held.lock().map_err(|_| format_err!("a poisoned scratch"))?;
            Ok(f(&mut scratch))
        }
        None => Ok(f(&mut Scratch::default())),
    }
}

#[cfg(own_gemm)] // only `direct_conv`, `linear` and `attention` ask for plain floats
impl Scratch {
    /// `len` floats of the buffer, grown when short; what they hold is left over from before.
    pub(crate) fn floats(&mut self, len: usize) -> &mut [f32] {
        if self.v.len() < len {
            self.v.resize(len, 0.0);
        }
        &mut self.v[..len]
    }
}

/// Gives `state` the buffers its Winograd, 1×1 convolution, linear and attention nodes share,
/// and a place for spare activation buffers ([`output`]). Without them each call allocates its
/// own.
pub(crate) fn install_scratch(state: &mut TypedSimpleState) {
    state.turn_state.shared.insert(SharedScratch(Mutex::new(Scratch::default())));
    state.turn_state.shared.insert(Spares::default());
}

/// Inputs that our operators finished reading and that nothing else held, kept within one call
/// of a plan state for a later output of the same length.
///
/// Why: glibc hands large freed buffers back to the OS, so every large activation of a call
/// came from fresh pages, each faulted in and zeroed by the kernel; on a VAE decoder most of
/// those faults were in the Winograd and group norm outputs (docs/optimizations.md). A buffer
/// kept here is reused instead.
#[derive(Default)]
struct Spares(Mutex<Vec<Tensor>>);

/// At most this many spares wait for an output of their length: one covers a ResNet block's chain
/// (norm, convolution, norm, convolution), and each more one sits idle while tract's own operators
/// allocate.
const MOST_SPARES: usize = 1;

/// Buffers smaller than this come from the allocator's own free lists without page faults.
const LEAST_SPARE_BYTES: usize = 1 << 20;

/// An uninitialized float tensor of `shape` for an operator's output: a spare buffer of the
/// same length when the plan state running `ctx` holds one ([`recycle`]), else a new one.
pub(crate) fn output(ctx: &EvalContext, shape: &[usize]) -> TractResult<Tensor> {
    let len: usize = shape.iter().product();
    if let Some(Spares(held)) = ctx.shared.and_then(|shared| shared.get::<Spares>()) {
        let mut spares = held.lock().map_err(|_| format_err!("poisoned spare buffers"))?;
        match spares.iter().position(|t| t.len() == len) {
            Some(i) => {
                #[cfg(test)]
                TAKEN.with(|taken| taken.set(taken.get() + 1));
                let mut spare = spares.swap_remove(i);
                spare.set_shape(shape)?;
                return Ok(spare);
            }
            // None fits: they go before the new buffer comes, and never add to the peak.
            None => spares.clear(),
        }
    }
    // SAFETY: the caller writes every element before the tensor is read.
    unsafe { Tensor::uninitialized::<f32>(shape) }
}

/// Keeps the buffer of `input`, which the operator has finished reading, for a later
/// [`output`] of the same call: when it is a plain float tensor that nothing else holds (tract
/// hands an operator the value at its last use), large, and aligned as a new tensor would be.
pub(crate) fn recycle(ctx: &EvalContext, input: TValue) {
    let Some(Spares(held)) = ctx.shared.and_then(|shared| shared.get::<Spares>()) else { return };
    let aligned =
        |t: &Tensor| super::f32s(t, "recycle").is_ok_and(|v| (v.as_ptr() as usize).is_multiple_of(vector_size()));
    if !input.is_exclusive()
        || input.datum_type() != f32::datum_type()
        || input.len() * 4 < LEAST_SPARE_BYTES
        || !aligned(&input)
    {
        return;
    }
    let tensor = input.into_tensor();
    if let Ok(mut spares) = held.lock() {
        if spares.len() == MOST_SPARES {
            spares.remove(0);
        }
        spares.push(tensor);
    }
}

/// Drops the spare buffers of `state` at the end of a call: none is held between calls.
pub(crate) fn drop_spares(state: &mut TypedSimpleState) {
    if let Some(Spares(held)) = state.turn_state.shared.get_mut::<Spares>() {
        held.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()).clear();
    }
}

#[cfg(test)]
thread_local! {
    /// Spares [`output`] handed out on this thread.
    static TAKEN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::group_norm::GroupNorm;

    /// Four group norms in a row over 1 MiB activations: with the spares, every output after
    /// the first takes the buffer an earlier node consumed, the bits are those of a state
    /// without spares, and the spares left at the end of the call are dropped.
    #[test]
    fn a_call_reuses_the_buffers_its_operators_consumed_and_holds_none_after() -> TractResult<()> {
        let shape = [1usize, 32, 64, 128];
        let mut model = TypedModel::default();
        let mut wire = model.add_source("x", f32::fact(shape))?;
        for i in 0..4 {
            let op = GroupNorm {
                groups: 8,
                recip: 1.0 / (4 * 64 * 128) as f32,
                eps: 1e-5,
                gamma: (0..32).map(|c| 1.0 + c as f32 * 0.01).collect(),
                beta: (0..32).map(|c| c as f32 * 0.02 - 0.3).collect(),
                silu: i % 2 == 1,
            };
            wire = model.wire_node(format!("norm{i}"), op, &[wire])?[0];
        }
        model.select_output_outlets(&[wire])?;
        let plan = TypedSimplePlan::new(model)?;
        let len: usize = shape.iter().product();
        let x = Tensor::from_shape(&shape, &(0..len).map(|i| ((i * 37 % 101) as f32).sin()).collect::<Vec<_>>())?;
        let run = |spares: bool| -> TractResult<(Tensor, usize, usize)> {
            let mut state = TypedSimpleState::new(&plan)?;
            if spares {
                install_scratch(&mut state);
            }
            TAKEN.with(|taken| taken.set(0));
            let out = state.run(tvec![x.clone().into_tvalue()])?.remove(0).into_tensor();
            let taken = TAKEN.with(|taken| taken.get());
            let left = |state: &TypedSimpleState| {
                state.turn_state.shared.get::<Spares>().map_or(0, |Spares(held)| held.lock().unwrap().len())
            };
            let before = left(&state);
            drop_spares(&mut state);
            assert_eq!(left(&state), 0, "spares held after the call");
            Ok((out, taken, before))
        };
        let (plain, none_taken, _) = run(false)?;
        let (reused, taken, kept) = run(true)?;
        assert_eq!(none_taken, 0);
        assert_eq!(taken, 3, "outputs that took a consumed buffer");
        assert!(kept > 0, "the last node's input was not kept");
        let (a, b) = (super::super::f32s(&plain, "plain")?, super::super::f32s(&reused, "reused")?);
        assert!(a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits()), "the spares changed the output");
        Ok(())
    }
}
