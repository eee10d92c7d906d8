"""The fast tokenizer from tokenizer.json (the `tokenizers` library: no torch, no transformers)."""

from __future__ import annotations

import json
from pathlib import Path


class TextTokenizer:
    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.no_truncation()
        special = _read_json(model_dir / "special_tokens_map.json")
        config = _read_json(model_dir / "config.json")
        self.eos_token_id = self._id(special.get("eos_token"), config.get("eos_token_id"), "</s>")
        pad = self._id(special.get("pad_token"), config.get("pad_token_id"), "<pad>")
        self.bos_token_id = self._id(special.get("bos_token"), config.get("bos_token_id"), "<s>")
        self.pad_token_id: int = pad if pad is not None else (self.eos_token_id if self.eos_token_id is not None else 0)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = {
            i for i in (self.eos_token_id, self.pad_token_id, self.bos_token_id, self._tok.token_to_id("<unk>")) if i
        } | {i for i in (self.eos_token_id, self.pad_token_id, self.bos_token_id) if i is not None}

    def _id(self, token: object, config_id: object, fallback: str) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and self._tok.token_to_id(token) is not None:
            return self._tok.token_to_id(token)
        if isinstance(config_id, int):
            return config_id
        return self._tok.token_to_id(fallback)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: list[int] | tuple[int, ...], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
