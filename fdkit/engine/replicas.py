"""Data parallelism: `dp` engine replicas (each of `tp` ranks) behind the one API process.

`ReplicaSet` has the AsyncLLM API the server uses (prepare, stream, abort, fail_all, the state,
shutdown). It tokenizes once (every replica serves the same model), then routes each request to the
least-loaded replica that is serving: the fewest requests in flight (waiting or running), ties to the
one that was given fewer so far. Each replica keeps its own engine thread and
supervisor: a dead replica takes no new requests while it restarts (or for good, once its restarts are
used up) and the others serve on; the server gives up only when every replica has.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Callable

from fdkit.config import FdkitConfig
from fdkit.engine.async_engine import AsyncLLM, RequestIds, prepare_sequence
from fdkit.engine.llm_engine import EngineDeadError, RequestOutput
from fdkit.engine.sequence import SamplingParams, Sequence
from fdkit.engine.supervisor import EngineObserver
from fdkit.llm import Prompt

logger = logging.getLogger(__name__)
MakeReplica = Callable[[FdkitConfig, Callable[[str], None]], AsyncLLM]


def replica_config(config: FdkitConfig) -> FdkitConfig:
    """A replica's config: with threads=0, the host's cores are shared among all replicas' ranks."""
    engine = config.engine
    threads = engine.threads or max(1, len(os.sched_getaffinity(0)) // (config.dp * config.tp))
    return dataclasses.replace(config, engine=dataclasses.replace(engine, threads=threads))


class ReplicaSet:
    def __init__(self, config: FdkitConfig, make_replica: MakeReplica, on_fatal=None):
        self._on_fatal = on_fatal
        self._observer = EngineObserver()
        self._given_up: set[int] = set()
        self.replicas: list[AsyncLLM] = []
        try:
            for index in range(config.dp):  # one after the other: each plans its memory with what is left
                self.replicas.append(make_replica(replica_config(config), self._fatal_handler(index)))
        except BaseException:
            self.shutdown()
            raise
        self.llm = self.replicas[0].llm  # the tokenizer and limits: the same in every replica
        self.num_routed = [0] * config.dp
        self.num_generated = [0] * config.dp
        self._request_ids = RequestIds()
        logger.info("%d engine replicas serving (dp=%d, tp=%d each)", config.dp, config.dp, config.tp)

    # -- state --------------------------------------------------------------------------------------

    @property
    def metrics(self) -> EngineObserver:
        return self._observer

    @metrics.setter
    def metrics(self, observer: EngineObserver) -> None:
        self._observer = observer
        for index, replica in enumerate(self.replicas):
            replica.metrics = _ReplicaObserver(observer, self, index)

    @property
    def error(self) -> BaseException | None:
        return None if self.is_healthy else self.replicas[0].error

    @property
    def is_healthy(self) -> bool:
        return any(replica.is_healthy for replica in self.replicas)

    @property
    def num_restarts(self) -> int:
        return sum(replica.num_restarts for replica in self.replicas)

    @property
    def num_in_flight(self) -> int:
        return sum(replica.num_in_flight for replica in self.replicas)

    @property
    def num_running(self) -> int:
        return sum(replica.num_running for replica in self.replicas)

    @property
    def num_waiting(self) -> int:
        return sum(replica.num_waiting for replica in self.replicas)

    @property
    def kv_cache_usage(self) -> float:
        return sum(replica.kv_cache_usage for replica in self.replicas) / len(self.replicas)

    # -- requests -----------------------------------------------------------------------------------

    async def prepare(self, prompt: Prompt, params: SamplingParams, request_id: str) -> Sequence:
        self._check_healthy()
        return await prepare_sequence(self.llm, self._request_ids, prompt, params, request_id)

    async def stream(self, seq: Sequence) -> AsyncIterator[RequestOutput]:
        self._request_ids.take(seq.request_id, seq)
        try:
            async for output in self.pick().stream(seq):
                yield output
        finally:
            self._request_ids.release(seq.request_id, seq)

    def pick(self) -> AsyncLLM:
        """The least-loaded replica that serves (EngineDeadError if none does)."""
        serving = [i for i, replica in enumerate(self.replicas) if replica.is_healthy]
        if not serving:
            raise EngineDeadError("no engine replica is serving")
        index = min(serving, key=lambda i: (self.replicas[i].num_in_flight, self.num_routed[i]))
        self.num_routed[index] += 1
        return self.replicas[index]

    def abort(self, request_id: str) -> None:
        for replica in self.replicas:  # a replica that does not hold it ignores it
            replica.abort(request_id)

    def fail_all(self, message: str) -> int:
        return sum(replica.fail_all(message) for replica in self.replicas)

    def _check_healthy(self) -> None:
        if not self.is_healthy:
            raise EngineDeadError("the engine is not running")

    # -- death and shutdown -------------------------------------------------------------------------

    def _fatal_handler(self, index: int) -> Callable[[str], None]:
        def on_fatal(reason: str) -> None:
            self._given_up.add(index)
            logger.error("engine replica %d will not be restarted: %s", index, reason)
            if len(self._given_up) == len(self.replicas) and self._on_fatal is not None:
                self._on_fatal(f"every engine replica died; the last: {reason}")

        return on_fatal

    def shutdown(self, timeout: float = 10.0) -> None:
        for replica in self.replicas:
            replica.shutdown(timeout)


class _ReplicaObserver(EngineObserver):
    """The server's observer, told of one replica's events; counts that replica's tokens."""

    def __init__(self, observer: EngineObserver, replicas: ReplicaSet, index: int):
        self.observer, self.replicas, self.index = observer, replicas, index

    def on_request(self, num_prompt_tokens: int) -> None:
        self.observer.on_request(num_prompt_tokens)

    def on_output(self, output: RequestOutput) -> None:
        self.replicas.num_generated[self.index] += 1
        self.observer.on_output(output)

    def on_abort(self, request_id: str) -> None:
        self.observer.on_abort(request_id)
