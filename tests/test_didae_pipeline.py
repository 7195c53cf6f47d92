"""DiDAE + CFKD end to end: bad input, the checks of a finished `test` variant on Square (run by
tests/test_kill_resume.py), the shipped square_tiny foundation, and CelebA through a tiny CLIP
folder and a fake tfds celeb_a."""

import json
import os
import pathlib
import re
import types

import numpy as np
import pytest

from jaxcf.configs import ConfigError
from jaxcf.pipelines import run
from tests.test_main import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIDAE = os.path.join(ROOT, "configs", "didae.py")


@pytest.mark.parametrize("override, message", [
    (lambda c: c.dictionary.update(num_atoms=4) or c.encoder.update(embed_dim=3),
     "config.dictionary.num_atoms=4 is larger than the embedding size D=3"),
    (lambda c: c.dictionary.update(kinds=("pca",)), "config.dictionary.kinds=('pca',) must be a non-empty subset"),
    (lambda c: c.cfkd.update(teachers=()), "config.cfkd.teachers=() must be a non-empty subset"),
    (lambda c: c.cfkd.update(true_factor="Colour"), "config.cfkd.true_factor='Colour' is not a factor; allowed: "
                                                   "ColorA, ColorB, PositionX, PositionY"),
    (lambda c: c.dictionary.update(num_atoms=3), "config.dictionary.num_atoms=3 must equal the number of factors 4"),
    (lambda c: c.student.update(kind="vit"), "config.student.kind='vit' is not allowed; allowed: 'resnet18', 'probe'"),
    (lambda c: c.data.update(agree_fraction=1.5), "config.data.agree_fraction=1.5 must be in [0.0, 1.0]"),
    (lambda c: c.edit.update(lam=0.0), "config.edit.lam=0.0 must be in (0.0, 10.0]"),
    (lambda c: c.encoder.update(kind="clip", checkpoint="/no/such/clip") or c.data.update(name="celeba"),
     "config.encoder.checkpoint='/no/such/clip': no such checkpoint folder"),
    (lambda c: c.decoder.update(norm_groups=3), "config.decoder: DiffAEConfig: field 'norm_groups' = 3 must divide"),
])
def test_bad_config_fails_before_any_work(tmp_path, override, message):
    c = load_config(DIDAE, "test")
    override(c)
    with pytest.raises(ConfigError, match=re.escape(message)):
        run(c, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "student").exists()


def check_every_stage(res, work):
    """What a finished run of the `test` variant left: every stage's results and files. Called by
    tests/test_kill_resume.py on its uninterrupted reference run of the variant (every valid
    counterfactual sent to CFKD there), so the variant runs once for both checks."""
    work = pathlib.Path(work)
    assert res["pipeline"] == "didae" and res["student"] == "resnet18"
    for kind in ("procrustes", "svd"):
        d = res["dictionaries"][kind]
        m = np.asarray(d["disentanglement_matrix"])
        assert m.shape == (4, 4) and np.all(m >= 0)
        assert 0 <= d["flip_rate"] <= 1 and 0 <= d["nafr"] <= d["flip_rate"]
        assert d["cf_per_second"] > 0
        saved = json.loads((work / f"disentanglement_{kind}.json").read_text())
        assert saved["factors"] == ["ColorA", "ColorB", "PositionX", "PositionY"]
        np.testing.assert_allclose(saved["mean_abs_change"], m)
        for png in (f"disentanglement_{kind}.png", f"atoms_{kind}.png", f"counterfactuals_{kind}.png"):
            assert (work / png).stat().st_size > 100
    assert {(r["dictionary"], r["teacher"]) for r in res["cfkd"]} == {
        (d, t) for d in ("procrustes", "svd") for t in ("preclustered", "model")} | {("ground truth", "preclustered")}
    assert set(res["controls"]) >= {"identity", "fresh_noise", "swap"}
    assert (work / "controls.png").stat().st_size > 100 and (work / "counterfactuals_procrustes.npz").exists()
    for r in res["cfkd"]:
        assert r["counterfactuals"] == r["true"] + r["false"]
        if "aga" in r:
            assert 0 <= r["worst_group"] <= r["aga"] <= 1
    assert set(res["baselines"]) == {"probe_procrustes", "projection_procrustes", "probe_svd", "projection_svd"}
    assert 0 <= res["before"]["worst_group"] <= res["before"]["aga"] <= 1
    table = (work / "results.md").read_text()
    assert "poisoned student" in table and "CFKD procrustes + preclustered teacher" in table
    # every trained model left a checkpoint (a rerun resumes instead of retraining)
    for name in ("student", "surrogate", "oracle", "foundation/decoder_run", "foundation/encoder_run"):
        assert any(s.isdigit() for s in os.listdir(work / name / "checkpoints")), name
    assert (work / "foundation" / "decoder.msgpack").exists()


