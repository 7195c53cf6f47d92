"""tfds datasets of the base-to-novel benchmark (CoOp / CoCoOp) and CelebA for DiDAE.

tensorflow and tensorflow-datasets are an optional extra (`pip install 'jaxcf[data]'`), imported
on first use. Data is read from `data_dir` (tfds' default when None); nothing is downloaded
unless `download=True`.

Class order and readable names follow CoOp (what a CLIP prompt needs), so the CoCoOp base/novel
split (first ceil(n/2) classes of that order = base) matches the papers:
  caltech101 drops "background_google" and "faces_easy" and orders "Faces", "Leopards",
  "Motorbikes" first (CoOp sorts case-sensitive folder names); cars196 puts the year first;
  sun397 "/w/wrestling_ring/indoor" -> "indoor wrestling ring"; eurosat uses CoOp's long names;
  ucf101 splits CamelCase and uses the middle frame of each video; imagenet2012 needs a
  `class_names_file` (tfds has only WordNet ids); elsewhere "_" -> " " (oxford_iiit_pet also lower-cased).
The *image* splits are tfds' (CoOp uses its own split files): "train" / "test" resolve per
dataset (food101 and imagenet2012 test = "validation"; eurosat, which has only "train",
uses "train[:80%]" / "train[80%:]"); any other tfds split string ("validation", "train[:10%]")
passes through.

Any other tfds dataset with "image" and a ClassLabel "label" works with "_" -> " " names.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import zlib
from typing import Callable, Sequence

import numpy as np

from jaxcf.data.common import (ArrayDataset, kshot_indices, relabel_table,
                               select_classes)

_EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land", "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings",
    "River": "River", "SeaLake": "Sea or Lake",
}
_CALTECH_FIRST = ("faces", "leopards", "motorbikes")  # capitalised folders sort first in CoOp
_CALTECH_DROP = ("background_google", "faces_easy")
_CALTECH_RENAME = {"airplanes": "airplane", "faces": "face", "leopards": "leopard",
                   "motorbikes": "motorbike"}

Order = tuple[list[int], list[str]]  # raw label ids in dataset order, readable names


def _underscores(raw: Sequence[str]) -> Order:
    return list(range(len(raw))), [n.replace("_", " ") for n in raw]


def _lower(raw: Sequence[str]) -> Order:
    return list(range(len(raw))), [n.lower().replace("_", " ") for n in raw]


def _caltech(raw: Sequence[str]) -> Order:
    keep = [i for i, n in enumerate(raw) if n.lower() not in _CALTECH_DROP]
    first = [i for i in keep if raw[i].lower() in _CALTECH_FIRST]
    order = sorted(first, key=lambda i: raw[i].lower()) + [i for i in keep if i not in first]
    return order, [_CALTECH_RENAME.get(raw[i].lower(), raw[i].lower()).replace("_", " ")
                   for i in order]


def _cars(raw: Sequence[str]) -> Order:
    def year_first(n):
        words = n.split(" ")
        return " ".join([words[-1]] + words[:-1])
    return list(range(len(raw))), [year_first(n) for n in raw]


def _sun397(raw: Sequence[str]) -> Order:
    # "/w/wrestling_ring/indoor" -> "indoor wrestling ring"
    return list(range(len(raw))), [" ".join(n.strip("/").split("/")[1:][::-1]).replace("_", " ")
                                   for n in raw]


def _eurosat(raw: Sequence[str]) -> Order:
    return list(range(len(raw))), [_EUROSAT_NAMES.get(n, n) for n in raw]


def _ucf101(raw: Sequence[str]) -> Order:
    return list(range(len(raw))), [" ".join(re.findall(r"[A-Z][^A-Z]*", n)) or n for n in raw]


IMAGENET_NAMES_HELP = (
    "tfds imagenet2012 labels are WordNet ids (e.g. 'n01440764'), not names a CLIP prompt can use; "
    "pass class_names_file= (config.data.kwargs.class_names_file): a text file with the 1000 readable "
    "names, one per line in label order (e.g. CoOp's ImageNet classnames.txt)")


def _imagenet(raw: Sequence[str]) -> Order:
    raise ValueError(IMAGENET_NAMES_HELP)


@dataclasses.dataclass(frozen=True)
class _Spec:
    names: Callable[[Sequence[str]], Order] = _underscores
    train: str = "train"
    test: str = "test"
    image_key: str = "image"
    video: bool = False  # take the middle frame of a Video feature


SPECS: dict[str, _Spec] = {
    "imagenet2012": _Spec(_imagenet, test="validation"),
    "caltech101": _Spec(_caltech),
    "oxford_iiit_pet": _Spec(_lower),
    "cars196": _Spec(_cars),
    "oxford_flowers102": _Spec(_underscores),
    "food101": _Spec(_underscores, test="validation"),
    "sun397": _Spec(_sun397),
    "dtd": _Spec(_underscores),
    "eurosat": _Spec(_eurosat, train="train[:80%]", test="train[80%:]"),
    "ucf101": _Spec(_ucf101, image_key="video", video=True),
    "celeb_a": _Spec(),  # labels come from attributes (label_attribute=)
}
BASE_TO_NOVEL = tuple(n for n in SPECS if n != "celeb_a")


# ----------------------------------------------------------------------------- tensorflow


def _num_threads(num_threads: int | None) -> int:
    if num_threads:
        return int(num_threads)
    env = os.environ.get("JAXCF_TF_THREADS")
    return int(env) if env else max(1, (os.cpu_count() or 2) // 2)


def _tf(num_threads: int | None = None):
    """Imports (tf, tfds); on first import keeps TF off the GPU and to a few CPU threads."""
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("jaxcf's tfds loaders need tensorflow and tensorflow-datasets: "
                          "pip install 'jaxcf[data]'.") from e
    try:
        tf.config.set_visible_devices([], "GPU")
        n = _num_threads(num_threads)
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(n)
    except (RuntimeError, ValueError):
        pass  # TF already initialised by someone else: its settings stand.
    return tf, tfds


def _tfds():
    """Imports tensorflow_datasets only (enough for names; TF itself loads lazily)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("jaxcf's tfds loaders need tensorflow and tensorflow-datasets: "
                          "pip install 'jaxcf[data]'.") from e
    return tfds


