"""min_new_tokens (transformers' generate() keyword, beyond the original server's 22): accepted on POST /generate and
in TGI's parameters; min_new_tokens == max_new_tokens makes every row exactly that long, on the hf backend and on the
fast one; a bad value is a 422 naming the field.

The tiny model rarely produces its own end-of-sequence token, so each test makes one: the request's `eos_token_id`
is a token greedy decoding produces early, which without min_new_tokens ends the row there."""

from __future__ import annotations

import pytest

from helpers import ServerProcess, free_port

ARGS = ["--max-input-length", "64", "--max-new-tokens", "64", "--max-batch-size", "16", "--max-total-tokens", "96"]
PROMPTS = ["Deepspeed is", "The quick brown fox jumps over"]
N = 12


@pytest.fixture(scope="module")
def fast_server(tiny_model_dir, tmp_path_factory):
    with ServerProcess(["--model", str(tiny_model_dir), "--backend", "fast", *ARGS], free_port(),
                       log_path=tmp_path_factory.mktemp("logs") / "fast.log") as srv:  # fmt: skip
        yield srv


def early_token(srv, prompt: str) -> int:
    """The second token greedy decoding gives this prompt: as the end-of-sequence token, it ends the row at 2 tokens
    or fewer."""
    status, body, _ = srv.post("/generate", {"inputs": prompt, "parameters": {"max_new_tokens": N, "details": True}})
    assert status == 200, body
    return body["details"]["tokens"][1]["id"]


@pytest.fixture(params=["hf", "fast"])
def srv(request, server):
    return server if request.param == "hf" else request.getfixturevalue("fast_server")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_min_new_tokens_equal_to_max_new_tokens_gives_exactly_that_many(srv, prompt):
    eos = early_token(srv, prompt)
    status, body, headers = srv.post("/generate", {"text": [prompt], "max_new_tokens": N, "eos_token_id": eos})
    assert status == 200 and body["num_generated_tokens"][0] <= 2, body  # the made-up EOS ends it early
    status, body, headers = srv.post("/generate", {"text": [prompt], "max_new_tokens": N, "min_new_tokens": N,
                                                   "eos_token_id": eos})  # fmt: skip
    assert status == 200 and body["num_generated_tokens"] == [N], body
    assert "x-ignored-fields" not in {k.lower() for k in headers}
    # fewer than max_new_tokens: EOS is held back only that long (the greedy text comes back to it at once or later)
    status, body, _ = srv.post("/generate", {"text": [prompt], "max_new_tokens": N, "min_new_tokens": 5,
                                             "eos_token_id": eos})  # fmt: skip
    assert status == 200 and 5 <= body["num_generated_tokens"][0] <= N, body


def test_min_new_tokens_in_tgi_parameters(srv):
    eos = early_token(srv, PROMPTS[0])
    params = {"max_new_tokens": N, "min_new_tokens": N, "eos_token_id": eos, "details": True}
    for path in ("/generate", "/"):
        status, body, _ = srv.post(path, {"inputs": PROMPTS[0], "parameters": params})
        assert status == 200, body
        body = body[0] if isinstance(body, list) else body
        assert body["details"]["generated_tokens"] == N and body["details"]["finish_reason"] == "length", body


def test_several_prompts_in_one_request_each_get_exactly_max_new_tokens(srv):
    eos = early_token(srv, PROMPTS[0])
    status, body, _ = srv.post("/generate", {"text": PROMPTS + ["A"], "max_new_tokens": 7, "min_new_tokens": 7,
                                             "eos_token_id": eos})  # fmt: skip
    assert status == 200 and body["num_generated_tokens"] == [7, 7, 7], body


@pytest.mark.parametrize(
    "params,tgi_field",
    [
        ({"max_new_tokens": 4, "min_new_tokens": 5}, "parameters.min_new_tokens"),
        ({"min_new_tokens": -1}, "parameters.min_new_tokens"),
        ({"min_new_tokens": "many"}, "min_new_tokens"),  # does not parse: named as the other generate() keywords are
    ],
)
def test_bad_min_new_tokens_is_a_422_naming_it(server, params, tgi_field):
    status, body, _ = server.post("/generate", {"text": ["Hello"], **params})
    assert status == 422 and body["field"] == "min_new_tokens" and "min_new_tokens" in body["message"], body
    status, body, _ = server.post("/generate_stream", {"inputs": "Hello", "parameters": params})
    assert status == 422 and body["field"] == tgi_field and "min_new_tokens" in body["message"], body


def test_min_new_tokens_is_capped_with_max_new_tokens():
    """With BLOOM_CAP_MAX_NEW_TOKENS, a max_new_tokens past the limit is capped, and min_new_tokens with it."""
    from bloom_server.frontend.validation import validate_generate

    spec = validate_generate({"max_new_tokens": 80, "min_new_tokens": 80}, max_new_tokens_limit=64,
                             cap_max_new_tokens=True, default_remove_input=True, vocab_size=100)  # fmt: skip
    assert spec.max_new_tokens == 64 and dict(spec.params.kwargs)["min_new_tokens"] == 64
    spec = validate_generate({"max_new_tokens": 8, "min_new_tokens": 0}, max_new_tokens_limit=64,
                             cap_max_new_tokens=False, default_remove_input=True, vocab_size=100)  # fmt: skip
    assert "min_new_tokens" not in dict(spec.params.kwargs)  # 0 changes nothing: batched with requests without it
