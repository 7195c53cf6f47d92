"""DiCap beyond classification: retrieval recall@K, the retrieval contrastive loss with
counterfactual hard negatives, and VQA answer scoring with prompts (CPL-style).

Pure jnp functions. Relevance is a bool matrix ``relevant [Ni, Nt]`` (caption t is correct for
image i), so several captions per image (COCO, Flickr30k) and captions shared by several images
(the shapes toy) are the same case; :meth:`jaxcf.data.captions.CaptionData.relevance` builds it.
The counterfactual term is DiCap's :func:`~jaxcf.dicap.losses.counterfactual_contrastive_loss`
with the pair's caption (or the true answer's prompt) in the place of the class prompt t_y.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from jaxcf.dicap.losses import class_cosines, counterfactual_contrastive_loss

TIES = ("pessimistic", "optimistic")
DEFAULT_VQA_TEMPLATE = "question: {question} answer: {answer}."


# ----------------------------------------------------------------------------- recall@K


def retrieval_ranks(sim, relevant, ties: str = "pessimistic"):
    """Rank of the best relevant candidate for every query, both ways.

    sim: [Ni, Nt] image-text scores; relevant: bool [Ni, Nt]. The rank of a query is the number
    of irrelevant candidates that score above its best relevant one (0 = retrieved first).
    ``ties="pessimistic"`` also counts irrelevant candidates that tie with it (a constant score
    retrieves nothing); "optimistic" does not. A query with no relevant candidate gets the number
    of candidates. Returns (i2t int32 [Ni], t2i int32 [Nt]). Rows (image queries) or columns (text
    queries) may be computed in blocks: each query only reads its own row / column.
    """
    if ties not in TIES:
        raise ValueError(f"ties={ties!r} is not allowed; allowed: {', '.join(map(repr, TIES))}")
    sim = jnp.asarray(sim, jnp.float32)
    relevant = jnp.asarray(relevant, bool)
    beats = jnp.greater_equal if ties == "pessimistic" else jnp.greater

    def ranks(s, r):  # queries along axis 0
        best = jnp.max(jnp.where(r, s, -jnp.inf), axis=1, keepdims=True)
        rank = jnp.sum(~r & beats(s, best), axis=1)
        return jnp.where(jnp.any(r, axis=1), rank, s.shape[1]).astype(jnp.int32)

    return ranks(sim, relevant), ranks(sim.T, relevant.T)


def recall_from_ranks(ranks, ks: Sequence[int] = (1, 5, 10), valid=None) -> dict:
    """{"R@k": fraction of queries with rank < k} over ``valid`` queries (default all)."""
    ranks = jnp.asarray(ranks)
    w = jnp.ones(ranks.shape, jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    return {f"R@{k}": jnp.sum((ranks < k) * w) / n for k in ks}


def retrieval_recall(image_feats, text_feats, relevant, ks: Sequence[int] = (1, 5, 10),
                     ties: str = "pessimistic") -> dict:
    """Image->text and text->image recall@K by cosine similarity.

    image_feats [Ni, P], text_feats [Nt, P], relevant bool [Ni, Nt]. An image query is a hit at K
    when any of its relevant captions is among the top K texts; a caption query when a relevant
    image is among the top K images. Queries without a relevant candidate are left out.
    Returns {"i2t_R@k", "t2i_R@k"} (float32 scalars), the keys of jaxcf.dicap.metrics.recall_at_k.
    """
    relevant = jnp.asarray(relevant, bool)
    sim = class_cosines(image_feats, text_feats)  # [Ni, Nt]
    i2t, t2i = retrieval_ranks(sim, relevant, ties)
    out = {}
    for name, ranks, valid in (("i2t", i2t, jnp.any(relevant, 1)),
                               ("t2i", t2i, jnp.any(relevant, 0))):
        out |= {f"{name}_{k}": v for k, v in recall_from_ranks(ranks, ks, valid).items()}
    return out


# ----------------------------------------------------------------------------- retrieval loss


def _multi_positive_nce(logits, positive):
    """mean over rows of -log(sum_pos e^l / sum_all e^l); logits [B, M], positive bool [B, M]."""
    pos = jax.nn.logsumexp(jnp.where(positive, logits, -jnp.inf), axis=1)
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - pos)


def retrieval_contrastive_loss(image_feats, text_feats, logit_scale, cf_feats=None, match=None,
                               lam: float = 1.0, tau: float = 1.0, valid=None):
    """Symmetric image-text InfoNCE over a batch of pairs + lambda * L_cf; returns (loss, metrics).

    image_feats, text_feats [B, P]: row b is a pair. match: bool [B, B], which captions of the
    batch are correct for which image (default the diagonal; pass ``caption_ids[:, None] ==
    caption_ids[None]`` when texts repeat, so that a copy is not a negative). cf_feats [B, P]:
    the counterfactual of image b (its caption no longer holds) is a hard negative for caption b:
    L_cf = -log(e^{cos(t_b, f(x_b))/tau} / (e^{cos(t_b, f(x_b))/tau} + e^{cos(t_b, f(x_cf_b))/tau}))
    (DiCap's term with the caption as the class prompt); ``valid`` [B] drops rows without one.
    """
    b = image_feats.shape[0]
    match = jnp.eye(b, dtype=bool) if match is None else jnp.asarray(match, bool)
    logits = logit_scale * class_cosines(image_feats, text_feats)  # [B images, B texts]
    i2t = _multi_positive_nce(logits, match)
    t2i = _multi_positive_nce(logits.T, match.T)
    loss = 0.5 * (i2t + t2i)
    metrics = {"nce_i2t": i2t, "nce_t2i": t2i,
               "train_i2t_R@1": jnp.mean(jnp.take_along_axis(
                   match, jnp.argmax(logits, 1)[:, None], 1)[:, 0])}
    if cf_feats is None or lam == 0:
        return loss, metrics
    l_cf = counterfactual_contrastive_loss(image_feats, cf_feats, text_feats,
                                           jnp.arange(b), tau, valid=valid)
    metrics["l_cf"] = l_cf
    return loss + lam * l_cf, metrics


# ----------------------------------------------------------------------------- VQA


def answer_prompt(question: str, answer: str, template: str = DEFAULT_VQA_TEMPLATE) -> str:
    """The text of a (question, candidate answer) prompt; the caller tokenises it."""
    return template.format(question=question.strip(), answer=answer.strip())


def answer_prompts(questions: Sequence[str], candidates: Sequence[str],
                   template: str = DEFAULT_VQA_TEMPLATE) -> list[list[str]]:
    """[Nq][A] prompt texts: every question with every candidate answer."""
    return [[answer_prompt(q, a, template) for a in candidates] for q in questions]


def vqa_scores(image_feats, prompt_feats, candidate_mask=None):
    """cos(f(x_b), prompt_{b,a}) [B, A]: image_feats [B, P], prompt_feats [B, A, P] (per question)
    or [A, P] (shared); candidates outside ``candidate_mask`` bool [B, A] score -inf."""
    s = class_cosines(image_feats, prompt_feats)
    return s if candidate_mask is None else jnp.where(candidate_mask, s, -jnp.inf)


def vqa_predict(image_feats, prompt_feats, candidate_mask=None):
    """int32 [B]: the best-scoring candidate answer."""
    scores = vqa_scores(image_feats, prompt_feats, candidate_mask)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def vqa_answer_loss(image_feats, prompt_feats, answers, logit_scale, cf_feats=None,
                    cf_answers=None, candidate_mask=None, lam: float = 1.0, tau: float = 1.0,
                    valid=None):
    """CE(logit_scale * cos(f(x), prompt_a), answer) + lambda * L_cf; returns (loss, metrics).

    image_feats [B, P]; prompt_feats [B, A, P] or [A, P]; answers int [B]; candidate_mask bool
    [B, A] (e.g. the answers of the question's type). cf_feats [B, P]: the counterfactual image
    whose answer changed, a hard negative for the true answer's prompt (DiCap's L_cf with t_y =
    that prompt). With cf_answers int [B] the term is made symmetric: the counterfactual's own
    answer prompt must also prefer x_cf over x. ``valid`` [B] drops rows without a counterfactual.
    """
    cos = class_cosines(image_feats, prompt_feats)  # [B, A]
    logits = logit_scale * cos
    if candidate_mask is not None:
        logits = jnp.where(candidate_mask, logits, -1e9)
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, answers))
    metrics = {"ce": ce, "train_accuracy": jnp.mean(jnp.argmax(logits, -1) == answers)}
    if cf_feats is None or lam == 0:
        return ce, metrics
    l_cf = counterfactual_contrastive_loss(image_feats, cf_feats, prompt_feats, answers, tau,
                                           valid=valid)
    if cf_answers is not None:
        l_cf = 0.5 * (l_cf + counterfactual_contrastive_loss(cf_feats, image_feats, prompt_feats,
                                                             cf_answers, tau, valid=valid))
    metrics["l_cf"] = l_cf
    return ce + lam * l_cf, metrics

