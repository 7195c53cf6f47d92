"""Where L_cf pushes each class prompt, measured in the frozen CLIP's image-feature space.

DiCap's counterfactual term moves the true-class text feature t_y along f(x) - f(x_cf) (unit
features; x_cf keeps x's background and changes its shape). This script asks whether those
directions would repair the shapes world's background shortcut if each class prompt could follow
its own: for every base class y it renders pairs like the shots (shape y, the class's assigned
background with probability --bias, the task's object sizes) and their ground-truth counterfactuals
(the same factors with shape y_cf, the text-nearest other base class as in configs/dicap.py:toy),
and reports
  - the cosine of the mean direction d_y with each background's direction in CLIP space (mean unit
    feature of base shapes on that background minus the mean over backgrounds): the class's own
    background and y_cf's;
  - the change of the true class's margin over the background's class on bias-conflicting images
    (shape a on class c's background) when every t_a moves one unit along its own d_a:
    mean over images of f(x).d_a - f(x).d_c, per (a, c) pair; and the same on aligned images.
Prints a table and writes JSON. Frozen CLIP only, about a minute on a CPU.

  python benchmarks/dicap_cf_directions.py --out=benchmarks/results/dicap_cf_directions_cpu.json
"""

from __future__ import annotations

import argparse

import numpy as np

from common import dicap_toy, write_json  # benchmarks/common.py (scripts run from their folder's path)


def main():
    from jaxcf.data.shapes import (BASE_CLASSES, COLOR_NAMES, SHAPE_NAMES, assigned_background, render_shapes,
                                   sample_factors, with_shape)
    from jaxcf.dicap.counterfactuals import sample_target_classes
    from jaxcf.foundation import encode_images, template_text_features

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=240, help="ground-truth pairs per base class")
    ap.add_argument("--test_per_pair", type=int, default=60, help="test images per (shape, background) pair")
    ap.add_argument("--bias", type=float, default=0.9, help="pairs on the class's assigned background")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/jaxcf_cf_directions")
    ap.add_argument("--out", default="benchmarks/results/dicap_cf_directions_cpu.json")
    args = ap.parse_args()
    c, mesh, found = dicap_toy(args.workdir)
    rng = np.random.default_rng(args.seed)
    res, sizes = c.data.resolution, tuple(c.data.object_size)
    base = [int(b) for b in BASE_CLASSES]
    names = [SHAPE_NAMES[b] for b in base]
    max_len = found.clip.config.text.max_position_embeddings
    zs = template_text_features(found, names, c.counterfactual.template, max_len)
    targets = np.asarray(sample_target_classes(np.arange(len(base)), zs, "similarity"))  # indices into base

    def feats(factors):
        f = encode_images(found, render_shapes(factors, resolution=res)[0].astype(np.float32) / 127.5 - 1, mesh=mesh)
        return f / np.linalg.norm(f, axis=-1, keepdims=True)

    def cos(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    n = args.pairs
    d = {}
    for i, y in enumerate(base):
        own = rng.random(n) < args.bias
        bgs = np.where(own, assigned_background(y), rng.integers(0, len(COLOR_NAMES), n))
        fac = sample_factors(np.full(n, y), bgs, rng, resolution=res, sizes=sizes)
        d[y] = (feats(fac) - feats(with_shape(fac, np.full(n, base[targets[i]])))).mean(0)
    bg_mean = {k: feats(sample_factors(rng.choice(base, n), np.full(n, k), rng, resolution=res, sizes=sizes)).mean(0)
               for k in range(len(COLOR_NAMES))}
    mu = np.mean(list(bg_mean.values()), 0)
    rows = []
    for i, y in enumerate(base):
        ycf = base[targets[i]]
        rows.append(dict(cls=SHAPE_NAMES[y], target=SHAPE_NAMES[ycf],
                         cos_own_background=cos(d[y], bg_mean[assigned_background(y)] - mu),
                         cos_target_background=cos(d[y], bg_mean[assigned_background(ycf)] - mu)))
    m = args.test_per_pair
    conflict, aligned = {}, []
    for a in base:
        for cc in base:
            f = feats(sample_factors(np.full(m, a), np.full(m, assigned_background(cc)), rng, resolution=res,
                                     sizes=sizes))
            if cc != a:
                conflict[f"{SHAPE_NAMES[a]} on {SHAPE_NAMES[cc]}'s background"] = float((f @ d[a] - f @ d[cc]).mean())
            else:
                aligned.append(float(np.mean([(f @ d[a] - f @ d[o]).mean() for o in base if o != a])))
    margins = np.array(list(conflict.values()))
    print(f"L_cf directions d_y = mean f(x) - f(x_cf), {n} ground-truth pairs per class, bias {args.bias}, "
          f"objects {sizes[0]}-{sizes[1]} px, y_cf text-nearest")
    print("| class | y_cf | cos(d_y, own background) | cos(d_y, y_cf's background) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['cls']} | {r['target']} | {r['cos_own_background']:.3f} | {r['cos_target_background']:.3f} |")
    print(f"\nEvery t_a one unit along its own d_a: the true class's margin over the background's class on "
          f"bias-conflicting images {margins.mean():+.4f} (mean; {int((margins > 0).sum())} of {len(margins)} "
          f"pairs > 0); over the other classes on aligned images {np.mean(aligned):+.4f}")
    write_json(args.out, dict(args=vars(args), classes=rows, conflict_margin=conflict,
                              conflict_margin_mean=float(margins.mean()),
                              conflict_pairs_positive=int((margins > 0).sum()), aligned_margin_mean=float(np.mean(aligned))))


if __name__ == "__main__":
    main()
