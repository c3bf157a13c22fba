"""Train the teacher, distill the student, train the evaluation classifier.

Every phase is bounded by wall-clock seconds and resumes from its checkpoint, so a run can be
cut into pieces across sessions (CPU) or done in one go on a GPU:

    python3 tools/train.py teacher    --out tools/.runs/fmnist --seconds 3600
    python3 tools/train.py student    --out tools/.runs/fmnist --seconds 3600
    python3 tools/train.py classifier --out tools/.runs/fmnist --seconds 300

Checkpoints: `<phase>.pt` holds the weights to ship (EMA for the teacher, the online student),
`<phase>-state.pt` the optimizer and EMA state needed to resume (never committed).

Teacher: v-prediction, diffusers' `squaredcos_cap_v2` betas over 1000 steps, label dropout 10%
(the null class is `num_classes`).
Student: latent-consistency-style consistency distillation (Luo et al. 2023; Song et al. 2023):
the teacher with classifier-free guidance scale `--guidance` is the ODE solver (one DDIM step of
`--skip` timesteps), the student is initialised from the teacher and parameterised exactly as
diffusers' LCMScheduler reads a model (c_skip/c_out boundary condition with timestep_scaling 10,
sigma_data 0.5), the target network is an EMA (0.95) of the student, pseudo-Huber loss.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fmnist  # noqa: E402
from unet import UNet, count_params  # noqa: E402

NUM_TRAIN_TIMESTEPS = 1000
TIMESTEP_SCALING = 10.0
SIGMA_DATA = 0.5


def cosine_alphas_cumprod(n: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """diffusers' betas_for_alpha_bar('cosine'): float64 betas, clipped at 0.999, then float32."""
    def ab(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - ab((i + 1) / n) / ab(i / n), 0.999) for i in range(n)]
    betas = torch.tensor(betas, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def lcm_scalings(t: torch.Tensor):
    s = t.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
    c_out = s / (s**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def bcast(v):
    return v[:, None, None, None]


class Data:
    def __init__(self, device):
        x, y, report = fmnist.prepare("train")
        print(f"data: {report.summary()}; training on {x.shape[0]} images", flush=True)
        self.x = torch.from_numpy(x).to(device)
        self.y = torch.from_numpy(y).to(device)
        self.device = device

    def batch(self, n):
        idx = torch.randint(0, self.x.shape[0], (n,), device=self.device)
        return fmnist.random_hflip(self.x[idx]), self.y[idx]


def autocast(device):
    # bf16 autocast pays on GPUs and on CPUs with native bf16; on AVX2-only CPUs it is ~10x slower.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=AMP[0])


AMP = [False]


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, decay: float):
    for pt, po in zip(target.parameters(), online.parameters()):
        pt.lerp_(po, 1.0 - decay)


def load_weights(path, device):
    ck = torch.load(path, map_location=device, weights_only=False)
    model = UNet(**ck["config"]).to(device)
    model.load_state_dict(ck["model"])
    return model, ck


def train_teacher(args, device):
    data = Data(device)
    ac = cosine_alphas_cumprod().to(device)
    state_path = os.path.join(args.out, "teacher-state.pt")
    if os.path.exists(state_path):
        st = torch.load(state_path, map_location=device, weights_only=False)
        model = UNet(**st["config"]).to(device)
        model.load_state_dict(st["model"])
        ema = UNet(**st["config"]).to(device)
        ema.load_state_dict(st["ema"])
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        opt.load_state_dict(st["opt"])
        step, seen = st["step"], st["seen"]
        print(f"teacher: resuming at step {step}", flush=True)
    else:
        model = UNet(base=args.base).to(device)
        ema = copy.deepcopy(model)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        step, seen = 0, 0
    print(f"teacher: {count_params(model)} parameters", flush=True)
    model.train()
    t0 = time.time()
    last_ck = t0
    losses = []
    while time.time() - t0 < args.seconds:
        x0, y = data.batch(args.batch)
        y = torch.where(torch.rand(y.shape, device=device) < 0.1, torch.full_like(y, model.num_classes), y)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (x0.shape[0],), device=device)
        noise = torch.randn_like(x0)
        a = bcast(ac[t])
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        warm = min(1.0, (step + 1) / 500)
        for g in opt.param_groups:
            g["lr"] = args.lr * warm
        with autocast(device):
            pred = model(xt, t.float(), y)
        loss = F.mse_loss(pred.float(), v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))
        step += 1
        seen += x0.shape[0]
        losses.append(loss.item() if step % 50 == 0 else None)
        if step % 500 == 0:
            recent = [l for l in losses[-500:] if l is not None]
            print(f"teacher step {step} seen {seen} loss {np.mean(recent):.4f} "
                  f"({step / max(time.time() - t0, 1e-9):.1f} it/s this run)", flush=True)
        if time.time() - last_ck > args.checkpoint_every:
            checkpoint_teacher(args, model, ema, opt, step, seen)
            last_ck = time.time()
    checkpoint_teacher(args, model, ema, opt, step, seen)
    print(f"teacher: stopped at step {step} ({seen} images) after {time.time() - t0:.0f}s", flush=True)


