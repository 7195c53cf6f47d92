"""Retrieval and VQA toys over the shapes world (embedded, no downloads).

Both draw their images from :func:`jaxcf.data.shapes.shapes_dataset`, so the splits carry the
world's background shortcut: "train" is the few-shot set (``shots`` per base shape, a fraction
``bias`` on the shape's assigned background), "test" all shapes on uniform backgrounds,
"test_base" / "test_novel" the halves, "test_conflict" base shapes on another base shape's
background (bias-conflicting).

- Retrieval: one caption per image and style ("plain": "a red star on a blue background";
  "layout": "a small red star at the top left on a blue background"), as a :class:`CaptionData`.
- VQA: one question per image and question type (shape, object colour, background colour, size,
  position), answers from the world's names, as a :class:`VQAData`. Each question asks about a
  factor, so its ground-truth counterfactual re-renders the image with that factor changed
  (:func:`question_counterfactuals`) and has a new, known answer.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from jaxcf.data.captions import CaptionData
from jaxcf.data.shapes import (COLOR_NAMES, SHAPE_NAMES, captions, render_shapes,
                               shapes_dataset, size_range)
from jaxcf.data.vqa import VQAData, answer_scores

TASK_SPLITS = {"train": "fewshot", "test": "test_all", "test_base": "test_base",
               "test_novel": "test_novel", "test_conflict": "test_conflict"}
CAPTION_STYLES = ("plain", "layout")
QUESTION_TYPES = ("shape", "color", "background", "size", "position")
QUESTIONS = {"shape": "what shape is it?", "color": "what color is the shape?",
             "background": "what color is the background?", "size": "how big is the shape?",
             "position": "where is the shape?"}
# Columns of the factors (FACTOR_NAMES order) each question type asks about: the columns its
# counterfactual may change (a size change keeps the object's centre, so moves the top-left x, y).
QUESTION_FACTORS = {"shape": (0,), "color": (1,), "background": (2,), "size": (3, 4, 5),
                    "position": (4, 5)}
SIZE_NAMES = ("small", "large")
POSITION_NAMES = ("top left", "top", "top right", "left", "center", "right", "bottom left",
                  "bottom", "bottom right")
# Question-answer statements in the toy CLIP's vocabulary (its word tokenizer knows no question
# words), one per question type: the text a (question, candidate answer) prompt scores, as CPL
# turns a question and an answer into a statement.
STATEMENTS = {"shape": "a photo of a {answer}", "color": "a photo of a {answer}",
              "background": "on a {answer} background", "size": "a {answer} photo",
              "position": "at the {answer}"}
CANDIDATES = {"shape": SHAPE_NAMES, "color": COLOR_NAMES, "background": COLOR_NAMES,
              "size": SIZE_NAMES, "position": POSITION_NAMES}
ANSWERS = tuple(dict.fromkeys(SHAPE_NAMES + COLOR_NAMES + SIZE_NAMES + POSITION_NAMES))
_ANSWER_INDEX = {a: i for i, a in enumerate(ANSWERS)}
_HUMANS = 10  # the toy's "annotators" all agree: VQA accuracy 1 for the answer, 0 otherwise


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: "
                         f"{', '.join(map(repr, allowed))}")


def _world(split: str, shots: int, bias: float, num_per_class: int, resolution: int,
           object_size, seed: int):
    _check("split", split, tuple(TASK_SPLITS))
    kwargs = {} if object_size is None else {"object_size": tuple(object_size)}
    return shapes_dataset(TASK_SPLITS[split], shots=shots, bias=bias,
                          num_per_class=num_per_class, resolution=resolution, seed=seed, **kwargs)


def _world_info(ds, split: str) -> dict:
    a = ds.arrays
    return {"source": "shapes", "split": split, "factors": a["factors"], "label": a["label"],
            "aligned": a["aligned"], "class_names": ds.class_names,
            "resolution": ds.info["resolution"]}


# ----------------------------------------------------------------------------- retrieval


def shapes_retrieval(split: str = "train", *, shots: int = 16, bias: float = 0.9,
                     num_per_class: int = 20, resolution: int = 32,
                     caption_styles: Sequence[str] = ("plain",),
                     object_size: tuple[int, int] | None = None, seed: int = 0) -> CaptionData:
    """The retrieval toy: images of a shapes split and ``len(caption_styles)`` captions each
    (captions are grouped by style: caption t of style s is row s * Ni + i). Captions repeat
    across images (same shape and colours), so score it with ``relevance("text")``.
    info: factors int32 [Ni, 6], label (class index within info["class_names"]), aligned."""
    styles = tuple(caption_styles)
    if not styles:
        raise ValueError("caption_styles is empty; allowed: 'plain', 'layout'")
    for s in styles:
        _check("caption_styles entry", s, CAPTION_STYLES)
    ds = _world(split, shots, bias, num_per_class, resolution, object_size, seed)
    f = ds.arrays["factors"]
    texts = [t for s in styles for t in captions(f, resolution=resolution, layout=s == "layout")]
    info = _world_info(ds, split) | {"caption_styles": styles}
    return CaptionData(images=ds.arrays["image"], image_ids=np.arange(len(f), dtype=np.int64),
                       captions=tuple(texts),
                       caption_image=np.tile(np.arange(len(f), dtype=np.int32), len(styles)),
                       info=info)


# ----------------------------------------------------------------------------- VQA


def size_answer(size: int, resolution: int = 32) -> str:
    """"small" / "large": the size word of the layout captions."""
    lo, hi = size_range(resolution)
    return SIZE_NAMES[0] if size <= (lo + hi) / 2 else SIZE_NAMES[1]


def position_answer(x: int, y: int, size: int, resolution: int = 32) -> str:
    """One of POSITION_NAMES from the object's centre (the layout captions' thirds rule)."""
    cx, cy = (x + size / 2) / resolution, (y + size / 2) / resolution
    col = "left" if cx < 0.4 else "right" if cx > 0.6 else ""
    row = "top" if cy < 0.4 else "bottom" if cy > 0.6 else ""
    return " ".join(w for w in (row, col) if w) or "center"


def answer_of(factors: np.ndarray, question_type: str, resolution: int = 32) -> str:
    """The ground-truth answer for one image's factors int [6]."""
    shape, color, bg, size, x, y = (int(v) for v in factors)
    return {"shape": lambda: SHAPE_NAMES[shape], "color": lambda: COLOR_NAMES[color],
            "background": lambda: COLOR_NAMES[bg], "size": lambda: size_answer(size, resolution),
            "position": lambda: position_answer(x, y, size, resolution)}[question_type]()