def test_shipped_square_tiny_foundation_matches_its_config():
    """The embedded default loads the shipped weights (made by this config) instead of training."""
    from jaxcf.didae import foundation as didae
    from jaxcf.foundation import assets_dir

    c = load_config(DIDAE, "square_tiny")
    assert c.foundation.assets == "square_tiny"
    folder = assets_dir(c.foundation.assets)
    for name, made_by in (("encoder", "encoder"), ("decoder", "decoder"), ("decoder_code", "decoder")):
        assert os.path.isfile(os.path.join(folder, name + ".msgpack")), name
        meta = json.loads(open(os.path.join(folder, name + ".json")).read())
        want = didae.foundation_meta(c, made_by, c.encoder.embed_dim)
        assert meta == json.loads(json.dumps(want, sort_keys=True)), name


@pytest.mark.slow
def test_celeba_with_a_clip_folder_and_fake_tfds(tmp_path):
    """The `celeba` variant's code path: tfds celeb_a (Blond_Hair vs Male), CLIP's image tower as Phi."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tensorflow_datasets")
    from jaxcf.data.tfds_data import write_fake_tfds

    write_fake_tfds("celeb_a", str(tmp_path / "tfds"), num_examples={"train": 160, "validation": 24, "test": 80})
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=8)
    transformers.CLIPModel(cfg).save_pretrained(tmp_path / "clip")

    c = load_config(DIDAE, "celeba")
    t = load_config(DIDAE, "test")
    c.data.update(data_dir=str(tmp_path / "tfds"), resolution=16, num_samples=40, agree_fraction=0.2,
                  num_test_per_group=4, unbiased_samples=48)
    c.encoder.checkpoint = str(tmp_path / "clip")
    c.decoder = t.decoder
    for name in ("student", "surrogate", "oracle", "cfkd", "eval"):
        c[name] = t[name]
    # the probe student (a linear head on Phi = CLIP) and one dictionary / teacher keep this short;
    # the ResNet student and both dictionaries and teachers run in the Square test above
    c.student.kind = "probe"
    c.dictionary.update(fit_examples=24, kinds=("procrustes",))
    c.cfkd.teachers = ("preclustered",)
    c.cfkd.true_factor = "Blond_Hair"
    c.update(ddim_steps=3, checkpoint_every=2, log_every=1)
    res = run(c, str(tmp_path / "w"))
    assert res["embedding_dim"] == 8 and res["student"] == "probe"  # CLIP's projection_dim
    assert np.asarray(res["dictionaries"]["procrustes"]["disentanglement_matrix"]).shape == (4, 4)
    saved = json.loads((tmp_path / "w" / "disentanglement_procrustes.json").read_text())
    assert saved["factors"] == ["Blond_Hair", "Male", "Smiling", "Eyeglasses"]
    assert 0 <= res["before"]["aga"] <= 1


@pytest.mark.slow
def test_square_tiny_foundation_config_trains(tmp_path):
    """The config that made the shipped weights still trains (a few steps of each, exported like them)."""
    from jaxcf.data.confounded import square_data
    from jaxcf.didae import foundation as didae
    from jaxcf.train import make_mesh, read_metrics

    c = load_config(DIDAE, "square_tiny")
    c.foundation.assets = ""
    c.data.update(unbiased_samples=32, num_samples=100, num_test_per_group=2)
    c.dictionary.fit_examples = 8
    c.encoder.update(steps=2, batch_size=16)
    c.decoder.train.update(steps=2, batch_size=16, warmup_steps=1)
    c.update(log_every=1, checkpoint_every=2)
    data = square_data(c.data, c.dictionary.fit_examples)
    ae, enc_params, dec_params = didae.build_autoencoder(c, data, str(tmp_path), make_mesh([("data", -1)]))
    for name in ("encoder", "decoder"):
        meta = json.loads((tmp_path / "foundation" / f"{name}.json").read_text())
        assert meta == json.loads(json.dumps(didae.foundation_meta(c, name), sort_keys=True))
        rows = read_metrics(str(tmp_path / "foundation" / f"{name}_run" / "metrics.jsonl"))
        assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    x = data.pool.get(np.arange(2))["image"]
    z = ae.encode(enc_params, x)
    assert z.shape == (2, c.encoder.embed_dim)
    assert ae.decoder.config.resolution == 32 and ae.num_steps == 20


RECON_COLOR_BOUND = 10.0  # mean |colour error| (0..255) of the shipped decoder's reconstructions, read from pixels


@pytest.mark.slow
def test_shipped_decoder_reconstructs_and_its_colorb_atom_repaints_the_background(tmp_path):
    """On the shipped square_tiny weights, read by the pixel reader (no learned judge): inverting and
    decoding an image keeps its factors, and reflecting the Procrustes ColorB atom changes the
    background grey more than the inner square's red (the atom edits the confounder, not the cause)."""
    from jaxcf.didae import controls
    from jaxcf.didae.dictionary import procrustes_dictionary, reflect
    from jaxcf.data.confounded import images_of, square_data
    from jaxcf.didae.foundation import build_autoencoder
    from jaxcf.train import make_mesh

    c = load_config(DIDAE, "square_tiny")
    c.eval.update(num_inputs=8, batch_size=8)
    mesh = make_mesh([("data", -1)])
    data = square_data(c.data, c.dictionary.fit_examples)
    ae, enc_params, dec_params = build_autoencoder(c, data, str(tmp_path), mesh)
    assert not (tmp_path / "foundation" / "decoder_run").exists()  # loaded, not trained
    x = images_of(data.test)[:8]
    z = np.asarray(ae.encode(enc_params, x))
    x_T = ae.invert(dec_params, x, z)
    before = controls.read(x)
    recon = controls.read(np.asarray(ae.decode(dec_params, x_T, z)))
    err = np.abs(recon - before).mean(0)
    assert err[0] < RECON_COLOR_BOUND and err[1] < RECON_COLOR_BOUND and err[2:].max() <= 2.0, err

    z_fit = np.asarray(ae.encode(enc_params, images_of(data.fit)))
    omega, mu = procrustes_dictionary(z_fit, data.fit.arrays["halves"].astype(np.float32) - 0.5)
    z_b = reflect(z, omega, mu, 1)  # atom 1 was fitted to ColorB
    moved = controls.read(np.asarray(ae.decode(dec_params, x_T, z_b)))
    change = np.abs(moved - before).mean(0)
    assert change[1] > 3 * change[0] and change[1] > 40, change


