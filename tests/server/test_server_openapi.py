"""`/openapi.json` and `/docs` are FastAPI's own, generated from the request and response models
the server really uses; schemathesis fuzzes the live server from that schema and finds no 5xx.

The full run (minutes, every check) is documented in docs/serving.md; here a bounded one
guards against regressions."""

from __future__ import annotations

import json

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from serverutil import API_KEY
from cdlm.server import protocol as P
from cdlm.server import responses as R

MODEL = "cdlm-default"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def openapi(live) -> dict:
    r = httpx.get(live.url + "/openapi.json", timeout=30)   # no API key needed
    assert r.status_code == 200
    return r.json()


def test_schema_lists_every_route_and_the_real_request_models(live, openapi):
    assert set(openapi["paths"]) == {"/health", "/metrics", "/v1/models", "/v1/models/{model_id}",
                                     "/v1/completions", "/v1/chat/completions"}
    schemas = openapi["components"]["schemas"]
    for model in (P.CompletionRequest, P.ChatCompletionRequest, R.CompletionResponse,
                  R.ChatCompletionResponse, R.ChatCompletionChunk, R.ErrorResponse):
        assert set(schemas[model.__name__]["properties"]) == set(model.model_fields), model
    body = openapi["paths"]["/v1/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("/CompletionRequest")
    # the served model's limits are in it
    props = schemas["CompletionRequest"]["properties"]
    assert props["max_tokens"]["maximum"] == live.state.max_model_len
    assert props["temperature"]["maximum"] == 2 and props["n"]["maximum"] == P.MAX_N
    responses = openapi["paths"]["/v1/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "415", "429", "500", "503"} <= set(responses)
    assert "text/event-stream" in responses["200"]["content"]


def test_docs_page_is_served(live):
    r = httpx.get(live.url + "/docs", timeout=30)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "/openapi.json" in r.text


def test_real_responses_match_the_response_models(live):
    """The bodies on the wire validate against the models the schema is generated from."""
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=60) as c:
        R.CompletionResponse.model_validate(c.post("/v1/completions", json={
            "model": MODEL, "prompt": "hi", "max_tokens": 4, "n": 2}).json())
        R.ChatCompletionResponse.model_validate(c.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4}).json())
        R.ModelList.model_validate(c.get("/v1/models").json())
        R.ErrorResponse.model_validate(c.post("/v1/completions", json={"prompt": ""}).json())
        R.Health.model_validate(c.get("/health").json())
        with c.stream("POST", "/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 40, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        R.ChatCompletionChunk.model_validate(json.loads(event))


def test_schemathesis_finds_no_server_error(live, tmp_path):
    """The schemathesis CLI against the live server, bounded (a few examples per operation,
    seeded): generated requests, valid and invalid, never get a 5xx."""
    cli = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [str(cli), "run", live.url + "/openapi.json", "--checks", "not_a_server_error",
         "--phases", "examples,coverage,fuzzing", "--max-examples", "8", "--seed", "7",
         "--workers", "1", "--request-timeout", "60", "--max-time", "40",
         "-H", f"Authorization: Bearer {API_KEY}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "generated" in result.stdout and "not_a_server_error" not in result.stderr
