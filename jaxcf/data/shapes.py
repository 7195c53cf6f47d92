"""The shapes world: jaxcf's embedded synthetic vision-language data for DiCap on a CPU.

Each image (default 32x32) shows one anti-aliased object on a plain background. The object's
*shape* is the class (the causal feature); object colour, background colour, size and position
are non-causal. Factors per image, int32 [N, 6] in FACTOR_NAMES order:
  shape (index into SHAPE_NAMES), color, background (indices into COLOR_NAMES),
  size (bounding-box side in pixels), x, y (top-left corner in pixels).
Images are a pure function of the factors (`render_shapes`), so "the same image with another
shape" is `render_shapes(factors with column 0 changed)`.

Classes follow the CoCoOp protocol: the first half of SHAPE_NAMES is base, the rest novel. In
the few-shot set every base class is paired with its own background colour
(`assigned_background`) in a fraction `bias` of its shots: the spurious feature.
"""

from __future__ import annotations

import functools

import numpy as np

from jaxcf.data.common import ArrayDataset, base_novel_split, check_choice

SHAPE_NAMES = ("circle", "square", "triangle", "star", "plus", "diamond",
               "heart", "ring", "arrow", "crescent", "cross", "hourglass")
COLOR_NAMES = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink", "white",
               "black")
COLOR_RGB = np.array([(220, 40, 40), (40, 170, 60), (40, 80, 220), (235, 215, 40),
                      (140, 60, 180), (245, 140, 30), (40, 200, 210), (245, 150, 190),
                      (240, 240, 240), (25, 25, 25)], np.float32)
FACTOR_NAMES = ("shape", "color", "background", "size", "x", "y")
BASE_CLASSES, NOVEL_CLASSES = (tuple(int(i) for i in half)
                               for half in base_novel_split(len(SHAPE_NAMES)))
SPLITS = ("pretrain", "fewshot", "test_base", "test_novel", "test_conflict", "test_all")
_SPLIT_STREAM = {s: i for i, s in enumerate(SPLITS)}
_SUPERSAMPLE = 4


def assigned_background(shape: int) -> int:
    """The background colour spuriously paired with `shape`: in the few-shot set (base classes)
    and in the photos of the confounded pretraining corpus (`photo_pool`, every shape)."""
    return (2 + shape) % len(COLOR_NAMES)  # base classes -> blue, yellow, purple, ...


def size_range(resolution: int) -> tuple[int, int]:
    """Inclusive range of object sizes (pixels) at `resolution`."""
    return max(5, round(0.4 * resolution)), max(6, round(0.65 * resolution))


# ----------------------------------------------------------------------------- geometry


def _star(u, v, points=5, outer=0.98, inner=0.42):
    """Inside test of a regular star (pointing up) by the polar radius of its boundary."""
    theta = np.arctan2(u, -v)  # 0 at the top
    sector = 2 * np.pi / points
    phi = np.abs((theta % sector) - sector / 2)  # angle from the sector's inner vertex
    # Boundary between the inner vertex (angle 0) and the outer vertex (angle sector/2).
    ax, ay = inner, 0.0
    bx, by = outer * np.cos(sector / 2), outer * np.sin(sector / 2)
    # Ray at angle phi meets line A-B at radius t: solve A + s (B - A) = t (cos phi, sin phi).
    dx, dy = bx - ax, by - ay
    t = (ax * dy - ay * dx) / (np.cos(phi) * dy - np.sin(phi) * dx)
    return np.hypot(u, v) <= t


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Point test in the object's box, u (right) and v (down) in [-1, 1]."""
    au, av, r = np.abs(u), np.abs(v), np.hypot(u, v)
    if shape == "circle":
        return r <= 0.95
    if shape == "square":
        return (au <= 0.8) & (av <= 0.8)
    if shape == "triangle":
        return (v <= 0.8) & (au <= (v + 0.95) * 0.55)
    if shape == "star":
        return _star(u, v)
    if shape == "plus":
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "diamond":
        return au + av <= 0.98
    if shape == "heart":
        x, y = u * 1.25, -(v * 1.25 - 0.15)
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if shape == "ring":
        return (r <= 0.95) & (r >= 0.55)
    if shape == "arrow":
        shaft = (av <= 0.22) & (u >= -0.95) & (u <= 0.1)
        head = (u >= 0.1) & (u <= 0.95) & (av <= 0.75 * (0.95 - u) / 0.85)
        return shaft | head
    if shape == "crescent":
        return (r <= 0.95) & (np.hypot(u - 0.45, v + 0.15) >= 0.72)
    if shape == "cross":
        p, q = np.abs(u + v) / np.sqrt(2), np.abs(u - v) / np.sqrt(2)
        return ((p <= 0.22) | (q <= 0.22)) & (au <= 0.92) & (av <= 0.92)
    if shape == "hourglass":
        return (av <= 0.9) & (au <= 0.12 + 0.8 * av)
    raise ValueError(f"Unknown shape {shape!r}; allowed: {SHAPE_NAMES}.")


