"""Tiny random models for the hcx-server tests.

``build_tiny_hcx(path, seed=0)`` writes a remote-code model directory that follows the
first-revision interface of naver-hyperclovax/HyperCLOVAX-SEED-Vision-Instruct-3B
(see tests/tiny_hcx/REAL_INTERFACE.md); ``build_tiny_hcx_v2(path, ...)`` one that follows the
later revision (processor_config.json -> processing_hyperclovax.HCXProcessor, tests/tiny_hcx_v2/),
with its unconfirmed details as options. Both load offline with::

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, torch_dtype=...)
    AutoProcessor.from_pretrained(path, trust_remote_code=True)
    AutoTokenizer.from_pretrained(path)

The tokenizer is a byte-level BPE (GPT-2 style) with a small vocabulary, so random
generation produces partial UTF-8 sequences. No timm / einops needed.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

TINY_HCX_SRC = Path(__file__).resolve().parent / "tiny_hcx"
TINY_HCX_CODE_FILES = ("configuration_hyperclovax.py", "modeling_hyperclovax.py", "preprocessor.py")

# Special tokens (the HCX end-of-turn / stop tokens, ChatML markers, image placeholder).
EOS_TOKEN = "<|endoftext|>"
IMAGE_TOKEN = "<|dummy3|>"
VIDEO_TOKEN = "<|_unuse_missing_100270|>"
SPECIAL_TOKENS = [
    EOS_TOKEN,
    "<|im_start|>",
    "<|im_end|>",
    "<|endofturn|>",
    "<|stop|>",
    IMAGE_TOKEN,
    VIDEO_TOKEN,
]
STOP_TOKENS = ("<|endofturn|>", "<|stop|>", "<|im_end|>")

MAX_POSITION_EMBEDDINGS = 1024
NUM_MERGES = 320

# One content dict (or a plain string) per message, like the first-revision template.
# An image message becomes three turns: "<role> (mime)", "<role> (vector)" holding ONE
# <|dummy3|>, and "image/aux" (OCR / lens hints, here with a short Korean preamble).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] -%}"
    "{%- if content is string or (content is mapping and content['type'] == 'text') -%}"
    "{%- set text = content if content is string else content['text'] -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' + text + '<|im_end|><|endofturn|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + text + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- elif content is mapping and content['type'] == 'image' -%}"
    "{{- '<|im_start|>' + message['role'] + ' (mime)\\n' -}}"
    "{{- '{\"type\": \"image/jpeg\", \"filename\": ' + (content.get('filename') or '') | tojson + '}' -}}"
    "{{- '<|im_end|>\\n' -}}"
    "{{- '<|im_start|>' + message['role'] + ' (vector)\\n<|dummy3|><|im_end|>\\n' -}}"
    "{{- '<|im_start|>image/aux\\n이미지 참고 정보입니다. ' -}}"
    "{{- '{\"ocr\": ' + (content.get('ocr') or '') | tojson -}}"
    "{{- ', \"lens_keywords\": ' + (content.get('lens_keywords') or '') | tojson -}}"
    "{{- ', \"lens_local_keywords\": ' + (content.get('lens_local_keywords') or '') | tojson -}}"
    "{{- '}<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- raise_exception('each message needs a string or ONE content dict of type text or image') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_CORPUS = [
    "You are a helpful assistant. Describe the image in detail.",
    "The quick brown fox jumps over the lazy dog. Hello, how are you today?",
    "What is in this picture? There is a cat, a dog and a red car on the street.",
    "Please answer the question with a short sentence and explain the reason.",
    "system user assistant image text model token stream server response",
    "안녕하세요. 저는 하이퍼클로바 엑스 모델입니다. 무엇을 도와드릴까요?",
    "이 이미지를 자세히 설명해 주세요. 사진에는 고양이와 강아지가 있습니다.",
    "한국어 질문에 한국어로 대답합니다. 감사합니다. 좋은 하루 되세요.",
    "이미지 참고 정보입니다. 사진에서 검출된 글자와 키워드를 참고하여 답변하세요.",
]


def _byte_level_words(texts):
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    counts = Counter()
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text):
            counts[piece] += 1
    return counts


def _train_merges(texts, num_merges: int):
    """Deterministic byte-level BPE merges (most frequent pair, ties lexicographic)."""
    words = {tuple(w): c for w, c in _byte_level_words(texts).items()}
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for symbols, count in words.items():
            for a, b in zip(symbols, symbols[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        merged = {}
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return merges


def build_tiny_hcx_tokenizer():
    """Byte-level BPE tokenizer (GPT2TokenizerFast) with the HCX special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import GPT2TokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = _train_merges(_CORPUS * 3, NUM_MERGES)
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = GPT2TokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        add_prefix_space=False,
        model_max_length=MAX_POSITION_EMBEDDINGS,
        chat_template=CHAT_TEMPLATE,
    )
    return fast


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tiny_hcx(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny, offline-loadable HCX-like remote-code model directory to ``path``."""

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in TINY_HCX_CODE_FILES:
        shutil.copyfile(TINY_HCX_SRC / name, path / name)

    tokenizer = build_tiny_hcx_tokenizer()
    tokenizer.save_pretrained(path)
    vocab_size = len(tokenizer)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)

    config = {
        "architectures": ["HCXVisionForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_hyperclovax.HCXVisionConfig",
            "AutoModelForCausalLM": "modeling_hyperclovax.HCXVisionForCausalLM",
        },
        "model_type": "hyperclovax_vlm",
        "img_start_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "decoder_max_length": MAX_POSITION_EMBEDDINGS,
        "anyres": True,
        "unpad": False,
        "max_num_grids": 4,
        "num_queries_vis_abstractor": 4,
        "use_1x1_grid": False,
        "use_nth_layer": -2,
        "proj_pos_emb": True,
        "torch_dtype": "float32",
        "language_config": {
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "bos_token_id": eos_id,
            "eos_token_id": eos_id,
            "pad_token_id": eos_id,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "num_channels": 3,
            "vision_use_head": False,
        },
    }
    _write_json(path / "config.json", config)
    _write_json(
        path / "preprocessor_config.json",
        {
            "auto_map": {
                "AutoProcessor": "preprocessor.HCXProcessor",
                "AutoImageProcessor": "preprocessor.HCXProcessor",
            },
            "image_processor_type": "HCXProcessor",
            "processor_class": "HCXProcessor",
            "grid_size": 32,
            "max_num_grids": 4,
            "num_queries_vis_abstractor": 4,
            "anyres": True,
            "use_1x1_grid": False,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
    )

    save_random_model(path, config, seed)
    return path


# -- the later revision ("New Processor, Model for vLLM") ------------------------------------

TINY_HCX_V2_SRC = Path(__file__).resolve().parent / "tiny_hcx_v2"
TINY_HCX_V2_CODE_FILES = ("configuration_hyperclovax.py", "modeling_hyperclovax.py", "processing_hyperclovax.py")

# OpenAI-style content lists (a string is accepted too); ONE <|dummy3|> per image part.
CHAT_TEMPLATE_V2 = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|dummy3|>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- else -%}{{- raise_exception('unknown content part type ' + part['type']) -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- '<|im_end|><|endofturn|>\\n' -}}"
    "{%- else -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


TINY_V2_TEXT = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
                "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False}
TINY_V2_VISION = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                  "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                  "num_channels": 3, "vision_use_head": False}
TINY_V2_GRID = {"max_num_grids": 4, "num_queries_vis_abstractor_image": 4, "anyres": True, "use_1x1_grid": False}


def write_hcx_v2_folder(path: Path, tokenizer, text: dict = TINY_V2_TEXT, vision: dict = TINY_V2_VISION,
                        grid: dict = TINY_V2_GRID, expand_image_placeholders: bool = False,
                        template_on: str = "processor", query_length_offset: int = 0, dtype: str = "float32") -> dict:
    """Everything of a second-revision model folder but the weights: code, tokenizer, configs.
    Returns config.json's content (its auto_map must survive save_pretrained)."""
    if template_on not in ("processor", "tokenizer"):
        raise ValueError("template_on must be 'processor' or 'tokenizer'")
    path.mkdir(parents=True, exist_ok=True)
    for name in TINY_HCX_V2_CODE_FILES:
        shutil.copyfile(TINY_HCX_V2_SRC / name, path / name)
    if template_on == "tokenizer":
        tokenizer.chat_template = CHAT_TEMPLATE_V2
    tokenizer.save_pretrained(path)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = {
        "architectures": ["HCXVisionForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_hyperclovax.HCXVisionConfig",
                     "AutoModelForCausalLM": "modeling_hyperclovax.HCXVisionForCausalLM"},
        "model_type": "hyperclovax_vlm",
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "video_token_id": tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        "use_nth_layer": -2, "unpad": False, "proj_pos_emb": True, "torch_dtype": dtype, **grid,
        "text_config": {"vocab_size": len(tokenizer), **text, "bos_token_id": eos_id, "eos_token_id": eos_id,
                        "pad_token_id": eos_id},
        "vision_config": vision,
    }
    _write_json(path / "config.json", config)
    _write_json(path / "preprocessor_config.json", {
        "auto_map": {"AutoImageProcessor": "processing_hyperclovax.HCXImageProcessor"},
        "image_processor_type": "HCXImageProcessor", "processor_class": "HCXProcessor",
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "grid_size": vision["image_size"], **grid})
    _write_json(path / "processor_config.json", {
        "auto_map": {"AutoProcessor": "processing_hyperclovax.HCXProcessor"}, "processor_class": "HCXProcessor",
        "expand_image_placeholders": expand_image_placeholders, "query_length_offset": query_length_offset})
    if template_on == "processor":
        (path / "chat_template.jinja").write_text(CHAT_TEMPLATE_V2, encoding="utf-8")
    return config


def save_random_model(path: Path, config: dict, seed: int) -> None:
    """The folder's remote-code model with seeded random weights, saved beside its code (the global
    RNG is left as it was)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=True)
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(path, safe_serialization=True)
    keep_auto_map(path, config)


def keep_auto_map(path: Path, config: dict) -> None:
    """save_pretrained rewrites config.json; point its auto_map at the folder's own code files again."""
    saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
    saved["auto_map"] = config["auto_map"]
    _write_json(path / "config.json", saved)


def build_tiny_hcx_v2(path: str | Path, seed: int = 0, expand_image_placeholders: bool = False,
                      template_on: str = "processor", query_length_offset: int = 0) -> Path:
    """A tiny, offline-loadable model folder of the second HCX revision.

    expand_image_placeholders: the processor expands each <|dummy3|> itself (unconfirmed either way).
    template_on: "processor" (the v2 template in chat_template.jinja; the tokenizer keeps the
    first revision's template, which rejects content lists) or "tokenizer" (only the tokenizer has
    the v2 template). query_length_offset != 0: a broken folder whose processor misreports the
    vision token counts (the model then raises on the placeholder count).
    """

    path = Path(path)
    config = write_hcx_v2_folder(path, build_tiny_hcx_tokenizer(), expand_image_placeholders=expand_image_placeholders,
                                 template_on=template_on, query_length_offset=query_length_offset)
    save_random_model(path, config, seed)
    return path


def build_tiny_text_model(path: str | Path, seed: int = 0) -> Path:
    """A tiny text-only causal LM (Llama) with the HCX tokenizer and chat template, like the
    text-only HyperCLOVA X SEED models: no vision part, no processor config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_hcx_tokenizer()
    tokenizer.save_pretrained(path)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITION_EMBEDDINGS,
                         bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, tie_word_embeddings=False)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(path, safe_serialization=True)
    return path
