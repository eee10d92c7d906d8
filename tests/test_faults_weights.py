"""Faults in the weights, beyond what test_download.py and test_model_dir.py already cover (connection cuts, in-process
ENOSPC, truncation of an HF-layout file):

- the downloader killed with SIGKILL mid-file, twice (in the first file, then in the second), then rerun: the result is
  byte-identical to the repository, the completion marker is written, every partial file was resumed with a Range
  request rather than refetched, and the server serves the result; between the kills the server refuses the directory;
- a DeepSpeed pre-sharded directory whose completion marker lists `tp_00_01.pt`: with that shard missing, or
  `tp_00_00.pt` truncated, `bloom-server serve --backend ds_inference` exits 2 before loading anything, naming the file;
  a rerun of the downloader fetches only that shard and the directory verifies again;
- a real full disk (a 600 KiB tmpfs in a private mount namespace): the downloader stops with exit 6 and a disk-full
  line, leaves no completion marker, the server refuses the directory; after the volume grows, a rerun completes.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import ThreadingHTTPServer

import pytest

import hubstub
from bloom_server.errors import ModelDirError
from bloom_server.storage import download, marker
from bloom_server.storage.model_dir import resolve_model_dir
from helpers import ServerProcess, free_port

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
REPO = "bigscience-test/bloom-tiny"


class ThrottledHub(hubstub.HubStub):
    """The Hub stand-in, sending file bytes at `rate` bytes per second (None: full speed), so that a download can be
    caught in the middle of a file; a client that vanishes (killed, or done with a kept-alive connection) is not an
    error worth a traceback here."""

    def __init__(self, *args, rate: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rate = rate

    def start(self) -> None:
        stub = self

        class Writer:
            def __init__(self, raw):
                self.raw = raw

            def write(self, data):
                view = memoryview(data)
                while view:
                    piece, view = view[:16384], view[16384:]
                    self.raw.write(piece)
                    if stub.rate:
                        time.sleep(len(piece) / stub.rate)
                return len(data)

            def __getattr__(self, name):  # flush, closed, ...: the socket writer's own
                return getattr(self.raw, name)

        class Handler(hubstub._Handler):
            hub = stub

            def handle(self):
                try:
                    super().handle()
                except (ConnectionResetError, BrokenPipeError):
                    pass  # the downloader was killed: nothing to answer

            def setup(self):
                super().setup()
                self.wfile = Writer(self.wfile)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()


def _env(hub_url: str, tmp_path: pathlib.Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(
        HF_ENDPOINT=hub_url,
        HF_HOME=str(tmp_path / "hf-home"),
        NO_PROXY="127.0.0.1",
        no_proxy="127.0.0.1",
        PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    return env


def _download_cmd(local_dir: pathlib.Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bloom_server",
        "download",
        "--repo-id",
        REPO,
        "--local-dir",
        str(local_dir),
        "--progress-interval",
        "0",
        "--max-workers",
        "1",
        *args,
    ]


def _files_of(model_dir: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir()) if p.is_file()}


def _assert_identical(local_dir: pathlib.Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        got = (local_dir / name).read_bytes()
        assert len(got) == len(data) and hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), name


def _kill_when(proc: subprocess.Popen, part: pathlib.Path, at_least: int, timeout: float = 60) -> int:
    """SIGKILL the downloader once `part` holds at least `at_least` bytes; returns the size on disk after the kill."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the downloader ended (rc {proc.returncode}) before it could be killed mid-file")
        if part.exists() and part.stat().st_size >= at_least:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            return part.stat().st_size
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"{part} never reached {at_least} bytes")


def _refused(model_dir: pathlib.Path, needle: str) -> None:
    with pytest.raises(ModelDirError, match=needle):
        resolve_model_dir(str(model_dir))


# ------------------------------------------------------------------------------------------------- SIGKILL mid-file


