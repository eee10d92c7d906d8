"""Request and response bodies of the original server's routes (API.md). Types are parsed leniently, as the original
did ("true" -> True, "10" -> 10); limits are checked in the engine, which knows them."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, field_validator

from bloom_server.types import ACCEPTED_GENERATE_KWARGS

Prompt = Annotated[str, StringConstraints(min_length=1)]


def _not_a_boolean(v: Any) -> Any:
    # Lax parsing would read true as 1: refused where a number is expected. Strings such as "10" and "true" are
    # still parsed as the original server did.
    if isinstance(v, bool):
        raise ValueError("must be a number, not a boolean")
    return v


Int = Annotated[int, BeforeValidator(_not_a_boolean)]
Float = Annotated[float, BeforeValidator(_not_a_boolean)]


def _as_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


class GenerateKwargs(BaseModel):
    """The 22 generate() keyword arguments of the original server, and min_new_tokens; all optional."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    min_length: Int | None = Field(None, description="Minimum total length (prompt + output), in tokens.")
    do_sample: bool | None = Field(None, description="Sample instead of greedy decoding.")
    early_stopping: bool | None = None
    temperature: Float | None = Field(None, description="> 0 when sampling.")
    top_k: Int | None = Field(None, description=">= 0; 0 disables.")
    top_p: Float | None = Field(None, description="In (0, 1].")
    typical_p: Float | None = Field(None, description="In (0, 1].")
    repetition_penalty: Float | None = Field(None, description="> 0.")
    bos_token_id: Int | None = None
    pad_token_id: Int | None = None
    eos_token_id: Int | list[Int] | None = None
    length_penalty: Float | None = None
    no_repeat_ngram_size: Int | None = None
    encoder_no_repeat_ngram_size: Int | None = None
    max_time: Float | None = Field(None, description="Seconds; generation stops when it runs out.")
    max_new_tokens: Int | None = Field(None, description="New tokens to generate; at most the server's limit.")
    decoder_start_token_id: Int | None = None
    diversity_penalty: Float | None = None
    forced_bos_token_id: Int | None = None
    forced_eos_token_id: Int | None = None
    exponential_decay_length_penalty: tuple[Int, Float] | None = None
    remove_input_from_output: bool | None = Field(None, description="Return only the new text (default true).")
    min_new_tokens: Int | None = Field(
        None,
        description="The end-of-sequence token is held back until this many new "
        "tokens (>= 0, at most max_new_tokens); equal to max_new_tokens, every row "
        "generates exactly max_new_tokens.",
    )

    def generate_kwargs(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ACCEPTED_GENERATE_KWARGS if getattr(self, k) is not None}

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class GenerateRequest(GenerateKwargs):
    text: Annotated[list[Prompt], Field(min_length=1, description="Prompts (a single string is accepted too).")]
    grammar: Any = Field(
        None,
        description='Structured output, as TGI takes it: {"type": "json", "value": <JSON '
        'schema>}, {"type": "regex", "value": <pattern>} or {"type": "json_object"}.',
    )

    _text_list = field_validator("text", mode="before")(_as_list)


class GenerateResponse(BaseModel):
    text: list[str]
    num_generated_tokens: list[int]
    query_id: int
    total_time_taken: str
    method: str = "generate"
    is_encoder_decoder: bool = False


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: Annotated[list[Prompt], Field(min_length=1)]

    _text_list = field_validator("text", mode="before")(_as_list)


class TokenizeResponse(BaseModel):
    token_ids: list[list[int]]
    query_id: int
    total_time_taken: str
    method: str = "tokenize"


class ForwardRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    conditioning_text: Annotated[list[str], Field(min_length=1)]
    response: Annotated[list[Prompt], Field(min_length=1)]

    _lists = field_validator("conditioning_text", "response", mode="before")(_as_list)


class ForwardResponse(BaseModel):
    nll: float
    query_id: int
    total_time_taken: str


class QueryIdResponse(BaseModel):
    generate_query_id: int
    tokenize_query_id: int
    forward_query_id: int


class ErrorResponse(BaseModel):
    error: str
    message: str
    field: str | None = None
    limit: int | float | str | None = None


class Health(BaseModel):
    status: str
    detail: str
