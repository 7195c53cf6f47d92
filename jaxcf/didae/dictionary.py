"""The dictionary Omega of DiDAE (METHODS.md §2.4-2.5) and the edits made with it.

Omega is [D, K] with orthonormal columns (atoms), fitted on held-out embeddings X [N, D] with
mean mu [D]. Edits act on semantic codes z [B, D]; the decoder turns edited codes into images.
Every function is pure jax.numpy and jittable; inputs are checked with clear errors first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _check_embeddings(X, name="X"):
    if np.ndim(X) != 2:
        raise ValueError(f"{name} must be embeddings of shape [N, D], got shape {np.shape(X)}")


def _check_atoms(K: int, D: int, field: str = "K"):
    if not 1 <= K <= D:
        raise ValueError(f"dictionary size {field}={K} must be between 1 and the embedding size D={D}")


def procrustes_dictionary(X, Y, mu=None):
    """Supervised atoms: Omega = W^T with W = argmin ||Xc W^T - Y|| s.t. W W^T = I.

    X: [N, D] embeddings; Y: [N, K] attribute labels (one column per atom); mu: [D] (default the
    mean of X). With M = Y^T Xc = U S V^T, W = U V^T. Returns (Omega [D, K], mu [D]).
    """
    _check_embeddings(X)
    N, D = np.shape(X)
    if np.ndim(Y) == 1:
        raise ValueError(f"labels Y must be [N, K] (one column per atom), got a vector of shape {np.shape(Y)}; "
                         f"use Y[:, None] for a single atom")
    if np.ndim(Y) != 2 or np.shape(Y)[0] != N:
        raise ValueError(f"labels Y must have shape [N={N}, K], got {np.shape(Y)}")
    _check_atoms(np.shape(Y)[1], D)
    X = jnp.asarray(X, jnp.float32)
    mu = jnp.mean(X, axis=0) if mu is None else jnp.asarray(mu, jnp.float32)
    M = jnp.asarray(Y, jnp.float32).T @ (X - mu)  # [K, D]
    U, _, Vt = jnp.linalg.svd(M, full_matrices=False)  # U [K, K], Vt [K, D]
    return (U @ Vt).T, mu


def svd_dictionary(X, K: int, mu=None):
    """Unsupervised atoms: the top-K right singular vectors of the centred X. Returns (Omega [D, K], mu)."""
    _check_embeddings(X)
    _check_atoms(K, np.shape(X)[1])
    X = jnp.asarray(X, jnp.float32)
    mu = jnp.mean(X, axis=0) if mu is None else jnp.asarray(mu, jnp.float32)
    _, _, Vt = jnp.linalg.svd(X - mu, full_matrices=False)
    return Vt[:K].T, mu


def coefficients(z, omega, mu):
    """c = Omega^T (z - mu): [B, D] -> [B, K]."""
    return (z - mu) @ omega


def _check_atom_index(k, K):
    if isinstance(k, (int, np.integer)) and not -K <= k < K:
        raise ValueError(f"atom index {k} is out of range for a dictionary of K={K} atoms")


def reflect(z, omega, mu, k: int):
    """z' = z - 2 c_k omega_k: flips the sign of coefficient k, leaving every other one unchanged."""
    _check_atom_index(k, omega.shape[1])
    c = coefficients(z, omega, mu)[:, k]  # [B]
    return z - 2.0 * c[:, None] * omega[:, k][None, :]


def reflect_all(z, omega, mu):
    """All K reflections at once: [B, D] -> [K, B, D]."""
    c = coefficients(z, omega, mu)  # [B, K]
    return z[None] - 2.0 * jnp.einsum("bk,dk->kbd", c, omega)


def atom_alignment(w, atoms, eps: float = 1e-6, min_alignment: float = 0.0):
    """The guard of Algorithm 2: (w^T u_k [K], valid [K]) for the atoms (columns of atoms [D, K]).

    An atom can move the probe's logit when |w^T u_k| >= eps; with ``min_alignment`` > 0 it must
    also satisfy |w^T u_k| >= min_alignment |w| (the cosine between the probe and a unit atom), a
    bound on the edit length lam |w^T z| / |w^T u_k| that keeps edits near the code manifold.
    Raises ValueError (outside jit) when no atom is valid.
    """
    wu = atoms.T @ w  # [K]
    valid = (jnp.abs(wu) >= eps) & (jnp.abs(wu) >= min_alignment * jnp.linalg.norm(w))
    if not isinstance(wu, jax.core.Tracer) and not bool(jnp.any(valid)):
        raise ValueError(f"the probe is too weakly aligned with every atom (|w.u_k| < max({eps}, {min_alignment} |w|) "
                         f"for all K={atoms.shape[1]}): no atom can move its decision; use other atoms, another probe "
                         "or a smaller min_alignment")
    return wu, valid


def boundary_inversion(z, w, atoms, lam: float = 2.0, eps: float = 1e-6, min_alignment: float = 0.0):
    """Algorithm 2: z'_k = z - lam (w^T z / w^T u_k) u_k for each atom u_k (columns of atoms [D, K]).

    lam = 2 mirrors the probe's logit (w^T z' = -w^T z); lam = 1 lands on the boundary. Atoms that
    fail the guard (:func:`atom_alignment`) are left unedited. Returns (z' [K, B, D], valid [K]).
    """
    (U, V, alpha), valid = boundary_edit(w, atoms, lam, eps, min_alignment)
    return apply_atom_edits(z, jnp.zeros_like(z[0]), U, V, alpha), valid


def reflection_edit(omega):
    """Reflections of all K atoms in the linear form of :func:`apply_atom_edits`: (U, V, alpha)."""
    return omega, omega, jnp.full((omega.shape[1],), 2.0, omega.dtype)


def boundary_edit(w, atoms, lam: float = 2.0, eps: float = 1e-6, min_alignment: float = 0.0):
    """Algorithm 2 in the linear form of :func:`apply_atom_edits`: returns ((U, V, alpha), valid [K]).

    The guard of :func:`atom_alignment`; invalid atoms get alpha = 0 (no edit).
    """
    wu, valid = atom_alignment(w, atoms, eps, min_alignment)
    alpha = jnp.where(valid, lam / jnp.where(valid, wu, 1.0), 0.0)
    V = jnp.broadcast_to(w[:, None], atoms.shape)
    return (atoms, V, alpha), valid


def apply_atom_edits(z, mu, U, V, alpha):
    """The form every DiDAE edit shares: z'_k = z - alpha_k ((z - mu) . v_k) u_k, for k = 1..K.

    Reflection: v_k = u_k = omega_k, alpha_k = 2. Algorithm 2 on centred codes: v_k = w,
    alpha_k = lam / (w . u_k). One compiled decoder program serves both (only arrays change).
    z: [B, D]; mu: [D]; U, V: [D, K]; alpha: [K] -> [K, B, D].
    """
    s = ((z - mu) @ V) * alpha  # [B, K]
    return z[None] - jnp.einsum("bk,dk->kbd", s, U)


def project_out(phi, Q):
    """The projection baseline: phi - Q Q^T phi removes the span of Q [D, J] from phi [B, D]."""
    return phi - (phi @ Q) @ Q.T
