"""A CustomResourceDefinition's OpenAPI v3 schema as a strict JSON schema, for offline checks.

    python -m deploy.crd_schema CRD.yaml VERSION > deploy/schemas/keda/KIND-GROUP-VERSION.json

The API server prunes unknown fields of a structural schema silently; for a check before
applying, an unknown (or misspelt) field should be an error instead, so every object that lists
its `properties` gets `additionalProperties: false` (unless it preserves unknown fields, or
already says what extra keys hold). `nullable` and `x-kubernetes-int-or-string` become their
JSON-schema forms. CEL rules (`x-kubernetes-validations`) have no JSON-schema form and are left
out: tests check the ones that matter to inferq.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def strict(node: Any) -> Any:
    """`node` (a CRD schema fragment) converted, recursively."""
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {
        key: strict(value) for key, value in node.items() if not key.startswith("x-kubernetes-")
    }
    if node.get("x-kubernetes-int-or-string"):
        converted.pop("type", None)
        converted["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if converted.pop("nullable", False) and "type" in converted:
        converted["type"] = [converted["type"], "null"]
    preserves_unknown = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    if "properties" in node and "additionalProperties" not in node and not preserves_unknown:
        converted["additionalProperties"] = False
    return converted


def crd_json_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    """The strict JSON schema of `version` (e.g. `v1alpha1`) of the resource `crd` defines."""
    spec = crd["spec"]
    (found,) = [v for v in spec["versions"] if v["name"] == version]
    schema: dict[str, Any] = strict(found["schema"]["openAPIV3Schema"])
    properties = schema.setdefault("properties", {})
    properties["apiVersion"] = {"type": "string", "enum": [f"{spec['group']}/{version}"]}
    properties["kind"] = {"type": "string", "enum": [spec["names"]["kind"]]}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


def main(argv: list[str] | None = None) -> int:
    """Print the JSON schema of one version of a CRD file."""
    parser = argparse.ArgumentParser(prog="python -m deploy.crd_schema")
    parser.add_argument("crd", type=Path, help="a CustomResourceDefinition YAML file")
    parser.add_argument("version", help="the version to convert, e.g. v1alpha1")
    args = parser.parse_args(argv)
    documents = [d for d in yaml.safe_load_all(args.crd.read_text(encoding="utf-8")) if d]
    (crd,) = [d for d in documents if d.get("kind") == "CustomResourceDefinition"]
    json.dump(crd_json_schema(crd, args.version), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
