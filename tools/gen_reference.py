#!/usr/bin/env python3
"""Writes the sampler reference vectors in tests/fixtures/samplers/ from diffusers' schedulers.

Pinned versions (the fixtures in the repository were written with these):
    diffusers == 0.36.0
    torch     == 2.11.0
    numpy     == 2.4.6 (any 2.x should give the same files)

Every case runs diffusers' standard sampling loop in float32 on the CPU with a dummy model,
out = x_in * t / (t + 1) (t: the timestep as a float32 scalar), and records the starting noise,
the timesteps, every noise draw the scheduler makes inside `step` (so a port can replay them), the
sample after each step and the final sample. tests/sampler_parity.rs checks the Rust samplers
against these files, to a relative error of 1e-4.

Before writing a case the script checks it: replaying the recorded noise must reproduce the run
bit for bit, and the float32 run must agree with the same run in float64 (and with runs perturbed
by float32 rounding errors) to 1e-5, so that a correct port cannot fail on rounding alone.

Usage:  python3 tools/gen_reference.py [--out tests/fixtures/samplers] [--check] [--only PREFIX]
    --check  regenerates in memory and fails if any committed fixture differs.
    --only   runs only the cases whose file name starts with PREFIX (e.g. flow_), leaving the
             other files alone: another torch build can round a few values one unit differently.
"""

import argparse
import json
import os
import sys
import zlib
from contextlib import contextmanager

import numpy as np
import torch
import diffusers
from diffusers import (
    CMStochasticIterativeScheduler,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
)

PINNED_DIFFUSERS = "0.36.0"
PINNED_TORCH = "2.11.0"
SHAPE = [2, 1, 4, 4]

CLASSES = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "lcm": LCMScheduler,
    "consistency": CMStochasticIterativeScheduler,
    "flow_euler": FlowMatchEulerDiscreteScheduler,
    "flow_heun": FlowMatchHeunDiscreteScheduler,
}
# Flow-matching schedulers have no init_noise_sigma or scale_model_input (their pipelines start
# from plain noise and feed it to the model as is).
FLOW = {"flow_euler", "flow_heun"}
# Two model calls per step but the last.
SECOND_ORDER = {"heun", "flow_heun"}

# Stable Diffusion's betas, used by several cases.
SD = {"beta_start": 0.00085, "beta_end": 0.012}
DPMPP = {"algorithm_type": "dpmsolver++", "solver_type": "midpoint"}

