"""Fast in-process tests of server.py: config, image decoding, request fields, detokenizing.

No HTTP here (see test_call_localhost.py); the model parts run the real tiny models.
"""

from __future__ import annotations

import io
import math
import random
import time

import pytest

from tests.fixtures import IMAGE_KINDS, b64, corrupt_png_size, image_bytes  # first: sets HF_HUB_OFFLINE=1

import server
from server import ConfigError, InputError, load_config

CFG = load_config({})


# ======================================================================================
# load_config
# ======================================================================================


def test_config_defaults():
    cfg = load_config({})
    assert cfg.model_path == server.HCX_HUB_ID
    assert (cfg.device, cfg.dtype, cfg.vision_dtype) == ("auto", "auto", "auto")
    assert cfg.host == "127.0.0.1" and cfg.port == 8000
    assert cfg.max_new_tokens == 512 and cfg.max_tokens_cap >= cfg.max_new_tokens
    assert cfg.demo is False and cfg.log_prompts is False
    assert cfg.hf_token is None


def test_config_values_are_normalised():
    cfg = load_config({"DTYPE": " BFloat16 ", "DEVICE": "CUDA:1", "VISION_DTYPE": "Float32", "PORT": " 9001 ",
                       "LOG_PROMPTS": "yes", "DEMO": "off", "MAX_QUEUE": "0", "MODEL_PATH": "/models/hcx/",
                       "HF_TOKEN": "hf_x", "MAX_NEW_TOKENS": "64"})
    assert cfg.dtype == "bfloat16" and cfg.device == "cuda:1" and cfg.vision_dtype == "float32"
    assert cfg.port == 9001 and cfg.log_prompts is True and cfg.demo is False and cfg.max_queue == 0
    assert cfg.hf_token == "hf_x" and cfg.max_new_tokens == 64
    assert cfg.served_model_name == "hcx"


def test_config_empty_values_mean_default():
    assert load_config({"DTYPE": "", "PORT": "  ", "MAX_QUEUE": ""}) == load_config({})


def test_config_huggingface_token_wins_over_hf_token():
    assert load_config({"HUGGINGFACE_TOKEN": "a", "HF_TOKEN": "b"}).hf_token == "a"


@pytest.mark.parametrize("max_queue", [0, 1, 8, 50])
def test_worker_threads_exceed_queue_plus_running(max_queue):
    # gunicorn's own backlog is unbounded: the app's queue only bounds anything with threads > MAX_QUEUE + 1
    assert load_config({"MAX_QUEUE": str(max_queue)}).worker_threads > max_queue + 1


BAD_CONFIG = [
    ("DEVICE", "gpu"), ("DEVICE", "cuda:x"), ("DEVICE", "tpu"),
    ("DTYPE", "fp16"), ("DTYPE", "int8"),
    ("VISION_DTYPE", "bfloat16"),
    ("MAX_NEW_TOKENS", "0"), ("MAX_NEW_TOKENS", "many"), ("MAX_NEW_TOKENS", "1.5"),
    ("MAX_TOKENS_CAP", "-1"),
    ("PORT", "0"), ("PORT", "70000"), ("PORT", "http"),
    ("THREADS", "-1"), ("THREADS", "lots"),
    ("MAX_QUEUE", "-1"), ("MAX_QUEUE", "ten"),
    ("MAX_BODY_BYTES", "10"), ("MAX_BODY_BYTES", "1MB"),
    ("MAX_IMAGE_BYTES", "0"),
    ("MAX_IMAGE_PIXELS", "0"),
    ("MAX_IMAGES", "0"), ("MAX_IMAGES", "100"),
    ("MAX_TOTAL_PIXELS", "-1"), ("MAX_TOTAL_PIXELS", "lots"), ("READ_TIMEOUT", "0"), ("READ_TIMEOUT", "1.5"),
    ("LOG_PROMPTS", "maybe"),
    ("DEMO", "2"),
]


@pytest.mark.parametrize("key,value", BAD_CONFIG, ids=[f"{k}={v}" for k, v in BAD_CONFIG])
def test_config_bad_value_is_one_line_naming_the_key(key, value):
    with pytest.raises(ConfigError) as info:
        load_config({key: value})
    message = str(info.value)
    assert message.startswith(f"{key}="), message
    assert value.lower() in message.lower(), message
    assert "\n" not in message
    assert "expected" in message  # says what is allowed


def test_config_cap_below_max_new_tokens_is_an_error():
    with pytest.raises(ConfigError, match="MAX_TOKENS_CAP"):
        load_config({"MAX_NEW_TOKENS": "2048", "MAX_TOKENS_CAP": "1024"})
    assert load_config({"MAX_NEW_TOKENS": "8192"}).max_tokens_cap >= 8192


def test_config_overrides():
    assert load_config({}, port=1234, demo=True).port == 1234


# ======================================================================================
# decode_image / open_image / flatten_to_rgb
# ======================================================================================

PNG = image_bytes("png", size=(64, 48))


