#!/usr/bin/env python
"""Call the hcx-server REST API over HTTP: the seed routes, streaming, every bad input, /health.

Two ways to run it:

    python -m pytest -q test_call_localhost.py          # starts its own servers on tiny models
    python test_call_localhost.py --url http://127.0.0.1:8000 [pytest args]
                                                        # against YOUR running server

With --url (or HCX_TEST_URL) the tests that need a server config of their own or a tiny
model skip; everything else runs against the live server. Random tiny models emit gibberish,
so these tests check structure, token counts and stream/non-stream equality, never words.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from tests.fixtures import (  # noqa: F401  (fixtures are found by name in this module)
    SEED_ROUTE,
    SEED_STREAM_ROUTE,
    LiveServer,
    assert_error_json,
    b64,
    corrupt_png_size,
    demo_model_dir,
    demo_server,
    hcx_model_dir,
    hcx_server,
    hcx_server_url,
    hcx_v2_server_url,
    image_bytes,
    local_only,
    make_server,
    model_url,
    post,
    server_url,
    skip_if_live,
    stream_chunks,
)

requests = pytest.importorskip("requests")

# A prompt no model would produce by chance: if it shows up in an answer, the prompt leaked.
MARKER = "QUOKKA-7731-ZEBRA"
PROMPT = f"Describe this picture, then say {MARKER}. 이 사진을 설명해 주세요."
TEMPLATE_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endofturn|>", "<|stop|>", "<|endoftext|>", "<image>",
                    "<|dummy3|>")
PNG = image_bytes("png")
PLAIN = "text/plain; charset=utf-8"


def get(url: str, path: str, **kwargs):
    return requests.get(url + path, timeout=30, **kwargs)


def assert_alive(url: str) -> None:
    resp = get(url, "/health")
    assert resp.status_code == 200, f"server stopped answering: {resp.status_code} {resp.text[:300]}"


def result_of(resp) -> str:
    assert resp.status_code == 200, resp.text[:500]
    assert resp.headers["Content-Type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("result"), str), body
    return body["result"]


def streamed_text(resp, chunks) -> str:
    assert resp.status_code == 200, b"".join(chunks)[:500]
    assert resp.headers["Content-Type"].replace(" ", "").lower() == PLAIN.replace(" ", ""), resp.headers
    return b"".join(chunks).decode("utf-8")


def assert_no_leak(text: str, prompt: str = PROMPT) -> None:
    assert MARKER not in text, text
    assert prompt not in text
    for marker in TEMPLATE_MARKERS:
        assert marker not in text, f"template token {marker} in the answer: {text!r}"


# ======================================================================================
# /health
# ======================================================================================


def test_health(server_url):
    resp = get(server_url, "/health")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json()
    assert body["status"] == "ok"
    for key in ("model", "device", "dtype"):
        assert isinstance(body[key], str) and body[key], body
    assert body["dtype"] in ("bfloat16", "float16", "float32"), body
    assert body["device"].split(":")[0] in ("cpu", "cuda", "mps"), body


@local_only
def test_health_names_the_demo_model(demo_server, demo_model_dir):
    body = get(demo_server.url, "/health").json()
    assert body["model"] == demo_model_dir.name
    assert body.get("kind") == "generic"


# ======================================================================================
# Seed routes: answers
# ======================================================================================


def test_text_only_prompt(model_url):
    resp = post(model_url, SEED_ROUTE, {"prompt": PROMPT, "max_tokens": 8, "seed": 1})
    assert_no_leak(result_of(resp))


def test_image_prompt(model_url):
    resp = post(model_url, SEED_ROUTE, {"prompt": PROMPT, "image_base64": b64(image_bytes("jpeg")),
                                        "max_tokens": 8, "seed": 1})
    assert_no_leak(result_of(resp))


@pytest.mark.parametrize("encoding", ["plain", "data-url", "wrapped", "data-url-wrapped-crlf"])
def test_image_prompt_encodings(server_url, encoding):
    text = {"plain": b64(PNG), "data-url": b64(PNG, data_url=True), "wrapped": b64(PNG, wrap=76),
            "data-url-wrapped-crlf": b64(PNG, data_url=True, wrap=64, newline="\r\n")}[encoding]
    resp = post(server_url, SEED_ROUTE, {"prompt": "What is in this image?", "image_base64": text,
                                         "max_tokens": 2, "seed": 1})
    result_of(resp)


@pytest.mark.parametrize("kind", ["jpeg", "cmyk_jpeg", "palette_transparent_png", "rgba_png", "gray_png",
                                  "exif_rotated_jpeg", "gif", "webp", "tiny_1x1", "thin_40x3",
                                  "large_1200x900"])
def test_image_kinds(server_url, kind):
    resp = post(server_url, SEED_ROUTE, {"prompt": "What is in this image?", "image_base64": b64(image_bytes(kind)),
                                         "max_tokens": 2, "seed": 1})
    result_of(resp)


def test_korean_prompt(model_url):
    prompt = "이 그림에 무엇이 있나요? 자세히 설명해 주세요."
    resp = post(model_url, SEED_ROUTE, {"prompt": prompt, "image_base64": b64(PNG), "max_tokens": 12,
                                        "min_tokens": 12, "seed": 3})
    text = result_of(resp)
    assert text.strip(), "12 forced tokens decoded to nothing"
    assert prompt not in text


def test_unknown_fields_are_ignored(server_url):
    result_of(post(server_url, SEED_ROUTE, {"prompt": "hi", "max_tokens": 2, "model": "x", "foo": [1]}))


def test_empty_image_base64_means_text_only(server_url):
    body = {"prompt": "hi", "max_tokens": 6, "min_tokens": 6, "seed": 5}
    assert result_of(post(server_url, SEED_ROUTE, {**body, "image_base64": ""})) == \
        result_of(post(server_url, SEED_ROUTE, body))


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_answer_never_contains_the_prompt(model_url, with_image):
    body = {"prompt": PROMPT, "max_tokens": 32, "min_tokens": 32, "seed": 7,
            **({"image_base64": b64(PNG)} if with_image else {})}
    assert_no_leak(result_of(post(model_url, SEED_ROUTE, body)))
    resp, chunks, _ = stream_chunks(model_url, SEED_STREAM_ROUTE, body)
    assert_no_leak(streamed_text(resp, chunks))


def test_fixed_seed_is_reproducible(server_url):
    body = {"prompt": "Say something.", "max_tokens": 16, "min_tokens": 16, "seed": 42}
    first = result_of(post(server_url, SEED_ROUTE, body))
    assert result_of(post(server_url, SEED_ROUTE, body)) == first


@local_only
def test_different_seeds_differ(demo_server):
    body = {"prompt": "Say something.", "max_tokens": 16, "min_tokens": 16, "temperature": 1.0, "top_p": 1.0}
    answers = {result_of(post(demo_server.url, SEED_ROUTE, {**body, "seed": s})) for s in (1, 2, 3)}
    assert len(answers) > 1  # the seed is really used (a random model at T=1 never repeats 16 tokens)


def test_max_tokens_limits_the_answer(server_url):
    short = result_of(post(server_url, SEED_ROUTE, {"prompt": "Count.", "max_tokens": 4, "min_tokens": 4, "seed": 9}))
    longer = result_of(post(server_url, SEED_ROUTE, {"prompt": "Count.", "max_tokens": 24, "min_tokens": 24,
                                                     "seed": 9}))
    assert longer.startswith(short.rstrip("\ufffd"))  # same seed: the short answer is a prefix
    assert len(longer) > len(short)


# ======================================================================================
# Streaming
# ======================================================================================

STREAM_WAYS = {
    "query": (SEED_ROUTE, {"stream": "true"}, {}),
    "json": (SEED_ROUTE, None, {"stream": True}),
    "route": (SEED_STREAM_ROUTE, None, {}),
}


# (way, with image, forced length): each way, text and image, natural stop and forced length
STREAM_CASES = [("query", True, False), ("json", False, True), ("route", True, True), ("route", False, False)]


@pytest.mark.parametrize("way,with_image,forced", STREAM_CASES,
                         ids=[f"{w}-{'image' if i else 'text'}-{'forced' if f else 'natural'}" for w, i, f in STREAM_CASES])
def test_stream_equals_non_stream(model_url, way, with_image, forced):
    body = {"prompt": "이 이미지를 설명해 주세요. Describe it.", "seed": 7, "max_tokens": 32,
            **({"min_tokens": 32} if forced else {}), **({"image_base64": b64(PNG)} if with_image else {})}
    whole = result_of(post(model_url, SEED_ROUTE, body))
    path, params, extra = STREAM_WAYS[way]
    resp, chunks, _ = stream_chunks(model_url, path, {**body, **extra}, params=params)
    assert streamed_text(resp, chunks) == whole
    if forced:
        assert whole, "32 forced tokens decoded to nothing"


@pytest.mark.parametrize("way", ["query-false", "json-false"])
def test_stream_false_is_json(server_url, way):
    params = {"stream": "false"} if way == "query-false" else None
    body = {"prompt": "hi", "max_tokens": 2, **({"stream": False} if way == "json-false" else {})}
    result_of(post(server_url, SEED_ROUTE, body, params=params))


@pytest.mark.parametrize("path", [SEED_ROUTE + "?stream=true", SEED_STREAM_ROUTE])
def test_stream_arrives_in_chunks_of_whole_characters(model_url, path):
    route, _, query = path.partition("?")
    body = {"prompt": "한국어로 길게 대답해 주세요.", "image_base64": b64(PNG), "seed": 7, "max_tokens": 32,
            "min_tokens": 32}
    resp, chunks, times = stream_chunks(model_url, route, body, params=dict([query.split("=")]) if query else None)
    text = streamed_text(resp, chunks)
    assert len(chunks) > 1, f"a 32-token answer came in {len(chunks)} chunk(s): not streamed"
    for chunk in chunks:
        chunk.decode("utf-8", errors="strict")  # no chunk ends (or starts) inside a character
    for chunk in chunks[:-1]:
        assert not chunk.decode("utf-8").endswith("\ufffd"), chunks
    assert times[-1] > times[0], "every chunk arrived at once: the answer was buffered, not streamed"
    assert text == result_of(post(model_url, SEED_ROUTE, body))


@local_only
def test_stream_starts_before_generation_ends(demo_server):
    # 100 tokens take a while on any machine; the first chunk must come long before the last
    body = {"prompt": "Go on.", "seed": 1, "max_tokens": 100, "min_tokens": 100}
    resp, chunks, times = stream_chunks(demo_server.url, SEED_STREAM_ROUTE, body)
    streamed_text(resp, chunks)
    assert len(chunks) > 20
    assert times[0] < 0.5 * times[-1], f"first chunk at {times[0]:.3f}s, last at {times[-1]:.3f}s"


@local_only
def test_client_leaving_a_stream_stops_generation(demo_server):
    url = demo_server.url
    body = {"prompt": "Go on.", "seed": 1, "max_tokens": 990, "min_tokens": 990}  # the demo context is 1024
    with requests.post(url + SEED_STREAM_ROUTE, json=body, stream=True, timeout=60) as resp:
        assert resp.status_code == 200
        pieces = resp.raw.read_chunked(decode_content=False)
        first = next(pieces)
        started = time.perf_counter()
        for _ in range(20):
            next(pieces)
        per_chunk = (time.perf_counter() - started) / 20
        assert first
    # the client hung up after ~21 of 990 tokens: the job must be cancelled, not block the next request
    started = time.perf_counter()
    result_of(post(url, SEED_ROUTE, {"prompt": "hi", "max_tokens": 1}))
    waited = time.perf_counter() - started
    rest = 950 * per_chunk  # what finishing the abandoned answer would cost
    assert waited < max(0.5, rest / 2), f"next request waited {waited:.2f}s; the rest of the answer ~{rest:.2f}s"


def test_concurrent_requests_are_all_answered_alike(server_url):
    body = {"prompt": "Say something.", "max_tokens": 12, "min_tokens": 12, "seed": 123}
    results: list = [None] * 4

    def call(i):
        if i % 2:
            resp, chunks, _ = stream_chunks(server_url, SEED_STREAM_ROUTE, body)
            results[i] = streamed_text(resp, chunks)
        else:
            results[i] = result_of(post(server_url, SEED_ROUTE, body))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert None not in results
    assert len(set(results)) == 1, results  # one model, serialized: same seed, same answer


# ======================================================================================
# Bad input: a JSON error {"error", "detail"} with the right status, and the server lives on
# ======================================================================================

TRUNCATED_PNG = b64(PNG[: len(PNG) // 2])

# (id, request kwargs for post(), status, words in the error body, also on the stream route)
BAD_REQUESTS = [
    ("missing-prompt", {"body": {}}, 400, ["prompt"], True),
    ("null-prompt", {"body": {"prompt": None}}, 400, ["prompt"], True),
    ("empty-prompt", {"body": {"prompt": ""}}, 400, ["prompt"], True),
    ("blank-prompt", {"body": {"prompt": " \n\t "}}, 400, ["prompt"], True),
    ("number-prompt", {"body": {"prompt": 42}}, 400, ["prompt"], True),
    ("list-prompt", {"body": {"prompt": ["hi"]}}, 400, ["prompt"], True),
    ("object-prompt", {"body": {"prompt": {"text": "hi"}}}, 400, ["prompt"], True),
    ("number-image", {"body": {"prompt": "hi", "image_base64": 7}}, 400, ["image_base64"], True),
    ("list-image", {"body": {"prompt": "hi", "image_base64": [b64(PNG)]}}, 400, ["image_base64"], True),
    ("bad-base64", {"body": {"prompt": "hi", "image_base64": "@@@not-base64@@@"}}, 400, ["base64"], True),
    ("bad-padding", {"body": {"prompt": "hi", "image_base64": b64(PNG)[:-2]}}, 400, ["base64"], True),
    ("not-an-image", {"body": {"prompt": "hi", "image_base64": b64(b"just some text, no pixels")}}, 400,
     ["image"], True),
    ("truncated-image", {"body": {"prompt": "hi", "image_base64": TRUNCATED_PNG}}, 400, ["image"], True),
    ("text-data-url", {"body": {"prompt": "hi", "image_base64": "data:text/plain;base64,aGVsbG8="}}, 400,
     ["image"], True),
    ("empty-data-url", {"body": {"prompt": "hi", "image_base64": "data:image/png;base64,"}}, 400, ["image"], True),
    ("bomb-header", {"body": {"prompt": "hi", "image_base64": b64(corrupt_png_size(50_000, 50_000))}}, 400,
     ["bomb"], True),
    ("too-many-pixels", {"body": {"prompt": "hi", "image_base64": b64(corrupt_png_size(10_000, 8_000))}}, 400,
     ["MAX_IMAGE_PIXELS"], True),
    ("string-max-tokens", {"body": {"prompt": "hi", "max_tokens": "16"}}, 400, ["max_tokens"], True),
    ("zero-max-tokens", {"body": {"prompt": "hi", "max_tokens": 0}}, 400, ["max_tokens"], True),
    ("huge-max-tokens", {"body": {"prompt": "hi", "max_tokens": 10**12}}, 400, ["max_tokens"], True),
    ("bool-max-tokens", {"body": {"prompt": "hi", "max_tokens": True}}, 400, ["max_tokens"], True),
    ("min-over-max", {"body": {"prompt": "hi", "max_tokens": 2, "min_tokens": 3}}, 400, ["min_tokens"], True),
    ("string-temperature", {"body": {"prompt": "hi", "temperature": "hot"}}, 400, ["temperature"], True),
    ("high-temperature", {"body": {"prompt": "hi", "temperature": 9}}, 400, ["temperature"], True),
    ("zero-top-p", {"body": {"prompt": "hi", "top_p": 0}}, 400, ["top_p"], True),
    ("float-seed", {"body": {"prompt": "hi", "seed": 1.5}}, 400, ["seed"], True),
    ("string-stream", {"body": {"prompt": "hi", "stream": "yes"}}, 400, ["stream"], False),
    ("bad-stream-query", {"body": {"prompt": "hi"}, "params": {"stream": "maybe"}}, 400, ["stream"], False),
    ("malformed-json", {"data": '{"prompt": "hi"'}, 400, ["json"], True),
    ("trailing-garbage", {"data": '{"prompt": "hi"} and more'}, 400, ["json"], True),
    ("single-quotes", {"data": "{'prompt': 'hi'}"}, 400, ["json"], True),
    ("nan", {"data": '{"prompt": "hi", "temperature": NaN}'}, 400, ["nan"], True),
    ("nan-anywhere", {"data": '{"prompt": "hi", "extra": [1, NaN]}'}, 400, ["json", "nan"], True),
    ("infinity-anywhere", {"data": '{"prompt": "hi", "extra": {"x": Infinity}}'}, 400, ["json", "infinity"], True),
    ("infinity", {"data": '{"prompt": "hi", "max_tokens": Infinity}'}, 400, ["infinity"], True),
    ("minus-infinity", {"data": '{"prompt": "hi", "top_p": -Infinity}'}, 400, ["infinity"], True),
    ("array-body", {"data": '["hi"]'}, 400, ["object"], True),
    ("string-body", {"data": '"hi"'}, 400, ["object"], True),
    ("number-body", {"data": "42"}, 400, ["object"], True),
    ("null-body", {"data": "null"}, 400, ["object"], True),
    ("empty-body", {"data": ""}, 400, ["empty"], True),
    ("invalid-utf8", {"data": b'{"prompt": "\xff\xfe hi"}'}, 400, ["json"], True),
    ("deep-nesting", {"data": "[" * 100_000}, 400, ["json"], True),
]


@pytest.mark.parametrize("route", [SEED_ROUTE, SEED_STREAM_ROUTE], ids=["generate", "stream"])
@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input(server_url, route, case):
    _, kwargs, status, words, on_stream_route = case
    if route == SEED_STREAM_ROUTE and not on_stream_route:
        pytest.skip("the stream route always streams: the stream flag is not read there")
    resp = post(server_url, route, **kwargs)
    assert_error_json(resp, status, *words)
    assert_alive(server_url)


@pytest.mark.parametrize("method,path,status", [
    ("POST", "/tool/does_not_exist", 404),
    ("GET", "/nope", 404),
    ("POST", "/tool/generate_hyperclovax_vision/extra", 404),
    ("GET", SEED_ROUTE, 405),
    ("GET", SEED_STREAM_ROUTE, 405),
    ("PUT", SEED_ROUTE, 405),
    ("DELETE", SEED_ROUTE, 405),
    ("POST", "/health", 405),
])
def test_unknown_routes_and_methods(server_url, method, path, status):
    resp = requests.request(method, server_url + path, json={"prompt": "hi"}, timeout=30)
    body = assert_error_json(resp, status)
    assert body["error"] in ("Not Found", "Method Not Allowed")
    assert_alive(server_url)


def test_server_still_answers_after_bad_input(server_url):
    for case in BAD_REQUESTS[:12]:
        post(server_url, SEED_ROUTE, **case[1])
    body = {"prompt": "Still there?", "image_base64": b64(PNG), "max_tokens": 6, "min_tokens": 6, "seed": 2}
    assert result_of(post(server_url, SEED_ROUTE, body))
    resp, chunks, _ = stream_chunks(server_url, SEED_STREAM_ROUTE, body)
    assert streamed_text(resp, chunks)


# ======================================================================================
# A server with its own config: system prompt and size limits
# ======================================================================================

SYSTEM_MARKER = "SYSPROMPT-KANGAROO-4242"


@pytest.fixture(scope="module")
def limits_server(demo_model_dir):
    skip_if_live("the limits server")
    env = {"SYSTEM_PROMPT": f"You are a test. {SYSTEM_MARKER}.", "MAX_IMAGE_BYTES": "4096",
           "MAX_BODY_BYTES": "65536", "MAX_IMAGE_PIXELS": "10000", "MAX_NEW_TOKENS": "8", "MAX_TOKENS_CAP": "64"}
    with LiveServer(demo_model_dir, env=env, name="hcx-limits-server") as srv:
        yield srv


@local_only
def test_system_prompt_never_leaks(limits_server):
    body = {"prompt": PROMPT, "max_tokens": 32, "min_tokens": 32, "seed": 7, "image_base64": b64(PNG)}
    text = result_of(post(limits_server.url, SEED_ROUTE, body))
    assert SYSTEM_MARKER not in text and "You are a test" not in text
    assert_no_leak(text)
    resp, chunks, _ = stream_chunks(limits_server.url, SEED_STREAM_ROUTE, body)
    assert streamed_text(resp, chunks) == text


@local_only
def test_prompts_are_not_logged_by_default(limits_server):
    post(limits_server.url, SEED_ROUTE, {"prompt": PROMPT, "max_tokens": 2})
    time.sleep(0.2)
    log = limits_server.log()
    assert "POST /tool/generate_hyperclovax_vision" in log  # the access line is there ...
    assert MARKER not in log and SYSTEM_MARKER not in log  # ... the prompt is not


@local_only
def test_max_new_tokens_and_cap_from_config(limits_server):
    url = limits_server.url
    body = {"prompt": "hi", "min_tokens": 0, "temperature": 0}
    # default budget MAX_NEW_TOKENS=8: a forced 8-token answer equals the default-length one
    forced = result_of(post(url, SEED_ROUTE, {**body, "min_tokens": 8, "max_tokens": 8}))
    assert result_of(post(url, SEED_ROUTE, {**body, "min_tokens": 8})) == forced
    assert_error_json(post(url, SEED_ROUTE, {**body, "max_tokens": 65}), 400, "max_tokens", "64")
    result_of(post(url, SEED_ROUTE, {**body, "max_tokens": 64}))


@local_only
def test_image_over_max_image_bytes_is_413(limits_server):
    big = image_bytes("large_1200x900")
    assert 4096 < len(big) and len(b64(big)) < 65536
    assert_error_json(post(limits_server.url, SEED_ROUTE, {"prompt": "hi", "image_base64": b64(big)}), 413,
                      "MAX_IMAGE_BYTES")
    assert_alive(limits_server.url)


@local_only
def test_image_over_max_image_pixels_is_refused(limits_server):
    small_file = image_bytes("png", size=(200, 100))  # 20 000 pixels, a few hundred bytes
    assert len(small_file) < 4096
    resp = post(limits_server.url, SEED_ROUTE, {"prompt": "hi", "image_base64": b64(small_file)})
    assert_error_json(resp, resp.status_code, "MAX_IMAGE_PIXELS")
    assert resp.status_code in (400, 413)
    assert_alive(limits_server.url)


@local_only
def test_body_over_max_body_bytes_is_413(limits_server):
    resp = post(limits_server.url, SEED_ROUTE, {"prompt": "x" * 70_000})
    assert_error_json(resp, 413)
    assert_alive(limits_server.url)


# ======================================================================================
# Run as a script against a live server
# ======================================================================================


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments go to pytest (e.g. -k stream -x -v).")
    parser.add_argument("--url", default=os.environ.get("HCX_TEST_URL") or "http://127.0.0.1:8000",
                        help="base URL of the running server (default: %(default)s)")
    args, pytest_args = parser.parse_known_args(argv)
    os.environ["HCX_TEST_URL"] = args.url
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return int(pytest.main([os.path.abspath(__file__), "-q", "-p", "no:cacheprovider", *pytest_args]))


if __name__ == "__main__":
    sys.exit(main())
