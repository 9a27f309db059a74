"""Helpers: a real engine (the bundled default model) behind a real uvicorn server on a
loopback port. No mocks: the tests talk HTTP to it with the `openai` package and httpx."""

from __future__ import annotations

import argparse
import socket
import threading
import time
from typing import Any

import httpx
import uvicorn

API_KEY = "test-key-123"


class LiveServer:
    """The app of `server.cli.build_app` served by uvicorn in a background thread."""

    def __init__(self, app: Any, timeout_keep_alive: float = 5.0) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        from cdlm.server.cli import uvicorn_config
        self.server = uvicorn.Server(uvicorn_config(app, log_level="warning",
                                                    timeout_keep_alive=timeout_keep_alive,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def state(self) -> Any:
        return self.app.state.cdlm

    @property
    def engine(self) -> Any:  # the LLMEngine
        return self.state.engine.engine

    def start(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def serve_settings(**overrides: Any) -> dict[str, Any]:
    from cdlm.server.cli import add_serve_arguments, resolve_settings

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    settings = resolve_settings(parser.parse_args([]), environ={})
    settings.update(overrides)
    return settings


def make_server(**overrides: Any) -> LiveServer:
    from cdlm.server.cli import build_app, build_engine

    settings = serve_settings(**overrides)
    engine = build_engine(settings)
    return LiveServer(build_app(engine, settings), settings["timeout_keep_alive"]).start()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """Read one sample from Prometheus text format."""
    want = name
    if labels:
        want += "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == want:
            return float(value)
    return None


def scrape(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=10).text


def sse_events(lines: list[str]) -> list[str]:
    """`data:` payloads of an SSE body, checking the framing as we go."""
    events = []
    for line in lines:
        if line == "":
            continue
        assert line.startswith("data: "), f"unexpected SSE line {line!r}"
        events.append(line[len("data: "):])
    return events
