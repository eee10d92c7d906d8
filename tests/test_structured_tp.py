"""Structured output under tensor parallelism: torchrun, 2 CPU ranks (gloo), --backend fast (continuous batching).
Every rank builds the same matchers and computes the same masks from the same tokens (nothing is broadcast per
step), so constrained rows beside free ones answer valid JSON and the ranks' digests agree at every step."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import sys
from pathlib import Path

import pytest

from helpers import ServerProcess, free_port

pytest.importorskip("llguidance")
pytestmark = pytest.mark.slow

SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
          "required": ["city", "days"], "additionalProperties": False}  # fmt: skip


def test_constrained_rows_at_tp2(tiny_model_dir, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    srv = ServerProcess(
        ["--model", str(tiny_model_dir), "--backend", "fast", "--max-input-length", "64", "--max-new-tokens", "64",
         "--max-total-tokens", "128", "--max-batch-size", "8"],
        free_port(),
        launcher=[torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "bloom_server"],
        log_path=tmp_path / "torchrun.log",
    )  # fmt: skip
    bodies = [{"inputs": f"q{i}", "parameters": {"max_new_tokens": 40, "details": True, **(
        {"grammar": {"type": "json", "value": SCHEMA}} if i % 2 == 0 else {"do_sample": True, "seed": i})}}
        for i in range(8)]  # fmt: skip
    try:
        srv.wait_ready(timeout=180)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            out = list(pool.map(lambda b: srv.post("/generate", b, timeout=120), bodies))
        assert all(s == 200 for s, _, _ in out), out
        for body, (_, answer, _) in zip(bodies, out):
            if "grammar" in body["parameters"]:
                assert answer["details"]["finish_reason"] == "eos_token", answer
                value = json.loads(answer["generated_text"])
                assert value["city"] in ("Paris", "Oslo", "Lima") and 1 <= value["days"] <= 7 and len(value) == 2
        assert "2 of 4 heads" in srv.log()
    finally:
        srv.stop()
    log = (tmp_path / "torchrun.log").read_text()
    assert "disagree" not in log and "fatal" not in log, log[-3000:]
