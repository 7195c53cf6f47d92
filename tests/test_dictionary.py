"""DiDAE dictionary and edits against independent solutions (scipy, float64 NumPy, closed forms)."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes

from jaxcf.didae.dictionary import (
    boundary_inversion,
    coefficients,
    procrustes_dictionary,
    project_out,
    reflect,
    reflect_all,
    svd_dictionary,
)


def _inversion(z, w, atoms, **kw):
    """Algorithm 2 applied to z: (z' [K, B, D], valid [K])."""
    edit, valid = boundary_inversion(w, atoms, **kw)
    return edit(z), valid


def _planted(N=400, D=12, K=3, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    W = Q[:, :K].T  # [K, D] semi-orthogonal
    Y = rng.choice([-1.0, 1.0], size=(N, K))
    X = Y @ W + noise * rng.normal(size=(N, D)) + rng.normal(size=D)
    return X, Y, W


def test_procrustes_matches_scipy_on_square_problems():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 6))
    Y = rng.normal(size=(50, 6))
    omega, mu = procrustes_dictionary(X, Y)
    R, _ = orthogonal_procrustes(X - X.mean(0), Y)  # argmin ||Xc R - Y||, R orthogonal
    np.testing.assert_allclose(omega, R, atol=1e-5)
    np.testing.assert_allclose(mu, X.mean(0), atol=1e-6)


def test_procrustes_recovers_a_planted_rotation_and_is_orthonormal():
    X, Y, W = _planted()
    omega, mu = procrustes_dictionary(X, Y)
    np.testing.assert_allclose(np.asarray(omega).T @ np.asarray(omega), np.eye(3), atol=1e-5)
    np.testing.assert_allclose(omega, W.T, atol=0.02)
    # optimal among semi-orthogonal W: no random one fits better
    Xc = X - X.mean(0)
    best = np.linalg.norm(Xc @ np.asarray(omega) - Y)
    rng = np.random.default_rng(2)
    for _ in range(50):
        Q, _ = np.linalg.qr(rng.normal(size=(12, 3)))
        assert np.linalg.norm(Xc @ Q - Y) >= best - 1e-4


def test_svd_dictionary_against_numpy_float64():
    X, _, W = _planted(noise=0.01)
    omega, mu = svd_dictionary(X, 3)
    _, _, Vt = np.linalg.svd(X - X.mean(0), full_matrices=False)
    # same subspace and same vectors up to sign
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(omega) * Vt[:3].T, axis=0)), np.ones(3), atol=1e-4)
    P1, P2 = np.asarray(omega) @ np.asarray(omega).T, W.T @ W
    assert np.linalg.norm(P1 - P2) < 0.05  # the top-3 subspace is the planted one


def test_reflection_flips_one_coefficient_and_keeps_the_others():
    X, Y, _ = _planted()
    omega, mu = procrustes_dictionary(X, Y)
    z = jnp.asarray(X[:7], jnp.float32)
    c = coefficients(z, omega, mu)
    for k in range(3):
        c2 = coefficients(reflect(z, omega, mu, k), omega, mu)
        np.testing.assert_allclose(c2[:, k], -c[:, k], atol=1e-4)
        others = [j for j in range(3) if j != k]
        np.testing.assert_allclose(c2[:, others], c[:, others], atol=1e-4)
        np.testing.assert_allclose(reflect_all(omega, mu)(z)[k], reflect(z, omega, mu, k), atol=1e-5)
    # the part of z outside the dictionary's span is untouched
    z2 = reflect(z, omega, mu, 1)
    np.testing.assert_allclose(project_out(z2 - mu, omega), project_out(z - mu, omega), atol=1e-4)


def test_boundary_inversion_mirrors_and_lands_on_the_boundary():
    rng = np.random.default_rng(3)
    D, K, B = 10, 4, 5
    atoms, _ = np.linalg.qr(rng.normal(size=(D, K)))
    w = rng.normal(size=D)
    z = rng.normal(size=(B, D))
    zk, valid = _inversion(jnp.asarray(z), jnp.asarray(w), jnp.asarray(atoms), lam=2.0)
    assert zk.shape == (K, B, D) and bool(valid.all())
    np.testing.assert_allclose(np.asarray(zk) @ w, -np.tile(z @ w, (K, 1)), rtol=1e-4, atol=1e-4)
    on, _ = _inversion(jnp.asarray(z), jnp.asarray(w), jnp.asarray(atoms), lam=1.0)
    np.testing.assert_allclose(np.asarray(on) @ w, 0.0, atol=1e-4)
    # z moves only along u_k: float64 closed form
    for k in range(K):
        expected = z - 2.0 * (z @ w / (w @ atoms[:, k]))[:, None] * atoms[:, k][None]
        np.testing.assert_allclose(zk[k], expected, rtol=1e-4, atol=1e-4)


