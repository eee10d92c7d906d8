"""This rank's BLOOM tensors: from a checkpoint directory (reading only this rank's slices), from an in-memory state
dict (a transformers model's, sharing its storage where no split or cast is needed), or seeded random ones.

Names are the checkpoint's without the "transformer." prefix (bigscience's own files have none; transformers'
`save_pretrained` adds it). `lm_head.weight`, where present, is the tied word embedding and is not read.

Weight-only int8 (fast/quant.py): the quantized weights are int8 tensors in the same fields, with their fp32 row
scales beside them (the `*_s` fields; None in a floating model). A pre-sharded int8 checkpoint stores both
(NAME and NAME + SCALE_SUFFIX) and is read as it is stored.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from bloom_server.errors import ModelDirError
from bloom_server.fast.catalog import LAYER_FIELDS, QUANT_GLOBAL, QUANT_LAYER, SCALE_SUFFIX, full_shapes
from bloom_server.fast.loaders import stream
from bloom_server.fast.shapes import BloomShape
from bloom_server.fast.tp import TPGroup, shard_range, split_dim
from bloom_server.progress import LoadProgress
from bloom_server.storage.prefetch import ReadThrottle
from bloom_server.storage.safetensors import (
    Chunk,
    SafetensorsFile,
    TensorEntry,
    plan_chunks,
    read_header,
    wanted_entries,
    weights_source,
)

PREFIX = "transformer."
log = logging.getLogger(__name__)


@dataclass
class LayerWeights:
    """One block, this rank's shard. h = hidden, hp = heads on this rank, D = head dim, f = 4h / world."""

    ln1_w: torch.Tensor  # [h]
    ln1_b: torch.Tensor  # [h]
    qkv_w: torch.Tensor  # [hp*3*D, h]   rows (head, {q,k,v}, D) as BLOOM stores them
    qkv_b: torch.Tensor  # [hp*3*D]
    dense_w: torch.Tensor  # [h, hp*D]
    dense_b: torch.Tensor  # [h]        added once, after the all-reduce
    ln2_w: torch.Tensor  # [h]
    ln2_b: torch.Tensor  # [h]
    fc1_w: torch.Tensor  # [f, h]     dense_h_to_4h
    fc1_b: torch.Tensor  # [f]
    fc2_w: torch.Tensor  # [h, f]     dense_4h_to_h
    fc2_b: torch.Tensor  # [h]        added once, after the all-reduce
    # int8 weights only: fp32 scale of each output row of the weight of the same name (fast/quant.py)
    qkv_s: torch.Tensor | None = None
    dense_s: torch.Tensor | None = None
    fc1_s: torch.Tensor | None = None
    fc2_s: torch.Tensor | None = None


_LAYER_NAMES = LAYER_FIELDS


@dataclass
class BloomWeights:
    emb: torch.Tensor  # [Vp, h]: vocab rows [vocab_start, vocab_start + Vp) of the word embedding, zero-padded
    emb_ln_w: torch.Tensor
    emb_ln_b: torch.Tensor
    layers: list[LayerWeights]
    lnf_w: torch.Tensor
    lnf_b: torch.Tensor
    vocab_start: int = 0
    vocab_size: int = 0  # the real vocabulary (all ranks)
    emb_s: torch.Tensor | None = None  # int8 weights only: [Vp] fp32 scale of each vocabulary row
    extra: dict = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        """Weight-only int8 (fast/quant.py)."""
        return self.emb_s is not None or any(lw.qkv_s is not None for lw in self.layers[:1])

    def nbytes(self) -> int:
        """Bytes of this rank's weights as they are resident (what a decode step reads at least once), scales
        included."""
        return sum(t.numel() * t.element_size() for t in iter_tensors(self))

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """transformers names, for one rank holding everything (tp 1): lets a transformers model share these tensors."""
        if self.quantized:
            raise ValueError("to_hf_state_dict needs floating weights (these are int8)")
        if self.emb.shape[0] != self.vocab_size:
            raise ValueError("to_hf_state_dict needs the unsharded weights (tensor-parallel degree 1)")
        sd = {
            "transformer.word_embeddings.weight": self.emb,
            "transformer.word_embeddings_layernorm.weight": self.emb_ln_w,
            "transformer.word_embeddings_layernorm.bias": self.emb_ln_b,
            "transformer.ln_f.weight": self.lnf_w,
            "transformer.ln_f.bias": self.lnf_b,
            "lm_head.weight": self.emb,
        }
        for i, lw in enumerate(self.layers):
            for attr, name in _LAYER_NAMES.items():
                sd[f"transformer.h.{i}.{name}"] = getattr(lw, attr)
        return sd


