"""XLA compile options screened on the training step, all variants in one process.

Separate processes per flag set (benchmarks/xla_flags.py) are at the mercy of a shared CPU whose
speed drifts by 10-20% between runs. Here the `small` UNet2DModel step of benchmarks/train.py (the
pipelines' own ``make_update_fn`` + ``jit_update``, gradient per data shard, AdamW) is lowered once
and compiled once per variant with ``compile(compiler_options=...)``; the compiled programs then run
in alternation (``--repeats`` rounds of ``--steps`` donated steps each) and each variant is reported
as the median paired difference against the first one. Put the baseline twice (the default does) to
see how far two identically compiled programs drift apart in the same run. Each variant also takes
one step from the same initial state, and the table gives the largest parameter difference from the
first variant's step (0.0: the option did not change the computation).

``--routes=avx512,avx2`` screens jaxcf's CPU route tables instead (``jaxcf.models.winograd``: which
convolutions go by Winograd, the kernel gradient, 1x1 convolutions as products): the step is traced
and compiled once under each table (default compile options), then timed the same way.

  python benchmarks/compile_options.py --out=benchmarks/results/compile_options_cpu.json
  python benchmarks/compile_options.py --routes=avx512,avx2,avx512,avx2 --steps=2 --repeats=10 --out=benchmarks/results/cpu_routes_cpu.json
  python benchmarks/compile_options.py --variants='{"default": {}, "no_ynn": {"xla_cpu_experimental_ynn_fusion_type": ""}}'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import write_json  # noqa: E402
from ddim import SIZES  # noqa: E402
from train import jaxcf_unet_step  # noqa: E402

DEFAULT_VARIANTS = {
    "default": {},
    "default (again)": {},
    "no YNNPACK": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "YNNPACK single products only": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    "YNNPACK single convolutions only": {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"},
    "FAST_RUNTIME preset": {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_RUNTIME"},
    "concurrency scheduler + region copies": {"xla_cpu_enable_concurrency_optimized_scheduler": True,
                                              "xla_cpu_copy_insertion_use_region_analysis": True},
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="donated steps per variant per round")
    ap.add_argument("--repeats", type=int, default=5, help="rounds; each runs every variant once")
    ap.add_argument("--variants", default="", help="JSON object {name: {xla option: value}}; the first is the "
                                                   "reference (default: a built-in screen)")
    ap.add_argument("--routes", default="", help="comma-separated CPU route tables of jaxcf.models.winograd "
                                                 "(avx512, avx2; repeat one as the drift control) to screen "
                                                 "instead of compile options")
    ap.add_argument("--cpu_devices", default="auto", help="as benchmarks/train.py")
    ap.add_argument("--cpu_malloc", default="auto", choices=["auto", "on", "off"], help="as benchmarks/train.py")
    ap.add_argument("--out", default="benchmarks/results/compile_options_cpu.json")
    args = ap.parse_args()
    try:
        variants = json.loads(args.variants) if args.variants else DEFAULT_VARIANTS
    except json.JSONDecodeError as e:
        ap.error(f"--variants is not JSON: {e}")
    if not isinstance(variants, dict) or not variants or not all(isinstance(v, dict) for v in variants.values()):
        ap.error("--variants must be a non-empty JSON object of {name: {option: value}}")
    tables = {"avx512": "AVX512_ROUTES", "avx2": "AVX2_ROUTES"}
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    if any(r not in tables for r in routes):
        ap.error(f"--routes: each of {sorted(tables)}, got {args.routes!r}")
    if routes:  # one variant per listed table; a repeated table gets a numbered name
        variants = {(f"{r} routes" + (f" ({routes[:i].count(r) + 1})" if routes.count(r) > 1 else "")): {"routes": r}
                    for i, r in enumerate(routes)}

    from jaxcf.train import cpu_devices
    from jaxcf.utils import cpu_malloc

    cpu_malloc.ensure(args.cpu_malloc)  # may restart this command with the tunable (exec), before JAX starts
    malloc = cpu_malloc.describe()
    cpu_devices.apply(args.cpu_devices)
    import jax

    from jaxcf.models import winograd
    from jaxcf.train import create_train_state

    j = jaxcf_unet_step(args.size, args.batch)  # the same weights and step as benchmarks/train.py
    params, tx, mesh, batch = j.params, j.tx, j.mesh, j.batch
    lowered = None if routes else j.update.lower(j.state, batch)

    def lower_under(table: str):
        """The same step traced afresh (a new jitted function) under one route table."""
        before, winograd.ROUTES = winograd.ROUTES, getattr(winograd, tables[table])
        try:
            return j.make_update().lower(j.state, batch)
        finally:
            winograd.ROUTES = before

    compiled, compile_s, param_diff, reference = {}, {}, {}, None
    for name, opts in variants.items():
        t0 = time.perf_counter()
        try:
            if routes:
                compiled[name] = lower_under(opts["routes"]).compile()
            else:
                compiled[name] = lowered.compile(compiler_options=opts or None)
        except Exception as e:  # an unknown option or value: name it, keep screening the others
            print(f"{name}: {opts} does not compile: {str(e).splitlines()[0]}")
            continue
        compile_s[name] = time.perf_counter() - t0
        fresh, _ = create_train_state(params, tx, 0, mesh)
        stepped, _ = compiled[name](fresh, batch)
        leaves = [np.asarray(p) for p in jax.tree_util.tree_leaves(stepped.params)]
        reference = leaves if reference is None else reference
        param_diff[name] = max(float(np.abs(a - b).max()) for a, b in zip(leaves, reference))
        print(f"compiled {name!r} in {compile_s[name]:.1f} s", flush=True)
    if not compiled:
        sys.exit("no variant compiled")

    states = {name: create_train_state(params, tx, 0, mesh)[0] for name in compiled}

    def run(name: str, n: int) -> float:
        s = states[name]
        t0 = time.perf_counter()
        for _ in range(n):
            s, _ = compiled[name](s, batch)
        jax.block_until_ready(s)
        states[name] = s
        return (time.perf_counter() - t0) / n

    for name in compiled:
        run(name, 2)  # warm up (the second step reuses donated buffers)
    times = {name: [] for name in compiled}
    for _ in range(args.repeats):
        for name in compiled:
            times[name].append(run(name, args.steps))

    first = next(iter(compiled))
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})"
    print(f"\n'{args.size}' UNet2DModel training step, batch {args.batch}, {args.repeats} rounds of {args.steps} "
          f"steps on {device}")
    print(f"{'variant':42s} {'s/step':>8s} {'vs first (paired median)':>25s} {'max |param diff|':>17s} {'compile s':>10s}")
    rows = []
    for name in compiled:
        med = float(np.median(times[name]))
        paired = float(np.median(np.array(times[name]) - np.array(times[first])))
        print(f"{name:42s} {med:8.3f} {paired * 1e3:+22.0f} ms {param_diff[name]:17.2e} {compile_s[name]:10.1f}")
        rows.append({"variant": name, "options": variants[name], "seconds_per_step": med,
                     "paired_median_vs_first_s": paired, "times": times[name],
                     "max_param_diff_after_one_step": param_diff[name], "compile_s": compile_s[name]})
    write_json(args.out, {"size": args.size, "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
                          "routes_of_this_cpu": str(winograd.ROUTES), "cpu_malloc": malloc,
                          "device": device, "platform": platform.platform(), "jax": jax.__version__,
                          "rows": rows})


if __name__ == "__main__":
    main()
