"""Work per request is bounded by the context, not by the body: huge prompts are refused fast
while /health keeps answering; the request-body limit is configurable."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from serverutil import API_KEY, make_server

MODEL = "cdlm-default"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


class HealthProbe:
    """Polls /health from another thread and records the slowest answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.worst = 0.0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as c:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    if c.get(self.url + "/health").status_code != 200:
                        self.failures.append("status")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.worst = max(self.worst, time.monotonic() - t0)
                time.sleep(0.02)

    def __enter__(self) -> "HealthProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)


def _post_raw(url: str, body: bytes, timeout: float = 60) -> tuple[int, dict, float]:
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/completions", content=body, timeout=timeout,
                   headers={**AUTH, "Content-Type": "application/json"})
    return r.status_code, r.json(), time.monotonic() - t0


@pytest.mark.parametrize("megabytes", [12, 40])
def test_huge_text_prompt_is_refused_fast_and_health_stays_prompt(live, megabytes):
    """12 MB: under the 16 MiB body limit but over what the context can hold (400, untokenized);
    40 MB: over the body limit (413, unparsed). Either way in well under the minutes that
    tokenizing it in full took, and /health answers within a second throughout."""
    body = json.dumps({"model": MODEL, "max_tokens": 4,
                       "prompt": "seven apples " * (megabytes * (1 << 20) // 13)}).encode()
    with HealthProbe(live.url) as probe:
        time.sleep(0.1)
        status, err, took = _post_raw(live.url, body)
        time.sleep(0.2)
    expected = 413 if megabytes > 16 else 400
    assert status == expected, err
    assert err["error"]["code"] == ("body_too_large" if expected == 413
                                    else "context_length_exceeded")
    assert took < 10, took
    assert not probe.failures and probe.worst < 2.0, (probe.worst, probe.failures)


def test_long_token_id_prompt_and_long_chat_are_refused_without_a_scan(live):
    ctx = live.state.max_model_len
    ids = json.dumps({"model": MODEL, "max_tokens": 4, "prompt": [7] * 1_500_000}).encode()
    with HealthProbe(live.url) as probe:
        status, err, took = _post_raw(live.url, ids)
        assert status == 400 and err["error"]["code"] == "context_length_exceeded", err
        assert err["error"]["param"] == "prompt" and str(ctx) in err["error"]["message"]
        chat = httpx.post(live.url + "/v1/chat/completions", headers=AUTH, timeout=60, json={
            "model": MODEL, "max_tokens": 4,
            "messages": [{"role": "user", "content": "seven apples " * 500_000}]})
    assert chat.status_code == 400, chat.text
    assert chat.json()["error"]["code"] == "context_length_exceeded"
    assert took < 10 and not probe.failures and probe.worst < 2.0, (took, probe.worst)


def test_text_within_the_cheap_bound_is_tokenized_and_checked_exactly(live):
    ctx = live.state.max_model_len
    r = httpx.post(live.url + "/v1/completions", headers=AUTH, timeout=60, json={
        "model": MODEL, "max_tokens": 4, "prompt": "seven " * (ctx + 10)})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert f"{ctx + 10}" in err["message"] or f"{ctx + 11}" in err["message"]  # exact count


def test_request_body_limit_is_configurable():
    srv = make_server(max_request_bytes=4096)
    try:
        small = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        assert httpx.post(srv.url + "/v1/completions", json=small, timeout=30).status_code == 200
        big = {**small, "prompt": "x" * 5000}
        r = httpx.post(srv.url + "/v1/completions", json=big, timeout=30)
        assert r.status_code == 413 and "4096" in r.json()["error"]["message"]
        # chunked upload without Content-Length: counted while reading
        def chunks():
            data = json.dumps(big).encode()
            for i in range(0, len(data), 1000):
                yield data[i:i + 1000]
        r = httpx.post(srv.url + "/v1/completions", content=chunks(), timeout=30,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 413
    finally:
        srv.stop()
