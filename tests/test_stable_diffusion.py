"""load_stable_diffusion reads a diffusers pipeline folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/."""

import json
import string

import jax
import jax.numpy as jnp
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from jaxcf.models.stable_diffusion import load_stable_diffusion, scheduler_config  # noqa: E402
from tests.diffusers_ref import randomize  # noqa: E402


def _write_tokenizer(folder):
    vocab = {}
    for suffix in ("", "</w>"):
        for ch in string.ascii_lowercase + ".":
            vocab[ch + suffix] = len(vocab)
    merges = ["c a", "ca t</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def write_tiny_sd(root):
    """A tiny random Stable Diffusion pipeline folder (v-prediction, 2x VAE downsampling)."""
    vocab_size = _write_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=12, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1))
    text.save_pretrained(root / "text_encoder")
    randomize(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ), seed=1).save_pretrained(root / "unet")
    randomize(diffusers.AutoencoderKL(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, latent_channels=4,
        scaling_factor=0.13025), seed=2).save_pretrained(root / "vae")
    diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            prediction_type="v_prediction").save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


def test_loads_every_component(sd_folder):
    sd = load_stable_diffusion(sd_folder, dtype=jnp.bfloat16)
    assert sd.scheduler == {"schedule": "scaled_linear", "num_train_timesteps": 1000, "beta_start": 0.00085,
                            "beta_end": 0.012, "prediction_type": "v_prediction"}
    assert sd.vae.config.scaling_factor == 0.13025 and sd.vae.config.latent_channels == 4
    assert sd.unet.config.cross_attention_dim == 16
    for tree in (sd.unet_params, sd.vae_params, sd.text_params):
        assert {x.dtype for x in jax.tree_util.tree_leaves(tree)} == {jnp.dtype(jnp.bfloat16)}

    text = jax.eval_shape(lambda: sd.encode_prompts(["a cat.", "a dog."]))
    assert text.shape == (2, 12, 16)
    eps = jax.eval_shape(sd.eps_fn, jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.bfloat16), 10, text)
    assert eps.shape == (2, 8, 8, 4)


def test_scheduler_config_names():
    assert scheduler_config({"beta_schedule": "squaredcos_cap_v2"})["schedule"] == "cosine"
    assert scheduler_config({})["prediction_type"] == "epsilon"
    with pytest.raises(ValueError, match="beta_schedule.*sigmoid.*allowed"):
        scheduler_config({"beta_schedule": "sigmoid"})
