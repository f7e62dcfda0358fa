"""One run per output folder: `--output_dir/.hf_mim.lock`.

Two runs in one folder write each other's checkpoints and log every step twice; a second run refuses to
start and names the first. The lock names its holder (pid, host, the process's start time, the command)
and is created atomically with that content (written under a private name, then hard-linked into place:
a link fails if the lock exists). A lock left by a run that was killed (SIGKILL, a lost machine) is
stale: on this host, its process is gone (or the pid now belongs to a process started later) and it is
taken over with a warning. A lock from another host cannot be checked from here: the run stops and
says how to remove it once that run has surely ended.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_FILE = ".hf_mim.lock"


class OutputDirLockedError(RuntimeError):
    """Another run is using the output folder."""


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux /proc; None elsewhere): tells a reused pid from its first owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def is_running(pid: int, start_time: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return start_time is None or process_start_time(pid) in (None, start_time)


def holder_record() -> dict:
    command = shlex.join([sys.executable, *sys.argv]) if sys.argv and sys.argv[0] else sys.executable
    return {"pid": os.getpid(), "host": socket.gethostname(), "start_time": process_start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command}


def describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}: "
            f"{holder.get('command', '?')}")


class OutputDirLock:
    """A context manager; `enabled=False` (processes other than the main one) makes it a no-op."""

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = True):
        self.path = Path(output_dir) / LOCK_FILE
        self.enabled = enabled
        self.record: dict | None = None

    def __enter__(self) -> OutputDirLock:
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = holder_record()
        for _ in range(3):  # a stale lock removed, then another try (another run may win the race)
            if self.try_create(record):
                self.record = record
                return
            holder = self.read_holder()
            if holder is None:
                continue  # released between our two looks
            self.remove_if_stale(holder)
        raise OutputDirLockedError(f"Could not lock {self.path}: it keeps being taken by other runs.")

    def try_create(self, record: dict) -> bool:
        private = self.path.with_name(f"{LOCK_FILE}.{record['pid']}.{time.monotonic_ns()}")
        private.write_text(json.dumps(record))
        try:
            os.link(private, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            private.unlink()

    def read_holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"pid": None, "host": "?", "command": "unreadable lock file"}

    def remove_if_stale(self, holder: dict) -> None:
        """Removes a stale lock (with a warning); raises for a live run or one that cannot be checked."""
        here = socket.gethostname()
        pid = holder.get("pid")
        if holder.get("host") != here or not isinstance(pid, int):
            raise OutputDirLockedError(
                f"{self.path.parent} is locked by a run on another host or an unknown one ({describe(holder)}). "
                f"Two runs in one --output_dir overwrite each other's checkpoints. If that run has surely ended, "
                f"delete {self.path} and re-run; otherwise pass another --output_dir.")
        if pid != os.getpid() and is_running(pid, holder.get("start_time")):
            raise OutputDirLockedError(
                f"Another run is using {self.path.parent} ({describe(holder)}). Two runs in one --output_dir "
                "overwrite each other's checkpoints and log every step twice: wait for it to end, stop it, or pass "
                "another --output_dir.")
        logger.warning("Taking over the stale lock %s: the run that held it (%s) has ended without releasing it "
                       "(killed?).", self.path, describe(holder))
        if self.read_holder() == holder:  # not taken over meanwhile by another run that judged it stale too
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if it is still ours (a lock taken over after ours was judged stale is not touched)."""
        if self.record is None:
            return
        holder = self.read_holder()
        if holder is not None and holder.get("pid") == self.record["pid"] and \
                holder.get("host") == self.record["host"]:
            self.path.unlink(missing_ok=True)
        self.record = None


__all__ = ["LOCK_FILE", "OutputDirLock", "OutputDirLockedError"]
