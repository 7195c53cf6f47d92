"""DiDAE + CFKD: gradient-free counterfactuals from a diffusion autoencoder, and shortcut repair.

Stages (METHODS.md §2-3): a frozen encoder Phi (a Square encoder trained on the 8 attributes, or
CLIP's image tower), a DiffAE decoder eps(x_t, t, z) trained with eps-MSE, Procrustes and SVD
dictionaries on held-out codes, a poisoned student, Algorithm 2 counterfactuals (all K atoms
decoded in one call), preclustered and model teachers, CFKD fine-tuning on a 50/50 mix, the
projection baseline, and the metrics (AGA, worst group, Gain, flip rate, NAFR, CF/s,
disentanglement matrix from an oracle factor regressor).

Variants (after the colon):
  square_tiny  the embedded default: Square at 32 px, a 0.3M-parameter DiffAE decoder and a small
               encoder (shipped in jaxcf/assets/square_tiny, trained by this same config with
               --config.foundation.assets='' in about half an hour on a 2-core CPU), a ResNet-18
               (width 1/4) student. Every later stage runs for real in a few minutes.
  square       the paper's settings: 64 px, DiffAE width 64, mult (1,2,4,8), 2 res blocks,
               attention at 16 px, Adam 1e-4, EMA 0.9999, batch 100, 4k decoder steps, N = 1000,
               p = 0.02, 20 + 20 DDIM steps, full ResNet-18 student. A GPU/TPU run (days on a CPU).
  celeba       tfds celeb_a, Blond_Hair confounded with Male, CLIP ViT-B/32 as Phi, 128 px.
  test         the smallest run that exercises every stage (CI).

Run it:
  locally:   python -m jaxcf.main --config=configs/didae.py:square_tiny --workdir=workdirs/didae_tiny
  retrain the shipped encoder/decoder:  ... --config.foundation.assets=''
  GPU host:  pip install -e '.[cuda]' && python -m jaxcf.main --config=configs/didae.py:square --workdir=$HOME/runs/didae_square
  TPU VM:    launch/tpu_vm.sh --config=configs/didae.py:square --workdir=gs://$BUCKET/didae_square ...
  CelebA:    python -m jaxcf.main --config=configs/didae.py:celeba --config.data.data_dir=$TFDS --workdir=$HOME/runs/didae_celeba
"""

import ml_collections

from jaxcf.configs import base_config, select_variant

SQUARE_FACTORS = ("ColorA", "ColorB", "PositionX", "PositionY")


def square_tiny(c):
    pass  # the defaults below


def square(c):
    c.foundation.assets = ""
    c.data.update(resolution=64, num_test_per_group=400, unbiased_samples=4000)
    c.encoder.update(embed_dim=512, width=32, num_stages=4, steps=2000, batch_size=100)
    c.decoder.update(preset="square", model_channels=64, channel_mult=(1, 2, 4, 8), num_res_blocks=2,
                     attention_resolutions=(16,), norm_groups=32)
    c.decoder.update(standardize_z=False, coord_channels=False)  # the official code feeds z raw
    c.decoder.train.update(steps=4000, batch_size=100, learning_rate=1e-4, warmup_steps=0, ema_decay=0.9999,
                           weights="ema", prediction="eps", zero_cond=False)
    c.student.update(width=1.0, steps=2000, batch_size=100)
    c.surrogate.steps = 2000
    c.oracle.update(steps=2000, width=32, num_stages=4)
    c.cfkd.update(num_inputs=800, steps=1000, batch_size=100)
    c.edit.update(min_alignment=0.0, coef_quantile=0.0, residual=False)  # Algorithm 2 as published
    c.eval.update(num_inputs=200, batch_size=100)
    c.checkpoint_every = 500


