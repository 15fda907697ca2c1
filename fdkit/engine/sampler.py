"""Next-token sampling for a batch, each row with its own parameters; tensors stay on the device.

Filtering (top_k, top_p, min_p) works on the top `num_candidates` tokens of each row, which is exact
whenever every row's kept set lies inside them; otherwise the batch falls back to a full sort.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import paddle
import paddle.nn.functional as F

from fdkit.engine.sequence import Sequence

NUM_CANDIDATES = 256


class Sampler:
    def __init__(self, eos_token_ids: list[int], argmax: Callable | None = None):
        """`argmax`: rows' argmax of float32 logits (fdkit's kernel on CPU), else paddle's."""
        self.eos_token_ids = list(eos_token_ids)
        self.argmax = argmax or (lambda logits: paddle.argmax(logits, axis=-1))

    def __call__(
        self, logits: paddle.Tensor, seqs: list[Sequence], allowed: np.ndarray | None = None
    ) -> list[int]:
        """`allowed`: guided decoding's token bitmask (fdkit/engine/guided.py), None if no row has one."""
        logits = logits.astype("float32")
        params = [seq.params for seq in seqs]
        if any(p.has_penalties for p in params):
            logits = self._apply_penalties(logits, seqs)
        banned_ids = [self._banned(seq) for seq in seqs]
        banned = _ban(logits, banned_ids)
        logits = banned if allowed is None else _apply_allowed(logits, banned, allowed, banned_ids)
        greedy = np.array([p.is_greedy for p in params])
        if greedy.all():
            return self.argmax(logits).tolist()
        uniforms = paddle.to_tensor(np.array([seq.rng.random() for seq in seqs], dtype=np.float32))
        temperatures = np.array([1.0 if g else p.temperature for g, p in zip(greedy, params, strict=True)])
        probs = F.softmax(logits / paddle.to_tensor(temperatures[:, None], dtype="float32"), axis=-1)
        tokens = self._sample(probs, params, uniforms)
        if greedy.any():
            tokens = np.where(greedy, self.argmax(logits).numpy(), tokens)
        return [int(t) for t in tokens]

    def logprobs(self, logits: paddle.Tensor, token_ids: list[int], seqs: list[Sequence]) -> list:
        """Per sequence that asked: (log-probability of its token, [(id, logprob)] of the k most likely),
        from the model's distribution before any sampling parameter changed it."""
        logprobs = F.log_softmax(logits.astype("float32"), axis=-1)
        chosen = paddle.take_along_axis(logprobs, paddle.to_tensor(np.array(token_ids)[:, None]), axis=1)
        chosen = chosen.numpy()[:, 0]
        max_k = max(seq.params.logprobs or 0 for seq in seqs)
        top_values, top_ids = (t.numpy() for t in paddle.topk(logprobs, max(max_k, 1)))
        results = []
        for i, seq in enumerate(seqs):
            k = seq.params.logprobs
            top = (
                [(int(t), float(v)) for t, v in zip(top_ids[i, :k], top_values[i, :k], strict=True)]
                if k
                else []
            )
            results.append(None if k is None else (float(chosen[i]), top))
        return results

    def _apply_penalties(self, logits: paddle.Tensor, seqs: list[Sequence]) -> paddle.Tensor:
        """OpenAI's frequency/presence penalties on generated tokens; repetition penalty (HF/vLLM)
        on every token seen, prompt included."""
        num_rows, vocab_size = logits.shape
        counts = np.zeros((num_rows, vocab_size), dtype=np.float32)
        seen = np.zeros((num_rows, vocab_size), dtype=bool)
        for i, seq in enumerate(seqs):
            ids = _in_vocab(seq.all_token_ids, vocab_size)
            counts[i] = np.bincount(_in_vocab(seq.completion_token_ids, vocab_size), minlength=vocab_size)
            seen[i, ids] = True
        column = lambda name: paddle.to_tensor(
            np.array([getattr(s.params, name) for s in seqs], dtype=np.float32)[:, None]
        )
        rep = column("repetition_penalty")
        seen_t = paddle.to_tensor(seen)
        penalized = paddle.where(logits > 0, logits / rep, logits * rep)
        logits = paddle.where(seen_t, penalized, logits)
        counts_t = paddle.to_tensor(counts)
        logits = logits - column("frequency_penalty") * counts_t
        return logits - column("presence_penalty") * (counts_t > 0).astype("float32")

    def _banned(self, seq: Sequence) -> list[int]:
        """Bad words, and EOS or stop tokens before min_tokens (ignore_eos does not ban EOS: it only
        does not stop)."""
        params = seq.params
        banned = _bad_word_ends(seq) if params.bad_words_token_ids else []
        if seq.num_completion_tokens < params.min_tokens:
            banned += [*params.stop_token_ids, *self.eos_token_ids]
        return banned

    def _sample(self, probs: paddle.Tensor, params, uniforms: paddle.Tensor) -> np.ndarray:
        """Inverse-CDF sampling: row i takes the first token whose cumulative probability passes u_i."""
        top_k = np.array([p.top_k for p in params])
        top_p = np.array([p.top_p for p in params], dtype=np.float32)
        min_p = np.array([p.min_p for p in params], dtype=np.float32)
        is_filtered = (top_k > 0) | (top_p < 1) | (min_p > 0)
        tokens = np.zeros(len(params), dtype=np.int64)
        if (~is_filtered).any():
            tokens = _inverse_cdf(probs, uniforms)
        if is_filtered.any():
            vocab_size = probs.shape[1]
            num_candidates = min(vocab_size, max(NUM_CANDIDATES, int(top_k.max())))
            cand_probs, cand_ids = paddle.topk(probs, num_candidates)
            keep = _keep_mask(cand_probs, top_k, top_p, min_p)
            if num_candidates < vocab_size and not _is_exact(keep, cand_probs, is_filtered):
                cand_probs, cand_ids = paddle.topk(probs, vocab_size)
                keep = _keep_mask(cand_probs, top_k, top_p, min_p)
            kept = cand_probs * keep.astype("float32")
            picked = _inverse_cdf(kept / kept.sum(axis=-1, keepdim=True), uniforms)
            filtered_tokens = paddle.take_along_axis(cand_ids, paddle.to_tensor(picked[:, None]), axis=1)
            tokens = np.where(is_filtered, filtered_tokens.numpy()[:, 0], tokens)
        return tokens


