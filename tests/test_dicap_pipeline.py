"""DiCap end to end on the smallest shapes world, and its input checks."""

import json
import os
import re
import time

import numpy as np
import pytest

from jaxcf.configs import ConfigError
from jaxcf.pipelines import run
from tests.test_main import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DICAP = os.path.join(ROOT, "configs", "dicap.py")


@pytest.mark.parametrize("field,value,message", [
    ("counterfactual.scale", -1.0, "config.counterfactual.scale=-1.0 must be in [0.0, inf]"),
    ("counterfactual.depth", 0.0, "config.counterfactual.depth=0.0 must be in (0.0, 1.0]"),
    ("counterfactual.depth", 1.2, "config.counterfactual.depth=1.2 must be in (0.0, 1.0]"),
    ("counterfactual.target", "nearest", "config.counterfactual.target='nearest' is not allowed; allowed: 'similarity', 'random'"),
    ("data.novel_classes", ("heart", "unicorn"), "config.data.novel_classes: unknown class name 'unicorn'"),
    ("train.batch_size", 64, "config.train.batch_size=64 is larger than the 24 few-shot examples"),
    ("foundation.assets", "no_such_weights", "config.foundation.assets='no_such_weights': no such folder"),
    ("prompt.mode", "maple", "config.prompt.mode='maple' is not allowed"),
    ("counterfactual.ddim_steps", 700, "config.counterfactual.ddim_steps=700 exceeds the 500 timesteps available at depth 0.5"),
    ("train.cf_ce", -1.0, "config.train.cf_ce=-1.0 must be in [0.0, inf]"),
    ("counterfactual.mask", "box", "config.counterfactual.mask='box' is not allowed; allowed: 'none', 'edit'"),
    ("counterfactual.mask_threshold", 0.0, "config.counterfactual.mask_threshold=0.0 must be in (0.0, inf]"),
    ("counterfactual.mask_dilation", -1, "config.counterfactual.mask_dilation=-1 must be an integer >= 0"),
])
def test_bad_input_fails_before_any_work(tmp_path, field, value, message):
    config = load_config(DICAP, "test")
    node = config
    for part in field.split(".")[:-1]:
        node = node[part]
    node[field.split(".")[-1]] = value
    t0 = time.time()
    with pytest.raises(ConfigError, match=re.escape(message)):
        run(config, str(tmp_path / "w"))
    assert time.time() - t0 < 5
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_dicap_test_variant_end_to_end_and_rerun_reuses_everything(tmp_path):
    config = load_config(DICAP, "test")
    work = str(tmp_path / "run")
    res = run(config, work)
    for name in ("results.json", "results.md", "counterfactuals.png", "config.json"):
        assert os.path.isfile(os.path.join(work, name)), name
    s = res["summary"]
    for method in ("zeroshot", "coop", "dicap"):
        for split in ("base", "novel", "conflict", "hm"):
            assert 0.0 <= s[f"{method}_{split}"]["mean"] <= 1.0
    assert 0.0 <= s["cf_flip_rate"]["mean"] <= 1.0 and np.isfinite(s["cf_cld"]["mean"])
    assert os.listdir(os.path.join(work, "counterfactuals"))  # cached
    with open(os.path.join(work, "results.json")) as f:
        assert json.load(f)["per_seed"][0]["seed"] == 0
    # a rerun loads the foundation exports, cached counterfactuals and finished prompt checkpoints
    t0 = time.time()
    res2 = run(config, work)
    assert res2["per_seed"] == res["per_seed"]
    assert time.time() - t0 < res["seconds"]


