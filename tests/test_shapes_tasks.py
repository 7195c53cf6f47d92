"""Retrieval and VQA toys over the shapes world, and the ground-truth counterfactual of a question
(it changes exactly the asked factor and its answer; pixels come from the renderer)."""

import numpy as np
import pytest

from jaxcf.data import shapes as S
from jaxcf.data import shapes_tasks as T
from tests.errors import one_line_error



def test_retrieval_splits_and_captions():
    train = T.shapes_retrieval("train", shots=8, bias=0.75, caption_styles=("plain", "layout"))
    f = train.info["factors"]
    assert train.num_images == 6 * 8 and len(train.captions) == 2 * 48
    assert train.captions[:48] == tuple(S.captions(f))
    assert train.captions[48:] == tuple(S.captions(f, layout=True))
    assert train.caption_image.tolist() == list(range(48)) * 2
    np.testing.assert_array_equal(train.images, S.render_shapes(f)[0])
    assert set(f[:, 0]) == set(S.BASE_CLASSES) and train.info["aligned"].mean() == 0.75
    rel = train.relevance("text")
    assert rel.shape == (48, 96) and (rel >= train.relevance("pair")).all()
    i, t = np.nonzero(rel)
    assert all(train.captions[tt] in {train.captions[i_], train.captions[i_ + 48]}
               for i_, tt in zip(i, t))
    conflict = T.shapes_retrieval("test_conflict", num_per_class=3)
    assert conflict.num_images == 18 and conflict.info["aligned"].sum() == 0
    test = T.shapes_retrieval("test", num_per_class=2, seed=1)
    assert set(test.info["factors"][:, 0]) == set(range(len(S.SHAPE_NAMES)))
    assert "allowed" in one_line_error(T.shapes_retrieval, "fewshot")
    assert "allowed" in one_line_error(T.shapes_retrieval, caption_styles=("fancy",))


def test_vqa_questions_answers():
    data = T.shapes_vqa("test", num_per_class=2)
    f = data.info["factors"]
    n, k = len(f), len(T.QUESTION_TYPES)
    assert data.num_questions == n * k and data.vocab == T.ANSWERS
    assert data.question_types[:k] == T.QUESTION_TYPES
    assert data.questions[:k] == tuple(T.QUESTIONS[q] for q in T.QUESTION_TYPES)
    layout = S.captions(f, layout=True)
    for q in range(data.num_questions):
        img, qt, ans = data.question_image[q], data.question_types[q], data.answers[q]
        assert data.vocab[data.label[q]] == ans and ans in T.CANDIDATES[qt]
        if qt == "shape":
            assert ans == S.SHAPE_NAMES[f[img, 0]]
        elif qt in ("color", "background"):
            assert ans == S.COLOR_NAMES[f[img, 1 if qt == "color" else 2]]
        elif qt == "size":
            assert layout[img].startswith(f"a {ans} ")
        else:  # the position words of the layout caption
            assert (f" at the {ans} " if ans != "center" else " in the center ") in layout[img]
    np.testing.assert_array_equal(data.scores, np.eye(len(T.ANSWERS))[data.label])
    assert data.accuracy(data.label)["overall"] == 1.0
    mask = data.info["type_answer_mask"]
    assert mask.shape == (k, len(T.ANSWERS)) and mask.sum(1).tolist() == [12, 10, 10, 2, 9]
    assert one_line_error(T.shapes_vqa, question_types=("count",)).startswith("question_types")
    sub = T.shapes_vqa("train", question_types=("background", "shape"), shots=4)
    assert sub.num_questions == 2 * 24 and sub.info["aligned"].mean() == 1.0


@pytest.mark.parametrize("qtype", T.QUESTION_TYPES)
def test_counterfactual_changes_exactly_the_asked_factor(qtype):
    data = T.shapes_vqa("test", num_per_class=3, question_types=(qtype,), seed=2)
    f = data.info["factors"][data.question_image]
    cf = T.question_counterfactuals(f, data.question_types, seed=5)
    valid = cf["valid"]
    assert valid.mean() >= (0.75 if qtype == "size" else 1.0)
    asked = list(T.QUESTION_FACTORS[qtype])
    others = [c for c in range(6) if c not in asked]
    np.testing.assert_array_equal(cf["factors"][:, others], f[:, others])
    changed = asked[:1] if qtype == "size" else asked  # size: x, y follow the centre
    assert (cf["factors"][valid][:, changed] != f[valid][:, changed]).any(1).all()
    if qtype == "size":  # the centre stays within half a pixel
        centre = lambda g: g[:, 4:6] + g[:, 3:4] / 2  # noqa: E731
        assert np.abs(centre(cf["factors"]) - centre(f)).max() <= 0.5
    np.testing.assert_array_equal(cf["factors"][~valid], f[~valid])
    np.testing.assert_array_equal(cf["image"], S.render_shapes(cf["factors"])[0])
    assert (cf["image"][valid] != S.render_shapes(f[valid])[0]).any((1, 2, 3)).all()
    for i in range(len(f)):
        assert cf["answer"][i] == T.answer_of(cf["factors"][i], qtype)
        assert T.ANSWERS[cf["label"][i]] == cf["answer"][i]
        assert (cf["answer"][i] != data.answers[i]) == valid[i]
        for other in T.QUESTION_TYPES:  # every other question keeps its answer
            if other != qtype:
                assert T.answer_of(cf["factors"][i], other) == T.answer_of(f[i], other)
    assert (cf["factors"][:, 1] != cf["factors"][:, 2]).all()  # object stays off the background


def test_counterfactuals_deterministic_and_checked():
    data = T.shapes_vqa("test_conflict", num_per_class=2)
    f = data.info["factors"][data.question_image]
    a = T.question_counterfactuals(f, data.question_types, seed=0)
    b = T.question_counterfactuals(f, data.question_types, seed=0)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    one = T.question_counterfactuals(f[:3], "shape")
    assert one["valid"].all() and (one["factors"][:, 0] != f[:3, 0]).all()
    assert "entries" in one_line_error(T.question_counterfactuals, f[:3], ["shape"])
    assert "allowed" in one_line_error(T.question_counterfactuals, f[:1], ["count"])
    # An object as large as the image has nowhere else to go.
    big = np.array([[0, 1, 2, 32, 0, 0]], np.int32)
    assert not T.question_counterfactuals(big, "position")["valid"][0]
