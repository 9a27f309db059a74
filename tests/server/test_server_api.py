"""The OpenAI-compatible endpoints through real clients: the `openai` package and raw httpx."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from serverutil import API_KEY, metric_value, scrape, sse_events

MODEL = "cdlm-default"
BLOCK = 32  # the bundled model's block size (checked below)


def test_block_size_assumption(live):
    assert live.engine.block_size == BLOCK


@pytest.fixture()
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_models_and_health(live, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    r = httpx.get(live.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_completion_non_streaming(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is",
                                  max_tokens=40, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason in ("stop", "length")
    assert choice.logprobs is None
    u = r.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 40
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    extra = u.model_extra
    assert extra["denoising_steps"] >= 1 and extra["num_blocks"] >= 1
    # Every step finalises at least one token: steps <= tokens, and >= the number of blocks.
    assert extra["num_blocks"] <= extra["denoising_steps"] <= max(u.completion_tokens, 1)


def test_completion_default_max_tokens_is_16(client):
    r = client.completions.create(model=MODEL, prompt="abc", temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_completion_prompt_forms_and_n(live, client):
    # list of strings, token ids, list of token-id lists; n fans out per prompt
    r = client.completions.create(model=MODEL, prompt=["a b c", "x y z"], max_tokens=8,
                                  temperature=0.8, n=2, seed=5)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    ids = live.engine.tokenizer.encode("a b c d e f g", add_special_tokens=False)[:5]
    assert len(ids) == 5
    r2 = client.completions.create(model=MODEL, prompt=ids[:3], max_tokens=8, temperature=0)
    assert len(r2.choices) == 1 and r2.usage.prompt_tokens == 3
    r3 = client.completions.create(model=MODEL, prompt=[ids[:2], ids[2:5]], max_tokens=8,
                                   temperature=0)
    assert len(r3.choices) == 2 and r3.usage.prompt_tokens == 5
    # n with a seed: child i uses seed + i, so it equals a single request with that seed
    single = client.completions.create(model=MODEL, prompt="x y z", max_tokens=8,
                                       temperature=0.8, seed=6)
    assert r.choices[3].text == single.choices[0].text


def test_completion_streaming_openai(client):
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=70,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 70
    text_chunks = chunks[:-1]
    # 70 tokens with blocks of 32: 32 + 32 + 6 -> three chunks, one per block
    assert len(text_chunks) == 3
    assert [c.choices[0].finish_reason for c in text_chunks] == [None, None, "length"]
    full = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=70,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text


def test_chat_non_streaming_and_streaming(client):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hi"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert r.usage.prompt_tokens > 0 and r.usage.model_extra["denoising_steps"] >= 1
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        r.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == msg.content
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    # max_completion_tokens is the newer spelling of max_tokens
    r2 = client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=5,
                                        temperature=0, extra_body={"ignore_eos": True})
    assert r2.usage.completion_tokens == 5


def test_chat_uses_the_tokenizer_template(live, client):
    msgs = [{"role": "user", "content": "hello there"}]
    tok = live.engine.tokenizer
    expected = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True),
                          add_special_tokens=False)
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(expected)
    # the same ids through /v1/completions give the same text
    c = client.completions.create(model=MODEL, prompt=expected, max_tokens=4, temperature=0)
    assert c.choices[0].text == r.choices[0].message.content


def test_sse_framing_raw(http):
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 2 * BLOCK + 5, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    # each event is exactly `data: <payload>\n\n`
    assert raw.endswith("data: [DONE]\n\n")
    frames = raw.split("\n\n")
    assert frames[-1] == ""
    frames = frames[:-1]
    assert all(f.startswith("data: ") and "\n" not in f for f in frames)
    payloads = [f[len("data: "):] for f in frames]
    assert payloads[-1] == "[DONE]"
    objs = [json.loads(p) for p in payloads[:-1]]
    usage = objs[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2 * BLOCK + 5
    assert usage["usage"]["num_blocks"] == 3
    blocks = objs[:-1]
    assert len(blocks) == 3  # one chunk per finished block
    assert all(o["usage"] is None for o in blocks)  # OpenAI: usage null until the last chunk
    assert [o["choices"][0]["finish_reason"] for o in blocks] == [None, None, "length"]
    ids = {o["id"] for o in objs}
    assert len(ids) == 1
    # without include_usage: no usage chunk, no usage key
    body.pop("stream_options")
    with http.stream("POST", "/v1/completions", json=body) as r:
        events = sse_events(list(r.iter_lines()))
    assert events[-1] == "[DONE]" and len(events) == 4
    assert all("usage" not in json.loads(e) for e in events[:-1])


def test_stop_string(client):
    # Find some text the model produces, then stop on a piece of it.
    r = client.completions.create(model=MODEL, prompt="stop test", max_tokens=24,
                                  temperature=0.9, seed=11, extra_body={"ignore_eos": True})
    text = r.choices[0].text
    needle = next((text[i:i + 2] for i in range(4, len(text) - 2)
                   if "\ufffd" not in text[i:i + 2]), None)
    if needle is None:
        pytest.skip("model output has no usable stop substring")
    s = client.completions.create(model=MODEL, prompt="stop test", max_tokens=24,
                                  temperature=0.9, seed=11, stop=[needle],
                                  extra_body={"ignore_eos": True})
    assert s.choices[0].finish_reason == "stop"
    assert s.choices[0].text == text[:text.find(needle)]
    # usage counts the block the stop string cut short, one per streamed chunk
    chunks = list(client.completions.create(
        model=MODEL, prompt="stop test", max_tokens=24, temperature=0.9, seed=11, stop=[needle],
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.model_extra["num_blocks"] == len(chunks) - 1 >= 1
    assert s.usage.model_extra["num_blocks"] == len(chunks) - 1


async def _concurrent(url: str, prompts: list[str], **kw) -> list[str]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0,
                                timeout=120)
    async with client:
        rs = await asyncio.gather(*[client.completions.create(model=MODEL, prompt=p, **kw)
                                    for p in prompts])
    return [r.choices[0].text for r in rs]


@pytest.mark.parametrize("sampling", [
    {"temperature": 0},                          # greedy, as the issue asks
    {"temperature": 1.0, "seed": 1234},          # seeded sampling must be batch-invariant too
], ids=["greedy", "seeded"])
def test_16_concurrent_equal_sequential(live, client, sampling):
    prompts = [f"Request number {i}: tell me about {w}" for i, w in
               enumerate("apples boats cats dogs eels figs goats hats ink jam kites "
                         "lamps mice nets owls pens".split())]
    assert len(prompts) == 16
    kw = dict(max_tokens=40, **sampling)
    sequential = [client.completions.create(model=MODEL, prompt=p, **kw).choices[0].text
                  for p in prompts]
    before = metric_value(scrape(live.url), "cdlm:batch_size_per_step_sum") or 0.0
    steps_before = metric_value(scrape(live.url), "cdlm:batch_size_per_step_count") or 0.0
    concurrent = asyncio.run(_concurrent(live.url, prompts, **kw))
    assert concurrent == sequential
    text = scrape(live.url)
    # they were really batched: more than one request per step on average
    d_sum = metric_value(text, "cdlm:batch_size_per_step_sum") - before
    d_cnt = metric_value(text, "cdlm:batch_size_per_step_count") - steps_before
    assert d_sum / d_cnt > 2.0


def test_metrics_exposition(live, client):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=8, temperature=0)
    text = scrape(live.url)
    for name in ["cdlm:time_to_first_token_seconds_bucket", "cdlm:e2e_request_latency_seconds_count",
                 "cdlm:request_queue_time_seconds_count", "cdlm:inter_block_latency_seconds_count",
                 "cdlm:num_requests_running", "cdlm:num_requests_waiting",
                 "cdlm:kv_cache_usage_perc", "cdlm:engine_healthy", "cdlm:prompt_tokens_total",
                 "cdlm:generation_tokens_total", "cdlm:steps_per_block_count",
                 "cdlm:tokens_per_step_count", "cdlm:steps_per_request_count",
                 "cdlm:batch_size_per_step_count"]:
        assert any(line.startswith(name) for line in text.splitlines()), name
    assert metric_value(text, "cdlm:engine_healthy") == 1.0
    assert metric_value(text, "cdlm:request_success_total", {"finished_reason": "length"}) >= 1
    assert metric_value(text, "cdlm:request_failure_total", {"reason": "rejected"}) is not None
    assert metric_value(text, "cdlm:prompt_tokens_total") > 0
    assert metric_value(text, "cdlm:steps_per_block_count") >= 1


def _stream_text(http, body: dict) -> list[str]:
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = sse_events(list(r.iter_lines()))
    assert events[-1] == "[DONE]"
    return [json.loads(e)["choices"][0]["text"] for e in events[:-1]]


def test_streaming_holds_back_a_possible_stop_prefix(http):
    """Text that could be the start of a stop string is not streamed until the next block
    shows it is not (text sent cannot be taken back if the engine then cuts at the stop)."""
    body = {"model": MODEL, "prompt": "holdback", "max_tokens": 2 * BLOCK, "temperature": 0,
            "ignore_eos": True}
    plain = _stream_text(http, body)
    assert len(plain) == 2
    first = plain[0]
    if not first or first[-1] == "\ufffd":
        pytest.skip("first block has no stable last character")
    never = "\U0010FFFF"  # a stop string that will not complete
    held = _stream_text(http, {**body, "stop": [first[-1] + never]})
    assert held[0] == first[:-1]          # the possible stop prefix waits...
    assert "".join(held) == "".join(plain)  # ...and is sent with the next block
    final = http.post("/v1/completions", json={**body, "stop": [first[-1] + never]}).json()
    assert final["choices"][0]["text"] == "".join(held)


WORLD_PROBLEM = ("Hal has 7 cards at the start . Then Eva has 2 fewer cards than Hal . Then Kim "
                 "has 3 fewer cards than Eva . Then Ivy has twice the cards of Kim . Then Fay has "
                 "2 fewer cards than Ivy . How many cards does Fay have ?")


def _boundary_candidates(live):
    # The bundled student answers this problem in 35 tokens, over two blocks; then sampled
    # continuations, for any other default model.
    chat = live.engine.tokenizer.apply_chat_template([{"role": "user", "content": WORLD_PROBLEM}])
    yield {"model": MODEL, "prompt": chat, "max_tokens": 2 * BLOCK, "temperature": 0}
    for seed in range(40):
        yield {"model": MODEL, "prompt": "boundary", "max_tokens": 2 * BLOCK,
               "temperature": 1.0, "seed": seed, "ignore_eos": True}


def test_streaming_stop_string_across_a_block_boundary(http, live):
    """A stop string that starts at the end of one block and completes in the next: the
    first block's chunk must not leak its first part, and the non-streamed text is cut."""
    for body in _boundary_candidates(live):
        chunks = _stream_text(http, body)
        if len(chunks) < 2:
            continue
        first, full = chunks[0], "".join(chunks)
        # The shortest stop string made of k characters on each side of the boundary whose
        # first occurrence is at the boundary.
        stop, cut = None, 0
        for k in range(1, 5):
            if len(first) < k + 1 or len(full) < len(first) + k:
                break
            candidate = first[-k:] + full[len(first):len(first) + k]
            if "\ufffd" not in candidate and full.find(candidate) == len(first) - k:
                stop, cut = candidate, len(first) - k
                break
        if stop is not None:
            break
    else:
        pytest.skip("no candidate gave a usable boundary-straddling stop string")
    body["stop"] = [stop]
    streamed = _stream_text(http, body)
    plain = http.post("/v1/completions", json=body).json()["choices"][0]
    assert plain["finish_reason"] == "stop"
    assert plain["text"] == full[:cut]
    assert "".join(streamed) == plain["text"]
    assert streamed[0] == full[:cut]  # nothing of the stop string leaked in the first chunk


