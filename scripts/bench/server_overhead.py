#!/usr/bin/env python3
"""What the HTTP and scheduling path costs, on the CPU: the real app in front of an instant fake model, against a
bare FastAPI route that takes the same JSON body, in one run.

Each server runs in its own process pinned to one core (uvicorn, the same settings for both); the load generator,
a keep-alive HTTP/1.1 client on asyncio, runs on another core. Reported per server:
  - latency at concurrency 1 (one connection, requests back to back): p50 / p90 / p99, and the p50 added over the
    bare route;
  - requests/s at --concurrency connections for --seconds;
  - the server's own CPU time per request at concurrency 1, and requests per second of server CPU time in the
    throughput phase (read from /proc): on a machine others load too, these hold where wall-clock figures swing.
Variants: `bare` (FastAPI, parse the body, answer), `app` (the real app with the server's default settings:
validation, tokenizer, batcher, lockstep runner interface, response; the runner answers at once; an idle
engine starts a call at once, --batch-wait-ms 0), `app-wait5` (the same with --batch-wait-ms 5, the former default,
which shows what the gathering wait costs). `--rounds N` runs every variant N times, interleaved, and reports the
median and the range of the rounds (the added latency and the ratios are taken within each round).

    python scripts/bench/server_overhead.py                         # defaults: 2000 requests, 32 connections, 5 s
    python scripts/bench/server_overhead.py --requests 300 --seconds 2 --json out.json
    python scripts/bench/server_overhead.py --rounds 3 --variants bare,app    # what docs/results/benchmarks.md reports
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
from _loadgen import exchange_content_length, request_bytes  # scripts/ is on the path (this script's own directory)

BODY = {"text": ["Hello world, this is a short prompt"], "max_new_tokens": 8}
VARIANTS = ("bare", "app", "app-wait5")


# ---- the servers (child processes) ----


def bare_app() -> Any:
    from fastapi import Body, FastAPI

    app = FastAPI()

    @app.post("/generate/")
    async def generate(body: dict = Body(...)) -> dict:  # FastAPI's idiom
        texts = body["text"]
        n = int(body.get("max_new_tokens", 8))
        return {"text": [t + " x" * n for t in texts], "num_generated_tokens": [n] * len(texts), "query_id": 0,
                "total_time_taken": "0.00 secs", "method": "generate", "is_encoder_decoder": False}  # fmt: skip

    @app.get("/ready")
    async def ready() -> dict:
        return {"ready": True}

    return app


class InstantRunner:
    """The lockstep runner's interface with no model behind it: every step is answered at once, on the caller's
    thread. generate: each row gets max_new_tokens copies of one token (finish reason: length)."""

    dead = None

    def __init__(self, token: int):
        self.token = token

    def submit(self, kind: str, payload: Any = None, listener: Any = None) -> concurrent.futures.Future:
        from bloom_server.runtime.protocol import GenerateOutput
        from bloom_server.types import FinishReason

        fut: concurrent.futures.Future = concurrent.futures.Future()
        if kind == "generate":
            rows = tuple((self.token,) * n for n in payload.max_new_tokens)
            fut.set_result(GenerateOutput(rows, (FinishReason.LENGTH,) * len(rows)))
        else:
            fut.set_result(0.0 if kind == "forward" else None)
        return fut


def real_app(batch_wait_ms: float | None) -> Any:
    from bloom_server.api.app import create_app
    from bloom_server.frontend.core import Engine
    from bloom_server.frontend.tokenizer import TextTokenizer
    from bloom_server.settings import load_settings
    from bloom_server.storage.tiny import ensure_tiny_model, tiny_dir
    from bloom_server.types import ModelInfo

    model = ensure_tiny_model(tiny_dir(load_settings().home))
    overrides = {} if batch_wait_ms is None else {"batch_wait_ms": batch_wait_ms}
    settings = load_settings(model=str(model), log_level="warning", **overrides)
    engine = Engine(settings)

    def boot() -> None:
        tokenizer = TextTokenizer(model)
        token = (tokenizer.encode(" x") or [5])[0]
        info = ModelInfo(model_id="tiny", model_dir=str(model), backend="instant", dtype="none", world_size=1,
                         max_total_tokens=settings.total_tokens_limit)  # fmt: skip
        engine.attach(InstantRunner(token), tokenizer, info)
        engine.warmup()

    return create_app(engine, settings, "tiny", on_startup=boot)


def serve(variant: str, port: int, core: int | None) -> None:
    import uvicorn

    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    app = bare_app() if variant == "bare" else real_app(5.0 if variant == "app-wait5" else None)
    # The same server settings for both; access log off (a log line per request would be measured too).
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ---- the load generator ----


def request_for(body: dict) -> bytes:
    return request_bytes("POST", "/generate/", "127.0.0.1", json.dumps(body).encode())


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> None:
    status = await exchange_content_length(reader, writer, req)
    if status != 200:
        raise RuntimeError(f"HTTP {status}")


async def latencies(port: int, n: int, req: bytes) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await _exchange(reader, writer, req)
        out.append(time.perf_counter() - t)
    writer.close()
    return out


async def throughput(port: int, conns: int, seconds: float, req: bytes) -> tuple[int, float]:
    stop = time.perf_counter() + seconds
    counts = [0] * conns

    async def worker(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop:
            await _exchange(reader, writer, req)
            counts[i] += 1
        writer.close()

    t = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(conns)))
    return sum(counts), time.perf_counter() - t


def run_client(coro: Any) -> Any:
    """The client on uvloop when it is installed (it is with uvicorn[standard]): the bare route answers more requests
    than a plain asyncio client on one core can send, and the ratio would then measure the client."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def client_loop() -> str:
    import importlib.util

    return "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError("server not ready")