@pytest.mark.parametrize("text", [
    b64(PNG),
    b64(PNG, data_url=True),
    b64(PNG, data_url="image/jpeg"),  # a wrong image MIME type is harmless: Pillow sniffs the bytes
    "DATA:IMAGE/PNG;BASE64," + b64(PNG),
    "data:;base64," + b64(PNG),
    "data:image/png;name=x.png;base64," + b64(PNG),
    b64(PNG, wrap=76),
    b64(PNG, wrap=64, newline="\r\n"),
    b64(PNG, data_url=True, wrap=76),
    "  \n" + b64(PNG, wrap=60, newline="\n\t ") + "\n\n",
], ids=["plain", "data-url", "data-url-jpeg", "data-url-upper", "data-url-no-mime", "data-url-params",
        "wrapped-76", "wrapped-crlf", "data-url-wrapped", "whitespace"])
def test_decode_image_accepts_client_variants(text):
    img = server.decode_image(text, CFG)
    assert img.mode == "RGB" and img.size == (64, 48)
    assert img.getpixel((5, 5)) == (220, 30, 30) and img.getpixel((60, 40)) == (30, 30, 220)


@pytest.mark.parametrize("text,code", [
    ("!!!not base64!!!", "invalid_base64"),
    (b64(PNG)[:-1], "invalid_base64"),  # bad padding
    (b64(PNG).replace("+", "-").replace("/", "_") + "-_", "invalid_base64"),  # url-safe alphabet
    ("data:image/png;base64,@@@@", "invalid_base64"),
    ("data:image/png," + b64(PNG), "invalid_image"),  # not ;base64
    ("data:text/plain;base64," + b64(b"hello"), "invalid_image"),
    ("data:image/png;base64,", "invalid_image"),  # nothing after the prefix
    (b64(b"hello, this is not an image at all"), "invalid_image"),
    (b64(PNG[: len(PNG) // 2]), "invalid_image"),  # truncated PNG
    (b64(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), "invalid_image"),  # PNG magic, garbage after
])
def test_decode_image_rejects_bad_input(text, code):
    with pytest.raises(InputError) as info:
        server.decode_image(text, CFG)
    assert info.value.code == code, info.value.message
    assert info.value.status == 400
    assert info.value.param == "image_base64"


def test_decode_image_byte_limit_is_413_before_decoding():
    cfg = load_config({"MAX_IMAGE_BYTES": "1024"})
    big = image_bytes("large_1200x900")
    assert len(big) > 1024
    with pytest.raises(InputError) as info:
        server.decode_image(b64(big), cfg)
    assert info.value.status == 413 and info.value.code == "image_too_large"
    with pytest.raises(InputError) as info:
        server.open_image(big, cfg)
    assert info.value.status == 413


def test_pixel_limit_refuses_large_images():
    cfg = load_config({"MAX_IMAGE_PIXELS": str(64 * 48 - 1)})
    with pytest.raises(InputError) as info:
        server.decode_image(b64(PNG), cfg)
    assert info.value.code == "image_too_large" and "MAX_IMAGE_PIXELS" in info.value.message
    assert server.decode_image(b64(PNG), load_config({"MAX_IMAGE_PIXELS": str(64 * 48)})).size == (64, 48)


@pytest.mark.parametrize("max_pixels", [None, str(1 << 34)], ids=["our-limit", "pillow-limit"])
def test_decompression_bomb_header_is_refused_fast(max_pixels):
    bomb = corrupt_png_size(40_000, 40_000)  # claims 1.6 G pixels in a 70-byte file
    cfg = load_config({"MAX_IMAGE_PIXELS": max_pixels} if max_pixels else {})
    started = time.perf_counter()
    with pytest.raises(InputError) as info:
        server.decode_image(b64(bomb), cfg)
    assert info.value.code == "image_too_large", info.value.message
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_open_image_every_kind_becomes_rgb(kind):
    from PIL import Image

    raw = image_bytes(kind)
    with Image.open(io.BytesIO(raw)) as original:
        size = original.size
    img = server.open_image(raw, CFG)
    assert img.mode == "RGB"
    expected = (size[1], size[0]) if kind == "exif_rotated_jpeg" else size
    assert img.size == expected


def test_exif_orientation_is_applied():
    img = server.open_image(image_bytes("exif_rotated_jpeg", size=(64, 48)), CFG)
    assert img.size == (48, 64)  # orientation 6: rotate 90° clockwise
    top, bottom = img.getpixel((24, 5)), img.getpixel((24, 58))
    # the left half (red) of the stored pixels is on top once rotated clockwise
    assert top[0] > 150 and top[2] < 100, top
    assert bottom[2] > 150 and bottom[0] < 100, bottom


def test_flatten_rgba_transparent_becomes_white():
    from PIL import Image

    img = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    img.putpixel((3, 1), (10, 20, 30, 255))
    img.putpixel((2, 1), (0, 0, 0, 128))
    out = server.flatten_to_rgb(img)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((3, 1)) == (10, 20, 30)
    assert all(120 <= c <= 135 for c in out.getpixel((2, 1)))  # half black over white: grey


def test_flatten_palette_with_transparency_becomes_white():
    img = server.open_image(image_bytes("palette_transparent_png"), CFG)
    assert img.getpixel((2, 2)) == (255, 255, 255)  # transparent left half
    r, _, b = img.getpixel((60, 40))
    assert b > 150 and r < 100  # opaque blue right half kept


def test_flatten_palette_without_transparency_keeps_colours():
    img = server.open_image(image_bytes("palette_png"), CFG)
    r, _, b = img.getpixel((2, 2))
    assert r > 150 and b < 100


def test_flatten_cmyk_and_greyscale():
    from PIL import Image

    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    r, g, b = server.flatten_to_rgb(cmyk).getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60
    la = server.open_image(image_bytes("la_png"), CFG)
    assert la.getpixel((2, 2)) == (255, 255, 255) and la.getpixel((60, 40)) == (90, 90, 90)
    grey = server.flatten_to_rgb(Image.new("L", (2, 2), 77))
    assert grey.mode == "RGB" and grey.getpixel((1, 1)) == (77, 77, 77)


# ======================================================================================
# Request fields
# ======================================================================================


def test_sampling_defaults_follow_the_model_card():
    f = server.sampling_fields({}, CFG)
    assert f == {"max_new_tokens": CFG.max_new_tokens, "max_tokens_explicit": False, "min_new_tokens": 0,
                 "temperature": 0.5, "top_p": 0.6, "seed": None}


@pytest.mark.parametrize("body,key,value", [
    ({"max_tokens": 1}, "max_new_tokens", 1),
    ({"max_tokens": 4096}, "max_new_tokens", 4096),
    ({"max_tokens": 16.0}, "max_new_tokens", 16),
    ({"max_completion_tokens": 7}, "max_new_tokens", 7),
    ({"max_new_tokens": 9}, "max_new_tokens", 9),
    ({"temperature": 0}, "temperature", 0.0),
    ({"temperature": 2}, "temperature", 2.0),
    ({"top_p": 1}, "top_p", 1.0),
    ({"top_p": 1e-9}, "top_p", 1e-9),
    ({"seed": -5}, "seed", -5),
    ({"seed": 2**63 - 1}, "seed", 2**63 - 1),
    ({"min_tokens": 600}, "max_new_tokens", 600),  # min above the default max raises the max
    ({"min_tokens": 4, "max_tokens": 4}, "min_new_tokens", 4),
])
def test_sampling_fields_accepted(body, key, value):
    assert server.sampling_fields(body, CFG)[key] == value


BAD_FIELDS = [
    {"max_tokens": 0}, {"max_tokens": -1}, {"max_tokens": 4097}, {"max_tokens": 10**30},
    {"max_tokens": True}, {"max_tokens": "16"}, {"max_tokens": 1.5}, {"max_tokens": math.nan},
    {"max_tokens": math.inf}, {"max_tokens": [16]},
    {"max_completion_tokens": 0},
    {"min_tokens": -1}, {"min_tokens": True}, {"min_tokens": 9, "max_tokens": 8},
    {"temperature": -0.1}, {"temperature": 2.01}, {"temperature": math.nan}, {"temperature": math.inf},
    {"temperature": True}, {"temperature": "0.5"}, {"temperature": 1e400},
    {"top_p": 0}, {"top_p": -1}, {"top_p": 1.01}, {"top_p": math.nan}, {"top_p": False},
    {"seed": True}, {"seed": 1.5}, {"seed": 2**63}, {"seed": -(2**63) - 1}, {"seed": "7"}, {"seed": math.nan},
]


@pytest.mark.parametrize("body", BAD_FIELDS, ids=[repr(b) for b in BAD_FIELDS])
def test_sampling_fields_rejected(body):
    with pytest.raises(InputError) as info:
        server.sampling_fields(body, CFG)
    assert info.value.status == 400
    assert info.value.param in body, info.value.param
    assert info.value.param in info.value.message


def test_max_tokens_cap_comes_from_config():
    cfg = load_config({"MAX_NEW_TOKENS": "8", "MAX_TOKENS_CAP": "100"})
    assert server.sampling_fields({}, cfg)["max_new_tokens"] == 8
    assert server.sampling_fields({"max_tokens": 100}, cfg)["max_new_tokens"] == 100
    with pytest.raises(InputError):
        server.sampling_fields({"max_tokens": 101}, cfg)


@pytest.mark.parametrize("body,param", [
    ({}, "prompt"), ({"prompt": None}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": " \n\t"}, "prompt"),
    ({"prompt": 5}, "prompt"), ({"prompt": ["a"]}, "prompt"), ({"prompt": {"text": "a"}}, "prompt"),
    ({"prompt": "hi", "image_base64": 5}, "image_base64"), ({"prompt": "hi", "image_base64": ["x"]}, "image_base64"),
    ({"prompt": "hi", "image_base64": "%%%"}, "image_base64"),
])
def test_prompt_request_rejects(body, param):
    with pytest.raises(InputError) as info:
        server.prompt_request(body, CFG)
    assert info.value.param == param and info.value.status == 400


def test_prompt_request_builds_one_user_message():
    req = server.prompt_request({"prompt": "이 사진을 설명해 주세요", "image_base64": b64(PNG, data_url=True),
                                 "max_tokens": 5, "seed": 3}, CFG)
    assert [m.role for m in req.messages] == ["user"]
    assert req.messages[0].text == "이 사진을 설명해 주세요"
    assert req.image_count == 1 and req.messages[0].images[0].size == (64, 48)
    assert (req.max_new_tokens, req.seed) == (5, 3)
    text_only = server.prompt_request({"prompt": "hi", "image_base64": "  "}, CFG)
    assert text_only.image_count == 0


def test_system_prompt_is_prepended_once():
    cfg = load_config({"SYSTEM_PROMPT": "Be brief."})
    req = server.prompt_request({"prompt": "hi"}, cfg)
    assert [(m.role, m.text) for m in req.messages] == [("system", "Be brief."), ("user", "hi")]
    assert [m.role for m in server.prompt_request({"prompt": "hi"}, CFG).messages] == ["user"]


# ======================================================================================
# Detokenizer and StopStrings
# ======================================================================================

KOREAN = [
    "이 이미지를 설명해 주세요.",  # in the demo tokenizer's corpus: whole-word tokens
    "낯선 골목의 곰탕집에서 휘파람을 불었다 🍲, 그리고 웃었다!",  # not in it: byte-level pieces
    "서울특별시 강남구 테헤란로 — 한국어 English 섞인 문장 ✓ 끝.",
]


@pytest.fixture(scope="module", params=["demo", "hcx"])
def tokenizer(request, tmp_path_factory):
    from transformers import AutoTokenizer

    if request.param == "demo":
        folder = request.getfixturevalue("demo_model_dir")
    else:
        folder = request.getfixturevalue("hcx_model_dir")
    return AutoTokenizer.from_pretrained(folder)


def feed(detok: server.Detokenizer, ids: list[int]) -> list[str]:
    return [detok.add(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("text", KOREAN)
def test_detokenizer_never_emits_partial_utf8(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    # the test is only meaningful if some token is NOT a whole character on its own
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids) or text == KOREAN[0]
    pieces = feed(server.Detokenizer(tokenizer), ids)
    for piece in pieces:
        assert "\ufffd" not in piece, pieces
        piece.encode("utf-8", errors="strict")  # no lone surrogates either
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert "".join(pieces) == text
    assert sum(1 for p in pieces if p) > 1  # text arrives as it is decoded, not all at the end


def test_detokenizer_skips_special_tokens(tokenizer):
    ids = tokenizer.encode(KOREAN[1], add_special_tokens=False)
    specials = [i for i in tokenizer.all_special_ids]
    assert specials
    mixed = ids[:3] + specials + ids[3:]
    text = "".join(feed(server.Detokenizer(tokenizer), mixed))
    assert text == KOREAN[1]


@pytest.mark.parametrize("seed", range(40))
def test_detokenizer_join_equals_decode_on_random_ids(tokenizer, seed):
    # random ids (as random weights produce) include broken byte sequences: the joined pieces
    # must still equal one decode of all ids, and no piece may end in the middle of a character
    rng = random.Random(seed)
    ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 80))]
    pieces = feed(server.Detokenizer(tokenizer), ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    for piece in pieces[:-1]:
        assert not piece.endswith("\ufffd"), pieces


def test_stop_strings_pass_through_without_stops():
    s = server.StopStrings(())
    assert s.feed("abc STOP") == "abc STOP" and not s.hit
    s = server.StopStrings(("",))
    assert s.feed("x") == "x" and s.flush() == ""


def test_stop_string_split_across_pieces():
    s = server.StopStrings(("STOP",))
    assert s.feed("Hello ST") == "Hello "
    assert not s.hit
    assert s.feed("OP and more") == ""
    assert s.hit


def test_stop_string_prefix_is_released_when_it_does_not_match():
    s = server.StopStrings(("STOP",))
    assert s.feed("abc S") == "abc "
    assert s.feed("x") == "Sx"
    assert s.feed("ST") == ""
    assert s.flush() == "ST" and not s.hit


def test_earliest_stop_string_wins():
    s = server.StopStrings(("END", "STOP"))
    assert s.feed("a STOP b END") == "a " and s.hit


def test_korean_stop_string():
    s = server.StopStrings(("끝.",))
    out = "".join(s.feed(p) for p in ["서울 ", "끝", ". 더"])
    assert out == "서울 " and s.hit


# ======================================================================================
# Inputs through the real tiny models (in-process engine, real forward passes)
# ======================================================================================


@pytest.fixture(scope="module", params=["demo", "hcx"])
def engine(request):
    folder = request.getfixturevalue("demo_model_dir" if request.param == "demo" else "hcx_model_dir")
    cfg = load_config({"MODEL_PATH": str(folder), "DEVICE": "cpu", "DTYPE": "float32"})
    return server.Engine(cfg).start(wait=True)


def test_loaded_model_stop_ids_come_from_the_tokenizer(engine):
    m = engine.model
    tok = m.tokenizer
    for token in ("<|im_end|>",):
        assert tok.convert_tokens_to_ids(token) in m.stop_token_ids
    assert all(isinstance(i, int) and 0 <= i < len(tok) for i in m.stop_token_ids)
    assert m.context_length == 1024


def test_image_adds_prompt_tokens_and_only_pixels_are_float(engine):
    m = engine.model
    text_only = server.build_inputs(m, server.prompt_request({"prompt": "What is this?"}, engine.cfg))
    with_image = server.build_inputs(m, server.prompt_request(
        {"prompt": "What is this?", "image_base64": b64(PNG)}, engine.cfg))
    assert with_image.prompt_tokens > text_only.prompt_tokens
    for key, value in with_image.tensors.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if hasattr(v, "is_floating_point"):
                # ids, sizes and masks keep their integer dtype (the fp16 fix); pixels get the vision dtype
                assert v.dtype == m.vision_dtype if v.is_floating_point() else not v.dtype.is_floating_point, key
    assert with_image.tensors["input_ids"].dtype.is_floating_point is False


@pytest.mark.parametrize("kind", ["tiny_1x1", "thin_40x3", "thin_3x40", "cmyk_jpeg", "large_1200x900"])
def test_awkward_images_build_inputs(engine, kind):
    req = server.prompt_request({"prompt": "hi", "image_base64": b64(image_bytes(kind))}, engine.cfg)
    assert server.build_inputs(engine.model, req).prompt_tokens > 0


def test_explicit_max_tokens_over_context_is_refused(engine):
    req = server.prompt_request({"prompt": "hi", "max_tokens": 1024}, engine.cfg)
    with pytest.raises(InputError) as info:
        engine.submit(req)
    assert info.value.code == "context_length_exceeded"
    # the default budget shrinks to fit instead
    job = engine.submit(server.prompt_request({"prompt": "hi", "max_tokens": None}, engine.cfg))
    job.cancel()
    assert job.max_new_tokens <= 1024 - job.inputs.prompt_tokens


def test_generate_equals_stream_and_counts_tokens(engine):
    body = {"prompt": "낯선 곰탕집 QZX-unique-prompt-314", "seed": 11, "max_tokens": 24, "min_tokens": 24}
    streamed = server.stream(engine, server.prompt_request(body, engine.cfg))
    pieces = list(streamed)
    whole = server.generate(engine, server.prompt_request(body, engine.cfg))
    assert "".join(pieces) == whole.text
    assert whole.completion_tokens == streamed.completion.completion_tokens == 24
    assert whole.finish_reason == "length"
    assert "QZX-unique-prompt-314" not in whole.text
    assert all(not p.endswith("\ufffd") for p in pieces[:-1])


# ======================================================================================
# Origins, CORS preflight headers, and the request parsers of the Responses and Ollama APIs
# ======================================================================================


@pytest.mark.parametrize("origin, allowed", [
    ("vscode-webview://1a2b3c4d5e", True), ("VSCODE-WEBVIEW://ABC", True), ("vscode-webview://", False),
    ("vscode-webview://a/b", False), ("vscode-file://vscode-app", False), ("http://localhost:5173", True),
    ("http://localhost:x", False), ("https://app.example", True), ("https://app.example:8443", False),
    ("null", False), ("http://evil.example", False),
])
def test_origin_allowed_with_scheme_and_port_wildcards(origin, allowed):
    entries = load_config({"ALLOWED_ORIGINS": "vscode-webview://*, http://localhost:*, https://app.example"})
    assert server.origin_allowed(origin, entries.allowed_origins) is allowed


@pytest.mark.parametrize("value", ["vscode-webview", "*.example.com", "http://a/b", "vscode-webview:*"])
def test_allowed_origins_bad_entry_is_a_config_error(value):
    with pytest.raises(ConfigError, match="ALLOWED_ORIGINS"):
        load_config({"ALLOWED_ORIGINS": value})


def test_preflight_headers_echo_what_the_page_asks_for():
    allowed = server.preflight_allowed_headers("X-Stainless-OS, x-stainless-lang,Content-Type, bad header, ,a:b")
    names = [h.lower() for h in allowed.split(", ")]
    assert {"x-stainless-os", "x-stainless-lang", "authorization", "mcp-session-id", "mcp-protocol-version"} <= set(names)
    assert len(names) == len(set(names)), "listed once each"
    assert "bad header" not in names and "a:b" not in names


def test_responses_request_builds_messages():
    body = {"instructions": "Be brief.", "max_output_tokens": 7, "temperature": 0, "input": [
        {"role": "developer", "content": "Korean only."},
        {"role": "user", "content": [{"type": "input_text", "text": "What?"},
                                     {"type": "input_image", "image_url": b64(image_bytes("png"), data_url=True)}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "A square."}]},
        {"type": "item_reference", "id": "msg_1"},
        {"role": "user", "content": "And?"}]}
    req = server.responses_request(body, CFG, recall={"msg_1": "Red."}.get)
    assert [(m.role, m.text, len(m.images)) for m in req.messages] == [
        ("system", "Be brief.", 0), ("system", "Korean only.", 0), ("user", "What?", 1),
        ("assistant", "A square.", 0), ("assistant", "Red.", 0), ("user", "And?", 0)]
    assert req.max_new_tokens == 7 and req.max_tokens_explicit and req.temperature == 0


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "store": True}, "store"), ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": [{"type": "item_reference", "id": "msg_gone"}]}, "input[0]"),
    ({"input": [{"role": "assistant", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
     "input[0].content[0]"),
])
def test_responses_request_rejects(body, param):
    with pytest.raises(InputError) as info:
        server.responses_request(body, CFG)
    assert info.value.param == param


def test_ollama_requests_build_messages_and_sampling():
    png = b64(image_bytes("png"))
    chat = server.ollama_chat_request({"model": "m", "messages": [
        {"role": "user", "content": "Hi", "images": [png, png]}, {"role": "assistant", "content": None}],
        "options": {"num_predict": 9, "temperature": 0.3, "top_p": 0.5, "seed": 3, "stop": ["x"], "num_ctx": 8192}},
        CFG)
    assert [(m.role, m.text, len(m.images)) for m in chat.messages] == [("user", "Hi", 2), ("assistant", "", 0)]
    assert (chat.max_new_tokens, chat.temperature, chat.top_p, chat.seed, chat.stop) == (9, 0.3, 0.5, 3, ("x",))
    gen = server.ollama_generate_request({"model": "m", "prompt": "Go", "system": "Sys", "images": [png],
                                          "options": {"num_predict": -1}}, CFG)
    assert [(m.role, m.text, len(m.images)) for m in gen.messages] == [("system", "Sys", 0), ("user", "Go", 1)]
    assert gen.max_new_tokens == CFG.max_new_tokens and not gen.max_tokens_explicit
    assert server.ollama_generate_request({"model": "m", "prompt": ""}, CFG) is None
    assert server.ollama_chat_request({"model": "m", "messages": []}, CFG) is None


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "prompt": "x", "options": {"mirostat": 2}}, "options.mirostat"),
    ({"model": "m", "prompt": "x", "options": {"num_predict": 10**9}}, "num_predict"),
    ({"model": "m", "prompt": "x", "raw": True}, "raw"), ({"prompt": "x"}, "model"),
    ({"model": "m", "prompt": "x", "images": "abc"}, "images"),
])
def test_ollama_generate_request_rejects(body, param):
    with pytest.raises(InputError) as info:
        server.ollama_generate_request(body, CFG)
    assert info.value.param == param


