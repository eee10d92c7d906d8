"""The fast engine against transformers on the same weights (CPU, fp32): logits, greedy tokens, the slot API,
sampling semantics. Two models: the embedded tiny one (power-of-two heads) and a random one built here with 6 heads
(ALiBi's extra slopes) and an odd vocabulary (the padded vocab-parallel head when split)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from bloom_server.fast.engine import FastEngine, seq_bucket
from bloom_server.fast.model import alibi_slopes
from bloom_server.fast.sampling import SamplingConfig
from bloom_server.fast.shapes import BloomShape
from bloom_server.fast.weights import from_checkpoint, from_state_dict, random_weights

PROMPTS = [[5, 17, 99, 4, 300, 8, 1], [42], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [1000, 3, 77]]
PAD = 3


def build_random_bloom(out_dir: Path, *, vocab=1001, hidden=96, layers=3, heads=6, seed=1) -> Path:
    """A random BLOOM checkpoint (safetensors) of a shape the tiny model does not cover."""
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(
        vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads, initializer_range=0.3,
        bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = BloomForCausalLM(config).eval()
    with torch.no_grad():  # transformers zeroes biases and sets LN to 1: random ones test that they are read
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name or "ln_f" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory) -> Path:
    return build_random_bloom(tmp_path_factory.mktemp("models") / "random-bloom")


@pytest.fixture(scope="module", params=["tiny", "random"])
def pair(request, tiny_model_dir, random_dir):
    """(engine, transformers model) on the same checkpoint."""
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir if request.param == "tiny" else random_dir
    shape = BloomShape.from_dir(path)
    engine = FastEngine(from_checkpoint(path, shape, dtype=torch.float32), shape, max_batch=6, max_seq=96)
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    return engine, hf


def left_pad(rows):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def hf_generate(hf, rows, new, **kw):
    ids, mask = left_pad(rows)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, pad_token_id=PAD, **kw)
    return out[:, ids.shape[1] :].tolist()


def test_alibi_slopes_match_transformers():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    for heads in (1, 4, 6, 12, 32, 112):
        ref = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), heads, torch.float32)[:, 0, 1]
        assert torch.equal(alibi_slopes(heads), ref), heads


def test_seq_buckets_cover_the_need_and_stay_under_max():
    for need in (1, 63, 64, 65, 200, 257, 1000, 2048):
        b = seq_bucket(need, 2048)
        assert need <= b <= 2048 and (b - need < 256 or b <= 2 * need)
    assert seq_bucket(100, 96) == 96


def test_prompt_logits_match_transformers(pair):
    engine, hf = pair
    logits = engine.forward_logits(PROMPTS)
    with torch.no_grad():
        for i, row in enumerate(PROMPTS):
            ref = hf(input_ids=torch.tensor([row])).logits[0]
            got = logits[i, : len(row)]
            assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


def test_greedy_batch_of_mixed_lengths_equals_transformers_token_for_token(pair):
    engine, hf = pair
    new = 24
    ours = engine.generate(PROMPTS, new, SamplingConfig()).tokens
    ref = hf_generate(hf, PROMPTS, new, min_new_tokens=new, do_sample=False)
    assert ours == ref


def test_each_decode_steps_logits_match_transformers(pair):
    """The cached decode path, step by step, against transformers' scores for the same left-padded batch."""
    engine, hf = pair
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                          pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)  # fmt: skip
    slots = list(range(len(PROMPTS)))
    logits = engine.prefill(slots, PROMPTS)
    for t, ref in enumerate(out.logits):
        assert torch.allclose(logits, ref, atol=1e-4, rtol=1e-4), (t, (logits - ref).abs().max())
        chosen = torch.argmax(logits, -1)
        assert chosen.tolist() == out.sequences[:, ids.shape[1] + t].tolist()
        engine.decode(slots, chosen)
        logits = engine.last_logits.clone()
    for s in slots:
        engine.release(s)


def test_any_slots_equal_the_prefix_slots(pair):
    """The eager gather path (slots 4 and 1) gives what the fast prefix path (slots 0 and 1) gives."""
    engine, _ = pair
    rows = [PROMPTS[0], PROMPTS[2]]
    ref = engine.generate(rows, 10, SamplingConfig()).tokens
    slots = [4, 1]
    first = torch.argmax(engine.prefill(slots, rows), -1)
    got = [first.tolist()]
    tok = first
    for _ in range(9):
        tok = engine.decode(slots, tok).clone()
        got.append(tok.tolist())
    assert [list(col) for col in zip(*got)] == ref
    for s in slots:
        engine.release(s)


