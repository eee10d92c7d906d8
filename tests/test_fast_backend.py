"""FastBackend through the backend contract, beside HFBackend on the same checkpoint: the same outputs and finish
reasons, the same per-step stream (tokens and log-probabilities) to rank 0's listener, rows stopped by the listener
cut where they stopped, and the call ending early once every row is done."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from bloom_server.runtime.protocol import ForwardBatch, GenerateBatch
from bloom_server.types import FinishReason, RankContext, SamplingParams


class Recorder:
    """The engine's BatchListener interface: records steps; stops the given rows after `stop_after` steps."""

    def __init__(self, top_n=0, stop_rows=(), stop_after=None):
        self.top_n = top_n
        self.steps = []
        self.stop_rows, self.stop_after = frozenset(stop_rows), stop_after

    def on_tokens(self, token_ids, logprobs, top=None):
        self.steps.append((list(token_ids), logprobs, top))

    def stopped_rows(self):
        if self.stop_after is not None and len(self.steps) >= self.stop_after:
            return self.stop_rows
        return frozenset()


@pytest.fixture(scope="module")
def backends(tiny_model_dir):
    from bloom_server.backends.fast import FastBackend
    from bloom_server.backends.hf import HFBackend
    from bloom_server.settings import load_settings
    from bloom_server.storage.model_dir import resolve_model_dir

    md = resolve_model_dir(str(tiny_model_dir))
    out = {}
    for cls, name in ((HFBackend, "hf"), (FastBackend, "fast")):
        s = load_settings(backend=name, max_input_length=32, max_total_tokens=96, max_batch_size=8)
        b = cls(s, md, RankContext())
        b.load()
        out[name] = b
    return out


def batch(rows, new, **kw):
    return GenerateBatch(tuple(map(tuple, rows)), tuple(new), SamplingParams.from_dict(kw), seed=0, pad_token_id=3,
                         eos_token_id=2)  # fmt: skip


ROWS = [[5, 17, 99, 4], [42], [7, 8, 9, 10, 11, 12]]


def test_outputs_and_streams_equal_the_hf_backend(backends):
    b = batch(ROWS, (12, 5, 9), min_length=30)
    got = {}
    for name, backend in backends.items():
        rec = Recorder(top_n=3)
        got[name] = (backend.generate(b, listener=rec), rec)
    (hf_out, hf_rec), (fast_out, fast_rec) = got["hf"], got["fast"]
    assert fast_out == hf_out
    assert fast_out.finish_reasons == (FinishReason.LENGTH,) * 3
    assert len(fast_rec.steps) == len(hf_rec.steps) == 12
    limits = (12, 5, 9)
    for k, ((tok_f, lp_f, top_f), (tok_h, lp_h, top_h)) in enumerate(zip(fast_rec.steps, hf_rec.steps)):
        live = [r for r in range(3) if k < limits[r]]  # past its own limit a row's stream is padding (ignored)
        assert [tok_f[r] for r in live] == [tok_h[r] for r in live]
        assert [lp_f[r] for r in live] == pytest.approx([lp_h[r] for r in live], abs=1e-4)
        assert [[t for t, _ in top_f[r]] for r in live] == [[t for t, _ in top_h[r]] for r in live]


def test_a_stopped_row_is_cut_and_the_call_ends_when_all_are_done(backends):
    fast = backends["fast"]
    rec = Recorder(stop_rows={0, 1, 2}, stop_after=4)
    out = fast.generate(batch(ROWS, (40, 40, 40), min_length=60), listener=rec)
    assert all(len(t) <= 5 for t in out.token_ids) and len(rec.steps) <= 6  # stopped after 4 (one step of lag)
    assert out.finish_reasons == (FinishReason.TIME,) * 3
    alone = fast.generate(batch(ROWS, (40, 40, 40), min_length=60))
    assert all(a[: len(o)] == o for a, o in zip(alone.token_ids, out.token_ids))
    rec = Recorder(stop_rows={1}, stop_after=2)
    out = fast.generate(batch(ROWS, (10, 10, 10), min_length=60), listener=rec)
    assert len(out.token_ids[1]) <= 3 and out.token_ids[0] == alone.token_ids[0][:10]


def test_forward_nll_equals_the_hf_backend(backends):
    fb = ForwardBatch(((5, 17, 99), (42,)), ((4, 300, 8), (7, 8, 9)), 3)
    assert backends["fast"].forward_nll(fb) == pytest.approx(backends["hf"].forward_nll(fb), rel=1e-5)
