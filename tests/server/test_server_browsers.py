"""Browsers: a web page cannot start generations on a local server with a plain form post
(415 unless the body is sent as JSON), and CORS is opt-in (`--allowed-origins`)."""

from __future__ import annotations

import json

import httpx
import pytest

from serverutil import API_KEY, make_server, metric_value, scrape

MODEL = "cdlm-default"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BODY = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode()


def _finished(url: str) -> float:
    text = scrape(url)
    return sum(metric_value(text, "cdlm:request_success_total", {"finished_reason": r}) or 0
               for r in ("stop", "length", "abort"))


@pytest.mark.parametrize("content_type", [
    "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x", None])
def test_posts_not_sent_as_json_are_415_and_start_nothing(live, content_type):
    before = _finished(live.url)
    headers = dict(AUTH)
    if content_type is not None:
        headers["Content-Type"] = content_type
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = httpx.post(live.url + path, content=BODY, headers=headers, timeout=30)
        assert r.status_code == 415, r.text
        assert r.json()["error"]["code"] == "unsupported_media_type"
    assert _finished(live.url) == before   # no generation ran


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON"])
def test_json_content_types_are_accepted(live, content_type):
    r = httpx.post(live.url + "/v1/completions", content=BODY, timeout=30,
                   headers={**AUTH, "Content-Type": content_type})
    assert r.status_code == 200, r.text


def test_no_cors_headers_by_default(live):
    origin = {"Origin": "http://evil.example"}
    r = httpx.get(live.url + "/v1/models", headers={**AUTH, **origin}, timeout=30)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = httpx.options(live.url + "/v1/completions", timeout=30, headers={
        **origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert "access-control-allow-origin" not in pre.headers   # the browser will refuse


def test_allowed_origins_opt_in():
    srv = make_server(api_key=API_KEY, allowed_origins=["http://app.example"])
    try:
        preflight = {"Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type"}
        ok = httpx.options(srv.url + "/v1/completions", timeout=30,
                           headers={"Origin": "http://app.example", **preflight})
        assert ok.status_code == 200   # answered before the API key check
        assert ok.headers["access-control-allow-origin"] == "http://app.example"
        bad = httpx.options(srv.url + "/v1/completions", timeout=30,
                            headers={"Origin": "http://evil.example", **preflight})
        assert "access-control-allow-origin" not in bad.headers
        r = httpx.post(srv.url + "/v1/completions", content=BODY, timeout=30,
                       headers={**AUTH, "Origin": "http://app.example",
                                "Content-Type": "application/json"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://app.example"
    finally:
        srv.stop()
