"""DiDAE counterfactuals per second against two gradient-guided baselines built from the same DDIM core.

All three use the same decoder eps(x_t, t, z) (the DiffAE UNet of ``configs/didae.py:<size>``,
with its prediction type and x0 clamping), the same encoder Phi and the same classifier (the
config's ResNet-18 student), and the same N-step DDIM inversion conditioned on z = Phi(x):

- DiDAE (gradient-free): all K atom edits of z decoded from the same x_T in one call
  -> K counterfactuals per input.
- one-chain guidance: N guided denoising steps whose eps is shifted by the gradient of the
  classifier's log p(target | x0_hat(x_t)), back-propagated through the decoder
  (``guided_denoise(..., guide_on="x0", grad_through_eps=True)``) -> 1 per input.
- DiME-faithful guidance: at every guided step an unguided DDIM chain runs from x_t down to a clean
  estimate and the classifier gradient is back-propagated through that whole chain
  (``chain_guided_denoise``) -> 1 per input.

Decoder forward calls per counterfactual, N steps, K atoms (each backward pass comes in addition):
DiDAE N / K + N; one-chain 2 N (N backward); DiME-faithful N + N (N + 1) / 2 (N (N + 1) / 2 backward).
Wall time covers encode, invert and decode for every method (compilation excluded: a warm-up call);
repeats alternate between the methods. Weights are random: speed does not depend on training.
Prints a table and writes JSON.

  python benchmarks/didae.py --size=square_tiny --batch=4 --atoms=4 --steps=10 --out=benchmarks/results/didae_cpu.json
  python benchmarks/didae.py --size=square --batch=2 --steps=20      # the paper's 64 px decoder (GPU/TPU)
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import time

from common import write_json  # benchmarks/common.py (scripts run from their folder's path)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
METHODS = ("didae", "one_chain", "dime")


def load_config(variant: str):
    spec = importlib.util.spec_from_file_location("didae_config", os.path.join(ROOT, "configs", "didae.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(variant)


def unet_calls(steps: int, atoms: int) -> dict:
    """Decoder forward passes (and backward passes) per counterfactual, counted from the step counts."""
    n = steps
    return {"didae": {"forward": n / atoms + n, "backward": 0},
            "one_chain": {"forward": 2 * n, "backward": n},
            "dime": {"forward": n + n * (n + 1) // 2, "backward": n * (n + 1) // 2}}


def measure(size: str, batch: int, atoms: int, steps: int, repeats: int, guidance_scale: float, dtype: str,
            methods=METHODS) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxcf.didae.autoencoder import DiffusionAutoencoder, square_encode_fn
    from jaxcf.didae.dictionary import boundary_inversion, svd_dictionary
    from jaxcf.diffusion import chain_guided_denoise, ddim_invert, guided_denoise, make_schedule
    from jaxcf.models.diffae_unet import init_params as dec_init
    from jaxcf.models.encoders import init_params as enc_init
    from jaxcf.models.init import num_params
    from jaxcf.models.registry import build_model
    from jaxcf.models.resnet import init_variables
    from jaxcf.didae.foundation import decoder_model
    from jaxcf.train.precision import frozen_params

    c = load_config(size)
    res, D = c.data.resolution, c.encoder.embed_dim
    enc = build_model("square_encoder", dict(embed_dim=D, width=c.encoder.width, num_stages=c.encoder.num_stages,
                                             num_attributes=8, resolution=res), dtype)
    enc_params = frozen_params(enc_init(enc, jax.random.key(0)), enc.dtype)
    c.dtype = dtype
    dec = decoder_model(c, D)  # the pipeline's own config -> DiffAEUNet
    dec_params = frozen_params(dec_init(dec, jax.random.key(1)), dec.dtype)
    s = c.student
    widths = [max(1, int(round(64 * 2 ** i * s.width))) for i in range(4)]
    student = build_model("resnet", dict(num_classes=2, stem=s.stem, width=s.width, norm="group",
                                         norm_groups=math.gcd(*widths, 8)), dtype)
    student_params = frozen_params(init_variables(student, jax.random.key(2), res)["params"], student.dtype)
    sc = c.schedule
    schedule = make_schedule(sc.name, sc.num_train_timesteps, sc.beta_start, sc.beta_end)
    ae = DiffusionAutoencoder(dec, square_encode_fn(enc), schedule, steps, prediction=c.decoder.train.prediction,
                              clip_x0=c.decoder.clip_x0)
    x = jax.random.uniform(jax.random.key(3), (batch, res, res, 3), minval=-1, maxval=1)
    omega, mu = svd_dictionary(jax.random.normal(jax.random.key(4), (4 * D, D)), atoms)
    w = jax.random.normal(jax.random.key(5), (D,))
    edit, _ = boundary_inversion(w, omega, mu)

    def log_prob(sp, x0, t, y):  # the classifier's log p(target | x0)
        logits = student.apply({"params": sp}, x0).astype(jnp.float32)
        return jax.nn.log_softmax(logits)[jnp.arange(x0.shape[0]), y]

    def didae(enc_p, dec_p, sp, x):
        return ae.counterfactuals(enc_p, dec_p, x, edit)[0]

    def guided(chain: bool):
        def run(enc_p, dec_p, sp, x):
            z = ae.encode(enc_p, x)
            eps = ae.eps_fn(dec_p)
            x_T = ddim_invert(eps, x, z, schedule, steps)
            target = 1 - jnp.argmax(student.apply({"params": sp}, x), -1)
            lp = lambda x0, t, y: log_prob(sp, x0, t, y)  # noqa: E731
            if chain:
                return chain_guided_denoise(eps, lp, x_T, z, target, guidance_scale, schedule, steps)
            return guided_denoise(eps, lp, x_T, z, target, guidance_scale, schedule, steps, guide_on="x0",
                                  grad_through_eps=True)

        return run

    fns = {"didae": didae, "one_chain": guided(False), "dime": guided(True)}
    cfs = {"didae": batch * atoms, "one_chain": batch, "dime": batch}
    compiled, compile_s = {}, {}
    for m in methods:
        t0 = time.perf_counter()
        compiled[m] = jax.jit(fns[m]).lower(enc_params, dec_params, student_params, x).compile()
        jax.block_until_ready(compiled[m](enc_params, dec_params, student_params, x))  # warm up
        compile_s[m] = time.perf_counter() - t0
    times = {m: [] for m in methods}
    for _ in range(repeats):  # alternate, so load on a shared machine hits every method alike
        for m in methods:
            t0 = time.perf_counter()
            jax.block_until_ready(compiled[m](enc_params, dec_params, student_params, x))
            times[m].append(time.perf_counter() - t0)
    calls = unet_calls(steps, atoms)
    out = {"size": size, "config": f"configs/didae.py:{size}", "resolution": res, "batch": batch, "atoms": atoms,
           "ddim_steps": steps, "guidance_scale": guidance_scale, "dtype": dtype,
           "prediction": c.decoder.train.prediction, "clip_x0": bool(c.decoder.clip_x0),
           "decoder_parameters": num_params(dec_params), "classifier_parameters": num_params(student_params),
           "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
           "devices": len(jax.devices()), "repeats": repeats, "methods": {}}
    for m in methods:
        best = min(times[m])
        out["methods"][m] = {"cfs_per_call": cfs[m], "seconds": round(best, 4), "cf_per_second": round(cfs[m] / best, 4),
                             "unet_forward_per_cf": calls[m]["forward"], "unet_backward_per_cf": calls[m]["backward"],
                             "compile_and_first_call_seconds": round(compile_s[m], 2),
                             "all_seconds": [round(t, 4) for t in times[m]]}
    r = out["methods"]
    for m in methods:
        if m != "didae" and "didae" in r:
            out[f"didae_vs_{m}"] = round(r["didae"]["cf_per_second"] / r[m]["cf_per_second"], 2)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["square_tiny", "square"], default="square_tiny",
                   help="the configs/didae.py variant whose decoder, encoder and student are used")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--atoms", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of inversion, decoding and guidance (all methods)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--guidance_scale", type=float, default=10.0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--out", default="")
    a = p.parse_args()
    methods = [m for m in METHODS if m in a.methods.split(",")]
    r = measure(a.size, a.batch, a.atoms, a.steps, a.repeats, a.guidance_scale, a.dtype, methods)
    names = {"didae": "DiDAE (K atoms, gradient-free)", "one_chain": "one-chain guidance (x0_hat)",
             "dime": "DiME-faithful (inner chain per step)"}
    n = a.steps
    print(f"{a.size}: {r['resolution']} px, decoder {r['decoder_parameters']:,} parameters, classifier "
          f"{r['classifier_parameters']:,}, batch {a.batch}, K={a.atoms}, N={n} DDIM steps (inversion, decoding and "
          f"guidance), {a.dtype}, {r['backend']} ({r['device_kind']})")
    print(f"{'method':<38s} {'CFs/call':>8s} {'seconds':>9s} {'CF/s':>8s} {'UNet fwd/CF':>11s} {'bwd/CF':>7s}")
    for m in methods:
        x = r["methods"][m]
        print(f"{names[m]:<38s} {x['cfs_per_call']:>8d} {x['seconds']:>9.3f} {x['cf_per_second']:>8.3f} "
              f"{x['unet_forward_per_cf']:>11g} {x['unet_backward_per_cf']:>7d}")
    print(f"UNet calls per CF: DiDAE N/K + N = {n / a.atoms + n:g}; one-chain 2N = {2 * n} (+{n} backward); "
          f"DiME-faithful N + N(N+1)/2 = {n + n * (n + 1) // 2} (+{n * (n + 1) // 2} backward)")
    for m in methods:
        if f"didae_vs_{m}" in r:
            print(f"DiDAE / {names[m]} CF/s: {r[f'didae_vs_{m}']}x")
    if a.out:
        write_json(a.out, r)


if __name__ == "__main__":
    main()
