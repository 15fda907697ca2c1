"""The engine as an async service: one background thread steps the LLM while requests come and go.

Requests are tokenized off the event loop, handed to the engine thread through an inbox, and their
outputs come back to each caller's asyncio queue. A caller that stops listening (a client gone) has its
request aborted, and its KV blocks freed, at the next step boundary.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from fdkit.engine.llm import LLM, Prompt
from fdkit.engine.llm_engine import EngineDeadError, RequestOutput
from fdkit.engine.sequence import SamplingParams, Sequence

logger = logging.getLogger(__name__)


class EngineObserver:
    """Told of each admitted request and each output, on the engine thread (metrics hook in here)."""

    def on_request(self, num_prompt_tokens: int) -> None:
        pass

    def on_output(self, output: RequestOutput) -> None:
        pass

    def on_abort(self, request_id: str) -> None:
        pass


class AsyncLLM:
    def __init__(self, llm: LLM, metrics: EngineObserver | None = None):
        self.llm = llm
        self.metrics = metrics or EngineObserver()
        self._inbox: list[tuple[str, object]] = []
        self._inbox_lock = threading.Lock()
        self._wake = threading.Event()
        self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="fdkit-engine", daemon=True)
        self._thread.start()

    # -- state --------------------------------------------------------------------------------------

    @property
    def is_healthy(self) -> bool:
        return self.error is None and not self._stopping and self._thread.is_alive()

    @property
    def num_running(self) -> int:
        return self.llm.stats["num_running"]

    @property
    def num_waiting(self) -> int:
        return self.llm.stats["num_waiting"] + len(self._inbox)

    @property
    def kv_cache_usage(self) -> float:
        return self.llm.stats["kv_cache_usage"]

    # -- requests -----------------------------------------------------------------------------------

    async def prepare(self, prompt: Prompt, params: SamplingParams, request_id: str) -> Sequence:
        """Tokenizes and validates off the event loop; raises ValueError for a bad request."""
        if not self.is_healthy:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.llm.make_sequence, prompt, params, request_id)

    async def stream(self, seq: Sequence) -> AsyncIterator[RequestOutput]:
        """Runs a prepared request and yields its outputs; leaving early aborts it."""
        if not self.is_healthy:
            raise EngineDeadError("the engine is not running")
        queue: asyncio.Queue = asyncio.Queue()
        self._listeners[seq.request_id] = (asyncio.get_running_loop(), queue)
        self._post("add", seq)
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine stopped: {item}") from item
                finished = item.finished
                yield item
        finally:
            self._listeners.pop(seq.request_id, None)
            if not finished:
                self.abort(seq.request_id)

    async def generate(
        self, prompt: Prompt, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """prepare + stream in one call."""
        seq = await self.prepare(prompt, params, request_id)
        async for output in self.stream(seq):
            yield output

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def _post(self, kind: str, payload: object) -> None:
        with self._inbox_lock:
            self._inbox.append((kind, payload))
        self._wake.set()

    # -- the engine thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                if not self.llm.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                for output in self.llm.step():
                    self.metrics.on_output(output)
                    self._deliver(output.request_id, output)
        except BaseException as exc:  # every failure must reach the waiting callers
            logger.exception("engine loop failed")
            self.error = exc
            for request_id in list(self._listeners):
                self._deliver(request_id, exc)

    def _drain_inbox(self) -> None:
        with self._inbox_lock:
            items, self._inbox = self._inbox, []
        for kind, payload in items:
            if kind == "add":
                seq: Sequence = payload  # type: ignore[assignment]
                self.metrics.on_request(seq.num_prompt_tokens)
                self.llm.add_sequence(seq)
            elif self.llm.abort(payload):  # type: ignore[arg-type]
                self.metrics.on_abort(payload)  # type: ignore[arg-type]

    def _deliver(self, request_id: str, item: object) -> None:
        listener = self._listeners.get(request_id)
        if listener is not None:
            loop, queue = listener
            loop.call_soon_threadsafe(queue.put_nowait, item)

    # -- shutdown -----------------------------------------------------------------------------------

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the loop (in-flight requests end with an error) and closes the engine."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        for request_id in list(self._listeners):
            self._deliver(request_id, EngineDeadError("the engine is shutting down"))
        self.llm.close()
