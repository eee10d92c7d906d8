#!/usr/bin/env python3
"""Load test: latency and throughput of a running bloom-server under a closed-loop or Poisson load, with mixed prompt
and output lengths, streamed (TGI `POST /generate_stream`) or not (the original `POST /generate`).

    # a server already running on this machine: 64 clients, streaming, 16-512 new tokens, ~90 s at most
    python scripts/bench/load_test.py --url http://127.0.0.1:8080 --stream --concurrency 64 \\
        --prompt-tokens 16-256 --new-tokens 16-512 --requests 100000 --duration 75 --drain 15 --json run.json

    # Poisson arrivals at 8 requests/s (open loop), not streamed
    python scripts/bench/load_test.py --url http://127.0.0.1:8080 --rate 8 --requests 500 --duration 120

    # start the embedded tiny model here (as scripts/dev.sh serve does) and test it
    python scripts/bench/load_test.py --serve --stream --concurrency 4 --prompt-tokens 8-32 --new-tokens 8-32 \\
        --requests 40 --serve-args --max-new-tokens 64

Workloads (`--workload`):
  custom         (default) the flags as given
  standard       the continuous-batching target's load: streamed, concurrency 64 unless given, prompts and outputs
                 from --prompt-tokens / --new-tokens (defaults 16-256 and 16-512); TTFT p50/p99 and tokens/s
  long-joiner    --live-rows streamed requests (prompts --prompt-tokens, outputs --new-tokens: long enough to outlast
                 the join) decode; once each has a token, one request of --joiner-tokens prompt tokens joins. Reported:
                 the largest gap between two tokens of a live row while the joiner's prompt went in (from its
                 sending to its first token) against the live rows' median gap (their time per output token)
  shared-prefix  closed loop like custom, but every prompt is one shared --prefix-tokens prefix (the same words for
                 every request) and its own --tail-tokens tail; TTFT p50 and tokens/s (a prefix cache's case)

The workload is drawn from `--seed` before anything is sent: the same flags send the same requests in the same order
(prompt and output lengths, prompt words, Poisson arrival times), so two servers (or two settings of one) see the same
load. Prompts are words the server's own /tokenize says are one token each, so a prompt of N words is N tokens (the
server's count of each prompt is recorded too). Greedy; `min_new_tokens` = `max_new_tokens` is sent when the server
honours it (checked with one request at the start), so every request generates exactly its length; when the server
ignores it, a request may end early at the end-of-sequence token and is counted as "short" (tokens/s use the tokens
actually generated).

Measured per request, on the client: latency (request written to last byte read), and when streaming the time to the
first token (TTFT, first token event read), the time per output token after the first ((latency - TTFT) / (tokens -
1)) and every inter-token gap. Not streamed, TTFT is not observable: the server's own x-queue-time and
x-time-per-token headers are reported instead. Overall: generated tokens/s and requests/s over the time from the
first request sent to the last answer read.

Bounds: `--requests` requests at most; no request is sent after `--duration` seconds; requests still running then
get `--drain` seconds more and are then cut (reported as "cut", not as errors); each request has `--timeout`
seconds. So a run ends within duration + drain (+ start). Loopback addresses only unless `--allow-remote`.

With `--check-greedy K` it is also the load check run before a backend is called working (scripts/gpu/load_check.sh):
after the load, the first K answered requests are sent again one at a time, and each greedy text must equal the one
produced under load; where one differs, the step where they part and the gap between the two likeliest tokens there
tell a near tie (fp16 arithmetic in another batch shape) from a fault.

Exit status: 0 when every request finished with 200 (and, streamed, no error event) and the greedy check (if asked)
passed; 1 when some got an error status, an error event, no answer or a timeout, or the greedy check failed (the report
is written all the same); 2 for bad flags or an unreachable server.
Standard library only (plus the project itself for `--serve`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _loadgen import iter_body, loopback, pct, read_body, read_head, request_bytes, start_server, stop_server

NAME = "load_test"
# Candidates for one-token prompt words: common English, then the server's tokenizer decides which are one token.
WORDS = (
    "the of and to in is it that for on with as was at by be this from or an are not but have all they which "
    "one you were her his had we can there their if has when more been would will who so no what out up said "
    "about into than them only other new some could time these two may then do first any my now such like our "
    "over man me even most made after also did many before must through back years where much your way well "
    "down should because each just those people how too little state good very make world still own see men "
    "work long get here between both life being under never day same another know while last might us great "
    "old year off come since against go came right used take three value list file data type name string "
    "number return default module object function class method call open read write create error line test "
    "set user system form case point group part place order level"
).split()


# ------------------------------------------------------------------------------------------------------ workload


def parse_lengths(text: str, flag: str) -> tuple[str, list[int]]:
    """'128' (fixed), '16-512' (uniform in the range, inclusive) or '16,64,256' (one of them, uniformly)."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            if not 1 <= lo <= hi:
                raise ValueError
            return "range", [lo, hi]
        values = [int(x) for x in text.split(",")]
        if not values or min(values) < 1:
            raise ValueError
        return ("fixed" if len(values) == 1 else "list"), values
    except ValueError:
        raise SystemExit(f"{NAME}: {flag} {text!r}: want N, LO-HI or N1,N2,... (positive integers)") from None


