"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3), for the shapes where XLA:CPU is slow
(and 1x1 convolutions as matrix products).

XLA:CPU runs a 3x3, stride-1 convolution at 32 px with 64 output channels at about half the rate
it reaches with 128 in and out (README, Speed). Winograd's F(2x2, 3x3) computes each 2x2 output
tile from a 4x4 input tile with 16 multiplies per (input, output) channel pair instead of 36: the
input tiles and the kernel are transformed (additions only for the input), the 16 transformed
positions become 16 matrix products [tiles, C_in] x [C_in, C_out] (one batched ``dot_general``),
and the output transform folds them back. The result equals the direct convolution up to float32
rounding (relative error about 1e-6).

:func:`conv_general_dilated` is a drop-in for ``jax.lax.conv_general_dilated`` (flax's ``nn.Conv``
takes it as ``conv_general_dilated=``) that takes the Winograd route only where it measured faster
on the project's CPU (:func:`winograd_applies`) and calls XLA's convolution everywhere else, on
every other backend and for every other dtype. Where it is taken, the gradient goes the same way:
the input gradient is itself a routed 3x3 convolution, and the kernel gradient is taken in the
Winograd domain (:func:`winograd_kernel_grad`) or by XLA. Which routes measured faster depends on
the CPU (:class:`Routes`: AVX-512 or not); :data:`ROUTES` holds the ones this process takes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform

import jax
import jax.numpy as jnp
import numpy as np

# F(2x2, 3x3): Y = A^T [(G g G^T) * (B^T d B)] A (Lavin & Gray, 2016), with
# G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]],
# B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]



@dataclasses.dataclass(frozen=True)
class Routes:
    """Which CPU routes :func:`conv_general_dilated` takes (each measured faster on that CPU class).

    min_pixels: a 3x3 convolution (forward, and the input gradient) goes by Winograd from this
      many pixels H * W on (with the channel and image-size bounds below).
    kernel_grad: its kernel gradient in the Winograd domain (:func:`winograd_kernel_grad`);
      False: XLA's.
    pointwise_dot: a 1x1 convolution as one matrix product over the channels.
    """

    min_pixels: int
    kernel_grad: bool
    pointwise_dot: bool


# Measured with benchmarks/ops.py, a grid of shapes at batch 8 and the `small` UNet's training step
# (README, Speed). AVX-512 (round 14-16's CPU, 2 cores): at 32 px 1.3-2.6x faster for every C_in x
# C_out from 32 x 64 to 320 x 320 (32 -> 32: 0.93x), at 64 px up to 64 channels in 1.2-1.6x (128 in:
# 0.7-1.1x), at 16 px mixed (0.8-2.4x, not taken); the Winograd-domain kernel gradient was no gain in
# the training step. AVX2 without AVX-512 (round 18's AMD EPYC, 2 cores, one image batch 4 per
# device): forward 1.5-2.2x faster also at 16 and 8 px, the Winograd-domain kernel gradient 1.6-2.7x
# (32 px 128 -> 128: 27.1 -> 10.9 ms), a 1x1 convolution as a product 1.0-1.4x (forward + backward).
AVX512_ROUTES = Routes(min_pixels=32 * 32, kernel_grad=False, pointwise_dot=False)
AVX2_ROUTES = Routes(min_pixels=8 * 8, kernel_grad=True, pointwise_dot=True)


def cpu_routes(cpuinfo: str | None = None, machine: str | None = None) -> Routes:
    """The routes for this host's CPU: :data:`AVX2_ROUTES` on an x86-64 CPU without AVX-512 (read
    from ``/proc/cpuinfo``), :data:`AVX512_ROUTES` everywhere else (the routes measured first)."""
    machine = (machine or platform.machine()).lower()
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read(1 << 16)
        except OSError:
            cpuinfo = ""
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    if machine in ("x86_64", "amd64") and "avx2" in flags and "avx512f" not in flags:
        return AVX2_ROUTES
    return AVX512_ROUTES


ROUTES = cpu_routes()
MIN_CHANNEL_PRODUCT = 2048
MAX_IMAGE_ELEMENTS = 2 ** 19  # H * W * C_in of one image below this
CHUNK_ELEMENTS = 2 ** 19  # input values per batch chunk (its transformed input: 8 MB in float32)


def _input_transform_1d(d0, d1, d2, d3):
    """B^T applied along one tile axis (rows 0..3 of each 4-wide tile)."""
    return [d0 - d2, d1 + d2, d2 - d1, d1 - d3]


