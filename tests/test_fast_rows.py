"""Continuous batching over the engine's slots: requests that arrive while others decode join at a step boundary,
finished ones leave (their slot refilled by a moved row), and every request gets exactly the tokens it gets alone."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from bloom_server.fast.engine import FastEngine
from bloom_server.fast.rows import Request, RowScheduler
from bloom_server.fast.sampling import SamplingConfig
from bloom_server.fast.shapes import BloomShape
from bloom_server.fast.weights import from_checkpoint


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

    sched = RowScheduler(engine)
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
    sched = RowScheduler(engine)
    for r in (early, held, plain):
        sched.add(r)
    sched.run()
    assert early.finish == "eos" and early.tokens == free[: free.index(eos) + 1]
    assert eos not in held.tokens[:5] and (held.finish == "length" or held.tokens[-1] == eos)
    assert plain.tokens == engine.generate([plain.prompt], 20, SamplingConfig()).tokens[0]


def _mixed_requests(engine, seed):
    """Greedy rows (some with an EOS met mid-stream, one held back by min_new_tokens), max_new_tokens 1, a
    repetition penalty, a seeded sampled row: every kind of per-row rule the batcher applies."""
    rng = random.Random(seed)
    prompts = [tuple(rng.randrange(10, 2000) for _ in range(rng.randint(1, 9))) for _ in range(10)]
    free = engine.generate([prompts[0]], 12, SamplingConfig()).tokens[0]
    eos = free[3]
    cfgs = [
        SamplingConfig(eos_ids=(eos,)),  # ends on the EOS at its 4th token
        SamplingConfig(eos_ids=(eos,), min_new_tokens=6),
        SamplingConfig(),
        SamplingConfig(repetition_penalty=1.3),
        SamplingConfig(do_sample=True, top_k=20, temperature=0.8),
        SamplingConfig(),
        SamplingConfig(eos_ids=(eos,)),
        SamplingConfig(),
        SamplingConfig(do_sample=True, top_p=0.9),
        SamplingConfig(),
    ]
    news = [12, 14, 1, 9, 11, 1, 13, 5, 7, 2]
    prompts[1] = prompts[6] = prompts[0]
    return [(i, prompts[i], news[i], cfgs[i]) for i in range(10)]


def _run_staggered(engine, specs, pipeline, leave=None):
    sched = RowScheduler(engine, pipeline=pipeline)
    reqs = [Request(rid=i, prompt=p, max_new_tokens=n, cfg=c, seed=100 + i) for i, p, n, c in specs]
    arrivals = {0: reqs[:3], 1: reqs[3:5], 2: reqs[5:6], 5: reqs[6:8], 8: reqs[8:]}
    seen: dict = {r.rid: [] for r in reqs}
    finished: list = []
    step = 0
    while step < 300 and (not sched.idle or any(k >= step for k in arrivals)):
        for r in arrivals.get(step, []):
            sched.add(r)
        if leave is not None and step == leave[0]:
            assert sched.leave(leave[1]) is not None
        finished += [r.rid for r in sched.step(logprobs=True)]
        per_step = [e.req.rid for e in sched.emitted]
        assert len(per_step) == len(set(per_step))  # at most one token per row per step
        for e in sched.emitted:
            seen[e.req.rid].append(e.token)
            assert e.logprob is not None and e.logprob <= 0.0
        assert [r.slot for r in sched.live] == list(range(len(sched.live)))
        step += 1
    assert sched.idle
    for r in reqs:
        assert seen[r.rid] == r.tokens, r.rid  # emitted in order, nothing dropped or repeated
    return {r.rid: (r.tokens, r.finish) for r in reqs}, finished


@pytest.mark.parametrize("seed", [0, 1])
def test_pipelined_steps_give_the_tokens_of_unpipelined_steps_and_of_each_row_alone(engine, seed):
    specs = _mixed_requests(engine, seed)
    piped, fin_piped = _run_staggered(engine, specs, pipeline=True)
    plain, fin_plain = _run_staggered(engine, specs, pipeline=False)
    assert piped == plain
    assert sorted(fin_piped) == sorted(fin_plain) == sorted(i for i, *_ in specs)  # each finish reported once
    for i, p, n, c in specs:
        alone = engine.generate([p], n, c, seed=100 + i).tokens[0]
        tokens, finish = piped[i]
        if c.eos_ids and finish == "eos":
            alone = alone[: alone.index(c.eos_ids[0], c.min_new_tokens) + 1]
        assert tokens == alone, i
        assert finish == ("eos" if c.eos_ids and c.eos_ids[0] in alone[c.min_new_tokens :] else "length"), i
    assert piped[0][1] == "eos" and len(piped[0][0]) == 4  # EOS mid-stream
    assert len(piped[2][0]) == len(piped[5][0]) == 1  # max_new_tokens 1


def test_a_row_that_leaves_mid_stream_gets_a_prefix_and_the_others_are_untouched(engine):
    specs = _mixed_requests(engine, 0)
    full, _ = _run_staggered(engine, specs, pipeline=True)
    for pipeline in (True, False):
        left, fin = _run_staggered(engine, specs, pipeline=pipeline, leave=(4, 3))
        tokens, finish = left[3]
        assert finish == "stopped" and 0 < len(tokens) < len(full[3][0]) and tokens == full[3][0][: len(tokens)]
        assert 3 not in fin
        assert {k: v for k, v in left.items() if k != 3} == {k: v for k, v in full.items() if k != 3}


def test_cstep_ranks_agree_and_each_row_gets_its_alone_tokens(tiny_model_dir):
    """Two FastBackend.cstep runs fed the same joins and leaves, one as rank 0 (log-probabilities, top alternatives)
    and one as a follower: the digest part of every step agrees, and each row's tokens are its alone tokens."""
    from bloom_server.backends.fast import FastBackend
    from bloom_server.runtime.protocol import CStep, Join
    from bloom_server.types import SamplingParams

    shape = BloomShape.from_dir(tiny_model_dir)

    def backend():
        b = FastBackend.__new__(FastBackend)
        b.engine = FastEngine(from_checkpoint(tiny_model_dir, shape, dtype=torch.float32), shape, max_batch=3,
                              max_seq=64)  # fmt: skip
        b._defaults = {}
        return b

    r0, r1 = backend(), backend()
    rng = random.Random(3)
    prompts = [tuple(rng.randrange(10, 2000) for _ in range(rng.randint(1, 8))) for _ in range(7)]
    eos = r0.engine.generate([prompts[0]], 8, SamplingConfig()).tokens[0][2]
    news = [8, 1, 6, 9, 1, 5, 7]
    params = [SamplingParams(), SamplingParams(), SamplingParams.from_dict({"do_sample": True, "top_k": 10}),
              SamplingParams.from_dict({"repetition_penalty": 1.2}), SamplingParams(), SamplingParams(),
              SamplingParams()]  # fmt: skip
    joins = [Join(i + 1, p, n, params[i], 50 + i, eos if i in (0, 5) else None, 0, 2 if i == 3 else 0)
             for i, (p, n) in enumerate(zip(prompts, news))]  # fmt: skip
    # step -> (joins, leaves); row 4 (max_new_tokens 9, top alternatives) leaves mid-stream; 3 slots for 7 rows
    plan = {0: (joins[:2], ()), 1: (joins[2:4], ()), 3: (joins[4:6], ()), 4: ((), (4,)), 6: (joins[6:], ())}
    got: dict = {j.rid: [] for j in joins}
    finished: dict = {}
    for step in range(60):
        j, leaves = plan.get(step, ((), ()))
        a = r0.cstep(CStep(tuple(j), tuple(leaves)), rank0=True)
        b = r1.cstep(CStep(tuple(j), tuple(leaves)), rank0=False)
        assert a.agreed() == b.agreed() and b.extra is None
        assert len(a.extra) == len(a.tokens)  # type: ignore[arg-type]
        for (rid, tok), (lp, top) in zip(a.tokens, a.extra):  # type: ignore[arg-type]
            got[rid].append(tok)
            assert lp <= 0.0 and (top is None) == (rid != 4) and (top is None or len(top) == 2)
        for rid, reason in a.finished:
            assert rid not in finished
            finished[rid] = reason
        if step > 6 and a.live == 0:
            break
    assert a.live == 0 and len(finished) == len(joins)
    for jn in joins:
        cfg = SamplingConfig.from_generate_kwargs(jn.params.as_dict(), eos_token_id=jn.eos_token_id,
                                                  prompt_width=len(jn.prompt))  # fmt: skip
        alone = r0.engine.generate([jn.prompt], jn.max_new_tokens, cfg, seed=jn.seed).tokens[0]
        if jn.rid == 4:
            assert finished[4] == "stopped" and 0 < len(got[4]) < 9 and got[4] == alone[: len(got[4])]
            continue
        if jn.eos_token_id is not None and eos in alone:
            alone = alone[: alone.index(eos) + 1]
            assert finished[jn.rid] == "eos_token"
        else:
            assert finished[jn.rid] == "length"
        assert got[jn.rid] == alone, jn.rid


