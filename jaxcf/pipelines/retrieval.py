"""DiCap for image-text retrieval: abduction, action, prompt learning on captions, recall@K.

For each seed: draw the few-shot (image, caption) set, generate a counterfactual of every image
(DDIM inversion, then guidance toward y_cf: another shape in the shapes world, the text-nearest
other caption on real data; cached in the workdir), precompute frozen CLIP image features, and
learn a caption prompt context three ways with the same pairs: zero-shot CLIP (the caption
itself), CoOp (symmetric InfoNCE) and DiCap (InfoNCE + lambda x L_cf, the counterfactual image a
hard negative of its caption); in the shapes world also DiCap with ground-truth counterfactuals
(the image re-rendered with the target shape). Recall@K both ways on the held-out and
bias-conflicting sets go to ``results.json`` / ``results.md``; ``examples.png`` shows images,
captions and counterfactuals.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging

from jaxcf import configs as cfgs
from jaxcf.data.shapes import SHAPE_NAMES
from jaxcf.dicap import task_config
from jaxcf.dicap.estimation import PromptSetup
from jaxcf.dicap.runs import cached_counterfactuals, foundation_digest, mean_std, prompt_run_dir
from jaxcf.dicap.task_data import retrieval_source
from jaxcf.dicap.task_report import example_sheet, final_loss_line, metric_table, negatives_text, write_task_report
from jaxcf.dicap.tasks import (bucketed, counterfactual_mask, counterfactual_quality, final_metrics,
                               fit_text_prompts, initial_prompt, recall, retrieval_batches, retrieval_task_loss,
                               text_encoder, zero_shot_features)
from jaxcf.foundation import build_foundation, encode_images, template_text_features
from jaxcf.utils import io

DATASETS = ("shapes", "karpathy", "tfds:coco_captions")
RELEVANCE = ("text", "pair")


def validate(config) -> None:
    cfgs.check_choice(config, "data.name", DATASETS)
    cfgs.check_choice(config, "data.relevance", RELEVANCE)
    task_config.validate_task(config)
    ks = tuple(config.eval.ks)
    if not ks or not all(isinstance(k, int) and k >= 1 for k in ks):
        raise cfgs.ConfigError(f"config.eval.ks={ks!r} must be a non-empty list of integers >= 1")
    d = config.data
    if d.name == "shapes":
        cfgs.check_int(config, "data.test_per_class", 1)
        n_pairs = d.shots * (len(SHAPE_NAMES) // 2)
        if config.train.batch_size > n_pairs:
            raise cfgs.ConfigError(f"config.train.batch_size={config.train.batch_size} is larger than the {n_pairs} "
                                   "few-shot pairs (data.shots x 6 base shapes)")
        if d.relevance != "text":
            raise cfgs.ConfigError("config.data.relevance must be 'text' for the shapes world (its captions repeat "
                                   "across images); allowed: 'text'")
    elif d.name == "karpathy":
        task_config.check_path(config, "data.split_file", "file")
        task_config.check_path(config, "data.image_root", "folder")
    else:
        from jaxcf.data.captions import _coco_not_prepared

        problem = _coco_not_prepared(d.data_dir or None)
        if problem:
            raise cfgs.ConfigError(f"config.data.data_dir: {problem}")
    if d.name != "shapes":
        cfgs.check_int(config, "data.test_images", 0)


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def run(config, workdir: str, mesh):
    t_start = time.time()
    source = retrieval_source(config)
    first_shots = source.fewshot(config.seeds[0])  # data errors before any model work
    tests = source.tests()
    found = build_foundation(config, workdir, mesh)
    task_config.check_init_text(config, found)
    digest = foundation_digest(found)
    max_len = found.clip.config.text.max_position_embeddings
    ks, tc, cf = tuple(config.eval.ks), config.train, config.counterfactual

    # held-out sets: image features, each caption's distinct-text row, relevance, prompt encoders
    evals = {}
    for k, data in tests.items():
        texts = tuple(dict.fromkeys(data.captions))
        pos = {t: i for i, t in enumerate(texts)}
        evals[k] = dict(f=encode_images(found, data.image_batch(np.arange(data.num_images)), mesh=mesh),
                        rows=np.asarray([pos[t] for t in data.captions]), relevant=data.relevance(config.data.relevance),
                        zs=zero_shot_features(found, texts, config.prompt.zero_shot_template, max_len),
                        encode=text_encoder(found, PromptSetup(found, texts, config.prompt.n_ctx, max_len), mesh))

    rows, sheet = [], None
    for seed in config.seeds:
        shots = first_shots if seed == config.seeds[0] else source.fewshot(seed)
        class_feats = template_text_features(found, shots.cf_class_names, cf.template, max_len)
        x_cf, y_cf = cached_counterfactuals(found, shots.images, shots.cf_label, class_feats, config, seed, workdir,
                                            mesh, digest, class_names=shots.cf_class_names)
        f_x, f_cf = encode_images(found, shots.images, mesh=mesh), encode_images(found, x_cf, mesh=mesh)
        target = None if shots.factors is None else np.asarray([SHAPE_NAMES.index(shots.cf_class_names[i]) for i in y_cf])
        row = {"seed": seed, **counterfactual_quality(f_cf, class_feats, y_cf, shots.images, x_cf, shots.factors, target,
                                                      config.data.resolution)}
        keep = counterfactual_mask(f_cf, class_feats, y_cf, tc.cf_filter)
        row["cf_kept"] = float(np.mean(keep))
        negatives = {"coop": (0.0, None, None), "dicap": (tc.lam, f_cf, keep)}
        x_gt = None
        if source.has_renderer and config.eval.ground_truth:
            x_gt, valid_gt = source.ground_truth(shots, y_cf)
            negatives["dicap_gt"] = (tc.lam, encode_images(found, x_gt, mesh=mesh), valid_gt)
        prompts = {"init": initial_prompt(found, config, jax.random.key(seed))}  # the context before training
        for k, e in evals.items():
            row |= _prefixed(f"zeroshot_{k}", recall(e["f"], e["zs"][e["rows"]], e["relevant"], ks))
            row |= _prefixed(f"init_{k}", recall(e["f"], e["encode"](prompts["init"])[e["rows"]], e["relevant"], ks))
        setup = PromptSetup(found, bucketed(shots.texts), config.prompt.n_ctx, max_len)
        for method, (lam, f_neg, valid) in negatives.items():
            batch_fn = retrieval_batches(f_x, shots.pair_image, shots.pair_text, f_neg, valid, tc.batch_size, seed, lam)
            run_dir = io.join(workdir, "prompts", prompt_run_dir(config, seed, method, digest))
            pp = fit_text_prompts(found, setup, retrieval_task_loss(lam, tc.tau), batch_fn, config, seed, run_dir, mesh,
                                  desc=f"{method} prompts (seed {seed})")
            row |= {f"{method}_final_{k}": v for k, v in final_metrics(run_dir).items() if k in ("loss", "l_cf")}
            for k, e in evals.items():
                row |= _prefixed(f"{method}_{k}", recall(e["f"], e["encode"](pp)[e["rows"]], e["relevant"], ks))
        rows.append(row)
        logging.info("seed %d: %s", seed, row)
        if sheet is None:
            sheet = (shots, x_cf, y_cf, x_gt)

    summary = {k: mean_std(rows, k) for k in rows[0] if k != "seed"}
    results = {"pipeline": "retrieval", "variant": config.variant, "dataset": config.data.name,
               "seeds": list(config.seeds), "counterfactual": cf.to_dict(), "lam": tc.lam, "tau": tc.tau,
               "cf_filter": tc.cf_filter, "shots": config.data.shots, "bias": config.data.bias,
               "test_sets": {k: len(e["f"]) for k, e in evals.items()},
               "per_seed": rows, "summary": summary, "seconds": round(time.time() - t_start, 1)}
    from jaxcf.utils import compile_cache

    results["timing"] = compile_cache.timings()  # XLA compilation (or cache loads) vs the rest, in seconds
    if jax.process_index() == 0:
        write_task_report(results, workdir, report_text(results, list(evals), ks))
        _examples(io.join(workdir, "examples.png"), *sheet)
    return results


def report_text(results: dict, splits, ks) -> str:
    s = results["summary"]
    cf = results["counterfactual"]
    names = {"heldout": "held-out (all shapes, uniform backgrounds)", "conflict": "bias-conflicting"}
    lines = [f"DiCap retrieval ({results['variant']}, {results['dataset']}): {len(results['seeds'])} seeds, "
             f"{results['shots']} shots, bias {results['bias']}, y_cf={cf['target']}, s={cf['scale']:g}, "
             f"depth={cf['depth']:g}, lambda={results['lam']:g}, tau={results['tau']:g}, "
             f"hard negatives: {negatives_text(results)}; recall@K in %", ""]
    cols = [(f"{d} R@{k}", f"{d}_R@{k}") for d in ("i2t", "t2i") for k in ks]
    for split in splits:
        lines += [f"**{names.get(split, split)}** ({results['test_sets'][split]} images)", ""]
        lines += metric_table(s, [(h, f"{split}_{suffix}") for h, suffix in cols]) + [""]
    cf_cols = [(h, k) for h, k in (("CLIP zero-shot flip rate", "cf_flip_rate"), ("flip rate (judge)", "cf_judge_flip_rate"),
                                   ("shape kept (judge)", "cf_judge_kept_shape")) if k in s]
    lines += ["| counterfactuals | " + " | ".join(h for h, _ in cf_cols) + " | pixel L1 |",
              "|---" * (len(cf_cols) + 2) + "|",
              f"| {cf['target']}, s={cf['scale']:g} | " + " | ".join(
                  f"{100 * s[k]['mean']:.1f} ± {100 * s[k]['std']:.1f}" for _, k in cf_cols)
              + f" | {s['cf_l1']['mean']:.3f} |", ""] + final_loss_line(s)
    return "\n".join(lines)


def _examples(path, shots, x_cf, y_cf, x_gt, n: int = 8):
    pick = np.linspace(0, len(shots.images) - 1, min(n, len(shots.images))).astype(int)
    columns, headers = [shots.images[pick], x_cf[pick]], ["image", "generated cf"]
    if x_gt is not None:
        columns.append(x_gt[pick])
        headers.append("ground-truth cf")
    texts = [f"caption: {shots.captions[i]}\ncounterfactual toward: {shots.cf_class_names[y_cf[i]]}" for i in pick]
    example_sheet(path, columns, headers, texts)