def type_answer_mask(question_types: Sequence[str] = QUESTION_TYPES) -> np.ndarray:
    """bool [T, A]: which answers of ANSWERS can answer each question type (for restricting the
    scored candidates per question)."""
    mask = np.zeros((len(question_types), len(ANSWERS)), bool)
    for t, q in enumerate(question_types):
        mask[t, [_ANSWER_INDEX[a] for a in CANDIDATES[q]]] = True
    return mask


def shapes_vqa(split: str = "train", *, question_types: Sequence[str] = QUESTION_TYPES,
               shots: int = 16, bias: float = 0.9, num_per_class: int = 20,
               resolution: int = 32, object_size: tuple[int, int] | None = None,
               seed: int = 0) -> VQAData:
    """The VQA toy: every image of a shapes split asked one question of each type (question
    q * T + k is image q, type question_types[k]). vocab = ANSWERS; question_types holds the type
    name, which is also the asked factor (QUESTION_FACTORS). info: factors int32 [Ni, 6],
    label / aligned per image, type_answer_mask bool [T, A] (question_types order)."""
    types = tuple(question_types)
    if not types:
        raise ValueError(f"question_types is empty; allowed: {', '.join(QUESTION_TYPES)}")
    for q in types:
        _check("question_types entry", q, QUESTION_TYPES)
    ds = _world(split, shots, bias, num_per_class, resolution, object_size, seed)
    f = ds.arrays["factors"]
    n, t = len(f), len(types)
    q_image = np.repeat(np.arange(n, dtype=np.int32), t)
    q_type = tuple(types) * n
    answers = tuple(answer_of(f[i], q, resolution) for i, q in zip(q_image, q_type))
    humans = tuple((a,) * _HUMANS for a in answers)
    info = _world_info(ds, split) | {"type_answer_mask": type_answer_mask(types),
                                     "question_type_names": types}
    return VQAData(
        images=ds.arrays["image"], image_ids=np.arange(n, dtype=np.int64),
        questions=tuple(QUESTIONS[q] for q in q_type), question_image=q_image,
        question_ids=np.arange(n * t, dtype=np.int64), question_types=q_type,
        answer_types=("other",) * (n * t), answers=answers, human_answers=humans,
        vocab=ANSWERS, label=np.asarray([_ANSWER_INDEX[a] for a in answers], np.int32),
        scores=answer_scores(humans, ANSWERS), info=info)


