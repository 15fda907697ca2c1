"""Chunked prefill and attention over key chunks (online softmax) change no logit beyond float32 noise,
at chunk and block boundaries, and a prompt can be preempted part-way through and recomputed."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TEST_ENGINE

import fdkit.models.layers as layers
import fdkit.models.prompt_attention as prompt_attention
from fdkit import LLM, SamplingParams
from fdkit.engine.model_runner import StepInput
from fdkit.engine.sequence import Sequence

BLOCK = TEST_ENGINE["block_size"]  # 16
CHUNK = 48  # tokens per step in the chunked engine: three blocks
LENGTHS = [BLOCK - 1, BLOCK, BLOCK + 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + BLOCK + 1, 300]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompt_ids(length: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed + length).integers(3, 1000, length).tolist()


def prefill_logits(llm: LLM, token_ids: list[int], chunk: int) -> np.ndarray:
    """Logits after the last prompt token, the prompt prefilled `chunk` tokens per forward pass."""
    seq = Sequence(token_ids, SamplingParams())
    bm, runner = llm.engine.block_manager, llm.engine.runner
    try:
        while seq.num_computed_tokens < seq.num_tokens:
            num_new = min(chunk, seq.num_tokens - seq.num_computed_tokens)
            bm.grow(seq, seq.num_computed_tokens + num_new)
            logits = runner.forward([seq], [num_new])
            seq.num_computed_tokens += num_new
        return logits.numpy()[0]
    finally:
        bm.deallocate(seq)


@pytest.mark.parametrize("length", LENGTHS)
def test_chunked_prefill_logits_equal_whole_prompt(llm, length):
    ids = prompt_ids(length)
    whole = prefill_logits(llm, ids, length)
    for chunk in (CHUNK, BLOCK + 1, 1):
        np.testing.assert_allclose(prefill_logits(llm, ids, chunk), whole, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def paddle_ops(tiny_paddle):
    """Attention in paddle's ops (`engine.attention_kernel=false`, as without a compiler): the path with
    key chunks and query blocks. fdkit's kernel is held to a numpy reference in test_attention_kernel."""
    with LLM(tiny_paddle, **TEST_ENGINE, attention_kernel=False) as engine:
        assert engine.engine.runner.paged_attention is None
        yield engine


def test_attention_over_many_key_chunks_equals_one(paddle_ops, llm, monkeypatch):
    """With a tiny score budget every block is its own key chunk: the online softmax folds them all."""
    ids = prompt_ids(300)
    whole = prefill_logits(paddle_ops, ids, 300)
    decoded = prefill_logits(paddle_ops, ids, 1)
    np.testing.assert_allclose(whole, prefill_logits(llm, ids, 300), atol=1e-4, rtol=0)  # and the kernel's
    monkeypatch.setattr(layers, "KEY_CHUNK_SCORES", 1)
    np.testing.assert_allclose(prefill_logits(paddle_ops, ids, 300), whole, atol=1e-4, rtol=0)
    np.testing.assert_allclose(prefill_logits(paddle_ops, ids, 1), decoded, atol=1e-4, rtol=0)
    np.testing.assert_allclose(prefill_logits(paddle_ops, ids, CHUNK), whole, atol=1e-4, rtol=0)


def test_prompt_attention_in_many_query_blocks_equals_one(paddle_ops, monkeypatch):
    """With a tiny score budget each of a prompt's queries is its own block (its own key count, its own
    padding and mask): the logits do not move."""
    llm = paddle_ops
    ids = prompt_ids(300)
    whole = prefill_logits(llm, ids, 300)
    monkeypatch.setattr(prompt_attention, "PROMPT_BLOCK_SCORES", 1)
    np.testing.assert_allclose(prefill_logits(llm, ids, 300), whole, atol=1e-4, rtol=0)
    np.testing.assert_allclose(prefill_logits(llm, ids, CHUNK), whole, atol=1e-4, rtol=0)
    monkeypatch.setattr(prompt_attention, "PROMPT_BLOCK_SCORES", 3000)  # blocks of 1-4 queries, padded
    np.testing.assert_allclose(prefill_logits(llm, ids, BLOCK + 1), whole, atol=1e-4, rtol=0)


def test_decode_rows_of_very_different_lengths_in_one_step(llm):
    """One-token rows are grouped by the power of 2 of their length (3 groups here): each row's logits
    are its own."""
    prompts = [prompt_ids(300), prompt_ids(BLOCK - 1), prompt_ids(2 * CHUNK)]
    expected = np.stack([prefill_logits(llm, ids, len(ids)) for ids in prompts])
    seqs = [Sequence(ids, SamplingParams()) for ids in prompts]
    bm, runner = llm.engine.block_manager, llm.engine.runner
    try:
        for seq in seqs:
            bm.grow(seq, seq.num_tokens)
            runner.forward([seq], [seq.num_tokens - 1])
            seq.num_computed_tokens = seq.num_tokens - 1
        _, _, batch = runner._prepare([StepInput.of(seq, 1) for seq in seqs])
        assert sorted(group.num_keys for group in batch.groups) == [BLOCK - 1, 2 * CHUNK, 300]
        logits = runner.forward(seqs, [1, 1, 1]).numpy()
    finally:
        for seq in seqs:
            bm.deallocate(seq)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def unchunked(llm) -> list[list[int]]:
    prompts = [prompt_ids(n) for n in LENGTHS]
    return [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def chunked_llm(tiny_paddle, **overrides) -> LLM:
    engine = {**TEST_ENGINE, "max_num_batched_tokens": CHUNK, "enable_prefix_caching": False, **overrides}
    return LLM(tiny_paddle, **engine)


def test_chunked_engine_generates_the_same_tokens(tiny_paddle, unchunked):
    prompts = [prompt_ids(n) for n in LENGTHS]
    with chunked_llm(tiny_paddle) as chunked:
        outs = chunked.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == unchunked


def test_preempted_part_way_through_a_prompt(tiny_paddle, unchunked):
    """12 blocks of 16 tokens for prompts of up to 300 tokens: chunks of the long prompts are admitted,
    then given back when the KV cache runs out, and recomputed."""
    prompts = [prompt_ids(n) for n in LENGTHS]
    # every prompt held to the stall cap (short_prompt_tokens=0): chunks stay small, so prompts are
    # part-way when the cache runs out
    with chunked_llm(tiny_paddle, num_kv_blocks=20, max_model_len=320, short_prompt_tokens=0) as small:
        preempted_mid_prompt = []
        scheduler = small.engine.scheduler
        preempt = scheduler._preempt

        def watch(seq):
            preempted_mid_prompt.append(seq.num_computed_tokens < seq.num_prompt_tokens)
            preempt(seq)

        scheduler._preempt = watch
        outs = small.generate(prompts, GREEDY, use_tqdm=False)
        assert any(preempted_mid_prompt)
        assert [o.token_ids for o in outs] == unchunked
        assert small.engine.block_manager.num_free_blocks == 20
