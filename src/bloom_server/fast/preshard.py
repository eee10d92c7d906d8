"""`bloom-server preshard --model DIR --tp N --out OUT`: the fast backend's pre-sharded layout.

OUT gets, for each tensor-parallel rank r of N, `model-tpNN-rankRR.safetensors` holding exactly the tensors rank r
loads (its heads, MLP columns, padded vocabulary rows, the replicated layer norms), in the order it loads them, so a
rank's load is one sequential read of one file. Beside them: `preshard.json` (format, N, dtype, source), the model
config and tokenizer files, and a completion marker in the downloader's format (every file's size and sha256), so the
server verifies the directory as it verifies a download. A preshard cut off midway leaves the in-progress marker,
and the server refuses the directory. Rerun (a retried Job): a finished preshard of the same source, degree and dtype
is left as it is; one its own in-progress marker shows cut off is removed and written again.

`--dtype int8`: the weight-only int8 layout the fast backend serves with `--dtype int8` (fast/quant.py): the block's
linear weights and the word embedding as int8 (I8), each followed by its fp32 row scales (NAME + SCALE_SUFFIX), the
rest fp16; scales of the whole rows, so the files equal what quantization at load gives on a GPU (the source is cast
to fp16 first, as the server reads it), at about half the fp16 bytes: half the bytes to read at each cold start.

`write_safetensors` is the streaming writer used here and by scripts/bench/make_random_bloom.py: the header first, then
each tensor's bytes as it is produced, hashed on the way; no whole model in memory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# preshard.json's "dtype" for each --dtype: the safetensors dtype of the weights written (int8: of the quantized
# weights; their scales are F32, the other tensors F16).
PRESHARD_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32", "int8": "I8"}
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json")  # fmt: skip


def safetensors_header(
    entries: Sequence[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, int]:
    """(header bytes incl. the 8-byte length, data bytes) for tensors (name, safetensors dtype, shape) stored in
    this order. The header is padded with spaces to a multiple of 8 bytes (as safetensors does)."""
    from bloom_server.storage.safetensors import DTYPE_SIZES

    head: dict[str, Any] = {}
    if metadata:
        head["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for name, dtype, shape in entries:
        n = DTYPE_SIZES[dtype]
        for s in shape:
            n *= s
        head[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, pos


def write_safetensors(
    path: Path,
    entries: Sequence[tuple[str, str, tuple[int, ...]]],
    produce: Callable[[str], Any],
    metadata: dict[str, str] | None = None,
    hash: bool = True,
) -> str | None:
    """Write a safetensors file whose tensors (name, dtype, shape) come one by one from produce(name) (a torch
    tensor of that dtype and shape, any device). fsynced. Returns the file's sha256 (None with hash=False)."""
    import torch

    header, total = safetensors_header(entries, metadata)
    digest = hashlib.sha256(header) if hash else None
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        for name, _dtype, shape in entries:
            t = produce(name)
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {list(t.shape)}, expected {list(shape)}")
            data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            view = memoryview(data).cast("B")
            if digest is not None:
                digest.update(view)
            f.write(view)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return digest.hexdigest() if digest is not None else None


