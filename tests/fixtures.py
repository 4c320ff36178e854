"""Shared test helpers and pytest fixtures for hcx-server.

Import what you need, fixtures included, from any test file::

    from tests.fixtures import LiveServer, server_url, demo_model_dir, image_bytes, b64  # noqa: F401

(tests/conftest.py already imports every fixture for the files under tests/; the top-level
test files import them explicitly since there is no root conftest.py.)

What is here
------------
- ``LiveServer``: a REAL ``hcx-cli serve --port <free port>`` subprocess (gunicorn, one gthread
  worker) on 127.0.0.1 with a given MODEL_PATH and extra env (MAX_QUEUE, API_KEY, ...). It waits
  for ``/health`` 200 (bounded; the server log is shown on failure) and stops with SIGTERM, then
  SIGKILL. It runs in a fresh temp dir with the hcx config keys removed from the environment, so a
  developer's ``.env`` or shell exports cannot change what a test sees. Use it as a context
  manager or call ``start()`` / ``stop()``.
- Session fixtures: ``demo_model_dir`` (tiny LLaVA, ``server.build_demo_model``),
  ``hcx_model_dir`` (tiny HCX remote-code model, first revision, ``tests.tiny_models.build_tiny_hcx``),
  ``hcx_v2_model_dir`` (the later revision, ``build_tiny_hcx_v2``), ``server_url`` (a session server
  on the demo model, or the URL in ``HCX_TEST_URL``), ``demo_server`` (the LiveServer behind it),
  ``hcx_server_url``, ``hcx_v2_server_url``, ``model_url`` (parametrized over "demo", "hcx" and
  "hcx-v2") and ``make_server`` (a factory for servers with their own config, stopped after the
  test). ``tiny_model(name, tmp_path_factory)`` / ``tiny_server(name, tmp_path_factory)`` give any
  tiny model of ``_tiny_builders()`` (also the v2 variants and a text-only model) and a shared
  server on it.
  Every model is built once per pytest process, every shared server started once, even when
  the fixtures are imported into several modules.
- ``HCX_TEST_URL`` mode: when set, ``server_url`` is that URL and tests marked ``local_only``
  (or using demo/hcx models or ``make_server``) skip.
- Images: ``image_bytes(kind)`` makes real images with Pillow (PNG, JPEG, CMYK, palette, RGBA,
  LA, grey, EXIF-rotated, GIF, WebP, BMP, 1x1, 40x3 ...), ``b64()`` encodes them (optionally
  with a data: URL prefix and line wrapping).
- HTTP: ``post()`` and ``stream_chunks()`` (the raw HTTP chunks of a streamed answer).
- Node.js: ``node_packages_ready()`` (``npm ci`` in tests/node when a locked package is missing;
  skips without node) and ``run_node()`` (a tests/node script's one-line JSON summary).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pytest

# Tests never reach the hub: a wrong path must fail fast and clearly, not try to download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
REQUEST_TIMEOUT = float(os.environ.get("HCX_TEST_TIMEOUT", "300"))
STARTUP_TIMEOUT = float(os.environ.get("HCX_TEST_STARTUP_TIMEOUT", "120"))

# Settings the server reads from its environment. They are removed from the environment of the
# processes the tests start, so only what a test passes explicitly applies.
CONFIG_KEYS = (
    "MODEL_PATH", "MODEL_ID", "MODEL_REVISION", "DEVICE", "DTYPE", "VISION_DTYPE", "HUGGINGFACE_TOKEN",
    "HF_TOKEN", "HOST_MODEL_DIR", "MAX_NEW_TOKENS", "MAX_TOKENS_CAP", "SYSTEM_PROMPT", "HOST", "PORT",
    "THREADS", "MAX_QUEUE", "MAX_BODY_BYTES", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "MAX_IMAGES",
    "LOG_PROMPTS", "DEMO", "DEMO_MODEL_DIR", "API_KEY", "API_KEYS", "HCX_TEST_URL", "WEIGHTS", "CPU_KERNEL",
    "BACKEND", "UPSTREAM_URLS", "UPSTREAM_API_KEY", "UPSTREAM_MODEL", "UPSTREAM_TIMEOUT",
)


# ----------------------------------------------------------------------------------------
# HCX_TEST_URL mode
# ----------------------------------------------------------------------------------------


def live_url() -> str:
    """The user's live server (HCX_TEST_URL) without a trailing slash, or '' for local servers."""
    return os.environ.get("HCX_TEST_URL", "").strip().rstrip("/")


