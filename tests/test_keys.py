import subprocess
import sys

import numpy as np
import pytest
import torch

from gpukv.engine.keys import (KEY_VERSION, KeySpace, chunk_hashes, layout_digest, parse_tier_key,
                               request_seed)


def test_full_chunks_only_and_chained():
    tokens = list(range(1000))
    hashes = chunk_hashes(tokens, 256)
    assert len(hashes) == 3 and all(len(h) == 16 for h in hashes)
    # the chain: a prefix gives the same leading hashes, a changed early token changes all later ones
    assert chunk_hashes(tokens[:512], 256) == hashes[:2]
    changed = list(tokens)
    changed[10] = 99999
    other = chunk_hashes(changed, 256)
    assert all(a != b for a, b in zip(hashes, other))
    # a change in chunk 2 leaves chunks 0 and 1 alone
    changed = list(tokens)
    changed[600] = 7
    assert chunk_hashes(changed, 256)[:2] == hashes[:2] and chunk_hashes(changed, 256)[2] != hashes[2]


def test_same_hashes_for_list_numpy_tensor_and_other_process():
    tokens = list(range(5, 5 + 64))
    assert chunk_hashes(range(5, 69), 16) == chunk_hashes(tokens, 16)
    ref = chunk_hashes(tokens, 16)
    assert chunk_hashes(np.array(tokens, dtype=np.int32), 16) == ref
    assert chunk_hashes(torch.tensor(tokens, dtype=torch.int64), 16) == ref
    code = "from gpukv.engine.keys import chunk_hashes; print(chunk_hashes(list(range(5, 69)), 16)[3].hex())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.stdout.strip() == ref[3].hex()


def test_any_sequence_of_ints_hashes_like_a_list_and_others_are_refused():
    from collections.abc import Sequence

    class Constant(Sequence):  # like vLLM's ConstantList: a read-only view of a list
        def __init__(self, items):
            self._items = items

        def __getitem__(self, i):
            return self._items[i]

        def __len__(self):
            return len(self._items)

    tokens = list(range(1000, 1064))
    assert chunk_hashes(Constant(tokens), 16) == chunk_hashes(tokens, 16) == chunk_hashes(tuple(tokens), 16)
    for bad in ("abcd", b"abcd", {1, 2, 3, 4}, Constant([1, 2.0, 3, 4])):
        with pytest.raises(ValueError, match="token_ids"):
            chunk_hashes(bad, 1)


def test_seed_isolates_tenants():
    tokens = list(range(64))
    assert chunk_hashes(tokens, 16, seed=b"tenant-a") != chunk_hashes(tokens, 16, seed=b"tenant-b")
    assert chunk_hashes(tokens, 16, seed=b"tenant-a") == chunk_hashes(tokens, 16, seed=b"tenant-a")


def test_short_prompt_has_no_hash():
    assert chunk_hashes([1, 2, 3], 16) == []
    assert chunk_hashes([], 16) == []


@pytest.mark.parametrize("bad", [0, -1, 2.5, "16"])
def test_bad_chunk_size(bad):
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_hashes([1, 2, 3], bad)


@pytest.mark.parametrize("bad", [[[1, 2]], [1.5, 2.5], torch.zeros(4), torch.zeros(2, 2, dtype=torch.int64)])
def test_bad_tokens(bad):
    with pytest.raises(ValueError, match="token_ids"):
        chunk_hashes(bad, 2)


def test_key_space_text_form_parses_back_and_is_versioned():
    h = bytes(range(16))
    space = KeySpace("meta-llama/Llama-3.1-8B", layout_digest("kind=mha;..."), 1, 7)
    (key,) = space.keys([h])
    assert key == h + space.suffix and len(key) == 20
    text = space.tier_key(key)
    assert text.startswith(f"v{KEY_VERSION}/meta-llama/Llama-3.1-8B/") and text.endswith(h.hex())
    assert parse_tier_key(text) == ("meta-llama/Llama-3.1-8B", space.layout, 1, h)
    assert parse_tier_key(f"m/1/{h.hex()}") is None  # the old (v1) format: a miss, not an error
    other = KeySpace("meta-llama/Llama-3.1-8B", space.layout, 0, 8)
    assert other.keys([h]) != space.keys([h])  # another rank's shard is another object


def test_extras_change_only_their_chunk_and_later_ones():
    tokens = list(range(64))
    base = chunk_hashes(tokens, 16)
    mm = chunk_hashes(tokens, 16, extras=[None, b"image-hash"])
    assert mm[0] == base[0] and mm[1] != base[1] and mm[2] != base[2]
    assert chunk_hashes(tokens, 16, extras=[None, b"other"])[1] != mm[1]
    with pytest.raises(ValueError, match=r"extras\[0\]"):
        chunk_hashes(tokens, 16, extras=["not bytes"])


def test_request_seed_separates_parts_and_absent_is_empty():
    assert request_seed(None, None) == b""
    assert request_seed("ab", "c") != request_seed("a", "bc")
    assert request_seed("salt", None) != request_seed(None, "salt")
    assert chunk_hashes(range(16), 16, seed=request_seed("lora-a")) != \
        chunk_hashes(range(16), 16, seed=request_seed("lora-b"))


@pytest.mark.parametrize("bad", [[2**64 - 1], [2**63], np.array([2**64 - 1], dtype=np.uint64),
                                 torch.tensor([True, False]), [1, "2"]])
def test_token_ids_outside_int64_are_refused_not_wrapped(bad):
    with pytest.raises(ValueError, match="token_ids"):
        chunk_hashes(bad, 1)


def test_hashing_only_the_new_chunks_after_the_last_hash_continues_the_chain():
    tokens = list(range(10 * 16 + 5))
    whole = chunk_hashes(tokens, 16, seed=b"salt", extras=[None] * 7 + [b"img"])
    first = chunk_hashes(tokens[:4 * 16], 16, seed=b"salt")
    rest = chunk_hashes(tokens[4 * 16:], 16, after=first[-1], extras=[None] * 3 + [b"img"])
    assert first + rest == whole
    with pytest.raises(ValueError, match="16-byte chunk hash"):
        chunk_hashes(tokens, 16, after=b"short")
