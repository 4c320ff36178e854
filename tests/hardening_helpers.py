"""Helpers for the hardening tests (issue 6): process inspection, /metrics parsing, error-shape
checks for the three APIs, a raw-socket client that can hang up mid-answer, and a tiny LLaVA
whose text model has a hard 64-position limit (a real failure inside generate()).

Server processes come from tests.fixtures.LiveServer; nothing here starts one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tests.fixtures import HOST

# Every test server shares two cores with other engineers' tests: one torch thread each.
BASE_ENV = {"TORCH_THREADS": 1, "HF_HUB_OFFLINE": 1}

SEED = "/tool/generate_hyperclovax_vision"
SEED_STREAM = "/tool/generate_hyperclovax_vision_stream"
CHAT = "/v1/chat/completions"
MCP = "/mcp"


# ----------------------------------------------------------------------------------------
# waiting
# ----------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.05,
               what: str = "condition") -> Any:
    """Poll `condition` until it returns something truthy (returned); AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout:.1f} s (last value: {last!r})")


# ----------------------------------------------------------------------------------------
# processes
# ----------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc/<pid>/task/*/children, else a /proc scan)."""
    found: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        for task in task_dir.iterdir():
            with contextlib.suppress(OSError):
                found += [int(x) for x in (task / "children").read_text().split()]
    except OSError:
        return []
    if found:
        return sorted(set(found))
    for entry in Path("/proc").iterdir():  # kernels without CONFIG_PROC_CHILDREN
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def worker_pid(master_pid: int, timeout: float = 30) -> int:
    """The one gunicorn worker: the live child of the master (`hcx-cli serve` is the master)."""

    def find():
        live = [p for p in children(master_pid) if alive(p)]
        return live[0] if len(live) == 1 else None

    return wait_until(find, timeout, what=f"exactly one live worker under gunicorn master {master_pid}")


def rss_kb(pid: int) -> int:
    """VmRSS of a process in kB."""
    return _status_kb(pid, "VmRSS")


def _status_kb(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE).group(1))


