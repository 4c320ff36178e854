"""MCP end to end with the official Python client (`mcp` 2.3): Streamable HTTP and stdio.

As a pytest file (part of the suite) it runs against a fresh `hcx-cli serve` (gunicorn) on the
tiny demo model, and `hcx-cli mcp` over stdio. As a script it checks a server you started:

    python test_call_mcp.py --url http://127.0.0.1:8000/mcp [extra pytest args, e.g. -k http -x]

(--url sets HCX_TEST_URL to the server's base URL; the stdio tests still start their own
`hcx-cli mcp` on the demo model.)

What the client does (see /work/shared/client-facts.md), in its three modes:
- "auto" (the default): `server/discover` at 2026-07-28 first; the server answers it, so the
  client stays in the modern era (no session, version and capabilities on every request);
- "legacy": `initialize` (asks 2025-11-25), GET /mcp (405, harmless), requests with the session
  id, DELETE at close;
- "2026-07-28": pinned to the modern era, no probe at all.
Answers are random on the demo model, so only structure is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # `python test_call_mcp.py` from anywhere
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from tests.fixtures import (  # noqa: E402,F401  (fixtures are found by name)
    REQUEST_TIMEOUT,
    b64,
    clean_env,
    demo_model_dir,
    hcx_cli,
    image_bytes,
    server_url,
)

anyio = pytest.importorskip("anyio")
mcp = pytest.importorskip("mcp")
from mcp import Client, MCPError, StdioServerParameters  # noqa: E402

TOOL = "generate_hyperclovax_vision"
SUPPORTED_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
MODERN = "2026-07-28"
NEGOTIATED = {"auto": MODERN, "legacy": "2025-11-25", MODERN: MODERN}  # Client(mode=...) -> protocol version
TIMEOUT = min(REQUEST_TIMEOUT, 180.0)  # per test; generation here is at most a few dozen tokens


def run(fn, *args):
    """Run an async test body with an overall deadline (a hung server fails, it does not hang)."""

    async def bounded():
        with anyio.fail_after(TIMEOUT):
            return await fn(*args)

    return anyio.run(bounded)


class Progress:
    """A progress_callback that records (progress, total, message)."""

    def __init__(self):
        self.events: list[tuple[float, float | None, str | None]] = []

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        self.events.append((progress, total, message))

    def check(self, max_tokens: int, at_least: int = 2) -> None:
        values = [p for p, _, _ in self.events]
        assert len(values) >= at_least, f"expected >= {at_least} progress notifications, got {self.events}"
        assert all(b > a for a, b in zip(values, values[1:])), f"progress must increase: {values}"
        assert 0 < values[0] and values[-1] <= max_tokens, values
        assert all(t == max_tokens for _, t, _ in self.events), f"total should be max_tokens: {self.events}"


def text_of(result) -> str:
    assert result.content, result
    assert result.content[0].type == "text", result.content
    assert isinstance(result.content[0].text, str)
    return result.content[0].text


def assert_ok(result) -> str:
    assert result.is_error is False, f"tool failed: {result.content}"
    assert len(result.content) == 1, result.content
    return text_of(result)


def assert_tool_error(result, *words: str) -> str:
    assert result.is_error is True, f"expected an error result, got {result}"
    text = text_of(result)
    for word in words:
        assert word.lower() in text.lower(), f"{word!r} not in error text {text!r}"
    assert "traceback" not in text.lower(), text
    return text


def check_tool_schema(tools, stdio: bool) -> dict:
    by_name = {t.name: t for t in tools}
    assert TOOL in by_name, f"{TOOL} not listed: {list(by_name)}"
    tool = by_name[TOOL]
    schema = tool.input_schema
    assert schema["type"] == "object"
    assert schema["required"] == ["prompt"]
    props = schema["properties"]
    assert props["prompt"]["type"] == "string"
    assert props["image_base64"]["type"] == "string"
    assert props["max_tokens"]["type"] == "integer"
    assert ("image_path" in props) is stdio, f"image_path must be offered over stdio only: {sorted(props)}"
    assert tool.description
    return schema


# ----------------------------------------------------------------------------------------
# Streamable HTTP (gunicorn)
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mcp_url(server_url) -> str:
    return server_url + "/mcp"


@pytest.fixture(scope="module")
def png_b64() -> str:
    return b64(image_bytes("png"))


@pytest.mark.parametrize("mode", list(NEGOTIATED))
def test_http_initialize_and_list_tools(mcp_url, mode):
    async def body():
        async with Client(mcp_url, mode=mode) as c:
            if mode == "legacy":
                assert c.protocol_version in SUPPORTED_VERSIONS, c.protocol_version
                assert c.protocol_version == "2025-11-25", "the client asks 2025-11-25; the server must answer it back"
            else:
                assert c.protocol_version == MODERN, "the server offers 2026-07-28 through server/discover"
            if mode != MODERN:  # a pinned client probes nothing: it knows only what each answer says
                assert c.server_info is not None and c.server_info.name == "hcx-server"
                assert c.server_capabilities.tools is not None
                assert c.instructions and TOOL in c.instructions
            listed = await c.list_tools()
            check_tool_schema(listed.tools, stdio=False)

    run(body)


def test_http_text_call_with_progress(mcp_url):
    progress = Progress()

    async def body():
        async with Client(mcp_url) as c:
            result = await c.call_tool(TOOL, {"prompt": "Say hello.", "max_tokens": 8, "min_tokens": 8, "seed": 1},
                                       progress_callback=progress)
            assert_ok(result)

    run(body)
    progress.check(max_tokens=8)


@pytest.mark.parametrize("mode", list(NEGOTIATED))
@pytest.mark.parametrize("data_url", [False, True], ids=["plain_base64", "data_url"])
def test_http_image_call(mcp_url, png_b64, data_url, mode):
    image = f"data:image/png;base64,{png_b64}" if data_url else png_b64
    progress = Progress()

    async def body():
        async with Client(mcp_url, mode=mode) as c:
            assert c.protocol_version == NEGOTIATED[mode]
            result = await c.call_tool(TOOL, {"prompt": "Describe this image.", "image_base64": image,
                                              "max_tokens": 8, "min_tokens": 8, "seed": 1}, progress_callback=progress)
            assert_ok(result)

    run(body)
    progress.check(max_tokens=8)


def test_http_several_calls_in_one_session(mcp_url, png_b64):
    async def body():
        async with Client(mcp_url) as c:
            for args in ({"prompt": "One.", "max_tokens": 2}, {"prompt": "Two.", "image_base64": png_b64,
                                                                  "max_tokens": 2}):
                assert_ok(await c.call_tool(TOOL, args))
            assert (await c.list_tools()).tools

    run(body)


@pytest.mark.parametrize("image, words", [
    ("not base64 at all!", ["invalid input", "image_base64", "base64"]),
    (b64(b"plain text, not an image"), ["invalid input", "image_base64", "not a readable image"]),
    ("data:text/plain;base64,aGVsbG8=", ["invalid input", "not an image"]),
], ids=["not_base64", "not_an_image", "wrong_media_type"])
def test_http_bad_image_is_error_result(mcp_url, image, words):
    async def body():
        async with Client(mcp_url) as c:
            assert_tool_error(await c.call_tool(TOOL, {"prompt": "Describe.", "image_base64": image}), *words)

    run(body)


def test_http_bad_arguments_are_error_results(mcp_url, tmp_path):
    picture = tmp_path / "p.png"
    picture.write_bytes(image_bytes("png"))

    async def body():
        async with Client(mcp_url) as c:
            assert_tool_error(await c.call_tool(TOOL, {}), "prompt", "required")
            assert_tool_error(await c.call_tool(TOOL, {"prompt": "   "}), "prompt", "empty")
            assert_tool_error(await c.call_tool(TOOL, {"prompt": "x", "max_tokens": 0}), "max_tokens")
            assert_tool_error(await c.call_tool(TOOL, {"prompt": "x", "temperature": "hot"}), "temperature")
            # the server never reads files for HTTP clients
            assert_tool_error(await c.call_tool(TOOL, {"prompt": "x", "image_path": str(picture)}),
                              "image_path", "stdio")

    run(body)


@pytest.mark.parametrize("mode", list(NEGOTIATED))
def test_http_unknown_tool_raises_invalid_params(mcp_url, mode):
    async def body():
        async with Client(mcp_url, mode=mode) as c:
            with pytest.raises(MCPError) as info:
                await c.call_tool("no_such_tool", {"prompt": "x"})
            assert info.value.code == -32602, info.value
            assert "no_such_tool" in info.value.message and TOOL in info.value.message
            # the session is still usable afterwards
            assert_ok(await c.call_tool(TOOL, {"prompt": "Hi.", "max_tokens": 1}))

    run(body)


def test_http_trailing_slash_url(mcp_url):
    """The client does not follow redirects: /mcp/ must be served as is."""

    async def body():
        async with Client(mcp_url + "/") as c:
            check_tool_schema((await c.list_tools()).tools, stdio=False)
            assert_ok(await c.call_tool(TOOL, {"prompt": "Hi.", "max_tokens": 2}))

    run(body)


# ----------------------------------------------------------------------------------------
# stdio (hcx-cli mcp)
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stdio_params(demo_model_dir) -> StdioServerParameters:
    cli = hcx_cli()
    command, prefix = (cli[0], []) if len(cli) == 1 else (cli[0], cli[1:])
    return StdioServerParameters(command=command, args=[*prefix, "--model-path", str(demo_model_dir), "mcp"],
                                 env=clean_env(), cwd=str(demo_model_dir.parent))


@pytest.mark.parametrize("mode", list(NEGOTIATED))
def test_stdio_protocol_tools_text_and_errors(stdio_params, mode):
    progress = Progress()

    async def body():
        async with Client(stdio_params, mode=mode) as c:
            if mode == "legacy":
                assert c.protocol_version == "2025-11-25", c.protocol_version
            else:
                assert c.protocol_version == MODERN, c.protocol_version
            if mode != MODERN:
                assert c.server_info is not None and c.server_info.name == "hcx-server"
            check_tool_schema((await c.list_tools()).tools, stdio=True)
            assert_ok(await c.call_tool(TOOL, {"prompt": "Say hello.", "max_tokens": 8, "min_tokens": 8, "seed": 1},
                                        progress_callback=progress))
            assert_tool_error(await c.call_tool(TOOL, {"prompt": "x", "image_base64": "%%%"}),
                              "invalid input", "image_base64")
            assert_tool_error(await c.call_tool(TOOL, {"prompt": "x", "image_path": "/nonexistent/hcx-test.png"}),
                              "image_path", "cannot read")
            with pytest.raises(MCPError) as info:
                await c.call_tool("no_such_tool", {})
            assert info.value.code == -32602
            assert (await c.list_tools()).tools

    run(body)
    progress.check(max_tokens=8)


def test_stdio_images(stdio_params, tmp_path):
    raw = image_bytes("png")
    picture = tmp_path / "picture.png"
    picture.write_bytes(raw)
    not_image = tmp_path / "notes.txt"
    not_image.write_text("not an image")
    progress = Progress()

    async def body():
        async with Client(stdio_params) as c:
            assert_ok(await c.call_tool(TOOL, {"prompt": "Describe.", "image_path": str(picture), "max_tokens": 8,
                                               "min_tokens": 8, "seed": 1}, progress_callback=progress))
            assert_ok(await c.call_tool(TOOL, {"prompt": "Describe.", "image_base64": b64(raw), "max_tokens": 2}))
            assert_ok(await c.call_tool(TOOL, {"prompt": "Describe.", "image_base64": b64(raw, data_url=True),
                                               "max_tokens": 2}))
            assert_tool_error(await c.call_tool(TOOL, {"prompt": "Describe.", "image_path": str(not_image)}),
                              "image_path", "not a readable image")

    run(body)
    progress.check(max_tokens=8)


class RawStdio:
    """`hcx-cli mcp` driven line by line, for what the client cannot show; killed if it hangs."""

    def __init__(self, params: StdioServerParameters):
        self.proc = subprocess.Popen([params.command, *params.args], env=params.env, cwd=params.cwd,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.timer = threading.Timer(TIMEOUT, self.proc.kill)  # a hung server fails the test instead of hanging it
        self.timer.start()

    def send(self, message) -> None:
        self.proc.stdin.write((message if isinstance(message, str) else json.dumps(message)).encode() + b"\n")
        self.proc.stdin.flush()

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, "hcx-cli mcp closed stdout"
        return json.loads(line)

    def close(self) -> None:
        self.timer.cancel()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_stdio_raw_lines_parse_error_and_cancel(stdio_params):
    """What the client cannot show: a bad line gets -32700 and the server goes on; a
    notifications/cancelled for an in-flight call stops it (-32800) and the next call works."""
    raw = RawStdio(stdio_params)
    send, receive, proc = raw.send, raw.receive, raw.proc
    try:
        send({"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "raw", "version": "0"}}})
        assert receive()["result"]["protocolVersion"] == "2025-06-18"
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        send("{not json")
        error = receive()
        assert error["id"] is None and error["error"]["code"] == -32700, error
        send({"jsonrpc": "2.0", "id": 2, "method": "ping"})
        assert receive() == {"jsonrpc": "2.0", "id": 2, "result": {}}

        send({"jsonrpc": "2.0", "id": "long", "method": "tools/call",
              "params": {"name": TOOL, "arguments": {"prompt": "x", "max_tokens": 1000, "min_tokens": 1000},
                         "_meta": {"progressToken": "t"}}})
        first = receive()
        assert first["method"] == "notifications/progress", first
        send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "long"}})
        last_progress = first["params"]["progress"]
        while True:
            message = receive()
            if "id" in message:
                break
            last_progress = message["params"]["progress"]
        assert message["id"] == "long" and message["error"]["code"] == -32800, message
        assert last_progress < 500, f"generation went on after the cancel ({last_progress} tokens)"

        send({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
              "params": {"name": TOOL, "arguments": {"prompt": "x", "max_tokens": 2}}})
        answer = receive()
        assert answer["id"] == 3 and answer["result"]["isError"] is False, answer
        proc.stdin.close()
        assert proc.wait(30) == 0
    finally:
        raw.close()


def modern_meta(version: str = MODERN, **extra) -> dict:
    return {"io.modelcontextprotocol/protocolVersion": version, "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"}, **extra}


def test_stdio_raw_modern_era(stdio_params):
    """2026-07-28 over stdio: no handshake, _meta on every request, server/discover, per-request
    errors (-32602 missing capabilities, -32022 an unknown version with the supported ones), and
    the handshake era still served by the same process."""
    raw = RawStdio(stdio_params)
    send, receive = raw.send, raw.receive
    try:
        send({"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": modern_meta()}})
        discovered = receive()["result"]
        assert MODERN in discovered["supportedVersions"] and set(SUPPORTED_VERSIONS) <= set(discovered["supportedVersions"])
        assert discovered["resultType"] == "complete" and discovered["capabilities"]["tools"] is not None
        assert discovered["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "hcx-server"
        assert discovered["ttlMs"] >= 0 and discovered["cacheScope"] in ("public", "private")

        send({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
              "params": {"name": TOOL, "arguments": {"prompt": "x", "max_tokens": 4, "min_tokens": 4},
                         "_meta": modern_meta(progressToken="p")}})
        messages = [receive()]
        while "id" not in messages[-1]:
            messages.append(receive())
        assert [m["method"] for m in messages[:-1]] == ["notifications/progress"] * (len(messages) - 1)
        result = messages[-1]["result"]
        assert result["isError"] is False and result["resultType"] == "complete", result

        send({"jsonrpc": "2.0", "id": 3, "method": "tools/list",
              "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": MODERN}}})
        error = receive()["error"]
        assert error["code"] == -32602 and "clientCapabilities" in error["message"], error
        send({"jsonrpc": "2.0", "id": 4, "method": "tools/list", "params": {"_meta": modern_meta("2099-01-01")}})
        error = receive()["error"]
        assert error["code"] == -32022 and error["data"]["requested"] == "2099-01-01", error
        assert MODERN in error["data"]["supported"]
        send({"jsonrpc": "2.0", "id": 5, "method": "ping", "params": {"_meta": modern_meta()}})
        assert receive()["error"]["code"] == -32601, "ping is not part of 2026-07-28"

        send({"jsonrpc": "2.0", "id": 6, "method": "server/discover", "params": {}})
        assert receive()["error"]["code"] == -32601, "without _meta a request belongs to the handshake era"
        send({"jsonrpc": "2.0", "id": 7, "method": "initialize",
              "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "r", "version": "0"}}})
        assert receive()["result"]["protocolVersion"] == "2025-11-25"
    finally:
        raw.close()


# ----------------------------------------------------------------------------------------
# script mode
# ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check an hcx-server MCP endpoint with the official Python client.")
    parser.add_argument("--url", help="the MCP endpoint, e.g. http://127.0.0.1:8000/mcp (default: start a "
                                      "local test server on the demo model)")
    args, pytest_args = parser.parse_known_args(argv)
    if args.url:
        base = args.url.strip().rstrip("/")
        if base.endswith("/mcp"):
            base = base[: -len("/mcp")]
        os.environ["HCX_TEST_URL"] = base
    # anyio is imported above, before pytest registers its plugin: that rewrite warning is noise
    return int(pytest.main([str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider",
                            "-W", "ignore::pytest.PytestAssertRewriteWarning", *pytest_args]))


if __name__ == "__main__":
    sys.exit(main())
