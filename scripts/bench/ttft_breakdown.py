#!/usr/bin/env python3
"""Where a first token's time goes under continuous batching, on any CPU: the tiny model served with each engine
step lengthened by a sleep (a device step's wait, the GIL released, as on a GPU), a streamed load from
scripts/bench/load_test.py, and the server's own timestamps of each request after the first wave:

  queued     the request object is made (after parsing, validation and tokenization) -> handed to the batcher
  admitted   -> the engine thread takes it into a step
  read       -> that step delivers its first token (the step's prefill, decode and read)
  on loop    -> the event loop hands the token to the request's stream
  client     the client's own TTFT, from sending to the first event read

    python3 scripts/bench/ttft_breakdown.py --step-ms 11            # ~45 s: serve, 20 s of load, drain, table
    python3 scripts/bench/ttft_breakdown.py --step-ms 0 --model DIR --dtype fp16 --warmup 8   # on a GPU

The sleep stands in for the device: on a CPU the tiny model's own work adds a few ms a step. What it measures is the
path around the engine (admission at step boundaries, delivery to the event loop, the stream), not a GPU's speed.
With a real model on a GPU (`--step-ms 0`) it also splits the first wave (the `concurrency` requests sent at once
when the measured load starts, after a `--warmup` load that captures the CUDA graphs): when its requests reached the
batcher, and each engine step from the first arrival to the last first token (its length, requests taken, first
tokens delivered).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
STAGES = (("queued", "enqueued", "submit"), ("admitted", "submit", "take"), ("read", "take", "deliver"),
          ("on loop", "deliver", "loop"))  # fmt: skip


def serve_wrapped(argv: list[str]) -> int:
    """The server, its engine steps lengthened and its requests timed (BREAKDOWN_STEP_S, BREAKDOWN_OUT)."""
    import atexit

    from bloom_server.backends import fast
    from bloom_server.cli import main
    from bloom_server.fast import engine as fast_engine
    from bloom_server.frontend import requests as rq
    from bloom_server.frontend.batching import continuous as cb

    step_s, out = float(os.environ["BREAKDOWN_STEP_S"]), Path(os.environ["BREAKDOWN_OUT"])
    if os.environ.get("BREAKDOWN_SWITCH_S"):  # the interpreter's GIL switch interval (CPython's default: 5 ms)
        sys.setswitchinterval(float(os.environ["BREAKDOWN_SWITCH_S"]))
    times: dict[str, dict[str, float]] = {}
    steps: list[tuple[float, float, int, int]] = []
    captures: list[tuple[float, float, int, int]] = []  # (start, end, B, S) of each decode graph captured
    cstep, submit, take, deliver, add_token = (fast.FastBackend.cstep, cb.ContinuousBatcher.submit,
                                               cb.ContinuousBatcher.take, cb.ContinuousBatcher.deliver,
                                               rq.GenRequest.add_token)  # fmt: skip
    graph = fast_engine.FastEngine._graph

    def timed_cstep(self, step, rank0=False):
        t0 = time.monotonic()
        stats = getattr(self.engine, "graph_stats", {})  # (an engine without idle capture has none)
        eager = stats.get("eager_steps", 0)
        if step_s:
            time.sleep(step_s)
        try:
            return cstep(self, step, rank0)
        finally:  # with the decodes it ran without a graph (their shape not captured yet)
            steps.append((t0, time.monotonic(), len(step.joins), stats.get("eager_steps", 0) - eager))

    def timed_graph(self, B, S):
        if (B, S) in self._graphs:
            return graph(self, B, S)
        t0 = time.monotonic()
        try:
            return graph(self, B, S)
        finally:
            captures.append((t0, time.monotonic(), B, S))

    def timed_submit(self, req):
        times[req.id] = {"enqueued": req.enqueued, "submit": time.monotonic()}
        return submit(self, req)

    def timed_take(self):
        payload = take(self)
        for req, _, _ in self._started:
            times.get(req.id, {}).setdefault("take", time.monotonic())
        return payload

    def timed_deliver(self, step, result):
        now = time.monotonic()
        for rid, _, _ in result.firsts:
            where = self._live.get(rid)
            if where is not None:
                times.get(where[0].id, {}).setdefault("deliver", now)
        return deliver(self, step, result)

    def timed_add_token(self, r, token_id, *a, **kw):
        times.get(self.id, {}).setdefault("loop", time.monotonic())
        return add_token(self, r, token_id, *a, **kw)

    fast.FastBackend.cstep = timed_cstep  # type: ignore[method-assign]
    fast_engine.FastEngine._graph = timed_graph  # type: ignore[method-assign]
    cb.ContinuousBatcher.submit, cb.ContinuousBatcher.take = timed_submit, timed_take  # type: ignore[method-assign]
    cb.ContinuousBatcher.deliver = timed_deliver  # type: ignore[method-assign]
    rq.GenRequest.add_token = timed_add_token  # type: ignore[method-assign]
    wall = time.time() - time.monotonic()  # the client's wall clock onto this process's monotonic one
    atexit.register(lambda: out.write_text(json.dumps({"requests": list(times.values()), "steps": steps,
                                                       "captures": captures, "wall_minus_monotonic": wall})))  # fmt: skip
    return main(argv)


def ms(xs: list[float]) -> str:
    return f"{1e3 * statistics.median(xs):.1f} / {1e3 * statistics.mean(xs):.1f}" if xs else "n/a"


def first_wave(wave: list[dict], steps: list, client: list[dict], captures: list) -> None:
    """The burst at the load's start: its arrivals, each stage's median and max, every engine step from its first
    arrival to its last first token on the event loop, and the decode graphs captured meanwhile (a shape's first
    step captures its graph: fast/engine.py `_graph`)."""
    if not wave:
        return
    t0, t1 = min(r["enqueued"] for r in wave), max(r["loop"] for r in wave)
    print(f"first wave: {len(wave)} requests; made (parsed, tokenized) over {1e3 * (max(r['enqueued'] for r in wave) - t0):.1f} ms, "
          f"handed to the batcher over {1e3 * (max(r['submit'] for r in wave) - t0):.1f} ms; last first token on the "
          f"loop at {1e3 * (t1 - t0):.1f} ms; client TTFT max {1e3 * max((r['ttft'] for r in client), default=0):.1f} ms")  # fmt: skip
    print("| stage | ms, median / max |\n|---|---|")
    for name, a, b in STAGES:
        xs = [r[b] - r[a] for r in wave]
        print(f"| {name} | {1e3 * statistics.median(xs):.1f} / {1e3 * max(xs):.1f} |")
    print(
        "| step from the first arrival: start ms | length ms | requests taken | first tokens delivered | eager decodes "
        "|\n|---|---|---|---|---|"
    )
    delivered = [0] * len(steps)
    for r in wave:  # a step's tokens are delivered once it has returned: the latest step ended by then
        ended = [i for i, (_, b, _, _) in enumerate(steps) if b <= r["deliver"]]
        if ended:
            delivered[ended[-1]] += 1
    for i, (a, b, joins, eager) in enumerate(steps):
        if t0 - 0.05 <= b and a <= t1:
            print(f"| {1e3 * (a - t0):.1f} | {1e3 * (b - a):.1f} | {joins} | {delivered[i]} | {eager} |")
    during = [c for c in captures if t0 - 0.05 <= c[1] and c[0] <= t1]
    print("decode graphs captured during the wave: " + (", ".join(
        f"B={B} S={S} at {1e3 * (a - t0):.1f} ms for {1e3 * (b - a):.1f} ms" for a, b, B, S in during) or "none"))  # fmt: skip


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-wrapped":
        return serve_wrapped(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step-ms", type=float, default=11.0, help="sleep added to each engine step (default 11)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    p.add_argument("--port", type=int, default=18411)
    p.add_argument("--model", type=Path, default=None, help="a BLOOM directory (default: a tiny random one)")
    p.add_argument("--dtype", default="fp32", help="the server's --dtype (fp16 on a GPU)")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds of the same load before the measured one")
    p.add_argument(
        "--idle",
        type=float,
        default=0.0,
        help="seconds the server sits idle before the measured load (after the warm-up load if any)",
    )
    p.add_argument("--switch-interval-ms", type=float, default=None,
                   help="the server's GIL switch interval (default: CPython's 5 ms): how long the engine thread may "
                        "wait for the GIL while the event loop parses, tokenizes and streams")  # fmt: skip
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ttft-breakdown-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    model = args.model
    if model is None:
        model = work / "tiny"
        subprocess.run([sys.executable, str(HERE / "make_random_bloom.py"), str(model), "--shape", "tiny"], env=env,
                       check=True, capture_output=True)  # fmt: skip
    out = work / "server-times.json"
    serve = [sys.executable, __file__, "--serve-wrapped", "serve", "--model", str(model), "--backend", "fast",
             "--batching", "continuous", "--dtype", args.dtype, "--host", "127.0.0.1", "--port", str(args.port),
             "--max-batch-size", str(args.concurrency), "--max-input-length", "300", "--max-new-tokens", "512",
             "--max-total-tokens", "820", "--max-queued-requests", "1024"]  # fmt: skip
    log = open(work / "server.log", "w")
    srv_env = {**env, "BREAKDOWN_STEP_S": str(args.step_ms / 1e3), "BREAKDOWN_OUT": str(out)}
    if args.switch_interval_ms is not None:
        srv_env["BREAKDOWN_SWITCH_S"] = str(args.switch_interval_ms / 1e3)
    srv = subprocess.Popen(serve, env=srv_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/ready", timeout=2):
                    break
            except OSError:
                if srv.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not get ready; its log: {work / 'server.log'}") from None
                time.sleep(0.5)
        client = work / "load.json"

        def load(duration: float, seed: int, json_out: Path) -> None:
            subprocess.run([sys.executable, str(HERE / "load_test.py"), "--url", url, "--workload", "standard",
                            "--stream", "--concurrency", str(args.concurrency), "--prompt-tokens", "16-256",
                            "--new-tokens", "16-512", "--requests", "100000", "--duration", str(duration), "--drain",
                            "15", "--seed", str(seed), "--json", str(json_out)], env=env, check=True,
                           capture_output=True, timeout=duration + 120)  # fmt: skip

        if args.warmup:
            load(args.warmup, 1, work / "warmup.json")
        time.sleep(args.idle)
        started = time.time()
        load(args.duration, 0, client)
    finally:
        srv.send_signal(signal.SIGINT)
        srv.wait(timeout=60)
        log.close()
    server = json.loads(out.read_text())
    load = json.loads(client.read_text())
    firsts = sorted((r for r in load["requests"] if r.get("ttft") is not None), key=lambda r: r["sent"])
    after = [r["ttft"] for r in firsts[args.concurrency :]]  # the first wave arrives at once: a burst, apart
    t_start = started - server["wall_minus_monotonic"]  # the measured load's start, on the server's clock
    reqs = sorted((r for r in server["requests"] if r["enqueued"] >= t_start and all(
        k in r for k in ("enqueued", "submit", "take", "deliver", "loop"))), key=lambda r: r["enqueued"])  # fmt: skip
    wave, reqs = reqs[: args.concurrency], reqs[args.concurrency :]
    first_wave(
        wave, [s for s in server["steps"] if s[0] >= t_start - 1.0], firsts[: args.concurrency], server["captures"]
    )
    later = [c for c in server["captures"] if c[0] >= t_start]
    eager = sum(s[3] for s in server["steps"] if s[0] >= t_start)
    print(f"decode graphs captured during the measured load: {len(later)}, {1e3 * sum(b - a for a, b, _, _ in later):.0f} "
          f"ms in all; before it: {len(server['captures']) - len(later)}; decode steps run eagerly during it: {eager}")  # fmt: skip
    steps = [s for s in server["steps"] if s[0] >= t_start]
    steps = steps[len(steps) // 4 :]
    print(f"engine step {ms([b - a for a, b, _, _ in steps])} ms (median / mean; {args.step_ms:g} ms of it the sleep), "
          f"{len(after)} requests after the first wave")  # fmt: skip
    print("| stage | ms, median / mean |\n|---|---|")
    for name, a, b in STAGES:
        print(f"| {name} | {ms([r[b] - r[a] for r in reqs])} |")
    print(f"| server: made -> on loop | {ms([r['loop'] - r['enqueued'] for r in reqs])} |")
    print(f"| client TTFT | {ms(after)} |")
    itl = load["summary"]["itl_ms"]
    print(f"time between tokens at the client p50 / p90: {itl['p50']:.1f} / {itl['p90']:.1f} ms; "
          f"tokens/s {load['summary']['tokens_per_s']:.0f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
