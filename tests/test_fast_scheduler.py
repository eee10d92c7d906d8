"""Continuous batching over the engine's slots: requests that arrive while others decode join at a step boundary,
finished ones leave (their slot refilled by a moved row), and every request gets exactly the tokens it gets alone."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from bloom_server.fast.engine import FastEngine  # noqa: E402
from bloom_server.fast.sampling import SamplingConfig  # noqa: E402
from bloom_server.fast.scheduler import ContinuousBatcher, Request  # noqa: E402
from bloom_server.fast.shapes import BloomShape  # noqa: E402
from bloom_server.fast.weights import from_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    shape = BloomShape.from_dir(tiny_model_dir)
    return FastEngine(from_checkpoint(tiny_model_dir, shape, dtype=torch.float32), shape, max_batch=4, max_seq=64)


def test_staggered_requests_get_what_they_get_alone(engine):
    rng = random.Random(0)
    reqs = []
    for i in range(9):  # more requests than slots: some wait for a slot to free
        prompt = tuple(rng.randrange(10, 2000) for _ in range(rng.randint(1, 9)))
        cfg = SamplingConfig() if i % 3 else SamplingConfig(repetition_penalty=1.3)
        reqs.append(Request(rid=i, prompt=prompt, max_new_tokens=rng.randint(2, 20), cfg=cfg))
    alone = {r.rid: engine.generate([r.prompt], r.max_new_tokens, r.cfg).tokens[0] for r in reqs}

    sched = ContinuousBatcher(engine)
    arrivals = {0: reqs[:2], 1: reqs[2:5], 4: reqs[5:7], 9: reqs[7:]}  # step -> requests arriving before it
    max_live, step = 0, 0
    while step < 200 and (not sched.idle or any(k >= step for k in arrivals)):
        for r in arrivals.get(step, []):
            sched.add(r)
        sched.step()
        max_live = max(max_live, len(sched.live))
        assert [r.slot for r in sched.live] == list(range(len(sched.live)))  # live slots stay a prefix
        step += 1
    assert sched.idle and max_live == 4
    for r in reqs:
        assert r.finish == "length" and r.tokens == alone[r.rid], r.rid


def test_eos_and_min_length_per_row(engine):
    prompt = (5, 17, 99, 4)
    free = engine.generate([prompt], 20, SamplingConfig()).tokens[0]
    eos = free[2]
    early = Request("early", prompt, 20, SamplingConfig(eos_ids=(eos,)))
    held = Request("held", prompt, 20, SamplingConfig(eos_ids=(eos,), min_new_tokens=5))
    plain = Request("plain", (42, 43), 20, SamplingConfig())
    sched = ContinuousBatcher(engine)
    for r in (early, held, plain):
        sched.add(r)
    sched.run()
    assert early.finish == "eos" and early.tokens == free[: free.index(eos) + 1]
    assert eos not in held.tokens[:5] and (held.finish == "length" or held.tokens[-1] == eos)
    assert plain.tokens == engine.generate([plain.prompt], 20, SamplingConfig()).tokens[0]
