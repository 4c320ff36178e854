"""POST/GET/DELETE /mcp on the wire: every Streamable HTTP and JSON-RPC edge case, with requests.

Runs against the session demo server (or HCX_TEST_URL). Rules checked here come from the MCP
spec and from what real clients do (/work/shared/client-facts.md): Caret's TS SDK 1.11.1 sends
no MCP-Protocol-Version header and throws on any non-2xx answer to a POST, so errors to
well-formed requests are JSON-RPC errors with HTTP 200; the Python client starts with
`server/discover` and does not follow redirects.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from tests.fixtures import b64, image_bytes

TOOL = "generate_hyperclovax_vision"
SUPPORTED_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
NEWEST = max(SUPPORTED_VERSIONS)
JSON_ONLY = {"Accept": "application/json"}
BOTH = {"Accept": "application/json, text/event-stream"}  # what both SDKs send
TIMEOUT = 120


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def url(server_url) -> str:
    return server_url + "/mcp"


def request_msg(method: str, params: dict | None = None, msg_id=1) -> dict:
    return {"jsonrpc": "2.0", "id": msg_id, "method": method, **({"params": params} if params is not None else {})}


def notification_msg(method: str, params: dict | None = None) -> dict:
    return {"jsonrpc": "2.0", "method": method, **({"params": params} if params is not None else {})}


def init_params(version: str = "2025-03-26") -> dict:
    return {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "raw-http-test", "version": "0"}}


def call_params(timeout_tokens: int = 2, progress_token=None, **arguments) -> dict:
    params = {"name": TOOL, "arguments": {"prompt": "Hi.", "max_tokens": timeout_tokens, **arguments}}
    if progress_token is not None:
        params["_meta"] = {"progressToken": progress_token}
    return params


def post(url: str, body=None, *, data: bytes | None = None, session: str | None = None,
         headers: dict | None = None, **kwargs) -> requests.Response:
    hdrs = {"Content-Type": "application/json", **BOTH, **(headers or {})}
    if session is not None:
        hdrs["Mcp-Session-Id"] = session
    raw = data if data is not None else json.dumps(body).encode()
    return requests.post(url, data=raw, headers=hdrs, timeout=TIMEOUT, allow_redirects=False, **kwargs)


def rpc(url: str, method: str, params: dict | None = None, msg_id=1, **kwargs) -> dict:
    """A request that must come back as one JSON-RPC response with HTTP 200."""
    resp = post(url, request_msg(method, params, msg_id), **kwargs)
    assert resp.status_code == 200, f"{method}: HTTP {resp.status_code}: {resp.text[:500]}"
    assert resp.headers["Content-Type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert body.get("jsonrpc") == "2.0" and body.get("id") == msg_id, body
    return body


def error_of(body: dict, code: int) -> dict:
    assert "result" not in body, body
    error = body.get("error")
    assert isinstance(error, dict) and error.get("code") == code, f"expected error {code}, got {body}"
    assert isinstance(error.get("message"), str) and error["message"], body
    assert "traceback" not in error["message"].lower(), body
    return error


def initialize(url: str, version: str = "2025-03-26", **kwargs) -> tuple[str, dict]:
    resp = post(url, request_msg("initialize", init_params(version)), **kwargs)
    assert resp.status_code == 200, resp.text
    session = resp.headers.get("Mcp-Session-Id")
    assert session, f"no Mcp-Session-Id header: {resp.headers}"
    assert all(0x21 <= ord(ch) <= 0x7E for ch in session), f"session id must be visible ASCII: {session!r}"
    return session, resp.json()


def session_for(url: str) -> str:
    """initialize + notifications/initialized, as every client does."""
    session, _ = initialize(url)
    resp = post(url, notification_msg("notifications/initialized"), session=session)
    assert resp.status_code == 202, resp.text
    return session


def sse_messages(resp: requests.Response, on_message=None) -> list[dict]:
    """Parse a text/event-stream body as it arrives: the JSON of each `event: message` frame."""
    messages, buffer = [], ""
    for chunk in resp.iter_content(chunk_size=None):  # one HTTP chunk at a time, as sent
        buffer += chunk.decode("utf-8")
        buffer = buffer.replace("\r\n", "\n")
        while "\n\n" in buffer:
            frame, buffer = buffer.split("\n\n", 1)
            if not frame.strip():
                continue
            event, data = "message", []
            for line in frame.split("\n"):
                if line.startswith(":"):
                    continue  # comment / keep-alive
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "event":
                    event = value
                elif field == "data":
                    data.append(value)
            assert event == "message", f"unexpected SSE event {event!r} in frame {frame!r}"
            message = json.loads("\n".join(data))
            messages.append(message)
            if on_message is not None:
                on_message(message)
    assert not buffer.strip(), f"unterminated SSE frame at the end: {buffer!r}"
    return messages


def progress_values(messages: list[dict], token) -> list[float]:
    notes = [m for m in messages if m.get("method") == "notifications/progress"]
    for note in notes:
        assert note["params"]["progressToken"] == token, note
        assert "id" not in note, note
    return [n["params"]["progress"] for n in notes]


# ----------------------------------------------------------------------------------------
# initialize and protocol versions
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_initialize_answers_the_requested_version(url, version):
    session, body = initialize(url, version)
    result = body["result"]
    assert result["protocolVersion"] == version
    assert result["capabilities"]["tools"] is not None
    assert result["serverInfo"]["name"] == "hcx-server" and result["serverInfo"]["version"]
    # the session works right away, with the negotiated version header (2025-06-18+) or without
    assert rpc(url, "ping", session=session, headers={"MCP-Protocol-Version": version})["result"] == {}


@pytest.mark.parametrize("version", ["1999-01-01", "2099-12-31", ""])
def test_initialize_unknown_version_gets_the_newest(url, version):
    params = init_params()
    params["protocolVersion"] = version
    body = rpc(url, "initialize", params)
    assert body["result"]["protocolVersion"] == NEWEST


def test_initialize_with_a_string_id_and_no_accept_header(url):
    resp = requests.post(url, json=request_msg("initialize", init_params(), "init-1"), timeout=TIMEOUT)
    assert resp.status_code == 200 and resp.json()["id"] == "init-1"
    assert resp.headers.get("Mcp-Session-Id")


# ----------------------------------------------------------------------------------------
# MCP-Protocol-Version header
# ----------------------------------------------------------------------------------------


def test_protocol_version_header_absent_is_fine(url):
    """Caret (TS SDK 1.11.1) never sends it: taken as 2025-03-26."""
    session = session_for(url)
    assert rpc(url, "tools/list", {}, session=session)["result"]["tools"]
    body = rpc(url, "tools/call", call_params(), session=session, headers=JSON_ONLY)
    assert body["result"]["isError"] is False


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_protocol_version_header_supported(url, version):
    rpc(url, "ping", headers={"MCP-Protocol-Version": version})


@pytest.mark.parametrize("version", ["1999-01-01", "2026-07-28", "latest"])
def test_protocol_version_header_unsupported_is_400(url, version):
    session = session_for(url)
    resp = post(url, request_msg("ping"), session=session, headers={"MCP-Protocol-Version": version})
    assert resp.status_code == 400, resp.text
    error = error_of(resp.json(), -32600)
    assert version in error["message"]


# ----------------------------------------------------------------------------------------
# sessions
# ----------------------------------------------------------------------------------------


def test_session_lifecycle(url):
    session = session_for(url)
    assert rpc(url, "ping", session=session)["result"] == {}
    assert rpc(url, "tools/list", session=session)["result"]["tools"]
    other, _ = initialize(url)
    assert other != session, "each initialize opens a new session"

    resp = requests.delete(url, headers={"Mcp-Session-Id": session}, timeout=TIMEOUT)
    assert resp.status_code in (200, 204), resp.text
    for method in ("ping", "tools/list"):
        resp = post(url, request_msg(method), session=session)
        assert resp.status_code == 404, f"{method} on an ended session: {resp.status_code} {resp.text}"
        error_of(resp.json(), -32001)
    resp = requests.delete(url, headers={"Mcp-Session-Id": session}, timeout=TIMEOUT)
    assert resp.status_code == 404
    # the other session is untouched
    assert rpc(url, "ping", session=other)["result"] == {}


@pytest.mark.parametrize("body", [request_msg("ping"), notification_msg("notifications/initialized"),
                                  [request_msg("ping")]], ids=["request", "notification", "batch"])
def test_unknown_session_is_404(url, body):
    resp = post(url, body, session="0123456789abcdef-unknown")
    assert resp.status_code == 404, resp.text
    error_of(resp.json(), -32001)


def test_requests_without_a_session_are_answered(url):
    """The Python client's first request (server/discover) carries no session id."""
    assert rpc(url, "ping")["result"] == {}


