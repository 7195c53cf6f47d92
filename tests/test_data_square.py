"""Square benchmark (METHODS.md §3) and the shared batching contract (common.py)."""

import numpy as np
import pytest

from jaxcf.data import ArrayDataset, get_dataset, square_dataset
from jaxcf.data import square


@pytest.fixture(scope="module")
def test64():
    return square_dataset("test", num_test_per_group=60, seed=3)


def test_poisoned_group_sizes_and_split():
    assert square.poisoned_group_sizes(1000, 0.02) == (10, 490, 490, 10)
    train, val = square_dataset("train"), square_dataset("val")
    assert train.info["group_sizes"] == (8, 392, 392, 8)
    assert val.info["group_sizes"] == (2, 98, 98, 2)
    a, c = train.arrays["label"], train.arrays["confounder"]
    assert np.mean(a != c) == pytest.approx(0.98, abs=1e-9)
    # Train and val are disjoint parts of one pool.
    rows = {tuple(f) for f in train.arrays["factors"]} & {tuple(f) for f in val.arrays["factors"]}
    assert len(rows) <= 2  # only chance collisions of identical factor draws
    assert square_dataset("test", resolution=32).info["group_sizes"] == (400,) * 4


def test_labels_factors_attributes(test64):
    f = test64.arrays["factors"]
    assert test64.arrays["image"].shape == (240, 64, 64, 3)
    assert test64.arrays["image"].dtype == np.uint8
    np.testing.assert_array_equal(test64.arrays["label"], f[:, 0] >= 128)
    np.testing.assert_array_equal(test64.arrays["confounder"], f[:, 1] >= 128)
    np.testing.assert_array_equal(test64.arrays["group"],
                                  2 * test64.arrays["label"] + test64.arrays["confounder"])
    assert f[:, :2].min() >= 0 and f[:, :2].max() <= 255
    assert f[:, 2:].min() >= 0 and f[:, 2:].max() <= 51
    attrs = test64.arrays["attributes"]
    assert attrs.shape == (240, 8) and (attrs[:, 0::2] + attrs[:, 1::2] == 1).all()
    np.testing.assert_array_equal(attrs[:, 0], f[:, 0] >= 128)  # ColorA_high
    np.testing.assert_array_equal(attrs[:, 4], f[:, 2] >= 26)  # PositionX_high
    # Every (label, confounder, x-half, y-half) combination occurs.
    assert len({tuple(h) for h in square.factor_halves(f)}) == 16


def test_pixel_statistics(test64):
    img = test64.arrays["image"].astype(np.float64)
    f = test64.arrays["factors"]
    rows, cols = np.arange(64)[:, None], np.arange(64)[None, :]
    checked = 0
    for im, (a, b, x, y), mask in zip(img, f, test64.arrays["mask"]):
        square_px = (rows >= y) & (rows < y + 12) & (cols >= x) & (cols < x + 12)
        inner = (rows >= y + 2) & (rows < y + 10) & (cols >= x + 2) & (cols < x + 10)
        np.testing.assert_array_equal(mask, inner)
        border = square_px & ~inner
        assert abs(im[border].mean() - 127) < 6  # 240 values, s.e. 1.3
        if 70 <= b <= 185:  # away from clipping
            bg = im[~square_px]
            assert abs(bg.mean() - b) < 1.5
            assert abs(bg.std() - 20) < 1.5
            checked += 1
        if 70 <= a <= 185:
            assert abs(im[inner][:, 0].mean() - a) < 11  # 64 values, s.e. 2.5
        assert im[inner][:, 1:].mean() < 15  # green and blue are 0 (+ clipped noise)
    assert checked > 50


def test_resolution_scales_geometry():
    ds = square_dataset("test", num_test_per_group=5, resolution=32, seed=1)
    assert ds.arrays["image"].shape == (20, 32, 32, 3)
    assert square.geometry(32) == (6, 1, 4)
    for (_, _, x, y), mask in zip(ds.arrays["factors"], ds.arrays["mask"]):
        r, c = np.nonzero(mask)
        assert mask.sum() == 16
        assert (r.min(), c.min()) == (y // 2 + 1, x // 2 + 1)


def test_deterministic_and_seeded():
    a = square_dataset("val", resolution=32, seed=0)
    b = square_dataset("val", resolution=32, seed=0)
    c = square_dataset("val", resolution=32, seed=1)
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    assert not np.array_equal(a.arrays["image"], c.arrays["image"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="split.*'train'"):
        square_dataset("training")
    with pytest.raises(ValueError, match="resolution"):
        square_dataset("test", resolution=8)


# ----------------------------------------------------------------------------- batching


def _toy(n=10):
    return ArrayDataset({"image": np.arange(n, dtype=np.uint8)[:, None, None, None]
                         .repeat(2, 1).repeat(2, 2).repeat(3, 3),
                         "label": np.arange(n, dtype=np.int32)}, class_names=("a",))


def test_get_contract():
    ds = _toy(10)
    b = ds.get(np.arange(4))
    assert b["image"].dtype == np.float32 and b["image"].shape == (4, 2, 2, 3)
    assert b["label"].dtype == np.int32
    np.testing.assert_allclose(b["image"][:, 0, 0, 0], b["label"] / 127.5 - 1)


def test_get_errors_and_dataset_names():
    ds = _toy(10)
    with pytest.raises(ValueError, match="keys"):
        ds.get([0, 1], keys=("image", "nope"))
    assert set(ds.get([0, 1], keys=("label",))) == {"label"}
    sq = get_dataset("square", split="test", num_test_per_group=2, resolution=16)
    assert len(sq) == 8 and sq.class_names == square.CLASS_NAMES
    with pytest.raises(ValueError, match="dataset name.*square"):
        get_dataset("mnist")
    assert len(ds.kshot(1, seed=0)) == 10
