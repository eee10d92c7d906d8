"""What the reliability tests (hostile input, fuzzing, burst, secrets) share: a server process watched for runaway
memory, and readings of its resident memory, threads, file descriptors and connections from /proc.

Linux only (/proc), like the rest of the suite's process tests.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from helpers import ServerProcess, free_port, http

# A tiny-model server sits near 300 MiB. A request that makes it allocate without bound (it has happened: see
# docs/reliability.md) would otherwise take the whole CI machine down with it; the guard kills it first.
DEFAULT_RSS_LIMIT_MIB = 3072


def status_field(pid: int, name: str) -> int:
    """An integer field of /proc/<pid>/status (VmRSS and VmHWM in KiB, Threads); -1 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return -1


def rss_mib(pid: int) -> float:
    kib = status_field(pid, "VmRSS")
    return kib / 1024 if kib >= 0 else -1.0


def threads(pid: int) -> int:
    return status_field(pid, "Threads")


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def established(port: int) -> int:
    """TCP connections in state ESTABLISHED whose local port is `port` (the server's side), IPv4 and IPv6."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "01" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                n += 1
    return n


class GuardedServer(ServerProcess):
    """A ServerProcess whose resident memory is sampled every 50 ms; above the limit it is killed (SIGKILL to its
    process group) and `guard_tripped` says so. `peak_rss_mib` is the highest reading."""

    def __init__(self, *args, rss_limit_mib: float = DEFAULT_RSS_LIMIT_MIB, **kwargs):
        super().__init__(*args, **kwargs)
        self.rss_limit_mib = rss_limit_mib
        self.peak_rss_mib = 0.0
        self.guard_tripped: str | None = None
        self._stop_guard = threading.Event()
        self._guard = threading.Thread(target=self._watch, name="rss-guard", daemon=True)
        self._guard.start()

    def _watch(self) -> None:
        while not self._stop_guard.is_set() and self.proc.poll() is None:
            rss = rss_mib(self.proc.pid)
            self.peak_rss_mib = max(self.peak_rss_mib, rss)
            if rss > self.rss_limit_mib:
                self.guard_tripped = f"server RSS {rss:.0f} MiB passed the guard's {self.rss_limit_mib:.0f} MiB: killed"
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return
            self._stop_guard.wait(0.05)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def assert_alive(self, context: str = "") -> None:
        assert self.guard_tripped is None, f"{self.guard_tripped} ({context})\n{self.log()[-3000:]}"
        assert self.alive(), f"server exited with {self.proc.returncode} ({context})\n{self.log()[-3000:]}"

    def stop(self, timeout: float = 20) -> int | None:
        self._stop_guard.set()
        return super().stop(timeout)


def start_server(
    model_dir: Path,
    log_path: Path,
    *flags: str,
    env: dict | None = None,
    rss_limit_mib: float = DEFAULT_RSS_LIMIT_MIB,
    timeout: float = 120,
) -> GuardedServer:
    srv = GuardedServer(
        ["--model", str(model_dir), *flags], free_port(), env=env, log_path=log_path, rss_limit_mib=rss_limit_mib
    )
    try:
        srv.wait_ready(timeout)
    except BaseException:
        srv.stop()
        raise
    return srv


GOOD_GENERATE = {"text": ["Hello there"], "max_new_tokens": 3}


def good_request_succeeds(srv: ServerProcess, timeout: float = 30) -> None:
    """A plain request right after something hostile: the server still answers it properly."""
    status, body, _ = http("POST", srv.url + "/generate", GOOD_GENERATE, timeout=timeout)
    assert status == 200, body
    assert isinstance(body["text"], list) and len(body["text"]) == 1 and 1 <= body["num_generated_tokens"][0] <= 3


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
