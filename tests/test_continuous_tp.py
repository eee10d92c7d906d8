"""Continuous batching under tensor parallelism: torchrun, 2 CPU ranks (gloo), --backend fast --batching continuous.
Every rank applies rank 0's joins and leaves at the same step, so concurrent requests of different lengths (rows
joining and leaving all the time) get the texts one rank gives them, and the ranks' digests agree at every step."""

from __future__ import annotations

import concurrent.futures
import random
import shutil
import sys
from pathlib import Path

import pytest

from helpers import ServerProcess, free_port
from test_continuous_server import PROMPTS

pytestmark = pytest.mark.slow
ARGS = ["--backend", "fast", "--batching", "continuous", "--max-input-length", "64", "--max-new-tokens", "64",
        "--max-total-tokens", "128", "--max-batch-size", "4"]  # fmt: skip


# Chunked prefill and the prefix cache: prompts sharing a prefix of a cached block (32 tokens) and many chunks.
PREFILL = ["--prefill-step-tokens", "6", "--prefill-chunk-tokens", "2", "--prefix-cache-mb", "1"]
SHARED = " ".join(PROMPTS[:7]) + " "


def _bodies(prefix=""):
    rng = random.Random(1)
    bodies = []
    for i, p in enumerate(PROMPTS):
        body = {"text": [prefix + p], "max_new_tokens": rng.randint(2, 40), "min_length": 1000 if i % 2 else 0}
        if i == 3:
            body.update(do_sample=True, top_k=20)  # sampled rows join too (unseeded: its text is not compared)
        bodies.append(body)
    return bodies


def _run(srv, bodies):
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        out = list(pool.map(lambda b: srv.post("/generate", b), bodies))
    assert all(status == 200 for status, _, _ in out), out
    return [(body["text"], body["num_generated_tokens"]) for _, body, _ in out]


@pytest.mark.parametrize("extra, prefix", [([], ""), (PREFILL, SHARED)], ids=["plain", "chunked-cached"])
def test_two_ranks_under_concurrent_load_answer_like_one(tiny_model_dir, tmp_path, extra, prefix):
    bodies = _bodies(prefix)
    one = ServerProcess(["--model", str(tiny_model_dir), *ARGS, *extra], free_port(), log_path=tmp_path / "one.log")
    try:
        one.wait_ready()
        alone = [_run(one, [b])[0] for b in bodies]
    finally:
        one.stop()
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    srv = ServerProcess(
        ["--model", str(tiny_model_dir), *ARGS, *extra],
        free_port(),
        launcher=[torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "bloom_server"],
        log_path=tmp_path / "torchrun.log",
    )
    try:
        srv.wait_ready()
        for _ in range(2):  # twice: the second round reuses slots freed by the first
            together = _run(srv, bodies)
            for i, (a, t) in enumerate(zip(alone, together)):
                if bodies[i].get("do_sample"):
                    assert t[1][0] <= bodies[i]["max_new_tokens"]
                else:
                    assert t == a, (i, bodies[i])
        assert "2 of 4 heads" in srv.log() and "batching: continuous" in srv.log()
        status, info, _ = srv.get("/info")
        assert info["tensor_parallel"] == 2 and info["batching"] == "continuous"
        if extra:
            status, text, _ = srv.get("/metrics")
            hits = [ln for ln in text.splitlines() if ln.startswith("bloom_server_prefix_cache_hits_total ")]
            assert hits and float(hits[0].split()[1]) > 0, text
    finally:
        srv.stop()
    log = (tmp_path / "torchrun.log").read_text()  # torchrun itself exits non-zero on SIGTERM; the ranks must not
    assert "disagree" not in log and "fatal" not in log and "Application shutdown complete" in log, log[-3000:]
