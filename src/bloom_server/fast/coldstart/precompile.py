"""Ahead-of-time Triton compiles for the fast backend's cold start: the torch-free half, so that serve.py can start
the compile workers at process start, before torch is imported (the torch half is fast/triton_kernels.py: the plan
of kernel variants, the workers' own code, `warm`).

- `apply_kernel_cache_dir`: where Triton keeps compiled kernels and autotuning results (BLOOM_KERNEL_CACHE_DIR, else
  TRITON_CACHE_DIR, else Triton's default ~/.triton/cache). On a kept directory (an emptyDir survives container
  restarts in the pod) a restart skips the compiles and the benchmarks.
- `CompileWorkers`: child processes that compile the decode step's kernel variants into that cache while this
  process imports torch and reads weights (out of this process's GIL, several at once); `wait(stage)` blocks until
  each has finished the variants of a stage.

- `seed_kernel_cache`: copies a kernel cache made ahead of time (`bloom-server precompile`, run where the weights
  were downloaded, with no GPU needed) into that directory at process start, so a pod's first start on a new node
  (a scale from zero) finds the binaries compiled; the seed is read-only (the weights' volume), the copy writable.
- `precompile`: the `bloom-server precompile` command's work: the same compile workers for a named GPU
  architecture (`--target cuda:86`), offline.

The fast_precompile setting (BLOOM_FAST_PRECOMPILE): "0" turns the ahead-of-time work off (workers and the load thread's warm calls); a number sets
the worker processes (default `worker_count`: the CPUs this process may use, shared by the ranks of this host, less
RESERVED_CPUS per rank for the load itself, between 1 and MAX_WORKERS: 4 on a 16-CPU host with one GPU).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bloom_server.host import available_cpus, ranks_on_host

log = logging.getLogger(__name__)


# The seed's directory inside a model directory: `bloom-server precompile` writes it there by default and `serve` looks
# for it there when BLOOM_KERNEL_CACHE_SEED does not name another.
SEED_DIRNAME = ".bloom-kernel-cache"
SEED_INFO = "precompile.json"


def enabled(setting: str) -> bool:
    """The fast_precompile setting (BLOOM_FAST_PRECOMPILE) allows work ahead of time."""
    return setting.strip().lower() not in ("0", "off", "false", "no")


def apply_kernel_cache_dir(path: str | None) -> str | None:
    """Point Triton's cache at `path` (TRITON_CACHE_DIR, read by Triton when it compiles; set before it is used).
    Returns the directory Triton will use, or None for its default."""
    if path:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.warning("kernel cache directory %s unusable (%s): Triton's default is used", path, e)
            return os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = str(path)
    return os.environ.get("TRITON_CACHE_DIR")


def triton_cache_dir() -> Path:
    """The directory Triton uses: TRITON_CACHE_DIR, else its default (TRITON_HOME or ~, then .triton/cache)."""
    if os.environ.get("TRITON_CACHE_DIR"):
        return Path(os.environ["TRITON_CACHE_DIR"])
    return Path(os.environ.get("TRITON_HOME") or os.path.expanduser("~")) / ".triton" / "cache"


def seed_dir(setting: str | None, model_dir: Path) -> Path | None:
    """The seed a server start copies from: BLOOM_KERNEL_CACHE_SEED's directory, none for "off", else the model
    directory's SEED_DIRNAME when it is there."""
    if setting is not None and setting.strip().lower() in ("", "off", "none", "0", "false", "no"):
        return None
    if setting:
        return Path(setting)
    default = Path(model_dir) / SEED_DIRNAME
    return default if default.is_dir() else None


def seed_kernel_cache(seed: Path, cache: Path) -> dict[str, float]:
    """Copy the entries of a Triton cache directory `seed` (one subdirectory per compiled kernel) that `cache` lacks.
    Each entry is copied under a temporary name and renamed into place, so Triton (or a compile worker of another
    rank doing the same) never sees half an entry; entries already present are left alone. Never raises: returns
    {"copied": n, "present": n, "failed": n, "bytes": n, "seconds": s}."""
    t0 = time.monotonic()
    out = {"copied": 0.0, "present": 0.0, "failed": 0.0, "bytes": 0.0}
    try:
        entries = sorted(p for p in Path(seed).iterdir() if p.is_dir() and not p.name.startswith("."))
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("kernel cache seed %s not used: %s", seed, e)
        out["failed"] = 1.0
        entries = []
    for src in entries:
        dst = cache / src.name
        if dst.exists():
            out["present"] += 1
            continue
        tmp = cache / f".{src.name}.seed-{os.getpid()}"
        try:
            shutil.copytree(src, tmp)
            out["bytes"] += sum(f.stat().st_size for f in tmp.iterdir())
            os.rename(tmp, dst)
            out["copied"] += 1
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if dst.exists():  # another rank put it there first
                out["present"] += 1
            else:
                out["failed"] += 1
                log.warning("kernel cache seed entry %s not copied: %s", src.name, e)
    out["seconds"] = time.monotonic() - t0
    return out


