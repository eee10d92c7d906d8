"""Field loaders: safetensors tensors read onto the device by a maintained library instead of the project's own read
path (weights.py `read_safetensors` following storage/prefetch.py), chosen by the loader setting
(backends/fast_loader.py picks; weights.py `read_field` places what `stream` yields in this rank's tensors).

- fastsafetensors: its C++ threads read each file (the wanted tensors' byte ranges) straight into one device buffer
  per file, through GPUDirect Storage where the node has cuFile, else parallel reads through pinned bounce buffers;
  tensors are views of that buffer. Runs on a CPU too (its host copier).
- runai (runai-model-streamer): its C++ threads read tensor by tensor into a host ring buffer, each tensor copied to
  the device as it arrives. Runs on a CPU too.
- instanttensor: io_uring / AIO reads into a device ring buffer, each tensor copied out as it is yielded. CUDA only.

`stream` yields (stored name, tensor as stored) as each tensor's bytes are in, so that load progress in /ready grows
during the read as the builtin path's does. Importing this module imports neither torch nor any library: each library
is imported when its loader runs, inside the fast backend's load.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class FieldLoader:
    name: str  # the loader setting's value
    module: str  # the library's top-level module
    dist: str  # its name on the package index (what to install)
    cuda_only: bool


FIELD_LOADERS: dict[str, FieldLoader] = {
    f.name: f
    for f in (
        FieldLoader("fastsafetensors", "fastsafetensors", "fastsafetensors", cuda_only=False),
        FieldLoader("runai", "runai_model_streamer", "runai-model-streamer", cuda_only=False),
        FieldLoader("instanttensor", "instanttensor", "instanttensor", cuda_only=True),
    )
}


def installed(name: str) -> bool:
    """The library of a field loader can be imported (found on the path; nothing is imported)."""
    try:
        return importlib.util.find_spec(FIELD_LOADERS[name].module) is not None
    except (ImportError, ValueError):
        return False


def stream(
    name: str, paths: Sequence[Path], names: Sequence[str], device: torch.device, info: dict[str, Any] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(stored name, tensor in its stored dtype and shape on `device`) for each of `names` (stored names, each in one
    of `paths`), read by the named library, each once its bytes are in. `info` gets what the library chose (copier,
    backend), for the load's log."""
    info = info if info is not None else {}
    files = [str(p) for p in paths]
    if name == "fastsafetensors":
        yield from _fastsafetensors(files, names, device, info)
    elif name == "runai":
        yield from _runai(files, names, device, info)
    elif name == "instanttensor":
        yield from _instanttensor(files, names, device, info)
    else:
        raise ValueError(f"no field loader {name!r}")


def _fastsafetensors(files: list[str], names: Sequence[str], device: torch.device, info: dict[str, Any]):
    from fastsafetensors import SafeTensorsFileLoader

    want = set(names)
    cuda = device.type == "cuda"
    # nogds=False asks for GPUDirect Storage; the library falls back to its bounce-buffer reads where cuFile is not
    # there. On a CPU its host copier reads into host memory.
    loader = SafeTensorsFileLoader(None, f"cuda:{device.index or 0}" if cuda else "cpu", nogds=not cuda)
    info["copier"] = getattr(loader.copier_class, "__name__", "?")
    try:
        loader.set_tensor_filter(want.__contains__)  # its host copiers then read only the wanted byte ranges
        for path in files:  # one file's device buffer at a time: the wanted tensors keep theirs alive
            loader.reset()
            loader.add_filenames({0: [path]})
            meta = loader.meta[path][0]
            order = sorted((k for k in meta.tensors if k in want), key=lambda k: meta.tensors[k].data_offsets[0])
            if not order:
                continue
            # allow_inflight: views exist before the bytes; get_tensor waits for each tensor's own range, so the
            # tensors come out in file order as the reads land.
            buf = loader.copy_files_to_device(allow_inflight=True)
            try:
                for k in order:
                    yield k, buf.get_tensor(k)
            finally:
                buf.close()  # drains the reads; the tensors handed out keep the buffer
    finally:
        loader.close()


def _runai(files: list[str], names: Sequence[str], device: torch.device, info: dict[str, Any]):
    from runai_model_streamer import SafetensorsStreamer

    info["destination"] = "device" if device.type == "cuda" else "host"
    with SafetensorsStreamer() as s:
        s.stream_files(files, device=str(device) if device.type == "cuda" else "cpu", tensor_names=list(names))
        yield from s.get_tensors()


def _instanttensor(files: list[str], names: Sequence[str], device: torch.device, info: dict[str, Any]):
    from instanttensor import safe_open

    with safe_open(list(files), framework="pt", device=device, tensor_filter=list(names),
                   tensor_name_match_mode="exact") as f:  # fmt: skip
        info["backend"] = getattr(getattr(f, "backend", None), "name", "?")
        yield from f.tensors()