# A getter returns this rank's part of a named tensor: (name, split dim or None, vocab padding?) -> tensor.
Getter = Callable[[str, "int | None", bool], torch.Tensor]


def _assemble(shape: BloomShape, get: Getter, quant: bool = False) -> BloomWeights:
    """The weights from a getter; `quant`: int8 weights, whose scales the getter gives too (NAME + SCALE_SUFFIX)."""
    layers = []
    for i in range(shape.n_layer):
        parts = {}
        for attr, name in _LAYER_NAMES.items():
            full = f"h.{i}.{name}"
            parts[attr] = get(full, split_dim(full), False)
            if quant and attr in QUANT_LAYER:
                parts[QUANT_LAYER[attr]] = get(full + SCALE_SUFFIX, split_dim(full + SCALE_SUFFIX), False)
        layers.append(LayerWeights(**parts))
    scales = {}
    if quant:
        for name, (_, sfield) in QUANT_GLOBAL.items():
            scales[sfield] = get(name + SCALE_SUFFIX, split_dim(name + SCALE_SUFFIX), padded_rows(name))
    return BloomWeights(
        emb=get("word_embeddings.weight", 0, True),
        emb_ln_w=get("word_embeddings_layernorm.weight", None, False),
        emb_ln_b=get("word_embeddings_layernorm.bias", None, False),
        layers=layers,
        lnf_w=get("ln_f.weight", None, False),
        lnf_b=get("ln_f.bias", None, False),
        vocab_size=shape.vocab_size,
        **scales,
    )


def padded_rows(name: str) -> bool:
    """The vocabulary-parallel tensors (the word embedding and its int8 scales): split with padding."""
    return name.removesuffix(SCALE_SUFFIX).endswith("word_embeddings.weight")


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


def _finish(shape: BloomShape, tp: TPGroup, w: BloomWeights) -> BloomWeights:
    w.vocab_start = shard_range(shape.vocab_size, tp.rank, tp.world, pad=True)[0] if tp.world > 1 else 0
    return w


