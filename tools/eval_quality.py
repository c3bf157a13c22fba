"""Quality report of the shipped models, measured on what ships: samples come from the Rust
runtime (`edge-diffuse sample --save-tensor`), features and predictions from the evaluation
classifier (tools/checkpoints/classifier.pt, trained by `train.py classifier`).

    cargo build --release
    python3 tools/eval_quality.py --n 5000 --out tools/.runs/quality.md

For each row: FID-proxy (Fréchet distance between the classifier's 128-d penultimate features of
the samples and of the 10 000 test images), class accuracy of class-conditional samples (labels
cycled over the 10 classes), the smallest class share among unconditional (null-class) samples
(needs --n-uncond of them), and images/s of the runtime as run (1 thread).
"""
from __future__ import annotations

import argparse
import os
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
BIN = os.path.join(ROOT, "target", "release", "edge-diffuse")
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


def frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    m1, m2 = f1.mean(0), f2.mean(0)
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    # tr sqrt(C1 C2) through the symmetric form sqrt(C1) C2 sqrt(C1).
    w, v = np.linalg.eigh(c1)
    s1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(s1 @ c2 @ s1)
    return float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def run_runtime(model, sampler, steps, guidance, n, classes, seed, out_npy, threads=1):
    cmd = [BIN, "sample", "--model", os.path.join(ROOT, "models", model), "--sampler", sampler, "--steps", str(steps),
           "--num-images", str(n), "--seed", str(seed), "--guidance", str(guidance), "--threads", str(threads),
           "--quiet", "--out", out_npy + ".png", "--save-tensor", out_npy]
    if classes is not None:
        cmd += ["--class", classes]
    t0 = time.time()
    subprocess.run(cmd, check=True)
    return np.load(out_npy)[:, 0:1], time.time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5000, help="class-conditional samples per row")
    p.add_argument("--n-uncond", type=int, default=1000, help="null-class samples per row (class shares)")
    p.add_argument("--rows", default="all", help="comma-separated row labels, or all")
    p.add_argument("--out", default=os.path.join(ROOT, "tools", ".runs", "quality.md"))
    a = p.parse_args()
    clf, clf_acc = load_classifier()
    xt, yt, _ = fmnist.prepare("test", drop_outliers=False)
    f_test, pred_test = features_and_preds(clf, xt)
    lines = [f"Evaluation classifier: test accuracy {clf_acc:.4f} (measured again here: {(pred_test == yt).mean():.4f}).",
             "", "| row | FID-proxy | class accuracy | smallest unconditional class share | images/s |",
             "|---|---|---|---|---|"]
    rows = ROWS if a.rows == "all" else [r for r in ROWS if r[0] in a.rows.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for label, model, sampler, steps, g in rows:
            x, secs = run_runtime(model, sampler, steps, g, a.n, "all", 1, os.path.join(tmp, "c.npy"))
            f, pred = features_and_preds(clf, x)
            acc = float((pred == np.arange(a.n) % 10).mean())
            fid = frechet(f, f_test)
            xu, _ = run_runtime(model, sampler, steps, 1.0, a.n_uncond, None, 2, os.path.join(tmp, "u.npy"))
            _, pu = features_and_preds(clf, xu)
            share = np.bincount(pu, minlength=10).min() / len(pu)
            lines.append(f"| {label} | {fid:.2f} | {acc:.3f} | {share:.3f} | {a.n / secs:.1f} |")
            print(lines[-1], flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
