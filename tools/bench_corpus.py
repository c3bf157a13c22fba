"""edge-diffuse against onnxruntime on the export corpus (tests/fixtures/corpus/): time per model
call and load time, the same ONNX file and thread count, in one run on this machine.

    cargo build --release
    python3 tools/bench_corpus.py [--runs 20] [--rounds 3] [--threads 1,2] [--only NAME ...]
    python3 tools/make_corpus.py --size bench && python3 tools/bench_corpus.py --corpus target/corpus-bench --runs 5

For each model that has a card: edge-diffuse's `profile` gives the mean time of `--runs` untimed
calls at batch 1 after a warm-up (the plan `sample` runs), and `info` the load time to a runnable
plan; onnxruntime runs the corpus's reference inputs (the first image) in a session with that
many intra-op threads, and its load time is the session's creation. edge-diffuse's load is
given twice: the first (the plan file removed before it, so this load writes it) and the next
(which maps it). Rounds are interleaved and
the runtime that goes first alternates, so that a disturbance of a shared machine lands on both.
The table shows the median over rounds and the range of the per-round ratios (edge-diffuse /
onnxruntime: below 1, edge-diffuse is faster).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import statistics
import subprocess
import time

import numpy as np
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("EDGE_DIFFUSE_BIN", os.path.join(ROOT, "target", "release", "edge-diffuse"))
CORPUS = os.path.join(ROOT, "tests", "fixtures", "corpus")


def corpus_models(only):
    names = sorted(d for d in os.listdir(CORPUS) if os.path.isfile(os.path.join(CORPUS, d, "model.toml")))
    return [n for n in names if not only or n in only]


def ours(name, threads, runs):
    """(ms per call, load s, first load s) from `edge-diffuse profile` and `info`: the first
    load is the one that writes the plan file (removed before it), the load the next one."""
    folder = os.path.join(CORPUS, name)

    def load():
        info = subprocess.run([BIN, "info", "--model", folder], check=True, capture_output=True, text=True).stdout
        return float(re.search(r"^load\s+([0-9.]+) s", info, re.M).group(1))

    for plan in glob.glob(os.path.join(folder, "*.edplan")):
        os.remove(plan)
    first = load()
    warm = load()
    out = subprocess.run([BIN, "profile", "--model", folder, "--runs", str(runs), "--threads", str(threads)],
                         check=True, capture_output=True, text=True).stdout
    call = float(re.search(r"untimed call ([0-9.]+) ms", out).group(1))
    return call, warm, first


def loads(models, rounds):
    """Load times alone, interleaved: edge-diffuse's load with a plan file (`info`, after one load
    that writes it) against onnxruntime's session creation at 1 thread; medians per model."""
    times = {}
    for name in models:
        folder = os.path.join(CORPUS, name)
        for plan in glob.glob(os.path.join(folder, "*.edplan")):
            os.remove(plan)
        subprocess.run([BIN, "info", "--model", folder], check=True, capture_output=True)
    for r in range(rounds):
        for name in models:
            folder = os.path.join(CORPUS, name)
            info = subprocess.run([BIN, "info", "--model", folder], check=True, capture_output=True, text=True).stdout
            times.setdefault((name, "ed"), []).append(float(re.search(r"^load\s+([0-9.]+) s", info, re.M).group(1)))
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            t0 = time.perf_counter()
            ort.InferenceSession(os.path.join(folder, "model.onnx"), opts, providers=["CPUExecutionProvider"])
            times.setdefault((name, "ort"), []).append(time.perf_counter() - t0)
    print(f"{'model':22s} load ms (ed / ort)  ratio  ed per round")
    for name in models:
        ed, ox = statistics.median(times[(name, "ed")]), statistics.median(times[(name, "ort")])
        spread = f"{min(times[(name, 'ed')]) * 1e3:.0f}-{max(times[(name, 'ed')]) * 1e3:.0f}"
        print(f"{name:22s} {ed * 1e3:6.1f} / {ox * 1e3:6.1f}  {ed / ox:5.2f}  {spread}")


def theirs(name, threads, runs):
    """(ms per call, session creation s) with onnxruntime on the first reference image."""
    folder = os.path.join(CORPUS, name)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    t0 = time.perf_counter()
    session = ort.InferenceSession(os.path.join(folder, "model.onnx"), opts, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - t0
    feeds = {}
    for path in sorted(glob.glob(os.path.join(folder, "input_*.npy"))):
        input_name = os.path.basename(path)[:-4].split("_", 2)[2]
        value = np.load(path)
        feeds[input_name] = value[:1] if value.ndim > 0 else value
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.mean(times), load


def main():
    global CORPUS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--only", nargs="*")
    p.add_argument("--corpus", default=CORPUS, help="the corpus folder (default: the test fixtures)")
    p.add_argument("--loads", action="store_true", help="time loads alone (--rounds of them), not calls")
    a = p.parse_args()
    CORPUS = a.corpus
    if a.loads:
        loads(corpus_models(a.only), a.rounds)
        return
    threads = [int(t) for t in a.threads.split(",")]
    models = corpus_models(a.only)
    results = {}
    for r in range(a.rounds):
        for name in models:
            for t in threads:
                order = [("ed", ours), ("ort", theirs)]
                if r % 2:
                    order.reverse()
                for label, fn in order:
                    results.setdefault((name, t, label), []).append(fn(name, t, a.runs))
    print(f"{'model':22s} thr  call ms (ed / ort)   ratio  per round    load s (ed / ort)  ratio  first load s")
    for name in models:
        for t in threads:
            ed, ox = results[(name, t, "ed")], results[(name, t, "ort")]
            ratios = [e[0] / o[0] for e, o in zip(ed, ox)]
            call_ed, call_ort = statistics.median(e[0] for e in ed), statistics.median(o[0] for o in ox)
            load_ed, load_ort = statistics.median(e[1] for e in ed), statistics.median(o[1] for o in ox)
            first = statistics.median(e[2] for e in ed)
            print(f"{name:22s} {t:3d}  {call_ed:8.3f} / {call_ort:8.3f}  {statistics.median(ratios):5.2f}"
                  f"  {min(ratios):.2f}-{max(ratios):.2f}  {load_ed:6.3f} / {load_ort:6.3f}   {load_ed / load_ort:5.2f}"
                  f"  {first:6.3f}")


if __name__ == "__main__":
    main()
