"""`hcx-cli bench`: every speed claim of hcx-server, measured side by side in one run.

Variants are interleaved (the order rotates every repetition), repeated, and the median is
reported. cli.py registers the `bench` command defined here; nothing else imports this module.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from pathlib import Path

import click

import server

# `hcx-cli bench` (issue 7). Everything is measured side by side in one run: variants are
# interleaved (the order rotates every repetition), repeated, and the median is reported.
#   1. server overhead on the tiny demo model: in-process server.generate vs every HTTP route
#      of a real `hcx-cli serve` subprocess (seed, seed stream, OpenAI, OpenAI stream, MCP);
#   2. streaming: first chunk vs in-process first piece, chunk cadence vs in-process cadence;
#   3. --full: a random-weight model with HCX-like shapes (built once, cached on disk), loaded
#      by server.load_model in fresh subprocesses: load time, peak RSS, prefill, decode tokens/s
#      per backend and thread count, against the memory bandwidth measured in the same process.
# Plain http.client only (the official MCP/OpenAI clients are test-only dependencies). The
# output ends with ONE line `overhead_ratio=<x> stream_overhead_ratio=<y>` for scripts; the
# bench's own correctness checks (same tokens everywhere) print `checks: ok` or exit 1.

BENCH_PROMPT = "Describe the image in one sentence."
BENCH_ROUTES = ("in-process generate", "HTTP seed", "HTTP seed stream", "OpenAI chat", "OpenAI chat stream",
                "MCP tools/call")
BENCH_STREAM_ROUTES = ("HTTP seed stream", "OpenAI chat stream")
# settings a developer's shell or .env must not leak into the bench server
BENCH_CLEARED_KEYS = ("MODEL_PATH", "MODEL_ID", "MODEL_REVISION", "DEVICE", "DTYPE", "VISION_DTYPE", "HOST", "PORT",
                      "THREADS", "MAX_QUEUE", "MAX_NEW_TOKENS", "MAX_TOKENS_CAP", "SYSTEM_PROMPT", "API_KEY",
                      "ALLOWED_ORIGINS", "DEMO", "DEMO_MODEL_DIR", "LOG_PROMPTS", "MAX_MODEL_LEN", "TORCH_THREADS",
                      "GENERATION_BACKEND")
# HCX-like shapes (hcx-model.md: 3.2 B decoder + 0.43 B SigLIP vision, 378-px grids of 81 tokens).
# The decoder shapes are assumed (no config of the real model is reachable from here).
FULL_TEXT = dict(hidden_size=3072, intermediate_size=7168, num_hidden_layers=32, num_attention_heads=24,
                 num_key_value_heads=8, vocab_size=110592, max_position_embeddings=16384, tie_word_embeddings=True)
FULL_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   image_size=378, patch_size=14)
FULL_LAYOUT_VERSION = 1


def _median(values) -> float:
    import statistics

    return statistics.median(values) if values else float("nan")


def _rotated(items: list, rep: int) -> list:
    k = rep % len(items)
    return items[k:] + items[:k]


def _png_b64(size=(64, 48)) -> str:
    import base64

    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).rectangle((size[0] // 5, size[1] // 5, size[0] * 4 // 5, size[1] * 4 // 5), fill="red")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class _BenchServer:
    """A real `hcx-cli serve` on a free loopback port, in its own session and scratch folder."""

    def __init__(self, env: dict[str, str]):
        import os
        import tempfile

        self.workdir = Path(tempfile.mkdtemp(prefix="hcx-bench-server-"))
        self.log_path = self.workdir / "server.log"
        base = {k: v for k, v in os.environ.items() if k not in BENCH_CLEARED_KEYS}
        self.env = {**base, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **env}
        self.proc = None
        self.port = 0

    def start(self, timeout: float = 180) -> "_BenchServer":
        import socket
        import subprocess

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [sys.executable, "-c", "import cli; cli.main()", "serve", "--host", "127.0.0.1", "--port",
                   str(self.port)]
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(command, env=self.env, cwd=self.workdir, stdout=log_file,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                status, _ = _http_get(self.port, "/health")
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
        self.stop()
        raise click.ClickException(f"the bench server did not become healthy; its log:\n{tail}")

    def stop(self) -> None:
        import os
        import signal
        import subprocess

        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(wait)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        self.proc = None


def _http_get(port: int, path: str) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class _KeepAlive:
    """One keep-alive HTTP/1.1 connection (TCP_NODELAY) per route; reconnects if the server closed it."""

    def __init__(self, port: int):
        self.port = port
        self.conn = None
        self.retries = 0

    def _connect(self):
        import http.client
        import socket

        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def post(self, path: str, body: dict, headers: dict | None = None):
        """POST JSON; returns (status, headers, [(seconds since send, bytes)], total seconds)."""
        import http.client

        payload = json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        for attempt in (0, 1):
            if self.conn is None:
                self._connect()
            started = time.perf_counter()
            try:
                self.conn.request("POST", path, body=payload, headers=all_headers)
                resp = self.conn.getresponse()
                chunks = []
                while True:
                    data = resp.read1(65536)
                    if not data:
                        break
                    chunks.append((time.perf_counter() - started, data))
                total = time.perf_counter() - started
                resp.read()  # read1() never marks a Content-Length body done; read() does (else: ResponseNotReady)
                if resp.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return resp.status, dict(resp.getheaders()), chunks, total
            except (http.client.HTTPException, ConnectionError, BrokenPipeError):
                self.conn.close()
                self.conn = None
                self.retries += 1  # the server may have run the first attempt: reported with the table
                if attempt:
                    raise
        raise AssertionError("unreachable")


def _sse_text(chunks) -> tuple[str, list[float]]:
    """OpenAI SSE: the joined content deltas and the arrival time of each non-empty delta."""
    text, times, buffer = [], [], b""
    for at, data in chunks:
        buffer += data  # bytes: a UTF-8 character may span two reads
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.decode("utf-8").splitlines():
                if line.startswith("data: ") and line[6:] != "[DONE]":
                    payload = json.loads(line[6:])
                    for choice in payload.get("choices", []):
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            text.append(piece)
                            times.append(at)
    return "".join(text), times


def _tiny_bodies(name: str, image_b64: str, tokens: int) -> dict:
    sampling = {"max_tokens": tokens, "min_tokens": tokens, "temperature": 0, "seed": 0}
    seed = {"prompt": BENCH_PROMPT, "image_base64": image_b64, **sampling}
    openai = {"model": name, **sampling, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image_b64}"}},
        {"type": "text", "text": BENCH_PROMPT}]}]}
    mcp = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
           "params": {"name": server.TOOL_NAME, "arguments": seed}}
    return {"seed": seed, "openai": openai, "mcp": mcp}


def _run_inprocess(engine, body: dict, streaming: bool) -> dict:
    started = time.perf_counter()
    req = server.prompt_request(body, engine.cfg)
    if not streaming:
        completion = server.generate(engine, req)
        return {"total": time.perf_counter() - started, "text": completion.text, "tokens": completion.completion_tokens}
    pieces, times = [], []
    text_stream = server.stream(engine, req)
    for piece in text_stream:
        pieces.append(piece)
        times.append(time.perf_counter() - started)
    return {"total": time.perf_counter() - started, "text": "".join(pieces), "times": times,
            "tokens": text_stream.completion.completion_tokens}


def _run_route(route: str, conns: dict, bodies: dict, mcp_headers: dict) -> dict:
    if route == "HTTP seed":
        status, _, chunks, total = conns[route].post("/tool/generate_hyperclovax_vision", bodies["seed"])
        return {"status": status, "total": total, "text": json.loads(b"".join(c for _, c in chunks))["result"]}
    if route == "HTTP seed stream":
        status, _, chunks, total = conns[route].post("/tool/generate_hyperclovax_vision_stream", bodies["seed"])
        return {"status": status, "total": total, "text": b"".join(c for _, c in chunks).decode("utf-8"),
                "times": [at for at, _ in chunks]}
    if route == "OpenAI chat":
        status, _, chunks, total = conns[route].post("/v1/chat/completions", bodies["openai"])
        reply = json.loads(b"".join(c for _, c in chunks))
        return {"status": status, "total": total, "text": reply["choices"][0]["message"]["content"]}
    if route == "OpenAI chat stream":
        status, _, chunks, total = conns[route].post("/v1/chat/completions", {**bodies["openai"], "stream": True})
        text, times = _sse_text(chunks)
        return {"status": status, "total": total, "text": text, "times": times}
    if route == "MCP tools/call":
        status, _, chunks, total = conns[route].post("/mcp", bodies["mcp"], mcp_headers)
        reply = json.loads(b"".join(c for _, c in chunks))
        return {"status": status, "total": total, "text": reply["result"]["content"][0]["text"]}
    raise ValueError(route)


def _mcp_session(port: int) -> dict:
    conn = _KeepAlive(port)
    headers = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-06-18"}
    status, reply_headers, _, _ = conn.post("/mcp", {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "hcx-bench", "version": "1"}}},
        headers)
    session = {k.lower(): v for k, v in reply_headers.items()}.get("mcp-session-id")
    if status != 200 or not session:
        raise click.ClickException(f"MCP initialize failed (HTTP {status})")
    headers["Mcp-Session-Id"] = session
    conn.post("/mcp", {"jsonrpc": "2.0", "method": "notifications/initialized"}, headers)
    return headers


def _cadence(times: list[float]) -> float:
    """Mean gap between the first and the last piece (robust to chunks merged in transit)."""
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")


def bench_tiny(cfg: server.Config, reps: int, tokens: int, threads: int) -> tuple[float, float, list[str]]:
    """Server overhead and streaming on the demo model; returns the two ratios and failed checks."""
    import os
    import tempfile

    failures: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="hcx-bench-demo-"))
    server.build_demo_model(folder)
    env = {"MODEL_PATH": str(folder), "DEVICE": cfg.device, "DTYPE": cfg.dtype, "VISION_DTYPE": cfg.vision_dtype,
           "TORCH_THREADS": str(threads), "GENERATION_BACKEND": cfg.generation_backend, "MAX_QUEUE": "8"}
    local_cfg = server.load_config(env)
    engine = server.Engine(local_cfg).start(wait=True)
    m = engine.model
    srv = _BenchServer(env).start()
    try:
        conns = {route: _KeepAlive(srv.port) for route in BENCH_ROUTES[1:]}
        mcp_headers = _mcp_session(srv.port)
        bodies = _tiny_bodies(local_cfg.served_model_name, _png_b64(), tokens)
        variants = [("in-process generate", False), ("in-process stream", True)] + [(r, None) for r in BENCH_ROUTES[1:]]
        results: dict[str, list[dict]] = {name: [] for name, _ in variants}
        for rep in range(reps + 2):  # two warm-up rounds, not recorded
            for name, streaming in _rotated(variants, rep):
                if streaming is None:
                    result = _run_route(name, conns, bodies, mcp_headers)
                else:
                    result = _run_inprocess(engine, bodies["seed"], streaming)
                if rep >= 2:
                    results[name].append(result)
    finally:
        srv.stop()
    reference = results["in-process generate"][0]
    if reference["tokens"] != tokens:
        failures.append(f"in-process generated {reference['tokens']} tokens, not min_new_tokens={tokens}")
    for name, runs in results.items():
        for run in runs:
            if run.get("status", 200) != 200 or run["text"] != reference["text"]:
                failures.append(f"{name}: HTTP {run.get('status', 200)}, text differs from in-process generate")
                break
    base = _median([r["total"] for r in results["in-process generate"]])
    base_stream = results["in-process stream"]
    base_first = _median([r["times"][0] for r in base_stream if r["times"]])
    base_cadence = _median([_cadence(r["times"]) for r in base_stream])
    click.echo(f"== 1. server overhead: tiny demo model, {m.kind} path, {str(m.dtype).replace('torch.', '')}, "
               f"{m.generation_backend} generation, {tokens} tokens (min = max, greedy, seed 0), 64x48 image, "
               f"torch threads {threads}, {reps} reps interleaved, medians; load average "
               f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} ==")
    click.echo(f"{'route':24s} {'median ms':>10s} {'min ms':>8s} {'ratio':>7s} {'+ms':>7s}  goal <= 1.05x and <= 5 ms")
    worst = 0.0
    for name in BENCH_ROUTES:
        median = _median([r["total"] for r in results[name]])
        ratio, extra = median / base, (median - base) * 1000
        if name != BENCH_ROUTES[0]:
            worst = max(worst, ratio)
        met = "-" if name == BENCH_ROUTES[0] else ("met" if ratio <= 1.05 and extra <= 5 else "NOT met")
        click.echo(f"{name:24s} {median * 1000:10.1f} {min(r['total'] for r in results[name]) * 1000:8.1f} "
                   f"{ratio:7.3f} {extra:7.1f}  {met}")
    click.echo(f"\n== 2. streaming (in-process stream: first piece {base_first * 1000:.1f} ms after the call, "
               f"{_median([len(r['times']) for r in base_stream]):.0f} text pieces, cadence {base_cadence * 1000:.2f} "
               "ms/piece) ==")
    click.echo(f"{'route':24s} {'first chunk ms':>14s} {'- in-proc ms':>12s} {'cadence ms':>10s} {'ratio':>7s}")
    stream_worst = 0.0
    for name in BENCH_STREAM_ROUTES:
        first = _median([r["times"][0] for r in results[name] if r["times"]])
        cadence = _median([_cadence(r["times"]) for r in results[name]])
        stream_worst = max(stream_worst, cadence / base_cadence)
        click.echo(f"{name:24s} {first * 1000:14.1f} {(first - base_first) * 1000:12.1f} {cadence * 1000:10.2f} "
                   f"{cadence / base_cadence:7.3f}")
    retries = sum(conn.retries for conn in conns.values())
    if retries:
        click.echo(f"note: {retries} request(s) were re-sent after a dropped keep-alive connection")
    click.echo(f"checks: every route returned the in-process text ({tokens} tokens): "
               f"{'ok' if not failures else 'FAILED'}")
    return worst, stream_worst, failures


# -- --full: the random full-size model -------------------------------------------------------


def _full_model_dir(cache_dir: str | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "hcx-server" / "bench-full"


def _full_model_ready(folder: Path) -> bool:
    marker = folder / "hcx-bench-full.json"
    try:
        return json.loads(marker.read_text()).get("layout") == FULL_LAYOUT_VERSION
    except (OSError, ValueError):
        return False


def full_model_parts():
    """Tokenizer-carrying processor and config of the full-size random model (no weights)."""
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor, LlamaConfig

    tokenizer = server.build_demo_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<global-img>",
                                                                "<end_of_utterance>"]})
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 378}, max_image_size={"longest_edge": 378},
                                             do_image_splitting=False, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=81,
                                  chat_template=server.DEMO_CHAT_TEMPLATE)
    config = Idefics3Config(vision_config=FULL_VISION, scale_factor=3, tie_word_embeddings=True,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                            pad_token_id=tokenizer.pad_token_id,
                            text_config=LlamaConfig(**FULL_TEXT, pad_token_id=tokenizer.pad_token_id,
                                                    eos_token_id=tokenizer.eos_token_id))
    return processor, config


def build_full_model(folder: str | Path) -> Path:
    """A random Idefics3-architecture model (SigLIP 378 px + pixel-shuffle connector: 81 tokens per
    image, like the C-Abstractor's; Llama decoder) with HCX-like shapes, built in bf16 directly:
    meta-device construction, to_empty, in-place init, 1 GB shards (never an fp32 copy)."""
    import torch
    from transformers import GenerationConfig, Idefics3ForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    processor, config = full_model_parts()
    tokenizer = processor.tokenizer
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = Idefics3ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init is ~10x faster on a GPU
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:
                param.fill_(1.0)  # norm weights
            else:
                param.normal_(0.0, 0.02, generator=gen)
    model.tie_weights()
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>")],
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder, max_shard_size="1GB")
    processor.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    (folder / "hcx-bench-full.json").write_text(json.dumps({"layout": FULL_LAYOUT_VERSION, "params": params}))
    return folder


class _TimedQueue:
    """Stands in for Job.events: records when each token left the model."""

    def __init__(self):
        self.items: list[tuple[float, tuple]] = []

    def put(self, item) -> None:
        self.items.append((time.perf_counter(), item))


def _timed_generation(m, req, max_new: int) -> dict:
    """One generation through server.run_generation (the server's own code), timed per token."""
    started = time.perf_counter()
    inputs = server.build_inputs(m, req)
    job = server.Job(req, inputs, max_new)
    job.events = _TimedQueue()
    server.run_generation(m, job)
    times = [at for at, (kind, _) in job.events.items if kind == "token"]
    ids = [value for _, (kind, value) in job.events.items if kind == "token"]
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return {"ids": ids, "ttft": times[0] - started if times else float("nan"), "decode_tok_s": decode}


def _weight_bytes(model) -> tuple[int, int]:
    """(all weight bytes, bytes one decode step reads: decoder + lm_head, not vision/connector,
    not the input embedding unless it is the tied lm_head)."""
    seen, total, decode = set(), 0, 0
    skip = {id(p) for mod in server.vision_modules(model) for p in mod.parameters()}
    skip |= {id(p) for name, mod in model.named_modules() if name.endswith("connector") for p in mod.parameters()}
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embed is not head:
        skip.add(id(embed))
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        size = param.numel() * param.element_size()
        total += size
        decode += 0 if id(param) in skip else size
    return total, decode


def _bandwidth(device, gigabytes: float = 2.0) -> dict:
    """Large streaming reads: fp32 sum and an fp32 matrix-vector product over the same buffer (GB/s)."""
    import torch

    data = torch.empty(int(gigabytes * 1e9) // 4 // 4096 * 4096, dtype=torch.float32, device=device).uniform_()
    matrix = data.view(-1, 4096)
    vector = torch.ones(4096, device=device)
    out = {}
    for name, fn in (("sum", data.sum), ("gemv_f32", lambda: torch.mv(matrix, vector))):
        best = []
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best.append(data.numel() * 4 / (time.perf_counter() - started) / 1e9)
        out[name] = _median(best)
    return out  # the buffer is freed on return


def _greedy_logits(m, req, max_new: int):
    """Greedy ids (processed scores, as generate picks them) and raw logits per step."""
    import torch

    inputs = server.build_inputs(m, req)
    with torch.inference_mode():
        out = m.model.generate(**inputs.tensors, **server.sampling_kwargs(req, max_new),
                               eos_token_id=list(m.stop_token_ids), pad_token_id=m.pad_token_id,
                               output_scores=True, output_logits=True, return_dict_in_generate=True)
    return ([int(s[0].argmax()) for s in out.scores], [s[0].float() for s in out.scores],
            [s[0].float() for s in out.logits])


def _use_backend(m, backend: str, loaded: str) -> None:
    """Switch between eager and the backend prepared at load, in place."""
    if loaded == "gemv":
        server.use_gemv_linears(m.model, backend == "gemv")
    elif loaded == "static":
        m.generation_backend = backend  # server.static_cache_kwargs reads it per request


def _teacher_forced_check(m, req, eager_ids: list[int], other_ids: list[int]) -> tuple[bool, str]:
    """Where greedy ids first differ, one eager forward over prompt + shared prefix: the other
    backend's pick must be a near-tie there (within 2 % of the logit scale)."""
    import torch

    step = next(i for i, (x, y) in enumerate(zip(eager_ids, other_ids)) if x != y)
    inputs = server.build_inputs(m, req).tensors
    prefix = torch.tensor([eager_ids[:step]], dtype=inputs["input_ids"].dtype, device=m.device)
    ids = torch.cat([inputs["input_ids"], prefix], dim=1)
    with torch.inference_mode():
        logits = m.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float()
    margin = float(logits[eager_ids[step]] - logits[other_ids[step]])
    scale = float(logits.abs().max())
    ok = margin <= 0.02 * scale
    return ok, (f"{'ok' if ok else 'FAILED'}: identical {step}/{len(eager_ids)} greedy tokens, then "
                f"{'a near-tie' if ok else 'NOT a near-tie'} (eager margin {margin:.4f} at logit scale {scale:.2f})")


def _logit_check(m, req, max_new: int, threads: int, other_threads: int | None) -> tuple[bool, str]:
    """eager vs gemv at the same thread count: identical greedy ids, or the first difference is a
    near-tie (eager's margin between the two picks is within the backends' logit difference there);
    and the first-step logits differ no more than eager's own do between thread counts (x3)."""
    import torch

    torch.set_num_threads(threads)
    server.use_gemv_linears(m.model, False)
    a, sa, la = _greedy_logits(m, req, max_new)
    server.use_gemv_linears(m.model, True)
    b, _, lb = _greedy_logits(m, req, max_new)
    scale = float(la[0].abs().max())
    step0 = float((la[0] - lb[0]).abs().max())
    noise = None
    if other_threads:
        torch.set_num_threads(other_threads)
        server.use_gemv_linears(m.model, False)
        noise = float((_greedy_logits(m, req, 1)[2][0] - la[0]).abs().max())
        server.use_gemv_linears(m.model, True)
        torch.set_num_threads(threads)
    ok = noise is None or step0 <= 3 * noise + 1e-3 * scale
    text = (f"first-step logits: gemv vs eager differ by {step0:.4f} (logit scale {scale:.2f}"
            + (f"; eager {threads} vs {other_threads} threads: {noise:.4f})" if noise is not None else ")"))
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    if same == len(a):
        return ok, f"{'ok' if ok else 'FAILED'}: identical {same}/{len(a)} greedy tokens; {text}"
    margin = float(sa[same][a[same]] - sa[same][b[same]])
    diff = float((la[same] - lb[same]).abs().max())
    ok = ok and margin <= diff
    return ok, (f"{'ok' if ok else 'FAILED'}: identical {same}/{len(a)} greedy tokens, then "
                f"{'a near-tie' if margin <= diff else 'NOT a near-tie'} (eager margin {margin:.4f}, logit "
                f"difference {diff:.4f}); {text}")


def bench_full_child() -> None:
    """The --full measuring subprocess (one per dtype, so loads never share a process);
    argv[1] is a JSON job; the last stdout line is the JSON result."""
    import os
    import resource

    import torch
    from PIL import Image, ImageDraw

    job = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.INFO if job.get("verbose") else logging.WARNING, stream=sys.stderr)
    threads_max = max(job["threads"])
    cfg = server.load_config({"MODEL_PATH": job["path"], "DEVICE": job["device"], "DTYPE": job["dtype"],
                              "TORCH_THREADS": str(threads_max), "GENERATION_BACKEND": job["backend"]})
    started = time.perf_counter()
    m = server.load_model(cfg)
    load_s = time.perf_counter() - started
    image = Image.new("RGB", (378, 378), "white")
    ImageDraw.Draw(image).rectangle((80, 80, 300, 300), fill="red")

    def request(with_image: bool, tokens: int):
        req = server.prompt_request({"prompt": "What shape and colour is in this image?" if with_image else
                                     "Write a long story about a cat.", "max_tokens": tokens,
                                     "min_tokens": tokens, "temperature": 0}, cfg)
        if with_image:
            req.messages[-1].images = [image]
        return req

    first = _timed_generation(m, request(True, 2), 2)  # touches every weight once
    first_s = time.perf_counter() - started - load_s
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gpu_peak = torch.cuda.max_memory_allocated() if m.device.type == "cuda" else 0
    weights, decode_bytes = _weight_bytes(m.model)
    loaded = m.generation_backend
    backends = ["eager"] + ([loaded] if loaded != "eager" else [])
    variants = [(b, t) for t in job["threads"] for b in backends]
    prefill, decode, ids = [], {v: [] for v in variants}, {}
    bandwidth = {t: {"sum": [], "gemv_f32": []} for t in job["threads"]}
    for rep in range(job["reps"]):
        for threads in job["threads"]:
            torch.set_num_threads(threads)
            for key, value in _bandwidth(m.device).items():
                bandwidth[threads][key].append(value)
        torch.set_num_threads(threads_max)
        prefill.append(_timed_generation(m, request(True, 1), 1)["ttft"])
        for backend, threads in _rotated(variants, rep):
            torch.set_num_threads(threads)
            _use_backend(m, backend, loaded)
            run = _timed_generation(m, request(False, job["tokens"]), job["tokens"])
            decode[(backend, threads)].append(run["decode_tok_s"])
            ids.setdefault((backend, threads), run["ids"])
        _use_backend(m, loaded, loaded)
    notes, check_ok = [], True
    for threads in job["threads"]:  # same thread count: eager itself may differ between 1 and 2 threads
        torch.set_num_threads(threads)
        if loaded == "eager":
            continue
        if ids[(loaded, threads)] == ids[("eager", threads)]:
            notes.append(f"{threads} thread(s): {loaded} = eager, {len(ids[('eager', threads)])} greedy tokens "
                         "identical")
            continue
        others = [t for t in job["threads"] if t != threads]
        if loaded == "gemv":
            ok, verdict = _logit_check(m, request(False, job["tokens"]), job["tokens"], threads,
                                       others[0] if others else None)
        else:
            _use_backend(m, "eager", loaded)
            ok, verdict = _teacher_forced_check(m, request(False, job["tokens"]), ids[("eager", threads)],
                                                ids[(loaded, threads)])
            _use_backend(m, loaded, loaded)
        check_ok &= ok
        notes.append(f"{threads} thread(s): {verdict}")
    torch.set_num_threads(threads_max)
    if len({tuple(v) for (b, _), v in ids.items() if b == "eager"}) > 1:
        notes.append("(eager alone gives different greedy tokens at different thread counts: torch's own reduction "
                     "order)")
    check = "; ".join(notes) or "no second backend to compare"
    print(json.dumps({
        "dtype": str(m.dtype).replace("torch.", ""), "device": str(m.device), "backend_loaded": m.generation_backend,
        "attn": getattr(getattr(m.model, "config", None), "_attn_implementation", "?"),
        "load_s": load_s, "first_answer_s": first_s, "first_ids": len(first["ids"]), "rss_peak": rss_peak,
        "gpu_peak": gpu_peak, "weight_bytes": weights, "decode_bytes": decode_bytes,
        "prefill_s": _median(prefill), "prefill_all": prefill,
        "decode": {f"{b}/{t}": _median(v) for (b, t), v in decode.items()},
        "decode_all": {f"{b}/{t}": v for (b, t), v in decode.items()},
        "bandwidth": {str(t): {k: _median(v) for k, v in probes.items()} for t, probes in bandwidth.items()},
        "bandwidth_all": {str(t): probes for t, probes in bandwidth.items()}, "threads_max": threads_max,
        "check": check, "check_ok": check_ok, "load_avg": list(os.getloadavg()),
        "prompt_tokens": server.build_inputs(m, request(True, 1)).prompt_tokens,
    }))


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def bench_full(cfg: server.Config, cache_dir, reps: int, tokens: int, threads: list[int], dtypes: list[str],
               verbose: bool) -> list[str]:
    """Build (once) and measure the full-size random model, one fresh subprocess per dtype."""
    import os
    import subprocess

    import torch

    failures: list[str] = []
    folder = _full_model_dir(cache_dir)
    device = server.resolve_device(cfg)
    if not _full_model_ready(folder):
        click.echo(f"building the random full-size model once into {folder} (bf16, ~7.4 GB, a few minutes) ...",
                   err=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"from benchmarks import bench; bench.build_full_model({str(folder)!r})"], check=True)
        click.echo(f"built in {time.perf_counter() - started:.0f} s", err=True)
    params = json.loads((folder / "hcx-bench-full.json").read_text())["params"]
    if device.type == "cuda":
        threads = [max(threads)]
    env = {k: v for k, v in os.environ.items() if k not in BENCH_CLEARED_KEYS}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    results = []
    for dtype in dtypes:
        need = params * (4 if dtype == "float32" else 2) * 1.3
        if device.type == "cpu" and _mem_available() < need:
            click.echo(f"skipping {dtype}: {need / 1e9:.1f} GB needed, {_mem_available() / 1e9:.1f} GB available",
                       err=True)
            continue
        job = {"path": str(folder), "device": str(device), "dtype": dtype, "reps": reps, "tokens": tokens,
               "threads": threads if dtype == "bfloat16" else [max(threads)], "verbose": verbose,
               "backend": cfg.generation_backend}
        done = subprocess.run([sys.executable, "-c", "from benchmarks import bench; bench.bench_full_child()", json.dumps(job)],
                              env=env, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            failures.append(f"full-size {dtype} run failed (exit {done.returncode})")
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    cpu = _cpu_model()
    click.echo(f"\n== 3. full size: random model with HCX-like shapes, {params / 1e9:.2f} B params, {device} "
               f"({cpu}, {torch.get_num_threads()} threads max), torch {torch.__version__}, {reps} reps "
               f"interleaved, {tokens} decoded tokens, medians ==")
    for r in results:
        limits = {t: max(probes.values()) * 1e9 / r["decode_bytes"] for t, probes in r["bandwidth"].items()}
        limit = limits[str(r["threads_max"])]
        ratio = r["rss_peak"] / r["weight_bytes"]
        peak = (f"GPU peak {r['gpu_peak'] / 1e9:.2f} GB" if r["gpu_peak"] else
                f"peak RSS {r['rss_peak'] / 1e9:.2f} GB = {ratio:.2f}x weights (goal <= 1.15x)")
        click.echo(f"-- {r['dtype']} on {r['device']} ({r['attn']} attention, default backend {r['backend_loaded']}): "
                   f"weights {r['weight_bytes'] / 1e9:.2f} GB, decode reads {r['decode_bytes'] / 1e9:.2f} GB/token; "
                   f"load average {' '.join(f'{x:.1f}' for x in r['load_avg'])}")
        click.echo(f"   load {r['load_s']:.1f} s + first answer {r['first_answer_s']:.1f} s; {peak}")
        click.echo(f"   prefill, 378-px image + prompt ({r['prompt_tokens']} tokens): {r['prefill_s']:.2f} s")
        for t, probes in sorted(r["bandwidth"].items(), key=lambda kv: -int(kv[0])):
            click.echo(f"   read bandwidth, {t} thread(s): sum {probes['sum']:.1f} GB/s, fp32 gemv "
                       f"{probes['gemv_f32']:.1f} GB/s -> {limits[t]:.2f} tok/s"
                       f"{' = the limit' if t == str(r['threads_max']) else ''}")
        for name, value in r["decode"].items():
            backend, threads_used = name.split("/")
            same = (f" ({100 * value / limits[threads_used]:.0f} % of {threads_used}-thread bandwidth)"
                    if threads_used != str(r["threads_max"]) else "")
            click.echo(f"   decode {backend:5s} {threads_used} thread(s): {value:6.2f} tok/s = "
                       f"{100 * value / limit:5.1f} % of the bandwidth limit{same}")
        best = max(r["decode"].items(), key=lambda kv: kv[1])
        peak_ratio = (r["gpu_peak"] or r["rss_peak"]) / r["weight_bytes"]
        click.echo(f"   summary: best decode {best[0]} = {100 * best[1] / limit:.0f} % of the bandwidth limit "
                   f"(goal >= 80 %), load peak {peak_ratio:.2f}x weights "
                   f"({'GPU memory' if r['gpu_peak'] else 'RSS'}; goal <= 1.15x)")
        click.echo(f"   checks: {r['check']}")
        if not r["check_ok"]:
            failures.append(f"full-size {r['dtype']}: {r['check']}")
    if device.type == "cuda":
        click.echo("   (GPU decode % uses the bandwidth measured above on this GPU)")
    return failures


def _cpu_model() -> str:
    import os
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


# -- --kernels: one-row kernel read rates against torch.sum ---------------------------------------

KERNEL_BENCH_SHAPE = (8192, 3072)  # one MLP matrix of the HCX decoder
KERNEL_BENCH_MATRICES = 12  # round-robin: 600 MB of bf16 / 300 MB of int8, far beyond any cache


def bench_kernels(threads: int, reps: int) -> list[str]:
    """GB/s of weight bytes that each one-row product reads (our variants this CPU runs, torch's
    fp32 / bf16 F.linear and _weight_int8pack_mm), as % of torch.sum over 1 GB in the same run;
    every variant interleaved (the order rotates), median of `reps`. Returns failed checks."""
    import torch

    torch.set_num_threads(threads)
    try:
        variants = server.load_kernels()
    except server.KernelUnavailable as exc:
        click.echo(f"our CPU kernels cannot run here ({exc}): torch's kernels only")
        variants = ()
    n, k = KERNEL_BENCH_SHAPE
    gen = torch.Generator().manual_seed(0)
    bf16 = [torch.randn(n, k, generator=gen).bfloat16() for _ in range(KERNEL_BENCH_MATRICES)]
    int8 = [torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8) for _ in range(KERNEL_BENCH_MATRICES)]
    fp32 = [torch.randn(n, k, generator=gen) for _ in range(KERNEL_BENCH_MATRICES // 2)]
    scale = torch.rand(n, generator=gen) / 64
    scale_bf16 = scale.bfloat16()
    x = torch.randn(1, 1, k, generator=gen).bfloat16()
    data = torch.ones(1 << 28)  # 1 GB of fp32
    failures = []

    def cycle(mats, fn):
        state = {"i": 0}

        def call():
            state["i"] += 1
            return fn(mats[state["i"] % len(mats)])
        return call

    cases = {"torch.sum (bandwidth)": (data.sum, data.numel() * 4, 1)}
    for variant in variants:
        op = server.kernel_op(variant)
        if variant.startswith("int8"):
            cases[variant] = (cycle(int8, lambda w, op=op: op(x, w, scale, None)), n * k, 48)
        else:
            cases[variant] = (cycle(bf16, lambda w, op=op: op(x, w, None)), n * k * 2, 24)
        want = torch.nn.functional.linear(x.float(), (int8[0].float() * scale[:, None]) if variant.startswith("int8")
                                          else bf16[0].float())
        got = op(x, int8[0], scale, None) if variant.startswith("int8") else op(x, bf16[0], None)
        if not torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max())):
            failures.append(f"kernel {variant} differs from torch's linear")
    cases["torch F.linear bf16"] = (cycle(bf16, lambda w: torch.nn.functional.linear(x, w)), n * k * 2, 24)
    cases["torch F.linear fp32"] = (cycle(fp32, lambda w: torch.nn.functional.linear(x.float(), w)), n * k * 4, 12)
    cases["torch _weight_int8pack_mm"] = (cycle(int8, lambda w: torch._weight_int8pack_mm(x.view(1, k), w, scale_bf16)),
                                          n * k, 48)
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for fn, _, calls in cases.values():
        fn()  # warm-up
    for rep in range(reps):
        for name in _rotated(list(cases), rep):
            fn, size, calls = cases[name]
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            rates[name].append(size * calls / (time.perf_counter() - started) / 1e9)
    limit = _median(rates["torch.sum (bandwidth)"])
    click.echo(f"one-row products, {n}x{k} weights round-robin over {KERNEL_BENCH_MATRICES} matrices, "
               f"{threads} thread(s), median of {reps} (GB/s of weight bytes read):")
    for name, values in rates.items():
        rate = _median(values)
        click.echo(f"  {name:28s} {rate:6.1f} GB/s  {100 * rate / limit:4.0f} % of torch.sum"
                   f"  (range {min(values):.1f}-{max(values):.1f})")
    return failures


@click.command()
@click.option("--reps", type=click.IntRange(1), default=7, show_default=True, help="Timed repetitions per variant.")
@click.option("--tokens", type=click.IntRange(2), default=32, show_default=True, help="Tokens per tiny-model answer.")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True,
              help="torch threads of the tiny model, in-process and in the server alike.")
