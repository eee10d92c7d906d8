"""Model directories: plain, Hub cache layout (resolved read-only), pvc:// URIs; refusals name what is wrong."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest

from bloom_server.errors import ModelDirError
from bloom_server.model_dir import resolve_model_dir


def _hub_entry(root, tiny_model_dir, sha="0123456789abcdef0123456789abcdef01234567"):
    entry = root / "hub" / "models--bigscience--bloom-tiny"
    snap = entry / "snapshots" / sha
    shutil.copytree(tiny_model_dir, snap)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(sha)
    return entry, snap, sha


def _read_only(path):
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), stat.S_IRUSR)
        os.chmod(dirpath, stat.S_IRUSR | stat.S_IXUSR)


def test_plain_directory(tiny_model_dir):
    md = resolve_model_dir(str(tiny_model_dir))
    assert md.layout == "hf" and md.path == tiny_model_dir and md.model_id == tiny_model_dir.name


def test_hub_cache_by_repo_id(tmp_path, tiny_model_dir, monkeypatch):
    entry, snap, sha = _hub_entry(tmp_path, tiny_model_dir)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    md = resolve_model_dir("bigscience/bloom-tiny")
    assert md.path == snap and md.revision == sha and md.model_id == "bigscience/bloom-tiny"


def test_hub_cache_entry_directory(tmp_path, tiny_model_dir):
    entry, snap, sha = _hub_entry(tmp_path, tiny_model_dir)
    md = resolve_model_dir(str(entry))
    assert md.path == snap and md.model_id == "bigscience/bloom-tiny"


def test_pvc_uri_maps_to_kserve_mount(monkeypatch, tiny_model_dir):
    import bloom_server.model_dir as m

    monkeypatch.setattr(m, "KSERVE_MOUNT", str(tiny_model_dir))
    md = resolve_model_dir("pvc://bloom-weights/tiny")
    assert md.path == tiny_model_dir and md.model_id == "tiny"


@pytest.mark.parametrize(
    "spec,needle",
    [("/nonexistent/dir", "does not exist"), ("org/not-cached", "Hub cache")],
)
def test_refusals_name_the_problem(spec, needle, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelDirError, match=needle):
        resolve_model_dir(spec)


def test_missing_tokenizer_is_named(tmp_path, tiny_model_dir):
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(ModelDirError, match="tokenizer.json"):
        resolve_model_dir(str(d))


def test_server_serves_a_read_only_hub_cache(tmp_path, tiny_model_dir):
    """What KServe gives the pod: a read-only mount. Nothing is written while resolving, loading or serving."""
    from helpers import ServerProcess, free_port

    entry, snap, sha = _hub_entry(tmp_path, tiny_model_dir)
    _read_only(tmp_path / "hub")
    srv = ServerProcess(["--model", "bigscience/bloom-tiny"], free_port(), env={"HF_HOME": str(tmp_path),
                        "HF_HUB_OFFLINE": "1"}, log_path=tmp_path / "log")
    try:
        srv.wait_ready()
        status, body, _ = srv.post("/generate/", {"text": ["Hello"], "max_new_tokens": 3})
        assert status == 200 and body["num_generated_tokens"][0] <= 3
    finally:
        srv.stop()
        os.chmod(tmp_path / "hub", 0o755)


def test_server_refuses_bad_directory_before_opening_the_port(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bloom_server", "serve", "--model", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "does not exist" in r.stderr


def _downloaded_copy(tmp_path, tiny_model_dir):
    """A copy of the tiny model with the downloader's completion marker, as `bloom-server download` leaves it."""
    from bloom_server import marker

    d = tmp_path / "downloaded"
    shutil.copytree(tiny_model_dir, d)
    files = [{"path": p.name, "size": p.stat().st_size, "sha256": None, "git_sha1": None} for p in sorted(d.iterdir())]
    marker.write_marker(d, marker.COMPLETE, {
        "format": marker.FORMAT, "state": "complete", "repo_id": "org/tiny", "revision": "main",
        "commit": "a" * 40, "files": files,
    })
    return d


def _serve_exit(model_dir):
    r = subprocess.run([sys.executable, "-m", "bloom_server", "serve", "--model", str(model_dir), "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    return r.returncode, r.stderr


def test_verified_download_is_served_with_its_commit(tmp_path, tiny_model_dir):
    d = _downloaded_copy(tmp_path, tiny_model_dir)
    assert resolve_model_dir(str(d)).revision == "a" * 40


def test_server_refuses_truncated_download_naming_the_file(tmp_path, tiny_model_dir):
    d = _downloaded_copy(tmp_path, tiny_model_dir)
    with open(d / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    code, err = _serve_exit(d)
    assert code == 2
    assert "model.safetensors" in err and "truncated" in err


def test_server_refuses_unfinished_download(tmp_path, tiny_model_dir):
    from bloom_server import marker

    d = _downloaded_copy(tmp_path, tiny_model_dir)
    (d / marker.COMPLETE).unlink()
    (d / marker.IN_PROGRESS).write_text("{}")
    code, err = _serve_exit(d)
    assert code == 2
    assert "did not finish" in err and marker.IN_PROGRESS in err


def test_server_refuses_download_with_a_missing_shard(tmp_path, tiny_model_dir):
    d = _downloaded_copy(tmp_path, tiny_model_dir)
    (d / "config.json").unlink()
    code, err = _serve_exit(d)
    assert code == 2
    assert "config.json: missing" in err
