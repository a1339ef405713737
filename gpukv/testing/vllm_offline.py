"""One offline vLLM engine run in this process, results as JSON: what the vLLM tests, the demo and
the sweep start in a fresh process (engine state and crashes stay out of the caller).

    python -m gpukv.testing.vllm_offline --model DIR --prompts PROMPTS.json --out OUT.json \\
        [--tp 2] [--dtype float32] [--connector] [--extra-config '{"gpukv.address": "..."}'] \\
        [--max-tokens 8] [--logprobs 5] [--kv-cache-bytes N] [--max-model-len N] \\
        [--no-prefix-caching] [--stats-address ADDR] [--kv-role kv_producer] [--serve-stdin] \\
        [--record] [--failure-policy fail] [--kv-events-endpoint ipc://...]

``PROMPTS.json``: a list of ``{"prompt_token_ids": [...], "cache_salt"?: str, "max_tokens"?: int,
"batch"?: int}``. Prompts run one after another (each finishes before the next starts, so a
later one can reuse an earlier one's prefix); consecutive prompts with the same ``batch`` value go
into one ``generate`` call. Greedy sampling, ``ignore_eos``. ``OUT.json``::

    {"vllm_version", "import_s", "start_s", "shutdown_s", "requests": [{"request_id",
     "token_ids", "num_cached_tokens", "logprobs": [[[token, logprob], ...] per step],
     "generate_s", "server"?}]}

``generate_s`` is the wall time of the request's ``generate`` call; ``ttft_s`` vLLM's own time to
first token (``RequestOutput.metrics.first_token_latency``: from the request's arrival in the
front end to its first token there). ``--stats-address``: after each call, the gpukv
server's counters once settled (:func:`settled_counts`), read through a client of its own.

TP > 1 uses the ``mp`` executor and, unless already set, ``VLLM_CPU_OMP_THREADS_BIND`` = one core
per rank (``"0|1"``). ``LLM(...)`` lives under ``if __name__ == "__main__"`` (the mp executor
spawns).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from typing import Any, Sequence

from gpukv.testing.engine_session import engine_env, output_tail, run_group

CONNECTOR = {"kv_connector": "GpukvConnector", "kv_connector_module_path": "gpukv.integrations.vllm",
             "kv_role": "kv_both", "kv_load_failure_policy": "recompute"}
RECORDING = {"kv_connector": "RecordingGpukvConnector",
             "kv_connector_module_path": "gpukv.testing.vllm_recording"}


def engine_kwargs(model: str, *, tp: int, dtype: str, connector: bool, extra_config: dict[str, Any],
                  kv_cache_bytes: int, max_model_len: int, block_size: int | None = None,
                  prefix_caching: bool = True, kv_role: str = "kv_both",
                  attention_backend: str | None = None, record: bool = False,
                  failure_policy: str = "recompute", kv_events_endpoint: str | None = None) -> dict[str, Any]:
    """The ``LLM(...)`` arguments of a run (no tokenizer: prompts are token ids).
    ``attention_backend``: pin vLLM's choice (vLLM-CPU picks AMX_MLA, bf16 only, for MLA models
    on CPUs with AMX and CPU_MLA elsewhere: tests pin CPU_MLA to run alike on every machine).
    ``record``: load the tests' recording connector (:mod:`gpukv.testing.vllm_recording`; its
    ``gpukv_test.*`` settings go in ``extra_config``) instead of the product one.
    ``kv_events_endpoint``: vLLM publishes its KV events (``--kv-events-config``) there."""
    kwargs: dict[str, Any] = dict(model=model, skip_tokenizer_init=True, enforce_eager=True,
                                  tensor_parallel_size=tp, dtype=dtype, seed=0,
                                  kv_cache_memory_bytes=kv_cache_bytes, max_model_len=max_model_len,
                                  enable_prefix_caching=prefix_caching)
    if tp > 1:
        kwargs["distributed_executor_backend"] = "mp"
    if block_size is not None:
        kwargs["block_size"] = block_size
    if attention_backend is not None:
        kwargs["attention_backend"] = attention_backend
    if kv_events_endpoint is not None:
        kwargs["kv_events_config"] = {"enable_kv_cache_events": True, "publisher": "zmq",
                                      "endpoint": kv_events_endpoint}
    if connector:
        kwargs["kv_transfer_config"] = {**CONNECTOR, **(RECORDING if record else {}), "kv_role": kv_role,
                                        "kv_load_failure_policy": failure_policy,
                                        "kv_connector_extra_config": extra_config}
    return kwargs


def server_counts(stats: dict[str, Any]) -> dict[str, int]:
    """The counters of a gpukv ``stats()`` reply the tests and the sweep read."""
    l1 = stats["l1"]
    return {"shares": l1["shares"], "pinned": l1["pinned"], "objects": l1["objects"],
            "open_requests": stats["open_requests"], "stored_chunks": stats["stored_chunks"],
            "retrieved_chunks": stats["retrieved_chunks"], "lookups": stats["lookups"],
            "hit_chunks_l1": stats["hit_chunks_l1"], "instances": stats["instances"]}


def settled_counts(client: Any, timeout_s: float = 20.0) -> dict[str, int]:
    """:func:`server_counts` once no share, pin or open request is left, or after ``timeout_s``
    (the last reading: a leak never settles). A request whose blocks an asynchronous store held
    ends a step or two after its last output reached the caller (the engine keeps stepping until
    its workers report it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = server_counts(client.stats())
        if (counts["shares"], counts["pinned"], counts["open_requests"]) == (0, 0, 0) \
                or time.monotonic() > deadline:
            return counts
        time.sleep(0.01)


def _request_result(out: Any, generate_s: float) -> dict[str, Any]:
    completion = out.outputs[0]
    steps = []
    for step in completion.logprobs or []:
        ranked = sorted(step.items(), key=lambda kv: kv[1].rank)
        steps.append([[int(token), float(lp.logprob)] for token, lp in ranked])
    metrics = getattr(out, "metrics", None)
    ttft = getattr(metrics, "first_token_latency", None) if metrics is not None else None
    return {"request_id": out.request_id, "token_ids": list(completion.token_ids),
            "num_cached_tokens": out.num_cached_tokens, "logprobs": steps, "generate_s": generate_s,
            "ttft_s": ttft or None}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.tp > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(args.tp)))
    t0 = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams

    t1 = time.perf_counter()
    llm = LLM(**engine_kwargs(args.model, tp=args.tp, dtype=args.dtype, connector=args.connector,
                              extra_config=json.loads(args.extra_config),
                              kv_cache_bytes=args.kv_cache_bytes, max_model_len=args.max_model_len,
                              block_size=args.block_size, prefix_caching=not args.no_prefix_caching,
                              kv_role=args.kv_role, attention_backend=args.attention_backend,
                              record=args.record, failure_policy=args.failure_policy,
                              kv_events_endpoint=args.kv_events_endpoint),
              disable_log_stats=False)
    t2 = time.perf_counter()
    if args.serve_stdin:
        _serve_stdin(llm, SamplingParams, args)
        prompts = []
    else:
        with open(args.prompts, encoding="utf-8") as f:
            prompts = json.load(f)
    stats = None
    if args.stats_address:
        from gpukv.frontend.client import CacheClient

        stats = CacheClient(args.stats_address, ping_interval_s=0)
    results = []
    batches = itertools.groupby(enumerate(prompts), key=lambda ip: ip[1].get("batch", f"solo-{ip[0]}"))
    for _, group in batches:
        items = [item for _, item in group]
        params = [SamplingParams(max_tokens=item.get("max_tokens", args.max_tokens), temperature=0.0,
                                 logprobs=args.logprobs, ignore_eos=True) for item in items]
        engine_prompts = [{k: v for k, v in item.items() if k in ("prompt_token_ids", "cache_salt")}
                          for item in items]
        t = time.perf_counter()
        outs = llm.generate(engine_prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t
        counts = settled_counts(stats) if stats is not None else None
        for out in outs:
            results.append({**_request_result(out, elapsed), "server": counts})
    if stats is not None:
        stats.close()
    t3 = time.perf_counter()
    llm.llm_engine.engine_core.shutdown()
    del llm
    return {"vllm_version": vllm.__version__, "import_s": t1 - t0, "start_s": t2 - t1,
            "shutdown_s": time.perf_counter() - t3, "requests": results}


RESULT_MARK = "GPUKV-RESULT "


def _serve_stdin(llm: Any, sampling_params: Any, args: argparse.Namespace) -> None:
    """``--serve-stdin``: one prompt item (JSON) per input line, run alone; its result is printed
    as one line ``RESULT_MARK + JSON`` (vLLM's own log lines share stdout); ``"quit"`` ends it. A
    line ``RESULT_MARK + "ready"`` says the engine is up."""
    import sys

    print(RESULT_MARK + json.dumps("ready"), flush=True)
    for line in sys.stdin:
        if line.strip() in ("", '"quit"'):
            break
        item = json.loads(line)
        params = sampling_params(max_tokens=item.get("max_tokens", args.max_tokens), temperature=0.0,
                                 logprobs=args.logprobs, ignore_eos=True)
        prompt = {k: v for k, v in item.items() if k in ("prompt_token_ids", "cache_salt")}
        t = time.perf_counter()
        (out,) = llm.generate([prompt], params, use_tqdm=False)
        print(RESULT_MARK + json.dumps(_request_result(out, time.perf_counter() - t)), flush=True)


def spawn(workdir: str | os.PathLike, model: str | os.PathLike, prompts: list[dict[str, Any]], *,
          args: Sequence[str] = (), extra_config: dict[str, Any] | None = None, connector: bool = True,
          timeout_s: float = 600.0) -> dict[str, Any]:
    """Run this module in a fresh process over ``prompts`` (written to ``workdir``); returns its
    JSON result. ``args``: more command-line options (``--tp 2`` ...). ``RuntimeError`` with the
    engine's output tail if it fails or runs past ``timeout_s`` (its processes are then killed:
    :func:`run_group`)."""
    import sys
    from pathlib import Path

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    prompts_path, out_path = workdir / "prompts.json", workdir / "out.json"
    prompts_path.write_text(json.dumps(prompts))
    cmd = [sys.executable, "-m", "gpukv.testing.vllm_offline", "--model", str(model),
           "--prompts", str(prompts_path), "--out", str(out_path),
           "--extra-config", json.dumps(extra_config or {}), *args]
    if connector:
        cmd.append("--connector")
    try:
        rc = run_group(cmd, env=engine_env(), timeout_s=timeout_s, log_dir=workdir / "engine-log")
    except TimeoutError as exc:
        raise RuntimeError(f"engine run {exc}") from None
    if rc != 0:
        raise RuntimeError(f"engine run failed (rc {rc}): {' '.join(cmd)}\n"
                           f"{output_tail(workdir / 'engine-log')}")
    return json.loads(out_path.read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--connector", action="store_true", help="load GpukvConnector")
    p.add_argument("--record", action="store_true",
                   help="load the recording connector (gpukv.testing.vllm_recording) instead")
    p.add_argument("--failure-policy", default="recompute", choices=["recompute", "fail"],
                   help="vLLM's kv_load_failure_policy")
    p.add_argument("--kv-role", default="kv_both", choices=["kv_both", "kv_producer", "kv_consumer"])
    p.add_argument("--extra-config", default="{}", help="kv_connector_extra_config as JSON")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--logprobs", type=int, default=None)
    p.add_argument("--kv-cache-bytes", type=int, default=256 << 20)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--attention-backend", default=None, help="pin vLLM's attention backend")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn vLLM's own prefix cache off")
    p.add_argument("--kv-events-endpoint", default=None, help="vLLM's KV events on a ZMQ PUB there")
    p.add_argument("--stats-address", default=None, help="record this gpukv server's counters")
    p.add_argument("--serve-stdin", action="store_true",
                   help="read prompt items from stdin, one JSON per line (--prompts is ignored)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.prompts is None and not args.serve_stdin:
        raise SystemExit("--prompts is required (or --serve-stdin)")
    result = run(args)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
