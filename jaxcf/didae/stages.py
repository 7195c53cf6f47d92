"""The stages of a DiDAE + CFKD run (METHODS §2-3), each a function of a :class:`Stage` (the
run's settings, data and frozen autoencoder): fit_dictionaries, train_classifiers, explain
(reflections and Algorithm 2), distill (CFKD with each teacher, and on ground-truth
counterfactuals), baselines, and the autoencoder controls. :mod:`jaxcf.pipelines.didae` runs them."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxcf.data.confounded import ConfoundedData, images_of, square_factors
from jaxcf.didae import cfkd, controls
from jaxcf.didae.classifiers import classification_loss, oracle_classifier, student_classifier, train_classifier
from jaxcf.didae.dictionary import (boundary_inversion, coefficient_bounds, edit_lengths, procrustes_dictionary,
                                    reflect_all, svd_dictionary)
from jaxcf.didae.report import save_counterfactuals
from jaxcf.train.batched import batched
from jaxcf.utils import io
from jaxcf.utils.images import heatmap_png, save_grid


@dataclasses.dataclass
class Stage:
    """What every stage reads: the run's settings, its data and the frozen autoencoder."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    data: ConfoundedData
    ae: object  # jaxcf.didae.autoencoder.DiffusionAutoencoder
    enc_params: object
    dec_params: object
    encode: Callable  # (enc_params, images) -> codes [N, D], batched
    generate: Callable  # (images [B, ...], AtomEdits) -> counterfactuals [K, B, ...], batched
    writer: bool  # process 0: writes files

    def grid(self, rows, name: str) -> None:
        save_grid(rows, io.join(self.workdir, name), scale=2)


@dataclasses.dataclass
class Classifiers:
    """The trained student (poisoned), its surrogate, the oracle, and batched predictions."""

    student: object
    poisoned: object
    surrogate: object
    frozen: object  # Phi's params for the probe student (it reads codes), else None
    oracle_params: object
    predict_student: Callable  # (params, x, frozen) -> probabilities [N, 2]
    predict_oracle: Callable  # (params, x) -> [N, 2 + F]
    evaluate: Callable  # params -> {aga, worst_group, group_accuracy} on the test set


# ----------------------------------------------------------------------------- stages


def fit_dictionaries(s: Stage):
    """({kind: (omega [D, K], mu [D])}, z_fit [N, D]) on the held-out codes."""
    z_fit = s.encode(s.enc_params, images_of(s.data.fit))
    halves = s.data.fit.arrays["halves"].astype(np.float32) - 0.5
    dicts = {}
    for kind in s.config.dictionary.kinds:
        if kind == "procrustes":
            omega, mu = procrustes_dictionary(z_fit, halves)
        else:
            omega, mu = svd_dictionary(z_fit, s.config.dictionary.num_atoms)
        dicts[kind] = (np.asarray(omega), np.asarray(mu))
    return dicts, z_fit


def surrogate_train_config(config):
    """The surrogate trains like the student, for ``surrogate.steps``."""
    st = config.student
    return ml_collections.ConfigDict(dict(steps=config.surrogate.steps, batch_size=st.get("batch_size"),
                                          learning_rate=st.get("learning_rate")))


def train_classifiers(s: Stage, D: int) -> Classifiers:
    """The poisoned student, its adversarially trained surrogate and the balanced oracle."""
    c, data = s.config, s.data
    seeds = c.seed_offsets
    student = student_classifier(c, s.ae.encode)
    frozen = s.enc_params if c.student.kind == "probe" else None
    keys = ("image", "label")
    poisoned = train_classifier(student.init(jax.random.key(c.seed + seeds.student), D), classification_loss(student),
                                c.student, io.join(s.workdir, "student"), s.mesh, c, "student (poisoned)",
                                section="student", dataset=data.train, keys=keys, frozen=frozen)
    surrogate = train_classifier(student.init(jax.random.key(c.seed + seeds.surrogate), D),
                                 classification_loss(student, adv_eps=c.surrogate.adv_eps), surrogate_train_config(c),
                                 io.join(s.workdir, "surrogate"), s.mesh, c, "surrogate (adversarial)",
                                 section="student", dataset=data.train, keys=keys, frozen=frozen)
    oracle = oracle_classifier(c, len(data.factor_names))
    oracle_params = train_classifier(oracle.init(jax.random.key(c.seed + seeds.oracle)),
                                     classification_loss(oracle, factor_weight=1.0), c.oracle,
                                     io.join(s.workdir, "oracle"), s.mesh, c, "oracle (balanced)", section="oracle",
                                     dataset=data.pool, keys=("image", "label", "factors"))
    eb = c.eval.batch_size
    predict_student = batched(lambda p, x, fr: jax.nn.softmax(student.apply(p, x, fr)[:, :2]), s.mesh, eb)
    predict_oracle = batched(lambda p, x: oracle.apply(p, x, None), s.mesh, eb)
    test_x, test = images_of(data.test), data.test.arrays

    def evaluate(params):
        pred = np.argmax(predict_student(params, test_x, frozen), -1)
        return dict(aga=cfkd.aga(pred, test["label"], test["group"]),
                    worst_group=cfkd.worst_group_accuracy(pred, test["label"], test["group"]),
                    group_accuracy=cfkd.group_accuracies(pred, test["label"], test["group"]).tolist())

    return Classifiers(student, poisoned, surrogate, frozen, oracle_params, predict_student, predict_oracle, evaluate)


