"""Reports of DiCap's retrieval and VQA pipelines: results.json, results.md (mean ± std tables over
seeds) and examples.png (each example's image, its counterfactuals and its text)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from jaxcf.data.common import to_uint8
from jaxcf.utils import io

METHODS = (("zeroshot", "zero-shot CLIP"), ("init", "learned-prompt initialisation, untrained"),
           ("coop", "CoOp (lambda = 0)"), ("dicap", "DiCap (generated counterfactuals)"),
           ("dicap_gt", "DiCap, ground-truth counterfactuals (control)"))


def metric_table(summary: dict, columns: Sequence[tuple[str, str]], percent: bool = True) -> list[str]:
    """Markdown rows: one per method present, one column per (header, key suffix); the cell of
    method m is summary[f"{m}_{suffix}"] as mean ± std."""
    lines = ["| method | " + " | ".join(h for h, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    k = 100.0 if percent else 1.0
    for method, label in METHODS:
        keys = [f"{method}_{suffix}" for _, suffix in columns]
        if not any(key in summary for key in keys):
            continue
        cells = [f"{k * summary[key]['mean']:.1f} ± {k * summary[key]['std']:.1f}" if key in summary else "n/a"
                 for key in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def write_task_report(results: dict, workdir: str, text: str) -> None:
    """results.json and results.md (``text``), printed too."""
    io.write_json(io.join(workdir, "results.json"), results)
    io.write_text(io.join(workdir, "results.md"), text)
    print(text)


def example_sheet(path: str, columns: Sequence[np.ndarray], headers: Sequence[str], texts: Sequence[str],
                  scale: int = 3) -> None:
    """A PNG with one row per example: its images (``columns``: each [N, H, W, 3] in [-1, 1]) and
    its text to the right (caption, question and answer, counterfactual target)."""
    n = len(texts)
    h, w = columns[0].shape[1:3]
    cell, pad, text_w, head_h, line_h = h * scale, 4, 360, 14, 12
    width = pad + len(columns) * (w * scale + pad) + text_w
    height = head_h + n * (cell + pad) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for j, header in enumerate(headers):
        draw.text((pad + j * (w * scale + pad), 2), header, fill="black")
    for i in range(n):
        y = head_h + i * (cell + pad)
        for j, col in enumerate(columns):
            im = Image.fromarray(to_uint8(col[i])).resize((w * scale, h * scale), Image.NEAREST)
            sheet.paste(im, (pad + j * (w * scale + pad), y))
        for k, line in enumerate(str(texts[i]).split("\n")):
            draw.text((pad + len(columns) * (w * scale + pad), y + 4 + k * line_h), line, fill="black")
    import io as _io

    buf = _io.BytesIO()
    sheet.save(buf, format="PNG")
    io.write_bytes(path, buf.getvalue())


def final_loss_line(summary: dict) -> list[str]:
    """One line with the counterfactual term L_cf at the last training step (per counterfactual set):
    how much the hard negatives still separate from the factuals under the learned prompts."""
    parts = [f"{label} {summary[f'{m}_final_l_cf']['mean']:.3f} ± {summary[f'{m}_final_l_cf']['std']:.3f}"
             for m, label in (("dicap", "generated"), ("dicap_gt", "ground-truth")) if f"{m}_final_l_cf" in summary]
    return [f"L_cf at the last training step: {', '.join(parts)}.", ""] if parts else []


def negatives_text(results: dict) -> str:
    """Which generated counterfactuals the DiCap row used as hard negatives (``config.train.cf_filter``)."""
    if results["cf_filter"] == "none":
        return "every generated counterfactual"
    return (f"the {100 * results['summary']['cf_kept']['mean']:.0f}% of generated counterfactuals kept by "
            f"{results['cf_filter']}")
