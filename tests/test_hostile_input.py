"""Hostile input against a real server process: every answer is a clear 4xx or a correct answer, never a 5xx, a crash
or a hang, and a good request right after still succeeds.

Routes: every POST operation that /openapi.json lists (routes added later are covered too; `{name}` is the served
model), the trailing-slash twins of the original ones, and every path with the methods it does not have. "Correct" is
checked against references computed here: token ids from the `tokenizers` library itself, greedy text from
transformers' own generate(), on every surface (original, TGI, OpenAI, KServe v1 and v2).

A few (input, route) pairs hit bugs already reported (docs/reliability.md, "Bugs found"): they are listed in
KNOWN_BUGS and left out until fixed; delete the entry with the fix.
"""

from __future__ import annotations

import http.client
import json
import math
import random
import socket
import time

import pytest

from reliability_support import good_request_succeeds, start_server

pytestmark = pytest.mark.slow

MAX_INPUT, MAX_NEW, MAX_BATCH, MAX_TOTAL = 64, 16, 16, 96
BODY_LIMIT = 1 << 20  # the default --max-body-bytes
ANSWER_TIMEOUT_S = 20  # a hang is an answer slower than this
ORIGINAL = ("/generate", "/tokenize", "/forward")
SPECIAL = ["<s>", "</s>", "<pad>", "<unk>"]

# (case, route) -> bug number in docs/reliability.md. Delete an entry when its bug is fixed.
KNOWN_BUGS: dict[tuple[str, str], int] = {}
# Tests whose requests the client sees answered correctly but which the server logs as unexpected errors (tracebacks,
# status 500 in the access log): their log lines are left out of the last test's check. Bug numbers as above.
NOISY_LOG_TESTS: dict[str, int] = {}
NOISY_LOG: list[tuple[int, int]] = []


@pytest.fixture(scope="module")
def srv(tiny_model_dir, tmp_path_factory):
    s = start_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("hostile") / "server.log",
        "--max-input-length",
        str(MAX_INPUT),
        "--max-new-tokens",
        str(MAX_NEW),
        "--max-batch-size",
        str(MAX_BATCH),
        "--max-total-tokens",
        str(MAX_TOTAL),
        env={"BLOOM_CHAT_TEMPLATE": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"},
    )
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return tiny_model_dir.name  # the model id the server reports (the directory name)


@pytest.fixture(scope="module")
def spec(srv):
    status, body, _ = send(srv, "GET", "/openapi.json")
    assert status == 200
    return json.loads(body)


@pytest.fixture(scope="module")
def post_routes(srv, spec, model):
    """Every POST path of the schema (with the served model's name), plus each one's trailing-slash twin where the
    server has one."""
    # KServe's versioned paths: the model's one version ("1": the tiny model has no revision).
    paths = sorted(
        p.replace("{name}", model).replace("{version}", "1") for p, ops in spec["paths"].items() if "post" in ops
    )
    assert set(ORIGINAL) <= set(paths), paths
    out = []
    for p in paths:
        out.append(p)
        if not p.endswith("/") and send(srv, "POST", p + "/", b"{}")[0] != 404:
            out.append(p + "/")
    assert {r + "/" for r in ORIGINAL} <= set(out), out
    return out


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Token ids and greedy completions computed without the server."""
    import torch
    from tokenizers import Tokenizer
    from transformers import BloomForCausalLM

    tok = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    lm = BloomForCausalLM.from_pretrained(tiny_model_dir).eval()

    class Ref:
        def ids(self, text: str) -> list[int]:
            return tok.encode(text).ids

        def greedy(self, text: str, n: int) -> tuple[str, int]:
            ids = tok.encode(text).ids
            with torch.inference_mode():
                out = lm.generate(
                    torch.tensor([ids]),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    max_new_tokens=n,
                    do_sample=False,
                    pad_token_id=3,
                    eos_token_id=2,
                )
            new = out[0, len(ids) :].tolist()
            if 2 in new:
                new = new[: new.index(2) + 1]
            return tok.decode(new, skip_special_tokens=True), len(new)

    return Ref()


# ------------------------------------------------------------------------------------------------------------ sending


def send(
    srv,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict | None = None,
    timeout: float = ANSWER_TIMEOUT_S,
) -> tuple[int, bytes, dict]:
    """One request on its own connection; raises on a dropped connection or when no answer comes within `timeout`."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)
    try:
        hdrs = {"Content-Type": "application/json"} if headers is None else headers
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def post_json(srv, path: str, obj) -> tuple[int, dict]:
    status, body, _ = send(srv, "POST", path, json.dumps(obj, ensure_ascii=False).encode())
    return status, _json(body)