def _codes_world(n=1000, seed=0, agree=0.5):
    """Codes z = [cause, confounder, noise, noise]: the label is the sign of the cause; the
    confounder agrees with the label in a fraction ``agree`` of the examples."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    agree = rng.random(n) < agree
    conf = np.where(agree, y, 1 - y)
    z = np.stack([(2 * y - 1) * rng.uniform(0.5, 1.5, n), (2 * conf - 1) * rng.uniform(0.5, 1.5, n),
                  rng.normal(0, 0.3, n), rng.normal(0, 0.3, n)], 1).astype(np.float32)
    return z, y.astype(np.int32), (2 * y + conf).astype(np.int32)


def test_explain_stage_flips_a_shortcut_student_with_the_confounder_atom(tmp_path):
    """The pipeline's explain stage on an identity "autoencoder" (images are codes): Algorithm 2
    must flip a student that reads only the confounder, through the confounder atom, skip the
    atom orthogonal to the student, and the reflections must each change their own factor."""
    import ml_collections

    from jaxcf.didae.dictionary import procrustes_dictionary
    from jaxcf.didae import stages as didae

    z, y, _ = _codes_world()
    halves = np.stack([z[:, 0] > 0, z[:, 1] > 0], 1).astype(np.float32) - 0.5
    omega, mu = (np.asarray(a) for a in procrustes_dictionary(z, halves))  # atom 0: cause, atom 1: confounder

    def student_probs(params, x, frozen):  # the poisoned student: the confounder's sign
        p1 = 1 / (1 + np.exp(-8 * np.asarray(x)[:, 1]))
        return np.stack([1 - p1, p1], 1)

    def oracle(params, x):  # label logits, then the two factors in [0, 1]
        x = np.asarray(x)
        return np.concatenate([np.stack([-x[:, 0], x[:, 0]], 1), 0.5 + 0.25 * x[:, :2]], 1)

    config = ml_collections.ConfigDict(dict(
        data=dict(name="codes"), cfkd=dict(true_factor="cause"), eval=dict(grid_examples=2),
        edit=dict(lam=2.0, guard=1e-6, min_alignment=0.1, coef_quantile=0.0, residual=False)))
    data = types.SimpleNamespace(factor_names=("cause", "confounder"))
    stage = didae.Stage(config, str(tmp_path), None, data, None, None, None, None,
                        generate=lambda x, edit, residual=False: np.asarray(edit(x)), writer=False)
    clf = didae.Classifiers(None, None, None, None, None, student_probs, oracle, None)
    pred = np.argmax(student_probs(None, z, None), -1)
    idx = np.flatnonzero(pred == y)[:32]
    inputs = didae.Inputs(x=z[idx], y=y[idx], target=1 - pred[idx], factors=None, z=z[idx])
    out, x_cf, flipped, valid, atom_true = didae.explain(stage, clf, "procrustes", omega, mu, z[:16], inputs, z,
                                                         pred, z)
    assert list(valid) == [False, True]  # the cause atom cannot move a confounder-only student
    assert out["atoms_skipped"] == 1 and out["flip_rate"] == 1.0 and flipped[1].all() and not flipped[0].any()
    np.testing.assert_allclose(x_cf[0], inputs.x, atol=1e-5)  # the skipped atom leaves its inputs alone
    m = np.asarray(out["disentanglement_matrix"])  # reflections: each atom moves its own factor most
    assert m[0, 0] > 5 * m[0, 1] and m[1, 1] > 5 * m[1, 0]
    assert list(atom_true) == [True, False] and out["probe_agreement"] > 0.95


def test_projection_baseline_removes_the_shortcut():
    """Projecting out the confounder atom turns a shortcut probe into one that reads the cause: on a
    test set where the confounder is independent of the label, the worst group rises from the
    shortcut's failures to the cause's own accuracy."""
    from jaxcf.didae import cfkd

    def world(n, agree, seed):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 2, n)
        conf = np.where(rng.random(n) < agree, y, 1 - y)
        z = np.stack([0.5 * (2 * y - 1) + rng.normal(0, 0.5, n), 2 * conf - 1 + rng.normal(0, 0.1, n),
                      rng.normal(0, 0.5, n)], 1).astype(np.float32)  # a noisy cause, a clean confounder
        return z, y.astype(np.int32), (2 * y + conf).astype(np.int32)

    z, y, _ = world(2000, 0.98, 0)
    z_test, y_test, g_test = world(2000, 0.5, 1)
    omega, mu = np.eye(3, dtype=np.float32)[:, :2], np.zeros(3, np.float32)
    out = cfkd.projection_baseline(z, y, z_test, y_test, g_test, omega, mu, np.array([True, False]))
    assert out["probe"]["worst_group"] < 0.4 and out["projection"]["worst_group"] > 0.7, out
