"""``RecordingGpukvConnector``: the product connector plus JSON-lines records of every hook (tests
and the vLLM benchmark only).

Load it with ``"kv_connector": "RecordingGpukvConnector", "kv_connector_module_path":
"gpukv.testing.vllm_recording"`` (``gpukv.testing.vllm_offline --record`` does). Its own settings
in ``kv_connector_extra_config`` (the product connector ignores the ``gpukv_test.`` prefix):

- ``gpukv_test.record_dir``: the folder of the records (:mod:`.vllm_records`); required;
- ``gpukv_test.record_digests``: digests of the bytes each step wrote and moved, per layer;
- ``gpukv_test.record_shares``: the shares held after each hit (one more server round trip).

Every hook runs the product connector's hook unchanged, then records what it did; the records'
fields are those the vLLM tests read.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from gpukv.integrations.vllm.connector import GpukvConnector, _plan
from gpukv.integrations.vllm.translate import request_info
from gpukv.testing.vllm_records import (HookRecorder, chunk_digests, describe_kv_caches,
                                        digest_written)


class RecordingGpukvConnector(GpukvConnector):
    """:class:`GpukvConnector` that records its hooks (see the module docstring)."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any) -> None:
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        self._recorder = HookRecorder(extra["gpukv_test.record_dir"], role.name.lower())
        self._record_digests = bool(extra.get("gpukv_test.record_digests", False))
        self._record_shares = bool(extra.get("gpukv_test.record_shares", False))
        self._kv_caches: dict[str, torch.Tensor] | None = None
        self._worker = None
        policy = vllm_config.kv_transfer_config.kv_load_failure_policy
        super().__init__(vllm_config, role, kv_cache_config)
        client = self.client
        self._record("__init__", model_key=getattr(self, "model_keys", [None])[0],
                     model_keys=getattr(self, "model_keys", None), address=self.address,
                     started_server=self.started_server, off=self.off,
                     server_pid=client.server_info.get("pid") if client is not None else None,
                     chunk_size=client.chunk_size if client is not None else None,
                     block_size=getattr(self, "block_size", None),
                     tp_size=int(vllm_config.parallel_config.tensor_parallel_size),
                     kv_role=self._kv_transfer_config.kv_role, engine_id=self._kv_transfer_config.engine_id,
                     tp_rank=None if self._worker is None else self._worker.tp_rank,
                     use_mla=bool(vllm_config.model_config.use_mla),
                     enable_prefix_caching=bool(vllm_config.cache_config.enable_prefix_caching),
                     load_failure_policy=policy,
                     load_failure_policy_now=self._kv_transfer_config.kv_load_failure_policy)

    def _record(self, hook: str, **fields: Any) -> None:
        rank = self._worker.tp_rank if self._worker is not None else None
        self._recorder.write(hook, rank, fields)

    def _failures(self) -> dict[str, int]:
        return dict(self.client.failures) if self.client is not None else {}

    def _digests(self, specs: list) -> list[dict[str, list]] | None:
        """Per planned transfer, per layer, the digests of its chunks' bytes in vLLM's pages."""
        if not (self._record_digests and self._kv_caches and specs):
            return None
        from gpukv.integrations.vllm.plan import block_slots

        slot_mappings = [block_slots(s.blocks[0], self.block_size) for s in specs]  # group 0 (the one)
        mla = self._worker.kind == "mla"
        return [{name: chunk_digests(kv.flatten(1, 2) if mla else kv, slots, self.client.chunk_size)
                 for name, kv in self._kv_caches.items()} for slots in slot_mappings]

    # ---- worker side -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.kv_transfer.kv_connector.utils import get_current_attn_backends

        super().register_kv_caches(kv_caches)
        self._kv_caches = kv_caches if self._record_digests else None
        backends = sorted({b.get_name() for b in get_current_attn_backends(self._vllm_config)})
        worker = self._worker
        self._record("register_kv_caches", backend=backends[0] if len(backends) == 1 else backends,
                     registered=bool(worker is not None and worker.registered),
                     refused=worker.refused if worker is not None else self.off,
                     **describe_kv_caches(kv_caches))

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._record("bind_connector_metadata", step=_plan(connector_metadata).step)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        super().start_load_kv(forward_context, **kwargs)
        plan = _plan(self._connector_metadata)
        loads = self._worker.last_loads if self._worker is not None else []
        self._record("start_load_kv", step=plan.step, loads=[_transfer(t) for t in loads],
                     forward=getattr(forward_context, "attn_metadata", None) is not None,
                     failures=self._failures(),
                     registrations=getattr(self._worker, "num_registrations", None),
                     digests=self._digests(plan.loads))

    def wait_for_layer_load(self, layer_name: str) -> None:
        super().wait_for_layer_load(layer_name)
        self._record("wait_for_layer_load", layer=layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        slots = getattr(attn_metadata, "slot_mapping", None)
        self._record("save_kv_layer", layer=layer_name, data_ptr=kv_layer.data_ptr(),
                     shape=list(kv_layer.shape),
                     written=digest_written(kv_layer, slots) if self._record_digests else None)

    def wait_for_save(self) -> None:
        super().wait_for_save()
        plan = _plan(self._connector_metadata)
        stores = self._worker.last_stores if self._worker is not None else []
        self._record("wait_for_save", step=plan.step,
                     stores=[dict(request_id=r, asked=n) for r, n in stores],
                     failures=self._failures(), digests=self._digests(plan.stores))

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sending, recving = super().get_finished(finished_req_ids)
        done = self._worker.take_completed() if self._worker is not None else []
        if sending or recving or done:
            self._record("get_finished", step=_plan(self._connector_metadata).step,
                         finished_sending=sorted(sending or ()), finished_recving=sorted(recving or ()),
                         transfers=[_transfer(t) for t in done])
        return sending, recving

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed = super().get_block_ids_with_load_errors()
        if failed:
            self._record("load_errors", block_ids=sorted(failed))
        return failed

    def shutdown(self) -> None:
        worker = self._worker
        self._record("shutdown", failures=self._failures(),
                     skipped=dict(self.client.skipped) if self.client is not None else {},
                     loaded_tokens=getattr(worker, "num_loaded_tokens", None),
                     stored_tokens=getattr(worker, "num_stored_tokens", None),
                     failed_loads=getattr(worker, "num_failed_loads", None))
        super().shutdown()
        if worker is not None:  # what ended while the worker drained its copies
            self._record("transfers", transfers=[_transfer(t) for t in worker.take_completed()])
        self._recorder.close()

    # ---- scheduler side ----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        t0 = time.perf_counter()
        ext, is_async = super().get_num_new_matched_tokens(request, num_computed_tokens)
        seconds = time.perf_counter() - t0
        planner = self._planner
        info = request_info(request)
        hit = planner.hit_of(info.request_id) if planner is not None else None
        shares = None
        if self._record_shares and hit:
            shares = self.client.read_count(planner.model, info.token_ids, seed=info.seed)
        chain = planner.chain_of(info.request_id) if planner is not None else None
        self._record("get_num_new_matched_tokens", request_id=info.request_id, async_load=is_async,
                     hashed=chain.num_hashed if chain is not None else None,
                     num_tokens=len(info.token_ids), num_computed_tokens=num_computed_tokens,
                     hit=hit, external=ext, seconds=seconds,
                     tp_size=planner.tp_size if planner is not None else None,
                     status=getattr(getattr(request, "status", None), "name", None),
                     num_preemptions=getattr(request, "num_preemptions", None),
                     seeded=bool(info.seed), lookups=planner.num_lookups if planner is not None else 0,
                     shares=shares)
        return ext, is_async

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        super().update_state_after_alloc(request, blocks, num_external_tokens)
        self._record("update_state_after_alloc", request_id=request.request_id,
                     num_external_tokens=num_external_tokens,
                     block_ids=[list(g) for g in blocks.get_block_ids()])

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        from gpukv.integrations.vllm.translate import step_view

        meta = super().build_connector_meta(scheduler_output)
        plan, view = _plan(meta), step_view(scheduler_output)
        self._record("build_connector_meta", step=plan.step,
                     has_sync_kv_loads=bool(getattr(scheduler_output, "has_sync_kv_loads", False)),
                     view=[[r.request_id, r.block_ids, r.replace_blocks, r.num_computed_tokens,
                            r.num_scheduled_tokens] for r in view.requests],
                     preempted=sorted(view.preempted), finished=sorted(view.finished),
                     loads=[dict(request_id=s.request_id, num_tokens=len(s.hashes) * self.client.chunk_size,
                                 num_skipped=int((s.blocks[0] < 0).sum()) * self.block_size,
                                 block_ids=s.report_blocks) for s in plan.loads],
                     stores=[dict(request_id=s.request_id, num_tokens=len(s.hashes) * self.client.chunk_size)
                             for s in plan.stores],
                     released=list(plan.released),
                     nbytes=plan.nbytes())
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        super().update_connector_output(connector_output)
        if connector_output.finished_sending or connector_output.finished_recving:
            self._record("update_connector_output",
                         finished_sending=sorted(connector_output.finished_sending or ()),
                         finished_recving=sorted(connector_output.finished_recving or ()))

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        delay, params = super().request_finished(request, block_ids)
        self._record("request_finished", request_id=request.request_id, delay=delay,
                     status=getattr(getattr(request, "status", None), "name", None),
                     num_tokens=getattr(request, "num_tokens", None))
        return delay, params


def _transfer(t: Any) -> dict[str, Any]:
    return dict(op=t.op, request_id=t.request_id, asked=t.asked, done=t.done, seconds=t.seconds,
                nbytes=t.nbytes, ok=t.ok)
