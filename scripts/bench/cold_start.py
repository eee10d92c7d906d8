#!/usr/bin/env python3
"""Cold start of `bloom-server serve --backend fast` against a plain read of the same bytes
(start-to-ready over the plain read, page cache cold both times).

    python scripts/bench/cold_start.py --shape 7b1                 # GPU: BLOOM-7b1 shape, random fp16 weights (14.1 GB)
    python scripts/bench/cold_start.py --shape tiny                # CPU: a tiny shape, to check the script itself
    python scripts/bench/cold_start.py --shape 7b1 --preshard 1    # also time the pre-sharded layout
    python scripts/bench/cold_start.py --shape 7b1 --layouts plain,preshard-int8-tp1   # and the int8 one (--dtype int8)

Steps, each timed and printed: write (or reuse) a random-weight checkpoint of the shape (streamed to disk tensor by
tensor, drawn on the GPU when there is one), optionally `bloom-server preshard` it; evict its pages from the page cache
(posix_fadvise DONTNEED on each file after an fsync: no root needed; residency checked with mincore, and the
eviction is reported as failed when pages stay cached, e.g. on tmpfs); time `cat FILES > /dev/null` (the plain
single-stream read) and a parallel read (threads x preadv); evict again; start the server (a new process) and poll
/ready until 200, recording when the port opened; print start-to-ready / plain read, the server's load phases
(from /ready's progress, with the timed pieces inside them: kernels compiled and autotuned during the read, the
warm-up generate, Triton work left in it) and a generate's answer. The first server starts from an empty Triton kernel
cache (the first start on a machine); with --kept-kernel-cache-run a second one restarts on that cache (a container
restart in the pod), --seeded-run a first start on an empty cache seeded from `bloom-server precompile` (made
before the rounds with no GPU visible, as the download Job makes it), and with --no-prefetch-run one runs with BLOOM_LOAD_PREFETCH=0, to show what reading during
the imports buys. No network is used.

    python scripts/bench/cold_start.py --shape 7b1 --loaders builtin,fastsafetensors,runai,instanttensor \
        --rounds 3 --drop-caches        # the read paths of BLOOM_LOADER against each other (scripts/gpu/loaders.sh)

--loaders: after one unmeasured start that fills a kernel cache (every measured start then restarts on it), each
round times, each from a cold page cache (--drop-caches: `sync; echo 3 > /proc/sys/vm/drop_caches`, root; else the
eviction above): `cat` of the weights (the disk's own rate), `python -c "import torch; torch.zeros(1, device='cuda')"`
(torch's import and CUDA's start), each loader's bare read of the files onto the GPU in a fresh process
(scripts/bench/bare_read.py: the read timed apart from torch and CUDA's start), and `serve --backend fast` from process
start to /ready 200 with BLOOM_LOADER set to each loader, in an order rotated every round; then one table: ready / cat
and ready / (import + bare read) per loader, the median over the rounds and every round's figure. Every layout of
--layouts gets its own rounds and rows, each against the cat and bare reads of its own files (an int8 layout's
are about half the fp16 bytes).

--layouts: `plain` (the checkpoint written), `preshard-tpN` (`bloom-server preshard --tp N` of it, as stored) and
`preshard-DTYPE-tpN` (`--dtype DTYPE`; `int8` is served with `--dtype int8`). With --shape 176b and --layers N the
checkpoint is the 176B layer shape (hidden 14336, the 250880 x 14336 embedding: 7.19 GB in fp16, and 4.93 GB per
layer); the script refuses to write one its disk cannot hold.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f} s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- the checkpoint


def write_checkpoint(out: Path, shape_name: str, dtype: str, layers: int | None) -> Path:
    """A Hugging Face BLOOM directory of random weights: config.json, the project's tokenizer, model.safetensors
    (one file, written tensor by tensor: no model in memory). Reused when cold_start.json matches."""
    import torch

    from bloom_server.fast.preshard import write_safetensors
    from bloom_server.fast.shapes import PRESETS, BloomShape
    from bloom_server.fast.weights import _full_shapes, required_names

    shape = (
        BloomShape(vocab_size=2048, hidden_size=64, n_layer=2, n_head=4)
        if shape_name == "tiny"
        else PRESETS[shape_name]
    )
    if layers:
        shape = shape.with_layers(layers)
    meta = {"shape": shape_name, "layers": shape.n_layer, "dtype": dtype, "format": 1}
    stamp = out / "cold_start.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == meta and (out / "model.safetensors").is_file():
        say(f"reusing {out} ({(out / 'model.safetensors').stat().st_size / 1e9:.2f} GB)")
        return out
    if out.exists():
        shutil.rmtree(out)
    need = shape.params() * {"fp16": 2, "bf16": 2, "fp32": 4}[dtype]
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise SystemExit(f"{out}: {need / 1e9:.2f} GB of weights ({shape.n_layer} layers, hidden {shape.hidden_size}) "
                         f"do not fit the {free / 1e9:.2f} GB free there: fewer --layers, or another --dir")  # fmt: skip
    out.mkdir(parents=True)
    t = time.monotonic()
    from make_random_bloom import train_tokenizer

    train_tokenizer(out, min(2048, shape.vocab_size))
    st = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}[dtype]
    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    cfg = {**shape.to_hf_config(), "torch_dtype": {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype],
           "tie_word_embeddings": True}  # fmt: skip
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    full = _full_shapes(shape)
    names = required_names(shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)

    def produce(name: str):
        real = name[len("transformer.") :]
        s = full[real]
        if real.endswith("bias"):
            return torch.zeros(s, dtype=tdt, device=device)
        if "layernorm" in real or real.startswith("ln_f"):
            return torch.ones(s, dtype=tdt, device=device)
        return torch.randn(s, generator=gen, dtype=tdt, device=device).mul_(0.02)

    entries = [("transformer." + n, st, full[n]) for n in names]
    write_safetensors(out / "model.safetensors", entries, produce, {"format": "pt"}, hash=False)
    if device == "cuda":
        torch.cuda.empty_cache()  # the server gets the GPU memory this process drew the weights in
    stamp.write_text(json.dumps(meta))
    size = (out / "model.safetensors").stat().st_size
    say(f"wrote {out}: {size / 1e9:.2f} GB random {dtype} weights ({shape.n_layer} layers, hidden "
        f"{shape.hidden_size}) in {time.monotonic() - t:.1f} s (drawn on {device})")  # fmt: skip
    return out


def parse_layouts(spec: str, preshard_tp: int) -> list[tuple[str, int | None, str | None]]:
    """--layouts (and --preshard TP, which adds preshard-tpTP) -> [(label, TP or None, preshard --dtype or None)],
    each layout once, in order. ValueError naming a malformed one."""
    from bloom_server.fast.preshard import PRESHARD_DTYPES

    items = [x.strip() for x in spec.split(",") if x.strip()] + ([f"preshard-tp{preshard_tp}"] if preshard_tp else [])
    dtypes = "|".join(PRESHARD_DTYPES)
    out: dict[str, tuple[int | None, str | None]] = {}
    for item in items:
        m = re.fullmatch(rf"preshard(?:-({dtypes}))?-tp([1-9][0-9]*)", item)
        if item != "plain" and not m:
            raise ValueError(f"--layouts: {item!r} is not plain, preshard-tpN or preshard-DTYPE-tpN "
                             f"(DTYPE one of {', '.join(PRESHARD_DTYPES)})")  # fmt: skip
        out[item] = (int(m.group(2)), m.group(1)) if m else (None, None)
    if not out:
        raise ValueError("--layouts: no layout named")
    return [(k, tp, dt) for k, (tp, dt) in out.items()]


def layout_dir(
    model: Path, label: str, tp: int | None, dtype: str | None, server_args: list[str]
) -> tuple[Path, list[str]]:
    """The directory a layout serves and its `serve` flags: the checkpoint itself, or its `bloom-server preshard`
    (written once, and again when the checkpoint was rewritten after it); an int8 preshard is served with --dtype
    int8."""
    if tp is None:
        return model, server_args
    from bloom_server.fast.preshard import preshard

    out = model.with_name(model.name + (f"-{dtype}" if dtype else "") + f"-tp{tp}")
    done = out / "preshard.json"
    if not done.is_file() or done.stat().st_mtime < (model / "cold_start.json").stat().st_mtime:
        if out.exists():
            shutil.rmtree(out)
        t = time.monotonic()
        preshard(str(model), tp, out, dtype=dtype, log=say)
        size = sum(f.stat().st_size for f in weight_files(out, tp))
        say(f"[{label}] pre-sharded for tp {tp}{f' as {dtype}' if dtype else ''}: {size / 1e9:.2f} GB in "
            f"{time.monotonic() - t:.1f} s")  # fmt: skip
    return out, [*server_args, "--dtype", "int8"] if dtype == "int8" else server_args


def weight_files(model_dir: Path, tp: int | None) -> list[Path]:
    from bloom_server.storage.safetensors import checkpoint_files, rank_file_name

    if tp:
        return [model_dir / rank_file_name(r, tp) for r in range(tp)]
    return checkpoint_files(model_dir)[1]


# --------------------------------------------------------------------------------------------- page cache


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def resident_fraction(path: Path) -> float | None:
    """Fraction of the file's pages in the page cache (mincore on a read-only shared mapping)."""
    try:
        libc = _libc()
        size = path.stat().st_size
        if size == 0:
            return 0.0
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                page = os.sysconf("SC_PAGE_SIZE")
                pages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                return sum(b & 1 for b in vec) / pages
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    except (OSError, AttributeError, ValueError):
        return None


