"""hcx-server: a local inference server for HyperCLOVA X SEED Vision Instruct 3B.

One module, read top to bottom:
  1. Config            -- read once at start-up into one frozen object.
  2. Model loading     -- locate/download the weights, load the HCX remote-code path or the
                          generic transformers image-text-to-text path, the tiny demo model.
  3. Input building    -- validate API requests into one GenerationRequest, decode images,
                          turn a request into model tensors.
  4. Generation        -- one engine thread owns the model; generate() and stream() share one
                          code path (submit a job, follow its tokens, detokenize safely).
  5. HTTP routes       -- the seed REST contract and /health. Routes never touch torch.
  6. App factory       -- create_app(config) and the gunicorn runner (1 gthread worker).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import logging
import math
import os
import queue
import re
import select
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from flask import Flask, Response, g, jsonify, request
from PIL import Image, ImageOps
from werkzeug.exceptions import HTTPException

log = logging.getLogger("hcx")

__version__ = "0.1.0"

# ======================================================================================
# 1. Config
# ======================================================================================

HCX_HUB_ID = "naver-hyperclovax/HyperCLOVAX-SEED-Vision-Instruct-3B"
# The remote code changed between revisions: trust_remote_code only ever runs this one.
HCX_REVISION = "main"
DEMO_MODEL_NAME = "hcx-demo-tiny-random"
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
VISION_DTYPE_CHOICES = ("auto", "float32")


class ConfigError(ValueError):
    """A bad setting: the message is one line naming the key and the allowed values."""


@dataclass(frozen=True)
class Config:
    model_path: str = HCX_HUB_ID
    model_id: str = HCX_HUB_ID  # hub repo downloaded into an empty local MODEL_PATH
    model_revision: str = HCX_REVISION
    device: str = "auto"
    dtype: str = "auto"
    vision_dtype: str = "auto"
    hf_token: str | None = None
    cache_dir: str | None = None  # HOST_MODEL_DIR: where hub downloads go
    max_new_tokens: int = 512
    max_tokens_cap: int = 4096
    system_prompt: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int = 0  # 0: derived from max_queue
    max_queue: int = 8
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 64_000_000
    max_images: int = 4
    log_prompts: bool = False
    demo: bool = False
    demo_dir: str = ""

    @property
    def worker_threads(self) -> int:
        """gunicorn threads: the generating request + MAX_QUEUE waiting + room for /health."""
        return self.threads or self.max_queue + 4

    @property
    def served_model_name(self) -> str:
        return DEMO_MODEL_NAME if self.demo else self.model_path.rstrip("/\\").split("/")[-1]


def _env_str(env: Mapping[str, str], key: str, default: str) -> str:
    value = env.get(key)
    return default if value is None or value.strip() == "" else value.strip()


def _env_int(env: Mapping[str, str], key: str, default: int, lo: int, hi: int) -> int:
    raw = _env_str(env, key, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not valid: expected an integer from {lo} to {hi}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{key}={value} is out of range: expected an integer from {lo} to {hi}")
    return value


def _env_bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = _env_str(env, key, "1" if default else "0").lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}={raw!r} is not valid: expected one of 1, 0, true, false, yes, no")


def _env_choice(env: Mapping[str, str], key: str, default: str, choices: tuple[str, ...]) -> str:
    value = _env_str(env, key, default).lower()
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid: expected one of {', '.join(choices)}")
    return value


def environment() -> dict[str, str]:
    """The process environment over the nearest .env file (the environment wins)."""
    from dotenv import dotenv_values, find_dotenv

    dotenv_file = find_dotenv(usecwd=True)
    from_file = {k: v for k, v in dotenv_values(dotenv_file).items() if v is not None} if dotenv_file else {}
    return {**from_file, **os.environ}


def load_config(env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
    """Read every setting once into one object; a bad value is one clear ConfigError line."""
    env = environment() if env is None else env
    device = _env_str(env, "DEVICE", "auto").lower()
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise ConfigError(f"DEVICE={device!r} is not valid: expected one of {DEVICE_CHOICES}")
    max_new_tokens = _env_int(env, "MAX_NEW_TOKENS", 512, 1, 1 << 20)
    cfg = Config(
        model_path=_env_str(env, "MODEL_PATH", HCX_HUB_ID),
        model_id=_env_str(env, "MODEL_ID", HCX_HUB_ID),
        model_revision=_env_str(env, "MODEL_REVISION", HCX_REVISION),
        device=device,
        dtype=_env_choice(env, "DTYPE", "auto", DTYPE_CHOICES),
        vision_dtype=_env_choice(env, "VISION_DTYPE", "auto", VISION_DTYPE_CHOICES),
        hf_token=_env_str(env, "HUGGINGFACE_TOKEN", "") or _env_str(env, "HF_TOKEN", "") or None,
        cache_dir=_env_str(env, "HOST_MODEL_DIR", "") or None,
        max_new_tokens=max_new_tokens,
        max_tokens_cap=_env_int(env, "MAX_TOKENS_CAP", max(4096, max_new_tokens), max_new_tokens, 1 << 20),
        system_prompt=env.get("SYSTEM_PROMPT", "") or "",
        host=_env_str(env, "HOST", "127.0.0.1"),
        port=_env_int(env, "PORT", 8000, 1, 65535),
        threads=_env_int(env, "THREADS", 0, 0, 1024),
        max_queue=_env_int(env, "MAX_QUEUE", 8, 0, 1000),
        max_body_bytes=_env_int(env, "MAX_BODY_BYTES", 32 * 1024 * 1024, 1024, 1 << 31),
        max_image_bytes=_env_int(env, "MAX_IMAGE_BYTES", 20 * 1024 * 1024, 1024, 1 << 31),
        max_image_pixels=_env_int(env, "MAX_IMAGE_PIXELS", 64_000_000, 1, 1 << 34),
        max_images=_env_int(env, "MAX_IMAGES", 4, 1, 64),
        log_prompts=_env_bool(env, "LOG_PROMPTS", False),
        demo=_env_bool(env, "DEMO", False),
        demo_dir=_env_str(env, "DEMO_MODEL_DIR", str(Path.home() / ".cache" / "hcx-server" / DEMO_MODEL_NAME)),
    )
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


# ======================================================================================
# 2. Model loading
# ======================================================================================

HCX_STOP_TOKENS = ("<|endofturn|>", "<|stop|>", "<|im_end|>")
IMAGE_PROCESSOR_KWARGS = {"input_data_format": "channels_last"}  # 1- or 3-px images confuse the guess


class ModelLoadError(RuntimeError):
    """Loading failed for a reason the user can fix; the message says how."""


@dataclass
class LoadedModel:
    """Everything generation needs, found once at load time."""

    kind: str  # "hcx" (remote code, model card interface) or "generic" (image-text-to-text)
    model: Any
    processor: Any
    tokenizer: Any
    name: str
    path: str
    device: torch.device
    dtype: torch.dtype
    vision_dtype: torch.dtype
    stop_token_ids: tuple[int, ...]
    pad_token_id: int
    context_length: int
    demo: bool = False
    load_seconds: float = 0.0


def resolve_device(cfg: Config) -> torch.device:
    """auto picks CUDA, then Apple MPS, then CPU; an explicit device must really exist."""
    want = cfg.device
    if want == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"DEVICE={want} but CUDA is not available to torch {torch.__version__} "
                                 "(no GPU, no driver, or a CPU-only torch build); use DEVICE=cpu or auto")
        index = int(want.split(":")[1]) if ":" in want else 0
        if index >= torch.cuda.device_count():
            raise ModelLoadError(f"DEVICE={want} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if want == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError("DEVICE=mps but Apple MPS is not available; use DEVICE=cpu or auto")
    return torch.device(want)


def cpu_has_native_bf16() -> bool:
    """bf16 only pays on CPUs with bf16 instructions (AVX512-BF16 / AMX); others emulate it slowly."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def looks_local(path: str) -> bool:
    """A path (absolute, relative with ./ or ~, Windows drive, or existing) rather than a hub id."""
    return (os.path.exists(os.path.expanduser(path)) or path.startswith((".", "/", "~", "\\"))
            or bool(re.match(r"^[A-Za-z]:[\\/]", path)) or path.count("/") != 1)


