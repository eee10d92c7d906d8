"""scripts/gpu/tp.sh (tensor parallelism on 2 / 8 GPUs) in its CPU dry run: GPU_TP_QUICK=1, TP=2,
a tiny random BLOOM, 2 gloo ranks under torchrun, fast backend only. Every step must report rc=0, and the texts the
TP=2 servers (plain checkpoint, and the `bloom-server preshard --tp 2` layout) answer over POST /generate must equal
the TP=1 server's, batch and single. No speed is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO


def test_quick_mode_runs_every_step_and_tp2_answers_like_tp1(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "GPU_TP_QUICK": "1", "TP": "2", "PYTHON": sys.executable, "OUT": str(out),
           "GPU_TP_CACHE": str(tmp_path / "cache"), "GPU_TP_BUDGET_S": "150"}  # fmt: skip
    proc = subprocess.run(["bash", "scripts/gpu/tp.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    summary = json.loads((out / "gpu_tp.json").read_text())
    steps = summary["steps"]
    names = [s["name"] for s in steps]
    assert names == ["checkpoints", "serve fast-tp1", "serve fast-tp2", "serve fast-tp2-preshard", "bench 2l",
                     "cold start", "load test"], log[-4000:]  # fmt: skip
    assert all(s["rc"] == 0 and "skipped" not in s["note"] for s in steps), steps
    corr = summary["correctness"]
    assert set(corr) == {"fast-tp2 vs fast-tp1", "fast-tp2-preshard vs fast-tp1"}, corr
    for key, c in corr.items():
        assert c["ran"] and c["batch_equal"] and c["single_equal"] and c["rows_equal"] == c["rows"] == 4, (key, c)
    one = json.loads((out / "answers-fast-tp1.json").read_text())
    assert all(one["batch"]) and one["batch_tokens"] == [12] * 4  # the servers answered, with every token
    rows = summary["bench"]["bench-2l"]
    assert {(r["backend"], r["batch_size"]) for r in rows} == {("hf", 1), ("hf", 4), ("fast", 1), ("fast", 4)}
    assert all(r["tokens_equal_hf"].startswith("equal") for r in rows if r["backend"] == "fast"), rows
    labels = {r["label"] for r in summary["cold_start"] if r.get("ready_s")}
    assert "preshard-tp2-default" in labels, summary["cold_start"]
    assert set(summary["load"]) == {"load-c1", "load-c4"}
    assert all(v["ok"] > 0 and v["errors"] == 0 for v in summary["load"].values()), summary["load"]
    assert 'tensor_parallel":2' in log
