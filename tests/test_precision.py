"""config.dtype = "bfloat16": frozen models in bf16 stay close to float32, and float32 stays where it matters.

Most bounds are measured on the shipped toy foundation (a tiny trained CLIP and UNet2D), loaded in
both dtypes by ``toy_foundation``; ``pytest -s`` prints the errors quoted in the README.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcf.diffusion import ddim_invert, ddim_sample
from jaxcf.train import create_train_state, make_mesh, make_update_fn
from jaxcf.train.precision import compute_dtype, frozen_params

BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)


def fast_jit(fun):
    """jax.jit without LLVM optimisations on the CPU: the same program, compiled about twice as fast."""
    opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return jax.jit(fun, compiler_options=opts)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def floating_dtypes(tree):
    return {jnp.dtype(x.dtype) for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def scans(jaxpr):
    """Every ``scan`` equation of a jaxpr, nested ones included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            out.append(eqn)
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    out.extend(scans(getattr(inner, "jaxpr", inner)))
    return out


@pytest.fixture(scope="module")
def toy():
    """(config, float32 foundation, bfloat16 foundation, world images [12, 32, 32, 3], labels)."""
    from jaxcf.data.shapes import shapes_dataset
    from tests.test_main import ROOT, load_config, shipped_toy_foundation

    config = load_config(os.path.join(ROOT, "configs", "dicap.py"), "toy")
    mesh = make_mesh([("data", -1)])
    found32 = shipped_toy_foundation(config, mesh)
    config.dtype = "bfloat16"
    found16 = shipped_toy_foundation(config, mesh)
    ds = shapes_dataset("test_base", resolution=config.data.resolution, num_per_class=2, seed=7)
    arr = ds.get(np.arange(len(ds)), keys=("image", "label"))
    return config, found32, found16, arr["image"], arr["label"]


def test_compute_dtype_and_frozen_params():
    params = {"w": np.ones((2, 2), np.float32), "step": np.zeros((), np.int32)}
    assert compute_dtype("bfloat16") == BF16 and compute_dtype("float32") == F32
    assert frozen_params(params, F32) is params  # float32: the very same tree, nothing cast
    cast = frozen_params(params, BF16)
    assert cast["w"].dtype == BF16 and cast["step"].dtype == np.int32
    with pytest.raises(ValueError, match="config.dtype='float16' is not allowed; allowed: 'float32', 'bfloat16'"):
        compute_dtype("float16")


def test_toy_foundation_follows_config_dtype(toy):
    _, found32, found16, _, _ = toy
    assert floating_dtypes(found32.clip_params) == floating_dtypes(found32.diffusion_params) == {F32}
    assert floating_dtypes(found16.clip_params) == floating_dtypes(found16.diffusion_params) == {BF16}
    assert found32.clip.config.dtype == F32 and found16.clip.config.dtype == BF16
    assert found16.schedule.alphas_cumprod.dtype == F32


