"""Trusted folders, private folders and private files (:mod:`gpukv.private_paths`): nothing is
followed through another user's link or planted folder; this user's runtime folder falls back
when another user holds its name, and says what to do when nothing is usable."""

from __future__ import annotations

import os
import shutil
import stat

import pytest

from gpukv.private_paths import open_private, private_folder, runtime_dir, trusted_folder
from other_user import OTHER_UID, as_other_user, as_root, point_at, shared_folder


def test_trusted_and_private_folders(tmp_path):
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    assert trusted_folder(sticky) == sticky  # like /tmp
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(ValueError, match="writable by other users"):
        trusted_folder(open_dir / "inner" / "..")
    with pytest.raises(ValueError, match="does not exist"):
        trusted_folder(tmp_path / "missing")
    mine = private_folder(sticky / "mine", create=True)
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700
    (sticky / "link").symlink_to(mine)
    with pytest.raises(ValueError, match="a link or a file is in its place"):
        private_folder(sticky / "link")
    mine.chmod(0o770)
    with pytest.raises(ValueError, match="writable by other users"):
        private_folder(mine)
    assert private_folder(sticky / "later") == sticky / "later"  # not created without create


def test_private_files_are_never_opened_through_a_link_or_a_fifo(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep\n")
    victim.chmod(0o644)
    (tmp_path / "lock").symlink_to(victim)
    with pytest.raises(ValueError, match="a link is in its place"):
        open_private(tmp_path / "lock", os.O_RDWR | os.O_CREAT)
    os.mkfifo(tmp_path / "fifo")  # opening it to write would block: it fails at once instead
    with pytest.raises(ValueError, match="not a regular file|No such device"):
        open_private(tmp_path / "fifo", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with pytest.raises(ValueError, match="not a regular file"):
        open_private(tmp_path / "fifo", os.O_RDWR | os.O_CREAT)
    assert victim.read_bytes() == b"keep\n" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    loose = tmp_path / "loose"
    loose.write_bytes(b"")
    loose.chmod(0o644)
    os.close(open_private(loose, os.O_RDWR))
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600  # tightened through the descriptor


@as_root
def test_another_users_files_links_and_folders_are_refused(tmp_path):
    shared = shared_folder("gpukv-test-shared-")
    try:
        victim = tmp_path / "victim"
        victim.write_bytes(b"keep\n")
        as_other_user("ln", "-s", victim, shared / "their-link")
        with pytest.raises(ValueError, match="a link is in its place"):
            open_private(shared / "their-link", os.O_RDWR | os.O_CREAT)
        as_other_user("touch", shared / "their-file")
        with pytest.raises(ValueError, match=f"uid {OTHER_UID}"):
            open_private(shared / "their-file", os.O_RDWR | os.O_CREAT)
        as_other_user("mkdir", "-m", "0700", shared / "theirs")
        with pytest.raises(ValueError, match=f"owned by uid {OTHER_UID}"):
            private_folder(shared / "theirs", create=True)
        as_other_user("ln", "-s", tmp_path, shared / "dir-link")
        with pytest.raises(ValueError, match=f"a link owned by uid {OTHER_UID}"):
            trusted_folder(shared / "dir-link")
    finally:
        shutil.rmtree(shared)


@as_root
def test_runtime_folder_falls_back_when_another_user_holds_its_name(tmp_path, monkeypatch):
    shared, home = shared_folder("gpukv-test-tmp-"), tmp_path / "home"
    home.mkdir(mode=0o700)
    try:
        point_at(monkeypatch, shared, home)
        assert runtime_dir(create=True) == shared / f"gpukv-{os.getuid()}"  # nobody took it
        os.rmdir(shared / f"gpukv-{os.getuid()}")
        as_other_user("mkdir", "-m", "0777", shared / f"gpukv-{os.getuid()}")
        assert runtime_dir() == home / ".cache" / "gpukv" / "run"  # what a client computes
        folder = runtime_dir(create=True)  # what the server creates
        assert folder == home / ".cache" / "gpukv" / "run"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        # when even the fallback is another user's, the message says what to do
        cache = shared / "their-cache"
        as_other_user("mkdir", "-m", "0755", cache)
        monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
        with pytest.raises(ValueError, match="set XDG_RUNTIME_DIR to a folder of yours"):
            runtime_dir(create=True)
    finally:
        shutil.rmtree(shared)
