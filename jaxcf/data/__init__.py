"""Datasets: Square, the shapes world, tfds datasets and image folders.

Numpy on the host. Every dataset gives dict batches {"image": float32 [B, H, W, 3] in [-1, 1],
"label": int32 [B], ...} from `.get(indices, keys)`; pipelines pick one by config name with
`get_dataset`: "square", "shapes", "folder" or "tfds:<name>" (tensorflow is imported only for the
last). DiDAE's confounded tasks (Square, CelebA) are built by :mod:`jaxcf.data.confounded`.
"""

from jaxcf.data.common import (ArrayDataset, IndexedDataset, base_novel_split, get_dataset,
                               kshot_indices, select_classes, to_model_range,
                               to_uint8)
from jaxcf.data.folder import folder_dataset
from jaxcf.data.shapes import render_shapes, shapes_dataset
from jaxcf.data.square import render_square, square_dataset
from jaxcf.data.tfds_data import tfds_class_names, tfds_dataset  # imports TF only when called

__all__ = [
    "ArrayDataset", "IndexedDataset", "base_novel_split", "folder_dataset", "get_dataset",
    "kshot_indices", "render_shapes", "render_square", "select_classes",
    "shapes_dataset", "square_dataset", "tfds_class_names", "tfds_dataset", "to_model_range",
    "to_uint8",
]
