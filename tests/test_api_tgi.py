"""Text Generation Inference's surface against a real server: /generate_stream as server-sent events, POST / and
TGI's body on /generate, and huggingface_hub's InferenceClient unchanged."""

from __future__ import annotations

import http.client
import json
import math
import urllib.parse

import pytest


def sse_post(url: str, path: str, body: dict, headers: dict | None = None, timeout: float = 60):
    """(status, headers, [parsed data events], raw text). Reads the whole stream (bounded by the server's limits)."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read().decode()
        events = []
        for block in raw.split("\n\n"):
            block = block.strip()
            if block.startswith("data:"):
                data = block[5:].strip()
                events.append(data if data == "[DONE]" else json.loads(data))
        return resp.status, dict(resp.getheaders()), events, raw
    finally:
        conn.close()


def tgi(server, prompt: str, **parameters):
    status, body, headers = server.post("/generate", {"inputs": prompt, "parameters": parameters})
    assert status == 200, body
    return body, headers


def test_generate_stream_one_event_per_token_then_final(server):
    status, headers, events, _ = sse_post(
        server.url, "/generate_stream", {"inputs": "Deepspeed is", "parameters": {"max_new_tokens": 8}}
    )
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert len(events) == 8
    for i, ev in enumerate(events):
        assert set(ev["token"]) == {"id", "text", "logprob", "special"}
        assert isinstance(ev["token"]["id"], int) and ev["token"]["logprob"] <= 0
        if i < 7:
            assert ev["generated_text"] is None and ev["details"] is None
    final = events[-1]
    assert final["details"]["finish_reason"] == "length"
    assert final["details"]["generated_tokens"] == 8
    assert final["details"]["seed"] is None  # greedy
    # Concatenated token texts are the generated text, and the same as the non-streaming answer.
    assert "".join(ev["token"]["text"] for ev in events) == final["generated_text"]
    body, _ = tgi(server, "Deepspeed is", max_new_tokens=8, details=True)
    assert body["generated_text"] == final["generated_text"]
    assert [t["id"] for t in body["details"]["tokens"]] == [ev["token"]["id"] for ev in events]


def test_logprobs_are_the_models_and_do_not_change_the_text(server, tiny_model_dir):
    import torch
    from tokenizers import Tokenizer
    from transformers import BloomForCausalLM

    body, _ = tgi(server, "Open the file", max_new_tokens=4, details=True)
    tokens = body["details"]["tokens"]
    tok = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    model = BloomForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = tok.encode("Open the file").ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=3, eos_token_id=2)
        logits = model(out).logits[0].float()
    new = out[0, len(ids) :].tolist()
    assert [t["id"] for t in tokens] == new  # greedy text unchanged by the hook
    logp = torch.log_softmax(logits, -1)
    for j, t in enumerate(tokens):
        assert t["logprob"] == pytest.approx(logp[len(ids) - 1 + j, new[j]].item(), abs=1e-4)


@pytest.mark.parametrize(
    "body,field",
    [
        ({"inputs": "x", "parameters": {"max_new_tokens": 1000}}, "parameters.max_new_tokens"),
        ({"inputs": "", "parameters": {}}, "inputs"),
        ({"inputs": "x", "parameters": {"temperature": -1}}, "parameters.temperature"),
        ({"inputs": "x", "parameters": {"top_p": 1.5, "do_sample": True}}, "parameters.top_p"),
        ({"inputs": "x", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, "parameters.stop"),
        ({"inputs": "x", "parameters": {"best_of": 2}}, "parameters.best_of"),
        ({"inputs": "word " * 80}, "inputs"),
        ({"parameters": {}}, "inputs"),
    ],
)
def test_invalid_stream_request_is_4xx_before_any_event(server, body, field):
    status, headers, events, raw = sse_post(server.url, "/generate_stream", body)
    assert status == 422, raw
    assert headers["content-type"].startswith("application/json")
    err = json.loads(raw)
    assert err["error_type"] == "validation" and err["field"] == field, err
    assert field.split(".")[-1] in err["error"]


def test_post_root_is_tgi_compat(server):
    status, body, _ = server.post("/", {"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
    assert status == 200 and isinstance(body, list) and set(body[0]) == {"generated_text"}
    status, _, events, _ = sse_post(
        server.url, "/", {"inputs": "Hello", "parameters": {"max_new_tokens": 3}, "stream": True}
    )
    assert status == 200 and len(events) == 3 and events[-1]["generated_text"] == body[0]["generated_text"]


def test_generate_takes_both_bodies(server):
    original = server.post("/generate", {"text": ["Hello there"], "max_new_tokens": 5})[1]
    body, headers = tgi(server, "Hello there", max_new_tokens=5)
    assert set(original) >= {"text", "num_generated_tokens", "query_id"}
    assert body == {"generated_text": original["text"][0]}
    assert int(headers["x-generated-tokens"]) == 5 and int(headers["x-prompt-tokens"]) >= 1
    full, _ = tgi(server, "Hello there", max_new_tokens=5, return_full_text=True)
    assert full["generated_text"].startswith("Hello there")


def test_stop_sequence_ends_the_generation(server):
    plain, _ = tgi(server, "Deepspeed is", max_new_tokens=20)
    text = plain["generated_text"]
    stop = text[6:9]
    assert len(stop) == 3 and text.find(stop) == 6
    status, _, events, _ = sse_post(
        server.url, "/generate_stream", {"inputs": "Deepspeed is", "parameters": {"max_new_tokens": 20, "stop": [stop]}}
    )
    final = events[-1]
    assert final["details"]["finish_reason"] == "stop_sequence"
    assert final["generated_text"] == text[:9]
    assert final["details"]["generated_tokens"] < 20


def test_seed_reproduces_a_sampled_answer(server):
    params = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.5, "seed": 1234, "details": True}
    a, _ = tgi(server, "Hello", **params)
    b, _ = tgi(server, "Hello", **params)
    c, _ = tgi(server, "Hello", **{**params, "seed": 99})
    assert a["generated_text"] == b["generated_text"]
    assert a["details"]["seed"] == 1234
    assert [t["id"] for t in a["details"]["tokens"]] != [t["id"] for t in c["details"]["tokens"]]


def test_top_n_tokens(server):
    body, _ = tgi(server, "Hello", max_new_tokens=3, top_n_tokens=3, details=True)
    tops = body["details"]["top_tokens"]
    assert len(tops) == 3
    for chosen, alts in zip(body["details"]["tokens"], tops):
        assert len(alts) == 3 and alts[0]["id"] == chosen["id"]  # greedy: the chosen token is the most likely
        assert alts[0]["logprob"] >= alts[1]["logprob"] >= alts[2]["logprob"]


def test_huggingface_hub_inference_client(server):
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import ValidationError

    client = InferenceClient(base_url=server.url, timeout=60)
    expected = server.post("/generate", {"text": ["Deepspeed is"], "max_new_tokens": 6})[1]["text"][0]
    assert client.text_generation("Deepspeed is", max_new_tokens=6) == expected
    assert "".join(client.text_generation("Deepspeed is", max_new_tokens=6, stream=True)) == expected
    out = client.text_generation("Deepspeed is", max_new_tokens=6, details=True)
    assert out.generated_text == expected
    assert out.details.finish_reason == "length" and out.details.generated_tokens == 6
    assert len(out.details.tokens) == 6 and all(math.isfinite(t.logprob) for t in out.details.tokens)
    chunks = list(client.text_generation("Deepspeed is", max_new_tokens=6, stream=True, details=True))
    assert len(chunks) == 6
    assert chunks[-1].generated_text == expected and chunks[-1].details.generated_tokens == 6
    sampled = [
        client.text_generation("Hello", max_new_tokens=8, do_sample=True, seed=7, temperature=1.3) for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    with pytest.raises(ValidationError):
        client.text_generation("Hello", max_new_tokens=10_000)


def test_error_after_first_token_ends_the_stream_with_one_error_event(tiny_model_dir):
    """The engine fails mid-generation (a rank died): the stream's last event is the documented error event."""
    import asyncio
    import concurrent.futures
    import threading

    import httpx

    from bloom_server.api.app import create_app
    from bloom_server.errors import EngineDead
    from bloom_server.frontend.core import Engine
    from bloom_server.frontend.tokenizer import TextTokenizer
    from bloom_server.settings import load_settings
    from bloom_server.types import ModelInfo

    class FailingRunner:
        dead = None

        def submit(self, kind, payload=None, listener=None):
            fut = concurrent.futures.Future()

            def run():
                if listener is not None:
                    for t in (10, 11, 12):
                        listener.on_tokens([t] * len(payload.input_ids), [-1.0] * len(payload.input_ids))
                fut.set_exception(EngineDead("rank 1 lost a peer rank"))

            threading.Thread(target=run).start()
            return fut

    async def scenario():
        settings = load_settings(warmup=False)
        engine = Engine(settings)
        app = create_app(engine, settings, "tiny")
        engine.bind_loop(asyncio.get_running_loop())
        engine.attach(
            FailingRunner(), TextTokenizer(tiny_model_dir), ModelInfo("tiny", str(tiny_model_dir), "hf", "fp32", 1)
        )
        engine.warmup()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            resp = await client.post("/generate_stream", json={"inputs": "Hello", "parameters": {"max_new_tokens": 5}})
            return resp.status_code, resp.text

    status, raw = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert status == 200
    events = [json.loads(b[5:]) for b in raw.split("\n\n") if b.startswith("data:")]
    assert [e["token"]["id"] for e in events[:-1]] == [10, 11, 12]
    assert events[-1]["error"] == "rank 1 lost a peer rank" and events[-1]["error_type"] == "generation"
    assert set(events[-1]) == {"error", "error_type", "message", "field", "limit"}


