"""The scheduler's lookup of every part of an engine (pipeline stage x KV cache group,
:mod:`.kv_groups`), as one call on its calls thread: how many leading tokens each part can
serve. Without a sliding-window group that is one prefix lookup per part; a sliding-window part
is asked only for what the hit needs.

A full-attention part serves a prefix: every chunk from the first. A sliding-window part serves
a hit ending at ``E`` when it holds the chunks of the window before ``E`` (vLLM writes only the
blocks inside it; the older ones are its null block). Its chunks may have holes -- a chunk
whose blocks vLLM had freed by the step that completed it is not stored (a prefill split over
steps, decode) -- so asking it for a prefix would stop a hit at the first hole. The rounds, on
the calls thread:

1. every full-attention part, as a prefix: the hit ``H`` is the shortest answer;
2. every sliding part, as a prefix of ``[0, H)``: a part holding all of it serves ``H``;
3. a part that stops short at ``P`` is asked for the chunks from the window of ``H`` on
   (``window_chunks`` before ``H``): all present serves ``H``; else ``k`` of them, at least a
   window's worth, serve ``first + k``; else it serves ``P`` (every chunk before it is there).

The answers are tokens, one per part; the hit is the shortest (each answer is an end whose
window that part holds, and every full-attention part holds every chunk before it, so the
shortest is served by all). A sliding part's shares lie on the chunks it was asked for and go
with the request's end (its ranges are not the prefix's: :class:`.planner.SchedulerPlanner`
frees no range of them).
"""

from __future__ import annotations

from typing import Any, Sequence

from gpukv.integrations.vllm.kv_groups import KVGroup


def window_chunks(group: KVGroup, chunk_size: int) -> int:
    """Chunks of a sliding window before a hit's end that a hit needs (its end may be one token
    short of a chunk boundary: vLLM recomputes a prompt's last token)."""
    return -(-group.window // chunk_size)


def lookup_parts(client: Any, keys: Sequence[str], request_ids: Sequence[str], groups: Sequence[KVGroup],
                 hashes: list[bytes], chunk_size: int, **options: Any) -> list[int]:
    """Each part's answer in tokens (see the module docstring); ``keys``, ``request_ids`` and
    ``groups`` per part; ``options``: ``lookup_hashes``'s (tp_size, loadable)."""
    answers: list[int | None] = [None] * len(keys)
    for i, group in enumerate(groups):
        if not group.sliding:
            answers[i] = int(client.lookup_hashes(keys[i], hashes, request_id=request_ids[i], **options))
    full = [a for a in answers if a is not None]
    hit_chunks = (min(full) if full else len(hashes) * chunk_size) // chunk_size
    for i, group in enumerate(groups):
        if not group.sliding:
            continue
        if hit_chunks == 0:
            answers[i] = 0
            continue
        prefix = int(client.lookup_hashes(keys[i], hashes[:hit_chunks], request_id=request_ids[i],
                                          **options)) // chunk_size
        answers[i] = prefix * chunk_size
        need = window_chunks(group, chunk_size)
        first = max(0, hit_chunks - need)
        if prefix >= hit_chunks or first <= prefix:
            continue  # all of it, or a window ending at the prefix's end is all the part can say
        k = int(client.lookup_hashes(keys[i], hashes[first:hit_chunks], request_id=request_ids[i],
                                     **options)) // chunk_size
        if k == hit_chunks - first or k >= need:
            answers[i] = (first + k) * chunk_size
    return [int(a) for a in answers]
