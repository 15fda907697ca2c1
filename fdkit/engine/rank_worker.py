"""Inside a rank process: `python -m fdkit.engine.rank_worker` with its arguments as JSON on stdin
(started by `RankEngine`, or on another node by its agent: fdkit/engine/rank_agent.py).

Rank 0 runs the engine core and, per step, sends each other rank one small message (the new token ids,
lengths and block tables of the batch); all ranks then run the forward pass, meeting in paddle's
collectives (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import time
import traceback
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

from fdkit.checkpoint import CheckpointError
from fdkit.config import FdkitConfig, to_config
from fdkit.engine.llm_engine import LLMEngine, RequestFailedError, load_tokenizer
from fdkit.engine.rank_messages import DeltaEncoder
from fdkit.engine.rank_nodes import accept_authenticated, set_no_delay

logger = logging.getLogger(__name__)


def rank_main(args: dict) -> None:
    _die_with_parent()
    rank, world_size = args["rank"], args["world_size"]
    log_format = f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s"
    logging.basicConfig(level=logging.WARNING, format=log_format)
    peer_authkey = bytes.fromhex(
        args.get("peer_authkey") or args["authkey"]
    )  # other hosts: the shared secret
    if rank == 0:
        conn = _connect(tuple(args["driver"]), bytes.fromhex(args["authkey"]))
    else:
        conn = _connect(tuple(args["rank0_listen"]), peer_authkey)
    try:
        config = _local_config(args)
        device = config.engine.device  # "cpu", or this rank's "gpu:N"
        peers = _accept_peers(args, peer_authkey) if rank == 0 and world_size > 1 else []
        if rank > 0:
            conn.send(rank)
        if world_size > 1:
            _init_process_group(rank, world_size, device, args["endpoints"], args.get("ifname"))
        model_path = Path(args["model_path"])
        if rank == 0:
            _serve_rank0(config, model_path, conn, peers)
        else:
            _serve_peer(config, model_path, conn)
    except CheckpointError as exc:  # the model cannot be loaded as configured: the driver says so
        with contextlib.suppress(Exception):
            conn.send(("startup_error", str(exc)))
        raise SystemExit(1) from exc
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", f"rank {rank}: {traceback.format_exc()}"))
        raise


def _local_config(args: dict) -> FdkitConfig:
    """The config as this rank runs it: its GPU is its index on this host, and (threads=0) the host's
    cores are shared among the ranks on this host only."""
    config = to_config(args["config"])
    num_local_ranks = args.get("num_local_ranks", args["world_size"])
    local_rank = args["rank"] % num_local_ranks
    if config.engine.device.startswith("gpu"):
        config.engine.device = f"gpu:{local_rank}"
    if config.engine.threads == 0 and num_local_ranks < args["world_size"]:
        config.engine.threads = max(1, len(os.sched_getaffinity(0)) // num_local_ranks)
    return config


def _accept_peers(args: dict, authkey: bytes) -> list[Connection]:
    """The other ranks, sorted; a client that fails or stalls the handshake (on several hosts this
    port is open to the network) is dropped, not fatal."""
    listener = Listener(tuple(args["rank0_listen"]))
    peers: list[Connection] = []
    while len(peers) < args["world_size"] - 1:
        try:
            peers.append(accept_authenticated(listener, authkey))
        except (AuthenticationError, EOFError, OSError) as exc:
            logger.warning("rank 0 dropped a peer that did not authenticate: %r", exc)
    peers.sort(key=lambda peer: peer.recv())  # each peer first says its rank
    listener.close()
    return peers


def _die_with_parent() -> None:
    """A rank must not outlive the process that started it (Linux: PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _connect(address: tuple, authkey: bytes, timeout_s: float = 60.0) -> Connection:
    deadline = time.time() + timeout_s
    while True:
        try:
            return set_no_delay(Client(address, authkey=authkey))
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)


