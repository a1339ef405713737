"""The tiny models' offline tokenizer (``gpukv.testing.tiny_models``): every id sequence decodes to
text that encodes back to the same ids -- what ``vllm bench serve``'s datasets and an OpenAI
server need (they decode random ids to a prompt, and the server encodes it again)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpukv.testing.tiny_models import write_tiny_model, write_tokenizer


def test_any_ids_round_trip_through_text_and_no_special_word_matches_inside_another(tmp_path):
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path, 512)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = np.random.default_rng(0).integers(0, 512, 20_000).tolist() + [0, 1, 2, 20, 21, 200, 263]
    text = tok.decode(ids)
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok.encode(text) == ids  # no BOS is added either
    assert (tok.vocab_size, tok.eos_token_id, tok.bos_token_id) == (512, 2, 1)
    with pytest.raises(ValueError, match="vocab_size must be an int >= 4"):
        write_tokenizer(tmp_path, 3)


def test_a_tiny_model_with_a_tokenizer_is_loadable_and_its_recipe_says_so(tmp_path):
    from transformers import AutoTokenizer

    path = write_tiny_model("tiny-llama", tmp_path / "m", tokenizer=True, num_hidden_layers=1)
    assert AutoTokenizer.from_pretrained(path).vocab_size == json.loads((path / "config.json").read_text())["vocab_size"]
    assert json.loads((path / "gpukv-tiny-model.json").read_text())["tokenizer"] == "word-level-v1"
    plain = write_tiny_model("tiny-llama", tmp_path / "p", num_hidden_layers=1)
    assert not (plain / "tokenizer.json").exists()
