"""Cold start: /ready (503) shows the load's progress while the weights are read, and reaches loaded == total at
ready; /info and /metrics carry the same numbers; scripts/bench/cold_start.py runs end to end on a CPU (no speed asserted).

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
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "bench" / "cold_start.py"), "--shape", "tiny", "--dir",
                        str(tmp_path), "--no-no-prefetch-run", "--no-kept-kernel-cache-run", "--json",
                        str(tmp_path / "r.json"), "--seed-target", "cuda:90"],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"ratio start-to-ready / plain read = [0-9.]+", r.stdout), r.stdout
    assert "plain read (cat FILES > /dev/null, cold)" in r.stdout and "parallel read" in r.stdout
    assert "phase reading weights" in r.stdout and "generate: [" in r.stdout
    assert "inside: warm-up generate" in r.stdout  # the warm-up's own seconds, from /ready's progress timings
    assert "evicted" in r.stdout  # eviction either confirmed or reported as failed, never silent
    import json

    res = json.loads((tmp_path / "r.json").read_text())
    assert res["runs"][0]["ratio"] > 0 and res["runs"][0]["progress"]["loaded_bytes"] > 0
    # The prefetch read every byte ahead of the loader, which never read the disk itself.
    prog = res["runs"][0]["progress"]
    assert prog["prefetched_bytes"] >= prog["loaded_bytes"] > 0
    assert prog["timings"]["chunks the loader read from disk itself"] == 0
    # The seeded run: `bloom-server precompile` made the seed with no GPU visible, the server copied all of it.
    from bloom_server.fast.coldstart.precompile import triton_installed

    if triton_installed():
        (seed,) = res["seeds"]
        assert seed["rc"] == 0 and seed["report"]["entries"] > 10
        (sr,) = [r for r in res["runs"] if r["variant"] == "plain-seeded"]
        assert sr["ratio"] > 0
        assert sr["progress"]["timings"]["kernel cache seed: entries copied"] == seed["report"]["entries"]


# ---- kernels ahead of the warm-up (fast/coldstart/precompile.py, fast/triton_kernels.py Prewarm): no-ops on a CPU ----


def test_decode_plan_follows_the_model_choices():
    pytest.importorskip("torch")
    from bloom_server.fast import triton_kernels as tk
    from bloom_server.fast.fusion import FUSE_VARIANTS

    default = frozenset(FUSE_VARIANTS["triton_head"])
    p = tk.decode_plan(hidden=4096, n_head=32, vocab_size=250880, world=1, dtype="float16", max_batch=32,
                       max_seq=612, fuse=default)  # fmt: skip
    assert [(g.name, g.N, g.K, g.epilogue) for g in p.gemvs] == [
        ("qkv", 12288, 4096, None), ("dense", 4096, 4096, "residual"), ("fc1", 16384, 4096, "gelu"),
        ("fc2", 4096, 16384, "residual"), ("head", 250880, 4096, None)]  # fmt: skip
    assert p.attention and (p.hp, p.D) == (32, 128) and p.rows(1) == (1,) and p.rows(2) == (2, 16)
    assert tk.DecodePlan.from_json(p.to_json()) == p
    # Two ranks: the row-parallel layers stay eager (their all-reduce); the head is this rank's vocabulary rows.
    p2 = tk.decode_plan(hidden=4096, n_head=32, vocab_size=250880, world=2, dtype="bfloat16", max_batch=8,
                        max_seq=612, fuse=default)  # fmt: skip
    assert [(g.name, g.N) for g in p2.gemvs] == [("qkv", 6144), ("fc1", 8192), ("head", 125440)]
    assert p2.rows(2) == (2,)
    # The 176B head on one rank is past 32-bit offsets: cuBLAS, so nothing to compile for it.
    p3 = tk.decode_plan(hidden=14336, n_head=112, vocab_size=250880, world=1, dtype="float16", max_batch=1,
                        max_seq=2048, fuse=default)  # fmt: skip
    assert "head" not in [g.name for g in p3.gemvs] and p3.rows(2) == ()
    for kw in ({"dtype": "float32"}, {"fuse": frozenset()}):
        args = {"hidden": 64, "n_head": 4, "vocab_size": 512, "world": 1, "dtype": "float16", "max_batch": 4,
                "max_seq": 64, "fuse": default, **kw}  # fmt: skip
        assert tk.decode_plan(**args).empty


def test_kernel_precompile_is_a_noop_without_a_gpu(tiny_model_dir, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from bloom_server.backends.fast_coldstart import start_kernel_compile
    from bloom_server.fast import triton_kernels as tk
    from bloom_server.fast.coldstart import precompile
    from bloom_server.settings import load_settings
    from bloom_server.storage.model_dir import resolve_model_dir

    monkeypatch.setenv("TRITON_CACHE_DIR", "/nonexistent-before")
    s = load_settings(backend="fast", kernel_cache_dir=str(tmp_path / "kc"))
    md = resolve_model_dir(str(tiny_model_dir))
    monkeypatch.setattr(precompile, "gpu_likely", lambda: False)
    assert start_kernel_compile(s, md) is None  # no worker process on a CPU host
    import os

    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "kc") and (tmp_path / "kc").is_dir()
    assert start_kernel_compile(load_settings(backend="hf"), md) is None
    facts = {"model_dir": str(tiny_model_dir), "world": 1, "dtype": "float32", "max_batch": 4, "max_seq": 64,
             "fast_decode": None}  # fmt: skip
    assert tk.start_prewarm(torch.device("cpu"), facts, hidden=64) is None
    assert not precompile.enabled("0") and precompile.worker_count("0") == 0
    assert precompile.enabled("3") and precompile.worker_count("3") == 3
    assert load_settings(fast_precompile="0").fast_precompile == "0"  # BLOOM_FAST_PRECOMPILE, through the settings


def test_the_fast_load_runs_the_prewarm_hook_and_joins_it_before_the_warm_up(tiny_model_dir, monkeypatch):
    pytest.importorskip("torch")
    import threading

    from bloom_server.backends.fast import FastBackend
    from bloom_server.fast import triton_kernels as tk
    from bloom_server.progress import LoadProgress
    from bloom_server.settings import load_settings
    from bloom_server.storage.model_dir import resolve_model_dir
    from bloom_server.types import RankContext

    calls: list = []

    class FakePrewarm:  # what start_prewarm returns on a GPU: still running when the weights are in
        def __init__(self):
            self.stage1, self.t0, self.times, self.finished = threading.Event(), 0.0, {"stage 1 (M=1) kernels": 1.5}, 0

        def running(self):
            return not self.stage1.is_set()

        def finish(self):
            calls.append(("finish", progress.phase))
            self.stage1.set()
            self.finished += 1
            return 0.25

        def summary(self):
            return "fake"

        def details(self):
            return ""

    fake = FakePrewarm()

    def start_prewarm(device, facts, *, hidden, workers=None, keep_going=None, reserve=None, enabled=True):
        calls.append(("start", progress.phase, device.type, facts, hidden, workers, keep_going()))
        kv = 2 * 2 * 4 * 4 * 96 * 16 * 4  # 2 layers x 4 rows x 4 heads x 96 positions x 16 dims, fp32, K and V
        assert reserve() > kv  # the weights still to come and the KV cache
        return fake

    monkeypatch.setattr(tk, "start_prewarm", start_prewarm)
    s = load_settings(backend="fast", max_input_length=32, max_total_tokens=96, max_batch_size=4)
    b = FastBackend(s, resolve_model_dir(str(tiny_model_dir)), RankContext())
    progress = LoadProgress()
    b.progress, b.early = progress, "workers"
    b.load()
    start, finish = calls
    assert start[:3] == ("start", "starting", "cpu") and start[4:] == (64, "workers", True)
    assert start[3] == {
        "model_dir": str(tiny_model_dir),
        "world": 1,
        "max_batch": 4,
        "dtype": "float32",
        "max_seq": 96,
        "fast_decode": None,
        "weights": None,
    }
    assert finish == ("finish", "compiling kernels") and fake.finished == 1
    phases = [p for p, _ in progress.phases]
    assert phases == ["starting", "reading weights", "allocating cache", "compiling kernels"], phases
    t = progress.snapshot()["timings"]
    assert t["kernels waited after the weights"] == 0.25 and t["kernels: stage 1 (M=1) kernels"] == 1.5
    assert b.generate is not None and b.engine is not None


def test_compile_workers_report_their_stages_and_exit(tiny_model_dir):
    """The worker plumbing on a CPU: the child process (python -c, bloom_server found through PYTHONPATH) finds no
    CUDA, reports both stages done with 0 variants and exits 0; the parent's wait returns at once after."""
    pytest.importorskip("torch")
    from bloom_server.fast.coldstart.precompile import CompileWorkers

    facts = {"model_dir": str(tiny_model_dir), "world": 1, "dtype": "float16", "max_batch": 4, "max_seq": 64}
    w = CompileWorkers(facts, parts=1)
    assert len(w.procs) == 1
    assert w.wait(1, timeout=120) and w.wait(2, timeout=30)
    assert w.procs[0].wait(30) == 0
    assert w.finished_at(1) is not None and w.compiled == [0, 0, 0]


