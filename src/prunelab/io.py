"""The one way prunelab writes files: to a temporary name beside the target, then renamed over it.

A run killed at any moment therefore leaves each file either complete or absent, never half-written,
which is what lets a stage trust the outputs of the stages before it when a run resumes. In a DDP
run only global rank 0 writes: on the other ranks every write here is skipped (they compute the same
things, see `prunelab.distributed`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prunelab.errors import PrunelabError


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` to fill a temporary file, then rename it to `path` in one step (rank 0 only)."""
    path = Path(path)
    if _rank() != 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, data: Any, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write `data` as strict JSON (no NaN or Infinity) atomically, with a final newline (key order kept unless
    `sort_keys`)."""
    return write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n")


def save_torch(path: str | Path, payload: Any) -> Path:
    """`torch.save` a payload of tensors and plain values atomically (it then loads with weights_only=True)."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


class RunLock:
    """One writer per run directory: a lock file holding the owner's pid, host and start time.

    A second process on the same run directory stops at once with a message naming the owner. A lock
    left by a process that no longer runs on this host (killed, crashed machine restarted) is stale and
    taken over with a warning; a lock from another host is never taken over automatically, since its
    owner cannot be checked from here (delete the file when that process is known to be gone).
    """

    def __init__(self, directory: str | Path, name: str = ".lock") -> None:
        self.path = Path(directory) / name
        self.held = False

    def _owner(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        import socket
        import time
        import warnings

        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner.get("host") == me["host"] and not _alive(int(owner.get("pid", -1))):
                    warnings.warn(
                        f"{self.path}: taking over the lock of process {owner.get('pid')}, which is no longer running",
                        stacklevel=2,
                    )
                    self.path.unlink(missing_ok=True)
                    continue
                raise PrunelabError(
                    f"another prunelab process (pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started "
                    f"{owner.get('started', '?')}) is writing {self.path.parent}; wait for it to end, or stop it "
                    f"(a lock left by a process that is gone on another host: delete {self.path})"
                ) from None
            with os.fdopen(handle, "w") as file:
                file.write(json.dumps(me))
            self.held = True
            return

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _rank() -> int:
    """This process's global rank: from the process group, else the launcher's environment, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    from lightning.pytorch.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
