"""Structured output end to end, on real servers of the embedded tiny model (whose text is gibberish: only the
grammar makes an answer valid). For each backend (hf with dynamic batching, fast with continuous batching): every
schema of the corpus (tests/fixtures/structured/schemas.json, written for these tests) and every regex
(regexes.json) is asked on every route, streamed and not, all at once and mixed with free rows (batches of 32),
then a few one at a time (batch 1); every answer that finished by its grammar validates (jsonschema) or matches.
Bad grammars are a 4xx naming the field before anything is queued; a cut answer says `length`; the openai client's
`.parse()` and tool calls work unchanged."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
from pathlib import Path

import pytest

from helpers import ServerProcess, free_port, http

jsonschema_rs = pytest.importorskip("jsonschema_rs")
pytest.importorskip("llguidance")

FIXTURES = Path(__file__).parent / "fixtures" / "structured"
SCHEMAS = json.loads((FIXTURES / "schemas.json").read_text())
REGEXES = json.loads((FIXTURES / "regexes.json").read_text())
MAX_NEW = 128
ARGS = ["--max-input-length", "64", "--max-new-tokens", "200", "--max-total-tokens", "320", "--max-batch-size", "32"]
# Keywords the grammar engine refuses by name rather than ignore (an answer could break them).
REFUSED = ("uniqueItems",)


def _rfc3339(value: str, time_only: bool) -> bool:
    """RFC 3339 date-time / full-time, leap second (:60) included, as the grammar engine allows it."""
    m = re.fullmatch(r"(?:(\d{4})-(\d{2})-(\d{2})[Tt ])?(\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", value)
    if m is None or (m.group(1) is None) != time_only:
        return False
    if m.group(1) is not None:  # year 0000 is valid RFC 3339 (datetime.date starts at 1)
        y, mo, d = int(m.group(1)), int(m.group(2)), int(m.group(3))
        leap = y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)
        if not 1 <= mo <= 12 or not 1 <= d <= [31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][mo - 1]:
            return False
    return int(m.group(4)) < 24 and int(m.group(5)) < 60 and int(m.group(6)) <= 60


def validator(schema):
    return jsonschema_rs.validator_for(schema, validate_formats=True, formats={
        "date-time": lambda v: _rfc3339(v, False), "time": lambda v: _rfc3339(v, True)})  # fmt: skip


def _sse(resp_text: str) -> list:
    return [
        json.loads(line[6:]) for line in resp_text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"
    ]


def _post_stream(url: str, body: dict) -> tuple[int, list]:
    status, text, _ = http("POST", url, body, timeout=300)
    return status, (_sse(text) if status == 200 and isinstance(text, str) else text)


# Each route, given a TGI-style grammar and an OpenAI response_format: (status, text, finished by the grammar).
def r_generate_original(srv, prompt, tgi, rf):
    s, b, _ = srv.post("/generate", {"text": [prompt], "grammar": tgi, "max_new_tokens": MAX_NEW}, timeout=300)
    return s, (b["text"][0] if s == 200 else b), s == 200 and b["num_generated_tokens"][0] < MAX_NEW


def r_generate_tgi(srv, prompt, tgi, rf):
    s, b, _ = srv.post("/generate", {"inputs": prompt, "parameters": {"grammar": tgi, "max_new_tokens": MAX_NEW,
                                                                      "details": True}}, timeout=300)  # fmt: skip
    return s, (b["generated_text"] if s == 200 else b), s == 200 and b["details"]["finish_reason"] == "eos_token"


def r_compat(srv, prompt, tgi, rf):
    s, b, _ = srv.post("/", {"inputs": prompt, "parameters": {"grammar": tgi, "max_new_tokens": MAX_NEW,
                                                              "details": True}}, timeout=300)  # fmt: skip
    return s, (b[0]["generated_text"] if s == 200 else b), s == 200 and b[0]["details"]["finish_reason"] == "eos_token"


def _tgi_stream(srv, path, prompt, tgi, extra):
    s, events = _post_stream(srv.url + path, {"inputs": prompt, "parameters": {"grammar": tgi,
                                              "max_new_tokens": MAX_NEW}, **extra})  # fmt: skip
    if s != 200:
        return s, events, False
    text = "".join(e["token"]["text"] for e in events)
    assert text == events[-1]["generated_text"]
    return s, text, events[-1]["details"]["finish_reason"] == "eos_token"


def r_generate_stream(srv, prompt, tgi, rf):
    return _tgi_stream(srv, "/generate_stream", prompt, tgi, {})


def r_compat_stream(srv, prompt, tgi, rf):
    return _tgi_stream(srv, "/", prompt, tgi, {"stream": True})


def r_completions(srv, prompt, tgi, rf, stream=False):
    body = {"prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0, "response_format": rf, "stream": stream}
    if not stream:
        s, b, _ = srv.post("/v1/completions", body, timeout=300)
        return s, (b["choices"][0]["text"] if s == 200 else b), s == 200 and b["choices"][0]["finish_reason"] == "stop"
    s, chunks = _post_stream(srv.url + "/v1/completions", body)
    if s != 200:
        return s, chunks, False
    return s, "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"] == "stop"


def r_completions_stream(srv, prompt, tgi, rf):
    return r_completions(srv, prompt, tgi, rf, stream=True)


def r_chat(srv, prompt, tgi, rf, stream=False):
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_NEW,
        "response_format": rf,
        "stream": stream,
        "temperature": 1,
        "seed": 7,
    }  # sampled rows, masked like greedy ones
    if not stream:
        s, b, _ = srv.post("/v1/chat/completions", body, timeout=300)
        if s != 200:
            return s, b, False
        return s, b["choices"][0]["message"]["content"], b["choices"][0]["finish_reason"] == "stop"
    s, chunks = _post_stream(srv.url + "/v1/chat/completions", body)
    if s != 200:
        return s, chunks, False
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    return s, text, chunks[-1]["choices"][0]["finish_reason"] == "stop"


def r_chat_stream(srv, prompt, tgi, rf):
    return r_chat(srv, prompt, tgi, rf, stream=True)


ROUTES = [r_generate_original, r_generate_tgi, r_compat, r_generate_stream, r_compat_stream, r_completions,
          r_completions_stream, r_chat, r_chat_stream]  # fmt: skip


def _free(srv, i):
    """An unconstrained row beside the constrained ones."""
    s, b, _ = srv.post("/generate", {"text": [f"free row {i}"], "max_new_tokens": 40}, timeout=300)
    assert s == 200 and b["num_generated_tokens"][0] >= 1
    return b["text"][0]


def _jobs():
    jobs = []
    for k, case in enumerate(SCHEMAS):
        schema = case["schema"]
        tgi = {"type": "json", "value": schema}
        rf = {"type": "json_schema", "json_schema": {"name": case["name"], "schema": schema, "strict": True}}
        # Two routes per schema, in rotation: every route (streamed and not) sees a dozen schemas, every schema two
        # routes, and the test stays a minute per backend on two CPU cores.
        for route in (ROUTES[k % len(ROUTES)], ROUTES[(k + 4) % len(ROUTES)]):
            jobs.append(("schema", case["name"], schema, route, tgi, rf, f"Give {case['name']} {k}"))
    tgi_routes = (r_generate_original, r_generate_tgi, r_compat, r_generate_stream, r_compat_stream)
    for k, rx in enumerate(REGEXES):
        tgi = {"type": "regex", "value": rx}
        for route in (tgi_routes[k % 5], tgi_routes[(k + 2) % 5]):
            jobs.append(("regex", rx, rx, route, tgi, None, f"Pattern {k}"))
    return jobs


def _check(job, result, stats):
    kind, name, spec, route, tgi, rf, _ = job
    status, text, finished = result
    if kind == "schema" and any(k in json.dumps(spec) for k in REFUSED):
        assert status in (400, 422), (name, route.__name__, status, text)
        assert "uniqueItems" in json.dumps(text)
        return
    assert status == 200, (name, route.__name__, status, text)
    stats["answers"] += 1
    if not finished:
        return
    stats["finished"] += 1
    if kind == "regex":
        assert re.fullmatch(spec, text), (name, route.__name__, text)
    else:
        value = json.loads(text)
        assert validator(spec).is_valid(value), (
            name,
            route.__name__,
            text,
            [str(e)[:200] for e in validator(spec).iter_errors(value)],
        )


@pytest.fixture(scope="module", params=["hf", "fast"])
def srv(request, tiny_model_dir, tmp_path_factory):
    port = free_port()
    with ServerProcess(["--model", str(tiny_model_dir), "--backend", request.param, *ARGS], port,
                       log_path=tmp_path_factory.mktemp("logs") / f"{request.param}.log") as server:  # fmt: skip
        server.backend = request.param
        yield server


@pytest.mark.timeout(600)
def test_corpus_on_every_route_batched_with_free_rows(srv):
    jobs = _jobs()
    assert len({j[1] for j in jobs if j[0] == "schema"}) >= 50
    stats = {"answers": 0, "finished": 0}
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:  # 32 rows at a time: constrained and free together
        free = [pool.submit(_free, srv, i) for i in range(16)]
        futures = [pool.submit(j[3], srv, j[6], j[4], j[5]) for j in jobs]
        results = [f.result(timeout=600) for f in futures]
        assert all(f.result() is not None for f in free)
    for job, result in zip(jobs, results):
        _check(job, result, stats)
    # Not vacuous: most answers end by their grammar within the token budget.
    assert stats["finished"] >= 0.6 * stats["answers"], stats
    assert {j[3] for j in jobs} == set(ROUTES)
    assert time.monotonic() - t0 < 500
    status, _, _ = srv.get("/ready")
    assert status == 200


def test_one_at_a_time(srv):
    stats = {"answers": 0, "finished": 0}
    for job in [j for j in _jobs() if j[3] in (r_generate_tgi, r_chat_stream)][::9][:10]:
        _check(job, job[3](srv, job[6], job[4], job[5]), stats)
    assert stats["finished"] >= 1


def test_cut_answer_says_length(srv):
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    s, b, _ = srv.post("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "json", "value": schema},
                                                                   "max_new_tokens": 3, "details": True}})  # fmt: skip
    assert s == 200 and b["details"]["finish_reason"] == "length" and b["details"]["generated_tokens"] == 3
    # A schema no 3 tokens can complete (json_object could: "{}" is two tokens).
    long = {"type": "object", "properties": {"a": {"type": "string", "minLength": 40}}, "required": ["a"]}
    s, b, _ = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                                                "response_format": {"type": "json_schema",
                                                                    "json_schema": {"name": "long", "schema": long}}})  # fmt: skip
    assert s == 200 and b["choices"][0]["finish_reason"] == "length"


BAD = [
    ({"type": "json", "value": {"type": "object", "properties": {"a": {"type": "strng"}}}}, "strng"),
    ({"type": "json", "value": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
    ({"type": "json", "value": "{not json"}, "not valid JSON"),
    ({"type": "json", "value": [1, 2]}, "must be an object"),
    ({"type": "regex", "value": "(["}, "regex"),
    ({"type": "regex", "value": ""}, "non-empty"),
    ({"type": "yaml", "value": "a"}, "must be"),
    ({"type": "json", "value": {"$ref": "#/$defs/missing"}}, "missing"),
    # compile, but no text matches them: a row would end at once with nothing
    ({"type": "json", "value": {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}}, "no text matches"),
    ({"type": "regex", "value": "[^\\x00-\\x{10FFFF}]"}, "no text matches"),
]


def test_bad_grammars_are_4xx_naming_the_field(srv):
    for grammar, words in BAD:
        s, b, _ = srv.post("/generate_stream", {"inputs": "x", "parameters": {"grammar": grammar}})
        assert s == 422 and b["field"].startswith("parameters.grammar") and words in b["message"], (grammar, b)
        s, b, _ = srv.post("/generate", {"text": ["x"], "grammar": grammar})
        assert s == 422 and b["field"].startswith("grammar") and words in b["message"], (grammar, b)
    s, b, _ = srv.post(
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "two"}},
            },
        },
    )
    assert s == 400 and b["error"]["param"] == "response_format.json_schema.schema", b
    for rf, param in (({"type": "xml"}, "response_format.type"),
                      ({"type": "json_schema"}, "response_format.json_schema"),
                      ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}},
                       "response_format.json_schema.strict")):  # fmt: skip
        s, b, _ = srv.post("/v1/completions", {"prompt": "x", "response_format": rf})
        assert s == 400 and b["error"]["param"] == param, (rf, b)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for choice, param in (("auto", "tool_choice"), ({"type": "function", "function": {"name": "g"}},
                                                    "tool_choice.function.name")):  # fmt: skip
        s, b, _ = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": tools,
                                                    "tool_choice": choice})  # fmt: skip
        assert s == 400 and b["error"]["param"] == param, b
    s, b, _ = srv.post("/generate", {"text": ["x"], "grammar": {"type": "json_object"}, "min_new_tokens": 2})
    assert s == 422 and b["field"] == "min_new_tokens"
    s, b, _ = srv.post("/generate", {"text": ["x"], "grammar": {"type": "regex", "value": "a" * 70000}})
    assert s == 422 and b["field"] == "grammar.value" and b["limit"] == 65536


def test_hostile_grammars_do_not_stall_the_server(srv):
    """Grammars whose automaton explodes are refused (or served) within the grammar engine's limits, quickly, and
    the server answers the next request."""
    nested: dict = {"type": "string"}
    for i in range(300):  # deep, and every level a choice
        nested = {
            "type": "object",
            "properties": {
                "a": nested,
                "b": {"anyOf": [{"type": "integer"}, {"pattern": f"(x|y)*x(x|y){{{i % 30}}}"}]},
            },
        }
    for grammar in ({"type": "regex", "value": "(a|b)*a(a|b){40}"}, {"type": "regex", "value": "[a-z]{100000}"},
                    {"type": "regex", "value": "((a+)+|(b+)+)+c"}, {"type": "json", "value": nested}):  # fmt: skip
        t0 = time.monotonic()
        s, b, _ = srv.post("/generate", {"inputs": "x", "parameters": {"grammar": grammar, "max_new_tokens": 8}},
                           timeout=60)  # fmt: skip
        assert s in (200, 422) and time.monotonic() - t0 < 20, (grammar if len(str(grammar)) < 100 else "nested", b)
    s, b, _ = srv.post("/generate", {"text": ["x"], "max_new_tokens": 2})
    assert s == 200


def test_a_grammar_the_engine_gives_up_on_is_a_422_not_an_answer(srv):
    """A regex that compiles but whose matcher exceeds the grammar engine's limits while generating: the forced
    EOS is not reported as a complete answer; the request gets a 422 naming its grammar field (an error event once a
    stream has started), and the server serves the next request."""
    rx = {"type": "regex", "value": "(ab){300000}"}
    s, b, _ = srv.post("/generate", {"inputs": "x", "parameters": {"grammar": rx, "max_new_tokens": 6}})
    assert s == 422 and b["field"] == "parameters.grammar" and "grammar engine" in b["message"], b
    s, b, _ = srv.post("/generate", {"text": ["x", "y"], "max_new_tokens": 6, "grammar": rx})
    assert s == 422 and b["field"] == "grammar", b
    s, events = _post_stream(
        srv.url + "/generate_stream", {"inputs": "x", "parameters": {"grammar": rx, "max_new_tokens": 6}}
    )
    assert s == 200 and "grammar engine" in events[-1]["error"] and not any(e.get("details") for e in events), events
    s, b, _ = srv.post(
        "/generate", {"text": ["x"], "max_new_tokens": 4, "grammar": {"type": "regex", "value": "[0-9]{3}"}}
    )
    assert s == 200 and b["text"][0].isdigit(), b


def test_log_probabilities_of_constrained_rows_are_json_numbers(srv):
    """Tokens a grammar forbids have probability 0 under the masked scores: asked for alternatives or log-probabilities
    of a constrained answer, every route answers 200 with finite numbers (-9999.0 at the least, as OpenAI's API
    reports such tokens), streamed or not."""
    msgs = [{"role": "user", "content": "x"}]
    s, b, _ = srv.post("/v1/chat/completions", {"messages": msgs, "max_tokens": 3, "logprobs": True, "top_logprobs": 3,
                                                "response_format": {"type": "json_object"}})  # fmt: skip
    assert s == 200, b
    content = b["choices"][0]["logprobs"]["content"]
    assert content and all(len(c["top_logprobs"]) == 3 for c in content)
    values = [c["logprob"] for c in content] + [t["logprob"] for c in content for t in c["top_logprobs"]]
    assert all(-9999.0 <= v <= 0.0 for v in values), values
    s, b, _ = srv.post("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 3, "details": True,
                                                                   "top_n_tokens": 3, "grammar": {"type": "json_object"}}})  # fmt: skip
    assert s == 200, b
    tops = [t["logprob"] for row in b["details"]["top_tokens"] for t in row]
    assert len(tops) == 9 and all(-9999.0 <= v <= 0.0 for v in tops), tops
    s, events = _post_stream(srv.url + "/v1/completions", {"prompt": "x", "max_tokens": 2, "logprobs": 3,
                                                            "stream": True, "response_format": {"type": "json_object"}})  # fmt: skip
    assert s == 200 and events[0]["choices"][0]["logprobs"]["token_logprobs"][0] >= -9999.0, events


def test_openai_client_parse_and_tool_calls(srv):
    openai = pytest.importorskip("openai")
    from enum import Enum

    from pydantic import BaseModel, Field

    class Color(str, Enum):
        red = "red"
        green = "green"

    class Pick(BaseModel):
        color: Color
        count: int = Field(ge=0, le=9)

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    done = 0
    for seed in range(4):
        out = client.beta.chat.completions.parse(model="tgi", messages=[{"role": "user", "content": "Pick one"}],
                                                 response_format=Pick, max_tokens=40, seed=seed)  # fmt: skip
        assert isinstance(out.choices[0].message.parsed, Pick)
        done += 1
    assert done == 4

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer",
                                                                                        "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {
            "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
            "additionalProperties": False}}}]  # fmt: skip
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in (named, "required"):
        for stream in (False, True):
            kw = dict(model="tgi", messages=[{"role": "user", "content": "Weather?"}], tools=tools,
                      tool_choice=choice, max_tokens=40)  # fmt: skip
            if stream:
                calls, finish = {}, None
                for chunk in client.chat.completions.create(stream=True, **kw):
                    for c in chunk.choices:
                        for tc in c.delta.tool_calls or []:
                            calls[tc.index] = (tc.function.name, tc.function.arguments)
                        finish = c.finish_reason or finish
                name, args = calls[0]
            else:
                out = client.chat.completions.create(**kw)
                finish = out.choices[0].finish_reason
                call = out.choices[0].message.tool_calls[0]
                name, args = call.function.name, call.function.arguments
            assert finish == "tool_calls", (choice, stream)
            if choice == named:
                assert name == "get_weather"
            schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == name)
            assert validator(schema).is_valid(json.loads(args)), args
