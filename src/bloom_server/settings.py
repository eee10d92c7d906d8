"""The one settings object: flags override `BLOOM_*` environment variables, which override defaults.

Every field is read from `BLOOM_<FIELD>` (the alias generator below); the original server's variables (MODEL_NAME,
DEPLOYMENT_FRAMEWORK, DTYPE, MAX_INPUT_LENGTH, MAX_BATCH_SIZE, ALLOWED_MAX_NEW_TOKENS) are read too, so existing
manifests keep working; a `BLOOM_*` variable wins over its legacy twin. A field's docstring is its description.
Nothing is read at import: call `load_settings()`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, AliasGenerator, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Backend = Literal["hf", "ds_inference", "ds_zero", "fast"]
DType = Literal["auto", "fp16", "bf16", "int8", "fp32"]
# How the fast backend's weights reach the device (fast/loaders.py for the field loaders).
Loader = Literal["auto", "builtin", "fastsafetensors", "runai", "instanttensor"]

# The load's disk reader: eight reads of 32 MiB in flight (docs/results/cold-start.md).
DEFAULT_PREFETCH_THREADS = 8
DEFAULT_CHUNK_MB = 32
# What the loader setting's `auto` runs: the builtin read path until scripts/gpu/loaders.sh has measured the field
# loaders against it on a GPU (docs/results/cold-start.md "Field loaders"); then the one that won, where it can run.
AUTO_LOADER = "builtin"

# The original DEPLOYMENT_FRAMEWORK values and what they mean here.
LEGACY_BACKENDS = {"hf_accelerate": "hf", "hf_cpu": "hf", "ds_inference": "ds_inference", "ds_zero": "ds_zero"}
# Other spellings a setting's value may take, by field.
_SPELLINGS = {
    "backend": LEGACY_BACKENDS,
    "dtype": {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"},
    "loader": {"runai_streamer": "runai", "runai-model-streamer": "runai", "runai_model_streamer": "runai"},
}


def _env(name: str, *legacy: str) -> AliasChoices:
    # Only the BLOOM_* name and the legacy names: env lookup is case-insensitive, so a bare field name would
    # also match e.g. MODEL. Flags arrive as init kwargs under the BLOOM_* name (load_settings).
    return AliasChoices(f"BLOOM_{name.upper()}", *legacy)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        extra="ignore",
        frozen=True,
        use_attribute_docstrings=True,
        alias_generator=AliasGenerator(validation_alias=_env),
    )

    # What to serve
    model: str | None = Field(None, validation_alias=_env("model", "MODEL_NAME", "STORAGE_URI"))
    """Model directory, Hub cache name (org/name), or pvc:// URI. Empty: the embedded tiny model."""
    model_id: str | None = None
    """Name reported to clients."""
    model_aliases: str = "tgi,dummy"
    """Comma-separated names that a request's `model` may give besides the served id (docs/api.md "Model names"): by
    default the placeholders that huggingface_hub sends when given a URL; `*`: any name (Text Generation Inference's
    rule); empty: the served id only (vLLM's rule)."""
    backend: Backend = Field("hf", validation_alias=_env("backend", "DEPLOYMENT_FRAMEWORK"))
    dtype: DType = Field("auto", validation_alias=_env("dtype", "DTYPE"))
    kernel_inject: bool = True
    cpu_offload: bool = False
    """ds_zero: offload to CPU."""
    home: str | None = None
    """Where the embedded tiny model is built and kept (default ~/.cache/bloom-server)."""

    # HTTP. Reading a request is bounded; answering it is not (long generations and streams are never cut by these).
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    header_timeout_s: float = Field(10.0, gt=0)
    """A request's headers must arrive within this many seconds (from the connection's opening, or from its first
    byte on a kept-alive connection); else 408 and the connection is closed."""
    body_timeout_s: float = Field(60.0, gt=0)
    """A request's body must arrive within this many seconds of its headers; else 408 and the connection is closed."""
    keep_alive_timeout_s: float = Field(30.0, gt=0)
    """An idle kept-alive connection is closed after this many seconds (behind a load balancer: longer than the
    balancer's own idle timeout)."""
    max_connections: int = Field(1024, ge=1)
    """Open connections the server keeps; one more gets 503 (Retry-After) and is closed."""
    max_connections_per_client: int = Field(512, ge=0)
    """Open connections from one client address (0: no cap). Behind a proxy every client shares the proxy's address:
    keep it above the proxy's concurrency."""

    # Limits
    max_input_length: int = Field(512, ge=1, validation_alias=_env("max_input_length", "MAX_INPUT_LENGTH"))
    max_new_tokens: int = Field(100, ge=1, validation_alias=_env("max_new_tokens", "ALLOWED_MAX_NEW_TOKENS"))
    cap_max_new_tokens: bool = False
    """Cap a larger max_new_tokens to the limit (the original's silent behaviour) instead of a 422."""
    max_total_tokens: int | None = Field(None, ge=2)
    """Input + output tokens the engine is built for (DeepSpeed's max_tokens). Default: max_input_length +
    max_new_tokens."""
    max_batch_size: int = Field(32, ge=1, validation_alias=_env("max_batch_size", "MAX_BATCH_SIZE"))
    max_queued_requests: int = Field(256, ge=1)
    batch_wait_ms: float = Field(0.0, ge=0)
    """Dynamic batching: how long an idle engine waits after a request arrives for others to share its call. 0: start
    at once (requests arriving while a call runs share the next call anyway)."""
    batching: Literal["auto", "continuous", "dynamic"] = "auto"
    """continuous: requests join the running batch at step boundaries (backends that can: fast); dynamic: a batch runs
    to completion before the next starts; auto: continuous where the backend can."""
    default_remove_input_from_output: bool = Field(True, validation_alias=_env("remove_input_from_output"))

    # Lifecycle
    warmup: bool = True
    heartbeat_s: float = Field(2.0, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0)
    log_level: str = "info"
    debug: bool = Field(False, validation_alias=_env("debug", "DEBUG"))
    """The original server's DEBUG switch: debug logging where no log level is given."""

    # Production API
    max_queued_tokens: int | None = Field(None, ge=1)
    """Tokens (prompt + max new tokens) waiting before 429. Default: 4 x max batch size x max total tokens."""
    request_timeout_s: float | None = Field(None, gt=0)
    """Deadline of every generation request from its arrival (a request may ask for less with the X-Request-Timeout
    header). Queued past it: 504; running past it: answered with what it has."""
    api_key: SecretStr | None = None
    """When set, every route but liveness, readiness and metrics needs `Authorization: Bearer <key>` (`client` sends
    it)."""
    cors_allow_origins: str = ""
    """Comma-separated origins allowed by CORS (`*` for any). Empty: CORS off."""
    log_format: Literal["text", "json"] = "text"
    chat_template: str | None = None
    """Jinja chat template (the text, or a path to a file) for /v1/chat/completions when the tokenizer has none."""

    # Loading (docs/deploy.md "Cold start"; docs/security.md for the pickle opt-out)
    trust_unverified_pickles: bool = False
    """DANGEROUS: load pickled weights (.pt shards, pytorch_model.bin) from a directory without a verifying completion
    marker. Unpickling runs whatever code the file's author put in it."""
    load_threads: int = Field(4, ge=1, le=64)
    """fast backend: threads placing weights in their tensors (page cache -> pinned buffer -> device copy,
    overlapped); they read the disk themselves only where no prefetch runs."""
    load_prefetch_threads: int = Field(DEFAULT_PREFETCH_THREADS, ge=1, le=64)
    """fast backend: reads in flight of the prefetch, the load's one disk reader, in file order."""
    load_chunk_mb: float = Field(DEFAULT_CHUNK_MB, gt=0, le=1024)
    """fast backend: size of one sequential read (and of each pinned buffer on GPUs)."""
    load_prefetch: bool = True
    """fast backend, builtin loader: one sequential read of the weights from process start (while torch is imported)
    to the last byte, into the page cache, which the loader follows; off: the loader threads read the disk. A field
    loader reads without it."""
    load_prefetch_io: Literal["normal", "idle"] = "normal"
    """fast backend, builtin loader: the prefetch's I/O class. idle (Linux, where the disk's scheduler honours
    classes): its reads wait while others are queued, so that torch's import, faulting its libraries in from the
    same disk, goes first. Under test (docs/results/cold-start.md); normal until measured."""
    load_throttle_mbps: float | None = Field(None, gt=0)
    """Limit weight reads to this many MB/s (tests and rehearsals of a slow volume only)."""
    loader: Loader = "auto"
    """fast backend: how the weights reach the device: builtin (the prefetch and the loader threads above), or a
    field loader that must be installed: fastsafetensors, runai (runai-model-streamer), instanttensor (GPUs only);
    auto: the measured choice (AUTO_LOADER) where it is installed and can run, else builtin."""

    # The fast backend's kernels
    kernel_cache_dir: str | None = None
    """fast backend: where compiled Triton kernels and their autotuning results are kept (Triton's TRITON_CACHE_DIR).
    Default: TRITON_CACHE_DIR if set, else ~/.triton/cache. A directory that survives restarts (an emptyDir survives
    container restarts in the pod) lets a restart skip the compiles."""
    kernel_cache_seed: str | None = None
    """fast backend: a kernel cache made ahead of time (`bloom-server precompile`) whose entries are copied into the
    kernel cache directory at start, so that a first start on a new node skips the compiles. Default:
    MODEL/.bloom-kernel-cache when it exists; off: none."""
    fast_decode: Literal["triton_head", "base"] | None = None
    """fast backend: the decode step's fusion (fast/model.py FUSE_VARIANTS): triton_head, the default, or base, the
    eager layer. It decides which kernels are compiled, so a kernel seed records it."""
    fast_prefill_attention: Literal["eager", "sdpa"] = "sdpa"
    """fast backend: the prefill's attention: sdpa, the default (torch's fused scaled_dot_product_attention with the
    ALiBi bias as its mask: no score matrices written), or eager (baddbmm, softmax, bmm: transformers' BLOOM
    numbers). sdpa measured faster on an H100 and on a CPU (docs/results/fast-engine.md, "H100 run ... tree at
    3fa6f3f")."""
    # Chunking stays off: at 512 tokens a step it made the first token later under load; the prefix cache is on by
    # default on a GPU (docs/results/fast-engine.md "Chunked prefill and the prefix cache").
    prefill_step_tokens: int = Field(0, ge=0)
    """fast backend, continuous batching: tokens one step computes, one per decoding row and the rest for the prompts
    joining the batch, so a long prompt goes in over several steps while the live rows keep producing tokens; 0: no
    limit (a joining prompt goes in whole in one step). Must exceed max_batch_size."""
    prefill_chunk_tokens: int = Field(0, ge=0)
    """fast backend, continuous batching: the most tokens of one prompt a step computes; 0: no limit."""
    prefix_cache_mb: float | None = Field(None, ge=0)
    """fast backend, continuous batching: device memory (MiB per rank) that keeps the KV of recent prompt prefixes, so
    that a prompt starting with one computes only the rest (least recently used blocks go first); 0: off; unset: on
    a GPU a quarter of the device memory the load left free, at most 4 GiB (fast/prefix_cache.py auto_capacity), on
    a CPU off."""
    fast_precompile: str = ""
    """fast backend: the decode kernels compiled ahead of time, in worker processes while the weights load: 0 (or
    off, false, no): none; a number: that many workers; empty: by the CPUs available."""

    # The other commands: `launch`, `precompile`, `client`
    num_gpus: int | None = Field(None, ge=0)
    """`launch`: GPUs to start `serve` on under the deepspeed launcher (default: every visible GPU; 0: one process,
    no launcher); `precompile`: the tensor-parallel ranks the server runs (default 1)."""
    url: str | None = None
    """`client`: the server's URL (default: http://127.0.0.1:PORT, with this `port`)."""

    @field_validator("backend", "dtype", "log_format", "batching", "loader", mode="before")
    @classmethod
    def _name(cls, v: Any, info: ValidationInfo) -> Any:
        """Names are case-blind; the original server's backend names and torch's dtype names map to ours."""
        if not isinstance(v, str):
            return v
        v = v.strip().lower()
        return _SPELLINGS.get(info.field_name or "", {}).get(v, v)

    @field_validator("model", "api_key", "chat_template", "fast_decode", "home", "num_gpus", "url", mode="before")
    @classmethod
    def _empty_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @model_validator(mode="after")
    def _limits(self) -> Settings:
        if self.debug and "log_level" not in self.model_fields_set:
            object.__setattr__(self, "log_level", "debug")  # frozen: set once, here, while the object is built
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


def load_settings(**overrides: Any) -> Settings:
    """Environment plus explicit overrides (flags), by field name. Overrides that are None are ignored."""
    unknown = set(overrides) - set(Settings.model_fields)
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    return Settings(**{_env_name(k): v for k, v in overrides.items() if v is not None})


def _env_name(field: str) -> str:
    """The `BLOOM_*` variable of a field (the first of its names)."""
    alias = Settings.model_fields[field].validation_alias
    assert isinstance(alias, AliasChoices)
    return str(alias.choices[0])
