"""The frontend's tokenizer wrapper: the streamed text's incremental decoding equals a whole decode at every token."""

from __future__ import annotations

import random

import pytest

from bloom_server.frontend.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return TextTokenizer(tiny_model_dir)


def _byte_ids(tok: TextTokenizer) -> dict[int, int]:
    """byte -> the id of the token that is that one raw byte (the byte-level alphabet: GPT-2's printable stand-in
    for each byte), so that a character can be cut across tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    stand_in, extra = {}, 0
    for b in range(256):
        if b in printable:
            stand_in[b] = chr(b)
        else:
            stand_in[b] = chr(256 + extra)
            extra += 1
    ids = {b: tok._tok.token_to_id(c) for b, c in stand_in.items()}
    assert all(i is not None for i in ids.values())
    return ids


def test_the_embedded_tokenizer_is_byte_level(tok):
    assert tok.bytewise


@pytest.mark.parametrize("seed", range(6))
def test_incremental_text_equals_a_whole_decode_after_every_token(tok, seed):
    """Random rows mixing words, accented and CJK characters cut into their bytes' tokens, lone continuation bytes
    (text that never becomes valid UTF-8), special tokens and a literal U+FFFD: after each token, the incremental
    text is the whole decode, as the stream's text was before."""
    rnd = random.Random(seed)
    byte_ids = _byte_ids(tok)
    words = [tok.encode(w) for w in (" the", " café", " naïve", " 東京", " 😀", " \ufffd", "\n", " value", "x")]
    multibyte = [c.encode() for c in "é東😀ß"]
    specials = sorted(tok.special_ids)
    ids: list[int] = []
    for _ in range(400):
        kind = rnd.random()
        if kind < 0.4:
            ids.extend(rnd.choice(words))
        elif kind < 0.7:  # a character's bytes, one token each, sometimes only its first bytes
            raw = rnd.choice(multibyte)
            ids.extend(byte_ids[b] for b in raw[: rnd.randint(1, len(raw))])
        elif kind < 0.8:  # a lone continuation byte: never valid
            ids.append(byte_ids[rnd.randrange(0x80, 0xC0)])
        elif kind < 0.9:
            ids.append(rnd.randrange(tok.vocab_size))
        else:
            ids.append(rnd.choice(specials))
    inc = tok.incremental()
    grown: list[int] = []
    for t in ids:
        grown.append(t)
        assert inc.text(grown) == tok.decode(grown), len(grown)


def test_a_cut_character_is_held_until_its_last_byte(tok):
    inc = tok.incremental()
    byte_ids = _byte_ids(tok)
    first, second = "é".encode()
    ids = [*tok.encode(" caf"), byte_ids[first]]
    assert inc.text(ids) == tok.decode(ids) and ids and inc.text(ids).endswith("\ufffd")  # half a character
    ids.append(byte_ids[second])
    assert inc.text(ids) == " café" == tok.decode(ids)
