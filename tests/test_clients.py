"""The client libraries people already use, each called as its own documentation shows, against a real server
process: huggingface_hub (chat with a URL as its model, text generation), text-generation, tritonclient (the binary
tensor data extension), the KServe SDK's calls (its wire format; the SDK itself where it is installed), OpenAI's
fields refused by name, and the docs pages without internet. Streams must add up to their answer, whatever the stop
string."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.parse

import httpx
import numpy as np
import pytest

from helpers import ServerProcess, free_port

openai = pytest.importorskip("openai")
huggingface_hub = pytest.importorskip("huggingface_hub")
text_generation = pytest.importorskip("text_generation")
tritonclient_http = pytest.importorskip("tritonclient.http")

MODEL = "tiny-bloom"  # the conftest server's model id (its directory's name)
PROMPT = "Deepspeed is"
MESSAGES = [{"role": "user", "content": "Hello"}]


def oai(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def hub(srv):
    return huggingface_hub.InferenceClient(model=srv.url, timeout=60)


# ------------------------------------------------------------------------------------------ huggingface_hub chat


def test_hub_chat_completion_with_a_url_as_its_model(server):
    """InferenceClient(model=URL).chat_completion sends a placeholder model name ("dummy"; older releases "tgi"):
    answered by the served model, streamed or not, the same text as a completion of the rendered prompt."""
    client = hub(server)
    out = client.chat_completion(MESSAGES, max_tokens=8, temperature=0)
    expected = (
        oai(server)
        .completions.create(model=MODEL, prompt="user: Hello\nassistant:", max_tokens=8, temperature=0)
        .choices[0]
        .text
    )
    assert out.choices[0].message.content == expected and out.model == MODEL
    chunks = list(client.chat_completion(MESSAGES, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    for placeholder in ("tgi", "dummy"):  # what the hub client sends, by release
        c = oai(server).chat.completions.create(model=placeholder, messages=MESSAGES, max_tokens=8, temperature=0)
        assert c.choices[0].message.content == expected and c.model == MODEL
    with pytest.raises(openai.NotFoundError) as info:  # a real model name that is not served stays a 404
        oai(server).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    assert info.value.body["param"] == "model"


def test_model_name_policy_is_a_setting(tiny_model_dir, tmp_path):
    """BLOOM_MODEL_ALIASES: empty is vLLM's rule (the served id only), `*` is TGI's (any name)."""
    for aliases, dummy_ok, other_ok in (("", False, False), ("*", True, True)):
        with ServerProcess(
            ["--model", str(tiny_model_dir), "--no-warmup"],
            free_port(),
            env={"BLOOM_MODEL_ALIASES": aliases},
            log_path=tmp_path / f"aliases{aliases!r}.log",
        ) as srv:
            for name, ok in ((MODEL, True), ("dummy", dummy_ok), ("gpt-4o", other_ok)):
                status, body, _ = srv.post("/v1/completions", {"model": name, "prompt": PROMPT, "max_tokens": 2})
                assert status == (200 if ok else 404), (aliases, name, body)
            # A model's own URL names the one served model, whatever the aliases.
            assert srv.get("/v1/models/dummy")[0] == 404 and srv.get(f"/v1/models/{MODEL}")[0] == 200


# ------------------------------------------------------------------------------------ streams with stop strings


def _stops(server) -> tuple[str, list[str]]:
    """The greedy answer and stop strings cut from it: inside one token, ending inside a token, spanning tokens,
    a whole token, from the first character."""
    status, body, _ = server.post(
        "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 16, "details": True}}
    )
    assert status == 200, body
    text = body["generated_text"]
    toks = [t["text"] for t in body["details"]["tokens"]]
    starts = [sum(len(t) for t in toks[:i]) for i in range(len(toks))]
    long_ = [i for i, t in enumerate(toks) if len(t) >= 3 and starts[i] > 0]
    assert long_ and len(toks) >= 6, toks
    i = long_[0]
    stops = [
        toks[i][1:-1],  # inside a token
        text[starts[i] - 1 : starts[i] + 2],  # from the end of one token into the next, ending inside it
        text[starts[1] : starts[4] + 1],  # over several tokens
        toks[i],  # a whole token
        text[:2],  # at the start
    ]
    return text, [s for s in stops if s.strip()]


def _sse(url: str, body: dict) -> list:
    events = []
    with httpx.stream("POST", url, json=body, timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_streamed_tokens_add_up_to_the_answer_whatever_the_stop_string(server):
    text, stops = _stops(server)
    hub_client, tg = hub(server), text_generation.Client(server.url, timeout=60)
    client = oai(server)
    for stop in stops:
        # TGI: generated_text ends with the stop string, so the last token's text carries it.
        answer = hub_client.text_generation(PROMPT, max_new_tokens=16, stop=[stop])
        assert answer == text[: text.index(stop) + len(stop)], stop
        streamed = list(hub_client.text_generation(PROMPT, max_new_tokens=16, stop=[stop], stream=True, details=True))
        assert "".join(t.token.text for t in streamed) == answer == streamed[-1].generated_text, stop
        assert streamed[-1].details.finish_reason == "stop_sequence"
        assert tg.generate(PROMPT, max_new_tokens=16, stop_sequences=[stop]).generated_text == answer
        assert (
            "".join(r.token.text for r in tg.generate_stream(PROMPT, max_new_tokens=16, stop_sequences=[stop]))
            == answer
        )
        events = _sse(
            server.url + "/", {"inputs": PROMPT, "parameters": {"max_new_tokens": 16, "stop": [stop]}, "stream": True}
        )
        assert "".join(e["token"]["text"] for e in events) == answer == events[-1]["generated_text"]
        # OpenAI: the stop string is not in the text, streamed or not.
        plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
        assert plain.choices[0].text == text[: text.index(stop)]
        chunks = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop], stream=True
        )
        assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text, stop
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    reply = chat.choices[0].message.content
    for stop in (reply[3:5], reply[5:12], reply[1:2]):
        plain = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0, stop=[stop]
        )
        assert plain.choices[0].message.content == reply[: reply.index(stop)]
        chunks = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0, stop=[stop], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content, stop


def test_text_held_back_when_a_row_ends_early_is_in_the_answer_and_the_stream(tiny_model_dir):
    """Engine level: text held back as the possible start of a stop string, when the row then ends without it
    (max_time, a deadline), is the completion's stream_tail: the events plus the tail are the answer."""
    from bloom_server.frontend.requests import GenRequest
    from bloom_server.frontend.tokenizer import TextTokenizer
    from bloom_server.frontend.validation import validate_generate

    tok = TextTokenizer(tiny_model_dir)
    ids = tok.encode(" return the value of the attribute")
    held = tok.decode(ids[:4])
    stop = held[-2:] + "\u2603"  # starts like the text's end, never completed

    async def run():
        spec = validate_generate(
            {"max_new_tokens": 50},
            max_new_tokens_limit=64,
            cap_max_new_tokens=False,
            default_remove_input=True,
            vocab_size=tok.vocab_size,
        )
        req = GenRequest([[1]], spec, tok, stop=(stop,), eos_ids=frozenset({2}), streaming=True)
        req.on_start(0)
        for t in ids[:4]:
            req.add_token(0, t, -1.0, None)
        req._expire("max_time")  # answered with what it has
        pieces = [ev.text async for ev in req.stream()]
        return pieces, (await req.result())[0]

    pieces, c = asyncio.run(run())
    assert "".join(pieces) == held[:-2] and c.stream_tail == held[-2:]
    assert "".join(pieces) + c.stream_tail == c.text == held


