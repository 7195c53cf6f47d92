"""The model-free Square factor reader and the ground-truth controls built on it."""

import numpy as np
import pytest

from jaxcf.data.square import geometry, read_square, render_square, square_dataset, swap_factor
from jaxcf.didae import controls


@pytest.mark.parametrize("resolution", [32, 64])
def test_reader_recovers_rendered_factors(resolution):
    ds = square_dataset("unbiased", num_samples=200, resolution=resolution, seed=5)
    img, f = ds.arrays["image"], ds.arrays["factors"]
    out = read_square(img)
    size = geometry(resolution)[0]
    np.testing.assert_array_equal(out["pixel"], np.minimum(f[:, 2:] * resolution // 64, resolution - size))
    inner = (size - 2 * geometry(resolution)[1]) ** 2
    err = np.abs(out["factors"][:, :2] - f[:, :2])
    # ColorA is the mean of `inner` noisy pixels (std 20 / sqrt(inner)); ColorB of the whole background
    assert err[:, 0].mean() < 1.2 * 20 / np.sqrt(inner) and err[:, 1].max() < 2.0
    assert abs(out["rms"].mean() - 20) < 2.5  # the fit leaves the pixel noise
    signed = read_square(img.astype(np.float32) / 127.5 - 1, signed=True)
    np.testing.assert_allclose(signed["factors"], out["factors"], atol=1e-3)


def test_reader_without_noise_is_exact_and_flags_off_manifold_images():
    f = np.array([[200, 30, 10, 40], [5, 250, 51, 0], [128, 127, 25, 26]])
    img, _ = render_square(f, np.random.default_rng(0), resolution=64, noise_std=0.0)
    out = read_square(img, noise_std=0.0)
    np.testing.assert_allclose(out["factors"], f, atol=1e-9)
    assert out["rms"].max() < 1e-6
    junk = np.random.default_rng(1).integers(0, 256, img.shape).astype(np.uint8)
    assert read_square(junk)["rms"].min() > 60  # colour noise is nowhere near a Square image


def test_swap_factor_moves_one_factor_to_its_other_half():
    f = np.array([[10, 200, 3, 30], [130, 5, 40, 12]])
    for k, half in enumerate((128, 128, 26, 26)):
        s = swap_factor(f, k)
        np.testing.assert_array_equal(np.delete(s, k, 1), np.delete(f, k, 1))
        np.testing.assert_array_equal(np.abs(s[:, k] - f[:, k]), half)
        np.testing.assert_array_equal(swap_factor(s, k), f)


def test_ground_truth_counterfactuals_are_disentangled_by_the_reader():
    ds = square_dataset("unbiased", num_samples=64, resolution=32, seed=2)
    f = ds.arrays["factors"]
    x = ds.arrays["image"].astype(np.float32) / 127.5 - 1
    gt = controls.ground_truth_counterfactuals(f, 32)
    m = controls.reader_disentanglement(x, gt)  # [4 atoms, 4 factors]
    for k in range(4):
        assert m[k, k] > 0.4 and m[k, k] > 10 * np.delete(m[k], k).max(), m


def test_generator_controls_of_a_perfect_autoencoder():
    """A decoder that renders its code exactly: identity and swaps are perfect, so the controls
    report what the reader alone contributes (pixel noise), and every swap moves all the way."""
    ds = square_dataset("unbiased", num_samples=24, resolution=32, seed=3)
    f = ds.arrays["factors"]
    x = ds.arrays["image"].astype(np.float32) / 127.5 - 1
    encode = lambda im: controls.read(im)  # the code: the factors themselves
    invert = lambda im, z: im
    decode = lambda x_T, z: controls.rerender(np.rint(z).astype(np.int32), 32, seed=7)
    out = controls.generator_controls(x, f, encode, invert, decode, seed=0)
    assert out["identity"]["PositionX"] < 1.0 and out["identity"]["ColorB"] < 2.0
    for name, s in out["swap"].items():
        assert s["moved_fraction_median"] > 0.9, (name, s)
        assert s["others"] and all(v < 12 for v in s["others"].values()), (name, s)
    broken = controls.generator_controls(x, f, encode, invert, lambda x_T, z: x_T, seed=0)  # ignores the code
    assert all(abs(s["moved_fraction_median"]) < 0.1 for s in broken["swap"].values())
    assert broken["fresh_noise_rms"] > 60


def test_ground_truth_counterfactuals_repair_a_shortcut_student():
    """The CFKD data path on perfect counterfactuals: a logistic student on the four read-back
    factors, trained on poisoned Square (label = ColorA high; ColorB agrees with it 2% of the
    time), leans on the background; adding the inputs re-rendered with ColorB / a position moved
    ("false" counterfactuals with their source labels, the preclustered teacher's exact labels)
    shrinks its ColorB weight and raises its balanced-group accuracy."""
    from jaxcf.didae import cfkd

    res = 16
    train = square_dataset("train", num_samples=1000, agree_fraction=0.02, resolution=res, seed=0)
    test = square_dataset("test", num_test_per_group=100, resolution=res, seed=0)
    centre = np.array([127.5, 127.5, 25.5, 25.5])
    feats = lambda x: (read_square(x)["factors"] - centre) / centre
    y = train.arrays["label"]

    def fit(x, labels):
        w, b = cfkd.fit_linear_probe(feats(x), labels, bias=True, steps=300, l2=1e-2)
        pred = (feats(test.arrays["image"]) @ np.asarray(w) + float(b) > 0).astype(np.int32)
        return cfkd.aga(pred, test.arrays["label"], test.arrays["group"]), np.asarray(w)

    aga_before, w_before = fit(train.arrays["image"], y)
    x_gt = controls.ground_truth_counterfactuals(train.arrays["factors"], res)  # [4, N, ...] in [-1, 1]
    is_true, labels = cfkd.preclustered_labels(np.arange(4) == 0, y)  # atom 0 = ColorA, the true factor
    x_add, y_add = cfkd.counterfactual_training_set(x_gt, labels, ~is_true)  # only "false" ones
    assert len(y_add) == 3 * len(y)
    x_add = np.clip(np.rint((x_add + 1) * 127.5), 0, 255).astype(np.uint8)
    aga_after, w_after = fit(np.concatenate([train.arrays["image"], x_add]), np.concatenate([y, y_add]))
    assert aga_before < 0.82 and aga_after > aga_before + 0.1, (aga_before, aga_after)
    assert abs(w_after[1]) < 0.5 * abs(w_before[1]), (w_before, w_after)  # the shortcut weight shrinks