def _kernel_transform_1d(g0, g1, g2):
    """G applied along one kernel axis (elementwise: a small einsum here lowers to slow dots)."""
    return [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2]


_NHWC = ("NHWC", "HWIO", "NHWC")


@jax.custom_vjp
def winograd_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [B, H, W, C] (H, W even) * kernel [3, 3, C, D], stride 1, padding 1 -> [B, H, W, D].

    A batch of more than CHUNK_ELEMENTS input values is convolved a chunk of images at a time (a
    loop, not sibling fusions XLA would merge), so that each chunk's transformed input, 4x its
    size, stays in cache. The gradient: for x, the convolution of the output gradient with the
    flipped, transposed kernel (itself routed by :func:`conv_general_dilated`); for the kernel, XLA's.
    """
    return _chunked(x, kernel)


_batch_split = 1


@contextlib.contextmanager
def batch_split(devices: int):
    """Within this block, traced batches are taken to be split over ``devices`` devices along
    their first axis (a data-parallel jit traced here, e.g. :func:`jaxcf.train.jit_update`): the
    chunks are sized by each device's share, not the whole batch (batch 8 at 32 px x 128 channels
    on two CPU devices: one pass of 4 images per device instead of a loop over 2; the `small`
    UNet's training step measured 9% faster)."""
    global _batch_split
    before, _batch_split = _batch_split, max(1, int(devices))
    try:
        yield
    finally:
        _batch_split = before


