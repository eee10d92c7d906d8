#!/usr/bin/env python3
"""How long small torch calls take on one thread while another thread runs Python, per GIL switch interval: a torch
call releases the GIL, and getting it back behind a busy thread can take up to the switch interval (the engine
thread behind the event loop, in the server).

    python3 scripts/bench/gil_convoy.py --calls 200 --intervals-ms 5,0.5,0.1
"""

from __future__ import annotations

import argparse
import sys
import threading
import time


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--intervals-ms", default="5,0.5,0.1")
    args = p.parse_args()
    x = torch.zeros(8)

    def calls(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            x.add_(1)
        return time.perf_counter() - t0

    def busy(stop: threading.Event) -> None:
        while not stop.is_set():
            sum(i * i for i in range(2000))

    for ms in (float(v) for v in args.intervals_ms.split(",")):
        sys.setswitchinterval(ms / 1e3)
        alone = calls(args.calls)
        stop = threading.Event()
        hog = threading.Thread(target=busy, args=(stop,))
        hog.start()
        time.sleep(0.05)
        took: list[float] = []
        t = threading.Thread(target=lambda out=took: out.append(calls(args.calls)))
        t.start()
        t.join()
        stop.set()
        hog.join()
        print(f"switch interval {ms:g} ms: {args.calls} calls alone {1e3 * alone:.1f} ms, beside a busy Python "
              f"thread {1e3 * took[0]:.1f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
