"""DiDAE + CFKD end to end (METHODS.md §2-3): ``python -m jaxcf.main --config=configs/didae.py``.

Stages, each resumable from the workdir:
  1. foundation  Phi (a Square encoder trained on the 8 attributes, or CLIP's image tower) and the
                 DiffAE decoder eps(x_t, t, z = Phi(x)) trained with eps-MSE while Phi is frozen;
                 shipped in jaxcf/assets/<foundation.assets> or trained in workdir/foundation.
  2. dictionary  Procrustes (supervised by the factor halves) and SVD atoms on held-out codes.
  3. classifiers the poisoned student, an adversarially trained surrogate of it (for NAFR), and an
                 oracle trained on balanced data (the model teacher and the factor regressor).
  4. edits       reflections of each atom (what does an atom change? -> disentanglement matrix and
                 atoms x examples grid) and Algorithm 2 counterfactuals for the student.
  5. CFKD        preclustered and model teachers label the counterfactuals; the student is
                 fine-tuned on a 50/50 mix; AGA / worst group / Gain; the projection baseline.
Outputs: results.json, results.md, disentanglement_<dict>.{json,png}, atoms_<dict>.png,
counterfactuals_<dict>.png, metrics.jsonl and checkpoints of every trained model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from io import BytesIO
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxcf import configs as cfgs
from jaxcf.data.common import ArrayDataset, padded_batches
from jaxcf.didae import cfkd, controls
from jaxcf.didae.autoencoder import (DiffusionAutoencoder, clip_encode_fn, code_statistics, semantic_cond,
                                     square_encode_fn, standardized)
from jaxcf.didae.dictionary import (apply_atom_edits, boundary_edit, procrustes_dictionary, project_out,
                                    reflection_edit, svd_dictionary)
from jaxcf.diffusion import PREDICTIONS, SCHEDULES, make_schedule
from jaxcf.models.init import fast_init, num_params
from jaxcf.models.registry import build_model
from jaxcf.pipelines.diffusion import train_eps_model
from jaxcf.train import (Checkpointer, MetricWriter, check_batch_divisible, create_train_state, data_sharding,
                         jit_update, make_update_fn, param_shardings, replicated, stream_indices, to_host, train_loop,
                         warmup_cosine)
from jaxcf.train.precision import compute_dtype, frozen_params
from jaxcf.utils import io

DICTIONARIES = ("procrustes", "svd")
TEACHERS = ("preclustered", "model")
STUDENTS = ("resnet18", "probe")
ENCODERS = ("square", "clip")
DATASETS = ("square", "celeba")


# ----------------------------------------------------------------------------- config checks


def validate(config) -> None:
    """Every user-fixable problem, before any data is made or anything compiles."""
    c = config
    cfgs.check_choice(c, "data.name", DATASETS)
    cfgs.check_choice(c, "encoder.kind", ENCODERS)
    cfgs.check_choice(c, "student.kind", STUDENTS)
    cfgs.check_choice(c, "schedule.name", SCHEDULES)
    for field in ("data.resolution", "data.num_samples", "data.num_test_per_group", "data.unbiased_samples",
                  "ddim_steps", "dictionary.num_atoms", "dictionary.fit_examples", "student.steps",
                  "student.batch_size", "surrogate.steps", "oracle.steps", "oracle.batch_size", "cfkd.num_inputs",
                  "cfkd.steps", "cfkd.batch_size", "eval.num_inputs", "eval.batch_size", "eval.grid_examples",
                  "decoder.train.steps", "decoder.train.batch_size"):
        cfgs.check_int(c, field, 1)
    cfgs.check_range(c, "data.agree_fraction", 0.0, 1.0)
    cfgs.check_choice(c, "decoder.train.weights", ("ema", "final"))
    cfgs.check_choice(c, "decoder.train.prediction", PREDICTIONS)
    for field in ("decoder.standardize_z", "decoder.clip_x0", "decoder.train.zero_cond"):
        cfgs.check_choice(c, field, (True, False))
    cfgs.check_range(c, "decoder.train.ema_decay", 0.0, 1.0, high_open=True)
    cfgs.check_range(c, "edit.lam", 0.0, 10.0, low_open=True)
    cfgs.check_range(c, "edit.min_alignment", 0.0, 1.0, high_open=True)
    for field in ("cfkd.add_true", "cfkd.ground_truth", "eval.controls"):
        cfgs.check_choice(c, field, (True, False))
    cfgs.check_range(c, "cfkd.mix", 0.0, 1.0, high_open=True)
    cfgs.check_range(c, "surrogate.adv_eps", 0.0, 2.0)
    for field, allowed in (("dictionary.kinds", DICTIONARIES), ("cfkd.teachers", TEACHERS)):
        values = tuple(cfgs.get(c, field))
        if not values or any(v not in allowed for v in values):
            raise cfgs.ConfigError(f"config.{field}={values!r} must be a non-empty subset of {allowed!r}")
    factors = tuple(c.dictionary.factors)
    if tuple(c.data.factors) != factors:
        raise cfgs.ConfigError(f"config.dictionary.factors={factors!r} must equal config.data.factors="
                               f"{tuple(c.data.factors)!r} (one Procrustes atom per labelled factor)")
    if c.cfkd.true_factor not in factors:
        raise cfgs.ConfigError(f"config.cfkd.true_factor={c.cfkd.true_factor!r} is not a factor; allowed: "
                               f"{', '.join(factors)}")
    K = c.dictionary.num_atoms
    if "procrustes" in c.dictionary.kinds and K != len(factors):
        raise cfgs.ConfigError(f"config.dictionary.num_atoms={K} must equal the number of factors {len(factors)} "
                               "for the Procrustes dictionary (one atom per factor)")
    D = embed_dim(c)
    if D is not None and K > D:
        raise cfgs.ConfigError(f"config.dictionary.num_atoms={K} is larger than the embedding size D={D} "
                               f"(config.encoder.embed_dim): a dictionary has at most D orthonormal atoms")
    if c.encoder.kind == "clip" and not c.encoder.get("checkpoint"):
        raise cfgs.ConfigError("config.encoder.checkpoint is required for encoder.kind='clip' (a hub id such as "
                               "'openai/clip-vit-base-patch32' or a local folder)")
    if c.encoder.kind == "clip" and not c.foundation.assets == "":
        raise cfgs.ConfigError("config.foundation.assets must be '' with encoder.kind='clip' (no shipped decoder)")
    if c.encoder.kind == "clip":
        path = str(c.encoder.checkpoint)
        if path.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(path)):
            raise cfgs.ConfigError(f"config.encoder.checkpoint={path!r}: no such checkpoint folder")
    if c.data.name == "square":
        if c.data.resolution < 16 or c.data.resolution % 2 ** c.encoder.num_stages:
            raise cfgs.ConfigError(f"config.data.resolution={c.data.resolution} must be >= 16 and a multiple of "
                                   f"2 ** config.encoder.num_stages")
    if c.data.name == "celeba" and c.encoder.kind != "clip":
        raise cfgs.ConfigError("config.encoder.kind must be 'clip' for data.name='celeba'")
    decoder_model(c, D or 8)  # unknown decoder fields -> ConfigError


def embed_dim(c) -> int | None:
    """D, the size of z = Phi(x) (None for CLIP until its config is read)."""
    return c.encoder.embed_dim if c.encoder.kind == "square" else None


# decoder fields that are not UNet hyper-parameters
DECODER_SETTINGS = ("train", "standardize_z", "clip_x0")


def decoder_model(c, semantic_dim: int):
    cfg = {k: v for k, v in c.decoder.to_dict().items() if k not in DECODER_SETTINGS}
    cfg.setdefault("resolution", c.data.resolution)
    cfg["semantic_dim"] = semantic_dim
    try:
        return build_model("diffae_unet", cfg, c.dtype)
    except cfgs.ConfigError as e:
        raise cfgs.ConfigError(str(e).replace("config.model (diffae_unet)", "config.decoder")) from e


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class DidaeData:
    """Arrays of each split: image (uint8), label, confounder, group, factors [N, F] (in [0, 1])
    and halves [N, F] (0/1: which half of each factor; the Procrustes targets)."""

    train: ArrayDataset  # poisoned (label and confounder agree rarely)
    test: ArrayDataset  # balanced over the 4 (label, confounder) groups
    pool: ArrayDataset  # unbiased: trains the encoder, the decoder and the oracle
    fit: ArrayDataset  # held out: fits the dictionaries
    factor_names: tuple[str, ...]


def square_data(config) -> DidaeData:
    from jaxcf.data.square import FACTOR_RANGE, factor_halves, square_dataset

    d = config.data
    common = dict(resolution=d.resolution, seed=d.seed)

    def prep(ds):
        a = {k: v for k, v in ds.arrays.items() if k != "mask"}
        a["halves"] = factor_halves(a["factors"])
        a["factors"] = a["factors"].astype(np.float32) / FACTOR_RANGE
        return ArrayDataset(a, ds.class_names, ds.info)

    poisoned = dict(num_samples=d.num_samples, agree_fraction=d.agree_fraction, val_fraction=d.val_fraction, **common)
    return DidaeData(
        train=prep(square_dataset("train", **poisoned)),
        test=prep(square_dataset("test", num_test_per_group=d.num_test_per_group, **common)),
        pool=prep(square_dataset("unbiased", num_samples=d.unbiased_samples, **common)),
        fit=prep(square_dataset("unbiased", num_samples=config.dictionary.fit_examples, resolution=d.resolution,
                                seed=d.seed + 1)),
        factor_names=tuple(d.factors))


def celeba_data(config) -> DidaeData:
    """CelebA with a poisoned training set (group sizes as Square's) and a balanced test set."""
    from jaxcf.data.square import poisoned_group_sizes
    from jaxcf.data.tfds_data import tfds_dataset

    d = config.data
    kw = dict(resolution=d.resolution, data_dir=d.data_dir or None, label_attribute=d.label_attribute,
              confounder_attribute=d.confounder_attribute)
    rng = np.random.default_rng(d.seed)

    def pick(split, sizes):
        ds = tfds_dataset(d.tfds_name, split, **kw)
        groups = ds.column("group")
        idx = []
        for g, k in enumerate(sizes):
            members = np.flatnonzero(groups == g)
            if len(members) < k:
                raise cfgs.ConfigError(f"config.data: tfds {d.tfds_name} {split!r} has {len(members)} examples in "
                                       f"group {g} (label, confounder) = {divmod(g, 2)}; {k} are needed "
                                       "(lower config.data.num_samples / num_test_per_group)")
            idx.append(rng.choice(members, k, replace=False))
        return prep(ds.subset(np.sort(np.concatenate(idx))), ds.attribute_names)

    def pool(split, n):
        ds = tfds_dataset(d.tfds_name, split, **kw)
        n = min(n, len(ds))
        return prep(ds.subset(np.sort(rng.choice(len(ds), n, replace=False))), ds.attribute_names)

    def prep(ds, names):
        a = dict(ds.arrays)
        cols = [list(names).index(f) for f in d.factors]
        a["halves"] = a["attributes"][:, cols].astype(np.int32)
        a["factors"] = a["halves"].astype(np.float32)
        return ArrayDataset(a, ds.class_names, ds.info)

    n_train = int(round(d.num_samples * (1 - d.val_fraction)))
    return DidaeData(train=pick("train", poisoned_group_sizes(n_train, d.agree_fraction)),
                     test=pick("test", (d.num_test_per_group,) * 4),
                     pool=pool("train", d.unbiased_samples),
                     fit=pool("validation", config.dictionary.fit_examples),
                     factor_names=tuple(d.factors))


def load_data(config) -> DidaeData:
    return square_data(config) if config.data.name == "square" else celeba_data(config)


# ----------------------------------------------------------------------------- batched evaluation


def batched(fn: Callable, mesh, batch_size: int):
    """``fn(params, x, *rest)`` jitted, applied to a numpy x of any length in fixed-size padded
    batches (one compilation) split over the data axis; returns numpy, stacked on axis ``axis``
    of each output (1 for counterfactuals shaped [K, B, ...]). x may be a tuple of arrays with
    the same first axis (batched together)."""
    d = mesh.shape["data"]
    bs = max(d, batch_size - batch_size % d)
    jitted = jax.jit(fn)

    def chunks(x):
        if not isinstance(x, tuple):
            return padded_batches(x, bs)
        parts = [list(padded_batches(a, bs)) for a in x]
        return [(tuple(p[0] for p in group), group[0][1]) for group in zip(*parts)]

    def run(params, x, *rest, axis: int = 0):
        outs = []
        for chunk, n in chunks(x):  # every process holds x; device_put hands out the rows
            out = jitted(params, jax.device_put(chunk, data_sharding(mesh)), *rest)
            outs.append(jax.tree_util.tree_map(lambda o: np.take(to_host(o), np.arange(n), axis=axis), out))
        return jax.tree_util.tree_map(lambda *o: np.concatenate(o, axis=axis), *outs)

    return run


# ----------------------------------------------------------------------------- foundation


def _assets_dir(config) -> str | None:
    from jaxcf.pipelines.foundation import ASSETS

    return os.path.join(ASSETS, config.foundation.assets) if config.foundation.assets else None


def foundation_meta(config, name: str, semantic_dim: int | None = None) -> dict:
    """Everything the encoder or decoder weights depend on; shipped or cached weights are used only
    while it matches the config asked for."""
    d = config.data
    data = dict(name=d.name, resolution=d.resolution, unbiased_samples=d.unbiased_samples, seed=d.seed,
                tfds_name=d.get("tfds_name", ""))
    if name == "encoder":
        return dict(model=dict(config.encoder.to_dict(), resolution=d.resolution), data=data,
                    seed=config.foundation.seed)
    return dict(model=config.decoder.to_dict(), semantic_dim=semantic_dim or config.encoder.embed_dim,
                schedule=config.schedule.to_dict(), data=data, encoder=config.encoder.to_dict(),
                seed=config.foundation.seed)


def _cached(name: str, template, meta: dict, config, workdir: str, train_fn):
    """Params from the shipped assets or workdir/foundation when made with ``meta``; else trained and exported."""
    from jaxcf.pipelines.foundation import _export, _import

    folders = [f for f in (_assets_dir(config), io.join(workdir, "foundation")) if f]
    for folder in folders:
        params = _import(os.path.join(folder, name), template, meta)
        if params is not None:
            logging.info("didae: %s from %s", name, folder)
            return params
    params = train_fn()
    if jax.process_index() == 0:
        _export(os.path.join(workdir, "foundation", name), params, meta)
    return params


def square_encoder(config, data: DidaeData, workdir: str, mesh):
    """Phi for Square: a CNN trained (BCE) on the 8 binary attributes of unbiased Square."""
    e = config.encoder
    enc = build_model("square_encoder", dict(embed_dim=e.embed_dim, num_attributes=8, width=e.width,
                                             num_stages=e.num_stages, resolution=config.data.resolution), config.dtype)
    from jaxcf.models.encoders import init_params

    def train():
        def loss_fn(params, batch, rng):
            _, logits = enc.apply({"params": params}, batch["image"])
            loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), batch["attributes"]))
            acc = jnp.mean((logits > 0) == (batch["attributes"] > 0.5))
            return loss, {"attribute_accuracy": acc}

        return _fit(init_params(enc, jax.random.key(config.foundation.seed)), loss_fn, data.pool,
                    ("image", "attributes"), e, io.join(workdir, "foundation", "encoder_run"), mesh, config,
                    "foundation: encoder", seed=config.foundation.seed)

    params = _cached("encoder", jax.device_get(init_params(enc, jax.random.key(0))), foundation_meta(config, "encoder"),
                     config, workdir, train)
    return square_encode_fn(enc), params, e.embed_dim


