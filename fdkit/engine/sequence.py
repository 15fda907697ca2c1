"""A request's state as the engine sees it, and the sampling parameters it carries."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from enum import Enum, auto


@dataclass(frozen=True)
class GuidedDecoding:
    """A constraint on the output: llguidance's grammar text (fdkit/engine/guided.py), from the start of
    the completion or, with `after_reasoning`, from the end of reasoning (`reasoning_end_token_ids`)."""

    grammar: str
    after_reasoning: bool = False


@dataclass
class SamplingParams:
    """Per-request sampling, with OpenAI / FastDeploy / vLLM semantics.

    temperature 0 means greedy; top_k 0 or -1 means off; max_tokens None means "up to max_model_len".
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely
    # After this many tokens of reasoning the engine writes `reasoning_end_token_ids` itself.
    reasoning_max_tokens: int | None = None
    reasoning_end_token_ids: list[int] = field(default_factory=list)
    # Banned words as token ids: a word's last token is banned when the rest were the last tokens generated.
    # Flat ids (FastDeploy's form) are one-token words.
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    guided_decoding: GuidedDecoding | None = None  # structured output / forced tool calls

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        self.bad_words_token_ids = [w if isinstance(w, list) else [w] for w in self.bad_words_token_ids]
        if self.top_k == -1:
            self.top_k = 0
        for problem in self._problems():
            raise ValueError(problem)

    def _problems(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            yield f"temperature must be a finite number >= 0, got {self.temperature}"
        if not 0 < self.top_p <= 1:
            yield f"top_p must be in (0, 1], got {self.top_p}"
        if self.top_k < 0:
            yield f"top_k must be -1, 0 (off) or a positive number, got {self.top_k}"
        if not 0 <= self.min_p <= 1:
            yield f"min_p must be in [0, 1], got {self.min_p}"
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                yield f"{name} must be in [-2, 2], got {getattr(self, name)}"
        if not self.repetition_penalty > 0:
            yield f"repetition_penalty must be > 0, got {self.repetition_penalty}"
        if self.max_tokens is not None and self.max_tokens < 1:
            yield f"max_tokens must be at least 1, got {self.max_tokens}"
        if self.min_tokens < 0:
            yield f"min_tokens must be >= 0, got {self.min_tokens}"
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            yield f"logprobs must be in [0, 20], got {self.logprobs}"
        if self.reasoning_max_tokens is not None and self.reasoning_max_tokens < 1:
            yield f"reasoning_max_tokens must be at least 1, got {self.reasoning_max_tokens}"
        if not all(word and all(t >= 0 for t in word) for word in self.bad_words_token_ids):
            yield "bad_words_token_ids must be non-empty lists of token ids >= 0"
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            yield f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    _ids = itertools.count()

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None):
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.status = SequenceStatus.WAITING
        self.all_token_ids = list(prompt_token_ids)  # the prompt, then the completion so far
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose KV is in the cache (a prompt is prefilled in chunks)
        self.block_hashes: list[bytes] = []  # content hashes of the full blocks, as a chain (prefix cache)
        self.num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache on admission
        self.arrival_time = time.time()
        self.first_token_time: float | None = None
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        # Filled by the engine: the random generator, the detokenizer and the text so far.
        self.rng = None
        self.decoder = None
        self.text = ""
        self.max_tokens = params.max_tokens
        self.prompt: str | None = None
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.is_reasoning = params.reasoning_max_tokens is not None and bool(params.reasoning_end_token_ids)
        self.num_reasoning_tokens = 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.all_token_ids[: self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
