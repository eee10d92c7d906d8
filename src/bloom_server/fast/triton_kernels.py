"""Triton kernels for the small-batch decode step (B <= 16 rows; int8 weights: B <= QMAX_ROWS): fewer, fused kernels
per layer.

At bs 1 the step reads every weight once and the ~15 small kernels around the 4 GEMVs of a layer (layer norms, bias
copies, residual adds, GELU, K/V scatters, the attention chain) cost as much as a tenth of the step. Two kernels here:

  gemv(x, w, b, ln=, epilogue=, residual=, scale=)
                                              y = epi(LN?(x) @ w^T + b): the layer norm in the prologue (each program
                                              normalizes the rows it needs; they are short), bias, then tanh-GELU or a
                                              residual add in the epilogue: one kernel per linear layer. With `scale`,
                                              w is int8 (fast/quant.py): each tile is converted in registers (exact:
                                              |q| <= 127), the fp32 sum of a column is multiplied by its row's scale
                                              before the bias, so a step reads one byte per weight
  decode_attention(qkv, k_cache, v_cache, pos, slopes, S, alpha)
                                              writes the rows' new K/V to the cache and attends over keys [0, S) with the
                                              ALiBi bias computed in the kernel: one kernel instead of six

Numerics follow the eager ops they replace, rounding where they round: linear = fp32 accumulation + bias, rounded to
the model dtype; GELU of that rounded value in fp32 (PyTorch's tanh formula, libdevice tanh on the GPU), rounded;
residual added in fp32 to the rounded output, rounded; layer norm in fp32, rounded before the product; attention scores
= round(alpha * q.k + round(slope * j)), softmax in fp32 rounded to the model dtype, then probs @ V in fp32, rounded.
Only the order of the fp32 sums differs from cuBLAS (so greedy tokens can part ways only at near ties). The int8
kernel equals an fp32 matmul over the dequantized weights (x @ (q * scale)^T = (x @ q^T) * scale) to rounding.

Under TRITON_INTERPRET=1 (CPU, numpy) the same kernels run, so the CPU tests check them against the eager math.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    HAVE_TRITON = True
except Exception:  # noqa: BLE001 - no triton (CPU wheels): the model keeps the eager path
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_ROWS = 16  # rows one gemv program holds (tl.dot's smallest M); more rows take the eager path
# int8 weights: up to this many rows run the int8 kernel (in blocks of 64 rows, each block re-reading the weight tile
# its neighbour just read, from L2): a decode step stays bound by reading the weights up to the largest batch the
# benchmarks run, and an eager path would first write the fp16 weight (5 bytes moved per weight instead of 2). More
# rows (prefill) dequantize in row chunks and run cuBLAS (fast/model.py).
QMAX_ROWS = 256
# Shared memory one gemv config may use (x and w tiles times pipeline stages), under the A100's 164 KiB per block.
SMEM_BUDGET = 160 << 10
# int8 weights from this many rows on take the tiled GEMM (`_qgemm_kernel`: tensor cores over full weight tiles, each
# weight tile read once per GEMM_MAX_BM rows) instead of the gemv's row blocks: where the gemv's 64-row blocks start,
# since in the engine the gemv led up to 16 rows and the GEMM from 32 (docs/results/fast-engine.md "int8").
GEMM_MIN_ROWS = 17
GEMM_MAX_BM = 128  # the most rows one GEMM program holds (the MMA's N): 256 rows are two row blocks
_gemm_min_rows = GEMM_MIN_ROWS  # what `gemv` dispatches on; a bench forces one kernel with `set_int8_kernel`


def max_rows(quant: bool) -> int:
    """The most rows the gemv kernel takes: the model's Triton paths and the kernel plan both ask here."""
    return QMAX_ROWS if quant else MAX_ROWS


def uses_gemm(m: int, quant: bool) -> bool:
    """Whether `gemv` of m rows runs the tiled int8 GEMM (int8 weights, no layer-norm prologue) rather than the gemv."""
    return quant and m >= _gemm_min_rows


def set_int8_kernel(kind: str) -> None:
    """Which kernel the int8 calls take, for a bench that times each: "gemv" (every row count up to QMAX_ROWS), "gemm"
    (every row count) or "auto" (GEMM_MIN_ROWS decides). Process-wide; set before an engine captures its graphs."""
    global _gemm_min_rows
    _gemm_min_rows = {"gemv": QMAX_ROWS + 1, "gemm": 1, "auto": GEMM_MIN_ROWS}[kind]


def gemm_block_rows(m: int) -> int:
    """The GEMM's row bucket of m rows (its autotune key, MB): the power of two >= m, from 16 (tl.dot's smallest) to
    GEMM_MAX_BM * 2 (two row blocks). Its configs hold MB rows, or MB / 2 where two row blocks give more programs."""
    return max(16, 1 << (max(m, 1) - 1).bit_length())


def block_rows(m: int) -> int:
    """Rows of x one gemv program holds (the BM constexpr): 1 (a GEMV without tensor cores), 16 (tl.dot's smallest
    M), or 64 (int8's larger batches, several programs per column block)."""
    return 1 if m == 1 else 16 if m <= 16 else 64


log = logging.getLogger(__name__)


def available(device: torch.device) -> bool:
    return HAVE_TRITON and (device.type == "cuda" or INTERPRET)


def fits(*tensors: torch.Tensor) -> bool:
    """The kernels index with 32-bit offsets: every element of each tensor must be reachable in under 2**31 (the
    176B head, 250880 x 14336, is not: it stays on cuBLAS)."""
    return all(t.numel() < 2**31 for t in tensors)


