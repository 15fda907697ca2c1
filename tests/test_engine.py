"""The LLM API: stop conditions, limits, abort, chat, errors."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import TEST_ENGINE

from fdkit import LLM, SamplingParams

PROMPT = "The quick brown fox jumps over the lazy dog"


def greedy(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": 16, "ignore_eos": True, **kw})


@pytest.fixture(scope="module")
def reference(llm):
    return llm.generate(PROMPT, greedy(), use_tqdm=False)[0]


def test_max_tokens_gives_length(llm):
    out = llm.generate(PROMPT, greedy(max_tokens=1), use_tqdm=False)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 1 and out.finished


def test_output_fields(llm, reference):
    assert reference.prompt == PROMPT
    assert reference.prompt_token_ids == llm.tokenizer.encode(PROMPT)
    assert reference.text == llm.tokenizer.decode(reference.token_ids)


def test_stop_token_ids_and_min_tokens(llm, reference):
    ids = reference.token_ids
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    out = llm.generate(PROMPT, greedy(stop_token_ids=[ids[k]]), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.token_ids == ids[: k + 1]
    held = llm.generate(PROMPT, greedy(stop_token_ids=[ids[k]], min_tokens=k + 2), use_tqdm=False)[0]
    assert ids[k] not in held.token_ids[: k + 2] and len(held.token_ids) >= k + 2


def test_stop_strings_are_cut_or_kept(llm, reference):
    text = reference.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop and stop.strip()
    cut = text.find(stop)
    out = llm.generate(PROMPT, greedy(stop=[stop, "never appears"]), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.text == text[:cut]
    kept = llm.generate(PROMPT, greedy(stop=stop, include_stop_str_in_output=True), use_tqdm=False)[0]
    assert kept.text == text[: cut + len(stop)]


def test_streamed_text_grows_and_holds_back_partial_stop_strings(llm, reference):
    stop = "zzz-never"
    request_id = llm.add_request(PROMPT, greedy(stop=[stop]))
    outputs = []
    while llm.has_unfinished_requests():
        outputs += [o for o in llm.step() if o.request_id == request_id]
    texts = [o.text for o in outputs]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    assert outputs[-1].finished and texts[-1] == reference.text
    hold = len(stop) - 1  # characters that could still turn out to open the stop string
    for out in outputs[:-1]:
        decoded = llm.tokenizer.decode(out.token_ids)
        assert out.text == decoded[: max(0, len(decoded) - hold)]


def test_eos_stops_unless_ignored(tiny_paddle, tmp_path, reference):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_paddle, folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    eos = reference.token_ids[3]
    generation["eos_token_id"] = [2, eos]
    (folder / "generation_config.json").write_text(json.dumps(generation))
    llm = LLM(folder, **TEST_ENGINE)
    try:
        first = reference.token_ids.index(eos)
        out = llm.generate(PROMPT, greedy(ignore_eos=False), use_tqdm=False)[0]
        assert out.finish_reason == "stop" and out.token_ids == reference.token_ids[: first + 1]
        assert llm.generate(PROMPT, greedy(), use_tqdm=False)[0].token_ids == reference.token_ids
        late = llm.generate(PROMPT, greedy(ignore_eos=False, min_tokens=first + 2), use_tqdm=False)[0]
        assert eos not in late.token_ids[: first + 2]
    finally:
        llm.close()
        llm.close()  # safe twice


def test_abort_frees_blocks(llm):
    free = llm.engine.block_manager.num_free_blocks
    request_id = llm.add_request(PROMPT * 3, greedy(max_tokens=100))
    llm.step()
    assert llm.engine.block_manager.num_free_blocks < free
    llm.abort(request_id)
    assert llm.engine.block_manager.num_free_blocks == free and not llm.has_unfinished_requests()


def test_max_tokens_defaults_to_what_is_left_of_the_context(llm):
    request_id = llm.add_request([5] * 500, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    outputs = []
    while llm.has_unfinished_requests():
        outputs += llm.step()
    last = [o for o in outputs if o.request_id == request_id][-1]
    assert last.finish_reason == "length" and len(last.token_ids) == 512 - 500


def test_chat_applies_the_template(llm):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    out = llm.chat(messages, greedy(max_tokens=4), enable_thinking=False, use_tqdm=False)[0]
    assert out.prompt == "<|begin_of_sentence|>User: What is 2+2?\nAssistant: "
    assert len(out.token_ids) == 4


def test_bad_prompts_are_rejected_and_the_engine_goes_on(llm, reference):
    with pytest.raises(ValueError, match="empty"):
        llm.add_request("", greedy())
    with pytest.raises(ValueError, match="Input text is too long"):
        llm.add_request([5] * 600, greedy())
    with pytest.raises(ValueError, match="token ids must be in"):
        llm.add_request([10**7], greedy())
    assert llm.generate(PROMPT, greedy(), use_tqdm=False)[0].token_ids == reference.token_ids


def test_from_config(tiny_paddle):
    overrides = [
        f"model.path={tiny_paddle}",
        "engine.num_kv_blocks=40",
        "engine.block_size=16",
        "engine.max_model_len=256",
        "engine.show_progress=false",
    ]
    with LLM.from_config(overrides) as llm:
        assert llm.engine.block_manager.num_blocks == 40 and llm.max_model_len == 256
        assert llm.generate("hi", greedy(max_tokens=3), use_tqdm=False)[0].finish_reason == "length"
