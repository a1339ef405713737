"""The scheduler side tells the server which vLLM blocks its chunks hold (``VLLM_BLOCKS``), for the
router-grade events of ``gpukv serve --vllm-events`` (:mod:`gpukv.ops.router_events`), and
brings back the events of the blocks this engine republishes (:mod:`.events`).

Why from the scheduler, and how:

- Only the scheduler knows a chunk's identity for vLLM: ``Request.block_hashes`` (vLLM's own
  hashes, under its ``--prefix-caching-hash-algo`` and seed), the token ids, LoRA and extra keys.
  Workers see block ids, the server gpukv chunk hashes.
- Cheap: once per engine step, for each scheduled request, the scheduler's thread copies the
  slices of its chunks that became fully computed since the last step (tokens and block hashes:
  O(new tokens), no hashing). A thread of its own hashes them into gpukv's chunk chain (the
  chunk's name on the server), converts them and sends them, in batches; a chunk already
  described to this server process is not sent again (a bounded memory of chunk hashes).
- Bounded: at most ``max_queued`` chunks wait for that thread; a request whose chunks do not fit
  is not described any further (its later chunks' names need its earlier ones): those blocks are
  not announced -- a missed routing hint, never a false one.
- Never blocking the scheduler: its part only appends to a deque; the thread's calls go through
  the guarded client (a server that does not answer costs the thread, not the engine, a timeout,
  then calls are skipped for a while).

Only chunks that can be in gpukv are described: those the engine computed or loaded (its
prefix). A chunk stored by another engine and described by it is announced with that engine's
hashes (first description wins): engines that share a model key should share vLLM's hash
algorithm and seed (vLLM's default sha256 is seeded the same in every process).
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass
from typing import Any, Sequence

from gpukv.engine.keys import chunk_hashes, request_seed
from gpukv.frontend import protocol as p
from gpukv.integrations.vllm.events import EngineEvents
from gpukv.integrations.vllm.keys import chunk_extras
from gpukv.integrations.vllm.translate import request_info

log = logging.getLogger(__name__)

MAX_QUEUED = 1 << 14  # chunks waiting for the thread
MAX_PER_CALL = 256  # chunks in one VLLM_BLOCKS
MAX_TOKENS_PER_CALL = 1 << 18  # and their tokens (a request frame is at most 8 MiB)
REMEMBERED = 1 << 16  # chunk hashes already described to this server process


@dataclass(slots=True)
class _Chunks:
    """Chunks ``[first, first + n)`` of one request, as the scheduler saw them."""

    request_id: str
    first: int
    token_ids: list[int]
    block_hashes: list
    parent: Any
    extra_keys: list | None  # per block
    seed: bytes
    mm_extras: list[bytes] | None  # gpukv's per-chunk extras of these chunks
    lora: tuple[int | None, str | None]


@dataclass(slots=True)
class _State:
    request: Any
    seed: bytes  # gpukv's request seed (cache salt, LoRA)
    mm_items: tuple  # its multimodal items (gpukv's chunk extras)
    described: int = 0  # chunks handed to the thread
    dropped: bool = False
    mm_cursor: int = 0  # vLLM's multimodal item index at the first undescribed block


class BlockDescriber:
    """See the module docstring. ``client``: the scheduler's :class:`.guard.GuardedClient`;
    ``models``: the model key per pipeline stage; ``describe``: send this engine's chunks (an
    engine that stores); ``take_events``: fetch this engine's share of the events (vLLM's KV
    events are on)."""

    def __init__(self, client: Any, *, models: Sequence[str], tp_size: int, block_size: int,
                 chunk_size: int, describe: bool = True, take_events: bool = False,
                 spec_kind: str | None = None, poll_s: float = 0.5, max_queued: int = MAX_QUEUED) -> None:
        if chunk_size % block_size:
            raise ValueError(f"chunk_size {chunk_size} is not a multiple of block_size {block_size}")
        self.client, self.models, self.tp_size = client, list(models), tp_size
        self.block_size, self.chunk_size = block_size, chunk_size
        self.describe, self.take = describe, take_events
        self.spec_kind, self.poll_s, self.max_queued = spec_kind, poll_s, max_queued
        self._per_call = max(1, min(MAX_PER_CALL, MAX_TOKENS_PER_CALL // chunk_size))
        self.events = EngineEvents()
        self._requests: dict[str, _State] = {}  # scheduler thread only
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._queued = 0  # chunks in the queue
        self._closing = False
        self._chain: dict[str, bytes] = {}  # thread only: each request's last chunk hash
        self._sent: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._epoch = None
        self.num_described = self.num_dropped = self.num_failed_calls = 0
        self._thread = threading.Thread(target=self._run, name="gpukv-blocks", daemon=True)
        self._thread.start()

    # ---- the scheduler's thread --------------------------------------------------------------
    def track(self, request: Any) -> None:
        """A request vLLM asked about (its live ``Request``, read again at each step)."""
        if self.describe and request.request_id not in self._requests \
                and getattr(request, "prompt_embeds", None) is None:  # embeds: never cached
            info = request_info(request)
            self._requests[request.request_id] = _State(request, info.seed, info.mm_items)

    def computed(self, request_id: str, num_tokens: int) -> None:
        """The request's KV covers its first ``num_tokens`` tokens after this step."""
        state = self._requests.get(request_id)
        if state is None or state.dropped:
            return
        request, cs, bpc = state.request, self.chunk_size, self.chunk_size // self.block_size
        end = min(num_tokens, len(request.all_token_ids), len(request.block_hashes) * self.block_size)
        first, last = state.described, end // cs
        if last <= first:
            return
        with self._cond:
            room = self._queued + last - first <= self.max_queued
            if room:
                self._queued += last - first
        if not room:
            state.dropped = True
            self.num_dropped += 1
            return
        hashes = request.block_hashes
        mm = chunk_extras(state.mm_items, last, cs) if state.mm_items else None
        lora = request.lora_request
        item = _Chunks(request_id, first, list(request.all_token_ids[first * cs:last * cs]),
                       list(hashes[first * bpc:last * bpc]), hashes[first * bpc - 1] if first else None,
                       _extra_keys(state, first * cs, last * cs, self.block_size), state.seed,
                       mm[first:last] if mm else None,
                       (lora.adapter_id, lora.name) if lora else (None, None))
        state.described = last
        self._put(item)

    def forget(self, request_id: str) -> None:
        """The request finished."""
        if self._requests.pop(request_id, None) is not None:
            self._put(("forget", request_id))

    def take_events(self) -> list[Any]:
        """This engine's share of the server's vLLM events since the last call (vLLM objects)."""
        return self.events.take()

    def _put(self, item: Any) -> None:
        with self._cond:
            self._queue.append(item)
            self._cond.notify()

    # ---- the thread --------------------------------------------------------------------------
    def _run(self) -> None:
        more = False
        while True:
            with self._cond:
                if not self._queue and not self._closing and not more:
                    self._cond.wait(self.poll_s if self.take else None)
                items, count = [], 0
                while self._queue and count < self._per_call:
                    item = self._queue.popleft()
                    items.append(item)
                    count += len(item.token_ids) // self.chunk_size if isinstance(item, _Chunks) else 0
                self._queued -= count
                closing = self._closing and not self._queue
            if closing:
                return
            chunks_by_lora: dict[tuple, list[p.ChunkBlocks]] = {}
            for item in items:
                if isinstance(item, tuple):
                    self._chain.pop(item[1], None)
                else:
                    chunks_by_lora.setdefault(item.lora, []).extend(self._describe(item))
            more = False
            for (lora_id, lora_name), chunks in chunks_by_lora.items():
                for i in range(0, len(chunks), self._per_call):  # one request's step may be long
                    more = self._send(chunks[i:i + self._per_call], lora_id, lora_name) or more
            if self.take and not chunks_by_lora:
                more = self._send([], None, None)

    def _describe(self, item: _Chunks) -> list[p.ChunkBlocks]:
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

        cs, bpc = self.chunk_size, self.chunk_size // self.block_size
        if item.first:
            after = self._chain.get(item.request_id)
            if after is None:  # cannot happen: a request's chunks reach this thread in order
                return []
            names = chunk_hashes(item.token_ids, cs, extras=item.mm_extras, after=after)
        else:
            names = chunk_hashes(item.token_ids, cs, extras=item.mm_extras,
                                 seed=request_seed(self.client.server_info.get("salt", ""), item.seed))
        self._chain[item.request_id] = names[-1]
        out = []
        for i, name in enumerate(names):
            if name in self._sent:
                self._sent.move_to_end(name)
                continue
            blocks = item.block_hashes[i * bpc:(i + 1) * bpc]
            parent = item.parent if i == 0 else item.block_hashes[i * bpc - 1]
            out.append(p.ChunkBlocks(
                name, [maybe_convert_block_hash(h) for h in blocks],
                None if parent is None else maybe_convert_block_hash(parent),
                item.token_ids[i * cs:(i + 1) * cs],
                None if item.extra_keys is None else item.extra_keys[i * bpc:(i + 1) * bpc]))
        return out

    def _send(self, chunks: list[p.ChunkBlocks], lora_id: int | None, lora_name: str | None) -> bool:
        """One VLLM_BLOCKS call; whether the server has more events for this engine."""
        body = p.VllmBlocks(self.models, self.tp_size, self.block_size, chunks, 0, lora_id,
                            lora_name, self.spec_kind, self.take)
        try:
            reply = self.client.vllm_blocks(body)
        except ValueError as exc:  # a description the server refuses: a bug, logged
            log.error("gpukv: the server refused this engine's block descriptions (%s)", exc)
            reply = None
        if reply is None:
            self.num_failed_calls += 1
            return False
        if reply.get("epoch") != self._epoch:  # a new server process knows none of them
            self._epoch = reply.get("epoch")
            self._sent.clear()
        for chunk in chunks:
            self._sent[chunk.chunk_hash] = None
        while len(self._sent) > REMEMBERED:
            self._sent.popitem(last=False)
        self.num_described += len(chunks)
        if self.take:
            self.events.add(self._epoch, reply.get("events") or [])
        return bool(reply.get("more"))

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (within ``timeout_s``), then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)


def _extra_keys(state: _State, start: int, end: int, block_size: int) -> list | None:
    """vLLM's published extra keys of each block of ``[start, end)`` (LoRA name, multimodal
    ``(identifier, offset)``, cache salt), as vLLM's own ``BlockStored`` carries them; None when
    the request has none."""
    request = state.request
    if not (request.lora_request or request.mm_features or request.cache_salt):
        return None
    from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys, to_event_extra_keys

    keys = []
    for s in range(start, end, block_size):
        extra, state.mm_cursor = generate_block_hash_extra_keys(request, s, s + block_size,
                                                                state.mm_cursor)
        keys.append(extra)
    out = to_event_extra_keys(keys) or [None] * len(keys)
    return [None if k is None else [list(x) if isinstance(x, tuple) else x for x in k] for k in out]