def evict(files: list[Path]) -> bool:
    """Drop the files' pages from the page cache. True when mincore confirms (or cannot tell and nothing failed)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    res = [resident_fraction(f) for f in files]
    known = [r for r in res if r is not None]
    left = max(known) if known else None
    if left is not None and left > 0.02 and os.access("/proc/sys/vm/drop_caches", os.W_OK):
        with open("/proc/sys/vm/drop_caches", "w") as f:  # root only: the whole page cache
            f.write("1\n")
        res = [resident_fraction(f) for f in files]
        known = [r for r in res if r is not None]
        left = max(known) if known else None
    if left is None:
        say("evicted (posix_fadvise DONTNEED); residency unknown (mincore unavailable): check the read rate below")
        return True
    if left > 0.02:
        say(f"COULD NOT EVICT: {100 * left:.0f}% of a weight file is still in the page cache (tmpfs? another "
            "process holding the pages?): the timings below are warm-cache numbers")  # fmt: skip
        return False
    say(f"evicted: {100 * left:.1f}% of the weight files' pages left in the page cache")
    return True


def plain_read(files: list[Path]) -> float:
    t = time.monotonic()
    if shutil.which("cat"):
        with open(os.devnull, "wb") as null:
            subprocess.run(["cat", *map(str, files)], stdout=null, check=True)
    else:
        buf = bytearray(1 << 20)
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    return time.monotonic() - t


def direct_read(files: list[Path], threads: int = 8, chunk: int = 32 << 20) -> float | None:
    """Wall seconds of reading the files with `threads` parallel O_DIRECT reads of `chunk` bytes (no page cache, no
    copy): what the disk gives a reader made for it, beside `cat`'s single buffered stream. None where the file system
    refuses O_DIRECT (tmpfs, some overlays) or the platform has none."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        return None
    jobs = [(f, off) for f in files for off in range(0, f.stat().st_size, chunk)]
    local = threading.local()

    def work(job: tuple[Path, int]) -> None:
        f, off = job
        if not hasattr(local, "buf"):
            local.buf, local.fds = mmap.mmap(-1, chunk), {}  # page-aligned, as O_DIRECT needs
        fd = local.fds.get(f)
        if fd is None:
            fd = local.fds[f] = os.open(f, os.O_RDONLY | flag)
        os.preadv(fd, [local.buf], off)  # a short read at the end of the file is the file's end

    t = time.monotonic()
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, jobs))
    except OSError:
        return None
    return time.monotonic() - t


