"""`bloom-server launch`: `serve` under the deepspeed launcher on BLOOM_NUM_GPUS GPUs (all visible by default), or
alone on a CPU host."""

from __future__ import annotations

import os
import shutil
import sys


def gpu_count() -> int:
    if os.environ.get("BLOOM_NUM_GPUS"):
        return int(os.environ["BLOOM_NUM_GPUS"])
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def run(serve_args: list[str]) -> int:
    n = gpu_count()
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