def test_precompile_module_is_torch_free_at_import():
    """serve.py starts the compile workers before torch is imported: fast/coldstart/precompile.py must not import it."""
    code = ("import sys, threading; before = set(threading.enumerate()); import bloom_server.fast.coldstart.precompile; "
            "assert 'torch' not in sys.modules and 'triton' not in sys.modules; "
            "assert set(threading.enumerate()) == before; print('ok')")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")})  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_prewarm_waits_for_the_workers_then_warms_and_stops_when_the_weights_are_in(monkeypatch):
    """Prewarm's order on a GPU, with the CUDA calls stubbed: the workers' stage 1, the one-row kernels, cuBLAS, then
    the multi-row kernels only while keep_going(); finish() joins it."""
    torch = pytest.importorskip("torch")
    import threading

    from bloom_server.fast import triton_kernels as tk

    events: list = []
    for name in ("set_device", "synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)

    class Stream:
        def __init__(self, *a, **k):
            pass

        def synchronize(self):
            events.append("side sync")

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: __import__("contextlib").nullcontext())

    def fake_warm(plan, device, stage, stop=None, reserve=None):
        events.append(("warm", stage, reserve() if reserve else 0))
        return {f"gemv qkv M={stage}": 0.5}

    monkeypatch.setattr(tk, "warm", fake_warm)

    class Workers:
        def __init__(self):
            self.go = threading.Event()

        def wait(self, stage, timeout):
            events.append(("wait", stage))
            return self.go.wait(timeout)

    plan = tk.decode_plan(hidden=64, n_head=4, vocab_size=512, world=1, dtype="float32", max_batch=4, max_seq=64,
                          fuse={"tgemv"})  # fmt: skip
    plan = tk.DecodePlan("float16", plan.gemvs, False, 4, 16, 64, 4)
    weights_in = threading.Event()
    w = Workers()
    p = tk.Prewarm(plan, torch.device("cpu"), 64, w, keep_going=lambda: not weights_in.is_set(), reserve=lambda: 7)
    p.start()
    time.sleep(0.2)
    assert events == [("wait", 1)] and not p.stage1.is_set()  # nothing runs before the workers' stage 1
    w.go.set()
    assert p.stage1.wait(10)
    p._thread.join(10)
    assert events[:3] == [("wait", 1), ("warm", 1, 7), ("wait", 2)] and ("warm", 2, 7) in events, events
    assert p.finish() < 5 and p.error is None
    assert "stage 1 (M=1) kernels" in p.summary() and "cublas" in p.summary() and "gemv qkv M=1" in p.details()
    # Weights already in: the multi-row variants are left to first use.
    events.clear()
    weights_in.set()
    p2 = tk.Prewarm(plan, torch.device("cpu"), 64, None, keep_going=lambda: not weights_in.is_set()).start()
    p2.finish()
    assert [e for e in events if e[0] == "warm"] == [("warm", 1, 0)], events
    # A seed holding every variant for this GPU's architecture (precompile.seed_archs): no wait for the workers,
    # whose only work left is finding those binaries; for another architecture the wait is as before.
    weights_in.clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    for archs, waits in (((80, 90), False), ((86,), True)):
        events.clear()
        seeded = Workers()
        seeded.seed_archs = archs
        seeded.go.set()
        p3 = tk.Prewarm(plan, torch.device("cpu"), 64, seeded, keep_going=lambda: True).start()
        p3.finish()
        assert p3.error is None and ("warm", 1, 0) in events and ("warm", 2, 0) in events, events
        assert (("wait", 1) in events) is waits and (("wait", 2) in events) is waits, (archs, events)
        assert ("wait for compile workers (stage 1)" in p3.times) is waits
