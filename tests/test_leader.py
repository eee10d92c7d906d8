"""Rank 0's engine loop (runtime/lockstep.py Leader) on one rank, with a stand-in backend: the idle work it runs
while nothing is queued (the fast engine's decode graph captures), and what always goes first."""

from __future__ import annotations

import threading
import time

from bloom_server.runtime.lockstep import Leader


class IdleBackend:
    """Offers `pieces` pieces of idle work; forward steps take `forward_s` seconds each."""

    def __init__(self, pieces: int, forward_s: float = 0.0):
        self.left, self.forward_s = pieces, forward_s
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def idle_work(self) -> bool:
        with self.lock:
            self.calls.append("idle")
            if self.left > 0:
                self.left -= 1
                time.sleep(0.01)  # one capture's worth
            return self.left > 0

    def forward_nll(self, batch):
        with self.lock:
            self.calls.append("forward")
        time.sleep(self.forward_s)
        return 0.5

    def count(self, kind: str) -> int:
        with self.lock:
            return self.calls.count(kind)


def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_idle_work_waits_for_readiness_then_runs_until_none_is_left():
    b = IdleBackend(pieces=5)
    leader = Leader(b, None, heartbeat_s=0.02).start()
    try:
        time.sleep(0.15)  # heartbeats only: the server is not ready yet
        assert b.count("idle") == 0
        leader.allow_idle_work()
        wait_for(lambda: b.left == 0)
        time.sleep(0.15)  # nothing left: back to plain heartbeats, no more idle steps
        assert b.count("idle") == 5
        assert leader.run("forward") == 0.5  # real work may leave new idle work: the loop asks once more
        wait_for(lambda: b.count("idle") == 6)
        time.sleep(0.1)
        assert b.count("idle") == 6
    finally:
        leader.stop()
    assert leader.dead is None


def test_a_queued_step_waits_for_one_piece_of_idle_work_at_most():
    b = IdleBackend(pieces=1000)
    leader = Leader(b, None, heartbeat_s=0.02).start()
    try:
        leader.allow_idle_work()
        wait_for(lambda: b.count("idle") >= 3)
        t0 = time.monotonic()
        assert leader.run("forward") == 0.5
        assert time.monotonic() - t0 < 0.5  # one 10-ms piece ahead of it, not the 1,000 left
        assert b.left > 900
    finally:
        leader.stop()


def test_a_backend_without_idle_work_gets_heartbeats_only():
    class Plain:
        def forward_nll(self, batch):
            return 1.0

    leader = Leader(Plain(), None, heartbeat_s=0.02).start()
    try:
        leader.allow_idle_work()
        assert leader.run("forward") == 1.0
        time.sleep(0.1)
    finally:
        leader.stop()
    assert leader.dead is None
