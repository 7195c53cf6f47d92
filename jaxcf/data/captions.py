"""Image-caption datasets for retrieval: Karpathy-split JSON + image folder; tfds coco_captions.

Both give a :class:`CaptionData`: the split's images once (uint8, resized and centre-cropped like
:mod:`jaxcf.data.folder`; ``image_batch`` / ``dataset().get`` give float32 in [-1, 1] as every
jaxcf dataset does), every caption, and the image index of each caption (COCO has about five
captions per image, Flickr30k five).

Karpathy JSON layout (``dataset_coco.json``, ``dataset_flickr30k.json``)::

    {"images": [{"filename": "COCO_val2014_000000391895.jpg", "filepath": "val2014",  # COCO only
                 "split": "train" | "restval" | "val" | "test", "imgid": 0, "cocoid": 391895,
                 "sentences": [{"raw": "A man riding a bike.", ...}, ...]}, ...]}

The image of an entry is ``image_root/filepath/filename`` (``image_root/filename`` when there is no
filepath, or when all images sit in one folder). ``split`` may join splits with "+"
("train+restval" is the usual COCO training set).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from jaxcf.data.common import ArrayDataset, to_model_range
from jaxcf.data.folder import resize_center_crop

KARPATHY_SPLITS = ("train", "restval", "val", "test")


@dataclasses.dataclass
class CaptionData:
    """One split of an image-caption dataset.

    images: uint8 [Ni, R, R, 3]; image_ids: int64 [Ni] (the dataset's ids: cocoid / imgid);
    captions: str [Nt]; caption_image: int32 [Nt], the row in ``images`` of each caption.
    info: provenance (source, split, paths) and, for the shapes toy, the factors.
    """

    images: np.ndarray
    image_ids: np.ndarray
    captions: tuple[str, ...]
    caption_image: np.ndarray
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(self.images)

    def image_batch(self, indices) -> np.ndarray:
        """float32 [B, R, R, 3] in [-1, 1] of the images at ``indices``."""
        return to_model_range(self.images[np.asarray(indices, dtype=np.int64)])

    def dataset(self) -> ArrayDataset:
        """The images as an ArrayDataset (label = image row, plus image_id) for jaxcf's batching."""
        return ArrayDataset({"image": self.images, "image_id": self.image_ids,
                             "label": np.arange(self.num_images, dtype=np.int32)},
                            info=self.info)

    def relevance(self, match: str = "pair") -> np.ndarray:
        """bool [Ni, Nt]: which captions count as correct for which image.

        "pair": a caption belongs to its own image only (the COCO / Flickr30k protocol);
        "text": also to every image that has a caption with the same text (for worlds whose
        captions repeat, such as the shapes toy).
        """
        if match == "pair":
            return pair_relevance(self.caption_image, self.num_images)
        if match != "text":
            raise ValueError(f"match={match!r} is not allowed; allowed: 'pair', 'text'")
        _, text_id = np.unique(np.asarray(self.captions, dtype=object).astype(str),
                               return_inverse=True)
        has = np.zeros((self.num_images, text_id.max() + 1 if len(text_id) else 0), bool)
        has[self.caption_image, text_id] = True  # [Ni, distinct texts]
        return has[:, text_id]


def pair_relevance(caption_image: np.ndarray, num_images: int) -> np.ndarray:
    """bool [Ni, Nt]: relevant[i, t] = caption t describes image i."""
    caption_image = np.asarray(caption_image)
    return np.arange(num_images)[:, None] == caption_image[None, :]


def _load_images(paths: Sequence[str], resolution: int) -> np.ndarray:
    out = np.zeros((len(paths), resolution, resolution, 3), np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            out[i] = resize_center_crop(im, resolution)
    return out


def _parse_splits(split: str, allowed: Sequence[str]) -> list[str]:
    parts = [p.strip() for p in str(split).split("+")]
    bad = [p for p in parts if p not in allowed]
    if bad or not parts:
        raise ValueError(f"split={split!r} is not allowed; allowed: {', '.join(allowed)} "
                         "(joined with '+', e.g. 'train+restval')")
    return parts


def _subsample(n: int, num_images: int | None, seed: int) -> np.ndarray:
    """Sorted rows: all n, or ``num_images`` of them drawn with ``seed``."""
    if num_images is None or num_images >= n:
        return np.arange(n)
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    return np.sort(np.random.default_rng(seed).choice(n, size=num_images, replace=False))


def _read_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise ValueError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0]})") from None


