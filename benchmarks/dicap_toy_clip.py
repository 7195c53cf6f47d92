"""What the shapes world's tiny CLIP knows zero-shot, per prompt template.

Accuracy of the toy foundation's CLIP (shipped, or trained in --workdir when the config differs) on
clean world shapes: base and novel classes on uniform backgrounds and base classes on another base
class's background (bias-conflicting), at the pretraining object sizes and at the few-shot task's
(configs/dicap.py:toy data.object_size), with "a photo of a {}." (the zero-shot template and the
prompts' init), "a drawing of a {}." and "a {}.". Prints a table and writes JSON.

  python benchmarks/dicap_toy_clip.py --out=benchmarks/results/dicap_toy_clip_cpu.json
"""

from __future__ import annotations

import argparse

from common import dicap_toy, write_json  # benchmarks/common.py (scripts run from their folder's path)

TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "a {}.")
SPLITS = {"test_base": "base", "test_novel": "novel", "test_conflict": "bias-conflicting"}


def main():
    from jaxcf.data.common import to_model_range
    from jaxcf.data.shapes import shapes_dataset
    from jaxcf.dicap.losses import class_cosines
    from jaxcf.dicap.metrics import accuracy
    from jaxcf.foundation import encode_images, template_text_features

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per_class", type=int, default=200, help="test images per class")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--workdir", default="/tmp/jaxcf_toy_clip")
    ap.add_argument("--out", default="benchmarks/results/dicap_toy_clip_cpu.json")
    args = ap.parse_args()
    c, mesh, found = dicap_toy(args.workdir)
    max_len = found.clip.config.text.max_position_embeddings
    sizes = {"pretraining sizes": None, f"task sizes {tuple(c.data.object_size)}": tuple(c.data.object_size)}
    rows = []
    for size_name, size in sizes.items():
        for split, split_name in SPLITS.items():
            ds = shapes_dataset(split, num_per_class=args.per_class, seed=args.seed, object_size=size,
                                resolution=c.data.resolution)
            f = encode_images(found, to_model_range(ds.arrays["image"]), mesh=mesh)
            row = dict(objects=size_name, split=split_name)
            for tmpl in TEMPLATES:
                t = template_text_features(found, list(ds.class_names), tmpl, max_len)
                row[tmpl] = accuracy(class_cosines(f, t), ds.arrays["label"])
            rows.append(row)
            print(row, flush=True)
    print(f"\nzero-shot accuracy (%), {args.per_class} images per class\n")
    print("| objects | test set | " + " | ".join(f'"{t}"' for t in TEMPLATES) + " |")
    print("|---|---|" + "---|" * len(TEMPLATES))
    for r in rows:
        print(f"| {r['objects']} | {r['split']} | " + " | ".join(f"{100 * r[t]:.1f}" for t in TEMPLATES) + " |")
    write_json(args.out, dict(per_class=args.per_class, seed=args.seed, rows=rows))


if __name__ == "__main__":
    main()
