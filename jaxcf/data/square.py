"""The Square benchmark of DiDAE / CFKD (METHODS.md §3).

A 64x64 RGB image per sample with four latent factors (in 64-px units whatever the resolution):
ColorA (red of the inner square; the true feature), ColorB (background grey; the confounder),
PositionX, PositionY (top-left corner of the 12x12 square). Each factor is drawn from its low
or high half: colours U{0..127} / U{128..255}, positions U{0..25} / U{26..51}.
Label = ColorA >= 128; confounder = ColorB >= 128; group = 2 * label + confounder, i.e. groups
(a, c) = (0,0), (0,1), (1,0), (1,1) are 0..3.

`resolution` scales positions, square (12), border (2) and inner square (8) by resolution / 64
for fast tests; the factors stay in 64-px units (pixel position = floor(factor * res / 64)).
"""

from __future__ import annotations

import numpy as np

from jaxcf.configs import check_value
from jaxcf.data.common import ArrayDataset

FACTOR_NAMES = ("ColorA", "ColorB", "PositionX", "PositionY")
# What a Square encoder predicts: the high / low half of each factor (one-hot pair per factor).
ATTRIBUTE_NAMES = tuple(f"{f}_{half}" for f in FACTOR_NAMES for half in ("high", "low"))
GROUPS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (label a, confounder c); group id = 2a + c
CLASS_NAMES = ("low ColorA", "high ColorA")
SPLITS = ("train", "val", "test", "unbiased")
_SPLIT_STREAM = {"train": 0, "val": 0, "test": 1, "unbiased": 2}

BORDER_GREY = 127
# the largest value of each factor (colours 0..255, positions 0..51): factors / FACTOR_RANGE lie in [0, 1]
FACTOR_RANGE = np.array([255.0, 255.0, 51.0, 51.0], np.float32)


def geometry(resolution: int) -> tuple[int, int, int]:
    """(square size, border width, inner size) in pixels at `resolution`."""
    if resolution < 16:
        raise ValueError(f"resolution must be >= 16, got {resolution}.")
    s = resolution / 64
    size = round(12 * s)
    border = max(1, round(2 * s))
    return size, border, size - 2 * border


