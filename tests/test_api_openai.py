"""OpenAI's surface with the official `openai` client against real server processes."""

from __future__ import annotations

import json

import pytest

from helpers import ServerProcess, free_port, http

openai = pytest.importorskip("openai")

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
KEY = "sk-test-key"


def client_for(srv, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def chat_server(tiny_model_dir, tmp_path_factory):
    """A server with a chat template given by setting, and an API key."""
    with ServerProcess(
        ["--model", str(tiny_model_dir), "--model-id", "tiny-chat", "--max-new-tokens", "64", "--no-warmup"],
        free_port(),
        env={"BLOOM_CHAT_TEMPLATE": TEMPLATE, "BLOOM_API_KEY": KEY},
        log_path=tmp_path_factory.mktemp("logs") / "chat.log",
    ) as srv:
        yield srv


def greedy(server, prompt: str, n: int) -> str:
    return server.post("/generate", {"text": [prompt], "max_new_tokens": n})[1]["text"][0]


def test_models_list(server):
    models = client_for(server).models.list()
    assert [m.id for m in models.data] == ["tiny-bloom"]


def test_models_retrieve_is_also_kserve_v1_status(server, chat_server):
    """GET /v1/models/{id}: OpenAI's model object for client.models.retrieve, keeping KServe v1's `name` and `ready`
    (the 503 before ready is in test_api_ops' drain test)."""
    m = client_for(server).models.retrieve("tiny-bloom")
    assert (m.id, m.object, m.owned_by) == ("tiny-bloom", "model", "bloom-server") and m.created > 0
    assert m.model_extra == {"name": "tiny-bloom", "ready": True}
    assert client_for(chat_server, KEY).models.retrieve("tiny-chat").id == "tiny-chat"  # the --model-id
    with pytest.raises(openai.NotFoundError) as info:
        client_for(server).models.retrieve("gpt-4")
    assert info.value.body["type"] == "invalid_request_error" and info.value.body["param"] == "model"
    status, body, headers = server.get("/v1/models/tiny-bloom:predict")  # KServe's predict takes POST only
    assert status == 405 and headers.get("allow") == "POST" and body["error"] == "Method Not Allowed"


def test_client_errors_have_client_error_types(server):
    """Bug 12: every 4xx on the OpenAI surface is a client error type (a 405 was "server_error")."""
    for method, path, want in [
        ("POST", "/v1/models", 405),
        ("GET", "/v1/completions", 405),
        ("PUT", "/v1/chat/completions", 405),
        ("GET", "/v1/nothing-here", 404),
    ]:
        status, body, _ = http(method, server.url + path, {} if method != "GET" else None)
        assert status == want and body["error"]["type"] == "invalid_request_error", (method, path, status, body)
        assert body["error"]["message"], body


def test_completion_greedy_matches_generate(server):
    c = client_for(server).completions.create(model="tiny-bloom", prompt="Deepspeed is", max_tokens=6, temperature=0)
    assert c.object == "text_completion" and c.model == "tiny-bloom"
    assert c.choices[0].text == greedy(server, "Deepspeed is", 6)
    assert c.choices[0].finish_reason == "length"
    assert c.usage.completion_tokens == 6 and c.usage.total_tokens == c.usage.prompt_tokens + 6


def test_prompt_list_and_n(server):
    c = client_for(server).completions.create(
        model="tiny-bloom", prompt=["Hello", "Open the file"], max_tokens=4, temperature=0, n=2
    )
    assert [ch.index for ch in c.choices] == [0, 1, 2, 3]
    assert c.choices[0].text == c.choices[1].text == greedy(server, "Hello", 4)
    assert c.choices[2].text == c.choices[3].text == greedy(server, "Open the file", 4)
    assert c.usage.completion_tokens == 16


def test_stop_echo_and_logprobs(server):
    client = client_for(server)
    text = greedy(server, "Deepspeed is", 20)
    stop = text[6:9]
    c = client.completions.create(model="tiny-bloom", prompt="Deepspeed is", max_tokens=20, temperature=0, stop=[stop])
    assert c.choices[0].finish_reason == "stop" and c.choices[0].text == text[:6]
    c = client.completions.create(
        model="tiny-bloom", prompt="Deepspeed is", max_tokens=5, temperature=0, echo=True, logprobs=2
    )
    assert c.choices[0].text == "Deepspeed is" + greedy(server, "Deepspeed is", 5)
    lp = c.choices[0].logprobs
    generated = [x for x in lp.token_logprobs if x is not None]
    assert len(generated) == 5 and all(x <= 0 for x in generated)
    assert all(len(t) == 2 for t in lp.top_logprobs if t is not None)
    assert len(lp.tokens) == len(lp.text_offset) == len(lp.token_logprobs)


def test_seed_reproduces_sampled_output(server):
    client = client_for(server)
    kw = dict(model="tiny-bloom", prompt="Hello", max_tokens=12, temperature=1.4)
    a = client.completions.create(seed=42, **kw).choices[0].text
    b = client.completions.create(seed=42, **kw).choices[0].text
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3)}
    assert a == b
    assert others - {a}, "different seeds never changed the sampled text"


