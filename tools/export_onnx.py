"""Export a trained checkpoint to ONNX with its model card.

    python3 tools/export_onnx.py teacher tools/.runs/fmnist/teacher.pt models/fmnist-teacher
    python3 tools/export_onnx.py student tools/.runs/fmnist/student.pt models/fmnist-student

Inputs: sample float32 [batch,1,32,32], timestep float32 [batch], class_labels int64 [batch];
output: out_sample float32 [batch,1,32,32] (v-prediction). Legacy TorchScript exporter at
opset 17 with a symbolic batch axis: the simplest input for tract (shared/notes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fmnist  # noqa: E402
from train import load_weights  # noqa: E402
from unet import count_params  # noqa: E402

SCHEDULER_COMMON = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "clip_sample": False,
}


def card_text(kind: str, ck: dict, params: int) -> str:
    classes = ", ".join(f'"{c}"' for c in fmnist.CLASSES)
    if kind == "teacher":
        name, sched = "fmnist-teacher", dict(SCHEDULER_COMMON, timestep_spacing="trailing", steps_offset=0,
                                             set_alpha_to_one=True)
        defaults = 'sampler = "ddim"\nsteps = 50\nguidance = 2.0'
        about = (f"Class-conditional UNet teacher, {params} parameters, trained {ck['step']} steps "
                 f"({ck['seen']} images) on Fashion-MNIST with label dropout 0.1.")
    else:
        name, sched = "fmnist-student", dict(SCHEDULER_COMMON, timestep_spacing="leading", steps_offset=0,
                                             set_alpha_to_one=True, original_inference_steps=50,
                                             timestep_scaling=10.0)
        defaults = 'sampler = "lcm"\nsteps = 2\nguidance = 1.0'
        about = (f"Latent-consistency-distilled student of fmnist-teacher, {params} parameters, "
                 f"{ck['step']} distillation steps ({ck['seen']} images), teacher guidance "
                 f"{ck['guidance']} built in; sample with the lcm sampler in 1-4 steps.")
    lines = [f"# {about}", "[model]", f'name = "{name}"', 'onnx = "denoiser.onnx"', "",
             "[model.inputs]", 'sample = "sample"', 'timestep = "timestep"', 'class_labels = "class_labels"', "",
             "[image]", "channels = 1", "height = 32", "width = 32", "value_range = [-1.0, 1.0]", "",
             "[classes]", f"names = [{classes}]", "null = 10", "", "[scheduler]"]
    for k, v in sched.items():
        lines.append(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}")
    lines += ["", "[defaults]", defaults, ""]
    return "\n".join(lines)


def export(kind: str, ckpt: str, out_dir: str):
    model, ck = load_weights(ckpt, "cpu")
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    sample = torch.randn(1, 1, 32, 32)
    t = torch.tensor([500.0])
    y = torch.tensor([3], dtype=torch.int64)
    path = os.path.join(out_dir, "denoiser.onnx")
    tmp = path + ".tmp"
    torch.onnx.export(model, (sample, t, y), tmp, input_names=["sample", "timestep", "class_labels"],
                      output_names=["out_sample"], opset_version=17, dynamo=False,
                      dynamic_axes={"sample": {0: "batch"}, "timestep": {0: "batch"},
                                    "class_labels": {0: "batch"}, "out_sample": {0: "batch"}})
    os.replace(tmp, path)
    with open(os.path.join(out_dir, "model.toml"), "w") as f:
        f.write(card_text(kind, ck, count_params(model)))
    print(f"exported {kind} ({count_params(model)} params) to {out_dir}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["teacher", "student"])
    p.add_argument("ckpt")
    p.add_argument("out_dir")
    a = p.parse_args()
    export(a.kind, a.ckpt, a.out_dir)