def parallel_read(files: list[Path], threads: int, chunk: int) -> float:
    jobs = [(f, off, min(chunk, f.stat().st_size - off)) for f in files for off in range(0, f.stat().st_size, chunk)]
    lock = threading.Lock()
    state = {"i": 0}

    def work() -> None:
        buf = bytearray(chunk)
        view = memoryview(buf)
        fds: dict[Path, int] = {}
        while True:
            with lock:
                if state["i"] >= len(jobs):
                    break
                f, off, n = jobs[state["i"]]
                state["i"] += 1
            fd = fds.get(f) or fds.setdefault(f, os.open(f, os.O_RDONLY))
            got = 0
            while got < n:
                k = os.preadv(fd, [view[got:n]], off + got)
                if k <= 0:
                    break
                got += k
        for fd in fds.values():
            os.close(fd)

    t = time.monotonic()
    pool = [threading.Thread(target=work) for _ in range(threads)]
    for p in pool:
        p.start()
    for p in pool:
        p.join()
    return time.monotonic() - t


def filesystem_of(path: Path) -> str:
    best, what = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if str(path.resolve()).startswith(mnt) and len(mnt) > len(best):
                best, what = mnt, f"{fstype} on {dev} (mounted at {mnt})"
    except OSError:
        pass
    return what


# ------------------------------------------------------------------------------------------------------ server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def time_server(model_dir: Path, label: str, env_extra: dict[str, str], tp: int, timeout: float,
                log_dir: Path, extra_args: list[str], src: Path | None = None) -> dict:  # fmt: skip
    port = _free_port()
    serve = ["serve", "--backend", "fast", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
             *extra_args]  # fmt: skip
    if tp > 1:
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
        cmd = [torchrun, "--nproc_per_node", str(tp), "--master_port", str(_free_port()), "-m", "bloom_server", *serve]
    else:
        cmd = [sys.executable, "-m", "bloom_server", *serve]
    path = os.pathsep.join(p for p in (str(src or ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **env_extra}
    log_path = log_dir / f"server-{label}.log"
    url = f"http://127.0.0.1:{port}"
    out: dict = {"label": label, "log": str(log_path)}
    with open(log_path, "w") as log:
        t = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            samples = []
            while time.monotonic() - t < timeout:
                if proc.poll() is not None:
                    out["error"] = f"server exited with {proc.returncode}"
                    break
                try:
                    status, body = _get(url + "/ready", timeout=1.0)
                except OSError:
                    time.sleep(0.02)
                    continue
                now = time.monotonic() - t
                out.setdefault("port_open_s", now)
                if isinstance(body, dict) and body.get("progress"):
                    p = body["progress"]
                    samples.append((round(now, 2), p.get("phase"), p.get("loaded_bytes"), p.get("total_bytes"),
                                    p.get("prefetched_bytes")))  # fmt: skip
                if status == 200:
                    out["ready_s"] = now
                    out["progress"] = body.get("progress") if isinstance(body, dict) else None
                    break
                time.sleep(0.02)
            else:
                out["error"] = f"not ready after {timeout} s"
            out["samples"] = samples
            if "ready_s" in out:
                req = urllib.request.Request(
                    url + "/generate",
                    data=json.dumps({"text": ["Deepspeed is"], "max_new_tokens": 8}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        out["generate"] = json.loads(r.read().decode())
                except (OSError, ValueError) as e:
                    out["generate"] = f"failed: {e}"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
    text = log_path.read_text(errors="replace")
    keep = ("load phases", "GB weights read", "kernels ahead", "kernel calls ahead", "kernel compile", "warm-up generate",
            "captured decode graph", "prewarm failed", "compile worker", "prefetch stopped")  # fmt: skip
    out["log_lines"] = [line for line in text.splitlines() if any(k in line for k in keep)]
    if "error" in out:
        out["log_tail"] = text[-3000:]
    return out


# ------------------------------------------------------------------------------------------------- the loaders


def drop_caches() -> bool:
    """`sync; echo 3 > /proc/sys/vm/drop_caches`: the whole page cache, dentries and inodes (root only)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def make_cold(files: list[Path], whole: bool) -> bool:
    """A cold page cache for the next read: the whole cache dropped (`whole`, where allowed), else the files'
    pages evicted (`evict`)."""
    if whole and drop_caches():
        return True
    if whole:
        say("cannot write /proc/sys/vm/drop_caches (not root?): evicting the weight files' pages only")
    return evict(files)


def torch_start() -> float:
    """Wall seconds of a fresh `import torch` and the device's first allocation (CUDA's start on a GPU)."""
    code = "import torch; torch.zeros(1, device='cuda' if torch.cuda.is_available() else 'cpu')"
    t = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.monotonic() - t


def bare_read(loader: str, files: list[Path]) -> dict:
    """scripts/bench/bare_read.py in a fresh process: its init_s (torch and CUDA), read_s, bytes; wall_s outside."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", ""))
                                                       if p)}  # fmt: skip
    cmd = [sys.executable, str(ROOT / "scripts" / "bench" / "bare_read.py"), loader, *map(str, files)]
    t = time.monotonic()
    p = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=600)
    wall = time.monotonic() - t
    try:
        out = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"loader": loader, "error": f"rc {p.returncode}: {(p.stderr or p.stdout)[-1500:]}", "wall_s": wall}
    return {**out, "wall_s": wall}


