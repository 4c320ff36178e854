"""hcx-cli: run HyperCLOVA X SEED Vision locally (no server), or start the server.

Every command calls the same functions as the HTTP routes (server.prompt_request,
server.stream, server.generate), so the terminal and the API answer alike. With BACKEND=openai,
or `describe`/`ask --url URL`, the same functions send the request to OpenAI-compatible
servers (server.UpstreamPool) instead of loading the model here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import threading
import time
from pathlib import Path

import click

import server

EXIT_BAD_INPUT = 2


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model-path", envvar=None, default=None, help="Model folder or hub id (overrides MODEL_PATH).")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (overrides DEVICE).")
@click.option("--dtype", default=None, help="auto, bfloat16, float16 or float32 (overrides DTYPE).")
@click.option("--weights", default=None, help="auto or int8: weight-only int8 decoder on CPUs (overrides WEIGHTS).")
@click.option("--demo", is_flag=True, help="Use a tiny random-weight demo model (no download; gibberish answers).")
@click.option("-v", "--verbose", is_flag=True, help="Log loading and generation details to stderr.")
@click.version_option(server.__version__, prog_name="hcx-cli")
@click.pass_context
def main(ctx: click.Context, model_path, device, dtype, weights, demo, verbose) -> None:
    """Local inference and server for HyperCLOVA X SEED Vision Instruct 3B."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = server.environment()
    env.update({key: value for key, value in (("MODEL_PATH", model_path), ("DEVICE", device), ("DTYPE", dtype),
                                              ("WEIGHTS", weights), ("DEMO", "1" if demo else None)) if value})
    try:
        ctx.obj = server.load_config(env)
    except server.ConfigError as exc:
        fail(str(exc))


def start_engine(cfg: server.Config) -> server.Engine | server.UpstreamPool:
    """Load the model in this process (or, with BACKEND=openai, reach the upstreams); a failure is one
    clear line and exit 1."""
    if cfg.demo and cfg.backend == "local":
        click.echo("note: DEMO MODE, a tiny random-weight model; answers are gibberish", err=True)
    try:
        return server.make_engine(cfg).start(wait=True)
    except server.ModelLoadError as exc:
        fail(str(exc), code=1)


def remote_config(cfg: server.Config, url: str | None, api_key: str | None) -> server.Config:
    """--url URL: the server there (hcx-server or any OpenAI-compatible one, with or without /v1)
    answers through its /v1/chat/completions instead of a model loaded here."""
    if url is None:
        return cfg
    try:
        base = server.upstream_base_url(url, "--url", append_v1=True)
    except server.ConfigError as exc:
        fail(str(exc))
    return dataclasses.replace(cfg, backend="openai", upstream_urls=(base,),
                               upstream_api_key=api_key or cfg.upstream_api_key)


def read_image(path: str, cfg: server.Config):
    """A file path or '-' (stdin) -> RGB image, with the same checks as the API."""
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}")
    try:
        return server.open_image(raw, cfg, param="stdin" if path == "-" else path)
    except server.InputError as exc:
        fail(f"{path}: {exc.message}" + (f" ({exc.detail})" if exc.detail != exc.message else ""))


def answer(engine: server.Engine, req: server.GenerationRequest, streaming: bool) -> server.Completion:
    """Print one answer (streamed piece by piece or at once) and return its completion."""
    try:
        if not streaming:
            return server.generate(engine, req)
        pieces = server.stream(engine, req)
        text = []
        for piece in pieces:
            text.append(piece)
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
        return dataclasses.replace(pieces.completion, text="".join(text))
    except server.InputError as exc:
        fail(exc.message)
    except (server.GenerationError, server.Busy, server.ModelNotReady) as exc:
        fail(str(exc), code=1)


def remote_options(f):
    for option in reversed([
        click.option("--url", default=None, metavar="URL",
                     help="Ask the server at URL (hcx-server or any OpenAI-compatible one, e.g. "
                          "http://127.0.0.1:8000 or .../v1) instead of loading the model here."),
        click.option("--api-key", default=None, help="Bearer key for --url (default: UPSTREAM_API_KEY)."),
    ]):
        f = option(f)
    return f


