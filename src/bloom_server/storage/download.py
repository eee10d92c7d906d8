"""`bloom-server download`: fetch a Hub repository into a plain directory (a PVC), resumable, idempotent, verified.

    bloom-server download --repo-id microsoft/bloom-deepspeed-inference-fp16 --revision main --local-dir /data/bloom

What it does, in order:
1. Lists the repository at the revision (`/api/models/{repo}/revision/{rev}?blobs=true`), which resolves the revision to
   a commit sha and gives every file's size and checksum: the LFS sha256 for large files, the git blob sha1 for small
   ones. Every file is then fetched at that commit, so a branch that moves mid-download cannot mix two commits. Where the
   listing has no sizes (some mirrors), one HEAD per file reads them from X-Linked-Size / X-Linked-Etag / ETag.
2. Decides per file: already verified (its size and mtime match what a previous run recorded: not even re-hashed),
   present but unrecorded (hashed, kept if it matches), truncated (resumed from its length), or missing (fetched,
   resumed from `.bloom-download-parts/` if a previous run was cut off).
3. If nothing needs fetching and the completion marker already says so, exits 0 without writing anything.
4. Otherwise checks free space, writes the in-progress marker, removes the completion marker, and fetches the files
   (`--max-workers` in parallel) with HTTP Range resumes and bounded retries. Bytes are hashed as they arrive; a file
   is moved into place only once its size and checksum match.
5. Writes the completion marker (see `bloom_server.storage.marker`) and removes the in-progress one.

Logs go to stderr, one line each (readable in `kubectl logs`): the plan, one line when each file starts and ends,
a progress line every `--progress-interval` seconds (bytes, percent, throughput, elapsed, ETA, the files in flight),
and one summary line at the end. On failure the last line is `bloom-server download: error: <reason>` and the exit code
says which kind of failure it was (EXIT_* below). The token (HF_TOKEN) is sent to the endpoint and never printed.

Imports only the standard library at import time; huggingface_hub (and requests, which it uses) inside functions.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import os
import pathlib
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bloom_server.storage import marker

DEFAULT_REPO_ID = "microsoft/bloom-deepspeed-inference-fp16"

EXIT_OK = 0
EXIT_ERROR = 1  # anything not listed below (a bug, an unexpected HTTP status)
EXIT_USAGE = 2  # bad arguments (argparse's own code)
EXIT_AUTH = 3  # HTTP 401/403, gated repository
EXIT_NOT_FOUND = 4  # HTTP 404: repository, revision or file; or no file matches the patterns
EXIT_NETWORK = 5  # connection refused/reset/cut, timeouts, HTTP 5xx/429 after the retries
EXIT_DISK_FULL = 6  # ENOSPC/EDQUOT while writing, or not enough free space for what is left to fetch
EXIT_VERIFY = 7  # a file's bytes do not match the Hub's size or checksum, even after fetching it again
EXIT_LISTING = 8  # the Hub's listing cannot be written as a directory: odd names, negative sizes, a file and a folder

KIND_BY_CODE = {
    EXIT_ERROR: "error",
    EXIT_AUTH: "auth",
    EXIT_NOT_FOUND: "not-found",
    EXIT_NETWORK: "network",
    EXIT_DISK_FULL: "disk-full",
    EXIT_VERIFY: "verify",
    EXIT_LISTING: "listing",
}
MAX_NAME_BYTES = 255  # one path component, as Linux file systems allow

CHUNK = 1 << 18  # a connection cut loses at most one chunk of what was in flight
LOG = logging.getLogger("bloom_server.storage.download")


class DownloadError(Exception):
    """A failure with its exit code; str() is the one-line reason."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _Retryable(Exception):
    """A transient failure (connection, timeout, 5xx, 429): retried up to --retries times."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.wait = wait


class _Cancelled(Exception):
    pass


@dataclass
class RemoteFile:
    path: str
    size: int
    sha256: str | None = None  # LFS object id
    git_sha1: str | None = None  # git blob id (small files stored in git)

    def record(self, mtime_ns: int) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "git_sha1": self.git_sha1,
            # What the bytes were checked against: a hash the Hub published, or nothing ("unverified": the size
            # matched, no more). The server loads a pickle only with a hash here (model_dir.check_pickles).
            "checksum": marker.checksum_kind(self.sha256, self.git_sha1),
            "mtime_ns": mtime_ns,
        }

    @property
    def checksum_name(self) -> str:
        return "sha256" if self.sha256 else ("git-sha1" if self.git_sha1 else "size only")


# ----------------------------------------------------------------------------------------------------------- arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo-id", default=DEFAULT_REPO_ID, help="Hub model repository (default: %(default)s)")
    parser.add_argument(
        "--revision", default="main", help="branch, tag or commit sha; resolved to a commit once (default: main)"
    )
    parser.add_argument(
        "--local-dir", required=True, type=pathlib.Path, help="directory to fill (created if missing), e.g. on a PVC"
    )
    parser.add_argument(
        "--allow-patterns",
        action="extend",
        nargs="+",
        metavar="GLOB",
        help="only files matching one of these globs (repeatable, or several after one flag)",
    )
    parser.add_argument(
        "--ignore-patterns", action="extend", nargs="+", metavar="GLOB", help="skip files matching these globs"
    )
    parser.add_argument("--max-workers", type=_positive_int, default=8, help="files fetched in parallel (default: 8)")
    parser.add_argument(
        "--retries",
        type=_non_negative_int,
        default=5,
        help="retries per request after a network error, timeout, 429 or 5xx, resuming where it stopped (default: 5)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for a connection or for the next bytes (default: 60)",
    )
    parser.add_argument(
        "--progress-interval",
        type=float,
        default=15.0,
        help="seconds between progress lines (default: 15)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="re-hash every file already on disk instead of trusting the size and mtime a previous run recorded",
    )
    parser.add_argument(
        "--skip-space-check", action="store_true", help="do not refuse to start when free space looks too small"
    )


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def _non_negative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return v


# ---------------------------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    """Run a download; returns the exit code. Logs to stderr; the last line on failure is the one-line reason."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_UTCFormatter("%(asctime)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    token: str | None = None
    try:
        token = _token()
        Downloader(args, token).run()
        return EXIT_OK
    except DownloadError as e:
        LOG.error("bloom-server download: error [%s]: %s", KIND_BY_CODE.get(e.code, "error"), _redact(e.reason, token))
        return e.code
    except KeyboardInterrupt:
        LOG.error("bloom-server download: error [interrupted]: stopped; rerun to resume")
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: still one readable line, and never the token
        LOG.error("bloom-server download: error [error]: %s: %s", type(e).__name__, _redact(str(e), token))
        return EXIT_ERROR
    finally:
        LOG.removeHandler(handler)
        handler.flush()


