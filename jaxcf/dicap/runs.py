"""What every DiCap pipeline (classification, retrieval, VQA) shares: the action step run over a
set of images in sharded batches and cached in the workdir, and the per-seed summary."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxcf.dicap.counterfactuals import clip_zero_shot_log_prob, generate_counterfactuals, sample_target_classes
from jaxcf.dicap.noise_aware import noise_aware_log_prob
from jaxcf.foundation import Foundation
from jaxcf.train import check_batch_divisible, tree_digest
from jaxcf.train.batched import batched
from jaxcf.utils import io, user_cache


def anti_causal_log_prob(found: Foundation, cfg, clip_params, nac_params, text_feats, classes=None, source=None):
    """p_phi of ``cfg.guide_on`` (``config.counterfactual``) as ``log_prob(x, t, y)``: the foundation's
    noise-aware classifier on x_t over ``classes`` (foundation indices; None = all) for "xt" (told the
    non-causal content of the ``source`` images when it was trained with context), frozen CLIP
    zero-shot with ``text_feats`` on x0_hat for "x0"; None for "implicit" (the classifier implied by
    the class-conditional diffusion model needs none)."""
    if cfg.guide_on == "implicit":
        return None
    if cfg.guide_on == "xt":
        return noise_aware_log_prob(found.noise_classifier, nac_params, classes, source=source)
    return clip_zero_shot_log_prob(found.clip, clip_params, text_feats, found.to_clip, cfg.logit_scale)


def counterfactuals(found: Foundation, x: np.ndarray, y_cf: np.ndarray, text_feats, cfg, mesh, desc: str,
                    param_sharding: str = "replicated", class_names=None):
    """Counterfactuals of x [N, H, W, 3] toward y_cf [N] (indices into ``class_names``), generated in
    sharded batches. The anti-causal predictor: frozen CLIP zero-shot on x0_hat (guide_on="x0"),
    the foundation's noise-aware classifier on x_t ("xt"), restricted to ``class_names``, or the
    classifier implied by the foundation's class-conditional diffusion model ("implicit")."""
    check_batch_divisible(cfg.batch_size, mesh, "config.counterfactual.batch_size")
    classes = None
    if cfg.guide_on in ("xt", "implicit") and class_names is not None:  # the foundation's indices of these classes
        classes = [found.class_index(n) for n in class_names]

    def gen(params, xy, text_feats):
        dp, clip_params, nac_params = params
        y = xy[1]
        if cfg.guide_on == "implicit" and classes is not None:
            y = jnp.asarray(classes, jnp.int32)[y]
        lp = anti_causal_log_prob(found, cfg, clip_params, nac_params, text_feats, classes, source=xy[0])
        enc = None if found.encode is None else (lambda im: found.encode(dp, im))
        dec = None if found.decode is None else (lambda z: found.decode(dp, z))
        return generate_counterfactuals(found.eps_fn(dp), lp, xy[0], y, cfg.scale, found.schedule,
                                        cfg.ddim_steps, cfg.depth, encode=enc, decode=dec, guide_on=cfg.guide_on,
                                        mask_threshold=cfg.mask_threshold if cfg.mask == "edit" else None,
                                        mask_dilation=cfg.mask_dilation,
                                        normalize_gradient=bool(cfg.get("normalize_gradient", False)))

    run = batched(gen, mesh, cfg.batch_size, param_sharding=param_sharding, desc=desc)
    x_cf = run((found.diffusion_params, found.clip_params, found.noise_classifier_params),
               (x, np.asarray(y_cf, np.int32)), text_feats)
    return np.clip(x_cf, -1.0, 1.0)