# (sampler, short name, steps, eta, config). The config holds only keys that are passed to the
# scheduler's constructor, with diffusers' names; anything left out takes diffusers' default.
CASES = [
    # --- DDIM -------------------------------------------------------------------------------
    ("ddim", "linear_eps_leading_s10", 10, 0.0,
     {"beta_schedule": "linear", "prediction_type": "epsilon", "timestep_spacing": "leading"}),
    ("ddim", "scaled_v_trailing_zsnr_s4", 4, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "timestep_spacing": "trailing",
      "rescale_betas_zero_snr": True, "clip_sample": False, "set_alpha_to_one": False}),
    ("ddim", "cos_v_linspace_clip_s5", 5, 0.0,
     {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "timestep_spacing": "linspace",
      "clip_sample": True}),
    ("ddim", "linear_eps_leading_offset1_noalpha1_eta1_s6", 6, 1.0,
     {"beta_schedule": "linear", "prediction_type": "epsilon", "timestep_spacing": "leading",
      "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}),
    ("ddim", "scaled_sample_thresholding_eta05_s3", 3, 0.5,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "sample", "timestep_spacing": "trailing",
      "thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.5, "clip_sample": False}),
    ("ddim", "linear_eps_s1", 1, 0.0,
     {"beta_schedule": "linear", "prediction_type": "epsilon"}),
    # --- DDPM -------------------------------------------------------------------------------
    ("ddpm", "linear_eps_leading_s10", 10, 0.0,
     {"beta_schedule": "linear", "prediction_type": "epsilon", "timestep_spacing": "leading"}),
    ("ddpm", "scaled_v_trailing_noclip_s4", 4, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "timestep_spacing": "trailing",
      "clip_sample": False}),
    ("ddpm", "cos_sample_leading_offset1_s5", 5, 0.0,
     {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample", "timestep_spacing": "leading",
      "steps_offset": 1}),
    ("ddpm", "linear_v_trailing_zsnr_s3", 3, 0.0,
     {"beta_schedule": "linear", "prediction_type": "v_prediction", "timestep_spacing": "trailing",
      "rescale_betas_zero_snr": True, "clip_sample": False}),
    ("ddpm", "linear_eps_linspace_s1", 1, 0.0,
     {"beta_schedule": "linear", "prediction_type": "epsilon", "timestep_spacing": "linspace"}),
    # --- Euler ------------------------------------------------------------------------------
    ("euler", "scaled_eps_linspace_s10", 10, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "timestep_spacing": "linspace"}),
    ("euler", "linear_v_trailing_karras_s5", 5, 0.0,
     {"beta_schedule": "linear", "prediction_type": "v_prediction", "timestep_spacing": "trailing",
      "use_karras_sigmas": True}),
    ("euler", "cos_sample_leading_offset1_s4", 4, 0.0,
     {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample", "timestep_spacing": "leading",
      "steps_offset": 1}),
    # Zero terminal SNR with "leading" spacing: a schedule that starts at t = 999 (sigma 4096) is
    # not resolvable to 1e-4 in float32 by Euler-type steps (diffusers' own float32 run is ~1e-4
    # off its float64 run), so those cases are left out.
    ("euler", "scaled_v_leading_zsnr_s4", 4, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "timestep_spacing": "leading",
      "rescale_betas_zero_snr": True}),
    ("euler", "scaled_sample_trailing_s1", 1, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "sample", "timestep_spacing": "trailing"}),
    # --- Euler ancestral --------------------------------------------------------------------
    ("euler_ancestral", "scaled_eps_linspace_s10", 10, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "timestep_spacing": "linspace"}),
    ("euler_ancestral", "linear_v_trailing_s4", 4, 0.0,
     {"beta_schedule": "linear", "prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("euler_ancestral", "cos_eps_leading_offset1_s5", 5, 0.0,
     {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon", "timestep_spacing": "leading",
      "steps_offset": 1}),
    ("euler_ancestral", "scaled_v_leading_zsnr_s4", 4, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "timestep_spacing": "leading",
      "rescale_betas_zero_snr": True}),
    # --- Heun -------------------------------------------------------------------------------
    ("heun", "linear_eps_linspace_s5", 5, 0.0,
     {"beta_schedule": "linear", "prediction_type": "epsilon", "timestep_spacing": "linspace"}),
    ("heun", "scaled_v_trailing_karras_s4", 4, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "timestep_spacing": "trailing",
      "use_karras_sigmas": True}),
    ("heun", "cos_eps_leading_offset1_clip_s3", 3, 0.0,
     {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon", "timestep_spacing": "leading",
      "steps_offset": 1, "clip_sample": True}),
    ("heun", "scaled_sample_trailing_s1", 1, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "sample", "timestep_spacing": "trailing"}),
    # --- DPM-Solver++ 2M --------------------------------------------------------------------
    ("dpmpp_2m", "linear_eps_linspace_o2_s10", 10, 0.0,
     {**DPMPP, "beta_schedule": "linear", "prediction_type": "epsilon", "timestep_spacing": "linspace",
      "solver_order": 2, "lower_order_final": True}),
    ("dpmpp_2m", "scaled_v_trailing_karras_s6", 6, 0.0,
     {**DPMPP, **SD, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
      "timestep_spacing": "trailing", "use_karras_sigmas": True, "solver_order": 2}),
    # With solver_order 2, lower_order_final only matters when the last sigma is not 0
    # (final_sigmas_type "sigma_min", without Karras sigmas, whose last step would be empty).
    ("dpmpp_2m", "scaled_eps_leading_sigmamin_nolof_s6", 6, 0.0,
     {**DPMPP, **SD, "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "timestep_spacing": "leading",
      "final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("dpmpp_2m", "cos_v_linspace_sigmamin_lof_s4", 4, 0.0,
     {**DPMPP, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction",
      "timestep_spacing": "linspace", "final_sigmas_type": "sigma_min", "lower_order_final": True}),
    ("dpmpp_2m", "cos_sample_leading_offset1_o1_s4", 4, 0.0,
     {**DPMPP, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample", "timestep_spacing": "leading",
      "steps_offset": 1, "solver_order": 1}),
    ("dpmpp_2m", "scaled_v_trailing_zsnr_s5", 5, 0.0,
     {**DPMPP, **SD, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
      "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}),
    ("dpmpp_2m", "linear_v_s1", 1, 0.0,
     {**DPMPP, "beta_schedule": "linear", "prediction_type": "v_prediction"}),
    # --- LCM --------------------------------------------------------------------------------
    ("lcm", "scaled_eps_orig50_s4", 4, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "original_inference_steps": 50}),
    ("lcm", "linear_v_orig20_noalpha1_s3", 3, 0.0,
     {"beta_schedule": "linear", "prediction_type": "v_prediction", "original_inference_steps": 20,
      "set_alpha_to_one": False}),
    ("lcm", "cos_sample_clip_offset1_s5", 5, 0.0,
     {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample", "clip_sample": True, "steps_offset": 1}),
    ("lcm", "scaled_v_zsnr_s2", 2, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}),
    ("lcm", "scaled_sample_s1", 1, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "sample"}),
    # --- Consistency (CMStochasticIterativeScheduler) ----------------------------------------
    ("consistency", "default_s2", 2, 0.0, {}),
    ("consistency", "default_s4", 4, 0.0, {"num_train_timesteps": 40}),
    ("consistency", "noclip_s3", 3, 0.0, {"clip_denoised": False}),
    ("consistency", "ntt151_noclip_s5", 5, 0.0, {"num_train_timesteps": 151, "clip_denoised": False}),
    ("consistency", "default_s1", 1, 0.0, {}),
    # --- Flow matching ------------------------------------------------------------------------
    # A single step goes from sigma 1 to 0 and leaves x / (num_train_timesteps + 1) with the dummy
    # model, a cancellation too ill-conditioned for the 1e-4 test, so there is no one-step case.
    # "mu" is not a constructor key: it is passed to set_timesteps, as diffusers' pipelines do.
    ("flow_euler", "default_s4", 4, 0.0, {}),
    ("flow_euler", "shift3_s6", 6, 0.0, {"shift": 3.0}),
    ("flow_euler", "dynamic_exp_mu115_s5", 5, 0.0,
     {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
      "max_image_seq_len": 4096, "mu": 1.15}),
    ("flow_euler", "dynamic_linear_mu2_terminal_s4", 4, 0.0,
     {"use_dynamic_shifting": True, "time_shift_type": "linear", "mu": 2.0, "shift_terminal": 0.1}),
    ("flow_euler", "shift3_karras_s5", 5, 0.0, {"shift": 3.0, "use_karras_sigmas": True}),
    ("flow_euler", "ntt500_exponential_s4", 4, 0.0, {"num_train_timesteps": 500, "use_exponential_sigmas": True}),
    ("flow_euler", "shift3_stochastic_s4", 4, 0.0, {"shift": 3.0, "stochastic_sampling": True}),
    ("flow_heun", "default_s4", 4, 0.0, {}),
    ("flow_heun", "shift3_s5", 5, 0.0, {"shift": 3.0}),
    ("flow_heun", "ntt500_shift1p7_s3", 3, 0.0, {"num_train_timesteps": 500, "shift": 1.7}),
]


# Image-to-image: (sampler, short name, steps, eta, config, strength). The run starts from an
# "image" noised to the first timestep diffusers' img2img pipelines keep: the schedule truncated
# to its last int(steps * strength) steps (LCM instead sets its timesteps with the strength), the
# scheduler's begin index set there, the image noised by add_noise (scale_noise for flow).
IMG2IMG = [
    ("ddim", "img2img_linear_eps_leading_s10_st06", 10, 0.0,
     {"beta_schedule": "linear", "prediction_type": "epsilon", "timestep_spacing": "leading"}, 0.6),
    ("ddim", "img2img_scaled_v_trailing_s4_st1", 4, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 1.0),
    ("ddpm", "img2img_scaled_v_trailing_s4_st05", 4, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 0.5),
    ("ddpm", "img2img_linear_eps_leading_s10_st07", 10, 0.0,
     {"beta_schedule": "linear", "prediction_type": "epsilon", "timestep_spacing": "leading"}, 0.7),
    ("euler", "img2img_scaled_eps_linspace_s10_st03", 10, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "timestep_spacing": "linspace"}, 0.3),
    ("euler", "img2img_linear_v_trailing_karras_s5_st08", 5, 0.0,
     {"beta_schedule": "linear", "prediction_type": "v_prediction", "timestep_spacing": "trailing",
      "use_karras_sigmas": True}, 0.8),
    ("euler_ancestral", "img2img_linear_v_trailing_s4_st075", 4, 0.0,
     {"beta_schedule": "linear", "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 0.75),
    ("euler_ancestral", "img2img_scaled_eps_trailing_s2_st05", 2, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "timestep_spacing": "trailing"}, 0.5),
    ("heun", "img2img_linear_eps_linspace_s5_st06", 5, 0.0,
     {"beta_schedule": "linear", "prediction_type": "epsilon", "timestep_spacing": "linspace"}, 0.6),
    ("heun", "img2img_scaled_v_trailing_s4_st05", 4, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 0.5),
    ("dpmpp_2m", "img2img_scaled_v_trailing_karras_s6_st05", 6, 0.0,
     {**SD, **DPMPP, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
      "timestep_spacing": "trailing", "use_karras_sigmas": True}, 0.5),
    ("dpmpp_2m", "img2img_linear_eps_linspace_s10_st07", 10, 0.0,
     {**DPMPP, "beta_schedule": "linear", "prediction_type": "epsilon", "timestep_spacing": "linspace"}, 0.7),
    ("lcm", "img2img_scaled_eps_orig50_s4_st05", 4, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "original_inference_steps": 50}, 0.5),
    ("lcm", "img2img_scaled_v_orig20_s2_st08", 2, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "original_inference_steps": 20}, 0.8),
    ("consistency", "img2img_default_s4_st05", 4, 0.0, {"num_train_timesteps": 40}, 0.5),
    ("consistency", "img2img_noclip_s3_st07", 3, 0.0, {"clip_denoised": False}, 0.7),
    ("flow_euler", "img2img_shift3_s6_st05", 6, 0.0, {"shift": 3.0}, 0.5),
    ("flow_euler", "img2img_default_s4_st075", 4, 0.0, {}, 0.75),
    ("flow_heun", "img2img_default_s4_st05", 4, 0.0, {}, 0.5),
    ("flow_heun", "img2img_shift3_s5_st08", 5, 0.0, {"shift": 3.0}, 0.8),
]


