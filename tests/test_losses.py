"""The eps / v / x0 parameterisations against float64 closed forms."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxcf.diffusion import PREDICTIONS, as_eps_fn, denoising_loss, make_schedule, q_sample
from jaxcf.diffusion.losses import eps_and_x0, target


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_target_and_its_inverse_recover_eps_and_x0(prediction):
    r = np.random.default_rng(0)
    x0, eps = r.normal(size=(2, 3, 4, 4, 3))
    abar = np.array([0.9, 0.05, 0.5])
    a = abar[:, None, None, None]
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps  # float64 reference
    want = {"eps": eps, "x0": x0, "v": np.sqrt(a) * eps - np.sqrt(1 - a) * x0}[prediction]
    out = target(prediction, jnp.asarray(x0, jnp.float32), jnp.asarray(eps, jnp.float32), jnp.asarray(abar, jnp.float32))
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5)
    e, x = eps_and_x0(prediction, out, jnp.asarray(x_t, jnp.float32), jnp.asarray(abar, jnp.float32))
    np.testing.assert_allclose(np.asarray(e), eps, atol=2e-4)
    np.testing.assert_allclose(np.asarray(x), x0, atol=2e-4)


def test_as_eps_fn_clamps_x0_and_returns_the_consistent_eps():
    schedule = make_schedule("linear", 1000)
    t = jnp.array([10, 500, 999])
    abar = np.asarray(schedule.alphas_cumprod, np.float64)[np.asarray(t)][:, None, None, None]
    x_t = np.random.default_rng(1).normal(size=(3, 4, 4, 3)) * 2
    v = np.random.default_rng(2).normal(size=x_t.shape)
    fn = as_eps_fn(lambda x, tt, c: jnp.asarray(v, jnp.float32), schedule, "v", clip_x0=True)
    got = np.asarray(fn(jnp.asarray(x_t, jnp.float32), t, None))
    x0 = np.clip(np.sqrt(abar) * x_t - np.sqrt(1 - abar) * v, -1, 1)  # float64: v -> x0, clamp, -> eps
    np.testing.assert_allclose(got, (x_t - np.sqrt(abar) * x0) / np.sqrt(1 - abar), rtol=1e-4, atol=1e-4)
    identity = lambda x, tt, c: x
    assert as_eps_fn(identity, schedule, "eps") is identity  # eps without clamping: the model itself
    with pytest.raises(ValueError, match="prediction='w'; allowed"):
        as_eps_fn(identity, schedule, "w")


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_denoising_loss_is_the_mse_to_the_target(prediction):
    """A 'network' that returns its input: the loss must equal mean((x_t - target)^2) recomputed in numpy."""
    schedule = make_schedule("linear", 1000)

    class Identity:
        @staticmethod
        def apply(params, x_t, t):
            return x_t * params["params"]["w"]

    x0 = np.random.default_rng(3).uniform(-1, 1, size=(4, 4, 4, 3)).astype(np.float32)
    rng = jax.random.key(5)
    loss, _ = denoising_loss(Identity, schedule, prediction=prediction)({"w": 1.0}, {"image": jnp.asarray(x0)}, rng)
    k_t, k_e = jax.random.split(rng)  # the draws the loss makes
    t = np.asarray(jax.random.randint(k_t, (4,), 0, 1000))
    eps = np.asarray(jax.random.normal(k_e, x0.shape), np.float64)
    a = np.asarray(schedule.alphas_cumprod, np.float64)[t][:, None, None, None]
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    want = {"eps": eps, "x0": x0, "v": np.sqrt(a) * eps - np.sqrt(1 - a) * x0}[prediction]
    np.testing.assert_allclose(float(loss), np.mean((x_t - want) ** 2), rtol=1e-4)


def test_max_t_draws_only_levels_below_it_and_q_sample_is_the_forward_process():
    """max_t: the network sees only t < max_t (recorded by a probe 'network'); q_sample against float64."""
    schedule = make_schedule("linear", 1000)
    seen = []

    class Probe:
        @staticmethod
        def apply(params, x_t, t):
            jax.debug.callback(lambda t: seen.append(np.asarray(t)), t)
            return x_t

    x0 = jnp.zeros((64, 2, 2, 1))
    for i in range(4):
        denoising_loss(Probe, schedule, max_t=50)({}, {"image": x0}, jax.random.key(i))
    seen = np.concatenate(seen)
    assert seen.max() < 50 and len(np.unique(seen)) > 30  # below max_t, and spread over it
    with pytest.raises(ValueError, match="max_t=0; allowed: 1..1000"):
        denoising_loss(Probe, schedule, max_t=0)
    x = np.random.default_rng(0).uniform(-1, 1, (3, 2, 2, 1))
    e = np.random.default_rng(1).normal(size=x.shape)
    t = np.array([0, 500, 999])
    a = np.asarray(schedule.alphas_cumprod, np.float64)[t][:, None, None, None]
    np.testing.assert_allclose(np.asarray(q_sample(schedule, jnp.asarray(x, jnp.float32), jnp.asarray(t),
                                                   jnp.asarray(e, jnp.float32))),
                               np.sqrt(a) * x + np.sqrt(1 - a) * e, rtol=1e-5, atol=1e-6)
