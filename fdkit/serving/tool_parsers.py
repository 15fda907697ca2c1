"""Tool calls in a model's answer, for whole texts and for streams.

`ernie-x1` (FastDeploy's parser of that name): each `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
is a call; arguments are sent as `json.dumps(arguments, ensure_ascii=False)`. A call is the text between a
`<tool_call>` and the next `</tool_call>` (FastDeploy's regex, `<tool_call>\\s*(\\{.*?\\})\\s*</tool_call>`,
agrees on well-formed calls); one that is not a JSON object with a string `name` stays in the content, as
does an unclosed one at the end. Content that is only whitespace is none at all.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from fdkit.serving.reasoning import TOOL_CALL, hold_partial

TOOL_CALL_END = "</tool_call>"


class ToolCall(NamedTuple):
    name: str
    arguments: str  # JSON text


def parse_call(body: str) -> ToolCall | None:
    """The call written between the tags, or None if it is badly written."""
    try:
        call = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # already JSON text (some models write it so)
        return ToolCall(call["name"], arguments)
    return ToolCall(call["name"], json.dumps(arguments, ensure_ascii=False))


def extract(text: str, final: bool = True) -> tuple[str, list[ToolCall]]:
    """(content, calls); with final=False an unfinished call or tag at the end is held back."""
    content, calls, pos = [], [], 0
    while (start := text.find(TOOL_CALL, pos)) >= 0:
        content.append(text[pos:start])
        end = text.find(TOOL_CALL_END, start)
        if end < 0:
            return "".join(content) + (text[start:] if final else ""), calls
        call = parse_call(text[start + len(TOOL_CALL) : end].strip())
        pos = end + len(TOOL_CALL_END)
        if call is None:
            content.append(text[start:pos])
        else:
            calls.append(call)
    rest = text[pos:]
    content.append(rest if final else hold_partial(rest, (TOOL_CALL,)))
    return "".join(content), calls


class ToolParser:
    name = "ernie-x1"
    start_tag, end_tag = TOOL_CALL, TOOL_CALL_END

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The whole answer's (content, or None if only whitespace, and calls)."""
        content, calls = extract(text)
        return (content if content.strip() else None), calls


PARSERS = {cls.name: cls for cls in (ToolParser,)}


def get_tool_parser(name: str | None) -> ToolParser | None:
    if not name:
        return None
    if name not in PARSERS:
        raise ValueError(f"unknown tool parser {name!r}; choose one of {sorted(PARSERS)}")
    return PARSERS[name]()


class ToolStream:
    """Turns the growing answer of a stream into (content delta, new calls); whitespace-only content is
    held until real text follows it (and dropped if none does), so a stream agrees with the whole text."""

    def __init__(self):
        self.answer = ""
        self.content = ""  # sent so far
        self.num_calls = 0

    def feed(self, answer_delta: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        self.answer += answer_delta
        content, calls = extract(self.answer, final)
        new_calls, self.num_calls = calls[self.num_calls :], max(len(calls), self.num_calls)
        if not content.strip() or not content.startswith(self.content):
            return "", new_calls
        delta, self.content = content[len(self.content) :], content
        return delta, new_calls