class PeakRss:
    """The worker's peak RSS growth over a block, from /proc: VmHWM (the high-water mark) is reset
    to the current RSS on entry (writing 5 to /proc/<pid>/clear_refs), read on exit.

    >>> with PeakRss(pid) as peak:
    ...     requests.post(...)
    >>> peak.growth_mb
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.before_kb = self.peak_kb = 0

    def __enter__(self) -> "PeakRss":
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        self.before_kb = rss_kb(self.pid)
        return self

    def __exit__(self, *exc) -> None:
        self.peak_kb = _status_kb(self.pid, "VmHWM")

    @property
    def growth_mb(self) -> float:
        return (self.peak_kb - self.before_kb) / 1024


# ----------------------------------------------------------------------------------------
# /metrics
# ----------------------------------------------------------------------------------------


def metrics(base: str, headers: Mapping[str, str] | None = None) -> dict[str, float]:
    """GET /metrics as {'name{labels}': value} (label text kept verbatim)."""
    import requests

    resp = requests.get(base + "/metrics", headers=headers, timeout=30)
    assert resp.status_code == 200, resp.text[:300]
    out: dict[str, float] = {}
    for line in resp.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def idle_metrics(base: str, headers: Mapping[str, str] | None = None) -> dict[str, float] | None:
    """The metrics when nothing is generating or queued, else None (for wait_until)."""
    m = metrics(base, headers)
    return m if m["hcx_generating"] == 0 and m["hcx_queue_depth"] == 0 else None


# ----------------------------------------------------------------------------------------
# error shapes
# ----------------------------------------------------------------------------------------


def _json(resp) -> Any:
    ctype = resp.headers.get("Content-Type", "")
    assert ctype.startswith("application/json"), f"not JSON ({ctype!r}): {resp.text[:300]}"
    return resp.json()


def check_seed_error(resp, status: int) -> dict:
    """Seed routes: {"error": str, "detail": str}."""
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text[:400]}"
    body = _json(resp)
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("detail"), str) and body["detail"], body
    assert "traceback" not in resp.text.lower(), body
    return body


def check_openai_error(resp, status: int, code: str | None = None) -> dict:
    """OpenAI routes: {"error": {"message", "type", "param", "code"}}."""
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text[:400]}"
    body = _json(resp)
    err = body.get("error") if isinstance(body, dict) else None
    assert isinstance(err, dict), body
    assert set(err) >= {"message", "type", "param", "code"}, body
    assert isinstance(err["message"], str) and err["message"], body
    assert isinstance(err["type"], str) and err["type"], body
    if code is not None:
        assert err["code"] == code, body
    assert "traceback" not in resp.text.lower(), body
    return err


def check_jsonrpc_error(resp, status: int, code: int | None = None) -> dict:
    """MCP transport/protocol errors: a JSON-RPC 2.0 error object."""
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text[:400]}"
    body = _json(resp)
    assert isinstance(body, dict) and body.get("jsonrpc") == "2.0", body
    err = body.get("error")
    assert isinstance(err, dict) and isinstance(err.get("code"), int) and isinstance(err.get("message"), str), body
    if code is not None:
        assert err["code"] == code, body
    return err


def check_tool_result(resp, is_error: bool) -> str:
    """MCP tools/call answered 200 with a result; its isError flag and text."""
    assert resp.status_code == 200, f"expected 200, got {resp.status_code}: {resp.text[:400]}"
    body = _json(resp)
    assert "result" in body, body
    result = body["result"]
    assert result.get("isError") is is_error, body
    content = result.get("content")
    assert isinstance(content, list) and content and content[0].get("type") == "text", body
    text = content[0]["text"]
    assert isinstance(text, str), body
    if is_error:
        assert text and "traceback" not in text.lower(), body
    return text


def tools_call(arguments: Any, msg_id: int = 1, name: str = "generate_hyperclovax_vision") -> dict:
    return {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": {"name": name, "arguments": arguments}}


# ----------------------------------------------------------------------------------------
# a raw HTTP client that can hang up mid-answer
# ----------------------------------------------------------------------------------------


class RawStream:
    """POST a JSON body over a plain socket, read the streamed answer, hang up when told."""

    def __init__(self, base: str, path: str, body: Any, headers: Mapping[str, str] | None = None,
                 timeout: float = 60):
        port = int(base.rsplit(":", 1)[1])
        payload = json.dumps(body).encode()
        head = [f"POST {path} HTTP/1.1", f"Host: {HOST}:{port}", "Content-Type: application/json",
                f"Content-Length: {len(payload)}", "Connection: close"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        self.received = b""

    def read_until(self, predicate: Callable[[bytes], bool], timeout: float) -> bytes:
        """Read until predicate(all bytes so far) holds; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        while not predicate(self.received):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"answer not as expected within {timeout} s: {self.received[:500]!r}")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"server closed the connection early: {self.received[:500]!r}")
            self.received += chunk
        return self.received

    def body_bytes(self) -> int:
        """Bytes after the header block (chunk framing included)."""
        _, sep, rest = self.received.partition(b"\r\n\r\n")
        return len(rest) if sep else 0

    def hang_up(self, reset: bool = True) -> None:
        """Close now; reset=True sends a TCP RST (SO_LINGER 0), as a killed client would."""
        if reset:
            import struct

            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


# ----------------------------------------------------------------------------------------
# a tiny LLaVA with a GPT-2 text model: learned absolute positions, only 64 of them
# ----------------------------------------------------------------------------------------


def build_short_gpt2_llava(folder: str | os.PathLike, n_positions: int = 64, seed: int = 0,
                           image_size: int = 56) -> Path:
    """server.build_demo_model (same tokenizer, processor and chat template) with a GPT-2 text
    model of `n_positions` learned positions: position n_positions and beyond is a real
    IndexError inside generate(), which MAX_MODEL_LEN can push past validation."""
    import server

    return server.build_demo_model(folder, seed=seed, image_size=image_size, max_position_embeddings=n_positions,
                                   text_model="gpt2")
