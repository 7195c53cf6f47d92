"""DiCap's pure pieces against independent references (float64 NumPy, brute force, CLIP itself)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcf.dicap.counterfactuals import clip_zero_shot_log_prob, generate_counterfactuals, sample_target_classes
from jaxcf.dicap.losses import counterfactual_contrastive_loss, dicap_loss
from jaxcf.dicap.metrics import counterfactual_latent_divergence, harmonic_mean, recall_at_k
from jaxcf.dicap.prompts import build_prompt_tokens, for_unseen_classes, init_prompt_params, prompt_text_features
from jaxcf.diffusion import ddim_invert, ddim_sample, make_schedule
from jaxcf.models.clip import CLIP, CLIPConfig, WordTokenizer, to_clip_input

CLASSES = ["circle", "red star", "square", "hexagon"]


@pytest.fixture(scope="module")
def clip_setup():
    tok = WordTokenizer.from_texts(["a photo of a"] + [f"{c}." for c in CLASSES])
    clip = CLIP(CLIPConfig.tiny(vocab_size=tok.vocab_size, max_len=12, eos_token_id=tok.eos_id, image_size=16,
                                patch_size=8))
    params = clip.init(jax.random.key(0))
    return tok, clip, params


def test_prompt_from_init_text_equals_encoding_the_text(clip_setup):
    tok, clip, params = clip_setup
    tmpl = build_prompt_tokens(tok, CLASSES, 4, 12)
    p = init_prompt_params(jax.random.key(1), clip, params, tok, len(CLASSES), 4, "a photo of a")
    base = clip.token_embedding(params, jnp.asarray(tmpl.token_ids))
    feats = prompt_text_features(clip, params, p, base, tmpl)
    ref = clip.encode_text(params, jnp.asarray(tok([f"a photo of a {c}." for c in CLASSES], max_length=12)))
    np.testing.assert_allclose(feats, ref, rtol=1e-5, atol=1e-5)
    # class-specific context starts identical; cocoop adds a per-image bias
    pc = init_prompt_params(jax.random.key(1), clip, params, tok, len(CLASSES), 4, "a photo of a", "class_specific")
    assert pc["ctx"].shape == (4, 4, clip.config.text.hidden_size)
    np.testing.assert_allclose(prompt_text_features(clip, params, pc, base, tmpl), ref, rtol=1e-5, atol=1e-5)
    pm = init_prompt_params(jax.random.key(1), clip, params, tok, len(CLASSES), 4, "a photo of a", "cocoop")
    img = jax.random.normal(jax.random.key(2), (3, clip.config.projection_dim))
    assert prompt_text_features(clip, params, pm, base, tmpl, img).shape == (3, 4, clip.config.projection_dim)


def test_prompt_errors(clip_setup):
    tok, clip, params = clip_setup
    with pytest.raises(ValueError, match="has 4 tokens but prompt.n_ctx=3"):
        init_prompt_params(jax.random.key(1), clip, params, tok, 4, 3, "a photo of a")
    with pytest.raises(ValueError, match="prompt.mode='meta' is not allowed"):
        init_prompt_params(jax.random.key(1), clip, params, tok, 4, 4, "a photo of a", "meta")
    with pytest.raises(ValueError, match="needs 10 tokens with n_ctx=5"):
        build_prompt_tokens(tok, ["red star"], 5, 8)
    p = init_prompt_params(jax.random.key(1), clip, params, tok, 4, 4, "")
    assert abs(float(jnp.std(p["ctx"])) - 0.02) < 0.01


def test_unseen_classes_get_the_mean_class_specific_context(clip_setup):
    """Class-specific contexts are learned for base classes only: novel classes get their mean
    (never base class i's context for novel class i); shared contexts pass through unchanged."""
    tok, clip, params = clip_setup
    novel = CLASSES[:3]
    tmpl = build_prompt_tokens(tok, novel, 4, 12)
    base = clip.token_embedding(params, jnp.asarray(tmpl.token_ids))
    pc = init_prompt_params(jax.random.key(1), clip, params, tok, len(CLASSES), 4, "", "class_specific")
    with pytest.raises(ValueError, match="class-specific contexts for 4 classes cannot prompt 3 classes"):
        prompt_text_features(clip, params, pc, base, tmpl)
    mean = for_unseen_classes(pc)
    np.testing.assert_allclose(mean["ctx"], np.asarray(pc["ctx"]).mean(0), rtol=1e-6)
    shared = {"ctx": mean["ctx"]}
    np.testing.assert_allclose(prompt_text_features(clip, params, mean, base, tmpl),
                               prompt_text_features(clip, params, shared, base, tmpl), rtol=1e-6)
    pu = init_prompt_params(jax.random.key(1), clip, params, tok, len(CLASSES), 4, "")
    assert for_unseen_classes(pu) is pu


def _np_lcf(f, fcf, t, y, tau, all_classes):
    def cos(a, b):
        a = a / np.linalg.norm(a, axis=-1, keepdims=True)
        b = b / np.linalg.norm(b, axis=-1, keepdims=True)
        return a @ b.T

    sx, scf = cos(f, t) / tau, cos(fcf, t) / tau
    per = -np.log(np.exp(sx) / (np.exp(sx) + np.exp(scf)))
    return per.mean() if all_classes else per[np.arange(len(y)), y].mean()


@pytest.mark.parametrize("tau,all_classes", [(1.0, False), (0.07, False), (0.5, True)])
def test_counterfactual_contrastive_loss_matches_float64(tau, all_classes):
    rng = np.random.default_rng(0)
    f, fcf, t = rng.normal(size=(6, 8)), rng.normal(size=(6, 8)), rng.normal(size=(5, 8))
    y = rng.integers(0, 5, 6)
    got = counterfactual_contrastive_loss(jnp.asarray(f), jnp.asarray(fcf), jnp.asarray(t), jnp.asarray(y), tau,
                                          all_classes)
    np.testing.assert_allclose(got, _np_lcf(f, fcf, t, y, tau, all_classes), rtol=1e-5)
    valid = np.array([1, 1, 0, 1, 0, 1], bool)
    got = counterfactual_contrastive_loss(jnp.asarray(f), jnp.asarray(fcf), jnp.asarray(t), jnp.asarray(y), tau,
                                          all_classes, jnp.asarray(valid))
    np.testing.assert_allclose(got, _np_lcf(f[valid], fcf[valid], t, y[valid], tau, all_classes), rtol=1e-5)


def test_dicap_loss_is_ce_plus_lambda_lcf_and_a_hard_negative_costs_more():
    rng = np.random.default_rng(1)
    f, t = rng.normal(size=(4, 8)), rng.normal(size=(3, 8))
    y = np.array([0, 1, 2, 0])
    loss0, m0 = dicap_loss(jnp.asarray(f), None, jnp.asarray(t), jnp.asarray(y), 100.0)
    logits = 100 * (f / np.linalg.norm(f, axis=1, keepdims=True)) @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
    ce = np.mean(np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1) - logits[np.arange(4), y])
    np.testing.assert_allclose(loss0, ce, rtol=1e-5)
    near = f + 0.01 * rng.normal(size=f.shape)  # a counterfactual that did not change: hard to tell apart
    far = -t[y]  # one that moved away from the true class's prompt
    l_near, _ = dicap_loss(jnp.asarray(f), jnp.asarray(near), jnp.asarray(t), jnp.asarray(y), 100.0, lam=2.0)
    l_far, _ = dicap_loss(jnp.asarray(f), jnp.asarray(far), jnp.asarray(t), jnp.asarray(y), 100.0, lam=2.0)
    np.testing.assert_allclose(l_near - loss0, 2.0 * np.log(2.0), atol=1e-2)  # L_cf = log 2 when x_cf ~ x
    assert float(l_far) < float(l_near)


