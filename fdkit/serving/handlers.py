"""Chat and text completions: request -> sampling parameters -> engine -> OpenAI responses and streams."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, Response
from jinja2.exceptions import TemplateError

from fdkit.engine.async_engine import AsyncLLM, EngineDeadError
from fdkit.engine.llm_engine import RequestOutput
from fdkit.engine.sequence import SamplingParams, Sequence
from fdkit.serving import protocol as P
from fdkit.serving.errors import APIError, from_engine_error
from fdkit.serving.reasoning import ReasoningParser, get_parser
from fdkit.serving.streams import ChoiceStream, collect, merge, sse, sse_response

GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, cfg):
        self.engine, self.cfg = engine, cfg
        self.tokenizer = engine.llm.tokenizer
        self.model_name = cfg.server.served_model_name or cfg.model.name
        self.parser: ReasoningParser | None = get_parser(cfg.server.reasoning_parser)
        self.reasoning_end_ids = self.tokenizer.encode(self.parser.end_token) if self.parser else []
        path = engine.llm.model_path / "generation_config.json"
        generation = json.loads(path.read_text()) if path.is_file() else {}
        self.model_defaults = {k: generation[k] for k in GENERATION_CONFIG_KEYS if k in generation}

    # -- parameters -----------------------------------------------------------------------------

    def _default(self, name: str, fallback):
        value = self.cfg.sampling.get(name)
        return value if value is not None else self.model_defaults.get(name, fallback)

    def sampling_params(
        self, req: P.SamplingFields, *, max_tokens, min_tokens, logprobs, reasoning_max_tokens, choice: int
    ) -> SamplingParams:
        server = self.cfg.server
        if len(req.stop) > server.max_stop_strings:
            raise APIError(400, f"at most {server.max_stop_strings} stop strings are allowed", "stop")
        if any(len(s) > server.max_stop_string_len for s in req.stop):
            raise APIError(
                400, f"stop strings may have at most {server.max_stop_string_len} characters", "stop"
            )
        cap = self.cfg.sampling.max_tokens
        if cap is not None:
            max_tokens = min(max_tokens or cap, cap)
        seed = req.seed if req.seed is not None else self.cfg.sampling.seed
        pick = lambda value, name, fallback: value if value is not None else self._default(name, fallback)  # noqa: E731
        reasoning_end = self.reasoning_end_ids
        try:
            return SamplingParams(
                temperature=pick(req.temperature, "temperature", 1.0),
                top_p=max(pick(req.top_p, "top_p", 1.0), 1e-6),  # top_p=0 is FastDeploy's greedy idiom
                top_k=pick(req.top_k, "top_k", 0),
                min_p=pick(req.min_p, "min_p", 0.0),
                frequency_penalty=pick(req.frequency_penalty, "frequency_penalty", 0.0),
                presence_penalty=pick(req.presence_penalty, "presence_penalty", 0.0),
                repetition_penalty=pick(req.repetition_penalty, "repetition_penalty", 1.0),
                max_tokens=max_tokens,
                min_tokens=min_tokens if min_tokens is not None else self.cfg.sampling.min_tokens,
                stop=req.stop,
                stop_token_ids=req.stop_token_ids or [],
                include_stop_str_in_output=req.include_stop_str_in_output,
                ignore_eos=req.ignore_eos,
                seed=None if seed is None else seed + choice,
                logprobs=logprobs,
                reasoning_max_tokens=reasoning_max_tokens if reasoning_end else None,
                reasoning_end_token_ids=reasoning_end,
            )
        except ValueError as exc:
            raise APIError(400, str(exc), code="invalid_value") from exc

    async def prepare(self, prompt, params: list[SamplingParams], request_id: str) -> list[Sequence]:
        try:
            return [await self.engine.prepare(prompt, p, f"{request_id}-{i}") for i, p in enumerate(params)]
        except ValueError as exc:
            raise from_engine_error(exc) from exc
        except EngineDeadError as exc:
            raise APIError(503, str(exc), code="engine_unavailable") from exc

    # -- chat -----------------------------------------------------------------------------------

    def chat_prompt(self, req: P.ChatCompletionRequest) -> tuple[str, bool]:
        kwargs = dict(req.chat_template_kwargs or {})
        metadata = req.metadata or {}
        thinking = kwargs.get("enable_thinking", metadata.get("enable_thinking", True))
        kwargs["enable_thinking"] = bool(thinking)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs), bool(
                thinking
            )
        except (TemplateError, ValueError, TypeError) as exc:
            raise APIError(
                400, f"messages could not be rendered with the chat template: {exc}", "messages"
            ) from exc

    async def chat(self, req: P.ChatCompletionRequest) -> Response:
        prompt, thinking = self.chat_prompt(req)
        metadata = req.metadata or {}
        min_tokens = req.min_tokens if req.min_tokens is not None else metadata.get("min_tokens")
        budget = (
            req.reasoning_max_tokens
            or metadata.get("reasoning_max_tokens")
            or self.cfg.sampling.reasoning_max_tokens
        )
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = [
            self.sampling_params(
                req,
                max_tokens=req.max_completion_tokens or req.max_tokens,
                min_tokens=min_tokens,
                logprobs=logprobs,
                reasoning_max_tokens=budget if thinking else None,
                choice=i,
            )
            for i in range(req.n)
        ]
        request_id = req.request_id or P.random_id("chatcmpl")
        seqs = await self.prepare(prompt, params, request_id)
        parser = self.parser if thinking else None
        if req.stream:
            return sse_response(self._chat_stream(req, request_id, seqs, parser))
        outputs = await collect(self.engine, seqs)
        choices = [self._chat_choice(i, out, parser, req) for i, out in enumerate(outputs)]
        usage = self._usage(seqs[0].num_prompt_tokens, outputs, parser)
        response = P.ChatCompletionResponse(
            id=request_id, model=self.model_name, choices=choices, usage=usage
        )
        return JSONResponse(response.model_dump(exclude_none=True))

    def _chat_choice(self, index: int, out: RequestOutput, parser, req) -> P.ChatCompletionChoice:
        reasoning, content = parser.split(out.text) if parser else (None, out.text)
        message = P.ChatResponseMessage(content=content, reasoning_content=reasoning, reasoning=reasoning)
        if req.return_token_ids:
            message.prompt_token_ids, message.completion_token_ids = out.prompt_token_ids, out.token_ids
        logprobs = self._chat_logprobs(out) if req.logprobs else None
        return P.ChatCompletionChoice(
            index=index, message=message, logprobs=logprobs, finish_reason=out.finish_reason
        )

    def _chat_logprobs(self, out: RequestOutput, start: int = 0) -> P.ChoiceLogprobs:
        items = []
        for token_id, (logprob, top) in zip(
            out.token_ids[start:], (out.logprobs or [])[start:], strict=False
        ):
            token = self.tokenizer.decode([token_id], skip_special_tokens=False)
            tops = [
                P.TopLogprob(token=self.tokenizer.decode([t], skip_special_tokens=False), logprob=v)
                for t, v in top
            ]
            items.append(
                P.TokenLogprob(token=token, logprob=logprob, bytes=list(token.encode()), top_logprobs=tops)
            )
        return P.ChoiceLogprobs(content=items)

    def _usage(self, num_prompt_tokens: int, outputs: list[RequestOutput], parser) -> P.Usage:
        num_completion = sum(len(o.token_ids) for o in outputs)
        reasoning = sum(self._num_reasoning_tokens(o, parser) for o in outputs) if parser else 0
        return P.Usage(
            prompt_tokens=num_prompt_tokens,
            completion_tokens=num_completion,
            total_tokens=num_prompt_tokens + num_completion,
            prompt_tokens_details=P.PromptTokensDetails(cached_tokens=0),
            completion_tokens_details=P.CompletionTokensDetails(reasoning_tokens=reasoning),
        )

    def _num_reasoning_tokens(self, out: RequestOutput, parser: ReasoningParser) -> int:
        end_ids = self.reasoning_end_ids
        ids = out.token_ids
        for k in range(len(ids) - len(end_ids) + 1):
            if ids[k : k + len(end_ids)] == end_ids:
                return k
        return len(ids)

    async def _chat_stream(self, req, request_id: str, seqs: list[Sequence], parser) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        num_prompt = seqs[0].num_prompt_tokens
        states = [ChoiceStream(parser) for _ in seqs]

        def chunk(choices, usage=None) -> str:
            body = P.ChatCompletionStreamResponse(
                id=request_id, created=created, model=self.model_name, choices=choices, usage=usage
            )
            return sse(body.model_dump(exclude_none=True))

        def usage_now() -> P.Usage:
            done = sum(s.num_tokens for s in states)
            return P.Usage(prompt_tokens=num_prompt, completion_tokens=done, total_tokens=num_prompt + done)

        for i, seq in enumerate(seqs):
            delta = P.DeltaMessage(role="assistant", content="", reasoning_content="" if parser else None)
            if req.return_token_ids:
                delta.prompt_token_ids = seq.prompt_token_ids
            yield chunk(
                [P.ChatCompletionStreamChoice(index=i, delta=delta)], usage_now() if continuous else None
            )
        try:
            async for i, out in merge(self.engine, seqs):
                reasoning, content, new_ids = states[i].advance(out)
                if not (reasoning or content or out.finished or continuous):  # usage stats: every token
                    continue
                delta = P.DeltaMessage(
                    content=content, reasoning_content=reasoning or None, reasoning=reasoning or None
                )
                if req.return_token_ids:
                    delta.completion_token_ids = new_ids
                logprobs = (
                    self._chat_logprobs(out, states[i].num_tokens - len(new_ids)) if req.logprobs else None
                )
                choice = P.ChatCompletionStreamChoice(
                    index=i,
                    delta=delta,
                    logprobs=logprobs,
                    finish_reason=out.finish_reason,
                    arrival_time=time.time() - out.metrics["arrival_time"],
                )
                yield chunk([choice], usage_now() if continuous else None)
            if include_usage:
                outputs = [s.last for s in states]
                yield chunk([], self._usage(num_prompt, outputs, parser))
        except EngineDeadError as exc:
            yield sse(APIError(503, str(exc), code="engine_unavailable").body())
        yield "data: [DONE]\n\n"

    # -- completions ----------------------------------------------------------------------------

    async def completion(self, req: P.CompletionRequest) -> Response:
        prompts = completion_prompts(req.prompt)
        if req.stream and len(prompts) > 1:
            raise APIError(400, "streaming supports a single prompt", "prompt")
        request_id = req.request_id or P.random_id("cmpl")
        params = [
            self.sampling_params(
                req,
                max_tokens=req.max_tokens,
                min_tokens=req.min_tokens,
                logprobs=req.logprobs,
                reasoning_max_tokens=None,
                choice=i,
            )
            for i in range(req.n)
        ]
        seqs_per_prompt = [await self.prepare(p, params, f"{request_id}-{k}") for k, p in enumerate(prompts)]
        if req.stream:
            return sse_response(self._completion_stream(req, request_id, seqs_per_prompt[0]))
        choices, outputs = [], []
        for k, seqs in enumerate(seqs_per_prompt):
            for i, out in enumerate(await collect(self.engine, seqs)):
                text = (
                    (seqs[0].prompt or self.tokenizer.decode(out.prompt_token_ids)) + out.text
                    if req.echo
                    else out.text
                )
                choice = P.CompletionChoice(index=k * req.n + i, text=text, finish_reason=out.finish_reason)
                if req.return_token_ids:
                    choice.prompt_token_ids, choice.completion_token_ids = out.prompt_token_ids, out.token_ids
                if req.logprobs is not None:
                    choice.logprobs = self._completion_logprobs(out)
                choices.append(choice)
                outputs.append(out)
        num_prompt = sum(s[0].num_prompt_tokens for s in seqs_per_prompt)
        usage = self._usage(num_prompt, outputs, None)
        usage.completion_tokens_details = None
        response = P.CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)
        return JSONResponse(response.model_dump(exclude_none=True))

    def _completion_logprobs(self, out: RequestOutput, start: int = 0) -> P.CompletionLogprobs:
        result = P.CompletionLogprobs()
        for token_id, (logprob, top) in zip(
            out.token_ids[start:], (out.logprobs or [])[start:], strict=False
        ):
            result.tokens.append(self.tokenizer.decode([token_id], skip_special_tokens=False))
            result.token_logprobs.append(logprob)
            result.top_logprobs.append(
                {self.tokenizer.decode([t], skip_special_tokens=False): v for t, v in top}
            )
        return result

    async def _completion_stream(self, req, request_id: str, seqs: list[Sequence]) -> AsyncIterator[str]:
        created, num_prompt = int(time.time()), seqs[0].num_prompt_tokens
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        states = [ChoiceStream(None) for _ in seqs]

        def usage_now() -> P.Usage:
            done = sum(s.num_tokens for s in states)
            return P.Usage(prompt_tokens=num_prompt, completion_tokens=done, total_tokens=num_prompt + done)

        try:
            async for i, out in merge(self.engine, seqs):
                _, text, new_ids = states[i].advance(out)
                if req.echo and states[i].num_tokens == len(new_ids):
                    text = (seqs[i].prompt or self.tokenizer.decode(seqs[i].prompt_token_ids)) + text
                if not (text or out.finished or continuous):
                    continue
                choice = P.CompletionChoice(
                    index=i,
                    text=text,
                    finish_reason=out.finish_reason,
                    arrival_time=time.time() - out.metrics["arrival_time"],
                )
                if req.return_token_ids:
                    choice.completion_token_ids = new_ids
                if req.logprobs is not None:
                    choice.logprobs = self._completion_logprobs(out, states[i].num_tokens - len(new_ids))
                body = P.CompletionResponse(
                    id=request_id,
                    created=created,
                    model=self.model_name,
                    choices=[choice],
                    usage=usage_now() if continuous else None,
                )
                yield sse(body.model_dump(exclude_none=True))
            if include_usage:
                body = P.CompletionResponse(
                    id=request_id, created=created, model=self.model_name, choices=[], usage=usage_now()
                )
                yield sse(body.model_dump(exclude_none=True))
        except EngineDeadError as exc:
            yield sse(APIError(503, str(exc), code="engine_unavailable").body())
        yield "data: [DONE]\n\n"


def completion_prompts(prompt) -> list:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)