def sampling_options(f):
    for option in reversed([
        click.option("--max-tokens", type=click.IntRange(1), default=None, help="Most new tokens per answer."),
        click.option("--temperature", type=click.FloatRange(0, 2), default=None, help="0 = greedy."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None),
        click.option("--seed", type=int, default=None, help="Fix sampling for reproducible answers."),
        click.option("--min-tokens", type=click.IntRange(0), default=None, help="Generate at least this many."),
    ]):
        f = option(f)
    return f


def request_body(prompt: str, **sampling) -> dict:
    """The same body the seed route takes, so the CLI validates and answers like the server."""
    return {"prompt": prompt, **{k: v for k, v in sampling.items() if v is not None}}


def build_request(cfg: server.Config, prompt: str, images=(), **sampling) -> server.GenerationRequest:
    """The seed route's parser on that body, with the (already checked) images attached."""
    try:
        req = server.prompt_request(request_body(prompt, **sampling), cfg)
    except server.InputError as exc:
        fail(exc.message)
    req.messages[-1].images = list(images)
    return req


def completion_json(c: server.Completion, **extra) -> str:
    return json.dumps({**extra, "result": c.text, "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                       "completion_tokens": c.completion_tokens}, ensure_ascii=False)


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--prompt", default="Describe this image.", show_default=True)
@click.option("--stream/--no-stream", default=True, show_default=True, help="Print tokens as they arrive.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image (for scripts).")
@sampling_options
@remote_options
@click.pass_obj
def describe(cfg: server.Config, images, prompt, stream, as_json, url, api_key, **sampling):
    """Describe IMAGE(s) locally, no server (or with --url URL, by that server). '-' reads an image
    from stdin."""
    cfg = remote_config(cfg, url, api_key)
    # every image and option is checked before the slow load
    requests = [(path, build_request(cfg, prompt, [read_image(path, cfg)], **sampling)) for path in images]
    engine = start_engine(cfg)
    for path, req in requests:
        if as_json:
            click.echo(completion_json(answer(engine, req, streaming=False), image=path))
            continue
        if len(requests) > 1:
            click.echo(f"== {path}")
        c = answer(engine, req, streaming=stream)
        if not stream:
            click.echo(c.text)


@main.command()
@click.argument("prompt")
@click.option("--stream/--no-stream", default=True, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
@sampling_options
@remote_options
@click.pass_obj
def ask(cfg: server.Config, prompt, stream, as_json, url, api_key, **sampling):
    """Ask a text-only PROMPT locally, no server (or with --url URL, that server)."""
    cfg = remote_config(cfg, url, api_key)
    req = build_request(cfg, prompt, **sampling)
    engine = start_engine(cfg)
    c = answer(engine, req, streaming=stream and not as_json)
    if as_json:
        click.echo(completion_json(c))
    elif not stream:
        click.echo(c.text)


@main.command()
@click.option("--host", default=None, help="Bind address (default HOST or 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port (default PORT or 8000).")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="gunicorn threads (default MAX_QUEUE + 4).")
@click.option("--demo", is_flag=True, help="Serve a tiny random-weight demo model (no download; gibberish answers).")
@click.pass_obj
def serve(cfg: server.Config, host, port, threads, demo):
    """Start the HTTP server: gunicorn, one gthread worker."""
    overrides = {k: v for k, v in {"host": host, "port": port, "threads": threads, "demo": demo or None}.items()
                 if v is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    if cfg.demo:
        click.echo("note: DEMO MODE, serving a tiny random-weight model; answers are gibberish", err=True)
    server.serve(cfg)


@main.command()
@click.pass_obj
def mcp(cfg: server.Config):
    """Serve MCP over stdio (newline-delimited JSON-RPC); logs go to stderr.

    The model loads in the background so `initialize` (or 2026-07-28's `server/discover`) is
    answered at once; tool calls wait for it. Tool calls run on their own thread so `notifications/cancelled` can stop them.
    """
    protocol_out = sys.stdout
    sys.stdout = sys.stderr  # anything a library prints must not corrupt the protocol stream
    handler = server.McpServer(server.make_engine(cfg).start(), stdio=True)
    write_lock = threading.Lock()

    def send(message: dict) -> None:
        with write_lock:
            protocol_out.write(json.dumps(message, ensure_ascii=False) + "\n")
            protocol_out.flush()

    def run(message) -> None:
        for reply in handler.handle(message, progress=True):
            send(reply)

    workers = []
    for raw in sys.stdin.buffer:
        if not raw.strip():
            continue
        try:
            message = server.parse_json(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            send(server.jsonrpc_error(None, -32700, f"parse error: {exc}"))
            continue
        for item in message if isinstance(message, list) and message else [message]:
            if isinstance(item, dict) and item.get("method") == "tools/call":
                worker = threading.Thread(target=run, args=(item,), daemon=True)
                worker.start()
                workers.append(worker)
            else:
                run(item)
        workers = [w for w in workers if w.is_alive()]
    for worker in workers:  # stdin closed: let answers in progress finish
        worker.join(timeout=300)


@main.command()
@click.pass_obj
def download(cfg: server.Config):
    """Download the model into the cache (or MODEL_PATH) with progress, without loading it."""
    try:
        folder = server.locate_model(cfg)
    except server.ModelLoadError as exc:
        fail(str(exc), code=1)
    click.echo(f"model ready in {folder}")


# -- selfcheck: a known-answer test for the weights a user holds ------------------------------
# Images the model must read: drawn here (no files, no network), graded by what the answer must
# contain. On random weights (--demo) the same code runs and the grading is skipped.

COLOUR_RED = ("red", "빨간", "빨강", "붉은", "적색", "레드")


@dataclasses.dataclass(frozen=True)
class KnownAnswer:
    name: str
    prompt: str
    image: str  # "digits", "circle" or "word"
    expected: tuple[str, ...]  # the answer must contain one of these (digits: the digit sequence)
    digits: bool = False


KNOWN_ANSWERS = (
    KnownAnswer("digits-en", "What number is written in this image? Answer with the digits only.", "digits",
                ("274",), digits=True),
    KnownAnswer("digits-ko", "이 이미지에 적힌 숫자를 읽어 주세요. 숫자만 답하세요.", "digits", ("274",), digits=True),
    KnownAnswer("colour-en", "What colour is the shape in this image? Answer in one word.", "circle", COLOUR_RED),
    KnownAnswer("colour-ko", "이 그림 속 도형은 무슨 색인가요? 한 단어로 답하세요.", "circle", COLOUR_RED),
    KnownAnswer("word-ko", "이 이미지에 적힌 한국어 단어를 그대로 읽어 주세요.", "word", ("나무",)),
)


def grade(case: KnownAnswer, answer: str) -> bool:
    """Does the answer contain what the image shows? Digits are compared as a digit sequence
    ("2, 7, 4" reads as 274), words and colours case-insensitively."""
    if case.digits:
        found = "".join(ch for ch in answer if ch.isascii() and ch.isdigit())
        return any(want in found for want in case.expected)
    text = answer.lower()
    return any(want.lower() in text for want in case.expected)


def hangul_font(size: int):
    """A system font with Hangul glyphs (Linux, macOS, Windows), or None."""
    from PIL import ImageFont

    candidates = ("/usr/share/fonts/truetype/nanum/NanumGothicBold.ttf", "/usr/share/fonts/truetype/nanum/NanumGothic.ttf",
                  "/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc", "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
                  "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc", "/usr/share/fonts/truetype/unfonts-core/UnDotum.ttf",
                  "/System/Library/Fonts/AppleSDGothicNeo.ttc", "/Library/Fonts/AppleGothic.ttf",
                  "C:/Windows/Fonts/malgunbd.ttf", "C:/Windows/Fonts/malgun.ttf")
    for path in candidates:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    return None


def draw_known_image(kind: str):
    """The three pictures: large digits "2 7 4", a red circle, the Korean word 나무 (tree); black on white."""
    from PIL import Image, ImageDraw, ImageFont, features

    if kind == "circle":
        image = Image.new("RGB", (378, 378), "white")
        ImageDraw.Draw(image).ellipse((64, 64, 314, 314), fill=(220, 20, 20))
        return image
    image = Image.new("RGB", (756, 378), "white")
    draw = ImageDraw.Draw(image)
    if kind == "digits":
        if features.check("freetype2"):
            draw.text((378, 189), "2 7 4", fill="black", anchor="mm", font=ImageFont.load_default(size=200))
        else:
            draw_segments(draw, "274")
        return image
    font = hangul_font(200)
    if font is not None:
        draw.text((378, 189), "나무", fill="black", anchor="mm", font=font)
    else:
        draw_namu(draw)
    return image


def draw_segments(draw, digits: str) -> None:
    """Seven-segment digits, for a Pillow without FreeType."""
    segments = {"2": "abged", "7": "abc", "4": "fgbc"}
    boxes = {"a": (0, 0, 120, 24), "b": (96, 0, 120, 130), "c": (96, 106, 120, 236), "d": (0, 212, 120, 236),
             "e": (0, 106, 24, 236), "f": (0, 0, 24, 130), "g": (0, 106, 120, 130)}
    for i, digit in enumerate(digits):
        x0, y0 = 150 + i * 180, 70
        for seg in segments[digit]:
            l, t, r, b = boxes[seg]
            draw.rectangle((x0 + l, y0 + t, x0 + r, y0 + b), fill="black")


def draw_namu(draw) -> None:
    """나무 in thick straight strokes (every jamo of it is straight), where no Hangul font exists."""
    w = 26
    for box in ((150, 90, 150 + w, 290), (150, 264, 300, 290),  # ㄴ
                (330, 70, 330 + w, 310), (330, 176, 390, 176 + w),  # ㅏ
                (440, 70, 620, 70 + w), (440, 70, 440 + w, 190), (594, 70, 620, 190), (440, 164, 620, 190),  # ㅁ
                (420, 230, 640, 230 + w), (517, 230, 517 + w, 320)):  # ㅜ
        draw.rectangle(box, fill="black")


@main.command()
@click.option("--max-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.pass_obj
def selfcheck(cfg: server.Config, max_tokens):
    """Known-answer test of the loaded weights (run it first after a download): reads drawn digits,
    a colour and a Korean word; checks our decode loop against model.generate; prints PASS/FAIL,
    load time, time to first token and tokens/s; exits 1 on any FAIL."""
    started = time.perf_counter()
    engine = start_engine(cfg)
    load_s = time.perf_counter() - started
    m = engine.model
    click.echo(f"model: {m.name} ({m.interface}, revision {m.revision or 'unknown'}) from {m.path}")
    click.echo(f"device: {m.device}  dtype: {str(m.dtype).replace('torch.', '')}  backend: {m.generation_backend}")
    if m.demo:
        click.echo("note: DEMO MODE (random weights): the known-answer checks are skipped, answers shown only")
    failed, first = 0, None
    for case in KNOWN_ANSWERS:
        image = draw_known_image(case.image)
        c = answer(engine, build_request(cfg, case.prompt, [image], max_tokens=max_tokens, temperature=0), False)
        first = first or c
        verdict = "SKIP" if m.demo else ("PASS" if grade(case, c.text) else "FAIL")
        failed += verdict == "FAIL"
        click.echo(f"[{verdict}] {case.name}: expected {' / '.join(case.expected)}; answer {c.text.strip()!r}")
    decode_s = max(first.total_s - first.ttft_s, 1e-9)
    click.echo(f"load_s={load_s:.2f} ttft_s={first.ttft_s:.3f} prompt_tokens={first.prompt_tokens} "
               f"completion_tokens={first.completion_tokens} "
               f"decode_tok_s={(max(first.completion_tokens - 1, 0)) / decode_s:.1f}")
    for label, images in (("text-only", []), ("with an image", [draw_known_image("digits")])):
        req = build_request(cfg, KNOWN_ANSWERS[0].prompt if images else "Write one sentence about Seoul.", images,
                            max_tokens=max_tokens, temperature=0)
        ok, verdict = server.compare_with_hf(m, req)
        failed += not ok
        click.echo(f"[{'PASS' if ok else 'FAIL'}] decode loop vs model.generate, greedy, {label}: {verdict}")
    if first.completion_tokens < 1:
        fail("the model produced no tokens", code=1)
    click.echo(f"selfcheck: {'FAIL' if failed else 'PASS'}")
    if failed:
        sys.exit(1)


def _register_bench() -> None:
    """`hcx-cli bench` lives in benchmarks/bench.py (it is most of the code, and only the bench needs it)."""
    from benchmarks.bench import bench

    main.add_command(bench)


_register_bench()


if __name__ == "__main__":
    main()