def _json(body: bytes):
    return json.loads(body.decode("utf-8"))


def message_of(err: dict) -> str:
    """The error message of any of the server's error shapes (bloom, TGI, KServe: a string `error` and `message`;
    OpenAI: {"error": {"message", ...}})."""
    e = err.get("error")
    if isinstance(e, dict):
        return e.get("message") or ""
    return err.get("message") or (e if isinstance(e, str) else "")


def assert_clear_4xx(status: int, body: bytes, *, allowed=(400, 404, 405, 413, 415, 422), context="") -> dict:
    assert status in allowed, f"{context}: {status} {body[:400]!r}"
    err = _json(body)
    assert isinstance(err, dict) and message_of(err), (context, err)
    return err


def after(srv, context: str) -> None:
    srv.assert_alive(context)
    good_request_succeeds(srv)


def known(case: str, path: str) -> bool:
    return (case, path) in KNOWN_BUGS


class noisy_log:
    """Marks the server log written inside the block as the known-noisy part of a test (see NOISY_LOG_TESTS)."""

    def __init__(self, srv, name: str):
        self.srv = srv
        self.noisy = name in NOISY_LOG_TESTS

    def __enter__(self):
        self.start = self.srv.log_path.stat().st_size

    def __exit__(self, *exc):
        if self.noisy:
            time.sleep(0.5)  # the server logs after it answered
            NOISY_LOG.append((self.start, self.srv.log_path.stat().st_size))


def many_prompts_body(path: str, model: str, n: int) -> dict:
    """A body asking for `n` prompts (or as close as the surface allows) on `path`."""
    p = path.rstrip("/")
    if p in ("/generate", "/tokenize"):
        return {"text": ["x"] * n, "max_new_tokens": 2}
    if p == "/forward":
        return {"conditioning_text": ["x"] * n, "response": ["y"] * n}
    if p == "/v1/completions":
        return {"model": model, "prompt": ["x"] * n, "max_tokens": 2}
    if p == "/v1/chat/completions":
        return {"model": model, "messages": [{"role": "user", "content": "x"}] * n, "max_tokens": 2}
    if p.endswith("/infer"):
        return {"inputs": [{"name": "text", "shape": [n], "datatype": "BYTES", "data": ["x"] * n}]}
    if p.endswith(":predict"):
        return {"instances": ["x"] * n}
    return {"inputs": "x " * n, "parameters": {"max_new_tokens": 2}}  # TGI: one prompt, n words


# -------------------------------------------------------------------------------------------------------- huge bodies


def test_bodies_over_the_limit_get_413_on_every_post_route(srv, post_routes):
    big = b'{"text": ["' + b"a" * (2 * BODY_LIMIT) + b'"]}'
    with noisy_log(srv, "oversized"):
        for path in post_routes:
            status, body, _ = send(srv, "POST", path, big)
            assert_clear_4xx(status, body, allowed=(413,), context=path)
            assert str(BODY_LIMIT) in message_of(_json(body)), body
            after(srv, path)


def test_the_limit_is_exact(srv):
    """A valid body of exactly the limit is served; one byte more is a 413."""
    base = json.dumps({"text": ["Hello"], "max_new_tokens": 2}).encode()
    exact = base + b" " * (BODY_LIMIT - len(base))
    assert len(exact) == BODY_LIMIT
    status, body, _ = send(srv, "POST", "/generate", exact)
    assert status == 200, body[:300]
    status, body, _ = send(srv, "POST", "/generate", exact + b" ")
    err = assert_clear_4xx(status, body, allowed=(413,))
    assert err["field"] == "body" and err["limit"] == BODY_LIMIT, err
    after(srv, "limit + 1")


