"""API key, Origin/CORS and prompt logging (issue 6), against real `hcx-cli serve` servers.

- keyed: API_KEY set, default ALLOWED_ORIGINS (localhost/127.0.0.1/[::1] on any port), default
  LOG_PROMPTS (off). Every route but /health needs `Authorization: Bearer <key>`; a 401 comes in
  the API's own error shape with WWW-Authenticate. A foreign Origin is a 403 on every API.
- app_origin: ALLOWED_ORIGINS=https://app.example exactly, LOG_PROMPTS=1, no key.
"""

from __future__ import annotations

import base64
import secrets
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.fixtures import LiveServer, b64, image_bytes, local_only
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

KEY = "hcx-" + secrets.token_urlsafe(24)
WRONG_SAME_LENGTH = KEY[:-4] + ("AAAA" if not KEY.endswith("AAAA") else "BBBB")
assert len(WRONG_SAME_LENGTH) == len(KEY) and WRONG_SAME_LENGTH != KEY
TIMEOUT = 120
IMAGE_B64 = b64(image_bytes("png"))
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}


@pytest.fixture(scope="module")
def keyed(demo_model_dir):
    with LiveServer(demo_model_dir, env={**BASE_ENV, "API_KEY": KEY}, name="hcx-auth") as srv:
        yield srv


@pytest.fixture(scope="module")
def app_origin(demo_model_dir):
    env = {**BASE_ENV, "ALLOWED_ORIGINS": "https://app.example", "LOG_PROMPTS": 1}
    with LiveServer(demo_model_dir, env=env, name="hcx-origin") as srv:
        yield srv


def bearer(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


# (id, method, path, JSON body, error shape)
ROUTES = [
    ("seed", "POST", SEED, {"prompt": "hi", "max_tokens": 2}, "seed"),
    ("seed-stream-query", "POST", SEED + "?stream=true", {"prompt": "hi", "max_tokens": 2}, "seed"),
    ("seed-stream-route", "POST", SEED_STREAM, {"prompt": "hi", "max_tokens": 2}, "seed"),
    ("models", "GET", "/v1/models", None, "openai"),
    ("model", "GET", "/v1/models/{model}", None, "openai"),
    ("chat", "POST", CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, "openai"),
    ("chat-stream", "POST", CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                   "stream": True}, "openai"),
    ("mcp-initialize", "POST", MCP, INIT, "rpc"),
    ("mcp-tools-call", "POST", MCP, tools_call({"prompt": "hi", "max_tokens": 2}), "rpc"),
    ("metrics", "GET", "/metrics", None, "seed"),
]
ROUTE_IDS = [r[0] for r in ROUTES]

BAD_CREDENTIALS = {
    "missing": {},
    "wrong-key-same-length": bearer(WRONG_SAME_LENGTH),
    "key-prefix": bearer(KEY[:-1]),
    "key-plus-suffix": bearer(KEY + "x"),
    "empty-bearer": {"Authorization": "Bearer "},
    "no-scheme": {"Authorization": KEY},
    "basic-scheme": {"Authorization": "Basic " + base64.b64encode(f"user:{KEY}".encode()).decode()},
    "key-in-x-api-key": {"X-Api-Key": KEY},
}


def call(srv: LiveServer, method: str, path: str, body, headers: dict | None = None) -> requests.Response:
    """One request; "{model}" in the path is the served model's id (the model folder's name)."""
    path = path.replace("{model}", Path(srv.model_path).name)
    headers = dict(headers or {})
    if path == MCP:
        headers.setdefault("Accept", "application/json, text/event-stream")
    return requests.request(method, srv.url + path, json=body, headers=headers, timeout=TIMEOUT)


def check_shape(resp, shape: str, status: int) -> None:
    if shape == "seed":
        check_seed_error(resp, status)
    elif shape == "openai":
        check_openai_error(resp, status)
    else:
        check_jsonrpc_error(resp, status)


# ----------------------------------------------------------------------------------------
# API key
# ----------------------------------------------------------------------------------------


def test_health_needs_no_key(keyed):
    resp = requests.get(keyed.url + "/health", timeout=TIMEOUT)
    assert resp.status_code == 200 and resp.json()["status"] == "ok", resp.text


