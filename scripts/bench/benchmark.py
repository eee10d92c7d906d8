#!/usr/bin/env python3
"""Decode speed of the fast engine, transformers and DeepSpeed-Inference side by side (same weights, same run).

The same program as `bloom-server bench`; it lives in the package (bloom_server/tools/bench.py) so the container
image, which carries only src/, has it too. Run from a checkout, installed or not:

    python scripts/bench/benchmark.py --backend fast,hf --random-weights 7b1 --batch-size 1,8 --new-tokens 100
    deepspeed --num_gpus 2 scripts/bench/benchmark.py --backend fast,ds_inference --random-weights 176b --layers 4
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from bloom_server.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
