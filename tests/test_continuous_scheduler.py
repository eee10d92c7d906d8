"""The continuous scheduler's logic on rank 0, without a model: what each step's CStep carries (admission order and
capacity, a request's rows together, leaves of callers that left), how results reach the requests, the bounded
queue, and failure. The engine thread's side (take / deliver) is driven by hand here, as the Leader drives it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from bloom_server.errors import EngineDead, Overloaded
from bloom_server.frontend.batching.config import BatcherConfig
from bloom_server.frontend.batching.continuous import ContinuousBatcher, row_seed
from bloom_server.frontend.requests import Cancelled, GenRequest
from bloom_server.frontend.tokenizer import TextTokenizer
from bloom_server.frontend.validation import validate_generate


class FakeRunner:
    supports_continuous = True

    def __init__(self):
        self.source = None
        self.wakes = 0

    def attach_continuous(self, source):
        self.source = source

    def wake(self):
        self.wakes += 1


@dataclass
class Result:
    """runtime.protocol.CStepResult's shape."""

    tokens: tuple
    finished: tuple
    live: int = 0
    extra: tuple | None = None
    firsts: tuple = ()


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return TextTokenizer(tiny_model_dir)


def make(tok, rows, max_new=4, seed=None, **kw):
    spec = validate_generate({"max_new_tokens": max_new, **kw}, max_new_tokens_limit=64, cap_max_new_tokens=False,
                             default_remove_input=True, vocab_size=tok.vocab_size, seed=seed)  # fmt: skip
    return GenRequest([[5, 6, 7 + i] for i in range(rows)], spec, tok, eos_ids=frozenset({tok.eos_token_id}))


def scheduler(max_batch=3, max_queued=8):
    runner = FakeRunner()
    sched = ContinuousBatcher(runner, BatcherConfig(max_batch, max_queued, pad_token_id=3, eos_token_id=2))
    assert runner.source is sched
    return sched, runner


async def tick():
    for _ in range(3):
        await asyncio.sleep(0)


def test_admission_is_in_arrival_order_with_a_requests_rows_together(tok):
    async def main():
        sched, runner = scheduler(max_batch=3)
        a, b, c = make(tok, 2), make(tok, 2), make(tok, 1)
        for r in (a, b, c):
            sched.submit(r)
        assert runner.wakes == 3 and sched.queue_depth == 3 and sched.idle is False
        step = sched.take()
        # a's two rows fit; b's two do not fit in the one slot left, and c may not pass b (none starves).
        assert [j.rid for j in step.joins] == a._rids and step.leaves == ()
        assert sched.running_rows == 2 and sched.queue_depth == 2
        # The step gives each of a's rows two tokens (first + decoded); row 1 finishes by length.
        sched.deliver(step, Result(((a._rids[0], 11), (a._rids[1], 21), (a._rids[0], 12), (a._rids[1], 22)),
                                   ((a._rids[1], "length"),)))  # fmt: skip
        await tick()
        assert a.started is not None and a.rows[0].ids == [11, 12] and a.rows[1].done and a.rows[1].reason == "length"
        step = sched.take()  # one row live: b's two rows fit now, c still does not
        assert [j.rid for j in step.joins] == b._rids
        sched.deliver(step, Result(((a._rids[0], 13),), ((a._rids[0], "eos_token"),)))
        await tick()
        (done_a,) = [await a.result()]
        assert [c_.token_ids for c_ in done_a] == [(11, 12, 13), (21, 22)]
        assert [c_.finish_reason for c_ in done_a] == ["eos_token", "length"]
        step = sched.take()
        assert [j.rid for j in step.joins] == c._rids  # a's slot freed: c joins
        assert sched.queue_depth == 0 and sched.running_rows == 3

    asyncio.run(main())


def test_a_caller_that_leaves_frees_its_slot_at_the_next_step(tok):
    async def main():
        sched, _ = scheduler(max_batch=1)
        long, queued = make(tok, 1, max_new=50), make(tok, 1)
        sched.submit(long)
        sched.submit(queued)
        step = sched.take()
        assert [j.rid for j in step.joins] == long._rids
        sched.deliver(step, Result(((long._rids[0], 9),), ()))
        await tick()
        long.cancel("the client disconnected")
        with pytest.raises(Cancelled):
            await long.result()
        step = sched.take()
        # The leave and the queued request's join travel in the same step: the slot is reused at once.
        assert step.leaves == tuple(long._rids) and [j.rid for j in step.joins] == queued._rids
        sched.deliver(step, Result(((queued._rids[0], 1),), ((long._rids[0], "stopped"),)))
        await tick()
        assert sched.running_rows == 1 and queued.rows[0].ids == [1]

    asyncio.run(main())


