"""DiCap's estimation stage for retrieval and VQA: CoOp-style context vectors in front of free
texts (captions, question-answer statements) instead of class names, trained through
:func:`jaxcf.train.fit.fit` on frozen CLIP image features with the task's loss
(:mod:`jaxcf.dicap.retrieval`) plus lambda x the counterfactual hard-negative term.

A prompt is ``[SOS][ctx_1..ctx_M][tokens of the text][.][EOS]`` (:func:`build_prompt_tokens` with
the text in the place of a class name); the context is shared by every text (``unified``).
Retrieval batches carry the indices of their captions, so a step encodes only the batch's
texts; VQA steps encode every candidate statement (the (question type, answer) pairs).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np
import optax

from jaxcf.dicap.estimation import PromptSetup
from jaxcf.dicap.prompts import init_prompt_params, prompt_text_features
from jaxcf.dicap.retrieval import retrieval_contrastive_loss, retrieval_recall, vqa_answer_loss, vqa_predict
from jaxcf.foundation import Foundation
from jaxcf.train import stream_indices, warmup_cosine
from jaxcf.train.batched import batched
from jaxcf.train.fit import fit
from jaxcf.utils import io

TEXT_BATCH = 256  # texts encoded per call at evaluation
CF_FILTERS = ("none", "clip_flip")


def prompt_optimizer(tc) -> optax.GradientTransformation:
    """``config.train``'s optimiser ("sgd" with momentum 0.9 or "adamw") on a warmup-cosine schedule."""
    lr = warmup_cosine(tc.learning_rate, tc.warmup_steps, tc.steps)
    return optax.sgd(lr, momentum=0.9) if tc.optimizer == "sgd" else optax.adamw(lr, weight_decay=tc.weight_decay)


def prompted_features(clip, clip_params, prompt_params, base_embeds, tmpl, rows=None):
    """Features [N, P] of the prompted texts ``rows`` int [N] (all when None); base_embeds
    [C, L, D] are the frozen word embeddings of the texts' prompts (:class:`PromptSetup`)."""
    if rows is not None:
        base_embeds = base_embeds[rows]
        tmpl = dataclasses.replace(tmpl, eot_index=jnp.asarray(tmpl.eot_index)[rows])
    return prompt_text_features(clip, clip_params, prompt_params, base_embeds, tmpl)


def bucketed(texts: Sequence[str], multiple: int = 64) -> tuple[str, ...]:
    """``texts`` padded (repeating the last) to a multiple of ``multiple``: the training step's
    frozen text embeddings then have the same shape for every seed's few-shot captions, so one
    compiled step (cached on disk) serves them all. The padding rows are never indexed."""
    texts = tuple(texts)
    return texts + texts[-1:] * (-len(texts) % multiple)


def initial_prompt(found: Foundation, config, rng) -> dict:
    """The context before training: the embedding of ``config.prompt.init_text`` (or random)."""
    return init_prompt_params(rng, found.clip, found.clip_params, found.tokenizer, 1, config.prompt.n_ctx,
                              config.prompt.init_text or None, "unified")


def final_metrics(run_dir: str) -> dict:
    """The last logged training metrics of a :func:`fit_text_prompts` run ({} when none)."""
    path = io.join(run_dir, "metrics.jsonl")
    lines = io.read_text(path).strip().splitlines() if io.exists(path) else []
    return {k: v for k, v in json.loads(lines[-1]).items() if k not in ("step", "time")} if lines else {}


def fit_text_prompts(found: Foundation, setup: PromptSetup, task_loss: Callable, batch_fn: Callable, config,
                     seed: int, workdir: str, mesh, desc: str):
    """Learns the shared context on precomputed image features; CLIP stays frozen.

    ``task_loss(text_feats_fn, batch, logit_scale) -> (loss, metrics)`` where ``text_feats_fn(rows)``
    gives the prompted features of texts ``rows`` (None = all). Returns the prompt parameters.
    """
    tc = config.train
    scale = found.clip.logit_scale(found.clip_params)

    def loss_fn(pp, batch, rng, frozen):
        # the texts' frozen embeddings and EOS positions come in as arguments, not as constants of
        # the compiled step (which then serves every seed's texts of the same count)
        tmpl = dataclasses.replace(setup.tmpl, eot_index=frozen["eot"])
        return task_loss(lambda rows: prompted_features(found.clip, frozen["clip"], pp, frozen["base"], tmpl, rows),
                         batch, scale)

    frozen = {"clip": found.clip_params, "base": setup.base, "eot": jnp.asarray(setup.tmpl.eot_index)}
    return fit(lambda rng: initial_prompt(found, config, rng), prompt_optimizer(tc), loss_fn, batch_fn,
               steps=tc.steps, batch_size=tc.batch_size,
               workdir=workdir, mesh=mesh, config=config, seed=seed, desc=desc, frozen=frozen,
               batch_field="train.batch_size").params


