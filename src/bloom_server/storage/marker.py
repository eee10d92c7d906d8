"""Markers that `bloom-server download` leaves in a model directory, and the cheap check the server runs at start.

Standard library only (the downloader image has no torch and no FastAPI).

Files the downloader writes at the top of `--local-dir` (all hidden):

`.bloom-download.incomplete.json`  (IN_PROGRESS)
    Written atomically before the first byte of any file is changed; removed only after the completion marker is in
    place. While it exists the directory is not servable. It also remembers which files were already verified in this
    attempt, so a resumed run neither re-fetches nor re-hashes them::

        {"format": "bloom-server-download/1", "state": "in_progress", "repo_id": "...", "revision": "main",
         "commit": "<40 hex>", "started_at": "2026-01-01T00:00:00Z",
         "verified": {"<path>": {"size": 123, "mtime_ns": 1, "sha256": "<64 hex>" | null, "git_sha1": ... | null}}}

`.bloom-download.json`  (COMPLETE), format version 1
    Written atomically (temporary file, fsync, rename, fsync of the directory) only after every file was verified::

        {
          "format": "bloom-server-download/1",
          "state": "complete",
          "repo_id": "microsoft/bloom-deepspeed-inference-fp16",
          "revision": "main",                      # what was asked for
          "commit": "<40 hex>",                    # what it resolved to: every file was fetched at this commit
          "endpoint": "https://huggingface.co",
          "completed_at": "2026-01-01T00:30:00Z",
          "total_bytes": 352321536000,
          "files": [
            {"path": "tp_00_00.pt", "size": 123, "sha256": "<64 hex>" | null, "git_sha1": "<40 hex>" | null,
             "mtime_ns": 1700000000000000000},
            ...
          ]
        }

    `path` is relative to the directory, with `/` separators. `sha256` is the LFS object id (the Hub's X-Linked-Etag)
    for LFS files; `git_sha1` is the git blob id (the Hub's ETag) for small files stored in git. At least one of them
    was checked against the bytes before the marker was written. `mtime_ns` lets a rerun of the downloader skip
    re-hashing an untouched file; the server ignores it (a copied directory is still servable).

`.bloom-download-parts/`
    Partial files of a download in progress (resumed with HTTP Range requests).

`check_model_dir` is what the server calls: stat only, no hashing, so it costs milliseconds even for 329 GiB.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any

from bloom_server.errors import ModelDirError

FORMAT = "bloom-server-download/1"
COMPLETE = ".bloom-download.json"
IN_PROGRESS = ".bloom-download.incomplete.json"
PARTS_DIR = ".bloom-download-parts"


def made_by_downloader(path: pathlib.Path) -> bool:
    """True when any trace of `bloom-server download` is in the directory."""
    return any((path / name).exists() for name in (COMPLETE, IN_PROGRESS, PARTS_DIR))


def read_marker(path: pathlib.Path, name: str = COMPLETE) -> dict[str, Any]:
    """The parsed marker `name` in directory `path`; ModelDirError if it is unreadable or not ours."""
    f = path / name
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{f}: unreadable download marker ({e}); rerun `bloom-server download`") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ModelDirError(f"{f}: unknown download marker format {fmt!r} (expected {FORMAT!r})")
    return data


def write_marker(path: pathlib.Path, name: str, data: dict[str, Any]) -> None:
    """Atomically replace marker `name` in `path`: temporary file, fsync, rename, fsync of the directory."""
    fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path / name)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path)


def write_local_marker(
    path: pathlib.Path,
    *,
    writer: str,
    repo_id: str,
    commit: str,
    sha256: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The completion marker for a directory this project wrote itself (`bloom-server preshard`, DeepSpeed's
    pre-sharded layout written by write_presharded_checkpoint), in the downloader's format so the server verifies it
    the same way: every file (outside hidden folders) with its size, and its sha256 where the writer computed it
    while writing (`sha256`: relative path -> hex digest). Atomic, like the downloader's."""
    path = pathlib.Path(path)
    files: list[dict[str, Any]] = []
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or not f.is_file():
            continue
        key = rel.as_posix()
        files.append({"path": key, "size": f.stat().st_size, "sha256": (sha256 or {}).get(key), "git_sha1": None})
    import time as _time

    data = {"format": FORMAT, "state": "complete", "repo_id": repo_id, "revision": None, "commit": commit,
            "writer": writer, "completed_at": _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime()),
            "total_bytes": sum(f["size"] for f in files), "files": files, **(extra or {})}  # fmt: skip
    write_marker(path, COMPLETE, data)
    return data


