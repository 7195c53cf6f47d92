"""DiDAE edits, the diffusion autoencoder and the CFKD pieces, each against an independent reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcf.didae import cfkd
from jaxcf.didae.autoencoder import DiffusionAutoencoder
from jaxcf.didae.dictionary import boundary_inversion, procrustes_dictionary, reflect, reflect_all
from jaxcf.diffusion import make_schedule


def _problem(seed=0, N=64, D=10, K=3):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(N, D)).astype(np.float32)
    omega, mu = procrustes_dictionary(z, rng.normal(size=(N, K)))
    return z, np.asarray(omega), np.asarray(mu), rng


def test_atom_edits_equal_reflection_and_algorithm_2():
    z, omega, mu, rng = _problem()
    refl = reflect_all(omega, mu)(z)  # [K, N, D]
    for k in range(omega.shape[1]):
        np.testing.assert_allclose(refl[k], reflect(z, omega, mu, k), atol=1e-5)
    w = rng.normal(size=z.shape[1]).astype(np.float32)
    edit, valid = boundary_inversion(jnp.asarray(w), jnp.asarray(omega), mu, lam=2.0)
    assert bool(np.all(valid))
    z64, w64, o64, mu64 = (np.asarray(a, np.float64) for a in (z, w, omega, mu))
    for k in range(omega.shape[1]):  # float64 closed form on centred codes
        expected = z64 - 2.0 * ((z64 - mu64) @ w64 / (w64 @ o64[:, k]))[:, None] * o64[:, k][None]
        np.testing.assert_allclose(np.asarray(edit(z)[k]), expected, rtol=1e-4, atol=1e-4)
    # lam = 2 mirrors the probe's logit on centred codes: w.(z'_k - mu) = -w.(z - mu)
    edited = np.asarray(edit(z))
    np.testing.assert_allclose((edited - mu) @ w, -np.broadcast_to((z - mu) @ w, edited.shape[:2]), rtol=1e-3,
                               atol=1e-3)


def test_boundary_inversion_guards_and_errors():
    z, omega, mu, _ = _problem(D=6, K=2)
    w = np.zeros(6, np.float32)
    with pytest.raises(ValueError, match="too weakly aligned with every atom"):
        boundary_inversion(jnp.asarray(w), jnp.asarray(omega), mu)
    # a probe orthogonal to atom 0 only: atom 0 is left unedited, atom 1 is used
    w = np.asarray(omega[:, 1])
    edit, valid = boundary_inversion(jnp.asarray(w), jnp.asarray(omega), mu)
    assert list(np.asarray(valid)) == [False, True]
    np.testing.assert_allclose(np.asarray(edit(z))[0], z, atol=1e-6)


def _irls(z, y, l2, iters=50):
    """Float64 Newton's method for BCE + l2 |w|^2 (no bias): the independent reference."""
    z = z.astype(np.float64)
    w = np.zeros(z.shape[1])
    n = len(y)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-z @ w))
        g = z.T @ (p - y) / n + 2 * l2 * w
        H = (z * (p * (1 - p))[:, None]).T @ z / n + 2 * l2 * np.eye(len(w))
        w -= np.linalg.solve(H, g)
    return w


def test_distill_probe_matches_newton_reference():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(400, 5)).astype(np.float32)
    w_true = np.array([2.0, -1.0, 0.5, 0.0, 0.0])
    y = (rng.random(400) < 1 / (1 + np.exp(-z @ w_true))).astype(np.float32)
    l2 = 1e-2 * np.std(z) ** 2  # distill_probe's l2 acts on the standardised codes
    w = np.asarray(cfkd.distill_probe(z, y, l2=1e-2, steps=2000, learning_rate=0.05))
    ref = _irls(z, y, l2)
    np.testing.assert_allclose(w, ref, rtol=0.02, atol=0.02)
    assert cfkd.probe_agreement(z, w, y) > 0.7
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        cfkd.distill_probe(z, y[:10])


def test_linear_probe_with_bias_matches_newton_reference():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(400, 3)).astype(np.float32)
    y = (rng.random(400) < 1 / (1 + np.exp(-(z @ [1.5, -1.0, 0.0] + 0.8)))).astype(np.float32)
    s = np.std(z)  # fit_linear_probe's l2 acts on the standardised codes, the intercept is not penalised
    w, b = cfkd.fit_linear_probe(z, y, bias=True, l2=1e-2, steps=3000, learning_rate=0.05)
    # float64 Newton on [z, 1] with the same penalty on w only
    za = np.concatenate([z, np.ones((400, 1))], 1).astype(np.float64)
    p = np.zeros(4)
    pen = np.diag([2 * 1e-2 * s ** 2] * 3 + [0.0])
    for _ in range(50):
        q = 1 / (1 + np.exp(-za @ p))
        g = za.T @ (q - y) / 400 + pen @ p
        H = (za * (q * (1 - q))[:, None]).T @ za / 400 + pen
        p -= np.linalg.solve(H, g)
    np.testing.assert_allclose(np.asarray(w), p[:3], rtol=0.02, atol=0.02)
    assert float(b) == pytest.approx(p[3], abs=0.02)


