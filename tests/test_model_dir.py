"""Model directories: plain, Hub cache layout (resolved read-only), pvc:// URIs; refusals name what is wrong."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

from bloom_server.errors import ModelDirError
from bloom_server.storage.model_dir import resolve_model_dir


def _hub_entry(root, tiny_model_dir, sha="0123456789abcdef0123456789abcdef01234567"):
    entry = root / "hub" / "models--bigscience--bloom-tiny"
    snap = entry / "snapshots" / sha
    shutil.copytree(tiny_model_dir, snap)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(sha)
    return entry, snap, sha


def _read_only(path):
    for dirpath, _dirnames, filenames in os.walk(path):
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
    import bloom_server.storage.model_dir as m

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
    srv = ServerProcess(
        ["--model", "bigscience/bloom-tiny"],
        free_port(),
        env={"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"},
        log_path=tmp_path / "log",
    )
    try:
        srv.wait_ready()
        status, body, _ = srv.post("/generate/", {"text": ["Hello"], "max_new_tokens": 3})
        assert status == 200 and body["num_generated_tokens"][0] <= 3
    finally:
        srv.stop()
        os.chmod(tmp_path / "hub", 0o755)


def test_server_refuses_bad_directory_before_opening_the_port(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "bloom_server", "serve", "--model", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "does not exist" in r.stderr


def _downloaded_copy(tmp_path, tiny_model_dir):
    """A copy of the tiny model with the downloader's completion marker, as `bloom-server download` leaves it."""
    from bloom_server.storage import marker

    d = tmp_path / "downloaded"
    shutil.copytree(tiny_model_dir, d)
    files = [{"path": p.name, "size": p.stat().st_size, "sha256": None, "git_sha1": None} for p in sorted(d.iterdir())]
    marker.write_marker(
        d,
        marker.COMPLETE,
        {
            "format": marker.FORMAT,
            "state": "complete",
            "repo_id": "org/tiny",
            "revision": "main",
            "commit": "a" * 40,
            "files": files,
        },
    )
    return d