# ======================================================================================
# hardening, round two (the live-server cases are in tests/test_hardening2.py)
# ======================================================================================


@pytest.mark.parametrize("address", ["64:ff9b::7f00:1", "2002:7f00:1::", "::127.0.0.1", "::ffff:0:7f00:1",
                                     "::ffff:127.0.0.1", "64:ff9b::a00:1", "2002:c0a8:101::", "::ffff:0:a9fe:a9fe",
                                     "64:ff9b:1::7f00:1", "2001:0:4136:e378:8000:63bf:80ff:fffe",
                                     "127.0.0.1", "10.0.0.1", "::1", "fe80::1", "::"])
def test_ssrf_filter_unwraps_ipv4_in_ipv6(address):
    import ipaddress

    assert server.is_blocked_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:4700::1111", "64:ff9b::5db8:d822", "2002:5db8:d822::"])
def test_ssrf_filter_lets_public_addresses_through(address):
    import ipaddress

    assert not server.is_blocked_address(ipaddress.ip_address(address))


def test_remote_image_to_an_embedded_loopback_is_refused_without_connecting():
    cfg = load_config({"ALLOW_REMOTE_IMAGES": "1"})
    for url in ("http://[64:ff9b::7f00:1]:9/x.png", "http://[::127.0.0.1]:9/x.png", "http://[2002:7f00:1::]:9/x.png"):
        with pytest.raises(InputError, match="loopback, private or reserved"):
            server.image_from_url(url, cfg, "image_url")


