"""The project's own BLOOM engine (bloom_server.fast) as a lockstep backend.

Every rank holds its tensor-parallel share (heads, MLP columns and vocabulary rows split over the launcher's ranks;
one rank holds everything) read straight from the checkpoint's safetensors slices, and runs the same static batch
through `FastEngine.generate`: prefill, then decode steps replayed as CUDA graphs on GPUs (eager on CPUs). With
continuous batching (`cstep`), the same slots are scheduled by a RowScheduler instead: each step applies rank 0's
joins and leaves, then runs one leave/admit/decode/retire step, the same on every rank (with the settings' chunked
prefill and prefix cache, fast/rows.py).
Sampling follows transformers' meaning of every generate() setting the API accepts (see fast/sampling.py), seeded
from the batch's seed on every rank, so ranks agree token for token.

`--dtype int8`: weight-only int8 (fast/quant.py), activations fp16 on GPUs (fp32 on CPUs). An int8 pre-sharded
checkpoint (`bloom-server preshard --dtype int8`) is read as stored; a floating checkpoint is read in the activation
dtype and quantized on the device, which needs room for its floating weights first (refused up front otherwise).

torch and the engine are imported inside methods: importing this module does nothing.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from bloom_server.backends.base import Backend, cut_rows, torch_dtype
from bloom_server.errors import ConfigError, ModelDirError
from bloom_server.runtime.protocol import CStepResult, ForwardBatch, GenerateBatch, GenerateOutput
from bloom_server.types import FinishReason, row_end

if TYPE_CHECKING:
    from bloom_server.fast.engine import FastEngine
    from bloom_server.fast.rows import RowScheduler

log = logging.getLogger(__name__)

# generation_config.json keys that change what a generate() call does when the request leaves them out.
_GENERATION_DEFAULTS = ("temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "no_repeat_ngram_size")


class FastBackend(Backend):
    name = "fast"
    engine: FastEngine | None = None
    supports_streaming = True  # generate() takes rank 0's listener (per-step tokens, log-probabilities, stops)
    supports_continuous = True  # cstep(): rows join and leave the running batch at step boundaries
    # Grammars (structured output) in the continuous batcher only: a mask needs the previous token on the host,
    # which the static generate() loop never reads (its decode loop runs without host syncs).
    supports_grammar = True
    supports_grammar_dynamic = False
    warmup_loggers = ("bloom_server.fast.engine",)

    @classmethod
    def before_torch(cls, settings: Any, model_dir: Any, progress: Any, local_rank_flag: int | None) -> Any:
        from bloom_server.backends.fast_coldstart import before_torch

        return before_torch(settings, model_dir, progress, local_rank_flag)

    @classmethod
    def check(cls, settings: Any, model_dir: Any, rank: int, world: int) -> None:
        from bloom_server.backends.fast_loader import check

        check(settings, model_dir, rank, world)

    def kernel_counts(self) -> dict[str, int] | None:
        try:
            from bloom_server.fast import triton_kernels as tk

            return tk.kernel_counts() if tk.HAVE_TRITON else None
        except Exception:  # noqa: BLE001 - a report only: no counts rather than a failed warm-up
            return None

    _batcher: RowScheduler | None = None

    def load(self) -> None:
        """Weights straight from disk into this rank's tensors at the disk's speed (bloom_server.fast.weights
        read_safetensors: large parallel sequential reads, pinned buffers and overlapped device copies on GPUs; a
        pre-sharded directory gives each rank one file of exactly its tensors), then the KV cache. CUDA graphs are
        captured later: the warm-up's own, then the rest while the engine is idle (`idle_work`)."""
        import torch

        t_load = time.perf_counter()
        from bloom_server.fast.engine import FastEngine
        from bloom_server.fast.shapes import BloomShape
        from bloom_server.fast.tp import TPGroup
        from bloom_server.fast.weights import from_checkpoint
        from bloom_server.storage.prefetch import ReadThrottle

        if self.model_dir.layout not in ("hf", "fast_presharded"):
            raise ModelDirError(
                f"{self.model_dir.path} is a DeepSpeed pre-sharded checkpoint: it loads only with --backend ds_inference"
            )
        from bloom_server.fast.preshard import PRESHARD_DTYPES
        from bloom_server.storage.safetensors import read_manifest

        ctx = self.ctx
        device = torch.device("cuda", ctx.local_rank) if ctx.device_type == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        quant = self.settings.dtype == "int8"
        stored_int8 = (read_manifest(self.model_dir.path) or {}).get("dtype") == PRESHARD_DTYPES["int8"]
        if stored_int8 and not quant:
            raise ConfigError(f"dtype {self.settings.dtype!r}: {self.model_dir.path} holds int8 weights "
                              "(bloom-server preshard --dtype int8): serve it with --dtype int8")  # fmt: skip
        # int8: the activations in the model dtype "auto" picks (fp16 on GPUs, fp32 on CPUs).
        dtype = torch_dtype("auto" if quant else self.settings.dtype, ctx.device_type)
        shape = BloomShape.from_dir(self.model_dir.path)
        if shape.n_head % ctx.world_size:
            raise ConfigError(f"{shape.n_head} attention heads do not split over {ctx.world_size} ranks")
        tp = TPGroup(rank=ctx.rank, world=ctx.world_size)
        s = self.settings
        kv_hold = None
        if device.type == "cuda":
            # The KV cache's device memory is taken now (its size comes from the settings, not from what the weights
            # leave free) and handed back just before the engine allocates the same two blocks: the caching allocator
            # gives them back without a cudaMalloc, and the reads below start at once (the read-ahead is running).
            cache_shape = (shape.n_layer, s.max_batch_size, shape.n_head // ctx.world_size, s.total_tokens_limit,
                           shape.head_dim)  # fmt: skip
            kv_hold = [torch.empty(cache_shape, dtype=dtype, device=device) for _ in range(2)]
        # On CUDA with Triton: a thread that compiles/loads and autotunes the decode kernels and warms cuBLAS while
        # the weights stream in (the compile workers serve.py started put the binaries in Triton's cache); None on
        # CPU, without Triton, for fp32 and with fast_precompile off (fast/triton_kernels.py start_prewarm).
        from bloom_server.fast import triton_kernels as tk

        progress = self.progress

        def keep_going() -> bool:  # multi-row variants only while most of the weights are still to come
            return progress is None or not progress.total_bytes or progress.loaded_bytes < 0.75 * progress.total_bytes

        def reserve() -> int:  # device bytes the load still allocates: the weights to come (the KV cache is held)
            total = progress.total_bytes if progress is not None and progress.total_bytes else \
                shape.params() * torch.empty((), dtype=dtype).element_size() // ctx.world_size  # fmt: skip
            return max(0, total - (progress.loaded_bytes if progress is not None else 0))

        if quant and not stored_int8 and device.type == "cuda":
            # Quantizing at load holds this rank's floating weights first: refuse now if they cannot fit.
            need = shape.params() * torch.empty((), dtype=dtype).element_size() // ctx.world_size
            free = torch.cuda.mem_get_info(device)[0]
            if need > free:
                raise ConfigError(
                    f"dtype 'int8': {self.model_dir.path} is a floating checkpoint, quantized at load from this "
                    f"rank's {need / 1e9:.1f} GB of {dtype} weights, and {device} has {free / 1e9:.1f} GB free: "
                    f"write the int8 checkpoint once (bloom-server preshard --dtype int8 --tp {ctx.world_size}) "
                    "and serve that"
                )
        from bloom_server.fast.coldstart.precompile import enabled, plan_facts, weight_format

        prewarm = tk.start_prewarm(
            device, plan_facts(self.model_dir.path, world=ctx.world_size, dtype=str(dtype).replace("torch.", ""),
                               max_batch=s.max_batch_size, max_seq=s.total_tokens_limit, fast_decode=s.fast_decode,
                               weights=weight_format(str(s.dtype))),
            hidden=shape.hidden_size, workers=self.early, keep_going=keep_going,
            reserve=reserve, enabled=enabled(s.fast_precompile),
        )  # fmt: skip
        from bloom_server.backends.fast_loader import for_load

        # The read path (BLOOM_LOADER): the builtin one, or a field loader (fast/loaders.py), now with the device known.
        loader = for_load(s, self.model_dir, ctx.rank, ctx.world_size, cuda=device.type == "cuda")
        self._phase("reading weights")
        if self.progress is not None:  # the cold start's accounting (scripts/bench/cold_start.py)
            self.progress.note_since_start("reading weights from")
        t0 = time.perf_counter()
        weights = from_checkpoint(
            self.model_dir.path, shape, tp, dtype=dtype, device=device, progress=self.progress,
            threads=s.load_threads, chunk_bytes=max(4096, int(s.load_chunk_mb * 2**20)),
            throttle=ReadThrottle(s.load_throttle_mbps) if s.load_throttle_mbps else None, loader=loader,
        )  # fmt: skip
        read_s = time.perf_counter() - t0
        read_bytes = weights.nbytes()
        if quant and not weights.quantized:
            from bloom_server.fast.quant import quantize_weights

            self._phase("quantizing weights")
            t0 = time.perf_counter()
            quantize_weights(weights, tp)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the floating weights' blocks back to the device
            if self.progress is not None:
                self.progress.note("int8 quantization at load, s", time.perf_counter() - t0)
        self._phase("allocating cache")
        del kv_hold
        self.engine = FastEngine(
            weights,
            shape,
            max_batch=self.settings.max_batch_size,
            max_seq=self.settings.total_tokens_limit,
            tp=tp,
        )
        if self.settings.fast_decode is not None:
            self.engine.model.set_fuse(self.settings.fast_decode)
        self.engine.model.prefill_attention = self.settings.fast_prefill_attention
        self._defaults = _generation_defaults(self.model_dir.path)
        self._dtype = "int8" if weights.quantized else str(dtype).replace("torch.", "")
        if prewarm is not None:
            # The warm-up that follows captures a CUDA graph: nothing else may run on the device by then.
            if prewarm.running():
                self._phase("compiling kernels")
            waited = prewarm.finish()
            if self.progress is not None:
                self.progress.note("kernels ahead (load thread helper)", time.perf_counter() - prewarm.t0)
                self.progress.note("kernels waited after the weights", waited)
                for k, v in prewarm.times.items():
                    if not k.startswith("  "):
                        self.progress.note(f"kernels: {k}", v)
            log.info("rank %d: kernels ahead of the warm-up (%.1f s from load start, %.2f s waited after the cache): "
                     "%s", ctx.rank, time.perf_counter() - t_load, waited, prewarm.summary())  # fmt: skip
            log.info("rank %d: kernel calls ahead (compile or cache load + autotune): %s", ctx.rank, prewarm.details())
        log.info(
            "rank %d: fast engine %s on %s, %d of %d heads, %.2f GB weights read in %.2f s (%.2f GB/s, %s loader), "
            "%.2f GB KV cache",
            ctx.rank,
            self._dtype,
            device,
            shape.n_head // ctx.world_size,
            shape.n_head,
            read_bytes / 1e9,
            read_s,
            read_bytes / 1e9 / max(read_s, 1e-9),
            loader,
            self.engine.kv_cache_bytes() / 1e9,
        )

    def generate(self, batch: GenerateBatch, listener: Any = None) -> GenerateOutput:
        """`listener` is given on rank 0 only: each step's tokens and log-probabilities go to it, and it names rows
        whose callers left; with one rank the call ends once every row is finished or stopped (with several, a stop
        decided on rank 0 alone would split the ranks' collectives, so they run on)."""
        from bloom_server.fast.sampling import SamplingConfig

        assert self.engine is not None, "load() first"
        kwargs = batch.params.as_dict()
        cfg = SamplingConfig.from_generate_kwargs(
            kwargs,
            eos_token_id=batch.eos_token_id,
            prompt_width=max(len(r) for r in batch.input_ids),
            defaults=self._defaults,
        )
        stream = None
        if listener is not None:
            stream = _Stream(listener, batch.max_new_tokens, set(cfg.eos_ids), may_stop=self.ctx.world_size == 1)
        result = self.engine.generate(
            batch.input_ids,
            max(batch.max_new_tokens),
            cfg,
            seed=batch.seed,
            pad_token_id=kwargs.get("pad_token_id", batch.pad_token_id),
            max_time=kwargs.get("max_time"),
            observer=stream,
        )
        out = cut_rows(result.tokens, batch.max_new_tokens, set(cfg.eos_ids))
        return stream.cut_stopped(out) if stream is not None else out

    def cstep(self, step: Any, rank0: bool = False) -> CStepResult:
        """One continuous-batching step (frontend/batching/continuous.py's CStep: `joins`, `leaves`), the same on every rank:
        rows that left are retired, every live row's next decode is queued, the previous step's tokens are read
        (pipelined one step ahead: fast/rows.py), rows that finished by EOS or length leave, joined rows are
        admitted and prefilled. `rank0`: the caller delivers the tokens, so their log-probabilities (and top
        alternatives where a row asks) are computed too; they stay out of the ranks' digest."""
        from bloom_server.fast.rows import STOPPED, Request
        from bloom_server.fast.sampling import SamplingConfig

        assert self.engine is not None, "load() first"
        if self._batcher is None:
            self._batcher = self._row_scheduler()
        cb = self._batcher
        if cb.grammars is None and any(j.grammar is not None for j in step.joins):
            from bloom_server.structured import Grammars

            eos = next((j.eos_token_id for j in step.joins if j.eos_token_id is not None), None)
            cb.grammars = Grammars.for_model(self.model_dir.path, (eos,) if eos is not None else (),
                                             self.engine.shape.vocab_size)  # fmt: skip
        finished: list[tuple[Any, str]] = []
        for rid in step.leaves:
            if cb.leave(rid) is not None:
                finished.append((rid, STOPPED))
        for j in step.joins:
            kwargs = j.params.as_dict()
            cfg = SamplingConfig.from_generate_kwargs(
                kwargs, eos_token_id=j.eos_token_id, prompt_width=len(j.prompt), defaults=self._defaults
            )
            cb.add(Request(rid=j.rid, prompt=tuple(j.prompt), max_new_tokens=j.max_new_tokens, cfg=cfg, seed=j.seed,
                           top_n=j.top_n if rank0 else 0, pad_token_id=kwargs.get("pad_token_id", j.pad_token_id),
                           grammar=j.grammar))  # fmt: skip
        tokens: list[tuple[Any, int]] = []
        firsts: list[tuple[Any, int, int]] = []
        extra: list | None = [] if rank0 else None
        while True:  # once; a draining step (a cstep on its own, e.g. the warm-up) until every row has finished
            for r in cb.step(logprobs=rank0):
                finished.append((r.rid, _REASONS[r.finish]))  # type: ignore[index]
            tokens.extend(zip(cb.out_rids, cb.out_tokens))
            firsts.extend((r.rid, r.wait_steps or 0, r.prefill_steps or 0) for r in cb.out_firsts)
            if extra is not None:
                extra.extend(cb.out_extra)
            if not getattr(step, "drain", False) or cb.idle:
                break
        return CStepResult(tuple(tokens), tuple(finished), len(cb.live) + len(cb.joining) + len(cb.waiting),
                           tuple(extra) if extra is not None else None, tuple(firsts))  # fmt: skip

    def _row_scheduler(self) -> RowScheduler:
        """The continuous batch's rows over the engine's slots, with the settings' chunked prefill and prefix cache
        (the same on every rank: the settings are)."""
        from bloom_server.fast.prefix_cache import PrefixCache
        from bloom_server.fast.rows import RowScheduler

        assert self.engine is not None
        s = getattr(self, "settings", None)
        set_mb = s.prefix_cache_mb if s is not None else 0.0
        cache_bytes = int(set_mb * 2**20) if set_mb is not None else self._auto_prefix_cache_bytes()
        try:
            cache = PrefixCache(self.engine, cache_bytes) if cache_bytes else None
        except ValueError as e:  # too small for one block: an explicit size is refused, the automatic one is off
            if set_mb is not None:
                raise ConfigError(f"prefix_cache_mb {set_mb}: {e}") from e
            log.info("rank %d: no prefix cache (%s)", self.ctx.rank, e)
            cache = None
        if cache is not None:
            log.info("rank %d: prefix cache of %.2f GB (%d blocks of %d tokens)", self.ctx.rank,
                     cache.capacity_bytes / 1e9, cache.pages, cache.block)  # fmt: skip
        return RowScheduler(
            self.engine,
            step_tokens=s.prefill_step_tokens if s is not None else 0,
            chunk_tokens=s.prefill_chunk_tokens if s is not None else 0,
            prefix_cache=cache,
        )

    def _auto_prefix_cache_bytes(self) -> int:
        """The prefix cache's size when none is set: on a GPU, from the device memory free on the emptiest rank (every
        rank holds as many blocks, so they evict alike); on a CPU none."""
        import torch

        from bloom_server.fast.prefix_cache import auto_capacity

        assert self.engine is not None
        device = self.engine.device
        if device.type != "cuda":
            return 0
        free = torch.tensor([float(torch.cuda.mem_get_info(device)[0])], dtype=torch.float64, device=device)
        self.engine.model.tp.all_reduce(free, "min")
        return auto_capacity(int(free.item()))

    def engine_stats(self) -> dict[str, Any]:
        """Counters of the continuous batch's prefix cache (when it is on and made) and of the decode graphs (on
        CUDA): read by rank 0's /metrics from the event loop while the engine thread updates them (plain numbers)."""
        out: dict[str, Any] = {}
        cache = self._batcher.prefix_cache if self._batcher is not None else None
        if cache is not None:
            out["prefix_cache"] = cache.stats()
        if self.engine is not None and self.engine.cuda_graphs:
            out["decode_graphs"] = dict(self.engine.graph_stats)
        return out

    def idle_work(self) -> bool:
        """The lockstep loop's idle step (nothing live or queued; every rank runs it alike): capture one decode graph
        the engine does not hold yet. True while more remain."""
        if self.engine is None or (self._batcher is not None and not self._batcher.idle):
            return False
        return self.engine.capture_next()

    def forward_nll(self, batch: ForwardBatch) -> float:
        assert self.engine is not None, "load() first"
        return self.engine.nll(batch.conditioning_ids, batch.response_ids)

    def describe(self) -> dict[str, Any]:
        e = self.engine
        if e is None:
            return {}
        return {
            "dtype": self._dtype,
            "activation_dtype": str(e.dtype).replace("torch.", ""),
            # This rank's weights as resident on its device (int8 weights and their scales; docs/metrics.md).
            "weight_bytes": e.model.w.nbytes(),
            "device": str(e.device),
            "tp_size": self.ctx.world_size,
            "max_batch": e.max_batch,
            "max_seq": e.max_seq,
            "cuda_graphs": e.cuda_graphs,
        }


