"""Per-step metrics as JSON lines in the workdir (and TensorBoard when it is installed).

The workdir may be a local folder or a bucket (``gs://...``): files go through :mod:`jaxcf.utils.io`.
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

import jax
import numpy as np

from jaxcf.utils import io


def _scalar(v):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()


class MetricWriter:
    """Appends ``{"step": s, "time": ..., **metrics}`` to ``workdir/metrics.jsonl``; process 0 only."""

    def __init__(self, workdir: str, filename: str = "metrics.jsonl", tensorboard: bool = False):
        self.active = jax.process_index() == 0
        self.path = io.join(workdir, filename)
        self._tb = None
        if self.active:
            io.makedirs(workdir)
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter  # light, optional

                    self._tb = SummaryWriter(io.join(workdir, "tensorboard"))
                except ImportError:
                    self._tb = None

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.active:
            return
        row = {"step": int(step), "time": time.time(), **{k: _scalar(v) for k, v in metrics.items()}}
        io.append_text(self.path, json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    return [json.loads(line) for line in io.read_text(path).splitlines() if line.strip()]