def text_encoder(found: Foundation, setup: PromptSetup, mesh) -> Callable:
    """``encode(prompt_params) -> [C, P]``: every prompted text of ``setup``, in padded batches
    (compiled once per setup, whatever the prompt parameters)."""
    rows = np.arange(len(setup.tmpl.token_ids), dtype=np.int32)
    fn = batched(lambda params, r: prompted_features(found.clip, params[0], params[1], params[2], setup.tmpl, r),
                 mesh, TEXT_BATCH)
    return lambda prompt_params: fn((found.clip_params, prompt_params, setup.base), rows)


# ----------------------------------------------------------------------------- retrieval


def retrieval_task_loss(lam: float, tau: float) -> Callable:
    """The retrieval objective for :func:`fit_text_prompts`: symmetric InfoNCE over the batch's
    (image, caption) pairs + lambda x L_cf with each pair's counterfactual image as the hard
    negative of its caption.

    batch: f [B, P] image features, text int [B] (caption row), image int [B] (image row: captions
    of one image, or one text shared by images, are positives of each other), and with lam > 0
    f_cf [B, P], valid bool [B].
    """

    def loss(text_feats, batch, scale):
        t = text_feats(batch["text"])  # [B, P]
        match = (batch["text"][:, None] == batch["text"][None]) | (batch["image"][:, None] == batch["image"][None])
        return retrieval_contrastive_loss(batch["f"], t, scale, batch.get("f_cf"), match, lam, tau,
                                          batch.get("valid"))

    return loss


def retrieval_batches(f_img, pair_image, pair_text, f_cf, cf_valid, batch_size: int, seed: int, lam: float):
    """batch_fn(step) over (image, caption) pairs: pair_image / pair_text int [Np]; f_img, f_cf
    [Ni, P] (counterfactual features per image row; used only when lam > 0), cf_valid bool [Ni]."""

    def batch_fn(step):
        idx = stream_indices(len(pair_image), batch_size, step, seed)
        img = pair_image[idx]
        b = {"f": f_img[img], "text": pair_text[idx].astype(np.int32), "image": img.astype(np.int32)}
        if lam > 0:
            b["f_cf"], b["valid"] = f_cf[img], cf_valid[img]
        return b

    return batch_fn


