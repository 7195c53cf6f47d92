"""Confounded binary tasks for DiDAE / CFKD: a poisoned training set where the label and a
confounder agree almost always, a test set balanced over the 4 (label, confounder) groups, an
unbiased pool and a held-out set for the dictionaries. Square (rendered from its factors) or
CelebA (tfds attributes)."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxcf.configs import ConfigError
from jaxcf.data.common import ArrayDataset


@dataclasses.dataclass
class ConfoundedData:
    """Arrays of each split: image (uint8), label, confounder, group, factors [N, F] (in [0, 1])
    and halves [N, F] (0/1: which half of each factor; the Procrustes targets)."""

    train: ArrayDataset  # poisoned (label and confounder agree rarely)
    test: ArrayDataset  # balanced over the 4 (label, confounder) groups
    pool: ArrayDataset  # unbiased: trains the encoder, the decoder and the oracle
    fit: ArrayDataset  # held out: fits the dictionaries
    factor_names: tuple[str, ...]


def images_of(ds: ArrayDataset) -> np.ndarray:
    """All images of a dataset as float32 in [-1, 1]."""
    return ds.get(np.arange(len(ds)), keys=("image",))["image"]


def square_factors(ds: ArrayDataset) -> np.ndarray:
    """The integer Square factors [N, 4] of a split (stored scaled to [0, 1])."""
    from jaxcf.data.square import FACTOR_RANGE

    return np.rint(ds.arrays["factors"] * FACTOR_RANGE).astype(np.int32)


def square_data(d, fit_examples: int) -> ConfoundedData:
    """Square splits from ``d`` (config.data): poisoned train, balanced test, unbiased pool and fit set."""
    from jaxcf.data.square import FACTOR_RANGE, factor_halves, square_dataset

    common = dict(resolution=d.resolution, seed=d.seed)

    def prep(ds):
        a = {k: v for k, v in ds.arrays.items() if k != "mask"}
        a["halves"] = factor_halves(a["factors"])
        a["factors"] = a["factors"].astype(np.float32) / FACTOR_RANGE
        return ArrayDataset(a, ds.class_names, ds.info)

    poisoned = dict(num_samples=d.num_samples, agree_fraction=d.agree_fraction, val_fraction=d.val_fraction, **common)
    return ConfoundedData(
        train=prep(square_dataset("train", **poisoned)),
        test=prep(square_dataset("test", num_test_per_group=d.num_test_per_group, **common)),
        pool=prep(square_dataset("unbiased", num_samples=d.unbiased_samples, **common)),
        fit=prep(square_dataset("unbiased", num_samples=fit_examples, resolution=d.resolution, seed=d.seed + 1)),
        factor_names=tuple(d.factors))


def celeba_data(d, fit_examples: int) -> ConfoundedData:
    """CelebA with a poisoned training set (group sizes as Square's) and a balanced test set."""
    from jaxcf.data.square import poisoned_group_sizes
    from jaxcf.data.tfds_data import tfds_dataset

    kw = dict(resolution=d.resolution, data_dir=d.data_dir or None, label_attribute=d.label_attribute,
              confounder_attribute=d.confounder_attribute)
    rng = np.random.default_rng(d.seed)

    def prep(ds, names):
        a = dict(ds.arrays)
        cols = [list(names).index(f) for f in d.factors]
        a["halves"] = a["attributes"][:, cols].astype(np.int32)
        a["factors"] = a["halves"].astype(np.float32)
        return ArrayDataset(a, ds.class_names, ds.info)

    def pick(split, sizes):
        ds = tfds_dataset(d.tfds_name, split, **kw)
        groups = ds.column("group")
        idx = []
        for g, k in enumerate(sizes):
            members = np.flatnonzero(groups == g)
            if len(members) < k:
                raise ConfigError(f"config.data: tfds {d.tfds_name} {split!r} has {len(members)} examples in "
                                  f"group {g} (label, confounder) = {divmod(g, 2)}; {k} are needed "
                                  "(lower config.data.num_samples / num_test_per_group)")
            idx.append(rng.choice(members, k, replace=False))
        return prep(ds.subset(np.sort(np.concatenate(idx))), ds.attribute_names)

    def pool(split, n):
        ds = tfds_dataset(d.tfds_name, split, **kw)
        n = min(n, len(ds))
        return prep(ds.subset(np.sort(rng.choice(len(ds), n, replace=False))), ds.attribute_names)

    n_train = int(round(d.num_samples * (1 - d.val_fraction)))
    return ConfoundedData(train=pick("train", poisoned_group_sizes(n_train, d.agree_fraction)),
                          test=pick("test", (d.num_test_per_group,) * 4),
                          pool=pool("train", d.unbiased_samples),
                          fit=pool("validation", fit_examples),
                          factor_names=tuple(d.factors))


def confounded_data(d, fit_examples: int) -> ConfoundedData:
    """The splits of ``config.data`` (name "square" or "celeba")."""
    return square_data(d, fit_examples) if d.name == "square" else celeba_data(d, fit_examples)
