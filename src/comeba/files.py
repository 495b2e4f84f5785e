"""Atomic file writes: a kill at any moment leaves the old file or the new one, never half of one."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

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
    """An exclusive lock on the folder `directory` (created if missing) for one writer; a second writer fails
    at once with a clear error. The lock is on the folder itself, so it leaves no file behind."""
    import fcntl

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
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
        for stale in directory.parent.glob(f"{TMP_PREFIX}{glob_escape(directory.name)}-*"):
            if _TMP_DIR.fullmatch(stale.name[len(TMP_PREFIX) + len(directory.name) + 1:]) and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        os.close(fd)  # releases the lock


_TMP_DIR = re.compile(r"[a-z0-9_]{8}")


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@contextmanager
def replacing_directory(directory: Path, keep: Callable[[str], bool]) -> Iterator[Path]:
    """A fresh folder beside `directory` to write into; on success it takes `directory`'s place in one step.

    Readers see the old folder or the new one, never a mix, and a kill at any
    moment leaves the old folder intact (on Linux, where the two folders are
    swapped by one renameat2 call). Entries of the old folder for which
    `keep(name)` is true (files that are not the writer's) are carried over.
    Call it under `writer_lock(directory)`.
    """
    directory = Path(directory).absolute()
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{directory.name}-", dir=directory.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        for item in tmp.iterdir():
            if item.is_file():
                with open(item, "rb") as fh:
                    os.fsync(fh.fileno())
        if directory.is_dir():
            for item in directory.iterdir():
                if keep(item.name) and not (tmp / item.name).exists():
                    if item.is_dir():
                        shutil.copytree(item, tmp / item.name, copy_function=os.link)
                    else:
                        os.link(item, tmp / item.name)
            os.chmod(tmp, stat.S_IMODE(directory.stat().st_mode))
        fsync_dir(tmp)
        if directory.is_dir():
            _exchange(tmp, directory)  # tmp now holds the old folder
        else:
            os.rename(tmp, directory)
        fsync_dir(directory.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders atomically (Linux renameat2 RENAME_EXCHANGE); elsewhere, three renames."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_exchange = -100, 2
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
        if ctypes.get_errno() not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(b))
    aside = a.with_name(a.name + ".old")
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


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
