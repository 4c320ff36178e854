"""The browser playground at `/` (static/index.html, app.js, app.css).

Over plain HTTP: the page and its assets, their Content-Security-Policy, no other file reachable
under /static/, the Origin and API-key rules, the image limits in /health, and a built wheel that
carries the files. Then the page itself in a REAL headless Chromium (Debian's `chromium`, driven
by playwright pointed at that binary; no browser download) against live `hcx-cli serve --demo`
servers: a Korean prompt with a PNG, the answer growing while it streams, Stop (the server counts
a cancelled generation), a second turn that carries the first, IME composition, images by
picker, paste and drop, size limits, text-only rendering of model output, the API key prompt,
and the busy message. Screenshots go to each test's temp folder; with
HCX_PLAYGROUND_SCREENSHOT=<file.png> the chat test also writes the README's screenshot there.

The demo model here has an 8192-token window (and MAX_TOKENS_CAP=8000) so that an answer with
min_tokens = max_tokens runs for seconds: long enough to watch it grow and to stop it, bounded
by Stop (or the test's disconnect) well before it would end.
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import requests

import server
from tests.fixtures import REPO_ROOT, LiveServer, clean_env, image_bytes, local_only

pytestmark = local_only

CHROMIUM = os.environ.get("HCX_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# playwright starts it headless with a fresh temporary profile (its own --user-data-dir).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
STATIC = REPO_ROOT / "static"
PAGE_FILES = ("index.html", "app.js", "app.css")
LONG = 6000  # tokens: seconds of streaming on the demo model, always stopped long before the end
KOREAN = "이 그림을 설명해 주세요. 무엇이 보이나요?"
API_KEY = "pg-secret-1"


# -- servers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_demo_dir(tmp_path_factory) -> Path:
    """The demo model with an 8192-token window (answers of thousands of tokens)."""
    return server.build_demo_model(tmp_path_factory.mktemp("playground-demo"), max_position_embeddings=8192)


def demo_server(model_dir: Path, **env) -> LiveServer:
    """`hcx-cli serve --demo` on the long-window demo model."""
    return LiveServer(None, env={"DEMO_MODEL_DIR": model_dir, "MAX_TOKENS_CAP": 8000, **env}, args=["--demo"],
                      name="hcx-playground")


@pytest.fixture(scope="module")
def page_server(long_demo_dir):
    with demo_server(long_demo_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def tight_server(long_demo_dir):
    """One request may wait (MAX_QUEUE=1) and images are small (MAX_IMAGE_BYTES=4096)."""
    with demo_server(long_demo_dir, MAX_QUEUE=1, MAX_IMAGE_BYTES=4096) as srv:
        yield srv


def cancelled_generations(url: str) -> int:
    text = requests.get(url + "/metrics", timeout=10).text
    match = re.search(r'^hcx_generations_total\{outcome="cancelled"\} (\d+)$', text, re.M)
    return int(match.group(1)) if match else 0


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def raw_get(url: str, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """GET with the path sent exactly as given (requests would normalize dot segments)."""
    host, port = url.split("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def png_file(folder: Path, name: str = "two-tone.png", size=(64, 48)) -> Path:
    path = folder / name
    path.write_bytes(image_bytes("png", size))
    return path


def noise_png(folder: Path, name: str, side: int) -> Path:
    """A PNG that does not compress (random pixels): side*side*3 bytes and more."""
    from PIL import Image

    path = folder / name
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(path, "PNG")
    return path


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


# -- over HTTP -----------------------------------------------------------------------------------


def test_page_and_assets_have_the_csp_and_nothing_from_elsewhere(page_server):
    resp = requests.get(page_server.url + "/", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    html = resp.text
    assert html == (STATIC / "index.html").read_text(encoding="utf-8")
    # every script/style is one of ours, by same-origin path; no inline script or style
    assert re.findall(r'<script[^>]*\bsrc="([^"]+)"', html) == ["/static/app.js"]
    assert re.findall(r'<link rel="stylesheet" href="([^"]+)"', html) == ["/static/app.css"]
    assert not re.search(r"<script[^>]*>\s*[^<\s]", html) and "<style" not in html and " style=" not in html
    for name, ctype in (("app.js", "text/javascript; charset=utf-8"), ("app.css", "text/css; charset=utf-8")):
        asset = requests.get(f"{page_server.url}/static/{name}", timeout=10)
        assert asset.status_code == 200 and asset.headers["Content-Type"] == ctype
        assert asset.content == (STATIC / name).read_bytes()
    for response in (resp, asset):
        csp = dict(part.strip().split(" ", 1) for part in response.headers["Content-Security-Policy"].split(";"))
        assert csp["default-src"] == "'none'"
        assert csp["script-src"] == csp["style-src"] == csp["connect-src"] == "'self'"
        assert csp["frame-ancestors"] == "'none'" and csp["base-uri"] == "'none'"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    for name in PAGE_FILES:  # works offline: no URL to anywhere else (no CDN, no web font)
        assert not re.search(r"(https?:)?//[a-z0-9]", (STATIC / name).read_text(encoding="utf-8").replace(
            "http://127.0.0.1", "")), name


@pytest.mark.parametrize("path", ["/static/../server.py", "/static/..%2fserver.py", "/static/%2e%2e%2fserver.py",
                                  "/static/..%5cserver.py", "/static/.hidden.js", "/static/missing.js",
                                  "/static/index", "/static/__init__.py", "/static/app.js/", "/static/",
                                  "/static//etc/passwd", "/index.html", "/app.js"])
def test_only_the_page_files_are_served(page_server, path):
    status, headers, body = raw_get(page_server.url, path)
    assert status == 404, (path, status, body[:200])
    assert headers["Content-Type"] == "application/json"
    assert b"import " not in body and b"root:" not in body


def test_origin_rules_apply_to_the_page(page_server):
    status, _, body = raw_get(page_server.url, "/", {"Origin": "http://evil.example"})
    assert status == 403 and b"origin" in body
    status, _, _ = raw_get(page_server.url, "/static/app.js", {"Origin": "http://evil.example"})
    assert status == 403
    status, _, _ = raw_get(page_server.url, "/", {"Origin": page_server.url})
    assert status == 200


def test_health_reports_the_image_limits(page_server):
    health = requests.get(page_server.url + "/health", timeout=10).json()
    assert health["max_image_bytes"] == server.Config().max_image_bytes
    assert health["max_images"] == server.Config().max_images


def test_wheel_installs_the_page(tmp_path):
    """`pip install .` (not editable) carries static/ as hcx_server_static (and kernels/ as
    hcx_server_kernels), and server finds them."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "server.py", "cli.py"):
        shutil.copy(REPO_ROOT / name, src / name)
    for folder in ("benchmarks", "static", "kernels"):
        shutil.copytree(REPO_ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=180)
    assert built.returncode == 0, built.stdout + built.stderr
    wheel = next((tmp_path / "dist").glob("hcx_server-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for path in STATIC.iterdir():  # every file of static/ is one the server serves, and installed
            assert path.suffix in server.STATIC_TYPES, path
            assert zf.read(f"hcx_server_static/{path.name}") == path.read_bytes()
        for path in (REPO_ROOT / "kernels").glob("*.[ch]*"):
            assert zf.read(f"hcx_server_kernels/{path.name}") == path.read_bytes()
    assert not any(n.startswith(("static/", "kernels/")) for n in names), names  # no bare top-level packages
    target = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                                str(wheel)], capture_output=True, text=True, timeout=180)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    probe = subprocess.run(
        [sys.executable, "-c", "import server; print(server.__file__); print(server.static_folder() / 'app.js'); "
                               "print(server.kernel_sources() / 'ops.cpp')"],
        env=clean_env({"PYTHONPATH": str(target)}), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    module, app_js, ops = probe.stdout.split()
    assert Path(module).parent == target and Path(app_js) == target / "hcx_server_static" / "app.js"
    assert Path(ops) == target / "hcx_server_kernels" / "ops.cpp"


# -- in Chromium ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium (apt-get install chromium; "
                    ".ci/run does it when it runs as root) or point HCX_CHROMIUM at one")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=60_000)
        yield chromium
        chromium.close()


