"""Structured output and tool calls: JSON that always parses (grammar-constrained decoding with
llguidance in our own decode loop).

The tiny models have random weights -- the hardest case: they would never write valid JSON by
chance, so every answer below parses and validates only because the token mask made it so.
Schemas use bounded strings, enums, integers, numbers with bounds (multipleOf keeps their digits
finite), arrays with maxItems, nested objects, required fields and Korean text, so that a random
model's answer also ends within max_tokens.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
import requests

import server
from tests.fixtures import SEED_ROUTE, SEED_STREAM_ROUTE, b64, image_bytes, post, stream_chunks, tiny_server

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                              "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                              "member": {"type": "boolean"}},
             "required": ["name", "age", "member"]},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                                  "tags": {"type": "array", "maxItems": 3,
                                                           "items": {"type": "string", "maxLength": 5}}},
                 "required": ["id", "tags"]},
        "score": {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.25}},
        "required": ["user", "score"]},
    "enums_korean": {"type": "object", "properties": {
        "colour": {"enum": ["빨간색", "파란색", "초록색"]},
        "object": {"type": "string", "maxLength": 6, "description": "한국어 단어"},
        "count": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["colour", "object", "count"]},
    "array_of_objects": {"type": "object", "properties": {"items": {
        "type": "array", "minItems": 1, "maxItems": 3,
        "items": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                                                   "qty": {"type": "integer", "minimum": 1, "maximum": 5}},
                  "required": ["sku", "qty"]}}}, "required": ["items"]},
    "optional_fields": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 8},
                                                         "note": {"type": "string", "maxLength": 4}},
                        "required": ["title"]},
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                         "b": {"type": "integer", "minimum": -99, "maximum": 99}},
        "required": ["a", "b"]}}},
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MODES = {"greedy": {"temperature": 0}, "sampled": {"temperature": 1.0, "top_p": 0.95, "seed": 11}}


@pytest.fixture(scope="module", params=["demo", "hcx-v2"])
def url(request, tmp_path_factory):
    with tiny_server(request.param, tmp_path_factory) as srv:
        yield srv.url


def client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)


def messages(text="Answer as JSON about the picture.", image: bool = True) -> list[dict]:
    content = [{"type": "text", "text": text}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": b64(image_bytes("png"), data_url=True)}})
    return [{"role": "user", "content": content}]


def schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def streamed(stream) -> tuple[str, str, list]:
    """(content, finish_reason, tool_call deltas) of a streamed chat completion."""
    text, finish, calls = [], None, []
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        text.append(delta.content or "")
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    return "".join(text), finish, calls


# -- response_format: every answer parses and validates --------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_answers_always_validate(url, name, mode):
    args = {"model": "m", "messages": messages(), "response_format": schema_format(name), "max_tokens": 400,
            **MODES[mode]}
    reply = client(url).chat.completions.create(**args)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])
    text, finish, _ = streamed(client(url).chat.completions.create(**args, stream=True))
    assert finish == "stop" and text == choice.message.content  # streamed == not streamed
    jsonschema.validate(json.loads(text), SCHEMAS[name])


@pytest.mark.parametrize("seed", range(3))
def test_json_object_mode_gives_an_object(url, seed):
    reply = client(url).chat.completions.create(model="m", messages=messages("JSON please.", image=False),
                                                response_format={"type": "json_object"}, max_tokens=600,
                                                temperature=0.7, seed=seed)
    choice = reply.choices[0]
    if choice.finish_reason == "length":  # a random model may write one endless object: cut, said so
        assert choice.model_extra.get("incomplete")
    else:
        assert isinstance(json.loads(choice.message.content), dict)


def test_max_tokens_cut_is_length_and_says_the_json_is_incomplete(url):
    body = {"model": "m", "messages": messages(), "response_format": schema_format("nested"), "max_tokens": 3}
    reply = post(url, "/v1/chat/completions", body).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "length" and "was complete" in choice["incomplete"]
    resp, chunks, _ = stream_chunks(url, "/v1/chat/completions", {**body, "stream": True})
    events = [json.loads(line[6:]) for line in b"".join(chunks).decode().splitlines()
              if line.startswith("data: {")]
    last = [e for e in events if e["choices"]][-1]["choices"][0]
    assert last["finish_reason"] == "length" and "was complete" in last["incomplete"]


def test_openai_parse_helper_returns_the_pydantic_object(url):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Sighting(BaseModel):
        animal: Literal["cat", "dog", "bird"]
        count: int = Field(ge=1, le=5)
        where: str = Field(max_length=8)

    parsed = client(url).chat.completions.parse(model="m", messages=messages(), response_format=Sighting,
                                               max_tokens=200, temperature=0)
    sighting = parsed.choices[0].message.parsed
    assert isinstance(sighting, Sighting) and 1 <= sighting.count <= 5


# -- tool calls ---------------------------------------------------------------------------------------


def assert_valid_call(call, names=("get_weather", "add")):
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


@pytest.mark.parametrize("mode", MODES)
def test_named_tool_choice_forces_a_valid_call(url, mode):
    choice = {"type": "function", "function": {"name": "add"}}
    args = {"model": "m", "messages": messages("What is 2 + 3?", image=False), "tools": TOOLS, "tool_choice": choice,
            "max_tokens": 200, **MODES[mode]}
    reply = client(url).chat.completions.create(**args)
    assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
    (call,) = reply.choices[0].message.tool_calls
    assert_valid_call(call, ("add",))
    # streamed as tool_calls deltas: an id and name first, then the arguments in pieces, same call
    text, finish, deltas = streamed(client(url).chat.completions.create(**args, stream=True))
    assert finish == "tool_calls" and text == ""
    assert deltas[0].id and deltas[0].function.name == "add"
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments


def test_required_tool_choice_calls_one_of_the_tools(url):
    reply = client(url).chat.completions.create(model="m", messages=messages("Weather in Seoul?"), tools=TOOLS,
                                                tool_choice="required", max_tokens=200, temperature=1.0, seed=3)
    assert reply.choices[0].finish_reason == "tool_calls"
    assert_valid_call(reply.choices[0].message.tool_calls[0])


@pytest.mark.parametrize("seed", range(4))
def test_auto_answers_text_or_a_valid_call(url, seed):
    reply = client(url).chat.completions.create(model="m", messages=messages("Hi!", image=False), tools=TOOLS,
                                                max_tokens=120, temperature=1.0, seed=seed)
    choice = reply.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        assert_valid_call(choice.message.tool_calls[0])
    else:
        assert choice.message.content is not None and not choice.message.content.startswith("<")


def test_tool_results_in_the_history_reach_the_prompt(url):
    history = [{"role": "user", "content": "What is 2 + 3?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    req = server.openai_request({"messages": history, "tools": TOOLS}, server.load_config({}))
    prompt = server.with_constraint_instructions(req.messages, req.constraint)  # what build_inputs renders
    texts = [m.text for m in prompt]
    assert prompt[0].role == "system" and "get_weather" in texts[0] and "<tool_call>" in texts[0]
    assert '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>' in texts[2]
    assert prompt[3].role == "user" and '"content": "5"' in texts[3] and "call_1" in texts[3]
    reply = client(url).chat.completions.create(model="m", messages=history, tools=TOOLS, max_tokens=40,
                                                temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


# -- the other APIs: seed REST, MCP, Responses, Ollama -----------------------------------------------


def test_seed_route_json_schema(url):
    body = {"prompt": "이 사진을 JSON으로 설명해 주세요.", "image_base64": b64(image_bytes("png")),
            "json_schema": SCHEMAS["enums_korean"], "max_tokens": 200, "temperature": 0.8, "seed": 2}
    plain = post(url, SEED_ROUTE, body)
    assert plain.status_code == 200 and set(plain.json()) == {"result"}
    jsonschema.validate(json.loads(plain.json()["result"]), SCHEMAS["enums_korean"])
    resp, chunks, _ = stream_chunks(url, SEED_STREAM_ROUTE, body)
    assert b"".join(chunks).decode("utf-8") == plain.json()["result"]
    cut = post(url, SEED_ROUTE, {**body, "max_tokens": 2}).json()
    assert "was complete" in cut["incomplete"]


def test_mcp_tool_json_schema_gives_structured_content(url):
    from mcp import Client

    async def call():
        async with Client(url + "/mcp") as c:
            return await c.call_tool(server.TOOL_NAME, {"prompt": "JSON please", "json_schema": SCHEMAS["flat"],
                                                        "max_tokens": 200, "temperature": 0})

    result = asyncio.run(call())
    assert not result.is_error, result
    value = json.loads(result.content[0].text)
    jsonschema.validate(value, SCHEMAS["flat"])
    assert result.structured_content == value


def test_responses_text_format_json_schema(url):
    reply = client(url).responses.create(model="m", input="Describe as JSON.", max_output_tokens=200, temperature=0,
                                         text={"format": {"type": "json_schema", "name": "flat",
                                                          "schema": SCHEMAS["flat"], "strict": True}})
    jsonschema.validate(json.loads(reply.output_text), SCHEMAS["flat"])


def test_ollama_format_json_and_schema(url):
    import ollama

    c = ollama.Client(host=url)
    answer = c.chat(model="m", messages=[{"role": "user", "content": "JSON"}], format=SCHEMAS["flat"],
                    options={"temperature": 0, "num_predict": 200})
    jsonschema.validate(json.loads(answer.message.content), SCHEMAS["flat"])
    generated = c.generate(model="m", prompt="JSON", format="json", options={"temperature": 0, "num_predict": 200})
    if generated.done_reason != "length":
        assert isinstance(json.loads(generated.response), dict)


# -- schemas that cannot be used: a clear 400 naming the problem --------------------------------------


@pytest.mark.parametrize("fmt,words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "(?<=x)y"}}}}}, ("cannot be compiled", "look-around")),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        f"p{i}": {"type": "string", "description": "x" * 200} for i in range(400)}}}}, ("bytes of JSON schema",)),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}}, ("JSON schema object",)),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, ("needs a 'schema'",)),
    ({"type": "yaml"}, ("json_object or json_schema",)),
])
def test_bad_schemas_are_a_clear_400(url, fmt, words):
    resp = post(url, "/v1/chat/completions", {"model": "m", "messages": messages(image=False), "response_format": fmt})
    assert resp.status_code == 400, resp.text
    message = resp.json()["error"]["message"]
    for word in words:
        assert word in message, message
    assert requests.get(url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("body,words", [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, ("unique name",)),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, ("not among the tools",)),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, ("tool_choice",)),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, ("either 'tools'",)),
    ({"tools": "get_weather"}, ("non-empty list",)),
])
def test_bad_tools_are_a_clear_400(url, body, words):
    resp = post(url, "/v1/chat/completions", {"model": "m", "messages": messages(image=False), **body})
    assert resp.status_code == 400, resp.text
    for word in words:
        assert word in resp.json()["error"]["message"]


# -- LangChain, as agent frameworks use it (against the demo server) ---------------------------------


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    with tiny_server("demo", tmp_path_factory) as srv:
        yield srv.url


@pytest.mark.parametrize("how", ["function_calling", "json_mode", "json_schema", "json_schema_responses_api"])
def test_langchain_with_structured_output(demo_url, how):
    pytest.importorskip("langchain_openai")
    from typing import Literal

    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        colour: Literal["red", "blue", "green"]
        confidence: int = Field(ge=0, le=100)

    method = "json_schema" if how.startswith("json_schema") else how
    llm = ChatOpenAI(base_url=demo_url + "/v1", api_key="x", model="m", max_tokens=200, temperature=0, max_retries=0,
                     use_responses_api=how.endswith("responses_api"))
    schema = Answer if method != "json_mode" else Answer.model_json_schema()
    result = llm.with_structured_output(schema, method=method).invoke("What colour is the sky? Answer in JSON.")
    if method == "json_mode":  # the server only hears "a JSON object": any object is a right answer
        assert isinstance(result, dict)
        return
    assert isinstance(result, Answer) and result.colour in ("red", "blue", "green")


def test_langchain_bind_tools(demo_url):
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=demo_url + "/v1", api_key="x", model="m", max_tokens=200, temperature=0, max_retries=0)
    message = llm.bind_tools([t["function"] for t in TOOLS], tool_choice="add").invoke("What is 2 + 3?")
    (call,) = message.tool_calls
    assert call["name"] == "add"
    jsonschema.validate(call["args"], PARAMETERS["add"])
