"""DiCap's report: results.json, a markdown table and the factual / counterfactual grid."""

from __future__ import annotations

import numpy as np

from jaxcf.utils import io
from jaxcf.utils.images import save_grid


def write_report(results, grid_pairs, base_names, workdir):
    io.write_json(io.join(workdir, "results.json"), results)
    s = results["summary"]
    fmt = lambda k: f"{100 * s[k]['mean']:.1f} ± {100 * s[k]['std']:.1f}"  # noqa: E731
    cf = results["counterfactual"]
    lines = [
        f"DiCap ({results['variant']}, {results['dataset']}): {len(results['seeds'])} seeds, {results['shots']} shots, bias {results['bias']}, "
        f"y_cf={cf['target']}, s={cf['scale']:g}, depth={cf['depth']:g}, guide_on={cf['guide_on']}, "
        f"mask={cf['mask']}{', normalized gradient' if cf.get('normalize_gradient') else ''}, lambda={results['lam']:g}",
        "",
        "| method | base | novel | HM | bias-conflicting |",
        "|---|---|---|---|---|",
    ]
    get = lambda k: fmt(k) if k in s else "n/a"  # noqa: E731
    num = lambda k: f"{s[k]['mean']:.3f}" if k in s else "n/a"  # noqa: E731
    for method, label in (("zeroshot", "zero-shot CLIP"), ("coop", "CoOp"), ("dicap", "DiCap"),
                          ("dicap_gt", "DiCap, ground-truth counterfactuals (upper bound)")):
        if method + "_base" not in s:
            continue
        lines.append(f"| {label} | {fmt(method + '_base')} | {fmt(method + '_novel')} | {fmt(method + '_hm')} | "
                     f"{get(method + '_conflict')} |")
    lines += ["", "| counterfactuals | flip rate | CLD | L1 | L1 object | L1 background |", "|---|---|---|---|---|---|",
              f"| {cf['target']}, s={cf['scale']:g} | {fmt('cf_flip_rate')} | {num('cf_cld')} | {num('cf_l1')} | "
              f"{num('cf_l1_object')} | {num('cf_l1_background')} |", ""]
    if "cf_judge_flip_rate" in s:
        lines += ["Judged without a model (each counterfactual against re-renderings of every shape with the source's "
                  "other factors):", "", "| flip rate (judge) | shape kept (judge) | background L1 | object colour L1 "
                  "| zero-shot CLIP flip rate on ground-truth counterfactuals |", "|---|---|---|---|---|",
                  f"| {fmt('cf_judge_flip_rate')} | {fmt('cf_judge_kept_shape')} | {num('cf_judge_background_l1')} | "
                  f"{num('cf_judge_object_color_l1')} | {fmt('gt_zeroshot_flip_rate')} |", ""]
    text = "\n".join(lines)
    io.write_text(io.join(workdir, "results.md"), text)
    print(text)
    if grid_pairs is not None:
        x, x_cf, y, y_cf = grid_pairs
        order = np.argsort(y, kind="stable")
        k = min(12, len(x))
        pick = order[np.linspace(0, len(order) - 1, k).astype(int)]
        save_grid([x[pick], x_cf[pick]], io.join(workdir, "counterfactuals.png"), scale=3)
        pairs = " | ".join(f"{base_names[y[i]]} -> {base_names[y_cf[i]]}" for i in pick)
        io.write_text(io.join(workdir, "counterfactuals.txt"),
                      f"top row: factual, bottom row: counterfactual\n{pairs}\n")
