"""jaxcf's GroupNorm against the float64 formula, PyTorch, and flax's parameter layout."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxcf.models.blocks import GroupNorm


def group_norm_f64(x, groups, eps, gamma, beta):
    x = np.asarray(x, np.float64)
    b, c = x.shape[0], x.shape[-1]
    g = x.reshape(b, -1, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
    return y * gamma + beta


def params(c, seed=0):
    r = np.random.default_rng(seed)
    return r.normal(size=c).astype(np.float32), r.normal(size=c).astype(np.float32)


@pytest.mark.parametrize("shape,groups", [((3, 8, 8, 64), 32), ((2, 5, 7, 12), 4), ((2, 16, 24), 8), ((1, 4, 4, 8), 1)])
def test_matches_float64_formula(shape, groups):
    x = (np.random.default_rng(1).normal(size=shape) * 3 + 5).astype(np.float32)  # offset: tests the two passes
    gamma, beta = params(shape[-1])
    y = GroupNorm(groups, 1e-5).apply({"params": {"scale": gamma, "bias": beta}}, x)
    np.testing.assert_allclose(np.asarray(y), group_norm_f64(x, groups, 1e-5, gamma, beta), atol=2e-5, rtol=1e-5)


def test_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).normal(size=(4, 16, 16, 32)).astype(np.float32)
    gamma, beta = params(32, 3)
    ref = torch.nn.GroupNorm(8, 32, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(gamma))
        ref.bias.copy_(torch.from_numpy(beta))
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    y = GroupNorm(8, 1e-6).apply({"params": {"scale": gamma, "bias": beta}}, x)
    np.testing.assert_allclose(np.asarray(y), want, atol=1e-5)


def test_flax_parameter_names_and_gradient():
    """Same parameter tree as flax.linen.GroupNorm (checkpoints keep loading); same gradients."""
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 6, 6, 16)), jnp.float32)
    ours, theirs = GroupNorm(4, 1e-5), nn.GroupNorm(num_groups=4, epsilon=1e-5, use_fast_variance=False)
    p_ours = ours.init(jax.random.key(0), x)
    p_theirs = theirs.init(jax.random.key(0), x)
    assert jax.tree.structure(p_ours) == jax.tree.structure(p_theirs)
    p = {"params": {"scale": jnp.linspace(0.5, 1.5, 16), "bias": jnp.linspace(-1, 1, 16)}}
    loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)) * x)
    g_ours = jax.grad(loss(ours), argnums=(0, 1))(p, x)
    g_theirs = jax.grad(loss(theirs), argnums=(0, 1))(p, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_theirs)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_bfloat16_input_keeps_dtype_with_float32_statistics():
    x = np.random.default_rng(5).normal(size=(2, 4, 4, 8)).astype(np.float32) + 100.0
    y = GroupNorm(2, 1e-5).apply({"params": {"scale": np.ones(8, np.float32), "bias": np.zeros(8, np.float32)}},
                                 jnp.asarray(x, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    want = group_norm_f64(np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)), 2, 1e-5, 1.0, 0.0)
    np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=0.05)


@pytest.mark.parametrize("shape,groups", [((2, 6, 6, 16), 4), ((3, 10, 12), 3), ((1, 4, 4, 8), 8)])
def test_written_out_gradient_matches_autodiff_of_the_formula(shape, groups):
    """GroupNorm's custom gradient (two passes) against autodiff of the plain float32 formula, for
    x, scale and bias, on image- and sequence-shaped inputs."""
    r = np.random.default_rng(6)
    x = jnp.asarray(r.normal(size=shape) * 3 + 1, jnp.float32)
    c = shape[-1]
    p = {"scale": jnp.asarray(r.normal(size=c), jnp.float32), "bias": jnp.asarray(r.normal(size=c), jnp.float32)}
    w = jnp.asarray(r.normal(size=shape), jnp.float32)

    def formula(p, x):
        xg = x.reshape(shape[0], -1, groups, c // groups)
        mean = xg.mean(axis=(1, 3), keepdims=True)
        var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
        return ((xg - mean) / jnp.sqrt(var + 1e-5)).reshape(shape) * p["scale"] + p["bias"]

    loss = lambda f: lambda p, x: jnp.sum(jnp.tanh(f(p, x)) * w)  # noqa: E731
    ours = jax.grad(loss(lambda p, x: GroupNorm(groups, 1e-5).apply({"params": p}, x)), argnums=(0, 1))(p, x)
    ref = jax.grad(loss(formula), argnums=(0, 1))(p, x)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * float(jnp.abs(b).max()), rtol=0)