def from_state_dict(
    sd: Mapping[str, torch.Tensor],
    shape: BloomShape,
    tp: TPGroup | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> BloomWeights:
    """Shard a full state dict. With one rank and tensors already of `dtype` on `device`, nothing is copied."""
    tp = tp or TPGroup()
    names = {k[len(PREFIX) :] if k.startswith(PREFIX) else k: k for k in sd}
    vpart = -(-shape.vocab_size // tp.world)

    def get(name: str, dim: int | None, pad: bool) -> torch.Tensor:
        t = sd[names[name]]
        if dim is not None and tp.world > 1:
            a, b = shard_range(t.shape[dim], tp.rank, tp.world, pad=pad)
            # clone: a narrowed view would keep the whole tensor's storage alive on this rank.
            t = t.narrow(dim, a, b - a).clone()
            if pad:
                t = _pad_rows(t, vpart)
        return t.to(device=device if device is not None else t.device, dtype=dtype or t.dtype)

    return _finish(shape, tp, _assemble(shape, get))


def required_names(shape: BloomShape, quant: bool = False) -> list[str]:
    """The checkpoint names (without "transformer.") the engine needs, in the order a pre-sharded file stores them;
    `quant`: an int8 checkpoint's, each quantized weight followed by its scales."""
    q = {LAYER_FIELDS[f] for f in QUANT_LAYER} | set(QUANT_GLOBAL) if quant else set()

    def with_scale(name: str, base: str) -> list[str]:
        return [name, name + SCALE_SUFFIX] if base in q else [name]

    names = with_scale("word_embeddings.weight", "word_embeddings.weight")
    names += ["word_embeddings_layernorm.weight", "word_embeddings_layernorm.bias"]
    for i in range(shape.n_layer):
        for n in _LAYER_NAMES.values():
            names += with_scale(f"h.{i}.{n}", n)
    return names + ["ln_f.weight", "ln_f.bias"]


def rank_shape(name: str, full: tuple[int, ...], rank: int, world: int) -> tuple[int, ...]:
    """Shape of rank's part of a tensor of shape `full` (the vocabulary padded up to a multiple of world)."""
    dim = split_dim(name)
    if dim is None or world == 1:
        return tuple(full)
    out = list(full)
    out[dim] = -(-full[dim] // world) if padded_rows(name) else full[dim] // world
    return tuple(out)


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
IOV_MAX = 1024


def _dtypes(path: Path, t: TensorEntry, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(stored, loaded) dtype of a tensor: floating tensors are loaded in `dtype` (int8 scales, NAME + SCALE_SUFFIX,
    in fp32), the others as stored; a dtype the engine does not read is refused, naming the file."""
    if t.dtype not in _ST_DTYPES:
        raise ModelDirError(f"{path}: {t.name} has dtype {t.dtype}, which the fast engine does not read")
    fdt = _ST_DTYPES[t.dtype]
    return fdt, (torch.float32 if t.name.endswith(SCALE_SUFFIX) else dtype) if fdt.is_floating_point else fdt


def _host_view(t: torch.Tensor, offset: int, nbytes: int) -> memoryview:
    """A writable memoryview of nbytes of a host tensor's memory from byte `offset` (no copy)."""
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr() + offset)).cast("B")


def _preadv_all(fd: int, views: list[memoryview], offset: int, path: Path) -> None:
    """Fill every view from the file at `offset`, in as few system calls as the kernel allows."""
    views = [v for v in views if len(v)]
    while views:
        batch = views[:IOV_MAX]
        want = sum(len(v) for v in batch)
        n = os.preadv(fd, batch, offset)
        if n <= 0:
            raise ModelDirError(f"{path}: unexpected end of file at byte {offset} (truncated while loading?)")
        offset += n
        if n == want:
            views = views[len(batch) :]
            continue
        while n:  # a short read: drop what was filled, keep the rest of the view it stopped in
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


def read_safetensors(
    files: Sequence[SafetensorsFile],
    wanted: Sequence[tuple[int, TensorEntry]],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    progress: LoadProgress | None = None,
    threads: int = 4,
    chunk_bytes: int = 32 << 20,
    throttle: ReadThrottle | None = None,
) -> list[torch.Tensor]:
    """The wanted tensors, read with large sequential `preadv` calls by `threads` threads straight into their final
    storage: on the CPU the read lands in the tensor itself (one scatter read per chunk, no copy); on CUDA it lands in
    a pinned buffer (two per thread) whose device copy runs on the thread's stream while the thread reads its next
    chunk. Floating tensors come out in `dtype` (int8 scales, NAME + SCALE_SUFFIX, in fp32); only a tensor stored in
    another dtype is staged and cast.

    With a prefetcher running (`progress.prefetcher`, loading.start_prefetch: the load's one sequential disk stream),
    each chunk is read only once the prefetcher has read past it, so the `preadv` copies from the page cache and the
    disk sees one stream; where the prefetcher does not cover a chunk, has stopped or failed, the chunk is read from
    the disk here (and throttled here: `throttle` applies to disk reads only). The prefetcher is closed at the end."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    out: list[torch.Tensor | None] = []
    raw: list[torch.Tensor] = []
    casts: list[tuple[int, torch.dtype, tuple[int, ...]]] = []
    for i, (_, t) in enumerate(wanted):
        fdt, final = _dtypes(files[wanted[i][0]].path, t, dtype)
        if fdt == final:
            dst = torch.empty(t.shape, dtype=fdt, device=device)
            out.append(dst)
            raw.append(dst.reshape(-1).view(torch.uint8))
        else:
            out.append(None)
            raw.append(torch.empty(t.nbytes, dtype=torch.uint8, device=device))
            casts.append((i, fdt, t.shape))
    chunks = plan_chunks(wanted, chunk_bytes)
    if progress is not None:
        progress.set_total(sum(t.nbytes for _, t in wanted))
    fds = [os.open(f.path, os.O_RDONLY) for f in files]
    for fd in fds:
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass
    state = {"next": 0, "error": None, "own": 0}
    lock = threading.Lock()
    ahead = getattr(progress, "prefetcher", None) if progress is not None else None

    def cached(c: Chunk) -> bool:
        """Wait until the prefetcher has read past chunk `c`: True (its bytes are in the page cache); False: read it
        from the disk here (no prefetcher, a file it does not read, or it stopped: never a hang)."""
        if ahead is None:
            return False
        k = ahead.need(files[c.file].path, c.offset + c.length)
        return k is not None and ahead.wait_for(k)

    def take() -> Chunk | None:
        with lock:
            if state["error"] is not None or state["next"] >= len(chunks):
                return None
            c = chunks[state["next"]]
            state["next"] += 1
            return c

    def cpu_worker() -> None:
        scratch = bytearray(1 << 20)
        for c in iter(take, None):
            views, pos = [], 0
            for p in sorted(c.pieces, key=lambda p: p.chunk_offset):
                while p.chunk_offset > pos:  # a gap between tensors: read through it
                    n = min(p.chunk_offset - pos, len(scratch))
                    views.append(memoryview(scratch)[:n])
                    pos += n
                views.append(_host_view(raw[p.tensor], p.dst_offset, p.nbytes))
                pos += p.nbytes
            hit = cached(c)
            _preadv_all(fds[c.file], views, c.offset, files[c.file].path)
            done(c, hit)

    def cuda_worker() -> None:
        torch.cuda.set_device(device)
        copies = torch.cuda.Stream(device)
        size = max(c.length for c in chunks)
        bufs = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        events: list[torch.cuda.Event | None] = [None, None]
        k = 0
        for c in iter(take, None):
            b = k % 2
            k += 1
            if events[b] is not None:
                events[b].synchronize()  # the copy out of this buffer (two chunks ago) is done
            hit = cached(c)
            _preadv_all(fds[c.file], [_host_view(bufs[b], 0, c.length)], c.offset, files[c.file].path)
            with torch.cuda.stream(copies):
                for p in c.pieces:
                    raw[p.tensor][p.dst_offset : p.dst_offset + p.nbytes].copy_(
                        bufs[b][p.chunk_offset : p.chunk_offset + p.nbytes], non_blocking=True
                    )
                ev = torch.cuda.Event()
                ev.record(copies)
                events[b] = ev
            done(c, hit)
        copies.synchronize()

    def done(c: Chunk, hit: bool) -> None:
        if not hit:
            with lock:
                state["own"] += 1
            if throttle is not None:
                throttle.wait(c.length)
        if progress is not None:
            progress.add(c.wanted_bytes)

    def guarded(fn) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            with lock:
                if state["error"] is None:
                    state["error"] = e

    worker = cuda_worker if cuda else cpu_worker
    n = max(1, min(threads, len(chunks)))
    try:
        if not chunks:
            pass
        elif n == 1:
            worker()
        else:
            pool = [threading.Thread(target=guarded, args=(worker,), name=f"bloom-load-{i}", daemon=True)
                    for i in range(n)]  # fmt: skip
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            if state["error"] is not None:
                raise state["error"]
    finally:
        for fd in fds:
            os.close(fd)
        if ahead is not None:
            ahead.close()  # done with it (normally it has finished: it read every chunk first)
            st = ahead.stats()
            progress.note("loader waited for the prefetcher, s", st["loader_wait_s"])  # type: ignore[union-attr]
            progress.note("prefetch pauses at its memory budget", st["pauses"])  # type: ignore[union-attr]
            progress.note("chunks the loader read from disk itself", state["own"])  # type: ignore[union-attr]
    for i, fdt, shp in casts:
        out[i] = raw[i].view(fdt).view(shp).to(dtype)
        raw[i] = None  # type: ignore[call-overload]
    return out  # type: ignore[return-value]


def read_field(
    loader: str,
    files: Sequence[SafetensorsFile],
    wanted: Sequence[tuple[int, TensorEntry]],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    progress: LoadProgress | None = None,
    part: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """The wanted tensors as `read_safetensors` gives them (same order, dtypes, device), read by a field loader
    (fast/loaders.py: `loader` names it). `part(i, tensor)`: this rank's part of wanted tensor i, read whole (several
    ranks over a plain checkpoint), taken as each tensor arrives so that the whole one is dropped at once.

    With a field loader chosen the prefetch is not started (backends/fast_coldstart.py); one that runs anyway (a
    caller that started it) is closed as the library starts, so that the disk has one reader, and what it had read is
    noted ("prefetched before the field loader started, GB": 0 without one)."""
    device = torch.device(device)
    index = {t.name: i for i, (_, t) in enumerate(wanted)}
    kinds = [_dtypes(files[fi].path, t, dtype) for fi, t in wanted]
    if progress is not None:
        progress.set_total(sum(t.nbytes for _, t in wanted))
        ahead = progress.prefetcher
        if ahead is not None:
            ahead.close()
        read = ahead.stats()["read_bytes"] if ahead is not None else 0
        progress.note("prefetched before the field loader started, GB", read / 1e9)
    out: list[torch.Tensor | None] = [None] * len(wanted)
    info: dict[str, object] = {}
    t0 = time.perf_counter()
    paths = [files[fi].path for fi in sorted({fi for fi, _ in wanted})]
    for name, t in stream(loader, paths, list(index), device, info):
        i = index.get(name)
        if i is None or out[i] is not None:
            raise ModelDirError(f"{loader} gave {name!r}, which was not asked for (or twice)")
        fi, entry = wanted[i]
        stored, final = kinds[i]
        if tuple(t.shape) != entry.shape or t.dtype != stored:
            raise ModelDirError(f"{files[fi].path}: {loader} read {name} as {t.dtype}{list(t.shape)}, the header "
                                f"says {entry.dtype}{list(entry.shape)}")  # fmt: skip
        if part is not None:
            t = part(i, t)
        out[i] = t if t.device == device and t.dtype == final else t.to(device=device, dtype=final)
        if progress is not None:
            progress.add(entry.nbytes)
    missing = [wanted[i][1].name for i, t in enumerate(out) if t is None]
    if missing:
        raise ModelDirError(f"{loader} did not give {missing[0]!r} ({len(missing)} tensors missing)")
    took = time.perf_counter() - t0
    if progress is not None:
        progress.note("field loader read, s", took)
    nbytes = sum(t.nbytes for _, t in wanted)
    log.info("%s read %.2f GB onto %s in %.2f s (%.2f GB/s; %s)", loader, nbytes / 1e9, device, took,
             nbytes / 1e9 / max(took, 1e-9), ", ".join(f"{k} {v}" for k, v in info.items()) or "-")  # fmt: skip
    return out  # type: ignore[return-value]


def _load_presharded(path: Path, shape: BloomShape, tp: TPGroup, dtype, device, reader) -> BloomWeights:
    header = read_header(path)
    meta = header.metadata
    if meta.get("tp_size") != str(tp.world) or meta.get("tp_rank") != str(tp.rank):
        raise ModelDirError(
            f"{path}: holds rank {meta.get('tp_rank')} of {meta.get('tp_size')}, not rank {tp.rank} of {tp.world}"
        )
    quant = any(t.name.endswith(SCALE_SUFFIX) for t in header.tensors)  # `bloom-server preshard --dtype int8`
    names = required_names(shape, quant)
    wanted, missing = wanted_entries([header], names)
    if missing:
        raise ModelDirError(
            f"{path}: no tensor {missing[0]!r} ({len(missing)} missing): not a pre-sharded BLOOM of this shape"
        )
    full = _full_shapes(shape)
    for name, (_, t) in zip(names, wanted):
        want = rank_shape(name, full[name], tp.rank, tp.world)
        if t.shape != want:
            raise ModelDirError(f"{path}: {name} is {list(t.shape)}, rank {tp.rank} of {tp.world} needs {list(want)}")
    tensors = dict(zip(names, reader([header], wanted, dtype=dtype, device=device)))
    return _finish(shape, tp, _assemble(shape, lambda name, dim, pad: tensors[name], quant))


def _full_shapes(shape: BloomShape) -> dict[str, tuple[int, ...]]:
    return full_shapes(shape.hidden_size, shape.vocab_size, shape.n_layer)


def from_checkpoint(
    model_dir: str | Path,
    shape: BloomShape,
    tp: TPGroup | None = None,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
    *,
    progress: LoadProgress | None = None,
    threads: int = 4,
    chunk_bytes: int = 32 << 20,
    throttle: ReadThrottle | None = None,
    loader: str = "builtin",
) -> BloomWeights:
    """Read this rank's weights. A pre-sharded directory (`bloom-server preshard`) at this tensor-parallel degree:
    this rank's own file, sequentially. One rank and a safetensors checkpoint: the files, sequentially, every
    wanted byte once. Several ranks over a plain safetensors checkpoint: each rank reads its slices tensor by tensor
    (strided column slices cannot be one read). `.bin` checkpoints: torch.load(weights_only=True) (the server lets
    only a verified directory, or an explicit opt-out, come this far: storage/model_dir.py).

    `loader`: "builtin" reads as above (`read_safetensors`, `threads`, `chunk_bytes`, `throttle`); a field loader's
    name (fast/loaders.py) reads the same safetensors tensors through that library (`read_field`; several ranks over
    a plain checkpoint: whole tensors, each cut to this rank's part as it arrives); pickles have no field loader."""
    tp = tp or TPGroup()
    model_dir = Path(model_dir)
    device = torch.device(device)
    src = weights_source(model_dir, tp.rank, tp.world)
    reader: Callable[..., list[torch.Tensor]]
    if loader == "builtin":
        reader = partial(read_safetensors, progress=progress, threads=threads, chunk_bytes=chunk_bytes,
                         throttle=throttle)  # fmt: skip
    elif src.kind == "pickle":
        raise ModelDirError(f"{model_dir}: pickled weights, which the {loader} loader does not read (safetensors only)")
    else:
        reader = partial(read_field, loader, progress=progress)
    if src.kind == "presharded":
        return _load_presharded(src.files[0], shape, tp, dtype, device, reader)
    files = list(src.files)
    vpart = -(-shape.vocab_size // tp.world)
    if src.kind == "whole":
        headers = [read_header(f) for f in files]
        names = required_names(shape)
        wanted, missing = wanted_entries(headers, names)
        if missing:
            raise ModelDirError(f"{model_dir}: the checkpoint has no tensor {missing[0]!r}")
        sd = dict(zip(names, reader(headers, wanted, dtype=dtype, device=device)))
        return from_state_dict(sd, shape, tp, dtype, device)
    if src.kind == "sliced" and loader != "builtin":
        headers = [read_header(f) for f in files]
        names = required_names(shape)
        wanted, missing = wanted_entries(headers, names)
        if missing:
            raise ModelDirError(f"{model_dir}: the checkpoint has no tensor {missing[0]!r}")

        def part(i: int, t: torch.Tensor) -> torch.Tensor:
            name = names[i]
            dim = split_dim(name)
            if dim is None:
                return t
            a, b = shard_range(t.shape[dim], tp.rank, tp.world, pad=padded_rows(name))
            t = t.narrow(dim, a, b - a).clone()  # a copy: the whole tensor goes at once
            return _pad_rows(t, vpart) if padded_rows(name) else t

        parts = dict(zip(names, reader(headers, wanted, dtype=dtype, device=device, part=part)))
        return _finish(shape, tp, _assemble(shape, lambda name, dim, pad: parts[name]))
    if src.kind == "sliced":
        from safetensors import safe_open

        handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
        where: dict[str, tuple[object, str]] = {}
        for h in handles:
            for k in h.keys():  # type: ignore[attr-defined]
                where[k[len(PREFIX) :] if k.startswith(PREFIX) else k] = (h, k)
        full = _full_shapes(shape)
        if progress is not None:  # bytes of this rank's tensors, in the dtype they are loaded as
            size = torch.empty((), dtype=dtype).element_size()
            progress.set_total(sum(_numel(rank_shape(n, s, tp.rank, tp.world)) * size for n, s in full.items()
                                   if not n.endswith(SCALE_SUFFIX)))  # fmt: skip
        limiter = throttle

        def get(name: str, dim: int | None, pad: bool) -> torch.Tensor:
            if name not in where:
                raise KeyError(f"{model_dir}: the checkpoint has no tensor {name!r}")
            h, key = where[name]
            sl = h.get_slice(key)  # type: ignore[attr-defined]
            if dim is None or tp.world == 1:
                t = sl[:]
            else:
                size = sl.get_shape()[dim]
                a, b = shard_range(size, tp.rank, tp.world, pad=pad)
                t = sl[a:b] if dim == 0 else sl[:, a:b]
                if pad:
                    t = _pad_rows(t, vpart)
            t = t.to(device=device, dtype=dtype)
            nbytes = t.numel() * t.element_size()
            if limiter is not None:
                limiter.wait(nbytes)
            if progress is not None:
                progress.add(nbytes)
            return t

        return _finish(shape, tp, _assemble(shape, get))

    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(torch.load(str(f), map_location="cpu", mmap=True, weights_only=True))
    if progress is not None:
        n = sum(t.numel() * t.element_size() for t in sd.values())
        progress.set_total(n)
        progress.add(n)
    return from_state_dict(sd, shape, tp, dtype, device)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _seed_of(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def random_weights(
    shape: BloomShape,
    tp: TPGroup | None = None,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
    seed: int = 0,
    std: float = 0.02,
    emb_std: float = 0.2,
) -> BloomWeights:
    """Seeded random weights of a shape, built on `device` in `dtype`. Each tensor is drawn whole from its own seed,
    then split, so every tensor-parallel degree sees the same model. Nothing is zero (zeros can hide unwritten
    outputs). The embedding, which is also the output head, gets a wider `emb_std`: logits then spread widely
    (std about emb_std * sqrt(h)), so greedy choices are far from ties and two correct engines agree token for token
    in fp16; the input side does not care, it is layer-normed at once."""
    tp = tp or TPGroup()
    shapes = full_shapes(shape.hidden_size, shape.vocab_size)
    vpart = -(-shape.vocab_size // tp.world)

    def get(name: str, dim: int | None, pad: bool) -> torch.Tensor:
        suffix = name.split(".", 2)[2] if name.startswith("h.") else name
        gen = torch.Generator(device=device).manual_seed(_seed_of(seed, name))
        t = torch.randn(shapes[suffix], generator=gen, device=device, dtype=dtype)
        t = t.mul_(emb_std if suffix == "word_embeddings.weight" else std)
        if ("layernorm" in suffix or suffix.startswith("ln_f")) and suffix.endswith("weight"):
            t = t.add_(1.0)
        if dim is not None and tp.world > 1:
            a, b = shard_range(t.shape[dim], tp.rank, tp.world, pad=pad)
            # A copy, not a view: a row slice of the full tensor would keep all of it alive on every rank.
            t = t.narrow(dim, a, b - a).clone()
            if pad:
                t = _pad_rows(t, vpart)
        return t.contiguous()

    return _finish(shape, tp, _assemble(shape, get))


def iter_tensors(w: BloomWeights) -> Iterable[torch.Tensor]:
    """Every tensor of this rank's weights (int8 scales included where present)."""
    yield from (w.emb, w.emb_ln_w, w.emb_ln_b, w.lnf_w, w.lnf_b)
    if w.emb_s is not None:
        yield w.emb_s
    for lw in w.layers:
        yield from (t for t in vars(lw).values() if t is not None)
