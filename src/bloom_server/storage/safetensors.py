"""safetensors files without torch: headers (`read_header`), where a rank's weights come from (`weights_source`: this
rank's file of a pre-sharded directory, the plain checkpoint read whole on one rank, or sliced per tensor on several),
and the plan of large sequential reads over the tensors a rank needs (`plan_chunks`: one chunk is one `preadv` of up
to `chunk_bytes` that lands in one or more tensors). The torch half is `bloom_server.fast.weights`."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bloom_server.errors import ModelDirError

PREFIX = "transformer."
PRESHARD_MANIFEST = "preshard.json"
PRESHARD_FORMAT = "bloom-server-preshard/1"
MAX_HEADER = 100 << 20  # safetensors' own bound on the JSON header
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def rank_file_name(rank: int, world: int) -> str:
    return f"model-tp{world:02d}-rank{rank:02d}.safetensors"


# --------------------------------------------------------------------------------------------- safetensors files


@dataclass(frozen=True)
class TensorEntry:
    name: str  # as stored in the file
    dtype: str  # safetensors' name: F16, BF16, F32, ...
    shape: tuple[int, ...]
    start: int  # absolute offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class SafetensorsFile:
    path: Path
    data_start: int
    size: int
    tensors: list[TensorEntry]  # in file order
    metadata: dict[str, str] = field(default_factory=dict)

    def by_name(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}


def read_header(path: str | os.PathLike) -> SafetensorsFile:
    """Parse a safetensors header (8-byte little-endian length, then JSON). Refuses a file whose header is
    malformed or whose tensors run past its end (a truncated file), naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelDirError(f"{path}: not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise ModelDirError(f"{path}: not a safetensors file, or truncated (header of {n} bytes, file {size})")
            raw = json.loads(f.read(n))
    except OSError as e:
        raise ModelDirError(f"{path}: cannot read ({e.strerror or e})") from e
    except ValueError as e:
        raise ModelDirError(f"{path}: unreadable safetensors header ({e})") from e
    data_start = 8 + n
    meta = raw.pop("__metadata__", None) or {}
    tensors = []
    for name, info in raw.items():
        try:
            b, end = (int(x) for x in info["data_offsets"])
            t = TensorEntry(
                name, str(info["dtype"]), tuple(int(s) for s in info["shape"]), data_start + b, data_start + end
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelDirError(f"{path}: malformed entry for {name!r} in the safetensors header") from exc
        numel = 1
        for s in t.shape:
            numel *= s
        if t.dtype in DTYPE_SIZES and numel * DTYPE_SIZES[t.dtype] != t.nbytes:
            raise ModelDirError(f"{path}: {name} is {t.dtype}{list(t.shape)} but spans {t.nbytes} bytes")
        tensors.append(t)
    tensors.sort(key=lambda t: t.start)
    if tensors and tensors[-1].end > size:
        raise ModelDirError(f"{path}: truncated: its tensors end at byte {tensors[-1].end}, the file has {size} bytes")
    return SafetensorsFile(path, data_start, size, tensors, {str(k): str(v) for k, v in meta.items()})


def checkpoint_files(model_dir: Path) -> tuple[str, list[Path]]:
    """("safetensors" | "pickle" | "none", files) of a Hugging Face layout, safetensors first (what transformers'
    from_pretrained picks too when both are there)."""
    candidates = (
        ("safetensors", "model.safetensors.index.json", "model.safetensors"),
        ("pickle", "pytorch_model.bin.index.json", "pytorch_model.bin"),
    )
    for kind, index, single in candidates:
        if (model_dir / index).is_file():
            try:
                names = sorted(set(json.loads((model_dir / index).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise ModelDirError(f"{model_dir / index}: unreadable index ({e})") from e
            return kind, [model_dir / n for n in names]
        if (model_dir / single).is_file():
            return kind, [model_dir / single]
    return "none", []


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    f = Path(model_dir) / PRESHARD_MANIFEST
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{f}: unreadable pre-shard manifest ({e})") from e
    if not isinstance(data, dict) or data.get("format") != PRESHARD_FORMAT or not isinstance(data.get("tp"), int):
        raise ModelDirError(f"{f}: not a {PRESHARD_FORMAT} manifest")
    return data


@dataclass(frozen=True)
class WeightsSource:
    """How the fast backend reads this rank's weights. kind: "presharded" (this rank's own file, every byte of it
    wanted, in order), "whole" (one rank, the plain safetensors checkpoint read sequentially), "sliced" (several
    ranks over a plain checkpoint: per-tensor slices, as before pre-sharding existed), "pickle" (.bin files)."""

    kind: str
    files: tuple[Path, ...]


def weights_source(model_dir: Path, rank: int, world: int) -> WeightsSource:
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    kind, files = checkpoint_files(model_dir)
    if manifest is not None:
        tp = manifest["tp"]
        if tp == world:
            return WeightsSource("presharded", (model_dir / rank_file_name(rank, world),))
        if kind == "none":
            raise ModelDirError(
                f"{model_dir} is pre-sharded for {tp} tensor-parallel rank(s) but this launch has {world}: launch "
                f"{tp} rank(s), or run `bloom-server preshard --tp {world}` on the plain checkpoint"
            )
    if kind == "none":
        raise ModelDirError(f"{model_dir}: no model.safetensors or pytorch_model.bin (or their index)")
    if kind == "pickle":
        return WeightsSource("pickle", tuple(files))
    return WeightsSource("whole" if world == 1 else "sliced", tuple(files))


# ---------------------------------------------------------------------------------------------------- read plans


@dataclass(frozen=True)
class Piece:
    tensor: int  # index into the wanted list
    dst_offset: int  # byte offset inside that tensor
    chunk_offset: int  # byte offset inside the chunk
    nbytes: int


@dataclass(frozen=True)
class Chunk:
    file: int  # index into the file list
    offset: int  # absolute offset in the file
    length: int
    pieces: tuple[Piece, ...]

    @property
    def wanted_bytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


def plan_chunks(wanted: Sequence[tuple[int, TensorEntry]], chunk_bytes: int, gap_bytes: int = 1 << 20) -> list[Chunk]:
    """Large sequential reads covering the wanted tensors ((file index, entry) pairs). Tensors that follow each
    other closely (gaps of at most `gap_bytes`, read through and dropped) form one span; a span is cut into reads of
    at most `chunk_bytes`. Chunks are in file order, so reading them in order is one sequential pass per file."""
    order = sorted(range(len(wanted)), key=lambda i: (wanted[i][0], wanted[i][1].start))
    spans: list[tuple[int, int, int, list[int]]] = []  # (file, start, end, tensor indices)
    for i in order:
        fi, t = wanted[i]
        if spans and spans[-1][0] == fi and t.start - spans[-1][2] <= gap_bytes and t.start >= spans[-1][2]:
            f, s, _, idx = spans[-1]
            spans[-1] = (f, s, t.end, idx + [i])
        else:
            spans.append((fi, t.start, t.end, [i]))
    chunks = []
    for fi, s, e, idx in spans:
        pos, k = s, 0
        while pos < e:
            end = min(pos + chunk_bytes, e)
            pieces = []
            while k < len(idx) and wanted[idx[k]][1].end <= pos:
                k += 1
            j = k
            while j < len(idx) and wanted[idx[j]][1].start < end:
                t = wanted[idx[j]][1]
                a, b = max(t.start, pos), min(t.end, end)
                if b > a:
                    pieces.append(Piece(idx[j], a - t.start, a - pos, b - a))
                j += 1
            chunks.append(Chunk(fi, pos, end - pos, tuple(pieces)))
            pos = end
    return chunks


def wanted_entries(
    files: Sequence[SafetensorsFile], keep: Iterable[str]
) -> tuple[list[tuple[int, TensorEntry]], list[str]]:
    """(file index, entry) of each name in `keep` (names without the "transformer." prefix), and the names found in
    no file."""
    where: dict[str, tuple[int, TensorEntry]] = {}
    for fi, f in enumerate(files):
        for t in f.tensors:
            where[t.name[len(PREFIX) :] if t.name.startswith(PREFIX) else t.name] = (fi, t)
    out, missing = [], []
    for name in keep:
        if name in where:
            out.append(where[name])
        else:
            missing.append(name)
    return out, missing