@dataclasses.dataclass
class Inputs:
    """The counterfactual inputs: training images the poisoned student gets right."""

    x: np.ndarray  # [B, ...]
    y: np.ndarray  # [B] labels
    target: np.ndarray  # [B] the class a counterfactual should move the student to
    factors: np.ndarray | None  # [B, 4] Square factors
    z: np.ndarray  # [B, D] codes (edit lengths)


def explain(s: Stage, clf: Classifiers, kind: str, omega, mu, eval_x, inputs: Inputs, z_train, pred_train, z_fit):
    """Reflections of every atom, judged by the oracle's factor regressor (and on Square by the
    pixel reader), and Algorithm 2 counterfactuals of the inputs for the student.

    Returns (report, x_cf [K, B, ...], flipped [K, B], valid [K], atom_is_true [K])."""
    c, out = s.config, {}
    factors_of = lambda x: np.clip(clf.predict_oracle(clf.oracle_params, x)[:, 2:], 0.0, 1.0)  # noqa: E731
    x_ref = s.generate(eval_x, reflect_all(omega, mu))
    matrix = cfkd.disentanglement_matrix(factors_of(eval_x), np.stack([factors_of(xk) for xk in x_ref]))
    if c.data.name == "square":  # the same question asked of the pixels (a model-free reader; cannot be fooled)
        out["disentanglement_matrix_reader"] = controls.reader_disentanglement(eval_x, x_ref).tolist()
    # the preclustered teacher labels atoms once: a Procrustes atom by construction (atom k was
    # fitted to factor k), an SVD atom by the factor its reflection changes most
    true_factor = s.data.factor_names.index(c.cfkd.true_factor)
    atom_true = (np.arange(len(matrix)) == true_factor) if kind == "procrustes" else \
        cfkd.preclustered_atom_labels(matrix, true_factor)
    out["disentanglement_matrix"] = matrix.tolist()
    out["atom_is_true"] = atom_true.tolist()
    if s.writer:
        write_disentanglement(s, kind, matrix, atom_true, eval_x, x_ref)

    # Algorithm 2 for the student, on the inputs it gets right
    w = cfkd.distill_probe(z_train - mu, pred_train)
    out["probe_agreement"] = cfkd.probe_agreement(z_train - mu, w, pred_train)
    bounds = coefficient_bounds(omega, mu, z_fit, c.edit.coef_quantile) if c.edit.coef_quantile > 0 else None
    edit, valid = boundary_inversion(jnp.asarray(w), jnp.asarray(omega), mu, c.edit.lam, c.edit.guard,
                                     c.edit.min_alignment, bounds)
    if bounds is not None:  # how many edits the bound changed, per atom: atom k's coefficient in edit k
        z_in = jnp.asarray(inputs.z)
        own = lambda e: np.asarray(jnp.einsum("kbd,dk->kb", e(z_in) - jnp.asarray(mu), jnp.asarray(omega)))  # noqa: E731
        clipped = ~np.isclose(own(edit), own(edit.replace(lo=None, hi=None)), atol=1e-4)
        out["edits_clipped_per_atom"] = clipped.mean(axis=1).tolist()
    t0 = time.time()
    x_cf = s.generate(inputs.x, edit, residual=c.edit.residual)
    seconds = time.time() - t0
    K = x_cf.shape[0]
    out["cf_per_second"] = K * len(inputs.x) / seconds
    p_s, p_sur = student_flips(clf, inputs, x_cf)
    valid = np.asarray(valid)
    out["atoms_skipped"] = int(np.sum(~valid))
    out["edit_length"] = edit_lengths(inputs.z, edit, z_fit).tolist()
    out["flip_rate"] = cfkd.flip_rate(p_s[valid])
    out["nafr"] = cfkd.nafr(p_s[valid], p_sur[valid])
    out["flip_rate_per_atom"] = [cfkd.flip_rate(p_s[k]) for k in range(K)]
    flipped = cfkd.flips(p_s) & valid[:, None]
    if s.writer:
        g = min(c.eval.grid_examples, len(inputs.x))
        s.grid([inputs.x[:g]] + [x_cf[k, :g] for k in range(K)], f"counterfactuals_{kind}.png")
        save_counterfactuals(io.join(s.workdir, f"counterfactuals_{kind}.npz"), inputs.x, x_cf, inputs.y,
                             inputs.factors, flipped)
    return out, x_cf, flipped, valid, atom_true


