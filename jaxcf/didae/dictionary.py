"""The dictionary Omega of DiDAE (METHODS.md §2.4-2.5) and the edits made with it.

Omega is [D, K] with orthonormal columns (atoms), fitted on held-out embeddings X [N, D] with
mean mu [D]. Edits act on semantic codes z [B, D]; the decoder turns edited codes into images.
Every function is pure jax.numpy and jittable; inputs are checked with clear errors first.
"""

from __future__ import annotations

import flax.struct
from typing import Optional

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


@flax.struct.dataclass
class AtomEdits:
    """K linear edits of a code, the form every DiDAE edit shares (one compiled decoder program
    serves them all; only these arrays change):

        z'_k = z - alpha_k ((z - mu) . v_k) u_k,   k = 1..K

    U, V: [D, K]; alpha: [K]; mu: [D]. Calling it maps z [B, D] -> z' [K, B, D].
    """

    U: jax.Array
    V: jax.Array
    alpha: jax.Array
    mu: jax.Array
    lo: Optional[jax.Array] = None  # [K] bounds of the edited coefficient (z' - mu) . u_k, or None
    hi: Optional[jax.Array] = None

    def __call__(self, z):
        return apply_atom_edits(z, self.mu, self.U, self.V, self.alpha, self.lo, self.hi)

    def astype(self, dtype) -> "AtomEdits":
        return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), self)


def reflect_all(omega, mu) -> AtomEdits:
    """The reflections of all K atoms: z'_k = z - 2 c_k omega_k with c = Omega^T (z - mu), flipping
    the sign of coefficient k and leaving every other one unchanged (:func:`reflect` for one atom)."""
    omega = jnp.asarray(omega)
    return AtomEdits(omega, omega, jnp.full((omega.shape[1],), 2.0, omega.dtype), jnp.asarray(mu))


def boundary_inversion(w, atoms, mu=None, lam: float = 2.0, eps: float = 1e-6, min_alignment: float = 0.0,
                       bounds=None):
    """Algorithm 2: z'_k = z - lam (w^T (z - mu) / w^T u_k) u_k for each atom u_k (columns of atoms [D, K]).

    w [D] is the distilled probe on codes centred by mu (default 0). lam = 2 mirrors the probe's
    logit (w^T z' = -w^T z); lam = 1 lands on the boundary. Atoms that fail the guard
    (:func:`atom_alignment`) get alpha = 0 (left unedited). ``bounds`` = (lo, hi) [K] (from
    :func:`coefficient_bounds`; a jaxcf addition, None = the paper's edit) keeps the edited
    coefficient (z' - mu) . u_k inside the range the codes occupy. Returns (AtomEdits, valid [K]).
    """
    wu, valid = atom_alignment(w, atoms, eps, min_alignment)
    alpha = jnp.where(valid, lam / jnp.where(valid, wu, 1.0), 0.0)
    V = jnp.broadcast_to(w[:, None], atoms.shape)
    mu = jnp.zeros(atoms.shape[0], atoms.dtype) if mu is None else jnp.asarray(mu)
    lo, hi = (None, None) if bounds is None else (jnp.asarray(bounds[0]), jnp.asarray(bounds[1]))
    return AtomEdits(atoms, V, alpha, mu, lo, hi), valid


def coefficient_bounds(atoms, mu, z_fit, quantile: float):
    """(lo, hi) [K]: the ``quantile`` and 1 - ``quantile`` quantiles of each atom's coefficient
    (z - mu) . u_k over the fit codes z_fit [N, D] (the region the decoder was trained on)."""
    c = (np.asarray(z_fit, np.float64) - np.asarray(mu, np.float64)) @ np.asarray(atoms, np.float64)
    return (np.quantile(c, quantile, axis=0).astype(np.float32), np.quantile(c, 1 - quantile, axis=0).astype(np.float32))


def apply_atom_edits(z, mu, U, V, alpha, lo=None, hi=None):
    """z'_k = z - alpha_k ((z - mu) . v_k) u_k (see :class:`AtomEdits`).

    Reflection: v_k = u_k = omega_k, alpha_k = 2. Algorithm 2 on centred codes: v_k = w,
    alpha_k = lam / (w . u_k). With bounds lo, hi [K] (orthonormal U) the new coefficient
    c_k - s_k along u_k is clipped to [lo_k, hi_k]: the step becomes c_k - clip(c_k - s_k).
    z: [B, D]; mu: [D]; U, V: [D, K]; alpha: [K] -> [K, B, D].
    """
    s = ((z - mu) @ V) * alpha  # [B, K]
    if lo is not None:
        c = (z - mu) @ U
        s = c - jnp.clip(c - s, lo, hi)
    return z[None] - jnp.einsum("bk,dk->kbd", s, U)


def project_out(phi, Q):
    """The projection baseline: phi - Q Q^T phi removes the span of Q [D, J] from phi [B, D]."""
    return phi - (phi @ Q) @ Q.T


def edit_lengths(z, edit: AtomEdits, z_fit) -> np.ndarray:
    """Mean ||z'_k - z|| per atom [K] in units of the codes' spread, the RMS distance of the fit
    codes z_fit [N, D] from their mean: 2 or more means an edit leaves the region the codes occupy."""
    z = jnp.asarray(z)
    dz = edit.astype(jnp.float32)(z) - z[None]  # [K, B, D]
    spread = np.sqrt(np.mean(np.sum((z_fit - z_fit.mean(0)) ** 2, axis=1)))
    return np.asarray(jnp.linalg.norm(dz, axis=-1).mean(1)) / spread
