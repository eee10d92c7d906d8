"""The constrained rows' masks: llguidance's parallel fill gives exactly the masks of a one-row-at-a-time fill, in every
state a walk through the grammars reaches; and the continuous batcher's constrained rows get the same tokens pipelined
(masks filled while the decode runs) as not."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
llguidance = pytest.importorskip("llguidance")
import llguidance.torch as llg_torch

from bloom_server import structured
from bloom_server.types import Grammar

FIXTURES = Path(__file__).parent / "fixtures" / "structured"
EOS = 2
BOUNDED = {  # the grammar engine's costly case: strings under maxLength / pattern / format
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 20},
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["title", "code", "tags"],
    "additionalProperties": False,
}


def _grammars_list() -> list[Grammar]:
    schemas = [entry["schema"] for entry in json.loads((FIXTURES / "schemas.json").read_text())[:6]]
    regexes = json.loads((FIXTURES / "regexes.json").read_text())[:4]
    out = [Grammar("json_schema", json.dumps(s, sort_keys=True)) for s in [BOUNDED, *schemas]]
    return [*out, *(Grammar("regex", r) for r in regexes), Grammar("json_object", "")]


@pytest.fixture(scope="module")
def grammars(tiny_model_dir):
    return structured.Grammars.for_model(tiny_model_dir, (EOS,))


def _allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    shifts = torch.arange(32, dtype=torch.int32)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).view(bitmask.shape[0], -1)[:, :vocab].bool()


def _masks_as_alone(rows, alone: dict, keys: list, vocab: int) -> torch.Tensor:
    """The rows' masks filled together, checked equal, bit for bit, to each matcher in `alone` filled on its own."""
    par = rows.masks(keys)
    one = torch.empty((len(keys), structured.bitmask_words(vocab)), dtype=torch.int32)
    for j, k in enumerate(keys):
        llg_torch.fill_next_token_bitmask(alone[k], one, j)
    assert torch.equal(par, one)
    return par


