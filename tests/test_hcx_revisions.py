"""Both HCX code revisions users hold, and folders that are broken or foreign (issue: the model as
users hold it).

- hcx-v1 (first upload: load_images_videos preprocessor) and hcx-v2 (processor_config.json ->
  HCXProcessor) are told apart from the folder's files; v2 is tested both ways its unconfirmed
  details may turn out (the processor leaves one placeholder per image and the template is the
  processor's / the processor expands them and only the tokenizer has the template).
- Every route on each revision (seed REST plain and streamed, OpenAI, MCP over HTTP and stdio,
  the CLI) with text only and with images of two aspect ratios: same text for the same seed, and
  the prompt-token count equals what the model's decoder really consumed.
- A folder whose processor misreports the vision token count: a clear error in each API's shape
  (the tiny v2 model raises on a wrong placeholder count), and the server keeps serving.
- Broken or foreign folders fail at start-up with one line naming the problem.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image

import server
from tests.fixtures import (SEED_ROUTE, SEED_STREAM_ROUTE, LiveServer, b64, clean_env, hcx_cli, image_bytes, post,
                            run_cli, stream_chunks, tiny_model, tiny_server)

REVISIONS = ["hcx", "hcx-v2", "hcx-v2-expanding"]
INTERFACE = {"hcx": "hcx-v1", "hcx-v2": "hcx-v2", "hcx-v2-expanding": "hcx-v2"}
LANDSCAPE, PORTRAIT = (120, 30), (50, 100)  # AnyRes layouts 1x4 and 2x1: different token counts
SAMPLING = {"max_tokens": 8, "min_tokens": 8, "seed": 5, "temperature": 0.8, "top_p": 0.9}


def image_b64(size) -> str:
    return b64(image_bytes("png", size=size))


def seed_body(size=None, prompt="Describe this 사진.") -> dict:
    return {"prompt": prompt, **({"image_base64": image_b64(size)} if size else {}), **SAMPLING}


@pytest.fixture(scope="module", params=REVISIONS)
def revision(request, tmp_path_factory):
    """(name, server url, model folder) for each tiny HCX revision."""
    with tiny_server(request.param, tmp_path_factory) as srv:
        yield request.param, srv.url, tiny_model(request.param, tmp_path_factory)


_LOADED: dict = {}


def loaded(folder: Path) -> server.LoadedModel:
    if str(folder) not in _LOADED:
        cfg = server.load_config({"MODEL_PATH": str(folder), "DEVICE": "cpu", "DTYPE": "float32",
                                  "GENERATION_BACKEND": "eager", "TORCH_THREADS": "1"})
        _LOADED[str(folder)] = server.load_model(cfg)
    return _LOADED[str(folder)]


def consumed_positions(m: server.LoadedModel, size) -> tuple[int, int]:
    """(prompt tokens the server counts, positions the decoder really took) for one request."""
    req = server.prompt_request(seed_body(size), server.load_config({}))
    if size:
        req.messages[-1].images = [server.decode_image(image_b64(size), server.load_config({}))]
    inputs = server.build_inputs(m, req)
    with torch.inference_mode():
        if inputs.has_images:
            return inputs.prompt_tokens, int(server.front_embeds(m, inputs.tensors).shape[1])
    return inputs.prompt_tokens, int(inputs.tensors["input_ids"].shape[1])


# -- which interface a folder holds ------------------------------------------------------------


@pytest.mark.parametrize("name,kind,interface", [("hcx", "hcx", "hcx-v1"), ("hcx-v2", "hcx", "hcx-v2"),
                                                  ("hcx-v2-expanding", "hcx", "hcx-v2"),
                                                  ("demo", "generic", "generic"), ("text", "text", "text")])
def test_interface_is_told_from_the_folder_files(tmp_path_factory, name, kind, interface):
    info = server.inspect_model_folder(tiny_model(name, tmp_path_factory))
    assert (info.kind, info.interface, info.revision) == (kind, interface, None)


def test_revision_is_read_from_a_hub_snapshot_or_download_metadata(tmp_path_factory, tmp_path):
    source = tiny_model("hcx-v2", tmp_path_factory)
    sha = "a78900bdac94cabc4648fe42c9ed31c3f4d522bd"
    snapshot = tmp_path / "models--naver-hyperclovax--x" / "snapshots" / sha
    shutil.copytree(source, snapshot)
    assert server.inspect_model_folder(snapshot).revision == sha
    local = tmp_path / "local"
    shutil.copytree(source, local)
    meta = local / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    (meta / "config.json.metadata").write_text(f"{'1' * 40}\netag\n1733000000.0\n")
    assert server.inspect_model_folder(local).revision == "1" * 40


def test_health_and_startup_log_name_the_interface(revision):
    name, url, _ = revision
    health = requests.get(url + "/health", timeout=10).json()
    assert health["interface"] == INTERFACE[name] and health["kind"] == "hcx"
    assert "revision" in health and health["backend"] in ("eager", "gemv")


def test_branch_revision_warns_that_remote_code_runs_unpinned(caplog):
    cfg = server.load_config({"MODEL_PATH": server.HCX_HUB_ID, "MODEL_REVISION": "main"})
    with caplog.at_level(logging.WARNING, logger="hcx"), pytest.raises(server.ModelLoadError):
        server.locate_model(cfg)  # offline: the download fails after the warning
    assert "MODEL_REVISION=main" in caplog.text and "UNPINNED" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hcx"):
        server.warn_if_unpinned(server.HCX_REVISION)
        server.warn_if_unpinned("42c6bee")
    assert "UNPINNED" not in caplog.text


# -- every route, both revisions -----------------------------------------------------------------


@pytest.mark.parametrize("size", [None, LANDSCAPE, PORTRAIT], ids=["text", "landscape", "portrait"])
def test_seed_rest_stream_equals_plain_and_counts_what_the_model_consumed(revision, size):
    name, url, folder = revision
    plain = post(url, SEED_ROUTE, seed_body(size))
    assert plain.status_code == 200, plain.text
    resp, chunks, _ = stream_chunks(url, SEED_STREAM_ROUTE, seed_body(size))
    assert resp.status_code == 200 and b"".join(chunks).decode("utf-8") == plain.json()["result"]
    counted, consumed = consumed_positions(loaded(folder), size)
    assert counted == consumed, f"{name}: the context check counts {counted} prompt tokens, the decoder took {consumed}"


def test_aspect_ratio_changes_the_image_token_count(revision):
    m = loaded(revision[2])
    counts = {consumed_positions(m, size)[0] for size in (None, LANDSCAPE, PORTRAIT)}
    assert len(counts) == 3, counts


@pytest.mark.parametrize("size", [None, LANDSCAPE, PORTRAIT], ids=["text", "landscape", "portrait"])
def test_openai_usage_counts_the_prompt_as_consumed(revision, size):
    import openai

    name, url, folder = revision
    content = [{"type": "text", "text": "Describe this 사진."}]
    if size:
        content.insert(0, {"type": "image_url", "image_url": {"url": b64(image_bytes("png", size=size), data_url=True)}})
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    fields = {k: v for k, v in SAMPLING.items() if k != "min_tokens"}
    args = {"model": "hcx", "messages": [{"role": "user", "content": content}],
            "extra_body": {"min_tokens": SAMPLING["min_tokens"]}, **fields}
    reply = client.chat.completions.create(**args)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**args, stream=True)
                       if c.choices)
    assert streamed == reply.choices[0].message.content
    assert reply.choices[0].message.content == post(url, SEED_ROUTE, seed_body(size)).json()["result"]
    assert reply.usage.prompt_tokens == consumed_positions(loaded(folder), size)[1]
    assert reply.usage.completion_tokens == SAMPLING["max_tokens"]


def test_mcp_http_and_stdio_answer_like_rest(revision):
    from mcp import Client, StdioServerParameters

    name, url, folder = revision
    arguments = seed_body(LANDSCAPE)
    expected = post(url, SEED_ROUTE, arguments).json()["result"]
    cli = hcx_cli()
    stdio = StdioServerParameters(command=cli[0], args=[*cli[1:], "--model-path", str(folder), "mcp"],
                                  env=clean_env(), cwd=str(folder.parent))

    async def call(target) -> str:
        async with Client(target) as client:
            result = await client.call_tool(server.TOOL_NAME, arguments)
        assert not result.is_error, result
        return result.content[0].text

    assert asyncio.run(call(url + "/mcp")) == expected
    assert asyncio.run(call(stdio)) == expected


def test_cli_describe_answers_like_rest(revision, tmp_path):
    name, url, folder = revision
    picture = tmp_path / "portrait.png"
    picture.write_bytes(image_bytes("png", size=PORTRAIT))
    done = run_cli(["--model-path", str(folder), "describe", str(picture), "--prompt", "Describe this 사진.", "--json",
                    "--max-tokens", "8", "--min-tokens", "8", "--seed", "5", "--temperature", "0.8", "--top-p", "0.9"],
                   timeout=180)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    answer = json.loads(done.stdout.decode("utf-8").strip().splitlines()[-1])
    assert answer["result"] == post(url, SEED_ROUTE, seed_body(PORTRAIT)).json()["result"]
    assert answer["prompt_tokens"] == consumed_positions(loaded(folder), PORTRAIT)[1]


# -- a processor that misreports the vision token count ------------------------------------------


@pytest.fixture(scope="module")
def broken_url(tmp_path_factory):
    with tiny_server("hcx-v2-broken", tmp_path_factory) as srv:
        yield srv.url


def test_wrong_placeholder_count_is_a_clear_error_in_every_api(broken_url):
    from mcp import Client

    body = seed_body(LANDSCAPE)
    plain = post(broken_url, SEED_ROUTE, body, timeout=60)
    assert plain.status_code == 500 and "placeholder" in plain.json()["error"], plain.text
    assert "Traceback" not in plain.text
    resp, chunks, _ = stream_chunks(broken_url, SEED_STREAM_ROUTE, body, timeout=60)
    text = b"".join(chunks).decode("utf-8")
    assert "[error]" in text and "placeholder" in text, text
    oa = post(broken_url, "/v1/chat/completions", {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": b64(image_bytes("png", size=LANDSCAPE), data_url=True)}},
        {"type": "text", "text": "hi"}]}]}, timeout=60)
    assert oa.status_code == 500 and "placeholder" in oa.json()["error"]["message"]

    async def call():
        async with Client(broken_url + "/mcp") as client:
            return await client.call_tool(server.TOOL_NAME, body)

    result = asyncio.run(call())
    assert result.is_error and "placeholder" in result.content[0].text
    # the server keeps serving: text requests still work, /health is ok
    assert post(broken_url, SEED_ROUTE, seed_body(None)).status_code == 200
    assert requests.get(broken_url + "/health", timeout=10).json()["status"] == "ok"


# -- broken and foreign folders -------------------------------------------------------------------


def copy_of(tmp_path_factory, name: str, tmp_path: Path) -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_model(name, tmp_path_factory), folder)
    return folder


def problem(folder: Path) -> str:
    with pytest.raises(server.ModelLoadError) as info:
        server.inspect_model_folder(folder)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_no_tokenizer_files(tmp_path_factory, tmp_path):
    folder = copy_of(tmp_path_factory, "hcx-v2", tmp_path)
    for name in server.TOKENIZER_FILES + ("merges.txt", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    assert "no tokenizer files" in problem(folder)


def test_no_processor_config(tmp_path_factory, tmp_path):
    folder = copy_of(tmp_path_factory, "hcx-v2", tmp_path)
    for name in server.PROCESSOR_FILES:
        (folder / name).unlink()
    assert "preprocessor_config.json" in problem(folder)


def test_unknown_model_type(tmp_path_factory, tmp_path):
    folder = copy_of(tmp_path_factory, "demo", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "hyperclovax_omni_2099"
    (folder / "config.json").write_text(json.dumps(config))
    assert "model_type 'hyperclovax_omni_2099'" in problem(folder)


def test_gguf_folder_and_gguf_file(tmp_path):
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "HyperCLOVAX-SEED-Vision-Instruct-3B-Q8_0.gguf").write_bytes(b"GGUF" + bytes(64))
    assert "GGUF" in problem(folder) and "safetensors" in problem(folder)
    cfg = server.load_config({"MODEL_PATH": str(folder / "HyperCLOVAX-SEED-Vision-Instruct-3B-Q8_0.gguf")})
    with pytest.raises(server.ModelLoadError, match="GGUF"):
        server.locate_model(cfg)
    # a user's folder is never downloaded into: it is checked and refused
    assert server.locate_model(server.load_config({"MODEL_PATH": str(folder)})) == folder


def test_remote_code_file_missing(tmp_path_factory, tmp_path):
    folder = copy_of(tmp_path_factory, "hcx-v2", tmp_path)
    (folder / "modeling_hyperclovax.py").unlink()
    assert "modeling_hyperclovax.py" in problem(folder)


def sharded_copy(tmp_path_factory, tmp_path) -> Path:
    """The tiny v2 model re-saved in small shards with an index, as a hub download is."""
    from transformers import AutoModelForCausalLM

    folder = copy_of(tmp_path_factory, "hcx-v2", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="300KB")
    config = json.loads((tiny_model("hcx-v2", tmp_path_factory) / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))  # keep the auto_map pointing at the copied code
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def test_partial_download_missing_and_truncated_shards(tmp_path_factory, tmp_path):
    folder = sharded_copy(tmp_path_factory, tmp_path)
    assert server.inspect_model_folder(folder).interface == "hcx-v2"  # complete: fine
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 2
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) // 2])
    message = problem(folder)
    assert "partial download" in message and "truncated" in message and shards[-1].name in message
    shards[-1].unlink()
    message = problem(folder)
    assert "partial download" in message and "missing" in message and shards[-1].name in message


def test_broken_folder_fails_at_startup_with_one_line(tmp_path_factory, tmp_path):
    """Not at the first request: the CLI prints one line and exits 1; the server's /health says why."""
    folder = copy_of(tmp_path_factory, "hcx-v2", tmp_path)
    (folder / "processor_config.json").unlink()
    (folder / "preprocessor_config.json").unlink()
    done = run_cli(["--model-path", str(folder), "ask", "hi"], timeout=120)
    stderr = done.stderr.decode(errors="replace")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1 and "preprocessor_config.json" in lines[0], stderr
    srv = LiveServer(folder, name="hcx-broken-folder")
    with pytest.raises(RuntimeError, match="preprocessor_config.json"):
        srv.start()  # the fixture fails fast on /health {"status": "error", "error": ...}


