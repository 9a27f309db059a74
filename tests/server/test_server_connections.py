"""Connections: idle ones are closed after --timeout-keep-alive (even one that never sends a
request, or trickles its headers), requests in progress are never cut, and an idle `cdlm serve`
exits within a second of SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serverutil import make_server

REPO = Path(__file__).resolve().parents[2]
KEEP_ALIVE = 0.5


@pytest.fixture(scope="module")
def quick():
    srv = make_server(timeout_keep_alive=KEEP_ALIVE)
    yield srv
    srv.stop()


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float:
    """Seconds until the server closed the socket (sending `trickle` one byte at a time)."""
    t0 = time.monotonic()
    sock.settimeout(0.05)
    sent = 0
    while time.monotonic() - t0 < seconds:
        if sent < len(trickle):
            try:
                sock.sendall(trickle[sent:sent + 1])
            except OSError:
                return time.monotonic() - t0
            sent += 1
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - t0
        except socket.timeout:
            pass
        except OSError:
            return time.monotonic() - t0
        time.sleep(0.15)
    raise AssertionError(f"connection still open after {seconds}s")


def test_a_connection_that_never_sends_a_request_is_closed(quick):
    with socket.create_connection(("127.0.0.1", quick.port)) as s:
        assert _closed_within(s, 10 * KEEP_ALIVE) >= KEEP_ALIVE * 0.8


def test_headers_trickled_one_byte_at_a_time_do_not_hold_a_connection(quick):
    trickle = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    with socket.create_connection(("127.0.0.1", quick.port)) as s:
        _closed_within(s, 10 * KEEP_ALIVE, trickle=trickle)


def test_an_idle_keep_alive_connection_is_closed_even_after_a_stray_byte(quick):
    with socket.create_connection(("127.0.0.1", quick.port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        assert b"200 OK" in s.recv(65536)
        s.sendall(b"G")   # uvicorn alone would now wait for the rest forever
        _closed_within(s, 10 * KEEP_ALIVE)


def test_a_request_longer_than_the_idle_timeout_is_not_cut(quick):
    body = {"prompt": "long", "max_tokens": 256, "temperature": 0, "ignore_eos": True,
            "tokens_per_step": 1}
    t0 = time.monotonic()
    with httpx.Client(timeout=120) as c:
        r = c.post(quick.url + "/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 256
        assert c.get(quick.url + "/health").status_code == 200   # same connection, reused
    assert time.monotonic() - t0 > KEEP_ALIVE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_idle_server_exits_within_a_second_of_sigterm():
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CDLM_PORT": str(port), "CDLM_LOG_LEVEL": "warning"}
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
        # idle, but with an open keep-alive connection and one that never sent anything
        keep_alive = httpx.Client(base_url=url)
        assert keep_alive.get("/health").status_code == 200
        silent = socket.create_connection(("127.0.0.1", port))
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        took = time.monotonic() - t0
        keep_alive.close()
        silent.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0
    assert took < 1.0, took
