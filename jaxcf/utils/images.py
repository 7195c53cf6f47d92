"""Images a person can look at: grids, heatmaps, and image sets saved as .npz."""

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


def heatmap_png(matrix, row_names, col_names, path: str, title: str = "") -> None:
    """A labelled heatmap of a small matrix (white = 0, blue = the largest entry) as a PNG."""
    from PIL import ImageDraw

    m = np.asarray(matrix, np.float64)
    cw, ch, lw, th = 90, 28, 80, 40
    im = Image.new("RGB", (lw + cw * m.shape[1] + 10, th + ch * (m.shape[0] + 1) + 10), "white")
    draw = ImageDraw.Draw(im)
    draw.text((4, 4), title, fill="black")
    top = max(float(np.max(np.abs(m))), 1e-12)
    for j, name in enumerate(col_names):
        draw.text((lw + j * cw + 4, th), str(name)[:14], fill="black")
    for i, rname in enumerate(row_names):
        y = th + ch * (i + 1)
        draw.text((4, y + 8), str(rname)[:12], fill="black")
        for j in range(m.shape[1]):
            v = abs(m[i, j]) / top
            colour = (int(255 * (1 - 0.8 * v)), int(255 * (1 - 0.6 * v)), 255)
            draw.rectangle([lw + j * cw, y, lw + (j + 1) * cw - 2, y + ch - 2], fill=colour)
            draw.text((lw + j * cw + 6, y + 8), f"{m[i, j]:.3f}", fill="black")
    buf = _io.BytesIO()
    im.save(buf, format="PNG")
    io.write_bytes(path, buf.getvalue())


def save_image_set(path: str, **arrays) -> None:
    """Arrays as a compressed .npz (local or bucket); float images in [-1, 1] should be passed
    through :func:`jaxcf.data.common.to_uint8` first."""
    buf = _io.BytesIO()
    np.savez_compressed(buf, **arrays)
    io.write_bytes(path, buf.getvalue())