def _init_process_group(
    rank: int, world_size: int, device: str, endpoints: list[str], ifname: str | None
) -> None:
    """Paddle's process group, from the variables paddle.distributed.launch would set."""
    backend = "gloo" if device == "cpu" else "nccl"
    os.environ.update(
        {
            "PADDLE_TRAINER_ID": str(rank),
            "PADDLE_TRAINERS_NUM": str(world_size),
            "PADDLE_TRAINER_ENDPOINTS": ",".join(endpoints),
            "PADDLE_CURRENT_ENDPOINT": endpoints[rank],
            "PADDLE_MASTER": endpoints[0],
            "PADDLE_DISTRI_BACKEND": backend,
        }
    )
    if ifname:  # across hosts: the interface the other nodes reach (else gloo may pick the loopback)
        os.environ.update({"GLOO_SOCKET_IFNAME": ifname, "NCCL_SOCKET_IFNAME": ifname})
    import paddle
    import paddle.distributed as dist

    if backend == "nccl":
        paddle.set_flags({"FLAGS_selected_gpus": device.partition(":")[2] or "0"})
    dist.init_parallel_env()

    from fdkit.parallel import set_parallel_state

    set_parallel_state(rank, world_size, None)


def _parameter_count(model) -> int:
    """Weights held, in float32 elements (packed linear weights included)."""
    from fdkit.parallel import held_weight_bytes

    return held_weight_bytes(model) // 4


def _serve_peer(config: FdkitConfig, model_path: Path, conn: Connection) -> None:
    from fdkit.engine.model_runner import ModelRunner

    runner = ModelRunner(config.engine, model_path, world_size=config.tp)
    conn.send(("ready", {"pid": os.getpid(), "num_parameters": _parameter_count(runner.model)}))
    while True:
        message = conn.recv()
        if message[0] == "close":
            return
        runner.run(message[1])


def _serve_rank0(config: FdkitConfig, model_path: Path, conn: Connection, peers: list[Connection]) -> None:
    engine = LLMEngine(config, model_path, load_tokenizer(model_path), peers=peers)
    ranks = [{"pid": os.getpid(), "num_parameters": _parameter_count(engine.runner.model)}]
    for peer in peers:
        status, info = peer.recv()
        if status == "startup_error":  # another rank cannot load its shard: one line, as rank 0's own
            raise CheckpointError(info)
        if status != "ready":
            raise RuntimeError(info)
        ranks.append(info)
    deltas = DeltaEncoder()
    handlers = {
        "hello": lambda: {
            "max_model_len": engine.max_model_len,
            "vocab_size": engine.vocab_size,
            "ranks": ranks,
        },
        "add": engine.add_sequence,
        "abort": lambda request_id: deltas.forget(request_id) or engine.abort(request_id),
        "step": lambda: _step(engine, deltas),
    }
    while True:
        message = conn.recv()
        if message[0] == "close":
            for peer in peers:
                peer.send(("close",))
            return
        conn.send((*_reply(handlers, message), engine.stats))


def _step(engine: LLMEngine, deltas: DeltaEncoder) -> list:
    """A step's outputs as deltas; requests that failed in it are forgotten (they will not return)."""
    try:
        return [deltas.encode(out) for out in engine.step()]
    except RequestFailedError as exc:
        for request_id in exc.request_ids:
            deltas.forget(request_id)
        raise


def _reply(handlers: dict, message: tuple) -> tuple[str, object]:
    """("ok", result), or ("failed", (request ids, reason)) when only some requests failed: rank 0
    serves on. Anything else raises, and the rank dies (the driver sees it)."""
    kind, *args = message
    try:
        return "ok", handlers[kind](*args)
    except RequestFailedError as exc:
        return "failed", (exc.request_ids, str(exc))
    except Exception:
        if kind not in ("add", "abort"):
            raise
        request_id = args[0].request_id if kind == "add" else args[0]
        logger.exception("request %s: %r failed", request_id, kind)
        return "failed", ([request_id], f"the engine could not {kind} the request")


if __name__ == "__main__":
    rank_main(json.loads(sys.stdin.read()))
