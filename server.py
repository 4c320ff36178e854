"""hcx-server: a local inference server for HyperCLOVA X SEED Vision Instruct 3B.

One module, read top to bottom:
  1. Config            -- read once at start-up into one frozen object.
  2. Model loading     -- locate/download the weights, load the HCX remote-code path or the
                          generic transformers image-text-to-text path, the tiny demo model.
  3. Input building    -- validate API requests into one GenerationRequest, decode images,
                          turn a request into model tensors.
  4. Generation        -- one engine thread owns the model; generate() and stream() share one
                          code path (submit a job, follow its tokens, detokenize safely).
  5. HTTP routes       -- the seed REST contract, the OpenAI-compatible API, MCP (JSON-RPC,
                          also served over stdio by the CLI), /health. Routes never touch torch.
  6. App factory       -- create_app(config) and the gunicorn runner (1 gthread worker).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import functools
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
# The remote code changed between revisions (a later one swapped in a text=/images= processor):
# trust_remote_code only runs this one, the first upload, whose model-card interface we follow.
# A short commit id is expanded against the repo's history before download (see resolve_revision).
HCX_REVISION = "42c6bee"
DEMO_MODEL_NAME = "hcx-demo-tiny-random"
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
VISION_DTYPE_CHOICES = ("auto", "float32")
# auto: "static" on CUDA, "gemv" (our CPU kernels, kernels/*.cpp) on CPUs with AVX2, else "eager"; see section 4.
GENERATION_BACKEND_CHOICES = ("auto", "static", "gemv", "eager")
# Which of our CPU kernels runs one-row products: auto = the best this CPU runs (AVX-512, else AVX2),
# or forced (a variant the CPU lacks falls back to auto with a warning); torch = torch's own.
CPU_KERNEL_CHOICES = ("auto", "avx512", "avx2", "torch")
# auto: the decoder's linear layers keep DTYPE; int8: weight-only int8 (CPU), quantized at load.
WEIGHTS_CHOICES = ("auto", "int8")


# Browser pages served from these origins may call the API; ":*" means any port.
DEFAULT_ALLOWED_ORIGINS = ("http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*",
                           "https://localhost:*", "https://127.0.0.1:*", "https://[::1]:*")


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
    max_model_len: int = 0  # 0: the model's own context window
    torch_threads: int = 0  # 0: torch's default (all cores)
    generation_backend: str = "auto"
    cpu_kernel: str = "auto"
    weights: str = "auto"
    log_prompts: bool = False
    allow_remote_images: bool = False
    remote_image_timeout: float = 10.0
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = DEFAULT_ALLOWED_ORIGINS
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


def _env_origins(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = _env_str(env, "ALLOWED_ORIGINS", ",".join(DEFAULT_ALLOWED_ORIGINS))
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s]+", origin):
            raise ConfigError(f"ALLOWED_ORIGINS entry {origin!r} is not valid: expected '*' or "
                              "scheme://host[:port|:*], comma-separated")
    return origins


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
        max_model_len=_env_int(env, "MAX_MODEL_LEN", 0, 0, 1 << 24),
        torch_threads=_env_int(env, "TORCH_THREADS", 0, 0, 1024),
        generation_backend=_env_choice(env, "GENERATION_BACKEND", "auto", GENERATION_BACKEND_CHOICES),
        cpu_kernel=_env_choice(env, "CPU_KERNEL", "auto", CPU_KERNEL_CHOICES),
        weights=_env_choice(env, "WEIGHTS", "auto", WEIGHTS_CHOICES),
        log_prompts=_env_bool(env, "LOG_PROMPTS", False),
        allow_remote_images=_env_bool(env, "ALLOW_REMOTE_IMAGES", False),
        remote_image_timeout=float(_env_int(env, "REMOTE_IMAGE_TIMEOUT", 10, 1, 300)),
        api_key=_env_str(env, "API_KEY", "") or None,
        allowed_origins=_env_origins(env),
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
    generation_backend: str = "eager"  # what runs: "eager", "gemv" or "static" (section 4)
    weights: str = ""  # the decoder's linear layers as served: "int8", "bf16", "fp32" or "fp16"
    kernel: str = "torch"  # what runs one-row CPU products: a KERNEL_VARIANTS key or "torch" (section 4)


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


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(re.findall(r"[a-z0-9_]+", " ".join(re.findall(r"^flags\s*:(.*)$", text, re.MULTILINE))))


def cpu_has_native_bf16() -> bool:
    """bf16 instructions (AVX512-BF16 / AMX): torch's own bf16 kernels are fast there."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_bf16_pays(cpu_linears: bool = True) -> bool:
    """bf16 halves the bytes every decode step reads. It pays where torch has bf16 instructions,
    and on every CPU with AVX2+FMA when our linear layers run (section 4): they decode with our
    AVX2 kernel (torch's bf16 product without a compiler) and widen many-row products to fp32,
    so prefill never meets torch's emulated bf16 GEMM. Older CPUs stay in fp32."""
    return cpu_has_native_bf16() or (cpu_linears and {"avx2", "fma"} <= cpu_flags())


def resolve_dtype(name: str, device: torch.device, cpu_linears: bool = True) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_bf16_pays(cpu_linears) else torch.float32


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
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    where = local_dir or cache_dir or "the Hugging Face cache"
    log.info("downloading %s (revision %s) into %s; this is ~7.3 GB on first run", repo_id, revision, where)
    try:
        revision = resolve_revision(repo_id, revision, token)
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
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise ModelLoadError(f"{repo_id} is not in {where} and the hub cannot be reached (offline, "
                             "HF_HUB_OFFLINE=1, or no network); download it first or fix MODEL_PATH") from None
    except (OSError, ValueError) as exc:  # requests' errors are OSErrors; hub HTTP errors too
        raise ModelLoadError(f"downloading {repo_id} into {where} failed: {exc}") from None


def resolve_revision(repo_id: str, revision: str, token: str | None) -> str:
    """Expand a short commit id to the full one from the repo history (the hub wants full ids)."""
    if not re.fullmatch(r"[0-9a-f]{7,39}", revision):
        return revision
    from huggingface_hub import HfApi

    matches = {c.commit_id for c in HfApi().list_repo_commits(repo_id, token=token)
               if c.commit_id.startswith(revision)}
    if len(matches) != 1:
        raise ModelLoadError(f"MODEL_REVISION={revision} matches {len(matches)} commits of {repo_id}; "
                             "give the full 40-character commit id")
    return matches.pop()


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
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(f"MODEL_PATH={path} does not exist and cannot be created ({exc.strerror}); "
                             f"outside Docker use a folder you own, or the hub id {cfg.model_id}") from None
    try:
        download_model(cfg.model_id, cfg.model_revision, cfg.hf_token, local_dir=str(folder))
    except ModelLoadError:
        if created and not any(folder.iterdir()):
            folder.rmdir()  # leave no empty folder behind a failed first download
        raise
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
            lambda _m, args, kwargs: cast_floats((args, kwargs), torch.float32), with_kwargs=True)
    projector = modules[-1]
    projector.register_forward_hook(lambda _m, _args, out: cast_floats(out, llm_dtype))


def cast_floats(value: Any, dtype: torch.dtype, device: torch.device | None = None) -> Any:
    """Tensors anywhere in nested lists, tuples and plain dicts: floating ones to `dtype`, all to
    `device` (when given); ids, sizes and masks keep their integer dtype (the fp16 fix)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype=dtype if value.is_floating_point() else None)
    if type(value) is dict:
        return {key: cast_floats(item, dtype, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floats(item, dtype, device) for item in value)
    return value


# -- weight-only int8 (WEIGHTS=int8): the decoder's linear layers, quantized at load ---------
# Symmetric, one scale per output row (absmax / 127), from the checkpoint itself (no extra file).
# The vision tower and the projector stay as loaded; so does the input embedding (a tied lm_head
# gets its own int8 copy). The weights arrive as views into the mmap-ed safetensors files, so a
# layer's bf16 pages are handed back to the OS (madvise) as soon as it is quantized: the peak
# stays near the int8 model, not the bf16 one.
DECODER_NAMES = ("language_model", "text_model", "llm")
INT8_CHUNK_ELEMENTS = 1 << 20  # weights quantized at a time by torch ops (bounded fp32 temporaries)
INT8_KERNEL_CHUNK_ELEMENTS = 1 << 24  # by our one-pass kernel (32 MB of bf16 read before it is released)


def decoder_linears(model) -> list[torch.nn.Linear]:
    """The language model's nn.Linear layers and the lm_head, never the vision tower or projector."""
    roots: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in DECODER_NAMES and not any(name.startswith(f"{r}.") for r, _ in roots):
            roots.append((name, module))
    modules = [module for _, module in roots] or [model.get_decoder()]
    head = model.get_output_embeddings()
    found = {id(m): m for root in modules + ([head] if head is not None else []) for m in root.modules()
             if type(m) is torch.nn.Linear}
    return list(found.values())


def quantize_int8(weight: torch.Tensor, done: Callable[[int], None] | None = None,
                  kernel: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale per row) with |w - q * scale| <= scale / 2, INT8_CHUNK_ELEMENTS at
    a time (`kernel`: torch.ops.hcx_server.quantize_int8, one pass per row; else torch ops);
    done(rows) after each chunk lets the caller release what it has read."""
    rows, cols = weight.shape
    q = torch.empty(rows, cols, dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    step = max(1, (INT8_CHUNK_ELEMENTS if kernel is None else INT8_KERNEL_CHUNK_ELEMENTS) // cols)
    for i in range(0, rows, step):
        source = weight[i:i + step]
        if kernel is not None and source.dtype in (torch.bfloat16, torch.float32) and source.is_contiguous():
            kernel(source, q[i:i + step], scale[i:i + step])
        else:
            part = source.to(torch.float32, copy=True)  # never scaled in place: a tied embedding lives on
            low, high = torch.aminmax(part, dim=1)
            s = torch.maximum(-low, high).clamp_min_(1e-30) / 127
            q[i:i + step] = part.div_(s[:, None]).round_().clamp_(-127, 127)
            scale[i:i + step] = s
        if done is not None:
            done(min(rows, i + step))
    return q, scale


def file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's mmap-ed safetensors files (Linux; empty elsewhere)."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[5].endswith(".safetensors"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        pass
    return ranges


def release_file_pages(tensor: torch.Tensor, mappings: list[tuple[int, int]]) -> int:
    """Drop the resident pages of a tensor that is a view into a mmap-ed checkpoint file
    (MADV_DONTNEED: clean file pages are re-read from the file if ever touched again, so this is
    safe even while the tensor lives, as a tied input embedding does). Returns bytes released."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not any(lo <= start and end <= hi for lo, hi in mappings):
        return 0
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last <= first:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return last - first if libc.madvise(first, last - first, 4) == 0 else 0  # 4: MADV_DONTNEED


