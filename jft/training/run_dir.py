"""A run's output directory: claimed by one process (a lock), checked before any work, and
written (config.yaml) only once everything that can be validated has been.

- A directory holding a checkpoint of the same config is resumed.
- One holding a checkpoint of another config is refused; with `--overwrite` its contents
  are moved aside to `DIR.oldN` (never deleted).
- One holding another config's run that never saved a checkpoint is reused: a failed run
  does not block its corrected retry. What it logged is moved aside, if anything.
- A directory that holds something else is refused (moved aside with `--overwrite`).

The lock is `DIR/run.lock`: a file holding the holder's process id and host, locked with
`flock` while the run lives. The kernel drops an flock when its process dies, so the lock of
a crashed run is stale at once; the next run takes it over with a warning.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path

import yaml

from jft.errors import JftError
from jft.storage import check_creatable

CONFIG_FILE = "config.yaml"
LOCK_FILE = "run.lock"
CHECKPOINTS = "checkpoints"


class RunDirectory:
    """`claim` it before loading anything, `commit` the config once validated, `release` at
    the end (also on failure: a directory this claim created is then removed again)."""

    def __init__(self, path: str | os.PathLike, fingerprint: str, overwrite: bool,
                 lock: bool = True):
        self.path = Path(path)
        self.fingerprint = fingerprint
        check_creatable(self.path, "output_dir")
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(self.path) if lock else None
        self.committed = False
        try:
            self.resuming, self.move_aside = self._decide(overwrite)
        except BaseException:
            self.release()
            raise

    def _decide(self, overwrite: bool) -> tuple[bool, bool]:
        """(resume this same run, move the present contents aside first)."""
        contents = [p for p in self.path.iterdir() if p.name != LOCK_FILE]
        if not contents:
            return False, False
        existing = _read_fingerprint(self.path / CONFIG_FILE)
        if existing == self.fingerprint and not overwrite:
            return True, False
        if overwrite:
            return False, True
        if existing is None:
            raise JftError(f"{self.path}: output_dir is not empty and holds no jft run; choose "
                           "another output_dir, or pass --overwrite to move its contents aside")
        if has_checkpoint(self.path):
            raise JftError(f"{self.path}: output_dir holds a run of another config (with "
                           "checkpoints); choose another output_dir, or pass --overwrite to "
                           "move it aside and start fresh")
        # Another config's run that never saved a checkpoint: nothing in it can be resumed.
        return False, any(p.name != CONFIG_FILE for p in contents)

    def commit(self, resolved: dict) -> None:
        """Moves aside what must be, and writes config.yaml: from here on the directory holds
        this run."""
        if self.move_aside:
            from jft.training.outputs import free_name

            aside = free_name(self.path)
            aside.mkdir()
            for child in self.path.iterdir():
                if child.name != LOCK_FILE:  # the lock stays, held, where it is
                    shutil.move(str(child), aside / child.name)
            print(f"moved the previous run to {aside}", file=sys.stderr)
        (self.path / CONFIG_FILE).write_text(
            yaml.safe_dump({**resolved, "fingerprint": self.fingerprint}, sort_keys=False))
        self.committed = True

    def release(self) -> None:
        """Drops the lock; before `commit`, removes the directory again if this claim made it."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.created and not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the run saved a finished checkpoint (Orbax renames a step's folder to its
    number once complete)."""
    directory = run_dir / CHECKPOINTS
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _read_fingerprint(path: Path) -> str | None:
    try:
        return yaml.safe_load(path.read_text()).get("fingerprint")
    except (OSError, AttributeError, yaml.YAMLError):
        return None


class RunLock:
    """An exclusive lock on a run directory, held until `release` or the process's end."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK_FILE
        self.file = None
        for _ in range(10):  # the holder may remove the file between our open and lock
            file = open(self.path, "a+")
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = _holder(file.read())
                file.close()
                raise JftError(f"{directory}: output_dir is in use by {holder}; wait for that "
                               "run to end, or choose another output_dir") from None
            except OSError as error:
                file.close()
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._without_flock(directory)
                return
            if _same_file(file, self.path):
                self.file = file
                break
            file.close()
        else:
            raise JftError(f"{self.path}: could not lock the run directory; try again")
        file.seek(0)
        previous = file.read().strip()
        if previous:
            warnings.warn(f"{directory}: taking over the lock of {_holder(previous)}, which "
                          "is gone (the run crashed or was killed)", stacklevel=2)
        self._write(file)
        atexit.register(self.release)

    def _without_flock(self, directory: Path) -> None:
        """Filesystems without flock (some network mounts): the file's existence is the lock,
        and its holder is alive if it runs on this host."""
        try:
            file = open(self.path, "x")
        except FileExistsError:
            text = self.path.read_text()
            if not _gone(text):
                raise JftError(f"{directory}: output_dir is in use by {_holder(text)}; wait "
                               f"for that run to end, or delete {self.path} if it is gone"
                               ) from None
            warnings.warn(f"{directory}: taking over the lock of {_holder(text)}, which is "
                          "gone (the run crashed or was killed)", stacklevel=3)
            file = open(self.path, "w")
        self._write(file)
        self.file = file
        atexit.register(self.release)

    @staticmethod
    def _write(file) -> None:
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        file.flush()

    def release(self) -> None:
        if self.file is None:
            return
        self.path.unlink(missing_ok=True)  # before the flock goes, so no one takes a dying file
        self.file.close()
        self.file = None


def _same_file(file, path: Path) -> bool:
    try:
        return os.fstat(file.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"process {holder['pid']} on {holder['host']} (since {holder['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


def _gone(text: str) -> bool:
    try:
        holder = json.loads(text)
        if holder["host"] != socket.gethostname():
            return False  # another host's process cannot be checked from here
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (ValueError, KeyError, TypeError, PermissionError):
        return False
    return False
