"""Text Generation Inference's request and response bodies (what huggingface_hub's InferenceClient speaks)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bloom_server.api.schemas import Float, Int

MAX_STOP_SEQUENCES = 4
MAX_TOP_N_TOKENS = 5


class TGIParameters(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    max_new_tokens: Int | None = Field(
        None, description="New tokens to generate; at most the server's limit (GET /info)."
    )
    do_sample: bool = Field(
        False, description="Sample; also implied by temperature != 1, top_k, top_p < 1 or typical_p < 1."
    )
    temperature: Float | None = Field(None, description="> 0.")
    top_k: Int | None = Field(None, description="> 0.")
    top_p: Float | None = Field(None, description="In (0, 1].")
    typical_p: Float | None = Field(None, description="In (0, 1].")
    repetition_penalty: Float | None = Field(None, description="> 0.")
    return_full_text: bool | None = Field(None, description="Prepend the prompt to generated_text (default false).")
    seed: Int | None = Field(None, ge=0, description="Seed of a sampled request: the same seed gives the same text.")
    stop: list[str] = Field(
        default_factory=list,
        max_length=MAX_STOP_SEQUENCES,
        description=f"Up to {MAX_STOP_SEQUENCES} strings that end the generation.",
    )
    truncate: Int | None = Field(None, ge=1, description="Keep only the last `truncate` prompt tokens.")
    details: bool = Field(False, description="Return finish reason, token ids, logprobs and seed.")
    decoder_input_details: bool = Field(False, description="Return the prompt's tokens too (logprob null).")
    top_n_tokens: Int | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS, description="Alternatives per token.")
    best_of: Int | None = Field(None, description="Not supported beyond 1.")
    watermark: bool = Field(False, description="Not supported.")
    grammar: Any = Field(
        None,
        description='Structured output: {"type": "json", "value": <JSON schema>}, {"type": '
        '"regex", "value": <pattern>} or {"type": "json_object"}.',
    )
    frequency_penalty: Float | None = Field(None, description="Not supported (use repetition_penalty).")
    adapter_id: str | None = Field(None, description="Not supported.")


class TGIRequest(BaseModel):
    """TGI's body: `{"inputs": str, "parameters": {...}}` (`stream` is read by POST /)."""

    model_config = ConfigDict(extra="allow")

    inputs: str = Field(min_length=1, description="The prompt.")
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = Field(False, description="POST / only: answer as server-sent events, as /generate_stream does.")


class TGIToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class TGIPrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class TGIDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence", "max_time"]
    generated_tokens: int
    seed: int | None = None
    prefill: list[TGIPrefillToken] = Field(default_factory=list)
    tokens: list[TGIToken] = Field(default_factory=list)
    top_tokens: list[list[TGIToken]] | None = None


class TGIResponse(BaseModel):
    generated_text: str
    details: TGIDetails | None = None


class TGIStreamDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence", "max_time"]
    generated_tokens: int
    seed: int | None = None
    input_length: int


class TGIStreamEvent(BaseModel):
    """One server-sent event of /generate_stream: `data: <this JSON>`. The last carries generated_text and
    details. An error after the first token ends the stream with `data: {"error": <message>, "error_type": <kind>}`."""

    index: int
    token: TGIToken
    top_tokens: list[TGIToken] | None = None
    generated_text: str | None = None
    details: TGIStreamDetails | None = None
