"""`bloom-server launch`: `serve` under the deepspeed launcher on BLOOM_NUM_GPUS GPUs (the num_gpus setting; all
visible by default), or alone on a CPU host."""

from __future__ import annotations

import os
import shutil
import sys


def gpu_count(num_gpus: int | None) -> int:
    if num_gpus is not None:
        return num_gpus
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def run(serve_args: list[str]) -> int:
    from pydantic import ValidationError

    from bloom_server.cli.serve import print_invalid
    from bloom_server.settings import load_settings

    try:
        n = gpu_count(load_settings().num_gpus)
    except ValidationError as exc:
        print_invalid("launch", exc)
        return 2
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
