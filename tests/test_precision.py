"""Precision (issue 7): DTYPE / VISION_DTYPE resolution, fp16 input casting, and greedy decoding
under bf16 and fp16 against fp32 on the tiny models (demo LLaVA and tiny HCX remote code), with
and without an image; plus the gemv generation backend against eager.

Stated tolerance: at every decode step whose prefix is still shared with fp32, the max abs
difference of the raw logits is <= LOGIT_TOLERANCE[dtype] x max(1, max |fp32 logit|); the first
token is identical; and where the greedy tokens first differ, the step is a near-tie: fp32's
margin between its own pick and the low-precision pick is within that same tolerance.
(Measured on these models: bf16 <= 0.0045, fp16 <= 0.0005 at logit scale ~0.8.)
"""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

import server
from server import ConfigError, load_config

LOGIT_TOLERANCE = {"bfloat16": 0.02, "float16": 0.003}
TOKENS = 16


def model_dir(request, which: str):
    return request.getfixturevalue("demo_model_dir" if which == "demo" else "hcx_model_dir")


def loaded(folder, dtype: str, vision_dtype: str = "auto", backend: str = "eager") -> server.LoadedModel:
    cfg = load_config({"MODEL_PATH": str(folder), "DEVICE": "cpu", "DTYPE": dtype, "VISION_DTYPE": vision_dtype,
                       "GENERATION_BACKEND": backend, "TORCH_THREADS": "1"})
    return server.load_model(cfg)


def request_for(m: server.LoadedModel, with_image: bool) -> server.GenerationRequest:
    req = server.prompt_request({"prompt": "Describe this 사진, please.", "max_tokens": TOKENS, "min_tokens": TOKENS,
                                 "temperature": 0}, load_config({}))
    if with_image:
        req.messages[-1].images = [Image.new("RGB", (64, 48), (200, 30, 30))]
    return req


def greedy(m: server.LoadedModel, with_image: bool):
    """Greedy ids (what the server would pick: processed scores) and the raw logits per step."""
    req = request_for(m, with_image)
    inputs = server.build_inputs(m, req)
    with torch.inference_mode():
        out = m.model.generate(**inputs.tensors, **server.sampling_kwargs(req, TOKENS),
                               eos_token_id=list(m.stop_token_ids), pad_token_id=m.pad_token_id,
                               output_scores=True, output_logits=True, return_dict_in_generate=True)
    ids = [int(s[0].argmax()) for s in out.scores]
    return ids, [s[0].float() for s in out.scores], [s[0].float() for s in out.logits]


def engine_ids(m: server.LoadedModel, with_image: bool) -> list[int]:
    """Token ids through the server's own run_generation (our decode loop, or model.generate for hf)."""
    req = request_for(m, with_image)
    job = server.Job(req, server.build_inputs(m, req), TOKENS)
    server.run_generation(m, job)
    return server.drain_tokens(job)


_REFERENCE: dict = {}


def fp32_reference(folder, with_image: bool):
    key = (str(folder), with_image)
    if key not in _REFERENCE:
        _REFERENCE[key] = greedy(loaded(folder, "float32"), with_image)
    return _REFERENCE[key]


def assert_close_greedy(ref, got, tolerance: float, first_may_tie: bool = False) -> int:
    """Returns how many leading tokens are identical; fails outside the stated tolerance.
    first_may_tie: the first token may differ too where it is a near-tie (int8 vs bf16)."""
    (ref_ids, ref_scores, ref_logits), (ids, _, logits) = ref, got
    same = next((i for i, (a, b) in enumerate(zip(ref_ids, ids)) if a != b), len(ref_ids))
    assert same >= 1 or first_may_tie, f"first token differs: fp32 {ref_ids[:4]} vs {ids[:4]}"
    for step in range(min(same + 1, len(ref_ids))):  # prefixes are identical up to and including `same`
        bound = tolerance * max(1.0, float(ref_logits[step].abs().max()))
        diff = float((logits[step] - ref_logits[step]).abs().max())
        assert diff <= bound, f"step {step}: logits differ by {diff:.5f} > {bound:.5f}"
    if same < len(ref_ids):
        margin = float(ref_scores[same][ref_ids[same]] - ref_scores[same][ids[same]])
        bound = tolerance * max(1.0, float(ref_logits[same].abs().max()))
        assert 0 <= margin <= bound, f"step {same}: tokens differ but fp32's margin {margin:.5f} is no near-tie"
    return same


# -- dtype resolution --------------------------------------------------------------------------


