"""hcx-cli: run HyperCLOVA X SEED Vision locally (no server), or start the server.

Every command calls the same functions as the HTTP routes (server.prompt_request,
server.stream, server.generate), so the terminal and the API answer alike.
"""

from __future__ import annotations

import dataclasses
import io
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


def start_engine(cfg: server.Config) -> server.Engine:
    """Load the model in this process; a load failure is one clear line and exit 1."""
    if cfg.demo:
        click.echo("note: DEMO MODE, a tiny random-weight model; answers are gibberish", err=True)
    try:
        return server.Engine(cfg).start(wait=True)
    except server.ModelLoadError as exc:
        fail(str(exc), code=1)


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
    except server.GenerationError as exc:
        fail(str(exc), code=1)


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
@click.pass_obj
def describe(cfg: server.Config, images, prompt, stream, as_json, **sampling):
    """Describe IMAGE(s) locally, no server. '-' reads an image from stdin."""
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
@click.pass_obj
def ask(cfg: server.Config, prompt, stream, as_json, **sampling):
    """Ask a text-only PROMPT locally, no server."""
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

    The model loads in the background so `initialize` is answered at once; tool calls wait
    for it. Tool calls run on their own thread so `notifications/cancelled` can stop them.
    """
    protocol_out = sys.stdout
    sys.stdout = sys.stderr  # anything a library prints must not corrupt the protocol stream
    handler = server.McpServer(server.Engine(cfg).start(), stdio=True)
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


@main.command()
@click.option("--max-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.pass_obj
def selfcheck(cfg: server.Config, max_tokens):
    """Load the model, answer one image prompt, print load time, TTFT and tokens/s."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (378, 378), "white")
    ImageDraw.Draw(image).rectangle((80, 80, 300, 300), fill="red")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    started = time.perf_counter()
    engine = start_engine(cfg)
    load_s = time.perf_counter() - started
    req = build_request(cfg, "What shape and colour is in this image?", [server.open_image(buf.getvalue(), cfg)],
                        max_tokens=max_tokens, seed=0)
    c = answer(engine, req, streaming=False)
    m = engine.model
    decode_s = max(c.total_s - c.ttft_s, 1e-9)
    click.echo(f"model: {m.name} ({m.kind}) from {m.path}")
    click.echo(f"device: {m.device}  dtype: {str(m.dtype).replace('torch.', '')}")
    click.echo(f"answer: {c.text!r}")
    click.echo(f"load_s={load_s:.2f} ttft_s={c.ttft_s:.3f} prompt_tokens={c.prompt_tokens} "
               f"completion_tokens={c.completion_tokens} "
               f"decode_tok_s={(max(c.completion_tokens - 1, 0)) / decode_s:.1f}")
    if c.completion_tokens < 1:
        fail("the model produced no tokens", code=1)


def _register_bench() -> None:
    """`hcx-cli bench` lives in benchmarks/bench.py (it is most of the code, and only the bench needs it)."""
    from benchmarks.bench import bench

    main.add_command(bench)


_register_bench()


if __name__ == "__main__":
    main()