def _serve_exit(model_dir):
    r = subprocess.run(
        [sys.executable, "-m", "bloom_server", "serve", "--model", str(model_dir), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
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
    from bloom_server.storage import marker

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


# ---- pickled weights need a verifying marker (reliability.md bug 13) ----------------------------------------------


def _hand_made_ds_dir(root, tiny_model_dir):
    """A DeepSpeed pre-sharded layout copied in by hand: pickled .pt shards, no completion marker."""
    import json

    d = root / "ds-by-hand"
    d.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(tiny_model_dir / name, d / name)
    (d / "ds_inference_config.json").write_text(json.dumps({
        "type": "BLOOM", "checkpoints": {"non_tp": ["non-tp.pt"], "tp": ["tp_00_00.pt"]}, "parallelization": "tp",
        "tp_size": 1, "dtype": "float16", "version": 1.0}))  # fmt: skip
    for name in ("non-tp.pt", "tp_00_00.pt"):  # as large as the config's parameters at a byte each (int8)
        (d / name).write_bytes(b"\x80\x04not really a pickle".ljust(120_000, b"\0"))
    return d


def _mark_complete(d):
    """The downloader's completion marker, as after a download that checked every file against its published sha256."""
    import hashlib

    from bloom_server.storage import marker

    files = [{"path": p.name, "size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
              "git_sha1": None} for p in sorted(d.iterdir()) if not p.name.startswith(".")]  # fmt: skip
    marker.write_marker(d, marker.COMPLETE, {"format": marker.FORMAT, "state": "complete", "repo_id": "org/x",
                                             "revision": "main", "commit": "b" * 40, "files": files})  # fmt: skip


def test_pickled_shards_without_a_marker_are_refused_naming_the_directory_and_the_marker(tmp_path, tiny_model_dir):
    d = _hand_made_ds_dir(tmp_path, tiny_model_dir)
    with pytest.raises(ModelDirError) as err:
        resolve_model_dir(str(d))
    msg = str(err.value)
    assert str(d) in msg and ".bloom-download.json" in msg and "non-tp.pt" in msg
    assert "--trust-unverified-pickles" in msg and "BLOOM_TRUST_UNVERIFIED_PICKLES" in msg


def test_the_server_refuses_them_before_opening_the_port(tmp_path, tiny_model_dir):
    d = _hand_made_ds_dir(tmp_path, tiny_model_dir)
    r = subprocess.run([sys.executable, "-m", "bloom_server", "serve", "--model", str(d), "--backend", "ds_inference",
                        "--port", "0"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2
    assert "no completion marker .bloom-download.json" in r.stderr and "pickled" in r.stderr


def test_the_opt_out_loads_them_with_a_warning(tmp_path, tiny_model_dir, caplog, monkeypatch):
    from bloom_server.settings import load_settings

    d = _hand_made_ds_dir(tmp_path, tiny_model_dir)
    with caplog.at_level("WARNING"):
        md = resolve_model_dir(str(d), trust_unverified_pickles=True)
    assert md.layout == "ds_presharded" and md.weights_format == "pickle"
    assert "loading it anyway" in caplog.text and "non-tp.pt" in caplog.text
    assert load_settings().trust_unverified_pickles is False  # off unless asked for
    monkeypatch.setenv("BLOOM_TRUST_UNVERIFIED_PICKLES", "1")
    assert load_settings().trust_unverified_pickles is True
    assert load_settings(trust_unverified_pickles=False).trust_unverified_pickles is False  # the flag wins


def test_a_verified_directory_loads_but_not_a_pickle_added_after_the_download(tmp_path, tiny_model_dir):
    d = _hand_made_ds_dir(tmp_path, tiny_model_dir)
    _mark_complete(d)
    md = resolve_model_dir(str(d))
    assert md.layout == "ds_presharded" and md.revision == "b" * 40
    (d / "tp_00_01.pt").write_bytes(b"\x80\x04dropped in later")
    with pytest.raises(ModelDirError, match=r"tp_00_01.pt is pickled and not listed in its completion marker"):
        resolve_model_dir(str(d))


def _bin_only_copy(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    d = tmp_path / "bin-only"
    shutil.copytree(tiny_model_dir, d)
    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return d


def test_hf_layout_with_only_pytorch_model_bin_follows_the_same_rule(tmp_path, tiny_model_dir):
    d = _bin_only_copy(tmp_path, tiny_model_dir)
    with pytest.raises(ModelDirError, match="pytorch_model.bin.*no completion marker"):
        resolve_model_dir(str(d))
    _mark_complete(d)
    md = resolve_model_dir(str(d))
    assert md.layout == "hf" and md.weights_format == "pickle"


def test_safetensors_win_over_a_pickle_beside_them(tmp_path, tiny_model_dir):
    """A stray (here: garbage) pytorch_model.bin next to model.safetensors: the directory is safetensors, no marker
    needed, and the hf backend loads the safetensors without opening the pickle."""
    from bloom_server.backends.hf import HFBackend
    from bloom_server.settings import load_settings
    from bloom_server.types import RankContext

    d = tmp_path / "both"
    shutil.copytree(tiny_model_dir, d)
    (d / "pytorch_model.bin").write_bytes(b"garbage: unpickling this fails loudly")
    md = resolve_model_dir(str(d))
    assert md.weights_format == "safetensors"
    backend = HFBackend(load_settings(backend="hf", dtype="fp32"), md, RankContext(device_type="cpu"))
    backend.load()
    assert backend.model is not None


def _crafted_copy(tmp_path, tiny_model_dir, name, **changes):
    d = tmp_path / name
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"n_layer": 1_000_000}, "n_layer"),
        ({"n_layer": 3}, "n_layer"),  # the weights hold 2
        ({"n_head": 0}, "n_head"),
        ({"n_head": 5}, "hidden_size"),  # 64 is not divisible by 5
        ({"hidden_size": -64}, "hidden_size"),
        ({"n_head": "4"}, "n_head"),
        ({"n_layer": True}, "n_layer"),
        ({"vocab_size": 4096}, "vocab_size"),  # the weights' embedding has 2048 rows
        ({"hidden_size": 128, "n_head": 4}, "hidden_size"),  # the weights' embedding is 64 wide
    ],
    ids=[
        "huge-n_layer",
        "n_layer-vs-weights",
        "zero-heads",
        "indivisible",
        "negative",
        "string",
        "boolean",
        "vocab-vs-weights",
        "hidden-vs-weights",
    ],
)
def test_a_crafted_config_is_refused_at_start_naming_the_field(tmp_path, tiny_model_dir, changes, field):
    d = _crafted_copy(tmp_path, tiny_model_dir, "crafted", **changes)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "bloom_server", "serve", "--model", str(d), "--port", "0",
                        "--host", "127.0.0.1"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and f"config.json: {field}" in r.stderr, r.stderr[-2000:]
    assert time.monotonic() - t0 < 30


def test_a_config_whose_weights_cannot_fit_in_memory_is_refused_before_loading(tmp_path, tiny_model_dir):
    """Pickled weights (a sparse file: no disk used) as large as a config of 256 layers of 16384 says, which no host
    here can hold in fp32: exit 2 naming the sizes and the memory, before anything is loaded."""
    d = _crafted_copy(tmp_path, tiny_model_dir, "huge", n_layer=256, hidden_size=16384, n_head=128)
    (d / "model.safetensors").unlink()
    with open(d / "pytorch_model.bin", "wb") as f:
        f.truncate(800 * 10**9)
    r = subprocess.run([sys.executable, "-m", "bloom_server", "serve", "--model", str(d), "--port", "0",
                        "--host", "127.0.0.1", "--trust-unverified-pickles", "--dtype", "fp32"],
                       capture_output=True, text=True, timeout=90)  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert "config.json: n_layer/hidden_size" in r.stderr and "more than this host has" in r.stderr, r.stderr[-2000:]
