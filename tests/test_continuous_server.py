"""`bloom-server serve --backend fast --batching continuous`: requests join the running batch at step boundaries and
leave it when they finish or their callers go, and every caller still gets exactly its own answer (real server
processes on 127.0.0.1, the tiny model on CPU)."""

from __future__ import annotations

import concurrent.futures
import http.client as httpc
import json
import os
import random
import signal
import threading
import time

import pytest

from helpers import ServerProcess, free_port

PROMPTS = [
    "Deepspeed is",
    "The quick brown fox",
    "Return the value of",
    "Hello",
    "A list of",
    "This module provides",
    "Create a new",
    "If the argument is",
    "Open the file",
    "Send a request to",
]
BASE = ["--backend", "fast", "--batching", "continuous", "--max-input-length", "64"]


def start(tiny_model_dir, tmp_path_factory, name, *args):
    srv = ServerProcess(["--model", str(tiny_model_dir), *BASE, *args], free_port(),
                        log_path=tmp_path_factory.mktemp("logs") / f"{name}.log")  # fmt: skip
    srv.wait_ready()
    return srv


@pytest.fixture(scope="module")
def cserver(tiny_model_dir, tmp_path_factory):
    srv = start(tiny_model_dir, tmp_path_factory, "continuous", "--max-new-tokens", "192", "--max-total-tokens", "256",
                "--max-batch-size", "4")  # fmt: skip
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def one_slot(tiny_model_dir, tmp_path_factory):
    """One slot and one queue place: who holds the slot, who waits, who is refused are all visible."""
    srv = start(tiny_model_dir, tmp_path_factory, "one-slot", "--max-new-tokens", "1000", "--max-total-tokens", "1064",
                "--max-batch-size", "1", "--max-queued-requests", "1", "--log-level", "debug")  # fmt: skip
    try:
        yield srv
    finally:
        srv.stop()


def generate(srv, body):
    status, out, _ = srv.post("/generate", body)
    assert status == 200, out
    return out["text"], out["num_generated_tokens"]


class Stream:
    """A TGI /generate_stream call on its own connection: read events one by one, or hang up mid-stream."""

    def __init__(self, srv, body):
        self.conn = httpc.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        self.conn.request("POST", "/generate_stream", json.dumps(body), {"Content-Type": "application/json"})
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200

    def next_event(self) -> dict | None:
        while True:
            line = self.resp.readline()
            if not line:
                return None
            if line.startswith(b"data:"):
                return json.loads(line[5:])

    def close(self) -> None:
        self.conn.sock.shutdown(2) if self.conn.sock else None
        self.conn.close()


def test_concurrent_requests_of_different_lengths_each_get_what_they_get_alone(cserver):
    rng = random.Random(0)
    bodies = []
    for i, p in enumerate(PROMPTS):
        body = {"text": [p], "max_new_tokens": rng.randint(3, 60)}
        if i % 2:
            body["min_length"] = 1000  # exactly max_new_tokens: no EOS
        if i % 3 == 0:
            body["repetition_penalty"] = 1.3
        bodies.append(body)
    alone = [generate(cserver, b) for b in bodies]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: generate(cserver, b), bodies))
    assert together == alone
    assert [n for _, (n,) in together if n] and all(n <= b["max_new_tokens"] for b, (_, (n,)) in zip(bodies, together))


def test_a_short_request_joins_a_running_long_one_and_finishes_first(cserver):
    long = Stream(cserver, {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 180, "min_length": 1000}})
    assert long.next_event() is not None  # the long request is running
    order: list[str] = []
    events = 1

    def read_long():
        nonlocal events
        while (ev := long.next_event()) is not None:
            events += 1
            if ev.get("generated_text") is not None:
                order.append("long")

    reader = threading.Thread(target=read_long)
    reader.start()
    text, counts = generate(cserver, {"text": ["Hello"], "max_new_tokens": 3, "min_length": 100})
    order.append("short")
    reader.join(60)
    long.close()
    assert counts == [3] and text == generate(cserver, {"text": ["Hello"], "max_new_tokens": 3, "min_length": 100})[0]
    # The short one joined the running batch and left it while the long one still ran (with a batch that runs to
    # completion it would have waited for all 180 tokens).
    assert order == ["short", "long"] and events == 180


