"""Deterministic DDIM: one step function used by inversion (abduction), sampling and guidance.

Every function works on arrays of any shape (pixels or latents, NHWC) and takes the noise model
as ``eps_fn(x_t, t, cond) -> eps`` with ``t`` an int32 ``[B]`` array of training timesteps and
``cond`` any pytree (None, a semantic code, text states, ...). A model that predicts ``v``
instead of ``eps`` is wrapped with :func:`eps_from_v`.

Loops are one ``jax.lax.scan``; ``debug=True`` runs the same step body in a Python loop (for
printing or breakpoints). Step counts and depths are static Python values: close over them or
mark them static when jitting.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf.diffusion.schedules import NoiseSchedule, ddim_timesteps, grid_alphas

EpsFn = Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray]
# log p(y | x) for a batch: (x [B, ...], t [B], y [B]) -> [B]
LogProbFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]
GUIDE_ON = ("x0", "xt", "implicit")


def _bcast(a, x):
    """Reshapes a scalar or a per-example [B] array to broadcast against x [B, ...]."""
    a = jnp.asarray(a, jnp.float32)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) if a.ndim else a


def predict_x0(x_t, eps, abar_t):
    """x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    abar_t = _bcast(abar_t, x_t)
    return (x_t - jnp.sqrt(1.0 - abar_t) * eps) / jnp.sqrt(abar_t)


def eps_from_v(model_fn: EpsFn, schedule: NoiseSchedule) -> EpsFn:
    """Turns a v-prediction model (Stable Diffusion 2 "v_prediction") into an eps model."""

    def eps_fn(x_t, t, cond):
        v = model_fn(x_t, t, cond)
        abar = _bcast(schedule.alphas_cumprod[t], x_t)
        return jnp.sqrt(abar) * v + jnp.sqrt(1.0 - abar) * x_t

    return eps_fn


def ddim_step(x_t, eps, abar_t, abar_s, *, eta: float = 0.0, key: Optional[jax.Array] = None):
    """One DDIM update from noise level abar_t to abar_s (s < t samples, s > t inverts).

    x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps + sigma z, with
    sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s) and z ~ N(0, I) drawn
    from ``key``. eta = 0 is deterministic; eta > 0 needs a key and only makes sense when sampling.
    """
    x_dtype = x_t.dtype
    x_t = x_t.astype(jnp.float32)
    eps = eps.astype(jnp.float32)
    x0 = predict_x0(x_t, eps, abar_t)
    abar_t = _bcast(abar_t, x_t)
    abar_s = _bcast(abar_s, x_t)
    if isinstance(eta, (int, float)) and eta == 0:
        x_s = jnp.sqrt(abar_s) * x0 + jnp.sqrt(1.0 - abar_s) * eps
    else:
        if key is None:
            raise ValueError("ddim_step: eta > 0 adds noise and needs an explicit PRNG `key`")
        var = (1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s)
        sigma = eta * jnp.sqrt(jnp.clip(var, 0.0, None))
        direction = jnp.sqrt(jnp.clip(1.0 - abar_s - sigma**2, 0.0, None))
        x_s = jnp.sqrt(abar_s) * x0 + direction * eps + sigma * jax.random.normal(key, x_t.shape)
    return x_s.astype(x_dtype)


def _loop(body, carry, xs, debug: bool):
    """lax.scan(body, carry, xs), or the same body in a Python loop when debugging."""
    if not debug:
        return jax.lax.scan(body, carry, xs)
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    ys = []
    for i in range(n):
        carry, y = body(carry, jax.tree_util.tree_map(lambda a: a[i], xs))
        ys.append(y)
    return carry, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ys)


def _times(x, t):
    return jnp.full((x.shape[0],), t, jnp.int32)


def _sampling_steps(schedule: NoiseSchedule, num_steps: int, depth: float):
    """The steps of a sampling scan, noisiest first: (t, abar_t, abar_s, i) with step i going from
    grid level i + 1 to level i of the :func:`ddim_timesteps` grid."""
    ts = ddim_timesteps(num_steps, schedule.num_train_timesteps, depth)
    a = grid_alphas(schedule, ts)
    idx = np.arange(num_steps)[::-1]
    return jnp.asarray(ts[1:][idx]), a[1:][idx], a[:-1][idx], jnp.asarray(idx)