def has_model_files(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(
        p.suffix in (".safetensors", ".bin") for p in folder.iterdir())


def download_model(repo_id: str, revision: str, token: str | None, local_dir: str | None = None,
                   cache_dir: str | None = None) -> str:
    """Fetch a snapshot with the hub's progress bars; turn hub failures into one clear line."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = local_dir or cache_dir or "the Hugging Face cache"
    log.info("downloading %s (revision %s) into %s; this is ~7.3 GB on first run", repo_id, revision, where)
    try:
        return snapshot_download(repo_id=repo_id, revision=revision, token=token, local_dir=local_dir,
                                 cache_dir=None if local_dir else cache_dir)
    except GatedRepoError:
        raise ModelLoadError(f"{repo_id} is gated: accept its license on huggingface.co and set "
                             "HUGGINGFACE_TOKEN to a token of that account") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{repo_id} was not found on the hub (or HUGGINGFACE_TOKEN has no access)") from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"revision {revision!r} of {repo_id} does not exist; check MODEL_REVISION") from None
    except HFValidationError:
        raise ModelLoadError(f"{repo_id!r} is neither a local model folder nor a valid hub id") from None
    except LocalEntryNotFoundError:
        raise ModelLoadError(f"{repo_id} is not in {where} and the hub cannot be reached (offline, "
                             "HF_HUB_OFFLINE=1, or no network); download it first or fix MODEL_PATH") from None
    except OSError as exc:
        raise ModelLoadError(f"downloading {repo_id} into {where} failed: {exc}") from None


def locate_model(cfg: Config) -> Path:
    """Return a local folder holding the model, downloading it on first run.

    MODEL_PATH may be a hub id (downloaded into HOST_MODEL_DIR or the HF cache) or a local
    folder; an empty or missing local folder is filled from MODEL_ID, as the seed's Docker
    setup expects (HOST_MODEL_DIR mounted at MODEL_PATH).
    """
    if cfg.demo:
        folder = Path(cfg.demo_dir)
        if not (folder.is_dir() and has_model_files(folder)):
            log.warning("DEMO MODE: building a tiny RANDOM-WEIGHT model in %s; answers are gibberish", folder)
            build_demo_model(folder)
        return folder
    path = cfg.model_path
    if not looks_local(path):
        return Path(download_model(path, cfg.model_revision, cfg.hf_token, cache_dir=cfg.cache_dir))
    folder = Path(os.path.expanduser(path))
    if folder.exists() and not folder.is_dir():
        raise ModelLoadError(f"MODEL_PATH={path} is a file, not a model folder")
    if folder.is_dir() and has_model_files(folder):
        return folder
    log.info("MODEL_PATH=%s holds no model yet: downloading %s into it", path, cfg.model_id)
    folder.mkdir(parents=True, exist_ok=True)
    download_model(cfg.model_id, cfg.model_revision, cfg.hf_token, local_dir=str(folder))
    if not has_model_files(folder):
        raise ModelLoadError(f"MODEL_PATH={path} still holds no config.json and weights after the download")
    return folder


def model_kind(folder: Path) -> str:
    """HCX remote code or a model transformers knows natively, from config.json alone."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}/config.json cannot be read: {exc}") from None
    architectures = config.get("architectures") or []
    if config.get("model_type") == "hyperclovax_vlm" or "HCXVisionForCausalLM" in architectures:
        return "hcx"
    return "generic"


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers 4.56 renamed torch_dtype to dtype; both load straight into the target dtype."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def load_hcx(folder: Path, dtype: torch.dtype):
    """The model card's interface: AutoModelForCausalLM + AutoProcessor with remote code."""
    from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, low_cpu_mem_usage=True,
                                                 **dtype_kwarg(dtype))
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, processor, tokenizer