def sample_factors(halves: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """halves: int [N, 4] in {0 (low), 1 (high)} per factor -> factors int32 [N, 4]."""
    halves = np.asarray(halves)
    colour = rng.integers(0, 128, size=(len(halves), 2)) + 128 * halves[:, :2]
    position = rng.integers(0, 26, size=(len(halves), 2)) + 26 * halves[:, 2:]
    return np.concatenate([colour, position], axis=1).astype(np.int32)


def factor_halves(factors: np.ndarray) -> np.ndarray:
    """factors int [N, 4] -> halves int32 [N, 4] (1 = high half)."""
    factors = np.asarray(factors)
    return np.stack([factors[:, 0] >= 128, factors[:, 1] >= 128,
                     factors[:, 2] >= 26, factors[:, 3] >= 26], axis=1).astype(np.int32)


def factor_attributes(factors: np.ndarray) -> np.ndarray:
    """factors int [N, 4] -> the 8 binary attributes int32 [N, 8] in ATTRIBUTE_NAMES order."""
    halves = factor_halves(factors)
    return np.stack([halves, 1 - halves], axis=2).reshape(len(halves), 8)


def swap_factor(factors: np.ndarray, k: int) -> np.ndarray:
    """Factors [N, 4] with factor k moved to its other half, same offset within the half
    (colours +-128, positions +-26): the ground-truth intervention on one factor."""
    f = np.array(factors, dtype=np.int32, copy=True)
    half = 128 if k < 2 else 26
    f[:, k] = np.where(f[:, k] >= half, f[:, k] - half, f[:, k] + half)
    return f


def render_square(factors: np.ndarray, rng: np.random.Generator, *, resolution: int = 64,
                  noise_std: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """Draws Square images.

    factors: int [N, 4] (ColorA, ColorB, PositionX, PositionY) in 64-px units.
    Returns images uint8 [N, R, R, 3] and the inner-square mask bool [N, R, R].
    """
    factors = np.asarray(factors, dtype=np.int64)
    n, r = len(factors), resolution
    size, border, _ = geometry(r)
    x0 = np.minimum(factors[:, 2] * r // 64, r - size)[:, None, None]  # [N, 1, 1]
    y0 = np.minimum(factors[:, 3] * r // 64, r - size)[:, None, None]
    rows = np.arange(r)[None, :, None]  # [1, R, 1]
    cols = np.arange(r)[None, None, :]  # [1, 1, R]

    def box(offset, extent):
        return ((rows >= y0 + offset) & (rows < y0 + offset + extent)
                & (cols >= x0 + offset) & (cols < x0 + offset + extent))

    square = box(0, size)  # [N, R, R]
    inner = box(border, size - 2 * border)
    img = np.empty((n, r, r, 3), np.float32)
    img[...] = factors[:, 1, None, None, None]  # background grey = ColorB
    np.copyto(img, np.float32(BORDER_GREY), where=square[..., None])
    red = np.zeros((n, 1, 1, 3), np.float32)
    red[:, 0, 0, 0] = factors[:, 0]
    np.copyto(img, red, where=inner[..., None])
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= noise_std
    img += noise
    return np.clip(np.rint(img, out=img), 0, 255, out=img).astype(np.uint8), inner


def poisoned_group_sizes(num_samples: int, agree_fraction: float) -> tuple[int, int, int, int]:
    """Sizes of groups (a, c) = (0,0), (0,1), (1,0), (1,1): label and confounder agree in a
    fraction `agree_fraction` (N=1000, 0.02 -> 10 / 490 / 490 / 10)."""
    if not 0.0 <= agree_fraction <= 1.0:
        raise ValueError(f"agree_fraction must be in [0, 1], got {agree_fraction}.")
    agree = int(round(num_samples * agree_fraction / 2))
    d0 = (num_samples - 2 * agree) // 2
    return agree, d0, num_samples - 2 * agree - d0, agree


def _group_arrays(sizes, rng, resolution, noise_std):
    """All arrays for groups of the given sizes; positions' halves balanced within a group."""
    groups = np.concatenate([np.full(k, g) for g, k in enumerate(sizes)]).astype(np.int32)
    within = np.concatenate([np.arange(k) for k in sizes])
    halves = np.stack([groups // 2, groups % 2, within % 2, (within // 2) % 2], axis=1)
    factors = sample_factors(halves, rng)
    images, mask = render_square(factors, rng, resolution=resolution, noise_std=noise_std)
    return {
        "image": images,
        "label": (groups // 2).astype(np.int32),
        "confounder": (groups % 2).astype(np.int32),
        "group": groups,
        "factors": factors,
        "attributes": factor_attributes(factors),
        "mask": mask,
    }


def square_dataset(split: str = "train", *, num_samples: int = 1000, agree_fraction: float = 0.02,
                   val_fraction: float = 0.2, num_test_per_group: int = 400,
                   resolution: int = 64, noise_std: float = 20.0, seed: int = 0) -> ArrayDataset:
    """One split of Square as an ArrayDataset.

    split: "train" / "val": the poisoned set of `num_samples` (group sizes from
      `poisoned_group_sizes`), split (1 - val_fraction) / val_fraction within each group;
      "test": balanced, `num_test_per_group` per group; "unbiased": balanced, `num_samples` in all
      (e.g. to train a Square encoder or an oracle teacher).
    Arrays: image uint8 [N, R, R, 3]; label, confounder, group int32 [N]; factors int32 [N, 4]
    (FACTOR_NAMES); attributes int32 [N, 8] (ATTRIBUTE_NAMES); mask bool [N, R, R] (inner square).
    """
    check_value("split", split, SPLITS)
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    if split in ("train", "val"):
        sizes = poisoned_group_sizes(num_samples, agree_fraction)
    elif split == "test":
        sizes = (num_test_per_group,) * 4
    else:
        sizes = tuple(num_samples // 4 + (g < num_samples % 4) for g in range(4))
    arrays = _group_arrays(sizes, rng, resolution, noise_std)
    order = rng.permutation(len(arrays["label"]))
    if split in ("train", "val"):
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        keep = []
        for g, k in enumerate(sizes):
            members = order[arrays["group"][order] == g]  # group g in shuffled order
            n_val = int(round(k * val_fraction))
            keep.append(members[n_val:] if split == "train" else members[:n_val])
        order = np.sort(np.concatenate(keep))
        order = rng.permutation(order)
    arrays = {k: v[order] for k, v in arrays.items()}
    info = {"group_sizes": tuple(int((arrays["group"] == g).sum()) for g in range(4)),
            "factor_names": FACTOR_NAMES, "attribute_names": ATTRIBUTE_NAMES,
            "resolution": resolution}
    return ArrayDataset(arrays, CLASS_NAMES, info)


# ----------------------------------------------------------------------------- model-free reader


def _box_sums(z: np.ndarray, size: int) -> np.ndarray:
    """Sums of z [N, R, R] over every size x size window: [N, R - size + 1, R - size + 1] (rows, cols)."""
    c = np.pad(np.cumsum(np.cumsum(z, axis=1), axis=2), ((0, 0), (1, 0), (1, 0)))
    return c[:, size:, size:] - c[:, :-size, size:] - c[:, size:, :-size] + c[:, :-size, :-size]


def clipped_mean(value: np.ndarray, noise_std: float) -> np.ndarray:
    """E[clip(value + noise_std * N(0, 1), 0, 255)]: the mean pixel of a flat region of grey ``value``."""
    from math import erf, exp, pi, sqrt

    v = np.asarray(value, np.float64)
    if noise_std <= 0:
        return np.clip(v, 0, 255)
    cdf = np.vectorize(lambda u: 0.5 * (1 + erf(u / sqrt(2))))
    pdf = np.vectorize(lambda u: exp(-u * u / 2) / sqrt(2 * pi))
    lo, hi = (0 - v) / noise_std, (255 - v) / noise_std
    return v * (cdf(hi) - cdf(lo)) + noise_std * (pdf(lo) - pdf(hi)) + 255 * (1 - cdf(hi))


def read_square(images: np.ndarray, *, signed: bool = False, noise_std: float = 20.0) -> dict:
    """Reads the four Square factors back from pixels by fitting the renderer; no learned model.

    For every placement of the square the least-squares fit of the known template (flat grey
    background b in all channels, grey-127 border, inner square (a, 0, 0)) has closed-form b and
    a; the placement with the smallest residual wins. Colours are then corrected for the clipping
    of the pixel noise at 0 and 255 (the renderer's ``noise_std``; 0: no correction), so that a
    rendered image reads back its own factors within the noise.

    images: [N, R, R, 3], uint8 / float in [0, 255], or float in [-1, 1] with ``signed=True``.
    Returns factors float [N, 4] (ColorA, ColorB, PositionX, PositionY; positions in 64-px units,
    the left/top pixel of the square times 64 / R), pixel [N, 2] int (x, y of the square's
    top-left pixel) and rms [N] (residual of the fit per pixel value; Square images have about
    ``noise_std``, off-manifold images more).
    """
    x = np.asarray(images, np.float64)
    if signed:
        x = (x + 1.0) * 127.5
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != x.shape[2]:
        raise ValueError(f"read_square: images must be [N, R, R, 3]; got {x.shape}")
    n, r = x.shape[:2]
    size, border, inner = geometry(r)
    s1, s2 = x.sum(-1), (x * x).sum(-1)  # over channels: [N, R, R]
    q1, q2 = _box_sums(s1, size), _box_sums(s2, size)  # square windows at every top-left (y, x)
    m = r - size + 1
    crop = lambda a: a[:, :m, :m]  # inner window at offset `border` from the square's corner
    i1 = crop(_box_sums(s1, inner)[:, border:, border:])
    i2 = crop(_box_sums(s2, inner)[:, border:, border:])
    ir1 = crop(_box_sums(x[..., 0], inner)[:, border:, border:])
    ir2 = crop(_box_sums(x[..., 0] ** 2, inner)[:, border:, border:])
    n_bg, n_border, n_in = 3 * (r * r - size * size), 3 * (size * size - inner * inner), inner * inner
    bg1 = s1.sum((1, 2))[:, None, None] - q1
    bg2 = s2.sum((1, 2))[:, None, None] - q2
    sse = (bg2 - bg1 ** 2 / n_bg  # background: flat grey at its mean
           + (q2 - i2) - 2 * BORDER_GREY * (q1 - i1) + BORDER_GREY ** 2 * n_border  # border: grey 127
           + (ir2 - ir1 ** 2 / n_in) + (i2 - ir2))  # inner: red at its mean, green and blue at 0
    best = sse.reshape(n, -1).argmin(1)
    py, px = np.divmod(best, m)
    rows = np.arange(n)
    b = bg1[rows, py, px] / n_bg
    a = ir1[rows, py, px] / n_in
    if noise_std > 0:  # undo the clipping bias: invert the monotone mean of a clipped noisy grey
        grid = np.linspace(0, 255, 1021)
        means = clipped_mean(grid, noise_std)
        b, a = np.interp(b, means, grid), np.interp(a, means, grid)
    rms = np.sqrt(np.maximum(sse[rows, py, px], 0) / (3 * r * r))
    factors = np.stack([a, b, px * 64.0 / r, py * 64.0 / r], axis=1)
    return {"factors": factors, "pixel": np.stack([px, py], axis=1).astype(np.int32), "rms": rms}
