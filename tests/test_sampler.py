from __future__ import annotations

import numpy as np
import paddle
import pytest

from fdkit.engine.sampler import Sampler
from fdkit.engine.sequence import SamplingParams, Sequence

EOS = 0


def seqs_for(params_list, prompt=(5, 6, 7), seed=0):
    seqs = []
    for k, params in enumerate(params_list):
        seq = Sequence(list(prompt), params)
        seq.rng = np.random.default_rng(params.seed if params.seed is not None else seed + k)
        seqs.append(seq)
    return seqs


def logits_from_probs(rows) -> paddle.Tensor:
    return paddle.to_tensor(np.log(np.asarray(rows, dtype=np.float32)))


def draw(params: SamplingParams, probs, n: int) -> np.ndarray:
    seq = seqs_for([params])[0]
    sampler = Sampler([EOS])
    logits = logits_from_probs([probs])
    return np.array([sampler(logits, [seq])[0] for _ in range(n)])


PROBS = [0.02, 0.5, 0.3, 0.18]


def test_greedy_and_its_equivalents_take_argmax():
    for params in (
        SamplingParams(temperature=0),
        SamplingParams(top_k=1),
        SamplingParams(top_p=0.01),
        SamplingParams(min_p=1.0),
    ):
        assert set(draw(params, PROBS, 20)) == {1}


def test_temperature_one_follows_the_distribution():
    counts = np.bincount(draw(SamplingParams(temperature=1.0), PROBS, 4000), minlength=4) / 4000
    np.testing.assert_allclose(counts, PROBS, atol=0.03)


def test_low_temperature_sharpens():
    counts = np.bincount(draw(SamplingParams(temperature=0.3), PROBS, 2000), minlength=4) / 2000
    assert counts[1] > 0.8


def test_top_k_top_p_min_p_filter():
    assert set(draw(SamplingParams(top_k=2), PROBS, 500)) == {1, 2}
    assert set(draw(SamplingParams(top_p=0.75), PROBS, 500)) == {1, 2}  # 0.5 + 0.3 passes 0.75
    assert set(draw(SamplingParams(min_p=0.5), PROBS, 500)) == {1, 2}  # 0.18 < 0.5 * 0.5


def test_flat_distribution_beyond_candidates_falls_back_to_full_sort():
    vocab = 2000
    probs = np.full(vocab, 1.0 / vocab)
    tokens = draw(SamplingParams(top_p=0.9), probs, 300)
    assert tokens.max() >= 256 and len(set(tokens)) > 250


def test_seed_reproduces_and_rows_are_independent():
    """A seeded row draws the same 20 tokens alone and between rows with other parameters and seeds."""
    params = SamplingParams(temperature=1.0, seed=7)
    sampler = Sampler([EOS])
    flat = np.full(50, 1 / 50)
    alone_seq = seqs_for([params])[0]
    alone = [sampler(logits_from_probs([flat]), [alone_seq])[0] for _ in range(20)]
    batch = seqs_for([SamplingParams(seed=1), params, SamplingParams(top_k=5, seed=2)])
    mixed = [sampler(logits_from_probs([flat] * 3), batch)[1] for _ in range(20)]
    assert mixed == alone and len(set(alone)) > 5


def test_min_tokens_bans_eos_and_stop_tokens():
    probs = [0.97, 0.01, 0.01, 0.01]
    assert EOS not in draw(SamplingParams(temperature=0, min_tokens=3), probs, 5)
    assert set(draw(SamplingParams(temperature=0, ignore_eos=True), probs, 5)) == {EOS}  # not banned
    assert set(draw(SamplingParams(temperature=0), probs, 5)) == {EOS}
    stop_banned = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[1])
    assert set(draw(stop_banned, [0.01, 0.97, 0.01, 0.01], 5)) == {2}  # EOS and the stop token banned


def test_penalties_match_their_definitions():
    sampler = Sampler([EOS])
    logits = paddle.to_tensor([[1.0, -1.0, 2.0, 0.5, 3.0]])
    seq = seqs_for(
        [SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)], prompt=(1,)
    )[0]
    seq.all_token_ids += [2, 2, 3]  # generated: token 2 twice, token 3 once; token 1 only in the prompt
    out = sampler._apply_penalties(logits, [seq]).numpy()[0]
    expected = [1.0, -1.0 * 2, 2.0 / 2 - 0.5 * 2 - 0.25, 0.5 / 2 - 0.5 - 0.25, 3.0]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(min_p=2),
        dict(frequency_penalty=3),
        dict(presence_penalty=-3),
        dict(repetition_penalty=0),
        dict(max_tokens=0),
        dict(min_tokens=-1),
        dict(min_tokens=5, max_tokens=2),
    ],
)
def test_invalid_parameters_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def bitmask(rows: list[list[int]], vocab_size: int) -> np.ndarray:
    """llguidance's layout: bit t of a row's int32 words set when token t is allowed."""
    bits = np.zeros((len(rows), (vocab_size + 31) // 32 * 32), dtype=np.uint8)
    for i, allowed in enumerate(rows):
        bits[i, allowed] = 1
    return np.packbits(bits, axis=1, bitorder="little").view(np.int32)


def test_guided_masks_apply_per_row_for_the_whole_batch():
    probs = [[0.02, 0.5, 0.3, 0.18]] * 3
    allowed = bitmask([[2, 3], list(range(4)), [0]], 4)
    seqs = seqs_for([SamplingParams(temperature=0)] * 2 + [SamplingParams(temperature=1.0)])
    for _ in range(20):
        assert Sampler([EOS])(logits_from_probs(probs), seqs, allowed) == [2, 1, 0]
    sampled = [
        Sampler([EOS])(logits_from_probs(probs), seqs_for([SamplingParams(seed=k)]), allowed[:1])[0]
        for k in range(400)
    ]
    assert set(sampled) == {2, 3} and 0.5 < sampled.count(2) / 400 < 0.75  # 0.3 : 0.18 renormalised


def test_the_grammar_wins_when_bans_leave_it_nothing():
    """EOS is the grammar's only token while min_tokens bans it: the grammar's token is taken."""
    params = [SamplingParams(temperature=0, min_tokens=5), SamplingParams(temperature=0, min_tokens=5)]
    allowed = bitmask([[EOS], [EOS, 3]], 4)
    assert Sampler([EOS])(logits_from_probs([PROBS, PROBS]), seqs_for(params), allowed) == [EOS, 3]
