"""DiDAE + CFKD end to end (METHODS §2-3): ``python -m jaxcf.main --config=configs/didae.py``.

The run is a short list of named stages (:mod:`jaxcf.didae.stages`), each resumable from the workdir:
  foundation         Phi and the DiffAE decoder (:mod:`jaxcf.didae.foundation`; shipped or trained)
  fit_dictionaries   Procrustes (supervised by the factor halves) and SVD atoms on held-out codes
  train_classifiers  the poisoned student, its adversarial surrogate (NAFR) and the balanced oracle
                     (:mod:`jaxcf.didae.classifiers`)
  explain            per dictionary: reflections of every atom (what does an atom change? the
                     disentanglement matrix) and Algorithm 2 counterfactuals for the student
  distill            CFKD: teachers label the counterfactuals, the student is fine-tuned on the mix
  baselines          a probe on Phi with and without the non-causal atoms projected out
Outputs: results.json, results.md, disentanglement_<dict>.{json,png}, atoms_<dict>.png,
counterfactuals_<dict>.{png,npz}, controls.png, metrics.jsonl and checkpoints of every trained model.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf import configs as cfgs
from jaxcf.data.confounded import confounded_data, images_of, square_factors
from jaxcf.didae import cfkd
from jaxcf.didae.classifiers import cfkd_finetuner
from jaxcf.didae.dictionary import reflect_all
from jaxcf.didae.foundation import build_autoencoder, decoder_model, embed_dim
from jaxcf.didae.report import write_report
from jaxcf.didae.stages import (Inputs, Stage, autoencoder_controls, baselines, distill_ground_truth,
                                distill_teachers, explain, fit_dictionaries, train_classifiers)
from jaxcf.diffusion import PREDICTIONS, SCHEDULES
from jaxcf.models.init import num_params
from jaxcf.train import param_shardings
from jaxcf.train.batched import batched
from jaxcf.train.precision import compute_dtype, frozen_params

DICTIONARIES = ("procrustes", "svd")
TEACHERS = ("preclustered", "model")
STUDENTS = ("resnet18", "probe")
ENCODERS = ("square", "clip")
DATASETS = ("square", "celeba")


def validate(config) -> None:
    """Every user-fixable problem, before any data is made or anything compiles."""
    c = config
    cfgs.check_choice(c, "data.name", DATASETS)
    cfgs.check_choice(c, "encoder.kind", ENCODERS)
    cfgs.check_choice(c, "student.kind", STUDENTS)
    cfgs.check_choice(c, "schedule.name", SCHEDULES)
    for field in ("data.resolution", "data.num_samples", "data.num_test_per_group", "data.unbiased_samples",
                  "ddim_steps", "dictionary.num_atoms", "dictionary.fit_examples", "student.steps",
                  "student.batch_size", "surrogate.steps", "oracle.steps", "oracle.batch_size", "cfkd.num_inputs",
                  "cfkd.steps", "cfkd.batch_size", "eval.num_inputs", "eval.batch_size", "eval.grid_examples",
                  "decoder.train.steps", "decoder.train.batch_size"):
        cfgs.check_int(c, field, 1)
    cfgs.check_range(c, "data.agree_fraction", 0.0, 1.0)
    cfgs.check_choice(c, "decoder.train.weights", ("ema", "final"))
    cfgs.check_choice(c, "decoder.train.prediction", PREDICTIONS)
    for field in ("decoder.standardize_z", "decoder.clip_x0", "decoder.train.zero_cond"):
        cfgs.check_choice(c, field, (True, False))
    cfgs.check_range(c, "decoder.train.ema_decay", 0.0, 1.0, high_open=True)
    cfgs.check_range(c, "edit.lam", 0.0, 10.0, low_open=True)
    cfgs.check_range(c, "edit.min_alignment", 0.0, 1.0, high_open=True)
    cfgs.check_range(c, "edit.coef_quantile", 0.0, 0.5, high_open=True)
    cfgs.check_choice(c, "edit.residual", (True, False))
    for field in ("cfkd.add_true", "cfkd.ground_truth", "eval.controls"):
        cfgs.check_choice(c, field, (True, False))
    cfgs.check_range(c, "cfkd.mix", 0.0, 1.0, high_open=True)
    cfgs.check_range(c, "surrogate.adv_eps", 0.0, 2.0)
    cfgs.check_range(c, "optim.warmup_fraction", 0.0, 1.0, high_open=True)
    cfgs.check_range(c, "optim.end_fraction", 0.0, 1.0)
    cfgs.check_int(c, "eval.encode_batch_size", 1)
    for field in ("student", "surrogate", "oracle"):
        cfgs.check_int(c, f"seed_offsets.{field}", 0)
    for field, allowed in (("dictionary.kinds", DICTIONARIES), ("cfkd.teachers", TEACHERS)):
        values = tuple(cfgs.get(c, field))
        if not values or any(v not in allowed for v in values):
            raise cfgs.ConfigError(f"config.{field}={values!r} must be a non-empty subset of {allowed!r}")
    factors = tuple(c.dictionary.factors)
    if tuple(c.data.factors) != factors:
        raise cfgs.ConfigError(f"config.dictionary.factors={factors!r} must equal config.data.factors="
                               f"{tuple(c.data.factors)!r} (one Procrustes atom per labelled factor)")
    if c.cfkd.true_factor not in factors:
        raise cfgs.ConfigError(f"config.cfkd.true_factor={c.cfkd.true_factor!r} is not a factor; allowed: "
                               f"{', '.join(factors)}")
    K = c.dictionary.num_atoms
    if "procrustes" in c.dictionary.kinds and K != len(factors):
        raise cfgs.ConfigError(f"config.dictionary.num_atoms={K} must equal the number of factors {len(factors)} "
                               "for the Procrustes dictionary (one atom per factor)")
    D = embed_dim(c)
    if D is not None and K > D:
        raise cfgs.ConfigError(f"config.dictionary.num_atoms={K} is larger than the embedding size D={D} "
                               f"(config.encoder.embed_dim): a dictionary has at most D orthonormal atoms")
    if c.encoder.kind == "clip" and not c.encoder.get("checkpoint"):
        raise cfgs.ConfigError("config.encoder.checkpoint is required for encoder.kind='clip' (a hub id such as "
                               "'openai/clip-vit-base-patch32' or a local folder)")
    if c.encoder.kind == "clip" and not c.foundation.assets == "":
        raise cfgs.ConfigError("config.foundation.assets must be '' with encoder.kind='clip' (no shipped decoder)")
    if c.encoder.kind == "clip":
        path = str(c.encoder.checkpoint)
        if path.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(path)):
            raise cfgs.ConfigError(f"config.encoder.checkpoint={path!r}: no such checkpoint folder")
    if c.data.name == "square":
        if c.data.resolution < 16 or c.data.resolution % 2 ** c.encoder.num_stages:
            raise cfgs.ConfigError(f"config.data.resolution={c.data.resolution} must be >= 16 and a multiple of "
                                   f"2 ** config.encoder.num_stages")
    if c.data.name == "celeba" and c.encoder.kind != "clip":
        raise cfgs.ConfigError("config.encoder.kind must be 'clip' for data.name='celeba'")
    decoder_model(c, D or 8)  # unknown decoder fields -> ConfigError




# ----------------------------------------------------------------------------- the run


def load_stage(config, workdir: str, mesh) -> Stage:
    """The data and the frozen autoencoder, in the run's compute dtype from here on."""
    data = confounded_data(config.data, config.dictionary.fit_examples)
    print(f"didae: data train {len(data.train)} (groups {np.bincount(data.train.arrays['group'], minlength=4)}), "
          f"test {len(data.test)}, pool {len(data.pool)}, fit {len(data.fit)}", flush=True)
    ae, enc_params, dec_params = build_autoencoder(config, data, workdir, mesh)
    dtype = compute_dtype(config.dtype)  # bfloat16 when config.dtype says so

    def place(params):  # frozen from here on, placed by config.param_sharding
        params = frozen_params(params, dtype)
        return jax.device_put(params, param_shardings(jax.eval_shape(lambda: params), mesh, config.param_sharding))

    enc_params, dec_params = place(enc_params), place(dec_params)
    eb = config.eval.batch_size
    encode = batched(lambda p, x: ae.encode(p, x), mesh, max(eb, config.eval.encode_batch_size))

    # one compiled program for every linear atom edit (per residual setting)
    make_cfs = {r: batched(lambda p, x, edit, r=r: ae.counterfactuals(p[0], p[1], x, edit, residual=r)[0], mesh, eb)
                for r in (False, True)}

    def generate(x, edit, residual: bool = False):
        """x' [K, B, ...] for inputs x [B, ...]: encode, invert and decode all K atoms in one call."""
        return make_cfs[residual]((enc_params, dec_params), x, edit.astype(jnp.float32), axis=1)

    return Stage(config, workdir, mesh, data, ae, enc_params, dec_params, encode, generate, jax.process_index() == 0)


