"""OpenAI-compatible request and response models, with FastDeploy's and vLLM's extensions.

Field order follows OpenAI's API reference; extras come after. Requests accept unknown fields (OpenAI
clients send many) and report them so the app can log them.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RequestPart(OpenAIModel):
    """Part of a request: strict types (no "yes" for true, no false for 0) and finite numbers."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class RequestModel(RequestPart):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    @property
    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class StreamOptions(RequestPart):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


MAX_INT = 2**31 - 1  # counts and ids beyond this are no request's; they only overflow downstream
NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[int], Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0, le=MAX_INT)]
PromptTokenIds = Annotated[list[TokenId], Field(min_length=1)]
MAX_BAD_WORDS = 256


def one_of_required(*names: str) -> dict:
    """The schema's way of saying "at least one of these fields" (the validators check it too)."""
    return {"anyOf": [{"required": [name]} for name in names]}


def required_unless(other: str):
    """A validator for a field (declared after `other`) that may be left out only when `other` is given."""

    def check(value, info: ValidationInfo):
        if value is None and info.data.get(other) is None:
            raise ValueError(f"Field required (or give {other})")
        return value

    return check


class JsonSchemaSpec(RequestPart):
    """OpenAI's `response_format.json_schema`; the schema is enforced whatever `strict` says."""

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestPart):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]  # structural_tag: a 400
    json_schema: JsonSchemaSpec | None = None


class StructuredOutputs(RequestPart):
    """vLLM's `structured_outputs` (its newer form of the guided_* fields): at most one key."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class SamplingFields(RequestModel):
    """What chat and completion requests share."""

    model: str | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    user: str | None = None
    # FastDeploy / vLLM extensions
    top_k: int | None = Field(None, ge=-1, le=MAX_INT)
    min_p: float | None = Field(None, ge=0, le=1)
    min_tokens: int | None = Field(None, ge=0, le=MAX_INT)
    repetition_penalty: float | None = Field(None, gt=0)
    stop_token_ids: list[Annotated[int, Field(ge=0, le=MAX_INT)]] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    return_token_ids: bool = False
    reasoning_max_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    request_id: NonEmptyStr | None = None
    bad_words: list[str] | None = Field(None, max_length=MAX_BAD_WORDS)
    # FastDeploy: token ids, each banned; vLLM: id sequences, the last one banned right after the rest
    bad_words_token_ids: (
        Annotated[list[TokenId], Field(max_length=MAX_BAD_WORDS)]
        | Annotated[list[PromptTokenIds], Field(max_length=MAX_BAD_WORDS)]
        | None
    ) = None
    max_streaming_response_tokens: int = Field(1, ge=1, le=MAX_INT)
    # Structured output (fdkit/serving/guided.py): at most one of these
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None  # a JSON schema, or its text
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None  # Lark (llguidance's dialect) or GBNF
    structured_outputs: StructuredOutputs | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        return [value] if isinstance(value, str) else list(value or [])

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        return self


class TextContentPart(RequestPart):
    type: Literal["text"]
    text: str


class FunctionCall(RequestPart):
    name: str
    arguments: str  # JSON text, as the model wrote it


class AssistantToolCall(RequestPart):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestPart):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextContentPart] | None = None  # a text-only model: text parts only
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatMetadata(RequestPart):
    """FastDeploy's place for some chat settings; other keys are allowed and ignored."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    min_tokens: int | None = Field(None, ge=0, le=MAX_INT)
    reasoning_max_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    enable_thinking: bool | None = None


class ChatTemplateKwargs(RequestPart):
    """Passed to the chat template; `enable_thinking` is the one fdkit reads."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    enable_thinking: bool | None = None


class FunctionDefinition(RequestPart):
    name: NonEmptyStr
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class Tool(RequestPart):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestPart):
    name: NonEmptyStr


class NamedToolChoice(RequestPart):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    """`messages`, or FastDeploy's `prompt_token_ids` (then the messages are not rendered)."""

    model_config = ConfigDict(json_schema_extra=one_of_required("messages", "prompt_token_ids"))
    prompt_token_ids: PromptTokenIds | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, validate_default=True)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    metadata: ChatMetadata | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    chat_template: str | None = None
    disable_chat_template: bool = False
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: a forced call is a single one

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")
        return self

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self):
        choice = self.tool_choice
        if choice in (None, "none", "auto"):
            return self
        names = {tool.function.name for tool in self.tools or []}
        if not names:
            raise ValueError(f"tool_choice {choice!r} needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools")
        return self

    _has_a_prompt = field_validator("messages")(required_unless("prompt_token_ids"))


class CompletionRequest(SamplingFields):
    """`prompt`, or FastDeploy's `prompt_token_ids` (which wins when both are given)."""

    model_config = ConfigDict(json_schema_extra=one_of_required("prompt", "prompt_token_ids"))
    prompt_token_ids: PromptTokenIds | Annotated[list[PromptTokenIds], Field(min_length=1)] | None = None
    prompt: (
        NonEmptyStr
        | Annotated[list[str], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
        | None
    ) = Field(None, validate_default=True)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None

    _has_a_prompt = field_validator("prompt")(required_unless("prompt_token_ids"))


class TokenizeRequest(RequestModel):
    """vLLM's /tokenize: a `prompt`, or `messages` rendered with the chat template."""

    model_config = ConfigDict(json_schema_extra=one_of_required("prompt", "messages"))
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, validate_default=True)
    add_generation_prompt: bool = True
    chat_template: str | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    return_token_strs: bool = False

    @field_validator("messages")
    @classmethod
    def _one_prompt(cls, messages, info: ValidationInfo):
        if (messages is None) == (info.data.get("prompt") is None):
            raise ValueError("give exactly one of prompt and messages")
        return messages


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(OpenAIModel):
    prompt: str


class PromptTokensDetails(OpenAIModel):
    cached_tokens: int = 0


class CompletionTokensDetails(OpenAIModel):
    reasoning_tokens: int = 0


class Usage(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(OpenAIModel):
    content: list[TokenLogprob] | None = None


class AlwaysSendsReasoning(OpenAIModel):
    """`reasoning_content` is on the wire even when null (FastDeploy's messages always carry it)."""

    ALWAYS_SENT: ClassVar[tuple[str, ...]] = ("reasoning_content",)
    reasoning_content: str | None = None

    @model_serializer(mode="wrap")
    def _keep_reasoning_content(self, handler):
        data = handler(self)
        for name in self.ALWAYS_SENT:
            data.setdefault(name, getattr(self, name))
        return data


class ChatResponseMessage(AlwaysSendsReasoning):
    """A whole message: `content` is null, not absent, when the model only calls tools (as OpenAI's is)."""

    ALWAYS_SENT: ClassVar[tuple[str, ...]] = ("content", "reasoning_content")
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict] | None = None
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None


class ChatCompletionChoice(OpenAIModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort", "tool_calls"] | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class DeltaMessage(AlwaysSendsReasoning):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict] | None = None
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None


class ChatCompletionStreamChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort", "tool_calls"] | None = None
    arrival_time: float | None = None


class ChatCompletionStreamResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Usage | None = None


class CompletionLogprobs(OpenAIModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    reasoning_content: str | None = None
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None
    arrival_time: float | None = None


class CompletionResponse(OpenAIModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "fdkit"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo
