"""Karpathy-split caption loader (COCO and Flickr30k layouts) and the tfds coco_captions guard, on
tiny fixtures written in the real formats."""

import json
import os

import numpy as np
from PIL import Image

from jaxcf.data.captions import (CaptionData, coco_examples_to_captions, karpathy_captions,
                                 pair_relevance, tfds_coco_captions)
from tests.errors import one_line_error

# (filename, filepath, split, cocoid, colour, size, captions)
COCO = [
    ("COCO_val2014_000000000011.jpg", "val2014", "test", 11, (200, 30, 30), (40, 30),
     ["A red thing.", "Something red ", "red"]),
    ("COCO_val2014_000000000012.png", "val2014", "test", 12, (30, 200, 30), (24, 48),
     ["A green thing.", "green"]),
    ("COCO_train2014_000000000013.png", "train2014", "train", 13, (30, 30, 200), (32, 32),
     ["blue"]),
    ("COCO_val2014_000000000014.png", "val2014", "restval", 14, (200, 200, 30), (20, 20),
     ["yellow", "a yellow thing"]),
    ("COCO_val2014_000000000015.png", "val2014", "val", 15, (120, 120, 120), (16, 16),
     ["grey"]),
]


def _write_coco(tmp_path, entries=COCO, skip_files=()):
    root = tmp_path / "coco"
    images = []
    for k, (name, folder, split, cid, colour, size, sents) in enumerate(entries):
        (root / folder).mkdir(parents=True, exist_ok=True)
        if name not in skip_files:
            Image.new("RGB", size, colour).save(root / folder / name)
        images.append({"filepath": folder, "filename": name, "split": split, "imgid": k,
                       "cocoid": cid, "sentids": list(range(len(sents))),
                       "sentences": [{"raw": s, "tokens": s.lower().split(), "imgid": k}
                                     for s in sents]})
    split_file = tmp_path / "dataset_coco.json"
    split_file.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return split_file, root



def test_coco_test_split(tmp_path):
    split_file, root = _write_coco(tmp_path)
    data = karpathy_captions(split_file, root, "test", resolution=8)
    assert isinstance(data, CaptionData)
    assert data.images.shape == (2, 8, 8, 3) and data.images.dtype == np.uint8
    assert data.image_ids.tolist() == [11, 12]
    assert data.captions == ("A red thing.", "Something red", "red", "A green thing.", "green")
    assert data.caption_image.tolist() == [0, 0, 0, 1, 1]
    # Solid colours survive resize + crop (the JPEG approximately, the PNG exactly).
    np.testing.assert_allclose(data.images[0].reshape(-1, 3).mean(0), COCO[0][4], atol=4)
    assert (data.images[1] == np.array(COCO[1][4], np.uint8)).all()
    batch = data.image_batch([1])
    assert batch.dtype == np.float32 and batch.min() >= -1 and batch.max() <= 1
    np.testing.assert_allclose(batch[0, 0, 0], np.array(COCO[1][4]) / 127.5 - 1, atol=1e-6)
    got = data.dataset().get(np.array([1, 0]))
    np.testing.assert_array_equal(got["image"], data.image_batch([1, 0]))
    assert got["label"].tolist() == [1, 0] and got["image_id"].tolist() == [12, 11]


def test_joined_splits_subset_and_relevance(tmp_path):
    split_file, root = _write_coco(tmp_path)
    data = karpathy_captions(split_file, root, "train+restval", resolution=4)
    assert data.image_ids.tolist() == [13, 14]  # file order
    assert data.captions == ("blue", "yellow", "a yellow thing")
    np.testing.assert_array_equal(data.relevance(), [[1, 0, 0], [0, 1, 1]])
    np.testing.assert_array_equal(pair_relevance(data.caption_image, 2), data.relevance())
    sub = karpathy_captions(split_file, root, "train+restval+test+val", resolution=4,
                            num_images=2, seed=3)
    assert sub.num_images == 2 and set(sub.image_ids) <= {11, 12, 13, 14, 15}
    for i, cid in enumerate(sub.image_ids):
        expected = [s.strip() for e in COCO if e[3] == cid for s in e[6]]
        assert [c for c, j in zip(sub.captions, sub.caption_image) if j == i] == expected


