"""The CPU kernels (kernels/*.cpp) and weight-only int8 (WEIGHTS=int8).

Every variant this CPU runs is checked against torch's own result (bf16 and int8, odd K/N tails,
bias or none, 1-d/2-d/3-d inputs), through the ops and through the linear layers (one row and
many rows); the AVX2 variants are forced on AVX-512 machines too. The build is cached (a second
process does not compile), a machine without a compiler falls back to torch's kernels with a log
line and the same answers' structure, int8 answers through every route of both tiny models, and
an int8 load of a mid-size model (slow) stays within its peak-memory bound.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import requests
import torch

import server
from server import load_config
from tests.fixtures import clean_env, tiny_model

INT8_TOLERANCE = 0.02  # greedy logits vs bf16: x max(1, max |logit|) (measured <= 0.005 on the tiny models)


def model_dir(request, which: str) -> Path:
    """A tiny model of the suite: demo (LLaVA), hcx / hcx-v2 (both HCX revisions), text (no vision)."""
    return tiny_model(which, request.getfixturevalue("tmp_path_factory"))


def kernels_or_skip() -> tuple[str, ...]:
    try:
        return server.load_kernels()
    except server.KernelUnavailable as exc:
        pytest.skip(f"our CPU kernels do not run here: {exc}")


def variants(family: str) -> list[str]:
    return [v for v in server.KERNEL_VARIANTS if v.startswith(family)]


def runnable(variant: str) -> None:
    if variant not in kernels_or_skip():
        pytest.skip(f"this CPU does not run {variant}")


SHAPES = [(1, 1), (1, 32), (7, 33), (9, 17), (16, 64), (37, 100), (515, 3072), (8, 4097), (130, 15)]


def reference(x, w, b, scale=None):
    weight = w.float() * scale[:, None] if scale is not None else w.float()
    return torch.nn.functional.linear(x.float(), weight, None if b is None else b.float())


def assert_matches(got: torch.Tensor, want: torch.Tensor, k: int) -> None:
    # bf16 output rounding (2^-8 relative) plus fp32 summation order
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * max(1.0, float(want.abs().max())) + 1e-3 * k ** 0.5)


# -- the ops, every variant this CPU runs --------------------------------------------------------


@pytest.mark.parametrize("variant", variants("bf16"))
@pytest.mark.parametrize("n,k", SHAPES)
def test_bf16_variant_matches_torch(variant, n, k):
    runnable(variant)
    op = server.kernel_op(variant)
    gen = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16()
    dtypes = [torch.bfloat16] + ([torch.float32] if variant.endswith("avx2") else [])
    for dtype in dtypes:
        for shape in ((k,), (1, k), (1, 1, k)):
            x = torch.randn(shape, generator=gen).to(dtype)
            for bias in (None, b):
                got = op(x, w, bias)
                assert got.shape == (*shape[:-1], n) and got.dtype == dtype
                assert_matches(got, reference(x, w, bias), k)


@pytest.mark.parametrize("variant", variants("int8"))
@pytest.mark.parametrize("n,k", SHAPES)
def test_int8_variant_matches_torch(variant, n, k):
    runnable(variant)
    op = server.kernel_op(variant)
    gen = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) / 50 + 1e-3
    b = torch.randn(n, generator=gen)
    for dtype in (torch.bfloat16, torch.float32):
        for shape in ((k,), (1, k), (1, 1, k)):
            x = torch.randn(shape, generator=gen).to(dtype)
            for bias in (None, b.to(dtype)):
                got = op(x, w, scale, bias)
                assert got.shape == (*shape[:-1], n) and got.dtype == dtype
                assert_matches(got, reference(x, w, bias, scale), k)


def test_ops_refuse_bad_shapes_and_dtypes():
    passed = kernels_or_skip()
    gen = torch.Generator().manual_seed(0)
    w16, w8 = torch.randn(8, 32, generator=gen).bfloat16(), torch.zeros(8, 32, dtype=torch.int8)
    strided = {torch.bfloat16: torch.randn(8, 64, generator=gen).bfloat16()[:, ::2],
               torch.int8: torch.zeros(8, 64, dtype=torch.int8)[:, ::2]}
    x = torch.randn(1, 32, generator=gen).bfloat16()
    for variant in passed:
        op = server.kernel_op(variant)
        call = (lambda xx, w: op(xx, w, torch.ones(8), None)) if variant.startswith("int8") else \
            (lambda xx, w: op(xx, w, None))
        good, bad = (w8, w16) if variant.startswith("int8") else (w16, w8)
        with pytest.raises(RuntimeError, match="one row"):
            call(torch.randn(2, 32).bfloat16(), good)  # two rows
        with pytest.raises(RuntimeError, match="one row"):
            call(torch.randn(1, 31).bfloat16(), good)
        with pytest.raises(RuntimeError, match="weight must be"):
            call(x, bad)
        with pytest.raises(RuntimeError, match="contiguous"):
            call(x, strided[good.dtype])


# -- the linear layers: one row through our kernel, many rows widened, every variant ---------------


def layer_pair(n: int, k: int, bias: bool, gen) -> torch.nn.Linear:
    layer = torch.nn.Linear(k, n, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return layer


@pytest.mark.parametrize("variant", [*server.KERNEL_VARIANTS, "torch"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_layers_one_row_and_many_rows(variant, bias):
    if variant != "torch":
        runnable(variant)
    gen = torch.Generator().manual_seed(3)
    for n, k in ((37, 100), (515, 3072), (7, 33)):
        model = torch.nn.Sequential(layer_pair(n, k, bias, gen))
        want_w, want_b = model[0].weight.detach().clone(), None if not bias else model[0].bias.detach().clone()
        scale = None
        if variant.startswith("int8") or variant == "torch":
            q, scale = server.quantize_int8(model[0].weight.detach())
            model[0].__class__ = server.Int8Linear
            model[0].weight = torch.nn.Parameter(q, requires_grad=False)
            model[0].register_buffer("weight_scale", scale, persistent=False)
            want_w = q
        ours, widened = server.use_cpu_kernels(model, variant)
        assert ours == (0 if variant == "torch" else 1)
        expected = server.Int8Linear if scale is not None else server.GemvLinear
        assert type(model[0]) is expected
        with torch.inference_mode():
            for shape in ((1, 1, k), (1, k), (k,), (1, 5, k), (3, 4, k), (2, 1, k)):
                x = torch.randn(shape, generator=gen).bfloat16()
                got = model(x)
                assert got.shape == (*shape[:-1], n) and got.dtype == torch.bfloat16
                assert_matches(got, reference(x, want_w, want_b, scale), k)
        server.use_torch_linears(model)
        assert type(model[0]) is (server.Int8Linear if scale is not None else torch.nn.Linear)


def test_widened_linear_chunks_and_matches_fp32(monkeypatch):
    monkeypatch.setattr(server, "WIDEN_CHUNK_BYTES", 4096)  # many chunks, a short last one
    gen = torch.Generator().manual_seed(5)
    w, b = torch.randn(333, 64, generator=gen).bfloat16(), torch.randn(333, generator=gen).bfloat16()
    x = torch.randn(2, 7, 64, generator=gen).bfloat16()
    got = server.widened_linear(x, w, b, torch.float32)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 7, 333)
    assert_matches(got, reference(x, w, b), 64)
    q, scale = server.quantize_int8(w)
    for dtype in (torch.float32, torch.bfloat16):
        assert_matches(server.widened_linear(x, q, b, dtype, scale), reference(x, q, b, scale), 64)


def test_widened_conv_matches_fp32():
    gen = torch.Generator().manual_seed(6)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1).bfloat16()
    x = torch.randn(1, 8, 9, 9, generator=gen).bfloat16()
    want = torch.nn.functional.conv2d(x.float(), conv.weight.float(), conv.bias.float(), padding=1)
    conv.__class__ = server.WidenedConv2d
    with torch.inference_mode():
        got = conv(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=2e-2)


# -- quantization -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ours", [False, True], ids=["torch-ops", "kernel"])
def test_int8_quantization_error_bound(ours):
    kernel = None
    if ours:
        kernels_or_skip()
        kernel = torch.ops.hcx_server.quantize_int8
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(300, 257, generator=gen) * torch.rand(300, 1, generator=gen) * 3
    w[5] = 0  # an all-zero row
    w[9, 3] = 40  # an outlier sets its row's scale
    w[11, :3] = torch.tensor([0.5, 1.5, -2.5]) * w[11].abs().max() / 127  # ties round to even
    for source in (w, w.bfloat16()):
        q, scale = server.quantize_int8(source, None, kernel)
        if kernel is not None:  # the same numbers as torch's ops, bit for bit
            want_q, want_scale = server.quantize_int8(source)
            assert torch.equal(q, want_q) and torch.equal(scale, want_scale)
        assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.shape == w.shape
        assert int(q.abs().max()) <= 127 and bool((q.abs().amax(1)[scale > 1e-20] == 127).all())
        error = (q.float() * scale[:, None] - source.float()).abs()
        assert bool((error <= scale[:, None] / 2 * (1 + 1e-5)).all())
        assert bool((q[5] == 0).all())
        torch.testing.assert_close(scale[9], torch.tensor(40.0 / 127))


@pytest.mark.parametrize("which", ["demo", "hcx", "hcx-v2", "text"])
def test_int8_quantizes_decoder_only_and_keeps_embeddings_exact(request, which):
    folder = model_dir(request, which)
    bf16 = server.load_model(load_config({"MODEL_PATH": str(folder), "DEVICE": "cpu", "DTYPE": "bfloat16",
                                          "TORCH_THREADS": "1"}))
    m = server.load_model(load_config({"MODEL_PATH": str(folder), "DEVICE": "cpu", "WEIGHTS": "int8",
                                       "TORCH_THREADS": "1"}))
    assert m.weights == "int8" and m.dtype == torch.bfloat16 and bf16.weights == "bf16"
    vision = {id(mod) for v in server.vision_modules(m.model) for mod in v.modules()}
    int8 = [mod for mod in m.model.modules() if type(mod) is server.Int8Linear]
    assert int8 and not any(id(mod) in vision for mod in int8)
    assert not any(type(mod) is torch.nn.Linear for mod in m.model.modules() if id(mod) not in vision), \
        "a decoder linear layer was left in bf16"
    assert type(m.model.get_output_embeddings()) is server.Int8Linear
    assert all(p.dtype == torch.bfloat16 for v in server.vision_modules(m.model) for p in v.parameters())
    torch.testing.assert_close(m.model.get_input_embeddings().weight, bf16.model.get_input_embeddings().weight,
                               rtol=0, atol=0)


# -- greedy int8 vs bf16, and the AVX2 path forced on any x86 CPU -----------------------------------


def greedy_logits(m: server.LoadedModel, with_image: bool):
    from tests.test_precision import greedy

    return greedy(m, with_image)


@pytest.mark.parametrize("which", ["demo", "hcx", "hcx-v2"])
@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
@pytest.mark.parametrize("cpu_kernel", ["auto", "avx2", "torch"])
def test_int8_greedy_agrees_with_bf16_or_differs_at_near_ties(request, which, with_image, cpu_kernel):
    from tests.test_precision import assert_close_greedy, loaded

    folder = model_dir(request, which)
    ref = greedy_logits(loaded(folder, "bfloat16"), with_image)
    cfg = load_config({"MODEL_PATH": str(folder), "DEVICE": "cpu", "WEIGHTS": "int8", "CPU_KERNEL": cpu_kernel,
                       "TORCH_THREADS": "1"})
    m = server.load_model(cfg)
    assert m.weights == "int8"
    if cpu_kernel == "torch":
        assert m.kernel == "torch"
    elif m.kernel == "torch":
        pytest.skip("our CPU kernels do not run here")
    elif cpu_kernel == "avx2":
        assert m.kernel == "int8_avx2"
    assert_close_greedy(ref, greedy_logits(m, with_image), INT8_TOLERANCE, first_may_tie=True)


@pytest.mark.parametrize("cpu_kernel", ["auto", "avx2", "torch"])
def test_int8_with_fp32_activations(request, cpu_kernel):
    from tests.test_precision import assert_close_greedy, loaded

    folder = model_dir(request, "hcx")
    cfg = load_config({"MODEL_PATH": str(folder), "DEVICE": "cpu", "DTYPE": "float32", "WEIGHTS": "int8",
                       "CPU_KERNEL": cpu_kernel, "TORCH_THREADS": "1"})
    m = server.load_model(cfg)
    assert (m.weights, m.dtype) == ("int8", torch.float32)
    for with_image in (False, True):
        assert_close_greedy(greedy_logits(loaded(folder, "float32"), with_image), greedy_logits(m, with_image),
                            INT8_TOLERANCE, first_may_tie=True)


@pytest.mark.parametrize("which", ["demo", "hcx", "hcx-v2"])
def test_forced_avx2_bf16_widens_many_rows_and_matches_eager(request, which):
    from tests.test_precision import LOGIT_TOLERANCE, assert_close_greedy, engine_ids, loaded

    folder = model_dir(request, which)
    kernels_or_skip()
    cfg = load_config({"MODEL_PATH": str(folder), "DEVICE": "cpu", "DTYPE": "bfloat16", "CPU_KERNEL": "avx2",
                       "TORCH_THREADS": "1"})
    m = server.load_model(cfg)
    if m.kernel != "bf16_avx2":
        pytest.skip("this CPU does not run the AVX2 kernels")
    assert m.generation_backend == "gemv"
    linears = [mod for mod in m.model.modules() if type(mod) is server.GemvLinear]
    assert linears and all(mod.widen_to == torch.float32 for mod in linears)
    assert all(type(mod) is not torch.nn.Conv2d for mod in m.model.modules())  # convolutions widened too
    eager = loaded(folder, "bfloat16")
    for with_image in (False, True):
        assert_close_greedy(greedy_logits(eager, with_image), greedy_logits(m, with_image), LOGIT_TOLERANCE["bfloat16"])
        assert len(engine_ids(m, with_image)) == 16


def test_cpu_kernel_setting_parses_and_picks(caplog):
    assert (load_config({}).cpu_kernel, load_config({}).weights) == ("auto", "auto")
    assert load_config({"CPU_KERNEL": " AVX2 ", "WEIGHTS": "INT8"}).cpu_kernel == "avx2"
    for key, value in (("CPU_KERNEL", "avx512bf16x"), ("WEIGHTS", "int4")):
        with pytest.raises(server.ConfigError, match=key):
            load_config({key: value})
    assert server.pick_kernel("torch", "bf16") == ("torch", "CPU_KERNEL=torch")
    passed = kernels_or_skip()
    for family in ("bf16", "int8"):
        best, reason = server.pick_kernel("auto", family)
        assert reason is None and best == next(v for v in server.KERNEL_VARIANTS if v.startswith(family) and v in passed)
        if f"{family}_avx2" in passed:
            assert server.pick_kernel("avx2", family) == (f"{family}_avx2", None)
    if "bf16_avx512bf16" not in passed:
        with caplog.at_level(logging.WARNING, logger="hcx"):
            assert server.pick_kernel("avx512", "bf16")[0] == server.pick_kernel("auto", "bf16")[0]
        assert "CPU_KERNEL=avx512" in caplog.text


def test_auto_dtype_is_bf16_with_avx2_and_fp32_before(monkeypatch):
    monkeypatch.setattr(server, "cpu_flags", lambda: frozenset({"sse4_2", "avx2", "fma"}))
    assert server.resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert server.resolve_dtype("auto", torch.device("cpu"), cpu_linears=False) == torch.float32
    monkeypatch.setattr(server, "cpu_flags", lambda: frozenset({"sse4_2", "avx"}))
    assert server.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(server, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert server.resolve_dtype("auto", torch.device("cpu"), cpu_linears=False) == torch.bfloat16


# -- the build: cached per machine; without a compiler torch's kernels run ---------------------------


CHILD = textwrap.dedent("""
    import json, logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    import server
    try:
        print(json.dumps({"variants": list(server.load_kernels())}))
    except server.KernelUnavailable as exc:
        print(json.dumps({"error": str(exc)}))
