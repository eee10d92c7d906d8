"""KServe's Open Inference Protocol (v2) and v1 predict against a real server."""

from __future__ import annotations


def greedy(server, prompt: str, n: int) -> str:
    return server.post("/generate", {"text": [prompt], "max_new_tokens": n})[1]["text"][0]


def test_v2_health_and_metadata(server):
    assert server.get("/v2/health/live")[:2] == (200, {"live": True})
    status, body, _ = server.get("/v2/health/ready")
    assert status == 200 and body == {"ready": True}
    status, body, _ = server.get("/v2/models/tiny-bloom")
    assert status == 200 and body["name"] == "tiny-bloom"
    assert body["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"] for o in body["outputs"]} == {"text_output", "generated_tokens", "finish_reason"}
    assert server.get("/v2/models/tiny-bloom/ready")[1] == {"name": "tiny-bloom", "ready": True}
    status, body, _ = server.get("/v2/models/nope")
    assert status == 404 and "nope" in body["error"]


def test_v2_infer_bytes_tensor(server):
    req = {
        "id": "abc",
        "inputs": [{"name": "text_input", "shape": [2], "datatype": "BYTES", "data": ["Deepspeed is", "Hello"]}],
        "parameters": {"max_new_tokens": 5},
    }
    status, body, headers = server.post("/v2/models/tiny-bloom/infer", req)
    assert status == 200, body
    assert body["model_name"] == "tiny-bloom" and body["id"] == "abc"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["text_output"]["datatype"] == "BYTES" and out["text_output"]["shape"] == [2]
    assert out["text_output"]["data"] == [greedy(server, "Deepspeed is", 5), greedy(server, "Hello", 5)]
    assert out["generated_tokens"]["data"] == [5, 5]
    assert headers["x-generated-tokens"] == "10"
    only = dict(req, outputs=[{"name": "text_output"}])
    assert [o["name"] for o in server.post("/v2/models/tiny-bloom/infer", only)[1]["outputs"]] == ["text_output"]


def test_v2_infer_bad_input_is_400_naming_the_field(server):
    base = {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    cases = [
        (dict(base, parameters={"max_new_tokens": 1000}), "max_new_tokens"),
        (dict(base, parameters={"temperature": "hot"}), "temperature"),
        ({"inputs": [{"name": "t", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, "datatype"),
        ({"inputs": [{"name": "t", "shape": [3], "datatype": "BYTES", "data": ["a"]}]}, "data"),
        ({"inputs": []}, "inputs"),
    ]
    for body, field in cases:
        status, resp, _ = server.post("/v2/models/tiny-bloom/infer", body)
        assert status == 400, (body, resp)
        assert set(resp) == {"error", "message", "field", "limit"} and field in resp["error"], resp
    assert server.post("/v2/models/other/infer", base)[0] == 404


def test_v1_predict(server):
    status, body, _ = server.post(
        "/v1/models/tiny-bloom:predict",
        {"instances": ["Deepspeed is", {"text": "Hello"}], "parameters": {"max_new_tokens": 4}},
    )
    assert status == 200, body
    assert body == {"predictions": [greedy(server, "Deepspeed is", 4), greedy(server, "Hello", 4)]}
    status, body, _ = server.post("/v1/models/tiny-bloom:predict", {"instances": [""]})
    assert status == 400 and "instances[0]" in body["error"]
    assert server.post("/v1/models/other:predict", {"instances": ["x"]})[0] == 404
