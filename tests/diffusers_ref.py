"""Helpers for the tests that compare jaxcf's diffusion models with diffusers (PyTorch, NCHW)."""

import numpy as np

import torch


def randomize(module: "torch.nn.Module", seed: int, scale: float = 0.1) -> "torch.nn.Module":
    """Adds seeded noise to every parameter, so zero-initialised convs and unit norms are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def nhwc(t: "torch.Tensor") -> np.ndarray:
    return t.detach().float().numpy().transpose(0, 2, 3, 1)


def nchw(x) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def assert_close(out, ref, rel: float = 1e-4):
    """max |out - ref| < rel * max |ref|."""
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err, scale = float(np.abs(out - ref).max()), float(np.abs(ref).max())
    assert err < rel * scale, f"max abs error {err:.3g} >= {rel} * max|ref| ({scale:.3g})"


def fast_jit(fun, **kwargs):
    """``jax.jit`` that, on CPU, skips LLVM's optimisations: the same XLA program, compiled about
    twice as fast, which is what dominates these tests' runtime on a shared CPU."""
    import jax

    if jax.default_backend() == "cpu":
        kwargs.setdefault("compiler_options", {"xla_backend_optimization_level": 0})
    return jax.jit(fun, **kwargs)
