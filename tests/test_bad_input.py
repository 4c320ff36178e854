"""Bad input across the three APIs (issue 6): every case gets its intended status and a JSON error
in that API's own shape, never a 5xx, and the server answers a normal request right after.

One shared server on the tiny demo model (1024-token context) with small limits so the big cases
stay cheap: MAX_BODY_BYTES=256 KiB, MAX_IMAGE_BYTES=64 KiB, MAX_IMAGE_PIXELS=4 M, MAX_IMAGES=2.

Shapes: seed routes {"error", "detail"}; OpenAI {"error": {"message", "type", "param", "code"}};
MCP: JSON-RPC errors for transport/protocol problems (parse error -32700 and invalid request
-32600 with HTTP 400), and for a well-formed tools/call with bad arguments HTTP 200 with a result
whose isError is true.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from tests.fixtures import LiveServer, b64, corrupt_png_size, image_bytes, local_only
from tests.hardening_helpers import (
    BASE_ENV,
    CHAT,
    MCP,
    SEED,
    SEED_STREAM,
    check_jsonrpc_error,
    check_openai_error,
    check_seed_error,
    check_tool_result,
    tools_call,
)

pytestmark = local_only

MAX_BODY = 256 * 1024
LIMITS = {"MAX_BODY_BYTES": MAX_BODY, "MAX_IMAGE_BYTES": 64 * 1024, "MAX_IMAGE_PIXELS": 4_000_000,
          "MAX_IMAGES": 2, "MAX_QUEUE": 4}
TIMEOUT = 120


# ----------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------


def _noise_png(size=(200, 200)) -> bytes:
    """Incompressible: a 200x200 PNG of random pixels is ~120 KB, over MAX_IMAGE_BYTES."""
    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(buf, "PNG")
    return buf.getvalue()


def _huge_png() -> bytes:
    """A real 10 000 x 10 000 image (1-bit, so the file is ~32 KB): 100 M pixels > MAX_IMAGE_PIXELS."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000), 1).save(buf, "PNG")
    return buf.getvalue()


PNG = image_bytes("png")
B64 = b64(PNG)
DATA_URL = b64(PNG, data_url=True)
NON_IMAGE = b64(b"%PDF-1.4 this is a text file, not an image at all\n" * 4)
TRUNCATED_B64 = B64[:-3]  # bad padding
GARBAGE_B64 = "@@@ this is not base64 !!!"
TRUNCATED_PNG = b64(PNG[: len(PNG) // 2])  # valid base64, half an image
BOMB = b64(corrupt_png_size(30_000, 30_000))  # tiny file, 900 M pixels claimed
LONG_PROMPT = "The image shows a red square. " * 400  # ~2800 tokens > the demo model's 1024
HUGE_TEXT = "x" * (MAX_BODY + 50_000)


def lazy(name: str) -> str:
    """Large inputs are built on first use (collection stays fast)."""
    cache = lazy.__dict__.setdefault("cache", {})
    if name not in cache:
        cache[name] = {"noise": lambda: b64(_noise_png()), "huge": lambda: b64(_huge_png())}[name]()
    return cache[name]


def user(text: str = "Describe the image.", *urls: str) -> dict:
    if not urls:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        *({"type": "image_url", "image_url": {"url": u}} for u in urls)]}


def chat(*messages: dict, **extra) -> dict:
    return {"model": "any", "messages": list(messages) or [user()], "max_tokens": 2, **extra}


def seed(**fields) -> dict:
    return {"prompt": "Describe the image.", "max_tokens": 2, **fields}


# ----------------------------------------------------------------------------------------
# the corpus
# ----------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    path: str
    body: Any = None  # JSON-encoded by the test (callables are called first: lazy inputs)
    raw: bytes | None = None  # sent as is, instead of `body`
    expect: str = "seed"  # seed | openai | rpc | tool_error | ok_seed | ok_text | ok_openai | ok_tool
    status: int = 400
    code: Any = None  # OpenAI error code or JSON-RPC error code to check
    words: tuple[str, ...] = ()  # must appear in the error text ("a|b": either)
    params: dict = field(default_factory=dict)
    accept_sse: bool = True  # MCP: Accept: application/json, text/event-stream (as the SDK clients send)


