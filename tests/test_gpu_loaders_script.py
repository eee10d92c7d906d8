"""scripts/gpu/loaders.sh in its CPU dry run (the tiny shape, the page cache evicted file by file instead of dropped,
the loaders that run on a CPU): every step of each round runs, every server reaches ready through its BLOOM_LOADER,
the table has a figure in each loader's cells, and $OUT holds the script's four files. No speed is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow


def test_cpu_dry_run_times_every_loader_in_every_round(tmp_path):
    pytest.importorskip("fastsafetensors")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "LOADERS_WORK": str(tmp_path / "work"),
           "LOADERS_ARGS": "--shape tiny", "LOADERS_DROP": "0", "LOADERS": "builtin,fastsafetensors",
           "LOADERS_ROUNDS": "2", "LOADERS_BUDGET_S": "240"}  # fmt: skip
    proc = subprocess.run(["bash", "scripts/gpu/loaders.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=400)  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["loaders.json", "loaders.log", "servers.tgz", "summary.md"]
    rows = json.loads((out / "loaders.json").read_text())["loader_rounds"]
    assert [r["round"] for r in rows] == [1, 2] and rows[1]["order"] == ["fastsafetensors", "builtin"]
    for r in rows:
        assert r["cat_s"] > 0 and r["import_s"] > 0
        for loader in ("builtin", "fastsafetensors"):
            assert r["bare"][loader]["read_s"] > 0 and r["bare"][loader]["bytes"] > 0
            assert r["ready"][loader]["ready_s"] > 0
            assert f"{loader} loader" in " ".join(r["ready"][loader]["log_lines"])
    assert r["ready"]["fastsafetensors"]["timings"]["field loader read, s"] >= 0
    table = (out / "summary.md").read_text().splitlines()
    for loader in ("builtin", "fastsafetensors"):
        (line,) = [ln for ln in table if ln.startswith(f"| plain | {loader} |")]
        assert "| - |" not in line, line
