"""The BLOOM forward for one tensor-parallel rank, over a slot KV cache.

Shapes: h hidden, hp heads on this rank, D head dim, V vocabulary, Vp this rank's vocabulary rows.
KV cache (owned by the engine): k, v each [layers, max_batch, hp, max_seq, D]; slot b's token at position p lives at
[:, b, :, p]. A slot's tokens start at position 0 (no padding inside the cache), so a key's cache index *is* its
position, and ALiBi needs no per-row offset: the bias of key j for head hh is slope[hh] * j. (transformers builds the
same numbers from the cumulative sum of the attention mask; softmax does not care that it is the key's position
rather than its distance to the query, the difference is constant along a row.)

Numerics follow transformers' BLOOM where it matters for equal greedy tokens: scores are
baddbmm(bias, q, k^T, alpha=1/sqrt(D)) in the model dtype, softmax accumulated in fp32 and rounded to the model dtype
before the product with V, and the bias in the model dtype. Masked keys carry -inf in the bias (probability exactly 0, as
transformers' fill with the dtype's minimum gives). GELU is the tanh form as one kernel.

Decode fusion (`fuse`: the engine's model.set_fuse, from the fast_decode setting; the variants in FUSE_VARIANTS): the
small-batch decode step runs its layer as fewer kernels. Prefill is unchanged.
  triton_head  (the default) Triton GEMVs (fast/triton_kernels.py) with the bias, GELU and residual in their
               epilogues; one Triton kernel for the K/V write, scores, ALiBi bias, softmax and context, one program per
               (row, head) reading that row's own keys only, up to ATTN_MAX_KEYS keys always, past it from
               ATTN_WIDE_PROGRAMS (row, head) programs (fewer leave the GPU idle on long key loops: the eager chain runs
               those); the tied head (logits) as a Triton GEMV for at most MAX_ROWS rows where the head has under 2**31
               elements (7b1's does; 176B's does not and stays on cuBLAS)
  base         the eager layer
The Triton GEMVs apply to prefix decode of at most triton_kernels.MAX_ROWS rows in fp16/bf16 on a GPU (the
row-parallel epilogues on one rank only), the attention as above; anything else takes the eager path. The variants
that lost to the default are listed in docs/results/removed.md.

Weight-only int8 (fast/quant.py; the weights' `*_s` scales are set): activations stay in the model dtype (the layer
norms' dtype). Every linear layer and the head run the int8 Triton kernels (the gemv, or from GEMM_MIN_ROWS rows on
the tiled GEMM: triton_kernels.gemv picks) for up to triton_kernels.QMAX_ROWS rows
(decode inside the same CUDA graphs, with the same epilogues; short prefills too) wherever the fp16 GEMVs would run,
and dequantize-then-matmul (fast/quant.py dequant_linear, in row chunks) elsewhere; the embedding lookup dequantizes
the rows it reads.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from bloom_server.fast.fusion import parse_fuse
from bloom_server.fast.quant import dequant_linear
from bloom_server.fast.shapes import BloomShape
from bloom_server.fast.tp import TPGroup
from bloom_server.fast.weights import BloomWeights, LayerWeights

# Where the fused decode attention beats the eager chain (docs/results/fast-engine.md): up to ATTN_MAX_KEYS keys at
# every batch size, past it only from ATTN_WIDE_PROGRAMS (row, head) programs.
ATTN_MAX_KEYS = 256
ATTN_WIDE_PROGRAMS = 448


class ChunkIndex(NamedTuple):
    """Where a prefill chunk's real tokens go (each [T], on the device): token (row, col) of the chunk goes to slot
    `slot` at position `pos`; `keys`: the keys its queries read, [0, keys) of each row's slot. `single`: (slot,
    start) when the chunk is one row's, whose tokens go to positions [start, start + L) of that slot: then its K/V
    are written and read as slices, with no index kernels (a chunk's time is mostly its kernel launches:
    docs/results/fast-engine.md)."""

    slot: torch.Tensor
    pos: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    keys: int
    single: tuple[int, int] | None = None


class Packed(NamedTuple):
    """A prefill's real tokens, packed: x is [T, h] where token t is row `row[t]`, column `col[t]` of the padded
    [n, L] batch, `flat[t]` = row * L + col. Everything but attention runs on the T tokens, so the GEMMs skip the
    padding (a burst of prompts of mixed lengths is about half padding: docs/results/fast-engine.md); attention
    scatters into [n, L] and back, as whole rows of the flattened batch (index_copy_ / index_select: row copies; the
    generic index_put_ kernels these replace took 15% of a wave's device time on the H100)."""

    row: torch.Tensor
    col: torch.Tensor
    n: int
    L: int
    flat: torch.Tensor


def alibi_slopes(n_head: int) -> torch.Tensor:
    """[n_head] fp32 ALiBi slopes (Press et al.): a geometric series 2^(-8/m * i) for the largest power of two m <=
    n_head, then, for the heads past m, every other term of the series for 2m. Computed in fp32 with pow, as
    transformers does, so the bias values agree bit for bit."""
    m = 2 ** math.floor(math.log2(n_head))
    base = torch.tensor(2.0 ** (-8.0 / m), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + m, dtype=torch.int32))
    if m != n_head:
        extra_base = torch.tensor(2.0 ** (-4.0 / m), dtype=torch.float32)
        rest = min(m, n_head - m)
        slopes = torch.cat([slopes, torch.pow(extra_base, torch.arange(1, 1 + 2 * rest, 2, dtype=torch.int32))])
    return slopes