@functools.lru_cache(maxsize=None)
def shape_template(shape: int, size: int) -> np.ndarray:
    """Anti-aliased coverage float32 [size, size] in [0, 1] (supersampled box average)."""
    k = _SUPERSAMPLE
    c = (np.arange(size * k) + 0.5) / (size * k) * 2 - 1  # sub-pixel centres in [-1, 1]
    inside = _inside(SHAPE_NAMES[shape], c[None, :], c[:, None]).astype(np.float32)
    out = inside.reshape(size, k, size, k).mean(axis=(1, 3))
    out.setflags(write=False)
    return out


def render_shapes(factors: np.ndarray, *, resolution: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Renders factors int [N, 6] (FACTOR_NAMES) -> images uint8 [N, R, R, 3], mask bool [N, R, R]
    (coverage >= 0.5). Deterministic: the same factors give the same pixels."""
    f = np.asarray(factors, dtype=np.int64)
    if f.ndim != 2 or f.shape[1] != len(FACTOR_NAMES):
        raise ValueError(f"factors must be [N, {len(FACTOR_NAMES)}] ({FACTOR_NAMES}), "
                         f"got shape {f.shape}.")
    if f.size and (f[:, 0].min() < 0 or f[:, 0].max() >= len(SHAPE_NAMES)):
        raise ValueError(f"shape factor must be in [0, {len(SHAPE_NAMES)}).")
    if f.size and (f[:, 1:3].min() < 0 or f[:, 1:3].max() >= len(COLOR_NAMES)):
        raise ValueError(f"color/background factors must be in [0, {len(COLOR_NAMES)}).")
    sizes, xs, ys = f[:, 3], f[:, 4], f[:, 5]
    if f.size and (sizes.min() < 1 or (xs + sizes).max() > resolution
                   or (ys + sizes).max() > resolution or min(xs.min(), ys.min()) < 0):
        raise ValueError(f"Objects must lie inside the {resolution}x{resolution} image.")
    alpha = np.zeros((len(f), resolution, resolution), np.float32)
    for i, (shape, _, _, size, x, y) in enumerate(f):
        alpha[i, y:y + size, x:x + size] = shape_template(int(shape), int(size))
    a = alpha[..., None]  # [N, R, R, 1]
    img = COLOR_RGB[f[:, 2]][:, None, None] * (1 - a) + COLOR_RGB[f[:, 1]][:, None, None] * a
    return np.rint(img).astype(np.uint8), alpha >= 0.5


def _position_word(x: int, y: int, size: int, resolution: int) -> str:
    cx, cy = (x + size / 2) / resolution, (y + size / 2) / resolution
    col = "left" if cx < 0.4 else "right" if cx > 0.6 else ""
    row = "top" if cy < 0.4 else "bottom" if cy > 0.6 else ""
    if not row and not col:
        return "in the center"
    return "at the " + " ".join(w for w in (row, col) if w)


def captions(factors: np.ndarray, *, resolution: int = 32, layout: bool = False) -> list[str]:
    """"a red star on a blue background"; layout=True adds size and position words
    ("a small red star at the top left on a blue background")."""
    lo, hi = size_range(resolution)
    out = []
    for shape, color, bg, size, x, y in np.asarray(factors, dtype=np.int64):
        if layout:
            size_word = "small" if size <= (lo + hi) / 2 else "large"
            where = _position_word(x, y, size, resolution)
            out.append(f"a {size_word} {COLOR_NAMES[color]} {SHAPE_NAMES[shape]} {where} "
                       f"on a {COLOR_NAMES[bg]} background")
        else:
            out.append(f"a {COLOR_NAMES[color]} {SHAPE_NAMES[shape]} on a {COLOR_NAMES[bg]} "
                       "background")
    return out


# ----------------------------------------------------------------------------- sampling


def sample_factors(shapes: np.ndarray, backgrounds: np.ndarray, rng: np.random.Generator, *,
                   resolution: int = 32, sizes: tuple[int, int] | None = None) -> np.ndarray:
    """Factors int32 [N, 6] for given shapes and backgrounds [N]; object colour uniform over the
    colours other than the background, size uniform in `sizes` (inclusive, pixels; default
    `size_range(resolution)`) and position uniform (object inside the image)."""
    n = len(shapes)
    colors = rng.integers(0, len(COLOR_NAMES) - 1, size=n)
    colors = colors + (colors >= backgrounds)  # skip the background colour
    lo, hi = sizes or size_range(resolution)
    sizes = rng.integers(lo, hi + 1, size=n)
    xs = rng.integers(0, resolution - sizes + 1)
    ys = rng.integers(0, resolution - sizes + 1)
    return np.stack([shapes, colors, backgrounds, sizes, xs, ys], axis=1).astype(np.int32)


def _balanced(classes, per_class, rng):
    shapes = np.repeat(np.asarray(classes), per_class)
    return shapes[rng.permutation(len(shapes))]


def _other_color(avoid: np.ndarray, rng) -> np.ndarray:
    c = rng.integers(0, len(COLOR_NAMES) - 1, size=len(avoid))
    return c + (c >= avoid)


def _biased_backgrounds(classes, per_class: int, bias: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """(shape, background) [len(classes) * per_class], class-major: in each class the first
    round(bias * per_class) on the class's assigned background, the rest on another colour."""
    shape = np.repeat(np.asarray(classes), per_class)
    is_biased = np.tile(np.arange(per_class) < int(round(bias * per_class)), len(classes))
    own = np.array([assigned_background(s) for s in shape])
    return shape, np.where(is_biased, own, _other_color(own, rng))


def shapes_dataset(split: str = "pretrain", *, num_examples: int = 5000, shots: int = 16,
                   bias: float = 0.9, num_per_class: int = 100, resolution: int = 32,
                   caption_layout: bool = False, object_size: tuple[int, int] | None = None,
                   test_bias: float | None = None, confound: float = 0.0, seed: int = 0) -> ArrayDataset:
    """One split of the shapes world as an ArrayDataset.

    split:
      "pretrain": `num_examples`, all classes, all factors uniform (for a tiny CLIP / diffusion);
        with `confound` > 0 a base-class image is on its class's assigned background with
        probability `confound` (else uniform): a confounded web corpus;
      "fewshot": `shots` per base class; a fraction `bias` (rounded per class) on the class's
        assigned background, the rest on other backgrounds;
      "test_base": `num_per_class` per base class; backgrounds uniform, or with `test_bias` a
        fraction `test_bias` on the class's assigned background (the few-shot distribution);
      "test_novel" / "test_all": `num_per_class`, backgrounds uniform;
      "test_conflict": `num_per_class` per base class, each on another base class's assigned
        background (bias-conflicting).
    object_size: (min, max) object side in pixels (default `size_range(resolution)`, the
    pretraining range); the few-shot task can use another range (a domain shift).
    Labels index the split's class_names (novel classes are relabelled from 0, as in CoCoOp).
    Arrays: image uint8 [N, R, R, 3]; label int32 [N]; factors int32 [N, 6]; mask bool [N, R, R];
    aligned int32 [N] (1 where the background is the class's assigned one); caption str [N].
    """
    check_choice("split", split, SPLITS)
    _check_fractions(bias=bias, test_bias=test_bias, confound=confound)
    object_size = _checked_object_size(object_size, resolution)
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    n_colors = len(COLOR_NAMES)
    if split == "pretrain":
        classes = tuple(range(len(SHAPE_NAMES)))
        shape = rng.integers(0, len(SHAPE_NAMES), size=num_examples)
        background = rng.integers(0, n_colors, size=num_examples)
        if confound > 0:  # drawn only when asked, so the unconfounded pool is unchanged
            is_base = np.isin(shape, BASE_CLASSES)
            pick = is_base & (rng.random(num_examples) < confound)
            own = np.array([assigned_background(s) for s in shape])
            background = np.where(pick, own, background)
    elif split == "fewshot":
        classes = BASE_CLASSES
        shape, background = _biased_backgrounds(classes, shots, bias, rng)
    elif split == "test_conflict":
        classes = BASE_CLASSES
        shape = _balanced(classes, num_per_class, rng)
        # Another base class's assigned background, uniformly.
        other = rng.integers(0, len(classes) - 1, size=len(shape))
        own_pos = np.searchsorted(classes, shape)
        other = other + (other >= own_pos)
        background = np.array([assigned_background(classes[o]) for o in other])
    elif split == "test_base" and test_bias is not None:
        classes = BASE_CLASSES
        shape, background = _biased_backgrounds(classes, num_per_class, test_bias, rng)
        perm = rng.permutation(len(shape))
        shape, background = shape[perm], background[perm]
    else:
        classes = {"test_base": BASE_CLASSES, "test_novel": NOVEL_CLASSES,
                   "test_all": tuple(range(len(SHAPE_NAMES)))}[split]
        shape = _balanced(classes, num_per_class, rng)
        background = rng.integers(0, n_colors, size=len(shape))
    factors = sample_factors(shape, background, rng, resolution=resolution, sizes=object_size)
    if split == "fewshot":
        perm = rng.permutation(len(factors))
        factors = factors[perm]
    return _world_dataset(factors, classes, resolution, caption_layout=caption_layout)


def _check_fractions(**values) -> None:
    for name, value in values.items():
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}.")


