"""Tokenizer: ``tokenizer.json`` round trips, the checkpoint's chat template, incremental detokenization."""

from __future__ import annotations

import json
import shutil

import pytest

from serve.engine.config import DEFAULT_MODEL
from serve.engine.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(DEFAULT_MODEL)


def test_round_trip_and_special_tokens(tok):
    text = "def f(x):\n    return {'é': x ** 2}  # ünïcödé ✓\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == tok.hf.token_to_id("<|im_end|>")


def test_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list"}]
    prompt = tok.apply_chat_template(messages)
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSort a list<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert not tok.apply_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")
    ids = tok.encode_chat(messages)
    assert ids[0] == tok.hf.token_to_id("<|im_start|>") and tok.decode(ids, skip_special_tokens=False) == prompt


def test_template_file_takes_precedence_and_missing_template_errors(tmp_path):
    shutil.copytree(DEFAULT_MODEL, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors", "*.py"))
    (tmp_path / "m" / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}")
    assert Tokenizer(tmp_path / "m").apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi"
    (tmp_path / "m" / "chat_template.jinja").unlink()
    cfg = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="chat_template"):
        Tokenizer(tmp_path / "m").apply_chat_template([{"role": "user", "content": "hi"}])


def test_incremental_detokenizer_matches_full_decode(tok):
    text = "import os\nprint(f'naïve → {os.sep!r}')  # 日本語 text\n    return None\n"
    ids = tok.encode(text)
    full = tok.decode(ids)
    checked = 0
    for prompt_len in range(1, len(ids) - 1):
        prefix = tok.decode(ids[:prompt_len])
        if prefix.endswith("\ufffd"):  # the prompt ends inside a multi-byte character
            continue
        detok = IncrementalDetokenizer.after_prompt(tok, prompt_len)
        pieces = [detok.add(ids[:n]) for n in range(prompt_len + 1, len(ids) + 1)]
        assert "".join(pieces) == full[len(prefix):], prompt_len
        assert any(p == "" for p in pieces) or prompt_len > 0  # a split character waits for its last byte
        checked += 1
    assert checked > 10
