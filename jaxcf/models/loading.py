"""Reading standard checkpoints into jaxcf parameter trees.

One module for every model: find the checkpoint folder (hub id or local path), read its tensors
(PyTorch ``*.safetensors``, ``*.bin`` when torch is installed, or the former Flax ``*.msgpack``)
into a :class:`StateDict` keyed by the PyTorch names, and let each model's converter take the
tensors it needs with the layout changes done here (linear transposes, OIHW -> HWIO convs).
:func:`finalize` then checks the converted tree against the model's own shapes, so a missing,
extra or mis-shaped tensor is an error that names it: nothing is left at a random init.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

import jax

WEIGHT_FILE_PRIORITY = (
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors.index.json",
    "flax_model.msgpack",
    "diffusion_flax_model.msgpack",
    "pytorch_model.bin",
    "diffusion_pytorch_model.bin",
)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match the model."""


def resolve_checkpoint_dir(
    name_or_path: str | os.PathLike,
    subfolder: str | None = None,
    *,
    allow_patterns: Iterable[str] | None = ("*.json", "*.safetensors", "*.msgpack", "*.txt"),
    local_files_only: bool | None = None,
) -> Path:
    """Returns a local folder for ``name_or_path`` (a local folder, or a Hugging Face hub id).

    Hub ids go through ``huggingface_hub.snapshot_download`` (its cache, ``HF_HUB_OFFLINE`` and
    ``HF_HOME`` are honoured). A local folder is used as it is and never touches the network.
    """
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"checkpoint path {str(path)!r} is a file; give the folder that holds it")
        folder = path
    else:
        if str(name_or_path).startswith(("/", ".", "~")) or str(name_or_path).count("/") > 1:
            raise CheckpointError(f"checkpoint folder {str(name_or_path)!r} does not exist")
        from huggingface_hub import snapshot_download

        patterns = None
        if allow_patterns is not None:
            patterns = list(allow_patterns)
            if subfolder:
                patterns = [f"{subfolder}/{p}" for p in patterns] + ["*.json", "*.txt"]
        try:
            folder = Path(
                snapshot_download(
                    str(name_or_path),
                    allow_patterns=patterns,
                    local_files_only=bool(local_files_only)
                    if local_files_only is not None
                    else os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"),
                )
            )
        except Exception as e:  # network, auth, unknown repo: all become one clear message
            raise CheckpointError(
                f"could not get checkpoint {str(name_or_path)!r} from the Hugging Face hub "
                f"({type(e).__name__}: {e}). Give a local folder, or download it first with "
                f"`huggingface-cli download {name_or_path}`."
            ) from e
    if subfolder:
        folder = folder / subfolder
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint {str(name_or_path)!r} has no subfolder {subfolder!r}")
    return folder