def test_a_row_joins_mid_decode_and_a_moved_row_continues(pair):
    """Continuous batching at the slot level: B joins while A is decoding; then A leaves and B is moved to slot 0.
    Each row's tokens are what it gets alone."""
    engine, _ = pair
    a, b = PROMPTS[0], PROMPTS[2]
    alone_a = engine.generate([a], 12, SamplingConfig()).tokens[0]
    alone_b = engine.generate([b], 12, SamplingConfig()).tokens[0]
    got_a = [int(torch.argmax(engine.prefill([0], [a]), -1))]
    engine.tok[0] = got_a[0]
    for _ in range(4):
        got_a.append(int(engine.decode([0])[0]))
    got_b = [int(torch.argmax(engine.prefill([1], [b]), -1))]
    engine.tok[1] = got_b[0]
    for _ in range(7):
        nxt = engine.decode([0, 1]).tolist()
        got_a.append(nxt[0])
        got_b.append(nxt[1])
    assert got_a == alone_a
    engine.release(0)
    engine.move(1, 0)
    for _ in range(4):
        got_b.append(int(engine.decode([0])[0]))
    assert got_b == alone_b
    engine.release(0)


def test_repetition_penalty_and_min_length_match_transformers(pair):
    engine, hf = pair
    rows = [PROMPTS[0], PROMPTS[3][:2] + [9, 9, 9, 9, 9]]  # same length: penalties see no padding
    cfg = SamplingConfig.from_generate_kwargs(
        {"repetition_penalty": 1.8, "min_length": 20}, eos_token_id=2, prompt_width=7
    )
    assert not cfg.uses_transformers and cfg.min_new_tokens == 13
    ours = engine.generate(rows, 16, cfg).tokens
    ref = hf_generate(hf, rows, 16, repetition_penalty=1.8, min_length=20, eos_token_id=2, do_sample=False)
    assert [r[: len(o)] for r, o in zip(ref, ours)] == ours and len(ours[0]) == len(ref[0])


def test_rare_settings_go_through_transformers_processors(pair):
    engine, hf = pair
    rows = [PROMPTS[0]]
    cfg = SamplingConfig.from_generate_kwargs({"no_repeat_ngram_size": 2}, eos_token_id=None, prompt_width=7)
    assert cfg.uses_transformers
    ours = engine.generate(rows, 20, cfg).tokens
    ref = hf_generate(hf, rows, 20, no_repeat_ngram_size=2, min_new_tokens=20, do_sample=False)
    assert ours == ref


def test_eos_stops_every_row_and_rows_are_cut_by_the_caller(pair):
    engine, _ = pair
    greedy = engine.generate(PROMPTS, 40, SamplingConfig()).tokens
    eos = greedy[0][5]  # a token row 0 emits: make it the EOS
    cfg = SamplingConfig(eos_ids=(eos,))
    got = engine.generate(PROMPTS, 40, cfg).tokens
    for g, full in zip(got, greedy):
        assert g == full[: len(g)]  # the same tokens until it stopped
    assert eos in got[0][:6]


def test_sampling_is_seeded_and_honours_top_k_and_top_p(pair):
    engine, _ = pair
    sample = SamplingConfig(do_sample=True, temperature=1.5, top_k=0)
    a = engine.generate(PROMPTS, 16, sample, seed=7).tokens
    b = engine.generate(PROMPTS, 16, sample, seed=7).tokens
    c = engine.generate(PROMPTS, 16, sample, seed=8).tokens
    assert a == b and a != c
    greedy = engine.generate(PROMPTS, 16, SamplingConfig()).tokens
    assert engine.generate(PROMPTS, 16, SamplingConfig(do_sample=True, top_k=1), seed=3).tokens == greedy
    assert engine.generate(PROMPTS, 16, SamplingConfig(do_sample=True, top_p=1e-6), seed=3).tokens == greedy