def quantize_decoder_int8(model) -> tuple[int, int]:
    """Every decoder linear layer (lm_head included) to Int8Linear (section 4), layer by layer,
    each one's checkpoint pages released chunk by chunk as it is read; returns (layers, bytes
    of checkpoint pages handed back to the OS)."""
    try:
        load_kernels()
        kernel = torch.ops.hcx_server.quantize_int8
    except KernelUnavailable:
        kernel = None  # torch ops: the same numbers, ~20x slower
    mappings = file_mappings()
    layers = released = 0
    for linear in decoder_linears(model):
        source = linear.weight.detach()
        if source.dim() != 2 or not source.is_floating_point():
            continue
        read = [0]

        def done(rows: int) -> None:
            released_now = release_file_pages(source[read[0]:rows], mappings)
            read[0] = rows
            return released_now

        q, scale = quantize_int8(source, done, kernel)
        linear.__class__ = Int8Linear
        linear.weight = torch.nn.Parameter(q, requires_grad=False)
        linear.register_buffer("weight_scale", scale, persistent=False)
        released += release_file_pages(source, mappings)  # the pages between chunks too
        layers += 1
    return layers, released


WEIGHT_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}


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
    limits = []
    for sub in (getattr(config, "text_config", None), getattr(config, "language_config", None), config):
        value = sub.get("max_position_embeddings") if isinstance(sub, dict) else \
            getattr(sub, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
            break
    decoder_max = getattr(config, "decoder_max_length", None)  # HCX clamps inputs to it silently
    if isinstance(decoder_max, int) and decoder_max > 0:
        limits.append(decoder_max)
    if limits:
        return min(limits)
    limit = getattr(tokenizer, "model_max_length", 0)
    return limit if 0 < limit < 10**7 else 16384


def load_model(cfg: Config) -> LoadedModel:
    """Locate (or download), load with the target dtype directly, move to the device."""
    started = time.perf_counter()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg.dtype, device, cfg.generation_backend != "eager" or cfg.weights == "int8")
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
    weights = WEIGHT_NAMES.get(dtype, str(dtype))
    if cfg.weights == "int8" and device.type != "cpu":
        log.warning("WEIGHTS=int8 is for CPUs (the model is on %s): serving %s weights", device.type, weights)
    elif cfg.weights == "int8":
        quantized = time.perf_counter()
        layers, released = quantize_decoder_int8(model)
        weights = "int8"
        log.info("WEIGHTS=int8: %d decoder linear layers quantized in %.1f s (%.2f GB of checkpoint pages released)",
                 layers, time.perf_counter() - quantized, released / 1e9)
    stops = stop_token_ids(tokenizer, model)
    window = context_length(model, tokenizer)
    if cfg.max_model_len > window:
        log.warning("MAX_MODEL_LEN=%d is beyond the model's %d-token window: long requests may fail",
                    cfg.max_model_len, window)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    loaded = LoadedModel(kind=kind, model=model, processor=processor, tokenizer=tokenizer,
                         name=cfg.served_model_name, path=str(folder), device=device, dtype=dtype,
                         vision_dtype=vision_dtype, stop_token_ids=stops, pad_token_id=pad,
                         context_length=cfg.max_model_len or window, demo=cfg.demo, weights=weights)
    loaded.generation_backend = prepare_generation_backend(cfg, loaded)
    loaded.load_seconds = time.perf_counter() - started
    log.info("model ready in %.1f s (context %d tokens, stop ids %s, %s weights, %s generation, kernel %s)",
             loaded.load_seconds, loaded.context_length, list(stops), loaded.weights, loaded.generation_backend,
             loaded.kernel)
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


def demo_text_config(kind: str, tokenizer, max_position_embeddings: int):
    """Llama (rotary positions) for the demo; GPT-2's learned absolute positions make the window
    a hard limit (an IndexError past it), which the fault tests use to fail generation for real."""
    from transformers import GPT2Config, LlamaConfig

    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if kind == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=max_position_embeddings,
                          bos_token_id=tokenizer.eos_token_id, **ids)
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=max_position_embeddings, **ids)


def build_demo_model(folder: str | os.PathLike, seed: int = 0, image_size: int = 56,
                     max_position_embeddings: int = 1024, text_model: str = "llama") -> Path:
    """Build and save a tiny LLaVA (SigLIP + Llama, random weights) loadable offline."""
    from transformers import (GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                              SiglipImageProcessor, SiglipVisionConfig)

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
        text_config=demo_text_config(text_model, tokenizer, max_position_embeddings),
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
        raise image_too_large(cfg, param)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{param} is not valid base64", param=param, code="invalid_base64",
                         detail="expected standard base64 (A-Z a-z 0-9 + / with = padding), "
                                "optionally prefixed by data:image/...;base64,") from None
    if not raw:
        raise InputError(f"{param} decodes to zero bytes", param=param, code="invalid_image")
    return open_image(raw, cfg, param)


def image_too_large(cfg: Config, param: str) -> InputError:
    return InputError(f"image is larger than MAX_IMAGE_BYTES={cfg.max_image_bytes} bytes", status=413,
                      param=param, code="image_too_large")


def open_image(raw: bytes, cfg: Config, param: str = "image") -> Image.Image:
    """Open with Pillow, refuse bombs before decoding pixels, apply EXIF rotation, flatten to RGB."""
    if len(raw) > cfg.max_image_bytes:
        raise image_too_large(cfg, param)
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


def image_from_path(path: str, cfg: Config, param: str = "image_path") -> Image.Image:
    """A local file (stdio MCP and the CLI run as the user, so reading their files is fine)."""
    try:
        raw = Path(os.path.expanduser(path)).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {param} {path!r}: {exc.strerror or exc}", param=param,
                         code="invalid_image") from None
    return open_image(raw, cfg, param)


def prompt_request(body: Mapping, cfg: Config, allow_image_path: bool = False) -> GenerationRequest:
    """The seed contract {"prompt", "image_base64"} (+ optional sampling fields); also the MCP tool."""
    prompt = field_str(body, "prompt", required=True)
    if not prompt.strip():
        raise InputError("'prompt' must not be empty", param="prompt", code="empty_prompt")
    image_b64 = field_str(body, "image_base64")
    image_path = field_str(body, "image_path")
    if image_path and not allow_image_path:
        raise InputError("'image_path' is only accepted over stdio (hcx-cli mcp); send image_base64",
                         param="image_path", code="invalid_value")
    images = [decode_image(image_b64, cfg)] if image_b64 and image_b64.strip() else []
    if image_path:
        images.append(image_from_path(image_path, cfg))
    messages = with_system_prompt([Message("user", prompt, images)], cfg)
    return GenerationRequest(messages=messages, **sampling_fields(body, cfg))


# -- OpenAI chat completions --------------------------------------------------------------

OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def reject_unsupported(body: Mapping) -> None:
    """Fields that would change the answer's meaning if silently ignored are a 400 naming them."""
    checks = {
        "tools": lambda v: bool(v), "functions": lambda v: bool(v),
        "tool_choice": lambda v: v not in (None, "none"), "function_call": lambda v: v not in (None, "none"),
        "response_format": lambda v: not (isinstance(v, dict) and v.get("type") == "text"),
        "logprobs": lambda v: v is not False, "top_logprobs": lambda v: bool(v), "logit_bias": lambda v: bool(v),
        "frequency_penalty": lambda v: v != 0, "presence_penalty": lambda v: v != 0,
        "audio": lambda v: True, "prediction": lambda v: True,
        "modalities": lambda v: v != ["text"],
    }
    for name, unsupported in checks.items():
        if body.get(name) is not None and unsupported(body[name]):
            raise InputError(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    n = field_int(body, "n", 1, 2**31 - 1)
    if n not in (None, 1):
        raise InputError("only n=1 is supported", param="n", code="unsupported_parameter")


def openai_stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise InputError("'stop' must be a string or a list of at most 4 strings", param="stop", code="invalid_type")
    return tuple(s for s in stops if s)


def image_from_url(url: str, cfg: Config, param: str) -> Image.Image:
    """data: URLs always; http(s) only when ALLOW_REMOTE_IMAGES=1 (and never to private addresses)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_image(url, cfg, param)
    if scheme in ("http", "https"):
        if not cfg.allow_remote_images:
            raise InputError("remote image URLs are disabled: send a data:image/...;base64 URL "
                             "(or start the server with ALLOW_REMOTE_IMAGES=1)", param=param, code="invalid_image_url")
        return fetch_remote_image(url, cfg, param)
    raise InputError("image_url must be a data: URL (or http(s) with ALLOW_REMOTE_IMAGES=1)", param=param,
                     code="invalid_image_url")


def is_blocked_address(address) -> bool:
    """Loopback, private, link-local, reserved, multicast: never fetched (SSRF guard)."""
    mapped = getattr(address, "ipv4_mapped", None)
    address = mapped or address
    return not address.is_global or address.is_multicast


def fetch_remote_image(url: str, cfg: Config, param: str = "image_url",
                       blocked: Callable[[Any], bool] = is_blocked_address) -> Image.Image:
    """GET an image with a byte limit and a deadline, connecting only to the checked address."""
    import http.client
    import ipaddress
    import socket
    import ssl
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError("image_url is not a valid http(s) URL", param=param, code="invalid_image_url")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise InputError(f"cannot resolve image host {parts.hostname!r}", param=param, code="invalid_image_url") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses or any(blocked(a) for a in addresses):
        raise InputError("image_url points to a loopback, private or reserved address; refused", param=param,
                         code="invalid_image_url")
    pinned = str(addresses[0])
    deadline = time.monotonic() + cfg.remote_image_timeout
    opened: list[socket.socket] = []

    class Pinned(http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection):
        def connect(self):
            sock = socket.create_connection((pinned, port), timeout=cfg.remote_image_timeout)
            opened.append(sock)
            if parts.scheme == "https":
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
            self.sock = sock

    def expire() -> None:  # the deadline covers the whole fetch, however slowly bytes trickle in
        for sock in opened:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    watchdog = threading.Timer(cfg.remote_image_timeout, expire)
    watchdog.daemon = True
    conn = Pinned(parts.hostname, port, timeout=cfg.remote_image_timeout)
    watchdog.start()
    try:
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                     headers={"User-Agent": f"hcx-server/{__version__}", "Accept": "image/*"})
        response = conn.getresponse()
        if response.status != 200:
            raise InputError(f"fetching the image returned HTTP {response.status}", param=param,
                             code="invalid_image_url")
        chunks, size = [], 0
        while chunk := response.read1(65536):  # what has arrived, not a full 64 KiB
            size += len(chunk)
            if size > cfg.max_image_bytes:
                raise image_too_large(cfg, param)
            chunks.append(chunk)
        if time.monotonic() > deadline:  # the watchdog cut the body short
            raise TimeoutError
    except (OSError, http.client.HTTPException, TimeoutError) as exc:
        raise InputError(f"fetching the image failed: {type(exc).__name__}", param=param,
                         code="invalid_image_url") from None
    finally:
        watchdog.cancel()
        conn.close()
    return open_image(b"".join(chunks), cfg, param)


def openai_message(index: int, message, cfg: Config) -> Message:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InputError(f"{where} must be an object", param=where, code="invalid_type")
    role = message.get("role")
    if role not in OPENAI_ROLES:
        raise InputError(f"{where}.role must be one of system, developer, user, assistant (got {role!r})",
                         param=f"{where}.role", code="invalid_value")
    content = message.get("content")
    if isinstance(content, str):
        return Message(OPENAI_ROLES[role], content)
    if content is None and role == "assistant":
        return Message("assistant", "")
    if not isinstance(content, list):
        raise InputError(f"{where}.content must be a string or a list of parts", param=f"{where}.content",
                         code="invalid_type")
    texts, images = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and role == "user":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise InputError(f"{at}.image_url.url must be a string", param=f"{at}.image_url", code="invalid_type")
            images.append(image_from_url(url, cfg, f"{at}.image_url"))
        else:
            raise InputError(f"{at} must be a text part (or an image_url part in a user message)", param=at,
                             code="invalid_value")
    return Message(OPENAI_ROLES[role], "\n".join(texts), images)


def openai_request(body: Mapping, cfg: Config) -> GenerationRequest:
    """/v1/chat/completions body -> GenerationRequest (unsupported meaning-changing fields are 400s)."""
    reject_unsupported(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InputError("'messages' must be a non-empty list", param="messages", code="invalid_value")
    parsed = [openai_message(i, m, cfg) for i, m in enumerate(messages)]
    if not any(m.role == "user" for m in parsed):
        raise InputError("'messages' needs at least one user message", param="messages", code="invalid_value")
    if field_str(body, "model") is None and "model" in body:
        raise InputError("'model' must be a string", param="model", code="invalid_type")
    return GenerationRequest(messages=with_system_prompt(parsed, cfg), stop=openai_stop(body.get("stop")),
                             **sampling_fields(body, cfg))


def stream_options(body: Mapping, streaming: bool) -> bool:
    """include_usage from stream_options (only meaningful with stream=true)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise InputError("'stream_options' must be an object like {\"include_usage\": true}",
                         param="stream_options", code="invalid_type")
    if not streaming:
        raise InputError("'stream_options' is only allowed with stream=true", param="stream_options",
                         code="invalid_value")
    return options.get("include_usage", False)


# -- from a request to model tensors ----------------------------------------------------


@dataclass
class ModelInputs:
    tensors: dict[str, Any]
    prompt_tokens: int


def to_model(tensors: dict[str, Any], m: LoadedModel) -> dict[str, Any]:
    """On the model's device; floating tensors (pixel values, also inside HCX's nested lists) in
    the vision dtype."""
    return cast_floats(dict(tensors), m.vision_dtype, m.device)


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
    """The model card's flow: one content dict per message (text, then its images, as bytes --
    never a client string, which the remote preprocessor would open as a path or URL)."""
    if not req.image_count:
        chat = [{"role": msg.role, "content": msg.text} for msg in req.messages]
        ids = m.tokenizer.apply_chat_template(chat, return_tensors="pt", tokenize=True, add_generation_prompt=True)
        return ModelInputs(to_model({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, m), int(ids.shape[1]))
    if not hasattr(m.processor, "load_images_videos"):
        raise GenerationError("this HCX revision's processor has no load_images_videos(); set MODEL_REVISION "
                              f"to the revision this server follows ({HCX_REVISION})")
    chat, count = [], 0
    for msg in req.messages:
        chat.append({"role": msg.role, "content": {"type": "text", "text": msg.text}})
        for img in msg.images:
            chat.append({"role": msg.role, "content": {"type": "image", "filename": f"image_{count}.png",
                                                       "image": png_bytes(img)}})
            count += 1
    new_chat, images, is_video_list = m.processor.load_images_videos(chat)
    pre = dict(m.processor(images, is_video_list=is_video_list))
    ids = m.tokenizer.apply_chat_template(new_chat, return_tensors="pt", tokenize=True, add_generation_prompt=True)
    # one <|dummy3|> per image in the ids; the model expands each into vision_query_lengths embeddings
    vision_tokens = sum(sum(lengths) for lengths in pre.get("vision_query_lengths", []))
    prompt_tokens = int(ids.shape[1]) - count + int(vision_tokens)
    return ModelInputs(to_model({"input_ids": ids, **pre}, m), prompt_tokens)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


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


def run_generation(m: LoadedModel, job: Job) -> int:
    """model.generate with a streamer that forwards ids and a criterion that honours cancel;
    returns how many tokens it generated."""
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    class ForwardIds(BaseStreamer):
        prompt_skipped = False
        forwarded = 0

        def put(self, value):
            if not self.prompt_skipped:  # generate() first hands over the prompt (empty for embeds)
                self.prompt_skipped = True
                return
            for token_id in value.reshape(-1).tolist():
                self.forwarded += 1
                job.events.put(("token", token_id))

        def end(self):
            pass

    class StopWhenCancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), job.cancelled.is_set(), dtype=torch.bool,
                              device=input_ids.device)

    if job.request.seed is not None:
        torch.manual_seed(job.request.seed)
    else:
        torch.seed()  # an earlier seeded request must not make this one predictable
    streamer = ForwardIds()
    with torch.inference_mode():
        out = m.model.generate(**job.inputs.tensors, **sampling_kwargs(job.request, job.max_new_tokens),
                               eos_token_id=list(m.stop_token_ids), pad_token_id=m.pad_token_id,
                               streamer=streamer, stopping_criteria=StoppingCriteriaList([StopWhenCancelled()]),
                               **static_cache_kwargs(m, job.inputs.prompt_tokens + job.max_new_tokens))
    if streamer.forwarded:
        return streamer.forwarded
    answer = new_token_ids(out, job.inputs.tensors["input_ids"][0])  # remote code that drops the streamer
    for token_id in answer:
        job.events.put(("token", token_id))
    return len(answer)


def new_token_ids(out, prompt_ids: torch.Tensor) -> list[int]:
    """generate() returns prompt + answer from input ids, only the answer from embeddings."""
    sequence = (out.sequences if hasattr(out, "sequences") else out)[0]
    n = prompt_ids.shape[0]
    if sequence.shape[0] > n and torch.equal(sequence[:n], prompt_ids):
        sequence = sequence[n:]
    return sequence.tolist()


# -- generation backends -----------------------------------------------------------------
# "eager" runs model.generate as transformers ships it. "gemv" runs the very same generate()
# call (streamer, cancel criterion, min_new_tokens, stop ids, the HCX remote code) and swaps
# only the kernels under the linear layers (nn.Linear -> GemvLinear, same parameters, no copy).
# Decode is one matrix-vector product per weight matrix per token, so it is bound by memory
# bandwidth; torch's own CPU products read the weights at only half to two thirds of it, our
# one-row kernels (kernels/*.cpp) at ~90 % (`hcx-cli bench --kernels`, BENCHMARKS.md).
# Prefill and the vision tower (many rows) run torch's matmul: in bf16 where the CPU has bf16
# instructions (oneDNN), else widened to fp32 chunk by chunk (MKL), because torch's emulated
# bf16 GEMM is ~4x and its bf16 convolution ~50x slower than fp32 there.

KERNEL_LIBRARY = "hcx_server_kernels"
KERNEL_CFLAGS = ["-O3", "-fopenmp", "-w"]  # -w: GCC 12's own intrinsics headers warn about themselves
# variant -> the CPU flags it needs (/proc/cpuinfo); each runs as torch.ops.hcx_server.gemv_<variant>
KERNEL_VARIANTS = {
    "bf16_avx512bf16": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}),
    "bf16_avx2": frozenset({"avx2", "fma"}),
    "int8_avx512": frozenset({"avx512f", "avx512bw", "avx512vl"}),
    "int8_avx2": frozenset({"avx2", "fma"}),
}
WIDEN_CHUNK_BYTES = 8 << 20  # many-row products widen this much weight at a time (a bounded temporary)
_kernels_lock = threading.Lock()
_kernels: dict[str, Any] = {}  # once per process: "variants" (passed their self-test) or "error"