def test_relevance_by_text():
    data = CaptionData(np.zeros((3, 2, 2, 3), np.uint8), np.arange(3), ("a", "b", "a", "c"),
                       np.array([0, 1, 2, 2], np.int32))
    np.testing.assert_array_equal(data.relevance("text"), [[1, 0, 1, 0], [0, 1, 0, 0],
                                                           [1, 0, 1, 1]])
    assert "allowed" in one_line_error(data.relevance, "caption")


def test_flickr_layout_one_folder(tmp_path):
    root = tmp_path / "flickr30k-images"
    root.mkdir()
    images = []
    for k, (name, split) in enumerate([("1000092795.jpg", "test"), ("10002456.jpg", "train"),
                                       ("1000268201.jpg", "test")]):
        Image.new("RGB", (30 + k, 20), (10 * k, 50, 90)).save(root / name)
        images.append({"filename": name, "imgid": k, "split": split,
                       "sentences": [{"raw": f"caption {k} {j}"} for j in range(5)]})
    split_file = tmp_path / "dataset_flickr30k.json"
    split_file.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    data = karpathy_captions(split_file, root, "test", resolution=6)
    assert data.image_ids.tolist() == [0, 2] and len(data.captions) == 10
    assert data.captions[5] == "caption 2 0" and data.caption_image.tolist() == [0] * 5 + [1] * 5


def test_bad_input_one_line(tmp_path):
    split_file, root = _write_coco(tmp_path)
    missing = tmp_path / "nope.json"
    assert str(missing) in one_line_error(karpathy_captions, missing, root)
    assert "allowed" in one_line_error(karpathy_captions, split_file, root, "testing")
    assert str(tmp_path / "noimages") in one_line_error(karpathy_captions, split_file,
                                                         tmp_path / "noimages")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "not valid JSON" in one_line_error(karpathy_captions, bad, root)
    bad.write_text(json.dumps({"annotations": []}))
    assert "'images'" in one_line_error(karpathy_captions, bad, root)
    bad.write_text(json.dumps({"images": [{"filename": "x.jpg", "split": "test"}]}))
    assert "sentences" in one_line_error(karpathy_captions, bad, root)
    # An empty split.
    only_test = [e for e in COCO if e[2] == "test"]
    split_file2, root2 = _write_coco(tmp_path / "b", only_test)
    msg = one_line_error(karpathy_captions, split_file2, root2, "val")
    assert "no images" in msg and str(split_file2) in msg
    # Captions whose image file is missing: counted, and the first path named.
    split_file3, root3 = _write_coco(tmp_path / "c", skip_files=(COCO[1][0],))
    msg = one_line_error(karpathy_captions, split_file3, root3, "test")
    assert msg.startswith("2 captions") and os.path.join(root3, "val2014", COCO[1][0]) in msg


def test_tfds_coco_captions_not_prepared(tmp_path):
    msg = one_line_error(tfds_coco_captions, "test", data_dir=str(tmp_path))
    assert f"data_dir={str(tmp_path)!r}" in msg and "coco_captions" in msg
    assert "allowed" in one_line_error(tfds_coco_captions, "validation", data_dir=str(tmp_path))


def test_tfds_examples_to_captions():
    """The conversion of tfds coco_captions examples (as tfds.as_numpy yields them)."""
    examples = [{"image": np.full((12, 20, 3), 10 * k, np.uint8), "image/id": np.int64(100 + k),
                 "image/filename": b"x.jpg",
                 "captions": {"id": np.arange(k + 1), "text": np.array(
                     [f" caption {k}.{j} ".encode() for j in range(k + 1)], dtype=object)}}
                for k in range(4)]
    data = coco_examples_to_captions(iter(examples), np.array([1, 3]), resolution=6)
    assert data.images.shape == (2, 6, 6, 3) and (data.images[1] == 30).all()
    assert data.image_ids.tolist() == [101, 103]
    assert data.captions == ("caption 1.0", "caption 1.1", "caption 3.0", "caption 3.1",
                             "caption 3.2", "caption 3.3")
    assert data.caption_image.tolist() == [0, 0, 1, 1, 1, 1]
