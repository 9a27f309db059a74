"""A `distill`-trained student served by `cdlm serve --model BASE --lora ADAPTER` gives the
same outputs as `LLM(model=BASE, lora=ADAPTER)`."""

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

from cdlm import LLM, SamplingParams

CDLM = Path(sys.executable).parent / "cdlm"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_student(micro_world, tmp_path_factory):
    root, _ = micro_world
    base, adapter = root / "teacher" / "model", root / "student" / "adapter"
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDLM_")}
    with open(log, "w") as out:
        proc = subprocess.Popen([str(CDLM), "serve", "--model", str(base), "--lora", str(adapter),
                                 "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"cdlm serve exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise AssertionError(f"cdlm serve not healthy:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url, base, adapter
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_served_student_equals_llm(served_student):
    url, base, adapter = served_student
    llm = LLM(model=str(base), lora=str(adapter))
    prompts = ["trace : a = 3 ; b = a + 4 ; print b", "Ann has 7 apples . How many ?"]
    model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    for prompt in prompts:
        expected = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0))[0]
        resp = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0.0})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["choices"][0]["text"] == expected.text
        assert body["usage"]["completion_tokens"] == len(expected.token_ids)
