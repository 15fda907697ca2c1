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


def test_allocate_grow_deallocate():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq(5)
    assert bm.can_allocate(seq, [], 5)
    bm.allocate(seq, [], 5)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 2
    for token in range(3):  # 8 tokens still fit in 2 blocks
        seq.append_token(token)
        assert bm.can_grow(seq, seq.num_tokens)
        bm.grow(seq, seq.num_tokens)
    assert len(seq.block_table) == 2
    seq.append_token(9)
    bm.grow(seq, seq.num_tokens)
    assert len(seq.block_table) == 3 and bm.usage == 0.75
    bm.deallocate(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 4
    assert bm.ref_counts == [0, 0, 0, 0]


def test_cannot_allocate_beyond_free_blocks():
    bm = BlockManager(num_blocks=2, block_size=4)
    assert not bm.can_allocate(make_seq(9), [], 9)
    assert bm.can_allocate(make_seq(8), [], 8)


def scheduler(num_blocks=8, block_size=4, max_num_seqs=4, max_tokens=64) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
    return Scheduler(SchedulerConfig(max_num_seqs, max_tokens, 64), bm)


def step(s: Scheduler) -> list[tuple[Sequence, int]]:
    """Schedules and runs one step (each ready sequence gets token 0): what it computed."""
    batch = s.schedule()
    for seq, is_ready in zip(batch.seqs, s.update(batch), strict=True):
        if is_ready:
            seq.append_token(0)
    return list(zip(batch.seqs, batch.num_new_tokens, strict=True))


def test_prefill_first_then_decode():
    s = scheduler()
    a, b = make_seq(3), make_seq(5)
    s.add(a)
    s.add(b)
    assert step(s) == [(a, 3), (b, 5)]
    assert a.status == SequenceStatus.RUNNING
    assert step(s) == [(a, 1), (b, 1)]


def test_prompts_are_chunked_within_the_token_budget_and_max_num_seqs():
    s = scheduler(num_blocks=64, max_num_seqs=2, max_tokens=10)
    seqs = [make_seq(6) for _ in range(3)]
    for seq in seqs:
        s.add(seq)
    assert step(s) == [(seqs[0], 6), (seqs[1], 4)]  # the second prompt's first chunk fills the budget
    assert seqs[0].num_completion_tokens == 1 and seqs[1].num_completion_tokens == 0
    assert step(s) == [(seqs[0], 1), (seqs[1], 2)]  # decodes first, then the rest of the prompt
    assert seqs[1].num_completion_tokens == 1
    assert step(s) == [(seqs[0], 1), (seqs[1], 1)]  # max_num_seqs reached: the third waits


def test_decodes_go_before_a_long_prompt_chunk():
    s = scheduler(num_blocks=64, max_tokens=8)
    a = make_seq(4)
    s.add(a)
    step(s)
    long = make_seq(30)
    s.add(long)
    assert step(s) == [(a, 1), (long, 7)]
    assert step(s) == [(a, 1), (long, 7)]
    assert long.num_computed_tokens == 14 and long.num_completion_tokens == 0


def test_preempts_newest_when_blocks_run_out():
    s = scheduler(num_blocks=4, block_size=4)
    a, b = make_seq(8), make_seq(8)
    s.add(a)
    s.add(b)
    assert step(s) == [(a, 8), (b, 8)]
    assert step(s) == [(a, 1)]  # each needs a third block; only one can have it
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and s.num_preemptions == 1
    assert b.num_computed_tokens == 0 and list(s.waiting) == [b]


def test_preempts_a_prompt_part_way_through():
    s = scheduler(num_blocks=4, block_size=4, max_tokens=6)
    a, b = make_seq(6), make_seq(9)
    s.add(a)
    s.add(b)
    assert step(s) == [(a, 6)]
    assert step(s) == [(a, 1), (b, 5)]  # b's first chunk: blocks 3 and 4
    assert step(s) == [(a, 1)]  # b needs a fifth block: newest, it gives way part-way through its prompt
    assert b.status == SequenceStatus.WAITING and b.num_computed_tokens == 0 and s.num_preemptions == 1


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
