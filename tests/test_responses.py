"""POST /v1/responses (the OpenAI Responses API) with the official `openai` client and raw HTTP.

Runs on both tiny models (`model_url`: the demo LLaVA, then the tiny HCX remote-code model) or
HCX_TEST_URL. Random weights: texts are compared with each other (same seed, same text) and
tokens counted (min_tokens == max_output_tokens), never judged.
"""

from __future__ import annotations

import json
import os

import pytest
import requests

from tests.fixtures import REQUEST_TIMEOUT, b64, image_bytes, post

openai = pytest.importorskip("openai")

ROUTE = "/v1/responses"
N = 8
DATA_URL = b64(image_bytes("png"), data_url=True)
SAMPLED = {"temperature": 0.9, "top_p": 0.95, "extra_body": {"seed": 4321, "min_tokens": N}, "max_output_tokens": N}


def auth() -> dict:
    key = os.environ.get("HCX_TEST_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def image_input(text: str = "What is in this picture?", url: str = DATA_URL) -> list:
    return [{"role": "user", "content": [{"type": "input_text", "text": text},
                                         {"type": "input_image", "image_url": url}]}]


@pytest.fixture
def client(model_url):
    return openai.OpenAI(base_url=model_url + "/v1", api_key=os.environ.get("HCX_TEST_API_KEY", "x"), max_retries=0,
                         timeout=REQUEST_TIMEOUT)


def assert_response(resp, n: int = N) -> str:
    """The Response object as the SDK parses it; returns its text."""
    assert resp.object == "response" and resp.id.startswith("resp_")
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens", resp
    assert len(resp.output) == 1
    item = resp.output[0]
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert [part.type for part in item.content] == ["output_text"]
    assert item.content[0].annotations == []
    usage = resp.usage
    assert usage.output_tokens == n and usage.input_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert resp.output_text == item.content[0].text  # the SDK's convenience, computed client side
    return resp.output_text


def stream_text(events) -> tuple[str, list, object]:
    """Join a raw event stream: (text, event types, the final response)."""
    text, kinds, final = [], [], None
    for event in events:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text.append(event.delta)
        if event.type in ("response.completed", "response.incomplete", "response.failed"):
            final = event.response
    return "".join(text), kinds, final


# ---------------------------------------------------------------------------------------------
# the official client
# ---------------------------------------------------------------------------------------------


def test_string_input(client):
    resp = client.responses.create(model="any", input="Say hello.", max_output_tokens=N, extra_body={"min_tokens": N})
    assert isinstance(assert_response(resp), str)
    assert resp.max_output_tokens == N and resp.store is False


def test_image_input_and_instructions(client):
    resp = client.responses.create(model="any", input=image_input(), instructions="Answer in one sentence.",
                                   max_output_tokens=N, extra_body={"min_tokens": N})
    assert_response(resp)
    assert resp.instructions == "Answer in one sentence."
    plain = client.responses.create(model="any", input="What is in this picture?", max_output_tokens=N,
                                    extra_body={"min_tokens": N})
    assert resp.usage.input_tokens > plain.usage.input_tokens, "the image costs prompt tokens"


def test_stream_equals_non_stream_for_a_seed(client):
    whole = assert_response(client.responses.create(model="any", input=image_input(), **SAMPLED))
    events = list(client.responses.create(model="any", input=image_input(), stream=True, **SAMPLED))
    text, kinds, final = stream_text(events)
    assert text == whole
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"], kinds
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"], kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.usage.output_tokens == N and final.output[0].content[0].text == whole
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1


def test_stream_helper(client):
    """`responses.stream()` accumulates the events itself and checks their order and item ids; an
    answer cut at max_output_tokens ends with response.incomplete, as OpenAI's do."""
    with client.responses.stream(model="any", input="Count to three.", **SAMPLED) as stream:
        events = list(stream)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    final = events[-1]
    assert final.type == "response.incomplete", [e.type for e in events]
    assert final.response.output[0].content[0].text == "".join(deltas)
    assert final.response.usage.output_tokens == N


def test_completed_when_the_answer_ends_early(client):
    """An answer that ends before the limit is `completed`, and the stream helper has its final
    response. The random model never stops on its own: a stop string taken from the seeded answer
    (`stop`, an extension like seed) ends it early, deterministically."""
    seeded = {"temperature": 0.9, "extra_body": {"seed": 99}, "max_output_tokens": 12}
    text = client.responses.create(model="any", input="Hi.", **seeded).output_text
    stop = text[len(text) // 2:][:2]
    seeded["extra_body"]["stop"] = [stop]
    resp = client.responses.create(model="any", input="Hi.", **seeded)
    assert resp.status == "completed" and resp.incomplete_details is None, resp
    assert resp.output[0].status == "completed" and resp.output_text == text[:text.index(stop)]
    with client.responses.stream(model="any", input="Hi.", **seeded) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == resp.output_text


def test_multi_turn_with_an_earlier_answer(client):
    first = client.responses.create(model="any", input="Hello.", max_output_tokens=4)
    history = [{"role": "user", "content": "Hello."},
               {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": first.output_text,
                                                                     "annotations": []}]},
               {"role": "user", "content": [{"type": "input_text", "text": "And now?"}]}]
    second = client.responses.create(model="any", input=history, max_output_tokens=4)
    assert second.usage.input_tokens > first.usage.input_tokens


