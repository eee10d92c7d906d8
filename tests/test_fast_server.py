"""`bloom-server serve --backend fast` answers like `--backend hf` on the same checkpoint: one rank, and two ranks
under torchrun (tensor-parallel halves over gloo, through the real lockstep runtime)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from helpers import ServerProcess, free_port

ARGS = ["--max-input-length", "64", "--max-new-tokens", "64", "--max-batch-size", "16", "--max-total-tokens", "96"]
PROMPTS = ["Deepspeed is", "The quick brown fox jumps over", "Open the file", "A"]


@pytest.fixture(scope="module")
def fast_server(tiny_model_dir, tmp_path_factory):
    with ServerProcess(["--model", str(tiny_model_dir), "--backend", "fast", *ARGS], free_port(),
                       log_path=tmp_path_factory.mktemp("logs") / "fast.log") as srv:  # fmt: skip
        yield srv


def _texts(srv, body):
    status, out, _ = srv.post("/generate", body)
    assert status == 200, out
    return out["text"], out["num_generated_tokens"]


def test_one_request_of_mixed_prompts_gets_the_hf_backends_text(server, fast_server):
    body = {"text": PROMPTS, "max_new_tokens": 24, "min_length": 100}
    assert _texts(fast_server, body) == _texts(server, body)


def test_greedy_with_eos_penalties_and_single_prompts_match(server, fast_server):
    for body in (
        {"text": ["Open the file"], "max_new_tokens": 40},
        {"text": ["The quick brown fox"], "max_new_tokens": 20, "repetition_penalty": 1.5, "min_length": 10},
        {"text": ["Deepspeed is", "Open the"], "max_new_tokens": 16, "no_repeat_ngram_size": 2, "min_length": 50},
    ):
        assert _texts(fast_server, body) == _texts(server, body), body


def test_forward_nll_matches(server, fast_server):
    body = {"conditioning_text": ["Deepspeed is", "Hello"], "response": [" a library", " world and more"]}
    s1, a, _ = server.post("/forward", body)
    s2, b, _ = fast_server.post("/forward", body)
    assert s1 == s2 == 200
    assert abs(a["nll"] - b["nll"]) < 1e-4 * max(1.0, abs(a["nll"]))


def test_sampling_runs_and_respects_lengths(fast_server):
    texts, counts = _texts(fast_server, {"text": PROMPTS, "max_new_tokens": 9, "min_length": 100, "do_sample": True,
                                         "top_k": 20, "top_p": 0.9, "temperature": 0.8})  # fmt: skip
    assert counts == [9] * len(PROMPTS) and all(isinstance(t, str) for t in texts)


@pytest.mark.slow
def test_two_tensor_parallel_ranks_answer_like_one(server, tiny_model_dir, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    srv = ServerProcess(
        ["--model", str(tiny_model_dir), "--backend", "fast", *ARGS],
        free_port(),
        launcher=[torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "bloom_server"],
        log_path=tmp_path / "torchrun.log",
    )
    try:
        srv.wait_ready()
        body = {"text": PROMPTS, "max_new_tokens": 16, "min_length": 100}
        assert _texts(srv, body) == _texts(server, body)
        assert "2 of 4 heads" in srv.log()
    finally:
        srv.stop()


def _stream(srv, body):
    import json
    import urllib.request

    req = urllib.request.Request(srv.url + "/generate_stream", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [json.loads(line[5:]) for line in r.read().decode().splitlines() if line.startswith("data:")]
    return [(e["token"]["id"], e["token"]["logprob"]) for e in events], events[-1]["generated_text"]


def test_token_stream_matches_the_hf_backends(server, fast_server):
    body = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 10, "details": True}}
    (fast_tokens, fast_text), (hf_tokens, hf_text) = _stream(fast_server, body), _stream(server, body)
    assert [t for t, _ in fast_tokens] == [t for t, _ in hf_tokens] and len(fast_tokens) == 10
    assert [lp for _, lp in fast_tokens] == pytest.approx([lp for _, lp in hf_tokens], abs=1e-4)
    assert fast_text == hf_text
