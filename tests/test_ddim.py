"""The DDIM core against closed forms: Gaussian data has an exact eps, a point mass an exact step."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcf.diffusion import (
    chain_guided_denoise,
    ddim_invert,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    denoise_to_x0,
    edit_mask,
    eps_from_v,
    grow_mask,
    guidance_gradient,
    guided_denoise,
    make_schedule,
    normalized_gradient,
    predict_x0,
)

MU, SIGMA = 0.3, 0.5


def gaussian_eps(schedule, mu=MU, sigma=SIGMA):
    """Exact eps for x0 ~ N(mu, sigma^2 I): E[eps | x_t] = sqrt(1-a)(x_t - sqrt(a) mu) / (a sigma^2 + 1 - a)."""

    def eps_fn(x_t, t, cond):
        a = schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
        return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * mu) / (a * sigma**2 + 1 - a)

    return eps_fn


def test_schedules_closed_form():
    lin = make_schedule("linear")
    np.testing.assert_allclose(np.asarray(lin.betas)[[0, -1]], [1e-4, 0.02], rtol=1e-6)
    np.testing.assert_allclose(lin.alphas_cumprod, np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-5)
    sl = make_schedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    np.testing.assert_allclose(sl.betas, np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, rtol=1e-5)
    cos = make_schedule("cosine")
    f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(cos.alphas_cumprod[:500], f(np.arange(1, 501)) / f(0), rtol=1e-4)
    for s in (lin, sl, cos):
        assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)
    with pytest.raises(ValueError, match="unknown noise schedule 'sigmoid'; allowed: linear, scaled_linear, cosine"):
        make_schedule("sigmoid")


def test_timesteps_grid_and_errors():
    ts = ddim_timesteps(50, 1000, 1.0)
    assert ts[0] == 0 and ts[-1] == 999 and len(ts) == 51 and np.all(np.diff(ts) > 0)
    assert ddim_timesteps(20, 1000, 0.6)[-1] == 599
    with pytest.raises(ValueError, match="depth must be in"):
        ddim_timesteps(10, 1000, 1.5)
    with pytest.raises(ValueError, match="depth must be in"):
        ddim_timesteps(10, 1000, 0.0)
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        ddim_timesteps(0)


def test_step_is_exact_for_a_point_mass():
    # For data concentrated at mu, eps(x_t) = (x_t - sqrt(a_t) mu) / sqrt(1 - a_t) exactly, and one DDIM
    # step lands on x_s = sqrt(a_s) mu + sqrt(1 - a_s) eps whatever the step size.
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(2, 4, 4, 3))
    e = rng.normal(size=mu.shape)
    for a_t, a_s in [(0.3, 0.9), (0.9, 0.3), (0.05, 0.999)]:
        x_t = np.sqrt(a_t) * mu + np.sqrt(1 - a_t) * e
        x_s = ddim_step(jnp.asarray(x_t, jnp.float32), jnp.asarray(e, jnp.float32), a_t, a_s)
        np.testing.assert_allclose(x_s, np.sqrt(a_s) * mu + np.sqrt(1 - a_s) * e, atol=1e-5)
        np.testing.assert_allclose(predict_x0(jnp.asarray(x_t), jnp.asarray(e), a_t), mu, atol=1e-5)


def test_eta_adds_noise_with_the_posterior_variance():
    x_t, e = jnp.zeros((20000, 1)), jnp.zeros((20000, 1))
    a_t, a_s = 0.4, 0.7
    k1, k2 = jax.random.split(jax.random.key(0))
    det = ddim_step(x_t, e, a_t, a_s)
    s1 = ddim_step(x_t, e, a_t, a_s, eta=1.0, key=k1)
    s2 = ddim_step(x_t, e, a_t, a_s, eta=1.0, key=k2)
    assert not np.allclose(s1, det) and not np.allclose(s1, s2)
    # eta = 1 is DDPM: sigma^2 = (1 - a_s)/(1 - a_t) (1 - a_t/a_s)
    sigma = np.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
    assert abs(float(jnp.std(s1)) - sigma) < 0.02 * sigma
    with pytest.raises(ValueError, match="explicit PRNG"):
        ddim_step(x_t, e, a_t, a_s, eta=0.5)


def test_eta_changes_samples_and_needs_key():
    sch = make_schedule("linear")
    x_T = jax.random.normal(jax.random.key(1), (4, 8))
    eps_fn = gaussian_eps(sch)
    det = ddim_sample(eps_fn, x_T, None, sch, 10)
    sto = ddim_sample(eps_fn, x_T, None, sch, 10, eta=1.0, key=jax.random.key(2))
    sto2 = ddim_sample(eps_fn, x_T, None, sch, 10, eta=1.0, key=jax.random.key(2))
    assert not np.allclose(det, sto)
    np.testing.assert_array_equal(sto, sto2)
    with pytest.raises(ValueError, match="explicit PRNG"):
        ddim_sample(eps_fn, x_T, None, sch, 10, eta=1.0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_invert_then_sample_reconstructs_with_shrinking_error(schedule):
    sch = make_schedule(schedule)
    eps_fn = gaussian_eps(sch)
    x0 = MU + SIGMA * jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
    errors = []  # mean abs reconstruction error; DDIM inversion is first order, so ~ 1 / num_steps
    for n in (10, 25, 100):
        x_T = ddim_invert(eps_fn, x0, None, sch, n)
        rec = ddim_sample(eps_fn, x_T, None, sch, n)
        errors.append(float(jnp.mean(jnp.abs(rec - x0))))
        if n == 100:
            assert float(jnp.max(jnp.abs(rec - x0))) < 0.15
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] / errors[1] < 0.35, errors  # 4x the steps: about 4x smaller
    assert errors[2] < 0.03, errors
    # Inversion really reaches noise: at T the code is close to standard normal.
    x_T = ddim_invert(eps_fn, x0, None, sch, 100)
    assert abs(float(jnp.std(x_T)) - 1.0) < 0.1


def test_partial_depth_round_trip():
    sch = make_schedule("linear")
    eps_fn = gaussian_eps(sch)
    x0 = MU + SIGMA * jax.random.normal(jax.random.key(3), (8, 16))
    x_t = ddim_invert(eps_fn, x0, None, sch, 100, depth=0.6)
    a = float(sch.alphas_cumprod[599])
    # At depth 0.6 the code keeps sqrt(abar) of the signal: still correlated with x0.
    assert float(jnp.corrcoef(x_t.ravel(), x0.ravel())[0, 1]) > 0.5 * np.sqrt(a)
    rec = ddim_sample(eps_fn, x_t, None, sch, 100, depth=0.6)
    assert float(jnp.mean(jnp.abs(rec - x0))) < 0.02


def test_scan_and_python_loop_agree():
    sch = make_schedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    eps_fn = gaussian_eps(sch)
    x0 = MU + SIGMA * jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    a, ta = ddim_invert(eps_fn, x0, None, sch, 20, return_trajectory=True)
    b, tb = ddim_invert(eps_fn, x0, None, sch, 20, return_trajectory=True, debug=True)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ta, tb, rtol=1e-6, atol=1e-6)
    assert ta.shape == (21,) + x0.shape
    np.testing.assert_allclose(ddim_sample(eps_fn, a, None, sch, 20),
                               ddim_sample(eps_fn, a, None, sch, 20, debug=True), rtol=1e-6, atol=1e-6)


def _linear_classifier(w):
    """log p(y | x) = log_sigmoid((2y - 1) <w, x>) per example."""

    def log_prob(x, t, y):
        logit = jnp.sum(x.reshape(x.shape[0], -1) * w.reshape(1, -1), axis=1)
        return jax.nn.log_sigmoid(jnp.where(y == 1, logit, -logit))

    return log_prob


@pytest.mark.parametrize("guide_on,through", [("x0", False), ("x0", True), ("xt", False)])
def test_guidance_gradient_matches_finite_differences(guide_on, through):
    sch = make_schedule("linear")
    x = jax.random.normal(jax.random.key(0), (2, 3, 3, 1), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (3, 3, 1))
    # a non-linear noise model, so gradients through it are not trivial
    eps_fn = lambda x_t, t, c: jnp.tanh(x_t * 0.7) + 0.1 * x_t**2  # noqa: E731
    log_prob = _linear_classifier(w)
    t = jnp.array([400, 400])
    a = sch.alphas_cumprod[400]
    y = jnp.array([1, 0])
    _, g = guidance_gradient(eps_fn, log_prob, x, t, a, None, y, guide_on=guide_on, grad_through_eps=through)

    def objective(xx):
        eps = eps_fn(xx, t, None)
        if guide_on == "x0" and not through:
            eps = eps_fn(x, t, None)  # eps held at the base point
        inp = predict_x0(xx, eps, a) if guide_on == "x0" else xx
        return float(jnp.sum(log_prob(inp, t, y)))

    h = 1e-2
    xn = np.asarray(x, np.float64)
    fd = np.zeros_like(xn)
    for idx in np.ndindex(xn.shape):
        e = np.zeros_like(xn)
        e[idx] = h
        fd[idx] = (objective(jnp.asarray(xn + e, jnp.float32)) - objective(jnp.asarray(xn - e, jnp.float32))) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=2e-2, atol=2e-3)


def test_guided_sample_moves_toward_target():
    sch = make_schedule("linear")
    eps_fn = gaussian_eps(sch, mu=0.0, sigma=1.0)
    w = jnp.full((4, 4, 1), 0.25)
    log_prob = _linear_classifier(w)
    x0 = jax.random.normal(jax.random.key(0), (64, 4, 4, 1))
    x_t = ddim_invert(eps_fn, x0, None, sch, 20, depth=0.7)
    target = jnp.where(jnp.sum(x0, axis=(1, 2, 3)) > 0, 0, 1)  # the other class
    p = lambda x: jnp.mean(jnp.exp(log_prob(x, None, target)))  # noqa: E731
    plain = guided_denoise(eps_fn, log_prob, x_t, None, target, 0.0, sch, 20, depth=0.7)
    # s = 0 is ordinary DDIM sampling
    np.testing.assert_allclose(plain, ddim_sample(eps_fn, x_t, None, sch, 20, depth=0.7), atol=1e-5)
    moved = guided_denoise(eps_fn, log_prob, x_t, None, target, 10.0, sch, 20, depth=0.7)
    assert float(p(moved)) > float(p(plain)) + 0.3
    # per-example scales: an example with s = 0 is untouched
    scales = jnp.where(jnp.arange(64) % 2 == 0, 0.0, 10.0)
    mixed = guided_denoise(eps_fn, log_prob, x_t, None, target, scales, sch, 20, depth=0.7)
    np.testing.assert_allclose(mixed[::2], plain[::2], atol=1e-5)
    np.testing.assert_allclose(mixed[1::2], moved[1::2], atol=1e-5)


def test_normalized_gradient_guidance():
    """Unit RMS per example (against NumPy); with a classifier whose gradient is a constant w_y the
    normalized action equals the plain one at the per-example scale s / rms(w_y)."""
    g = np.random.default_rng(0).normal(size=(3, 4, 4, 2)) * np.array([0.01, 1.0, 50.0])[:, None, None, None]
    want = g / np.sqrt(np.mean(g ** 2, axis=(1, 2, 3), keepdims=True))
    np.testing.assert_allclose(normalized_gradient(jnp.asarray(g, jnp.float32)), want, rtol=1e-5)
    sch = make_schedule("linear")
    eps_fn = gaussian_eps(sch, mu=0.0, sigma=1.0)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 1)) * np.array([0.1, 3.0])[:, None, None, None],
                    jnp.float32)
    log_prob = lambda x, t, y: jnp.sum(x * w[y], axis=(1, 2, 3))  # noqa: E731
    x_t = jax.random.normal(jax.random.key(2), (4, 4, 4, 1))
    y = jnp.array([0, 1, 1, 0])
    rms = jnp.sqrt(jnp.mean(w[y] ** 2, axis=(1, 2, 3)))
    normed = guided_denoise(eps_fn, log_prob, x_t, None, y, 0.5, sch, 10, depth=0.6, guide_on="xt",
                            normalize_gradient=True)
    plain = guided_denoise(eps_fn, log_prob, x_t, None, y, 0.5 / rms, sch, 10, depth=0.6, guide_on="xt")
    np.testing.assert_allclose(normed, plain, rtol=1e-4, atol=1e-5)


def test_edit_mask_against_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 9, 9, 3)).astype(np.float32) * 0.3
    d = np.abs(a - b).mean(-1)
    for dil in (0, 1, 2):
        want = np.zeros_like(d)
        for i, r, c in zip(*np.nonzero(d > 0.35)):  # every pixel within dil (Chebyshev) of an edited one
            want[i, max(r - dil, 0):r + dil + 1, max(c - dil, 0):c + dil + 1] = 1
        got = edit_mask(jnp.asarray(a), jnp.asarray(b), 0.35, dil)
        assert got.shape == (3, 9, 9, 1)
        np.testing.assert_array_equal(np.asarray(got)[..., 0], want)
        grown = grow_mask(jnp.asarray(d > 0.35, jnp.float32)[..., None], dil)
        np.testing.assert_array_equal(np.asarray(grown)[..., 0], want)


def test_masked_action_keeps_what_guidance_does_not_edit():
    """A classifier that reads only a 2x2 patch, on a model with per-pixel eps: the masked action
    returns every pixel more than mask_dilation away from the patch exactly (from the source's own
    inversion trajectory) and still moves the patch toward the target."""
    sch = make_schedule("linear")
    eps_fn = gaussian_eps(sch, mu=0.0, sigma=1.0)
    w = jnp.zeros((8, 8, 1)).at[2:4, 2:4].set(1.0)
    log_prob = _linear_classifier(w)
    x0 = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
    x_t, traj = ddim_invert(eps_fn, x0, None, sch, 20, depth=0.7, return_trajectory=True)
    target = jnp.where(jnp.sum(x0 * w, axis=(1, 2, 3)) > 0, 0, 1)
    p = lambda x: jnp.mean(jnp.exp(log_prob(x, None, target)))  # noqa: E731
    plain = guided_denoise(eps_fn, log_prob, x_t, None, target, 0.0, sch, 20, depth=0.7)
    # the threshold sits above what DDIM's own round trip moves a pixel (at most 0.47 here)
    masked = guided_denoise(eps_fn, log_prob, x_t, None, target, 10.0, sch, 20, depth=0.7,
                            source_trajectory=traj, mask_threshold=0.6, mask_dilation=1)
    outside = np.ones((8, 8), bool)
    outside[1:5, 1:5] = False  # the patch grown by one pixel
    np.testing.assert_array_equal(np.asarray(masked)[:, outside], np.asarray(x0)[:, outside])
    assert not np.allclose(np.asarray(plain)[:, outside], np.asarray(x0)[:, outside], atol=1e-6)  # DDIM alone drifts
    assert float(p(masked)) > float(p(plain)) + 0.3
    # nothing above the threshold: the source comes back exactly; everything: the unmasked action
    kept = guided_denoise(eps_fn, log_prob, x_t, None, target, 10.0, sch, 20, depth=0.7,
                          source_trajectory=traj, mask_threshold=1e9)
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(x0))
    free = guided_denoise(eps_fn, log_prob, x_t, None, target, 10.0, sch, 20, depth=0.7,
                          source_trajectory=traj, mask_threshold=-1.0)
    np.testing.assert_allclose(free, guided_denoise(eps_fn, log_prob, x_t, None, target, 10.0, sch, 20, depth=0.7),
                               atol=1e-6)
    # a fixed mask: the patch alone is edited, every other pixel is the source's
    fixed = guided_denoise(eps_fn, log_prob, x_t, None, target, 10.0, sch, 20, depth=0.7,
                           source_trajectory=traj, mask=(w[None] > 0).astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(fixed)[:, np.asarray(w[..., 0]) == 0], np.asarray(x0)[:, np.asarray(w[..., 0]) == 0])
    assert float(p(fixed)) > float(p(plain)) + 0.3
    with pytest.raises(ValueError, match="source_trajectory must be"):
        guided_denoise(eps_fn, log_prob, x_t, None, target, 10.0, sch, 20, depth=0.7, source_trajectory=traj[1:])


def test_eps_from_v():
    sch = make_schedule("linear")
    x0 = jax.random.normal(jax.random.key(0), (3, 5))
    e = jax.random.normal(jax.random.key(1), (3, 5))
    t = jnp.array([10, 500, 900])
    a = sch.alphas_cumprod[t][:, None]
    x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * e
    v = jnp.sqrt(a) * e - jnp.sqrt(1 - a) * x0
    np.testing.assert_allclose(eps_from_v(lambda x, tt, c: v, sch)(x_t, t, None), e, atol=1e-5)


def test_jitted_functions_trace_once():
    sch = make_schedule("linear")
    eps_fn = gaussian_eps(sch)
    log_prob = _linear_classifier(jnp.ones((4, 4, 1)))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def invert(x):
        return ddim_invert(eps_fn, x, None, sch, 10)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def sample(x):
        return ddim_sample(eps_fn, x, None, sch, 10)

    @functools.partial(jax.jit, static_argnames=())
    @chex.assert_max_traces(n=1)
    def guided(x, y, s):
        return guided_denoise(eps_fn, log_prob, x, None, y, s, sch, 10)

    chex.clear_trace_counter()
    for seed in range(3):
        x = jax.random.normal(jax.random.key(seed), (2, 4, 4, 1))
        sample(invert(x))
        guided(x, jnp.array([0, 1]), jnp.float32(seed))


def test_denoise_to_x0_is_the_tail_of_ddim_sample():
    """From grid level i the inner chain equals i steps of ddim_sample on the same grid, for a traced i too."""
    sch = make_schedule("linear")
    eps_fn = gaussian_eps(sch)
    x0 = MU + SIGMA * jax.random.normal(jax.random.key(0), (4, 6))
    n = 8
    traj = ddim_invert(eps_fn, x0, None, sch, n, depth=0.8, return_trajectory=True)[1]
    for level in (1, 3, n):
        want = ddim_sample(eps_fn, traj[n], None, sch, n, depth=0.8)
        if level < n:  # sample the grid's last `level` steps: the same grid with `level` of them
            x = traj[level]
            ts = np.asarray(ddim_timesteps(n, 1000, 0.8))
            alphas = np.asarray(sch.alphas_cumprod)[ts]
            alphas[0] = 1.0
            for k in range(level, 0, -1):
                x = ddim_step(x, eps_fn(x, jnp.full((4,), ts[k]), None), alphas[k], alphas[k - 1])
            want = x
        got, eps = denoise_to_x0(eps_fn, traj[level], None, sch, n, 0.8, level)
        traced, _ = jax.jit(lambda x, lv: denoise_to_x0(eps_fn, x, None, sch, n, 0.8, lv))(traj[level], level)
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(traced, want, atol=1e-5)
        t = ddim_timesteps(n, 1000, 0.8)[level]
        np.testing.assert_allclose(eps, eps_fn(traj[level], jnp.full((4,), t), None), atol=1e-6)


def test_chain_guidance_calls_and_gradient():
    """DiME guidance: N(N + 1) / 2 noise-model calls for N steps; its gradient is that of the whole
    chain (finite differences); s = 0 is plain sampling; guidance moves toward the target."""
    sch = make_schedule("linear")
    calls = []

    def counted(x_t, t, c):
        jax.debug.callback(lambda: calls.append(1))
        return gaussian_eps(sch, mu=0.0, sigma=1.0)(x_t, t, c)

    w = jnp.full((4, 4, 1), 0.25)
    log_prob = _linear_classifier(w)
    x0 = jax.random.normal(jax.random.key(0), (32, 4, 4, 1))
    n = 6
    x_t = ddim_invert(gaussian_eps(sch, 0.0, 1.0), x0, None, sch, n, depth=0.7)
    target = jnp.where(jnp.sum(x0, axis=(1, 2, 3)) > 0, 0, 1)
    calls.clear()
    plain = jax.jit(lambda x: chain_guided_denoise(counted, log_prob, x, None, target, 0.0, sch, n, 0.7))(x_t)
    jax.block_until_ready(plain)
    jax.effects_barrier()
    assert len(calls) == n * (n + 1) // 2
    np.testing.assert_allclose(plain, ddim_sample(gaussian_eps(sch, 0.0, 1.0), x_t, None, sch, n, depth=0.7),
                               atol=1e-5)
    p = lambda x: float(jnp.mean(jnp.exp(log_prob(x, None, target))))  # noqa: E731
    moved = chain_guided_denoise(gaussian_eps(sch, 0.0, 1.0), log_prob, x_t, None, target, 10.0, sch, n, 0.7)
    assert p(moved) > p(plain) + 0.3

    # the gradient flows through every step of the chain: compare with finite differences
    eps_fn = lambda x, t, c: jnp.tanh(x * 0.7) + 0.1 * x**2  # noqa: E731
    xx = jax.random.normal(jax.random.key(1), (1, 2, 2, 1))
    f = lambda x: jnp.sum(_linear_classifier(w[:2, :2])(  # noqa: E731
        denoise_to_x0(eps_fn, x, None, sch, n, 0.7, 4)[0], None, jnp.array([1])))
    g = jax.grad(f)(xx)
    h, xn = 1e-2, np.asarray(xx, np.float64)
    fd = np.zeros_like(xn)
    for idx in np.ndindex(xn.shape):
        e = np.zeros_like(xn)
        e[idx] = h
        fd[idx] = (float(f(jnp.asarray(xn + e, jnp.float32))) - float(f(jnp.asarray(xn - e, jnp.float32)))) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=2e-2, atol=2e-3)


def test_implicit_guidance_is_bayes_rule_on_a_gaussian_mixture():
    """A class-conditional model's implied classifier: for x0 | y ~ N(mu_y, s^2 I) with equal priors
    the exact eps(x_t, y), the exact unconditional eps and log p(y | x_t) are all closed forms, so
    -(eps(x_t, y) - eps(x_t)) / sqrt(1 - abar) must equal the gradient of the exact log-posterior."""
    sch = make_schedule("linear")
    mus, sig = jnp.array([-0.5, 0.5]), 0.5

    def class_eps(x, t, y):  # E[eps | x_t, y]
        a = sch.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mus[y].reshape(-1, 1, 1, 1)) / (a * sig**2 + 1 - a)

    def log_post(x, t):  # log p(y | x_t) for both classes [B, 2]
        a = sch.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        ll = jnp.stack([-jnp.sum((x - jnp.sqrt(a) * m) ** 2, (1, 2, 3)) / (2 * (a[:, 0, 0, 0] * sig**2 + 1 - a[:, 0, 0, 0]))
                        for m in mus], -1)
        return jax.nn.log_softmax(ll, -1)

    def eps_fn(x, t, cond):  # cond: labels, or None for the unconditional (mixture) model
        if cond is not None:
            return class_eps(x, t, cond)
        w = jnp.exp(log_post(x, t))
        return sum(w[:, k].reshape(-1, 1, 1, 1) * class_eps(x, t, jnp.full(x.shape[:1], k)) for k in range(2))

    x = jax.random.normal(jax.random.key(1), (6, 3, 3, 1))
    t = jnp.array([50, 200, 400, 600, 800, 950])
    a = sch.alphas_cumprod[t]
    y = jnp.array([0, 1, 0, 1, 1, 0])
    eps, g = guidance_gradient(eps_fn, None, x, t, a, None, y, guide_on="implicit")
    want = jax.grad(lambda xx: jnp.sum(jnp.take_along_axis(log_post(xx, t), y[:, None], 1)))(x)
    np.testing.assert_allclose(eps, eps_fn(x, t, None), rtol=1e-6)
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5)
    # guided DDIM with it is classifier-free guidance: eps + s (eps(x_t, y) - eps(x_t)) at every step
    x_T = ddim_invert(eps_fn, x, None, sch, 10, depth=0.6)
    got = guided_denoise(eps_fn, None, x_T, None, y, 3.0, sch, 10, depth=0.6, guide_on="implicit")
    cfg_eps = lambda xx, tt, c: eps_fn(xx, tt, None) + 3.0 * (eps_fn(xx, tt, y) - eps_fn(xx, tt, None))  # noqa: E731
    np.testing.assert_allclose(got, ddim_sample(cfg_eps, x_T, None, sch, 10, depth=0.6), rtol=1e-4, atol=1e-5)
