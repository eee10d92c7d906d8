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
        # A byte-level decoder's text is the UTF-8 of the tokens' bytes put together, so a text can be decoded in pieces
        # split after a complete character (IncrementalText); other decoders are decoded whole each time.
        self.bytewise = (_read_json(model_dir / "tokenizer.json").get("decoder") or {}).get("type") == "ByteLevel"
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

    def incremental(self) -> IncrementalText:
        """A decoder for one growing list of ids (a streamed row): `decode(ids)` without re-decoding the whole list."""
        return IncrementalText(self)


class IncrementalText:
    """`text(ids)` == tokenizer.decode(ids) for a list that only grows between calls. With a byte-level decoder it
    decodes only the ids after the last point where the text so far ended in a complete character (no trailing
    U+FFFD, which is what a cut character decodes to): the bytes before such a point decode alone, exactly. Streaming
    cost per token: the few ids since that point, not the whole row."""

    __slots__ = ("_tok", "_done", "_text")

    def __init__(self, tokenizer: TextTokenizer):
        self._tok = tokenizer
        self._done = 0  # ids already in self._text
        self._text = ""

    def text(self, ids: list[int]) -> str:
        if not self._tok.bytewise:
            return self._tok.decode(ids)
        tail = self._tok.decode(ids[self._done :])
        if tail.endswith("\ufffd"):  # maybe a character still coming: decode these ids again next time
            return self._text + tail
        self._text += tail
        self._done = len(ids)
        return self._text


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