@pytest.mark.slow
def test_two_ranks_stream_and_stop_the_row_of_a_client_that_leaves(server, tiny_model_dir, tmp_path):
    """With two ranks (torchrun, gloo) the stream carries the same tokens as one rank. A client that leaves
    mid-stream: rank 0 shares the stop with the other rank at the next step, both stop the row (their results still
    agree, so the server lives), and the next request starts without waiting for the abandoned one's tokens."""
    import shutil
    import sys
    import time
    from pathlib import Path

    from helpers import ServerProcess, free_port

    long_tokens = 8000
    one = sse_post(server.url, "/generate_stream", {"inputs": "Deepspeed is", "parameters": {"max_new_tokens": 12}})[2]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    srv = ServerProcess(
        [
            "--model",
            str(tiny_model_dir),
            "--max-new-tokens",
            str(long_tokens),
            "--max-total-tokens",
            str(long_tokens + 100),
        ],
        free_port(),
        launcher=[torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "bloom_server"],
        log_path=tmp_path / "torchrun.log",
    )
    try:
        srv.wait_ready()
        two = sse_post(srv.url, "/generate_stream", {"inputs": "Deepspeed is", "parameters": {"max_new_tokens": 12}})[2]
        assert [e["token"]["id"] for e in two] == [e["token"]["id"] for e in one]
        assert two[-1]["generated_text"] == one[-1]["generated_text"]
        u = urllib.parse.urlparse(srv.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": long_tokens, "min_length": long_tokens + 50}}
        conn.request("POST", "/generate_stream", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        lines = [resp.readline() for _ in range(20)]  # 10 events
        start = time.monotonic()
        lines += [resp.readline() for _ in range(60)]  # 30 more: the decoding rate
        rate = 30 / (time.monotonic() - start)
        assert all(x.startswith(b"data:") or x == b"\r\n" or x == b"\n" for x in lines)
        conn.sock.shutdown(__import__("socket").SHUT_RDWR)
        conn.close()  # the client leaves mid-stream
        left = time.monotonic()
        status, out, _ = srv.post("/generate", {"text": ["Hello"], "max_new_tokens": 4})
        assert status == 200 and out["num_generated_tokens"] == [4]
        remaining = (long_tokens - 40) / rate
        assert time.monotonic() - left < remaining / 2, (time.monotonic() - left, remaining)
        assert srv.get("/ready")[0] == 200 and srv.proc.poll() is None
    finally:
        srv.stop()


def test_original_generate_keywords_in_tgi_parameters(server):
    body, _ = tgi(server, "Hello", max_new_tokens=9, min_length=200, details=True)
    assert body["details"]["generated_tokens"] == 9 and body["details"]["finish_reason"] == "length"
    status, err, _ = server.post("/generate_stream", {"inputs": "Hello", "parameters": {"min_length": "many"}})
    assert status == 422 and err["field"] == "min_length"


def test_stream_text_holds_back_a_stop_sequence_split_across_tokens(tiny_model_dir):
    """Engine level: a stop string that spans several tokens never reaches the stream, and the pieces add up to the
    text before it; an incomplete UTF-8 character waits for its next byte."""
    import asyncio

    from bloom_server.frontend.requests import GenRequest
    from bloom_server.frontend.tokenizer import TextTokenizer
    from bloom_server.frontend.validation import validate_generate
    from bloom_server.types import FinishReason

    tok = TextTokenizer(tiny_model_dir)
    text = " return the value of the attribute"
    ids = tok.encode(text)
    stop = "value of"
    assert len(ids) >= 6 and all(stop not in tok.token_text(i) for i in ids)  # the stop spans tokens

    async def run(stop_strings, token_ids):
        spec = validate_generate(
            {"max_new_tokens": 50},
            max_new_tokens_limit=64,
            cap_max_new_tokens=False,
            default_remove_input=True,
            vocab_size=tok.vocab_size,
        )
        req = GenRequest([[1]], spec, tok, stop=stop_strings, eos_ids=frozenset({2}), streaming=True)
        for t in token_ids:
            req.add_token(0, t, -1.0, None)
        req.settle_row(0, tuple(token_ids), FinishReason.LENGTH)
        if not req.done:
            req._finish()
        pieces = []
        async for ev in req.stream():
            pieces.append(ev.text)
        return pieces, (await req.result())[0]

    pieces, c = asyncio.run(run((stop,), ids))
    assert "".join(pieces) == text[: text.index(stop)] == c.text
    assert c.finish_reason == "stop_sequence" and c.stop_sequence == stop
    assert len(c.token_ids) < len(ids)  # the row ended at the stop

    euro = tok.encode(" 10\u20ac")  # a multi-byte character: byte-level tokens may split it
    pieces, c = asyncio.run(run((), euro))
    assert "".join(pieces) == c.text == tok.decode(euro) and all("\ufffd" not in p for p in pieces)


def test_a_streamed_token_goes_out_before_the_next_one_is_made(tiny_model_dir):
    """Engine level: TGI's stream sends a token's event when the token arrives, not when the next one does (a whole
    decode step later, which every first token paid); the last token's event, which carries the answer, waits
    only for the end that comes with it. A request that a timer may end with no token (deadline, max_time) keeps
    each event until the next is in, so that its last event can still carry the answer."""
    import asyncio
    import json
    import time
    from types import SimpleNamespace

    from bloom_server.api import routes_tgi
    from bloom_server.frontend.requests import GenRequest
    from bloom_server.frontend.tokenizer import TextTokenizer
    from bloom_server.frontend.validation import validate_generate

    tok = TextTokenizer(tiny_model_dir)
    ids = [t for t in tok.encode(" return the value of the attribute") if t != 2][:3]
    spec = validate_generate({"max_new_tokens": 3}, max_new_tokens_limit=64, cap_max_new_tokens=False,
                             default_remove_input=True, vocab_size=tok.vocab_size)  # fmt: skip
    engine = SimpleNamespace(tokenizer=tok)

    def parse(raw: bytes) -> dict:
        assert raw.startswith(b"data: ")
        return json.loads(raw[6:])

    async def run(deadline: float | None) -> tuple[bool, list[dict]]:
        req = GenRequest([[1]], spec, tok, eos_ids=frozenset({2}), streaming=True, deadline=deadline)
        events = routes_tgi._events(engine, req)  # type: ignore[arg-type]
        req.add_token(0, ids[0], -1.0, None)
        first = asyncio.ensure_future(events.__anext__())
        done, _ = await asyncio.wait({first}, timeout=0.5)  # the first event, before the second token exists
        req.add_token(0, ids[1], -1.0, None)
        req.add_token(0, ids[2], -1.0, None)  # the third of max_new_tokens 3: the end comes with it
        return bool(done), [parse(await first)] + [parse(raw) async for raw in events]

    for deadline, early in ((None, True), (time.monotonic() + 60, False)):
        went_out, (a, b, final) = asyncio.run(run(deadline))
        assert went_out is early
        assert [e["token"]["id"] for e in (a, b, final)] == ids and [e["index"] for e in (a, b, final)] == [1, 2, 3]
        assert a["details"] is None and b["details"] is None and a["generated_text"] is None
        assert final["details"]["generated_tokens"] == 3 and final["details"]["finish_reason"] == "length"
        assert a["token"]["text"] + b["token"]["text"] + final["token"]["text"] == final["generated_text"]
