"""Secrets stay secret: the Hugging Face token (HF_TOKEN, HF_TOKEN_PATH, or credentials in HF_ENDPOINT) and the
server's API key appear in no log line and in no response or error body, on the success paths and on the error paths.

The downloader runs against tests/hubstub.py (127.0.0.1): success, 401 (wrong token), 400 from an endpoint that echoes
the Authorization header back in its error, 404, an unreachable endpoint, a token read from a file, credentials in the
endpoint URL, and huggingface_hub at debug verbosity. The server runs with HF_TOKEN and BLOOM_API_KEY set and debug
logging, and is sent a good request, a 422, a 404, a 405, a 413 and (when the key is enforced) a 401 with a wrong key,
then every GET route of /openapi.json; its whole log is searched after it stopped.

Every search is for the whole secret and for its distinctive middle part, so a truncated or reformatted leak counts.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import socket
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer

import pytest

import hubstub
from helpers import ServerProcess, free_port, http

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
REPO = "bigscience-test/bloom-secret"
FILES = {"config.json": b'{"model_type": "bloom"}', "weights.bin": os.urandom(5000)}


def _secret(prefix: str) -> str:
    return f"{prefix}Rel1abilitySecret{secrets.token_hex(12)}"


def _needles(secret: str) -> list[str]:
    core = secret.split("Secret", 1)[1]
    return [secret, core, core[4:16]]


def assert_absent(text: str, *secrets_: str, where: str = "") -> None:
    for s in secrets_:
        for needle in _needles(s):
            assert needle not in text, f"secret fragment {needle[:6]}... found in {where}:\n{text[-3000:]}"


def _env(hub_url: str, tmp_path: pathlib.Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(
        HF_ENDPOINT=hub_url,
        HF_HOME=str(tmp_path / "hf-home"),
        NO_PROXY="127.0.0.1",
        no_proxy="127.0.0.1",
        PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


def _download(env: dict, local_dir: pathlib.Path, *args: str, repo: str = REPO) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "bloom_server",
        "download",
        "--repo-id",
        repo,
        "--local-dir",
        str(local_dir),
        "--progress-interval",
        "0",
        "--retries",
        "1",
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


class EchoingHub(hubstub.HubStub):
    """An endpoint (a proxy, a mirror) that puts the Authorization header it received into its error message (an
    unexpected status, whose message the downloader prints)."""

    def start(self) -> None:
        stub = self

        class Handler(hubstub._Handler):
            hub = stub

            def _listing(self, req, repo_id, rev, query):
                got = req.headers.get("authorization", "")
                self._error(req, 400, None, f"bad request with credentials {got}")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()


# ---------------------------------------------------------------------------------------------------------- downloader


def test_downloader_never_prints_the_token(tmp_path):
    token, wrong = _secret("hf_"), _secret("hf_")
    outputs = {}
    with hubstub.HubStub(token=token) as hub:
        hub.add_repo(REPO, FILES)
        ok = _download(_env(hub.url, tmp_path, HF_TOKEN=token), tmp_path / "ok")
        assert ok.returncode == 0, ok.stderr
        assert (tmp_path / "ok" / "weights.bin").read_bytes() == FILES["weights.bin"]
        outputs["success"] = ok
        outputs["success, huggingface_hub at debug"] = _download(
            _env(hub.url, tmp_path, HF_TOKEN=token, HF_HUB_VERBOSITY="debug"), tmp_path / "dbg", "--verify"
        )
        assert outputs["success, huggingface_hub at debug"].returncode == 0

        r = _download(_env(hub.url, tmp_path, HF_TOKEN=wrong), tmp_path / "wrong")
        assert r.returncode == 3 and "HTTP 401" in r.stderr, r.stderr
        outputs["401 wrong token"] = r

        r = _download(_env(hub.url, tmp_path, HF_TOKEN=token), tmp_path / "nf", repo="nobody/nothing")
        assert r.returncode == 4, r.stderr
        outputs["404 repository"] = r

        r = _download(_env(hub.url, tmp_path, HF_TOKEN=token), tmp_path / "rev", "--revision", "no-such-branch")
        assert r.returncode == 4, r.stderr
        outputs["404 revision"] = r

        secret_file = tmp_path / "secret" / "token"
        secret_file.parent.mkdir()
        secret_file.write_text(token + "\n")
        n = len(hub.requests)
        r = _download(_env(hub.url, tmp_path, HF_TOKEN_PATH=str(secret_file)), tmp_path / "file")
        assert r.returncode == 0, r.stderr
        assert all(
            q.headers.get("authorization") == f"Bearer {token}" for q in hub.requests[n:] if "/cdn/" not in q.path
        )
        outputs["token from HF_TOKEN_PATH"] = r

    with EchoingHub() as echo:
        echo.add_repo(REPO, FILES)
        r = _download(_env(echo.url, tmp_path, HF_TOKEN=token), tmp_path / "echo")
        assert r.returncode == 1, r.stderr
        assert "HTTP 400" in r.stderr and "bad request with credentials" in r.stderr  # the message is kept...
        outputs["400 from an endpoint echoing the token"] = r  # ...the token in it is not

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    r = _download(_env(f"http://127.0.0.1:{dead}", tmp_path, HF_TOKEN=token), tmp_path / "dead")
    assert r.returncode == 5, r.stderr
    outputs["unreachable endpoint"] = r

    for name, r in outputs.items():
        assert_absent(r.stdout + r.stderr, token, wrong, where=f"downloader output ({name})")
    assert "token: set" in outputs["success"].stderr


def test_downloader_never_prints_credentials_in_the_endpoint_url(tmp_path):
    password = _secret("pw_")
    with hubstub.HubStub() as hub:
        hub.add_repo(REPO, FILES)
        url = hub.url.replace("http://", f"http://mirror-user:{password}@")
        ok = _download(_env(url, tmp_path), tmp_path / "ok")
        nf = _download(_env(url, tmp_path), tmp_path / "nf", repo="nobody/nothing")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    gone = _download(_env(f"http://mirror-user:{password}@127.0.0.1:{dead}", tmp_path), tmp_path / "dead")
    assert ok.returncode == 0, ok.stderr
    assert nf.returncode == 4 and gone.returncode == 5, (nf.stderr, gone.stderr)
    for name, r in (("success", ok), ("404", nf), ("unreachable", gone)):
        assert_absent(r.stdout + r.stderr, password, where=f"downloader output with endpoint credentials ({name})")


# -------------------------------------------------------------------------------------------------------------- server


def test_server_never_shows_the_token_or_the_api_key(tiny_model_dir, tmp_path):
    token, key, wrong_key = _secret("hf_"), _secret("bk_"), _secret("bk_")
    env = {"HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": token, "BLOOM_API_KEY": key, "BLOOM_LOG_LEVEL": "debug"}
    srv = ServerProcess(
        ["--model", str(tiny_model_dir), "--max-new-tokens", "8", "--max-body-bytes", "4096"],
        free_port(),
        env=env,
        log_path=tmp_path / "server.log",
    )
    bodies: list[str] = []
    try:
        srv.wait_ready()
        enforced = srv.post("/generate", {"text": ["Hello"], "max_new_tokens": 2})[0] == 401
        auth = {"Authorization": f"Bearer {key}"} if enforced else {}

        def call(method, path, body=None, raw=None, headers=None, want=None):
            status, out, hdrs = http(method, srv.url + path, body, raw=raw, headers={**auth, **(headers or {})})
            text = out if isinstance(out, str) else json.dumps(out)
            bodies.append(f"{method} {path} -> {status}: {text} {json.dumps(hdrs)}")
            if want is not None:
                assert status == want, (method, path, status, text[:500])
            return status

        call("POST", "/generate", {"text": ["Hello"], "max_new_tokens": 2}, want=200)
        call("POST", "/generate", {"text": ["Hello"], "max_new_tokens": 9999}, want=422)
        call("POST", "/tokenize", {"text": []}, want=422)
        call("POST", "/forward", {"conditioning_text": ["a"]}, want=422)
        call("POST", "/generate", raw=b"{not json", want=422)
        call("POST", "/generate", raw=b'{"text": ["' + b"a" * 8192 + b'"]}', want=413)
        call("GET", "/nope", want=404)
        call("GET", "/v1/models/not-this-one", want=404)
        call("GET", "/generate", want=405)
        if enforced:
            for bad in ({}, {"Authorization": f"Bearer {wrong_key}"}, {"Authorization": f"Bearer {key[:-1]}"}):
                status, out, hdrs = http("POST", srv.url + "/generate", {"text": ["x"]}, headers=bad)
                bodies.append(f"unauthorized -> {status}: {json.dumps(out)} {json.dumps(hdrs)}")
                assert status == 401, out
        status, spec, _ = http("GET", srv.url + "/openapi.json", headers=auth)
        assert status == 200
        for path, ops in spec["paths"].items():
            if "get" in ops:
                call("GET", path.replace("{name}", tiny_model_dir.name))
        call("GET", "/docs")
    finally:
        code = srv.stop()
    log = srv.log_path.read_text()
    assert code == 0, log[-3000:]
    assert "ready" in log  # the log is the real one, at debug level
    for entry in bodies:
        assert_absent(entry, token, key, wrong_key, where="a response")
    assert_absent(log, token, key, wrong_key, where="the server log")


def test_server_start_failures_do_not_show_the_token(tmp_path):
    token, key = _secret("hf_"), _secret("bk_")
    env = {**os.environ, "HF_TOKEN": token, "BLOOM_API_KEY": key}
    runs = [
        ["--model", str(tmp_path / "missing")],  # refused model directory
        ["--model", "org/not-in-the-cache"],  # a repo id that is not in the Hub cache
        ["--max-batch-size", "-3"],  # invalid settings: the error echoes the value it got
    ]
    for args in runs:
        r = subprocess.run(
            [sys.executable, "-m", "bloom_server", "serve", "--port", "0", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2, (args, r.stderr)
        assert_absent(r.stdout + r.stderr, token, key, where=f"serve {' '.join(args)}")
