"""How far can DiCap's action step go with this generator? Unmasked, masked, and an oracle mask.

On the config's few-shot images (shapes world) this runs the config's abduction + action toward a
random other base class three ways and reads every result with the model-free judge
(``judge_shapes``): the plain guided action, the masked action of ``counterfactual.mask="edit"``
(the region the guidance edits, from the source's inversion trajectory elsewhere), and the same
action with an *oracle* mask (the source's and the target's silhouettes from the renderer, grown by
one pixel), the most any mask can give: if the oracle row does not flip, the generator cannot draw
the target shape and no choice of mask will fix it.

First, what the generator knows (a generator check with the same judge): each shot is noised to
level t by the forward process (one draw per shot and t), and the judge reads the shape of the
generator's one-step estimate x0_hat(x_t); next to it, an ideal reader of the same x_t (the judge on
x_t / sqrt(abar_t): the most probable shape given the other factors, no model). Where x0_hat no
longer shows the source shape, the source's shape is gone from x_t as far as this generator is
concerned, and an action that starts there has to draw a shape from the generator's prior; the
ideal reader says how much of the shape x_t still holds at all.

  python benchmarks/dicap_action.py --config=configs/dicap.py:toy --out=benchmarks/results/dicap_action_cpu.json

A control for the classifier (``--ideal_scales=1,3,10``): the same actions guided by the classifier
that knows the world, log p(y | x_t) from the forward process's Gaussian noise around each base
class's rendering with the shot's other factors (the ideal reader below, made differentiable). If
the generator draws the target with this guidance, the learned classifier was the limit; if not,
the generator is.

``--png=grid.png`` also saves the first 16 shots, their ground-truth counterfactuals and every action's
result as an image grid. Abduction depth and scales are the config's and the flag's:
``--config.counterfactual.depth=0.25 --scales=20,50,100,200``.
"""

import functools
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
_LEVELS = flags.DEFINE_list("levels", ["50", "100", "200", "300", "400", "500", "600"],
                            "noise levels t at which the judge reads x0_hat (empty: skip)")
_OUT = flags.DEFINE_string("out", "benchmarks/results/dicap_action_cpu.json", "JSON output")
_IDEAL = flags.DEFINE_list("ideal_scales", [], "guidance scales for the control with the ideal classifier "
                            "(log p(y | x_t) from the renderer and the forward process; empty: skip)")
_PNG = flags.DEFINE_string("png", "", "optional image grid of the first 16 shots: sources, ground-truth "
                           "counterfactuals, then one row per action and scale")