def test_delete_without_session_header_is_400(url):
    resp = requests.delete(url, timeout=TIMEOUT)
    assert resp.status_code == 400, resp.text


# ----------------------------------------------------------------------------------------
# notifications, ping, tools
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("message", [
    notification_msg("notifications/initialized"),
    notification_msg("notifications/cancelled", {"requestId": 12345, "reason": "nothing to cancel"}),
    notification_msg("notifications/roots/list_changed"),
    notification_msg("notifications/some_future_thing", {"x": 1}),
    {"jsonrpc": "2.0", "id": 77, "result": {}},  # a response (to a server request we never sent)
    {"jsonrpc": "2.0", "id": 78, "error": {"code": -1, "message": "client-side error"}},
], ids=["initialized", "cancelled_unknown", "roots_changed", "unknown_notification", "response", "error_response"])
def test_notifications_and_responses_get_202_and_no_body(url, message):
    resp = post(url, message, session=session_for(url))
    assert resp.status_code == 202, resp.text
    assert resp.content == b""


@pytest.mark.parametrize("msg_id", [1, 0, -5, "abc", "", 2**53])
def test_ping_echoes_the_id(url, msg_id):
    assert rpc(url, "ping", msg_id=msg_id)["result"] == {}


def test_tools_list(url):
    tools = rpc(url, "tools/list", {}, session=session_for(url))["result"]["tools"]
    assert [t["name"] for t in tools] == [TOOL]
    tool = tools[0]
    schema = tool["inputSchema"]
    assert schema["type"] == "object" and schema["required"] == ["prompt"]
    assert {"prompt", "image_base64", "max_tokens", "temperature", "top_p", "seed"} <= set(schema["properties"])
    assert "image_path" not in schema["properties"], "HTTP clients cannot send local paths"
    assert tool["description"]


