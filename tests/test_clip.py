"""jaxcf's Flax CLIP against transformers 5 on tiny random models (no downloads)."""

import json
import shutil
import string

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import serialization  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from jaxcf.models import clip as jclip  # noqa: E402
from jaxcf.models.loading import CheckpointError  # noqa: E402

VOCAB = 100
# Two configs: legacy eos_token_id == 2 (EOS found by argmax) + quick_gelu, and a real EOS id + gelu;
# text and image towers of different widths, different patch sizes and projection dims.
# (SOS, EOS, PAD) ids: in the second config EOS is not the largest id, so argmax would pick SOS and
# only the "first == eos_token_id" rule finds it.
TOKENS = {"legacy_quick_gelu": (VOCAB - 2, VOCAB - 1, 0), "eos_gelu": (VOCAB - 1, VOCAB - 2, VOCAB - 2)}
CONFIGS = {
    "legacy_quick_gelu": dict(
        text=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=12, hidden_act="quick_gelu",
                  eos_token_id=2, bos_token_id=VOCAB - 2, pad_token_id=0),
        vision=dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, hidden_act="quick_gelu"),
        projection_dim=16),
    "eos_gelu": dict(
        text=dict(vocab_size=VOCAB, hidden_size=40, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=5, max_position_embeddings=12, hidden_act="gelu", layer_norm_eps=1e-6,
                  eos_token_id=VOCAB - 2, bos_token_id=VOCAB - 1, pad_token_id=VOCAB - 2),
        vision=dict(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, hidden_act="gelu", layer_norm_eps=1e-6),
        projection_dim=24),
}


def _perturb(model, seed):
    """Random values everywhere (LayerNorm scales/biases too), so no parameter hides a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _token_ids(name: str) -> np.ndarray:
    """[3, 12] ids for config ``name``: SOS, words, EOS, then padding; rows of different lengths."""
    sos, eos, pad = TOKENS[name]
    rng = np.random.default_rng(0)
    ids = np.full((3, 12), pad, np.int64)
    for row, n in enumerate((3, 10, 6)):
        ids[row, : n + 2] = [sos, *rng.integers(3, VOCAB - 3, n), eos]
    return ids


def _rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def _to_former_flax(model) -> dict:
    """A transformers model's weights in the former ``FlaxCLIPModel`` msgpack naming and layout."""
    tree = {}

    def put(path, value):
        node = tree
        *head, leaf = path.split(".")
        for k in head:
            node = node.setdefault(k, {})
        node[leaf] = value.detach().numpy().copy()

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            put(f"{name}.kernel", m.weight.T)
            if m.bias is not None:
                put(f"{name}.bias", m.bias)
        elif isinstance(m, torch.nn.LayerNorm):
            put(f"{name}.scale", m.weight)
            put(f"{name}.bias", m.bias)
        elif isinstance(m, torch.nn.Embedding):
            put(f"{name}.embedding", m.weight)
        elif isinstance(m, torch.nn.Conv2d):
            put(f"{name}.kernel", m.weight.permute(2, 3, 1, 0))  # OIHW -> HWIO
    for name, p in model.named_parameters():
        if name.endswith(("class_embedding", "logit_scale")):
            put(name, p)
    return tree


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_clip(request, tmp_path_factory):
    c = CONFIGS[request.param]
    config = transformers.CLIPConfig(text_config=c["text"], vision_config=c["vision"],
                                     projection_dim=c["projection_dim"])
    model = _perturb(transformers.CLIPModel(config), seed=len(request.param))
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, model, folder


