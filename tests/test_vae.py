"""jaxcf AutoencoderKL == diffusers AutoencoderKL on the same random weights."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxcf.models.vae import (  # noqa: E402
    AutoencoderKLConfig, image_to_latent, latent_to_image, load_vae, sample_latent, vae_decode, vae_encode)
from tests.diffusers_ref import assert_close, fast_jit, nchw, nhwc, randomize  # noqa: E402

CONFIGS = {
    "one_level": dict(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                      up_block_types=("UpDecoderBlock2D",), layers_per_block=2, norm_num_groups=4, latent_channels=2,
                      scaling_factor=0.5),
    "two_levels": dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                       latent_channels=4),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = randomize(diffusers.AutoencoderKL(in_channels=3, out_channels=3, **cfg), seed=20 + i)
        folder = tmp_path_factory.mktemp(f"vae_{name}")
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_decode_match_diffusers(checkpoints, name):
    ref_model, folder = checkpoints[name]
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    with torch.no_grad():
        dist = ref_model.encode(nchw(x)).latent_dist
        ref_mean, ref_logvar = nhwc(dist.mean), nhwc(dist.logvar)
        ref_x = nhwc(ref_model.decode(dist.mean).sample)

    model, params = load_vae(folder)
    (mean, logvar), x_rec = fast_jit(lambda p, x, z: (vae_encode(model, p, x), vae_decode(model, p, z)))(
        params, x, ref_mean)
    assert_close(mean, ref_mean)
    assert_close(logvar, ref_logvar)
    assert_close(x_rec, ref_x)


def test_latent_scaling_sampling_and_gradients(checkpoints):
    _, folder = checkpoints["one_level"]
    model, params = load_vae(folder)
    assert model.config.scaling_factor == 0.5
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 8, 8, 3)), jnp.float32)

    @fast_jit
    def encode_all(p, x, key):
        mean, logvar = vae_encode(model, p, x)
        return mean, image_to_latent(model, p, x), image_to_latent(model, p, x, key), sample_latent(key, mean, logvar)

    mean, latent, sampled, z = encode_all(params, x, jax.random.key(0))
    np.testing.assert_allclose(latent, 0.5 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sampled, 0.5 * z, rtol=1e-5, atol=1e-6)  # same key, same draw
    assert not np.allclose(z, mean)

    # Guidance differentiates a loss on the decoded image with respect to the latent.
    grad = fast_jit(jax.grad(lambda z, p: jnp.sum(latent_to_image(model, p, z) ** 2)))(latent, params)
    assert grad.shape == latent.shape and np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


def _former_flax_tree(state_dict):
    """A diffusers PyTorch state dict in the naming and layout of the former Flax AutoencoderKL."""
    tree = {}
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
    for key, w in state_dict.items():
        w = w.detach().numpy()
        mods = []
        for part in key.split("."):
            if part.isdigit():
                mods[-1] += f"_{part}"
            else:
                mods.append(part)
        *mods, leaf = [renames.get(m, m) for m in mods]
        if leaf == "weight":
            if w.ndim == 4:
                leaf, w = "kernel", w.transpose(2, 3, 1, 0)
            elif w.ndim == 2:
                leaf, w = "kernel", w.T
            else:
                leaf = "scale"
        node = tree
        for m in mods:
            node = node.setdefault(m, {})
        node[leaf] = w
    return tree


def test_former_flax_msgpack_loads_the_same_params(checkpoints, tmp_path):
    from flax import serialization

    ref_model, folder = checkpoints["two_levels"]
    tree = _former_flax_tree(ref_model.state_dict())
    assert "query" in tree["encoder"]["mid_block"]["attentions_0"]
    (tmp_path / "diffusion_flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())

    _, from_msgpack = load_vae(tmp_path)
    _, from_safetensors = load_vae(folder)
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_msgpack, from_safetensors)


def test_bfloat16_decode_close(checkpoints):
    ref_model, folder = checkpoints["two_levels"]
    z = np.random.default_rng(2).standard_normal((1, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        ref = nhwc(ref_model.decode(nchw(z)).sample)
    model, params = load_vae(folder, dtype=jnp.bfloat16)
    out = fast_jit(lambda p, z: vae_decode(model, p, z))(params, z)
    assert out.dtype == jnp.bfloat16
    assert_close(out, ref, rel=0.05)


def test_unsupported_config_is_named():
    cfg = json.loads(json.dumps(dict(CONFIGS["one_level"], down_block_types=["AttnDownEncoderBlock2D"])))
    with pytest.raises(ValueError, match="down_block_types.*AttnDownEncoderBlock2D.*DownEncoderBlock2D"):
        AutoencoderKLConfig.from_diffusers(cfg)