def _options(tf, num_threads: int):
    opts = tf.data.Options()
    opts.deterministic = True
    opts.threading.private_threadpool_size = num_threads
    opts.threading.max_intra_op_parallelism = 1
    return opts


def _resize_center_crop(tf, image, resolution: int):
    """uint8 [H, W, 3] -> uint8 [R, R, 3]: shortest side to R (bicubic, antialias), centre crop."""
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = resolution / tf.minimum(h, w)
    nh = tf.maximum(resolution, tf.cast(tf.round(h * scale), tf.int32))
    nw = tf.maximum(resolution, tf.cast(tf.round(w * scale), tf.int32))
    image = tf.image.resize(image, (nh, nw), method="bicubic", antialias=True)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    image = image[top:top + resolution, left:left + resolution]
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return tf.ensure_shape(image, (resolution, resolution, 3))


# ----------------------------------------------------------------------------- builder


class DatasetNotPreparedError(FileNotFoundError):
    """A tfds dataset that is not prepared under the data_dir given (a user-fixable problem)."""


def not_prepared(name: str, data_dir: str | None) -> str | None:
    """A message if tfds ``name`` is clearly not prepared in the local folder ``data_dir`` (checked
    without importing TensorFlow, so that a run can stop before it builds anything); else None."""
    if not data_dir or "://" in str(data_dir) or name.split("/")[0] not in SPECS:
        return None  # tfds' default folder, a bucket, or a dataset jaxcf does not know: left to tfds
    root = os.path.join(os.path.expanduser(str(data_dir)), name.split("/")[0])
    for depth in ("*", "*/*"):  # <name>/<version>/ or <name>/<config>/<version>/
        if glob.glob(os.path.join(root, depth, "dataset_info.json")):
            return None
    return (f"tfds dataset {name!r} is not prepared under data_dir={data_dir!r} (no {root}/<version>/"
            f"dataset_info.json); run `tfds build {name} --data_dir={data_dir}` or point data_dir at a prepared copy")


def _builder(name: str, data_dir: str | None, download: bool, config: str | None,
             num_threads: int | None):
    full = f"{name}/{config}" if config else name
    problem = None if download else not_prepared(full, data_dir)
    if problem:  # before TensorFlow is imported
        raise DatasetNotPreparedError(problem)
    tf, tfds = _tf(num_threads)
    try:
        builder = tfds.builder(full, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"Unknown tfds dataset name {name!r}; jaxcf knows {sorted(SPECS)}, and "
                         "any tfds dataset with 'image' and a ClassLabel 'label' works.") from e
    if not builder.is_prepared():
        if not download:
            raise DatasetNotPreparedError(
                f"tfds dataset {full!r} is not prepared under data_dir={builder.data_dir_root!r}. "
                f"Pass download=True (needs network; imagenet2012 needs a manual download), or "
                f"run `tfds build {full} --data_dir=...`, or point data_dir= at a prepared copy.")
        try:
            builder.download_and_prepare()
        except ModuleNotFoundError as e:
            if e.name != "importlib_resources":
                raise
            raise ImportError("tensorflow-datasets needs the `importlib_resources` backport to "
                              "prepare datasets: pip install importlib_resources.") from e
    return builder


