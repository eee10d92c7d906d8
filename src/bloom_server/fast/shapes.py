"""BLOOM model shapes: read from a checkpoint's config.json, or one of the published sizes. No torch here."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BloomShape:
    vocab_size: int
    hidden_size: int
    n_layer: int
    n_head: int
    layer_norm_epsilon: float = 1e-5
    # BLOOM checkpoints use False (the residual is the block input); kept for other configs of the family.
    apply_residual_connection_post_layernorm: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> BloomShape:
        hidden = cfg.get("hidden_size", cfg.get("n_embed"))
        shape = cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(hidden),
            n_layer=int(cfg.get("n_layer", cfg.get("num_hidden_layers"))),
            n_head=int(cfg.get("n_head", cfg.get("num_attention_heads"))),
            layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-5)),
            apply_residual_connection_post_layernorm=bool(cfg.get("apply_residual_connection_post_layernorm", False)),
        )
        if shape.head_dim * shape.n_head != shape.hidden_size:
            raise ValueError(f"hidden_size {shape.hidden_size} is not divisible by n_head {shape.n_head}")
        return shape

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> BloomShape:
        return cls.from_config(json.loads((Path(model_dir) / "config.json").read_text()))

    def with_layers(self, n_layer: int) -> BloomShape:
        return replace(self, n_layer=n_layer)

    def params(self) -> int:
        """Parameter count (tied head counted once)."""
        h = self.hidden_size
        per_layer = 3 * h * h + 3 * h + h * h + h + 4 * h * h + 4 * h + 4 * h * h + h + 4 * h  # attn, mlp, 2 LNs
        return self.vocab_size * h + 2 * h + self.n_layer * per_layer + 2 * h

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of one token over every layer (the whole model, all ranks together)."""
        return 2 * self.n_layer * self.hidden_size * dtype_bytes

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "model_type": "bloom",
            "architectures": ["BloomForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "apply_residual_connection_post_layernorm": self.apply_residual_connection_post_layernorm,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 3,
        }


# The published sizes (bigscience/bloom-560m, bloom-7b1, bloom): the shapes random-weight benchmarks build.
PRESETS: dict[str, BloomShape] = {
    "560m": BloomShape(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16),
    "7b1": BloomShape(vocab_size=250880, hidden_size=4096, n_layer=30, n_head=32),
    "176b": BloomShape(vocab_size=250880, hidden_size=14336, n_layer=70, n_head=112),
}
