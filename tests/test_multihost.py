"""tp=2 over two hosts on one machine: two network namespaces joined by a veth pair, node 0 (the server,
rank 0) in one, node 1 (`fdkit rank`, rank 1) in the other; the test reaches the API over a second veth
pair. Needs root (as CI runs) and iproute2 (`make netns`); skipped, saying why, where namespaces cannot
be made. The failure cases that need no second host run on the loopback."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import TEST_ENGINE
from server_utils import ROOT, Server, free_port

from fdkit import LLM, SamplingParams
from fdkit.config import load_config
from fdkit.engine.rank_nodes import ClusterError, check_nodes

pytestmark = pytest.mark.slow

SECRET = "test-secret-of-the-nodes"
SUFFIX = os.getpid() % 10000
NAMESPACES = (f"fdk{SUFFIX}a", f"fdk{SUFFIX}b")
SUBNET = f"10.{200 + SUFFIX % 50}.{SUFFIX % 250}"  # node 0 is .1, node 1 is .2
CLIENT_SUBNET = f"10.{250 + SUFFIX % 5}.{SUFFIX % 250}"  # this process is .1, node 0 is .2
PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog", "你好，世界", "1234+5678="]


def engine_overrides(checkpoint: Path, master: str, timeout_s: float = 60) -> list[str]:
    return [
        "model=ernie",
        f"model.path={checkpoint}",
        "model.name=ernie-tiny",
        "playground.enabled=false",
        "tp=2",
        "engine.nnodes=2",
        f"engine.master_addr={master}",
        f"engine.master_port={free_port()}",
        f"engine.rank_start_timeout_s={timeout_s}",
        *[f"engine.{k}={v}" for k, v in TEST_ENGINE.items()],
    ]


def sh(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


def make_hosts() -> None:
    a, b = NAMESPACES
    for ns in NAMESPACES:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", f"{a}0", "type", "veth", "peer", "name", f"{b}0")
    sh("ip", "link", "add", f"{a}c", "type", "veth", "peer", "name", f"{a}1")
    for link, ns, address in (
        (f"{a}0", a, f"{SUBNET}.1"),
        (f"{b}0", b, f"{SUBNET}.2"),
        (f"{a}1", a, f"{CLIENT_SUBNET}.2"),
    ):
        sh("ip", "link", "set", link, "netns", ns)
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", link)
        sh("ip", "-n", ns, "link", "set", link, "up")
    sh("ip", "addr", "add", f"{CLIENT_SUBNET}.1/24", "dev", f"{a}c")
    sh("ip", "link", "set", f"{a}c", "up")


def remove_hosts() -> None:
    for ns in NAMESPACES:  # their veths go with them
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture(scope="module")
def hosts():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs the suite as root)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is missing: `make netns` installs it")
    try:
        make_hosts()
    except subprocess.CalledProcessError as exc:
        remove_hosts()
        pytest.skip(f"cannot make network namespaces here: {' '.join(exc.cmd)}: {exc.stderr.strip()}")
    yield NAMESPACES
    remove_hosts()


def in_namespace(ns: str, command: list[str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")  # noqa: SIM115 - the child holds it
    env = {**os.environ, "FDKIT_DIST_SECRET": SECRET}
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, *command], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env
    )


def start_cluster(hosts, checkpoint: Path, tmp: Path) -> tuple[Server, subprocess.Popen]:
    overrides = engine_overrides(checkpoint, f"{SUBNET}.1")
    node1 = in_namespace(
        hosts[1],
        [sys.executable, "-m", "fdkit.cli", "rank", *overrides, "engine.node_rank=1"],
        tmp / "node1.log",
    )
    port = free_port()
    command = ["ip", "netns", "exec", hosts[0], sys.executable, "launch.py", *overrides]
    command += [f"server.port={port}", "server.host=0.0.0.0", "engine.show_progress=false"]
    server = Server(command, port, tmp / "node0.log", env={"FDKIT_DIST_SECRET": SECRET})
    server.base_url = f"http://{CLIENT_SUBNET}.2:{port}"
    try:
        return server.wait_healthy(), node1
    except BaseException:
        node1.kill()
        raise


def stop_cluster(server: Server, node1: subprocess.Popen) -> None:
    server.stop()
    node1.send_signal(signal.SIGTERM)
    node1.wait(10)


@pytest.fixture(scope="module")
def cluster(hosts, tiny_paddle, tmp_path_factory):
    server, node1 = start_cluster(hosts, tiny_paddle, tmp_path_factory.mktemp("multihost"))
    yield server, node1
    stop_cluster(server, node1)


def rank_pids(server: Server) -> list[int]:
    found = re.findall(
        r"engine ready: 2 ranks over 2 nodes, pids \[(\d+), (\d+)\]", server.log_path.read_text()
    )
    return [int(pid) for pid in found[-1]]


def test_greedy_tokens_across_hosts_equal_tp1(cluster, tiny_paddle):
    server, _ = cluster
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with LLM(tiny_paddle, **TEST_ENGINE) as tp1:
        prompts = [tp1.tokenizer.encode(p) for p in PROMPTS]
        expected = [out.token_ids for out in tp1.generate(prompts, params, use_tqdm=False)]
    body = {"max_tokens": 16, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    got = []
    for token_ids in prompts:
        response = httpx.post(
            server.base_url + "/v1/completions", json={**body, "prompt_token_ids": token_ids}, timeout=60
        )
        assert response.status_code == 200, response.text
        got.append(response.json()["choices"][0]["completion_token_ids"])
    assert got == expected
    log = server.log_path.read_text()
    assert "node 1 joined" in log and f"{SUBNET}.1" in log


def test_the_secret_is_on_no_command_line_and_not_in_the_log(cluster):
    server, node1 = cluster
    for pid in [*rank_pids(server), server.process.pid, node1.pid]:
        assert SECRET.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert "dist_secret: '***'" in server.log_path.read_text() and SECRET not in server.log_path.read_text()


def test_a_rank_killed_on_the_other_host_fails_cleanly_then_rejoins(cluster):
    server, _ = cluster
    remote_rank = rank_pids(server)[1]
    body = {"prompt": "hi", "max_tokens": 400, "stream": True, "ignore_eos": True}
    start, lines = time.time(), []
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line:
                lines.append(line)
            if len(lines) == 3:
                os.kill(remote_rank, signal.SIGKILL)
    assert lines[-1] == "data: [DONE]" and any('"engine_unavailable"' in line for line in lines)
    assert time.time() - start < 30
    assert httpx.get(server.base_url + "/health").status_code == 503
    deadline = time.time() + 90  # the engine restarts; node 1's agent joins it again
    while httpx.get(server.base_url + "/health").status_code != 200 and time.time() < deadline:
        time.sleep(0.5)
    response = httpx.post(
        server.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=60
    )
    assert response.status_code == 200 and rank_pids(server)[1] != remote_rank


# -- failures that need no second host -------------------------------------------------------------


def run_to_exit(command: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )


def test_a_missing_node_and_a_wrong_secret_are_one_line_each(tiny_paddle):
    overrides = engine_overrides(tiny_paddle, "127.0.0.1", timeout_s=15)
    command = [sys.executable, "launch.py", *overrides, f"server.port={free_port()}", "server.host=127.0.0.1"]
    env = {**os.environ, "FDKIT_DIST_SECRET": SECRET}
    node0 = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        time.sleep(3)
        node1 = [sys.executable, "-m", "fdkit.cli", "rank", *overrides, "engine.node_rank=1"]
        wrong = run_to_exit(node1, {"FDKIT_DIST_SECRET": "another"})
        output, _ = node0.communicate(timeout=120)
    finally:
        node0.kill()
    assert wrong.returncode == 1 and "refused this node's secret" in wrong.stdout + wrong.stderr
    assert node0.returncode == 1
    assert (
        "cannot start: node(s) [1] did not join node 0 at 127.0.0.1" in output and "Traceback" not in output
    )


def test_an_unreachable_node_0_is_one_line(tiny_paddle):
    overrides = engine_overrides(tiny_paddle, "127.0.0.1", timeout_s=2)
    result = run_to_exit(
        [sys.executable, "-m", "fdkit.cli", "rank", *overrides, "engine.node_rank=1"],
        {"FDKIT_DIST_SECRET": SECRET},
    )
    assert result.returncode == 1
    assert (
        "node 1 stops: cannot reach node 0 at 127.0.0.1" in result.stderr and "Traceback" not in result.stderr
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["tp=3", "engine.nnodes=2"], "must split evenly"),
        (["tp=1", "engine.nnodes=2"], "cannot give each of engine.nnodes=2 nodes a rank"),
        (["tp=2", "engine.nnodes=2"], "needs engine.master_addr"),
        (
            ["tp=2", "engine.nnodes=2", "engine.master_addr=10.0.0.1", "engine.dist_secret=null"],
            "shared secret",
        ),
        (["tp=2", "engine.nnodes=2", "engine.node_rank=2"], "must be in [0, engine.nnodes=2)"),
        (["dp=2", "tp=2", "engine.nnodes=2", "engine.master_addr=h", "engine.dist_secret=s"], "dp > 1"),
    ],
)
def test_configs_that_cannot_form_nodes_are_refused(overrides, message):
    with pytest.raises(ClusterError, match=re.escape(message)):
        check_nodes(load_config(overrides))


def test_a_node_is_dead_when_it_says_so_goes_silent_or_hangs_up(monkeypatch):
    from multiprocessing import Pipe

    from fdkit.engine import rank_nodes

    monkeypatch.setattr(rank_nodes, "SILENCE_S", 0.3)
    links = []
    for _ in range(3):
        node0_end, agent_end = Pipe()
        links.append((rank_nodes.NodeLink(1, "host-b", node0_end), agent_end))
    (said, said_agent), (silent, silent_agent), (gone, gone_agent) = links
    said_agent.send(("alive", 1))
    assert said.is_alive()
    said_agent.send(("died", "rank 1 exited with status -9"))
    gone_agent.close()
    time.sleep(0.4)
    assert not said.is_alive() and "rank 1 exited with status -9" in said.name
    assert not silent.is_alive() and "no report" in silent.name
    assert not gone.is_alive() and "lost the connection" in gone.name


def _agent(address: tuple, authkey: bytes, hello: dict, replies: list) -> None:
    """A node's agent as rank_agent joins: retries until node 0 listens, says hello, keeps the job."""
    from multiprocessing.connection import Client

    deadline = time.time() + 10
    while True:
        try:
            conn = Client(address, authkey=authkey)
            break
        except ConnectionRefusedError:
            assert time.time() < deadline
            time.sleep(0.05)
    conn.send(hello)
    replies.append(conn.recv())
    conn.close()


