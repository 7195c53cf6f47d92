"""DiCap retrieval: the :test variant end to end, config errors before any work, the paper variants'
validation and data path on tiny Karpathy fixtures, and the loss against its closed form."""

import json
import os
import re
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcf.configs import ConfigError
from jaxcf.pipelines import get_pipeline, run
from tests.test_data_captions import _write_coco
from tests.test_main import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RETRIEVAL = os.path.join(ROOT, "configs", "retrieval.py")


def _set(config, field, value):
    node = config
    for part in field.split(".")[:-1]:
        node = node[part]
    node[field.split(".")[-1]] = value


def test_retrieval_and_vqa_toys_generate_with_the_classification_toys_action_and_foundation():
    """The toys' README tables read the classification toy's counterfactuals: a setting pinned for one
    gradient mode (s = 20 on the raw gradient) must not ride on another (the normalized one)."""
    dicap = load_config(os.path.join(ROOT, "configs", "dicap.py"), "toy")
    for path in (RETRIEVAL, os.path.join(ROOT, "configs", "vqa.py")):
        c = load_config(path, "toy")
        assert c.counterfactual.to_dict() == dicap.counterfactual.to_dict(), path
        assert c.foundation.to_dict() == dicap.foundation.to_dict(), path


@pytest.mark.parametrize("field,value,message", [
    ("data.name", "flickr", "config.data.name='flickr' is not allowed; allowed: 'shapes', 'karpathy', 'tfds:coco_captions'"),
    ("data.relevance", "image", "config.data.relevance='image' is not allowed; allowed: 'text', 'pair'"),
    ("data.relevance", "pair", "config.data.relevance must be 'text' for the shapes world"),
    ("train.batch_size", 64, "config.train.batch_size=64 is larger than the 12 few-shot pairs"),
    ("counterfactual.scale", -1.0, "config.counterfactual.scale=-1.0 must be in [0.0, inf]"),
    ("counterfactual.target", "nearest", "config.counterfactual.target='nearest' is not allowed"),
    ("eval.ks", (0, 5), "config.eval.ks=(0, 5) must be a non-empty list of integers >= 1"),
    ("foundation.assets", "no_such_weights", "config.foundation.assets='no_such_weights': no such folder"),
    ("train.optimizer", "lion", "config.train.optimizer='lion' is not allowed; allowed: 'sgd', 'adamw'"),
    ("train.cf_filter", "judge", "config.train.cf_filter='judge' is not allowed; allowed: 'none', 'clip_flip'"),
])
def test_bad_config_fails_before_any_work(tmp_path, field, value, message):
    config = load_config(RETRIEVAL, "test")
    _set(config, field, value)
    t0 = time.time()
    with pytest.raises(ConfigError, match=re.escape(message)):
        run(config, str(tmp_path / "w"))
    assert time.time() - t0 < 5
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("variant", ["coco", "flickr30k"])
def test_paper_variants_validate_and_name_a_missing_split_file(tmp_path, variant):
    config = load_config(RETRIEVAL, variant)
    assert config.foundation.kind == "pretrained" and config.data.name == "karpathy"
    split_file, root = _write_coco(tmp_path)
    config.data.update(split_file=str(split_file), image_root=str(root))
    get_pipeline("retrieval").validate(config)  # the paper settings pass as they are
    config.data.split_file = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match=re.escape(f"config.data.split_file='{tmp_path / 'missing.json'}': no such file")):
        get_pipeline("retrieval").validate(config)


def test_karpathy_source_pairs_and_one_line_errors(tmp_path):
    from jaxcf.dicap.task_data import retrieval_source

    split_file, root = _write_coco(tmp_path)
    config = load_config(RETRIEVAL, "coco")
    config.data.update(split_file=str(split_file), image_root=str(root), resolution=16, shots=2,
                       train_split="test+restval")
    shots = retrieval_source(config).fewshot(0)
    assert shots.images.shape == (2, 16, 16, 3) and -1 <= shots.images.min() and shots.images.max() <= 1
    # every caption of the two images is a pair; the generator's classes are the first captions
    assert len(shots.pair_image) == len(shots.pair_text) >= 2
    assert [shots.texts[t] for t in shots.pair_text[shots.pair_image == 0]][0] == shots.cf_class_names[0]
    np.testing.assert_array_equal(shots.cf_label, [0, 1])
    tests = retrieval_source(config).tests()
    assert tests["heldout"].num_images == 2  # the two "test" images
    # captions without images: one line naming the config fields
    os.remove(root / "val2014" / "COCO_val2014_000000000011.jpg")
    with pytest.raises(ConfigError) as e:
        retrieval_source(config).tests()
    assert "\n" not in str(e.value) and "config.data" in str(e.value) and "have no image file" in str(e.value)