class KernelUnavailable(RuntimeError):
    """Our CPU kernels cannot run here; the message says why (torch's own kernels run instead)."""


def kernel_sources() -> Path:
    """kernels/ beside server.py (a checkout or an editable install), else the copy that
    `pip install .` puts in the package hcx_server_kernels."""
    beside = Path(__file__).resolve().parent / "kernels"
    if (beside / "ops.cpp").is_file():
        return beside
    from importlib.resources import files

    try:
        return Path(str(files(KERNEL_LIBRARY)))
    except (ModuleNotFoundError, TypeError):
        raise KernelUnavailable("the kernel sources (kernels/*.cpp) are not installed") from None


@contextlib.contextmanager
def build_lock(folder: Path):
    """An OS file lock (released when its holder dies, unlike torch's FileBaton) around a build."""
    try:
        import fcntl
    except ImportError:  # not POSIX: one builder at a time is the user's affair
        yield
        return
    with open(folder / "hcx-build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_kernels() -> Path:
    """Build kernels/*.cpp once per machine into ONE library with torch.utils.cpp_extension
    (ninja, files compiled in parallel, torch's include/link flags), in a folder named by a
    hash of the sources, torch and the compiler: a change of any rebuilds, nothing else does."""
    import hashlib
    import shutil

    source_dir = kernel_sources()
    sources = sorted(source_dir.glob("*.cpp"))
    compiler = os.environ.get("CXX") or "c++"
    digest = hashlib.sha256()
    for part in [torch.__version__, str(Path(torch.__file__).parent), compiler, *KERNEL_CFLAGS]:
        digest.update(part.encode() + b"\0")
    for path in sources + sorted(source_dir.glob("*.h")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    folder = Path.home() / ".cache" / "hcx-server" / "kernels" / digest.hexdigest()[:16]
    library = folder / f"{KERNEL_LIBRARY}.so"
    if library.is_file():
        return library
    if shutil.which(compiler) is None:
        raise KernelUnavailable(f"no C++ compiler ({compiler}, or $CXX) on PATH to build the CPU kernels once")
    if shutil.which("ninja") is None:
        try:
            import ninja  # the PyPI wheel: its binary may not be on PATH when the venv is not activated
        except ImportError:
            raise KernelUnavailable("ninja is not installed (pip install ninja) to build the CPU kernels") from None
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KernelUnavailable(f"cannot create the kernel build folder {folder}: {exc.strerror or exc}") from None
    with build_lock(folder):
        if library.is_file():  # another process built it while this one waited
            return library
        (folder / "lock").unlink(missing_ok=True)  # torch's own lock, left behind by a killed build
        log.info("building the CPU kernels once into %s (~20 s)", folder)
        started = time.perf_counter()
        from torch.utils import cpp_extension

        try:
            cpp_extension.load(name=KERNEL_LIBRARY, sources=[str(s) for s in sources], extra_cflags=KERNEL_CFLAGS,
                               extra_ldflags=["-fopenmp"], extra_include_paths=[str(source_dir)],
                               build_directory=str(folder), is_python_module=False, verbose=False)
        except (RuntimeError, OSError, ValueError) as exc:  # a failed compiler run is a RuntimeError
            lines = [line for line in str(exc).splitlines() if "error" in line.lower()] or str(exc).splitlines()
            raise KernelUnavailable(f"building the CPU kernels failed: {(lines or ['?'])[0].strip()}") from None
        log.info("built the CPU kernels in %.1f s", time.perf_counter() - started)
    return library


def kernel_op(variant: str):
    return getattr(torch.ops.hcx_server, f"gemv_{variant}")


def kernel_self_test(variant: str) -> bool:
    """One variant against torch's linear in fp32, on shapes with odd tails, with bias."""
    gen = torch.Generator().manual_seed(0)
    for n, k in ((37, 100), (9, 17), (16, 64)):
        x, b = torch.randn(1, 1, k, generator=gen).bfloat16(), torch.randn(n, generator=gen).bfloat16()
        if variant.startswith("int8"):
            w, s = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8), torch.rand(n, generator=gen) + 0.5
            got, want = kernel_op(variant)(x, w, s, b), torch.nn.functional.linear(x.float(), w.float() * s[:, None], b.float())
        else:
            w = torch.randn(n, k, generator=gen).bfloat16()
            got, want = kernel_op(variant)(x, w, b), torch.nn.functional.linear(x.float(), w.float(), b.float())
        if got.shape != want.shape or not torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max())):
            log.warning("CPU kernel %s failed its self-test against torch's linear; it will not run", variant)
            return False
    return True


def load_kernels() -> tuple[str, ...]:
    """Build (first time), load into torch.ops.hcx_server and self-test, once per process, every
    variant this CPU runs; returns those that passed (raises KernelUnavailable if none)."""
    with _kernels_lock:
        if "error" in _kernels:
            raise KernelUnavailable(_kernels["error"])
        if "variants" not in _kernels:
            try:
                runnable = [v for v, needs in KERNEL_VARIANTS.items() if needs <= cpu_flags()]
                if not runnable:
                    raise KernelUnavailable("this CPU has neither AVX2+FMA nor AVX-512 (or /proc/cpuinfo is unreadable)")
                library = build_kernels()
                try:
                    torch.ops.load_library(str(library))
                except OSError as exc:
                    raise KernelUnavailable(f"cannot load {library}: {exc}") from None
                passed = tuple(v for v in runnable if kernel_self_test(v))
                if not passed:
                    raise KernelUnavailable("every CPU kernel failed its self-test against torch")
            except KernelUnavailable as exc:
                _kernels["error"] = str(exc)
                raise
            _kernels["variants"] = passed
        return _kernels["variants"]


def pick_kernel(want: str, family: str) -> tuple[str, str | None]:
    """The variant for `family` ("bf16"/"int8") by CPU_KERNEL, or "torch" and the reason why."""
    if want == "torch":
        return "torch", "CPU_KERNEL=torch"
    try:
        passed = load_kernels()
    except KernelUnavailable as exc:
        return "torch", str(exc)
    ours = [v for v in KERNEL_VARIANTS if v.startswith(family + "_")]  # best first
    forced = [v for v in ours if v.endswith("_" + want) or (want == "avx512" and "avx512" in v)]
    for variant in forced if want != "auto" else ours:
        if variant in passed:
            return variant, None
    if want != "auto":
        log.warning("CPU_KERNEL=%s: this CPU does not run %s; picking the best it runs", want, " or ".join(forced))
    return next(((v, None) for v in ours if v in passed), ("torch", f"no {family} kernel runs on this CPU"))


def many_row_dtype(variant: str) -> torch.dtype:
    """What many-row products compute in: torch's bf16 matmul where the CPU has bf16 instructions,
    else fp32 (the weights widened chunk by chunk); a forced AVX2 variant means "as on AVX2"."""
    return torch.bfloat16 if cpu_has_native_bf16() and not variant.endswith("avx2") else torch.float32


def widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                   scale: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (* scale per output) + bias computed in `dtype`, the weight converted
    WIDEN_CHUNK_BYTES at a time: torch's fastest many-row matmul for bf16 or int8 weights on
    CPUs without bf16 instructions, with a bounded temporary."""
    n, k = weight.shape
    rows = x.reshape(-1, k).to(dtype)
    out = torch.empty(rows.shape[0], n, dtype=dtype)
    step = max(16, WIDEN_CHUNK_BYTES // (k * dtype.itemsize))
    for i in range(0, n, step):
        torch.mm(rows, weight[i:i + step].to(dtype).t(), out=out[:, i:i + step])
    if scale is not None:
        out.mul_(scale)
    if bias is not None:
        out.add_(bias)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


class GemvLinear(torch.nn.Linear):
    """nn.Linear with bf16 weights whose one-row products (every decode step, the prefill's
    last-token logits) run our kernel and whose many-row products are widened (widened_linear)
    where the CPU lacks bf16 instructions; everything else is torch's own linear."""

    one_row: Callable | None = None
    widen_to: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one = x.numel() == self.in_features
        if one and self.one_row is not None and x.dtype == torch.bfloat16:
            return self.one_row(x.contiguous(), self.weight, self.bias)
        if not one and self.widen_to is not None:
            return widened_linear(x, self.weight, self.bias, self.widen_to)
        return torch.nn.functional.linear(x, self.weight, self.bias)


class Int8Linear(torch.nn.Linear):
    """nn.Linear with weight-only int8 weights (WEIGHTS=int8): `weight` int8 [out, in] and
    `weight_scale` fp32 [out]. One-row products run our kernel, else torch's
    _weight_int8pack_mm; many-row products widen the weight (widened_linear)."""

    one_row: Callable | None = None
    widen_to: torch.dtype = torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_row is not None and x.numel() == self.in_features:
            return self.one_row(x.contiguous(), self.weight, self.weight_scale, self.bias)
        if x.numel() != self.in_features or self.in_features % 16:  # torch 2.13's reads garbage past K % 16
            return widened_linear(x, self.weight, self.bias, self.widen_to, self.weight_scale)
        y = torch._weight_int8pack_mm(x.reshape(1, -1).to(torch.bfloat16), self.weight,
                                      self.weight_scale.to(torch.bfloat16))  # fp32 rows are 10x slower there
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def _widened_conv_forward(self, x: torch.Tensor) -> torch.Tensor:
    bias = None if self.bias is None else self.bias.float()
    return self._conv_forward(x.float(), self.weight.float(), bias).to(x.dtype)


class WidenedConv1d(torch.nn.Conv1d):
    """bf16 Conv1d computed in fp32 on CPUs without bf16 instructions (weights stay bf16)."""

    forward = _widened_conv_forward