def _silent_client(address: tuple, sockets: list) -> None:
    """Connects and never answers the challenge (a port scanner, or a peer with no secret)."""
    import socket

    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            sockets.append(socket.create_connection(address))
            return
        except ConnectionRefusedError:
            time.sleep(0.05)


def test_a_silent_or_wrong_client_cannot_hold_node_0s_door(monkeypatch):
    """A client that never answers the challenge holds node 0's accept thread for HANDSHAKE_S only; a
    wrong secret is refused; the real agent still joins within the start timeout."""
    import threading

    from fdkit.engine import rank_nodes

    monkeypatch.setattr(rank_nodes, "HANDSHAKE_S", 0.5)
    port = free_port()
    config = load_config(
        ["tp=2", "engine.nnodes=2", "engine.master_addr=127.0.0.1", f"engine.master_port={port}"]
        + ["engine.dist_secret=s3cret", "engine.rank_start_timeout_s=5"]
    )
    address, sockets, replies, wrong = ("127.0.0.1", port), [], [], []
    hello = {"node_rank": 1, "tp": 2, "nnodes": 2, "host": "host-b"}

    def clients():
        _silent_client(address, sockets)
        time.sleep(0.1)  # the silent one is in the handshake first
        wrong.append(_refused(address))  # waits behind the silent one, then is refused by the door itself
        _agent(address, b"s3cret", hello, replies)

    thread = threading.Thread(target=clients, daemon=True)
    thread.start()
    try:
        links = rank_nodes.join_nodes(config, {"job": 1}, lambda: True)
        thread.join(5)
        assert [link.node_rank for link in links] == [1] and replies == [("job", {"job": 1})]
        assert wrong == ["refused"]
    finally:
        for s in sockets:
            s.close()


