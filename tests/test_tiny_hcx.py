"""Self-check of the tiny HCX remote-code package (tests/tiny_hcx, tests/tiny_models.py).

Runs the documented first-revision model-card flow end to end on random weights and
asserts structure only (token counts, shapes, key sets), never words.
"""

import base64
import io
import os
import threading

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

try:  # tests/ is a package (tests/__init__.py) -> import via the package
    from tests.tiny_models import IMAGE_TOKEN, STOP_TOKENS, build_tiny_hcx  # noqa: E402
except ImportError:  # pragma: no cover - tests/ on sys.path directly
    from tiny_models import IMAGE_TOKEN, STOP_TOKENS, build_tiny_hcx  # noqa: E402

PRE_KEYS = {
    "pixel_values",
    "image_sizes",
    "vision_query_lengths",
    "is_videos",
    "num_queries_vis_abstractors",
    "num_queries_vis_abstractors_slow",
    "first_last_frames_slows",
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_hcx(tmp_path_factory.mktemp("tiny_hcx_model"), seed=0)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def preprocessor(model_dir):
    return AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)


_MODELS = {}


def load_model(model_dir, dtype):
    key = (str(model_dir), dtype)
    if key not in _MODELS:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, trust_remote_code=True, torch_dtype=dtype
        )
        _MODELS[key] = model.eval()
    return _MODELS[key]


def png_bytes(size=(300, 200), color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def image_chat(image, filename="x.png"):
    return [
        {"role": "system", "content": {"type": "text", "text": "You are a helpful assistant."}},
        {"role": "user", "content": {"type": "text", "text": "이 이미지를 설명해 주세요."}},
        {"role": "user", "content": {"type": "image", "filename": filename, "image": image}},
    ]


TEXT_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "안녕하세요, how are you?"},
]


def stop_ids(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    assert len(set(ids)) == 3 and tokenizer.unk_token_id not in ids
    return ids


def greedy_8(tokenizer, **extra) -> dict:
    """Exactly 8 greedy tokens, stopping on the HCX end-of-turn ids."""
    return dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=stop_ids(tokenizer),
                pad_token_id=tokenizer.pad_token_id, **extra)


def build_image_inputs(tokenizer, preprocessor, image):
    new_chat, images, is_video_list = preprocessor.load_images_videos(image_chat(image))
    pre = preprocessor(images, is_video_list=is_video_list)
    input_ids = tokenizer.apply_chat_template(
        new_chat, return_tensors="pt", tokenize=True, add_generation_prompt=True
    )
    return new_chat, images, is_video_list, pre, input_ids


class RecordLengths(StoppingCriteria):
    def __init__(self):
        self.lengths = []

    def __call__(self, input_ids, scores, **kwargs):
        self.lengths.append(input_ids.shape[1])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def stream_generate(model, tokenizer, **kwargs):
    streamer = TextIteratorStreamer(
        tokenizer, skip_prompt=True, skip_special_tokens=False, timeout=60
    )
    result = {}

    def run():
        try:
            result["out"] = model.generate(streamer=streamer, **kwargs)
        except BaseException as exc:  # surface errors instead of hanging the iterator
            result["error"] = exc
            streamer.end()

    thread = threading.Thread(target=run)
    thread.start()
    chunks = list(streamer)
    thread.join(timeout=60)
    if "error" in result:
        raise result["error"]
    return result["out"], chunks


# --------------------------------------------------------------------------------------


def test_layout_and_config(model_dir, tokenizer):
    model = load_model(model_dir, torch.float32)
    assert type(model).__name__ == "HCXVisionForCausalLM"
    assert model.config.model_type == "hyperclovax_vlm"
    for name in ("vision_model", "mm_projector", "image_newline", "language_model"):
        assert hasattr(model, name), name
    assert model.config.language_config["max_position_embeddings"] == 1024
    assert model.config.img_start_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    # save_pretrained kept the remote-code mapping
    assert model.config.auto_map["AutoModelForCausalLM"].endswith("HCXVisionForCausalLM")


def test_tokenizer_is_byte_level(tokenizer):
    stop_ids(tokenizer)
    text = "안녕하세요 Hello 세계"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    # one Korean syllable (3 UTF-8 bytes) split into byte tokens decodes to U+FFFD alone
    byte_ids = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.tokenize("값")]
    if len(byte_ids) > 1:
        assert "\ufffd" in tokenizer.decode(byte_ids[:1])


def test_chat_template_text_only(tokenizer):
    ids = tokenizer.apply_chat_template(
        TEXT_CHAT, return_tensors="pt", tokenize=True, add_generation_prompt=True
    )
    text = tokenizer.decode(ids[0])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n")
    assert IMAGE_TOKEN not in text
    with pytest.raises(Exception):
        tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": "list content"}]}],
            tokenize=False,
        )


