"""Training steps per second: jaxcf against PyTorch diffusers on the same UNet2DModel, and jaxcf's
DiDAE decoder and DiCap tiny CLIP at their shipped configs.

1. UNet2DModel (``--size``, the configs of benchmarks/ddim.py): the same random weights in both
   (diffusers builds them, ``save_pretrained``, jaxcf ``load_unet2d``), the same batch, eps-MSE
   loss at a uniform timestep, AdamW (optax.adamw / torch.optim.AdamW, lr 1e-4, weight decay
   0.01). jaxcf's step is the pipelines' own: ``make_update_fn`` + ``jit_update`` (one jitted
   program, train state donated), with the gradient taken per data shard as ``train_eps_model``
   does (``--grad=global``: one program XLA partitions, the default of ``make_update_fn``). Repeats alternate jaxcf and diffusers, so load on a shared
   machine hits both alike.
2. The DiffAE decoder of ``configs/didae.py:square_tiny`` (its ``decoder`` fields, batch and
   optimizer: Adam with global-norm clipping, EMA, v-prediction, conditioned on the frozen Square
   encoder's standardised code): jaxcf only (diffusers has no DiffAE UNet).
3. The tiny CLIP of ``configs/dicap.py:toy`` (``foundation.clip``, ``foundation.clip_train``:
   AdamW, InfoNCE on image / caption pairs): jaxcf only.

``--dtype=bfloat16`` runs activations in bfloat16 with float32 parameters and optimizer state
(jaxcf: the models' ``dtype``; diffusers: ``torch.autocast`` with bfloat16). Compilation and
the first steps are excluded. Prints a table and writes JSON.

``--cpu_devices`` splits the CPU into JAX devices as ``python -m jaxcf.main`` does (auto: 2 on a
2-core machine; ``--cpu_devices=1`` measures one device), so jaxcf's steps are data-parallel over
them; PyTorch uses its own threads either way. ``--cpu_malloc`` restarts the command with glibc's
huge-page tunable as ``python -m jaxcf.main`` does (auto; jaxcf.utils.cpu_malloc); the whole
process runs under it, diffusers included. Each row also gives the process's user and system CPU
seconds and minor page faults per step (medians over its timed blocks).

  python benchmarks/train.py --size=small --batch=8 --steps=5 --repeats=3 --out=benchmarks/results/train_cpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from common import write_json  # noqa: E402
from ddim import SIZES  # noqa: E402  (the UNet2DModel configs shared with the DDIM benchmark)

LR, WEIGHT_DECAY = 1e-4, 0.01


def load_config(name: str, variant: str):
    spec = importlib.util.spec_from_file_location(f"{name}_config", os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(variant)


def jax_steps(update, state, batch, frozen=()):
    """A closure running ``n`` donated update steps; returns seconds."""
    import jax

    holder = [state]

    def run(n: int) -> float:
        t0 = time.perf_counter()
        s = holder[0]
        for _ in range(n):
            s, m = update(s, batch, *frozen)
        jax.block_until_ready((s, m))
        holder[0] = s
        return time.perf_counter() - t0

    return run


def step_cost(update, state, batch, frozen=()) -> float:
    """FLOPs of one compiled update step (XLA cost analysis; 0 when not reported)."""
    import jax

    cost = update.lower(state, batch, *frozen).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # XLA reports the FLOPs of one device's share of a data-parallel (SPMD) program
    return float((cost or {}).get("flops", 0.0)) * jax.device_count()


def interleaved(runners: dict, steps: int, repeats: int, usage: dict | None = None) -> dict:
    """Median seconds per step of each runner; repeats alternate between the runners. ``usage``, when
    given, receives each runner's medians per step of the process's user and system CPU seconds and
    minor page faults (``getrusage`` around its timed blocks)."""
    import resource

    for run in runners.values():  # compile / warm up (two steps: the second reuses donated buffers)
        run(2)
    times = {k: [] for k in runners}
    rusage = {k: [] for k in runners}
    for _ in range(repeats):
        for k, run in runners.items():
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            times[k].append(run(steps) / steps)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            rusage[k].append([(r1.ru_utime - r0.ru_utime) / steps, (r1.ru_stime - r0.ru_stime) / steps,
                              (r1.ru_minflt - r0.ru_minflt) / steps])
    if usage is not None:
        for k, v in rusage.items():
            user, system, faults = np.median(np.array(v), axis=0)
            usage[k] = {"user_s_per_step": float(user), "system_s_per_step": float(system),
                        "minor_faults_per_step": float(faults)}
    return {k: float(np.median(v)) for k, v in times.items()}


def jaxcf_unet_step(size: str, batch: int, dtype: str = "float32", grad: str = "per_shard"):
    """The jaxcf side of the UNet2DModel comparison, as a namespace: ``ref`` (diffusers' model with
    the random weights, on the CPU), ``model``, ``params``, ``schedule``, ``tx``, ``mesh``, ``state``,
    ``shardings``, ``update`` (the pipelines' jitted step; gradient per data shard or global, ``grad``),
    ``make_update`` (builds that step afresh: a new jitted function, traced again on first use),
    ``x0`` (the batch, NumPy) and ``batch`` (placed on the mesh)."""
    import types

    import jax.numpy as jnp
    import optax
    import torch
    from diffusers import UNet2DModel

    from jaxcf.diffusion import denoising_loss, make_schedule
    from jaxcf.models.registry import DTYPES
    from jaxcf.models.unet2d import load_unet2d
    from jaxcf.train import create_train_state, jit_update, make_mesh, make_update_fn, shard_batch

    torch.manual_seed(0)
    ref = UNet2DModel(in_channels=3, out_channels=3, **SIZES[size]).train()
    folder = tempfile.mkdtemp()
    ref.save_pretrained(folder)
    model, params = load_unet2d(folder, dtype=DTYPES[dtype], param_dtype=jnp.float32)
    res = SIZES[size]["sample_size"]
    x0 = np.random.default_rng(0).uniform(-1, 1, (batch, res, res, 3)).astype(np.float32)
    schedule = make_schedule("linear")

    mesh = make_mesh([("data", -1)])
    tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    state, shardings = create_train_state(params, tx, 0, mesh)
    shard_mesh = mesh if grad == "per_shard" else None  # per_shard: as train_eps_model trains a denoiser

    def make_update():
        return jit_update(make_update_fn(denoising_loss(model, schedule), tx, shard_mesh=shard_mesh), shardings, mesh)

    return types.SimpleNamespace(ref=ref, model=model, params=params, schedule=schedule, tx=tx, mesh=mesh,
                                 state=state, shardings=shardings, update=make_update(), make_update=make_update,
                                 x0=x0, batch=shard_batch({"image": x0}, mesh))


def unet_setup(size: str, batch: int, dtype: str, grad: str = "per_shard"):
    """(jaxcf runner, torch runner, info) for the UNet2DModel comparison."""
    import torch

    from jaxcf.diffusion import denoising_loss
    from jaxcf.train import jit_update, make_update_fn

    j = jaxcf_unet_step(size, batch, dtype, grad)
    tdev = "cuda" if torch.cuda.is_available() else "cpu"  # diffusers on the GPU when there is one
    ref, schedule, x0, b = j.ref.to(tdev), j.schedule, j.x0, j.batch
    # FLOPs of the global program for either --grad (XLA's cost analysis of the shard_map program
    # counts more: 76 against 66 GFLOP per step)
    flops = step_cost(jit_update(make_update_fn(denoising_loss(j.model, schedule), j.tx), j.shardings, j.mesh),
                      j.state, b)

    # diffusers: the same objective, t ~ U{0..T-1}, x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    abar = torch.from_numpy(np.array(schedule.alphas_cumprod, np.float32)).to(tdev)
    xt0 = torch.from_numpy(x0.transpose(0, 3, 1, 2).copy()).to(tdev)
    gen = torch.Generator(tdev).manual_seed(0)

    def torch_step():
        t = torch.randint(0, 1000, (batch,), generator=gen, device=tdev)
        eps = torch.randn(xt0.shape, generator=gen, device=tdev)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * xt0 + (1 - a).sqrt() * eps
        with torch.autocast(tdev, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            out = ref(x_t, t).sample
        loss = torch.mean((out.float() - eps) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def torch_run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            torch_step()
        if tdev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    info = {"params": sum(p.numel() for p in ref.parameters()), "resolution": SIZES[size]["sample_size"], "batch": batch,
            "step_gflop": flops / 1e9, "torch_device": tdev, "torch_threads": torch.get_num_threads()}
    return jax_steps(j.update, j.state, b), torch_run, info


def decoder_setup(batch: int | None, dtype: str, grad: str = "per_shard"):
    """jaxcf runner for the DiffAE decoder of configs/didae.py:square_tiny, trained as the pipeline does."""
    import jax
    import optax

    from jaxcf.didae.autoencoder import semantic_cond, square_encode_fn, standardized
    from jaxcf.diffusion import denoising_loss, make_schedule
    from jaxcf.models.diffae_unet import init_params as dec_init
    from jaxcf.models.encoders import init_params as enc_init
    from jaxcf.models.init import num_params
    from jaxcf.models.registry import build_model
    from jaxcf.didae.foundation import decoder_model
    from jaxcf.train import create_train_state, jit_update, make_mesh, make_update_fn, param_shardings, shard_batch
    from jaxcf.train.precision import frozen_params

    c = load_config("didae", "square_tiny")
    res, D, tc = c.data.resolution, c.encoder.embed_dim, c.decoder.train
    batch = batch or tc.batch_size
    enc = build_model("square_encoder", dict(embed_dim=D, width=c.encoder.width, num_stages=c.encoder.num_stages,
                                             num_attributes=8, resolution=res), dtype)
    enc_params = frozen_params(enc_init(enc, jax.random.key(0)), enc.dtype)
    encode = standardized(square_encode_fn(enc), np.zeros(D, np.float32), np.ones(D, np.float32))
    c.dtype = dtype
    dec = decoder_model(c, D)  # the pipeline's own config -> DiffAEUNet
    params = dec_init(dec, jax.random.key(1), zero_cond=tc.zero_cond)
    sc = c.schedule
    schedule = make_schedule(sc.name, sc.num_train_timesteps, sc.beta_start, sc.beta_end)

    mesh = make_mesh([("data", -1)])
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(tc.learning_rate))
    state, shardings = create_train_state(params, tx, 0, mesh, ema=True)
    frozen_sh = param_shardings(enc_params, mesh)
    loss_fn = denoising_loss(dec, schedule, semantic_cond(encode), tc.prediction)
    update = jit_update(make_update_fn(loss_fn, tx, ema_decay=tc.ema_decay, shard_mesh=mesh if grad == "per_shard" else None),
                        shardings, mesh, frozen_shardings=frozen_sh)
    x0 = np.random.default_rng(0).uniform(-1, 1, (batch, res, res, 3)).astype(np.float32)
    b = shard_batch({"image": x0}, mesh)
    frozen = (jax.device_put(enc_params, frozen_sh),)
    global_update = jit_update(make_update_fn(loss_fn, tx, ema_decay=tc.ema_decay), shardings, mesh,
                               frozen_shardings=frozen_sh)
    flops = step_cost(global_update, state, b, frozen)  # the global program's, as for the UNet
    info = {"params": num_params(params), "resolution": res, "batch": batch, "step_gflop": flops / 1e9,
            "config": "configs/didae.py:square_tiny decoder", "prediction": tc.prediction}
    return jax_steps(update, state, b, frozen), info


def clip_setup(batch: int | None, dtype: str):
    """jaxcf runner for the tiny CLIP of configs/dicap.py:toy, trained as the foundation does."""
    import optax

    from jaxcf.models.clip import CLIP, CLIPConfig, contrastive_loss, to_clip_input
    from jaxcf.models.init import num_params
    from jaxcf.models.registry import DTYPES
    from jaxcf.foundation.toy import world_tokenizer
    from jaxcf.train import create_train_state, jit_update, make_mesh, make_update_fn, shard_batch

    c = load_config("dicap", "toy")
    fc, res = c.foundation, c.data.resolution
    batch = batch or fc.clip_train.batch_size
    tok = world_tokenizer()
    clip = CLIP(CLIPConfig.tiny(**dict(fc.clip.to_dict(), vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                       image_size=res), dtype=DTYPES[dtype]))
    tx = optax.adamw(fc.clip_train.learning_rate, weight_decay=fc.clip_train.weight_decay)

    def loss_fn(params, b, rng):
        f = clip.encode_image(params, to_clip_input(b["image"], res))
        t = clip.encode_text(params, b["tokens"])
        return contrastive_loss(f, t, clip.logit_scale(params)), {}

    mesh = make_mesh([("data", -1)])
    state, shardings = create_train_state(clip.init, tx, 0, mesh)
    update = jit_update(make_update_fn(loss_fn, tx), shardings, mesh)
    rng = np.random.default_rng(0)
    words = ["a", "photo", "of", "a", "red", "circle", "on", "a", "blue", "background"]
    tokens = tok([" ".join(rng.permutation(words)) for _ in range(batch)], max_length=fc.text_max_len)
    b = shard_batch({"image": rng.uniform(-1, 1, (batch, res, res, 3)).astype(np.float32),
                     "tokens": np.asarray(tokens)}, mesh)
    flops = step_cost(update, state, b)
    info = {"params": num_params(state.params), "resolution": res, "batch": batch, "step_gflop": flops / 1e9,
            "config": "configs/dicap.py:toy foundation.clip"}
    return jax_steps(update, state, b), info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=sorted(SIZES), help="UNet2DModel config (benchmarks/ddim.py)")
    ap.add_argument("--batch", type=int, default=8, help="UNet2DModel batch")
    ap.add_argument("--decoder_batch", type=int, default=0, help="DiffAE decoder batch (0: the config's)")
    ap.add_argument("--clip_batch", type=int, default=0, help="CLIP batch (0: the config's)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--skip_torch", action="store_true")
    ap.add_argument("--only", default="unet,decoder,clip", help="comma-separated subset of unet,decoder,clip")
    ap.add_argument("--cpu_devices", default="auto",
                    help="JAX devices the CPU is split into (jaxcf.train.cpu_devices; auto: as python -m jaxcf.main "
                         "does, 2 on a 2-core machine); jaxcf's steps run data-parallel over them")
    ap.add_argument("--cpu_malloc", default="auto", choices=["auto", "on", "off"],
                    help="back XLA:CPU's per-step buffers with transparent huge pages (jaxcf.utils.cpu_malloc; auto: "
                         "as python -m jaxcf.main does). Process-wide: the diffusers step runs under it too")
    ap.add_argument("--grad", default="per_shard", choices=["per_shard", "global"],
                    help="UNet / decoder gradient: per_shard (as the pipelines train denoisers: per device, one flat "
                         "all-reduce; jaxcf.train.per_shard_value_and_grad) or global (one program XLA partitions)")
    ap.add_argument("--out", default="benchmarks/results/train_cpu.json")
    args = ap.parse_args()

    from jaxcf.train import cpu_devices
    from jaxcf.utils import cpu_malloc

    cpu_malloc.ensure(args.cpu_malloc)  # may restart this command with the tunable (exec), before JAX starts
    malloc = cpu_malloc.describe()
    cpu_devices.apply(args.cpu_devices)  # before JAX starts a backend
    import jax

    only = set(args.only.split(","))
    rows, runners, infos = [], {}, {}
    if "unet" in only:
        jrun, trun, infos["unet"] = unet_setup(args.size, args.batch, args.dtype, args.grad)
        runners["unet_jaxcf"] = jrun
        if not args.skip_torch:
            runners["unet_diffusers"] = trun
    if "decoder" in only:
        runners["decoder_jaxcf"], infos["decoder"] = decoder_setup(args.decoder_batch or None, args.dtype, args.grad)
    if "clip" in only:
        runners["clip_jaxcf"], infos["clip"] = clip_setup(args.clip_batch or None, args.dtype)
    usage = {}
    sec = interleaved(runners, args.steps, args.repeats, usage)

    names = {"unet_jaxcf": f"UNet2DModel '{args.size}', jaxcf", "unet_diffusers": f"UNet2DModel '{args.size}', diffusers",
             "decoder_jaxcf": "DiffAE decoder (square_tiny), jaxcf", "clip_jaxcf": "tiny CLIP (DiCap toy), jaxcf"}
    import torch

    device = (f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
              f"torch threads {torch.get_num_threads()}")
    print(f"\nTraining steps, {args.dtype}, {args.steps} steps x {args.repeats} repeats (median) on {device}")
    print(f"{'model':40s} {'params':>9s} {'batch':>6s} {'s/step':>8s} {'steps/s':>8s} {'GFLOP/s':>8s} {'vs diffusers':>13s} "
          f"{'user s':>7s} {'sys s':>6s} {'faults':>8s}")
    for k, s in sec.items():
        info = infos[k.split("_")[0]]
        ratio = sec["unet_diffusers"] / s if k == "unet_jaxcf" and "unet_diffusers" in sec else None
        gflops = info["step_gflop"] / s if k.endswith("jaxcf") and info["step_gflop"] else None
        print(f"{names[k]:40s} {info['params'] / 1e6:8.2f}M {info['batch']:6d} {s:8.3f} {1 / s:8.2f} "
              f"{gflops if gflops is not None else float('nan'):8.1f} "
              f"{(f'{ratio:.2f}x' if ratio else ('1.00x' if k == 'unet_diffusers' else '-')):>13s} "
              f"{usage[k]['user_s_per_step']:7.3f} {usage[k]['system_s_per_step']:6.3f} "
              f"{usage[k]['minor_faults_per_step']:8.0f}")
        rows.append({"model": names[k], "key": k, "seconds_per_step": s, "steps_per_s": 1 / s,
                     "gflop_per_s": gflops, "speedup_vs_diffusers": ratio, **usage[k], **info})
    out = {"dtype": args.dtype, "steps": args.steps, "repeats": args.repeats, "device": device,
           "backend": jax.default_backend(), "platform": platform.platform(), "jax": jax.__version__,
           "torch": torch.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "jax_devices": jax.device_count(), "cpu_devices": args.cpu_devices, "cpu_malloc": malloc, "grad": args.grad, "rows": rows}
    write_json(args.out, out)


if __name__ == "__main__":
    main()