def checkpoint_teacher(args, model, ema, opt, step, seen):
    meta = dict(step=step, seen=seen, batch=args.batch, lr=args.lr, ema_decay=args.ema,
                prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2")
    save_atomic(dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                     config=model.config, **meta), os.path.join(args.out, "teacher-state.pt"))
    save_atomic(dict(model=ema.state_dict(), config=ema.config, **meta), os.path.join(args.out, "teacher.pt"))


def train_student(args, device):
    data = Data(device)
    ac = cosine_alphas_cumprod().to(device)
    teacher, _ = load_weights(os.path.join(args.out, "teacher.pt"), device)
    teacher.eval().requires_grad_(False)
    state_path = os.path.join(args.out, "student-state.pt")
    if os.path.exists(state_path):
        st = torch.load(state_path, map_location=device, weights_only=False)
        student = UNet(**st["config"]).to(device)
        student.load_state_dict(st["model"])
        target = UNet(**st["config"]).to(device)
        target.load_state_dict(st["target"])
        opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
        opt.load_state_dict(st["opt"])
        step, seen = st["step"], st["seen"]
        print(f"student: resuming at step {step}", flush=True)
    else:
        student = copy.deepcopy(teacher).requires_grad_(True)
        target = copy.deepcopy(teacher)
        opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
        step, seen = 0, 0
    target.eval().requires_grad_(False)
    student.train()
    null = teacher.num_classes
    k = args.skip
    n_points = NUM_TRAIN_TIMESTEPS // k
    huber_c = 0.00054 * math.sqrt(32 * 32)
    t0 = time.time()
    last_ck = t0
    losses = []
    while time.time() - t0 < args.seconds:
        x0, y = data.batch(args.batch)
        y = torch.where(torch.rand(y.shape, device=device) < 0.1, torch.full_like(y, null), y)
        idx = torch.randint(0, n_points, (x0.shape[0],), device=device)
        t = idx * k + (k - 1)                      # 19, 39, ..., 999: the 50-step DDIM grid
        t_prev = torch.clamp(t - k, min=0)
        noise = torch.randn_like(x0)
        a, a_prev = bcast(ac[t]), bcast(ac[t_prev])
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.no_grad(), autocast(device):
            v_c = teacher(xt, t.float(), y).float()
            v_u = teacher(xt, t.float(), torch.full_like(y, null)).float()
            guided = torch.where(bcast(y == null), v_u, v_u + args.guidance * (v_c - v_u))
            x0_t = a.sqrt() * xt - (1 - a).sqrt() * guided
            eps_t = (1 - a).sqrt() * xt + a.sqrt() * guided
            x_prev = a_prev.sqrt() * x0_t + (1 - a_prev).sqrt() * eps_t
            v_target = target(x_prev, t_prev.float(), y).float()
            cs, co = lcm_scalings(t_prev)
            x0_target = a_prev.sqrt() * x_prev - (1 - a_prev).sqrt() * v_target
            y_target = bcast(cs) * x_prev + bcast(co) * x0_target
        warm = min(1.0, (step + 1) / 200)
        for g in opt.param_groups:
            g["lr"] = args.lr * warm
        with autocast(device):
            v_s = student(xt, t.float(), y).float()
        cs, co = lcm_scalings(t)
        y_student = bcast(cs) * xt + bcast(co) * (a.sqrt() * xt - (1 - a).sqrt() * v_s)
        diff = (y_student - y_target).reshape(x0.shape[0], -1)
        loss = (torch.sqrt((diff**2).mean(dim=1) * diff.shape[1] + huber_c**2) - huber_c).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema_update(target, student, args.target_ema)
        step += 1
        seen += x0.shape[0]
        losses.append(loss.item() if step % 50 == 0 else None)
        if step % 500 == 0:
            recent = [l for l in losses[-500:] if l is not None]
            print(f"student step {step} seen {seen} loss {np.mean(recent):.4f} "
                  f"({step / max(time.time() - t0, 1e-9):.1f} it/s this run)", flush=True)
        if time.time() - last_ck > args.checkpoint_every:
            checkpoint_student(args, student, target, opt, step, seen)
            last_ck = time.time()
    checkpoint_student(args, student, target, opt, step, seen)
    print(f"student: stopped at step {step} ({seen} images) after {time.time() - t0:.0f}s", flush=True)