def _chunked(srv, path: str, total: int, chunk: int = 1 << 16) -> tuple[int, bytes]:
    """A body without Content-Length (chunked), so only counting the bytes as they arrive can stop it."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=ANSWER_TIMEOUT_S) as s:
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
        )
        sent = 0
        try:
            s.sendall(b'%x\r\n{"text": ["\r\n' % len(b'{"text": ["'))
            while sent < total:
                s.sendall(b"%x\r\n" % chunk + b"a" * chunk + b"\r\n")
                sent += chunk
            s.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server may answer and close before everything was sent
        data = b""
        while True:
            try:
                part = s.recv(65536)
            except OSError:
                break
            if not part:
                break
            data += part
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        size, _, rest = body.partition(b"\r\n")
        body = rest[: int(size, 16)]
    return status, body


def test_chunked_body_over_the_limit_gets_413(srv, post_routes):
    with noisy_log(srv, "chunked"):
        for path in post_routes:
            status, body = _chunked(srv, path, 3 * BODY_LIMIT)
            assert_clear_4xx(status, body, allowed=(413,), context=path)
            after(srv, "chunked " + path)


def test_ten_thousand_prompts_are_refused_naming_the_limit(srv, post_routes, model):
    for path in post_routes:
        status, raw, _ = send(srv, "POST", path, json.dumps(many_prompts_body(path, model, 10_000)).encode())
        err = assert_clear_4xx(status, raw, allowed=(400, 413, 422), context=path)
        if path.rstrip("/") in ORIGINAL:
            field = "conditioning_text" if path.rstrip("/") == "/forward" else "text"
            assert status == 422 and err["field"] == field and err["limit"] == MAX_BATCH, err
            assert "10000" in err["message"], err
        after(srv, "10,000 prompts " + path)
    # 10,000 prompts that together pass the body limit: refused before parsing
    status, raw, _ = send(srv, "POST", "/generate", json.dumps({"text": ["word " * 30] * 10_000}).encode())
    assert_clear_4xx(status, raw, allowed=(413,))
    after(srv, "10,000 long prompts")


# ------------------------------------------------------------------------------------------------------- malformed JSON


def test_deeply_nested_json_is_a_4xx(srv, post_routes):
    depth = 100_000
    bodies = {
        "arrays": b"[" * depth + b"]" * depth,
        "objects": b'{"a":' * depth + b"1" + b"}" * depth,
        "in the text field": b'{"text": ' + b"[" * depth + b'"x"' + b"]" * depth + b"}",
        "in an unknown field": b'{"text": ["x"], "max_new_tokens": 2, "extra": ' + b"[" * depth + b"]" * depth + b"}",
    }
    for path in post_routes:
        if known("nested", path):
            continue
        for name, raw in bodies.items():
            status, body, _ = send(srv, "POST", path, raw)
            assert_clear_4xx(status, body, allowed=(400, 422), context=f"{name} {path}")
        after(srv, "nested " + path)
    # Nesting Python's parser handles (depth 500) in a field the server ignores: served as if it were not there.
    raw = b'{"text": ["Hello"], "max_new_tokens": 2, "extra": ' + b"[" * 500 + b"]" * 500 + b"}"
    status, body, headers = send(srv, "POST", "/generate", raw)
    assert status == 200 and headers.get("x-ignored-fields") == "extra", body[:300]


def test_huge_integers_are_a_4xx(srv, post_routes):
    """An integer of 5,000 digits: Python refuses to parse it (int_max_str_digits)."""
    for path in post_routes:
        status, body, _ = send(srv, "POST", path, b'{"text": ["x"], "max_new_tokens": 1' + b"0" * 5000 + b"}")
        assert_clear_4xx(status, body, allowed=(400, 422), context=path)
    after(srv, "huge integers")


NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", '"NaN"', '"inf"', '"-Infinity"']
FLOAT_FIELDS = [
    "temperature",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "max_time",
    "diversity_penalty",
]
INT_FIELDS = ["max_new_tokens", "top_k", "min_length", "no_repeat_ngram_size", "eos_token_id"]


@pytest.mark.parametrize("literal", NON_FINITE)
def test_nan_and_infinity_are_refused_naming_the_field(srv, literal, model):
    for field in FLOAT_FIELDS + INT_FIELDS:
        extra = ', "do_sample": true' if field in ("temperature", "top_p", "typical_p") else ""
        raw = f'{{"text": ["Hello"], "{field}": {literal}{extra}}}'.encode()
        status, body, _ = send(srv, "POST", "/generate", raw)
        err = assert_clear_4xx(status, body, allowed=(422,), context=f"{field}={literal}")
        # a union type adds its branch ("eos_token_id.int"): the field is still named first
        assert err["field"].split(".")[0] == field and field in err["message"], err
    raw = f'{{"text": ["Hello"], "exponential_decay_length_penalty": [1, {literal}]}}'.encode()
    status, body, _ = send(srv, "POST", "/generate", raw)
    err = assert_clear_4xx(status, body, allowed=(422,))
    assert err["field"].startswith("exponential_decay_length_penalty"), err
    # the other surfaces' numbers
    for path, raw in [
        ("/generate", f'{{"inputs": "Hello", "parameters": {{"temperature": {literal}, "do_sample": true}}}}'),
        ("/generate_stream", f'{{"inputs": "Hello", "parameters": {{"top_p": {literal}}}}}'),
        ("/v1/completions", f'{{"model": "{model}", "prompt": "Hello", "temperature": {literal}}}'),
        ("/v1/completions", f'{{"model": "{model}", "prompt": "Hello", "top_p": {literal}}}'),
        (f"/v1/models/{model}:predict", f'{{"instances": ["Hello"], "parameters": {{"temperature": {literal}}}}}'),
    ]:
        status, body, _ = send(srv, "POST", path, raw.encode())
        err = assert_clear_4xx(status, body, allowed=(400, 422), context=f"{path} {raw}")
        assert any(f in message_of(err) for f in ("temperature", "top_p")), err
    if not literal.startswith('"'):  # as a prompt ("NaN" in quotes is just text)
        for path, raw in [
            ("/generate", f'{{"text": [{literal}]}}'),
            ("/tokenize", f'{{"text": [{literal}]}}'),
            ("/forward", f'{{"conditioning_text": ["a"], "response": [{literal}]}}'),
        ]:
            status, body, _ = send(srv, "POST", path, raw.encode())
            assert_clear_4xx(status, body, allowed=(422,), context=f"{path} {literal}")
    after(srv, literal)


def test_booleans_are_refused_where_numbers_are_expected(srv, model):
    """true is not 1: a 4xx naming the field on every surface. Strings are still parsed as the original did."""
    for path, body, field in [
        ("/generate", {"text": ["Hello"], "max_new_tokens": True}, "max_new_tokens"),
        ("/generate", {"text": ["Hello"], "eos_token_id": True}, "eos_token_id"),
        ("/generate", {"text": ["Hello"], "do_sample": True, "temperature": True}, "temperature"),
        (
            "/generate",
            {"text": ["Hello"], "exponential_decay_length_penalty": [True, 1.0]},
            "exponential_decay_length_penalty",
        ),
        ("/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": True}}, "max_new_tokens"),
        ("/generate_stream", {"inputs": "Hello", "parameters": {"top_k": False}}, "top_k"),
        ("/v1/completions", {"model": model, "prompt": "Hello", "max_tokens": True}, "max_tokens"),
        ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "x"}], "n": True}, "n"),
        (
            f"/v1/models/{model}:predict",
            {"instances": ["Hello"], "parameters": {"max_new_tokens": True}},
            "max_new_tokens",
        ),
    ]:
        status, err = post_json(srv, path, body)
        assert status in (400, 422) and field in message_of(err), (path, body, status, err)
    status, out = post_json(srv, "/generate", {"text": ["Hello"], "max_new_tokens": "2", "do_sample": "false"})
    assert status == 200 and out["num_generated_tokens"][0] <= 2, out
    after(srv, "booleans")


def test_invalid_utf8_is_a_4xx(srv, post_routes):
    bad = {
        "lone continuation byte": b"\x80",
        "0xff 0xfe": b"\xff\xfe",
        "overlong slash": b"\xc0\xaf",
        "truncated sequence": b"\xe2\x82",
        "surrogate encoded (CESU-8)": b"\xed\xa0\x80",
        "beyond U+10FFFF": b"\xf4\x90\x80\x80",
    }
    for path in post_routes:
        for name, seq in bad.items():
            if known(name, path):
                continue
            raw = b'{"text": ["ab' + seq + b'cd"], "inputs": "ab' + seq + b'cd", "prompt": "ab' + seq + b'cd"}'
            status, body, _ = send(srv, "POST", path, raw)
            assert_clear_4xx(status, body, allowed=(400, 422), context=f"{name} {path}")
        after(srv, "invalid utf-8 " + path)


@pytest.mark.parametrize("path,key", [("/generate", "text"), ("/tokenize", "text"), ("/forward", "response")])
def test_lone_surrogate_escape_is_refused_naming_the_field(srv, path, key):
    cond = '"conditioning_text": ["a"], ' if key == "response" else ""
    for escape in ("\\ud800", "\\udfff", "a\\ud83d"):
        status, body, _ = send(srv, "POST", path, f'{{{cond}"{key}": ["{escape}"]}}'.encode())
        err = assert_clear_4xx(status, body, allowed=(422,), context=escape)
        assert err["field"] == f"{key}[0]", err
    after(srv, "surrogate " + path)


def surrogate_cases(model: str) -> list[tuple[str, str, str]]:
    """(path, body with a lone surrogate escape, the field an answer must name): one text field of each kind on
    every surface, streamed and not, and a field the server ignores (it would be echoed in x-ignored-fields)."""
    infer = '{"id": "a\\ud800b", "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}'
    return [
        ("/v1/completions", f'{{"model": "{model}", "prompt": "a\\ud800b", "echo": true, "max_tokens": 2}}', "prompt"),
        (
            "/v1/completions",
            f'{{"model": "{model}", "prompt": "a\\ud800b", "echo": true, "max_tokens": 2, "stream": true}}',
            "prompt",
        ),
        ("/v1/completions", f'{{"model": "{model}", "prompt": ["x", "\\udfff"], "max_tokens": 2}}', "prompt[1]"),
        ("/v1/completions", f'{{"model": "{model}", "prompt": "x", "stop": "\\ud83d", "max_tokens": 2}}', "stop"),
        (
            "/v1/chat/completions",
            f'{{"model": "{model}", "messages": [{{"role": "user", "content": "a\\ud800"}}], '
            '"max_tokens": 2, "stream": true}',
            "messages[0].content",
        ),
        (f"/v2/models/{model}/infer", infer, "id"),
        (
            f"/v2/models/{model}/infer",
            infer.replace('"a\\ud800b"', '"r"').replace('["x"]', '["\\udc00"]'),
            "inputs[0].data[0]",
        ),
        (f"/v1/models/{model}:predict", '{"instances": ["\\ud800"]}', "instances[0]"),
        ("/generate", '{"inputs": "a\\ud800b", "parameters": {"max_new_tokens": 2}}', "inputs"),
        ("/generate_stream", '{"inputs": "a\\ud800b", "parameters": {"max_new_tokens": 2}}', "inputs"),
        (
            "/",
            '{"inputs": "x", "parameters": {"max_new_tokens": 2, "stop": ["\\ud800"]}, "stream": true}',
            "parameters.stop[0]",
        ),
        ("/generate", '{"text": ["x"], "max_new_tokens": 2, "note": "\\ud800"}', "note"),
        ("/tokenize", '{"text": "\\ud800"}', "text"),
    ]


def test_lone_surrogate_escapes_are_a_4xx_naming_the_field_on_every_surface(srv, model):
    """A lone surrogate written as a JSON escape is valid JSON but no text: a 4xx naming the field, before anything
    runs (also on streams: no 200 and a silent end)."""
    for path, raw, field in surrogate_cases(model):
        status, body, headers = send(srv, "POST", path, raw.encode())
        err = assert_clear_4xx(status, body, allowed=(400, 422), context=f"{path} {raw}")
        assert field in message_of(err), (path, field, err)
        named = err["error"]["param"] if isinstance(err.get("error"), dict) else err["field"]
        assert named == field, (path, err)
    # a field name that is a lone surrogate
    status, body, _ = send(srv, "POST", "/generate", b'{"text": ["x"], "max_new_tokens": 2, "\\ud800": 1}')
    err = assert_clear_4xx(status, body, allowed=(422,))
    assert "field name" in err["message"], err
    # a surrogate pair is one character, and escaped backslashes are text: both are served
    status, out = post_json(srv, "/tokenize", {"text": ["\U0001f600 \\ud800"]})
    assert status == 200, out
    raw = b'{"text": ["\\ud83d\\ude00 \\\\ud800"]}'
    status, body, _ = send(srv, "POST", "/tokenize", raw)
    assert status == 200 and _json(body)["token_ids"] == out["token_ids"], body
    after(srv, "surrogate escapes")


def test_raw_control_characters_in_json_strings_are_malformed_json(srv):
    for byte in (0x00, 0x07, 0x0A, 0x1B, 0x1F):
        raw = b'{"text": ["a' + bytes([byte]) + b'b"]}'
        status, body, _ = send(srv, "POST", "/generate", raw)
        err = assert_clear_4xx(status, body, allowed=(422,))
        assert err["field"] == "body" and "malformed JSON" in err["message"], err
    after(srv, "raw control characters")


# ------------------------------------------------------------------------------------------ odd prompts, correct answers

CONTROL = "".join(chr(c) for c in range(0x20)) + "\x7f\x85\u2028\u2029\u200b\ufeff\u202e"
ODD_PROMPTS = [
    *SPECIAL,
    "".join(SPECIAL),
    "</s>" * 40,
    "<pad>" * MAX_INPUT,  # exactly the max input length, all padding tokens
    "<unk>" * 7 + "Hello",
    CONTROL,
    "a\x00b\x07c\x1b[31mred\x1b[0m",
    "\t\n\r",
    "\U0001f600" * 10,
    "\u0301\u0301\u0301",  # combining marks with nothing to combine with
]


@pytest.mark.parametrize("prompt", ODD_PROMPTS, ids=[f"odd{i}" for i in range(len(ODD_PROMPTS))])
def test_special_token_and_control_character_prompts_get_correct_answers(srv, reference, model, prompt):
    ids = reference.ids(prompt)
    assert 0 < len(ids) <= MAX_INPUT
    status, out = post_json(srv, "/tokenize", {"text": [prompt]})
    assert status == 200 and out["token_ids"] == [ids], out

    want, want_n = reference.greedy(prompt, 8)
    for path in ("/generate", "/generate/"):
        status, out = post_json(srv, path, {"text": [prompt], "max_new_tokens": 8})
        assert status == 200 and out["text"] == [want] and out["num_generated_tokens"] == [want_n], (out, want)
    # the same greedy answer on every other surface
    status, out = post_json(srv, "/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 8}})
    assert status == 200 and out["generated_text"] == want, out
    status, out = post_json(
        srv, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    )
    assert status == 200 and out["choices"][0]["text"] == want, out
    status, out = post_json(
        srv, f"/v1/models/{model}:predict", {"instances": [prompt], "parameters": {"max_new_tokens": 8}}
    )
    assert status == 200 and out["predictions"] == [want], out
    status, out = post_json(
        srv,
        f"/v2/models/{model}/infer",
        {
            "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [prompt]}],
            "parameters": {"max_new_tokens": 8},
        },
    )
    assert status == 200 and out["outputs"][0]["data"] == [want], out

    status, out = post_json(srv, "/forward", {"conditioning_text": [prompt], "response": [" there"]})
    assert status == 200 and math.isfinite(out["nll"]) and out["nll"] > 0, out
    # and as the response whose likelihood is asked for
    status, out = post_json(srv, "/forward", {"conditioning_text": ["Hello"], "response": [prompt]})
    assert status == 200 and math.isfinite(out["nll"]), out
    srv.assert_alive(repr(prompt))


def test_very_long_single_tokens(srv, reference):
    """Words of hundreds of thousands of characters with no space to split on: refused by length on /generate and
    /forward, tokenized exactly on /tokenize (which has no length limit), each in bounded time."""
    rnd = random.Random(7)
    words = {
        "ascii": "a" * 200_000,
        "digits": "".join(rnd.choice("0123456789") for _ in range(200_000)),
        "cjk": "".join(chr(rnd.randrange(0x4E00, 0x9FFF)) for _ in range(80_000)),
        "emoji": "\U0001f600" * 60_000,
    }
    for name, word in words.items():
        raw = json.dumps({"text": [word]}, ensure_ascii=False).encode()
        assert len(raw) < BODY_LIMIT
        t0 = time.monotonic()
        status, body, _ = send(srv, "POST", "/generate", raw)
        err = assert_clear_4xx(status, body, allowed=(422,), context=name)
        assert err["field"] == "text[0]" and err["limit"] == MAX_INPUT, err
        status, body, _ = send(srv, "POST", "/tokenize", raw)
        assert status == 200, body[:300]
        assert _json(body)["token_ids"] == [reference.ids(word)], name
        fwd = json.dumps({"conditioning_text": ["a"], "response": [word]}, ensure_ascii=False).encode()
        status, body, _ = send(srv, "POST", "/forward", fwd)
        err = assert_clear_4xx(status, body, allowed=(422,), context=name)
        assert err["limit"] == MAX_TOTAL, err
        tgi = json.dumps({"inputs": word, "parameters": {"max_new_tokens": 2}}, ensure_ascii=False).encode()
        for path in ("/generate", "/generate_stream", "/"):
            status, body, _ = send(srv, "POST", path, tgi)
            assert_clear_4xx(status, body, allowed=(422,), context=f"{name} {path}")
        assert time.monotonic() - t0 < 15, name
        after(srv, "long word " + name)


# ----------------------------------------------------------------------------------------------- content types, methods


def test_wrong_content_types_are_a_4xx(srv, post_routes):
    cases = [
        ("text/plain", b"just some text"),
        ("application/xml", b"<text>Hello</text>"),
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; name="text"\r\n\r\nHello\r\n--x--\r\n',
        ),
        ("application/octet-stream", bytes(range(256))),
        ("image/png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64),
        ("application/x-www-form-urlencoded", b"text=Hello&max_new_tokens=2"),
        ("application/json; charset=latin-1", '{"text": ["caf\xe9 cr\xe8me"]}'.encode("latin-1")),
    ]
    for path in post_routes:
        for ctype, raw in cases:
            status, body, _ = send(srv, "POST", path, raw, {"Content-Type": ctype})
            assert_clear_4xx(status, body, allowed=(400, 415, 422), context=f"{ctype} {path}")
        after(srv, "content types " + path)


def test_json_under_other_content_types_is_never_a_5xx(srv, post_routes):
    """A valid JSON body labelled as something else: refused (4xx) or served as JSON, the server's choice."""
    for path in post_routes:
        raw = json.dumps({"text": ["Hello"], "max_new_tokens": 2}).encode()
        for ctype in ("text/plain", "application/json; charset=utf-8", "application/vnd.api+json", ""):
            status, body, _ = send(srv, "POST", path, raw, {"Content-Type": ctype} if ctype else {})
            assert status in (200, 400, 404, 415, 422), (path, ctype, status, body[:300])
            assert _json(body), body[:300]
    after(srv, "json under other types")


def test_json_labelled_text_plain_is_read_as_json_on_every_route(srv, post_routes, model):
    """One rule for every route: a body without a type, with curl's form type or with text/plain is JSON."""
    for path in post_routes:
        raw = json.dumps(many_prompts_body(path, model, 1)).encode()
        want = send(srv, "POST", path, raw)[0]
        assert want == 200, (path, want)
        for ctype in ("text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded"):
            status, body, _ = send(srv, "POST", path, raw, {"Content-Type": ctype})
            assert status == want, (path, ctype, status, body[:300])
    after(srv, "text/plain")


def test_head_is_answered_wherever_get_is(srv, spec, model):
    """HEAD gets GET's status and headers, without the body, on every GET route (probes, pages, the API)."""
    paths = [p.replace("{name}", model) for p, ops in spec["paths"].items() if "get" in ops]
    assert {"/health", "/ready", "/metrics", "/", "/v1/models"} <= set(paths) | {"/docs", "/openapi.json"}, paths
    for path in paths + ["/docs", "/openapi.json"]:
        want, _, want_headers = send(srv, "GET", path, headers={})
        status, body, headers = send(srv, "HEAD", path, headers={})
        assert status == want and body == b"", (path, status, want)
        assert headers.get("content-type") == want_headers.get("content-type"), (path, headers)
    after(srv, "HEAD")


