"""Weight-only int8 in the fast engine (fast/quant.py): the quantization itself, the int8 engine against a floating
engine on the dequantized weights (equal to rounding: the int8 path adds no error of its own), the quantization error
against the floating engine (forced decoding), the int8 Triton kernel under the interpreter, `bloom-server preshard
--dtype int8` (equal to quantization at load, about half the bytes), and the backend and server at --dtype int8."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from bloom_server.errors import ConfigError
from bloom_server.fast.engine import FastEngine
from bloom_server.fast.quant import dequantize, quantize, quantize_weights
from bloom_server.fast.shapes import BloomShape
from bloom_server.fast.weights import BloomWeights, from_checkpoint, iter_tensors
from bloom_server.types import RankContext
from helpers import ServerProcess, free_port
from test_fast_engine import PROMPTS, build_random_bloom

# Forced decoding (both engines fed the floating engine's greedy tokens): the share of steps whose argmax agrees, and
# the mean relative logit error, at least / at most these on the CPU test models (hidden 64 and 96: short rows are
# the hard case for per-row scales; the GPU script measures the real shapes).
MIN_AGREEMENT = 0.8
MAX_MEAN_REL_ERROR = 0.1


def test_quantize_rows_scales_and_error_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(33, 70, generator=g) * torch.logspace(-3, 1, 33)[:, None]  # rows of very different ranges
    w[5] = 0.0  # an all-zero row (a padded vocabulary row)
    q, s = quantize(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (33,)
    assert int(q.abs().max()) == 127 and q.min() >= -127
    amax = w.abs().amax(1)
    assert torch.allclose(s[amax > 0], amax[amax > 0] / 127) and s[5] == 1 and not q[5].any()
    # every row's largest element is exact, every element within half a step of its row
    err = (dequantize(q, s, torch.float32) - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-7).all())


def _dequantized(w: BloomWeights) -> BloomWeights:
    """A floating copy of int8 weights: each int8 tensor times its scales, in fp32, no scales."""
    layers = []
    for lw in w.layers:
        f = {k: v for k, v in vars(lw).items() if not k.endswith("_s")}
        for k in ("qkv", "dense", "fc1", "fc2"):
            f[f"{k}_w"] = dequantize(getattr(lw, f"{k}_w"), getattr(lw, f"{k}_s"), torch.float32)
        layers.append(type(lw)(**f))
    emb = dequantize(w.emb, w.emb_s, torch.float32)
    return dataclasses.replace(w, emb=emb, emb_s=None, layers=layers)


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    return build_random_bloom(tmp_path_factory.mktemp("models") / "random-bloom")


@pytest.fixture(scope="module", params=["tiny", "random"])
def engines(request, tiny_model_dir, random_dir):
    """(floating engine, int8 engine, engine on the int8 model's dequantized weights), fp32 activations on the CPU."""
    path = tiny_model_dir if request.param == "tiny" else random_dir
    shape = BloomShape.from_dir(path)
    ref = FastEngine(from_checkpoint(path, shape, dtype=torch.float32), shape, max_batch=4, max_seq=64)
    wq = quantize_weights(from_checkpoint(path, shape, dtype=torch.float32))
    q = FastEngine(wq, shape, max_batch=4, max_seq=64)
    deq = FastEngine(_dequantized(wq), shape, max_batch=4, max_seq=64)
    return ref, q, deq


def test_int8_weights_hold_a_quarter_of_fp32_and_the_int8_engine_equals_its_dequantized_model(engines):
    ref, q, deq = engines
    w = q.model.w
    assert w.quantized and q.model.quant and q.dtype == torch.float32
    assert {t.dtype for t in (w.emb, *(getattr(lw, f) for lw in w.layers for f in ("qkv_w", "dense_w", "fc1_w",
                                                                                    "fc2_w")))} == {torch.int8}  # fmt: skip
    assert w.nbytes() == sum(t.numel() * t.element_size() for t in iter_tensors(w))
    assert w.nbytes() < 0.3 * ref.model.w.nbytes()  # 1 byte of 4, plus the scales and the fp32 layer norms
    # The int8 path (embedding rows x scales, every linear, the head) is the dequantized model, to fp32 rounding.
    a, b = q.forward_logits(PROMPTS), deq.forward_logits(PROMPTS)
    for i, row in enumerate(PROMPTS):
        assert torch.allclose(a[i, : len(row)], b[i, : len(row)], atol=1e-4, rtol=1e-4)
    assert q.generate(PROMPTS, 12).tokens == deq.generate(PROMPTS, 12).tokens


def test_int8_greedy_agrees_with_the_floating_engine_on_forced_decoding(engines):
    from bloom_server.fast.quant import forced_decoding_error

    ref, q, _ = engines
    r = forced_decoding_error(ref, q, PROMPTS, 24)
    assert r["argmax_agreement"] >= MIN_AGREEMENT, r
    assert r["rel_logit_error_mean"] <= MAX_MEAN_REL_ERROR, r
    assert 0 < min(r["errors"])  # int8 is not the floating model


INTERPRETER_CHECK = r"""
import torch, torch.nn.functional as F
from bloom_server.fast import triton_kernels as tk
from bloom_server.fast.engine import FastEngine
from bloom_server.fast.quant import quantize, quantize_weights
from bloom_server.fast.shapes import BloomShape
from bloom_server.fast.weights import random_weights
g = torch.Generator().manual_seed(0)
h = lambda *s: torch.randn(*s, generator=g).half()
def close(got, ref):  # the fp32 result rounded once to fp16 (and the order of the fp32 sums)
    err = (got.float() - ref).abs()
    assert bool((err <= ref.abs() * 2.0**-10 + 1e-4).all()), float(err.max())
# Each row block (1, 16 and 64 rows: M = 1, 3, 16, 17, 40, 70), each epilogue, against fp32 over the dequantized weight.
for M in (1, 3, 16, 17, 40, 70):
    K, N = 96, 80
    x, b, r, lw, lb = h(M, K), h(N), h(M, N), 1 + 0.1 * h(K), 0.1 * h(K)
    q, s = quantize(h(N, K).float() * 0.1)
    wd = q.float() * s[:, None]
    lin = x.float() @ wd.T + b.float()
    close(tk.gemv(x, q, b, scale=s), lin)
    close(tk.gemv(x, q, b, scale=s, epilogue="gelu"), F.gelu(lin.half().float(), approximate="tanh"))
    close(tk.gemv(x, q, b, scale=s, epilogue="residual", residual=r), lin.half().float() + r.float())
    xn = F.layer_norm(x.float(), (K,), lw.float(), lb.float(), 1e-5).half().float()
    close(tk.gemv(x, q, b, scale=s, ln=(lw, lb, 1e-5)), xn @ wd.T + b.float())
# A whole fp16 engine on int8 weights: the Triton paths (the kernel in the decode step, its epilogues, the head) give
# the eager path's tokens (dequantize-then-matmul) and its logits to fp16 rounding, at 1, 3 and 20 rows (past 16: the
# 64-row blocks, which the floating weights leave to cuBLAS).
shape = BloomShape(vocab_size=301, hidden_size=64, n_layer=2, n_head=4)
wts = quantize_weights(random_weights(shape, None, dtype=torch.float16, device=torch.device("cpu"), seed=0))
calls = []
real = tk.gemv
tk.gemv = lambda *a, **k: calls.append(k.get("scale") is not None) or real(*a, **k)
for prompts in ([[5, 17, 99, 4, 30]], [[5, 17, 99, 4, 30], [42, 7], [9]], [[i + 3, 2 * i + 5] for i in range(20)]):
    out = {}
    for v in ("base", "triton_head"):
        calls.clear()
        e = FastEngine(wts, shape, max_batch=len(prompts), max_seq=16)
        e.model.set_fuse(v)
        out[v] = (e.generate(prompts, 3).tokens, e.last_logits.float())
        assert (v == "base") == (not calls) and all(calls), (v, calls)
    assert out["triton_head"][0] == out["base"][0], len(prompts)
    assert (out["triton_head"][1] - out["base"][1]).abs().max() <= 2e-2, len(prompts)
print("ok")
"""


def test_int8_kernels_equal_the_dequantized_matmul_in_the_interpreter():
    """The int8 Triton kernel (every row block and epilogue, the layer-norm prologue) against fp32 matmuls over the
    dequantized weights, and an fp16 engine on int8 weights through it against the eager path, on the CPU under
    TRITON_INTERPRET=1 (where triton is installed)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK], capture_output=True, text=True, timeout=900,
                       env=env)  # fmt: skip
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


GEMM_CHECK = r"""
import torch, torch.nn.functional as F
from bloom_server.fast import triton_kernels as tk
from bloom_server.fast.quant import quantize
g = torch.Generator().manual_seed(1)
h = lambda *s: torch.randn(*s, generator=g).half()
def close(got, ref, mag, ulps):  # within `ulps` fp16 roundings of the magnitudes summed (the order of the fp32 sums)
    err = (got.float() - ref).abs()
    assert bool((err <= mag * ulps * 2.0**-10 + 1e-4).all()), float((err / (mag + 1e-3)).max())
launches = []
real = tk._qgemm_kernel.run
tk._qgemm_kernel.run = lambda *a, **k: launches.append(a[6]) or real(*a, **k)  # the row count M
# Row counts around every row bucket and N, K off the tiles (the interpreter's tile: 16 x 32 x 32).
tk.set_int8_kernel("gemm")
for M in (1, 7, 16, 33, 128, 256):
    for K, N in ((96, 80), (72, 40)):
        x, b, r = h(M, K), h(N), h(M, N)
        q, s = quantize(h(N, K).float() * 0.1)
        lin = x.float() @ (q.float() * s[:, None]).T + b.float()
        close(tk.gemv(x, q, b, scale=s), lin, lin.abs(), 1)
        close(tk.gemv(x, q, b, scale=s, epilogue="gelu"), F.gelu(lin.half().float(), approximate="tanh"), lin.abs(), 2)
        res = tk.gemv(x, q, b, scale=s, epilogue="residual", residual=r)
        close(res, lin.half().float() + r.float(), lin.abs() + r.abs(), 2)
assert sorted(set(launches)) == [1, 7, 16, 33, 128, 256], launches
# The dispatch: below GEMM_MIN_ROWS the gemv, from it on the GEMM; "gemv" keeps every row count on the gemv.
tk.set_int8_kernel("auto")
x, b = h(tk.GEMM_MIN_ROWS, 96), h(80)
q, s = quantize(h(80, 96).float())
launches.clear()
tk.gemv(x[:-1], q, b, scale=s)
assert launches == []
tk.gemv(x, q, b, scale=s)
assert launches == [tk.GEMM_MIN_ROWS]
tk.set_int8_kernel("gemv")
tk.gemv(x, q, b, scale=s)
assert launches == [tk.GEMM_MIN_ROWS] and not tk.uses_gemm(tk.QMAX_ROWS, True) and not tk.uses_gemm(64, False)
print("ok")
"""


def test_int8_gemm_equals_the_dequantized_matmul_in_the_interpreter():
    """The tiled int8 GEMM (the many-row kernel) against fp32 matmuls over the dequantized weights at 1 to 256 rows,
    with N and K off its tiles, each epilogue; and `gemv`'s dispatch between the two kernels at GEMM_MIN_ROWS."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", GEMM_CHECK], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


# ---- preshard --dtype int8, the backend and the server ----


def _preshard(model, tp, out, *extra):
    return subprocess.run([sys.executable, "-m", "bloom_server", "preshard", "--model", str(model), "--tp", str(tp),
                           "--out", str(out), "--dtype", "int8", *extra], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


@pytest.fixture(scope="module")
def int8_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    for tp in (1, 2):
        r = _preshard(tiny_model_dir, tp, root / f"tp{tp}")
        assert r.returncode == 0, r.stderr
    return {1: root / "tp1", 2: root / "tp2"}


def test_preshard_int8_equals_quantization_at_load_in_half_the_bytes(int8_dirs, tiny_model_dir):
    import json

    from bloom_server.fast.tp import TPGroup
    from bloom_server.storage.safetensors import read_header

    shape = BloomShape.from_dir(tiny_model_dir)
    assert json.loads((int8_dirs[2] / "preshard.json").read_text())["dtype"] == "I8"
    h = read_header(int8_dirs[1] / "model-tp01-rank00.safetensors").by_name()
    assert h["h.0.mlp.dense_h_to_4h.weight"].dtype == "I8" and h["h.0.mlp.dense_h_to_4h.weight_scale"].dtype == "F32"
    assert h["word_embeddings.weight"].dtype == "I8" and h["h.0.input_layernorm.weight"].dtype == "F16"
    one = from_checkpoint(int8_dirs[1], shape, dtype=torch.float16)
    at_load = quantize_weights(from_checkpoint(tiny_model_dir, shape, dtype=torch.float16))
    assert one.quantized and all(torch.equal(a, b) for a, b in zip(iter_tensors(one), iter_tensors(at_load)))
    fp16 = from_checkpoint(tiny_model_dir, shape, dtype=torch.float16)
    assert 0.45 < one.nbytes() / fp16.nbytes() < 0.6  # int8 + fp32 scales of 64-wide rows vs fp16
    # Two ranks: column-parallel rows and their scales split, row-parallel weights split by columns with the whole
    # rows' scales on both ranks, the vocabulary padded; each rank's part is the one-rank tensor's.
    hh = shape.hidden_size
    for r in range(2):
        w = from_checkpoint(int8_dirs[2], shape, TPGroup(r, 2), dtype=torch.float16)
        lw, full = w.layers[1], one.layers[1]
        assert torch.equal(lw.dense_s, full.dense_s) and torch.equal(lw.fc2_s, full.fc2_s)
        assert torch.equal(lw.dense_w, full.dense_w[:, r * hh // 2 : (r + 1) * hh // 2])
        assert torch.equal(lw.fc1_s, full.fc1_s[r * 2 * hh : (r + 1) * 2 * hh])
        rows = w.emb.shape[0]
        assert torch.equal(w.emb_s[: min(rows, shape.vocab_size - r * rows)], one.emb_s[r * rows : (r + 1) * rows])


def test_the_backend_serves_int8_from_both_checkpoints_and_refuses_what_it_cannot(int8_dirs, tiny_model_dir):
    from bloom_server.backends.fast import FastBackend
    from bloom_server.runtime.protocol import GenerateBatch
    from bloom_server.settings import load_settings
    from bloom_server.storage.model_dir import resolve_model_dir
    from bloom_server.types import SamplingParams

    def backend(path, dtype):
        s = load_settings(backend="fast", dtype=dtype, max_input_length=16, max_total_tokens=48, max_batch_size=2)
        return FastBackend(s, resolve_model_dir(str(path)), RankContext())

    batch = GenerateBatch(((5, 17, 99, 4),), (8,), SamplingParams.from_dict({}), seed=0, pad_token_id=3,
                          eos_token_id=None)  # fmt: skip
    out = {}
    for name, path in (("preshard", int8_dirs[1]), ("at load", tiny_model_dir)):
        b = backend(path, "int8")
        b.load()
        d = b.describe()
        assert d["dtype"] == "int8" and d["activation_dtype"] == "float32"
        assert d["weight_bytes"] == b.engine.model.w.nbytes() and b.engine.model.w.quantized
        out[name] = (b.generate(batch).token_ids, d["weight_bytes"])
    assert out["preshard"][1] == out["at load"][1]
    fp = backend(tiny_model_dir, "fp32")
    fp.load()
    assert fp.describe()["dtype"] == "float32" and fp.describe()["weight_bytes"] > 3 * out["preshard"][1]
    with pytest.raises(ConfigError, match="dtype 'fp16'.* holds int8 weights.*--dtype int8"):
        backend(int8_dirs[1], "fp16").load()


def test_a_server_at_dtype_int8_reports_the_dtype_and_resident_bytes(int8_dirs, tmp_path):
    args = ["--model", str(int8_dirs[1]), "--backend", "fast", "--dtype", "int8", "--max-input-length", "16",
            "--max-new-tokens", "8", "--max-batch-size", "2"]  # fmt: skip
    with ServerProcess(args, free_port(), log_path=tmp_path / "srv.log") as srv:
        status, info, _ = srv.get("/info")
        assert status == 200 and info["model_dtype"] == "int8" and info["model_weight_bytes"] > 0
        status, out, _ = srv.post("/generate", {"text": ["Deepspeed is"], "max_new_tokens": 4})
        assert status == 200 and out["num_generated_tokens"] == [4]
        status, body, _ = srv.get("/metrics")
        line = next(x for x in str(body).splitlines() if x.startswith("bloom_server_weight_bytes "))
        assert float(line.split()[1]) == info["model_weight_bytes"]
        assert 'dtype="int8"' in str(body)
