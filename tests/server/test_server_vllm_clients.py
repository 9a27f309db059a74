"""What clients written for vLLM send (lm-evaluation-harness among them): integral floats for
integers, top_k / min_p, long stop lists, several unsupported fields at once."""

from __future__ import annotations

import httpx
import pytest

from serverutil import API_KEY

MODEL = "cdlm-default"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BASE = {"model": MODEL, "prompt": "Once upon", "temperature": 0, "ignore_eos": True}


def _post(live, body: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(live.url + path, json=body, headers=AUTH, timeout=60)


def test_integral_floats_are_accepted_where_an_integer_is_expected(live):
    r = _post(live, {**BASE, "max_tokens": 40.0, "n": 2.0, "seed": 3.0, "tokens_per_step": 4.0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == 2 and body["usage"]["completion_tokens"] == 80
    assert body["usage"]["denoising_steps"] == 2 * 10   # 40 tokens at 4 per step, per choice
    as_int = _post(live, {**BASE, "max_tokens": 40, "n": 2, "seed": 3, "tokens_per_step": 4})
    assert [c["text"] for c in as_int.json()["choices"]] == [c["text"] for c in body["choices"]]
    chat = _post(live, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                        "max_completion_tokens": 5.0, "temperature": 0, "ignore_eos": True},
                 "/v1/chat/completions")
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("field,value", [("max_tokens", 40.5), ("n", "2"), ("seed", True)])
def test_non_integral_values_are_still_refused(live, field, value):
    r = _post(live, {**BASE, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    inf = httpx.post(live.url + "/v1/completions", content=b'{"prompt": "hi", "n": 1e400}',
                     headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert inf.status_code == 400 and inf.json()["error"]["param"] == "n"


def test_top_k_and_min_p_are_accepted_and_validated(live):
    ok = _post(live, {**BASE, "temperature": 0.7, "top_k": 5, "min_p": 0.1, "seed": 1,
                      "max_tokens": 8})
    assert ok.status_code == 200, ok.text
    for field, value in (("top_k", -2), ("min_p", 1.5), ("min_p", -0.1)):
        r = _post(live, {**BASE, field: value, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_a_long_stop_list_like_lm_eval_sends_is_accepted(live):
    free = _post(live, {**BASE, "max_tokens": 32}).json()["choices"][0]["text"]
    needle = free.split()[3]
    stops = [f"never-{i}" for i in range(11)] + [" " + needle, "<|eot_id|>"]
    r = _post(live, {**BASE, "max_tokens": 32, "stop": stops})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == free[:free.find(" " + needle)]


def test_every_unsupported_field_is_named_in_one_400(live):
    r = _post(live, {**BASE, "suffix": "x", "logprobs": 2, "echo": True, "presence_penalty": 1})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "unsupported_parameter" and err["param"] == "presence_penalty"
    for name in ("suffix", "logprobs", "echo", "presence_penalty"):
        assert f"'{name}'" in err["message"], err["message"]
    chat = _post(live, {"model": MODEL, "messages": [{"role": "tool", "content": "x"}],
                        "tools": [{"type": "function"}], "logprobs": True},
                 "/v1/chat/completions")
    msg = chat.json()["error"]["message"]
    assert chat.status_code == 400 and all(
        f"'{n}'" in msg for n in ("logprobs", "tools", "messages[0].role")), msg