def run(config, workdir: str, mesh):
    t_start = time.time()
    s = load_stage(config, workdir, mesh)
    data, square = s.data, config.data.name == "square"
    dicts, z_fit = fit_dictionaries(s)
    clf = train_classifiers(s, z_fit.shape[1])
    before = clf.evaluate(clf.poisoned)
    test = data.test.arrays
    oracle_test = clf.predict_oracle(clf.oracle_params, images_of(data.test))
    results = {"pipeline": "didae", "variant": config.variant, "embedding_dim": int(z_fit.shape[1]),
               "controls": autoencoder_controls(s) if square and config.eval.controls else None,
               "decoder_parameters": num_params(s.dec_params), "student": config.student.kind, "before": before,
               "oracle_aga": cfkd.aga(np.argmax(oracle_test[:, :2], -1), test["label"], test["group"]),
               "surrogate_aga": clf.evaluate(clf.surrogate)["aga"]}
    print(f"didae: poisoned student AGA {before['aga']:.3f} worst {before['worst_group']:.3f}; oracle AGA "
          f"{results['oracle_aga']:.3f}; surrogate AGA {results['surrogate_aga']:.3f}", flush=True)

    eval_x = images_of(data.test)[:min(config.eval.num_inputs, len(data.test))]
    t0 = time.time()  # compile once, so the CF/s below measure generation, not compilation
    s.generate(eval_x[:1], reflect_all(*dicts[config.dictionary.kinds[0]]))
    results["compile_seconds"] = round(time.time() - t0, 1)
    train_x = images_of(data.train)
    pred_train = np.argmax(clf.predict_student(clf.poisoned, train_x, clf.frozen), -1)
    cf_idx = np.flatnonzero(pred_train == data.train.arrays["label"])[:config.cfkd.num_inputs]
    z_train = s.encode(s.enc_params, train_x)  # Algorithm 2, step 1 distils the student on these codes
    inputs = Inputs(x=train_x[cf_idx], y=data.train.arrays["label"][cf_idx], target=1 - pred_train[cf_idx],
                    factors=square_factors(data.train)[cf_idx] if square else None, z=z_train[cf_idx])
    finetune = cfkd_finetuner(config, clf.student, clf.poisoned, data.train, clf.evaluate, workdir, mesh, clf.frozen)
    rows, per_dict = [], {}
    for kind, (omega, mu) in dicts.items():
        per_dict[kind], x_cf, flipped, valid, atom_true = explain(s, clf, kind, omega, mu, eval_x, inputs, z_train,
                                                                  pred_train, z_fit)
        rows += distill_teachers(s, clf, finetune, before, kind, inputs, x_cf, flipped, valid, atom_true)
    if square and config.cfkd.ground_truth:
        rows.append(distill_ground_truth(s, clf, finetune, before, inputs))
    results.update(dictionaries=per_dict, cfkd=rows, baselines=baselines(s, dicts, per_dict, z_train),
                   seconds=round(time.time() - t_start, 1), cf_inputs=int(len(inputs.x)))
    from jaxcf.utils import compile_cache

    results["timing"] = compile_cache.timings()  # XLA compilation (or cache loads) vs the rest, in seconds
    if s.writer:
        write_report(results, workdir)
    return results