def clip_encoder(config):
    from jaxcf.models.clip import load_clip

    clip, params = load_clip(config.encoder.checkpoint, dtype=compute_dtype(config.dtype))
    return clip_encode_fn(clip), params, clip.config.projection_dim


def build_autoencoder(config, data: DidaeData, workdir: str, mesh):
    """(DiffusionAutoencoder, enc_params, dec_params): Phi and the decoder trained with Phi frozen.

    With ``decoder.standardize_z`` the autoencoder's code is Phi standardised by the pool's
    per-dimension mean and std (stored beside the decoder weights as ``decoder_code``); the
    decoder is conditioned on it and the dictionaries and edits live in that space.
    """
    if config.encoder.kind == "square":
        encode, enc_params, D = square_encoder(config, data, workdir, mesh)
    else:
        encode, enc_params, D = clip_encoder(config)
    dc = config.decoder
    meta = foundation_meta(config, "decoder", D)
    if dc.standardize_z:
        def statistics():
            codes = batched(encode, mesh, config.eval.batch_size)(enc_params, images_of(data.pool))
            return {k: jnp.asarray(v) for k, v in code_statistics(codes).items()}

        template = {"mean": np.zeros(D, np.float32), "std": np.ones(D, np.float32)}
        stats = _cached("decoder_code", template, meta, config, workdir, statistics)
        encode = standardized(encode, np.asarray(stats["mean"]), np.asarray(stats["std"]))
    decoder = decoder_model(config, D)
    sc = config.schedule
    schedule = make_schedule(sc.name, sc.num_train_timesteps, sc.beta_start, sc.beta_end)
    from jaxcf.models.diffae_unet import init_params

    def train():
        init = init_params(decoder, jax.random.key(config.foundation.seed + 1), zero_cond=dc.train.zero_cond)
        return train_eps_model(decoder, schedule, data.pool, dc.train,
                               io.join(workdir, "foundation", "decoder_run"), mesh, seed=config.foundation.seed,
                               log_every=config.log_every, checkpoint_every=config.checkpoint_every,
                               keep=config.keep_checkpoints, desc="foundation: decoder", init_params=init,
                               cond_fn=semantic_cond(encode), frozen=enc_params)

    dec_params = _cached("decoder", jax.device_get(init_params(decoder, jax.random.key(0))), meta, config, workdir,
                         train)
    logging.info("didae: decoder %d parameters", num_params(dec_params))
    ae = DiffusionAutoencoder(decoder, encode, schedule, config.ddim_steps, prediction=dc.train.prediction,
                              clip_x0=dc.clip_x0)
    return ae, enc_params, dec_params


