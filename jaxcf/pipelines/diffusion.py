"""Pixel-space diffusion: train an eps-model, then check DDIM abduction (invert -> sample) on it.

The denoiser training is :func:`jaxcf.diffusion.train.train_eps_model` (also used by DiCap's toy
foundation and DiDAE's decoder); this pipeline runs it alone:
``python -m jaxcf.main --config=configs/diffusion.py:square_tiny --workdir=DIR``.
Outputs in the workdir: metrics.jsonl, checkpoints/, samples.png, reconstructions.png, results.json.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging

from jaxcf import configs as cfgs
from jaxcf.data.common import get_dataset
from jaxcf.diffusion import SCHEDULES, ddim_invert, ddim_sample, make_schedule
from jaxcf.diffusion.train import train_eps_model
from jaxcf.models.registry import build_model
from jaxcf.train import data_sharding, replicated, to_host
from jaxcf.utils import io
from jaxcf.utils.images import save_grid


def validate(config) -> None:
    cfgs.check_int(config, "train.steps", 1)
    cfgs.check_int(config, "train.batch_size", 1)
    cfgs.check_range(config, "train.learning_rate", 0.0, 1.0, low_open=True)
    cfgs.check_range(config, "train.ema_decay", 0.0, 1.0, high_open=True)
    cfgs.check_choice(config, "schedule.name", SCHEDULES)
    cfgs.check_int(config, "schedule.num_train_timesteps", 2)
    cfgs.check_int(config, "eval.ddim_steps", 1)
    cfgs.check_int(config, "eval.num_images", 1)
    cfgs.check_range(config, "eval.depth", 0.0, 1.0, low_open=True)
    cfgs.check_int(config, "eval.sample_seed_offset", 0)
    if config.eval.ddim_steps > config.schedule.num_train_timesteps * config.eval.depth - 1:
        raise cfgs.ConfigError(f"config.eval.ddim_steps={config.eval.ddim_steps} exceeds the timesteps available at "
                               f"depth {config.eval.depth} of T={config.schedule.num_train_timesteps}")
    build_model(config.model.name, config.model.config, config.dtype)  # unknown name or field -> ConfigError


def make_codec(model, schedule, num_steps: int, depth: float, mesh):
    """Jitted ``invert(params, x0) -> x_T`` and ``sample(params, x_T) -> x0`` sharded over the data axis."""

    def eps_fn(params):
        return lambda x, t, cond: model.apply({"params": params}, x, t)

    shard = dict(in_shardings=(replicated(mesh), data_sharding(mesh)), out_shardings=data_sharding(mesh))
    invert = jax.jit(lambda p, x: ddim_invert(eps_fn(p), x, None, schedule, num_steps, depth), **shard)
    sample = jax.jit(lambda p, x: ddim_sample(eps_fn(p), x, None, schedule, num_steps, depth), **shard)
    return invert, sample


def run(config, workdir: str, mesh):
    t0 = time.time()
    dataset = get_dataset(config.data.name, **config.data.kwargs.to_dict())
    model = build_model(config.model.name, config.model.config, config.dtype)
    sc = config.schedule
    schedule = make_schedule(sc.name, sc.num_train_timesteps, sc.beta_start, sc.beta_end)
    params = train_eps_model(model, schedule, dataset, config.train, workdir, mesh, config, seed=config.seed)
    train_time = time.time() - t0

    d = mesh.shape["data"]
    n = max(d, config.eval.num_images - config.eval.num_images % d)
    invert, sample = make_codec(model, schedule, config.eval.ddim_steps, config.eval.depth, mesh)
    x0 = dataset.get(np.arange(n) % len(dataset))["image"]
    t1 = time.time()
    # Every process holds the same full x0; device_put hands each its own rows (multi-host safe).
    x_T = invert(params, jax.device_put(x0, data_sharding(mesh)))
    rec = sample(params, x_T)
    rec, x_T = to_host(rec), to_host(x_T)
    codec_time = time.time() - t1
    noise = jax.random.normal(jax.random.key(config.seed + config.eval.sample_seed_offset), x0.shape)
    if config.eval.depth != 1.0:  # samples from pure noise need the full-depth sampler
        sample = make_codec(model, schedule, config.eval.ddim_steps, 1.0, mesh)[1]
    samples = to_host(sample(params, jax.device_put(np.asarray(noise), data_sharding(mesh))))

    results = {
        "pipeline": "diffusion",
        "variant": config.variant,
        "train_steps": config.train.steps,
        "train_seconds": round(train_time, 2),
        "reconstruction_mse": float(np.mean((rec - x0) ** 2)),
        "reconstruction_psnr_db": float(10 * np.log10(4.0 / max(np.mean((rec - x0) ** 2), 1e-12))),
        "code_std": float(np.std(x_T)),
        "invert_and_sample_seconds": round(codec_time, 2),
        "ddim_steps": config.eval.ddim_steps,
        "depth": config.eval.depth,
    }
    from jaxcf.utils import compile_cache

    results["timing"] = compile_cache.timings()  # XLA compilation (or cache loads) vs the rest, in seconds
    if jax.process_index() == 0:
        k = min(n, 8)
        save_grid([x0[:k], np.clip(x_T[:k] / 3, -1, 1), rec[:k]], io.join(workdir, "reconstructions.png"), scale=2)
        save_grid([samples[:k]], io.join(workdir, "samples.png"), scale=2)
        io.write_json(io.join(workdir, "results.json"), results)
        logging.info("results: %s", results)
        print("\n".join(f"{k:>28s}  {v}" for k, v in results.items()))
    return results
