"""DiCap VQA: the :test variant end to end, config errors before any work, the VQA v2 variant's
validation and data path on tiny official-format fixtures, and the statement scoring and loss
against brute force."""

import json
import os
import re
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcf.configs import ConfigError
from jaxcf.pipelines import get_pipeline, run
from tests.test_data_vqa import _write_vqa
from tests.test_main import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VQA = os.path.join(ROOT, "configs", "vqa.py")
TYPES = ("shape", "color", "background", "size", "position")


def _set(config, field, value):
    node = config
    for part in field.split(".")[:-1]:
        node = node[part]
    node[field.split(".")[-1]] = value


@pytest.mark.parametrize("field,value,message", [
    ("data.name", "gqa", "config.data.name='gqa' is not allowed; allowed: 'shapes', 'vqa_v2'"),
    ("data.question_types", ("shape", "count"), "config.data.question_types entry='count' is not allowed; "
                                                "allowed: 'shape', 'color', 'background', 'size', 'position'"),
    ("train.batch_size", 128, "config.train.batch_size=128 is larger than the 60 few-shot questions"),
    ("train.lam", -1.0, "config.train.lam=-1.0 must be in [0.0, inf]"),
    ("counterfactual.guide_on", "eps", "config.counterfactual.guide_on='eps' is not allowed"),
    ("data.object_size", (7, 40), "config.data.object_size=(7, 40) must be () or (min, max) pixels"),
    ("data.name", "vqa_v2", "config.data.name='vqa_v2' needs config.foundation.kind='pretrained'"),
])
def test_bad_config_fails_before_any_work(tmp_path, field, value, message):
    config = load_config(VQA, "test")
    _set(config, field, value)
    t0 = time.time()
    with pytest.raises(ConfigError, match=re.escape(message)):
        run(config, str(tmp_path / "w"))
    assert time.time() - t0 < 5
    assert not (tmp_path / "w").exists()


def _vqav2_config(tmp_path):
    qfile, afile, root = _write_vqa(tmp_path)
    config = load_config(VQA, "vqav2")
    config.data.update(train_questions=str(qfile), train_annotations=str(afile), train_images=str(root),
                       test_questions=str(qfile), test_annotations=str(afile), test_images=str(root),
                       resolution=16, shots=5, top_k=0)
    return config


def test_vqav2_variant_validates_and_names_missing_files(tmp_path):
    config = _vqav2_config(tmp_path)
    get_pipeline("vqa").validate(config)  # the paper settings pass with the files in place
    config.data.test_images = str(tmp_path / "no_images")
    with pytest.raises(ConfigError, match=re.escape(f"config.data.test_images='{tmp_path / 'no_images'}': no such folder")):
        get_pipeline("vqa").validate(config)
    config = load_config(VQA, "vqav2")
    with pytest.raises(ConfigError, match=re.escape("config.data.train_questions is empty")):
        get_pipeline("vqa").validate(config)


def test_vqav2_source_statements_and_vocabulary_mismatch(tmp_path):
    from jaxcf.dicap.task_data import vqa_source

    config = _vqav2_config(tmp_path)
    source = vqa_source(config)
    # statements keyed by the annotations' question types, candidates = the answers seen with each
    assert "what color is the red" in source.statements and "is it no" in source.statements
    shots = source.fewshot(0)
    assert len(shots.questions) == 5 and shots.images.shape[1:] == (16, 16, 3)
    np.testing.assert_array_equal(shots.q_cf, np.arange(5))  # one counterfactual per question
    np.testing.assert_array_equal(shots.cf_label, shots.answer)  # guided away from its own answer
    # an answer vocabulary of another dataset stops with one line naming the config fields
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps(["giraffe", "zebra"]))
    config.data.vocab = str(vocab)
    with pytest.raises(ConfigError) as e:
        vqa_source(config)
    assert "\n" not in str(e.value) and "config.data.train_questions" in str(e.value) and "matches none" in str(e.value)


def test_shapes_ground_truth_changes_the_asked_factor_and_aims_shape_questions_at_y_cf():
    from jaxcf.dicap.task_data import vqa_source

    source = vqa_source(load_config(VQA, "test"))
    shots = source.fewshot(0)
    assert shots.images.shape[0] == 12 and len(shots.questions) == 60
    y_cf = (shots.cf_label + 1) % len(shots.cf_class_names)  # another base shape per image
    x_gt, label, valid = source.ground_truth(shots, 0, y_cf)
    assert x_gt.shape == (60, 32, 32, 3)
    shape_q = shots.q_cf >= 0
    np.testing.assert_array_equal(shape_q, [TYPES[t] == "shape" for t in shots.q_type])
    # shape questions: exactly the generator's target; every changed answer differs from the factual one
    assert [source.vocab[a] for a in label[shape_q]] == [shots.cf_class_names[y_cf[i]] for i in shots.q_cf[shape_q]]
    assert np.all(label[valid] != shots.answer[valid]) and valid.mean() > 0.5
    # the image of a question that could not be changed is the factual one
    np.testing.assert_allclose(x_gt[~valid], shots.images[shots.q_image[~valid]], atol=1e-6)


