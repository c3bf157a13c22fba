"""Fashion-MNIST preprocessing (tools/fmnist.py) on small synthetic data.

    python3 -m pytest tools -q
"""
from __future__ import annotations

import gzip
import os
import struct
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fmnist  # noqa: E402


def random_images(n: int, seed: int = 0) -> np.ndarray:
    """uint8 [n,28,28], neither blank nor saturated, pairwise distinct."""
    return np.random.default_rng(seed).integers(20, 240, size=(n, 28, 28), dtype=np.uint8)


# --- padding ---------------------------------------------------------------------------------

def test_pad_to_32_shape_border_and_interior():
    x = random_images(3)
    y = fmnist.pad_to_32(x)
    assert y.shape == (3, 32, 32)
    assert y.dtype == np.uint8
    np.testing.assert_array_equal(y[:, 2:30, 2:30], x)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert border.sum() == 32 * 32 - 28 * 28
    assert (y[:, border] == 0).all()


@pytest.mark.parametrize("shape", [(28, 28), (2, 32, 32), (2, 28, 27), (2, 1, 28, 28)])
def test_pad_to_32_rejects_other_shapes(shape):
    with pytest.raises(ValueError):
        fmnist.pad_to_32(np.zeros(shape, np.uint8))


# --- value range -----------------------------------------------------------------------------

def test_to_model_range_endpoints_and_type():
    v = fmnist.to_model_range(np.array([0, 255, 51], np.uint8))
    assert v.dtype == np.float32
    assert v[0] == -1.0 and v[1] == 1.0
    assert v[2] == pytest.approx(-0.6, abs=1e-6)
    all_values = fmnist.to_model_range(np.arange(256, dtype=np.uint8))
    assert all_values.min() == -1.0 and all_values.max() == 1.0
    assert (np.diff(all_values) > 0).all()
    np.testing.assert_allclose(np.diff(all_values), 2 / 255, rtol=1e-4)


def test_to_uint8_round_trip():
    u = np.arange(256, dtype=np.uint8)
    back = fmnist.to_uint8(fmnist.to_model_range(u))
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, u)


def test_to_uint8_clamps_and_rounds_like_the_runtime():
    # The Rust runtime's edge_diffuse::files::to_u8: -1 -> 0, 1 -> 255, 0 -> 128 (127.5 rounds up), 5 -> 255.
    x = np.array([-1.0, 1.0, 0.0, 5.0, -5.0, -0.99], np.float32)
    np.testing.assert_array_equal(fmnist.to_uint8(x), [0, 255, 128, 255, 0, 1])


# --- outliers --------------------------------------------------------------------------------

def outlier_set():
    x = random_images(6)
    x[2] = 0  # blank
    x[4] = 255  # saturated
    x[5] = x[1]  # duplicate of image 1
    return x


def test_find_outliers_on_a_synthetic_set():
    rep = fmnist.find_outliers(outlier_set())
    assert rep.n == 6
    assert rep.blank == [2]
    assert rep.saturated == [4]
    assert rep.duplicate_groups == [[1, 5]]
    assert "1 blank, 1 saturated, 1 groups of exact duplicates (1 redundant copies)" in rep.summary()


def test_find_outliers_thresholds():
    x = random_images(4, seed=1)
    x[0] = 8  # faint but at the blank threshold: blank
    x[1] = 0
    x[1, 0, 0] = 9  # one pixel above it: not blank
    x[2] = 255
    x[2, :3] = 0  # 84/784 = 10.7% not saturated: 89.3% at 255 is not > 90%
    x[3] = 255
    x[3, 0, :20] = 0  # 97.4% at 255: saturated
    rep = fmnist.find_outliers(x)
    assert rep.blank == [0]
    assert rep.saturated == [3]
    assert rep.duplicate_groups == []


def test_find_outliers_clean_set():
    rep = fmnist.find_outliers(random_images(10, seed=2))
    assert (rep.blank, rep.saturated, rep.duplicate_groups) == ([], [], [])


def write_idx(path: str, arr: np.ndarray):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_prepare_drops_outliers(tmp_path):
    x = outlier_set()
    labels = np.arange(6, dtype=np.uint8)
    write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), x)
    write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), labels)
    images, y, rep = fmnist.prepare("train", root=str(tmp_path))
    assert images.shape == (3, 1, 32, 32) and images.dtype == np.float32
    np.testing.assert_array_equal(y, [0, 1, 3])  # blank 2, saturated 4, copy 5 dropped
    assert y.dtype == np.int64
    np.testing.assert_array_equal(fmnist.to_uint8(images[:, 0, 2:30, 2:30]), x[[0, 1, 3]])
    assert (images[:, 0, :2] == -1).all() and (images[:, 0, :, 30:] == -1).all()
    kept_all, y_all, _ = fmnist.prepare("train", root=str(tmp_path), drop_outliers=False)
    assert kept_all.shape[0] == 6 and list(y_all) == list(range(6))


def test_read_idx_rejects_bad_files(tmp_path):
    p = tmp_path / "bad.gz"
    write_idx(str(p), np.zeros((2, 3), np.uint8))
    data = gzip.open(p).read()
    with gzip.open(p, "wb") as f:
        f.write(data[:-1])  # one byte short of the header's size
    with pytest.raises(ValueError):
        fmnist.read_idx(str(p))


# --- augmentation ----------------------------------------------------------------------------

def test_random_hflip_flips_exactly_the_chosen_images():
    b = 64
    x = torch.arange(b * 2 * 4 * 5, dtype=torch.float32).reshape(b, 2, 4, 5)  # no image is symmetric
    out = fmnist.random_hflip(x, generator=torch.Generator().manual_seed(123))
    chosen = torch.rand(b, generator=torch.Generator().manual_seed(123)) < 0.5
    assert 0 < int(chosen.sum()) < b, "both branches are exercised"
    assert out.shape == x.shape
    for i in range(b):
        want = x[i].flip(-1) if chosen[i] else x[i]
        assert torch.equal(out[i], want), f"image {i} (chosen {bool(chosen[i])})"
        assert not torch.equal(x[i].flip(-1), x[i])
    assert torch.equal(x, torch.arange(b * 2 * 4 * 5, dtype=torch.float32).reshape(b, 2, 4, 5)), "input untouched"


def test_random_hflip_is_seeded():
    x = torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    a = fmnist.random_hflip(x, generator=torch.Generator().manual_seed(5))
    b = fmnist.random_hflip(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
