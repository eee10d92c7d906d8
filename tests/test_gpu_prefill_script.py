"""scripts/gpu/prefill.sh in its CPU dry run (PREFILL_QUICK=1: the tiny shape, fp32, a few seconds of each load):
both servers start, every load answers every request, the summary table has a figure in each cell, the prefix cache
of the `on` server was hit, and $OUT holds the script's three files. No speed is asserted."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow


def test_quick_mode_runs_both_servers_and_every_load(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PREFILL_QUICK": "1", "PYTHON": sys.executable, "OUT": str(out), "PREFILL_BUDGET_S": "300",
           "PREFILL_MODEL": str(tmp_path / "model"), "PREFILL_PORT": str(18300 + os.getpid() % 500)}  # fmt: skip
    proc = subprocess.run(["bash", "scripts/gpu/prefill.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=400)  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["raw.tgz", "run.log", "summary.md"]
    table = (out / "summary.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| workload")]
    assert len(rows) == 23 and all("n/a" not in ln for ln in rows), table
    assert "off: requests ok / errors: bs1 3 / 0" in table and "on: requests ok / errors: bs1 3 / 0" in table
    with tarfile.open(out / "raw.tgz") as tar:
        metrics = tar.extractfile("raw/metrics-on.txt").read().decode()  # type: ignore[union-attr]
        assert tar.extractfile("raw/metrics-off.txt").read() == b""  # type: ignore[union-attr]
    hits = next(ln for ln in metrics.splitlines() if ln.startswith("bloom_server_prefix_cache_hits_total"))
    assert float(hits.split()[1]) > 0, metrics
