"""jaxcf UNet2DConditionModel == diffusers UNet2DConditionModel on the same random weights."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxcf.models.unet2d_condition import UNet2DConditionConfig, load_unet2d_condition  # noqa: E402
from tests.diffusers_ref import assert_close, fast_jit, nchw, nhwc, randomize  # noqa: E402

CONFIGS = {
    # SD1-like: one head count for every block, 1x1-conv projections.
    "sd1": dict(block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=12, attention_head_dim=2,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4),
    # SD2-like: head counts per block (the up path takes them in reverse), linear projections, two
    # transformer layers, no mid block, cross-attention only on the way up.
    "sd2": dict(block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=16, attention_head_dim=(2, 4),
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                mid_block_type=None, norm_num_groups=4, use_linear_projection=True,
                transformer_layers_per_block=(1, 2), upcast_attention=True),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = randomize(diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, **cfg),
                          seed=30 + i)
        folder = tmp_path_factory.mktemp(f"unet_cond_{name}")
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


def _inputs(cross_dim, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    context = rng.standard_normal((2, 5, cross_dim)).astype(np.float32)
    return x, np.array([10, 999]), context


def _reference(ref_model, x, t, context):
    with torch.no_grad():
        return nhwc(ref_model(nchw(x), torch.from_numpy(t), torch.from_numpy(context)).sample)


def test_sd1_like_matches_diffusers_and_traces_once(checkpoints):
    ref_model, folder = checkpoints["sd1"]
    x, t, context = _inputs(12)
    model, params = load_unet2d_condition(folder)
    assert params["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].shape == (8, 8)  # from a 1x1 conv

    @fast_jit
    @chex.assert_max_traces(n=1)
    def eps_fn(p, z_t, t, c):
        return model.apply({"params": p}, z_t, t, c)

    assert_close(eps_fn(params, x, t, context), _reference(ref_model, x, t, context))
    eps_fn(params, x, t - 5, context)  # new timesteps, same shapes: no retrace


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sd2_like_matches_diffusers(checkpoints, dtype):
    ref_model, folder = checkpoints["sd2"]
    x, t, context = _inputs(16)
    model, params = load_unet2d_condition(folder, dtype=dtype)
    assert params["up_blocks_0"]["attentions_1"]["proj_in"]["kernel"].dtype == dtype
    eps_fn = lambda p, x, t, c: model.apply({"params": p}, x, t, c)
    out = fast_jit(eps_fn)(params, x, t, context)
    assert out.dtype == dtype
    assert_close(out, _reference(ref_model, x, t, context), rel=1e-4 if dtype == jnp.float32 else 0.05)
    # Guidance differentiates through the noise model (numerically checked for UNet2DModel, which
    # shares the blocks); here the backward pass must at least trace.
    grad = jax.eval_shape(jax.grad(lambda x: jnp.sum(eps_fn(params, x, t, context).astype(jnp.float32))), x)
    assert grad.shape == x.shape


def test_unsupported_config_is_named():
    with pytest.raises(ValueError, match="addition_embed_type.*None"):
        UNet2DConditionConfig.from_diffusers({"addition_embed_type": "text_time"})
    with pytest.raises(ValueError, match="up_block_types.*SimpleCrossAttnUpBlock2D"):
        UNet2DConditionConfig.tiny(up_block_types=("UpBlock2D", "SimpleCrossAttnUpBlock2D"))
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNet2DConditionConfig.tiny(attention_head_dim=(3, 4))