def test_apply_bitmask_blocks_exactly_the_zero_bits_in_place():
    """Token t is bit t % 32 of word t // 32: every row (rows None) or the given rows get -inf exactly where their
    bit is 0, other rows untouched; the vocabulary need not fill the last word."""
    gen = torch.Generator().manual_seed(3)
    vocab, words = 250, structured.bitmask_words(250)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), generator=gen, dtype=torch.int32)
    logits = torch.randn(5, vocab, generator=gen)
    want = torch.tensor([[(int(bitmask[r, t // 32]) >> (t % 32)) & 1 for t in range(vocab)] for r in range(3)]).bool()
    assert torch.equal(structured.allowed_tokens(bitmask, vocab), want)
    every = logits[:3].clone()
    structured.apply_bitmask(every, None, bitmask)
    assert torch.equal(every, logits[:3].masked_fill(~want, float("-inf")))
    some = logits.clone()
    structured.apply_bitmask(some, torch.tensor([4, 1, 2]), bitmask)
    assert torch.equal(some[[4, 1, 2]], logits[[4, 1, 2]].masked_fill(~want, float("-inf")))
    assert torch.equal(some[[0, 3]], logits[[0, 3]])


def test_parallel_fill_equals_per_row_fill(grammars):
    """Rows under different grammars, each walked by seeded random allowed tokens; at every step the masks filled all
    rows at once (in parallel, on llguidance's threads) equal each row's own fill, bit for bit."""
    usable = [g for g in _grammars_list() if not grammars.compiled(g)[1]]
    assert len(usable) >= 8
    rows = structured.RowMatchers(grammars)
    alone = {}  # the same rows' matchers, driven one at a time
    n = 24
    for i in range(n):
        g = usable[i % len(usable)]
        rows.add(i, g)
        alone[i] = grammars.matcher(g)
    rng = random.Random(0)
    steps_compared = 0
    for _ in range(40):
        keys = rows.active(list(range(n)))
        if not keys:
            break
        par = _masks_as_alone(rows, alone, keys, grammars.vocab_size)
        steps_compared += 1
        allowed = _allowed(par, grammars.vocab_size)
        fed = []
        for j, k in enumerate(keys):
            ids = allowed[j].nonzero().flatten().tolist()
            assert ids, f"row {k}: a mask that allows nothing"
            free = [t for t in ids if t != EOS]
            fed.append((k, rng.choice(free if free and rng.random() < 0.9 else ids)))
        rows.advance(fed)
        for k, t in fed:
            m = alone[k]
            if not m.is_stopped():
                m.consume_token(t)
    assert steps_compared >= 10
    assert rows.fill_s > 0


def test_rows_of_one_grammar_copy_its_kept_matchers_in_turn_and_stay_independent(tiny_model_dir):
    """Rows of one grammar take copies of a few kept matchers (so that the pool fills rows of different kept ones in
    parallel): each row, walked its own way, still has the masks of a matcher compiled for it alone; and the kept
    matchers are bounded by grammars (LRU)."""
    import llguidance

    grammars = structured.Grammars.for_model(tiny_model_dir, (EOS,))
    grammars.templates = 2
    g = Grammar("regex", "[a-z]{1,6}( [a-z]{1,6}){0,4}")
    text, error = grammars.compiled(g)
    assert not error
    rows = structured.RowMatchers(grammars)
    alone = {}
    for i in range(5):
        rows.add(i, g)
        alone[i] = llguidance.LLMatcher(grammars.tokenizer, text)
    rng = random.Random(1)
    for _ in range(6):
        keys = rows.active(list(range(5)))
        if not keys:
            break
        par = _masks_as_alone(rows, alone, keys, grammars.vocab_size)
        allowed = _allowed(par, grammars.vocab_size)
        fed = [(k, rng.choice(allowed[j].nonzero().flatten().tolist())) for j, k in enumerate(keys)]
        rows.advance(fed)
        for k, t in fed:
            if not alone[k].is_stopped():
                alone[k].consume_token(t)
    assert len(grammars._templates[g][0]) == 2  # two compiles for five rows
    for i in range(structured.TEMPLATE_GRAMMARS + 3):
        grammars.matcher(Grammar("regex", f"[0-9]{{{i + 1}}}"))
    assert len(grammars._templates) == structured.TEMPLATE_GRAMMARS and g not in grammars._templates


def test_advance_marks_refused_and_stopped_rows_done(grammars):
    g = Grammar("regex", "ab")
    rows = structured.RowMatchers(grammars)
    for k in ("ok", "bad", "end"):
        rows.add(k, g)
    tok = grammars.tokenizer
    a, b = tok.tokenize_str("a")[0], tok.tokenize_str("b")[0]
    rows.advance([("ok", a), ("bad", b), ("end", a), ("unknown", a)])
    assert rows.done == {"bad"}
    rows.advance([("ok", b), ("end", b)])
    assert rows.active(["ok", "bad", "end"]) == ["ok", "end"]
    allowed = _allowed(rows.masks(["ok"]), grammars.vocab_size)[0].nonzero().flatten().tolist()
    assert allowed == [EOS]  # the regex is complete: only EOS
    rows.advance([("ok", EOS)])  # a complete grammar's row ends with its EOS: no mask applies after it
    assert rows.done == {"bad", "ok"} and rows.active(["ok", "end"]) == ["end"]


# A regex that compiles, yet whose matchers exceed the grammar engine's lexer limit once generation starts.
GIVES_UP = Grammar("regex", "a{1000000}")


def test_a_matcher_the_engine_gives_up_on_is_failed_not_finished(grammars):
    """Its mask lets only EOS through, as a finished grammar's does: the row is marked failed, with the engine's
    reason, so that its EOS is not taken for a complete answer. A grammar that goes on is not."""
    grammars.check(GIVES_UP, "grammar")  # passes: the limit is reached past the check's probe (the first mask)
    rows = structured.RowMatchers(grammars)
    rows.add("gives up", GIVES_UP)
    rows.add("fine", Grammar("regex", "[0-9]{3}"))
    first = _allowed(rows.masks(["gives up", "fine"]), grammars.vocab_size)
    assert not rows.failed and first[0].any() and not first[0][EOS]
    rows.advance([("gives up", int(first[0].nonzero()[-1])), ("fine", int(first[1].nonzero()[0]))])
    allowed = _allowed(rows.masks(["gives up", "fine"]), grammars.vocab_size)
    assert allowed[0].nonzero().flatten().tolist() == [EOS]
    assert set(rows.failed) == {"gives up"} and "lexer" in rows.failed["gives up"]
    assert rows.active(["gives up", "fine"]) == ["fine"]
    rows.drop("gives up")
    assert not rows.failed


def test_rows_pipelined_and_not_give_the_same_constrained_tokens(tiny_model_dir, grammars):
    from bloom_server.fast.engine import FastEngine
    from bloom_server.fast.rows import Request, RowScheduler
    from bloom_server.fast.sampling import SamplingConfig
    from bloom_server.fast.shapes import BloomShape
    from bloom_server.fast.weights import from_checkpoint

    shape = BloomShape.from_dir(tiny_model_dir)
    engine = FastEngine(from_checkpoint(tiny_model_dir, shape, dtype=torch.float32), shape, max_batch=6, max_seq=96)
    bounded = Grammar("json_schema", json.dumps(BOUNDED, sort_keys=True))
    regex = Grammar("regex", "[a-z]{2,6}( [a-z]{2,6}){0,3}")

    def run(pipeline: bool) -> dict:
        sched = RowScheduler(engine, pipeline=pipeline)
        sched.grammars = grammars
        reqs = []
        for i in range(8):  # more rows than slots: rows join and leave while masks are being filled
            cfg = SamplingConfig(eos_ids=(EOS,)) if i % 3 else SamplingConfig(eos_ids=(EOS,), do_sample=True)
            g = (bounded, regex, None)[i % 3]
            reqs.append(Request(rid=i, prompt=(5 + i, 17, 99), max_new_tokens=30 + i, cfg=cfg, seed=i, grammar=g))
            sched.add(reqs[-1])
        sched.run()
        return {r.rid: (r.tokens, r.finish) for r in reqs}

    piped, plain = run(True), run(False)
    assert piped == plain
    for rid, (tokens, finish) in piped.items():
        if rid % 3 == 2:
            continue
        m = grammars.matcher((bounded, regex)[rid % 3])
        assert all(m.consume_token(t) for t in tokens), rid  # every token the grammar's
        if finish == "eos":
            assert m.is_stopped()