def test_stop_prefix_holdback_helper():
    from cdlm.server.generation import stop_prefix_len as _stop_prefix_len
    assert _stop_prefix_len("hello wor", ["world"]) == 3
    assert _stop_prefix_len("hello", ["xyz"]) == 0
    assert _stop_prefix_len("abc", ["c", "bcd"]) == 2
    assert _stop_prefix_len("", ["ab"]) == 0


def test_decoding_extensions_threshold_and_tokens_per_step(client):
    r = client.completions.create(model=MODEL, prompt="k per step", max_tokens=64,
                                  temperature=0, extra_body={"ignore_eos": True,
                                                             "tokens_per_step": 4})
    assert r.usage.completion_tokens == 64 and r.usage.model_extra["denoising_steps"] == 16
    # threshold 1e-6: every masked position qualifies, so a block takes a single step
    r = client.completions.create(model=MODEL, prompt="fast", max_tokens=64, temperature=0,
                                  extra_body={"ignore_eos": True, "threshold": 1e-6})
    assert r.usage.model_extra["denoising_steps"] == 2


def test_models_report_the_context_length(live, client):
    card = client.models.list().data[0]
    assert card.model_extra["max_model_len"] == live.state.max_model_len


def test_a_stop_string_mid_block_still_counts_that_block(client):
    base = dict(model=MODEL, prompt="stop test", max_tokens=BLOCK, temperature=0,
                extra_body={"ignore_eos": True, "tokens_per_step": 1})
    text = client.completions.create(**base).choices[0].text
    stop = " " + text.split()[1]
    r = client.completions.create(**base, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[:text.find(stop)]
    usage = r.usage.model_extra
    assert usage["denoising_steps"] < BLOCK   # ended inside the first block...
    assert usage["num_blocks"] == 1           # ...which is reported (it was 0)