def batch_chunks(shape) -> int:
    """How many chunks :func:`winograd_conv3x3` splits a batch of this input shape into: the
    fewest that divide the batch with at most CHUNK_ELEMENTS input values per device each (one
    image per device each if none does). Under :func:`batch_split` a chunk keeps a whole number of
    images per device."""
    n, per_image = shape[0], int(np.prod(shape[1:]))
    split = _batch_split if n % _batch_split == 0 else 1
    return next(c for c in range(1, n + 1) if n % c == 0 and (n // c) % split == 0
                and (n // c // split) * per_image <= CHUNK_ELEMENTS or c == n // split)


def _chunked(x, kernel):
    n = x.shape[0]
    chunks = batch_chunks(x.shape)
    if chunks == 1:
        return _winograd_forward(x, kernel)
    # Chunk j holds images j, j + chunks, j + 2 chunks, ...: the loop slices the minor axis of
    # [n / chunks, chunks, ...], so a batch split over devices along its first axis stays split in
    # every chunk (slicing the leading axis of [chunks, n / chunks, ...] made the SPMD partitioner
    # gather the whole batch onto every device and convolve all of it there).
    xs = x.reshape(n // chunks, chunks, *x.shape[1:])

    def body(j, y):
        yj = _winograd_forward(jax.lax.dynamic_index_in_dim(xs, j, axis=1, keepdims=False), kernel)
        return jax.lax.dynamic_update_index_in_dim(y, yj, j, axis=1)

    # zeros_like(x): inside jax.shard_map the buffer is device-varying like x, as the loop's carry must be
    y0 = jnp.zeros_like(x, shape=(n // chunks, chunks, *x.shape[1:3], kernel.shape[-1]))
    y = jax.lax.fori_loop(0, chunks, body, y0)
    return y.reshape(n, *y.shape[2:])


def _winograd_fwd(x, kernel):
    return _chunked(x, kernel), (x, kernel)


def _winograd_bwd(res, dy):
    x, kernel = res
    flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)  # [3, 3, D, C]
    dx = conv_general_dilated(dy, flipped, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)
    if ROUTES.kernel_grad:
        return dx, winograd_kernel_grad(x, dy).astype(kernel.dtype)
    _, kernel_vjp = jax.vjp(lambda k: jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                                                   dimension_numbers=_NHWC), kernel)
    return dx, kernel_vjp(dy)[0]


def winograd_kernel_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    """The kernel gradient [3, 3, C, D] of the 3x3 convolution (stride 1, padding 1) of x [B, H, W, C]
    whose output gradient is dy [B, H, W, D], in the Winograd domain: with V = B^T d B the
    transformed input tiles and M = A dY A^T the transformed 2x2 output-gradient tiles,
    dU = sum over tiles of V M^T per tile position (16 products [C, tiles] x [tiles, D]), and
    dg = G^T dU G (the transpose of each step of the forward). Batches are taken in the forward's
    chunks (:func:`batch_chunks`), their dU summed in a loop."""
    if x.ndim != 4 or dy.ndim != 4 or x.shape[:3] != dy.shape[:3] or x.shape[1] % 2 or x.shape[2] % 2:
        raise ValueError(f"winograd_kernel_grad: needs x [B, H, W, C] and dy [B, H, W, D] with the same even H, W; "
                         f"got {x.shape} and {dy.shape}")
    n, c, d = x.shape[0], x.shape[-1], dy.shape[-1]
    chunks = batch_chunks(x.shape)
    if chunks == 1:
        du = _kernel_grad_tiles(x, dy)
    else:
        xs = x.reshape(n // chunks, chunks, *x.shape[1:])  # chunk j: images j, j + chunks, ... (as _chunked)
        dys = dy.reshape(n // chunks, chunks, *dy.shape[1:])
        take = lambda a, j: jax.lax.dynamic_index_in_dim(a, j, axis=1, keepdims=False)  # noqa: E731
        du = jax.lax.fori_loop(0, chunks, lambda j, acc: acc + _kernel_grad_tiles(take(xs, j), take(dys, j)),
                               jnp.zeros_like(x, jnp.float32, shape=(16, c, d)))
    du = du.reshape(4, 4, c, d)
    rows = _kernel_transform_t_1d(*(du[i] for i in range(4)))  # 3 x [4, C, D]
    return jnp.stack([jnp.stack(_kernel_transform_t_1d(*(r[j] for j in range(4)))) for r in rows])


def _kernel_grad_tiles(x, dy):
    """dU [16, C, D]: per tile position, the transformed input tiles against the transformed
    output-gradient tiles, summed over the tiles."""
    return jnp.einsum("ktc,ktd->kcd", _input_tiles(x.astype(jnp.float32)), _output_grad_tiles(dy.astype(jnp.float32)))


def _input_tiles(x):
    """B^T d B for every 4x4 input tile (stride 2 over the zero-padded x): [16, tiles, C]."""
    b, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # the 4x4 input tile at output tile (i, j) starts at padded pixel (2i, 2j)
    rows = _input_transform_1d(*(xp[:, r:r + h:2] for r in range(4)))  # 4 x [B, H/2, W+2, C]
    v = []
    for t in rows:
        v += _input_transform_1d(*(t[:, :, s:s + w:2] for s in range(4)))  # 4 x [B, H/2, W/2, C]
    return jnp.stack(v).reshape(16, -1, c)


def _output_grad_tiles(dy):
    """A dY A^T for every 2x2 output-gradient tile: [16, tiles, D]."""
    b, h, w, d = dy.shape
    t = dy.reshape(b, h // 2, 2, w // 2, 2, d)
    m = []
    for r in _output_transform_t_1d(t[:, :, 0], t[:, :, 1]):  # along the tile rows: 4 x [B, H/2, W/2, 2, D]
        m += _output_transform_t_1d(r[..., 0, :], r[..., 1, :])
    return jnp.stack(m).reshape(16, -1, d)


def _output_transform_t_1d(y0, y1):
    """A (the transpose of the output transform A^T) along one tile axis: 2 values -> 4."""
    return [y0, y0 + y1, y0 - y1, -y1]


def _kernel_transform_t_1d(u0, u1, u2, u3):
    """G^T (the transpose of :func:`_kernel_transform_1d`) along one axis: 4 values -> 3."""
    return [u0 + 0.5 * (u1 + u2), 0.5 * (u1 - u2), 0.5 * (u1 + u2) + u3]


winograd_conv3x3.defvjp(_winograd_fwd, _winograd_bwd)


def _winograd_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    d = kernel.shape[-1]
    if kernel.shape[:3] != (3, 3, c) or h % 2 or w % 2:
        raise ValueError(f"winograd_conv3x3: needs x [B, H, W, C] with even H, W and a [3, 3, C, D] kernel; "
                         f"got {x.shape} and {kernel.shape}")
    cols = [_kernel_transform_1d(*kernel[i]) for i in range(3)]  # row i of g G^T: 4 x [C, D]
    u = [_kernel_transform_1d(*(cols[i][j] for i in range(3))) for j in range(4)]  # u[j][i] = (G g G^T)[i, j]
    u = jnp.stack([jnp.stack([u[j][i] for j in range(4)]) for i in range(4)]).reshape(16, c, d)
    m = jnp.einsum("ktc,kcd->ktd", _input_tiles(x), u).reshape(4, 4, b, h // 2, w // 2, d)
    # A^T along the tile rows, then the columns: 2x2 outputs per tile
    half = [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]
    y = [[a[0] + a[1] + a[2], a[1] - a[2] - a[3]] for a in half]
    y = jnp.stack([jnp.stack(row, 3) for row in y], 2)  # [B, H/2, 2, W/2, 2, D]
    return y.reshape(b, h, w, d)


_enabled = True


@contextlib.contextmanager
def disabled():
    """Within this block, :func:`conv_general_dilated` traces XLA's convolution everywhere (e.g. to
    count a model's direct-convolution FLOPs, or as a reference). A trace is cached per function
    and kept: a function traced before the block keeps Winograd inside it, and one traced inside
    keeps XLA's convolution after it (so trace a function object of its own here)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def _plain_cpu_conv(size: int, lhs_shape, rhs_shape, window_strides, padding, lhs_dilation, rhs_dilation,
                    dimension_numbers, feature_group_count, backend) -> bool:
    """Is this, on the CPU backend with the routes enabled, an NHWC convolution with a size x size
    kernel, stride 1, no dilation, one feature group and PyTorch's padding (size - 1) // 2?"""
    if not _enabled or (backend or jax.default_backend()) != "cpu" or len(lhs_shape) != 4 or dimension_numbers is None:
        return False
    if (jax.lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
            != jax.lax.conv_dimension_numbers(lhs_shape, rhs_shape, _NHWC)):
        return False
    ones, pad = (1, 1), (size - 1) // 2
    return (tuple(rhs_shape[:2]) == (size, size) and tuple(window_strides) == ones and feature_group_count == 1
            and tuple(lhs_dilation or ones) == ones and tuple(rhs_dilation or ones) == ones
            and not isinstance(padding, str) and tuple(map(tuple, padding)) == ((pad, pad), (pad, pad)))


def winograd_applies(lhs_shape, rhs_shape, dtype, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                     dimension_numbers=None, feature_group_count: int = 1, backend: str | None = None) -> bool:
    """Does :func:`conv_general_dilated` take the Winograd route for this convolution?"""
    if jnp.dtype(dtype) != jnp.float32 or not _plain_cpu_conv(3, lhs_shape, rhs_shape, window_strides, padding,
                                                               lhs_dilation, rhs_dilation, dimension_numbers,
                                                               feature_group_count, backend):
        return False
    _, h, w, c = lhs_shape
    return (h % 2 == 0 and w % 2 == 0 and h * w >= ROUTES.min_pixels and c * rhs_shape[-1] >= MIN_CHANNEL_PRODUCT
            and h * w * c < MAX_IMAGE_ELEMENTS)


def pointwise_applies(lhs_shape, rhs_shape, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                      dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                      backend: str | None = None) -> bool:
    """Is this a 1x1, stride-1, unpadded NHWC convolution on the CPU (one matrix product over the
    channels)? Whether :func:`conv_general_dilated` computes it as one: :attr:`Routes.pointwise_dot`."""
    return batch_group_count == 1 and _plain_cpu_conv(1, lhs_shape, rhs_shape, window_strides, padding, lhs_dilation,
                                                      rhs_dilation, dimension_numbers, feature_group_count, backend)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None):
    """``jax.lax.conv_general_dilated``, by :func:`winograd_conv3x3` where :func:`winograd_applies`, and
    a 1x1 convolution as a matrix product where :func:`pointwise_applies` and the CPU's routes say so."""
    if (batch_group_count == 1 and preferred_element_type is None and lhs.dtype == rhs.dtype
            and winograd_applies(lhs.shape, rhs.shape, lhs.dtype, window_strides, padding, lhs_dilation,
                                 rhs_dilation, dimension_numbers, feature_group_count)):
        return winograd_conv3x3(lhs, rhs)
    if ROUTES.pointwise_dot and pointwise_applies(lhs.shape, rhs.shape, window_strides, padding, lhs_dilation,
                                                  rhs_dilation, dimension_numbers, feature_group_count,
                                                  batch_group_count):
        return jnp.einsum("bhwc,cd->bhwd", lhs, rhs[0, 0], precision=precision,
                          preferred_element_type=preferred_element_type)
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count,
                                        precision=precision, preferred_element_type=preferred_element_type)
