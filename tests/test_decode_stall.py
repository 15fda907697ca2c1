"""The engine caps prompt chunks next to running decodes (engine.max_decode_stall), a lone prompt still
prefills at the full step budget, and greedy outputs do not change."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TEST_ENGINE

from fdkit import LLM, SamplingParams
from fdkit.engine.prefill_budget import INITIAL_TOKENS

MAX_TOKENS_PER_STEP = 256
LONG = 400  # tokens of the long prompt: two full steps unbudgeted
STREAM = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def prompt_ids(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 1000, length).tolist()


def budgeted_llm(tiny_paddle, max_decode_stall: float) -> LLM:
    engine = {**TEST_ENGINE, "max_num_batched_tokens": MAX_TOKENS_PER_STEP, "enable_prefix_caching": False}
    return LLM(tiny_paddle, **engine, max_decode_stall=max_decode_stall)


def spy_batches(llm: LLM) -> list[tuple[int, int, int | None]]:
    """Every scheduled step's (decodes, prompt tokens, prompt-token cap passed in)."""
    scheduler, steps = llm.engine.scheduler, []
    schedule = scheduler.schedule

    def watch(max_prompt_tokens=None):
        batch = schedule(max_prompt_tokens)
        steps.append((batch.num_decodes, batch.num_prompt_tokens, max_prompt_tokens))
        return batch

    scheduler.schedule = watch
    return steps


def long_prompt_among_streams(llm: LLM) -> tuple[list[list[int]], list[tuple[int, int, int | None]]]:
    """4 streams decoding, then a long prompt arrives: every request's tokens and the steps from then on."""
    stream_ids = [llm.add_request(prompt_ids(8, seed), STREAM) for seed in range(4)]
    for _ in range(4):  # their prompts, then decode-only steps
        llm.step()
    steps = spy_batches(llm)
    long_id = llm.add_request(prompt_ids(LONG, 99), GREEDY)
    tokens = {}
    while llm.has_unfinished_requests():
        for output in llm.step():
            tokens[output.request_id] = output.token_ids
    return [tokens[i] for i in [long_id, *stream_ids]], steps


@pytest.fixture(scope="module")
def unbudgeted(tiny_paddle):
    with budgeted_llm(tiny_paddle, 0) as llm:
        return long_prompt_among_streams(llm)


def test_unbudgeted_fills_the_step_next_to_decodes(unbudgeted):
    _, steps = unbudgeted
    assert steps[0] == (4, MAX_TOKENS_PER_STEP - 4, None)


def test_prompt_tokens_are_capped_while_decodes_run(tiny_paddle, unbudgeted):
    with budgeted_llm(tiny_paddle, 2.5) as llm:
        outputs, steps = long_prompt_among_streams(llm)
    mixed = [(num_prompt, cap) for num_decodes, num_prompt, cap in steps if num_decodes and num_prompt]
    assert mixed[0][0] == INITIAL_TOKENS  # the first chunk next to decodes, before any mixed step is timed
    assert all(num_prompt <= cap for num_prompt, cap in mixed)
    assert sum(num_prompt for num_prompt, _ in mixed) == LONG
    assert len(mixed) > 2  # more steps than unbudgeted
    assert outputs == unbudgeted[0]


def test_a_lone_prompt_prefills_at_the_full_budget(tiny_paddle):
    with budgeted_llm(tiny_paddle, 2.5) as llm:
        steps = spy_batches(llm)
        llm.generate([prompt_ids(LONG, 99)], GREEDY, use_tqdm=False)
    assert steps[:2] == [(0, MAX_TOKENS_PER_STEP, 0), (0, LONG - MAX_TOKENS_PER_STEP, 0)]
