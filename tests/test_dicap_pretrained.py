"""DiCap's real-data path end to end: a tfds dataset, a HF CLIP folder and a diffusers SD folder.

Everything is tiny, random and made here (the real runs use CLIP ViT-B/16 and Stable Diffusion by
hub id); the code path is the one a user runs: tfds k-shot base/novel, latent DDIM inversion and
guidance through the VAE decoder, prompt learning, evaluation.
"""

import os
import re

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")
pytest.importorskip("tensorflow_datasets")

from jaxcf.configs import ConfigError  # noqa: E402
from jaxcf.pipelines import run  # noqa: E402
from tests.test_main import load_config  # noqa: E402
from tests.test_stable_diffusion import _write_tokenizer, write_tiny_sd  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from jaxcf.data.tfds_data import write_fake_tfds

    root = tmp_path_factory.mktemp("dicap_real")
    write_fake_tfds("eurosat", str(root / "tfds"), examples_per_class={"train": 10})
    (root / "sd").mkdir()
    sd = write_tiny_sd(root / "sd")
    clip_dir = root / "clip"
    clip_dir.mkdir()
    vocab_size = _write_tokenizer(clip_dir / "tokenizer")
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=48, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=8)
    transformers.CLIPModel(cfg).save_pretrained(clip_dir)
    return root, sd, clip_dir


def real_config(assets):
    root, sd, clip_dir = assets
    c = load_config(os.path.join(ROOT, "configs", "dicap.py"), "test")
    c.data.update(name="tfds:eurosat", data_dir=str(root / "tfds"), shots=2, resolution=32, base_classes=(),
                  novel_classes=(), max_test_examples=12)
    c.foundation.update(kind="pretrained", clip_checkpoint=str(clip_dir), diffusion_checkpoint=str(sd))
    c.counterfactual.update(batch_size=4, ddim_steps=3, guide_on="x0")  # CLIP guidance: no noise-aware classifier here
    c.train.update(batch_size=4, steps=4)
    c.prompt.init_text = ""  # the tiny character-level tokenizer makes "a photo of a" 9 tokens
    return c


@pytest.mark.slow
def test_dicap_on_tfds_with_clip_and_stable_diffusion_folders(assets, tmp_path):
    res = run(real_config(assets), str(tmp_path / "w"))
    assert res["dataset"] == "tfds:eurosat"
    s = res["summary"]
    for method in ("zeroshot", "coop", "dicap"):
        assert 0.0 <= s[f"{method}_base"]["mean"] <= 1.0 and 0.0 <= s[f"{method}_novel"]["mean"] <= 1.0
    assert s["cf_l1"]["mean"] > 0  # the latent round trip through the VAE changed the images
    assert os.path.isfile(tmp_path / "w" / "counterfactuals.png")


def test_real_data_input_errors(assets, tmp_path):
    c = real_config(assets)
    c.data.shots = 50
    with pytest.raises(ConfigError, match=re.escape("config.data.shots=50 is larger than the data: class")):
        run(c, str(tmp_path / "a"))
    c = real_config(assets)
    c.foundation.clip_checkpoint = str(tmp_path / "no_such_clip")
    with pytest.raises(ConfigError, match="config.foundation.clip_checkpoint=.*no such checkpoint folder"):
        run(c, str(tmp_path / "b"))
    c = real_config(assets)
    c.prompt.init_text = "a photo of a"
    with pytest.raises(ConfigError, match=re.escape("config.prompt.init_text='a photo of a' has 9 tokens but")):
        run(c, str(tmp_path / "d"))
    c = real_config(assets)
    c.data.novel_classes = ("Sea or Lake", "Atlantis")
    with pytest.raises(ConfigError, match="Atlantis"):
        run(c, str(tmp_path / "c"))
