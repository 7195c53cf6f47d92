"""Image grids a person can look at."""

from __future__ import annotations

import io as _io

import numpy as np
from PIL import Image

from jaxcf.data.common import to_uint8
from jaxcf.utils import io


def save_grid(rows, path: str, scale: int = 1, pad: int = 2) -> str:
    """Saves a grid PNG to a local or bucket path. rows: [R, C, H, W, 3] in [-1, 1] (or a list of [C, H, W, 3] rows)."""
    rows = [to_uint8(r) for r in rows]
    R, C = len(rows), max(len(r) for r in rows)
    H, W = rows[0].shape[1:3]
    grid = np.full((R * (H + pad) + pad, C * (W + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (H + pad), pad + j * (W + pad)
            grid[y:y + H, x:x + W] = img[..., :3] if img.shape[-1] >= 3 else np.repeat(img, 3, -1)
    im = Image.fromarray(grid)
    if scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = _io.BytesIO()
    im.save(buf, format="PNG")
    io.write_bytes(path, buf.getvalue())
    return path
