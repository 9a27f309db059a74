"""Bad requests get the documented 4xx with OpenAI's error JSON (never a 500), and the server
keeps answering afterwards."""

from __future__ import annotations

import httpx
import openai
import pytest

from serverutil import API_KEY

MODEL = "cdlm-default"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
OK = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
CHAT_OK = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _with(base: dict, **kw) -> dict:
    out = dict(base)
    out.update(kw)
    return out


# (id, path, json body or raw bytes, headers, status, expected param (or None), code (or None))
CASES = [
    ("malformed-json", "/v1/completions", b'{"prompt": "hi",', AUTH, 400, None, "invalid_json"),
    ("json-not-object", "/v1/completions", b'[1, 2]', AUTH, 400, None, "invalid_json"),
    ("empty-body", "/v1/completions", b"", AUTH, 400, None, "invalid_json"),
    ("prompt-missing", "/v1/completions", {"model": MODEL}, AUTH, 400, "prompt", None),
    ("prompt-empty-string", "/v1/completions", _with(OK, prompt=""), AUTH, 400, "prompt", None),
    ("prompt-empty-list", "/v1/completions", _with(OK, prompt=[]), AUTH, 400, "prompt", None),
    ("prompt-wrong-type", "/v1/completions", _with(OK, prompt=123), AUTH, 400, "prompt", None),
    ("prompt-mixed-list", "/v1/completions", _with(OK, prompt=["a", 1]), AUTH, 400, "prompt",
     None),
    ("prompt-token-out-of-vocab", "/v1/completions", _with(OK, prompt=[1, 10**9]), AUTH, 400,
     "prompt", None),
    ("prompt-negative-token", "/v1/completions", _with(OK, prompt=[-1]), AUTH, 400, "prompt",
     None),
    ("max-tokens-string", "/v1/completions", _with(OK, max_tokens="16"), AUTH, 400,
     "max_tokens", None),
    ("max-tokens-negative", "/v1/completions", _with(OK, max_tokens=-5), AUTH, 400,
     "max_tokens", None),
    ("max-tokens-zero", "/v1/completions", _with(OK, max_tokens=0), AUTH, 400, "max_tokens",
     None),
    ("max-tokens-huge", "/v1/completions", _with(OK, max_tokens=10**12), AUTH, 400,
     "max_tokens", "context_length_exceeded"),
    ("prompt-over-context", "/v1/completions",
     lambda ctx: _with(OK, prompt=[65] * (ctx - 6), max_tokens=16),
     AUTH, 400, "max_tokens", "context_length_exceeded"),
    ("text-prompt-over-context", "/v1/completions",
     lambda ctx: _with(OK, prompt=" ".join(str(i) for i in range(ctx)), max_tokens=16),
     AUTH, 400, "prompt", "context_length_exceeded"),
    ("temperature-string", "/v1/completions", _with(OK, temperature="hot"), AUTH, 400,
     "temperature", None),
    ("temperature-negative", "/v1/completions", _with(OK, temperature=-1), AUTH, 400,
     "temperature", None),
    ("top-p-zero", "/v1/completions", _with(OK, top_p=0), AUTH, 400, "top_p", None),
    ("n-zero", "/v1/completions", _with(OK, n=0), AUTH, 400, "n", None),
    ("n-bool", "/v1/completions", _with(OK, n=True), AUTH, 400, "n", None),
    ("threshold-out-of-range", "/v1/completions", _with(OK, threshold=1.5), AUTH, 400,
     "threshold", None),
    ("stop-empty", "/v1/completions", _with(OK, stop=[""]), AUTH, 400, "stop", None),
    ("stop-too-many", "/v1/completions", _with(OK, stop=[f"s{i}" for i in range(65)]), AUTH, 400,
     "stop", None),
    ("seed-negative", "/v1/completions", _with(OK, seed=-3), AUTH, 400, "seed", None),
    ("stream-options-without-stream", "/v1/completions",
     _with(OK, stream_options={"include_usage": True}), AUTH, 400, "stream_options", None),
    ("unknown-field", "/v1/completions", _with(OK, frobnicate=1), AUTH, 400, "frobnicate",
     "unrecognized_argument"),
    ("suffix", "/v1/completions", _with(OK, suffix="end"), AUTH, 400, "suffix",
     "unsupported_parameter"),
    ("logprobs", "/v1/completions", _with(OK, logprobs=2), AUTH, 400, "logprobs",
     "unsupported_parameter"),
    ("best-of", "/v1/completions", _with(OK, best_of=3), AUTH, 400, "best_of",
     "unsupported_parameter"),
    ("echo", "/v1/completions", _with(OK, echo=True), AUTH, 400, "echo",
     "unsupported_parameter"),
    ("logit-bias", "/v1/completions", _with(OK, logit_bias={"5": 10}), AUTH, 400, "logit_bias",
     "unsupported_parameter"),
    ("presence-penalty", "/v1/completions", _with(OK, presence_penalty=0.5), AUTH, 400,
     "presence_penalty", "unsupported_parameter"),
    ("unknown-model", "/v1/completions", _with(OK, model="gpt-4"), AUTH, 404, "model",
     "model_not_found"),
    ("no-api-key", "/v1/completions", OK, {}, 401, None, "invalid_api_key"),
    ("bad-api-key", "/v1/completions", OK, {"Authorization": "Bearer nope"}, 401, None,
     "invalid_api_key"),
    ("key-without-bearer", "/v1/completions", OK, {"Authorization": API_KEY}, 401, None,
     "invalid_api_key"),
    ("models-without-key", "/v1/models", None, {}, 401, None, "invalid_api_key"),
    ("chat-messages-missing", "/v1/chat/completions", {"model": MODEL}, AUTH, 400, "messages",
     None),
    ("chat-messages-empty", "/v1/chat/completions", _with(CHAT_OK, messages=[]), AUTH, 400,
     "messages", None),
    ("chat-bad-role", "/v1/chat/completions",
     _with(CHAT_OK, messages=[{"role": "wizard", "content": "x"}]), AUTH, 400, None, None),
    ("chat-content-wrong-type", "/v1/chat/completions",
     _with(CHAT_OK, messages=[{"role": "user", "content": 5}]), AUTH, 400, None, None),
    ("chat-image-part", "/v1/chat/completions",
     _with(CHAT_OK, messages=[{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), AUTH, 400, None,
     "unsupported_parameter"),
    ("chat-tools", "/v1/chat/completions",
     _with(CHAT_OK, tools=[{"type": "function", "function": {"name": "f"}}]), AUTH, 400,
     "tools", "unsupported_parameter"),
    ("chat-logprobs", "/v1/chat/completions", _with(CHAT_OK, logprobs=True), AUTH, 400,
     "logprobs", "unsupported_parameter"),
    ("chat-json-mode", "/v1/chat/completions",
     _with(CHAT_OK, response_format={"type": "json_object"}), AUTH, 400, "response_format",
     "unsupported_parameter"),
    ("chat-over-context", "/v1/chat/completions", lambda ctx: _with(CHAT_OK, max_tokens=ctx),
     AUTH, 400, "max_tokens", "context_length_exceeded"),
    ("chat-unknown-model", "/v1/chat/completions", _with(CHAT_OK, model="nope"), AUTH, 404,
     "model", "model_not_found"),
    ("unknown-route", "/v1/embeddings", OK, AUTH, 404, None, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_table(live, case):
    name, path, body, headers, status, param, code = case
    ctx = live.state.max_model_len
    if callable(body):
        body = body(ctx)
    with httpx.Client(base_url=live.url, timeout=30) as c:
        if body is None:
            r = c.get(path, headers=headers)
        elif isinstance(body, bytes):
            r = c.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
        else:
            r = c.post(path, json=body, headers=headers)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert isinstance(err["message"], str) and err["message"]
        assert isinstance(err["type"], str) and err["type"]
        if param is not None:
            assert err["param"] == param, err
        if code is not None:
            assert err["code"] == code, err
        if "context" in name:
            # both numbers: the context length and what was asked
            assert str(ctx) in err["message"]
        # the server still answers afterwards
        ok = c.post("/v1/completions", json=OK, headers=AUTH)
        assert ok.status_code == 200, ok.text


def test_prompt_over_context_message_has_both_numbers(live):
    ctx = live.state.max_model_len
    n_prompt, n_out = ctx - 96, 200
    r = httpx.post(live.url + "/v1/completions", headers=AUTH, timeout=30,
                   json=_with(OK, prompt=[65] * n_prompt, max_tokens=n_out))
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert str(ctx) in msg and str(n_prompt) in msg and str(n_out) in msg


def test_health_and_metrics_need_no_key(live):
    assert httpx.get(live.url + "/health").status_code == 200
    assert httpx.get(live.url + "/metrics").status_code == 200


def test_openai_client_raises_typed_errors(live):
    c = openai.OpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="missing", prompt="x", max_tokens=1)
    bad = openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x", max_tokens=1)