def draw(spec: tuple[str, list[int]], rnd: random.Random) -> int:
    kind, values = spec
    return rnd.randint(values[0], values[1]) if kind == "range" else rnd.choice(values)


def largest(spec: tuple[str, list[int]]) -> int:
    return max(spec[1])


@dataclass
class Spec:
    index: int
    prompt: str
    prompt_tokens: int  # words, each one token by the server's tokenizer
    new_tokens: int
    at: float  # open loop: seconds after the start at which it is sent (0 in closed loop)


def workload(args, words: list[str]):
    """The requests, in order, drawn from --seed (an endless generator: --requests and --duration bound it)."""
    rnd = random.Random(args.seed)
    prompt_spec = parse_lengths(args.prompt_tokens, "--prompt-tokens")
    new_spec = parse_lengths(args.new_tokens, "--new-tokens")
    shared = ""
    if args.workload == "shared-prefix":
        shared = "".join(" " + rnd.choice(words) for _ in range(args.prefix_tokens))
        prompt_spec = ("fixed", [args.tail_tokens])
    at = 0.0
    i = 0
    while True:
        n_prompt = draw(prompt_spec, rnd)
        n_new = draw(new_spec, rnd)
        prompt = shared + "".join(" " + rnd.choice(words) for _ in range(n_prompt))
        n_prompt += args.prefix_tokens if shared else 0
        if args.rate:
            at += rnd.expovariate(args.rate)
        yield Spec(i, prompt, n_prompt, n_new, at if args.rate else 0.0)
        i += 1


def joiner_workload(args, words: list[str]):
    """long-joiner: --live-rows requests drawn as `workload` draws them, then the joiner."""
    gen = workload(args, words)
    for _ in range(args.live_rows):
        yield next(gen)
    rnd = random.Random(args.seed + 1)
    prompt = "".join(" " + rnd.choice(words) for _ in range(args.joiner_tokens))
    yield Spec(args.live_rows, prompt, args.joiner_tokens, args.joiner_new_tokens, 0.0)


# ---------------------------------------------------------------------------------------------------- the client


@dataclass
class Result:
    index: int
    prompt_tokens: int  # asked (words)
    new_tokens: int  # asked
    sent: float = 0.0  # seconds since the start
    status: int = 0  # 0: no answer
    error: str = ""
    latency: float | None = None
    ttft: float | None = None
    generated: int | None = None  # the server's count (details / num_generated_tokens / events)
    server_prompt_tokens: int | None = None
    queue_ms: float | None = None  # x-queue-time
    time_per_token_ms: float | None = None  # x-time-per-token
    itl: array = field(default_factory=lambda: array("d"))  # streamed: gaps between token events, seconds
    text: str | None = None  # the generated text (kept for --check-greedy)

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error

    def tpot(self) -> float | None:
        if self.ttft is None or self.latency is None or not self.generated or self.generated < 2:
            return None
        return (self.latency - self.ttft) / (self.generated - 1)


