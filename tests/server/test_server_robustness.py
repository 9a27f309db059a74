"""Robustness with real parts: client disconnects, per-request faults, a full queue, a dead
engine loop. Faults are injected into a real engine (its runner raising for one prompt, its
step raising), never a mock."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from serverutil import API_KEY, make_server, metric_value, scrape

MODEL = "cdlm-default"
AUTH = {"Authorization": f"Bearer {API_KEY}"}

def long_request(srv) -> dict:
    """A request that runs many steps whatever the model: the whole context, one token per
    step, no early stop."""
    return {"model": MODEL, "prompt": "long", "temperature": 0, "ignore_eos": True,
            "tokens_per_step": 1, "max_tokens": srv.state.max_model_len - 64}


def _wait(pred, timeout: float = 10.0, interval: float = 0.01) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)
    return time.monotonic() - start


def _gauges(url: str) -> tuple[float, float]:
    text = scrape(url)
    return (metric_value(text, "cdlm:num_requests_running"),
            metric_value(text, "cdlm:kv_cache_usage_perc"))


def test_streaming_disconnect_aborts_within_a_step(live):
    LONG = long_request(live)
    idle_running, idle_kv = _gauges(live.url)
    assert idle_running == 0
    aborts = metric_value(scrape(live.url), "cdlm:request_success_total",
                          {"finished_reason": "abort"})
    with httpx.Client(base_url=live.url, timeout=30, headers=AUTH) as c:
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            assert first.startswith("data: {")
            assert _gauges(live.url)[0] == 1
            steps_at_close = live.engine.stats.num_steps
            # leave without reading the rest: closing the response closes the connection
    waited = _wait(lambda: _gauges(live.url) == (idle_running, idle_kv), timeout=5)
    # the engine stopped work on it promptly: only a handful of steps ran after the close
    # (it would need hundreds more had it kept going)
    assert live.engine.stats.num_steps - steps_at_close < 50, waited
    assert not live.engine.has_unfinished_requests()
    assert metric_value(scrape(live.url), "cdlm:request_success_total",
                        {"finished_reason": "abort"}) == aborts + 1


def test_non_streaming_disconnect_aborts(live):
    LONG = long_request(live)
    idle = _gauges(live.url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/completions", json=LONG, headers=AUTH, timeout=0.5)
    _wait(lambda: _gauges(live.url) == idle, timeout=5)
    assert not live.engine.has_unfinished_requests()


def test_raw_socket_disconnect_before_first_block(live):
    """The client vanishes right after sending: the request must not linger."""
    idle = _gauges(live.url)
    body = json.dumps({**long_request(live), "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", live.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
              + body)
    time.sleep(0.05)
    s.close()
    _wait(lambda: _gauges(live.url) == idle and not live.engine.has_unfinished_requests(),
          timeout=5)


# ------------------------------------------------------------------------------------------
# A dedicated engine: tiny limits for the 429 test, then fault injection, then death.


@pytest.fixture(scope="module")
def small():
    srv = make_server(max_num_seqs=1, max_queue=1, kv_cache_tokens=16384)
    yield srv
    srv.stop()


def test_queue_full_gets_429_with_retry_after(small):
    LONG = long_request(small)
    url = small.url
    results: dict[str, int] = {}

    def fire(key: str) -> None:
        try:
            r = httpx.post(url + "/v1/completions", json=LONG, timeout=2.0)
            results[key] = r.status_code
        except httpx.ReadTimeout:
            results[key] = -1  # still running when we gave up: expected

    threads = [threading.Thread(target=fire, args=(k,)) for k in ("a", "b")]
    threads[0].start()
    _wait(lambda: small.engine.stats.num_running == 1)
    threads[1].start()
    _wait(lambda: small.engine.scheduler.num_waiting == 1)
    r = httpx.post(url + "/v1/completions", json={**LONG, "max_tokens": 4}, timeout=10)
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) >= 1
    err = r.json()["error"]
    assert err["code"] == "queue_full" and err["type"]
    assert metric_value(scrape(url), "cdlm:request_failure_total", {"reason": "rejected"}) >= 1
    for t in threads:
        t.join()
    # both timed-out clients disconnected: their requests are aborted and memory is free
    _wait(lambda: not small.engine.has_unfinished_requests(), timeout=5)
    assert small.engine.stats.kv_cache_usage == 0.0
    ok = httpx.post(url + "/v1/completions", json={**LONG, "max_tokens": 4}, timeout=30)
    assert ok.status_code == 200


def test_fault_in_one_request_fails_only_that_request(small, monkeypatch):
    """The runner raises whenever a poisoned prompt is in the batch: the engine isolates it,
    the server answers 500 for that request only and keeps serving the other one."""
    runner = small.engine.runner
    real_execute = runner.execute
    poison = [7, 7, 7, 7, 13]

    def execute(seqs):
        if any(s.prompt_token_ids == poison for s in seqs):
            raise RuntimeError("injected fault")
        return real_execute(seqs)

    monkeypatch.setattr(runner, "execute", execute)
    # room for both requests (this server was built with one running + one waiting)
    monkeypatch.setattr(small.engine.scheduler, "max_num_seqs", 2)
    monkeypatch.setattr(small.engine.scheduler, "max_queue", 4)
    monkeypatch.setattr(small.state.engine, "max_queue", 4)   # admission in the async front

    async def both():
        async with httpx.AsyncClient(base_url=small.url, timeout=60) as c:
            good = c.post("/v1/completions", json={"model": MODEL, "prompt": "fine",
                                                   "max_tokens": 64, "ignore_eos": True,
                                                   "temperature": 0})
            bad = c.post("/v1/completions", json={"model": MODEL, "prompt": poison,
                                                  "max_tokens": 64, "temperature": 0})
            return await asyncio.gather(good, bad)

    good, bad = asyncio.run(both())
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 64
    assert bad.status_code == 500
    assert bad.json()["error"]["type"] == "server_error"
    assert httpx.get(small.url + "/health").status_code == 200
    assert metric_value(scrape(small.url), "cdlm:request_failure_total", {"reason": "error"}) >= 1
    # streaming: the failure arrives in-band, then [DONE]
    with httpx.stream("POST", small.url + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": poison, "max_tokens": 8,
                            "stream": True}) as r:
        body = r.read().decode()
    assert '"error"' in body and body.endswith("data: [DONE]\n\n")


def test_engine_death_turns_health_503(small, monkeypatch):
    """Last test on this engine: its step raises, the loop dies."""
    eng = small.engine

    def broken_step():
        raise RuntimeError("injected engine failure")

    monkeypatch.setattr(eng, "step", broken_step)
    r = httpx.post(small.url + "/v1/completions",
                   json={"model": MODEL, "prompt": "x", "max_tokens": 8}, timeout=10)
    assert r.status_code == 503
    assert "engine" in r.json()["error"]["message"].lower()
    h = httpx.get(small.url + "/health")
    assert h.status_code == 503 and h.json()["status"] == "engine_dead"
    assert metric_value(scrape(small.url), "cdlm:engine_healthy") == 0.0
    # new requests are refused at once with a clear error, not hung
    r2 = httpx.post(small.url + "/v1/completions",
                    json={"model": MODEL, "prompt": "x", "max_tokens": 8}, timeout=10)
    assert r2.status_code == 503 and r2.json()["error"]["code"] == "engine_dead"
