#!/usr/bin/env python3
"""The grammar masks' fill alone, on this host's CPUs: rows of one JSON schema walked by seeded random allowed tokens,
the same walk replayed for each way of making the rows' matchers, their masks filled by llguidance's pool each step.
`--templates 1,4,32`: how many independent matchers the grammar keeps, the rows being copies of them in turn
(structured.py `Grammars.matcher`; 1: every row a copy of one, sharing its lexer). Per variant: ms a step, mean,
median, p90 and max, cold (fresh kept matchers) then warm (the same ones again).

    python3 scripts/bench/mask_fill.py --tokenizer .tok/tokenizer.json --schema bounded --templates 1,2,4,32
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", type=Path, required=True, help="tokenizer.json (e.g. the stand-in in .tok/)")
    p.add_argument("--vocab", type=int, default=250_880, help="the model's logits width")
    p.add_argument("--schema", default="bounded", help="bounded, order (structured_bench.py's), or a JSON file")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--templates", default="1,2,4,32")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    from bloom_server import structured
    from bloom_server.types import Grammar
    from structured_bench import BOUNDED, SCHEMA

    schema = {"bounded": BOUNDED, "order": SCHEMA}.get(args.schema) or json.loads(Path(args.schema).read_text())
    g = Grammar("json_schema", json.dumps(schema))
    shifts = torch.arange(32, dtype=torch.int32)
    walk: list[list[int]] = []

    def run(grammars: structured.Grammars) -> list[float]:
        rows = structured.RowMatchers(grammars)
        for i in range(args.rows):
            rows.add(i, g)
        rng, times = random.Random(args.seed), []
        for s in range(args.steps):
            keys = rows.active(list(range(args.rows)))
            if not keys:
                break
            t0 = time.perf_counter()
            bitmask = rows.masks(keys)
            times.append((time.perf_counter() - t0) * 1e3)
            if len(walk) <= s:  # the first run draws the walk; the others replay it
                bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(len(keys), -1)[:, : args.vocab]
                walk.append([rng.choice(bits[j].nonzero().flatten().tolist() or [2]) for j in range(len(keys))])
            rows.advance(list(zip(keys, walk[s])))
        return times

    print(f"{args.rows} rows, schema {args.schema}, {args.steps} steps, pool threads "
          f"{structured.Grammars(args.tokenizer, args.vocab, (2,)).threads}")  # fmt: skip
    print("| kept matchers | run | mean | p50 | p90 | max |\n|---|---|---|---|---|---|")
    for k in (int(x) for x in args.templates.split(",")):
        grammars = structured.Grammars(args.tokenizer, args.vocab, (2,), templates=k)
        grammars.check(g, "schema")
        for name in ("cold", "warm"):
            t = sorted(run(grammars))
            print(f"| {k} | {name} | {statistics.mean(t):.2f} | {statistics.median(t):.2f} | "
                  f"{t[int(0.9 * (len(t) - 1))]:.2f} | {t[-1]:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
