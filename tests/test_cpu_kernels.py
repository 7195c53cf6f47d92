"""The CPU routes of the models: Winograd 3x3 convolutions and heads-major attention, against a
float64 NumPy convolution, XLA's convolution, jax.nn.dot_product_attention and their gradients."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxcf.models import winograd
from jaxcf.models.blocks import conv, heads_major_attention

NHWC = ("NHWC", "HWIO", "NHWC")
SAME = ((1, 1), (1, 1))


def conv3x3_f64(x, k):
    """Direct 3x3 convolution (cross-correlation), stride 1, zero padding 1, in float64."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    b, h, w, _ = x.shape
    out = np.zeros((b, h - 2, w - 2, k.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += np.einsum("bhwc,cd->bhwd", x[:, i:i + h - 2, j:j + w - 2], np.asarray(k[i, j], np.float64))
    return out


def lax_conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), SAME, dimension_numbers=NHWC)


def data(shape, kshape, seed=0):
    r = np.random.default_rng(seed)
    return r.normal(size=shape).astype(np.float32), (r.normal(size=kshape) / np.sqrt(9 * kshape[2])).astype(np.float32)


@pytest.mark.parametrize("shape,d", [((2, 8, 6, 5), 7), ((1, 4, 4, 3), 2), ((3, 32, 32, 64), 64), ((2, 2, 10, 16), 8)])
def test_winograd_matches_float64_convolution(shape, d):
    x, k = data(shape, (3, 3, shape[-1], d))
    ref = conv3x3_f64(x, k)
    y = np.asarray(jax.jit(winograd.winograd_conv3x3)(x, k))
    np.testing.assert_allclose(y, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_winograd_batch_chunks_match(monkeypatch):
    """A batch over CHUNK_ELEMENTS runs a chunk of images at a time; the result is the same."""
    x, k = data((6, 8, 8, 4), (3, 3, 4, 5), 1)
    whole = np.asarray(winograd.winograd_conv3x3(x, k))
    monkeypatch.setattr(winograd, "CHUNK_ELEMENTS", 2 * 8 * 8 * 4)  # 3 chunks of 2 images
    assert winograd.batch_chunks(x.shape) == 3
    assert winograd.batch_chunks((5, 8, 8, 4)) == 5  # no divisor fits: one image at a time
    with winograd.batch_split(2):  # sized by each of two devices' share, whole images per device
        assert winograd.batch_chunks(x.shape) == 3  # 6 = 3 chunks x 2 devices x 1 image
        assert winograd.batch_chunks((8, 8, 8, 4)) == 2  # 2 chunks x 2 devices x 2 images
        assert winograd.batch_chunks((5, 8, 8, 4)) == 5  # not divisible by the split: as before
    assert winograd.batch_chunks((8, 8, 8, 4)) == 4
    chunked = np.asarray(winograd.winograd_conv3x3(x, k))
    np.testing.assert_allclose(chunked, whole, atol=1e-6, rtol=0)
    np.testing.assert_allclose(chunked, conv3x3_f64(x, k), atol=2e-5 * np.abs(whole).max(), rtol=0)


@pytest.mark.parametrize("chunk_elements", [None, 8 * 6 * 5])
def test_winograd_gradients_match_xla(chunk_elements, monkeypatch):
    """Input and kernel gradients, whole batch and one image per chunk."""
    if chunk_elements:
        monkeypatch.setattr(winograd, "CHUNK_ELEMENTS", chunk_elements)
    x, k = data((2, 8, 6, 5), (3, 3, 5, 7), 2)
    assert winograd.batch_chunks(x.shape) == (2 if chunk_elements else 1)
    loss = lambda f: (lambda x, k: jnp.sum(jnp.sin(f(x, k))))  # noqa: E731
    gw = jax.grad(loss(winograd.winograd_conv3x3), (0, 1))(x, k)
    gx = jax.grad(loss(lax_conv), (0, 1))(x, k)
    for a, b in zip(gw, gx):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * np.abs(np.asarray(b)).max(), rtol=0)


def test_winograd_rejects_odd_sizes():
    x, k = data((1, 5, 6, 3), (3, 3, 3, 4))
    with pytest.raises(ValueError, match="even H, W"):
        winograd.winograd_conv3x3(x, k)


