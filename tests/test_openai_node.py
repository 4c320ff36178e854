"""The JavaScript OpenAI clients against a live server: the `openai` npm package (chat completions
and the Responses API, plain and streamed) and the Vercel AI SDK (`openai(id)` calls /v1/responses
by default, `openai.chat(id)` chat completions), run by tests/node/openai_clients.mjs.

Every call there is seeded with min_tokens == max tokens, so the checks are token counts and
stream == non-stream (and: the same seeded prompt gives the same text through every API).
"""

from __future__ import annotations

import json

import pytest

from tests.fixtures import NODE_DIR, image_bytes, node_packages_ready, run_node

N = 6  # the script's token count


@pytest.fixture(scope="module")
def summary(server_url, tmp_path_factory) -> dict:
    node = node_packages_ready()
    picture = tmp_path_factory.mktemp("openai-node") / "picture.png"
    picture.write_bytes(image_bytes("png"))
    return run_node([node, str(NODE_DIR / "openai_clients.mjs"), server_url, str(picture)])


def test_every_step_ran(summary):
    assert summary["steps"] == ["openai chat", "openai responses", "openai error", "ai-sdk responses",
                                "ai-sdk second turn", "ai-sdk chat"], summary["steps"]
    version = json.loads((NODE_DIR / "node_modules" / "openai" / "package.json").read_text())["version"]
    assert int(version.split(".")[0]) >= 7, version


def test_openai_npm_chat_and_responses(summary):
    chat, responses = summary["chat"], summary["responses"]
    assert chat["tokens"] == chat["streamedTokens"] == N and chat["streamed"] == chat["text"]
    assert responses["tokens"] == N and responses["status"] == "incomplete"
    assert responses["streamed"] == responses["text"]
    assert (responses["firstEvent"], responses["lastEvent"]) == ("response.created", "response.incomplete")
    assert responses["text"] == chat["text"], "same model, same seed, same prompt: same answer through both APIs"


def test_openai_npm_error_is_typed(summary):
    assert summary["storeError"] == {"status": 400, "param": "store", "name": "BadRequestError"}


def test_vercel_ai_sdk(summary):
    ai = summary["aiSdkResponses"]
    assert ai["tokens"] == ai["streamedTokens"] == N and ai["streamed"] == ai["text"]
    assert ai["finishReason"] == "length" and ai["responseId"].startswith("resp_")
    assert ai["text"] == summary["chat"]["text"]
    second = summary["aiSdkSecondTurn"]
    assert second["sentTypes"] == ["message:user", "item_reference", "message:user"], second
    assert 0 < second["tokens"] <= 3
    assert summary["aiSdkChat"]["tokens"] == N and summary["aiSdkChat"]["text"] == ai["text"]
