"""Where a UNet's time goes: single ops at the shapes of benchmarks/ddim.py's 'small' UNet, XLA vs PyTorch.

3x3 convolutions at each level (forward, and forward + backward), the GroupNorm + SiLU that
precedes each of them, and one 2048 x 2048 matmul as the device's reference rate. Each op is
jitted alone (XLA) or run eagerly (PyTorch, NCHW) on the same data; repeats alternate.
Prints a table and writes JSON.

  python benchmarks/ops.py --batch=8 --out=benchmarks/results/ops_cpu.json
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from common import write_json  # benchmarks/common.py (scripts run from their folder's path)

# (name, H=W, C_in, C_out) of the 'small' UNet2DModel (widths 64/128/128 at 32/16/8 px)
CONVS = [("conv3x3 32px 64->64", 32, 64, 64), ("conv3x3 16px 128->128", 16, 128, 128),
         ("conv3x3 8px 128->128", 8, 128, 128), ("conv3x3 32px 192->64 (up)", 32, 192, 64)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/ops.json")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    from jaxcf.models.blocks import GroupNorm

    B, R = args.batch, args.repeats
    rng = np.random.default_rng(0)

    def bench(fns: dict) -> dict:
        for f in fns.values():
            f()
            f()
        times = {k: [] for k in fns}
        for _ in range(R):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        return {k: float(np.median(v)) for k, v in times.items()}

    rows = []
    for name, hw, cin, cout in CONVS:
        x = rng.standard_normal((B, hw, hw, cin), np.float32)
        w = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),  # noqa: E731
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
        fwd = jax.jit(conv)
        grad = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
        xt_g, wt_g = xt.clone().requires_grad_(), wt.clone().requires_grad_()

        def torch_fwd():
            with torch.no_grad():
                torch.nn.functional.conv2d(xt, wt, padding=1)

        def torch_grad():
            out = torch.nn.functional.conv2d(xt_g, wt_g, padding=1)
            torch.autograd.grad((out ** 2).sum(), (xt_g, wt_g))

        t = bench({"xla_fwd": lambda: fwd(xj, wj).block_until_ready(), "torch_fwd": torch_fwd,
                   "xla_fwd_bwd": lambda: jax.block_until_ready(grad(xj, wj)), "torch_fwd_bwd": torch_grad})
        flops = 2 * B * hw * hw * cin * cout * 9
        rows.append({"op": name, "gflop": flops / 1e9, **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                     "xla_fwd_gflops": flops / t["xla_fwd"] / 1e9, "torch_fwd_gflops": flops / t["torch_fwd"] / 1e9})

    for hw, c in ((32, 64), (16, 128)):
        x = rng.standard_normal((B, hw, hw, c), np.float32)
        gn = GroupNorm(32)
        p = gn.init(jax.random.key(0), x[:1])
        f = jax.jit(lambda p, x: jax.nn.silu(gn.apply(p, x)))
        xj = jnp.asarray(x)
        tgn = torch.nn.GroupNorm(32, c)
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

        def torch_gn():
            with torch.no_grad():
                torch.nn.functional.silu(tgn(xt))

        t = bench({"xla_fwd": lambda: f(p, xj).block_until_ready(), "torch_fwd": torch_gn})
        rows.append({"op": f"GroupNorm(32)+SiLU {hw}px {c}ch", **{f"{k}_ms": v * 1e3 for k, v in t.items()}})

    M = 2048
    a = rng.standard_normal((M, M), np.float32)
    aj, at = jnp.asarray(a), torch.from_numpy(a)
    mm = jax.jit(lambda a: a @ a)
    t = bench({"xla_fwd": lambda: mm(aj).block_until_ready(), "torch_fwd": lambda: at @ at})
    rows.append({"op": f"matmul {M}x{M}", "gflop": 2 * M**3 / 1e9, **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                 "xla_fwd_gflops": 2 * M**3 / t["xla_fwd"] / 1e9, "torch_fwd_gflops": 2 * M**3 / t["torch_fwd"] / 1e9})

    print(f"\nbatch {B}, {jax.devices()[0].device_kind} ({jax.default_backend()}), torch threads {torch.get_num_threads()}"
          + (f", XLA_FLAGS={os.environ['XLA_FLAGS']}" if os.environ.get("XLA_FLAGS") else ""))
    print(f"{'op':34s} {'XLA fwd ms':>10s} {'torch fwd':>10s} {'XLA f+b ms':>10s} {'torch f+b':>10s} {'XLA/torch fwd':>14s}")
    for r in rows:
        fb = (f"{r['xla_fwd_bwd_ms']:10.2f} {r['torch_fwd_bwd_ms']:10.2f}" if "xla_fwd_bwd_ms" in r else f"{'-':>10s} {'-':>10s}")
        print(f"{r['op']:34s} {r['xla_fwd_ms']:10.2f} {r['torch_fwd_ms']:10.2f} {fb} "
              f"{r['xla_fwd_ms'] / r['torch_fwd_ms']:13.2f}x")
    out = {"batch": B, "repeats": R, "backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "torch_threads": torch.get_num_threads(), "rows": rows}
    write_json(args.out, out)


if __name__ == "__main__":
    main()
