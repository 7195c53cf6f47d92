"""One process of the multi-host test (see test_multihost.py): ``python tests/multihost_worker.py WORKDIR``.

Joins the other processes through jaxcf's own :func:`jaxcf.train.distributed.initialize` (the
JAXCF_* variables; none: one process), builds the global data mesh, and runs a few steps of

- DiCap prompt learning (:func:`jaxcf.dicap.estimation.train_prompts`, tiny random CLIP, random
  image features), and
- the DiDAE decoder (:func:`jaxcf.diffusion.train.train_eps_model` with a tiny DiffAE UNet
  conditioned on a frozen tiny SquareEncoder, on 16 px Square images),

then reruns each (it must resume from the collective Orbax checkpoint and train nothing) and
writes ``WORKDIR/result_<process>.npz`` (final parameters) and ``result_<process>.json``.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxcf.train import distributed  # noqa: E402  (before anything touches a device)

distributed.initialize(initialization_timeout=60)

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from jaxcf.data.square import square_dataset  # noqa: E402
from jaxcf.didae.autoencoder import semantic_cond, square_encode_fn  # noqa: E402
from jaxcf.diffusion import make_schedule  # noqa: E402
from jaxcf.models import diffae_unet, encoders  # noqa: E402
from jaxcf.models.clip import CLIP, CLIPConfig, WordTokenizer  # noqa: E402
from jaxcf.dicap.estimation import PromptSetup, train_prompts  # noqa: E402
from jaxcf.diffusion.train import train_eps_model  # noqa: E402
from jaxcf.foundation import Foundation  # noqa: E402
from jaxcf.train import MetricWriter, make_mesh, to_host  # noqa: E402

CLASSES = ["circle", "square", "star", "hexagon"]
STEPS = 4


def dicap(workdir, mesh):
    tok = WordTokenizer.from_texts(["a photo of a"] + [f"{c}." for c in CLASSES])
    clip = CLIP(CLIPConfig.tiny(vocab_size=tok.vocab_size, max_len=12, eos_token_id=tok.eos_id, image_size=16,
                                patch_size=8))
    found = Foundation(clip=clip, clip_params=clip.init(jax.random.key(0)), tokenizer=tok, diffusion_params=None,
                       eps_apply=None, schedule=None, clip_image_size=16)
    setup = PromptSetup(found, CLASSES, n_ctx=4, max_len=12)
    rng = np.random.default_rng(0)  # the same features in every process
    n, d = 32, clip.config.projection_dim
    f_x = rng.normal(size=(n, d)).astype(np.float32)
    f_cf = rng.normal(size=(n, d)).astype(np.float32)
    y = np.arange(n) % len(CLASSES)
    config = ml_collections.ConfigDict(dict(
        train=dict(steps=STEPS, batch_size=8, optimizer="sgd", learning_rate=0.5, warmup_steps=1, weight_decay=0.0,
                   tau=1.0, all_classes=False),
        prompt=dict(n_ctx=4, init_text="a photo of a", mode="unified"),
        param_sharding="replicated", checkpoint_every=2, keep_checkpoints=2, log_every=1))
    run = lambda: train_prompts(found, setup, f_x, f_cf, y, config, 0, workdir, mesh, lam=1.0, desc="dicap")  # noqa
    params = to_host(run())
    again = to_host(run())  # resumes from the last checkpoint: no step is run
    return params, again


def didae(workdir, mesh):
    encoder = encoders.SquareEncoder(embed_dim=6, width=8, num_stages=2, resolution=16)
    enc_params = encoders.init_params(encoder, jax.random.key(1))
    model = diffae_unet.DiffAEUNet(diffae_unet.DiffAEConfig.preset("tiny", resolution=16, attention_resolutions=(8,)))
    dataset = square_dataset("unbiased", num_samples=32, resolution=16)
    train_cfg = ml_collections.ConfigDict(dict(steps=STEPS, batch_size=8, learning_rate=1e-3, warmup_steps=1,
                                               ema_decay=0.5))
    run_config = ml_collections.ConfigDict(dict(checkpoint_every=2, keep_checkpoints=2, log_every=1))
    run = lambda: train_eps_model(  # noqa: E731
        model, make_schedule("linear", 100), dataset, train_cfg, workdir, mesh, run_config, seed=0, desc="didae", init_params=diffae_unet.init_params(model, jax.random.key(2)),
        cond_fn=semantic_cond(square_encode_fn(encoder)), frozen=enc_params)
    params = to_host(run())
    again = to_host(run())
    return params, again


def flat(prefix, tree):
    return {f"{prefix}/{'/'.join(map(str, k))}": np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def main(workdir):
    t0 = time.time()
    mesh = make_mesh([("data", -1)])
    out = {}
    resumed_equal = {}
    for name, fn in (("dicap", dicap), ("didae", didae)):
        params, again = fn(os.path.join(workdir, name), mesh)
        out.update(flat(name, params))
        resumed_equal[name] = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                                      jax.tree_util.tree_leaves(again)))
    pi = jax.process_index()
    np.savez(os.path.join(workdir, f"result_{pi}.npz"), **out)
    with open(os.path.join(workdir, f"result_{pi}.json"), "w") as f:
        json.dump({"process_index": pi, "process_count": jax.process_count(), "devices": jax.device_count(),
                   "local_devices": jax.local_device_count(), "mesh": dict(mesh.shape),
                   "writes_metrics": MetricWriter(workdir).active, "resumed_equal": resumed_equal,
                   "seconds": time.time() - t0}, f)


if __name__ == "__main__":
    main(sys.argv[1])