def test_auto_dtype_on_cpu_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(server, "cpu_bf16_pays", lambda cpu_linears=True: True)
    assert server.resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(server, "cpu_bf16_pays", lambda cpu_linears=True: False)
    assert server.resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_auto_dtype_on_cuda_and_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert server.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert server.resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert server.resolve_dtype("auto", torch.device("mps")) == torch.float16


@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32"])
def test_explicit_dtypes_are_honoured(name):
    for device in ("cpu", "cuda", "mps"):
        assert server.resolve_dtype(name, torch.device(device)) == getattr(torch, name)


def test_precision_settings_parse():
    cfg = load_config({"DTYPE": "Float16", "VISION_DTYPE": "float32", "GENERATION_BACKEND": " Eager "})
    assert (cfg.dtype, cfg.vision_dtype, cfg.generation_backend) == ("float16", "float32", "eager")
    assert load_config({}).generation_backend == "auto"
    assert load_config({"GENERATION_BACKEND": "static"}).generation_backend == "static"
    for key, value in (("DTYPE", "fp16"), ("VISION_DTYPE", "float16"), ("GENERATION_BACKEND", "compiled")):
        with pytest.raises(ConfigError, match=key):
            load_config({key: value})


# -- fp16: only floating tensors are cast; the vision part can stay fp32 --------------------------


@pytest.mark.parametrize("which", ["demo", "hcx"])
@pytest.mark.parametrize("vision_dtype", ["auto", "float32"])
def test_fp16_casts_only_floating_inputs(request, which, vision_dtype):
    m = loaded(model_dir(request, which), "float16", vision_dtype)
    expected = torch.float32 if vision_dtype == "float32" else torch.float16
    assert m.dtype == torch.float16 and m.vision_dtype == expected
    inputs = server.build_inputs(m, request_for(m, with_image=True))
    seen = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            seen.append(value)
            assert value.dtype == expected if value.is_floating_point() else not value.dtype.is_floating_point
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    for value in inputs.tensors.values():
        walk(value)
    assert inputs.tensors["input_ids"].dtype == torch.long
    assert any(t.is_floating_point() for t in seen), "no pixel tensor reached the model"


@pytest.mark.parametrize("which", ["demo", "hcx"])
def test_vision_float32_keeps_tower_and_projector_in_fp32(request, which):
    m = loaded(model_dir(request, which), "float16", "float32")
    vision = server.vision_modules(m.model)
    assert vision
    vision_params = {id(p) for mod in vision for p in mod.parameters()}
    assert all(p.dtype == torch.float32 for mod in vision for p in mod.parameters())
    rest = [p for p in m.model.parameters() if id(p) not in vision_params]
    assert rest and all(p.dtype == torch.float16 for p in rest)
    assert len(engine_ids(m, with_image=True)) == TOKENS


# -- greedy decoding under bf16 / fp16 vs fp32 ---------------------------------------------------


@pytest.mark.parametrize("which", ["demo", "hcx"])
@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
@pytest.mark.parametrize("dtype,vision_dtype", [("bfloat16", "auto"), ("float16", "auto"), ("float16", "float32"),
                                                ("bfloat16", "float32")])
def test_low_precision_greedy_matches_fp32(request, which, with_image, dtype, vision_dtype):
    folder = model_dir(request, which)
    ref = fp32_reference(folder, with_image)
    got = greedy(loaded(folder, dtype, vision_dtype), with_image)
    assert_close_greedy(ref, got, LOGIT_TOLERANCE[dtype])


# -- the gemv generation backend (our CPU decode kernels; tests/test_kernels.py tests each variant) ---


def gemv_or_skip(folder, vision_dtype: str = "auto") -> server.LoadedModel:
    m = loaded(folder, "bfloat16", vision_dtype, backend="gemv")
    if m.generation_backend != "gemv":
        pytest.skip("the gemv backend does not apply on this machine (no AVX2 CPU or no C++ compiler)")
    return m


@pytest.mark.parametrize("which", ["demo", "hcx"])
@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
@pytest.mark.parametrize("vision_dtype", ["auto", "float32"])
def test_gemv_backend_gives_eager_greedy_tokens(request, which, with_image, vision_dtype):
    folder = model_dir(request, which)
    fast = gemv_or_skip(folder, vision_dtype)
    assert any(type(mod) is server.GemvLinear for mod in fast.model.modules())
    if vision_dtype == "float32":  # the fp32 vision tower keeps torch's linear
        assert not any(type(mod) is server.GemvLinear for v in server.vision_modules(fast.model) for mod in v.modules())
    eager = loaded(folder, "bfloat16", vision_dtype, backend="eager")
    assert not any(type(mod) is server.GemvLinear for mod in eager.model.modules())
    assert engine_ids(fast, with_image) == engine_ids(eager, with_image)
    assert_close_greedy(greedy(eager, with_image), greedy(fast, with_image), LOGIT_TOLERANCE["bfloat16"])