def test_seeded_sampling_gives_the_same_text_alone_and_joined(cserver):
    body = {"inputs": "Hello", "parameters": {"do_sample": True, "seed": 42, "top_k": 20, "temperature": 0.9,
                                              "max_new_tokens": 24, "details": True}}  # fmt: skip
    status, alone, _ = cserver.post("/generate", body)
    assert status == 200, alone
    assert alone["details"]["seed"] == 42
    others = [{"text": [p], "max_new_tokens": 30, "do_sample": True, "min_length": 1000} for p in PROMPTS[:3]]
    others += [{"text": [p], "max_new_tokens": 12} for p in PROMPTS[3:6]]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(cserver.post, "/generate", b) for b in others]
        time.sleep(0.05)  # the others run: the seeded one joins them
        joined = pool.submit(cserver.post, "/generate", body).result()
        assert all(f.result()[0] == 200 for f in futs)
    assert joined[0] == 200 and joined[1]["generated_text"] == alone["generated_text"]
    got, want = joined[1]["details"]["tokens"], alone["details"]["tokens"]
    assert [t["id"] for t in got] == [t["id"] for t in want]
    assert [t["logprob"] for t in got] == pytest.approx([t["logprob"] for t in want], abs=1e-4)  # other batch shapes


def test_stop_strings_and_several_choices(cserver):
    (text,), _ = generate(cserver, {"text": ["Deepspeed is"], "max_new_tokens": 20, "min_length": 100})
    stop = text[6:9]
    status, out, _ = cserver.post("/v1/completions", {"prompt": "Deepspeed is", "max_tokens": 20, "temperature": 0,
                                                      "stop": [stop], "n": 2})  # fmt: skip
    assert status == 200, out
    assert [c["text"] for c in out["choices"]] == [text[:6]] * 2
    assert [c["finish_reason"] for c in out["choices"]] == ["stop"] * 2
    sampled = {"prompt": "Hello", "max_tokens": 12, "temperature": 1.0, "n": 3, "seed": 5}
    status, a, _ = cserver.post("/v1/completions", sampled)
    status2, b, _ = cserver.post("/v1/completions", sampled)
    assert status == status2 == 200, (a, b)
    texts = [c["text"] for c in a["choices"]]
    assert texts == [c["text"] for c in b["choices"]]  # seeded: reproduced
    assert len(set(texts)) > 1  # each choice samples with its own generator
    assert a["usage"]["completion_tokens"] <= 36


def test_a_disconnected_stream_frees_its_slot_for_the_queued_request(one_slot):
    a = Stream(one_slot, {"inputs": "Deepspeed is", "parameters": {"max_new_tokens": 1000, "min_length": 5000}})
    assert a.next_event() is not None  # a holds the only slot
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        b = pool.submit(generate, one_slot, {"text": ["Hello"], "max_new_tokens": 4, "min_length": 100})
        deadline = time.monotonic() + 30
        while _gauge(one_slot, "bloom_server_queue_depth") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _gauge(one_slot, "bloom_server_queue_depth") == 1  # b waits for the slot
        a.close()
        assert b.result(60)[1] == [4]
    assert "leave the batch (their callers are gone)" in one_slot.log()
    assert _gauge(one_slot, "bloom_server_running_batch_size") == 0  # a is gone (1000 tokens would take far longer)


