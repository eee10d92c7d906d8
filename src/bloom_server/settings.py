"""The one settings object: flags override `BLOOM_*` environment variables, which override defaults.

The original server's variables (MODEL_NAME, DEPLOYMENT_FRAMEWORK, DTYPE, MAX_INPUT_LENGTH, MAX_BATCH_SIZE,
ALLOWED_MAX_NEW_TOKENS) are read too, so existing manifests keep working; a `BLOOM_*` variable wins over its legacy twin.
Nothing is read at import: call `load_settings()`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Backend = Literal["hf", "ds_inference", "ds_zero", "fast"]
DType = Literal["auto", "fp16", "bf16", "int8", "fp32"]

# Backends that can run continuous batching (their class sets supports_continuous).
CONTINUOUS_BACKENDS = ("fast",)

# The original DEPLOYMENT_FRAMEWORK values and what they mean here.
# The load's disk reader: eight reads of 32 MiB in flight (docs/results/cold-start.md).
DEFAULT_PREFETCH_THREADS = 8
DEFAULT_CHUNK_MB = 32

LEGACY_BACKENDS = {"hf_accelerate": "hf", "hf_cpu": "hf", "ds_inference": "ds_inference", "ds_zero": "ds_zero"}


def _env(name: str, *legacy: str) -> AliasChoices:
    # Only the BLOOM_* name and the legacy names: env lookup is case-insensitive, so a bare field name would
    # also match e.g. MODEL. Flags arrive as init kwargs under the BLOOM_* name (load_settings).
    return AliasChoices(f"BLOOM_{name.upper()}", *legacy)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    # What to serve
    model: str | None = Field(
        None,
        validation_alias=_env("model", "MODEL_NAME", "STORAGE_URI"),
        description="Model directory, Hub cache name (org/name), or pvc:// URI. Empty: the embedded tiny model.",
    )
    model_id: str | None = Field(None, validation_alias=_env("model_id"), description="Name reported to clients.")
    model_aliases: str = Field(
        "tgi,dummy",
        validation_alias=_env("model_aliases"),
        description="Comma-separated names that a request's `model` may give besides the served id (docs/api.md "
        '"Model names"): by default the placeholders that huggingface_hub sends when given a URL; `*`: any name '
        "(Text Generation Inference's rule); empty: the served id only (vLLM's rule).",
    )
    backend: Backend = Field("hf", validation_alias=_env("backend", "DEPLOYMENT_FRAMEWORK"))
    dtype: DType = Field("auto", validation_alias=_env("dtype", "DTYPE"))
    kernel_inject: bool = Field(True, validation_alias=_env("kernel_inject"))
    cpu_offload: bool = Field(False, validation_alias=_env("cpu_offload"), description="ds_zero: offload to CPU.")

    # HTTP
    host: str = Field("0.0.0.0", validation_alias=_env("host"))
    port: int = Field(8080, ge=0, le=65535, validation_alias=_env("port"))
    max_body_bytes: int = Field(1 << 20, ge=1024, validation_alias=_env("max_body_bytes"))
    # Reading a request is bounded; answering it is not (long generations and streams are never cut by these).
    header_timeout_s: float = Field(
        10.0, gt=0, validation_alias=_env("header_timeout_s"),
        description="A request's headers must arrive within this many seconds (from the connection's opening, or "
        "from its first byte on a kept-alive connection); else 408 and the connection is closed.",
    )  # fmt: skip
    body_timeout_s: float = Field(
        60.0, gt=0, validation_alias=_env("body_timeout_s"),
        description="A request's body must arrive within this many seconds of its headers; else 408 and the "
        "connection is closed.",
    )  # fmt: skip
    keep_alive_timeout_s: float = Field(
        30.0, gt=0, validation_alias=_env("keep_alive_timeout_s"),
        description="An idle kept-alive connection is closed after this many seconds (behind a load balancer: "
        "longer than the balancer's own idle timeout).",
    )  # fmt: skip
    max_connections: int = Field(
        1024, ge=1, validation_alias=_env("max_connections"),
        description="Open connections the server keeps; one more gets 503 (Retry-After) and is closed.",
    )  # fmt: skip
    max_connections_per_client: int = Field(
        512, ge=0, validation_alias=_env("max_connections_per_client"),
        description="Open connections from one client address (0: no cap). Behind a proxy every client shares the "
        "proxy's address: keep it above the proxy's concurrency.",
    )  # fmt: skip

    # Limits
    max_input_length: int = Field(512, ge=1, validation_alias=_env("max_input_length", "MAX_INPUT_LENGTH"))
    max_new_tokens: int = Field(100, ge=1, validation_alias=_env("max_new_tokens", "ALLOWED_MAX_NEW_TOKENS"))
    cap_max_new_tokens: bool = Field(
        False,
        validation_alias=_env("cap_max_new_tokens"),
        description="Cap a larger max_new_tokens to the limit (the original's silent behaviour) instead of a 422.",
    )
    max_total_tokens: int | None = Field(
        None,
        ge=2,
        validation_alias=_env("max_total_tokens"),
        description="Input + output tokens the engine is built for (DeepSpeed's max_tokens). "
        "Default: max_input_length + max_new_tokens.",
    )
    max_batch_size: int = Field(32, ge=1, validation_alias=_env("max_batch_size", "MAX_BATCH_SIZE"))
    max_queued_requests: int = Field(256, ge=1, validation_alias=_env("max_queued_requests"))
    batch_wait_ms: float = Field(
        0.0,
        ge=0,
        validation_alias=_env("batch_wait_ms"),
        description="Dynamic batching: how long an idle engine waits after a request arrives for others to share "
        "its call. 0: start at once (requests arriving while a call runs share the next call anyway).",
    )
    batching: Literal["auto", "continuous", "dynamic"] = Field(
        "auto",
        validation_alias=_env("batching"),
        description="continuous: requests join the running batch at step boundaries (backends that can: fast); "
        "dynamic: a batch runs to completion before the next starts; auto: continuous where the backend can.",
    )
    default_remove_input_from_output: bool = Field(True, validation_alias=_env("remove_input_from_output"))

    # Lifecycle
    warmup: bool = Field(True, validation_alias=_env("warmup"))
    heartbeat_s: float = Field(2.0, gt=0, validation_alias=_env("heartbeat_s"))
    drain_timeout_s: float = Field(30.0, ge=0, validation_alias=_env("drain_timeout_s"))
    log_level: str = Field("info", validation_alias=_env("log_level"))
    debug: bool = Field(False, validation_alias=_env("debug", "DEBUG"))

    # Production API
    max_queued_tokens: int | None = Field(
        None,
        ge=1,
        validation_alias=_env("max_queued_tokens"),
        description="Tokens (prompt + max new tokens) waiting before 429. Default: 4 x max batch size x max total tokens.",
    )
    request_timeout_s: float | None = Field(
        None,
        gt=0,
        validation_alias=_env("request_timeout_s"),
        description="Deadline of every generation request from its arrival (a request may ask for less with the "
        "X-Request-Timeout header). Queued past it: 504; running past it: answered with what it has.",
    )
    api_key: SecretStr | None = Field(
        None,
        validation_alias=_env("api_key"),
        description="When set, every route but liveness, readiness and metrics needs `Authorization: Bearer <key>`.",
    )
    cors_allow_origins: str = Field(
        "",
        validation_alias=_env("cors_allow_origins"),
        description="Comma-separated origins allowed by CORS (`*` for any). Empty: CORS off.",
    )
    log_format: Literal["text", "json"] = Field("text", validation_alias=_env("log_format"))
    chat_template: str | None = Field(
        None,
        validation_alias=_env("chat_template"),
        description="Jinja chat template (the text, or a path to a file) for /v1/chat/completions when the "
        "tokenizer has none.",
    )

    # Loading (docs/deploy.md "Cold start"; docs/security.md for the pickle opt-out)
    trust_unverified_pickles: bool = Field(
        False,
        validation_alias=_env("trust_unverified_pickles"),
        description="DANGEROUS: load pickled weights (.pt shards, pytorch_model.bin) from a directory without a "
        "verifying completion marker. Unpickling runs whatever code the file's author put in it.",
    )
    load_threads: int = Field(
        4, ge=1, le=64, validation_alias=_env("load_threads"),
        description="fast backend: threads placing weights in their tensors (page cache -> pinned buffer -> device "
        "copy, overlapped); they read the disk themselves only where no prefetch runs",
    )  # fmt: skip
    load_prefetch_threads: int = Field(
        DEFAULT_PREFETCH_THREADS, ge=1, le=64, validation_alias=_env("load_prefetch_threads"),
        description="fast backend: reads in flight of the prefetch, the load's one disk reader, in file order",
    )  # fmt: skip
    load_chunk_mb: float = Field(
        DEFAULT_CHUNK_MB, gt=0, le=1024, validation_alias=_env("load_chunk_mb"),
        description="fast backend: size of one sequential read (and of each pinned buffer on GPUs)",
    )  # fmt: skip
    load_prefetch: bool = Field(
        True, validation_alias=_env("load_prefetch"),
        description="fast backend: one sequential read of the weights from process start (while torch is imported) "
        "to the last byte, into the page cache, which the loader follows; off: the loader threads read the disk",
    )  # fmt: skip
    load_throttle_mbps: float | None = Field(
        None, gt=0, validation_alias=_env("load_throttle_mbps"),
        description="Limit weight reads to this many MB/s (tests and rehearsals of a slow volume only).",
    )  # fmt: skip

    @field_validator("backend", mode="before")
    @classmethod
    def _legacy_backend(cls, v: Any) -> Any:
        if isinstance(v, str):
            return LEGACY_BACKENDS.get(v.strip().lower(), v.strip().lower())
        return v

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_names(cls, v: Any) -> Any:
        names = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}
        if isinstance(v, str):
            return names.get(v.strip().lower(), v.strip().lower())
        return v

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_format(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("api_key", "chat_template", "fast_decode", mode="before")
    @classmethod
    def _empty_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("model", mode="before")
    @classmethod
    def _empty_model(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("batching", mode="before")
    @classmethod
    def _lower_batching(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _continuous_backend(self) -> Settings:
        # Checked again against the loaded backend (supports_continuous); here so that it fails before loading.
        if self.batching == "continuous" and self.backend not in CONTINUOUS_BACKENDS:
            raise ValueError(
                f"batching 'continuous' needs a backend that joins requests to a running batch "
                f"({', '.join(CONTINUOUS_BACKENDS)}); backend {self.backend!r} runs 'dynamic' (or 'auto')"
            )
        return self

    @model_validator(mode="after")
    def _limits(self) -> Settings:
        if self.max_total_tokens is not None and self.max_total_tokens <= self.max_input_length:
            raise ValueError(
                f"max_total_tokens ({self.max_total_tokens}) must exceed max_input_length ({self.max_input_length})"
            )
        return self

    @model_validator(mode="after")
    def _prefill_budget(self) -> Settings:
        if self.prefill_step_tokens and self.prefill_step_tokens <= self.max_batch_size:
            raise ValueError(
                f"prefill_step_tokens ({self.prefill_step_tokens}) must exceed max_batch_size ({self.max_batch_size}): "
                "a step decodes up to max_batch_size rows out of it (0: no limit)"
            )
        return self

    @property
    def total_tokens_limit(self) -> int:
        return self.max_total_tokens or (self.max_input_length + self.max_new_tokens)

    @property
    def queued_tokens_limit(self) -> int:
        return self.max_queued_tokens or 4 * self.max_batch_size * self.total_tokens_limit

    @property
    def model_alias_names(self) -> frozenset[str]:
        return frozenset(a.strip() for a in self.model_aliases.split(",") if a.strip())

    @property
    def cors_origins(self) -> list[str]:
        return [o.strip() for o in self.cors_allow_origins.split(",") if o.strip()]

    kernel_cache_dir: str | None = Field(
        None, validation_alias=_env("kernel_cache_dir"),
        description="fast backend: where compiled Triton kernels and their autotuning results are kept (Triton's "
        "TRITON_CACHE_DIR). Default: TRITON_CACHE_DIR if set, else ~/.triton/cache. A directory that survives "
        "restarts (an emptyDir survives container restarts in the pod) lets a restart skip the compiles.",
    )  # fmt: skip
    kernel_cache_seed: str | None = Field(
        None, validation_alias=_env("kernel_cache_seed"),
        description="fast backend: a kernel cache made ahead of time (`bloom-server precompile`) whose entries are "
        "copied into the kernel cache directory at start, so that a first start on a new node skips the compiles. "
        "Default: MODEL/.bloom-kernel-cache when it exists; off: none.",
    )  # fmt: skip
    fast_decode: Literal["triton_head", "base"] | None = Field(
        None, validation_alias=_env("fast_decode"),
        description="fast backend: the decode step's fusion (fast/model.py FUSE_VARIANTS): triton_head, the default, "
        "or base, the eager layer. It decides which kernels are compiled, so a kernel seed records it.",
    )  # fmt: skip
    # Chunked prefill and the prefix cache start off, so that a server behaves as before until scripts/gpu/prefill.sh
    # has measured them against it on a GPU (docs/results/fast-engine.md "Chunked prefill and the prefix cache").
    prefill_step_tokens: int = Field(
        0, ge=0, validation_alias=_env("prefill_step_tokens"),
        description="fast backend, continuous batching: tokens one step computes, one per decoding row and the rest "
        "for the prompts joining the batch, so a long prompt goes in over several steps while the live rows keep "
        "producing tokens; 0: no limit (a joining prompt goes in whole in one step). Must exceed max_batch_size.",
    )  # fmt: skip
    prefill_chunk_tokens: int = Field(
        0, ge=0, validation_alias=_env("prefill_chunk_tokens"),
        description="fast backend, continuous batching: the most tokens of one prompt a step computes; 0: no limit.",
    )  # fmt: skip
    prefix_cache_mb: float = Field(
        0.0, ge=0, validation_alias=_env("prefix_cache_mb"),
        description="fast backend, continuous batching: device memory (MiB per rank) that keeps the KV of recent "
        "prompt prefixes, so that a prompt starting with one computes only the rest (least recently used blocks "
        "go first); 0: off.",
    )  # fmt: skip
    fast_precompile: str = Field(
        "", validation_alias=_env("fast_precompile"),
        description="fast backend: the decode kernels compiled ahead of time, in worker processes while the weights "
        "load: 0 (or off, false, no): none; a number: that many workers; empty: by the CPUs available.",
    )  # fmt: skip


def load_settings(**overrides: Any) -> Settings:
    """Environment plus explicit overrides (flags). Overrides that are None are ignored."""
    unknown = set(overrides) - set(Settings.model_fields)
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    return Settings(**{f"BLOOM_{k.upper()}": v for k, v in overrides.items() if v is not None})