def test_matches_transformers(hf_clip):
    name, model, folder = hf_clip
    clip, params = jclip.load_clip(folder)
    assert clip.config.vision.patch_size == CONFIGS[name]["vision"]["patch_size"]
    assert clip.config.text.eos_token_id == CONFIGS[name]["text"]["eos_token_id"]
    ids = _token_ids(name)
    pixels = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels), return_loss=False)
        img_ref = model.get_image_features(pixel_values=torch.from_numpy(pixels))
        txt_ref = model.get_text_features(input_ids=torch.from_numpy(ids))
    # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output is the projected feature.
    img_ref = getattr(img_ref, "pooler_output", img_ref).numpy()
    txt_ref = getattr(txt_ref, "pooler_output", txt_ref).numpy()

    @jax.jit  # one compile for everything below
    def run(params, pixels, ids):
        img, txt = clip.encode_image(params, pixels), clip.encode_text(params, ids)
        scale = clip.logit_scale(params)
        # The prompt-learner path: caller-supplied word embeddings must give the same feature.
        via_embeddings = clip.encode_text_embeddings(params, clip.token_embedding(params, ids), clip.eos_index(ids))
        return (img, txt, via_embeddings, scale, jclip.clip_logits(img, txt, scale),
                jclip.contrastive_loss(img, txt[:2], scale))

    img, txt, via_embeddings, scale, logits, loss = run(params, jnp.asarray(pixels.transpose(0, 2, 3, 1)),
                                                         jnp.asarray(ids, jnp.int32))
    assert img.shape == img_ref.shape and txt.shape == txt_ref.shape
    assert _rel_err(img, img_ref) < 1e-4
    assert _rel_err(txt, txt_ref) < 1e-4
    np.testing.assert_allclose(via_embeddings, txt, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(scale, model.logit_scale.exp().item(), rtol=1e-6)
    np.testing.assert_allclose(logits, out.logits_per_image.numpy(), rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # symmetric InfoNCE on matching pairs (the first two texts)
        loss_ref = model(input_ids=torch.from_numpy(ids[:2]), pixel_values=torch.from_numpy(pixels),
                         return_loss=True).loss.item()
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)


def test_former_flax_msgpack(hf_clip, tmp_path):
    _, model, folder = hf_clip
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(_to_former_flax(model)))
    ref_clip, ref = jclip.load_clip(folder)
    clip, params = jclip.load_clip(tmp_path)
    assert clip == ref_clip
    chex.assert_trees_all_equal(params, ref)  # same params, hence the same outputs


@pytest.mark.parametrize("with_projection", [False, True])
def test_text_only_checkpoint(tmp_path, with_projection):
    cfg = transformers.CLIPTextConfig(**CONFIGS["eos_gelu"]["text"], projection_dim=8)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    model = _perturb(cls(cfg), seed=3)
    model.save_pretrained(tmp_path / "text_encoder")
    clip, params = jclip.load_clip_text(tmp_path, subfolder="text_encoder")
    assert clip.config.vision is None and ("text_projection" in params) == with_projection
    ids = _token_ids("eos_gelu")
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids))
    hidden, feats = jax.jit(lambda p, ids: (clip.text_hidden_states(p, ids),
                                            clip.encode_text(p, ids) if with_projection else None))(params, ids)
    assert _rel_err(hidden, out.last_hidden_state.numpy()) < 1e-4
    if with_projection:
        assert _rel_err(feats, out.text_embeds.numpy()) < 1e-4
    else:
        with pytest.raises(ValueError, match="text_projection"):
            clip.encode_text(params, ids)
    with pytest.raises(CheckpointError, match="load_clip_text"):
        jclip.load_clip(tmp_path / "text_encoder")

    # transformers 5 saves CLIPTextModel without the `text_model.` prefix that earlier versions (and
    # existing Stable Diffusion checkpoints) have: both load to the same params.
    tensors = load_file(str(tmp_path / "text_encoder" / "model.safetensors"))
    renamed = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
               for k, v in tensors.items()}
    assert set(renamed) != set(tensors) or with_projection  # CLIPTextModelWithProjection keeps the prefix
    (tmp_path / "v4").mkdir()
    shutil.copy(tmp_path / "text_encoder" / "config.json", tmp_path / "v4" / "config.json")
    save_file(renamed, str(tmp_path / "v4" / "model.safetensors"))
    chex.assert_trees_all_equal(jclip.load_clip_text(tmp_path / "v4")[1], params)