def read_json(folder: Path, name: str = "config.json") -> dict:
    f = Path(folder) / name
    if not f.is_file():
        raise CheckpointError(f"{name} not found in {str(folder)!r}")
    with open(f) as fh:
        return json.load(fh)


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _flax_to_torch_layout(flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Renames the leaves of a former Flax checkpoint to PyTorch names and layouts."""
    out = {}
    for key, value in flat.items():
        value = np.asarray(value)
        head, _, leaf = key.rpartition(".")
        if leaf == "kernel" and value.ndim == 2:
            leaf, value = "weight", value.T
        elif leaf == "kernel" and value.ndim == 4:  # HWIO -> OIHW
            leaf, value = "weight", value.transpose(3, 2, 0, 1)
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        out[f"{head}.{leaf}" if head else leaf] = value
    return out


def _canonical(name: str) -> str:
    # The former Flax checkpoints spell `down_blocks.0` as `down_blocks_0`; compare names with
    # every '.' and '_' folded together so both spellings meet.
    return re.sub(r"[._]+", "_", name)


class StateDict:
    """Tensors of a checkpoint, by PyTorch name, tracking which ones a converter has used."""

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str = "<memory>"):
        self.tensors = {k: np.asarray(v) for k, v in tensors.items()}
        self.source = source
        self.used: set[str] = set()
        self._alias = {}
        for k in self.tensors:
            self._alias.setdefault(_canonical(k), k)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or _canonical(name) in self._alias

    def keys(self):
        return self.tensors.keys()

    def take(self, name: str) -> np.ndarray:
        """The raw tensor called ``name`` (PyTorch layout)."""
        key = name if name in self.tensors else self._alias.get(_canonical(name))
        if key is None:
            close = sorted(k for k in self.tensors if k.rsplit(".", 2)[0] == name.rsplit(".", 2)[0])[:5]
            raise CheckpointError(
                f"tensor {name!r} is missing from checkpoint {self.source}"
                + (f"; nearby tensors: {close}" if close else "")
            )
        self.used.add(key)
        return self.tensors[key]

    def has_prefix(self, prefix: str) -> bool:
        c = _canonical(prefix)
        return any(k.startswith(c) for k in self._alias)

    # Layout helpers: each returns a Flax-style leaf dict for one PyTorch module.
    def linear(self, name: str, bias: bool = True) -> dict:
        out = {"kernel": self.take(f"{name}.weight").T}
        if bias:
            out["bias"] = self.take(f"{name}.bias")
        return out

    def conv(self, name: str, bias: bool = True) -> dict:
        w = self.take(f"{name}.weight")
        if w.ndim == 2:  # a 1x1 conv stored as a linear (e.g. diffusers proj_in/out)
            w = w[:, :, None, None]
        out = {"kernel": w.transpose(2, 3, 1, 0)}  # OIHW -> HWIO
        if bias:
            out["bias"] = self.take(f"{name}.bias")
        return out

    def norm(self, name: str) -> dict:
        return {"scale": self.take(f"{name}.weight"), "bias": self.take(f"{name}.bias")}

    def embedding(self, name: str) -> dict:
        return {"embedding": self.take(f"{name}.weight")}

    def unused(self, ignore: Iterable[str] = ()) -> list[str]:
        pats = [re.compile(p) for p in ignore]
        return sorted(k for k in self.tensors if k not in self.used and not any(p.search(k) for p in pats))


def read_state_dict(folder: str | os.PathLike, prefer: Iterable[str] = WEIGHT_FILE_PRIORITY) -> StateDict:
    """Reads the weights in ``folder`` (safetensors, sharded safetensors, msgpack or torch bin)."""
    folder = Path(folder)
    names = [n for n in prefer if (folder / n).is_file()]
    if not names:
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise CheckpointError(
            f"no weights in {str(folder)!r}: expected one of {list(prefer)}; the folder has {found}"
        )
    name = names[0]
    path = folder / name
    if name.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return StateDict(load_file(str(path)), source=str(path))
    if name.endswith(".index.json"):
        from safetensors.numpy import load_file

        index = json.loads(path.read_text())
        tensors = {}
        for shard in sorted(set(index["weight_map"].values())):
            tensors.update(load_file(str(folder / shard)))
        return StateDict(tensors, source=str(path))
    if name.endswith(".msgpack"):
        from flax import serialization

        tree = serialization.msgpack_restore(path.read_bytes())
        return StateDict(_flax_to_torch_layout(_flatten(tree)), source=str(path))
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{str(path)!r} is a PyTorch pickle; install torch to read it, or convert it to safetensors"
        ) from e
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    return StateDict({k: v.float().numpy() for k, v in sd.items()}, source=str(path))


def finalize(converted: Any, expected: Any, sd: StateDict | None = None, ignore_unused: Iterable[str] = (),
             dtype: Any = None) -> Any:
    """Checks ``converted`` against ``expected`` (a tree of shapes, e.g. from ``jax.eval_shape``).

    Every expected leaf must be present with the same shape, no unexpected leaf may be present,
    and (when ``sd`` is given) every checkpoint tensor must have been used. Returns the converted
    tree as ``jax.numpy`` arrays cast to ``dtype`` (default: float32).
    """
    flat_c = _flatten(converted) if isinstance(converted, Mapping) else {}
    flat_e = _flatten(jax.tree_util.tree_map(lambda x: tuple(x.shape), expected,
                                             is_leaf=lambda x: hasattr(x, "shape")))
    problems = []
    for k in sorted(set(flat_e) - set(flat_c)):
        problems.append(f"missing parameter {k} (shape {flat_e[k]})")
    for k in sorted(set(flat_c) - set(flat_e)):
        problems.append(f"unexpected parameter {k}")
    for k in sorted(set(flat_c) & set(flat_e)):
        if tuple(np.shape(flat_c[k])) != tuple(flat_e[k]):
            problems.append(f"shape mismatch for {k}: checkpoint {np.shape(flat_c[k])}, model {flat_e[k]}")
    if sd is not None:
        for k in sd.unused(ignore_unused):
            problems.append(f"checkpoint tensor {k} was not used")
    if problems:
        where = f" ({sd.source})" if sd is not None else ""
        raise CheckpointError(f"checkpoint does not match the model{where}:\n  " + "\n  ".join(problems[:40])
                              + (f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""))
    import jax.numpy as jnp

    dt = np.dtype(jnp.float32 if dtype is None else dtype)  # numpy casts: no XLA compile per tensor shape
    return jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x).astype(dt)), converted)
