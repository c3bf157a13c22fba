"""edge-diffuse against onnxruntime on an ONNX Stable Diffusion folder, stage by stage: text
encoder, one UNet step, VAE decode; load time and peak memory. The same files and thread counts,
in one run on this machine.

    cargo build --release
    python3 tools/make_sd_pipeline.py --size full --out target/sd-turbo
    python3 tools/bench_sd.py --model target/sd-turbo [--threads 1,2] [--rounds 2] [--runs 2]

edge-diffuse: `edge-diffuse bench --json --steps 1 --guidance 0` (SD-Turbo's 1 step without
guidance, at the folder's size), which reports the median of `--runs` images after a warm-up
image: the text encoder (each run's prompt differs, so each is encoded), the UNet step, the
decoder, the load to a runnable pipeline and the process's peak RSS.

onnxruntime: the three stages' sessions in a child process (so its peak RSS is its own), created
with that many intra-op threads; load is the sessions' creation. Like edge-diffuse it runs image
by image, each stage in turn (text encoder, UNet step, decoder), one warm-up image and then
`--runs` images, and keeps each stage's median: both runtimes time a stage after the same stages
ran before it, with the caches in the same state. The UNet gets the inputs edge-diffuse's step
gives it (timestep 999, batch 1), and the decoder the UNet's output.

Before the rounds, the folder's plan files are removed and edge-diffuse loads once (one image):
that first load writes them, and its load time and peak RSS are reported apart ("first load").
Every later load maps them, as on a device after its first start.

Rounds interleave the two runtimes, and which goes first alternates, so a disturbance of a shared
machine lands on both. The table shows each figure's median over rounds and the ratio
edge-diffuse / onnxruntime (below 1, edge-diffuse is faster or smaller).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("EDGE_DIFFUSE_BIN", os.path.join(ROOT, "target", "release", "edge-diffuse"))


def ours(model, threads, runs):
    out = subprocess.run([BIN, "bench", "--model", model, "--steps", "1", "--guidance", "0", "--threads",
                          str(threads), "--runs", str(runs), "--json"], check=True, capture_output=True, text=True)
    r = json.loads(out.stdout)
    return dict(load_s=r["load_s"], text_ms=r["text_encoder_ms_median"], unet_ms=r["step_ms_median"],
                vae_ms=r["decoder_ms_median"], rss_mib=r["peak_rss_mib"])


def theirs_child(model, threads, runs):
    """Runs in a child process: prints the stage figures as JSON."""
    import numpy as np
    import onnxruntime as ort

    def session(part):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        return ort.InferenceSession(os.path.join(model, part, "model.onnx"), opts,
                                    providers=["CPUExecutionProvider"])

    t0 = time.perf_counter()
    text, unet, vae = session("text_encoder"), session("unet"), session("vae_decoder")
    load = time.perf_counter() - t0
    with open(os.path.join(model, "unet", "config.json")) as f:
        cfg = json.load(f)
    hw = cfg.get("sample_size", 64)
    ids_type = {"tensor(int32)": np.int32, "tensor(int64)": np.int64}[text.get_inputs()[0].type]
    ids = np.full((1, 77), 49407, ids_type)
    ids[0, :6] = [49406, 320, 1125, 539, 320, 49407][:6]
    t_type = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
              "tensor(double)": np.float64}[unet.get_inputs()[1].type]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, hw, hw)).astype(np.float32)

    def timed(f):
        t = time.perf_counter()
        out = f()
        return out, (time.perf_counter() - t) * 1e3

    times = {"text_ms": [], "unet_ms": [], "vae_ms": []}
    for image in range(runs + 1):
        ctx, text_ms = timed(lambda: text.run(None, {text.get_inputs()[0].name: ids})[0])
        feeds = {"sample": x, "timestep": np.array([999], t_type), "encoder_hidden_states": ctx}
        eps, unet_ms = timed(lambda: unet.run(None, feeds)[0])
        _, vae_ms = timed(lambda: vae.run(None, {vae.get_inputs()[0].name: (x - eps).astype(np.float32)}))
        if image > 0:
            for key, ms in [("text_ms", text_ms), ("unet_ms", unet_ms), ("vae_ms", vae_ms)]:
                times[key].append(ms)
    medians = {key: statistics.median(v) for key, v in times.items()}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dict(load_s=load, rss_mib=rss, **medians)))


def theirs(model, threads, runs):
    out = subprocess.run([sys.executable, __file__, "--child", "--model", model, "--threads", str(threads),
                          "--runs", str(runs)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


KEYS = [("text_ms", "text encoder ms"), ("unet_ms", "UNet step ms"), ("vae_ms", "VAE decode ms"),
        ("load_s", "load s"), ("rss_mib", "peak RSS MiB")]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        theirs_child(a.model, int(a.threads), a.runs)
        return
    for plan in glob.glob(os.path.join(a.model, "*", "*.edplan")):
        os.remove(plan)
    thread_counts = [int(t) for t in a.threads.split(",")]
    first = ours(a.model, thread_counts[0], 1)
    print(f"first load, threads {thread_counts[0]}: {json.dumps(first)}", file=sys.stderr, flush=True)
    results = {}
    for threads in thread_counts:
        rows = {"ours": [], "ort": []}
        for r in range(a.rounds):
            order = [("ours", ours), ("ort", theirs)]
            if r % 2:
                order.reverse()
            for name, f in order:
                got = f(a.model, threads, a.runs)
                rows[name].append(got)
                print(f"threads {threads} round {r + 1} {name}: {json.dumps(got)}", file=sys.stderr, flush=True)
        results[threads] = rows
    print(f"{'stage':<18}{'threads':>8}{'edge-diffuse':>14}{'onnxruntime':>14}{'ratio':>8}")
    for threads, rows in results.items():
        for key, label in KEYS:
            ed = statistics.median(x[key] for x in rows["ours"])
            ort_ = statistics.median(x[key] for x in rows["ort"])
            print(f"{label:<18}{threads:>8}{ed:>14.1f}{ort_:>14.1f}{ed / ort_:>8.2f}")
    rows = results[thread_counts[0]]
    for key, label in [("load_s", "first load s"), ("rss_mib", "first peak RSS MiB")]:
        ort_ = statistics.median(x[key] for x in rows["ort"])
        print(f"{label:<18}{thread_counts[0]:>8}{first[key]:>14.1f}{ort_:>14.1f}{first[key] / ort_:>8.2f}")


if __name__ == "__main__":
    main()
