"""The Ollama API subset (/api/*) with the official `ollama` Python client and raw HTTP.

Runs on both tiny models (`model_url`) or HCX_TEST_URL. An Ollama-speaking tool only changes its
base URL: list the model, show it, chat and generate, streamed (NDJSON, the default) or not, with
images as base64. Random weights: only structure, token counts and stream == non-stream.
"""

from __future__ import annotations

import base64
import json
import os

import pytest
import requests

from tests.fixtures import REQUEST_TIMEOUT, b64, image_bytes, post

ollama = pytest.importorskip("ollama")

N = 8
PNG = image_bytes("png")
SEEDED = {"num_predict": N, "min_tokens": N, "seed": 77, "temperature": 0.8, "top_p": 0.9}


def auth() -> dict:
    key = os.environ.get("HCX_TEST_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.fixture
def client(model_url):
    return ollama.Client(host=model_url, headers=auth(), timeout=REQUEST_TIMEOUT)


@pytest.fixture
def name(client) -> str:
    return client.list().models[0].model


def assert_final(part, n: int = N) -> None:
    assert part.done is True and part.done_reason == "length", part
    assert part.eval_count == n and part.prompt_eval_count > 0
    for field in ("total_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(part, field), int) and getattr(part, field) > 0, (field, part)
    assert part.load_duration == 0 and part.total_duration >= part.eval_duration
    assert part.created_at.endswith("Z")


# ---------------------------------------------------------------------------------------------
# the official client
# ---------------------------------------------------------------------------------------------


def test_version_tags_show_ps(client, model_url):
    version = requests.get(model_url + "/api/version", headers=auth(), timeout=10).json()["version"]
    assert tuple(int(x) for x in version.split(".")) >= (0, 6, 4), version  # tools gate features on it
    models = client.list().models
    assert len(models) == 1
    model = models[0]
    assert model.model.endswith(":latest") and model.size > 0 and len(model.digest) == 64
    assert model.details.format == "safetensors" and model.details.family
    assert model.details.parameter_size and model.details.quantization_level in ("BF16", "F16", "F32")
    shown = client.show(model.model)
    assert "vision" in shown.capabilities and "completion" in shown.capabilities
    arch = shown.modelinfo["general.architecture"]
    assert shown.modelinfo[f"{arch}.context_length"] > 0 and shown.modelinfo["general.parameter_count"] > 0
    assert client.show(model.model.removesuffix(":latest")).details.family == arch
    running = client.ps().models
    assert [m.model for m in running] == [model.model] and running[0].context_length > 0


def test_chat_with_an_image_stream_equals_non_stream(client, name):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is in this picture?", "images": [PNG]}]
    whole = client.chat(model=name, messages=messages, stream=False, options=SEEDED, keep_alive="5m")
    assert whole.model == name and whole.message.role == "assistant"
    assert_final(whole)
    parts = list(client.chat(model=name, messages=messages, stream=True, options=SEEDED))
    assert all(p.done is False for p in parts[:-1]) and parts[-1].message.content == ""
    assert_final(parts[-1])
    assert "".join(p.message.content for p in parts) == whole.message.content
    text_only = client.chat(model=name, messages=[messages[0], {"role": "user", "content": messages[1]["content"]}],
                            stream=False, options=SEEDED)
    assert whole.prompt_eval_count > text_only.prompt_eval_count, "the image costs prompt tokens"


def test_chat_multi_turn(client, name):
    first = client.chat(model=name, messages=[{"role": "user", "content": "Hello."}], stream=False,
                        options={"num_predict": 4})
    history = [{"role": "user", "content": "Hello."}, first.message.model_dump(exclude_none=True),
               {"role": "user", "content": "And now?"}]
    second = client.chat(model=name, messages=history, stream=False, options={"num_predict": 4})
    assert second.prompt_eval_count > first.prompt_eval_count


def test_generate_with_system_and_images(client, name, tmp_path):
    picture = tmp_path / "picture.png"
    picture.write_bytes(PNG)
    args = dict(model=name, prompt="Describe.", system="Answer in Korean.", options=SEEDED)
    whole = client.generate(images=[str(picture)], stream=False, **args)  # the client reads and encodes the file
    assert_final(whole)
    assert isinstance(whole.response, str)
    parts = list(client.generate(images=[b64(PNG)], stream=True, **args))
    assert "".join(p.response for p in parts) == whole.response
    assert_final(parts[-1])


def test_stop_and_unlimited_num_predict(client, name):
    text = client.generate(model=name, prompt="Hi.", stream=False, options={"seed": 5, "num_predict": 12}).response
    stop = text[len(text) // 2:][:2]
    cut = client.generate(model=name, prompt="Hi.", stream=False, options={"seed": 5, "num_predict": 12, "stop": [stop]})
    assert cut.done_reason == "stop" and cut.response == text[:text.index(stop)]
    unlimited = client.generate(model=name, prompt="Hi.", stream=False, options={"num_predict": -1, "temperature": 0})
    assert unlimited.eval_count > 0  # -1 is Ollama's "no limit": the server's default applies


def test_load_only_calls(client, name):
    """Tools warm a model with an empty prompt / no messages: answered at once, done_reason load."""
    loaded = client.generate(model=name, prompt="", stream=False, keep_alive=300)
    assert loaded.done is True and loaded.done_reason == "load" and loaded.response == ""
    loaded = client.chat(model=name, messages=[], stream=False)
    assert loaded.done is True and loaded.done_reason == "load" and loaded.message.content == ""


@pytest.mark.parametrize("kwargs, words", [
    ({"options": {"top_k": 20}}, ["top_k", "not supported"]),
    ({"options": {"repeat_penalty": 1.3}}, ["repeat_penalty"]),
    ({"format": "json"}, ["format"]),
    ({"think": True}, ["think"]),
    ({"options": {"temperature": 5}}, ["temperature"]),
    ({"options": {"num_predict": 0}}, ["num_predict"]),
], ids=["top_k", "repeat_penalty", "format", "think", "temperature", "num_predict"])
def test_client_errors_are_response_errors(client, name, kwargs, words):
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model=name, messages=[{"role": "user", "content": "Hi."}], stream=False, **kwargs)
    assert info.value.status_code == 400
    for word in words:
        assert word in info.value.error, info.value.error


def test_runtime_options_are_accepted(client, name):
    reply = client.chat(model=name, messages=[{"role": "user", "content": "Hi."}], stream=False,
                        options={"num_ctx": 4096, "num_thread": 2, "num_gpu": 1, "use_mmap": True, "num_predict": 2})
    assert reply.eval_count <= 2


def test_raw_and_tools_are_refused(client, name):
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model=name, prompt="x", raw=True)
    assert info.value.status_code == 400 and "raw" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model=name, messages=[{"role": "user", "content": "x"}],
                    tools=[{"type": "function", "function": {"name": "f", "description": "d",
                                                             "parameters": {"type": "object", "properties": {}}}}])
    assert info.value.status_code == 400 and "tools" in info.value.error


