"""The compiled CPU gather / scatter (gpukv.paged.native): equal to numpy's take / put byte for
byte, bounds checked before any byte moves, and the torch CPU path bit-exact with it and without
it (numpy fallback).

Without a C compiler the native tests skip, unless GPUKV_REQUIRE_NATIVE=1 (then they fail).
"""

import contextlib
import os

import numpy as np
import pytest
import torch

from gpukv.paged import native
from gpukv.paged.native import native_copy
from paged_cases import make_cache
from paged_oracle import check_pack_unpack

NEEDS_NATIVE = pytest.mark.skipif(native_copy() is None and os.environ.get("GPUKV_REQUIRE_NATIVE") != "1",
                                  reason="no C compiler: the numpy fallback is used")


def _items(count: int, item: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, count * item, dtype=np.uint8).view(np.dtype((np.void, item)))


@NEEDS_NATIVE
@pytest.mark.parametrize("item", [1, 7, 64, 256, 656, 4096])
@pytest.mark.parametrize("ahead", [0, 3, 16, 64])
def test_gather_and_scatter_equal_numpy_take_and_put(item, ahead):
    nc = native_copy()
    items = _items(100, item, item)
    idx = np.random.default_rng(1).permutation(100)[:37]
    out, want = _items(37, item, 2), _items(37, item, 3)
    items.take(idx, 0, want)
    nc.gather(out, items, idx, ahead)
    assert out.tobytes() == want.tobytes()
    got, expected = items.copy(), items.copy()
    rows = _items(37, item, 4)
    expected.put(idx, rows)
    nc.scatter(got, idx, rows, ahead)
    assert got.tobytes() == expected.tobytes()


@NEEDS_NATIVE
@pytest.mark.parametrize("item", [1, 7, 63, 64, 65, 656, 1152, 4096, 10496])
@pytest.mark.parametrize("shift", [0, 1, 17, 48])
@pytest.mark.parametrize("ahead", [0, 3, 16, 64])
def test_streaming_stores_move_the_same_bytes_and_nothing_else(item, shift, ahead):
    """nontemporal=True: whole 64-byte lines streamed, the partial lines at each item's ends
    with ordinary stores; destinations ``shift`` bytes off a line, guard bytes around them."""
    nc = native_copy()
    count, guard = 37, 128
    idx = np.random.default_rng(item + shift).permutation(100)[:count]
    items = _items(100, item, item)
    backing = np.full(2 * guard + shift + count * item, 0xA5, dtype=np.uint8)
    out = backing[guard + shift:guard + shift + count * item].view(np.dtype((np.void, item)))
    nc.gather(out, items, idx, ahead, nontemporal=True)
    assert out.tobytes() == items[idx].tobytes()
    assert (backing[:guard + shift] == 0xA5).all() and (backing[guard + shift + count * item:] == 0xA5).all()
    rows = _items(count, item, item + 1)
    backing = np.full(2 * guard + shift + 100 * item, 0xA5, dtype=np.uint8)
    dest = backing[guard + shift:guard + shift + 100 * item].view(np.dtype((np.void, item)))
    expected = dest.copy()
    expected.put(idx, rows)
    nc.scatter(dest, idx, rows, ahead, nontemporal=True)
    assert dest.tobytes() == expected.tobytes()
    assert (backing[:guard + shift] == 0xA5).all() and (backing[guard + shift + 100 * item:] == 0xA5).all()


@NEEDS_NATIVE
def test_streaming_stores_are_used_where_the_cpu_has_avx512():
    """The compiled loop streams on an x86-64 CPU with AVX-512 and says so; elsewhere it says
    it uses ordinary stores (the same bytes: the test above runs either way)."""
    import platform

    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags")
    has = platform.machine() == "x86_64" and "avx512f" in flags
    assert native_copy().nontemporal is has


@NEEDS_NATIVE
@pytest.mark.parametrize("bad, message", [([0, 100, 1], "outside its 100 items"),
                                          ([-1, 3, 1], "outside its 100 items"),
                                          ([5, 5, 5, 5], "4 indices for 3 rows")])
