"""A request's output constraint as llguidance grammar text: `response_format` (json_object, json_schema),
FastDeploy's and vLLM's `guided_json`, `guided_regex`, `guided_choice` and `guided_grammar`, and the tool
calls that `tool_choice` "required" or a named function forces. At most one of them per request.

JSON is written compactly (`", "` and `": "` as separators, no other whitespace: llguidance's
`whitespace_flexible` off), so no model can pad it forever. `guided_grammar` is a Lark grammar in
llguidance's dialect, or a GBNF one (llama.cpp's EBNF, the form xgrammar takes), told apart by llguidance.
Forced tool calls are ERNIE's: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one
(a named function, or `parallel_tool_calls: false`) or several separated by a newline, the arguments
held to the function's `parameters` (none given: `{}`). With thinking, the constraint covers all the
text after the end of reasoning: the answer is the constrained text itself, with no `<response>` tags.
`tool_choice: "none"` with tools (and no other constraint) holds the text to one that never writes the
tool parser's start tag.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import partial

from fdkit.engine.sequence import GuidedDecoding
from fdkit.serving import protocol as P
from fdkit.serving.errors import APIError, client_message

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def guided_decoding(
    req: P.SamplingFields, check: Callable[[str], None], after_reasoning: bool = False, tool_parser=None
) -> GuidedDecoding | None:
    """The request's constraint, None if it has none; 400 if it asks for more than one, or for one that
    `check` (the grammar engine) refuses, with the engine's message. Forced tool calls are written in
    `tool_parser`'s tags (a model without one cannot be forced to call)."""
    asked = _constraints(req, tool_parser)
    if not asked and _forbids_calls(req, tool_parser):
        asked.append(("tool_choice", partial(no_call_grammar, tool_parser.start_tag)))
    if len(asked) > 1:
        names = ", ".join(param for param, _ in asked)
        raise APIError(400, f"give at most one output constraint; this request has {names}", asked[1][0])
    if not asked:
        return None
    param, build = asked[0]
    try:
        grammar = build()
        check(grammar)
    except (ValueError, TypeError, RecursionError) as exc:
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        message = f"{param}: {client_message(text, 'not a valid constraint')}"
        raise APIError(400, message, param, "invalid_value") from exc
    return GuidedDecoding(grammar, after_reasoning)


def _constraints(req: P.SamplingFields, tool_parser) -> list[tuple[str, Callable[[], str]]]:
    """(param, grammar builder) of each constraint the request sets."""
    asked = []
    response_format = req.response_format
    if response_format is not None and response_format.type != "text":
        asked.append(("response_format", partial(_response_format, response_format)))
    for kind in KINDS:
        value = getattr(req, f"guided_{kind}")
        if value is not None:
            asked.append((f"guided_{kind}", partial(BUILDERS[kind], value)))
    outputs = req.structured_outputs.model_dump(by_alias=True) if req.structured_outputs else {}
    for kind, value in outputs.items():
        if value is not None and value is not False:
            asked.append((f"structured_outputs.{kind}", partial(BUILDERS[kind], value)))
    tool_choice = getattr(req, "tool_choice", None)
    if getattr(req, "tools", None) and tool_choice not in (None, "none", "auto"):
        asked.append(("tool_choice", partial(tool_call_grammar, req, tool_parser)))
    return asked


def _forbids_calls(req: P.SamplingFields, tool_parser) -> bool:
    return (
        tool_parser is not None
        and bool(getattr(req, "tools", None))
        and getattr(req, "tool_choice", None) == "none"
    )


def no_call_grammar(start_tag: str) -> str:
    """Any text in which `start_tag` never appears (llguidance's `&` and `~` on a lexeme)."""
    from llguidance import LLMatcher

    tag = re.escape(start_tag).replace("/", "\\/")
    return LLMatcher.grammar_from_lark(f"start: TEXT\nTEXT: /(?s:.*)/ & ~/(?s:.*{tag}.*)/")


def _response_format(response_format: P.ResponseFormat) -> str:
    if response_format.type == "json_object":
        return json_schema_grammar({"type": "object"})
    if response_format.type == "json_schema":
        if response_format.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema object')
        return json_schema_grammar(response_format.json_schema.schema_ or {"type": "object"})
    raise ValueError(f'type "{response_format.type}" is not supported (use json_schema or guided_grammar)')


def _grammar(kind: str, text) -> str:
    from llguidance import grammar_from

    return grammar_from(kind, text)


def json_schema_grammar(schema: dict | str) -> str:
    from llguidance import LLMatcher

    if isinstance(schema, str):
        schema = json.loads(schema)
    if not isinstance(schema, dict):
        raise ValueError("the schema must be a JSON object")
    return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


def tool_call_grammar(req: P.ChatCompletionRequest, tool_parser) -> str:
    """The tool parser's tags around a JSON object whose name and arguments are one of the tools'."""
    from llguidance import LLMatcher

    if tool_parser is None:
        raise ValueError(f"{req.tool_choice!r} needs a tool parser (model.tool_parser); this model has none")
    choice = req.tool_choice
    tools = [t.function for t in req.tools or []]
    if isinstance(choice, P.NamedToolChoice):
        tools = [f for f in tools if f.name == choice.function.name]
    calls = [_call_schema(f.name, f.parameters) for f in tools]
    schema = {"anyOf": calls} if len(calls) > 1 else calls[0]
    body = json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)
    is_one = isinstance(choice, P.NamedToolChoice) or req.parallel_tool_calls is False
    start = "start: call" if is_one else 'start: call ("\\n" call)*'
    start_tag, end_tag = (
        json.dumps(tag) for tag in (tool_parser.start_tag + "\n", "\n" + tool_parser.end_tag)
    )
    return LLMatcher.grammar_from_lark(f"{start}\ncall: {start_tag} %json {body} {end_tag}")


KINDS = ("json", "regex", "choice", "grammar")
BUILDERS = {
    "json": json_schema_grammar,
    "regex": partial(_grammar, "regex"),
    "choice": partial(_grammar, "choice"),
    "grammar": partial(_grammar, "grammar"),
    "json_object": lambda _: json_schema_grammar({"type": "object"}),
}


def _call_schema(name: str, parameters: dict | None) -> dict:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters or NO_ARGUMENTS},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
