"""Tests of the evaluation and benchmark helpers: the FID-proxy's pooled statistics and the MAC
counter (on a hand-built ONNX graph whose count is known), and how bench_compare combines rounds."""
from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import eval_quality  # noqa: E402
from macs import count_macs  # noqa: E402


def test_moments_from_sums_match_numpy():
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((n, 7)) * rng.uniform(0.5, 2, 7) + rng.uniform(-1, 1, 7) for n in (13, 40, 5)]
    n = sum(len(c) for c in chunks)
    s1 = sum(c.sum(0) for c in chunks)
    s2 = sum(c.T @ c for c in chunks)
    m, cov = eval_quality.moments_from_sums(n, s1, s2)
    allx = np.concatenate(chunks)
    np.testing.assert_allclose(m, allx.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(allx, rowvar=False), rtol=1e-10, atol=1e-12)


def test_frechet_is_zero_for_same_set_and_grows_with_shift():
    x = np.random.default_rng(1).standard_normal((500, 4))
    assert abs(eval_quality.frechet(x, x)) < 1e-8
    # Shifting every feature by 1 adds exactly 4 (|Δμ|²) to the distance.
    assert eval_quality.frechet(x + 1.0, x) == pytest.approx(4.0, abs=1e-6)


def test_state_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_quality, "STATE", str(tmp_path))
    st = eval_quality.empty_state()
    st["n"] = np.int64(10)
    st["cond_done"] = np.array([0, 3])
    eval_quality.save_state("teacher DDIM 50", st)
    assert os.listdir(tmp_path) == ["teacher-ddim-50.npz"]
    back = eval_quality.load_state("teacher DDIM 50")
    assert int(back["n"]) == 10 and list(back["cond_done"]) == [0, 3]


def test_macs_of_a_known_graph(tmp_path):
    # Conv 3→8, 3×3, pad 1 on 1×3×16×16: 8·16·16 outputs × 3·3·3 = 55 296 MACs.
    # MatMul [1,8,256]×[256,10]: 8·10 outputs × 256 = 20 480 MACs.
    w = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w")
    m = numpy_helper.from_array(np.zeros((256, 10), np.float32), "m")
    shape = numpy_helper.from_array(np.array([1, 8, 256], np.int64), "shape")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("MatMul", ["r", "m"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, m, shape])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    r = count_macs(str(path))
    assert r["by_op"] == {"Conv": 55296, "MatMul": 20480}
    assert r["macs"] == 75776 and r["params"] == 8 * 27 + 2560 + 3


def test_bench_compare_takes_medians_over_rounds_and_pairs_ratios_by_round():
    import bench_compare

    def rec(step, load=0.1):
        return dict(cpu="x", step_ms_median=step, step_ms_p90=step * 1.1, image_s_median=step * 4e-3,
                    load_s=load, peak_rss_mib=50.0)

    ed = [rec(3.0), rec(9.0), rec(3.2, load=0.3)]
    ort = [rec(4.0), rec(10.0), rec(4.0)]
    combined = bench_compare.combine(ed)
    assert combined["step_ms_median"] == 3.2 and combined["load_s"] == 0.1 and combined["cpu"] == "x"
    # Round by round: the disturbed second round hit both runtimes, and its ratio stays sane.
    assert bench_compare.ratios(ed, ort) == pytest.approx([0.75, 0.9, 0.8])
    assert bench_compare.spread([0.75, 0.9, 0.8]) == "0.75-0.90"
    with pytest.raises(ValueError):
        bench_compare.ratios(ed, ort[:2])
