"""How far can DiCap's action step go with this generator? Unmasked, masked, and an oracle mask.

On the config's few-shot images (shapes world) this runs the config's abduction + action toward a
random other base class three ways and reads every result with the model-free judge
(``judge_shapes``): the plain guided action, the masked action of ``counterfactual.mask="edit"``
(the region the guidance edits, from the source's inversion trajectory elsewhere), and the same
action with an *oracle* mask (the source's and the target's silhouettes from the renderer, grown by
one pixel), the most any mask can give: if the oracle row does not flip, the generator cannot draw
the target shape and no choice of mask will fix it.

  python benchmarks/dicap_action.py --config=configs/dicap.py:toy --out=benchmarks/results/dicap_action_cpu.json
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from common import write_json  # benchmarks/common.py (scripts run from their folder's path)

_CONFIG = config_flags.DEFINE_config_file("config", None, "DiCap config, e.g. configs/dicap.py:toy.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/jaxcf_dicap_action", "where the foundation exports live")
_SCALES = flags.DEFINE_list("scales", ["10", "20"], "guidance scales s")
_OUT = flags.DEFINE_string("out", "benchmarks/results/dicap_action_cpu.json", "JSON output")


def main(argv):
    del argv
    from jaxcf.data.shapes import judge_shapes, render_shapes, with_shape
    from jaxcf.dicap.runs import anti_causal_log_prob
    from jaxcf.dicap.sources import few_shot_source
    from jaxcf.diffusion import ddim_invert, grow_mask, guided_denoise
    from jaxcf.foundation import build_foundation, template_text_features
    from jaxcf.train import make_mesh

    c = _CONFIG.value
    cf = c.counterfactual
    if cf.guide_on == "implicit":
        raise app.UsageError("--config.counterfactual.guide_on must be 'xt' or 'x0' (a separate classifier)")
    found = build_foundation(c, _WORKDIR.value, make_mesh())
    images, _, mask, factors = few_shot_source(c).fewshot(c.seed)
    x = np.asarray(images, np.float32)
    x = x / 127.5 - 1 if images.dtype == np.uint8 else x
    factors = np.asarray(factors)
    classes = [found.class_index(n) for n in c.data.base_classes]  # world shape index of each base class
    src = np.array([classes.index(s) for s in factors[:, 0]])
    rng = np.random.default_rng(0)
    y_cf = (src + rng.integers(1, len(classes), len(src))) % len(classes)  # a random other base class
    target = np.asarray(classes)[y_cf]
    text = template_text_features(found, c.data.base_classes, cf.template, c.foundation.text_max_len)
    log_prob = anti_causal_log_prob(found, cf, found.clip_params, found.noise_classifier_params, text, classes)
    _, target_mask = render_shapes(with_shape(factors, target), resolution=c.data.resolution)
    silhouettes = ((np.asarray(mask) > 0) | (np.asarray(target_mask) > 0))[..., None].astype(np.float32)
    oracle = np.asarray(grow_mask(jnp.asarray(silhouettes), 1))
    eps_fn = found.eps_fn(found.diffusion_params)

    @jax.jit
    def action(x, y, scale, fixed, how):  # how: 0 unmasked, 1 edit mask, 2 the fixed mask
        x_t, traj = ddim_invert(eps_fn, x, None, found.schedule, cf.ddim_steps, cf.depth, return_trajectory=True)
        kw = dict(guide_on=cf.guide_on, mask_threshold=cf.mask_threshold, mask_dilation=cf.mask_dilation)
        run = lambda **k: guided_denoise(eps_fn, log_prob, x_t, None, y, scale, found.schedule,  # noqa: E731
                                         cf.ddim_steps, cf.depth, **kw, **k)
        return jax.lax.switch(how, [lambda: run(), lambda: run(source_trajectory=traj),
                                    lambda: run(source_trajectory=traj, mask=fixed)])

    rows = []
    print(f"{len(x)} shots, guide_on={cf.guide_on}, depth {cf.depth}, {cf.ddim_steps} steps, "
          f"edit mask threshold {cf.mask_threshold}, dilation {cf.mask_dilation}")
    print("| action | s | flip to y_cf (judge) | shape kept (judge) | background L1 | object colour L1 |")
    print("|---|---|---|---|---|---|")
    for scale in (float(v) for v in _SCALES.value):
        for how, name in enumerate(("unmasked", "edit mask", "oracle mask")):
            out = []
            for i in range(0, len(x), cf.batch_size):
                sl = slice(i, i + cf.batch_size)
                out.append(np.asarray(action(jnp.asarray(x[sl]), jnp.asarray(y_cf[sl], jnp.int32), scale,
                                             jnp.asarray(oracle[sl]), how)))
            x_cf = np.clip(np.concatenate(out), -1, 1)
            j = judge_shapes(x_cf, factors, resolution=c.data.resolution)
            row = {"action": name, "scale": scale, "judge_flip_rate": float(np.mean(j["shape"] == target)),
                   "judge_kept_shape": float(np.mean(j["shape"] == factors[:, 0])),
                   "background_l1": float(np.mean(j["background_l1"])),
                   "object_color_l1": float(np.mean(j["object_color_l1"]))}
            rows.append(row)
            print(f"| {name} | {scale:g} | {100 * row['judge_flip_rate']:.1f} | {100 * row['judge_kept_shape']:.1f} | "
                  f"{row['background_l1']:.3f} | {row['object_color_l1']:.3f} |", flush=True)
    write_json(_OUT.value, {"config": c.to_dict(), "images": int(len(x)), "y_cf": "random other base class (rng 0)",
                            "rows": rows})


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
