"""One run per workdir: ``workdir/jaxcf.lock`` names the run that holds it (host, pid, start time).

On a local or NFS disk the lock is an ``flock`` on that file, which the kernel drops when the
process ends in any way (SIGKILL included), so a crashed run never blocks the next one; the next
run says whose lock it took over. On a bucket (``gs://``) there is no ``flock``: a lock whose
process is gone on this same host is broken with a warning, and one from another host (or a
live process) stops the run. ``--break_lock`` removes any lock first (for a run known to be gone).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from jaxcf.utils import io

LOCK_NAME = "jaxcf.lock"


class LockError(RuntimeError):
    """The workdir is in use by another run (the message names it and how to break the lock)."""


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a reused pid from the original), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    """Whether the process that wrote ``owner`` still runs (on this host; False if unknowable)."""
    try:
        pid = int(owner["pid"])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except (KeyError, TypeError, ValueError, OverflowError):
        return False
    start = owner.get("proc_start")
    return start is None or _proc_start(pid) in (None, start)


def _describe(owner: dict, path: str) -> str:
    return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {owner.get('started', '?')}"
            f" (lock file {path})")


def _parse(text: str) -> dict:
    try:
        owner = json.loads(text)
        return owner if isinstance(owner, dict) else {}
    except ValueError:
        return {}


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds the workdir for this process; raises :class:`LockError`
    when another run holds it. Released on exit (and by the kernel if the process dies)."""

    def __init__(self, workdir: str, break_lock: bool = False):
        self.path = io.join(workdir, LOCK_NAME)
        self.workdir = workdir
        self.break_lock = break_lock
        self._fd = None
        self.took_over: dict | None = None  # the stale owner this run replaced, if any

    def _owner(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)}

    def _in_use(self, owner: dict) -> LockError:
        return LockError(f"--workdir={self.workdir} is in use by another run: {_describe(owner, self.path)}; "
                         "wait for it to finish or use another workdir, or pass --break_lock if that run is gone")

    def acquire(self) -> "WorkdirLock":
        io.makedirs(self.workdir)
        if self.break_lock and io.exists(self.path):
            old = _parse(io.read_text(self.path))
            print(f"jaxcf: warning: --break_lock: removing the lock of {_describe(old, self.path)}", file=sys.stderr)
            io.path(self.path).unlink(missing_ok=True)
        if io.is_remote(self.path):
            return self._acquire_remote()
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._in_use(_parse(io.read_text(self.path))) from None
            try:  # the file may have been removed (released) between open and flock: lock the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _parse(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
        if previous.get("pid") is not None:
            self.took_over = previous
            print(f"jaxcf: warning: took over the lock of a run that is gone: {_describe(previous, self.path)}",
                  file=sys.stderr)
        data = json.dumps(self._owner()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def _acquire_remote(self) -> "WorkdirLock":
        if io.exists(self.path):
            owner = _parse(io.read_text(self.path))
            if owner.get("host") != socket.gethostname() or _alive(owner):
                raise self._in_use(owner)
            self.took_over = owner
            print(f"jaxcf: warning: took over the lock of a run that is gone: {_describe(owner, self.path)}",
                  file=sys.stderr)
        self._owner_data = self._owner()
        io.write_text(self.path, json.dumps(self._owner_data))
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)  # before the flock goes, so nobody locks a file about to vanish
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None
        elif getattr(self, "_owner_data", None) is not None:
            if io.exists(self.path) and _parse(io.read_text(self.path)) == self._owner_data:
                io.path(self.path).unlink(missing_ok=True)
            self._owner_data = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
