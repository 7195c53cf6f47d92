"""DiCap for visual question answering: CLIP scores (question, candidate answer) statements with a
learned prompt context; counterfactual images whose answer changed are hard negatives.

For each seed: draw the few-shot questions, generate a counterfactual of every image the
generator can change (the shape in the shapes world, so the shape questions get one; a training
question's image toward the text-nearest other answer on VQA v2; cached in the workdir), and
learn the statement context three ways: zero-shot CLIP (the statements as written), CoOp (CE over
the question type's candidate answers) and DiCap (CE + lambda x L_cf); in the shapes world also
DiCap with ground-truth counterfactuals (the asked factor re-rendered, every question type).
VQA accuracy overall and per question type on the held-out and bias-conflicting sets go to
``results.json`` / ``results.md``; ``examples.png`` shows questions, answers and counterfactuals.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging

from jaxcf import configs as cfgs
from jaxcf.data.shapes import SHAPE_NAMES
from jaxcf.data.shapes_tasks import QUESTION_TYPES
from jaxcf.dicap import task_config
from jaxcf.dicap.estimation import PromptSetup
from jaxcf.dicap.runs import cached_counterfactuals, foundation_digest, mean_std, prompt_run_dir
from jaxcf.dicap.task_data import vqa_source
from jaxcf.dicap.task_report import example_sheet, final_loss_line, metric_table, negatives_text, write_task_report
from jaxcf.dicap.tasks import (counterfactual_mask, counterfactual_quality, final_metrics, fit_text_prompts,
                               initial_prompt, text_encoder, vqa_batches, vqa_predictions, vqa_task_loss,
                               zero_shot_features)
from jaxcf.foundation import build_foundation, encode_images, template_text_features
from jaxcf.utils import io

DATASETS = ("shapes", "vqa_v2")


def validate(config) -> None:
    cfgs.check_choice(config, "data.name", DATASETS)
    task_config.validate_task(config)
    d = config.data
    if d.name == "shapes":
        cfgs.check_int(config, "data.test_per_class", 1)
        for q in d.question_types:
            cfgs.check_value("config.data.question_types entry", q, QUESTION_TYPES)
        n_q = d.shots * (len(SHAPE_NAMES) // 2) * len(tuple(d.question_types) or QUESTION_TYPES)
        if config.train.batch_size > n_q:
            raise cfgs.ConfigError(f"config.train.batch_size={config.train.batch_size} is larger than the {n_q} "
                                   "few-shot questions (data.shots x 6 base shapes x question types)")
    else:
        for which in ("train", "test"):
            task_config.check_path(config, f"data.{which}_questions", "file")
            task_config.check_path(config, f"data.{which}_images", "folder")
        task_config.check_path(config, "data.train_annotations", "file")
        if d.test_annotations:
            task_config.check_path(config, "data.test_annotations", "file")
        if d.vocab:
            task_config.check_path(config, "data.vocab", "file")
        cfgs.check_int(config, "data.top_k", 0)
        cfgs.check_int(config, "data.test_questions_max", 0)
        statement = config.prompt.statement
        if "{answer}" not in statement:
            raise cfgs.ConfigError(f"config.prompt.statement={statement!r} must contain {{answer}} "
                                   "(and may contain {question})")


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}_{k.replace('type/', '')}": v for k, v in metrics.items() if not k.startswith("answer_type/")}


def run(config, workdir: str, mesh):
    t_start = time.time()
    source = vqa_source(config)
    first_shots = source.fewshot(config.seeds[0])  # data errors before any model work
    tests = source.tests()
    found = build_foundation(config, workdir, mesh)
    task_config.check_init_text(config, found)
    digest = foundation_digest(found)
    max_len = found.clip.config.text.max_position_embeddings
    tc, cf = config.train, config.counterfactual
    T, A = len(source.type_names), len(source.vocab)
    pairs = (source.pair_type, source.pair_answer, T, A)

    evals = {k: dict(data=data, f=encode_images(found, data.image_batch(np.arange(len(data.images))), mesh=mesh),
                     q_type=source.question_type_index(data)) for k, data in tests.items()}

    def accuracy(e, statement_feats):
        pred = vqa_predictions(e["f"], statement_feats, e["data"].question_image, np.maximum(e["q_type"], 0), *pairs)
        return e["data"].accuracy(np.where(e["q_type"] >= 0, pred, -1))  # an unseen question type: no answer

    zs = zero_shot_features(found, source.statements, config.prompt.zero_shot_template, max_len)
    setup = PromptSetup(found, source.statements, config.prompt.n_ctx, max_len)
    encode = text_encoder(found, setup, mesh)

    rows, sheet = [], None
    for seed in config.seeds:
        shots = first_shots if seed == config.seeds[0] else source.fewshot(seed)
        class_feats = template_text_features(found, shots.cf_class_names, cf.template, max_len)
        x = shots.images[shots.cf_image]
        x_cf, y_cf = cached_counterfactuals(found, x, shots.cf_label, class_feats, config, seed, workdir, mesh,
                                            digest, class_names=shots.cf_class_names)
        f_img, f_cf_rows = encode_images(found, shots.images, mesh=mesh), encode_images(found, x_cf, mesh=mesh)
        target = None if shots.factors is None else np.asarray([SHAPE_NAMES.index(shots.cf_class_names[i]) for i in y_cf])
        factors = None if shots.factors is None else shots.factors[shots.cf_image]
        row = {"seed": seed, **counterfactual_quality(f_cf_rows, class_feats, y_cf, x, x_cf, factors, target,
                                                      config.data.resolution)}
        keep = counterfactual_mask(f_cf_rows, class_feats, y_cf, tc.cf_filter)
        row["cf_kept"] = float(np.mean(keep))
        has_cf = (shots.q_cf >= 0) & keep[np.maximum(shots.q_cf, 0)]
        row["cf_question_fraction"] = float(np.mean(has_cf))
        negatives = {"coop": (0.0, None, None), "dicap": (tc.lam, f_cf_rows[np.maximum(shots.q_cf, 0)], has_cf)}
        gt = None
        if source.has_renderer and config.eval.ground_truth:
            gt = source.ground_truth(shots, seed, y_cf)
            negatives["dicap_gt"] = (tc.lam, encode_images(found, gt[0], mesh=mesh), gt[2])
            row["gt_question_fraction"] = float(np.mean(gt[2]))
        init_feats = encode(initial_prompt(found, config, jax.random.key(seed)))  # the context before training
        for k, e in evals.items():
            row |= _prefixed(f"zeroshot_{k}", accuracy(e, zs)) | _prefixed(f"init_{k}", accuracy(e, init_feats))
        for method, (lam, f_neg, valid) in negatives.items():
            batch_fn = vqa_batches(f_img, shots.q_image, shots.q_type, shots.answer, f_neg, valid, tc.batch_size,
                                   seed, lam)
            run_dir = io.join(workdir, "prompts", prompt_run_dir(config, seed, method, digest))
            pp = fit_text_prompts(found, setup, vqa_task_loss(lam, tc.tau, *pairs), batch_fn, config, seed, run_dir,
                                  mesh, desc=f"{method} prompts (seed {seed})")
            row |= {f"{method}_final_{k}": v for k, v in final_metrics(run_dir).items() if k in ("loss", "l_cf")}
            feats = encode(pp)
            for k, e in evals.items():
                row |= _prefixed(f"{method}_{k}", accuracy(e, feats))
        rows.append(row)
        logging.info("seed %d: %s", seed, row)
        if sheet is None:
            sheet = (shots, x_cf, y_cf, gt)

    summary = {k: mean_std(rows, k) for k in rows[0] if k != "seed"}
    results = {"pipeline": "vqa", "variant": config.variant, "dataset": config.data.name, "seeds": list(config.seeds),
               "counterfactual": cf.to_dict(), "lam": tc.lam, "tau": tc.tau, "cf_filter": tc.cf_filter,
               "shots": config.data.shots,
               "bias": config.data.bias, "question_types": list(source.type_names),
               "test_sets": {k: len(e["data"].questions) for k, e in evals.items()},
               "per_seed": rows, "summary": summary, "seconds": round(time.time() - t_start, 1)}
    from jaxcf.utils import compile_cache

    results["timing"] = compile_cache.timings()  # XLA compilation (or cache loads) vs the rest, in seconds
    if jax.process_index() == 0:
        write_task_report(results, workdir, report_text(results, list(evals)))
        _examples(io.join(workdir, "examples.png"), source, *sheet)
    return results


def report_text(results: dict, splits) -> str:
    s = results["summary"]
    cf = results["counterfactual"]
    names = {"heldout": "held-out (all shapes, uniform backgrounds)", "conflict": "bias-conflicting"}
    types = results["question_types"] if len(results["question_types"]) <= 8 else []
    lines = [f"DiCap VQA ({results['variant']}, {results['dataset']}): {len(results['seeds'])} seeds, "
             f"{results['shots']} shots, bias {results['bias']}, y_cf={cf['target']}, s={cf['scale']:g}, "
             f"depth={cf['depth']:g}, lambda={results['lam']:g}, tau={results['tau']:g}, "
             f"hard negatives: {negatives_text(results)}; VQA accuracy in %", ""]
    for split in splits:
        lines += [f"**{names.get(split, split)}** ({results['test_sets'][split]} questions)", ""]
        lines += metric_table(s, [("overall", f"{split}_overall")] + [(t, f"{split}_{t}") for t in types]) + [""]
    frac = f"{100 * s['cf_question_fraction']['mean']:.0f}% of the training questions have a generated counterfactual"
    if "gt_question_fraction" in s:
        frac += f", {100 * s['gt_question_fraction']['mean']:.0f}% a ground-truth one"
    cf_cols = [(h, k) for h, k in (("CLIP zero-shot flip rate", "cf_flip_rate"), ("flip rate (judge)", "cf_judge_flip_rate"),
                                   ("shape kept (judge)", "cf_judge_kept_shape")) if k in s]
    lines += [frac + ".", "", "| counterfactuals | " + " | ".join(h for h, _ in cf_cols) + " | pixel L1 |",
              "|---" * (len(cf_cols) + 2) + "|",
              f"| {cf['target']}, s={cf['scale']:g} | " + " | ".join(
                  f"{100 * s[k]['mean']:.1f} ± {100 * s[k]['std']:.1f}" for _, k in cf_cols)
              + f" | {s['cf_l1']['mean']:.3f} |", ""] + final_loss_line(s)
    return "\n".join(lines)


def _examples(path, source, shots, x_cf, y_cf, gt, n: int = 8):
    """One row per question: its image, the generated counterfactual of that image (where the
    generator changes the asked factor) and the ground-truth one."""
    qs = np.flatnonzero(shots.q_cf >= 0)
    others = np.flatnonzero(shots.q_cf < 0) if gt is not None else np.zeros(0, int)
    pick = np.concatenate([qs[:n // 2], others[:n - min(len(qs), n // 2)]]).astype(int)
    blank = np.zeros_like(shots.images[:1])
    gen = np.stack([x_cf[shots.q_cf[q]] if shots.q_cf[q] >= 0 else blank[0] for q in pick])
    columns, headers = [shots.images[shots.q_image[pick]], gen], ["image", "generated cf"]
    texts = []
    for q in pick:
        line = f"Q: {shots.questions[q]}  A: {source.vocab[shots.answer[q]]}"
        if shots.q_cf[q] >= 0:
            line += f"\ngenerated toward: {shots.cf_class_names[y_cf[shots.q_cf[q]]]}"
        if gt is not None:
            line += (f"\nground-truth cf answer: {source.vocab[gt[1][q]]}" if gt[2][q]
                     else "\nno ground-truth cf (the asked factor cannot change here)")
        texts.append(line)
    if gt is not None:
        columns.append(gt[0][pick])
        headers.append("ground-truth cf")
    example_sheet(path, columns, headers, texts)
