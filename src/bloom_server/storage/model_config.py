"""The model's config.json, checked before anything is allocated: a crafted or broken config must end in a clear
start-up error naming the field (exit 2), not in a traceback or an allocation the OOM killer ends. Standard library
only: it runs before torch is imported.

What is checked: the sizes are integers (not booleans) within bounds wide enough for any BLOOM (BLOOM-176B: 70
layers, hidden 14336, 112 heads, vocabulary 250880); the hidden size divides by the heads; the weights on disk agree
with the config (safetensors: the embedding's shape and the number of layers, read from their headers; other
formats: enough bytes for the parameters); and the memory the weights need fits the devices (`fits_memory`).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from bloom_server.errors import ModelDirError

# (field, names it goes by in config.json, lower bound, upper bound, transformers' BloomConfig default when absent)
BOUNDS = (
    ("n_layer", ("n_layer", "num_hidden_layers"), 1, 512, 2),
    ("n_head", ("n_head", "num_attention_heads"), 1, 1024, 8),
    ("hidden_size", ("hidden_size", "n_embed"), 1, 1 << 17, 64),
    ("vocab_size", ("vocab_size",), 1, 1 << 21, 250880),
)
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
_LAYER = re.compile(r"(?:^|\.)h\.(\d+)\.")
_HEADER_LIMIT = 100 << 20  # a safetensors header larger than this is not one


def read_sizes(path: Path) -> dict[str, int]:
    """n_layer, n_head, hidden_size, vocab_size from `path`/config.json, each checked; ModelDirError naming the field
    otherwise."""
    f = Path(path) / "config.json"
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ModelDirError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ModelDirError(f"{f}: not a JSON object")
    sizes = {}
    explicit = 0
    for field, names, low, high, default in BOUNDS:
        name = next((n for n in names if n in data), None)
        if name is None:  # as transformers reads it
            sizes[field] = default
            continue
        explicit += 1
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelDirError(f"{f}: {name}: must be an integer (got {json.dumps(value)[:40]})")
        if not low <= value <= high:
            raise ModelDirError(f"{f}: {name}: {value} is outside [{low}, {high}]")
        sizes[field] = value
    if sizes["hidden_size"] % sizes["n_head"]:
        raise ModelDirError(f"{f}: hidden_size: {sizes['hidden_size']} is not divisible by n_head ({sizes['n_head']})")
    sizes["explicit"] = int(explicit == len(BOUNDS))  # every size given: the weights' size can be judged by it
    return sizes


def parameters(sizes: dict[str, int]) -> int:
    """BLOOM's parameter count: embeddings and their norm, per layer attention (qkv, dense), MLP (4h), two norms,
    and the final norm."""
    h, layers, vocab = sizes["hidden_size"], sizes["n_layer"], sizes["vocab_size"]
    return vocab * h + 2 * h + layers * (12 * h * h + 13 * h) + 2 * h


def safetensors_header(f: Path) -> dict[str, Any]:
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= _HEADER_LIMIT:
                raise ModelDirError(f"{f}: not a safetensors file (header length {n})")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, RecursionError) as e:
        raise ModelDirError(f"{f}: unreadable safetensors header ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise ModelDirError(f"{f}: not a safetensors file")
    return header


def check_weights(path: Path, sizes: dict[str, int], files: list[Path], fmt: str) -> None:
    """The weights on disk against the config: ModelDirError naming the config field they contradict."""
    cfg = Path(path) / "config.json"
    if fmt == "safetensors" and files:
        shapes: dict[str, Any] = {}
        for f in files:
            for name, entry in safetensors_header(f).items():
                if name != "__metadata__" and isinstance(entry, dict):
                    shapes[name] = entry.get("shape")
        emb = next((s for n, s in shapes.items() if n.endswith("word_embeddings.weight")), None)
        if isinstance(emb, list) and len(emb) == 2:
            if emb[1] != sizes["hidden_size"]:
                raise ModelDirError(f"{cfg}: hidden_size: {sizes['hidden_size']}, but the weights' embedding is "
                                    f"{emb[0]} x {emb[1]}")  # fmt: skip
            if emb[0] != sizes["vocab_size"]:
                raise ModelDirError(f"{cfg}: vocab_size: {sizes['vocab_size']}, but the weights' embedding has "
                                    f"{emb[0]} rows")  # fmt: skip
        layers = {int(m.group(1)) for n in shapes if (m := _LAYER.search(n))}
        if layers and max(layers) + 1 != sizes["n_layer"]:
            raise ModelDirError(f"{cfg}: n_layer: {sizes['n_layer']}, but the weights hold {max(layers) + 1} layers")
        return
    if not sizes.get("explicit"):
        return
    on_disk = sum(f.stat().st_size for f in files if f.is_file())
    need = parameters(sizes)  # at one byte a parameter (int8), the smallest any backend stores
    if files and on_disk < need * 0.9:
        raise ModelDirError(f"{cfg}: n_layer/hidden_size: {sizes['n_layer']} layers of {sizes['hidden_size']} make "
                            f"{need:,} parameters, but the weights on disk hold {on_disk:,} bytes")  # fmt: skip


def fits_memory(path: Path, sizes: dict[str, int], dtype: str, available: int, where: str, share: int = 1) -> None:
    """ModelDirError when the weights (in `dtype`, split `share` ways) need more than `available` bytes."""
    per_param = DTYPE_BYTES.get(dtype, 2)
    need = parameters(sizes) * per_param // max(1, share)
    if available > 0 and need > available:
        raise ModelDirError(
            f"{Path(path) / 'config.json'}: n_layer/hidden_size: {sizes['n_layer']} layers of {sizes['hidden_size']} "
            f"need {need / 2**30:.1f} GiB for the weights alone ({dtype}"
            f"{f', split {share} ways' if share > 1 else ''}), more than {where} has ({available / 2**30:.1f} GiB)"
        )


def host_memory() -> int:
    """Physical memory of this host in bytes (0 when unknown)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
