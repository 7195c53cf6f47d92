"""The data of DiCap's retrieval and VQA pipelines: few-shot training sets, test sets and the
classes the counterfactual generator guides toward, from the shapes-world toys
(:mod:`jaxcf.data.shapes_tasks`) or the real formats (Karpathy JSON / tfds coco_captions,
VQA v2 JSON).

The generator changes what its anti-causal predictor knows: in the shapes world the toy
noise-aware classifier knows shapes, so the shape is changed (a caption's shape word, the
answer to "what shape is it?"); on real data CLIP zero-shot on x0_hat is guided toward the
nearest other caption (retrieval) or answer (VQA). Loader errors become one-line ConfigErrors
naming the config field.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from jaxcf import configs as cfgs
from jaxcf.data.captions import CaptionData
from jaxcf.data.common import to_model_range
from jaxcf.data.shapes import SHAPE_NAMES, render_shapes, with_shape
from jaxcf.data.vqa import VQAData


@dataclasses.dataclass
class RetrievalShots:
    """Few-shot retrieval training data.

    images float32 [Ni, R, R, 3] in [-1, 1]; texts: the distinct training captions [C];
    pair_image / pair_text int32 [Np]: the (image, caption) training pairs; cf_label int32 [Ni]:
    each image's class among cf_class_names (what the generator changes); factors int32 [Ni, 6]
    (shapes world) or None.
    """

    images: np.ndarray
    texts: tuple[str, ...]
    pair_image: np.ndarray
    pair_text: np.ndarray
    cf_label: np.ndarray
    cf_class_names: tuple[str, ...]
    captions: tuple[str, ...]  # one caption per image (for the example sheet)
    factors: Optional[np.ndarray] = None


@dataclasses.dataclass
class VQAShots:
    """Few-shot VQA training data.

    images float32 [Ni, R, R, 3]; per question [Nq]: q_image (row in images), q_type (index in
    the source's type_names), answer (vocabulary index), question (text); cf_image int32 [Nc] (rows
    of images to generate counterfactuals of) with cf_label [Nc] among cf_class_names; q_cf int32
    [Nq]: the counterfactual row whose change answers the question differently, -1 where the
    generator cannot change the asked factor; factors int32 [Ni, 6] or None.
    """

    images: np.ndarray
    q_image: np.ndarray
    q_type: np.ndarray
    answer: np.ndarray
    questions: tuple[str, ...]
    cf_image: np.ndarray
    cf_label: np.ndarray
    cf_class_names: tuple[str, ...]
    q_cf: np.ndarray
    factors: Optional[np.ndarray] = None


def _text_index(texts):
    """(distinct texts in first-seen order, index of each text)."""
    distinct = tuple(dict.fromkeys(texts))
    pos = {t: i for i, t in enumerate(distinct)}
    return distinct, np.asarray([pos[t] for t in texts], np.int32)


def _config_error(field: str, e: Exception) -> cfgs.ConfigError:
    return cfgs.ConfigError(f"config.{field}: {' '.join(str(e).split())}")


# ----------------------------------------------------------------------------- retrieval


class ShapesRetrievalSource:
    """The shapes-world retrieval toy: few-shot images with their captions (the background
    shortcut in a fraction ``data.bias``), held-out (all shapes, uniform backgrounds) and
    bias-conflicting tests. The generator changes the shape (a caption's shape word)."""

    has_renderer = True

    def __init__(self, config):
        self.d = config.data

    def _kw(self):
        d = self.d
        return dict(resolution=d.resolution, object_size=tuple(d.object_size) or None, caption_styles=("plain",))

    def fewshot(self, seed: int) -> RetrievalShots:
        from jaxcf.data.shapes_tasks import shapes_retrieval

        data = shapes_retrieval("train", shots=self.d.shots, bias=self.d.bias, seed=seed, **self._kw())
        texts, pair_text = _text_index(data.captions)
        return RetrievalShots(to_model_range(data.images), texts, data.caption_image.astype(np.int32), pair_text,
                              data.info["label"].astype(np.int32), tuple(data.info["class_names"]),
                              tuple(data.captions), data.info["factors"])

    def tests(self) -> dict[str, CaptionData]:
        from jaxcf.data.shapes_tasks import shapes_retrieval

        return {name: shapes_retrieval(split, num_per_class=self.d.test_per_class, seed=7, **self._kw())
                for name, split in (("heldout", "test"), ("conflict", "test_conflict"))}

    def ground_truth(self, shots: RetrievalShots, y_cf: np.ndarray):
        """The few-shot images re-rendered with the shape the generator aimed at: float32 [Ni, ...]."""
        shape = np.asarray([SHAPE_NAMES.index(shots.cf_class_names[i]) for i in y_cf], np.int32)
        x, _ = render_shapes(with_shape(shots.factors, shape), resolution=self.d.resolution)
        return to_model_range(x), np.ones(len(x), bool)


class CaptionFilesSource:
    """COCO / Flickr30k captions: a Karpathy split JSON + image folder (``data.name="karpathy"``)
    or tfds ``coco_captions`` (``"tfds:coco_captions"``). ``data.shots`` training images of
    ``data.train_split`` with all their captions; the test split (``data.test_images`` of them,
    0 = all) is the held-out set. The generator guides each image toward the text-nearest other
    first caption of the few-shot set (CLIP zero-shot on x0_hat)."""

    has_renderer = False

    def __init__(self, config):
        self.d = config.data

    def _load(self, split: str, num_images, seed: int) -> CaptionData:
        from jaxcf.data.captions import karpathy_captions, tfds_coco_captions

        d = self.d
        try:
            if d.name == "karpathy":
                return karpathy_captions(d.split_file, d.image_root, split, resolution=d.resolution,
                                         num_images=num_images, seed=seed)
            return tfds_coco_captions(split, data_dir=d.data_dir or None, resolution=d.resolution,
                                      num_images=num_images, seed=seed)
        except (ValueError, ImportError) as e:
            raise _config_error("data (split_file / image_root / data_dir)", e) from e

    def fewshot(self, seed: int) -> RetrievalShots:
        data = self._load(self.d.train_split, self.d.shots, seed)
        texts, pair_text = _text_index(data.captions)
        first = np.unique(data.caption_image, return_index=True)[1]
        names = tuple(data.captions[i] for i in first)  # one caption per image: the generator's classes
        return RetrievalShots(to_model_range(data.images), texts, data.caption_image.astype(np.int32), pair_text,
                              np.arange(data.num_images, dtype=np.int32), names, names)

    def tests(self) -> dict[str, CaptionData]:
        return {"heldout": self._load(self.d.test_split, self.d.test_images or None, 7)}

    def ground_truth(self, shots, y_cf):
        return None


def retrieval_source(config):
    """The source named by ``config.data.name``: "shapes", "karpathy" or "tfds:coco_captions"."""
    return ShapesRetrievalSource(config) if config.data.name == "shapes" else CaptionFilesSource(config)


# ----------------------------------------------------------------------------- VQA


class ShapesVQASource:
    """The shapes-world VQA toy: every few-shot image asked one question per type (shape, object
    colour, background colour, size, position) with the toy's statements; held-out and
    bias-conflicting tests. The generator changes the shape, so the shape questions get
    generated counterfactuals; the ground truth changes every asked factor."""

    has_renderer = True

    def __init__(self, config):
        from jaxcf.data.shapes_tasks import ANSWERS, QUESTION_TYPES, STATEMENTS, type_answer_mask

        self.d = config.data
        self.type_names = tuple(self.d.question_types) or QUESTION_TYPES
        self.vocab = ANSWERS
        pair_type, pair_answer = np.nonzero(type_answer_mask(self.type_names))
        self.pair_type, self.pair_answer = pair_type.astype(np.int32), pair_answer.astype(np.int32)
        self.statements = tuple(STATEMENTS[self.type_names[t]].format(answer=ANSWERS[a])
                                for t, a in zip(self.pair_type, self.pair_answer))

    def _get(self, split: str, seed: int, **kw) -> VQAData:
        from jaxcf.data.shapes_tasks import shapes_vqa

        return shapes_vqa(split, question_types=self.type_names, resolution=self.d.resolution,
                          object_size=tuple(self.d.object_size) or None, seed=seed, **kw)

    def question_type_index(self, data: VQAData) -> np.ndarray:
        pos = {t: i for i, t in enumerate(self.type_names)}
        return np.asarray([pos[t] for t in data.question_types], np.int32)

    def fewshot(self, seed: int) -> VQAShots:
        data = self._get("train", seed, shots=self.d.shots, bias=self.d.bias)
        q_type = self.question_type_index(data)
        n = len(data.images)
        is_shape = np.asarray([t == "shape" for t in data.question_types])
        return VQAShots(to_model_range(data.images), data.question_image, q_type, data.label, data.questions,
                        np.arange(n, dtype=np.int32), data.info["label"].astype(np.int32),
                        tuple(data.info["class_names"]), np.where(is_shape, data.question_image, -1).astype(np.int32),
                        data.info["factors"])

    def tests(self) -> dict[str, VQAData]:
        return {name: self._get(split, 7, num_per_class=self.d.test_per_class)
                for name, split in (("heldout", "test"), ("conflict", "test_conflict"))}

    def ground_truth(self, shots: VQAShots, seed: int, y_cf: np.ndarray):
        """Per question: the image re-rendered with the asked factor changed (float32 [Nq, ...]),
        its answer's vocabulary index int32 [Nq] and valid bool [Nq]. A shape question gets the
        shape the generator aimed at (``y_cf`` [Nc], per counterfactual row), so that its row
        differs from the generated one only in how well the generator reached it; the other
        types get another value drawn by :func:`question_counterfactuals`."""
        from jaxcf.data.shapes_tasks import ANSWERS, question_counterfactuals

        gt = question_counterfactuals(shots.factors[shots.q_image], [self.type_names[t] for t in shots.q_type],
                                      resolution=self.d.resolution, seed=seed)
        images, labels, valid = gt["image"], gt["label"].copy(), gt["valid"].copy()
        q = np.flatnonzero(shots.q_cf >= 0)  # the questions the generator answers differently (shape)
        shape = np.asarray([SHAPE_NAMES.index(shots.cf_class_names[i]) for i in y_cf[shots.q_cf[q]]], np.int32)
        images[q], _ = render_shapes(with_shape(shots.factors[shots.q_image[q]], shape), resolution=self.d.resolution)
        labels[q] = [ANSWERS.index(SHAPE_NAMES[i]) for i in shape]
        valid[q] = True
        return to_model_range(images), labels, valid


class VQAv2Source:
    """VQA v2 question / annotation JSON + COCO image folders (``data.name="vqa_v2"``).

    Prompts are keyed by the annotations' question_type ("what color is the", ...): the statement
    of (type, answer) is ``config.prompt.statement`` with {question} = the type text; a type's
    candidates are the answers its few-shot questions have (test questions of a type not seen
    in training have no candidate and count as wrong). Counterfactuals: one per training
    question, guided toward the text-nearest other vocabulary answer.
    """

    has_renderer = False

    def __init__(self, config):
        self.d = config.data
        self.statement = config.prompt.statement
        self._train = self._load("train", self.d.shots or None, config.seeds[0])
        self.vocab = self._train.vocab
        types = sorted(set(self._train.question_types))
        self.type_names = tuple(types)
        pairs = sorted({(types.index(t), int(a)) for t, a in zip(self._train.question_types, self._train.label)
                        if a >= 0})
        self.pair_type = np.asarray([p[0] for p in pairs], np.int32)
        self.pair_answer = np.asarray([p[1] for p in pairs], np.int32)
        self.statements = tuple(self.statement.format(question=self.type_names[t], answer=self.vocab[a])
                                for t, a in pairs)

    def _load(self, which: str, num_questions, seed: int, vocab=None) -> VQAData:
        from jaxcf.data.vqa import vqa_v2

        d = self.d
        files = dict(questions=d[f"{which}_questions"], annotations=d[f"{which}_annotations"], images=d[f"{which}_images"])
        try:
            return vqa_v2(files["questions"], files["images"], files["annotations"] or None,
                          vocab=vocab or d.vocab or None, top_k=d.top_k or None, resolution=d.resolution,
                          num_questions=num_questions, seed=seed)
        except ValueError as e:
            raise _config_error(f"data.{which}_questions / {which}_annotations / {which}_images / vocab", e) from e

    def question_type_index(self, data: VQAData) -> np.ndarray:
        pos = {t: i for i, t in enumerate(self.type_names)}
        return np.asarray([pos.get(t, -1) for t in data.question_types], np.int32)

    def fewshot(self, seed: int) -> VQAShots:
        data = self._load("train", self.d.shots or None, seed, vocab=self.vocab)
        keep = (data.label >= 0) & (self.question_type_index(data) >= 0)
        q = np.flatnonzero(keep)
        return VQAShots(to_model_range(data.images), data.question_image[q], self.question_type_index(data)[q],
                        data.label[q], tuple(data.questions[i] for i in q), data.question_image[q],
                        data.label[q], self.vocab, np.arange(len(q), dtype=np.int32))

    def tests(self) -> dict[str, VQAData]:
        return {"heldout": self._load("test", self.d.test_questions_max or None, 7, vocab=self.vocab)}

    def ground_truth(self, shots, seed, y_cf):
        return None


def vqa_source(config):
    """The source named by ``config.data.name``: "shapes" or "vqa_v2"."""
    return ShapesVQASource(config) if config.data.name == "shapes" else VQAv2Source(config)