@pytest.mark.parametrize("image", [None, "plain", "data_url"])
def test_tools_call_result_shape(url, image):
    args = {}
    if image:
        args["image_base64"] = b64(image_bytes("png"), data_url=image == "data_url")
    resp = post(url, request_msg("tools/call", call_params(4, **args), msg_id="call-1"), session=session_for(url),
                headers=JSON_ONLY)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json()
    assert body["jsonrpc"] == "2.0" and body["id"] == "call-1"
    result = body["result"]
    assert result["isError"] is False
    assert len(result["content"]) == 1
    assert result["content"][0]["type"] == "text" and isinstance(result["content"][0]["text"], str)


@pytest.mark.parametrize("arguments, words", [
    ({"prompt": "x", "image_base64": "!!!"}, ["image_base64", "base64"]),
    ({"prompt": "x", "image_base64": b64(b"GIF89a but not really")}, ["image_base64", "not a readable image"]),
    ({}, ["prompt", "required"]),
    ({"prompt": 5}, ["prompt", "string"]),
    ({"prompt": "x", "max_tokens": -1}, ["max_tokens"]),
    ({"prompt": "x", "top_p": 0}, ["top_p"]),
    ({"prompt": "x", "image_path": "/etc/hostname"}, ["image_path", "stdio"]),
], ids=["bad_base64", "not_image", "no_prompt", "prompt_not_string", "max_tokens", "top_p", "image_path"])
def test_tools_call_bad_arguments_are_error_results_with_http_200(url, arguments, words):
    body = rpc(url, "tools/call", {"name": TOOL, "arguments": arguments})
    result = body["result"]
    assert result["isError"] is True, body
    text = result["content"][0]["text"]
    for word in words:
        assert word.lower() in text.lower(), f"{word!r} not in {text!r}"


def test_unknown_tool_is_invalid_params_with_http_200(url):
    body = rpc(url, "tools/call", {"name": "no_such_tool", "arguments": {}}, session=session_for(url))
    error = error_of(body, -32602)
    assert "no_such_tool" in error["message"]


@pytest.mark.parametrize("params", [{"name": TOOL, "arguments": "prompt=hi"}, {"name": TOOL, "arguments": [1]}])
def test_tools_call_arguments_not_an_object_is_invalid_params(url, params):
    error_of(rpc(url, "tools/call", params), -32602)


@pytest.mark.parametrize("accept", [JSON_ONLY, BOTH], ids=["json", "json_and_sse"])
@pytest.mark.parametrize("params", [[1], "x", 5], ids=["array", "string", "number"])
def test_params_not_an_object_is_invalid_params(url, params, accept):
    """Both SDKs send `Accept: application/json, text/event-stream` on every POST."""
    for method in ("tools/call", "tools/list", "ping"):
        resp = post(url, {"jsonrpc": "2.0", "id": 9, "method": method, "params": params}, headers=accept)
        assert resp.status_code == 200, f"{method} params={params!r}: HTTP {resp.status_code} {resp.text[:300]}"
        error_of(resp.json(), -32602)


