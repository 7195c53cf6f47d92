"""DiCap for image-text retrieval: CoOp-style context in front of the captions, counterfactual
images as hard negatives of their captions (METHODS.md §1, the paper's retrieval table).

Variants (after the colon):
  toy   the embedded default: the shapes world's captions ("a red star on a blue background"),
        16 few-shot images per base shape with the background shortcut in 90% of them, the toy
        foundation of configs/dicap.py (shipped weights in jaxcf/assets/shapes_toy). Reports
        recall@1/5/10 both ways on a held-out set (all 12 shapes, uniform backgrounds) and a
        bias-conflicting set, zero-shot / CoOp / DiCap / DiCap with ground-truth counterfactuals,
        3 seeds.
  test  the smallest run that exercises every stage (CI), from the shipped weights.
  coco, flickr30k: Karpathy splits (dataset_coco.json / dataset_flickr30k.json + the image
        folder; coco_tfds reads tfds coco_captions from config.data.data_dir), CLIP ViT-B/16 and
        Stable Diffusion v1-4 (hub ids in config.foundation.*_checkpoint). Not run here (no GPU,
        no downloads).

Run it:
  locally:   python -m jaxcf.main --config=configs/retrieval.py:toy --workdir=workdirs/retrieval_toy
  variants:  --config.train.lam=0.5  --config.counterfactual.scale=10  --config.seeds='(0,1,2,3)'
  GPU host:  python -m jaxcf.main --config=configs/retrieval.py:coco --config.data.split_file=$DATA/dataset_coco.json \
               --config.data.image_root=$DATA/coco --workdir=$HOME/runs/retrieval_coco
"""

import os

import ml_collections

from jaxcf.configs import config_file, select_variant


def toy(c):
    pass  # the defaults below are the toy world


def test(c):
    c.data.update(shots=2, test_per_class=3)
    c.counterfactual.update(ddim_steps=3, batch_size=12)
    c.train.update(steps=6, batch_size=8, warmup_steps=1)
    c.seeds = (0,)
    c.checkpoint_every = 3
    c.log_every = 3


def paper(name):
    def apply(c):
        files = {"coco": "dataset_coco.json", "flickr30k": "dataset_flickr30k.json"}
        c.data.update(name="tfds:coco_captions" if name == "coco_tfds" else "karpathy", resolution=512,
                      split_file=files.get(name, ""), shots=1000, train_split="train+restval" if name != "flickr30k"
                      else "train", test_split="test", test_images=0, relevance="pair", object_size=())
        c.foundation.kind = "pretrained"
        c.counterfactual.update(scale=10.0, depth=0.6, ddim_steps=50, batch_size=8, guide_on="x0", template="{}")
        c.prompt.zero_shot_template = "{}"
        c.train.update(steps=2000, batch_size=128, optimizer="sgd", learning_rate=2e-3, warmup_steps=50, tau=1.0)
        c.seeds = (1, 2, 3)
        c.dtype = "bfloat16"
        c.eval.ground_truth = False  # needs a world that renders from factors
    return apply


def get_config(arg=None):
    c = config_file(os.path.join(os.path.dirname(__file__), "dicap.py"), "toy")  # same foundation, generator, action, prompt
    c.train.lam = 1.0  # the classification toy's lambda 30 was chosen for classification; these tasks keep 1
    c.pipeline = "retrieval"
    c.data = ml_collections.ConfigDict(dict(
        name="shapes",  # or "karpathy" (split_file + image_root) or "tfds:coco_captions" (data_dir)
        resolution=32,
        shots=16,  # shapes: images per base shape; karpathy / tfds: training images (all their captions)
        bias=0.9, test_per_class=20,  # shapes: spurious fraction of the shots; test images per shape
        object_size=(7, 11),  # shapes: the task domain's object sizes (CLIP pretrained on 13-21 px)
        split_file="", image_root="", data_dir="", train_split="train", test_split="test",
        test_images=0,  # karpathy / tfds: test images (0 = the whole split)
        relevance="text",  # "text": a caption is correct for every image with the same caption (shapes); "pair"
    ))
    c.prompt = ml_collections.ConfigDict(dict(n_ctx=4, init_text="a photo of a",
                                              zero_shot_template="{}"))  # zero-shot: the caption itself
    del c.train["all_classes"]
    # which generated counterfactuals are hard negatives: "none" = all, "clip_flip" = those frozen
    # CLIP zero-shot assigns to their target y_cf
    c.train.cf_filter = "none"
    c.eval = ml_collections.ConfigDict(dict(ground_truth=True, ks=(1, 5, 10)))
    variants = {"toy": toy, "test": test, **{k: paper(k) for k in ("coco", "flickr30k", "coco_tfds")}}
    return select_variant(arg, variants, c, default="toy")
