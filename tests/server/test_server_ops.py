"""Operations with real parts: a real Prometheus scraping /metrics, and `cdlm serve` (in a
subprocess, through the package CLI) draining on SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from serverutil import API_KEY, metric_value, scrape

MODEL = "cdlm-default"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="Debian package `prometheus` not installed "
                           "(scripts/install_system_deps.sh)")
def test_prometheus_scrapes_request_count(live, tmp_path):
    target = f"127.0.0.1:{live.port}"
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: cdlm\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: ['{target}']\n")
    prom_port = _free_port()
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    prom_url = f"http://127.0.0.1:{prom_port}"
    try:
        for _ in range(3):
            r = httpx.post(live.url + "/v1/completions", headers=AUTH, timeout=60,
                           json={"model": MODEL, "prompt": "count me", "max_tokens": 4})
            assert r.status_code == 200
        expected = sum(metric_value(scrape(live.url), "cdlm:request_success_total",
                                    {"finished_reason": reason}) for reason in
                       ("stop", "length", "abort"))
        assert expected >= 3
        query = "sum(cdlm:request_success_total)"
        deadline = time.monotonic() + 45
        got = None
        while time.monotonic() < deadline:
            try:
                res = httpx.get(prom_url + "/api/v1/query", params={"query": query},
                                timeout=5).json()
                if res.get("status") == "success" and res["data"]["result"]:
                    got = float(res["data"]["result"][0]["value"][1])
                    if got == expected:
                        break
            except httpx.HTTPError:
                pass  # prometheus still starting
            assert prom.poll() is None, prom.stderr.read().decode()[-2000:]
            time.sleep(0.5)
        assert got == expected, (got, expected)
        # the target is healthy and other series made it too
        targets = httpx.get(prom_url + "/api/v1/targets", timeout=5).json()
        assert targets["data"]["activeTargets"][0]["health"] == "up"
        res = httpx.get(prom_url + "/api/v1/query", timeout=5,
                        params={"query": "cdlm:engine_healthy"}).json()
        assert float(res["data"]["result"][0]["value"][1]) == 1.0
    finally:
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()


def _stream_in_thread(url: str, body: dict, out: dict, key: str,
                      first_chunk: threading.Event) -> threading.Thread:
    def run() -> None:
        frames = []
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                out[key + "_status"] = r.status_code
                for line in r.iter_lines():
                    if line:
                        frames.append(line)
                        first_chunk.set()
        except httpx.HTTPError as exc:
            out[key + "_exc"] = repr(exc)
        out[key] = frames
        first_chunk.set()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_sigterm_drains_then_exits(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    drain = 2.0
    env = {**os.environ, "CDLM_PORT": str(port), "CDLM_DRAIN_TIMEOUT": str(drain),
           "CDLM_LOG_LEVEL": "warning"}
    # `cdlm serve`, through the package CLI that users run
    proc = subprocess.Popen([sys.executable, "-m", "cdlm.cli", "serve"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        ctx = httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["max_model_len"]
        out: dict = {}
        short_started, long_started = threading.Event(), threading.Event()
        # `long` (16 choices over the whole context, one token per step) cannot finish
        # within the drain timeout; `short` (two blocks) can.
        t_long = _stream_in_thread(url, {"prompt": "long", "max_tokens": ctx - 64, "n": 16,
                                         "stream": True, "ignore_eos": True, "temperature": 0,
                                         "tokens_per_step": 1},
                                   out, "long", long_started)
        assert long_started.wait(30)
        t_short = _stream_in_thread(url, {"prompt": "short", "max_tokens": 64, "stream": True,
                                          "ignore_eos": True, "temperature": 0},
                                    out, "short", short_started)
        assert short_started.wait(30)
        t_sig = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # admission stops at once: /health and new requests answer 503
        time.sleep(0.3)
        h = httpx.get(url + "/health", timeout=5)
        assert h.status_code == 503 and h.json()["status"] == "draining"
        r = httpx.post(url + "/v1/completions", json={"prompt": "late", "max_tokens": 4},
                       timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        t_short.join(30)
        t_long.join(30)
        rc = proc.wait(30)
        elapsed = time.monotonic() - t_sig
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0
    # the short request finished normally during the drain
    short = out["short"]
    assert short[-1] == "data: [DONE]"
    assert json.loads(short[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert sum(len(json.loads(f[6:])["choices"][0]["text"]) for f in short[:-1]
               if '"choices": [{' in f) > 0
    # the long one was cut at the drain timeout with a clear in-band error
    long_frames = out["long"]
    assert long_frames[-1] == "data: [DONE]"
    err = json.loads(long_frames[-2][6:])["error"]
    assert "drain" in err["message"] or "shutting down" in err["message"]
    assert drain - 0.5 < elapsed < drain + 15
