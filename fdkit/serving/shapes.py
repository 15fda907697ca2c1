"""What chat and completions do differently: how engine outputs become their choices, chunks, responses,
logprobs and usage. The stream and the collection around them are shared (streams.py, handlers.py)."""

from __future__ import annotations

import time
from typing import NamedTuple

from fdkit.engine.llm_engine import RequestOutput
from fdkit.engine.sequence import Sequence
from fdkit.serving import protocol as P
from fdkit.serving.reasoning import ReasoningParser
from fdkit.serving.tool_parsers import ToolCall, ToolParser


class Delta(NamedTuple):
    """What one output adds to a choice of a stream."""

    reasoning: str
    text: str
    token_ids: list[int]
    start: int  # how many tokens the choice had sent before
    calls: tuple[ToolCall, ...] = ()  # tool calls completed in this delta
    calls_before: int = 0  # how many tool calls the choice had sent before

    def then(self, later: Delta) -> Delta:
        """This delta followed by a later one of the same choice."""
        return Delta(
            self.reasoning + later.reasoning,
            self.text + later.text,
            self.token_ids + later.token_ids,
            self.start,
            self.calls + later.calls,
            self.calls_before,
        )


LogprobEntries = list[tuple[str, float, list[tuple[str, float]]]]  # (token, logprob, [(top token, logprob)])


def usage(
    num_prompt: int, num_completion: int, *, cached: int | None = None, reasoning: int | None = None
) -> P.Usage:
    """Token counts, with details only for the counts given."""
    return P.Usage(
        prompt_tokens=num_prompt,
        completion_tokens=num_completion,
        total_tokens=num_prompt + num_completion,
        prompt_tokens_details=None if cached is None else P.PromptTokensDetails(cached_tokens=cached),
        completion_tokens_details=(
            None if reasoning is None else P.CompletionTokensDetails(reasoning_tokens=reasoning)
        ),
    )


def _num_tokens(outputs: list[RequestOutput]) -> int:
    return sum(len(o.token_ids) for o in outputs)


def _num_cached(outputs: list[RequestOutput]) -> int:
    """Prompt tokens read from the prefix cache (the prompt counts once, however many choices)."""
    return max((o.metrics.get("num_cached_tokens", 0) for o in outputs), default=0)


def _seconds_since_arrival(out: RequestOutput) -> float:
    return time.time() - out.metrics["arrival_time"]


class Shape:
    """The per-endpoint part of a request; subclasses set the models and build the choices."""

    chunk_model: type[P.OpenAIModel]
    response_model: type[P.OpenAIModel]
    parser: ReasoningParser | None = None
    tool_parser: ToolParser | None = None

    def __init__(self, tokenizer, model_name: str, request_id: str, req: P.SamplingFields):
        self.tokenizer, self.model_name, self.request_id, self.req = tokenizer, model_name, request_id, req
        self.created = int(time.time())

    def opening(self, seqs: list[Sequence]) -> list:
        """Choices a stream sends before any output, one chunk each."""
        return []

    def echo(self, seq: Sequence) -> str:
        """Text that goes before a choice's output."""
        return ""

    def chunk(self, choices: list, usage: P.Usage | None = None) -> dict:
        body = self.chunk_model(
            id=self.request_id, created=self.created, model=self.model_name, choices=choices, usage=usage
        )
        return body.model_dump(exclude_none=True)

    def response(self, choices: list, num_prompt: int, outputs: list[RequestOutput]) -> P.OpenAIModel:
        usage = self.usage(num_prompt, outputs)
        return self.response_model(id=self.request_id, model=self.model_name, choices=choices, usage=usage)

    def usage(self, num_prompt: int, outputs: list[RequestOutput]) -> P.Usage:
        raise NotImplementedError

    def stream_usage(self, num_prompt: int, outputs: list[RequestOutput]) -> P.Usage:
        """The usage of a stream's last chunk."""
        return self.usage(num_prompt, outputs)

    def stream_choices(self, index: int, out: RequestOutput, delta: Delta) -> list:
        """What a delta sends, one chunk per choice."""
        return [self.stream_choice(index, out, delta)]

    def stream_choice(self, index: int, out: RequestOutput, delta: Delta):
        raise NotImplementedError

    def token_logprobs(self, out: RequestOutput, start: int = 0) -> LogprobEntries:
        decode = lambda token_id: self.tokenizer.decode([token_id], skip_special_tokens=False)
        pairs = zip(out.token_ids[start:], (out.logprobs or [])[start:], strict=False)
        return [(decode(t), logprob, [(decode(k), v) for k, v in top]) for t, (logprob, top) in pairs]