""")


def run_child(code: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    root = Path(server.__file__).resolve().parent
    return subprocess.run([sys.executable, "-c", code], env=clean_env({"PYTHONPATH": str(root), **(env or {})}),
                          capture_output=True, text=True, timeout=timeout, cwd=root)


def test_second_process_loads_the_cached_build():
    kernels_or_skip()  # built (or found) by this process
    done = run_child(CHILD)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1])["variants"] == list(server.load_kernels())
    assert "building the CPU kernels" not in done.stderr, done.stderr[-2000:]


def test_no_compiler_falls_back_to_torch_with_a_log_line(tmp_path, demo_model_dir):
    code = CHILD + textwrap.dedent(f"""
        for weights in ("auto", "int8"):
            cfg = server.load_config({{"MODEL_PATH": {str(demo_model_dir)!r}, "DEVICE": "cpu", "WEIGHTS": weights,
                                       "TORCH_THREADS": "1"}})
            engine = server.Engine(cfg).start(wait=True)
            body = {{"prompt": "hello", "max_tokens": 6, "min_tokens": 6, "seed": 2}}
            streamed = server.stream(engine, server.prompt_request(body, cfg))
            text = "".join(streamed)
            whole = server.generate(engine, server.prompt_request(body, cfg))
            m = engine.model
            print(json.dumps({{"weights": m.weights, "kernel": m.kernel, "dtype": str(m.dtype), "same": whole.text == text,
                               "tokens": whole.completion_tokens, "backend": m.generation_backend}}))
    """)
    done = run_child(code, {"HOME": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert "no C++ compiler" in lines[0]["error"]
    assert "no C++ compiler" in done.stderr and "one-row products run torch's kernels" in done.stderr
    bf16, int8 = lines[1:]
    assert bf16["weights"] == "bf16" and int8["weights"] == "int8"
    for answer in (bf16, int8):
        assert answer["kernel"] == "torch" and answer["backend"] == "eager"
        assert answer["same"] and answer["tokens"] == 6
    assert not list(tmp_path.glob(".cache/hcx-server/kernels/*/*.so"))


# -- int8 through every route of both tiny models ---------------------------------------------------


@pytest.mark.parametrize("which", ["demo", "hcx", "hcx-v2"])
def test_int8_answers_through_every_route(request, make_server, which):
    import test_call_all_modes as modes

    folder = model_dir(request, which)
    srv = make_server(folder, env={"WEIGHTS": "int8"})
    health = requests.get(srv.url + "/health", timeout=10).json()
    assert health["weights"] == "int8" and health["dtype"] == "bfloat16"
    assert health["kernel"] in ("int8_avx512", "int8_avx2", "torch")
    assert health["backend"] == ("eager" if health["kernel"] == "torch" else "gemv")
    reference = modes.rest(srv.url)
    assert reference
    for name, mode in modes.MODES.items():
        assert mode(srv.url) == reference, f"{name} differs from the seed REST answer"
    greedy = {**modes.SAMPLING, "temperature": 0}
    assert modes.rest(srv.url, greedy) == modes.rest(srv.url, greedy)


def test_health_reports_weights_and_kernel(server_url):
    health = requests.get(server_url + "/health", timeout=10).json()
    assert health["weights"] in ("bf16", "fp32", "fp16", "int8")
    assert health["kernel"] == "torch" or health["kernel"] in server.KERNEL_VARIANTS
    assert health["weights"] == {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(health["dtype"],
                                                                                                   health["weights"])


# -- peak memory of an int8 load (slow: builds a ~1 B random model) ---------------------------------


RSS_CHILD = textwrap.dedent("""
    import json, resource, sys
    import server
    cfg = server.load_config({"MODEL_PATH": sys.argv[1], "DEVICE": "cpu", "WEIGHTS": sys.argv[2]})
    engine = server.Engine(cfg).start(wait=True)
    body = {"prompt": "hello there", "max_tokens": 4, "min_tokens": 4, "seed": 1}
    answer = server.generate(engine, server.prompt_request(body, cfg))
    m = engine.model
    seen, served = set(), 0
    for t in list(m.model.parameters()) + list(m.model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            served += t.numel() * t.element_size()
    status = open("/proc/self/status").read()
    hwm = int(status.split("VmHWM:")[1].split()[0]) * 1024
    print(json.dumps({"served": served, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "hwm": hwm, "tokens": answer.completion_tokens, "weights": m.weights}))
""")
BASELINE_CHILD = "import json, resource, server, transformers, torch; " \
                 "print(json.dumps({'maxrss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))"


def build_mid_model(folder: Path, layers: int = 6) -> Path:
    """A random LLaVA with the real decoder's shapes (hidden 3072, MLP 7168, vocab 110592, tied
    embeddings) and `layers` layers, built in bf16 on the meta device (no fp32 copy)."""
    from transformers import (GenerationConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, SiglipImageProcessor, SiglipVisionConfig)

    tokenizer = server.build_demo_tokenizer()
    processor = LlavaProcessor(image_processor=SiglipImageProcessor(size={"height": 56, "width": 56}),
                               tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="full",
                               num_additional_image_tokens=0, chat_template=server.DEMO_CHAT_TEMPLATE,
                               image_token="<image>")
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=56, patch_size=14),
        text_config=LlamaConfig(hidden_size=3072, intermediate_size=7168, num_hidden_layers=layers,
                                num_attention_heads=24, num_key_value_heads=8, vocab_size=110592,
                                tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_seq_length=16, tie_word_embeddings=True)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.zero_() if name.endswith("bias") else param.fill_(1.0) if param.dim() == 1 else \
                param.normal_(0.0, 0.02, generator=gen)
    model.tie_weights()
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>")],
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder, max_shard_size="1GB")
    processor.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_int8_load_peak_rss_is_near_the_served_bytes(tmp_path_factory):
    folder = build_mid_model(tmp_path_factory.mktemp("mid-model"))
    base = json.loads(run_child(BASELINE_CHILD).stdout.splitlines()[-1])["maxrss"]
    root = Path(server.__file__).resolve().parent
    done = subprocess.run([sys.executable, "-c", RSS_CHILD, str(folder), "int8"], capture_output=True, text=True,
                          timeout=900, cwd=root, env=clean_env({"PYTHONPATH": str(root)}))
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["weights"] == "int8" and got["tokens"] == 4
    # the weights as served (int8 decoder + int8 lm_head + bf16 embedding, vision, norms) plus the
    # process's own baseline (python, torch, transformers: measured in a child of its own)
    bound = 1.15 * got["served"] + base
    assert got["maxrss"] <= bound and got["hwm"] <= bound, (got, base)