class Tab:
    """One playground tab in a fresh browser context: page errors and console errors collected,
    every chat request (JSON body and headers) recorded, screenshots into `shots`."""

    def __init__(self, browser, url: str, shots: Path):
        self.url, self.shots = url, shots
        self.context = browser.new_context(viewport={"width": 960, "height": 720})
        self.page = self.context.new_page()
        self.page.set_default_timeout(20_000)
        self.errors: list[str] = []
        self.requests: list = []
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        self.page.on("console", lambda msg: msg.type == "error" and self.errors.append(msg.text))
        self.page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and self.requests.append(r))
        self.page.goto(url + "/")
        self.page.wait_for_selector("#model-info .field")

    @property
    def bodies(self) -> list[dict]:
        return [r.post_data_json for r in self.requests]

    def settings(self, **values) -> None:
        if self.page.locator("#settings").get_attribute("open") is None:
            self.page.click("#settings summary")
        for key, value in values.items():
            self.page.fill(f"#{key.replace('_', '-')}", str(value))

    def type(self, text: str) -> None:
        self.page.focus("#prompt")
        self.page.keyboard.insert_text(text)

    def say(self, text: str) -> None:
        self.type(text)
        self.page.keyboard.press("Enter")

    def answer(self, index: int = -1):
        return self.page.locator(".message.assistant").nth(index)

    def wait_answer_done(self, index: int = -1, timeout: float = 60_000) -> str:
        """The answer's footer once it finished (it has a Copy button then)."""
        meta = self.answer(index).locator(".meta")
        meta.locator("button.copy").wait_for(timeout=timeout)
        return meta.inner_text()

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def other_errors(self) -> list[str]:
        """Console errors but the browser's own line for an HTTP error status (401, 503, ...)."""
        return [e for e in self.errors if not e.startswith("Failed to load resource: the server responded")]

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser, page_server, tmp_path):
    t = Tab(browser, page_server.url, tmp_path)
    yield t
    t.close()


