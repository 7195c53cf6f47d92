"""DiDAE's models: the DiffAE UNet eps(x_t, t, z), ResNet-18, the Square encoder, and fast_init."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from jaxcf.models import encoders, resnet
from jaxcf.models.diffae_unet import DiffAEConfig, DiffAEUNet, example_inputs, init_params
from jaxcf.models.init import default_std, fast_init, num_params, variable_shapes
from jaxcf.models.registry import build_model


def fast_jit(fun, **kwargs):
    """jax.jit without LLVM optimisations on the CPU: the same program, compiled about twice as fast."""
    if jax.default_backend() == "cpu":
        kwargs.setdefault("compiler_options", {"xla_backend_optimization_level": 0})
    return jax.jit(fun, **kwargs)


def _flat(tree):
    """{path: numpy array} (numpy reductions on jax arrays would compile one program per shape)."""
    return traverse_util.flatten_dict(jax.device_get(tree))


# ---------------------------------------------------------------------------------------------
# DiffAE UNet
# ---------------------------------------------------------------------------------------------

B = 2


@pytest.fixture(scope="module")
def unet():
    """Tiny model, params, one jitted apply (traced once for the whole module) and inputs."""
    model = DiffAEUNet(DiffAEConfig.tiny())
    params = init_params(model, jax.random.key(0))
    eps_fn = fast_jit(chex.assert_max_traces(lambda p, x, t, z: model.apply({"params": p}, x, t, z), n=1))
    k = jax.random.split(jax.random.key(1), 3)
    r, d = model.config.resolution, model.config.semantic_dim
    x = jax.random.normal(k[0], (B, r, r, 3))
    z1, z2 = jax.random.normal(k[1], (B, d)), jax.random.normal(k[2], (B, d))
    t = jnp.array([3, 700])
    return model, params, eps_fn, x, t, z1, z2


def test_unet_shapes_and_z_dependence(unet):
    model, params, eps_fn, x, t, z1, z2 = unet
    e1, e2 = eps_fn(params, x, t, z1), eps_fn(params, x, t, z2)
    assert e1.shape == x.shape and e1.dtype == jnp.float32
    assert np.all(np.isfinite(e1))
    # (a) z changes eps, per example.
    diff = np.abs(np.asarray(e1 - e2)).reshape(B, -1).max(axis=1)
    assert np.all(diff > 1e-3 * np.abs(np.asarray(e1)).max()), diff


def test_unet_zero_cond_projection_removes_z(unet):
    """(b) With every cond_emb_proj at zero, h * (1 + 0) = h: eps is bitwise independent of z."""
    model, params, eps_fn, x, t, z1, z2 = unet
    flat = _flat(params)
    hits = [p for p in flat if "cond_emb_proj" in p]
    # 2 down + 2 mid + 4 up resnets, each with kernel and bias.
    assert len(hits) == 2 * 8
    zeroed = traverse_util.unflatten_dict(
        {p: (jnp.zeros_like(v) if "cond_emb_proj" in p else v) for p, v in flat.items()})
    np.testing.assert_array_equal(eps_fn(zeroed, x, t, z1), eps_fn(zeroed, x, t, z2))


def test_unet_grad_wrt_z_matches_finite_differences(unet):
    """(c) jax.grad of <w, eps(z)> against a float32 central difference along random directions."""
    model, params, eps_fn, x, t, z1, _ = unet
    w = jax.random.normal(jax.random.key(5), x.shape)
    f = lambda z: jnp.sum(w * eps_fn(params, x, t, z))
    g = fast_jit(jax.grad(lambda z: jnp.sum(w * model.apply({"params": params}, x, t, z))))(z1)
    h = 1e-2
    for i, v in enumerate(jax.random.normal(jax.random.key(6), (3,) + z1.shape)):
        v = v / jnp.linalg.norm(v)
        fd = (f(z1 + h * v) - f(z1 - h * v)) / (2 * h)
        ad = jnp.vdot(g, v)
        assert abs(float(fd - ad)) < 1e-2 * max(abs(float(ad)), 1e-1), (i, float(fd), float(ad))


def test_unet_jit_traces_once(unet):
    """(d) New values of every argument (same shapes) reuse the trace; assert_max_traces raises otherwise."""
    model, params, eps_fn, x, t, z1, z2 = unet
    for s in range(3):
        eps_fn(jax.tree.map(lambda p: p * (1 + s), params), x + s, t + s, z1 * s).block_until_ready()


def test_unet_zero_out_init(unet):
    model, _, eps_fn, x, t, z1, _ = unet
    params = init_params(model, jax.random.key(2), zero_out=True)
    np.testing.assert_array_equal(eps_fn(params, x, t, z1), 0.0)
    conv2 = [v for p, v in _flat(params).items() if p[-2] == "conv2"]
    assert conv2 and all(not np.any(v) for v in conv2)


def test_unet_bfloat16(unet):
    model, params, eps_fn, x, t, z1, _ = unet
    bf16 = DiffAEUNet(model.config, dtype=jnp.bfloat16)
    out = fast_jit(lambda p, x, t, z: bf16.apply({"params": p}, x, t, z))(params, x, t, z1)
    ref = eps_fn(params, x, t, z1)
    assert out.dtype == jnp.bfloat16 and out.shape == x.shape
    err = np.abs(np.asarray(out, np.float32) - np.asarray(ref)).max()
    assert err < 0.05 * np.abs(np.asarray(ref)).max(), err


def test_fast_init_matches_module_init_structure_and_statistics():
    """(e) Same tree, shapes and dtypes as module.init; weights with flax's default std; on a
    module cheap enough to init the slow way, per-leaf std agrees with module.init's."""
    model = DiffAEUNet(DiffAEConfig.tiny(model_channels=16, norm_groups=8))
    ex = example_inputs(model.config)
    slow_shapes = jax.eval_shape(model.init, jax.random.key(0), *ex)  # exactly module.init's output tree
    fast = fast_init(model, *ex, rng=jax.random.key(3))
    assert jax.tree.structure(fast) == jax.tree.structure(slow_shapes)
    slow_flat = traverse_util.flatten_dict(slow_shapes)
    for p, a in _flat(fast).items():
        assert a.shape == slow_flat[p].shape and a.dtype == slow_flat[p].dtype, p
        if p[-1] == "bias":
            assert not np.any(a), p
        elif p[-1] == "scale":
            np.testing.assert_array_equal(a, 1.0)
        else:
            std = default_std(p, a.shape)
            # lecun_normal: a normal truncated to +-2 of its own scale, rescaled to have this std.
            assert np.abs(a).max() <= 2 / 0.8796256 * std * 1.0001, p
            if a.size >= 1000:
                assert abs(np.std(a) / std - 1) < 0.1 and abs(np.mean(a)) < 0.1 * std, p
    # One draw is sliced, not repeated: leaves of equal shape differ.
    k = [v for p, v in _flat(fast).items() if p[-1] == "kernel" and v.shape == (3, 3, 16, 16)]
    assert len(k) >= 2 and not np.allclose(k[0], k[1])

    enc = encoders.SquareEncoder(embed_dim=32, width=8, resolution=16)
    x = jnp.zeros((1, 16, 16, 3))
    slow = fast_jit(enc.init)(jax.random.key(0), x)  # eager or fully optimised: ~14 s on a busy CPU
    fast = fast_init(enc, x, rng=jax.random.key(0))
    assert jax.tree.structure(fast) == jax.tree.structure(slow)
    slow_flat = _flat(slow)
    for p, a in _flat(fast).items():
        b = slow_flat[p]
        assert a.shape == b.shape and a.dtype == b.dtype, p
        if p[-1] == "kernel" and a.size >= 1000:
            assert abs(np.std(a) / np.std(b) - 1) < 0.15, (p, np.std(a), np.std(b))


