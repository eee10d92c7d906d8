"""Layer rules that a reader would otherwise have to trust: api never imports torch; importing does no work."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys, threading, os
before = set(threading.enumerate())
env_before = dict(os.environ)
import {modules}
assert "torch" not in sys.modules, "torch imported by: {modules}"
assert "fastapi" not in sys.modules or {allow_fastapi}, "fastapi imported"
assert set(threading.enumerate()) == before, "a thread was started at import"
assert dict(os.environ) == env_before, "environment changed at import"
print("ok")
"""


def run(modules: str, allow_fastapi: bool = True) -> None:
    code = CHECK.format(modules=modules, allow_fastapi=allow_fastapi)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_api_and_engine_do_not_import_torch():
    run("bloom_server.api.app, bloom_server.api.routes_bloom, bloom_server.engine.core, bloom_server.engine.scheduler")


def test_cli_download_settings_do_not_import_torch():
    run("bloom_server.cli, bloom_server.download, bloom_server.marker, bloom_server.settings, bloom_server.model_dir")


def test_backends_and_runtime_do_not_import_fastapi_or_torch_at_import():
    run(
        "bloom_server.backends, bloom_server.backends.base, bloom_server.backends.hf, bloom_server.backends.ds_inference,"
        " bloom_server.backends.ds_zero, bloom_server.runtime.lockstep, bloom_server.runtime.distributed",
        allow_fastapi=False,
    )