@pytest.mark.slow
def test_the_config_that_made_the_shipped_weights_still_trains(tmp_path):
    """configs/dicap.py:toy at its real model sizes, a few steps of each foundation model."""
    import jax
    import numpy as np
    from flax import serialization

    from jaxcf.foundation import ASSETS
    from jaxcf.foundation.toy import toy_foundation
    from jaxcf.train import make_mesh

    config = load_config(DICAP, "toy")
    shipped = config.foundation.to_dict()
    config.foundation.assets = ""
    config.foundation.pretrain_examples = 128
    config.foundation.clip_train.update(steps=3, batch_size=32, confound_from=2)  # both pretraining pools
    config.foundation.unet_train.update(steps=3, batch_size=8)
    config.foundation.noise_classifier.update(steps=3, batch_size=8)
    found = toy_foundation(config, str(tmp_path), make_mesh([("data", -1)]))
    for name, params in (("clip", found.clip_params), ("unet", found.diffusion_params),
                         ("noise_classifier", found.noise_classifier_params)):
        assert os.path.isfile(tmp_path / "foundation" / f"{name}.msgpack")
        with open(os.path.join(ASSETS, shipped["assets"], f"{name}.msgpack"), "rb") as f:
            ref = serialization.msgpack_restore(f.read())
        # same architecture as the shipped weights: identical tree and shapes
        assert jax.tree_util.tree_structure(jax.device_get(params)) == jax.tree_util.tree_structure(ref)
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref)):
            assert np.shape(a) == np.shape(b)
    rows = [json.loads(line) for line in open(tmp_path / "foundation" / "clip_run" / "metrics.jsonl")]
    assert rows[-1]["step"] == 3 and np.isfinite(rows[-1]["loss"])
    # guide_on="implicit": the UNet fine-tuned class-conditional, starting from the unconditional
    # weights (CLIP and UNet now load from the exports) plus a zero class embedding, labels dropped
    # to a null class; the generator guides with the classifier that model implies
    from jaxcf.data.shapes import SHAPE_NAMES
    from jaxcf.dicap.runs import counterfactuals

    config.counterfactual.guide_on = "implicit"
    config.foundation.cond_unet.update(steps=3, batch_size=8)
    mesh = make_mesh([("data", -1)])
    found = toy_foundation(config, str(tmp_path), mesh)
    with open(os.path.join(ASSETS, shipped["assets"], "cond_unet.msgpack"), "rb") as f:
        ref = serialization.msgpack_restore(f.read())
    assert jax.tree_util.tree_structure(jax.device_get(found.diffusion_params)) == jax.tree_util.tree_structure(ref)
    for a, b in zip(jax.tree_util.tree_leaves(found.diffusion_params), jax.tree_util.tree_leaves(ref)):
        assert np.shape(a) == np.shape(b)
    with open(tmp_path / "foundation" / "unet.msgpack", "rb") as f:
        base = serialization.msgpack_restore(f.read())
    with open(tmp_path / "foundation" / "cond_unet.msgpack", "rb") as f:
        cond = serialization.msgpack_restore(f.read())
    emb = cond.pop("class_embedding")["embedding"]
    assert emb.shape[0] == len(SHAPE_NAMES) + 1 and found.null_class == len(SHAPE_NAMES)  # every shape + null
    assert np.abs(emb).max() > 0  # trained away from its zero start
    assert set(cond) == set(base)  # otherwise the unconditional architecture
    rows = [json.loads(line) for line in open(tmp_path / "foundation" / "cond_unet_run" / "metrics.jsonl")]
    assert rows[-1]["step"] == 3 and np.isfinite(rows[-1]["loss"])
    x = np.asarray(jax.random.uniform(jax.random.key(0), (8, 32, 32, 3), minval=-1, maxval=1))
    names = ["circle", "star"]  # y_cf indexes these: the generator must map them to the model's labels
    y_cf = np.array([0, 1] * 4)

    def gen(labels, scale, class_names):
        cf = config.counterfactual.copy_and_resolve_references()
        cf.update(scale=scale, ddim_steps=3, batch_size=8)
        return counterfactuals(found, x, labels, None, cf, mesh, "cf", class_names=class_names)

    guided, plain = gen(y_cf, 5.0, names), gen(y_cf, 0.0, names)
    assert np.all(np.isfinite(guided)) and np.abs(guided - plain).max() > 1e-3  # guidance acts
    full = gen(np.array([SHAPE_NAMES.index(names[i]) for i in y_cf]), 5.0, list(SHAPE_NAMES))
    np.testing.assert_allclose(full, guided, atol=1e-5)  # the same model labels either way
    # cond_unet.init="scratch": its own architecture (cond_unet.model over unet) and pool, from its own init
    config.foundation.cond_unet.update(init="scratch", steps=2, pool_examples=16)
    found = toy_foundation(config, str(tmp_path / "scratch"), mesh)
    p = found.diffusion_params
    assert p["class_embedding"]["embedding"].shape[0] == len(SHAPE_NAMES) + 1
    widths = tuple(config.foundation.cond_unet.model.block_out_channels)
    assert p["conv_in"]["kernel"].shape[-1] == widths[0] != config.foundation.unet.block_out_channels[0]
    meta = json.loads((tmp_path / "scratch" / "foundation" / "cond_unet.json").read_text())
    assert meta["data"]["pretrain_examples"] == 16 and meta["model"]["resnet_time_scale_shift"] == "scale_shift"
    assert "from_unconditional" not in meta


def test_the_shipped_toy_clip_knows_the_shapes_and_its_photo_template_carries_the_shortcut():
    """The world the DiCap toy's results rest on (README "DiCap on the shapes world"): the shipped
    CLIP reads clean pretraining-size shapes zero-shot, and its pretraining corpus (photos on each
    shape's usual background, drawings on any) makes "a photo of a {}." lean on the background where
    "a drawing of a {}." does not: on the task's bias-conflicting images the drawing template wins."""
    from jaxcf.data.common import to_model_range
    from jaxcf.data.shapes import shapes_dataset
    from jaxcf.dicap.losses import class_cosines
    from jaxcf.dicap.metrics import accuracy as top1
    from jaxcf.foundation import encode_images, template_text_features
    from jaxcf.train import make_mesh
    from tests.test_main import shipped_toy_foundation

    config = load_config(DICAP, "toy")
    mesh = make_mesh([("data", -1)])
    found = shipped_toy_foundation(config, mesh)

    def accuracy(split, template, object_size=None):
        ds = shapes_dataset(split, num_per_class=100, seed=11, object_size=object_size)
        f = encode_images(found, to_model_range(ds.arrays["image"]), mesh=mesh)
        return top1(class_cosines(f, template_text_features(found, list(ds.class_names), template, 16)),
                    ds.arrays["label"])

    assert accuracy("test_base", "a photo of a {}.") >= 0.9
    assert accuracy("test_novel", "a photo of a {}.") >= 0.9
    task = tuple(config.data.object_size)
    photo, drawing = (accuracy("test_conflict", t, task) for t in ("a photo of a {}.", "a drawing of a {}."))
    assert drawing > photo + 0.04, (photo, drawing)  # measured 41.8 / 50.3 at 200 per class
