"""Quality report of the shipped models, measured on what ships: samples come from the Rust
runtime (`edge-diffuse sample --save-tensor`), features and predictions from the evaluation
classifier (tools/checkpoints/classifier.pt, trained by `train.py classifier`).

    cargo build --release
    python3 tools/eval_quality.py run                 # all rows; resumable, chunk by chunk
    python3 tools/eval_quality.py run --rows "student LCM 2,teacher DDIM 50"
    python3 tools/eval_quality.py report              # the Markdown table from what is done
    python3 tools/eval_quality.py grids               # README grids (rows = classes)

Per row: FID-proxy (Fréchet distance between the classifier's 128-d penultimate features of the
samples and of the 10 000 test images), class accuracy of class-conditional samples (labels
cycled over the 10 classes), the smallest class share among unconditional (null-class) samples,
and images/s of the runtime at 1 thread.

Samples are made in chunks of --chunk images (chunk k uses seed 1000+k, unconditional chunk k
seed 5000+k). After each chunk only sufficient statistics are kept (feature sums and sums of
outer products, correct counts, class counts, seconds) in tools/eval/<row>.npz, small enough to
commit, so a run that stops resumes at the next chunk, in another session or on another machine.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fmnist  # noqa: E402
from train import Classifier  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# EDGE_DIFFUSE_BIN: a copy of the binary, so that rebuilding target/ during a long run does not swap it.
BIN = os.environ.get("EDGE_DIFFUSE_BIN", os.path.join(ROOT, "target", "release", "edge-diffuse"))
STATE = os.path.join(ROOT, "tools", "eval")
FEAT = 128
ROWS = [  # (label, model, sampler, steps, guidance)
    ("teacher DDIM 50", "fmnist-teacher", "ddim", 50, 2.0),
    ("teacher DDIM 20", "fmnist-teacher", "ddim", 20, 2.0),
    ("teacher DDIM 10", "fmnist-teacher", "ddim", 10, 2.0),
    ("teacher DDIM 4", "fmnist-teacher", "ddim", 4, 2.0),
    ("teacher DDIM 2", "fmnist-teacher", "ddim", 2, 2.0),
    ("teacher DDIM 1", "fmnist-teacher", "ddim", 1, 2.0),
    ("student LCM 1", "fmnist-student", "lcm", 1, 1.0),
    ("student LCM 2", "fmnist-student", "lcm", 2, 1.0),
    ("student LCM 4", "fmnist-student", "lcm", 4, 1.0),
]


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def load_classifier():
    ck = torch.load(os.path.join(ROOT, "tools", "checkpoints", "classifier.pt"), map_location="cpu", weights_only=False)
    model = Classifier()
    model.load_state_dict(ck["model"])
    model.eval()
    return model, ck.get("test_accuracy")


@torch.no_grad()
def features_and_preds(model, x: np.ndarray):
    feats, preds = [], []
    for i in range(0, x.shape[0], 500):
        xb = torch.from_numpy(np.clip(x[i:i + 500], -1, 1).astype(np.float32))
        f = model.features(xb)
        feats.append(f.numpy().astype(np.float64))
        preds.append(model.head(f).argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


def frechet_from_moments(m1, c1, m2, c2) -> float:
    # tr sqrt(C1 C2) through the symmetric form sqrt(C1) C2 sqrt(C1).
    w, v = np.linalg.eigh(c1)
    s1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(s1 @ c2 @ s1)
    return float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    return frechet_from_moments(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))


def moments_from_sums(n, s1, s2):
    """Mean and unbiased covariance from the sums of x and of x xᵀ (what the state keeps)."""
    m = s1 / n
    return m, (s2 - n * np.outer(m, m)) / (n - 1)


def empty_state():
    return dict(cond_done=np.zeros(0, np.int64), n=np.int64(0), sum_f=np.zeros(FEAT), sum_ff=np.zeros((FEAT, FEAT)),
                confusion=np.zeros((10, 10), np.int64), cond_secs=np.float64(0), uncond_done=np.zeros(0, np.int64),
                uncond_counts=np.zeros(10, np.int64), uncond_secs=np.float64(0))


def load_state(label):
    path = os.path.join(STATE, slug(label) + ".npz")
    if not os.path.exists(path):
        return empty_state()
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def save_state(label, st):
    os.makedirs(STATE, exist_ok=True)
    path = os.path.join(STATE, slug(label) + ".npz")
    tmp = path + ".tmp.npz"
    np.savez(tmp, **st)
    os.replace(tmp, path)


def run_runtime(model, sampler, steps, guidance, n, classes, seed, out_npy, threads=1):
    cmd = [BIN, "sample", "--model", os.path.join(ROOT, "models", model), "--sampler", sampler, "--steps", str(steps),
           "--num-images", str(n), "--seed", str(seed), "--guidance", str(guidance), "--threads", str(threads),
           "--quiet", "--out", out_npy + ".png", "--save-tensor", out_npy]
    if classes is not None:
        cmd += ["--class", classes]
    t0 = time.time()
    subprocess.run(cmd, check=True)
    return np.load(out_npy)[:, 0:1], time.time() - t0


def cmd_run(a):
    clf, _ = load_classifier()
    rows = ROWS if a.rows == "all" else [r for r in ROWS if r[0] in a.rows.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for label, model, sampler, steps, g in rows:
            # One process per row: a second one (another terminal, the other core) skips it.
            os.makedirs(STATE, exist_ok=True)
            lock = open(os.path.join(STATE, slug(label) + ".lock"), "w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"{label}: another process is on this row; skipped", flush=True)
                continue
            st = load_state(label)
            # A row keeps the chunk size it started with: seeds are numbered by chunk.
            chunk = int(st.get("chunk", a.chunk))
            st["chunk"] = np.int64(chunk)
            n_chunks, u_chunks = -(-a.n // chunk), -(-a.n_uncond // chunk)
            for k in range(n_chunks):
                if k in st["cond_done"]:
                    continue
                x, secs = run_runtime(model, sampler, steps, g, chunk, "all", 1000 + k, os.path.join(tmp, "c.npy"),
                                      a.threads)
                f, pred = features_and_preds(clf, x)
                truth = np.arange(len(pred)) % 10
                np.add.at(st["confusion"], (truth, pred), 1)
                st["n"] = st["n"] + len(pred)
                st["sum_f"] = st["sum_f"] + f.sum(0)
                st["sum_ff"] = st["sum_ff"] + f.T @ f
                st["cond_secs"] = st["cond_secs"] + secs
                st["cond_done"] = np.append(st["cond_done"], k)
                save_state(label, st)
                print(f"{label}: conditional chunk {k + 1}/{n_chunks} in {secs:.0f} s", flush=True)
            for k in range(u_chunks):
                if k in st["uncond_done"]:
                    continue
                x, secs = run_runtime(model, sampler, steps, 1.0, chunk, None, 5000 + k, os.path.join(tmp, "u.npy"),
                                      a.threads)
                _, pred = features_and_preds(clf, x)
                st["uncond_counts"] = st["uncond_counts"] + np.bincount(pred, minlength=10)
                st["uncond_secs"] = st["uncond_secs"] + secs
                st["uncond_done"] = np.append(st["uncond_done"], k)
                save_state(label, st)
                print(f"{label}: unconditional chunk {k + 1}/{u_chunks} in {secs:.0f} s", flush=True)


def bench_images_per_s(model, sampler, steps, guidance, runs):
    out = subprocess.run([BIN, "bench", "--model", os.path.join(ROOT, "models", model), "--sampler", sampler,
                          "--steps", str(steps), "--guidance", str(guidance), "--threads", "1", "--runs", str(runs),
                          "--json"], check=True, capture_output=True, text=True).stdout
    return json.loads(out)["images_per_s"]


def cmd_report(a):
    clf, clf_acc = load_classifier()
    xt, yt, _ = fmnist.prepare("test", drop_outliers=False)
    f_test, pred_test = features_and_preds(clf, xt)
    m_t, c_t = f_test.mean(0), np.cov(f_test, rowvar=False)
    lines = [f"Evaluation classifier: test accuracy {(pred_test == yt).mean():.4f} on the 10 000 test images "
             f"(at training: {clf_acc:.4f}).", "",
             "| row | samples | FID-proxy | class accuracy | unconditional samples | smallest unconditional class share "
             "| images/s (1 thread) |", "|---|---|---|---|---|---|---|"]
    # What the FID-proxy reads for real images: 5000 training images (the first 5000 of a fixed
    # permutation) against the test set, and the classifier's accuracy on those training images.
    xr, yr, _ = fmnist.prepare("train", drop_outliers=False)
    pick = np.random.default_rng(0).permutation(len(yr))[:5000]
    f_r, pred_r = features_and_preds(clf, xr[pick])
    lines.append(f"| *reference: 5000 real training images* | 5000 | {frechet(f_r, f_test):.2f} "
                 f"| {(pred_r == yr[pick]).mean():.3f} | — | {np.bincount(pred_r, minlength=10).min() / 5000:.3f} | — |")
    for label, model, sampler, steps, g in ROWS:
        st = load_state(label)
        n, nu = int(st["n"]), int(st["uncond_counts"].sum())
        if n < 2:
            lines.append(f"| {label} | 0 | — | — | — | — | — |")
            continue
        fid = frechet_from_moments(*moments_from_sums(n, st["sum_f"], st["sum_ff"]), m_t, c_t)
        acc = np.trace(st["confusion"]) / n
        share = f"{st['uncond_counts'].min() / nu:.3f}" if nu else "—"
        ips = f"{bench_images_per_s(model, sampler, steps, g, a.bench_runs):.1f}" if a.bench_runs else "—"
        lines.append(f"| {label} | {n} | {fid:.2f} | {acc:.3f} | {nu} | {share} | {ips} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as fh:
            fh.write(text)
    if a.readme:
        with open(a.readme) as fh:
            doc = fh.read()
        begin, end = "<!-- quality-table: written by `python3 tools/eval_quality.py report` -->", "<!-- /quality-table -->"
        if begin not in doc or end not in doc:
            sys.exit(f"{a.readme}: no {begin!r} … {end!r} block to replace")
        head, rest = doc.split(begin, 1)
        doc = head + begin + "\n" + text + rest[rest.index(end):]
        tmp = a.readme + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(doc)
        os.replace(tmp, a.readme)


def cmd_grids(a):
    """Rows = the ten classes, --per-class samples each, seed 1, one PNG per model setting."""
    labels = ",".join(str(c) for c in range(10) for _ in range(a.per_class))
    for name, model, sampler, steps, g in [("teacher-ddim50", "fmnist-teacher", "ddim", 50, 2.0),
                                          ("student-lcm1", "fmnist-student", "lcm", 1, 1.0),
                                          ("student-lcm2", "fmnist-student", "lcm", 2, 1.0),
                                          ("student-lcm4", "fmnist-student", "lcm", 4, 1.0)]:
        out = os.path.join(a.out_dir, name + ".png")
        subprocess.run([BIN, "sample", "--model", os.path.join(ROOT, "models", model), "--sampler", sampler,
                        "--steps", str(steps), "--guidance", str(g), "--num-images", str(10 * a.per_class),
                        "--class", labels, "--cols", str(a.per_class), "--seed", "1", "--quiet", "--out", out],
                       check=True)
        print(f"wrote {out}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="generate and score the missing chunks")
    r.add_argument("--n", type=int, default=5000, help="class-conditional samples per row")
    r.add_argument("--n-uncond", type=int, default=1000, help="null-class samples per row (class shares)")
    r.add_argument("--chunk", type=int, default=500, help="images per chunk for a row not started yet")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--rows", default="all", help="comma-separated row labels, or all")
    q = sub.add_parser("report", help="print the table of what is done")
    q.add_argument("--bench-runs", type=int, default=20, help="images timed per row by `edge-diffuse bench`; 0: skip")
    q.add_argument("--out", default=os.path.join(ROOT, "tools", "eval", "quality.md"))
    q.add_argument("--readme", help="also replace the table block in this Markdown file (README.md)")
    g = sub.add_parser("grids", help="the README's sample grids")
    g.add_argument("--per-class", type=int, default=8)
    g.add_argument("--out-dir", default=os.path.join(ROOT, "docs"))
    a = p.parse_args()
    {"run": cmd_run, "report": cmd_report, "grids": cmd_grids}[a.cmd](a)


if __name__ == "__main__":
    main()
