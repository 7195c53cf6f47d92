"""What DiCap's estimation stage can reach on the shapes world with perfect counterfactuals.

Everything runs on frozen CLIP features of the shipped toy foundation (no generation), 3 seeds:
CoOp on the config's shots and on near-uniform shots (how much of CoOp's bias-conflicting gap the
few-shot shortcut accounts for), DiCap's L_cf with ground-truth counterfactuals (the shots
re-rendered with the shape set to y_cf), two variants that use those counterfactuals more directly
(as extra training examples labelled y_cf; a symmetric L_cf where t_{y_cf} also prefers x_cf over
x), and a linear probe on many near-uniform images (what the image features carry). Prompt training
follows configs/dicap.py:toy (AdamW, warmup-cosine, M = 4 shared context vectors, lambda, tau).
Prints a table and writes JSON.

  python benchmarks/dicap_ceiling.py --out=benchmarks/results/dicap_ceiling_cpu.json
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import dicap_toy, write_json  # benchmarks/common.py (scripts run from their folder's path)


def main():
    from jaxcf.data.shapes import render_shapes, with_shape
    from jaxcf.dicap.counterfactuals import sample_target_classes
    from jaxcf.dicap.estimation import PromptSetup
    from jaxcf.dicap.losses import class_cosines, counterfactual_contrastive_loss
    from jaxcf.dicap.prompts import init_prompt_params, prompt_text_features
    from jaxcf.dicap.sources import few_shot_source
    from jaxcf.foundation import encode_images, template_text_features

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--target", default="random", choices=("random", "similarity"), help="how y_cf is drawn")
    ap.add_argument("--uniform_bias", type=float, default=0.17, help="shots on their class's background (1/6: uniform)")
    ap.add_argument("--workdir", default="/tmp/jaxcf_ceiling")
    ap.add_argument("--out", default="benchmarks/results/dicap_ceiling_cpu.json")
    args = ap.parse_args()
    c, mesh, found = dicap_toy(args.workdir)
    tc = c.train
    src = few_shot_source(c)
    max_len = found.clip.config.text.max_position_embeddings
    tests = src.tests()
    feats = {k: encode_images(found, x, mesh=mesh) for k, (x, _) in tests.items()}
    names = {"base": src.base_names, "novel": src.novel_names, "conflict": src.base_names}
    setups = {k: PromptSetup(found, names[k], c.prompt.n_ctx, max_len) for k in ("base", "novel")}
    zs = template_text_features(found, src.base_names, c.counterfactual.template, max_len)
    scale = found.clip.logit_scale(found.clip_params)
    setup = setups["base"]

    def accuracies(text_of):
        out = {k: float(np.mean(np.argmax(np.asarray(class_cosines(jnp.asarray(feats[k]), text_of(k))), -1) == tests[k][1]))
               for k in tests}
        out["hm"] = 2 * out["base"] * out["novel"] / (out["base"] + out["novel"])
        return out

    def train(f_x, y, f_cf, y_cf, terms, seed):
        pp = init_prompt_params(jax.random.key(seed), found.clip, found.clip_params, found.tokenizer,
                                len(setup.tmpl.token_ids), c.prompt.n_ctx, c.prompt.init_text, "unified")
        tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, tc.warmup_steps, tc.steps),
                         weight_decay=tc.weight_decay)

        def loss(pp, fx, yy, fcf, ycf):
            t = prompt_text_features(found.clip, found.clip_params, pp, setup.base, setup.tmpl, None)
            ce = lambda f, lab: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(scale * class_cosines(f, t), lab))  # noqa: E731
            total = ce(fx, yy)
            if "l_cf" in terms:  # the paper's term: t_y prefers x over x_cf
                total += tc.lam * counterfactual_contrastive_loss(fx, fcf, t, yy, tc.tau)
            if "symmetric" in terms:  # and t_{y_cf} prefers x_cf over x
                total += tc.lam * counterfactual_contrastive_loss(fcf, fx, t, ycf, tc.tau)
            if "augment" in terms:  # x_cf as a training example of class y_cf
                total += tc.lam * ce(fcf, ycf)
            return total

        @jax.jit
        def step(pp, st, *batch):
            g = jax.grad(loss)(pp, *batch)
            u, st = tx.update(g, st, pp)
            return optax.apply_updates(pp, u), st

        st = tx.init(pp)
        rng = np.random.default_rng(seed)
        for _ in range(tc.steps):
            i = rng.choice(len(y), tc.batch_size, replace=False)
            pp, st = step(pp, st, f_x[i], y[i], f_cf[i], y_cf[i])
        return accuracies(lambda k: setups["novel" if k == "novel" else "base"].text_features(found, found.clip_params, pp))

    rows = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        x, y, _, factors = src.fewshot(seed)
        y_cf = np.asarray(sample_target_classes(jnp.asarray(y), zs, args.target, jax.random.key(seed + 17)))
        x_gt, _ = render_shapes(with_shape(factors, src.shape_of(y_cf)), resolution=c.data.resolution)
        f_x = encode_images(found, x, mesh=mesh)
        f_gt = encode_images(found, x_gt.astype(np.float32) / 127.5 - 1, mesh=mesh)
        ds = src._split("fewshot", seed=seed, shots=c.data.shots, bias=args.uniform_bias)
        u = ds.get(np.arange(len(ds)), keys=("image", "label"))
        f_u = encode_images(found, u["image"], mesh=mesh)
        y_u = u["label"].astype(np.int32)
        runs = {"CoOp": (f_x, y, f_gt, y_cf, ()),
                f"CoOp, near-uniform shots (bias {args.uniform_bias})": (f_u, y_u, f_u, y_u, ()),
                "DiCap L_cf, ground-truth counterfactuals": (f_x, y, f_gt, y_cf, ("l_cf",)),
                "symmetric L_cf, ground truth": (f_x, y, f_gt, y_cf, ("symmetric",)),
                "counterfactual augmentation, ground truth": (f_x, y, f_gt, y_cf, ("augment",))}
        for name, (a, b, cc, d, terms) in runs.items():
            rows.setdefault(name, []).append(train(a, b.astype(np.int32), cc, d.astype(np.int32), terms, seed))
        print(f"seed {seed} done", flush=True)
    # linear probe on 200 near-uniform images per base class (a pure function of the features)
    ds = src._split("fewshot", seed=5, shots=200, bias=args.uniform_bias)
    u = ds.get(np.arange(len(ds)), keys=("image", "label"))
    norm = lambda f: f / np.linalg.norm(f, axis=-1, keepdims=True)  # noqa: E731
    f_u, y_u = norm(encode_images(found, u["image"], mesh=mesh)), u["label"]
    C = len(src.base_names)
    params = (jnp.zeros((f_u.shape[1], C)), jnp.zeros(C))
    opt = optax.adam(1e-2)
    ost = opt.init(params)
    probe_loss = lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(30 * f_u @ p[0] + p[1], y_u))  # noqa: E731
    for _ in range(2000):
        u_, ost = opt.update(jax.grad(probe_loss)(params), ost)
        params = optax.apply_updates(params, u_)
    probe = {k: float(np.mean(np.argmax(30 * norm(feats[k]) @ params[0] + params[1], -1) == tests[k][1]))
             for k in ("base", "conflict")}
    print("\n| method (3 seeds, %) | base | novel | HM | bias-conflicting |\n|---|---|---|---|---|")
    summary = {}
    for name, rs in rows.items():
        summary[name] = {m: (100 * np.mean([r[m] for r in rs]), 100 * np.std([r[m] for r in rs], ddof=1))
                         for m in ("base", "novel", "hm", "conflict")}
        print(f"| {name} | " + " | ".join(f"{summary[name][m][0]:.1f} ± {summary[name][m][1]:.1f}"
                                           for m in ("base", "novel", "hm", "conflict")) + " |")
    print(f"| linear probe, 200 near-uniform images per class | {100 * probe['base']:.1f} | - | - | "
          f"{100 * probe['conflict']:.1f} |")
    write_json(args.out, {"target": args.target, "uniform_bias": args.uniform_bias, "per_seed": rows,
                          "summary": summary, "linear_probe": probe})


if __name__ == "__main__":
    main()