def write_disentanglement(s: Stage, kind: str, matrix, atom_true, eval_x, x_ref) -> None:
    """disentanglement_<kind>.json / .png and the atoms x examples grid atoms_<kind>.png."""
    names = s.data.factor_names
    atom_names = [f"atom {k} ({names[k] if kind == 'procrustes' else 'svd'})" for k in range(len(matrix))]
    io.write_json(io.join(s.workdir, f"disentanglement_{kind}.json"),
                  dict(dictionary=kind, factors=list(names), atoms=atom_names, mean_abs_change=matrix.tolist(),
                       atom_is_true=atom_true.tolist(),
                       note="rows: atoms (reflection edits); columns: mean |oracle factor change|, clipped "
                            "factors scaled to [0, 1]"))
    heatmap_png(matrix, atom_names, names, io.join(s.workdir, f"disentanglement_{kind}.png"),
                title=f"{kind}: mean |factor change| per atom reflection")
    g = min(s.config.eval.grid_examples, len(eval_x))
    s.grid([eval_x[:g]] + [x_ref[k, :g] for k in range(len(x_ref))], f"atoms_{kind}.png")


def student_flips(clf: Classifiers, inputs: Inputs, x_cf):
    """[K, B] the student's p(target | x') (and the surrogate's)."""
    rows = np.arange(len(inputs.x))
    p_s = np.stack([clf.predict_student(clf.poisoned, xk, clf.frozen)[rows, inputs.target] for xk in x_cf])
    p_sur = np.stack([clf.predict_student(clf.surrogate, xk, clf.frozen)[rows, inputs.target] for xk in x_cf])
    return p_s, p_sur


def kept(config, flipped, valid, is_true):
    """Which counterfactuals CFKD adds: flipped ones (cfkd.only_flipped) of valid atoms, and
    "true" ones only with cfkd.add_true (the official code adds only "false" ones)."""
    keep = flipped if config.cfkd.only_flipped else np.broadcast_to(valid[:, None], flipped.shape)
    return keep & (~is_true if not config.cfkd.add_true else True)


def distill(config, finetune, before, x_cf, labels, is_true, keep, dictionary: str, teacher: str, tag: str) -> dict:
    """CFKD with one teacher's labels: fine-tune on the kept counterfactuals; one results row."""
    x_add, y_add = cfkd.counterfactual_training_set(x_cf, labels, keep)
    after = finetune(tag, x_add, y_add) if len(y_add) else None
    row = dict(dictionary=dictionary, teacher=teacher, counterfactuals=int(len(y_add)),
               true=int(np.sum(is_true & keep)), false=int(np.sum(~is_true & keep)))
    if after is not None:
        row.update(aga=after["aga"], worst_group=after["worst_group"], gain=cfkd.gain(before["aga"], after["aga"]),
                   group_accuracy=after["group_accuracy"])
    return row


