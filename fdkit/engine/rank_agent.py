"""`fdkit rank ... engine.node_rank=K`: the agent of node K > 0 (see fdkit/engine/rank_nodes.py).

It joins node 0, starts this node's ranks of the engine node 0 builds, reports once a second, and stops
its ranks when node 0 says so, when the link drops or when one of them dies (node 0 is told). Then it
joins again, for the engine node 0 starts next; it gives up (ClusterError) when node 0 cannot be reached
within `engine.rank_start_timeout_s`, refuses it, or has another secret.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection
from pathlib import Path

from fdkit.config import FdkitConfig
from fdkit.engine.rank_engine import RankProcess, stop_ranks
from fdkit.engine.rank_nodes import (
    HEARTBEAT_S,
    ClusterError,
    check_nodes,
    interface_towards,
    local_ranks,
    set_no_delay,
)

logger = logging.getLogger(__name__)


def serve_node(config: FdkitConfig, model_path: Path) -> None:
    """Runs this node's ranks of each engine node 0 starts, until node 0 stays away or refuses it."""
    check_nodes(config)
    engine = config.engine
    if engine.node_rank == 0:
        raise ClusterError("node 0 runs the server (python launch.py / fdkit serve), not `fdkit rank`")
    while True:
        conn = reach_master(config)
        try:
            job = _join(conn, config)
        except (EOFError, OSError):  # node 0 closed its door meanwhile (an engine that stopped starting)
            time.sleep(1.0)
            continue
        processes = _start_ranks(config, model_path, job)
        reason = _watch(conn, processes)
        logger.warning(
            "node %d: the engine ended (%s); stopping ranks, then joining again", engine.node_rank, reason
        )
        stop_ranks(processes, grace_s=2.0)
        with contextlib.suppress(OSError):
            conn.close()


def reach_master(config: FdkitConfig) -> Connection:
    engine = config.engine
    address, deadline = (engine.master_addr, engine.master_port), time.time() + engine.rank_start_timeout_s
    next_log = 0.0
    while True:
        try:
            return set_no_delay(Client(address, authkey=engine.dist_secret.encode()))
        except AuthenticationError as exc:
            raise ClusterError(
                f"node 0 at {address[0]}:{address[1]} refused this node's secret (FDKIT_DIST_SECRET differs)"
            ) from exc
        except OSError as exc:
            if time.time() > deadline:
                where, timeout = f"{address[0]}:{address[1]}", engine.rank_start_timeout_s
                raise ClusterError(
                    f"cannot reach node 0 at {where} within {timeout:g} s ({exc.strerror or exc}): "
                    "is its server starting, engine.master_addr right, its port open to this host?"
                ) from exc
            if time.time() > next_log:
                logger.info("node %d: waiting for node 0 at %s:%d", engine.node_rank, *address)
                next_log = time.time() + 30
            time.sleep(0.5)


def _join(conn: Connection, config: FdkitConfig) -> dict:
    engine = config.engine
    host = socket.gethostname()
    conn.send({"node_rank": engine.node_rank, "tp": config.tp, "nnodes": engine.nnodes, "host": host})
    kind, payload = conn.recv()
    if kind == "refused":
        raise ClusterError(f"node 0 refused this node: {payload}")
    return payload


def _start_ranks(config: FdkitConfig, model_path: Path, job: dict) -> list[RankProcess]:
    engine = config.engine
    args = {
        **job,
        "config": {**job["config"], "model": {**job["config"]["model"], "path": str(model_path)}},
        "model_path": str(model_path),
        "peer_authkey": engine.dist_secret.encode().hex(),
        "ifname": engine.dist_ifname or interface_towards(engine.master_addr),
    }
    ranks = local_ranks(config, engine.node_rank)
    processes = [RankProcess(rank, args) for rank in ranks]
    logger.info("node %d: ranks %s started, pids %s", engine.node_rank, ranks, [p.pid for p in processes])
    return processes


def _watch(conn: Connection, processes: list[RankProcess]) -> str:
    """Reports while the ranks live; returns why the engine ended."""
    while True:
        dead = [p for p in processes if not p.is_alive()]
        if dead:
            reason = f"rank {dead[0].rank} exited with status {dead[0].popen.returncode}"
            with contextlib.suppress(OSError):
                conn.send(("died", reason))
            return reason
        try:
            conn.send(("alive", os.getpid()))
            if conn.poll(HEARTBEAT_S):
                kind, _ = conn.recv()
                return f"node 0 said {kind!r}"
        except (EOFError, OSError):
            return "node 0 closed the link"