def _checked_object_size(object_size, resolution: int) -> tuple[int, int] | None:
    if object_size is None:
        return None
    lo, hi = (int(v) for v in object_size)
    if not 1 <= lo <= hi <= resolution:
        raise ValueError(f"object_size must be (min, max) with 1 <= min <= max <= resolution "
                         f"({resolution}), got {tuple(object_size)}.")
    return lo, hi


def _world_dataset(factors: np.ndarray, classes, resolution: int, *, caption_layout: bool = False,
                   tied_shapes=BASE_CLASSES, **extra: np.ndarray) -> ArrayDataset:
    """The ArrayDataset of rendered ``factors``: labels index ``classes``; ``aligned`` marks the
    images of ``tied_shapes`` on their assigned background; ``extra`` arrays are added as given."""
    images, mask = render_shapes(factors, resolution=resolution)
    relabel = np.full((len(SHAPE_NAMES),), -1, np.int32)
    relabel[list(classes)] = np.arange(len(classes))
    own = np.array([assigned_background(s) if s in tied_shapes else -1
                    for s in range(len(SHAPE_NAMES))])
    aligned = (own[factors[:, 0]] == factors[:, 2]).astype(np.int32)
    arrays = {
        "image": images,
        "label": relabel[factors[:, 0]],
        "factors": factors,
        "mask": mask,
        "aligned": aligned,
        "caption": np.array(captions(factors, resolution=resolution, layout=caption_layout)),
        **extra,
    }
    info = {"classes": classes, "factor_names": FACTOR_NAMES, "resolution": resolution}
    return ArrayDataset(arrays, tuple(SHAPE_NAMES[c] for c in classes), info)