def test_padded_batches_cover_every_row_once():
    from jaxcf.data.common import padded_batches

    x = np.arange(10)[:, None]
    chunks = list(padded_batches(x, 4))
    assert [c.shape for c, _ in chunks] == [(4, 1)] * 3 and [n for _, n in chunks] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([c[:n] for c, n in chunks])[:, 0], np.arange(10))
    np.testing.assert_array_equal(chunks[-1][0][:, 0], [8, 9, 9, 9])  # padded with the last real row


def test_group_metrics_gain_and_flips_by_hand():
    label = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    group = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    pred = np.array([0, 0, 1, 1, 1, 0, 1, 1])  # groups: 1.0, 0.0, 0.5, 1.0
    np.testing.assert_allclose(cfkd.group_accuracies(pred, label, group), [1.0, 0.0, 0.5, 1.0])
    assert cfkd.aga(pred, label, group) == pytest.approx(0.625)
    assert cfkd.worst_group_accuracy(pred, label, group) == 0.0
    assert cfkd.gain(0.5, 0.75) == pytest.approx(0.5)
    assert cfkd.flip_rate([0.2, 0.51, 0.9, 0.5]) == 0.5
    assert cfkd.nafr([0.9, 0.9, 0.1], [0.9, 0.1, 0.9]) == pytest.approx(1 / 3)


def test_disentanglement_matrix_and_teachers():
    before = np.array([[0.1, 0.5], [0.3, 0.5]])
    after = np.stack([before + [0.4, 0.0], before + [0.0, -0.2]])  # atom 0 moves factor 0, atom 1 factor 1
    m = cfkd.disentanglement_matrix(before, after)
    np.testing.assert_allclose(m, [[0.4, 0.0], [0.0, 0.2]], atol=1e-9)
    atom_true = cfkd.preclustered_atom_labels(m, true_factor=0)
    assert list(atom_true) == [True, False]
    y = np.array([0, 1])
    is_true, lab = cfkd.preclustered_labels(atom_true, y)
    np.testing.assert_array_equal(lab, [[1, 0], [0, 1]])  # true atom: flipped; false atom: source label
    is_true, lab = cfkd.model_teacher_labels(np.array([0, 1]), np.array([[1, 1], [0, 0]]), y)
    np.testing.assert_array_equal(is_true, [[True, False], [False, True]])
    np.testing.assert_array_equal(lab, [[1, 1], [0, 0]])
    x, yy = cfkd.counterfactual_training_set(np.arange(4).reshape(2, 2), lab, [[True, False], [False, True]])
    assert list(x) == [0, 3] and list(yy) == [1, 0]
    with pytest.raises(ValueError, match="out of range"):
        cfkd.preclustered_atom_labels(m, true_factor=5)


def test_mixed_batches_are_deterministic_and_mixed():
    a = cfkd.mixed_batch_indices(100, 10, 16, step=3, seed=0, mix=0.5)
    b = cfkd.mixed_batch_indices(100, 10, 16, step=3, seed=0, mix=0.5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len(a[0]) == 8 and len(a[1]) == 8 and a[1].max() < 10
    orig, cf = cfkd.mixed_batch_indices(100, 0, 16, step=0, seed=0)
    assert len(orig) == 16 and len(cf) == 0


def test_autoencoder_decodes_all_edits_in_one_call():
    from jaxcf.models.diffae_unet import DiffAEConfig, DiffAEUNet, init_params

    cfg = DiffAEConfig.preset("tiny", semantic_dim=4)
    model = DiffAEUNet(cfg)
    params = init_params(model, jax.random.key(0))
    enc = lambda p, x: jnp.mean(x, axis=(1, 2)) @ p  # a linear "Phi": [B, R, R, 3] -> [B, 4]
    enc_params = jax.random.normal(jax.random.key(1), (3, 4))
    ae = DiffusionAutoencoder(model, enc, make_schedule("linear", 1000, 1e-4, 0.02), num_steps=4)
    x = jax.random.uniform(jax.random.key(2), (2, 8, 8, 3), minval=-1, maxval=1)
    z = ae.encode(enc_params, x)
    x_T = jax.jit(ae.invert)(params, x, z)
    z_edits = jnp.stack([z, -z, 2 * z])
    out = jax.jit(ae.decode_edits)(params, x_T, z_edits)
    assert out.shape == (3, 2, 8, 8, 3)
    decode = jax.jit(ae.decode)
    for k in range(3):
        np.testing.assert_allclose(out[k], decode(params, x_T, z_edits[k]), rtol=1e-4, atol=1e-4)
    x_cf, z2, _ = jax.jit(lambda e, p, x: ae.counterfactuals(e, p, x, lambda z: z[None]))(enc_params, params, x)
    np.testing.assert_allclose(x_cf[0], decode(params, x_T, z), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(z2, z)
    # residual edits: the decoded change added to the input; the identity edit returns the input
    res = jax.jit(lambda e, p, x: ae.counterfactuals(e, p, x, lambda z: jnp.stack([z, -z]), residual=True)[0])
    x_res = res(enc_params, params, x)
    np.testing.assert_allclose(x_res[0], x, atol=5e-4)  # float32 noise of two decodes of an untrained net
    expect = jnp.clip(x + decode(params, x_T, -z) - decode(params, x_T, z), -1, 1)
    np.testing.assert_allclose(x_res[1], expect, rtol=1e-4, atol=5e-4)  # the same float32 noise as above