def text_length(locator) -> int:
    return len(locator.text_content() or "")


def test_chat_streams_stops_and_keeps_history(tab, page_server, tmp_path):
    page, url = tab.page, page_server.url
    health = requests.get(url + "/health", timeout=10).json()
    info = page.inner_text("#model-info")
    for field in ("model", "device", "dtype", "backend"):
        assert f"{field}: {health[field]}" in info, info
    assert "weights" not in info or "weights" in health  # fields /health lacks are left out, not "undefined"
    assert "undefined" not in info and "null" not in info
    assert page.is_visible("#demo-banner") and page.inner_text("#demo-banner") == health["note"]

    # a PNG by the file picker: a thumbnail, removable
    png = png_file(tmp_path)
    page.set_input_files("#file-input", str(png))
    page.locator("#attachments .thumb img").wait_for()
    assert page.locator("#attachments .thumb img").get_attribute("src").startswith("blob:")
    page.click("#attachments .remove")
    page.locator("#attachments .thumb").wait_for(state="detached")
    page.set_input_files("#file-input", str(png))
    page.locator("#attachments .thumb").wait_for()

    # turn 1: Korean prompt + image, a long answer that is watched growing, then stopped
    tab.settings(max_tokens=LONG, min_tokens=LONG, seed=7)
    cancelled = cancelled_generations(url)
    tab.say(KOREAN)
    answer = tab.answer(0).locator(".body")
    wait_until(lambda: text_length(answer) > 0, 30, "the first streamed text")
    first = text_length(answer)
    wait_until(lambda: text_length(answer) > first, 30, "the streamed text to grow")
    assert page.is_disabled("#send") and page.is_enabled("#stop")
    tab.shot("streaming")
    page.click("#stop")
    tab.answer(0).locator(".meta").get_by_text("stopped after").wait_for()
    wait_until(lambda: cancelled_generations(url) == cancelled + 1, 15, "the server to count the cancelled generation")
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    assert page.locator("#attachments .thumb").count() == 0  # sent: the composer is empty again

    sent = tab.bodies[0]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert (sent["max_tokens"], sent["min_tokens"], sent["seed"]) == (LONG, LONG, 7)
    assert (sent["temperature"], sent["top_p"]) == (0.5, 0.6)
    turn1 = {"role": "user", "content": [{"type": "text", "text": KOREAN},
                                         {"type": "image_url", "image_url": {"url": data_url(png)}}]}
    assert sent["messages"] == [turn1]
    user = page.locator(".message.user").first
    assert user.locator(".body").inner_text() == KOREAN
    assert user.locator(".images img").get_attribute("src") == data_url(png)

    # turn 2 carries turn 1 (the partial answer included) and finishes: timing and usage shown
    tab.settings(max_tokens=12, min_tokens=12, system_prompt="답은 짧게.")
    tab.say("두 번째 질문")
    done = tab.wait_answer_done()
    assert re.fullmatch(r"first token \d+\.\d\d s · 12 tokens · \d+\.\d tokens/s Copy", done), done
    sent = tab.bodies[1]
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "user"]
    assert sent["messages"][0] == {"role": "system", "content": "답은 짧게."}
    assert sent["messages"][1] == turn1
    partial = sent["messages"][2]["content"]
    assert partial and (len(partial) >= first)
    if "```" not in partial:  # fences become code blocks: then the shown text differs from the raw
        assert answer.text_content() == partial
    assert sent["messages"][3] == {"role": "user", "content": "두 번째 질문"}

    # what the page shows (and copies) is what the server answers to the same request unstreamed
    plain = requests.post(url + "/v1/chat/completions", timeout=60, json={
        **{k: v for k, v in sent.items() if k not in ("stream", "stream_options")}}).json()
    expected = plain["choices"][0]["message"]["content"]
    tab.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
    tab.answer().locator("button.copy").click()
    tab.answer().locator("button.copy", has_text="Copied").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == expected
    if "```" not in expected:
        assert tab.answer().locator(".body").text_content() == expected
    tab.shot("two-turns")
    assert tab.errors == []