def test_ddim_invert_and_sample_bf16_unet_close_to_float32_with_float32_carry(toy):
    """The toy UNet2D (``build_model("unet2d", ..., "bfloat16")``, bf16-cast params) under DDIM as
    DiCap's toy uses it (20 steps to 0.6 T): x_t and abar stay float32 through both scans."""
    _, found32, found16, x, _ = toy
    x0 = jnp.asarray(x[:2])

    def codec(found, debug=False):
        eps = found.eps_fn(found.diffusion_params)
        if debug:  # the same step body, Python-looped around one compiled UNet: compiles in half the time
            eps = jax.jit(eps)

        def f(x):
            x_T = ddim_invert(eps, x, None, found.schedule, 20, 0.6, debug=debug)
            return x_T, ddim_sample(eps, x_T, None, found.schedule, 20, 0.6, debug=debug)
        return f

    loops = scans(jax.make_jaxpr(codec(found16))(x0).jaxpr)
    assert len(loops) == 2  # inversion, sampling
    for eqn in loops:
        n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
        carry = [v.aval.dtype for v in eqn.outvars[:n_carry]]
        xs = {v.aval.dtype for v in eqn.invars[n_consts + n_carry:] if jnp.issubdtype(v.aval.dtype, jnp.floating)}
        assert carry == [F32] and xs == {F32}, (carry, xs)  # x_t; abar_t, abar_s
    t = jnp.full((2,), 500, jnp.int32)
    assert jax.eval_shape(found16.eps_apply, found16.diffusion_params, x0, t).dtype == BF16  # really bf16

    x_T, rec = codec(found16, debug=True)(x0)
    x_T32, rec32 = codec(found32, debug=True)(x0)
    assert x_T.dtype == rec.dtype == F32
    e_code, e_rec, e_ddim = rel_err(x_T, x_T32), rel_err(rec, rec32), rel_err(rec32, x0)
    print(f"\nDDIM bf16 vs f32 (toy UNet, 20+20 steps to 0.6T): code {e_code:.2e}, reconstruction {e_rec:.2e} "
          f"(float32 invert+sample vs the input: {e_ddim:.2e})")
    assert e_rec < 0.02 and e_rec < e_ddim / 5  # bf16 adds little to DDIM's own round-trip error
    assert e_code < 0.15


def test_diffae_decoder_bf16_eps_close_to_float32():
    from jaxcf.models.diffae_unet import DiffAEConfig, DiffAEUNet, init_params

    cfg = DiffAEConfig.preset("tiny")
    f32, bf16 = DiffAEUNet(cfg), DiffAEUNet(cfg, dtype=jnp.bfloat16)
    params = jax.device_get(init_params(f32, jax.random.key(1)))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, cfg.resolution, cfg.resolution, 3)), jnp.float32)
    z = jnp.asarray(rng.normal(size=(4, cfg.semantic_dim)), jnp.float32)
    t = jnp.asarray([10, 250, 600, 990], jnp.int32)
    ref = fast_jit(lambda p: f32.apply({"params": p}, x, t, z))(params)
    out = fast_jit(lambda p: bf16.apply({"params": p}, x, t, z))(frozen_params(params, BF16))
    assert out.dtype == BF16
    err = rel_err(out, ref)
    print(f"\nDiffAE eps bf16 vs f32 (tiny preset, random weights): {err:.2e}")
    assert err < 0.03


def test_clip_features_and_dicap_loss_bf16_close_to_float32(toy):
    import dataclasses

    from jaxcf.dicap.losses import class_cosines, dicap_loss
    from jaxcf.foundation import template_text_features

    config, found32, found16, x, y = toy
    names = list(config.data.base_classes)
    max_len = found32.clip.config.text.max_position_embeddings
    x_cf = np.clip(x[::-1] * 0.9, -1, 1)  # any second image set stands in for counterfactuals
    assert jax.eval_shape(found16.image_features, found16.clip_params, x).dtype == F32  # handed out float32

    def features_and_loss(found):
        def f(clip_params):
            fd = dataclasses.replace(found, clip_params=clip_params)
            feats = fd.clip.encode_image(clip_params, fd.to_clip(jnp.concatenate([x, x_cf])))
            f, f_cf = jnp.split(feats, 2)
            t = template_text_features(fd, names, "a photo of a {}.", max_len)
            loss, _ = dicap_loss(f, f_cf, t, jnp.asarray(y), fd.clip.logit_scale(clip_params))
            return f, t, loss, jnp.argmax(class_cosines(f, t), -1)
        return fast_jit(f)(found.clip_params)

    f, t, loss, pred = features_and_loss(found16)
    f32_f, f32_t, f32_loss, f32_pred = features_and_loss(found32)
    assert f.dtype == BF16 and t.dtype == loss.dtype == F32  # bf16 tower; float32 text features and loss
    e_img, e_txt, e_loss = rel_err(f, f32_f), rel_err(t, f32_t), abs(float(loss) / float(f32_loss) - 1)
    print(f"\nCLIP bf16 vs f32 (toy CLIP): image features {e_img:.2e}, text features {e_txt:.2e}, "
          f"DiCap loss {e_loss:.2e}, zero-shot predictions agree on {np.mean(pred == f32_pred):.0%}")
    # bf16 keeps 8 mantissa bits: image features about 1% off carry into the loss at that size
    # (1.03% with the toy CLIP shipped in round 14; its image features: 0.85%)
    assert e_img < 0.03 and e_txt < 0.03 and e_loss < 0.02


