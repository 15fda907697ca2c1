"""How many prompt tokens a step may carry while decodes run, so that the streams are not stalled: a
step with prompt chunks should take at most `max_stall` times a decode-only step. The engine times its
steps and reports them here; the budget adapts multiplicatively from the measured mixed steps, which
follows the attention cost as a prompt's context grows. Pure arithmetic; the engine owns the clock."""

from __future__ import annotations

INITIAL_TOKENS = 32  # the first budget, before any mixed step has been timed
MAX_GROWTH = 2.0  # the budget changes at most by this factor per step (either way)
DECODE_SMOOTHING = 0.2  # weight of the newest decode-only step in the running estimate


class PrefillBudget:
    def __init__(self, max_stall: float, max_num_batched_tokens: int, initial: int = INITIAL_TOKENS):
        self.max_stall = max_stall
        self.max_num_batched_tokens = max_num_batched_tokens
        self.decode_s: float | None = None  # the estimated time of a decode-only step
        self._num_tokens = max(1, min(initial, max_num_batched_tokens))

    @property
    def max_prompt_tokens(self) -> int:
        """The cap on prompt tokens in a step that has decodes: none until a decode-only step is timed."""
        return 0 if self.decode_s is None else self._num_tokens

    def observe(self, num_decodes: int, num_prompt_tokens: int, seconds: float) -> None:
        """A step's composition and duration. Steps without decodes are not capped and teach nothing."""
        if not num_decodes:
            return
        if not num_prompt_tokens:
            old = self.decode_s if self.decode_s is not None else seconds
            self.decode_s = old + DECODE_SMOOTHING * (seconds - old)
        elif self.decode_s is not None:
            self._adapt(num_prompt_tokens, seconds)

    def _adapt(self, num_prompt_tokens: int, seconds: float) -> None:
        """Scales the prompt tokens that ran by allowed extra time / measured extra time (clamped)."""
        allowed = (self.max_stall - 1.0) * self.decode_s
        extra = seconds - self.decode_s
        factor = MAX_GROWTH if extra <= 0 else allowed / extra
        factor = min(MAX_GROWTH, max(1.0 / MAX_GROWTH, factor))
        num_tokens = round(num_prompt_tokens * factor)
        if factor >= 1.0:  # a short last chunk under the target does not shrink the budget
            num_tokens = max(num_tokens, self._num_tokens)
        self._num_tokens = max(1, min(num_tokens, self.max_num_batched_tokens))
