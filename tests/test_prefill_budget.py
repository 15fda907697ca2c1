"""The cost-aware prefill budget (fed fake step times) and the scheduler's prompt-token cap; no paddle."""

from __future__ import annotations

import pytest

from fdkit.engine.kv_cache import BlockManager
from fdkit.engine.prefill_budget import INITIAL_TOKENS, MAX_ESTIMATE_AGE, PrefillBudget
from fdkit.engine.scheduler import Scheduler, SchedulerConfig
from fdkit.engine.sequence import SamplingParams, Sequence

DECODE_S = 0.2


def step_time(num_prompt_tokens: int, context: int = 0) -> float:
    """A fake cost model: decodes, plus per prompt token a cost that grows with the context."""
    return DECODE_S + num_prompt_tokens * (0.001 + context * 1e-6)


def run(budget: PrefillBudget, num_steps: int, is_growing: bool = False) -> list[int]:
    """Times `num_steps` mixed steps, each carrying the full cap: the caps used. `is_growing`: one
    prompt's context grows by the tokens prefilled."""
    caps, context = [], 0
    for _ in range(num_steps):
        cap = budget.max_prompt_tokens(4)
        caps.append(cap)
        budget.observe(4, cap, step_time(cap, context))
        context += cap if is_growing else 0
    return caps


def timed_decode(budget: PrefillBudget) -> PrefillBudget:
    budget.observe(4, 0, DECODE_S)
    return budget


def test_nothing_is_capped_until_a_decode_only_step_is_timed():
    budget = PrefillBudget(2.5, 2048)
    assert budget.max_prompt_tokens(4) == 0
    budget.observe(0, 2048, 50.0)  # a prompt alone: no decodes to protect, nothing learned
    budget.observe(4, 100, 50.0)  # no decode estimate yet to compare with
    assert budget.max_prompt_tokens(4) == 0
    assert timed_decode(budget).max_prompt_tokens(4) == INITIAL_TOKENS


def test_converges_to_the_allowed_stall():
    """1.5 x 0.2 s of extra time at 1 ms per token: 300 tokens; growth at most 2x per step."""
    caps = run(timed_decode(PrefillBudget(2.5, 2048)), 12)
    assert caps[:5] == [32, 64, 128, 256, 300]
    assert caps[-1] == 300
    assert step_time(caps[-1]) == pytest.approx(2.5 * DECODE_S)


def test_follows_the_cost_as_the_context_grows():
    # 210 steps: every MAX_ESTIMATE_AGE steps one carries no prompt (the decodes are timed again)
    caps = run(timed_decode(PrefillBudget(2.5, 2048)), 210, is_growing=True)
    contexts = [sum(caps[:i]) for i in range(len(caps))]
    assert contexts[-1] > 10000 and caps[-1] < caps[4] / 5  # a token costs 10x+ what it did
    times = [step_time(cap, context) for cap, context in zip(caps, contexts, strict=True)]
    assert max(times[4:]) <= 2.5 * DECODE_S * 1.15  # one step behind the growing cost
    assert max(times[12:]) <= 2.5 * DECODE_S * 1.05


def test_shrinks_at_most_by_half_and_never_below_one():
    budget = timed_decode(PrefillBudget(1.0, 2048))  # no extra time allowed at all
    assert run(budget, 8) == [32, 16, 8, 4, 2, 1, 1, 1]


def test_bounded_by_max_num_batched_tokens_and_a_short_chunk_does_not_shrink_it():
    budget = timed_decode(PrefillBudget(100.0, 256))
    assert run(budget, 5)[-1] == 256
    budget.observe(4, 3, step_time(3))  # the last 3 tokens of a prompt, well under the target
    assert budget.max_prompt_tokens(4) == 256


def test_a_faster_decode_only_step_lowers_the_target():
    budget = timed_decode(PrefillBudget(2.5, 2048))
    run(budget, 10)
    for _ in range(30):
        budget.observe(1, 0, DECODE_S / 2)  # fewer streams now
    budget.observe(1, 300, step_time(300))
    assert budget.max_prompt_tokens(1) < 200


def test_decode_times_are_kept_per_number_of_decodes():
    """The served bug: a decode-only step of 1 decode timed once, then only mixed steps of 32 decodes
    (always a prompt waiting). Compared with the 1-decode time, every mixed step looked like a stall and
    the budget fell to a few tokens. Now 32 decodes get their own decode-only step first."""
    budget = PrefillBudget(2.5, 2048)
    budget.observe(1, 0, 0.05)
    assert budget.max_prompt_tokens(1) == INITIAL_TOKENS
    assert budget.max_prompt_tokens(32) == 0  # the next step times 32 decodes alone
    budget.observe(32, 0, 0.2)
    caps = []
    for _ in range(12):
        caps.append(budget.max_prompt_tokens(32))
        budget.observe(32, caps[-1], step_time(caps[-1]))
    assert caps[-1] == 300  # as with one estimate of the right size (test_converges_to_the_allowed_stall)
    assert budget.max_prompt_tokens(20) == 300  # the same power-of-2 bucket


