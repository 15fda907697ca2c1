"""The engine over rank processes: the same API as `LLMEngine`, served by `config.tp` processes (one for
a server's tp=1 engine, so that a forward pass never holds the server's GIL), on this host or split over
`engine.nnodes` hosts (fdkit/engine/rank_nodes.py).

Rank 0 holds the engine core (scheduler, KV bookkeeping, sampler, detokenizer) and its shard of the
model; ranks 1..N-1 hold only their shards (`fdkit/engine/rank_worker.py`). The driver (the caller's
process) talks to rank 0 only, one request and one reply per call (a step's reply is read one call
later: the next step is sent before the last one's outputs go out), and watches every rank (another
node's through its agent): if one dies, the others are killed and the engine reports itself dead, so
nothing hangs on a collective. A request that fails on rank 0 (a step that raised) comes back as
RequestFailedError; the engine serves on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener, wait
from pathlib import Path

from fdkit.checkpoint import CheckpointError
from fdkit.config import FdkitConfig, to_dict
from fdkit.engine.llm_engine import EngineDeadError, RequestFailedError, RequestOutput
from fdkit.engine.rank_messages import DeltaDecoder
from fdkit.engine.rank_nodes import (
    ClusterError,
    NodeLink,
    check_nodes,
    close_listener,
    interface_towards,
    join_nodes,
    local_ranks,
    set_no_delay,
)
from fdkit.engine.sequence import Sequence

logger = logging.getLogger(__name__)


class RankEngine:
    """The engine API, forwarded to rank 0 of `config.tp` rank processes."""

    def __init__(self, config: FdkitConfig, model_path: Path):
        self.requests: dict[str, Sequence] = {}
        self._stats = {"num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0}
        self.error: str | None = None
        self._closed = False
        self._is_stopped = False
        self._outputs = DeltaDecoder()
        self._is_step_in_flight = False
        self._step_result: list | RequestFailedError | None = None  # a step's, received before its turn
        check_nodes(config)
        if config.engine.node_rank != 0:
            raise ClusterError(f"node {config.engine.node_rank} runs `fdkit rank`; the engine runs on node 0")
        self.processes, self.nodes, self._conn = start_ranks(config, model_path)
        try:
            info = self._call(("hello",), timeout=config.engine.rank_start_timeout_s)
        except BaseException:
            self._stop_ranks(grace_s=0)
            raise
        self.max_model_len, self.vocab_size = info["max_model_len"], info["vocab_size"]
        self.rank_info = info["ranks"]
        kind = "tensor-parallel" if config.tp > 1 else "out-of-process"
        where = f" over {config.engine.nnodes} nodes" if self.nodes else ""
        pids = [rank["pid"] for rank in self.rank_info]
        logger.info("%s engine ready: %d ranks%s, pids %s", kind, config.tp, where, pids)

    @property
    def rank_pids(self) -> list[int]:
        """The pids of this host's ranks."""
        return [p.pid for p in self.processes]

    @property
    def members(self) -> list[RankProcess | NodeLink]:
        """What the engine watches: this host's ranks, and the other nodes' agents."""
        return [*self.processes, *self.nodes]

    def add_sequence(self, seq: Sequence) -> str:
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        self._call(("add", seq))
        self.requests[seq.request_id] = seq
        return seq.request_id

    def abort(self, request_id: str) -> bool:
        if self.requests.pop(request_id, None) is None:
            return False
        self._outputs.forget(request_id)
        is_aborted = self._call(("abort", request_id))
        if isinstance(self._step_result, list):  # a step run before the abort: drop its stale output, which
            # a new request under the same id would otherwise take as its own
            self._step_result = [d for d in self._step_result if d.request_id != request_id]
        return is_aborted

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def stats(self) -> dict:
        return dict(self._stats)

    def step(self) -> list[RequestOutput]:
        """Outputs of rank 0's step. The next step is sent before they are returned: rank 0 computes it
        while the caller delivers these (requests added or aborted meanwhile take effect a step later)."""
        if self._step_result is None:
            if not self._is_step_in_flight:
                self._send(("step",))
            self._step_result = self._receive_step()
        result, self._step_result = self._step_result, None
        if isinstance(result, RequestFailedError):  # rank 0 has aborted them
            for request_id in result.request_ids:
                self.requests.pop(request_id, None)
                self._outputs.forget(request_id)
            raise result
        outputs = [self._outputs.decode(d, self.requests[d.request_id]) for d in result]
        for output in outputs:
            if output.finished:
                self.requests.pop(output.request_id, None)
        if self.requests:
            self._send(("step",))
            self._is_step_in_flight = True
        return outputs

    def _receive_step(self) -> list | RequestFailedError:
        self._is_step_in_flight = False
        try:
            return self._receive("step")
        except RequestFailedError as exc:
            return exc

    def check_health(self) -> None:
        """Raises EngineDeadError if a rank has died (cheap: a poll of each process)."""
        if self.error is not None:
            raise EngineDeadError(self.error)
        self._check_members()

    def _check_members(self) -> None:
        dead = [member.name for member in self.members if not member.is_alive()]
        if dead:
            self._fail(f"rank process(es) stopped: {', '.join(dead)}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            if self.error is None:
                self._conn.send(("close",))
        self._stop_ranks()

    def _stop_ranks(self, grace_s: float = 5.0) -> None:
        if not self._is_stopped:  # once: a reaped rank's pid may belong to another process later
            self._is_stopped = True
            stop_ranks(self.members, grace_s)

    def _call(self, message: tuple, timeout: float | None = None):
        """Sends one message to rank 0 and waits for its reply (a step in flight is received first, its
        result kept for the next `step`)."""
        if self._is_step_in_flight:
            self._step_result = self._receive_step()
        self._send(message)
        return self._receive(message[0], timeout)

    def _send(self, message: tuple) -> None:
        if self.error is not None:
            raise EngineDeadError(self.error)
        try:
            self._conn.send(message)
        except OSError as exc:
            self._fail(f"lost rank 0: {exc}")

    def _receive(self, kind: str, timeout: float | None = None):
        """Rank 0's reply, watching every rank while it waits."""
        deadline = None if timeout is None else time.time() + timeout
        try:
            while not wait([self._conn], timeout=0.2):
                self._check_members()
                if deadline is not None and time.time() > deadline:
                    self._fail(f"rank 0 did not answer {kind!r} within {timeout} s")
            status, payload, *stats = self._conn.recv()  # rank 0's replies carry its stats
        except (EOFError, OSError) as exc:
            self._fail(f"lost rank 0: {exc}")
        if status == "error":
            self._fail(payload)
        if status == "startup_error":  # rank 0 could not load the model: a clean error, no traceback
            self.error = payload
            self._stop_ranks(grace_s=0)
            raise CheckpointError(payload)
        self._stats = stats[0]
        if status == "failed":  # some requests failed on rank 0, which serves on
            raise RequestFailedError(*payload)
        return payload

    def _fail(self, reason: str):
        self.error = reason
        logger.error("the engine's ranks stopped: %s", reason)
        self._stop_ranks(grace_s=0)  # the others may hang in a collective: no point waiting
        raise EngineDeadError(reason)


class RankProcess:
    """One rank, started as `python -m fdkit.engine.rank_worker` (no re-import of the caller's script)."""

    def __init__(self, rank: int, args: dict):
        command = [sys.executable, "-m", "fdkit.engine.rank_worker"]
        self.rank = rank
        # its arguments (the config, the authkeys) go through stdin: a command line is public in `ps`
        self.popen = subprocess.Popen(command, stdin=subprocess.PIPE, start_new_session=True)
        self.popen.stdin.write(json.dumps({**args, "rank": rank}).encode())
        self.popen.stdin.close()
        self.pid = self.popen.pid

    @property
    def name(self) -> str:
        return f"rank {self.rank} (pid {self.pid})"

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # the rank and what paddle started under it
        self.popen.wait(5)


def start_ranks(
    config: FdkitConfig, model_path: Path
) -> tuple[list[RankProcess], list[NodeLink], Connection]:
    """This host's ranks, and (engine.nnodes > 1) the other nodes' agents, which start theirs."""
    engine = config.engine
    job, authkey = rank_job(config), secrets.token_bytes(16)
    listener = Listener(("127.0.0.1", 0), authkey=authkey)
    args = {**job, "model_path": str(model_path), "driver": list(listener.address), "authkey": authkey.hex()}
    if engine.nnodes > 1:  # rank 0's listener also takes other hosts' ranks: they know the shared secret
        args["peer_authkey"] = engine.dist_secret.encode().hex()
        args["ifname"] = engine.dist_ifname or interface_towards(engine.master_addr)
    processes = [RankProcess(rank, args) for rank in local_ranks(config, 0)]
    accepted: list[Connection] = []
    thread = threading.Thread(target=_accept_rank0, args=(listener, accepted), daemon=True)
    thread.start()  # rank 0 reports in; meanwhile, the other nodes join and no rank may die
    nodes: list[NodeLink] = []
    try:
        if engine.nnodes > 1:
            nodes = join_nodes(config, job, lambda: all(p.is_alive() for p in processes))
        deadline = time.time() + engine.rank_start_timeout_s
        while thread.is_alive() and all(p.is_alive() for p in processes) and time.time() < deadline:
            thread.join(0.2)
    except BaseException:
        stop_ranks(processes, grace_s=0)
        raise
    finally:
        close_listener(listener)  # the accepting thread ends, whether rank 0 came or not
    if not accepted:
        stop_ranks([*processes, *nodes], grace_s=0)
        raise EngineDeadError("the rank processes did not start (see their output above)")
    return processes, nodes, accepted[0]


def _accept_rank0(listener: Listener, accepted: list[Connection]) -> None:
    with contextlib.suppress(
        AuthenticationError, EOFError, OSError
    ):  # close_listener's wake-up, a stray client
        accepted.append(set_no_delay(listener.accept()))


def rank_job(config: FdkitConfig) -> dict:
    """What every rank is told, on any node: the world, the config, where rank 0 listens."""
    world_size, engine = config.tp, config.engine
    host = engine.master_addr if engine.nnodes > 1 else engine.dist_host
    num_ports = world_size + 1
    ports = (
        [engine.dist_port + k for k in range(num_ports)] if engine.dist_port else free_ports(num_ports, host)
    )
    return {
        "world_size": world_size,
        "num_local_ranks": world_size // engine.nnodes,
        "config": _rank_config(config),
        # paddle's group meets at the first endpoint (its TCP store); the others only name the ranks
        "endpoints": [f"{host}:{port}" for port in ports[:world_size]],
        "rank0_listen": [host, ports[world_size]],
    }


def _rank_config(config: FdkitConfig) -> dict:
    """The config as ranks get it: without the server's API keys and the nodes' secret, which they do not
    need (and which must not go over the network to another node)."""
    values = to_dict(config)
    values["server"]["api_keys"] = []
    values["engine"]["dist_secret"] = None
    return values


def stop_ranks(members: list, grace_s: float = 5.0) -> None:
    """Waits briefly for a clean exit, then kills each rank (another node's: through its agent)."""
    deadline = time.time() + grace_s
    while time.time() < deadline and any(m.is_alive() for m in members):
        time.sleep(0.05)
    for member in members:
        member.kill()


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