def test_steps_to_a_first_token_count_the_csteps_waited_for_a_slot_and_the_engines_steps(tok):
    async def main():
        sched, _ = scheduler(max_batch=1)
        first, second = make(tok, 1, max_new=3), make(tok, 1)
        sched.submit(first)
        step = sched.take()
        sched.submit(second)  # while the step runs: the next take() is the first it could join
        sched.deliver(step, Result(((first._rids[0], 9),), (), 1, None, ((first._rids[0], 0, 1),)))
        step = sched.take()
        assert step.joins == ()  # no slot: one cstep passes without it
        sched.deliver(step, Result(((first._rids[0], 8),), ((first._rids[0], "length"),)))
        step = sched.take()
        assert [j.rid for j in step.joins] == second._rids
        # the engine admitted it a step later than it got it (1) and read its first token 2 steps after that
        sched.deliver(step, Result(((second._rids[0], 5),), (), 1, None, ((second._rids[0], 1, 2),)))
        await tick()
        assert first.ttft_steps == (0, 1) and second.ttft_steps == (1 + 1, 2)

    asyncio.run(main())


def test_stop_string_leaves_and_queued_cancel_leaves_the_queue(tok):
    async def main():
        sched, _ = scheduler(max_batch=2)
        text = tok.decode([300, 1169])
        stopped = GenRequest([[5, 6]], make(tok, 1, max_new=20).spec, tok, stop=(text[-2:],))
        sched.submit(stopped)
        step = sched.take()
        sched.deliver(step, Result(((stopped._rids[0], 300), (stopped._rids[0], 1169)), ()))
        await tick()
        (c,) = await stopped.result()
        assert c.finish_reason == "stop_sequence"
        step = sched.take()
        assert step.leaves == tuple(stopped._rids)  # the backend stops the row at the next step
        assert sched.running_rows == 1  # its slot counts until the backend says the row is gone
        sched.deliver(step, Result((), ((stopped._rids[0], "stopped"),)))
        assert sched.running_rows == 0

        waiting = make(tok, 1)
        blocker = make(tok, 2)
        sched.submit(blocker)
        sched.submit(waiting)
        assert sched.queue_depth == 2
        waiting.cancel("gone")
        assert sched.queue_depth == 1
        step = sched.take()
        assert [j.rid for j in step.joins] == blocker._rids  # the cancelled one never joins

    asyncio.run(main())


def test_rows_of_a_request_get_their_own_seeds_and_row0_keeps_the_requests(tok):
    async def main():
        sched, _ = scheduler(max_batch=4)
        req = make(tok, 3, seed=1234, do_sample=True)
        sched.submit(req)
        step = sched.take()
        seeds = [j.seed for j in step.joins]
        assert seeds[0] == 1234 and len(set(seeds)) == 3 and seeds == [row_seed(1234, r) for r in range(3)]
        assert all(0 <= s < 2**63 for s in seeds)
        sched.deliver(step, Result((), ()))
        await tick()
        assert req.seed == 1234

    asyncio.run(main())


def test_queue_bound_and_engine_failure(tok):
    async def main():
        sched, _ = scheduler(max_batch=1, max_queued=2)
        a, b = make(tok, 1), make(tok, 1)
        sched.submit(a)
        sched.submit(b)
        with pytest.raises(Overloaded) as err:
            sched.submit(make(tok, 1))
        assert err.value.retry_after >= 1.0
        step = sched.take()  # a runs, b waits
        assert [j.rid for j in step.joins] == a._rids
        sched.fail(EngineDead("rank 1 died"))
        await tick()
        for r in (a, b):
            with pytest.raises(EngineDead):
                await r.result()
        assert sched.take() is None and sched.idle
        with pytest.raises(EngineDead):
            sched.submit(make(tok, 1))

    asyncio.run(main())


def test_nothing_live_means_no_step(tok):
    async def main():
        sched, _ = scheduler()
        assert sched.take() is None
        r = make(tok, 1, max_new=1)
        sched.submit(r)
        step = sched.take()
        sched.deliver(step, Result(((r._rids[0], 7),), ((r._rids[0], "length"),)))
        await tick()
        assert (await r.result())[0].token_ids == (7,)
        assert sched.take() is None and sched.idle

    asyncio.run(main())


def test_mode_follows_the_backend_and_continuous_without_support_is_refused(tok, tiny_model_dir):
    from bloom_server.errors import ConfigError
    from bloom_server.frontend.batching.dynamic import DynamicBatcher
    from bloom_server.frontend.core import Engine
    from bloom_server.settings import load_settings
    from bloom_server.types import ModelInfo

    info = ModelInfo(model_id="m", model_dir=str(tiny_model_dir), backend="fast", dtype="fp32", world_size=1)

    class Plain:  # a runner whose backend cannot join a running batch
        dead = None

    engine = Engine(load_settings(backend="fast"))
    engine.attach(FakeRunner(), tok, info)
    assert engine.batching == "continuous" and isinstance(engine.batcher, ContinuousBatcher)
    engine = Engine(load_settings(backend="fast", batching="dynamic"))
    engine.attach(FakeRunner(), tok, info)
    assert engine.batching == "dynamic" and isinstance(engine.batcher, DynamicBatcher)
    engine = Engine(load_settings(backend="hf"))
    engine.attach(Plain(), tok, info)
    assert engine.batching == "dynamic"
    engine = Engine(load_settings(backend="fast", batching="continuous"))
    with pytest.raises(ConfigError, match="cannot join"):
        engine.attach(Plain(), tok, info)
