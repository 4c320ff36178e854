"""The OpenAI-compatible API (issue 5): the official `openai` client and raw HTTP.

Runs against the session demo server (a real gunicorn `hcx-cli serve` on a tiny random model),
or against HCX_TEST_URL (then the tests that need the demo tokenizer or their own server skip).
Random weights mean gibberish text, so the tests compare texts with each other (same seed ->
same text) and count tokens, never judge words.

Also a unit test of server.fetch_remote_image against a local http.server on loopback.
"""

from __future__ import annotations

import io
import json
import math
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

import server
from tests.fixtures import (
    REQUEST_TIMEOUT,
    LiveServer,
    b64,
    image_bytes,
    live_url,
    local_only,
    post,
    skip_if_live,
)

openai = pytest.importorskip("openai")

ROUTE = "/v1/chat/completions"
N = 12  # tokens per answer where the count matters (min_tokens == max_tokens == N)
IMAGE = image_bytes("png")
DATA_URL = b64(IMAGE, data_url=True)
PROMPT = "Describe the image in one sentence."


def api_key() -> str:
    return os.environ.get("HCX_TEST_API_KEY", "x")


def auth() -> dict:
    key = os.environ.get("HCX_TEST_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def image_message(text: str = PROMPT, url: str = DATA_URL) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": url}}]}


def exact(n: int = N) -> dict:
    """max_tokens == min_tokens == n: the answer has exactly n tokens."""
    return {"max_tokens": n, "extra_body": {"min_tokens": n}}


def raw_body(**fields) -> dict:
    return {"model": "any", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, **fields}


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(server_url):
    return openai.OpenAI(base_url=server_url + "/v1", api_key=api_key(), max_retries=0, timeout=REQUEST_TIMEOUT)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def health(server_url) -> dict:
    return requests.get(server_url + "/health", timeout=10).json()


@pytest.fixture(scope="module")
def demo_processor(request):
    """The demo model's processor, loaded independently of the server (local mode only)."""
    skip_if_live("the demo tokenizer check")
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(request.getfixturevalue("demo_model_dir"), use_fast=False)


def template_length(processor, messages: list[dict]) -> int:
    """How many ids the chat template makes of OpenAI-style messages (images expanded)."""
    from PIL import Image

    chat = []
    for m in messages:
        if isinstance(m["content"], str):  # the processor's template wants a list of parts
            chat.append({"role": m["role"], "content": [{"type": "text", "text": m["content"]}]})
            continue
        images = [{"type": "image", "image": Image.open(io.BytesIO(IMAGE)).convert("RGB")}
                  for p in m["content"] if p["type"] == "image_url"]
        text = "\n".join(p["text"] for p in m["content"] if p["type"] == "text")
        chat.append({"role": m["role"], "content": [*images, {"type": "text", "text": text}]})
    out = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = out["input_ids"]
    return len(ids[0] if ids and isinstance(ids[0], (list, tuple)) else ids)


def stream_text(stream) -> tuple[str, str | None, object]:
    """Join a client stream: (text, last finish_reason, usage of the usage chunk)."""
    text, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == [], chunk
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                text.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    return "".join(text), finish, usage


# ---------------------------------------------------------------------------------------------
# the official client
# ---------------------------------------------------------------------------------------------


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert len(models.data) == 1
    model = models.data[0]
    assert model.object == "model" and model.id
    again = client.models.retrieve(model.id)
    assert again.id == model.id and again.object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model-here")
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found" and info.value.param == "model"


def test_plain_completion(client, model_id):
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": PROMPT}],
                                       max_tokens=8)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == model_id
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_completion(client, model_id):
    stream = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=8, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked for
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def test_stream_equals_non_stream_with_same_seed(client, model_id):
    args = dict(model=model_id, messages=[image_message()], seed=1234, temperature=0.9, top_p=0.95, **exact())
    full = client.chat.completions.create(**args)
    text, finish, usage = stream_text(client.chat.completions.create(
        **args, stream=True, stream_options={"include_usage": True}))
    assert text == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason == "length"
    assert usage is not None
    assert usage.model_dump() == full.usage.model_dump()
    assert usage.completion_tokens == N


def test_image_via_data_url(client, model_id):
    text_only = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": PROMPT}],
                                               **exact(4))
    with_image = client.chat.completions.create(model=model_id, messages=[image_message()], **exact(4))
    assert isinstance(with_image.choices[0].message.content, str)
    assert with_image.usage.completion_tokens == 4
    assert with_image.usage.prompt_tokens > text_only.usage.prompt_tokens  # the image's tokens count