def test_route_is_taken_only_where_measured_faster(monkeypatch):
    applies = lambda xs, ks, **kw: winograd.winograd_applies(  # noqa: E731
        xs, ks, kw.pop("dtype", jnp.float32), kw.pop("strides", (1, 1)), kw.pop("padding", SAME),
        dimension_numbers=kw.pop("dn", NHWC), backend=kw.pop("backend", "cpu"), **kw)
    monkeypatch.setattr(winograd, "ROUTES", winograd.AVX2_ROUTES)  # from 8 px on
    assert applies((8, 16, 16, 128), (3, 3, 128, 128)) and applies((8, 8, 8, 256), (3, 3, 256, 128))
    assert not applies((8, 4, 4, 256), (3, 3, 256, 256))
    monkeypatch.setattr(winograd, "ROUTES", winograd.AVX512_ROUTES)  # from 32 px on
    assert applies((8, 32, 32, 64), (3, 3, 64, 64))
    assert applies((8, 32, 32, 192), (3, 3, 192, 64))
    assert not applies((8, 32, 32, 64), (3, 3, 64, 64), backend="gpu")
    assert not applies((8, 32, 32, 64), (3, 3, 64, 64), dtype=jnp.bfloat16)
    assert not applies((8, 16, 16, 128), (3, 3, 128, 128))  # 16 px: XLA's
    assert not applies((8, 32, 32, 32), (3, 3, 32, 32))  # 32 -> 32: XLA's
    assert not applies((8, 64, 64, 128), (3, 3, 128, 128))  # one image past MAX_IMAGE_ELEMENTS
    assert not applies((8, 32, 32, 64), (3, 3, 64, 64), strides=(2, 2))
    assert not applies((8, 32, 32, 64), (3, 3, 64, 64), padding="VALID")
    assert not applies((8, 32, 32, 64), (1, 1, 64, 64))
    assert not applies((8, 31, 32, 64), (3, 3, 64, 64))
    assert not applies((8, 32, 32, 64), (3, 3, 64, 64), dn=("NCHW", "OIHW", "NCHW"))
    with winograd.disabled():
        assert not applies((8, 32, 32, 64), (3, 3, 64, 64))
    assert applies((8, 32, 32, 64), (3, 3, 64, 64))


def kernel_grad_f64(x, dy):
    """dK[i, j] = sum over pixels of x_padded[p + (i, j)] dy[p]^T, in float64."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    dy = np.asarray(dy, np.float64)
    h, w = dy.shape[1:3]
    return np.stack([np.stack([np.einsum("bhwc,bhwd->cd", x[:, i:i + h, j:j + w], dy) for j in range(3)])
                     for i in range(3)])


@pytest.mark.parametrize("shape,d,chunk_elements", [((2, 8, 6, 5), 7, None), ((3, 32, 32, 64), 64, None),
                                                    ((6, 8, 8, 4), 5, 2 * 8 * 8 * 4)])
def test_winograd_kernel_grad_matches_float64(monkeypatch, shape, d, chunk_elements):
    """The Winograd-domain kernel gradient (the batch in chunks too) against the direct sum."""
    if chunk_elements:
        monkeypatch.setattr(winograd, "CHUNK_ELEMENTS", chunk_elements)
    x, _ = data(shape, (3, 3, shape[-1], d), 5)
    dy = np.random.default_rng(6).normal(size=shape[:3] + (d,)).astype(np.float32)
    assert winograd.batch_chunks(x.shape) == (3 if chunk_elements else 1)
    ref = kernel_grad_f64(x, dy)
    got = np.asarray(jax.jit(winograd.winograd_kernel_grad)(x, dy))
    np.testing.assert_allclose(got, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_winograd_kernel_grad_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same even H, W"):
        winograd.winograd_kernel_grad(np.zeros((1, 7, 8, 3), np.float32), np.zeros((1, 7, 8, 4), np.float32))
    with pytest.raises(ValueError, match="same even H, W"):
        winograd.winograd_kernel_grad(np.zeros((1, 8, 8, 3), np.float32), np.zeros((2, 8, 8, 4), np.float32))


@pytest.mark.parametrize("routes", ["AVX2_ROUTES", "AVX512_ROUTES"])
def test_gradients_match_xla_under_each_route_table(monkeypatch, routes):
    """Forward and both gradients of routed 3x3 and 1x1 convolutions (a 16-px and a 32-px layer)
    equal XLA's convolution and its autodiff, whichever table routes them."""
    monkeypatch.setattr(winograd, "ROUTES", getattr(winograd, routes))
    r = np.random.default_rng(7)
    x = r.normal(size=(2, 16, 16, 64)).astype(np.float32)
    k3 = (r.normal(size=(3, 3, 64, 64)) / 24).astype(np.float32)
    k1 = (r.normal(size=(1, 1, 64, 32)) / 8).astype(np.float32)
    x32 = r.normal(size=(2, 32, 32, 32)).astype(np.float32)
    k32 = (r.normal(size=(3, 3, 32, 64)) / 17).astype(np.float32)

    def loss(conv):
        def f(x, k3, k1, x32, k32):
            h = jnp.tanh(conv(x, k3, SAME))
            return jnp.sum(jnp.sin(conv(h, k1, ((0, 0), (0, 0))))) + jnp.sum(jnp.sin(conv(x32, k32, SAME)))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4)))

    ours = lambda x, k, pad: winograd.conv_general_dilated(x, k, (1, 1), pad, dimension_numbers=NHWC)  # noqa: E731
    ref = lambda x, k, pad: jax.lax.conv_general_dilated(x, k, (1, 1), pad, dimension_numbers=NHWC)  # noqa: E731
    (v, g), (v_ref, g_ref) = loss(ours)(x, k3, k1, x32, k32), loss(ref)(x, k3, k1, x32, k32)
    np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-5)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=3e-5 * np.abs(np.asarray(b)).max(), rtol=0)


