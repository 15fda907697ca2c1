"""Block bookkeeping and scheduling, without paddle."""

from __future__ import annotations

import subprocess
import sys

from fdkit.engine.kv_cache import BlockManager
from fdkit.engine.scheduler import Scheduler, SchedulerConfig
from fdkit.engine.sequence import SamplingParams, Sequence, SequenceStatus


def make_seq(num_tokens: int) -> Sequence:
    return Sequence(list(range(1, num_tokens + 1)), SamplingParams(max_tokens=100))


def test_no_paddle_import():
    code = "import sys, fdkit.engine.scheduler, fdkit.engine.kv_cache; print('paddle' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )


def test_allocate_append_deallocate():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq(5)
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 2
    for token in range(3):  # 8 tokens still fit in 2 blocks
        seq.append_token(token)
        assert bm.can_append(seq)
        bm.append(seq)
    assert len(seq.block_table) == 2
    seq.append_token(9)
    bm.append(seq)
    assert len(seq.block_table) == 3 and bm.usage == 0.75
    bm.deallocate(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 4
    assert bm.ref_counts == [0, 0, 0, 0]


def test_cannot_allocate_beyond_free_blocks():
    bm = BlockManager(num_blocks=2, block_size=4)
    assert not bm.can_allocate(make_seq(9))
    assert bm.can_allocate(make_seq(8))


def scheduler(num_blocks=8, block_size=4, max_num_seqs=4, max_tokens=64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, max_tokens, 64), BlockManager(num_blocks, block_size))


def test_prefill_first_then_decode():
    s = scheduler()
    a, b = make_seq(3), make_seq(5)
    s.add(a)
    s.add(b)
    seqs, is_prefill = s.schedule()
    assert is_prefill and seqs == [a, b]
    assert a.status == SequenceStatus.RUNNING
    for seq in seqs:
        seq.append_token(0)
    seqs, is_prefill = s.schedule()
    assert not is_prefill and seqs == [a, b]


def test_prefill_respects_token_budget_and_max_num_seqs():
    s = scheduler(num_blocks=64, max_num_seqs=2, max_tokens=10)
    seqs = [make_seq(6) for _ in range(3)]
    for seq in seqs:
        s.add(seq)
    assert s.schedule() == ([seqs[0]], True)  # 6 + 6 > 10 tokens
    assert s.schedule() == ([seqs[1]], True)
    seqs[0].append_token(0)
    seqs[1].append_token(0)
    assert s.schedule() == (seqs[:2], False)  # max_num_seqs reached: the third waits


def test_preempts_newest_when_blocks_run_out():
    s = scheduler(num_blocks=4, block_size=4)
    a, b = make_seq(8), make_seq(8)
    s.add(a)
    s.add(b)
    assert s.schedule() == ([a, b], True)
    a.append_token(0)
    b.append_token(0)
    seqs, is_prefill = s.schedule()  # each needs a third block; only one can have it
    assert seqs == [a] and not is_prefill
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and s.num_preemptions == 1
    assert list(s.waiting) == [b]


def test_finish_returns_blocks_from_any_queue():
    s = scheduler()
    a, b = make_seq(4), make_seq(4)
    s.add(a)
    s.schedule()
    s.add(b)
    s.finish(a, "abort")
    s.finish(b, "abort")
    assert a.finish_reason == b.finish_reason == "abort"
    assert s.is_finished() and s.block_manager.num_free_blocks == 8