def test_gemv_kernel_matches_torch_linear_with_tails_and_bias():
    try:
        server.load_kernels()
    except server.KernelUnavailable as exc:
        pytest.skip(str(exc))
    gen = torch.Generator().manual_seed(1)
    for n, k, bias in ((1, 32, False), (7, 33, True), (64, 64, False), (37, 100, True), (515, 3072, True)):
        layer = torch.nn.Linear(k, n, bias=bias).to(torch.bfloat16)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        x = torch.randn(1, 1, k, generator=gen).bfloat16()
        want = torch.nn.functional.linear(x.float(), layer.weight.float(), None if not bias else layer.bias.float())
        server.use_gemv_linears(layer)
        assert type(layer) is server.GemvLinear
        with torch.inference_mode():
            got = layer(x)
            many = layer(x.expand(1, 3, k).contiguous())  # several rows: torch's own linear
        assert got.dtype == torch.bfloat16 and got.shape == (1, 1, n)
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * max(1.0, k ** 0.5))
        torch.testing.assert_close(many[:, :1].float(), want, rtol=1e-2, atol=1e-2 * max(1.0, k ** 0.5))
        server.use_gemv_linears(layer, enable=False)
        assert type(layer) is torch.nn.Linear


def test_gemv_backend_falls_back_to_eager_with_a_log_line(demo_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="hcx"):
        m = loaded(demo_model_dir, "float32", backend="gemv")
    assert m.generation_backend == "eager"
    assert not any(type(mod) is server.GemvLinear for mod in m.model.modules())
    assert "using eager generation" in caplog.text and "bfloat16" in caplog.text
    assert loaded(demo_model_dir, "bfloat16", backend="eager").generation_backend == "eager"


def test_static_backend_on_cpu_is_the_static_cache_uncompiled(demo_model_dir, caplog):
    """On a CPU `static` means the static KV cache without torch.compile (CUDA graphs are CUDA's);
    requests that fit reuse the one cache made at load, longer ones decode on a dynamic cache."""
    with caplog.at_level(logging.INFO, logger="hcx"):
        m = loaded(demo_model_dir, "bfloat16", backend="static")
    assert m.generation_backend == "static" and "uncompiled on CPU" in caplog.text
    assert m.static is not None and not m.static.compiled
    assert m.static.tokens == server.static_cache_tokens(m) == min(server.STATIC_CACHE_TOKENS, m.context_length)
    with torch.inference_mode(), caplog.at_level(logging.INFO, logger="hcx"):  # the loop runs in inference mode
        cache, step = server.new_cache(m, m.static.tokens)
        longer, _ = server.new_cache(m, m.static.tokens + 1)
    assert cache is m.static.cache and step is server.decode_one_token
    assert longer is not m.static.cache and "exceeds the" in caplog.text


def test_gemv_backend_keeps_streaming_stops_and_cancel(demo_model_dir):
    m = gemv_or_skip(demo_model_dir)
    cfg = load_config({"MODEL_PATH": str(demo_model_dir), "DEVICE": "cpu", "DTYPE": "bfloat16",
                       "GENERATION_BACKEND": "gemv", "TORCH_THREADS": "1"})
    engine = server.Engine(cfg).start(wait=True)
    assert engine.model.generation_backend == "gemv"
    body = {"prompt": "hello", "max_tokens": 20, "min_tokens": 20, "seed": 3}
    streamed = server.stream(engine, server.prompt_request(body, cfg))
    text = "".join(streamed)
    whole = server.generate(engine, server.prompt_request(body, cfg))
    assert whole.text == text and whole.completion_tokens == streamed.completion.completion_tokens == 20
    # a stop string cuts the answer and ends generation early
    if len(text) > 3:
        stop = text[1:3]
        req = server.prompt_request(body, cfg)
        req.stop = (stop,)
        cut = server.generate(engine, req)
        assert cut.finish_reason == "stop" and stop not in cut.text and cut.completion_tokens < 20
    # cancel stops within a step
    long_req = server.prompt_request({"prompt": "hello", "max_tokens": 400, "min_tokens": 400, "seed": 1}, cfg)
    pieces = server.stream(engine, long_req)
    chunks = iter(pieces)
    next(chunks)  # generation is running
    pieces.cancel()
    list(chunks)
    assert pieces.completion.finish_reason == "cancelled" and pieces.completion.completion_tokens < 400
    assert m.generation_backend == "gemv"
