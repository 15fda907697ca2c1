"""Tool calls: the ernie-x1 tool parser on whole texts and streams (split at every character), the chat
shaping the handler uses, and the request surface live on the tiny checkpoint."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from fdkit.engine.llm_engine import RequestOutput
from fdkit.serving import protocol as P
from fdkit.serving.reasoning import get_parser
from fdkit.serving.shapes import ChatShape
from fdkit.serving.streams import ChoiceStream
from fdkit.serving.tool_parsers import ToolCall, ToolParser, extract, get_tool_parser

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "北京"}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC", "opts": {"a": [1, 2]}}}\n</tool_call>'
WEATHER_CALL = ToolCall("get_weather", '{"location": "北京"}')
TIME_CALL = ToolCall("get_time", '{"zone": "UTC", "opts": {"a": [1, 2]}}')
THINKING = "The user wants the weather.\n</think>\n\n"
CASES = [  # (answer text, content, calls)
    (WEATHER, None, [WEATHER_CALL]),
    (WEATHER + "\n" + TIME + "\n", None, [WEATHER_CALL, TIME_CALL]),
    ("Let me check. " + WEATHER + " Done.", "Let me check.  Done.", [WEATHER_CALL]),
    ("<tool_call>{not json}</tool_call> hi", "<tool_call>{not json}</tool_call> hi", []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ("<tool_call>{bad</tool_call>" + WEATHER, "<tool_call>{bad</tool_call>", [WEATHER_CALL]),
    ("a <tool_call>" + '{"name": "x"', "a <tool_call>" + '{"name": "x"', []),  # never closed
    ("plain answer, no calls", "plain answer, no calls", []),
    ("a < b and <tool_ c", "a < b and <tool_ c", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_whole_text(text, content, calls):
    assert ToolParser().parse(text) == (content, calls)


def test_non_ascii_arguments_are_kept():
    _, [call] = ToolParser().parse(WEATHER)
    assert "北京" in call.arguments and json.loads(call.arguments) == {"location": "北京"}


def test_unknown_tool_parser():
    assert get_tool_parser(None) is None
    with pytest.raises(ValueError, match="unknown tool parser"):
        get_tool_parser("hermes")


def test_reasoning_is_unaffected_and_keeps_the_calls_for_the_tool_parser():
    text = THINKING + WEATHER
    assert get_parser("ernie-x1").split(text) == ("The user wants the weather.\n", "")
    assert get_parser("ernie-x1", keep_tool_calls=True).split(text) == (
        "The user wants the weather.\n",
        WEATHER,
    )
    after_response = THINKING + "<response>\nOn it.\n</response>\n" + WEATHER
    assert get_parser("ernie-x1", keep_tool_calls=True).split(after_response)[1] == "On it.\n" + WEATHER


def chat_shape(tools: bool = True, thinking: bool = True) -> ChatShape:
    req = P.ChatCompletionRequest(messages=[P.ChatMessage(role="user", content="hi")])
    parser = get_parser("ernie-x1", keep_tool_calls=tools) if thinking else None
    return ChatShape(None, "ernie", "chatcmpl-1", req, parser, [], ToolParser() if tools else None)


def output(text: str, finished: bool = True, finish_reason: str | None = "stop") -> RequestOutput:
    reason = finish_reason if finished else None
    metrics = {"arrival_time": time.time()}
    return RequestOutput("r", None, [1], text, list(range(len(text))), reason, finished, metrics=metrics)


def test_chat_shape_extracts_calls():
    choice = chat_shape().choice(0, None, output(THINKING + WEATHER + "\n" + TIME))
    wire = choice.model_dump(exclude_none=True)["message"]  # as the server sends it
    assert "content" in wire and wire["content"] is None  # null, not absent, as OpenAI's
    choice = choice.model_dump()
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls" and message["content"] is None
    assert message["reasoning_content"] == "The user wants the weather.\n"
    assert [c["function"] for c in message["tool_calls"]] == [c._asdict() for c in (WEATHER_CALL, TIME_CALL)]
    assert all(
        c["id"].startswith("chatcmpl-tool-") and c["type"] == "function" for c in message["tool_calls"]
    )
    assert len({c["id"] for c in message["tool_calls"]}) == 2


def test_chat_shape_without_tools_or_at_a_length_limit():
    plain = chat_shape(tools=False, thinking=False).choice(0, None, output(WEATHER)).model_dump()
    assert plain["message"]["content"] == WEATHER and plain["message"]["tool_calls"] is None
    assert plain["finish_reason"] == "stop"
    cut = chat_shape().choice(0, None, output(THINKING + WEATHER, finish_reason="length")).model_dump()
    assert cut["finish_reason"] == "length" and len(cut["message"]["tool_calls"]) == 1


def stream_at_every_character(shape: ChatShape, text: str) -> list[dict]:
    """The chunks' choices of a stream that gets `text` one character at a time."""
    state, choices = ChoiceStream(shape.parser, "", shape.tool_parser), []
    for end in range(1, len(text) + 1):
        out = output(text[:end], finished=end == len(text))
        delta = state.due(out, 1, always=False)
        if delta is not None:
            choices += [c.model_dump(exclude_none=True) for c in shape.stream_choices(0, out, delta)]
    return choices


