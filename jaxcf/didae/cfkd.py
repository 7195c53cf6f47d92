"""Counterfactual knowledge distillation (CFKD, METHODS.md §2.5-2.7): pure pieces.

A poisoned student f is explained by counterfactuals; a teacher says which of them changed the
true cause ("true") and which only a spurious one ("false"); the student is fine-tuned on a
50/50 mix of its data and the counterfactuals, each labelled by the teacher. Every function
here is a pure function of arrays (numpy in, numpy or jax out) and is tested alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

FLIP_THRESHOLD = 0.51  # a counterfactual flips a classifier when p(target | x') >= 0.51


def fit_linear_probe(z, labels, *, bias: bool = False, l2: float = 1e-3, steps: int = 500,
                     learning_rate: float = 0.05):
    """Logistic regression p(y=1 | z) = sigmoid(w^T z + b) by full-batch Adam (BCE + l2 |w|^2).

    z: [N, D]; labels: [N] in {0, 1}. Returns (w [D], b []) with b = 0 when ``bias`` is False.
    """
    z = jnp.asarray(z, jnp.float32)
    y = jnp.asarray(labels, jnp.float32)
    if z.ndim != 2 or y.shape != (z.shape[0],):
        raise ValueError(f"linear probe: codes must be [N, D] and labels [N]; got {z.shape} and {y.shape}")
    scale = 1.0 / (jnp.std(z) + 1e-8)  # condition the problem; undone on return
    tx = optax.adam(learning_rate)

    def loss(p):
        logits = (z * scale) @ p["w"] + (p["b"] if bias else 0.0)
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y)) + l2 * jnp.sum(p["w"] ** 2)

    def body(_, carry):
        p, opt = carry
        upd, opt = tx.update(jax.grad(loss)(p), opt, p)
        return optax.apply_updates(p, upd), opt

    p0 = {"w": jnp.zeros((z.shape[1],), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    p, _ = jax.jit(lambda p0: jax.lax.fori_loop(0, steps, body, (p0, tx.init(p0))))(p0)
    return p["w"] * scale, p["b"] if bias else jnp.zeros((), jnp.float32)


def distill_probe(z, hard_labels, **kw):
    """Algorithm 2, step 1: a bias-free linear probe g(z) = w^T z fitted (BCE) to a classifier's hard
    labels [N] in {0, 1}. z: [N, D] codes, centred by the dictionary mean so "bias-free" loses
    nothing. Returns w [D]."""
    return fit_linear_probe(z, hard_labels, bias=False, **kw)[0]


def probe_agreement(z, w, hard_labels) -> float:
    """Fraction of inputs where the probe's sign agrees with the classifier's hard label."""
    return float(np.mean((np.asarray(z) @ np.asarray(w) > 0) == (np.asarray(hard_labels) == 1)))


# ----------------------------------------------------------------------------- metrics


def group_accuracies(pred, label, group, num_groups: int = 4) -> np.ndarray:
    """Accuracy in each (label, confounder) group: [num_groups] (nan for an empty group)."""
    pred, label, group = map(np.asarray, (pred, label, group))
    correct = pred == label
    return np.array([correct[group == g].mean() if np.any(group == g) else np.nan for g in range(num_groups)])


def aga(pred, label, group, num_groups: int = 4) -> float:
    """Average group accuracy: the mean over groups of a balanced test set."""
    return float(np.nanmean(group_accuracies(pred, label, group, num_groups)))


def worst_group_accuracy(pred, label, group, num_groups: int = 4) -> float:
    return float(np.nanmin(group_accuracies(pred, label, group, num_groups)))


def gain(aga_before: float, aga_after: float) -> float:
    """Gain = (AGA_after - AGA_before) / (1 - AGA_before): the fraction of the possible improvement."""
    if aga_before >= 1.0:
        return 0.0
    return (aga_after - aga_before) / (1.0 - aga_before)


def flips(p_target, threshold: float = FLIP_THRESHOLD) -> np.ndarray:
    """p_target: a classifier's probability of the target class (the one it did not predict) on x'."""
    return np.asarray(p_target) >= threshold


def flip_rate(p_target, threshold: float = FLIP_THRESHOLD) -> float:
    """Fraction of counterfactuals with p(target | x') >= threshold (DiCap's
    :func:`jaxcf.dicap.metrics.argmax_flip_rate` takes the argmax of logits instead)."""
    return float(np.mean(flips(p_target, threshold))) if np.size(p_target) else float("nan")


def nafr(p_student, p_surrogate, threshold: float = FLIP_THRESHOLD) -> float:
    """Non-adversarial flip rate: counterfactuals that flip the student and also an adversarially
    trained surrogate of it (an adversarial perturbation rarely transfers to a robust model)."""
    if not np.size(p_student):
        return float("nan")
    return float(np.mean(flips(p_student, threshold) & flips(p_surrogate, threshold)))


def disentanglement_matrix(factors_before, factors_after) -> np.ndarray:
    """What each atom's edit really changed: mean |factor(x'_k) - factor(x)| over inputs.

    factors_before: [B, F] (an oracle's estimate on the inputs); factors_after: [K, B, F] on the
    counterfactuals of the K atoms. Returns [K, F] in the factors' units.
    """
    before = np.asarray(factors_before)[None]
    return np.mean(np.abs(np.asarray(factors_after) - before), axis=1)


# ----------------------------------------------------------------------------- teachers


def preclustered_atom_labels(matrix, true_factor: int) -> np.ndarray:
    """The preclustered teacher labels atoms once: atom k is "true" when the factor its edits change
    most (row k of the disentanglement matrix, factors on a common scale) is the true cause. [K] bool."""
    matrix = np.asarray(matrix)
    if not 0 <= true_factor < matrix.shape[1]:
        raise ValueError(f"true factor index {true_factor} is out of range for {matrix.shape[1]} factors")
    return np.argmax(matrix, axis=1) == true_factor


def preclustered_labels(atom_is_true, source_labels) -> tuple[np.ndarray, np.ndarray]:
    """Labels for counterfactuals [K, B] from the atom labels: true -> the other class, false -> the source label.

    Returns (is_true [K, B] bool, label [K, B] int32) for binary tasks.
    """
    atom_is_true = np.asarray(atom_is_true, bool)
    y = np.asarray(source_labels)
    is_true = np.broadcast_to(atom_is_true[:, None], (len(atom_is_true), len(y)))
    return is_true, np.where(is_true, 1 - y[None], y[None]).astype(np.int32)


def model_teacher_labels(teacher_pred_x, teacher_pred_cf, source_labels) -> tuple[np.ndarray, np.ndarray]:
    """A model teacher (an oracle classifier): a counterfactual is "true" when the teacher's own
    prediction flips too. teacher_pred_x [B], teacher_pred_cf [K, B]. Returns (is_true, label) [K, B]."""
    is_true = np.asarray(teacher_pred_cf) != np.asarray(teacher_pred_x)[None]
    y = np.asarray(source_labels)[None]
    return is_true, np.where(is_true, 1 - y, y).astype(np.int32)


def counterfactual_training_set(x_cf, labels, keep) -> tuple[np.ndarray, np.ndarray]:
    """Flattens the kept counterfactuals: x_cf [K, B, ...], labels [K, B], keep [K, B] -> (x [M, ...], y [M])."""
    keep = np.asarray(keep, bool)
    return np.asarray(x_cf)[keep], np.asarray(labels)[keep].astype(np.int32)


def mixed_batch_indices(num_original: int, num_counterfactual: int, batch_size: int, step: int, seed: int,
                        mix: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Indices of one fine-tuning batch: a fraction ``mix`` from the counterfactual set, the rest
    from the original data, each drawn from its own deterministic stream (any step can be rebuilt)."""
    n_cf = int(round(batch_size * mix)) if num_counterfactual else 0
    rng = np.random.default_rng((seed, step))
    return rng.integers(0, num_original, batch_size - n_cf), rng.integers(0, max(num_counterfactual, 1), n_cf)


# ----------------------------------------------------------------------------- baselines


def projection_baseline(z_train, y_train, z_test, y_test, group_test, omega, mu, atom_is_true) -> dict:
    """The projection baseline: a linear probe on Phi, with and without the non-causal atoms projected out.

    z_*: codes [N, D]; omega [D, K], mu [D]; atom_is_true [K]. The projection removes the span of
    the atoms labelled "false" (:func:`jaxcf.didae.dictionary.project_out`). Returns
    {"probe": {aga, worst_group}, "projection": {aga, worst_group}}.
    """
    from jaxcf.didae.dictionary import project_out

    Q = omega[:, ~np.asarray(atom_is_true)]
    out = {}
    for name, f in (("probe", lambda z: z - mu), ("projection", lambda z: project_out(z - mu, Q))):
        w, b = fit_linear_probe(np.asarray(f(z_train)), y_train, bias=True)
        pred = (np.asarray(f(z_test)) @ np.asarray(w) + float(b) > 0).astype(np.int32)
        out[name] = dict(aga=aga(pred, y_test, group_test), worst_group=worst_group_accuracy(pred, y_test, group_test))
    return out