def test_a_cstep_submitted_on_its_own_drains(tiny_model_dir):
    """The warm-up's lone cstep (Leader.submit, not the continuous loop) runs its row to the end although steps read
    their tokens one step late."""
    from bloom_server.backends.fast import FastBackend
    from bloom_server.runtime.lockstep import Leader
    from bloom_server.runtime.protocol import CStep, Join
    from bloom_server.types import SamplingParams

    shape = BloomShape.from_dir(tiny_model_dir)
    b = FastBackend.__new__(FastBackend)
    b.engine = FastEngine(from_checkpoint(tiny_model_dir, shape, dtype=torch.float32), shape, max_batch=2, max_seq=32)
    b._defaults = {}
    leader = Leader(b, None).start()
    try:
        res = leader.run("cstep", CStep(joins=(Join(0, (5, 6, 7), 2, SamplingParams(), 0, None, 0),)))
    finally:
        leader.stop()
    alone = b.engine.generate([(5, 6, 7)], 2, SamplingConfig()).tokens[0]
    assert res.tokens == ((0, alone[0]), (0, alone[1])) and res.finished == ((0, "length"),) and res.live == 0
    assert b._batcher is not None and b._batcher.idle


def test_each_decode_is_queued_before_the_previous_steps_tokens_are_read(engine, monkeypatch):
    """The point of pipelining: within a step, the device gets its next decode before the host waits for a read; a
    joining row's prefill goes ahead of that decode, so its first token is read in the step that admitted it."""
    from bloom_server.fast import rows as sch

    log: list[str] = []
    decode, read, prefill = FastEngine.decode, sch._Pending.read, FastEngine.prefill
    monkeypatch.setattr(FastEngine, "decode", lambda self, *a, **k: (log.append("decode"), decode(self, *a, **k))[1])
    monkeypatch.setattr(FastEngine, "prefill", lambda self, *a, **k: (log.append("prefill"), prefill(self, *a, **k))[1])
    monkeypatch.setattr(sch._Pending, "read", lambda self: (log.append("read"), read(self))[1])
    sched = RowScheduler(engine)
    a, b = Request("a", (5, 6, 7), 6), Request("b", (8, 9), 4)
    sched.add(a)
    sched.add(b)
    per_step = []
    while not sched.idle:
        log.clear()
        sched.step()
        per_step.append(tuple(log))
        if sched.steps == 1:
            assert [e.req.rid for e in sched.emitted] == ["a", "b"]  # their first tokens, read in step 0
    assert per_step[0] == ("prefill", "decode", "read")  # admission, then their second tokens' decode is queued
    assert all(s == ("decode", "read") for s in per_step[1:-1]), per_step
    assert per_step[-1] == ("read",)  # the last tokens: nothing left to decode
    assert (a.wait_steps, a.prefill_steps, b.wait_steps, b.prefill_steps) == (0, 1, 0, 1)