# ------------------------------------------------------------------------------------------------- KServe v1 / v2


def test_get_root_is_kserve_liveness_for_clients_and_the_playground_for_browsers(server):
    # The KServe SDK's v1 is_server_live(): httpx's GET {base_url}/ with its default headers, JSON `status`.
    resp = httpx.get(server.url + "/", timeout=10)
    assert resp.status_code == 200 and resp.json() == {"status": "alive"}
    assert resp.headers["vary"] == "Accept"
    assert httpx.get(server.url + "/", headers={"Accept": "application/json"}).json() == {"status": "alive"}
    browser = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
    page = httpx.get(server.url + "/", headers={"Accept": browser}, timeout=10)
    assert page.headers["content-type"].startswith("text/html") and "bloom-server playground" in page.text
    assert httpx.get(server.url + "/", headers={"Accept": "text/html;q=0, */*"}).json() == {"status": "alive"}
    # The rest of the SDK's v1 and v2 REST calls: readiness of the model (v1), liveness and readiness (v2).
    v1 = httpx.get(f"{server.url}/v1/models/{MODEL}")
    assert v1.status_code == 200 and v1.json()["ready"] is True
    assert httpx.get(server.url + "/v2/health/live").json()["live"] is True
    assert httpx.get(server.url + "/v2/health/ready").json()["ready"] is True


