"""The backend contract, and the shared generate/forward code for backends that hold a transformers-style model."""

from __future__ import annotations

import abc
import dataclasses
import logging
import warnings
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from bloom_server.runtime.protocol import ForwardBatch, GenerateBatch, GenerateOutput
from bloom_server.types import FinishReason, RankContext, cut_row, eos_set

if TYPE_CHECKING:
    import torch

    from bloom_server.progress import LoadProgress
    from bloom_server.settings import Settings
    from bloom_server.storage.model_dir import ModelDir

log = logging.getLogger(__name__)


class Backend(abc.ABC):
    """Runs on every rank. `load()` once, then `generate`/`forward_nll` with the same batch on every rank, in lockstep."""

    name: str = "?"
    # What the backend can do, declared here and read by the composition root and the runtime.
    supports_streaming = False  # generate() takes rank 0's listener (per-step tokens)
    supports_lockstep_stops = False  # with several ranks, rank 0's row stops are shared on every rank
    supports_continuous = False  # cstep(): rows join and leave the running batch at step boundaries
    whole_copy_per_rank = False  # every rank holds all the weights (else this rank's shard)
    spills_over_devices = False  # one process spreads the model over every visible GPU, then the host
    warmup_loggers: tuple[str, ...] = ()  # loggers raised to DEBUG for the warm-up generate (graph-capture times)
    # Set by the composition root before load(): the LoadProgress the backend reports to (phase, bytes loaded /
    # total), and what the class's before_torch() started. None: nobody is watching, nothing was started.
    progress: LoadProgress | None = None
    early: Any = None

    @classmethod
    def before_torch(cls, settings: Settings, model_dir: ModelDir, progress: LoadProgress,
                     local_rank_flag: int | None) -> Any:  # fmt: skip
        """Work to start before torch is imported (the composition root calls it first, on every rank); what it
        returns becomes `early`. Torch-free. None: nothing to start."""
        return None

    @classmethod
    def check(cls, settings: Settings, model_dir: ModelDir, rank: int, world: int) -> None:
        """Refuse, before the port opens and before torch is imported, a setting this backend cannot honour here
        (raise ConfigError naming it). Torch-free. Nothing to check by default."""
        return None

    def kernel_counts(self) -> dict[str, int] | None:
        """Kernels compiled and autotuned so far in this process ({"compiled", "tuned"}), for the warm-up's report;
        None where the backend does not track them."""
        return None

    def __init__(self, settings: Settings, model_dir: ModelDir, ctx: RankContext):
        self.settings = settings
        self.model_dir = model_dir
        self.ctx = ctx

    def _phase(self, name: str) -> None:
        if self.progress is not None:
            self.progress.set_phase(name)

    @abc.abstractmethod
    def load(self) -> None:
        """Build the model on this rank's devices. Raise ConfigError/ModelDirError for what the operator must fix."""

    @abc.abstractmethod
    def generate(self, batch: GenerateBatch) -> GenerateOutput: ...

    @abc.abstractmethod
    def forward_nll(self, batch: ForwardBatch) -> float: ...

    def engine_stats(self) -> dict[str, Any]:
        """Counters the engine keeps for rank 0's /metrics (e.g. {"prefix_cache": {...}}); {} where there are none."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Facts for /info: dtype actually used, devices, engine limits."""
        return {}


