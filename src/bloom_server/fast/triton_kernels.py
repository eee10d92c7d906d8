"""Triton kernels for the small-batch decode step (B <= 16 rows): fewer, fused kernels per layer.

At bs 1 the step reads every weight once and the ~15 small kernels around the 4 GEMVs of a layer (layer norms, bias
copies, residual adds, GELU, K/V scatters, the attention chain) cost as much as a tenth of the step. Two kernels here:

  gemv(x, w, b, ln=, epilogue=, residual=)   y = epi(LN?(x) @ w^T + b): the layer norm in the prologue (each program
                                              normalizes the rows it needs; they are short), bias, then tanh-GELU or a
                                              residual add in the epilogue: one kernel per linear layer
  decode_attention(qkv, k_cache, v_cache, pos, slopes, S, alpha)
                                              writes the rows' new K/V to the cache and attends over keys [0, S) with the
                                              ALiBi bias computed in the kernel: one kernel instead of six

Numerics follow the eager ops they replace, rounding where they round: linear = fp32 accumulation + bias, rounded to
the model dtype; GELU of that rounded value in fp32 (PyTorch's tanh formula, libdevice tanh on the GPU), rounded;
residual added in fp32 to the rounded output, rounded; layer norm in fp32, rounded before the product; attention scores
= round(alpha * q.k + round(slope * j)), softmax in fp32 rounded to the model dtype, then probs @ V in fp32, rounded.
Only the order of the fp32 sums differs from cuBLAS (so greedy tokens can part ways only at near ties).

Under TRITON_INTERPRET=1 (CPU, numpy) the same kernels run, so the CPU tests check them against the eager math.
"""

from __future__ import annotations

import os

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


def available(device: torch.device) -> bool:
    return HAVE_TRITON and (device.type == "cuda" or INTERPRET)


def fits(*tensors: torch.Tensor) -> bool:
    """The kernels index with 32-bit offsets: every element of each tensor must be reachable in under 2**31 (the
    176B head, 250880 x 14336, is not: it stays on cuBLAS)."""
    return all(t.numel() < 2**31 for t in tensors)


