"""Hostile and odd input: every answer is 200 or a 4xx with OpenAI's error JSON, never a 500 or a
dropped connection, and the body always encodes, whatever the input held."""

from __future__ import annotations

import httpx
import pytest

from serverutil import API_KEY

MODEL = "cdlm-default"
AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

# Raw JSON: `\ud800` is a legal JSON escape that decodes to a lone UTF-16 surrogate.
SURROGATE_CASES = [
    ("prompt", COMPLETIONS, rb'{"prompt": "ab\ud800cd", "max_tokens": 2}', "prompt"),
    ("prompt-list", COMPLETIONS, rb'{"prompt": ["fine", "\udfff"], "max_tokens": 2}', "prompt[1]"),
    ("model", COMPLETIONS, rb'{"model": "\ud800", "prompt": "hi", "max_tokens": 2}', "model"),
    ("stop", COMPLETIONS, rb'{"prompt": "hi", "stop": ["x\udbff"], "max_tokens": 2}', "stop[0]"),
    ("user", COMPLETIONS, rb'{"prompt": "hi", "user": "\ud800", "max_tokens": 2}', "user"),
    ("unknown-key", COMPLETIONS, rb'{"prompt": "hi", "\ud800": 1, "max_tokens": 2}', None),
    ("message", CHAT, rb'{"messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 2}',
     "messages[0].content"),
    ("content-part", CHAT, rb'{"messages": [{"role": "user", "content": [{"type": "text", '
                           rb'"text": "a\udc00"}]}], "max_tokens": 2}',
     "messages[0].content[0].text"),
    ("name", CHAT, rb'{"messages": [{"role": "user", "content": "hi", "name": "\ud800"}], '
                   rb'"max_tokens": 2}', "messages[0].name"),
]


def _post(live, path: str, body: bytes | dict, headers: dict | None = None) -> httpx.Response:
    with httpx.Client(base_url=live.url, timeout=60) as c:
        if isinstance(body, bytes):
            return c.post(path, content=body, headers=headers or AUTH)
        return c.post(path, json=body, headers=headers or AUTH)


def _assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    r.content.decode("utf-8")   # the body is valid UTF-8
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def _still_serving(live) -> None:
    ok = _post(live, COMPLETIONS, {"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("case", SURROGATE_CASES, ids=[c[0] for c in SURROGATE_CASES])
def test_lone_surrogates_in_any_string_field_are_400(live, case):
    _, path, body, param = case
    err = _assert_openai_error(_post(live, path, body), 400)
    assert err["code"] == "invalid_unicode"
    if param is not None:
        assert err["param"] == param
    _still_serving(live)


def test_a_paired_surrogate_escape_is_ordinary_unicode(live):
    body = rb'{"prompt": "smile \ud83d\ude00", "max_tokens": 2}'
    assert _post(live, COMPLETIONS, body).status_code == 200


@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_json_is_400(live, depth):
    nested = b"[" * depth + b"]" * depth
    body = b'{"prompt": "hi", "max_tokens": 2, "logit_bias": {"a": ' + nested + b"}}"
    err = _assert_openai_error(_post(live, COMPLETIONS, body), 400)
    assert err["code"] == "invalid_json" and "nested" in err["message"]
    _still_serving(live)


@pytest.mark.parametrize("field,value", [
    ("temperature", 1e-30), ("temperature", 5e-324), ("temperature", 1e-300),
    ("temperature", 9e-6), ("top_p", 1e-30), ("top_p", 5e-324)])
def test_tiny_temperature_and_top_p_do_not_overflow(live, field, value):
    """Temperatures below 1e-5 are greedy (SPEC): the same text as temperature 0. A tiny top_p
    samples from the top token alone (how many tokens a step finalises is the sampler's
    business, so only the shape is checked)."""
    base = {"model": MODEL, "prompt": "Once upon", "max_tokens": 24, "ignore_eos": True}
    greedy = _post(live, COMPLETIONS, {**base, "temperature": 0}).json()["choices"][0]["text"]
    sampled = {**base, field: value, "seed": 3}
    if field == "top_p":
        sampled["temperature"] = 1.0
    r = _post(live, COMPLETIONS, sampled)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 24
    if field == "temperature":
        assert r.json()["choices"][0]["text"] == greedy


@pytest.mark.parametrize("raw", [rb'{"prompt": "hi", "temperature": NaN}',
                                 rb'{"prompt": "hi", "temperature": 1e999}',
                                 rb'{"prompt": "hi", "top_p": -Infinity}',
                                 rb'{"prompt": "hi", "min_p": NaN}',
                                 rb'{"prompt": "hi", "threshold": NaN}'])
def test_non_finite_numbers_are_400(live, raw):
    _assert_openai_error(_post(live, COMPLETIONS, raw), 400)
    _still_serving(live)


@pytest.mark.parametrize("body", [
    {"prompt": [True, False]}, {"prompt": [[1, 2], "x"]}, {"prompt": [1.5]},
    {"prompt": "hi", "max_tokens": 10**30}, {"prompt": "hi", "n": 10**30},
    {"prompt": "hi", "seed": 2**64}, {"prompt": "hi", "tokens_per_step": 10**30},
    {"prompt": "hi", "top_k": 10**30, "temperature": 1.0, "max_tokens": 2},
    {"prompt": "hi", "stop": "x" * 5000}, {"prompt": [[]]},
    {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
    {"messages": [{"role": "assistant"}], "max_tokens": 2},
], ids=lambda b: str(b)[:40])
def test_odd_values_are_200_or_400_never_500(live, body):
    path = CHAT if "messages" in body else COMPLETIONS
    r = _post(live, path, {"model": MODEL, **body})
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        _assert_openai_error(r, 400)
    _still_serving(live)


def test_error_bodies_quote_input_safely(live):
    # A 404 that quotes a model name made of odd (valid) characters, and an unknown field whose
    # name is not ASCII: both answer JSON that decodes.
    err = _assert_openai_error(_post(live, COMPLETIONS, {"model": "名前\u0000\U0010ffff",
                                                         "prompt": "hi"}), 404)
    assert "名前" in err["message"]
    err = _assert_openai_error(_post(live, COMPLETIONS, {"prompt": "hi", "ключ": 1}), 400)
    assert err["param"] == "ключ"
