#!/usr/bin/env python3
"""Soak: a steady mixed load against bloom-server for a given time, reporting latency percentiles per time window,
errors, and the memory growth of the server process.

    # start the embedded tiny model here (as `scripts/dev.sh serve` does) and soak it for 10 minutes
    .venv/bin/python scripts/bench/soak.py --serve --duration 600

    # or a server that is already running on this machine (its pid is found from the port, for VmRSS)
    .venv/bin/python scripts/bench/soak.py --url http://127.0.0.1:8080 --duration 1800 --out soak.json

The load: `--concurrency` clients, each sending one request after another with a random pause (exponential, mean
`--think-ms`): /generate with prompts of 1 to ~60 tokens and max_new_tokens from 1 to the server's limit (greedy and
sampled, one to three prompts a request), /tokenize, /forward, and, when the server has them, /generate_stream (read to
the end) and /v1/completions. Every `--burst-every` seconds a burst of 2 x concurrency requests lands at once. Bounded by
`--duration` and `--max-requests`; every request by `--timeout`.

Each window (`--window` seconds) prints: requests, throughput, errors by kind, latency p50/p90/p99/max of /generate,
the server's VmRSS, threads and open files. At the end: the totals, the overall percentiles, and the memory growth (first
window to last, and the slope of a least-squares line in MiB per hour). Exit status: 0, or 1 when a request got a 5xx
or no answer, or the memory grew by more than `--max-growth-mib`.

Only loopback addresses unless `--allow-remote` (a load test is not something to point at someone else's server by
accident). Standard library only (plus the project itself for `--serve`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from _loadgen import loopback, pct, start_server, stop_server

ROOT = Path(__file__).resolve().parents[2]
WORDS = (
    "the value of a list is returned when the argument is given the default module provides "
    "create open send raise exception file request object string number return"
).split()


# ------------------------------------------------------------------------------------------------------ the server


def pid_listening_on(port: int) -> int | None:
    """The process with a listening TCP socket on `port` (Linux /proc), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(proc.name)
        except OSError:
            continue
    return None


def proc_stats(pid: int | None) -> dict:
    out = {"rss_mib": None, "threads": None, "fds": None}
    if pid is None:
        return out
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mib"] = round(int(line.split()[1]) / 1024, 1)
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return out


# ------------------------------------------------------------------------------------------------------------ load


@dataclass
class Sample:
    t: float  # seconds since the start
    kind: str
    status: int  # 0: no answer
    latency: float
    error: str = ""


@dataclass
class Shared:
    samples: list[Sample] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0

    def add(self, s: Sample) -> None:
        with self.lock:
            self.samples.append(s)