def ddim_invert(
    eps_fn: EpsFn,
    x0: jnp.ndarray,
    cond: Any,
    schedule: NoiseSchedule,
    num_steps: int,
    depth: float = 1.0,
    *,
    debug: bool = False,
    return_trajectory: bool = False,
):
    """Abduction: runs DDIM from the clean x0 [B, ...] up to noise level ``depth * T``.

    Each step evaluates eps at the current (less noisy) point and moves to the next grid level.
    Returns x_{t0} (and the [num_steps + 1, B, ...] trajectory when asked).
    """
    ts = ddim_timesteps(num_steps, schedule.num_train_timesteps, depth)
    a = grid_alphas(schedule, ts)
    xs = (jnp.asarray(ts[:-1]), a[:-1], a[1:])

    def body(x, step):
        t, a_t, a_s = step
        x_next = ddim_step(x, eps_fn(x, _times(x, t), cond), a_t, a_s)
        return x_next, x_next

    x_T, traj = _loop(body, x0, xs, debug)
    if return_trajectory:
        return x_T, jnp.concatenate([x0[None], traj])
    return x_T


def ddim_sample(
    eps_fn: EpsFn,
    x_T: jnp.ndarray,
    cond: Any,
    schedule: NoiseSchedule,
    num_steps: int,
    depth: float = 1.0,
    *,
    eta: float = 0.0,
    key: Optional[jax.Array] = None,
    debug: bool = False,
):
    """Runs DDIM from noise level ``depth * T`` down to the clean image; inverse of ddim_invert.

    With ``eta > 0`` step i draws its noise from ``fold_in(key, i)``.
    """
    if eta and key is None:
        raise ValueError("ddim_sample: eta > 0 needs an explicit PRNG `key`")
    xs = _sampling_steps(schedule, num_steps, depth)

    def body(x, step):
        t, a_t, a_s, i = step
        k = None if not eta else jax.random.fold_in(key, i)
        return ddim_step(x, eps_fn(x, _times(x, t), cond), a_t, a_s, eta=eta, key=k), None

    x0, _ = _loop(body, x_T, xs, debug)
    return x0


def guidance_gradient(
    eps_fn: EpsFn,
    log_prob_fn: LogProbFn,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    abar_t,
    cond: Any,
    y: jnp.ndarray,
    *,
    guide_on: str = "x0",
    grad_through_eps: bool = False,
):
    """Returns (eps(x_t), grad_x log p(y | x_t)) from one forward pass of the noise model.

    ``guide_on="x0"`` evaluates the classifier on the predicted clean image x0_hat(x_t) (the
    DiCap default: a frozen clean-image classifier such as CLIP); ``"xt"`` on x_t itself (a
    noise-aware classifier). With ``grad_through_eps=False`` x0_hat treats eps as a constant
    (d x0_hat / d x_t = 1 / sqrt(abar_t)); True backpropagates through the noise model too.
    Per-example gradients: the log-probabilities of the batch are summed, examples are independent.

    ``"implicit"``: no separate classifier (``log_prob_fn`` is unused); the noise model is
    class-conditional, ``eps_fn(x, t, labels)`` with ``cond`` its unconditional input, and Bayes' rule
    gives the classifier it implies: grad log p(y | x_t) = -(eps(x_t, y) - eps(x_t)) / sqrt(1 - abar_t).
    :func:`guided_eps` then yields eps + s (eps(x_t, y) - eps(x_t)), classifier-free guidance.
    """
    if guide_on not in GUIDE_ON:
        raise ValueError(f"guide_on must be one of {GUIDE_ON}, got {guide_on!r}")
    if guide_on == "implicit":
        eps = eps_fn(x_t, t, cond)
        eps_y = eps_fn(x_t, t, y)
        return eps, -(eps_y - eps).astype(jnp.float32) / jnp.sqrt(1.0 - _bcast(abar_t, eps))

    def objective(x):
        eps = eps_fn(x, t, cond)
        e = eps if grad_through_eps else jax.lax.stop_gradient(eps)
        inp = predict_x0(x, e, abar_t).astype(x.dtype) if guide_on == "x0" else x
        return jnp.sum(log_prob_fn(inp, t, y).astype(jnp.float32)), eps

    grad, eps = jax.grad(objective, has_aux=True)(x_t)
    return eps, grad


