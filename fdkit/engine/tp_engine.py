"""Tensor parallelism across processes: `LLM` with tp > 1 drives N rank processes.

Rank 0 holds the engine (scheduler, KV bookkeeping, sampler, detokenizer) and its shard of the model;
ranks 1..N-1 hold only their shards. Per step, rank 0 sends each other rank one small message (the new
token ids, lengths and block tables of the batch); all ranks then run the forward pass, meeting in
paddle's collectives (gloo on CPU, NCCL on GPU). The driver (the caller's process) keeps the tokenizer
and talks to rank 0 only, one request and one reply per call. It watches every rank: if one dies, the
others are killed and the engine reports itself dead, so nothing hangs on a collective.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
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
import traceback
from multiprocessing.connection import Client, Connection, Listener, wait

from omegaconf import DictConfig, OmegaConf

from fdkit.engine.llm_engine import LLM, EngineDeadError, RequestOutput, ensure_checkpoint, load_tokenizer
from fdkit.engine.sequence import Sequence

logger = logging.getLogger(__name__)


class TensorParallelLLM(LLM):
    """The LLM API over rank processes (built by `LLM(...)` when the config says tp > 1)."""

    def _build(self, config: DictConfig, peers: list | None = None) -> None:
        self.model_path = ensure_checkpoint(config.model)
        self.tokenizer = load_tokenizer(self.model_path)
        self.requests: dict[str, Sequence] = {}
        self._stats = {"num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0}
        self.error: str | None = None
        self.processes, self._conn = start_ranks(config)
        info = self._call(("hello",), timeout=config.engine.get("rank_start_timeout_s", 600))
        self.max_model_len, self.vocab_size = info["max_model_len"], info["vocab_size"]
        self.rank_info = info["ranks"]
        self._request_counter = itertools.count()
        logger.info("tensor-parallel engine ready: %d ranks, pids %s", config.tp, self.rank_pids)

    @property
    def rank_pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    # -- the LLM interface, forwarded to rank 0 -------------------------------------------------------

    def add_sequence(self, seq: Sequence) -> str:
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        self._call(("add", seq))
        self.requests[seq.request_id] = seq
        return seq.request_id

    def abort(self, request_id: str) -> bool:
        if self.requests.pop(request_id, None) is None:
            return False
        return self._call(("abort", request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def stats(self) -> dict:
        return dict(self._stats)

    def step(self) -> list[RequestOutput]:
        outputs, self._stats = self._call(("step",))
        for output in outputs:
            if output.finished:
                self.requests.pop(output.request_id, None)
        return outputs

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            if self.error is None:
                self._conn.send(("close",))
        stop_ranks(self.processes)

    # -- talking to rank 0 ----------------------------------------------------------------------------

    def _call(self, message: tuple, timeout: float | None = None):
        """Sends one message to rank 0 and waits for its reply, watching every rank while it waits."""
        if self.error is not None:
            raise EngineDeadError(self.error)
        deadline = None if timeout is None else time.time() + timeout
        try:
            self._conn.send(message)
            while not wait([self._conn], timeout=0.2):
                dead = [p.pid for p in self.processes if not p.is_alive()]
                if dead:
                    self._fail(f"rank process(es) {dead} stopped")
                if deadline is not None and time.time() > deadline:
                    self._fail(f"rank 0 did not answer {message[0]!r} within {timeout} s")
            status, payload = self._conn.recv()
        except (EOFError, OSError) as exc:
            self._fail(f"lost rank 0: {exc}")
        if status == "error":
            self._fail(payload)
        return payload

    def _fail(self, reason: str):
        self.error = reason
        stop_ranks(self.processes)
        raise EngineDeadError(reason)


# -- starting and stopping ranks ------------------------------------------------------------------------


class RankProcess:
    """One rank, started as `python -m fdkit.engine.rank_worker` (no re-import of the caller's script)."""

    def __init__(self, rank: int, args: dict):
        command = [sys.executable, "-m", "fdkit.engine.rank_worker", json.dumps({**args, "rank": rank})]
        self.rank = rank
        self.popen = subprocess.Popen(command, start_new_session=True)  # own process group
        self.pid = self.popen.pid

    def is_alive(self) -> bool:
        return self.popen.poll() is None


def start_ranks(config: DictConfig) -> tuple[list[RankProcess], Connection]:
    world_size, engine = config.tp, config.engine
    ports = (
        [engine.dist_port + k for k in range(world_size + 1)]
        if engine.dist_port
        else free_ports(world_size + 1)
    )
    authkey = secrets.token_bytes(16)
    listener = Listener(("127.0.0.1", 0), authkey=authkey)
    args = {
        "world_size": world_size,
        "config": OmegaConf.to_container(config, resolve=True),
        "endpoints": [f"{engine.dist_host}:{port}" for port in ports[:world_size]],
        "driver": list(listener.address),
        "rank0_listen": [engine.dist_host, ports[world_size]],
        "authkey": authkey.hex(),
    }
    processes = [RankProcess(rank, args) for rank in range(world_size)]
    accepted: list[Connection] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
    thread.start()  # rank 0 reports in; meanwhile, watch that no rank has died
    deadline = time.time() + engine.rank_start_timeout_s
    while thread.is_alive() and all(p.is_alive() for p in processes) and time.time() < deadline:
        thread.join(0.2)
    listener.close()
    if not accepted:
        stop_ranks(processes, grace_s=0)
        raise EngineDeadError("the rank processes did not start (see their output above)")
    return processes, accepted[0]


def stop_ranks(processes: list[RankProcess], grace_s: float = 5.0) -> None:
    """Waits briefly for a clean exit, then kills each rank with its whole process group."""
    deadline = time.time() + grace_s
    while time.time() < deadline and any(p.is_alive() for p in processes):
        time.sleep(0.05)
    for process in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # the rank and what paddle started under it
        process.popen.wait(5)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# -- inside a rank process ------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """A rank must not outlive the process that started it (Linux: PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _init_process_group(rank: int, world_size: int, device: str, endpoints: list[str]) -> None:
    backend = "gloo" if device == "cpu" else "nccl"
    os.environ.update(
        {
            "PADDLE_TRAINER_ID": str(rank),
            "PADDLE_TRAINERS_NUM": str(world_size),
            "PADDLE_TRAINER_ENDPOINTS": ",".join(endpoints),
            "PADDLE_CURRENT_ENDPOINT": endpoints[rank],
            "PADDLE_DISTRI_BACKEND": backend,
        }
    )
    import paddle
    import paddle.distributed as dist

    if backend == "nccl":
        paddle.set_flags({"FLAGS_selected_gpus": str(rank)})
    dist.init_parallel_env()

    from fdkit.parallel import set_parallel_state

    set_parallel_state(rank, world_size, None)


def rank_main(args: dict) -> None:
    _die_with_parent()
    rank, world_size = args["rank"], args["world_size"]
    authkey = bytes.fromhex(args["authkey"])
    conn = _connect(tuple(args["driver"]) if rank == 0 else tuple(args["rank0_listen"]), authkey)
    try:
        config = OmegaConf.create(args["config"])
        device = config.engine.device
        if device.startswith("gpu"):
            config.engine.device = f"gpu:{rank}"
        if rank == 0:
            listener = Listener(tuple(args["rank0_listen"]), authkey=authkey)
            peers = [listener.accept() for _ in range(world_size - 1)]
            peers.sort(key=lambda peer: peer.recv())  # each peer first says its rank
            listener.close()
        else:
            conn.send(rank)
        _init_process_group(rank, world_size, device, args["endpoints"])
        if rank == 0:
            _serve_rank0(config, conn, peers)
        else:
            _serve_peer(config, conn)
    except BaseException:  # noqa: BLE001 - report, then exit; the driver kills the rest
        with contextlib.suppress(Exception):
            conn.send(("error", f"rank {rank}: {traceback.format_exc()}"))
        raise


def _connect(address: tuple, authkey: bytes, timeout_s: float = 60.0) -> Connection:
    deadline = time.time() + timeout_s
    while True:
        try:
            return Client(address, authkey=authkey)
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)


