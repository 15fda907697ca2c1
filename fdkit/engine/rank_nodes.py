"""Ranks on several hosts (`engine.nnodes` > 1), as paddle.distributed.launch's --nnodes / --master.

The tp ranks split evenly over the nodes. Node 0 runs the server, the engine's driver and ranks
0..L-1 (L = tp / nnodes). Node k runs `fdkit rank ... engine.node_rank=k`: an agent that joins node 0
at `engine.master_addr:engine.master_port` (authenticated with `engine.dist_secret`, which never goes
over the wire), is told the engine's config and endpoints, and starts ranks kL..(k+1)L-1. They load
only their shards, connect to rank 0 and join paddle's process group (gloo on CPU, NCCL on GPU).

The agent reports once a second; node 0 treats a node that stops reporting, or whose rank died, as a
dead rank: the engine fails as on one host and, when it restarts, waits for the node to join again
(the agent rejoins by itself).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import socket
import struct
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener, answer_challenge, deliver_challenge

from fdkit.config import FdkitConfig
from fdkit.engine.llm_engine import EngineDeadError

logger = logging.getLogger(__name__)
HEARTBEAT_S = 1.0  # how often an agent reports
SILENCE_S = 10.0  # a node that has not reported for this long is dead
HANDSHAKE_S = 5.0  # a peer that has not proven the secret by then is dropped
SIOCGIFADDR = 0x8915


class ClusterError(EngineDeadError):
    """The nodes cannot form the engine: a config that cannot work, a node missing or unreachable."""


def check_nodes(config: FdkitConfig) -> None:
    engine = config.engine
    if not 0 <= engine.node_rank < engine.nnodes:
        raise ClusterError(
            f"engine.node_rank={engine.node_rank} must be in [0, engine.nnodes={engine.nnodes})"
        )
    if engine.nnodes == 1:
        return
    if config.tp < engine.nnodes:
        raise ClusterError(f"tp={config.tp} cannot give each of engine.nnodes={engine.nnodes} nodes a rank")
    if config.tp % engine.nnodes:
        raise ClusterError(f"tp={config.tp} must split evenly over engine.nnodes={engine.nnodes}")
    if not engine.master_addr:
        raise ClusterError(
            "engine.nnodes > 1 needs engine.master_addr: node 0's address, as the nodes reach it"
        )
    if not engine.dist_secret:
        raise ClusterError("engine.nnodes > 1 needs a shared secret on every node: FDKIT_DIST_SECRET=...")
    if config.dp > 1:
        raise ClusterError("dp > 1 with engine.nnodes > 1 is not supported: run one server per replica")


def local_ranks(config: FdkitConfig, node_rank: int) -> list[int]:
    per_node = config.tp // config.engine.nnodes
    return list(range(node_rank * per_node, (node_rank + 1) * per_node))


def accept_authenticated(listener: Listener, authkey: bytes) -> Connection:
    """The next peer of `listener` (made without an authkey) that proves `authkey` within HANDSHAKE_S.
    Raises AuthenticationError or OSError (a peer silent or gone); nothing it sent is unpickled."""
    conn = set_no_delay(listener.accept())
    try:
        _set_read_timeout(conn, HANDSHAKE_S)
        deliver_challenge(conn, authkey)
        answer_challenge(conn, authkey)
        _set_read_timeout(conn, 0)
    except BaseException:
        conn.close()
        raise
    return conn


def close_listener(listener: Listener) -> None:
    """Closes `listener` and wakes a thread blocked in its accept (closing alone would not, on Linux)."""
    with contextlib.suppress(OSError):
        socket.create_connection(listener.address, timeout=1).close()
    listener.close()


def set_no_delay(conn: Connection) -> Connection:
    """TCP_NODELAY on the connection's socket. multiprocessing sends a message over 16 KiB as two writes
    (length, then payload): with Nagle's algorithm the payload waits for the ACK of the length, which
    the peer delays ~40 ms. A step's outputs pass 16 KiB at 32 streams of a few hundred characters."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _set_read_timeout(conn: Connection, timeout_s: float) -> None:
    """SO_RCVTIMEO on the connection's socket (0: none); a read that times out raises BlockingIOError."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        seconds, micros = int(timeout_s), int(timeout_s % 1 * 1e6)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, micros))


def interface_towards(host: str) -> str | None:
    """The network interface this host reaches `host` from (its own address: the interface holding it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, 9))  # UDP: no packet is sent, the kernel only picks the route
        except OSError as exc:
            raise ClusterError(f"this host has no route to engine.master_addr={host}: {exc}") from exc
        local_ip = probe.getsockname()[0]
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):  # an interface without an IPv4 address
                request = struct.pack("256s", name[:15].encode())
                if socket.inet_ntoa(fcntl.ioctl(probe.fileno(), SIOCGIFADDR, request)[20:24]) == local_ip:
                    return name
    return None