def test_fast_init_std_fn_and_unknown_leaves():
    enc = encoders.SquareEncoder(embed_dim=8, width=4, num_stages=1, resolution=8)
    x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    params = fast_init(enc, x, rng=jax.random.key(0), std_fn=lambda p, s: 0.0 if p[-2] == "head" else None)["params"]
    assert not np.any(params["head"]["kernel"]) and np.any(params["embed"]["kernel"])

    import flax.linen as nn

    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x * self.param("gain", nn.initializers.ones, (1,))

    with pytest.raises(ValueError, match="gain"):
        fast_init(Odd(), x, rng=jax.random.key(0))


@pytest.mark.parametrize("overrides, match", [
    ({"attention_resolutions": (5,)}, "'attention_resolutions'.*allowed.*8, 4"),
    ({"channel_mult": ()}, "'channel_mult'"),
    ({"resolution": 9}, "'resolution'"),
    ({"norm_groups": 3}, "'norm_groups'"),
    ({"num_heads": 3, "head_dim": None}, "'num_heads'"),
    ({"head_dim": 3}, "'head_dim'"),
    ({"semantic_dim": 0}, "'semantic_dim'"),
])
def test_diffae_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        DiffAEConfig.tiny(**overrides)


def test_diffae_presets_and_input_errors(unet):
    model, params, _, x, t, z1, _ = unet
    square = DiffAEConfig.preset("square")
    assert square.level_channels == (64, 128, 256, 512) and square.num_res_blocks == 2
    assert square.level_resolutions[2] == 16 and square.attention_resolutions == (16,)
    m = build_model("diffae_unet", {"preset": "square_tiny"})
    n = num_params(variable_shapes(m, *example_inputs(m.config)))
    assert 0.5e6 < n < 3e6, n  # CPU-trainable at 32 px
    with pytest.raises(ValueError, match="preset"):
        DiffAEConfig.preset("huge")
    with pytest.raises(ValueError, match="semantic_dim"):
        model.apply({"params": params}, x, t, z1[:, :-1])
    with pytest.raises(ValueError, match="resolution"):
        model.apply({"params": params}, x[:, :4, :4], t, z1)


