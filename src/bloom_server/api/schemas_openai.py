"""OpenAI's completions and chat completions bodies (the fields this server honours; others are refused by name)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bloom_server.api.schemas import Float, Int

MAX_STOP = 4
MAX_LOGPROBS = 5


_RESPONSE_FORMAT = (
    '{"type": "text"} (free), {"type": "json_object"}, or {"type": "json_schema", "json_schema": '
    '{"name": ..., "schema": {...}, "strict": true}}: every token is masked by the grammar.'
)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = Field(None, description="The served model's id (GET /v1/models); optional.")
    temperature: Float | None = Field(None, ge=0, le=2, description="0: greedy; default 1 (sampling).")
    top_p: Float | None = Field(None, gt=0, le=1)
    n: Int = Field(1, ge=1, description="Choices per prompt (prompts x n <= max batch size).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP} strings; not included in the text.")
    seed: Int | None = Field(None, ge=0, description="Reproduces a sampled answer.")
    presence_penalty: Float | None = Field(None, description="Only 0 is supported.")
    frequency_penalty: Float | None = Field(None, description="Only 0 is supported.")
    logit_bias: dict[str, Float] | None = Field(None, description="Not supported.")
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[Int] | list[list[Int]] = Field(
        description="A prompt or a list of prompts; a prompt may be given as a list of token ids."
    )
    max_tokens: Int | None = Field(16, ge=1, description="New tokens per choice (default 16).")
    logprobs: Int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Log-probabilities of the chosen and top tokens."
    )
    echo: bool = Field(False, description="Prepend the prompt to the text.")
    best_of: Int | None = Field(None, description="Only 1 (or n) is supported.")
    suffix: str | None = Field(None, description="Not supported.")
    response_format: dict[str, Any] | None = Field(None, description=_RESPONSE_FORMAT)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = Field(None, ge=1, description="New tokens per choice (default: the server's limit).")
    max_completion_tokens: Int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = Field(None, description=_RESPONSE_FORMAT)
    tools: list[dict[str, Any]] | None = Field(
        None, description='Functions the answer may call: {"type": "function", "function": {"name", "parameters"}}.'
    )
    tool_choice: str | dict[str, Any] | None = Field(
        None,
        description='"none", "required" (a call of any of the '
        'tools) or {"type": "function", "function": {"name": ...}}; '
        '"auto" is not supported.',
    )
    functions: list[dict[str, Any]] | None = Field(None, description="Not supported (use tools).")
    function_call: str | dict[str, Any] | None = Field(None, description='Only "none" is supported (use tool_choice).')


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "bloom-server"


class ModelObject(ModelCard):
    """GET /v1/models/{name}: OpenAI's model object, with KServe v1's model status fields (`name`, `ready`)."""

    name: str = Field(description="KServe v1: the model's name (the same as id).")
    ready: bool = Field(description="KServe v1: loaded and warmed up (the status is 503 until then).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail
