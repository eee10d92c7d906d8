"""The command line: `bloom-server serve | download | launch | make-tiny-model | bench | preshard | precompile | client`.

The parser and the dispatch; each subcommand's own flags and work are in its module (cli/serve.py, cli/precompile.py,
cli/launch.py, cli/client.py; download and preshard next to their work in storage/ and fast/, bench in tools/).
Parsing happens in main(), never at import.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bloom_server.cli import launch as launch_cli
from bloom_server.cli import precompile as precompile_cli
from bloom_server.cli import serve as serve_cli
from bloom_server.cli.serve import add_settings_flags


def _add_local_rank(p: argparse.ArgumentParser, dest: str) -> None:
    # The deepspeed launcher passes --local_rank=N right after the module name; torchrun sets LOCAL_RANK instead.
    p.add_argument("--local_rank", "--local-rank", dest=dest, type=int, default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bloom-server", description=__doc__.splitlines()[0])
    _add_local_rank(parser, "local_rank_top")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model over HTTP (every rank, under a launcher or alone)")
    add_settings_flags(serve)
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
    precompile_cli.add_arguments(pre)

    client = sub.add_parser("client", help="stream a completion from a running server to the terminal")
    from bloom_server.cli import client as client_mod

    client_mod.add_arguments(client)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve_cli.run(args)
    if args.command == "download":
        from bloom_server.storage import download as download_mod

        return download_mod.run(args)
    if args.command == "launch":
        return launch_cli.run([a for a in args.serve_args if a != "--"])
    if args.command == "bench":
        from bloom_server.tools.bench import main as bench_main

        extra = [] if args.local_rank_top is None else ["--local_rank", str(args.local_rank_top)]
        return bench_main([*args.bench_args, *extra])
    if args.command == "preshard":
        from bloom_server.fast import preshard as preshard_mod

        return preshard_mod.run(args)
    if args.command == "precompile":
        return precompile_cli.run(args)
    if args.command == "client":
        from bloom_server.cli import client as client_mod

        return client_mod.run(args)
    if args.command == "make-tiny-model":
        from pathlib import Path

        from bloom_server.storage.tiny import build_tiny_model

        print(build_tiny_model(Path(args.out_dir)))
        return 0
    return 2
