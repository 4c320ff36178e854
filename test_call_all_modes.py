"""One prompt + one image through every way of calling hcx-server; all must answer the same text.

Modes: seed REST (plain, `?stream=true`, the `_stream` route), MCP over Streamable HTTP (the
official `mcp` client), the OpenAI API (official `openai` client, plain and streamed, text part
first and image part first) and the CLI (`hcx-cli describe --json`, in its own process).
Every call uses the same seed, temperature, top_p and max_tokens == min_tokens, so sampling is
fixed and the answer has a fixed length.

As a pytest file it runs against the session demo server (tiny random LLaVA) and servers on the
tiny HCX models of both code revisions (v1; v2 both ways its processor may behave); the CLI loads
the same model folder. As a script it checks a live server:

    python test_call_all_modes.py --url http://127.0.0.1:8000 [--model-path DIR] [pytest args]

(--model-path also runs the CLI on that model folder; it must be the server's model, and give
the same answers only on the same device and dtype.)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

import server
from tests.fixtures import (  # noqa: F401  (pytest finds fixtures by name in this module)
    REQUEST_TIMEOUT,
    SEED_ROUTE,
    SEED_STREAM_ROUTE,
    b64,
    demo_model_dir,
    image_bytes,
    live_url,
    post,
    run_cli,
    server_url,
    stream_chunks,
    tiny_model,
    tiny_server,
)

MODELS = ["demo", "hcx", "hcx-v2", "hcx-v2-expanding"]

PROMPT = "Describe this image in one sentence."
MAX_TOKENS = int(os.environ.get("HCX_TEST_MAX_TOKENS", "24"))
SAMPLING = {"seed": 7, "temperature": 0.7, "top_p": 0.9, "max_tokens": MAX_TOKENS, "min_tokens": MAX_TOKENS}
IMAGE = image_bytes("png")


def auth() -> dict:
    key = os.environ.get("HCX_TEST_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def seed_body(sampling: dict = SAMPLING) -> dict:
    return {"prompt": PROMPT, "image_base64": b64(IMAGE), **sampling}


def openai_messages(image_first: bool = False) -> list[dict]:
    parts = [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": {"url": b64(IMAGE, data_url=True)}}]
    return [{"role": "user", "content": parts[::-1] if image_first else parts}]


# ---------------------------------------------------------------------------------------------
# the modes: each returns the answer's text
# ---------------------------------------------------------------------------------------------


def rest(url: str, sampling: dict = SAMPLING) -> str:
    resp = post(url, SEED_ROUTE, seed_body(sampling), headers=auth())
    assert resp.status_code == 200, resp.text
    return resp.json()["result"]


def rest_stream(url: str) -> str:
    resp, chunks, *_ = stream_chunks(url, SEED_ROUTE, seed_body(), params={"stream": "true"}, headers=auth())
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    return b"".join(chunks).decode("utf-8")


def rest_stream_route(url: str) -> str:
    resp, chunks, *_ = stream_chunks(url, SEED_STREAM_ROUTE, seed_body(), headers=auth())
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    return b"".join(chunks).decode("utf-8")


def mcp_http(url: str) -> str:
    from mcp import Client

    target = url + "/mcp"
    if auth():  # Client(url) sends no headers; a transport with its own httpx client does
        from mcp.client.streamable_http import create_mcp_http_client, streamable_http_client

        target = streamable_http_client(target, http_client=create_mcp_http_client(headers=auth()))

    async def call() -> str:
        async with Client(target) as client:
            result = await client.call_tool("generate_hyperclovax_vision", seed_body())
        assert not result.is_error, result
        return result.content[0].text

    return asyncio.run(call())


def openai_client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=os.environ.get("HCX_TEST_API_KEY", "x"), max_retries=0,
                         timeout=REQUEST_TIMEOUT)


def openai_args(image_first: bool = False) -> dict:
    fields = {k: v for k, v in SAMPLING.items() if k != "min_tokens"}
    return {"model": "hcx", "messages": openai_messages(image_first), "extra_body": {"min_tokens": MAX_TOKENS},
            **fields}


def openai_plain(url: str, image_first: bool = False) -> str:
    r = openai_client(url).chat.completions.create(**openai_args(image_first))
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == MAX_TOKENS
    return r.choices[0].message.content


def openai_stream(url: str) -> str:
    stream = openai_client(url).chat.completions.create(**openai_args(), stream=True)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


MODES = {
    "rest_stream": rest_stream,
    "rest_stream_route": rest_stream_route,
    "mcp_http": mcp_http,
    "openai": openai_plain,
    "openai_image_first": lambda url: openai_plain(url, image_first=True),
    "openai_stream": openai_stream,
}


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=MODELS)
def target(request, tmp_path_factory):
    """(server URL, model folder or None): the live server once, else each tiny model's server."""
    if live_url():
        if request.param != "demo":
            pytest.skip("a live server is checked once")
        yield request.getfixturevalue("server_url"), None
        return
    with tiny_server(request.param, tmp_path_factory) as srv:
        yield srv.url, tiny_model(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def reference(target) -> str:
    """The seed REST answer every other mode must repeat."""
    text = rest(target[0])
    assert text, "the reference answer is empty"
    return text


@pytest.mark.parametrize("mode", MODES)
def test_mode_gives_the_same_text(target, reference, mode):
    text = MODES[mode](target[0])
    assert text == reference, f"{mode} answered {text!r}, the seed REST route {reference!r}"


def test_rest_is_reproducible(target, reference):
    assert rest(target[0]) == reference


@pytest.fixture(scope="module")
def cli_model_path(target) -> str:
    """The model the CLI loads: the server's tiny model locally, --model-path / HCX_TEST_MODEL_PATH live."""
    given = os.environ.get("HCX_TEST_MODEL_PATH", "").strip()
    if given:
        return given
    if target[1] is None:
        pytest.skip("the CLI loads a model itself: pass --model-path (HCX_TEST_MODEL_PATH) to compare it")
    return str(target[1])


def test_cli_gives_the_same_text(reference, cli_model_path, tmp_path):
    image = tmp_path / "img.png"
    image.write_bytes(IMAGE)
    args = ["--model-path", cli_model_path, "describe", str(image), "--prompt", PROMPT,
            "--seed", str(SAMPLING["seed"]), "--temperature", str(SAMPLING["temperature"]),
            "--top-p", str(SAMPLING["top_p"]), "--max-tokens", str(MAX_TOKENS), "--json"]
    args += ["--min-tokens", str(MAX_TOKENS)]
    expected = reference
    done = run_cli(args, env={k: os.environ[k] for k in ("DEVICE", "DTYPE") if k in os.environ and live_url()},
                   timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    lines = [line for line in done.stdout.decode("utf-8").splitlines() if line.strip()]
    assert len(lines) == 1, lines
    answer = json.loads(lines[0])
    assert answer["image"] == str(image)
    assert answer["result"] == expected, f"CLI answered {answer['result']!r}, the REST route {expected!r}"


# -- the routes build the same GenerationRequest (checked in-process, no server needed) ---------


@pytest.mark.parametrize("system_prompt", ["", "You are a helpful assistant."])
def test_routes_build_the_same_request(tmp_path, system_prompt):
    cfg = server.load_config({"SYSTEM_PROMPT": system_prompt})
    from_rest = server.prompt_request(seed_body(), cfg)
    body = {"model": "m", "messages": openai_messages(), **SAMPLING}
    assert server.openai_request(body, cfg) == from_rest
    assert server.openai_request({**body, "messages": openai_messages(image_first=True)}, cfg) == from_rest
    # the same body as MCP tool arguments over HTTP (stdio only adds image_path)
    assert server.prompt_request(seed_body(), cfg, allow_image_path=True) == from_rest
    assert [m.role for m in from_rest.messages] == (["system", "user"] if system_prompt else ["user"])
    assert from_rest.messages[-1].text == PROMPT and len(from_rest.messages[-1].images) == 1
    assert (from_rest.max_new_tokens, from_rest.min_new_tokens, from_rest.max_tokens_explicit) == \
        (MAX_TOKENS, MAX_TOKENS, True)

    # the CLI's `describe`: prompt_request without the image, then the decoded file attached
    import cli

    image = tmp_path / "img.png"
    image.write_bytes(IMAGE)
    cli_body = cli.request_body(PROMPT, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=SAMPLING["temperature"],
                                top_p=SAMPLING["top_p"], seed=SAMPLING["seed"])
    from_cli = server.prompt_request(cli_body, cfg)
    from_cli.messages[-1].images = [cli.read_image(str(image), cfg)]
    assert from_cli == from_rest


def test_routes_share_defaults():
    cfg = server.load_config({})
    from_rest = server.prompt_request({"prompt": PROMPT}, cfg)
    from_openai = server.openai_request({"model": "m", "messages": [{"role": "user", "content": PROMPT}]}, cfg)
    assert from_openai == from_rest
    assert (from_rest.temperature, from_rest.top_p, from_rest.max_new_tokens) == (0.5, 0.6, cfg.max_new_tokens)


# ---------------------------------------------------------------------------------------------
# as a script: python test_call_all_modes.py --url http://127.0.0.1:8000
# ---------------------------------------------------------------------------------------------

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Check that every mode of a live hcx-server answers alike.")
    parser.add_argument("--url", help="base URL of a running server (default: start a demo server)")
    parser.add_argument("--model-path", help="also run hcx-cli on this model folder (the server's model)")
    parser.add_argument("--api-key", help="API key of the server, if it has one")
    parser.add_argument("--max-tokens", type=int, help=f"tokens per answer (default {MAX_TOKENS})")
    options, pytest_args = parser.parse_known_args()
    for key, value in (("HCX_TEST_URL", options.url), ("HCX_TEST_MODEL_PATH", options.model_path),
                       ("HCX_TEST_API_KEY", options.api_key),
                       ("HCX_TEST_MAX_TOKENS", options.max_tokens and str(options.max_tokens))):
        if value:
            os.environ[key] = value
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(pytest.main([__file__, "-v", "-p", "no:cacheprovider", *pytest_args]))
