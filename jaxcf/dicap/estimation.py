"""DiCap's estimation stage: prompt learning on frozen CLIP features (CoOp / DiCap / CoCoOp)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from jaxcf.dicap.losses import class_cosines, dicap_loss
from jaxcf.dicap.metrics import accuracy
from jaxcf.dicap.prompts import build_prompt_tokens, init_prompt_params, prompt_text_features
from jaxcf.foundation import Foundation
from jaxcf.train import stream_indices, warmup_cosine
from jaxcf.train.batched import batched
from jaxcf.train.fit import fit


class PromptSetup:
    """The frozen pieces of prompt learning for one class list (template tokens and embeddings)."""

    def __init__(self, found: Foundation, class_names, n_ctx: int, max_len: int):
        self.tmpl = build_prompt_tokens(found.tokenizer, class_names, n_ctx, max_len)
        self.base = found.clip.token_embedding(found.clip_params, jnp.asarray(self.tmpl.token_ids))

    def text_features(self, found, clip_params, prompt_params, image_feats=None):
        return prompt_text_features(found.clip, clip_params, prompt_params, self.base, self.tmpl, image_feats)


def train_prompts(found: Foundation, setup: PromptSetup, f_x, f_cf, y, config, seed: int, workdir: str, mesh,
                  lam: float, desc: str, y_cf=None, cf_ce: float = 0.0):
    """Learns the prompt context on precomputed features; only the prompt parameters train.
    ``lam`` weighs L_cf, ``cf_ce`` the CE on the counterfactuals f_cf with their labels y_cf (0: CoOp)."""
    tc = config.train
    lr = warmup_cosine(tc.learning_rate, tc.warmup_steps, tc.steps)
    tx = optax.sgd(lr, momentum=0.9) if tc.optimizer == "sgd" else optax.adamw(lr, weight_decay=tc.weight_decay)
    cocoop = config.prompt.mode == "cocoop"
    scale = found.clip.logit_scale(found.clip_params)

    def init(rng):
        return init_prompt_params(rng, found.clip, found.clip_params, found.tokenizer, len(setup.tmpl.token_ids),
                                  config.prompt.n_ctx, config.prompt.init_text or None, config.prompt.mode)

    def loss_fn(pp, batch, rng, frozen):
        # the template embeddings ([C, L, D]; large for ImageNet) come in with the frozen CLIP params
        # as an argument rather than as a constant baked into the compiled step
        t = prompt_text_features(found.clip, frozen["clip"], pp, frozen["base"], setup.tmpl,
                                 batch["f"] if cocoop else None)
        return dicap_loss(batch["f"], batch.get("f_cf"), t, batch["y"], scale, lam, tc.tau, tc.all_classes,
                          cf_labels=batch.get("y_cf"), cf_ce=cf_ce)

    def batch_fn(step):
        idx = stream_indices(len(y), tc.batch_size, step, seed)
        b = {"f": f_x[idx], "y": y[idx].astype(np.int32)}
        if lam > 0 or cf_ce > 0:
            b["f_cf"] = f_cf[idx]
        if cf_ce > 0:
            b["y_cf"] = np.asarray(y_cf)[idx].astype(np.int32)
        return b

    frozen = {"clip": found.clip_params, "base": setup.base}
    return fit(init, tx, loss_fn, batch_fn, steps=tc.steps, batch_size=tc.batch_size, workdir=workdir, mesh=mesh,
               config=config, seed=seed, desc=desc, frozen=frozen, batch_field="train.batch_size").params


COCOOP_EVAL_BATCH = 64  # CoCoOp's text features depend on the image: evaluated in batches of this size


def prompt_accuracy(found, setup: PromptSetup, prompt_params, feats, labels, cocoop: bool, mesh) -> float:
    if not cocoop:
        t = setup.text_features(found, found.clip_params, prompt_params)
        return accuracy(class_cosines(jnp.asarray(feats), t), labels)
    fn = batched(lambda pp, f: class_cosines(f, setup.text_features(found, found.clip_params, pp, f)), mesh,
                 COCOOP_EVAL_BATCH)
    return accuracy(fn(prompt_params, np.asarray(feats)), labels)
