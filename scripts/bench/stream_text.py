#!/usr/bin/env python3
"""The event loop's text work per streamed token: the whole row decoded again (the former way) against the
incremental decoder (frontend/tokenizer.py IncrementalText), on random rows of a tokenizer's ids.

    python3 scripts/bench/stream_text.py --tokenizer-dir .tok --rows 16 --length 512
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))


def main() -> int:
    from bloom_server.frontend.tokenizer import TextTokenizer
    from bloom_server.storage.tiny import build_tiny_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer-dir", type=Path, default=None, help="a directory with tokenizer.json (default: the "
                   "embedded tiny model's)")  # fmt: skip
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--length", type=int, default=512, help="tokens per row")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    d = args.tokenizer_dir
    if d is None:
        import tempfile

        d = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    tok = TextTokenizer(d)
    rnd = random.Random(args.seed)
    rows = [[rnd.randrange(tok.vocab_size) for _ in range(args.length)] for _ in range(args.rows)]
    print(f"tokenizer {d} (vocabulary {tok.vocab_size}, byte-level: {tok.bytewise}); {args.rows} rows of {args.length}")
    for name in ("whole row", "incremental"):
        t0, n = time.perf_counter(), 0
        for r in rows:
            inc, grown = tok.incremental(), []
            for t in r:
                grown.append(t)
                tok.decode(grown) if name == "whole row" else inc.text(grown)
                n += 1
        print(f"{name}: {1e6 * (time.perf_counter() - t0) / n:.1f} us per token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