def normalized_gradient(grad, eps: float = 1e-12):
    """Each example's gradient [B, ...] divided by its root-mean-square over the other axes."""
    axes = tuple(range(1, grad.ndim))
    rms = jnp.sqrt(jnp.mean(jnp.square(grad.astype(jnp.float32)), axis=axes, keepdims=True))
    return (grad / (rms + eps)).astype(grad.dtype)


def guided_eps(eps, grad, abar_t, scale):
    """eps_hat = eps - s sqrt(1 - abar_t) grad_x log p(y_cf | x_t); s scalar or per-example [B]."""
    return eps - _bcast(scale, eps) * jnp.sqrt(1.0 - _bcast(abar_t, eps)) * grad.astype(eps.dtype)


def guided_denoise(
    eps_fn: EpsFn,
    log_prob_fn: LogProbFn,
    x_T: jnp.ndarray,
    cond: Any,
    y: jnp.ndarray,
    scale,
    schedule: NoiseSchedule,
    num_steps: int,
    depth: float = 1.0,
    *,
    guide_on: str = "x0",
    grad_through_eps: bool = False,
    source_trajectory: Optional[jnp.ndarray] = None,
    mask_threshold: float = 0.1,
    mask_dilation: int = 1,
    mask: Optional[jnp.ndarray] = None,
    normalize_gradient: bool = False,
    debug: bool = False,
):
    """Action: classifier-guided DDIM sampling from depth * T toward per-example labels y [B].

    At every step eps is replaced by :func:`guided_eps` with scale ``scale`` (scalar or [B]),
    then the ordinary deterministic :func:`ddim_step` is taken. ``x_T`` is usually the output of
    :func:`ddim_invert` at the same ``num_steps`` and ``depth``.

    ``source_trajectory`` (the [num_steps + 1, B, ...] trajectory of that inversion, clean source
    first) turns on the masked action of FastDiME (Weng et al. 2023): at every step the region the
    guidance edits, :func:`edit_mask` of the guided x0_hat against the source (threshold
    ``mask_threshold``, grown by ``mask_dilation`` pixels), is taken from the guided step and
    everything else from the source's own trajectory at the same level, so what the classifier does
    not need to change comes back exactly. A fixed ``mask`` (broadcastable to x_T, 1 = edit) replaces
    the edit mask at every step (e.g. a region known from elsewhere, as a control).

    ``normalize_gradient`` rescales each example's classifier gradient to unit root-mean-square
    (:func:`normalized_gradient`) before :func:`guided_eps`: the scale then sets the size of the
    push at every step, whatever the classifier's confidence (not METHODS' formula; an option).
    """
    xs = _sampling_steps(schedule, num_steps, depth)
    keep = source_trajectory is not None
    if keep:
        if source_trajectory.shape != (num_steps + 1,) + x_T.shape:
            raise ValueError(f"source_trajectory must be [num_steps + 1, *x_T.shape] = {(num_steps + 1,) + x_T.shape}, "
                             f"got {source_trajectory.shape}")
        xs = xs + (source_trajectory[xs[3]],)  # the source at each step's target level

    def body(x, step):
        t, a_t, a_s = step[:3]
        tb = _times(x, t)
        eps, grad = guidance_gradient(eps_fn, log_prob_fn, x, tb, a_t, cond, y,
                                      guide_on=guide_on, grad_through_eps=grad_through_eps)
        if normalize_gradient:
            grad = normalized_gradient(grad)
        eps_hat = guided_eps(eps, grad, a_t, scale)
        x_s = ddim_step(x, eps_hat, a_t, a_s)
        if keep:
            m = mask if mask is not None else edit_mask(predict_x0(x, eps_hat, a_t), source_trajectory[0],
                                                        mask_threshold, mask_dilation)
            x_s = (m * x_s + (1 - m) * step[4]).astype(x_s.dtype)
        return x_s, None

    x0, _ = _loop(body, x_T, xs, debug)
    return x0