def test_cpu_routes_follow_the_cpu_flags():
    avx2 = "processor : 0\nflags : fpu sse2 avx avx2 fma\n"
    avx512 = "processor : 0\nflags : fpu sse2 avx avx2 fma avx512f avx512bw\n"
    assert winograd.cpu_routes(avx2, "x86_64") == winograd.AVX2_ROUTES
    assert winograd.cpu_routes(avx512, "x86_64") == winograd.AVX512_ROUTES
    assert winograd.cpu_routes("", "aarch64") == winograd.AVX512_ROUTES  # unmeasured: the first table
    assert winograd.cpu_routes("", "x86_64") == winograd.AVX512_ROUTES  # flags unreadable: the same


def test_pointwise_route(monkeypatch):
    """A 1x1 convolution is one matrix product under the AVX2 table, XLA's convolution under the
    AVX-512 one; same result either way; strided or padded 1x1 convolutions stay XLA's."""
    x = np.random.default_rng(8).normal(size=(2, 8, 8, 16)).astype(np.float32)
    layer = conv(24, 1, "c", jnp.float32, jnp.float32)
    params = layer.init(jax.random.key(0), x)
    monkeypatch.setattr(winograd, "ROUTES", winograd.AVX2_ROUTES)
    jaxpr = str(jax.make_jaxpr(layer.apply)(params, x))
    assert "dot_general" in jaxpr and "conv_general_dilated" not in jaxpr
    y = np.asarray(layer.apply(params, x))
    monkeypatch.setattr(winograd, "ROUTES", winograd.AVX512_ROUTES)
    assert "conv_general_dilated" in str(jax.make_jaxpr(layer.apply)(params, x))
    np.testing.assert_allclose(y, np.asarray(layer.apply(params, x)), atol=1e-5, rtol=0)
    pw = lambda **kw: winograd.pointwise_applies((2, 8, 8, 16), (1, 1, 16, 24), kw.pop("strides", (1, 1)),  # noqa: E731
                                                 kw.pop("padding", ((0, 0), (0, 0))), dimension_numbers=NHWC,
                                                 backend="cpu", **kw)
    assert pw() and not pw(strides=(2, 2)) and not pw(padding=((1, 1), (1, 1)))


def test_flax_conv_takes_the_route_and_matches_xla():
    """blocks.conv (every model's convolution) routes a qualifying 3x3 convolution; same params,
    same result as XLA's convolution."""
    x = np.random.default_rng(3).normal(size=(2, 32, 32, 64)).astype(np.float32)
    layer = conv(64, 3, "c", jnp.float32, jnp.float32)
    params = layer.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == {"params": {"kernel": (3, 3, 64, 64), "bias": (64,)}}
    if jax.default_backend() == "cpu":
        assert "dot_general" in str(jax.make_jaxpr(layer.apply)(params, x))
        assert "conv_general_dilated" not in str(jax.make_jaxpr(layer.apply)(params, x))
    ref = nn.Conv(64, (3, 3), padding=SAME).apply(params, x)
    np.testing.assert_allclose(np.asarray(layer.apply(params, x)), np.asarray(ref), atol=2e-5, rtol=0)
    with winograd.disabled():
        assert "conv_general_dilated" in str(jax.make_jaxpr(layer.apply)(params, x))


