"""The load's one disk stream (storage/prefetch.py Prefetcher) and the loader that follows it (fast/weights.py read_safetensors),
on real files, on the CPU. The prefetcher's reads are held and released through its `throttle` hook (called after
each chunk it read), so every step is observed through counters: nothing here depends on a sleep being long enough.
"""

from __future__ import annotations

import platform
import sys
import threading
import time

import pytest

torch = pytest.importorskip("torch")

from bloom_server.fast.shapes import BloomShape
from bloom_server.fast.weights import read_safetensors, required_names
from bloom_server.progress import LoadProgress
from bloom_server.storage.prefetch import Prefetcher
from bloom_server.storage.safetensors import plan_chunks, read_header, wanted_entries

CHUNK = 64 << 10  # the tiny model (0.93 MB) in ~15 chunks


class Gate:
    """A prefetcher's throttle that lets `allowed` chunks through, then holds the reader; `fail_at`: the chunk
    whose read raises OSError (a disk error mid-way)."""

    def __init__(self, allowed: int = 0, fail_at: int | None = None):
        self.cv = threading.Condition()
        self.allowed, self.passed, self.fail_at = allowed, 0, fail_at

    def wait(self, nbytes: int) -> None:
        with self.cv:
            if self.fail_at is not None and self.passed == self.fail_at:
                raise OSError(5, "Input/output error (simulated)")
            if not self.cv.wait_for(lambda: self.passed < self.allowed, timeout=60):
                raise AssertionError("gate never opened")
            self.passed += 1

    def allow(self, n: int) -> None:
        with self.cv:
            self.allowed += n
            self.cv.notify_all()


def until(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.002)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from safetensors.torch import load_file

    path = tiny_model_dir / "model.safetensors"
    header = read_header(path)
    wanted, missing = wanted_entries([header], required_names(BloomShape.from_dir(tiny_model_dir)))
    assert not missing
    expected = load_file(str(path))
    return path, header, wanted, expected


def check_equal(model, tensors) -> None:
    _, _, wanted, expected = model
    assert len(tensors) == len(wanted)
    for (_, t), got in zip(wanted, tensors):
        assert torch.equal(got, expected[t.name]), t.name


