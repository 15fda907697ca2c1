from __future__ import annotations

import json
import shutil

import pytest
import sentencepiece as spm

from fdkit.models.ernie4_5 import DEFAULT_CHAT_TEMPLATE
from fdkit.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox.",
    "你好，世界！今天天气很好。",
    "47 加 85 等于多少？",
    "emoji 🙂 and ünïcödé",
    "  spaces   inside  ",
    "1234+5678=6912",
]


@pytest.fixture(scope="module")
def tok(tiny_paddle) -> Tokenizer:
    return Tokenizer(tiny_paddle)


def test_plain_text_ids_are_sentencepiece_ids(tok, tiny_paddle):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_paddle / "tokenizer.model"))
    for text in TEXTS:
        assert tok.encode(text) == sp.encode(text)
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)) == text


def test_special_and_added_tokens_stay_atomic(tok):
    text = "<|begin_of_sentence|>User: hi<think>plan</think>answer<|end_of_sentence|></s>"
    ids = tok.encode(text)
    cls, sep = tok.token_id("cls_token"), tok.token_id("sep_token")
    think, end_think = tok.added_token_ids["<think>"], tok.added_token_ids["</think>"]
    assert ids[0] == cls and ids[-2:] == [sep, tok.eos_token_id]
    assert think in ids and end_think in ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "User: hi<think>plan</think>answer"  # named specials dropped


def test_incremental_decoding_never_splits_a_character(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        decoder = tok.decoder()
        deltas = [decoder.step(i) for i in ids]
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)
    # Chinese characters outside the vocabulary are byte pieces: partial bytes yield nothing.
    ids = tok.encode("龘")
    assert len(ids) == 3
    decoder = tok.decoder()
    assert [decoder.step(i) for i in ids] == ["", "", "龘"]


def test_unknown_ids_decode_to_nothing(tok):
    assert tok.decode([10**6, -5, tok.vocab_size]) == ""
    assert tok.decoder().step(10**6) == ""


def test_chat_template_from_tokenizer_config(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
    ]
    expected = (
        "<|begin_of_sentence|>Be brief.\nUser: Hi\nAssistant: Hello<|end_of_sentence|>User: 2+2?\nAssistant: "
    )
    assert tok.apply_chat_template(messages) == expected


def test_default_ernie_template_and_kwargs(tiny_paddle, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(tiny_paddle, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer(folder, DEFAULT_CHAT_TEMPLATE)
    messages = [{"role": "user", "content": "Hello, how are you?"}]
    assert tok.apply_chat_template(messages) == "<|begin_of_sentence|>User: Hello, how are you?\nAssistant: "
    # template kwargs pass through to a template that reads them
    tok.chat_template = "{{ 'think' if enable_thinking else 'direct' }}"
    assert tok.apply_chat_template(messages, enable_thinking=True) == "think"
    assert tok.apply_chat_template(messages, enable_thinking=False) == "direct"


def test_tiny_checkpoint_is_deterministic_for_a_seed(tmp_path):
    from fdkit.tiny import write_checkpoint

    a = write_checkpoint(tmp_path / "a", "tiny", "paddle", seed=3)
    b = write_checkpoint(tmp_path / "b", "tiny", "paddle", seed=3)
    c = write_checkpoint(tmp_path / "c", "tiny", "paddle", seed=4)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    shard = "model-00001-of-00002.safetensors"
    assert (a / shard).read_bytes() != (c / shard).read_bytes()