@pytest.mark.parametrize("b,t,s,n,h", [(2, 16, 16, 4, 8), (1, 7, 5, 2, 3), (2, 64, 64, 16, 8), (1, 9, 6, 3, 4)])
def test_heads_major_attention_matches_jax(b, t, s, n, h):
    r = np.random.default_rng(4)
    q = r.normal(size=(b, t, n, h)).astype(np.float32) * 3  # large logits: tests the max shift
    k, v = (r.normal(size=(b, s, n, h)).astype(np.float32) for _ in range(2))
    ref = jax.nn.dot_product_attention(q, k, v)
    np.testing.assert_allclose(np.asarray(heads_major_attention(q, k, v)), np.asarray(ref), atol=5e-6, rtol=0)
    # float64 NumPy: both float32 forms are this close to it (the largest outputs are about 2.5)
    logits = np.einsum("btnh,bsnh->bnts", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(h)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    exact = np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v.astype(np.float64))
    for out in (heads_major_attention(q, k, v), ref):
        np.testing.assert_allclose(np.asarray(out, np.float64), exact, atol=4e-6, rtol=0)
    loss = lambda f: (lambda q, k, v: jnp.sum(jnp.cos(f(q, k, v))))  # noqa: E731
    g = jax.grad(loss(heads_major_attention), (0, 1, 2))(q, k, v)
    g_ref = jax.grad(loss(jax.nn.dot_product_attention), (0, 1, 2))(q, k, v)
    for a, c in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5, rtol=0)


def test_heads_major_attention_bfloat16_close_to_float32():
    r = np.random.default_rng(5)
    q, k, v = (r.normal(size=(2, 16, 4, 8)).astype(np.float32) for _ in range(3))
    ref = np.asarray(jax.nn.dot_product_attention(q, k, v))
    out = heads_major_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2, rtol=0)
    g = jax.grad(lambda *a: jnp.sum(heads_major_attention(*a).astype(jnp.float32) ** 2), (0, 1, 2))(
        *(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
    g_ref = jax.grad(lambda *a: jnp.sum(jax.nn.dot_product_attention(*a) ** 2), (0, 1, 2))(q, k, v)
    for a, c in zip(g, g_ref):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(c), atol=5e-2, rtol=2e-2)  # bf16 inputs


_SHARDED_CHUNKS = """
import os
os.environ["JAX_NUM_CPU_DEVICES"] = "2"
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxcf.models import winograd
winograd.CHUNK_ELEMENTS = 2 * 8 * 8 * 4  # 4 chunks of 2 images: each device holds 4 images
mesh = Mesh(np.array(jax.devices()), ("data",))
r = np.random.default_rng(0)
x = jax.device_put(r.normal(size=(8, 8, 8, 4)).astype(np.float32), NamedSharding(mesh, P("data")))
k = r.normal(size=(3, 3, 4, 5)).astype(np.float32)
assert winograd.batch_chunks(x.shape) == 4
f = jax.jit(lambda x, k: jax.grad(lambda x: jnp.sum(jnp.sin(winograd.winograd_conv3x3(x, k))))(x))
hlo = f.lower(x, k).compile().as_text()
ref = jax.grad(lambda x: jnp.sum(jnp.sin(jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                                                      dimension_numbers=("NHWC", "HWIO", "NHWC")))))(x)
print("gathers", hlo.count("all-gather"), "while", hlo.count(" while("),
      "err", float(jnp.max(jnp.abs(f(x, k) - ref))), "sharding", f(x, k).sharding.spec)
"""


def test_winograd_chunks_of_a_sharded_batch_stay_on_their_devices():
    """On a batch split over devices, each device convolves only its own images: the chunk loop
    takes every chunk from all devices' rows (slicing the leading axis made XLA's partitioner
    gather the whole batch onto each device). Run in a process with two CPU devices."""
    from tests.test_cpu_devices import run_fresh_cpu_process

    stdout = run_fresh_cpu_process(_SHARDED_CHUNKS)
    words = stdout.split()
    assert words[:2] == ["gathers", "0"], stdout
    assert int(words[3]) >= 1, stdout  # the chunk loop is there (forward and input gradient)
    assert float(words[5]) < 1e-4, stdout
    assert "data" in words[7], stdout
