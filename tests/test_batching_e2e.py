"""Concurrent callers share generate calls, and every caller gets exactly its own answer."""

from __future__ import annotations

import concurrent.futures
import time

PROMPTS = [
    "Deepspeed is",
    "The quick brown fox",
    "Return the value of",
    "Hello",
    "A list of",
    "This module provides",
    "Create a new",
    "If the argument is",
    "The default is",
    "Raise an exception when",
    "Open the file",
    "Send a request to",
]


def test_concurrent_requests_get_their_own_answers_and_finish_faster(server):
    body = lambda p: {"text": [p], "max_new_tokens": 48, "min_length": 1000}  # noqa: E731 - exactly 48 tokens each
    # Alone, one after another: the reference answers and the sequential time.
    alone = {}
    start = time.perf_counter()
    for p in PROMPTS:
        status, out, _ = server.post("/generate", body(p))
        assert status == 200, out
        alone[p] = out["text"][0]
    sequential = time.perf_counter() - start

    def call(p):
        return p, server.post("/generate", body(p))

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(call, PROMPTS))
    together = time.perf_counter() - start

    for p, (status, out, _) in results:
        assert status == 200, out
        assert out["text"][0] == alone[p], p
        assert out["num_generated_tokens"] == [48]
    assert together < sequential, (together, sequential)


def test_requests_with_different_settings_each_get_their_own(server):
    reqs = [
        {"text": ["Deepspeed is"], "max_new_tokens": 5},
        {"text": ["Deepspeed is"], "max_new_tokens": 9, "remove_input_from_output": False},
        {"text": ["Deepspeed is"], "max_new_tokens": 7, "repetition_penalty": 1.5},
        {"text": ["Hello", "Open the file"], "max_new_tokens": 6},
    ]
    alone = [server.post("/generate", r)[1] for r in reqs]
    with concurrent.futures.ThreadPoolExecutor(len(reqs)) as pool:
        together = list(pool.map(lambda r: server.post("/generate", r)[1], reqs))
    for a, b in zip(alone, together):
        assert a["text"] == b["text"]
        assert a["num_generated_tokens"] == b["num_generated_tokens"]