@pytest.mark.parametrize("cred", list(BAD_CREDENTIALS), ids=list(BAD_CREDENTIALS))
@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_route_refuses_bad_credentials(keyed, route, cred):
    _, method, path, body, shape = route
    resp = call(keyed, method, path, body, BAD_CREDENTIALS[cred])
    check_shape(resp, shape, 401)
    assert resp.headers.get("WWW-Authenticate", "").lower().startswith("bearer"), resp.headers
    assert KEY not in resp.text


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_route_accepts_right_key(keyed, route):
    _, method, path, body, _shape = route
    resp = call(keyed, method, path, body, bearer())
    assert resp.status_code == 200, resp.text[:500]
    if path == MCP and body["method"] == "tools/call":
        ctype = resp.headers["Content-Type"]
        assert ctype.startswith(("application/json", "text/event-stream")), ctype
    elif path == MCP:
        assert resp.json()["result"]["serverInfo"]["name"] == "hcx-server"
        assert resp.headers.get("Mcp-Session-Id")


def test_bearer_scheme_is_case_insensitive(keyed):
    resp = call(keyed, "GET", "/v1/models", None, {"Authorization": f"bearer {KEY}"})
    assert resp.status_code == 200, resp.text


def test_openai_client_with_key(keyed):
    openai = pytest.importorskip("openai")
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)
    assert [m.id for m in good.models.list().data]
    answer = good.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert answer.choices[0].message.content is not None
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key=WRONG_SAME_LENGTH, max_retries=0, timeout=TIMEOUT)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def _mcp_session(url: str, headers: dict):
    """The official client over an httpx client that sends our headers on every request."""
    from mcp import Client
    from mcp.client.streamable_http import (
        create_mcp_http_client,
        streamable_http_client,
    )

    return Client(streamable_http_client(url, http_client=create_mcp_http_client(headers=headers)))


def _run(fn):
    anyio = pytest.importorskip("anyio")

    async def bounded():
        with anyio.fail_after(90):
            return await fn()

    return anyio.run(bounded)


def test_mcp_client_with_key(keyed):
    pytest.importorskip("mcp")

    async def body():
        async with _mcp_session(keyed.url + MCP, bearer()) as client:
            tools = await client.list_tools()
            assert "generate_hyperclovax_vision" in [t.name for t in tools.tools]
            result = await client.call_tool("generate_hyperclovax_vision",
                                            {"prompt": "Describe.", "image_base64": IMAGE_B64, "max_tokens": 2})
            assert result.is_error is False, result

    _run(body)


@pytest.mark.parametrize("headers", [{}, bearer(WRONG_SAME_LENGTH)], ids=["no-key", "wrong-key-same-length"])
def test_mcp_client_without_right_key_fails(keyed, headers):
    pytest.importorskip("mcp")

    async def body():
        async with _mcp_session(keyed.url + MCP, headers) as client:
            await client.list_tools()

    with pytest.raises(BaseException) as info:  # the SDK raises its own error type (or a group of them)
        _run(body)
    assert not isinstance(info.value, (KeyboardInterrupt, SystemExit))
    text = repr(info.value).lower()  # the SDK reports the server's JSON-RPC error message (or the status)
    assert "api key" in text or "401" in text, repr(info.value)


# ----------------------------------------------------------------------------------------
# Origin and CORS
# ----------------------------------------------------------------------------------------

FOREIGN = ["http://evil.example", "https://localhost.evil.example", "http://localhost:abc",
           "http://127.0.0.1.nip.io:8000", "null"]
LOCAL = ["http://localhost:3000", "http://127.0.0.1:5173", "http://localhost", "https://[::1]:8443"]


@pytest.mark.parametrize("origin", FOREIGN)
@pytest.mark.parametrize("route", ROUTES + [("health", "GET", "/health", None, "seed")],
                         ids=ROUTE_IDS + ["health"])
def test_foreign_origin_is_forbidden(keyed, route, origin):
    _, method, path, body, shape = route
    resp = call(keyed, method, path, body, {**bearer(), "Origin": origin})
    check_shape(resp, shape, 403)
    assert "Access-Control-Allow-Origin" not in resp.headers, resp.headers


@pytest.mark.parametrize("origin", FOREIGN[:2])
@pytest.mark.parametrize("path", [SEED, CHAT, MCP])
def test_foreign_origin_preflight_is_forbidden(keyed, path, origin):
    resp = requests.options(keyed.url + path, headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
                            timeout=TIMEOUT)
    assert resp.status_code == 403, resp.text
    assert "Access-Control-Allow-Origin" not in resp.headers


@pytest.mark.parametrize("origin", LOCAL)
@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_local_origin_gets_cors_headers(keyed, route, origin):
    _, method, path, body, _shape = route
    resp = call(keyed, method, path, body, {**bearer(), "Origin": origin})
    assert resp.status_code == 200, resp.text[:300]
    assert resp.headers.get("Access-Control-Allow-Origin") == origin, resp.headers
    assert "origin" in resp.headers.get("Vary", "").lower(), resp.headers


