"""The shipped ONNX files against their PyTorch checkpoints, and the cards' [scheduler] tables
against diffusers.

    python3 -m pytest tools -q
"""
from __future__ import annotations

import logging
import os
import sys
import tomllib

import numpy as np
import onnxruntime as ort
import pytest
import torch

from diffusers import DDIMScheduler, LCMScheduler

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from train import cosine_alphas_cumprod, load_weights  # noqa: E402

MODELS = {
    "teacher": ("models/fmnist-teacher", "tools/checkpoints/teacher.pt", DDIMScheduler),
    "student": ("models/fmnist-student", "tools/checkpoints/student.pt", LCMScheduler),
}
TOL = 1e-4
NULL = 10


def card(model: str) -> dict:
    with open(os.path.join(ROOT, MODELS[model][0], "model.toml"), "rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request):
    """(model name, PyTorch module, onnxruntime session)."""
    model = request.param
    net, _ = load_weights(os.path.join(ROOT, MODELS[model][1]), "cpu")
    net.eval()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(os.path.join(ROOT, MODELS[model][0], "denoiser.onnx"), opts,
                                providers=["CPUExecutionProvider"])
    return model, net, sess


# (batch, timesteps, labels): batch 1 and 2, the null class, fractional and extreme timesteps.
INPUTS = [
    (1, [999.0], [3]),
    (1, [0.0], [NULL]),
    (1, [417.25], [9]),
    (2, [999.0, 259.0], [3, NULL]),
    (2, [12.5, 640.0], [NULL, 0]),
    (3, [500.0, 500.0, 1.0], [1, 7, NULL]),
]


@pytest.mark.parametrize("batch,timesteps,labels", INPUTS)
def test_onnx_matches_pytorch(pair, batch, timesteps, labels):
    model, net, sess = pair
    rng = np.random.default_rng(1000 * batch + int(timesteps[0]))
    x = rng.standard_normal((batch, 1, 32, 32)).astype(np.float32)
    t = np.array(timesteps, np.float32)
    y = np.array(labels, np.int64)
    with torch.no_grad():
        ref = net(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    got = sess.run(None, {"sample": x, "timestep": t, "class_labels": y})[0]
    assert got.shape == ref.shape == (batch, 1, 32, 32)
    assert np.isfinite(got).all()
    assert np.abs(ref).max() > 0.1, "a degenerate output would make the comparison vacuous"
    diff = float(np.abs(got - ref).max())
    assert diff <= TOL, f"{model}: onnxruntime vs PyTorch max abs diff {diff:.3e} > {TOL}"


def test_onnx_depends_on_every_input(pair):
    """The export kept the timestep and the class (a traced constant would pass the test above
    only for the export's example values)."""
    _, _, sess = pair
    x = np.random.default_rng(0).standard_normal((1, 1, 32, 32)).astype(np.float32)

    def run(t, y):
        return sess.run(None, {"sample": x, "timestep": np.array([t], np.float32),
                               "class_labels": np.array([y], np.int64)})[0]
    base = run(500.0, 3)
    assert np.abs(run(100.0, 3) - base).max() > 1e-3
    assert np.abs(run(500.0, NULL) - base).max() > 1e-3


def test_onnx_interface(pair):
    model, _, sess = pair
    inputs = {i.name: i for i in sess.get_inputs()}
    names = card(model)["model"]["inputs"]
    assert set(inputs) == {names["sample"], names["timestep"], names["class_labels"]}
    assert inputs["sample"].type == "tensor(float)"
    assert inputs["timestep"].type == "tensor(float)"
    assert inputs["class_labels"].type == "tensor(int64)"
    assert inputs["sample"].shape[1:] == [1, 32, 32]
    assert len(sess.get_outputs()) == 1


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def diffusers_warnings():
    """Warnings logged by diffusers (its root logger does not propagate, so caplog misses them)."""
    handler = _Collect()
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_card_scheduler_keys_accepted(model, diffusers_warnings):
    cls = MODELS[model][2]
    cfg = card(model)["scheduler"]
    direct = cls(**cfg)  # a key the class does not take is a TypeError here
    via_config = cls.from_config(cfg)  # ... and a logged warning here
    assert diffusers_warnings == [], f"{cls.__name__}: {diffusers_warnings}"
    for k, v in cfg.items():
        assert direct.config[k] == v, f"{k}: card {v!r}, {cls.__name__} {direct.config[k]!r}"
        assert via_config.config[k] == v


def test_unexpected_key_is_noticed(diffusers_warnings):
    """The check above can fail: a key no scheduler takes is noticed both ways."""
    cfg = {**card("teacher")["scheduler"], "not_a_scheduler_key": 1}
    with pytest.raises(TypeError):
        DDIMScheduler(**cfg)
    DDIMScheduler.from_config(cfg)
    assert any("not_a_scheduler_key" in m for m in diffusers_warnings)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_card_schedule_is_the_training_schedule(model):
    cls = MODELS[model][2]
    sched = cls(**card(model)["scheduler"])
    want = cosine_alphas_cumprod(sched.config.num_train_timesteps)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), want.numpy(), rtol=1e-6, atol=0)
    assert sched.config.prediction_type == "v_prediction"