def test_streaming_completion_with_usage_and_done(server):
    from test_api_tgi import sse_post

    client = client_for(server)
    chunks = list(
        client.completions.create(
            model="tiny-bloom",
            prompt="Deepspeed is",
            max_tokens=7,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == greedy(server, "Deepspeed is", 7)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 7
    status, _, events, _ = sse_post(
        server.url, "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "temperature": 0, "stream": True}
    )
    assert status == 200 and events[-1] == "[DONE]"


@pytest.mark.parametrize(
    "kwargs,param,error",
    [
        ({"temperature": 5}, "temperature", "BadRequestError"),
        ({"max_tokens": 100_000}, "max_tokens", "BadRequestError"),
        ({"top_p": 0}, "top_p", "BadRequestError"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "BadRequestError"),
        ({"model": "gpt-4"}, "model", "NotFoundError"),
        ({"prompt": ""}, "prompt", "BadRequestError"),
    ],
)
def test_errors_in_openai_shape(server, kwargs, param, error):
    args = {"model": "tiny-bloom", "prompt": "Hello", "max_tokens": 3, **kwargs}
    with pytest.raises(getattr(openai, error)) as info:
        client_for(server).completions.create(**args)
    body = info.value.body
    assert set(body) == {"message", "type", "param", "code"}, body  # the client hands over body["error"]
    assert body["param"] == param and param in body["message"]


def test_chat_without_a_template_is_a_clear_400(tiny_model_dir, tmp_path):
    """A model whose tokenizer has no chat template (BLOOM's own has none; the embedded model has one)."""
    import shutil

    model = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    with ServerProcess(["--model", str(model), "--no-warmup"], free_port(), log_path=tmp_path / "server.log") as srv:
        with pytest.raises(openai.BadRequestError) as info:
            client_for(srv).chat.completions.create(model="no-template", messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in info.value.body["message"] and info.value.body["param"] == "messages"


def test_chat_with_a_template_from_settings(chat_server):
    client = client_for(chat_server, KEY)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Deepspeed is"}]
    c = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=6, temperature=0)
    prompt = "system: Be brief.\nuser: Deepspeed is\nassistant:"
    expected = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=6, temperature=0).choices[0].text
    assert c.choices[0].message.role == "assistant" and c.choices[0].message.content == expected
    assert c.usage.completion_tokens == 6
    stream = client.chat.completions.create(
        model="tiny-chat", messages=messages, max_tokens=6, temperature=0, stream=True, logprobs=True, top_logprobs=2
    )
    pieces, logprobs = [], []
    for ch in stream:
        pieces.append(ch.choices[0].delta.content or "")
        if ch.choices[0].logprobs and ch.choices[0].logprobs.content:
            logprobs.extend(ch.choices[0].logprobs.content)
    assert "".join(pieces) == expected and len(logprobs) == 6
    assert all(len(lp.top_logprobs) == 2 for lp in logprobs)


def test_api_key_is_required(chat_server):
    with pytest.raises(openai.AuthenticationError) as info:
        client_for(chat_server, "wrong").models.list()
    assert info.value.status_code == 401 and info.value.body["type"] == "authentication_error"
    status, body, headers = chat_server.post("/generate", {"text": ["x"], "max_new_tokens": 1})
    assert status == 401 and headers.get("www-authenticate") == "Bearer" and body["field"] == "authorization"
    ok = chat_server.post("/generate", {"text": ["x"], "max_new_tokens": 1}, headers={"Authorization": f"Bearer {KEY}"})
    assert ok[0] == 200
    for path in ("/health", "/ready", "/metrics", "/v2/health/live", "/v2/health/ready", "/", "/docs"):
        assert chat_server.get(path)[0] == 200, path
    for path in ("/info", "/v1/models", "/v2/models/tiny-chat", "/query_id", "/openapi.json/x"):
        assert chat_server.get(path)[0] in (401,), path
    assert json.loads(json.dumps(body))["error"] == "unauthorized"
