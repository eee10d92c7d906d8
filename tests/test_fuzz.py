"""Fuzzing every route of the server's own OpenAPI schema with schemathesis, on a real server process (tiny model).

Every operation that /openapi.json lists gets up to BLOOM_FUZZ_EXAMPLES (200) generated cases (valid and invalid bodies,
parameters and headers; Hypothesis with derandomize), and the routes' trailing-slash twins
get every third case again. What must hold for every case:
- no 5xx, no dropped connection, no response slower than the request timeout, and the process stays up (and under
  the memory guard) to the last case;
- the status is one the operation declares, or one of the framework's own 4xx (404, 405): an unparseable body gets
  the 422 (400 on the OpenAI and KServe routes) that its route declares;
- the body matches the schema declared for that status (response_schema_conformance), with the declared content
  type and headers; every error body, declared or not, is one a client can read (a string `error` with a message, or
  OpenAI's {"error": {"message", ...}});
- a trailing-slash twin answers with the same status as its route.

No input is avoided: the input bugs found by this fuzzing (docs/reliability.md, "Bugs found") are fixed, and it guards
them.

The server runs with --max-new-tokens 16 (OpenAI's default max_tokens) and the tiny model, so hundreds of generate
calls per route stay cheap on 2 cores.
"""

from __future__ import annotations

import collections
import os
import time

import pytest
import requests
import schemathesis  # in the `test` extra of pyproject.toml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
)

from reliability_support import start_server

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("BLOOM_FUZZ_EXAMPLES", "200"))
REQUEST_TIMEOUT_S = 30
# Routes registered twice (with and without the trailing slash; the twin is not in the schema).
SLASH_TWINS = {"/generate", "/tokenize", "/forward", "/query_id"}
FRAMEWORK_4XX = {404, 405}

STATS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
STARTED = time.monotonic()


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir, tmp_path_factory):
    srv = start_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("fuzz") / "server.log",
        "--max-input-length",
        "32",
        "--max-new-tokens",
        "16",  # OpenAI's default max_tokens; still cheap with the tiny model
        "--max-total-tokens",
        "48",
        "--max-batch-size",
        "8",
        "--batch-wait-ms",
        "1",
        # the tiny tokenizer has no chat template: give one, so /v1/chat/completions reaches the engine
        env={"BLOOM_CHAT_TEMPLATE": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"},
    )
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json", timeout=30)
    schema.config.generation.update(modes=["positive", "negative"], max_examples=EXAMPLES)
    return schema


# ------------------------------------------------------------------------------------------------------------ checks


def _error_shape(case, response) -> None:
    """An error is JSON a client can read: a string `error` with a non-empty `message` (the bloom, TGI and KServe
    shapes), or OpenAI's {"error": {"message", ...}}; or, for a status the operation declares, its declared schema
    (checked by response_schema_conformance)."""
    if response.status_code < 400:
        return
    body = response.json()
    assert isinstance(body, dict), body
    err = body.get("error")
    if isinstance(err, dict):
        assert isinstance(err.get("message"), str) and err["message"], body
    elif err is not None:
        assert isinstance(err, str) and isinstance(body.get("message", err), str) and (body.get("message") or err), body
    else:
        declared = set(case.operation.responses.status_codes)
        assert str(response.status_code) in declared or "default" in declared, (response.status_code, body)


def _status_in_contract(case, response) -> None:
    declared = {int(s) for s in case.operation.responses.status_codes if s.isdigit()}
    assert response.status_code in declared | FRAMEWORK_4XX, (
        f"{case.operation.label}: status {response.status_code} is neither declared ({sorted(declared)}) nor one of "
        f"the framework's own {sorted(FRAMEWORK_4XX)}: {response.text[:500]}"
    )


CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance, response_headers_conformance]


def _one_case(case, srv) -> None:
    label = case.operation.label
    try:
        response = case.call(base_url=srv.url, timeout=REQUEST_TIMEOUT_S)
    except requests.RequestException as exc:
        srv.assert_alive(f"{label}: no response ({exc})")
        raise AssertionError(f"{label}: no response: {exc}") from exc
    STATS[label][response.status_code] += 1
    case.validate_response(response, checks=CHECKS)
    _status_in_contract(case, response)
    _error_shape(case, response)

    if case.operation.path in SLASH_TWINS and sum(STATS[label].values()) % 3 == 1:  # every third case
        kwargs = case.as_transport_kwargs(base_url=srv.url)
        kwargs["url"] = kwargs["url"].replace(case.operation.path, case.operation.path + "/", 1)
        twin = requests.request(**kwargs, timeout=REQUEST_TIMEOUT_S, allow_redirects=False)
        STATS[label + " (slash)"][twin.status_code] += 1
        assert twin.status_code == response.status_code, (
            label,
            twin.status_code,
            response.status_code,
            twin.text[:300],
        )
        _error_shape(case, twin)
    srv.assert_alive(label)


def _strategy(op, model_name: str):
    parts = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        try:
            parts.append(op.as_strategy(generation_mode=mode))
        except Exception:  # noqa: BLE001 - an operation with nothing to make invalid has no negative strategy
            pass
    if "{name}" in op.path:  # also the model that exists, not only names that do not
        parts.append(op.as_strategy(path_parameters={"name": model_name}))
    return st.one_of(*parts)


