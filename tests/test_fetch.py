"""fetch_run: one remote round trip per lookup, local files only for the run, exact counts of the
calls each tier gets (in-memory tiers record every call)."""

from __future__ import annotations

import torch

from gpukv.tiers.fetch import fetch_run

FP = "fp"
NBYTES = 8


def value(key: str) -> torch.Tensor:
    return torch.tensor(list(key.encode()[:NBYTES].ljust(NBYTES, b".")), dtype=torch.uint8)


class MemoryTier:
    """A tier in a dict; ``bad`` keys are listed by contains_many but fail to load."""

    def __init__(self, name: str, keys: list[str], *, local_index: bool,
                 bad: tuple[str, ...] = ()) -> None:
        self.name = name
        self.local_index = local_index
        self.data = {k: value(k) for k in keys}
        self.bad = set(bad)
        self.calls: list[tuple] = []

    def contains_many(self, keys):
        self.calls.append(("contains", list(keys)))
        return [k in self.data for k in keys]

    def load_many(self, keys, fingerprint, nbytes, *, budget_s=None):
        assert (fingerprint, nbytes) == (FP, NBYTES)
        self.calls.append(("load", list(keys), budget_s))
        return [None if k in self.bad else self.data.get(k) for k in keys]


def chain(n: int, ranks: int = 1) -> list[list[str]]:
    return [[f"c{i}r{r}" for r in range(ranks)] for i in range(n)]


def test_a_remote_run_is_one_load_many_and_no_exists():
    chunks = chain(16)
    remote = MemoryTier("remote", [k for c in chunks for k in c], local_index=False)
    n, found = fetch_run([remote], chunks, FP, NBYTES, budget_s=0.5)
    assert n == 16
    assert remote.calls == [("load", [c[0] for c in chunks], 0.5)]
    assert all(found[c[0]][0] == "remote" and torch.equal(found[c[0]][1], value(c[0]))
               for c in chunks)


def test_disk_then_remote_split_each_key_to_one_tier():
    chunks = chain(8, ranks=2)
    keys = [k for c in chunks for k in c]
    disk = MemoryTier("disk", keys[:6], local_index=True)       # chunks 0-2
    remote = MemoryTier("remote", keys, local_index=False)
    n, found = fetch_run([disk, remote], chunks, FP, NBYTES)
    assert n == 8
    assert remote.calls == [("load", keys[6:], None)]            # nothing disk holds
    assert disk.calls[0] == ("contains", keys)
    assert [c[1] for c in disk.calls[1:]] == [[k] for k in keys[:6]]  # its files, in order
    assert {k: t for k, (t, _) in found.items()} == {k: "disk" if i < 6 else "remote"
                                                     for i, k in enumerate(keys)}


def test_local_files_past_a_gap_are_never_read():
    chunks = chain(8)
    keys = [c[0] for c in chunks]
    disk = MemoryTier("disk", keys[:2] + keys[3:], local_index=True)  # chunk 2 is missing
    remote = MemoryTier("remote", [], local_index=False)
    n, found = fetch_run([disk, remote], chunks, FP, NBYTES)
    assert n == 2 and set(found) == set(keys[:2])
    assert remote.calls == [("load", [keys[2]], None)]
    assert [c for c in disk.calls if c[0] == "load"] == [("load", [k], None) for k in keys[:2]]


def test_a_chunk_counts_only_when_every_rank_key_is_found():
    chunks = chain(3, ranks=2)
    remote = MemoryTier("remote", ["c0r0", "c0r1", "c1r0", "c2r0", "c2r1"], local_index=False)
    n, found = fetch_run([remote], chunks, FP, NBYTES)
    assert n == 1 and set(found) == {"c0r0", "c0r1"}


def test_chunks_already_in_l1_need_nothing():
    chunks = [[], [], ["c2r0"], []]
    disk = MemoryTier("disk", ["c2r0"], local_index=True)
    remote = MemoryTier("remote", [], local_index=False)
    n, found = fetch_run([disk, remote], chunks, FP, NBYTES)
    assert n == 4 and set(found) == {"c2r0"}
    assert remote.calls == []  # everything was local: no round trip at all
    assert fetch_run([disk, remote], [[], []], FP, NBYTES) == (2, {})
    assert fetch_run([disk, remote], [], FP, NBYTES) == (0, {})


def test_a_file_that_fails_to_load_ends_the_run_there():
    chunks = chain(5)
    keys = [c[0] for c in chunks]
    disk = MemoryTier("disk", keys, local_index=True, bad=(keys[1],))
    n, found = fetch_run([disk], chunks, FP, NBYTES)
    assert n == 1 and set(found) == {keys[0]}
    assert [c[1] for c in disk.calls if c[0] == "load"] == [[keys[0]], [keys[1]]]


def test_a_down_remote_leaves_the_local_prefix():
    chunks = chain(6)
    keys = [c[0] for c in chunks]
    disk = MemoryTier("disk", keys[:3], local_index=True)
    down = MemoryTier("remote", [], local_index=False)  # answers None for everything
    n, found = fetch_run([disk, down], chunks, FP, NBYTES)
    assert n == 3 and set(found) == set(keys[:3])
    assert down.calls == [("load", keys[3:], None)]


def test_two_remote_tiers_ask_the_second_only_for_what_the_first_lacks():
    chunks = chain(4)
    keys = [c[0] for c in chunks]
    first = MemoryTier("a", keys[:2], local_index=False)
    second = MemoryTier("b", keys, local_index=False)
    n, found = fetch_run([first, second], chunks, FP, NBYTES)
    assert n == 4 and second.calls == [("load", keys[2:], None)]
    assert [found[k][0] for k in keys] == ["a", "a", "b", "b"]
