"""How many prompt tokens a step may carry while decodes run, so that the streams are not stalled: a
step with prompt chunks should take at most `max_stall` times a decode-only step. The engine times its
steps and reports them here; the budget adapts multiplicatively from the measured mixed steps, which
follows the attention cost as a prompt's context grows. Pure arithmetic; the engine owns the clock."""

from __future__ import annotations

INITIAL_TOKENS = 32  # the first budget, before any mixed step has been timed
MAX_GROWTH = 2.0  # the budget changes at most by this factor per step (either way)
DECODE_SMOOTHING = 0.2  # weight of the newest decode-only step in the running estimate
MAX_ESTIMATE_AGE = 64  # steps after which a decode-only step times that many decodes again


class PrefillBudget:
    """Decode-only step times are kept per number of decodes (powers of 2): under a steady load every
    step is mixed, and a lone estimate from a step of 1 decode made a step of 32 decodes look like a
    prompt's stall (the budget fell to 8 tokens and halved served throughput at concurrency 32)."""

    def __init__(self, max_stall: float, max_num_batched_tokens: int, initial: int = INITIAL_TOKENS):
        self.max_stall = max_stall
        self.max_num_batched_tokens = max_num_batched_tokens
        self._decode_s: dict[int, tuple[float, int]] = {}  # decodes (bucket) -> (seconds, step timed)
        self._num_steps = 0
        self._num_tokens = max(1, min(initial, max_num_batched_tokens))

    def max_prompt_tokens(self, num_decodes: int) -> int:
        """The cap on prompt tokens in a step that has `num_decodes` decodes: 0 until a decode-only step
        of about that many has been timed in the last MAX_ESTIMATE_AGE steps (so the next one is)."""
        return 0 if self.decode_s(num_decodes) is None else self._num_tokens

    def decode_s(self, num_decodes: int) -> float | None:
        """The estimated time of a decode-only step of `num_decodes`, if recent."""
        estimate = self._decode_s.get(_bucket(num_decodes))
        if estimate is None or self._num_steps - estimate[1] > MAX_ESTIMATE_AGE:
            return None
        return estimate[0]

    def observe(self, num_decodes: int, num_prompt_tokens: int, seconds: float, num_uncapped: int = 0):
        """A step's composition and duration: its capped prompt tokens, and those of short prompts that
        were not capped. Steps without decodes, or with uncapped prompts, teach nothing."""
        self._num_steps += 1
        if not num_decodes or num_uncapped:
            return
        decode_s = self.decode_s(num_decodes)
        if not num_prompt_tokens:
            old = seconds if decode_s is None else decode_s
            self._decode_s[_bucket(num_decodes)] = (old + DECODE_SMOOTHING * (seconds - old), self._num_steps)
        elif decode_s is not None:
            self._adapt(num_prompt_tokens, seconds, decode_s)

    def _adapt(self, num_prompt_tokens: int, seconds: float, decode_s: float) -> None:
        """Scales the prompt tokens that ran by allowed extra time / measured extra time (clamped)."""
        allowed = (self.max_stall - 1.0) * decode_s
        extra = seconds - decode_s
        factor = MAX_GROWTH if extra <= 0 else allowed / extra
        factor = min(MAX_GROWTH, max(1.0 / MAX_GROWTH, factor))
        num_tokens = round(num_prompt_tokens * factor)
        if factor >= 1.0:  # a short last chunk under the target does not shrink the budget
            num_tokens = max(num_tokens, self._num_tokens)
        self._num_tokens = max(1, min(num_tokens, self.max_num_batched_tokens))


def _bucket(num_decodes: int) -> int:
    return 1 << (num_decodes - 1).bit_length()