def load_generic(folder: Path, dtype: torch.dtype):
    """Any transformers image-text-to-text model (LLaVA and friends), chat template included."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, low_cpu_mem_usage=True, **dtype_kwarg(dtype))
    processor = AutoProcessor.from_pretrained(folder, use_fast=False)  # fast ones need torchvision
    return model, processor, processor.tokenizer


def vision_modules(model) -> list[torch.nn.Module]:
    """The vision encoder and the projector, by the names both model families use."""
    wanted = ("vision_model", "vision_tower", "mm_projector", "multi_modal_projector")
    found = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in wanted and not any(name.startswith(f"{p}.") for p, _ in found):
            found.append((name, module))
    return [m for _, m in found]


def keep_vision_in_float32(model, llm_dtype: torch.dtype) -> None:
    """Run the vision tower + projector in fp32 (fp16 AnyRes instability) and hand bf16/fp16 on."""
    modules = vision_modules(model)
    if not modules:
        raise ModelLoadError("VISION_DTYPE=float32 but no vision encoder/projector was found in the model")
    for module in modules:
        module.float()
        module.register_forward_pre_hook(
            lambda _m, args, kwargs: (tuple(_to_float32(a) for a in args),
                                      {k: _to_float32(v) for k, v in kwargs.items()}),
            with_kwargs=True)
    projector = modules[-1]
    projector.register_forward_hook(lambda _m, _args, out: _cast_floats(out, llm_dtype))


def _to_float32(value):
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _cast_floats(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


def stop_token_ids(tokenizer, model) -> tuple[int, ...]:
    """End-of-turn ids looked up in the tokenizer (never hard-coded), plus the model's eos."""
    ids: list[int] = []
    unk = tokenizer.unk_token_id
    for token in HCX_STOP_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != unk and token_id < len(tokenizer):
            ids.append(token_id)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token_id in ([eos] if isinstance(eos, int) else list(eos or [])) + [tokenizer.eos_token_id]:
        if isinstance(token_id, int):
            ids.append(token_id)
    return tuple(dict.fromkeys(ids))


def context_length(model, tokenizer) -> int:
    """The decoder's context window, from its config (text_config for multimodal models)."""
    config = model.config
    for cfg in (getattr(config, "text_config", None), getattr(config, "language_config", None), config):
        value = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", 0)
    return limit if 0 < limit < 10**7 else 16384


def load_model(cfg: Config) -> LoadedModel:
    """Locate (or download), load with the target dtype directly, move to the device."""
    started = time.perf_counter()
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg.dtype, device)
    folder = locate_model(cfg)
    kind = model_kind(folder)
    log.info("loading %s model from %s on %s as %s", kind, folder, device, str(dtype).replace("torch.", ""))
    try:
        model, processor, tokenizer = (load_hcx if kind == "hcx" else load_generic)(folder, dtype)
    except ImportError as exc:
        raise ModelLoadError(f"the model's code needs a package that is not installed: {exc} "
                             "(pip install 'hcx-server[hcx]' installs timm and einops)") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the model in {folder}: {exc}") from None
    model.to(device).eval()
    vision_dtype = dtype
    if cfg.vision_dtype == "float32" and dtype != torch.float32:
        keep_vision_in_float32(model, dtype)
        vision_dtype = torch.float32
    stops = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    loaded = LoadedModel(kind=kind, model=model, processor=processor, tokenizer=tokenizer,
                         name=cfg.served_model_name, path=str(folder), device=device, dtype=dtype,
                         vision_dtype=vision_dtype, stop_token_ids=stops, pad_token_id=pad,
                         context_length=context_length(model, tokenizer), demo=cfg.demo,
                         load_seconds=time.perf_counter() - started)
    log.info("model ready in %.1f s (context %d tokens, stop ids %s)", loaded.load_seconds,
             loaded.context_length, list(stops))
    return loaded


# -- demo model: the real loading and generation code on a tiny random-weight model ------

DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEMO_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|endofturn|>", "<|stop|>", "<image>"]
DEMO_CORPUS = [
    "Describe the image in one sentence. What is in this picture? The image shows a red square.",
    "이 이미지를 설명해 주세요. 사진에 무엇이 있나요? 빨간색 사각형이 있습니다. 안녕하세요, 반갑습니다.",
    "A small cat sits on a blue chair near the window. Hello world, 한국어 문장과 English words.",
]


def build_demo_tokenizer():
    """A byte-level BPE like the real model's: Korean spans several tokens, as in production."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=DEMO_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DEMO_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, chat_template=DEMO_CHAT_TEMPLATE,
                                   clean_up_tokenization_spaces=False)


def build_demo_model(folder: str | os.PathLike, seed: int = 0, image_size: int = 56,
                     max_position_embeddings: int = 1024) -> Path:
    """Build and save a tiny LLaVA (SigLIP + Llama, random weights) loadable offline."""
    from transformers import (GenerationConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, SiglipImageProcessor, SiglipVisionConfig)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_demo_tokenizer()
    patch = 14
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size},
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="full", num_additional_image_tokens=0,
                               chat_template=DEMO_CHAT_TEMPLATE, image_token="<image>")
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=image_size, patch_size=patch),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                max_position_embeddings=max_position_embeddings,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_seq_length=(image_size // patch) ** 2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endofturn|>")],
        pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# ======================================================================================
# 3. Input building
# ======================================================================================

DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                      re.IGNORECASE)


class InputError(Exception):
    """A request the client must fix: becomes a 4xx JSON error in every API's own shape."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str = "invalid_request", detail: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.detail = detail or message


@dataclass
class Message:
    role: str  # system | user | assistant
    text: str
    images: list[Image.Image] = field(default_factory=list)


@dataclass
class GenerationRequest:
    """What every API turns its body into: one shape, validated once."""

    messages: list[Message]
    max_new_tokens: int
    max_tokens_explicit: bool = False
    min_new_tokens: int = 0
    temperature: float = 0.5
    top_p: float = 0.6
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def image_count(self) -> int:
        return sum(len(m.images) for m in self.messages)


def decode_image(data: str, cfg: Config, param: str = "image_base64") -> Image.Image:
    """base64 (with or without a data: URL prefix, line breaks allowed) -> RGB PIL image."""
    text = data.strip()
    match = DATA_URL.match(text)
    if match:
        if not match.group("b64"):
            raise InputError("data: URL images must be base64-encoded (';base64,')", param=param,
                             code="invalid_image")
        mime = (match.group("mime") or "").lower()
        if mime and not mime.startswith("image/"):
            raise InputError(f"data: URL has media type {mime!r}, not an image", param=param, code="invalid_image")
        text = text[match.end():]
    text = re.sub(r"\s+", "", text)
    if len(text) * 3 // 4 > cfg.max_image_bytes:
        raise InputError(f"image is larger than MAX_IMAGE_BYTES={cfg.max_image_bytes} bytes", status=413,
                         param=param, code="image_too_large")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{param} is not valid base64", param=param, code="invalid_base64",
                         detail="expected standard base64 (A-Z a-z 0-9 + / with = padding), "
                                "optionally prefixed by data:image/...;base64,") from None
    if not raw:
        raise InputError(f"{param} decodes to zero bytes", param=param, code="invalid_image")
    return open_image(raw, cfg, param)


def open_image(raw: bytes, cfg: Config, param: str = "image") -> Image.Image:
    """Open with Pillow, refuse bombs before decoding pixels, apply EXIF rotation, flatten to RGB."""
    if len(raw) > cfg.max_image_bytes:
        raise InputError(f"image is larger than MAX_IMAGE_BYTES={cfg.max_image_bytes} bytes", status=413,
                         param=param, code="image_too_large")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
            if width * height > cfg.max_image_pixels:
                raise InputError(f"image is {width}x{height} = {width * height} pixels, over "
                                 f"MAX_IMAGE_PIXELS={cfg.max_image_pixels}", param=param, code="image_too_large")
            img.load()
            img = ImageOps.exif_transpose(img)
            return flatten_to_rgb(img)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError("image is a decompression bomb", param=param, code="image_too_large") from None
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise InputError(f"{param} is not a readable image", param=param, code="invalid_image",
                         detail=f"Pillow could not decode it: {type(exc).__name__}: {exc}") from None