class WidenedConv2d(torch.nn.Conv2d):
    """bf16 Conv2d computed in fp32 on CPUs without bf16 instructions, where torch's bf16
    convolution is 50-70x slower than fp32 (the vision tower's patch embedding, the C-Abstractor)."""

    forward = _widened_conv_forward


WIDENED_CONVS = {torch.nn.Conv1d: WidenedConv1d, torch.nn.Conv2d: WidenedConv2d}


def use_cpu_kernels(model, variant: str) -> tuple[int, int]:
    """Point every bf16 / int8 linear layer at `variant` (a KERNEL_VARIANTS key, or "torch") for
    one-row products and at many_row_dtype(variant) for the rest, in place (same parameters);
    bf16 convolutions compute in fp32 where that is the many-row dtype.
    Returns (layers whose one-row products run our kernel, layers whose many-row products widen)."""
    compute = many_row_dtype(variant)
    op = None if variant == "torch" else kernel_op(variant)
    ours = widened = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.device.type != "cpu":
            continue
        if type(module) in (torch.nn.Linear, GemvLinear) and weight.dtype == torch.bfloat16 and weight.is_contiguous():
            module.__class__ = GemvLinear
            module.one_row = op if variant.startswith("bf16") else None
            module.widen_to = None if compute == torch.bfloat16 else compute
        elif type(module) is Int8Linear:
            module.one_row = op if variant.startswith("int8") else None
            module.widen_to = compute
        elif type(module) in WIDENED_CONVS and weight.dtype == torch.bfloat16 and compute == torch.float32:
            module.__class__ = WIDENED_CONVS[type(module)]
            widened += 1
            continue
        else:
            continue
        ours += getattr(module, "one_row", None) is not None
        widened += getattr(module, "widen_to", None) is not None
    return ours, widened


def use_torch_linears(model) -> int:
    """Undo use_cpu_kernels: torch's own linear and convolution (int8 layers: torch's int8 product)."""
    count = 0
    for module in model.modules():
        if type(module) is GemvLinear:
            module.__class__ = torch.nn.Linear
        elif type(module) is Int8Linear:
            module.one_row = None
        elif type(module) in (WidenedConv1d, WidenedConv2d):
            module.__class__ = type(module).__mro__[1]
        else:
            continue
        count += 1
    return count


def use_gemv_linears(model, enable: bool = True) -> int:
    """Switch the model's linear layers to our best kernel for this CPU (or back to torch's);
    returns how many layers our kernel drives one row at a time."""
    if not enable:
        use_torch_linears(model)
        return 0
    family = "int8" if any(type(m) is Int8Linear for m in model.modules()) else "bf16"
    return use_cpu_kernels(model, pick_kernel("auto", family)[0])[0]


def prepare_cpu_kernels(cfg: Config, m: LoadedModel, report: Callable) -> str:
    """The CPU part of prepare_generation_backend: our kernel under every bf16 / int8 linear layer
    ("gemv"), or torch's with the reason logged ("eager")."""
    want = cfg.generation_backend
    if m.weights not in ("bf16", "int8"):
        report("GENERATION_BACKEND=%s: our CPU kernels need bfloat16 or int8 weights, the model is %s; "
               "using eager generation", want, str(m.dtype).replace("torch.", ""))
        return "eager"
    variant, reason = pick_kernel(cfg.cpu_kernel, m.weights)
    ours, widened = use_cpu_kernels(m.model, variant)
    m.kernel = variant
    many = "torch's bf16 matmul" if many_row_dtype(variant) == torch.bfloat16 else "fp32, widened chunk by chunk"
    if reason is not None:
        report("GENERATION_BACKEND=%s: %s; one-row products run torch's kernels, many-row products: %s "
               "(%d layers)", want, reason, many, widened)
        return "eager"
    log.info("CPU kernel %s drives %d %s linear layers one row at a time (decode); many-row products: %s "
             "(%d layers)", variant, ours, m.weights, many, widened)
    return "gemv" if ours else "eager"


# "static" (CUDA): transformers' static KV cache, whose fixed shapes let generate() compile the
# decode step with torch.compile + CUDA graphs (the gpt-fast recipe): 2.6-3.4x eager decode on an
# H100, where eager decode is bound by Python and kernel launches, not by memory. The cache is
# made once at its full size (STATIC_CACHE_TOKENS) and compiled at load, so requests of any
# length up to it reuse one graph; longer ones run eager. On this CPU it measured no faster.
STATIC_CACHE_TOKENS = 2048


def static_unsupported(m: LoadedModel) -> str | None:
    if m.device.type != "cuda":
        return (f"the static-cache backend (torch.compile + CUDA graphs) is for CUDA GPUs, the model is on "
                f"{m.device.type} (where it measured no faster than eager)")
    if m.kind == "hcx":
        return "the HCX remote code's own generate() has not been checked under torch.compile"
    return None


def static_cache_tokens(m: LoadedModel) -> int:
    return min(STATIC_CACHE_TOKENS, m.context_length)


def static_cache_kwargs(m: LoadedModel, total_tokens: int) -> dict[str, Any]:
    """The compiled static-cache path for requests that fit the cache made at load; eager otherwise."""
    if m.generation_backend == "static" and total_tokens <= static_cache_tokens(m):
        return {"cache_implementation": "static"}
    return {}


def warm_up_static(m: LoadedModel) -> None:
    """One short greedy generation that sizes the cache to STATIC_CACHE_TOKENS (max_length) and
    compiles + records the decode step (~40 s once), so no request waits for it."""
    ids = torch.tensor([[m.pad_token_id]], device=m.device)
    with torch.inference_mode():
        m.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_length=static_cache_tokens(m),
                         min_new_tokens=4, max_new_tokens=None, do_sample=False, temperature=None, top_p=None,
                         top_k=None, pad_token_id=m.pad_token_id, cache_implementation="static",
                         stopping_criteria=[lambda input_ids, scores, **kw: input_ids.shape[1] >= 5])


