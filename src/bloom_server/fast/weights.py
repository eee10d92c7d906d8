"""This rank's BLOOM tensors: from a checkpoint directory (reading only this rank's slices), from an in-memory state
dict (a transformers model's, sharing its storage where no split or cast is needed), or seeded random ones.

Names are the checkpoint's without the "transformer." prefix (bigscience's own files have none; transformers'
`save_pretrained` adds it). `lm_head.weight`, where present, is the tied word embedding and is not read.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from bloom_server.fast.shapes import BloomShape
from bloom_server.fast.tp import TPGroup, shard_range, split_dim

PREFIX = "transformer."


@dataclass
class LayerWeights:
    """One block, this rank's shard. h = hidden, hp = heads on this rank, D = head dim, f = 4h / world."""

    ln1_w: torch.Tensor  # [h]
    ln1_b: torch.Tensor  # [h]
    qkv_w: torch.Tensor  # [hp*3*D, h]   rows (head, {q,k,v}, D) as BLOOM stores them
    qkv_b: torch.Tensor  # [hp*3*D]
    dense_w: torch.Tensor  # [h, hp*D]
    dense_b: torch.Tensor  # [h]        added once, after the all-reduce
    ln2_w: torch.Tensor  # [h]
    ln2_b: torch.Tensor  # [h]
    fc1_w: torch.Tensor  # [f, h]     dense_h_to_4h
    fc1_b: torch.Tensor  # [f]
    fc2_w: torch.Tensor  # [h, f]     dense_4h_to_h
    fc2_b: torch.Tensor  # [h]        added once, after the all-reduce


_LAYER_NAMES = {
    "ln1_w": "input_layernorm.weight",
    "ln1_b": "input_layernorm.bias",
    "qkv_w": "self_attention.query_key_value.weight",
    "qkv_b": "self_attention.query_key_value.bias",
    "dense_w": "self_attention.dense.weight",
    "dense_b": "self_attention.dense.bias",
    "ln2_w": "post_attention_layernorm.weight",
    "ln2_b": "post_attention_layernorm.bias",
    "fc1_w": "mlp.dense_h_to_4h.weight",
    "fc1_b": "mlp.dense_h_to_4h.bias",
    "fc2_w": "mlp.dense_4h_to_h.weight",
    "fc2_b": "mlp.dense_4h_to_h.bias",
}


@dataclass
class BloomWeights:
    emb: torch.Tensor  # [Vp, h]: vocab rows [vocab_start, vocab_start + Vp) of the word embedding, zero-padded
    emb_ln_w: torch.Tensor
    emb_ln_b: torch.Tensor
    layers: list[LayerWeights]
    lnf_w: torch.Tensor
    lnf_b: torch.Tensor
    vocab_start: int = 0
    vocab_size: int = 0  # the real vocabulary (all ranks)
    extra: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes of this rank's weights (what a decode step reads at least once)."""
        ts = [self.emb, self.emb_ln_w, self.emb_ln_b, self.lnf_w, self.lnf_b]
        ts += [t for lw in self.layers for t in vars(lw).values()]
        return sum(t.numel() * t.element_size() for t in ts)

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """transformers names, for one rank holding everything (tp 1): lets a transformers model share these tensors."""
        if self.emb.shape[0] != self.vocab_size:
            raise ValueError("to_hf_state_dict needs the unsharded weights (tensor-parallel degree 1)")
        sd = {
            "transformer.word_embeddings.weight": self.emb,
            "transformer.word_embeddings_layernorm.weight": self.emb_ln_w,
            "transformer.word_embeddings_layernorm.bias": self.emb_ln_b,
            "transformer.ln_f.weight": self.lnf_w,
            "transformer.ln_f.bias": self.lnf_b,
            "lm_head.weight": self.emb,
        }
        for i, lw in enumerate(self.layers):
            for attr, name in _LAYER_NAMES.items():
                sd[f"transformer.h.{i}.{name}"] = getattr(lw, attr)
        return sd


# A getter returns this rank's part of a named tensor: (name, split dim or None, vocab padding?) -> tensor.
Getter = Callable[[str, "int | None", bool], torch.Tensor]


def _assemble(shape: BloomShape, get: Getter) -> BloomWeights:
    layers = []
    for i in range(shape.n_layer):
        parts = {}
        for attr, name in _LAYER_NAMES.items():
            full = f"h.{i}.{name}"
            parts[attr] = get(full, split_dim(full), False)
        layers.append(LayerWeights(**parts))
    return BloomWeights(
        emb=get("word_embeddings.weight", 0, True),
        emb_ln_w=get("word_embeddings_layernorm.weight", None, False),
        emb_ln_b=get("word_embeddings_layernorm.bias", None, False),
        layers=layers,
        lnf_w=get("ln_f.weight", None, False),
        lnf_b=get("ln_f.bias", None, False),
        vocab_size=shape.vocab_size,
    )


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


def _finish(shape: BloomShape, tp: TPGroup, w: BloomWeights) -> BloomWeights:
    w.vocab_start = shard_range(shape.vocab_size, tp.rank, tp.world, pad=True)[0] if tp.world > 1 else 0
    return w