def fsync_dir(path: pathlib.Path) -> None:
    try:
        dfd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass  # some filesystems (and some network ones) refuse fsync on a directory
    finally:
        os.close(dfd)


def verify_listed_sizes(path: pathlib.Path, files: list[dict[str, Any]]) -> list[str]:
    """One problem line per listed file that is missing, not a regular file, or of another size than recorded."""
    problems = []
    root = path.resolve()
    for entry in files:
        rel = entry.get("path")
        size = entry.get("size")
        if not isinstance(rel, str) or not isinstance(size, int):
            problems.append(f"malformed file entry {entry!r}")
            continue
        f = path / rel
        if not f.resolve().is_relative_to(root):
            problems.append(f"{rel}: path leaves the model directory")
            continue
        try:
            st = f.stat()
        except FileNotFoundError:
            problems.append(f"{rel}: missing (expected {size} bytes)")
            continue
        except OSError as e:
            problems.append(f"{rel}: cannot stat ({e.strerror})")
            continue
        if not f.is_file():
            problems.append(f"{rel}: not a regular file")
        elif st.st_size != size:
            what = "truncated" if st.st_size < size else "larger than downloaded"
            problems.append(f"{rel}: expected {size} bytes, found {st.st_size} ({what})")
    return problems


def listed_paths(path: pathlib.Path) -> set[str]:
    """Paths the completion marker lists (call after check_model_dir verified it); empty without one."""
    try:
        data = read_marker(pathlib.Path(path), COMPLETE)
    except FileNotFoundError:
        return set()
    return {f["path"] for f in data.get("files") or [] if isinstance(f, dict) and isinstance(f.get("path"), str)}


# Extensions of files torch.load unpickles (weights in Python's pickle format: loading one runs code).
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
UNVERIFIED = "unverified"


def is_pickle_name(name: str) -> bool:
    return pathlib.PurePosixPath(name).suffix.lower() in PICKLE_SUFFIXES


def checksum_kind(sha256: Any, git_sha1: Any) -> str:
    """What a marker entry's bytes were checked against: "sha256", "git-sha1", or "unverified" (size only)."""
    if isinstance(sha256, str) and len(sha256) == 64:
        return "sha256"
    if isinstance(git_sha1, str) and len(git_sha1) == 40:
        return "git-sha1"
    return UNVERIFIED


def hash_unverified_paths(path: pathlib.Path) -> set[str]:
    """Paths the downloader's completion marker lists as checked by size only (no hash published). Empty for a
    marker this project's own writers made (`writer` set): they wrote those bytes themselves."""
    try:
        data = read_marker(pathlib.Path(path), COMPLETE)
    except FileNotFoundError:
        return set()
    if data.get("writer"):
        return set()
    return {f["path"] for f in data.get("files") or [] if isinstance(f, dict) and isinstance(f.get("path"), str)
            and checksum_kind(f.get("sha256"), f.get("git_sha1")) == UNVERIFIED}  # fmt: skip


def check_model_dir(path: pathlib.Path) -> str | None:
    """None if the directory was not made by the downloader; else the recorded commit sha once every listed file
    exists with its recorded size. Raises ModelDirError naming what is missing or wrong."""
    path = pathlib.Path(path)
    if not made_by_downloader(path):
        return None
    if (path / IN_PROGRESS).exists():
        raise ModelDirError(
            f"{path}: download did not finish: {IN_PROGRESS} is present (a download is running or was cut off); "
            "rerun `bloom-server download` with the same arguments to resume it"
        )
    try:
        data = read_marker(path, COMPLETE)
    except FileNotFoundError:
        raise ModelDirError(
            f"{path}: download did not finish: no completion marker {COMPLETE} "
            f"(partial files in {PARTS_DIR}/); rerun `bloom-server download` to resume it"
        ) from None
    files = data.get("files")
    commit = data.get("commit")
    if not isinstance(files, list) or not files or not isinstance(commit, str) or not commit:
        raise ModelDirError(f"{path / COMPLETE}: marker lists no files or no commit; rerun `bloom-server download`")
    problems = verify_listed_sizes(path, files)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ModelDirError(
            f"{path}: files differ from the completed download of {data.get('repo_id')}@{commit[:12]}: "
            + "; ".join(problems[:5])
            + more
            + "; rerun `bloom-server download` to repair"
        )
    return commit
