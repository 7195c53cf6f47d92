"""Workdir files on a local disk or a bucket (``gs://...``) through ``etils.epath``.

Results, metrics, images and exported weights go through these helpers so that
``--workdir=gs://bucket/run`` works on a TPU VM exactly like a local folder. Writes happen on
process 0 only; the callers check ``jax.process_index()`` (or use :func:`is_writer`).
"""

from __future__ import annotations

import io as _io
import json
from typing import Any

import jax
from etils import epath


def path(p: str | epath.Path) -> epath.Path:
    return epath.Path(p)


def join(base: str, *parts: str) -> str:
    return str(epath.Path(base).joinpath(*parts))


def is_remote(p: str | epath.Path) -> bool:
    """True for a bucket URI (``gs://``, ``s3://``...), False for a local path."""
    return "://" in str(p)


def is_writer() -> bool:
    """Only process 0 writes metrics, images and reports; checkpoints are written by all (Orbax)."""
    return jax.process_index() == 0


def makedirs(p: str) -> None:
    epath.Path(p).mkdir(parents=True, exist_ok=True)


def exists(p: str) -> bool:
    return epath.Path(p).exists()


def write_text(p: str, text: str) -> None:
    write_bytes(p, text.encode())


def write_bytes(p: str, data: bytes) -> None:
    """Writes ``p`` whole or not at all: a local file goes to a temporary name in the same folder,
    is synced and renamed over ``p`` (a crash never leaves a truncated file); a bucket object is
    replaced in one upload."""
    q = epath.Path(p)
    q.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(p):
        q.write_bytes(data)
        return
    import os

    tmp = f"{p}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def append_text(p: str, text: str) -> None:
    """Appends ``text`` to ``p`` (created with its folder if missing).

    A local file is opened in append mode. Bucket objects cannot be appended to (every backend
    rewrites the whole object anyway), so there the object is read and written back whole:
    fine for a log of a few thousand lines, each write one upload.
    """
    q = epath.Path(p)
    q.parent.mkdir(parents=True, exist_ok=True)
    if not is_remote(p):
        with q.open("a") as f:
            f.write(text)
        return
    q.write_text((q.read_text() if q.exists() else "") + text)


def read_text(p: str) -> str:
    return epath.Path(p).read_text()


def read_bytes(p: str) -> bytes:
    return epath.Path(p).read_bytes()


def write_json(p: str, obj: Any) -> None:
    write_text(p, json.dumps(obj, indent=2) + "\n")


def read_json(p: str) -> Any:
    return json.loads(read_text(p))


def write_npz(p: str, **arrays) -> None:
    """``np.savez_compressed`` to a local or bucket path (through an in-memory buffer)."""
    import numpy as np

    buf = _io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_bytes(p, buf.getvalue())


def read_npz(p: str) -> dict:
    """All arrays of an ``.npz`` file written by :func:`write_npz`, as a dict of numpy arrays."""
    import numpy as np

    with np.load(_io.BytesIO(read_bytes(p))) as z:
        return {k: z[k] for k in z.files}
