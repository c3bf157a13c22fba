#!/usr/bin/env python3
"""Writes the end-to-end fixtures in tests/fixtures/e2e/ that tests/e2e.rs checks the Rust
runtime against (no Python at test time).

Pinned versions (the committed fixtures were written with these; others may differ in the last
bits, which `--check` reports):
    torch       == 2.11.0
    onnxruntime == 1.32.0
    diffusers   == 0.36.0
    numpy       == 2.4.6

Two kinds of fixture:

1. The denoiser alone. One fixed input (`denoiser_sample.npy` [2,1,32,32] from a numpy seed,
   `denoiser_timestep.npy` float32 [999, 259], `denoiser_class_labels.npy` int64 [3, 10], the
   second being the null class) and, per shipped model, the PyTorch output of its checkpoint
   (`<model>_denoiser_out.npy`). onnxruntime on the shipped ONNX must agree with it to 1e-5
   before anything is written.

2. Whole sampling runs, the way a diffusers pipeline runs them: `pipeline_noise.npy`
   [2,1,32,32] (unit variance), a diffusers scheduler configured from the card's [scheduler]
   table, onnxruntime on the shipped ONNX as the model, and the standard loop

       x = noise * init_noise_sigma
       for t in timesteps:
           x_in = scale_model_input(x, t)
           out_c, out_u = model([x_in, x_in], t, [labels, null])   # one batch of 2N
           out = out_u + g * (out_c - out_u)                        # g == 1: one conditional call
           x = step(out, t, x).prev_sample

   Each case's final x is `<case>.npy`; `meta.json` lists the cases (model, sampler, steps,
   guidance, labels, config overrides, timesteps) for the Rust test.

   Before a case is written its sensitivity is measured: the same loop with per-image batch-1
   calls (what the Rust pipeline does) and with the PyTorch checkpoint as the model must land
   within a tenth of the test's tolerance (relative error 1e-4), so a correct port cannot fail
   on float rounding alone.

Usage:  python3 tools/gen_e2e_reference.py [--out tests/fixtures/e2e] [--check]
    --check  regenerates in memory and fails if a committed fixture differs by more than
             float32 rounding (it reports bit-exactness too).
"""
from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import sys
import tomllib

import numpy as np
import onnxruntime as ort
import torch

import diffusers
from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from train import load_weights  # noqa: E402

PINNED = {"torch": "2.11.0", "onnxruntime": "1.32.0", "diffusers": "0.36.0", "numpy": "2.4.6"}

MODELS = {
    "teacher": ("models/fmnist-teacher", "tools/checkpoints/teacher.pt"),
    "student": ("models/fmnist-student", "tools/checkpoints/student.pt"),
}

DENOISER_SEED = 20261128
NOISE_SEED = 7
DENOISER_TIMESTEPS = [999.0, 259.0]
DENOISER_LABELS = [3, 10]
PIPELINE_LABELS = [3, 7]

# What tests/e2e.rs allows, and what a case's sensitivity must stay under (a tenth of it).
TEST_REL_TOL = 1e-4
SENSITIVITY_LIMIT = TEST_REL_TOL / 10
# onnxruntime vs PyTorch on the denoiser fixture.
ORT_VS_TORCH_LIMIT = 1e-5

SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "lcm": LCMScheduler}

# (case name, model, sampler, steps, guidance, overrides of the card's [scheduler]).
CASES = [
    ("teacher_ddim_s4_g2", "teacher", "ddim", 4, 2.0, {}),
    ("teacher_euler_s6_g2", "teacher", "euler", 6, 2.0, {}),
    # linspace spacing gives fractional timesteps (999, 799.2, ...), the float-timestep path.
    ("teacher_euler_linspace_s6_g2", "teacher", "euler", 6, 2.0, {"timestep_spacing": "linspace"}),
    ("student_lcm_s1", "student", "lcm", 1, 1.0, {}),
]

# Image-to-image, as diffusers' img2img pipelines run it: the init (`img2img_init.npy`, the
# images of teacher_ddim_s4_g2) noised by `pipeline_noise.npy` with the scheduler's add_noise at
# the first timestep kept (the last int(steps * strength) steps; LCM sets its timesteps with the
# strength), then the loop from there. (case name, model, sampler, steps, guidance, overrides,
# strength).
IMG2IMG_CASES = [
    ("teacher_ddim_img2img_s8_st05_g2", "teacher", "ddim", 8, 2.0, {}, 0.5),
    ("teacher_euler_img2img_s6_st07_g2", "teacher", "euler", 6, 2.0, {}, 0.7),
    ("student_lcm_img2img_s1_st06", "student", "lcm", 1, 1.0, {}, 0.6),
]


def versions() -> dict:
    return {"torch": torch.__version__.split("+")[0], "onnxruntime": ort.__version__,
            "diffusers": diffusers.__version__, "numpy": np.__version__}