@pytest.mark.parametrize("origin", ["http://localhost:\u0668\u0660\u0660\u0660", "http://localhost:８０００",
                                    "http://127.0.0.1:123456"])
def test_origin_port_must_be_ascii_digits(origin):
    assert not server.origin_allowed(origin, server.DEFAULT_ALLOWED_ORIGINS)
    assert server.origin_allowed("http://localhost:8000", server.DEFAULT_ALLOWED_ORIGINS)


@pytest.mark.parametrize("host,ok", [
    ("localhost", True), ("localhost:8000", True), ("127.0.0.1:8000", True), ("[::1]:8000", True), ("[::1]", True),
    ("LocalHost:1", True), ("localhost.:8000", True), ("localhost:", True), (None, True),
    ("evil.example", False), ("evil.example:8000", False), ("localhost.evil.example", False),
    ("127.0.0.1.nip.io", False), ("[::1]x", False), ("localhost:\u0668\u0660", False), ("127.0.0.2", False),
    ("::1", False), ("", False)])
def test_host_header_check(host, ok):
    assert server.host_allowed(host, server.LOOPBACK_HOST_NAMES) is ok


def test_allowed_hosts_config():
    assert load_config({}).host_allowlist == server.LOOPBACK_HOST_NAMES
    assert load_config({"HOST": "0.0.0.0"}).host_allowlist == ("*",)
    cfg = load_config({"ALLOWED_HOSTS": "hcx.lan, LOCALHOST, [fd00::1]"})
    assert cfg.host_allowlist == ("hcx.lan", "localhost", "[fd00::1]")
    assert server.host_allowed("hcx.lan:8000", cfg.host_allowlist)
    assert not server.host_allowed("x.lan", cfg.host_allowlist)
    assert server.host_allowed("anything", load_config({"ALLOWED_HOSTS": "*"}).host_allowlist)
    for bad in ("http://hcx.lan", "hcx.lan:8000", "a b", "fd00::1"):
        with pytest.raises(ConfigError, match="ALLOWED_HOSTS"):
            load_config({"ALLOWED_HOSTS": bad})


