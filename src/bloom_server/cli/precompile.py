"""`bloom-server precompile`: the fast backend's decode kernels compiled ahead of time, for the settings the server
will run with, into a kernel cache that `serve` seeds its own from (fast/coldstart/precompile.py)."""

from __future__ import annotations

import argparse
import sys

from bloom_server.cli.serve import add_settings_flags, print_invalid, settings_from_args


def add_arguments(pre: argparse.ArgumentParser) -> None:
    add_settings_flags(pre)
    pre.add_argument("--out", default=None, help="the kernel cache to write (default: MODEL/.bloom-kernel-cache)")
    pre.add_argument("--target", action="append", default=None, metavar="ARCH",
                     help="GPU architecture, repeatable: cuda:80 (A100), cuda:86 (A10G), cuda:90 (H100, H200); "
                     "default: this host's GPU")  # fmt: skip
    pre.add_argument("--tp", type=int, default=None,
                     help="tensor-parallel ranks the server runs (default BLOOM_NUM_GPUS, else 1)")  # fmt: skip
    pre.add_argument("--workers", type=int, default=None, help="compile processes (default: the CPUs, at most 16)")


def run(args: argparse.Namespace) -> int:
    """`bloom-server precompile`: the fast backend's decode kernels for the settings the server will run with, into
    a kernel cache that `serve` seeds its own from (fast/coldstart/precompile.py)."""
    import json
    import logging
    from pathlib import Path

    from pydantic import ValidationError

    from bloom_server import host
    from bloom_server.errors import BloomServerError
    from bloom_server.fast.coldstart import precompile as pc

    try:
        settings = settings_from_args(args, backend="fast")
    except ValidationError as exc:
        print_invalid("precompile", exc)
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
    tp = args.tp if args.tp is not None else (settings.num_gpus if settings.num_gpus is not None else 1)
    if tp < 1:
        print("bloom-server precompile: --tp must be at least 1", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(model_dir) / pc.SEED_DIRNAME
    workers = args.workers if args.workers else max(1, min(16, host.available_cpus()))
    report = pc.precompile(Path(model_dir), out, targets=targets, world=tp, dtype=dtype,
                           max_batch=settings.max_batch_size, max_seq=settings.total_tokens_limit,
                           workers=workers, fast_decode=settings.fast_decode,
                           weights=pc.weight_format(str(settings.dtype)))  # fmt: skip
    print(json.dumps(report, indent=1))
    if not report["ok"]:
        print("bloom-server precompile: a compile worker failed (above); the server compiles what is missing",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0