@pytest.mark.parametrize("method", ["resources/list", "prompts/list", "completion/complete", "tools/unknown",
                                    "server/discover", "INITIALIZE", ""])
def test_unknown_method_is_method_not_found_with_http_200(url, method):
    error = error_of(rpc(url, method, {}), -32601)
    assert method in error["message"]


def test_server_discover_first_without_session(url):
    """The Python client's first request: must not need a session id; -32601 makes it fall back."""
    resp = post(url, request_msg("server/discover", {}), headers={"Accept": "application/json, text/event-stream"})
    assert resp.status_code == 200
    error_of(resp.json(), -32601)


# ----------------------------------------------------------------------------------------
# malformed input
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    b'{"jsonrpc": "2.0", "id": 1, "method": "ping"',
    b"not json",
    b"",
    b"\xff\xfe\x00garbage",
    b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"x": NaN}}',
    b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"x": Infinity}}',
], ids=["truncated", "text", "empty", "not_utf8", "nan", "infinity"])
def test_bad_json_is_parse_error_400(url, data):
    resp = post(url, data=data)
    assert resp.status_code == 400, resp.text
    body = resp.json()
    error_of(body, -32700)
    assert body["id"] is None


@pytest.mark.parametrize("message", [
    {"id": 1, "method": "ping"},
    {"jsonrpc": "1.0", "id": 1, "method": "ping"},
    {"jsonrpc": 2.0, "id": 1, "method": "ping"},
    {"jsonrpc": "2.0", "id": 1, "method": 42},
    {"jsonrpc": "2.0", "id": 1},
    {"jsonrpc": "2.0", "id": 1.5, "method": "ping"},
    {"jsonrpc": "2.0", "id": True, "method": "ping"},
    {"jsonrpc": "2.0", "id": None, "method": "ping"},
    {"jsonrpc": "2.0", "id": {"a": 1}, "method": "ping"},
    {"jsonrpc": "2.0", "id": [1], "method": "tools/list"},
    {"jsonrpc": "2.0", "id": {"a": 1}, "method": "initialize", "params": init_params()},
    42,
    "ping",
    None,
], ids=["no_jsonrpc", "jsonrpc_1", "jsonrpc_number", "method_number", "no_method", "id_float", "id_bool",
        "id_null", "id_object", "id_array", "initialize_bad_id", "number", "string", "null"])
def test_not_a_jsonrpc_request_is_invalid_request(url, message):
    resp = post(url, message)
    assert resp.status_code in (200, 400), resp.text
    body = resp.json()
    assert isinstance(body, dict), body
    error_of(body, -32600)
    assert "Mcp-Session-Id" not in resp.headers, "no session for an invalid initialize"


def test_array_of_junk_is_invalid_request_each(url):
    resp = post(url, [1, "x", {"foo": "bar"}])
    assert resp.status_code in (200, 400), resp.text
    body = resp.json()
    assert isinstance(body, list) and len(body) == 3, body
    for item in body:
        error_of(item, -32600)
        assert item["id"] is None


def test_empty_batch_is_invalid_request(url):
    resp = post(url, [])
    assert resp.status_code == 400
    error_of(resp.json(), -32600)


# ----------------------------------------------------------------------------------------
# batches (2025-03-26)
# ----------------------------------------------------------------------------------------


def test_batch_of_requests_gets_an_array(url):
    session = session_for(url)
    resp = post(url, [request_msg("ping", msg_id=1), request_msg("tools/list", {}, msg_id="two")], session=session)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert isinstance(body, list) and len(body) == 2, body
    by_id = {item["id"]: item for item in body}
    assert by_id[1]["result"] == {}
    assert by_id["two"]["result"]["tools"][0]["name"] == TOOL


def test_batch_mixing_requests_notifications_and_errors(url):
    session = session_for(url)
    batch = [notification_msg("notifications/initialized"), request_msg("ping", msg_id=1),
             request_msg("nope/nope", msg_id=2), {"jsonrpc": "2.0", "id": 3}]
    body = post(url, batch, session=session).json()
    assert isinstance(body, list) and len(body) == 3, body  # nothing for the notification
    by_id = {item["id"]: item for item in body}
    assert by_id[1]["result"] == {}
    error_of(by_id[2], -32601)
    error_of(by_id[3], -32600)


