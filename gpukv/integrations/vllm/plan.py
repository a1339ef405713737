"""The step plan: what the scheduler side hands every worker for one engine step, and the plain
values the planner reads from vLLM (the connector translates vLLM's objects, see
:mod:`.translate`; nothing here imports vLLM).

The workers see no requests: all they load or store reaches them in a :class:`StepPlan`. Under
pipeline parallelism each stage's workers run the same plan on their own layers, under their
stage's request id on the server (:func:`stage_request_id`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from gpukv.integrations.vllm.keys import MMItem


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """A request as the planner needs it. ``token_ids``: prompt + outputs so far (vLLM's live
    ``all_token_ids`` view); ``seed``/``mm_items``: see :mod:`.keys`; ``cacheable``: False for
    prompt embeddings or ``skip_reading_prefix_cache`` (no lookup; stores still happen unless
    prompt embeddings)."""

    request_id: str
    token_ids: Sequence[int]
    seed: bytes = b""
    mm_items: tuple[MMItem, ...] = ()
    lookup: bool = True
    store: bool = True


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    """One request of a ``SchedulerOutput``. ``block_ids``: the whole block table for a new or
    resumed request (``replace_blocks``), else the blocks added this step (or None)."""

    request_id: str
    block_ids: Sequence[int] | None
    replace_blocks: bool
    num_computed_tokens: int
    num_scheduled_tokens: int


@dataclass(frozen=True, slots=True)
class StepView:
    requests: Sequence[ScheduledRequest]
    preempted: frozenset[str] = frozenset()
    finished: frozenset[str] = frozenset()


@dataclass(slots=True)
class LoadSpec:
    """Retrieve ``token_ids`` (int64, a whole number of chunks) into ``slot_mapping`` (int64, one
    slot per token, ``-1`` for tokens vLLM already holds). ``block_ids``: the blocks vLLM counts as
    loaded, reported if the load fails. Empty ``token_ids``: the load cannot be done (the
    request's blocks do not reach the end of the chunks to load); the workers report
    ``block_ids`` as failed."""

    request_id: str
    token_ids: np.ndarray
    slot_mapping: np.ndarray
    block_ids: list[int]
    seed: bytes
    extras: list[bytes] | None


@dataclass(slots=True)
class StoreSpec:
    """Store the full chunks of ``token_ids`` (int64, from token 0) from ``slot_mapping``."""

    request_id: str
    token_ids: np.ndarray
    slot_mapping: np.ndarray
    seed: bytes
    extras: list[bytes] | None


@dataclass(slots=True)
class StepPlan:
    """What the workers do in one engine step (carried in the connector metadata).

    ``released``: finished requests whose blocks vLLM kept because a load for them was planned
    in a step that may not have run when they finished (the abort fence, see
    :mod:`.planner`); every worker reports them finished (vLLM's ``finished_sending``) once
    this step's plan reaches it, which is after every earlier step's loads ran."""

    step: int
    loads: list[LoadSpec] = field(default_factory=list)
    stores: list[StoreSpec] = field(default_factory=list)
    released: list[str] = field(default_factory=list)


def stage_request_id(request_id: str, stage: int, num_stages: int) -> str:
    """The server's request id of one pipeline stage's part of a request (the server keeps one
    model per request id): the vLLM id itself without pipeline parallelism."""
    return request_id if num_stages == 1 else f"{request_id}@pp{stage}"