def test_downloader_killed_mid_file_twice_then_rerun_is_complete_and_served(tiny_model_dir, tmp_path):
    # The tiny model, plus a second large file: the downloader writes in 256 KiB chunks, so a file must span several
    # of them to be caught half-written.
    files = dict(_files_of(tiny_model_dir), **{"extra-shard.bin": __import__("random").Random(5).randbytes(600_000)})
    order = sorted(files, key=lambda n: (-len(files[n]), n))  # the downloader's order with one worker
    first, second = order[0], order[1]
    assert (first, second) == ("model.safetensors", "extra-shard.bin") and len(files[first]) > 600_000
    d = tmp_path / "model"
    parts = d / marker.PARTS_DIR
    with ThrottledHub(lfs_threshold=1024, rate=400_000) as hub:
        sha = hub.add_repo(REPO, files)
        env = _env(hub.url, tmp_path)

        # 1. killed inside the first (largest) file
        p1 = subprocess.Popen(_download_cmd(d), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        kept1 = _kill_when(p1, parts / first, 200_000)
        assert p1.returncode == -signal.SIGKILL
        assert 200_000 <= kept1 < len(files[first])
        assert (d / marker.IN_PROGRESS).exists() and not (d / marker.COMPLETE).exists()
        _refused(d, "download did not finish")

        # 2. rerun, killed inside the second file: the first was resumed from where the kill left it
        n_gets = len(hub.content_gets(first))
        p2 = subprocess.Popen(_download_cmd(d), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        kept2 = _kill_when(p2, parts / second, 200_000)
        assert 200_000 <= kept2 < len(files[second])
        resumed = hub.content_gets(first)[n_gets:]
        assert len(resumed) == 1 and resumed[0].range == f"bytes={kept1}-", [(r.range, r.status) for r in resumed]
        assert (d / first).read_bytes() == files[first]  # finished and moved into place before the second kill
        assert not (d / marker.COMPLETE).exists()
        code, err = _serve_exit(d)
        assert code == 2 and "download did not finish" in err, err

        # 3. rerun at full speed: completes, resuming the second file and fetching the first not at all
        hub.rate = None
        before = {n: len(hub.content_gets(n)) for n in files}
        r = subprocess.run(_download_cmd(d), env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "bloom-server download: complete:" in r.stderr.strip().splitlines()[-1]
        assert len(hub.content_gets(first)) == before[first], "a verified file was fetched again"
        again = hub.content_gets(second)[before[second] :]
        assert len(again) == 1 and again[0].range == f"bytes={kept2}-"

    _assert_identical(d, files)
    m = json.loads((d / marker.COMPLETE).read_text())
    assert m["commit"] == sha and {f["path"] for f in m["files"]} == set(files)
    for f in m["files"]:
        assert f["size"] == len(files[f["path"]])
        if f["sha256"]:
            assert f["sha256"] == hashlib.sha256(files[f["path"]]).hexdigest()
    assert not (d / marker.IN_PROGRESS).exists() and not parts.exists()
    assert resolve_model_dir(str(d)).revision == sha

    # and the server serves it, with the same greedy answer as the original directory
    answers = []
    for model_dir in (tiny_model_dir, d):
        srv = ServerProcess(["--model", str(model_dir)], free_port(), log_path=tmp_path / f"serve-{model_dir.name}.log")
        try:
            srv.wait_ready()
            status, body, _ = srv.post("/generate", {"text": ["Deepspeed is"], "max_new_tokens": 6})
            assert status == 200, body
            answers.append(body["text"])
        finally:
            srv.stop()
    assert answers[0] == answers[1]


# ------------------------------------------------------------------------------------ pre-sharded layout on disk


def _presharded_files() -> dict[str, bytes]:
    rnd = __import__("random").Random(99)
    return {
        "config.json": json.dumps(
            {"model_type": "bloom", "n_layer": 2, "hidden_size": 64, "n_head": 8, "vocab_size": 2048}
        ).encode(),
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
        "non-tp.pt": rnd.randbytes(60_000),
        "tp_00_00.pt": rnd.randbytes(150_000),
        "tp_00_01.pt": rnd.randbytes(150_000),
    }


def _serve_exit(model_dir: pathlib.Path, *flags: str) -> tuple[int, str]:
    r = subprocess.run(
        [sys.executable, "-m", "bloom_server", "serve", "--model", str(model_dir), "--port", "0", *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return r.returncode, r.stderr


def test_presharded_dir_with_a_missing_or_truncated_shard_is_refused_naming_it(tmp_path):
    files = _presharded_files()
    with ThrottledHub(lfs_threshold=1024) as hub:
        sha = hub.add_repo(REPO, files)
        env = _env(hub.url, tmp_path)
        d = tmp_path / "bloom-ds"
        r = subprocess.run(_download_cmd(d), env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        listed = {f["path"] for f in json.loads((d / marker.COMPLETE).read_text())["files"]}
        assert {"tp_00_00.pt", "tp_00_01.pt", "non-tp.pt", "ds_inference_config.json"} <= listed
        md = resolve_model_dir(str(d))
        assert md.layout == "ds_presharded" and md.revision == sha  # intact: the marker check lets it through

        (d / "tp_00_01.pt").unlink()
        code, err = _serve_exit(d, "--backend", "ds_inference")
        assert code == 2, err
        assert "tp_00_01.pt: missing (expected 150000 bytes)" in err and "rerun `bloom-server download`" in err
        assert "deepspeed" not in err.lower().replace("bloom-deepspeed", ""), "refused before the backend was touched"

        with open(d / "tp_00_00.pt", "r+b") as f:
            f.truncate(1234)
        code, err = _serve_exit(d, "--backend", "ds_inference")
        assert code == 2
        assert "tp_00_01.pt: missing" in err and "tp_00_00.pt: expected 150000 bytes, found 1234 (truncated)" in err

        before = {n: len(hub.content_gets(n)) for n in files}
        r = subprocess.run(_download_cmd(d), env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        fetched = {n for n in files if len(hub.content_gets(n)) > before[n]}
        assert fetched == {"tp_00_00.pt", "tp_00_01.pt"}, fetched
    _assert_identical(d, files)
    assert resolve_model_dir(str(d)).revision == sha


def test_presharded_dir_copied_without_its_marker_is_refused_unless_trusted(tmp_path):
    """Bug 13 (reliability.md): the same verified download, copied by hand without its hidden completion marker,
    holds pickles nobody verified: refused, naming the directory and the marker; the explicit opt-out lets it
    through to the backend."""
    files = _presharded_files()
    with ThrottledHub(lfs_threshold=1024) as hub:
        hub.add_repo(REPO, files)
        d = tmp_path / "bloom-ds"
        r = subprocess.run(_download_cmd(d), env=_env(hub.url, tmp_path), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    copy = tmp_path / "copied"
    shutil.copytree(d, copy, ignore=shutil.ignore_patterns(".*"))  # `cp dir/* copy/`: the marker stays behind
    assert resolve_model_dir(str(d)).layout == "ds_presharded"
    code, err = _serve_exit(copy, "--backend", "ds_inference")
    assert code == 2, err
    assert str(copy) in err and marker.COMPLETE in err and "--trust-unverified-pickles" in err
    assert "deepspeed" not in err.lower().replace("bloom-deepspeed", "").replace("deepspeed checkpoint", ""), err
    md = resolve_model_dir(str(copy), trust_unverified_pickles=True)
    assert md.layout == "ds_presharded" and md.revision is None


def test_presharded_dir_with_an_unfinished_download_is_refused(tmp_path):
    files = _presharded_files()
    with ThrottledHub(lfs_threshold=1024, rate=100_000) as hub:
        hub.add_repo(REPO, files)
        d = tmp_path / "bloom-ds"
        p = subprocess.Popen(
            _download_cmd(d), env=_env(hub.url, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        # killed once files started to change (the in-progress marker is written before the first byte)
        _kill_when(p, d / marker.IN_PROGRESS, 1)
    assert not (d / marker.COMPLETE).exists()
    code, err = _serve_exit(d, "--backend", "ds_inference")
    assert code == 2 and "download did not finish" in err and marker.IN_PROGRESS in err, err


# --------------------------------------------------------------------------------------------------------- full disk

DRIVER = textwrap.dedent(
    """
    import json, os, subprocess, sys
    mnt, out, cmd = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    res = {}
    def run(*extra):
        p = subprocess.run(cmd + list(extra), capture_output=True, text=True, timeout=120)
        lines = [l for l in (p.stdout + p.stderr).splitlines() if l.strip()]
        return {"rc": p.returncode, "last": lines[-1] if lines else "", "out": p.stdout + p.stderr}
    def state():
        d = os.path.join(mnt, "model")
        from bloom_server.storage import marker
        return {"complete": os.path.exists(os.path.join(d, marker.COMPLETE)),
                "in_progress": os.path.exists(os.path.join(d, marker.IN_PROGRESS)),
                "df_free": os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize}
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", mnt], check=True)
    res["precheck"] = run()
    res["precheck_state"] = state()
    res["write"] = run("--skip-space-check")
    res["write_state"] = state()
    try:
        sys.path.insert(0, os.environ["BLOOM_SRC"])
        from bloom_server.storage.model_dir import resolve_model_dir
        resolve_model_dir(os.path.join(mnt, "model"))
        res["server_check"] = "accepted"
    except Exception as e:
        res["server_check"] = str(e)
    subprocess.run(["mount", "-o", "remount,size=8m", mnt], check=True)
    res["rerun"] = run()
    res["rerun_state"] = state()
    d = os.path.join(mnt, "model")
    res["sha256"] = {n: __import__("hashlib").sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
                     for n in os.listdir(d) if not n.startswith(".")}
    json.dump(res, open(out, "w"))
    """
)


def _private_tmpfs_works(tmp_path: pathlib.Path) -> bool:
    unshare = shutil.which("unshare")
    if not unshare or not sys.platform.startswith("linux"):
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    r = subprocess.run(
        [unshare, "-Urm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
        capture_output=True,
        timeout=30,
    )
    return r.returncode == 0


def test_full_disk_during_download_is_a_clear_error_without_completion_marker(tiny_model_dir, tmp_path):
    if not _private_tmpfs_works(tmp_path):
        pytest.skip(
            "no user+mount namespaces here (unshare -Urm) to make a small real filesystem; the ENOSPC path "
            "is still covered in-process by test_download.py::test_enospc_while_writing_maps_to_disk_full"
        )
    files = _files_of(tiny_model_dir)
    total = sum(len(v) for v in files.values())
    assert total > 900_000  # more than the 600 KiB volume holds
    mnt = tmp_path / "vol"
    mnt.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    with ThrottledHub(lfs_threshold=1024) as hub:
        sha = hub.add_repo(REPO, files)
        env = _env(hub.url, tmp_path)
        env["BLOOM_SRC"] = str(ROOT / "src")
        cmd = _download_cmd(mnt / "model")
        r = subprocess.run(
            ["unshare", "-Urm", sys.executable, str(driver), str(mnt), str(tmp_path / "res.json"), json.dumps(cmd)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "res.json").read_text())

    # Refused up front: the volume is smaller than what is to be fetched; nothing started.
    assert res["precheck"]["rc"] == download.EXIT_DISK_FULL, res["precheck"]
    assert "error [disk-full]" in res["precheck"]["last"] and "free in" in res["precheck"]["last"]
    assert not res["precheck_state"]["complete"] and not res["precheck_state"]["in_progress"]

    # Told to go ahead anyway: the write hits ENOSPC: exit 6, a clear last line, no completion marker.
    w = res["write"]
    assert w["rc"] == download.EXIT_DISK_FULL, w
    assert "error [disk-full]" in w["last"] and "No space left on device" in w["last"], w["last"]
    assert "grow the PVC" in w["last"] and "rerun to resume" in w["last"]
    assert "Traceback" not in w["out"]
    assert not res["write_state"]["complete"] and res["write_state"]["in_progress"]
    assert "download did not finish" in res["server_check"], res["server_check"]

    # The volume grows; a rerun completes and verifies.
    assert res["rerun"]["rc"] == 0, res["rerun"]
    assert "bloom-server download: complete:" in res["rerun"]["last"] and sha in res["rerun"]["last"]
    assert res["rerun_state"]["complete"] and not res["rerun_state"]["in_progress"]
    assert res["sha256"] == {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}
