"""A local stand-in for the parts of the Hugging Face Hub HTTP API that `bloom-server download` calls.

Listens on 127.0.0.1 only, on a free port, in a daemon thread:

    with HubStub() as hub:
        sha = hub.add_repo("org/model", {"config.json": b"{}", "tp_00_00.pt": b"..."})
        env = {"HF_ENDPOINT": hub.url}

Routes (as the Hub answers them):
- `GET /api/models/{org}/{name}/revision/{rev}[?blobs=true]`: `{"id", "sha", "siblings": [{"rfilename", "size",
  "blobId", "lfs": {"sha256", "size", "pointerSize"}}], ...}` (size/blobId/lfs only with blobs=true).
- `HEAD|GET /{org}/{name}/resolve/{rev}/{path}`: `X-Repo-Commit`, `ETag` (the git blob id of the stored object).
  Small files are served here. LFS files (>= `lfs_threshold` bytes) answer 302 to `/cdn/{sha256}` with
  `X-Linked-Etag` (the sha256) and `X-Linked-Size`, like the Hub's redirect to its CDN.
- `HEAD|GET /cdn/{sha256}`: the bytes, with `Range: bytes=N-` / `bytes=N-M` -> 206 + Content-Range.
Errors: 404 with `X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound`; 401 when `token` is set and the
request does not carry it; 403 `GatedRepo` for a gated repo; one-shot injected statuses; and `cut` to drop a
connection after N body bytes (the response promised the whole file).

Every request is recorded (`hub.requests`), so tests count what was fetched (`hub.content_gets()`).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    return (
        b"version https://git-lfs.github.com/spec/v1\n"
        + f"oid sha256:{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n".encode()
    )


@dataclass
class Request:
    method: str
    path: str  # without the query
    headers: dict[str, str]
    status: int = 0
    body_bytes: int = 0

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]]
    refs: dict[str, str]
    gated: bool = False
    # Optional lies: what the listing says instead of the truth (path -> dict of sibling fields to override).
    listing_overrides: dict[str, dict] = field(default_factory=dict)
    # Bytes served instead of the listed ones (path -> bytes): a corrupt CDN.
    served_overrides: dict[str, bytes] = field(default_factory=dict)
    # Headers the resolve endpoint sends instead of its own (path -> headers): e.g. an ETag that is no hash.
    header_overrides: dict[str, dict[str, str]] = field(default_factory=dict)


class HubStub:
    def __init__(self, lfs_threshold: int = 1024, token: str | None = None):
        self.lfs_threshold = lfs_threshold
        self.token = token  # when set, every request must carry "Authorization: Bearer <token>"
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.omit_blobs = False  # listing without sizes/checksums (forces HEAD requests)
        self.cuts: dict[str, list[int]] = {}  # file path -> byte counts: next GETs send only that many body bytes
        self.statuses: dict[str, list[int]] = {}  # file path or "api" -> statuses answered once each, in order
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- setup

    def add_repo(self, repo_id: str, files: dict[str, bytes], ref: str = "main", gated: bool = False) -> str:
        """Add a commit holding `files` and point `ref` at it; returns the commit sha."""
        repo = self.repos.setdefault(repo_id, Repo(commits={}, refs={}, gated=gated))
        repo.gated = gated
        digest = hashlib.sha1(repo_id.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        sha = digest.hexdigest()
        repo.commits[sha] = dict(files)
        repo.refs[ref] = sha
        return sha

    def cut(self, path: str, after: int, times: int = 1) -> None:
        """The next `times` GETs of `path` stop after `after` body bytes and drop the connection."""
        self.cuts.setdefault(path, []).extend([after] * times)

    def fail(self, key: str, *statuses: int) -> None:
        """Answer the next requests for `key` (a file path, or "api" for the listing) with these statuses."""
        self.statuses.setdefault(key, []).extend(statuses)

    # ---- queries

    def content_gets(self, path: str | None = None) -> list[Request]:
        """GETs that sent file bytes (the CDN route or a small file's resolve), optionally for one repo path."""
        out = []
        for r in self.requests:
            if r.method != "GET" or r.body_bytes == 0 or r.path.startswith("/api/"):
                continue
            if path is None or r.headers.get("x-stub-file") == path:
                out.append(r)
        return out

    # ---- server

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubStub:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        stub = self

        class Handler(_Handler):
            hub = stub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    # ---- lookups used by the handler

    def resolve(self, repo_id: str, rev: str) -> tuple[Repo | None, str | None]:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, None
        sha = repo.refs.get(rev, rev if rev in repo.commits else None)
        return repo, sha

    def blob(self, sha256: str) -> bytes | None:
        for repo in self.repos.values():
            for files in repo.commits.values():
                for path, data in files.items():
                    if hashlib.sha256(data).hexdigest() == sha256:
                        return repo.served_overrides.get(path, data)
        return None


class _Handler(BaseHTTPRequestHandler):
    hub: HubStub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet
        pass

    # ---- plumbing

    def _record(self) -> Request:
        req = Request(self.command, urlsplit(self.path).path, {k.lower(): v for k, v in self.headers.items()})
        with self.hub.lock:
            self.hub.requests.append(req)
        return req

    def _send(self, req: Request, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        req.status = status
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
            req.body_bytes = len(body)

    def _error(self, req: Request, status: int, code: str | None = None, message: str | None = None) -> None:
        headers = {"Content-Type": "application/json"}
        if code:
            headers["X-Error-Code"] = code
        if message:
            headers["X-Error-Message"] = message
        self._send(req, status, json.dumps({"error": message or code or str(status)}).encode(), headers)

    def _authorized(self, req: Request) -> bool:
        want = self.hub.token
        if want is None:
            return True
        got = req.headers.get("authorization")
        if got == f"Bearer {want}":
            return True
        if got:
            self._error(req, 401, message="Invalid credentials in Authorization header")
        else:
            self._error(req, 401, code="RepoNotFound", message="Repository not found")
        return False

    def _injected(self, req: Request, key: str) -> bool:
        with self.hub.lock:
            queue = self.hub.statuses.get(key)
            status = queue.pop(0) if queue else None
        if status is None:
            return False
        headers = {"Retry-After": "0"} if status in (429, 503) else {}
        self._send(req, status, b'{"error": "injected"}', headers)
        return True

    # ---- routes

    def do_HEAD(self):
        self._route()

    def do_GET(self):
        self._route()

    def _route(self):
        req = self._record()
        parts = urlsplit(self.path)
        segs = [unquote(s) for s in parts.path.split("/")[1:]]
        try:
            if segs[:2] == ["api", "models"] and len(segs) >= 6 and segs[4] == "revision":
                return self._listing(req, f"{segs[2]}/{segs[3]}", "/".join(segs[5:]), parse_qs(parts.query))
            if len(segs) >= 5 and segs[2] == "resolve":
                return self._resolve(req, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]))
            if len(segs) == 2 and segs[0] == "cdn":
                return self._cdn(req, segs[1])
            self._error(req, 404, message="no such route")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _lookup(self, req: Request, repo_id: str, rev: str):
        """(repo, commit sha), or (None, None) after answering the Hub's error for a missing/gated repo or revision."""
        repo, sha = self.hub.resolve(repo_id, rev)
        if repo is None:
            self._error(req, 404, "RepoNotFound", "Repository not found")
        elif repo.gated:
            self._error(req, 403, "GatedRepo", "Access to this model is restricted")
        elif sha is None:
            self._error(req, 404, "RevisionNotFound", "Invalid rev id: " + rev)
        else:
            return repo, sha
        return None, None

    def _listing(self, req: Request, repo_id: str, rev: str, query: dict) -> None:
        if not self._authorized(req) or self._injected(req, "api"):
            return
        repo, sha = self._lookup(req, repo_id, rev)
        if repo is None:
            return
        blobs = query.get("blobs", ["false"])[0].lower() == "true" and not self.hub.omit_blobs
        siblings = []
        for path, data in sorted(repo.commits[sha].items()):
            s: dict = {"rfilename": path}
            if blobs:
                if len(data) >= self.hub.lfs_threshold:
                    pointer = lfs_pointer(data)
                    s.update(
                        size=len(data),
                        blobId=git_blob_sha1(pointer),
                        lfs={
                            "sha256": hashlib.sha256(data).hexdigest(),
                            "size": len(data),
                            "pointerSize": len(pointer),
                        },
                    )
                else:
                    s.update(size=len(data), blobId=git_blob_sha1(data))
                s.update(repo.listing_overrides.get(path, {}))
            siblings.append(s)
        body = {
            "_id": sha[:24],
            "id": repo_id,
            "modelId": repo_id,
            "sha": sha,
            "private": self.hub.token is not None,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "lastModified": "2026-01-01T00:00:00.000Z",
            "siblings": siblings,
        }
        self._send(req, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _resolve(self, req: Request, repo_id: str, rev: str, path: str) -> None:
        req.headers["x-stub-file"] = path
        if not self._authorized(req) or self._injected(req, path):
            return
        repo, sha = self._lookup(req, repo_id, rev)
        if repo is None:
            return
        data = repo.commits[sha].get(path)
        if data is None:
            return self._error(req, 404, "EntryNotFound", f"{path} does not exist on {rev}")
        common = {"X-Repo-Commit": sha}
        if len(data) >= self.hub.lfs_threshold:
            pointer = lfs_pointer(data)
            sha256 = hashlib.sha256(data).hexdigest()
            common.update(
                {
                    "ETag": f'"{git_blob_sha1(pointer)}"',
                    "X-Linked-Etag": f'"{sha256}"',
                    "X-Linked-Size": str(len(data)),
                    "Location": f"/cdn/{sha256}",
                }
            )
            return self._send(req, 302, b"", common)
        common["ETag"] = f'"{git_blob_sha1(data)}"'
        common.update(repo.header_overrides.get(path, {}))
        self._serve_bytes(req, repo.served_overrides.get(path, data), path, common)

    def _cdn(self, req: Request, sha256: str) -> None:
        # The CDN has its own signed URLs: no Authorization needed (requests drops it anyway on another host).
        data = self.hub.blob(sha256)
        if data is None:
            return self._error(req, 404, message="no such object")
        path = None
        for repo in self.hub.repos.values():
            for files in repo.commits.values():
                for p, d in files.items():
                    if hashlib.sha256(d).hexdigest() == sha256:
                        path = p
        req.headers["x-stub-file"] = path or sha256
        if path and self._injected(req, path):
            return
        self._serve_bytes(req, data, path or sha256, {"ETag": f'"{sha256}"'})

    def _serve_bytes(self, req: Request, data: bytes, path: str, headers: dict[str, str]) -> None:
        headers = dict(headers, **{"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"})
        status, start, end = 200, 0, len(data)
        rng = req.range
        if rng:
            spec = rng.removeprefix("bytes=")
            first, _, last = spec.partition("-")
            start = int(first)
            end = int(last) + 1 if last else len(data)
            if start >= len(data) or end > len(data) or start >= end:
                return self._send(req, 416, b"", {"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        body = data[start:end]
        if self.command == "HEAD":
            req.status = status
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return
        with self.hub.lock:
            queue = self.hub.cuts.get(path)
            cut = queue.pop(0) if queue else None
        if cut is None or cut >= len(body):
            return self._send(req, status, body, headers)
        # Promise the whole body, send part of it, then drop the connection.
        req.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:cut])
        self.wfile.flush()
        req.body_bytes = cut
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