def triton_version() -> str | None:
    """The installed Triton's version, without importing it."""
    try:
        from importlib.metadata import version

        return version("triton")
    except Exception:  # noqa: BLE001 - any failure reads as no Triton
        return None


def plan_facts(
    model_dir: Path | str,
    *,
    world: int,
    dtype: str,
    max_batch: int,
    max_seq: int,
    fast_decode: str | None,
    weights: str | None = None,
) -> dict[str, Any]:
    """What decides one rank's decode kernel variants (triton_kernels.plan_for reads it), as the compile workers,
    the load's helper and a seed's precompile.json all carry it. dtype: "float16" | "bfloat16" (the activations');
    weights: "int8" (weight_format) or None (the dtype's)."""
    return {"model_dir": str(model_dir), "world": int(world), "dtype": dtype, "max_batch": int(max_batch),
            "max_seq": int(max_seq), "fast_decode": fast_decode, "weights": weights}  # fmt: skip


def seed_archs(seed: Path | None, facts: dict[str, Any]) -> tuple[int, ...]:
    """The GPU architectures whose every decode kernel variant the seed holds for this server: those its
    `precompile` run compiled without a failure, when that run had the same plan facts (ranks, dtype, batch, sequence
    length, decode fusion) and the same Triton version. Empty when unknown or different."""
    if seed is None:
        return ()
    try:
        info = json.loads((Path(seed) / SEED_INFO).read_text())
    except (OSError, ValueError):
        return ()
    same = (info.get("ok") is True
            and [info.get(k) for k in ("world", "dtype", "max_batch", "max_seq")]
            == [facts.get(k) for k in ("world", "dtype", "max_batch", "max_seq")]
            and info.get("fast_decode") == facts.get("fast_decode")
            and info.get("weights") == facts.get("weights")
            and info.get("triton") is not None and info.get("triton") == triton_version())  # fmt: skip
    if not same:
        return ()
    return tuple(int(t["target"]) for t in info.get("targets", []) if t.get("ok") and t.get("target") is not None)


def parse_target(spec: str) -> int:
    """A GPU architecture as Triton's CUDA target number: "cuda:86", "sm_86", "sm86", "86" or "8.6" -> 86 (A10G);
    80 is the A100, 90 the H100 and H200. ValueError for anything else."""
    s = spec.strip().lower().removeprefix("cuda:").removeprefix("sm_").removeprefix("sm")
    if "." in s:
        major, _, minor = s.partition(".")
        s = major + minor if major.isdigit() and minor.isdigit() and len(minor) == 1 else s
    if not s.isdigit() or not 70 <= int(s) < 200:
        raise ValueError(f"not a CUDA architecture: {spec!r} (examples: cuda:80 for A100, cuda:86 A10G, cuda:90 H100)")
    return int(s)


# Per rank, CPUs left to the load itself: the main thread (torch import, CUDA initialisation), the prefetch (the disk
# stream), the loader threads (page cache -> pinned memory -> device) and the load thread's kernel helper.
RESERVED_CPUS = 4
# The decode step's one-row stage has ~19 variants (18 GEMV configs and the attention kernel), the multi-row stage ~24.
# More workers do not compile sooner, and each one's torch import and CUDA context delay the main process's own load
# (docs/results/cold-start.md).
MAX_WORKERS = 4