def test_kserve_sdk_itself(server):
    """The KServe SDK is not in the test extra: it requires uvicorn[standard], whose uvloop and httptools would
    replace the event loop and HTTP parser of every server the suite starts (the server runs on uvicorn's
    defaults); its wire format is tested above and below. Where it is installed, its own calls run here."""
    kserve = pytest.importorskip("kserve")

    async def calls():
        v1 = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v1"))
        v2 = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2"))
        try:
            assert await v1.is_server_live(server.url) and await v1.is_model_ready(server.url, MODEL)
            assert await v2.is_server_live(server.url) and await v2.is_model_ready(server.url, MODEL)
            inp = kserve.InferInput("text_input", [1], "BYTES")
            inp.set_data_from_numpy(np.array([PROMPT.encode()], dtype=np.object_))  # binary, the SDK's default
            req = kserve.InferRequest(model_name=MODEL, infer_inputs=[inp], parameters={"max_new_tokens": 5})
            return await v2.infer(server.url, req, model_name=MODEL)
        finally:
            await v1.close()
            await v2.close()

    res = asyncio.run(calls())
    assert res.outputs[0].data == [server.post("/generate", {"text": [PROMPT], "max_new_tokens": 5})[1]["text"][0]]


def test_tritonclient_binary_tensors_and_versioned_routes(server):
    http = tritonclient_http
    client = http.InferenceServerClient(urllib.parse.urlparse(server.url).netloc, network_timeout=60)
    prompts = [PROMPT, "Hello \u20ac"]
    expected = [server.post("/generate", {"text": [p], "max_new_tokens": 5})[1]["text"][0] for p in prompts]
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    meta = client.get_model_metadata(MODEL)
    (version,) = meta["versions"]
    assert client.is_model_ready(MODEL, version) and client.get_model_metadata(MODEL, version)["name"] == MODEL
    assert not client.is_model_ready(MODEL, "no-such-version")

    def tensor(binary: bool):
        t = http.InferInput("text_input", [2], "BYTES")
        t.set_data_from_numpy(np.array([p.encode() for p in prompts], dtype=np.object_), binary_data=binary)
        return t

    # The documented default: binary input, every output in binary.
    res = client.infer(MODEL, [tensor(True)], parameters={"max_new_tokens": 5})
    assert [x.decode() for x in res.as_numpy("text_output")] == expected
    assert res.as_numpy("generated_tokens").tolist() == [5, 5]
    assert res.get_output("text_output")["parameters"]["binary_data_size"] > 0
    # Binary input, JSON output asked for; on the versioned path.
    res = client.infer(
        MODEL,
        [tensor(True)],
        model_version=version,
        parameters={"max_new_tokens": 5},
        outputs=[
            http.InferRequestedOutput("text_output", binary_data=False),
            http.InferRequestedOutput("finish_reason", binary_data=True),
        ],
    )
    assert res.get_response()["model_version"] == version
    assert res.get_output("text_output")["data"] == expected
    assert [x.decode() for x in res.as_numpy("finish_reason")] == ["length", "length"]
    # JSON input.
    res = client.infer(MODEL, [tensor(False)], parameters={"max_new_tokens": 5})
    assert [x.decode() for x in res.as_numpy("text_output")] == expected
    with pytest.raises(Exception, match="no-such-version"):
        client.infer(MODEL, [tensor(True)], model_version="no-such-version", parameters={"max_new_tokens": 5})


