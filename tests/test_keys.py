import subprocess
import sys

import numpy as np
import pytest
import torch

from gpukv.engine.keys import ObjectKey, chunk_hashes


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
    ref = chunk_hashes(tokens, 16)
    assert chunk_hashes(np.array(tokens, dtype=np.int32), 16) == ref
    assert chunk_hashes(torch.tensor(tokens, dtype=torch.int64), 16) == ref
    code = "from gpukv.engine.keys import chunk_hashes; print(chunk_hashes(list(range(5, 69)), 16)[3].hex())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.stdout.strip() == ref[3].hex()


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


def test_object_key_text_form():
    h = bytes(range(16))
    assert ObjectKey("m", 1, h).to_str() == f"m/1/{h.hex()}"
    assert ObjectKey("m", 0, h, "t1").to_str() == f"m/0/{h.hex()}/t1"
    assert ObjectKey("m", 0, h) == ObjectKey("m", 0, h) and hash(ObjectKey("m", 0, h)) == hash(ObjectKey("m", 0, h))
