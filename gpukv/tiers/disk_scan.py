"""The disk tier's start-up scan: the chunk files a new tier finds under its folder.

Walks ``<root>/<aa>/`` folders (never through a link), removes interrupted writes (``*.tmp``),
tightens modes (0700 folders, 0600 files), skips anything that is not a regular chunk file, and
-- when the tier reports events and so must know each file's key -- reads each header: a file
whose header is unreadable or names another key is removed. Returns what remains, oldest first
(recency = file mtime), for the tier's LRU index.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path
from typing import Callable, NamedTuple

from gpukv.tiers import codec as chunk_codec
from gpukv.tiers.private_files import DIR_MODE, FILE_MODE, tighten

log = logging.getLogger(__name__)


class Found(NamedTuple):
    mtime: float
    name: str
    size: int
    key: str | None  # None when the keys were not read


def scan(root: Path, suffix: str, *, read_keys: bool,
         file_name: Callable[[str], str]) -> list[Found]:
    """The chunk files under ``root`` (names ending in ``suffix``), oldest first; with
    ``read_keys`` only those whose header names the key ``file_name`` maps to their name."""
    found = []
    for folder in root.iterdir():
        if len(folder.name) != 2 or not folder.is_dir() or folder.is_symlink():
            continue
        tighten(folder, folder.stat(), DIR_MODE)
        for path in folder.iterdir():
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # an interrupted write
                continue
            if not path.name.endswith(suffix):
                continue
            try:
                st = path.lstat()
                if not stat.S_ISREG(st.st_mode):
                    log.warning("disk tier: ignoring %s (not a regular file)", path)
                    continue
                tighten(path, st, FILE_MODE)
            except OSError as exc:
                log.warning("disk tier: ignoring %s (%s)", path, exc)
                continue
            key = _key_of(path, file_name) if read_keys else None
            if key is not None or not read_keys:
                found.append(Found(st.st_mtime, path.name, st.st_size, key))
    return sorted(found, key=lambda f: f[:2])


def _key_of(path: Path, file_name: Callable[[str], str]) -> str | None:
    """The key in ``path``'s header if it names this file; else the file is removed."""
    try:
        with open(path, "rb") as f:
            key = chunk_codec.read_metadata(f).get("key")
        if isinstance(key, str) and file_name(key) == path.name:
            return key
        problem = "its header names another key"
    except (OSError, ValueError) as exc:
        problem = f"unreadable header ({type(exc).__name__}: {exc})"
    log.warning("disk tier: removing %s: %s", path, problem)
    try:
        path.unlink()
    except OSError as exc:
        log.warning("disk tier: cannot remove %s: %s", path, exc)
    return None
