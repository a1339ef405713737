"""Paths no other local user can plant, redirect or deny: trusted folders, this user's runtime
folder (sockets, locks, logs, keys), and files opened in them.

Another user may pre-create a name under a shared folder such as ``/tmp`` (a folder of theirs,
or a symbolic link to a file of the victim's, which a chmod or an append would then follow). So:

- a *trusted* folder is one whose every component, on the path as given and on its real path,
  is a directory owned by root or this user, sticky when others may write it (like ``/tmp``:
  no one can rename or remove another's entries), or a link owned by root or this user;
- a *private* folder is, in addition, a real directory (never a link) owned by this user that
  no other user may write; created 0700;
- a private file is opened with ``O_NOFOLLOW`` and checked on the open descriptor: a regular
  file owned by this user, chmod-ed 0600 through the descriptor, never through the path.

The runtime folder is ``$XDG_RUNTIME_DIR`` (when private), else ``<tmp>/gpukv-<uid>``, else (when
another user holds that name) ``$XDG_CACHE_HOME/gpukv/run`` or ``~/.cache/gpukv/run``; the
server and its clients make the same choice from the same environment.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
SOCKET_PATH_MAX = 107  # bytes of a Unix socket path (sun_path) on Linux


def _check(path: str, st: os.stat_result) -> None:
    uid = os.getuid()
    if stat.S_ISLNK(st.st_mode):
        if st.st_uid not in (0, uid):
            raise ValueError(f"refusing {path!r}: a link owned by uid {st.st_uid}")
        return
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"refusing {path!r}: not a directory")
    if st.st_uid not in (0, uid):
        raise ValueError(f"refusing {path!r}: owned by uid {st.st_uid}, not {uid}")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise ValueError(f"refusing {path!r}: writable by other users "
                         f"(mode {oct(st.st_mode & 0o777)})")


def trusted_folder(path: str | os.PathLike) -> Path:
    """The real path of folder ``path`` when no other user (root aside) can change what is in
    it (see the module docstring); ValueError naming the first component that is not."""
    given = os.path.abspath(path)
    for target in (given, os.path.realpath(given)):
        prefix = "/"
        for part in Path(target).parts[1:]:
            prefix = os.path.join(prefix, part)
            try:
                st = os.lstat(prefix)
            except FileNotFoundError:
                raise ValueError(f"folder {prefix!r} does not exist") from None
            _check(prefix, st)
    return Path(os.path.realpath(given))


def private_folder(path: str | os.PathLike, *, create: bool = False) -> Path:
    """``path`` as this user's own folder: its parent trusted, itself a real directory owned by
    this user that no other user may write. A missing one is created 0700 when ``create``
    (else returned as it is: whoever binds creates it). ValueError naming what is wrong."""
    path = Path(os.path.abspath(path))
    parent = trusted_folder(path.parent)
    path = parent / path.name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            return path
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:  # someone was faster: check what is there now
            st = os.lstat(path)
        else:
            os.chmod(path, DIR_MODE)  # exact, whatever the umask
            return path
    if not stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
        raise ValueError(f"refusing {str(path)!r}: not a directory of this user's (a link or a "
                         "file is in its place)")
    if st.st_uid != os.getuid():
        raise ValueError(f"refusing {str(path)!r}: owned by uid {st.st_uid}, not {os.getuid()}")
    if st.st_mode & 0o022:
        raise ValueError(f"refusing {str(path)!r}: writable by other users "
                         f"(mode {oct(st.st_mode & 0o777)})")
    return path


def open_private(path: str | os.PathLike, flags: int) -> int:
    """``os.open(path, flags)`` of this user's regular file in a trusted folder, never through a
    link, created 0600; the descriptor is checked and tightened to 0600. ValueError (nothing
    opened) when the file is a link, not regular, or another user's."""
    path = Path(path)
    folder = trusted_folder(path.parent)
    try:
        fd = os.open(folder / path.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     FILE_MODE)
    except OSError as exc:
        if os.path.islink(folder / path.name):
            raise ValueError(f"refusing {str(path)!r}: a link is in its place") from None
        raise ValueError(f"cannot open {str(path)!r}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise ValueError(f"refusing {str(path)!r}: not a regular file of this user's "
                             f"(uid {st.st_uid})")
        if stat.S_IMODE(st.st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def runtime_dir(*, create: bool = False) -> Path:
    """This user's runtime folder (see the module docstring), created when ``create``.
    ValueError with the remedy when none is usable."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        try:
            return private_folder(xdg)
        except ValueError as exc:
            log.warning("XDG_RUNTIME_DIR is not private (%s): not using it", exc)
    shared = Path(tempfile.gettempdir()) / f"gpukv-{os.getuid()}"
    try:
        return private_folder(shared, create=create)
    except ValueError as exc:
        taken = exc
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    fallback = Path(cache) / "gpukv" / "run"
    if not create and not os.path.lexists(fallback):
        return fallback  # where the server would create it
    try:
        if create:
            private_folder(fallback.parent.parent, create=True)  # the cache home itself
            private_folder(fallback.parent, create=True)
        folder = private_folder(fallback, create=create)
    except (ValueError, OSError) as exc:
        raise ValueError(f"no private runtime folder for gpukv: {taken}, and {fallback}: {exc}. "
                         "Remove the other user's folder, set XDG_RUNTIME_DIR to a folder of "
                         "yours (mode 0700), or pass an address in a folder of yours") from None
    log.log(logging.WARNING if create else logging.DEBUG, "%s; using %s instead", taken, folder)
    return folder
