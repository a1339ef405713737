"""Private folders (0700) and files (0600) for cached KV, which no other local user may read or
plant: a chunk file written by someone else with the right key and fingerprint would be served as
this user's KV.

Policy for the disk tier's root folder: created 0700 when missing (parents get the umask's
default); an existing root must be a directory owned by this user, else ``ValueError``; if it
grants any group/other permission it is tightened to 0700, with a warning naming the old mode.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
_OPEN_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
               | getattr(os, "O_CLOEXEC", 0))


def private_root(path: str | os.PathLike, what: str = "disk tier folder") -> Path:
    """``path`` as a 0700 directory owned by this user (see the module's policy); ``what`` names
    it in errors."""
    root = Path(path)
    try:
        root.mkdir(mode=DIR_MODE, parents=True)
    except FileExistsError:
        pass
    else:
        os.chmod(root, DIR_MODE)  # exact, whatever the umask
        return root
    st = os.stat(root)
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{what} {str(root)!r} exists and is not a directory")
    if st.st_uid != os.getuid():
        raise ValueError(f"{what} {str(root)!r} is owned by uid {st.st_uid}, not by "
                         f"this user (uid {os.getuid()}): refusing to use it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        log.warning("%s %s had mode %o; tightening it to %o", what, root,
                    stat.S_IMODE(st.st_mode), DIR_MODE)
        os.chmod(root, DIR_MODE)
    return root


def private_dir(path: Path) -> None:
    """Create ``path`` (one level) as a 0700 directory unless it exists."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return
    os.chmod(path, DIR_MODE)


def tighten(path: Path, st: os.stat_result, mode: int) -> None:
    """chmod ``path`` to ``mode`` if its permission bits (from ``st``) differ."""
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


def write_private(path: Path, blob: bytes) -> None:
    """Write ``blob`` to a new file ``path`` created 0600 (it must not exist; never follows a
    link). Raises ``OSError``; a partial file is removed."""
    fd = os.open(path, _OPEN_FLAGS, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(blob)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