def test_enter_while_composing_does_not_send(tab):
    """Korean IME: the Enter that ends a composition commits it; it must not send the prompt."""
    page = tab.page
    tab.type("안녕")
    # a real composition in Chromium (CDP), Enter pressed while it is open: isComposing is true
    cdp = tab.context.new_cdp_session(page)
    cdp.send("Input.imeSetComposition", {"text": "하", "selectionStart": 1, "selectionEnd": 1})
    page.keyboard.press("Enter")
    cdp.send("Input.insertText", {"text": "하"})
    # the two ways browsers flag it, as synthetic events: isComposing, and keyCode 229 (Safari)
    page.evaluate("""() => {
        const prompt = document.getElementById("prompt");
        for (const init of [{isComposing: true}, {keyCode: 229}]) {
            prompt.dispatchEvent(new KeyboardEvent("keydown", {key: "Enter", bubbles: true, cancelable: true, ...init}));
        }
    }""")
    page.keyboard.press("Shift+Enter")
    page.wait_for_timeout(300)
    assert tab.requests == [] and page.locator(".message").count() == 0
    value = page.input_value("#prompt")
    assert value.startswith("안녕하") and value.endswith("\n")
    tab.settings(max_tokens=4, min_tokens=4)
    page.focus("#prompt")
    page.keyboard.press("Enter")  # now it sends
    tab.wait_answer_done()
    assert tab.bodies[0]["messages"][-1] == {"role": "user", "content": value}
    assert page.locator(".message.user .body").text_content() == value
    assert tab.errors == []


def test_model_text_is_rendered_as_text_only(tab):
    """renderText (what every answer goes through) makes text nodes and <pre><code> only."""
    page = tab.page
    render = """(text) => {
        const box = document.createElement("div");
        box.append(hcxPlayground.renderText(text));
        document.body.append(box);
        const out = {tags: [...box.querySelectorAll("*")].map((e) => e.tagName), text: box.textContent,
                     code: [...box.querySelectorAll("pre > code")].map((e) => [e.textContent, e.dataset.lang || ""])};
        box.remove();
        return out;
    }"""
    hostile = ['<img src=x onerror="window.__pwned=1">', "<script>window.__pwned=1</script>",
               '"><svg onload=window.__pwned=1>', "&lt;b&gt; &amp; <b>bold</b> 한국어 <iframe src=javascript:1>",
               "<a href=javascript:window.__pwned=1>click</a>\n\n<style>body{display:none}</style>"]
    for text in hostile:
        out = page.evaluate(render, text)
        assert out["tags"] == [] and out["text"] == text, out
    out = page.evaluate(render, "before <b>\n```python\nprint('<img src=x onerror=alert(1)>')\n```\nafter")
    assert out["tags"] == ["PRE", "CODE"]
    assert out["code"] == [["print('<img src=x onerror=alert(1)>')", "python"]]
    assert out["text"] == "before <b>print('<img src=x onerror=alert(1)>')after"
    out = page.evaluate(render, "stream so far\n```\n<script>x</script>")  # an unclosed fence, mid-stream
    assert out["tags"] == ["PRE", "CODE"] and out["code"] == [["<script>x</script>", ""]]
    # the user's own text goes into the chat as text too
    tab.settings(max_tokens=4, min_tokens=4)
    tab.say(hostile[0])
    tab.wait_answer_done()
    user = tab.page.locator(".message.user .body")
    assert user.inner_text() == hostile[0] and user.locator("*").count() == 0
    # and the CSP stops inline script even where HTML does get in
    page.evaluate("""() => document.body.insertAdjacentHTML("beforeend", '<img src="data:," onerror="window.__pwned=1">')""")
    page.wait_for_timeout(300)
    assert page.evaluate("window.__pwned") is None
    assert any("Content Security Policy" in e for e in tab.errors), tab.errors