def from_state_dict(
    sd: Mapping[str, torch.Tensor],
    shape: BloomShape,
    tp: TPGroup | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> BloomWeights:
    """Shard a full state dict. With one rank and tensors already of `dtype` on `device`, nothing is copied."""
    tp = tp or TPGroup()
    names = {k[len(PREFIX) :] if k.startswith(PREFIX) else k: k for k in sd}
    vpart = -(-shape.vocab_size // tp.world)

    def get(name: str, dim: int | None, pad: bool) -> torch.Tensor:
        t = sd[names[name]]
        if dim is not None and tp.world > 1:
            a, b = shard_range(t.shape[dim], tp.rank, tp.world, pad=pad)
            # clone: a narrowed view would keep the whole tensor's storage alive on this rank.
            t = t.narrow(dim, a, b - a).clone()
            if pad:
                t = _pad_rows(t, vpart)
        return t.to(device=device if device is not None else t.device, dtype=dtype or t.dtype)

    return _finish(shape, tp, _assemble(shape, get))


def _checkpoint_files(model_dir: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (model_dir / index).is_file():
            files = sorted(set(json.loads((model_dir / index).read_text())["weight_map"].values()))
            return [model_dir / f for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or pytorch_model.bin (or their index)")


def from_checkpoint(
    model_dir: str | Path,
    shape: BloomShape,
    tp: TPGroup | None = None,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
) -> BloomWeights:
    """Read a transformers/bigscience BLOOM checkpoint. safetensors: each rank reads only its own slices."""
    tp = tp or TPGroup()
    model_dir = Path(model_dir)
    files = _checkpoint_files(model_dir)
    vpart = -(-shape.vocab_size // tp.world)
    if all(f.suffix == ".safetensors" for f in files):
        from safetensors import safe_open

        handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
        where: dict[str, tuple[object, str]] = {}
        for h in handles:
            for k in h.keys():  # type: ignore[attr-defined]
                where[k[len(PREFIX) :] if k.startswith(PREFIX) else k] = (h, k)

        def get(name: str, dim: int | None, pad: bool) -> torch.Tensor:
            if name not in where:
                raise KeyError(f"{model_dir}: the checkpoint has no tensor {name!r}")
            h, key = where[name]
            sl = h.get_slice(key)  # type: ignore[attr-defined]
            if dim is None or tp.world == 1:
                t = sl[:]
            else:
                size = sl.get_shape()[dim]
                a, b = shard_range(size, tp.rank, tp.world, pad=pad)
                t = sl[a:b] if dim == 0 else sl[:, a:b]
                if pad:
                    t = _pad_rows(t, vpart)
            return t.to(device=device, dtype=dtype)

        return _finish(shape, tp, _assemble(shape, get))

    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(torch.load(str(f), map_location="cpu", mmap=True, weights_only=True))
    return from_state_dict(sd, shape, tp, dtype, device)


def _seed_of(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def random_weights(
    shape: BloomShape,
    tp: TPGroup | None = None,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
    seed: int = 0,
    std: float = 0.02,
    emb_std: float = 0.2,
) -> BloomWeights:
    """Seeded random weights of a shape, built on `device` in `dtype`. Each tensor is drawn whole from its own seed,
    then split, so every tensor-parallel degree sees the same model. Nothing is zero (zeros can hide unwritten
    outputs). The embedding, which is also the output head, gets a wider `emb_std`: logits then spread widely
    (std about emb_std * sqrt(h)), so greedy choices are far from ties and two correct engines agree token for token
    in fp16; the input side does not care, it is layer-normed at once."""
    tp = tp or TPGroup()
    h, f = shape.hidden_size, 4 * shape.hidden_size
    full_shapes = {
        "input_layernorm.weight": (h,),
        "input_layernorm.bias": (h,),
        "self_attention.query_key_value.weight": (3 * h, h),
        "self_attention.query_key_value.bias": (3 * h,),
        "self_attention.dense.weight": (h, h),
        "self_attention.dense.bias": (h,),
        "post_attention_layernorm.weight": (h,),
        "post_attention_layernorm.bias": (h,),
        "mlp.dense_h_to_4h.weight": (f, h),
        "mlp.dense_h_to_4h.bias": (f,),
        "mlp.dense_4h_to_h.weight": (h, f),
        "mlp.dense_4h_to_h.bias": (h,),
        "word_embeddings.weight": (shape.vocab_size, h),
        "word_embeddings_layernorm.weight": (h,),
        "word_embeddings_layernorm.bias": (h,),
        "ln_f.weight": (h,),
        "ln_f.bias": (h,),
    }
    vpart = -(-shape.vocab_size // tp.world)

    def get(name: str, dim: int | None, pad: bool) -> torch.Tensor:
        suffix = name.split(".", 2)[2] if name.startswith("h.") else name
        gen = torch.Generator(device=device).manual_seed(_seed_of(seed, name))
        t = torch.randn(full_shapes[suffix], generator=gen, device=device, dtype=dtype)
        t = t.mul_(emb_std if suffix == "word_embeddings.weight" else std)
        if ("layernorm" in suffix or suffix.startswith("ln_f")) and suffix.endswith("weight"):
            t = t.add_(1.0)
        if dim is not None and tp.world > 1:
            a, b = shard_range(t.shape[dim], tp.rank, tp.world, pad=pad)
            t = t.narrow(dim, a, b - a)
            if pad:
                t = _pad_rows(t, vpart)
        return t.contiguous()

    return _finish(shape, tp, _assemble(shape, get))


def iter_tensors(w: BloomWeights) -> Iterable[torch.Tensor]:
    yield from (w.emb, w.emb_ln_w, w.emb_ln_b, w.lnf_w, w.lnf_b)
    for lw in w.layers:
        yield from vars(lw).values()
