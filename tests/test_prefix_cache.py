"""Prefix caching: full blocks found by the hash of their content chain, shared by reference counts,
evicted least recently used; it changes no output (alone, under preemption, at tp=2) and is reported
in usage.prompt_tokens_details.cached_tokens and on /metrics."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from helpers import TEST_ENGINE

from fdkit import LLM, SamplingParams
from fdkit.engine.kv_cache import BlockManager
from fdkit.engine.sequence import Sequence

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def seq_of(token_ids: list[int]) -> Sequence:
    return Sequence(list(token_ids), SamplingParams())


def admit(bm: BlockManager, seq: Sequence) -> list[int]:
    """Allocates `seq` with its cached prefix and computes the rest: the cached blocks it got."""
    cached = bm.cached_prefix(seq)
    bm.allocate(seq, cached, seq.num_tokens)
    before = seq.num_computed_tokens
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq, before)
    return cached


def test_full_blocks_are_shared_by_their_content_chain():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = seq_of(range(1, 11))  # blocks [1-4] [5-8], then 2 tokens
    assert admit(bm, first) == []
    second = seq_of([*range(1, 9), 50, 51, 52])
    assert admit(bm, second) == first.block_table[:2]
    assert second.num_computed_tokens == 11 and bm.ref_counts[first.block_table[0]] == 2
    assert (bm.num_queried_tokens, bm.num_hit_tokens) == (21, 8)
    moved = seq_of([*range(5, 9), *range(1, 5), 9])  # the same blocks in another order: another chain
    assert admit(bm, moved) == []
    bm.deallocate(first)
    assert bm.ref_counts[second.block_table[0]] == 1


def test_the_last_token_is_always_computed():
    bm = BlockManager(num_blocks=8, block_size=4)
    admit(bm, seq_of(range(1, 9)))
    again = seq_of(range(1, 9))  # two full blocks, both cached: the second is computed again
    assert len(admit(bm, again)) == 1 and again.num_computed_tokens == 8


def test_free_cached_blocks_are_kept_then_evicted_least_recently_used():
    bm = BlockManager(num_blocks=6, block_size=4)
    old, recent = seq_of(range(100, 109)), seq_of(range(200, 209))
    for seq in (old, recent):
        admit(bm, seq)
        bm.deallocate(seq)
    assert bm.num_free_blocks == 6  # free, and still findable
    assert len(bm.cached_prefix(seq_of(range(100, 109)))) == 2
    admit(bm, seq_of(range(300, 310)))  # 3 blocks: the uncached ones, then the old prompt's tail
    assert len(bm.cached_prefix(seq_of(range(100, 109)))) == 1
    admit(bm, seq_of(range(400, 403)))  # then its head
    assert bm.cached_prefix(seq_of(range(100, 109))) == []
    assert len(bm.cached_prefix(seq_of(range(200, 209)))) == 2


def test_a_hit_takes_its_blocks_off_the_free_list():
    bm = BlockManager(num_blocks=3, block_size=4)
    first = seq_of(range(1, 10))
    admit(bm, first)
    bm.deallocate(first)
    second = seq_of(range(1, 10))
    cached = bm.cached_prefix(second)
    assert bm.can_allocate(second, cached, 9) and not bm.can_allocate(second, cached, 13)
    bm.allocate(second, cached, 9)
    assert bm.num_free_blocks == 0 and bm.ref_counts == [1, 1, 1]


def prompts_sharing_a_prefix() -> list[list[int]]:
    rng = np.random.default_rng(0)
    system = rng.integers(3, 1000, 100).tolist()
    return [system + rng.integers(3, 1000, n).tolist() for n in (1, 5, 17, 40)] + [system[:64]]


@pytest.fixture(scope="module")
def uncached(tiny_paddle) -> list[list[int]]:
    with LLM(tiny_paddle, **{**TEST_ENGINE, "enable_prefix_caching": False}) as llm:
        return [o.token_ids for o in llm.generate(prompts_sharing_a_prefix(), GREEDY, use_tqdm=False)]


def test_cached_prefixes_change_no_output(llm, uncached):
    prompts = prompts_sharing_a_prefix()
    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    outs = [llm.generate(p, GREEDY, use_tqdm=False)[0] for p in prompts[1:]]
    assert [o.token_ids for o in first + outs] == uncached
    assert [o.metrics["num_cached_tokens"] for o in outs] == [96, 96, 96, 48]  # full blocks of 16


def test_cached_prefixes_under_preemption(tiny_paddle, uncached):
    engine = {**TEST_ENGINE, "num_kv_blocks": 12, "max_model_len": 192, "max_num_batched_tokens": 64}
    with LLM(tiny_paddle, **engine) as small:
        outs = small.generate(prompts_sharing_a_prefix() * 2, GREEDY, use_tqdm=False)
        assert small.engine.scheduler.num_preemptions > 0
        assert small.engine.block_manager.num_hit_tokens > 0
        assert [o.token_ids for o in outs] == uncached * 2
        assert small.engine.block_manager.num_free_blocks == 12


@pytest.mark.slow
def test_cached_prefixes_at_tp2(tiny_paddle, uncached):
    overrides = [f"engine.{k}={v}" for k, v in TEST_ENGINE.items()]
    with LLM.from_config(["model=ernie", f"model.path={tiny_paddle}", "tp=2", *overrides]) as tp2:
        outs = [tp2.generate(p, GREEDY, use_tqdm=False)[0] for p in prompts_sharing_a_prefix()]
        assert [o.token_ids for o in outs] == uncached
        assert [o.metrics["num_cached_tokens"] for o in outs] == [0, 96, 96, 96, 48]


def test_usage_and_metrics_report_the_hit(server):
    prompt = "The same long system prompt, again and again. " * 12
    usages = []
    for question in ("What is it?", "Why?"):
        body = {"prompt": prompt + question, "max_tokens": 2, "temperature": 0}
        reply = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60).json()
        usages.append(reply["usage"])
    first, second = (u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert first == 0 < second <= usages[1]["prompt_tokens"]
    metrics = httpx.get(server.base_url + "/metrics").text
    hits = float(
        next(line for line in metrics.splitlines() if line.startswith("fdkit:prefix_cache_hits")).split()[-1]
    )
    rate = next(line for line in metrics.splitlines() if line.startswith("fdkit:prefix_cache_hit_rate"))
    assert hits >= second and 0 < float(rate.split()[-1]) < 1
