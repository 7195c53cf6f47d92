"""ResNet-18 (He et al. 2016, BasicBlock x [2, 2, 2, 2]), NHWC: the CFKD student classifier.

    model = ResNet(ResNetConfig(num_classes=2, stem="cifar", width=0.25))
    variables = init_variables(model, jax.random.key(0))            # {"params", "batch_stats"}
    logits = model.apply(variables, x)                                # eval: running statistics
    logits, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
    feats = model.apply(variables, x, method=model.features)         # [B, 512 * width]

Layout and parameter count follow torchvision's ``resnet18`` (11,689,512 with the ImageNet stem
and 1000 classes; 11,173,962 with the CIFAR stem and 10 classes).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxcf.models import blocks
from jaxcf.models.init import fast_init

Dtype = Any

STEMS = ("imagenet", "cifar")
NORMS = ("batch", "group")


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "cifar" (3x3/1 conv, for 32-64 px);
    width: multiplier on the stage widths 64, 128, 256, 512; norm: "batch" or "group"."""

    num_classes: int = 1000
    stem: str = "imagenet"
    width: float = 1.0
    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
    norm: str = "batch"
    norm_groups: int = 32  # norm="group" only
    bn_momentum: float = 0.9  # flax convention: running = m * running + (1 - m) * batch (PyTorch's 0.1)
    norm_eps: float = 1e-5

    def __post_init__(self):
        blocks.freeze_lists(self)
        name = type(self).__name__
        blocks.check_supported(name, dataclasses.asdict(self), {"stem": STEMS, "norm": NORMS})
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"{name}: field 'num_classes' = {self.num_classes!r} must be a positive int")
        if not isinstance(self.width, (int, float)) or self.width <= 0 or min(self.stage_widths) < 1:
            raise ValueError(f"{name}: field 'width' = {self.width!r} must be a positive number leaving every "
                             f"stage at least one channel")
        if not self.stage_sizes or not all(isinstance(n, int) and n >= 1 for n in self.stage_sizes):
            raise ValueError(f"{name}: field 'stage_sizes' = {self.stage_sizes!r} must be positive ints, "
                             "e.g. (2, 2, 2, 2) for ResNet-18")
        if self.norm == "group" and any(w % self.norm_groups for w in self.stage_widths):
            raise ValueError(f"{name}: field 'norm_groups' = {self.norm_groups} must divide every stage width "
                             f"{list(self.stage_widths)} (norm='group')")
        if not 0.0 <= self.bn_momentum < 1.0:
            raise ValueError(f"{name}: field 'bn_momentum' = {self.bn_momentum!r} must be in [0, 1)")

    @property
    def stage_widths(self) -> tuple[int, ...]:
        return tuple(int(round(64 * 2 ** i * self.width)) for i in range(len(self.stage_sizes)))

    @property
    def feature_dim(self) -> int:
        return self.stage_widths[-1]


def _norm(c: ResNetConfig, x: jax.Array, train: bool, name: str, dtype: Dtype, param_dtype: Dtype) -> jax.Array:
    """BatchNorm (running statistics in ``batch_stats``) or GroupNorm, per ``config.norm``; call
    inside a compact method (the layer belongs to the caller)."""
    if c.norm == "batch":
        return nn.BatchNorm(use_running_average=not train, momentum=c.bn_momentum, epsilon=c.norm_eps,
                            dtype=dtype, param_dtype=param_dtype, name=name)(x)
    return blocks.group_norm(x, c.norm_groups, c.norm_eps, name, param_dtype)


class BasicBlock(nn.Module):
    """conv3x3(stride)-norm-ReLU-conv3x3-norm + shortcut (1x1 conv + norm when the shape changes), ReLU.

    x: [B, H, W, C_in] -> [B, H/stride, W/stride, features].
    """

    features: int
    stride: int
    config: ResNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv = lambda k, s, name: blocks.conv(self.features, k, name, stride=s, use_bias=False, **kw)
        norm = lambda h, name: _norm(self.config, h, train, name, **kw)
        h = nn.relu(norm(conv(3, self.stride, "conv1")(x), "bn1"))
        h = norm(conv(3, 1, "conv2")(h), "bn2")
        if self.stride != 1 or x.shape[-1] != self.features:
            x = norm(conv(1, self.stride, "downsample_conv")(x), "downsample_bn")
        return nn.relu(x + h)


class ResNetBackbone(nn.Module):
    """Stem and residual stages, then global average pooling: [B, H, W, C] -> [B, feature_dim]."""

    config: ResNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)
        w0 = c.stage_widths[0]
        if c.stem == "imagenet":
            x = blocks.conv(w0, 7, "conv1", stride=2, padding=3, use_bias=False, **kw)(x)
            x = nn.relu(_norm(c, x, train, "bn1", **kw))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = blocks.conv(w0, 3, "conv1", stride=1, use_bias=False, **kw)(x)
            x = nn.relu(_norm(c, x, train, "bn1", **kw))
        for s, (n, width) in enumerate(zip(c.stage_sizes, c.stage_widths)):
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                x = BasicBlock(width, stride, c, **kw, name=f"layer{s + 1}_{b}")(x, train)
        return jnp.mean(x, axis=(1, 2))  # [B, feature_dim]


class ResNet(nn.Module):
    """x: [B, H, W, C] -> logits [B, num_classes]; ``features``: the pooled [B, feature_dim] embedding.

    ``train=True`` normalises with batch statistics and updates ``batch_stats`` (pass
    ``mutable=["batch_stats"]``); ``train=False`` uses the running statistics.
    """

    config: ResNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.backbone = ResNetBackbone(self.config, **kw)
        self.fc = nn.Dense(self.config.num_classes, **kw)

    def features(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self.backbone(x, train)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self.fc(self.features(x, train))


def init_variables(model: ResNet, rng: jax.Array, resolution: int = 32, in_channels: int = 3) -> dict:
    """``{"params", "batch_stats"}`` (no ``batch_stats`` with GroupNorm) with flax's default
    distributions, via :func:`jaxcf.models.init.fast_init`. The shapes do not depend on
    ``resolution`` (global pooling)."""
    x = jax.ShapeDtypeStruct((1, resolution, resolution, in_channels), jnp.float32)
    return fast_init(model, x, rng=rng)