def test_retrieval_loss_lambda_zero_is_coop_and_adds_lambda_times_the_counterfactual_term():
    from jaxcf.dicap.losses import counterfactual_contrastive_loss
    from jaxcf.dicap.tasks import retrieval_task_loss

    rng = np.random.default_rng(0)
    texts = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
    batch = {"f": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32), "text": jnp.asarray([0, 1, 1, 3]),
             "image": jnp.asarray([0, 1, 2, 3]), "f_cf": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32),
             "valid": jnp.asarray([True, True, False, True])}
    feats = lambda rows: texts[rows]  # noqa: E731
    coop, _ = retrieval_task_loss(0.0, 0.1)(feats, {k: batch[k] for k in ("f", "text", "image")}, 10.0)
    lam0, _ = retrieval_task_loss(0.0, 0.1)(feats, batch, 10.0)
    assert float(lam0) == float(coop)
    dicap, m = retrieval_task_loss(0.5, 0.1)(feats, batch, 10.0)
    l_cf = counterfactual_contrastive_loss(batch["f"], batch["f_cf"], texts[batch["text"]], jnp.arange(4), 0.1,
                                           valid=batch["valid"])
    np.testing.assert_allclose(float(dicap), float(coop) + 0.5 * float(l_cf), rtol=1e-6)
    # CoOp's term by hand (float64): images 1 and 2 share caption 1, so each is a positive of the other
    f = np.asarray(batch["f"], np.float64)
    t = np.asarray(texts, np.float64)[np.asarray(batch["text"])]
    logits = 10.0 * (f / np.linalg.norm(f, axis=1, keepdims=True)) @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
    pos = np.eye(4, dtype=bool)
    pos[1, 2] = pos[2, 1] = True

    def nce(z, p):
        return np.mean(np.log(np.exp(z).sum(1)) - np.log(np.where(p, np.exp(z), 0).sum(1)))

    np.testing.assert_allclose(float(coop), 0.5 * (nce(logits, pos) + nce(logits.T, pos.T)), rtol=1e-5)


def test_clip_flip_filter_keeps_the_counterfactuals_zero_shot_clip_assigns_to_y_cf():
    from jaxcf.dicap.tasks import counterfactual_mask

    classes = np.eye(3, 4, dtype=np.float32)  # class c's text feature is the axis c
    f_cf = np.array([[0.1, 2, 0, 0], [3, 0.5, 0, 0], [0, 0, -1, 0.2], [0, 0.2, 1, 0]], np.float32)
    y_cf = np.array([1, 1, 2, 2])
    np.testing.assert_array_equal(counterfactual_mask(f_cf, classes, y_cf, "clip_flip"), [True, False, False, True])
    assert counterfactual_mask(f_cf, classes, y_cf, "none").all()


@pytest.mark.slow
def test_retrieval_test_variant_end_to_end(tmp_path):
    config = load_config(RETRIEVAL, "test")
    work = str(tmp_path / "run")
    res = run(config, work)
    for name in ("results.json", "results.md", "examples.png", "config.json"):
        assert os.path.isfile(os.path.join(work, name)), name
    with open(os.path.join(work, "results.json")) as f:
        saved = json.load(f)
    assert saved["pipeline"] == "retrieval" and saved["per_seed"][0]["seed"] == 0
    assert set(saved["timing"]) >= {"compile_seconds", "run_seconds"}
    s = res["summary"]
    for method in ("zeroshot", "init", "coop", "dicap", "dicap_gt"):
        for split in ("heldout", "conflict"):
            for way in ("i2t", "t2i"):
                r = [s[f"{method}_{split}_{way}_R@{k}"]["mean"] for k in (1, 5, 10)]
                assert 0.0 <= r[0] <= r[1] <= r[2] <= 1.0, (method, split, way, r)
    assert 0.0 <= s["cf_judge_flip_rate"]["mean"] <= 1.0 and s["cf_l1"]["mean"] > 0
    assert s["dicap_final_l_cf"]["mean"] > 0 and "coop_final_l_cf" not in s  # CoOp has no counterfactual term
    md = open(os.path.join(work, "results.md")).read()
    assert "| DiCap (generated counterfactuals) |" in md and "bias-conflicting" in md
    assert os.listdir(os.path.join(work, "counterfactuals"))  # cached for a rerun
