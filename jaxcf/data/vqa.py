"""VQA v2: question JSON + annotation JSON + a COCO image folder, an answer vocabulary and the
VQA accuracy.

Formats (the official files, e.g. ``v2_OpenEnded_mscoco_val2014_questions.json`` and
``v2_mscoco_val2014_annotations.json``)::

    questions:   {"data_subtype": "val2014", "questions": [{"image_id", "question", "question_id"}]}
    annotations: {"annotations": [{"question_id", "question_type", "answer_type",
                                   "multiple_choice_answer", "answers": [{"answer", ...}] * 10}]}

Images are ``image_root/COCO_<image_split>_<12-digit image_id>.jpg`` (image_split defaults to the
questions' data_subtype). Accuracy of an answer = min(#humans that gave it / 3, 1), after the light
normalisation of :func:`normalize_answer` (lower case, punctuation, articles, number words).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from typing import Any, Sequence

import numpy as np

from jaxcf.data.captions import _load_images, _read_json
from jaxcf.data.common import to_model_range

_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:]")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")  # a full stop, not a decimal point


def normalize_answer(answer: str) -> str:
    """"Two Dogs." -> "2 dogs": lower case, punctuation (except decimal points and apostrophes)
    dropped, number words to digits, articles removed, spaces collapsed (VQA-eval style)."""
    text = _PERIOD.sub("", _PUNCT.sub(" ", str(answer).lower().replace("\n", " ")))
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """min(#humans that gave ``prediction`` / 3, 1), both sides normalised."""
    p = normalize_answer(prediction)
    return min(sum(normalize_answer(a) == p for a in human_answers) / 3.0, 1.0)


def answer_scores(human_answers: Sequence[Sequence[str]], vocab: Sequence[str]) -> np.ndarray:
    """float32 [Nq, A]: the VQA accuracy of every vocabulary answer for every question (the soft
    target of VQA training; the accuracy of predicting answer a for question q is scores[q, a])."""
    index = {a: i for i, a in enumerate(vocab)}
    out = np.zeros((len(human_answers), len(vocab)), np.float32)
    for q, answers in enumerate(human_answers):
        for a, n in collections.Counter(normalize_answer(a) for a in answers).items():
            if a in index:
                out[q, index[a]] = min(n / 3.0, 1.0)
    return out


def answer_vocabulary(answers: Sequence[str], top_k: int) -> tuple[str, ...]:
    """The ``top_k`` most frequent (normalised) answers, ties broken alphabetically."""
    if top_k < 1:
        raise ValueError(f"top_k must be positive, got {top_k}")
    counts = collections.Counter(normalize_answer(a) for a in answers)
    return tuple(a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k])


def _read_vocab(vocab: str | os.PathLike | Sequence[str]) -> tuple[tuple[str, ...], str]:
    """(answers, description) from a list, a .json list or a text file (one answer a line)."""
    if isinstance(vocab, (str, os.PathLike)):
        path = os.fspath(vocab)
        if path.endswith(".json"):
            items = _read_json(path, "answer vocabulary file")
            if not isinstance(items, list):
                raise ValueError(f"answer vocabulary file {path} must hold a JSON list of answers")
        else:
            if not os.path.isfile(path):
                raise ValueError(f"answer vocabulary file not found: {path}")
            with open(path) as f:
                items = [line.rstrip("\n") for line in f if line.strip()]
        return tuple(str(a) for a in items), path
    return tuple(str(a) for a in vocab), f"the given list of {len(vocab)}"


def check_vocabulary(vocab: Sequence[str], answers: Sequence[str], where: str) -> None:
    """One-line ValueError if ``vocab`` is empty, repeats an answer, is not normalised, or covers
    none of ``answers`` (the questions' own answers): a vocabulary of another dataset."""
    if not vocab:
        raise ValueError(f"answer vocabulary {where} is empty")
    dup = [a for a, n in collections.Counter(vocab).items() if n > 1]
    if dup:
        raise ValueError(f"answer vocabulary {where} repeats {dup[0]!r} ({len(dup)} duplicates)")
    raw = [a for a in vocab if normalize_answer(a) != a]
    if raw:
        raise ValueError(f"answer vocabulary {where} has answers that are not normalised, first "
                         f"{raw[0]!r} (expected {normalize_answer(raw[0])!r})")
    have = set(vocab)
    if answers and not any(normalize_answer(a) in have for a in answers):
        raise ValueError(f"answer vocabulary {where} matches none of the {len(answers)} questions' "
                         f"answers (first {answers[0]!r}): a vocabulary of another dataset?")


