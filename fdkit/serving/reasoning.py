"""Splitting ERNIE output into reasoning and answer, for whole texts and for streams.

`ernie-45-vl`: reasoning is what comes before `</think>`, the answer what follows it (leading newlines
dropped).
`ernie-x1`: the same split; after `</think>` leading newlines are dropped and the answer is the text inside
`<response>…</response>` (to the end if unclosed), after any plain text before it; a `<tool_call>` ends it
(with keep_tool_calls, for the tool parser, the text from the first `<tool_call>` on is kept in the answer).
Both drop a leading `<think>`. Without `</think>` (yet) everything is reasoning, in a stream and in a whole
text alike, so the two always agree; a tag split across chunks is held back until it is complete.
"""

from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"
RESPONSE_START, RESPONSE_END, TOOL_CALL = "<response>", "</response>", "<tool_call>"


def hold_partial(text: str, tags: tuple[str, ...]) -> str:
    """`text` without a trailing proper prefix of any tag (it may become the tag)."""
    for size in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        if any(tag.startswith(text[-size:]) for tag in tags):
            return text[:-size]
    return text


class ReasoningParser:
    name = "ernie-45-vl"
    end_token = THINK_END
    tags: tuple[str, ...] = (THINK_START, THINK_END)

    def __init__(self, keep_tool_calls: bool = False):
        self.keep_tool_calls = keep_tool_calls

    def split(self, text: str, final: bool = True) -> tuple[str, str]:
        """(reasoning, answer); with final=False a possibly incomplete tag at the end is held back."""
        if text.startswith(THINK_START):
            text = text[len(THINK_START) :]
        elif not final and THINK_START.startswith(text):
            return "", ""
        if THINK_END not in text:
            return (text if final else hold_partial(text, self.tags)), ""
        reasoning, answer = text.split(THINK_END, 1)
        return reasoning, self._answer(answer, final)

    def _answer(self, text: str, final: bool) -> str:
        return text.lstrip("\n")  # "</think>\n\n42" answers "42" (as vLLM's ERNIE parser does)


class ErnieX1ReasoningParser(ReasoningParser):
    name = "ernie-x1"
    tags = (THINK_START, THINK_END, RESPONSE_START, RESPONSE_END, TOOL_CALL)

    def _answer(self, text: str, final: bool) -> str:
        text = text.lstrip("\n")
        cut = min((i for i in (text.find(RESPONSE_START), text.find(TOOL_CALL)) if i >= 0), default=-1)
        if cut < 0:
            return text if final else hold_partial(text, (RESPONSE_START, TOOL_CALL))
        plain = text[:cut]
        if text.startswith(TOOL_CALL, cut):
            return plain + self._tool_calls(text[cut:])
        answer = text[cut + len(RESPONSE_START) :].lstrip("\n")
        end = answer.find(RESPONSE_END)
        if end >= 0:
            return plain + answer[:end] + self._tool_calls(answer[end + len(RESPONSE_END) :])
        return plain + (answer if final else hold_partial(answer, (RESPONSE_END,)))

    def _tool_calls(self, text: str) -> str:
        """The text from its first `<tool_call>` on, when the tool parser wants it."""
        start = text.find(TOOL_CALL) if self.keep_tool_calls else -1
        return text[start:] if start >= 0 else ""


PARSERS = {cls.name: cls for cls in (ReasoningParser, ErnieX1ReasoningParser)}


def get_parser(name: str | None, keep_tool_calls: bool = False) -> ReasoningParser | None:
    if not name:
        return None
    if name not in PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of {sorted(PARSERS)}")
    return PARSERS[name](keep_tool_calls)


class ReasoningStream:
    """Turns the growing text of a stream into (reasoning delta, answer delta) pairs."""

    def __init__(self, parser: ReasoningParser):
        self.parser = parser
        self.reasoning = ""
        self.answer = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        reasoning, answer = self.parser.split(text, final)
        reasoning_delta = reasoning[len(self.reasoning) :] if reasoning.startswith(self.reasoning) else ""
        answer_delta = answer[len(self.answer) :] if answer.startswith(self.answer) else ""
        self.reasoning = max(reasoning, self.reasoning, key=len)
        self.answer = max(answer, self.answer, key=len)
        return reasoning_delta, answer_delta