_REASONS = {"eos": FinishReason.EOS.value, "length": FinishReason.LENGTH.value, "grammar": FinishReason.GRAMMAR.value}


class _Stream:
    """The engine's step observer that feeds the engine's BatchListener (see backends/base.py StreamHook for the
    transformers side). Hand-over lags one step: step t's tokens go to the host after step t+1 is queued, so reading
    them never leaves the GPU idle. Log-probabilities are of the scores the token was chosen from."""

    def __init__(self, listener: Any, max_new: tuple[int, ...], eos_ids: set[int], may_stop: bool):
        self.listener = listener
        self.max_new = max_new
        self.eos_ids = eos_ids
        self.may_stop = may_stop
        self.top_n = int(getattr(listener, "top_n", 0) or 0)
        self.pending: tuple | None = None
        self.delivered = 0  # steps handed to the listener
        self.finished = [False] * len(max_new)  # EOS seen, or the row's own max_new_tokens reached
        self.stopped_at: dict[int, int] = {}  # row -> tokens it had when its caller left

    def observe(self, step: int, tokens: Any, logits: Any) -> None:
        import torch

        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
        chosen = logprobs.gather(1, tokens[:, None])[:, 0]
        top = torch.topk(logprobs, min(self.top_n, logprobs.shape[-1]), dim=-1) if self.top_n else None
        nxt = (tokens.clone(), chosen, None if top is None else (top.indices, top.values))
        self._deliver()
        self.pending = nxt

    def _deliver(self) -> None:
        if self.pending is None:
            return
        tokens_d, chosen_d, top_d = self.pending
        self.pending = None
        tokens, logprobs = tokens_d.tolist(), chosen_d.tolist()
        top = None if top_d is None else [list(zip(i, v)) for i, v in zip(top_d[0].tolist(), top_d[1].tolist())]
        self.listener.on_tokens(tokens, logprobs, top)
        self.delivered += 1
        for row, tok in enumerate(tokens):
            if row_end(tok, self.delivered, self.max_new[row], self.eos_ids) is not None:
                self.finished[row] = True
        if self.may_stop:
            for row in self.listener.stopped_rows():
                if row < len(self.finished) and not self.finished[row]:
                    self.stopped_at.setdefault(row, self.delivered)

    def stop(self) -> bool:
        """With one rank: every row finished or stopped (by what the listener has seen so far)."""
        return self.may_stop and all(f or r in self.stopped_at for r, f in enumerate(self.finished))

    def finish(self) -> None:
        self._deliver()

    def cut_stopped(self, out: GenerateOutput) -> GenerateOutput:
        from bloom_server.backends.base import cut_stopped

        return cut_stopped(out, self.stopped_at)


def _generation_defaults(model_dir: Any) -> dict[str, Any]:
    """What the checkpoint's generation_config.json sets for the settings a request may leave out (transformers'
    generate() starts from it too)."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except ValueError:
        return {}
    return {k: cfg[k] for k in _GENERATION_DEFAULTS if cfg.get(k) is not None}