def _refused(address: tuple) -> str:
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Client

    try:
        Client(address, authkey=b"wrong").close()
    except (AuthenticationError, EOFError, OSError):
        return "refused"
    return "admitted"


def test_rank_0_drops_peers_that_fail_the_handshake(monkeypatch):
    """On several hosts rank 0's peer port is open to the network: a silent client and a wrong key are
    dropped (before the fix the wrong key raised AuthenticationError and killed rank 0)."""
    import threading

    from fdkit.engine import rank_nodes
    from fdkit.engine.rank_worker import _accept_peers

    monkeypatch.setattr(rank_nodes, "HANDSHAKE_S", 0.5)
    address, sockets, results = ("127.0.0.1", free_port()), [], []

    def clients():
        _silent_client(address, sockets)
        time.sleep(0.1)
        results.append(_refused(address))
        from multiprocessing.connection import Client

        peer = Client(address, authkey=b"key")
        peer.send(1)
        results.append(peer)

    peers: list = []
    rank0 = threading.Thread(
        target=lambda: peers.extend(_accept_peers({"rank0_listen": list(address), "world_size": 2}, b"key")),
        daemon=True,
    )
    rank0.start()
    thread = threading.Thread(target=clients, daemon=True)
    thread.start()
    try:
        rank0.join(10)  # a hang here (an accept stuck on the silent client) fails, not stalls, the test
        assert len(peers) == 1 and results[0] == "refused"
    finally:
        for s in [*sockets, *peers, *results[1:]]:
            s.close()