@click.option("--full", is_flag=True, help="Also measure the random full-size model (built once, ~7.4 GB).")
@click.option("--kernels", is_flag=True, help="Only measure the one-row CPU kernels against torch's and the "
                                              "memory bandwidth (uses --reps and --threads, default all cores).")
@click.option("--cache-dir", default=None, help="Where the full-size model is cached (default "
                                                 "~/.cache/hcx-server/bench-full).")
@click.option("--full-reps", type=click.IntRange(1), default=3, show_default=True)
@click.option("--full-tokens", type=click.IntRange(2), default=24, show_default=True)
@click.option("--full-threads", default=None, help="Comma-separated torch thread counts to compare (default: "
                                                   "1 and all cores).")
@click.option("--full-dtypes", default=None, help="Comma-separated dtypes (default bfloat16,float32; on CUDA "
                                                  "bfloat16,float16,float32).")
@click.pass_obj
def bench(cfg: server.Config, reps, tokens, threads, full, kernels, cache_dir, full_reps, full_tokens, full_threads,
          full_dtypes):
    """Measure server overhead, streaming and (--full) full-size load/prefill/decode; see BENCHMARKS.md."""
    import os

    if kernels:
        source = click.get_current_context().get_parameter_source("threads")
        failures = bench_kernels(threads if source == click.core.ParameterSource.COMMANDLINE else os.cpu_count() or 1,
                                 reps)
        for failure in failures:
            click.echo(f"check FAILED: {failure}")
        click.echo(f"checks: {'ok' if not failures else 'FAILED'}")
        sys.exit(1 if failures else 0)
    verbose = logging.getLogger().level <= logging.INFO
    overhead, stream_overhead, failures = bench_tiny(cfg, reps, tokens, threads)
    if full:
        cores = os.cpu_count() or 1
        thread_list = [int(t) for t in full_threads.split(",")] if full_threads else sorted({1, cores})
        device = server.resolve_device(cfg)
        default_dtypes = "bfloat16,float16,float32" if device.type == "cuda" else "bfloat16,float32"
        dtypes = [d.strip() for d in (full_dtypes or default_dtypes).split(",") if d.strip()]
        failures += bench_full(cfg, cache_dir, full_reps, full_tokens, thread_list, dtypes, verbose)
    for failure in failures:
        click.echo(f"check FAILED: {failure}")
    click.echo(f"checks: {'ok' if not failures else 'FAILED'}")
    click.echo(f"overhead_ratio={overhead:.3f} stream_overhead_ratio={stream_overhead:.3f}")
    if failures:
        sys.exit(1)