@dataclasses.dataclass
class VQAData:
    """One split of a VQA dataset.

    images: uint8 [Ni, R, R, 3]; image_ids: int64 [Ni]. Per question [Nq]: questions,
    question_image (int32 row in images), question_ids, question_types, answer_types,
    answers (normalised multiple_choice_answer), human_answers (the annotators' answers),
    label (int32 index of ``answers`` in ``vocab``, -1 when outside it) and scores (float32
    [Nq, A], :func:`answer_scores`). Without annotations (test-dev) the answer fields are empty.
    """

    images: np.ndarray
    image_ids: np.ndarray
    questions: tuple[str, ...]
    question_image: np.ndarray
    question_ids: np.ndarray
    question_types: tuple[str, ...]
    answer_types: tuple[str, ...]
    answers: tuple[str, ...]
    human_answers: tuple[tuple[str, ...], ...]
    vocab: tuple[str, ...]
    label: np.ndarray
    scores: np.ndarray
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_questions(self) -> int:
        return len(self.questions)

    def image_batch(self, indices) -> np.ndarray:
        """float32 [B, R, R, 3] in [-1, 1] of the images at ``indices`` (rows of ``images``)."""
        return to_model_range(self.images[np.asarray(indices, dtype=np.int64)])

    def accuracy(self, predicted: np.ndarray) -> dict[str, float]:
        """VQA accuracy of predicted vocabulary indices int [Nq] (-1: no answer, scores 0): "overall"
        and one entry per question type ("type/<question_type>") and answer type
        ("answer_type/<answer_type>")."""
        predicted = np.asarray(predicted, dtype=np.int64)
        if predicted.shape != (self.num_questions,):
            raise ValueError(f"predicted must be [{self.num_questions}], got {predicted.shape}")
        acc = np.where(predicted >= 0, self.scores[np.arange(self.num_questions), np.maximum(predicted, 0)], 0.0)
        out = {"overall": float(acc.mean()) if len(acc) else 0.0}
        for prefix, groups in (("type", self.question_types), ("answer_type", self.answer_types)):
            groups = np.asarray(groups, dtype=object).astype(str)
            for g in sorted(set(groups)):
                out[f"{prefix}/{g}"] = float(acc[groups == g].mean())
        return out


def coco_image_path(image_root: str, image_split: str, image_id: int) -> str:
    """``image_root/COCO_<image_split>_<12-digit id>.jpg``."""
    return os.path.join(image_root, f"COCO_{image_split}_{int(image_id):012d}.jpg")