def test_mcp_sessions_in_use_are_never_evicted():
    mcp = server.McpServer(server.Engine(load_config({})))
    mcp.MAX_SESSIONS = 8
    mine = mcp.open_session("2025-03-26")
    flood = [mcp.open_session("2025-03-26") for _ in range(7)]
    with pytest.raises(server.TooManySessions):  # a flood of initialize calls: refused, not evicting
        mcp.open_session("2025-03-26")
    assert mcp.has_session(mine) and all(mcp.has_session(s) for s in flood)
    for session in flood[:3]:  # three go idle past SESSION_IDLE_S; mine is used again just now
        mcp.last_used[session] -= mcp.SESSION_IDLE_S + 1
    assert mcp.has_session(mine)
    fresh = [mcp.open_session("2025-03-26") for _ in range(3)]  # the idle ones make room, oldest first
    assert not any(mcp.has_session(s) for s in flood[:3])
    assert mcp.has_session(mine) and all(mcp.has_session(s) for s in fresh + flood[3:])
    with pytest.raises(server.TooManySessions):
        mcp.open_session("2025-03-26")


def test_slots_bound_requests_and_max_queue_0_lets_none_wait():
    engine = server.Engine(load_config({"MAX_QUEUE": "0"}))
    slot = engine.reserve()
    with pytest.raises(server.Busy, match="MAX_QUEUE=0"):
        engine.reserve()
    with slot:  # not taken by a job: freed on leaving
        pass
    assert engine.idle
    engine = server.Engine(load_config({"MAX_QUEUE": "2"}))
    held = [engine.reserve() for _ in range(3)]
    with pytest.raises(server.Busy, match="2 requests already waiting"):
        engine.reserve()
    held[0].release()
    held[0].release()  # idempotent
    assert engine.admitted == 2
    engine.reserve()


