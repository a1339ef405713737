"""The repository root holds no package that could shadow another project's.

``python -m pytest`` (the README's test command) puts the repository root first on ``sys.path``:
a folder there named like a PyPI package is imported instead of it. A root folder ``kernels/``
did exactly that to transformers >= 5.20, whose ``import kernels`` found gpukv's Triton code and
failed two test modules at collection.
"""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _root_packages() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())


def test_every_package_in_the_repository_root_is_named_gpukv():
    assert _root_packages() == ["gpukv", "gpukv_kernels"]


def test_import_kernels_never_finds_the_repository():
    spec = importlib.util.find_spec("kernels")
    if spec is not None:  # transformers' dependency, when installed: from site-packages
        locations = [spec.origin, *(spec.submodule_search_locations or [])]
        assert all(loc is None or Path(loc).parent != ROOT for loc in locations), locations


def test_the_wheel_lists_every_package_the_editable_install_imports():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    on_disk = sorted(".".join(p.parent.relative_to(ROOT).parts) for p in ROOT.glob("gpukv*/**/__init__.py"))
    assert "gpukv.integrations.vllm" in on_disk
    for name in on_disk:
        assert any(name == pat or (pat.endswith(".*") and name.startswith(pat[:-1]))
                   for pat in include), name