# -- node 0 ------------------------------------------------------------------------------------------


class NodeLink:
    """Another node's agent as node 0 sees it: alive while it reports; `kill` stops that node's ranks."""

    def __init__(self, node_rank: int, host: str, conn: Connection):
        self.node_rank, self.host, self.conn = node_rank, host, conn
        self.error: str | None = None
        self._last_seen = time.time()

    @property
    def name(self) -> str:
        return f"node {self.node_rank} ({self.host}: {self.error or 'alive'})"

    def is_alive(self) -> bool:
        if self.error is None:
            self._read_reports()
        return self.error is None

    def _read_reports(self) -> None:
        try:
            while self.conn.poll():
                kind, detail = self.conn.recv()
                if kind != "alive":
                    self.error = detail
                    return
                self._last_seen = time.time()
        except (EOFError, OSError):
            self.error = "lost the connection to its agent"
        if self.error is None and time.time() - self._last_seen > SILENCE_S:
            self.error = f"no report for {SILENCE_S:g} s"

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("stop", None))
        self.conn.close()


def join_nodes(config: FdkitConfig, job: dict, is_starting) -> list[NodeLink]:
    """Waits for the other nodes' agents and gives each the job; ClusterError naming the missing ones
    when `engine.rank_start_timeout_s` runs out (or `is_starting()` turns False: a local rank died)."""
    engine = config.engine
    try:
        listener = Listener(
            (engine.master_addr, engine.master_port)
        )  # authenticated per peer, with a timeout
    except OSError as exc:
        where = f"{engine.master_addr}:{engine.master_port}"
        raise ClusterError(
            f"node 0 cannot listen on {where} (engine.master_addr/master_port): {exc}"
        ) from exc
    arrivals: queue.Queue = queue.Queue()
    stop = threading.Event()
    authkey = engine.dist_secret.encode()
    threading.Thread(target=_accept_all, args=(listener, authkey, arrivals, stop), daemon=True).start()
    links: dict[int, NodeLink] = {}
    deadline = time.time() + engine.rank_start_timeout_s
    try:
        while len(links) < engine.nnodes - 1 and is_starting() and time.time() < deadline:
            with contextlib.suppress(queue.Empty):
                link = _admit(config, *arrivals.get(timeout=0.2), links)
                if link is not None:
                    link.conn.send(("job", job))
                    links[link.node_rank] = link
    finally:
        stop.set()
        close_listener(listener)
    missing = sorted(set(range(1, engine.nnodes)) - set(links))
    if missing:
        for link in links.values():
            link.kill()
        raise ClusterError(_missing_message(config, missing))
    return [links[k] for k in sorted(links)]


def _accept_all(listener: Listener, authkey: bytes, arrivals: queue.Queue, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            conn = accept_authenticated(listener, authkey)
        except AuthenticationError:
            if not stop.is_set():
                logger.warning("a node was refused: its engine.dist_secret differs from node 0's")
            continue
        except (EOFError, OSError):  # a client gone or silent during the handshake (or the wake-up call)
            continue
        with contextlib.suppress(EOFError, OSError):
            if conn.poll(HANDSHAKE_S):
                arrivals.put((conn, conn.recv()))
                continue
        conn.close()  # an agent that never said hello


def _admit(config: FdkitConfig, conn: Connection, hello: dict, links: dict) -> NodeLink | None:
    node_rank = hello.get("node_rank")
    expected = {"tp": config.tp, "nnodes": config.engine.nnodes}
    got = {key: hello.get(key) for key in expected}
    reason = None
    if got != expected:
        reason = (
            f"node {node_rank} has {got}, node 0 has {expected}: start every node with the same tp and nnodes"
        )
    elif not isinstance(node_rank, int) or not 0 < node_rank < config.engine.nnodes or node_rank in links:
        reason = f"engine.node_rank={node_rank} is out of range or already taken"
    if reason is not None:
        logger.error("refused a node: %s", reason)
        with contextlib.suppress(OSError):
            conn.send(("refused", reason))
        return None
    logger.info("node %d joined from %s", node_rank, hello.get("host"))
    return NodeLink(node_rank, str(hello.get("host")), conn)


def _missing_message(config: FdkitConfig, missing: list[int]) -> str:
    engine = config.engine
    return (
        f"node(s) {missing} did not join node 0 at {engine.master_addr}:{engine.master_port} within "
        f"{engine.rank_start_timeout_s:g} s: start `fdkit rank tp={config.tp} engine.nnodes={engine.nnodes} "
        f"engine.node_rank=K engine.master_addr={engine.master_addr} ...` on each, with the same "
        f"FDKIT_DIST_SECRET, and check that node 0's port {engine.master_port} is open to them"
    )
