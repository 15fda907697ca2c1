"""Nothing a request carries stops the engine; a dead engine fails its requests cleanly and comes back."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import signal
import threading
import time

import pytest
from helpers import TEST_ENGINE

from fdkit import LLM, SamplingParams, load_config
from fdkit.engine.async_engine import AsyncLLM, EngineDeadError, RequestFailedError

SHORT = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
MEDIUM = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog", "你好，世界", "1234+5678="]


@pytest.fixture(scope="module")
def config(tiny_paddle):
    engine = [f"engine.{k}={v}" for k, v in TEST_ENGINE.items()]
    return load_config(["model=ernie", f"model.path={tiny_paddle}", *engine, "server.restart_backoff_s=0.1"])


def with_server(config, **changes):
    return dataclasses.replace(config, server=dataclasses.replace(config.server, **changes))


def is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie is as good as gone
    except FileNotFoundError:
        return False


def assert_client_safe(exc: BaseException) -> None:
    message = str(exc)
    assert message and "Traceback" not in message and "/" not in message and "File " not in message


async def collect(engine: AsyncLLM, seq) -> list:
    return [out async for out in engine.stream(seq)]


async def wait_until(condition, timeout: float) -> float:
    """Seconds until `condition()` held; fails after `timeout`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def test_duplicate_request_id_is_refused_and_the_engine_serves_on(config):
    engine = AsyncLLM(LLM(config=config))

    async def scenario():
        first = await engine.prepare("Hello", SHORT, "dup")
        with pytest.raises(ValueError, match="request id 'dup' is already in use"):
            await engine.prepare("Hi there", SHORT, "dup")
        other = engine.llm.make_sequence("Hi there", SHORT, "dup")  # made outside prepare
        with pytest.raises(ValueError, match="already in use"):
            await collect(engine, other)
        outputs = await collect(engine, first)
        assert outputs[-1].finished and len(outputs[-1].token_ids) == 8
        assert engine.is_healthy
        again = await collect(engine, await engine.prepare("Hello", SHORT, "dup"))  # free once ended
        assert again[-1].token_ids == outputs[-1].token_ids

    try:
        asyncio.run(scenario())
        assert engine.is_healthy and engine.num_in_flight == 0
    finally:
        engine.shutdown()


def test_ids_of_sequences_prepared_but_never_streamed_do_not_pile_up(config):
    """A completion whose second prompt is too long prepared its first one, which is then dropped."""
    engine = AsyncLLM(LLM(config=config))
    too_long = [1] * 600  # max_model_len is 512

    async def scenario():
        for i in range(1000):
            await engine.prepare("ok", SHORT, f"cmpl-{i}-0")
            with pytest.raises(ValueError):
                await engine.prepare(too_long, SHORT, f"cmpl-{i}-1")

    try:
        asyncio.run(scenario())
        gc.collect()
        assert len(engine._request_ids) < 10
        assert engine.is_healthy
    finally:
        engine.shutdown()


def test_a_failing_step_fails_only_its_requests(config):
    engine = AsyncLLM(LLM(config=config))
    core = engine.llm.engine
    forward = core.runner.forward

    def failing_forward(seqs, is_prefill):
        if any(seq.request_id == "bad" for seq in seqs):
            raise RuntimeError("boom in /secret/model_runner.py")
        return forward(seqs, is_prefill)

    core.runner.forward = failing_forward

    async def scenario():
        good_started = asyncio.Event()

        async def good():
            outputs = []
            async for out in engine.generate("Hello", dataclasses.replace(LONG, max_tokens=60), "good"):
                outputs.append(out)
                good_started.set()
            return outputs[-1]

        async def bad():
            await good_started.wait()  # its prefill is a step of its own
            with pytest.raises(RequestFailedError) as failure:
                await collect(engine, await engine.prepare("Hi", SHORT, "bad"))
            assert_client_safe(failure.value)

        final, _ = await asyncio.gather(good(), bad())
        assert final.finished and len(final.token_ids) == 60
        assert engine.is_healthy
        assert (await collect(engine, await engine.prepare("Hi", SHORT, "after")))[-1].finished

    try:
        asyncio.run(scenario())
        assert core.block_manager.num_free_blocks == TEST_ENGINE["num_kv_blocks"]  # bad's came back
    finally:
        engine.shutdown()


def test_a_request_the_engine_cannot_admit_fails_alone(config):
    engine = AsyncLLM(LLM(config=config))
    add_sequence = engine.llm.engine.add_sequence

    def failing_add(seq):
        if seq.request_id == "unadmittable":
            raise KeyError("/secret/path")
        return add_sequence(seq)

    engine.llm.engine.add_sequence = failing_add

    async def scenario():
        with pytest.raises(RequestFailedError) as failure:
            await collect(engine, await engine.prepare("Hi", SHORT, "unadmittable"))
        assert_client_safe(failure.value)
        assert (await collect(engine, await engine.prepare("Hi", SHORT, "fine")))[-1].finished

    try:
        asyncio.run(scenario())
        assert engine.is_healthy
    finally:
        engine.shutdown()


