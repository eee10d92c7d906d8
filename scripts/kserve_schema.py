#!/usr/bin/env python3
"""Regenerate tests/fixtures/kserve/inferenceservice_v1beta1-strict.json, the JSON Schema that tests/test_manifests.py
checks every InferenceService against, from KServe's CRD:

    scripts/kserve_schema.py CRD.yaml [--tag v0.20.0 --commit SHA] [--out FILE]

CRD.yaml is `config/crd/full/serving.kserve.io_inferenceservices.yaml` of the kserve/kserve repository at the tag
(the `full` CRD: the `minimal` one leaves `spec` unvalidated). The schema is the CRD's v1beta1 openAPIV3Schema with
`nullable: true` as a "null" type, made strict: `additionalProperties: false` on every object that lists `properties`
and sets neither `additionalProperties` nor `x-kubernetes-preserve-unknown-fields` (`status` itself stays open: the controller writes it);
`apiVersion` and `kind` fixed; `apiVersion`, `kind`, `metadata`, `spec` required; `metadata` limited to ObjectMeta's
field names, with `name` matching KServe's webhook pattern. Needs PyYAML only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

DEFAULT_OUT = (
    Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "kserve" / "inferenceservice_v1beta1-strict.json"
)
SOURCE = "config/crd/full/serving.kserve.io_inferenceservices.yaml"
OBJECT_META = ("annotations", "creationTimestamp", "deletionGracePeriodSeconds", "deletionTimestamp", "finalizers",
               "generateName", "generation", "labels", "managedFields", "name", "namespace", "ownerReferences",
               "resourceVersion", "selfLink", "uid")  # fmt: skip
NAME_PATTERN = "^[a-z]([-a-z0-9]*[a-z0-9])?$"  # KServe's webhook: a DNS-1035 label


def nullable(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: nullable(v) for k, v in node.items()}
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"] if isinstance(node["type"], str) else [*node["type"], "null"]
        return node
    if isinstance(node, list):
        return [nullable(v) for v in node]
    return node


def strict(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: strict(v) for k, v in node.items()}
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [strict(v) for v in node]
    return node


def build(crd: dict, tag: str, commit: str) -> dict:
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    schema = nullable(version["schema"]["openAPIV3Schema"])
    schema = strict(schema)
    schema["properties"].get("status", {}).pop("additionalProperties", None)  # written by the controller: open
    props = schema["properties"]
    props["apiVersion"] = {"const": "serving.kserve.io/v1beta1"}
    props["kind"] = {"const": "InferenceService"}
    meta: dict[str, Any] = {name: {} for name in OBJECT_META}
    meta.update({
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "name": {"type": "string", "pattern": NAME_PATTERN},
        "namespace": {"type": "string"},
    })  # fmt: skip
    props["metadata"] = {"type": "object", "additionalProperties": False, "properties": meta, "required": ["name"]}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema["additionalProperties"] = False
    return {
        "$comment": f"Generated from the CRD's openAPIV3Schema. Source: github.com/kserve/kserve tag {tag} "
        f"(commit {commit}), {SOURCE}.",
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "KServe InferenceService serving.kserve.io/v1beta1 (strict: unknown fields rejected)",
        **schema,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("crd", type=Path, help=f"the CRD YAML ({SOURCE} at the tag)")
    p.add_argument("--tag", default="v0.20.0")
    p.add_argument("--commit", default="1fb781055dd1567164358233e1125142ca6ef1fe")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    schema = build(yaml.safe_load(args.crd.read_text()), args.tag, args.commit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