class _CPUGraphs:
    """A stand-in for CUDA graph capture on the CPU: a "graph" replays the step eagerly into its own output, and
    every capture is recorded, so the engine's choice of when to capture can be watched."""

    def __init__(self, monkeypatch):
        self.captured: list[tuple[int, int]] = []
        fake = self

        def graph(engine, B, S):
            if (B, S) not in engine._graphs:
                fake.captured.append((B, S))
                out = torch.empty(B, engine.shape.vocab_size)

                class Replay:
                    def replay(self):
                        out.copy_(engine._step(B, S))

                engine._graphs[B, S] = (Replay(), out)
                engine.graph_stats["graphs"] = len(engine._graphs)
            return engine._graphs[B, S]

        monkeypatch.setattr(FastEngine, "_graph", graph)


def test_the_continuous_batch_runs_a_new_shape_eagerly_then_captures_it_and_idle_time_captures_the_rest(
    tiny_model_dir, monkeypatch
):
    from bloom_server.fast import rows as sch

    shape = BloomShape.from_dir(tiny_model_dir)
    e = FastEngine(from_checkpoint(tiny_model_dir, shape, dtype=torch.float32), shape, max_batch=4, max_seq=300)
    reqs = [Request("a", (5, 17, 99), 70), Request("b", (42, 7), 9)]
    alone = {r.rid: e.generate([r.prompt], r.max_new_tokens, SamplingConfig()).tokens[0] for r in reqs}
    graphs = _CPUGraphs(monkeypatch)
    e.cuda_graphs = True
    monkeypatch.setattr(sch, "GRAPH_AFTER_EAGER_STEPS", 3)
    sched = RowScheduler(e)
    for r in reqs:
        sched.add(r)
    sched.run()
    assert [r.tokens for r in reqs] == [alone["a"], alone["b"]]  # eager steps and replays give the same tokens
    # (2, 64) then, once b is done, (1, 64) and (1, 128): each run eagerly 3 times before its capture, none before.
    assert graphs.captured == [(2, 64), (1, 64), (1, 128)]
    assert e.graph_stats["eager_steps"] == 9

    # A static generate captures at once (it replays one shape for every token).
    e.generate([(8, 9)] * 3, 3, SamplingConfig())
    assert graphs.captured[-1] == (4, 64) and e.graph_stats["eager_steps"] == 9

    # Idle: the rest of the shapes, one a call, until every (batch, key) bucket is held.
    assert e.graph_shapes() == [(B, S) for S in (64, 128, 256, 300) for B in (1, 2, 4)]
    calls = 1
    while e.capture_next():
        calls += 1
        assert calls < 20
    assert sorted(graphs.captured) == sorted(e.graph_shapes()) and calls == 12 - 4
    assert not e.capture_next()
    # Idle work never runs under a live row (its slot buffers are in use).
    e.live[0] = True
    e._graphs.clear()
    assert not e.capture_next()
    e.live[0] = False