def test_images_by_paste_and_drop_within_the_limits(tab, tmp_path):
    page = tab.page
    small, other = png_file(tmp_path, "a.png"), png_file(tmp_path, "b.png", (32, 32))
    give = """([how, name, b64, type]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], name, {type}));
        const init = {bubbles: true, cancelable: true};
        if (how === "paste") {
            document.getElementById("prompt").dispatchEvent(new ClipboardEvent("paste", {...init, clipboardData: data}));
        } else {
            document.getElementById("chat").dispatchEvent(new DragEvent("dragover", {...init, dataTransfer: data}));
            document.getElementById("chat").dispatchEvent(new DragEvent("drop", {...init, dataTransfer: data}));
        }
    }"""

    def give_file(how: str, path: Path, mime: str = "image/png") -> None:
        page.evaluate(give, [how, path.name, base64.b64encode(path.read_bytes()).decode(), mime])

    give_file("paste", small)
    page.locator("#attachments .thumb").wait_for()
    give_file("drop", other)
    page.locator("#attachments .thumb").nth(1).wait_for()
    assert page.evaluate("document.body.classList.contains('dropping')") is False
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    give_file("drop", notes, "text/plain")
    page.locator("#notice", has_text="notes.txt: not an image").wait_for()
    for _ in range(3):  # MAX_IMAGES=4
        give_file("paste", small)
    page.locator("#notice", has_text="at most 4 images per request (MAX_IMAGES)").wait_for()
    assert page.locator("#attachments .thumb").count() == 4
    for _ in range(2):
        page.locator("#attachments .remove").last.click()
    page.wait_for_function("document.querySelectorAll('#attachments .thumb').length === 2")

    tab.settings(max_tokens=24, min_tokens=24, seed=3)
    tab.say("두 그림의 차이는?")
    tab.wait_answer_done()
    parts = tab.bodies[0]["messages"][-1]["content"]
    assert parts == [{"type": "text", "text": "두 그림의 차이는?"},
                     {"type": "image_url", "image_url": {"url": data_url(small)}},
                     {"type": "image_url", "image_url": {"url": data_url(other)}}]
    assert tab.page.locator(".message.user .images img").count() == 2
    tab.shot("images")
    readme_shot = os.environ.get("HCX_PLAYGROUND_SCREENSHOT")
    if readme_shot:  # the README's picture: settings folded, fewer colours to keep it small
        from PIL import Image

        page.click("#settings summary")
        page.set_viewport_size({"width": 880, "height": 520})
        Image.open(tab.shot("readme")).convert("RGB").quantize(64).save(readme_shot, optimize=True)
    assert tab.other_errors() == []


def test_too_large_image_is_refused_in_the_page(browser, tight_server, tmp_path):
    tab = Tab(browser, tight_server.url, tmp_path)
    try:
        tab.page.set_input_files("#file-input", str(noise_png(tmp_path, "big.png", 48)))
        tab.page.locator("#notice", has_text="big.png is").wait_for()
        assert "over the server's limit of 4096 bytes (MAX_IMAGE_BYTES)" in tab.page.inner_text("#notice")
        assert tab.page.locator("#attachments .thumb").count() == 0
        tab.page.set_input_files("#file-input", str(png_file(tmp_path)))
        tab.page.locator("#attachments .thumb").wait_for()
        assert tab.other_errors() == []
    finally:
        tab.close()


def test_api_key_is_asked_for_then_sent(browser, long_demo_dir, tmp_path):
    with demo_server(long_demo_dir, API_KEY=API_KEY, ALLOWED_ORIGINS="http://127.0.0.1:*") as srv:
        api_key_is_asked_for_then_sent(browser, srv, tmp_path)