def test_checkpoint_errors_name_the_tensor(hf_clip, tmp_path):
    _, _, folder = hf_clip
    tensors = load_file(str(folder / "model.safetensors"))

    def write(sd, sub):
        (tmp_path / sub).mkdir()
        shutil.copy(folder / "config.json", tmp_path / sub / "config.json")
        save_file(sd, str(tmp_path / sub / "model.safetensors"))
        return tmp_path / sub

    missing = {k: v for k, v in tensors.items() if k != "text_model.encoder.layers.1.mlp.fc2.weight"}
    with pytest.raises(CheckpointError, match=r"text_model\.encoder\.layers\.1\.mlp\.fc2\.weight"):
        jclip.load_clip(write(missing, "missing"))

    wrong = dict(tensors)
    wrong["vision_model.post_layernorm.weight"] = np.zeros(wrong["vision_model.post_layernorm.weight"].size + 1,
                                                          np.float32)
    with pytest.raises(CheckpointError, match=r"shape mismatch for vision_model\.post_layernorm\.scale"):
        jclip.load_clip(write(wrong, "shape"))

    extra = dict(tensors, **{"text_model.encoder.layers.9.mlp.fc1.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match=r"layers\.9\.mlp\.fc1\.weight was not used"):
        jclip.load_clip(write(extra, "extra"))


@pytest.mark.parametrize("hf_clip", ["eos_gelu"], indirect=True)  # one config is enough
def test_bfloat16_close_and_jit_traces_once(hf_clip):
    _, model, folder = hf_clip
    clip, params = jclip.load_clip(folder, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def features(params, pixels, ids):
        return clip.encode_image(params, pixels), clip.encode_text(params, ids)

    rng = np.random.default_rng(2)
    ids = _token_ids("eos_gelu")
    for step in range(2):  # new values, same shapes: no retrace
        pixels = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
        ids = ids[::-1].copy()
        img, txt = features(params, jnp.asarray(pixels), jnp.asarray(ids, jnp.int32))
        assert img.dtype == txt.dtype == jnp.bfloat16
        with torch.no_grad():  # the float32 reference
            img_ref = model.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
            txt_ref = model.get_text_features(input_ids=torch.from_numpy(ids))
        assert _rel_err(img, img_ref.pooler_output.numpy()) < 5e-2
        assert _rel_err(txt, txt_ref.pooler_output.numpy()) < 5e-2


def test_train_from_scratch_and_prompt_gradients():
    tok = jclip.WordTokenizer(["a", "photo", "of", "red", "blue", "cube", "ball", "."])
    clip = jclip.CLIP(jclip.CLIPConfig.tiny(vocab_size=tok.vocab_size, max_len=10, depth=1))
    params = clip.init(jax.random.key(0))
    chex.assert_trees_all_equal_shapes_and_dtypes(params, clip.param_shapes())
    q = jax.device_get(params["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"])
    assert abs(q["kernel"].std() - 32 ** -0.5 * 2 ** -0.5) < 0.02 and not q["bias"].any()  # CLIP's init
    assert float(params["logit_scale"]) == pytest.approx(np.log(1 / 0.07), abs=1e-4)
    ids = tok(["a photo of a red cube.", "a photo of a blue ball."], max_length=10)
    pixels = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)

    def loss_fn(params, word_embeddings):
        text = clip.encode_text_embeddings(params, word_embeddings, clip.eos_index(ids))
        return jclip.contrastive_loss(clip.encode_image(params, pixels), text, clip.logit_scale(params))

    # One backward pass for the parameters and for the word embeddings (CoOp's learned context).
    emb = clip.token_embedding(params, ids)
    loss, (grads, g) = jax.device_get(jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(params, emb))
    assert np.isfinite(loss) and set(grads) == set(params)
    assert grads["logit_scale"] != 0
    assert np.abs(grads["vision_model"]["embeddings"]["patch_embedding"]["kernel"]).max() > 0
    assert np.abs(g[:, 1:5]).max() > 0  # "a photo of a" positions
    np.testing.assert_array_equal(g[:, 9:], 0)  # causal: nothing after EOS (position 8) matters

    with pytest.raises(ValueError, match="pixels must be"):
        clip.encode_image(params, pixels[:, :16])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        clip.encode_text(params, np.zeros((1, 11), np.int32))
    with pytest.raises(ValueError, match="hidden_act"):
        jclip.CLIPConfig.tiny(hidden_act="swish")


def test_word_tokenizer():
    tok = jclip.WordTokenizer(["a", "photo", "of", "red", "cube", "."])
    assert (tok.pad_id, tok.sos_id, tok.eos_id, tok.vocab_size) == (0, 7, 8, 9)
    ids = tok(["A photo of a red cube.", "red cube"], max_length=10)
    assert ids.dtype == np.int32 and ids.shape == (2, 10)
    np.testing.assert_array_equal(ids[0], [7, 1, 2, 3, 1, 4, 5, 6, 8, 0])
    assert tok.decode(ids[0]) == "a photo of a red cube."
    assert tok.decode(ids[1]) == "red cube"
    assert tok(["a photo of a red cube."], max_length=4)[0].tolist() == [7, 1, 2, 8]  # EOS kept
    with pytest.raises(ValueError, match="'sphere'"):
        tok("a red sphere")
    assert jclip.WordTokenizer.from_texts(["a red cube.", "a cube"]).words == ("a", "red", "cube", ".")


def test_bpe_tokenizer(tmp_path):
    vocab = {}
    for suffix in ("", "</w>"):
        for ch in string.ascii_lowercase + ".":
            vocab[ch + suffix] = len(vocab)
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")

    tok = jclip.load_tokenizer(tmp_path)  # Stable Diffusion layout: found in tokenizer/
    sos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert (tok.sos_id, tok.eos_id, tok.pad_id) == (sos, eos, eos)
    ids = tok(["a cat.", "Dog dog dog dog dog dog"], max_length=6)
    np.testing.assert_array_equal(ids, [[sos, vocab["a</w>"], vocab["cat</w>"], vocab[".</w>"], eos, eos],
                                        [sos] + [vocab["dog</w>"]] * 4 + [eos]])
    ref = tok.hf(["a cat.", "Dog dog dog dog dog dog"], padding="max_length", max_length=6, truncation=True)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no CLIP tokenizer"):
        jclip.load_tokenizer(tmp_path / "empty")


def test_preprocessing_matches_transformers():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (40, 52, 3), np.uint8), rng.integers(0, 256, (61, 37, 3), np.uint8)]
    ours = jclip.preprocess_images(images, image_size=32)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref = np.stack([proc(im, return_tensors="np")["pixel_values"][0] for im in images]).transpose(0, 2, 3, 1)
    assert ours.shape == (2, 32, 32, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        jclip.preprocess_images(np.zeros((1, 8, 8, 3), np.float32))

    # Differentiable path: same result on an image already at size; close after resizing.
    x = images[0].astype(np.float32) / 127.5 - 1.0
    same = jclip.to_clip_input(jnp.asarray(x[None, :32, :32]), 32)
    np.testing.assert_allclose(same, jclip.preprocess_images(images[0][None, :32, :32], 32), atol=1e-5)
    fn = jax.jit(jclip.to_clip_input, static_argnums=1)
    resized = fn(jnp.asarray(x[None]), 32)
    assert resized.shape == (1, 32, 32, 3)
    assert float(jnp.abs(resized - ours[:1]).mean()) < 0.02  # PIL vs jax antialiased bicubic
    g = jax.grad(lambda im: fn(im, 32).sum())(jnp.asarray(x[None]))
    assert g.shape == (1, 40, 52, 3) and bool(jnp.isfinite(g).all())


def test_config_from_legacy_hf_layout():
    # Configs written before transformers 4.26 (e.g. openai/clip-vit-base-patch32) hold the values
    # in `*_config_dict`, with nulls in `*_config`.
    hf = {"model_type": "clip", "projection_dim": 32, "text_config": {"hidden_size": None, "eos_token_id": 2},
          "text_config_dict": {"hidden_size": 64, "num_attention_heads": 4, "hidden_act": "quick_gelu"},
          "vision_config": None, "vision_config_dict": {"hidden_size": 96, "patch_size": 16, "image_size": 64,
                                                        "num_attention_heads": 4}}
    config = jclip.CLIPConfig.from_hf(hf, dtype=jnp.bfloat16)
    assert (config.text.hidden_size, config.text.eos_token_id, config.text.num_hidden_layers) == (64, 2, 12)
    assert (config.vision.hidden_size, config.vision.num_positions, config.projection_dim) == (96, 17, 32)
    assert config.dtype == jnp.bfloat16 and config.param_dtype == jnp.float32
    clip = jclip.CLIP(config)
    assert hash(clip) == hash(jclip.CLIP(jclip.CLIPConfig.from_hf(hf, dtype="bfloat16")))  # usable as a static arg