def test_batch_of_notifications_is_202(url):
    session = session_for(url)
    resp = post(url, [notification_msg("notifications/initialized"),
                      notification_msg("notifications/cancelled", {"requestId": 1})], session=session)
    assert resp.status_code == 202, resp.text
    assert resp.content == b""


def test_batch_tools_call(url):
    batch = [request_msg("tools/call", call_params(2), msg_id=1),
             request_msg("tools/call", {"name": "nope", "arguments": {}}, msg_id=2)]
    body = post(url, batch).json()
    by_id = {item["id"]: item for item in body}
    assert by_id[1]["result"]["isError"] is False
    error_of(by_id[2], -32602)


# ----------------------------------------------------------------------------------------
# GET / DELETE / paths
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["", "/"], ids=["mcp", "mcp_slash"])
def test_get_is_405(url, path):
    for headers in ({"Accept": "text/event-stream"}, {}):
        resp = requests.get(url + path, headers=headers, timeout=TIMEOUT, allow_redirects=False)
        assert resp.status_code == 405, resp.text
        assert "POST" in resp.headers.get("Allow", ""), resp.headers


@pytest.mark.parametrize("path", ["", "/"], ids=["mcp", "mcp_slash"])
def test_http_errors_are_jsonrpc_shaped(url, path):
    """Error bodies on the MCP endpoint are JSON-RPC error objects, with or without the slash."""
    resp = requests.get(url + path, headers={"Accept": "text/event-stream"}, timeout=TIMEOUT, allow_redirects=False)
    assert resp.status_code == 405
    body = resp.json()
    assert body.get("jsonrpc") == "2.0" and isinstance(body.get("error"), dict), \
        f"GET {url + path}: not a JSON-RPC error body: {body}"
    resp = requests.delete(url + path, headers={"Mcp-Session-Id": "no-such-session"}, timeout=TIMEOUT)
    assert resp.status_code == 404
    body = resp.json()
    assert body.get("jsonrpc") == "2.0" and isinstance(body.get("error"), dict), \
        f"DELETE {url + path}: not a JSON-RPC error body: {body}"


def test_trailing_slash_works_without_redirect(url):
    slash = url + "/"
    session, body = initialize(slash)
    assert body["result"]["protocolVersion"] == "2025-03-26"
    assert rpc(slash, "tools/list", session=session)["result"]["tools"]
    assert rpc(url, "ping", session=session)["result"] == {}, "one session, both spellings"
    resp = requests.delete(slash, headers={"Mcp-Session-Id": session}, timeout=TIMEOUT, allow_redirects=False)
    assert resp.status_code in (200, 204)
    assert post(url, request_msg("ping"), session=session).status_code == 404


# ----------------------------------------------------------------------------------------
# Origin / CORS
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("origin", ["http://evil.example", "https://localhost.evil.example", "null",
                                    "http://localhost.attacker.test:8000"])
def test_foreign_origin_is_403(url, origin):
    resp = post(url, request_msg("initialize", init_params()), headers={"Origin": origin})
    assert resp.status_code == 403, resp.text
    assert "Mcp-Session-Id" not in resp.headers
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp = requests.options(url, headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
                            timeout=TIMEOUT)
    assert resp.status_code == 403
    assert "Access-Control-Allow-Origin" not in resp.headers


@pytest.mark.parametrize("origin", ["http://localhost:5173", "http://127.0.0.1:3000", "http://localhost"])
def test_local_origin_is_allowed_with_cors(url, origin):
    session, _ = initialize(url, headers={"Origin": origin})
    resp = post(url, request_msg("tools/list"), session=session, headers={"Origin": origin})
    assert resp.status_code == 200
    assert resp.headers.get("Access-Control-Allow-Origin") == origin
    assert "origin" in resp.headers.get("Vary", "").lower()
    assert "mcp-session-id" in resp.headers.get("Access-Control-Expose-Headers", "").lower()

    pre = requests.options(url, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                         "Access-Control-Request-Headers": "content-type, mcp-session-id"},
                           timeout=TIMEOUT)
    assert pre.status_code in (200, 204), pre.text
    assert pre.headers.get("Access-Control-Allow-Origin") == origin
    allowed_headers = pre.headers.get("Access-Control-Allow-Headers", "").lower()
    for header in ("content-type", "mcp-session-id", "mcp-protocol-version"):
        assert header in allowed_headers, pre.headers
    methods = pre.headers.get("Access-Control-Allow-Methods", "")
    assert "POST" in methods and "DELETE" in methods


