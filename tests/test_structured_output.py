"""Structured output and forced tool calls on the tiny random-weight checkpoint: the token mask alone must
make every output valid. 50 requests of each kind go concurrently through one server, whole and streamed
(greedy: the two must agree). Schemas bound their strings, arrays and numbers (maxLength, maxItems,
minimum/maximum), as random weights never choose to close a string; a request cut by max_tokens ends
with finish_reason "length" and the partial output."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import numpy as np
import pytest

from fdkit.engine.guided import GuidedDecoder, token_bytes
from fdkit.engine.sequence import GuidedDecoding, SamplingParams
from fdkit.serving.guided import json_schema_grammar

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
NUM_REQUESTS = 50
GREEDY = {"temperature": 0, "max_tokens": 200}
WORDS = "weather time city north river stone light paper window garden music winter".split()
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "geo": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": -90, "maximum": 90},
                    "maxItems": 2,
                },
            },
            "required": ["city", "zip", "geo"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,6}@[a-z]{2,5}\.(com|org|net)"
CHOICES = ["red", "green", "blue", "不知道"]
LARK = 'start: expr\nexpr: NUMBER (OP NUMBER){0,3}\nOP: "+" | "-" | "*"\nNUMBER: /[1-9][0-9]{0,2}/'
GBNF = 'root ::= ("yes" | "no") " " [0-9]{1,3}'
WEATHER = {
    "type": "object",
    "properties": {"location": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
    "required": ["location", "unit"],
    "additionalProperties": False,
}
CLOCK = {
    "type": "object",
    "properties": {
        "zone": {"enum": ["UTC", "CET", "JST"]},
        "opts": {
            "type": "object",
            "properties": {"hour24": {"type": "boolean"}},
            "required": ["hour24"],
            "additionalProperties": False,
        },
    },
    "required": ["zone", "opts"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}},
    {"type": "function", "function": {"name": "ping"}},  # no parameters: arguments {}
]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK, "ping": {"const": {}}}


@pytest.fixture(scope="module")
def guided_server(tiny_paddle, tmp_path_factory):
    from server_utils import launch

    log = tmp_path_factory.mktemp("guided") / "server.log"
    srv = launch(tiny_paddle, log, "model.tool_parser=ernie-x1", "engine.max_num_seqs=32")
    yield srv
    srv.stop()


def prompts(n: int = NUM_REQUESTS) -> list[list[dict]]:
    rng = np.random.default_rng(0)
    return [[{"role": "user", "content": " ".join(rng.choice(WORDS, 6))}] for _ in range(n)]


async def _whole(client, url: str, body: dict) -> dict:
    response = await client.post(url, json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    message = choice.get("message") or {"content": choice["text"]}
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []]
    return {"content": message.get("content"), "calls": calls, "finish_reason": choice["finish_reason"]}


async def _streamed(client, url: str, body: dict) -> dict:
    content, calls, finish_reason = "", {}, None
    async with client.stream("POST", url, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                delta = choice.get("delta") or {"content": choice.get("text")}
                content += delta.get("content") or ""
                for entry in delta.get("tool_calls") or []:
                    call = calls.setdefault(entry["index"], ["", ""])
                    call[0] += entry["function"].get("name") or ""
                    call[1] += entry["function"].get("arguments") or ""
                finish_reason = choice.get("finish_reason") or finish_reason
    listed = [tuple(c) for _, c in sorted(calls.items())]
    return {"content": content or None, "calls": listed, "finish_reason": finish_reason}


def run_all(server, bodies: list[dict], path: str = CHAT) -> list[dict]:
    """Every body sent whole and streamed, all at once; the whole results (each equal to its stream)."""

    async def main():
        url = server.base_url + path
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=128)) as client:
            whole = [_whole(client, url, b) for b in bodies]
            streamed = [_streamed(client, url, b) for b in bodies]
            return await asyncio.gather(*whole, *streamed)

    results = asyncio.run(main())
    whole, streamed = results[: len(bodies)], results[len(bodies) :]
    assert whole == streamed
    return whole


def chat_bodies(**extra) -> list[dict]:
    return [{"messages": m, **GREEDY, **extra} for m in prompts()]


def test_json_schema_outputs_validate(guided_server):
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    results = run_all(guided_server, chat_bodies(response_format=response_format))
    for result in results:
        assert result["finish_reason"] == "stop", result
        jsonschema.validate(json.loads(result["content"]), PERSON)
    assert len({r["content"] for r in results}) > 10  # the prompts matter: not one forced text


def test_guided_json_on_completions(guided_server):
    bodies = [{"prompt": m[0]["content"], **GREEDY, "guided_json": PERSON} for m in prompts(10)]
    for result in run_all(guided_server, bodies, COMPLETIONS):
        jsonschema.validate(json.loads(result["content"]), PERSON)


def test_regex_outputs_match(guided_server):
    for result in run_all(guided_server, chat_bodies(guided_regex=REGEX)):
        assert result["finish_reason"] == "stop" and re.fullmatch(REGEX, result["content"]), result


def test_vllm_structured_outputs(guided_server):
    bodies = chat_bodies(structured_outputs={"regex": REGEX})[:5]
    bodies += chat_bodies(structured_outputs={"choice": CHOICES})[:5]
    results = run_all(guided_server, bodies)
    assert all(re.fullmatch(REGEX, r["content"]) for r in results[:5])
    assert all(r["content"] in CHOICES for r in results[5:])


def test_choice_outputs_are_one_of_the_choices(guided_server):
    results = run_all(guided_server, chat_bodies(guided_choice=CHOICES))
    assert all(r["content"] in CHOICES and r["finish_reason"] == "stop" for r in results)


def test_lark_grammar_outputs_parse(guided_server):
    pattern = r"[1-9][0-9]{0,2}([+\-*][1-9][0-9]{0,2}){0,3}"
    for result in run_all(guided_server, chat_bodies(guided_grammar=LARK)):
        assert re.fullmatch(pattern, result["content"]), result
        assert isinstance(eval(result["content"]), int)  # noqa: S307 - digits and operators only


def test_gbnf_grammar_outputs_parse(guided_server):
    for result in run_all(guided_server, chat_bodies(guided_grammar=GBNF)[:10]):
        assert re.fullmatch(r"(yes|no) [0-9]{1,3}", result["content"]), result


def check_calls(result: dict, names: set[str]) -> None:
    assert result["finish_reason"] == "tool_calls" and result["content"] is None, result
    assert result["calls"]
    for name, arguments in result["calls"]:
        assert name in names
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_tool_choice_required_makes_valid_calls(guided_server):
    bodies = chat_bodies(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    results = run_all(guided_server, bodies)
    for result in results:
        check_calls(result, set(SCHEMAS))
        assert len(result["calls"]) == 1
    assert len({name for r in results for name, _ in r["calls"]}) > 1  # the model chooses the tool


def test_parallel_calls_are_valid_until_max_tokens_cuts_one(guided_server):
    """Random weights seldom stop calling: the calls made are valid; the one cut by max_tokens stays
    in the content, and finish_reason says "length"."""
    results = run_all(guided_server, chat_bodies(tools=TOOLS, tool_choice="required")[:10])
    for result in results:
        if result["finish_reason"] == "length":
            cut = result["content"].lstrip()
            assert cut.startswith("<tool_call>") or "<tool_call>".startswith(cut), cut
            result = {**result, "finish_reason": "tool_calls", "content": None}
        check_calls(result, set(SCHEMAS))
    assert max(len(r["calls"]) for r in results) > 1


def test_tool_choice_named_makes_one_call_of_that_function(guided_server):
    named = {"type": "function", "function": {"name": "get_time"}}
    for result in run_all(guided_server, chat_bodies(tools=TOOLS, tool_choice=named)):
        check_calls(result, {"get_time"})
        assert len(result["calls"]) == 1


def test_json_object_cut_by_max_tokens_is_length_with_a_partial_prefix(guided_server, tiny_paddle):
    """Random weights seldom close an unbounded object: the cut output is a prefix the grammar accepts."""
    from llguidance import LLMatcher

    from fdkit.engine.guided import build_lltokenizer
    from fdkit.tokenizer import Tokenizer

    tokenizer = Tokenizer(tiny_paddle)
    grammar = json_schema_grammar({"type": "object"})
    body = {"messages": prompts(1)[0], "temperature": 0, "max_tokens": 40, "return_token_ids": True}
    choice = httpx.post(
        guided_server.base_url + CHAT, json={**body, "response_format": {"type": "json_object"}}, timeout=60
    ).json()["choices"][0]
    matcher = LLMatcher(build_lltokenizer(tokenizer, 1024, [2]), grammar)
    assert matcher.consume_tokens(choice["message"]["completion_token_ids"]), matcher.get_error()
    if choice["finish_reason"] == "length":
        assert not matcher.is_accepting()
    else:
        assert isinstance(json.loads(choice["message"]["content"]), dict)


# -- bad requests --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"guided_regex": "[a-"}, "guided_regex", "unclosed character class"),
        ({"guided_json": {"type": "nope"}}, "guided_json", "nope"),
        ({"guided_json": "{not json"}, "guided_json", "guided_json"),
        ({"guided_grammar": "start: missing_rule"}, "guided_grammar", "missing_rule"),
        ({"guided_grammar": 'root ::= ( "yes"'}, "guided_grammar", "Expected ')'"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
            "response_format",
            "response_format",
        ),
        ({"response_format": {"type": "structural_tag"}}, "response_format", "not supported"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "at most one"),
        ({"structured_outputs": {"regex": "(a"}}, "structured_outputs.regex", "unclosed group"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "at most one",
        ),
    ],
)
def test_bad_constraints_are_400_with_the_engines_message(guided_server, extra, param, words):
    body = {"messages": prompts(1)[0], **GREEDY, **extra}
    response = httpx.post(guided_server.base_url + CHAT, json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]


def test_forced_tool_call_without_a_tool_parser_is_400(server):
    body = {"messages": prompts(1)[0], **GREEDY, "tools": TOOLS, "tool_choice": "required"}
    response = httpx.post(server.base_url + CHAT, json=body, timeout=60)
    assert response.status_code == 400 and "tool parser" in response.json()["error"]["message"]


def test_aborted_stream_mid_grammar_serves_on(guided_server):
    body = {"messages": prompts(1)[0], "temperature": 0, "max_tokens": 400, "guided_json": {"type": "object"}}
    with httpx.stream("POST", guided_server.base_url + CHAT, json={**body, "stream": True}, timeout=60) as r:
        next(r.iter_lines())
    result = run_all(guided_server, chat_bodies(guided_choice=CHOICES)[:2])
    assert all(r["content"] in CHOICES for r in result)


# -- the engine ----------------------------------------------------------------------------------------


def schema_params(schema: dict = PERSON) -> SamplingParams:
    grammar = json_schema_grammar(schema)
    return SamplingParams(temperature=0, max_tokens=200, guided_decoding=GuidedDecoding(grammar))


def test_abort_and_finish_release_the_matchers(llm):
    ids = [llm.add_request(f"hello {i}", schema_params()) for i in range(3)]
    llm.step()
    llm.step()
    assert llm.stats["num_guided_matchers"] == 3
    llm.abort(ids[0])
    assert llm.stats["num_guided_matchers"] == 2
    while llm.has_unfinished_requests():
        llm.step()
    assert llm.stats["num_guided_matchers"] == 0


def test_preempted_requests_keep_their_matchers_in_step(tiny_paddle):
    """Few KV blocks: sequences are preempted mid-grammar and recomputed; outputs stay valid and equal
    to those of an engine with room for all."""
    from fdkit import LLM

    texts = {}
    for num_blocks in (64, 12):
        engine = {"num_kv_blocks": num_blocks, "block_size": 16, "max_model_len": 192, "show_progress": False}
        with LLM(tiny_paddle, **engine) as llm:
            params = schema_params(WEATHER)
            outputs = llm.generate([f"tell me {w}" for w in WORDS[:8]], params, use_tqdm=False)
            texts[num_blocks] = [o.text for o in outputs]
            num_preemptions = sum(o.metrics["num_preemptions"] for o in outputs)
    assert num_preemptions > 0
    assert texts[12] == texts[64]
    for text in texts[12]:
        jsonschema.validate(json.loads(text), WEATHER)


def test_thinking_constraint_starts_when_reasoning_ends(tiny_paddle, tmp_path_factory):
    from server_utils import launch

    log = tmp_path_factory.mktemp("guided_thinking") / "server.log"
    srv = launch(tiny_paddle, log, "server.reasoning_parser=ernie-x1", "model.tool_parser=ernie-x1")
    try:
        extra = {"reasoning_max_tokens": 6, "max_tokens": 200}
        for result in run_all(srv, chat_bodies(guided_json=PERSON, **extra)[:8]):
            jsonschema.validate(json.loads(result["content"]), PERSON)
        body = {**chat_bodies(guided_json=PERSON, **extra)[0]}
        message = httpx.post(srv.base_url + CHAT, json=body, timeout=60).json()["choices"][0]["message"]
        assert message["reasoning_content"]  # free text first, then the constrained answer
        forced = chat_bodies(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, **extra)
        for result in run_all(srv, forced[:8]):
            check_calls(result, set(SCHEMAS))
    finally:
        srv.stop()


def test_grammar_cache_compiles_each_grammar_once(tiny_paddle):
    from fdkit.engine.sequence import Sequence
    from fdkit.tokenizer import Tokenizer

    decoder = GuidedDecoder(Tokenizer(tiny_paddle), 1024, [2], cache_size=2)
    grammars = [json_schema_grammar({"enum": [str(i)]}) for i in range(3)]
    for i, grammar in enumerate([*grammars[:2], grammars[0], grammars[2]]):
        decoder.add(Sequence([1], SamplingParams(guided_decoding=GuidedDecoding(grammar)), f"r{i}"))
    assert list(decoder._compiled) == [grammars[0], grammars[2]]  # the least recently used went
    assert decoder.num_matchers == 4
    for i in range(4):
        decoder.release(f"r{i}")
    assert decoder.num_matchers == 0


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_token_bytes_decode_as_the_tokenizer_does(tiny_paddle):
    from fdkit.tokenizer import Tokenizer

    tokenizer = Tokenizer(tiny_paddle)
    table = token_bytes(tokenizer, 1024)
    rng = np.random.default_rng(0)
    plain = [i for i in range(tokenizer.vocab_size) if i not in tokenizer.special_ids]
    num_checked = 0
    for _ in range(1000):
        ids = [int(i) for i in rng.choice(plain, 8)]
        text = b"".join(table[i] for i in ids)
        if b"\xff" not in text and _is_utf8(text):  # byte pieces may not form characters
            assert text.decode() == tokenizer.decode(ids)
            num_checked += 1
    assert num_checked > 100
    for text in ("tool 北京 🙂 <think>x</think> a  b\n\tc", '{"a": [1, 2]}'):
        assert b"".join(table[i] for i in tokenizer.encode(text)) == text.encode()
    assert all(table[i].startswith(b"\xff") for i in tokenizer.special_ids)
    assert table[tokenizer.vocab_size :] == [b""] * (1024 - tokenizer.vocab_size)


# -- the benchmark's guided loads ----------------------------------------------------------------------


def test_bench_guided_loads(tiny_paddle, guided_server):
    from test_bench import run_bench

    load = "--concurrency 2 --input-len 8 --output-len 12 --kv-cache-gib 0.05 --guided json_schema"
    [offline] = run_bench("offline", "--model", str(tiny_paddle), *load.split())
    assert offline["guided"] == "json_schema" and offline["guided_ratio"] > 0
    assert offline["unconstrained"]["num_output_tokens"] == 24
    load = "--concurrency 2 --max-tokens 8 --response-format json_schema"
    serve = run_bench("serve", "--base-url", guided_server.base_url, *load.split())
    assert serve[0]["errors"] == 0 and serve[0]["output_tokens_per_s"] > 0


def test_tool_choice_none_never_lets_the_tag_be_written(tiny_paddle):
    """Whatever the spelling: after `<tool_call` (written in any pieces) no token may complete the tag."""
    from fdkit.engine.sequence import Sequence
    from fdkit.serving.guided import no_call_grammar
    from fdkit.tokenizer import Tokenizer

    tokenizer = Tokenizer(tiny_paddle)
    table = token_bytes(tokenizer, 1024)
    decoder = GuidedDecoder(tokenizer, 1024, [2])
    seq = Sequence([1], SamplingParams(guided_decoding=GuidedDecoding(no_call_grammar("<tool_call>"))), "r")
    decoder.add(seq)
    written = b"a <tool_call"
    for char in written.decode():  # one character a token: not the tokenizer's own pieces
        [token_id] = [i for i, b in enumerate(table) if b == char.encode()][:1]
        assert decoder.accept(seq, token_id) is None
        seq.append_token(token_id)
    bits = np.unpackbits(decoder.bitmask([seq]).view(np.uint8), bitorder="little")[:1024]
    allowed = {i for i in np.nonzero(bits)[0] if b"<tool_call>" not in written + table[i]}
    assert set(np.nonzero(bits)[0]) == allowed and b">" in table
    assert not bits[table.index(b">")] and bits[table.index(b"x")] and bits[2]  # EOS stays allowed


def test_tool_choice_none_answers_without_calls(guided_server):
    results = run_all(guided_server, chat_bodies(tools=TOOLS, tool_choice="none", max_tokens=30)[:10])
    assert all(r["calls"] == [] and r["finish_reason"] in ("stop", "length") for r in results)


def test_a_tokenizer_llguidance_cannot_read(tiny_pt, tmp_path):
    """A WordLevel tokenizer.json (the vLLM peer's random model has one): guided requests get a 400 in
    OpenAI's envelope that says why; the same server goes on serving plain requests."""
    import shutil

    from helpers import word_level_folder
    from server_utils import launch

    folder = tmp_path / "words"
    shutil.copytree(tiny_pt, folder)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        (folder / name).unlink()
    word_level_folder(folder, 1024)
    srv = launch(folder, tmp_path / "server.log")
    try:
        messages = [{"role": "user", "content": "w10 w11 w12"}]
        body = {"messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        for extra in ({"guided_json": PERSON}, {"response_format": {"type": "json_object"}}):
            r = httpx.post(srv.base_url + CHAT, json={**body, **extra}, timeout=60)
            assert r.status_code == 400, r.text
            assert (
                "guided decoding does not support this model's tokenizer.json" in r.json()["error"]["message"]
            )
        r = httpx.post(srv.base_url + CHAT, json=body, timeout=60)
        assert r.status_code == 200, r.text
        content = r.json()["choices"][0]["message"]["content"]
        assert re.fullmatch(r"w\d+( w\d+){7}", content), content
        assert r.json()["usage"]["prompt_tokens"] == 6  # <s> user w10 w11 w12 assistant
    finally:
        srv.stop()
