"""Config checks shared by DiCap's retrieval and VQA pipelines (before anything is built)."""

from __future__ import annotations

import math
import os

from jaxcf import configs as cfgs
from jaxcf.dicap.counterfactuals import CF_MASKS, CF_TARGETS
from jaxcf.dicap.tasks import CF_FILTERS
from jaxcf.diffusion.ddim import GUIDE_ON
from jaxcf.foundation import ASSETS

FOUNDATIONS = ("toy", "pretrained")
COND_UNET_INITS = ("unconditional", "scratch")  # foundation.cond_unet.init
OPTIMIZERS = ("sgd", "adamw")


def check_path(config, field: str, kind: str = "file") -> None:
    """A local file / folder named by ``config.<field>`` must exist (buckets are asked later)."""
    path = str(cfgs.get(config, field))
    if not path:
        raise cfgs.ConfigError(f"config.{field} is empty: give the {kind} path")
    if "://" in path:
        return
    ok = os.path.isfile(os.path.expanduser(path)) if kind == "file" else os.path.isdir(os.path.expanduser(path))
    if not ok:
        raise cfgs.ConfigError(f"config.{field}={path!r}: no such {kind}")


def check_shared(config) -> None:
    """The fields every DiCap pipeline (classification, retrieval, VQA) has: seeds, foundation,
    shots, counterfactual generator, prompt and training."""
    if not config.seeds or not all(isinstance(s, int) and s >= 0 for s in config.seeds):
        raise cfgs.ConfigError(f"config.seeds={config.seeds!r} must be a non-empty list of integers >= 0")
    cfgs.check_choice(config, "foundation.kind", FOUNDATIONS)
    assets = config.foundation.assets
    if config.foundation.kind == "toy" and assets and not os.path.isdir(os.path.join(ASSETS, assets)):
        have = sorted(d for d in os.listdir(ASSETS) if os.path.isdir(os.path.join(ASSETS, d))) if os.path.isdir(ASSETS) else []
        raise cfgs.ConfigError(f"config.foundation.assets={assets!r}: no such folder in {ASSETS}; available: "
                               f"{', '.join(have) or 'none'}; or '' to pretrain the foundation models in the workdir")
    if config.foundation.kind == "pretrained":
        if config.data.name == "shapes":
            raise cfgs.ConfigError("config.foundation.kind='pretrained' needs real data (config.data.name)")
        for field in ("clip_checkpoint", "diffusion_checkpoint"):
            path = str(config.foundation[field])
            if path.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(path)):
                raise cfgs.ConfigError(f"config.foundation.{field}={path!r}: no such checkpoint folder")
    cfgs.check_int(config, "data.shots", 1)
    cfgs.check_range(config, "data.bias", 0.0, 1.0)
    res = config.data.resolution
    toy = config.foundation.kind == "toy"
    if toy:
        cfgs.check_choice(config, "foundation.cond_unet.init", COND_UNET_INITS)
        cfgs.check_int(config, "foundation.cond_unet.pool_examples", 1)
        if "context" in config.foundation.noise_classifier:
            cfgs.check_choice(config, "foundation.noise_classifier.context", (False, True))
    for field in ("data.object_size",) + (("foundation.generator_object_size", "foundation.cond_unet.object_size")
                                          if toy else ()):
        size = tuple(cfgs.get(config, field))
        if size and not (len(size) == 2 and all(isinstance(v, int) for v in size) and 1 <= size[0] <= size[1] <= res):
            raise cfgs.ConfigError(f"config.{field}={size!r} must be () or (min, max) pixels with "
                                   f"1 <= min <= max <= data.resolution ({res})")
    cf = config.counterfactual
    cfgs.check_range(config, "counterfactual.depth", 0.0, 1.0, low_open=True)
    cfgs.check_range(config, "counterfactual.scale", 0.0, math.inf)
    cfgs.check_int(config, "counterfactual.ddim_steps", 1)
    cfgs.check_int(config, "counterfactual.batch_size", 1)
    cfgs.check_choice(config, "counterfactual.target", CF_TARGETS)
    cfgs.check_choice(config, "counterfactual.guide_on", GUIDE_ON)
    cfgs.check_choice(config, "counterfactual.mask", CF_MASKS)
    if "normalize_gradient" in cf:
        cfgs.check_choice(config, "counterfactual.normalize_gradient", (False, True))
    cfgs.check_range(config, "counterfactual.mask_threshold", 0.0, math.inf, low_open=True)
    cfgs.check_int(config, "counterfactual.mask_dilation", 0)
    if cf.guide_on != "x0" and config.foundation.kind != "toy":
        what = "a noise-aware classifier" if cf.guide_on == "xt" else "a class-conditional diffusion model"
        raise cfgs.ConfigError(f"config.counterfactual.guide_on={cf.guide_on!r} needs {what}, which only "
                               "config.foundation.kind='toy' trains; use guide_on='x0' (CLIP on x0_hat)")
    T = config.foundation.schedule.num_train_timesteps
    if cf.ddim_steps > round(cf.depth * T) - 1:
        raise cfgs.ConfigError(f"config.counterfactual.ddim_steps={cf.ddim_steps} exceeds the {round(cf.depth * T)} "
                               f"timesteps available at depth {cf.depth} of T={T}")
    cfgs.check_int(config, "prompt.n_ctx", 1)
    cfgs.check_int(config, "train.steps", 1)
    cfgs.check_int(config, "train.batch_size", 1)
    cfgs.check_choice(config, "train.optimizer", OPTIMIZERS)
    cfgs.check_range(config, "train.learning_rate", 0.0, 10.0, low_open=True)
    cfgs.check_range(config, "train.lam", 0.0, math.inf)
    cfgs.check_range(config, "train.tau", 0.0, math.inf, low_open=True)
    cfgs.check_choice(config, "eval.ground_truth", (True, False))


def validate_task(config) -> None:
    """The retrieval and VQA pipelines: :func:`check_shared` plus their own fields."""
    check_shared(config)
    if config.foundation.kind == "toy" and config.data.name != "shapes":
        raise cfgs.ConfigError(f"config.data.name={config.data.name!r} needs config.foundation.kind='pretrained' "
                               "(the toy foundation knows only the shapes world)")
    cfgs.check_choice(config, "train.cf_filter", CF_FILTERS)
    if config.eval.ground_truth and config.data.name != "shapes":
        raise cfgs.ConfigError("config.eval.ground_truth=True needs a world that renders from factors "
                               "(config.data.name='shapes'); set it to False for real data")


def check_init_text(config, found) -> None:
    """``config.prompt.init_text`` must have ``config.prompt.n_ctx`` tokens in the foundation's tokenizer."""
    init_text = config.prompt.init_text
    if init_text:
        try:
            n = len(found.tokenizer.encode(init_text))
        except ValueError as e:
            raise cfgs.ConfigError(f"config.prompt.init_text={init_text!r}: {e}") from e
        if n != config.prompt.n_ctx:
            raise cfgs.ConfigError(f"config.prompt.init_text={init_text!r} has {n} tokens but config.prompt.n_ctx="
                                   f"{config.prompt.n_ctx}; make them agree, or set config.prompt.init_text='' for a "
                                   "random init")