# ----------------------------------------------------------------------------------------
# SSE progress
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["progress-1", 7])
def test_sse_progress_then_result(url, token):
    session = session_for(url)
    params = call_params(8, progress_token=token, min_tokens=8, seed=1)
    with post(url, request_msg("tools/call", params, msg_id=5), session=session, stream=True) as resp:
        assert resp.status_code == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream"), resp.headers
        messages = sse_messages(resp)
    final = messages[-1]
    assert final["id"] == 5 and final["result"]["isError"] is False, final
    assert all("id" not in m for m in messages[:-1]), "the response must be the last message"
    values = progress_values(messages, token)
    assert len(values) >= 2, messages
    assert all(b > a for a, b in zip(values, values[1:])), f"progress must increase: {values}"
    assert values[-1] <= 8
    assert all(m["params"].get("total") == 8 for m in messages[:-1])


def test_sse_tool_error_is_one_result_frame(url):
    params = call_params(8, progress_token="p", image_base64="***")
    with post(url, request_msg("tools/call", params, msg_id=6), stream=True) as resp:
        assert resp.status_code == 200
        messages = sse_messages(resp) if resp.headers["Content-Type"].startswith("text/event-stream") \
            else [resp.json()]
    assert messages[-1]["id"] == 6 and messages[-1]["result"]["isError"] is True


def test_progress_token_without_sse_accept_gets_plain_json(url):
    resp = post(url, request_msg("tools/call", call_params(4, progress_token="p", min_tokens=4)), headers=JSON_ONLY)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.json()["result"]["isError"] is False


def test_sse_accept_without_progress_token_may_be_json(url):
    resp = post(url, request_msg("tools/call", call_params(2)), headers=BOTH)
    assert resp.status_code == 200
    if resp.headers["Content-Type"].startswith("text/event-stream"):
        body = [m for m in sse_messages(resp) if "id" in m][-1]
    else:
        body = resp.json()
    assert body["result"]["isError"] is False


# ----------------------------------------------------------------------------------------
# cancellation
# ----------------------------------------------------------------------------------------

LONG = 1000  # tokens; the demo model cannot stop early with min_tokens=LONG


def cancel(url: str, session: str, request_id) -> None:
    resp = post(url, notification_msg("notifications/cancelled", {"requestId": request_id, "reason": "test"}),
                session=session)
    assert resp.status_code == 202, resp.text


def assert_server_answers_right_after(url: str, session: str) -> None:
    started = time.monotonic()
    body = rpc(url, "tools/call", call_params(2), msg_id="after", session=session, headers=JSON_ONLY)
    assert body["result"]["isError"] is False, body
    assert time.monotonic() - started < 30, "the cancelled generation still held the model"


def test_cancel_stops_an_sse_call(url):
    """Cancel after the first progress notification: far fewer than LONG tokens are generated."""
    session = session_for(url)
    messages: list[dict] = []
    first_progress = threading.Event()
    failure: list[BaseException] = []

    def on_message(message):
        if message.get("method") == "notifications/progress":
            first_progress.set()

    def call():
        try:
            params = call_params(LONG, progress_token="long", min_tokens=LONG)
            with post(url, request_msg("tools/call", params, msg_id="long-sse"), session=session,
                      stream=True) as resp:
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                messages.extend(sse_messages(resp, on_message))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failure.append(exc)
        finally:
            first_progress.set()

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    assert first_progress.wait(TIMEOUT), "no progress notification arrived"
    assert not failure, failure
    cancel(url, session, "long-sse")
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "the cancelled call did not finish"
    assert not failure, failure
    final = messages[-1]
    assert final["id"] == "long-sse", final
    error_of(final, -32800)
    values = progress_values(messages, "long")
    assert values and values[-1] < LONG / 2, f"generation went on after the cancel: last progress {values[-1:]}"
    assert_server_answers_right_after(url, session)


