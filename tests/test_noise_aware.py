"""The noise-aware anti-causal predictor p(y | x_t, t) used by DiCap's guide_on="xt"."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcf.dicap.noise_aware import (NoiseAwareClassifier, noise_aware_log_prob, noisy_classification_loss,
                                     noisy_images)
from jaxcf.diffusion import make_schedule


def _model():
    return NoiseAwareClassifier(num_classes=3, channels=(8, 16), groups=4)


def test_noisy_images_follow_the_forward_process():
    sch = make_schedule("linear", 1000, 1e-4, 0.02)
    x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)), jnp.float32)
    rng = jax.random.key(3)
    x_t, t = noisy_images(sch, x0, rng, max_t=500)
    k_t, k_e = jax.random.split(rng)
    eps = np.asarray(jax.random.normal(k_e, x0.shape))
    abar = np.asarray(sch.alphas_cumprod, np.float64)[np.asarray(t)][:, None, None, None]
    np.testing.assert_allclose(np.asarray(x_t), np.sqrt(abar) * np.asarray(x0) + np.sqrt(1 - abar) * eps,
                               atol=1e-5)
    assert 0 <= int(t.min()) and int(t.max()) < 500


def test_log_prob_normalises_over_the_chosen_classes():
    model = _model()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 3)), jnp.float32)
    params = model.init(jax.random.key(0), x, jnp.zeros(2, jnp.int32))["params"]
    lp = noise_aware_log_prob(model, params, classes=(0, 2))
    total = sum(np.exp(np.asarray(lp(x, 10, jnp.full(2, y, jnp.int32)))) for y in (0, 1))
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)
    g = jax.grad(lambda xx: lp(xx, 10, jnp.zeros(2, jnp.int32)).sum())(x)
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).max()) > 0


def test_learns_a_class_visible_through_the_noise():
    """Class = which half of the image is bright; trained on noised copies it must read the class at
    low and moderate noise (chance is 1/3)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 192)
    x = np.full((192, 8, 8, 3), -0.8, np.float32)
    for i, c in enumerate(y):
        if c == 0:
            x[i, :4] = 0.8
        elif c == 1:
            x[i, 4:] = 0.8
    x, y = jnp.asarray(x), jnp.asarray(y, jnp.int32)
    sch = make_schedule("linear", 1000, 1e-4, 0.02)
    model = _model()
    params = model.init(jax.random.key(0), x[:2], jnp.zeros(2, jnp.int32))["params"]
    tx = optax.adam(3e-3)
    opt = tx.init(params)
    loss_fn = noisy_classification_loss(model, sch, max_t=400)

    @jax.jit
    def step(params, opt, k):
        idx = jax.random.randint(k, (64,), 0, 192)
        (_, _), g = jax.value_and_grad(loss_fn, has_aux=True)(params, {"image": x[idx], "label": y[idx]}, k)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt

    for s in range(150):
        params, opt = step(params, opt, jax.random.key(s))
    for t in (0, 200):
        x_t = jnp.sqrt(sch.alphas_cumprod[t]) * x + jnp.sqrt(1 - sch.alphas_cumprod[t]) * jax.random.normal(
            jax.random.key(9), x.shape)
        acc = float(jnp.mean(jnp.argmax(model.apply({"params": params}, x_t, jnp.full(192, t)), -1) == y))
        assert acc > 0.9, (t, acc)
