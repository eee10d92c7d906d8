"""`bloom-server bench` (and scripts/bench/benchmark.py): decode speed of any backend, side by side on the same weights.

Every backend runs the server's own code path, `backend.generate(GenerateBatch)`, greedy with min_new_tokens ==
max_new_tokens so every variant does the same work. For each batch size: one generate (the original's
"Tokenize and generate" span, graph capture included), then `--cycles` timed generates of --new-tokens and of 1
token (prefill only), synchronized, medians. ms/step = (full - prefill) / (new - 1). The memory floor of a step is
(this rank's weight bytes + the K/V bytes a step reads on average) / bandwidth, the compute floor 2 * params per
row / matrix rate; the larger is the floor, and `floor` is floor / ms_step. Under the deepspeed launcher every rank
runs (fast and ds_inference split the model over the ranks), rank 0 prints.

    bloom-server bench --backend fast,hf --random-weights 7b1 --batch-size 1,8,32 --new-tokens 100
    bloom-server bench --backend hf --model /models/bloom-560m --batch-size 4
    bloom-server bench --backend fast,hf --random-weights 7b1 --max-batch-search 256 --input-tokens 1000 --new-tokens 24

--max-batch-search N: the largest batch of (--input-tokens + --new-tokens)-token rows each backend runs on this GPU
(binary search in [1, N]; a try = prefill + every new token, its out-of-memory error caught and its memory freed), with
the peak memory allocated and reserved of each try. --decode-fusion picks the fast engine's decode fusion (model.py).
--dtype int8 (fast only): weight-only int8 (fast/quant.py), activations fp16; each row reports the bytes of weights
resident on the device (`weight_bytes`), and the memory floor counts those bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("bloom_server.bench")

BACKENDS = ("fast", "hf", "ds_inference")


@dataclass
class Row:
    backend: str
    batch_size: int
    new_tokens: int
    ms_step: float
    ms_token: float
    tokens_per_s: float
    prefill_ms: float
    generate_s: float
    floor_ms: float
    floor_fraction: float
    floor_kind: str
    peak_gb: float | None
    tokens_equal_hf: str = ""
    # The same backend's rows against its own run at the next smaller batch size (the prompts are the same: row i
    # of every batch size is one prompt): how far greedy tokens move with the batch shape alone.
    tokens_equal_smaller_bs: str = ""
    runs_s: list[float] = field(default_factory=list)
    peak_reserved_gb: float | None = None
    dtype: str = ""  # the weights' (int8: weight-only int8, fp16 activations)
    weight_bytes: int | None = None  # this rank's weights as resident (the fast engine's; None where unknown)
    int8_kernel: str = ""  # --int8-kernel of an int8 row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bloom-server bench", description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="fast", help="comma list of fast | hf | ds_inference (run in that order)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a BLOOM checkpoint directory (default: the embedded tiny model)")
    src.add_argument("--random-weights", choices=["560m", "7b1", "176b", "tiny"], help="random weights of a shape")
    p.add_argument("--layers", type=int, default=None, help="with --random-weights: this many layers")
    p.add_argument("--batch-size", default="1", help="comma list, e.g. 1,8,32")
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--input-tokens", type=int, default=8, help="prompt length (random token ids)")
    p.add_argument("--cycles", type=int, default=5, help="timed generates per batch size (median)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32", "int8"],
                   help="int8: the fast engine's weight-only int8 (fp16 activations; fast only)")  # fmt: skip
    p.add_argument("--int8-kernel", default="auto", choices=["auto", "gemv", "gemm"],
                   help="with --dtype int8: the kernel of every int8 call of up to 256 rows (auto: by row count, "
                   "fast/triton_kernels.py GEMM_MIN_ROWS), to time each")  # fmt: skip
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth (default: measured)")
    p.add_argument("--tflops", type=float, default=None, help="matrix rate (default: measured on a GPU)")
    p.add_argument("--check-tokens", action="store_true", help="compare greedy tokens with hf on the same weights")
    p.add_argument("--no-graphs", action="store_true", help="fast: run the decode step eagerly (no CUDA graphs)")
    p.add_argument("--deadline-s", type=float, default=None, help="skip what would start after this many seconds")
    p.add_argument("--mixed", type=int, default=0, metavar="N",
                   help="fast only: N requests with output lengths drawn from 16..--new-tokens, run as static batches "
                   "of the largest --batch-size (each to its longest row, the original server) and by continuous "
                   "batching over the same slots; tokens/s of each")  # fmt: skip
    p.add_argument(
        "--decode-fusion",
        default=None,
        help="fast: the decode fusion, triton_head or base (fast/model.py's FUSE_VARIANTS; default: "
        "the fast_decode setting (BLOOM_FAST_DECODE), else triton_head)",
    )
    p.add_argument(
        "--max-batch-search",
        type=int,
        default=0,
        metavar="N",
        help="instead of timing: the largest batch in [1, N] each backend runs with rows of --input-tokens "
        "+ --new-tokens tokens (fast: a cache of that many positions per slot), peak memory of each try",
    )
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


# ---- the machine ----


def _sync(torch: Any) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_bandwidth_gbs(torch: Any, device: Any) -> float:
    """Device copy of 1 GiB (256 MiB on CPU), bytes read + written over the median time."""
    n = (1 << 28) if device.type == "cuda" else (1 << 26)
    a = torch.ones(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(8):
        _sync(torch)
        t = time.perf_counter()
        b.copy_(a)
        _sync(torch)
        times.append(time.perf_counter() - t)
    return 2 * a.numel() * 4 / statistics.median(times[2:]) / 1e9


def measure_tflops(torch: Any, device: Any, dtype: Any) -> float | None:
    if device.type != "cuda":
        return None
    n = 8192
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    _sync(torch)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync(torch)
    return 2 * n**3 * 10 / (time.perf_counter() - t) / 1e12


# ---- the models ----


class Bench:
    def __init__(self, args: argparse.Namespace):
        import torch

        from bloom_server.runtime.distributed import rank_context

        self.args = args
        self.torch = torch
        self.ctx = rank_context(args.local_rank)
        rank, world, local = self.ctx.rank, self.ctx.world_size, self.ctx.local_rank
        cuda = self.ctx.device_type == "cuda"
        self.device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():  # the fast engine all-reduces over the default group (nccl, gloo on CPUs)
                dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world)
        self.quant = args.dtype == "int8"
        if args.dtype in ("auto", "int8"):  # int8: the activations in auto's dtype
            self.dtype = torch.float16 if cuda else torch.float32
        else:
            self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        self.batch_sizes = [int(b) for b in str(args.batch_size).split(",") if b]
        self.max_seq = args.input_tokens + args.new_tokens
        self._weights = None
        self._hf_model = None
        self._hf_outputs: dict[int, list[list[int]]] = {}
        self._own_outputs: dict[str, dict[int, list[list[int]]]] = {}
        self.t_start = time.time()
        self.shape = self._shape()
        self.model_dir = self._model_dir()

    @property
    def leader(self) -> bool:
        return self.ctx.rank == 0

    def say(self, *a: Any) -> None:
        if self.leader:
            print(*a, flush=True)

    def _shape(self) -> Any:
        from bloom_server.fast.shapes import PRESETS, BloomShape

        if self.args.random_weights:
            shape = PRESETS.get(self.args.random_weights) or BloomShape(2048, 64, 2, 4)
            return shape.with_layers(self.args.layers) if self.args.layers else shape
        return BloomShape.from_dir(self._model_path())

    def _model_path(self) -> Path:
        if self.args.model:
            from bloom_server.storage.model_dir import resolve_model_dir

            return resolve_model_dir(self.args.model).path
        from bloom_server.settings import load_settings
        from bloom_server.storage.tiny import ensure_tiny_model, tiny_dir

        return ensure_tiny_model(tiny_dir(load_settings().home))

    def _model_dir(self) -> Any:
        from bloom_server.storage.model_dir import ModelDir

        if self.args.random_weights:
            name = f"random-{self.args.random_weights}-{self.shape.n_layer}l"
            return ModelDir(path=Path("."), layout="hf", model_id=name)
        path = self._model_path()
        return ModelDir(path=path, layout="hf", model_id=path.name)

    def settings(self, backend: str) -> Any:
        from bloom_server.settings import load_settings

        dtype = {self.torch.float16: "fp16", self.torch.bfloat16: "bf16", self.torch.float32: "fp32"}[self.dtype]
        dtype = "int8" if self.quant else dtype
        return load_settings(
            backend=backend,
            dtype=dtype,
            max_batch_size=max(self.batch_sizes),
            max_input_length=self.args.input_tokens,
            max_new_tokens=self.args.new_tokens,
            max_total_tokens=self.max_seq,
            warmup=False,
        )

    def weights(self) -> Any:
        """This rank's fast-engine weights: random (seeded, built on the device) or read from the checkpoint."""
        if self._weights is None:
            from bloom_server.fast.tp import TPGroup
            from bloom_server.fast.weights import from_checkpoint, random_weights

            tp = TPGroup(rank=self.ctx.rank, world=self.ctx.world_size)
            if self.args.random_weights:
                self._weights = random_weights(self.shape, tp, dtype=self.dtype, device=self.device, seed=0)
            else:
                self._weights = from_checkpoint(self.model_dir.path, self.shape, tp, self.dtype, self.device)
            if self.quant and not self._weights.quantized:
                from bloom_server.fast.quant import quantize_weights

                quantize_weights(self._weights, tp)
                if self.device.type == "cuda":
                    self.torch.cuda.empty_cache()
        return self._weights

    @property
    def dtype_name(self) -> str:
        return "int8" if self.quant else str(self.dtype).replace("torch.", "")

    def hf_model(self) -> Any:
        """A transformers model on this rank's device. With random weights it is built on the meta device and takes
        the fast engine's tensors (one rank: the same storage, so both fit where one does)."""
        if self._hf_model is None:
            torch = self.torch
            from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM

            if self.args.random_weights:
                if self.ctx.world_size > 1:
                    from bloom_server.fast.weights import random_weights

                    full = random_weights(self.shape, None, dtype=self.dtype, device=self.device, seed=0)
                else:
                    full = self.weights()
                config = BloomConfig(**self.shape.to_hf_config(), torch_dtype=self.dtype)
                with torch.device("meta"):
                    model = BloomForCausalLM(config)
                model.load_state_dict(full.to_hf_state_dict(), assign=True, strict=True)
                model.tie_weights()
            else:
                model = AutoModelForCausalLM.from_pretrained(str(self.model_dir.path), torch_dtype=self.dtype)
                model.to(self.device)
            self._hf_model = model.eval()
        return self._hf_model

    def backend(self, name: str) -> Any:
        """The project's backend object around the model (the server's generate path), without reloading."""
        settings = self.settings(name)
        if name == "fast":
            from bloom_server.backends.fast import FastBackend
            from bloom_server.fast.engine import FastEngine
            from bloom_server.fast.tp import TPGroup

            b = FastBackend(settings, self.model_dir, self.ctx)
            b.engine = FastEngine(
                self.weights(),
                self.shape,
                max_batch=max(self.batch_sizes),
                max_seq=self.max_seq,
                tp=TPGroup(rank=self.ctx.rank, world=self.ctx.world_size),
                cuda_graphs=False if self.args.no_graphs else None,
            )
            if self.args.decode_fusion is not None:
                b.engine.model.set_fuse(self.args.decode_fusion)
            b._defaults, b._dtype = {}, self.dtype_name
            return b
        if name == "hf":
            from bloom_server.backends.hf import HFBackend

            b = HFBackend(settings, self.model_dir, self.ctx)
            b.model, b.input_device = self.hf_model(), self.device
            return b
        if name == "ds_inference":
            from bloom_server.backends.ds_inference import (
                DSInferenceBackend,
                ensure_distributed,
                import_deepspeed,
                restore_head_dtype,
            )

            deepspeed = import_deepspeed(name)
            ensure_distributed(deepspeed, self.ctx)
            model = self.hf_model()
            self._hf_model = None  # kernel injection rewrites the model in place: hf cannot run after this
            engine = deepspeed.init_inference(
                model,
                dtype=self.dtype,
                tensor_parallel={"tp_size": self.ctx.world_size},
                replace_with_kernel_inject=True,
                max_tokens=self.max_seq,
                min_tokens=self.max_seq,
            )
            restore_head_dtype(engine.module, self.dtype)
            b = DSInferenceBackend(settings, self.model_dir, self.ctx)
            b.model, b.input_device = engine, self.device
            b.reserve_at_limits()  # as the server does: the workspace sized for the largest batch measured
            return b
        raise SystemExit(f"unknown backend {name!r}: choose from {', '.join(BACKENDS)}")

    # ---- one measurement ----

    def prompts(self, bs: int) -> list[tuple[int, ...]]:
        import random

        rng = random.Random(1234)
        lo = min(10, self.shape.vocab_size // 2)  # skip the special tokens at the start of BLOOM's vocabulary
        return [
            tuple(rng.randrange(lo, self.shape.vocab_size) for _ in range(self.args.input_tokens)) for _ in range(bs)
        ]

    def batch(self, bs: int, new: int) -> Any:
        from bloom_server.runtime.protocol import GenerateBatch
        from bloom_server.types import SamplingParams

        params = SamplingParams.from_dict({"do_sample": False, "min_new_tokens": new})
        return GenerateBatch(self.prompts(bs), (new,) * bs, params, seed=0, pad_token_id=3, eos_token_id=2)

    def timed(self, backend: Any, bs: int, new: int) -> tuple[float, Any]:
        torch = self.torch
        _sync(torch)
        t = time.perf_counter()
        out = backend.generate(self.batch(bs, new))
        _sync(torch)
        return time.perf_counter() - t, out

    def prepare(self, name: str) -> tuple[Any, float]:
        """The backend, and the seconds from process start until it was ready (the original's "start to ready")."""
        backend = self.backend(name)
        return backend, time.time() - self.t_start

    def measure(self, name: str, backend: Any, ready_s: float, bs: int, floors: dict[str, float | None]) -> Row:
        torch = self.torch
        args = self.args
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        span, out = self.timed(backend, bs, args.new_tokens)  # the original's first generate (graph capture here)
        assert all(len(t) == args.new_tokens for t in out.token_ids), "a row stopped early"
        full, prefill = [], []
        for _ in range(args.cycles):
            dt, out = self.timed(backend, bs, args.new_tokens)
            full.append(dt)
        for _ in range(max(2, args.cycles // 2)):
            prefill.append(self.timed(backend, bs, 1)[0])
        tokens = [list(t) for t in out.token_ids]
        med_full, med_prefill = statistics.median(full), statistics.median(prefill)
        ms_step = 1e3 * (med_full - med_prefill) / max(1, args.new_tokens - 1)
        floor_ms, kind = self.floor_ms(name, bs, floors)
        cuda = self.device.type == "cuda"
        peak = torch.cuda.max_memory_allocated(self.device) / 1e9 if cuda else None
        reserved = torch.cuda.max_memory_reserved(self.device) / 1e9 if cuda else None
        self.last_tokens = tokens
        equal = ""
        if name == "hf":
            self._hf_outputs[bs] = tokens
        elif bs in self._hf_outputs:
            equal = _compare(tokens, self._hf_outputs[bs])
        own = self._own_outputs.setdefault(name, {})
        smaller = max((b for b in own if b < bs), default=None)
        own_equal = f"bs {smaller}: {_compare(tokens[:smaller], own[smaller])}" if smaller else ""
        own[bs] = tokens
        row = Row(
            backend=name, batch_size=bs, new_tokens=args.new_tokens, ms_step=ms_step, ms_token=ms_step / bs,
            tokens_per_s=bs * args.new_tokens / med_full, prefill_ms=1e3 * med_prefill, generate_s=span,
            floor_ms=floor_ms, floor_fraction=floor_ms / ms_step if ms_step > 0 else 0.0, floor_kind=kind,
            peak_gb=peak, tokens_equal_hf=equal, tokens_equal_smaller_bs=own_equal, runs_s=full,
            peak_reserved_gb=reserved, dtype=self.dtype_name if name == "fast" else str(self.dtype).replace("torch.", ""),
            weight_bytes=self.weights().nbytes() if name == "fast" else None,
            int8_kernel=args.int8_kernel if self.quant else "",
        )  # fmt: skip
        total_tokens = args.cycles * bs * args.new_tokens
        weights = f", {row.weight_bytes / 1e9:.2f} GB of weights resident" if row.weight_bytes else ""
        self.say(f"\n# {name} bs={bs} ({self.model_dir.model_id}, {row.dtype}{weights}, {self.ctx.world_size} rank(s))")
        # The original block, byte for byte (bloom-inference-scripts --benchmark).
        self.say(
            f"""
*** Performance stats:
Throughput per token including tokenize: {sum(full) / total_tokens * 1000:.2f} msecs
Start to ready to generate: {ready_s:.3f} secs
Tokenize and generate {total_tokens} (bs={bs}) tokens: {span:.3f} secs
Start to finish: {ready_s + span:.3f} secs
"""
        )
        self.say(
            f"decode: {ms_step:.2f} ms/step, {row.ms_token:.3f} ms/token, {row.tokens_per_s:.0f} tokens/s; "
            f"prefill {row.prefill_ms:.1f} ms; floor {floor_ms:.2f} ms ({kind}) -> {100 * row.floor_fraction:.0f}% "
            f"of it; peak {'-' if peak is None else f'{peak:.1f} GB allocated, {reserved:.1f} GB reserved'}"
            + (f"; greedy tokens vs hf: {equal}" if equal else "")
            + (f"; vs its own {own_equal}" if own_equal else "")
        )
        return row

    def past_deadline(self) -> bool:
        return bool(self.args.deadline_s) and time.time() - self.t_start > self.args.deadline_s

    def floor_ms(self, name: str, bs: int, floors: dict[str, float | None]) -> tuple[float, str]:
        """Bytes this rank must read per decode step over bandwidth, or FLOPs over the matrix rate: the larger."""
        w = self.weights() if name == "fast" or self._weights is not None else None
        shape = self.shape
        world = self.ctx.world_size
        weight_bytes = w.nbytes() if w is not None else shape.params() * self.dtype.itemsize // world
        avg_keys = self.args.input_tokens + self.args.new_tokens / 2
        kv_bytes = bs * avg_keys * shape.kv_bytes_per_token(self.dtype.itemsize) / world
        mem_ms = 1e3 * (weight_bytes + kv_bytes) / (floors["bandwidth_gbs"] * 1e9)  # type: ignore[operator]
        if floors.get("tflops"):
            flop_ms = 1e3 * 2 * shape.params() / world * bs / (floors["tflops"] * 1e12)  # type: ignore[operator]
            if flop_ms > mem_ms:
                return flop_ms, "compute"
        return mem_ms, "memory"


def run_mixed(bench: Bench) -> dict[str, Any]:
    """Static batches vs continuous batching on the fast engine, same requests, same slots (engine level: no HTTP)."""
    import random

    from bloom_server.fast.rows import Request, RowScheduler
    from bloom_server.fast.sampling import SamplingConfig

    args, torch = bench.args, bench.torch
    engine = bench.backend("fast").engine
    bs = max(bench.batch_sizes)
    rng = random.Random(7)
    lengths = [rng.randint(min(16, args.new_tokens), args.new_tokens) for _ in range(args.mixed)]
    prompts = bench.prompts(args.mixed)
    useful = sum(lengths)
    # Warm-up: capture the graphs both variants will replay.
    engine.generate(prompts[:bs], args.new_tokens, SamplingConfig())
    _sync(torch)
    t = time.perf_counter()
    steps_static = 0
    for a in range(0, args.mixed, bs):
        chunk = lengths[a : a + bs]
        engine.generate(prompts[a : a + bs], max(chunk), SamplingConfig())
        steps_static += max(chunk)
    _sync(torch)
    static_s = time.perf_counter() - t
    sched = RowScheduler(engine)
    reqs = [Request(rid=i, prompt=p, max_new_tokens=n) for i, (p, n) in enumerate(zip(prompts, lengths))]
    t = time.perf_counter()
    for r in reqs:
        sched.add(r)
    sched.run()
    _sync(torch)
    cont_s = time.perf_counter() - t
    assert all(len(r.tokens) == n for r, n in zip(reqs, lengths))
    ttft = sorted(r.first_token_at - r.arrived for r in reqs)  # type: ignore[operator]
    result = {
        "requests": args.mixed, "batch": bs, "useful_tokens": useful,
        "static_tokens_per_s": useful / static_s, "static_steps": steps_static,
        "continuous_tokens_per_s": useful / cont_s, "continuous_steps": sched.steps,
        "continuous_ttft_p50_s": ttft[len(ttft) // 2], "continuous_ttft_p99_s": ttft[int(0.99 * (len(ttft) - 1))],
    }  # fmt: skip
    bench.say(
        f"# mixed load: {args.mixed} requests, outputs {min(lengths)}..{max(lengths)} tokens, {bs} slots\n"
        f"static batches (each runs to its longest row): {result['static_tokens_per_s']:.0f} tokens/s, "
        f"{steps_static} decode steps\n"
        f"continuous batching: {result['continuous_tokens_per_s']:.0f} tokens/s, {sched.steps} steps; "
        f"{result['continuous_tokens_per_s'] / result['static_tokens_per_s']:.2f}x; time to first token "
        f"p50 {1e3 * result['continuous_ttft_p50_s']:.0f} ms, p99 {1e3 * result['continuous_ttft_p99_s']:.0f} ms "
        f"(all requests queued at once)"
    )
    return result


@dataclass
class Try:
    backend: str
    batch: int
    ok: bool
    seconds: float
    peak_alloc_gb: float | None
    peak_reserved_gb: float | None
    error: str = ""


def run_max_batch_search(bench: Bench, names: Sequence[str]) -> dict[str, Any]:
    """Binary search, per backend, for the largest batch of (input + new)-token rows that runs (prefill + every new
    token). The fast engine preallocates its K/V cache for input + new positions per slot; transformers grows its own.
    Each try starts from freed memory (weights only) and its out-of-memory error is caught."""
    import gc

    from bloom_server.fast.engine import FastEngine
    from bloom_server.fast.sampling import SamplingConfig
    from bloom_server.fast.tp import TPGroup

    args, torch = bench.args, bench.torch
    cuda = bench.device.type == "cuda"
    new, seq = args.new_tokens, args.input_tokens + args.new_tokens
    tries: list[Try] = []

    def attempt(name: str, b: int) -> bool:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(bench.device)
        t = time.perf_counter()
        err, engine = "", None
        try:
            prompts = bench.prompts(b)
            if name == "fast":
                engine = FastEngine(bench.weights(), bench.shape, max_batch=b, max_seq=seq,
                                    tp=TPGroup(rank=bench.ctx.rank, world=bench.ctx.world_size))  # fmt: skip
                fusion = args.decode_fusion or bench.settings("fast").fast_decode
                if fusion is not None:
                    engine.model.set_fuse(fusion)
                out = engine.generate(prompts, new, SamplingConfig(min_new_tokens=new))
                assert all(len(r) == new for r in out.tokens)
            else:
                model = bench.hf_model()
                ids = torch.tensor(prompts, device=bench.device)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                     min_new_tokens=new, do_sample=False, pad_token_id=3)  # fmt: skip
                assert out.shape == (b, seq)
            _sync(torch)
            ok = True
        except torch.OutOfMemoryError as exc:
            ok, err = False, "OOM: " + str(exc).split("\n")[0][:160]
        finally:
            engine = out = None  # free before the next try
        peak = torch.cuda.max_memory_allocated(bench.device) / 1e9 if cuda else None
        reserved = torch.cuda.max_memory_reserved(bench.device) / 1e9 if cuda else None
        tries.append(Try(name, b, ok, time.perf_counter() - t, peak, reserved, err))
        bench.say(f"#   {name} batch {b}: {'ok' if ok else err} in {tries[-1].seconds:.1f} s; peak "
                  + ("-" if peak is None else f"{peak:.1f} GB allocated, {reserved:.1f} GB reserved"))  # fmt: skip
        return ok

    best: dict[str, int] = {}
    for name in sorted(names, key=lambda n: n != "fast"):  # fast first: its result seeds transformers' first try
        if name not in ("fast", "hf"):
            bench.say(f"# {name}: no batch search (fast and hf only)")
            continue
        lo, hi = 0, args.max_batch_search + 1  # lo runs (0: nothing yet), hi does not
        guess = None
        if name == "fast" and cuda:
            # The cache is the bulk: try the batch whose K/V fill what is free, less 2 GB of workspace, first.
            free = torch.cuda.mem_get_info(bench.device)[0]
            row = 2 * bench.shape.n_layer * bench.shape.hidden_size * seq * bench.dtype.itemsize // bench.ctx.world_size
            guess = max(1, min(args.max_batch_search, int((free - (2 << 30)) // row)))
        elif name == "hf" and best.get("fast"):
            guess = max(1, best["fast"] // 2)
        while hi - lo > 1:
            if bench.past_deadline():
                bench.say(f"# {name}: search stopped past --deadline-s {args.deadline_s:.0f}: largest seen {lo}")
                break
            mid = guess if guess is not None and lo < guess < hi else (lo + hi) // 2
            guess = None
            if attempt(name, mid):
                lo = mid
            else:
                hi = mid
        best[name] = lo
    rows_of = {n: [t for t in tries if t.backend == n and t.ok and t.batch == best[n]] for n in best}
    lines = [f"\n# largest batch of {seq}-token rows ({args.input_tokens} prompt + {new} new), one "
             f"{torch.cuda.get_device_name(bench.device) if cuda else 'cpu'}, {bench.model_dir.model_id}, "
             f"{bench.dtype}; search bound {args.max_batch_search}",
             "| backend | largest batch | peak GB allocated | peak GB reserved | tries (batch: ok / OOM) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for n, b in best.items():
        t = rows_of[n][-1] if rows_of[n] else None
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731 - a one-line formatter
        seen = ", ".join(f"{x.batch}: {'ok' if x.ok else 'OOM'}" for x in tries if x.backend == n)
        lines.append(f"| {n} | {b} | {fmt(t.peak_alloc_gb if t else None)} | {fmt(t.peak_reserved_gb if t else None)} "
                     f"| {seen} |")  # fmt: skip
    bench.say("\n".join(lines))
    return {
        "sequence": seq,
        "input": args.input_tokens,
        "new": new,
        "largest": best,
        "tries": [asdict(t) for t in tries],
    }


def _compare(ours: list[list[int]], ref: list[list[int]]) -> str:
    same = sum(a == b for a, b in zip(ours, ref))
    if same == len(ref):
        return f"equal ({same}/{len(ref)} rows)"
    first = min(next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) for a, b in zip(ours, ref) if a != b)
    return f"DIFFER ({same}/{len(ref)} rows equal; first difference at token {first})"


def table(rows: Sequence[Row]) -> str:
    head = (
        "| backend | bs | ms/step | ms/token | tokens/s | prefill ms | floor ms | % of floor | peak GB (alloc/reserved) "
        "| greedy vs hf | greedy vs its smaller bs |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        peak = f"{r.peak_gb:.1f} / {r.peak_reserved_gb or 0:.1f}" if r.peak_gb is not None else "-"
        lines.append(
            f"| {r.backend} | {r.batch_size} | {r.ms_step:.2f} | {r.ms_token:.3f} | {r.tokens_per_s:.0f} | "
            f"{r.prefill_ms:.1f} | {r.floor_ms:.2f} ({r.floor_kind}) | {100 * r.floor_fraction:.0f}% | {peak} | "
            f"{r.tokens_equal_hf or '-'} | {r.tokens_equal_smaller_bs or '-'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        # A rank leaves as the server's followers do (serve.py): a gloo thread still freeing a finished all-gather
        # when Python finalizes cannot take the GIL, and the rank aborts (std::terminate) after a completed bench.
        from bloom_server.runtime.distributed import shutdown_distributed

        shutdown_distributed()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from bloom_server.settings import load_settings

    settings = load_settings()  # the bench is quieter than the server unless BLOOM_LOG_LEVEL says otherwise
    level = settings.log_level if "log_level" in settings.model_fields_set else "warning"
    logging.basicConfig(level=level.upper(), stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    names = [n.strip() for n in args.backend.split(",") if n.strip()]
    for n in names:
        if n not in BACKENDS:
            print(f"bloom-server bench: unknown backend {n!r} (choose from {', '.join(BACKENDS)})", file=sys.stderr)
            return 2
    if args.dtype == "int8" and (names != ["fast"] or args.check_tokens):
        print(
            "bloom-server bench: --dtype int8 is the fast engine's (--backend fast, no --check-tokens)", file=sys.stderr
        )
        return 2
    if args.int8_kernel != "auto":
        if args.dtype != "int8":
            print("bloom-server bench: --int8-kernel is for --dtype int8", file=sys.stderr)
            return 2
        from bloom_server.fast import triton_kernels as tk

        tk.set_int8_kernel(args.int8_kernel)
    if args.check_tokens and "hf" not in names:
        names.insert(0, "hf")
    if "hf" in names:
        names.remove("hf")
        names.insert(0, "hf")  # the reference tokens first, and before kernel injection rewrites the model
    bench = Bench(args)
    torch = bench.torch
    torch.manual_seed(0)
    if args.max_batch_search:
        with torch.inference_mode():
            result = run_max_batch_search(bench, names)
        if args.json and bench.leader:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    if args.mixed:
        with torch.inference_mode():
            result = run_mixed(bench)
        if args.json and bench.leader:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    with torch.inference_mode():
        floors: dict[str, float | None] = {
            "bandwidth_gbs": args.bandwidth_gbs or measure_bandwidth_gbs(torch, bench.device),
            "tflops": args.tflops or measure_tflops(torch, bench.device, bench.dtype),
        }
    shape = bench.shape
    bench.say(
        f"# bloom-server bench: {bench.model_dir.model_id} ({shape.n_layer} layers, hidden {shape.hidden_size}, "
        f"{shape.n_head} heads, {shape.params() / 1e9:.2f} B params), {bench.dtype_name}, device "
        f"{torch.cuda.get_device_name(bench.device) if bench.device.type == 'cuda' else 'cpu'}, "
        f"{bench.ctx.world_size} rank(s); torch {torch.__version__}; bandwidth {floors['bandwidth_gbs']:.0f} GB/s"
        + (f", matrix rate {floors['tflops']:.0f} TFLOP/s" if floors["tflops"] else "")
        + f"; input {args.input_tokens} tokens, {args.new_tokens} new, greedy, min_new_tokens == max_new_tokens"
    )
    rows: list[Row] = []

    def save() -> None:  # after each measurement: a later crash keeps what was measured
        if args.json and bench.leader:
            Path(args.json).write_text(json.dumps({"floors": floors, "rows": [asdict(r) for r in rows]}, indent=2))

    # Batch size by batch size over the backends that share the weights (hf and fast), so a deadline trims the
    # largest batches of each rather than a whole backend; kernel injection rewrites the model in place, so it last.
    shared = [n for n in names if n != "ds_inference"]
    ready: dict[str, tuple[Any, float]] = {}
    for name in shared:
        try:
            ready[name] = bench.prepare(name)
        except Exception as exc:  # one backend failing must not hide the others' numbers
            log.exception("%s failed to load", name)
            bench.say(f"# {name}: FAILED to load: {type(exc).__name__}: {exc}")
    for bs in bench.batch_sizes:
        for name, (backend, ready_s) in ready.items():
            if bench.past_deadline():
                bench.say(f"# {name} bs={bs}: skipped, past --deadline-s {args.deadline_s:.0f}")
                continue
            try:
                rows.append(bench.measure(name, backend, ready_s, bs, floors))
            except Exception as exc:
                log.exception("%s bs=%d failed", name, bs)
                bench.say(f"# {name} bs={bs}: FAILED: {type(exc).__name__}: {exc}")
            save()
    ready.clear()
    if "ds_inference" in names and not bench.past_deadline():
        try:
            backend, ready_s = bench.prepare("ds_inference")
            for bs in bench.batch_sizes:
                if bench.past_deadline():
                    bench.say(f"# ds_inference bs={bs}: skipped, past --deadline-s {args.deadline_s:.0f}")
                    continue
                rows.append(bench.measure("ds_inference", backend, ready_s, bs, floors))
                save()
        except Exception as exc:
            log.exception("ds_inference failed")
            bench.say(f"# ds_inference: FAILED: {type(exc).__name__}: {exc}")
    bench.say("\n" + table(rows))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
