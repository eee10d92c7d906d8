"""Facts about the host this process runs on, from the kernel: the CPUs it may use (its affinity mask bounded by a
container's CPU quota) and its share of them when several ranks of one launch share the host. A leaf: imports nothing
of ours, standard library only."""

from __future__ import annotations

import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP) -> float | None:
    """CPUs a cgroup quota allows (a container's CPU limit: cgroup v2 cpu.max, v1 cfs quota), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota_us > 0 and period_us > 0:
            return quota_us / period_us
    except (OSError, ValueError):
        pass
    return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cpusets), bounded by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, int(limit))
    return max(1, n)


def ranks_on_host() -> int:
    """Processes of this launch on this host (the launcher's LOCAL_WORLD_SIZE, else WORLD_SIZE, else 1)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1))
    except ValueError:
        return 1


def cpus_per_rank() -> int:
    """This rank's share of the host's CPUs: the ranks of a launch share one pod's quota (8 ranks under a 32-CPU limit
    get 4 each), at least 1."""
    return max(1, available_cpus() // ranks_on_host())
