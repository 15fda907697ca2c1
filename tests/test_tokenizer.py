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


# -- tokenizer.json (Hugging Face tokenizers) ---------------------------------------------------------

ENGINE = {"num_kv_blocks": 64, "block_size": 16, "max_model_len": 256, "show_progress": False}


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory):
    """The tiny checkpoint with its tokenizer as tokenizer.json only (as transformers 5 saves it)."""
    from fdkit.tiny import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("json") / "tiny", "tiny", "pt", seed=0, tokenizer="json")


def chat_texts(tok) -> list[str]:
    dialogs = [
        [{"role": "user", "content": t}, {"role": "assistant", "content": f"<think>{t}</think>ok"}]
        for t in TEXTS
    ]
    return TEXTS + [tok.apply_chat_template(d) for d in dialogs]


def test_tokenizer_json_gives_the_sentencepiece_ids(tok, tiny_json):
    assert not (tiny_json / "tokenizer.model").exists()
    tok_json = Tokenizer(tiny_json)
    assert tok_json.vocab_size == tok.vocab_size and tok_json.special_ids == tok.special_ids
    assert tok_json.atomic_token_ids == tok.atomic_token_ids
    for text in chat_texts(tok):
        ids = tok.encode(text)
        assert tok_json.encode(text) == ids
        for skip in (True, False):
            assert tok_json.decode(ids, skip) == tok.decode(ids, skip)
        decoders = tok.decoder(), tok_json.decoder()
        assert [decoders[0].step(i) for i in ids] == [decoders[1].step(i) for i in ids]


def test_guided_decoding_reads_the_tokenizer_json(tiny_json):
    """llguidance reads tokenizer.json itself: its bytes for our ids are our decoded text, and a JSON
    schema constrains an engine serving that checkpoint."""
    import jsonschema
    import numpy as np

    from fdkit import LLM
    from fdkit.engine.guided import build_lltokenizer
    from fdkit.engine.sequence import GuidedDecoding, SamplingParams
    from fdkit.serving.guided import json_schema_grammar

    tok_json = Tokenizer(tiny_json)
    lltokenizer = build_lltokenizer(tok_json, 1024, [tok_json.eos_token_id])
    rng = np.random.default_rng(0)
    plain = [i for i in range(tok_json.vocab_size) if i not in tok_json.special_ids]
    for _ in range(200):
        ids = [int(i) for i in rng.choice(plain, 8)]
        text = tok_json.decode(ids)
        if "\ufffd" not in text:
            assert lltokenizer.decode_bytes(ids) == text.encode()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    params = SamplingParams(
        temperature=0, max_tokens=60, guided_decoding=GuidedDecoding(json_schema_grammar(schema))
    )
    with LLM(tiny_json, **ENGINE) as llm:
        [out] = llm.generate(["A number:"], params)
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), schema)


def test_a_tokenizer_json_checkpoint_serves_as_the_sentencepiece_one(tiny_pt, tiny_json):
    """Same prompt ids, same greedy tokens and the same text. Where a random model emits byte pieces
    that form no character, tokenizers' ByteFallback writes U+FFFD for each byte and SentencePiece for
    each invalid run (as transformers and sentencepiece do): those texts are left out."""
    from fdkit import LLM
    from fdkit.engine.sequence import SamplingParams
    from fdkit.tiny import corpus_lines

    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    conversations = [[{"role": "user", "content": t}] for t in TEXTS + corpus_lines(1)[:40]]
    runs = []
    for folder in (tiny_pt, tiny_json):
        with LLM(folder, **ENGINE) as llm:
            runs.append(llm.chat(conversations, params, use_tqdm=False))
    num_texts = 0
    for a, b in zip(*runs, strict=True):
        assert (a.prompt_token_ids, a.token_ids) == (b.prompt_token_ids, b.token_ids)
        if "\ufffd" not in a.text + b.text:
            assert a.text == b.text
            num_texts += 1
    assert num_texts >= 10, num_texts


def test_word_level_tokenizer_json(tmp_path):
    from helpers import word_level_folder

    from fdkit.engine.guided import build_lltokenizer

    word_level_folder(tmp_path, 1024)
    tok = Tokenizer(tmp_path)
    assert tok.vocab_size == 1024 and tok.eos_token_id == 2 and tok.special_ids == {0, 1, 2, 3}
    text = tok.apply_chat_template([{"role": "user", "content": "w10 w11 hello"}])
    assert text == "<s>user w10 w11 hello assistant "
    assert tok.encode(text) == [1, 3, 10, 11, 3, 3]
    assert tok.decode([10, 11, 2, 12]) == "w10 w11 w12"
    decoder = tok.decoder()
    assert "".join(decoder.step(i) for i in [10, 11, 12]) == "w10 w11 w12"
    with pytest.raises(ValueError, match="guided decoding does not support this model's tokenizer.json"):
        build_lltokenizer(tok, 1024, [2])


def test_neither_tokenizer_file(tiny_json, tmp_path):
    shutil.copytree(tiny_json, tmp_path / "t")
    (tmp_path / "t" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.model .* or tokenizer.json"):
        Tokenizer(tmp_path / "t")
