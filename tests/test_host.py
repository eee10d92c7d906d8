"""The CPUs a rank may use: its affinity mask, bounded by a container's CPU quota (cgroup v2 or v1), shared by the
ranks of a launch on one host; and the grammar engine's fill pool sized by it."""

from __future__ import annotations

import pytest

from bloom_server import host


def test_a_cgroup_quota_bounds_the_cpus(tmp_path):
    assert host.cgroup_cpu_limit(tmp_path) is None  # no files: no limit known
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert host.cgroup_cpu_limit(tmp_path) is None  # v2, unlimited
    (tmp_path / "cpu.max").write_text("800000 100000\n")
    assert host.cgroup_cpu_limit(tmp_path) == 8.0  # v2: an 8-CPU limit
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("250000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert host.cgroup_cpu_limit(tmp_path) == 2.5  # v1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert host.cgroup_cpu_limit(tmp_path) is None  # v1, unlimited


def test_ranks_on_one_host_share_its_cpus(monkeypatch):
    for var in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(host, "available_cpus", lambda: 32)
    assert host.cpus_per_rank() == 32
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert host.cpus_per_rank() == 4  # eight ranks under one pod's 32-CPU limit
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # the launcher's count of ranks on this host wins
    assert host.cpus_per_rank() == 16
    monkeypatch.setattr(host, "available_cpus", lambda: 3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert host.cpus_per_rank() == 1
    assert host.available_cpus() >= 1


@pytest.mark.parametrize(("cpus", "ranks", "threads"), [(64, 1, 32), (32, 8, 4), (2, 1, 2)])
def test_the_grammar_fill_pool_takes_this_ranks_share(tiny_model_dir, monkeypatch, cpus, ranks, threads):
    from bloom_server import structured

    monkeypatch.setattr(host, "available_cpus", lambda: cpus)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    grammars = structured.Grammars.for_model(tiny_model_dir, (2,))
    assert grammars.threads == threads and grammars.templates == threads  # at most 32