class Load:
    def __init__(self, url: str, args, routes: set[str], model_id: str | None):
        self.url = url.rstrip("/")
        self.args = args
        self.routes = routes
        self.model_id = model_id
        self.headers = {"Content-Type": "application/json"}
        if args.api_key:
            self.headers["Authorization"] = f"Bearer {args.api_key}"

    def prompt(self, rnd: random.Random) -> str:
        n = rnd.choice([1, 2, 3, 5, 8, 13, 20, 30, 40])
        return " ".join(rnd.choice(WORDS) for _ in range(n))

    def request(self, rnd: random.Random) -> tuple[str, str, dict]:
        """(kind, path, body)"""
        new = rnd.choice([1, 2, 4, 8, 16, 32, self.args.max_new_tokens])
        new = max(1, min(new, self.args.max_new_tokens))
        r = rnd.random()
        if r < 0.6:
            body = {"text": [self.prompt(rnd) for _ in range(rnd.choice([1, 1, 1, 2, 3]))], "max_new_tokens": new}
            if rnd.random() < 0.3:
                body.update(do_sample=True, top_k=rnd.choice([5, 10, 50]), temperature=rnd.choice([0.7, 1.0, 1.3]))
            return "generate", "/generate", body
        if r < 0.7:
            return "tokenize", "/tokenize", {"text": [self.prompt(rnd) for _ in range(rnd.choice([1, 4]))]}
        if r < 0.8:
            return "forward", "/forward", {"conditioning_text": [self.prompt(rnd)], "response": [self.prompt(rnd)]}
        if r < 0.9 and "/generate_stream" in self.routes:
            return "stream", "/generate_stream", {"inputs": self.prompt(rnd), "parameters": {"max_new_tokens": new}}
        if "/v1/completions" in self.routes and self.model_id:
            return (
                "openai",
                "/v1/completions",
                {"model": self.model_id, "prompt": self.prompt(rnd), "max_tokens": new, "temperature": 0},
            )
        return "generate", "/generate", {"text": [self.prompt(rnd)], "max_new_tokens": new}

    def send(self, kind: str, path: str, body: dict, t0: float, shared: Shared) -> None:
        start = time.monotonic()
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers=self.headers, method="POST"
        )
        status, error = 0, ""
        try:
            with urllib.request.urlopen(req, timeout=self.args.timeout) as resp:
                status = resp.status
                data = resp.read()  # a stream is read to its end
                if kind == "stream" and stream_error(data):
                    error = "error event in stream"
        except urllib.error.HTTPError as e:
            status = e.code
            e.read()
        except Exception as e:  # noqa: BLE001 - no answer: recorded as status 0
            error = f"{type(e).__name__}: {e}"[:200]
        shared.add(Sample(start - t0, kind, status, time.monotonic() - start, error))

    def worker(self, seed: int, t0: float, stop: threading.Event, shared: Shared) -> None:
        rnd = random.Random(seed)
        while not stop.is_set():
            with shared.lock:
                if shared.sent >= self.args.max_requests:
                    return
                shared.sent += 1
            self.send(*self.request(rnd), t0, shared)
            stop.wait(rnd.expovariate(1000.0 / self.args.think_ms) if self.args.think_ms > 0 else 0)


def stream_error(data: bytes) -> bool:
    """True when a server-sent event stream carries an error event, or ends without its final event."""
    events = []
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith("data:"):
            try:
                events.append(json.loads(line[5:]))
            except ValueError:
                return True
    if not events or any(isinstance(e, dict) and "error" in e for e in events):
        return True
    return not (isinstance(events[-1], dict) and events[-1].get("generated_text") is not None)


# --------------------------------------------------------------------------------------------------------- reports


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def summarize(samples: list[Sample]) -> dict:
    gen = [s.latency for s in samples if s.kind == "generate" and s.status == 200]
    statuses: dict[str, int] = {}
    for s in samples:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    return {
        "requests": len(samples),
        "statuses": dict(sorted(statuses.items())),
        "server_errors": sum(1 for s in samples if s.status >= 500),
        "no_answer": sum(1 for s in samples if s.status == 0),
        "stream_errors": sum(1 for s in samples if s.error == "error event in stream"),
        "overloaded_429": statuses.get("429", 0),
        "generate_ms": {
            "p50": pct(gen, 50),
            "p90": pct(gen, 90),
            "p99": pct(gen, 99),
            "max": max(gen) if gen else None,
        },
        "by_kind": {k: sum(1 for s in samples if s.kind == k) for k in sorted({s.kind for s in samples})},
    }


