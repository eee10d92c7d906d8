"""What the load tools share (scripts/bench/soak.py, scripts/bench/load_test.py, scripts/bench/server_overhead.py): loopback checks,
starting and stopping a local `bloom-server serve`, percentiles, and a small HTTP/1.1 client on asyncio streams
(keep-alive, Content-Length and chunked bodies, one chunk at a time for server-sent events).

Standard library only, so the scripts can be carried to another machine without wheels. The scripts import it as
`_loadgen` (Python puts the script's own directory first on sys.path).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

# ----------------------------------------------------------------------------------------------------- the server


def loopback(host: str) -> bool:
    """True when every address `host` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return all(info[4][0].startswith("127.") or info[4][0] == "::1" for info in infos)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    serve_args: list[str], log_path: str, name: str, ready_timeout: float = 180
) -> tuple[subprocess.Popen, str]:
    """`python -m bloom_server serve` on 127.0.0.1 and a free port, in its own session; returns when /ready is 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "bloom_server", "serve", "--host", "127.0.0.1", "--port", str(port), *serve_args]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "w")
    print(f"{name}: starting {' '.join(cmd)} (log: {log_path})", flush=True)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name}: the server exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except (OSError, urllib.error.HTTPError):
            pass
        time.sleep(0.3)
    stop_server(proc)
    raise SystemExit(f"{name}: the server was not ready within {ready_timeout:.0f} s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> int | None:
    """SIGTERM to the server's process group (it drains), SIGKILL after 60 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


# ------------------------------------------------------------------------------------------------------- numbers


def pct(values, p: float) -> float | None:
    """The p-th percentile (nearest rank on the sorted values), None when there are none."""
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


# ------------------------------------------------------------------------------------------- HTTP/1.1 on asyncio


def request_bytes(method: str, path: str, host: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """One HTTP/1.1 request (keep-alive), ready to write; the body is JSON when there is one."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """The status and the headers (names lower-cased) of one response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers


async def iter_body(reader: asyncio.StreamReader, headers: dict[str, str]):
    """The body as it arrives: each chunk of a chunked body, or the whole Content-Length body at once."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the empty line
                    pass
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif "content-length" in headers:
        n = int(headers["content-length"])
        if n:
            yield await reader.readexactly(n)
    else:  # no length: the body runs to the end of the connection
        data = await reader.read()
        if data:
            yield data


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    return b"".join([chunk async for chunk in iter_body(reader, headers)])


async def exchange_content_length(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> int:
    """The leanest round trip (for a Content-Length answer, as the overhead benchmark needs): write, read the head,
    read the body; returns the status. A chunked answer is read correctly too, through iter_body."""
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = -1
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line.split(b":", 1)[1])
            break
    if length >= 0:
        await reader.readexactly(length)
    else:
        _, headers = await read_head(asyncio_reader_of(head))
        await read_body(reader, headers)
    return status


def asyncio_reader_of(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r
