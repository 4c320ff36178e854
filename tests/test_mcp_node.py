"""Caret's MCP client (@modelcontextprotocol/sdk 1.11.1, StreamableHTTPClientTransport) against a live server.

tests/node/caret_client.mjs connects, lists tools, calls the tool with and without an image
(plain base64 and a data: URL), gets an isError result for a bad image and a JSON-RPC error
for an unknown tool, reads an SSE answer with progress, pings and closes; it prints one JSON
summary that this test checks. `npm ci` runs first when tests/node/node_modules is missing
(CI: `npm ci --prefix tests/node --no-audit --no-fund`). Skips only when node or npm is absent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures import clean_env, image_bytes

NODE_DIR = Path(__file__).resolve().parent / "node"
SDK_VERSION = "1.11.1"
TOOL = "generate_hyperclovax_vision"


def _sdk_package() -> Path:
    return NODE_DIR / "node_modules" / "@modelcontextprotocol" / "sdk" / "package.json"


@pytest.fixture(scope="module")
def node_client() -> list[str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip(f"node/npm not installed (node={node}, npm={npm}); "
                    "install Node.js >= 18 to run the Caret client test")
    if not _sdk_package().is_file():
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True,
                              text=True, timeout=600, env=clean_env())
        assert proc.returncode == 0, f"npm ci failed in {NODE_DIR}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    installed = json.loads(_sdk_package().read_text())["version"]
    assert installed == SDK_VERSION, (f"tests/node has @modelcontextprotocol/sdk {installed}, Caret ships "
                                      f"{SDK_VERSION}: delete tests/node/node_modules and run npm ci")
    return [node, str(NODE_DIR / "caret_client.mjs")]


def run_client(node_client: list[str], mcp_url: str, *extra: str) -> dict:
    proc = subprocess.run([*node_client, mcp_url, *extra], cwd=NODE_DIR, capture_output=True, text=True,
                          timeout=300, env=clean_env())
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"no output (exit {proc.returncode}); stderr:\n{proc.stderr[-3000:]}"
    summary = json.loads(lines[-1])
    assert proc.returncode == 0 and "fatal" not in summary, (
        f"the Caret client failed (exit {proc.returncode}) after steps {summary.get('steps')}:\n"
        f"{summary.get('fatal')}\nstderr:\n{proc.stderr[-3000:]}")
    return summary


def test_caret_sdk_client_end_to_end(node_client, server_url, tmp_path):
    picture = tmp_path / "picture.png"
    picture.write_bytes(image_bytes("png"))
    s = run_client(node_client, server_url + "/mcp", str(picture))

    assert s["steps"] == ["connect", "tools/list", "tools/call text", "tools/call image", "tools/call bad image",
                          "tools/call unknown tool", "tools/call with progress", "ping", "close"], s["steps"]
    assert s["transportErrors"] == [], f"the transport reported errors (Caret logs them): {s['transportErrors']}"
    assert s["sdkLatestProtocolVersion"] == "2025-03-26"
    assert s["sessionId"], "the server must issue Mcp-Session-Id at initialize"
    assert s["serverVersion"]["name"] == "hcx-server"
    assert "tools" in s["serverCapabilities"]

    assert [t["name"] for t in s["tools"]] == [TOOL] and s["toolsViaListTools"] == [TOOL]
    schema = s["tools"][0]["inputSchema"]
    assert schema["type"] == "object" and schema["required"] == ["prompt"]
    assert "image_base64" in schema["properties"] and "image_path" not in schema["properties"]

    for key in ("textCall", "imageCall", "dataUrlImageCall", "progressCall"):
        call = s[key]
        assert call["isError"] is False, f"{key}: {call}"
        assert call["contentTypes"] == ["text"], f"{key}: {call}"
        assert isinstance(call["text"], str)

    bad = s["badImageCall"]
    assert bad["isError"] is True and bad["contentTypes"] == ["text"], bad
    assert "image" in bad["text"].lower(), bad

    assert s["unknownTool"]["threw"] is True, s["unknownTool"]
    assert s["unknownTool"]["code"] == -32602, s["unknownTool"]

    progress = [p["progress"] for p in s["progressCall"]["progress"]]
    assert len(progress) >= 2, s["progressCall"]
    assert all(b > a for a, b in zip(progress, progress[1:])), progress
    assert all(p["total"] == 8 for p in s["progressCall"]["progress"])


def test_caret_sdk_client_trailing_slash(node_client, server_url):
    """Users paste the URL with or without the slash."""
    s = run_client(node_client, server_url + "/mcp/")
    assert s["transportErrors"] == []
    assert s["steps"][-1] == "close"
    assert s["textCall"]["isError"] is False
