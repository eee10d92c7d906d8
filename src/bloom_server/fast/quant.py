"""Weight-only int8: each weight row stored as int8 with one fp32 scale, activations stay in the model dtype.

  scale[n] = max_k |W[n, k]| / 127,   Q[n, k] = round(W[n, k] / scale[n]) in [-127, 127],   W ~= Q * scale[:, None]

Per output row (symmetric, no zero point): a linear layer's output column n is (x . Q[n]) * scale[n], so the scale is
applied once to the fp32 sum, after the reduction (fast/triton_kernels.py gemv); the embedding lookup of token t is
Q[t] * scale[t]. Which weights: fast/catalog.py QUANT_LAYER and QUANT_GLOBAL (the block's four linear layers and the
word embedding, which is also the tied head: without it 7b1 keeps 0.57x of its fp16 bytes, with it 0.50x;
docs/results/fast-engine.md "int8").

A scale is a function of the whole row, whatever the tensor-parallel split: a row-parallel weight (split by columns)
takes the max over every rank's part (an all-reduce of the maxima at load; the whole row in `bloom-server preshard`),
so every degree serves the same int8 model, and a pre-sharded int8 checkpoint equals quantization at load.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from bloom_server.fast.catalog import LAYER_FIELDS, QUANT_GLOBAL, QUANT_LAYER
from bloom_server.fast.tp import TPGroup, split_dim
from bloom_server.fast.weights import BloomWeights

QMAX = 127
# Rows of a weight quantized (or dequantized) at once: bounds the fp32 temporaries (a 176B head is 3.6 G elements).
ROW_CHUNK_ELEMENTS = 1 << 26


def row_absmax(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N] fp32 max |w| of each row, in row chunks."""
    out = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for a, b in _row_chunks(w):
        out[a:b] = w[a:b].abs().amax(dim=1).float()
    return out


def scales_of(absmax: torch.Tensor) -> torch.Tensor:
    """[N] row maxima -> [N] fp32 scales (an all-zero row, such as a padded vocabulary row, gets 1: its Q is 0)."""
    absmax = absmax.float()
    return torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax))


def quantize_rows(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[N, K] floating weights and their [N] scales -> [N, K] int8, in row chunks."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for a, b in _row_chunks(w):
        q[a:b] = torch.round(w[a:b].float() / scale[a:b, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (int8 [N, K], fp32 scales [N]), each row on its own maximum."""
    s = scales_of(row_absmax(w))
    return quantize_rows(w, s), s


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [N, K] and fp32 [N] -> [N, K] in `dtype` (each element rounded once from the exact fp32 product)."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    for a, b in _row_chunks(q):
        out[a:b] = (q[a:b].float() * scale[a:b, None]).to(dtype)
    return out


def _row_chunks(w: torch.Tensor) -> Iterator[tuple[int, int]]:
    rows = max(1, ROW_CHUNK_ELEMENTS // max(1, w[0].numel() if w.shape[0] else 1))
    for a in range(0, w.shape[0], rows):
        yield a, min(a + rows, w.shape[0])


def quantize_weights(w: BloomWeights, tp: TPGroup | None = None, embedding: bool = True) -> BloomWeights:
    """Quantize this rank's floating weights in place (fast/catalog.py QUANT_LAYER, QUANT_GLOBAL), one tensor at a time
    (the floating tensor is dropped once its int8 copy exists). The maxima of row-parallel weights are all-reduced over
    the ranks (`tp`), so the scales are those of the whole rows. Weights already int8 are left as they are.
    `embedding=False` keeps the embedding (the tied head) floating: what scripts/bench/int8_check.py compares."""
    tp = tp or TPGroup()
    if w.quantized:
        return w

    def one(t: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        amax = row_absmax(t)
        if split_dim(name) == 1 and tp.world > 1:
            tp.all_reduce(amax, op="max")
        s = scales_of(amax)
        return quantize_rows(t, s), s

    for lw in w.layers:
        for field, sfield in QUANT_LAYER.items():
            q, s = one(getattr(lw, field), LAYER_FIELDS[field])
            setattr(lw, field, q)
            setattr(lw, sfield, s)
    for name, (field, sfield) in QUANT_GLOBAL.items() if embedding else ():
        q, s = one(getattr(w, field), name)
        setattr(w, field, q)
        setattr(w, sfield, s)
    return w


def dequant_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] @ (q * scale)^T + bias in x's dtype, the weight dequantized a row chunk at a time (the eager path:
    prefill, large batches, CPUs; fp16 temporaries of at most ROW_CHUNK_ELEMENTS)."""
    if q.numel() <= ROW_CHUNK_ELEMENTS:
        return torch.nn.functional.linear(x, dequantize(q, scale, x.dtype), bias)
    parts = [
        torch.nn.functional.linear(x, dequantize(q[a:b], scale[a:b], x.dtype), None if bias is None else bias[a:b])
        for a, b in _row_chunks(q)
    ]
    return torch.cat(parts, dim=-1)


def forced_decoding_error(ref: Any, eng: Any, prompts: list[list[int]], steps: int) -> dict[str, Any]:
    """The quantization error of engine `eng` against `ref` (two FastEngines on the same weights, free slots from 0):
    both prefill `prompts`, then run `steps` decode steps fed the reference's greedy tokens, so one early difference
    does not derail the rest. Returns the argmax agreement over every row and step and the relative logit error
    (||b - a|| / ||a|| per step: each step's mean and max, and the list); the slots are freed."""
    slots = list(range(len(prompts)))
    la, lb = ref.prefill(slots, prompts).float(), eng.prefill(slots, prompts).float()
    agree, errors = 0, []
    for _ in range(steps):
        agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
        errors.append(float((lb - la).norm() / la.norm()))
        nxt = la.argmax(-1)
        ref.decode(slots, nxt)
        eng.decode(slots, nxt)
        la, lb = ref.last_logits.float(), eng.last_logits.float()
    for s in slots:
        ref.release(s)
        eng.release(s)
    return {"argmax_agreement": agree / (steps * len(prompts)), "rel_logit_error_mean": sum(errors) / len(errors),
            "rel_logit_error_max": max(errors), "errors": errors, "steps": steps, "rows": len(prompts)}  # fmt: skip
