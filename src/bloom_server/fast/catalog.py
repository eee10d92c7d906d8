"""The BLOOM tensor list, once: each tensor's checkpoint name (without "transformer."), its full shape, the dimension
tensor parallelism splits it on (None: replicated; see tp.py for why), and, for a block's tensors, the field of
weights.LayerWeights that holds this rank's shard. h: hidden size, f: 4h, v: vocabulary size."""

from __future__ import annotations

from collections.abc import Callable

# One block's tensors, in the order the loader reads them: name -> (LayerWeights field, split dim, full shape).
LAYER: dict[str, tuple[str, int | None, Callable[[int, int], tuple[int, ...]]]] = {
    "input_layernorm.weight": ("ln1_w", None, lambda h, f: (h,)),
    "input_layernorm.bias": ("ln1_b", None, lambda h, f: (h,)),
    "self_attention.query_key_value.weight": ("qkv_w", 0, lambda h, f: (3 * h, h)),
    "self_attention.query_key_value.bias": ("qkv_b", 0, lambda h, f: (3 * h,)),
    "self_attention.dense.weight": ("dense_w", 1, lambda h, f: (h, h)),
    "self_attention.dense.bias": ("dense_b", None, lambda h, f: (h,)),
    "post_attention_layernorm.weight": ("ln2_w", None, lambda h, f: (h,)),
    "post_attention_layernorm.bias": ("ln2_b", None, lambda h, f: (h,)),
    "mlp.dense_h_to_4h.weight": ("fc1_w", 0, lambda h, f: (f, h)),
    "mlp.dense_h_to_4h.bias": ("fc1_b", 0, lambda h, f: (f,)),
    "mlp.dense_4h_to_h.weight": ("fc2_w", 1, lambda h, f: (h, f)),
    "mlp.dense_4h_to_h.bias": ("fc2_b", None, lambda h, f: (h,)),
}
# The tensors outside the blocks: name -> (split dim, full shape from (h, v)). The embedding is also the tied head.
GLOBAL: dict[str, tuple[int | None, Callable[[int, int], tuple[int, ...]]]] = {
    "word_embeddings.weight": (0, lambda h, v: (v, h)),
    "word_embeddings_layernorm.weight": (None, lambda h, v: (h,)),
    "word_embeddings_layernorm.bias": (None, lambda h, v: (h,)),
    "ln_f.weight": (None, lambda h, v: (h,)),
    "ln_f.bias": (None, lambda h, v: (h,)),
}

# Weight-only int8 (fast/quant.py): the weights stored as int8 with one fp32 scale per output row (the block's four
# linear layers, and the word embedding, which is also the tied head): LayerWeights / BloomWeights field of the weight
# -> the field of its scales (QUANT_GLOBAL: checkpoint name -> (BloomWeights field, scale field)). A scale's checkpoint
# name is the weight's + SCALE_SUFFIX, its shape [rows of the weight].
QUANT_LAYER: dict[str, str] = {"qkv_w": "qkv_s", "dense_w": "dense_s", "fc1_w": "fc1_s", "fc2_w": "fc2_s"}
QUANT_GLOBAL: dict[str, tuple[str, str]] = {"word_embeddings.weight": ("emb", "emb_s")}
SCALE_SUFFIX = "_scale"

# LayerWeights field -> checkpoint name of a block's tensor.
LAYER_FIELDS: dict[str, str] = {field: name for name, (field, _, _) in LAYER.items()}
# Checkpoint names of the int8 weights (a block's without "h.{i}.", and the global one).
QUANT_NAMES: tuple[str, ...] = tuple(LAYER_FIELDS[f] for f in QUANT_LAYER) + tuple(QUANT_GLOBAL)
# Name (a block's, without "h.{i}.", or a global one) -> the dimension tensor parallelism splits it on. A scale is per
# output row: split with its weight's rows (column-parallel, the vocabulary), whole on every rank where the weight is
# split by columns (row-parallel: every rank's part of a row shares the row's one scale).
SPLIT_DIM: dict[str, int | None] = {
    **{name: dim for name, (_, dim, _) in LAYER.items()},
    **{name: dim for name, (dim, _) in GLOBAL.items()},
}
SPLIT_DIM.update({name + SCALE_SUFFIX: (0 if SPLIT_DIM[name] == 0 else None) for name in QUANT_NAMES})


def full_shapes(hidden: int, vocab_size: int, n_layer: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor's full (unsharded) shape: the global ones, then each block's as "h.{i}.NAME" for i < n_layer, or
    the block's names alone when n_layer is None. The int8 scales are listed too (NAME + SCALE_SUFFIX)."""
    h, f = hidden, 4 * hidden
    out = {name: shape(h, vocab_size) for name, (_, shape) in GLOBAL.items()}
    per = {name: shape(h, f) for name, (_, _, shape) in LAYER.items()}
    for table in (out, per):
        table.update({n + SCALE_SUFFIX: table[n][:1] for n in QUANT_NAMES if n in table})
    if n_layer is None:
        out.update(per)
    else:
        for i in range(n_layer):
            out.update({f"h.{i}.{k}": v for k, v in per.items()})
    return out