def test_preprocessor_inputs_and_outputs(tmp_path, preprocessor):
    raw = png_bytes((300, 200))
    path = tmp_path / "img.png"
    path.write_bytes(raw)
    for value in (raw, base64.b64encode(raw).decode(), str(path)):
        new_chat, images, is_video_list = preprocessor.load_images_videos(image_chat(value))
        assert len(images) == 1 and images[0].size == (300, 200)
        assert is_video_list == [False]
        assert "image" not in new_chat[2]["content"]
        assert new_chat[2]["content"]["filename"] == "x.png"
    with pytest.raises(Exception):  # a data: url is not a documented input
        preprocessor.load_images_videos(
            image_chat("data:image/png;base64," + base64.b64encode(raw).decode())
        )
    with pytest.raises(TypeError):  # neither is a PIL image
        preprocessor.load_images_videos(image_chat(Image.new("RGB", (8, 8))))

    wide = Image.new("RGB", (64, 32))
    pre = preprocessor([images[0], wide], is_video_list=[False, False])
    assert set(pre.keys()) == PRE_KEYS
    assert len(pre["pixel_values"]) == 1 and len(pre["pixel_values"][0]) == 2
    for grids, length in zip(pre["pixel_values"][0], pre["vision_query_lengths"][0]):
        assert grids.dtype == torch.float32 and grids.ndim == 4 and grids.shape[1:] == (3, 32, 32)
        assert length == grids.shape[0] * 4
    assert pre["image_sizes"][0] == [{"width": 300, "height": 200}, {"width": 64, "height": 32}]
    assert pre["pixel_values"][0][1].shape[0] == 3  # global grid + 1x2 local grids


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_image_chat_generate_stream(model_dir, tokenizer, preprocessor, dtype):
    model = load_model(model_dir, dtype)
    new_chat, images, is_video_list, pre, input_ids = build_image_inputs(
        tokenizer, preprocessor, base64.b64encode(png_bytes()).decode()
    )
    assert int((input_ids == model.config.img_start_id).sum()) == 1  # ONE <|dummy3|>
    prompt_tokens = input_ids.shape[1] - 1 + sum(pre["vision_query_lengths"][0])
    assert prompt_tokens < model.config.language_config["max_position_embeddings"]

    recorder = RecordLengths()
    kwargs = greedy_8(tokenizer, input_ids=input_ids, stopping_criteria=StoppingCriteriaList([recorder]), **pre)
    out, chunks = stream_generate(model, tokenizer, **kwargs)
    # image path: language_model.generate(inputs_embeds=...) -> only the new tokens
    assert out.shape == (1, 8)
    assert recorder.lengths == list(range(1, 9))
    assert "".join(chunks) == tokenizer.decode(out[0])

    again = model.generate(**greedy_8(tokenizer, input_ids=input_ids, **pre))
    assert torch.equal(again, out)  # stream == non-stream under greedy


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_text_chat_generate_stream(model_dir, tokenizer, dtype):
    model = load_model(model_dir, dtype)
    input_ids = tokenizer.apply_chat_template(
        TEXT_CHAT, return_tensors="pt", tokenize=True, add_generation_prompt=True
    )
    prompt_len = input_ids.shape[1]
    recorder = RecordLengths()
    out, chunks = stream_generate(
        model, tokenizer, **greedy_8(tokenizer, input_ids=input_ids, stopping_criteria=StoppingCriteriaList([recorder])))
    # text path: language_model.generate(input_ids=...) -> prompt + new tokens
    assert out.shape == (1, prompt_len + 8)
    assert torch.equal(out[:, :prompt_len], input_ids)
    assert recorder.lengths == [prompt_len + i for i in range(1, 9)]
    assert "".join(chunks) == tokenizer.decode(out[0, prompt_len:])


def test_kv_cache_prefill_only_vision(model_dir, tokenizer, preprocessor):
    model = load_model(model_dir, torch.float32)
    _, _, _, pre, input_ids = build_image_inputs(tokenizer, preprocessor, png_bytes())
    expanded = input_ids.shape[1] - 1 + sum(pre["vision_query_lengths"][0])
    with torch.no_grad():
        first = model(input_ids=input_ids, use_cache=True, **pre)
        assert first.logits.shape[1] == expanded
        tok1 = first.logits[:, -1].argmax(-1, keepdim=True)
        # decode step: cache filled, pixel values passed again must be ignored
        second = model(
            input_ids=tok1, past_key_values=first.past_key_values, use_cache=True, **pre
        )
        tok2 = second.logits[:, -1].argmax(-1, keepdim=True)
        ref = model.generate(
            input_ids=input_ids, max_new_tokens=2, min_new_tokens=2, do_sample=False,
            eos_token_id=stop_ids(tokenizer), pad_token_id=tokenizer.pad_token_id, **pre,
        )
    assert torch.equal(ref, torch.cat([tok1, tok2], dim=1))


def test_vision_fp32_with_bf16_language_model_needs_cast(model_dir, tokenizer, preprocessor):
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, trust_remote_code=True, torch_dtype=torch.bfloat16
    ).eval()
    model.vision_model.float()
    model.mm_projector.float()
    _, _, _, pre, input_ids = build_image_inputs(tokenizer, preprocessor, png_bytes())
    kwargs = dict(input_ids=input_ids, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                  eos_token_id=stop_ids(tokenizer), pad_token_id=tokenizer.pad_token_id, **pre)
    with pytest.raises(TypeError):
        model.generate(**kwargs)
    llm_dtype = model.get_input_embeddings().weight.dtype
    handle = model.mm_projector.register_forward_hook(lambda mod, args, out: out.to(llm_dtype))
    try:
        assert model.generate(**kwargs).shape == (1, 2)
    finally:
        handle.remove()


def test_placeholder_without_pixels_is_rejected(model_dir, tokenizer, preprocessor):
    model = load_model(model_dir, torch.float32)
    _, _, _, _, input_ids = build_image_inputs(tokenizer, preprocessor, png_bytes())
    with pytest.raises(ValueError):
        model.generate(input_ids=input_ids, max_new_tokens=1)
