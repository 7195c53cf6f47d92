"""DiCap end to end: abduction, action, estimation, base-to-novel evaluation (METHODS.md §1).

For each seed: draw the few-shot set, generate a counterfactual for every shot (DDIM inversion,
then CLIP-guided denoising toward y_cf; cached in the workdir), precompute frozen CLIP image
features, and learn prompts three ways with the same shots: zero-shot CLIP (the template, no
training), CoOp (CE only) and DiCap (CE + lambda * L_cf). Accuracies on base, novel and
bias-conflicting test sets, HM, and counterfactual quality (flip rate, CLD, what changed) go to
``results.json`` and ``results.md``; ``counterfactuals.png`` shows factual / counterfactual pairs.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxcf import configs as cfgs
from jaxcf.data.shapes import SHAPE_NAMES, judge_shapes, render_shapes, with_shape
from jaxcf.dicap.estimation import PromptSetup, prompt_accuracy, train_prompts
from jaxcf.dicap.losses import class_cosines
from jaxcf.dicap.metrics import accuracy, argmax_flip_rate, counterfactual_latent_divergence, harmonic_mean
from jaxcf.dicap.prompts import PROMPT_MODES, for_unseen_classes
from jaxcf.dicap.report import write_report
from jaxcf.dicap.runs import cached_counterfactuals
from jaxcf.dicap.runs import foundation_digest, prompt_run_dir
from jaxcf.dicap.runs import mean_std as _mean_std
from jaxcf.dicap.sources import few_shot_source
from jaxcf.dicap.task_config import check_init_text, check_shared
from jaxcf.foundation import build_foundation, encode_images, template_text_features
from jaxcf.utils import io


def validate(config) -> None:
    check_shared(config)  # seeds, foundation, shots, counterfactual generator, prompt, training
    if config.data.test_bias != -1:
        cfgs.check_range(config, "data.test_bias", 0.0, 1.0)
    cfgs.check_range(config, "foundation.clip_train.confound", 0.0, 1.0)
    cfgs.check_range(config, "foundation.clip_train.photo_fraction", 0.0, 1.0)
    cfgs.check_int(config, "foundation.noise_classifier.steps", 1)
    cfgs.check_int(config, "foundation.noise_classifier.max_t", 1)
    if config.data.name == "shapes":
        for field in ("base_classes", "novel_classes"):
            for name in config.data[field]:
                if name not in SHAPE_NAMES:
                    raise cfgs.ConfigError(f"config.data.{field}: unknown class name {name!r}; allowed: "
                                           f"{', '.join(SHAPE_NAMES)}")
        if len(config.data.base_classes) < 2:
            raise cfgs.ConfigError("config.data.base_classes needs at least 2 classes (y_cf must differ from y)")
    elif not config.data.name.startswith("tfds:"):
        raise cfgs.ConfigError(f"config.data.name={config.data.name!r} is not allowed; allowed: 'shapes', 'tfds:<name>'")
    else:
        from jaxcf.data.tfds_data import not_prepared

        problem = not_prepared(config.data.name[len("tfds:"):], config.data.data_dir)
        if problem:
            raise cfgs.ConfigError(f"config.data.name={config.data.name!r}: {problem} (config.data.data_dir)")
    cfgs.check_choice(config, "prompt.mode", PROMPT_MODES)
    cfgs.check_range(config, "train.cf_ce", 0.0, math.inf)
    n_shots = config.data.shots * len(config.data.base_classes)
    if config.data.name == "shapes" and config.train.batch_size > n_shots:
        raise cfgs.ConfigError(f"config.train.batch_size={config.train.batch_size} is larger than the "
                               f"{n_shots} few-shot examples (data.shots x base classes)")


# ----------------------------------------------------------------------------- estimation


# ----------------------------------------------------------------------------- run


def run(config, workdir: str, mesh):
    t_start = time.time()
    source = few_shot_source(config)
    first_shots = source.fewshot(config.seeds[0])  # data errors (e.g. too few shots) before any model work
    found = build_foundation(config, workdir, mesh)
    found_digest = foundation_digest(found)  # keys the caches
    check_init_text(config, found)
    max_len = found.clip.config.text.max_position_embeddings
    base_names, novel_names = source.base_names, source.novel_names
    tests = source.tests()
    test_feats = {k: encode_images(found, x, mesh=mesh) for k, (x, _) in tests.items()}
    template = config.counterfactual.template
    zs = {"base": template_text_features(found, base_names, template, max_len),
          "novel": template_text_features(found, novel_names, template, max_len)}
    setups = {"base": PromptSetup(found, base_names, config.prompt.n_ctx, max_len),
              "novel": PromptSetup(found, novel_names, config.prompt.n_ctx, max_len)}
    split_of = {"base": "base", "novel": "novel", "conflict": "base"}
    cocoop = config.prompt.mode == "cocoop"

    rows = []
    grid_pairs = None
    for seed in config.seeds:
        x, y, mask, factors = first_shots if seed == config.seeds[0] else source.fewshot(seed)
        x_cf, y_cf = cached_counterfactuals(found, x, y, zs["base"], config, seed, workdir, mesh, found_digest,
                                            class_names=base_names)
        f_x, f_cf = encode_images(found, x, mesh=mesh), encode_images(found, x_cf, mesh=mesh)
        zs_cf_logits = np.asarray(class_cosines(jnp.asarray(f_cf), zs["base"]))
        ref_f = np.concatenate([f_x, test_feats["base"]])
        ref_y = np.concatenate([y, tests["base"][1]])
        norm = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
        cld = counterfactual_latent_divergence(norm(f_x), norm(f_cf), y, y_cf, norm(ref_f), ref_y)
        row = {"seed": seed, "cf_flip_rate": argmax_flip_rate(zs_cf_logits, y_cf), "cf_cld": float(np.nanmean(cld)),
               "cf_l1": float(np.mean(np.abs(x_cf - x)))}
        if mask is not None:  # ground truth of the shapes world: what changed, object or background
            m = mask[..., None]
            row["cf_l1_object"] = float(np.sum(np.abs(x_cf - x) * m) / (3 * m.sum()))
            row["cf_l1_background"] = float(np.sum(np.abs(x_cf - x) * (1 - m)) / (3 * (1 - m).sum()))
        methods = (("coop", 0.0, f_cf), ("dicap", config.train.lam, f_cf))
        if factors is not None and config.eval.ground_truth:
            # the model-free judge: which shape does each counterfactual show (vs re-renderings)?
            target_shape = source.shape_of(y_cf)
            judge = judge_shapes(x_cf, factors, resolution=config.data.resolution)
            row.update(cf_judge_flip_rate=float(np.mean(judge["shape"] == target_shape)),
                       cf_judge_kept_shape=float(np.mean(judge["shape"] == factors[:, 0])),
                       cf_judge_background_l1=float(np.mean(judge["background_l1"])),
                       cf_judge_object_color_l1=float(np.mean(judge["object_color_l1"])))
            x_gt, _ = render_shapes(with_shape(factors, target_shape), resolution=config.data.resolution)
            f_gt = encode_images(found, x_gt.astype(np.float32) / 127.5 - 1, mesh=mesh)
            row["gt_zeroshot_flip_rate"] = argmax_flip_rate(np.asarray(class_cosines(jnp.asarray(f_gt), zs["base"])), y_cf)
            methods += (("dicap_gt", config.train.lam, f_gt),)
        for k in tests:
            row[f"zeroshot_{k}"] = accuracy(class_cosines(jnp.asarray(test_feats[k]), zs[split_of[k]]), tests[k][1])
        for method, lam, f_neg in methods:
            pp = train_prompts(found, setups["base"], f_x, f_neg, y, config, seed,
                               io.join(workdir, "prompts", prompt_run_dir(config, seed, method, found_digest)), mesh, lam,
                               desc=f"{method} prompts (seed {seed})", y_cf=y_cf,
                               cf_ce=0.0 if method == "coop" else config.train.cf_ce)
            for k in tests:
                params = for_unseen_classes(pp) if split_of[k] == "novel" else pp
                row[f"{method}_{k}"] = prompt_accuracy(found, setups[split_of[k]], params, test_feats[k], tests[k][1],
                                                       cocoop, mesh)
        for method in ("zeroshot",) + tuple(m[0] for m in methods):
            row[f"{method}_hm"] = harmonic_mean(row[f"{method}_base"], row[f"{method}_novel"])
        rows.append(row)
        logging.info("seed %d: %s", seed, row)
        if grid_pairs is None:
            grid_pairs = (x, x_cf, y, y_cf)

    summary = {k: _mean_std(rows, k) for k in rows[0] if k != "seed"}
    results = {"pipeline": "dicap", "variant": config.variant, "dataset": config.data.name, "seeds": list(config.seeds),
               "counterfactual": config.counterfactual.to_dict(), "lam": config.train.lam, "tau": config.train.tau,
               "shots": config.data.shots, "bias": config.data.bias, "per_seed": rows, "summary": summary,
               "seconds": round(time.time() - t_start, 1)}
    from jaxcf.utils import compile_cache

    results["timing"] = compile_cache.timings()  # XLA compilation (or cache loads) vs the rest, in seconds
    if jax.process_index() == 0:
        write_report(results, grid_pairs, base_names, workdir)
    return results