# A string condition is evaluated when the test runs, so setting HCX_TEST_URL after import works.
local_only = pytest.mark.skipif(
    "bool(os.environ.get('HCX_TEST_URL', '').strip())",
    reason="needs a server started by the tests (specific config or tiny model); HCX_TEST_URL is set")


def skip_if_live(what: str = "this test") -> None:
    if live_url():
        pytest.skip(f"{what} needs a server started by the tests; HCX_TEST_URL={live_url()} is set")


# ----------------------------------------------------------------------------------------
# Subprocess helpers
# ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def clean_env(extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """os.environ without the hcx config keys, offline, plus `extra` (None values remove a key)."""
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_KEYS}
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread is fastest, and test servers share cores
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def hcx_cli() -> list[str]:
    """The hcx-cli of the interpreter running the tests (the venv's), else `python -c`."""
    beside = Path(sys.executable).with_name("hcx-cli")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("hcx-cli")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys, cli; sys.exit(cli.main())"]


def run_cli(args: list[str], env: Mapping[str, Any] | None = None, input: bytes | None = None,
            timeout: float = 120, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run `hcx-cli ARGS` to completion (bytes stdout/stderr) in a clean, offline environment."""
    with tempfile.TemporaryDirectory(prefix="hcx-cli-") as scratch:
        return subprocess.run([*hcx_cli(), *args], env=clean_env(env), input=input, capture_output=True,
                              timeout=timeout, cwd=cwd or scratch)


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    """GET without requests (used while waiting for start-up): status and body, 0 if no answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def wait_for_health(url: str, timeout: float, alive: Callable[[], bool] = lambda: True,
                    describe: Callable[[], str] = lambda: "", connect_timeout: float | None = None,
                    health_status: str | None = None) -> dict:
    """Poll GET {url}/health until 200 (or, with `health_status`, until its "status" is that, whatever
    the HTTP status); fail early if the model failed to load, the process died, or (with
    connect_timeout) nothing answers at all for that long."""
    started = time.monotonic()
    deadline = started + timeout
    last, answered = "no answer", False
    while time.monotonic() < deadline:
        status, body = http_get(f"{url}/health", timeout=5)
        if status == 200 and health_status is None:
            return json.loads(body)
        if status and health_status is not None:
            with contextlib.suppress(ValueError):
                if json.loads(body).get("status") == health_status:
                    return json.loads(body)
        if status:
            answered = True
            last = f"HTTP {status}: {body[:300].decode('utf-8', 'replace')}"
            try:
                if json.loads(body).get("status") == "error":
                    raise RuntimeError(f"server at {url} failed to load its model: {last}{describe()}")
            except ValueError:
                pass
        elif connect_timeout is not None and not answered and time.monotonic() - started > connect_timeout:
            raise RuntimeError(f"nothing answers at {url} (waited {connect_timeout:.0f} s); is the server running?")
        if not alive():
            raise RuntimeError(f"server at {url} exited before it became healthy{describe()}")
        time.sleep(0.1)
    raise RuntimeError(f"server at {url} not healthy after {timeout:.0f} s (last: {last}){describe()}")


class LiveServer:
    """A real `hcx-cli serve` subprocess (gunicorn) on 127.0.0.1:<free port>.

    >>> with LiveServer(model_dir, env={"MAX_QUEUE": 1}) as srv:
    ...     requests.get(srv.url + "/health")

    `port` fixes the port (a restart after kill() comes back at the same address); `health_status`
    waits for that /health status instead of a 200 (e.g. "unavailable" for a front with no live
    upstream).
    """

    def __init__(self, model_path: str | os.PathLike | None, env: Mapping[str, Any] | None = None,
                 args: list[str] | tuple[str, ...] = (), startup_timeout: float = STARTUP_TIMEOUT,
                 name: str = "hcx-test-server", port: int | None = None, health_status: str | None = None):
        self.model_path = None if model_path is None else str(model_path)
        self.extra_env = dict(env or {})
        self.args = list(args)
        self.startup_timeout = startup_timeout
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        self.log_path = self.workdir / "server.log"
        self.fixed_port = port
        self.health_status = health_status
        self.port: int | None = port
        self.proc: subprocess.Popen | None = None
        self.health: dict | None = None
        self.final_log = ""

    @property
    def url(self) -> str:
        assert self.port is not None, "server not started"
        return f"http://{HOST}:{self.port}"

    def log(self) -> str:
        """The server's stdout+stderr so far (kept in memory once stopped)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return self.final_log

    def _describe(self) -> str:
        code = self.proc.poll() if self.proc else None
        tail = "\n".join(self.log().splitlines()[-60:])
        return f"\n--- exit code {code}; server log {self.log_path} (last lines) ---\n{tail}\n---"

    def start(self) -> "LiveServer":
        for attempt in range(3):  # a free port can be taken between probing and binding
            self.port = self.fixed_port or free_port()
            self.workdir.mkdir(parents=True, exist_ok=True)  # stop() after a failed try removed it
            env = {**({"MODEL_PATH": self.model_path} if self.model_path else {}), **self.extra_env}
            cmd = [*hcx_cli(), "serve", "--host", HOST, "--port", str(self.port), *self.args]
            with open(self.log_path, "ab") as log_file:
                self.proc = subprocess.Popen(cmd, env=clean_env(env), cwd=self.workdir, stdout=log_file,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True)
            try:
                self.health = wait_for_health(self.url, self.startup_timeout, alive=lambda: self.proc.poll() is None,
                                              describe=self._describe, health_status=self.health_status)
                return self
            except RuntimeError:
                in_use = "already in use" in self.log() or "Connection in use" in self.log()
                self.stop()
                if not in_use or attempt == 2 or self.fixed_port:
                    raise
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM the process group (gunicorn master + worker), SIGKILL what is left."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:  # hung: kill the master and its worker (same group)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        self.final_log = self.log()
        if not os.environ.get("HCX_TEST_KEEP_LOGS"):
            shutil.rmtree(self.workdir, ignore_errors=True)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the process group (gunicorn master and worker) at once: a crash, no draining."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------
# Once-per-process models and servers
# ----------------------------------------------------------------------------------------
# Fixtures imported into several modules become several pytest fixture definitions, each with
# its own session cache; these module-level caches keep it to one build / one server.

_MODELS: dict[str, Path] = {}
_SERVERS: dict[str, list] = {}  # key -> [LiveServer | Exception, refcount]


def _tiny_builders() -> dict[str, Callable[[Path], Path]]:
    """Every tiny model the suite builds, by name (all random weights, all offline)."""
    import server
    from tests.tiny_models import build_tiny_hcx, build_tiny_hcx_v2, build_tiny_text_model

    return {
        "demo": server.build_demo_model,  # tiny LLaVA: the generic image-text-to-text path
        "hcx": lambda path: build_tiny_hcx(path, seed=0),  # HCX remote code, first revision (hcx-v1)
        "hcx-v2": lambda path: build_tiny_hcx_v2(path, seed=0),  # later revision; processor leaves 1 placeholder
        # later revision, the other way round: the processor expands placeholders, the template is the tokenizer's
        "hcx-v2-expanding": lambda path: build_tiny_hcx_v2(path, seed=0, expand_image_placeholders=True,
                                                           template_on="tokenizer"),
        "hcx-v2-broken": lambda path: build_tiny_hcx_v2(path, seed=0, query_length_offset=1),  # wrong counts
        "text": lambda path: build_tiny_text_model(path, seed=0),  # a causal LM without vision
    }


def tiny_model(name: str, tmp_path_factory) -> Path:
    """The tiny model `name` (see _tiny_builders), built once per pytest process."""
    if name not in _MODELS:
        _MODELS[name] = Path(_tiny_builders()[name](tmp_path_factory.mktemp(f"tiny-{name}-model")))
    return _MODELS[name]


def _demo_dir(tmp_path_factory) -> Path:
    return tiny_model("demo", tmp_path_factory)


def _hcx_dir(tmp_path_factory) -> Path:
    return tiny_model("hcx", tmp_path_factory)


def tiny_server(name: str, tmp_path_factory):
    """A context manager: the session's shared LiveServer on tiny model `name`, default config."""
    skip_if_live(f"the tiny {name} server")
    model = tiny_model(name, tmp_path_factory)
    return _shared_server(name, lambda: LiveServer(model, name=f"hcx-{name}-server"))


@contextlib.contextmanager
def _shared_server(key: str, factory: Callable[[], LiveServer]) -> Iterator[LiveServer]:
    entry = _SERVERS.get(key)
    if entry is None:
        try:
            entry = [factory().start(), 0]
        except Exception as exc:  # start-up failures are reported once per user, not retried
            entry = [exc, 0]
        _SERVERS[key] = entry
    if isinstance(entry[0], Exception):
        raise entry[0]
    entry[1] += 1
    try:
        yield entry[0]
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            entry[0].stop()
            del _SERVERS[key]


# ----------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """A tiny random LLaVA (generic image-text-to-text path), built once."""
    return _demo_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def hcx_model_dir(tmp_path_factory) -> Path:
    """A tiny random HCX remote-code model, built once; skips when tests.tiny_models is missing."""
    return _hcx_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory) -> Iterator[LiveServer]:
    """The session's LiveServer on the demo model with the default config (local mode only)."""
    skip_if_live("the demo server")
    model = _demo_dir(tmp_path_factory)
    with _shared_server("demo", lambda: LiveServer(model, name="hcx-demo-server")) as srv:
        yield srv