def test_the_logged_config_masks_the_secret_and_the_api_keys():
    from fdkit.launch import _loggable

    config = load_config(["engine.dist_secret=s3cret-of-nodes", "server.api_keys=[key-1]"])
    shown = _loggable(config)
    assert "s3cret-of-nodes" not in shown and "key-1" not in shown and "dist_secret: '***'" in shown


def test_closing_a_listener_ends_the_thread_blocked_in_its_accept():
    """start_ranks' accept of rank 0, when rank 0 never comes: the thread must end, not leak."""
    import threading
    from multiprocessing.connection import Listener

    from fdkit.engine.rank_engine import _accept_rank0
    from fdkit.engine.rank_nodes import close_listener

    listener, accepted = Listener(("127.0.0.1", 0), authkey=b"key"), []
    thread = threading.Thread(target=_accept_rank0, args=(listener, accepted), daemon=True)
    thread.start()
    time.sleep(0.2)  # let it block in accept (if it has not yet, the close wakes it all the same)
    close_listener(listener)
    thread.join(5)
    assert not thread.is_alive() and accepted == []


def test_fastdeploys_ips_give_each_host_its_node(hosts):
    """`--ips A,B`, the same on every host: each namespace finds itself by its own address."""
    code = (
        "from fdkit.entrypoints.openai.api_server import node_flags as f; import sys; print(f(sys.argv[1]))"
    )
    ips = f"{SUBNET}.1,{SUBNET}.2"
    for node_rank, ns in enumerate(hosts):
        command = ["ip", "netns", "exec", ns, sys.executable, "-c", code, ips]
        found = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        want = {"engine.nnodes": 2, "engine.master_addr": f"{SUBNET}.1", "engine.node_rank": node_rank}
        assert found.strip() == str(want)
