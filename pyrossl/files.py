"""Files the zoo writes, and the lock of a run directory: the bottom layer, importing nothing of the zoo but its errors.

Every file the zoo writes goes through :func:`atomic_write_bytes` (a temporary file beside the
target, fsynced, then renamed over it): a kill or a full disk leaves the previous content, never a
cut file, and a failure is one :class:`~pyrossl.errors.WriteError` naming the file and the reason.
Nothing is written through a symbolic link. A run directory has one writer at a time, the holder of
its :class:`RunLock`. ``tests/test_files.py`` lists every write call of the package and checks it
comes through here.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import tempfile
import time
from pathlib import Path

from pyrossl.errors import CheckpointError, WriteError

LOCK = ".lock"

# the process's umask, read once: temporary files are made private (0600) and get the mode an
# ordinary ``open(path, "w")`` would have given them before they are renamed into place
_UMASK = os.umask(0o022)
os.umask(_UMASK)

# the file object every write goes to; the fault-injection tests replace it to fail at a chosen write
_fdopen = os.fdopen


class RunLock:
    """An exclusive lock on a run directory, held by its one writer (``train``, ``train --resume``,
    ``report``, an ablation's cell) while it writes.

    It is a ``flock`` on ``<run>/.lock``: the kernel releases it when the holder ends, however it ends
    (a kill, a crash), so a lock is never left behind. The file names the holder (pid, host, what it
    does, since when) for the refusal a second writer gets: one line, a :class:`CheckpointError`,
    nothing of the run touched. Readers (``eval``, ``load_run``) take no lock: every file is replaced
    atomically, so they see a consistent run at any moment. Usable as a context manager.
    """

    def __init__(self, folder: Path, what: str):
        self.folder, self.what = Path(folder), what
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        path = self.folder / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CheckpointError(
                    f"{path} is a symbolic link: a run directory's files are never written through one"
                ) from None
            raise CheckpointError(f"cannot lock {self.folder}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 400, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CheckpointError(
                f"{self.folder} is in use by {holder}: wait for it to end, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({self.what}, since {since})\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # closing the descriptor releases the flock

    def __del__(self):
        self.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class _Recording:
    """A binary file whose ``write`` remembers the OSError it raised: torch's zip writer turns a
    failed write into a RuntimeError that hides its errno (a full disk reads as "file write failed")."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name):
        return getattr(self.file, name)


def write_failure(path: Path, exc: BaseException) -> WriteError:
    """The one-line error of a failed write of ``path`` (the reason in words, the errno kept)."""
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        reason = "the disk is full"
    elif code == errno.EROFS:
        reason = "the file system is read-only"
    elif code == errno.ENOENT:
        reason = "its folder no longer exists"
    elif isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
    else:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return WriteError(f"cannot write {path} ({reason})", errno=code)


def refuse_symlink(path: Path) -> None:
    """A file of a run is never written through a symbolic link, nor into a folder that is one: a
    link planted in a run directory would make a write land outside it."""
    for p in (path, path.parent):
        if p.is_symlink():
            raise CheckpointError(f"{p} is a symbolic link: a run directory's files are never written through one")


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    The one way the zoo writes a file. If anything fails (a full disk, a kill), ``path`` keeps its
    previous content and no temporary file is left; a failed write is a :class:`WriteError` naming
    the file and the reason. ``path`` and its folder must not be symbolic links. The folder must
    exist (as for ``open``): a run directory deleted while it trains is an error, not made again.
    """
    path = Path(path)
    refuse_symlink(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)
        with _fdopen(fd, "wb") as f:
            recording = _Recording(f)
            try:
                write(recording)
            except RuntimeError as exc:  # torch's writer: the OSError underneath is the reason
                raise write_failure(path, recording.error or exc) from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise write_failure(path, exc) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def write_table(path: Path, table, fmt: str = "%.18e") -> None:
    """``numpy.savetxt`` of ``table`` into ``path``, atomically (:func:`atomic_write_bytes`)."""
    import numpy as np

    atomic_write_bytes(path, lambda f: np.savetxt(f, table, fmt=fmt))


def prepare_output(folder: Path) -> Path:
    """Create ``folder`` (and its parents) and prove it writable by writing and deleting a file in it.

    Called before any data is loaded or any step is taken, so that an ``--out`` that cannot hold
    a run is one line at once instead of a failure at the first checkpoint.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise CheckpointError(f"cannot write into {folder}: a file of that name exists") from None
    except OSError as exc:
        raise CheckpointError(f"cannot write into {folder}: {exc.strerror or exc}") from None
    return folder


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files a killed write left in ``folder`` (never a finished file)."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()] if Path(folder).is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` that never leaves a partial file at ``path``."""
    import torch

    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))