class _UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))


def _token() -> str | None:
    """HF_TOKEN, else the file at HF_TOKEN_PATH (how the Job mounts its Secret), else huggingface_hub's stored token.
    Never logged."""
    from huggingface_hub import get_token

    return get_token()


def _redact(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    return " ".join(text.split())  # one line


def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _public_url(url: str) -> str:
    """The endpoint without any user:password@ part, for logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# ---------------------------------------------------------------------------------------------------------- helpers


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _duration(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _normalize_etag(etag: str | None) -> str | None:
    if not etag:
        return None
    etag = etag.strip()
    if etag.startswith("W/"):
        etag = etag[2:]
    return etag.strip('"').lower() or None


def _is_hex(s: str | None, n: int) -> bool:
    return isinstance(s, str) and len(s) == n and all(c in "0123456789abcdef" for c in s)


class _Hasher:
    """sha256 and/or git blob sha1 over the bytes of one file, fed in order."""

    def __init__(self, rf: RemoteFile):
        self.rf = rf
        self.reset()

    def reset(self) -> None:
        rf = self.rf
        self.sha256 = hashlib.sha256() if rf.sha256 else None
        self.sha1 = None
        if rf.git_sha1:
            self.sha1 = hashlib.sha1(usedforsecurity=False)
            self.sha1.update(b"blob %d\0" % rf.size)
        self.count = 0

    def update(self, data: bytes | memoryview) -> None:
        if self.sha256 is not None:
            self.sha256.update(data)
        if self.sha1 is not None:
            self.sha1.update(data)
        self.count += len(data)

    def feed_file(self, f: pathlib.Path, upto: int, cancel: threading.Event | None = None) -> None:
        with open(f, "rb") as fh:
            fh.seek(self.count)
            left = upto - self.count
            while left > 0:
                if cancel is not None and cancel.is_set():
                    raise _Cancelled()
                data = fh.read(min(CHUNK * 8, left))
                if not data:
                    break
                self.update(data)
                left -= len(data)

    def mismatch(self) -> str | None:
        """None when everything known matches; else what differs."""
        if self.count != self.rf.size:
            return f"size {self.count} != {self.rf.size}"
        if self.sha256 is not None and self.sha256.hexdigest() != self.rf.sha256:
            return f"sha256 {self.sha256.hexdigest()} != {self.rf.sha256}"
        if self.sha1 is not None and self.sha1.hexdigest() != self.rf.git_sha1:
            return f"git-sha1 {self.sha1.hexdigest()} != {self.rf.git_sha1}"
        return None


def hash_file(rf: RemoteFile, f: pathlib.Path, cancel: threading.Event | None = None) -> str | None:
    """Hash a file on disk against what the Hub says; None when it matches."""
    h = _Hasher(rf)
    h.feed_file(f, f.stat().st_size, cancel)
    return h.mismatch()


def _write(fh, data: bytes | memoryview) -> None:
    """Every byte of a fetched file is written here (unbuffered, so ENOSPC surfaces here; tests fail it)."""
    view = memoryview(data)
    while view:
        n = fh.write(view)
        if n is None or n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]


def _disk_error(e: OSError, where: pathlib.Path) -> DownloadError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DownloadError(
            EXIT_DISK_FULL,
            f"disk full writing {where} ({os.strerror(e.errno)}); free space on that volume: "
            f"{_free_space(where)}; grow the PVC or delete files, then rerun to resume",
        )
    return DownloadError(EXIT_ERROR, f"cannot write {where}: {e.strerror or e}")


def _free_space(where: pathlib.Path) -> str:
    p = where
    for _ in range(64):
        if p.exists():
            try:
                return human(shutil.disk_usage(p).free)
            except OSError:
                return "unknown"
        p = p.parent
    return "unknown"


# ------------------------------------------------------------------------------------------------------------ progress


class Progress:
    """Bytes fetched this run, for the periodic progress line. Thread-safe."""

    def __init__(self, total_to_fetch: int, interval: float):
        self.total = total_to_fetch
        self.interval = max(interval, 0.0)
        self.done = 0
        self.start = time.monotonic()
        self.last_log = self.start
        self.active: dict[str, list[int]] = {}  # path -> [bytes on disk, size]
        self.lock = threading.Lock()

    def begin(self, path: str, have: int, size: int) -> None:
        with self.lock:
            self.active[path] = [have, size]

    def end(self, path: str) -> None:
        with self.lock:
            self.active.pop(path, None)

    def add(self, path: str, n: int) -> None:
        line = None
        with self.lock:
            self.done += n
            if path in self.active:
                self.active[path][0] += n
            now = time.monotonic()
            if now - self.last_log >= self.interval:
                self.last_log = now
                line = self._line(now)
        if line:
            LOG.info("%s", line)

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.start, 1e-6)

    def _line(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.done / max(elapsed, 1e-6)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = _duration((self.total - self.done) / rate) if rate > 0 else "?"
        files = ", ".join(
            f"{p} {100.0 * have / size if size else 100.0:.0f}%" for p, (have, size) in sorted(self.active.items())
        )
        return (
            f"progress: {human(self.done)} of {human(self.total)} ({pct:.1f}%) at {human(rate)}/s, "
            f"elapsed {_duration(elapsed)}, eta {eta}; in flight: {files or '-'}"
        )


# ---------------------------------------------------------------------------------------------------------- downloader


class Downloader:
    def __init__(self, args: argparse.Namespace, token: str | None):
        self.args = args
        self.token = token
        self.repo_id: str = args.repo_id
        self.revision: str = args.revision
        self.dir = pathlib.Path(args.local_dir)
        self.parts = self.dir / marker.PARTS_DIR
        self.endpoint = _endpoint()
        self.timeout = float(args.timeout)
        self.retries = int(args.retries)
        self.cancel = threading.Event()
        self.lock = threading.Lock()
        self.commit = ""
        self.verified: dict[str, dict[str, Any]] = {}
        self._session = None

    # ---- HTTP

    @property
    def session(self):
        if self._session is None:
            from huggingface_hub.utils import get_session

            self._session = get_session()
        return self._session

    def headers(self) -> dict[str, str]:
        from huggingface_hub.utils import build_hf_headers

        from bloom_server import __version__

        # token=False when there is none: build_hf_headers must not go looking for one itself.
        h = build_hf_headers(token=self.token or False, library_name="bloom-server", library_version=__version__)
        h["Accept-Encoding"] = "identity"  # sizes and Range offsets are of the stored bytes
        return h

    def url(self, path: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, path, revision=self.commit or self.revision, endpoint=self.endpoint)

    def _http_error(self, e: Exception, what: str) -> Exception:
        """An HfHubHTTPError -> DownloadError (final) or _Retryable."""
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            RevisionNotFoundError,
        )

        resp = getattr(e, "response", None)
        status = getattr(resp, "status_code", None)
        token_state = (
            "a token was sent (HF_TOKEN or HF_TOKEN_PATH)"
            if self.token
            else "no token was sent: set HF_TOKEN or HF_TOKEN_PATH"
        )
        repo = f"{self.repo_id}@{self.revision}"
        if isinstance(e, GatedRepoError):
            return DownloadError(
                EXIT_AUTH,
                f"HTTP {status}: {self.repo_id} is a gated repository: accept its terms on the Hub with the account "
                f"whose token is used ({token_state}), then rerun",
            )
        if status == 401:
            return DownloadError(
                EXIT_AUTH,
                f"HTTP 401 unauthorized for {what} of {repo} ({token_state}): the token is missing or invalid, "
                "or the repository is private, gated or does not exist",
            )
        if status == 403:
            return DownloadError(
                EXIT_AUTH,
                f"HTTP 403 forbidden for {what} of {repo} ({token_state}): the token has no read access to it",
            )
        if status == 404:
            if isinstance(e, RevisionNotFoundError):
                return DownloadError(
                    EXIT_NOT_FOUND, f"HTTP 404: revision {self.revision!r} not found in {self.repo_id}"
                )
            if isinstance(e, EntryNotFoundError):
                return DownloadError(EXIT_NOT_FOUND, f"HTTP 404: {what} not found in {self.repo_id}@{self.commit}")
            return DownloadError(EXIT_NOT_FOUND, f"HTTP 404: repository {self.repo_id} not found ({what})")
        if status == 429 or (status is not None and status >= 500):
            wait = None
            retry_after = resp.headers.get("Retry-After") if resp is not None else None
            if retry_after and retry_after.isdigit():
                wait = min(float(retry_after), 60.0)
            return _Retryable(f"HTTP {status} for {what}", wait)
        return DownloadError(EXIT_ERROR, f"HTTP {status} for {what} of {repo}: {e}")

    def _with_retries(self, what: str, fn: Callable[[], Any]) -> Any:
        """Call fn, retrying transient failures; the last one becomes EXIT_NETWORK."""
        import requests
        from huggingface_hub.errors import HfHubHTTPError

        attempt = 0
        while True:
            if self.cancel.is_set():
                raise _Cancelled()
            try:
                try:
                    return fn()
                except HfHubHTTPError as e:
                    raise self._http_error(e, what) from e
                except (requests.ConnectionError, requests.Timeout) as e:
                    raise _Retryable(f"{type(e).__name__} for {what}: {_short(e)}") from e
                except requests.exceptions.ChunkedEncodingError as e:
                    raise _Retryable(f"connection cut while reading {what}: {_short(e)}") from e
            except _Retryable as e:
                attempt += 1
                if attempt > self.retries:
                    raise DownloadError(
                        EXIT_NETWORK,
                        f"network error talking to {_public_url(self.endpoint)}: {e} "
                        f"(gave up after {self.retries} retries); rerun to resume",
                    ) from e
                wait = e.wait if e.wait is not None else min(2.0 ** (attempt - 1), 30.0)
                LOG.info("retry %d/%d in %.0fs: %s", attempt, self.retries, wait, e)
                if self.cancel.wait(wait):
                    raise _Cancelled() from e

    # ---- listing

    def list_files(self) -> list[RemoteFile]:
        from huggingface_hub import HfApi
        from huggingface_hub.utils import filter_repo_objects

        api = HfApi(endpoint=self.endpoint, token=self.token or False, library_name="bloom-server")
        info = self._with_retries(
            "the file listing",
            lambda: api.model_info(self.repo_id, revision=self.revision, files_metadata=True, timeout=self.timeout),
        )
        if not _is_hex(info.sha, 40):
            raise DownloadError(EXIT_ERROR, f"the Hub returned no commit sha for {self.repo_id}@{self.revision}")
        self.commit = info.sha
        siblings = {s.rfilename: s for s in (info.siblings or [])}
        names = list(
            filter_repo_objects(
                sorted(siblings), allow_patterns=self.args.allow_patterns, ignore_patterns=self.args.ignore_patterns
            )
        )
        if not names:
            raise DownloadError(
                EXIT_NOT_FOUND,
                f"no file of {self.repo_id}@{self.commit[:12]} matches --allow-patterns {self.args.allow_patterns} "
                f"--ignore-patterns {self.args.ignore_patterns} ({len(siblings)} files in the repository)",
            )
        files = []
        for name in names:
            _check_rel_path(name)
            s = siblings[name]
            if s.lfs is not None and s.lfs.get("sha256") and isinstance(s.lfs.get("size"), int):
                files.append(RemoteFile(name, int(s.lfs["size"]), sha256=str(s.lfs["sha256"]).lower()))
            elif isinstance(s.size, int) and s.lfs is None and _is_hex((s.blob_id or "").lower(), 40):
                files.append(RemoteFile(name, int(s.size), git_sha1=s.blob_id.lower()))
            else:
                files.append(self.head(name))
        _check_listing(files)
        return files

    def head(self, name: str) -> RemoteFile:
        """Size and checksum of one file from the resolve endpoint's headers (X-Linked-Size, X-Linked-Etag, ETag)."""
        from huggingface_hub import get_hf_file_metadata

        meta = self._with_retries(
            name,
            lambda: get_hf_file_metadata(
                self.url(name), token=self.token or False, timeout=self.timeout, library_name="bloom-server"
            ),
        )
        if meta.size is None:
            raise DownloadError(EXIT_LISTING, f"the Hub gave no size for {name}")
        etag = _normalize_etag(meta.etag)
        if _is_hex(etag, 64):
            return RemoteFile(name, meta.size, sha256=etag)
        if _is_hex(etag, 40):
            return RemoteFile(name, meta.size, git_sha1=etag)
        return RemoteFile(name, meta.size)  # size only

    # ---- plan

    def _recorded(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
        """Files a previous run verified at this commit (completion or in-progress marker), and the completion
        marker if it is for this repo and commit."""
        recorded: dict[str, dict[str, Any]] = {}
        complete = None
        for name in (marker.COMPLETE, marker.IN_PROGRESS):
            try:
                data = marker.read_marker(self.dir, name)
            except FileNotFoundError:
                continue
            except Exception as e:  # noqa: BLE001 - a damaged marker only costs re-hashing
                LOG.info("ignoring %s: %s", name, e)
                continue
            if data.get("repo_id") != self.repo_id or data.get("commit") != self.commit:
                LOG.info(
                    "%s is for %s@%s, not %s@%s: files on disk will be checked against this commit",
                    name,
                    data.get("repo_id"),
                    str(data.get("commit"))[:12],
                    self.repo_id,
                    self.commit[:12],
                )
                continue
            if name == marker.COMPLETE:
                complete = data
                for entry in data.get("files") or []:
                    if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                        recorded[entry["path"]] = entry
            else:
                for path, entry in (data.get("verified") or {}).items():
                    if isinstance(entry, dict):
                        recorded[path] = dict(entry, path=path)
        return recorded, complete

    def plan(self, files: list[RemoteFile]) -> tuple[list[RemoteFile], dict[str, Any] | None]:
        recorded, complete = self._recorded()
        to_fetch = []
        for rf in files:
            final = self.dir / rf.path
            try:
                st = final.stat() if final.is_file() else None
            except OSError:
                st = None
            if st is None:
                if final.exists() or final.is_symlink():
                    raise DownloadError(EXIT_ERROR, f"{final} exists and is not a regular file; remove it and rerun")
                to_fetch.append(rf)
                continue
            if st.st_size < rf.size:
                LOG.info("%s: %d of %d bytes on disk (truncated): will resume it", rf.path, st.st_size, rf.size)
                self._to_parts(rf, final)
                to_fetch.append(rf)
                continue
            if st.st_size > rf.size:
                LOG.info("%s: %d bytes on disk, the Hub has %d: will fetch it again", rf.path, st.st_size, rf.size)
                final.unlink()
                to_fetch.append(rf)
                continue
            rec = recorded.get(rf.path)
            trusted = (
                not self.args.verify
                and rec is not None
                and rec.get("size") == rf.size
                and rec.get("mtime_ns") == st.st_mtime_ns
                and rec.get("sha256") == rf.sha256
                and rec.get("git_sha1") == rf.git_sha1
            )
            if trusted:
                self.verified[rf.path] = rf.record(st.st_mtime_ns)
                continue
            if rf.sha256 is None and rf.git_sha1 is None:
                self.verified[rf.path] = rf.record(st.st_mtime_ns)  # the Hub gives only a size: it matches
                continue
            LOG.info("%s: on disk with the right size, checking its %s", rf.path, rf.checksum_name)
            bad = hash_file(rf, final)
            if bad is None:
                self.verified[rf.path] = rf.record(st.st_mtime_ns)
            else:
                LOG.info("%s: does not match the Hub (%s): will fetch it again", rf.path, bad)
                final.unlink()
                to_fetch.append(rf)
        return to_fetch, complete

    def _to_parts(self, rf: RemoteFile, final: pathlib.Path) -> None:
        part = self.parts / rf.path
        part.parent.mkdir(parents=True, exist_ok=True)
        if part.exists() and part.stat().st_size >= final.stat().st_size:
            final.unlink()  # the partial file already holds at least as much
        else:
            os.replace(final, part)

    # ---- markers

    def _marker_common(self) -> dict[str, Any]:
        return {
            "format": marker.FORMAT,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "endpoint": _public_url(self.endpoint),
        }

    def _write_in_progress(self) -> None:
        with self.lock:
            data = dict(self._marker_common(), state="in_progress", started_at=self.started_at, verified={})
            data["verified"] = {p: {k: v for k, v in r.items() if k != "path"} for p, r in self.verified.items()}
            try:
                marker.write_marker(self.dir, marker.IN_PROGRESS, data)
            except OSError as e:
                raise _disk_error(e, self.dir / marker.IN_PROGRESS) from e

    # ---- fetch one file

    def fetch(self, rf: RemoteFile, progress: Progress) -> None:
        final = self.dir / rf.path
        part = self.parts / rf.path
        try:
            part.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _disk_error(e, part.parent) from e
        refetched = False
        while True:
            hasher = _Hasher(rf)
            have = part.stat().st_size if part.exists() else 0
            if have > rf.size:
                part.unlink()
                have = 0
            started = time.monotonic()
            LOG.info(
                "start %s: %s%s",
                rf.path,
                human(rf.size),
                f", resuming at {human(have)} ({100.0 * have / rf.size:.0f}%)" if have else "",
            )
            progress.begin(rf.path, have, rf.size)
            fetched = [0]
            try:
                self._with_retries(rf.path, lambda: self._get_into(rf, part, hasher, progress, fetched))  # noqa: B023 - called within this iteration
            finally:
                progress.end(rf.path)
            bad = hasher.mismatch()
            if bad is None:
                break
            try:
                part.unlink()
            except FileNotFoundError:
                pass
            if refetched:
                raise DownloadError(
                    EXIT_VERIFY,
                    f"{rf.path} fetched twice and still does not match the Hub ({bad}); "
                    "the files at the endpoint are not what its listing says",
                )
            LOG.info("%s: does not match the Hub (%s): fetching it again from the start", rf.path, bad)
            refetched = True
        try:
            with open(part, "rb+") as fh:
                os.fsync(fh.fileno())
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, final)
            mtime_ns = final.stat().st_mtime_ns
        except OSError as e:
            raise _disk_error(e, final) from e
        secs = time.monotonic() - started
        LOG.info(
            "done %s: %s in %s (%s/s fetched), %s ok",
            rf.path,
            human(rf.size),
            f"{secs:.1f}s",
            human(fetched[0] / max(secs, 1e-6)),
            rf.checksum_name,
        )
        with self.lock:
            self.verified[rf.path] = rf.record(mtime_ns)
            self.fetched_files += 1
        self._write_in_progress()

    def _get_into(
        self, rf: RemoteFile, part: pathlib.Path, hasher: _Hasher, progress: Progress, fetched: list[int]
    ) -> None:
        """One GET (Range from what is on disk) appended to the partial file; fetched[0] counts the bytes."""
        from huggingface_hub.utils import hf_raise_for_status

        have = part.stat().st_size if part.exists() else 0
        if hasher.count != have:  # a resumed file, or a retry after a cut: the partial file is the truth
            hasher.reset()
            hasher.feed_file(part, have, self.cancel)
        if have == rf.size:
            return
        headers = self.headers()
        if have:
            headers["Range"] = f"bytes={have}-"
        with self.session.get(self.url(rf.path), headers=headers, stream=True, timeout=self.timeout) as r:
            if r.status_code == 416:  # the partial file is not a prefix the server can continue
                part.unlink()
                hasher.reset()
                raise _Retryable(f"HTTP 416 for {rf.path} at offset {have}: starting it over")
            hf_raise_for_status(r)
            if have and r.status_code != 206:  # the server ignored Range: start from zero
                LOG.info("%s: the server does not resume (HTTP %d): fetching from the start", rf.path, r.status_code)
                have = 0
                hasher.reset()
                mode = "wb"
            else:
                if have and not _range_starts_at(r.headers.get("Content-Range"), have):
                    raise _Retryable(f"bad Content-Range {r.headers.get('Content-Range')!r} for {rf.path}")
                mode = "ab"
            try:
                fh = open(part, mode, buffering=0)  # unbuffered: a write error surfaces at the write, not at close
            except OSError as e:
                raise _disk_error(e, part) from e
            with fh:
                for chunk in r.iter_content(CHUNK):
                    if self.cancel.is_set():
                        raise _Cancelled()
                    if not chunk:
                        continue
                    if hasher.count + len(chunk) > rf.size:
                        raise DownloadError(
                            EXIT_VERIFY, f"{rf.path}: the server sent more than the {rf.size} bytes listed"
                        )
                    try:
                        _write(fh, chunk)
                    except OSError as e:
                        raise _disk_error(e, part) from e
                    hasher.update(chunk)
                    fetched[0] += len(chunk)
                    progress.add(rf.path, len(chunk))
        if hasher.count < rf.size:
            raise _Retryable(f"connection closed after {hasher.count} of {rf.size} bytes of {rf.path}")

    # ---- whole run

    def run(self) -> None:
        t0 = time.monotonic()
        self.started_at = _utc_now()
        self.fetched_files = 0
        LOG.info(
            "bloom-server download: %s@%s from %s into %s (token: %s, workers: %d)",
            self.repo_id,
            self.revision,
            _public_url(self.endpoint),
            self.dir,
            "set" if self.token else "none",
            self.args.max_workers,
        )
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _disk_error(e, self.dir) from e
        files = self.list_files()
        total = sum(f.size for f in files)
        LOG.info("%s@%s is commit %s: %d files, %s", self.repo_id, self.revision, self.commit, len(files), human(total))
        to_fetch, complete = self.plan(files)
        in_progress = (self.dir / marker.IN_PROGRESS).exists()
        listed = {f.path for f in files}
        if not to_fetch and complete is not None and not in_progress:
            if {e.get("path") for e in complete.get("files") or []} == listed:
                LOG.info(
                    "bloom-server download: already complete: %s@%s, %d files, %s, nothing fetched, elapsed %.1fs, "
                    "dir %s",
                    self.repo_id,
                    self.commit,
                    len(files),
                    human(total),
                    time.monotonic() - t0,
                    self.dir,
                )
                return
        remaining = sum(f.size - _size(self.parts / f.path) for f in to_fetch)
        LOG.info(
            "plan: %d files already verified, %d to fetch (%s left to transfer)",
            len(files) - len(to_fetch),
            len(to_fetch),
            human(remaining),
        )
        if to_fetch and not self.args.skip_space_check:
            free = shutil.disk_usage(self.dir).free
            if remaining > free:
                raise DownloadError(
                    EXIT_DISK_FULL,
                    f"disk full: {human(remaining)} left to fetch but {human(free)} free in {self.dir}; "
                    "grow the volume (or pass --skip-space-check if the free space shown is wrong)",
                )
        # From here on files change: the directory is not servable until the completion marker is back.
        self._write_in_progress()
        try:
            (self.dir / marker.COMPLETE).unlink()
            marker.fsync_dir(self.dir)
        except FileNotFoundError:
            pass
        progress = Progress(remaining, self.args.progress_interval)
        self._fetch_all(to_fetch, progress)
        self.finish(files)
        elapsed = time.monotonic() - t0
        LOG.info(
            "bloom-server download: complete: %s@%s, %d files, %s (fetched %d files, %s) in %s at %s/s, %s, dir %s",
            self.repo_id,
            self.commit,
            len(files),
            human(total),
            self.fetched_files,
            human(progress.done),
            f"{elapsed:.1f}s",
            human(progress.done / max(elapsed, 1e-6)),
            verification_summary(files),
            self.dir,
        )
        unhashed_pickles = [f.path for f in files if f.checksum_name == "size only" and marker.is_pickle_name(f.path)]
        if unhashed_pickles:
            LOG.warning(
                "the Hub published no hash for %s: pickled weights checked by size only are marked unverified, and "
                "the server refuses to load them unless started with --trust-unverified-pickles (dangerous)",
                ", ".join(unhashed_pickles[:5]) + (" ..." if len(unhashed_pickles) > 5 else ""),
            )

    def _fetch_all(self, to_fetch: list[RemoteFile], progress: Progress) -> None:
        if not to_fetch:
            return
        errors: list[BaseException] = []

        def one(rf: RemoteFile) -> None:
            if self.cancel.is_set():
                return
            try:
                self.fetch(rf, progress)
            except _Cancelled:
                pass
            except BaseException as e:  # noqa: BLE001 - collected and re-raised by the caller after the pool stops
                with self.lock:
                    errors.append(e)
                self.cancel.set()

        # Largest first: the long transfers start early and the small ones fill in.
        order = sorted(to_fetch, key=lambda f: (-f.size, f.path))
        with ThreadPoolExecutor(max_workers=min(self.args.max_workers, len(order))) as pool:
            try:
                list(pool.map(one, order))
            except BaseException:  # Ctrl-C: stop the workers at their next chunk; partial files stay for a resume
                self.cancel.set()
                raise
        if errors:
            first = next((e for e in errors if isinstance(e, DownloadError)), errors[0])
            raise first

    def finish(self, files: list[RemoteFile]) -> None:
        """Stat every file once more against what was verified, then the completion marker, then drop the
        in-progress marker and the empty parts folder."""
        records = []
        for rf in files:
            rec = self.verified.get(rf.path)
            if rec is None:
                raise DownloadError(EXIT_ERROR, f"{rf.path} was never verified (a bug)")
            records.append(rec)
        problems = marker.verify_listed_sizes(self.dir, records)
        if problems:
            raise DownloadError(EXIT_VERIFY, "files changed on disk during the download: " + "; ".join(problems[:5]))
        data = dict(
            self._marker_common(),
            state="complete",
            started_at=self.started_at,
            completed_at=_utc_now(),
            total_bytes=sum(r["size"] for r in records),
            files=records,
        )
        try:
            marker.write_marker(self.dir, marker.COMPLETE, data)
            (self.dir / marker.IN_PROGRESS).unlink(missing_ok=True)
            marker.fsync_dir(self.dir)
        except OSError as e:
            raise _disk_error(e, self.dir / marker.COMPLETE) from e
        _remove_empty_tree(self.parts)


def verification_summary(files: list[RemoteFile]) -> str:
    """What was checked, as it was: "all sizes and checksums verified" only when every file had a published hash."""
    unhashed = [f.path for f in files if f.checksum_name == "size only"]
    if not unhashed:
        return "all sizes and checksums verified"
    names = ", ".join(unhashed[:5]) + (" ..." if len(unhashed) > 5 else "")
    return (f"all sizes verified; checksums verified for {len(files) - len(unhashed)} of {len(files)} files (the Hub "
            f"published no hash for {names}: size only, unverified)")  # fmt: skip


def _size(p: pathlib.Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _range_starts_at(content_range: str | None, offset: int) -> bool:
    # "bytes 100-199/200"
    if not content_range or not content_range.startswith("bytes "):
        return False
    try:
        return int(content_range[6:].split("-", 1)[0]) == offset
    except ValueError:
        return False


def _check_rel_path(name: str) -> None:
    parts = name.split("/")
    shown = repr(name[:80] + ("..." if len(name) > 80 else ""))
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in name:
        raise DownloadError(EXIT_LISTING, f"refusing the repository path {shown}: it would leave --local-dir")
    if parts[0] in (marker.COMPLETE, marker.IN_PROGRESS, marker.PARTS_DIR):
        raise DownloadError(EXIT_LISTING, f"refusing the repository path {shown}: it collides with a download marker")
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        raise DownloadError(EXIT_LISTING, f"refusing the repository path {shown}: it holds a control character "
                            "(NUL, newline, ...), which no file name here may")  # fmt: skip
    long = next((p for p in parts if len(p.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES), None)
    if long is not None:
        raise DownloadError(EXIT_LISTING, f"refusing the repository path {shown}: a name of "
                            f"{len(long.encode('utf-8', 'surrogatepass'))} bytes, over the file system's "
                            f"{MAX_NAME_BYTES}")  # fmt: skip


def _check_listing(files: list[RemoteFile]) -> None:
    """The listing as a whole: sizes that are sizes, and no path that is a file and a folder at once."""
    names = {f.path for f in files}
    for f in files:
        if isinstance(f.size, bool) or not isinstance(f.size, int) or f.size < 0:
            raise DownloadError(EXIT_LISTING, f"the Hub's listing gives {f.path!r} the size {f.size!r}: not a size")
        parts = f.path.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder in names:
                raise DownloadError(EXIT_LISTING, f"the Hub's listing has both the file {folder!r} and {f.path!r} "
                                    "inside a folder of that name: one path cannot be both")  # fmt: skip


def _remove_empty_tree(root: pathlib.Path) -> None:
    if not root.is_dir():
        return
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass
    try:
        root.rmdir()
    except OSError:
        pass


def _short(e: Exception) -> str:
    s = str(e)
    return s if len(s) <= 200 else s[:200] + "..."


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def main(argv: list[str] | None = None) -> int:
    """`python -m bloom_server.storage.download ...`: the same as `bloom-server download ...`."""
    parser = argparse.ArgumentParser(prog="bloom-server download", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
