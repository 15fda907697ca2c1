"""Continuous batching must not change what a request gets: together, alone, or preempted."""

from __future__ import annotations

import pytest
from helpers import TEST_ENGINE

from fdkit import LLM, SamplingParams

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog",
    "你好，世界",
    "1234+5678=",
    "What is the answer to this question? Think step by step and write it down.",
    "a b c d e f g h i j k l m n o p",
    "计算 47+85 等于多少？",
    "ERNIE Paddle model",
]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(llm) -> list[list[int]]:
    return [llm.generate(p, GREEDY, use_tqdm=False)[0].token_ids for p in PROMPTS]


def test_batch_equals_alone(llm, alone):
    together = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in together] == alone
    assert all(o.finish_reason == "length" and len(o.token_ids) == 24 for o in together)


def test_batch_equals_alone_under_preemption(tiny_paddle, alone):
    # 8 blocks of 16 tokens: not enough for 8 sequences of up to ~50 tokens, so some are preempted.
    small = LLM(tiny_paddle, **{**TEST_ENGINE, "num_kv_blocks": 8, "max_model_len": 128})
    try:
        together = small.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert small.engine.scheduler.num_preemptions > 0
        assert [o.token_ids for o in together] == alone
        assert small.engine.block_manager.num_free_blocks == 8  # every block came back
    finally:
        small.close()


def test_seeded_sampling_is_independent_of_the_batch(llm):
    sampled = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate(PROMPTS[1], sampled, use_tqdm=False)[0].token_ids
    others = SamplingParams(temperature=0.7, max_tokens=20, ignore_eos=True)
    mixed = llm.generate(PROMPTS[:4], [others, sampled, others, GREEDY], use_tqdm=False)
    assert mixed[1].token_ids == alone
    again = llm.generate(PROMPTS[1], sampled, use_tqdm=False)[0].token_ids
    assert again == alone


def test_many_requests_in_flight_at_once(llm):
    """More requests than max_num_seqs: the scheduler admits them as others finish."""
    prompts = [f"request number {i}" for i in range(40)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [5] * 40
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
