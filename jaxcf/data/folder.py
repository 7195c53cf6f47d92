"""Image folders: root/<class_name>/*.{jpg,png,...}, classes in sorted folder order.

Images are read lazily (PIL), resized (shortest side -> resolution, bicubic) and centre-cropped.
Readable class names replace "_" with " " in the folder names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from jaxcf.data.common import (Batch, IndexedDataset, kshot_indices, relabel_table,
                               select_classes)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def resize_center_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """PIL image -> uint8 [R, R, 3]: shortest side to R = `resolution` (bicubic), centre crop."""
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)), np.uint8)


class FolderDataset(IndexedDataset):
    """Files with labels; `load` reads and preprocesses them. image: uint8 [B, R, R, 3]."""

    def __init__(self, files: Sequence[str], labels: np.ndarray, class_names: Sequence[str],
                 resolution: int):
        self.files = list(files)
        self._labels = np.asarray(labels, dtype=np.int32)
        self.class_names = tuple(class_names)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.files)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def load(self, indices: np.ndarray) -> Batch:
        images = []
        for i in np.asarray(indices):
            with Image.open(self.files[i]) as im:
                images.append(resize_center_crop(im, self.resolution))
        shape = (0, self.resolution, self.resolution, 3)
        return {"image": np.stack(images) if images else np.zeros(shape, np.uint8),
                "label": self._labels[indices]}

    def subset(self, indices: np.ndarray) -> "FolderDataset":
        idx = np.asarray(indices, dtype=np.int64)
        return FolderDataset([self.files[i] for i in idx], self._labels[idx], self.class_names,
                             self.resolution)


def folder_class_dirs(root: str | os.PathLike) -> list[str]:
    """Sorted names of the class folders under `root`."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"root {str(root)!r} is not a directory.")
    dirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise ValueError(f"root {str(root)!r} has no class folders (expected root/<class>/*.jpg).")
    return dirs


def folder_dataset(root: str | os.PathLike, *, classes: str | Sequence[str] = "all",
                   shots: int | None = None, seed: int = 0, resolution: int = 224,
                   split: str | None = None) -> FolderDataset:
    """Images under root/<class>/ as a FolderDataset.

    classes: "all", "base", "novel" (CoCoOp halves of the sorted folder order) or readable names;
      labels index the chosen classes. shots: k examples per class drawn with `seed`.
    split: optional sub-folder of root (e.g. "train" for root/train/<class>/...).
    """
    if split is not None:
        folder_class_dirs(root)  # root must exist
        if not (Path(root) / split).is_dir():
            raise ValueError(f"Unknown split {split!r} under {str(root)!r}; allowed: "
                             f"{folder_class_dirs(root)}.")
        root = Path(root) / split
    dirs = folder_class_dirs(root)
    names = [d.replace("_", " ") for d in dirs]
    selected = select_classes(names, classes)
    table = relabel_table(len(dirs), selected)
    files, labels = [], []
    for raw in selected:
        paths = sorted(p for p in (Path(root) / dirs[raw]).iterdir()
                       if p.suffix.lower() in IMAGE_EXTENSIONS)
        files += [str(p) for p in paths]
        labels += [table[raw]] * len(paths)
    ds = FolderDataset(files, np.asarray(labels, np.int32), [names[i] for i in selected],
                       resolution)
    if len(ds) == 0:
        raise ValueError(f"No images with extensions {IMAGE_EXTENSIONS} under {str(root)!r}.")
    return ds.subset(kshot_indices(ds.labels, shots, seed)) if shots else ds