def test_prompt_training_on_frozen_bf16_clip_keeps_float32_state(toy):
    """A DiCap prompt-learning step with the bf16 CLIP passed as the frozen argument: prompt params,
    SGD momentum, gradients and loss stay float32."""
    from jaxcf.dicap.losses import dicap_loss
    from jaxcf.dicap.estimation import PromptSetup

    config, _, found, _, y = toy
    mesh = make_mesh([("data", -1)])
    setup = PromptSetup(found, list(config.data.base_classes), 4, found.clip.config.text.max_position_embeddings)
    scale = found.clip.logit_scale(found.clip_params)
    feats = np.random.default_rng(3).normal(size=(2, 8, found.clip.config.projection_dim)).astype(np.float32)
    batch = {"f": feats[0], "f_cf": feats[1], "y": np.asarray(y[:8], np.int32)}

    def loss_fn(pp, b, rng, clip_params):
        t = setup.text_features(found, clip_params, pp)
        assert t.dtype == BF16  # the text tower runs in bf16
        return dicap_loss(b["f"], b["f_cf"], t, b["y"], scale)

    tx = optax.sgd(0.1, momentum=0.9)
    init = lambda r: {"ctx": 0.02 * jax.random.normal(r, (4, found.clip.config.text.hidden_size))}  # noqa: E731
    state, _ = create_train_state(init, tx, 0, mesh)
    state, metrics = fast_jit(make_update_fn(loss_fn, tx))(state, batch, found.clip_params)
    assert floating_dtypes(state.params) == floating_dtypes(state.opt_state) == {F32}
    assert metrics["loss"].dtype == metrics["grad_norm"].dtype == F32 and np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 1


def test_eps_model_trained_with_bf16_activations_keeps_float32_state():
    """The diffusion pipeline's train step with ``config.dtype = bfloat16`` (``build_model`` gives the
    UNet bf16 activations, float32 ``param_dtype``): params, EMA, Adam moments and loss stay float32.

    Dtypes are fixed at trace time, so ``jax.eval_shape`` of the very update that ``train_eps_model``
    jits answers this without compiling a UNet backward pass (minutes of CPU)."""
    from jaxcf.diffusion import make_schedule
    from jaxcf.models.registry import build_model
    from jaxcf.diffusion.losses import eps_mse_loss
    from jaxcf.train.state import TrainState

    unet = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=8, norm_num_groups=4)
    model = build_model("unet2d", unet, "bfloat16")
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), F32)
    params = jax.eval_shape(model.init, jax.random.key(0), x, jax.ShapeDtypeStruct((2,), jnp.int32))["params"]
    assert floating_dtypes(params) == {F32}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    state = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                                                rng=jax.random.PRNGKey(0), ema_params=p), params)
    update = make_update_fn(eps_mse_loss(model, make_schedule("linear", 1000)), tx, ema_decay=0.9)
    jaxpr, (new, metrics) = jax.make_jaxpr(update, return_shape=True)(state, {"image": x})
    assert any(v.aval.dtype == BF16 for e in jaxpr.jaxpr.eqns for v in e.outvars)  # the UNet runs in bf16
    assert floating_dtypes(new.params) == floating_dtypes(new.ema_params) == floating_dtypes(new.opt_state) == {F32}
    assert metrics["loss"].dtype == F32