def test_unknown_model_in_show_and_unknown_endpoint(client):
    with pytest.raises(ollama.ResponseError) as info:
        client.show("llama3.2")
    assert info.value.status_code == 404 and "llama3.2" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        client.embed(model="any", input="hello")
    assert info.value.status_code == 404
    for endpoint in ("POST /api/chat", "POST /api/generate", "GET /api/tags"):
        assert endpoint in info.value.error


# ---------------------------------------------------------------------------------------------
# raw HTTP: the NDJSON wire format and the error shape
# ---------------------------------------------------------------------------------------------


def assert_ollama_error(resp, status: int, *words: str) -> str:
    assert resp.status_code == status, resp.text[:500]
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"], body
    for word in words:
        assert word in body["error"], body
    assert "traceback" not in resp.text.lower()
    return body["error"]


def test_ndjson_wire_format(model_url):
    """Without a "stream" field the answer streams (Ollama's default)."""
    resp = requests.post(model_url + "/api/generate", json={"model": "m", "prompt": "Hi.", "options": {"num_predict": 3}},
                         headers=auth(), timeout=REQUEST_TIMEOUT)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("application/x-ndjson")
    lines = resp.text.splitlines()
    parts = [json.loads(line) for line in lines]
    assert all(p["done"] is False and set(p) == {"model", "created_at", "response", "done"} for p in parts[:-1])
    assert parts[-1]["done"] is True and parts[-1]["eval_count"] == 3 and parts[-1]["model"] == "m"


@pytest.mark.parametrize("path, body, status, words", [
    ("/api/chat", {"messages": [{"role": "user", "content": "x"}]}, 400, ["model"]),
    ("/api/chat", {"model": "m", "messages": [{"role": "tool", "content": "x"}]}, 400, ["role"]),
    ("/api/chat", {"model": "m", "messages": [{"role": "assistant", "content": "x"}]}, 400, ["user message"]),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "x", "images": ["!!!"]}]}, 400,
     ["messages[0].images[0]", "base64"]),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "x",
                                               "images": [base64.b64encode(b"not an image").decode()]}]}, 400,
     ["not a readable image"]),
    ("/api/chat", {"model": "m", "messages": [{"role": "assistant", "content": "x", "images": [b64(PNG)]},
                                              {"role": "user", "content": "y"}]}, 400, ["images"]),
    ("/api/chat", {"model": "m", "messages": "hi"}, 400, ["messages"]),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "no"}, 400, ["stream"]),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "options": [1]}, 400, ["options"]),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "keep_alive": []}, 400,
     ["keep_alive"]),
    ("/api/generate", {"model": "m", "prompt": "x", "suffix": "y"}, 400, ["suffix"]),
    ("/api/generate", {"model": "m", "prompt": "x", "context": [1, 2, 3]}, 400, ["context"]),
    ("/api/generate", {"model": "m", "prompt": "x", "template": "{{ .Prompt }}"}, 400, ["template"]),
    ("/api/generate", {"model": "m", "prompt": 5}, 400, ["prompt"]),
    ("/api/generate", {"model": "", "prompt": "x"}, 400, ["model"]),
    ("/api/show", {}, 400, ["model"]),
    ("/api/show", {"name": "nope"}, 404, ["nope"]),
], ids=["no_model", "tool_role", "no_user", "bad_base64", "not_image", "assistant_image", "messages_type",
        "stream_type", "options_type", "keep_alive_type", "suffix", "context", "template", "prompt_type",
        "empty_model", "show_no_model", "show_unknown"])
def test_bad_requests_in_ollama_shape(model_url, path, body, status, words):
    assert_ollama_error(post(model_url, path, body, headers=auth()), status, *words)


def test_bad_json_and_methods_in_ollama_shape(model_url):
    assert_ollama_error(post(model_url, "/api/chat", data=b"{not json", headers=auth()), 400, "JSON")
    assert_ollama_error(requests.get(model_url + "/api/chat", headers=auth(), timeout=10), 405)
    assert_ollama_error(requests.post(model_url + "/api/pull", json={"model": "x"}, headers=auth(), timeout=10), 404,
                        "POST /api/chat")
