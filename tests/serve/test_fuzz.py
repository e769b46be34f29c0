"""Property-based fuzzing of the JSON API from its own OpenAPI schema (hypothesis): for every operation,
requests built from the schema (valid, out-of-range and wrongly typed values mixed) never make the server
fail (no 5xx), and every answer is JSON of the documented kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monoscope.serve import create_app

OK = {200, 404, 413, 422, 429}


@pytest.fixture(scope="module")
def app_client(tiny_run: Path) -> tuple[TestClient, dict[str, Any]]:
    c = TestClient(create_app(tiny_run, device="cpu", compute_dtype="fp32"))
    return c, c.get("/openapi.json").json()


def _resolve(schema: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        schema = spec["components"]["schemas"][name]
    return schema


def _junk() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40),
                     st.floats(allow_nan=False, allow_infinity=False),  # JSON carries neither
                     st.text(max_size=20), st.lists(st.integers(), max_size=3))


def strategy(schema: dict[str, Any], spec: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values for a JSON schema: mostly inside its bounds, sometimes just outside, sometimes any junk."""
    schema = _resolve(schema, spec)
    if "anyOf" in schema:
        return st.one_of(*[strategy(s, spec, depth) for s in schema["anyOf"]])
    if "enum" in schema or "const" in schema:
        vals = schema.get("enum") or [schema["const"]]
        return st.one_of(st.sampled_from(vals), st.text(max_size=8))
    t = schema.get("type")
    if t == "integer":
        lo, hi = schema.get("minimum", -1000), schema.get("maximum", 300)
        inside = st.integers(int(lo), int(hi))
        return st.one_of(inside, inside, st.integers(int(lo) - 3, int(lo) - 1), st.integers(int(hi) + 1, int(hi) + 3))
    if t == "number":
        lo, hi = schema.get("minimum", -100.0), schema.get("maximum", 100.0)
        return st.one_of(st.floats(lo, hi, allow_nan=False, allow_infinity=False),
                         st.floats(hi, hi + 10, allow_nan=False, allow_infinity=False), st.integers(int(lo), int(hi)))
    if t == "string":
        n = min(int(schema.get("maxLength", 40)), 40)
        return st.one_of(st.text(min_size=int(schema.get("minLength", 0)), max_size=n),
                         st.sampled_from(["the quick fox", "<script>alert(1)</script>", "def f():", " ", ""]))
    if t == "array" and depth < 3:
        items = strategy(schema.get("items", {}), spec, depth + 1)
        lo = int(schema.get("minItems", 0))
        return st.lists(items, min_size=max(lo - 1, 0), max_size=min(int(schema.get("maxItems", 3)), 3) + 1)
    if t == "object" and depth < 3:
        props = schema.get("properties", {})
        req = set(schema.get("required", []))
        return st.fixed_dictionaries({k: strategy(v, spec, depth + 1) for k, v in props.items() if k in req},
                                     optional={k: strategy(v, spec, depth + 1) for k, v in props.items()
                                               if k not in req})
    return _junk()


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, ops in spec["paths"].items() for method, op in ops.items()]


def test_schema_lists_the_json_api(app_client: tuple[TestClient, dict[str, Any]]) -> None:
    _, spec = app_client
    assert {(p, m) for p, m, _ in operations(spec)} == {
        ("/sae/{name}/map.json", "get"), ("/sae/{name}/feature/{fid}.json", "get"), ("/api/site", "get"),
        ("/api/sae/{name}/labels", "get"), ("/api/sae/{name}/text", "post"), ("/api/sae/{name}/contrast", "post"),
        ("/api/sae/{name}/activations", "post"), ("/api/sae/{name}/steer", "post"),
        ("/api/sae/{name}/feature/{fid}/ablation", "post")}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_every_operation(app_client: tuple[TestClient, dict[str, Any]], data: st.DataObject) -> None:
    client, spec = app_client
    path, method, op = data.draw(st.sampled_from(operations(spec)))
    url = path
    query: dict[str, Any] = {}
    for p in op.get("parameters", []):
        if p["name"] == "name":
            v = data.draw(st.sampled_from(["sae", "sae-2x", "nope", "..", "sae%2F.."]))
        else:
            v = data.draw(strategy(p["schema"], spec))
        if p["in"] == "path":
            url = url.replace("{" + p["name"] + "}", str(v))
        elif v is not None and (p.get("required") or data.draw(st.booleans())):
            query[p["name"]] = v if not isinstance(v, list) else str(v)
    kw: dict[str, Any] = {"params": query}
    if "requestBody" in op:
        body_schema = op["requestBody"]["content"]["application/json"]["schema"]
        body = data.draw(st.one_of(strategy(body_schema, spec), _junk()))
        if isinstance(body, dict) and "max_new_tokens" in body and isinstance(body["max_new_tokens"], int):
            body["max_new_tokens"] = min(body["max_new_tokens"], 8) if body["max_new_tokens"] > 0 else 0
        kw["json"] = body
    r = client.request(method.upper(), url, **kw)
    assert r.status_code in OK, (method, url, kw, r.status_code, r.text[:300])
    if r.status_code != 200:
        assert isinstance(r.json()["detail"], str | list), r.text
    elif url.endswith("/steer"):
        lines = [ln for ln in r.text.splitlines() if ln]
        assert lines and ("done" in lines[-1] or "error" in lines[-1])
    else:
        assert isinstance(r.json(), dict)
