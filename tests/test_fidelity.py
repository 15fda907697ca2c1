"""Our ERNIE 4.5 against paddleformers' reference Ernie4_5ForCausalLM on the same checkpoint."""

from __future__ import annotations

import shutil

import numpy as np
import paddle
import pytest
from helpers import TEST_ENGINE

from fdkit import LLM, SamplingParams
from fdkit.checkpoint import CheckpointReader, read_config

PROMPT = "The model answers 1234+5678 and 你好世界。"
NUM_GREEDY_TOKENS = 32


@pytest.fixture(scope="module")
def reference(tiny_pt, tmp_path_factory):
    """paddleformers' model, loaded from the -PT layout (the one its from_pretrained reads)."""
    from paddleformers.transformers import Ernie4_5Config, Ernie4_5ForCausalLM
    from paddleformers.utils.log import logger

    logger.set_level("ERROR")
    folder = tmp_path_factory.mktemp("pf") / "ckpt"  # paddleformers writes metadata into the folder
    shutil.copytree(tiny_pt, folder)
    config = Ernie4_5Config.from_pretrained(str(folder))
    config.fuse_rms_norm = False  # the fused kernel has no CPU implementation
    model = Ernie4_5ForCausalLM.from_pretrained(str(folder), config=config, dtype="float32")
    model.eval()
    return model


def reference_logits(model, token_ids: list[int]) -> np.ndarray:
    with paddle.no_grad():
        return model(paddle.to_tensor([token_ids], dtype="int64")).logits[0].numpy()


def reference_greedy(model, token_ids: list[int], num_tokens: int) -> list[int]:
    with paddle.no_grad():
        ids, _ = model.generate(
            input_ids=paddle.to_tensor([token_ids], dtype="int64"),
            max_new_tokens=num_tokens,
            decode_strategy="greedy_search",
            use_cache=True,
        )
    return ids[0].tolist()


@pytest.mark.parametrize("layout", ["paddle", "pt"])
def test_logits_and_greedy_match_paddleformers(layout, tiny_paddle, tiny_pt, reference):
    llm = LLM(tiny_paddle if layout == "paddle" else tiny_pt, **TEST_ENGINE)
    try:
        prompt_ids = llm.tokenizer.encode(PROMPT)
        assert 0 not in prompt_ids  # paddleformers masks pad id 0 in generate()
        expected = reference_logits(reference, prompt_ids)
        # Every prefix's last-position logits: the prefill of each is a paged-attention forward pass.
        for length in (1, 5, len(prompt_ids)):
            ours = logits_of(llm, prompt_ids[:length])
            np.testing.assert_allclose(ours, expected[length - 1], atol=1e-4, rtol=0)
        greedy = SamplingParams(temperature=0, max_tokens=NUM_GREEDY_TOKENS, ignore_eos=True)
        out = llm.generate([prompt_ids], greedy, use_tqdm=False)[0]
        assert out.token_ids == reference_greedy(reference, prompt_ids, NUM_GREEDY_TOKENS)
        assert len(set(out.token_ids)) > 4  # a real continuation, not one token repeated
    finally:
        llm.close()


def test_published_names_and_orientations(tiny_paddle, tiny_pt):
    """-Paddle: "ernie.", q|k|v and gate|up fused, [in, out]; -PT: "model.", separate, [out, in]."""
    c = read_config(tiny_paddle)
    h, i = c["hidden_size"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    fused, split = CheckpointReader(tiny_paddle), CheckpointReader(tiny_pt)
    assert fused.shape("ernie.layers.1.self_attn.o_proj.weight") == (q, h)
    assert split.shape("model.layers.1.self_attn.o_proj.weight") == (h, q)
    assert split.shape("model.layers.1.self_attn.k_proj.weight") == (kv, h)
    assert split.shape("model.layers.1.mlp.down_proj.weight") == (h, i)
    for fused_name, part_names in [
        ("self_attn.qkv_proj", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
        ("mlp.up_gate_proj", ["mlp.gate_proj", "mlp.up_proj"]),
    ]:
        parts = [split.get(f"model.layers.1.{name}.weight").T for name in part_names]
        expected = np.concatenate(parts, axis=1)
        np.testing.assert_array_equal(fused.get(f"ernie.layers.1.{fused_name}.weight"), expected)


def test_decode_logits_match_full_forward(llm, reference):
    """Logits of a decode step (one new token over the paged cache) equal the reference's."""
    prompt_ids = llm.tokenizer.encode(PROMPT)
    seq_ids = prompt_ids + [11, 12, 13]
    expected = reference_logits(reference, seq_ids)[-1]
    ours = logits_after_decode(llm, prompt_ids, [11, 12, 13])
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def run_step(llm: LLM, seq, num_new_tokens: int):
    """One forward pass computing the next `num_new_tokens` tokens of `seq`, its blocks grown first."""
    llm.engine.block_manager.grow(seq, seq.num_computed_tokens + num_new_tokens)
    logits = llm.engine.runner.forward([seq], [num_new_tokens])
    seq.num_computed_tokens += num_new_tokens
    return logits


def logits_of(llm: LLM, token_ids: list[int]) -> np.ndarray:
    from fdkit.engine.sequence import Sequence

    seq = Sequence(token_ids, SamplingParams())
    try:
        return run_step(llm, seq, seq.num_tokens).numpy()[0]
    finally:
        llm.engine.block_manager.deallocate(seq)


def logits_after_decode(llm: LLM, prompt_ids: list[int], new_ids: list[int]) -> np.ndarray:
    from fdkit.engine.sequence import Sequence

    seq = Sequence(prompt_ids, SamplingParams())
    try:
        run_step(llm, seq, seq.num_tokens)
        for token_id in new_ids:
            seq.append_token(token_id)
            logits = run_step(llm, seq, 1)
        return logits.numpy()[0]
    finally:
        llm.engine.block_manager.deallocate(seq)