def test_an_old_decode_time_is_measured_again():
    budget = timed_decode(PrefillBudget(2.5, 2048))
    run(budget, MAX_ESTIMATE_AGE)
    assert budget.max_prompt_tokens(4) > 0
    run(budget, 1)
    assert budget.max_prompt_tokens(4) == 0
    budget.observe(4, 0, DECODE_S * 2)  # the streams' contexts grew: a fresh estimate, not averaged
    assert budget.decode_s(4) == DECODE_S * 2


def make_seq(num_tokens: int) -> Sequence:
    return Sequence(list(range(1, num_tokens + 1)), SamplingParams(max_tokens=100))


def new_scheduler() -> Scheduler:
    return Scheduler(SchedulerConfig(4, 64, 256), BlockManager(64, 4, enable_prefix_caching=False))


def step(scheduler: Scheduler, max_prompt_tokens: int | None) -> list[int]:
    batch = scheduler.schedule(max_prompt_tokens)
    for seq, is_ready in zip(batch.seqs, scheduler.update(batch), strict=True):
        if is_ready:
            seq.append_token(0)
    return batch.num_new_tokens


def test_a_lone_prompt_is_not_capped():
    scheduler = new_scheduler()
    scheduler.add(make_seq(100))
    assert step(scheduler, 5) == [64]


def test_scheduler_caps_prompt_tokens_next_to_decodes():
    scheduler = new_scheduler()
    scheduler.add(make_seq(3))
    assert step(scheduler, 5) == [3]  # its prompt; it decodes from now on
    scheduler.add(make_seq(100))
    scheduler.add(make_seq(50))
    assert step(scheduler, 5) == [1, 5]  # a new prompt's first chunk, and no room for the third
    assert step(scheduler, 5) == [1, 5]  # a running prompt's chunk
    assert step(scheduler, 0) == [1]  # decodes only
    assert step(scheduler, None) == [1, 63]  # no cap: the step's token budget
    assert step(scheduler, 30) == [1, 27, 3]  # the rest of the long prompt, then the next one's


def test_short_prompts_go_whole_next_to_decodes_and_long_ones_keep_the_cap():
    """engine.short_prompt_tokens: a sequence of at most that many tokens prefills whole; the cap holds
    the long prompts' chunks, counted apart from the short ones."""
    scheduler = Scheduler(SchedulerConfig(4, 64, 256, short_prompt_tokens=12), BlockManager(64, 4, False))
    scheduler.add(make_seq(3))
    assert step(scheduler, 5) == [3]
    scheduler.add(make_seq(40))
    scheduler.add(make_seq(12))
    scheduler.add(make_seq(13))
    batch = scheduler.schedule(5)
    assert batch.num_new_tokens == [1, 5, 12] and batch.num_capped_tokens == 5  # the 13 waits
    assert batch.num_prompt_tokens == 17
    for seq, is_ready in zip(batch.seqs, scheduler.update(batch), strict=True):
        if is_ready:
            seq.append_token(0)
    assert step(scheduler, 5) == [1, 1, 5]  # 13 tokens is long: no cap left once the 40's chunk ran


def test_a_step_with_uncapped_prompts_teaches_nothing():
    budget = timed_decode(PrefillBudget(2.5, 2048))
    before = budget.max_prompt_tokens(4)
    budget.observe(4, before, DECODE_S * 20, num_uncapped=100)  # slow because of the short prompts
    assert budget.max_prompt_tokens(4) == before


def test_decodes_of_long_sequences_are_never_capped():
    """A sequence past short_prompt_tokens still decodes every step, whatever the cap (a cap applied to
    its decode starved 3 of 4 streams next to a long prompt once they passed 256 tokens)."""
    scheduler = Scheduler(SchedulerConfig(4, 64, 256, short_prompt_tokens=4), BlockManager(64, 4, False))
    for _ in range(3):
        scheduler.add(make_seq(6))
    assert step(scheduler, None) == [6, 6, 6]
    scheduler.add(make_seq(40))
    assert step(scheduler, 0) == [1, 1, 1]  # no room for the long prompt; every decode runs
    assert step(scheduler, 5) == [1, 1, 1, 5]
