"""Completion prompts through HTTP get the start token of the served checkpoint's layout:
LLaDA's BOS `<|startoftext|>`, none for Dream (Qwen2)."""

from __future__ import annotations

import httpx
import pytest

from serverutil import make_server


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_completion_prompt_tokens_include_the_layouts_start_token(family, tiny_llada, tiny_dream):
    path = (tiny_llada if family == "llada" else tiny_dream)[0]
    srv = make_server(model=str(path), served_model_name="tiny")
    try:
        def prompt_tokens(prompt) -> int:
            r = httpx.post(srv.url + "/v1/completions", timeout=60,
                           json={"model": "tiny", "prompt": prompt, "max_tokens": 2})
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens"]

        start = 1 if family == "llada" else 0
        assert prompt_tokens("hello") == len(b"hello") + start   # byte-level test tokenizer
        assert prompt_tokens("<|startoftext|>hello") == len(b"hello") + 1   # never two
        assert prompt_tokens([104, 105]) == 2        # token ids are sent as they are
    finally:
        srv.stop()


@pytest.mark.parametrize("trust", [False, True])
def test_special_token_text_in_chat_content(tiny_llada, trust):
    """Default: `<|eot_id|>` typed in a message is text (10 byte tokens); with
    --chat-special-tokens true it is the end-of-turn token (1 token)."""
    srv = make_server(model=str(tiny_llada[0]), served_model_name="tiny",
                      chat_special_tokens=trust)
    try:
        def prompt_tokens(content: str) -> int:
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
                "model": "tiny", "max_tokens": 2,
                "messages": [{"role": "user", "content": content}]})
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens"]

        extra = prompt_tokens("a<|eot_id|>b") - prompt_tokens("ab")
        assert extra == (1 if trust else len(b"<|eot_id|>"))
    finally:
        srv.stop()
