"""`LLM`: the engine's front for notebooks and the server (outside the engine package: it may download
a model, and the engine never writes files). Before any engine exists it finds the model
(a folder, or a hub id it may download: fdkit/hub.py) and plans its memory (fdkit/engine/memory.py:
a config that cannot fit is refused here, and the plan sizes the KV cache for every rank). It tokenizes
and validates requests, and drives an engine core built by `build_engine`: in this process (tp=1) or
over rank processes (tp>1), one API either way."""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from fdkit.checkpoint import CheckpointReader
from fdkit.config import FdkitConfig, load_config, to_config, to_overrides
from fdkit.engine.guided import GrammarChecker
from fdkit.engine.llm_engine import LLMEngine, RequestOutput, eos_token_ids, load_tokenizer
from fdkit.engine.memory import MemoryPlan, plan_memory
from fdkit.engine.rank_engine import RankEngine
from fdkit.engine.sequence import SamplingParams, Sequence
from fdkit.hub import resolve_model

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from fdkit.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
Prompt = str | list[int]


def build_engine(
    config: FdkitConfig, model_path: Path, tokenizer: Tokenizer, in_process: bool = True
) -> LLMEngine | RankEngine:
    """The engine core the config asks for; both kinds have the same API. tp > 1, several hosts, or
    `in_process=False` run it in rank processes (a server's event loop then never waits on a forward
    pass for the GIL)."""
    if config.tp > 1 or config.engine.nnodes > 1 or not in_process:
        return RankEngine(config, model_path)
    return LLMEngine(config, model_path, tokenizer)


class LLM:
    """ERNIE 4.5 from Python: `LLM(path)`, `LLM.from_config(["model=ernie"])`, then generate or chat."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        config: FdkitConfig | DictConfig | None = None,
        in_process: bool = True,
        **engine_overrides,
    ):
        config = to_config(config) if config is not None else _compose(model_path, engine_overrides)
        self.model_path, self.memory_plan = prepare_model(config)
        self.config = _planned_config(config, self.model_path, self.memory_plan)
        self.tokenizer = load_tokenizer(self.model_path)
        self.in_process = in_process
        self.engine = build_engine(self.config, self.model_path, self.tokenizer, in_process)
        self.max_model_len, self.vocab_size = self.engine.max_model_len, self.engine.vocab_size
        eos_ids = eos_token_ids(self.model_path, self.tokenizer)
        self.grammar_checker = GrammarChecker(self.tokenizer, self.vocab_size, eos_ids)
        self._request_counter = itertools.count()
        self._closed = False

    @classmethod
    def from_config(cls, overrides: list[str] | FdkitConfig | DictConfig | None = None) -> LLM:
        is_overrides = overrides is None or isinstance(overrides, list)
        return cls(config=load_config(overrides) if is_overrides else overrides)

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
        if params.guided_decoding is not None:
            self.grammar_checker.check(params.guided_decoding.grammar)
        seq = Sequence(token_ids, params, request_id)
        seq.prompt = prompt if isinstance(prompt, str) else None
        seq.max_tokens = min(params.max_tokens or self.max_model_len, self.max_model_len - len(token_ids))
        seed = params.seed
        if seed is None:  # unseeded requests still draw reproducibly from the engine's seed
            seed = np.random.SeedSequence(self.config.engine.seed, spawn_key=(next(self._request_counter),))
        seq.rng = np.random.default_rng(seed)
        return seq

    def _validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(token_ids) + params.min_tokens >= self.max_model_len:
            raise ValueError(
                f"Input text is too long, input_ids_len ({len(token_ids)}) + "
                f"min_tokens({params.min_tokens}) >= max_model_len({self.max_model_len})"
            )

    def add_sequence(self, seq: Sequence) -> str:
        return self.engine.add_sequence(seq)

    def abort(self, request_id: str) -> bool:
        """Ends a request and frees its blocks; False if it had already finished."""
        return self.engine.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()

    @property
    def stats(self) -> dict:
        """Requests running and waiting, and the fraction of KV blocks in use."""
        return self.engine.stats

    def step(self) -> list[RequestOutput]:
        """One engine step: the text so far of every request it advanced."""
        return self.engine.step()

    def check_health(self) -> None:
        """Raises EngineDeadError if the engine's processes have died."""
        self.engine.check_health()

    def restart_engine(self) -> None:
        """Replaces the engine core by a new one (its requests are dropped)."""
        with contextlib.suppress(Exception):
            self.engine.close()
        self.engine = build_engine(self.config, self.model_path, self.tokenizer, self.in_process)
        if self._closed:  # closed meanwhile (from another thread)
            self.engine.close()

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
        if not self._closed:
            self._closed = True
            self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prepare_model(config: FdkitConfig) -> tuple[Path, MemoryPlan]:
    """The model's local folder (found or downloaded) and its memory plan; PlanError if it cannot fit,
    raised from config.json alone, before any weight file is looked for or downloaded."""
    model = config.model
    check = lambda folder: plan_memory(config, folder)
    path = resolve_model(model.path, model.download, model.revision, before_weights=check)
    plan = plan_memory(config, path)
    logger.info("%s", plan.summary())
    CheckpointReader(path)  # the weight files are all there (headers only), else CheckpointError here
    return path, plan


def _planned_config(config: FdkitConfig, path: Path, plan: MemoryPlan) -> FdkitConfig:
    """A copy of `config` with the local folder and the plan's KV blocks: every rank (and a restarted
    engine) then uses the same number, not one measured again under another memory load."""
    planned = copy.deepcopy(config)
    planned.model.path = str(path)
    planned.engine.num_kv_blocks = plan.num_kv_blocks
    planned.engine.max_model_len = plan.max_model_len  # the model's may be lowered to what the KV cache holds
    return planned


def _compose(model_path: str | Path | None, engine_overrides: dict) -> FdkitConfig:
    overrides = to_overrides(engine_overrides, "engine")
    if model_path is not None:  # a folder of the user's
        overrides += ["model=ernie", f"model.path={model_path}", f"model.name={Path(model_path).name}"]
    return load_config(overrides)


def _is_token_list(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], int)