def measure(variant: str, args: argparse.Namespace, server_core: int | None) -> dict[str, Any]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, __file__, "--serve", variant, "--port", str(port)]
    if server_core is not None:
        cmd += ["--core", str(server_core)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})  # fmt: skip
    try:
        wait_ready(port, proc)
        req = request_for(BODY)
        run_client(latencies(port, max(50, args.requests // 10), req))  # warm-up
        cpu0 = cpu_seconds(proc.pid)
        lat = sorted(run_client(latencies(port, args.requests, req)))
        cpu1 = cpu_seconds(proc.pid)
        client0 = time.process_time()
        done, wall = run_client(throughput(port, args.concurrency, args.seconds, req))
        client_cpu = (time.process_time() - client0) / wall
        cpu2 = cpu_seconds(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    q = statistics.quantiles(lat, n=100)
    cpu_us = None if cpu0 is None or cpu1 is None else 1e6 * (cpu1 - cpu0) / len(lat)
    # requests per second of the server's own CPU time: what one core would do if the server had it to itself
    rps_cpu = None if cpu1 is None or cpu2 is None or cpu2 <= cpu1 else done / (cpu2 - cpu1)
    return {"variant": variant, "p50_ms": 1e3 * statistics.median(lat), "p90_ms": 1e3 * q[89],
            "p99_ms": 1e3 * q[98], "rps": done / wall, "rps_per_cpu_s": rps_cpu, "requests": len(lat),
            "cpu_us_per_request": cpu_us, "server_cpu_fraction": None if rps_cpu is None else done / wall / rps_cpu,
            "client_cpu_fraction": client_cpu, "load1": os.getloadavg()[0]}  # fmt: skip


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc): the server's own work per request, which other load on the
    machine does not inflate the way it inflates wall-clock latency (10 ms ticks: over 2000 requests, fine)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def spread(values: list[float], fmt: str) -> str:
    """median (min-max) of the rounds"""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000, help="requests for the concurrency-1 latency")
    p.add_argument("--concurrency", type=int, default=32, help="connections for the throughput phase")
    p.add_argument("--seconds", type=float, default=5.0, help="length of the throughput phase")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat every variant, interleaved (bare, app, ..., bare, "
        "app, ...), and report the median and the range of the rounds (default 1)",
    )
    p.add_argument("--json", help="write the results here")
    p.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--core", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.core)
        return 0
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    server_core = cores[0] if len(cores) >= 2 else None
    if len(cores) >= 2:
        os.sched_setaffinity(0, {cores[1]})  # the client on another core than the server
    variants = args.variants.split(",")
    load_start = os.getloadavg()
    rounds = []
    for _ in range(args.rounds):
        rounds.append([measure(v, args, server_core) for v in variants])
    load_end = os.getloadavg()
    print(f"# server overhead: {len(cores) or '?'} cores, server pinned to core {server_core}, client on another; "
          f"{args.requests} requests at concurrency 1, then {args.concurrency} connections for {args.seconds:.0f} s; "
          f"body {json.dumps(BODY)}; client loop {client_loop()}; {args.rounds} round(s), interleaved: median (min-max) of the rounds; "
          f"load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end")  # fmt: skip
    print(
        "| server | p50 ms | p90 ms | p99 ms | p50 added vs bare | server CPU us/request (c=1) | requests/s (1 core) "
        "| vs bare | requests per server CPU-second | vs bare |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, v in enumerate(variants):
        rs = [rnd[i] for rnd in rounds]
        bares = [next((r for r in rnd if r["variant"] == "bare"), None) for rnd in rounds]
        have_bare = all(b is not None for b in bares)
        # added latency and the requests/s ratio are taken within each round (same load), then summarized
        added = spread([r["p50_ms"] - b["p50_ms"] for r, b in zip(rs, bares)], "{:+.2f} ms") if have_bare else "-"
        ratio = spread([r["rps"] / b["rps"] for r, b in zip(rs, bares)], "{:.2f}") if have_bare else "-"
        cpu = [r["cpu_us_per_request"] for r in rs if r["cpu_us_per_request"] is not None]
        have_cpu = have_bare and all(r["rps_per_cpu_s"] and b["rps_per_cpu_s"] for r, b in zip(rs, bares))
        per_cpu = spread([r["rps_per_cpu_s"] for r in rs], "{:.0f}") if all(r["rps_per_cpu_s"] for r in rs) else "-"
        cpu_ratio = (
            spread([r["rps_per_cpu_s"] / b["rps_per_cpu_s"] for r, b in zip(rs, bares)], "{:.2f}") if have_cpu else "-"
        )
        print(
            f"| {v} | {spread([r['p50_ms'] for r in rs], '{:.2f}')} | {spread([r['p90_ms'] for r in rs], '{:.2f}')} "
            f"| {spread([r['p99_ms'] for r in rs], '{:.2f}')} | {added} | {spread(cpu, '{:.0f}') if cpu else '-'} "
            f"| {spread([r['rps'] for r in rs], '{:.0f}')} | {ratio} | {per_cpu} | {cpu_ratio} |"
        )
    for v in variants:
        rs = [r for rnd in rounds for r in rnd if r["variant"] == v]
        srv = [r["server_cpu_fraction"] for r in rs if r["server_cpu_fraction"] is not None]
        print(
            f"# {v}, throughput phase: the server used {spread([100 * x for x in srv], '{:.0f}') if srv else '-'}% of "
            f"its core, the client {spread([100 * r['client_cpu_fraction'] for r in rs], '{:.0f}')}% of its own"
        )
    results = {
        "rounds": rounds,
        "load_avg_start": load_start,
        "load_avg_end": load_end,
        "body": BODY,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