def test_local_origin_without_key_is_401_with_cors(keyed):
    """The browser must be able to read the 401 (CORS headers on errors too)."""
    resp = call(keyed, "POST", CHAT, ROUTES[5][3], {"Origin": "http://localhost:3000"})
    check_openai_error(resp, 401)
    assert resp.headers.get("Access-Control-Allow-Origin") == "http://localhost:3000"


@pytest.mark.parametrize("path", [SEED, SEED_STREAM, CHAT, MCP, "/v1/models", "/metrics"])
def test_preflight(keyed, path):
    origin = "http://localhost:5173"
    resp = requests.options(keyed.url + path, timeout=TIMEOUT, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, mcp-session-id"})
    assert resp.status_code == 204, resp.text  # preflights carry no credentials: no key needed
    assert resp.headers.get("Access-Control-Allow-Origin") == origin
    methods = resp.headers.get("Access-Control-Allow-Methods", "").upper()
    assert "POST" in methods and "GET" in methods, resp.headers
    allowed = resp.headers.get("Access-Control-Allow-Headers", "").lower()
    for header in ("authorization", "content-type", "mcp-session-id"):
        assert header in allowed, resp.headers


def test_no_origin_no_cors_headers(keyed):
    resp = call(keyed, "GET", "/v1/models", None, bearer())
    assert resp.status_code == 200 and "Access-Control-Allow-Origin" not in resp.headers


def test_allowed_origins_exact(app_origin):
    origin = "https://app.example"
    for route in ROUTES:
        _, method, path, body, _ = route
        resp = call(app_origin, method, path, body, {"Origin": origin})
        assert resp.status_code == 200, (route[0], resp.text[:300])
        assert resp.headers.get("Access-Control-Allow-Origin") == origin, (route[0], resp.headers)
    pre = requests.options(app_origin.url + CHAT, timeout=TIMEOUT,
                           headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 204 and pre.headers.get("Access-Control-Allow-Origin") == origin, pre.headers


@pytest.mark.parametrize("origin", ["http://app.example", "https://app.example:8443", "https://evil.app.example",
                                    "https://app.example.evil.com", "http://localhost:3000", "http://127.0.0.1:8000"])
def test_allowed_origins_exact_refuses_others(app_origin, origin):
    for route in ROUTES[:1] + ROUTES[3:4] + ROUTES[5:6] + ROUTES[7:8]:
        _, method, path, body, shape = route
        resp = call(app_origin, method, path, body, {"Origin": origin})
        check_shape(resp, shape, 403)
        assert "Access-Control-Allow-Origin" not in resp.headers
    pre = requests.options(app_origin.url + CHAT, timeout=TIMEOUT,
                           headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 403


# ----------------------------------------------------------------------------------------
# Browsers and webviews: the openai JS SDK's X-Stainless-* headers, VS Code's vscode-webview://
# ----------------------------------------------------------------------------------------

STAINLESS = ("x-stainless-os", "x-stainless-lang", "x-stainless-package-version", "x-stainless-runtime",
             "x-stainless-runtime-version", "x-stainless-arch", "x-stainless-retry-count", "x-stainless-timeout")
WEBVIEW = "vscode-webview://1m2n3o4p5q6r7s8t9u0v"


@pytest.fixture(scope="module")
def webview(demo_model_dir):
    env = {**BASE_ENV, "ALLOWED_ORIGINS": "vscode-webview://*,http://localhost:*"}
    with LiveServer(demo_model_dir, env=env, name="hcx-webview") as srv:
        yield srv


def preflight(srv: LiveServer, path: str, origin: str, headers: str) -> requests.Response:
    return requests.options(srv.url + path, timeout=TIMEOUT, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": headers})


@pytest.mark.parametrize("path", [CHAT, "/v1/responses", "/api/chat", MCP])
def test_preflight_allows_the_headers_a_browser_sdk_sends(keyed, path):
    """What Chrome sends before the openai JS SDK's first POST from a localhost page."""
    resp = preflight(keyed, path, "http://localhost:5173", ", ".join(("authorization", "content-type", *STAINLESS)))
    assert resp.status_code == 204, resp.text
    assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    allowed = [h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")]
    for header in ("authorization", "content-type", "mcp-session-id", "mcp-protocol-version", *STAINLESS):
        assert header in allowed, resp.headers
    assert "access-control-request-headers" in resp.headers.get("Vary", "").lower()


def test_preflight_from_a_foreign_origin_is_still_forbidden(keyed):
    resp = preflight(keyed, CHAT, "http://evil.example", ", ".join(STAINLESS))
    assert resp.status_code == 403
    assert "Access-Control-Allow-Origin" not in resp.headers and "Access-Control-Allow-Headers" not in resp.headers


def test_vscode_webview_is_refused_by_default(keyed):
    resp = call(keyed, "POST", CHAT, ROUTES[5][3], {**bearer(), "Origin": WEBVIEW})
    check_shape(resp, "openai", 403)


@pytest.mark.parametrize("route", [r for r in ROUTES if r[0] in ("chat", "chat-stream", "mcp-initialize", "seed")],
                         ids=lambda r: r[0])
def test_vscode_webview_scheme_wildcard(webview, route):
    _, method, path, body, _ = route
    pre = preflight(webview, path, WEBVIEW, "content-type, x-stainless-os, mcp-protocol-version")
    assert pre.status_code == 204 and pre.headers["Access-Control-Allow-Origin"] == WEBVIEW, pre.headers
    assert "x-stainless-os" in pre.headers["Access-Control-Allow-Headers"].lower()
    resp = call(webview, method, path, body, {"Origin": WEBVIEW})
    assert resp.status_code == 200, resp.text[:300]
    assert resp.headers["Access-Control-Allow-Origin"] == WEBVIEW
    exposed = resp.headers["Access-Control-Expose-Headers"].lower()
    assert "mcp-session-id" in exposed and "x-request-id" in exposed
    if path == MCP:
        assert resp.headers.get("Mcp-Session-Id")


@pytest.mark.parametrize("origin", ["vscode-file://vscode-app", "vscode-webview://", "http://evil.example",
                                    "https://localhost:3000", "null"])
def test_vscode_webview_wildcard_refuses_others(webview, origin):
    resp = call(webview, "POST", CHAT, ROUTES[5][3], {"Origin": origin})
    check_shape(resp, "openai", 403)
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert preflight(webview, CHAT, origin, "content-type").status_code == 403


# ----------------------------------------------------------------------------------------
# LOG_PROMPTS
# ----------------------------------------------------------------------------------------


def _send_marked_requests(srv: LiveServer, marker: str, headers: dict) -> tuple[list[str], str]:
    """The marker prompt + an image through each API (and one refused request); returns the
    request ids and a distinctive slice of the image's base64."""
    image = b64(image_bytes("png", size=(80, 60)))
    image_slice = image[len(image) // 2: len(image) // 2 + 48]
    prompt = f"Describe this: {marker}"
    sends = [
        (SEED, {"prompt": prompt, "image_base64": image, "max_tokens": 2}, 200),
        (SEED + "?stream=true", {"prompt": prompt, "image_base64": image, "max_tokens": 2}, 200),
        (CHAT, {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}]}]},
         200),
        (MCP, tools_call({"prompt": prompt, "image_base64": image, "max_tokens": 2}), 200),
        (SEED, {"prompt": prompt, "image_base64": image, "max_tokens": 4000}, 400),  # context exceeded
    ]
    ids = []
    for path, body, status in sends:
        rid = uuid.uuid4().hex[:12]
        resp = call(srv, "POST", path, body, {**headers, "X-Request-Id": rid})
        assert resp.status_code == status, resp.text[:300]
        if path == MCP:
            check_tool_result(resp, is_error=False)
        ids.append(rid)
    deadline = time.monotonic() + 20
    while not all(f"id={rid}" in srv.log() for rid in ids):
        assert time.monotonic() < deadline, f"access lines missing from the log:\n{srv.log()[-3000:]}"
        time.sleep(0.1)
    return ids, image_slice


def test_log_has_no_prompts_by_default(keyed):
    marker = "zebra-quokka-" + secrets.token_hex(4)
    _, image_slice = _send_marked_requests(keyed, marker, bearer())
    log = keyed.log()
    assert marker not in log, "the prompt reached the log without LOG_PROMPTS=1"
    assert image_slice not in log, "image base64 reached the log"
    assert KEY not in log, "the API key reached the log"


def test_log_prompts_on(app_origin):
    marker = "walrus-okapi-" + secrets.token_hex(4)
    ids, image_slice = _send_marked_requests(app_origin, marker, {})
    log = app_origin.log()
    lines = [line for line in log.splitlines() if marker in line]
    assert lines, f"LOG_PROMPTS=1 but the prompt is not in the log:\n{log[-2000:]}"
    assert any(f"id={ids[0]}" in line for line in lines), lines
    assert image_slice not in log, "image base64 reached the log (LOG_PROMPTS covers prompts only)"
