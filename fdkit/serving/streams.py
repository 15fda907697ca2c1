"""Streaming plumbing: several engine requests merged into one stream, what each choice has sent so far,
and the one server-sent-event stream that chat and completions share."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

from fdkit.engine.async_engine import AsyncLLM, EngineDeadError, RequestFailedError
from fdkit.engine.llm_engine import RequestOutput
from fdkit.engine.sequence import Sequence
from fdkit.serving import protocol as P
from fdkit.serving.errors import APIError, client_message, from_engine_error, internal_error
from fdkit.serving.reasoning import ReasoningParser, ReasoningStream
from fdkit.serving.shapes import Delta, Shape, usage
from fdkit.serving.tool_parsers import ToolParser, ToolStream

logger = logging.getLogger(__name__)
DONE = "data: [DONE]\n\n"


class EventStream:
    """A stream of server-sent events whose `aclose` also runs the `on_close` callbacks, once, even
    when the stream never started (the app always closes what it was given)."""

    def __init__(self, events: AsyncIterator[str], *on_close: Callable[[], None]):
        self.events, self.callbacks = events, list(on_close)

    def on_close(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> str:
        return await self.events.__anext__()

    async def aclose(self) -> None:
        try:
            await self.events.aclose()  # type: ignore[attr-defined]
        finally:
            callbacks, self.callbacks = self.callbacks, []
            for callback in callbacks:
                callback()


class ChoiceStream:
    """What one choice of a stream has sent so far; `prefix` goes before its first text."""

    def __init__(self, parser: ReasoningParser | None, prefix: str = "", tools: ToolParser | None = None):
        self.reasoning = ReasoningStream(parser) if parser else None
        self.tools = ToolStream() if tools else None
        self.prefix = prefix
        self.num_chars = 0
        self.num_tokens = 0
        self.last: RequestOutput | None = None
        self.pending: Delta | None = None  # what has arrived and not been sent

    def due(self, out: RequestOutput, every: int, always: bool) -> Delta | None:
        """Takes `out`; returns what to send now, if anything: at the end, else once `every` tokens
        have gathered with something to show (anything, when `always`)."""
        delta = self.advance(out)
        self.pending = delta if self.pending is None else self.pending.then(delta)
        pending = self.pending
        shown = pending.reasoning or pending.text or pending.calls
        enough = len(pending.token_ids) >= every and (always or shown)
        if not (out.finished or enough):
            return None
        self.pending = None
        return pending

    def advance(self, out: RequestOutput) -> Delta:
        start, new_ids = self.num_tokens, out.token_ids[self.num_tokens :]
        self.num_tokens, self.last = len(out.token_ids), out
        if self.reasoning is not None:
            reasoning, text = self.reasoning.feed(out.text, final=out.finished)
        else:
            reasoning, text = "", out.text[self.num_chars :]
            self.num_chars = len(out.text)
        calls_before, calls = (self.tools.num_calls if self.tools else 0), []
        if self.tools is not None:
            text, calls = self.tools.feed(text, final=out.finished)
        if start == 0:
            text = self.prefix + text
        return Delta(reasoning, text, new_ids, start, tuple(calls), calls_before)


async def event_stream(
    engine: AsyncLLM, seqs: list[Sequence], shape: Shape, options: P.StreamOptions | None, every: int = 1
) -> AsyncIterator[str]:
    """Chunks as outputs arrive (a chunk per choice at most every `every` tokens, FastDeploy's
    max_streaming_response_tokens), then the usage if asked for; an engine failure becomes an error event."""
    include_usage = bool(options and options.include_usage)
    continuous = bool(options and options.continuous_usage_stats)
    num_prompt = seqs[0].num_prompt_tokens
    states = [ChoiceStream(shape.parser, shape.echo(seq), shape.tool_parser) for seq in seqs]

    def running_usage() -> P.Usage | None:
        return usage(num_prompt, sum(s.num_tokens for s in states)) if continuous else None

    for choice in shape.opening(seqs):
        yield sse(shape.chunk([choice], running_usage()))
    try:
        async for i, out in merge(engine, seqs):
            delta = states[i].due(out, every, always=continuous)  # usage stats: every token counts
            if delta is not None:
                for choice in shape.stream_choices(i, out, delta):
                    yield sse(shape.chunk([choice], running_usage()))
        if include_usage:
            yield sse(shape.chunk([], shape.stream_usage(num_prompt, [s.last for s in states])))
    except Exception as exc:  # the response has started: the error goes in the stream
        yield sse(stream_error(exc, shape.request_id).body())
    yield DONE


async def collect(engine: AsyncLLM, seqs: list[Sequence], request_id: str) -> list[RequestOutput]:
    """The final output of each request, in order."""
    last: dict[int, RequestOutput] = {}
    try:
        async for i, out in merge(engine, seqs):
            last[i] = out
    except (EngineDeadError, ValueError) as exc:
        raise stream_error(exc, request_id) from exc
    return [last[i] for i in range(len(seqs))]


def stream_error(exc: Exception, request_id: str) -> APIError:
    """What a client is told when generation fails; the log gets the whole story."""
    if isinstance(exc, RequestFailedError):  # this request only: a fault of ours, not of the request
        logger.error("request %s failed in the engine: %s", request_id, exc, exc_info=exc.__cause__)
        return internal_error(request_id)
    if isinstance(exc, EngineDeadError):
        logger.warning("request %s: the engine failed: %s", request_id, exc, exc_info=exc.__cause__)
        reason = client_message(str(exc), "the engine stopped")
        return APIError(503, f"{reason} (request id {request_id})", code="engine_unavailable")
    if isinstance(exc, ValueError):  # the engine refused the request
        logger.info("request %s refused by the engine: %s", request_id, exc)
        return from_engine_error(exc)
    logger.error("request %s failed", request_id, exc_info=exc)
    return internal_error(request_id)


async def merge(engine: AsyncLLM, seqs: list[Sequence]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they arrive, tagged with their index; closing it aborts them all."""
    if len(seqs) == 1:
        async for out in engine.stream(seqs[0]):
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(engine, i, seq, queue)) for i, seq in enumerate(seqs)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def _pump(engine: AsyncLLM, index: int, seq: Sequence, queue: asyncio.Queue) -> None:
    """Puts (index, output) for each output, (index, error) if it fails, then (index, None)."""
    try:
        async for out in engine.stream(seq):
            await queue.put((index, out))
    except Exception as exc:
        await queue.put((index, exc))
    finally:
        await queue.put((index, None))


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
