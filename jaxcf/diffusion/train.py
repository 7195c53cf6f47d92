"""Training a denoiser (an eps-, v- or x0-predicting network) with :func:`denoising_loss`.

Used by the diffusion pipeline, the toy foundation's pixel UNet and DiDAE's DiffAE decoder. The
loss is a mean over examples, so on several data-parallel devices its gradient is taken per shard
and summed in one flat all-reduce (:func:`jaxcf.train.per_shard_value_and_grad`: each device draws
its own timesteps and noise).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf.diffusion.losses import denoising_loss
from jaxcf.train import stream_indices, tree_digest
from jaxcf.train.fit import adam_warmup_cosine, fit


def train_eps_model(model, schedule, dataset, train_cfg, workdir: str, mesh, config, *, seed: int,
                    desc: str = "diffusion", init_params=None, cond_fn=None, frozen=None, label_dropout=None):
    """Trains ``model`` (``apply(x_t, t, *cond)``) on ``dataset`` images; returns the EMA params.

    Resumes from ``workdir/checkpoints`` if present. ``train_cfg``: steps, batch_size,
    learning_rate, warmup_steps, ema_decay, optional weights ("ema", the default, or "final": the
    last iterate instead of the average) and prediction ("eps", the default, "v" or "x0": what the
    network outputs; :func:`jaxcf.diffusion.as_eps_fn` turns it into eps for sampling) and max_t (train
    on t < max_t only; 0 or absent: every level).
    ``init_params``: ready-made params or a traceable ``rng -> params`` (default
    :func:`jaxcf.models.init.fast_init` on an unconditional input); ``cond_fn`` and ``frozen`` as
    in :func:`denoising_loss`. ``config``: the run's checkpoint / logging / sharding fields
    (:func:`jaxcf.train.fit.fit`).
    ``label_dropout=(p, null)``: a class-conditional model ``apply(x_t, t, labels)``: each batch
    carries the dataset's labels, each replaced by the null class ``null`` with probability p (the
    conditional and unconditional model in one network, for classifier-free / implicit guidance).
    """
    from jaxcf.models.init import fast_init

    res = dataset.get([0])["image"].shape[1:]
    if init_params is None:  # flax's default distributions in one draw (model.init compiles for minutes on CPU)
        labels = () if label_dropout is None else (jax.ShapeDtypeStruct((1,), jnp.int32),)  # class-conditional
        init_params = fast_init(model, jax.ShapeDtypeStruct((1,) + res, jnp.float32),
                                jax.ShapeDtypeStruct((1,), jnp.int32), *labels, rng=jax.random.key(seed))["params"]
    tx = adam_warmup_cosine(train_cfg.learning_rate, train_cfg.warmup_steps, train_cfg.steps, end_fraction=0.1)
    if label_dropout is not None:
        if cond_fn is not None:
            raise ValueError("train_eps_model: label_dropout and cond_fn are exclusive")
        cond_fn = lambda batch: (batch["label"],)  # noqa: E731
    loss_fn = denoising_loss(model, schedule, cond_fn, train_cfg.get("prediction", "eps"),
                             train_cfg.get("max_t") or None)

    def batch_fn(step):
        idx = stream_indices(len(dataset), train_cfg.batch_size, step, seed)
        if label_dropout is None:
            return {"image": dataset.get(idx, keys=("image",))["image"]}
        b = dataset.get(idx, keys=("image", "label"))
        p, null = label_dropout
        drop = np.random.default_rng([seed, step]).random(len(idx)) < p  # a pure function of the step: resumable
        return {"image": b["image"], "label": np.where(drop, null, b["label"]).astype(np.int32)}

    key = dict(train=train_cfg.to_dict(), schedule=tree_digest(schedule), model=type(model).__name__,
               dtype=str(getattr(model, "dtype", "")), conditioned=cond_fn is not None)
    if label_dropout is not None:
        key["label_dropout"] = list(label_dropout)
    state = fit(init_params, tx, loss_fn, batch_fn, steps=train_cfg.steps, batch_size=train_cfg.batch_size,
                workdir=workdir, mesh=mesh, config=config, seed=seed, desc=desc, frozen=frozen,
                ema_decay=train_cfg.ema_decay, key=key, batch_field="train.batch_size",
                per_shard=True)  # the denoising loss is a mean over examples
    return state.ema_params if train_cfg.get("weights", "ema") == "ema" else state.params
