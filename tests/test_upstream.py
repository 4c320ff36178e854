"""BACKEND=openai: hcx-server in front of a fleet of real OpenAI-compatible upstreams.

The fleet is three real `hcx-cli serve` servers on the demo model (their /v1 is an OpenAI-compatible
server, as vLLM's is), started once for the module; the front is one more `hcx-cli serve` with
BACKEND=openai and UPSTREAM_URLS naming them; no mocks anywhere. Checked here:

- every API through the front (seed REST plain and streamed, OpenAI chat and Responses plain and
  streamed, Ollama chat and generate plain and streamed, MCP tools/call with progress over HTTP and
  over stdio, the CLI with --url and with BACKEND=openai) gives the same text and token counts as an
  upstream asked directly, greedy and with seeded sampling, images included; streams arrive in
  several chunks;
- balancing (the upstream with the fewest requests in flight), /health and /metrics per upstream;
- an upstream SIGKILLed during a loop of requests: nothing that had not started fails, the stream
  that was under way there ends with a clean error marker, the upstream is used again once it is
  back; a client that hangs up closes the upstream stream;
- errors: all upstreams down (503 + Retry-After in every API's shape), an upstream's 400 (its
  message in the client's API shape), an upstream slower than UPSTREAM_TIMEOUT (504 / a marker),
  MAX_QUEUE per upstream (503 + Retry-After); config keys checked at start-up.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

import server
from tests.fixtures import (
    SEED_ROUTE,
    SEED_STREAM_ROUTE,
    LiveServer,
    b64,
    free_port,
    image_bytes,
    local_only,
    run_cli,
    stream_chunks,
)
from tests.hardening_helpers import (
    check_openai_error,
    check_seed_error,
    check_tool_result,
    metrics,
    tools_call,
    wait_until,
)

pytestmark = local_only

TIMEOUT = 60
TOKENS = 8
IMAGE = image_bytes("png")
IMAGE_B64 = b64(IMAGE)
SAMPLINGS = {"greedy": {"temperature": 0}, "seeded": {"temperature": 0.9, "top_p": 0.9, "seed": 11}}
TOOL = server.TOOL_NAME
UPSTREAM_ENV = {"TORCH_THREADS": 1}


# ----------------------------------------------------------------------------------------
# the fleet and the front
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(demo_model_dir):
    """Three demo servers on fixed ports (so that a killed one comes back at the same address)."""
    servers = [LiveServer(demo_model_dir, env=UPSTREAM_ENV, name=f"hcx-upstream-{i}", port=free_port())
               for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        try:
            list(pool.map(LiveServer.start, servers))
            yield servers
        finally:
            list(pool.map(LiveServer.stop, servers))


def front_env(upstreams, **extra) -> dict:
    return {"BACKEND": "openai", "UPSTREAM_URLS": ",".join(f"{u.url}/v1" for u in upstreams), **extra}


@pytest.fixture(scope="module")
def front(fleet):
    with LiveServer(None, env=front_env(fleet, UPSTREAM_TIMEOUT=30), name="hcx-front") as srv:
        yield srv


def upstream_health(front) -> dict:
    body = requests.get(front.url + "/health", timeout=TIMEOUT).json()
    return {u["url"]: u for u in body.get("upstreams", [])}


def wait_all_up(front, fleet, timeout: float = 20) -> None:
    wait_until(lambda: all(upstream_health(front)[f"{u.url}/v1"]["state"] == "up" for u in fleet), timeout,
               what="every upstream up at the front")


def open_stream(base: str, path: str, body: dict):
    """POST a streamed request and read its first chunk: (response, the chunk iterator). Keep the
    iterator: an abandoned one makes urllib3 close the connection (the client hangs up)."""
    resp = requests.post(base + path, json=body, stream=True, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    chunks = resp.iter_content(chunk_size=None)
    return resp, chunks, next(chunks)


def upstream_requests(front, upstream, outcome: str = "ok") -> float:
    return metrics(front.url).get(f'hcx_upstream_requests_total{{upstream="{upstream.url}/v1",outcome="{outcome}"}}',
                                  0.0)


# ----------------------------------------------------------------------------------------
# every API, the same request: (text, token counts, chunks) from a base URL
# ----------------------------------------------------------------------------------------


def sse_data(chunks: list[bytes]) -> list[dict]:
    """The JSON of every `data:` line of an SSE body (the [DONE] line left out)."""
    text = b"".join(chunks).decode("utf-8")
    return [json.loads(line[5:]) for line in text.splitlines()
            if line.startswith("data:") and line[5:].strip() != "[DONE]"]


def ask(base: str, api: str, sampling: dict, image: bool) -> dict:
    """One request through `api`; returns {"text", "tokens" (what the API reports, or None), "chunks"}."""
    prompt = "Describe the image in one sentence." if image else "안녕하세요, 한국어로 답해 주세요."
    common = {"max_tokens": TOKENS, "min_tokens": TOKENS, **sampling}
    part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMAGE_B64}"}}
    chat = {"model": "m", "messages": [{"role": "user", "content": ([part] if image else []) + [
        {"type": "text", "text": prompt}]}], **common}
    seed = {"prompt": prompt, **({"image_base64": IMAGE_B64} if image else {}), **common}
    options = {"num_predict": TOKENS, "min_tokens": TOKENS, **sampling}
    images = {"images": [IMAGE_B64]} if image else {}
    if api == "seed":
        resp = requests.post(base + SEED_ROUTE, json=seed, timeout=TIMEOUT)
        assert resp.status_code == 200, resp.text
        return {"text": resp.json()["result"], "tokens": None, "chunks": 1}
    if api == "seed-stream":
        resp, chunks, _ = stream_chunks(base, SEED_STREAM_ROUTE, seed, timeout=TIMEOUT)
        assert resp.status_code == 200
        text = b"".join(chunks).decode("utf-8")
        assert "[error]" not in text, text
        return {"text": text, "tokens": None, "chunks": len(chunks)}
    if api == "chat":
        resp = requests.post(base + "/v1/chat/completions", json=chat, timeout=TIMEOUT)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        return {"text": body["choices"][0]["message"]["content"], "chunks": 1,
                "tokens": (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])}
    if api == "chat-stream":
        resp, chunks, _ = stream_chunks(base, "/v1/chat/completions",
                                        {**chat, "stream": True, "stream_options": {"include_usage": True}},
                                        timeout=TIMEOUT)
        assert resp.status_code == 200
        events = sse_data(chunks)
        assert not any("error" in e for e in events), events
        deltas = [c["delta"].get("content", "") for e in events for c in e["choices"]]
        usage = events[-1]["usage"]
        return {"text": "".join(deltas), "chunks": sum(bool(d) for d in deltas),
                "tokens": (usage["prompt_tokens"], usage["completion_tokens"])}
    if api in ("responses", "responses-stream"):
        content = [{"type": "input_text", "text": prompt}] + (
            [{"type": "input_image", "image_url": f"data:image/png;base64,{IMAGE_B64}"}] if image else [])
        body = {"model": "m", "input": [{"role": "user", "content": content}], "max_output_tokens": TOKENS,
                "min_tokens": TOKENS, **sampling}
        if api == "responses":
            resp = requests.post(base + "/v1/responses", json=body, timeout=TIMEOUT)
            assert resp.status_code == 200, resp.text
            reply = resp.json()
            return {"text": reply["output"][0]["content"][0]["text"], "chunks": 1,
                    "tokens": (reply["usage"]["input_tokens"], reply["usage"]["output_tokens"])}
        resp, chunks, _ = stream_chunks(base, "/v1/responses", {**body, "stream": True}, timeout=TIMEOUT)
        events = sse_data(chunks)
        deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
        final = events[-1]
        assert final["type"] in ("response.completed", "response.incomplete"), final
        usage = final["response"]["usage"]
        return {"text": "".join(deltas), "chunks": len(deltas),
                "tokens": (usage["input_tokens"], usage["output_tokens"])}
    if api.startswith("ollama"):
        chat_api = api.startswith("ollama-chat")
        body = {"model": "m", "options": options, "stream": api.endswith("-stream")}
        if chat_api:
            body["messages"] = [{"role": "user", "content": prompt, **images}]
        else:
            body.update(prompt=prompt, **images)
        path = "/api/chat" if chat_api else "/api/generate"
        if not body["stream"]:
            resp = requests.post(base + path, json=body, timeout=TIMEOUT)
            assert resp.status_code == 200, resp.text
            reply = resp.json()
            text = reply["message"]["content"] if chat_api else reply["response"]
            return {"text": text, "chunks": 1, "tokens": (reply["prompt_eval_count"], reply["eval_count"])}
        resp, chunks, _ = stream_chunks(base, path, body, timeout=TIMEOUT)
        lines = [json.loads(line) for line in b"".join(chunks).decode("utf-8").splitlines() if line.strip()]
        assert not any("error" in line for line in lines), lines
        pieces = [(line["message"]["content"] if chat_api else line["response"]) for line in lines[:-1]]
        return {"text": "".join(pieces), "chunks": len(pieces),
                "tokens": (lines[-1]["prompt_eval_count"], lines[-1]["eval_count"])}
    if api == "mcp":
        call = tools_call({"prompt": prompt, **({"image_base64": IMAGE_B64} if image else {}), **common})
        call["params"]["_meta"] = {"progressToken": "p"}
        resp, chunks, _ = stream_chunks(base, "/mcp", call, timeout=TIMEOUT,
                                        headers={"Accept": "application/json, text/event-stream"})
        messages = sse_data(chunks)
        progress = [m for m in messages if m.get("method") == "notifications/progress"]
        result = messages[-1]["result"]
        assert result["isError"] is False, result
        return {"text": result["content"][0]["text"], "tokens": None, "chunks": len(progress)}
    raise ValueError(api)


APIS = ("seed", "seed-stream", "chat", "chat-stream", "responses", "responses-stream", "ollama-chat",
        "ollama-chat-stream", "ollama-generate", "ollama-generate-stream", "mcp")


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("api", APIS)
def test_every_api_through_the_front_answers_as_the_upstream(fleet, front, api, sampling):
    image = sampling == "seeded"  # greedy text-only, seeded sampling with an image
    direct = ask(fleet[0].url, api, SAMPLINGS[sampling], image)
    through = ask(front.url, api, SAMPLINGS[sampling], image)
    assert through["text"] == direct["text"], (through, direct)
    assert through["tokens"] == direct["tokens"], (through, direct)
    if through["tokens"] is not None:
        assert through["tokens"][1] == TOKENS
    if api.endswith("-stream") or api == "mcp":
        assert through["chunks"] > 1, f"the answer came in {through['chunks']} chunk(s)"


def test_official_clients_through_the_front(fleet, front):
    """The openai and ollama clients, pointed at the front, get what they get from an upstream."""
    import ollama
    from openai import OpenAI

    def openai_answers(base: str) -> tuple[str, str]:
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        kwargs = {"model": "m", "max_tokens": TOKENS, "seed": 5, "temperature": 0.8,
                  "extra_body": {"min_tokens": TOKENS}}
        messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                 {"type": "image_url", "image_url": {
                                                     "url": f"data:image/jpeg;base64,{b64(image_bytes('jpeg'))}"}}]}]
        plain = client.chat.completions.create(messages=messages, **kwargs).choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            messages=messages, stream=True, **kwargs) if c.choices)
        assert plain == streamed
        return plain, client.models.list().data[0].id

    def ollama_answer(base: str) -> str:
        reply = ollama.Client(host=base).chat(model="m", messages=[{"role": "user", "content": "Hi"}],
                                              options={"num_predict": TOKENS, "seed": 2, "temperature": 0.7})
        return reply.message.content

    front_text, front_model = openai_answers(front.url)
    direct_text, _ = openai_answers(fleet[1].url)
    assert front_text == direct_text
    assert front_model == front.health["model"]
    assert ollama_answer(front.url) == ollama_answer(fleet[2].url)


# ----------------------------------------------------------------------------------------
# /health, /metrics, balancing
# ----------------------------------------------------------------------------------------


def test_health_lists_the_upstreams(fleet, front):
    resp = requests.get(front.url + "/health", timeout=TIMEOUT)
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ok" and body["backend"] == "openai"
    assert [u["url"] for u in body["upstreams"]] == [f"{u.url}/v1" for u in fleet]
    for entry in body["upstreams"]:
        assert entry["state"] == "up" and entry["error"] is None, entry
        assert entry["model"] == fleet[0].health["model"]  # the id the upstream lists
        assert entry["context_length"] == 1024  # the demo model's window, from the upstream's /v1/models
    assert body["context_length"] == 1024 and body["max_queue"] == 8
    page = requests.get(front.url + "/", timeout=TIMEOUT)  # the playground is served by the front too
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    # the listings every API family has describe the served model without any local weights
    name = body["model"]
    card = requests.get(front.url + "/v1/models", timeout=TIMEOUT).json()["data"][0]
    assert card["id"] == name and card["max_model_len"] == 1024
    tags = requests.get(front.url + "/api/tags", timeout=TIMEOUT).json()["models"]
    assert [t["name"] for t in tags] == [f"{name}:latest"]
    show = requests.post(front.url + "/api/show", json={"model": f"{name}:latest"}, timeout=TIMEOUT)
    assert show.status_code == 200 and "vision" in show.json()["capabilities"]
    assert requests.get(front.url + "/api/ps", timeout=TIMEOUT).json()["models"][0]["context_length"] == 1024


def test_requests_go_to_the_upstream_with_the_fewest_in_flight(fleet, front):
    """Three long streams at once land one per upstream; quick ones in turn spread evenly."""
    wait_all_up(front, fleet)
    body = {"prompt": "Tell me a story.", "max_tokens": 800, "min_tokens": 800, "temperature": 0}
    streams = []
    try:
        for _ in range(3):
            streams.append(open_stream(front.url, SEED_STREAM_ROUTE, body))
        in_flight = [u["in_flight"] for u in upstream_health(front).values()]
        assert in_flight == [1, 1, 1], in_flight
    finally:
        for resp, *_ in streams:
            resp.close()
    wait_until(lambda: all(u["in_flight"] == 0 for u in upstream_health(front).values()), 20,
               what="the hung-up streams released at the front")
    before = [upstream_requests(front, u) for u in fleet]
    for _ in range(6):
        ask(front.url, "seed", SAMPLINGS["greedy"], image=False)
    after = [upstream_requests(front, u) for u in fleet]
    assert [b - a for a, b in zip(before, after)] == [2, 2, 2], (before, after)
    m = metrics(front.url)
    for u in fleet:
        assert m[f'hcx_upstream_up{{upstream="{u.url}/v1"}}'] == 1
        assert m[f'hcx_upstream_tokens_total{{upstream="{u.url}/v1"}}'] > 0
    assert "hcx_upstream_retries_total" in m


# ----------------------------------------------------------------------------------------
# an upstream dies, a client leaves
# ----------------------------------------------------------------------------------------


def loop_request(base: str, i: int) -> dict:
    """One short request of the loop: a chat stream or a plain seed request, alternately."""
    body = {"prompt": f"Question {i}?", "max_tokens": 16, "min_tokens": 16, "temperature": 0}
    try:
        if i % 2:
            resp = requests.post(base + SEED_ROUTE, json=body, timeout=TIMEOUT)
            return {"ok": resp.status_code == 200, "status": resp.status_code, "body": resp.text[:300]}
        resp, chunks, _ = stream_chunks(base, "/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": body["prompt"]}], "max_tokens": 16,
            "min_tokens": 16, "temperature": 0, "stream": True}, timeout=TIMEOUT)
        raw = b"".join(chunks).decode("utf-8", "replace")
        return {"ok": resp.status_code == 200 and raw.rstrip().endswith("data: [DONE]"), "status": resp.status_code,
                "body": raw[-300:]}
    except requests.RequestException as exc:
        return {"ok": False, "status": 0, "body": repr(exc)}


def test_an_upstream_killed_mid_loop(fleet, front):
    """SIGKILL of the upstream that streams a long answer while a loop of short requests runs: the
    long stream ends with a clean error marker, every request of the loop succeeds (those queued
    there are sent elsewhere), and the upstream is used again once it is back."""
    wait_all_up(front, fleet)
    long_body = {"model": "m", "messages": [{"role": "user", "content": "A long story, please."}],
                 "max_tokens": 500, "min_tokens": 500, "temperature": 0, "stream": True}
    long_stream, chunks, first = open_stream(front.url, "/v1/chat/completions", long_body)
    received = [first]
    holder = [u for u in fleet if upstream_health(front)[f"{u.url}/v1"]["in_flight"] == 1]
    assert len(holder) == 1, upstream_health(front)
    victim = holder[0]

    results, stop = [], threading.Event()

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            results.append(loop_request(front.url, i))
            i += 4

    clients = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4)]
    try:
        for thread in clients:
            thread.start()
        wait_until(lambda: len(results) >= 4, 30, what="the loop under way")
        while sum(len(c) for c in received) < 2000:  # some text of the long answer reached us
            received.append(next(chunks))
        victim.kill()
        killed_at = len(results)
        received.extend(chunks)
        wait_until(lambda: len(results) >= killed_at + 8, 30, what="the loop going on without the victim")
    finally:
        stop.set()
        for thread in clients:
            thread.join(TIMEOUT)
        long_stream.close()
    failed = [r for r in results if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(results)} loop requests failed: {failed[:3]}"
    events = sse_data(received)
    assert any(e.get("choices") and e["choices"][0]["delta"].get("content") for e in events)
    marker = events[-1]
    assert set(marker) == {"error"}, marker  # the API's own error event, and nothing after it
    assert "broke off" in marker["error"]["message"] and victim.url in marker["error"]["message"], marker
    assert not b"".join(received).rstrip().endswith(b"[DONE]")
    state = upstream_health(front)[f"{victim.url}/v1"]
    assert state["state"] == "down" and state["error"], state
    m = metrics(front.url)
    assert m[f'hcx_upstream_up{{upstream="{victim.url}/v1"}}'] == 0
    assert m[f'hcx_upstream_marked_down_total{{upstream="{victim.url}/v1"}}'] >= 1

    victim.start()  # the same port: the front finds it again by itself
    wait_until(lambda: upstream_health(front)[f"{victim.url}/v1"]["state"] == "up", 20,
               what="the restarted upstream up again at the front")
    before = upstream_requests(front, victim)
    for i in range(3):
        assert loop_request(front.url, i)["ok"]
    assert upstream_requests(front, victim) > before, "the restarted upstream got no request"


def test_a_client_that_hangs_up_closes_the_upstream_stream(fleet, front):
    wait_all_up(front, fleet)
    before = {u.url: metrics(u.url)['hcx_generations_total{outcome="cancelled"}'] for u in fleet}
    body = {"prompt": "A long story.", "max_tokens": 600, "min_tokens": 600, "temperature": 0}
    resp, _, _ = open_stream(front.url, SEED_STREAM_ROUTE, body)
    resp.close()
    hung_up = time.monotonic()

    def cancelled_upstream():
        return [u for u in fleet if metrics(u.url)['hcx_generations_total{outcome="cancelled"}'] > before[u.url]]

    wait_until(cancelled_upstream, 10, what="the upstream's generation cancelled")
    assert time.monotonic() - hung_up < 5  # 600 tokens take several seconds more
    wait_until(lambda: all(u["in_flight"] == 0 for u in upstream_health(front).values()), 10,
               what="the place at the upstream given back")


# ----------------------------------------------------------------------------------------
# errors: an upstream's 400, none up, too slow, too many
# ----------------------------------------------------------------------------------------


def test_an_upstream_400_reaches_the_client_in_its_api_shape(fleet, front):
    """max_tokens 1010 fits the 1024-token window, so the front sends it; the prompt then overflows
    at the upstream, whose message each API passes on in its own shape."""
    wait_all_up(front, fleet)
    chat = {"model": "m", "messages": [{"role": "user", "content": "Hello there."}], "max_tokens": 1010}
    direct = check_openai_error(requests.post(fleet[0].url + "/v1/chat/completions", json=chat, timeout=TIMEOUT),
                                400, "context_length_exceeded")
    err = check_openai_error(requests.post(front.url + "/v1/chat/completions", json=chat, timeout=TIMEOUT),
                             400, "context_length_exceeded")
    assert err["message"] == direct["message"] and "1024" in err["message"]
    seed = check_seed_error(requests.post(front.url + SEED_ROUTE, json={"prompt": "Hello there.", "max_tokens": 1010},
                                          timeout=TIMEOUT), 400)
    assert seed["error"] == direct["message"]
    ollama = requests.post(front.url + "/api/generate", json={"model": "m", "prompt": "Hello there.",
                                                               "options": {"num_predict": 1010}}, timeout=TIMEOUT)
    assert ollama.status_code == 400 and ollama.json() == {"error": direct["message"]}
    text = check_tool_result(requests.post(front.url + "/mcp", json=tools_call({"prompt": "Hello there.",
                                                                                 "max_tokens": 1010}),
                                           timeout=TIMEOUT), is_error=True)
    assert direct["message"] in text
    # what the front can tell by itself: an ask that fills the whole window
    mine = check_openai_error(requests.post(front.url + "/v1/chat/completions", json={**chat, "max_tokens": 1024},
                                            timeout=TIMEOUT), 400, "context_length_exceeded")
    assert "1024" in mine["message"]
    assert all(u["state"] == "up" for u in upstream_health(front).values()), "a 400 marks nothing down"


def test_all_upstreams_down_is_503_with_retry_after():
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with LiveServer(None, env={"BACKEND": "openai", "UPSTREAM_URLS": dead}, name="hcx-front-down",
                    health_status="unavailable") as srv:
        health = requests.get(srv.url + "/health", timeout=TIMEOUT)
        assert health.status_code == 503
        entry = health.json()["upstreams"][0]
        assert entry["url"] == dead and entry["state"] == "down" and "ConnectError" in entry["error"], entry
        seed = requests.post(srv.url + SEED_ROUTE, json={"prompt": "hi"}, timeout=TIMEOUT)
        check_seed_error(seed, 503)
        chat = requests.post(srv.url + "/v1/chat/completions", json={"model": "m", "messages": [
            {"role": "user", "content": "hi"}]}, timeout=TIMEOUT)
        assert check_openai_error(chat, 503, "no_upstream")["message"].startswith("no upstream is available")
        ollama = requests.post(srv.url + "/api/chat", json={"model": "m", "messages": [
            {"role": "user", "content": "hi"}], "stream": False}, timeout=TIMEOUT)
        assert ollama.status_code == 503 and "no upstream" in ollama.json()["error"]
        for resp in (seed, chat, ollama):
            assert int(resp.headers["Retry-After"]) >= 1
        text = check_tool_result(requests.post(srv.url + "/mcp", json=tools_call({"prompt": "hi"}), timeout=TIMEOUT),
                                 is_error=True)
        assert "no upstream" in text


def test_slow_upstream_busy_upstream_and_max_queue(fleet):
    """A front on one upstream with UPSTREAM_TIMEOUT=1 and MAX_QUEUE=1: a second request while one is
    in flight is 503 + Retry-After; a request stuck behind another client's long answer at the
    upstream gives up after 1 s: 504 when no byte was sent yet, an error marker in a stream."""
    upstream = fleet[1]
    long_body = {"prompt": "A long story.", "max_tokens": 900, "min_tokens": 900, "temperature": 0}
    with LiveServer(None, env=front_env([upstream], UPSTREAM_TIMEOUT=1, MAX_QUEUE=1), name="hcx-front-slow") as srv:
        held, chunks, _ = open_stream(srv.url, SEED_STREAM_ROUTE, long_body)
        with held:
            next(chunks)  # streaming: its chunks come far closer than 1 s apart
            busy = requests.post(srv.url + SEED_ROUTE, json={"prompt": "hi", "max_tokens": 2}, timeout=TIMEOUT)
            check_seed_error(busy, 503)
            assert "MAX_QUEUE=1" in busy.json()["error"] and int(busy.headers["Retry-After"]) >= 1
            next(chunks)
        wait_until(lambda: upstream_health(srv)[f"{upstream.url}/v1"]["in_flight"] == 0, 10, what="the place freed")

        # other clients keep the upstream busy directly (a queue of long answers, each 1000 tokens): the
        # front's request waits there in vain
        others = [open_stream(upstream.url, "/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": "Long."}], "max_tokens": 1000, "min_tokens": 1000,
            "temperature": 0, "stream": True}) for _ in range(4)]
        try:
            started = time.monotonic()
            slow = requests.post(srv.url + "/v1/chat/completions", json={"model": "m", "max_tokens": 4, "messages": [
                {"role": "user", "content": "hi"}]}, timeout=TIMEOUT)
            err = check_openai_error(slow, 504, "upstream_timeout")
            assert "UPSTREAM_TIMEOUT=1 s" in err["message"], err
            assert time.monotonic() - started < 5
            wait_until(lambda: upstream_health(srv)[f"{upstream.url}/v1"]["state"] == "up", 10,
                       what="the slow upstream probed up again")
            resp, answer, _ = stream_chunks(srv.url, SEED_STREAM_ROUTE, {"prompt": "hi", "max_tokens": 4},
                                            timeout=TIMEOUT)
            assert resp.status_code == 200
            text = b"".join(answer).decode("utf-8")
            assert text.strip().startswith("[error]") and "UPSTREAM_TIMEOUT=1 s" in text, text
        finally:
            for other, *_ in others:
                other.close()
        assert metrics(srv.url)[f'hcx_upstream_requests_total{{upstream="{upstream.url}/v1",outcome="timeout"}}'] >= 2


# ----------------------------------------------------------------------------------------
# the CLI and stdio MCP with BACKEND=openai
# ----------------------------------------------------------------------------------------


def test_cli_with_url_and_with_backend_openai(fleet, front, tmp_path):
    picture = tmp_path / "red.png"
    picture.write_bytes(IMAGE)
    sampling = ("--max-tokens", str(TOKENS), "--min-tokens", str(TOKENS), "--seed", "4", "--temperature", "0.7")
    env_front = {"BACKEND": "openai", "UPSTREAM_URLS": f"{front.url}/v1"}
    dead = f"http://127.0.0.1:{free_port()}"
    runs = {
        "ask_front": (["ask", "Hello?", "--json", *sampling, "--url", front.url], None),
        "ask_upstream_v1": (["ask", "Hello?", "--json", *sampling, "--url", f"{fleet[0].url}/v1/"], None),
        "ask_backend": (["ask", "Hello?", "--no-stream", *sampling], env_front),
        "ask_stream": (["ask", "Hello?", *sampling, "--url", front.url], None),
        "describe_front": (["describe", str(picture), "--json", *sampling, "--url", front.url], None),
        "dead": (["ask", "Hello?", "--url", dead], None),
        "bad_url": (["ask", "Hello?", "--url", "ftp://example.com"], None),
        "no_upstreams": (["ask", "Hello?"], {"BACKEND": "openai"}),
    }
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(runs, pool.map(lambda r: run_cli(r[0], env=r[1], timeout=120), runs.values())))
    for name in ("ask_front", "ask_upstream_v1", "ask_backend", "ask_stream", "describe_front"):
        assert done[name].returncode == 0, (name, done[name].stderr.decode())

    def direct(image: bool) -> str:
        body = {"prompt": "Describe this image." if image else "Hello?", "max_tokens": TOKENS,
                "min_tokens": TOKENS, "seed": 4, "temperature": 0.7, **({"image_base64": IMAGE_B64} if image else {})}
        return requests.post(fleet[2].url + SEED_ROUTE, json=body, timeout=TIMEOUT).json()["result"]

    text = direct(False)
    for name in ("ask_front", "ask_upstream_v1"):
        reply = json.loads(done[name].stdout)
        assert reply["result"] == text and reply["completion_tokens"] == TOKENS and reply["prompt_tokens"] > 0
    assert done["ask_backend"].stdout.decode().rstrip("\n") == text
    assert done["ask_stream"].stdout.decode().rstrip("\n") == text
    assert json.loads(done["describe_front"].stdout)["result"] == direct(True)
    assert done["dead"].returncode == 1 and b"no upstream answers" in done["dead"].stderr, done["dead"].stderr
    assert done["bad_url"].returncode == 2 and b"--url" in done["bad_url"].stderr
    assert done["no_upstreams"].returncode == 2 and b"UPSTREAM_URLS" in done["no_upstreams"].stderr


def test_stdio_mcp_with_backend_openai(fleet, front):
    lines = [{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                 "protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}},
             {"jsonrpc": "2.0", "method": "notifications/initialized"},
             {**tools_call({"prompt": "Hi.", "max_tokens": TOKENS, "min_tokens": TOKENS, "seed": 3}, msg_id=2),
              }]
    lines[2]["params"]["_meta"] = {"progressToken": 9}
    done = run_cli(["mcp"], env={"BACKEND": "openai", "UPSTREAM_URLS": f"{front.url}/v1"},
                   input="".join(json.dumps(m) + "\n" for m in lines).encode(), timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    replies = [json.loads(line) for line in done.stdout.decode().splitlines() if line.strip()]
    result = next(r for r in replies if r.get("id") == 2)["result"]
    assert result["isError"] is False, result
    assert any(r.get("method") == "notifications/progress" for r in replies)
    direct = requests.post(fleet[0].url + SEED_ROUTE, json={"prompt": "Hi.", "max_tokens": TOKENS,
                                                            "min_tokens": TOKENS, "seed": 3}, timeout=TIMEOUT)
    assert result["content"][0]["text"] == direct.json()["result"]


# ----------------------------------------------------------------------------------------
# config (no servers)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("env", "words"), [
    ({"BACKEND": "vllm"}, ("BACKEND", "local, openai")),
    ({"BACKEND": "openai"}, ("UPSTREAM_URLS",)),
    ({"BACKEND": "openai", "UPSTREAM_URLS": "gpu-node-1:8000"}, ("UPSTREAM_URLS", "gpu-node-1:8000")),
    ({"BACKEND": "openai", "UPSTREAM_URLS": "http://a:8000/v1,http://a:8000/v1/"}, ("twice",)),
    ({"BACKEND": "openai", "UPSTREAM_URLS": "http://a:99999/v1"}, ("UPSTREAM_URLS",)),
    ({"BACKEND": "openai", "UPSTREAM_URLS": "http://a/v1", "UPSTREAM_TIMEOUT": "0"}, ("UPSTREAM_TIMEOUT",)),
    ({"BACKEND": "openai", "UPSTREAM_URLS": "http://a/v1", "UPSTREAM_TIMEOUT": "soon"}, ("UPSTREAM_TIMEOUT",)),
])
def test_bad_upstream_settings_are_one_line(env, words):
    with pytest.raises(server.ConfigError) as info:
        server.load_config(env)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_upstream_settings_are_read_once():
    cfg = server.load_config({"BACKEND": "OpenAI", "UPSTREAM_URLS": " http://gpu-1:8000/v1/ , https://u:p@gpu-2 ",
                              "UPSTREAM_MODEL": "naver-hyperclovax/HyperCLOVAX-SEED-Vision-Instruct-3B",
                              "UPSTREAM_TIMEOUT": "2.5", "UPSTREAM_API_KEY": "k", "MAX_QUEUE": "16"})
    assert cfg.backend == "openai" and cfg.upstream_timeout == 2.5 and cfg.upstream_api_key == "k"
    assert cfg.upstream_urls == ("http://gpu-1:8000/v1", "https://u:p@gpu-2/v1")
    assert cfg.served_model_name == "naver-hyperclovax/HyperCLOVAX-SEED-Vision-Instruct-3B"
    assert cfg.capacity == 32 and cfg.worker_threads > cfg.capacity  # MAX_QUEUE in flight per upstream
    assert server.upstream_base_url("http://h:8000/api", "--url", append_v1=True) == "http://h:8000/api/v1"
    assert server.load_config({}).backend == "local"


# ----------------------------------------------------------------------------------------
# structured output through the front: the upstream's own guided decoding
# ----------------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["name", "n"]}
ADD = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a", "b"]}}}]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_json_schema_and_tool_calls_through_the_front(fleet, front, stream):
    """response_format goes to the upstream as such; tools too, and the upstream's tool_calls come
    back as the same tool_calls, streamed or not."""
    import openai

    def answer(base: str, **extra):
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)
        args = {"model": "m", "messages": [{"role": "user", "content": "2 + 3?"}], "max_tokens": 80,
                "temperature": 0.8, "seed": 4, **extra}
        if not stream:
            message = client.chat.completions.create(**args).choices[0].message
            calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
            return message.content, calls
        text, calls = "", {}
        for chunk in client.chat.completions.create(**args, stream=True):
            for delta in [c.delta for c in chunk.choices]:
                text += delta.content or ""
                for call in delta.tool_calls or []:
                    name, arguments = calls.get(call.index, ("", ""))
                    calls[call.index] = (name + (call.function.name or ""), arguments + (call.function.arguments or ""))
        return text or None, list(calls.values())

    fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}
    content, _ = answer(front.url, **fmt)
    assert content == answer(fleet[0].url, **fmt)[0]
    assert set(json.loads(content)) == {"name", "n"}
    forced = {"tools": ADD, "tool_choice": {"type": "function", "function": {"name": "add"}}}
    content, calls = answer(front.url, **forced)
    assert content is None and calls == answer(fleet[1].url, **forced)[1]
    (name, arguments), = calls
    assert name == "add" and set(json.loads(arguments)) == {"a", "b"}