class Recorder(LoadProgress):
    """Records, at each chunk the loader places, the bytes placed and the bytes the prefetcher had read then."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def add(self, nbytes: int) -> None:
        super().add(nbytes)
        p = self.prefetcher
        self.seen.append((self.loaded_bytes, p.stats()["read_bytes"] if p is not None else -1))


def load_in_thread(model, progress, threads: int = 2):
    _, header, wanted, _ = model
    box: dict = {}

    def run() -> None:
        try:
            box["out"] = read_safetensors([header], wanted, dtype=torch.float32, device="cpu", progress=progress,
                                          threads=threads, chunk_bytes=CHUNK)  # fmt: skip
        except BaseException as e:  # noqa: BLE001 - handed to the test thread, which re-raises it
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def finish(t: threading.Thread, box: dict):
    t.join(60)
    assert not t.is_alive(), "the loader hung"
    if "error" in box:
        raise box["error"]
    return box["out"]


def prefetch(model, progress, gate=None, threads: int = 1, budget: int | None = None) -> Prefetcher:
    path, header, _, _ = model
    wanted = [(0, t) for t in header.tensors]
    p = Prefetcher([path], plan_chunks(wanted, CHUNK), threads=threads, progress=progress, throttle=gate,
                   budget=budget)  # fmt: skip
    progress.prefetcher = p
    return p.start()


# ------------------------------------------------------------------------------------------ the loader follows


def test_the_loader_waits_for_the_prefetcher_chunk_by_chunk_and_gets_identical_tensors(model):
    progress = Recorder()
    gate = Gate(allowed=0)
    p = prefetch(model, progress, gate)
    t, box = load_in_thread(model, progress, threads=2)
    until(lambda: p.stats()["loader_waits"] >= 1, "the loader waiting for the prefetcher")
    assert progress.loaded_bytes == 0  # nothing placed before the prefetcher read anything
    n = len(p.chunks)
    for k in range(1, n + 1):  # one chunk at a time: the loader follows
        gate.allow(1)
        until(lambda: p.stats()["frontier"] >= k, f"prefetcher past chunk {k}")  # noqa: B023 - called within this iteration
    out = finish(t, box)
    check_equal(model, out)
    # Every chunk the loader placed had been read by the prefetcher first.
    assert progress.seen and all(loaded <= read for loaded, read in progress.seen), progress.seen
    st = p.stats()
    assert st["state"] == "finished" and st["frontier"] == n and st["read_bytes"] == sum(c.length for c in p.chunks)
    t_ = progress.snapshot()["timings"]
    assert t_["chunks the loader read from disk itself"] == 0 and t_["loader waited for the prefetcher, s"] > 0
    assert progress.loaded_bytes == progress.total_bytes > 900_000
    assert progress.prefetched_bytes >= progress.total_bytes


@pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"), reason="Linux I/O classes"
)
@pytest.mark.parametrize("idle", [True, False])
def test_the_prefetchers_readers_take_the_idle_io_class_when_asked(model, idle):
    """load_prefetch_io=idle: each reader thread's reads are in the idle I/O class (and the rest of the process's
    are not); otherwise they keep the process's class. The load still gets every byte."""
    from bloom_server.storage.prefetch import IOPRIO_CLASS_IDLE, io_priority_class

    path, header, _, _ = model
    progress = LoadProgress()
    p = Prefetcher([path], plan_chunks([(0, t) for t in header.tensors], CHUNK), threads=3, progress=progress,
                   idle_io=idle)  # fmt: skip
    progress.prefetcher = p
    p.start()
    check_equal(model, finish(*load_in_thread(model, progress, threads=2)))
    p.join(30)
    assert len(p.io_classes) == 3
    assert all((c == IOPRIO_CLASS_IDLE) == idle for c in p.io_classes), p.io_classes
    assert io_priority_class() != IOPRIO_CLASS_IDLE


def test_the_prefetcher_never_stops_because_the_loader_caught_up(model):
    """The old prefetcher stopped once the loader reached it; now it reads to the last byte and the loader reads
    nothing from the disk itself."""
    progress = LoadProgress()
    p = prefetch(model, progress)
    out = finish(*load_in_thread(model, progress, threads=4))
    check_equal(model, out)
    p.join(30)
    assert p.stats()["state"] in ("finished", "closed") and p.stats()["frontier"] == len(p.chunks)
    assert progress.snapshot()["timings"]["chunks the loader read from disk itself"] == 0


# ------------------------------------------------------------------------------------------ the loader alone


def test_the_loader_reads_alone_without_a_prefetcher(model):
    progress = LoadProgress()
    assert progress.prefetcher is None
    check_equal(model, finish(*load_in_thread(model, progress, threads=3)))
    assert progress.loaded_bytes == progress.total_bytes and progress.prefetched_bytes == 0


@pytest.mark.parametrize("threads", [1, 3])
def test_the_loader_reads_the_rest_itself_when_the_prefetcher_fails_mid_way(model, threads):
    progress = Recorder()
    gate = Gate(allowed=100, fail_at=4)  # four chunks read, then an I/O error on the fifth
    p = prefetch(model, progress, gate)
    out = finish(*load_in_thread(model, progress, threads=threads))
    check_equal(model, out)
    st = p.stats()
    assert st["state"] == "failed" and "Input/output error" in st["error"] and st["frontier"] == 4
    own = progress.snapshot()["timings"]["chunks the loader read from disk itself"]
    assert own == len(p.chunks) - 4, (own, len(p.chunks))


def test_a_prefetcher_whose_threads_are_gone_does_not_hang_the_loader(model):
    """No reader thread left and nobody said so (a thread killed from outside): the wait notices and returns."""
    path, header, _, _ = model
    p = Prefetcher([path], plan_chunks([(0, t) for t in header.tensors], CHUNK))
    p.state, p._started = "running", True  # as if started, but no reader thread is left (e.g. after a fork)
    t0 = time.monotonic()
    assert p.wait_for(3, timeout=20) is False and time.monotonic() - t0 < 5  # noticed, not timed out
    assert p.stats()["state"] == "finished"
    progress = LoadProgress()
    progress.prefetcher = Prefetcher([path], p.chunks)
    progress.prefetcher.state, progress.prefetcher._started = "running", True
    check_equal(model, finish(*load_in_thread(model, progress, threads=2)))


