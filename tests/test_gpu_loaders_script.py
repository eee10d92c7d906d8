"""scripts/gpu/loaders.sh in its CPU dry run (the tiny shape, the page cache evicted file by file instead of dropped,
the loaders that run on a CPU): every step of each round runs, every server reaches ready through its BLOOM_LOADER,
the table has a figure in each loader's cells, and $OUT holds the script's files. A second set (LOADERS_ARGS's ";")
times the int8 pre-sharded layout: `bloom-server preshard --dtype int8` written, served with --dtype int8, compared
with the cat and bare reads of its own file. No speed is asserted."""

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
           "LOADERS_ARGS": "--shape tiny; --shape tiny --layouts preshard-int8-tp1 --rounds 1", "LOADERS_DROP": "0",
           "LOADERS": "builtin,fastsafetensors", "LOADERS_ROUNDS": "2", "LOADERS_BUDGET_S": "300"}  # fmt: skip
    proc = subprocess.run(["bash", "scripts/gpu/loaders.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=500)  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["loaders-2.json", "loaders.json", "loaders.log", "servers.tgz",
                                                     "summary.md"]  # fmt: skip
    rows = json.loads((out / "loaders.json").read_text())["loader_rounds"]
    assert [r["round"] for r in rows] == [1, 2] and rows[1]["order"] == ["fastsafetensors", "builtin"]
    (int8,) = json.loads((out / "loaders-2.json").read_text())["loader_rounds"]
    assert {r["layout"] for r in rows} == {"plain"} and int8["layout"] == "preshard-int8-tp1"
    assert all(r["shape"] == "tiny" for r in [*rows, int8])
    for r in [*rows, int8]:
        assert r["cat_s"] > 0 and r["import_s"] > 0 and r["import_warm_s"] > 0 and r["evict"] == "weights"
        assert r["direct_s"] is None or r["direct_s"] > 0  # None only where the file system refuses O_DIRECT
        for loader in ("builtin", "fastsafetensors"):
            assert r["bare"][loader]["read_s"] > 0 and r["bare"][loader]["bytes"] > 0
            assert r["ready"][loader]["ready_s"] > 0
            assert f"{loader} loader" in " ".join(r["ready"][loader]["log_lines"])
    assert r["ready"]["fastsafetensors"]["timings"]["field loader read, s"] >= 0
    # The int8 layout: its own file (int8 weights with fp32 scales, the rest fp16: fewer bytes than the fp32
    # checkpoint), which both loaders read whole, served by the int8 engine.
    work = tmp_path / "work"
    (plain,) = work.glob("bloom-tiny-fp32/model.safetensors")
    (shard,) = work.glob("bloom-tiny-fp32-int8-tp1/model-tp01-rank00.safetensors")
    assert json.loads((shard.parent / "preshard.json").read_text())["dtype"] == "I8"
    assert int8["bytes"] == shard.stat().st_size < rows[0]["bytes"] == plain.stat().st_size
    assert int8["bare"]["builtin"]["bytes"] == int8["bare"]["fastsafetensors"]["bytes"]
    for loader in ("builtin", "fastsafetensors"):
        assert "fast engine int8" in " ".join(int8["ready"][loader]["log_lines"])
        assert "fast engine int8" not in " ".join(rows[0]["ready"][loader]["log_lines"])
    table = (out / "summary.md").read_text().splitlines()
    assert sum(ln.startswith("| shape |") for ln in table) == 1  # one table over both sets
    for layout in ("plain", "preshard-int8-tp1"):
        for loader in ("builtin", "fastsafetensors"):
            (line,) = [ln for ln in table if ln.startswith(f"| tiny (weights evicted) | {layout} | {loader} |")]
            assert "| - |" not in line, line
        (disk,) = [ln for ln in table if ln.startswith(f"| tiny (weights evicted) | {layout} | (cat; import torch) |")]
        assert "import with torch cached" in disk and "parallel O_DIRECT" in disk


def test_layouts_are_parsed_once_each_and_a_bad_one_is_named():
    sys.path.insert(0, str(REPO / "scripts" / "bench"))
    import cold_start

    assert cold_start.parse_layouts("plain", 0) == [("plain", None, None)]
    assert cold_start.parse_layouts("plain,preshard-int8-tp1", 2) == [
        ("plain", None, None), ("preshard-int8-tp1", 1, "int8"), ("preshard-tp2", 2, None)]  # fmt: skip
    assert cold_start.parse_layouts("preshard-tp2", 2) == [("preshard-tp2", 2, None)]
    for bad in ("int8", "preshard-int4-tp1", "preshard-int8-tp0", ","):
        with pytest.raises(ValueError, match="--layouts"):
            cold_start.parse_layouts(bad, 0)