def test_an_index_out_of_range_or_a_count_mismatch_is_refused_before_any_byte_moves(bad, message):
    nc = native_copy()
    items, rows = _items(100, 16, 0), _items(3, 16, 1)
    before_items, before_rows = items.tobytes(), rows.tobytes()
    for nontemporal in (False, True):
        with pytest.raises(ValueError, match=message):
            nc.gather(rows, items, np.array(bad), nontemporal=nontemporal)
        with pytest.raises(ValueError, match=message):
            nc.scatter(items, np.array(bad), rows, nontemporal=nontemporal)
    assert items.tobytes() == before_items and rows.tobytes() == before_rows
    with pytest.raises(ValueError, match="item sizes differ"):
        nc.gather(_items(3, 8, 0), items, np.arange(3))
    with pytest.raises(ValueError, match="1-D contiguous"):
        nc.gather(rows, items.reshape(10, 10), np.arange(3))


@pytest.mark.parametrize("use_native", [True, False])
@pytest.mark.parametrize("layout", ["kv_first", "cpu_split", "mla", "cross_kv_first", "flashinfer_hnd"])
@pytest.mark.parametrize("slots_kind", ["tokens", "blocks"])
def test_the_cpu_path_is_bit_exact_with_and_without_the_compiled_copy(use_native, layout, slots_kind):
    if use_native and native_copy() is None:
        pytest.skip("no C compiler")
    layers, dims, kind = make_cache(layout, num_blocks=12, block_size=16, heads=2, head_dim=8)
    gen = torch.Generator().manual_seed(5)
    if slots_kind == "blocks":
        blocks = torch.randperm(12, generator=gen)[:4]
        slots = (blocks[:, None] * 16 + torch.arange(16)).flatten()
    else:
        slots = torch.randperm(12 * 16, generator=gen)[:64]
        slots[[3, 40]] = -1  # chunks with skipped tokens take the masked path
    with contextlib.nullcontext() if use_native else native.disabled():
        check_pack_unpack(layers, dims, kind, slots, backend="torch", chunk_size=32)


def test_disabled_turns_it_off_for_the_block_only():
    before = native_copy()
    with native.disabled():
        assert native_copy() is None
    assert native_copy() is before


def test_native_copy_is_off_with_gpukv_native_0(monkeypatch):
    monkeypatch.setenv("GPUKV_NATIVE", "0")
    native._load.cache_clear()
    try:
        assert native_copy() is None
    finally:
        monkeypatch.delenv("GPUKV_NATIVE")
        native._load.cache_clear()


def test_without_a_compiler_the_build_fails_cleanly(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    native._load.cache_clear()
    try:
        assert native_copy() is None  # logged, never raised
        assert not list((tmp_path / "gpukv").glob("native-*.so"))
    finally:
        native._load.cache_clear()
    assert native.AHEAD > 0


def test_the_compiled_gather_is_built_where_ci_requires_it():
    if os.environ.get("GPUKV_REQUIRE_NATIVE") != "1":
        pytest.skip("GPUKV_REQUIRE_NATIVE is not set")
    assert native_copy() is not None, "cc is on the PATH in CI: gpukv/paged/native.py must build"


@NEEDS_NATIVE
def test_a_fresh_cache_folder_gets_a_private_build_that_works(monkeypatch, tmp_path):
    import stat

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native._load.cache_clear()
    try:
        fresh = native_copy()
        assert fresh is not None
        folder = tmp_path / "gpukv"
        (lib,) = folder.glob("native-*.so")
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and lib.stat().st_uid == os.getuid()
        assert not [p for p in folder.iterdir() if p != lib]  # no build leftovers
        items, out = _items(10, 32, 0), _items(3, 32, 1)
        fresh.gather(out, items, np.array([9, 0, 4]))
        assert out.tobytes() == items[[9, 0, 4]].tobytes()
    finally:
        native._load.cache_clear()


@NEEDS_NATIVE
def test_an_unusable_cache_home_builds_under_the_temp_directory(monkeypatch, tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("x")  # $XDG_CACHE_HOME/gpukv cannot be created, even by root
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    native._load.cache_clear()
    try:
        assert native_copy() is not None
        assert list((tmp_path / "tmp" / f"gpukv-{os.getuid()}" / "native").glob("native-*.so"))
    finally:
        native._load.cache_clear()