def _parameter_count(model) -> int:
    return sum(int(p.size) for p in model.parameters())


def _serve_peer(config: DictConfig, conn: Connection) -> None:
    from fdkit.engine.model_runner import ModelRunner

    runner = ModelRunner(config.engine, ensure_checkpoint(config.model), world_size=config.tp)
    conn.send(("ready", {"pid": os.getpid(), "num_parameters": _parameter_count(runner.model)}))
    while True:
        message = conn.recv()
        if message[0] == "close":
            return
        runner.run(message[1])


def _serve_rank0(config: DictConfig, conn: Connection, peers: list[Connection]) -> None:
    llm = object.__new__(LLM)  # the in-process engine itself, whatever config.tp says
    llm.config, llm._closed = config, False
    llm._build(config, peers=peers)
    ranks = [{"pid": os.getpid(), "num_parameters": _parameter_count(llm.runner.model)}]
    for peer in peers:
        status, info = peer.recv()
        if status != "ready":
            raise RuntimeError(info)
        ranks.append(info)
    handlers = {
        "hello": lambda: {"max_model_len": llm.max_model_len, "vocab_size": llm.vocab_size, "ranks": ranks},
        "add": llm.add_sequence,
        "abort": llm.abort,
        "step": lambda: (llm.step(), llm.stats),
    }
    while True:
        message = conn.recv()
        if message[0] == "close":
            for peer in peers:
                peer.send(("close",))
            return
        conn.send(("ok", handlers[message[0]](*message[1:])))
