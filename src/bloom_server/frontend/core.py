"""The asyncio face of the model on rank 0: validate, tokenize, batch, run through the lockstep leader, decode."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from bloom_server.errors import EngineDead, InvalidRequest, NotReady
from bloom_server.frontend.batching import batching_mode
from bloom_server.frontend.batching.config import BatcherConfig
from bloom_server.frontend.batching.continuous import ContinuousBatcher
from bloom_server.frontend.batching.dynamic import BatchListener, DynamicBatcher
from bloom_server.frontend.requests import Completion, GenRequest
from bloom_server.frontend.tokenizer import TextTokenizer
from bloom_server.frontend.validation import check_prompts, validate_generate
from bloom_server.runtime.protocol import CStep, ForwardBatch, GenerateBatch, GenerateOutput, Join
from bloom_server.settings import Settings
from bloom_server.types import Grammar, ModelInfo, SamplingParams, eos_set

__all__ = ["Completion", "Engine", "GenRequest", "State", "StepRunner"]

log = logging.getLogger(__name__)


class StepRunner(Protocol):
    """What the engine needs of the runtime: run a step on every rank (runtime.lockstep.Leader). For continuous
    batching a runner also has `supports_continuous` (True), `attach_continuous(source)` and `wake()`."""

    dead: str | None

    def submit(self, kind: str, payload: Any = None, listener: Any = None) -> Any: ...  # a concurrent.futures.Future


class State(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"


class Engine:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.state = State.LOADING
        self.state_detail = "starting"
        self.info: ModelInfo | None = None
        self.tokenizer: TextTokenizer | None = None
        self.runner: StepRunner | None = None
        self.batcher: DynamicBatcher | ContinuousBatcher | None = None
        self.batching: str | None = None  # "continuous" | "dynamic", once attached
        self.load_seconds: float | None = None
        self.loaded_at: float | None = None  # wall-clock time the model was attached (OpenAI's `created`)
        self.load_progress: Any = None  # the load's LoadProgress, set by the composition root (/ready, /info, /metrics)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Called with each request once it is answered, failed or cancelled (the API layer records metrics).
        self.on_request_done: Callable[[GenRequest, BaseException | None], None] | None = None
        self.on_batch: Callable[[GenerateBatch, float], None] | None = None
        self._grammars: Any = None  # bloom_server.structured.Grammars, built at the first constrained request

    # ---- lifecycle (called by the composition root) ----
    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def attach(self, runner: StepRunner, tokenizer: TextTokenizer, info: ModelInfo) -> None:
        """The model is loaded on every rank: wire it in (readiness still waits for warm-up)."""
        self.runner, self.tokenizer, self.info = runner, tokenizer, info
        self.loaded_at = time.time()
        s = self.settings
        self.batching = batching_mode(
            self.settings.batching, bool(getattr(runner, "supports_continuous", False)), self.settings.backend
        )
        on_batch = lambda batch, seconds: self.on_batch(batch, seconds) if self.on_batch else None  # noqa: E731 - a late-bound hook, read at each call
        config = BatcherConfig(s.max_batch_size, s.max_queued_requests, tokenizer.pad_token_id,
                               tokenizer.eos_token_id, s.queued_tokens_limit)  # fmt: skip
        if self.batching == "continuous":
            self.batcher = ContinuousBatcher(runner, config, on_batch)
        else:
            self.batcher = DynamicBatcher(self._run_generate, config, s.batch_wait_ms / 1000.0, on_batch)
        if info is not None:
            info.extra.setdefault("batching", self.batching)
        log.info("batching: %s", self.batching)

    def warmup(self) -> None:
        """One real generate on every rank (from the loading thread), then ready."""
        assert self.runner is not None and self.tokenizer is not None
        if self.settings.warmup:
            self.state_detail = "warming up"
            ids = self.tokenizer.encode("Hello") or [self.tokenizer.eos_token_id or 0]
            batch = GenerateBatch(
                input_ids=(tuple(ids),),
                max_new_tokens=(2,),
                params=SamplingParams(),
                seed=0,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
            if self.batching == "continuous":  # the path requests take: one cstep admits, decodes and retires it
                join = Join(0, batch.input_ids[0], 2, batch.params, 0, batch.eos_token_id, batch.pad_token_id)
                self.runner.submit("cstep", CStep(joins=(join,))).result()
            else:
                self.runner.submit("generate", batch).result()
        self.state, self.state_detail = State.READY, "ready"

    def drain(self) -> None:
        """Stop taking new requests (readiness false, 503); what was accepted still runs."""
        if self.state != State.DEAD:
            self.state, self.state_detail = State.DRAINING, "draining: shutting down"

    def fail(self, reason: str) -> None:
        self.state, self.state_detail = State.DEAD, reason

    @property
    def idle(self) -> bool:
        """No request waits or runs (draining can end)."""
        return self.batcher is None or self.batcher.idle

    def engine_stats(self) -> dict[str, Any]:
        """The backend's counters on rank 0 (e.g. the prefix cache's), for /metrics; {} before the model is loaded."""
        stats = getattr(self.runner, "engine_stats", None)
        return stats() if callable(stats) else {}

    @property
    def ready(self) -> bool:
        return self.state == State.READY and not (self.runner and self.runner.dead)

    @property
    def alive(self) -> bool:
        return self.state != State.DEAD and not (self.runner and self.runner.dead)

    def _require_ready(self) -> None:
        if self.runner is not None and self.runner.dead:
            raise EngineDead(self.runner.dead)
        if self.state != State.READY:
            raise NotReady(f"the model is not ready ({self.state_detail})")

    # ---- requests ----
    def grammar_refusal(self) -> str | None:
        """Why this server cannot constrain output (None: it can). Asked before anything is queued."""
        from bloom_server import structured

        backend = getattr(self.runner, "backend", None)
        name = self.settings.backend
        if not getattr(backend, "supports_grammar", False):
            return f"the {name} backend cannot constrain its output"
        if self.batching == "dynamic" and not getattr(backend, "supports_grammar_dynamic", True):
            return f"the {name} backend constrains output with continuous batching only (--batching auto or continuous)"
        return structured.available()

    def check_grammar(self, grammar: Grammar, field: str) -> None:
        """Compile (cached) and check a grammar on rank 0: a bad schema or regex is a 422 naming `field`, before
        anything is queued or broadcast."""
        from bloom_server import structured

        refusal = self.grammar_refusal()
        if refusal is not None:
            raise InvalidRequest(f"{field}: not supported here: {refusal}", field=field)
        assert self.tokenizer is not None and self.info is not None
        if self._grammars is None:
            eos = self.tokenizer.eos_token_id
            self._grammars = structured.Grammars.for_model(Path(self.info.model_dir), (eos,) if eos is not None else ())
        self._grammars.check(grammar, field)

    async def _run_generate(self, batch: GenerateBatch, listener: BatchListener | None = None) -> GenerateOutput:
        assert self.runner is not None
        return await asyncio.wrap_future(self.runner.submit("generate", batch, listener=listener))

    def _check_count(self, texts: list[str] | list[str | list[int]], field: str, n: int = 1) -> None:
        if not texts:
            raise InvalidRequest(f"{field}: at least one prompt is required", field=field)
        if len(texts) * n > self.settings.max_batch_size:
            what = f"{len(texts)} prompts" + (f" x {n} choices" if n > 1 else "")
            raise InvalidRequest(
                f"{field}: {what}; the limit is {self.settings.max_batch_size} rows (max batch size)",
                field=field,
                limit=self.settings.max_batch_size,
            )

    def _encode(self, prompts: list[str] | list[str | list[int]], field: str) -> list[list[int]]:
        """Token ids of each prompt: a string is encoded, a list of token ids (OpenAI's prompt as tokens) is taken
        as it is once every id is in the vocabulary."""
        assert self.tokenizer is not None
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(self.tokenizer.encode_batch(texts) if texts else [])
        rows = []
        vocab = self.tokenizer.vocab_size
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                rows.append(next(encoded))
                continue
            if not p or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p):
                raise InvalidRequest(
                    f"{field}[{i}]: token ids must be a non-empty list of integers from 0 to {vocab - 1}",
                    field=f"{field}[{i}]",
                    limit=vocab - 1,
                )
            rows.append(list(p))
        return rows

    def submit(
        self,
        texts: list[str] | list[str | list[int]],
        kwargs: dict[str, Any],
        *,
        seed: int | None = None,
        field: str = "text",
        n: int = 1,
        stop: tuple[str, ...] = (),
        timeout_s: float | None = None,
        top_n: int = 0,
        truncate: int | None = None,
        request_id: str | None = None,
        streaming: bool = False,
        grammar: Grammar | None = None,
        grammar_field: str = "grammar",
    ) -> GenRequest:
        """Validate, tokenize and queue a request; raises InvalidRequest/Overloaded/NotReady before anything runs.

        n: rows per prompt (OpenAI's `n`). stop: strings that end a row (excluded from its text). timeout_s: the
        request's deadline from now (the server's request timeout applies too). top_n: alternatives per token.
        truncate: keep only the last `truncate` prompt tokens. streaming: the caller reads token events with
        text (stream()); without it events carry no text until the end. `max_time` is honoured per row, from the start of its
        batch, on rank 0 (never a wall-clock decision taken separately on each rank). grammar: every row's output
        must follow it (bloom_server.structured); checked here, a failure names `grammar_field`.
        """
        self._require_ready()
        assert self.tokenizer is not None and self.batcher is not None
        self._check_count(texts, field, n)
        s = self.settings
        spec = validate_generate(
            kwargs,
            max_new_tokens_limit=s.max_new_tokens,
            cap_max_new_tokens=s.cap_max_new_tokens,
            default_remove_input=s.default_remove_input_from_output,
            vocab_size=self.tokenizer.vocab_size,
            seed=seed,
        )
        if grammar is not None:
            for f in ("min_length", "min_new_tokens"):
                if kwargs.get(f):
                    # Holding the end of sequence back could leave a finished grammar no token at all.
                    raise InvalidRequest(f"{f}: cannot be combined with {grammar_field} (the grammar decides where the "
                                         "output ends)", field=f)  # fmt: skip
            self.check_grammar(grammar, grammar_field)
            spec = dataclasses.replace(spec, grammar=grammar, grammar_field=grammar_field)
        params = spec.params.as_dict()
        max_time = params.pop("max_time", None)
        eos_ids = eos_set(params.get("eos_token_id", self.tokenizer.eos_token_id))
        spec = dataclasses.replace(spec, params=SamplingParams.from_dict(params))
        rows = self._encode(texts, field)
        if truncate is not None:
            rows = [r[-truncate:] for r in rows]
        check_prompts(
            rows,
            max_input_length=s.max_input_length,
            max_new_tokens=spec.max_new_tokens,
            total_limit=s.total_tokens_limit,
            field=field,
        )
        limits = [t for t in (timeout_s, s.request_timeout_s) if t is not None]
        deadline = time.monotonic() + min(limits) if limits else None
        req = GenRequest(
            [r for r in rows for _ in range(n)],
            spec,
            self.tokenizer,
            stop=stop,
            eos_ids=eos_ids,
            deadline=deadline,
            max_time=max_time,
            top_n=top_n,
            request_id=request_id,
            streaming=streaming,
        )
        if self.on_request_done is not None:
            req._done.add_done_callback(lambda fut: self._report(req, fut))
        self.batcher.submit(req)
        return req

    def _report(self, req: GenRequest, fut: asyncio.Future) -> None:
        try:
            assert self.on_request_done is not None
            self.on_request_done(req, fut.exception())
        except Exception:  # metrics never break a request
            log.exception("request report failed")

    async def generate(
        self, texts: list[str], kwargs: dict[str, Any], *, seed: int | None = None, field: str = "text"
    ) -> tuple[list[Completion], bool]:
        """Returns the completions and whether the prompt is to be kept in the output text."""
        req = self.submit(texts, kwargs, seed=seed, field=field)
        try:
            return await req.result(), not req.spec.remove_input_from_output
        finally:
            req.cancel("caller left")

    def tokenize(self, texts: list[str], field: str = "text") -> list[list[int]]:
        if self.tokenizer is None:
            raise NotReady(f"the tokenizer is not loaded yet ({self.state_detail})")
        self._check_count(texts, field)
        return self.tokenizer.encode_batch(texts)

    async def forward(self, conditioning_text: list[str], response: list[str]) -> float:
        self._require_ready()
        assert self.tokenizer is not None and self.runner is not None
        self._check_count(conditioning_text, "conditioning_text")
        if len(conditioning_text) != len(response):
            raise InvalidRequest(
                f"conditioning_text and response must have the same length "
                f"({len(conditioning_text)} != {len(response)})",
                field="response",
                limit=len(conditioning_text),
            )
        cond = self.tokenizer.encode_batch(conditioning_text)
        resp = self.tokenizer.encode_batch(response)
        for i, (c, r) in enumerate(zip(cond, resp)):
            if not r:
                raise InvalidRequest(f"response[{i}]: is empty after tokenization", field=f"response[{i}]")
            if len(c) + len(r) > self.settings.total_tokens_limit:
                raise InvalidRequest(
                    f"conditioning_text[{i}] + response[{i}] are {len(c) + len(r)} tokens; "
                    f"the limit is {self.settings.total_tokens_limit}",
                    field=f"response[{i}]",
                    limit=self.settings.total_tokens_limit,
                )
        if any(not c for c in cond):
            # The first response token needs something to be predicted from: start from the BOS/EOS token.
            start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else 0
            cond = [c or [start] for c in cond]
        batch = ForwardBatch(tuple(map(tuple, cond)), tuple(map(tuple, resp)), self.tokenizer.pad_token_id)
        return await asyncio.wrap_future(self.runner.submit("forward", batch))