def images_of(ds: ArrayDataset) -> np.ndarray:
    """All images of a dataset as float32 in [-1, 1]."""
    return ds.get(np.arange(len(ds)), keys=("image",))["image"]


# ----------------------------------------------------------------------------- classifiers


class LinearHead(nn.Module):
    """A linear probe on Phi: the DiCap/DiDAE "probe" student."""

    num_outputs: int = 2

    @nn.compact
    def __call__(self, z):
        return nn.Dense(self.num_outputs, name="head")(z)


@dataclasses.dataclass(frozen=True)
class Classifier:
    """``apply(params, x, frozen) -> outputs [B, O]`` with outputs[:, :2] the class logits
    (the oracle appends F factor regressions); ``frozen`` are parameters it uses but never trains."""

    name: str
    apply: Callable
    init: Callable  # rng -> params (not traced)


def student_classifier(config, encode, name: str = "student") -> Classifier:
    s = config.student
    if s.kind == "probe":
        head = LinearHead(2)

        def init(rng, D=None):
            return fast_init(head, jax.ShapeDtypeStruct((1, D), jnp.float32), rng=rng)["params"]

        def apply(params, x, frozen):
            return head.apply({"params": params}, encode(frozen, x))

        return Classifier(name, apply, init)
    widths = [max(1, int(round(64 * 2 ** i * s.width))) for i in range(4)]
    groups = math.gcd(*widths, 8)
    net = build_model("resnet", dict(num_classes=2, stem=s.stem, width=s.width, norm="group", norm_groups=groups),
                      config.dtype)
    from jaxcf.models.resnet import init_variables

    return Classifier(name, lambda params, x, frozen: net.apply({"params": params}, x).astype(jnp.float32),
                      lambda rng, D=None: init_variables(net, rng, config.data.resolution)["params"])


