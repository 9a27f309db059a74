"""Fixtures: a real engine (the bundled default model) behind a real uvicorn server on a
loopback port. No mocks: the tests talk HTTP to it with the `openai` package and httpx."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from serverutil import API_KEY, LiveServer, make_server  # noqa: E402


@pytest.fixture(scope="session")
def live() -> LiveServer:
    """The shared server: bundled model, API key required on /v1/*."""
    srv = make_server(api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture()
def http(live: LiveServer) -> httpx.Client:
    with httpx.Client(base_url=live.url, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c
