"""scripts/kserve_schema.py: the rules that turn KServe's CRD into the strict schema tests/test_manifests.py uses
(the fixture itself was written by it from the v0.20.0 CRD: tests/fixtures/kserve/README.md)."""

from __future__ import annotations

import importlib.util
import json

from helpers import REPO

spec = importlib.util.spec_from_file_location("kserve_schema", REPO / "scripts" / "kserve_schema.py")
kserve_schema = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kserve_schema)

CRD = {"spec": {"versions": [{"name": "v1alpha1", "schema": {}}, {"name": "v1beta1", "schema": {"openAPIV3Schema": {
    "type": "object",
    "properties": {
        "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
        "spec": {"type": "object", "properties": {
            "predictor": {"type": "object", "properties": {"minReplicas": {"type": "integer", "nullable": True}}},
            "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {}}},
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
        }},
        "status": {"type": "object", "properties": {"url": {"type": "object", "properties": {"host": {}}}}},
    },
}}}]}}  # fmt: skip


def test_strict_rules():
    out = kserve_schema.build(CRD, "vX", "abc")
    spec_ = out["properties"]["spec"]
    predictor = spec_["properties"]["predictor"]
    assert out["additionalProperties"] is False and spec_["additionalProperties"] is False
    assert predictor["additionalProperties"] is False
    assert predictor["properties"]["minReplicas"]["type"] == ["integer", "null"]
    assert "additionalProperties" not in spec_["properties"]["open"]  # preserves unknown fields: stays open
    assert spec_["properties"]["map"]["additionalProperties"] == {"type": "string"}
    status = out["properties"]["status"]
    assert "additionalProperties" not in status and status["properties"]["url"]["additionalProperties"] is False
    assert out["properties"]["kind"] == {"const": "InferenceService"}
    assert out["required"] == ["apiVersion", "kind", "metadata", "spec"]
    assert out["properties"]["metadata"]["properties"]["name"]["pattern"] == kserve_schema.NAME_PATTERN
    assert "vX" in out["$comment"] and "abc" in out["$comment"]


def test_the_fixture_is_the_scripts_output_format():
    text = (REPO / "tests" / "fixtures" / "kserve" / "inferenceservice_v1beta1-strict.json").read_text()
    schema = json.loads(text)
    assert text == json.dumps(schema, indent=1, sort_keys=True) + "\n"
    assert "tag v0.20.0 (commit 1fb781055dd1567164358233e1125142ca6ef1fe)" in schema["$comment"]
