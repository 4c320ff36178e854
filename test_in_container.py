"""The Docker image, end to end: build it, run it with build_and_run_linux.sh, call it from the host.

    python test_in_container.py      # as a script (as root it starts a Docker engine if none runs)
    pytest test_in_container.py -v   # as part of the suite (needs an engine: tests/docker_engine.sh start)

The image is built from the repository's Dockerfile with a local base image (Debian bookworm
with Python 3.11, made by tests/docker_engine.sh) and the CPU torch wheel, without the remote
code dependencies (timm/einops/torchvision). A tiny random-weight model is built inside the
image into the mounted model folder (server.build_demo_model), the script runs the container
with DOCKER_NETWORK=host (the workplace's engine has no bridge network), waits for /health,
and the tests call the seed route, /health, MCP and the OpenAI route from the host, check the
container runs as non-root, survives bad requests, and listens on 127.0.0.1 only.

Skips (with the reason) only when no Docker engine can run here. Every wait is bounded.

Environment knobs: HCX_TEST_BASE_IMAGE, HCX_TEST_IMAGE, HCX_TEST_TORCH_WHEEL (CPU wheel file),
HCX_TEST_TORCH_REQUIREMENT / HCX_TEST_PIP_EXTRA_ARGS (when there is no wheel file),
HCX_TEST_KEEP=1 (keep the container and temp folder for debugging).
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent
SCRIPT = REPO / "build_and_run_linux.sh"
ENGINE_SCRIPT = REPO / "tests" / "docker_engine.sh"
BUILD_DIR = REPO / ".docker-build"  # git-ignored; copied into the dependency stage only
LOCAL_BASE = "hcx-test/python:3.11-bookworm"  # what tests/docker_engine.sh builds
BASE_IMAGE = os.environ.get("HCX_TEST_BASE_IMAGE", "")
IMAGE = os.environ.get("HCX_TEST_IMAGE", "hcx-server:container-test")
TORCH_WHEEL = Path(os.environ.get("HCX_TEST_TORCH_WHEEL",
                                  "/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"))
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
APP_UID = 1000  # the image's user (Dockerfile APP_UID)
TOOL = "generate_hyperclovax_vision"
KEEP = os.environ.get("HCX_TEST_KEEP") == "1"
API_KEY = "ct key#1"  # quoted in the .env: checks the script's parsing and passing of settings
AUTH = {"Authorization": f"Bearer {API_KEY}"}

BUILD_TIMEOUT = 600  # cold: ~1-2 min here (torch wheel from disk, the rest from PyPI)
MODEL_TIMEOUT = 180
READY_TIMEOUT = 240  # the tiny model loads in seconds
HTTP_TIMEOUT = 60

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + MODEL_TIMEOUT + READY_TIMEOUT + 300)


# -- helpers -------------------------------------------------------------------------------

def sh(args: list[str], timeout: float, check: bool = True, env: dict | None = None,
       input: str | None = None) -> subprocess.CompletedProcess:
    """Run a command, bounded; on failure raise with its output."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, input=input)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"")[-4000:] if isinstance(exc.stdout, bytes) else (exc.stdout or "")[-4000:]
        raise AssertionError(f"timed out after {timeout}s: {' '.join(args)}\n{out}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(args)}\n--- stdout ---\n{proc.stdout[-6000:]}"
                             f"\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def engine_problem() -> str | None:
    """None if a Docker engine answers, else why not."""
    if shutil.which("docker") is None:
        return "no docker client installed"
    try:
        proc = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "'docker info' did not answer within 30 s"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"no Docker engine answers ({last}); as root: bash tests/docker_engine.sh start"
    return None


def image_exists(name: str) -> bool:
    return sh(["docker", "image", "inspect", name], 30, check=False).returncode == 0


def choose_base_image() -> str:
    if BASE_IMAGE:
        return BASE_IMAGE
    if not image_exists(LOCAL_BASE) and os.geteuid() == 0:
        sh(["bash", str(ENGINE_SCRIPT), "base"], 600, check=False)
    if image_exists(LOCAL_BASE):
        return LOCAL_BASE
    return "python:3.11-slim-bookworm"  # pulled: for machines that reach Docker Hub


def place(src: Path, dest: Path) -> None:
    """Put src at dest (hard link when possible), leaving an identical file alone (build cache)."""
    if dest.exists() and dest.stat().st_size == src.stat().st_size and dest.read_bytes() == src.read_bytes():
        return
    dest.unlink(missing_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def build_args() -> list[str]:
    """CPU torch (the local wheel when there is one), no remote-code deps, the host's CA bundle."""
    BUILD_DIR.mkdir(exist_ok=True)
    pip_extra = os.environ.get("HCX_TEST_PIP_EXTRA_ARGS", "")
    if TORCH_WHEEL.is_file():
        place(TORCH_WHEEL, BUILD_DIR / TORCH_WHEEL.name)
        torch_req = f"/build/{TORCH_WHEEL.name}"
    else:
        torch_req = os.environ.get("HCX_TEST_TORCH_REQUIREMENT", "torch==2.13.0")
    if HOST_CA.is_file():  # machines whose HTTPS goes through a local CA
        place(HOST_CA, BUILD_DIR / "host-ca.crt")
        pip_extra = f"--cert /build/host-ca.crt {pip_extra}".strip()
    args = ["--build-arg", f"TORCH_REQUIREMENT={torch_req}", "--build-arg", "INSTALL_REMOTE_CODE_DEPS=0"]
    if pip_extra:
        args += ["--build-arg", f"PIP_EXTRA_ARGS={pip_extra}"]
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_base64(size: int = 64) -> str:
    """A small red-and-white PNG, made with the standard library only."""
    rows = b"".join(b"\x00" + b"".join(b"\xff\x00\x00" if (x // 8 + y // 8) % 2 else b"\xff\xff\xff"
                                       for x in range(size)) for y in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


def http(method: str, url: str, body=None, headers: dict | None = None, raw: bytes | None = None,
         auth: bool = True):
    """(status, headers, parsed JSON or text) -- 4xx/5xx are answers, not exceptions."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **(AUTH if auth else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as resp:
            status, hdrs, text = resp.status, resp.headers, resp.read().decode()
    except urllib.error.HTTPError as exc:
        status, hdrs, text = exc.code, exc.headers, exc.read().decode()
    ctype = hdrs.get("Content-Type", "")
    if "application/json" in ctype:
        return status, hdrs, json.loads(text)
    if "text/event-stream" in ctype:  # MCP may answer as SSE: the last message is the reply
        events = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]
        return status, hdrs, events[-1] if events else None
    return status, hdrs, text


# -- the container -------------------------------------------------------------------------

class Running:
    def __init__(self, name: str, port: int, tmp: Path, script_output: str, timings: dict):
        self.name, self.port, self.tmp, self.script_output, self.timings = name, port, tmp, script_output, timings
        self.url = f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def container():
    problem = engine_problem()
    if problem:
        pytest.skip(f"container test needs a Docker engine: {problem}")
    timings: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="hcx-container-test-"))
    tmp.chmod(0o755)
    name = f"hcx-test-{secrets.token_hex(4)}"
    port = free_port()
    models = tmp / "models"
    models.mkdir()
    # The container's user must be able to write the model folder: the image's user (uid
    # APP_UID) when we are root, else the caller (--user), as build_and_run_linux.sh does it.
    user = [] if os.geteuid() == 0 else ["--user", f"{os.geteuid()}:{os.getegid()}"]
    if os.geteuid() == 0:
        os.chown(models, APP_UID, APP_UID)
    # .env as a user would write it: host paths relative to the .env, quotes, a comment.
    (tmp / ".env").write_text(
        "# hcx-server container test\n"
        "MODEL_PATH=./models/tiny-llava\n"
        'HOST_MODEL_DIR="./models"   # mounted at /models\n'
        f"PORT={port}\n"
        "DEVICE=cpu\n"
        "DTYPE=float32\n"
        "MAX_NEW_TOKENS=8\n"
        f'API_KEY="{API_KEY}"\n'
        "HF_HUB_OFFLINE=1\n")
    env = {**os.environ, "DOCKER_NETWORK": "host"}
    common = ["--env-file", str(tmp / ".env"), "--image", IMAGE, "--name", name]
    try:
        started = time.monotonic()
        build = sh(["bash", str(SCRIPT), *common, "--build-only", "--base-image", choose_base_image(),
                    *build_args()], BUILD_TIMEOUT, env=env)
        timings["build_s"] = time.monotonic() - started

        started = time.monotonic()
        sh(["docker", "run", "--rm", "--network", "none", *user, "-v", f"{models}:/models", IMAGE,
            "python", "-c", "import sys, server; server.build_demo_model(sys.argv[1])", "/models/tiny-llava"],
           MODEL_TIMEOUT)
        timings["tiny_model_s"] = time.monotonic() - started

        started = time.monotonic()
        run = sh(["bash", str(SCRIPT), *common, "--no-build", "--cpu", "--wait-timeout", str(READY_TIMEOUT)],
                 READY_TIMEOUT + 60, env=env)
        timings["start_to_ready_s"] = time.monotonic() - started
        yield Running(name, port, tmp, build.stdout + run.stdout, timings)
    finally:
        logs = sh(["docker", "logs", "--tail", "30", name], 30, check=False)
        print(f"\n--- docker logs --tail 30 {name} ---\n{logs.stdout}{logs.stderr}")
        print(f"timings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
        if KEEP:
            print(f"HCX_TEST_KEEP=1: kept container {name} and {tmp}")
        else:
            sh(["docker", "rm", "-f", name], 60, check=False)
            shutil.rmtree(tmp, ignore_errors=True)


# -- tests -----------------------------------------------------------------------------------

def test_script_prints_urls_and_caret_config(container):
    out = container.script_output
    assert f"http://localhost:{container.port}/health" in out
    assert f"http://localhost:{container.port}/v1" in out
    line = next(line for line in out.splitlines() if line.startswith('{"mcpServers"'))
    assert json.loads(line) == {"mcpServers": {"hyperclovax": {
        "type": "streamableHttp", "url": f"http://localhost:{container.port}/mcp", "timeout": 300}}}


def test_health(container):
    status, _, body = http("GET", f"{container.url}/health")
    assert status == 200, body
    assert body["status"] == "ok"
    assert body["device"] == "cpu"


def test_image_healthcheck_passes(container):
    """The image's own HEALTHCHECK command succeeds inside the running container."""
    test = json.loads(sh(["docker", "inspect", "-f", "{{json .Config.Healthcheck.Test}}", container.name], 30).stdout)
    assert test[0] == "CMD"
    sh(["docker", "exec", container.name, *test[1:]], 30)


def test_api_key_from_env_file_is_enforced(container):
    status, _, body = http("POST", f"{container.url}/tool/{TOOL}", {"prompt": "hi"}, auth=False)
    assert status == 401, body
    status, _, body = http("GET", f"{container.url}/health", auth=False)  # health needs no key
    assert status == 200, body


def test_seed_route(container):
    status, _, body = http("POST", f"{container.url}/tool/{TOOL}",
                           {"prompt": "What is in this image?", "image_base64": png_base64()})
    assert status == 200, body
    assert isinstance(body["result"], str)


def test_seed_route_data_url_prefix(container):
    status, _, body = http("POST", f"{container.url}/tool/{TOOL}",
                           {"prompt": "Describe.", "image_base64": "data:image/png;base64," + png_base64()})
    assert status == 200, body
    assert isinstance(body["result"], str)


def test_mcp(container):
    url = f"{container.url}/mcp"
    accept = {"Accept": "application/json, text/event-stream"}
    status, hdrs, init = http("POST", url, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-03-26", "capabilities": {},
        "clientInfo": {"name": "container-test", "version": "0"}}}, accept)
    assert status == 200, init
    assert "protocolVersion" in init["result"]
    session = {"Mcp-Session-Id": hdrs["Mcp-Session-Id"]} if hdrs.get("Mcp-Session-Id") else {}
    status, _, _ = http("POST", url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, {**accept, **session})
    assert status in (200, 202)
    status, _, listed = http("POST", url, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, {**accept, **session})
    assert status == 200, listed
    assert TOOL in [t["name"] for t in listed["result"]["tools"]]
    status, _, called = http("POST", url, {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
        "name": TOOL, "arguments": {"prompt": "What is in this image?", "image_base64": png_base64()}}},
        {**accept, **session})
    assert status == 200, called
    result = called["result"]
    assert not result.get("isError"), result
    assert result["content"][0]["type"] == "text"
    assert isinstance(result["content"][0]["text"], str)


def test_openai_routes(container):
    status, _, models = http("GET", f"{container.url}/v1/models")
    assert status == 200, models
    model_id = models["data"][0]["id"]
    status, _, chat = http("POST", f"{container.url}/v1/chat/completions", {
        "model": model_id, "max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_base64()}}]}]})
    assert status == 200, chat
    assert chat["object"] == "chat.completion"
    assert isinstance(chat["choices"][0]["message"]["content"], str)


def test_playground_page(container):
    """The image carries static/ (installed as hcx_server_static): the page and its assets load
    without the API key, with their CSP."""
    for path, ctype, marker in (("/", "text/html", "/static/app.js"), ("/static/app.js", "text/javascript", "renderText"),
                                ("/static/app.css", "text/css", "body")):
        status, hdrs, text = http("GET", f"{container.url}{path}", auth=False)
        assert status == 200, (path, text)
        assert hdrs["Content-Type"].startswith(ctype) and marker in text, path
        assert "script-src 'self'" in hdrs["Content-Security-Policy"]


def test_runs_as_non_root(container):
    assert sh(["docker", "image", "inspect", "-f", "{{.Config.User}}", IMAGE], 30).stdout.strip() == \
        f"{APP_UID}:{APP_UID}"
    # The script keeps the image's user when run as root, else runs as the caller (--user).
    expected = f"{APP_UID}:{APP_UID}" if os.geteuid() == 0 else f"{os.geteuid()}:{os.getegid()}"
    assert sh(["docker", "inspect", "-f", "{{.Config.User}}", container.name], 30).stdout.strip() == expected
    assert sh(["docker", "exec", container.name, "id", "-u"], 30).stdout.strip() != "0"
    status = sh(["docker", "exec", container.name, "cat", "/proc/1/status"], 30).stdout
    uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.M)
    assert uids and uids.group(1) != "0" and uids.group(2) != "0", status


def test_listens_on_loopback_only(container):
    """With host networking the server binds 127.0.0.1:PORT itself; never 0.0.0.0."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, port = local.split(":")
            if state == "0A" and int(port, 16) == container.port:
                listening.add(addr)
    assert listening == {"0100007F"}, listening  # 127.0.0.1, little-endian hex


def test_survives_bad_requests(container):
    url = f"{container.url}/tool/{TOOL}"
    status, _, body = http("POST", url, raw=b"{not json")
    assert status == 400 and "error" in body, body
    status, _, body = http("POST", url, {"prompt": "x", "image_base64": "!!!not base64!!!"})
    assert status == 400 and "error" in body, body
    status, _, body = http("POST", url, {"image_base64": png_base64()})  # no prompt
    assert status == 400 and "error" in body, body
    status, _, body = http("GET", f"{container.url}/health")
    assert status == 200 and body["status"] == "ok", body
    state = sh(["docker", "inspect", "-f", "{{.State.Status}} {{.RestartCount}}", container.name], 30).stdout.split()
    assert state == ["running", "0"], state
    status, _, body = http("POST", url, {"prompt": "Still there?", "image_base64": png_base64()})
    assert status == 200, body


def test_cpu_image_contents(container):
    """CPU torch (no CUDA build pulled in), no torchvision, no build-only files, and a sane size."""
    out = sh(["docker", "exec", container.name, "python", "-c",
              "import importlib.util as u, torch; print(torch.__version__, torch.version.cuda, "
              "u.find_spec('torchvision') is None, u.find_spec('timm') is None)"], 60).stdout.split()
    assert out[1:] == ["None", "True", "True"], out
    sh(["docker", "exec", container.name, "sh", "-c", "test ! -e /build && test ! -e /tmp/src"], 30)
    size = int(sh(["docker", "image", "inspect", "-f", "{{.Size}}", IMAGE], 30).stdout.strip())
    container.timings["image_mb"] = size / 1e6
    print(f"\ncontainer test timings: {json.dumps({k: round(v, 1) for k, v in container.timings.items()})}")
    assert size < 2.5e9, f"CPU test image is {size / 1e9:.2f} GB"


# -- the default (user) mode, without an engine: publish on 127.0.0.1 only ---------------------

def test_script_dry_run_default_and_host_network(tmp_path):
    if shutil.which("bash") is None or shutil.which("realpath") is None:
        pytest.skip("needs bash and realpath")
    (tmp_path / ".env").write_text('PORT=8123\nHOST_MODEL_DIR=./m\nMODEL_PATH="./m/x y"\nAPI_KEY=secret # c\n'
                                   "DEVICE=cuda\nHUGGINGFACE_TOKEN='hf_abc'\n")
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_NETWORK"}
    out = sh(["bash", str(SCRIPT), "--dry-run", "--cpu", "-e", str(tmp_path / ".env")], 60, env=env).stdout
    run = next(line for line in out.splitlines() if line.startswith("+ docker run"))
    assert "-p 127.0.0.1:8123:8000" in run
    assert f"-v {tmp_path}/m:/models" in run
    assert "--network" not in run and "--gpus" not in run
    assert "-e HOST=0.0.0.0 -e PORT=8000" in run
    assert r"-e MODEL_PATH=/models/x\ y" in run
    assert "env-file: DEVICE=cpu" in out  # no GPU in use
    assert "env-file: API_KEY=***" in out and "secret" not in out and "hf_abc" not in out
    out = sh(["bash", str(SCRIPT), "--dry-run", "--cpu", "-e", str(tmp_path / ".env"), "--port", "9001"],
             60, env={**env, "DOCKER_NETWORK": "host"}).stdout
    run = next(line for line in out.splitlines() if line.startswith("+ docker run"))
    build = next(line for line in out.splitlines() if line.startswith("+ docker build"))
    assert "--network host -e HOST=127.0.0.1 -e PORT=9001" in run
    assert " -p " not in run
    assert "--network host" in build


# -- as a script -------------------------------------------------------------------------------

def main() -> int:
    started_engine = False
    if engine_problem() and os.geteuid() == 0 and ENGINE_SCRIPT.is_file():
        print("no Docker engine answers: starting one with tests/docker_engine.sh start", flush=True)
        started_engine = subprocess.run(["bash", str(ENGINE_SCRIPT), "start"], timeout=900).returncode == 0
    try:
        started = time.monotonic()
        code = pytest.main([__file__, "-v", "-rs", "-s", *sys.argv[1:]])
        print(f"container test: {time.monotonic() - started:.0f}s")
        return int(code)
    finally:
        if started_engine:
            subprocess.run(["bash", str(ENGINE_SCRIPT), "stop"], timeout=120)


if __name__ == "__main__":
    sys.exit(main())