def merge_stream(choices: list[dict]) -> dict:
    """The message a client builds from the deltas (OpenAI's way: tool calls merged by index)."""
    content, reasoning, calls = "", "", {}
    for choice in choices:
        delta = choice["delta"]
        content += delta.get("content") or ""
        reasoning += delta.get("reasoning_content") or ""
        for entry in delta.get("tool_calls", []):
            call = calls.setdefault(entry["index"], {"id": entry.get("id"), "name": "", "arguments": ""})
            call["name"] += entry["function"].get("name", "")
            call["arguments"] += entry["function"]["arguments"]
    names = [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]
    return {"content": content or None, "reasoning": reasoning or None, "calls": names}


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_stream_split_at_every_character_equals_whole(text, content, calls, thinking):
    shape = chat_shape(thinking=thinking)
    text = (THINKING if thinking else "") + text
    whole = shape.choice(0, None, output(text)).model_dump()
    choices = stream_at_every_character(shape, text)
    merged = merge_stream(choices)
    assert merged["content"] == whole["message"]["content"]
    assert merged["reasoning"] == whole["message"]["reasoning_content"]
    assert merged["calls"] == [(c.name, c.arguments) for c in calls]
    assert [c.get("finish_reason") for c in choices if c.get("finish_reason")] == [whole["finish_reason"]]


def test_stream_sends_the_name_first_then_the_arguments():
    choices = stream_at_every_character(chat_shape(thinking=False), WEATHER)
    entries = [e for c in choices for e in c["delta"].get("tool_calls", [])]
    head, arguments = entries
    assert head["id"].startswith("chatcmpl-tool-") and head["type"] == "function"
    assert head["function"] == {"name": "get_weather", "arguments": ""} and head["index"] == 0
    assert arguments == {"index": 0, "function": {"arguments": WEATHER_CALL.arguments}}
    assert choices[-1]["finish_reason"] == "tool_calls"


def test_tag_split_is_held_back():
    assert extract("hi <tool", final=False) == ("hi ", [])
    assert extract("hi <tool_call>{", final=False) == ("hi ", [])
    assert extract("hi <tool_call>{", final=True) == ("hi <tool_call>{", [])


# -- live, on the tiny checkpoint --------------------------------------------------------------------

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "What is the weather in Beijing?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather of a city",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
        },
    }
]
GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True, "return_token_ids": True}
TEMPLATE = (
    "{% for t in tools %}TOOL {{ t.function.name }};{% endfor %}"
    "{% for m in messages %}{{ m.role }}:{{ m.content }}"
    "{% for c in m.tool_calls or [] %} CALL {{ c.id }} {{ c.function.name }}"
    "({{ c.function.arguments.location }})"
    "{% endfor %}{% if m.tool_call_id %} FOR {{ m.tool_call_id }}{% endif %}|{% endfor %}"
)


@pytest.fixture(scope="module")
def tool_server(tiny_paddle, tmp_path_factory):
    from server_utils import launch

    log = tmp_path_factory.mktemp("tools") / "server.log"
    srv = launch(tiny_paddle, log, "model.tool_parser=ernie-x1", "server.allow_request_chat_template=true")
    yield srv
    srv.stop()


def post(server, body: dict, status: int = 200) -> dict:
    response = httpx.post(server.base_url + CHAT, json=body, timeout=60)
    assert response.status_code == status, response.text
    return response.json()


def test_tools_with_auto_are_accepted_and_well_formed(tool_server):
    body = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "auto", **GREEDY}
    choice = post(tool_server, body)["choices"][0]
    assert choice["finish_reason"] in ("length", "tool_calls")
    for call in choice["message"].get("tool_calls") or []:
        assert call["id"].startswith("chatcmpl-tool-") and isinstance(call["function"]["arguments"], str)
    text = httpx.post(tool_server.base_url + CHAT, json={**body, "stream": True}, timeout=60).text
    assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text


def test_tool_choice_none_and_no_tools_leave_the_text_alone(tool_server):
    plain = post(tool_server, {"messages": MESSAGES, **GREEDY})["choices"][0]["message"]
    none = post(tool_server, {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "none", **GREEDY})
    assert none["choices"][0]["message"]["content"] == plain["content"]


def test_tool_messages_render_through_a_template_that_uses_tools(tool_server, tiny_paddle):
    from fdkit.tokenizer import Tokenizer

    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"location": "北京"}'},
    }
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'},
    ]
    body = {"messages": messages, "tools": TOOLS, "chat_template": TEMPLATE, **GREEDY}
    ids = post(tool_server, body)["choices"][0]["message"]["prompt_token_ids"]
    expected = (
        "TOOL get_weather;user:What is the weather in Beijing?|"
        'assistant: CALL call_1 get_weather(北京)|tool:{"sky": "clear"} FOR call_1|'
    )
    assert ids == Tokenizer(tiny_paddle).encode(expected)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_required_and_named_are_enforced(tool_server, choice):
    """Constrained decoding writes the call (tests/test_structured_output.py has 50 of each)."""
    tools = json.loads(json.dumps(TOOLS))
    parameters = tools[0]["function"]["parameters"]  # bounded: random weights never end a string
    parameters.update(required=["location"], additionalProperties=False)
    parameters["properties"]["location"]["maxLength"] = 8
    body = {"messages": MESSAGES, "tools": tools, "tool_choice": choice, **GREEDY, "max_tokens": 200}
    body.update(ignore_eos=False, parallel_tool_calls=False)
    choice = post(tool_server, body)["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    [call] = choice["message"]["tool_calls"][:1]
    assert call["function"]["name"] == "get_weather"
    assert isinstance(json.loads(call["function"]["arguments"])["location"], str)


@pytest.mark.parametrize(
    "extra",
    [
        {"tool_choice": "required"},  # no tools
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tools": TOOLS, "tool_choice": "sometimes"},
        {"tools": [{"type": "retrieval", "function": {"name": "x"}}]},
        {"tools": [{"type": "function", "function": {"name": ""}}]},
        {"tools": [{"type": "function", "function": {"name": "x", "parameters": "not an object"}}]},
        {"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "x"}}]}]},
    ],
)
def test_bad_tool_requests_are_400(tool_server, extra):
    post(tool_server, {"messages": MESSAGES, **GREEDY, **extra}, 400)
