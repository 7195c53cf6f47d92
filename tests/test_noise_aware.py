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


def test_nuisance_context_reads_the_renderers_factors():
    """Against the factors the renderer drew: the background colour exactly, the object colour where a
    pixel is fully covered, and a square at the object's box for every shape."""
    from jaxcf.data.shapes import COLOR_NAMES, COLOR_RGB, render_shapes, sample_factors, with_shape
    from jaxcf.dicap.noise_aware import nuisance_context

    rng = np.random.default_rng(0)
    f = sample_factors(rng.integers(0, 12, 40), rng.integers(0, len(COLOR_NAMES), 40), rng, resolution=32,
                       sizes=(9, 21))
    box_y, box_x = f[:, 5] + f[:, 3] / 2, f[:, 4] + f[:, 3] / 2  # the box the template is drawn in
    for shape in range(12):
        img = render_shapes(with_shape(f, np.full(40, shape)), resolution=32)[0].astype(np.float32) / 127.5 - 1
        c = np.asarray(nuisance_context(jnp.asarray(img)))
        assert c.shape == (40, 32, 32, 7)
        np.testing.assert_allclose(c[:, 5, 7, 1:4], COLOR_RGB[f[:, 2]] / 127.5 - 1, atol=1e-6)
        np.testing.assert_allclose(c[:, 0, 0, 4:7], COLOR_RGB[f[:, 1]] / 127.5 - 1, atol=1e-6)
        square = c[..., 0] > 0
        for i in range(40):
            ys, xs = np.nonzero(square[i].any(1))[0], np.nonzero(square[i].any(0))[0]
            assert abs((ys[0] + ys[-1] + 1) / 2 - box_y[i]) <= 1 and abs((xs[0] + xs[-1] + 1) / 2 - box_x[i]) <= 1
            assert f[i, 3] - 5 <= len(ys) <= f[i, 3] + 1 and f[i, 3] - 5 <= len(xs) <= f[i, 3] + 1, (shape, i)
    empty = np.asarray(nuisance_context(jnp.full((1, 8, 8, 3), 0.3)))
    assert empty[..., 0].max() == 0 and np.allclose(empty[..., 1:4], 0.3) and np.allclose(empty[..., 4:7], 0.3)


def test_context_classifier_reads_the_sources_content():
    """A context classifier needs the source; its log-probability depends on it; the loss tells it the
    clean image's content (equal to the loss computed by hand)."""
    import pytest
    from jaxcf.dicap.noise_aware import CONTEXT_CHANNELS, nuisance_context

    model = NoiseAwareClassifier(num_classes=3, channels=(8, 16), groups=4, context=True)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    params = model.init(jax.random.key(0), x, jnp.zeros(2, jnp.int32), jnp.zeros((2, 8, 8, CONTEXT_CHANNELS)))["params"]
    with pytest.raises(ValueError, match="source"):
        noise_aware_log_prob(model, params)
    src_a = jnp.full((2, 8, 8, 3), -0.5).at[:, 2:5, 2:5].set(0.7)
    src_b = jnp.full((2, 8, 8, 3), 0.4).at[:, 4:8, 1:5].set(-0.9)
    y = jnp.zeros(2, jnp.int32)
    a = np.asarray(noise_aware_log_prob(model, params, source=src_a)(x, 10, y))
    b = np.asarray(noise_aware_log_prob(model, params, source=src_b)(x, 10, y))
    assert np.all(np.isfinite(a)) and np.abs(a - b).max() > 1e-4
    sch = make_schedule("linear", 1000, 1e-4, 0.02)
    batch = {"image": src_a, "label": jnp.asarray([0, 2], jnp.int32)}
    loss, _ = noisy_classification_loss(model, sch, max_t=300)(params, batch, jax.random.key(5))
    x_t, t = noisy_images(sch, src_a, jax.random.key(5), 300)
    logits = model.apply({"params": params}, x_t, t, nuisance_context(src_a))
    np.testing.assert_allclose(float(loss), float(optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"]).mean()), rtol=1e-6)
