"""Cold start: /ready (503) shows the load's progress while the weights are read, and reaches loaded == total at
ready; /info and /metrics carry the same numbers; scripts/cold_start.py runs end to end on a CPU (no speed asserted).

The load is made observably slow with BLOOM_LOAD_THROTTLE_MBPS, a real rate limit on the reads (documented in
docs/deploy.md as a test/rehearsal setting), not a sleep elsewhere."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from helpers import REPO, ServerProcess, free_port

pytestmark = pytest.mark.slow


def test_ready_reports_load_progress_until_loaded_equals_total(tiny_model_dir, tmp_path):
    # 0.93 MB of fp32 weights at 0.2 MB/s: about 4.6 s of "reading weights"
    env = {"BLOOM_LOAD_THROTTLE_MBPS": "0.2", "BLOOM_LOAD_PREFETCH": "0", "BLOOM_LOAD_CHUNK_MB": "0.0625"}
    srv = ServerProcess(["--model", str(tiny_model_dir), "--backend", "fast", "--max-batch-size", "4"], free_port(),
                        env=env, log_path=tmp_path / "server.log")  # fmt: skip
    seen = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if srv.proc.poll() is not None:
                raise AssertionError(srv.log())
            try:
                status, body, _ = srv.get("/ready", timeout=2)
            except OSError:
                time.sleep(0.05)
                continue
            if status == 503 and body.get("progress"):
                seen.append(body["progress"])
                if body["progress"]["phase"] == "reading weights" and 0 < body["progress"]["loaded_bytes"]:
                    _, info, _ = srv.get("/info")
                    assert info["state"] == "loading" and info["load_progress"]["phase"] == "reading weights"
                    _, metrics, _ = srv.get("/metrics")
                    assert 'bloom_server_load_bytes{kind="total"}' in metrics
            if status == 200:
                break
            time.sleep(0.1)
        assert status == 200, body
        mid = [p for p in seen if p["phase"] == "reading weights" and 0 < p["loaded_bytes"] < p["total_bytes"]]
        assert mid, seen  # observed part-way: bytes loaded of the total, with a percent
        assert all(0 < p["percent"] < 100 for p in mid)
        loaded = [p["loaded_bytes"] for p in seen if p["phase"] == "reading weights"]
        assert loaded == sorted(loaded)  # never goes back
        final = body["progress"]
        assert final["phase"] == "ready" and final["loaded_bytes"] == final["total_bytes"] > 900_000
        assert final["percent"] == 100.0
        phases = [p["phase"] for p in final["phases"]]
        assert phases == ["starting", "reading weights", "allocating cache", "warming up", "ready"], phases
        reading = next(p for p in final["phases"] if p["phase"] == "reading weights")
        assert reading["seconds"] >= 3.0  # the throttle held (0.93 MB at 0.2 MB/s)
        _, metrics, _ = srv.get("/metrics")
        got = dict(re.findall(r'bloom_server_load_bytes\{kind="(\w+)"\} ([0-9.e+]+)', metrics))
        assert float(got["loaded"]) == float(got["total"]) == final["total_bytes"]
        _, info, _ = srv.get("/info")
        assert info["load_progress"]["loaded_bytes"] == final["total_bytes"]
        status, out, _ = srv.post("/generate", {"text": ["Hello"], "max_new_tokens": 3})
        assert status == 200, out
        assert "load phases: starting" in srv.log()
    finally:
        srv.stop()


def test_prefetch_reads_ahead_before_the_loader_starts(tiny_model_dir, tmp_path):
    srv = ServerProcess(["--model", str(tiny_model_dir), "--backend", "fast", "--max-batch-size", "4"], free_port(),
                        env={"BLOOM_LOAD_THROTTLE_MBPS": "2"}, log_path=tmp_path / "server.log")  # fmt: skip
    try:
        srv.wait_ready()
        _, body, _ = srv.get("/ready")
        p = body["progress"]
        assert p["prefetched_bytes"] > 0 and p["phases"][1]["phase"] == "prefetching"
    finally:
        srv.stop()


def test_cold_start_script_runs_on_cpu_and_prints_a_ratio(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "cold_start.py"), "--shape", "tiny", "--dir",
                        str(tmp_path), "--no-no-prefetch-run", "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"ratio start-to-ready / plain read = [0-9.]+", r.stdout), r.stdout
    assert "plain read (cat FILES > /dev/null, cold)" in r.stdout and "parallel read" in r.stdout
    assert "phase reading weights" in r.stdout and "generate: [" in r.stdout
    assert "evicted" in r.stdout  # eviction either confirmed or reported as failed, never silent
    import json

    res = json.loads((tmp_path / "r.json").read_text())
    assert res["runs"][0]["ratio"] > 0 and res["runs"][0]["progress"]["loaded_bytes"] > 0
