"""Real-image loaders: image folders, and tfds datasets read from tiny copies written in the real
tfds format (write_fake_tfds) through the same calls a user makes. Offline."""

import os

import numpy as np
import pytest
from PIL import Image

from jaxcf.data import folder_dataset, get_dataset

os.environ.setdefault("JAXCF_TF_THREADS", "1")


# ----------------------------------------------------------------------------- folders


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    colours = {"blue_jay": (0, 0, 255), "apple": (255, 0, 0), "cat": (0, 255, 0),
               "dog": (255, 255, 0)}
    for c, rgb in colours.items():
        (root / c).mkdir()
        for i in range(3):
            img = np.zeros((20, 40, 3), np.uint8)  # wide: the centre crop keeps the middle
            img[:, 5:35] = rgb
            Image.fromarray(img).save(root / c / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_folder_dataset(image_root):
    ds = folder_dataset(image_root, resolution=8)
    assert ds.class_names == ("apple", "blue jay", "cat", "dog")
    assert len(ds) == 12 and np.bincount(ds.labels).tolist() == [3, 3, 3, 3]
    b = ds.get(np.arange(12))
    assert b["image"].shape == (12, 8, 8, 3) and b["image"].dtype == np.float32
    np.testing.assert_allclose(b["image"][b["label"] == 1][:, :, :, 2], 1.0)  # blue fills crop
    base = folder_dataset(image_root, classes="base", resolution=8)
    novel = folder_dataset(image_root, classes="novel", resolution=8)
    assert base.class_names == ("apple", "blue jay") and novel.class_names == ("cat", "dog")
    assert set(novel.labels.tolist()) == {0, 1}
    k1 = folder_dataset(image_root, shots=2, seed=0, resolution=8)
    k2 = folder_dataset(image_root, shots=2, seed=0, resolution=8)
    assert len(k1) == 8 and k1.files == k2.files
    batch = get_dataset("folder", root=str(image_root), resolution=8).get(np.arange(4))
    assert batch["image"].shape == (4, 8, 8, 3)
    with pytest.raises(ValueError, match="classes.*apple"):
        folder_dataset(image_root, classes=["apple", "horse"])
    with pytest.raises(ValueError, match="not a directory"):
        folder_dataset(image_root / "missing")


# ----------------------------------------------------------------------------- tfds


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    pytest.importorskip("tensorflow_datasets")
    from jaxcf.data.tfds_data import write_fake_tfds
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    write_fake_tfds("caltech101", data_dir, examples_per_class={"train": 2, "test": 1})
    write_fake_tfds("celeb_a", data_dir, num_examples={"train": 16, "validation": 2, "test": 2})
    return data_dir


def test_class_names_without_data():
    pytest.importorskip("tensorflow_datasets")
    from jaxcf.data import tfds_data as T
    cal = T.tfds_class_names("caltech101")
    assert len(cal) == 100 and cal[:5] == ("face", "leopard", "motorbike", "accordion", "airplane")
    assert "background google" not in cal and "yin yang" in cal
    assert T.tfds_class_names("oxford_iiit_pet")[:2] == ("abyssinian", "american bulldog")
    assert T.tfds_class_names("cars196")[0] == "2000 AM General Hummer SUV"
    sun = T.tfds_class_names("sun397")
    assert len(sun) == 397 and sun[0] == "abbey" and "indoor wrestling ring" in sun
    assert T.tfds_class_names("eurosat")[0] == "Annual Crop Land"
    assert T.tfds_class_names("food101")[0] == "apple pie"
    assert len(T.tfds_class_names("oxford_flowers102")) == 102
    assert len(T.tfds_class_names("dtd")) == 47
    with pytest.raises(ValueError, match="WordNet ids.*class_names_file"):
        T.tfds_class_names("imagenet2012")
    assert T._ucf101(["ApplyEyeMakeup", "YoYo"])[1] == ["Apply Eye Makeup", "Yo Yo"]
    assert T.tfds_class_names("celeb_a", label_attribute="Blond_Hair") == ("not blond hair",
                                                                           "blond hair")
    with pytest.raises(ValueError, match="tfds dataset name 'not_a_dataset'"):
        T.tfds_class_names("not_a_dataset")


def test_caltech_base_novel(tfds_dir):
    from jaxcf.data.tfds_data import tfds_class_names
    kw = dict(data_dir=tfds_dir, resolution=16)
    base = get_dataset("tfds:caltech101", split="train", classes="base", **kw)
    assert base.class_names == tfds_class_names("caltech101")[:50] and len(base) == 100
    assert np.bincount(base.labels).tolist() == [2] * 50
    whole = base.subset(np.arange(8)).get(np.arange(8))
    assert whole["image"].shape == (8, 16, 16, 3) and whole["image"].dtype == np.float32
    assert -1 <= whole["image"].min() < whole["image"].max() <= 1
    assert whole["label"].dtype == np.int32 and whole["label"].max() < 50
    np.testing.assert_array_equal(whole["label"], base.labels[:8])
    novel = get_dataset("tfds:caltech101", split="test", classes="novel", **kw)
    assert novel.class_names[0] == tfds_class_names("caltech101")[50] and len(novel) == 50


def test_kshot(tfds_dir):
    kw = dict(split="train", classes="all", data_dir=tfds_dir, resolution=16)
    k1 = get_dataset("tfds:caltech101", shots=1, seed=0, **kw)
    k1b = get_dataset("tfds:caltech101", shots=1, seed=0, **kw)
    k2 = get_dataset("tfds:caltech101", shots=1, seed=1, **kw)
    assert len(k1) == 100 and sorted(k1.labels.tolist()) == list(range(100))
    np.testing.assert_array_equal(k1.arrays["image"], k1b.arrays["image"])
    assert not np.array_equal(k1.arrays["image"], k2.arrays["image"])
    assert k1.get(np.arange(10))["image"].shape == (10, 16, 16, 3)


def test_celeb_a_attributes(tfds_dir):
    ds = get_dataset("tfds:celeb_a", split="train", data_dir=tfds_dir, resolution=16,
                     label_attribute="Blond_Hair", confounder_attribute="Male")
    assert ds.class_names == ("not blond hair", "blond hair") and len(ds) == 16
    b = ds.subset(np.arange(16)).get(np.arange(16))
    attrs = b["attributes"]
    assert attrs.shape == (16, 40) and b["image"].shape == (16, 16, 16, 3)
    np.testing.assert_array_equal(b["label"], attrs[:, ds.attribute_names.index("Blond_Hair")])
    np.testing.assert_array_equal(b["confounder"], attrs[:, ds.attribute_names.index("Male")])
    np.testing.assert_array_equal(b["group"], 2 * b["label"] + b["confounder"])
    with pytest.raises(ValueError, match="label_attribute 'Blonde'.*Blond_Hair"):
        get_dataset("tfds:celeb_a", data_dir=tfds_dir, label_attribute="Blonde")


def test_tfds_errors(tfds_dir, tmp_path):
    with pytest.raises(ValueError, match="split 'valid'.*'train'"):
        get_dataset("tfds:caltech101", split="valid", data_dir=tfds_dir)
    with pytest.raises(ValueError, match="classes"):
        get_dataset("tfds:caltech101", classes=["unicorn"], data_dir=tfds_dir)
    with pytest.raises(ValueError, match="tfds dataset name"):
        get_dataset("tfds:no_such_dataset", data_dir=tfds_dir)
    with pytest.raises(FileNotFoundError, match="'dtd' is not prepared under"):
        get_dataset("tfds:dtd", data_dir=str(tmp_path))
