"""Reference runs for σ-conditioned denoisers D(x; σ) (k-diffusion's convention).

Writes, under tests/fixtures/sigma/:

- `samplers/*.json`: whole runs of k-diffusion's `sample_euler`, `sample_euler_ancestral`,
  `sample_heun` and `sample_dpmpp_2m` on Karras sigmas, with a closed-form test denoiser
  (`test_denoiser` below, which tests/sigma_parity.rs computes the same way): the starting noise,
  the sigmas, every noise draw and the final sample.
- `model/init_cases.json`: image-to-image runs of that model from an init at a given σ
  (`--init-sigma`), k-diffusion's samplers on Karras sigmas from that σ and diffusers' consistency
  loop with `sigma_max` at that σ.
- `model/`: a tiny EDM-preconditioned consistency-style UNet-like network exported to ONNX as
  D(x; σ, difficulty) with the card of issue 22 (the `sigma` input, a `difficulty` conditioning
  input), and whole pipeline runs through onnxruntime: k-diffusion's Euler, Heun and DPM++ 2M, and
  diffusers' `CMStochasticIterativeScheduler` loop (with `s_noise = 0` for several steps, so that no
  noise is drawn and the run is deterministic), from a given starting noise.

Run from the repository root: `python3 tools/gen_sigma_reference.py`. It needs the pinned
packages of tools/requirements.txt plus k-diffusion 0.1.1.post1, which is not pinned there: its
dependencies move torch. Install it, then reinstall the pins and the torchvision of that torch:
`pip install k-diffusion==0.1.1.post1 && pip install -r tools/requirements.txt torchvision==0.26.0`.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import torch
from diffusers import CMStochasticIterativeScheduler
import k_diffusion.sampling as K

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "sigma")
SIGMA_DATA = 0.5

# (sampler, name, steps, config): config holds the card's [scheduler] keys.
SAMPLER_CASES = [
    ("euler", "sample_s4", 4, {"prediction_type": "sample"}),
    ("euler", "eps_s6_edm", 6, {"prediction_type": "epsilon", "sigma_min": 0.002, "sigma_max": 80.0}),
    ("euler_ancestral", "sample_s4", 4, {"prediction_type": "sample"}),
    ("euler_ancestral", "eps_s5_rho5", 5, {"prediction_type": "epsilon", "sigma_max": 20.0, "rho": 5.0}),
    ("heun", "sample_s3", 3, {"prediction_type": "sample"}),
    ("heun", "eps_s5", 5, {"prediction_type": "epsilon", "sigma_min": 0.01, "sigma_max": 14.6}),
    ("dpmpp_2m", "sample_s4", 4, {"prediction_type": "sample"}),
    ("dpmpp_2m", "eps_s8", 8, {"prediction_type": "epsilon", "sigma_max": 50.0}),
]


def test_denoiser(x, sigma):
    """x̂₀ = c·x + (1 − c)·tanh(x)/2, c = σ_d²/(σ² + σ_d²), in float32."""
    s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    c = SIGMA_DATA**2 / (s * s + SIGMA_DATA**2)
    return c * x + (1 - c) * torch.tanh(x) * 0.5


def karras(steps, cfg):
    return K.get_sigmas_karras(
        steps, cfg.get("sigma_min", 0.002), cfg.get("sigma_max", 80.0), rho=cfg.get("rho", 7.0)
    )


def run_kdiff(sampler, x, sigmas, denoise, draws):
    def noise_sampler(_sigma, _sigma_next):
        z = torch.randn(x.shape, generator=draws["gen"], dtype=torch.float32)
        draws["list"].append(z.clone())
        return z

    extra = {"disable": True}
    if sampler == "euler":
        return K.sample_euler(denoise, x, sigmas, **extra)
    if sampler == "euler_ancestral":
        return K.sample_euler_ancestral(denoise, x, sigmas, noise_sampler=noise_sampler, **extra)
    if sampler == "heun":
        return K.sample_heun(denoise, x, sigmas, **extra)
    if sampler == "dpmpp_2m":
        return K.sample_dpmpp_2m(denoise, x, sigmas, **extra)
    raise ValueError(sampler)


def f32_list(t):
    return [float(v) for v in t.detach().to(torch.float32).reshape(-1).tolist()]


def sampler_fixtures():
    out_dir = os.path.join(ROOT, "samplers")
    os.makedirs(out_dir, exist_ok=True)
    for i, (sampler, name, steps, cfg) in enumerate(SAMPLER_CASES):
        gen = torch.Generator().manual_seed(100 + i)
        shape = (1, 2, 3, 4)
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        sigmas = karras(steps, cfg)
        draws = {"gen": gen, "list": []}
        with torch.no_grad():
            final = run_kdiff(sampler, noise * sigmas[0], sigmas, test_denoiser, draws)
        fixture = {
            "sampler": sampler,
            "steps": steps,
            "config": cfg,
            "shape": list(shape),
            "noise": f32_list(noise),
            "sigmas": f32_list(sigmas),
            "step_noises": [f32_list(z) for z in draws["list"]],
            "final": f32_list(final),
        }
        with open(os.path.join(out_dir, f"{sampler}__{name}.json"), "w") as f:
            json.dump(fixture, f)
            f.write("\n")


class TinyDenoiser(torch.nn.Module):
    """D(x; σ, difficulty) with EDM's preconditioning in the graph: GroupNorm written as
    InstanceNormalization, AveragePool down, nearest up, attention through einsum."""

    def __init__(self, ch=1, width=16):
        super().__init__()
        self.inp = torch.nn.Conv2d(ch, width, 3, padding=1)
        self.emb = torch.nn.Linear(2, width)
        self.norm = torch.nn.GroupNorm(4, width)
        self.mid = torch.nn.Conv2d(width, width, 3, padding=1)
        self.qkv = torch.nn.Conv2d(width, 3 * width, 1)
        self.proj = torch.nn.Conv2d(width, width, 1)
        self.out = torch.nn.Conv2d(width, ch, 3, padding=1)

    def forward(self, noisy, sigma, difficulty):
        s = sigma.reshape(-1, 1, 1, 1)
        c_in = 1 / torch.sqrt(s * s + SIGMA_DATA**2)
        c_skip = SIGMA_DATA**2 / (s * s + SIGMA_DATA**2)
        c_out = s * SIGMA_DATA / torch.sqrt(s * s + SIGMA_DATA**2)
        c_noise = torch.log(sigma) / 4
        e = self.emb(torch.stack([c_noise, difficulty], dim=1))[:, :, None, None]
        h = torch.nn.functional.silu(self.inp(noisy * c_in) + e)
        d = torch.nn.functional.avg_pool2d(h, 2)
        d = torch.nn.functional.silu(self.mid(self.norm(d)))
        b, c, hh, ww = d.shape
        q, k, v = self.qkv(d).reshape(b, 3, c, hh * ww).unbind(1)
        att = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / c**0.5, dim=-1)
        d = d + self.proj(torch.einsum("bij,bcj->bci", att, v).reshape(b, c, hh, ww))
        h = h + torch.nn.functional.interpolate(d, scale_factor=2.0, mode="nearest")
        return c_skip * noisy + c_out * self.out(h)


CARD = """[model]
name = "sigma-test"
onnx = "denoiser.onnx"
[model.inputs]
sample = "noisy"
sigma = "sigma"
[model.conditioning.difficulty]   # a further graph input: one float32 per image
default = 0.5
null = 0.0
[image]
channels = 1
height = 8
width = 8
[scheduler]
sigma_min = 0.002
sigma_max = 80.0
sigma_data = 0.5
prediction_type = "sample"
{extra}[defaults]
sampler = "consistency"
steps = 1
"""

# (name, sampler, steps, difficulty per image, extra [scheduler] lines)
PIPELINE_CASES = [
    ("consistency_s1", "consistency", 1, [0.25, 0.9], ""),
    ("consistency_s3_nonoise", "consistency", 3, [0.5], "s_noise = 0.0\n"),
    ("euler_s4", "euler", 4, [0.25, 0.9], ""),
    ("heun_s3", "heun", 3, [0.5], ""),
    ("dpmpp_2m_s4", "dpmpp_2m", 4, [0.5, 0.25], ""),
]


def model_fixtures():
    out_dir = os.path.join(ROOT, "model")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(7)
    net = TinyDenoiser().eval()
    path = os.path.join(out_dir, "denoiser.onnx")
    args = (torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]))
    torch.onnx.export(
        net,
        args,
        path,
        input_names=["noisy", "sigma", "difficulty"],
        output_names=["denoised"],
        dynamic_axes={"noisy": {0: "batch"}, "sigma": {0: "batch"}, "difficulty": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    with open(os.path.join(out_dir, "model.toml"), "w") as f:
        f.write(CARD.format(extra=""))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    gen = torch.Generator().manual_seed(11)
    noise = torch.randn((2, 1, 8, 8), generator=gen, dtype=torch.float32)
    np.save(os.path.join(out_dir, "noise.npy"), noise.numpy())
    cases = []
    for name, sampler, steps, difficulty, extra in PIPELINE_CASES:
        cfg = {"sigma_min": 0.002, "sigma_max": 80.0}
        finals = []
        for i in range(noise.shape[0]):
            x = noise[i : i + 1]
            denoise = onnx_denoiser(session, difficulty[i % len(difficulty)])
            with torch.no_grad():
                if sampler == "consistency":
                    finals.append(run_consistency(x, steps, denoise, s_noise=0.0 if "s_noise" in extra else 1.0))
                else:
                    sigmas = karras(steps, cfg)
                    finals.append(run_kdiff(sampler, x * sigmas[0], sigmas, denoise, None))
        np.save(os.path.join(out_dir, f"{name}.npy"), torch.cat(finals).numpy())
        cases.append({"name": name, "sampler": sampler, "steps": steps, "difficulty": difficulty, "scheduler": extra})
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)
        f.write("\n")


def onnx_denoiser(session, difficulty):
    """The test model in `session` as a k-diffusion denoiser D(x; σ), at one difficulty."""

    def denoise(x, sigma):
        s = np.broadcast_to(np.asarray(sigma, dtype=np.float32).reshape(-1), (x.shape[0],)).copy()
        d = np.full((x.shape[0],), difficulty, dtype=np.float32)
        out = session.run(None, {"noisy": x.numpy().astype(np.float32), "sigma": s, "difficulty": d})[0]
        return torch.from_numpy(out)

    return denoise


def run_consistency(x, steps, denoise, s_noise, sigma_max=80.0, start=None):
    """diffusers' consistency loop with a model that outputs the denoised sample: its
    `step` applies c_skip and c_out, so it gets the model output as (denoised − c_skip·x)/c_out;
    with one step, or `s_noise = 0`, no noise enters. `start`: the sample to start from, in place
    of the noise `x` scaled to σ_max."""
    sched = CMStochasticIterativeScheduler(
        sigma_min=0.002, sigma_max=sigma_max, sigma_data=SIGMA_DATA, s_noise=s_noise
    )
    sched.set_timesteps(steps)
    x = x * sched.init_noise_sigma if start is None else start
    for t in sched.timesteps:
        sigma = sched.sigmas[sched.step_index if sched.step_index is not None else 0]
        denoised = denoise(x, float(sigma))
        c_skip, c_out = sched.get_scalings_for_boundary_condition(sigma)
        model_output = (denoised - c_skip * x) / c_out
        x = sched.step(model_output, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    return x


# Image-to-image from a given σ (`--init-sigma`): (name, sampler, steps, difficulty, σ). The run
# starts at init + σ·noise and steps down Karras sigmas from σ (consistency: its schedule with
# sigma_max = σ; with one step that is one call at σ).
INIT_SIGMA_CASES = [
    ("init_euler_s3_sigma2", "euler", 3, [0.5], 2.0),
    ("init_dpmpp_2m_s4_sigma5", "dpmpp_2m", 4, [0.25, 0.9], 5.0),
    ("init_heun_s2_sigma08", "heun", 2, [0.5], 0.8),
    ("init_consistency_s1_sigma3", "consistency", 1, [0.5], 3.0),
]


def init_sigma_fixtures():
    """Runs of the committed test model from an init at a given σ: `init_cases.json`,
    `init.npy` and one result per case."""
    out_dir = os.path.join(ROOT, "model")
    session = ort.InferenceSession(os.path.join(out_dir, "denoiser.onnx"), providers=["CPUExecutionProvider"])
    noise = torch.from_numpy(np.load(os.path.join(out_dir, "noise.npy")))
    gen = torch.Generator().manual_seed(12)
    init = torch.tanh(torch.randn((2, 1, 8, 8), generator=gen, dtype=torch.float32))
    np.save(os.path.join(out_dir, "init.npy"), init.numpy())

    cases = []
    for name, sampler, steps, difficulty, sigma in INIT_SIGMA_CASES:
        finals = []
        for i in range(noise.shape[0]):
            denoise = onnx_denoiser(session, difficulty[i % len(difficulty)])
            x = init[i : i + 1] + sigma * noise[i : i + 1]
            with torch.no_grad():
                if sampler == "consistency":
                    finals.append(run_consistency(x, steps, denoise, s_noise=1.0, sigma_max=sigma, start=x))
                else:
                    sigmas = karras(steps, {"sigma_min": 0.002, "sigma_max": sigma})
                    finals.append(run_kdiff(sampler, x, sigmas, denoise, None))
        np.save(os.path.join(out_dir, f"{name}.npy"), torch.cat(finals).numpy())
        cases.append({"name": name, "sampler": sampler, "steps": steps, "difficulty": difficulty, "init_sigma": sigma})
    with open(os.path.join(out_dir, "init_cases.json"), "w") as f:
        json.dump(cases, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    sampler_fixtures()
    model_fixtures()
    init_sigma_fixtures()
