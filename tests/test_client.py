"""`bloom-server client` against real servers: streams the completion to stdout, honours the generation flags and
the API key, and says clearly when the server refuses or cannot be reached."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import ServerProcess, free_port


def client(*args: str, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bloom_server", "client", *args],
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
        env={**os.environ, "BLOOM_URL": "", "BLOOM_API_KEY": "", **(env or {})},
    )


@pytest.fixture(scope="module")
def keyed(tiny_model_dir, tmp_path_factory):
    with ServerProcess(
        ["--model", str(tiny_model_dir), "--max-new-tokens", "32", "--no-warmup"],
        free_port(),
        env={"BLOOM_API_KEY": "s3cret"},
        log_path=tmp_path_factory.mktemp("logs") / "keyed.log",
    ) as srv:
        yield srv


def test_streams_the_greedy_completion(server):
    expected = server.post("/generate", {"text": ["Deepspeed is"], "max_new_tokens": 6})[1]["text"][0]
    r = client("Deepspeed is", "--url", server.url, "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    assert "[6 tokens, length" in r.stderr
    r = client("-", "--url", server.url, "--max-new-tokens", "6", "--quiet", stdin="Deepspeed is")
    assert r.stdout == expected + "\n" and r.stderr == ""


def test_finds_a_server_on_another_port_from_bloom_port(server):
    """`BLOOM_PORT=9000 scripts/dev.sh serve`, then the README's client command in the same shell: no --url needed."""
    expected = server.post("/generate", {"text": ["Deepspeed is"], "max_new_tokens": 4})[1]["text"][0]
    r = client("Deepspeed is", "--max-new-tokens", "4", "--quiet", env={"BLOOM_PORT": str(server.port)})
    assert r.returncode == 0 and r.stdout == expected + "\n", r.stderr
    r = client("Deepspeed is", "--max-new-tokens", "4", env={"BLOOM_PORT": str(free_port())})
    assert r.returncode == 2 and "cannot reach http://127.0.0.1:" in r.stderr  # says where it looked


def test_sampling_flags_and_seed(server):
    args = [
        "Hello",
        "--url",
        server.url,
        "--max-new-tokens",
        "10",
        "--temperature",
        "1.3",
        "--top-p",
        "0.9",
        "--seed",
        "5",
        "--quiet",
    ]
    a, b = client(*args), client(*args)
    assert a.returncode == 0 and a.stdout == b.stdout
    expected = server.post(
        "/generate",
        {
            "inputs": "Hello",
            "parameters": {"max_new_tokens": 10, "do_sample": True, "temperature": 1.3, "top_p": 0.9, "seed": 5},
        },
    )[1]["generated_text"]
    assert a.stdout == expected + "\n"


def test_refusals_and_unreachable_servers(server):
    r = client("Hello", "--url", server.url, "--max-new-tokens", "1000")
    assert r.returncode == 1 and "422" in r.stderr and "max_new_tokens" in r.stderr
    r = client("Hello", "--url", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "cannot reach" in r.stderr


def test_api_key_flag_and_variable(keyed):
    r = client("Hello", "--url", keyed.url, "--max-new-tokens", "3")
    assert r.returncode == 1 and "401" in r.stderr
    assert client("Hello", "--url", keyed.url, "--max-new-tokens", "3", "--api-key", "s3cret").returncode == 0
    r = client("Hello", "--max-new-tokens", "3", env={"BLOOM_URL": keyed.url, "BLOOM_API_KEY": "s3cret"})
    assert r.returncode == 0 and r.stdout.strip()
