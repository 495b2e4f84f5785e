"""Atomic file writes: a kill at any moment leaves the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

TMP_PREFIX = ".tmp-"


class LockedError(OSError):
    """Another process is writing the same folder (an OSError, like other "resource busy" conditions)."""


def _umask() -> int:
    """The process umask, read without changing it (other threads may create files meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def writer_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock on `directory` for one writer; a second writer fails at once with a clear error."""
    import fcntl

    path = Path(directory) / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise LockedError(f"another process is saving an editor state into {directory}; "
                                  "wait for it to finish (one writer per state folder)") from None
            raise
        # Temporaries of saves that were killed before they finished: no writer holds them now.
        for stale in Path(directory).glob(TMP_PREFIX + "*"):
            stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def _replacing(path: Path, suffix: str = "") -> Iterator[str]:
    """A temporary name beside `path`; on success it is synced and renamed over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; follow the umask like a normal file
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with _replacing(path, ".safetensors") as tmp:
        save_file(tensors, tmp)


def atomic_write_text(path: Path, text: str) -> None:
    with _replacing(path) as tmp:
        Path(tmp).write_text(text)