if HAVE_TRITON:

    def _gemv_configs() -> list:
        if INTERPRET:
            return [triton.Config({"BN": 16, "BK": 32}, num_warps=4, num_stages=1)]
        cfg = []
        for bn, bk, warps, stages in (
            (8, 512, 4, 3), (16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 3), (64, 128, 8, 3), (8, 1024, 8, 2),
        ):  # fmt: skip
            cfg.append(triton.Config({"BN": bn, "BK": bk}, num_warps=warps, num_stages=stages))
        return cfg

    @triton.jit
    def _tanh(x, LIBDEVICE: tl.constexpr):
        if LIBDEVICE:
            return libdevice.tanh(x)
        else:
            return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0

    def _prune(configs, nargs, **kw):
        # tl.dot needs every dim >= 16: the many-row kernel keeps the configs with BN >= 16.
        bm = kw.get("BM", nargs.get("BM", 1))
        return [c for c in configs if bm == 1 or c.kwargs["BN"] >= 16] or configs

    @triton.autotune(configs=_gemv_configs(), key=["N", "K", "BM"], prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, lnw_ptr, lnb_ptr,
        M, N, K, sxm, swn, srm, sym, eps,
        LN: tl.constexpr, EPI: tl.constexpr, BM: tl.constexpr, LIBDEVICE: tl.constexpr,
        BN: tl.constexpr, BK: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        rn = pid * BN + tl.arange(0, BN)
        nmask = rn < N
        rm = tl.arange(0, BM)
        mmask = rm < M
        dt = y_ptr.dtype.element_ty
        if LN:
            # Mean, then variance about it (two passes over the short rows; L2 hits), as fp32.
            s1 = tl.zeros((BM,), tl.float32)
            for k0 in range(0, K, BK):
                rk = k0 + tl.arange(0, BK)
                xv = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=mmask[:, None] & (rk < K)[None, :], other=0.0)
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
            w = tl.load(w_ptr + rn[:, None] * swn + rk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            xv = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            if LN:
                lw = tl.load(lnw_ptr + rk, mask=kmask, other=0.0).to(tl.float32)
                lb = tl.load(lnb_ptr + rk, mask=kmask, other=0.0).to(tl.float32)
                xn = (xv.to(tl.float32) - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]
                xv = tl.where(mmask[:, None] & kmask[None, :], xn, 0.0).to(dt)  # rounded, as F.layer_norm's output
            if BM == 1:
                acc1 += w.to(tl.float32) * xv.to(tl.float32)  # [BN, BK] * [1, BK]: one row, no tensor cores
            else:
                acc = tl.dot(xv, tl.trans(w), acc)
        if BM == 1:
            acc = tl.sum(acc1, axis=1)[None, :]
        bias = tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        y = (acc + bias[None, :]).to(dt)
        omask = mmask[:, None] & nmask[None, :]
        if EPI == 1:  # tanh GELU of the rounded linear output, as F.gelu(approximate="tanh")
            v = y.to(tl.float32)
            cube = v * v * v
            inner = 0.7978845608028654 * (v + 0.044715 * cube)
            y = (0.5 * v * (1.0 + _tanh(inner, LIBDEVICE))).to(dt)
        if EPI == 2:  # + residual, as `linear(...) + residual`
            r = tl.load(r_ptr + rm[:, None] * srm + rn[None, :], mask=omask, other=0.0)
            y = (y.to(tl.float32) + r.to(tl.float32)).to(dt)
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :], y, mask=omask)

    @triton.jit
    def _decode_attn_kernel(
        qkv_ptr, kc_ptr, vc_ptr, pos_ptr, slope_ptr, out_ptr,
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
        # Pass 1: the row max and the sum of exp over the scores (the new key read from registers, not the cache).
        m = tl.full((), float("-inf"), tl.float32)
        l = tl.zeros((), tl.float32)
        for s0 in range(0, S, BS):
            j = s0 + tl.arange(0, BS)
            k = tl.load(kc + j[:, None] * s_cs + rd[None, :], mask=(j < S)[:, None], other=0.0)
            k = tl.where((j == p)[:, None], k_new[None, :], k)
            dot = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
            bias = (slope * j.to(tl.float32)).to(dt).to(tl.float32)
            score = (alpha * dot + bias).to(dt).to(tl.float32)
            score = tl.where((j <= p) & (j < S), score, float("-inf"))
            m_new = tl.maximum(m, tl.max(score, axis=0))
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(score - m_new), axis=0)
            m = m_new
        # Pass 2: probabilities rounded to the model dtype, times V, summed in fp32.
        acc = tl.zeros((D,), tl.float32)
        for s0 in range(0, S, BS):
            j = s0 + tl.arange(0, BS)
            k = tl.load(kc + j[:, None] * s_cs + rd[None, :], mask=(j < S)[:, None], other=0.0)
            k = tl.where((j == p)[:, None], k_new[None, :], k)
            v = tl.load(vc + j[:, None] * s_cs + rd[None, :], mask=(j < S)[:, None], other=0.0)
            v = tl.where((j == p)[:, None], v_new[None, :], v)
            dot = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
            bias = (slope * j.to(tl.float32)).to(dt).to(tl.float32)
            score = (alpha * dot + bias).to(dt).to(tl.float32)
            score = tl.where((j <= p) & (j < S), score, float("-inf"))
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
) -> torch.Tensor:
    """x [M, K] (M <= 16, K contiguous), w [N, K] contiguous, b [N] -> [M, N] in x's dtype. `ln` = (weight, bias, eps):
    x is layer-normed first. epilogue "gelu" (tanh form) or "residual" (+ residual [M, N])."""
    M, K = x.shape
    N = w.shape[0]
    assert M <= MAX_ROWS and w.shape[1] == K and x.stride(1) == 1 and w.stride(1) == 1
    if not fits(x, w):
        raise ValueError(f"gemv: a [{N}, {K}] weight is past 32-bit offsets")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    r = residual if residual is not None else y
    assert epilogue != "residual" or (residual is not None and r.stride(1) == 1)
    lnw, lnb, eps = ln if ln is not None else (b, b, 0.0)
    bm = 1 if M == 1 else 16
    grid = lambda meta: (triton.cdiv(N, meta["BN"]),)  # noqa: E731
    _gemv_kernel[grid](
        x, w, b, r, y, lnw, lnb, M, N, K, x.stride(0), w.stride(0), r.stride(0), y.stride(0), float(eps),
        LN=ln is not None, EPI=EPILOGUES[epilogue], BM=bm, LIBDEVICE=not INTERPRET,
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
    bs = 16 if INTERPRET else 64
    _decode_attn_kernel[(B * hp,)](
        qkv, k_cache, v_cache, pos, slopes, out, S, hp, qkv.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), out.stride(0), float(alpha), D=D, BS=bs, num_warps=4,
    )  # fmt: skip
    return out
