"""VQA v2 loader (question / annotation JSON + COCO image folder), answer vocabulary and the VQA
accuracy, on tiny fixtures written in the official formats."""

import json

import numpy as np
import pytest
from PIL import Image

from jaxcf.data.vqa import (answer_scores, answer_vocabulary, coco_image_path, normalize_answer,
                            vqa_accuracy, vqa_v2)
from tests.errors import one_line_error



def test_normalize_answer():
    assert normalize_answer("Two Dogs.") == "2 dogs"
    assert normalize_answer("  the  Red, car! ") == "red car"
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("yes") == "yes"


@pytest.mark.parametrize("pred,humans,expected", [
    ("yes", ["yes"] * 10, 1.0),
    ("yes", ["yes", "yes"] + ["no"] * 8, 2 / 3),
    ("yes", ["yes"] + ["no"] * 9, 1 / 3),
    ("yes", ["yes"] * 3 + ["no"] * 7, 1.0),
    ("maybe", ["yes"] * 5 + ["no"] * 5, 0.0),
    ("2", ["two", "Two", "2", "3"] + ["three"] * 6, 1.0),
    ("red car", ["the red car", "red car.", "blue car"], 2 / 3),
])
def test_vqa_accuracy_hand_computed(pred, humans, expected):
    assert vqa_accuracy(pred, humans) == pytest.approx(expected)


def test_answer_scores_and_vocabulary():
    humans = [["yes"] * 2 + ["no"] * 8, ["2", "two", "blue"], ["cat"]]
    vocab = ("no", "yes", "2", "dog")
    np.testing.assert_allclose(answer_scores(humans, vocab),
                               [[1, 2 / 3, 0, 0], [0, 0, 2 / 3, 0], [0, 0, 0, 0]], rtol=1e-6)
    answers = ["yes", "no", "Yes", "two", "2", "cat", "dog", "dog"]
    assert answer_vocabulary(answers, 3) == ("2", "dog", "yes")  # counts 2, 2, 2; then alphabetic
    assert answer_vocabulary(answers, 10) == ("2", "dog", "yes", "cat", "no")
    assert "top_k" in one_line_error(answer_vocabulary, answers, 0)


# question_id, image_id, question, question_type, answer_type, multiple_choice_answer, answers
QA = [
    (101, 42, "What color is the bus?", "what color is the", "other", "red",
     ["red"] * 6 + ["orange"] * 2 + ["maroon", "red "]),
    (102, 42, "Is it raining?", "is it", "yes/no", "no", ["no"] * 9 + ["yes"]),
    (103, 7, "How many cats?", "how many", "number", "2", ["2"] * 4 + ["two"] * 4 + ["3"] * 2),
    (104, 7, "Is this a cat?", "is this", "yes/no", "yes", ["yes"] * 7 + ["no"] * 3),
    (105, 9000, "What is it?", "what is", "other", "cat", ["cat"] * 2 + ["kitten"] * 8),
]


def _write_vqa(tmp_path, qa=QA, skip_images=(), drop_annotation=None, subtype="val2014"):
    root = tmp_path / "val2014"
    root.mkdir(parents=True, exist_ok=True)
    colours = {42: (200, 0, 0), 7: (0, 200, 0), 9000: (0, 0, 200)}
    for iid, colour in colours.items():
        if iid not in skip_images:
            Image.new("RGB", (40, 30), colour).save(coco_image_path(str(root), "val2014", iid))
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                 "data_subtype": subtype, "license": {},
                 "questions": [{"image_id": i, "question": q, "question_id": qid}
                               for qid, i, q, *_ in qa]}
    annotations = {"info": {}, "data_subtype": subtype, "annotations": [
        {"question_id": qid, "image_id": i, "question_type": qt, "answer_type": at,
         "multiple_choice_answer": mc,
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                     for j, a in enumerate(answers)]}
        for qid, i, _, qt, at, mc, answers in qa if qid != drop_annotation]}
    qfile = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    afile = tmp_path / "v2_mscoco_val2014_annotations.json"
    qfile.write_text(json.dumps(questions))
    afile.write_text(json.dumps(annotations))
    return qfile, afile, root


