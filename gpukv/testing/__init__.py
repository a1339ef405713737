"""Test and demo support: engine processes, tiny models, the prefix-reuse scenario, the vLLM demo
and a recording connector for the vLLM tests.

Nothing in the product's hot path imports this package (``tests/test_vllm_imports.py`` checks
it): the connector, the client and the server run without it. The CLI imports it lazily, only
for ``gpukv demo --vllm`` and ``gpukv demo --model``.
"""
