"""Between the driver and rank 0: small per-step messages, no secrets on a command line, and a model
that cannot load reported as one clean line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import TEST_ENGINE
from server_utils import ROOT

from fdkit import LLM, SamplingParams
from fdkit.engine.llm_engine import RequestOutput
from fdkit.engine.rank_messages import DeltaDecoder, DeltaEncoder
from fdkit.engine.sequence import Sequence


def outputs_of_one_request(num_steps: int) -> list[RequestOutput]:
    """What the engine returns step by step for one request with logprobs, the last one finished."""
    outputs = []
    for n in range(1, num_steps + 1):
        is_last = n == num_steps
        logprobs = [(-0.5 * i, [(i, -0.5 * i)]) for i in range(n)]
        out = RequestOutput(
            "r", "hi", [1, 2], "x" * n, list(range(n)), "length" if is_last else None, is_last
        )
        out.logprobs = logprobs
        outputs.append(out)
    return outputs


def test_deltas_carry_only_what_is_new_and_rebuild_every_output():
    encoder, decoder = DeltaEncoder(), DeltaDecoder()
    seq = Sequence([1, 2], SamplingParams())
    seq.prompt = "hi"
    outputs = outputs_of_one_request(50)
    outputs[-1].text = outputs[-2].text[:-5] + "stop"  # the engine cut its text at a stop string
    for out in outputs:
        delta = encoder.encode(out)
        assert len(delta.new_token_ids) == 1 and len(delta.new_logprobs) == 1
        assert len(delta.new_text) == (4 if out.finished else 1)
        assert decoder.decode(delta, seq) == out
    assert not encoder._num_sent and not encoder._texts  # nothing kept after the finish
    assert not decoder._token_ids and not decoder._texts


def test_api_keys_are_not_on_a_rank_command_line(tiny_paddle):
    overrides = ["model=ernie", f"model.path={tiny_paddle}", "server.api_keys=[sekrit-key-123]"]
    engine_keys = [f"engine.{k}={v}" for k, v in TEST_ENGINE.items()]
    with LLM.from_config(overrides + engine_keys) as llm, LLM(config=llm.config, in_process=False) as ranked:
        pid = ranked.engine.rank_pids[0]
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"fdkit.engine.rank_worker" in command_line and b"sekrit" not in command_line
        assert b"authkey" not in command_line
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        assert (
            ranked.generate("hi", params, use_tqdm=False)[0].token_ids
            == llm.generate("hi", params, use_tqdm=False)[0].token_ids
        )


def test_a_checkpoint_that_cannot_load_is_one_line(tiny_paddle, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(tiny_paddle, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    command = [sys.executable, "launch.py", "model=ernie", f"model.path={folder}", "server.port=0"]
    command += ["engine.num_kv_blocks=64", "engine.block_size=16", "engine.max_model_len=512"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "cannot start:" in out.stderr + out.stdout and "shape" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr + out.stdout


def _has_no_delay(conn) -> bool:
    import os
    import socket

    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def test_rank_connections_send_without_nagle_delays(tiny_paddle):
    """multiprocessing writes a message over 16 KiB as length, then payload: with Nagle's algorithm the
    payload waits ~40 ms for the delayed ACK of the length. A step's outputs grow past 16 KiB at 32
    streams of a few hundred characters; every connection between processes sets TCP_NODELAY."""
    import threading
    from multiprocessing.connection import Listener

    from fdkit.engine.rank_nodes import accept_authenticated
    from fdkit.engine.rank_worker import _connect

    key = b"k" * 16
    with Listener(("127.0.0.1", 0)) as listener:
        clients = []
        thread = threading.Thread(target=lambda: clients.append(_connect(listener.address, key)))
        thread.start()
        server = accept_authenticated(listener, key)
        thread.join()
    assert _has_no_delay(server) and _has_no_delay(clients[0])
    engine_keys = {k: v for k, v in TEST_ENGINE.items() if k != "show_progress"}
    with LLM(tiny_paddle, in_process=False, **engine_keys) as ranked:
        assert _has_no_delay(ranked.engine._conn)


def test_the_next_step_runs_while_outputs_go_out(tiny_paddle):
    """Rank 0 is sent the next step before a step's outputs are returned; requests added and aborted
    while it runs, and a request id used again right after its abort, come out as they do in process."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine_keys = {k: v for k, v in TEST_ENGINE.items() if k != "show_progress"}
    runs = {}
    with (
        LLM(tiny_paddle, **engine_keys) as local,
        LLM(tiny_paddle, in_process=False, **engine_keys) as ranked,
    ):
        for name, llm in (("local", local), ("ranked", ranked)):
            finished = {}
            llm.add_request("the first", params, request_id="a")
            llm.add_request("the second", params, request_id="b")
            for num_steps in range(100):
                for out in llm.step():
                    if out.finished:
                        finished[out.request_id] = out.token_ids
                if num_steps == 2:
                    assert llm.abort("b")
                    llm.add_request("the third", params, request_id="c")
                if num_steps == 4:  # the same id again, at once: nothing of the old request reaches it
                    assert llm.abort("a")
                    llm.add_request("a fourth", params, request_id="a")
                if not llm.has_unfinished_requests():
                    break
            runs[name] = finished
        assert ranked.engine._is_step_in_flight is False  # nothing left running
    assert set(runs["ranked"]) == {"a", "c"} and runs["ranked"] == runs["local"]
    assert all(len(ids) == 12 for ids in runs["ranked"].values())