if HAVE_TRITON:
    # (BN, BK, warps, stages) of the gemv. The floating weights' six; int8 weights add wider K tiles: at one byte a
    # weight, a 512-wide tile is 4 KiB a program per iteration, too few bytes in flight to stream HBM (the one-row
    # path has no tl.dot, so Triton's pipeliner does not prefetch its loads: the bytes in flight are what the live
    # programs ask for at once); 1024 and 2048 keep each thread's loads 16-byte vectors and double or quadruple the
    # bytes per iteration, BN 4 doubles the programs of the 4096-row layers (dense, fc2), which otherwise fill the
    # SMs in few waves; 8 warps give more loads per program. Autotune picks per (N, K, BM) on the GPU.
    _GEMV_FLOAT = ((8, 512, 4, 3), (16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 3), (64, 128, 8, 3), (8, 1024, 8, 2))
    _GEMV_INT8 = ((4, 1024, 4, 2), (4, 2048, 8, 2), (8, 1024, 4, 2), (8, 2048, 8, 2), (16, 1024, 8, 2),
                  (32, 512, 8, 2), (64, 256, 4, 3))  # fmt: skip

    def _cfg_id(c: Any) -> tuple:
        return (c.kwargs["BN"], c.kwargs["BK"], c.num_warps, c.num_stages)

    def _gemv_configs() -> list:
        if INTERPRET:
            return [triton.Config({"BN": 16, "BK": 32}, num_warps=4, num_stages=1)]
        return [triton.Config({"BN": bn, "BK": bk}, num_warps=warps, num_stages=stages)
                for bn, bk, warps, stages in _GEMV_FLOAT + _GEMV_INT8]  # fmt: skip

    @triton.jit
    def _tanh(x, LIBDEVICE: tl.constexpr):
        if LIBDEVICE:
            return libdevice.tanh(x)
        else:
            return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0

    @triton.jit
    def _i8_to(w, dt: tl.constexpr):
        # int8 -> dt, exact (|q| <= 127), without I2F: integer-to-float conversions run at a quarter of the ALU rate
        # on sm_80/sm_90, and at one byte a weight the int8 GEMV converts about as many values per second as HBM
        # delivers bytes. Integer adds into a float's mantissa instead: the bits of 1.5 * 2**23 plus q are the fp32
        # 1.5 * 2**23 + q (|q| < 2**22), and the fp16 bits 0x6480 plus q the fp16 1152 + q (1024 <= 1152 + q < 2048,
        # where fp16 steps by 1); subtracting the constant leaves q. bf16 takes the fp32 value (exact in bf16 too).
        if dt == tl.float16:
            return ((w.to(tl.int16) + 0x6480).to(tl.int16).to(tl.float16, bitcast=True) - 1152.0).to(tl.float16)
        else:
            f = (w.to(tl.int32) + 0x4B400000).to(tl.int32).to(tl.float32, bitcast=True) - 12582912.0
            return f.to(dt)

    @triton.jit
    def _gelu(y, dt: tl.constexpr, LIBDEVICE: tl.constexpr):
        # tanh GELU of the rounded linear output, as F.gelu(approximate="tanh")
        v = y.to(tl.float32)
        inner = 0.7978845608028654 * (v + 0.044715 * (v * v * v))
        return (0.5 * v * (1.0 + _tanh(inner, LIBDEVICE))).to(dt)

    def _prune(configs, nargs, **kw):
        # tl.dot needs every dim >= 16: the many-row kernel keeps the configs with BN >= 16; and the tiles of x
        # (BM x BK, 2 bytes) and w (BN x BK, 1 or 2 bytes) of every stage must fit SMEM_BUDGET (the 64-row blocks).
        # Floating weights keep their own six configs (the int8 ones are for one-byte weights).
        bm = kw.get("BM", nargs.get("BM", 1))
        wb = 1 if kw.get("QUANT", nargs.get("QUANT", False)) else 2
        keep = [c for c in configs if bm == 1 or c.kwargs["BN"] >= 16]
        if wb == 2:
            keep = [c for c in keep if _cfg_id(c) not in _GEMV_INT8] or keep
        fit = [c for c in keep if (bm * 2 + c.kwargs["BN"] * wb) * c.kwargs["BK"] * c.num_stages <= SMEM_BUDGET]
        return fit or keep or configs

    def _bench(fn, quantiles=None):
        # 5 ms of warm-up and 25 ms of timed runs per config instead of Triton's 25 + 100: every GEMV here takes
        # 10 us to 1 ms, so that is still 25 to 2500 timed runs for the median; 5 keys x 6 configs cost ~1 s instead
        # of ~4 s (first start: during the weight read, see Prewarm; a kept cache skips them).
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=25, quantiles=quantiles)

    def _autotune_kwargs() -> dict:
        # Autotuning results kept in Triton's cache directory (BLOOM_KERNEL_CACHE_DIR) where this Triton can: a
        # restart with the cache kept skips the benchmarks as well as the compiles.
        import inspect

        try:
            params = inspect.signature(triton.autotune).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        out: dict = {}
        if "cache_results" in params and not INTERPRET:
            out["cache_results"] = True
        if "do_bench" in params and not INTERPRET:
            out["do_bench"] = _bench
        return out

    @triton.autotune(configs=_gemv_configs(), key=["N", "K", "BM", "QUANT"],
                     prune_configs_by={"early_config_prune": _prune}, **_autotune_kwargs())  # fmt: skip
    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, s_ptr, b_ptr, r_ptr, y_ptr, lnw_ptr, lnb_ptr,
        M, N, K, sxm, swn, srm, sym, eps,
        LN: tl.constexpr, EPI: tl.constexpr, BM: tl.constexpr, QUANT: tl.constexpr, LIBDEVICE: tl.constexpr,
        BN: tl.constexpr, BK: tl.constexpr,
    ):  # fmt: skip
        # Grid (row blocks, column blocks): the row blocks of one column block are neighbours in launch order, so
        # they read its weight tile at about the same time (once from memory, then from L2).
        pid = tl.program_id(1)
        rn = pid * BN + tl.arange(0, BN)
        nmask = rn < N
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        mmask = rm < M
        dt = y_ptr.dtype.element_ty
        if LN:
            # Mean, then variance about it (two passes over the short rows; L2 hits), as fp32.
            s1 = tl.zeros((BM,), tl.float32)
            for k0 in range(0, K, BK):
                rk = k0 + tl.arange(0, BK)
                xv = tl.load(
                    x_ptr + rm[:, None] * sxm + rk[None, :], mask=mmask[:, None] & (rk < K)[None, :], other=0.0
                )
                s1 += tl.sum(xv.to(tl.float32), axis=1)
            mean = s1 / K
            s2 = tl.zeros((BM,), tl.float32)
            for k0 in range(0, K, BK):
                rk = k0 + tl.arange(0, BK)
                km = (rk < K)[None, :]
                xv = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=mmask[:, None] & km, other=0.0)
                d = tl.where(km, xv.to(tl.float32) - mean[:, None], 0.0)
                s2 += tl.sum(d * d, axis=1)
            rstd = 1.0 / tl.sqrt(s2 / K + eps)
        acc = tl.zeros((BM, BN), tl.float32)
        acc1 = tl.zeros((BN, BK), tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            kmask = rk < K
            w = tl.load(w_ptr + rn[:, None] * swn + rk[None, :], mask=nmask[:, None] & kmask[None, :], other=0)
            xv = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            if LN:
                lw = tl.load(lnw_ptr + rk, mask=kmask, other=0.0).to(tl.float32)
                lb = tl.load(lnb_ptr + rk, mask=kmask, other=0.0).to(tl.float32)
                xn = (xv.to(tl.float32) - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]
                xv = tl.where(mmask[:, None] & kmask[None, :], xn, 0.0).to(dt)  # rounded, as F.layer_norm's output
            if BM == 1:
                # [BN, BK] * [1, BK]: one row, no tensor cores
                if QUANT:
                    acc1 += _i8_to(w, tl.float32) * xv.to(tl.float32)
                else:
                    acc1 += w.to(tl.float32) * xv.to(tl.float32)
            else:
                if QUANT:
                    acc = tl.dot(xv, tl.trans(_i8_to(w, dt)), acc)  # int8 -> the model dtype: exact (|q| <= 127)
                else:
                    acc = tl.dot(xv, tl.trans(w), acc)
        if BM == 1:
            acc = tl.sum(acc1, axis=1)[None, :]
        if QUANT:  # the row scales of the int8 weight, on the fp32 sums
            acc = acc * tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        bias = tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        y = (acc + bias[None, :]).to(dt)
        omask = mmask[:, None] & nmask[None, :]
        if EPI == 1:
            y = _gelu(y, dt, LIBDEVICE)
        if EPI == 2:  # + residual, as `linear(...) + residual`
            r = tl.load(r_ptr + rm[:, None] * srm + rn[None, :], mask=omask, other=0.0)
            y = (y.to(tl.float32) + r.to(tl.float32)).to(dt)
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :], y, mask=omask)

    # The int8 GEMM's configs: BM rows of x (the MMA's N), BN weight rows (its M: 64 a warpgroup), BK. Each weight
    # tile is read once per row block, so BM is the bucket MB (one row block up to GEMM_MAX_BM rows) or MB / 2 from
    # 64 rows on (twice the programs, the second read of a tile from L2: the 4096-row layers have only 32 to 64
    # tiles of 64 or 128 rows, under the H100's 132 SMs). BK 64..256 with 3..5 stages: the cp.async pipeline that
    # keeps the tensor cores fed; the SMEM prune drops what does not fit. Autotune picks per (N, K, MB) on the GPU.
    _QGEMM_TILES = ((64, 128, 4, 4), (64, 256, 4, 3), (128, 64, 4, 5), (128, 128, 8, 4), (128, 256, 8, 3))

    def _qgemm_configs() -> list:
        if INTERPRET:
            return [triton.Config({"BM": 16, "BN": 32, "BK": 32}, num_warps=4, num_stages=1)]
        return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=warps, num_stages=stages)
                for bm in (16, 32, 64, 128) for bn, bk, warps, stages in _QGEMM_TILES]  # fmt: skip

    def _qgemm_prune(configs, nargs, **kw):
        mb = kw.get("MB", nargs.get("MB", 16))
        rows = {min(mb, GEMM_MAX_BM)} | ({min(mb, GEMM_MAX_BM) // 2} if mb >= 64 else set())
        keep = [c for c in configs if c.kwargs["BM"] in rows]
        fit = [c for c in keep if (c.kwargs["BN"] + 2 * c.kwargs["BM"]) * c.kwargs["BK"] * c.num_stages <= SMEM_BUDGET]
        return fit or keep or configs

    @triton.autotune(configs=_qgemm_configs(), key=["N", "K", "MB"],
                     prune_configs_by={"early_config_prune": _qgemm_prune}, **_autotune_kwargs())  # fmt: skip
    @triton.jit
    def _qgemm_kernel(
        x_ptr, w_ptr, s_ptr, b_ptr, r_ptr, y_ptr,
        M, N, K, MB, sxm, swn, srm, sym,
        EPI: tl.constexpr, LIBDEVICE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):  # fmt: skip
        # y [M, N] = x [M, K] @ (q * s)^T + b, computed transposed: acc [BN, BM] = q_tile [BN, BK] @ x^T [BK, BM].
        # The converted weight tile is the MMA's A operand, which Hopper's wgmma may take from registers (B must come
        # from shared memory: the weight as B would be converted, then stored back to shared memory); the weight rows
        # fill the MMA's M (64 and more) whatever the batch, the batch is its N (16 and more). The row scale multiplies
        # the fp32 sums after the K loop, then the same bias and epilogues as the gemv, rounded where it rounds.
        # Grid (row blocks, column blocks): the row blocks of one weight tile are neighbours (the second from L2).
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        mmask = rm < M
        nmask = rn < N
        dt = y_ptr.dtype.element_ty
        # Rows past M / N read a valid row (never stored), so the loop's loads are masked on K only.
        wp = w_ptr + (rn % N)[:, None] * swn + rk[None, :]
        xp = x_ptr + (rm % M)[None, :] * sxm + rk[:, None]
        acc = tl.zeros((BN, BM), tl.float32)
        for k0 in range(0, K, BK):
            kmask = k0 + rk < K
            w = tl.load(wp, mask=kmask[None, :], other=0)
            xt = tl.load(xp, mask=kmask[:, None], other=0.0)
            acc = tl.dot(_i8_to(w, dt), xt, acc)
            wp += BK
            xp += BK
        acc = acc * tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
        bias = tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        y = (acc + bias[:, None]).to(dt)
        omask = nmask[:, None] & mmask[None, :]
        if EPI == 1:
            y = _gelu(y, dt, LIBDEVICE)
        if EPI == 2:
            r = tl.load(r_ptr + rm[None, :] * srm + rn[:, None], mask=omask, other=0.0)
            y = (y.to(tl.float32) + r.to(tl.float32)).to(dt)
        tl.store(y_ptr + rm[None, :] * sym + rn[:, None], y, mask=omask)

    @triton.jit
    def _decode_attn_kernel(
        qkv_ptr, kc_ptr, vc_ptr, pos_ptr, slope_ptr, out_ptr, sc_ptr,
        S, hp, s_qkv, s_cb, s_ch, s_cs, s_out, alpha,
        D: tl.constexpr, BS: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        b = pid // hp
        h = pid % hp
        dt = out_ptr.dtype.element_ty
        rd = tl.arange(0, D)
        base = qkv_ptr + b * s_qkv + h * 3 * D
        q = tl.load(base + rd).to(tl.float32)
        k_new = tl.load(base + D + rd)
        v_new = tl.load(base + 2 * D + rd)
        p = tl.load(pos_ptr + b)
        slope = tl.load(slope_ptr + h)
        kc = kc_ptr + b * s_cb + h * s_ch
        vc = vc_ptr + b * s_cb + h * s_ch
        tl.store(kc + p * s_cs + rd, k_new)
        tl.store(vc + p * s_cs + rd, v_new)
        # Keys past this row's own position are masked (exp(-inf) = 0 exactly), so the loops stop at p + 1: a batch
        # of mixed lengths reads each row's own keys, not the bucket's S (same sums, same rounding).
        n_keys = tl.minimum(p + 1, S)
        # Pass 1: the row max and the sum of exp over the scores (the new key read from registers, not the cache);
        # the scores go to this program's scratch row, so pass 2 reads them (S floats) instead of the keys again.
        sc = sc_ptr + pid.to(tl.int64) * S
        m = tl.full((), float("-inf"), tl.float32)
        l = tl.zeros((), tl.float32)
        for s0 in range(0, n_keys, BS):
            j = s0 + tl.arange(0, BS)
            k = tl.load(kc + j[:, None] * s_cs + rd[None, :], mask=(j < S)[:, None], other=0.0)
            k = tl.where((j == p)[:, None], k_new[None, :], k)
            dot = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
            bias = (slope * j.to(tl.float32)).to(dt).to(tl.float32)
            score = (alpha * dot + bias).to(dt).to(tl.float32)
            score = tl.where((j <= p) & (j < S), score, float("-inf"))
            tl.store(sc + j, score, mask=j < n_keys)
            m_new = tl.maximum(m, tl.max(score, axis=0))
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(score - m_new), axis=0)
            m = m_new
        tl.debug_barrier()  # the scratch row written by this program's threads, visible to all of them
        # Pass 2: probabilities rounded to the model dtype, times V, summed in fp32.
        acc = tl.zeros((D,), tl.float32)
        for s0 in range(0, n_keys, BS):
            j = s0 + tl.arange(0, BS)
            v = tl.load(vc + j[:, None] * s_cs + rd[None, :], mask=(j < n_keys)[:, None], other=0.0)
            v = tl.where((j == p)[:, None], v_new[None, :], v)
            score = tl.load(sc + j, mask=j < n_keys, other=float("-inf"))
            prob = (tl.exp(score - m) / l).to(dt).to(tl.float32)
            acc += tl.sum(prob[:, None] * v.to(tl.float32), axis=0)
        tl.store(out_ptr + b * s_out + h * D + rd, acc.to(dt))


EPILOGUES = {None: 0, "gelu": 1, "residual": 2}


def gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    *,
    ln: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    epilogue: str | None = None,
    residual: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= max_rows, K contiguous), w [N, K] contiguous, b [N] -> [M, N] in x's dtype. `ln` = (weight,
    bias, eps): x is layer-normed first. epilogue "gelu" (tanh form) or "residual" (+ residual [M, N]). `scale` [N]
    fp32: w is int8 and y = x @ (w * scale[:, None])^T + b. int8 weights from GEMM_MIN_ROWS rows on (without `ln`)
    run the tiled GEMM, fewer rows the gemv (`uses_gemm`): the same numbers to the order of the fp32 sums."""
    M, K = x.shape
    N = w.shape[0]
    quant = scale is not None
    assert M <= max_rows(quant) and w.shape[1] == K and x.stride(1) == 1 and w.stride(1) == 1
    assert quant == (w.dtype == torch.int8), "int8 weights take their scales, floating ones none"
    if not fits(x, w):
        raise ValueError(f"gemv: a [{N}, {K}] weight is past 32-bit offsets")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    r = residual if residual is not None else y
    assert epilogue != "residual" or (residual is not None and r.stride(1) == 1)
    if ln is None and uses_gemm(M, quant):
        mb = gemm_block_rows(M)
        grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))  # noqa: E731
        _qgemm_kernel[grid](
            x, w, scale, b, r, y, M, N, K, mb, x.stride(0), w.stride(0), r.stride(0), y.stride(0),
            EPI=EPILOGUES[epilogue], LIBDEVICE=not INTERPRET,
        )  # fmt: skip
        return y
    lnw, lnb, eps = ln if ln is not None else (b, b, 0.0)
    bm = block_rows(M)
    grid = lambda meta: (triton.cdiv(M, bm), triton.cdiv(N, meta["BN"]))  # noqa: E731 - Triton's grid idiom
    _gemv_kernel[grid](
        x, w, scale if quant else b, b, r, y, lnw, lnb, M, N, K, x.stride(0), w.stride(0), r.stride(0), y.stride(0),
        float(eps), LN=ln is not None, EPI=EPILOGUES[epilogue], BM=bm, QUANT=quant, LIBDEVICE=not INTERPRET,
    )  # fmt: skip
    return y


def decode_attention(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    slopes: torch.Tensor,
    S: int,
    alpha: float,
    hp: int,
    D: int,
) -> torch.Tensor:
    """qkv [B, hp*3*D] (rows (head, {q,k,v}, D)), k_cache/v_cache this layer's [max_batch, hp, max_seq, D] (row b =
    slot b), pos [B], slopes [hp] fp32 -> ctx [B, hp*D]; row b's new K/V are written at [b, :, pos[b]]."""
    B = qkv.shape[0]
    assert qkv.stride(1) == 1 and k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride()
    assert D & (D - 1) == 0, "head dim must be a power of two"
    if not fits(k_cache, v_cache, qkv):
        raise ValueError("decode_attention: a cache past 32-bit offsets")
    out = torch.empty((B, hp * D), dtype=qkv.dtype, device=qkv.device)
    scratch = torch.empty((B * hp, S), dtype=torch.float32, device=qkv.device)
    bs = 16 if INTERPRET else 64
    _decode_attn_kernel[(B * hp,)](
        qkv, k_cache, v_cache, pos, slopes, out, scratch, S, hp, qkv.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), out.stride(0), float(alpha), D=D, BS=bs, num_warps=4,
    )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------ ahead of time (cold start)
