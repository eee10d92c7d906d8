"""The load's prefetch in a child process (`loading.Prefetcher(process=True)`, BLOOM_LOAD_PREFETCH_PROCESS): the
parent's reads would wait for its GIL whenever its main thread holds it (torch's import, CUDA start-up, long C
calls), leaving the disk idle; here nothing else runs. Protocol, on the pipes the parent opened: one JSON line in
(paths, chunks as [file, offset, length], threads, budget, throttle_mbps), then one line per loader demand (the count
of chunks it has asked for, so a reader paused at the memory budget goes on); out, one line per chunk read (its
index). End of input (the parent closed the pipe or died): stop after the chunks being read. Exit 0 once every chunk
was read, 1 otherwise (the parent's loader then reads the rest from the disk itself)."""

from __future__ import annotations

import json
import os
import sys
import threading

from bloom_server.storage.safetensors import Chunk

from bloom_server.storage.prefetch import Prefetcher, ReadThrottle


def main() -> int:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    job = json.loads(stdin.readline())
    lock = threading.Lock()

    def report(i: int) -> None:
        with lock:
            stdout.write(b"%d\n" % i)
            stdout.flush()

    throttle = ReadThrottle(job["throttle_mbps"]) if job.get("throttle_mbps") else None
    p = Prefetcher(job["paths"], [Chunk(f, o, n, ()) for f, o, n in job["chunks"]], threads=job["threads"],
                   throttle=throttle, budget=job["budget"], on_read=report)  # fmt: skip

    def demands() -> None:
        for line in stdin:
            p.advance(int(line))
        p.close()

    threading.Thread(target=demands, name="bloom-prefetch-demand", daemon=True).start()
    p.start()
    p.join()
    return 0 if p.stats()["state"] == "finished" else 1


if __name__ == "__main__":
    try:
        code = main()
    except BrokenPipeError:  # the parent is gone
        code = 1
    try:
        sys.stdout.flush()
    except OSError:
        code = 1
    # Not sys.exit: the demand thread is blocked reading stdin, and an interpreter shutdown around it aborts.
    os._exit(code)