def photo_pool(num_examples: int, *, photo_fraction: float, confound: float, resolution: int = 32,
               object_size: tuple[int, int] | None = None, seed: int = 0) -> ArrayDataset:
    """A web-like pretraining corpus of the shapes world in two styles.

    *Photos* (a fraction `photo_fraction`) show their object on its shape's usual background
    (`assigned_background`) with probability `confound`, else on any background, as web photos show
    objects in their usual settings; *drawings* (the rest) put every object on any background. A
    contrastive model trained on it with captions that name the style ("a photo of a star" /
    "a drawing of a star") learns the spurious background for "photo" and not for "drawing".
    Arrays as the "pretrain" split, plus style int32 [N] (1 = photo, 0 = drawing).
    """
    _check_fractions(photo_fraction=photo_fraction, confound=confound)
    object_size = _checked_object_size(object_size, resolution)
    rng = np.random.default_rng([seed, len(SPLITS)])  # a stream of its own
    shape = rng.integers(0, len(SHAPE_NAMES), size=num_examples)
    photo = rng.random(num_examples) < photo_fraction
    tied = photo & (rng.random(num_examples) < confound)
    background = np.where(tied, assigned_background(shape), rng.integers(0, len(COLOR_NAMES), size=num_examples))
    factors = sample_factors(shape, background, rng, resolution=resolution, sizes=object_size)
    every = tuple(range(len(SHAPE_NAMES)))
    return _world_dataset(factors, every, resolution, tied_shapes=every, style=photo.astype(np.int32))


