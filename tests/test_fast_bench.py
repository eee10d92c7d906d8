"""The benchmarks run and print what they promise (speed itself is never asserted): `bloom-server bench` prints the
original `*** Performance stats:` block line for line, a row per backend and batch size, and greedy tokens equal to
transformers'; scripts/bench/benchmark.py is the same program; scripts/bench/server_overhead.py measures all three servers."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from helpers import REPO

STATS = re.compile(
    r"\n\*\*\* Performance stats:\n"
    r"Throughput per token including tokenize: \d+\.\d\d msecs\n"
    r"Start to ready to generate: \d+\.\d\d\d secs\n"
    r"Tokenize and generate (\d+) \(bs=(\d+)\) tokens: \d+\.\d\d\d secs\n"
    r"Start to finish: \d+\.\d\d\d secs\n"
)


def run(cmd, timeout=240):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                       env={"TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin", "HOME": str(REPO)})  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_bench_prints_the_original_block_and_equal_tokens(tmp_path):
    out = run(
        [
            sys.executable,
            "-m",
            "bloom_server",
            "bench",
            "--backend",
            "fast",
            "--check-tokens",
            "--random-weights",
            "tiny",
            "--batch-size",
            "1,3",
            "--new-tokens",
            "6",
            "--cycles",
            "2",
            "--json",
            str(tmp_path / "b.json"),
        ]
    )
    blocks = STATS.findall(out)
    # hf (the reference, added by --check-tokens) and fast, at bs 1 and 3: 2 cycles x bs x 6 tokens
    assert sorted(blocks) == sorted([("12", "1"), ("12", "1"), ("36", "3"), ("36", "3")]), out
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["backend"], r["batch_size"]) for r in rows] == [("hf", 1), ("fast", 1), ("hf", 3), ("fast", 3)]
    assert all(r["floor_ms"] > 0 and r["tokens_per_s"] > 0 and len(r["runs_s"]) == 2 for r in rows)
    assert [r["tokens_equal_hf"] for r in rows if r["backend"] == "fast"] == ["equal (1/1 rows)", "equal (3/3 rows)"]
    assert "| backend | bs | ms/step |" in out


def test_the_script_is_the_same_program():
    out = run([sys.executable, "scripts/bench/benchmark.py", "--help"])
    assert "--random-weights" in out and "--batch-size" in out and "--new-tokens" in out


def test_server_overhead_measures_every_server(tmp_path):
    out = run([sys.executable, "scripts/bench/server_overhead.py", "--requests", "60", "--seconds", "0.5", "--concurrency",
               "4", "--json", str(tmp_path / "o.json")], timeout=180)  # fmt: skip
    (results,) = json.loads((tmp_path / "o.json").read_text())["rounds"]
    assert [r["variant"] for r in results] == ["bare", "app", "app-wait5"]
    assert all(r["rps"] > 0 and r["p50_ms"] > 0 for r in results)
    # The server's CPU time comes in 10 ms ticks (/proc), and 60 requests of the bare server can fit in none: measured
    # (a number), not necessarily above zero.
    assert all(r["cpu_us_per_request"] is not None and r["cpu_us_per_request"] >= 0 for r in results)
    assert "p50 added vs bare" in out


def test_mixed_load_compares_static_and_continuous_batching(tmp_path):
    out = run([sys.executable, "scripts/bench/benchmark.py", "--random-weights", "tiny", "--mixed", "7", "--batch-size", "3",
               "--new-tokens", "20", "--json", str(tmp_path / "m.json")])  # fmt: skip
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["requests"] == 7 and result["continuous_steps"] <= result["static_steps"] + 3
    assert "continuous batching:" in out and "static batches" in out