def test_idle_capture_takes_the_shapes_run_eagerly_first(tiny_model_dir, monkeypatch):
    from bloom_server.fast import rows as sch

    shape = BloomShape.from_dir(tiny_model_dir)
    e = FastEngine(from_checkpoint(tiny_model_dir, shape, dtype=torch.float32), shape, max_batch=4, max_seq=300)
    graphs = _CPUGraphs(monkeypatch)
    e.cuda_graphs = True
    monkeypatch.setattr(sch, "GRAPH_AFTER_EAGER_STEPS", 1000)
    sched = RowScheduler(e)
    for i in range(3):
        sched.add(Request(i, tuple(range(10, 150)), 4))  # three rows of 140 keys: the (4, 256) bucket
    sched.run()
    assert graphs.captured == [] and e.graph_stats["eager_steps"] > 0
    e.capture_next()
    assert graphs.captured == [(4, 256)]


def test_a_burst_of_plain_greedy_rows_gets_its_first_tokens_from_one_argmax(engine, monkeypatch):
    """Admission picks the plain greedy rows' first tokens together (no per-row sampler call: one kernel for a burst),
    the other rows' from their own samplers, and every row's tokens equal its tokens alone."""
    from bloom_server.fast import sampling

    reqs = [Request(i, (5 + i, 17, 99 - i), 3) for i in range(3)]
    reqs.append(Request("pen", (42, 43, 44), 3, SamplingConfig(repetition_penalty=1.3)))
    alone = {r.rid: engine.generate([r.prompt], r.max_new_tokens, r.cfg).tokens[0] for r in reqs}
    calls: list[int] = []
    call = sampling.Sampler.__call__
    monkeypatch.setattr(
        sampling.Sampler, "__call__", lambda self, *a, **k: (calls.append(a[1]), call(self, *a, **k))[1]
    )
    sched = RowScheduler(engine)
    for r in reqs:
        sched.add(r)
    sched.step()
    assert len(sched.out_firsts) == 4 and calls.count(0) == 1  # first tokens: the penalty row's sampler only
    sched.run()
    assert {r.rid: r.tokens for r in reqs} == alone


