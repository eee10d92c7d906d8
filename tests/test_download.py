"""`bloom-server download` against a local Hub stand-in (tests/hubstub.py, 127.0.0.1 only), and the server's marker
check. The downloader runs as a real subprocess (its own argparse, logging and exit code) unless a test must fail a
write from inside it."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import random
import socket
import subprocess
import sys
import time

import pytest

from bloom_server.errors import ModelDirError
from bloom_server.storage import download, marker
from hubstub import HubStub

REPO = "bigscience-test/bloom-tiny-ds"
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _files() -> dict[str, bytes]:
    rnd = random.Random(1234)
    return {
        "config.json": b'{"model_type": "bloom", "n_layer": 2}',
        "ds_inference_config.json": json.dumps(
            {
                "type": "BLOOM",
                "checkpoints": {"non_tp": ["non-tp.pt"], "tp": ["tp_00_00.pt", "tp_00_01.pt"]},
                "parallelization": "tp",
                "tp_size": 2,
                "dtype": "float16",
                "version": 1.0,
            }
        ).encode(),
        "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
        "non-tp.pt": rnd.randbytes(300_000),
        "tp_00_00.pt": rnd.randbytes(700_000),
        "tp_00_01.pt": rnd.randbytes(700_000),
        "sub/extra.bin": rnd.randbytes(3_000),
    }


FILES = _files()
LFS = {p for p, d in FILES.items() if len(d) >= 1024}


@pytest.fixture
def hub():
    with HubStub(lfs_threshold=1024) as h:
        h.sha = h.add_repo(REPO, FILES)
        yield h


def _env(hub_url: str, tmp_path: pathlib.Path, token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(
        HF_ENDPOINT=hub_url,
        HF_HOME=str(tmp_path / "hf-home"),  # no stray token file from this machine
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONPATH=str(ROOT / "src"),
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return env


class Result:
    def __init__(self, p: subprocess.CompletedProcess, elapsed: float):
        self.rc = p.returncode
        self.out = p.stdout + p.stderr
        self.lines = [line for line in self.out.splitlines() if line.strip()]
        self.last = self.lines[-1] if self.lines else ""
        self.elapsed = elapsed

    def __repr__(self) -> str:
        return f"rc={self.rc}\n{self.out}"


def run_download(
    hub_url: str, tmp_path: pathlib.Path, local_dir: pathlib.Path, *args: str, token: str | None = None, cmd=None
) -> Result:
    cmd = cmd or [sys.executable, "-m", "bloom_server.storage.download"]
    argv = [*cmd, "--repo-id", REPO, "--local-dir", str(local_dir), "--progress-interval", "0", *args]
    t0 = time.monotonic()
    p = subprocess.run(argv, env=_env(hub_url, tmp_path, token), capture_output=True, text=True, timeout=120)
    return Result(p, time.monotonic() - t0)


def assert_identical(local_dir: pathlib.Path, files: dict[str, bytes] = FILES) -> None:
    for path, data in files.items():
        got = (local_dir / path).read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), path


def gets(hub: HubStub, path: str):
    return hub.content_gets(path)


# ------------------------------------------------------------------------------------------------------ full download


def test_full_download_verifies_writes_marker_and_logs(hub, tmp_path):
    d = tmp_path / "model"
    r = run_download(hub.url, tmp_path, d, "--max-workers", "3")
    assert r.rc == 0, r
    assert_identical(d)
    # Each file's bytes were requested exactly once, from the commit the revision resolved to.
    for path in FILES:
        assert len(gets(hub, path)) == 1, (path, hub.requests)
    resolves = [q.path for q in hub.requests if "/resolve/" in q.path]
    assert resolves and all(f"/resolve/{hub.sha}/" in p for p in resolves)
    # The completion marker: commit, every file with size and the Hub's checksum; nothing left in progress.
    m = json.loads((d / marker.COMPLETE).read_text())
    assert m["format"] == marker.FORMAT and m["commit"] == hub.sha and m["repo_id"] == REPO and m["revision"] == "main"
    by_path = {f["path"]: f for f in m["files"]}
    assert set(by_path) == set(FILES)
    for path, data in FILES.items():
        assert by_path[path]["size"] == len(data)
        if path in LFS:
            assert by_path[path]["sha256"] == hashlib.sha256(data).hexdigest()
        else:
            assert by_path[path]["git_sha1"] == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    assert m["total_bytes"] == sum(len(v) for v in FILES.values())
    assert not (d / marker.IN_PROGRESS).exists() and not (d / marker.PARTS_DIR).exists()
    assert marker.check_model_dir(d) == hub.sha
    # Logs for kubectl: per-file start/done with checksum, progress with bytes/throughput/elapsed, one summary line.
    assert "start tp_00_00.pt: 683.59 KiB" in r.out
    assert "done tp_00_00.pt: 683.59 KiB" in r.out and "sha256 ok" in r.out and "git-sha1 ok" in r.out
    progress = [line for line in r.lines if " progress: " in line]
    assert progress and "/s, elapsed " in progress[-1] and "(100.0%)" in progress[-1]
    assert "bloom-server download: complete:" in r.last and f"@{hub.sha}" in r.last and "fetched 7 files" in r.last
    assert sum("bloom-server download: complete:" in line for line in r.lines) == 1


def test_rerun_over_complete_dir_fetches_nothing_and_writes_nothing(hub, tmp_path):
    d = tmp_path / "model"
    assert run_download(hub.url, tmp_path, d).rc == 0
    before = len(hub.requests)
    marker_stat = (d / marker.COMPLETE).stat()
    file_mtimes = {p: (d / p).stat().st_mtime_ns for p in FILES}

    r = run_download(hub.url, tmp_path, d)
    assert r.rc == 0, r
    new = hub.requests[before:]
    assert [q.path for q in new] == [f"/api/models/{REPO}/revision/main"], "only the listing, no file request"
    assert hub.content_gets() and all(q in hub.requests[:before] for q in hub.content_gets())
    assert "already complete" in r.last and "nothing fetched" in r.last
    assert r.elapsed < 15
    assert (d / marker.COMPLETE).stat().st_mtime_ns == marker_stat.st_mtime_ns
    assert {p: (d / p).stat().st_mtime_ns for p in FILES} == file_mtimes
    assert marker.check_model_dir(d) == hub.sha


# ------------------------------------------------------------------------------------------------- cuts and resumes


def test_connection_cut_mid_file_then_rerun_resumes_without_refetching(hub, tmp_path):
    d = tmp_path / "model"
    hub.cut("tp_00_01.pt", 400_000)  # the second file fetched (largest first, then by name; one worker)
    r1 = run_download(hub.url, tmp_path, d, "--max-workers", "1", "--retries", "0")
    assert r1.rc == download.EXIT_NETWORK, r1
    assert "error [network]" in r1.last and "rerun to resume" in r1.last
    # The directory is marked unfinished and the server refuses it, naming why.
    assert (d / marker.IN_PROGRESS).exists() and not (d / marker.COMPLETE).exists()
    with pytest.raises(ModelDirError, match="download did not finish"):
        marker.check_model_dir(d)
    part = d / marker.PARTS_DIR / "tp_00_01.pt"
    kept = part.stat().st_size
    assert 0 < kept <= 400_000
    assert (d / "tp_00_00.pt").read_bytes() == FILES["tp_00_00.pt"]

    r2 = run_download(hub.url, tmp_path, d, "--max-workers", "1")
    assert r2.rc == 0, r2
    assert_identical(d)
    assert len(gets(hub, "tp_00_00.pt")) == 1, "a finished file was fetched again"
    cut_file = gets(hub, "tp_00_01.pt")
    assert len(cut_file) == 2 and cut_file[0].range is None
    assert cut_file[1].range == f"bytes={kept}-" and cut_file[1].status == 206
    assert cut_file[1].body_bytes == len(FILES["tp_00_01.pt"]) - kept
    assert "plan: 1 files already verified, 6 to fetch" in r2.out
    assert f"resuming at {download.human(kept)}" in r2.out
    assert marker.check_model_dir(d) == hub.sha


def test_connection_cut_is_retried_within_one_run(hub, tmp_path):
    d = tmp_path / "model"
    hub.cut("non-tp.pt", 270_000)
    r = run_download(hub.url, tmp_path, d)
    assert r.rc == 0, r
    assert_identical(d)
    got = gets(hub, "non-tp.pt")
    assert len(got) == 2 and got[1].range is not None and got[1].range != "bytes=0-"
    assert "retry 1/5" in r.out and "connection cut while reading non-tp.pt" in r.out


def test_transient_5xx_on_listing_is_retried(hub, tmp_path):
    hub.fail("api", 503, 502)
    r = run_download(hub.url, tmp_path, tmp_path / "model", "--retries", "2")
    assert r.rc == 0, r
    assert "retry 1/2" in r.out and "retry 2/2" in r.out


# ------------------------------------------------------------------------------------------------------------ errors


def test_auth_401_has_its_own_exit_code_and_never_prints_the_token(tmp_path):
    good, bad = "hf_GoodSecretToken0123456789", "hf_WrongSecretToken987654321"
    with HubStub(token=good) as hub:
        hub.add_repo(REPO, {"config.json": b"{}", "w.bin": b"x" * 5000})
        wrong = run_download(hub.url, tmp_path, tmp_path / "a", token=bad)
        none = run_download(hub.url, tmp_path, tmp_path / "b")
        right = run_download(hub.url, tmp_path, tmp_path / "c", token=good)
        sent = [q.headers.get("authorization") for q in hub.requests if not q.path.startswith("/cdn/")]
    assert wrong.rc == download.EXIT_AUTH, wrong
    assert "error [auth]" in wrong.last and "HTTP 401" in wrong.last and "a token was sent" in wrong.last
    assert none.rc == download.EXIT_AUTH, none
    assert "HTTP 401" in none.last and "no token was sent: set HF_TOKEN or HF_TOKEN_PATH" in none.last
    assert right.rc == 0, right
    assert (tmp_path / "c" / "w.bin").read_bytes() == b"x" * 5000
    assert f"Bearer {good}" in sent  # honoured
    for r in (wrong, none, right):
        assert good not in r.out and bad not in r.out
        assert "GoodSecret" not in r.out and "WrongSecret" not in r.out
    assert "token: set" in right.out


def test_token_from_a_file_as_the_job_mounts_it(tmp_path):
    token = "hf_FileMountedSecret4242"
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "token").write_text(token + "\n")
    with HubStub(token=token) as hub:
        hub.add_repo(REPO, {"config.json": b"{}"})
        env = _env(hub.url, tmp_path)
        env["HF_TOKEN_PATH"] = str(tmp_path / "secret" / "token")
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "bloom_server.storage.download",
                "--repo-id",
                REPO,
                "--local-dir",
                str(tmp_path / "m"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 0, p.stderr
        assert all(q.headers.get("authorization") == f"Bearer {token}" for q in hub.requests)
    assert token not in p.stdout + p.stderr


def test_gated_repo_is_an_auth_error(tmp_path):
    with HubStub() as hub:
        hub.add_repo(REPO, {"config.json": b"{}"}, gated=True)
        r = run_download(hub.url, tmp_path, tmp_path / "m")
    assert r.rc == download.EXIT_AUTH, r
    assert "gated repository" in r.last and "HTTP 403" in r.last


def test_404_repo_and_revision_have_their_own_exit_code(hub, tmp_path):
    missing_repo = run_download(hub.url, tmp_path, tmp_path / "a", "--repo-id", "nobody/nothing")
    assert missing_repo.rc == download.EXIT_NOT_FOUND, missing_repo
    assert "error [not-found]" in missing_repo.last and "repository nobody/nothing not found" in missing_repo.last
    missing_rev = run_download(hub.url, tmp_path, tmp_path / "b", "--revision", "v9.9")
    assert missing_rev.rc == download.EXIT_NOT_FOUND, missing_rev
    assert "revision 'v9.9' not found" in missing_rev.last
    codes = {
        download.EXIT_OK,
        download.EXIT_ERROR,
        download.EXIT_USAGE,
        download.EXIT_AUTH,
        download.EXIT_NOT_FOUND,
        download.EXIT_NETWORK,
        download.EXIT_DISK_FULL,
        download.EXIT_VERIFY,
    }
    assert len(codes) == 8
    assert not (tmp_path / "a" / marker.IN_PROGRESS).exists()  # nothing was started


def test_unreachable_endpoint_is_a_network_error(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    r = run_download(f"http://127.0.0.1:{port}", tmp_path, tmp_path / "m", "--retries", "1")
    assert r.rc == download.EXIT_NETWORK, r
    assert "error [network]" in r.last and f"127.0.0.1:{port}" in r.last and "gave up after 1 retries" in r.last


def test_not_enough_space_is_refused_before_fetching(hub, tmp_path):
    huge = 1 << 50  # 1 PiB: more than any test machine has free
    hub.repos[REPO].listing_overrides["non-tp.pt"] = {
        "size": huge,
        "lfs": {"sha256": hashlib.sha256(FILES["non-tp.pt"]).hexdigest(), "size": huge, "pointerSize": 130},
    }
    d = tmp_path / "m"
    r = run_download(hub.url, tmp_path, d)
    assert r.rc == download.EXIT_DISK_FULL, r
    assert "error [disk-full]" in r.last and "1024.00 TiB" in r.last
    assert hub.content_gets() == [] and not (d / marker.IN_PROGRESS).exists()


def test_enospc_while_writing_maps_to_disk_full(hub, tmp_path, monkeypatch, capsys):
    # In-process so a write can fail with a real ENOSPC OSError (no small filesystem to fill here).
    calls = []

    def full(fh, data):
        calls.append(len(data))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    for k, v in _env(hub.url, tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(download, "_write", full)
    d = tmp_path / "m"
    rc = download.main(["--repo-id", REPO, "--local-dir", str(d), "--max-workers", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == download.EXIT_DISK_FULL, err
    assert calls
    assert "error [disk-full]" in err[-1] and "No space left on device" in err[-1] and "rerun to resume" in err[-1]
    assert (d / marker.IN_PROGRESS).exists() and not (d / marker.COMPLETE).exists()


def test_bytes_that_do_not_match_the_checksum_fail_verification(hub, tmp_path):
    bad = bytearray(FILES["non-tp.pt"])
    bad[1000] ^= 0xFF
    hub.repos[REPO].served_overrides["non-tp.pt"] = bytes(bad)
    d = tmp_path / "m"
    r = run_download(hub.url, tmp_path, d)
    assert r.rc == download.EXIT_VERIFY, r
    assert "error [verify]" in r.last and "non-tp.pt fetched twice" in r.last and "sha256" in r.last
    assert len(gets(hub, "non-tp.pt")) == 2
    assert not (d / "non-tp.pt").exists() and not (d / marker.COMPLETE).exists()
    with pytest.raises(ModelDirError):
        marker.check_model_dir(d)


# ----------------------------------------------------------------------------------------- damage found on disk later


def test_truncated_file_is_detected_by_the_server_and_repaired_by_a_rerun(hub, tmp_path):
    from bloom_server.storage.model_dir import resolve_model_dir

    d = tmp_path / "model"
    assert run_download(hub.url, tmp_path, d).rc == 0
    with open(d / "tp_00_00.pt", "r+b") as f:
        f.truncate(100_000)
    with pytest.raises(ModelDirError, match=r"tp_00_00\.pt: expected 700000 bytes, found 100000 \(truncated\)"):
        marker.check_model_dir(d)
    with pytest.raises(ModelDirError, match="tp_00_00.pt"):
        resolve_model_dir(str(d))  # the server's own entry point refuses it too

    before = {p: len(gets(hub, p)) for p in FILES}
    r = run_download(hub.url, tmp_path, d)
    assert r.rc == 0, r
    assert "tp_00_00.pt: 100000 of 700000 bytes on disk (truncated): will resume it" in r.out
    assert_identical(d)
    again = gets(hub, "tp_00_00.pt")[before["tp_00_00.pt"] :]
    assert len(again) == 1 and again[0].range == "bytes=100000-"
    assert all(len(gets(hub, p)) == before[p] for p in FILES if p != "tp_00_00.pt")
    assert marker.check_model_dir(d) == hub.sha
    assert resolve_model_dir(str(d)).revision == hub.sha


def test_modified_file_of_the_same_size_is_rehashed_and_replaced(hub, tmp_path):
    d = tmp_path / "model"
    assert run_download(hub.url, tmp_path, d).rc == 0
    with open(d / "non-tp.pt", "r+b") as f:
        f.seek(5)
        f.write(b"\0\0\0\0")
    assert marker.check_model_dir(d) == hub.sha  # stat-only: the server cannot see this one
    r = run_download(hub.url, tmp_path, d)
    assert r.rc == 0, r
    assert "non-tp.pt: on disk with the right size, checking its sha256" in r.out
    assert "non-tp.pt: does not match the Hub (sha256" in r.out
    assert_identical(d)
    assert len(gets(hub, "non-tp.pt")) == 2 and len(gets(hub, "tp_00_00.pt")) == 1


def test_verify_flag_rehashes_everything_and_fetches_nothing_when_intact(hub, tmp_path):
    d = tmp_path / "model"
    assert run_download(hub.url, tmp_path, d).rc == 0
    n = len(hub.content_gets())
    r = run_download(hub.url, tmp_path, d, "--verify")
    assert r.rc == 0, r
    assert len(hub.content_gets()) == n
    assert sum("checking its" in line for line in r.lines) == len(FILES)
    assert marker.check_model_dir(d) == hub.sha


# ----------------------------------------------------------------------------------------------------------- options


def test_listing_without_sizes_falls_back_to_head_headers(hub, tmp_path):
    hub.omit_blobs = True  # a mirror whose listing has no sizes: X-Linked-Size / X-Linked-Etag / ETag from HEAD
    d = tmp_path / "model"
    r = run_download(hub.url, tmp_path, d)
    assert r.rc == 0, r
    assert_identical(d)
    heads = {q.headers.get("x-stub-file") for q in hub.requests if q.method == "HEAD"}
    assert heads == set(FILES)
    m = json.loads((d / marker.COMPLETE).read_text())
    assert {f["path"]: f["sha256"] for f in m["files"]}["tp_00_00.pt"] == hashlib.sha256(
        FILES["tp_00_00.pt"]
    ).hexdigest()
    assert {f["path"]: f["git_sha1"] for f in m["files"]}["config.json"]


def test_allow_patterns_repeatable_and_space_separated(hub, tmp_path):
    d = tmp_path / "model"
    r = run_download(hub.url, tmp_path, d, "--allow-patterns", "*.json", "tp_00_00.pt", "--allow-patterns", "sub/*")
    assert r.rc == 0, r
    want = {"config.json", "ds_inference_config.json", "tokenizer.json", "tp_00_00.pt", "sub/extra.bin"}
    on_disk = {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert on_disk == want
    assert {f["path"] for f in json.loads((d / marker.COMPLETE).read_text())["files"]} == want
    assert not gets(hub, "tp_00_01.pt")
    none = run_download(hub.url, tmp_path, tmp_path / "x", "--allow-patterns", "*.safetensors")
    assert none.rc == download.EXIT_NOT_FOUND and "matches --allow-patterns" in none.last


def test_new_revision_into_the_same_dir_fetches_only_changed_files(hub, tmp_path):
    d = tmp_path / "model"
    assert run_download(hub.url, tmp_path, d).rc == 0
    changed = dict(FILES, **{"config.json": b'{"model_type": "bloom", "n_layer": 3}'})
    sha2 = hub.add_repo(REPO, changed)
    r = run_download(hub.url, tmp_path, d)
    assert r.rc == 0, r
    assert_identical(d, changed)
    assert len(gets(hub, "config.json")) == 2 and len(gets(hub, "tp_00_00.pt")) == 1
    assert marker.check_model_dir(d) == sha2


def test_downloader_imports_nothing_heavy():
    code = (
        "import sys, argparse; import bloom_server.storage.download as d, bloom_server.storage.marker; "
        "p = argparse.ArgumentParser(); d.add_arguments(p); p.parse_args(['--local-dir', 'x']); "
        "heavy = sorted(m for m in ('torch', 'fastapi', 'huggingface_hub', 'requests', 'transformers') "
        "if m in sys.modules); print(heavy)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_console_script_download(hub, tmp_path):
    exe = pathlib.Path(sys.executable).with_name("bloom-server")
    if not (ROOT / "src" / "bloom_server" / "cli/__init__.py").exists() or not exe.exists():
        pytest.skip("bloom_server/cli/__init__.py (the `bloom-server` console script) has not landed yet")
    d = tmp_path / "model"
    r = run_download(hub.url, tmp_path, d, cmd=[str(exe), "download"])
    assert r.rc == 0, r
    assert_identical(d)
    assert "bloom-server download: complete:" in r.last
    bad = run_download(hub.url, tmp_path, tmp_path / "x", "--revision", "nope", cmd=[str(exe), "download"])
    assert bad.rc == download.EXIT_NOT_FOUND, bad


# ----------------------------------------------------------------------------------------- the server's marker check


def test_check_model_dir_outcomes(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert marker.check_model_dir(plain) is None  # not made by the downloader: no opinion

    started = tmp_path / "started"
    started.mkdir()
    marker.write_marker(started, marker.IN_PROGRESS, {"format": marker.FORMAT, "commit": "a" * 40})
    with pytest.raises(ModelDirError, match="download did not finish.*incomplete"):
        marker.check_model_dir(started)

    parts_only = tmp_path / "parts"
    (parts_only / marker.PARTS_DIR).mkdir(parents=True)
    with pytest.raises(ModelDirError, match="download did not finish: no completion marker"):
        marker.check_model_dir(parts_only)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / marker.COMPLETE).write_text("{not json")
    with pytest.raises(ModelDirError, match="unreadable download marker"):
        marker.check_model_dir(broken)

    other = tmp_path / "other"
    other.mkdir()
    (other / marker.COMPLETE).write_text(json.dumps({"format": "something-else/9"}))
    with pytest.raises(ModelDirError, match="unknown download marker format"):
        marker.check_model_dir(other)

    gone = tmp_path / "gone"
    gone.mkdir()
    (gone / "a.bin").write_bytes(b"12345")
    files = [{"path": "a.bin", "size": 5}, {"path": "b.bin", "size": 7}]
    marker.write_marker(gone, marker.COMPLETE, {"format": marker.FORMAT, "commit": "c" * 40, "files": files})
    with pytest.raises(ModelDirError, match=r"b\.bin: missing \(expected 7 bytes\)"):
        marker.check_model_dir(gone)
    (gone / "b.bin").write_bytes(b"1234567")
    assert marker.check_model_dir(gone) == "c" * 40
    (gone / "b.bin").write_bytes(b"12345678")
    with pytest.raises(ModelDirError, match=r"b\.bin: expected 7 bytes, found 8 \(larger than downloaded\)"):
        marker.check_model_dir(gone)


def test_a_pickle_whose_hash_the_hub_did_not_publish_is_marked_unverified_and_refused(tmp_path):
    """The Hub lists pytorch_model.bin with no LFS sha256, no blob id, and answers a HEAD with an ETag that is no hash:
    the download checks its size only, says so (never "all ... checksums verified"), marks it unverified, and the
    server refuses to unpickle it unless told to trust unverified pickles."""
    from bloom_server.storage.model_dir import resolve_model_dir

    files = {
        "config.json": b'{"model_type": "bloom", "n_layer": 2}',
        "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
        "pytorch_model.bin": random.Random(5).randbytes(900),  # small: served directly, its ETag as given
    }
    with HubStub(lfs_threshold=1024) as hub:
        hub.add_repo(REPO, files)
        hub.repos[REPO].listing_overrides["pytorch_model.bin"] = {"blobId": None}
        hub.repos[REPO].header_overrides["pytorch_model.bin"] = {"ETag": 'W/"384-18c2f0a1b2"'}
        local = tmp_path / "out"
        r = run_download(hub.url, tmp_path, local)
    assert r.rc == 0, r
    assert "all sizes and checksums verified" not in r.out, r
    assert "checksums verified for 2 of 3 files" in r.out and "pytorch_model.bin" in r.out, r
    assert "--trust-unverified-pickles" in r.out, r
    entries = {e["path"]: e for e in marker.read_marker(local)["files"]}
    assert entries["pytorch_model.bin"]["checksum"] == "unverified" and entries["pytorch_model.bin"]["sha256"] is None
    assert entries["config.json"]["checksum"] == "git-sha1", entries
    with pytest.raises(ModelDirError, match=r"pytorch_model\.bin is pickled and marked unverified"):
        resolve_model_dir(str(local))
    assert resolve_model_dir(str(local), trust_unverified_pickles=True).weights_format == "pickle"


@pytest.mark.parametrize("case", ["nul", "long-name", "negative-size", "file-and-folder"])
def test_odd_listings_are_refused_with_a_clear_message_and_their_own_exit_code(tmp_path, case):
    """Listings no directory can hold: refused before anything is written, exit 8 ("listing"), one clear line."""
    files = {"config.json": b"{}", "tokenizer.json": b"{}"}
    if case == "nul":
        files["a\0b.json"] = b"{}"
    elif case == "long-name":
        files["w" * 300 + ".bin"] = b"x"
    elif case == "file-and-folder":
        files.update({"sub": b"a file", "sub/x": b"a file in a folder of the same name"})
    with HubStub() as hub:
        hub.add_repo(REPO, files)
        if case == "negative-size":
            hub.repos[REPO].listing_overrides["config.json"] = {"size": -5}
        local = tmp_path / "out"
        r = run_download(hub.url, tmp_path, local)
    assert r.rc == download.EXIT_LISTING == 8, r
    assert "error [listing]" in r.last and "Traceback" not in r.out, r
    assert {"nul": "control character", "long-name": "304 bytes", "negative-size": "-5", "file-and-folder": "'sub'"}[
        case
    ] in r.last, r
    assert not any(p.is_file() for p in tmp_path.rglob("*") if "hf-home" not in p.parts), list(tmp_path.rglob("*"))