class TransformersModelBackend(Backend):
    """A backend whose loaded object has transformers' `generate()` and `forward()`. Subclasses set `self.model`
    and `self.input_device` in `load()`."""

    model: Any = None
    input_device: torch.device | str = "cpu"
    supports_streaming = True  # generate() takes a listener (rank 0's per-step token callback)
    supports_lockstep_stops = True  # and, with several ranks, rank 0's row stops shared on every rank (ChannelStops)
    # Grammars (structured output) through a LogitsProcessor in transformers' generate(): the same code for hf,
    # ds_inference and ds_zero, whose generate() is transformers' own.
    supports_grammar = True
    _grammars: Any = None

    def extra_generate_kwargs(self) -> dict[str, Any]:
        return {}

    def generate(self, batch: GenerateBatch, listener: Any = None, stops: Any = None) -> GenerateOutput:
        """`listener` is given on rank 0 only (the engine's BatchListener): each step's tokens and their
        log-probabilities go to it, and it names rows whose callers left. With one rank those rows stop here. With
        several, `stops` (runtime.lockstep.ChannelStops, on every rank) shares rank 0's decision at each step, so
        every rank stops the same rows at the same step; without it they would run on (a decision taken on rank 0
        alone would split the ranks' collectives)."""
        import torch

        torch.manual_seed(batch.seed)
        input_ids, attention_mask = pad_left(batch.input_ids, batch.pad_token_id, self.input_device)
        kwargs = {"pad_token_id": batch.pad_token_id, "eos_token_id": batch.eos_token_id}
        kwargs.update(batch.params.as_dict())
        kwargs.update(self.extra_generate_kwargs())
        hook = None
        if listener is not None or stops is not None:
            may_stop = self.ctx.world_size == 1 or stops is not None
            hook = StreamHook(listener, batch.max_new_tokens, may_stop=may_stop, stops=stops)
            kwargs.update(hook.generate_kwargs())
        eos_ids = eos_set(kwargs.get("eos_token_id"))
        mask = None
        if any(g is not None for g in batch.grammars):
            mask = GrammarMask(self, batch.grammars, input_ids.shape[1], tuple(sorted(eos_ids)))
            mask.on_failed = getattr(listener, "on_grammar_failed", None)
            kwargs["logits_processor"] = mask.processors(kwargs.get("logits_processor"))
        with torch.inference_mode(), warnings.catch_warnings():
            # min_length past the output (allowed: it means "never stop on EOS") is legal here, not worth a warning.
            warnings.filterwarnings("ignore", message="Unfeasible length constraints", category=UserWarning)
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max(batch.max_new_tokens),
                **kwargs,
            )
        new_tokens = out[:, input_ids.shape[1] :].tolist()
        result = cut_rows(new_tokens, batch.max_new_tokens, eos_ids)
        result = hook.cut_stopped(result) if hook is not None else result
        if mask is not None and mask.failed:  # their output is no answer: the grammar engine gave up on them
            reasons = list(result.finish_reasons)
            for i in mask.failed:
                reasons[i] = FinishReason.GRAMMAR
            result = dataclasses.replace(result, finish_reasons=tuple(reasons))
        return result

    def forward_nll(self, batch: ForwardBatch) -> float:
        import torch

        rows = [c + r for c, r in zip(batch.conditioning_ids, batch.response_ids)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), batch.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (cond, resp) in enumerate(zip(batch.conditioning_ids, batch.response_ids)):
            n = len(cond) + len(resp)
            ids[i, :n] = torch.tensor(cond + resp)
            mask[i, :n] = 1
            labels[i, len(cond) : n] = torch.tensor(resp)
        with torch.inference_mode():
            logits = self.model(
                input_ids=ids.to(self.input_device), attention_mask=mask.to(self.input_device)
            ).logits.float()
        # Token t is predicted from position t-1: shift by one. Mean over every response token of the batch.
        logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        target = labels[:, 1:].reshape(-1).to(logits.device)
        return float(torch.nn.functional.cross_entropy(logits, target, ignore_index=-100))


class GrammarMask:
    """Constrained rows in transformers' generate(): a LogitsProcessor, first in the list this backend passes (after
    transformers' own processors, before its temperature/top-k/top-p warpers), feeds each constrained row's matcher
    the token it chose last, then sets every token its grammar does not allow to -inf, greedy and sampled alike.
    Free rows are untouched. Every rank computes the same masks from the same tokens (bloom_server.structured)."""

    def __init__(self, backend: TransformersModelBackend, grammars: tuple, width: int, eos_ids: tuple[int, ...]):
        self.backend = backend
        self.grammars = grammars
        self.width = width
        self.eos_ids = eos_ids
        self.rows = [i for i, g in enumerate(grammars) if g is not None]
        self.matchers: Any = None
        self.failed: set[int] = set()  # rows the grammar engine gave up on
        self.on_failed: Any = None  # rank 0's listener: told of each such row before its forced EOS is read

    def processors(self, existing: Any) -> Any:
        from transformers import LogitsProcessor, LogitsProcessorList

        mask = self

        class _Mask(LogitsProcessor):
            def __call__(self, input_ids, scores):
                return mask(input_ids, scores)

        return LogitsProcessorList([_Mask(), *(existing or [])])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        from bloom_server import structured

        if self.matchers is None:
            b = self.backend
            if b._grammars is None or b._grammars.vocab_size != scores.shape[-1]:
                b._grammars = structured.Grammars.for_model(b.model_dir.path, self.eos_ids, scores.shape[-1])
            self.matchers = structured.RowMatchers(b._grammars)
            for i in self.rows:
                self.matchers.add(i, self.grammars[i])
        if input_ids.shape[1] > self.width:  # the previous step's tokens
            last = input_ids[:, -1].tolist()
            self.matchers.advance([(i, last[i]) for i in self.rows])
        active = self.matchers.active(self.rows)
        if active:
            bitmask = self.matchers.masks(active).to(scores.device)
            rows = torch.tensor(active, dtype=torch.long, device=scores.device)
            structured.apply_bitmask(scores, rows, bitmask)
        # Rows given up on while filling their mask (which lets only EOS through) or while taking their last token
        # (the matcher is then done, and no mask would hold the row): EOS now, and the listener is told first.
        failed = [i for i in self.rows if i in self.matchers.failed] if self.eos_ids else []
        if failed:
            eos = torch.tensor(self.eos_ids, dtype=torch.long, device=scores.device)
            for i in failed:
                kept = scores[i].index_select(0, eos)
                scores[i] = float("-inf")
                scores[i].index_copy_(0, eos, kept)
                if i not in self.failed:
                    self.failed.add(i)
                    if self.on_failed is not None:
                        self.on_failed(i)
        return scores


