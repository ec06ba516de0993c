"""Files that only this user can have written: private directories, checked reads, atomic
writes. A cache of shared objects (code that runs in the process that loads it) is only as safe
as the directory it lives in: another local user who can write there can run code as this one.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

__all__ = [
    "fsync",
    "is_private_dir",
    "make_private_dir",
    "read_private",
    "uid",
    "write_atomic",
]


def uid() -> int | None:
    """This process's user id (``None`` where there is none, on Windows)."""
    return os.getuid() if hasattr(os, "getuid") else None


def _not_shared(st: os.stat_result) -> bool:
    """Owned by this user and writable by nobody else."""
    if os.name != "posix":  # pragma: no cover - no uid or group/other mode bits
        return True
    return st.st_uid == uid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def is_private_dir(path: Path) -> bool:
    """``path`` is a directory only this user can write to (a symlink: one this user made, to
    such a directory; a symlink's own mode bits mean nothing)."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            if os.name == "posix" and st.st_uid != uid():
                return False
            st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and _not_shared(st)


def make_private_dir(path: Path) -> bool:
    """Create ``path`` (mode 0700) if it does not exist; whether it is safe to use."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    return is_private_dir(path)


def read_private(path: Path) -> bytes | None:
    """The contents of ``path`` if it is a regular file (not a symlink) only this user can
    write; ``None`` otherwise."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) and _not_shared(st)):
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    except OSError:
        return None
    finally:
        os.close(fd)


def fsync(path: str | Path, directory: bool = False) -> None:
    """Flush ``path`` (a file, or with ``directory=True`` a directory's entries) to disk."""
    if directory and os.name != "posix":  # pragma: no cover - a directory cannot be opened
        return
    fd = os.open(path, os.O_RDONLY if directory else os.O_RDWR)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse to fsync a directory
        if not directory:
            raise
    finally:
        os.close(fd)


def write_atomic(target: Path, data: bytes) -> None:
    """Write ``target`` whole or not at all: a temp file beside it, fsynced, then renamed."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
