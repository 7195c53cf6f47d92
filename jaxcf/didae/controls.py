"""Ground-truth checks of a DiDAE autoencoder on Square (METHODS §6), read by the pixel reader.

Square is a pure function of its four factors, so every generator failure can be told apart from a
failure of what comes after it:
  identity      invert with z, decode with the same z: the reconstruction error;
  fresh noise   decode x_T ~ N(0, I) with the code z of a real image: is the decoder a generator?
  swap k        decode the input's x_T with the code of the input re-rendered with factor k moved to
                its other half: the cleanest possible edit of factor k;
  atoms         what each dictionary atom's reflection changes, per factor (disentanglement matrix).
Every image is read by :func:`jaxcf.data.square.read_square` (a least-squares fit of the
renderer, no learned model): colours in 0..255, positions in 64-px units.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from jaxcf.data.square import FACTOR_NAMES, FACTOR_RANGE, read_square, render_square, swap_factor


def read(images: np.ndarray) -> np.ndarray:
    """Factors [N, 4] of images in [-1, 1]."""
    return read_square(images, signed=True)["factors"]


def per_factor(values: np.ndarray) -> dict:
    return {name: float(v) for name, v in zip(FACTOR_NAMES, values)}


def rerender(factors: np.ndarray, resolution: int, seed: int) -> np.ndarray:
    """Square images of ``factors`` in [-1, 1] (fresh pixel noise from ``seed``)."""
    img, _ = render_square(factors, np.random.default_rng(seed), resolution=resolution)
    return img.astype(np.float32) / 127.5 - 1.0


def generator_controls(x: np.ndarray, factors: np.ndarray, encode: Callable, invert: Callable, decode: Callable,
                       *, seed: int = 0) -> dict:
    """The identity, fresh-noise and per-factor swap controls on inputs x [N, R, R, 3] in [-1, 1].

    factors: the inputs' true factors [N, 4]; encode(x) -> z, invert(x, z) -> x_T,
    decode(x_T, z) -> x (numpy in, numpy out). Returns a dict of per-factor mean |errors| (colour
    units 0..255, positions in 64-px units) and, per swap, the fraction of the way the swapped
    factor moved (median and mean over inputs; 1 = all the way) and the change of the others.
    Also returns the images for a grid under "images".
    """
    r = x.shape[1]
    z = encode(x)
    x_T = invert(x, z)
    read_in = read_square(x, signed=True)
    read_x = read_in["factors"]
    recon = decode(x_T, z)
    noise = np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)
    fresh = decode(noise, z)
    read_fresh = read_square(fresh, signed=True)
    out = {"identity": per_factor(np.abs(read(recon) - read_x).mean(0)),
           "fresh_noise": per_factor(np.abs(read_fresh["factors"] - read_x).mean(0)),
           "fresh_noise_rms": float(read_fresh["rms"].mean()),
           "input_rms": float(read_in["rms"].mean()),
           "swap": {}}
    images = {"input": x, "reconstruction": recon, "fresh_noise": fresh}
    for k, name in enumerate(FACTOR_NAMES):
        target = rerender(swap_factor(factors, k), r, seed + 1 + k)
        moved = decode(x_T, encode(target))
        f_moved, f_target = read(moved), read(target)
        want = f_target[:, k] - read_x[:, k]
        frac = (f_moved[:, k] - read_x[:, k]) / np.where(np.abs(want) < 1e-6, 1e-6, want)
        others = np.abs(f_moved - read_x).mean(0)
        out["swap"][name] = dict(moved_fraction_median=float(np.median(frac)), moved_fraction_mean=float(frac.mean()),
                                 moved_at_least_80pct=float(np.mean(frac >= 0.8)),
                                 others={n: float(v) for j, (n, v) in enumerate(zip(FACTOR_NAMES, others)) if j != k})
        images[f"swap_{name}"] = moved
        images[f"target_{name}"] = target
    out["images"] = images
    return out


def reader_disentanglement(x: np.ndarray, edited: np.ndarray) -> np.ndarray:
    """Mean |factor change| [K, 4] of edits edited [K, N, ...] of x [N, ...], read from pixels and
    scaled by each factor's range (colours / 255, positions / 51)."""
    before = read(x)
    return np.stack([np.abs(read(e) - before).mean(0) / FACTOR_RANGE for e in edited])


def ground_truth_counterfactuals(factors: np.ndarray, resolution: int, seed: int = 0) -> np.ndarray:
    """For each factor k, the inputs re-rendered with factor k moved to its other half: [4, N, R, R, 3] in [-1, 1].

    The perfect counterfactuals of a Procrustes dictionary on Square (atom k = factor k); fed to
    CFKD in place of decoded ones they give the upper bound of the fine-tuning loop.
    """
    return np.stack([rerender(swap_factor(factors, k), resolution, seed + 100 + k) for k in range(len(FACTOR_NAMES))])
