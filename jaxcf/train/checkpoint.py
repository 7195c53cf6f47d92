"""Orbax checkpoints of the whole train state: save every N steps, keep the last K, resume.

Two guards make resuming safe:

- **keyed**: a run folder remembers what made it (``run_key.json``: the caller's settings and a
  digest of the initial state, the frozen parameters and the first batch, see
  :func:`jaxcf.train.loop.train_loop`). Checkpoints made with other settings are never resumed:
  they are moved aside (``checkpoints.stale-N``) with a warning and the stage starts again.
- **fallback**: a latest checkpoint that cannot be read (truncated, corrupt) is renamed
  ``<step>.corrupt`` with a warning and the previous one is restored; if none can be read the
  run stops with :class:`CheckpointUnreadable` naming the folder.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from jaxcf.models.loading import CheckpointError
from jaxcf.utils import io

KEY_FILE = "run_key.json"


class CheckpointUnreadable(CheckpointError):
    """No checkpoint of a run folder can be restored (the message names the folder and the steps)."""


def _warn(message: str) -> None:
    """One ``jaxcf: warning:`` line on stderr (process 0), like the command line's errors."""
    if jax.process_index() == 0:
        print(f"jaxcf: warning: {message}", file=sys.stderr, flush=True)


def _all_agree(value: bool) -> bool:
    """Process 0's decision, on every process (a no-op in a single-process run)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(value))


class Checkpointer:
    """Saves and restores a pytree under ``workdir/name``; all processes call it together."""

    def __init__(self, workdir: str, name: str = "checkpoints", every: int = 100, keep: int = 2):
        if every < 1:
            raise ValueError(f"config.checkpoint_every must be >= 1, got {every}")
        if keep < 1:
            raise ValueError(f"config.keep_checkpoints must be >= 1, got {keep}")
        self.every = every
        self.keep = keep
        self.directory = os.path.join(os.path.abspath(workdir) if "://" not in workdir else workdir, name)
        self.manager = self._open()

    def _open(self):
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, save_interval_steps=1, create=True),
        )

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    # ------------------------------------------------------------------ keyed folders

    def check_key(self, key: dict, desc: str = "") -> bool:
        """Makes sure the checkpoints here were made with ``key`` (JSON-able); returns True if they
        were moved aside because they were not. Every process calls it; process 0 decides."""
        key = json.loads(json.dumps(key, sort_keys=True, default=str))
        path = io.join(self.directory, KEY_FILE)
        stale, changed = False, []
        if jax.process_index() == 0:
            old = io.read_json(path) if io.exists(path) else None
            if old is not None and old != key and self.manager.all_steps():
                stale = True
                changed = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
        if _all_agree(stale):
            self.manager.close()
            target = self._stale_name()
            if jax.process_index() == 0:
                io.path(self.directory).rename(target)
                _warn(f"{desc or self.directory}: the checkpoints in {self.directory} were made with other settings "
                      f"(changed: {', '.join(changed)}); moved to {target}, this stage starts again")
            _all_agree(True)  # barrier: the folder is moved before anyone reopens it
            self.manager = self._open()
        if jax.process_index() == 0 and (stale or not io.exists(path) or io.read_json(path) != key):
            io.write_json(path, key)
        return stale

    def _stale_name(self) -> str:
        n = 1
        while io.exists(f"{self.directory}.stale-{n}"):
            n += 1
        return f"{self.directory}.stale-{n}"

    # ------------------------------------------------------------------ restore / save

    def restore(self, target: Any, step: Optional[int] = None) -> Any:
        """Restores into the shapes, dtypes and shardings of ``target`` (arrays or ShapeDtypeStructs)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def restore_or(self, target: Any) -> Any:
        """The latest readable checkpoint if there is one, else ``target`` unchanged.

        A checkpoint that fails to restore is renamed ``<step>.corrupt`` (kept for inspection, never
        read again) with a warning, and the one before it is tried.
        """
        failed = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self.restore(target, step)
            except Exception as e:  # noqa: BLE001 - any read error: truncated files, bad metadata, shapes
                failed.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                self._set_aside(step)
                _warn(f"checkpoint {step} in {self.directory} cannot be read ({failed[-1]}); renamed to "
                      f"{step}.corrupt, trying the previous one")
        if failed:
            raise CheckpointUnreadable(f"no checkpoint in {self.directory} can be read ({'; '.join(failed)}); "
                                       "remove the folder to start this stage again")
        return target

    def _set_aside(self, step: int) -> None:
        self.manager.close()
        if jax.process_index() == 0:
            src = io.join(self.directory, str(step))
            dst = io.join(self.directory, f"{step}.corrupt")
            if io.exists(dst):
                io.path(dst).rmtree()
            io.path(src).rename(dst)
        _all_agree(True)  # barrier
        self.manager = self._open()

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