def flatten_to_rgb(img: Image.Image) -> Image.Image:
    """Transparent pixels become white (not black), palette/CMYK/grey become RGB."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


# -- request fields shared by every API -------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def field_int(body: Mapping, key: str, lo: int, hi: int, *aliases: str) -> int | None:
    for name in (key, *aliases):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(f"{name} must be an integer", param=name, code="invalid_type")
        if not lo <= value <= hi:
            raise InputError(f"{name} must be between {lo} and {hi}, got {value}", param=name,
                             code="invalid_value")
        return value
    return None


def field_float(body: Mapping, key: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_number(value):
        raise InputError(f"{key} must be a number", param=key, code="invalid_type")
    value = float(value)
    if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise InputError(f"{key} must be in {bound}, got {value}", param=key, code="invalid_value")
    return value


def field_str(body: Mapping, key: str, required: bool = False) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise InputError(f"'{key}' is required", param=key, code="missing_field")
        return None
    if not isinstance(value, str):
        raise InputError(f"'{key}' must be a string, got {type(value).__name__}", param=key, code="invalid_type")
    return value


def sampling_fields(body: Mapping, cfg: Config) -> dict[str, Any]:
    """max_tokens, min_tokens, temperature, top_p, seed: the same bounds in every API."""
    max_tokens = field_int(body, "max_tokens", 1, cfg.max_tokens_cap, "max_completion_tokens", "max_new_tokens")
    min_tokens = field_int(body, "min_tokens", 0, cfg.max_tokens_cap) or 0
    temperature = field_float(body, "temperature", 0.0, 2.0)
    top_p = field_float(body, "top_p", 0.0, 1.0, lo_open=True)
    seed = field_int(body, "seed", -(2**63), 2**63 - 1)
    if max_tokens is not None and min_tokens > max_tokens:
        raise InputError(f"min_tokens ({min_tokens}) exceeds max_tokens ({max_tokens})", param="min_tokens",
                         code="invalid_value")
    return {
        "max_new_tokens": max_tokens if max_tokens is not None else max(cfg.max_new_tokens, min_tokens),
        "max_tokens_explicit": max_tokens is not None,
        "min_new_tokens": min_tokens,
        "temperature": 0.5 if temperature is None else temperature,
        "top_p": 0.6 if top_p is None else top_p,
        "seed": seed,
    }


def with_system_prompt(messages: list[Message], cfg: Config) -> list[Message]:
    if cfg.system_prompt and not any(m.role == "system" for m in messages):
        return [Message("system", cfg.system_prompt), *messages]
    return messages


def prompt_request(body: Mapping, cfg: Config) -> GenerationRequest:
    """The seed contract {"prompt", "image_base64"} (+ optional sampling fields)."""
    prompt = field_str(body, "prompt", required=True)
    if not prompt.strip():
        raise InputError("'prompt' must not be empty", param="prompt", code="empty_prompt")
    image_b64 = field_str(body, "image_base64")
    images = [decode_image(image_b64, cfg)] if image_b64 and image_b64.strip() else []
    messages = with_system_prompt([Message("user", prompt, images)], cfg)
    return GenerationRequest(messages=messages, **sampling_fields(body, cfg))


# -- from a request to model tensors ----------------------------------------------------


@dataclass
class ModelInputs:
    tensors: dict[str, Any]
    prompt_tokens: int


def to_model(tensors: Mapping[str, Any], m: LoadedModel) -> dict[str, Any]:
    """Move to the device; cast ONLY floating tensors (pixel values), never ids or sizes (the fp16 fix)."""
    out = {}
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor):
            value = value.to(m.device, dtype=m.vision_dtype if value.is_floating_point() else None)
        elif isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
            value = [v.to(m.device, dtype=m.vision_dtype if v.is_floating_point() else None) for v in value]
        out[key] = value
    return out


def build_generic_inputs(m: LoadedModel, req: GenerationRequest) -> ModelInputs:
    chat, images = [], []
    for msg in req.messages:
        parts = [{"type": "image"} for _ in msg.images] + [{"type": "text", "text": msg.text}]
        chat.append({"role": msg.role, "content": parts})
        images.extend(msg.images)
    text = m.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    kwargs = {"images": images, **IMAGE_PROCESSOR_KWARGS} if images else {}
    batch = m.processor(text=text, return_tensors="pt", **kwargs)
    batch.pop("token_type_ids", None)
    tensors = to_model(dict(batch), m)
    return ModelInputs(tensors, int(tensors["input_ids"].shape[1]))


def build_hcx_inputs(m: LoadedModel, req: GenerationRequest) -> ModelInputs:
    """The model card's flow: one content dict per message, load_images_videos, processor, template."""
    if not req.image_count:
        chat = [{"role": msg.role, "content": msg.text} for msg in req.messages]
        ids = m.tokenizer.apply_chat_template(chat, return_tensors="pt", tokenize=True, add_generation_prompt=True)
        return ModelInputs(to_model({"input_ids": ids}, m), int(ids.shape[1]))
    chat = []
    for msg in req.messages:
        for n, img in enumerate(msg.images):
            chat.append({"role": msg.role, "content": {"type": "image", "filename": f"image_{n}.png", "image": img}})
        chat.append({"role": msg.role, "content": {"type": "text", "text": msg.text}})
    new_chat, images, is_video_list = m.processor.load_images_videos(chat)
    pre = m.processor(images, is_video_list=is_video_list)
    ids = m.tokenizer.apply_chat_template(new_chat, return_tensors="pt", tokenize=True, add_generation_prompt=True)
    tensors = to_model({"input_ids": ids, **pre}, m)
    return ModelInputs(tensors, int(ids.shape[1]))


def build_inputs(m: LoadedModel, req: GenerationRequest) -> ModelInputs:
    """Tensors for one request; image/processor failures are the client's (400), with the reason."""
    try:
        return (build_hcx_inputs if m.kind == "hcx" else build_generic_inputs)(m, req)
    except InputError:
        raise
    except (ValueError, TypeError) as exc:
        raise InputError("the model's processor rejected the input", code="invalid_input",
                         detail=f"{type(exc).__name__}: {exc}") from None


