"""`cdlm serve` settings: flag beats CDLM_* environment variable beats default."""

from __future__ import annotations

import argparse

import pytest

from cdlm.server.cli import OPTIONS, add_serve_arguments, resolve_settings


def _parse(argv):
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    return p.parse_args(argv)


def test_defaults_match_the_architecture_table():
    s = resolve_settings(_parse([]), environ={})
    assert s["host"] == "127.0.0.1" and s["port"] == 8000
    assert s["model"] is None and s["lora"] is None and s["api_key"] is None
    assert s["threshold"] is None and s["max_num_seqs"] == 64 and s["max_queue"] == 256
    assert s["kv_cache_tokens"] is None and s["drain_timeout"] == 30.0
    assert s["dtype"] is None and s["device"] is None


def test_env_then_flag_precedence():
    env = {"CDLM_PORT": "9001", "CDLM_API_KEY": "k", "CDLM_THRESHOLD": "0.85",
           "CDLM_KV_CACHE_TOKENS": "4096", "CDLM_MODEL": "/models/x",
           "CDLM_DRAIN_TIMEOUT": "5", "CDLM_DTYPE": "auto"}
    s = resolve_settings(_parse([]), environ=env)
    assert s["port"] == 9001 and s["api_key"] == "k" and s["threshold"] == 0.85
    assert s["kv_cache_tokens"] == 4096 and s["model"] == "/models/x"
    assert s["drain_timeout"] == 5.0 and s["dtype"] is None
    s = resolve_settings(_parse(["--port", "9002", "--threshold", "0.7"]), environ=env)
    assert s["port"] == 9002 and s["threshold"] == 0.7 and s["api_key"] == "k"


def test_every_documented_flag_has_its_env_var():
    documented = {"--model": "CDLM_MODEL", "--lora": "CDLM_LORA",
                  "--served-model-name": "CDLM_SERVED_MODEL_NAME", "--host": "CDLM_HOST",
                  "--port": "CDLM_PORT", "--api-key": "CDLM_API_KEY", "--dtype": "CDLM_DTYPE",
                  "--device": "CDLM_DEVICE", "--threshold": "CDLM_THRESHOLD",
                  "--max-num-seqs": "CDLM_MAX_NUM_SEQS",
                  "--kv-cache-tokens": "CDLM_KV_CACHE_TOKENS", "--max-queue": "CDLM_MAX_QUEUE",
                  "--drain-timeout": "CDLM_DRAIN_TIMEOUT",
                  "--max-request-bytes": "CDLM_MAX_REQUEST_BYTES",
                  "--allowed-origins": "CDLM_ALLOWED_ORIGINS",
                  "--chat-special-tokens": "CDLM_CHAT_SPECIAL_TOKENS",
                  "--timeout-keep-alive": "CDLM_TIMEOUT_KEEP_ALIVE"}
    have = {o.flag: o.env for o in OPTIONS}
    for flag, env in documented.items():
        assert have[flag] == env


def test_bad_env_value_is_a_clear_error():
    with pytest.raises(SystemExit, match="CDLM_PORT"):
        resolve_settings(_parse([]), environ={"CDLM_PORT": "eighty"})


def test_hardening_settings_from_env_and_flags():
    s = resolve_settings(_parse([]), environ={})
    assert s["max_request_bytes"] == 16 << 20 and s["allowed_origins"] == []
    assert s["chat_special_tokens"] is False and s["timeout_keep_alive"] == 5.0
    env = {"CDLM_MAX_REQUEST_BYTES": "4096", "CDLM_ALLOWED_ORIGINS": "http://a.example, http://b",
           "CDLM_CHAT_SPECIAL_TOKENS": "true", "CDLM_TIMEOUT_KEEP_ALIVE": "2.5"}
    s = resolve_settings(_parse([]), environ=env)
    assert s["max_request_bytes"] == 4096 and s["allowed_origins"] == ["http://a.example", "http://b"]
    assert s["chat_special_tokens"] is True and s["timeout_keep_alive"] == 2.5
    s = resolve_settings(_parse(["--chat-special-tokens", "no", "--allowed-origins", "*"]),
                         environ=env)
    assert s["chat_special_tokens"] is False and s["allowed_origins"] == ["*"]
    with pytest.raises(SystemExit, match="CDLM_CHAT_SPECIAL_TOKENS"):
        resolve_settings(_parse([]), environ={"CDLM_CHAT_SPECIAL_TOKENS": "maybe"})
