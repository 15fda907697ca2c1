"""The engine thread of `AsyncLLM`: it admits and aborts requests, steps the engine, keeps one request's
failure from reaching the others and, when the engine dies, fails the requests in flight and starts a
new engine (or gives up, as `server.on_engine_death` says)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from fdkit.engine.llm_engine import EngineDeadError, RequestFailedError, RequestOutput
from fdkit.engine.sequence import Sequence
from fdkit.llm import LLM

logger = logging.getLogger(__name__)
HEALTH_POLL_S = 0.1  # how often an idle engine checks that its processes live
MAX_BACKOFF_S = 30.0
ENGINE_DIED = "the engine stopped unexpectedly; the request was not completed"
ADMIT_FAILED = "the engine could not admit the request"


class EngineObserver:
    """Told of each admitted request and each output, on the engine thread (metrics hook in here)."""

    def on_request(self, num_prompt_tokens: int) -> None:
        pass

    def on_output(self, output: RequestOutput) -> None:
        pass

    def on_abort(self, request_id: str) -> None:
        pass


class Listeners:
    """Request id -> the asyncio queue its stream reads; any thread may deliver to it."""

    def __init__(self):
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()

    def add(self, request_id: str, queue: asyncio.Queue) -> None:
        with self._lock:
            self._queues[request_id] = (asyncio.get_running_loop(), queue)

    def remove(self, request_id: str) -> None:
        with self._lock:
            self._queues.pop(request_id, None)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._queues)

    def __len__(self) -> int:
        return len(self._queues)

    def deliver(self, request_id: str, item: object) -> None:
        with self._lock:
            listener = self._queues.get(request_id)
        if listener is not None:
            loop, queue = listener
            with contextlib.suppress(RuntimeError):  # its event loop has closed: nobody listens
                loop.call_soon_threadsafe(queue.put_nowait, item)

    def fail(self, request_ids: list[str], error: Callable[[], BaseException]) -> None:
        """Ends these streams with an error each (a fresh one each: they are raised in different tasks)."""
        for request_id in request_ids:
            self.deliver(request_id, error())


@dataclass
class RestartPolicy:
    on_engine_death: str = "restart"  # or "exit": give up at once
    max_engine_restarts: int = 5  # start attempts over the engine's life
    restart_backoff_s: float = 1.0  # before the first attempt; doubles after each failed one

    @classmethod
    def of(cls, server_cfg) -> RestartPolicy:
        return cls(server_cfg.on_engine_death, server_cfg.max_engine_restarts, server_cfg.restart_backoff_s)


class EngineSupervisor:
    """Runs the engine loop on its own thread; the event loop talks to it through `post`."""

    def __init__(
        self,
        llm: LLM,
        listeners: Listeners,
        policy: RestartPolicy,
        on_fatal: Callable[[str], None] | None = None,
    ):
        self.llm, self.listeners, self.policy, self.on_fatal = llm, listeners, policy, on_fatal
        self.observer = EngineObserver()
        self.error: BaseException | None = None  # set while the engine is dead
        self.is_done = False  # the thread has ended: nothing posted will be served
        self.num_restarts = 0
        self._num_attempts = 0
        self._inbox: list[tuple[str, object]] = []
        self._inbox_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fdkit-engine", daemon=True)
        self.thread.start()

    @property
    def is_serving(self) -> bool:
        return self.error is None and not self.is_done and not self._stop.is_set() and self.thread.is_alive()

    @property
    def num_posted(self) -> int:
        return len(self._inbox)

    def post(self, kind: str, payload: object) -> None:
        with self._inbox_lock:
            self._inbox.append((kind, payload))
        self._wake.set()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._wake.set()
        self.thread.join(timeout)

    # -- the thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._serve()
                except Exception as exc:  # the engine died (or a bug of ours): a new engine, or give up
                    if not self._recover(exc):
                        break
        finally:
            self.is_done = True  # before failing the listeners: a stream that starts later sees it
            self.listeners.fail(self.listeners.ids(), lambda: EngineDeadError("the engine has stopped"))
            self._close_engine()

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            if self.llm.has_unfinished_requests():
                self._step()
                continue
            self._wake.wait(timeout=HEALTH_POLL_S)
            self._wake.clear()
            self.llm.check_health()

    def _step(self) -> None:
        try:
            outputs = self.llm.step()
        except RequestFailedError as exc:
            request_ids, reason = exc.request_ids, str(exc)
            logger.error("requests %s failed in a step (the engine serves on)", request_ids)
            self.listeners.fail(request_ids, lambda: RequestFailedError(request_ids, reason))
            return
        for output in outputs:
            _notify(self.observer.on_output, output)
            self.listeners.deliver(output.request_id, output)

    def _drain_inbox(self) -> None:
        with self._inbox_lock:
            items, self._inbox = self._inbox, []
        for kind, payload in items:
            if kind == "add":
                self._admit(payload)  # type: ignore[arg-type]
            else:
                self._abort(payload)  # type: ignore[arg-type]

    def _admit(self, seq: Sequence) -> None:
        try:
            self.llm.add_sequence(seq)
        except Exception as exc:
            if _is_death(exc):
                raise
            logger.error("request %s could not be admitted", seq.request_id, exc_info=exc)
            self.listeners.fail([seq.request_id], lambda: RequestFailedError([seq.request_id], ADMIT_FAILED))
            return
        _notify(self.observer.on_request, seq.num_prompt_tokens)

    def _abort(self, request_id: str) -> None:
        try:
            is_aborted = self.llm.abort(request_id)
        except Exception as exc:
            if _is_death(exc):
                raise
            logger.error("request %s could not be aborted", request_id, exc_info=exc)
            return
        if is_aborted:
            _notify(self.observer.on_abort, request_id)

    # -- death and restarts -------------------------------------------------------------------------

    def _recover(self, exc: Exception) -> bool:
        """Fails every request in flight, then starts a new engine; False if it gives up."""
        self.error = exc  # unhealthy at once
        logger.error("the engine died: %s", exc, exc_info=None if _is_death(exc) else exc)
        with self._inbox_lock:
            self._inbox.clear()  # then the listeners: a request posted after this is served later
        self.listeners.fail(self.listeners.ids(), lambda: EngineDeadError(ENGINE_DIED))
        if self.policy.on_engine_death != "restart":
            return self._give_up(f"the engine died ({exc}); server.on_engine_death is 'exit'")
        num_failed = 0
        while self._num_attempts < self.policy.max_engine_restarts:
            delay = min(self.policy.restart_backoff_s * 2**num_failed, MAX_BACKOFF_S)
            if self._stop.wait(delay):
                return False
            if self._try_restart():
                return True
            num_failed += 1
        return self._give_up(f"the engine died ({exc}); {self._num_attempts} restart attempt(s) used")

    def _try_restart(self) -> bool:
        self._num_attempts += 1
        try:
            self.llm.restart_engine()
        except Exception:
            logger.exception("engine restart attempt %d failed", self._num_attempts)
            return False
        self.num_restarts += 1
        self.error = None
        logger.info("engine restarted (restart %d)", self.num_restarts)
        return True

    def _give_up(self, reason: str) -> bool:
        logger.critical("the engine will not be restarted: %s", reason)
        if self.on_fatal is not None and not self._stop.is_set():
            _notify(self.on_fatal, reason)
        return False

    def _close_engine(self) -> None:
        try:
            self.llm.close()
        except Exception:
            logger.exception("closing the engine failed")


def _is_death(exc: BaseException) -> bool:
    return isinstance(exc, EngineDeadError) and not isinstance(exc, RequestFailedError)


def _notify(callback: Callable, *args) -> None:
    """Observers and callbacks must not take the engine down."""
    try:
        callback(*args)
    except Exception:
        logger.exception("%s failed", getattr(callback, "__qualname__", callback))
