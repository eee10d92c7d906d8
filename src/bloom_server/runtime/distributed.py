"""Process groups. The launcher (deepspeed or torchrun) sets RANK/WORLD_SIZE/LOCAL_RANK and MASTER_ADDR/PORT."""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import time
import zlib
from collections.abc import Callable
from typing import Any

from bloom_server.types import RankContext

log = logging.getLogger(__name__)

# Followers wait for the next step inside a broadcast on the control group. Rank 0 sends a heartbeat every few
# seconds, so this bound is reached only if rank 0 hangs; a dead peer is seen at once as a closed connection.
CONTROL_TIMEOUT = datetime.timedelta(minutes=30)
# The watchdog's own group: a tiny all-reduce every second from a thread on every rank, independent of steps. It sees
# a peer die even while this rank is inside a long step (NCCL alone would wait forever on a dead peer).
WATCHDOG_TIMEOUT = datetime.timedelta(seconds=30)


def launcher_ranks(local_rank_flag: int | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment, torch-free. `--local_rank` (passed by the
    deepspeed launcher) is accepted as a fallback for LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE") or 1)
    rank = int(os.environ.get("RANK") or 0)
    local = int(os.environ.get("LOCAL_RANK") or (local_rank_flag if local_rank_flag is not None else 0))
    return rank, world, local


def rank_context(local_rank_flag: int | None = None) -> RankContext:
    """This process among the launcher's ranks, and its device type (imports torch)."""
    import torch

    rank, world, local = launcher_ranks(local_rank_flag)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return RankContext(rank=rank, world_size=world, local_rank=local, device_type=device)


class ControlChannel:
    """Rank 0 -> every rank: pickled steps over a gloo group (CPU tensors, so it never touches the GPU's streams)."""

    def __init__(self, group: Any, ctx: RankContext, watchdog_group: Any = None):
        self.group = group
        self.ctx = ctx
        self.watchdog_group = watchdog_group
        self.closing = False  # set before an orderly shutdown: peers leaving is then expected

    def start_watchdog(self, on_lost: Callable[[str], None], interval_s: float = 1.0) -> None:
        import threading

        import torch
        import torch.distributed as dist

        def loop() -> None:
            beat = torch.zeros(1)
            while not self.closing:
                try:
                    dist.all_reduce(beat, group=self.watchdog_group)
                except Exception as exc:  # noqa: BLE001 - any failure of the heartbeat is a lost peer
                    if not self.closing:
                        on_lost(f"rank {self.ctx.rank} lost a peer rank: {type(exc).__name__}: {exc}")
                    return
                time.sleep(interval_s)

        threading.Thread(target=loop, name="bloom-watchdog", daemon=True).start()

    def broadcast(self, obj: Any = None) -> Any:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def agree(self, value: Any) -> bool:
        """Every rank contributes a digest of its result; True when all ranks hold the same."""
        import torch
        import torch.distributed as dist

        digest = torch.tensor([zlib.crc32(pickle.dumps(value))], dtype=torch.int64)
        gathered = [torch.zeros_like(digest) for _ in range(self.ctx.world_size)]
        dist.all_gather(gathered, digest, group=self.group)
        return all(int(g) == int(digest) for g in gathered)


def init_distributed(ctx: RankContext) -> ControlChannel | None:
    """Initialise the default group (nccl on GPUs, gloo on CPUs) and a gloo control group. None for one process."""
    if ctx.world_size == 1:
        return None
    import torch
    import torch.distributed as dist

    if ctx.device_type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    if not dist.is_initialized():
        backend = "nccl" if ctx.device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=ctx.rank, world_size=ctx.world_size)
    group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    watchdog = dist.new_group(backend="gloo", timeout=WATCHDOG_TIMEOUT)
    log.info("rank %d/%d: process groups ready (%s)", ctx.rank, ctx.world_size, dist.get_backend())
    return ControlChannel(group, ctx, watchdog)


def shutdown_distributed() -> None:
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at exit
        pass
