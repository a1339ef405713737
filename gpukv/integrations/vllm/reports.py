"""What the scheduler side tells vLLM and the server beyond loads and stores: which gpukv tier
served each external hit (vLLM's ``get_external_cache_hit_sources``, :mod:`.tier_hits`), the
hit tokens per tier in the connector stats (:mod:`.stats`), the descriptions of this engine's
chunks as vLLM blocks and its share of the server's vLLM events (:mod:`.block_meta`,
:mod:`.events`). The connector calls one method per vLLM hook.
"""

from __future__ import annotations

import logging
from typing import Any

from gpukv.integrations.vllm.block_meta import BlockDescriber
from gpukv.integrations.vllm.kv_groups import Parts
from gpukv.integrations.vllm.plan import StepView
from gpukv.integrations.vllm.stats import TransferRecorder
from gpukv.integrations.vllm.tier_hits import VLLM_SOURCE, TierLookups

log = logging.getLogger(__name__)


class SchedulerReports:
    """``client``: the scheduler's guarded client; ``parts``: the engine's pipeline stages x KV
    cache groups (a hit's source is the farthest of its parts'; the KV events describe the
    chunks of every stage's first full-attention group, the blocks a router matches prefixes on). :attr:`lookups` is the client the planner must
    use (it records the hits' sources)."""

    def __init__(self, client: Any, parts: Parts | list[str], *, tp_size: int, block_size: int,
                 store: bool, kv_events: bool) -> None:
        self.parts = parts = parts if isinstance(parts, Parts) else Parts.of(parts)
        described = next((g for g, group in enumerate(parts.groups) if not group.sliding), 0)
        models = [parts.key(s, described) for s in range(parts.num_stages)]
        self.lookups = TierLookups(client, client.chunk_size)
        self.stats = TransferRecorder()
        self._local: dict[str, int] = {}  # vLLM's own hit at the request's last lookup
        self.blocks: BlockDescriber | None = None
        if "vllm_blocks" not in client.server_info.get("features", ()):
            if kv_events:
                log.warning("gpukv: the blocks gpukv holds are not in this engine's KV events: "
                            "start gpukv serve with --vllm-events ADDRESS")
        elif kv_events or store:
            self.blocks = BlockDescriber(client, models=models, tp_size=tp_size, block_size=block_size,
                                         chunk_size=client.chunk_size, describe=store,
                                         take_events=kv_events)

    def asked(self, request: Any, num_computed_tokens: int) -> None:
        """vLLM asks how much gpukv holds beyond its own ``num_computed_tokens``."""
        self._local[request.request_id] = num_computed_tokens
        if self.blocks is not None:
            self.blocks.track(request)

    def hit_sources(self, request_id: str, num_external_tokens: int) -> dict[str, int]:
        """vLLM's ``CacheHitSource`` member names -> tokens of the external hit (recorded in the
        stats under gpukv's source names); ``EXTERNAL_UNSPECIFIED`` when unknown."""
        split = self.lookups.split(self._prefix_ids(request_id), self._local.get(request_id, 0),
                                   num_external_tokens)
        if split is None:
            return {"EXTERNAL_UNSPECIFIED": num_external_tokens}
        self.stats.hits(split)
        out: dict[str, int] = {}
        for source, tokens in split.items():
            out[VLLM_SOURCE[source]] = out.get(VLLM_SOURCE[source], 0) + tokens
        return out

    def step(self, view: StepView) -> None:
        """One engine step was planned: the scheduled requests' chunks computed by its end can
        be in gpukv."""
        if self.blocks is not None:
            for sched in view.requests:
                self.blocks.computed(sched.request_id, sched.num_computed_tokens + sched.num_scheduled_tokens)

    def finished(self, request_id: str) -> None:
        self._local.pop(request_id, None)
        self.lookups.forget(self.parts.request_ids(request_id))
        if self.blocks is not None:
            self.blocks.forget(request_id)

    def _prefix_ids(self, request_id: str) -> list[str]:
        """The server request ids of the parts looked up as a prefix (a sliding window's are
        asked for other ranges: :mod:`.group_lookup`); all of them if every group slides."""
        ids = self.parts.request_ids(request_id)
        prefix = [rid for rid, (_, g) in zip(ids, self.parts.all) if not self.parts.groups[g].sliding]
        return prefix or ids

    def take_events(self) -> list[Any]:
        return self.blocks.take_events() if self.blocks is not None and self.blocks.take else []

    def close(self) -> None:
        if self.blocks is not None:
            self.blocks.close()