S, O = "seed", "openai"
CASES = [
    # ---- seed REST: body and types ------------------------------------------------------
    Case("seed-malformed-json", SEED, raw=b'{"prompt": "hi", ', words=("json",)),
    Case("seed-empty-body", SEED, raw=b"", words=("empty",)),
    Case("seed-body-is-array", SEED, raw=b'[{"prompt": "hi"}]', words=("object",)),
    Case("seed-body-is-string", SEED, raw=b'"hi"', words=("object",)),
    Case("seed-invalid-utf8", SEED, raw=b'{"prompt": "\xff\xfe"}', words=("json",)),
    Case("seed-deep-nesting", SEED, raw=b"[" * 100_000 + b"]" * 100_000),
    Case("seed-missing-prompt", SEED, {"image_base64": B64}, words=("prompt",)),
    Case("seed-prompt-int", SEED, seed(prompt=42), words=("prompt",)),
    Case("seed-prompt-list", SEED, seed(prompt=["a", "b"]), words=("prompt",)),
    Case("seed-empty-prompt", SEED, seed(prompt=""), words=("prompt",)),
    Case("seed-blank-prompt", SEED, seed(prompt="  \n\t "), words=("prompt",)),
    Case("seed-image-not-string", SEED, seed(image_base64=[B64]), words=("image_base64",)),
    # ---- seed REST: images ----------------------------------------------------------------
    Case("seed-truncated-base64", SEED, seed(image_base64=TRUNCATED_B64), words=("base64",)),
    Case("seed-garbage-base64", SEED, seed(image_base64=GARBAGE_B64), words=("base64",)),
    Case("seed-base64-of-non-image", SEED, seed(image_base64=NON_IMAGE), words=("image",)),
    Case("seed-truncated-png", SEED, seed(image_base64=TRUNCATED_PNG), words=("image",)),
    Case("seed-data-url-not-image", SEED, seed(image_base64="data:text/plain;base64,aGVsbG8="), words=("image",)),
    Case("seed-decompression-bomb", SEED, seed(image_base64=BOMB), words=("pixels|bomb",)),
    Case("seed-10000x10000-over-max-pixels", SEED, lambda: seed(image_base64=lazy("huge")), words=("pixels",)),
    Case("seed-image-over-max-image-bytes", SEED, lambda: seed(image_base64=lazy("noise")), status=413,
         words=("MAX_IMAGE_BYTES",)),
    Case("seed-body-over-max-body-bytes", SEED, seed(prompt=HUGE_TEXT), status=413),
    Case("seed-stream-route-body-over-max", SEED_STREAM, seed(prompt=HUGE_TEXT), status=413),
    Case("seed-1x1-image-ok", SEED, seed(image_base64=b64(image_bytes("tiny_1x1"))), expect="ok_seed", status=200),
    Case("seed-cmyk-jpeg-ok", SEED, seed(image_base64=b64(image_bytes("cmyk_jpeg"))), expect="ok_seed", status=200),
    Case("seed-palette-png-ok", SEED, seed(image_base64=b64(image_bytes("palette_png"))), expect="ok_seed",
         status=200),
    Case("seed-palette-transparent-ok", SEED, seed(image_base64=b64(image_bytes("palette_transparent_png"))),
         expect="ok_seed", status=200),
    Case("seed-rgba-png-ok", SEED, seed(image_base64=b64(image_bytes("rgba_png"))), expect="ok_seed", status=200),
    Case("seed-la-png-ok", SEED, seed(image_base64=b64(image_bytes("la_png"))), expect="ok_seed", status=200),
    Case("seed-thin-40x3-ok", SEED, seed(image_base64=b64(image_bytes("thin_40x3"))), expect="ok_seed", status=200),
    Case("seed-stream-route-1x1-ok", SEED_STREAM, seed(image_base64=b64(image_bytes("tiny_1x1"))),
         expect="ok_text", status=200),
    # ---- seed REST: lengths and sampling ----------------------------------------------------
    Case("seed-over-long-prompt", SEED, seed(prompt=LONG_PROMPT, max_tokens=None), words=("context",)),
    Case("seed-max-tokens-beyond-context", SEED, seed(max_tokens=2000), words=("context",)),
    Case("seed-max-tokens-negative", SEED, seed(max_tokens=-5), words=("max_tokens",)),
    Case("seed-max-tokens-zero", SEED, seed(max_tokens=0), words=("max_tokens",)),
    Case("seed-max-tokens-huge", SEED, seed(max_tokens=10**12), words=("max_tokens",)),
    Case("seed-max-tokens-string", SEED, seed(max_tokens="8"), words=("max_tokens",)),
    Case("seed-max-tokens-fraction", SEED, seed(max_tokens=2.5), words=("max_tokens",)),
    Case("seed-max-tokens-bool", SEED, seed(max_tokens=True), words=("max_tokens",)),
    Case("seed-min-over-max-tokens", SEED, seed(max_tokens=2, min_tokens=5), words=("min_tokens",)),
    Case("seed-temperature-nan", SEED, raw=b'{"prompt": "hi", "max_tokens": 2, "temperature": NaN}',
         words=("nan",)),
    Case("seed-temperature-infinity", SEED, raw=b'{"prompt": "hi", "max_tokens": 2, "temperature": Infinity}'),
    Case("seed-temperature-negative", SEED, seed(temperature=-0.5), words=("temperature",)),
    Case("seed-temperature-string", SEED, seed(temperature="hot"), words=("temperature",)),
    Case("seed-top-p-zero", SEED, seed(top_p=0), words=("top_p",)),
    Case("seed-seed-string", SEED, seed(seed="abc"), words=("seed",)),
    Case("seed-stream-not-bool", SEED, seed(stream="yes"), words=("stream",)),
    Case("seed-stream-query-garbage", SEED, seed(), params={"stream": "maybe"}, words=("stream",)),
    Case("seed-image-path-over-http", SEED, seed(image_path="/etc/hostname"), words=("image_path",)),
    Case("seed-stream-query-bad-image", SEED, seed(image_base64=GARBAGE_B64), params={"stream": "true"},
         words=("base64",)),
    Case("seed-stream-route-bad-image", SEED_STREAM, seed(image_base64=NON_IMAGE), words=("image",)),
    Case("seed-unknown-fields-ignored", SEED, seed(foo="bar", nested={"a": [1, 2]}, model="whatever"),
         expect="ok_seed", status=200),
    # ---- OpenAI chat completions ----------------------------------------------------------
    Case("openai-malformed-json", CHAT, raw=b'{"messages": [', expect=O, code="invalid_json"),
    Case("openai-body-is-array", CHAT, raw=b"[]", expect=O, code="invalid_json"),
    Case("openai-temperature-nan", CHAT,
         raw=b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": NaN}',
         expect=O, code="invalid_json"),
    Case("openai-messages-missing", CHAT, {"model": "any", "max_tokens": 2}, expect=O, words=("messages",)),
    Case("openai-messages-empty", CHAT, chat(messages=[]), expect=O, words=("messages",)),
    Case("openai-messages-string", CHAT, {"model": "any", "messages": "hi"}, expect=O, words=("messages",)),
    Case("openai-message-not-object", CHAT, {"model": "any", "messages": ["hi"]}, expect=O,
         code="invalid_type"),
    Case("openai-role-unknown", CHAT, chat({"role": "robot", "content": "hi"}), expect=O, words=("role",)),
    Case("openai-content-int", CHAT, chat({"role": "user", "content": 7}), expect=O, code="invalid_type"),
    Case("openai-part-type-audio", CHAT, chat({"role": "user", "content": [{"type": "input_audio",
                                                                            "input_audio": {"data": "AAAA"}}]}),
         expect=O, code="invalid_value"),
    Case("openai-part-not-object", CHAT, chat({"role": "user", "content": ["hi"]}), expect=O, code="invalid_value"),
    Case("openai-text-part-text-int", CHAT, chat({"role": "user", "content": [{"type": "text", "text": 5}]}),
         expect=O, code="invalid_value"),
    Case("openai-image-in-assistant", CHAT,
         chat(user(), {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}]},
              user()), expect=O, code="invalid_value"),
    Case("openai-image-url-not-string", CHAT,
         chat({"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}), expect=O,
         code="invalid_type"),
    Case("openai-remote-image-url", CHAT, chat(user("hi", "http://127.0.0.1:9/x.png")), expect=O,
         code="invalid_image_url"),
    Case("openai-file-image-url", CHAT, chat(user("hi", "file:///etc/passwd")), expect=O, code="invalid_image_url"),
    Case("openai-garbage-base64", CHAT, chat(user("hi", "data:image/png;base64," + GARBAGE_B64)), expect=O,
         code="invalid_base64"),
    Case("openai-non-image", CHAT, chat(user("hi", "data:image/png;base64," + NON_IMAGE)), expect=O,
         code="invalid_image"),
    Case("openai-decompression-bomb", CHAT, chat(user("hi", "data:image/png;base64," + BOMB)), expect=O,
         code="image_too_large"),
    Case("openai-too-many-images", CHAT, chat(user("hi", DATA_URL, DATA_URL, DATA_URL)), expect=O,
         code="too_many_images"),
    Case("openai-no-user-message", CHAT, chat({"role": "system", "content": "be brief"}), expect=O,
         words=("user",)),
    Case("openai-over-long-prompt", CHAT, chat(user(LONG_PROMPT)) | {"max_tokens": None}, expect=O,
         code="context_length_exceeded"),
    Case("openai-max-tokens-negative", CHAT, chat(max_tokens=-1), expect=O, code="invalid_value"),
    Case("openai-max-completion-tokens-huge", CHAT, chat(max_tokens=None, max_completion_tokens=10**9), expect=O,
         code="invalid_value"),
    Case("openai-n-2", CHAT, chat(n=2), expect=O, code="unsupported_parameter"),
    Case("openai-tools", CHAT, chat(tools=[{"type": "function", "function": {"name": "bad name"}}]), expect=O,
         code="invalid_value"),
    Case("openai-stream-string", CHAT, chat(stream="true"), expect=O, code="invalid_type"),
    Case("openai-stream-options-without-stream", CHAT, chat(stream_options={"include_usage": True}), expect=O,
         code="invalid_value"),
    Case("openai-model-int", CHAT, chat(model=3), expect=O, code="invalid_type"),
    Case("openai-stop-five-strings", CHAT, chat(stop=["a", "b", "c", "d", "e"]), expect=O, code="invalid_type"),
    Case("openai-stream-bad-image", CHAT, chat(user("hi", "data:image/png;base64," + NON_IMAGE), stream=True),
         expect=O, code="invalid_image"),
    Case("openai-body-over-max-body-bytes", CHAT, chat(user(HUGE_TEXT)), expect=O, status=413),
    Case("openai-1x1-image-ok", CHAT, chat(user("hi", b64(image_bytes("tiny_1x1"), data_url=True))),
         expect="ok_openai", status=200),
    Case("openai-rgba-and-palette-ok", CHAT,
         chat(user("hi", b64(image_bytes("rgba_png"), data_url=True),
                   b64(image_bytes("palette_transparent_png"), data_url=True))), expect="ok_openai", status=200),
    Case("openai-unknown-fields-ignored", CHAT, chat(user_id="u1", metadata={"k": "v"}, whatever=[1]),
         expect="ok_openai", status=200),
    # ---- MCP ------------------------------------------------------------------------------------
    Case("mcp-malformed-json", MCP, raw=b'{"jsonrpc": "2.0", "id": 1, "method": ', expect="rpc", code=-32700),
    Case("mcp-invalid-utf8", MCP, raw=b'{"jsonrpc": "2.0", "id": 1, "method": "\xff"}', expect="rpc", code=-32700),
    Case("mcp-nan-argument", MCP,
         raw=b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": '
             b'"generate_hyperclovax_vision", "arguments": {"prompt": "hi", "temperature": NaN}}}',
         expect="rpc", code=-32700),
    Case("mcp-body-is-number", MCP, raw=b"42", expect="rpc", code=-32600),
    Case("mcp-body-is-string", MCP, raw=b'"tools/call"', expect="rpc", code=-32600),
    Case("mcp-empty-batch", MCP, raw=b"[]", expect="rpc", code=-32600),
    Case("mcp-wrong-jsonrpc-version", MCP, {"jsonrpc": "1.0", "id": 1, "method": "ping"}, expect="rpc",
         code=-32600),
    Case("mcp-method-not-string", MCP, {"jsonrpc": "2.0", "id": 1, "method": 5}, expect="rpc", code=-32600),
    Case("mcp-body-over-max-body-bytes", MCP, tools_call({"prompt": HUGE_TEXT}), expect="rpc", status=413),
    Case("mcp-unknown-method", MCP, {"jsonrpc": "2.0", "id": 1, "method": "tools/destroy"}, expect="rpc",
         status=200, code=-32601),
    Case("mcp-unknown-tool", MCP, tools_call({"prompt": "hi"}, name="rm_rf"), expect="rpc", status=200,
         code=-32602),
    Case("mcp-params-not-object", MCP, {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": [1]},
         expect="rpc", status=200, code=-32602),
    Case("mcp-params-string-json-accept", MCP, {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": "x"},
         expect="rpc", status=200, code=-32602, accept_sse=False),
    Case("mcp-arguments-not-object", MCP, tools_call("hi"), expect="rpc", status=200, code=-32602),
    Case("mcp-missing-prompt", MCP, tools_call({"image_base64": B64}), expect="tool_error", status=200,
         words=("prompt",)),
    Case("mcp-empty-prompt", MCP, tools_call({"prompt": ""}), expect="tool_error", status=200, words=("prompt",)),
    Case("mcp-prompt-not-string", MCP, tools_call({"prompt": {"text": "hi"}}), expect="tool_error", status=200,
         words=("prompt",)),
    Case("mcp-garbage-base64", MCP, tools_call({"prompt": "hi", "image_base64": GARBAGE_B64}),
         expect="tool_error", status=200, words=("base64",)),
    Case("mcp-non-image", MCP, tools_call({"prompt": "hi", "image_base64": NON_IMAGE}), expect="tool_error",
         status=200, words=("image",)),
    Case("mcp-decompression-bomb", MCP, tools_call({"prompt": "hi", "image_base64": BOMB}), expect="tool_error",
         status=200, words=("pixels|bomb",)),
    Case("mcp-image-over-max-image-bytes", MCP, lambda: tools_call({"prompt": "hi", "image_base64": lazy("noise")}),
         expect="tool_error", status=200, words=("MAX_IMAGE_BYTES",)),
    Case("mcp-over-long-prompt", MCP, tools_call({"prompt": LONG_PROMPT}), expect="tool_error", status=200,
         words=("context",)),
    Case("mcp-max-tokens-negative", MCP, tools_call({"prompt": "hi", "max_tokens": -1}), expect="tool_error",
         status=200, words=("max_tokens",)),
    Case("mcp-temperature-huge", MCP, tools_call({"prompt": "hi", "temperature": 1e308}), expect="tool_error",
         status=200, words=("temperature",)),
    Case("mcp-1x1-image-ok", MCP, tools_call({"prompt": "hi", "max_tokens": 2,
                                              "image_base64": b64(image_bytes("tiny_1x1"))}),
         expect="ok_tool", status=200),
    Case("mcp-cmyk-unknown-args-ok", MCP, tools_call({"prompt": "hi", "max_tokens": 2, "colour": "blue",
                                                      "image_base64": b64(image_bytes("cmyk_jpeg"))}),
         expect="ok_tool", status=200),
]

assert len({c.id for c in CASES}) == len(CASES), "duplicate case ids"


# ----------------------------------------------------------------------------------------
# the shared server and the test
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(demo_model_dir):
    with LiveServer(demo_model_dir, env={**BASE_ENV, **LIMITS}, name="hcx-bad-input") as server:
        yield server


def send(base: str, case: Case) -> requests.Response:
    if case.raw is not None:
        data = case.raw
    else:
        body = case.body() if callable(case.body) else case.body
        body = {k: v for k, v in body.items() if v is not None} if isinstance(body, dict) else body
        data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if case.path == MCP and case.accept_sse:
        headers["Accept"] = "application/json, text/event-stream"
    return requests.post(base + case.path, data=data, params=case.params or None, headers=headers, timeout=TIMEOUT)


def check_normal_request(base: str) -> None:
    resp = requests.post(base + SEED, json={"prompt": "Hello.", "max_tokens": 1}, timeout=TIMEOUT)
    assert resp.status_code == 200, f"the server did not answer a normal request afterwards: {resp.text[:300]}"
    assert isinstance(resp.json().get("result"), str)


def test_corpus_is_big_enough():
    assert len(CASES) >= 40
    apis = {c.path for c in CASES}
    assert {SEED, SEED_STREAM, CHAT, MCP} <= apis


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(srv, case: Case):
    resp = send(srv.url, case)
    assert resp.status_code < 500, f"{case.id}: server error {resp.status_code}: {resp.text[:500]}"
    text = resp.text.lower()
    if case.expect == "seed":
        check_seed_error(resp, case.status)
    elif case.expect == "openai":
        check_openai_error(resp, case.status, case.code)
    elif case.expect == "rpc":
        check_jsonrpc_error(resp, case.status, case.code)
    elif case.expect == "tool_error":
        text = check_tool_result(resp, is_error=True).lower()
    elif case.expect == "ok_seed":
        assert resp.status_code == 200, resp.text[:500]
        assert isinstance(resp.json().get("result"), str), resp.text[:500]
    elif case.expect == "ok_text":
        assert resp.status_code == 200, resp.text[:500]
        assert resp.headers["Content-Type"].startswith("text/plain"), resp.headers
        assert "[error]" not in resp.text, resp.text
    elif case.expect == "ok_openai":
        assert resp.status_code == 200, resp.text[:500]
        body = resp.json()
        assert body["object"] == "chat.completion" and isinstance(body["choices"][0]["message"]["content"], str)
    elif case.expect == "ok_tool":
        check_tool_result(resp, is_error=False)
    else:  # pragma: no cover
        raise AssertionError(case.expect)
    for word in case.words:  # "a|b": either may appear
        assert any(w.lower() in text for w in word.split("|")), f"{word!r} not in the error: {resp.text[:500]}"
    check_normal_request(srv.url)