def celeba(c):
    c.foundation.assets = ""
    c.data = ml_collections.ConfigDict(dict(
        name="celeba", tfds_name="celeb_a", data_dir="", resolution=128, label_attribute="Blond_Hair",
        confounder_attribute="Male", factors=("Blond_Hair", "Male", "Smiling", "Eyeglasses"),
        num_samples=4000, agree_fraction=0.02, val_fraction=0.2, num_test_per_group=200, unbiased_samples=20000,
        seed=0))
    c.encoder = ml_collections.ConfigDict(dict(kind="clip", checkpoint="openai/clip-vit-base-patch32"))
    c.decoder.update(coord_channels=False)
    c.decoder.update(preset="square", resolution=128, model_channels=64, channel_mult=(1, 1, 2, 3, 4),
                     num_res_blocks=2, attention_resolutions=(16,), norm_groups=32)
    c.decoder.train.update(steps=20000, batch_size=64, learning_rate=1e-4, warmup_steps=0, ema_decay=0.9999,
                           weights="ema")
    c.dictionary.factors = ("Blond_Hair", "Male", "Smiling", "Eyeglasses")
    c.cfkd.true_factor = "Blond_Hair"
    c.student.update(width=1.0, steps=3000, batch_size=64)
    c.surrogate.steps = 3000
    c.oracle.update(steps=3000, width=32, num_stages=5)
    c.cfkd.update(num_inputs=1000, steps=1000, batch_size=64, ground_truth=False)
    c.eval.controls = False
    c.eval.update(num_inputs=200, batch_size=64)
    c.checkpoint_every = 500
    c.edit.update(coef_quantile=0.0, residual=False)  # Algorithm 2 as published


def test(c):
    c.foundation.assets = ""
    c.data.update(resolution=16, num_samples=200, num_test_per_group=8, unbiased_samples=64)
    c.dictionary.fit_examples = 64
    c.encoder.update(embed_dim=8, width=4, num_stages=2, steps=3, batch_size=16)
    c.decoder.update(preset="tiny", resolution=16, model_channels=8, channel_mult=(1, 2), norm_groups=4,
                     attention_resolutions=(8,))
    c.decoder.train.update(steps=3, batch_size=16, warmup_steps=1)
    c.ddim_steps = 3
    c.student.update(width=0.0625, steps=3, batch_size=16)
    c.surrogate.steps = 2
    c.oracle.update(steps=3, width=4, num_stages=2, batch_size=16)
    c.cfkd.update(num_inputs=8, steps=2, batch_size=16)
    c.eval.update(num_inputs=4, batch_size=8, grid_examples=3)
    c.checkpoint_every = 2
    c.log_every = 1