def test_cancel_stops_a_json_call(url):
    """A plain JSON tools/call in a thread; notifications/cancelled with the same session and id."""
    session = session_for(url)
    outcome: dict = {}

    def call():
        started = time.monotonic()
        try:
            params = call_params(LONG, min_tokens=LONG)
            outcome["resp"] = post(url, request_msg("tools/call", params, msg_id=4242), session=session,
                                   headers=JSON_ONLY)
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc
        outcome["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    # The request may not be running yet when the first cancel arrives (it would be ignored):
    # repeat until the call ends; a cancel for an unknown request is a harmless no-op.
    time.sleep(0.2)
    deadline = time.monotonic() + TIMEOUT
    cancels = 0
    while thread.is_alive() and time.monotonic() < deadline:
        cancel(url, session, 4242)
        cancels += 1
        thread.join(0.1)
    assert not thread.is_alive(), "the cancelled call did not finish"
    assert "error" not in outcome, outcome
    resp = outcome["resp"]
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"] == 4242, body
    error_of(body, -32800)
    assert_server_answers_right_after(url, session)


def test_cancel_from_another_session_is_ignored(url):
    """A cancel only applies to the session that sent the request."""
    session, other = session_for(url), session_for(url)
    outcome: dict = {}
    first_progress = threading.Event()

    def on_message(message):
        if message.get("method") == "notifications/progress":
            first_progress.set()

    def call():
        params = call_params(200, progress_token="t", min_tokens=200)
        with post(url, request_msg("tools/call", params, msg_id=99), session=session, stream=True) as resp:
            outcome["messages"] = sse_messages(resp, on_message)
        first_progress.set()

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    assert first_progress.wait(TIMEOUT)
    cancel(url, other, 99)
    thread.join(TIMEOUT)
    final = outcome["messages"][-1]
    assert final["id"] == 99 and final.get("result", {}).get("isError") is False, final


# ----------------------------------------------------------------------------------------
# the modern era (2026-07-28): no handshake, no session, _meta and headers on every request
# ----------------------------------------------------------------------------------------

MODERN = "2026-07-28"


def modern_meta(version: str = MODERN, **extra) -> dict:
    return {"io.modelcontextprotocol/protocolVersion": version, "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "raw-http-test", "version": "0"}, **extra}


def modern_post(url: str, method: str, params: dict | None = None, msg_id=1, headers: dict | None = None,
                version: str = MODERN, **kwargs) -> requests.Response:
    """A modern request with the headers the spec requires (override or drop them with `headers`)."""
    params = {**(params or {}), "_meta": {**modern_meta(version), **(params or {}).get("_meta", {})}}
    hdrs = {"MCP-Protocol-Version": version, "Mcp-Method": method}
    if method == "tools/call":
        hdrs["Mcp-Name"] = params.get("name", "")
    hdrs = {k: v for k, v in {**hdrs, **(headers or {})}.items() if v is not None}
    return post(url, request_msg(method, params, msg_id), headers=hdrs, **kwargs)


def modern_result(resp: requests.Response, msg_id=1) -> dict:
    assert resp.status_code == 200, resp.text[:500]
    assert "Mcp-Session-Id" not in resp.headers, "the modern era has no sessions"
    body = resp.json()
    assert body["id"] == msg_id and "result" in body, body
    result = body["result"]
    assert result["resultType"] == "complete", result
    assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "hcx-server", result
    return result


def test_modern_discover(url):
    result = modern_result(modern_post(url, "server/discover"))
    assert result["supportedVersions"][-1] == MODERN and set(SUPPORTED_VERSIONS) < set(result["supportedVersions"])
    assert result["capabilities"]["tools"] is not None and TOOL in result["instructions"]
    assert result["cacheScope"] in ("public", "private") and isinstance(result["ttlMs"], int)


def test_modern_tools_list_and_call_without_any_handshake(url):
    listed = modern_result(modern_post(url, "tools/list", msg_id="l"), "l")
    assert [t["name"] for t in listed["tools"]] == [TOOL] and listed["ttlMs"] >= 0
    for args in ({}, {"image_base64": b64(image_bytes("png"))}):
        result = modern_result(modern_post(url, "tools/call", call_params(4, **args), msg_id=7, headers=JSON_ONLY), 7)
        assert result["isError"] is False and result["content"][0]["type"] == "text"


def test_modern_call_with_progress_over_sse(url):
    params = call_params(6, min_tokens=6)
    params["_meta"] = {"progressToken": "mp"}
    with modern_post(url, "tools/call", params, msg_id=8, stream=True) as resp:
        assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        messages = sse_messages(resp)
    assert messages[-1]["id"] == 8 and messages[-1]["result"]["resultType"] == "complete"
    values = progress_values(messages, "mp")
    assert len(values) >= 2 and values[-1] <= 6


def test_modern_bad_tool_input_is_an_error_result(url):
    result = modern_result(modern_post(url, "tools/call", call_params(2, image_base64="%%%")))
    assert result["isError"] is True and "image_base64" in result["content"][0]["text"]


@pytest.mark.parametrize("method", ["ping", "initialize", "resources/list", "logging/setLevel"])
def test_modern_unknown_method_is_404(url, method):
    resp = modern_post(url, method, msg_id="m")
    assert resp.status_code == 404, resp.text
    body = resp.json()
    assert body["id"] == "m"
    assert method in error_of(body, -32601)["message"]


def test_modern_unknown_tool_is_invalid_params_400(url):
    resp = modern_post(url, "tools/call", {"name": "nope", "arguments": {}}, msg_id=3)
    assert resp.status_code == 400 and resp.json()["id"] == 3
    error_of(resp.json(), -32602)


@pytest.mark.parametrize("headers, words", [
    ({"MCP-Protocol-Version": None}, ["MCP-Protocol-Version", "required"]),
    ({"Mcp-Method": None}, ["Mcp-Method"]),
    ({"Mcp-Method": "tools/list"}, ["Mcp-Method", "tools/call"]),
    ({"Mcp-Name": None}, ["Mcp-Name"]),
    ({"Mcp-Name": "other_tool"}, ["Mcp-Name"]),
    ({"Mcp-Name": "=?base64?!!!?="}, ["Mcp-Name"]),
], ids=["no_version_header", "no_method_header", "wrong_method", "no_name", "wrong_name", "bad_base64_name"])
def test_modern_header_mismatch_is_400_with_the_id(url, headers, words):
    resp = modern_post(url, "tools/call", call_params(2), msg_id=41, headers=headers)
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["id"] == 41
    message = error_of(body, -32020)["message"]
    for word in words:
        assert word in message, message


def test_modern_name_header_may_be_base64(url):
    encoded = "=?base64?" + b64(TOOL.encode()) + "?="
    result = modern_result(modern_post(url, "tools/call", call_params(2), headers={"Mcp-Name": encoded, **JSON_ONLY}))
    assert result["isError"] is False


def test_modern_header_and_body_versions_must_agree(url):
    resp = modern_post(url, "tools/list", {"_meta": {"io.modelcontextprotocol/protocolVersion": "2025-11-25"}})
    assert resp.status_code == 400
    error_of(resp.json(), -32020)


def test_modern_envelope_is_required(url):
    resp = post(url, request_msg("tools/list", {}, 5), headers={"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/list"})
    assert resp.status_code == 400 and resp.json()["id"] == 5
    error_of(resp.json(), -32602)
    params = {"_meta": {"io.modelcontextprotocol/clientCapabilities": None}}
    resp = modern_post(url, "tools/list", params)
    assert resp.status_code == 400
    assert "clientCapabilities" in error_of(resp.json(), -32602)["message"]


@pytest.mark.parametrize("session", [False, True], ids=["sessionless", "with_unknown_session"])
def test_unsupported_version_in_header_and_body_is_32022(url, session):
    headers = {"Mcp-Session-Id": "0123-not-a-session"} if session else None
    resp = modern_post(url, "tools/list", msg_id=6, version="2099-01-01", headers=headers)
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["id"] == 6
    error = error_of(body, -32022)
    assert error["data"]["requested"] == "2099-01-01" and MODERN in error["data"]["supported"]


def test_unsupported_version_header_without_session_is_32022(url):
    resp = post(url, request_msg("tools/list", {}, "v"), headers={"MCP-Protocol-Version": "2099-01-01"})
    assert resp.status_code == 400 and resp.json()["id"] == "v"
    assert set(error_of(resp.json(), -32022)["data"]["supported"]) >= {MODERN, *SUPPORTED_VERSIONS}


def test_session_fixes_the_handshake_era(url):
    """A modern version header inside a handshake session is refused, echoing the request id."""
    session = session_for(url)
    resp = post(url, request_msg("tools/list", {}, 77), session=session, headers={"MCP-Protocol-Version": MODERN})
    assert resp.status_code == 400 and resp.json()["id"] == 77
    assert MODERN in error_of(resp.json(), -32600)["message"]


def test_modern_batch_is_invalid_and_notifications_are_accepted(url):
    resp = post(url, [request_msg("tools/list", {"_meta": modern_meta()})],
                headers={"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/list"})
    assert resp.status_code == 400
    error_of(resp.json(), -32600)
    resp = post(url, notification_msg("notifications/cancelled", {"requestId": 1}),
                headers={"MCP-Protocol-Version": MODERN, "Mcp-Method": "notifications/cancelled"})
    assert resp.status_code == 202 and resp.content == b""


def test_both_eras_on_one_endpoint(url):
    """Caret's handshake session keeps working between modern requests."""
    session = session_for(url)
    modern_result(modern_post(url, "tools/list"))
    assert rpc(url, "tools/list", {}, session=session)["result"]["tools"]
    assert "resultType" not in rpc(url, "tools/list", {}, session=session)["result"], "handshake-era results unchanged"