def test_every_route_answers_within_its_declared_schema(fuzz_server, api_schema, tiny_model_dir):
    """One Hypothesis run per operation (no shrinking: the failing case is printed as found); every operation runs
    even when an earlier one failed, and all failures are reported together."""
    failures = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 7, [op.label for op in operations]
    for op in operations:

        @given(case=_strategy(op, tiny_model_dir.name))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],
            report_multiple_bugs=False,
        )
        def run(case):
            _one_case(case, fuzz_server)

        try:
            run()
        except Exception as exc:  # noqa: BLE001 - collected, reported below
            failures.append(f"{op.label}: {type(exc).__name__}: {str(exc)[:3000]}")
            if not fuzz_server.alive():
                break
    assert not failures, "\n\n".join(failures)


def corpus(model: str) -> list[tuple[str, dict]]:
    """Inputs that once gave a 500, a stream without its end, or a number read from a boolean (docs/reliability.md,
    "Bugs found"): replayed on every run through the same checks as the generated cases, so that they stay fixed."""
    infer = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    return [
        ("POST /v1/completions", {"model": model, "prompt": "a\ud800b", "echo": True, "max_tokens": 2}),
        ("POST /v1/completions", {"model": model, "prompt": "a\ud800b", "echo": True, "max_tokens": 2, "stream": True}),
        ("POST /v1/completions", {"model": model, "prompt": "x", "stop": ["\udfff"], "max_tokens": 2}),
        (
            "POST /v1/chat/completions",
            {"model": model, "messages": [{"role": "user", "content": "\ud800"}], "stream": True, "max_tokens": 2},
        ),
        ("POST /v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "x"}], "n": True}),
        ("POST /v2/models/{name}/infer", {"id": "a\ud800b", **infer}),
        ("POST /v2/models/{name}/infer", {"inputs": [dict(infer["inputs"][0], data=["\udc00"])]}),
        ("POST /v1/models/{name}:predict", {"instances": ["\ud800"], "parameters": {"max_new_tokens": True}}),
        ("POST /generate", {"text": ["x"], "max_new_tokens": True}),
        ("POST /generate", {"text": ["x"], "eos_token_id": True}),
        ("POST /generate", {"text": ["\ud800"], "max_new_tokens": 2}),
        ("POST /generate", {"inputs": "a\ud800b", "parameters": {"max_new_tokens": 2}}),
        ("POST /generate_stream", {"inputs": "a\ud800b", "parameters": {"max_new_tokens": 2}}),
        ("POST /generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": True}}),
        ("POST /", {"inputs": "x", "parameters": {"max_new_tokens": 2, "stop": ["\ud800"]}, "stream": True}),
        ("POST /tokenize", {"text": "\ud800"}),
        ("POST /forward", {"conditioning_text": ["a"], "response": ["\udfff"]}),
    ]


def test_the_corpus_of_past_bugs_answers_within_the_declared_schema(fuzz_server, api_schema, tiny_model_dir):
    operations = {op.label: op for op in (result.ok() for result in api_schema.get_all_operations())}
    for label, body in corpus(tiny_model_dir.name):
        op = operations[label]
        params = {"name": tiny_model_dir.name} if "{name}" in op.path else None
        case = op.Case(body=body, media_type="application/json", path_parameters=params)
        response = case.call(base_url=fuzz_server.url, timeout=REQUEST_TIMEOUT_S)
        case.validate_response(response, checks=CHECKS)
        _status_in_contract(case, response)
        _error_shape(case, response)
        assert response.status_code in (400, 422), (label, body, response.status_code, response.text[:300])
    fuzz_server.assert_alive("corpus")


def test_fuzzing_reached_every_route_and_the_server_still_serves(fuzz_server, api_schema):
    """Runs after the fuzzing: every operation was exercised, routes with inputs by many cases; a good request
    still gets its answer; the numbers for docs/reliability.md are printed (pytest -s)."""
    fuzz_server.assert_alive("after fuzzing")
    operations = [op.ok() for op in api_schema.get_all_operations()]
    assert operations
    for op in operations:
        n = sum(STATS[op.label].values())
        has_inputs = bool(op.body) or any(True for _ in op.iter_parameters())
        assert n >= (min(50, EXAMPLES // 2) if has_inputs else 1), (op.label, dict(STATS[op.label]))
    status, body = None, None
    r = requests.post(fuzz_server.url + "/generate", json={"text": ["Hello"], "max_new_tokens": 2}, timeout=30)
    status, body = r.status_code, r.json()
    assert status == 200 and body["num_generated_tokens"][0] <= 2, body
    total = sum(sum(c.values()) for c in STATS.values())
    print(
        f"\nfuzz: {total} requests in {time.monotonic() - STARTED:.0f} s, peak RSS {fuzz_server.peak_rss_mib:.0f} MiB"
    )
    for label in sorted(STATS):
        print(f"  {label}: {sum(STATS[label].values())} cases, statuses {dict(sorted(STATS[label].items()))}")
