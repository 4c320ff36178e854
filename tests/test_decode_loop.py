"""Our own decode loop (server.py section 4): front -> prefill -> decode_one_token -> sample.

- Greedy: the loop's tokens equal model.generate(do_sample=False) on the tiny LLaVA, the tiny HCX
  models of both revisions and a text-only causal LM, text only and with images of two aspect
  ratios, in fp32; in bf16 within the near-tie rule.
- Sampling: greedy at temperature 0, the request's own seeded generator (reproducible, untouched
  by other requests), top_p; min_tokens masks stop ids; max_tokens; cancel within one step.
- KV caches: the static cache made once at load is reused (reset) across requests; a request
  longer than it runs on a dynamic cache with the same tokens.
- Backends: `hf` (model.generate) as a reference and as the automatic fallback, with its reason.
- The compiled CUDA path (CUDA graphs) where CUDA exists; skipped with its reason elsewhere.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from PIL import Image

import server
from tests.fixtures import tiny_model

MODELS = ["demo", "hcx", "hcx-v2", "hcx-v2-expanding", "text"]
IMAGES = {"text": None, "landscape": (120, 30), "portrait": (50, 100)}
TOKENS = 16

_LOADED: dict = {}


def load(folder, dtype="float32", backend="eager") -> server.LoadedModel:
    return server.load_model(server.load_config({"MODEL_PATH": str(folder), "DEVICE": "cpu", "DTYPE": dtype,
                                                 "GENERATION_BACKEND": backend, "TORCH_THREADS": "1"}))


def loaded(folder, dtype="float32", backend="eager") -> server.LoadedModel:
    """Loaded once per module for tests that leave the model as they found it."""
    key = (str(folder), dtype, backend)
    if key not in _LOADED:
        _LOADED[key] = load(folder, dtype, backend)
    return _LOADED[key]


def request(size=None, **fields) -> server.GenerationRequest:
    body = {"prompt": "Describe this 사진, please.", "max_tokens": TOKENS, "min_tokens": TOKENS, "temperature": 0,
            **fields}
    req = server.prompt_request(body, server.load_config({}))
    if size:
        req.messages[-1].images = [Image.new("RGB", size, (200, 30, 30))]
    return req


def loop_ids(m, req, cancelled=None) -> list[int]:
    inputs = server.build_inputs(m, req)
    return list(server.generate_tokens(m, inputs, req, req.max_new_tokens, cancelled))


def hf_greedy(m, req):
    """model.generate(do_sample=False): ids and the raw logits of every step."""
    inputs = server.build_inputs(m, req)
    with torch.inference_mode():
        out = m.model.generate(**inputs.tensors, **server.sampling_kwargs(req, req.max_new_tokens),
                               eos_token_id=list(m.stop_token_ids), pad_token_id=m.pad_token_id,
                               output_scores=True, output_logits=True, return_dict_in_generate=True)
    return [int(s[0].argmax()) for s in out.scores], [s[0].float() for s in out.logits]


def skip_images_for_text_model(name, size):
    if name == "text" and size:
        pytest.skip("the text-only model takes no images")


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("name", MODELS)
def test_greedy_equals_model_generate_in_fp32(tmp_path_factory, name, image):
    skip_images_for_text_model(name, IMAGES[image])
    m = loaded(tiny_model(name, tmp_path_factory))
    assert m.generation_backend == "eager"
    req = request(IMAGES[image])
    ids, _ = hf_greedy(m, req)
    assert loop_ids(m, req) == ids


@pytest.mark.parametrize("image", ["text", "landscape"])
@pytest.mark.parametrize("name", ["demo", "hcx", "hcx-v2"])
def test_greedy_in_bf16_agrees_with_generate_or_differs_at_a_near_tie(tmp_path_factory, name, image):
    m = loaded(tiny_model(name, tmp_path_factory), dtype="bfloat16")
    req = request(IMAGES[image])
    ids, logits = hf_greedy(m, req)
    ours = loop_ids(m, req)
    step = next((i for i, (a, b) in enumerate(zip(ids, ours)) if a != b), None)
    if step is not None:
        margin = float(logits[step][ids[step]] - logits[step][ours[step]])
        assert abs(margin) <= 0.02 * max(1.0, float(logits[step].abs().max())), (step, margin)
    ok, verdict = server.compare_with_hf(m, req)
    assert ok, verdict


def test_min_tokens_masks_stop_ids_and_max_tokens_ends(tmp_path_factory):
    m = loaded(tiny_model("demo", tmp_path_factory))
    stops = set(m.stop_token_ids)
    free = loop_ids(m, request(max_tokens=64, min_tokens=0, seed=3, temperature=1.0))
    forced = loop_ids(m, request(max_tokens=64, min_tokens=64, seed=3, temperature=1.0))
    assert len(forced) == 64 and not stops & set(forced)
    assert len(free) <= 64 and (len(free) == 64 or free[-1] in stops)
    assert len(loop_ids(m, request(max_tokens=5, min_tokens=0))) <= 5


def test_seeded_sampling_is_reproducible_and_isolated(tmp_path_factory):
    m = loaded(tiny_model("hcx-v2", tmp_path_factory))
    req = request((120, 30), seed=42, temperature=1.2, top_p=0.95, min_tokens=0)
    first = loop_ids(m, req)
    loop_ids(m, request(seed=7, temperature=1.5, min_tokens=0))  # another request in between
    torch.manual_seed(0)  # the global generator is not what sampling uses
    assert loop_ids(m, req) == first
    assert loop_ids(m, request((120, 30), seed=43, temperature=1.2, top_p=0.95, min_tokens=0)) != first
    unseeded = {tuple(loop_ids(m, request(temperature=1.5, min_tokens=TOKENS))) for _ in range(3)}
    assert len(unseeded) > 1, "requests without a seed must not repeat each other"


def test_sample_is_greedy_at_zero_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    assert server.sample(logits, 0.0, 1.0, None) == 1
    gen = torch.Generator().manual_seed(0)
    assert {server.sample(logits, 1.0, 1e-6, gen) for _ in range(50)} == {1}  # tiny nucleus: the top token
    picks = {server.sample(logits, 1.0, 0.9, gen) for _ in range(200)}
    assert picks <= {1, 3, 2} and {1, 3} <= picks and 0 not in picks
    a = [server.sample(logits, 1.0, 1.0, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(a)) == 1


def test_cancel_stops_within_one_step(tmp_path_factory):
    m = loaded(tiny_model("demo", tmp_path_factory))
    req = request(max_tokens=200, min_tokens=200)
    cancelled = threading.Event()
    seen = []
    inputs = server.build_inputs(m, req)
    for token_id in server.generate_tokens(m, inputs, req, 200, cancelled):
        seen.append(token_id)
        if len(seen) == 5:
            cancelled.set()
    assert len(seen) == 5


def test_static_cache_is_made_once_and_reused(tmp_path_factory, caplog, monkeypatch):
    folder = tiny_model("hcx-v2", tmp_path_factory)
    monkeypatch.setattr(server, "STATIC_CACHE_TOKENS", 96)
    with caplog.at_level(logging.INFO, logger="hcx"):
        static = load(folder, backend="static")
    eager = loaded(folder)
    assert static.generation_backend == "static" and static.static.tokens == 96
    cache = static.static.cache
    short = request((120, 30), max_tokens=8, min_tokens=8)
    assert short.max_new_tokens + server.build_inputs(static, short).prompt_tokens <= 96
    assert loop_ids(static, short) == loop_ids(eager, short)
    assert loop_ids(static, request(max_tokens=8, min_tokens=8)) == loop_ids(eager, request(max_tokens=8, min_tokens=8))
    assert static.static.cache is cache  # the same cache, reset between requests
    long = request((120, 30), max_tokens=80, min_tokens=80)  # prompt + 80 > 96: a dynamic cache, same tokens
    with caplog.at_level(logging.INFO, logger="hcx"):
        assert loop_ids(static, long) == loop_ids(eager, long)
    assert "exceeds the 96-token static cache" in caplog.text


def test_hf_backend_is_the_reference_and_gives_the_same_tokens(tmp_path_factory):
    folder = tiny_model("hcx", tmp_path_factory)
    hf = loaded(folder, backend="hf")
    assert hf.generation_backend == "hf"
    req = request((50, 100))
    job = server.Job(req, server.build_inputs(hf, req), TOKENS)
    server.run_generation(hf, job)
    assert server.drain_tokens(job) == loop_ids(loaded(folder), req)


def test_a_model_the_loop_cannot_drive_falls_back_to_hf_with_its_reason(tmp_path_factory, caplog):
    m = load(tiny_model("demo", tmp_path_factory), backend="hf")
    m.model.config.model_type = "qwen2_vl"  # 3-d rotary positions: not a plain causal decoder
    reason = server.loop_unsupported(m)
    with caplog.at_level(logging.WARNING, logger="hcx"):
        backend = server.prepare_generation_backend(server.load_config({"GENERATION_BACKEND": "auto"}), m)
    assert reason and "qwen2_vl" in reason and backend == "hf"
    assert "cannot drive this model" in caplog.text and "qwen2_vl" in caplog.text


def test_front_that_never_hands_over_embeddings_switches_to_hf(tmp_path_factory, caplog):
    """A remote-code forward that does not call its decoder with inputs_embeds: the first image
    request falls back to model.generate (logged) instead of failing."""
    folder = tiny_model("hcx", tmp_path_factory)
    m = load(folder)
    m.body = torch.nn.Linear(1, 1)  # a module the forward never calls
    req = request((120, 30))
    job = server.Job(req, server.build_inputs(m, req), TOKENS)
    with caplog.at_level(logging.WARNING, logger="hcx"):
        count = server.run_generation(m, job)
    assert count == TOKENS and m.generation_backend == "hf" and "switching to GENERATION_BACKEND=hf" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled decode step (CUDA graphs) needs a CUDA GPU; "
                                                          "this machine has none")
def test_compiled_cuda_decode_gives_eager_tokens(tmp_path_factory):
    folder = tiny_model("hcx-v2", tmp_path_factory)
    env = {"MODEL_PATH": str(folder), "DEVICE": "cuda", "DTYPE": "bfloat16"}
    compiled = server.load_model(server.load_config({**env, "GENERATION_BACKEND": "static"}))
    eager = server.load_model(server.load_config({**env, "GENERATION_BACKEND": "eager"}))
    assert compiled.generation_backend == "static" and compiled.static.compiled
    for size in (None, (120, 30)):
        req = request(size)
        ok, verdict = server.compare_with_hf(compiled, req)
        assert ok, verdict
        ours, theirs = loop_ids(compiled, req), loop_ids(eager, req)
        step = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        assert step is None or step > 0, (ours, theirs)
