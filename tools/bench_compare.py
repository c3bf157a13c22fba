"""edge-diffuse against onnxruntime, in one run on this machine: the same ONNX, inputs and thread
counts, each configuration in its own fresh process, and the ratios edge-diffuse / onnxruntime
(below 1.0: edge-diffuse is faster or smaller).

    cargo build --release
    python3 tools/make_cifar_unet.py tools/.runs/ddpm-cifar10-random     # 35.7 M-param model, once
    python3 tools/bench_compare.py [--runs 10] [--rounds 3] [--threads 1,2] [--json out.json]

Rounds: on a shared machine a step's median moves by 10-30 % between runs a minute apart, which
is as large as the differences measured. So every configuration is measured `--rounds` times,
the rounds interleaved (round 1 of every configuration and runtime, then round 2, ...) and the
runtime that goes first alternating, so that a disturbance lands on both runtimes and on the
guided and unguided steps alike. The table shows the median over rounds of each round's median,
and the range of the per-round ratios.

Also prints the MACs per denoiser call (tools/macs.py) and the GFLOP/s each runtime reaches,
against the f32 peak of the cores used (FMA units × SIMD lanes × 2 × clock; the clock is the
one /proc/cpuinfo reports, so a turbo clock makes the true peak higher).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from macs import count_macs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("EDGE_DIFFUSE_BIN", os.path.join(ROOT, "target", "release", "edge-diffuse"))
# (label, model dir, steps, guidance): every shipped model at its default, the teacher also
# unguided (to read the cost of guidance), and the 35.7 M-param architecture.
CONFIGS = [
    ("student lcm-2", "models/fmnist-student", 2, 1.0),
    ("teacher ddim-4 guided", "models/fmnist-teacher", 4, 2.0),
    ("teacher ddim-4 unguided", "models/fmnist-teacher", 4, 1.0),
    ("ddpm-cifar10 35.7M ddim-4", "tools/.runs/ddpm-cifar10-random", 4, 1.0),
]


def peak_gflops_per_core() -> tuple[float, str]:
    flags, mhz = set(), None
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("cpu MHz") and mhz is None:
                mhz = float(line.split(":", 1)[1])
    if "avx512f" in flags:
        lanes, what = 16, "AVX-512"
    elif "avx2" in flags and "fma" in flags:
        lanes, what = 8, "AVX2+FMA"
    else:
        lanes, what = 4, "SSE"
    # Two FMA pipes on every x86 core this project runs on (Zen, Skylake and later).
    return 2 * lanes * 2 * (mhz or 0) / 1e3, f"{what}, 2 FMA/cycle at {mhz:.0f} MHz"


def run_json(cmd) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


# The fields a table row reads; each is the median over rounds.
FIELDS = ("step_ms_median", "step_ms_p90", "image_s_median", "load_s", "peak_rss_mib")


def combine(rounds: list[dict]) -> dict:
    """One runtime's rounds of one configuration: the first round's record (CPU, threads, ...)
    with each of FIELDS replaced by its median over the rounds."""
    out = dict(rounds[0])
    for f in FIELDS:
        out[f] = statistics.median(r[f] for r in rounds)
    return out


def ratios(num: list[dict], den: list[dict], field: str = "step_ms_median") -> list[float]:
    """The per-round ratios num / den of `field` (rounds paired by index)."""
    if len(num) != len(den):
        raise ValueError(f"{len(num)} rounds against {len(den)}")
    return [a[field] / b[field] for a, b in zip(num, den)]


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=10, help="images per runtime and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every configuration")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--only", help="comma-separated config labels")
    p.add_argument("--json", help="write every measurement here")
    a = p.parse_args()
    if a.rounds < 1 or a.runs < 1:
        p.error("--rounds and --runs must be at least 1")
    peak_core, peak_what = peak_gflops_per_core()
    configs = []
    for label, model, steps, g in CONFIGS:
        if a.only and label not in a.only.split(","):
            continue
        if not os.path.exists(os.path.join(ROOT, model, "model.toml")):
            print(f"skip {label}: {model} missing (tools/make_cifar_unet.py makes it)", file=sys.stderr)
            continue
        for threads in [int(t) for t in a.threads.split(",")]:
            configs.append((label, model, steps, g, threads))
    measured = {(c[0], c[4]): {"edge_diffuse": [], "onnxruntime": []} for c in configs}
    for rnd in range(a.rounds):
        for label, model, steps, g, threads in configs:
            common = ["--model", model, "--steps", str(steps), "--guidance", str(g), "--threads", str(threads),
                      "--runs", str(a.runs)]
            cmds = {"edge_diffuse": [BIN, "bench", *common, "--json"],
                    "onnxruntime": [sys.executable, os.path.join(ROOT, "tools", "bench_ort.py"), *common]}
            order = ("edge_diffuse", "onnxruntime") if rnd % 2 == 0 else ("onnxruntime", "edge_diffuse")
            for who in order:
                measured[(label, threads)][who].append(run_json(cmds[who]))
            print(f"round {rnd + 1}/{a.rounds}: {label} threads={threads}", file=sys.stderr, flush=True)

    results = []
    for label, model, steps, g, threads in configs:
        m = measured[(label, threads)]
        macs = count_macs(os.path.join(ROOT, model, "denoiser.onnx"))["macs"]
        calls = 2 if g != 1.0 else 1
        row = dict(label=label, threads=threads, macs=macs, calls_per_step=calls,
                   edge_diffuse=combine(m["edge_diffuse"]), onnxruntime=combine(m["onnxruntime"]),
                   step_ratio_rounds=ratios(m["edge_diffuse"], m["onnxruntime"]), rounds=m)
        for who in ("edge_diffuse", "onnxruntime"):
            row[who]["gflops"] = 2 * macs * calls / (row[who]["step_ms_median"] / 1e3) / 1e9
        results.append(row)

    print(f"CPU: {results[0]['edge_diffuse']['cpu'] if results else '?'}; f32 peak {peak_core:.0f} GFLOP/s per core "
          f"({peak_what}); {a.rounds} interleaved round(s) of {a.runs} images per runtime; every figure is the "
          f"median over rounds of a round's median; ratio = edge-diffuse / onnxruntime, and its range over "
          f"the rounds\n")
    print("| model | threads | MACs/call | step ms (ed / ort) | ratio | ratio per round | image ms (ed / ort) "
          "| ratio | load s (ed / ort) | peak RSS MiB (ed / ort) | GFLOP/s ed / ort (% of peak) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ed, ort = r["edge_diffuse"], r["onnxruntime"]
        peak = peak_core * r["threads"]
        print(f"| {r['label']} | {r['threads']} | {r['macs'] / 1e6:.0f} M | {ed['step_ms_median']:.1f} / "
              f"{ort['step_ms_median']:.1f} | {ed['step_ms_median'] / ort['step_ms_median']:.2f} | "
              f"{spread(r['step_ratio_rounds'])} | "
              f"{ed['image_s_median'] * 1e3:.0f} / {ort['image_s_median'] * 1e3:.0f} | "
              f"{ed['image_s_median'] / ort['image_s_median']:.2f} | {ed['load_s']:.2f} / {ort['load_s']:.2f} | "
              f"{ed['peak_rss_mib']:.0f} / {ort['peak_rss_mib']:.0f} | {ed['gflops']:.0f} / {ort['gflops']:.0f} "
              f"({100 * ed['gflops'] / peak:.0f}% / {100 * ort['gflops'] / peak:.0f}%) |")
    guided = {r["threads"]: r for r in results if r["label"] == "teacher ddim-4 guided"}
    for r in results:
        if r["label"] == "teacher ddim-4 unguided" and r["threads"] in guided:
            g = guided[r["threads"]]
            parts = []
            for who, name in (("edge_diffuse", "edge-diffuse"), ("onnxruntime", "onnxruntime")):
                per_round = ratios(g["rounds"][who], r["rounds"][who])
                parts.append(f"{name} {statistics.median(per_round):.2f} (rounds {spread(per_round)})")
            print(f"\nguided / unguided step, {r['threads']} thread(s): " + ", ".join(parts))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