def loader_rounds(args: argparse.Namespace, label: str, model: Path, files: list[Path], tp: int | None,
                  results: dict, server_args: list[str], shape: str) -> None:  # fmt: skip
    """The --loaders comparison on one layout (see the module's help); rows go to results["loader_rounds"]. `shape`
    (e.g. 7b1, 176b-2l) names the checkpoint in the rows, the server logs and the kernel cache."""
    total = sum(f.stat().st_size for f in files)
    loaders = [x.strip() for x in args.loaders.split(",") if x.strip()]
    # Server runs: one per loader, and one per --variant (its own environment, e.g. a library's read mode), whose
    # bare read is its BLOOM_LOADER's.
    servers: dict[str, dict[str, str]] = {x: {"BLOOM_LOADER": x} for x in loaders}
    for spec in args.variant:
        name, _, kvs = spec.partition(":")
        servers[name] = dict(kv.split("=", 1) for kv in kvs.split(",") if "=" in kv)
    kdir = args.dir / f"kernel-cache-loaders-{shape}-{label}"
    if kdir.exists():
        shutil.rmtree(kdir)
    base = {"BLOOM_LOAD_THREADS": str(args.threads), "BLOOM_LOAD_CHUNK_MB": str(args.chunk_mb),
            "BLOOM_KERNEL_CACHE_DIR": str(kdir)}  # fmt: skip
    t = time.monotonic()
    warm = time_server(model, f"{shape}-{label}-kernel-warmup", base, tp or 1, args.timeout, args.dir, server_args)
    say(f"[{label}] kernel cache filled by an unmeasured start in {time.monotonic() - t:.1f} s "
        f"({'ready' if 'ready_s' in warm else warm.get('error')}); every start below restarts on it")  # fmt: skip
    bare_ok = not tp or tp == 1  # one process reading every rank's file is not one rank's read
    last = 0.0
    for rnd in range(max(1, args.rounds)):
        left = args.budget_s - (time.monotonic() - T0)
        if rnd and left < last:
            say(f"[{label}] stopping after {rnd} round(s): {left:.0f} s of the budget left, a round took {last:.0f} s")
            break
        t_round = time.monotonic()
        names = list(servers)
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        row: dict = {"shape": shape, "layout": label, "round": rnd + 1, "bytes": total, "order": order, "bare": {}, "ready": {},
                     "bare_of": {k: v.get("BLOOM_LOADER", "auto") for k, v in servers.items()}}  # fmt: skip
        row["cold"] = make_cold(files, args.drop_caches)
        row["evict"] = "all" if args.drop_caches else "weights"
        row["cat_s"] = plain_read(files)
        say(f"[{label}] round {rnd + 1}: cat {row['cat_s']:.2f} s = {total / 1e9 / row['cat_s']:.2f} GB/s (the disk)")
        row["cold"] = make_cold(files, args.drop_caches) and row["cold"]
        row["direct_s"] = direct_read(files)
        if row["direct_s"]:
            say(f"[{label}] round {rnd + 1}: 8 parallel O_DIRECT reads {row['direct_s']:.2f} s = "
                f"{total / 1e9 / row['direct_s']:.2f} GB/s (the disk to a parallel reader)")  # fmt: skip
        row["cold"] = make_cold(files, args.drop_caches) and row["cold"]
        row["import_s"] = torch_start()
        # Again with torch's libraries now cached: a dropped page cache also makes the import read them from the
        # disk the weights are on, where a pod's image and its weights volume are apart (docs/results/cold-start.md).
        row["import_warm_s"] = torch_start()
        say(f"[{label}] round {rnd + 1}: import torch + first device allocation {row['import_s']:.2f} s "
            f"({row['import_warm_s']:.2f} s with its libraries cached)")  # fmt: skip
        for loader in [x for x in order if x in loaders] if bare_ok else []:
            row["cold"] = make_cold(files, args.drop_caches) and row["cold"]
            b = row["bare"][loader] = bare_read(loader, files)
            if "error" in b:
                say(f"[{label}] round {rnd + 1}: bare read {loader} FAILED: {b['error']}")
                continue
            say(f"[{label}] round {rnd + 1}: bare read {loader}: {b['read_s']:.2f} s = "
                f"{b['bytes'] / 1e9 / b['read_s']:.2f} GB/s after {b['init_s']:.2f} s of torch and device start "
                f"({b['device']}; {b.get('info')})")  # fmt: skip
        for loader in order:
            row["cold"] = make_cold(files, args.drop_caches) and row["cold"]
            r = time_server(model, f"{shape}-{label}-{loader}-r{rnd + 1}", {**base, **servers[loader]}, tp or 1,
                            args.timeout, args.dir, server_args)  # fmt: skip
            prog = r.get("progress") or {}
            keep = {k: v for k, v in r.items() if k in ("ready_s", "port_open_s", "error", "log", "log_lines")}
            row["ready"][loader] = {**keep, "phases": prog.get("phases"), "timings": prog.get("timings")}
            if "ready_s" not in r:
                say(f"[{label}] round {rnd + 1}: serve {loader} FAILED: {r.get('error')}\n"
                    f"{r.get('log_tail', '')[-1500:]}")  # fmt: skip
                continue
            # Where the seconds before the read went: the prefetch's overlap, torch's start, the read's start.
            inside = "; ".join(f"{k} {v:.2f}" for k, v in (prog.get("timings") or {}).items()
                               if "field loader" in k or "prefetch" in k or "after process start" in k)  # fmt: skip
            say(f"[{label}] round {rnd + 1}: serve {loader} ({servers[loader]}): ready {r['ready_s']:.2f} s = "
                f"{r['ready_s'] / row['cat_s']:.2f} x cat; port open {r['port_open_s']:.2f} s"
                f"{'; ' + inside if inside else ''}")  # fmt: skip
        last = time.monotonic() - t_round
        results.setdefault("loader_rounds", []).append(row)


