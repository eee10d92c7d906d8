"""The fast backend is chosen by name and imported lazily: importing it (or the engine package's torch-free parts)
loads neither torch nor FastAPI, starts no thread and reads no environment."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys, threading, os
before = set(threading.enumerate())
env_before = dict(os.environ)
import bloom_server.backends.fast, bloom_server.fast, bloom_server.fast.shapes, bloom_server.fast.tp
from bloom_server.backends import _BACKENDS
assert _BACKENDS["fast"] == ("bloom_server.backends.fast", "FastBackend"), _BACKENDS
assert "torch" not in sys.modules, "torch imported at import"
assert "fastapi" not in sys.modules, "fastapi imported by a backend"
assert set(threading.enumerate()) == before, "a thread was started at import"
assert dict(os.environ) == env_before, "environment changed at import"
print("ok")
"""


def test_fast_backend_imports_nothing_heavy():
    r = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_settings_accept_the_fast_backend():
    from bloom_server.settings import load_settings

    assert load_settings(backend="fast").backend == "fast"
    assert load_settings(backend="FAST").backend == "fast"