def class_names(classes: str = "all") -> tuple[str, ...]:
    """Shape names of "all", "base" or "novel" classes."""
    check_choice("classes", classes, ("all", "base", "novel"))
    idx = {"all": range(len(SHAPE_NAMES)), "base": BASE_CLASSES, "novel": NOVEL_CLASSES}[classes]
    return tuple(SHAPE_NAMES[i] for i in idx)


# ----------------------------------------------------------------------------- model-free judge


def with_shape(factors: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Factors [N, 6] with the shape column replaced (the ground-truth counterfactual's factors)."""
    f = np.array(factors, dtype=np.int32, copy=True)
    f[:, 0] = shapes
    return f


def judge_shapes(images: np.ndarray, factors: np.ndarray, *, resolution: int = 32,
                 candidates=tuple(range(len(SHAPE_NAMES)))) -> dict:
    """Which shape does each image show, judged against the renderer (no learned model)?

    Every candidate shape is re-rendered with the source image's other factors (colours, size,
    position: what a counterfactual should keep); the nearest rendering in L2 wins.
    images: [N, R, R, 3] in [-1, 1]; factors: [N, 6] of the source images.
    Returns shape [N] (shape indices), distance [N] (RMS to the winner, in [-1, 1] units),
    background_l1 [N] (mean |image - source background| outside the source object and the judged
    shape) and object_color_l1 [N] (mean |image - source object colour| inside the judged shape),
    both in [-1, 1] units (0 = kept exactly).
    """
    x = np.asarray(images, np.float32)
    f = np.asarray(factors)
    n = len(x)
    dists, renders = [], []
    for s in candidates:
        img, _ = render_shapes(with_shape(f, np.full(n, s)), resolution=resolution)
        renders.append(img)
        dists.append(np.sqrt(np.mean((x - (img.astype(np.float32) / 127.5 - 1)) ** 2, axis=(1, 2, 3))))
    dists = np.stack(dists, 1)  # [N, C]
    best = np.argmin(dists, 1)
    judged = np.stack(renders, 1)[np.arange(n), best]  # [N, R, R, 3] uint8
    source, _ = render_shapes(f, resolution=resolution)
    bg_u8 = np.rint(COLOR_RGB[f[:, 2]]).astype(np.uint8)[:, None, None]
    obj_u8 = np.rint(COLOR_RGB[f[:, 1]]).astype(np.uint8)[:, None, None]
    # pure pixels only (anti-aliased edges belong to neither region)
    bg = (np.all(source == bg_u8, -1) & np.all(judged == bg_u8, -1))[..., None]
    obj = np.all(judged == obj_u8, -1)[..., None]
    mean_over = lambda v, m: np.sum(v * m, axis=(1, 2, 3)) / np.maximum(3 * m.sum(axis=(1, 2, 3)), 1)
    return {"shape": np.asarray(candidates)[best], "distance": dists[np.arange(n), best],
            "background_l1": mean_over(np.abs(x - (bg_u8 / 127.5 - 1)), bg),
            "object_color_l1": mean_over(np.abs(x - (obj_u8 / 127.5 - 1)), obj)}