def counterfactual_key(config, seed: int, x, text_feats, foundation_digest: str) -> str:
    """Everything that shapes a seed's counterfactuals, hashed: the counterfactual settings (all of
    ``config.counterfactual`` but its batch size: guidance scale, depth, steps, target, template,
    logit scale, ...), the dtype, the foundation weights, the class text features and the shots."""
    cf = {k: v for k, v in config.counterfactual.to_dict().items() if k != "batch_size"}
    parts = dict(seed=seed, counterfactual=cf, dtype=config.dtype, foundation=foundation_digest,
                 text_features=tree_digest(np.asarray(text_feats)), shots=tree_digest(x))
    return _digest(parts, 16)


def cached_counterfactuals(found, x, y, text_feats, config, seed, workdir, mesh, foundation_digest: str,
                           class_names=None):
    """(x_cf, y_cf), from ``workdir/counterfactuals/*.npz`` or the user cache
    (:mod:`jaxcf.utils.user_cache`) when the same settings made them before (the file name holds
    :func:`counterfactual_key`); computed and written to both otherwise."""
    cf = config.counterfactual
    key = counterfactual_key(config, seed, x, text_feats, foundation_digest)
    name = f"seed{seed}_{cf.target}_s{cf.scale:g}_{key}.npz"
    path = io.join(workdir, "counterfactuals", name)
    shared = user_cache.path("counterfactuals", name)
    for p in filter(None, (path, shared)):
        if io.exists(p):
            z = io.read_npz(p)
            if z["x"].shape == x.shape and np.array_equal(z["x"], x):
                if p != path and io.is_writer():
                    io.write_npz(path, x=x, x_cf=z["x_cf"], y_cf=z["y_cf"])
                return z["x_cf"], z["y_cf"]
    y_cf = np.asarray(sample_target_classes(jnp.asarray(y), text_feats, cf.target, jax.random.key(seed + 17)))
    x_cf = counterfactuals(found, x, y_cf, text_feats, cf, mesh, desc=f"counterfactuals (seed {seed})",
                           param_sharding=config.param_sharding, class_names=class_names)
    if io.is_writer():
        io.write_npz(path, x=x, x_cf=x_cf, y_cf=y_cf)
        if shared:
            try:
                io.write_npz(shared, x=x, x_cf=x_cf, y_cf=y_cf)
            except OSError as e:  # a read-only or full home folder costs only the reuse
                logging.warning("counterfactuals not written to the user cache %s: %s", shared, e)
    return x_cf, y_cf


def mean_std(rows, key):
    """{"mean", "std"} of ``row[key]`` over the per-seed rows (std with ddof=1; 0 for one seed)."""
    v = np.array([r[key] for r in rows], np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def foundation_digest(found: Foundation) -> str:
    """A digest of the foundation's weights and schedule: keys the counterfactual and prompt caches."""
    weights = (found.clip_params, found.diffusion_params, found.schedule)
    if found.noise_classifier_params is not None:
        weights += (found.noise_classifier_params,)
    return tree_digest(weights)


def prompt_run_dir(config, seed: int, method: str, foundation_digest: str) -> str:
    """A folder name per prompt-learning run (``seed{seed}_{method}_{digest}``): a rerun with other
    settings must not resume it. CoOp ignores lambda; DiCap depends on the generator's settings;
    "dicap_gt" (ground-truth counterfactuals) does not."""
    parts = {"seed": seed, "train": config.train.to_dict(), "prompt": config.prompt.to_dict(),
             "data": config.data.to_dict(), "foundation": foundation_digest, "dtype": config.dtype}
    if method == "coop":
        parts["train"].pop("lam")
        parts["train"].pop("cf_ce", None)
    elif method == "dicap":
        parts["counterfactual"] = config.counterfactual.to_dict()
    elif method == "dicap_gt":
        parts["counterfactual"] = "ground_truth"
    return f"seed{seed}_{method}_{_digest(parts, 10)}"


def _digest(parts: dict, length: int) -> str:
    """The first ``length`` hex digits of the SHA-1 of ``parts`` as sorted JSON (a cache key)."""
    import hashlib

    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:length]
