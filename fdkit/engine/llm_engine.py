"""The engine core: prepared sequences in, outputs out. Each step schedules a batch, runs the model,
post-processes (reasoning budget, detokenization, stop conditions)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fdkit.engine.kv_cache import BlockManager
from fdkit.engine.prefill_budget import PrefillBudget
from fdkit.engine.scheduler import Scheduler, SchedulerConfig
from fdkit.engine.sequence import Sequence

if TYPE_CHECKING:
    from fdkit.config import FdkitConfig
    from fdkit.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048  # tokens per step when engine.max_num_batched_tokens is null


class EngineDeadError(RuntimeError):
    """The engine stopped (a failure, a dead rank, or shut down): no request can be served."""


class RequestFailedError(EngineDeadError):
    """Some requests failed in the engine, which serves on. A subclass of EngineDeadError so that
    whoever ends a stream on the engine's death ends these too; the message is safe to show clients."""

    def __init__(self, request_ids: list[str], message: str = "the engine failed to process the request"):
        super().__init__(message)
        self.request_ids = request_ids


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]  # the completion's
    finish_reason: str | None = None
    finished: bool = False
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # per token: its own, top-k
    num_reasoning_tokens: int = 0
    metrics: dict = field(default_factory=dict)


class LLMEngine:
    """The in-process engine: scheduler, KV bookkeeping, model runner and sampler of one process.
    With `peers` (rank 0 of a tensor-parallel group) each forward pass also runs on the other ranks."""

    def __init__(
        self, config: FdkitConfig, model_path: Path, tokenizer: Tokenizer, peers: list | None = None
    ):
        from fdkit.engine.guided import GuidedDecoder
        from fdkit.engine.model_runner import ModelRunner
        from fdkit.engine.sampler import Sampler

        self.tokenizer = tokenizer
        self.runner = ModelRunner(config.engine, model_path, peers, world_size=config.tp)
        self.eos_token_ids = eos_token_ids(model_path, tokenizer)
        self.sampler = Sampler(self.eos_token_ids, self.runner.fused_ops and self.runner.fused_ops.argmax)
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.model_config.vocab_size
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.engine.block_size, config.engine.enable_prefix_caching
        )
        self.scheduler = Scheduler(self._scheduler_config(config), self.block_manager)
        max_stall = config.engine.max_decode_stall
        max_tokens = self.scheduler.config.max_num_batched_tokens
        self.prefill_budget = PrefillBudget(max_stall, max_tokens) if max_stall else None
        cache_size = config.engine.grammar_cache_size
        self.guided = GuidedDecoder(tokenizer, self.vocab_size, self.eos_token_ids, cache_size)
        self.requests: dict[str, Sequence] = {}
        logger.info(
            "engine ready: %s, %d KV blocks of %d tokens",
            model_path,
            self.runner.num_blocks,
            config.engine.block_size,
        )

    def _scheduler_config(self, config: FdkitConfig) -> SchedulerConfig:
        max_num_batched_tokens = config.engine.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS
        return SchedulerConfig(
            config.engine.max_num_seqs,
            max_num_batched_tokens,
            self.max_model_len,
            config.engine.short_prompt_tokens,
        )

    # -- requests ---------------------------------------------------------------------------------

    def add_sequence(self, seq: Sequence) -> str:
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        self.guided.add(seq)  # ValueError if its grammar does not compile (the API process checked it)
        seq.decoder = self.tokenizer.decoder(seq.params.skip_special_tokens)
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq.request_id

    def abort(self, request_id: str) -> bool:
        """Ends a request and frees its blocks; False if it had already finished."""
        seq = self.requests.pop(request_id, None)
        self.guided.release(request_id)
        if seq is not None:
            self.scheduler.finish(seq, "abort")
        return seq is not None

    def has_unfinished_requests(self) -> bool:
        return not self.scheduler.is_finished()

    @property
    def stats(self) -> dict:
        """Requests running and waiting, the fraction of KV blocks in use, and the prompt tokens looked up
        in the prefix cache and found there (counters)."""
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": self.block_manager.usage,
            "prefix_cache_queries": self.block_manager.num_queried_tokens,
            "prefix_cache_hits": self.block_manager.num_hit_tokens,
            "num_guided_matchers": self.guided.num_matchers,
        }

    def check_health(self) -> None:
        """Nothing to watch in this process (a `RankEngine` raises EngineDeadError here)."""

    def close(self) -> None:
        for request_id in list(self.requests):
            self.abort(request_id)
        self.runner = None

    # -- the loop ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Outputs of the requests the step advanced. If it fails, those requests are aborted and
        RequestFailedError names them; the engine serves on. Timed, to cap prompt chunks next to decodes."""
        budget = self.prefill_budget
        cap = budget.max_prompt_tokens(self.scheduler.num_decoding) if budget else None
        batch = self.scheduler.schedule(cap)
        if not batch.seqs:
            return []
        start = time.perf_counter()
        outputs = self._run(batch)
        if budget is not None:
            seconds, num_capped = time.perf_counter() - start, batch.num_capped_tokens
            budget.observe(batch.num_decodes, num_capped, seconds, batch.num_prompt_tokens - num_capped)
        return outputs

    def _run(self, batch) -> list[RequestOutput]:
        try:
            logits = self.runner.forward(batch.seqs, batch.num_new_tokens)
        except Exception as exc:
            if self.runner.peers:  # the other ranks may be left inside a collective: not recoverable
                raise
            raise self._fail_batch(self._failing(batch), exc) from exc
        rows = [i for i, is_ready in enumerate(self.scheduler.update(batch)) if is_ready]
        seqs = [batch.seqs[i] for i in rows]  # the others are part-way through their prompt
        if not seqs:
            return []
        try:
            return self._sample(seqs, logits if len(rows) == len(batch.seqs) else logits[rows])
        except Exception as exc:
            raise self._fail_batch(seqs, exc) from exc

    def _sample(self, seqs: list[Sequence], logits) -> list[RequestOutput]:
        sampled = self.sampler(logits, seqs, self.guided.bitmask(seqs))
        token_ids = [self._end_reasoning_if_due(seq, t) for seq, t in zip(seqs, sampled, strict=True)]
        if any(seq.params.logprobs is not None for seq in seqs):
            for seq, logprobs in zip(seqs, self.sampler.logprobs(logits, token_ids, seqs), strict=True):
                if logprobs is not None:
                    seq.logprobs.append(logprobs)
        ends = [self.guided.accept(seq, token_id) for seq, token_id in zip(seqs, token_ids, strict=True)]
        return [self._postprocess(*args) for args in zip(seqs, token_ids, ends, strict=True)]

    def _failing(self, batch) -> list[Sequence]:
        """The sequences of a failed step that fail alone too (all, if none does): the others' steps
        are recomputed in the next one, the KV they wrote meanwhile being the same."""
        if len(batch.seqs) == 1:
            return batch.seqs
        failing = []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            try:
                self.runner.forward([seq], [num_new])
            except Exception:
                failing.append(seq)
        return failing or batch.seqs

    def _fail_batch(self, seqs: list[Sequence], exc: Exception) -> RequestFailedError:
        request_ids = [seq.request_id for seq in seqs]
        logger.error("a step failed; failing requests %s", request_ids, exc_info=exc)
        for request_id in request_ids:
            self.abort(request_id)
        return RequestFailedError(request_ids)

    def _end_reasoning_if_due(self, seq: Sequence, token_id: int) -> int:
        """Past reasoning_max_tokens the engine writes the end-of-reasoning tokens itself."""
        if not seq.is_reasoning:
            return token_id
        end_ids = seq.params.reasoning_end_token_ids
        num_written = _num_written(seq.completion_token_ids, end_ids)
        if num_written or seq.num_reasoning_tokens >= seq.params.reasoning_max_tokens:
            token_id = end_ids[num_written]
        if _num_written([*seq.completion_token_ids, token_id], end_ids) == len(end_ids):
            seq.is_reasoning = False
        elif not num_written:
            seq.num_reasoning_tokens += 1
        return token_id

    def _postprocess(self, seq: Sequence, token_id: int, guided_end: str | None = None) -> RequestOutput:
        seq.append_token(token_id)
        if seq.first_token_time is None:
            seq.first_token_time = time.time()
        previous_len = len(seq.text)
        seq.text += seq.decoder.step(token_id)
        reason = self._check_stop(seq, token_id, previous_len) or guided_end  # a grammar's end ends it
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.requests.pop(seq.request_id, None)
            self.guided.release(seq.request_id)
        return _output(seq)

    def _check_stop(self, seq: Sequence, token_id: int, previous_len: int) -> str | None:
        params = seq.params
        can_stop = seq.num_completion_tokens >= params.min_tokens
        is_eos = token_id in self.eos_token_ids and not params.ignore_eos
        if can_stop and (is_eos or token_id in params.stop_token_ids):
            if params.include_stop_str_in_output:
                seq.text += self.tokenizer.decode([token_id], skip_special_tokens=False)
            return "stop"
        if can_stop and params.stop and _cut_at_stop(seq, previous_len):
            return "stop"
        if seq.num_completion_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None


def _output(seq: Sequence) -> RequestOutput:
    text = seq.text
    if not seq.is_finished and seq.params.stop and not seq.params.include_stop_str_in_output:
        hold = max(len(s) for s in seq.params.stop) - 1  # a stop string may be arriving
        text = text[: max(0, len(text) - hold)]
    return RequestOutput(
        request_id=seq.request_id,
        prompt=seq.prompt,
        prompt_token_ids=seq.prompt_token_ids,
        text=text,
        token_ids=seq.completion_token_ids,
        finish_reason=seq.finish_reason,
        finished=seq.is_finished,
        logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
        num_reasoning_tokens=seq.num_reasoning_tokens,
        metrics={
            "arrival_time": seq.arrival_time,
            "first_token_time": seq.first_token_time,
            "num_preemptions": seq.num_preemptions,
            "num_cached_tokens": seq.num_cached_tokens or 0,
        },
    )


def load_tokenizer(model_path: Path) -> Tokenizer:
    from fdkit.checkpoint import read_config
    from fdkit.models import model_module
    from fdkit.tokenizer import Tokenizer

    module = model_module(read_config(model_path))
    return Tokenizer(model_path, getattr(module, "DEFAULT_CHAT_TEMPLATE", None))


def eos_token_ids(model_path: Path, tokenizer: Tokenizer) -> list[int]:
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        file = model_path / name
        value = json.loads(file.read_text()).get("eos_token_id") if file.is_file() else None
        ids += value if isinstance(value, list) else [value] if value is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def _cut_at_stop(seq: Sequence, previous_len: int) -> bool:
    """Ends the text at the first stop string that the newest delta completed."""
    params = seq.params
    start = max(0, previous_len - max(len(s) for s in params.stop) + 1)
    hits = [(seq.text.find(s, start), s) for s in params.stop]
    hits = [(i, s) for i, s in hits if i >= 0]
    if not hits:
        return False
    index, stop = min(hits)
    seq.text = seq.text[: index + len(stop)] if params.include_stop_str_in_output else seq.text[:index]
    return True


def _num_written(token_ids: list[int], end_ids: list[int]) -> int:
    """How many leading tokens of `end_ids` the tail of `token_ids` holds (its longest such tail)."""
    for size in range(min(len(end_ids), len(token_ids)), 0, -1):
        if token_ids[-size:] == end_ids[:size]:
            return size
    return 0