def recall(image_feats, text_feats, relevant, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """{"i2t_R@k", "t2i_R@k"}: python floats of :func:`jaxcf.dicap.retrieval.retrieval_recall`."""
    out = retrieval_recall(jnp.asarray(image_feats), jnp.asarray(text_feats), relevant, ks)
    return {k: float(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- VQA


def vqa_task_loss(lam: float, tau: float, pair_type, pair_answer, num_types: int, num_answers: int) -> Callable:
    """The VQA objective for :func:`fit_text_prompts`: CE over the question type's candidate
    answers + lambda x L_cf with the counterfactual image (its answer changed) as the hard
    negative of the true answer's statement.

    The prompts are the (question type, answer) statements: pair_type / pair_answer int [S].
    batch: f [B, P], qtype int [B], answer int [B] (vocabulary index), and with lam > 0
    f_cf [B, P], valid bool [B].
    """
    pair_type, pair_answer = np.asarray(pair_type), np.asarray(pair_answer)
    mask = np.zeros((num_types, num_answers), bool)
    mask[pair_type, pair_answer] = True

    def loss(text_feats, batch, scale):
        grid = statement_grid(text_feats(None), pair_type, pair_answer, num_types, num_answers)
        q = batch["qtype"]
        return vqa_answer_loss(batch["f"], grid[q], batch["answer"], scale, batch.get("f_cf"),
                               candidate_mask=jnp.asarray(mask)[q], lam=lam, tau=tau, valid=batch.get("valid"))

    return loss


def statement_grid(feats, pair_type, pair_answer, num_types: int, num_answers: int):
    """Statement features [S, P] -> [T, A, P] indexed by (question type, answer); a pair that is
    not a candidate holds ones (a finite direction the candidate mask scores out)."""
    grid = jnp.ones((num_types, num_answers, feats.shape[-1]), feats.dtype)
    return grid.at[jnp.asarray(pair_type), jnp.asarray(pair_answer)].set(feats)


def vqa_batches(f_img, q_image, q_type, q_answer, f_cf, cf_valid, batch_size: int, seed: int, lam: float):
    """batch_fn(step) over questions: q_image / q_type / q_answer int [Nq]; f_img [Ni, P];
    f_cf [Nq, P] and cf_valid bool [Nq] per question (used only when lam > 0)."""

    def batch_fn(step):
        idx = stream_indices(len(q_image), batch_size, step, seed)
        b = {"f": f_img[q_image[idx]], "qtype": q_type[idx].astype(np.int32),
             "answer": q_answer[idx].astype(np.int32)}
        if lam > 0:
            b["f_cf"], b["valid"] = f_cf[idx], cf_valid[idx]
        return b

    return batch_fn


def vqa_predictions(image_feats, statement_feats, q_image, q_type, pair_type, pair_answer, num_types: int,
                    num_answers: int) -> np.ndarray:
    """Predicted answer (vocabulary index) int [Nq] of every question: the best candidate statement
    of its type for its image. image_feats [Ni, P], statement_feats [S, P]."""
    grid = statement_grid(jnp.asarray(statement_feats), pair_type, pair_answer, num_types, num_answers)
    mask = np.zeros((num_types, num_answers), bool)
    mask[np.asarray(pair_type), np.asarray(pair_answer)] = True
    f = jnp.asarray(image_feats)[jnp.asarray(q_image)]
    return np.asarray(vqa_predict(f, grid[jnp.asarray(q_type)], jnp.asarray(mask)[jnp.asarray(q_type)]))


def zero_shot_features(found: Foundation, texts: Sequence[str], template: str, max_len: int) -> np.ndarray:
    """CLIP text features [N, P] of ``template.format(text)`` (no learned context)."""
    from jaxcf.foundation import template_text_features

    out = [np.asarray(template_text_features(found, texts[i:i + TEXT_BATCH], template, max_len))
           for i in range(0, len(texts), TEXT_BATCH)]
    return np.concatenate(out) if out else np.zeros((0, found.clip.config.projection_dim), np.float32)


# ----------------------------------------------------------------------------- counterfactuals


def counterfactual_mask(f_cf, class_feats, y_cf, how: str = "none") -> np.ndarray:
    """bool [N]: which generated counterfactuals serve as hard negatives: all ("none"), or those
    frozen CLIP zero-shot (f_cf [N, P] against class_feats [C, P]) assigns to their target y_cf
    ("clip_flip": a model-based filter that needs no ground truth)."""
    if how == "none":
        return np.ones(len(f_cf), bool)
    from jaxcf.configs import check_value
    from jaxcf.dicap.losses import class_cosines

    check_value("config.train.cf_filter", how, CF_FILTERS)
    pred = np.argmax(np.asarray(class_cosines(jnp.asarray(f_cf), jnp.asarray(class_feats))), axis=1)
    return pred == np.asarray(y_cf)


def counterfactual_quality(f_cf, class_feats, y_cf, x=None, x_cf=None, factors=None, target_shape=None,
                           resolution: int = 32) -> dict[str, float]:
    """How far the generated counterfactuals reached y_cf: zero-shot CLIP flip rate (f_cf [N, P]
    against class_feats [C, P]), the pixel L1 to the factual, and in the shapes world the
    model-free judge's flip rate and kept-shape rate (:func:`jaxcf.data.shapes.judge_shapes`)."""
    from jaxcf.dicap.losses import class_cosines
    from jaxcf.dicap.metrics import argmax_flip_rate

    out = {"cf_flip_rate": argmax_flip_rate(np.asarray(class_cosines(jnp.asarray(f_cf), jnp.asarray(class_feats))),
                                            np.asarray(y_cf))}
    if x is not None:
        out["cf_l1"] = float(np.mean(np.abs(x_cf - x)))
    if factors is not None:
        from jaxcf.data.shapes import judge_shapes

        judge = judge_shapes(x_cf, factors, resolution=resolution)
        out["cf_judge_flip_rate"] = float(np.mean(judge["shape"] == target_shape))
        out["cf_judge_kept_shape"] = float(np.mean(judge["shape"] == factors[:, 0]))
    return out
