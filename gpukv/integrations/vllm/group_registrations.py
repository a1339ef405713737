"""``GroupRegistrations``: one worker's registrations with ``gpukv serve``, one per KV cache group
(:mod:`.kv_groups`): each group's layers are an instance of their own, under the group's model
key, healed on their own after a server restart (:mod:`.registration`). The worker is registered
when every group is: a copy covers every group or none.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any, Callable, Mapping, Sequence

import torch

from gpukv.integrations.vllm.kv_groups import KVGroup
from gpukv.integrations.vllm.registration import PROBE_S, Registration
from gpukv.integrations.vllm.stats import token_bytes


class GroupRegistrations:
    """``models``: one key per group in ``groups``; the instance ids are ``instance_id`` (one
    group) or ``instance_id-g<index>``."""

    def __init__(self, client: Any, *, instance_id: str, models: Sequence[str], groups: Sequence[KVGroup],
                 tp_rank: int, tp_size: int, probe_s: float = PROBE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if len(models) != len(groups) or not groups:
            raise ValueError(f"{len(models)} model keys for {len(groups)} KV cache groups")
        self.groups = tuple(groups)
        self.all = [Registration(client, instance_id=instance_id if len(groups) == 1 else
                                 f"{instance_id}-g{group.index}", model=key, tp_rank=tp_rank,
                                 tp_size=tp_size, probe_s=probe_s, clock=clock)
                    for group, key in zip(groups, models)]
        self.token_bytes = [0] * len(groups)  # one token's KV in each group's pages

    def register(self, kv_caches: Mapping[str, torch.Tensor], backend: str) -> bool:
        """Register each group's layers of vLLM's tensors; whether every group is registered."""
        parts = [dict(kv_caches)] if len(self.groups) == 1 else [
            {name: kv_caches[name] for name in group.layer_names if name in kv_caches} for group in self.groups]
        empty = [g.index for g, layers in zip(self.groups, parts) if not layers]
        if empty:
            self.refuse(f"KV cache groups {empty} have none of vLLM's KV tensors")
            return False
        for registration, layers in zip(self.all, parts):
            registration.register(layers, backend)
        self.token_bytes = [token_bytes(r.views, r.dims) if r.views is not None else 0 for r in self.all]
        return self.registered

    def refuse(self, reason: str) -> None:
        for registration in self.all:
            registration.refuse(reason)

    @property
    def registered(self) -> bool:
        return all(r.registered for r in self.all)

    @property
    def refused(self) -> str | None:
        return next((r.refused for r in self.all if r.refused is not None), None)

    @property
    def num_registrations(self) -> int:
        return min(r.num_registrations for r in self.all)

    def heal(self, background: Callable[..., Future]) -> None:
        for registration in self.all:
            registration.heal(background)

    def close(self) -> None:
        for registration in self.all:
            registration.close()