def test_image_parts_are_counted_before_decoding():
    """Garbage in the image parts beyond MAX_IMAGES: the count is the error, nothing was decoded."""
    cfg = load_config({"MAX_IMAGES": "2"})
    parts = [{"type": "text", "text": "hi"}] + [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}] * 3
    with pytest.raises(InputError) as info:
        server.openai_request({"messages": [{"role": "user", "content": parts}]}, cfg)
    assert info.value.code == "too_many_images"
    with pytest.raises(InputError) as info:
        server.ollama_generate_request({"model": "m", "prompt": "hi", "images": ["@@"] * 3}, cfg)
    assert info.value.code == "too_many_images" and info.value.param == "images"
    with pytest.raises(InputError) as info:
        server.responses_request({"input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "data:,@@"}] * 3}]}, cfg)
    assert info.value.code == "too_many_images"


def test_pixel_budget_sums_the_request_images_from_their_headers():
    cfg = load_config({"MAX_TOTAL_PIXELS": str(64 * 48 * 2)})
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(image_bytes("png", size=(64, 48)))}}

    def body(n: int) -> dict:
        return {"messages": [{"role": "user", "content": [part] * n}]}

    assert server.openai_request(body(2), cfg).image_count == 2
    with pytest.raises(InputError) as info:
        server.openai_request(body(3), cfg)
    assert info.value.code == "image_too_large" and "MAX_TOTAL_PIXELS" in info.value.message
    assert info.value.param == "messages[0].content[2].image_url"
    assert load_config({}).pixel_budget == 4 * server.PIXELS_PER_IMAGE_BUDGET
    assert load_config({"MAX_IMAGES": "2"}).pixel_budget == 2 * server.PIXELS_PER_IMAGE_BUDGET


