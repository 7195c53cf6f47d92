"""Evaluation of prompt learning and of counterfactual quality (METHODS.md §1.4)."""

from __future__ import annotations

import numpy as np


def accuracy(logits, labels) -> float:
    return float(np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(labels)))


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2 B N / (B + N)."""
    return 0.0 if base + novel == 0 else 2.0 * base * novel / (base + novel)


def argmax_flip_rate(cf_logits, y_cf) -> float:
    """Fraction of counterfactuals that the predictor assigns to their target class (argmax of its
    logits; DiDAE's :func:`jaxcf.didae.cfkd.flip_rate` thresholds a probability instead)."""
    return accuracy(cf_logits, y_cf)


def counterfactual_latent_divergence(emb_x, emb_cf, labels, y_cf, ref_emb, ref_labels, w1: float = 0.5,
                                     w2: float = 0.5):
    """CLD per example (lower is better).

    d = ||e(x) - e(x_cf)||; S_x = distances from x to the reference images of its own class;
    S_cf = distances from x to the reference images of class y_cf;
    CLD = log(w1 exp(P[S_cf <= d]) + w2 exp(P[S_x >= d])) with empirical fractions P.
    Embeddings [B, E] and references [N, E] in one fixed embedding space. An example whose class
    has no reference image gives NaN.
    """
    emb_x, emb_cf, ref = (np.asarray(a, np.float64) for a in (emb_x, emb_cf, ref_emb))
    labels, y_cf, ref_labels = np.asarray(labels), np.asarray(y_cf), np.asarray(ref_labels)
    d = np.linalg.norm(emb_x - emb_cf, axis=-1)  # [B]
    dist = np.linalg.norm(emb_x[:, None, :] - ref[None, :, :], axis=-1)  # [B, N]
    own = ref_labels[None, :] == labels[:, None]
    own &= dist > 1e-12  # "other images" of its class: not x itself when it is in the reference set
    tgt = ref_labels[None, :] == y_cf[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        p_cf = np.sum((dist <= d[:, None]) & tgt, 1) / np.sum(tgt, 1)
        p_x = np.sum((dist >= d[:, None]) & own, 1) / np.sum(own, 1)
    return np.log(w1 * np.exp(p_cf) + w2 * np.exp(p_x))


def recall_at_k(image_feats, text_feats, ks=(1, 5, 10)) -> dict:
    """Image->text and text->image recall@K for paired rows (row i of each is a pair)."""
    f = np.asarray(image_feats, np.float64)
    t = np.asarray(text_feats, np.float64)
    f /= np.linalg.norm(f, axis=-1, keepdims=True)
    t /= np.linalg.norm(t, axis=-1, keepdims=True)
    sim = f @ t.T
    n = len(sim)
    rank_i2t = np.sum(sim > sim[np.arange(n), np.arange(n)][:, None], 1)  # how many beat the true pair
    rank_t2i = np.sum(sim.T > sim[np.arange(n), np.arange(n)][:, None], 1)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float(np.mean(rank_i2t < k))
        out[f"t2i_R@{k}"] = float(np.mean(rank_t2i < k))
    return out