class StreamHook:
    """Rank 0's per-step view into transformers' generate(), which changes nothing that is generated.

    A LogitsProcessor, last in the list (after the penalties, before temperature/top-k/top-p), keeps the
    log-softmax of the scores: [batch, vocab]. The StoppingCriteria that runs after the step's token is appended reads
    that token (input_ids[:, -1]) and its log-probability, hands the step to the listener, and (with one rank) marks
    rows the listener stopped, or past their own max_new_tokens, as finished.
    """

    def __init__(self, listener: Any, max_new: tuple[int, ...], may_stop: bool, stops: Any = None):
        self.listener = listener  # None on followers: they only take the shared stops
        self.max_new = max_new
        self.may_stop = may_stop
        self.stops = stops
        self.step = 0
        self.logprobs: torch.Tensor | None = None
        self.stopped_at: dict[int, int] = {}  # row -> tokens it had when it was stopped

    def generate_kwargs(self) -> dict[str, Any]:
        from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        hook = self

        class _Keep(LogitsProcessor):
            def __call__(self, input_ids, scores):  # transformers' signature
                hook.keep(scores)
                return scores

        class _Step(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return hook.after_step(input_ids)

        kwargs: dict[str, Any] = {"stopping_criteria": StoppingCriteriaList([_Step()])}
        if self.listener is not None:
            kwargs["logits_processor"] = LogitsProcessorList([_Keep()])
        return kwargs

    def keep(self, scores: torch.Tensor) -> None:
        import torch

        self.logprobs = torch.log_softmax(scores.float(), dim=-1)

    def after_step(self, input_ids: torch.Tensor) -> torch.Tensor:
        import torch

        tokens = input_ids[:, -1]
        if self.listener is not None:
            logprobs, top = None, None
            if self.logprobs is not None:
                logprobs = self.logprobs.gather(1, tokens[:, None].to(self.logprobs.device))[:, 0].tolist()
                n = int(getattr(self.listener, "top_n", 0) or 0)
                if n > 0:
                    values, ids = torch.topk(self.logprobs, min(n, self.logprobs.shape[-1]), dim=-1)
                    top = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
            self.listener.on_tokens(tokens.tolist(), logprobs, top)
        self.step += 1
        rows = tokens.shape[0]
        done = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
        stopped = set(self.listener.stopped_rows()) if self.listener is not None else set()
        if self.stops is not None:  # rank 0's decision, on every rank
            flags = self.stops.share([i in stopped for i in range(rows)])
            stopped = {i for i, f in enumerate(flags) if f}
        if self.may_stop:
            for row in stopped:
                if row < rows:
                    done[row] = True
                    self.stopped_at.setdefault(row, self.step)
            for row, limit in enumerate(self.max_new):
                if self.step >= limit:
                    done[row] = True
        return done

    def cut_stopped(self, out: GenerateOutput) -> GenerateOutput:
        return cut_stopped(out, self.stopped_at)


def cut_stopped(out: GenerateOutput, stopped_at: dict[int, int]) -> GenerateOutput:
    """Rows stopped early (their callers left) carry tokens past the stop: cut them there, finish reason time."""
    if not stopped_at:
        return out
    rows, reasons = list(out.token_ids), list(out.finish_reasons)
    for row, n in stopped_at.items():
        if len(rows[row]) > n:
            rows[row], reasons[row] = rows[row][:n], FinishReason.TIME
    return GenerateOutput(tuple(rows), tuple(reasons))


def pad_left(rows: tuple[tuple[int, ...], ...], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths -> [batch, max_len] ids and mask, padded on the left (decoder-only generation)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def cut_rows(new_tokens: list[list[int]], max_new: tuple[int, ...], eos_ids: Collection[int]) -> GenerateOutput:
    """Each row of a whole generate call cut by the end-of-row rule (types.cut_row); the rest is batch padding. A row
    that ended neither way stopped for time (max_time)."""
    cut = [cut_row(toks, limit, eos_ids) for toks, limit in zip(new_tokens, max_new)]
    return GenerateOutput(tuple(t for t, _ in cut), tuple(r or FinishReason.TIME for _, r in cut))


def torch_dtype(name: str, device_type: str) -> torch.dtype:
    """Map a dtype setting to torch. 'auto': fp16 on GPU, fp32 on CPU. int8 loads fp16 weights (quantized later)."""
    import torch

    if name == "auto":
        return torch.float16 if device_type == "cuda" else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.float16}[name]
