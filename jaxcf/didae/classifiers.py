"""The classifiers of DiDAE / CFKD (METHODS.md §2.5-2.7): the poisoned student (a ResNet or a
linear probe on Phi), its adversarially trained surrogate (FGSM, for NAFR), the oracle trained on
balanced data (the model teacher and the factor regressor), and their one training rule."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcf.models.init import fast_init
from jaxcf.models.registry import build_model
from jaxcf.train import stream_indices
from jaxcf.train.fit import adam_warmup_cosine, fit


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
    """``config.student.kind``: "probe" (a linear head on ``encode``'s codes) or "resnet18"."""
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


def fgsm(loss, x, adv_eps: float):
    """The fast-gradient-sign example x + adv_eps sign(grad_x loss(x)), clipped to the image range."""
    g = jax.grad(loss)(x)
    return jnp.clip(x + adv_eps * jnp.sign(jax.lax.stop_gradient(g)), -1.0, 1.0)


def classification_loss(clf: Classifier, adv_eps: float = 0.0, factor_weight: float = 0.0):
    """CE on the label (+ MSE on the factors for the oracle); with adv_eps > 0 half of the loss is on
    :func:`fgsm` examples, which makes the adversarially trained surrogate."""

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
            x_adv = fgsm(lambda xx: ce(params, xx, y, frozen)[0], x, adv_eps)
            adv_loss, _ = ce(params, x_adv, y, frozen)
            loss = 0.5 * (loss + adv_loss)
            metrics["adversarial_loss"] = adv_loss
        return loss, metrics

    return loss_fn


def classifier_optimizer(tc, optim) -> optax.GradientTransformation:
    """Adam, warmup over ``optim.warmup_fraction`` of ``tc.steps`` (at least one step), cosine
    decay to ``optim.end_fraction`` of ``tc.learning_rate``."""
    warmup = max(1, math.floor(tc.steps * optim.warmup_fraction + 1e-6))
    return adam_warmup_cosine(tc.learning_rate, warmup, tc.steps, end_fraction=optim.end_fraction)


def train_classifier(params0, loss_fn, tc, workdir: str, mesh, config, desc: str, *, section: str, dataset=None,
                     keys=None, batch_fn=None, frozen=None, seed: int | None = None, tx=None):
    """Trains ``params0`` on ``dataset[keys]`` (or ``batch_fn(step)``) with ``tc`` (steps,
    batch_size, learning_rate; ``config.<section>`` in messages); resumes from ``workdir``;
    returns the final params on the host.

    Runs that share ``loss_fn`` and ``tx`` share one compiled step (the CFKD fine-tunes)."""
    seed = config.seed if seed is None else seed
    tx = classifier_optimizer(tc, config.optim) if tx is None else tx

    def dataset_batch(step):
        return dataset.get(stream_indices(len(dataset), tc.batch_size, step, seed), keys=keys)

    # resumed only with the same settings (the state, data and frozen params are digested by
    # train_loop; the surrogate's adv_eps lives outside its train config)
    key = dict(train=tc.to_dict(), surrogate=config.surrogate.to_dict(), optim=config.optim.to_dict(),
               dtype=config.dtype)
    state = fit(params0, tx, loss_fn, batch_fn or dataset_batch, steps=tc.steps, batch_size=tc.batch_size,
                workdir=workdir, mesh=mesh, config=config, seed=seed, desc=desc, frozen=frozen, key=key,
                batch_field=f"{section}.batch_size")
    return jax.device_get(state.params)


def cfkd_finetuner(config, student: Classifier, poisoned, x_orig, evaluate: Callable, workdir: str, mesh, frozen):
    """``finetune(tag, x_cf, y_cf) -> evaluate(params)``: CFKD fine-tuning of the poisoned student on
    a ``cfkd.mix`` share of counterfactuals per batch (:func:`jaxcf.didae.cfkd.mixed_batch_indices`),
    resumable in workdir/cfkd_<tag>_<key>; every fine-tune shares one compiled step."""
    from jaxcf.didae import cfkd
    from jaxcf.utils import io

    c = config.cfkd
    loss_fn, tx = classification_loss(student), classifier_optimizer(c, config.optim)

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
        params = train_classifier(poisoned, loss_fn, c, io.join(workdir, f"cfkd_{tag}_{key}"), mesh, config,
                                  f"CFKD {tag}", section="cfkd", batch_fn=batch_fn, frozen=frozen, tx=tx)
        return evaluate(params)

    return finetune
