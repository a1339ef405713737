"""``NullConnector``: a vLLM KV connector that moves nothing (benchmarks only).

The control arm for gpukv's connector in ``perf/sweep_vllm_bench.py``: vLLM runs its connector
path (metadata every step, ``get_finished``, the connector's hooks around the forward) with
hooks that do nothing, so what it costs is vLLM's, not gpukv's. Load it with
``"kv_connector": "NullConnector", "kv_connector_module_path": "gpukv.testing.vllm_null"``.

One setting in ``kv_connector_extra_config``: ``null.ask_again`` (default 0), how many times
``get_num_new_matched_tokens`` answers vLLM's "ask again later" (``None``) for each new request
before it answers 0 -- vLLM then skips the request for that many scheduler steps, as it does
while gpukv's lookup of a request is in flight, with no server and no copy.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    SupportsHMA,
)


class NullConnector(KVConnectorBase_V1, SupportsHMA):
    """Every hook does nothing; see the module docstring."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        ask_again = extra.get("null.ask_again", 0)
        if isinstance(ask_again, bool) or not isinstance(ask_again, int) or ask_again < 0:
            raise ValueError(f"null.ask_again must be a non-negative int, got {ask_again!r}")
        self.ask_again = ask_again
        self._asked: dict[str, int] = {}  # request id: None answers given so far
        self.num_none = 0

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        asked = self._asked.get(request.request_id, 0)
        if asked < self.ask_again:
            self._asked[request.request_id] = asked + 1
            self.num_none += 1
            return None, False
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        pass

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return KVConnectorMetadata()

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._asked.pop(request.request_id, None)
        return False, None

    def request_finished_all_groups(self, request: Any, block_ids: tuple[list[int], ...]
                                    ) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished(request, [])

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        pass

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        pass

    def wait_for_save(self) -> None:
        pass