def test_target_class_sampling():
    rng = np.random.default_rng(2)
    t = rng.normal(size=(6, 5))
    labels = jnp.arange(6).repeat(3)
    y = np.asarray(sample_target_classes(labels, jnp.asarray(t), "similarity"))
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    sim = tn @ tn.T
    np.fill_diagonal(sim, -np.inf)
    np.testing.assert_array_equal(y, np.argmax(sim, 1)[np.asarray(labels)])
    r = np.asarray(sample_target_classes(labels, jnp.asarray(t), "random", jax.random.key(0)))
    assert np.all(r != np.asarray(labels)) and np.all((0 <= r) & (r < 6))
    with pytest.raises(ValueError, match="dicap.cf_target='nearest' is not allowed"):
        sample_target_classes(labels, jnp.asarray(t), "nearest")


def test_cld_matches_a_direct_count():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(30, 4))
    ref_labels = np.repeat(np.arange(3), 10)
    x, xcf = ref[[0, 12]], rng.normal(size=(2, 4))
    labels, ycf = np.array([0, 1]), np.array([2, 0])
    got = counterfactual_latent_divergence(x, xcf, labels, ycf, ref, ref_labels)
    for i in range(2):
        d = np.linalg.norm(x[i] - xcf[i])
        s_x = [np.linalg.norm(x[i] - r) for r, lab in zip(ref, ref_labels) if lab == labels[i]
               and not np.allclose(r, x[i])]
        s_cf = [np.linalg.norm(x[i] - r) for r, lab in zip(ref, ref_labels) if lab == ycf[i]]
        expected = np.log(0.5 * np.exp(np.mean(np.array(s_cf) <= d)) + 0.5 * np.exp(np.mean(np.array(s_x) >= d)))
        np.testing.assert_allclose(got[i], expected)


