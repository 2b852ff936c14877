"""Every REST call the ARI client can make exists in the running Asterisk's own API description."""

from __future__ import annotations

import re

from ari_push.ari import OPERATIONS
from rig.asterisk import AsteriskInstance


def _api_docs(asterisk: AsteriskInstance) -> dict[tuple[str, str], set[str]]:
    """(METHOD, path) -> declared parameter names (query, body and path), from /ari/api-docs."""
    resources = asterisk.ari("GET", "/ari/api-docs/resources.json")
    assert isinstance(resources, dict)
    out: dict[tuple[str, str], set[str]] = {}
    for api in resources["apis"]:
        name = re.sub(r"\.\{format\}$", ".json", api["path"].split("/")[-1])
        doc = asterisk.ari("GET", f"/ari/api-docs/{name}")
        assert isinstance(doc, dict)
        for entry in doc["apis"]:
            for op in entry["operations"]:
                params = {p["name"] for p in op.get("parameters", [])}
                out[(op["httpMethod"], entry["path"])] = params
    return out


def test_every_operation_is_declared_by_asterisk(ensure_asterisk: AsteriskInstance) -> None:
    docs = _api_docs(ensure_asterisk)
    assert len(docs) > 80, "api-docs looks incomplete"
    for name, (method, path, query, body) in OPERATIONS.items():
        assert (method, path) in docs, f"{name}: {method} {path} is not an ARI operation"
        declared = docs[(method, path)]
        for param in (*query, *(b.removeprefix("*") for b in body)):
            assert param in declared, f"{name}: parameter {param!r} not declared for {method} {path}"
        for placeholder in re.findall(r"\{(\w+)\}", path):
            assert placeholder in declared, f"{name}: path parameter {placeholder} not declared"


def test_contract_check_catches_a_wrong_operation(ensure_asterisk: AsteriskInstance) -> None:
    """The check above is not vacuous: a misspelt path or parameter is not in the docs."""
    docs = _api_docs(ensure_asterisk)
    assert ("POST", "/channels/{channelId}/rings") not in docs
    assert "mohclass" not in docs[("POST", "/channels/{channelId}/moh")]