def _resolve_split(builder, spec: _Spec, split: str) -> str:
    split = {"train": spec.train, "test": spec.test}.get(split, split)
    allowed = list(builder.info.splits)
    for part in split.split("+"):
        base = part.split("[")[0].strip()
        if base not in allowed:
            raise ValueError(f"Unknown split {split!r} for tfds {builder.name!r}; allowed: "
                             f"{allowed} (or 'train' / 'test' aliases, tfds slices like "
                             f"'train[:10%]').")
    return split


def _read_names_file(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _raw_order(builder, spec: _Spec, class_names_file: str | None) -> Order:
    feature = builder.info.features["label"] if "label" in builder.info.features else None
    if feature is None or not hasattr(feature, "names"):
        raise ValueError(f"tfds {builder.name!r} has no ClassLabel 'label' feature; features: "
                         f"{list(builder.info.features)}.")
    raw = list(feature.names)
    if class_names_file is None:
        return spec.names(raw)
    given = _read_names_file(class_names_file)
    if len(given) != len(raw):
        raise ValueError(f"class_names_file {class_names_file!r} has {len(given)} names; tfds "
                         f"{builder.name!r} has {len(raw)} labels (one name per label, in tfds "
                         "label order).")
    order = list(range(len(raw))) if spec.names is _imagenet else spec.names(raw)[0]
    return order, [given[i] for i in order]


def tfds_class_names(name: str, *, data_dir: str | None = None, config: str | None = None,
                     class_names_file: str | None = None,
                     label_attribute: str | None = None) -> tuple[str, ...]:
    """Readable class names of a tfds dataset in CoOp label order (no data needed)."""
    if name == "imagenet2012" and class_names_file is None:
        raise ValueError(IMAGENET_NAMES_HELP)
    tfds = _tfds()
    try:
        builder = tfds.builder(f"{name}/{config}" if config else name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"Unknown tfds dataset name {name!r}; jaxcf knows {sorted(SPECS)}.") from e
    if name == "celeb_a":
        return _celeb_a_names(list(builder.info.features["attributes"].keys()), label_attribute)
    return tuple(_raw_order(builder, SPECS.get(name, _Spec()), class_names_file)[1])


def _celeb_a_names(attributes: list[str], label_attribute: str | None) -> tuple[str, str]:
    if label_attribute not in attributes:
        raise ValueError(f"Unknown label_attribute {label_attribute!r} for celeb_a; allowed: "
                         f"{attributes}.")
    readable = label_attribute.replace("_", " ").lower()
    return (f"not {readable}", readable)


# ----------------------------------------------------------------------------- dataset


class TfdsDataset:
    """A tfds split streamed through tf.data, with CoOp class order and relabelling.

    Batches follow the jaxcf contract (common.py): image float32 [B, R, R, 3] in [-1, 1],
    label int32 [B]; celeb_a adds attributes int32 [B, 40] (attribute_names order) and, with a
    confounder_attribute, confounder and group (= 2 * label + confounder) int32 [B].
    Each process reads the whole (seeded) stream but decodes only its own rows.
    """

    def __init__(self, name: str, split: str = "train", *, classes: str | Sequence[str] = "all",
                 resolution: int = 224, data_dir: str | None = None, download: bool = False,
                 config: str | None = None, label_attribute: str | None = None,
                 confounder_attribute: str | None = None, class_names_file: str | None = None,
                 num_threads: int | None = None):
        self.name, self.resolution = name, resolution
        self.num_threads = _num_threads(num_threads)
        self._builder = _builder(name, data_dir, download, config, self.num_threads)
        self.spec = SPECS.get(name, _Spec())
        self.split = _resolve_split(self._builder, self.spec, split)
        features = self._builder.info.features
        if self.spec.image_key not in features:
            raise ValueError(f"tfds {name!r} has no {self.spec.image_key!r} feature; features: "
                             f"{list(features)}.")
        self.attribute_names: tuple[str, ...] = ()
        self._attr = None
        if "attributes" in features and "label" not in features:  # celeb_a
            self.attribute_names = tuple(features["attributes"].keys())
            names = _celeb_a_names(list(self.attribute_names), label_attribute)
            if confounder_attribute is not None and confounder_attribute not in \
                    self.attribute_names:
                raise ValueError(f"Unknown confounder_attribute {confounder_attribute!r} for "
                                 f"{name}; allowed: {list(self.attribute_names)}.")
            self._attr = (label_attribute, confounder_attribute)
            order = [0, 1]
        else:
            if label_attribute or confounder_attribute:
                raise ValueError(f"label_attribute / confounder_attribute apply to celeb_a only, "
                                 f"not {name!r}.")
            order, names = _raw_order(self._builder, self.spec, class_names_file)
        selected = select_classes(names, classes)
        self.class_names = tuple(names[i] for i in selected)
        num_raw = 2 if self._attr else features["label"].num_classes
        self._table = relabel_table(num_raw, np.asarray(order)[selected])  # raw -> new label
        self._labels: np.ndarray | None = None

    # -- reading

    def _read(self, *, labels_only: bool = False, shuffle_files: bool = False, seed: int = 0):
        """tf.data of undecoded examples: {"label", "_image" (bytes), extras}, classes filtered."""
        tf, tfds = _tf()
        key = "attributes" if self._attr else "label"
        wanted = {key: True} if labels_only else {key: True, self.spec.image_key: True}
        decoders = None if labels_only else {self.spec.image_key: tfds.decode.SkipDecoding()}
        read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False,
                                      options=_options(tf, self.num_threads))
        ds = self._builder.as_dataset(
            split=self.split, shuffle_files=shuffle_files, read_config=read_config,
            decoders=tfds.decode.PartialDecoding(wanted, decoders=decoders))
        table = tf.constant(self._table)
        attr, names = self._attr, self.attribute_names

        def convert(ex):
            out = {}
            if attr:
                stacked = tf.stack([tf.cast(ex["attributes"][a], tf.int32) for a in names])
                raw = tf.cast(ex["attributes"][attr[0]], tf.int32)
                out["attributes"] = stacked
                if attr[1] is not None:
                    conf = tf.cast(ex["attributes"][attr[1]], tf.int32)
                    out["confounder"] = conf
                    out["group"] = 2 * tf.gather(table, raw) + conf
            else:
                raw = tf.cast(ex["label"], tf.int32)
            out["label"] = tf.gather(table, raw)
            if not labels_only:
                out["_image"] = ex[self.spec.image_key]
            return out

        ds = ds.map(convert, num_parallel_calls=self.num_threads)
        ds = ds.filter(lambda ex: ex["label"] >= 0)
        return ds.with_options(_options(tf, self.num_threads))

    def _decode(self, ex):
        tf, _ = _tf()
        ex = dict(ex)
        data = ex.pop("_image")
        if self.spec.video:
            data = data[tf.shape(data)[0] // 2]  # middle frame, as CoOp's UCF101
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        ex["image"] = _resize_center_crop(tf, image, self.resolution)
        return ex

    @property
    def labels(self) -> np.ndarray:
        """int32 [N] labels in unshuffled order (one pass over the split, decoding no image)."""
        if self._labels is None:
            ds = self._read(labels_only=True).map(lambda ex: ex["label"]).batch(4096)
            chunks = list(ds.as_numpy_iterator())
            self._labels = (np.concatenate(chunks).astype(np.int32) if chunks
                            else np.zeros((0,), np.int32))
        return self._labels

    def column(self, key: str) -> np.ndarray:
        """int32 [N] of a per-example field ("label", "confounder", "group") in unshuffled order,
        decoding no image (e.g. to pick a poisoned subset of celeb_a by group)."""
        if key == "label":
            return self.labels
        if not self._attr or self._attr[1] is None or key not in ("confounder", "group"):
            raise ValueError(f"column {key!r} is not available for tfds {self.name!r}; allowed: label"
                             + (", confounder, group" if self._attr and self._attr[1] else
                                " (confounder and group need celeb_a with confounder_attribute)"))
        ds = self._read(labels_only=True).map(lambda ex: ex[key]).batch(4096)
        chunks = list(ds.as_numpy_iterator())
        return np.concatenate(chunks).astype(np.int32) if chunks else np.zeros((0,), np.int32)

    def __len__(self) -> int:
        if (self._table >= 0).all():  # nothing filtered: tfds knows the count
            return int(self._builder.info.splits[self.split].num_examples)
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """Examples at `indices` (of the unshuffled order), decoded into memory."""
        tf, _ = _tf()
        keep = np.zeros((len(self),), bool)
        keep[np.asarray(indices, dtype=np.int64)] = True
        keep_t = tf.constant(keep)
        ds = self._read().enumerate().filter(lambda i, ex: tf.gather(keep_t, i))
        ds = ds.map(lambda i, ex: self._decode(ex), num_parallel_calls=self.num_threads)
        chunks = list(ds.batch(256).as_numpy_iterator())
        if not chunks:
            raise ValueError(f"No examples selected from tfds {self.name!r} {self.split!r}.")
        arrays = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        info = {"name": self.name, "split": self.split, "attribute_names": self.attribute_names}
        return ArrayDataset(arrays, self.class_names, info)

    def materialize(self) -> ArrayDataset:
        """The whole split in memory (uint8 images at `resolution`)."""
        return self.subset(np.arange(len(self)))

    def kshot(self, shots: int, seed: int = 0) -> ArrayDataset:
        """`shots` examples per class (CoOp few-shot set), drawn with `seed`, in memory."""
        return self.subset(kshot_indices(self.labels, shots, seed))


def tfds_dataset(name: str, split: str = "train", *, classes: str | Sequence[str] = "all",
                 shots: int | None = None, seed: int = 0, resolution: int = 224,
                 data_dir: str | None = None, download: bool = False, config: str | None = None,
                 label_attribute: str | None = None, confounder_attribute: str | None = None,
                 class_names_file: str | None = None,
                 num_threads: int | None = None) -> TfdsDataset | ArrayDataset:
    """A tfds dataset for jaxcf: streamed TfdsDataset, or with `shots` an in-memory k-shot set.

    classes: "all", "base", "novel" (CoCoOp halves of the CoOp label order) or readable names;
      labels index the chosen classes. celeb_a: label_attribute (e.g. "Blond_Hair") and
      optional confounder_attribute (e.g. "Male") choose attributes by name.
    class_names_file: one readable name per line in tfds label order (overrides the built-in).
    num_threads: TF CPU threads (default $JAXCF_TF_THREADS or half the cores).
    """
    ds = TfdsDataset(name, split, classes=classes, resolution=resolution, data_dir=data_dir,
                     download=download, config=config, label_attribute=label_attribute,
                     confounder_attribute=confounder_attribute,
                     class_names_file=class_names_file, num_threads=num_threads)
    return ds.kshot(shots, seed) if shots else ds


# ----------------------------------------------------------------------------- fake data


def write_fake_tfds(name: str, data_dir: str, *, examples_per_class: dict[str, int] | None = None,
                    num_examples: dict[str, int] | None = None, config: str | None = None,
                    seed: int = 0) -> str:
    """Writes a tiny prepared copy of tfds `name` (its real features, random content) to
    data_dir, readable by `tfds.builder(name, data_dir=data_dir)`: for tests and smoke runs.

    examples_per_class: split -> examples per label (balanced labels), default
      {"train": 2, "test": 1};
    num_examples: split -> count instead (for datasets without a "label", e.g. celeb_a).
    Returns the dataset's directory.
    """
    tf, tfds = _tf()
    from tensorflow_datasets.testing import mocking

    cls = tfds.builder_cls(name)

    class Fake(cls, skip_registration=True):  # same name and version as the real builder
        @classmethod
        def _get_pkg_dir_path(klass):
            return cls._get_pkg_dir_path()

        # No code path: no checksums to look up (and tfds 4.9.10's lookup needs the
        # `importlib_resources` backport on Python >= 3.9).
        code_path = None

        def _split_generators(self, dl_manager):
            sizes = num_examples or {}
            per_class = examples_per_class or ({} if num_examples else {"train": 2, "test": 1})
            return {s: self._gen(s, k, True) for s, k in per_class.items()} | \
                {s: self._gen(s, k, False) for s, k in sizes.items()}

        def _gen(self, split, k, balanced):
            feats = self.info.features
            labels = None
            if balanced:
                labels = np.repeat(np.arange(feats["label"].num_classes), k)
            count = len(labels) if balanced else k
            split_seed = seed + zlib.crc32(split.encode()) % 1000
            gen = mocking.RandomFakeGenerator(feats, count, seed=split_seed)
            for i, ex in enumerate(gen):
                for key, feat in feats.items():
                    if isinstance(feat, tfds.features.BBoxFeature):
                        ex[key] = tfds.features.BBox(0.1, 0.1, 0.9, 0.9)
                if labels is not None:
                    ex["label"] = int(labels[i])
                yield f"{split}_{i}", ex

    Fake.name = cls.name
    builder = Fake(data_dir=data_dir, config=config)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return str(builder.data_path)