class Client:
    def __init__(self, url: str, args, force: bool):
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80
        self.hostport = u.netloc
        self.args = args
        self.force = force
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.conns_opened = 0

    def body(self, s: Spec) -> tuple[str, bytes]:
        if self.args.stream:
            params = {"max_new_tokens": s.new_tokens, "do_sample": False}
            if self.force:
                params["min_new_tokens"] = s.new_tokens
            return "/generate_stream", json.dumps({"inputs": s.prompt, "parameters": params}).encode()
        body = {"text": [s.prompt], "max_new_tokens": s.new_tokens, "do_sample": False}
        if self.force:
            body["min_new_tokens"] = s.new_tokens
        return "/generate", json.dumps(body).encode()

    async def conn(self):
        if self.idle:
            return self.idle.pop()
        self.conns_opened += 1
        return await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    async def send(self, s: Spec, t0: float, on_token=None) -> Result:
        r = Result(s.index, s.prompt_tokens, s.new_tokens)
        path, body = self.body(s)
        req = request_bytes("POST", path, self.hostport, body, self.headers)
        start = time.perf_counter()
        r.sent = start - t0
        conn = None
        try:
            conn = await self.conn()
            keep = await asyncio.wait_for(self._exchange(conn, req, r, start, on_token), self.args.timeout)
            if keep:
                self.idle.append(conn)
                conn = None
        except asyncio.TimeoutError:
            r.error = "timeout"
        except asyncio.CancelledError:
            r.error = "cut"
            close(conn)
            raise
        except Exception as e:  # noqa: BLE001 - no answer, a broken stream: recorded on the request
            r.error = r.error or f"{type(e).__name__}: {e}"[:200]
        close(conn)
        return r

    async def _exchange(self, conn, req: bytes, r: Result, start: float, on_token=None) -> bool:
        reader, writer = conn
        writer.write(req)
        status, headers = await read_head(reader)
        r.status = status
        if status != 200 or not self.args.stream:
            data = await read_body(reader, headers)
            r.latency = time.perf_counter() - start
            if status == 200:
                self._plain(r, data, headers)
            else:
                r.error = error_kind(data)
        else:
            await self._events(reader, headers, r, start, on_token)
        return headers.get("connection", "").lower() != "close"

    @staticmethod
    def _plain(r: Result, data: bytes, headers: dict) -> None:
        try:
            body = json.loads(data)
            r.generated = int(body["num_generated_tokens"][0])
            r.text = body["text"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            r.error = "bad body"
        for name, attr, conv in (
            ("x-prompt-tokens", "server_prompt_tokens", int),
            ("x-queue-time", "queue_ms", float),
            ("x-time-per-token", "time_per_token_ms", float),
        ):
            if name in headers:
                setattr(r, attr, conv(headers[name]))

    async def _events(self, reader, headers: dict, r: Result, start: float, on_token=None) -> None:
        """Server-sent events as they arrive: a token event is timed on arrival and not parsed (it starts with
        `{"index"` and carries `"details":null`); the last event and error events are parsed."""
        buf = b""
        n = 0
        last = None
        final = None
        async for chunk in iter_body(reader, headers):
            now = time.perf_counter()
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].lstrip()
                    if payload.startswith(b'{"index"') and payload.endswith(b'"details":null}'):
                        pass
                    else:
                        try:
                            ev = json.loads(payload)
                        except ValueError:
                            r.error = "bad event"
                            continue
                        if "error" in ev:
                            r.error = f"event:{ev.get('error_type') or 'error'}"
                            continue
                        if ev.get("details") is not None or ev.get("generated_text") is not None:
                            final = ev
                        if "token" not in ev:
                            continue
                    n += 1
                    if last is None:
                        r.ttft = now - start
                    else:
                        r.itl.append(now - last)
                    last = now
                    if on_token is not None:
                        on_token(n)
        r.latency = time.perf_counter() - start
        details = (final or {}).get("details") or {}
        r.generated = details.get("generated_tokens", n) if final else n
        r.text = (final or {}).get("generated_text")
        r.server_prompt_tokens = details.get("input_length")
        if final is None and not r.error:
            r.error = "stream ended without its last event"


def close(conn) -> None:
    if conn is not None:
        try:
            conn[1].close()
        except Exception:  # noqa: BLE001 - closing a dead connection: nothing to report
            pass


def error_kind(data: bytes) -> str:
    try:
        body = json.loads(data)
    except ValueError:
        return ""
    kind = body.get("error_type") or body.get("error") if isinstance(body, dict) else None
    return str(kind)[:60] if isinstance(kind, str) else ""


async def run_load(client: Client, specs, args) -> tuple[list[Result], float, int]:
    """Send the workload; returns (results, seconds from the start to the last answer, requests cut at the end)."""
    results: list[Result] = []
    t0 = time.perf_counter()
    stop_at = t0 + args.duration
    it = iter(specs)
    sent = 0

    def take() -> Spec | None:
        nonlocal sent
        if sent >= args.requests or time.perf_counter() >= stop_at:
            return None
        sent += 1
        return next(it)

    tasks: set[asyncio.Task] = set()
    if args.rate:

        async def arrivals() -> None:
            while True:
                s = take()
                if s is None:
                    return
                delay = t0 + s.at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if time.perf_counter() >= stop_at:
                    nonlocal sent
                    sent -= 1  # drawn but never sent
                    return
                task = asyncio.ensure_future(client.send(s, t0))
                task.add_done_callback(lambda t: (tasks.discard(t), t.cancelled() or results.append(t.result())))
                tasks.add(task)

        await arrivals()
    else:

        async def worker() -> None:
            while True:
                s = take()
                if s is None:
                    return
                results.append(await client.send(s, t0))

        for _ in range(args.concurrency):
            tasks.add(asyncio.ensure_future(worker()))
    # Closed loop: wait for the workers (they stop taking work at the deadline); open loop: for the requests in flight.
    pending = set(tasks)
    deadline = stop_at + args.drain
    while pending:
        done, pending = await asyncio.wait(pending, timeout=max(0.0, deadline - time.perf_counter()))
        if time.perf_counter() >= deadline:
            break
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    # A cut request is not an answer; count them (a closed-loop worker that was cut is one request).
    cut = sent - len(results)
    end = max((r.sent + r.latency for r in results if r.latency is not None), default=0.0)
    for c in client.idle:
        close(c)
    client.idle.clear()
    return results, end, cut