def oracle_classifier(config, num_factors: int) -> Classifier:
    """Trained on balanced data: the model teacher (label head) and the factor regressor (F outputs)."""
    o = config.oracle
    net = build_model("square_encoder", dict(embed_dim=64, num_attributes=2 + num_factors, width=o.width,
                                             num_stages=o.num_stages, resolution=config.data.resolution), config.dtype)
    from jaxcf.models.encoders import init_params

    return Classifier("oracle", lambda params, x, frozen: net.apply({"params": params}, x)[1].astype(jnp.float32),
                      lambda rng, D=None: init_params(net, rng))


def classification_loss(clf: Classifier, adv_eps: float = 0.0, factor_weight: float = 0.0):
    """CE on the label (+ MSE on the factors for the oracle); with adv_eps > 0 half of the loss is on
    FGSM examples x + adv_eps sign(grad_x CE), which makes the adversarially trained surrogate."""

    def ce(params, x, y, frozen):
        out = clf.apply(params, x, frozen)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out[:, :2], y)), out

    def loss_fn(params, batch, rng, frozen=None):
        x, y = batch["image"], batch["label"]
        loss, out = ce(params, x, y, frozen)
        metrics = {"accuracy": jnp.mean(jnp.argmax(out[:, :2], -1) == y)}
        if factor_weight:
            mse = jnp.mean((out[:, 2:] - batch["factors"]) ** 2)
            loss = loss + factor_weight * mse
            metrics["factor_mse"] = mse
        if adv_eps:
            g = jax.grad(lambda xx: ce(params, xx, y, frozen)[0])(x)
            x_adv = jnp.clip(x + adv_eps * jnp.sign(jax.lax.stop_gradient(g)), -1.0, 1.0)
            adv_loss, _ = ce(params, x_adv, y, frozen)
            loss = 0.5 * (loss + adv_loss)
            metrics["adversarial_loss"] = adv_loss
        return loss, metrics

    return loss_fn


