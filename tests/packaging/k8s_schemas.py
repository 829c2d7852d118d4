#!/usr/bin/env python3
"""Writes JSON schemas for kubeconform from Kubernetes' OpenAPI document.

Usage: k8s_schemas.py SWAGGER_JSON OUT_DIR

One file per kind, named as kubeconform's default schema registry names
them (`deployment-apps-v1.json`, `pod-v1.json`), so that
`kubeconform -schema-location 'OUT_DIR/{{ .ResourceKind }}{{ .KindSuffix }}.json'`
finds them. Each holds the kind's definition and every definition it
refers to. Strict: an object with declared properties accepts no others
(a misspelt field fails), as kubeconform's strict schemas do.
IntOrString and Quantity accept a string or a number, as the API server does.
"""
import json
import sys
from pathlib import Path

INT_OR_STRING = "io.k8s.apimachinery.pkg.util.intstr.IntOrString"
QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"


def refs(node, found):
    """Names of the definitions NODE refers to, added to FOUND."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/definitions/"):
            found.add(ref[len("#/definitions/"):])
        for value in node.values():
            refs(value, found)
    elif isinstance(node, list):
        for value in node:
            refs(value, found)
    return found


def strict(node):
    """Closes every object schema with properties to other properties."""
    if isinstance(node, dict):
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)


def main():
    swagger, out = Path(sys.argv[1]), Path(sys.argv[2])
    definitions = json.loads(swagger.read_text())["definitions"]
    definitions[INT_OR_STRING] = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
    definitions[QUANTITY] = {"oneOf": [{"type": "string"}, {"type": "number"}]}
    for definition in definitions.values():
        strict(definition)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for name, definition in definitions.items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            group, version, kind = gvk["group"], gvk["version"], gvk["kind"]
            if kind.endswith("List") or not definition.get("properties", {}).get("metadata"):
                continue
            needed, todo = set(), [name]
            while todo:
                current = todo.pop()
                if current in needed:
                    continue
                needed.add(current)
                todo.extend(refs(definitions[current], set()) - needed)
            schema = {
                "$schema": "http://json-schema.org/schema#",
                "$ref": f"#/definitions/{name}",
                "definitions": {n: definitions[n] for n in sorted(needed)},
            }
            suffix = f"-{group.split('.')[0]}-{version}" if group else f"-{version}"
            (out / f"{kind.lower()}{suffix}.json").write_text(json.dumps(schema))
            written += 1
    print(f"{written} schemas in {out}")


if __name__ == "__main__":
    main()