def prepare_generation_backend(cfg: Config, m: LoadedModel) -> str:
    """Once at load: the backend that applies ("static" on CUDA, "gemv" on CPUs with AVX2 or
    AVX-512 and bf16 or int8 weights), else "eager"; never fails, and logs why it falls back."""
    want = cfg.generation_backend
    report = log.info if want == "auto" else log.warning
    if want == "eager":
        if m.weights == "int8":  # int8 layers have no torch twin: torch's int8 product, many rows widened
            use_cpu_kernels(m.model, "torch")
        return "eager"
    if want == "static" or (want == "auto" and m.device.type == "cuda"):
        reason = static_unsupported(m)
        if reason is None:
            started = time.perf_counter()
            try:
                warm_up_static(m)
            except Exception as exc:  # noqa: BLE001 - any compile failure means: run eager
                reason = f"compiling the decode step failed ({type(exc).__name__}: {exc})"
            else:
                log.info("GENERATION_BACKEND=%s: static KV cache of %d tokens, decode step compiled in %.0f s",
                         want, static_cache_tokens(m), time.perf_counter() - started)
                return "static"
        report("GENERATION_BACKEND=%s: %s; using eager generation", want, reason)
        return "eager"
    if m.device.type != "cpu":
        report("GENERATION_BACKEND=%s: our kernels are for CPUs and the model is on %s; using eager generation",
               want, m.device.type)
        return "eager"
    return prepare_cpu_kernels(cfg, m, report)


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
        self.stats = {"jobs_done": 0, "jobs_failed": 0, "jobs_cancelled": 0, "jobs_skipped": 0,
                      "tokens_generated": 0}
        self.draining = False  # set on SIGTERM: finish what runs, refuse new work
        self._thread: threading.Thread | None = None

    # -- lifecycle --
    def start(self, wait: bool = False) -> "Engine":
        """Load the model (in this worker process) on the engine thread, then serve jobs."""
        self.caller_reports_errors = wait  # the CLI prints the load error itself, once
        self._thread = threading.Thread(target=self._main, name="hcx-engine", daemon=True)
        self._thread.start()
        if wait:
            self.wait_ready()
        return self

    def _main(self) -> None:
        try:
            self.model = load_model(self.cfg)
        except ModelLoadError as exc:
            self.state, self.error = "error", str(exc)
            log.log(logging.DEBUG if self.caller_reports_errors else logging.ERROR, "model not loaded: %s", exc)
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
                self.stats["tokens_generated"] += run_generation(self.model, job)
            except Exception as exc:  # noqa: BLE001 - the engine thread must never die
                self.stats["jobs_failed"] += 1
                log.error("generation failed: %s", exc, exc_info=not isinstance(exc, torch.OutOfMemoryError))
                job.events.put(("error", describe_failure(exc)))
            else:
                self.stats["jobs_cancelled" if job.cancelled.is_set() else "jobs_done"] += 1
                job.events.put(("done", None))
            finally:
                self.running = None

    def wait_ready(self, timeout: float | None = None) -> LoadedModel:
        """Block until loading ends (stdio MCP and the CLI have nothing else to do meanwhile)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state == "loading" and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.05)
        if self.state == "error":
            raise ModelLoadError(self.error)
        return self.require_model()

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
        self.tokens = 0  # generated so far (MCP progress reads it)

    def cancel(self) -> None:
        self.job.cancel()

    def _events(self) -> Iterator[tuple[str, Any]]:
        """Engine events; the client check runs on a clock, also while tokens keep arriving."""
        next_poll = time.monotonic() + self.POLL_S
        while True:
            try:
                event = self.job.events.get(timeout=self.POLL_S)
            except queue.Empty:
                event = None
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + self.POLL_S
                if not self.job.cancelled.is_set() and self.client_gone():
                    log.info("client disconnected: cancelling generation")
                    self.job.cancel()
            if event is not None:
                yield event

    def __iter__(self) -> Iterator[str]:
        job, m = self.job, self.m
        detok, stops = Detokenizer(m.tokenizer), StopStrings(job.request.stop)
        first_at, finish, stopped_on_token = None, "length", False
        try:
            for kind, value in self._events():
                if kind == "error":
                    raise GenerationError(value)
                if kind == "done":
                    break
                if first_at is None:
                    first_at = time.perf_counter()
                self.tokens += 1
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
            elif self.tokens < job.max_new_tokens:
                finish = "stop"
        except GenerationError:
            finish = "error"
            raise
        except GeneratorExit:  # the consumer (a client that hung up) stopped reading
            finish = "cancelled"
            raise
        finally:
            job.cancel()  # no-op when finished; stops the engine if the consumer went away early
            now = time.perf_counter()
            self.completion = Completion("", finish, job.inputs.prompt_tokens, self.tokens,
                                         (first_at or now) - job.submitted, now - job.submitted)


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
# 5. HTTP routes (seed REST, OpenAI-compatible, MCP) -- no torch below this line
# ======================================================================================

# -- request helpers ---------------------------------------------------------------------


def parse_json(raw: bytes):
    """Strict JSON: NaN/Infinity are not numbers; any decode problem is a ValueError."""
    return json.loads(raw, parse_constant=_reject_constant)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON number")


def read_json_body() -> dict:
    """A JSON object body, or a 400 that says what is wrong with it."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        raise InputError("request body is empty; send a JSON object", code="invalid_json")
    try:
        body = parse_json(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError("request body is not valid JSON", code="invalid_json", detail=str(exc)) from None
    if not isinstance(body, dict):
        raise InputError(f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def wants_stream(body: Mapping, allow_query: bool = True) -> bool:
    """`?stream=true` or a JSON `"stream": true` (a non-boolean JSON value is a 400)."""
    value = body.get("stream")
    if value is not None and not isinstance(value, bool):
        raise InputError("'stream' must be a boolean", param="stream", code="invalid_type")
    query = request.args.get("stream", "").lower() if allow_query else ""
    if query and query not in ("1", "true", "yes", "0", "false", "no"):
        raise InputError("query parameter 'stream' must be true or false", param="stream", code="invalid_value")
    return bool(value) or query in ("1", "true", "yes")


def client_gone_check() -> Callable[[], bool]:
    """A cheap poll of the client's socket: readable with no data means it hung up."""
    import socket

    sock = request.environ.get("gunicorn.socket")

    def gone() -> bool:
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    return gone


def record_completion(access: dict | None, completion: Completion | None) -> None:
    """Token counts and TTFT for the access line."""
    if completion is not None and access is not None:
        access.update(tokens_in=completion.prompt_tokens, tokens_out=completion.completion_tokens,
                      ttft_ms=round(completion.ttft_s * 1000, 1), finish=completion.finish_reason)


def streaming_response(events: Iterator[str], mimetype: str, pieces: TextStream | None = None) -> Response:
    """A generator-backed response sent as produced (no proxy buffering); closing it cancels
    the generation of `pieces`."""
    response = Response(events, mimetype=mimetype)
    if mimetype == "text/plain":
        response.headers["Content-Type"] = "text/plain; charset=utf-8"
    response.headers["X-Accel-Buffering"] = "no"
    response.headers["Cache-Control"] = "no-cache"
    if pieces is not None:
        response.call_on_close(pieces.cancel)
    return response


def text_stream_response(pieces: TextStream) -> Response:
    """text/plain chunks as tokens arrive; a failure ends the stream with `[error] <message>`."""
    access = g.get("access")  # the generator runs after the request context is gone

    def body() -> Iterator[str]:
        try:
            yield from pieces
        except GenerationError as exc:
            yield f"\n[error] {exc}\n"
        finally:
            record_completion(access, pieces.completion)

    return streaming_response(body(), "text/plain", pieces)


# -- error shapes: one per API family ------------------------------------------------------

OPENAI_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                      429: "rate_limit_error", 503: "server_error", 500: "server_error"}


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": OPENAI_ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def jsonrpc_error(msg_id, code: int, message: str, data=None) -> dict:
    error = {"code": code, "message": message, **({"data": data} if data is not None else {})}
    return {"jsonrpc": "2.0", "id": msg_id, "error": error}


def error_response(status: int, message: str, detail: str | None = None, param: str | None = None,
                   code: str | None = None, retry_after: int | None = None) -> Response:
    """The error in the shape the caller's API speaks: seed {error, detail}, OpenAI, or JSON-RPC."""
    if request.path.startswith("/v1/"):
        body = openai_error(status, message, param, code)
    elif request.path.rstrip("/") == "/mcp":
        body = jsonrpc_error(None, -32000 if status != 404 else -32001, message)
    else:
        body = {"error": message, "detail": detail or message}
    response = jsonify(body)
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="hcx-server"'
    return response


def register_errors(app: Flask) -> None:
    """Every failure is JSON with the right status; no traceback ever reaches a client."""

    @app.errorhandler(InputError)
    def input_error(exc: InputError):
        return error_response(exc.status, exc.message, exc.detail, exc.param, exc.code)

    @app.errorhandler(Busy)
    def busy(exc: Busy):
        return error_response(503, str(exc), code="server_busy", retry_after=1)

    @app.errorhandler(ModelNotReady)
    def not_ready(exc: ModelNotReady):
        return error_response(503, str(exc), code="model_not_ready", retry_after=5)

    @app.errorhandler(GenerationError)
    def generation_error(exc: GenerationError):
        return error_response(500, str(exc), code="generation_failed")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return error_response(exc.code or 500, exc.name, exc.description, code=exc.name.lower().replace(" ", "_"))

    @app.errorhandler(Exception)
    def server_fault(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal server error", f"{type(exc).__name__}: {exc}", code="internal_error")


# -- OpenAI-compatible responses -------------------------------------------------------------

FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop", "error": "stop"}


def usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def chat_completion(c: Completion, completion_id: str, created: int, model: str) -> dict:
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                         "logprobs": None, "finish_reason": FINISH_REASONS[c.finish_reason]}],
            "usage": usage(c), "system_fingerprint": None}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def chat_completion_chunks(pieces: TextStream, completion_id: str, created: int, model: str,
                           include_usage: bool, access: dict | None) -> Iterator[str]:
    """SSE: role first, content deltas as tokens arrive, finish_reason, usage if asked, [DONE]."""

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        return sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": choices, **({"usage": None} if include_usage else {}), **extra})

    try:
        yield chunk({"role": "assistant", "content": ""})
        for piece in pieces:
            yield chunk({"content": piece})
    except GenerationError as exc:
        yield sse(openai_error(500, str(exc), code="generation_failed"))
        return
    finally:
        record_completion(access, pieces.completion)
    c = pieces.completion
    yield chunk({}, FINISH_REASONS[c.finish_reason])
    if include_usage:
        yield sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [], "usage": usage(c)})
    yield sse("[DONE]")


# -- MCP: JSON-RPC 2.0 handler shared by POST /mcp and stdio (hcx-cli mcp) --------------------

MCP_PROTOCOL_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
MCP_ASSUMED_VERSION = "2025-03-26"  # a request without MCP-Protocol-Version (Caret sends none)
TOOL_NAME = "generate_hyperclovax_vision"


class McpError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def tool_definition(cfg: Config, stdio: bool) -> dict:
    properties = {
        "prompt": {"type": "string", "minLength": 1, "description": "The question or instruction."},
        "image_base64": {"type": "string", "description": "Optional image, base64 (a data:image/...;base64, "
                                                          "prefix is accepted)."},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": cfg.max_tokens_cap,
                       "description": f"Most tokens to generate (default {cfg.max_new_tokens})."},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2, "description": "0 = greedy (default 0.5)."},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "description": "Default 0.6."},
        "seed": {"type": "integer", "description": "Fix sampling for a reproducible answer."},
    }
    if stdio:
        properties["image_path"] = {"type": "string", "description": "Optional image file on this machine."}
    return {"name": TOOL_NAME, "title": "HyperCLOVA X SEED Vision",
            "description": "Answer a prompt about an optional image with HyperCLOVA X SEED Vision Instruct 3B "
                           "(Korean and English), running locally.",
            "inputSchema": {"type": "object", "properties": properties, "required": ["prompt"]},
            "annotations": {"readOnlyHint": True, "openWorldHint": False}}


def tool_result(text: str, is_error: bool = False) -> dict:
    return {"content": [{"type": "text", "text": text}], "isError": is_error}