@pytest.fixture(scope="session")
def server_url(tmp_path_factory) -> Iterator[str]:
    """Base URL of a healthy server: HCX_TEST_URL if set, else the session demo server."""
    url = live_url()
    if url:
        try:
            # a model that is still loading is waited for; a URL where nothing listens fails fast
            wait_for_health(url, float(os.environ.get("HCX_TEST_WAIT", "600")), connect_timeout=10)
        except RuntimeError as exc:
            pytest.fail(str(exc), pytrace=False)
        yield url
        return
    model = _demo_dir(tmp_path_factory)
    with _shared_server("demo", lambda: LiveServer(model, name="hcx-demo-server")) as srv:
        yield srv.url


@pytest.fixture(scope="session")
def hcx_server(tmp_path_factory) -> Iterator[LiveServer]:
    """A session LiveServer on the tiny HCX remote-code model, first revision (skips when live)."""
    with tiny_server("hcx", tmp_path_factory) as srv:
        yield srv


@pytest.fixture(scope="session")
def hcx_server_url(hcx_server) -> str:
    return hcx_server.url


@pytest.fixture(scope="session")
def hcx_v2_model_dir(tmp_path_factory) -> Path:
    """A tiny random HCX model of the later revision (processor_config.json -> HCXProcessor)."""
    return tiny_model("hcx-v2", tmp_path_factory)


