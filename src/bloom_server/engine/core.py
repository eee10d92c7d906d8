"""The asyncio face of the model on rank 0: validate, tokenize, batch, run through the lockstep leader, decode."""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from bloom_server.engine.scheduler import Batcher
from bloom_server.engine.tokenizer import TextTokenizer
from bloom_server.engine.validation import check_prompts, validate_generate
from bloom_server.errors import EngineDead, InvalidRequest, NotReady
from bloom_server.settings import Settings
from bloom_server.types import FinishReason, ForwardBatch, GenerateBatch, GenerateOutput, ModelInfo, SamplingParams

log = logging.getLogger(__name__)


class StepRunner(Protocol):
    """What the engine needs of the runtime: run a step on every rank (runtime.lockstep.Leader)."""

    dead: str | None

    def submit(self, kind: str, payload: Any = None) -> Any: ...  # a concurrent.futures.Future


class State(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: FinishReason


class Engine:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.state = State.LOADING
        self.state_detail = "starting"
        self.info: ModelInfo | None = None
        self.tokenizer: TextTokenizer | None = None
        self.runner: StepRunner | None = None
        self.batcher: Batcher | None = None
        self.load_seconds: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle (called by the composition root) ----
    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def attach(self, runner: StepRunner, tokenizer: TextTokenizer, info: ModelInfo) -> None:
        """The model is loaded on every rank: wire it in (readiness still waits for warm-up)."""
        self.runner, self.tokenizer, self.info = runner, tokenizer, info
        self.batcher = Batcher(
            self._run_generate,
            max_batch_size=self.settings.max_batch_size,
            max_queued=self.settings.max_queued_requests,
            wait_s=self.settings.batch_wait_ms / 1000.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )

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
            self.runner.submit("generate", batch).result()
        self.state, self.state_detail = State.READY, "ready"

    def drain(self) -> None:
        """Stop taking new requests (readiness false, 503); what was accepted still runs."""
        if self.state != State.DEAD:
            self.state, self.state_detail = State.DRAINING, "draining: shutting down"

    def fail(self, reason: str) -> None:
        self.state, self.state_detail = State.DEAD, reason

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
    async def _run_generate(self, batch: GenerateBatch) -> GenerateOutput:
        assert self.runner is not None
        return await asyncio.wrap_future(self.runner.submit("generate", batch))

    def _check_count(self, texts: list[str], field: str) -> None:
        if not texts:
            raise InvalidRequest(f"{field}: at least one prompt is required", field=field)
        if len(texts) > self.settings.max_batch_size:
            raise InvalidRequest(
                f"{field}: {len(texts)} prompts; the limit is {self.settings.max_batch_size} (max batch size)",
                field=field,
                limit=self.settings.max_batch_size,
            )

    async def generate(
        self, texts: list[str], kwargs: dict[str, Any], *, seed: int | None = None, field: str = "text"
    ) -> tuple[list[Completion], bool]:
        """Returns the completions and whether the prompt is to be kept in the output text."""
        self._require_ready()
        assert self.tokenizer is not None and self.batcher is not None
        self._check_count(texts, field)
        s = self.settings
        spec = validate_generate(
            kwargs,
            max_new_tokens_limit=s.max_new_tokens,
            cap_max_new_tokens=s.cap_max_new_tokens,
            default_remove_input=s.default_remove_input_from_output,
            vocab_size=self.tokenizer.vocab_size,
            seed=seed,
        )
        rows = self.tokenizer.encode_batch(texts)
        check_prompts(
            rows,
            max_input_length=s.max_input_length,
            max_new_tokens=spec.max_new_tokens,
            total_limit=s.total_tokens_limit,
            field=field,
        )
        out = await self.batcher.submit(rows, spec)
        completions = []
        for prompt, ids, reason in zip(rows, out.token_ids, out.finish_reasons):
            full = (list(prompt) + list(ids)) if not spec.remove_input_from_output else list(ids)
            completions.append(Completion(self.tokenizer.decode(full), tuple(ids), len(prompt), reason))
        return completions, not spec.remove_input_from_output

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