def test_top_k_and_top_p_keep_what_transformers_keeps():
    """The masks, on random scores, against transformers' own warpers."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from bloom_server.fast.sampling import Sampler

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 300, generator=gen) * 3
    for k, p in ((10, 1.0), (0, 0.8), (40, 0.5)):
        s = Sampler(SamplingConfig(do_sample=True, top_k=k, top_p=p), [[1]] * 5, vocab_size=300, device="cpu")
        ours = torch.isfinite(s._process(scores.clone(), 0))
        ref = scores.clone()
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        assert torch.equal(ours, torch.isfinite(ref)), (k, p)


def test_sampling_defaults_follow_transformers():
    cfg = SamplingConfig.from_generate_kwargs({"do_sample": True}, eos_token_id=2, prompt_width=3)
    assert cfg.top_k == 50 and cfg.temperature == 1.0  # transformers' GenerationConfig default
    greedy = SamplingConfig.from_generate_kwargs({"temperature": 0.5, "min_length": 2}, eos_token_id=2, prompt_width=3)
    assert greedy.plain_greedy and greedy.min_new_tokens == 0


def test_nll_matches_transformers(pair):
    engine, hf = pair
    cond, resp = [[5, 17, 99], [42, 43]], [[4, 300, 8], [7, 8, 9, 10]]
    ours = engine.nll(cond, resp)
    losses, count = 0.0, 0
    with torch.no_grad():
        for c, r in zip(cond, resp):
            logits = hf(input_ids=torch.tensor([c + r])).logits[0]
            lp = torch.log_softmax(logits[len(c) - 1 : len(c) + len(r) - 1], -1)
            losses += -lp[torch.arange(len(r)), torch.tensor(r)].sum().item()
            count += len(r)
    assert math.isclose(ours, losses / count, rel_tol=1e-4)


def test_weights_from_a_state_dict_share_storage_and_random_weights_are_seeded(random_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(random_dir, torch_dtype=torch.float32)
    shape = BloomShape.from_dir(random_dir)
    w = from_state_dict(hf.state_dict(), shape)
    assert w.emb.data_ptr() == hf.transformer.word_embeddings.weight.data_ptr()  # no copy for one rank
    r1 = random_weights(shape, dtype=torch.float32, seed=3)
    r2 = random_weights(shape, dtype=torch.float32, seed=3)
    assert torch.equal(r1.layers[1].qkv_w, r2.layers[1].qkv_w)
    assert not torch.equal(r1.layers[0].qkv_w, r1.layers[1].qkv_w)
    assert bool((r1.layers[0].fc2_b != 0).all()) and bool((r1.lnf_w != 0).all())
    assert r1.nbytes() == 4 * shape.params()


def test_min_length_suppresses_eos_inside_the_captured_step(pair):
    """min_length with an EOS the model wants early: the plain greedy path (the step's own argmax) must hold EOS
    back exactly as transformers does, and stop rows at it after."""
    from bloom_server.backends.base import cut_rows

    engine, hf = pair
    greedy = engine.generate(PROMPTS, 30, SamplingConfig()).tokens
    eos = greedy[0][3]
    width = max(map(len, PROMPTS))
    cfg = SamplingConfig.from_generate_kwargs({"min_length": width + 12}, eos_token_id=eos, prompt_width=width)
    assert cfg.plain_greedy and cfg.min_new_tokens == 12
    ours = cut_rows(engine.generate(PROMPTS, 30, cfg).tokens, (30,) * 4, {eos})
    ref = cut_rows(hf_generate(hf, PROMPTS, 30, min_length=width + 12, eos_token_id=eos, do_sample=False), (30,) * 4,
                   {eos})  # fmt: skip
    assert ours == ref
    assert eos not in ours.token_ids[0][:12]


# ---- decode fusion (fast/model.py's FUSE_VARIANTS): the fused path against the unfused math ----


def test_fusion_names_parse_and_unknown_ones_are_refused():
    from typing import get_args

    from bloom_server.fast.fusion import FUSE_VARIANTS, parse_fuse
    from bloom_server.settings import Settings

    literal = get_args(Settings.model_fields["fast_decode"].annotation)[0]  # the setting's names are the variants
    assert set(get_args(literal)) == set(FUSE_VARIANTS)
    assert parse_fuse("base") == frozenset()
    assert parse_fuse("triton_head") == frozenset(FUSE_VARIANTS["triton_head"])
    for gone in ("eager", "triton_ln", "compile", "tgemv,nonsense"):
        with pytest.raises(ValueError):
            parse_fuse(gone)


TRITON_CHECK = r"""
import torch, torch.nn.functional as F
from bloom_server.fast import triton_kernels as tk
from bloom_server.fast.engine import FastEngine
from bloom_server.fast.shapes import BloomShape
from bloom_server.fast.weights import random_weights
g = torch.Generator().manual_seed(0)
h = lambda *s: torch.randn(*s, generator=g).half()
for M in (1, 3):
    x, w, b, r, lw, lb = h(M, 96), h(80, 96) * 0.1, h(80), h(M, 80), 1 + 0.1 * h(96), 0.1 * h(96)
    lin = F.linear(x, w, b)
    assert torch.equal(tk.gemv(x, w, b), lin)
    assert torch.equal(tk.gemv(x, w, b, epilogue="gelu"), F.gelu(lin, approximate="tanh"))
    assert torch.equal(tk.gemv(x, w, b, epilogue="residual", residual=r), lin + r)
    assert torch.equal(tk.gemv(x, w, b, ln=(lw, lb, 1e-5)), F.linear(F.layer_norm(x, (96,), lw, lb, 1e-5), w, b))
shape = BloomShape(vocab_size=301, hidden_size=64, n_layer=1, n_head=4)
wts = random_weights(shape, None, dtype=torch.float16, device=torch.device("cpu"), seed=0)
prompts = [[5, 17, 99, 4, 30], [42, 7]]
out = {}
for v in ("base", "triton_head"):
    e = FastEngine(wts, shape, max_batch=2, max_seq=16)
    e.model.set_fuse(v)
    assert e.model._triton == (v != "base")
    out[v] = (e.generate(prompts, 3).tokens, e.last_logits.float(), e.k_cache.clone(), e.v_cache.clone())
for v in ("triton_head",):
    assert out[v][0] == out["base"][0], v
    assert (out[v][1] - out["base"][1]).abs().max() <= 1e-2, v
    assert torch.equal(out[v][2], out["base"][2]) and torch.equal(out[v][3], out["base"][3]), v
# The fused attention of a wide batch of mixed lengths (more rows than a GEMV program holds, each row reading its own
# keys only) against the eager chain over the whole bucket; then a whole engine forced onto it at every length.
import math, types
from bloom_server.fast import model as fm
hp, D, B, S = 4, 16, 20, 48
m = types.SimpleNamespace(hp=hp, D=D, inv_norm=1 / math.sqrt(D), heads=torch.arange(hp), slopes=fm.alibi_slopes(hp),
                          dtype=torch.float16, device=torch.device("cpu"))
m._attend = lambda q, k, v, b: fm.BloomRankModel._attend(m, q, k, v, b)
pos = torch.tensor([(7 * i) % S for i in range(B)])
qkv, kc, vc = h(B, hp * 3 * D), h(B, hp, S, D), h(B, hp, S, D)
k1, v1, k2, v2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
ref = fm.BloomRankModel._decode_attend(m, qkv, k1, v1, fm.BloomRankModel.decode_bias(m, pos, S), torch.arange(B), pos, S, True)
got = tk.decode_attention(qkv, k2, v2, pos, m.slopes, S, m.inv_norm, hp, D)
assert torch.equal(k1, k2) and torch.equal(v1, v2)
assert (got.float() - ref.float()).abs().max() <= 2e-3, (got.float() - ref.float()).abs().max()
fm.ATTN_MAX_KEYS, fm.ATTN_WIDE_PROGRAMS = 0, 8  # 2 rows x 4 heads: wide, so fused at every key length
e = FastEngine(wts, shape, max_batch=2, max_seq=16)
e.model.set_fuse("triton_head")
calls = []
real = tk.decode_attention
tk.decode_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
assert e.generate(prompts, 3).tokens == out["base"][0]
assert calls, "the wide batch did not take the fused attention"
# The kernel plan (what precompile and the kernel seed compile) is the model's own calls: one generate of a
# triton_head engine with its gemv calls recorded, against decode_plan for the same shape and limits.
from bloom_server.fast.fusion import FUSE_VARIANTS
seen, real_gemv = set(), tk.gemv
def record(x, w, b, ln=None, epilogue=None, residual=None, scale=None):
    seen.add((w.shape[0], w.shape[1], epilogue, ln is not None))
    return real_gemv(x, w, b, ln=ln, epilogue=epilogue, residual=residual, scale=scale)
tk.gemv = record
e = FastEngine(wts, shape, max_batch=2, max_seq=16)
e.model.set_fuse("triton_head")
e.generate(prompts, 3)
tk.gemv = real_gemv
plan = tk.decode_plan(hidden=64, n_head=4, vocab_size=301, world=1, dtype="float16", max_batch=2, max_seq=16,
                      fuse=frozenset(FUSE_VARIANTS["triton_head"]))
assert seen == {(g.N, g.K, g.epilogue, g.ln) for g in plan.gemvs}, (seen, plan.gemvs)
print("ok")
"""


def test_triton_kernels_equal_the_eager_math_in_the_interpreter():
    """The Triton paths (fp16) against the eager ops on CPU, under TRITON_INTERPRET=1 (where triton is installed):
    each GEMV epilogue bit for bit, and a whole engine's tokens, logits and K/V cache."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