#
# The first decode step would otherwise compile every kernel variant it uses (Triton specialises on constexprs,
# dtypes, integer arguments equal to 1 or divisible by 16 and 16-byte pointer alignment) and autotune each GEMV key
# (N, K, BM): seconds of compiles and benchmarks, all on the critical path of the warm-up. Here the
# same calls run ahead, while the weights stream in:
#   - `compile_workers` (started by serve.py at process start): child processes that compile the variants into
#     Triton's on-disk cache (Kernel.warmup with dtypes in place of tensors: no memory, no launch; the compiles run
#     outside this process's GIL, in parallel);
#   - `warm` (the fast backend's load thread helper): the real `gemv`/`decode_attention` calls on dummy device
#     tensors of the real shapes, which load those binaries (or compile what is missing) and run the autotuner's
#     benchmarks, so the warm-up's calls find everything in memory.
# The plan lists the calls BloomRankModel.decode_layer / logits make (fast/model.py); a test records the model's calls
# and compares (tests/test_fast_engine.py). The row limits and row blocks of both come from max_rows and block_rows.


@dataclass(frozen=True)
class GemvCall:
    """One linear layer of the small-batch decode step as the model calls `gemv`: y [M, N] = x [M, K] @ w^T."""

    name: str
    N: int
    K: int
    epilogue: str | None = None
    ln: bool = False