MULTI_TURN = [
    {"role": "system", "content": "You are a terse assistant."},
    image_message("What colour is on the left?"),
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "And on the right?"},
]


def test_multi_turn(client, model_id):
    r = client.chat.completions.create(model=model_id, messages=MULTI_TURN, **exact(4))
    assert isinstance(r.choices[0].message.content, str)
    last_only = client.chat.completions.create(model=model_id, messages=MULTI_TURN[-1:], **exact(4))
    assert r.usage.prompt_tokens > last_only.usage.prompt_tokens  # the history was read
    # an assistant turn with content null (as after tool calls) is accepted as an empty turn
    history = [MULTI_TURN[1], {"role": "assistant", "content": None}, MULTI_TURN[3]]
    r = client.chat.completions.create(model=model_id, messages=history, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


@local_only
@pytest.mark.parametrize("messages", [
    pytest.param([{"role": "user", "content": PROMPT}], id="text"),
    pytest.param([image_message()], id="image"),
    pytest.param(MULTI_TURN, id="multi-turn"),
])
def test_usage_matches_tokenizer(client, model_id, demo_processor, messages):
    r = client.chat.completions.create(model=model_id, messages=messages, seed=3, temperature=0.8, **exact())
    assert r.usage.completion_tokens == N
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == template_length(demo_processor, messages)
    assert r.usage.total_tokens == r.usage.prompt_tokens + N


def pick_stop(text: str) -> str:
    """A 2-3 character printable piece from the middle whose first occurrence is past the start."""
    for width in (3, 2):
        for i in range(len(text) // 3, len(text) - width):
            piece = text[i:i + width]
            if "\ufffd" in piece or not piece.isprintable() or not piece.strip():
                continue
            if text.find(piece) >= max(1, len(text) // 4):
                return piece
    pytest.skip(f"no usable stop string in {text!r}")


def test_stop(client, model_id):
    args = dict(model=model_id, messages=[image_message()], seed=5, temperature=0, **exact(24))
    full = client.chat.completions.create(**args).choices[0].message.content
    stop = pick_stop(full)
    expected = full[:full.find(stop)]
    r = client.chat.completions.create(**args, stop=[stop])
    assert r.choices[0].message.content == expected, (full, stop)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 24
    text, finish, _ = stream_text(client.chat.completions.create(**args, stop=stop, stream=True))
    assert (text, finish) == (expected, "stop")


def test_seed_reproducible(client, model_id):
    args = dict(model=model_id, messages=[image_message()], temperature=1.0, top_p=1.0, **exact())
    first = client.chat.completions.create(**args, seed=42).choices[0].message.content
    second = client.chat.completions.create(**args, seed=42).choices[0].message.content
    assert first == second
    others = {client.chat.completions.create(**args, seed=s).choices[0].message.content for s in (1, 2, 3)}
    assert others != {first}, "different seeds all gave the seed-42 text: is sampling on?"


@local_only
def test_unseeded_request_after_seeded_one_is_not_replayed(client, model_id):
    args = dict(model=model_id, messages=[{"role": "user", "content": PROMPT}], temperature=1.0, **exact())
    seeded = client.chat.completions.create(**args, seed=9).choices[0].message.content
    unseeded = [client.chat.completions.create(**args).choices[0].message.content for _ in range(2)]
    assert unseeded != [seeded, seeded]


def test_developer_role_is_a_system_turn(client, model_id):
    def ask(role):
        messages = [{"role": role, "content": "Answer briefly."}, image_message()]
        r = client.chat.completions.create(model=model_id, messages=messages, seed=8, temperature=0.9, **exact(6))
        return r.choices[0].message.content, r.usage.prompt_tokens

    assert ask("developer") == ask("system")


@pytest.mark.parametrize("seed", [-(2**63), -1, 0, 2**63 - 1])
def test_extreme_seeds_are_accepted(server_url, seed):
    resp = post(server_url, ROUTE, raw_body(seed=seed, temperature=1.0, max_tokens=2), headers=auth())
    assert resp.status_code == 200, resp.text


def test_seed_out_of_range(server_url):
    resp = post(server_url, ROUTE, raw_body(seed=2**63), headers=auth())
    assert_openai_error(resp, 400, "invalid_value", "seed")


BAD_REQUESTS = {
    "n=2": (dict(n=2), "unsupported_parameter", "n"),
    # tools and response_format are supported (structured output): malformed ones are the 400s
    "tools": (dict(tools=[{"type": "function", "function": {"name": "no spaces allowed"}}]), "invalid_value",
              "tools[0]"),
    "response_format": (dict(response_format={"type": "yaml"}), "invalid_value", "response_format"),
    "bad data URL": (dict(messages=[image_message(url="data:image/png;base64,@@not base64@@")]),
                     "invalid_base64", "messages[0].content[1].image_url"),
    "not an image": (dict(messages=[image_message(url=b64(b"plain text, no image", data_url=True))]),
                     "invalid_image", "messages[0].content[1].image_url"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_client_bad_request(client, model_id, case):
    fields, code, param = BAD_REQUESTS[case]
    args = {"model": model_id, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**args)
    assert info.value.status_code == 400
    assert (info.value.code, info.value.param, info.value.type) == (code, param, "invalid_request_error")


def test_client_context_length_exceeded(client, model_id, health):
    too_many = health["context_length"] + 1
    if too_many > 4096:
        pytest.skip("the context is longer than the default MAX_TOKENS_CAP")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": PROMPT}],
                                       max_tokens=too_many)
    assert info.value.code == "context_length_exceeded"
    assert str(health["context_length"]) in info.value.message


# ---------------------------------------------------------------------------------------------
# raw HTTP: SSE framing, error shapes
# ---------------------------------------------------------------------------------------------


def sse_payloads(text: str) -> list:
    """Every event is exactly `data: <json>\\n\\n`; the last one is `data: [DONE]`."""
    assert text.endswith("\n\n"), text[-200:]
    events = text[:-2].split("\n\n")
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, repr(event)
    payloads = [e[len("data: "):] for e in events]
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


@pytest.mark.parametrize("include_usage", [True, False])
def test_sse_framing(server_url, include_usage):
    body = raw_body(messages=[image_message()], seed=77, temperature=0.9, max_tokens=N, min_tokens=N)
    resp = requests.post(server_url + ROUTE, json={**body, "stream": True,
                                                   "stream_options": {"include_usage": include_usage}},
                         headers=auth(), timeout=REQUEST_TIMEOUT)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers.get("Cache-Control") == "no-cache"
    chunks = sse_payloads(resp.content.decode("utf-8"))

    first, *middle, final = chunks[:-1] if include_usage else chunks
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["id"] == first["id"]
        assert c["id"].startswith("chatcmpl-") and c["created"] == first["created"] and c["model"] == first["model"]
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert first["choices"][0]["finish_reason"] is None
    for c in middle:
        assert len(c["choices"]) == 1 and c["choices"][0]["index"] == 0
        assert set(c["choices"][0]["delta"]) == {"content"} and c["choices"][0]["finish_reason"] is None
    assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] == "length"
    text = first["choices"][0]["delta"].get("content", "") + "".join(c["choices"][0]["delta"]["content"]
                                                                    for c in middle)
    plain = post(server_url, ROUTE, body, headers=auth())
    assert plain.status_code == 200 and plain.headers["Content-Type"].startswith("application/json")
    assert text == plain.json()["choices"][0]["message"]["content"]
    if include_usage:
        usage = chunks[-1]
        assert usage["choices"] == [] and usage["id"] == first["id"]
        assert usage["usage"] == plain.json()["usage"]
        assert usage["usage"]["completion_tokens"] == N
        assert all(c.get("usage") is None for c in chunks[:-1])
    else:
        assert all(c.get("usage") is None for c in chunks)


def assert_openai_error(resp, status: int, code: str | None = None, param="<any>") -> dict:
    """The OpenAI error shape {"error": {"message", "type", "param", "code"}} and no traceback."""
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text[:500]}"
    assert resp.headers.get("Content-Type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    expected_type = server.OPENAI_ERROR_TYPES.get(status, "invalid_request_error")
    assert error["type"] == expected_type, error
    if code is not None:
        assert error["code"] == code, error
    if param != "<any>":
        assert error["param"] == param, error
    assert "traceback" not in resp.text.lower()
    return error


RAW_ERRORS = {
    # name: (body or raw bytes, status, code, param)
    "n=2": (raw_body(n=2), 400, "unsupported_parameter", "n"),
    "tools": (raw_body(tools=[{"type": "function", "function": {}}]), 400, "invalid_value", "tools[0]"),
    "tool_choice": (raw_body(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="sometimes"), 400,
                    "invalid_value", "tool_choice"),
    "response_format": (raw_body(response_format={"type": "yaml"}), 400, "invalid_value", "response_format"),
    "json_schema": (raw_body(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400,
                    "invalid_value", "response_format"),
    "functions (legacy)": (raw_body(functions=[{"name": "f"}]), 400, "unsupported_parameter", "functions"),
    "logprobs": (raw_body(logprobs=True), 400, "unsupported_parameter", "logprobs"),
    "frequency_penalty": (raw_body(frequency_penalty=0.5), 400, "unsupported_parameter", "frequency_penalty"),
    "NaN temperature": (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                        400, "invalid_json", None),
    "Infinity top_p": (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
                       400, "invalid_json", None),
    "empty body": (b"", 400, "invalid_json", None),
    "not JSON": (b"{nope", 400, "invalid_json", None),
    "JSON array": (b"[]", 400, "invalid_json", None),
    "no messages": ({"model": "m"}, 400, "invalid_value", "messages"),
    "empty messages": (raw_body(messages=[]), 400, "invalid_value", "messages"),
    "bad role": (raw_body(messages=[{"role": "robot", "content": "x"}]), 400, "invalid_value",
                 "messages[0].role"),
    "no user message": (raw_body(messages=[{"role": "system", "content": "x"}]), 400, "invalid_value",
                        "messages"),
    "image in assistant turn": (raw_body(messages=[{"role": "user", "content": "x"},
                                                   {"role": "assistant", "content": image_message()["content"]},
                                                   {"role": "user", "content": "y"}]),
                                400, "invalid_value", "messages[1].content[1]"),
    "bad data URL": (raw_body(messages=[image_message(url="data:image/png;base64,###")]), 400, "invalid_base64",
                     "messages[0].content[1].image_url"),
    "not an image": (raw_body(messages=[image_message(url=b64(b"GIF89a but not really", data_url=True))]), 400,
                     "invalid_image", "messages[0].content[1].image_url"),
    "text data URL": (raw_body(messages=[image_message(url="data:text/plain;base64,aGVsbG8=")]), 400,
                      "invalid_image", "messages[0].content[1].image_url"),
    "file URL": (raw_body(messages=[image_message(url="file:///etc/passwd")]), 400, "invalid_image_url",
                 "messages[0].content[1].image_url"),
    "model not a string": (raw_body(model=5), 400, "invalid_type", "model"),
    "stream not a boolean": (raw_body(stream="yes"), 400, "invalid_type", "stream"),
    "stream_options without stream": (raw_body(stream_options={"include_usage": True}), 400, "invalid_value",
                                      "stream_options"),
    "temperature 3": (raw_body(temperature=3), 400, "invalid_value", "temperature"),
    "top_p 0": (raw_body(top_p=0), 400, "invalid_value", "top_p"),
    "max_tokens 0": (raw_body(max_tokens=0), 400, "invalid_value", "max_tokens"),
    "max_tokens string": (raw_body(max_tokens="4"), 400, "invalid_type", "max_tokens"),
    "min_tokens > max_tokens": (raw_body(min_tokens=8), 400, "invalid_value", "min_tokens"),
    "stop not strings": (raw_body(stop=[1, 2]), 400, "invalid_type", "stop"),
    "max_tokens past context": (raw_body(max_tokens=2000), 400, "context_length_exceeded", "messages"),
}


@pytest.mark.parametrize("case", RAW_ERRORS, ids=list(RAW_ERRORS))
def test_raw_error_shape(server_url, health, case):
    body, status, code, param = RAW_ERRORS[case]
    if case == "max_tokens past context":
        if health["context_length"] >= 4096:
            pytest.skip("context longer than the default MAX_TOKENS_CAP")
        body = raw_body(max_tokens=health["context_length"] + 1)
    if isinstance(body, bytes):
        resp = post(server_url, ROUTE, data=body, headers=auth())
    else:
        resp = post(server_url, ROUTE, body, headers=auth())
    assert_openai_error(resp, status, code, param)


def test_raw_not_found_and_method_errors(server_url):
    assert_openai_error(requests.get(server_url + "/v1/models/no-such-model", headers=auth(), timeout=10), 404,
                        "model_not_found", "model")
    assert_openai_error(requests.get(server_url + "/v1/no-such-route", headers=auth(), timeout=10), 404)
    assert_openai_error(requests.get(server_url + ROUTE, headers=auth(), timeout=10), 405)


def test_raw_error_before_any_stream_byte(server_url):
    """A bad streamed request is a JSON 400, not an event stream."""
    resp = post(server_url, ROUTE, raw_body(n=3, stream=True), headers=auth())
    assert_openai_error(resp, 400, "unsupported_parameter", "n")


def test_harmless_unknown_fields_are_ignored(server_url):
    body = raw_body(messages=[image_message()], seed=21, temperature=0.9, max_tokens=N, min_tokens=N)
    harmless = {"user": "someone", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
                "parallel_tool_calls": False, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False,
                "tool_choice": "none", "response_format": {"type": "text"}, "modalities": ["text"], "n": 1,
                "stream": False, "x_vendor_extension": {"anything": [1, 2, 3]}}
    plain = post(server_url, ROUTE, body, headers=auth())
    extra = post(server_url, ROUTE, {**body, **harmless}, headers=auth())
    assert plain.status_code == extra.status_code == 200, extra.text
    assert extra.json()["choices"][0]["message"]["content"] == plain.json()["choices"][0]["message"]["content"]
    assert extra.json()["usage"] == plain.json()["usage"]


def test_max_completion_tokens_alias(server_url):
    resp = post(server_url, ROUTE, raw_body(max_tokens=None, max_completion_tokens=3, min_tokens=3),
                headers=auth())
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 3


# ---------------------------------------------------------------------------------------------
# remote images: a local image server, the server's refusal, the SSRF guard, fetch_remote_image
# ---------------------------------------------------------------------------------------------

SLOW_S = 3.0  # how long the slow routes take in all (with REMOTE_IMAGE_TIMEOUT=1)


class ImageSite:
    """A loopback HTTP server with an image, a big body, a 404, a redirect and slow answers."""

    def __init__(self):
        self.hits: list[str] = []
        self.done = threading.Event()
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def head(self, status=200, length=None, kind="image/png", **headers):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                if length is not None:
                    self.send_header("Content-Length", str(length))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.flush()

            def do_GET(self):
                site.hits.append(self.path)
                try:
                    self.route()
                except OSError:  # the client gave up first
                    pass

            def route(self):
                path = self.path.split("?")[0]
                if path == "/img.png":
                    self.head(200, len(IMAGE))
                    self.wfile.write(IMAGE)
                elif path == "/big.png":  # no Content-Length: the limit must hold while reading
                    self.head(200)
                    self.wfile.write(IMAGE + b"\0" * 4096)
                elif path == "/missing.png":
                    self.head(404, 9, "text/plain")
                    self.wfile.write(b"not found")
                elif path == "/redirect.png":
                    self.head(302, 0, "text/plain", Location="/img.png")
                elif path == "/stall.png":  # headers, then silence
                    self.head(200, 5000)
                    self.wfile.write(IMAGE[:20])
                    self.wfile.flush()
                    site.done.wait(SLOW_S)
                elif path == "/slow-headers.png":
                    site.done.wait(SLOW_S)
                    self.head(200, len(IMAGE))
                    self.wfile.write(IMAGE)
                elif path == "/trickle.png":  # a few bytes at a time, each well within the socket timeout
                    self.head(200, 5000)
                    steps = 12
                    for i in range(steps):
                        self.wfile.write(IMAGE[i * 10:(i + 1) * 10] or b"\0" * 10)
                        self.wfile.flush()
                        if site.done.wait(SLOW_S / steps):
                            return
                elif path == "/trickle-headers.png":  # a slow-loris status line and headers
                    self.wfile.write(b"HTTP/1.0 200 OK\r\n")
                    steps = 12
                    for i in range(steps):
                        self.wfile.write(f"X-Pad-{i}: x\r\n".encode())
                        self.wfile.flush()
                        if site.done.wait(SLOW_S / steps):
                            return
                    self.wfile.write(f"Content-Length: {len(IMAGE)}\r\n\r\n".encode() + IMAGE)
                else:
                    self.head(404, 0, "text/plain")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self):
        self.done.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def site():
    s = ImageSite()
    yield s
    s.close()


def test_remote_image_refused_when_disabled(server_url, site):
    resp = post(server_url, ROUTE, raw_body(messages=[image_message(url=site.url("/img.png"))]), headers=auth())
    error = assert_openai_error(resp, 400, "invalid_image_url", "messages[0].content[1].image_url")
    if not live_url():
        assert "ALLOW_REMOTE_IMAGES" in error["message"]
    assert site.hits == []


@pytest.fixture(scope="module")
def remote_server(request):
    skip_if_live("a server with ALLOW_REMOTE_IMAGES=1")
    with LiveServer(request.getfixturevalue("demo_model_dir"), env={"ALLOW_REMOTE_IMAGES": "1", "REMOTE_IMAGE_TIMEOUT": "1"},
                    name="hcx-remote-images") as srv:
        yield srv


SSRF_TARGETS = {
    "loopback": "http://127.0.0.1:{port}/img.png",
    "localhost": "http://localhost:{port}/img.png",
    "private 10/8": "http://10.0.0.1/img.png",
    "cloud metadata": "http://169.254.169.254/latest/meta-data/",
    "ipv6 loopback": "http://[::1]:{port}/img.png",
    "ipv4-mapped ipv6": "http://[::ffff:127.0.0.1]:{port}/img.png",
    "unspecified": "http://0.0.0.0:{port}/img.png",
    "decimal loopback": "http://2130706433:{port}/img.png",
    "https loopback": "https://127.0.0.1:{port}/img.png",
}


@pytest.mark.parametrize("target", SSRF_TARGETS, ids=list(SSRF_TARGETS))
def test_ssrf_guard(remote_server, site, target):
    url = SSRF_TARGETS[target].format(port=site.port)
    before = len(site.hits)
    started = time.monotonic()
    resp = post(remote_server.url, ROUTE, raw_body(messages=[image_message(url=url)]))
    assert_openai_error(resp, 400, "invalid_image_url", "messages[0].content[1].image_url")
    assert time.monotonic() - started < 5
    assert len(site.hits) == before, f"the server fetched {url}"


def test_remote_server_still_takes_data_urls(remote_server):
    resp = post(remote_server.url, ROUTE, raw_body(messages=[image_message()], max_tokens=2))
    assert resp.status_code == 200, resp.text


# -- server.fetch_remote_image in-process, with a policy that lets loopback through ---------------


def allow_all(_address) -> bool:
    return False


def fetch(site, path, **env):
    cfg = server.load_config({"REMOTE_IMAGE_TIMEOUT": "1", **env})
    return server.fetch_remote_image(site.url(path), cfg, "image_url", blocked=allow_all)


def test_fetch_real_png(site):
    img = fetch(site, "/img.png")
    assert img.mode == "RGB" and img.size == (64, 48)
    assert img.getpixel((0, 0)) == (220, 30, 30) and img.getpixel((63, 0)) == (30, 30, 220)


def test_fetch_default_policy_refuses_loopback(site):
    before = len(site.hits)
    with pytest.raises(server.InputError) as info:
        server.fetch_remote_image(site.url("/img.png"), server.load_config({}), "image_url")
    assert info.value.status == 400 and info.value.code == "invalid_image_url"
    assert len(site.hits) == before


def test_fetch_too_large_is_413(site):
    with pytest.raises(server.InputError) as info:
        fetch(site, "/big.png", MAX_IMAGE_BYTES="1024")
    assert info.value.status == 413 and info.value.code == "image_too_large"


@pytest.mark.parametrize("path", ["/missing.png", "/redirect.png"])
def test_fetch_non_200_is_400(site, path):
    with pytest.raises(server.InputError) as info:
        fetch(site, path)
    assert info.value.status == 400 and info.value.code == "invalid_image_url"
    assert "HTTP 404" in info.value.message or "HTTP 302" in info.value.message


@pytest.mark.parametrize("path", ["/slow-headers.png", "/stall.png", "/trickle.png", "/trickle-headers.png"])
def test_fetch_past_timeout_is_400(site, path):
    """REMOTE_IMAGE_TIMEOUT bounds the whole fetch, however the server drips its bytes."""
    started = time.monotonic()
    with pytest.raises(server.InputError) as info:
        fetch(site, path)
    took = time.monotonic() - started
    assert info.value.status == 400 and info.value.code == "invalid_image_url"
    assert took < 2.0, f"the fetch took {took:.1f} s with REMOTE_IMAGE_TIMEOUT=1"


def test_fetch_bad_urls(site):
    cfg = server.load_config({})
    for url in ("http://", "ftp://example.com/x.png", "http://:80/x.png"):
        with pytest.raises(server.InputError) as info:
            server.fetch_remote_image(url, cfg, "image_url", blocked=allow_all)
        assert info.value.status == 400 and info.value.code == "invalid_image_url"


def test_non_finite_numbers_never_reach_sampling():
    """Defence in depth below the JSON parser: a NaN that got through is still refused."""
    cfg = server.load_config({})
    for field in ("temperature", "top_p"):
        with pytest.raises(server.InputError) as info:
            server.openai_request(raw_body(**{field: math.nan}), cfg)
        assert info.value.param == field
