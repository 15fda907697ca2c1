"""The engine as an async service: a background thread steps the LLM while requests come and go.

Requests are tokenized off the event loop, handed to the engine thread (`fdkit/engine/supervisor.py`)
through an inbox, and their outputs come back to each caller's asyncio queue. A caller that stops
listening (a client gone) has its request aborted, and its KV blocks freed, at the next step boundary.
Nothing a request carries can stop the engine: a failure ends that request's stream only. If the engine
itself dies, every stream in flight ends with EngineDeadError and a new engine is started.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Callable

from fdkit.engine.llm_engine import EngineDeadError, RequestFailedError, RequestOutput
from fdkit.engine.sequence import SamplingParams, Sequence
from fdkit.engine.supervisor import EngineObserver, EngineSupervisor, Listeners, RestartPolicy
from fdkit.llm import LLM, Prompt

__all__ = ["AsyncLLM", "EngineDeadError", "EngineObserver", "RequestFailedError"]


class AsyncLLM:
    """`on_fatal(reason)` is called (on the engine thread) when the engine died and will not be restarted
    (`server.on_engine_death="exit"`, or `server.max_engine_restarts` used up)."""

    def __init__(
        self,
        llm: LLM,
        metrics: EngineObserver | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ):
        self.llm = llm
        self._listeners = Listeners()
        self._request_ids = RequestIds()
        policy = RestartPolicy.of(llm.config.server)
        self._supervisor = EngineSupervisor(llm, self._listeners, policy, on_fatal)
        self.metrics = metrics or EngineObserver()

    # -- state --------------------------------------------------------------------------------------

    @property
    def metrics(self) -> EngineObserver:
        return self._supervisor.observer

    @metrics.setter
    def metrics(self, observer: EngineObserver) -> None:
        self._supervisor.observer = observer

    @property
    def error(self) -> BaseException | None:
        """Why the engine is not serving (None while it is)."""
        return self._supervisor.error

    @error.setter
    def error(self, exc: BaseException | None) -> None:
        self._supervisor.error = exc

    @property
    def is_healthy(self) -> bool:
        return self._supervisor.is_serving

    @property
    def num_restarts(self) -> int:
        return self._supervisor.num_restarts

    @property
    def num_in_flight(self) -> int:
        """Requests whose stream is open."""
        return len(self._listeners)

    @property
    def num_running(self) -> int:
        return self.llm.stats["num_running"]

    @property
    def num_waiting(self) -> int:
        return self.llm.stats["num_waiting"] + self._supervisor.num_posted

    @property
    def kv_cache_usage(self) -> float:
        return self.llm.stats["kv_cache_usage"]

    # -- requests -----------------------------------------------------------------------------------

    async def prepare(self, prompt: Prompt, params: SamplingParams, request_id: str) -> Sequence:
        """Tokenizes and validates off the event loop, and reserves `request_id` until the request's
        stream ends; raises ValueError for a bad request or an id in use."""
        self._check_healthy()
        return await prepare_sequence(self.llm, self._request_ids, prompt, params, request_id)

    async def stream(self, seq: Sequence) -> AsyncIterator[RequestOutput]:
        """Runs a prepared request and yields its outputs; leaving early aborts it. Raises
        EngineDeadError (RequestFailedError if only this request failed) with a client-safe message."""
        self._request_ids.take(seq.request_id, seq)
        queue: asyncio.Queue = asyncio.Queue()
        self._listeners.add(seq.request_id, queue)
        finished = False
        try:
            self._check_healthy()
            self._supervisor.post("add", seq)
            if self._supervisor.is_done:
                raise EngineDeadError("the engine has stopped")
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._listeners.remove(seq.request_id)
            if not finished:
                self.abort(seq.request_id)  # before the id is free again: the engine sees them in order
            self._request_ids.release(seq.request_id, seq)

    async def generate(
        self, prompt: Prompt, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """prepare + stream in one call."""
        seq = await self.prepare(prompt, params, request_id)
        async for output in self.stream(seq):
            yield output

    def abort(self, request_id: str) -> None:
        self._supervisor.post("abort", request_id)

    def fail_all(self, message: str) -> int:
        """Ends every stream in flight with EngineDeadError(message) and aborts its request (a draining
        server whose grace period is over); returns how many."""
        request_ids = self._listeners.ids()
        self._listeners.fail(request_ids, lambda: EngineDeadError(message))
        for request_id in request_ids:
            self.abort(request_id)
        return len(request_ids)

    def _check_healthy(self) -> None:
        if not self.is_healthy:
            raise EngineDeadError("the engine is not running")

    # -- shutdown -----------------------------------------------------------------------------------

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the loop (in-flight requests end with an error) and closes the engine."""
        self._supervisor.stop(timeout)
        self._listeners.fail(self._listeners.ids(), lambda: EngineDeadError("the engine is shutting down"))
        self.llm.close()


async def prepare_sequence(
    llm: LLM, request_ids: RequestIds, prompt: Prompt, params: SamplingParams, request_id: str
) -> Sequence:
    """`llm.make_sequence` off the event loop, `request_id` held in `request_ids` meanwhile and after."""
    pending = _Pending()
    request_ids.take(request_id, pending)
    try:
        loop = asyncio.get_running_loop()
        seq = await loop.run_in_executor(None, llm.make_sequence, prompt, params, request_id)
    finally:
        request_ids.release(request_id, pending)
    request_ids.take(request_id, seq)
    return seq


class _Pending:
    """Holds a request id while its request is being tokenized."""


class RequestIds:
    """Request ids in use: taken by prepare() or stream(), given back when the stream ends. A sequence
    prepared but never streamed gives its id back once it is garbage (its entry is dropped then)."""

    def __init__(self):
        self._owners: dict[str, weakref.ref] = {}

    def __len__(self) -> int:
        return len(self._owners)

    def take(self, request_id: str, owner: object) -> None:
        current = self._owners.get(request_id)
        holder = current() if current is not None else None
        if holder is not None and holder is not owner:
            raise ValueError(f"request id {request_id!r} is already in use")
        if holder is None:
            self._owners[request_id] = weakref.ref(owner, self._dropper(request_id))

    def _dropper(self, request_id: str) -> Callable[[weakref.ref], None]:
        """A weakref callback that removes `request_id`'s entry if it is still that (dead) reference."""
        owners = self._owners  # not self: the callback must not keep the table alive

        def drop(ref: weakref.ref) -> None:
            if owners.get(request_id) is ref:
                owners.pop(request_id, None)

        return drop

    def release(self, request_id: str, owner: object) -> None:
        current = self._owners.get(request_id)
        holder = current() if current is not None else None
        if current is not None and (holder is None or holder is owner):
            del self._owners[request_id]