def test_binary_tensor_data_that_does_not_add_up_is_a_400_naming_it(server):
    url = f"{server.url}/v2/models/{MODEL}/infer"
    element = PROMPT.encode()
    blob = len(element).to_bytes(4, "little") + element
    head = json.dumps(
        {
            "inputs": [
                {"name": "text_input", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}}
            ],
            "parameters": {"max_new_tokens": 2},
        }
    ).encode()
    ok = httpx.post(url, content=head + blob, headers={"Inference-Header-Content-Length": str(len(head))}, timeout=60)
    assert ok.status_code == 200 and ok.json()["outputs"][0]["data"][0]
    cases = [
        (head + blob, "abc", "Inference-Header-Content-Length"),
        (head + blob, str(len(head) + len(blob) + 1), "Inference-Header-Content-Length"),
        (head + blob[:-1], str(len(head)), "binary_data_size"),
        (head + blob + b"xx", str(len(head)), "Inference-Header-Content-Length"),
        (head + (100).to_bytes(4, "little") + element, str(len(head)), "inputs[0].data"),
        (
            head + len(b"\xff\xfe").to_bytes(4, "little") + b"\xff\xfe" + b"\x00" * (len(blob) - 6),
            str(len(head)),
            "inputs[0].data",
        ),
    ]
    for body, length, field in cases:
        resp = httpx.post(url, content=body, headers={"Inference-Header-Content-Length": length}, timeout=60)
        assert resp.status_code == 400 and field in resp.json()["field"], (length, resp.text)


# ------------------------------------------------------------------------------------------------------- OpenAI


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
        ({"function_call": {"name": "f"}}, "function_call"),
        # tools without tool_choice mean "auto" (answer in text or call), which a grammar cannot honour
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),  # and no tools
    ],
)
def test_chat_fields_not_implemented_are_refused_by_name(server, fields, field):
    with pytest.raises(openai.BadRequestError) as info:
        oai(server).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, **fields)
    assert info.value.status_code == 400 and info.value.body["param"] == field and field in info.value.body["message"]


def test_chat_fields_at_their_defaults_are_accepted(server):
    c = oai(server).chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=2,
        temperature=0,
        response_format={"type": "text"},
        tools=[],
        tool_choice="none",
    )
    assert c.choices[0].finish_reason == "length"


def test_prompt_as_token_ids(server):
    client = oai(server)
    ids = server.post("/tokenize", {"text": [PROMPT, "Hello"]})[1]["token_ids"]
    by_text = client.completions.create(model=MODEL, prompt=[PROMPT, "Hello"], max_tokens=5, temperature=0)
    one = client.completions.create(model=MODEL, prompt=ids[0], max_tokens=5, temperature=0, echo=True)
    assert one.choices[0].text == PROMPT + by_text.choices[0].text
    two = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert [c.text for c in two.choices] == [c.text for c in by_text.choices]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=[[1, 10**9]], max_tokens=5)
    assert info.value.body["param"] == "prompt[0]"


def test_models_created_is_the_load_time(server):
    client = oai(server)
    first = client.models.list().data[0].created
    assert client.models.retrieve(MODEL).created == first == client.models.list().data[0].created


# ---------------------------------------------------------------------------------------------- docs, offline


@pytest.mark.parametrize("page, marker", [("/docs", "SwaggerUIBundle"), ("/redoc", "Redoc")])
def test_docs_pages_load_their_assets_from_the_server(server, page, marker):
    html = httpx.get(server.url + page, timeout=10).text
    assert not re.search(r"https?://", html), html  # nothing from a CDN, nor any other host
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert len(assets) >= 2
    bodies = []
    for asset in assets:
        resp = httpx.get(urllib.parse.urljoin(server.url + page, asset), timeout=10)
        assert resp.status_code == 200 and len(resp.content) > 1000, asset
        bodies.append(resp.text if asset.endswith((".js", ".css")) else "")
    assert marker in "".join(bodies)
    # The playground's "API docs" link, relative to the page at /.
    playground = httpx.get(server.url + "/", headers={"Accept": "text/html"}).text
    (link,) = re.findall(r'<a href="([^"]*)">API docs</a>', playground)
    assert urllib.parse.urljoin(server.url + "/", link) == server.url + "/docs"
