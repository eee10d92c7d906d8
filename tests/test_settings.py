"""One settings object: flags over BLOOM_* over the original server's variables over defaults."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bloom_server.cli import build_parser
from bloom_server.cli.serve import settings_from_args as _settings_from_args
from bloom_server.settings import load_settings

LEGACY = {
    "MODEL_NAME": "bigscience/bloom",
    "DEPLOYMENT_FRAMEWORK": "hf_accelerate",
    "DTYPE": "bf16",
    "MAX_INPUT_LENGTH": "300",
    "MAX_BATCH_SIZE": "4",
    "ALLOWED_MAX_NEW_TOKENS": "50",
}


def test_original_variables_are_honoured(monkeypatch):
    for k, v in LEGACY.items():
        monkeypatch.setenv(k, v)
    s = load_settings()
    assert (s.model, s.backend, s.dtype) == ("bigscience/bloom", "hf", "bf16")
    assert (s.max_input_length, s.max_batch_size, s.max_new_tokens) == (300, 4, 50)


@pytest.mark.parametrize("legacy,ours", [("hf_cpu", "hf"), ("ds_inference", "ds_inference"), ("ds_zero", "ds_zero")])
def test_legacy_framework_names(monkeypatch, legacy, ours):
    monkeypatch.setenv("DEPLOYMENT_FRAMEWORK", legacy)
    assert load_settings().backend == ours


def test_bloom_variables_win_over_legacy_and_flags_win_over_both(monkeypatch):
    monkeypatch.setenv("MAX_INPUT_LENGTH", "300")
    monkeypatch.setenv("BLOOM_MAX_INPUT_LENGTH", "200")
    assert load_settings().max_input_length == 200
    args = build_parser().parse_args(["serve", "--max-input-length", "100", "--backend", "ds_zero", "--no-warmup"])
    s = _settings_from_args(args)
    assert (s.max_input_length, s.backend, s.warmup) == (100, "ds_zero", False)


def test_storage_uri_is_a_model_source(monkeypatch):
    monkeypatch.setenv("STORAGE_URI", "pvc://bloom-weights/fp16")
    assert load_settings().model == "pvc://bloom-weights/fp16"


def test_unrelated_variables_are_not_read(monkeypatch):
    monkeypatch.setenv("MODEL", "nope")
    monkeypatch.setenv("PORT", "1")
    s = load_settings()
    assert s.model is None and s.port == 8080


@pytest.mark.parametrize(
    "env",
    [
        {"BLOOM_BACKEND": "tensorrt"},
        {"DTYPE": "fp8"},
        {"BLOOM_MAX_BATCH_SIZE": "0"},
        {"BLOOM_PORT": "70000"},
        {"BLOOM_MAX_TOTAL_TOKENS": "10", "BLOOM_MAX_INPUT_LENGTH": "20"},
    ],
)
def test_invalid_settings_are_rejected(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError):
        load_settings()


def test_total_tokens_default_is_input_plus_output():
    s = load_settings(max_input_length=10, max_new_tokens=5)
    assert s.total_tokens_limit == 15
    assert load_settings(max_total_tokens=2048).total_tokens_limit == 2048


def test_deepspeed_launcher_local_rank_flag_is_accepted():
    args = build_parser().parse_args(["--local_rank=3", "serve", "--port", "1"])
    assert args.local_rank_top == 3 and args.command == "serve"
    args = build_parser().parse_args(["serve", "--local_rank", "2"])
    assert args.local_rank == 2


def test_invalid_flag_value_exits_2(tiny_model_dir):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "bloom_server", "serve", "--backend", "nope"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert "backend" in r.stderr


def test_continuous_batching_where_the_backend_cannot_stops_the_server_before_loading(caplog):
    """The backend class declares the capability (supports_continuous); serve asks it before anything is read."""
    from bloom_server.serve import serve

    assert serve(load_settings(backend="hf", batching="continuous")) == 2
    assert "the hf backend cannot join requests to a running batch" in caplog.text


def test_the_other_commands_read_their_variables_through_the_settings(monkeypatch, tmp_path):
    from pathlib import Path

    from bloom_server.cli.client import default_url
    from bloom_server.cli.launch import gpu_count
    from bloom_server.storage.tiny import tiny_dir

    s = load_settings()
    assert default_url(s) == "http://127.0.0.1:8080" and s.num_gpus is None
    assert tiny_dir(s.home) == Path.home() / ".cache" / "bloom-server" / "tiny-bloom"
    env = {"BLOOM_NUM_GPUS": "0", "BLOOM_HOME": str(tmp_path), "BLOOM_PORT": "9000", "BLOOM_URL": ""}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = load_settings()
    assert gpu_count(s.num_gpus) == 0 and tiny_dir(s.home) == tmp_path / "tiny-bloom"
    assert default_url(s) == "http://127.0.0.1:9000"
    monkeypatch.setenv("BLOOM_URL", "https://example.org/bloom")
    assert default_url(load_settings()) == "https://example.org/bloom"
    monkeypatch.setenv("BLOOM_NUM_GPUS", "-1")
    with pytest.raises(ValidationError, match="BLOOM_NUM_GPUS"):
        load_settings()


def test_nothing_but_settings_reads_a_bloom_variable():
    """One Settings object for every BLOOM_* variable: no other module reads one from the environment."""
    import pathlib
    import re

    src = pathlib.Path(__file__).resolve().parents[1] / "src" / "bloom_server"
    read = re.compile(r"""(environ\b[^\n]{0,12}|getenv\()\(?\[?["']BLOOM_""")
    wrong = [
        str(p.relative_to(src)) for p in src.rglob("*.py") if p.name != "settings.py" and read.search(p.read_text())
    ]
    assert not wrong, wrong


def test_the_original_debug_switch_turns_on_debug_logging_unless_a_level_is_given(monkeypatch):
    monkeypatch.setenv("DEBUG", "1")
    assert load_settings().log_level == "debug"
    monkeypatch.setenv("BLOOM_LOG_LEVEL", "warning")
    assert load_settings().log_level == "warning"
    monkeypatch.delenv("DEBUG")
    monkeypatch.delenv("BLOOM_LOG_LEVEL")
    assert load_settings().log_level == "info"
