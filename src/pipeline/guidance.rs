//! Classifier-free guidance: how a guided step runs its conditional and unconditional branches,
//! and how their predictions combine (`uncond + scale · (cond − uncond)`, as diffusers does).

use ndarray::{s, Array4};

use crate::error::{Error, Result};
use crate::runtime::{Conditions, Denoiser};

/// How a guided step evaluates its conditional and unconditional branches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuidanceBatching {
    /// `Concurrent` when the pipeline has 2 threads or more, else `TwoCalls` (both measured
    /// faster than `Batched` with tract on the shipped models; see README "Performance").
    #[default]
    Auto,
    /// Two batch-1 calls one after the other, each with all the threads.
    TwoCalls,
    /// Two batch-1 calls at once on two threads, each with half the threads.
    Concurrent,
    /// One batch-2 call.
    Batched,
}

impl std::str::FromStr for GuidanceBatching {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(GuidanceBatching::Auto),
            "two-calls" => Ok(GuidanceBatching::TwoCalls),
            "concurrent" => Ok(GuidanceBatching::Concurrent),
            "batched" => Ok(GuidanceBatching::Batched),
            other => Err(Error::config(
                "guidance-batching",
                format!("expected auto, two-calls, concurrent or batched, got {other:?}"),
            )),
        }
    }
}

impl GuidanceBatching {
    /// The strategy that runs with `threads` threads: `Auto` made concrete.
    pub(super) fn for_threads(self, threads: usize) -> Self {
        match self {
            GuidanceBatching::Auto if threads >= 2 => GuidanceBatching::Concurrent,
            GuidanceBatching::Auto => GuidanceBatching::TwoCalls,
            chosen => chosen,
        }
    }
}

/// One guided model call's inputs.
pub(super) struct Call<'a> {
    /// The scaled model input, one image.
    pub x: &'a Array4<f32>,
    /// The timestep (σ for a σ-conditioned model).
    pub t: f64,
    /// The conditional and the unconditional branch's inputs, one image each.
    pub branches: [Conditions<'a>; 2],
    /// Both branches as one batch of two, for `Batched`.
    pub pair: Conditions<'a>,
    /// The guidance scale.
    pub scale: f32,
}

/// Working arrays of a guided step, sized at load: the unconditional prediction, and the
/// batch-2 input and output of `Batched`.
pub(super) struct Scratch {
    uncond: Array4<f32>,
    pair_in: Array4<f32>,
    pair_out: Array4<f32>,
}

impl Scratch {
    /// `input_channels` of the model's input (more than its output's `c` for an inpainting
    /// model).
    pub(super) fn new(input_channels: usize, [c, h, w]: [usize; 3]) -> Self {
        Scratch {
            uncond: Array4::zeros((1, c, h, w)),
            pair_in: Array4::zeros((2, input_channels, h, w)),
            pair_out: Array4::zeros((2, c, h, w)),
        }
    }

    /// Runs both branches as `batching` says and writes the guided prediction into `out`.
    pub(super) fn predict(
        &mut self,
        denoiser: &mut Denoiser,
        batching: GuidanceBatching,
        call: &Call,
        out: &mut Array4<f32>,
    ) -> Result<()> {
        let Call { x, t, branches: [ref cond, ref null], ref pair, scale } = *call;
        let Scratch { uncond, pair_in, pair_out } = self;
        match batching {
            GuidanceBatching::Auto | GuidanceBatching::TwoCalls => {
                denoiser.predict_with(x, t, cond, out)?;
                denoiser.predict_with(x, t, null, uncond)?;
            }
            GuidanceBatching::Concurrent => {
                denoiser.predict_pair_with(x, t, [cond, null], [&mut *out, &mut *uncond])?;
            }
            GuidanceBatching::Batched => {
                pair_in.slice_mut(s![0..1, .., .., ..]).assign(x);
                pair_in.slice_mut(s![1..2, .., .., ..]).assign(x);
                denoiser.predict_with(pair_in, t, pair, pair_out)?;
                out.assign(&pair_out.slice(s![0..1, .., .., ..]));
                uncond.assign(&pair_out.slice(s![1..2, .., .., ..]));
            }
        }
        ndarray::Zip::from(&mut *out).and(&*uncond).for_each(|c, &u| *c = u + scale * (*c - u));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guidance_batching_names_parse_and_bad_ones_name_the_flag() {
        for (name, want) in [
            ("auto", GuidanceBatching::Auto),
            ("two-calls", GuidanceBatching::TwoCalls),
            ("concurrent", GuidanceBatching::Concurrent),
            ("batched", GuidanceBatching::Batched),
        ] {
            assert_eq!(name.parse::<GuidanceBatching>().unwrap(), want);
        }
        let err = "parallel".parse::<GuidanceBatching>().unwrap_err().to_string();
        assert!(err.contains("guidance-batching") && err.contains("\"parallel\""), "{err}");
        assert_eq!(GuidanceBatching::default(), GuidanceBatching::Auto);
    }
}