async def run_long_joiner(client: Client, specs, args) -> tuple[list[Result], float, int, dict]:
    """--live-rows streamed requests decode; once each has a token, the joiner (the next spec, --joiner-tokens
    prompt tokens) is sent. Returns (results, wall, cut, report) like run_load, plus the gaps report."""
    it = iter(specs)
    live = [next(it) for _ in range(args.live_rows)]
    joiner = next(it)
    counts = [0] * len(live)
    decoding = asyncio.Event()

    def counter(i: int):
        def on_token(n: int) -> None:
            counts[i] = n
            if min(counts) >= 1:
                decoding.set()

        return on_token

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(client.send(s, t0, counter(i))) for i, s in enumerate(live)]
    started = True
    try:
        await asyncio.wait_for(decoding.wait(), args.timeout)
    except asyncio.TimeoutError:
        started = False
    joined = asyncio.ensure_future(client.send(joiner, t0)) if started else None
    everything = tasks + ([joined] if joined is not None else [])
    done, pending = await asyncio.wait(everything, timeout=args.duration + args.drain)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    results = [t.result() for t in everything if t in done and not t.cancelled()]
    end = max((r.sent + r.latency for r in results if r.latency is not None), default=0.0)
    for c in client.idle:
        close(c)
    client.idle.clear()
    jr = joined.result() if joined is not None and joined in done else None
    return results, end, len(everything) - len(results), joiner_report(results, jr, args.live_rows)


def joiner_report(results: list[Result], jr: Result | None, live_rows: int) -> dict:
    """The live rows' gaps between two tokens that overlap the joiner's prefill window (its sending to its first
    token), against the median of all their gaps."""
    out: dict = {"live_rows": live_rows, "joiner_ok": bool(jr and jr.ok and jr.ttft is not None)}
    if not out["joiner_ok"]:
        return out
    w0, w1 = jr.sent, jr.sent + jr.ttft  # type: ignore[union-attr,operator]
    during, every, through = [], [], 0
    for r in results:
        if r is jr or not r.ok or r.ttft is None:
            continue
        t = r.sent + r.ttft
        for gap in r.itl:
            every.append(gap)
            if t + gap > w0 and t < w1:  # the gap overlaps the window
                during.append(gap)
            t += gap
        through += t > w1  # its last token came after the joiner's first: it decoded through the whole window
    median = pct([g * 1000 for g in every], 50) if every else None
    largest = max(during) * 1000 if during else None
    out.update(
        joiner_prompt_tokens=jr.prompt_tokens,  # type: ignore[union-attr]
        joiner_ttft_ms=jr.ttft * 1000,  # type: ignore[union-attr,operator]
        live_rows_through_window=through,
        gaps_in_window=len(during),
        largest_gap_in_window_ms=largest,
        median_gap_ms=median,
        ratio=largest / median if largest is not None and median else None,
    )
    return out


# --------------------------------------------------------------------------------------------------- the server


def get_json(url: str, headers: dict, timeout: float = 30):
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def post_json(url: str, body, headers: dict, timeout: float = 120):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json", **headers}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r), dict(r.headers)


def one_token_words(url: str, headers: dict, batch: int) -> tuple[list[str], str]:
    """Words the server's tokenizer makes one token each (with their leading space), checked on a joined prompt."""
    words: list[str] = []
    try:
        for i in range(0, len(WORDS), batch):
            chunk = WORDS[i : i + batch]
            out, _ = post_json(url + "/tokenize", {"text": [" " + w for w in chunk]}, headers)
            words += [w for w, ids in zip(chunk, out["token_ids"]) if len(ids) == 1]
        if len(words) >= 8:
            rnd = random.Random(0)
            probe = "".join(" " + rnd.choice(words) for _ in range(200))
            out, _ = post_json(url + "/tokenize", {"text": [probe]}, headers)
            if len(out["token_ids"][0]) == 200:
                return words, "one token per word (checked with the server's /tokenize)"
            return words, f"a 200-word prompt was {len(out['token_ids'][0])} tokens: prompt lengths are approximate"
    except (OSError, ValueError, KeyError, urllib.error.HTTPError) as e:
        return list(WORDS), f"no /tokenize ({type(e).__name__}): a word is taken as a token, approximately"
    return list(WORDS), "fewer than 8 one-token words: a word is taken as a token, approximately"


def honours_min_new_tokens(url: str, headers: dict) -> bool:
    """One greedy 2-token request with min_new_tokens: the server lists fields it ignores in x-ignored-fields."""
    _, h = post_json(url + "/generate", {"text": [" the"], "max_new_tokens": 2, "min_new_tokens": 2}, headers)
    ignored = {k.lower(): v for k, v in h.items()}.get("x-ignored-fields", "")
    return "min_new_tokens" not in ignored.split(",")


# ---------------------------------------------------------------------------------- greedy: under load vs alone


def part_step(tokens: list[dict], loaded: str) -> int | None:
    """The step at which the alone run's tokens stop spelling the text produced under load (None: they never do)."""
    text = ""
    for i, tok in enumerate(tokens):
        text += tok.get("text", "")
        if not loaded.startswith(text):
            return i
    return None if len(text) == len(loaded) else len(tokens)