def check_versions():
    have = versions()
    for k, want in PINNED.items():
        flag = "" if have[k] == want else f"   (pinned {want}: outputs may differ in the last bits)"
        print(f"{k:12s} {have[k]}{flag}")


def read_card(model: str) -> dict:
    with open(os.path.join(ROOT, MODELS[model][0], "model.toml"), "rb") as f:
        return tomllib.load(f)


def scheduler_config(model: str, overrides: dict) -> dict:
    return {**read_card(model)["scheduler"], **overrides}


def make_scheduler(name: str, config: dict):
    """The diffusers scheduler built from the card's keys. Keys the class does not take (e.g.
    DDIM's clip_sample for Euler) are left out, as diffusers' from_config would; the Rust
    sampler ignores them too. Returns (scheduler, ignored keys)."""
    cls = SCHEDULERS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    ignored = sorted(set(config) - accepted)
    return cls(**{k: v for k, v in config.items() if k in accepted}), ignored


def ort_session(model: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    path = os.path.join(ROOT, MODELS[model][0], "denoiser.onnx")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def ort_model(sess):
    def run(x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        return sess.run(None, {"sample": x.astype(np.float32), "timestep": t.astype(np.float32),
                               "class_labels": y.astype(np.int64)})[0]
    return run


def torch_model(model: str):
    net, _ = load_weights(os.path.join(ROOT, MODELS[model][1]), "cpu")
    net.eval()

    @torch.no_grad()
    def run(x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        return net(torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(t.astype(np.float32)),
                   torch.from_numpy(y.astype(np.int64))).numpy()
    return run


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-3))


def sample_loop(model_fn, sched_name: str, config: dict, steps: int, guidance: float, noise: np.ndarray,
                labels: list[int], null: int, per_image: bool = False, init=None, strength=None):
    """diffusers' standard loop in float32. `per_image`: one batch-1 call per image and branch
    (what the Rust pipeline does) instead of one batch of 2N. With `init`: image-to-image at
    `strength`, as the img2img pipelines truncate the schedule and noise the init."""
    sched, _ = make_scheduler(sched_name, config)
    timesteps = None
    if init is None:
        sched.set_timesteps(steps)
        x = torch.from_numpy(noise.copy()) * sched.init_noise_sigma
        timesteps = sched.timesteps
    else:
        start = 0
        if sched_name == "lcm":
            sched.set_timesteps(steps, strength=strength)
        else:
            sched.set_timesteps(steps)
            start = max(steps - min(int(steps * strength), steps), 0) * sched.order
        timesteps = sched.timesteps[start:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start)
        x = sched.add_noise(torch.from_numpy(init.copy()), torch.from_numpy(noise.copy()), timesteps[:1])
    n = noise.shape[0]
    y = np.array([labels[i % len(labels)] for i in range(n)], np.int64)
    guided = guidance != 1.0
    gen = torch.Generator().manual_seed(0)  # never drawn from in the cases here; see main()

    def model(x_in: np.ndarray, t: float, labels: np.ndarray) -> np.ndarray:
        if per_image:
            return np.concatenate([model_fn(x_in[i:i + 1], np.full(1, t, np.float32), labels[i:i + 1])
                                   for i in range(x_in.shape[0])])
        return model_fn(x_in, np.full(x_in.shape[0], t, np.float32), labels)

    for t in timesteps:
        x_in = sched.scale_model_input(x, t).numpy()
        tf = float(t)
        if guided:
            both = model(np.concatenate([x_in, x_in]), tf, np.concatenate([y, np.full(n, null, np.int64)]))
            out_c, out_u = torch.from_numpy(both[:n]), torch.from_numpy(both[n:])
            out = out_u + guidance * (out_c - out_u)
        else:
            out = torch.from_numpy(model(x_in, tf, y))
        x = sched.step(out, t, x, generator=gen, return_dict=True).prev_sample
    return x.numpy().astype(np.float32), [float(t) for t in sched.timesteps], float(sched.init_noise_sigma)


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def build() -> dict[str, bytes]:
    """All fixture files, name -> bytes."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    files: dict[str, bytes] = {}
    meta: dict = {"generator": "tools/gen_e2e_reference.py", "versions": versions(),
                  "test_rel_tol": TEST_REL_TOL, "denoiser": {}, "cases": []}

    # 1. The denoiser alone.
    rng = np.random.default_rng(DENOISER_SEED)
    sample = rng.standard_normal((2, 1, 32, 32)).astype(np.float32)
    ts = np.array(DENOISER_TIMESTEPS, np.float32)
    ys = np.array(DENOISER_LABELS, np.int64)
    files["denoiser_sample.npy"] = npy_bytes(sample)
    files["denoiser_timestep.npy"] = npy_bytes(ts)
    files["denoiser_class_labels.npy"] = npy_bytes(ys)
    for model in MODELS:
        ref = torch_model(model)(sample, ts, ys)
        got = ort_model(ort_session(model))(sample, ts, ys)
        diff = float(np.abs(got - ref).max())
        print(f"denoiser {model}: |torch| max {np.abs(ref).max():.4f}, onnxruntime vs torch max abs diff {diff:.2e}")
        if diff > ORT_VS_TORCH_LIMIT:
            sys.exit(f"{model}: onnxruntime disagrees with PyTorch by {diff:.2e} > {ORT_VS_TORCH_LIMIT}")
        files[f"{model}_denoiser_out.npy"] = npy_bytes(ref.astype(np.float32))
        meta["denoiser"][model] = {"onnxruntime_vs_torch_max_abs": diff, "out_max_abs": float(np.abs(ref).max())}

    # 2. Whole sampling runs.
    noise = np.random.default_rng(NOISE_SEED).standard_normal((2, 1, 32, 32)).astype(np.float32)
    files["pipeline_noise.npy"] = npy_bytes(noise)
    sessions = {m: ort_model(ort_session(m)) for m in MODELS}
    torches = {m: torch_model(m) for m in MODELS}
    runs = [(*c, None) for c in CASES] + IMG2IMG_CASES
    for name, model, sched_name, steps, guidance, overrides, strength in runs:
        card = read_card(model)
        null = card["classes"]["null"]
        config = scheduler_config(model, overrides)
        _, ignored = make_scheduler(sched_name, config)
        args = (sched_name, config, steps, guidance, noise, PIPELINE_LABELS, null)
        extra = {} if strength is None else {"init": init, "strength": strength}
        ref, timesteps, sigma0 = sample_loop(sessions[model], *args, **extra)
        per_image, _, _ = sample_loop(sessions[model], *args, per_image=True, **extra)
        via_torch, _, _ = sample_loop(torches[model], *args, **extra)
        e_split, e_torch = rel_err(per_image, ref), rel_err(via_torch, ref)
        print(f"{name}: timesteps {[round(t, 3) for t in timesteps]}, init_noise_sigma {sigma0:.4g}, "
              f"|x| max {np.abs(ref).max():.3f}; batch-1 calls rel {e_split:.1e}, PyTorch model rel {e_torch:.1e}"
              + (f"; keys not taken by {SCHEDULERS[sched_name].__name__}: {ignored}" if ignored else ""))
        if not np.isfinite(ref).all():
            sys.exit(f"{name}: non-finite output")
        if max(e_split, e_torch) > SENSITIVITY_LIMIT:
            sys.exit(f"{name}: too sensitive to rounding ({max(e_split, e_torch):.2e} > {SENSITIVITY_LIMIT})")
        files[f"{name}.npy"] = npy_bytes(ref)
        if name == "teacher_ddim_s4_g2":
            init = ref
            files["img2img_init.npy"] = npy_bytes(init)
        meta["cases"].append({
            "name": name, "model": MODELS[model][0], "sampler": sched_name, "steps": steps,
            "guidance": guidance, "labels": PIPELINE_LABELS, "null": null,
            "scheduler_class": SCHEDULERS[sched_name].__name__, "scheduler_overrides": overrides,
            "ignored_keys": ignored, "timesteps": timesteps, "init_noise_sigma": sigma0,
            "sensitivity": {"batch1_calls_rel": e_split, "pytorch_model_rel": e_torch},
            **({} if strength is None else {"strength": strength, "init": "img2img_init.npy"}),
        })
    meta["noise_seed"], meta["denoiser_seed"] = NOISE_SEED, DENOISER_SEED
    files["meta.json"] = (json.dumps(meta, indent=1) + "\n").encode()
    return files


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "e2e"))
    p.add_argument("--check", action="store_true")
    a = p.parse_args()
    check_versions()
    files = build()
    total = sum(len(b) for b in files.values())
    if a.check:
        bad = 0
        for name, data in sorted(files.items()):
            path = os.path.join(a.out, name)
            if not os.path.exists(path):
                print(f"MISSING {name}")
                bad += 1
                continue
            with open(path, "rb") as f:
                old = f.read()
            if old == data:
                print(f"same    {name}")
            elif name.endswith(".npy"):
                x, y = np.load(io.BytesIO(old)), np.load(io.BytesIO(data))
                e = rel_err(y, x) if x.shape == y.shape and x.dtype == y.dtype else float("inf")
                ok = e <= 1e-6
                bad += not ok
                print(f"{'close  ' if ok else 'DIFFERS'} {name} (relative {e:.1e})")
            else:
                print(f"differs {name} (not compared: versions or measured sensitivities)")
        sys.exit(1 if bad else 0)
    os.makedirs(a.out, exist_ok=True)
    for name, data in files.items():
        tmp = os.path.join(a.out, name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(a.out, name))
    print(f"wrote {len(files)} files, {total} bytes, to {os.path.relpath(a.out, ROOT)}")


if __name__ == "__main__":
    main()