class ChatShape(Shape):
    chunk_model = P.ChatCompletionStreamResponse
    response_model = P.ChatCompletionResponse

    def __init__(
        self, tokenizer, model_name, request_id, req, parser, reasoning_end_ids: list[int], tool_parser=None
    ):
        super().__init__(tokenizer, model_name, request_id, req)
        self.parser, self.reasoning_end_ids, self.tool_parser = parser, reasoning_end_ids, tool_parser

    def opening(self, seqs: list[Sequence]) -> list[P.ChatCompletionStreamChoice]:
        choices = []
        for i, seq in enumerate(seqs):
            delta = P.DeltaMessage(
                role="assistant", content="", reasoning_content="" if self.parser else None
            )
            if self.req.return_token_ids:
                delta.prompt_token_ids = seq.prompt_token_ids
            choices.append(P.ChatCompletionStreamChoice(index=i, delta=delta))
        return choices

    def stream_choice(self, index: int, out: RequestOutput, delta: Delta) -> P.ChatCompletionStreamChoice:
        reasoning = delta.reasoning or None
        message = P.DeltaMessage(content=delta.text, reasoning_content=reasoning, reasoning=reasoning)
        if self.req.return_token_ids:
            message.completion_token_ids = delta.token_ids
        return P.ChatCompletionStreamChoice(
            index=index,
            delta=message,
            logprobs=self.logprobs(out, delta.start),
            finish_reason=finish_reason(out, delta.calls_before + len(delta.calls)),
            arrival_time=_seconds_since_arrival(out),
        )

    def stream_choices(self, index: int, out: RequestOutput, delta: Delta) -> list:
        """The text's chunk, then two per tool call: its id and name, then its arguments (whole: a call is
        sent once its closing tag has come); the finish reason goes on the last chunk."""
        main = self.stream_choice(index, out, delta)
        if not delta.calls:
            return [main]
        choices = [main]
        for k, call in enumerate(delta.calls, start=delta.calls_before):
            head = {"index": k, "id": tool_call_id(), "type": "function"}
            head["function"] = {"name": call.name, "arguments": ""}
            for entry in (head, {"index": k, "function": {"arguments": call.arguments}}):
                choices.append(
                    P.ChatCompletionStreamChoice(index=index, delta=P.DeltaMessage(tool_calls=[entry]))
                )
        choices[-1].finish_reason, main.finish_reason = main.finish_reason, None
        return choices

    def choice(self, index: int, seq: Sequence, out: RequestOutput) -> P.ChatCompletionChoice:
        reasoning, content = self.parser.split(out.text) if self.parser else (None, out.text)
        reasoning = reasoning or None
        calls: list[ToolCall] = []
        if self.tool_parser is not None:
            content, calls = self.tool_parser.parse(content)
        message = P.ChatResponseMessage(content=content, reasoning_content=reasoning, reasoning=reasoning)
        message.tool_calls = [tool_call_dict(call) for call in calls] or None
        if self.req.return_token_ids:
            message.prompt_token_ids, message.completion_token_ids = out.prompt_token_ids, out.token_ids
        return P.ChatCompletionChoice(
            index=index,
            message=message,
            logprobs=self.logprobs(out),
            finish_reason=finish_reason(out, len(calls)),
        )

    def logprobs(self, out: RequestOutput, start: int = 0) -> P.ChoiceLogprobs | None:
        if not self.req.logprobs:
            return None
        content = [
            P.TokenLogprob(
                token=token,
                logprob=logprob,
                bytes=list(token.encode()),
                top_logprobs=[P.TopLogprob(token=t, logprob=v) for t, v in top],
            )
            for token, logprob, top in self.token_logprobs(out, start)
        ]
        return P.ChoiceLogprobs(content=content)

    def usage(self, num_prompt: int, outputs: list[RequestOutput]) -> P.Usage:
        reasoning = sum(self._num_reasoning_tokens(o.token_ids) for o in outputs) if self.parser else 0
        return usage(num_prompt, _num_tokens(outputs), cached=_num_cached(outputs), reasoning=reasoning)

    def _num_reasoning_tokens(self, ids: list[int]) -> int:
        """Tokens before the end-of-reasoning tokens (all of them if they never came)."""
        end = self.reasoning_end_ids
        for k in range(len(ids) - len(end) + 1):
            if ids[k : k + len(end)] == end:
                return k
        return len(ids)


def tool_call_id() -> str:
    return P.random_id("chatcmpl-tool")


def tool_call_dict(call: ToolCall) -> dict:
    function = {"name": call.name, "arguments": call.arguments}
    return {"id": tool_call_id(), "type": "function", "function": function}


def finish_reason(out: RequestOutput, num_calls: int) -> str | None:
    """`tool_calls` when a choice that called tools stopped by itself (not at a length limit)."""
    return "tool_calls" if num_calls and out.finish_reason == "stop" else out.finish_reason


class CompletionShape(Shape):
    chunk_model = response_model = P.CompletionResponse

    def echo(self, seq: Sequence) -> str:
        if not self.req.echo:
            return ""
        return seq.prompt or self.tokenizer.decode(seq.prompt_token_ids)

    def stream_choice(self, index: int, out: RequestOutput, delta: Delta) -> P.CompletionChoice:
        choice = P.CompletionChoice(
            index=index,
            text=delta.text,
            logprobs=self.logprobs(out, delta.start),
            finish_reason=out.finish_reason,
            arrival_time=_seconds_since_arrival(out),
        )
        if self.req.return_token_ids:
            choice.completion_token_ids = delta.token_ids
        return choice

    def choice(self, index: int, seq: Sequence, out: RequestOutput) -> P.CompletionChoice:
        text = self.echo(seq) + out.text
        choice = P.CompletionChoice(
            index=index, text=text, logprobs=self.logprobs(out), finish_reason=out.finish_reason
        )
        if self.req.return_token_ids:
            choice.prompt_token_ids, choice.completion_token_ids = out.prompt_token_ids, out.token_ids
        return choice

    def logprobs(self, out: RequestOutput, start: int = 0) -> P.CompletionLogprobs | None:
        if self.req.logprobs is None:
            return None
        entries = self.token_logprobs(out, start)
        return P.CompletionLogprobs(
            tokens=[token for token, _, _ in entries],
            token_logprobs=[logprob for _, logprob, _ in entries],
            top_logprobs=[dict(top) for _, _, top in entries],
        )

    def usage(self, num_prompt: int, outputs: list[RequestOutput]) -> P.Usage:
        return usage(num_prompt, _num_tokens(outputs), cached=_num_cached(outputs))

    def stream_usage(self, num_prompt: int, outputs: list[RequestOutput]) -> P.Usage:
        return usage(num_prompt, _num_tokens(outputs))  # no details, unlike the whole response's
