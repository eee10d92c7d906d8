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