def test_harmonic_mean_and_recall():
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.48 / 1.4)
    assert harmonic_mean(0.0, 0.0) == 0.0
    rng = np.random.default_rng(4)
    f = rng.normal(size=(20, 6))
    r = recall_at_k(f, f + 1e-3 * rng.normal(size=f.shape), ks=(1, 5))
    assert r["i2t_R@1"] == 1.0 and r["t2i_R@5"] == 1.0
    r = recall_at_k(f, rng.normal(size=f.shape), ks=(1, 20))
    assert r["i2t_R@20"] == 1.0 and r["i2t_R@1"] < 0.5


def test_generated_counterfactual_moves_toward_target_and_scale_zero_reconstructs(clip_setup):
    """With an analytic eps-model and a tiny CLIP as p_phi, guidance raises p(y_cf | x_cf)."""
    tok, clip, params = clip_setup
    sch = make_schedule("linear")

    def eps_fn(x_t, t, cond):  # exact eps of N(0, 0.5^2) data
        a = sch.alphas_cumprod[t][:, None, None, None]
        return jnp.sqrt(1 - a) * x_t / (a * 0.25 + 1 - a)

    text = clip.encode_text(params, jnp.asarray(tok([f"a photo of a {c}." for c in CLASSES], max_length=12)))
    to_clip = functools.partial(to_clip_input, image_size=16)
    log_prob = clip_zero_shot_log_prob(clip, params, text, to_clip, logit_scale=10.0)
    x = 0.5 * jax.random.normal(jax.random.key(5), (6, 16, 16, 3))
    y_cf = jnp.array([0, 1, 2, 3, 0, 1])
    gen = jax.jit(lambda x, y, s: generate_counterfactuals(eps_fn, log_prob, x, y, s, sch, 10, 0.6))
    plain = gen(x, y_cf, 0.0)
    np.testing.assert_allclose(plain, ddim_sample(eps_fn, ddim_invert(eps_fn, x, None, sch, 10, 0.6), None, sch, 10,
                                                  0.6), atol=1e-5)
    cf = gen(x, y_cf, 3.0)
    before = np.exp(np.asarray(log_prob(x, None, y_cf)))
    after = np.exp(np.asarray(log_prob(cf, None, y_cf)))
    assert np.all(after > before) and after.mean() > before.mean() + 0.1, (before, after)
    assert float(jnp.mean(jnp.abs(cf - x))) < 0.5  # a nudge, not a new image