# ---------------------------------------------------------------------------------------------
# ResNet-18
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem, classes, expected", [("imagenet", 1000, 11_689_512), ("cifar", 10, 11_173_962)])
def test_resnet18_parameter_count(stem, classes, expected):
    """torchvision resnet18: 11,689,512; its CIFAR variant (3x3 stem, no max-pool): 11,173,962."""
    model = resnet.ResNet(resnet.ResNetConfig(num_classes=classes, stem=stem))
    shapes = variable_shapes(model, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    assert num_params(shapes["params"]) == expected
    assert num_params(shapes["batch_stats"]) == 2 * 4800  # running mean and var of every BatchNorm
    assert model.config.feature_dim == 512


def test_resnet_batchnorm_train_vs_eval():
    model = resnet.ResNet(resnet.ResNetConfig(num_classes=3, stem="cifar", width=0.125))
    v = resnet.init_variables(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3)) + 0.5

    @fast_jit
    def run(v, x):
        logits, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
        ev, same = model.apply(v, x, train=False, mutable=["batch_stats"])
        feats = model.apply(v, x, method=model.features)
        return logits, upd["batch_stats"], ev, same["batch_stats"], feats

    logits, new_stats, ev, same_stats, feats = run(v, x)
    assert logits.shape == (4, 3) and ev.shape == (4, 3) and feats.shape == (4, 64)
    assert logits.dtype == jnp.float32
    chex.assert_trees_all_equal(same_stats, v["batch_stats"])  # eval mode leaves the statistics alone
    # Train mode: running = 0.9 * running + 0.1 * batch statistic; check the stem's BatchNorm exactly.
    k = v["params"]["backbone"]["conv1"]["kernel"]
    y = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(new_stats["backbone"]["bn1"]["mean"], 0.1 * y.mean(axis=(0, 1, 2)), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(new_stats["backbone"]["bn1"]["var"], 0.9 + 0.1 * y.var(axis=(0, 1, 2)), rtol=1e-4)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), new_stats, v["batch_stats"]))
    assert all(changed)


def test_resnet_groupnorm_bfloat16_and_errors():
    model = build_model("resnet", {"num_classes": 2, "stem": "imagenet", "width": 0.25, "norm": "group",
                                   "norm_groups": 8}, "bfloat16")
    v = resnet.init_variables(model, jax.random.key(0))
    assert set(v) == {"params"}  # GroupNorm: no batch_stats
    out = fast_jit(lambda v, x: model.apply(v, x))(v, jnp.ones((2, 32, 32, 3)))
    assert out.shape == (2, 2) and out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    with pytest.raises(ValueError, match="stem.*allowed"):
        resnet.ResNetConfig(stem="vit")
    with pytest.raises(ValueError, match="norm_groups"):
        resnet.ResNetConfig(norm="group", width=0.125, norm_groups=32)


# ---------------------------------------------------------------------------------------------
# Square encoder
# ---------------------------------------------------------------------------------------------


def test_square_encoder_shapes_dtypes_and_errors():
    x = jnp.zeros((3, 32, 32, 3))
    for dtype in (jnp.float32, jnp.bfloat16):
        enc = encoders.SquareEncoder(embed_dim=24, num_attributes=8, dtype=dtype)
        params = encoders.init_params(enc, jax.random.key(0))
        z, logits = fast_jit(lambda p, x: enc.apply({"params": p}, x))(params, x)
        assert z.shape == (3, 24) and logits.shape == (3, 8) and z.dtype == logits.dtype == dtype
    with pytest.raises(ValueError, match="resolution"):
        enc.apply({"params": params}, jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match="embed_dim"):
        encoders.SquareEncoder(embed_dim=0)


def test_square_encoder_learns_attributes():
    """A few Adam steps on 64 Square images reduce the attribute BCE."""
    from jaxcf.data.square import square_dataset

    ds = square_dataset(split="unbiased", num_samples=64, resolution=32)
    batch = ds.get(np.arange(len(ds)), keys=("image", "attributes"))
    x, y = jnp.asarray(batch["image"]), jnp.asarray(batch["attributes"], jnp.float32)
    enc = build_model("square_encoder", {"embed_dim": 64, "num_attributes": 8, "resolution": 32})
    params = encoders.init_params(enc, jax.random.key(0))
    tx = optax.adam(3e-3)

    def loss_fn(p):
        return optax.sigmoid_binary_cross_entropy(enc.apply({"params": p}, x)[1], y).mean()

    @fast_jit
    def step(p, opt):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(p, u), opt, loss

    opt = tx.init(params)
    losses = []
    for _ in range(20):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses
