"""MCP clients from npm against a live server: Caret's SDK, a current SDK, the MCP Inspector CLI.

tests/node/caret_client.mjs (Caret's @modelcontextprotocol/sdk 1.11.1, StreamableHTTPClientTransport)
connects, lists tools, calls the tool with and without an image (plain base64 and a data: URL),
gets an isError result for a bad image and a JSON-RPC error for an unknown tool, reads an SSE answer
with progress, pings and closes; it prints one JSON summary that this test checks. The same script
runs a current SDK (1.32, the npm alias `mcp-sdk-current`). The Inspector CLI 2.12 is run as users
run it, in its three protocol eras (legacy, auto, modern), over HTTP and stdio. `npm ci` runs first
when a package is missing from tests/node/node_modules (CI: `npm ci --prefix tests/node`). Skips only
when node or npm is absent.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.fixtures import NODE_DIR, b64, clean_env, hcx_cli, image_bytes, node_packages_ready, run_node

SDK_VERSION = "1.11.1"
CURRENT_SDK = "mcp-sdk-current"
TOOL = "generate_hyperclovax_vision"


def _sdk_package(name: str = "@modelcontextprotocol/sdk") -> Path:
    return NODE_DIR / "node_modules" / name / "package.json"


@pytest.fixture(scope="module")
def node_client() -> list[str]:
    node = node_packages_ready()
    installed = json.loads(_sdk_package().read_text())["version"]
    assert installed == SDK_VERSION, (f"tests/node has @modelcontextprotocol/sdk {installed}, Caret ships "
                                      f"{SDK_VERSION}: delete tests/node/node_modules and run npm ci")
    return [node, str(NODE_DIR / "caret_client.mjs")]


def run_client(node_client: list[str], mcp_url: str, *extra: str, sdk: str | None = None) -> dict:
    return run_node([*node_client, mcp_url, *extra], env={"MCP_SDK": sdk} if sdk else None)


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


# ----------------------------------------------------------------------------------------
# a current @modelcontextprotocol/sdk (1.32), the same client path
# ----------------------------------------------------------------------------------------


def test_current_sdk_client_end_to_end(node_client, server_url, tmp_path):
    version = json.loads(_sdk_package(CURRENT_SDK).read_text())["version"]
    assert version.startswith("1.") and tuple(int(x) for x in version.split(".")[:2]) >= (1, 32), version
    picture = tmp_path / "picture.png"
    picture.write_bytes(image_bytes("png"))
    s = run_client(node_client, server_url + "/mcp", str(picture), sdk=CURRENT_SDK)
    assert s["steps"][-1] == "close" and s["transportErrors"] == [], s
    assert s["sdkLatestProtocolVersion"] >= "2025-11-25" and s["sessionId"]
    for key in ("textCall", "imageCall", "dataUrlImageCall", "progressCall"):
        assert s[key]["isError"] is False and s[key]["contentTypes"] == ["text"], (key, s[key])
    assert s["badImageCall"]["isError"] is True
    assert s["unknownTool"]["threw"] is True and s["unknownTool"]["code"] == -32602
    progress = [p["progress"] for p in s["progressCall"]["progress"]]
    assert len(progress) >= 2 and all(b > a for a, b in zip(progress, progress[1:])), progress


# ----------------------------------------------------------------------------------------
# the MCP Inspector CLI (2.12): --protocol-era legacy / auto / modern, HTTP and stdio
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inspector(node_client) -> list[str]:
    """`npx @modelcontextprotocol/inspector --cli`, from the locked tests/node."""
    launcher = NODE_DIR / "node_modules" / "@modelcontextprotocol" / "inspector" / "clients" / "launcher" / "build"
    return [node_client[0], str(launcher / "index.js"), "--cli"]


def run_inspector(inspector: list[str], era: str, args: list[str], target: list[str], home: Path) -> dict:
    """One Inspector CLI call; it prints the JSON-RPC result on stdout (its catalog lives in `home`)."""
    proc = subprocess.run([*inspector, "--protocol-era", era, *args, *target], cwd=NODE_DIR, capture_output=True,
                          text=True, timeout=300, env=clean_env({"HOME": home, "MCP_CATALOG_PATH": home / "mcp.json"}))
    assert proc.returncode == 0, f"inspector {era} {args} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def stdio_target(demo_model_dir) -> list[str]:
    """`-e` passes the server its environment (the Inspector gives a stdio server only a minimal
    one: without PYTHONPATH a worktree would test the installed code), then the command."""
    env = clean_env()
    keep = [f"{k}={env[k]}" for k in ("PYTHONPATH", "HF_HUB_OFFLINE", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM")
            if k in env]
    return [*(arg for pair in keep for arg in ("-e", pair)), "--", *hcx_cli(), "--model-path", str(demo_model_dir),
            "mcp"]


CALL = ["--method", "tools/call", "--tool-name", TOOL, "--tool-arg", "prompt=Describe.",
        f"image_base64={b64(image_bytes('png'))}", "max_tokens=3"]


def check_call(result: dict, era: str) -> None:
    assert result["isError"] is False and result["content"][0]["type"] == "text", result
    modern = "_meta" in result and "io.modelcontextprotocol/serverInfo" in result["_meta"]
    assert modern is (era != "legacy"), f"era {era}: {result}"  # auto finds 2026-07-28 through server/discover


@pytest.mark.parametrize("era", ["legacy", "auto", "modern"])
def test_inspector_cli_http(inspector, server_url, tmp_path, era):
    target = ["--server-url", server_url + "/mcp"]
    listed = run_inspector(inspector, era, ["--method", "tools/list"], target, tmp_path)
    assert [t["name"] for t in listed["tools"]] == [TOOL]
    assert "image_path" not in listed["tools"][0]["inputSchema"]["properties"]
    check_call(run_inspector(inspector, era, CALL, target, tmp_path), era)


@pytest.mark.parametrize("era", ["auto", "modern"])
def test_inspector_cli_stdio(inspector, stdio_target, tmp_path, era):
    """Each call starts `hcx-cli mcp` (seconds): one call per era; the handshake era over stdio is
    the Python client's legacy mode (test_call_mcp.py)."""
    check_call(run_inspector(inspector, era, CALL, stdio_target, tmp_path), era)
