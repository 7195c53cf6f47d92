"""Pixel DDPM on Square, then DDIM abduction (invert -> sample) checked on it.

Variants (after the colon):
  square_tiny  32 px Square, a ~0.3M-parameter UNet, 400 steps (a few minutes on a 2-core CPU).
  square       64 px Square, the DiffAE-size widths (64, 128, 256, 512), 20k steps: a GPU/TPU run.
  test         the smallest thing that exercises every stage (CI).

Run it:
  locally:   python -m jaxcf.main --config=configs/diffusion.py:square_tiny --workdir=/tmp/jaxcf/diffusion
  GPU host:  pip install -e '.[cuda]' && python -m jaxcf.main --config=configs/diffusion.py:square --workdir=$HOME/runs/diffusion
  TPU VM:    pip install -e '.[tpu]' && python -m jaxcf.main --config=configs/diffusion.py:square --workdir=gs://$BUCKET/diffusion
"""

import ml_collections

from jaxcf.configs import base_config, select_variant


def _unet(widths, attn_last=True, groups=8):
    n = len(widths)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attn_last:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return dict(in_channels=3, out_channels=3, block_out_channels=tuple(widths), layers_per_block=1,
                down_block_types=tuple(down), up_block_types=tuple(up), attention_head_dim=8, norm_num_groups=groups)


def square_tiny(c):
    c.data.kwargs.resolution = 32
    c.model.config = _unet((32, 64, 64))
    c.train.steps = 400
    c.train.batch_size = 32


def square(c):
    c.data.kwargs.resolution = 64
    c.model.config = dict(_unet((64, 128, 256, 512), groups=32), layers_per_block=2)
    c.train.steps = 20000
    c.train.batch_size = 64
    c.checkpoint_every = 1000
    c.eval.num_images = 64


def test(c):
    c.data.kwargs.resolution = 32
    c.data.kwargs.num_samples = 64
    c.model.config = _unet((8, 16), groups=4)
    c.train.steps = 6
    c.train.batch_size = 8
    c.train.warmup_steps = 2
    c.checkpoint_every = 2
    c.log_every = 2
    c.eval.num_images = 4
    c.eval.ddim_steps = 5


def get_config(arg=None):
    c = base_config("diffusion")
    c.data = ml_collections.ConfigDict(dict(name="square", kwargs=dict(split="unbiased", num_samples=1000, resolution=32,
                                                                        seed=0)))
    c.model = ml_collections.ConfigDict(dict(name="unet2d", config=_unet((32, 64))))
    c.schedule = ml_collections.ConfigDict(dict(name="linear", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02))
    c.train = ml_collections.ConfigDict(dict(steps=400, batch_size=32, learning_rate=2e-3, warmup_steps=50,
                                             ema_decay=0.99))
    # samples.png decodes noise drawn from jax.random.key(seed + sample_seed_offset)
    c.eval = ml_collections.ConfigDict(dict(num_images=16, ddim_steps=50, depth=1.0, sample_seed_offset=1))
    return select_variant(arg, {"square_tiny": square_tiny, "square": square, "test": test}, c, default="square_tiny")
