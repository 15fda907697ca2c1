"""Chat and text completions: request -> sampling parameters -> engine -> an OpenAI response object, or an
async iterator of server-sent events when the request streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

from jinja2.exceptions import TemplateError

from fdkit.engine.async_engine import AsyncLLM, EngineDeadError
from fdkit.engine.sequence import GuidedDecoding, SamplingParams, Sequence
from fdkit.serving import protocol as P
from fdkit.serving.errors import APIError, client_message, engine_unavailable, from_engine_error
from fdkit.serving.guided import guided_decoding
from fdkit.serving.reasoning import ReasoningParser, get_parser
from fdkit.serving.shapes import ChatShape, CompletionShape, Shape
from fdkit.serving.streams import EventStream, collect, event_stream
from fdkit.serving.tool_parsers import ToolParser, get_tool_parser

logger = logging.getLogger(__name__)
GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")
# What a request may leave out, with OpenAI's defaults (used when neither server nor model sets one).
OPENAI_DEFAULTS = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
}


class RequestIds:
    """Ids in use: a response's, and its engine requests' (a client's `request_id` must not clash)."""

    def __init__(self):
        self.in_use: set[tuple[str, str]] = set()

    def reserve(self, request_id: str, seq_ids: list[str]) -> Callable[[], None]:
        """Takes the ids (400 if any is in use) and returns what gives them back."""
        keys = {("response", request_id), *(("engine", s) for s in seq_ids)}
        if keys & self.in_use:
            message = f"request_id {request_id!r} is already in use by a running request"
            raise APIError(400, message, "request_id", "duplicate_request_id")
        self.in_use |= keys
        return lambda: self.in_use.difference_update(keys)


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, cfg):
        self.engine, self.cfg = engine, cfg
        self.ids = RequestIds()
        self.tokenizer = engine.llm.tokenizer
        self.model_name = cfg.server.served_model_name or cfg.model.name
        self.parser: ReasoningParser | None = get_parser(cfg.server.reasoning_parser)
        self.reasoning_end_ids = self.tokenizer.encode(self.parser.end_token) if self.parser else []
        self.tool_parser: ToolParser | None = get_tool_parser(getattr(cfg.model, "tool_parser", None))
        path = engine.llm.model_path / "generation_config.json"
        generation = json.loads(path.read_text()) if path.is_file() else {}
        self.model_defaults = {k: generation[k] for k in GENERATION_CONFIG_KEYS if k in generation}

    # -- parameters -----------------------------------------------------------------------------

    def _pick(self, name: str, value):
        """The request's value, else the server's default, else the model's, else OpenAI's."""
        for candidate in (value, getattr(self.cfg.sampling, name, None), self.model_defaults.get(name)):
            if candidate is not None:
                return candidate
        return OPENAI_DEFAULTS[name]

    def _check_stop(self, stop: list[str]) -> None:
        server = self.cfg.server
        if len(stop) > server.max_stop_strings:
            raise APIError(400, f"at most {server.max_stop_strings} stop strings are allowed", "stop")
        if any(len(s) > server.max_stop_string_len for s in stop):
            message = f"stop strings may have at most {server.max_stop_string_len} characters"
            raise APIError(400, message, "stop")

    def sampling_params(
        self,
        req: P.SamplingFields,
        *,
        max_tokens,
        min_tokens,
        logprobs,
        reasoning_max_tokens,
        guided: GuidedDecoding | None = None,
    ) -> list[SamplingParams]:
        """One set per choice; choice i draws with seed + i."""
        self._check_stop(req.stop)
        cap = self.cfg.sampling.max_tokens
        if cap is not None:
            max_tokens = min(max_tokens or cap, cap)
        fields = {name: self._pick(name, getattr(req, name)) for name in OPENAI_DEFAULTS}
        fields["top_p"] = max(fields["top_p"], 1e-6)  # top_p=0 is FastDeploy's greedy idiom
        end_ids = self.reasoning_end_ids
        fields.update(
            max_tokens=max_tokens,
            min_tokens=min_tokens if min_tokens is not None else self.cfg.sampling.min_tokens,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids or [],
            include_stop_str_in_output=req.include_stop_str_in_output,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            reasoning_max_tokens=reasoning_max_tokens if end_ids else None,
            reasoning_end_token_ids=end_ids,
            bad_words_token_ids=self._bad_words(req),
            guided_decoding=guided,
        )
        seed = req.seed if req.seed is not None else self.cfg.sampling.seed
        try:
            return [SamplingParams(**fields, seed=None if seed is None else seed + i) for i in range(req.n)]
        except ValueError as exc:
            raise from_engine_error(exc) from exc

    def _bad_words(self, req: P.SamplingFields) -> list:
        """FastDeploy's flat ids, vLLM's id lists and `bad_words` tokenized; ids checked against the vocab."""
        words = [w if isinstance(w, list) else [w] for w in req.bad_words_token_ids or []]
        self.check_token_ids([t for word in words for t in word], "bad_words_token_ids")
        return words + self.tokenizer.bad_words_ids(req.bad_words or [])

    async def guided(self, req: P.SamplingFields, after_reasoning: bool) -> GuidedDecoding | None:
        """The request's output constraint, checked by the grammar engine off the event loop."""
        check = self.engine.llm.grammar_checker.check
        loop = asyncio.get_running_loop()
        build = lambda: guided_decoding(req, check, after_reasoning, self.tool_parser)
        return await loop.run_in_executor(None, build)

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab_size = self.engine.llm.vocab_size
        if any(not 0 <= t < vocab_size for t in ids):
            raise APIError(400, f"{param}: token ids must be in [0, {vocab_size})", param, "invalid_value")

    def log_request(self, req: P.SamplingFields) -> None:
        """The client's `user`, and what the request set that fdkit accepts but does not act on."""
        if req.user is not None:
            logger.info("request %s: user %r", req.request_id, req.user)
        ignored = ["suffix"] if getattr(req, "suffix", None) is not None else []
        if any(m.name for m in getattr(req, "messages", None) or []):
            ignored.append("messages[].name")
        if ignored:
            logger.info("request %s: accepted but not honoured: %s", req.request_id, ", ".join(ignored))

    async def prepare(self, prompt, params: list[SamplingParams], request_id: str) -> list[Sequence]:
        """Tokenized and validated sequences: nothing reaches the engine before all are ready."""
        try:
            return [await self.engine.prepare(prompt, p, f"{request_id}-{i}") for i, p in enumerate(params)]
        except ValueError as exc:
            raise from_engine_error(exc) from exc
        except EngineDeadError as exc:
            raise engine_unavailable(request_id) from exc

    # -- endpoints ------------------------------------------------------------------------------

    async def chat(self, req: P.ChatCompletionRequest) -> P.ChatCompletionResponse | EventStream:
        self.log_request(req)
        prompt, thinking = await asyncio.get_running_loop().run_in_executor(None, self.chat_prompt, req)
        guided = await self.guided(req, after_reasoning=thinking and bool(self.reasoning_end_ids))
        params = self.sampling_params(req, **self._chat_limits(req, thinking), guided=guided)
        request_id = req.request_id or P.random_id("chatcmpl")
        release = self.ids.reserve(request_id, [f"{request_id}-{i}" for i in range(req.n)])
        try:
            seqs = await self.prepare(prompt, params, request_id)
            tools = self.tools_for(req)
            parser = get_parser(self.cfg.server.reasoning_parser, tools is not None) if thinking else None
            shape = ChatShape(
                self.tokenizer, self.model_name, request_id, req, parser, self.reasoning_end_ids, tools
            )
            return await self._generate(req, shape, [seqs], release)
        except BaseException:
            release()
            raise

    def tools_for(self, req: P.ChatCompletionRequest) -> ToolParser | None:
        """The tool parser, if the request offers tools and lets the model call them."""
        return self.tool_parser if req.tools and req.tool_choice != "none" else None

    def chat_prompt(self, req: P.ChatCompletionRequest) -> tuple[str | list[int], bool]:
        """The prompt (rendered, or as the request gave it), and whether the model thinks first."""
        kwargs, thinking = self.template_kwargs(req.chat_template_kwargs, req.metadata)
        if req.prompt_token_ids is not None:
            self.check_token_ids(req.prompt_token_ids, "prompt_token_ids")
            return req.prompt_token_ids, thinking
        if req.disable_chat_template:  # FastDeploy: the messages' text is the raw prompt
            return "".join(m.text() for m in req.messages or []), thinking
        if req.tools:
            kwargs["tools"] = [tool.model_dump(exclude_none=True) for tool in req.tools]
        return self.render(req.messages or [], kwargs, req.chat_template), thinking

    def template_kwargs(self, kwargs: P.ChatTemplateKwargs | None, metadata: P.ChatMetadata | None):
        """The chat template's variables, with `enable_thinking` settled, and whether the model thinks."""
        variables = kwargs.model_dump(exclude_none=True) if kwargs else {}
        thinking = variables.get("enable_thinking", metadata.enable_thinking if metadata else None)
        variables["enable_thinking"] = thinking = thinking is not False or self.cfg.model.always_thinks
        return variables, thinking

    def render(
        self, messages: list[P.ChatMessage], kwargs: dict, template: str | None, add_generation_prompt=True
    ) -> str:
        """The messages through the chat template (the request's own, if it sent one): a 400 if it fails."""
        if template is not None and not self.cfg.server.allow_request_chat_template:
            message = "a per-request chat_template is off on this server (server.allow_request_chat_template)"
            raise APIError(400, message, "chat_template")
        dicts = [message_dict(m) for m in messages]
        try:
            return self.tokenizer.apply_chat_template(dicts, add_generation_prompt, template, **kwargs)
        except (TemplateError, ValueError, TypeError, ArithmeticError, LookupError, RecursionError) as exc:
            param = "chat_template" if template else "messages"
            message = f"messages could not be rendered with the chat template: {client_message(str(exc))}"
            raise APIError(400, message, param) from exc

    def _chat_limits(self, req: P.ChatCompletionRequest, thinking: bool) -> dict:
        """Chat's token limits; `metadata` may carry some of them (FastDeploy's convention)."""
        metadata = req.metadata or P.ChatMetadata()
        budget = (
            req.reasoning_max_tokens
            or metadata.reasoning_max_tokens
            or self.cfg.sampling.reasoning_max_tokens
        )
        return dict(
            max_tokens=req.max_completion_tokens or req.max_tokens,
            min_tokens=req.min_tokens if req.min_tokens is not None else metadata.min_tokens,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            reasoning_max_tokens=budget if thinking else None,
        )

    async def completion(self, req: P.CompletionRequest) -> P.CompletionResponse | EventStream:
        self.log_request(req)
        prompts = self._completion_prompts(req)
        limit = self.cfg.server.max_prompts_per_request
        if len(prompts) > limit:
            raise APIError(400, f"at most {limit} prompts per request are allowed", "prompt")
        if req.stream and len(prompts) > 1:
            raise APIError(400, "streaming supports a single prompt", "prompt")
        request_id = req.request_id or P.random_id("cmpl")
        params = self.sampling_params(
            req,
            max_tokens=req.max_tokens,
            min_tokens=req.min_tokens,
            logprobs=req.logprobs,
            reasoning_max_tokens=None,
            guided=await self.guided(req, after_reasoning=False),
        )
        seq_ids = [f"{request_id}-{k}-{i}" for k in range(len(prompts)) for i in range(req.n)]
        release = self.ids.reserve(request_id, seq_ids)
        try:
            seqs_per_prompt = [
                await self.prepare(p, params, f"{request_id}-{k}") for k, p in enumerate(prompts)
            ]
            shape = CompletionShape(self.tokenizer, self.model_name, request_id, req)
            return await self._generate(req, shape, seqs_per_prompt, release)
        except BaseException:
            release()
            raise

    def _completion_prompts(self, req: P.CompletionRequest) -> list:
        if req.prompt_token_ids is None:
            return completion_prompts(req.prompt)
        prompts = completion_prompts(req.prompt_token_ids)
        self.check_token_ids([t for p in prompts for t in p], "prompt_token_ids")
        return prompts

    async def tokenize(self, req: P.TokenizeRequest) -> P.TokenizeResponse:
        """vLLM's /tokenize: the prompt's ids, or those of the messages as the chat template renders them."""
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(None, lambda: self.tokenizer.encode(self._tokenize_text(req)))
        decode = lambda t: self.tokenizer.decode([t], skip_special_tokens=False)
        return P.TokenizeResponse(
            count=len(ids),
            max_model_len=self.engine.llm.max_model_len,
            tokens=ids,
            token_strs=[decode(t) for t in ids] if req.return_token_strs else None,
        )

    def _tokenize_text(self, req: P.TokenizeRequest) -> str:
        if req.messages is None:
            return req.prompt or ""
        kwargs, _ = self.template_kwargs(req.chat_template_kwargs, None)
        return self.render(req.messages, kwargs, req.chat_template, req.add_generation_prompt)

    async def detokenize(self, req: P.DetokenizeRequest) -> P.DetokenizeResponse:
        self.check_token_ids(req.tokens, "tokens")
        return P.DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens, skip_special_tokens=False))

    # -- generation -----------------------------------------------------------------------------

    async def _generate(
        self, req: P.SamplingFields, shape: Shape, seqs_per_prompt: list[list[Sequence]], release
    ):
        """A stream of events for a streaming request (one prompt), else the whole response; `release`
        gives back the ids once it is over (for a stream: when it is closed)."""
        if req.stream:
            return EventStream(
                event_stream(
                    self.engine,
                    seqs_per_prompt[0],
                    shape,
                    req.stream_options,
                    req.max_streaming_response_tokens,
                ),
                release,
            )
        seqs = [seq for group in seqs_per_prompt for seq in group]
        try:
            outputs = await collect(self.engine, seqs, shape.request_id)
        finally:
            release()
        choices = [shape.choice(i, seq, out) for i, (seq, out) in enumerate(zip(seqs, outputs, strict=True))]
        num_prompt = sum(group[0].num_prompt_tokens for group in seqs_per_prompt)
        return shape.response(choices, num_prompt, outputs)


def message_dict(message: P.ChatMessage) -> dict:
    """A message as the chat template sees it; an earlier call's arguments as a dict when they are JSON
    (as vLLM passes them, for templates that write them out with `tojson`)."""
    item: dict = {"role": message.role, "content": message.text()}
    if message.tool_calls:
        item["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        for call in item["tool_calls"]:
            with contextlib.suppress(ValueError, RecursionError):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    if message.tool_call_id is not None:
        item["tool_call_id"] = message.tool_call_id
    return item


def completion_prompts(prompt) -> list:
    """A completion request's prompts: one string or token list, or a list of them."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)