def _ban(logits: paddle.Tensor, banned_ids: list[list[int]]) -> paddle.Tensor:
    """Banned tokens get -inf, the whole batch in one scatter."""
    vocab_size = logits.shape[1]
    banned = [(i, t) for i, ids in enumerate(banned_ids) for t in ids if 0 <= t < vocab_size]
    if not banned:
        return logits
    rows, cols = zip(*banned, strict=True)
    index = paddle.to_tensor(np.array([rows, cols], dtype=np.int64).T)
    return paddle.scatter_nd_add(logits, index, paddle.full([len(rows)], -np.inf, dtype="float32"))


def _apply_allowed(
    logits: paddle.Tensor, banned: paddle.Tensor, allowed: np.ndarray, banned_ids: list[list[int]]
) -> paddle.Tensor:
    """Tokens outside each row's bitmask get -inf, the whole batch at once. The grammar wins: a row whose
    every allowed token is also banned (bad words, EOS before min_tokens) keeps its allowed tokens."""
    vocab_size = logits.shape[1]
    bits = np.unpackbits(allowed.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size].view(bool)
    is_empty = np.array([_bans_all(row, ids) for row, ids in zip(bits, banned_ids, strict=True)])
    if is_empty.any():
        banned = paddle.where(paddle.to_tensor(is_empty[:, None]), logits, banned)
    return paddle.where(paddle.to_tensor(bits), banned, paddle.to_tensor(-np.inf, dtype="float32"))


def _bans_all(allowed_row: np.ndarray, banned_ids: list[int]) -> bool:
    """Whether the bans leave none of the row's allowed tokens."""
    if not banned_ids:
        return False
    ids = np.unique([t for t in banned_ids if 0 <= t < len(allowed_row)]).astype(np.int64)
    return int(allowed_row[ids].sum()) == int(allowed_row.sum())


def _keep_mask(cand_probs: paddle.Tensor, top_k, top_p, min_p) -> paddle.Tensor:
    """Which of the (descending) candidates survive top_k, top_p and min_p; the first always does."""
    num_candidates = cand_probs.shape[1]
    ranks = paddle.arange(num_candidates).unsqueeze(0)
    k = np.where(top_k > 0, top_k, num_candidates)
    keep = ranks < paddle.to_tensor(k[:, None])
    mass_before = paddle.cumsum(cand_probs, axis=-1) - cand_probs
    keep = keep & (mass_before < paddle.to_tensor(top_p[:, None]))
    threshold = cand_probs[:, :1] * paddle.to_tensor(min_p[:, None])
    return keep & (cand_probs >= threshold)


def _is_exact(keep: paddle.Tensor, cand_probs: paddle.Tensor, is_filtered: np.ndarray) -> bool:
    """True when every filtered row dropped its last candidate, so nothing beyond the cut survives."""
    last_dropped = ~keep[:, -1].numpy()
    return bool(np.all(last_dropped | ~is_filtered))


def _inverse_cdf(probs: paddle.Tensor, uniforms: paddle.Tensor) -> np.ndarray:
    cdf = paddle.cumsum(probs, axis=-1)
    total = cdf[:, -1:]
    index = (cdf < uniforms.unsqueeze(1) * total).astype("int64").sum(axis=-1)
    return np.minimum(index.numpy(), probs.shape[1] - 1)


def _bad_word_ends(seq: Sequence) -> list[int]:
    """The last token of each bad word whose other tokens are the last ones generated (as vLLM does)."""
    ids, generated = seq.all_token_ids, seq.num_completion_tokens
    return [
        word[-1]
        for word in seq.params.bad_words_token_ids
        if len(word) - 1 <= generated and ids[len(ids) - len(word) + 1 :] == word[:-1]
    ]


def _in_vocab(token_ids: list[int], vocab_size: int) -> np.ndarray:
    ids = np.asarray(token_ids, dtype=np.int64)
    return ids[(ids >= 0) & (ids < vocab_size)]
