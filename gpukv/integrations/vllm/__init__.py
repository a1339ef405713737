"""gpukv's vLLM KV connector: ``kv_connector_module_path="gpukv.integrations.vllm"``,
``kv_connector="GpukvConnector"``.

``GpukvConnector`` is imported lazily (it needs vLLM); the planning modules of this package do not
import vLLM, so they are testable without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GpukvConnector"]


def __getattr__(name: str) -> Any:
    if name == "GpukvConnector":
        from gpukv.integrations.vllm.connector import GpukvConnector

        return GpukvConnector
    raise AttributeError(f"module 'gpukv.integrations.vllm' has no attribute {name!r}")
