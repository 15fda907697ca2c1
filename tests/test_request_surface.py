"""The rest of FastDeploy's and vLLM's request surface, live on the tiny checkpoint: reasoning_content on
every chat message, max_completion_tokens, bad words, raw and per-request chat templates, prompt_token_ids,
echo, max_streaming_response_tokens, user, and /v1/tokenize and /v1/detokenize."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest

from fdkit.engine.sequence import SamplingParams

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Hello! 你好"}]
GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True, "return_token_ids": True}


def post(server, path: str, body: dict, status: int = 200) -> dict:
    response = httpx.post(server.base_url + path, json=body, timeout=60)
    assert response.status_code == status, response.text
    return response.json()


def events(server, path: str, body: dict) -> list[dict]:
    text = httpx.post(server.base_url + path, json={**body, "stream": True}, timeout=60).text
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def completion(server, **body) -> dict:
    return post(server, COMPLETIONS, {"prompt": PROMPT, **GREEDY, **body})["choices"][0]


@pytest.fixture(scope="module")
def tokenizer(tiny_paddle):
    from fdkit.tokenizer import Tokenizer

    return Tokenizer(tiny_paddle)


def test_reasoning_content_is_on_every_chat_message_and_delta(server):
    for body in (
        {"messages": MESSAGES},
        {"messages": MESSAGES, "chat_template_kwargs": {"enable_thinking": False}},
    ):
        message = post(server, CHAT, {**body, **GREEDY})["choices"][0]["message"]
        assert "reasoning_content" in message and message["reasoning_content"] is None
        deltas = [c["choices"][0]["delta"] for c in events(server, CHAT, {**body, **GREEDY}) if c["choices"]]
        assert deltas and all("reasoning_content" in d for d in deltas)
        assert all(d["reasoning_content"] is None for d in deltas)
        assert "finish_reason" not in deltas[0] or deltas[0]["finish_reason"] is None  # the rest as before


def test_max_completion_tokens_wins_over_max_tokens(server):
    body = {"messages": MESSAGES, "temperature": 0, "ignore_eos": True}
    assert post(server, CHAT, {**body, "max_completion_tokens": 3})["usage"]["completion_tokens"] == 3
    both = post(server, CHAT, {**body, "max_tokens": 10, "max_completion_tokens": 4})
    assert both["usage"]["completion_tokens"] == 4


def test_bad_words_token_ids_both_forms(server):
    ids = completion(server)["completion_token_ids"]
    flat = completion(server, bad_words_token_ids=[ids[0]])["completion_token_ids"]
    assert ids[0] not in flat
    # vLLM's form: the last token is banned only right after the others
    pair = completion(server, bad_words_token_ids=[[ids[0], ids[1]]])["completion_token_ids"]
    assert pair[0] == ids[0] and pair[1] != ids[1]
    assert all(pair[k + 1] != ids[1] for k in range(len(pair) - 1) if pair[k] == ids[0])
    bad = post(server, COMPLETIONS, {"prompt": PROMPT, "bad_words_token_ids": [10**6]}, 400)
    assert bad["error"]["param"] == "bad_words_token_ids"


def test_bad_words_strings(server, tokenizer):
    ids = completion(server)["completion_token_ids"]
    word = tokenizer.decode([ids[0]])
    assert [ids[0]] in tokenizer.bad_words_ids([word])
    assert ids[0] not in completion(server, bad_words=[word])["completion_token_ids"]
    chat = post(server, CHAT, {"messages": MESSAGES, **GREEDY, "bad_words": [word]})
    assert ids[0] not in chat["choices"][0]["message"]["completion_token_ids"]


def test_disable_chat_template_sends_the_raw_text(server):
    parts = [{"role": "user", "content": "Once upon"}, {"role": "user", "content": " a time"}]
    raw = post(server, CHAT, {"messages": parts, "disable_chat_template": True, **GREEDY})
    plain = post(server, COMPLETIONS, {"prompt": PROMPT, **GREEDY})
    assert raw["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert raw["choices"][0]["message"]["content"] == plain["choices"][0]["text"]


TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}{{ cls_token }}"


def test_request_chat_template_is_off_by_default(server):
    error = post(server, CHAT, {"messages": MESSAGES, "chat_template": TEMPLATE, **GREEDY}, 400)["error"]
    assert error["param"] == "chat_template" and "allow_request_chat_template" in error["message"]


@pytest.fixture(scope="module")
def template_server(tiny_paddle, tmp_path_factory):
    from server_utils import launch

    log = tmp_path_factory.mktemp("template_server") / "server.log"
    srv = launch(tiny_paddle, log, "server.allow_request_chat_template=true")
    yield srv
    srv.stop()


def test_request_chat_template(template_server, tokenizer):
    server, template = template_server, TEMPLATE
    response = post(server, CHAT, {"messages": MESSAGES, "chat_template": template, **GREEDY})
    rendered = tokenizer.apply_chat_template(MESSAGES, chat_template=template)
    assert rendered.startswith("[user] Hello!")
    assert response["usage"]["prompt_tokens"] == len(tokenizer.encode(rendered))
    for broken in ("{% if %}", "{{ messages[0].content.__class__.__mro__ }}", "{{ 1 / 0 }}"):
        error = post(server, CHAT, {"messages": MESSAGES, "chat_template": broken}, 400)["error"]
        assert error["param"] == "chat_template"


def test_prompt_token_ids_on_both_endpoints(server, tokenizer):
    ids = tokenizer.encode(PROMPT)
    plain = completion(server)
    by_ids = post(server, COMPLETIONS, {"prompt_token_ids": ids, **GREEDY})["choices"][0]
    assert by_ids["completion_token_ids"] == plain["completion_token_ids"]
    chat = post(server, CHAT, {"prompt_token_ids": ids, **GREEDY})
    assert chat["choices"][0]["message"]["completion_token_ids"] == plain["completion_token_ids"]
    assert chat["usage"]["prompt_tokens"] == len(ids)
    for path in (CHAT, COMPLETIONS):
        error = post(server, path, {"prompt_token_ids": [1, 10**6]}, 400)["error"]
        assert error["param"] == "prompt_token_ids"
        post(server, path, {"prompt_token_ids": [-1]}, 400)
        post(server, path, {"prompt_token_ids": []}, 400)
    post(server, CHAT, {"max_tokens": 2}, 400)  # neither messages nor prompt_token_ids


def test_echo_stream_and_non_stream(server, tokenizer):
    text = completion(server)["text"]
    echoed = completion(server, echo=True)["text"]
    assert echoed == PROMPT + text
    chunks = events(server, COMPLETIONS, {"prompt": PROMPT, **GREEDY, "echo": True})
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == echoed
    by_ids = post(server, COMPLETIONS, {"prompt_token_ids": tokenizer.encode(PROMPT), **GREEDY, "echo": True})
    assert by_ids["choices"][0]["text"] == tokenizer.decode(tokenizer.encode(PROMPT)) + text


def test_max_streaming_response_tokens_batches_deltas(server):
    body = {"messages": MESSAGES, **GREEDY, "max_tokens": 10, "logprobs": True}
    full = post(server, CHAT, body)["choices"][0]
    chunks = [c["choices"][0] for c in events(server, CHAT, {**body, "max_streaming_response_tokens": 4})]
    batches = [c["delta"]["completion_token_ids"] for c in chunks if "completion_token_ids" in c["delta"]]
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sum(batches, []) == full["message"]["completion_token_ids"]
    assert "".join(c["delta"].get("content") or "" for c in chunks) == full["message"]["content"]
    assert sum(len(c["logprobs"]["content"]) for c in chunks if c.get("logprobs")) == 10
    assert chunks[-1]["finish_reason"] == "length"
    post(server, CHAT, {**body, "max_streaming_response_tokens": 0}, 400)


def test_user_and_fields_not_honoured_are_logged(server):
    post(server, CHAT, {"messages": MESSAGES, "max_tokens": 1, "user": "alice", "request_id": "surface-user"})
    post(server, COMPLETIONS, {"prompt": "x", "max_tokens": 1, "suffix": "!", "request_id": "surface-suffix"})
    deadline = time.time() + 5
    while time.time() < deadline:
        log = server.log_path.read_text()
        if "request surface-suffix: accepted but not honoured: suffix" in log:
            break
        time.sleep(0.1)
    assert "request surface-user: user 'alice'" in log
    assert "request surface-suffix: accepted but not honoured: suffix" in log


def test_tokenize_and_detokenize(server, tokenizer):
    tokens = post(server, "/v1/tokenize", {"prompt": PROMPT})
    assert tokens == {
        "count": len(tokens["tokens"]),
        "max_model_len": 512,
        "tokens": tokenizer.encode(PROMPT),
    }
    chat = post(server, "/v1/tokenize", {"messages": MESSAGES, "return_token_strs": True})
    assert chat["tokens"] == tokenizer.encode(tokenizer.apply_chat_template(MESSAGES))
    assert "".join(chat["token_strs"]) == tokenizer.decode(chat["tokens"], skip_special_tokens=False)
    bare = post(server, "/v1/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})
    assert bare["count"] < chat["count"]
    text = post(server, "/v1/detokenize", {"tokens": chat["tokens"]})["prompt"]
    assert text == tokenizer.apply_chat_template(MESSAGES)
    assert post(server, "/detokenize", {"tokens": tokens["tokens"]}) == {"prompt": PROMPT}  # vLLM's path
    assert post(server, "/v1/detokenize", {"tokens": [10**6]}, 400)["error"]["param"] == "tokens"
    post(server, "/v1/tokenize", {"prompt": PROMPT, "messages": MESSAGES}, 400)
    post(server, "/v1/tokenize", {}, 400)
    post(server, "/v1/tokenize", {"messages": MESSAGES, "chat_template": "{% if %}"}, 400)


def test_tokenizer_routes_in_the_schema(server):
    paths = httpx.get(server.base_url + "/openapi.json").json()["paths"]
    for path in ("/v1/tokenize", "/v1/detokenize"):
        post_op = paths[path]["post"]
        assert post_op["requestBody"]["required"] and {"200", "400", "401", "413"} <= set(
            post_op["responses"]
        )
    assert "/tokenize" not in paths


def test_tokenizer_routes_need_the_api_key(tiny_paddle):
    """In-process, through ASGI: the same guard as every other route."""
    import asyncio

    from helpers import TEST_ENGINE

    from fdkit import LLM, load_config
    from fdkit.engine.async_engine import AsyncLLM
    from fdkit.serving.openai_app import build_app

    cfg = load_config(["model=ernie", f"model.path={tiny_paddle}", "server.api_keys=[k1]"])
    engine = AsyncLLM(LLM(tiny_paddle, **TEST_ENGINE))

    async def calls():
        transport = httpx.ASGITransport(app=build_app(engine, cfg))
        async with httpx.AsyncClient(transport=transport, base_url="http://fdkit") as client:
            body = {"prompt": PROMPT}
            return [
                await client.post("/v1/tokenize", json=body),
                await client.post("/detokenize", json={"tokens": [1]}),
                await client.post("/v1/tokenize", json=body, headers={"Authorization": "Bearer k1"}),
            ]

    try:
        missing, missing_alias, keyed = asyncio.run(calls())
        assert missing.status_code == missing_alias.status_code == 401
        assert keyed.status_code == 200 and keyed.json()["tokens"]
    finally:
        engine.shutdown()


# -- the sampler's bad words (unit tests) --------------------------------------------------------------

EOS = 0
PROBS = [0.02, 0.5, 0.3, 0.18]


def seqs_for(params_list, prompt=(5, 6, 7)):
    from fdkit.engine.sequence import Sequence

    seqs = [Sequence(list(prompt), params) for params in params_list]
    for k, seq in enumerate(seqs):
        seq.rng = np.random.default_rng(k)
    return seqs


def logits_from_probs(rows):
    import paddle

    return paddle.to_tensor(np.log(np.asarray(rows, dtype=np.float32)))


def draw(params, probs, n: int) -> np.ndarray:
    from fdkit.engine.sampler import Sampler

    (seq,) = seqs_for([params])
    return np.array([Sampler([EOS])(logits_from_probs([probs]), [seq])[0] for _ in range(n)])


def sampler():
    from fdkit.engine.sampler import Sampler

    return Sampler([EOS])


def test_bad_words_ban_single_tokens_for_the_whole_batch():
    probs = [[0.05, 0.6, 0.2, 0.15]] * 3
    params = [
        SamplingParams(temperature=0, bad_words_token_ids=[1]),  # FastDeploy's flat form
        SamplingParams(temperature=0, bad_words_token_ids=[[1], [2]]),
        SamplingParams(temperature=0),
    ]
    assert sampler()(logits_from_probs(probs), seqs_for(params)) == [2, 3, 1]


def test_bad_word_of_several_tokens_bans_its_last_after_the_rest():
    params = SamplingParams(temperature=0, bad_words_token_ids=[[2, 1]])
    fresh, after_2, after_3 = seqs_for([params] * 3)
    after_2.append_token(2)
    after_3.append_token(3)
    tokens = sampler()(logits_from_probs([PROBS] * 3), [fresh, after_2, after_3])
    assert tokens == [1, 2, 1]  # only the row that just generated 2 loses token 1


def test_bad_word_prefix_counts_generated_tokens_only():
    params = SamplingParams(temperature=0, bad_words_token_ids=[[7, 1]])
    (seq,) = seqs_for([params], prompt=(5, 6, 7))  # 7 ends the prompt, not the completion
    assert sampler()(logits_from_probs([PROBS]), [seq]) == [1]


def test_bad_words_and_min_tokens_ban_together_when_sampling():
    params = SamplingParams(temperature=1.0, bad_words_token_ids=[1], min_tokens=2, seed=0)
    drawn = draw(params, [0.3, 0.5, 0.1, 0.1], 300)
    assert set(drawn) == {2, 3}  # 0 is EOS, banned before min_tokens; 1 is a bad word


def test_bad_words_token_ids_are_checked():
    with pytest.raises(ValueError, match="bad_words_token_ids"):
        SamplingParams(bad_words_token_ids=[[]])
    with pytest.raises(ValueError, match="bad_words_token_ids"):
        SamplingParams(bad_words_token_ids=[-3])