class McpServer:
    """The MCP protocol (tools only) over any transport: messages in, messages out.

    handle() yields progress notifications while a tool runs (when asked for) and then the
    response; it yields nothing for notifications. Sessions are just ids with a protocol
    version; in-flight tool calls are kept so notifications/cancelled can stop them.
    """

    MAX_SESSIONS = 1024

    def __init__(self, engine: Engine, stdio: bool = False):
        self.engine, self.stdio = engine, stdio
        self.sessions: dict[str, str] = {}  # id -> negotiated protocol version
        self.inflight: dict[tuple[str, str], TextStream] = {}
        self.lock = threading.Lock()

    # -- sessions --
    def open_session(self, version: str) -> str:
        with self.lock:
            while len(self.sessions) >= self.MAX_SESSIONS:
                self.sessions.pop(next(iter(self.sessions)))
            session = uuid.uuid4().hex
            self.sessions[session] = version
            return session

    def has_session(self, session: str) -> bool:
        return session in self.sessions

    def close_session(self, session: str) -> bool:
        with self.lock:
            return self.sessions.pop(session, None) is not None

    # -- messages --
    def handle(self, msg, session: str = "", client_gone: Callable[[], bool] | None = None,
               progress: bool = False, access: dict | None = None) -> Iterator[dict]:
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
            yield jsonrpc_error(msg.get("id") if isinstance(msg, dict) else None, -32600,
                                "invalid request: expected a JSON-RPC 2.0 object")
            return
        method, msg_id = msg.get("method"), msg.get("id")
        if method is None and ("result" in msg or "error" in msg):
            return  # a response to a server request; we send none, so nothing to do
        if not isinstance(method, str) or ("id" in msg and (isinstance(msg_id, bool) or
                                                           not isinstance(msg_id, (str, int)))):
            yield jsonrpc_error(msg_id if isinstance(msg_id, (str, int)) else None, -32600,
                                "invalid request: 'method' must be a string and 'id' a string or integer")
            return
        params = msg.get("params", {})
        if "id" not in msg:
            self.notification(method, params if isinstance(params, dict) else {}, session)
            return
        try:
            if not isinstance(params, dict):
                raise McpError(-32602, "'params' must be an object")
            if method == "tools/call":
                yield from self.call_tool(msg_id, params, session, client_gone, progress, access)
                return
            yield {"jsonrpc": "2.0", "id": msg_id, "result": self.dispatch(method, params)}
        except McpError as exc:
            yield jsonrpc_error(msg_id, exc.code, exc.message)

    def dispatch(self, method: str, params: dict) -> dict:
        if method == "initialize":
            asked = params.get("protocolVersion")
            return {"protocolVersion": asked if asked in MCP_PROTOCOL_VERSIONS else MCP_PROTOCOL_VERSIONS[-1],
                    "capabilities": {"tools": {"listChanged": False}},
                    "serverInfo": {"name": "hcx-server", "title": "HyperCLOVA X SEED Vision (local)",
                                   "version": __version__},
                    "instructions": f"Call {TOOL_NAME} to ask the local vision-language model about an image."}
        if method == "ping":
            return {}
        if method == "tools/list":
            return {"tools": [tool_definition(self.engine.cfg, self.stdio)]}
        raise McpError(-32601, f"method not found: {method}")

    def notification(self, method: str, params: dict, session: str) -> None:
        if method == "notifications/cancelled":
            with self.lock:
                pieces = self.inflight.get((session, json.dumps(params.get("requestId"))))
            if pieces is not None:
                log.info("MCP request %s cancelled by the client", params.get("requestId"))
                pieces.cancel()

    def call_tool(self, msg_id, params: dict, session: str, client_gone, progress: bool,
                  access: dict | None = None) -> Iterator[dict]:
        """Run the tool; input problems and busy/not-ready are tool errors (isError), not transport errors."""
        if params.get("name") != TOOL_NAME:
            raise McpError(-32602, f"unknown tool: {params.get('name')!r} (this server has {TOOL_NAME!r})")
        arguments = params.get("arguments", {})
        if not isinstance(arguments, dict):
            raise McpError(-32602, "'arguments' must be an object")
        meta = params.get("_meta")
        token = meta.get("progressToken") if progress and isinstance(meta, dict) else None
        try:
            if self.stdio:
                self.engine.wait_ready()
            pieces = stream(self.engine, prompt_request(arguments, self.engine.cfg, self.stdio), client_gone)
        except InputError as exc:
            yield {"jsonrpc": "2.0", "id": msg_id, "result": tool_result(f"invalid input: {exc.message}", True)}
            return
        except (Busy, ModelNotReady, ModelLoadError) as exc:
            yield {"jsonrpc": "2.0", "id": msg_id, "result": tool_result(str(exc), True)}
            return
        key = (session, json.dumps(msg_id))
        with self.lock:
            self.inflight[key] = pieces
        text = []
        try:
            for piece in pieces:
                text.append(piece)
                if token is not None:
                    yield {"jsonrpc": "2.0", "method": "notifications/progress",
                           "params": {"progressToken": token, "progress": pieces.tokens,
                                      "total": pieces.job.max_new_tokens,
                                      "message": f"{pieces.tokens} tokens generated"}}
        except GenerationError as exc:
            yield {"jsonrpc": "2.0", "id": msg_id, "result": tool_result(str(exc), True)}
            return
        finally:
            with self.lock:
                self.inflight.pop(key, None)
            pieces.cancel()
            record_completion(access, pieces.completion)
        if pieces.completion.finish_reason == "cancelled":
            yield jsonrpc_error(msg_id, -32800, "request cancelled")
            return
        yield {"jsonrpc": "2.0", "id": msg_id, "result": tool_result("".join(text))}


def mcp_http(mcp: McpServer) -> Response:
    """Streamable HTTP: one POSTed message (or a 2025-03-26 batch) -> JSON, SSE, or 202."""
    version = request.headers.get("MCP-Protocol-Version")
    if version is not None and version not in MCP_PROTOCOL_VERSIONS:
        return mcp_json(jsonrpc_error(None, -32600, f"unsupported MCP-Protocol-Version {version!r}; supported: "
                                                    f"{', '.join(MCP_PROTOCOL_VERSIONS)}"), 400)
    session = request.headers.get("Mcp-Session-Id")
    if session is not None and not mcp.has_session(session):
        return mcp_json(jsonrpc_error(None, -32001, "unknown or expired session; initialize again"), 404)
    try:
        message = parse_json(request.get_data(cache=True))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return mcp_json(jsonrpc_error(None, -32700, f"parse error: {exc}"), 400)
    gone, access = client_gone_check(), g.get("access")
    if isinstance(message, list):
        if not message:
            return mcp_json(jsonrpc_error(None, -32600, "invalid request: empty batch"), 400)
        replies = [reply for m in message for reply in mcp.handle(m, session or "", gone, access=access)]
        return mcp_json(replies, 200) if replies else Response(status=202)
    if isinstance(message, dict) and message.get("method") == "initialize" and "id" in message:
        reply = next(mcp.handle(message, "", gone))
        response = mcp_json(reply, 200)
        if "result" in reply:
            response.headers["Mcp-Session-Id"] = mcp.open_session(reply["result"]["protocolVersion"])
        return response
    params = message.get("params") if isinstance(message, dict) else None
    meta = params.get("_meta") if isinstance(params, dict) else None
    wants_progress = ("text/event-stream" in request.headers.get("Accept", "") and isinstance(meta, dict)
                      and message.get("method") == "tools/call" and "progressToken" in meta)
    replies = mcp.handle(message, session or "", gone, progress=wants_progress, access=access)
    if wants_progress:
        events = (f"event: message\ndata: {json.dumps(r, ensure_ascii=False)}\n\n" for r in replies)
        return streaming_response(events, "text/event-stream")  # closing it closes call_tool: cancels
    replies = list(replies)
    if not replies:
        return Response(status=202)
    reply = replies[-1]
    status = 400 if "error" in reply and reply["error"]["code"] in (-32600, -32700) else 200
    return mcp_json(reply, status)


def mcp_json(body, status: int) -> Response:
    response = Response(json.dumps(body, ensure_ascii=False), status=status, mimetype="application/json")
    return response


# -- security: Origin / CORS and the API key, for every route --------------------------------

CORS_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Mcp-Session-Id, MCP-Protocol-Version, "
                                    "Last-Event-ID, X-Request-Id",
    "Access-Control-Expose-Headers": "Mcp-Session-Id, Retry-After, X-Request-Id",
    "Access-Control-Max-Age": "600",
}


def origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    origin = origin.rstrip("/").lower()
    for entry in allowed:
        entry = entry.lower()
        if entry == "*" or entry == origin:
            return True
        if entry.endswith(":*"):
            base = entry[:-2]
            if origin == base or (origin.startswith(base + ":") and origin[len(base) + 1:].isdigit()):
                return True
    return False


