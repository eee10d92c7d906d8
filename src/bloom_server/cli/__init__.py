"""Composition root: `bloom-server serve | download | launch | make-tiny-model | bench | preshard | precompile | client`.

Parsing happens in main(), never at import. Every serve flag maps to a Settings field; a flag that is not given
leaves the environment (BLOOM_* or the original server's variables) or the default in force.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence

# flag -> (Settings field, type, help). Booleans are handled by BooleanOptionalAction.
_SERVE_FLAGS: list[tuple[str, str, type, str]] = [
    ("--model", "model", str, "model directory, Hub cache repo id, or pvc:// URI (default: the embedded tiny model)"),
    ("--model-id", "model_id", str, "name reported to clients and used in /v1/models/{name}"),
    (
        "--model-aliases",
        "model_aliases",
        str,
        "names a request's `model` may give besides the id (default: tgi,dummy; *: any; empty: the id only)",
    ),
    ("--backend", "backend", str, "hf | ds_inference | ds_zero | fast"),
    ("--dtype", "dtype", str, "auto | fp16 | bf16 | int8 | fp32"),
    ("--host", "host", str, "address to listen on (default 0.0.0.0)"),
    ("--port", "port", int, "port (default 8080)"),
    ("--max-input-length", "max_input_length", int, "max prompt tokens (default 512)"),
    ("--max-new-tokens", "max_new_tokens", int, "max new tokens a request may ask for (default 100)"),
    ("--max-total-tokens", "max_total_tokens", int, "prompt + new tokens the engine is built for"),
    ("--max-batch-size", "max_batch_size", int, "max rows in one generate call, and prompts per request (32)"),
    ("--max-queued-requests", "max_queued_requests", int, "requests waiting before 429 (default 256)"),
    ("--batch-wait-ms", "batch_wait_ms", float, "dynamic batching: wait for others when idle (default 0 ms)"),
    ("--batching", "batching", str, "auto | continuous | dynamic (default auto: continuous with --backend fast)"),
    ("--max-body-bytes", "max_body_bytes", int, "largest request body (default 1 MiB)"),
    ("--drain-timeout-s", "drain_timeout_s", float, "how long in-flight requests may finish on SIGTERM"),
    ("--log-level", "log_level", str, "debug | info | warning | error"),
]
_SERVE_BOOLS: list[tuple[str, str, str]] = [
    ("--cap-max-new-tokens", "cap_max_new_tokens", "cap max_new_tokens at the limit instead of rejecting"),
    ("--warmup", "warmup", "run one generate before reporting ready (default on)"),
    ("--kernel-inject", "kernel_inject", "ds_inference: DeepSpeed kernel injection (default on)"),
    ("--cpu-offload", "cpu_offload", "ds_zero: offload parameters to CPU"),
    (
        "--trust-unverified-pickles",
        "trust_unverified_pickles",
        "DANGEROUS: load pickled weights (.pt, .bin) without a verifying completion marker (docs/security.md)",
    ),
]


def _add_local_rank(p: argparse.ArgumentParser, dest: str) -> None:
    # The deepspeed launcher passes --local_rank=N right after the module name; torchrun sets LOCAL_RANK instead.
    p.add_argument("--local_rank", "--local-rank", dest=dest, type=int, default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bloom-server", description=__doc__.splitlines()[0])
    _add_local_rank(parser, "local_rank_top")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model over HTTP (every rank, under a launcher or alone)")
    for flag, dest, typ, help_ in _SERVE_FLAGS:
        serve.add_argument(flag, dest=dest, type=typ, default=None, help=help_)
    for flag, dest, help_ in _SERVE_BOOLS:
        serve.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_)
    _add_local_rank(serve, "local_rank")

    download = sub.add_parser("download", help="download a model repository to a directory (resumable, verified)")
    from bloom_server.storage import download as download_mod

    download_mod.add_arguments(download)

    launch = sub.add_parser(
        "launch",
        help="start `serve` under the deepspeed launcher on BLOOM_NUM_GPUS GPUs (all visible by default)",
        description="Arguments after `launch` are passed to `serve`.",
    )
    launch.add_argument("serve_args", nargs=argparse.REMAINDER)

    tiny = sub.add_parser("make-tiny-model", help="write the embedded tiny BLOOM checkpoint to a directory")
    tiny.add_argument("out_dir")

    bench = sub.add_parser(
        "bench",
        help="decode speed of backends side by side (scripts/bench/benchmark.py; `bloom-server bench -h` for its flags)",
        add_help=False,
        prefix_chars="+",  # every flag after `bench` is the benchmark's own, parsed by it
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)

    preshard = sub.add_parser("preshard", help="write one safetensors file per tensor-parallel rank (--backend fast)")
    from bloom_server.fast import preshard as preshard_mod

    preshard_mod.add_arguments(preshard)

    pre = sub.add_parser(
        "precompile",
        help="compile the fast backend's decode kernels ahead of time, for a GPU architecture, no GPU needed",
        description="Compiles the Triton kernels `serve --backend fast` would compile on its first start into a "
        "kernel cache (by default MODEL/.bloom-kernel-cache, which `serve` copies from at start). Takes the serve "
        "flags and BLOOM_* variables, so that it compiles for the settings the server will run with.",
    )  # fmt: skip
    for flag, dest, typ, help_ in _SERVE_FLAGS:
        pre.add_argument(flag, dest=dest, type=typ, default=None, help=help_)
    for flag, dest, help_ in _SERVE_BOOLS:
        pre.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_)
    pre.add_argument("--out", default=None, help="the kernel cache to write (default: MODEL/.bloom-kernel-cache)")
    pre.add_argument("--target", action="append", default=None, metavar="ARCH",
                     help="GPU architecture, repeatable: cuda:80 (A100), cuda:86 (A10G), cuda:90 (H100, H200); "
                     "default: this host's GPU")  # fmt: skip
    pre.add_argument("--tp", type=int, default=None,
                     help="tensor-parallel ranks the server runs (default BLOOM_NUM_GPUS, else 1)")  # fmt: skip
    pre.add_argument("--workers", type=int, default=None, help="compile processes (default: the CPUs, at most 16)")

    client = sub.add_parser("client", help="stream a completion from a running server to the terminal")
    from bloom_server.cli import client as client_mod

    client_mod.add_arguments(client)
    return parser


def _settings_from_args(args: argparse.Namespace, **forced):
    from bloom_server.settings import load_settings

    fields = [d for _, d, _, _ in _SERVE_FLAGS] + [d for _, d, _ in _SERVE_BOOLS]
    return load_settings(**{**{f: getattr(args, f) for f in fields}, **forced})


def _print_invalid(command: str, exc) -> None:
    print(f"bloom-server {command}: invalid settings:", file=sys.stderr)
    for err in exc.errors():
        env = str(err["loc"][0]) if err["loc"] else ""
        name = env.removeprefix("BLOOM_").lower()
        where = f"--{name.replace('_', '-')} / {env}" if name else "settings"
        print(f"  {where}: {err['msg']} (got {err.get('input')!r})", file=sys.stderr)


def _precompile(args: argparse.Namespace) -> int:
    """`bloom-server precompile`: the fast backend's decode kernels for the settings the server will run with, into
    a kernel cache that `serve` seeds its own from (fast/coldstart/precompile.py)."""
    import json
    import logging
    from pathlib import Path

    from pydantic import ValidationError

    from bloom_server.errors import BloomServerError
    from bloom_server.fast.coldstart import precompile as pc

    try:
        settings = _settings_from_args(args, backend="fast")
    except ValidationError as exc:
        _print_invalid("precompile", exc)
        return 2
    logging.basicConfig(level=getattr(logging, str(settings.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        targets: list[int | None] = [pc.parse_target(t) for t in args.target] if args.target else [None]
    except ValueError as e:
        print(f"bloom-server precompile: --target: {e}", file=sys.stderr)
        return 2
    dtype = pc.model_dtype(str(settings.dtype))
    if dtype is None:
        print(f"bloom-server precompile: --dtype {settings.dtype}: the fast backend runs no Triton kernels in it "
              "(fp16, bf16 and int8 do)", file=sys.stderr)  # fmt: skip
        return 2
    if not pc.triton_installed():
        print("bloom-server precompile: Triton is not installed (it comes with torch's CUDA wheels)", file=sys.stderr)
        return 2
    from bloom_server.serve import resolve

    try:
        model_dir = resolve(settings).path
    except BloomServerError as exc:
        print(f"bloom-server precompile: {exc}", file=sys.stderr)
        return 2
    tp = args.tp if args.tp is not None else int(os.environ.get("BLOOM_NUM_GPUS") or 1)
    if tp < 1:
        print("bloom-server precompile: --tp must be at least 1", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(model_dir) / pc.SEED_DIRNAME
    workers = args.workers if args.workers else max(1, min(16, pc.available_cpus()))
    report = pc.precompile(Path(model_dir), out, targets=targets, world=tp, dtype=dtype,
                           max_batch=settings.max_batch_size, max_seq=settings.total_tokens_limit,
                           workers=workers, fast_decode=settings.fast_decode)  # fmt: skip
    print(json.dumps(report, indent=1))
    if not report["ok"]:
        print("bloom-server precompile: a compile worker failed (above); the server compiles what is missing",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _gpu_count() -> int:
    if os.environ.get("BLOOM_NUM_GPUS"):
        return int(os.environ["BLOOM_NUM_GPUS"])
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def _launch(serve_args: list[str]) -> int:
    n = _gpu_count()
    if n <= 0:
        argv = [sys.executable, "-m", "bloom_server", "serve", *serve_args]
    else:
        launcher = shutil.which("deepspeed")
        if launcher is None:
            print("bloom-server launch: the deepspeed launcher is not on PATH", file=sys.stderr)
            return 2
        argv = [launcher, "--num_gpus", str(n), "--module", "bloom_server", "serve", *serve_args]
    print("bloom-server launch: exec " + " ".join(argv), file=sys.stderr, flush=True)
    os.execv(argv[0], argv)
    return 1  # not reached


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from pydantic import ValidationError

        from bloom_server.serve import configure_logging, serve

        try:
            settings = _settings_from_args(args)
        except ValidationError as exc:
            _print_invalid("serve", exc)
            return 2
        configure_logging(settings.log_level)
        local_rank = args.local_rank if args.local_rank is not None else args.local_rank_top
        return serve(settings, local_rank)
    if args.command == "download":
        from bloom_server.storage import download as download_mod

        return download_mod.run(args)
    if args.command == "launch":
        return _launch([a for a in args.serve_args if a != "--"])
    if args.command == "bench":
        from bloom_server.tools.bench import main as bench_main

        extra = [] if args.local_rank_top is None else ["--local_rank", str(args.local_rank_top)]
        return bench_main([*args.bench_args, *extra])
    if args.command == "preshard":
        from bloom_server.fast import preshard as preshard_mod

        return preshard_mod.run(args)
    if args.command == "precompile":
        return _precompile(args)
    if args.command == "client":
        from bloom_server.cli import client as client_mod

        return client_mod.run(args)
    if args.command == "make-tiny-model":
        from pathlib import Path

        from bloom_server.storage.tiny import build_tiny_model

        print(build_tiny_model(Path(args.out_dir)))
        return 0
    return 2
