"""DiCap for visual question answering: CLIP scores (question, answer) statements behind a learned
prompt context; counterfactual images whose answer changed are hard negatives (METHODS.md §1,
the paper's VQA table; CPL's statement scoring).

Variants (after the colon):
  toy   the embedded default: the shapes world, 16 few-shot images per base shape (background
        shortcut in 90%), each asked what shape, object colour, background colour, size and
        position; statements in the toy CLIP's words ("a photo of a star", "at the top left");
        the toy foundation of configs/dicap.py (shipped weights). Reports VQA accuracy overall
        and per question type on a held-out and a bias-conflicting set, zero-shot / CoOp /
        DiCap / DiCap with ground-truth counterfactuals, 3 seeds.
  test  the smallest run that exercises every stage (CI), from the shipped weights.
  vqav2 VQA v2 (v2_OpenEnded_mscoco_{train,val}2014_questions.json + annotations + COCO image
        folders), top-3129 answers, CLIP ViT-B/16 and Stable Diffusion v1-4 (hub ids in
        config.foundation.*_checkpoint). Not run here (no GPU, no downloads).

Run it:
  locally:   python -m jaxcf.main --config=configs/vqa.py:toy --workdir=workdirs/vqa_toy
  variants:  --config.train.lam=0.5  --config.data.question_types='("shape","color")'
  GPU host:  python -m jaxcf.main --config=configs/vqa.py:vqav2 --config.data.train_questions=$VQA/v2_OpenEnded_mscoco_train2014_questions.json \
               --config.data.train_annotations=$VQA/v2_mscoco_train2014_annotations.json --config.data.train_images=$COCO/train2014 \
               --config.data.test_questions=$VQA/v2_OpenEnded_mscoco_val2014_questions.json \
               --config.data.test_annotations=$VQA/v2_mscoco_val2014_annotations.json --config.data.test_images=$COCO/val2014 \
               --workdir=$HOME/runs/vqav2
"""

import os

import ml_collections

from jaxcf.configs import config_file, select_variant


def toy(c):
    pass  # the defaults below are the toy world


def test(c):
    c.data.update(shots=2, test_per_class=2)
    c.counterfactual.update(ddim_steps=3, batch_size=12)
    c.train.update(steps=6, batch_size=8, warmup_steps=1)
    c.seeds = (0,)
    c.checkpoint_every = 3
    c.log_every = 3


def vqav2(c):
    c.data.update(name="vqa_v2", resolution=512, shots=10000, top_k=3129, test_questions_max=20000, object_size=())
    c.foundation.kind = "pretrained"
    c.counterfactual.update(scale=10.0, depth=0.6, ddim_steps=50, batch_size=8, guide_on="x0",
                            template="a photo of {}.")
    c.train.update(steps=2000, batch_size=128, optimizer="sgd", learning_rate=2e-3, warmup_steps=50, tau=1.0)
    c.seeds = (1, 2, 3)
    c.dtype = "bfloat16"
    c.eval.ground_truth = False  # needs a world that renders from factors


def get_config(arg=None):
    c = config_file(os.path.join(os.path.dirname(__file__), "dicap.py"), "toy")  # same foundation, generator, action, prompt
    c.train.lam = 1.0  # the classification toy's lambda 30 was chosen for classification; these tasks keep 1
    c.pipeline = "vqa"
    c.data = ml_collections.ConfigDict(dict(
        name="shapes",  # or "vqa_v2"
        resolution=32,
        shots=16,  # shapes: images per base shape (each asked every question type); vqa_v2: training questions
        bias=0.9, test_per_class=20,  # shapes: spurious fraction of the shots; test images per shape
        # shapes: object sizes from the task domain's small ones (7 px) to the pretraining's large
        # ones (21 px), so that "how big is the shape?" has both answers (small <= 17 px)
        object_size=(7, 21),
        question_types=(),  # shapes: () = shape, color, background, size, position
        # vqa_v2: question / annotation JSON and image folders; vocab: a .json list or text file of
        # answers ("" = the top_k most frequent training answers)
        train_questions="", train_annotations="", train_images="",
        test_questions="", test_annotations="", test_images="", vocab="", top_k=3129,
        test_questions_max=0,  # vqa_v2: a random subset of the test questions (0 = all)
    ))
    c.prompt = ml_collections.ConfigDict(dict(
        n_ctx=4, init_text="a photo of a",
        zero_shot_template="{}",  # zero-shot: the statement as written
        # vqa_v2: the statement of (question type, answer) ({question} = the annotations' question_type,
        # e.g. "what color is the"); the shapes world uses jaxcf.data.shapes_tasks.STATEMENTS
        statement="{question} {answer}"))
    del c.train["all_classes"]
    # which generated counterfactuals are hard negatives: "none" = all, "clip_flip" = those frozen
    # CLIP zero-shot assigns to their target y_cf
    c.train.cf_filter = "none"
    c.eval = ml_collections.ConfigDict(dict(ground_truth=True))
    return select_variant(arg, {"toy": toy, "test": test, "vqav2": vqav2}, c, default="toy")