def test_item_reference_to_an_answer_of_this_server(client):
    """The Vercel AI SDK refers back to earlier assistant turns by item id."""
    first = client.responses.create(model="any", input="Hello.", max_output_tokens=4)
    ref = [{"role": "user", "content": "Hello."}, {"type": "item_reference", "id": first.output[0].id},
           {"role": "user", "content": "And now?"}]
    by_text = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "And now?"}]
    a = client.responses.create(model="any", input=ref, max_output_tokens=4, temperature=0)
    b = client.responses.create(model="any", input=by_text, max_output_tokens=4, temperature=0)
    assert a.usage.input_tokens == b.usage.input_tokens and a.output_text == b.output_text
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="any", input=[{"type": "item_reference", "id": "msg_unknown"}])
    assert info.value.body["code"] == "item_not_found"


@pytest.mark.parametrize("kwargs, param", [
    ({"store": True}, "store"),
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}]}, "tools"),
    ({"text": {"format": {"type": "json_object"}}}, "text"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"background": True}, "background"),
    ({"truncation": "auto"}, "truncation"),
    ({"conversation": "conv_1"}, "conversation"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_unsupported_fields_are_400_naming_them(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="any", input="Hi.", max_output_tokens=2, **kwargs)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param and param in info.value.body["message"], info.value.body
    if param in ("store", "previous_response_id"):
        assert "stores no responses" in info.value.body["message"]


def test_harmless_fields_are_accepted(client):
    resp = client.responses.create(model="any", input="Hi.", max_output_tokens=2, store=False, metadata={"k": "v"},
                                   tool_choice="auto", text={"format": {"type": "text"}}, truncation="disabled",
                                   parallel_tool_calls=False, user="someone")
    assert resp.metadata == {"k": "v"} and resp.usage.output_tokens <= 2


# ---------------------------------------------------------------------------------------------
# raw HTTP: the error shape and the event stream
# ---------------------------------------------------------------------------------------------


def assert_openai_error(resp, status: int, param=None, code=None) -> dict:
    assert resp.status_code == status, resp.text[:500]
    body = resp.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


@pytest.mark.parametrize("body, param, code", [
    ({"model": "m"}, "input", "missing_field"),
    ({"input": []}, "input", "invalid_value"),
    ({"input": 5}, "input", "invalid_value"),
    ({"input": [{"role": "assistant", "content": "x"}]}, "input", "invalid_value"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role", "invalid_value"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input[0]", "unsupported_parameter"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0]",
     "invalid_value"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
     "input[0].content[0].image_url", "invalid_type"),
    ({"input": image_input(url="data:image/png;base64,!!!")}, "input[0].content[1].image_url", "invalid_base64"),
    ({"input": image_input(url="https://example.com/cat.png")}, "input[0].content[1].image_url", "invalid_image_url"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
    ({"input": "x", "top_p": 0}, "top_p", "invalid_value"),
    ({"input": "x", "temperature": 3}, "temperature", "invalid_value"),
    ({"input": "x", "stream": "yes"}, "stream", "invalid_type"),
    ({"input": "x", "model": 5}, "model", "invalid_type"),
], ids=["no_input", "empty_list", "number", "no_user", "bad_role", "tool_output", "input_file", "file_id",
        "bad_base64", "remote_image", "max_output_tokens", "top_p", "temperature", "stream_type", "model_type"])
def test_bad_requests(model_url, body, param, code):
    assert_openai_error(post(model_url, ROUTE, body, headers=auth()), 400, param, code)


def test_raw_stream_wire_format(model_url):
    resp = requests.post(model_url + ROUTE, json={"input": "Hi.", "max_output_tokens": 3, "stream": True,
                                                  "min_tokens": 3}, headers=auth(), timeout=REQUEST_TIMEOUT)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    frames = [f for f in resp.text.split("\n\n") if f.strip()]
    payloads = []
    for frame in frames:
        event, data = frame.split("\n")
        assert event.startswith("event: ") and data.startswith("data: "), frame
        payload = json.loads(data[len("data: "):])
        assert payload["type"] == event[len("event: "):]
        payloads.append(payload)
    assert "[DONE]" not in resp.text, "the Responses stream has no [DONE] sentinel"
    deltas = [p for p in payloads if p["type"] == "response.output_text.delta"]
    assert deltas and all(set(p) >= {"item_id", "output_index", "content_index", "delta", "logprobs"} for p in deltas)
    assert payloads[-1]["type"] == "response.incomplete"
    assert payloads[-1]["response"]["usage"]["output_tokens"] == 3


def test_error_before_streaming_is_json(model_url):
    resp = post(model_url, ROUTE, {"input": "x", "stream": True, "store": True}, headers=auth())
    assert_openai_error(resp, 400, "store", "unsupported_parameter")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/embeddings", "/v1/audio/speech"])
def test_unknown_v1_routes_name_the_supported_endpoints(server_url, path):
    error = assert_openai_error(requests.post(server_url + path, json={}, headers=auth(), timeout=10), 404)
    for endpoint in ("POST /v1/chat/completions", "POST /v1/responses", "GET /v1/models"):
        assert endpoint in error["message"], error