def fit_to_context(m: LoadedModel, req: GenerationRequest, prompt_tokens: int) -> int:
    """max_new_tokens that fits the window: an explicit ask that overflows is a 400, a default shrinks."""
    room = m.context_length - prompt_tokens
    if room < 1 or (req.max_tokens_explicit and req.max_new_tokens > room) or req.min_new_tokens > room:
        asked = req.max_new_tokens if req.max_tokens_explicit else max(req.min_new_tokens, 1)
        raise InputError(f"this model's context is {m.context_length} tokens; the prompt takes {prompt_tokens} "
                         f"and {asked} more were asked for", code="context_length_exceeded", param="messages")
    return min(req.max_new_tokens, room)


# ======================================================================================
# 4. Generation
# ======================================================================================


class Busy(Exception):
    """The queue is full: the client should retry later (503 + Retry-After)."""


class ModelNotReady(Exception):
    """Still loading, or loading failed (the message says why)."""


class GenerationError(RuntimeError):
    """Generation failed inside the engine: a server fault with a message fit for the client."""


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    total_s: float


@dataclass
class Job:
    """One request's trip through the engine: tensors in, token ids out through a queue."""

    request: GenerationRequest
    inputs: ModelInputs
    max_new_tokens: int
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()


def sampling_kwargs(req: GenerationRequest, max_new_tokens: int) -> dict[str, Any]:
    """The model card's defaults (temperature 0.5, top_p 0.6); temperature 0 means greedy."""
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "min_new_tokens": min(req.min_new_tokens, max_new_tokens),
                              "repetition_penalty": 1.0}
    if req.temperature > 0:
        kwargs.update(do_sample=True, temperature=req.temperature, top_p=req.top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def run_generation(m: LoadedModel, job: Job) -> None:
    """model.generate with a streamer that forwards ids and a criterion that honours cancel."""
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    class ForwardIds(BaseStreamer):
        prompt_skipped = False

        def put(self, value):
            if not self.prompt_skipped:  # generate() first hands over the prompt
                self.prompt_skipped = True
                return
            for token_id in value.reshape(-1).tolist():
                job.events.put(("token", token_id))

        def end(self):
            pass

    class StopWhenCancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), job.cancelled.is_set(), dtype=torch.bool,
                              device=input_ids.device)

    torch.manual_seed(job.request.seed if job.request.seed is not None else torch.seed())
    with torch.inference_mode():
        m.model.generate(**job.inputs.tensors, **sampling_kwargs(job.request, job.max_new_tokens),
                         eos_token_id=list(m.stop_token_ids), pad_token_id=m.pad_token_id,
                         streamer=ForwardIds(), stopping_criteria=StoppingCriteriaList([StopWhenCancelled()]))


def describe_failure(exc: BaseException) -> str:
    """A failure inside generation as one line a user can act on; frees CUDA memory on OOM."""
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return ("out of memory while generating: lower max_tokens or the image size, use DTYPE=bfloat16, "
                "or run on a larger GPU")
    return f"generation failed: {type(exc).__name__}: {exc}"


class Engine:
    """Owns the model and ONE generation thread; requests wait in a bounded queue for it.

    A single thread is the lock that serializes use of the model. A job whose client left
    while it waited is dropped without running.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.model: LoadedModel | None = None
        self.state = "loading"
        self.error: str | None = None
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=cfg.max_queue)
        self.running: Job | None = None
        self.stats = {"jobs_done": 0, "jobs_failed": 0, "jobs_skipped": 0, "tokens_generated": 0}
        self._thread: threading.Thread | None = None

    # -- lifecycle --
    def start(self, wait: bool = False) -> "Engine":
        """Load the model (in this worker process) on the engine thread, then serve jobs."""
        self._thread = threading.Thread(target=self._main, name="hcx-engine", daemon=True)
        self._thread.start()
        if wait:
            while self.state == "loading":
                time.sleep(0.02)
            if self.state == "error":
                raise ModelLoadError(self.error)
        return self

    def _main(self) -> None:
        try:
            self.model = load_model(self.cfg)
        except ModelLoadError as exc:
            self.state, self.error = "error", str(exc)
            log.error("model not loaded: %s", exc)
            return
        except Exception as exc:  # noqa: BLE001 - any load fault must surface in /health
            self.state, self.error = "error", f"{type(exc).__name__}: {exc}"
            log.exception("model not loaded")
            return
        self.state = "ready"
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set():
                self.stats["jobs_skipped"] += 1
                job.events.put(("done", None))
                continue
            self.running = job
            try:
                run_generation(self.model, job)
            except Exception as exc:  # noqa: BLE001 - the engine thread must never die
                self.stats["jobs_failed"] += 1
                log.error("generation failed: %s", exc, exc_info=not isinstance(exc, torch.OutOfMemoryError))
                job.events.put(("error", describe_failure(exc)))
            else:
                self.stats["jobs_done"] += 1
                job.events.put(("done", None))
            finally:
                self.running = None

    def require_model(self) -> LoadedModel:
        if self.state == "ready":
            return self.model
        if self.state == "error":
            raise ModelNotReady(f"the model failed to load: {self.error}")
        raise ModelNotReady("the model is still loading; retry when /health says ok")

    # -- requests --
    def submit(self, req: GenerationRequest) -> Job:
        """Build tensors and check limits in the caller's thread, then queue (or refuse) the job."""
        m = self.require_model()
        if req.image_count > self.cfg.max_images:
            raise InputError(f"{req.image_count} images sent; at most MAX_IMAGES={self.cfg.max_images} "
                             "per request", code="too_many_images", param="messages")
        inputs = build_inputs(m, req)
        job = Job(req, inputs, fit_to_context(m, req, inputs.prompt_tokens))
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Busy(f"server busy: {self.cfg.max_queue} requests already waiting; retry shortly") from None
        return job

    @property
    def queue_depth(self) -> int:
        return self.jobs.qsize()


