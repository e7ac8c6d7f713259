"""Writing to the user's disk safely: output paths checked before any work, free space checked
before large writes, a full disk reported as one line (with what was half-written removed),
and files created with the user's umask."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from jft.errors import JftError


def check_creatable(path: str | os.PathLike, key: str) -> None:
    """Raises a `JftError` naming `key` unless directory `path` exists or can be created.

    The missing parents are created and removed again: trying is the only reliable check
    (`os.access` says yes to root under /proc, and a parent may be a file or read-only).
    """
    path = Path(path)
    if path.is_dir():
        return
    if path.exists():
        raise JftError(f"{key} {path}: exists and is not a directory")
    created = []
    try:
        for directory in reversed([path, *path.parents]):
            if not directory.exists():
                directory.mkdir()
                created.append(directory)
    except OSError as error:
        raise JftError(f"{key} {path}: cannot create it ({_reason(error, directory)})") from None
    finally:
        for directory in reversed(created):
            directory.rmdir()


def _reason(error: OSError, directory: Path) -> str:
    parent = directory.parent
    if parent.exists() and not parent.is_dir():
        return f"{parent} is a file, not a directory"
    return f"{error.strerror or error} at {directory}"


def is_out_of_space(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, is a full disk (ENOSPC or EDQUOT,
    also when a library reports it only in its message, as Orbax and safetensors do)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        if isinstance(error, BaseExceptionGroup):
            return any(is_out_of_space(inner) for inner in error.exceptions)
        error = error.__cause__ or error.__context__
    return False


def out_of_space(path: str | os.PathLike, needed: int | None = None) -> JftError:
    """The one-line error for a full disk while writing `path`."""
    path = Path(path)
    sizes = [f"needed about {format_bytes(needed)}"] if needed else []
    free = free_bytes(path)
    if free is not None:
        sizes.append(f"free {format_bytes(free)}")
    detail = f" ({', '.join(sizes)})" if sizes else ""
    return JftError(f"no space left on {mount_point(path)} writing {path}{detail}; "
                    "free some space or choose another directory")


def check_free_space(path: str | os.PathLike, needed: int) -> None:
    """Raises the full-disk error before writing about `needed` bytes under `path`, where the
    filesystem already reports less free space than that."""
    free = free_bytes(path)
    if free is not None and free < needed:
        raise out_of_space(path, needed)


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes (for this user) on the filesystem that holds, or would hold, `path`."""
    try:
        return shutil.disk_usage(_nearest_existing(Path(path))).free
    except OSError:
        return None


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the filesystem that holds, or would hold, `path`."""
    path = _nearest_existing(Path(path).absolute())
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def format_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError


def remove(path: str | os.PathLike) -> None:
    """Removes a half-written file or directory, if there is one."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def user_file_mode() -> int:
    """The mode a new file gets under this process's umask (0644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def writing(path: str | os.PathLike, needed: int | None = None,
            partial: str | os.PathLike | None = None) -> Iterator[None]:
    """Around a write of about `needed` bytes to `path`: refuses up front where the disk
    already lacks the space, and on any failure removes what was half-written (`partial`,
    by default `path`); a full disk becomes the one-line error."""
    if needed:
        check_free_space(path, needed)
    try:
        yield
    except BaseException as error:
        remove(path if partial is None else partial)
        if is_out_of_space(error):
            raise out_of_space(path, needed) from None
        raise


def save_safetensors(arrays: Mapping[str, np.ndarray], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """`safetensors.numpy.save_file`, with the file's mode following the user's umask (the
    library creates 0600 files) and a full disk reported as one line, the partial file
    removed."""
    from safetensors.numpy import save_file

    path = Path(path)
    needed = sum(int(np.asarray(array).nbytes) for array in arrays.values())
    with writing(path, needed):
        save_file(dict(arrays), os.fspath(path), metadata=dict(metadata) if metadata else None)
    path.chmod(user_file_mode())
