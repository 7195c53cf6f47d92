"""DiDAE counterfactuals per second against a gradient-guided baseline built from the same DDIM core.

DiDAE (gradient-free): z = Phi(x), x_T = 20-step DDIM inversion conditioned on z, then all K atom
edits decoded from the same x_T in one call -> K counterfactuals per input.
Baseline (DiME-style classifier guidance): the same inversion, then 20 guided denoising steps
whose eps is shifted by the gradient of the classifier's log p(target | x0_hat), back-propagated
through the decoder -> 1 counterfactual per input.
Both count encode, invert and decode in the wall time; compilation is excluded (a warm-up call).
Weights are random: speed does not depend on training. Prints a table and writes JSON.

  python benchmarks/didae.py --size=square --batch=4 --atoms=4 --out=benchmarks/results/didae_cpu.json
  python benchmarks/didae.py --size=square_tiny      # the 32 px decoder of configs/didae.py:square_tiny
"""

from __future__ import annotations

import argparse
import json
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SIZES = {
    # name: (DiffAE preset and overrides, Phi width/stages/embedding, student ResNet width)
    "square": (dict(preset="square"), dict(embed_dim=512, width=32, num_stages=4), 1.0, 64),
    "square_tiny": (dict(preset="square_tiny", model_channels=16, channel_mult=(1, 2, 2), norm_groups=8),
                    dict(embed_dim=32, width=16, num_stages=3), 0.25, 32),
}


def timed(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def measure(size: str, batch: int, atoms: int, steps: int, repeats: int, guidance_scale: float) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxcf.didae.autoencoder import DiffusionAutoencoder, square_encode_fn
    from jaxcf.didae.dictionary import apply_atom_edits, boundary_edit, svd_dictionary
    from jaxcf.diffusion import ddim_invert, guided_denoise, make_schedule
    from jaxcf.models.diffae_unet import init_params as dec_init
    from jaxcf.models.encoders import init_params as enc_init
    from jaxcf.models.init import num_params
    from jaxcf.models.registry import build_model
    from jaxcf.models.resnet import init_variables

    dec_cfg, enc_cfg, width, res = SIZES[size]
    enc = build_model("square_encoder", dict(enc_cfg, num_attributes=8, resolution=res))
    enc_params = enc_init(enc, jax.random.key(0))
    D = enc_cfg["embed_dim"]
    dec = build_model("diffae_unet", dict(dec_cfg, resolution=res, semantic_dim=D))
    dec_params = dec_init(dec, jax.random.key(1))
    student = build_model("resnet", dict(num_classes=2, stem="cifar", width=width, norm="group",
                                         norm_groups=min(32, int(64 * width))))
    student_params = init_variables(student, jax.random.key(2), res)["params"]
    schedule = make_schedule("linear", 1000, 1e-4, 0.02)
    ae = DiffusionAutoencoder(dec, square_encode_fn(enc), schedule, steps)
    x = jax.random.uniform(jax.random.key(3), (batch, res, res, 3), minval=-1, maxval=1)
    omega, mu = svd_dictionary(jax.random.normal(jax.random.key(4), (4 * D, D)), atoms)
    w = jax.random.normal(jax.random.key(5), (D,))
    edit, _ = boundary_edit(w, omega)

    @jax.jit
    def didae(enc_p, dec_p, x):
        return ae.counterfactuals(enc_p, dec_p, x, lambda z: apply_atom_edits(z, mu, *edit))[0]

    def log_prob(x0, t, y):  # the student's log p(target | x0_hat)
        logits = student.apply({"params": student_params}, x0)
        return jax.nn.log_softmax(logits)[jnp.arange(x0.shape[0]), y]

    @jax.jit
    def guided(enc_p, dec_p, x):
        z = ae.encode(enc_p, x)
        eps = ae.eps_fn(dec_p)
        x_T = ddim_invert(eps, x, z, schedule, steps)
        target = 1 - jnp.argmax(student.apply({"params": student_params}, x), -1)
        return guided_denoise(eps, log_prob, x_T, z, target, guidance_scale, schedule, steps, guide_on="x0",
                              grad_through_eps=True)

    t_didae = timed(lambda: didae(enc_params, dec_params, x), repeats)
    t_guided = timed(lambda: guided(enc_params, dec_params, x), repeats)
    cf_didae = batch * atoms / t_didae
    cf_guided = batch / t_guided
    return {
        "size": size, "resolution": res, "batch": batch, "atoms": atoms, "ddim_steps": steps,
        "decoder_parameters": num_params(dec_params), "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind, "devices": len(jax.devices()),
        "didae_seconds": round(t_didae, 3), "didae_cf_per_second": round(cf_didae, 3),
        "guided_seconds": round(t_guided, 3), "guided_cf_per_second": round(cf_guided, 3),
        "speedup": round(cf_didae / cf_guided, 2),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="square")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--atoms", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--guidance_scale", type=float, default=10.0)
    p.add_argument("--out", default="")
    a = p.parse_args()
    r = measure(a.size, a.batch, a.atoms, a.steps, a.repeats, a.guidance_scale)
    rows = [("method", "CFs per call", "seconds", "CF/s"),
            ("DiDAE (K atoms, gradient-free)", a.batch * a.atoms, r["didae_seconds"], r["didae_cf_per_second"]),
            ("classifier-guided DDIM (DiME-style)", a.batch, r["guided_seconds"], r["guided_cf_per_second"])]
    print(f"{a.size}: {r['resolution']} px, decoder {r['decoder_parameters']:,} parameters, batch {a.batch}, "
          f"K={a.atoms}, {a.steps}+{a.steps} DDIM steps, {r['backend']} ({r['device_kind']})")
    for row in rows:
        print(f"{row[0]:<38s} {row[1]!s:>12} {row[2]!s:>9} {row[3]!s:>8}")
    print(f"DiDAE / guided CF/s: {r['speedup']}x")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