def test_a_closed_prefetcher_releases_a_waiting_loader(model):
    progress = LoadProgress()
    gate = Gate(allowed=2)
    p = prefetch(model, progress, gate)
    t, box = load_in_thread(model, progress, threads=1)
    until(lambda: p.stats()["loader_waits"] >= 1 and p.stats()["frontier"] == 2, "the loader waiting on chunk 3")
    p.close()
    gate.allow(100)  # the reader finishes its current chunk and stops
    check_equal(model, finish(t, box))
    assert p.stats()["state"] == "closed"


def test_no_prefetch_when_disabled(tiny_model_dir):
    from bloom_server.backends.fast_coldstart import start_prefetch as serve_start
    from bloom_server.settings import load_settings
    from bloom_server.storage.model_dir import resolve_model_dir

    progress = LoadProgress()
    serve_start(load_settings(backend="fast", load_prefetch=False), resolve_model_dir(str(tiny_model_dir)), progress)
    assert progress.prefetcher is None and progress.phase == "starting"


# ------------------------------------------------------------------------------------------ the memory budget


def test_the_prefetcher_pauses_at_its_budget_and_resumes_as_the_loader_advances(model):
    path, header, _, _ = model
    chunks = plan_chunks([(0, t) for t in header.tensors], CHUNK)
    assert len(chunks) >= 8
    budget = chunks[0].length + chunks[1].length  # two chunks ahead of the loader at most
    p = Prefetcher([path], chunks, budget=budget).start()
    until(lambda: p.stats()["paused"] == 1, "the prefetcher pausing at its budget")
    st = p.stats()
    assert st["frontier"] == 2 and st["read_bytes"] == budget and st["pauses"] == 1 and st["state"] == "running"
    # The loader asks for chunk 0: the budget now counts from chunk 1, so one more chunk is read, then a pause.
    assert p.wait_for(1) is True
    until(lambda: p.stats()["frontier"] == 3 and p.stats()["paused"] == 1, "one more chunk, then a pause")
    assert p.stats()["pauses"] == 2
    # A loader that waits for a chunk past the budget is never left waiting: the prefetcher reads up to it.
    assert p.wait_for(6, timeout=30) is True
    until(lambda: p.stats()["paused"] == 1, "paused again, two chunks past the loader's point")
    assert p.stats()["frontier"] == 8
    assert p.wait_for(len(chunks), timeout=30) is True
    p.join(30)
    assert p.stats()["state"] == "finished" and p.stats()["frontier"] == len(chunks)


def test_need_maps_the_loaders_chunks_onto_the_prefetch_plan(model):
    path, header, _, _ = model
    chunks = plan_chunks([(0, t) for t in header.tensors], CHUNK)
    p = Prefetcher([path], chunks)
    assert p.need(path, chunks[0].offset + 1) == 1 and p.need(path, chunks[2].offset + chunks[2].length) == 3
    assert p.need(path, chunks[-1].offset + chunks[-1].length) == len(chunks)
    assert p.need(path.parent / "other.safetensors", 10) is None


# ------------------------------------------------------------------------------------------ compile workers


def test_compile_workers_scale_with_the_cpus(monkeypatch):
    from bloom_server.fast.coldstart import precompile

    for var in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    cases = {(16, 1): 4, (2, 1): 1, (6, 1): 2, (8, 1): 4, (64, 1): 4, (128, 8): 4, (32, 4): 4, (16, 8): 1}
    for (cpus, ranks), want in cases.items():
        monkeypatch.setattr(precompile, "available_cpus", lambda c=cpus: c)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
        assert precompile.worker_count("") == want, (cpus, ranks)
    assert precompile.worker_count("3") == 3
    assert precompile.worker_count("0") == 0 and not precompile.enabled("0")
    assert precompile.available_cpus() >= 1