def distill_teachers(s: Stage, clf: Classifiers, finetune, before, kind, inputs: Inputs, x_cf, flipped, valid,
                     atom_true) -> list:
    """A CFKD row per teacher of ``config.cfkd.teachers`` for one dictionary's counterfactuals."""
    rows = []
    for teacher in s.config.cfkd.teachers:
        if teacher == "preclustered":
            is_true, labels = cfkd.preclustered_labels(atom_true, inputs.y)
        else:
            oracle_cf = np.stack([np.argmax(clf.predict_oracle(clf.oracle_params, xk)[:, :2], -1) for xk in x_cf])
            oracle_x = np.argmax(clf.predict_oracle(clf.oracle_params, inputs.x)[:, :2], -1)
            is_true, labels = cfkd.model_teacher_labels(oracle_x, oracle_cf, inputs.y)
        tag = f"{kind}_{teacher}"
        rows.append(distill(s.config, finetune, before, x_cf, labels, is_true,
                            kept(s.config, flipped, valid, is_true), kind, teacher, tag))
        print(f"didae: CFKD {tag}: {rows[-1]}", flush=True)
    return rows


def distill_ground_truth(s: Stage, clf: Classifiers, finetune, before, inputs: Inputs) -> dict:
    """Control: the same loop fed with perfect counterfactuals (each input re-rendered with factor k
    moved to its other half; the preclustered teacher's labels are exact here)."""
    c = s.config
    x_gt = controls.ground_truth_counterfactuals(inputs.factors, c.data.resolution, c.seed)
    p_s, _ = student_flips(clf, inputs, x_gt)
    flipped, valid = cfkd.flips(p_s), np.ones(len(x_gt), bool)
    true_factor = s.data.factor_names.index(c.cfkd.true_factor)
    is_true, labels = cfkd.preclustered_labels(np.arange(len(x_gt)) == true_factor, inputs.y)
    keep = kept(c, flipped, valid, is_true)
    if s.writer:
        save_counterfactuals(io.join(s.workdir, "counterfactuals_ground_truth.npz"), inputs.x, x_gt, inputs.y,
                             inputs.factors, flipped)
    row = distill(c, finetune, before, x_gt, labels, is_true, keep, "ground truth", "preclustered", "ground_truth")
    row = {**{k: v for k, v in row.items() if k in ("dictionary", "teacher", "counterfactuals", "true", "false")},
           "flip_rate": cfkd.flip_rate(p_s), **{k: v for k, v in row.items() if k in
                                               ("aga", "worst_group", "gain", "group_accuracy")}}
    print(f"didae: CFKD with ground-truth counterfactuals: {row}", flush=True)
    return row


def baselines(s: Stage, dicts, per_dict, z_train) -> dict:
    """The projection baseline of every dictionary (:func:`jaxcf.didae.cfkd.projection_baseline`)."""
    test = s.data.test.arrays
    z_test = s.encode(s.enc_params, images_of(s.data.test))
    out = {}
    for kind, (omega, mu) in dicts.items():
        b = cfkd.projection_baseline(z_train, s.data.train.arrays["label"], z_test, test["label"], test["group"],
                                     omega, mu, per_dict[kind]["atom_is_true"])
        out[f"probe_{kind}"], out[f"projection_{kind}"] = b["probe"], b["projection"]
    return out


def autoencoder_controls(s: Stage) -> dict:
    """Identity / fresh-noise / ground-truth-swap controls on the first eval inputs of the test set,
    read by the pixel reader (:mod:`jaxcf.didae.controls`); a PNG of them in the workdir."""
    config, ae, mesh = s.config, s.ae, s.mesh
    eb = config.eval.batch_size
    encode = batched(lambda p, x: ae.encode(p[0], x), mesh, eb)
    invert = batched(lambda p, xz: ae.invert(p[1], xz[0], xz[1]), mesh, eb)
    decode = batched(lambda p, xz: ae.decode(p[1], xz[0], xz[1]), mesh, eb)
    params = (s.enc_params, s.dec_params)
    n = min(config.eval.num_inputs, len(s.data.test))
    x = images_of(s.data.test)[:n]
    out = controls.generator_controls(
        x, square_factors(s.data.test)[:n], lambda x: encode(params, x), lambda x, z: invert(params, (x, z)),
        lambda x_T, z: decode(params, (x_T, z)), seed=config.seed)
    images = out.pop("images")
    if s.writer:
        g = min(config.eval.grid_examples, n)
        names = ["input", "reconstruction", "fresh_noise"] + [f"{p}_{f}" for f in controls.FACTOR_NAMES
                                                              for p in ("target", "swap")]
        s.grid([images[k][:g] for k in names], "controls.png")
    print(f"didae: controls (pixel reader, mean |error|): identity {out['identity']}, fresh noise "
          f"{out['fresh_noise']}, swap moved (median fraction) "
          f"{ {k: round(v['moved_fraction_median'], 2) for k, v in out['swap'].items()} }", flush=True)
    return out