def test_rows_whose_prompt_is_in_and_a_partial_chunk_share_a_prefill(tiny_model_dir):
    """A step's prefill holds rows whose prompts finish and, last, a row whose prompt goes on in the next step: only the
    finished rows get first tokens (all plain greedy: one argmax over their rows), and every row's tokens equal its
    tokens alone."""
    shape = BloomShape.from_dir(tiny_model_dir)
    e = FastEngine(from_checkpoint(tiny_model_dir, shape, dtype=torch.float32), shape, max_batch=4, max_seq=128)
    live = Request("live", (3, 4), 12)
    short = Request("short", (5, 6, 7), 4)
    long = Request("long", tuple(range(20, 60)), 4)
    alone = {r.rid: e.generate([r.prompt], r.max_new_tokens, r.cfg).tokens[0] for r in (live, short, long)}
    sched = RowScheduler(e, step_tokens=16)
    sched.add(live)
    sched.step()
    sched.add(short)
    sched.add(long)
    sched.step()  # budget 16 - 1 decoding row: short's 3 tokens (+1 for its decode), then 11 of long's 40
    assert [r.rid for r in sched.out_firsts] == ["short"] and long.prefilled == 11
    sched.run()
    assert {r.rid: r.tokens for r in (live, short, long)} == alone


def test_a_shape_whose_capture_runs_out_of_memory_runs_eagerly_for_good(tiny_model_dir, monkeypatch):
    """Idle capture takes every shape, some of which a server may never need: one that runs out of device memory is
    not retried and runs eagerly from then on (in a step too), with the same tokens; the other shapes are captured."""
    from bloom_server.fast import rows as sch

    shape = BloomShape.from_dir(tiny_model_dir)
    e = FastEngine(from_checkpoint(tiny_model_dir, shape, dtype=torch.float32), shape, max_batch=2, max_seq=100)
    req = Request("a", (5, 17, 99), 8)
    alone = e.generate([req.prompt], req.max_new_tokens, SamplingConfig()).tokens[0]
    graphs = _CPUGraphs(monkeypatch)
    stand_in = FastEngine._graph
    tries: list[tuple[int, int]] = []

    def graph(engine, B, S):
        if (B, S) == (1, 64) and (B, S) not in engine._graphs:
            tries.append((B, S))
            engine.tok.fill_(7)  # a capture that fails half way must leave the step buffers as they were
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return stand_in(engine, B, S)

    monkeypatch.setattr(FastEngine, "_graph", graph)
    e.cuda_graphs = True
    monkeypatch.setattr(sch, "GRAPH_AFTER_EAGER_STEPS", 2)
    while e.capture_next():
        pass
    assert tries == [(1, 64)] and sorted(graphs.captured) == sorted(set(e.graph_shapes()) - {(1, 64)})
    sched = RowScheduler(e)
    sched.add(req)
    sched.run()
    assert req.tokens == alone and tries == [(1, 64)]  # (1, 64) ran eagerly past the limit, never tried again
    assert e.graph_stats["eager_steps"] >= 3 and not e.capture_next()