def preshard(model: str, tp: int, out: Path, dtype: str | None = None, log: Callable[[str], None] = print) -> Path:
    import torch

    from bloom_server.errors import ModelDirError
    from bloom_server.fast.catalog import SCALE_SUFFIX
    from bloom_server.fast.quant import quantize_rows, row_absmax, scales_of
    from bloom_server.fast.shapes import BloomShape
    from bloom_server.fast.tp import shard_range, split_dim
    from bloom_server.fast.weights import _ST_DTYPES, _full_shapes, padded_rows, rank_shape, required_names
    from bloom_server.storage import marker
    from bloom_server.storage.model_dir import resolve_model_dir
    from bloom_server.storage.safetensors import (
        PRESHARD_FORMAT,
        PRESHARD_MANIFEST,
        checkpoint_files,
        rank_file_name,
        read_header,
        wanted_entries,
    )

    md = resolve_model_dir(model)
    if md.layout != "hf":
        raise ModelDirError(f"{md.path}: preshard reads a plain Hugging Face checkpoint (layout {md.layout!r})")
    kind, files = checkpoint_files(md.path)
    if kind != "safetensors":
        raise ModelDirError(f"{md.path}: preshard reads safetensors checkpoints (found {kind})")
    shape = BloomShape.from_dir(md.path)
    if tp < 1 or shape.n_head % tp:
        raise ModelDirError(f"{shape.n_head} attention heads do not split over {tp} ranks")
    out = Path(out)
    if _finished(out, md.path, tp, out_dt_name(dtype)):
        log(f"preshard: {out} already holds this preshard (tp {tp}), complete and verified: nothing to do")
        return out
    if _unfinished_preshard(out):
        # A Job retried after a cut-off preshard: the marker says the directory is ours and unfinished.
        log(f"preshard: {out} holds an unfinished preshard: removing it and starting again")
        shutil.rmtree(out)
    if out.exists() and any(out.iterdir()):
        raise ModelDirError(f"{out} exists and is not empty: preshard writes a fresh directory")
    headers = [read_header(f) for f in files]
    names = required_names(shape)
    wanted, missing = wanted_entries(headers, names)
    if missing:
        raise ModelDirError(f"{md.path}: the checkpoint has no tensor {missing[0]!r}")
    full = _full_shapes(shape)
    for name, (_, t) in zip(names, wanted):
        if t.shape != full[name]:
            raise ModelDirError(f"{md.path}: {name} is {list(t.shape)}, config.json says {list(full[name])}")
    quant = dtype == "int8"
    out_dt = ("F16" if quant else PRESHARD_DTYPES[dtype]) if dtype else None
    dtypes = {n: out_dt or t.dtype for n, (_, t) in zip(names, wanted)}
    out_names = required_names(shape, quant=quant)  # int8: each quantized weight followed by its scales
    for n in out_names:
        if n.endswith(SCALE_SUFFIX):
            dtypes[n], dtypes[n.removesuffix(SCALE_SUFFIX)] = "F32", "I8"

    out.mkdir(parents=True, exist_ok=True)
    marker.write_marker(
        out,
        marker.IN_PROGRESS,
        {"format": marker.FORMAT, "state": "in_progress", "writer": "bloom-server preshard", "source": str(md.path)},
    )
    from safetensors import safe_open

    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    key_of = {n: (fi, t.name) for n, (fi, t) in zip(names, wanted)}
    t0 = time.monotonic()
    digests: dict[str, str] = {}
    whole_rows: dict[str, Any] = {}  # row-parallel weight -> its rows' maxima over every column (int8)
    pending: dict[str, Any] = {}  # int8 weight just written -> this rank's scales, written next

    def source(name: str, r: int) -> Any:
        """Rank r's part of a source tensor as stored (vocabulary rows padded)."""
        fi, key = key_of[name]
        sl = handles[fi].get_slice(key)
        dim = split_dim(name)
        if dim is None or tp == 1:
            return sl[:]
        pad = padded_rows(name)
        a, b = shard_range(full[name][dim], r, tp, pad=pad)
        t = sl[a:b] if dim == 0 else sl[:, a:b]
        vpart = -(-shape.vocab_size // tp)
        if pad and t.shape[0] < vpart:
            t = torch.cat([t, t.new_zeros((vpart - t.shape[0], *t.shape[1:]))])
        return t

    def row_scales(name: str, t: Any) -> Any:
        """Scales of rank part `t` of weight `name`: of its own rows, or for a row-parallel weight (split by
        columns) of the whole rows, read once in row chunks and kept for the other ranks."""
        if split_dim(name) != 1 or tp == 1:
            return scales_of(row_absmax(t))
        if name not in whole_rows:
            fi, key = key_of[name]
            sl = handles[fi].get_slice(key)
            rows, cols = full[name]
            step = max(1, (64 << 20) // cols)
            whole_rows[name] = torch.cat([row_absmax(sl[a : min(a + step, rows)].to(torch.float16))
                                          for a in range(0, rows, step)])  # fmt: skip
        return scales_of(whole_rows[name])

    # One pass over the source per rank: each rank's file is written start to end (the source is mmapped: its
    # pages stay cached between passes while memory allows).
    for r in range(tp):
        entries = [(n, dtypes[n], rank_shape(n, full[n], r, tp)) for n in out_names]

        def produce(name: str, r: int = r) -> Any:
            if name.endswith(SCALE_SUFFIX):
                return pending.pop(name)
            t = source(name, r)
            if dtypes[name] != "I8":
                return t.to(_ST_DTYPES[dtypes[name]])
            t = t.to(torch.float16)  # as the server reads it before quantizing at load
            s = row_scales(name, t)
            pending[name + SCALE_SUFFIX] = s
            return quantize_rows(t, s)

        fname = rank_file_name(r, tp)
        meta = {"format": "pt", "bloom_server_preshard": "1", "tp_rank": str(r), "tp_size": str(tp),
                "vocab_size": str(shape.vocab_size)}  # fmt: skip
        digests[fname] = write_safetensors(out / fname, entries, produce, meta) or ""
        log(f"preshard: wrote {fname} ({(out / fname).stat().st_size / 1e9:.2f} GB, {time.monotonic() - t0:.1f} s)")
    for name in SIDE_FILES:
        if (md.path / name).is_file():
            shutil.copyfile(md.path / name, out / name)
            digests[name] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    manifest = {"format": PRESHARD_FORMAT, "tp": tp, "dtype": out_dt_name(dtype),
                "files": [rank_file_name(r, tp) for r in range(tp)],
                "source": {"path": str(md.path), "revision": md.revision}}  # fmt: skip
    (out / PRESHARD_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    digests[PRESHARD_MANIFEST] = hashlib.sha256((out / PRESHARD_MANIFEST).read_bytes()).hexdigest()
    commit = md.revision or "local-" + hashlib.sha256("".join(sorted(digests.values())).encode()).hexdigest()[:34]
    marker.write_local_marker(out, writer="bloom-server preshard", repo_id=f"preshard of {md.path}", commit=commit,
                              sha256=digests, extra={"preshard": {"tp": tp}})  # fmt: skip
    (out / marker.IN_PROGRESS).unlink()
    marker.fsync_dir(out)
    return out


def out_dt_name(dtype: str | None) -> str:
    """preshard.json's dtype: the safetensors dtype written, or "as stored"."""
    return PRESHARD_DTYPES[dtype] if dtype else "as stored"


def _finished(out: Path, source: Path, tp: int, dtype: str) -> bool:
    """True when `out` is a complete, size-verified preshard of `source` at this degree and dtype: a rerun (the
    download Job retried after a later step failed) leaves it as it is."""
    from bloom_server.errors import ModelDirError
    from bloom_server.storage import marker
    from bloom_server.storage.safetensors import PRESHARD_MANIFEST

    if not (out / marker.COMPLETE).is_file() or (out / marker.IN_PROGRESS).exists():
        return False
    try:
        manifest = json.loads((out / PRESHARD_MANIFEST).read_text())
        marker.check_model_dir(out)
    except (OSError, ValueError, ModelDirError):
        return False
    return (manifest.get("tp") == tp and manifest.get("dtype") == dtype
            and manifest.get("source", {}).get("path") == str(source))  # fmt: skip


def _unfinished_preshard(out: Path) -> bool:
    from bloom_server.storage import marker

    try:
        data = json.loads((out / marker.IN_PROGRESS).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("writer") == "bloom-server preshard"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="plain checkpoint directory (safetensors), Hub cache name, pvc://")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel degree (ranks) the server will run")
    p.add_argument("--out", type=Path, required=True, help="new directory for the pre-sharded layout")
    p.add_argument(
        "--dtype",
        choices=tuple(PRESHARD_DTYPES),
        default=None,
        help="store the weights in this dtype (default: as the checkpoint stores them); int8: weight-only int8 "
        "with per-row scales, for a server run with --dtype int8",
    )


def run(args: argparse.Namespace) -> int:
    from bloom_server.errors import BloomServerError

    try:
        out = preshard(args.model, args.tp, args.out, args.dtype,
                       log=lambda m: print(m, file=sys.stderr, flush=True))  # fmt: skip
    except BloomServerError as e:
        print(f"bloom-server preshard: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
