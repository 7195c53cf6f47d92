"""DiCap throughput: counterfactuals per second of the guided generation, and prompt-update steps
per second on the default backend's devices and, on a CPU, also on 8 forced CPU devices. Model
sizes are those of configs/dicap.py (random weights: speed does not depend on training). ``--dtype=bfloat16`` runs the frozen CLIP and UNet
in bfloat16, as ``--config.dtype=bfloat16`` does. Prints a table and writes JSON.

  python benchmarks/dicap.py --variant=toy --out=benchmarks/results/dicap_cpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

from common import write_json  # benchmarks/common.py (scripts run from their folder's path)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def load_config(variant):
    spec = importlib.util.spec_from_file_location("dicap_config", os.path.join(ROOT, "configs", "dicap.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(variant)


def measure(variant: str, cf_batch: int, prompt_batch: int, repeats: int, dtype: str = "float32") -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxcf.dicap.counterfactuals import clip_zero_shot_log_prob, generate_counterfactuals
    from jaxcf.dicap.losses import dicap_loss
    from jaxcf.dicap.prompts import build_prompt_tokens, init_prompt_params, prompt_text_features
    from jaxcf.diffusion import make_schedule
    from jaxcf.models.clip import CLIP, CLIPConfig, to_clip_input
    from jaxcf.models.registry import DTYPES, build_model
    from jaxcf.foundation.toy import world_tokenizer
    from jaxcf.train import create_train_state, data_sharding, jit_update, make_mesh, make_update_fn, replicated, \
        shard_batch
    from jaxcf.train.precision import frozen_params

    c = load_config(variant)
    fc, res = c.foundation, c.data.resolution
    tok = world_tokenizer()
    dt = DTYPES[dtype]  # frozen models: weights and activations in the compute dtype, as the pipeline
    clip = CLIP(CLIPConfig.tiny(**dict(fc.clip.to_dict(), vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                       image_size=res), dtype=dt, param_dtype=dt))
    clip_params = clip.init(jax.random.key(0))
    unet = build_model("unet2d", fc.unet.to_dict(), dtype)
    unet_params = jax.jit(unet.init)(jax.random.key(1), jnp.zeros((1, res, res, 3)), jnp.zeros((1,), jnp.int32))["params"]
    unet_params = frozen_params(unet_params, dt)
    sch = make_schedule(fc.schedule.name, fc.schedule.num_train_timesteps)
    names = list(c.data.base_classes)
    text = clip.encode_text(clip_params, jnp.asarray(tok([f"a photo of a {n}." for n in names], max_length=16)))
    mesh = make_mesh([("data", -1)])
    n_dev = len(jax.devices())
    out = {"devices": n_dev, "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
           "dtype": dtype}

    # counterfactual generation: inversion + guided denoising, all of it timed
    cf = c.counterfactual
    rep, dat = replicated(mesh), data_sharding(mesh)

    def gen(up, cp, tf, x, y):
        lp = clip_zero_shot_log_prob(clip, cp, tf, lambda im: to_clip_input(im, res), cf.logit_scale)
        return generate_counterfactuals(lambda xx, t, cond: unet.apply({"params": up}, xx, t), lp, x, y, cf.scale,
                                        sch, cf.ddim_steps, cf.depth)

    gen = jax.jit(gen, in_shardings=(rep, rep, rep, dat, dat), out_shardings=dat)
    x = np.random.default_rng(0).uniform(-1, 1, (cf_batch, res, res, 3)).astype(np.float32)
    y = (np.arange(cf_batch) % len(names)).astype(np.int32)
    gen(unet_params, clip_params, text, x, y).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        gen(unet_params, clip_params, text, x, y).block_until_ready()
    dt = (time.perf_counter() - t0) / repeats
    out.update(cf_batch=cf_batch, cf_seconds=dt, cf_per_s=cf_batch / dt, ddim_steps=cf.ddim_steps, depth=cf.depth)

    # the data-parallel prompt update (features precomputed, as in the pipeline)
    tmpl = build_prompt_tokens(tok, names, c.prompt.n_ctx, 16)
    base = clip.token_embedding(clip_params, jnp.asarray(tmpl.token_ids))
    scale = clip.logit_scale(clip_params)
    tx = optax.sgd(1e-3, momentum=0.9)

    def loss_fn(pp, batch, rng, cp):
        t = prompt_text_features(clip, cp, pp, base, tmpl)
        return dicap_loss(batch["f"], batch["f_cf"], t, batch["y"], scale, 1.0, 1.0)

    state, sh = create_train_state(
        lambda r: init_prompt_params(r, clip, clip_params, tok, len(names), c.prompt.n_ctx, "a photo of a"), tx, 0, mesh)
    update = jit_update(make_update_fn(loss_fn, tx), sh, mesh, frozen_shardings=jax.tree.map(lambda _: rep, clip_params))
    P = clip.config.projection_dim
    rng = np.random.default_rng(1)
    batch = {"f": rng.normal(size=(prompt_batch, P)).astype(np.float32),
             "f_cf": rng.normal(size=(prompt_batch, P)).astype(np.float32),
             "y": (np.arange(prompt_batch) % len(names)).astype(np.int32)}
    b = shard_batch(batch, mesh)
    state, m = update(state, b, clip_params)
    jax.block_until_ready(m)
    steps = 50
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = update(state, b, clip_params)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    out.update(prompt_batch=prompt_batch, prompt_step_s=dt, prompt_steps_per_s=1 / dt)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="toy")
    ap.add_argument("--cf_batch", type=int, default=48)
    ap.add_argument("--prompt_batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default="benchmarks/results/dicap.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.variant, args.cf_batch, args.prompt_batch, args.repeats, args.dtype)))
        return
    def child(force_cpu_devices: int | None) -> dict:
        env = dict(os.environ)
        if force_cpu_devices:
            flags = env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={force_cpu_devices}"
            env.update(XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--variant={args.variant}",
               f"--cf_batch={args.cf_batch}", f"--prompt_batch={args.prompt_batch}", f"--repeats={args.repeats}",
               f"--dtype={args.dtype}"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        return json.loads(done.stdout.strip().splitlines()[-1])

    rows = [child(None)]  # the default backend with all its devices (on a CPU: one device)
    if rows[0]["backend"] == "cpu":  # and the sharded code path on 8 forced CPU devices
        rows.append(child(8))
    print(f"\nDiCap '{args.variant}' on {rows[0]['device_kind']} ({rows[0]['backend']}): counterfactual = "
          f"{rows[0]['ddim_steps']}-step inversion to depth {rows[0]['depth']} + guided denoising, {args.dtype}")
    print(f"{'devices':>7s} {'CF/s':>8s} {'CF batch':>9s} {'prompt steps/s':>15s} {'prompt batch':>13s}")
    for r in rows:
        print(f"{r['devices']:7d} {r['cf_per_s']:8.2f} {r['cf_batch']:9d} {r['prompt_steps_per_s']:15.1f} "
              f"{r['prompt_batch']:13d}")
    write_json(args.out, {"variant": args.variant, "dtype": args.dtype, "rows": rows})


if __name__ == "__main__":
    main()
