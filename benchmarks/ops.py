"""Where a UNet's time goes: single ops at the shapes of benchmarks/ddim.py's 'small' UNet, XLA vs PyTorch.

3x3 convolutions at each level (forward, and forward + backward) by XLA's convolution and by
jaxcf's (``jaxcf.models.winograd.conv_general_dilated``: Winograd F(2x2, 3x3) where it measured
faster on the CPU, XLA's convolution elsewhere), the GroupNorm + SiLU that precedes each of them,
the 16-pixel self-attention (``jax.nn.dot_product_attention`` against jaxcf's
``heads_major_attention`` and PyTorch's ``scaled_dot_product_attention``), and one 2048 x 2048
matmul as the device's reference rate. Each op is jitted alone (XLA) or run eagerly (PyTorch,
NCHW) on the same data; repeats alternate. Prints a table and writes JSON.

  python benchmarks/ops.py --batch=8 --out=benchmarks/results/ops_cpu.json
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from common import interleaved, write_json  # benchmarks/common.py (scripts run from their folder's path)

# (name, H=W, C_in, C_out) of the 'small' UNet2DModel (widths 64/128/128 at 32/16/8 px)
CONVS = [("conv3x3 32px 64->64", 32, 64, 64), ("conv3x3 32px 128->64 (up)", 32, 128, 64),
         ("conv3x3 32px 192->64 (up)", 32, 192, 64), ("conv3x3 32px 128->128 (upsample)", 32, 128, 128),
         ("conv3x3 16px 128->128", 16, 128, 128), ("conv3x3 8px 128->128", 8, 128, 128)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/ops.json")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    from jaxcf.models import winograd
    from jaxcf.models.blocks import GroupNorm, heads_major_attention

    B, R = args.batch, args.repeats
    rng = np.random.default_rng(0)

    rows = []
    for name, hw, cin, cout in CONVS:
        x = rng.standard_normal((B, hw, hw, cin), np.float32)
        w = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),  # noqa: E731
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
        ours = lambda x, w: winograd.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),  # noqa: E731
                                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
        fwd, jfwd = jax.jit(conv), jax.jit(ours)
        grad = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
        jgrad = jax.jit(jax.grad(lambda x, w: jnp.sum(ours(x, w) ** 2), argnums=(0, 1)))
        route = "winograd" if winograd.winograd_applies(x.shape, w.shape, x.dtype, (1, 1), ((1, 1), (1, 1)),
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) else "xla"
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
        xt_g, wt_g = xt.clone().requires_grad_(), wt.clone().requires_grad_()

        def torch_fwd():
            with torch.no_grad():
                torch.nn.functional.conv2d(xt, wt, padding=1)

        def torch_grad():
            out = torch.nn.functional.conv2d(xt_g, wt_g, padding=1)
            torch.autograd.grad((out ** 2).sum(), (xt_g, wt_g))

        t = interleaved({"xla_fwd": lambda: fwd(xj, wj).block_until_ready(), "torch_fwd": torch_fwd,
                         "jaxcf_fwd": lambda: jfwd(xj, wj).block_until_ready(),
                         "xla_fwd_bwd": lambda: jax.block_until_ready(grad(xj, wj)), "torch_fwd_bwd": torch_grad,
                         "jaxcf_fwd_bwd": lambda: jax.block_until_ready(jgrad(xj, wj))}, R)
        flops = 2 * B * hw * hw * cin * cout * 9
        rows.append({"op": name, "jaxcf_route": route, "gflop": flops / 1e9, **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                     "xla_fwd_gflops": flops / t["xla_fwd"] / 1e9, "torch_fwd_gflops": flops / t["torch_fwd"] / 1e9,
                     "jaxcf_fwd_gflops": flops / t["jaxcf_fwd"] / 1e9,
                     "jaxcf_max_abs_diff": float(jnp.max(jnp.abs(jfwd(xj, wj) - fwd(xj, wj))))})

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

        t = interleaved({"xla_fwd": lambda: f(p, xj).block_until_ready(), "torch_fwd": torch_gn}, R)
        rows.append({"op": f"GroupNorm(32)+SiLU {hw}px {c}ch", **{f"{k}_ms": v * 1e3 for k, v in t.items()}})

    # the 'small' UNet's attention: 16 x 16 pixels, 128 channels in 16 heads of 8
    q, k, v = (rng.standard_normal((B, 256, 16, 8), np.float32) for _ in range(3))
    qj, kj, vj = (jnp.asarray(a) for a in (q, k, v))
    qt, kt, vt = (torch.from_numpy(a.transpose(0, 2, 1, 3).copy()) for a in (q, k, v))
    ref, ours = jax.jit(jax.nn.dot_product_attention), jax.jit(heads_major_attention)

    ref_grad, our_grad = (jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2)))
                          for f in (jax.nn.dot_product_attention, heads_major_attention))
    qt_g, kt_g, vt_g = (a.clone().requires_grad_() for a in (qt, kt, vt))

    def torch_attn():
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)

    def torch_attn_grad():
        out = torch.nn.functional.scaled_dot_product_attention(qt_g, kt_g, vt_g)
        torch.autograd.grad((out ** 2).sum(), (qt_g, kt_g, vt_g))

    t = interleaved({"xla_fwd": lambda: ref(qj, kj, vj).block_until_ready(), "torch_fwd": torch_attn,
                     "jaxcf_fwd": lambda: ours(qj, kj, vj).block_until_ready(),
                     "xla_fwd_bwd": lambda: jax.block_until_ready(ref_grad(qj, kj, vj)), "torch_fwd_bwd": torch_attn_grad,
                     "jaxcf_fwd_bwd": lambda: jax.block_until_ready(our_grad(qj, kj, vj))}, R)
    rows.append({"op": "attention 256 px, 16 heads x 8", **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                 "jaxcf_max_abs_diff": float(jnp.max(jnp.abs(ours(qj, kj, vj) - ref(qj, kj, vj))))})

    M = 2048
    a = rng.standard_normal((M, M), np.float32)
    aj, at = jnp.asarray(a), torch.from_numpy(a)
    mm = jax.jit(lambda a: a @ a)
    t = interleaved({"xla_fwd": lambda: mm(aj).block_until_ready(), "torch_fwd": lambda: at @ at}, R)
    rows.append({"op": f"matmul {M}x{M}", "gflop": 2 * M**3 / 1e9, **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                 "xla_fwd_gflops": 2 * M**3 / t["xla_fwd"] / 1e9, "torch_fwd_gflops": 2 * M**3 / t["torch_fwd"] / 1e9})

    print(f"\nbatch {B}, {jax.devices()[0].device_kind} ({jax.default_backend()}), torch threads {torch.get_num_threads()}"
          + (f", XLA_FLAGS={os.environ['XLA_FLAGS']}" if os.environ.get("XLA_FLAGS") else ""))
    print("XLA: jax.lax / jax.nn as they come; jaxcf: its CPU route (Winograd or XLA, heads-major attention)")
    print(f"{'op':36s} {'XLA fwd ms':>10s} {'jaxcf fwd':>10s} {'torch fwd':>10s} {'XLA f+b ms':>10s} "
          f"{'jaxcf f+b':>10s} {'torch f+b':>10s} {'jaxcf/torch fwd':>15s}")
    dash = f"{'-':>10s}"
    for r in rows:
        get = lambda k: f"{r[k]:10.2f}" if k in r else dash  # noqa: E731
        ours = r.get("jaxcf_fwd_ms", r["xla_fwd_ms"])
        print(f"{r['op']:36s} {get('xla_fwd_ms')} {get('jaxcf_fwd_ms')} {get('torch_fwd_ms')} {get('xla_fwd_bwd_ms')} "
              f"{get('jaxcf_fwd_bwd_ms')} {get('torch_fwd_bwd_ms')} {ours / r['torch_fwd_ms']:14.2f}x")
    out = {"batch": B, "repeats": R, "backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "torch_threads": torch.get_num_threads(), "rows": rows}
    write_json(args.out, out)


if __name__ == "__main__":
    main()