def karpathy_captions(split_file: str | os.PathLike, image_root: str | os.PathLike,
                      split: str = "test", *, resolution: int = 224,
                      num_images: int | None = None, seed: int = 0) -> CaptionData:
    """A Karpathy split (COCO or Flickr30k) from its JSON file and the image folder.

    split: "train", "restval", "val", "test" or a "+" join. num_images: a random subset of the
    split's images (drawn with ``seed`` before any file is read; all their captions are kept).
    Raises ValueError (one line) on a missing or malformed split file, a missing image folder, an
    empty split, or captions whose image file is missing.
    """
    split_file, image_root = os.fspath(split_file), os.fspath(image_root)
    wanted = _parse_splits(split, KARPATHY_SPLITS)
    data = _read_json(split_file, "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"Karpathy split file {split_file} has no 'images' list "
                         "(expected the dataset_coco.json / dataset_flickr30k.json layout)")
    if not os.path.isdir(image_root):
        raise ValueError(f"image folder not found: {image_root}")
    entries = []
    for k, entry in enumerate(data["images"]):
        try:
            if entry["split"] in wanted:
                entries.append((entry["filename"], entry.get("filepath", ""),
                                [s["raw"] for s in entry["sentences"]],
                                int(entry.get("cocoid", entry.get("imgid", k)))))
        except (KeyError, TypeError) as e:
            raise ValueError(f"Karpathy split file {split_file}: images[{k}] lacks {e} "
                             "(needs filename, split, sentences[*].raw)") from None
    if not entries:
        raise ValueError(f"split {split!r} of {split_file} has no images")
    entries = [entries[i] for i in _subsample(len(entries), num_images, seed)]
    paths, missing = [], []
    for filename, filepath, sentences, _ in entries:
        path = os.path.join(image_root, filepath, filename)
        if not os.path.isfile(path) and os.path.isfile(os.path.join(image_root, filename)):
            path = os.path.join(image_root, filename)  # everything in one folder
        paths.append(path)
        if not os.path.isfile(path):
            missing.append((path, len(sentences)))
    if missing:
        raise ValueError(f"{sum(n for _, n in missing)} captions of split {split!r} have no image "
                         f"file ({len(missing)} images missing under {image_root}, first "
                         f"{missing[0][0]})")
    captions = [s.strip() for _, _, sents, _ in entries for s in sents]
    caption_image = np.repeat(np.arange(len(entries), dtype=np.int32),
                              [len(sents) for _, _, sents, _ in entries])
    if not captions:
        raise ValueError(f"split {split!r} of {split_file} has images but no captions")
    return CaptionData(
        images=_load_images(paths, resolution),
        image_ids=np.asarray([e[3] for e in entries], np.int64),
        captions=tuple(captions), caption_image=caption_image,
        info={"source": "karpathy", "split_file": split_file, "image_root": image_root,
              "split": split, "resolution": resolution, "files": tuple(paths)})


# ----------------------------------------------------------------------------- tfds


def _coco_not_prepared(data_dir: str | None) -> str | None:
    """A one-line message if coco_captions is clearly not prepared in a local ``data_dir``."""
    if not data_dir or "://" in str(data_dir):
        return None  # tfds' default folder or a bucket: asked of tfds itself
    root = os.path.join(os.path.expanduser(str(data_dir)), "coco_captions")
    if glob.glob(os.path.join(root, "*", "*", "dataset_info.json")) or \
            glob.glob(os.path.join(root, "*", "dataset_info.json")):
        return None
    return (f"tfds coco_captions is not prepared under data_dir={data_dir!r} (no {root}/<config>/"
            f"<version>/dataset_info.json); run `tfds build coco_captions --data_dir={data_dir}` "
            "or point data_dir at a prepared copy")


def tfds_coco_captions(split: str = "test", *, data_dir: str | None = None, resolution: int = 224,
                       num_images: int | None = None, seed: int = 0) -> CaptionData:
    """tfds ``coco_captions`` (its splits are Karpathy's: train, restval, val, test), read from a
    prepared ``data_dir``; nothing is downloaded. Raises ValueError naming data_dir / split when the
    data is not prepared, and ImportError when tensorflow-datasets is not installed."""
    wanted = _parse_splits(split, KARPATHY_SPLITS)
    problem = _coco_not_prepared(data_dir)
    if problem:  # before TensorFlow is imported
        raise ValueError(problem)
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("tfds coco_captions needs tensorflow and tensorflow-datasets: "
                          "pip install 'jaxcf[data]'") from e
    builder = tfds.builder("coco_captions", data_dir=data_dir)
    if not builder.is_prepared():
        raise ValueError(f"tfds coco_captions is not prepared under data_dir="
                         f"{builder.data_dir_root!r}; run `tfds build coco_captions` there or "
                         "point data_dir at a prepared copy")
    have = list(builder.info.splits)
    absent = [s for s in wanted if s not in have]
    if absent:
        raise ValueError(f"tfds coco_captions under data_dir={data_dir!r} has no split "
                         f"{absent[0]!r}; it has {', '.join(have)}")
    n = sum(builder.info.splits[s].num_examples for s in wanted)
    ds = builder.as_dataset(split="+".join(wanted), shuffle_files=False)
    data = coco_examples_to_captions(tfds.as_numpy(ds), _subsample(n, num_images, seed),
                                     resolution)
    if not data.num_images:
        raise ValueError(f"split {split!r} of tfds coco_captions under data_dir={data_dir!r} "
                         "has no images")
    data.info |= {"source": "tfds:coco_captions", "data_dir": data_dir, "split": split}
    return data


def coco_examples_to_captions(examples, keep: np.ndarray, resolution: int) -> CaptionData:
    """CaptionData from tfds coco_captions examples (numpy dicts with "image" uint8 [H, W, 3],
    "image/id", "captions": {"text": bytes [n]}), keeping the examples whose position is in
    ``keep``."""
    keep = set(np.asarray(keep).tolist())
    images, ids, captions, caption_image = [], [], [], []
    for k, ex in enumerate(examples):
        if k not in keep:
            continue
        texts = [t.decode() if isinstance(t, bytes) else str(t) for t in ex["captions"]["text"]]
        captions += [t.strip() for t in texts]
        caption_image += [len(images)] * len(texts)
        images.append(resize_center_crop(Image.fromarray(np.asarray(ex["image"])), resolution))
        ids.append(int(ex["image/id"]))
    stacked = (np.stack(images) if images
               else np.zeros((0, resolution, resolution, 3), np.uint8))
    return CaptionData(stacked, np.asarray(ids, np.int64), tuple(captions),
                       np.asarray(caption_image, np.int32), {"resolution": resolution})