def edit_mask(x0_hat: jnp.ndarray, source: jnp.ndarray, threshold: float, dilation: int = 1) -> jnp.ndarray:
    """FastDiME's mask of an edit: 1 where the channel-mean |x0_hat - source| of an NHWC pair exceeds
    ``threshold``, grown by ``dilation`` pixels (a (2 d + 1)^2 max filter); [B, H, W, 1] float32."""
    d = jnp.mean(jnp.abs(x0_hat.astype(jnp.float32) - source.astype(jnp.float32)), axis=-1, keepdims=True)
    return grow_mask((d > threshold).astype(jnp.float32), dilation)


def grow_mask(mask: jnp.ndarray, pixels: int) -> jnp.ndarray:
    """A [B, H, W, C] mask grown by ``pixels`` in H and W: a (2 p + 1)^2 max filter (Chebyshev distance)."""
    if not pixels:
        return mask
    w = 2 * pixels + 1
    return jax.lax.reduce_window(mask, jnp.zeros((), mask.dtype), jax.lax.max, (1, w, w, 1), (1, 1, 1, 1), "SAME")


def denoise_to_x0(
    eps_fn: EpsFn,
    x_t: jnp.ndarray,
    cond: Any,
    schedule: NoiseSchedule,
    num_steps: int,
    depth: float = 1.0,
    level=None,
):
    """Unguided DDIM from grid level ``level`` of the :func:`ddim_sample` grid down to the clean image.

    ``level`` (1..num_steps, a Python int or a traced int32; default num_steps) is the grid index
    of x_t's noise level. Returns (x0 [B, ...], eps(x_t)): ``level`` noise-model calls, the first
    at x_t. One scan of fixed length num_steps - 1 whose steps above ``level`` are skipped
    (``lax.cond``), so one compiled program serves every level and is differentiable end to end.
    """
    ts = ddim_timesteps(num_steps, schedule.num_train_timesteps, depth)
    a = grid_alphas(schedule, ts)
    level = num_steps if level is None else level
    eps0 = eps_fn(x_t, _times(x_t, jnp.asarray(ts)[level]), cond)
    x = ddim_step(x_t, eps0, a[level], a[level - 1])
    ks = np.arange(num_steps - 1, 0, -1)  # step k goes from level k to k - 1
    xs = (jnp.asarray(ts[ks]), a[ks], a[ks - 1], jnp.asarray(ks))

    def body(x, step):
        t, a_t, a_s, k = step
        take = lambda x: ddim_step(x, eps_fn(x, _times(x, t), cond), a_t, a_s)
        return jax.lax.cond(k < level, take, lambda x: x, x), None

    x0, _ = jax.lax.scan(body, x, xs)
    return x0, eps0


def chain_guided_denoise(
    eps_fn: EpsFn,
    log_prob_fn: LogProbFn,
    x_T: jnp.ndarray,
    cond: Any,
    y: jnp.ndarray,
    scale,
    schedule: NoiseSchedule,
    num_steps: int,
    depth: float = 1.0,
    *,
    debug: bool = False,
):
    """DiME's action (Jeanneret et al. 2022): classifier guidance through a full denoising chain.

    At every guided step, at grid level i, the classifier sees the clean image that an unguided
    DDIM chain reaches from x_t (:func:`denoise_to_x0`, i noise-model calls), not the one-step
    x0_hat of :func:`guided_denoise`, and its gradient is backpropagated through that whole chain;
    eps is then shifted by :func:`guided_eps` and the ordinary :func:`ddim_step` taken. A clean-
    image classifier needs no noise awareness this way, at the price of
    sum_{i=1..N} i = N (N + 1) / 2 noise-model forward passes (each with its backward) for N steps,
    against N for :func:`guided_denoise`.
    """
    xs = _sampling_steps(schedule, num_steps, depth)

    def body(x, step):
        t, a_t, a_s, i = step
        level = i + 1  # x's grid level

        def objective(x):
            x0, eps = denoise_to_x0(eps_fn, x, cond, schedule, num_steps, depth, level)
            return jnp.sum(log_prob_fn(x0, _times(x, t), y).astype(jnp.float32)), eps

        grad, eps = jax.grad(objective, has_aux=True)(x)
        return ddim_step(x, guided_eps(eps, grad, a_t, scale), a_t, a_s), None

    x0, _ = _loop(body, x_T, xs, debug)
    return x0