def worker_count(setting: str) -> int:
    """Compile worker processes for this rank: the fast_precompile setting's number when it gives one (0: none), else
    the CPUs available over the ranks of this host, less RESERVED_CPUS, at least 1 and at most MAX_WORKERS
    (16 CPUs and one rank: 4; 2 CPUs: 1; 6 CPUs: 2; 128 CPUs and 8 ranks: 4 each)."""
    raw = setting.strip().lower()
    if raw not in ("", "1", "on", "true", "yes", "auto"):
        try:
            return max(0, int(raw))
        except ValueError:
            return 0
    return max(1, min(MAX_WORKERS, available_cpus() // ranks_on_host() - RESERVED_CPUS))


def gpu_likely() -> bool:
    """Without importing torch: a visible NVIDIA device node, and CUDA_VISIBLE_DEVICES not hiding every GPU."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None and vis.strip() in ("", "-1", "none", "void"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/proc/driver/nvidia/gpus/*"))


def triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def model_dtype(setting: str) -> str | None:
    """The torch dtype name the fast backend runs on a GPU for a dtype setting (backends.base.torch_dtype; int8:
    the activations')."""
    return {"auto": "float16", "fp16": "float16", "int8": "float16", "bf16": "bfloat16"}.get(setting)


def weight_format(setting: str) -> str | None:
    """The weights' storage a dtype setting asks of the fast backend beyond the model dtype: "int8" (weight-only
    int8, fast/quant.py) or None."""
    return "int8" if setting == "int8" else None


class CompileWorkers:
    """Child processes compiling this rank's decode kernels (fast/triton_kernels.py `_worker_main`) into Triton's
    disk cache. Never raises: a worker that fails only means the load thread compiles what is missing itself."""

    def __init__(self, facts: dict[str, Any], parts: int, device_index: int = 0):
        self.facts = facts
        self.t0 = time.monotonic()
        self._cv = threading.Condition()
        self.stage_done: list[dict[int, float]] = []  # per worker: stage -> seconds since start (-1: exited early)
        self.compiled = [0, 0, 0]  # variants compiled, per stage (index 1, 2)
        self.procs: list[subprocess.Popen] = []
        # Architectures a seed covers completely (seed_archs): on such a GPU the load's helper need not wait for
        # these workers (they only find the binaries and build launchers, which the helper can do itself).
        self.seed_archs: tuple[int, ...] = ()
        self.returncodes: list[int | None] = []
        self.errors: list[str] = []
        root = str(Path(__file__).resolve().parents[3])  # the directory holding the bloom_server package
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
        code = (
            "import sys; from bloom_server.fast.triton_kernels import _worker_main; "
            "sys.exit(_worker_main(sys.argv[1:]))"
        )
        for k in range(parts):
            try:
                p = subprocess.Popen(
                    [sys.executable, "-c", code, json.dumps(facts), str(k), str(parts), str(device_index)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL,
                )  # fmt: skip
            except OSError as e:
                log.warning("kernel compile worker not started: %s", e)
                continue
            self.procs.append(p)
            self.stage_done.append({})
            self.returncodes.append(None)
            i = len(self.procs) - 1
            threading.Thread(target=self._watch, args=(i, p), name=f"bloom-kc-{k}", daemon=True).start()

    def _watch(self, i: int, p: subprocess.Popen) -> None:
        assert p.stdout is not None and p.stderr is not None
        err: list[str] = []
        t = threading.Thread(target=lambda: err.extend(p.stderr), daemon=True)  # type: ignore[arg-type]
        t.start()
        for line in p.stdout:
            w = line.split()
            if len(w) >= 4 and w[0] == "stage" and w[2] == "done":
                with self._cv:
                    stage = int(w[1])
                    self.stage_done[i][stage] = time.monotonic() - self.t0
                    if stage in (1, 2):
                        self.compiled[stage] += int(w[3])
                    self._cv.notify_all()
        rc = p.wait()
        self.returncodes[i] = rc
        t.join(5)
        with self._cv:
            for s in (1, 2):
                self.stage_done[i].setdefault(s, -1.0)
            self._cv.notify_all()
        text = "".join(err).strip()
        if rc != 0:
            self.errors.append(text[-2000:])
            log.warning("kernel compile worker %d exited with %d: %s", i, rc, text[-2000:])
        elif text:
            log.debug("kernel compile worker %d: %s", i, text[-2000:])

    def wait(self, stage: int, timeout: float = 120.0) -> bool:
        """True once every worker finished `stage` (or exited); False at the timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: all(stage in d for d in self.stage_done), timeout)

    def finished_at(self, stage: int) -> float | None:
        """Seconds from the workers' start to the last one's end of `stage` (None: not all done, or one failed)."""
        with self._cv:
            ts = [d.get(stage) for d in self.stage_done]
        if not ts or any(t is None or t < 0 for t in ts):
            return None
        return max(t for t in ts if t is not None)


def start_compile_workers(settings: Any, model_dir: Path, *, world: int, local_rank: int,
                          seed: Path | None = None) -> CompileWorkers | None:  # fmt: skip
    """Start the workers for the fast backend on a GPU host (None elsewhere, or when there is nothing to compile
    for: no Triton, fp32, BLOOM_FAST_PRECOMPILE=0)."""
    if not enabled(settings.fast_precompile) or not gpu_likely() or not triton_installed():
        return None
    dtype = model_dtype(str(settings.dtype))
    parts = worker_count(settings.fast_precompile)
    if dtype is None or parts < 1 or not (Path(model_dir) / "config.json").is_file():
        return None
    facts = plan_facts(model_dir, world=world, dtype=dtype, max_batch=settings.max_batch_size,
                       max_seq=settings.total_tokens_limit, fast_decode=settings.fast_decode,
                       weights=weight_format(str(settings.dtype)))  # fmt: skip
    w = CompileWorkers(facts, parts, device_index=local_rank)
    w.seed_archs = seed_archs(seed, facts)
    log.info("kernel compile: %d worker process(es) started (Triton cache %s%s)", len(w.procs),
             os.environ.get("TRITON_CACHE_DIR") or "default ~/.triton/cache",
             f"; the seed holds every variant for {', '.join(f'sm_{a}' for a in w.seed_archs)}"
             if w.seed_archs else "")  # fmt: skip
    return w if w.procs else None


def cubin_entries(cache: Path) -> set[str]:
    """Names of the entries of a Triton cache directory that hold a compiled binary (one per kernel variant)."""
    try:
        return {p.parent.name for p in Path(cache).glob("*/*.cubin")}
    except OSError:
        return set()


def precompile(model_dir: Path, out: Path, *, targets: list[int | None], world: int, dtype: str, max_batch: int,
               max_seq: int, workers: int, fast_decode: str | None, weights: str | None = None,
               timeout: float = 1800.0) -> dict[str, Any]:  # fmt: skip
    """Compile one rank's decode kernel variants (every rank of a tensor-parallel group has the same shapes) for each
    target architecture into `out`, a Triton cache directory (what `seed_kernel_cache` copies at a server's start).
    A target of None: the GPU of this host. With a number no GPU is needed: Triton compiles for that architecture
    offline (ptxas ships with it). Only Triton's own cache key decides whether a server finds these binaries (the
    kernel source, the Triton version, the architecture, the specialisation of the arguments), so a seed made by
    another Triton or for other settings costs nothing but the copy: the server compiles what it misses."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    before = cubin_entries(out)
    os.environ["TRITON_CACHE_DIR"] = str(out)  # the workers inherit it
    facts = plan_facts(model_dir, world=world, dtype=dtype, max_batch=max_batch, max_seq=max_seq,
                       fast_decode=fast_decode, weights=weights)  # fmt: skip
    report: dict[str, Any] = {**facts, "targets": [], "ok": True, "triton": triton_version()}
    for target in targets:
        t0 = time.monotonic()
        w = CompileWorkers({**facts, "target": target}, max(1, workers))
        done = bool(w.procs) and w.wait(2, timeout=timeout)
        for p in w.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        # _watch records each exit code after the process ends: give the threads a moment to record them.
        deadline = time.monotonic() + 10
        while any(rc is None for rc in w.returncodes) and time.monotonic() < deadline:
            time.sleep(0.05)
        ok = done and all(rc == 0 for rc in w.returncodes)
        report["targets"].append({"target": target, "variants": w.compiled[1] + w.compiled[2], "ok": ok,
                                  "seconds": round(time.monotonic() - t0, 2), "errors": w.errors[:2]})  # fmt: skip
        report["ok"] = report["ok"] and ok
    after = cubin_entries(out)
    report["entries"] = len(after)
    report["new_entries"] = len(after - before)
    try:
        (out / SEED_INFO).write_text(json.dumps(report, indent=1) + "\n")
    except OSError as e:
        log.warning("could not write %s: %s", out / SEED_INFO, e)
    return report