class Detokenizer:
    """Incremental decoding that never emits half a UTF-8 character (Korean spans tokens).

    Decodes a short window of ids and emits only text that is complete; ids whose bytes do
    not yet form a character wait for the next id.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids already turned into emitted text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """At the end, whatever is left (a truly broken byte sequence shows as U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


class StopStrings:
    """Holds back text that may be the start of a stop string; cuts at the first full match."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.hit = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.held += text
        cut = min((i for i in (self.held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit, out, self.held = True, self.held[:cut], ""
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class TextStream:
    """Iterate text pieces of one job as tokens arrive; `.completion` is set when it ends.

    While waiting it asks `client_gone()` every POLL_S so that a client who left stops
    generation within about one decode step.
    """

    POLL_S = 0.05

    def __init__(self, m: LoadedModel, job: Job, client_gone: Callable[[], bool] | None = None):
        self.m, self.job = m, job
        self.client_gone = client_gone or (lambda: False)
        self.completion: Completion | None = None

    def cancel(self) -> None:
        self.job.cancel()

    def _events(self) -> Iterator[tuple[str, Any]]:
        while True:
            try:
                yield self.job.events.get(timeout=self.POLL_S)
            except queue.Empty:
                if not self.job.cancelled.is_set() and self.client_gone():
                    log.info("client disconnected: cancelling generation")
                    self.job.cancel()

    def __iter__(self) -> Iterator[str]:
        job, m = self.job, self.m
        detok, stops = Detokenizer(m.tokenizer), StopStrings(job.request.stop)
        count, first_at, finish, stopped_on_token = 0, None, "length", False
        try:
            for kind, value in self._events():
                if kind == "error":
                    raise GenerationError(value)
                if kind == "done":
                    break
                if first_at is None:
                    first_at = time.perf_counter()
                count += 1
                if value in m.stop_token_ids:
                    stopped_on_token = True
                    continue
                if stops.hit:
                    continue
                piece = stops.feed(detok.add(value))
                if stops.hit:
                    job.cancel()  # a stop string ended the answer: stop spending decode steps
                if piece:
                    yield piece
            tail = "" if stops.hit else stops.feed(detok.flush()) + ("" if stops.hit else stops.flush())
            if tail:
                yield tail
            if stopped_on_token or stops.hit:
                finish = "stop"
            elif job.cancelled.is_set():
                finish = "cancelled"
            elif count < job.max_new_tokens:
                finish = "stop"
            now = time.perf_counter()
            self.completion = Completion("", finish, job.inputs.prompt_tokens, count,
                                         (first_at or now) - job.submitted, now - job.submitted)
        finally:
            job.cancel()  # no-op when finished; stops the engine if the consumer went away early


def stream(engine: Engine, req: GenerationRequest, client_gone: Callable[[], bool] | None = None) -> TextStream:
    """Queue the request now (so errors surface before any byte is sent); iterate for text."""
    job = engine.submit(req)
    return TextStream(engine.model, job, client_gone)


def generate(engine: Engine, req: GenerationRequest, client_gone: Callable[[], bool] | None = None) -> Completion:
    """The whole answer at once: the same path as stream(), joined."""
    text_stream = stream(engine, req, client_gone)
    text = "".join(text_stream)
    return dataclasses.replace(text_stream.completion, text=text)


# ======================================================================================
# 5. HTTP routes
# ======================================================================================


def read_json_body() -> dict:
    """Strict JSON object body: malformed JSON, NaN/Infinity and non-objects are 400s."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        raise InputError("request body is empty; send a JSON object", code="invalid_json")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError("request body is not valid JSON", code="invalid_json", detail=str(exc)) from None
    if not isinstance(body, dict):
        raise InputError(f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON number")


def wants_stream(body: Mapping) -> bool:
    """`?stream=true` or a JSON `"stream": true` (a non-boolean JSON value is a 400)."""
    value = body.get("stream")
    if value is not None and not isinstance(value, bool):
        raise InputError("'stream' must be a boolean", param="stream", code="invalid_type")
    query = request.args.get("stream", "").lower()
    if query and query not in ("1", "true", "yes", "0", "false", "no"):
        raise InputError("query parameter 'stream' must be true or false", param="stream", code="invalid_value")
    return bool(value) or query in ("1", "true", "yes")


def client_gone_check() -> Callable[[], bool]:
    """A cheap poll of the client's socket: readable with no data means it hung up."""
    sock = request.environ.get("gunicorn.socket")

    def gone() -> bool:
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            import socket as socket_module

            return sock.recv(1, socket_module.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    return gone


def error_json(status: int, message: str, detail: str | None = None) -> Response:
    response = jsonify(error=message, detail=detail or message)
    response.status_code = status
    return response


def text_stream_response(pieces: TextStream) -> Response:
    """text/plain chunks as tokens arrive; a failure ends the stream with `[error] <message>`."""

    access = g.get("access")  # the generator runs after the request context is gone

    def body() -> Iterator[str]:
        try:
            for piece in pieces:
                yield piece
        except GenerationError as exc:
            yield f"\n[error] {exc}\n"
        finally:
            record_completion(access, pieces.completion)

    response = Response(body(), mimetype="text/plain", content_type="text/plain; charset=utf-8")
    response.headers["X-Accel-Buffering"] = "no"
    response.headers["Cache-Control"] = "no-cache"
    response.call_on_close(pieces.cancel)
    return response


def record_completion(access: dict | None, completion: Completion | None) -> None:
    """Token counts and TTFT for the access line."""
    if completion is not None and access is not None:
        access.update(tokens_in=completion.prompt_tokens, tokens_out=completion.completion_tokens,
                        ttft_ms=round(completion.ttft_s * 1000, 1), finish=completion.finish_reason)


def register_routes(app: Flask, engine: Engine) -> None:
    cfg = engine.cfg

    @app.post("/tool/generate_hyperclovax_vision")
    def seed_generate():
        body = read_json_body()
        streaming = wants_stream(body)
        req = prompt_request(body, cfg)
        if streaming:
            return text_stream_response(stream(engine, req, client_gone_check()))
        completion = generate(engine, req, client_gone_check())
        record_completion(g.get("access"), completion)
        return jsonify(result=completion.text)

    @app.post("/tool/generate_hyperclovax_vision_stream")
    def seed_generate_stream():
        req = prompt_request(read_json_body(), cfg)
        return text_stream_response(stream(engine, req, client_gone_check()))

    @app.get("/health")
    def health():
        if engine.state == "loading":
            return jsonify(status="loading"), 503
        if engine.state == "error":
            return jsonify(status="error", error=engine.error), 503
        m = engine.model
        return jsonify(status="ok", model=m.name, device=str(m.device), dtype=str(m.dtype).replace("torch.", ""),
                       kind=m.kind, demo=m.demo, context_length=m.context_length,
                       queue_depth=engine.queue_depth, max_queue=cfg.max_queue,
                       **({"note": "DEMO MODE: tiny random-weight model, answers are gibberish"} if m.demo else {}))


def register_errors(app: Flask) -> None:
    """Every failure is JSON with the right status; no traceback ever reaches a client."""

    @app.errorhandler(InputError)
    def input_error(exc: InputError):
        return error_json(exc.status, exc.message, exc.detail)

    @app.errorhandler(Busy)
    def busy(exc: Busy):
        response = error_json(503, str(exc))
        response.headers["Retry-After"] = "1"
        return response

    @app.errorhandler(ModelNotReady)
    def not_ready(exc: ModelNotReady):
        response = error_json(503, str(exc))
        response.headers["Retry-After"] = "5"
        return response

    @app.errorhandler(GenerationError)
    def generation_error(exc: GenerationError):
        return error_json(500, str(exc))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return error_json(exc.code or 500, exc.name, exc.description)

    @app.errorhandler(Exception)
    def server_fault(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_json(500, "internal server error", f"{type(exc).__name__}: {exc}")


def register_access_log(app: Flask) -> None:
    """One line per request when its response closes (streams included); never prompts or images."""

    @app.before_request
    def start_timer():
        g.access = {"id": request.headers.get("X-Request-Id") or uuid.uuid4().hex[:12],
                    "started": time.perf_counter()}

    @app.after_request
    def log_on_close(response: Response):
        access = g.get("access")
        if access is None:
            return response
        response.headers["X-Request-Id"] = access["id"]
        method, path, status = request.method, request.path, response.status_code

        def write():
            extra = " ".join(f"{k}={v}" for k, v in access.items() if k not in ("id", "started"))
            log.info("access id=%s %s %s status=%d time_ms=%.1f %s", access["id"], method, path, status,
                     (time.perf_counter() - access["started"]) * 1000, extra)

        response.call_on_close(write)
        return response


# ======================================================================================
# 6. App factory
# ======================================================================================


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)


def create_app(cfg: Config | None = None, engine: Engine | None = None) -> Flask:
    """The WSGI app; starts loading the model in this process (call it in the worker)."""
    setup_logging()
    cfg = cfg or load_config()
    engine = engine or Engine(cfg).start()
    app = Flask("hcx-server")
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_bytes
    app.json.ensure_ascii = False
    app.extensions["hcx_engine"] = engine
    register_access_log(app)
    register_errors(app)
    register_routes(app, engine)
    return app


def serve(cfg: Config) -> None:
    """gunicorn, ONE gthread worker (the model lives once), app built after the fork."""
    from gunicorn.app.base import BaseApplication

    class Server(BaseApplication):
        def load_config(self):
            options = {"bind": f"{cfg.host}:{cfg.port}", "workers": 1, "worker_class": "gthread",
                       "threads": cfg.worker_threads, "timeout": 120, "graceful_timeout": 30,
                       "keepalive": 5, "control_socket_disable": True, "accesslog": None}
            for key, value in options.items():
                if key in self.cfg.settings:
                    self.cfg.set(key, value)

        def load(self):
            return create_app(cfg)

    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the API is reachable from other machines", cfg.host)
    Server().run()


if __name__ == "__main__":
    setup_logging()
    try:
        serve(load_config())
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
