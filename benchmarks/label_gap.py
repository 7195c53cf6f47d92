"""Does the class-conditional diffusion model use its label? (the generator of guide_on="implicit")

Implicit guidance can only redraw the shape if eps(x_t, y) depends on y. On the config's few-shot
images this noises each image to several t and measures the eps-MSE inside the object (the world's
mask) with the true shape label, a wrong one (shape + 3 mod 12) and the null label. A model that
has learned shape-conditional drawing has true < null < wrong at the middle t; equal columns mean
the label is ignored. The model is the config's ``foundation.cond_unet`` (shipped, or exported in
--workdir; trained there first if neither matches the config).

  python benchmarks/label_gap.py --config=configs/dicap.py:toy --workdir=workdirs/dicap_toy \
      --out=benchmarks/results/label_gap_shipped_cpu.json
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
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/jaxcf_label_gap", "where the foundation exports live")
_TIMES = flags.DEFINE_list("times", ["100", "300", "500", "700"], "diffusion steps t to noise to")
_OUT = flags.DEFINE_string("out", "benchmarks/results/label_gap_cpu.json", "JSON output")


def main(argv):
    del argv
    from jaxcf.data.shapes import SHAPE_NAMES
    from jaxcf.dicap.sources import few_shot_source
    from jaxcf.diffusion import q_sample
    from jaxcf.foundation import build_foundation
    from jaxcf.train import make_mesh

    c = _CONFIG.value
    c.counterfactual.guide_on = "implicit"  # the class-conditional model
    found = build_foundation(c, _WORKDIR.value, make_mesh())
    images, _, mask, factors = few_shot_source(c).fewshot(c.seed)
    x = np.asarray(images, np.float32)
    x = x / 127.5 - 1 if images.dtype == np.uint8 else x
    y = np.asarray(factors)[:, 0]  # the world's shape index (the model's labels)
    mask = np.asarray(mask, np.float32)[..., None]
    labels = {"true": y, "wrong": (y + 3) % len(SHAPE_NAMES), "null": np.full_like(y, found.null_class)}
    eps_fn = jax.jit(found.eps_fn(found.diffusion_params))
    rng = np.random.default_rng(0)
    rows = []
    print("| t | eps-MSE in the object, true label | wrong label | null label | (null - true) / null |")
    print("|---|---|---|---|---|")
    for t in (int(v) for v in _TIMES.value):
        eps = rng.normal(size=x.shape).astype(np.float32)
        tt = jnp.full((len(x),), t, jnp.int32)
        x_t = q_sample(found.schedule, jnp.asarray(x), tt, jnp.asarray(eps))
        row = {"t": t}
        for name, lab in labels.items():
            err = (np.asarray(eps_fn(x_t, tt, jnp.asarray(lab, jnp.int32))) - eps) ** 2
            row[name] = float(np.sum(err * mask) / (3 * mask.sum()))
        row["relative_gain"] = (row["null"] - row["true"]) / row["null"]
        rows.append(row)
        print(f"| {t} | {row['true']:.5f} | {row['wrong']:.5f} | {row['null']:.5f} | {row['relative_gain']:+.3f} |")
    write_json(_OUT.value, {"config": c.to_dict(), "images": int(len(x)), "rows": rows})


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