@pytest.fixture(scope="session")
def hcx_v2_server_url(tmp_path_factory) -> Iterator[str]:
    with tiny_server("hcx-v2", tmp_path_factory) as srv:
        yield srv.url


@pytest.fixture(params=["demo", "hcx", "hcx-v2"])
def model_url(request) -> str:
    """Base URL of a server on the demo model (or HCX_TEST_URL), then on the tiny HCX models of
    both revisions."""
    return request.getfixturevalue({"demo": "server_url", "hcx": "hcx_server_url",
                                    "hcx-v2": "hcx_v2_server_url"}[request.param])


@pytest.fixture
def make_server() -> Iterator[Callable[..., LiveServer]]:
    """Factory: make_server(model_dir, env={...}) -> started LiveServer, stopped after the test."""
    skip_if_live("a server with its own config")
    started: list[LiveServer] = []

    def make(model_path, env=None, **kwargs) -> LiveServer:
        srv = LiveServer(model_path, env=env, **kwargs)
        started.append(srv)
        return srv.start()

    yield make
    for srv in reversed(started):
        srv.stop()


# ----------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------

IMAGE_KINDS = ("png", "jpeg", "cmyk_jpeg", "palette_png", "palette_transparent_png", "rgba_png", "la_png",
               "gray_png", "exif_rotated_jpeg", "gif", "webp", "bmp", "tiny_1x1", "thin_40x3", "thin_3x40",
               "large_1200x900")


def two_tone(size=(64, 48), left=(220, 30, 30), right=(30, 30, 220), mode="RGB"):
    """An image whose left half is `left` and right half `right` (so rotations are visible)."""
    from PIL import Image

    img = Image.new("RGB", size, right)
    img.paste(left, (0, 0, max(size[0] // 2, 1), size[1]))
    return img if mode == "RGB" else img.convert(mode)


def image_bytes(kind: str = "png", size: tuple[int, int] = (64, 48)) -> bytes:
    """A real encoded image of the given kind (see IMAGE_KINDS)."""
    from PIL import Image

    buf = io.BytesIO()
    if kind == "png":
        two_tone(size).save(buf, "PNG")
    elif kind == "jpeg":
        two_tone(size).save(buf, "JPEG", quality=90)
    elif kind == "cmyk_jpeg":
        two_tone(size).convert("CMYK").save(buf, "JPEG", quality=90)
    elif kind == "palette_png":
        two_tone(size).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(buf, "PNG")
    elif kind == "palette_transparent_png":
        img = two_tone(size).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
        img.save(buf, "PNG", transparency=img.getpixel((0, 0)))  # the left half is transparent
    elif kind == "rgba_png":
        img = two_tone(size).convert("RGBA")
        img.putalpha(0)
        img.paste((30, 30, 220, 255), (size[0] // 2, 0, size[0], size[1]))  # left transparent
        img.save(buf, "PNG")
    elif kind == "la_png":
        img = Image.new("LA", size, (90, 0))
        img.paste((90, 255), (size[0] // 2, 0, size[0], size[1]))
        img.save(buf, "PNG")
    elif kind == "gray_png":
        two_tone(size).convert("L").save(buf, "PNG")
    elif kind == "exif_rotated_jpeg":
        img = two_tone(size)
        exif = img.getexif()
        exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
        img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    elif kind == "gif":
        two_tone(size).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(buf, "GIF")
    elif kind == "webp":
        two_tone(size).save(buf, "WEBP")
    elif kind == "bmp":
        two_tone(size).save(buf, "BMP")
    elif kind == "tiny_1x1":
        Image.new("RGB", (1, 1), (255, 0, 0)).save(buf, "PNG")
    elif kind == "thin_40x3":
        two_tone((40, 3)).save(buf, "PNG")
    elif kind == "thin_3x40":
        two_tone((3, 40)).save(buf, "PNG")
    elif kind == "large_1200x900":
        two_tone((1200, 900)).save(buf, "JPEG", quality=80)
    else:
        raise ValueError(f"unknown image kind {kind!r}; one of {IMAGE_KINDS}")
    return buf.getvalue()


def b64(data: bytes, data_url: str | bool = False, wrap: int = 0, newline: str = "\n") -> str:
    """Base64 text; data_url=True adds `data:image/png;base64,` (or pass a MIME type); wrap=76
    breaks lines like MIME encoders do."""
    text = base64.b64encode(data).decode("ascii")
    if wrap:
        text = newline.join(text[i:i + wrap] for i in range(0, len(text), wrap))
    if data_url:
        mime = data_url if isinstance(data_url, str) else "image/png"
        text = f"data:{mime};base64,{text}"
    return text


def corrupt_png_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height (a decompression bomb header)."""
    import struct
    import zlib

    raw = bytearray(image_bytes("tiny_1x1"))
    # IHDR data starts at byte 16: width, height (big-endian), then 5 bytes; its CRC follows.
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    return bytes(raw)


# ----------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------

SEED_ROUTE = "/tool/generate_hyperclovax_vision"
SEED_STREAM_ROUTE = "/tool/generate_hyperclovax_vision_stream"


def post(base: str, path: str, body: Any = None, *, data: bytes | str | None = None,
         params: Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None,
         timeout: float = REQUEST_TIMEOUT):
    """POST a JSON body (or raw `data`) and return the requests.Response (fully read)."""
    import requests

    if data is not None:
        return requests.post(base + path, data=data, params=params, timeout=timeout,
                             headers={"Content-Type": "application/json", **(headers or {})})
    return requests.post(base + path, json=body, params=params, headers=headers, timeout=timeout)


def stream_chunks(base: str, path: str, body: Any, params: Mapping[str, str] | None = None,
                  headers: Mapping[str, str] | None = None, timeout: float = REQUEST_TIMEOUT):
    """POST and read the answer as it arrives: (response, [raw bytes of each HTTP chunk],
    [seconds after the request was sent at which each chunk arrived])."""
    import requests

    started = time.perf_counter()
    chunks, times = [], []
    with requests.post(base + path, json=body, params=params, headers=headers, timeout=timeout,
                       stream=True) as resp:
        if resp.headers.get("Transfer-Encoding", "").lower() == "chunked":
            pieces = resp.raw.read_chunked(decode_content=False)  # one item per HTTP chunk
        else:
            pieces = resp.iter_content(chunk_size=None)
        for chunk in pieces:
            if chunk:
                chunks.append(chunk)
                times.append(time.perf_counter() - started)
    return resp, chunks, times


# ----------------------------------------------------------------------------------------
# Node.js clients (tests/node: Caret's MCP SDK 1.11.1, a current MCP SDK, the MCP Inspector, openai
# npm, the Vercel AI SDK), locked in tests/node/package-lock.json
# ----------------------------------------------------------------------------------------

NODE_DIR = REPO_ROOT / "tests" / "node"


def node_packages_ready() -> str:
    """The `node` binary, after `npm ci` in tests/node when a package of package.json is missing
    there (a checkout from before it was added); skips when node or npm is not installed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip(f"node/npm not installed (node={node}, npm={npm}); install Node.js >= 18 to run the "
                    "JavaScript client tests")
    wanted = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]
    if not all((NODE_DIR / "node_modules" / name / "package.json").is_file() for name in wanted):
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True,
                              text=True, timeout=600, env=clean_env())
        assert proc.returncode == 0, f"npm ci failed in {NODE_DIR}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return node


def run_node(args: list[str], timeout: float = 300, env: Mapping[str, Any] | None = None) -> dict:
    """Run a node script of tests/node that prints ONE JSON summary as its last line; fail with its
    stderr when it exits non-zero or reports {"fatal": ...}."""
    proc = subprocess.run(args, cwd=NODE_DIR, capture_output=True, text=True, timeout=timeout, env=clean_env(env))
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"no output (exit {proc.returncode}); stderr:\n{proc.stderr[-3000:]}"
    summary = json.loads(lines[-1])
    assert proc.returncode == 0 and "fatal" not in summary, (
        f"{args[1]} failed (exit {proc.returncode}) after steps {summary.get('steps')}:\n"
        f"{summary.get('fatal')}\nstderr:\n{proc.stderr[-3000:]}")
    return summary


def assert_error_json(resp, status: int, *words: str) -> dict:
    """The JSON error shape {"error": str, "detail": str} with `status`; `words` appear in it."""
    assert resp.status_code == status, f"expected HTTP {status}, got {resp.status_code}: {resp.text[:500]}"
    assert resp.headers.get("Content-Type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("detail"), str) and body["detail"], body
    text = json.dumps(body, ensure_ascii=False).lower()
    for word in words:
        assert word.lower() in text, f"{word!r} not in error body {body}"
    assert "traceback" not in text, body
    return body