def api_key_is_asked_for_then_sent(browser, srv: LiveServer, tmp_path: Path) -> None:
    for path in ("/", "/static/app.js", "/static/app.css", "/health"):  # the page loads without the key
        assert requests.get(srv.url + path, timeout=10).status_code == 200, path
    assert requests.get(srv.url + "/v1/models", timeout=10).status_code == 401
    tab = Tab(browser, srv.url, tmp_path)
    try:
        page = tab.page
        tab.settings(max_tokens=8, min_tokens=8)
        tab.say("안녕하세요")
        page.locator(".message.error", has_text="This server needs an API key").wait_for()
        assert page.is_visible("#key-form")
        page.fill("#api-key", "wrong-key")
        page.keyboard.press("Enter")
        page.locator(".message.error", has_text="The API key was refused").wait_for()
        page.fill("#api-key", API_KEY)
        page.click("#key-form button")
        assert tab.wait_answer_done().startswith("first token")
        assert page.is_hidden("#key-form")
        assert [r.headers.get("authorization") for r in tab.requests] == [None, "Bearer wrong-key", f"Bearer {API_KEY}"]
        assert page.evaluate("sessionStorage.getItem('hcx-api-key')") == API_KEY
        # the failed tries left no trace: one question, one answer
        assert page.locator(".message.user").count() == 1 and page.locator(".message.assistant").count() == 1
        assert len({str(b["messages"]) for b in tab.bodies}) == 1
        tab.shot("api-key")
        assert tab.other_errors() == []
    finally:
        tab.close()
    # the same page opened as localhost, an origin this server does not allow: told what to do
    tab = Tab(browser, srv.url.replace("127.0.0.1", "localhost"), tmp_path)
    try:
        tab.say("hello")
        error = tab.page.locator(".message.error .body")
        error.wait_for()
        origin = srv.url.replace("127.0.0.1", "localhost")
        assert error.inner_text() == (f"Error 403: origin '{origin}' is not allowed. Add this page's origin, "
                                      f"{origin}, to ALLOWED_ORIGINS.")
    finally:
        tab.close()


def test_server_errors_are_shown_with_their_text(tab, page_server):
    tab.settings(max_tokens=9000)  # over MAX_TOKENS_CAP=8000
    tab.say("hello")
    error = tab.page.locator(".message.error")
    error.wait_for()
    sent = {k: v for k, v in tab.bodies[0].items() if k not in ("stream", "stream_options")}
    answer = requests.post(page_server.url + "/v1/chat/completions", json=sent, timeout=30)
    assert answer.status_code == 400
    assert error.locator(".body").inner_text() == f"Error 400: {answer.json()['error']['message']}"
    assert error.locator("button.retry").is_visible() and tab.page.is_enabled("#send")
    assert tab.other_errors() == []


def test_busy_server_says_retry(browser, tight_server, tmp_path):
    """One request generating, one waiting (MAX_QUEUE=1): the page's request gets the 503, and
    Retry works once the server is free."""
    srv = tight_server
    stop, statuses = threading.Event(), []

    def hold() -> None:
        body = {"messages": [{"role": "user", "content": "long"}], "max_tokens": LONG, "min_tokens": LONG,
                "stream": True}
        with requests.post(srv.url + "/v1/chat/completions", json=body, stream=True, timeout=60) as resp:
            statuses.append(resp.status_code)
            for _ in resp.iter_content(chunk_size=None):
                if stop.is_set():
                    break

    def metric(name: str) -> int:
        text = requests.get(srv.url + "/metrics", timeout=10).text
        return int(re.search(rf"^{name} (\d+)$", text, re.M).group(1))

    holders = [threading.Thread(target=hold, daemon=True) for _ in range(2)]
    tab = Tab(browser, srv.url, tmp_path)
    try:
        holders[0].start()
        wait_until(lambda: metric("hcx_generating") == 1, 30, "the first request to generate")
        holders[1].start()
        wait_until(lambda: metric("hcx_queue_depth") == 1, 30, "the second request to wait")
        tab.settings(max_tokens=8, min_tokens=8)
        tab.say("지금 바쁜가요?")
        error = tab.page.locator(".message.error")
        error.wait_for()
        assert re.fullmatch(r"The server is busy, retry in a moment \(server busy: .+\)\.", error.locator(".body").inner_text())
        assert metric("hcx_generating") == 1  # still held: the page really met the full queue
        tab.shot("busy")
    finally:
        stop.set()
        for holder in holders:
            if holder.is_alive():
                holder.join(30)
    assert statuses == [200, 200]
    try:
        wait_until(lambda: metric("hcx_generating") == 0 and metric("hcx_queue_depth") == 0, 30, "the server to be free")
        tab.page.click(".message.error button.retry")
        assert tab.wait_answer_done().startswith("first token")
        assert tab.page.locator(".message.error").count() == 0
        assert tab.other_errors() == []
    finally:
        tab.close()
