"""dp=2: two engine replicas behind one API process, least-loaded routing, /metrics per replica, and a
dead replica that takes no new requests while the other serves."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import httpx
import pytest
from server_utils import launch

from fdkit.config import load_config
from fdkit.engine.llm_engine import EngineDeadError
from fdkit.engine.replicas import ReplicaSet, replica_config

# -- the router, over stand-in replicas (the piece below it, AsyncLLM, is tested on its own) -----------


class Replica:
    def __init__(self):
        self.llm, self.is_healthy, self.num_in_flight = object(), True, 0


def replica_set(dp: int) -> tuple[ReplicaSet, list, list]:
    made, fatal = [], []

    def make(config, on_fatal):
        made.append((Replica(), on_fatal))
        return made[-1][0]

    replicas = ReplicaSet(load_config([f"dp={dp}"]), make, on_fatal=fatal.append)
    return replicas, made, fatal


def test_routes_to_the_least_loaded_serving_replica():
    replicas, made, _ = replica_set(3)
    a, b, c = (replica for replica, _ in made)
    a.num_in_flight, b.num_in_flight, c.num_in_flight = 2, 1, 1
    assert replicas.pick() is b  # b and c tie: b was given fewer (none) first, then c
    assert replicas.pick() is c
    c.is_healthy = False
    b.num_in_flight = 5
    assert replicas.pick() is a
    a.is_healthy = b.is_healthy = False
    with pytest.raises(EngineDeadError, match="no engine replica is serving"):
        replicas.pick()
    assert replicas.num_routed == [1, 1, 1]


def test_idle_replicas_take_turns():
    replicas, made, _ = replica_set(2)
    order = [replicas.pick() for _ in range(4)]
    assert order == [made[0][0], made[1][0], made[0][0], made[1][0]]


def test_the_server_gives_up_only_when_every_replica_has():
    replicas, made, fatal = replica_set(2)
    made[0][1]("replica 0 died")
    assert fatal == []
    made[1][1]("replica 1 died")
    assert len(fatal) == 1 and "every engine replica died" in fatal[0]


def test_replicas_share_the_cores():
    config = load_config(["dp=2", "tp=1"])
    assert replica_config(config).engine.threads == max(1, len(os.sched_getaffinity(0)) // 2)
    assert replica_config(load_config(["dp=2", "engine.threads=3"])).engine.threads == 3


# -- a real server ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dp2(tiny_paddle, tmp_path_factory):
    log = tmp_path_factory.mktemp("dp2") / "server.log"
    srv = launch(tiny_paddle, log, "dp=2", "server.restart_backoff_s=600")
    yield srv
    srv.stop()


def replica_pids(server) -> list[int]:
    return [
        int(pid) for pid in re.findall(r"engine ready: 1 ranks, pids \[(\d+)\]", server.log_path.read_text())
    ]


def metric(server, name: str, replica: int) -> float:
    text = httpx.get(server.base_url + "/metrics").text
    found = re.search(rf'^fdkit:{name}{{replica="{replica}"}} (\S+)$', text, re.M)
    assert found, f"no fdkit:{name} of replica {replica} in /metrics"
    return float(found.group(1))


async def complete_all(server, prompt: str, count: int) -> list[dict]:
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
        responses = await asyncio.gather(*[client.post("/v1/completions", json=body) for _ in range(count)])
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [r.json() for r in responses]


def test_two_replicas_share_the_requests_and_agree(dp2):
    pids = replica_pids(dp2)
    assert len(pids) == 2 and pids[0] != pids[1]
    results = asyncio.run(complete_all(dp2, "The quick brown fox", 8))
    assert len({r["choices"][0]["text"] for r in results}) == 1  # greedy: the same on either replica
    routed = [metric(dp2, "replica_requests_routed_total", k) for k in (0, 1)]
    assert routed[0] >= 3 and routed[1] >= 3 and sum(routed) >= 8
    assert all(metric(dp2, "replica_generation_tokens_total", k) > 0 for k in (0, 1))
    assert metric(dp2, "replica_healthy", 0) == metric(dp2, "replica_healthy", 1) == 1


def test_a_dead_replica_takes_no_new_requests(dp2):
    os.kill(replica_pids(dp2)[1], signal.SIGKILL)
    deadline = time.time() + 10
    while metric(dp2, "replica_healthy", 1) != 0 and time.time() < deadline:
        time.sleep(0.1)
    assert metric(dp2, "replica_healthy", 1) == 0
    assert httpx.get(dp2.base_url + "/health").status_code == 200
    before = [metric(dp2, "replica_requests_routed_total", k) for k in (0, 1)]
    asyncio.run(complete_all(dp2, "Hello", 6))
    after = [metric(dp2, "replica_requests_routed_total", k) for k in (0, 1)]
    assert after[0] - before[0] == 6 and after[1] == before[1]