def vqa_v2(questions_file: str | os.PathLike, image_root: str | os.PathLike,
           annotations_file: str | os.PathLike | None = None, *,
           vocab: str | os.PathLike | Sequence[str] | None = None, top_k: int | None = None,
           image_split: str | None = None, resolution: int = 224,
           num_questions: int | None = None, seed: int = 0) -> VQAData:
    """VQA v2 questions (+ annotations) with their COCO images.

    vocab: a list of answers, or a .json list / text file of them; None builds the ``top_k``
    (default 3129, the usual VQA v2 size) most frequent answers of these annotations. A given
    vocabulary must be duplicate-free, normalised, match some of the answers and, if ``top_k`` is
    also given, have ``top_k`` answers. num_questions: a random subset (``seed``).
    Raises a one-line ValueError on missing files, malformed JSON, questions without an
    annotation, missing images, an empty question set, or a vocabulary mismatch.
    """
    questions_file, image_root = os.fspath(questions_file), os.fspath(image_root)
    qdata = _read_json(questions_file, "VQA questions file")
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        raise ValueError(f"VQA questions file {questions_file} has no 'questions' list")
    try:
        qs = [(int(q["question_id"]), int(q["image_id"]), str(q["question"]))
              for q in qdata["questions"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"VQA questions file {questions_file}: a question lacks {e} (needs "
                         "image_id, question, question_id)") from None
    if not qs:
        raise ValueError(f"VQA questions file {questions_file} has no questions")
    image_split = image_split or qdata.get("data_subtype")
    if not image_split:
        raise ValueError(f"VQA questions file {questions_file} has no data_subtype; pass "
                         "image_split (e.g. 'val2014') to name its images")
    if not os.path.isdir(image_root):
        raise ValueError(f"image folder not found: {image_root}")
    rows = np.arange(len(qs))
    if num_questions is not None and num_questions < len(qs):
        if num_questions < 1:
            raise ValueError(f"num_questions must be positive, got {num_questions}")
        rows = np.sort(np.random.default_rng(seed).choice(len(qs), num_questions, replace=False))
    qs = [qs[i] for i in rows]

    ann = {}
    if annotations_file is not None:
        annotations_file = os.fspath(annotations_file)
        adata = _read_json(annotations_file, "VQA annotations file")
        if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
            raise ValueError(f"VQA annotations file {annotations_file} has no 'annotations' list")
        try:
            for a in adata["annotations"]:
                ann[int(a["question_id"])] = (
                    str(a["question_type"]), str(a["answer_type"]),
                    normalize_answer(a["multiple_choice_answer"]),
                    tuple(str(x["answer"]) for x in a["answers"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"VQA annotations file {annotations_file}: an annotation lacks {e} "
                             "(needs question_id, question_type, answer_type, "
                             "multiple_choice_answer, answers[*].answer)") from None
        lost = [qid for qid, _, _ in qs if qid not in ann]
        if lost:
            raise ValueError(f"{len(lost)} questions of {questions_file} have no annotation in "
                             f"{annotations_file} (first question_id {lost[0]})")

    image_ids = sorted({iid for _, iid, _ in qs})
    paths = [coco_image_path(image_root, image_split, i) for i in image_ids]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        n_q = sum(1 for _, iid, _ in qs
                  if not os.path.isfile(coco_image_path(image_root, image_split, iid)))
        raise ValueError(f"{n_q} questions have no image file ({len(missing)} images missing "
                         f"under {image_root}, first {missing[0]})")
    row = {iid: r for r, iid in enumerate(image_ids)}

    answers = tuple(ann[qid][2] for qid, _, _ in qs) if ann else ()
    humans = tuple(ann[qid][3] for qid, _, _ in qs) if ann else ()
    if vocab is None:
        if not ann:
            raise ValueError("an answer vocabulary (vocab=) is needed without annotations_file")
        k = 3129 if top_k is None else top_k
        vocab_t, where = answer_vocabulary(answers, k), f"(top {k} answers)"
    else:
        vocab_t, where = _read_vocab(vocab)
        if top_k is not None and top_k != len(vocab_t):
            raise ValueError(f"answer vocabulary {where} has {len(vocab_t)} answers but "
                             f"top_k={top_k}")
    check_vocabulary(vocab_t, answers, where)
    index = {a: i for i, a in enumerate(vocab_t)}
    return VQAData(
        images=_load_images(paths, resolution), image_ids=np.asarray(image_ids, np.int64),
        questions=tuple(q for _, _, q in qs),
        question_image=np.asarray([row[iid] for _, iid, _ in qs], np.int32),
        question_ids=np.asarray([qid for qid, _, _ in qs], np.int64),
        question_types=tuple(ann[qid][0] for qid, _, _ in qs) if ann else (),
        answer_types=tuple(ann[qid][1] for qid, _, _ in qs) if ann else (),
        answers=answers, human_answers=humans, vocab=vocab_t,
        label=np.asarray([index.get(a, -1) for a in answers], np.int32),
        scores=answer_scores(humans, vocab_t),
        info={"source": "vqa_v2", "questions_file": questions_file,
              "annotations_file": annotations_file, "image_root": image_root,
              "image_split": image_split, "resolution": resolution})
