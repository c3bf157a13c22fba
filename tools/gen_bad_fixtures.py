"""Writes tests/fixtures/bad/*.onnx: tiny, valid ONNX graphs that are *not* denoisers for the
fmnist card, used by tests/cli_errors.rs to check that the CLI rejects them with a one-line error,
and one that is denoiser-shaped but outputs NaN below timestep 500 (tests/lib_errors.rs and
tests/cli_errors.rs check that sampling stops with an error naming the step).

    python3 tools/gen_bad_fixtures.py            # rewrites tests/fixtures/bad/
    python3 tools/gen_bad_fixtures.py --check    # fails if the committed files differ

Each graph takes the card's shapes (sample [N, 1, 32, 32] float32, timestep [N] float32,
class_labels [N] int64) except for the one thing it gets wrong. Needs only the `onnx` package
(pinned in tools/requirements.txt); the output is deterministic.
"""

import argparse
import pathlib
import sys

import onnx
from onnx import TensorProto, helper

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "bad"
OPSET = 17


def vi(name, elem, dims):
    return helper.make_tensor_value_info(name, elem, dims)


def sample(name="sample"):
    return vi(name, TensorProto.FLOAT, ["N", 1, 32, 32])


def timestep(name="timestep", dims=("N",), elem=TensorProto.FLOAT):
    return vi(name, elem, list(dims))


def labels(name="class_labels"):
    return vi(name, TensorProto.INT64, ["N"])


def const(name, values, elem=TensorProto.FLOAT, dims=()):
    return helper.make_tensor(name, elem, list(dims), list(values))


def model(name, nodes, inputs, outputs, initializer=()):
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializer))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="gen_bad_fixtures")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def cases():
    # The output is [N, 1024], not the sample's [N, 1, 32, 32].
    yield "flatten_output", model(
        "flatten_output",
        [helper.make_node("Flatten", ["sample"], ["out"], axis=1)],
        [sample(), timestep(), labels()],
        [vi("out", TensorProto.FLOAT, ["N", 1024])],
    )
    # The inputs are x, t, y: none has the card's names.
    yield "renamed_inputs", model(
        "renamed_inputs",
        [helper.make_node("Identity", ["x"], ["out"])],
        [sample("x"), timestep("t"), labels("y")],
        [vi("out", TensorProto.FLOAT, ["N", 1, 32, 32])],
    )
    # A fourth input that the card does not bind.
    yield "extra_input", model(
        "extra_input",
        [helper.make_node("Add", ["sample", "mask"], ["out"])],
        [sample(), timestep(), labels(), sample("mask")],
        [vi("out", TensorProto.FLOAT, ["N", 1, 32, 32])],
    )
    # The timestep has rank 2.
    yield "timestep_rank2", model(
        "timestep_rank2",
        [helper.make_node("Identity", ["sample"], ["out"])],
        [sample(), timestep(dims=("N", 1)), labels()],
        [vi("out", TensorProto.FLOAT, ["N", 1, 32, 32])],
    )
    # The output is int64 of the right shape.
    yield "int_output", model(
        "int_output",
        [helper.make_node("Cast", ["sample"], ["out"], to=TensorProto.INT64)],
        [sample(), timestep(), labels()],
        [vi("out", TensorProto.INT64, ["N", 1, 32, 32])],
    )
    # A denoiser in shape and types that goes numerically bad: out = sample + sqrt(timestep - 500)
    # (per image, broadcast over C, H, W), plus 0 * class_labels so that every input is used.
    # Finite for timestep >= 500, NaN for timestep < 500 (sqrt of a negative number): DDIM with
    # 4 trailing steps (timesteps 999, 749, 499, 249) fails at step 3.
    yield "nan_below_500", model(
        "nan_below_500",
        [
            helper.make_node("Sub", ["timestep", "t_nan_below"], ["t_shift"]),
            helper.make_node("Sqrt", ["t_shift"], ["t_root"]),
            helper.make_node("Cast", ["class_labels"], ["labels_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["labels_f", "zero"], ["labels_0"]),
            helper.make_node("Add", ["t_root", "labels_0"], ["per_image"]),
            helper.make_node("Reshape", ["per_image", "per_image_shape"], ["per_image_4d"]),
            helper.make_node("Add", ["sample", "per_image_4d"], ["out"]),
        ],
        [sample(), timestep(), labels()],
        [vi("out", TensorProto.FLOAT, ["N", 1, 32, 32])],
        initializer=[
            const("t_nan_below", [500.0]),
            const("zero", [0.0]),
            const("per_image_shape", [-1, 1, 1, 1], elem=TensorProto.INT64, dims=(4,)),
        ],
    )


def check_nan_below_500(m):
    """The NaN fixture does what its tests rely on, per ONNX's reference evaluator."""
    import numpy as np
    from onnx.reference import ReferenceEvaluator

    ev = ReferenceEvaluator(m)
    t = np.array([999, 749, 500, 499, 249], dtype=np.float32)
    x = np.ones((len(t), 1, 32, 32), dtype=np.float32)
    (out,) = ev.run(None, {"sample": x, "timestep": t, "class_labels": np.arange(len(t), dtype=np.int64)})
    finite = np.isfinite(out).reshape(len(t), -1)
    assert finite[:3].all() and not finite[3:].any(), "nan_below_500 must be finite for t >= 500 and NaN below"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    stale = []
    for name, m in cases():
        if name == "nan_below_500":
            check_nan_below_500(m)
        path = OUT / f"{name}.onnx"
        data = m.SerializeToString(deterministic=True)
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                stale.append(path.name)
        else:
            path.write_bytes(data)
            print(f"{path.relative_to(OUT.parent.parent.parent)}: {len(data)} bytes")
    if stale:
        sys.exit(f"stale fixtures (rerun tools/gen_bad_fixtures.py): {', '.join(stale)}")


if __name__ == "__main__":
    main()
