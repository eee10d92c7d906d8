import inspect
import os
from pathlib import Path

import pytest

from helpers import ServerProcess, free_port


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The embedded tiny BLOOM checkpoint (seeded weights, trained tokenizer), built once per session."""
    from bloom_server.storage.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-bloom")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """A real `bloom-server serve` process on 127.0.0.1 serving the tiny model."""
    port = free_port()
    with ServerProcess(
        [
            "--model",
            str(tiny_model_dir),
            "--max-input-length",
            "64",
            "--max-new-tokens",
            "64",
            "--max-batch-size",
            "16",
            "--max-total-tokens",
            "96",
        ],
        port,
        log_path=tmp_path_factory.mktemp("logs") / "server.log",
    ) as srv:
        yield srv


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Test tiers (pyproject.toml's markers). The default run takes the in-process tier only; `-m "not gpu"` (CI) takes
# every tier. A test is in the server tier when it starts a bloom-server process (through a fixture named *server*, or
# ServerProcess / a `serve` command in its own body); the deploy tier checks manifests, images and the browser page;
# `slow` (multi-process) and `gpu` are marked in the modules themselves.
DEPLOY_MODULES = {"test_manifests", "test_dockerfiles", "test_kserve_schema", "test_gpu_tp_script", "test_playground"}


def _starts_a_server(item: pytest.Item) -> bool:
    if any("server" in name for name in getattr(item, "fixturenames", ())):
        return True
    try:
        source = inspect.getsource(item.function)  # type: ignore[attr-defined]
    except (AttributeError, OSError, TypeError):
        return False
    return "ServerProcess(" in source or '"serve"' in source or "start_server(" in source


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__ if getattr(item, "module", None) is not None else ""
        if module in DEPLOY_MODULES:
            item.add_marker(pytest.mark.deploy)
        elif _starts_a_server(item):
            item.add_marker(pytest.mark.server)
