"""Streaming plumbing for the handlers: several engine requests merged into one stream, what each
choice has sent so far, and server-sent events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from fdkit.engine.async_engine import AsyncLLM, EngineDeadError
from fdkit.engine.llm_engine import RequestOutput
from fdkit.engine.sequence import Sequence
from fdkit.serving.errors import APIError
from fdkit.serving.reasoning import ReasoningParser, ReasoningStream


class ChoiceStream:
    """What one choice of a stream has sent so far."""

    def __init__(self, parser: ReasoningParser | None):
        self.reasoning = ReasoningStream(parser) if parser else None
        self.num_chars = 0
        self.num_tokens = 0
        self.last: RequestOutput | None = None

    def advance(self, out: RequestOutput) -> tuple[str, str, list[int]]:
        """(reasoning delta, content delta, new token ids) for the newest output."""
        new_ids = out.token_ids[self.num_tokens :]
        self.num_tokens, self.last = len(out.token_ids), out
        if self.reasoning is not None:
            reasoning, content = self.reasoning.feed(out.text, final=out.finished)
            return reasoning, content, new_ids
        delta = out.text[self.num_chars :]
        self.num_chars = len(out.text)
        return "", delta, new_ids


async def collect(engine: AsyncLLM, seqs: list[Sequence]) -> list[RequestOutput]:
    last: dict[int, RequestOutput] = {}
    try:
        async for i, out in merge(engine, seqs):
            last[i] = out
    except EngineDeadError as exc:
        raise APIError(503, str(exc), code="engine_unavailable") from exc
    return [last[i] for i in range(len(seqs))]


async def merge(engine: AsyncLLM, seqs: list[Sequence]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they arrive, tagged with their index; closing it aborts them all."""
    if len(seqs) == 1:
        async for out in engine.stream(seqs[0]):
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, seq: Sequence) -> None:
        try:
            async for out in engine.stream(seq):
                await queue.put((index, out))
        except EngineDeadError as exc:
            await queue.put((index, exc))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, seq)) for i, seq in enumerate(seqs)]
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


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_response(stream: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