def main(argv):
    del argv
    from jaxcf.data.shapes import judge_shapes, render_shapes, with_shape
    from jaxcf.dicap.runs import anti_causal_log_prob
    from jaxcf.dicap.sources import few_shot_source
    from jaxcf.diffusion import ddim_invert, grow_mask, guided_denoise, predict_x0, q_sample
    from jaxcf.foundation import build_foundation, template_text_features
    from jaxcf.train import make_mesh
    from jaxcf.utils.images import save_grid

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
    _, target_mask = render_shapes(with_shape(factors, target), resolution=c.data.resolution)
    silhouettes = ((np.asarray(mask) > 0) | (np.asarray(target_mask) > 0))[..., None].astype(np.float32)
    oracle = np.asarray(grow_mask(jnp.asarray(silhouettes), 1))
    eps_fn = found.eps_fn(found.diffusion_params)

    renders = np.stack([render_shapes(with_shape(factors, np.full(len(factors), k)), resolution=c.data.resolution)[0]
                        for k in classes], 1).astype(np.float32) / 127.5 - 1  # [N, base classes, R, R, 3]

    def ideal_log_prob(r):
        """The classifier that knows the world: log p(y | x_t) of the forward process's Gaussian noise
        around sqrt(abar_t) x (each base class's rendering with the shot's other factors), uniform prior."""
        def log_prob(x, t, y):
            a = found.schedule.alphas_cumprod[t].reshape(-1, 1)
            d2 = jnp.sum((x[:, None] - jnp.sqrt(a)[..., None, None, None] * r) ** 2, axis=(2, 3, 4))
            logp = jax.nn.log_softmax(-d2 / (2 * (1 - a)), -1)
            return jnp.take_along_axis(logp, y[:, None], 1)[:, 0]
        return log_prob

    @functools.partial(jax.jit, static_argnums=5)
    def action(x, y, scale, fixed, how, ideal, r):  # how: 0 unmasked, 1 edit mask, 2 the fixed mask
        x_t, traj = ddim_invert(eps_fn, x, None, found.schedule, cf.ddim_steps, cf.depth, return_trajectory=True)
        kw = dict(guide_on="xt" if ideal else cf.guide_on, mask_threshold=cf.mask_threshold,
                  mask_dilation=cf.mask_dilation,
                  normalize_gradient=bool(cf.get("normalize_gradient", False)) and not ideal)
        lp = ideal_log_prob(r) if ideal else anti_causal_log_prob(
            found, cf, found.clip_params, found.noise_classifier_params, text, classes, source=x)
        run = lambda **k: guided_denoise(eps_fn, lp, x_t, None, y, scale, found.schedule,  # noqa: E731
                                         cf.ddim_steps, cf.depth, **kw, **k)
        return jax.lax.switch(how, [lambda: run(), lambda: run(source_trajectory=traj),
                                    lambda: run(source_trajectory=traj, mask=fixed)])

    @jax.jit
    def x0_hat(x, t, key):  # the generator's one-step estimate of x from the forward process at level t
        t = jnp.full((x.shape[0],), t)
        x_t = q_sample(found.schedule, x, t, jax.random.normal(key, x.shape))
        return x_t, predict_x0(x_t, eps_fn(x_t, t, None), found.schedule.alphas_cumprod[t])

    known = []
    if _LEVELS.value:
        print(f"{len(x)} shots: the source shape read by the judge from x0_hat(x_t)")
        print("| t | source shape read (judge on x0_hat) | L1 to the source | ideal reader (judge on x_t / sqrt(abar_t)) |")
        print("|---|---|---|---|")
    for t in (int(v) for v in _LEVELS.value):
        pairs = [x0_hat(jnp.asarray(x[i:i + cf.batch_size]), t, jax.random.fold_in(jax.random.key(t), i))
                 for i in range(0, len(x), cf.batch_size)]
        x_t = np.concatenate([np.asarray(p[0]) for p in pairs])
        est = np.clip(np.concatenate([np.asarray(p[1]) for p in pairs]), -1, 1)
        j = judge_shapes(est, factors, resolution=c.data.resolution)
        # The same x_t read without any model: nearest rendering of x_t / sqrt(abar) in L2 is the most
        # probable shape under the forward process's Gaussian noise, given the other factors (a ceiling)
        ideal = judge_shapes(x_t / np.sqrt(float(found.schedule.alphas_cumprod[t])), factors,
                             resolution=c.data.resolution)
        known.append({"t": t, "judge_source_shape": float(np.mean(j["shape"] == factors[:, 0])),
                      "l1": float(np.mean(np.abs(est - x))),
                      "ideal_source_shape": float(np.mean(ideal["shape"] == factors[:, 0]))})
        print(f"| {t} | {100 * known[-1]['judge_source_shape']:.1f} | {known[-1]['l1']:.3f} | "
              f"{100 * known[-1]['ideal_source_shape']:.1f} |", flush=True)

    rows = []
    truth, _ = render_shapes(with_shape(factors[:16], target[:16]), resolution=c.data.resolution)
    grid = [x[:16], truth.astype(np.float32) / 127.5 - 1]
    print(f"{len(x)} shots, guide_on={cf.guide_on}, depth {cf.depth}, {cf.ddim_steps} steps, "
          f"edit mask threshold {cf.mask_threshold}, dilation {cf.mask_dilation}"
          + (", normalized gradient" if cf.get("normalize_gradient") else ""))
    print("| action | s | flip to y_cf (judge) | shape kept (judge) | background L1 | object colour L1 |")
    print("|---|---|---|---|---|---|")
    for ideal, scale in [(False, float(v)) for v in _SCALES.value] + [(True, float(v)) for v in _IDEAL.value]:
        for how, name in enumerate(("unmasked", "edit mask", "oracle mask")):
            name = f"{name}, ideal classifier" if ideal else name
            out = []
            for i in range(0, len(x), cf.batch_size):
                sl = slice(i, i + cf.batch_size)
                out.append(np.asarray(action(jnp.asarray(x[sl]), jnp.asarray(y_cf[sl], jnp.int32), scale,
                                             jnp.asarray(oracle[sl]), how, ideal, jnp.asarray(renders[sl]))))
            x_cf = np.clip(np.concatenate(out), -1, 1)
            grid.append(x_cf[:16])
            j = judge_shapes(x_cf, factors, resolution=c.data.resolution)
            row = {"action": name, "ideal_classifier": ideal, "scale": scale,
                   "judge_flip_rate": float(np.mean(j["shape"] == target)),
                   "judge_kept_shape": float(np.mean(j["shape"] == factors[:, 0])),
                   "background_l1": float(np.mean(j["background_l1"])),
                   "object_color_l1": float(np.mean(j["object_color_l1"]))}
            rows.append(row)
            print(f"| {name} | {scale:g} | {100 * row['judge_flip_rate']:.1f} | {100 * row['judge_kept_shape']:.1f} | "
                  f"{row['background_l1']:.3f} | {row['object_color_l1']:.3f} |", flush=True)
    write_json(_OUT.value, {"config": c.to_dict(), "images": int(len(x)), "y_cf": "random other base class (rng 0)",
                            "x0_hat_known": known, "rows": rows})
    if _PNG.value:
        print("grid (rows: sources, ground truth, then each scale's unmasked / edit mask / oracle mask):",
              save_grid(grid, _PNG.value, scale=3))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