def test_429_when_the_queue_is_full(one_slot):
    a = Stream(one_slot, {"inputs": "Deepspeed is", "parameters": {"max_new_tokens": 1000, "min_length": 5000}})
    assert a.next_event() is not None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        b = pool.submit(generate, one_slot, {"text": ["Hello"], "max_new_tokens": 2})
        deadline = time.monotonic() + 30
        while _gauge(one_slot, "bloom_server_queue_depth") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        status, body, headers = one_slot.post("/generate", {"text": ["Open the file"], "max_new_tokens": 2})
        assert status == 429, body
        assert int(headers.get("retry-after") or headers.get("Retry-After")) >= 1
        a.close()
        assert b.result(60)[1] == [2]


def test_sigterm_lets_running_requests_finish(tiny_model_dir, tmp_path_factory):
    srv = start(tiny_model_dir, tmp_path_factory, "drain", "--max-new-tokens", "300", "--max-total-tokens", "364")
    try:
        body = {"text": ["Deepspeed is"], "max_new_tokens": 300, "min_length": 1000}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            calls = [pool.submit(srv.post, "/generate", body) for _ in range(2)]
            deadline = time.monotonic() + 30
            while _gauge(srv, "bloom_server_running_batch_size") < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            os.killpg(srv.proc.pid, signal.SIGTERM)
            for c in calls:
                status, out, _ = c.result(60)
                assert status == 200 and out["num_generated_tokens"] == [300], out
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()


def test_chunked_prefill_and_the_prefix_cache_change_no_answer(cserver, tiny_model_dir, tmp_path_factory):
    """Prompts sharing a prefix longer than a chunk, concurrently, on a server with chunked prefill and the prefix
    cache: each gets the answer the plain server gives it, and /metrics counts the cache's hits."""
    srv = start(tiny_model_dir, tmp_path_factory, "prefill", "--max-new-tokens", "192", "--max-total-tokens", "256",
                "--max-batch-size", "4", "--prefill-step-tokens", "12", "--prefill-chunk-tokens", "8",
                "--prefix-cache-mb", "1")  # fmt: skip
    try:
        shared = " ".join(PROMPTS[:7])  # 35 tokens: one block of 32 and more than four chunks
        rng = random.Random(2)
        bodies = [{"text": [f"{shared} {p}"], "max_new_tokens": rng.randint(3, 40), "min_length": 1000 * (i % 2)}
                  for i, p in enumerate(PROMPTS)]  # fmt: skip
        plain = [generate(cserver, b) for b in bodies]
        assert generate(srv, bodies[0]) == plain[0]  # alone, and its prefix is cached
        steps = "bloom_server_time_to_first_token_steps_sum"
        before = _gauge(srv, steps + '{phase="wait"}'), _gauge(srv, steps + '{phase="prefill"}')
        assert generate(srv, bodies[1]) == plain[1]  # a hit whose rest fits a step: its first token in that step
        after = _gauge(srv, steps + '{phase="wait"}'), _gauge(srv, steps + '{phase="prefill"}')
        assert (after[0] - before[0], after[1] - before[1]) == (0, 1)
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            together = list(pool.map(lambda b: generate(srv, b), bodies))
        assert together == plain
        hits, misses = (
            _gauge(srv, "bloom_server_prefix_cache_hits_total"),
            _gauge(srv, "bloom_server_prefix_cache_misses_total"),
        )
        assert hits >= len(bodies) and _gauge(srv, "bloom_server_prefix_cache_hit_tokens_total") == 32 * hits
        assert misses >= 2  # the warm-up's prompt and the first one
        assert (
            0
            < _gauge(srv, "bloom_server_prefix_cache_bytes")
            <= _gauge(srv, "bloom_server_prefix_cache_capacity_bytes")
        )
        assert _gauge(srv, "bloom_server_prefix_cache_evictions_total") == 0
    finally:
        srv.stop()
    status, text, _ = cserver.get("/metrics")
    assert status == 200 and "prefix_cache" not in text  # unset, the cache is off on a CPU: no series


def test_info_reports_the_mode(cserver):
    status, info, _ = cserver.get("/info")
    assert status == 200 and info["batching"] == "continuous"


def _gauge(srv, name: str) -> float:
    status, text, _ = srv.get("/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")
