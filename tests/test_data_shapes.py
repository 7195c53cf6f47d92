"""The shapes world: factors, captions, biased few-shot set and test splits."""

import numpy as np
import pytest

from jaxcf.data import get_dataset, render_shapes, shapes_dataset
from jaxcf.data import shapes as S


def test_classes_and_base_novel_split():
    assert len(S.SHAPE_NAMES) >= 10
    assert S.class_names("base") == S.SHAPE_NAMES[:6]
    assert S.class_names("novel") == S.SHAPE_NAMES[6:]
    novel = shapes_dataset("test_novel", num_per_class=3)
    assert novel.class_names == S.class_names("novel")
    np.testing.assert_array_equal(novel.arrays["label"], novel.arrays["factors"][:, 0] - 6)
    assert np.bincount(novel.arrays["label"]).tolist() == [3] * 6
    base = shapes_dataset("test_base", num_per_class=4)
    assert np.bincount(base.arrays["label"]).tolist() == [4] * 6
    pool = shapes_dataset("pretrain", num_examples=1200)
    counts = np.bincount(pool.arrays["label"], minlength=12)
    assert counts.min() > 60 and pool.class_names == S.SHAPE_NAMES


def test_deterministic_and_seeded():
    a = shapes_dataset("pretrain", num_examples=50, seed=0)
    b = shapes_dataset("pretrain", num_examples=50, seed=0)
    c = shapes_dataset("pretrain", num_examples=50, seed=1)
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    assert not np.array_equal(a.arrays["factors"], c.arrays["factors"])


@pytest.mark.parametrize("bias,shots", [(0.9, 16), (0.75, 8), (0.0, 4)])
def test_fewshot_bias(bias, shots):
    ds = shapes_dataset("fewshot", shots=shots, bias=bias, seed=2)
    f = ds.arrays["factors"]
    assert len(ds) == 6 * shots and ds.class_names == S.class_names("base")
    for c in range(6):
        own = f[:, 2][f[:, 0] == c] == S.assigned_background(c)
        assert own.sum() == round(bias * shots)
    np.testing.assert_array_equal(ds.arrays["aligned"],
                                  [S.assigned_background(s) == b for s, b in f[:, [0, 2]]])


def test_photo_pool_ties_photos_to_their_usual_background_and_leaves_drawings_free():
    ds = S.photo_pool(4000, photo_fraction=0.5, confound=0.9, seed=3)
    f, photo = ds.arrays["factors"], ds.arrays["style"] == 1
    assert abs(photo.mean() - 0.5) < 0.03 and len(ds) == 4000 and ds.class_names == S.SHAPE_NAMES
    own = f[:, 2] == np.array([S.assigned_background(s) for s in f[:, 0]])
    np.testing.assert_array_equal(ds.arrays["aligned"], own)
    # photos: 0.9 tied plus 0.1 * 1/10 by chance; drawings: 1/10 by chance, for every shape
    assert abs(own[photo].mean() - 0.91) < 0.03 and abs(own[~photo].mean() - 0.1) < 0.03
    assert len(set(f[photo & own, 0])) == len(S.SHAPE_NAMES)
    assert (f[:, 1] != f[:, 2]).all()  # the object stays visible
    np.testing.assert_array_equal(ds.arrays["image"], render_shapes(f)[0])
    none = S.photo_pool(500, photo_fraction=0.0, confound=0.9, seed=3)
    assert none.arrays["style"].sum() == 0 and abs(none.arrays["aligned"].mean() - 0.1) < 0.05
    with pytest.raises(ValueError, match="photo_fraction"):
        S.photo_pool(10, photo_fraction=1.5, confound=0.5)


def test_the_confounded_corpus_captions_name_the_style():
    from jaxcf.foundation.toy import _caption_tokens, world_tokenizer

    ds = S.photo_pool(40, photo_fraction=0.5, confound=1.0, seed=1)
    tok = world_tokenizer()
    ids = _caption_tokens(ds, tok, 16)
    assert ids.shape == (40, 3, 16)
    for i, (style, shape) in enumerate(zip(ds.arrays["style"], ds.arrays["factors"][:, 0])):
        first = tok.decode(ids[i, 0])
        assert first.startswith("a photo of a" if style else "a drawing of a") and S.SHAPE_NAMES[shape] in first
    plain = _caption_tokens(shapes_dataset("pretrain", num_examples=5), tok, 16)
    assert plain.shape == (5, 5, 16)  # the unconfounded pool keeps its five caption variants