def test_longest_token_chars_bounds_only_what_it_can():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    demo = server.build_demo_tokenizer()
    longest = server.longest_token_chars(demo)
    assert longest == max(len(t) for t in demo.get_vocab()) > 1
    text = "The image shows a red square. 빨간색 사각형이 있습니다. " * 50
    assert len(demo(text)["input_ids"]) * longest >= len(text)  # the bound holds on real text

    def tokenizer(normalizer, model=None, pre=pre_tokenizers.ByteLevel()):
        tok = Tokenizer(model or models.BPE())
        tok.normalizer, tok.pre_tokenizer = normalizer, pre
        tok.add_tokens(["abc"])
        return PreTrainedTokenizerFast(tokenizer_object=tok)

    assert server.longest_token_chars(tokenizer(None)) == 3
    assert server.longest_token_chars(tokenizer(normalizers.NFC())) == 12  # composing shrinks up to 4:1
    assert server.longest_token_chars(tokenizer(normalizers.Strip())) == 0  # may delete: no bound
    assert server.longest_token_chars(tokenizer(normalizers.Sequence([normalizers.NFKC(), normalizers.Strip()]))) == 0
    assert server.longest_token_chars(tokenizer(None, pre=pre_tokenizers.Whitespace())) == 0  # unknown chars vanish
    assert server.longest_token_chars(tokenizer(None, model=models.WordPiece(unk_token="[UNK]"))) == 0