# Image-to-image from a given σ (`--init-sigma`): (sampler, short name, steps, eta, config, σ). The
# schedule is diffusers' Karras sigmas (`use_karras_sigmas`) from σ down to the smallest training
# σ: Euler takes them as its sigma_min / sigma_max keys; Heun and DPM-Solver++ read the same keys
# when they are registered in their config; Euler ancestral, which has no Karras option, runs on
# the sigmas and timesteps of that Euler schedule. The run starts at add_noise(init, noise, σ).
INIT_SIGMA = [
    ("euler", "init_sigma_scaled_eps_linspace_s4_sigma3", 4, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "timestep_spacing": "linspace"}, 3.0),
    ("euler", "init_sigma_linear_v_trailing_s2_sigma05", 2, 0.0,
     {"beta_schedule": "linear", "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 0.5),
    ("euler_ancestral", "init_sigma_scaled_eps_trailing_s3_sigma2", 3, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "timestep_spacing": "trailing"}, 2.0),
    ("heun", "init_sigma_scaled_eps_linspace_s3_sigma4", 3, 0.0,
     {**SD, "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "timestep_spacing": "linspace"}, 4.0),
    ("dpmpp_2m", "init_sigma_scaled_eps_linspace_s5_sigma6", 5, 0.0,
     {**SD, **DPMPP, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
      "timestep_spacing": "linspace"}, 6.0),
]


def dummy_model(x_in, t, dtype=torch.float32):
    """diffusers' test model: out = x_in * t / (t + 1), all in float32 (float64 for `wide` runs)."""
    t = torch.tensor(float(t), dtype=dtype)
    return x_in * t / (t + 1)


class _TorchWithTape:
    """Stands in for `torch` inside a scheduler module, with `randn_like` drawing through a tape."""

    def __init__(self, module, tape):
        self._module = module
        self._tape = tape

    def __getattr__(self, name):
        return self._tape.randn_like if name == "randn_like" else getattr(self._module, name)


class NoiseTape:
    """Wraps a scheduler module's `randn_tensor` and `torch.randn_like`: records what they return,
    or replays a recording. `randn_like` (FlowMatchEuler's stochastic sampling) draws from the
    global generator in diffusers; here it draws from `gen`, so the fixtures are reproducible."""

    def __init__(self, module, replay=None, gen=None):
        self.module = module
        self.original = getattr(module, "randn_tensor", None)  # Heun never draws noise
        self.draws = []
        self.replay = None if replay is None else list(replay)
        self.gen = gen
        self.saved_torch = None

    def randn_like(self, x):
        if self.replay is not None:
            return self(x.shape, dtype=x.dtype)
        out = torch.randn(x.shape, generator=self.gen, dtype=torch.float32)
        self.draws.append(out.detach().clone())
        return out.to(x.dtype)

    def __call__(self, shape, *args, **kwargs):
        if self.replay is not None:
            assert self.replay, "scheduler asked for more noise than was recorded"
            out = self.replay.pop(0).to(kwargs.get("dtype") or torch.float32)
            assert list(out.shape) == list(shape)
        else:
            out = self.original(shape, *args, **kwargs)
            assert out.dtype == torch.float32, out.dtype
        self.draws.append(out.detach().clone())
        return out

    def __enter__(self):
        if self.original is not None:
            self.module.randn_tensor = self
        self.saved_torch = self.module.torch
        self.module.torch = _TorchWithTape(self.saved_torch, self)
        return self

    def __exit__(self, *exc):
        if self.original is not None:
            self.module.randn_tensor = self.original
        self.module.torch = self.saved_torch
        return False


def jitter(x, gen):
    """x * (1 + u * 2^-23), u ~ U(-1, 1) per element: about one float32 rounding error."""
    if gen is None:
        return x
    u = torch.rand(x.shape, generator=gen, dtype=torch.float64) * 2 - 1
    return (x.double() * (1 + u * 2.0**-23)).to(x.dtype)


class _Widened:
    """Stands in for `torch` or `numpy` inside a scheduler module, with `float32` meaning float64."""

    def __init__(self, module, wide):
        self._module = module
        self._wide = wide

    def __getattr__(self, name):
        return self._wide if name == "float32" else getattr(self._module, name)


@contextmanager
def maybe_float64(module, wide):
    """With `wide`, runs the scheduler module in float64: every float32 it names becomes float64."""
    if not wide:
        yield
        return
    saved = module.torch, module.np
    module.torch, module.np = _Widened(torch, torch.float64), _Widened(np, np.float64)
    try:
        yield
    finally:
        module.torch, module.np = saved


def run_case(sampler, steps, eta, config, seed, replay=None, perturb=None, wide=False, strength=None,
             init_sigma=None):
    """Runs one case. `replay` feeds recorded step noise back in. Two ways to measure how far a
    correct port that rounds differently may land from the float32 reference: `perturb` (a
    torch.Generator) adds a float32 rounding error's worth of noise to the model input, the model
    output and each step's result; `wide` runs the whole case in float64 instead."""
    with maybe_float64(sys.modules[CLASSES[sampler].__module__], wide):
        return _run_case(sampler, steps, eta, config, seed, replay, perturb, wide, strength, init_sigma)


def karras_from(sched, sampler, config, steps, sigma):
    """Sets `sched` (made from `config`) to the `--init-sigma` schedule from `sigma`: see
    INIT_SIGMA."""
    ac = sched.alphas_cumprod
    lowest = float(((1 - ac[0]) / ac[0]) ** 0.5)
    keys = {"sigma_min": lowest, "sigma_max": sigma}
    if sampler in ("heun", "dpmpp_2m"):
        sched.register_to_config(use_karras_sigmas=True, **keys)
        sched.set_timesteps(steps)
        return sched
    euler = EulerDiscreteScheduler(**config, use_karras_sigmas=True, **keys)
    euler.set_timesteps(steps)
    if sampler == "euler":
        return euler
    sched.set_timesteps(steps)
    sched.sigmas, sched.timesteps = euler.sigmas.clone(), euler.timesteps.clone()
    return sched


def _run_case(sampler, steps, eta, config, seed, replay, perturb, wide, strength, init_sigma):
    dtype = torch.float64 if wide else torch.float32
    cls = CLASSES[sampler]
    config = dict(config)
    mu = config.pop("mu", None)
    sched = cls(**config)
    if init_sigma is not None:
        sched = karras_from(sched, sampler, config, steps, init_sigma)
    elif sampler == "lcm" and strength is not None:
        sched.set_timesteps(steps, strength=strength)
    elif sampler == "consistency":
        sched.set_timesteps(num_inference_steps=steps)
    elif mu is not None:
        sched.set_timesteps(steps, mu=mu)
    else:
        sched.set_timesteps(steps)
    timesteps = [float(t) for t in sched.timesteps]
    if sampler == "consistency":
        closest = min(abs(t + 1.0) for t in timesteps)
        assert closest > 0.5, f"a timestep is too close to -1 for the dummy model ({closest})"

    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
    step_gen = torch.Generator().manual_seed(seed + 1)
    if sampler in FLOW:
        assert not hasattr(sched, "init_noise_sigma") and not hasattr(sched, "scale_model_input")
        init_noise_sigma = 1.0
    else:
        init_noise_sigma = float(sched.init_noise_sigma)
    x = noise.to(dtype) * init_noise_sigma
    assert x.dtype == dtype
    timesteps_run, start, init = sched.timesteps, 0, None
    if init_sigma is not None:
        init = (torch.randn(SHAPE, generator=gen, dtype=torch.float32) * 0.5).to(dtype)
        sched.set_begin_index(0)
        x = sched.add_noise(init, noise.to(dtype), sched.timesteps[:1])
        assert abs(float(sched.sigmas[0]) - init_sigma) <= 1e-6 * init_sigma
    elif strength is not None:
        # The img2img pipelines' get_timesteps (LCM's set_timesteps took the strength above).
        init = (torch.randn(SHAPE, generator=gen, dtype=torch.float32) * 0.5).to(dtype)
        if sampler != "lcm":
            init_timestep = min(int(steps * strength), steps)
            start = max(steps - init_timestep, 0) * sched.order
        timesteps_run = sched.timesteps[start:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start)
        first = timesteps_run[:1]
        if sampler in FLOW:
            x = sched.scale_noise(init, first, noise.to(dtype))
        else:
            x = sched.add_noise(init, noise.to(dtype), first)
        assert x.dtype == dtype

    trajectory = []
    module = sys.modules[cls.__module__]
    with NoiseTape(module, replay, step_gen) as tape:
        for t in timesteps_run:
            x_in = jitter(x if sampler in FLOW else sched.scale_model_input(x, t), perturb)
            out = jitter(dummy_model(x_in, t, dtype), perturb)
            kwargs = {}
            if sampler == "ddim":
                kwargs["eta"] = eta
            if sampler not in SECOND_ORDER:
                kwargs["generator"] = step_gen
            x = jitter(sched.step(out, t, x, **kwargs).prev_sample, perturb)
            assert x.dtype == dtype, (sampler, x.dtype)
            assert torch.isfinite(x).all(), (sampler, "non-finite sample")
            trajectory.append(x.clone())
        if replay is not None:
            assert not tape.replay, "recorded noise left over on replay"
    return {
        "timesteps": timesteps,
        "init_noise_sigma": init_noise_sigma,
        "noise": noise,
        "step_noises": tape.draws,
        "trajectory": trajectory,
        "final": x,
        "img2img": None if init is None else {"strength": strength, "init_sigma": init_sigma, "start": start,
                                              "init": init},
    }


TOLERANCE = 1e-4


def rel_err(a, b):
    """The parity test's error measure: max|a - b| / max(max|b|, 1e-3)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / max(b.abs().max().item(), 1e-3)).item()


def f32_list(tensor):
    """Flat list of Python floats, each the shortest decimal that reads back as the same float32."""
    arr = tensor.detach().cpu().numpy().astype(np.float32).reshape(-1)
    assert np.isfinite(arr).all()
    return [float(str(v)) for v in arr]


def fixture(sampler, steps, eta, config, result):
    for v in config.values():
        assert v is not None
    extra = {}
    if result["img2img"] is not None:
        i = result["img2img"]
        extra["img2img"] = {"start": i["start"], "init": f32_list(i["init"])}
        for key in ("strength", "init_sigma"):
            if i[key] is not None:
                extra["img2img"][key] = i[key]
    return {
        "sampler": sampler,
        "steps": steps,
        "eta": float(eta),
        "config": config,
        "shape": SHAPE,
        "noise": f32_list(result["noise"]),
        "timesteps": result["timesteps"],
        "init_noise_sigma": result["init_noise_sigma"],
        "step_noises": [f32_list(n) for n in result["step_noises"]],
        "trajectory": [f32_list(x) for x in result["trajectory"]],
        "final": f32_list(result["final"]),
        **extra,
    }


def dumps(obj):
    # One key per line, each array on one line: small, and diffs stay readable.
    lines = ["{"]
    items = list(obj.items())
    for i, (k, v) in enumerate(items):
        comma = "," if i + 1 < len(items) else ""
        if isinstance(v, list) and v and isinstance(v[0], list):
            inner = ",\n  ".join(json.dumps(row, allow_nan=False) for row in v)
            lines.append(f"  {json.dumps(k)}: [\n  {inner}\n  ]{comma}")
        else:
            lines.append(f"  {json.dumps(k)}: {json.dumps(v, allow_nan=False, sort_keys=True)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(root, "tests", "fixtures", "samplers"))
    ap.add_argument("--check", action="store_true", help="compare against the files on disk instead of writing")
    ap.add_argument("--only", default="", metavar="PREFIX", help="only the cases whose name starts with PREFIX")
    args = ap.parse_args()

    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}, numpy {np.__version__}")
    if diffusers.__version__ != PINNED_DIFFUSERS or not torch.__version__.startswith(PINNED_TORCH):
        print(f"warning: the fixtures are pinned to diffusers {PINNED_DIFFUSERS} and torch {PINNED_TORCH}",
              file=sys.stderr)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    os.makedirs(args.out, exist_ok=True)
    names = set()
    stale = 0
    cases = [(*c, None, None) for c in CASES] + [(*c, None) for c in IMG2IMG] + [(*c[:5], None, c[5]) for c in INIT_SIGMA]
    for sampler, short, steps, eta, config, strength, init_sigma in cases:
        name = f"{sampler}__{short}"
        assert name not in names, name
        names.add(name)
        if not name.startswith(args.only):
            continue
        seed = zlib.crc32(name.encode()) % 2**31  # per case, stable when cases are added
        start = {"strength": strength, "init_sigma": init_sigma}
        result = run_case(sampler, steps, eta, config, seed, **start)
        # Replay the recorded draws through a fresh scheduler: the result must not change, which
        # shows the recording holds every draw, in the order the scheduler used them.
        again = run_case(sampler, steps, eta, config, seed, replay=result["step_noises"], **start)
        for a, b in zip(result["trajectory"], again["trajectory"]):
            assert torch.equal(a, b), f"{name}: replayed noise gives a different trajectory"
        # Conditioning, in the parity test's measure: how far is this float32 run from the same run
        # in float64, and how far does it move under rounding-sized perturbations? Both must stay
        # well below the test's tolerance (1e-4), or a correct port could fail on rounding alone.
        wide = run_case(sampler, steps, eta, config, seed, replay=result["step_noises"], wide=True, **start)
        assert wide["trajectory"][-1].dtype == torch.float64
        drift = max(rel_err(a, b) for a, b in zip(result["trajectory"], wide["trajectory"]))
        for trial in range(4):
            pgen = torch.Generator().manual_seed(seed * 31 + trial)
            pert = run_case(sampler, steps, eta, config, seed, replay=result["step_noises"], perturb=pgen,
                            **start)
            for a, b in zip(pert["trajectory"], result["trajectory"]):
                drift = max(drift, rel_err(a, b))
        assert drift < TOLERANCE / 10, f"{name}: ill-conditioned for the parity test (drift {drift:.3g})"
        text = dumps(fixture(sampler, steps, eta, config, result))
        path = os.path.join(args.out, name + ".json")
        final = result["final"]
        summary = (f"{name}: {len(result['timesteps'])} model calls, {len(result['step_noises'])} noise draws, "
                   f"max|final| {final.abs().max().item():.4g}, drift {drift:.2g}, {len(text)} bytes")
        if args.check:
            with open(path) as f:
                same = f.read() == text
            stale += not same
            print(("ok    " if same else "DIFFERS ") + summary)
        else:
            with open(path, "w") as f:
                f.write(text)
            print(summary)
    if not args.check:
        for f in sorted(os.listdir(args.out)):
            if f.endswith(".json") and f[:-5] not in names:
                print(f"note: {f} is not produced by this script", file=sys.stderr)
    if stale:
        sys.exit(f"{stale} fixture(s) differ from the committed ones")


if __name__ == "__main__":
    main()
