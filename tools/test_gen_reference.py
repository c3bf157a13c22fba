"""The flow-matching parts of tools/gen_reference.py: mu, the taped randn_like, the unscaled loop.

    python3 -m pytest tools -q
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_reference as gr  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402


def test_mu_goes_to_set_timesteps_not_the_constructor():
    config = {"use_dynamic_shifting": True, "time_shift_type": "linear", "mu": 2.0}
    result = gr.run_case("flow_euler", 3, 0.0, config, seed=1)
    want = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    want.set_timesteps(3, mu=2.0)
    assert result["timesteps"] == [float(t) for t in want.timesteps]
    assert config["mu"] == 2.0, "run_case must not consume the caller's config"


def test_flow_loop_starts_from_plain_noise():
    result = gr.run_case("flow_heun", 2, 0.0, {"shift": 3.0}, seed=2)
    assert result["init_noise_sigma"] == 1.0
    assert len(result["timesteps"]) == 3
    assert result["step_noises"] == []


def test_stochastic_draws_are_taped_and_replay_exactly():
    config = {"shift": 3.0, "stochastic_sampling": True}
    first = gr.run_case("flow_euler", 3, 0.0, config, seed=3)
    assert len(first["step_noises"]) == 3
    again = gr.run_case("flow_euler", 3, 0.0, config, seed=3, replay=first["step_noises"])
    for a, b in zip(first["trajectory"], again["trajectory"]):
        assert torch.equal(a, b)
    module = sys.modules[FlowMatchEulerDiscreteScheduler.__module__]
    assert module.torch is torch, "the tape must give the module its torch back"