def test_boundary_inversion_guards_orthogonal_atoms():
    D = 6
    atoms = np.eye(D)[:, :3]
    w = np.zeros(D)
    w[1] = 1.0  # only atom 1 can move the logit
    z = np.ones((2, D))
    zk, valid = _inversion(jnp.asarray(z), jnp.asarray(w), jnp.asarray(atoms))
    assert list(np.asarray(valid)) == [False, True, False]
    np.testing.assert_allclose(zk[0], z)
    assert np.all(np.isfinite(zk))
    w[1] = 0.0
    w[4] = 1.0
    with pytest.raises(ValueError, match="too weakly aligned with every atom"):
        _inversion(jnp.asarray(z), jnp.asarray(w), jnp.asarray(atoms))


def test_boundary_inversion_bound_skips_weakly_aligned_atoms():
    """min_alignment: an atom at cosine c with the probe moves z by lam |w.z| / (|w| c); atoms below the bound are skipped."""
    atoms = np.eye(4)[:, :3]
    w = np.array([1.0, 0.05, 0.5, 0.0])
    z = np.array([[1.0, 2.0, -1.0, 0.5]])
    _, valid = _inversion(jnp.asarray(z), jnp.asarray(w), jnp.asarray(atoms))
    assert list(np.asarray(valid)) == [True, True, True]
    zk, valid = _inversion(jnp.asarray(z), jnp.asarray(w), jnp.asarray(atoms), min_alignment=0.1)
    assert list(np.asarray(valid)) == [True, False, True]  # 0.05 / |w| = 0.045 < 0.1
    np.testing.assert_allclose(np.asarray(zk[1]), z)
    np.testing.assert_allclose(np.asarray(zk[2] @ w), -(z @ w), rtol=1e-5)  # lam = 2 mirrors the logit


def test_dictionary_errors_are_clear():
    X = np.zeros((10, 4))
    with pytest.raises(ValueError, match="dictionary size K=5 must be between 1 and the embedding size D=4"):
        svd_dictionary(X, 5)
    with pytest.raises(ValueError, match=r"labels Y must have shape \[N=10, K\]"):
        procrustes_dictionary(X, np.zeros((9, 2)))
    with pytest.raises(ValueError, match="got a vector"):
        procrustes_dictionary(X, np.zeros(10))
    with pytest.raises(ValueError, match="embeddings of shape"):
        svd_dictionary(np.zeros(4), 1)
    omega, mu = svd_dictionary(np.random.default_rng(0).normal(size=(10, 4)), 2)
    with pytest.raises(ValueError, match="atom index 2 is out of range for a dictionary of K=2 atoms"):
        reflect(jnp.zeros((1, 4)), omega, mu, 2)


def test_coefficient_bounds_clip_only_the_edited_coefficient():
    """Algorithm 2 with bounds: the edited atom's coefficient lands in [lo, hi] (clipped exactly where
    the unbounded edit leaves it), every other coefficient is unchanged; infinite bounds change nothing."""
    from jaxcf.didae.dictionary import coefficient_bounds

    rng = np.random.default_rng(0)
    D, K = 6, 3
    atoms = np.linalg.qr(rng.normal(size=(D, K)))[0].astype(np.float32)
    mu = rng.normal(size=D).astype(np.float32)
    z_fit = (mu + rng.normal(size=(500, D))).astype(np.float32)
    z = (mu + 2 * rng.normal(size=(20, D))).astype(np.float32)
    w = (atoms @ np.array([1.0, 0.5, 0.2]) + 0.1 * rng.normal(size=D)).astype(np.float32)
    lo, hi = coefficient_bounds(atoms, mu, z_fit, 0.05)
    c_fit = (z_fit.astype(np.float64) - mu) @ atoms
    np.testing.assert_allclose(lo, np.quantile(c_fit, 0.05, axis=0), rtol=1e-5)
    np.testing.assert_allclose(hi, np.quantile(c_fit, 0.95, axis=0), rtol=1e-5)
    free, _ = boundary_inversion(jnp.asarray(w), jnp.asarray(atoms), mu, 2.0)
    bound, _ = boundary_inversion(jnp.asarray(w), jnp.asarray(atoms), mu, 2.0, bounds=(lo, hi))
    unbounded, _ = boundary_inversion(jnp.asarray(w), jnp.asarray(atoms), mu, 2.0,
                                      bounds=(np.full(K, -np.inf, np.float32), np.full(K, np.inf, np.float32)))
    np.testing.assert_allclose(np.asarray(unbounded(jnp.asarray(z))), np.asarray(free(jnp.asarray(z))), atol=1e-5)
    c_free = np.einsum("kbd,dj->kbj", np.asarray(free(jnp.asarray(z)), np.float64) - mu, atoms)
    c_bound = np.einsum("kbd,dj->kbj", np.asarray(bound(jnp.asarray(z)), np.float64) - mu, atoms)
    c_in = (z.astype(np.float64) - mu) @ atoms
    for k in range(K):
        np.testing.assert_allclose(c_bound[k, :, k], np.clip(c_free[k, :, k], lo[k], hi[k]), atol=1e-4)
        others = [j for j in range(K) if j != k]
        np.testing.assert_allclose(c_bound[k][:, others], c_in[:, others], atol=1e-4)
    assert np.any(c_free[:, :, range(K)] != c_bound[:, :, range(K)])  # the bound did act on this draw
