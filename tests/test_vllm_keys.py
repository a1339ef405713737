"""Key material and settings of the vLLM connector (no vLLM needed)."""

from __future__ import annotations

import pytest

from gpukv.integrations.vllm.config import ConnectorConfig, check_chunking
from gpukv.integrations.vllm.keys import MMItem, chunk_extras, engine_group, model_key, request_seed


def test_seeds_separate_salts_and_adapters_and_leave_plain_requests_unseeded():
    plain = request_seed(cache_salt=None, lora_name=None, lora_path=None)
    assert plain == b""
    seeds = {request_seed(cache_salt=s, lora_name=n, lora_path=p)
             for s, n, p in [("a", None, None), ("b", None, None), (None, "x", "/p"),
                             (None, "x", "/q"), ("a", "x", "/p"), ("ab", None, None), ("", None, None)]}
    assert len(seeds) == 7 and plain not in seeds
    # field boundaries are unambiguous: salt "a"+lora "b" differs from salt "ab"
    assert request_seed(cache_salt="a", lora_name="b", lora_path=None) != \
        request_seed(cache_salt="ab", lora_name=None, lora_path=None)
    with pytest.raises(TypeError, match="cache_salt must be a str"):
        request_seed(cache_salt=3, lora_name=None, lora_path=None)


def test_multimodal_items_mark_exactly_the_chunks_they_overlap_with_their_offset():
    assert chunk_extras([], 4, 32) is None
    extras = chunk_extras([MMItem("img", 40, 40)], 4, 32)  # tokens 40..79: chunks 1 and 2
    assert [bool(e) for e in extras] == [False, True, True, False]
    assert extras[1] != extras[2]  # offset relative to each chunk differs
    moved = chunk_extras([MMItem("img", 41, 40)], 4, 32)
    assert moved[1] != extras[1]
    other = chunk_extras([MMItem("img2", 40, 40)], 4, 32)
    assert other[1] != extras[1]
    assert chunk_extras([MMItem("late", 200, 10)], 4, 32) is None  # beyond the full chunks
    with pytest.raises(ValueError, match="'bad' has offset 0, length 0"):
        chunk_extras([MMItem("bad", 0, 0)], 2, 32)


def test_model_keys_differ_by_everything_that_changes_the_bytes():
    base = dict(model="/m/tiny-llama", revision=None, dtype="bfloat16", cache_dtype="auto", kind="mha",
                block_size=128, tp_size=1, attention="vec")
    key = model_key(**base)
    assert key.startswith("vllm-tiny-llama-") and key == model_key(**base)
    variants = [dict(dtype="float32"), dict(cache_dtype="fp8"), dict(block_size=32), dict(tp_size=2),
                dict(attention="amx"), dict(model="/m/other"), dict(revision="r1"), dict(kind="mla")]
    assert len({model_key(**{**base, **v}) for v in variants} | {key}) == len(variants) + 1
    with pytest.raises(ValueError, match="kind must be 'mha' or 'mla'"):
        model_key(**{**base, "kind": "gqa"})


def test_engine_groups():
    assert engine_group("e1", 0) == engine_group("e1", 0) != engine_group("e1", 1) != engine_group("e2", 1)
    assert engine_group("e1", 0, override="shared") == "shared"
    with pytest.raises(ValueError, match="engine_id"):
        engine_group("", 0)


def test_extra_config_is_validated_and_roles_pick_the_directions():
    cfg = ConnectorConfig.from_extra_config({}, kv_role="kv_both")
    assert (cfg.address, cfg.autostart, cfg.load, cfg.store) == (None, True, True, True)
    cfg = ConnectorConfig.from_extra_config({"gpukv.address": "ipc:///tmp/g.sock", "other.key": 1},
                                            kv_role="kv_consumer")
    assert (cfg.autostart, cfg.load, cfg.store) == (False, True, False)
    assert ConnectorConfig.from_extra_config({}, kv_role="kv_producer").load is False
    with pytest.raises(ValueError, match=r"unknown kv_connector_extra_config keys \['gpukv.adress'\]"):
        ConnectorConfig.from_extra_config({"gpukv.adress": "ipc:///x"}, kv_role="kv_both")
    with pytest.raises(ValueError, match="kv_role must be one of"):
        ConnectorConfig.from_extra_config({}, kv_role=None)
    with pytest.raises(ValueError, match="gpukv.address must be an ipc:// or tcp://"):
        ConnectorConfig.from_extra_config({"gpukv.address": "/tmp/x"}, kv_role="kv_both")
    with pytest.raises(ValueError, match="gpukv.chunk_size must be a positive int"):
        ConnectorConfig.from_extra_config({"gpukv.chunk_size": "256"}, kv_role="kv_both")
    with pytest.raises(ValueError, match="gpukv.relookup_s must be a positive number"):
        ConnectorConfig.from_extra_config({"gpukv.relookup_s": 0}, kv_role="kv_both")
    with pytest.raises(TypeError, match="gpukv.autostart must be a bool"):
        ConnectorConfig.from_extra_config({"gpukv.autostart": "yes"}, kv_role="kv_both")
    cfg = ConnectorConfig.from_extra_config({"gpukv.autostart_args": ["--capacity", "1GiB"],
                                             "gpukv.step_budget_s": 0.05,
                                             "gpukv_test.record_dir": "/tmp"}, kv_role="kv_both")
    assert cfg.autostart_args == ("--capacity", "1GiB") and cfg.timeout_s == 10.0
    assert (cfg.step_budget_s, cfg.lookup_wait_s) == (0.05, 1.0)  # test-only keys are not the product's
    with pytest.raises(TypeError, match="gpukv.autostart_args must be a list of str"):
        ConnectorConfig.from_extra_config({"gpukv.autostart_args": "--capacity 1GiB"}, kv_role="kv_both")
    with pytest.raises(TypeError, match="gpukv.autostart_args must be a list of str"):
        ConnectorConfig.from_extra_config({"gpukv.autostart_args": ["--capacity", 1]}, kv_role="kv_both")
    with pytest.raises(ValueError, match=r"unknown kv_connector_extra_config keys \['gpukv.record_shares'\]"):
        ConnectorConfig.from_extra_config({"gpukv.record_shares": True}, kv_role="kv_both")
    with pytest.raises(ValueError, match=r"gpukv.step_budget_s must be a number in \[0, 1\]"):
        ConnectorConfig.from_extra_config({"gpukv.step_budget_s": 5}, kv_role="kv_both")
    with pytest.raises(ValueError, match="gpukv.lookup_wait_s must be a positive number"):
        ConnectorConfig.from_extra_config({"gpukv.lookup_wait_s": -1}, kv_role="kv_both")
    with pytest.raises(ValueError, match="gpukv.group must be 16 to 128 characters, got 5"):
        ConnectorConfig.from_extra_config({"gpukv.group": "short"}, kv_role="kv_both")


