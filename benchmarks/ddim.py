"""DDIM inversion + sampling throughput: jaxcf's scan vs a Python loop vs PyTorch diffusers.

The same random UNet2DModel weights run in (a) one jitted ``ddim_invert`` + ``ddim_sample`` scan,
(b) a Python loop over a jitted jaxcf step (UNet + ``ddim_step``), and (c) diffusers with its
``DDIMInverseScheduler`` and ``DDIMScheduler``. Also: achieved FLOP/s of one UNet forward against a
large matmul on the same device. Repeats alternate between the implementations, so load on a
shared machine hits all of them alike; compilation and warm-up are excluded. ``--dtype=bfloat16``
runs both UNets with bfloat16 weights and activations (the DDIM state stays float32). Prints a
table and writes JSON (with the XLA_FLAGS it ran under).

  python benchmarks/ddim.py --size=small --batch=8 --steps=50 --out=benchmarks/results/ddim_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

import jax

from common import interleaved, write_json  # benchmarks/common.py (scripts run from their folder's path)
import jax.numpy as jnp
import numpy as np

from jaxcf.diffusion import ddim_invert, ddim_sample, ddim_step, ddim_timesteps, grid_alphas, make_schedule
from jaxcf.models.unet2d import load_unet2d

SIZES = {
    # diffusers UNet2DModel configs; "ddpm32" is the DDPM CIFAR-10 shape (35.7M parameters)
    "tiny": dict(sample_size=32, block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
    "small": dict(sample_size=32, block_out_channels=(64, 128, 128), layers_per_block=2, norm_num_groups=32,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    "ddpm32": dict(sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2, norm_num_groups=32,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--skip_torch", action="store_true")
    ap.add_argument("--skip_loop", action="store_true", help="skip the Python-loop variant (b)")
    ap.add_argument("--out", default="benchmarks/results/ddim.json")
    args = ap.parse_args()

    import torch
    from diffusers import DDIMInverseScheduler, DDIMScheduler, UNet2DModel

    from jaxcf.models.registry import DTYPES
    from jaxcf.models import winograd

    torch.manual_seed(0)
    ref = UNet2DModel(in_channels=3, out_channels=3, **SIZES[args.size]).eval()
    folder = tempfile.mkdtemp()
    ref.save_pretrained(folder)
    model, params = load_unet2d(folder, dtype=DTYPES[args.dtype])  # frozen: weights in the compute dtype too
    n_params = sum(p.numel() for p in ref.parameters())
    res = SIZES[args.size]["sample_size"]
    B, N = args.batch, args.steps
    x0 = np.random.default_rng(0).uniform(-1, 1, (B, res, res, 3)).astype(np.float32)  # DDIM state: float32
    sch = make_schedule("linear")

    def eps_fn(p):
        return lambda x, t, c: model.apply({"params": p}, x, t)

    fns = {}
    # (a) one jitted scan for inversion and one for sampling
    invert = jax.jit(lambda p, x: ddim_invert(eps_fn(p), x, None, sch, N))
    sample = jax.jit(lambda p, x: ddim_sample(eps_fn(p), x, None, sch, N))
    fns["scan"] = lambda: sample(params, invert(params, x0)).block_until_ready()

    # (b) a Python loop over one jitted step
    ts = ddim_timesteps(N, 1000, 1.0)
    a = np.asarray(grid_alphas(sch, ts))

    @jax.jit
    def step(p, x, t, a_t, a_s):
        return ddim_step(x, model.apply({"params": p}, x, jnp.full((x.shape[0],), t, jnp.int32)), a_t, a_s)

    def loop():
        x = jnp.asarray(x0)
        for i in range(N):
            x = step(params, x, ts[i], a[i], a[i + 1])
        for i in range(N, 0, -1):
            x = step(params, x, ts[i], a[i], a[i - 1])
        return x.block_until_ready()

    if not args.skip_loop:
        fns["loop"] = loop

    # (c) diffusers
    if not args.skip_torch:
        tdtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        tdev = "cuda" if torch.cuda.is_available() else "cpu"  # diffusers on the GPU when there is one
        ref = ref.to(tdev, tdtype)
        inv = DDIMInverseScheduler(num_train_timesteps=1000, beta_schedule="linear")
        fwd = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        inv.set_timesteps(N)
        fwd.set_timesteps(N)
        xt = torch.from_numpy(x0.transpose(0, 3, 1, 2).copy()).to(tdev)

        def torch_run():
            with torch.no_grad():
                x = xt
                for t in inv.timesteps:
                    x = inv.step(ref(x.to(tdtype), t).sample.float(), t, x).prev_sample
                for t in fwd.timesteps:
                    x = fwd.step(ref(x.to(tdtype), t).sample.float(), t, x).prev_sample
            if tdev == "cuda":
                torch.cuda.synchronize()
            return x

        fns["torch"] = torch_run

    sec = interleaved(fns, args.repeats)
    t_torch = sec.get("torch")

    # achieved FLOP/s: one UNet forward vs a large matmul
    fwd = lambda p, x: model.apply({"params": p}, x, jnp.zeros((x.shape[0],), jnp.int32))  # noqa: E731
    fwd_fn = jax.jit(fwd)
    with winograd.disabled():  # nominal FLOPs: every convolution counted as a direct one
        # a function object of its own: jit's trace cache is keyed by the function, and fwd_fn
        # must not reuse this trace
        cost = jax.jit(lambda p, x: fwd(p, x)).lower(params, x0).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    unet_flops = float(cost.get("flops", 0.0))
    t_fwd = interleaved({"fwd": lambda: fwd_fn(params, x0).block_until_ready()}, max(3, args.repeats))["fwd"]
    M = 2048 if jax.default_backend() == "cpu" else 8192
    A = jnp.ones((M, M), DTYPES[args.dtype])
    mm = jax.jit(lambda a: a @ a)
    t_mm = interleaved({"mm": lambda: mm(A).block_until_ready()}, 3)["mm"]

    names = {"scan": "jaxcf lax.scan (jit)", "loop": "jaxcf Python loop of jitted steps",
             "torch": "diffusers (PyTorch) loop"}
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}), torch threads {torch.get_num_threads()}"
    print(f"\nDDIM {N} inversion + {N} sampling steps, batch {B} at {res}x{res}, UNet2DModel '{args.size}' "
          f"({n_params / 1e6:.2f}M params), {args.dtype}, on {device}")
    if os.environ.get("XLA_FLAGS"):
        print(f"XLA_FLAGS={os.environ['XLA_FLAGS']}")
    print(f"{'implementation':38s} {'seconds':>9s} {'images/s':>9s} {'vs diffusers':>13s}")
    table = []
    for k, t in sec.items():
        ratio = (t_torch / t) if t_torch else float("nan")
        print(f"{names[k]:38s} {t:9.3f} {B / t:9.2f} {ratio:12.2f}x")
        table.append({"implementation": names[k], "seconds": t, "images_per_s": B / t, "speedup_vs_diffusers": ratio})
    unet_rate, mm_rate = unet_flops / t_fwd, 2 * M**3 / t_mm
    print(f"\nUNet forward: {unet_flops / 1e9:.2f} GFLOP (direct convolutions) in {t_fwd * 1e3:.1f} ms = {unet_rate / 1e9:.1f} GFLOP/s; "
          f"{M}x{M} matmul: {mm_rate / 1e9:.1f} GFLOP/s; UNet reaches {100 * unet_rate / mm_rate:.0f}% of it")
    out = {"size": args.size, "params": n_params, "batch": B, "steps": N, "resolution": res, "dtype": args.dtype,
           "repeats": args.repeats, "device": device, "platform": platform.platform(), "jax": jax.__version__,
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": table,
           "unet_forward_gflop": unet_flops / 1e9, "unet_forward_s": t_fwd, "unet_gflops_per_s": unet_rate / 1e9,
           "matmul_size": M, "matmul_gflops_per_s": mm_rate / 1e9,
           "unet_fraction_of_matmul_rate": unet_rate / mm_rate}
    write_json(args.out, out)


if __name__ == "__main__":
    main()