def checkpoint_student(args, student, target, opt, step, seen):
    meta = dict(step=step, seen=seen, batch=args.batch, lr=args.lr, guidance=args.guidance, skip=args.skip,
                target_ema=args.target_ema, method="latent consistency distillation", prediction_type="v_prediction")
    save_atomic(dict(model=student.state_dict(), target=target.state_dict(), opt=opt.state_dict(),
                     config=student.config, **meta), os.path.join(args.out, "student-state.pt"))
    # The online student is shipped, as in the LCM reference implementation's released weights.
    save_atomic(dict(model=student.state_dict(), config=student.config, **meta), os.path.join(args.out, "student.pt"))


class Classifier(nn.Module):
    """Small CNN on 32x32 Fashion-MNIST; `features` (128-d penultimate layer) feeds the FID-proxy."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(128, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def classifier_accuracy(model, x, y, device):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], 1000):
            xb = torch.from_numpy(x[i:i + 1000]).to(device)
            correct += (model(xb).argmax(1).cpu() == torch.from_numpy(y[i:i + 1000])).sum().item()
    return correct / x.shape[0]


def train_classifier(args, device):
    data = Data(device)
    model = Classifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    t0 = time.time()
    step = 0
    model.train()
    while time.time() - t0 < args.seconds:
        x, y = data.batch(256)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    xt, yt, _ = fmnist.prepare("test", drop_outliers=False)
    acc = classifier_accuracy(model, xt, yt, device)
    print(f"classifier: {step} steps, test accuracy {acc:.4f}", flush=True)
    save_atomic(dict(model=model.state_dict(), test_accuracy=acc, steps=step), os.path.join(args.out, "classifier.pt"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["teacher", "student", "classifier"])
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, required=True, help="wall-clock budget of this run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--base", type=int, default=32, help="UNet base channels (new teacher only)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--skip", type=int, default=20)
    p.add_argument("--target-ema", type=float, default=0.95)
    p.add_argument("--checkpoint-every", type=float, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto", help="bf16 autocast (auto: on for cuda)")
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = 64 if args.device == "cpu" else 512
    if args.lr is None:
        args.lr = {"teacher": 2e-4 if args.batch <= 128 else 4e-4, "student": 2e-5 if args.batch <= 128 else 5e-5,
                   "classifier": 2e-3}[args.phase]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed + int(time.time()) % 100000)  # resumed runs must not replay the same batches
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    AMP[0] = args.amp == "on" or (args.amp == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    {"teacher": train_teacher, "student": train_student, "classifier": train_classifier}[args.phase](args, device)


if __name__ == "__main__":
    main()
