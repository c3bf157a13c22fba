"""The onnxruntime side of `edge-diffuse bench`: the same ONNX file, the same inputs, the same
thread count, the same JSON fields, so that tools/bench_compare.py can print ratios.

    python3 tools/bench_ort.py --model models/fmnist-teacher --threads 1 --runs 10 [--steps N] [--guidance G]

A step is what the runtime does per step: one denoiser call at batch 1, or two (conditional and
null class) when guidance is on, then the guidance mix and a DDIM-sized update in numpy (a handful
of elementwise passes over one sample, as cheap as the Rust sampler). Load time is session
creation with full graph optimisation. Peak RSS is the whole Python process (interpreter, numpy,
onnxruntime), read from the OS like the Rust side.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
import tomllib

import numpy as np
import onnxruntime as ort


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") or line.startswith("Model"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory holding model.toml")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    a = p.parse_args()
    with open(os.path.join(a.model, "model.toml"), "rb") as fh:
        card = tomllib.load(fh)
    defaults = card.get("defaults", {})
    steps = a.steps or defaults.get("steps", 4)
    guidance = a.guidance if a.guidance is not None else defaults.get("guidance", 1.0)
    names = card["model"]["inputs"]
    img = card["image"]
    classes = card.get("classes")
    guided = guidance != 1.0 and classes is not None and classes.get("null") is not None

    t0 = time.perf_counter()
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(os.path.join(a.model, card["model"].get("onnx", "model.onnx")), so,
                                providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    ts_in = next(i for i in sess.get_inputs() if i.name == names["timestep"])
    ts_dtype = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
                "tensor(int32)": np.int32}[ts_in.type]
    ts_shape = [1] * len(ts_in.shape)

    def call(x, t, label):
        feeds = {names["sample"]: x, names["timestep"]: np.full(ts_shape, t, ts_dtype)}
        if "class_labels" in names:
            feeds[names["class_labels"]] = np.array([label], np.int64)
        return sess.run(None, feeds)[0]

    shape = (1, img["channels"], img["height"], img["width"])
    first_step_ms, step_ms, image_s = None, [], []
    for run in range(a.runs + 1):
        x = np.random.default_rng(run).standard_normal(shape, dtype=np.float32)
        t_img = time.perf_counter()
        times = []
        for i, t in enumerate(np.linspace(999, 0, steps).round()):
            ts = time.perf_counter()
            out = call(x, t, 0)
            if guided:
                out_u = call(x, t, classes["null"])
                out = out_u + guidance * (out - out_u)
            x0 = 0.9 * x - 0.1 * out  # stand-in of a DDIM update: same passes over the sample
            x = (0.95 * x0 + 0.05 * out).astype(np.float32)
            times.append((time.perf_counter() - ts) * 1e3)
        if run == 0:
            first_step_ms = times[0]
        else:
            step_ms += times
            image_s.append(time.perf_counter() - t_img)
    per_image = float(np.median(image_s))
    print(json.dumps({
        "runtime": f"onnxruntime {ort.__version__}",
        "model": card["model"]["name"],
        "steps": steps,
        "guidance": guidance,
        "threads": a.threads,
        "cpu": cpu_model(),
        "load_s": load_s,
        "first_step_ms": first_step_ms,
        "step_ms_median": float(np.percentile(step_ms, 50)),
        "step_ms_p90": float(np.percentile(step_ms, 90)),
        "image_s_median": per_image,
        "images_per_s": 1.0 / per_image,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "runs": a.runs,
    }))


if __name__ == "__main__":
    main()