def get_config(arg=None):
    c = base_config("didae")
    c.log_every = 50
    # "square_tiny": encoder + decoder shipped in jaxcf/assets/<assets> (used when the config
    # they were made with matches); "" trains them in the workdir (resumable).
    c.foundation = ml_collections.ConfigDict(dict(assets="square_tiny", seed=0))
    c.data = ml_collections.ConfigDict(dict(
        name="square", resolution=32, num_samples=1000, agree_fraction=0.02, val_fraction=0.2,
        num_test_per_group=200, unbiased_samples=4000, factors=SQUARE_FACTORS, seed=0))
    # Phi: "square" (a CNN trained here on the 8 Square attributes) or "clip" (a CLIP image tower).
    c.encoder = ml_collections.ConfigDict(dict(kind="square", embed_dim=32, width=16, num_stages=3, steps=1500,
                                               batch_size=64, learning_rate=2e-3))
    # standardize_z: condition on (Phi(x) - mean) / std of the pool (DiffAE's normalisation; the
    # dictionaries and edits work in that space); clip_x0: clamp x0_hat to [-1, 1] in every DDIM
    # step (as the official code). train.prediction: what the UNet outputs ("eps", "v", "x0"; v
    # gives usable x0 estimates at the top of the chain, where eps needs a 1/sqrt(abar) ~ 160x
    # amplification); train.zero_cond: the semantic projections start at zero.
    c.decoder = ml_collections.ConfigDict(dict(
        preset="square_tiny", model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
        attention_resolutions=(8,), norm_groups=8, coord_channels=True, standardize_z=True, clip_x0=True,
        # weights: "final" (the last iterate) or "ema" (the average, as the paper; shipped)
        train=dict(steps=7000, batch_size=32, learning_rate=1e-3, warmup_steps=100, ema_decay=0.999,
                   weights="ema", prediction="v", zero_cond=True)))
    c.schedule = ml_collections.ConfigDict(dict(name="linear", num_train_timesteps=1000, beta_start=1e-4,
                                                beta_end=0.02))
    c.ddim_steps = 20  # inversion and decoding (METHODS §2.3)
    # Procrustes atoms are fitted to the factor halves (+-1/2, one atom per factor); SVD takes the
    # top-K right singular vectors of the same held-out codes.
    c.dictionary = ml_collections.ConfigDict(dict(kinds=("procrustes", "svd"), num_atoms=4, factors=SQUARE_FACTORS,
                                                  fit_examples=1000))
    # Algorithm 2; min_alignment skips atoms whose cosine with the probe is below it (their edits
    # would be lam |w.z| / (|w| cos) long, far off the codes). jaxcf additions, off in the paper
    # variants: coef_quantile > 0 clips the edited atom coefficient to the [q, 1 - q] quantiles of the
    # fit codes' (Algorithm 2 otherwise pushes it 2-5x past any code the decoder has seen);
    # residual adds the decoded change to the input, x + D(x_T, z') - D(x_T, z)
    c.edit = ml_collections.ConfigDict(dict(lam=2.0, guard=1e-6, min_alignment=0.1, coef_quantile=0.01,
                                            residual=True))
    # ResNet-18 with the ImageNet stem (7x7/2 conv + max-pool), width 1/4: 0.7M parameters.
    c.student = ml_collections.ConfigDict(dict(kind="resnet18", width=0.25, stem="imagenet", steps=200, batch_size=64,
                                               learning_rate=1e-3))
    c.surrogate = ml_collections.ConfigDict(dict(steps=200, adv_eps=0.06))  # FGSM radius, images in [-1, 1]
    # every classifier run (encoder, student, surrogate, oracle, CFKD): Adam after clipping the
    # gradient norm at 1, linear warmup over this fraction of its steps (at least one), cosine
    # decay to end_fraction of its learning rate
    c.optim = ml_collections.ConfigDict(dict(warmup_fraction=0.05, end_fraction=0.05))
    # classifier inits draw from jax.random.key(seed + offset)
    c.seed_offsets = ml_collections.ConfigDict(dict(student=10, surrogate=11, oracle=12))
    c.oracle = ml_collections.ConfigDict(dict(steps=400, width=16, num_stages=3, batch_size=64,
                                              learning_rate=2e-3))
    # add_true: also add the "true" counterfactuals (with the flipped label); the official code adds
    # only the "false" ones, with their source label. ground_truth: also run CFKD on perfect
    # counterfactuals (inputs re-rendered with one factor moved; Square only), the loop's upper bound.
    c.cfkd = ml_collections.ConfigDict(dict(teachers=("preclustered", "model"), true_factor="ColorA", num_inputs=192,
                                            mix=0.5, only_flipped=True, add_true=False, ground_truth=True,
                                            steps=400, batch_size=64, learning_rate=2e-3))
    # controls: identity / fresh-noise / ground-truth-swap checks of the autoencoder (Square only; other
    # data have no renderer and skip them, as they skip cfkd.ground_truth)
    # encode_batch_size: codes are computed in batches of max(batch_size, encode_batch_size)
    c.eval = ml_collections.ConfigDict(dict(num_inputs=32, batch_size=32, grid_examples=6, controls=True,
                                            encode_batch_size=64))
    return select_variant(arg, {"square_tiny": square_tiny, "square": square, "celeba": celeba, "test": test}, c,
                          default="square_tiny")