def test_text_beyond_the_context_is_refused_before_tokenizing():
    m = server.LoadedModel(kind="text", interface="text", model=None, processor=None, tokenizer=None, name="t",
                           path="", device=None, dtype=None, vision_dtype=None, stop_token_ids=(), pad_token_id=0,
                           context_length=1000, max_token_chars=10)
    req = server.GenerationRequest(messages=[server.Message("user", "x" * 10_001)], max_new_tokens=4)
    with pytest.raises(InputError) as info:
        server.build_inputs(m, req)  # tokenizer=None: it would fail if it tokenized
    assert info.value.code == "context_length_exceeded"


def _feed(raw: bytes, max_body: int = 1000, step: int | None = None) -> server.RequestBuffer:
    buffer = server.RequestBuffer(max_body)
    ready = False
    for at in range(0, len(raw), step or len(raw)):
        assert not ready, "ready before the last byte"
        ready = buffer.feed(raw[at:at + (step or len(raw))])
    buffer.ready = ready
    return buffer


HEAD = b"POST /x HTTP/1.1\r\nHost: h\r\n"


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_request_buffer_finds_the_end_of_each_kind_of_request(step):
    for raw in (b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n",
                HEAD + b"Content-Length: 5\r\n\r\nhello",
                HEAD + b"Transfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\n\r\n",
                HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\nX-Trailer: 1\r\n\r\n",
                b"\r\n" + HEAD + b"\r\n"):
        buffer = _feed(raw, step=step)
        assert buffer.ready and not buffer.partial, raw
    almost = HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
    assert not _feed(almost, step=step).ready  # the last CRLF is missing
    assert not _feed(HEAD + b"Content-Length: 5\r\n\r\nhell", step=step).ready


def test_request_buffer_hands_over_early_what_the_app_or_parser_refuses():
    over = _feed(HEAD + b"Content-Length: 1001\r\n\r\n")  # no body byte needed for a 413
    assert over.ready and over.partial
    chunked_over = server.RequestBuffer(1000)
    assert not chunked_over.feed(HEAD + b"Transfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"x" * 1000)
    assert chunked_over.feed(b"\r\n1\r\nx")  # body byte 1001 is here: MAX_BODY_BYTES + 1 to read, a 413
    assert chunked_over.partial
    for bad in (HEAD + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n", HEAD + b"Content-Length: -1\r\n\r\n",
                HEAD + b"Transfer-Encoding: gzip\r\n\r\n", HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", HEAD + b"Bad header\r\n\r\n"):
        buffer = _feed(bad)
        assert buffer.ready and buffer.partial, bad
    big = server.RequestBuffer(1000)
    assert not big.feed(b"GET / HTTP/1.1\r\nX: " + b"a" * server.REQUEST_HEAD_LIMIT) and big.head_too_large


def test_request_buffer_keeps_a_pipelined_request_and_sees_expect_continue():
    first = HEAD + b"Content-Length: 2\r\n\r\nhi"
    buffer = _feed(first + b"GET /health HTTP/1.1\r\n")
    assert buffer.ready and bytes(buffer.data).startswith(first) and bytes(buffer.data).endswith(b"HTTP/1.1\r\n")
    waiting = server.RequestBuffer(1000)
    assert not waiting.feed(HEAD + b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert waiting.expect_continue
    assert not _feed(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n").expect_continue