async def check_greedy(client: Client, specs: dict, results: list[Result], args, url: str) -> dict:
    """The first --check-greedy answered requests, sent again one at a time after the load: each text must equal the
    one produced under load. Where one differs, a third request alone (TGI details, top 2 per step) finds the step
    where they part and the log-probability gap there between the two likeliest tokens: below --tie-gap it is a
    near tie, which fp16 arithmetic in another batch shape can flip; above, a fault."""
    for c in client.idle:  # connections of an earlier event loop cannot be used in this one
        close(c)
    client.idle.clear()
    sample = sorted((r for r in results if r.ok and r.text is not None), key=lambda r: r.index)[: args.check_greedy]
    rows = []
    for r in sample:
        s = specs[r.index]
        alone = await client.send(s, time.perf_counter())
        row = {
            "index": r.index,
            "prompt_tokens": s.prompt_tokens,
            "new_tokens": s.new_tokens,
            "equal": alone.ok and alone.text == r.text,
            "alone_status": alone.status,
            "alone_error": alone.error,
        }
        if alone.ok and not row["equal"]:
            params = {"max_new_tokens": s.new_tokens, "do_sample": False, "details": True, "top_n_tokens": 2}
            if client.force:
                params["min_new_tokens"] = s.new_tokens
            try:
                out, _ = await asyncio.to_thread(
                    post_json, url + "/generate", {"inputs": s.prompt, "parameters": params}, client.headers
                )
                details = out.get("details") or {}
                step = part_step(details.get("tokens") or [], r.text)
                top = (details.get("top_tokens") or [])[step] if step is not None else []
                if step is not None and len(top) >= 2:
                    row.update(step=step, gap=top[0]["logprob"] - top[1]["logprob"])
            except (OSError, ValueError, KeyError, IndexError, TypeError, urllib.error.HTTPError) as e:
                row["diagnosis_error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
    equal = sum(1 for x in rows if x["equal"])
    ties = sum(1 for x in rows if not x["equal"] and x.get("gap") is not None and x["gap"] < args.tie_gap)
    faults = len(rows) - equal - ties
    return {
        "checked": len(rows),
        "equal": equal,
        "near_ties": ties,
        "faults": faults,
        "tie_gap": args.tie_gap,
        "passed": bool(rows) and faults == 0,
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------------------ reports


def stats(values, scale: float = 1000.0) -> dict:
    v = [x * scale for x in values if x is not None]
    if not v:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    return {
        "n": len(v),
        "p50": pct(v, 50),
        "p90": pct(v, 90),
        "p99": pct(v, 99),
        "mean": sum(v) / len(v),
        "max": max(v),
    }


def summarize(results: list[Result], wall: float, cut: int) -> dict:
    ok = [r for r in results if r.ok]
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    for r in results:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
        if not r.ok:
            key = f"{r.status} {r.error}".strip() if r.status else (r.error or "no answer")
            errors[key] = errors.get(key, 0) + 1
    tokens = sum(r.generated or 0 for r in ok)
    itl = [g for r in ok for g in r.itl]
    return {
        "requests": len(results) + cut,
        "answered": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "cut": cut,
        "statuses": dict(sorted(statuses.items())),
        "errors_by_kind": dict(sorted(errors.items())),
        "short": sum(1 for r in ok if (r.generated or 0) < r.new_tokens),
        "long": sum(1 for r in ok if (r.generated or 0) > r.new_tokens),
        "prompt_tokens_mismatch": sum(
            1 for r in ok if r.server_prompt_tokens is not None and r.server_prompt_tokens != r.prompt_tokens
        ),
        "generated_tokens": tokens,
        "prompt_tokens": sum(
            r.server_prompt_tokens if r.server_prompt_tokens is not None else r.prompt_tokens for r in ok
        ),
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "latency_ms": stats([r.latency for r in ok]),
        "ttft_ms": stats([r.ttft for r in ok]),
        "tpot_ms": stats([r.tpot() for r in ok]),
        "itl_ms": stats(itl),
        "server_queue_ms": stats([r.queue_ms for r in ok], 1.0),
        "server_time_per_token_ms": stats([r.time_per_token_ms for r in ok], 1.0),
        "new_tokens_asked": stats([r.new_tokens for r in results], 1.0),
        "prompt_tokens_asked": stats([r.prompt_tokens for r in results], 1.0),
    }


def f(x, digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def table(s: dict, info: dict, args, load: str) -> str:
    """The SageMaker LMI post's table (latency P50/P90/P99, throughput), then the token timings."""
    lat = s["latency_ms"]
    model = info.get("model_id", "?")
    backend = info.get("backend", "?")
    batching = args.label or info.get("batching") or "-"
    head = (
        "| Model | Backend | Batching | Load | Prompt tokens | New tokens | Requests (ok / errors) | "
        "Latency P50 (ms) | P90 (ms) | P99 (ms) | Mean (ms) | Throughput (tokens/sec) | Requests/sec |"
    )
    row = (
        f"| {model} | {backend} | {batching} | {load} | {args.prompt_tokens} | {args.new_tokens} | "
        f"{s['requests']} ({s['ok']} / {s['errors']}) | {f(lat['p50'])} | {f(lat['p90'])} | {f(lat['p99'])} | "
        f"{f(lat['mean'])} | {f(s['tokens_per_s'], 1)} | {f(s['requests_per_s'], 2)} |"
    )
    lines = [head, "|" + "---|" * 13, row, "", "| per request (ms) | P50 | P90 | P99 | Mean |", "|---|---|---|---|---|"]
    names = [
        ("latency", "latency_ms"),
        ("time to first token", "ttft_ms"),
        ("time per output token (after the first)", "tpot_ms"),
        ("inter-token gap (every token)", "itl_ms"),
    ]
    if not args.stream:
        names += [
            ("server queue time (x-queue-time)", "server_queue_ms"),
            ("server time per token (x-time-per-token)", "server_time_per_token_ms"),
        ]
    for label, key in names:
        st = s[key]
        d = 0 if key == "latency_ms" else (2 if key in ("tpot_ms", "itl_ms", "server_time_per_token_ms") else 1)
        lines.append(f"| {label} | {f(st['p50'], d)} | {f(st['p90'], d)} | {f(st['p99'], d)} | {f(st['mean'], d)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8080")
    where.add_argument("--serve", action="store_true", help="start `bloom-server serve` here (the embedded tiny model)")
    p.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="flags for `serve` (must come last)")
    p.add_argument("--server-log", default="/tmp/bloom-load-test-server.log")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="closed loop: clients, each sending one request after another (default 8)",
    )
    mode.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals, requests per second")
    p.add_argument("--requests", type=int, default=200, help="requests at most (default 200)")
    p.add_argument("--duration", type=float, default=300, help="no request is sent after this many seconds (300)")
    p.add_argument(
        "--drain",
        type=float,
        default=30,
        help="seconds the requests in flight at --duration get before they are cut (default 30)",
    )
    p.add_argument("--timeout", type=float, default=120, help="seconds one request may take (default 120)")
    p.add_argument(
        "--prompt-tokens", default="16-256", help="prompt length: N, LO-HI (uniform) or N1,N2,... (default 16-256)"
    )
    p.add_argument(
        "--new-tokens", default="16-512", help="output length: N, LO-HI (uniform) or N1,N2,... (default 16-512)"
    )
    p.add_argument("--stream", action="store_true", help="POST /generate_stream (TGI events); else POST /generate")
    p.add_argument(
        "--workload",
        choices=("custom", "standard", "long-joiner", "shared-prefix"),
        default="custom",
        help="custom (the flags as given), standard, long-joiner, shared-prefix: see above (default custom)",
    )
    p.add_argument("--live-rows", type=int, default=63, help="long-joiner: requests decoding when it joins (63)")
    p.add_argument("--joiner-tokens", type=int, default=1500, help="long-joiner: its prompt tokens (1500)")
    p.add_argument("--joiner-new-tokens", type=int, default=4, help="long-joiner: its new tokens (4)")
    p.add_argument("--prefix-tokens", type=int, default=1000, help="shared-prefix: tokens of the shared prefix (1000)")
    p.add_argument("--tail-tokens", type=int, default=32, help="shared-prefix: tokens of each prompt's own tail (32)")
    p.add_argument(
        "--force-length",
        choices=("auto", "on", "off"),
        default="auto",
        help="send min_new_tokens = max_new_tokens: auto (if the server honours it), on, off",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the workload (default 0)")
    p.add_argument("--label", default=None, help="the Batching column of the table (default: /info's, or -)")
    p.add_argument("--api-key", default=os.environ.get("BLOOM_API_KEY"), help="Bearer key (default $BLOOM_API_KEY)")
    p.add_argument("--allow-remote", action="store_true", help="allow a URL that is not a loopback address")
    p.add_argument("--json", dest="json_path", help="write everything here (flags, /info, summary, every request)")
    p.add_argument(
        "--check-greedy",
        type=int,
        default=0,
        metavar="K",
        help="after the load, send the first K "
        "answered requests again one at a time: each greedy text must equal its text under load (a "
        "difference at a near tie, see --tie-gap, is reported, not failed); exit 1 otherwise",
    )
    p.add_argument(
        "--tie-gap",
        type=float,
        default=0.05,
        help="--check-greedy: a difference where the two likeliest "
        "tokens are closer than this (log-probability) is a near tie (default 0.05)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.workload == "standard":
        args.stream = True
        if args.concurrency is None and args.rate is None:
            args.concurrency = 64
    if args.workload == "long-joiner":
        args.stream = True  # the gaps are seen in the live rows' streams
        if args.rate is not None:
            print(f"{NAME}: --workload long-joiner sends its own requests: no --rate", file=sys.stderr)
            return 2
        args.concurrency = args.live_rows + 1
        args.requests = args.live_rows + 1
    if args.workload != "shared-prefix":
        args.prefix_tokens = 0
    if min(args.live_rows, args.joiner_tokens, args.joiner_new_tokens, args.tail_tokens) < 1 or args.prefix_tokens < 0:
        print(
            f"{NAME}: --live-rows, --joiner-tokens, --joiner-new-tokens and --tail-tokens must be >= 1", file=sys.stderr
        )
        return 2
    if args.concurrency is None and args.rate is None:
        args.concurrency = 8
    if (args.concurrency is not None and args.concurrency < 1) or (args.rate is not None and args.rate <= 0):
        print(f"{NAME}: --concurrency must be >= 1 and --rate > 0", file=sys.stderr)
        return 2
    if args.requests < 1 or args.duration <= 0 or args.timeout <= 0 or args.drain < 0 or args.check_greedy < 0:
        print(
            f"{NAME}: --requests, --duration and --timeout must be > 0, --drain >= 0, --check-greedy >= 0",
            file=sys.stderr,
        )
        return 2
    parse_lengths(args.prompt_tokens, "--prompt-tokens")
    parse_lengths(args.new_tokens, "--new-tokens")
    proc = None
    if args.serve:
        proc, url = start_server(args.serve_args, args.server_log, NAME)
    else:
        url = args.url.rstrip("/")
        host = urllib.parse.urlsplit(url).hostname or ""
        if urllib.parse.urlsplit(url).scheme != "http":
            print(f"{NAME}: only http:// URLs", file=sys.stderr)
            return 2
        if not loopback(host) and not args.allow_remote:
            print(f"{NAME}: {host} is not a loopback address; pass --allow-remote if you mean it", file=sys.stderr)
            return 2
    try:
        return run(url, args, argv if argv is not None else sys.argv[1:])
    finally:
        if proc is not None:
            print(f"{NAME}: server stopped (exit {stop_server(proc)})", flush=True)


def over_limits(args, info: dict) -> list[str]:
    """The server's limits (from /info) that the workload would break, in words: it would get 422s."""
    max_prompt = largest(parse_lengths(args.prompt_tokens, "--prompt-tokens"))
    max_new = largest(parse_lengths(args.new_tokens, "--new-tokens"))
    if args.workload == "shared-prefix":
        max_prompt = args.prefix_tokens + args.tail_tokens
    # Each request's own prompt + new: the long joiner's few new tokens go with its long prompt, not the live rows'.
    max_total = max_prompt + max_new
    if args.workload == "long-joiner":
        max_total = max(max_total, args.joiner_tokens + args.joiner_new_tokens)
        max_prompt = max(max_prompt, args.joiner_tokens)
    limits = []
    if "max_input_tokens" in info and max_prompt > info["max_input_tokens"]:
        limits.append(
            f"prompts up to {max_prompt} tokens, the server takes {info['max_input_tokens']} (serve --max-input-length)"
        )
    if "max_new_tokens" in info and max_new > info["max_new_tokens"]:
        limits.append(
            f"up to {max_new} new tokens, the server allows {info['max_new_tokens']} (serve --max-new-tokens)"
        )
    if "max_total_tokens" in info and max_total > info["max_total_tokens"]:
        limits.append(
            f"prompt + new up to {max_total} tokens, the server's max total is "
            f"{info['max_total_tokens']} (serve --max-total-tokens)"
        )
    return limits


def run(url: str, args, argv: list[str]) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        info = get_json(url + "/info", headers)
    except (OSError, ValueError, urllib.error.HTTPError) as e:
        print(f"{NAME}: {url}/info: {e}", file=sys.stderr)
        return 2
    limits = over_limits(args, info)
    if limits:
        print(f"{NAME}: the workload exceeds the server's limits: " + "; ".join(limits), file=sys.stderr)
        return 2
    words, prompt_note = one_token_words(url, headers, int(info.get("max_batch_size", 32)))
    if args.force_length == "auto":
        try:
            force = honours_min_new_tokens(url, headers)
        except (OSError, ValueError, urllib.error.HTTPError) as e:
            print(f"{NAME}: the probe request failed: {e}", file=sys.stderr)
            return 2
    else:
        force = args.force_length == "on"
    length_note = (
        "min_new_tokens = max_new_tokens sent: every request generates exactly its length"
        if force
        else "output lengths NOT forced (the server ignores min_new_tokens): a request may end early at the "
        "end-of-sequence token; such requests are counted as short"
    )
    load = f"concurrency {args.concurrency}" if args.concurrency else f"Poisson {args.rate:g} req/s"
    if args.workload == "long-joiner":
        load = f"{args.live_rows} live rows + a {args.joiner_tokens}-token joiner"
    elif args.workload == "shared-prefix":
        load += f", a shared {args.prefix_tokens}-token prefix + {args.tail_tokens}-token tails"
    print(
        f"{NAME}: {url}, model {info.get('model_id')} ({info.get('backend')}, {info.get('model_dtype')}, "
        f"tp {info.get('tensor_parallel')}); {load}, {'streamed' if args.stream else 'not streamed'}; prompts "
        f"{args.prompt_tokens} tokens ({prompt_note}), new tokens {args.new_tokens}, greedy; {length_note}; "
        f"at most {args.requests} requests, {args.duration:g} s (+{args.drain:g} s drain), timeout "
        f"{args.timeout:g} s; seed {args.seed}",
        flush=True,
    )

    client = Client(url, args, force)
    cpu0, load0 = time.process_time(), os.getloadavg()
    specs: dict[int, Spec] = {}

    def recorded(gen):
        for s in gen:
            specs[s.index] = s
            yield s

    joiner = None
    if args.workload == "long-joiner":
        results, wall, cut, joiner = asyncio.run(run_long_joiner(client, recorded(joiner_workload(args, words)), args))
    else:
        results, wall, cut = asyncio.run(run_load(client, recorded(workload(args, words)), args))
    cpu = time.process_time() - cpu0
    summary = summarize(results, wall, cut)
    summary["client_cpu_s"] = cpu
    summary["client_cpu_fraction"] = cpu / wall if wall > 0 else None
    summary["connections_opened"] = client.conns_opened
    summary["workload"] = args.workload
    if joiner is not None:
        summary["long_joiner"] = joiner

    print(table(summary, info, args, load))
    kinds = f" {summary['errors_by_kind']}" if summary["errors_by_kind"] else ""
    print(
        f"{NAME}: {summary['requests']} requests: {summary['ok']} ok, {summary['errors']} errors{kinds}, "
        f"{summary['cut']} cut at the end; statuses {summary['statuses']}; "
        f"{summary['generated_tokens']} tokens generated in {wall:.1f} s; short {summary['short']}; "
        f"client CPU {100 * (summary['client_cpu_fraction'] or 0):.0f}% of one core, "
        f"{client.conns_opened} connections; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    if (summary["client_cpu_fraction"] or 0) > 0.7:
        print(
            f"{NAME}: warning: the client used more than 70% of a core: it may be what limits the figures", flush=True
        )
    if joiner is not None:
        if joiner["joiner_ok"]:
            print(
                f"{NAME}: long joiner: {joiner['joiner_prompt_tokens']}-token prompt, first token after "
                f"{f(joiner['joiner_ttft_ms'])} ms; the live rows' largest gap meanwhile {f(joiner['largest_gap_in_window_ms'], 1)} "
                f"ms vs their median {f(joiner['median_gap_ms'], 2)} ms: {f(joiner['ratio'], 2)}x; "
                f"{joiner['live_rows_through_window']} of {joiner['live_rows']} live rows decoded through it",
                flush=True,
            )
        else:
            print(f"{NAME}: long joiner: no answer (the live rows never all started, or it failed)", flush=True)
    if summary["prompt_tokens_mismatch"]:
        print(
            f"{NAME}: note: {summary['prompt_tokens_mismatch']} prompts were not the asked length by the "
            "server's count (see the JSON)",
            flush=True,
        )
    greedy = None
    if args.check_greedy:
        greedy = asyncio.run(check_greedy(client, specs, results, args, url))
        print(
            f"{NAME}: greedy under load vs alone: {greedy['checked']} checked, {greedy['equal']} equal, "
            f"{greedy['near_ties']} parted at a near tie (gap < {args.tie_gap:g}), {greedy['faults']} faults: "
            f"{'passed' if greedy['passed'] else 'FAILED'}",
            flush=True,
        )
        for row in greedy["rows"]:
            if not row["equal"]:
                print(
                    f"{NAME}:   request {row['index']} ({row['prompt_tokens']} + {row['new_tokens']} tokens): "
                    f"parted at step {row.get('step')}, gap {row.get('gap')}",
                    flush=True,
                )
    if args.json_path:
        report = {
            "argv": [sys.executable, sys.argv[0], *argv],
            "url": url,
            "info": info,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {
                "cpus": os.cpu_count(),
                "load_avg_start": load0,
                "load_avg_end": os.getloadavg(),
                "python": sys.version.split()[0],
            },
            "config": {k: v for k, v in vars(args).items() if k not in ("api_key",)},
            "force_length": force,
            "prompt_words": prompt_note,
            "load": load,
            "summary": summary,
            "greedy_check": greedy,
            "table": table(summary, info, args, load),
            "requests": [
                {
                    **{k: v for k, v in asdict(r).items() if k != "itl"},
                    "tpot": r.tpot(),
                    "itl_ms_mean": (1000 * sum(r.itl) / len(r.itl)) if r.itl else None,
                }
                for r in sorted(results, key=lambda r: r.index)
            ],
        }
        Path(args.json_path).write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
        print(f"{NAME}: wrote {args.json_path}", flush=True)
    bad_joiner = joiner is not None and not joiner["joiner_ok"]
    return 1 if summary["errors"] or bad_joiner or (greedy is not None and not greedy["passed"]) else 0


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
