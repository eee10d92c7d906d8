#!/usr/bin/env python3
"""One loader's bare read of safetensors files onto the GPU (the CPU on a host without one), in a fresh process, for
`scripts/bench/cold_start.py --loaders`: torch's import and CUDA's start are timed apart from the read. Each field
loader reads through its own API as its documentation shows, every tensor of the files; `builtin` is the project's
loader threads (fast/weights.py `read_safetensors`, no prefetch). Prints one JSON line.

    python scripts/bench/bare_read.py fastsafetensors FILE [FILE ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))  # `builtin`: the project's loader


def _fastsafetensors(files: list[str], device, info: dict) -> int:
    from fastsafetensors import SafeTensorsFileLoader

    cuda = device.type == "cuda"
    loader = SafeTensorsFileLoader(None, str(device) if cuda else "cpu", nogds=not cuda)  # GDS where cuFile is
    info["copier"] = getattr(loader.copier_class, "__name__", "?")
    loader.add_filenames({0: files})
    buf = loader.copy_files_to_device()
    n = sum(buf.get_tensor(k).nbytes for k in loader.get_keys())
    buf.close()
    loader.close()
    return n


def _runai(files: list[str], device, info: dict) -> int:
    from runai_model_streamer import SafetensorsStreamer

    n = 0
    with SafetensorsStreamer() as s:
        s.stream_files(files, device=str(device) if device.type == "cuda" else "cpu")
        for _, t in s.get_tensors():
            n += t.nbytes
    return n


def _instanttensor(files: list[str], device, info: dict) -> int:
    from instanttensor import safe_open

    n = 0
    with safe_open(list(files), framework="pt", device=device) as f:
        info["backend"] = getattr(getattr(f, "backend", None), "name", "?")
        for _, t in f.tensors():
            n += t.nbytes
    return n


def _builtin(files: list[str], device, info: dict) -> int:
    from bloom_server.fast.catalog import SCALE_SUFFIX
    from bloom_server.fast.weights import _ST_DTYPES, read_safetensors
    from bloom_server.settings import Settings
    from bloom_server.storage.safetensors import read_header

    headers = [read_header(f) for f in files]
    wanted = [(i, t) for i, h in enumerate(headers) for t in h.tensors]
    # Floating tensors in their stored dtype (the bench's checkpoints have one besides an int8 layout's fp32 scales,
    # which the loader keeps in fp32), so that nothing is cast.
    dtype = next((_ST_DTYPES[t.dtype] for _, t in wanted
                  if _ST_DTYPES[t.dtype].is_floating_point and not t.name.endswith(SCALE_SUFFIX)), None)  # fmt: skip
    threads = Settings.model_fields["load_threads"].default
    chunk = int(Settings.model_fields["load_chunk_mb"].default * 2**20)
    info["threads"] = threads
    out = read_safetensors(headers, wanted, dtype=dtype, device=device, threads=threads, chunk_bytes=chunk)
    return sum(t.nbytes for t in out)


READERS = {"fastsafetensors": _fastsafetensors, "runai": _runai, "instanttensor": _instanttensor,
           "builtin": _builtin}  # fmt: skip


def main(argv: list[str]) -> int:
    name, files = argv[0], argv[1:]
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    torch.zeros(1, device=device)
    if cuda:
        torch.cuda.synchronize()
    t_init = time.perf_counter()
    info: dict = {}
    nbytes = READERS[name](files, device, info)
    if cuda:
        torch.cuda.synchronize()
    t_read = time.perf_counter()
    print(json.dumps({"loader": name, "device": str(device), "init_s": t_init - T0, "read_s": t_read - t_init,
                      "bytes": nbytes, "info": info}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