def test_load_and_accuracy(tmp_path):
    qfile, afile, root = _write_vqa(tmp_path)
    data = vqa_v2(qfile, root, afile, top_k=4, resolution=8)
    assert data.images.shape == (3, 8, 8, 3) and data.image_ids.tolist() == [7, 42, 9000]
    np.testing.assert_allclose(data.images[0].reshape(-1, 3).mean(0), (0, 200, 0), atol=4)
    assert data.question_image.tolist() == [1, 1, 0, 0, 2]
    assert data.question_ids.tolist() == [101, 102, 103, 104, 105]
    assert data.questions[2] == "How many cats?" and data.answers == ("red", "no", "2", "yes",
                                                                       "cat")
    assert data.question_types[0] == "what color is the" and data.answer_types[1] == "yes/no"
    assert data.vocab == ("2", "cat", "no", "red")  # one each; alphabetic
    assert data.label.tolist() == [3, 2, 0, -1, 1]
    # "2": four "2" and four "two" -> 8 humans -> 1; "cat" said by 2 -> 2/3.
    np.testing.assert_allclose(data.scores[2], [1, 0, 0, 0])
    np.testing.assert_allclose(data.scores[4], [0, 2 / 3, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(data.scores[0], [0, 0, 0, 1])  # "red" 7 times ("red " included)
    pred = np.array([3, 0, 0, 2, 1])  # 1, 0, 1, 1 ("no": 3 of 10 humans), 2/3
    acc = data.accuracy(pred)
    assert acc["overall"] == pytest.approx((1 + 0 + 1 + 1 + 2 / 3) / 5)
    assert acc["answer_type/yes/no"] == pytest.approx(0.5)
    assert acc["type/how many"] == 1.0 and acc["type/what is"] == pytest.approx(2 / 3)
    for q, p in enumerate(pred):
        assert data.scores[q, p] == pytest.approx(vqa_accuracy(data.vocab[p], data.human_answers[q]))
    # -1 = no answer (e.g. a question type without candidates): scores 0, not the last answer's score
    no_answer = data.accuracy(np.array([3, 0, 0, 2, -1]))
    assert no_answer["overall"] == pytest.approx(3 / 5) and no_answer["type/what is"] == 0.0
    batch = data.image_batch(data.question_image[:2])
    assert batch.shape == (2, 8, 8, 3) and batch.min() >= -1 and batch.max() <= 1


def test_given_vocabulary_subset_and_no_annotations(tmp_path):
    qfile, afile, root = _write_vqa(tmp_path)
    vocab_file = tmp_path / "answers.txt"
    vocab_file.write_text("yes\nno\n2\nred\n")
    data = vqa_v2(qfile, root, afile, vocab=vocab_file, resolution=4)
    assert data.vocab == ("yes", "no", "2", "red") and data.label.tolist() == [3, 1, 2, 0, -1]
    data = vqa_v2(qfile, root, afile, vocab=["yes", "no"], top_k=2, num_questions=3, seed=1,
                  resolution=4)
    assert data.num_questions == 3 and set(data.question_ids) <= {101, 102, 103, 104, 105}
    assert data.num_questions == len(data.answers) == len(data.scores)
    test_dev = vqa_v2(qfile, root, None, vocab=["yes", "no"], resolution=4)
    assert test_dev.num_questions == 5 and test_dev.answers == () and test_dev.scores.shape == (0, 2)


def test_bad_input_one_line(tmp_path):
    qfile, afile, root = _write_vqa(tmp_path)
    missing = tmp_path / "missing_questions.json"
    assert str(missing) in one_line_error(vqa_v2, missing, root, afile)
    assert str(tmp_path / "none.json") in one_line_error(vqa_v2, qfile, root,
                                                          tmp_path / "none.json")
    assert str(tmp_path / "noroot") in one_line_error(vqa_v2, qfile, tmp_path / "noroot", afile)
    # Answer vocabulary mismatches.
    assert "none of the 5" in one_line_error(vqa_v2, qfile, root, afile, vocab=["dog", "horse"])
    assert "repeats 'yes'" in one_line_error(vqa_v2, qfile, root, afile, vocab=["yes", "no", "yes"])
    assert "top_k=3" in one_line_error(vqa_v2, qfile, root, afile, vocab=["yes", "no"], top_k=3)
    assert "'Yes'" in one_line_error(vqa_v2, qfile, root, afile, vocab=["Yes", "no"])
    assert "is empty" in one_line_error(vqa_v2, qfile, root, afile, vocab=[])
    assert str(tmp_path / "v.txt") in one_line_error(vqa_v2, qfile, root, afile,
                                                      vocab=tmp_path / "v.txt")
    assert "vocab=" in one_line_error(vqa_v2, qfile, root, None)
    # A question without its annotation; questions whose image is missing; no questions.
    q2, a2, r2 = _write_vqa(tmp_path / "b", drop_annotation=103)
    msg = one_line_error(vqa_v2, q2, r2, a2)
    assert "1 questions" in msg and "question_id 103" in msg and str(a2) in msg
    q3, a3, r3 = _write_vqa(tmp_path / "c", skip_images=(7,))
    msg = one_line_error(vqa_v2, q3, r3, a3)
    assert msg.startswith("2 questions") and coco_image_path(str(r3), "val2014", 7) in msg
    assert "COCO_val2014_000000000007.jpg" in msg
    q4, a4, r4 = _write_vqa(tmp_path / "d", qa=[])
    assert "no questions" in one_line_error(vqa_v2, q4, r4, a4)
    q5, a5, r5 = _write_vqa(tmp_path / "e", subtype=None)
    assert "image_split" in one_line_error(vqa_v2, q5, r5, a5)
    assert vqa_v2(q5, r5, a5, image_split="val2014", resolution=4).num_questions == 5
