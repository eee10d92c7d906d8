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


# ---- the batcher and a request's settling, without a server ----


class _Tok:
    special_ids = frozenset({2})

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)

    def incremental(self):
        return self  # its text(ids): the whole decode, as TextTokenizer's is for any decoder

    def text(self, ids):
        return self.decode(ids)


def _request(max_new, streaming=False, prompts=((5, 6),)):
    from bloom_server.frontend.requests import GenRequest
    from bloom_server.frontend.validation import GenerateSpec
    from bloom_server.types import SamplingParams

    spec = GenerateSpec(SamplingParams(), max_new, True, None)
    return GenRequest([list(p) for p in prompts], spec, _Tok(), eos_ids=frozenset({2}), streaming=streaming)


def test_a_non_streamed_row_settled_at_once_matches_token_by_token():
    """settle_row delivers a non-streamed row in one step: the same ids, finish reasons and completions as the
    token-by-token path a streamed request takes (cut at the first EOS, inclusive, or at max_new_tokens)."""
    import asyncio

    from bloom_server.types import FinishReason

    async def both(outputs, max_new):
        got = []
        for streaming in (False, True):
            req = _request(max_new, streaming, prompts=[(5, 6)] * len(outputs))
            for r, (ids, reason) in enumerate(outputs):
                req.settle_row(r, ids, reason)
            req._finish()
            got.append([(c.token_ids, c.finish_reason, c.text, c.logprobs) for c in await req.result()])
        return got

    cases = [
        ([((7, 8, 9), FinishReason.LENGTH)], 3),
        ([((7, 2, 9, 9), FinishReason.EOS)], 8),  # EOS in the middle: cut after it
        ([((7, 8, 9, 10, 11), FinishReason.LENGTH)], 3),  # more than max_new_tokens: cut
        ([((7,), FinishReason.TIME)], 5),  # fewer: the backend's reason
        ([((), FinishReason.TIME), ((2,), FinishReason.EOS), ((7, 8), FinishReason.LENGTH)], 2),
    ]
    for outputs, max_new in cases:
        bulk, one_by_one = asyncio.run(both(outputs, max_new))
        assert bulk == one_by_one, (outputs, bulk, one_by_one)
    bulk, _ = asyncio.run(both([((7, 2, 9), FinishReason.EOS)], 8))
    assert bulk == [((7, 2), "eos_token", "<7><2>", (None, None))]


def test_queued_tokens_follow_the_queue():
    """The batcher's queued tokens (prompt + max new tokens of every waiting row) as requests come, leave the queue
    and are taken; past the bound a request is refused naming the tokens queued."""
    import asyncio

    from bloom_server.errors import Overloaded
    from bloom_server.frontend.batching.config import BatcherConfig
    from bloom_server.frontend.batching.dynamic import DynamicBatcher

    async def run():
        started = asyncio.Event()

        async def run_batch(batch, listener):
            started.set()
            await asyncio.sleep(3600)

        b = DynamicBatcher(run_batch, BatcherConfig(1, 10, pad_token_id=0, eos_token_id=2, max_queued_tokens=30))
        first = _request(4)  # 2 + 4 tokens: taken by the loop at once
        b.submit(first)
        await started.wait()
        assert b.queued_tokens == 0
        a, c = _request(4), _request(8, prompts=[(1, 2, 3), (4,)])  # 6, then 3 + 8 + 1 + 8 = 20
        b.submit(a)
        b.submit(c)
        assert b.queued_tokens == 26 == sum(p.tokens for p in b._pending)
        try:
            b.submit(_request(3))
            raise AssertionError("not refused")
        except Overloaded as exc:
            assert "26 tokens are queued" in str(exc) and "5 more" in str(exc)
        a.cancel()  # leaves the queue
        assert b.queued_tokens == 20
        b.submit(_request(3))
        assert b.queued_tokens == 25
        await b.stop()

    asyncio.run(run())


def test_one_end_of_row_rule_token_by_token_and_over_a_run():
    """A row ends at EOS (kept) or at its max_new_tokens; row_end and cut_row say the same for every split."""
    from bloom_server.types import FinishReason, cut_row, eos_set, row_end

    eos = eos_set([2, 9])
    assert eos == eos_set((9, 2)) and eos_set(None) == frozenset() and eos_set(2) == {2}
    for tokens in [(5, 6, 2, 7), (5, 6, 7, 8, 1), (2,), (5, 9, 2), ()]:
        for limit in (1, 3, 4, 10):
            one, end = [], None
            for t in tokens:
                one.append(t)
                end = row_end(t, len(one), limit, eos)
                if end is not None:
                    break
            assert cut_row(tokens, limit, eos) == (tuple(one), end)
            for have in range(len(one) + (end is None)):  # the same row settled after `have` streamed tokens
                rest, end2 = cut_row(tokens[have:], limit, eos, have=have)
                assert (tuple(one[:have]) + rest, end2) == (tuple(one), end)
    assert cut_row((5, 6, 7), 3, frozenset()) == ((5, 6, 7), FinishReason.LENGTH)
    assert cut_row((5, 2, 7), 3, eos)[1] is FinishReason.EOS