def test_counterfactuals_are_reused_across_workdirs_through_the_user_cache(tmp_path, monkeypatch):
    """A second run in a fresh workdir loads the counterfactuals the first one computed (same key);
    other settings or JAXCF_CACHE=off compute them again."""
    import os

    from jaxcf.dicap import runs
    from tests.test_main import load_config

    calls = []

    def fake_generator(found, x, y_cf, text_feats, cfg, mesh, desc, param_sharding="replicated", class_names=None):
        calls.append(cfg.scale)
        return np.tanh(x + cfg.scale)

    monkeypatch.setattr(runs, "counterfactuals", fake_generator)
    monkeypatch.setenv("JAXCF_CACHE", str(tmp_path / "cache"))
    config = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "dicap.py"), "test")
    x = np.random.default_rng(0).uniform(-1, 1, (6, 4, 4, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    feats = jax.random.normal(jax.random.key(0), (3, 8))
    get = lambda wd: runs.cached_counterfactuals(None, x, y, feats, config, 0, str(tmp_path / wd), None, "d")  # noqa: E731
    x_cf, y_cf = get("w1")
    assert len(calls) == 1 and np.all(y_cf != y)
    x2, y2 = get("w2")  # a fresh workdir: from the user cache, and written into w2
    assert len(calls) == 1
    np.testing.assert_array_equal(x2, x_cf)
    np.testing.assert_array_equal(y2, y_cf)
    assert len(os.listdir(tmp_path / "w2" / "counterfactuals")) == 1
    config.counterfactual.scale = 3.0  # other settings: another key
    get("w3")
    assert len(calls) == 2 and calls[-1] == 3.0
    monkeypatch.setenv("JAXCF_CACHE", "off")
    config.counterfactual.scale = 20.0
    get("w4")
    assert len(calls) == 3


def test_counterfactual_augmentation_term_matches_float64():
    """cf_ce adds cf_ce * CE(logit_scale * cos(f(x_cf), t), y_cf), masked rows dropped; lam = 0 keeps L_cf out."""
    rng = np.random.default_rng(3)
    f, f_cf, t = rng.normal(size=(5, 8)), rng.normal(size=(5, 8)), rng.normal(size=(4, 8))
    y, y_cf = np.array([0, 1, 2, 3, 0]), np.array([1, 2, 3, 0, 2])
    valid = np.array([1, 1, 0, 1, 1], bool)

    def ce64(feats, labels, rows):
        n = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
        lg = 100.0 * n(feats) @ n(t).T
        per = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1) - lg[np.arange(len(labels)), labels]
        return per[rows].mean()

    args = (jnp.asarray(f), jnp.asarray(f_cf), jnp.asarray(t), jnp.asarray(y), 100.0)
    loss, m = dicap_loss(*args, lam=0.0, valid=jnp.asarray(valid), cf_labels=jnp.asarray(y_cf), cf_ce=0.5)
    np.testing.assert_allclose(m["cf_ce"], ce64(f_cf, y_cf, valid), rtol=1e-5)
    np.testing.assert_allclose(loss, ce64(f, y, np.ones(5, bool)) + 0.5 * ce64(f_cf, y_cf, valid), rtol=1e-5)
    assert "l_cf" not in m
    both, m2 = dicap_loss(*args, lam=1.0, tau=0.1, cf_labels=jnp.asarray(y_cf), cf_ce=0.5)
    l_cf = counterfactual_contrastive_loss(jnp.asarray(f), jnp.asarray(f_cf), jnp.asarray(t), jnp.asarray(y), 0.1)
    np.testing.assert_allclose(both, m2["ce"] + l_cf + 0.5 * m2["cf_ce"], rtol=1e-5)