def test_wrong_methods_and_unknown_paths(srv, spec, model):
    for path, ops in spec["paths"].items():
        concrete = path.replace("{name}", model)
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
            if method.lower() in ops:
                continue
            status, body, headers = send(srv, method, concrete, b"{}")
            # 404 where another route's pattern takes the path (GET /v1/models/{name} takes ".../x:predict")
            assert_clear_4xx(status, body, allowed=(404, 405), context=f"{method} {path}")
            assert status == 404 or headers.get("allow"), headers
    for path in (
        "/nope",
        "//generate",
        "/generate//",
        "/generate/x",
        "/v1/models/",
        "/%00",
        "/..%2f..%2fetc%2fpasswd",
        "/v2/models/" + "x" * 5000 + "/infer",
    ):
        status, body, _ = send(srv, "POST", path, b"{}")
        assert_clear_4xx(status, body, allowed=(400, 404, 405), context=path)
    after(srv, "methods and paths")


# ---------------------------------------------------------------------------------------------------- clients that stall


def test_stalled_and_vanishing_clients_do_not_block_others(srv):
    with noisy_log(srv, "stalled"):
        stalled = []
        for _ in range(5):  # declared 1000 bytes, sent 10, then silence
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            s.sendall(
                b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n"
                b'{"text": ['
            )
            stalled.append(s)
        for _ in range(5):  # a generate request whose client hangs up before the answer
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            raw = json.dumps({"text": ["Hello"], "max_new_tokens": MAX_NEW, "min_length": 1000}).encode()
            s.sendall(
                b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(raw) + raw
            )
            s.close()
        try:
            for _ in range(3):
                t0 = time.monotonic()
                good_request_succeeds(srv)
                assert time.monotonic() - t0 < 5
        finally:
            for s in stalled:
                s.close()
        after(srv, "stalled clients")


# --------------------------------------------------------------------------------------------------------- the log


def test_nothing_unexpected_was_logged(srv):
    """Runs last: apart from the known-noisy tests (NOISY_LOG_TESTS), the server logged no traceback, no
    "unexpected error" and no status 500: every hostile input above was handled as a client error."""
    time.sleep(0.5)
    log = srv.log_path.read_bytes()
    for start, end in sorted(NOISY_LOG, reverse=True):
        log = log[:start] + log[end:]
    assert b"Traceback" not in log and b"unexpected error" not in log, log.decode(errors="replace")[-5000:]
    assert b"status=500" not in log and b'" 500 ' not in log, "a 500 was logged"
    srv.assert_alive("end of the hostile input tests")
