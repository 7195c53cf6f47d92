"""Screens XLA_FLAGS candidates on the UNet2DModel of benchmarks/ddim.py: one process per flag set.

Each child times the jitted UNet forward (the unit of every DDIM step) and one jitted training
step (forward + backward + AdamW), reports its compile time, and the largest difference of its
forward output from the run without flags (a flag that changes numerics shows up here).
Candidates that look faster are then confirmed with the full benchmarks/ddim.py run.
Options that XLA also takes per compilation are screened with less noise by
benchmarks/compile_options.py (every variant in one process, run in alternation).

  python benchmarks/xla_flags.py --size=small --batch=8 --out=benchmarks/results/xla_flags_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from common import write_json  # benchmarks/common.py (scripts run from their folder's path)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CANDIDATES = [
    "",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot,eltwise",
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise",
    "--xla_cpu_use_xnnpack=false",
    "--xla_cpu_prefer_vector_width=512",
    "--xla_cpu_enable_fast_math=true",
]


def child(size: str, batch: int, repeats: int, out_npy: str, train: bool = True) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    sys.path.insert(0, HERE)
    from ddim import SIZES

    from jaxcf.diffusion import denoising_loss, make_schedule
    from jaxcf.models.init import fast_init
    from jaxcf.models.unet2d import UNet2DConfig, UNet2DModel

    model = UNet2DModel(UNet2DConfig(in_channels=3, out_channels=3, **SIZES[size]))
    res = SIZES[size]["sample_size"]
    params = fast_init(model, jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32),
                       jax.ShapeDtypeStruct((1,), jnp.int32), rng=jax.random.key(0))["params"]
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, res, res, 3)).astype(np.float32))
    t = jnp.full((batch,), 500, jnp.int32)

    def timeit(fn, *args):
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(compiled(*args))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
        return compiled, compile_s, float(np.median(times))

    fwd = lambda p, x: model.apply({"params": p}, x, t)  # noqa: E731
    compiled, c_fwd, t_fwd = timeit(fwd, params, x)
    np.save(out_npy, np.asarray(compiled(params, x)))
    if not train:
        return {"forward_s": t_fwd, "forward_compile_s": c_fwd, "train_step_s": float("nan"), "train_compile_s": 0.0}

    tx = optax.adamw(1e-4)
    loss = denoising_loss(model, make_schedule("linear"))

    def step(p, o, x):
        (l, _), g = jax.value_and_grad(loss, has_aux=True)(p, {"image": x}, jax.random.key(0))
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, l

    _, c_step, t_step = timeit(step, params, tx.init(params), x)
    return {"forward_s": t_fwd, "forward_compile_s": c_fwd, "train_step_s": t_step, "train_compile_s": c_step}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--forward_only", action="store_true", help="skip the training step")
    ap.add_argument("--flags", action="append", help="a flag set to try (repeatable); default: the built-in list")
    ap.add_argument("--out", default="benchmarks/results/xla_flags.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.size, args.batch, args.repeats, args.child, not args.forward_only)))
        return
    candidates = args.flags or CANDIDATES
    if candidates[0] != "":
        candidates = [""] + candidates  # the reference
    rows, ref = [], None
    tmp = os.path.join(ROOT, "benchmarks", "results", ".xla_flags_out.npy")
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    for flags in candidates:
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        cmd = [sys.executable, os.path.abspath(__file__), f"--child={tmp}", f"--size={args.size}",
               f"--batch={args.batch}", f"--repeats={args.repeats}"] + (["--forward_only"] if args.forward_only else [])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            print(f"{flags or '(none)'}: failed: {done.stderr.strip().splitlines()[-1:]}")
            rows.append({"flags": flags, "error": done.stderr[-2000:]})
            continue
        r = dict(json.loads(done.stdout.strip().splitlines()[-1]), flags=flags)
        out = np.load(tmp)
        ref = out if ref is None else ref
        r["max_abs_diff_vs_none"] = float(np.max(np.abs(out - ref)))
        rows.append(r)
        base = rows[0]
        print(f"{flags or '(none)':80s} fwd {r['forward_s'] * 1e3:7.1f} ms ({base['forward_s'] / r['forward_s']:.2f}x) "
              f"step {r['train_step_s'] * 1e3:7.1f} ms ({base['train_step_s'] / r['train_step_s']:.2f}x) "
              f"compile {r['forward_compile_s'] + r['train_compile_s']:5.1f} s  diff {r['max_abs_diff_vs_none']:.1e}",
              flush=True)
    os.remove(tmp)
    write_json(args.out, {"size": args.size, "batch": args.batch, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