def test_fail_all_ends_every_stream_and_frees_its_blocks(config):
    engine = AsyncLLM(LLM(config=config))

    async def scenario():
        seqs = [await engine.prepare(p, LONG, f"drain-{i}") for i, p in enumerate(PROMPTS[:2])]
        tasks = [asyncio.create_task(collect(engine, seq)) for seq in seqs]
        await wait_until(lambda: engine.num_running == 2, 10)
        assert engine.num_in_flight == 2
        assert engine.fail_all("the server is shutting down") == 2
        for task in tasks:
            with pytest.raises(EngineDeadError, match="the server is shutting down"):
                await task
        assert engine.num_in_flight == 0
        await wait_until(
            lambda: engine.llm.engine.block_manager.num_free_blocks == TEST_ENGINE["num_kv_blocks"], 5
        )

    try:
        asyncio.run(scenario())
        assert engine.is_healthy
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def out_of_process(config):
    llm = LLM(config=config, in_process=False)
    yield llm
    pids = llm.engine.rank_pids
    llm.close()
    assert not any(is_alive(pid) for pid in pids)


def test_tp1_in_its_own_process_equals_in_process(config, out_of_process):
    assert len(out_of_process.engine.rank_pids) == 1 and out_of_process.engine.rank_pids[0] != os.getpid()
    with LLM(config=config) as in_process:
        expected = [o.token_ids for o in in_process.generate(PROMPTS, MEDIUM, False)]
    got = [o.token_ids for o in out_of_process.generate(PROMPTS, MEDIUM, False)]
    assert got == expected


def test_rank0_refuses_a_duplicate_add_and_serves_on(out_of_process):
    """Past the driver's own check: rank 0 answers with the failed request instead of dying."""
    seq = out_of_process.make_sequence("Hello", SHORT, "twice")
    out_of_process.add_sequence(seq)
    with pytest.raises(RequestFailedError) as failure:
        out_of_process.engine._call(("add", out_of_process.make_sequence("Hi", SHORT, "twice")))
    assert failure.value.request_ids == ["twice"]
    outputs = []
    while out_of_process.has_unfinished_requests():
        outputs += out_of_process.step()
    assert outputs[-1].request_id == "twice" and len(outputs[-1].token_ids) == 8
    out_of_process.add_request("Hello", LONG, "aborted")
    out_of_process.step()
    assert out_of_process.stats["num_running"] == 1
    assert out_of_process.abort("aborted") and out_of_process.stats["num_running"] == 0  # not stale
    assert out_of_process.stats["kv_cache_usage"] == 0.0


def test_a_killed_engine_process_is_restarted(config):
    engine = AsyncLLM(LLM(config=config, in_process=False))
    first_pid = engine.llm.engine.rank_pids[0]

    async def scenario():
        seq = await engine.prepare("Hello", LONG, "victim")
        with pytest.raises(EngineDeadError) as failure:
            async for out in engine.stream(seq):
                if len(out.token_ids) == 3:
                    os.kill(first_pid, signal.SIGKILL)
                    killed_at = time.monotonic()
        assert_client_safe(failure.value)
        unhealthy_after = time.monotonic() - killed_at
        assert not engine.is_healthy and unhealthy_after < 1.0
        with pytest.raises(EngineDeadError):
            await engine.prepare("Hi", SHORT, "while-restarting")
        restart_s = unhealthy_after + await wait_until(lambda: engine.is_healthy, 30)
        print(f"\nunhealthy {unhealthy_after * 1000:.0f} ms after the kill; serving after {restart_s:.2f} s")
        assert engine.num_restarts == 1
        assert (await collect(engine, await engine.prepare("Hi", SHORT, "after")))[-1].finished

    try:
        asyncio.run(scenario())
        second_pid = engine.llm.engine.rank_pids[0]
        assert second_pid != first_pid and not is_alive(first_pid)
    finally:
        engine.shutdown()
    assert not is_alive(second_pid)


@pytest.mark.parametrize("policy", [dict(on_engine_death="exit"), dict(max_engine_restarts=0)])
def test_an_engine_that_will_not_restart_calls_on_fatal(config, policy):
    reasons: list[str] = []
    called = threading.Event()

    def on_fatal(reason: str) -> None:
        reasons.append(reason)
        called.set()

    engine = AsyncLLM(LLM(config=with_server(config, **policy), in_process=False), on_fatal=on_fatal)
    pid = engine.llm.engine.rank_pids[0]
    try:
        os.kill(pid, signal.SIGKILL)  # while idle: the liveness poll must notice
        unhealthy_after = asyncio.run(wait_until(lambda: not engine.is_healthy, 1.0))
        print(f"\nidle engine unhealthy {unhealthy_after * 1000:.0f} ms after the kill")
        assert called.wait(5) and len(reasons) == 1
        assert not engine.is_healthy and engine.num_restarts == 0 and not is_alive(pid)
        with pytest.raises(EngineDeadError):
            asyncio.run(engine.prepare("Hi", SHORT, "late"))
    finally:
        engine.shutdown()