def test_statement_scoring_and_loss_against_brute_force():
    from jaxcf.data.shapes_tasks import ANSWERS, type_answer_mask
    from jaxcf.dicap.losses import counterfactual_contrastive_loss
    from jaxcf.dicap.tasks import vqa_predictions, vqa_task_loss

    rng = np.random.default_rng(0)
    mask = type_answer_mask(TYPES)
    pair_type, pair_answer = np.nonzero(mask)
    S, T, A = len(pair_type), len(TYPES), len(ANSWERS)
    statements = rng.normal(size=(S, 8)).astype(np.float32)
    images = rng.normal(size=(6, 8)).astype(np.float32)
    q_image, q_type = np.array([0, 1, 2, 3, 4, 5, 0]), np.array([0, 1, 2, 3, 4, 0, 4])
    pred = vqa_predictions(images, statements, q_image, q_type, pair_type, pair_answer, T, A)
    norm = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    for q in range(len(q_image)):  # brute force: the best statement of the question's type
        rows = np.flatnonzero(pair_type == q_type[q])
        best = rows[np.argmax(norm(statements[rows]) @ norm(images[q_image[q]]))]
        assert pred[q] == pair_answer[best]
    # the loss: lambda = 0 is CoOp's CE over the type's candidates; lambda adds lambda x L_cf
    answers = np.array([pair_answer[np.flatnonzero(pair_type == t)[0]] for t in q_type[:4]])
    batch = {"f": jnp.asarray(images[:4]), "qtype": jnp.asarray(q_type[:4]), "answer": jnp.asarray(answers),
             "f_cf": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32), "valid": jnp.asarray([1, 0, 1, 1], bool)}
    feats = lambda rows: jnp.asarray(statements)  # noqa: E731
    coop, _ = vqa_task_loss(0.0, 0.1, pair_type, pair_answer, T, A)(
        feats, {k: batch[k] for k in ("f", "qtype", "answer")}, 10.0)
    lam0, _ = vqa_task_loss(0.0, 0.1, pair_type, pair_answer, T, A)(feats, batch, 10.0)
    assert float(lam0) == float(coop)
    ce = []
    for b in range(4):
        rows = np.flatnonzero(pair_type == q_type[b])
        logits = 10.0 * norm(statements[rows].astype(np.float64)) @ norm(images[b].astype(np.float64))
        ce.append(-logits[list(pair_answer[rows]).index(answers[b])] + np.log(np.exp(logits).sum()))
    np.testing.assert_allclose(float(coop), np.mean(ce), rtol=1e-5)
    dicap, _ = vqa_task_loss(2.0, 0.1, pair_type, pair_answer, T, A)(feats, batch, 10.0)
    grid = np.ones((T, A, 8), np.float32)
    grid[pair_type, pair_answer] = statements
    l_cf = counterfactual_contrastive_loss(batch["f"], batch["f_cf"], jnp.asarray(grid)[batch["qtype"]],
                                           batch["answer"], 0.1, valid=batch["valid"])
    np.testing.assert_allclose(float(dicap), float(coop) + 2.0 * float(l_cf), rtol=1e-5)


@pytest.mark.slow
def test_vqa_test_variant_end_to_end(tmp_path):
    config = load_config(VQA, "test")
    work = str(tmp_path / "run")
    res = run(config, work)
    for name in ("results.json", "results.md", "examples.png", "config.json"):
        assert os.path.isfile(os.path.join(work, name)), name
    with open(os.path.join(work, "results.json")) as f:
        saved = json.load(f)
    assert saved["pipeline"] == "vqa" and saved["question_types"] == list(TYPES)
    assert set(saved["timing"]) >= {"compile_seconds", "run_seconds"}
    s = res["summary"]
    for method in ("zeroshot", "init", "coop", "dicap", "dicap_gt"):
        for split in ("heldout", "conflict"):
            per_type = [s[f"{method}_{split}_{t}"]["mean"] for t in TYPES]
            assert all(0.0 <= a <= 1.0 for a in per_type)
            # every image is asked each type once: overall accuracy is the mean over types
            assert s[f"{method}_{split}_overall"]["mean"] == pytest.approx(np.mean(per_type), abs=1e-6)
    assert s["cf_question_fraction"]["mean"] == pytest.approx(0.2)  # the shape questions
    assert s["dicap_gt_final_l_cf"]["mean"] > 0 and "coop_final_l_cf" not in s
    assert 0.5 < s["gt_question_fraction"]["mean"] <= 1.0
    assert "| DiCap, ground-truth counterfactuals (control) |" in open(os.path.join(work, "results.md")).read()