@dataclass(frozen=True)
class DecodePlan:
    """What the decode step of at most MAX_ROWS rows runs on Triton for one rank (empty: nothing)."""

    dtype: str  # "float16" | "bfloat16"
    gemvs: tuple[GemvCall, ...]
    attention: bool
    hp: int
    D: int
    max_seq: int
    max_batch: int
    quant: bool = False  # int8 weights (every gemv of the plan, the head included: fast/catalog.py QUANT_*)

    @property
    def empty(self) -> bool:
        return not self.gemvs and not self.attention

    def rows(self, stage: int) -> tuple[int, ...]:
        """Row counts whose variants a stage covers: 1 (BM=1: what the one-row warm-up and bs-1 decode use), then
        2 and 16 (BM=16, specialised as "not / divisible by 16": bs 2-16 steps and multi-row prefill logits), and
        with int8 weights, for batches past 16, two row counts of each row bucket the batch reaches (MB / 2 + 8 and
        MB: the same two specialisations, the GEMM's autotune keys; `gemv` sends each to its kernel, `uses_gemm`)."""
        if stage == 1:
            return (1,)
        rows = ((2,) if self.max_batch > 1 else ()) + ((16,) if self.max_batch >= 16 else ())
        if self.max_batch > MAX_ROWS and max_rows(self.quant) > MAX_ROWS:
            top = min(self.max_batch, max_rows(True))
            for mb in (32, 64, 128, 256):
                if mb // 2 < top:
                    rows += (mb // 2 + 8, mb)
        return rows

    def to_json(self) -> str:
        d = asdict(self)
        d["gemvs"] = [asdict(g) for g in self.gemvs]
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> DecodePlan:
        d = json.loads(text)
        d["gemvs"] = tuple(GemvCall(**g) for g in d["gemvs"])
        return cls(**d)


def decode_plan(*, hidden: int, n_head: int, vocab_size: int, world: int, dtype: str, max_batch: int, max_seq: int,
                fuse: frozenset | set, post: bool = False, quant: bool = False) -> DecodePlan:  # fmt: skip
    """The Triton calls of one rank's decode step (fast/model.py's choices: fp16/bf16 only, Triton GEMVs for the
    column-parallel layers and, on one rank, the row-parallel ones with their residual epilogue; the fused attention;
    the head where it has under 2**31 elements). dtype: "float16" | "bfloat16" (anything else: an empty plan); quant:
    int8 weights (the same calls on int8 tiles, up to max_rows(True) rows)."""
    hp, D = n_head // world, hidden // n_head
    f = 4 * hidden // world
    vp = -(-vocab_size // world)
    none = DecodePlan(dtype, (), False, hp, D, max_seq, max_batch, quant)
    if dtype not in ("float16", "bfloat16") or post or not fuse:
        return none
    big = (hp * 3 * D * hidden, hidden * hp * D, f * hidden, hidden * f)
    if any(n >= 2**31 for n in big):
        return none
    gemvs: list[GemvCall] = [GemvCall("qkv", hp * 3 * D, hidden)]
    if world == 1:
        gemvs.append(GemvCall("dense", hidden, hp * D, "residual"))
    gemvs.append(GemvCall("fc1", f, hidden, "gelu"))
    if world == 1:
        gemvs.append(GemvCall("fc2", hidden, f, "residual"))
    if vp * hidden < 2**31:
        gemvs.append(GemvCall("head", vp, hidden))
    attention = D & (D - 1) == 0
    return DecodePlan(dtype, tuple(gemvs), attention, hp, D, max_seq, max_batch, quant)


def _attn_block() -> int:
    return 16 if INTERPRET else 64


def _key_bucket(max_seq: int) -> int:
    return min(64, max_seq)  # engine.seq_bucket's first bucket: a multiple of 16, as every bucket up to 256


@torch.inference_mode()
def warm(plan: DecodePlan, device: torch.device, stage: int = 1, stop: Any = None,
         reserve: Callable[[], int] | None = None) -> dict[str, float]:  # fmt: skip
    """Run each kernel of `plan` once on dummy tensors of the real shapes (compiles or loads the binaries, autotunes
    the GEMV keys: the benchmarks need weights of the real size). Returns seconds per call ("gemv qkv M=1": ...).
    `stop` (an Event): give up between calls once it is set. `reserve()`: device bytes the load still has to
    allocate (weights to come, the KV cache): GEMVs whose dummy weight would not fit beside them are left to the
    warm-up."""
    times: dict[str, float] = {}
    if plan.empty or not available(device):
        return times
    dt = getattr(torch, plan.dtype)
    rows = plan.rows(stage)
    if not rows:
        return times
    gemvs = list(plan.gemvs)
    if device.type == "cuda" and reserve is not None:
        free = torch.cuda.mem_get_info(device)[0] - reserve() - (1 << 30)  # 1 GiB: contexts, benchmark scratch
        wsize = 1 if plan.quant else dt.itemsize
        fit = [g for g in gemvs if g.N * g.K * wsize <= free]
        for g in gemvs:
            if g not in fit:
                times[f"gemv {g.name} skipped (memory)"] = 0.0
        plan = replace(plan, gemvs=tuple(fit))
    wmax = max((g.N * g.K for g in plan.gemvs), default=1)
    kmax = max((max(g.K, g.N) for g in plan.gemvs), default=1)
    nmax = max((g.N for g in plan.gemvs), default=1)
    mmax = max(rows)
    if plan.quant:  # real-size weights: honest benchmarks
        w_all = torch.randint(-127, 128, (wmax,), dtype=torch.int8, device=device)
    else:
        w_all = torch.empty(wmax, dtype=dt, device=device).normal_(0, 0.02)
    s_all = torch.full((nmax,), 0.02 / 127, dtype=torch.float32, device=device) if plan.quant else None
    x_all = torch.empty(mmax * kmax, dtype=dt, device=device).normal_()
    r_all = torch.zeros(mmax * kmax, dtype=dt, device=device)
    b_all = torch.zeros(nmax, dtype=dt, device=device)
    ln_w = torch.ones(kmax, dtype=dt, device=device)
    for m in rows:
        for g in plan.gemvs:
            if stop is not None and stop.is_set():
                return times
            t = time.perf_counter()
            x = x_all[: m * g.K].view(m, g.K)
            w = w_all[: g.N * g.K].view(g.N, g.K)
            res = r_all[: m * g.N].view(m, g.N) if g.epilogue == "residual" else None
            ln = (ln_w[: g.K], b_all[: g.K], 1e-5) if g.ln else None
            scale = s_all[: g.N] if s_all is not None else None
            gemv(x, w, b_all[: g.N], ln=ln, epilogue=g.epilogue, residual=res, scale=scale)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[f"gemv {g.name} M={m}"] = time.perf_counter() - t
        if plan.attention and stage == 1:
            t = time.perf_counter()
            hp, D, S = plan.hp, plan.D, _key_bucket(plan.max_seq)
            kc = torch.zeros((m, hp, plan.max_seq, D), dtype=dt, device=device)
            qkv = torch.zeros((m, hp * 3 * D), dtype=dt, device=device)
            pos = torch.zeros(m, dtype=torch.long, device=device)
            slopes = torch.ones(hp, dtype=torch.float32, device=device)
            decode_attention(qkv, kc, torch.zeros_like(kc), pos, slopes, S, 1.0 / math.sqrt(D), hp, D)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[f"attention M={m}"] = time.perf_counter() - t
    return times


def _compile_only(plan: DecodePlan, stage: int, part: int, parts: int, launchers: bool = True) -> int:
    """Compile this worker's share of the plan's variants (Kernel.warmup: dtypes for tensors, nothing launched) and,
    with `launchers`, build their launchers where a CUDA context is at hand. Returns the variants compiled."""
    dt = getattr(torch, plan.dtype)
    wt, st = (torch.int8, torch.float32) if plan.quant else (dt, dt)  # the weight's and the scale pointer's types
    jobs: list[Callable[[], Any]] = []
    seen: set = set()
    for m in plan.rows(stage):
        bm = block_rows(m)
        for g in plan.gemvs:
            if uses_gemm(m, plan.quant) and not g.ln:
                mb = gemm_block_rows(m)
                for cfg in _qgemm_prune(_qgemm_kernel.configs, {}, MB=mb):
                    variant = ("gemm", m % 16 == 0, g.epilogue, g.N % 16 == 0, g.K % 16 == 0,
                               tuple(sorted(cfg.all_kwargs().items())))  # fmt: skip
                    if variant in seen:
                        continue
                    seen.add(variant)

                    def gjob(g=g, m=m, mb=mb, cfg=cfg):
                        return _qgemm_kernel.fn.warmup(
                            dt, wt, st, dt, dt, dt, m, g.N, g.K, mb, g.K, g.K, g.N, g.N,
                            EPI=EPILOGUES[g.epilogue], LIBDEVICE=not INTERPRET, grid=(1,), **cfg.all_kwargs(),
                        )  # fmt: skip

                    jobs.append(gjob)
                continue
            for cfg in _prune(_gemv_kernel.configs, {}, BM=bm, QUANT=plan.quant):
                # One job per variant: Triton specialises N and K only on == 1 and divisibility by 16 (qkv and the
                # head share theirs, dense and fc2 theirs), so two workers never compile the same one.
                variant = (m, g.epilogue, g.ln, g.N % 16 == 0, g.K % 16 == 0, g.N == 1, g.K == 1,
                           tuple(sorted(cfg.all_kwargs().items())))  # fmt: skip
                if variant in seen:
                    continue
                seen.add(variant)

                def job(g=g, m=m, bm=bm, cfg=cfg):
                    return _gemv_kernel.fn.warmup(
                        dt, wt, st, dt, dt, dt, dt, dt, m, g.N, g.K, g.K, g.K, g.N, g.N, 1e-5,
                        LN=g.ln, EPI=EPILOGUES[g.epilogue], BM=bm, QUANT=plan.quant, LIBDEVICE=not INTERPRET,
                        grid=(1,), **cfg.all_kwargs(),
                    )  # fmt: skip

                jobs.append(job)
        if plan.attention and stage == 1:
            hp, D, S = plan.hp, plan.D, _key_bucket(plan.max_seq)

            def attn(m=m, hp=hp, D=D, S=S):
                s_ch = plan.max_seq * D
                return _decode_attn_kernel.warmup(
                    dt, dt, dt, torch.int64, torch.float32, dt, torch.float32, S, hp, hp * 3 * D, hp * s_ch, s_ch, D, hp * D, 0.125,
                    D=D, BS=_attn_block(), num_warps=4, grid=(1,),
                )  # fmt: skip

            jobs.append(attn)
    done = 0
    for i, job in enumerate(jobs):
        if i % parts != part:
            continue
        k = job()
        init = getattr(k, "_init_handles", None)
        if launchers and init is not None and torch.cuda.is_available():
            try:
                init()  # loads the binary and builds (and caches) its launcher
            except Exception as e:  # noqa: BLE001 - the parent will do it
                print(f"launcher: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        done += 1
    return done


def plan_for(facts: dict[str, Any]) -> DecodePlan:
    """The DecodePlan of one rank from plain facts (what serve.py hands the compile workers, and the fast backend's
    load uses itself): model_dir, world, dtype ("float16" ...), max_batch, max_seq, fast_decode (the fusion, as
    fast/model.py's parse_fuse reads it; None: the default), weights ("int8": weight-only int8; None: the dtype's)."""
    from bloom_server.fast.fusion import parse_fuse
    from bloom_server.fast.shapes import BloomShape

    shape = BloomShape.from_dir(facts["model_dir"])
    return decode_plan(hidden=shape.hidden_size, n_head=shape.n_head, vocab_size=shape.vocab_size,
                       world=int(facts["world"]), dtype=str(facts["dtype"]), max_batch=int(facts["max_batch"]),
                       max_seq=int(facts["max_seq"]), fuse=parse_fuse(facts.get("fast_decode")),
                       post=shape.apply_residual_connection_post_layernorm,
                       quant=facts.get("weights") == "int8")  # fmt: skip


class _OfflineTarget:
    """What Triton's JIT asks its active driver for when it compiles without launching (`warmup`): the device, its
    stream, and the target architecture. Set as the active driver, it lets a host with no GPU (or another GPU) compile
    binaries for `arch`; launching anything with it active is not possible, and not attempted."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Any = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target


def use_offline_target(arch: int) -> None:
    """Compile for CUDA architecture `arch` (80, 86, 90, ...) from now on in this process, GPU or none
    (`bloom-server precompile --target`). For a process that compiles only: nothing can launch afterwards."""
    from triton.runtime import driver

    driver.set_active(_OfflineTarget(arch))


def _worker_main(argv: list[str]) -> int:
    """A compile worker (bloom_server.fast.coldstart.precompile starts them): argv = FACTS_JSON PART PARTS DEVICE. Prints
    "stage N done COUNT SECONDS" as it goes (the parent waits on stage 1). facts["target"], when a number, is the
    CUDA architecture to compile for offline (no GPU needed, no launchers built)."""
    facts = json.loads(argv[0])
    part, parts, dev = int(argv[1]), int(argv[2]), int(argv[3])
    target = facts.get("target")
    if not HAVE_TRITON or (target is None and not torch.cuda.is_available()):
        print("stage 1 done 0 0.00\nstage 2 done 0 0.00", flush=True)
        return 0
    if target is None:
        torch.cuda.set_device(dev)
    else:
        use_offline_target(int(target))
    plan = plan_for(facts)
    for stage in (1, 2):
        t = time.perf_counter()
        n = _compile_only(plan, stage, part, parts, launchers=target is None) if not plan.empty else 0
        print(f"stage {stage} done {n} {time.perf_counter() - t:.2f}", flush=True)
    return 0


def kernel_counts() -> dict[str, int]:
    """Compiled variants and autotuned GEMV / GEMM keys held in this process (to tell whether a call compiled or tuned)."""
    if not HAVE_TRITON:
        return {"compiled": 0, "tuned": 0}
    compiled = 0
    for fn in (_gemv_kernel.fn, _qgemm_kernel.fn, _decode_attn_kernel):
        caches = getattr(fn, "device_caches", None)
        if isinstance(caches, dict):  # Triton 3.x: device -> (kernel cache, ...)
            for v in caches.values():
                c = v[0] if isinstance(v, tuple) else v
                compiled += len(c) if hasattr(c, "__len__") else 0
        else:
            c = getattr(fn, "cache", None)
            if isinstance(c, dict):
                compiled += sum(len(d) if isinstance(d, dict) else 1 for d in c.values())
    tuned = sum(len(getattr(k, "cache", {}) or {}) for k in (_gemv_kernel, _qgemm_kernel))
    return {"compiled": compiled, "tuned": tuned}


class Prewarm:
    """The load thread's helper (fast backend, CUDA): once the compile workers have finished stage 1 (or at once
    without workers), runs `warm` for the one-row variants (the binaries load from Triton's cache, the autotuner
    benchmarks each GEMV key), warms cuBLAS/cuBLASLt with a small matmul in the model dtype, then, while the weights
    are still far from read (`keep_going()`), the multi-row variants. On its own non-blocking stream, so the loader's
    copies neither wait for it nor skew its benchmarks. `finish()` stops it between calls and joins it: it must be
    done before the warm-up captures a CUDA graph."""

    def __init__(self, plan: DecodePlan, device: torch.device, hidden: int, workers: Any = None,
                 keep_going: Callable[[], bool] | None = None, reserve: Callable[[], int] | None = None):  # fmt: skip
        import threading

        self.plan, self.device, self.hidden, self.workers, self.reserve = plan, device, hidden, workers, reserve
        self.keep_going = keep_going or (lambda: True)
        self.stop = threading.Event()
        self.stage1 = threading.Event()
        self.times: dict[str, float] = {}
        self.error: str | None = None
        self.t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="bloom-prewarm", daemon=True)

    def start(self) -> Prewarm:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            torch.cuda.set_device(self.device)
            side = torch.cuda.Stream(self.device)
            covered = getattr(self.workers, "seed_archs", ()) if self.workers is not None else ()
            major, minor = torch.cuda.get_device_capability(self.device) if covered else (0, 0)
            if major * 10 + minor in covered:
                # Every binary is in the cache already (seeded by `bloom-server precompile` for this GPU): load them
                # now; launchers left to build are a C compiler's subprocess here, not work under this GIL.
                log.info("kernel prewarm: the seed holds every variant for sm_%d%d: not waiting for the compile "
                         "workers", major, minor)  # fmt: skip
                self.workers = None
            if self.workers is not None:
                t = time.perf_counter()
                if not self.workers.wait(1, timeout=60.0):  # a stuck worker: compile here instead
                    log.warning("kernel compile workers not done after 60 s: compiling in the load thread's helper")
                self.times["wait for compile workers (stage 1)"] = time.perf_counter() - t
            t = time.perf_counter()
            with torch.cuda.stream(side):
                calls = warm(self.plan, self.device, 1, reserve=self.reserve)
            self.times["stage 1 (M=1) kernels"] = time.perf_counter() - t
            self.times.update({f"  {k}": v for k, v in calls.items()})
            t = time.perf_counter()
            dt = getattr(torch, self.plan.dtype, torch.float16)
            with torch.inference_mode():
                for m in (1, 8):  # cuBLAS/cuBLASLt: library, handle and workspace, GEMV and GEMM paths
                    x = torch.zeros((m, self.hidden), dtype=dt, device=self.device)
                    torch.nn.functional.linear(x, torch.zeros((self.hidden, self.hidden), dtype=dt, device=self.device))
                torch.cuda.synchronize(self.device)
            self.times["cublas"] = time.perf_counter() - t
            self.stage1.set()
            if self.plan.rows(2) and not self.stop.is_set() and self.keep_going():
                go = _Either(self.stop, self.keep_going)
                while self.workers is not None and not go.is_set() and not self.workers.wait(2, timeout=0.1):
                    pass
                t = time.perf_counter()
                with torch.cuda.stream(side):
                    calls = warm(self.plan, self.device, 2, stop=go, reserve=self.reserve)
                self.times["stage 2 (M=2,16) kernels"] = time.perf_counter() - t
                self.times.update({f"  {k}": v for k, v in calls.items()})
            side.synchronize()
            torch.cuda.empty_cache()  # the dummy tensors' memory back to the device
        except Exception as e:  # ahead-of-time work only: the warm-up compiles what is missing
            self.error = f"{type(e).__name__}: {e}"
            log.warning("kernel prewarm failed (the warm-up will compile instead): %s", self.error, exc_info=True)
        finally:
            self.stage1.set()

    def running(self) -> bool:
        return self._thread.is_alive()

    def finish(self, timeout: float = 300.0) -> float:
        """Wait for stage 1, stop stage 2 between calls, join. Returns the seconds waited."""
        t = time.perf_counter()
        self.stage1.wait(timeout)
        self.stop.set()
        self._thread.join(timeout)
        return time.perf_counter() - t

    def summary(self) -> str:
        parts = [f"{k.strip()} {v:.2f} s" for k, v in self.times.items() if not k.startswith("  ")]
        return "; ".join(parts) + (f"; FAILED: {self.error}" if self.error else "")

    def details(self) -> str:
        return "; ".join(f"{k.strip()} {v:.3f} s" for k, v in self.times.items() if k.startswith("  "))


class _Either:
    """An Event-like stop flag: set when `stop` is set or `keep_going()` turns false."""

    def __init__(self, stop: Any, keep_going: Callable[[], bool]):
        self._stop, self._keep = stop, keep_going

    def is_set(self) -> bool:
        return self._stop.is_set() or not self._keep()


def start_prewarm(device: torch.device, facts: dict[str, Any], *, hidden: int, workers: Any = None,
                  keep_going: Callable[[], bool] | None = None,
                  reserve: Callable[[], int] | None = None, enabled: bool = True) -> Prewarm | None:  # fmt: skip
    """The fast backend's load hook: a started Prewarm on a CUDA device with Triton (facts as `plan_for` takes them),
    None elsewhere (CPU, no Triton, not `enabled` (BLOOM_FAST_PRECOMPILE=0), a plan with nothing on Triton: fp32,
    base fusion)."""
    if device.type != "cuda" or not HAVE_TRITON or not enabled:
        return None
    try:
        plan = plan_for(facts)
    except (ValueError, OSError, KeyError) as e:  # a directory without a readable config
        log.warning("no kernel prewarm: %s", e)
        return None
    return Prewarm(plan, device, hidden, workers, keep_going, reserve).start()