class Trainer:
    """Adam + warmup-cosine training of one model and loss, jitted once and reused for every run
    (the CFKD fine-tunes of all dictionaries and teachers share one compiled step)."""

    def __init__(self, loss_fn, tc, mesh, config, *, frozen=None, seed: int | None = None):
        check_batch_divisible(tc.batch_size, mesh, f"config batch_size={tc.batch_size}")
        lr = warmup_cosine(tc.learning_rate, max(1, tc.steps // 20), tc.steps, end_fraction=0.05)
        self.tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
        self.tc, self.mesh, self.config = tc, mesh, config
        self.seed = config.seed if seed is None else seed
        self.frozen_sh = None
        self.frozen = frozen
        if frozen is not None:
            self.frozen_sh = param_shardings(frozen, mesh)  # replicated
            self.frozen = jax.device_put(frozen, self.frozen_sh)
        self.loss_fn = loss_fn
        self.update = None

    def fit(self, params0, workdir: str, desc: str, dataset=None, keys=None, batch_fn=None):
        """Trains from ``params0`` (or resumes from ``workdir``); returns the final params on the host."""
        tc, config = self.tc, self.config
        state, shardings = create_train_state(params0, self.tx, self.seed, self.mesh)
        if self.update is None:
            self.update = jit_update(make_update_fn(self.loss_fn, self.tx), shardings, self.mesh,
                                     frozen_shardings=self.frozen_sh)

        def default_batch_fn(step):
            idx = stream_indices(len(dataset), tc.batch_size, step, self.seed)
            return dataset.get(idx, keys=keys)

        ckpt = Checkpointer(workdir, every=config.checkpoint_every, keep=config.keep_checkpoints)
        writer = MetricWriter(workdir)
        # resumed only with the same settings (the state, data and frozen params are digested by
        # train_loop; the surrogate's adv_eps lives outside its train config)
        key = dict(train=tc.to_dict(), surrogate=config.surrogate.to_dict(), dtype=config.dtype)
        state = train_loop(state, self.update, batch_fn or default_batch_fn, tc.steps, self.mesh, ckpt, writer,
                           log_every=config.log_every, desc=desc, frozen=self.frozen, key=key)
        ckpt.close()
        writer.close()
        return jax.device_get(state.params)


def _fit(params0, loss_fn, dataset, keys, tc, workdir: str, mesh, config, desc: str, frozen=None,
         seed: int | None = None):
    """One training run of ``params0`` on ``dataset[keys]`` (see :class:`Trainer`)."""
    return Trainer(loss_fn, tc, mesh, config, frozen=frozen, seed=seed).fit(params0, workdir, desc, dataset, keys)


def _train_config(base, **overrides):
    import ml_collections

    d = dict(steps=base.steps, batch_size=base.get("batch_size"), learning_rate=base.get("learning_rate"))
    d.update(overrides)
    return ml_collections.ConfigDict(d)


# ----------------------------------------------------------------------------- report helpers


def heatmap_png(matrix, row_names, col_names, path: str, title: str = "") -> None:
    """A labelled heatmap of a small matrix (white = 0, blue = the largest entry) as a PNG."""
    from PIL import Image, ImageDraw

    m = np.asarray(matrix, np.float64)
    cw, ch, lw, th = 90, 28, 80, 40
    im = Image.new("RGB", (lw + cw * m.shape[1] + 10, th + ch * (m.shape[0] + 1) + 10), "white")
    draw = ImageDraw.Draw(im)
    draw.text((4, 4), title, fill="black")
    top = max(float(np.max(np.abs(m))), 1e-12)
    for j, name in enumerate(col_names):
        draw.text((lw + j * cw + 4, th), str(name)[:14], fill="black")
    for i, rname in enumerate(row_names):
        y = th + ch * (i + 1)
        draw.text((4, y + 8), str(rname)[:12], fill="black")
        for j in range(m.shape[1]):
            v = abs(m[i, j]) / top
            colour = (int(255 * (1 - 0.8 * v)), int(255 * (1 - 0.6 * v)), 255)
            draw.rectangle([lw + j * cw, y, lw + (j + 1) * cw - 2, y + ch - 2], fill=colour)
            draw.text((lw + j * cw + 6, y + 8), f"{m[i, j]:.3f}", fill="black")
    buf = BytesIO()
    im.save(buf, format="PNG")
    io.write_bytes(path, buf.getvalue())


def _grid(rows, path):
    from jaxcf.utils.images import save_grid

    save_grid(rows, path, scale=2)


# ----------------------------------------------------------------------------- the run


def run(config, workdir: str, mesh):
    t_start = time.time()
    writer_ok = jax.process_index() == 0
    data = load_data(config)
    F = len(data.factor_names)
    true_factor = data.factor_names.index(config.cfkd.true_factor)
    print(f"didae: data train {len(data.train)} (groups {np.bincount(data.train.arrays['group'], minlength=4)}), "
          f"test {len(data.test)}, pool {len(data.pool)}, fit {len(data.fit)}", flush=True)

    # 1. foundation
    ae, enc_params, dec_params = build_autoencoder(config, data, workdir, mesh)
    # frozen from here on: in the run's compute dtype (bfloat16 when config.dtype says so)
    dtype = compute_dtype(config.dtype)
    enc_params = jax.device_put(frozen_params(enc_params, dtype), replicated(mesh))
    dec_params = jax.device_put(frozen_params(dec_params, dtype), replicated(mesh))
    eb = config.eval.batch_size
    encode = batched(lambda p, x: ae.encode(p, x), mesh, max(eb, 64))
    square = config.data.name == "square"

    # 2. dictionaries on held-out codes
    z_fit = encode(enc_params, images_of(data.fit))
    halves = data.fit.arrays["halves"].astype(np.float32) - 0.5
    dicts = {}
    for kind in config.dictionary.kinds:
        if kind == "procrustes":
            omega, mu = procrustes_dictionary(z_fit, halves)
        else:
            omega, mu = svd_dictionary(z_fit, config.dictionary.num_atoms)
        dicts[kind] = (np.asarray(omega), np.asarray(mu))
    D = z_fit.shape[1]

    # 3. classifiers: poisoned student, adversarial surrogate, balanced oracle
    student = student_classifier(config, ae.encode)
    frozen = enc_params if config.student.kind == "probe" else None
    s_cfg = config.student
    train_keys = ("image", "label")
    student_params0 = student.init(jax.random.key(config.seed + 10), D)
    poisoned = _fit(student_params0, classification_loss(student), data.train, train_keys, s_cfg,
                    io.join(workdir, "student"), mesh, config, "student (poisoned)", frozen=frozen)
    surrogate = _fit(student.init(jax.random.key(config.seed + 11), D),
                     classification_loss(student, adv_eps=config.surrogate.adv_eps), data.train, train_keys,
                     _train_config(s_cfg, steps=config.surrogate.steps), io.join(workdir, "surrogate"), mesh,
                     config, "surrogate (adversarial)", frozen=frozen)
    oracle = oracle_classifier(config, F)
    oracle_params = _fit(oracle.init(jax.random.key(config.seed + 12)),
                         classification_loss(oracle, factor_weight=1.0), data.pool, ("image", "label", "factors"),
                         config.oracle, io.join(workdir, "oracle"), mesh, config, "oracle (balanced)")

    predict_student = batched(lambda p, x, fr: jax.nn.softmax(student.apply(p, x, fr)[:, :2]), mesh, eb)
    predict_oracle = batched(lambda p, x: oracle.apply(p, x, None), mesh, eb)
    test_x, test = images_of(data.test), data.test.arrays

    def evaluate(params):
        pred = np.argmax(predict_student(params, test_x, frozen), -1)
        return dict(aga=cfkd.aga(pred, test["label"], test["group"]),
                    worst_group=cfkd.worst_group_accuracy(pred, test["label"], test["group"]),
                    group_accuracy=cfkd.group_accuracies(pred, test["label"], test["group"]).tolist())

    before = evaluate(poisoned)
    oracle_test = predict_oracle(oracle_params, test_x)
    results = {"pipeline": "didae", "variant": config.variant, "embedding_dim": int(D),
               "controls": autoencoder_controls(config, ae, enc_params, dec_params, data, mesh, workdir)
               if square and config.eval.controls else None,
               "decoder_parameters": num_params(dec_params), "student": config.student.kind,
               "before": before, "oracle_aga": cfkd.aga(np.argmax(oracle_test[:, :2], -1), test["label"],
                                                        test["group"]),
               "surrogate_aga": evaluate(surrogate)["aga"]}
    print(f"didae: poisoned student AGA {before['aga']:.3f} worst {before['worst_group']:.3f}; oracle AGA "
          f"{results['oracle_aga']:.3f}; surrogate AGA {results['surrogate_aga']:.3f}", flush=True)

    # 4. counterfactuals: one compiled program for every linear atom edit
    def cf_fn(params, x, edit):
        enc_p, dec_p = params
        U, V, alpha, mu = edit
        return ae.counterfactuals(enc_p, dec_p, x, lambda z: apply_atom_edits(z, mu, U, V, alpha))[0]

    make_cfs = batched(cf_fn, mesh, eb)

    def generate(x, edit):
        """x' [K, B, ...] for inputs x [B, ...]: encode, invert and decode all K atoms in one call."""
        return make_cfs((enc_params, dec_params), x, tuple(jnp.asarray(a, jnp.float32) for a in edit), axis=1)

    eval_idx = np.arange(min(config.eval.num_inputs, len(data.test)))
    eval_x = test_x[eval_idx]
    # warm up (compile) once so the CF/s below measure generation, not compilation
    t0 = time.time()
    generate(eval_x[:1], (*reflection_edit(jnp.asarray(dicts[config.dictionary.kinds[0]][0])),
                          dicts[config.dictionary.kinds[0]][1]))
    results["compile_seconds"] = round(time.time() - t0, 1)

    def factors_of(x):  # the oracle's factor estimates, clipped to the factors' range [0, 1]
        return np.clip(predict_oracle(oracle_params, x)[:, 2:], 0.0, 1.0)

    factor_before = factors_of(eval_x)
    train_x = images_of(data.train)
    pred_train = np.argmax(predict_student(poisoned, train_x, frozen), -1)
    correct = np.flatnonzero(pred_train == data.train.arrays["label"])
    cf_idx = correct[:config.cfkd.num_inputs]
    cf_x = train_x[cf_idx]
    cf_y = data.train.arrays["label"][cf_idx]
    p_student_src = pred_train[cf_idx]
    cf_factors = square_factors(data.train)[cf_idx] if square else None
    target = 1 - p_student_src

    def student_flips(x_cf):  # [K, B] student p(target | x') >= 0.51 (and the surrogate's probabilities)
        p_s = np.stack([predict_student(poisoned, xk, frozen)[np.arange(len(cf_x)), target] for xk in x_cf])
        p_sur = np.stack([predict_student(surrogate, xk, frozen)[np.arange(len(cf_x)), target] for xk in x_cf])
        return p_s, p_sur

    def kept(flipped, valid, is_true):
        """Which counterfactuals CFKD adds: flipped ones (cfkd.only_flipped) of valid atoms, and
        "true" ones only with cfkd.add_true (the official code adds only "false" ones)."""
        keep = flipped if config.cfkd.only_flipped else np.broadcast_to(valid[:, None], flipped.shape)
        return keep & (~is_true if not config.cfkd.add_true else True)

    # train-set codes for distillation (Algorithm 2, step 1): the student's hard labels
    z_train = encode(enc_params, train_x)
    z_cf = z_train[cf_idx]  # the codes of the counterfactual inputs (for the edit lengths)
    rows, per_dict = [], {}
    finetune = _finetuner(config, student, poisoned, data.train, evaluate, workdir, mesh, frozen)
    for kind, (omega, mu) in dicts.items():
        out = {}
        # 4a. what each atom changes: reflections, judged by the oracle factor regressor
        x_ref = generate(eval_x, (*reflection_edit(jnp.asarray(omega)), mu))
        f_after = np.stack([factors_of(xk) for xk in x_ref])
        matrix = cfkd.disentanglement_matrix(factor_before, f_after)
        if square:  # the same question asked of the pixels (a model-free reader; cannot be fooled)
            out["disentanglement_matrix_reader"] = controls.reader_disentanglement(eval_x, x_ref).tolist()
        # the preclustered teacher labels atoms once: a Procrustes atom by construction (atom k was
        # fitted to factor k), an SVD atom by the factor its reflection changes most
        atom_true = (np.arange(len(matrix)) == true_factor) if kind == "procrustes" else \
            cfkd.preclustered_atom_labels(matrix, true_factor)
        out["disentanglement_matrix"] = matrix.tolist()
        out["atom_is_true"] = atom_true.tolist()
        atom_names = [f"atom {k} ({data.factor_names[k] if kind == 'procrustes' else 'svd'})"
                      for k in range(len(matrix))]
        if writer_ok:
            io.write_json(io.join(workdir, f"disentanglement_{kind}.json"),
                          dict(dictionary=kind, factors=list(data.factor_names), atoms=atom_names,
                               mean_abs_change=matrix.tolist(), atom_is_true=atom_true.tolist(),
                               note="rows: atoms (reflection edits); columns: mean |oracle factor change|, clipped "
                                    "factors scaled to [0, 1]"))
            heatmap_png(matrix, atom_names, data.factor_names, io.join(workdir, f"disentanglement_{kind}.png"),
                        title=f"{kind}: mean |factor change| per atom reflection")
            g = min(config.eval.grid_examples, len(eval_x))
            _grid([eval_x[:g]] + [x_ref[k, :g] for k in range(len(x_ref))], io.join(workdir, f"atoms_{kind}.png"))

        # 4b. Algorithm 2 for the student, on the examples it gets right
        w = cfkd.distill_probe(z_train - mu, pred_train)
        out["probe_agreement"] = cfkd.probe_agreement(z_train - mu, w, pred_train)
        (U, V, alpha), valid = boundary_edit(jnp.asarray(w), jnp.asarray(omega), config.edit.lam,
                                             config.edit.guard, config.edit.min_alignment)
        t0 = time.time()
        x_cf = generate(cf_x, (U, V, alpha, mu))
        seconds = time.time() - t0
        K = x_cf.shape[0]
        out["cf_per_second"] = K * len(cf_x) / seconds
        p_s, p_sur = student_flips(x_cf)
        valid = np.asarray(valid)
        out["atoms_skipped"] = int(np.sum(~valid))
        out["edit_length"] = edit_lengths(z_cf, (U, V, alpha, mu), z_fit).tolist()
        out["flip_rate"] = cfkd.flip_rate(p_s[valid])
        out["nafr"] = cfkd.nafr(p_s[valid], p_sur[valid])
        out["flip_rate_per_atom"] = [cfkd.flip_rate(p_s[k]) for k in range(K)]
        flipped = cfkd.flips(p_s) & valid[:, None]
        if writer_ok:
            g = min(config.eval.grid_examples, len(cf_x))
            _grid([cf_x[:g]] + [x_cf[k, :g] for k in range(K)], io.join(workdir, f"counterfactuals_{kind}.png"))
            save_counterfactuals(io.join(workdir, f"counterfactuals_{kind}.npz"), cf_x, x_cf, cf_y, cf_factors, flipped)

        # 5. teachers and CFKD
        oracle_cf = np.stack([np.argmax(predict_oracle(oracle_params, xk)[:, :2], -1) for xk in x_cf])
        oracle_x = np.argmax(predict_oracle(oracle_params, cf_x)[:, :2], -1)
        for teacher in config.cfkd.teachers:
            if teacher == "preclustered":
                is_true, labels = cfkd.preclustered_labels(atom_true, cf_y)
            else:
                is_true, labels = cfkd.model_teacher_labels(oracle_x, oracle_cf, cf_y)
            keep = kept(flipped, valid, is_true)
            x_add, y_add = cfkd.counterfactual_training_set(x_cf, labels, keep)
            tag = f"{kind}_{teacher}"
            after = finetune(tag, x_add, y_add) if len(y_add) else None
            row = dict(dictionary=kind, teacher=teacher, counterfactuals=int(len(y_add)),
                       true=int(np.sum(is_true & keep)), false=int(np.sum(~is_true & keep)))
            if after is not None:
                row.update(aga=after["aga"], worst_group=after["worst_group"],
                           gain=cfkd.gain(before["aga"], after["aga"]), group_accuracy=after["group_accuracy"])
            rows.append(row)
            print(f"didae: CFKD {tag}: {row}", flush=True)
        per_dict[kind] = out

    if square and config.cfkd.ground_truth:
        # control: the same loop fed with perfect counterfactuals (each input re-rendered with
        # factor k moved to its other half; the preclustered teacher's labels are exact here)
        x_gt = controls.ground_truth_counterfactuals(cf_factors, config.data.resolution, config.seed)
        p_s, _ = student_flips(x_gt)
        flipped, valid = cfkd.flips(p_s), np.ones(len(x_gt), bool)
        is_true, labels = cfkd.preclustered_labels(np.arange(len(x_gt)) == true_factor, cf_y)
        keep = kept(flipped, valid, is_true)
        x_add, y_add = cfkd.counterfactual_training_set(x_gt, labels, keep)
        if writer_ok:
            save_counterfactuals(io.join(workdir, "counterfactuals_ground_truth.npz"), cf_x, x_gt, cf_y, cf_factors,
                                 flipped)
        after = finetune("ground_truth", x_add, y_add) if len(y_add) else None
        row = dict(dictionary="ground truth", teacher="preclustered", counterfactuals=int(len(y_add)),
                   true=int(np.sum(is_true & keep)), false=int(np.sum(~is_true & keep)),
                   flip_rate=cfkd.flip_rate(p_s))
        if after is not None:
            row.update(aga=after["aga"], worst_group=after["worst_group"], gain=cfkd.gain(before["aga"], after["aga"]),
                       group_accuracy=after["group_accuracy"])
        rows.append(row)
        print(f"didae: CFKD with ground-truth counterfactuals: {row}", flush=True)

    # projection baseline: a probe on Phi with the non-causal atoms projected out
    z_test = encode(enc_params, test_x)
    y_train = data.train.arrays["label"]
    baseline = {}
    for kind, (omega, mu) in dicts.items():
        Q = omega[:, ~np.asarray(per_dict[kind]["atom_is_true"])]
        for name, f in (("probe", lambda z: z - mu), ("projection", lambda z: project_out(z - mu, Q))):
            w, b = cfkd.fit_linear_probe(np.asarray(f(z_train)), y_train, bias=True)
            pred = (np.asarray(f(z_test)) @ np.asarray(w) + float(b) > 0).astype(np.int32)
            baseline[f"{name}_{kind}"] = dict(aga=cfkd.aga(pred, test["label"], test["group"]),
                                              worst_group=cfkd.worst_group_accuracy(pred, test["label"],
                                                                                    test["group"]))
    results.update(dictionaries=per_dict, cfkd=rows, baselines=baseline,
                   seconds=round(time.time() - t_start, 1), cf_inputs=int(len(cf_x)))
    from jaxcf.utils import compile_cache

    results["timing"] = compile_cache.timings()  # XLA compilation (or cache loads) vs the rest, in seconds
    if writer_ok:
        write_report(results, workdir)
    return results


def square_factors(ds: ArrayDataset) -> np.ndarray:
    """The integer Square factors [N, 4] of a split (stored scaled to [0, 1])."""
    from jaxcf.data.square import FACTOR_RANGE

    return np.rint(ds.arrays["factors"] * FACTOR_RANGE).astype(np.int32)


def edit_lengths(z, edit, z_fit) -> np.ndarray:
    """Mean ||z'_k - z|| per atom [K] in units of the codes' spread, the RMS distance of the fit
    codes from their mean: 2 or more means an edit leaves the region the codes occupy."""
    U, V, alpha, mu = (jnp.asarray(a, jnp.float32) for a in edit)
    dz = apply_atom_edits(jnp.asarray(z), mu, U, V, alpha) - jnp.asarray(z)[None]  # [K, B, D]
    spread = np.sqrt(np.mean(np.sum((z_fit - z_fit.mean(0)) ** 2, axis=1)))
    return np.asarray(jnp.linalg.norm(dz, axis=-1).mean(1)) / spread


def save_counterfactuals(path: str, x, x_cf, labels, factors, flipped) -> None:
    """One counterfactual set as .npz: inputs [B, ...] and counterfactuals [K, B, ...] as uint8,
    source labels, the inputs' factors (Square) and which counterfactuals flipped the student."""
    to_u8 = lambda a: np.clip(np.rint((np.asarray(a) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    arrays = dict(inputs=to_u8(x), counterfactuals=to_u8(x_cf), labels=np.asarray(labels),
                  flipped=np.asarray(flipped))
    if factors is not None:
        arrays["factors"] = np.asarray(factors)
    buf = BytesIO()
    np.savez_compressed(buf, **arrays)
    io.write_bytes(path, buf.getvalue())


def autoencoder_controls(config, ae, enc_params, dec_params, data: DidaeData, mesh, workdir: str) -> dict:
    """Identity / fresh-noise / ground-truth-swap controls on the first eval inputs of the test set,
    read by the pixel reader (:mod:`jaxcf.didae.controls`); a PNG of them in the workdir."""
    eb = config.eval.batch_size
    encode = batched(lambda p, x: ae.encode(p[0], x), mesh, eb)
    invert = batched(lambda p, xz: ae.invert(p[1], xz[0], xz[1]), mesh, eb)
    decode = batched(lambda p, xz: ae.decode(p[1], xz[0], xz[1]), mesh, eb)
    params = (enc_params, dec_params)
    n = min(config.eval.num_inputs, len(data.test))
    x = images_of(data.test)[:n]
    out = controls.generator_controls(
        x, square_factors(data.test)[:n], lambda x: encode(params, x), lambda x, z: invert(params, (x, z)),
        lambda x_T, z: decode(params, (x_T, z)), seed=config.seed)
    images = out.pop("images")
    if jax.process_index() == 0:
        g = min(config.eval.grid_examples, n)
        names = ["input", "reconstruction", "fresh_noise"] + [f"{p}_{f}" for f in controls.FACTOR_NAMES
                                                              for p in ("target", "swap")]
        _grid([images[k][:g] for k in names], io.join(workdir, "controls.png"))
    print(f"didae: controls (pixel reader, mean |error|): identity {out['identity']}, fresh noise "
          f"{out['fresh_noise']}, swap moved (median fraction) "
          f"{ {k: round(v['moved_fraction_median'], 2) for k, v in out['swap'].items()} }", flush=True)
    return out


def _finetuner(config, student: Classifier, poisoned, x_orig: ArrayDataset, evaluate: Callable, workdir: str, mesh,
               frozen):
    """``finetune(tag, x_cf, y_cf) -> evaluate(params)``: CFKD fine-tuning of the poisoned student on
    a ``cfkd.mix`` share of counterfactuals per batch, resumable in workdir/cfkd_<tag>_<key>."""
    c = config.cfkd
    trainer = Trainer(classification_loss(student), c, mesh, config, frozen=frozen)

    def finetune(tag, x_cf, y_cf):
        def batch_fn(step):
            io_, ic = cfkd.mixed_batch_indices(len(x_orig), len(y_cf), c.batch_size, step, config.seed, c.mix)
            b = x_orig.get(io_, keys=("image", "label"))
            x = np.concatenate([b["image"], x_cf[ic]])
            y = np.concatenate([b["label"], y_cf[ic]]).astype(np.int32)
            pc, pi = jax.process_count(), jax.process_index()
            local = len(y) // pc
            return {"image": x[pi * local:(pi + 1) * local], "label": y[pi * local:(pi + 1) * local]}

        # the checkpoint folder is keyed by the counterfactual set, so a rerun with other
        # counterfactuals fine-tunes afresh instead of resuming a stale run
        key = hashlib.sha1(np.ascontiguousarray(x_cf).tobytes() + np.ascontiguousarray(y_cf).tobytes()).hexdigest()[:10]
        return evaluate(trainer.fit(poisoned, io.join(workdir, f"cfkd_{tag}_{key}"), f"CFKD {tag}", batch_fn=batch_fn))

    return finetune


def write_report(results: dict, workdir: str) -> None:
    """results.json and a markdown table a person can read."""
    io.write_json(io.join(workdir, "results.json"), results)
    b = results["before"]
    lines = [f"# DiDAE + CFKD ({results['variant']}, student: {results['student']})", "",
             "| method | AGA | worst group | Gain | CFs used (true/false) |", "|---|---|---|---|---|",
             f"| poisoned student | {b['aga']:.3f} | {b['worst_group']:.3f} | - | - |"]
    for r in results["cfkd"]:
        if "aga" in r:
            lines.append(f"| CFKD {r['dictionary']} + {r['teacher']} teacher | {r['aga']:.3f} | "
                         f"{r['worst_group']:.3f} | {r['gain']:.3f} | {r['counterfactuals']} "
                         f"({r['true']}/{r['false']}) |")
        else:
            lines.append(f"| CFKD {r['dictionary']} + {r['teacher']} teacher | - | - | - | 0 (nothing flipped) |")
    for name, m in results["baselines"].items():
        lines.append(f"| {name.replace('_', ' (')}) probe on Phi | {m['aga']:.3f} | {m['worst_group']:.3f} | - | - |")
    lines += ["", f"oracle (balanced) AGA {results['oracle_aga']:.3f}; adversarial surrogate AGA "
                  f"{results['surrogate_aga']:.3f}", "",
              "| dictionary | flip rate | NAFR | CF/s | probe agreement | atoms labelled true |", "|---|---|---|---|---|---|"]
    for kind, d in results["dictionaries"].items():
        lines.append(f"| {kind} | {d['flip_rate']:.3f} | {d['nafr']:.3f} | {d['cf_per_second']:.1f} | "
                     f"{d['probe_agreement']:.3f} | {d['atom_is_true']} |")
    names = controls.FACTOR_NAMES  # the reader's columns (Square)
    for kind, d in results["dictionaries"].items():
        if "disentanglement_matrix_reader" in d:
            lines += ["", f"{kind} atoms (reflections), mean |factor change| read from pixels / factor range:", "",
                      "| atom | " + " | ".join(names) + " | edit length (Alg. 2, x code spread) |", "|---" * 6 + "|"]
            for k, row in enumerate(d["disentanglement_matrix_reader"]):
                length = d["edit_length"][k] if k < len(d.get("edit_length", [])) else float("nan")
                lines.append(f"| {k} | " + " | ".join(f"{v:.3f}" for v in row) + f" | {length:.2f} |")
    c = results.get("controls")
    if c:
        lines += ["", "Autoencoder controls, read by the pixel reader (colours 0..255, positions in 64-px units):", "",
                  "| control | " + " | ".join(names) + " |", "|---" * 5 + "|"]
        for key, label in (("identity", "reconstruction, mean abs error"), ("fresh_noise", "fresh-noise sample, mean abs error")):
            lines.append(f"| {label} | " + " | ".join(f"{c[key][n]:.1f}" for n in names) + " |")
        for n in names:
            sw = c["swap"][n]
            cells = [f"moved {sw['moved_fraction_median']:.2f}" if m == n else f"{sw['others'][m]:.1f}" for m in names]
            lines.append(f"| ground-truth swap of {n} | " + " | ".join(cells) + " |")
    lines += ["", f"total {results['seconds']} s (compile of the counterfactual program {results['compile_seconds']} s)"]
    text = "\n".join(lines) + "\n"
    io.write_text(io.join(workdir, "results.md"), text)
    print(text, flush=True)
