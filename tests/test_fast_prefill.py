"""Chunked prefill and the prefix cache in the RowScheduler (CPU, fp32, the tiny model): a long prompt goes in over
several steps while the live rows keep decoding, a cached prefix is copied instead of computed, and every row gets
exactly the greedy tokens it gets alone, whatever the chunking and the cache."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from bloom_server.fast.engine import FastEngine
from bloom_server.fast.prefix_cache import AUTO_MAX_BYTES, PrefixCache, auto_capacity
from bloom_server.fast.rows import Request, RowScheduler
from bloom_server.fast.sampling import SamplingConfig
from bloom_server.fast.shapes import BloomShape
from bloom_server.fast.weights import from_checkpoint

BLOCK = 8  # prefix cache block for these tests (short prompts still span several blocks)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    shape = BloomShape.from_dir(tiny_model_dir)
    return FastEngine(from_checkpoint(tiny_model_dir, shape, dtype=torch.float32), shape, max_batch=4, max_seq=256)


def _prompt(rng, n):
    return tuple(rng.randrange(10, 2000) for _ in range(n))


def _alone(engine, req):
    return engine.generate([req.prompt], req.max_new_tokens, req.cfg, seed=req.seed).tokens[0]


def _run(engine, specs, arrivals, pipeline=True, leave=None, **kw):
    """specs: (rid, prompt, max_new, cfg); arrivals: step -> rids. Returns ({rid: tokens}, per-step trace, sched)."""
    sched = RowScheduler(engine, pipeline=pipeline, **kw)
    reqs = {rid: Request(rid=rid, prompt=p, max_new_tokens=n, cfg=c, seed=7 + i) for i, (rid, p, n, c) in
            enumerate(specs)}  # fmt: skip
    trace = []  # per step: (joining rids, live rids before the step, rids that got a token)
    step = 0
    while step < 500 and (not sched.idle or any(k >= step for k in arrivals)):
        for rid in arrivals.get(step, ()):
            sched.add(reqs[rid])
        if leave is not None and step == leave[0]:
            assert sched.leave(leave[1]) is not None
        before = [r.rid for r in sched.live if r.finish is None]
        joining = [r.rid for r in sched.joining]
        sched.step()
        trace.append((joining, before, [e.req.rid for e in sched.emitted]))
        assert [r.slot for r in sched.live] == list(range(len(sched.live)))
        assert [r.slot for r in sched.joining] == list(range(len(sched.live), len(sched.live) + len(sched.joining)))
        step += 1
    assert sched.idle
    return {rid: r.tokens for rid, r in reqs.items()}, trace, sched


def test_chunks_give_the_logits_of_the_whole_prompt(engine):
    """Engine level: a prompt run in chunks of different sizes (rows of one call at different starts) leaves the same
    keys and gives the same last logits as the prompt in one go."""
    rng = random.Random(0)
    prompts = [_prompt(rng, 70), _prompt(rng, 23)]
    whole = engine.prefill([0, 1], prompts).clone()
    keys = engine.k_cache[:, :2, :, :70].clone()
    done = [0, 0]
    for sizes in ((16, 5), (30, 9), (24, 9)):  # the last chunk of each row ends its prompt
        chunks = [p[d : d + n] for p, d, n in zip(prompts, done, sizes)]
        logits = engine.prefill([2, 3], chunks, list(done))
        done = [d + n for d, n in zip(done, sizes)]
    assert done == [70, 23] and engine.host_pos[2:4] == [70, 23]
    torch.testing.assert_close(logits, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(engine.k_cache[:, 2, :, :70], keys[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(engine.k_cache[:, 3, :, :23], keys[:, 1, :, :23], rtol=1e-5, atol=1e-5)
    for s in range(4):
        engine.release(s)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_one_rows_chunks_give_the_logits_and_keys_of_the_whole_prompt(engine, attention):
    """One row's chunks (its K/V written and read as slices of its slot) give the whole prompt's last logits and
    keys, and leave the other slots alone."""
    rng = random.Random(4)
    prompt = _prompt(rng, 61)
    default = engine.model.prefill_attention
    engine.model.prefill_attention = attention
    try:
        whole = engine.prefill([0], [prompt]).clone()
        keys, values = engine.k_cache[:, 0, :, :61].clone(), engine.v_cache[:, 0, :, :61].clone()
        other = engine.k_cache[:, 1].clone()
        done = 0
        for n in (17, 1, 25, 18):
            logits = engine.prefill([2], [prompt[done : done + n]], [done] if done else None)
            done += n
        assert done == 61 and engine.host_pos[2] == 61
        torch.testing.assert_close(logits, whole, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(engine.k_cache[:, 2, :, :61], keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(engine.v_cache[:, 2, :, :61], values, rtol=1e-5, atol=1e-5)
        assert torch.equal(engine.k_cache[:, 1], other)
    finally:
        engine.model.prefill_attention = default
        for s in range(3):
            engine.release(s)


def test_the_fused_attention_gives_the_eager_prefills_logits_and_keys(engine):
    """fast_prefill_attention=sdpa: a packed batch of mixed lengths, then chunks after cached keys, give the last
    logits and keys of the eager attention (transformers' numbers), to float rounding."""
    rng = random.Random(5)
    prompts = [_prompt(rng, 41), _prompt(rng, 7), _prompt(rng, 26)]
    out = {}
    default = engine.model.prefill_attention
    try:
        for att in ("eager", "sdpa"):
            engine.model.prefill_attention = att
            first = engine.prefill([0, 1, 2], [p[:20] for p in prompts]).clone()
            rest = engine.prefill([0, 1, 2], [p[20:] or p[-1:] for p in prompts], [20, 7, 20])
            out[att] = (first, rest.clone(), engine.k_cache[:, :3].clone(), engine.v_cache[:, :3].clone())
    finally:
        engine.model.prefill_attention = default
        for s in range(3):
            engine.release(s)
    for a, b in zip(out["eager"], out["sdpa"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert not torch.equal(out["eager"][0][0], out["eager"][0][1])  # rows of their own, not one row repeated


def test_the_backend_applies_the_prefill_attention_setting(tiny_model_dir):
    from bloom_server.backends.fast import FastBackend
    from bloom_server.settings import load_settings
    from bloom_server.storage.model_dir import resolve_model_dir
    from bloom_server.types import RankContext

    assert load_settings(backend="fast").fast_prefill_attention == "sdpa"  # the default: measured faster
    s = load_settings(backend="fast", fast_prefill_attention="eager", max_input_length=16, max_total_tokens=48)
    backend = FastBackend(s, resolve_model_dir(str(tiny_model_dir)), RankContext())
    backend.load()
    assert backend.engine.model.prefill_attention == "eager"


def _long_joiner_specs(rng):
    specs = [(i, _prompt(rng, rng.randint(1, 9)), 40, SamplingConfig()) for i in range(3)]
    specs.append((3, _prompt(rng, 150), 12, SamplingConfig()))  # longer than several chunks
    specs.append((4, _prompt(rng, 20), 9, SamplingConfig(repetition_penalty=1.3)))
    specs.append((5, _prompt(rng, 12), 6, SamplingConfig(do_sample=True, top_k=20)))
    return specs


@pytest.mark.parametrize("budget", [None, 1 << 12])
def test_a_batch_of_mixed_lengths_gives_each_row_its_own_logits(engine, monkeypatch, budget):
    """Engine level: prompts of different lengths in one prefill (their real tokens packed, the padding skipped; with a
    small score budget, several row batches taken longest first) give each row, in the caller's order, the last logits
    and keys it gets alone; and chunks of different lengths at different starts do too."""
    import bloom_server.fast.engine as fe

    if budget is not None:
        monkeypatch.setattr(fe, "PREFILL_SCORE_BUDGET", budget)
    calls = []
    real = engine._prefill_rows
    monkeypatch.setattr(engine, "_prefill_rows", lambda *a: calls.append(len(a[0])) or real(*a))
    rng = random.Random(3)
    prompts = [_prompt(rng, n) for n in (5, 41, 17, 41)]
    alone = []
    for p in prompts:
        alone.append(engine.prefill([0], [p]).clone())
        alone.append(engine.k_cache[:, 0, :, : len(p)].clone())
    calls.clear()
    got = engine.prefill([0, 1, 2, 3], prompts)
    assert (calls == [4]) if budget is None else (len(calls) > 1 and sum(calls) == 4)
    # 1e-4: the packed GEMMs sum in another order than one row's alone (the CPU's BLAS blocks by the row count), a few
    # fp32 ulps apart; a row's logits or keys from another row's prompt would be off by far more.
    for i, p in enumerate(prompts):
        torch.testing.assert_close(got[i : i + 1], alone[2 * i], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(engine.k_cache[:, i, :, : len(p)], alone[2 * i + 1], rtol=1e-4, atol=1e-4)
        assert engine.host_pos[i] == len(p)
    # the same prompts again, each continued by a chunk of its own length from where the first part ended
    tails = [_prompt(rng, n) for n in (9, 2, 30, 11)]
    calls.clear()
    cont = engine.prefill([0, 1, 2, 3], tails, [len(p) for p in prompts])
    for i, (p, t) in enumerate(zip(prompts, tails)):
        torch.testing.assert_close(cont[i : i + 1], engine.prefill([i], [p + t]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_long_prompt_joins_in_chunks_while_the_live_rows_decode(engine, pipeline):
    rng = random.Random(1)
    specs = _long_joiner_specs(rng)
    arrivals = {0: (0, 1, 2), 3: (3,), 4: (4, 5)}
    plain, _, _ = _run(engine, specs, arrivals, pipeline)
    chunked, trace, _ = _run(engine, specs, arrivals, pipeline, step_tokens=24, chunk_tokens=16)
    assert chunked == plain
    for rid, p, n, c in specs:
        assert chunked[rid] == _alone(engine, Request(rid, p, n, c, seed=7 + rid)), rid
    joining_steps = [t for t in trace if 3 in t[0]]
    assert len(joining_steps) >= 150 // 16  # the long prompt took several steps...
    for joining, before, got in joining_steps:  # ...in each of which every live row got its token
        assert set(before) <= set(got), (joining, before, got)
    # rows behind the long one wait for it (arrival order), then join
    first = {rid: next(i for i, t in enumerate(trace) if rid in t[2]) for rid in (3, 4, 5)}
    assert first[3] <= first[4] and first[3] <= first[5]


def test_a_budget_per_step_bounds_the_prefill_tokens(engine, monkeypatch):
    calls: list[int] = []
    prefill = FastEngine.prefill

    def spy(self, slots, prompts, starts=None):
        calls.append(sum(len(p) for p in prompts))
        return prefill(self, slots, prompts, starts)

    monkeypatch.setattr(FastEngine, "prefill", spy)
    rng = random.Random(2)
    specs = [(0, _prompt(rng, 5), 30, SamplingConfig()), (1, _prompt(rng, 5), 30, SamplingConfig()),
             (2, _prompt(rng, 100), 4, SamplingConfig())]  # fmt: skip
    out, _, _ = _run(engine, specs, {0: (0, 1), 2: (2,)}, step_tokens=12)
    assert max(calls[1:]) <= 12 - 2 and sum(calls) == 110  # two rows decode: 10 prompt tokens a step
    monkeypatch.setattr(FastEngine, "prefill", prefill)
    for rid, p, n, c in specs:
        assert out[rid] == _alone(engine, Request(rid, p, n, c)), rid


def test_a_joining_row_that_leaves_mid_prompt_frees_its_slot(engine):
    rng = random.Random(3)
    specs = _long_joiner_specs(rng)
    arrivals = {0: (0, 1, 2), 3: (3,), 4: (4, 5)}
    full, _, _ = _run(engine, specs, arrivals, step_tokens=24, chunk_tokens=16)
    left, trace, _ = _run(engine, specs, arrivals, step_tokens=24, chunk_tokens=16, leave=(5, 3))
    assert 3 in trace[4][0] and left[3] == []  # it was still joining when it left: no token
    assert {k: v for k, v in left.items() if k != 3} == {k: v for k, v in full.items() if k != 3}


def test_budget_must_leave_room_for_prefill(engine):
    with pytest.raises(ValueError, match="leaves no prefill"):
        RowScheduler(engine, step_tokens=engine.max_batch)


# ---- the prefix cache ----


def _shared_specs(rng, prefix_len=40):
    shared = _prompt(rng, prefix_len)
    other = _prompt(rng, 19)
    specs = []
    for i in range(8):
        base = shared if i % 4 else other
        specs.append((i, base + _prompt(rng, rng.randint(1, 12)), rng.randint(3, 10), SamplingConfig()))
    specs.append((8, shared, 5, SamplingConfig()))  # the prefix itself: only its full blocks before its last token
    specs.append((9, shared[:3], 5, SamplingConfig()))  # shorter than a block
    return specs


@pytest.mark.parametrize("chunked", [False, True])
def test_cached_prefixes_give_the_tokens_computed_ones_give(engine, chunked):
    rng = random.Random(4)
    specs = _shared_specs(rng)
    arrivals = {0: (0, 1, 2), 1: (3,), 6: (4, 5, 6), 12: (7, 8, 9)}  # rows 1-2 share their prefix in one step
    kw = {"step_tokens": 20, "chunk_tokens": 12} if chunked else {}  # the prefix (40) is longer than a chunk
    off, _, _ = _run(engine, specs, arrivals, **kw)
    cache = PrefixCache(engine, 1 << 22, block=BLOCK)
    on, _, _ = _run(engine, specs, arrivals, prefix_cache=cache, **kw)
    assert on == off
    for rid, p, n, c in specs:
        assert on[rid] == _alone(engine, Request(rid, p, n, c)), rid
    st = cache.stats()
    assert st["hits"] >= 4 and st["misses"] >= 3 and st["hits"] + st["misses"] == len(specs)
    assert st["hit_tokens"] >= 4 * 40 // BLOCK * BLOCK and st["evictions"] == 0
    assert 0 < st["bytes"] <= st["capacity_bytes"] and st["bytes"] % cache.page_bytes == 0


def test_a_cache_hit_computes_only_the_rest(engine, monkeypatch):
    rng = random.Random(5)
    prefix = _prompt(rng, 33)
    a, b = prefix + _prompt(rng, 4), prefix + _prompt(rng, 6)
    cache = PrefixCache(engine, 1 << 22, block=BLOCK)
    computed: list[int] = []
    prefill = FastEngine.prefill
    monkeypatch.setattr(FastEngine, "prefill", lambda self, s, p, st=None: (computed.append(sum(map(len, p))),
                                                                           prefill(self, s, p, st))[1])  # fmt: skip
    out, _, _ = _run(engine, [("a", a, 4, SamplingConfig()), ("b", b, 4, SamplingConfig())], {0: ("a",), 3: ("b",)},
                     prefix_cache=cache)  # fmt: skip
    assert computed == [len(a), len(b) - 32]  # 4 blocks of 8 copied, the rest computed
    assert cache.stats()["hit_tokens"] == 32
    monkeypatch.setattr(FastEngine, "prefill", prefill)
    assert out["b"] == _alone(engine, Request("b", b, 4))


def test_eviction_under_pressure_keeps_the_tokens_and_the_bound(engine):
    rng = random.Random(6)
    prefixes = [_prompt(rng, 24) for _ in range(5)]
    specs = []
    for i in range(15):  # prefixes come back after the others' blocks pushed some of theirs out
        p = prefixes[i % 3] + _prompt(rng, rng.randint(1, 9))
        specs.append((i, p, rng.randint(2, 6), SamplingConfig()))
    arrivals = {2 * i: (i,) for i in range(15)}
    off, _, _ = _run(engine, specs, arrivals)
    probe = PrefixCache(engine, 1 << 20, block=BLOCK)
    cache = PrefixCache(engine, 7 * probe.page_bytes, block=BLOCK)  # 7 blocks; each prompt brings 3 or 4
    on, _, _ = _run(engine, specs, arrivals, prefix_cache=cache, step_tokens=16, chunk_tokens=8)
    assert on == off
    st = cache.stats()
    assert st["evictions"] > 0 and st["hits"] > 0 and st["bytes"] <= st["capacity_bytes"] == 7 * cache.page_bytes
    assert len(cache._index) == len(cache._lru) <= 7


def test_the_automatic_size_is_a_quarter_of_the_free_memory_up_to_its_cap():
    assert auto_capacity(8 << 30) == 2 << 30
    assert auto_capacity(64 << 30) == AUTO_MAX_BYTES == 4 << 30
    assert auto_capacity(0) == 0 and auto_capacity(-1) == 0


def test_eviction_takes_the_least_recent_chain_from_its_tail(engine):
    """Unit level: the LRU order keeps a chain's first blocks longer than its last ones, and a recently used prefix
    survives one that was not used since."""
    cache = PrefixCache(engine, 4 * PrefixCache(engine, 1 << 20, block=4).page_bytes, block=4)
    a, b, c = tuple(range(100, 113)), tuple(range(200, 209)), tuple(range(300, 309))  # 3, 2 and 2 full blocks
    engine.prefill([0, 1, 2], [a, b, c])
    cache.insert([(0, a)])
    assert cache.stats()["bytes"] == 3 * cache.page_bytes
    cache.insert([(1, b)])  # 4 pages: b's second block evicts a's last
    assert cache.stats()["evictions"] == 1
    assert cache.load(3, b) == 8 and cache.load(3, a) == 8  # a kept its head; now b is the least recent
    cache.insert([(2, c)])  # c's 2 blocks evict b's
    assert cache.stats()["evictions"] == 3
    assert cache.load(3, b) == 0 and cache.load(3, c) == 8 and cache.load(3, a) == 8
    torch.testing.assert_close(engine.k_cache[:, 3, :, :8], engine.k_cache[:, 0, :, :8])
    for s in range(4):
        engine.release(s)


def test_rows_inserted_together_are_cached_as_if_one_by_one(engine):
    """A step's rows go into the cache in one call (one gather and one copy each for K and V): the same blocks, pages
    and contents as inserting them one at a time, also when a later row evicts an earlier row's new block before
    the copy, and when two rows of the call share a prefix."""
    page = PrefixCache(engine, 1 << 20, block=4).page_bytes
    a, b = tuple(range(100, 113)), tuple(range(200, 209))  # 3 and 2 full blocks
    c = a[:8] + (7, 7, 7, 7, 9)  # a's first two blocks, then one of its own
    engine.prefill([0, 1, 2], [a, b, c])

    def cached(cache):
        return {key: (cache.k[:, :, blk.page * 4 : blk.page * 4 + 4].clone(), cache.v[:, :, blk.page * 4 : blk.page * 4 + 4].clone())
                for key, blk in cache._index.items()}  # fmt: skip

    for pages in (8, 4):  # room for all; then b's blocks evict a's tail within the call
        together, alone = PrefixCache(engine, pages * page, block=4), PrefixCache(engine, pages * page, block=4)
        together.insert([(0, a), (1, b), (2, c)])
        for row in ((0, a), (1, b), (2, c)):
            alone.insert([row])
        want, got = cached(alone), cached(together)
        assert got.keys() == want.keys() and together.stats() == alone.stats()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
        assert together.load(3, c) == alone.load(3, c)
    for s in range(4):
        engine.release(s)


# ---- steps to a first token ----


def _steps(reqs):
    return {r.rid: (r.wait_steps, r.prefill_steps) for r in reqs}


def test_a_cache_hit_gets_its_first_token_in_the_step_that_admits_it(engine):
    """The bound, in steps: a joiner is admitted by the first step after it arrives (a slot is free), and a
    prefix-cache hit whose rest fits the step's budget gets its first token read in that same step, beside live rows
    that keep decoding; a miss whose prompt needs several chunks takes one step per chunk."""
    rng = random.Random(7)
    prefix = _prompt(rng, 48)
    cache = PrefixCache(engine, 1 << 22, block=BLOCK)
    sched = RowScheduler(engine, step_tokens=24, chunk_tokens=16, prefix_cache=cache)
    seed = Request("seed", prefix + _prompt(rng, 3), 40)
    live = Request("live", _prompt(rng, 5), 40)
    sched.add(seed)
    sched.add(live)
    for _ in range(3):
        sched.step()
    assert seed.first_step is not None and not sched.joining  # the prefix is in the cache, both rows decode
    hit = Request("hit", prefix + _prompt(rng, 6), 5)  # 48 cached tokens, 6 to compute: one chunk
    miss = Request("miss", _prompt(rng, 40), 5)  # 40 tokens: three chunks of at most 16 (22 left beside 2 rows)
    sched.add(hit)
    got = []
    sched.step()
    got.append([e.req.rid for e in sched.emitted])
    assert hit.cached == 48 and _steps([hit]) == {"hit": (0, 1)}
    assert set(got[0]) == {"seed", "live", "hit"}  # the live rows' tokens and the hit's first token, one read
    sched.add(miss)
    while not sched.idle:
        sched.step()
    assert _steps([miss]) == {"miss": (0, 3)}
    assert hit.tokens == _alone(engine, Request("hit", hit.prompt, 5))
    assert miss.tokens == _alone(engine, Request("miss", miss.prompt, 5))


def test_a_joiner_waits_only_for_a_slot(engine):
    """With every slot taken, a joiner is admitted by the step after the one that frees a slot, and waits that many
    steps; steps are counted from the step it was added before."""
    rng = random.Random(8)
    sched = RowScheduler(engine)
    rows = [Request(i, _prompt(rng, 4), 3 + i) for i in range(engine.max_batch)]
    for r in rows:
        sched.add(r)
    late = Request("late", _prompt(rng, 7), 2)
    sched.step()
    sched.add(late)
    while late.admitted_step is None:
        sched.step()
    ended = min(r.first_step + r.max_new_tokens - 1 for r in rows)  # the step that read a row's last token
    assert late.queued_step == 1 and late.admitted_step == ended + 1 and late.wait_steps == ended
    assert all(_steps([r])[r.rid] == (0, 1) for r in rows)
    while not sched.idle:
        sched.step()
    assert late.prefill_steps == 1 and late.tokens == _alone(engine, Request("late", late.prompt, 2))