@functools.lru_cache(maxsize=None)
def _positions_by_word(size: int, resolution: int) -> dict[str, tuple[tuple[int, int], ...]]:
    """Top-left corners (x, y) of an object of side ``size``, grouped by position word."""
    by_word: dict[str, list] = {}
    for u in range(resolution - size + 1):
        for v in range(resolution - size + 1):
            by_word.setdefault(position_answer(u, v, size, resolution), []).append((u, v))
    return {w: tuple(c) for w, c in by_word.items()}


def _counterfactual_factors(f: np.ndarray, q: str, rng: np.random.Generator,
                            resolution: int) -> np.ndarray | None:
    """Factors int [6] with the factor ``q`` asks about changed so that its answer changes and
    every other question type's answer stays; None when no such change exists."""
    shape, color, bg, size, x, y = (int(v) for v in f)
    out = np.array(f, np.int32, copy=True)
    if q == "shape":
        out[0] = rng.choice([s for s in range(len(SHAPE_NAMES)) if s != shape])
    elif q == "color":
        out[1] = rng.choice([c for c in range(len(COLOR_NAMES)) if c not in (color, bg)])
    elif q == "background":
        out[2] = rng.choice([c for c in range(len(COLOR_NAMES)) if c not in (color, bg)])
    elif q == "size":  # the other size word, resized about the centre, position word kept
        lo, hi = size_range(resolution)
        where = position_answer(x, y, size, resolution)
        options = []
        for s in range(lo, hi + 1):
            u, v = (int(np.floor(c + (size - s) / 2 + 0.5)) for c in (x, y))
            if (size_answer(s, resolution) != size_answer(size, resolution)
                    and min(u, v) >= 0 and max(u, v) + s <= resolution
                    and position_answer(u, v, s, resolution) == where):
                options.append((s, u, v))
        if not options:
            return None
        out[3], out[4], out[5] = options[rng.integers(len(options))]
    elif q == "position":  # same size; uniform over the other position words, then within one
        where = position_answer(x, y, size, resolution)
        by_word = _positions_by_word(size, resolution)
        words = sorted(w for w in by_word if w != where)
        if not words:
            return None
        cells = by_word[words[rng.integers(len(words))]]
        out[4], out[5] = cells[rng.integers(len(cells))]
    else:
        _check("question type", q, QUESTION_TYPES)
    return out


def question_counterfactuals(factors: np.ndarray, question_types: Sequence[str] | str, *,
                             resolution: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """Ground-truth counterfactuals of questions: re-render each image with the asked factor
    changed (the answer changes; the other question types' answers do not).

    factors: int [N, 6], one row per question (``data.info["factors"][data.question_image]``);
    question_types: [N] type names (or one for all). Shape, colours: another value drawn with
    ``seed`` (the object colour stays off the background); size: a size of the other size word,
    resized about the object's centre (x, y follow), keeping the position word; position: another
    position word, same size.
    Returns image uint8 [N, R, R, 3] (= render_shapes(factors)), factors int32 [N, 6],
    answer str [N], label int32 [N] (index in ANSWERS) and valid bool [N] (False where no such
    change exists, e.g. a larger object that would not fit the image at its centre; the row then
    repeats the factual image and answer).
    """
    f = np.asarray(factors, dtype=np.int32)
    if f.ndim != 2 or f.shape[1] != 6:
        raise ValueError(f"factors must be [N, 6], got shape {f.shape}")
    types = [question_types] * len(f) if isinstance(question_types, str) else list(question_types)
    if len(types) != len(f):
        raise ValueError(f"question_types has {len(types)} entries for {len(f)} factor rows")
    rng = np.random.default_rng(seed)
    out, valid = f.copy(), np.ones((len(f),), bool)
    for i, q in enumerate(types):
        cf = _counterfactual_factors(f[i], q, rng, resolution)
        if cf is None:
            valid[i] = False
        else:
            out[i] = cf
    images, _ = render_shapes(out, resolution=resolution)
    answers = np.array([answer_of(out[i], q, resolution) for i, q in enumerate(types)])
    return {"image": images, "factors": out, "answer": answers,
            "label": np.asarray([_ANSWER_INDEX[a] for a in answers], np.int32), "valid": valid}

