"""jaxcf UNet2DModel == diffusers UNet2DModel on the same random weights."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxcf.models.blocks import ResnetBlock2D, expected_params  # noqa: E402
from jaxcf.models.loading import CheckpointError  # noqa: E402
from jaxcf.models.unet2d import UNet2DConfig, load_unet2d  # noqa: E402
from tests.diffusers_ref import assert_close, fast_jit, nchw, nhwc, randomize  # noqa: E402

CONFIGS = {
    # Attention at the lower level and in the mid block, several heads, a learned class embedding.
    "attn": dict(block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, norm_num_groups=4,
                 num_class_embeds=5),
    # No attention anywhere, three levels, scale-shift time conditioning, timestep-style class embedding.
    "plain": dict(block_out_channels=(8, 8, 16), layers_per_block=1,
                  down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, add_attention=False,
                  norm_num_groups=4, resnet_time_scale_shift="scale_shift", class_embed_type="timestep",
                  flip_sin_to_cos=False, freq_shift=1),
}
SIZES = {"attn": 8, "plain": 16}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = randomize(diffusers.UNet2DModel(in_channels=3, out_channels=3, **cfg), seed=10 + i)
        folder = tmp_path_factory.mktemp(f"unet2d_{name}")
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


def _inputs(size, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, size, size, 3)).astype(np.float32)
    return x, np.array([3, 741]), np.array([1, 4])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(checkpoints, name):
    ref_model, folder = checkpoints[name]
    x, t, labels = _inputs(SIZES[name])
    with torch.no_grad():
        ref = nhwc(ref_model(nchw(x), torch.from_numpy(t), torch.from_numpy(labels)).sample)
    model, params = load_unet2d(folder)

    if name == "attn":
        @fast_jit
        def eps_and_input_grad(p, x, t, c):
            # Guidance differentiates through the noise model with respect to its input.
            eps, vjp = jax.vjp(lambda x: model.apply({"params": p}, x, t, c), x)
            return eps, vjp(jnp.ones_like(eps))[0]

        out, grad = eps_and_input_grad(params, x, t, labels)
        assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
    else:
        @fast_jit
        @chex.assert_max_traces(n=1)
        def eps_fn(p, x_t, t, c):
            return model.apply({"params": p}, x_t, t, c)

        out = eps_fn(params, x, t, labels)
        eps_fn(params, x + 1, t + 1, labels)  # new values, same shapes: no retrace
    assert out.dtype == jnp.float32
    assert_close(out, ref)


def test_missing_tensor_is_named(checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, folder = checkpoints["attn"]
    tensors = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    gone = "down_blocks.1.attentions.0.to_k.weight"
    del tensors[gone]
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match=gone.replace(".", r"\.")):
        load_unet2d(tmp_path)


def test_unsupported_config_is_named():
    with pytest.raises(ValueError, match="time_embedding_type.*positional"):
        UNet2DConfig.from_diffusers({"time_embedding_type": "fourier"})
    with pytest.raises(ValueError, match="down_block_types.*SkipDownBlock2D"):
        UNet2DConfig.from_diffusers({"down_block_types": ["SkipDownBlock2D"], "up_block_types": ["UpBlock2D"],
                                     "block_out_channels": [8]})


def test_resnet_block_semantic_condition_hook():
    """DiffAE's h <- h * (1 + Linear(SiLU(z))) after the time modulation; a zero projection is a no-op."""
    rng = np.random.default_rng(0)
    x, temb, z = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(2, 4, 4, 8), (2, 16), (2, 6)])
    plain = ResnetBlock2D(8, groups=4, time_embedding_norm="scale_shift")
    hooked = ResnetBlock2D(8, groups=4, time_embedding_norm="scale_shift", cond_channels=6)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32),
                                    expected_params(hooked, x, temb, z))
    assert set(params) - set(expected_params(plain, x, temb)) == {"cond_emb_proj"}
    base = {k: v for k, v in params.items() if k != "cond_emb_proj"}
    zero = dict(base, cond_emb_proj=jax.tree_util.tree_map(jnp.zeros_like, params["cond_emb_proj"]))
    ref = plain.apply({"params": base}, x, temb)
    np.testing.assert_allclose(hooked.apply({"params": zero}, x, temb, z), ref, rtol=1e-6, atol=1e-6)
    assert not np.allclose(hooked.apply({"params": params}, x, temb, z), ref, atol=1e-3)
    with pytest.raises(ValueError, match="cond_channels=6"):
        hooked.apply({"params": params}, x, temb)
