"""DiCap's estimation objective: CE on prompt logits plus the counterfactual contrastive term."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def normalize(x, axis=-1):
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def class_cosines(image_feats, text_feats):
    """cos(f(x_b), t_c): image_feats [B, P], text_feats [C, P] or per-image [B, C, P] -> [B, C]."""
    f = normalize(image_feats)
    t = normalize(text_feats)
    return jnp.einsum("bp,cp->bc", f, t) if t.ndim == 2 else jnp.einsum("bp,bcp->bc", f, t)


def counterfactual_contrastive_loss(image_feats, cf_feats, text_feats, labels, tau: float = 1.0,
                                    all_classes: bool = False, valid=None):
    """L_cf = -log(e^{cos(t_y, f(x))/tau} / (e^{cos(t_y, f(x))/tau} + e^{cos(t_y, f(x_cf))/tau})).

    The counterfactual x_cf keeps x's non-causal content and changes its class: a hard negative
    for the true-class prompt t_y. ``all_classes=True`` averages the same term over every class
    prompt t_c instead of t_y alone. ``valid`` [B] drops rows whose counterfactual is missing.
    Shapes: feats [B, P], text_feats [C, P] or [B, C, P], labels [B].
    """
    s_x = class_cosines(image_feats, text_feats)  # [B, C]
    s_cf = class_cosines(cf_feats, text_feats)
    per_class = jax.nn.softplus((s_cf - s_x) / tau)  # = -log(e^a / (e^a + e^b)), a = s_x/tau, b = s_cf/tau
    per = jnp.mean(per_class, 1) if all_classes else jnp.take_along_axis(per_class, labels[:, None], 1)[:, 0]
    if valid is None:
        return jnp.mean(per)
    w = valid.astype(jnp.float32)
    return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


def dicap_loss(image_feats, cf_feats, text_feats, labels, logit_scale, lam: float = 1.0, tau: float = 1.0,
               all_classes: bool = False, valid=None, cf_labels=None, cf_ce: float = 0.0):
    """CE(logit_scale * cos(f(x), t_c), y) + lambda * L_cf [+ cf_ce * CE(f(x_cf), y_cf)]; returns (loss, metrics).

    ``cf_feats`` may be None (CoOp: lambda is ignored). ``valid`` [B] masks rows of a batch whose
    counterfactual is missing (their L_cf term is dropped). ``cf_ce > 0`` (not in the paper: a
    jaxcf option) also trains on each counterfactual as an example of its class ``cf_labels`` [B]
    (counterfactual augmentation: the shots' background now appears with other classes too).
    """
    logits = logit_scale * class_cosines(image_feats, text_feats)
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    metrics = {"ce": ce, "train_accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
    total = ce
    if cf_feats is not None and lam != 0:
        l_cf = counterfactual_contrastive_loss(image_feats, cf_feats, text_feats, labels, tau, all_classes, valid)
        metrics["l_cf"] = l_cf
        total = total + lam * l_cf
    if cf_feats is not None and cf_ce != 0:
        per = optax.softmax_cross_entropy_with_integer_labels(logit_scale * class_cosines(cf_feats, text_feats), cf_labels)
        w = jnp.ones_like(per) if valid is None else valid.astype(per.dtype)
        metrics["cf_ce"] = jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)
        total = total + cf_ce * metrics["cf_ce"]
    return total, metrics