def test_the_chunk_size_must_be_whole_blocks_and_match_the_configured_one():
    check_chunking(256, 128, None)
    check_chunking(256, 16, 256)
    with pytest.raises(ValueError, match="gpukv.chunk_size=512 but the server's chunk size is 256"):
        check_chunking(256, 16, 512)
    with pytest.raises(ValueError, match="chunk size 64 is not a multiple of vLLM's block size 128"):
        check_chunking(64, 128, None)


def _request(**kw):
    from types import SimpleNamespace

    base = dict(request_id="0-abc", all_token_ids=[1, 2, 3], cache_salt=None, lora_request=None,
                mm_features=[], prompt_embeds=None, skip_reading_prefix_cache=False)
    return SimpleNamespace(**{**base, **kw})


def test_request_info_takes_salt_lora_and_multimodal_items_from_vllm_field_names():
    from types import SimpleNamespace

    from gpukv.integrations.vllm.translate import request_info

    tokens = [1, 2, 3]
    plain = request_info(_request(all_token_ids=tokens))
    assert plain.seed == b"" and plain.mm_items == () and plain.lookup and plain.store
    tokens.append(4)
    assert list(plain.token_ids) == [1, 2, 3, 4]  # a live view: outputs show up
    lora = SimpleNamespace(lora_name="ad", lora_path="/a")
    feature = SimpleNamespace(identifier="h1", mm_position=SimpleNamespace(offset=2, length=5))
    info = request_info(_request(cache_salt="s", lora_request=lora, mm_features=[feature]))
    assert info.seed == request_seed(cache_salt="s", lora_name="ad", lora_path="/a")
    assert info.mm_items == (MMItem("h1", 2, 5),)
    embeds = request_info(_request(prompt_embeds=object()))
    assert (embeds.lookup, embeds.store) == (False, False)
    skip = request_info(_request(skip_reading_prefix_cache=True))
    assert (skip.lookup, skip.store) == (False, True)


def test_step_view_reads_new_cached_resumed_preempted_and_finished_requests():
    from types import SimpleNamespace

    from gpukv.integrations.vllm.translate import step_view

    out = SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id="a", block_ids=([1, 2],), num_computed_tokens=16)],
        scheduled_cached_reqs=SimpleNamespace(req_ids=["b", "c"], resumed_req_ids={"c"},
                                              new_block_ids=[None, ([7, 8, 9],)], num_computed_tokens=[40, 32]),
        num_scheduled_tokens={"a": 20, "b": 1, "c": 9}, preempted_req_ids={"d"}, finished_req_ids={"e"})
    view = step_view(out)
    assert [(r.request_id, r.block_ids, r.replace_blocks, r.num_computed_tokens, r.num_scheduled_tokens)
            for r in view.requests] == [("a", ([1, 2],), True, 16, 20), ("b", None, False, 40, 1),
                                        ("c", ([7, 8, 9],), True, 32, 9)]
    assert view.preempted == {"d"} and view.finished == {"e"}
    out.scheduled_new_reqs[0].block_ids = ([1], [0, 2])  # two groups (a sliding window's null block 0)
    assert step_view(out).requests[0].block_ids == ([1], [0, 2])


def test_engine_model_key_is_the_same_from_any_process_and_names_the_attention_layout():
    from types import SimpleNamespace

    from gpukv.integrations.vllm.translate import engine_model_key

    def config(use_mla: bool, tp: int = 1):
        return SimpleNamespace(
            model_config=SimpleNamespace(model="/m/tiny", revision=None, dtype="torch.bfloat16", use_mla=use_mla),
            cache_config=SimpleNamespace(cache_dtype="auto", block_size=16),
            parallel_config=SimpleNamespace(tensor_parallel_size=tp))

    asked = []
    isa = lambda: asked.append(1) or "vec"  # noqa: E731
    assert engine_model_key(config(False), attention=isa) == engine_model_key(config(False), attention=isa)
    assert engine_model_key(config(False), attention=lambda: "amx") != engine_model_key(config(False), attention=isa)
    assert len(asked) == 3
    mla = engine_model_key(config(True, 2), attention=isa)
    assert len(asked) == 3 and mla != engine_model_key(config(True, 1), attention=isa)
