"""DiCap's few-shot data: the shapes world (with a spurious background and ground-truth factors)
or a tfds dataset under the CoCoOp base-to-novel protocol."""

from __future__ import annotations

import numpy as np

from jaxcf import configs as cfgs
from jaxcf.data.shapes import SHAPE_NAMES, shapes_dataset


class ShapesSource:
    """The shapes world: few-shot set with a spurious background, base / novel / bias-conflicting tests."""

    def __init__(self, config):
        self.d = config.data
        self.base_names = list(self._split("test_base").class_names)
        self.novel_names = list(self._split("test_novel").class_names)
        if list(self.d.base_classes) != self.base_names or list(self.d.novel_classes) != self.novel_names:
            raise cfgs.ConfigError(f"config.data.base_classes / novel_classes must be the shapes world's split "
                                   f"{self.base_names} / {self.novel_names}")

    def _split(self, split, seed=7, **kw):
        """A split of the task domain: objects of data.object_size (() = the pretraining sizes);
        the base test set drawn like the shots (data.test_bias) unless test_bias < 0 (uniform)."""
        size = tuple(self.d.object_size) or None
        test_bias = self.d.test_bias if self.d.test_bias >= 0 else None
        return shapes_dataset(split, resolution=self.d.resolution, num_per_class=self.d.test_per_class, seed=seed,
                              object_size=size, test_bias=test_bias, **kw)

    def fewshot(self, seed):
        """(images, labels, object masks, factors) of the few-shot set."""
        ds = self._split("fewshot", seed=seed, shots=self.d.shots, bias=self.d.bias)
        arr = ds.get(np.arange(len(ds)), keys=("image", "label", "mask", "factors"))
        return arr["image"], arr["label"], arr["mask"], arr["factors"]

    def shape_of(self, labels):
        """Shape indices of base-class labels."""
        return np.array([SHAPE_NAMES.index(self.base_names[i]) for i in labels], np.int32)

    def tests(self):
        out = {}
        for k in ("base", "novel", "conflict"):
            arr = (ds := self._split(f"test_{k}")).get(np.arange(len(ds)), keys=("image", "label"))
            out[k] = (arr["image"], arr["label"])
        return out


class TfdsSource:
    """A tfds dataset under the CoCoOp protocol: k shots per base class; base and novel test sets."""

    def __init__(self, config):
        from jaxcf.data.common import get_dataset
        from jaxcf.data.tfds_data import DatasetNotPreparedError

        self.d = config.data
        self.get = get_dataset
        self.kw = dict(resolution=self.d.resolution, data_dir=self.d.data_dir or None,
                       class_names_file=self.d.class_names_file or None)
        self.classes = {"base": list(self.d.base_classes) or "base", "novel": list(self.d.novel_classes) or "novel"}
        try:
            self.base_names = list(self.get(self.d.name, split="train", classes=self.classes["base"], **self.kw).class_names)
            self.novel_names = list(self.get(self.d.name, split="test", classes=self.classes["novel"], **self.kw).class_names)
        except (ValueError, DatasetNotPreparedError) as e:
            raise cfgs.ConfigError(f"config.data.name={self.d.name!r} (config.data.data_dir={self.d.data_dir!r}): "
                                   f"{e}") from e

    def fewshot(self, seed):
        ds = self.get(self.d.name, split="train", classes=self.classes["base"], shots=self.d.shots, seed=seed, **self.kw)
        arr = ds.get(np.arange(len(ds)), keys=("image", "label"))
        counts = np.bincount(arr["label"], minlength=len(self.base_names))
        if counts.min() < self.d.shots:
            worst = int(np.argmin(counts))
            raise cfgs.ConfigError(f"config.data.shots={self.d.shots} is larger than the data: class "
                                   f"{self.base_names[worst]!r} has only {counts[worst]} training images")
        return arr["image"], arr["label"], None, None

    def tests(self):
        out = {}
        for k in ("base", "novel"):
            ds = self.get(self.d.name, split="test", classes=self.classes[k], **self.kw)
            n = len(ds) if not self.d.max_test_examples else min(len(ds), self.d.max_test_examples)
            sub = ds.subset(np.sort(np.random.default_rng(7).permutation(len(ds))[:n]))  # in memory
            arr = sub.get(np.arange(len(sub)), keys=("image", "label"))
            out[k] = (arr["image"], arr["label"])
        return out


def few_shot_source(config):
    """The source named by ``config.data.name``: "shapes" or "tfds:<name>"."""
    return ShapesSource(config) if config.data.name == "shapes" else TfdsSource(config)
