"""Datasets with random access, class selection, padded chunks and the dataset names.

Every dataset gives dict batches of numpy arrays from ``get(indices, keys)``:
    image: float32 [B, H, W, 3] in [-1, 1]; label: int32 [B]; plus dataset-specific keys.
Training batches are ``get(stream_indices(...))`` (:func:`jaxcf.train.loop.stream_indices`: a
pure function of the step, so a resumed run rebuilds any batch, each process reading its
share); evaluation goes through :func:`jaxcf.train.batched.batched` over :func:`padded_batches`.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jaxcf.configs import check_value

Batch = dict[str, np.ndarray]
check_choice = check_value  # the name jaxcf.data.shapes imports


def _short_list(values: Sequence[Any], limit: int = 40) -> str:
    values = list(values)
    text = ", ".join(repr(v) for v in values[:limit])
    return text + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] in [0, 255] -> float32 in [-1, 1]; float input is taken as in range."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    return images.astype(np.float32, copy=False)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> uint8 [0, 255] (for saving and metrics)."""
    return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def finalize_batch(batch: Mapping[str, np.ndarray], keys: Sequence[str] | None = None) -> Batch:
    """Selects `keys` and converts the stored uint8 image to float32 [-1, 1]."""
    if keys is not None:
        missing = [k for k in keys if k not in batch]
        if missing:
            raise ValueError(f"Unknown batch keys {missing}; allowed: {sorted(batch)}.")
        batch = {k: batch[k] for k in keys}
    out = dict(batch)
    if "image" in out:
        out["image"] = to_model_range(out["image"])
    return out


# ----------------------------------------------------------------------------- classes


def padded_batches(x: np.ndarray, batch_size: int):
    """Yields (chunk, n) over x's first axis: every chunk has ``batch_size`` rows (the last padded by
    repeating its final row) so a jitted function compiles once; the first n rows are real."""
    for i in range(0, len(x), batch_size):
        chunk = x[i:i + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        yield chunk, n


def base_novel_split(num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """CoCoOp split of the label order: base = first ceil(n/2) classes, novel = the rest."""
    m = math.ceil(num_classes / 2)
    return np.arange(m), np.arange(m, num_classes)


def select_classes(class_names: Sequence[str], classes: str | Sequence[str] = "all") -> np.ndarray:
    """Indices (into `class_names`) of the chosen classes; the new label is the position here.

    classes: "all", "base", "novel" (CoCoOp halves of the label order) or a list of class names.
    """
    n = len(class_names)
    if isinstance(classes, str):
        check_value("classes", classes, ("all", "base", "novel"))
        if classes == "all":
            return np.arange(n)
        base, novel = base_novel_split(n)
        return base if classes == "base" else novel
    lookup = {c: i for i, c in enumerate(class_names)}
    unknown = [c for c in classes if c not in lookup]
    if unknown:
        raise ValueError(f"Unknown classes {unknown}; allowed: 'all', 'base', 'novel' or names "
                         f"from {_short_list(class_names)}.")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes has duplicates: {list(classes)}.")
    return np.asarray([lookup[c] for c in classes], dtype=np.int64)


def relabel_table(num_raw: int, selected: np.ndarray) -> np.ndarray:
    """int32 [num_raw]: raw label -> position in `selected`, -1 for classes left out."""
    table = np.full((num_raw,), -1, np.int32)
    table[np.asarray(selected)] = np.arange(len(selected), dtype=np.int32)
    return table


def kshot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Sorted indices of `shots` examples per class drawn without replacement (all if fewer)."""
    if shots <= 0:
        raise ValueError(f"shots must be positive, got {shots}.")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        chosen.append(rng.choice(idx, size=min(shots, len(idx)), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros((0,), np.int64)


class IndexedDataset:
    """A finite dataset with random access; subclasses define `__len__`, `labels` and `load`."""

    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def labels(self) -> np.ndarray:
        """int32 [N] labels (indices into class_names)."""
        raise NotImplementedError

    def load(self, indices: np.ndarray) -> Batch:
        """Raw examples (uint8 images) at `indices`."""
        raise NotImplementedError

    def get(self, indices: np.ndarray | Sequence[int], keys: Sequence[str] | None = None) -> Batch:
        """Examples at `indices` in the batch format (float32 image in [-1, 1])."""
        return finalize_batch(self.load(np.asarray(indices, dtype=np.int64)), keys)

    def kshot(self, shots: int, seed: int = 0) -> "IndexedDataset":
        """`shots` examples per class, drawn with `seed`."""
        return self.subset(kshot_indices(self.labels, shots, seed))

    def subset(self, indices: np.ndarray) -> "IndexedDataset":
        return SubsetDataset(self, np.asarray(indices, dtype=np.int64))

    def materialize(self) -> "ArrayDataset":
        """Loads everything into memory (uint8 images)."""
        return ArrayDataset(self.load(np.arange(len(self))), class_names=self.class_names)


class ArrayDataset(IndexedDataset):
    """In-memory dataset: a dict of arrays sharing the leading dimension N.

    arrays["image"]: uint8 [N, H, W, 3] (or float32 in [-1, 1]); arrays["label"]: int32 [N].
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], class_names: Sequence[str] = (),
                 info: Mapping[str, Any] | None = None):
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Arrays differ in length: {sizes}.")
        if "label" not in arrays:
            raise ValueError(f"ArrayDataset needs a 'label' array; got keys {sorted(arrays)}.")
        self.arrays = dict(arrays)
        self.class_names = tuple(class_names)
        self.info = dict(info or {})

    def __len__(self) -> int:
        return len(self.arrays["label"])

    @property
    def labels(self) -> np.ndarray:
        return self.arrays["label"]

    def load(self, indices: np.ndarray) -> Batch:
        return {k: v[indices] for k, v in self.arrays.items()}

    def subset(self, indices: np.ndarray) -> "ArrayDataset":
        return ArrayDataset(self.load(np.asarray(indices, dtype=np.int64)), self.class_names,
                            self.info)

    def materialize(self) -> "ArrayDataset":
        return self


class SubsetDataset(IndexedDataset):
    """A view of `parent` at `indices`."""

    def __init__(self, parent: IndexedDataset, indices: np.ndarray):
        self.parent, self.indices = parent, indices
        self.class_names = parent.class_names

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.parent.labels[self.indices]

    def load(self, indices: np.ndarray) -> Batch:
        return self.parent.load(self.indices[indices])


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, str | Callable[..., Any]] = {
    "square": "jaxcf.data.square:square_dataset",
    "shapes": "jaxcf.data.shapes:shapes_dataset",
    "folder": "jaxcf.data.folder:folder_dataset",
    "tfds": "jaxcf.data.tfds_data:tfds_dataset",
}


def _resolve(target: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(target):
        return target
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def get_dataset(name: str, **kwargs: Any):
    """Builds a dataset by config name: "square", "shapes", "folder" or "tfds:<tfds name>".

    kwargs go to the builder (e.g. split=, classes=, shots=, seed=, resolution=).
    """
    if name.startswith("tfds:"):
        return _resolve(_REGISTRY["tfds"])(name[len("tfds:"):], **kwargs)
    allowed = [n for n in _REGISTRY if n != "tfds"] + ["tfds:<name>"]
    if name not in _REGISTRY or name == "tfds":
        raise ValueError(f"Unknown dataset name {name!r}; allowed: {', '.join(allowed)}.")
    return _resolve(_REGISTRY[name])(**kwargs)
