"""Admission: decided where a request arrives (a 429 does not wait for the running step), and
the n choices and prompts of one request are handed over together and counted together."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from serverutil import API_KEY, make_server

MODEL = "cdlm-default"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _wait(pred, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _steps_for(live, body: dict) -> tuple[dict, int]:
    before = live.engine.stats.num_steps
    r = httpx.post(live.url + "/v1/completions", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return r.json(), live.engine.stats.num_steps - before


def test_n_choices_are_admitted_in_the_same_step(live):
    """Eight choices of 32 tokens at one token per step: 32 engine steps when they are
    admitted together (one per step, as before, took 39)."""
    body = {"model": MODEL, "prompt": "together", "max_tokens": 32, "n": 8, "temperature": 0,
            "ignore_eos": True, "tokens_per_step": 1}
    out, steps = _steps_for(live, body)
    assert len(out["choices"]) == 8 and out["usage"]["completion_tokens"] == 8 * 32
    assert steps == 32


def test_batched_prompts_are_admitted_in_the_same_step(live):
    body = {"model": MODEL, "prompt": ["one", "two", "three", "four"], "n": 2,
            "max_tokens": 32, "temperature": 0, "ignore_eos": True, "tokens_per_step": 1}
    out, steps = _steps_for(live, body)
    assert sorted(c["index"] for c in out["choices"]) == list(range(8))
    assert steps == 32


def test_more_generations_than_the_queue_holds_is_a_clear_400(live):
    limit = live.state.engine.max_queue
    r = httpx.post(live.url + "/v1/completions", headers=AUTH, timeout=30, json={
        "model": MODEL, "prompt": ["a", "b", "c"], "n": limit // 2, "max_tokens": 2})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "n" and str(limit) in err["message"]
    r = httpx.post(live.url + "/v1/completions", headers=AUTH, timeout=30, json={
        "model": MODEL, "prompt": ["p"] * (limit + 1), "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


# ------------------------------------------------------------------------------------------
# A server whose every engine step takes SLOW_STEP seconds (its real runner, slowed down).

SLOW_STEP = 1.5


@pytest.fixture(scope="module")
def slow():
    srv = make_server(max_num_seqs=1, max_queue=4, kv_cache_tokens=16384)
    runner = srv.engine.runner
    real_execute = runner.execute

    def slow_execute(seqs):
        time.sleep(SLOW_STEP)
        return real_execute(seqs)

    runner.execute = slow_execute
    yield srv
    runner.execute = real_execute
    srv.stop()


def _fire(url: str, body: dict, out: dict, key: str) -> threading.Thread:
    def run() -> None:
        try:
            out[key] = httpx.post(url + "/v1/completions", json=body, timeout=60).status_code
        except httpx.HTTPError as exc:
            out[key] = repr(exc)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_queue_full_is_refused_without_waiting_for_the_step(slow):
    long = {"model": MODEL, "prompt": "long", "max_tokens": 64, "temperature": 0,
            "ignore_eos": True, "tokens_per_step": 1}
    out: dict = {}
    runner = _fire(slow.url, long, out, "running")
    _wait(lambda: slow.engine.stats.num_running == 1)
    # One group of four fills the queue (max_queue=4) while the runner's step is sleeping.
    group = _fire(slow.url, {**long, "n": 4}, out, "group")
    _wait(lambda: slow.state.engine.num_queued == 4)
    t0 = time.monotonic()
    r = httpx.post(slow.url + "/v1/completions", json={**long, "max_tokens": 2}, timeout=30)
    took = time.monotonic() - t0
    assert r.status_code == 429, r.text
    assert took < SLOW_STEP / 2, took   # decided at arrival, not after the running step
    assert int(r.headers["Retry-After"]) >= 1 and int(r.headers["retry-after-ms"]) >= 1
    assert r.json()["error"]["code"] == "queue_full"
    # A group larger than the whole queue can never be admitted: 400, not 429.
    r = httpx.post(slow.url + "/v1/completions", json={**long, "n": 5}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    # Everything is aborted (as at a drain timeout) and the server is idle again.
    slow.state.engine.abort_all("test over")
    runner.join(30)
    group.join(30)
    _wait(lambda: not slow.engine.has_unfinished_requests() and slow.state.engine.num_queued == 0)
    assert out == {"running": 503, "group": 503}
