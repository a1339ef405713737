"""Test plumbing for attacks by another local user: run a command as uid 65534 (``nobody``), a
shared sticky folder standing for ``/tmp``, and this user's environment pointed at it.

Simulating another user needs root (``setpriv`` or ``runuser`` to drop to 65534): the tests that
use it skip when not root, with that reason, and fail when root lacks both tools (CI runs as
root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

OTHER_UID = 65534  # nobody
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="simulating another user needs root")


def other_user_argv(*argv) -> list[str]:
    """``argv`` prefixed to run as uid/gid 65534 with no supplementary groups."""
    if shutil.which("setpriv"):
        prefix = ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups"]
    elif shutil.which("runuser"):
        prefix = ["runuser", "-u", "nobody", "--"]
    else:
        pytest.fail("running as root but neither setpriv nor runuser is installed (util-linux)")
    return [*prefix, *map(str, argv)]


def as_other_user(*argv, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run ``argv`` as uid/gid 65534 to its end; its output as text."""
    return subprocess.run(other_user_argv(*argv), check=check, capture_output=True, text=True,
                          timeout=120, **kwargs)


def shared_folder(prefix: str) -> Path:
    """A fresh root-owned 1777 folder under /tmp: every user may create entries, only their
    owner may rename or remove them (what /tmp is)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o1777)
    return folder


def point_at(monkeypatch, tmp: Path, home: Path) -> dict[str, str]:
    """This process (and its children) use ``tmp`` as the temp folder and ``home`` as HOME, with
    no XDG_RUNTIME_DIR / XDG_CACHE_HOME; returns the environment for child processes."""
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
