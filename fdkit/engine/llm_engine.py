"""The engine: requests in, tokens out. Each step schedules a batch, runs the model, post-processes."""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from fdkit.config import load_config, resolve_path, to_overrides
from fdkit.engine.kv_cache import BlockManager
from fdkit.engine.scheduler import Scheduler, SchedulerConfig
from fdkit.engine.sequence import SamplingParams, Sequence

if TYPE_CHECKING:
    from fdkit.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
Prompt = str | list[int]


class EngineDeadError(RuntimeError):
    """The engine stopped (a failure, a dead rank, or shut down): no request can be served."""


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    finished: bool = False
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # per token: its own, top-k
    num_reasoning_tokens: int = 0
    metrics: dict = field(default_factory=dict)


class LLM:
    """ERNIE 4.5 in-process: `LLM(path)`, `LLM.from_config(["model=ernie"])`, then generate or chat."""

    def __new__(
        cls, model_path: str | Path | None = None, *, config: DictConfig | None = None, **engine_overrides
    ):
        if config is None:
            overrides = to_overrides(engine_overrides, "engine")
            if model_path is not None:  # a folder of the user's: never written to
                name = Path(model_path).name
                overrides += ["model=ernie", f"model.path={model_path}", f"model.name={name}"]
            config = load_config(overrides)
        if config.tp > 1 and cls is LLM:  # the same API, served by rank processes
            from fdkit.engine.tp_engine import TensorParallelLLM

            cls = TensorParallelLLM
        engine = super().__new__(cls)
        engine.config = config
        return engine

    def __init__(
        self, model_path: str | Path | None = None, *, config: DictConfig | None = None, **engine_overrides
    ):
        self._closed = False
        self._build(self.config)

    @classmethod
    def from_config(cls, overrides: list[str] | DictConfig | None = None) -> LLM:
        config = overrides if isinstance(overrides, DictConfig) else load_config(overrides)
        return cls(config=config)

    def _build(self, config: DictConfig, peers: list | None = None) -> None:
        from fdkit.engine.model_runner import ModelRunner
        from fdkit.engine.sampler import Sampler

        model_path = ensure_checkpoint(config.model)
        self.model_path = model_path
        self.runner = ModelRunner(config.engine, model_path, peers, world_size=config.tp)
        self.tokenizer = load_tokenizer(model_path)
        self.eos_token_ids = _eos_token_ids(model_path, self.tokenizer)
        self.sampler = Sampler(self.eos_token_ids)
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.model_config.vocab_size
        engine = config.engine
        max_num_batched_tokens = engine.max_num_batched_tokens or max(self.max_model_len, 2048)
        if max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"engine.max_num_batched_tokens ({max_num_batched_tokens}) must be at least "
                f"max_model_len ({self.max_model_len}): a prompt is prefilled in one step"
            )
        self.block_manager = BlockManager(self.runner.num_blocks, engine.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(engine.max_num_seqs, max_num_batched_tokens, self.max_model_len),
            self.block_manager,
        )
        self._request_counter = itertools.count()
        self.requests: dict[str, Sequence] = {}
        logger.info(
            "engine ready: %s, %d KV blocks of %d tokens",
            model_path,
            self.runner.num_blocks,
            engine.block_size,
        )

    # -- requests ---------------------------------------------------------------------------------

    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        return self.add_sequence(self.make_sequence(prompt, params, request_id))

    def make_sequence(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> Sequence:
        """Tokenizes and validates a request (ValueError if bad); changes no engine state."""
        params = params or SamplingParams()
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._validate_prompt(token_ids, params)
        seq = Sequence(token_ids, params, request_id)
        seq.prompt = prompt if isinstance(prompt, str) else None
        seq.max_tokens = min(params.max_tokens or self.max_model_len, self.max_model_len - len(token_ids))
        seed = params.seed
        if seed is None:  # unseeded requests still draw reproducibly from the engine's seed
            seed = np.random.SeedSequence(self.config.engine.seed, spawn_key=(next(self._request_counter),))
        seq.rng = np.random.default_rng(seed)
        return seq

    def add_sequence(self, seq: Sequence) -> str:
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        seq.decoder = self.tokenizer.decoder(seq.params.skip_special_tokens)
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq.request_id

    def _validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab_size = self.vocab_size
        if any(not 0 <= t < vocab_size for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
        if len(token_ids) + params.min_tokens >= self.max_model_len:
            raise ValueError(
                f"Input text is too long, input_ids_len ({len(token_ids)}) + "
                f"min_tokens({params.min_tokens}) >= max_model_len({self.max_model_len})"
            )

    def abort(self, request_id: str) -> bool:
        """Ends a request and frees its blocks; False if it had already finished."""
        seq = self.requests.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq, "abort")
        return seq is not None

    def has_unfinished_requests(self) -> bool:
        return not self.scheduler.is_finished()

    @property
    def stats(self) -> dict:
        """Requests running and waiting, and the fraction of KV blocks in use."""
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": self.block_manager.usage,
        }

    # -- the loop ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return []
        logits = self.runner.forward(seqs, is_prefill)
        sampled = self.sampler(logits, seqs)
        token_ids = [self._end_reasoning_if_due(seq, t) for seq, t in zip(seqs, sampled, strict=True)]
        if any(seq.params.logprobs is not None for seq in seqs):
            for seq, logprobs in zip(seqs, self.sampler.logprobs(logits, token_ids, seqs), strict=True):
                if logprobs is not None:
                    seq.logprobs.append(logprobs)
        return [self._postprocess(seq, token_id) for seq, token_id in zip(seqs, token_ids, strict=True)]

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

    def _postprocess(self, seq: Sequence, token_id: int) -> RequestOutput:
        seq.append_token(token_id)
        if seq.first_token_time is None:
            seq.first_token_time = time.time()
        previous_len = len(seq.text)
        seq.text += seq.decoder.step(token_id)
        reason = self._check_stop(seq, token_id, previous_len)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.requests.pop(seq.request_id, None)
        return self._output(seq)

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

    def _output(self, seq: Sequence) -> RequestOutput:
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
            },
        )

    # -- convenience --------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        prompts = [prompts] if isinstance(prompts, str) or _is_token_list(prompts) else list(prompts)
        if not isinstance(sampling_params, Seq):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        request_ids = [self.add_request(p, sp) for p, sp in zip(prompts, sampling_params, strict=True)]
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(prompts), desc="Generating", disable=not use_tqdm) as bar:
            while len(results) < len(request_ids):
                for output in self.step():
                    if output.finished:
                        results[output.request_id] = output
                        bar.update(1)
        return [results[rid] for rid in request_ids]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        enable_thinking: bool | None = None,
        use_tqdm: bool = True,
        **template_kwargs,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        if enable_thinking is not None:
            template_kwargs["enable_thinking"] = enable_thinking
        prompts = [
            self.tokenizer.apply_chat_template(c, add_generation_prompt=True, **template_kwargs)
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for request_id in list(self.requests):
            self.abort(request_id)
        self.runner = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ensure_checkpoint(model_cfg: DictConfig) -> Path:
    """The checkpoint folder; a `tiny_preset` model is written there on first use."""
    path = resolve_path(model_cfg.path)
    if not path.exists() and model_cfg.get("tiny_preset"):
        from fdkit.tiny import write_checkpoint

        logger.info("writing the %s checkpoint to %s", model_cfg.tiny_preset, path)
        write_checkpoint(path, model_cfg.tiny_preset, model_cfg.tiny_layout, model_cfg.tiny_seed)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model folder not found: {path} (set model.path=... to an ERNIE 4.5 checkpoint)"
        )
    return path


def _eos_token_ids(model_path: Path, tokenizer) -> list[int]:
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


def _is_token_list(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], int)


def _num_written(token_ids: list[int], end_ids: list[int]) -> int:
    """How many leading tokens of `end_ids` the tail of `token_ids` holds (its longest such tail)."""
    for size in range(min(len(end_ids), len(token_ids)), 0, -1):
        if token_ids[-size:] == end_ids[:size]:
            return size
    return 0


def load_tokenizer(model_path: Path) -> Tokenizer:
    from fdkit.models import model_module
    from fdkit.tokenizer import Tokenizer

    module = model_module(json.loads((model_path / "config.json").read_text()))
    return Tokenizer(model_path, getattr(module, "DEFAULT_CHAT_TEMPLATE", None))
