"""Orbax checkpoints of the whole train state: save every N steps, keep the last K, resume."""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores a pytree under ``workdir/name``; all processes call it together."""

    def __init__(self, workdir: str, name: str = "checkpoints", every: int = 100, keep: int = 2):
        if every < 1:
            raise ValueError(f"config.checkpoint_every must be >= 1, got {every}")
        if keep < 1:
            raise ValueError(f"config.keep_checkpoints must be >= 1, got {keep}")
        self.every = every
        self.directory = os.path.join(os.path.abspath(workdir) if "://" not in workdir else workdir, name)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1, create=True),
        )

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def restore(self, target: Any, step: Optional[int] = None) -> Any:
        """Restores into the shapes, dtypes and shardings of ``target`` (arrays or ShapeDtypeStructs)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def restore_or(self, target: Any) -> Any:
        """The latest checkpoint if there is one, else ``target`` unchanged."""
        return target if self.latest_step() is None else self.restore(target)

    def maybe_save(self, step: int, state: Any, force: bool = False) -> bool:
        """Saves at multiples of ``every`` (or when forced) unless that step is already saved."""
        if not force and step % self.every:
            return False
        if step in self.manager.all_steps():
            return False
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        return True

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
