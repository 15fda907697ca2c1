"""Streaming plumbing: several engine requests merged into one stream, what each choice has sent so far,
and the one server-sent-event stream that chat and completions share."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fdkit.engine.async_engine import AsyncLLM, EngineDeadError
from fdkit.engine.llm_engine import RequestOutput
from fdkit.engine.sequence import Sequence
from fdkit.serving import protocol as P
from fdkit.serving.errors import engine_unavailable
from fdkit.serving.reasoning import ReasoningParser, ReasoningStream
from fdkit.serving.shapes import Delta, Shape, usage

DONE = "data: [DONE]\n\n"


class ChoiceStream:
    """What one choice of a stream has sent so far; `prefix` goes before its first text."""

    def __init__(self, parser: ReasoningParser | None, prefix: str = ""):
        self.reasoning = ReasoningStream(parser) if parser else None
        self.prefix = prefix
        self.num_chars = 0
        self.num_tokens = 0
        self.last: RequestOutput | None = None

    def advance(self, out: RequestOutput) -> Delta:
        start, new_ids = self.num_tokens, out.token_ids[self.num_tokens :]
        self.num_tokens, self.last = len(out.token_ids), out
        if self.reasoning is not None:
            reasoning, text = self.reasoning.feed(out.text, final=out.finished)
        else:
            reasoning, text = "", out.text[self.num_chars :]
            self.num_chars = len(out.text)
        if start == 0:
            text = self.prefix + text
        return Delta(reasoning, text, new_ids, start)


async def event_stream(
    engine: AsyncLLM, seqs: list[Sequence], shape: Shape, options: P.StreamOptions | None
) -> AsyncIterator[str]:
    """Chunks as outputs arrive, then the usage if asked for; an engine failure becomes an error event."""
    include_usage = bool(options and options.include_usage)
    continuous = bool(options and options.continuous_usage_stats)
    num_prompt = seqs[0].num_prompt_tokens
    states = [ChoiceStream(shape.parser, shape.echo(seq)) for seq in seqs]

    def running_usage() -> P.Usage | None:
        return usage(num_prompt, sum(s.num_tokens for s in states)) if continuous else None

    for choice in shape.opening(seqs):
        yield sse(shape.chunk([choice], running_usage()))
    try:
        async for i, out in merge(engine, seqs):
            delta = states[i].advance(out)
            if delta.reasoning or delta.text or out.finished or continuous:  # usage stats: every token
                yield sse(shape.chunk([shape.stream_choice(i, out, delta)], running_usage()))
        if include_usage:
            yield sse(shape.chunk([], shape.stream_usage(num_prompt, [s.last for s in states])))
    except EngineDeadError as exc:
        yield sse(engine_unavailable(exc).body())
    yield DONE


async def collect(engine: AsyncLLM, seqs: list[Sequence]) -> list[RequestOutput]:
    """The final output of each request, in order."""
    last: dict[int, RequestOutput] = {}
    try:
        async for i, out in merge(engine, seqs):
            last[i] = out
    except EngineDeadError as exc:
        raise engine_unavailable(exc) from exc
    return [last[i] for i in range(len(seqs))]


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
    """Puts (index, output) for each output, (index, error) if the engine dies, then (index, None)."""
    try:
        async for out in engine.stream(seq):
            await queue.put((index, out))
    except EngineDeadError as exc:
        await queue.put((index, exc))
    finally:
        await queue.put((index, None))


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