class BloomRankModel:
    """Pure functions of this rank's weights; the cache and the step buffers are passed in by the engine."""

    def __init__(self, weights: BloomWeights, shape: BloomShape, tp: TPGroup | None = None):
        self.w = weights
        self.shape = shape
        self.tp = tp or TPGroup()
        if shape.n_head % self.tp.world:
            raise ValueError(f"{shape.n_head} heads do not split over {self.tp.world} ranks")
        self.hp = shape.n_head // self.tp.world
        self.D = shape.head_dim
        self.h = shape.hidden_size
        self.eps = shape.layer_norm_epsilon
        self.device = weights.emb.device
        self.dtype = weights.emb_ln_w.dtype  # the activations' (int8 weights keep their layer norms in it)
        self.quant = weights.quantized
        self.inv_norm = 1.0 / math.sqrt(self.D)
        r = self.tp.rank
        # [hp] slopes of this rank's heads (heads are split contiguously: rank r holds [r*hp, (r+1)*hp)).
        self.slopes = alibi_slopes(shape.n_head)[r * self.hp : (r + 1) * self.hp].to(self.device)
        self.heads = torch.arange(self.hp, device=self.device)
        self.prefill_attention = "sdpa"  # or "eager": the fast_prefill_attention setting (its default here too)
        self.set_fuse(None)

    def set_fuse(self, spec: str | None) -> None:
        """Choose the decode fusion (see the module doc); None: DEFAULT_FUSE. An engine's
        captured graphs keep the fusion they were captured with."""
        from bloom_server.fast import triton_kernels as tk

        self.fuse = parse_fuse(spec)
        self._tk = tk
        half = self.dtype in (torch.float16, torch.bfloat16) or tk.INTERPRET
        big = [t for lw in self.w.layers[:1] for t in (lw.qkv_w, lw.dense_w, lw.fc1_w, lw.fc2_w)]
        self._triton = bool(self.fuse & {"tgemv", "tattn", "thead"}) and tk.available(self.device) and half
        self._triton = self._triton and tk.fits(*big)
        self._thead = self._triton and "thead" in self.fuse and tk.fits(self.w.emb)  # 32-bit offsets (not 176B's)
        self._zero_vocab = (
            torch.zeros(self.w.emb.shape[0], dtype=self.dtype, device=self.device) if self._thead else None
        )
        self._zeros: dict[int, torch.Tensor] = {}  # bias-free int8 kernel calls (row-parallel partial sums)

    # ---- pieces shared by prefill and decode ----

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[...] token ids -> [..., h]: word embedding, then its layer norm."""
        w = self.w
        if self.tp.world == 1:
            x = self._emb_rows(tokens)
        else:
            # Vocab-parallel lookup: rows outside this rank's range read row 0 and are zeroed, then summed over ranks.
            local = tokens - w.vocab_start
            inside = (local >= 0) & (local < w.emb.shape[0])
            x = self._emb_rows(local.clamp(0, w.emb.shape[0] - 1)) * inside.unsqueeze(-1).to(self.dtype)
            x = self.tp.all_reduce(x)
        return F.layer_norm(x, (self.h,), w.emb_ln_w, w.emb_ln_b, self.eps)

    def _emb_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows of this rank's embedding in the model dtype (int8 rows times their scales)."""
        x = F.embedding(idx, self.w.emb)
        if self.w.emb_s is None:
            return x
        return (x.float() * self.w.emb_s[idx].unsqueeze(-1)).to(self.dtype)

    def _lin(
        self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, b: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [..., K] @ w^T (+ b): F.linear, or for int8 weights the int8 kernel (up to QMAX_ROWS rows, where the
        Triton paths run) or dequantize-then-matmul."""
        if scale is None:
            return F.linear(x, w, b)
        tk = self._tk
        rows = x.numel() // x.shape[-1]
        if self._triton and 0 < rows <= tk.max_rows(True) and tk.fits(w, x):
            n = w.shape[0]
            if b is None:
                if n not in self._zeros:
                    self._zeros[n] = torch.zeros(n, dtype=self.dtype, device=self.device)
                b = self._zeros[n]
            return tk.gemv(x.reshape(rows, x.shape[-1]), w, b, scale=scale).view(*x.shape[:-1], n)
        return dequant_linear(x, w, scale, b)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[..., h] -> [..., V] in the model dtype: final layer norm, tied head (this rank's vocab rows, gathered)."""
        x = F.layer_norm(x, (self.h,), self.w.lnf_w, self.w.lnf_b, self.eps)
        if self._thead and x.dim() == 2 and x.shape[0] <= self._tk.max_rows(self.w.emb_s is not None):
            out = self._tk.gemv(x, self.w.emb, self._zero_vocab, scale=self.w.emb_s)  # + 0: the head has no bias
        else:
            out = self._lin(x, self.w.emb, self.w.emb_s)  # [..., Vp]
        if self.tp.world > 1:
            out = self.tp.all_gather_last(out)[..., : self.w.vocab_size]
        return out

    def _row_parallel(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Input split by columns over ranks: partial products summed, bias added once."""
        if self.tp.world == 1:
            return self._lin(x, weight, scale, bias)
        return self.tp.all_reduce(self._lin(x, weight, scale)) + bias

    def _mlp(self, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        """x: [..., h] block input after attention (the residual). Returns the block output."""
        ln = F.layer_norm(x, (self.h,), lw.ln2_w, lw.ln2_b, self.eps)
        residual = ln if self.shape.apply_residual_connection_post_layernorm else x
        mid = F.gelu(self._lin(ln, lw.fc1_w, lw.fc1_s, lw.fc1_b), approximate="tanh")  # [..., 4h / world]
        return self._row_parallel(mid, lw.fc2_w, lw.fc2_b, lw.fc2_s) + residual

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """q [N, Lq, D], k [N, Lk, D] (any strides with D contiguous), v [N, Lk, D], bias [N, Lq, Lk] -> [N, Lq, D]."""
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=self.inv_norm)
        # One kernel: softmax of fp16/bf16 input accumulates in fp32 and rounds once on output, which is what
        # transformers' upcast -> softmax(fp32) -> downcast computes in three.
        probs = torch.softmax(scores, dim=-1)
        return torch.bmm(probs, v)

    # ---- prefill: n rows of up to L tokens, right-padded, written to their slots from position 0 ----

    def prefill_bias(
        self, lengths: torch.Tensor, L: int, starts: torch.Tensor | None = None, S: int | None = None
    ) -> torch.Tensor:
        """lengths [n] -> [n*hp, L, S] in the model dtype: slope*j where key j is causal (j <= start + i) and real
        (j < start + len), -inf elsewhere. Padded query rows i >= len see keys [0, start + len) and are never read.
        `starts` [n] (default 0): the position of each row's first query (keys before it are in the cache); S (default
        L): keys read."""
        n = lengths.shape[0]
        i = torch.arange(L, device=self.device)
        j = torch.arange(L if S is None else S, device=self.device)
        if starts is None:
            ok = (j[None, :] <= i[:, None])[None] & (j[None, None, :] < lengths[:, None, None])  # [n, L, S]
        else:
            ok = (j[None, None, :] <= (starts[:, None] + i[None, :])[:, :, None]) & (
                j[None, None, :] < (starts + lengths)[:, None, None]
            )
        alibi = (self.slopes[:, None] * j[None, :]).to(self.dtype)  # [hp, S]
        neg = torch.full((), float("-inf"), dtype=self.dtype, device=self.device)
        bias = torch.where(ok[:, None], alibi[None, :, None, :], neg)  # [n, hp, L, S]
        return bias.reshape(n * self.hp, L, j.shape[0])

    def prefill_layer(
        self,
        li: int,
        x: torch.Tensor,
        bias: torch.Tensor,
        k_cache: torch.Tensor | None,
        v_cache: torch.Tensor | None,
        slots: torch.Tensor | slice | None,
        chunk: ChunkIndex | None = None,
        packed: Packed | None = None,
    ) -> torch.Tensor:
        """x [n, L, h] -> [n, L, h], or with `packed` x [T, h] -> [T, h] (the same rows' real tokens). Without
        `chunk`: the rows start at position 0; K/V of all L positions go to k_cache[slots, :, :L] (garbage past a
        row's length is overwritten by decode before it is ever read). With `chunk`: the rows continue from their
        chunk starts; only their real tokens' K/V are written, and the queries attend to the cache's keys
        [0, chunk.keys) (the earlier positions: a previous chunk, a cached prefix). No cache: a plain causal
        forward."""
        lw = self.w.layers[li]
        n, L = (packed.n, packed.L) if packed is not None else x.shape[:2]
        ln = F.layer_norm(x, (self.h,), lw.ln1_w, lw.ln1_b, self.eps)
        residual = ln if self.shape.apply_residual_connection_post_layernorm else x
        qkv = self._lin(ln, lw.qkv_w, lw.qkv_s, lw.qkv_b)
        if packed is not None:  # zeros at the padding, not garbage: a NaN key or value there would reach real rows
            # through its -inf bias and its zero probability
            padded = qkv.new_zeros((n * L, qkv.shape[-1]))
            padded.index_copy_(0, packed.flat, qkv)
            qkv = padded.view(n, L, -1)
        qkv = qkv.view(n, L, self.hp, 3, self.D)
        # [n, L, hp, D] -> [n, hp, L, D]
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        S = L
        if k_cache is not None and v_cache is not None and slots is not None:
            if chunk is None:  # whole rows into their slots: row copies (a slice when the slots are consecutive)
                if isinstance(slots, slice):
                    k_cache[slots, :, :L] = k
                    v_cache[slots, :, :L] = v
                else:
                    k_cache[:, :, :L].index_copy_(0, slots, k)
                    v_cache[:, :, :L].index_copy_(0, slots, v)
            elif chunk.single is not None:  # one row: slices of its slot, written then read in place
                s, start = chunk.single
                S = chunk.keys
                k_cache[s, :, start:S] = k[0]
                v_cache[s, :, start:S] = v[0]
                k, v = k_cache[s : s + 1, :, :S], v_cache[s : s + 1, :, :S]  # [1, hp, S, D] views
            else:  # real tokens only (a padded position past a short row could lie past max_seq), then every key
                k_cache[chunk.slot, :, chunk.pos] = k[chunk.row, :, chunk.col]
                v_cache[chunk.slot, :, chunk.pos] = v[chunk.row, :, chunk.col]
                S = chunk.keys
                k, v = k_cache[slots, :, :S], v_cache[slots, :, :S]  # [n, hp, S, D]
        N = n * self.hp
        if self.prefill_attention == "sdpa":  # the strided q/k/v as they are: no copies
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(n, self.hp, L, S), scale=self.inv_norm)
        else:
            ctx = self._attend(q.reshape(N, L, self.D), k.reshape(N, S, self.D), v.reshape(N, S, self.D), bias)
        ctx = ctx.view(n, self.hp, L, self.D).transpose(1, 2).reshape(n, L, self.hp * self.D)
        if packed is not None:
            ctx = ctx.view(n * L, -1).index_select(0, packed.flat)
        x = self._row_parallel(ctx, lw.dense_w, lw.dense_b, lw.dense_s) + residual
        return self._mlp(lw, x)

    # ---- decode: one new token for each of B rows ----

    def decode_bias(self, pos: torch.Tensor, S: int) -> torch.Tensor:
        """pos [B] (where each row's new token goes) -> [B*hp, 1, S]: slope*j for keys j <= pos, -inf after."""
        B = pos.shape[0]
        j = torch.arange(S, device=self.device)
        alibi = (self.slopes[:, None] * j[None, :]).to(self.dtype)  # [hp, S]
        neg = torch.full((), float("-inf"), dtype=self.dtype, device=self.device)
        bias = torch.where((j[None, :] <= pos[:, None])[:, None, :], alibi[None], neg)  # [B, hp, S]
        return bias.reshape(B * self.hp, 1, S)

    def decode_layer(
        self,
        li: int,
        x: torch.Tensor,
        bias: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rows: torch.Tensor,
        pos: torch.Tensor,
        S: int,
        prefix: bool,
    ) -> torch.Tensor:
        """x [B, h] -> [B, h]. k_cache/v_cache: this layer's [max_batch, hp, max_seq, D]. rows [B]: the slot of each
        row; `prefix` promises rows == arange(B), so the cache is read as a view (no gather copy). pos [B]: where
        each row's new K/V go; keys [0, S) are read, S > max(pos)."""
        lw = self.w.layers[li]
        B = x.shape[0]
        post = self.shape.apply_residual_connection_post_layernorm
        tk = self._tk
        tri = self._triton and prefix and B <= tk.max_rows(self.quant) and not post
        one = self.tp.world == 1
        ln = F.layer_norm(x, (self.h,), lw.ln1_w, lw.ln1_b, self.eps)
        residual = ln if post else x
        if tri:
            qkv = tk.gemv(ln, lw.qkv_w, lw.qkv_b, scale=lw.qkv_s)
        else:
            qkv = self._lin(ln, lw.qkv_w, lw.qkv_s, lw.qkv_b)
        if (
            self._triton and prefix and not post
            and (S <= ATTN_MAX_KEYS or B * self.hp >= ATTN_WIDE_PROGRAMS) and tk.fits(k_cache, v_cache)
        ):  # fmt: skip
            ctx = tk.decode_attention(qkv, k_cache, v_cache, pos, self.slopes, S, self.inv_norm, self.hp, self.D)
        else:
            ctx = self._decode_attend(qkv, k_cache, v_cache, bias, rows, pos, S, prefix)
        # Attention output projection, + residual.
        if tri and one:
            x = tk.gemv(ctx, lw.dense_w, lw.dense_b, epilogue="residual", residual=residual, scale=lw.dense_s)
        else:
            x = self._row_parallel(ctx, lw.dense_w, lw.dense_b, lw.dense_s) + residual
        # MLP.
        ln = F.layer_norm(x, (self.h,), lw.ln2_w, lw.ln2_b, self.eps)
        residual = ln if post else x
        if tri:
            mid = tk.gemv(ln, lw.fc1_w, lw.fc1_b, epilogue="gelu", scale=lw.fc1_s)
        else:
            mid = F.gelu(self._lin(ln, lw.fc1_w, lw.fc1_s, lw.fc1_b), approximate="tanh")
        if tri and one:
            return tk.gemv(mid, lw.fc2_w, lw.fc2_b, epilogue="residual", residual=residual, scale=lw.fc2_s)
        return self._row_parallel(mid, lw.fc2_w, lw.fc2_b, lw.fc2_s) + residual

    def _decode_attend(
        self,
        qkv: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        bias: torch.Tensor,
        rows: torch.Tensor,
        pos: torch.Tensor,
        S: int,
        prefix: bool,
    ) -> torch.Tensor:
        """qkv [B, hp*3*D] -> ctx [B, hp*D]: writes the rows' K/V into the cache, attends over keys [0, S)."""
        B = qkv.shape[0]
        qkv = qkv.view(B, self.hp, 3, self.D)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, hp, D] views
        if prefix:
            # Row b's K/V go to [b, :, pos[b]]: a scatter along the position dim of the cache's first B rows (a plain
            # kernel with no host sync, so it is captured in the graph as is).
            at = pos.view(B, 1, 1, 1).expand(B, self.hp, 1, self.D)
            k_cache[:B].scatter_(2, at, k.unsqueeze(2))
            v_cache[:B].scatter_(2, at, v.unsqueeze(2))
            keys, values = k_cache[:B, :, :S], v_cache[:B, :, :S]  # [B, hp, S, D] views of the cache
        else:
            at = (rows[:, None], self.heads[None, :], pos[:, None])
            k_cache.index_put_(at, k)
            v_cache.index_put_(at, v)
            keys, values = k_cache[:, :, :S].index_select(0, rows), v_cache[:, :, :S].index_select(0, rows)
        N = B * self.hp
        ctx = self._attend(q.reshape(N, 1, self.D), keys.reshape(N, S, self.D), values.reshape(N, S, self.D), bias)
        return ctx.view(B, self.hp * self.D)

    # ---- no cache: every position's logits (forward / NLL) ----

    def forward_hidden(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens [n, L] right-padded, lengths [n] -> last block's output [n, L, h] (junk past a row's length)."""
        L = tokens.shape[1]
        bias = self.prefill_bias(lengths, L)
        x = self.embed(tokens)
        for li in range(self.shape.n_layer):
            x = self.prefill_layer(li, x, bias, None, None, None)
        return x
