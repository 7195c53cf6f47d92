"""Retrieval recall@K both ways (brute force in float64, with ties), the retrieval contrastive loss
with counterfactual hard negatives and VQA answer scoring, against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcf.dicap import retrieval as R
from jaxcf.dicap.losses import counterfactual_contrastive_loss
from jaxcf.dicap.metrics import recall_at_k


def _brute_recall(sim, relevant, k, ties):
    """Sort each query's candidates (ties: irrelevant first if pessimistic, relevant first if
    optimistic) and look for a relevant one in the first k; queries with none are skipped."""
    hits = []
    for s, r in zip(sim, relevant):
        if not r.any():
            continue
        tie_key = r if ties == "pessimistic" else ~r  # False sorts first
        order = sorted(range(len(s)), key=lambda j: (-s[j], bool(tie_key[j])))
        hits.append(any(r[j] for j in order[:k]))
    return float(np.mean(hits))


def _both_ways(sim, relevant, ks, ties):
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = _brute_recall(sim, relevant, k, ties)
        out[f"t2i_R@{k}"] = _brute_recall(sim.T, relevant.T, k, ties)
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", R.TIES)
def test_ranks_match_brute_force_with_ties(seed, ties):
    rng = np.random.default_rng(seed)
    ni, nt = 9, 23
    sim = rng.integers(-4, 5, size=(ni, nt)) / 4.0  # exact in float32, many ties
    caption_image = rng.integers(0, ni - 1, size=nt)  # image ni-1 has no caption
    relevant = np.arange(ni)[:, None] == caption_image[None]
    relevant[rng.random((ni, nt)) < 0.05] = True  # a few extra correct pairs
    relevant[ni - 1] = False
    ks = (1, 2, 5, 10, 30)
    i2t, t2i = jax.jit(R.retrieval_ranks, static_argnames="ties")(sim, relevant, ties=ties)
    got = {}
    for name, ranks, valid in (("i2t", i2t, relevant.any(1)), ("t2i", t2i, relevant.any(0))):
        got |= {f"{name}_{k}": float(v) for k, v in R.recall_from_ranks(ranks, ks, valid).items()}
    assert got == pytest.approx(_both_ways(sim.astype(np.float64), relevant, ks, ties), abs=1e-7)
    assert int(i2t[ni - 1]) == nt


@pytest.mark.parametrize("ties", R.TIES)
def test_recall_from_features_with_duplicates(ties):
    rng = np.random.default_rng(0)  # a draw whose distinct cosines differ by > 1e-4
    images = rng.integers(-3, 4, size=(12, 6)).astype(np.float32)
    images[5] = images[2]  # identical images: exact ties for their captions
    caption_image = np.repeat(np.arange(12), 3)  # three captions per image
    texts = images[caption_image] + rng.normal(0, 1.5, size=(36, 6)).astype(np.float32)
    texts[10] = texts[4]  # an identical caption of another image
    relevant = np.arange(12)[:, None] == caption_image[None]
    got = R.retrieval_recall(images, texts, relevant, ks=(1, 3, 5), ties=ties)
    f = images.astype(np.float64) / np.linalg.norm(images.astype(np.float64), axis=1, keepdims=True)
    t = texts.astype(np.float64) / np.linalg.norm(texts.astype(np.float64), axis=1, keepdims=True)
    sim = f @ t.T
    # Exact duplicates tie exactly; every other gap within a row or column is far above float32
    # rounding, so the float32 ranks must equal the float64 ones.
    for m in (sim, sim.T):
        gaps = np.abs(m[:, :, None] - m[:, None, :])
        assert ((gaps == 0) | (gaps > 1e-4)).all()
    assert (sim[2] == sim[5]).all() and (sim[:, 4] == sim[:, 10]).all()
    expected = _both_ways(sim, relevant, (1, 3, 5), ties)
    assert {k: float(v) for k, v in got.items()} == pytest.approx(expected, abs=1e-7)


def test_optimistic_paired_matches_existing_recall_at_k():
    rng = np.random.default_rng(3)
    f, t = rng.normal(size=(20, 8)), rng.normal(size=(20, 8))
    t[3] = t[7]
    got = R.retrieval_recall(f, t, np.eye(20, dtype=bool), ks=(1, 5, 10), ties="optimistic")
    assert {k: float(v) for k, v in got.items()} == pytest.approx(recall_at_k(f, t), abs=1e-6)
    assert "allowed" in str(pytest.raises(ValueError, R.retrieval_ranks, np.zeros((2, 2)),
                                          np.eye(2, dtype=bool), "random").value)


def test_constant_scores_retrieve_nothing_pessimistically():
    sim, rel = np.zeros((4, 4)), np.eye(4, dtype=bool)
    i2t, _ = R.retrieval_ranks(sim, rel, "pessimistic")
    assert i2t.tolist() == [3] * 4
    assert R.retrieval_ranks(sim, rel, "optimistic")[0].tolist() == [0] * 4


def _np_unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_logsumexp(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def test_retrieval_contrastive_loss_matches_numpy():
    rng = np.random.default_rng(0)
    b, p, scale, lam, tau = 6, 5, 10.0, 0.7, 0.5
    img, txt, cf = (rng.normal(size=(b, p)).astype(np.float32) for _ in range(3))
    txt[4] = txt[1]  # a repeated caption: a positive of both images
    match = np.eye(b, dtype=bool)
    match[1, 4] = match[4, 1] = True
    valid = np.array([1, 1, 0, 1, 1, 1], bool)
    loss, metrics = R.retrieval_contrastive_loss(img, txt, scale, cf, match, lam, tau, valid)
    cos = _np_unit(img) @ _np_unit(txt).T
    logits = scale * cos

    def nce(lg, m):
        return np.mean(_np_logsumexp(lg, 1) - _np_logsumexp(np.where(m, lg, -np.inf), 1))

    s_x = np.diag(cos)
    s_cf = np.sum(_np_unit(cf) * _np_unit(txt), 1)
    l_cf = -np.log(np.exp(s_x / tau) / (np.exp(s_x / tau) + np.exp(s_cf / tau)))
    l_cf = np.sum(l_cf * valid) / valid.sum()
    expected = 0.5 * (nce(logits, match) + nce(logits.T, match.T)) + lam * l_cf
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["l_cf"]), l_cf, rtol=1e-5)
    ref = counterfactual_contrastive_loss(img, cf, txt, jnp.arange(b), tau, valid=valid)
    np.testing.assert_allclose(float(metrics["l_cf"]), float(ref), rtol=1e-6)
    plain, m2 = R.retrieval_contrastive_loss(img, txt, scale, None, match)
    assert "l_cf" not in m2
    np.testing.assert_allclose(float(plain), expected - lam * l_cf, rtol=1e-5)
    # A counterfactual that matches its caption better than the image raises the loss.
    worse, _ = R.retrieval_contrastive_loss(img, txt, scale, txt, match, lam, tau)
    better, _ = R.retrieval_contrastive_loss(img, txt, scale, -txt, match, lam, tau)
    assert float(worse) > float(better)
    grads = jax.grad(lambda t: R.retrieval_contrastive_loss(img, t, scale, cf, match)[0])(txt)
    assert np.isfinite(np.asarray(grads)).all()


def test_vqa_prompts_scores_and_loss():
    assert R.answer_prompt(" what shape is it? ", "star") == "question: what shape is it? answer: star."
    assert R.answer_prompts(["q1", "q2"], ["a", "b"], "{question}|{answer}") == [
        ["q1|a", "q1|b"], ["q2|a", "q2|b"]]
    rng = np.random.default_rng(1)
    b, a, p, scale, lam, tau = 4, 5, 6, 20.0, 0.5, 1.0
    img, cf = rng.normal(size=(b, p)), rng.normal(size=(b, p))
    prompts = rng.normal(size=(b, a, p))  # per-question prompts
    answers, cf_answers = np.array([0, 2, 4, 1]), np.array([1, 3, 3, 0])
    mask = np.ones((b, a), bool)
    mask[:, 4] = [False, False, True, False]
    cos = np.einsum("bp,bap->ba", _np_unit(img), _np_unit(prompts))
    cos_cf = np.einsum("bp,bap->ba", _np_unit(cf), _np_unit(prompts))
    scores = R.vqa_scores(img, prompts, mask)
    np.testing.assert_allclose(np.asarray(scores)[mask], cos[mask], rtol=1e-5)
    assert np.isneginf(np.asarray(scores)[~mask]).all()
    assert R.vqa_predict(img, prompts, mask).tolist() == np.argmax(np.where(mask, cos, -9), 1).tolist()
    loss, metrics = R.vqa_answer_loss(img, prompts, answers, scale, cf, cf_answers, mask, lam, tau)
    logits = np.where(mask, scale * cos, -1e9)
    ce = np.mean(_np_logsumexp(logits, 1) - logits[np.arange(b), answers])

    def term(s_pos, s_neg):
        return np.mean(np.log1p(np.exp((s_neg - s_pos) / tau)))

    idx = np.arange(b)
    l_cf = 0.5 * (term(cos[idx, answers], cos_cf[idx, answers])
                  + term(cos_cf[idx, cf_answers], cos[idx, cf_answers]))
    np.testing.assert_allclose(float(metrics["ce"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(loss), ce + lam * l_cf, rtol=1e-5)
    one_way, m1 = R.vqa_answer_loss(img, prompts, answers, scale, cf, None, mask, lam, tau)
    np.testing.assert_allclose(float(m1["l_cf"]), term(cos[idx, answers], cos_cf[idx, answers]),
                               rtol=1e-5)
    shared = rng.normal(size=(a, p))  # one prompt set for every question
    s2 = R.vqa_scores(img, shared)
    np.testing.assert_allclose(np.asarray(s2), _np_unit(img) @ _np_unit(shared).T, rtol=1e-5)
