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

/// Gives `state` the buffers its Winograd, 1×1 convolution, linear and attention nodes share. Without them each call allocates its own.
pub(crate) fn install_scratch(state: &mut TypedSimpleState) {
    state.turn_state.shared.insert(SharedScratch(Mutex::new(Scratch::default())));
}