def loader_table(rows: list[dict]) -> list[str]:
    """One markdown table over the rounds: per checkpoint shape, layout and loader, the median and every round of
    ready / cat and ready / (import + bare read) (each of that layout's own files), with the disk's rate, the bytes
    and torch's start of those rounds."""
    import statistics

    def med(xs: list[float]) -> str:
        return f"{statistics.median(xs):.2f}" if xs else "-"

    def each(xs: list[float]) -> str:
        return ", ".join(f"{x:.2f}" for x in xs)

    out = ["| shape | layout | loader | ready s | ready / cat | bare read s (GB/s) | ready / (import + bare) | "
           "rounds: ready / cat |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def key(r: dict) -> tuple[str, str]:  # a set that evicted only the weight files is told apart by its shape cell
        return (r.get("shape", "-") + (" (weights evicted)" if r.get("evict") == "weights" else ""), r["layout"])

    for shape, layout in dict.fromkeys(key(r) for r in rows):
        rs = [r for r in rows if key(r) == (shape, layout)]
        loaders = list(dict.fromkeys(k for r in rs for k in r["order"]))
        for loader in loaders:
            of = rs[0]["bare_of"].get(loader, loader)
            ready = [(r["ready"][loader]["ready_s"], r) for r in rs if "ready_s" in r["ready"].get(loader, {})]
            bare = [r["bare"][of] for r in rs if "read_s" in r["bare"].get(of, {})]
            vs_cat = [t / r["cat_s"] for t, r in ready]
            vs_sum = [t / (r["import_s"] + r["bare"][of]["read_s"]) for t, r in ready
                      if "read_s" in r["bare"].get(of, {})]  # fmt: skip
            gbps = [b["bytes"] / 1e9 / b["read_s"] for b in bare]
            out.append(f"| {shape} | {layout} | {loader} | {med([t for t, _ in ready])} | {med(vs_cat)} | "
                       f"{med([b['read_s'] for b in bare])} ({med(gbps)}) | {med(vs_sum)} | {each(vs_cat)} |")  # fmt: skip
        cat = [r["cat_s"] for r in rs]
        rate = [r["bytes"] / 1e9 / r["cat_s"] for r in rs]
        direct = [r["bytes"] / 1e9 / r["direct_s"] for r in rs if r.get("direct_s")]
        warm = [r["import_warm_s"] for r in rs if "import_warm_s" in r]
        out.append(f"| {shape} | {layout} | (cat; import torch) | {med(cat)}; {med([r['import_s'] for r in rs])} | "
                   f"disk {med(rate)} GB/s over {rs[0]['bytes'] / 1e9:.2f} GB | rounds: {each(rate)} GB/s | cold cache: "
                   f"{'yes' if all(r['cold'] for r in rs) else 'NO'} | parallel O_DIRECT {med(direct)} GB/s; import "
                   f"with torch cached {med(warm)} s |")  # fmt: skip
    return out


# -------------------------------------------------------------------------------------------------------- main


def weights_in_s(progress: dict) -> float | None:
    """Seconds from process start to the last weight byte placed: the start of the phase after "reading weights"."""
    phases = [ph["phase"] for ph in progress.get("phases", [])]
    if "reading weights" not in phases:
        return None
    i = phases.index("reading weights")
    return progress["phases"][i + 1]["start_s"] if i + 1 < len(phases) else None


def report(r: dict, label: str, vlabel: str, plain: float, par: float) -> None:
    if "ready_s" not in r:
        say(f"[{label}/{vlabel}] FAILED: {r.get('error')}\n{r.get('log_tail', '')}")
        return
    ratio = r["ready_s"] / plain
    r["ratio"] = ratio
    say(f"[{label}/{vlabel}] port open {r['port_open_s']:.2f} s, ready {r['ready_s']:.2f} s after process "
        f"start: ratio start-to-ready / plain read = {ratio:.2f} (target <= 1.2: "
        f"{'met' if ratio <= 1.2 else 'NOT met'}); vs the parallel read {r['ready_s'] / par:.2f}")  # fmt: skip
    prog = r.get("progress") or {}
    w = weights_in_s(prog)
    if w is not None:  # from the server's own clock (its LoadProgress), which starts just after process start
        r["weights_in_s"] = w
        say(f"    weights in at {w:.2f} s (server clock) = {w / plain:.2f} x the plain read")
    for ph in prog.get("phases", []):
        say(f"    phase {ph['phase']:<18} from {ph['start_s']:7.2f} s for {ph['seconds']:6.2f} s")
    for name, v in (prog.get("timings") or {}).items():
        say(f"    inside: {name:<45} {v:8.3f}")
    say(f"    weights {prog.get('loaded_bytes', 0) / 1e9:.3f} / {prog.get('total_bytes', 0) / 1e9:.3f} GB, "
        f"prefetched {prog.get('prefetched_bytes', 0) / 1e9:.3f} GB; /ready polls during load: "
        f"{len(r.get('samples', []))}")  # fmt: skip
    timeline = stream_timeline(r.get("samples", []), r["ready_s"])
    if timeline:
        say("    disk stream (s after start: GB prefetched / GB placed): " + timeline)
    for line in r.get("log_lines", []):
        say("    log: " + line.split(": ", 1)[-1][:1200])
    gen = r.get("generate")
    say(f"    generate: {gen.get('text') if isinstance(gen, dict) else gen}")


def stream_timeline(samples: list, ready_s: float, points: int = 12) -> str:
    """About `points` of /ready's samples spread over the load: when the bytes were read ahead and placed (a disk
    stream at the disk's speed grows by plain-read GB/s per second from the port's opening on)."""
    rows = [s for s in samples if len(s) >= 5 and s[4] is not None]
    if not rows:
        return ""
    step = max(ready_s / points, 0.25)
    out, nxt = [], 0.0
    for t, _, loaded, _, pre in rows:
        if t >= nxt:
            out.append(f"{t:.1f}: {pre / 1e9:.2f}/{(loaded or 0) / 1e9:.2f}")
            nxt = t + step
    return ", ".join(out)


def medians(runs: list[dict]) -> list[str]:
    """Per variant over the rounds: median ready / plain read, weights-in / plain read, and the seconds."""
    import statistics

    out = []
    for v in dict.fromkeys(r["variant"] for r in runs if "ratio" in r):
        rs = [r for r in runs if r.get("variant") == v and "ratio" in r]
        w = [r["weights_in_s"] / r["plain_read_s"] for r in rs if "weights_in_s" in r]
        out.append(f"{v}: median over {len(rs)} round(s): ready {statistics.median(r['ready_s'] for r in rs):.2f} s, "
                   f"ratio {statistics.median(r['ratio'] for r in rs):.2f}"
                   + (f", weights in {statistics.median(w):.2f} x plain" if w else "")
                   + "; ratios " + ", ".join(f"{r['ratio']:.2f}" for r in rs))  # fmt: skip
    return out


def _cubins(cache: Path | None) -> set[str]:
    """Entries of a Triton cache directory holding a compiled binary (none for a missing one)."""
    from bloom_server.fast.coldstart.precompile import cubin_entries

    return cubin_entries(cache) if cache is not None else set()


def make_seed(model_dir: Path, out: Path, target: str, tp: int | None, server_args: list[str],
              results: dict) -> Path | None:  # fmt: skip
    """`bloom-server precompile --target TARGET` with no GPU visible (CUDA_VISIBLE_DEVICES=""), as the download Job
    runs it, for the same serve flags: the seed of the `seeded` runs. None when it failed."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "bloom_server", "precompile", "--model", str(model_dir), "--out", str(out),
           "--target", target, "--tp", str(tp or 1), *server_args]  # fmt: skip
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p),
    }
    t = time.monotonic()
    p = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=900)
    took = time.monotonic() - t
    try:
        rep = json.loads(p.stdout[p.stdout.index("{") :])
    except ValueError:
        rep = {}
    results.setdefault("seeds", []).append({"target": target, "seconds": round(took, 2), "rc": p.returncode,
                                            "report": rep})  # fmt: skip
    if p.returncode != 0:
        say(f"precompile for {target} failed ({p.returncode}), no seeded runs: {p.stderr[-1500:]}")
        return None
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    say(f"precompile (no GPU visible, target {target}): {rep.get('entries')} kernel binaries, {size / 1e6:.1f} MB, "
        f"in {took:.1f} s, Triton {rep.get('triton')}")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=("tiny", "560m", "7b1", "176b"))
    p.add_argument("--layers", type=int, default=None, help="blocks (default: the shape's)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=("fp16", "bf16", "fp32"),
        help="stored dtype (default fp16 on a GPU, fp32 on a CPU: what the server runs)",
    )
    p.add_argument("--dir", type=Path, default=ROOT / ".cache" / "cold_start", help="where checkpoints are written")
    p.add_argument(
        "--preshard",
        type=int,
        default=0,
        metavar="TP",
        help="also write `bloom-server preshard --tp TP` and serve that (TP ranks: torchrun if > 1); "
        "the same as adding preshard-tpTP to --layouts",
    )
    p.add_argument(
        "--layouts",
        default="plain",
        metavar="LAYOUT,...",
        help="the layouts to time, in order: plain (the checkpoint), preshard-tpN (`bloom-server preshard --tp N`), "
        "preshard-DTYPE-tpN (with --dtype DTYPE; int8 is served with --dtype int8) (default: plain)",
    )
    p.add_argument("--threads", type=int, default=4, help="threads of the parallel read (and BLOOM_LOAD_THREADS)")
    p.add_argument("--chunk-mb", type=int, default=32)
    p.add_argument(
        "--no-prefetch-run",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the server with BLOOM_LOAD_PREFETCH=0 (default on)",
    )
    p.add_argument(
        "--kept-kernel-cache-run",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time a restart that finds the first run's Triton kernel cache (a container restart in "
        "the pod); the first run always starts from an empty one (default on)",
    )
    p.add_argument(
        "--seeded-run",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also a first start (empty kernel cache) seeded from `bloom-server precompile`'s output, "
        "compiled once before the rounds with no GPU visible (as the download Job does); on a GPU "
        "host, or with --seed-target (default on)",
    )
    p.add_argument(
        "--seed-target",
        default=None,
        metavar="ARCH",
        help="architecture for the seed (default: this host's GPU; none on a CPU host)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:K=V[,K=V]",
        help="also a server run with these environment variables, on the kept kernel cache (repeatable; "
        "e.g. threads8:BLOOM_LOAD_PREFETCH_THREADS=8; with --loaders, e.g. "
        "fst-buffered:BLOOM_LOADER=fastsafetensors,FASTSAFETENSORS_ODIRECT=0)",
    )
    p.add_argument(
        "--read-sweep",
        default="",
        metavar="TxMB,...",
        help="in the first round, also time parallel reads of these thread x chunk-MiB shapes "
        "(e.g. 2x32,8x32,8x64,16x16), each from a cold page cache, and `cat` again after them",
    )
    p.add_argument("--timeout", type=float, default=180, help="seconds a server may take to become ready")
    p.add_argument("--budget-s", type=float, default=230, help="skip optional runs past this many seconds")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the plain read and every server run this many times, interleaved (noisy disks); "
        "the summary gives each run's median",
    )
    p.add_argument(
        "--compare-src",
        type=Path,
        default=None,
        metavar="SRC",
        help="also time a server run from another source tree (the `src` folder of an older commit: "
        "`git archive COMMIT src | tar -x -C DIR`, then DIR/src), interleaved with the others",
    )
    p.add_argument(
        "--loaders",
        default="",
        metavar="NAME,...",
        help="compare these BLOOM_LOADER values instead of the runs above (builtin, fastsafetensors, runai, "
        "instanttensor): cat, torch's start, each one's bare read and its serve-to-ready, per round",
    )
    p.add_argument(
        "--drop-caches",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="before every read, drop the whole page cache (`sync; echo 3 > /proc/sys/vm/drop_caches`, root), torch's "
        "libraries too; --no-drop-caches (the default) evicts the weight files' pages only",
    )
    p.add_argument("--summary", type=Path, default=None, help="--loaders: also write the table here")
    p.add_argument("server_args", nargs="*", help="extra `serve` flags, after --")
    args = p.parse_args(argv)
    try:
        layouts = parse_layouts(args.layouts, args.preshard)
    except ValueError as e:
        p.error(str(e))

    import torch

    gpu = torch.cuda.is_available()
    dtype = args.dtype or ("fp16" if gpu else "fp32")
    say(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"{torch.cuda.get_device_name(0) if gpu else 'no GPU'}, {os.cpu_count()} CPUs")  # fmt: skip
    args.dir.mkdir(parents=True, exist_ok=True)
    say(f"checkpoints in {args.dir}: {filesystem_of(args.dir)}")
    model = write_checkpoint(args.dir / f"bloom-{args.shape}{f'-{args.layers}l' if args.layers else ''}-{dtype}",
                             args.shape, dtype, args.layers)  # fmt: skip
    runs: list[tuple[str, Path, int | None, list[str]]] = []
    for label, ltp, ldt in layouts:
        d, sargs = layout_dir(model, label, ltp, ldt, args.server_args)
        runs.append((label, d, ltp, sargs))

    seed_target = args.seed_target or (
        "cuda:{}{}".format(*torch.cuda.get_device_capability(0)) if gpu else None)  # fmt: skip
    results: dict = {"shape": args.shape, "dtype": dtype, "device": torch.cuda.get_device_name(0) if gpu else "cpu",
                     "runs": []}  # fmt: skip
    env = {"BLOOM_LOAD_THREADS": str(args.threads), "BLOOM_LOAD_CHUNK_MB": str(args.chunk_mb)}
    if args.loaders:
        shape = args.shape + (f"-{args.layers}l" if args.layers else "")
        for label, d, tp, sargs in runs:
            files = weight_files(d, tp)
            say(f"[{label}] {len(files)} weight file(s), {sum(f.stat().st_size for f in files) / 1e9:.3f} GB")
            loader_rounds(args, label, d, files, tp, results, sargs, shape)
        table = loader_table(results.get("loader_rounds", []))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
        if args.summary:
            args.summary.write_text("\n".join(table) + "\n")
        say("summary (medians over the rounds; every round's ready / cat in the last column):")
        print("\n".join(table), flush=True)
        rows = results.get("loader_rounds", [])
        return 0 if rows and all("ready_s" in v for r in rows for v in r["ready"].values()) else 1
    for label, d, tp, sargs in runs:
        files = weight_files(d, tp)
        total = sum(f.stat().st_size for f in files)
        say(f"[{label}] {len(files)} weight file(s), {total / 1e9:.3f} GB")
        kdir = args.dir / f"kernel-cache-{label}"
        seed = make_seed(d, args.dir / f"kernel-seed-{label}", seed_target, tp, sargs, results) \
            if args.seeded_run and seed_target else None  # fmt: skip
        for rnd in range(max(1, args.rounds)):
            tag = f"-r{rnd + 1}" if args.rounds > 1 else ""
            if args.rounds > 1:
                say(f"[{label}] round {rnd + 1} of {args.rounds}")
            cold = evict(files)
            plain = plain_read(files)
            say(f"[{label}] plain read (cat FILES > /dev/null, cold): {plain:.2f} s, {total / 1e9 / plain:.2f} GB/s")
            if rnd == 0:
                cold = evict(files) and cold
                par = parallel_read(files, args.threads, args.chunk_mb << 20)
                say(f"[{label}] parallel read ({args.threads} threads x {args.chunk_mb} MiB preadv, cold): {par:.2f} s, "
                    f"{total / 1e9 / par:.2f} GB/s")  # fmt: skip
                sweep = [tuple(int(x) for x in s.lower().split("x")) for s in args.read_sweep.split(",") if s]
                for threads, mb in sweep:
                    cold = evict(files) and cold
                    t = parallel_read(files, threads, mb << 20)
                    say(f"[{label}] read sweep: {threads} threads x {mb} MiB preadv, cold: {t:.2f} s, "
                        f"{total / 1e9 / t:.2f} GB/s")  # fmt: skip
                    results.setdefault("read_sweep", []).append({"threads": threads, "chunk_mb": mb, "s": t})
                if sweep:
                    cold = evict(files) and cold
                    again = plain_read(files)
                    say(f"[{label}] plain read again after the sweep: {again:.2f} s, {total / 1e9 / again:.2f} GB/s")
                    results.setdefault("read_sweep", []).append({"cat_after": again})
            # Kernels: the first start on a machine finds no compiled Triton kernels (an empty cache directory of
            # its own: BLOOM_KERNEL_CACHE_DIR); the kept-cache run restarts on the first run's directory.
            for k in (kdir, Path(str(kdir) + "-compare"), Path(str(kdir) + "-seeded")):
                if k.exists():
                    shutil.rmtree(k)
            variants: list[tuple[str, dict, Path | None]] = [("default", {"BLOOM_KERNEL_CACHE_DIR": str(kdir)}, None)]
            if seed is not None:
                variants.append(("seeded", {"BLOOM_KERNEL_CACHE_DIR": str(kdir) + "-seeded",
                                            "BLOOM_KERNEL_CACHE_SEED": str(seed)}, None))  # fmt: skip
            if args.compare_src:
                variants.append(("compare-src", {"BLOOM_KERNEL_CACHE_DIR": str(kdir) + "-compare"}, args.compare_src))
            if args.kept_kernel_cache_run:
                variants.append(("kept-kernel-cache", {"BLOOM_KERNEL_CACHE_DIR": str(kdir)}, None))
            for spec in args.variant:
                name, _, kvs = spec.partition(":")
                extra = dict(kv.split("=", 1) for kv in kvs.split(",") if "=" in kv)
                variants.append((name, {**extra, "BLOOM_KERNEL_CACHE_DIR": str(kdir)}, None))
            if args.no_prefetch_run:
                variants.append(
                    ("no-prefetch", {"BLOOM_LOAD_PREFETCH": "0", "BLOOM_KERNEL_CACHE_DIR": str(kdir)}, None)
                )
            for vlabel, venv, vsrc in variants:
                if vlabel != "default" and time.monotonic() - T0 > args.budget_s:
                    say(f"[{label}] skipping the {vlabel} run: past the {args.budget_s:.0f} s budget")
                    continue
                cold = evict(files) and cold
                kc = Path(venv["BLOOM_KERNEL_CACHE_DIR"])
                before = _cubins(kc) | (_cubins(seed) if vlabel == "seeded" and seed is not None else set())
                r = time_server(d, f"{label}-{vlabel}{tag}", {**env, **venv}, tp or 1, args.timeout, args.dir,
                                sargs, src=vsrc)  # fmt: skip
                r.update(bytes=total, plain_read_s=plain, parallel_read_s=par, page_cache_evicted=cold,
                         variant=f"{label}-{vlabel}", src=str(vsrc or ROOT / "src"))  # fmt: skip
                # Kernel binaries this start compiled itself (new entries in its cache, beyond what it started
                # with or was seeded with): 0 means every variant it ran was found compiled.
                r["kernels_compiled_by_server"] = len(_cubins(kc) - before)
                results["runs"].append(r)
                report(r, label, vlabel, plain, par)
                say(f"[{label}] {vlabel}: kernel binaries the server compiled itself: "
                    f"{r['kernels_compiled_by_server']}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    ok = all("ready_s" in r for r in results["runs"])
    say("summary: " + "; ".join(
        f"{r['label']}: ratio {r['ratio']:.2f} ({r['ready_s']:.2f} s vs plain {r['plain_read_s']:.2f} s, "
        f"{r['bytes'] / 1e9:.2f} GB{'' if r['page_cache_evicted'] else ', WARM cache'})"
        for r in results["runs"] if "ratio" in r))  # fmt: skip
    if args.rounds > 1:
        for line in medians(results["runs"]):
            say("median: " + line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
