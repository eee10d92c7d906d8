"""Shared test helpers: a real server process on 127.0.0.1, bounded waits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(
    method: str, url: str, body: Any = None, timeout: float = 60, headers: dict | None = None, raw: bytes | None = None
):
    """(status, parsed JSON or text, headers). Never raises for HTTP statuses."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, text, hdrs = resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        status, text, hdrs = err.code, err.read().decode(), dict(err.headers)
    try:
        return status, json.loads(text), hdrs
    except ValueError:
        return status, text, hdrs


class ServerProcess:
    """`bloom-server serve` (or a launcher around it) as a real child process."""

    def __init__(
        self,
        args: list[str],
        port: int,
        env: dict | None = None,
        log_path: Path | None = None,
        launcher: list[str] | None = None,
    ):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        cmd = (launcher or [sys.executable, "-m", "bloom_server"]) + [
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *args,
        ]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"bloom-server-{port}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def __enter__(self) -> ServerProcess:
        """`with ServerProcess(...) as srv:` waits until ready, and stops the server however the block ends."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                status, _, _ = http("GET", self.url + "/ready", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()[-4000:]}")

    def post(self, path: str, body: Any = None, **kw):
        return http("POST", self.url + path, body, **kw)

    def get(self, path: str, **kw):
        return http("GET", self.url + path, **kw)

    def stop(self, timeout: float = 20) -> int | None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode
