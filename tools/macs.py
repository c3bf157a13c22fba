"""Multiply-accumulates of one denoiser call, counted from the ONNX graph itself (Conv, ConvTranspose,
MatMul, Gemm, Einsum; the elementwise and normalisation ops are not counted, as is usual), at batch 1.

    python3 tools/macs.py models/fmnist-student/denoiser.onnx [more.onnx ...] [--json]

Shapes are read off one onnxruntime run at batch 1 that exposes every intermediate tensor (ONNX
shape inference alone stops at the in-graph Reshape targets that exporters emit).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import onnx


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        probe.graph.output.extend(onnx.ValueInfoProto(name=o) for o in node.output if o and o not in known)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        dtype = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
                 "tensor(int32)": np.int32}[i.type]
        feeds[i.name] = np.zeros(shape, dtype)
    names = [o.name for o in sess.get_outputs()]
    out = {n: list(v.shape) for n, v in zip(names, sess.run(names, feeds))}
    for init in model.graph.initializer:
        out[init.name] = list(init.dims)
    return out


def count_macs(path: str) -> dict:
    model = onnx.load(path)
    shapes = _shapes(model)
    by_op: dict[str, int] = {}
    unknown = 0
    for node in model.graph.node:
        macs = None
        if node.op_type in ("Conv", "ConvTranspose"):
            w, y = shapes.get(node.input[1]), shapes.get(node.output[0])
            if w and y:
                # Conv weight [M, C/g, kh, kw]: each output element takes C/g*kh*kw MACs.
                # ConvTranspose weight [C, M/g, kh, kw]: each input element feeds M/g*kh*kw outputs.
                if node.op_type == "Conv":
                    macs = int(np.prod(y)) * int(np.prod(w[1:]))
                else:
                    x = shapes.get(node.input[0])
                    macs = int(np.prod(x)) * int(np.prod(w[1:])) if x else None
        elif node.op_type in ("MatMul", "Gemm"):
            a, y = shapes.get(node.input[0]), shapes.get(node.output[0])
            if a and y:
                trans_a = any(at.name == "transA" and at.i for at in node.attribute)
                k = a[-2] if (node.op_type == "Gemm" and trans_a) else a[-1]
                macs = int(np.prod(y)) * k
        elif node.op_type == "Einsum":
            eq = next(at.s.decode() for at in node.attribute if at.name == "equation").replace(" ", "")
            ins = [shapes.get(i) for i in node.input]
            if all(ins) and "..." not in eq:
                size = {}
                for letters, shape in zip(eq.split("->")[0].split(","), ins):
                    size.update(zip(letters, shape))
                macs = int(np.prod(list(size.values())))  # a product over every index, summed or kept
        else:
            continue
        if macs is None:
            unknown += 1
            continue
        by_op[node.op_type] = by_op.get(node.op_type, 0) + macs
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    return {"model": path, "macs": sum(by_op.values()), "by_op": by_op, "params": params, "uncounted_nodes": unknown}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("onnx", nargs="+")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    rows = [count_macs(f) for f in a.onnx]
    if a.json:
        json.dump(rows, sys.stdout)
        print()
        return
    for r in rows:
        parts = ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in sorted(r["by_op"].items()))
        print(f"{r['model']}: {r['macs'] / 1e6:.1f} M MACs per call at batch 1 ({parts}); {r['params'] / 1e6:.2f} M params"
              + (f"; {r['uncounted_nodes']} nodes without a known shape" if r["uncounted_nodes"] else ""))


if __name__ == "__main__":
    main()