def register_security(app: Flask, engine: Engine) -> None:
    """403 for a foreign Origin (DNS-rebinding guard, as MCP requires), CORS for allowed ones, Bearer
    auth, and 503 for new work once SIGTERM asked the worker to drain."""
    import hmac

    cfg = engine.cfg

    @app.before_request
    def check_origin_and_key():
        origin = request.headers.get("Origin")
        if origin is not None and not origin_allowed(origin, cfg.allowed_origins):
            return error_response(403, f"origin {origin!r} is not allowed", "set ALLOWED_ORIGINS to allow it",
                                  code="origin_not_allowed")
        if request.method == "OPTIONS":
            return Response(status=204)
        if cfg.api_key and request.path != "/health":
            header = request.headers.get("Authorization", "")
            scheme, _, key = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), cfg.api_key.encode()):
                return error_response(401, "missing or wrong API key",
                                      "send the header 'Authorization: Bearer <API_KEY>'", code="invalid_api_key")
        if engine.draining and request.path != "/health":
            return error_response(503, "server is shutting down", code="shutting_down", retry_after=5)
        return None

    @app.after_request
    def add_cors(response: Response):
        origin = request.headers.get("Origin")
        if origin is not None and origin_allowed(origin, cfg.allowed_origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.add("Vary", "Origin")
            if request.method == "OPTIONS":
                response.headers.update(CORS_HEADERS)
            else:
                response.headers["Access-Control-Expose-Headers"] = CORS_HEADERS["Access-Control-Expose-Headers"]
        return response


# -- routes -----------------------------------------------------------------------------------


def register_routes(app: Flask, engine: Engine) -> None:
    cfg = engine.cfg
    mcp = McpServer(engine)
    app.extensions["hcx_mcp"] = mcp

    @app.post("/tool/generate_hyperclovax_vision")
    def seed_generate():
        body = read_json_body()
        streaming = wants_stream(body)
        req = prompt_request(body, cfg)
        note_prompt(cfg, req)
        if streaming:
            return text_stream_response(stream(engine, req, client_gone_check()))
        completion = generate(engine, req, client_gone_check())
        record_completion(g.get("access"), completion)
        return jsonify(result=completion.text)

    @app.post("/tool/generate_hyperclovax_vision_stream")
    def seed_generate_stream():
        req = prompt_request(read_json_body(), cfg)
        note_prompt(cfg, req)
        return text_stream_response(stream(engine, req, client_gone_check()))

    @app.post("/v1/chat/completions")
    def chat_completions():
        body = read_json_body()
        streaming = wants_stream(body, allow_query=False)
        include_usage = stream_options(body, streaming)
        req = openai_request(body, cfg)
        note_prompt(cfg, req)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if streaming:
            pieces = stream(engine, req, client_gone_check())
            events = chat_completion_chunks(pieces, completion_id, created, cfg.served_model_name, include_usage,
                                            g.get("access"))
            return streaming_response(events, "text/event-stream", pieces)
        completion = generate(engine, req, client_gone_check())
        record_completion(g.get("access"), completion)
        return jsonify(chat_completion(completion, completion_id, created, cfg.served_model_name))

    @app.get("/v1/models")
    def list_models():
        return jsonify(object="list", data=[model_card(cfg)])

    @app.get("/v1/models/<path:model_id>")
    def get_model(model_id: str):
        if model_id != cfg.served_model_name:
            raise InputError(f"model {model_id!r} is not served here (this server has {cfg.served_model_name!r})",
                             status=404, param="model", code="model_not_found")
        return jsonify(model_card(cfg))

    @app.route("/mcp", methods=["GET", "POST", "DELETE"], strict_slashes=False)
    def mcp_endpoint():
        if request.method == "GET":  # no server-initiated stream; Caret and the SDKs treat 405 as "none"
            response = error_response(405, "this server offers no GET stream; POST JSON-RPC messages")
            response.headers["Allow"] = "POST, DELETE"
            return response
        if request.method == "DELETE":
            session = request.headers.get("Mcp-Session-Id")
            if session is None:
                return error_response(400, "Mcp-Session-Id header is required to end a session")
            return Response(status=200) if mcp.close_session(session) else error_response(404, "unknown session")
        return mcp_http(mcp)

    @app.get("/metrics")
    def metrics_text():
        return Response(app.extensions["hcx_metrics"].render(engine), mimetype="text/plain; version=0.0.4")

    @app.get("/health")
    def health():
        if engine.draining:
            return jsonify(status="draining"), 503
        if engine.state == "loading":
            return jsonify(status="loading"), 503
        if engine.state == "error":
            return jsonify(status="error", error=engine.error), 503
        m = engine.model
        return jsonify(status="ok", model=m.name, device=str(m.device), dtype=str(m.dtype).replace("torch.", ""),
                       kind=m.kind, backend=m.generation_backend, weights=m.weights, kernel=m.kernel, demo=m.demo,
                       context_length=m.context_length,
                       queue_depth=engine.queue_depth, max_queue=cfg.max_queue,
                       **({"note": "DEMO MODE: tiny random-weight model, answers are gibberish"} if m.demo else {}))


def model_card(cfg: Config) -> dict:
    return {"id": cfg.served_model_name, "object": "model", "created": 0, "owned_by": "hcx-server"}


# -- observability: access log and Prometheus metrics -----------------------------------------


class Histogram:
    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

    def __init__(self):
        self.counts = [0] * len(self.BUCKETS)
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.BUCKETS):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def render(self, name: str, labels: str = "") -> list[str]:
        sep, own = ("," if labels else ""), (f"{{{labels}}}" if labels else "")
        lines = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.BUCKETS, self.counts)]
        lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        lines += [f"{name}_sum{own} {self.total:.6f}", f"{name}_count{own} {self.count}"]
        return lines


class Metrics:
    """Prometheus text format without a dependency: request counters, TTFT and duration histograms."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.durations: dict[str, Histogram] = {}
        self.ttft = Histogram()
        self.prompt_tokens = 0
        self.in_flight = 0

    def started(self) -> None:
        with self.lock:
            self.in_flight += 1

    def finished(self, route: str, method: str, status: int, seconds: float, access: dict) -> None:
        with self.lock:
            self.in_flight -= 1
            key = (route, method, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.durations.setdefault(route, Histogram()).observe(seconds)
            if "ttft_ms" in access:
                self.ttft.observe(access["ttft_ms"] / 1000)
                self.prompt_tokens += access.get("tokens_in", 0)

    def render(self, engine: Engine) -> str:
        stats = engine.stats
        with self.lock:
            lines = ["# HELP hcx_requests_total HTTP requests by route, method and status.",
                     "# TYPE hcx_requests_total counter"]
            lines += [f'hcx_requests_total{{route="{r}",method="{m}",status="{s}"}} {n}'
                      for (r, m, s), n in sorted(self.requests.items())]
            lines += ["# HELP hcx_request_duration_seconds Time from request to the last byte sent.",
                      "# TYPE hcx_request_duration_seconds histogram"]
            for route, histogram in sorted(self.durations.items()):
                lines += histogram.render("hcx_request_duration_seconds", f'route="{route}"')
            lines += ["# HELP hcx_time_to_first_token_seconds Queue wait + prefill, per generation.",
                      "# TYPE hcx_time_to_first_token_seconds histogram", *self.ttft.render("hcx_time_to_first_token_seconds"),
                      "# HELP hcx_requests_in_flight HTTP requests being served now.",
                      "# TYPE hcx_requests_in_flight gauge", f"hcx_requests_in_flight {self.in_flight}",
                      "# TYPE hcx_prompt_tokens_total counter", f"hcx_prompt_tokens_total {self.prompt_tokens}"]
        lines += ["# HELP hcx_tokens_generated_total Tokens produced by the model (cancelled work included).",
                  "# TYPE hcx_tokens_generated_total counter", f"hcx_tokens_generated_total {stats['tokens_generated']}",
                  "# HELP hcx_generations_total Finished generations by outcome.",
                  "# TYPE hcx_generations_total counter"]
        lines += [f'hcx_generations_total{{outcome="{k[5:]}"}} {v}' for k, v in stats.items() if k.startswith("jobs_")]
        lines += ["# HELP hcx_queue_depth Requests waiting for the model.", "# TYPE hcx_queue_depth gauge",
                  f"hcx_queue_depth {engine.queue_depth}",
                  "# HELP hcx_generating 1 while the model is generating.", "# TYPE hcx_generating gauge",
                  f"hcx_generating {int(engine.running is not None)}",
                  "# HELP hcx_model_ready 1 once the model is loaded.", "# TYPE hcx_model_ready gauge",
                  f"hcx_model_ready {int(engine.state == 'ready')}"]
        return "\n".join(lines) + "\n"


def note_prompt(cfg: Config, req: GenerationRequest) -> None:
    """Prompt text reaches the log only with LOG_PROMPTS=1; images never do."""
    if cfg.log_prompts and g.get("access") is not None:
        g.access["prompt"] = json.dumps(req.messages[-1].text[:500], ensure_ascii=False)


def register_observability(app: Flask, metrics: Metrics) -> None:
    """One access line per request when its response closes (streams included), plus metrics."""
    import socket

    @app.before_request
    def start_timer():
        g.access = {"id": request.headers.get("X-Request-Id") or uuid.uuid4().hex[:12],
                    "started": time.perf_counter()}
        metrics.started()
        sock = request.environ.get("gunicorn.socket")
        if sock is not None:  # stream chunks leave at once instead of waiting on delayed ACKs
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    @app.after_request
    def log_on_close(response: Response):
        access = g.get("access")
        if access is None:
            return response
        response.headers["X-Request-Id"] = access["id"]
        method, path, status = request.method, request.path, response.status_code
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"

        def write():
            seconds = time.perf_counter() - access["started"]
            metrics.finished(route, method, status, seconds, access)
            extra = " ".join(f"{k}={v}" for k, v in access.items() if k not in ("id", "started"))
            log.info("access id=%s %s %s status=%d time_ms=%.1f %s", access["id"], method, path, status,
                     seconds * 1000, extra)

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
    app.extensions["hcx_metrics"] = Metrics()
    register_observability(app, app.extensions["hcx_metrics"])
    register_security(app, engine)
    register_errors(app)
    register_routes(app, engine)
    return app


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def drain_on_sigterm(worker) -> None:
    """gunicorn post_worker_init hook: on SIGTERM, refuse new work (503) while in-flight requests finish."""
    import signal

    engine = worker.wsgi.extensions["hcx_engine"]
    stop_worker = worker.handle_exit

    def handle_exit(sig, frame):
        engine.draining = True
        log.info("SIGTERM: finishing %s in-flight request(s), refusing new ones",
                 int(engine.running is not None) + engine.queue_depth)
        stop_worker(sig, frame)

    signal.signal(signal.SIGTERM, handle_exit)


def serve(cfg: Config) -> None:
    """gunicorn, ONE gthread worker (the model lives once), app built after the fork."""
    from gunicorn.app.base import BaseApplication

    class Server(BaseApplication):
        def load_config(self):
            options = {"bind": f"{cfg.host}:{cfg.port}", "workers": 1, "worker_class": "gthread",
                       "threads": cfg.worker_threads, "timeout": 120, "graceful_timeout": 30,
                       "keepalive": 5, "control_socket_disable": True, "accesslog": None,
                       "post_worker_init": drain_on_sigterm}
            for key, value in options.items():
                if key in self.cfg.settings:
                    self.cfg.set(key, value)

        def load(self):
            return create_app(cfg)

    setup_logging()
    if cfg.host not in LOOPBACK_HOSTS and not cfg.api_key and os.path.exists("/.dockerenv"):
        log.warning("binding %s inside a container without API_KEY: publish the port on 127.0.0.1 only "
                    "(the build_and_run scripts do) or set API_KEY", cfg.host)
    elif cfg.host not in LOOPBACK_HOSTS and not cfg.api_key:
        log.warning("!" * 78)
        log.warning("! binding %s WITHOUT an API key: anyone who can reach this port can use the model.", cfg.host)
        log.warning("! Set API_KEY (clients send 'Authorization: Bearer <key>') or bind HOST=127.0.0.1.")
        log.warning("!" * 78)
    if cfg.worker_threads < cfg.max_queue + 2:
        log.warning("THREADS=%d < MAX_QUEUE+2=%d: requests beyond the threads wait unbounded in gunicorn's backlog",
                    cfg.worker_threads, cfg.max_queue + 2)
    Server().run()


if __name__ == "__main__":
    setup_logging()
    try:
        serve(load_config())
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