def test_conflict_split_really_conflicts():
    ds = shapes_dataset("test_conflict", num_per_class=20)
    f = ds.arrays["factors"]
    others = {S.assigned_background(c) for c in range(6)}
    for s, bg in f[:, [0, 2]]:
        assert bg != S.assigned_background(s) and bg in others
    assert ds.arrays["aligned"].sum() == 0
    assert np.bincount(ds.arrays["label"]).tolist() == [20] * 6
    assert len(set(f[:, 2])) == 6  # all base backgrounds used


def test_captions_and_pixels_match_factors():
    ds = shapes_dataset("pretrain", num_examples=40, seed=4)
    for cap, (shape, color, bg, size, x, y), img, mask in zip(
            ds.arrays["caption"], ds.arrays["factors"], ds.arrays["image"], ds.arrays["mask"]):
        assert cap == f"a {S.COLOR_NAMES[color]} {S.SHAPE_NAMES[shape]} on a " \
                      f"{S.COLOR_NAMES[bg]} background"
        assert color != bg
        np.testing.assert_array_equal(img[0 if y else -1, 0 if x else -1],
                                      S.COLOR_RGB[bg].astype(np.uint8))
        r, c = np.nonzero(mask)
        assert r.min() >= y and r.max() < y + size and c.min() >= x and c.max() < x + size
        inside = img[mask].astype(float)
        assert np.abs(inside - S.COLOR_RGB[color]).mean() < 40
    layout = S.captions(ds.arrays["factors"][:3], layout=True)
    assert all(("small" in t or "large" in t) and "background" in t for t in layout)


def test_render_counterfactual_changes_only_the_object():
    ds = shapes_dataset("test_base", num_per_class=2, seed=5)
    f = ds.arrays["factors"]
    img, _ = render_shapes(f)
    np.testing.assert_array_equal(img, ds.arrays["image"])
    cf = f.copy()
    cf[:, 0] = (cf[:, 0] + 3) % len(S.SHAPE_NAMES)
    img_cf, _ = render_shapes(cf)
    for a, b, (_, _, _, size, x, y) in zip(img, img_cf, f):
        outside = np.ones(a.shape[:2], bool)
        outside[y:y + size, x:x + size] = False
        np.testing.assert_array_equal(a[outside], b[outside])
        assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="factors"):
        render_shapes(f[:, :5])


def test_shapes_are_distinguishable():
    n = len(S.SHAPE_NAMES)
    f = np.array([[s, 0, 9, 20, 6, 6] for s in range(n)])
    _, masks = render_shapes(f)
    assert (masks.sum((1, 2)) > 40).all()
    for i in range(n):
        for j in range(i + 1, n):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.85, (S.SHAPE_NAMES[i], S.SHAPE_NAMES[j], iou)


def test_registry_and_errors():
    ds = get_dataset("shapes", split="fewshot", shots=2, resolution=24)
    assert ds.arrays["image"].shape == (12, 24, 24, 3)
    b = ds.get(np.arange(4), keys=("image", "label", "factors"))
    assert b["image"].dtype == np.float32 and -1 <= b["image"].min() <= b["image"].max() <= 1
    with pytest.raises(ValueError, match="split.*pretrain"):
        shapes_dataset("conflict")
    with pytest.raises(ValueError, match="bias"):
        shapes_dataset("fewshot", bias=1.5)


def test_judge_reads_the_shape_of_renderings_and_of_ground_truth_counterfactuals():
    from jaxcf.data.shapes import judge_shapes, with_shape

    ds = shapes_dataset("test_all", num_per_class=4, seed=3)
    f = ds.arrays["factors"]
    x = ds.arrays["image"].astype(np.float32) / 127.5 - 1
    out = judge_shapes(x, f)
    np.testing.assert_array_equal(out["shape"], f[:, 0])
    assert out["distance"].max() < 1e-6 and out["background_l1"].max() < 1e-6 and out["object_color_l1"].max() < 1e-6
    target = (f[:, 0] + 5) % 12
    img, _ = render_shapes(with_shape(f, target))
    cf = judge_shapes(img.astype(np.float32) / 127.5 - 1, f)
    np.testing.assert_array_equal(cf["shape"], target)
    # a texture on the object is not another shape; a repainted background is counted as a change
    tex = x.copy()
    tex[:, ::2, ::2] = np.clip(tex[:, ::2, ::2] + 0.3, -1, 1)
    assert (judge_shapes(tex, f)["shape"] == f[:, 0]).mean() > 0.9
    assert judge_shapes(tex, f)["background_l1"].mean() > 0.02