def test_text_only_model_serves_text_and_refuses_images(tmp_path_factory):
    """Decision: a folder of the text-only HCX models (no vision part) is served text-only, with a
    note in /health, rather than refused: its text answers are still useful through every API."""
    with tiny_server("text", tmp_path_factory) as srv:
        health = requests.get(srv.url + "/health", timeout=10).json()
        assert health["interface"] == "text" and "text-only" in health["note"]
        ok = post(srv.url, SEED_ROUTE, seed_body(None))
        assert ok.status_code == 200 and ok.json()["result"]
        refused = post(srv.url, SEED_ROUTE, seed_body(LANDSCAPE))
        assert refused.status_code == 400 and "text-only" in refused.json()["error"]


def test_non_empty_foreign_folder_is_not_downloaded_into(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    assert server.needs_download(tmp_path / "absent") and server.needs_download(folder)
    (folder / "notes.txt").write_text("mine")
    assert not server.needs_download(folder)
    (folder / ".cache" / "huggingface").mkdir(parents=True)  # our own interrupted download: resume it
    assert server.needs_download(folder)


def test_images_of_the_text_model_request_never_reach_the_processor():
    img = Image.new("RGB", (8, 8))
    req = server.GenerationRequest(messages=[server.Message("user", "hi", [img])], max_new_tokens=4)
    m = server.LoadedModel(kind="text", interface="text", model=None, processor=None, tokenizer=None, name="t",
                           path="", device=torch.device("cpu"), dtype=torch.float32, vision_dtype=torch.float32,
                           stop_token_ids=(), pad_token_id=0, context_length=64)
    with pytest.raises(server.InputError, match="text-only"):
        server.build_inputs(m, req)
