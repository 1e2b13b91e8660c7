"""Files that hold secrets or personal data: readable by their owner only, whatever the umask.

Every such file is created with mode 0600 from its first byte (``os.open`` with 0600, then ``fchmod``, so
that neither a permissive umask nor a leftover file of an older version widens it), and every folder that
holds them is 0700. Replacements are atomic: a temporary file in the same folder, renamed over the old one.
SQLite gives its ``-wal``, ``-shm`` and ``-journal`` files the mode of the database file; files of that kind
left by an older version are narrowed too (:func:`private_sqlite`).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import BinaryIO

FILE_MODE = 0o600
DIR_MODE = 0o700
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def private_dir(path: Path) -> Path:
    """``path`` (and missing parents) as a folder; ``path`` itself is 0700, also when it existed."""
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(path, DIR_MODE)
    return path


def write_private(path: Path, data: bytes | str, *, fsync: bool = False) -> None:
    """Replace ``path`` atomically by ``data`` (str is written as UTF-8), mode 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)  # a folder made for it: 0700
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def open_private_append(path: Path) -> BinaryIO:
    """``path`` opened for appending (created if missing), mode 0600 (a wider existing file is narrowed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        return os.fdopen(fd, "ab")
    except BaseException:
        os.close(fd)
        raise


def private_sqlite(path: Path) -> None:
    """The SQLite database ``path`` exists with mode 0600, and so do its side files that exist. Call it before
    ``sqlite3.connect`` (SQLite creates its -wal/-shm with the database file's mode) and again after switching
    to WAL (side files an older version left wider)."""
    path = Path(path)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE))
    os.chmod(path, FILE_MODE)
    for suffix in SQLITE_SIDE_FILES:
        try:
            os.chmod(f"{path}{suffix}", FILE_MODE)
        except FileNotFoundError:
            pass
