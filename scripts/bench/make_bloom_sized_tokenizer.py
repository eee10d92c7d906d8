#!/usr/bin/env python3
"""A byte-level BPE tokenizer of BLOOM's vocabulary size (250,680 tokens), trained on text already on this machine
(the Python installation's sources and docs), for the benchmarks whose cost grows with the vocabulary (grammar masks:
scripts/bench/grammar_engines.py, scripts/bench/structured_bench.py). It stands in for BLOOM's own tokenizer, which
nothing here may download; its tokens are not BLOOM's.

    python scripts/bench/make_bloom_sized_tokenizer.py .tok/tokenizer.json     # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

VOCAB = 250_680
SUFFIXES = (".py", ".md", ".txt", ".rst", ".html", ".json")


def corpus(roots: list[str], limit_bytes: int) -> list[str]:
    files, total = [], 0
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                if not name.endswith(SUFFIXES):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    size = os.path.getsize(path)
                except OSError:
                    continue
                if 200 < size < 2_000_000:
                    files.append(path)
                    total += size
            if total > limit_bytes:
                return files
    return files


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="where the tokenizer.json goes")
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--corpus-mb", type=int, default=300, help="text read for training (MB)")
    args = p.parse_args()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    roots = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"], "/usr/share/doc", "/usr/share"]
    files = corpus(roots, args.corpus_mb * 1_000_000)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, min_frequency=2,
                                  special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip

    def texts() -> Iterator[str]:
        for path in files:
            try:
                with open(path, encoding="utf-8", errors="ignore") as f:
                    yield f.read()
            except OSError:
                continue

    t = time.monotonic()
    tok.train_from_iterator(texts(), trainer)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out))
    print(f"{args.out}: {tok.get_vocab_size()} tokens from {len(files)} files in {time.monotonic() - t:.0f} s")
    return 0 if tok.get_vocab_size() == args.vocab else 1


if __name__ == "__main__":
    sys.exit(main())