def slope_mib_per_hour(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    if var == 0:
        return None
    return sum((t - mx) * (v - my) for t, v in points) / var * 3600


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8080")
    where.add_argument("--serve", action="store_true", help="start `bloom-server serve` here (the embedded tiny model)")
    p.add_argument(
        "--serve-args", nargs=argparse.REMAINDER, default=[], help="flags for `serve` with --serve (must come last)"
    )
    p.add_argument("--server-log", default="/tmp/bloom-soak-server.log")
    p.add_argument("--pid", type=int, help="server process to watch (default: the one listening on the URL's port)")
    p.add_argument("--duration", type=float, default=600, help="seconds (default 600)")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    p.add_argument("--concurrency", type=int, default=4, help="clients sending at the same time (default 4)")
    p.add_argument("--think-ms", type=float, default=50, help="mean pause between a client's requests (default 50)")
    p.add_argument("--burst-every", type=float, default=60, help="seconds between bursts of 2 x concurrency (0: none)")
    p.add_argument("--window", type=float, default=60, help="seconds per report line (default 60)")
    p.add_argument("--timeout", type=float, default=120, help="seconds a request may take (default 120)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="largest max_new_tokens asked (the server's limit)")
    p.add_argument("--warmup", type=float, default=20, help="seconds of load before the memory baseline (default 20)")
    p.add_argument("--max-growth-mib", type=float, default=64, help="exit 1 past this RSS growth (default 64)")
    p.add_argument("--api-key", default=os.environ.get("BLOOM_API_KEY"), help="Bearer key (default $BLOOM_API_KEY)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-remote", action="store_true", help="allow a URL that is not a loopback address")
    p.add_argument("--out", help="write the full report as JSON here")
    args = p.parse_args(argv)

    proc = None
    if args.serve:
        proc, url = start_server(args.serve_args, args.server_log, "soak")
        pid = proc.pid
    else:
        url = args.url.rstrip("/")
        host = urllib.parse.urlsplit(url).hostname or ""
        if not loopback(host) and not args.allow_remote:
            print(f"soak: {host} is not a loopback address; pass --allow-remote if you mean it", file=sys.stderr)
            return 2
        pid = args.pid or (pid_listening_on(urllib.parse.urlsplit(url).port or 80) if loopback(host) else None)
    try:
        return run(url, pid, args)
    finally:
        if proc is not None:
            code = stop_server(proc)
            print(f"soak: server stopped (exit {code})", flush=True)


def run(url: str, pid: int | None, args) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    spec = json.load(urllib.request.urlopen(urllib.request.Request(url + "/openapi.json", headers=headers), timeout=30))
    routes = set(spec.get("paths", {}))
    model_id = None
    try:
        info = json.load(urllib.request.urlopen(urllib.request.Request(url + "/info", headers=headers), timeout=30))
        model_id = info.get("model_id")
    except (OSError, ValueError, urllib.error.HTTPError):
        pass
    load = Load(url, args, routes, model_id)
    machine = f"{os.cpu_count()} cpus, {os.uname().sysname} {os.uname().release}"
    print(
        f"soak: {url} (pid {pid}), {args.duration:.0f} s, concurrency {args.concurrency}, think {args.think_ms} ms, "
        f"bursts every {args.burst_every} s, windows of {args.window:.0f} s; {machine}",
        flush=True,
    )
    print(
        f"{'window':>6} {'end_s':>6} {'reqs':>5} {'req/s':>6} {'5xx':>4} {'none':>4} {'429':>4} "
        f"{'p50_ms':>7} {'p90_ms':>7} {'p99_ms':>7} {'max_ms':>7} {'rss_mib':>8} {'thr':>4} {'fds':>4} {'load1':>5}",
        flush=True,
    )

    shared = Shared()
    stop = threading.Event()
    t0 = time.monotonic()
    workers = [
        threading.Thread(target=load.worker, args=(args.seed * 1000 + i, t0, stop, shared), daemon=True)
        for i in range(args.concurrency)
    ]
    for w in workers:
        w.start()
    windows, mem_points = [], []
    baseline = None
    next_burst = args.burst_every if args.burst_every > 0 else float("inf")
    burst_rnd = random.Random(args.seed + 99)
    w_start, w_index = 0.0, 0
    while True:
        now = time.monotonic() - t0
        if now >= args.duration or (shared.sent >= args.max_requests and not any(w.is_alive() for w in workers)):
            break
        if now >= next_burst:
            next_burst += args.burst_every
            burst = [
                threading.Thread(target=load.send, args=(*load.request(burst_rnd), t0, shared), daemon=True)
                for _ in range(2 * args.concurrency)
            ]
            for b in burst:
                b.start()
        if now >= w_start + args.window:
            windows.append(report_window(w_index, w_start, now, shared, pid))
            if baseline is None and now >= args.warmup and windows[-1]["rss_mib"] is not None:
                baseline = windows[-1]["rss_mib"]
            if windows[-1]["rss_mib"] is not None:
                mem_points.append((now, windows[-1]["rss_mib"]))
            w_start, w_index = now, w_index + 1
        time.sleep(0.2)
    stop.set()
    for w in workers:
        w.join(args.timeout + 5)
    end = time.monotonic() - t0
    if end > w_start + 1:
        windows.append(report_window(w_index, w_start, end, shared, pid))
        if windows[-1]["rss_mib"] is not None:
            mem_points.append((end, windows[-1]["rss_mib"]))

    total = summarize(shared.samples)
    last_rss = mem_points[-1][1] if mem_points else None
    growth = None if (baseline is None or last_rss is None) else round(last_rss - baseline, 1)
    slope = slope_mib_per_hour([pt for pt in mem_points if pt[0] >= args.warmup])
    report = {
        "url": url,
        "pid": pid,
        "duration_s": round(end, 1),
        "concurrency": args.concurrency,
        "think_ms": args.think_ms,
        "burst_every_s": args.burst_every,
        "machine": machine,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "total": total,
        "windows": windows,
        "rss_baseline_mib": baseline,
        "rss_end_mib": last_rss,
        "rss_growth_mib": growth,
        "rss_max_mib": max((v for _, v in mem_points), default=None),
        "rss_slope_mib_per_hour": None if slope is None else round(slope, 1),
        "errors": sorted({s.error for s in shared.samples if s.error})[:20],
    }
    g = total["generate_ms"]
    print(
        f"soak: {total['requests']} requests in {end:.0f} s ({total['requests'] / max(end, 1e-9):.1f}/s): "
        f"statuses {total['statuses']}; 5xx {total['server_errors']}, no answer {total['no_answer']}, "
        f"stream errors {total['stream_errors']}; /generate p50 {ms(g['p50'])} ms, p90 {ms(g['p90'])} ms, "
        f"p99 {ms(g['p99'])} ms, max {ms(g['max'])} ms",
        flush=True,
    )
    print(
        f"soak: server RSS {baseline} MiB after warm-up -> {last_rss} MiB at the end (growth {growth} MiB, "
        f"max {report['rss_max_mib']} MiB, slope {report['rss_slope_mib_per_hour']} MiB/h)",
        flush=True,
    )
    if report["errors"]:
        print("soak: errors: " + "; ".join(report["errors"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    failed = total["server_errors"] or total["no_answer"] or total["stream_errors"]
    if growth is not None and growth > args.max_growth_mib:
        print(f"soak: memory grew {growth} MiB, more than --max-growth-mib {args.max_growth_mib}", flush=True)
        failed = True
    return 1 if failed else 0


def report_window(index: int, start: float, end: float, shared: Shared, pid: int | None) -> dict:
    with shared.lock:
        samples = [s for s in shared.samples if start <= s.t < end]
    s = summarize(samples)
    stats = proc_stats(pid)
    g = s["generate_ms"]
    load1 = round(os.getloadavg()[0], 2)  # the machine's load: other work on it slows the server down too
    row = {"window": index, "start_s": round(start, 1), "end_s": round(end, 1), **s, **stats, "load1": load1}
    print(
        f"{index:>6} {end:>6.0f} {s['requests']:>5} {s['requests'] / max(end - start, 1e-9):>6.1f} "
        f"{s['server_errors']:>4} {s['no_answer']:>4} {s['overloaded_429']:>4} {ms(g['p50']):>7} {ms(g['p90']):>7} "
        f"{ms(g['p99']):>7} {ms(g['max']):>7} {stats['rss_mib'] if stats['rss_mib'] is not None else '-':>8} "
        f"{stats['threads'] if stats['threads'] is not None else '-':>4} "
        f"{stats['fds'] if stats['fds'] is not None else '-':>4} {load1:>5.2f}",
        flush=True,
    )
    return row


if __name__ == "__main__":
    sys.exit(main())
