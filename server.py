"""hcx-server: a local inference server for HyperCLOVA X SEED Vision Instruct 3B.

One module, read top to bottom:
  1. Config            -- read once at start-up into one frozen object.
  2. Model loading     -- locate/download the weights, load the HCX remote-code path or the
                          generic transformers image-text-to-text path, the tiny demo model.
  3. Input building    -- validate every API's request (seed, OpenAI chat and Responses, Ollama
                          chat and generate, the MCP tool) into one GenerationRequest, decode
                          images (counted first, pixels budgeted from their headers), refuse text
                          that cannot fit before tokenizing it, turn a request into model tensors.
  4. Generation        -- one engine thread owns the model; MAX_QUEUE + 1 slots bound what it
                          takes; generate() and stream() share one code path (submit a job,
                          follow its tokens, detokenize safely); with BACKEND=openai an
                          UpstreamPool with the same interface streams the text from a fleet of
                          OpenAI-compatible servers (vLLM) instead.
  5. HTTP routes       -- one subsection per API family: the seed REST contract, the OpenAI API
                          (/v1: chat completions, Responses, models), the Ollama API (/api), MCP
                          (JSON-RPC, both protocol eras, also over stdio by the CLI); Host, CORS
                          and auth, /health (and the upstreams' state), metrics, the browser
                          playground at / (its files live in static/). Routes never touch torch.
  6. App factory       -- create_app(config), the SIGTERM drain, and the gunicorn runner: ONE
                          gthread worker that reads each whole request before a thread gets it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import errno
import functools
import hashlib
import inspect
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
# trust_remote_code runs the model's own code, so downloads are pinned to one commit. Both code
# revisions in users' hands are served (section 2: hcx-v1, the first upload 42c6bee with its
# load_images_videos() preprocessor; hcx-v2, "New Processor, Model for vLLM" and later, with
# HCXProcessor); the default pin is the one full v2 commit id known. A short commit id (e.g.
# MODEL_REVISION=42c6bee) is expanded against the repo's history before download.
HCX_REVISION = "a78900bdac94cabc4648fe42c9ed31c3f4d522bd"
DEMO_MODEL_NAME = "hcx-demo-tiny-random"
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
VISION_DTYPE_CHOICES = ("auto", "float32")
# auto: "static" on CUDA, "gemv" (our CPU kernels, kernels/*.cpp) on CPUs with AVX2 or AVX-512 running bf16
# or int8 weights, else "eager" (all three our own decode loop); "hf" = plain model.generate, also picked
# for a model our loop cannot drive. See section 4.
GENERATION_BACKEND_CHOICES = ("auto", "static", "gemv", "eager", "hf")
# local: this process loads the model; openai: no model here, every API is served by OpenAI-compatible
# upstreams (vLLM replicas serving this model, or other hcx-servers), see section 4's UpstreamPool.
BACKEND_CHOICES = ("local", "openai")
# Which of our CPU kernels runs one-row products: auto = the best this CPU runs (AVX-512, else AVX2),
# or forced (a variant the CPU lacks falls back to auto with a warning); torch = torch's own.
CPU_KERNEL_CHOICES = ("auto", "avx512", "avx2", "torch")
# auto: the decoder's linear layers keep DTYPE; int8: weight-only int8 (CPU), quantized at load.
WEIGHTS_CHOICES = ("auto", "int8")


# Browser pages served from these origins may call the API; ":*" means any port, "scheme://*" any
# host of that scheme (VS Code webviews are vscode-webview://<random id>).
DEFAULT_ALLOWED_ORIGINS = ("http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*",
                           "https://localhost:*", "https://127.0.0.1:*", "https://[::1]:*")
# HOST values that bind loopback only, and the names a Host header may then carry (any port): a
# DNS-rebinding page reaches a loopback server under its own name, which is refused (403).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
LOOPBACK_HOST_NAMES = ("localhost", "127.0.0.1", "[::1]")
# The default MAX_TOTAL_PIXELS is MAX_IMAGES times this. The model sees at most 9 grids of 378 px
# (1.29 MP) per image, but users send screenshots and photos larger than that (a 5K screenshot is
# 14.7 MP, a phone photo 12 MP) and the processor downsizes them; 16 MP each takes those at full
# size while one request's decoded RGB pixels stay under 48 MB per image (192 MB for MAX_IMAGES=4;
# one MAX_IMAGE_PIXELS-sized image still fits alone).
PIXELS_PER_IMAGE_BUDGET = 16_000_000


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
    max_total_pixels: int = 0  # 0: MAX_IMAGES x PIXELS_PER_IMAGE_BUDGET
    read_timeout: float = 30.0  # seconds a client has to send one whole request (head and body)
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
    allowed_hosts: tuple[str, ...] = ()  # (): loopback names on a loopback bind, any host otherwise
    demo: bool = False
    demo_dir: str = ""
    backend: str = "local"
    upstream_urls: tuple[str, ...] = ()  # OpenAI base URLs (".../v1") of the upstreams (BACKEND=openai)
    upstream_api_key: str | None = None
    upstream_model: str = ""  # "": the first id of each upstream's /v1/models
    upstream_timeout: float = 120.0  # longest wait for an upstream's next bytes (see section 4)

    @property
    def capacity(self) -> int:
        """Requests taken at once: the generating one + MAX_QUEUE waiting, or with BACKEND=openai
        MAX_QUEUE (at least 1) in flight per upstream; more get 503 + Retry-After."""
        if self.backend == "openai":
            return max(self.max_queue, 1) * len(self.upstream_urls)
        return self.max_queue + 1

    @property
    def worker_threads(self) -> int:
        """gunicorn threads: every request the server takes at once + plenty of room for /health and
        quick answers. Threads are cheap and the queue, not the threads, bounds generations; slow
        clients hold none (the worker reads whole requests before a thread gets one, section 6)."""
        return self.threads or self.capacity + 31

    @property
    def pixel_budget(self) -> int:
        """Decoded pixels one request may hold, all its images together."""
        return self.max_total_pixels or self.max_images * PIXELS_PER_IMAGE_BUDGET

    @property
    def host_allowlist(self) -> tuple[str, ...]:
        """Host header names accepted (lowercase, IPv6 in brackets, any port; "*" = any)."""
        if self.allowed_hosts:
            return self.allowed_hosts
        return LOOPBACK_HOST_NAMES if self.host in LOOPBACK_HOSTS else ("*",)

    @property
    def served_model_name(self) -> str:
        if self.backend == "openai":
            return self.upstream_model or self.model_path.rstrip("/\\").split("/")[-1]
        return DEMO_MODEL_NAME if self.demo else self.model_path.rstrip("/\\").split("/")[-1]


def _env_str(env: Mapping[str, str], key: str, default: str) -> str:
    value = env.get(key)
    return default if value is None or value.strip() == "" else value.strip()


def _env_number(env: Mapping[str, str], key: str, default, lo, hi, parse: Callable, expected: str):
    """A number in [lo, hi] (NaN fails the range too), else one ConfigError line saying what was expected."""
    raw = _env_str(env, key, str(default))
    try:
        value = parse(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not valid: expected {expected}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{key}={raw} is out of range: expected {expected}")
    return value


def _env_int(env: Mapping[str, str], key: str, default: int, lo: int, hi: int) -> int:
    return _env_number(env, key, default, lo, hi, int, f"an integer from {lo} to {hi}")


def _env_float(env: Mapping[str, str], key: str, default: float, lo: float, hi: float) -> float:
    return _env_number(env, key, default, lo, hi, float, f"a number of seconds from {lo:g} to {hi:g}")


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
            raise ConfigError(f"ALLOWED_ORIGINS entry {origin!r} is not valid: expected '*', "
                              "scheme://host[:port|:*] or scheme://*, comma-separated")
    return origins


def upstream_base_url(url: str, key: str = "UPSTREAM_URLS entry", append_v1: bool = False) -> str:
    """An OpenAI client's base_url: http(s)://host[:port][/path], no trailing slash. A bare host gets
    /v1 (where vLLM and hcx-server serve the API); `append_v1` (hcx-cli --url, a server's address)
    adds /v1 to any path that does not already end with it."""
    from urllib.parse import urlsplit

    text = url.strip()
    problem = f"{key} {text!r} is not valid: expected http(s)://host[:port]/v1 (an OpenAI base URL)"
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        raise ConfigError(problem) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment \
            or re.search(r"\s", text):
        raise ConfigError(problem)
    path = parts.path.rstrip("/")
    if not path or (append_v1 and not path.endswith("/v1")):
        path += "/v1"
    return f"{parts.scheme}://{parts.netloc}{path}"


def _env_upstreams(env: Mapping[str, str], backend: str) -> tuple[str, ...]:
    entries = [e for e in _env_str(env, "UPSTREAM_URLS", "").split(",") if e.strip()]
    urls = tuple(upstream_base_url(e) for e in entries)
    if backend == "openai" and not urls:
        raise ConfigError("BACKEND=openai needs UPSTREAM_URLS: comma-separated base URLs of OpenAI-compatible "
                          "servers serving this model, e.g. http://gpu-node-1:8000/v1")
    if len(set(urls)) != len(urls):
        raise ConfigError(f"UPSTREAM_URLS lists an upstream twice: {', '.join(urls)}")
    return urls


def _env_hosts(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = _env_str(env, "ALLOWED_HOSTS", "")
    hosts = tuple(h.strip().lower().rstrip(".") for h in raw.split(",") if h.strip())
    for host in hosts:
        if host != "*" and not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\]", host):
            raise ConfigError(f"ALLOWED_HOSTS entry {host!r} is not valid: expected '*', a host name or IP "
                              "address (IPv6 in brackets, no port), comma-separated")
    return hosts


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
    backend = _env_choice(env, "BACKEND", "local", BACKEND_CHOICES)
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
        max_total_pixels=_env_int(env, "MAX_TOTAL_PIXELS", 0, 0, 1 << 36),
        read_timeout=float(_env_int(env, "READ_TIMEOUT", 30, 1, 3600)),
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
        allowed_hosts=_env_hosts(env),
        demo=_env_bool(env, "DEMO", False),
        demo_dir=_env_str(env, "DEMO_MODEL_DIR", str(Path.home() / ".cache" / "hcx-server" / DEMO_MODEL_NAME)),
        backend=backend,
        upstream_urls=_env_upstreams(env, backend),
        upstream_api_key=_env_str(env, "UPSTREAM_API_KEY", "") or None,
        upstream_model=_env_str(env, "UPSTREAM_MODEL", ""),
        upstream_timeout=_env_float(env, "UPSTREAM_TIMEOUT", 120.0, 0.1, 3600.0),
    )
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def project_folder(folder: str, marker: str) -> Path:
    """One of this project's data folders (static/, kernels/): beside server.py in a checkout or an
    editable install, else where `pip install .` put it, the data package hcx_server_<folder>
    (pyproject.toml); found by the import system, so a namespace portion of it works too."""
    import importlib.util

    beside = Path(__file__).with_name(folder)
    if (beside / marker).is_file():
        return beside
    spec = importlib.util.find_spec(f"hcx_server_{folder}")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(location) / marker).is_file():
            return Path(location)
    raise FileNotFoundError(f"this installation of hcx-server lacks its {folder}/ folder ({marker})")


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

    kind: str  # "hcx" (remote code), "generic" (image-text-to-text) or "text" (a causal LM, no vision)
    interface: str  # "hcx-v1", "hcx-v2", "generic" or "text": how inputs are built (section 3)
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
    revision: str | None = None  # the commit the folder's files came from, when it can be told
    image_token_id: int | None = None
    demo: bool = False
    load_seconds: float = 0.0
    generation_backend: str = "eager"  # what runs: "eager", "gemv", "static" or "hf" (section 4)
    note: str = ""  # shown in /health (demo mode, text-only model)
    decoder: Any = None  # the causal LM our decode loop runs (section 4)
    body: Any = None  # its decoder body, where the multimodal front hands over the prompt embeddings
    keep_last_logits: bool = False  # the decoder takes logits_to_keep=1
    static: Any = None  # StaticDecode: the static KV cache (and compiled step) made at load
    grammar_tokenizer: Any = None  # llguidance's tokenizer, made on the first structured-output request
    max_token_chars: int = 0  # characters one token stands for at most; 0 = unknown (longest_token_chars)
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


def needs_download(folder: Path) -> bool:
    """Missing or empty, or an interrupted hub download (its .cache/huggingface marker): fill or
    resume it. Any other folder is the user's: it is checked, never overwritten."""
    if not folder.is_dir():
        return True
    entries = [p for p in folder.iterdir() if p.name not in (".cache", ".gitattributes")]
    return not entries or (not has_model_files(folder) and (folder / ".cache" / "huggingface").is_dir())


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
        warn_if_unpinned(cfg.model_revision)
        return Path(download_model(path, cfg.model_revision, cfg.hf_token, cache_dir=cfg.cache_dir))
    folder = Path(os.path.expanduser(path))
    if folder.exists() and not folder.is_dir():
        if folder.suffix.lower() == ".gguf":
            raise ModelLoadError(gguf_message(path))
        raise ModelLoadError(f"MODEL_PATH={path} is a file, not a model folder")
    if not needs_download(folder):
        return folder
    log.info("MODEL_PATH=%s holds no model yet: downloading %s into it", path, cfg.model_id)
    warn_if_unpinned(cfg.model_revision)
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


def warn_if_unpinned(revision: str) -> None:
    """A branch or tag (MODEL_REVISION=main) moves: the model's remote code would run unpinned."""
    if not re.fullmatch(r"[0-9a-f]{7,40}", revision):
        log.warning("MODEL_REVISION=%s is not a commit id: the model's remote code (trust_remote_code) then runs "
                    "UNPINNED, whatever that branch holds when it is downloaded; pin a commit id instead", revision)


# -- what a model folder holds: checked before loading, one line per problem ----------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class ModelFolder:
    """What the files of a model folder say, before any weights are read."""

    path: Path
    kind: str  # hcx | generic | text
    interface: str  # hcx-v1 | hcx-v2 | generic | text
    revision: str | None
    config: dict


def gguf_message(where: str) -> str:
    return (f"{where} is a GGUF file (for llama.cpp / Ollama); hcx-server loads the Hugging Face folder "
            f"(config.json + *.safetensors), e.g. `hcx-cli download` of {HCX_HUB_ID}")


def read_json_file(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return value


def safetensors_complete(path: Path) -> str | None:
    """None when the file holds every byte its header promises, else what is wrong (a cut download)."""
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, 100 << 20):
                return f"{path.name} is truncated or not a safetensors file"
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError) as exc:
        return f"{path.name} cannot be read ({exc})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size < 8 + header_len + end:
        return f"{path.name} is truncated: {size} of {8 + header_len + end} bytes"
    return None


def check_weights(folder: Path) -> None:
    """Every shard the index lists is present and whole; a folder of GGUF files is named as such."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        shards = sorted(set(read_json_file(indexes[0]).get("weight_map", {}).values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise ModelLoadError(f"{folder} is a partial download: {len(missing)} of {len(shards)} weight shards "
                                 f"listed in {indexes[0].name} are missing ({', '.join(missing[:3])}"
                                 f"{', ...' if len(missing) > 3 else ''}); run `hcx-cli download` to complete it")
        files = [folder / name for name in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    for path in files:
        problem = safetensors_complete(path)
        if problem:
            raise ModelLoadError(f"{folder} is a partial download: {problem}; run `hcx-cli download` to complete it")
    if files or any(folder.glob("*.bin")):
        return
    ggufs = sorted(folder.glob("*.gguf"))
    if ggufs:
        raise ModelLoadError(gguf_message(str(ggufs[0])))
    raise ModelLoadError(f"{folder} holds no weights (*.safetensors or *.bin)")


def folder_revision(folder: Path) -> str | None:
    """The commit a folder came from: a hub cache snapshot's name, or the metadata a hub download
    into a folder leaves in .cache/huggingface/download."""
    for part in folder.resolve().parts[::-1]:
        if re.fullmatch(r"[0-9a-f]{40}", part):
            return part
    for meta in sorted((folder / ".cache" / "huggingface" / "download").glob("*.metadata")):
        try:
            first = meta.read_text(encoding="utf-8").split("\n", 1)[0].strip()
        except OSError:
            continue
        if re.fullmatch(r"[0-9a-f]{40}", first):
            return first
    return None


def hcx_interface(folder: Path) -> str:
    """v2 ("New Processor, Model for vLLM"): processor_config.json maps AutoProcessor to
    processing_hyperclovax.HCXProcessor; v1 (first upload): the preprocessor with load_images_videos."""
    processor_config = folder / "processor_config.json"
    if processor_config.is_file():
        target = str(read_json_file(processor_config).get("auto_map", {}).get("AutoProcessor", ""))
        if target.split("--")[-1].startswith("processing_hyperclovax."):
            return "hcx-v2"
    return "hcx-v2" if (folder / "processing_hyperclovax.py").is_file() else "hcx-v1"


def remote_code_modules(folder: Path, config: dict) -> list[str]:
    """The .py files the auto_maps name (config.json and the processor configs)."""
    maps = [config.get("auto_map", {})]
    maps += [read_json_file(folder / name).get("auto_map", {}) for name in PROCESSOR_FILES if (folder / name).is_file()]
    targets = [t for m in maps if isinstance(m, dict) for v in m.values() for t in (v if isinstance(v, list) else [v])]
    return sorted({f"{t.split('--')[-1].rsplit('.', 1)[0]}.py" for t in targets if isinstance(t, str) and "." in t})


def is_vision_config(config: dict) -> bool:
    return bool(config.get("vision_config")) or any(
        re.search(r"(ConditionalGeneration|ImageTextToText|Vision)", a) for a in config.get("architectures") or [])


def inspect_model_folder(folder: Path) -> ModelFolder:
    """Fail at start-up with one line naming what is wrong with a broken or foreign folder."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            raise ModelLoadError(gguf_message(str(ggufs[0])))
        raise ModelLoadError(f"{folder} has no config.json: not a Hugging Face model folder, or an incomplete "
                             "download (run `hcx-cli download`)")
    config = read_json_file(config_path)
    check_weights(folder)
    model_type = config.get("model_type")
    if model_type == "hyperclovax_vlm" or "HCXVisionForCausalLM" in (config.get("architectures") or []):
        kind = "hcx"
    elif "auto_map" in config or model_type in known_model_types():
        kind = "generic" if is_vision_config(config) else "text"
    else:
        raise ModelLoadError(f"{folder}/config.json has model_type {model_type!r}, which is neither HyperCLOVA X SEED "
                             f"Vision (hyperclovax_vlm) nor a model type transformers knows")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); the download is "
                             "incomplete: run `hcx-cli download`")
    if kind != "text" and not any((folder / name).is_file() for name in PROCESSOR_FILES):
        raise ModelLoadError(f"{folder} has no {' or '.join(PROCESSOR_FILES)}: the image preprocessing settings are "
                             "missing (incomplete download?)")
    missing = [name for name in remote_code_modules(folder, config) if not (folder / name).is_file()]
    if missing:
        raise ModelLoadError(f"{folder}: the model's code file(s) {', '.join(missing)} named in its auto_map are "
                             "missing (incomplete download?)")
    interface = hcx_interface(folder) if kind == "hcx" else kind
    return ModelFolder(folder, kind, interface, folder_revision(folder), config)


def known_model_types() -> frozenset[str]:
    from transformers import CONFIG_MAPPING

    return frozenset(CONFIG_MAPPING.keys())


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers 4.56 renamed torch_dtype to dtype; both load straight into the target dtype."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def load_hcx(folder: Path, dtype: torch.dtype):
    """The model's remote code: AutoModelForCausalLM + AutoProcessor (trust_remote_code)."""
    from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, low_cpu_mem_usage=True,
                                                 **dtype_kwarg(dtype))
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    tokenizer = getattr(processor, "tokenizer", None) or AutoTokenizer.from_pretrained(folder)
    return model, processor, tokenizer


def load_generic(folder: Path, dtype: torch.dtype):
    """Any transformers image-text-to-text model (LLaVA and friends), chat template included."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, low_cpu_mem_usage=True, **dtype_kwarg(dtype))
    processor = AutoProcessor.from_pretrained(folder, use_fast=False)  # fast ones need torchvision
    return model, processor, processor.tokenizer


def load_text(folder: Path, dtype: torch.dtype):
    """A causal LM without a vision part (e.g. the text-only HyperCLOVA X SEED models): text requests only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, low_cpu_mem_usage=True,
                                                 **dtype_kwarg(dtype))
    return model, None, AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


LOADERS = {"hcx": load_hcx, "generic": load_generic, "text": load_text}


def check_interface(info: ModelFolder, processor) -> None:
    """The processor must offer what its revision's input building calls (section 3)."""
    if info.interface == "hcx-v1" and not hasattr(processor, "load_images_videos"):
        raise ModelLoadError(f"{info.path}: the HCX processor ({type(processor).__name__}) has neither the first "
                             "revision's load_images_videos() nor the later processor_config.json (HCXProcessor)")
    if info.interface == "hcx-v2" and not callable(processor):
        raise ModelLoadError(f"{info.path}: the HCX processor ({type(processor).__name__}) is not callable as "
                             "processor(text=..., images=...)")


def image_token_id(model, tokenizer) -> int | None:
    """The image placeholder id: config.image_token_id (v2, LLaVA), img_start_id (v1), else <|dummy3|>."""
    config = model.config
    for key in ("image_token_id", "image_token_index", "img_start_id"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    token_id = tokenizer.convert_tokens_to_ids("<|dummy3|>")
    return token_id if isinstance(token_id, int) and token_id != tokenizer.unk_token_id else None


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


# Normalizers that never shrink a text by more than the factor given (NFC/NFKC compose at most 4
# code points into one); any other (Strip, BertNormalizer, a precompiled map, a regex) may delete.
SHRINK_FACTORS = {"NFC": 4, "NFKC": 4, "NFD": 1, "NFKD": 1, "Lowercase": 1, "Prepend": 1}


def _normalizer_shrink(node) -> int | None:
    """How many characters may become one under this normalizer (None: unbounded or unknown)."""
    if node is None:
        return 1
    kind = node.get("type")
    if kind == "Sequence":
        factor = 1
        for child in node.get("normalizers", []):
            child_factor = _normalizer_shrink(child)
            if child_factor is None:
                return None
            factor *= child_factor
        return factor
    if kind == "Replace":  # a plain string replaced by one at least as long (SentencePiece's " " -> "▁")
        pattern, content = node.get("pattern", {}).get("String"), node.get("content", "")
        return 1 if isinstance(pattern, str) and len(content) >= len(pattern) > 0 else None
    return SHRINK_FACTORS.get(kind)


def longest_token_chars(tokenizer) -> int:
    """The most characters one token can stand for, when the tokenizer bounds that: a BPE whose
    every input byte is a token (byte-level, or byte fallback) behind a normalizer that cannot
    delete text. Then a prompt longer than context x this cannot fit, which is found without
    tokenizing it (a 31 MB prompt took 86 s and 7.7 GB to tokenize). 0 when unknown."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return 0
    try:
        spec = json.loads(backend.to_str())
    except (ValueError, TypeError, AttributeError):
        return 0
    model = spec.get("model") or {}
    every_byte = model.get("byte_fallback") or "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    shrink = _normalizer_shrink(spec.get("normalizer"))
    if model.get("type") != "BPE" or not every_byte or shrink is None:
        return 0
    return shrink * max((len(token) for token in tokenizer.get_vocab()), default=0)


def load_model(cfg: Config) -> LoadedModel:
    """Locate (or download), check the folder, load with the target dtype directly, move to the device."""
    started = time.perf_counter()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg.dtype, device, cfg.generation_backend in ("auto", "gemv") or cfg.weights == "int8")
    info = inspect_model_folder(locate_model(cfg))
    log.info("loading %s (%s interface, revision %s) from %s on %s as %s", info.kind, info.interface,
             info.revision or "unknown", info.path, device, str(dtype).replace("torch.", ""))
    try:
        model, processor, tokenizer = LOADERS[info.kind](info.path, dtype)
    except ImportError as exc:
        raise ModelLoadError(f"the model's code needs a package that is not installed: {exc} "
                             "(pip install 'hcx-server[hcx]' installs timm and einops)") from None
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the model in {info.path}: {type(exc).__name__}: {exc}") from None
    check_interface(info, processor)
    model.to(device).eval()
    vision_dtype = dtype
    if cfg.vision_dtype == "float32" and dtype != torch.float32 and info.kind != "text":
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
    notes = ["DEMO MODE: tiny random-weight model, answers are gibberish"] if cfg.demo else []
    if info.kind == "text":
        notes.append("text-only model (no vision part): requests with images get a 400")
    loaded = LoadedModel(kind=info.kind, interface=info.interface, model=model, processor=processor,
                         tokenizer=tokenizer, name=cfg.served_model_name, path=str(info.path), device=device,
                         dtype=dtype, vision_dtype=vision_dtype, stop_token_ids=stops, pad_token_id=pad,
                         context_length=cfg.max_model_len or window, revision=info.revision,
                         image_token_id=image_token_id(model, tokenizer) if info.kind != "text" else None,
                         demo=cfg.demo, note="; ".join(notes), max_token_chars=longest_token_chars(tokenizer),
                         weights=weights)
    loaded.generation_backend = prepare_generation_backend(cfg, loaded)
    loaded.load_seconds = time.perf_counter() - started
    log.info("model ready in %.1f s: %s interface, revision %s, context %d tokens, stop ids %s, %s weights, "
             "%s generation, kernel %s", loaded.load_seconds, loaded.interface, loaded.revision or "unknown",
             loaded.context_length, list(stops), loaded.weights, loaded.generation_backend, loaded.kernel)
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
    constraint: Constraint | None = None  # structured output: the answer's grammar (JSON, tool calls)

    @property
    def image_count(self) -> int:
        return sum(len(m.images) for m in self.messages)


class ImageBudget:
    """What one request may decode, checked before any pixel is: its images were counted first
    (MAX_IMAGES, from the list lengths alone), and each image's pixels, read from its header, are
    added up before it is decoded (MAX_TOTAL_PIXELS). Without it 12 image parts of a 3 MB body
    were all decoded (3.7 GB) before the image count was checked."""

    def __init__(self, cfg: Config, count: int, param: str = "messages"):
        if count > cfg.max_images:
            raise too_many_images(cfg, count, param)
        self.cfg, self.pixels = cfg, 0

    def admit(self, width: int, height: int, param: str) -> None:
        self.pixels += width * height
        if self.pixels > self.cfg.pixel_budget:
            raise InputError(f"the images of this request add up to over {self.pixels} pixels, more than "
                             f"MAX_TOTAL_PIXELS={self.cfg.pixel_budget}", param=param, code="image_too_large")


def too_many_images(cfg: Config, count: int, param: str = "messages") -> InputError:
    return InputError(f"{count} images sent; at most MAX_IMAGES={cfg.max_images} per request", param=param,
                      code="too_many_images")


def count_image_parts(messages, parts: Mapping[str, str]) -> int:
    """Image parts in chat-style messages (content lists), counted without decoding anything."""
    if not isinstance(messages, list):
        return 0
    return sum(1 for message in messages if isinstance(message, dict) and isinstance(message.get("content"), list)
               for part in message["content"] if isinstance(part, dict) and parts.get(part.get("type")) == "image")


def decode_image(data: str, cfg: Config, param: str = "image_base64", budget: ImageBudget | None = None) -> Image.Image:
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
    return open_image(raw, cfg, param, budget)


def image_too_large(cfg: Config, param: str) -> InputError:
    return InputError(f"image is larger than MAX_IMAGE_BYTES={cfg.max_image_bytes} bytes", status=413,
                      param=param, code="image_too_large")


# Image.info key of the client's own encoded bytes, kept when they decode to exactly the pixels served
# (RGB, no EXIF rotation): an upstream is sent those rather than a re-encoded PNG (section 4).
SOURCE_BYTES = "hcx_source_bytes"
SOURCE_FORMATS = ("JPEG", "PNG", "WEBP")


def open_image(raw: bytes, cfg: Config, param: str = "image", budget: ImageBudget | None = None) -> Image.Image:
    """Open with Pillow, refuse bombs (and pixels over the request's budget) from the header before
    decoding, apply EXIF rotation in place, flatten to RGB (no copy of what already is RGB)."""
    if len(raw) > cfg.max_image_bytes:
        raise image_too_large(cfg, param)
    try:
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
            if width * height > cfg.max_image_pixels:
                raise InputError(f"image is {width}x{height} = {width * height} pixels, over "
                                 f"MAX_IMAGE_PIXELS={cfg.max_image_pixels}", param=param, code="image_too_large")
            if budget is not None:
                budget.admit(width, height, param)
            img.load()
            unchanged = (img.format in SOURCE_FORMATS and img.mode == "RGB" and "transparency" not in img.info
                         and img.getexif().get(0x0112, 1) == 1)
            source = (Image.MIME[img.format], raw) if unchanged else None
            ImageOps.exif_transpose(img, in_place=True)
            img = flatten_to_rgb(img)
            if source is not None:
                img.info[SOURCE_BYTES] = source
            return img
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
        rgba = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode == "RGB":  # decoded by Image.open: no file behind it any more, no copy needed
        return img
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


MAX_TOKENS_NAMES = ("max_tokens", "max_completion_tokens", "max_new_tokens")


def sampling_fields(body: Mapping, cfg: Config, max_names: tuple[str, ...] = MAX_TOKENS_NAMES) -> dict[str, Any]:
    """max_tokens, min_tokens, temperature, top_p, seed: the same bounds in every API (each API
    names its token limit its own way: `max_names`, the first one present wins)."""
    max_tokens = field_int(body, max_names[0], 1, cfg.max_tokens_cap, *max_names[1:])
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


def image_from_path(path: str, cfg: Config, param: str = "image_path",
                    budget: ImageBudget | None = None) -> Image.Image:
    """A local file (stdio MCP and the CLI run as the user, so reading their files is fine)."""
    try:
        raw = Path(os.path.expanduser(path)).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {param} {path!r}: {exc.strerror or exc}", param=param,
                         code="invalid_image") from None
    return open_image(raw, cfg, param, budget)


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
    with_b64 = bool(image_b64 and image_b64.strip())
    budget = ImageBudget(cfg, with_b64 + bool(image_path), "image_path" if image_path else "image_base64")
    images = [decode_image(image_b64, cfg, budget=budget)] if with_b64 else []
    if image_path:
        images.append(image_from_path(image_path, cfg, budget=budget))
    messages = with_system_prompt([Message("user", prompt, images)], cfg)
    constraint = json_constraint(schema_field(body["json_schema"], "json_schema"), "json_schema") \
        if body.get("json_schema") is not None else None
    return GenerationRequest(messages=messages, constraint=constraint, **sampling_fields(body, cfg))


# -- OpenAI chat completions --------------------------------------------------------------

OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# Fields that would change the answer's meaning if silently ignored: name -> "is this value unsupported?"
CHAT_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "functions": lambda v: bool(v), "function_call": lambda v: v not in (None, "none"),
    "logprobs": lambda v: v is not False, "top_logprobs": lambda v: bool(v), "logit_bias": lambda v: bool(v),
    "frequency_penalty": lambda v: v != 0, "presence_penalty": lambda v: v != 0,
    "audio": lambda v: True, "prediction": lambda v: True,
    "modalities": lambda v: v != ["text"],
}


def reject_unsupported(body: Mapping, checks: Mapping[str, Callable[[Any], bool]] = CHAT_UNSUPPORTED,
                       hints: Mapping[str, str] | None = None) -> None:
    """Fields that would change the answer's meaning if silently ignored are a 400 naming them."""
    for name, unsupported in checks.items():
        if body.get(name) is not None and unsupported(body[name]):
            hint = (hints or {}).get(name, "")
            raise InputError(f"'{name}' is not supported by this server{hint}", param=name,
                             code="unsupported_parameter")


def openai_stop(value, most: int = 4) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > most:
        raise InputError(f"'stop' must be a string or a list of at most {most} strings", param="stop",
                         code="invalid_type")
    return tuple(s for s in stops if s)


def image_from_url(url: str, cfg: Config, param: str, budget: ImageBudget | None = None) -> Image.Image:
    """data: URLs always; http(s) only when ALLOW_REMOTE_IMAGES=1 (and never to private addresses)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_image(url, cfg, param, budget)
    if scheme in ("http", "https"):
        if not cfg.allow_remote_images:
            raise InputError("remote image URLs are disabled: send a data:image/...;base64 URL "
                             "(or start the server with ALLOW_REMOTE_IMAGES=1)", param=param, code="invalid_image_url")
        return fetch_remote_image(url, cfg, param, budget=budget)
    raise InputError("image_url must be a data: URL (or http(s) with ALLOW_REMOTE_IMAGES=1)", param=param,
                     code="invalid_image_url")


def embedded_ipv4(address):
    """The IPv4 address an IPv6 one carries, if it is one of the forms that reach IPv4 hosts:
    mapped (::ffff:a.b.c.d), translated (::ffff:0:a.b.c.d), compatible (::a.b.c.d), NAT64
    (64:ff9b::/96), 6to4 (2002::/16) and Teredo (its client address)."""
    import ipaddress

    if address.version != 6:
        return None
    if address.ipv4_mapped or address.sixtofour:
        return address.ipv4_mapped or address.sixtofour
    if address.teredo:
        return address.teredo[1]
    value, low = int(address), ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    for prefix in ("::ffff:0:0:0/96", "64:ff9b::/96", "::/96"):
        if address in ipaddress.ip_network(prefix) and (prefix != "::/96" or value > 0xFFFF):
            return low
    return None


def is_blocked_address(address) -> bool:
    """Loopback, private, link-local, reserved, multicast -- also when an IPv6 form wraps such an
    IPv4 address (::127.0.0.1, 64:ff9b::7f00:1, 2002:7f00:1::, ...): never fetched (SSRF guard)."""
    import ipaddress

    inner = embedded_ipv4(address)
    if inner is not None and (not inner.is_global or inner.is_multicast):
        return True
    if address.version == 6 and address in ipaddress.ip_network("64:ff9b:1::/48"):  # local-use NAT64 (RFC 8215)
        return True
    return not address.is_global or address.is_multicast


def fetch_remote_image(url: str, cfg: Config, param: str = "image_url",
                       blocked: Callable[[Any], bool] = is_blocked_address,
                       budget: ImageBudget | None = None) -> Image.Image:
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
    return open_image(b"".join(chunks), cfg, param, budget)


CHAT_PARTS = {"text": "text", "image_url": "image"}  # content part type -> what it carries


def openai_message(index: int, message, cfg: Config, field: str = "messages",
                   parts: Mapping[str, str] = CHAT_PARTS, budget: ImageBudget | None = None) -> Message:
    """One chat-style message {role, content: str | [parts]} -> Message; the Responses API shares it
    with its own part names (`parts`) and field name (`input`)."""
    where = f"{field}[{index}]"
    if not isinstance(message, dict):
        raise InputError(f"{where} must be an object", param=where, code="invalid_type")
    role = message.get("role")
    if role == "tool" and field == "messages":
        return tool_result_message(message, where)
    if role not in OPENAI_ROLES:
        raise InputError(f"{where}.role must be one of system, developer, user, assistant{', tool' * (field == 'messages')}"
                         f" (got {role!r})", param=f"{where}.role", code="invalid_value")
    content = message.get("content")
    if role == "assistant" and message.get("tool_calls") and field == "messages":
        text = openai_message(index, {"role": "assistant", "content": content}, cfg, field, parts).text
        return Message("assistant", "\n".join(t for t in (text, rendered_tool_calls(message["tool_calls"], where)) if t))
    if isinstance(content, str):
        return Message(OPENAI_ROLES[role], content)
    if content is None and role == "assistant":
        return Message("assistant", "")
    if not isinstance(content, list):
        raise InputError(f"{where}.content must be a string or a list of parts", param=f"{where}.content",
                         code="invalid_type")
    text_part, image_part = (" or ".join(k for k, v in parts.items() if v == kind) for kind in ("text", "image"))
    texts, images = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = parts.get(part.get("type")) if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image" and role == "user":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                hint = "; file_id needs a Files API this server does not have" if part.get("file_id") else ""
                raise InputError(f"{at}.image_url must be a URL string{hint}", param=f"{at}.image_url",
                                 code="invalid_type")
            images.append(image_from_url(url, cfg, f"{at}.image_url", budget))
        else:
            raise InputError(f"{at} must be a text part ({text_part}) or, in a user message, an image part "
                             f"({image_part})", param=at, code="invalid_value")
    return Message(OPENAI_ROLES[role], "\n".join(texts), images)


def openai_request(body: Mapping, cfg: Config) -> GenerationRequest:
    """/v1/chat/completions body -> GenerationRequest (unsupported meaning-changing fields are 400s)."""
    reject_unsupported(body)
    if field_int(body, "n", 1, 2**31 - 1) not in (None, 1):
        raise InputError("only n=1 is supported", param="n", code="unsupported_parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InputError("'messages' must be a non-empty list", param="messages", code="invalid_value")
    budget = ImageBudget(cfg, count_image_parts(messages, CHAT_PARTS))
    parsed = [openai_message(i, m, cfg, budget=budget) for i, m in enumerate(messages)]
    if not any(m.role == "user" for m in parsed):
        raise InputError("'messages' needs at least one user message", param="messages", code="invalid_value")
    if field_str(body, "model") is None and "model" in body:
        raise InputError("'model' must be a string", param="model", code="invalid_type")
    constraint = chat_constraint(body)
    return GenerationRequest(messages=with_system_prompt(parsed, cfg), stop=openai_stop(body.get("stop")),
                             constraint=constraint, **sampling_fields(body, cfg))


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


# -- structured output: JSON schemas and tool calls -------------------------------------------
# Every API's way of asking for JSON (chat `response_format`, Responses `text.format`, Ollama
# `format`, the seed route's and the MCP tool's `json_schema`) and chat `tools` become one
# Constraint: a grammar for llguidance (a grammar engine built for byte-level BPE vocabularies).
# Section 4 applies it as a token mask before every sample, so the answer always parses; the
# prompt also tells the model what is wanted (a 3 B model fills a schema better when it sees it).

MAX_SCHEMA_BYTES = 64 * 1024
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # compact, one layout
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class Constraint:
    """What the answer must be: `grammar` (llguidance's), and how to read and describe it."""

    kind: str  # "json": one JSON value | "tool": a <tool_call>{"name", "arguments"}</tool_call> (or text if auto)
    grammar: str
    schema: dict | None = None  # the JSON schema ("json"), for the prompt
    tools: tuple[dict, ...] = ()  # ({"name", "description", "parameters"}, ...) ("tool")
    choice: str = "auto"  # "auto" (text or a call), "required" (some call), or a function's name
    fields: tuple[tuple[str, Any], ...] = ()  # the request's own fields, for an OpenAI-compatible upstream


def schema_field(value, param: str) -> dict:
    """A JSON schema object of bounded size (an oversized one is refused before any compiling)."""
    if not isinstance(value, dict):
        raise InputError(f"'{param}' must be a JSON schema object", param=param, code="invalid_type")
    size = len(json.dumps(value))
    if size > MAX_SCHEMA_BYTES:
        raise InputError(f"'{param}' is {size} bytes of JSON schema; at most {MAX_SCHEMA_BYTES} are accepted",
                         param=param, code="schema_too_large")
    return value


def closed_objects(schema):
    """Objects that list their properties get additionalProperties: false unless they say otherwise
    (xgrammar's strict default): guided decoding must not invent keys the schema never named."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: (value if key in ("enum", "const", "default", "examples") else closed_objects(value))
           for key, value in schema.items()}
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def json_grammar(schema: dict, param: str) -> str:
    from llguidance import LLMatcher

    try:
        return LLMatcher.grammar_from_json_schema(closed_objects(schema), overrides=JSON_STYLE)
    except ValueError as exc:
        raise InputError(f"'{param}' is not a usable JSON schema: {exc}", param=param, code="invalid_schema") from None


def json_constraint(schema: dict, param: str, fields: tuple = ()) -> Constraint:
    return Constraint("json", json_grammar(schema, param), schema=schema, fields=fields)


def response_format_constraint(value, param: str = "response_format", fields: tuple = ()) -> Constraint | None:
    """OpenAI's {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}
    (the Responses API's text.format has the schema fields at the top level)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_constraint({"type": "object"}, param, fields)
    if kind == "json_schema":
        spec = value.get("json_schema", value)  # chat nests it, Responses does not
        if not isinstance(spec, dict) or "schema" not in spec:
            raise InputError(f"'{param}' of type json_schema needs a 'schema' object", param=param,
                             code="invalid_value")
        return json_constraint(schema_field(spec["schema"], f"{param}.schema"), f"{param}.schema", fields)
    raise InputError(f"'{param}' type must be text, json_object or json_schema (got {kind!r})", param=param,
                     code="invalid_value")


def tool_specs(tools) -> tuple[dict, ...]:
    """Chat `tools` -> ({"name", "description", "parameters"}, ...), checked."""
    if not isinstance(tools, list) or not tools:
        raise InputError("'tools' must be a non-empty list of function tools", param="tools", code="invalid_value")
    specs, names = [], set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name) or name in names:
            raise InputError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} with a "
                             "unique name of letters, digits, _ . - (at most 64)", param=f"tools[{i}]",
                             code="invalid_value")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        names.add(name)
        specs.append({"name": name, "description": str(function.get("description") or ""),
                      "parameters": schema_field(parameters, f"tools[{i}].function.parameters")})
    return tuple(specs)


def tool_constraint(body: Mapping) -> Constraint | None:
    """`tools` with `tool_choice`: a named function or "required" force a valid call; "auto" lets the
    model answer in text (not starting with '<') or with a valid call; "none" ignores the tools."""
    choice = body.get("tool_choice", "auto")
    if isinstance(choice, dict):
        named = choice.get("function", {}).get("name") if choice.get("type") == "function" and \
            isinstance(choice.get("function"), dict) else None
        if not isinstance(named, str):
            raise InputError("'tool_choice' must be none, auto, required or {\"type\": \"function\", \"function\": "
                             "{\"name\": ...}}", param="tool_choice", code="invalid_value")
        choice = named
    elif choice not in ("none", "auto", "required"):
        raise InputError("'tool_choice' must be none, auto, required or a function", param="tool_choice",
                         code="invalid_value")
    if choice == "none" or body.get("tools") is None:
        return None
    specs = tool_specs(body["tools"])
    chosen = [t for t in specs if choice in ("auto", "required") or t["name"] == choice]
    if not chosen:
        raise InputError(f"tool_choice names {choice!r}, which is not among the tools", param="tool_choice",
                         code="invalid_value")
    calls = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
                        "required": ["name", "arguments"]} for t in chosen]}
    call = "%json " + json.dumps(closed_objects(calls) | {"x-guidance": JSON_STYLE})
    start = f'"{TOOL_CALL_OPEN}" call "{TOOL_CALL_CLOSE}"'
    if choice == "auto":  # free text may not start with '<', so an answer starting with it is a checked call
        lark = f"start: TEXT | {start}\nTEXT: /[^<](?s:.)*/\ncall: {call}\n"
    else:
        lark = f"start: {start}\ncall: {call}\n"
    from llguidance import LLMatcher

    fields = tuple((k, body[k]) for k in ("tools", "tool_choice") if k in body)
    return Constraint("tool", LLMatcher.grammar_from_lark(lark), tools=specs, choice=choice, fields=fields)


def chat_constraint(body: Mapping) -> Constraint | None:
    fmt = response_format_constraint(body.get("response_format"),
                                     fields=(("response_format", body.get("response_format")),))
    tools = tool_constraint(body)
    if fmt is not None and tools is not None:
        raise InputError("send either 'tools' or a JSON 'response_format', not both", param="response_format",
                         code="unsupported_parameter")
    return fmt or tools


def with_constraint_instructions(messages: list[Message], c: Constraint | None) -> list[Message]:
    """Say in the system prompt what the grammar will enforce anyway (schema, tools, call format)."""
    if c is None:
        return messages
    if c.kind == "json":
        text = ("Answer with JSON only." if c.schema == {"type": "object"} else
                "Answer with JSON only, valid against this JSON schema:\n" + json.dumps(c.schema, ensure_ascii=False))
    else:
        listed = "\n".join(f"- {t['name']}: {t['description']} Arguments (JSON schema): "
                           f"{json.dumps(t['parameters'], ensure_ascii=False)}" for t in c.tools)
        how = (f'To call a function, answer with only {TOOL_CALL_OPEN}{{"name": "<function name>", "arguments": '
               f'{{<arguments>}}}}{TOOL_CALL_CLOSE}.')
        when = {"auto": " Call a function only when it helps; otherwise answer in text.",
                "required": " You must call one of the functions."}.get(c.choice, f" You must call {c.choice}.")
        text = f"You can call these functions:\n{listed}\n{how}{when} Function results come back as " \
               f"<tool_response> messages."
    if messages and messages[0].role == "system":
        return [Message("system", f"{messages[0].text}\n\n{text}" if messages[0].text else text,
                        messages[0].images), *messages[1:]]
    return [Message("system", text), *messages]


def rendered_tool_calls(calls, where: str) -> str:
    """An assistant turn's tool_calls in the prompt, as the model is told to write them."""
    if not isinstance(calls, list):
        raise InputError(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls", code="invalid_type")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InputError(f"{where}.tool_calls[{j}] must be a function call with a name",
                             param=f"{where}.tool_calls[{j}]", code="invalid_value")
        arguments = function.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            pass  # kept as the string the client sent
        out.append(TOOL_CALL_OPEN + json.dumps({"name": function["name"], "arguments": arguments},
                                               ensure_ascii=False) + TOOL_CALL_CLOSE)
    return "\n".join(out)


def tool_result_message(message: dict, where: str) -> Message:
    """role "tool" (a function's result) -> a user turn <tool_response>{"tool_call_id", "content"}</tool_response>
    (the documented plain format: the HCX chat templates know no tool role)."""
    content = message.get("content")
    if isinstance(content, list):
        content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(content, str):
        raise InputError(f"{where}.content of a tool message must be a string or text parts", param=f"{where}.content",
                         code="invalid_type")
    payload = {"tool_call_id": message.get("tool_call_id"), "content": content}
    return Message("user", f"<tool_response>{json.dumps(payload, ensure_ascii=False)}</tool_response>")


# -- OpenAI Responses API (/v1/responses) -----------------------------------------------------

RESPONSES_PARTS = {"input_text": "text", "output_text": "text", "input_image": "image"}
NO_STORED_STATE = (": this server stores no responses (only the text of its recent answers, for item_reference), "
                   "so send the whole conversation in 'input' (and store=false, or leave store out)")
RESPONSES_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "tools": lambda v: bool(v), "tool_choice": lambda v: v not in ("none", "auto"),
    "text": lambda v: not isinstance(v, dict) or set(v) - {"format", "verbosity"} or
    v.get("verbosity") not in (None, "medium"),
    "reasoning": lambda v: not isinstance(v, dict) or any(x not in (None, "none") for x in v.values()),
    "include": lambda v: bool(v), "top_logprobs": lambda v: bool(v), "background": lambda v: v is not False,
    "truncation": lambda v: v != "disabled", "prompt": lambda v: True,
    "store": lambda v: v is not False, "previous_response_id": lambda v: True, "conversation": lambda v: True,
}
RESPONSES_HINTS = {"store": NO_STORED_STATE, "previous_response_id": NO_STORED_STATE, "conversation": NO_STORED_STATE,
                   "truncation": ": an input too long for the context is a 400 (truncation 'disabled')"}


def responses_input(value, cfg: Config, recall: Callable[[Any], str | None]) -> list[Message]:
    """`input`: a string (one user message) or a list of message items with input_text /
    input_image parts (output_text for earlier assistant turns), or item_references to answers
    this server gave recently (`recall` has their text)."""
    if isinstance(value, str):
        return [Message("user", value)]
    if not isinstance(value, list) or not value:
        raise InputError("'input' must be a string or a non-empty list of message items", param="input",
                         code="invalid_value")
    items = [item for item in value if isinstance(item, dict) and item.get("type", "message") == "message"]
    budget, messages = ImageBudget(cfg, count_image_parts(items, RESPONSES_PARTS), "input"), []
    for i, item in enumerate(value):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "item_reference":
            text = recall(item.get("id"))
            if text is None:
                raise InputError(f"input[{i}] refers to item {item.get('id')!r}, which is not one of the answers this "
                                 f"server keeps{NO_STORED_STATE}", param=f"input[{i}]", code="item_not_found")
            messages.append(Message("assistant", text))
        elif kind == "message":
            messages.append(openai_message(i, item, cfg, field="input", parts=RESPONSES_PARTS, budget=budget))
        else:
            raise InputError(f"input[{i}] is a {kind!r} item; only message items (and item_reference) are supported",
                             param=f"input[{i}]", code="unsupported_parameter" if isinstance(kind, str) else "invalid_type")
    return messages


def responses_request(body: Mapping, cfg: Config,
                      recall: Callable[[Any], str | None] = lambda item_id: None) -> GenerationRequest:
    """/v1/responses body -> GenerationRequest; `instructions` is a system message before the input."""
    reject_unsupported(body, RESPONSES_UNSUPPORTED, RESPONSES_HINTS)
    if "input" not in body:
        raise InputError("'input' is required", param="input", code="missing_field")
    messages = responses_input(body["input"], cfg, recall)
    instructions = field_str(body, "instructions")
    if instructions:
        messages.insert(0, Message("system", instructions))
    if not any(m.role == "user" for m in messages):
        raise InputError("'input' needs at least one user message", param="input", code="invalid_value")
    if field_str(body, "model") is None and "model" in body:
        raise InputError("'model' must be a string", param="model", code="invalid_type")
    text = body.get("text") or {}
    constraint = response_format_constraint(text.get("format"), "text.format", (("text", text),))
    return GenerationRequest(messages=with_system_prompt(messages, cfg), stop=openai_stop(body.get("stop")),
                             constraint=constraint, **sampling_fields(body, cfg, max_names=("max_output_tokens",)))


# -- Ollama API (/api/chat, /api/generate) ----------------------------------------------------

OLLAMA_SAMPLING_OPTIONS = ("temperature", "top_p", "seed", "num_predict", "stop", "min_tokens")
# Options that only tune Ollama's runtime (memory, threads, batching): no effect on the answer here.
OLLAMA_RUNTIME_OPTIONS = frozenset({"num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "num_thread",
                                    "numa", "use_mmap", "use_mlock", "num_keep", "vocab_only", "f16_kv",
                                    "logits_all", "embedding_only"})
OLLAMA_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "tools": lambda v: bool(v), "think": lambda v: v is not False,
    "suffix": lambda v: bool(v), "template": lambda v: bool(v), "context": lambda v: bool(v),
    "raw": lambda v: v is not False,
}
OLLAMA_HINTS = {"raw": ": the model's chat template is always applied", "think": ": this model does not think",
                "context": ": send the conversation as /api/chat messages"}


def ollama_sampling(body: Mapping, cfg: Config) -> dict[str, Any]:
    """`options` -> sampling fields through the shared bounds; runtime-only options are accepted,
    sampling options this server does not implement (top_k, penalties, ...) are a 400 naming them."""
    reject_unsupported(body, OLLAMA_UNSUPPORTED, OLLAMA_HINTS)
    keep_alive = body.get("keep_alive")
    if keep_alive is not None and not (isinstance(keep_alive, str) or _is_number(keep_alive)):
        raise InputError("'keep_alive' must be a duration string or a number of seconds", param="keep_alive",
                         code="invalid_type")
    options = body.get("options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise InputError("'options' must be an object", param="options", code="invalid_type")
    for key, value in options.items():
        if key not in OLLAMA_SAMPLING_OPTIONS and key not in OLLAMA_RUNTIME_OPTIONS and value is not None:
            raise InputError(f"option '{key}' is not supported by this server (supported: "
                             f"{', '.join(OLLAMA_SAMPLING_OPTIONS[:5])})", param=f"options.{key}",
                             code="unsupported_parameter")
    sampling = {k: v for k, v in options.items() if k in OLLAMA_SAMPLING_OPTIONS}
    if sampling.get("num_predict") in (-1, -2):  # Ollama's "no limit" / "fill the context": our default
        del sampling["num_predict"]
    return {**sampling_fields(sampling, cfg, max_names=("num_predict",)), "stop": openai_stop(sampling.get("stop"), 16)}


def ollama_model_field(body: Mapping) -> str:
    model = field_str(body, "model", required=True)
    if not model.strip():
        raise InputError("'model' must not be empty", param="model", code="invalid_value")
    return model


def ollama_images(value, cfg: Config, where: str, budget: ImageBudget | None = None) -> list[Image.Image]:
    """`images`: a list of base64 strings (Ollama sends no data: prefix; one is accepted)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"'{where}' must be a list of base64 strings", param=where, code="invalid_type")
    budget = budget or ImageBudget(cfg, len(value), where)
    return [decode_image(v, cfg, f"{where}[{j}]", budget) for j, v in enumerate(value)]


def ollama_message(index: int, message, cfg: Config, budget: ImageBudget | None = None) -> Message:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InputError(f"{where} must be an object", param=where, code="invalid_type")
    role = message.get("role")
    if role not in ("system", "user", "assistant"):
        raise InputError(f"{where}.role must be one of system, user, assistant (got {role!r})",
                         param=f"{where}.role", code="invalid_value")
    if message.get("tool_calls"):
        raise InputError(f"{where}.tool_calls: tools are not supported by this server", param=f"{where}.tool_calls",
                         code="unsupported_parameter")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise InputError(f"{where}.content must be a string", param=f"{where}.content", code="invalid_type")
    images = ollama_images(message.get("images"), cfg, f"{where}.images", budget)
    if images and role != "user":
        raise InputError(f"{where}.images: images go in user messages", param=f"{where}.images",
                         code="invalid_value")
    return Message(role, content or "", images)


def ollama_loads_only(body: Mapping, chat: bool) -> bool:
    """Ollama's load-only call: /api/chat without messages, /api/generate without prompt or images."""
    if chat:
        return body.get("messages") in (None, [])
    prompt = body.get("prompt")
    return not (isinstance(prompt, str) and prompt.strip()) and not body.get("images")


def ollama_chat_request(body: Mapping, cfg: Config) -> GenerationRequest | None:
    """/api/chat body -> GenerationRequest, or None for Ollama's load-only call (no messages)."""
    ollama_model_field(body)
    sampling = ollama_sampling(body, cfg)
    messages = body.get("messages")
    if ollama_loads_only(body, chat=True):
        return None
    if not isinstance(messages, list):
        raise InputError("'messages' must be a list", param="messages", code="invalid_type")
    count = sum(len(m["images"]) for m in messages if isinstance(m, dict) and isinstance(m.get("images"), list))
    budget = ImageBudget(cfg, count)
    parsed = [ollama_message(i, m, cfg, budget) for i, m in enumerate(messages)]
    if not any(m.role == "user" for m in parsed):
        raise InputError("'messages' needs at least one user message", param="messages", code="invalid_value")
    return ollama_with_format(body, with_system_prompt(parsed, cfg), sampling)


def ollama_generate_request(body: Mapping, cfg: Config) -> GenerationRequest | None:
    """/api/generate body -> GenerationRequest (`system` + `prompt` + `images`), or None for the
    load-only call (no prompt)."""
    ollama_model_field(body)
    sampling = ollama_sampling(body, cfg)
    prompt = field_str(body, "prompt") or ""
    if ollama_loads_only(body, chat=False):
        return None
    images = ollama_images(body.get("images"), cfg, "images")
    system = field_str(body, "system")
    messages = ([Message("system", system)] if system else []) + [Message("user", prompt, images)]
    return ollama_with_format(body, with_system_prompt(messages, cfg), sampling)


def ollama_with_format(body: Mapping, messages: list[Message], sampling: dict) -> GenerationRequest:
    """Ollama's structured output: `format` "json" (any JSON object) or a JSON schema."""
    value = body.get("format")
    if value in (None, ""):
        constraint = None
    elif value == "json":
        constraint = json_constraint({"type": "object"}, "format", (("response_format", {"type": "json_object"}),))
    elif isinstance(value, dict):
        constraint = json_constraint(schema_field(value, "format"), "format", (("response_format", {
            "type": "json_schema", "json_schema": {"name": "format", "schema": value}}),))
    else:
        raise InputError("'format' must be \"json\" or a JSON schema object", param="format", code="invalid_value")
    return GenerationRequest(messages=messages, constraint=constraint, **sampling)


# -- from a request to model tensors ----------------------------------------------------


@dataclass
class ModelInputs:
    """One request as the model's front takes it: `tensors` (input_ids plus, with images, what the
    processor made of them), `prompt_tokens` as the decoder will see them, `has_images`."""

    tensors: dict[str, Any]
    prompt_tokens: int
    has_images: bool = False


def to_model(tensors: dict[str, Any], m: LoadedModel) -> dict[str, Any]:
    """On the model's device; floating tensors (pixel values, also inside HCX's nested lists) in
    the vision dtype; ids, sizes and masks keep their integer dtype."""
    return cast_floats(dict(tensors), m.vision_dtype, m.device)


def text_only_inputs(m: LoadedModel, ids: torch.Tensor) -> ModelInputs:
    return ModelInputs(to_model({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, m), int(ids.shape[1]))


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
    return ModelInputs(tensors, int(tensors["input_ids"].shape[1]), bool(images))


def build_text_inputs(m: LoadedModel, req: GenerationRequest) -> ModelInputs:
    """A causal LM without vision: the tokenizer's chat template; images are the client's mistake."""
    if req.image_count:
        raise InputError(f"this model ({m.name}) is text-only and takes no images", code="images_not_supported",
                         param="messages")
    chat = [{"role": msg.role, "content": msg.text} for msg in req.messages]
    ids = m.tokenizer.apply_chat_template(chat, return_tensors="pt", tokenize=True, add_generation_prompt=True)
    return text_only_inputs(m, ids)


def build_hcx_v1_inputs(m: LoadedModel, req: GenerationRequest) -> ModelInputs:
    """The first revision's flow (model card): one content dict per message (text, then its images
    as bytes -- never a client string, which the remote preprocessor would open as a path or URL)."""
    if not req.image_count:
        chat = [{"role": msg.role, "content": msg.text} for msg in req.messages]
        return text_only_inputs(m, m.tokenizer.apply_chat_template(chat, return_tensors="pt", tokenize=True,
                                                                   add_generation_prompt=True))
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
    vision_tokens = sum(int(n) for n in flat_ints(pre.get("vision_query_lengths", [])))
    prompt_tokens = int(ids.shape[1]) - count + vision_tokens
    return ModelInputs(to_model({"input_ids": ids, **pre}, m), prompt_tokens, True)


def build_hcx_v2_inputs(m: LoadedModel, req: GenerationRequest) -> ModelInputs:
    """The later revision (HCXProcessor): OpenAI-style content lists, the chat template (the
    processor's, else the tokenizer's), processor(text=..., images=[[img, ...]]); the image
    placeholders are then made one per vision token, whichever way the processor left them."""
    chat = [{"role": msg.role, "content": [{"type": "image"} for _ in msg.images] +
             [{"type": "text", "text": msg.text}]} for msg in req.messages]
    images = [img for msg in req.messages for img in msg.images]
    text = render_chat(m, chat)
    if not images:
        return text_only_inputs(m, m.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"])
    out = dict(m.processor(text=[text], images=[images], return_tensors="pt"))
    lengths = [int(n) for n in flat_ints(out.get("vision_query_lengths_images", []))]
    if len(lengths) != len(images):
        raise GenerationError(f"the HCX processor returned vision_query_lengths_images for {len(lengths)} images, "
                              f"{len(images)} were sent")
    ids = out["input_ids"] if isinstance(out["input_ids"], torch.Tensor) else torch.tensor(out["input_ids"])
    ids = expand_image_placeholders(ids.reshape(1, -1), m.image_token_id, lengths)
    out.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    return ModelInputs(to_model(out, m), int(ids.shape[1]), True)


def render_chat(m: LoadedModel, chat: list[dict]) -> str:
    """The prompt text from the processor's chat template, else the tokenizer's."""
    owner = m.processor if getattr(m.processor, "chat_template", None) else m.tokenizer
    return owner.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def flat_ints(value) -> list:
    """[[81, 162]] / [tensor([81, 162])] / tensor([[81]]) -> [81, 162]: the processors' nestings."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).tolist()
    if isinstance(value, (list, tuple)):
        return [x for item in value for x in flat_ints(item)]
    return [value]


def expand_image_placeholders(ids: torch.Tensor, token_id: int | None, lengths: list[int]) -> torch.Tensor:
    """Ids with one placeholder per vision token: as they are when the processor expanded them,
    else each single placeholder repeated lengths[i] times; any other count is a clear error."""
    where = (ids[0] == token_id).nonzero().flatten().tolist() if token_id is not None else []
    if len(where) == sum(lengths):
        return ids
    if len(where) != len(lengths):
        raise GenerationError(f"the prompt holds {len(where)} image placeholder tokens (id {token_id}) for "
                              f"{len(lengths)} images of {sum(lengths)} vision tokens; the model's processor and "
                              "chat template disagree with this server's reading of them")
    pieces, start = [], 0
    for at, n in zip(where, lengths):
        pieces += [ids[0, start:at], ids.new_full((n,), token_id)]
        start = at + 1
    pieces.append(ids[0, start:])
    return torch.cat(pieces).unsqueeze(0)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


INPUT_BUILDERS = {"hcx-v1": build_hcx_v1_inputs, "hcx-v2": build_hcx_v2_inputs, "generic": build_generic_inputs,
                  "text": build_text_inputs}


def refuse_text_beyond_context(m: LoadedModel, req: GenerationRequest) -> None:
    """Text that certainly cannot fit is refused before it is tokenized: more characters than the
    context times the most characters one token stands for (`max_token_chars`, found at load)."""
    chars = sum(len(msg.text) for msg in req.messages)
    if m.max_token_chars and chars > m.context_length * m.max_token_chars:
        raise InputError(f"this model's context is {m.context_length} tokens; the prompt has {chars} characters, "
                         f"more than {m.context_length} tokens of at most {m.max_token_chars} characters can hold",
                         code="context_length_exceeded", param="messages")


def build_inputs(m: LoadedModel, req: GenerationRequest) -> ModelInputs:
    """Tensors for one request; image/processor failures are the client's (400), with the reason."""
    refuse_text_beyond_context(m, req)
    if req.constraint is not None:  # the model is told what the grammar will enforce (an upstream tells its own)
        req = dataclasses.replace(req, messages=with_constraint_instructions(req.messages, req.constraint))
    try:
        return INPUT_BUILDERS[m.interface](m, req)
    except (InputError, GenerationError):
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


class Slot:
    """One place among the MAX_QUEUE + 1 requests the engine takes at a time (generating or waiting).
    Routes take it before decoding a request's images, so at most that many requests hold decoded
    pixels; a job owns it once submitted and the engine frees it when the job ends. Used as a
    context manager, it is freed on leaving unless a job took it."""

    def __init__(self, engine: "Engine"):
        self.engine, self.taken, self.freed = engine, False, False

    def release(self) -> None:
        with self.engine.lock:
            if not self.freed:
                self.freed = True
                self.engine.admitted -= 1

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc) -> None:
        if not self.taken:
            self.release()


def admit(engine, capacity: int, busy: str) -> Slot:
    """One of `capacity` places (engine.admitted counts the taken ones, under engine.lock), or Busy."""
    with engine.lock:
        if engine.admitted >= capacity:
            raise Busy(f"server busy: {busy}; retry shortly")
        engine.admitted += 1
    return Slot(engine)


@dataclass
class Job:
    """One request's trip through the engine: tensors in, token ids out through a queue."""

    request: GenerationRequest
    inputs: ModelInputs
    max_new_tokens: int
    slot: Slot | None = None
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    ended: str | None = None  # why our decode loop stopped: stop, length, cancelled, grammar

    def cancel(self) -> None:
        self.cancelled.set()


# -- the decode loop (gpt-fast's shape): front -> prefill -> decode_one_token -> sample ---------
# Our code owns decoding for every model: the model's multimodal front only builds the prompt
# embeddings; the causal LM inside it (HCX's language_model, or a generic model itself) then
# runs prefill and one decode step per token on a KV cache we own, and sampling, stop ids,
# min_tokens, max_tokens and cancel are all checked here, every step. `hf` (model.generate)
# stays as a reference and as the fallback for a model this loop cannot drive.

# Generic models whose decoder needs more than plain causal attention over 1-d positions
# (3-d rotary positions, bidirectional image spans, cross-attention, prefix-LM): model.generate.
LOOP_UNSUPPORTED_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe", "gemma3",
                          "gemma3n", "paligemma", "mllama", "idefics", "idefics2", "llama4", "kosmos-2", "florence2")


class LoopUnsupported(RuntimeError):
    """This model's front or decoder cannot be driven by our loop (model.generate takes over)."""


class _FrontDone(Exception):
    """Raised by the pre-hook once the decoder is handed its prompt embeddings: stops the forward."""


def find_decoder(m: LoadedModel) -> tuple[Any, Any]:
    """(the causal LM we decode on, the decoder body the multimodal front hands its embeddings to)."""
    decoder = getattr(m.model, "language_model", None) if m.kind == "hcx" else m.model
    if decoder is None:
        raise LoopUnsupported("the HCX model has no language_model")
    body = decoder.get_decoder() if hasattr(decoder, "get_decoder") else getattr(decoder, "model", None)
    return decoder, body


def loop_unsupported(m: LoadedModel) -> str | None:
    """Why our loop cannot drive this model, or None when it can."""
    try:
        decoder, body = find_decoder(m)
    except LoopUnsupported as exc:
        return str(exc)
    model_type = getattr(m.model.config, "model_type", "")
    if m.kind == "generic" and model_type in LOOP_UNSUPPORTED_TYPES:
        return f"model_type {model_type!r} needs positions or attention masks beyond a plain causal decoder"
    params = inspect.signature(decoder.forward).parameters
    missing = [name for name in ("past_key_values", "cache_position", "inputs_embeds") if name not in params]
    if missing:
        return f"its decoder's forward() takes no {', '.join(missing)}"
    if m.kind != "text" and not isinstance(body, torch.nn.Module):
        return "no decoder body to take the prompt embeddings from"
    m.decoder, m.body = decoder, body
    return None


def front_embeds(m: LoadedModel, tensors: dict[str, Any]) -> torch.Tensor:
    """Prompt embeddings from the model's own multimodal front (HCX v1 and v2, LLaVA and friends):
    run its forward with a pre-hook on the decoder body that takes the inputs_embeds it is handed
    and stops before any decoder work -- whatever the revision's code does to merge image features."""
    captured: dict[str, Any] = {}

    def grab(_module, args, kwargs):
        captured["embeds"] = kwargs.get("inputs_embeds")
        raise _FrontDone

    handle = m.body.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        m.model(**tensors, use_cache=False)
    except _FrontDone:
        pass
    finally:
        handle.remove()
    embeds = captured.get("embeds")
    if not isinstance(embeds, torch.Tensor):
        raise LoopUnsupported("the model's forward did not hand its decoder any prompt embeddings")
    return embeds


def forward_decoder(m: LoadedModel, cache, start: int, **inputs) -> torch.Tensor:
    """One decoder call over new positions [start, start + n): the logits of the last one."""
    n = next(iter(inputs.values())).shape[1]
    positions = torch.arange(start, start + n, device=m.device)
    out = m.decoder(**inputs, past_key_values=cache, cache_position=positions, use_cache=True,
                    **({"logits_to_keep": 1} if m.keep_last_logits else {}))
    return out.logits[:, -1]


def prefill(m: LoadedModel, inputs: ModelInputs, cache) -> tuple[torch.Tensor, int]:
    """The prompt (its embeddings when it holds images, else its ids) into the cache: first logits
    and the prompt's length as the decoder saw it."""
    if inputs.has_images:
        embeds = front_embeds(m, inputs.tensors)
        return forward_decoder(m, cache, 0, inputs_embeds=embeds), int(embeds.shape[1])
    ids = inputs.tensors["input_ids"]
    return forward_decoder(m, cache, 0, input_ids=ids), int(ids.shape[1])


def decode_one_token(m: LoadedModel, cache, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One step: the last token (a (1, 1) id tensor) at `position` (a (1,) tensor) -> next logits.
    Tensors in, tensor out, no Python branching on values: the shape CUDA graphs can capture."""
    out = m.decoder(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True,
                    **({"logits_to_keep": 1} if m.keep_last_logits else {}))
    return out.logits[:, -1]


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; else softmax(logits / T) cut to the smallest top-p nucleus, drawn
    with the request's own generator (so no other request moves it)."""
    if temperature <= 0:
        return int(torch.argmax(logits, dim=-1).reshape(-1)[0])
    probs = torch.softmax(logits.reshape(-1).float() / temperature, dim=-1)
    if top_p < 1.0:
        probs, order = probs.sort(descending=True)
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)  # the most likely token is always kept
        return int(order[torch.multinomial(probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def request_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator of the request's own: its seed makes the answer reproducible; without one, fresh
    entropy (an earlier seeded request never makes this one predictable)."""
    import secrets

    gen = torch.Generator(device=device)
    gen.manual_seed((seed if seed is not None else secrets.randbits(63)) % (2**64))
    return gen


class Guide:
    """A request's grammar (llguidance's matcher): masks the logits before each sample, then takes
    the sampled token; a token the grammar refuses is a fault, never silently kept."""

    def __init__(self, m: LoadedModel, constraint: Constraint):
        from llguidance import LLMatcher

        tokenizer = grammar_tokenizer(m)
        self.matcher = LLMatcher(tokenizer, constraint.grammar)
        if self.matcher.is_error():
            raise GenerationError(f"the answer's grammar failed: {self.matcher.get_error()}")
        self.vocab = tokenizer.vocab_size
        self.bitmask = torch.full(((self.vocab + 31) // 32,), -1, dtype=torch.int32)
        self.shifts = torch.arange(32, dtype=torch.int32)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.data_ptr(), self.bitmask.numel() * 4)
        allowed = ((self.bitmask.unsqueeze(-1) >> self.shifts) & 1).reshape(-1)[:self.vocab].bool()
        width = logits.shape[-1]
        if width > self.vocab:  # logits past the tokenizer's vocabulary are never allowed
            allowed = torch.cat([allowed, allowed.new_zeros(width - self.vocab)])
        return logits.masked_fill(~allowed[:width].to(logits.device), float("-inf"))

    def advance(self, token_id: int) -> bool:
        """Take the sampled token; True once the grammar is complete (nothing may follow)."""
        if not self.matcher.consume_token(token_id):
            raise GenerationError(f"the answer's grammar refused token {token_id}: {self.matcher.get_error()}")
        return self.matcher.is_stopped()


_grammar_lock = threading.Lock()


def grammar_tokenizer(m: LoadedModel):
    """llguidance's view of the vocabulary (built once per model, ~1 s for 110 k tokens): the
    decoder's full logit width, the stop ids as end-of-sequence."""
    with _grammar_lock:
        if m.grammar_tokenizer is None:
            import llguidance.hf

            width = m.decoder.get_output_embeddings().weight.shape[0] if m.decoder is not None else len(m.tokenizer)
            try:
                m.grammar_tokenizer = llguidance.hf.from_tokenizer(m.tokenizer, n_vocab=max(width, len(m.tokenizer)),
                                                                   eos_token=list(m.stop_token_ids))
            except ValueError as exc:
                raise InputError(f"structured output needs a fast (Rust) tokenizer: {exc}",
                                 code="structured_output_unsupported") from None
        return m.grammar_tokenizer


def check_constraint(m: LoadedModel, c: Constraint) -> None:
    """Before queueing: a grammar llguidance cannot compile for this vocabulary is the client's 400."""
    from llguidance import LLMatcher

    if m.generation_backend == "hf":
        raise InputError("structured output (response_format / tools / json_schema) needs the server's own decode "
                         "loop; this model runs on model.generate (GENERATION_BACKEND=hf)",
                         code="structured_output_unsupported")
    error = LLMatcher.validate_grammar(c.grammar, grammar_tokenizer(m))
    if error:
        what = "JSON schema" if c.kind == "json" else "tool definitions"
        raise InputError(f"the {what} cannot be compiled into a grammar: {' '.join(error.split())[:400]}",
                         code="invalid_schema", param="response_format" if c.kind == "json" else "tools")


def generate_tokens(m: LoadedModel, inputs: ModelInputs, req: GenerationRequest, max_new_tokens: int,
                    cancelled: threading.Event | None = None) -> Iterator[int]:
    """Token ids as they are sampled, ending after a stop id, max_new_tokens, cancel (checked before
    every step) or a finished grammar; returns why it ended ("stop", "length", "cancelled",
    "grammar"). Stop ids are masked until min_tokens are out; a grammar masks every step."""
    gen = request_generator(req.seed, m.device)
    stops = set(m.stop_token_ids)
    blocked = torch.tensor(sorted(stops), dtype=torch.long, device=m.device) if stops else None
    guide = Guide(m, req.constraint) if req.constraint is not None else None
    with torch.inference_mode():
        cache, step = new_cache(m, inputs.prompt_tokens + max_new_tokens)
        logits, length = prefill(m, inputs, cache)
        if length != inputs.prompt_tokens:
            log.warning("the prompt took %d decoder positions, %d were counted for the context check", length,
                        inputs.prompt_tokens)
        token = torch.empty((1, 1), dtype=torch.long, device=m.device)
        position = torch.empty((1,), dtype=torch.long, device=m.device)
        for n in range(max_new_tokens):
            if cancelled is not None and cancelled.is_set():
                return "cancelled"
            if guide is not None:
                logits = guide.mask(logits)  # the grammar decides where the answer may end
            elif n < req.min_new_tokens and blocked is not None:
                logits = logits.index_fill(-1, blocked, float("-inf"))
            next_id = sample(logits, req.temperature, req.top_p, gen)
            yield next_id
            if next_id in stops:
                return "stop"
            if guide is not None and guide.advance(next_id):
                return "grammar"
            if n + 1 == max_new_tokens:
                return "length"
            token.fill_(next_id)
            position.fill_(length + n)
            logits = step(m, cache, token, position)
    return "length"


def run_generation(m: LoadedModel, job: Job) -> int:
    """One job on the model: its tokens go to job.events as they come; returns how many."""
    if m.generation_backend == "hf":
        return run_hf(m, job)
    count = 0
    tokens = generate_tokens(m, job.inputs, job.request, job.max_new_tokens, job.cancelled)
    try:
        while True:
            try:
                token_id = next(tokens)
            except StopIteration as end:
                job.ended = end.value
                break
            job.events.put(("token", token_id))
            count += 1
    except LoopUnsupported as exc:
        if count:
            raise GenerationError(f"generation failed: {exc}") from None
        log.warning("our decode loop cannot drive this model (%s): switching to GENERATION_BACKEND=hf "
                    "(model.generate)", exc)
        m.generation_backend = "hf"
        return run_hf(m, job)
    return count


# -- KV caches: dynamic per request, or the static one made at load (and its compiled step) ---
# "static": a StaticCache of STATIC_CACHE_TOKENS allocated once at load and reset per request;
# on CUDA its fixed shapes let decode_one_token be compiled with CUDA graphs (torch.compile
# mode="reduce-overhead", the gpt-fast recipe), warmed up at load so no request waits for it.
# Requests longer than the cache run the same loop uncompiled on a DynamicCache (logged). On a
# CPU the static cache runs uncompiled (torch.compile measured no faster there; it costs 60-90 s).
STATIC_CACHE_TOKENS = 2048


@dataclass
class StaticDecode:
    cache: Any
    tokens: int
    step: Callable[..., torch.Tensor]
    compiled: bool


def new_cache(m: LoadedModel, total_tokens: int) -> tuple[Any, Callable[..., torch.Tensor]]:
    """The static cache (reset) and its step when the request fits, else a fresh DynamicCache."""
    from transformers import DynamicCache

    static = m.static
    if static is not None:
        if total_tokens <= static.tokens:
            static.cache.reset()
            return static.cache, static.step
        log.info("request of up to %d tokens exceeds the %d-token static cache: decoding uncompiled on a dynamic "
                 "cache", total_tokens, static.tokens)
    return DynamicCache(), decode_one_token


def static_cache_tokens(m: LoadedModel) -> int:
    return min(STATIC_CACHE_TOKENS, m.context_length)


def prepare_static(m: LoadedModel) -> StaticDecode:
    """Allocate the static cache once; on CUDA compile decode_one_token with CUDA graphs and warm
    both up with a short greedy run (compiles and records the graph: ~40 s once)."""
    from transformers import StaticCache

    cache = StaticCache(config=m.decoder.config, max_cache_len=static_cache_tokens(m))
    step, compiled = decode_one_token, False
    if m.device.type == "cuda":
        step, compiled = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True), True
    m.static = StaticDecode(cache, static_cache_tokens(m), step, compiled)
    warm = GenerationRequest(messages=[], max_new_tokens=4, temperature=0.0)
    ids = torch.tensor([[m.pad_token_id]], device=m.device)
    for _ in range(3 if compiled else 1):  # cudagraph trees record on the second/third call
        list(generate_tokens(m, ModelInputs({"input_ids": ids}, 1), warm, 4))
    return m.static


# -- hf: model.generate, the reference and the fallback -----------------------------------


def sampling_kwargs(req: GenerationRequest, max_new_tokens: int) -> dict[str, Any]:
    """The same sampling for model.generate (temperature 0 means greedy)."""
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "min_new_tokens": min(req.min_new_tokens, max_new_tokens),
                              "repetition_penalty": 1.0}
    if req.temperature > 0:
        kwargs.update(do_sample=True, temperature=req.temperature, top_p=req.top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def run_hf(m: LoadedModel, job: Job) -> int:
    """model.generate with a streamer that forwards ids and a criterion that honours cancel; for a
    model our loop cannot drive (whether remote code passes these on is its own business)."""
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
                               streamer=streamer, stopping_criteria=StoppingCriteriaList([StopWhenCancelled()]))
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


def compare_with_hf(m: LoadedModel, req: GenerationRequest) -> tuple[bool, str]:
    """Greedy tokens of our loop vs model.generate on one request (selfcheck and bench)."""
    if m.generation_backend == "hf":
        return True, "skipped: this model runs on model.generate (GENERATION_BACKEND=hf)"
    inputs = build_inputs(m, req)
    n = fit_to_context(m, req, inputs.prompt_tokens)
    ours = list(generate_tokens(m, inputs, req, n))
    job = Job(req, inputs, n)
    run_hf(m, job)
    return near_tie(m, inputs, ours, drain_tokens(job))


def near_tie(m: LoadedModel, inputs: ModelInputs, ref: list[int], got: list[int]) -> tuple[bool, str]:
    """Two greedy answers agree when identical, or when they first differ at a near-tie: under our
    logits after the shared prefix, the two picks are within 2 % of the logit scale (bf16 rounding
    or another kernel's summation order can flip such ties; a real bug does not)."""
    step = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    if ref == got:
        return True, f"{len(ref)} greedy tokens identical"
    if step >= min(len(ref), len(got)):
        return False, f"identical for {step} tokens, then one side stopped ({len(ref)} vs {len(got)} tokens)"
    logits = teacher_forced_logits(m, inputs, ref[:step])[-1]
    margin, scale = float(logits[ref[step]] - logits[got[step]]), float(logits.abs().max())
    near = abs(margin) <= 0.02 * scale
    return near, (f"identical for {step} of {len(ref)} tokens, then {'a near-tie' if near else 'NOT a near-tie'} "
                  f"(logit margin {margin:.4f} at scale {scale:.2f})")


def teacher_forced_logits(m: LoadedModel, inputs: ModelInputs, ids: list[int]) -> torch.Tensor:
    """Our logits (fp32, on the CPU) after the prompt and after each of `ids` fed in turn:
    (len(ids) + 1, vocab)."""
    rows = []
    with torch.inference_mode():
        cache, _ = new_cache(m, inputs.prompt_tokens + len(ids) + 1)
        logits, length = prefill(m, inputs, cache)
        rows.append(logits.reshape(-1).float().cpu())
        for i, token_id in enumerate(ids):
            logits = decode_one_token(m, cache, torch.tensor([[token_id]], device=m.device),
                                      torch.tensor([length + i], device=m.device))
            rows.append(logits.reshape(-1).float().cpu())
    return torch.stack(rows)


def drain_tokens(job: Job) -> list[int]:
    """The token ids a finished job left in its events queue."""
    ids = []
    while not job.events.empty():
        kind, value = job.events.get_nowait()
        if kind == "token":
            ids.append(value)
    return ids


# -- generation backends: our CPU kernels ---------------------------------------------------
# "gemv" runs the same decode loop as "eager" and swaps only the kernels under the linear layers
# (nn.Linear -> GemvLinear / Int8Linear, same parameters, no copy). Decode is one matrix-vector
# product per weight matrix per token, so it is bound by memory bandwidth; torch's own CPU
# products read the weights at only a third to two thirds of it, our one-row kernels
# (kernels/*.cpp) at ~85-90 % (`hcx-cli bench --kernels`, BENCHMARKS.md).
# Prefill and the vision tower (many rows) run torch's matmul: in bf16 where the CPU has bf16
# instructions (oneDNN), else widened to fp32 chunk by chunk (MKL), because torch's emulated
# bf16 GEMM is ~3-4x and its bf16 convolution ~50x slower than fp32 there.

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
    """kernels/ beside server.py, or the package hcx_server_kernels that `pip install .` made."""
    try:
        return project_folder("kernels", "ops.cpp")
    except FileNotFoundError as exc:
        raise KernelUnavailable(str(exc)) from None


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
        one = x.numel() == self.in_features
        if one and self.one_row is not None and x.dtype in (torch.bfloat16, torch.float32):
            return self.one_row(x.contiguous(), self.weight, self.weight_scale, self.bias)
        if not one or self.in_features % 16:  # torch 2.13's int8 product reads garbage past K % 16
            compute = self.widen_to if x.dtype == torch.bfloat16 else torch.float32  # fp32 models stay fp32
            return widened_linear(x, self.weight, self.bias, compute, self.weight_scale)
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
        report("GENERATION_BACKEND=%s: %s; one-row products run torch's kernels (%s), many-row products: %s "
               "(%d layers)", want, reason, "_weight_int8pack_mm" if m.weights == "int8" else "F.linear", many,
               widened)
        return "eager"
    log.info("CPU kernel %s drives %d %s linear layers one row at a time (decode); many-row products: %s "
             "(%d layers)", variant, ours, m.weights, many, widened)
    return "gemv" if ours else "eager"


def prepare_generation_backend(cfg: Config, m: LoadedModel) -> str:
    """Once at load: `hf` when asked or when our loop cannot drive the model; else `static` on CUDA
    (static cache + CUDA graphs), `gemv` on CPUs with AVX2 or AVX-512 running bf16 or int8 weights
    (our kernels), else `eager` (the same loop, torch's kernels, nothing compiled). Never fails;
    every fallback is logged with its reason."""
    want = cfg.generation_backend
    report = log.info if want == "auto" else log.warning
    if m.weights == "int8":  # until our kernels take them: torch's int8 product, many rows widened
        use_cpu_kernels(m.model, "torch")
    if want == "hf":
        return "hf"
    reason = loop_unsupported(m)
    if reason is not None:
        log.warning("our decode loop cannot drive this model (%s): using model.generate (GENERATION_BACKEND=hf)",
                    reason)
        return "hf"
    m.keep_last_logits = "logits_to_keep" in inspect.signature(m.decoder.forward).parameters
    if want == "eager":
        return "eager"
    if want == "static" or (want == "auto" and m.device.type == "cuda"):
        started = time.perf_counter()
        try:
            static = prepare_static(m)
        except Exception as exc:  # noqa: BLE001 - any compile failure means: run eager
            m.static = None
            report("GENERATION_BACKEND=%s: the static cache / compiled decode step failed (%s: %s); using eager",
                   want, type(exc).__name__, exc)
            return "eager"
        log.info("GENERATION_BACKEND=%s: static KV cache of %d tokens%s, ready in %.0f s", want, static.tokens,
                 ", decode step compiled with CUDA graphs" if static.compiled else " (uncompiled on CPU)",
                 time.perf_counter() - started)
        return "static"
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

    A single thread is the lock that serializes use of the model. At most MAX_QUEUE + 1 requests
    hold a Slot (one generating, MAX_QUEUE waiting; MAX_QUEUE=0: none waits); more are Busy. A job
    whose client left while it waited is dropped without running.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.model: LoadedModel | None = None
        self.state = "loading"
        self.error: str | None = None
        self.jobs: queue.Queue[Job] = queue.Queue()  # bounded by the slots
        self.lock = threading.Lock()
        self.admitted = 0  # slots held: requests decoding their images, queued or generating
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
                job.slot.release()
                job.events.put(("done", None))
                continue
            self.running = job
            try:
                self.stats["tokens_generated"] += run_generation(self.model, job)
            except Exception as exc:  # noqa: BLE001 - the engine thread must never die
                self.stats["jobs_failed"] += 1
                log.error("generation failed: %s", exc, exc_info=not isinstance(exc, torch.OutOfMemoryError))
                job.slot.release()
                job.events.put(("error", describe_failure(exc)))
            else:
                self.stats["jobs_cancelled" if job.cancelled.is_set() else "jobs_done"] += 1
                job.slot.release()
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
    def reserve(self) -> Slot:
        """A place for one more request, or Busy when MAX_QUEUE + 1 are taken."""
        waiting = f"{self.cfg.max_queue} requests already waiting" if self.cfg.max_queue else \
            "a request is being served and MAX_QUEUE=0 lets none wait"
        return admit(self, self.cfg.max_queue + 1, waiting)

    def submit(self, req: GenerationRequest, slot: Slot | None = None) -> Job:
        """Build tensors and check limits in the caller's thread, then queue the job in its slot
        (reserved here when the caller holds none; a failure frees the slot)."""
        m = self.require_model()
        check_image_count(req, self.cfg)
        if req.constraint is not None:
            check_constraint(m, req.constraint)
        slot = slot or self.reserve()
        try:
            inputs = build_inputs(m, req)
            job = Job(req, inputs, fit_to_context(m, req, inputs.prompt_tokens), slot)
        except BaseException:
            slot.release()
            raise
        slot.taken = True
        self.jobs.put(job)
        return job

    def stream(self, req: GenerationRequest, client_gone: Callable[[], bool] | None = None,
               whole: bool = False, slot: Slot | None = None) -> TextStream:
        """submit() and follow the job (`whole` matters only to an UpstreamPool)."""
        return TextStream(self.model, self.submit(req, slot), client_gone)

    @property
    def queue_depth(self) -> int:
        return self.jobs.qsize()

    @property
    def in_flight(self) -> int:
        return int(self.running is not None) + self.queue_depth

    @property
    def context_length(self) -> int | None:
        """The served context window, once loaded."""
        return self.model.context_length if self.state == "ready" else None

    @property
    def idle(self) -> bool:
        """No request holds a slot: nothing decodes, waits or generates."""
        return self.admitted == 0


def check_image_count(req: GenerationRequest, cfg: Config) -> None:
    if req.image_count > cfg.max_images:
        raise too_many_images(cfg, req.image_count)


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
        events = self.job.events
        while True:
            batch: list = []
            try:
                batch.append(events.get(timeout=self.POLL_S))
                while True:  # whatever else is there: one wake-up per batch, not per token
                    batch.append(events.get_nowait())
            except queue.Empty:
                pass
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + self.POLL_S
                if not self.job.cancelled.is_set() and self.client_gone():
                    log.info("client disconnected: cancelling generation")
                    self.job.cancel()
            yield from batch

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
            if stopped_on_token or stops.hit or job.ended == "grammar":
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


def stream(engine: Engine | UpstreamPool, req: GenerationRequest, client_gone: Callable[[], bool] | None = None,
           slot: Slot | None = None, whole: bool = False) -> TextStream | UpstreamStream:
    """Queue the request now (so errors surface before any byte is sent); iterate for text. The engine
    is the local model's or, with BACKEND=openai, the pool of upstreams: the same interface. `slot`:
    the place the route reserved before decoding images; `whole`: the caller joins the answer, so
    nothing reaches its client before the end (an upstream that breaks off midway may be replaced)."""
    return engine.stream(req, client_gone, whole, slot)


def generate(engine: Engine | UpstreamPool, req: GenerationRequest, client_gone: Callable[[], bool] | None = None,
             slot: Slot | None = None) -> Completion:
    """The whole answer at once: the same path as stream(), joined."""
    text_stream = stream(engine, req, client_gone, slot, whole=True)
    text = "".join(text_stream)
    return dataclasses.replace(text_stream.completion, text=text)


# -- BACKEND=openai: the same interface in front of a fleet of OpenAI-compatible upstreams ---------
# No model is loaded here. Each request goes, as an OpenAI chat completion streamed with usage, to the
# upstream (a vLLM replica serving this model, or another hcx-server) with the fewest requests in
# flight, at most MAX_QUEUE per upstream (then 503 + Retry-After). An upstream that fails (refused,
# 5xx, timeout, a stream broken off) is marked down and probed in the background (GET {url}/models,
# every 0.5 s doubling to 5 s) until it answers again. A request that failed before any of its text
# reached the client is sent once more, to another upstream; a stream broken midway ends with the
# API's own error marker. UPSTREAM_TIMEOUT bounds every wait for the upstream's next bytes --
# connecting, its response headers, the first token (its own queue included), each gap between two
# chunks -- never the whole answer: a long answer that keeps streaming is never cut, a silent upstream
# is given up after that long (504). Up upstreams are probed too, every UPSTREAM_REFRESH_S: an idle one
# that died is found before a request is sent to it, a window reported late (hcx-server lists its model
# while still loading) is learnt.

UPSTREAM_PROBE_S = (0.5, 5.0)  # probes of a down upstream: first delay, longest delay
UPSTREAM_REFRESH_S = 30.0  # probes of an up upstream
UPSTREAM_FALLBACK_CONTEXT = 16384  # HCX's window, when neither the upstreams nor MAX_MODEL_LEN say
UPSTREAM_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}


class UpstreamFailure(GenerationError):
    """An upstream failed, or none can take the request. `status` is what a client that got no byte
    yet sees: 502 (bad gateway), 503 + Retry-After (none reachable, or busy), 504 (UPSTREAM_TIMEOUT);
    a stream already under way ends with its API's error marker instead. `down`: the upstream is
    marked down; `retriable`: another upstream may be tried."""

    def __init__(self, message: str, status: int = 502, code: str = "upstream_failed", outcome: str = "failed",
                 retry_after: int | None = None, down: bool = True, retriable: bool = True):
        super().__init__(message)
        self.status, self.code, self.outcome, self.retry_after = status, code, outcome, retry_after
        self.down, self.retriable = down, retriable


@dataclass
class UpstreamModel:
    """What the routes show of the served model when upstreams serve it: no folder, device or dtype."""

    name: str
    context_length: int
    facts: dict  # weights_facts' keys, as far as the front knows them
    path: str = ""
    device: str = "upstream"
    dtype: str = "unknown"


@dataclass(eq=False)
class Upstream:
    """One server of the fleet as the pool sees it (fields change under the pool's lock)."""

    url: str  # its base URL, ".../v1"
    name: str  # the URL without any user:password, for logs, /health and /metrics
    state: str = "probing"  # probing (not answered yet) | up | down
    model: str = ""
    context_length: int | None = None
    in_flight: int = 0
    error: str | None = None
    since: float = field(default_factory=time.time)  # wall clock of the last state change
    next_probe: float = 0.0
    probe_wait: float = UPSTREAM_PROBE_S[0]
    last_pick: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)  # requests by outcome
    tokens: int = 0
    marked_down: int = 0

    def describe(self) -> dict:
        return {"url": self.name, "state": self.state, "model": self.model or None,
                "context_length": self.context_length, "in_flight": self.in_flight, "error": self.error,
                "since": round(self.since, 3), "requests": sum(self.outcomes.values())}


@dataclass
class UpstreamJob:
    """Job's counterpart for a request sent upstream (MCP progress reads max_new_tokens)."""

    request: GenerationRequest
    max_new_tokens: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()


def image_data_url(img: Image.Image) -> str:
    """The client's own bytes when they decode to exactly what was checked (open_image keeps them),
    else a PNG of the pixels."""
    mime, raw = img.info.get(SOURCE_BYTES) or ("image/png", png_bytes(img))
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def upstream_messages(req: GenerationRequest) -> list[dict]:
    """OpenAI chat messages: images first, as data: URLs in image_url parts, then the text."""
    messages = []
    for msg in req.messages:
        if not msg.images:
            messages.append({"role": msg.role, "content": msg.text})
            continue
        parts = [{"type": "image_url", "image_url": {"url": image_data_url(img)}} for img in msg.images]
        parts += [{"type": "text", "text": msg.text}] if msg.text else []
        messages.append({"role": msg.role, "content": parts})
    return messages


def upstream_payload(req: GenerationRequest, max_new_tokens: int) -> dict:
    """The chat completion body (less `model`, which is per upstream); the upstream applies the stop
    strings, min_tokens is the vLLM extension field (hcx-server takes it too)."""
    payload = {"messages": upstream_messages(req), "max_tokens": max_new_tokens, "temperature": req.temperature,
               "top_p": req.top_p, "stream": True, "stream_options": {"include_usage": True}}
    if req.seed is not None:
        payload["seed"] = req.seed
    if req.stop:
        payload["stop"] = list(req.stop)
    if req.min_new_tokens and req.constraint is None:
        payload["min_tokens"] = req.min_new_tokens
    payload.update(upstream_constraint(req.constraint))
    return payload


def upstream_constraint(c: Constraint | None) -> dict:
    """Structured output for the upstream's own guided decoding: a JSON answer as chat's
    response_format, tool calls as the request's tools / tool_choice (its tool_calls deltas come back
    as our <tool_call> text, so every API presents them as for a local model)."""
    if c is None:
        return {}
    if c.kind == "tool":
        return dict(c.fields)
    if c.schema == {"type": "object"}:
        return {"response_format": {"type": "json_object"}}
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": c.schema,
                                                                        "strict": True}}}


def upstream_error(body: Any) -> dict | None:
    """The error of an upstream answer or SSE event: OpenAI's (and hcx-server's) {"error": {...}},
    older vLLM's {"object": "error", "message", ...}, FastAPI's {"detail": ...}; else None."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict):
        return error
    if isinstance(error, str):
        return {"message": error}
    if body.get("object") == "error":
        return body
    if "detail" in body and "choices" not in body:
        return {"message": body["detail"] if isinstance(body["detail"], str) else json.dumps(body["detail"])}
    return None


def without_userinfo(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//", url, count=1)


def transport_problem(exc: BaseException) -> str:
    """An httpx error as a few words ("ConnectError: [Errno 111] Connection refused")."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class UpstreamPool:
    """Engine's interface (start, state, wait_ready, require_model, stream, stats, queue_depth,
    in_flight, running, context_length, draining) over the upstreams of UPSTREAM_URLS. One httpx
    client (pooled keep-alive connections, streaming, timeouts; shared by every request thread) and
    one probe thread."""

    def __init__(self, cfg: Config):
        import httpx

        self.cfg = cfg
        self.upstreams = [Upstream(url, without_userinfo(url)) for url in cfg.upstream_urls]
        self.limit = max(cfg.max_queue, 1)
        self.lock = threading.Lock()
        self.admitted = 0  # requests being read (their images decoded) before they go upstream
        self.wake = threading.Event()
        self.state = "loading"  # loading (the first probes) | ready
        self.error: str | None = None
        self.draining = False
        self.started = time.time()
        self.retries = 0
        self.picks = 0
        self.stats = {"jobs_done": 0, "jobs_failed": 0, "jobs_cancelled": 0, "jobs_skipped": 0, "tokens_generated": 0}
        headers = {"User-Agent": f"hcx-server/{__version__}"}
        if cfg.upstream_api_key:
            headers["Authorization"] = f"Bearer {cfg.upstream_api_key}"
        connections = len(self.upstreams) * (self.limit + 2)
        # trust_env=False: upstreams are reached directly, never through a proxy meant for the internet
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(cfg.upstream_timeout), limits=limits,
                                 trust_env=False)

    # -- lifecycle and health --
    def start(self, wait: bool = False) -> "UpstreamPool":
        threading.Thread(target=self._probe_loop, name="hcx-upstream-probes", daemon=True).start()
        if wait:
            self.wait_ready()
        return self

    def _probe_loop(self) -> None:
        """Probe every upstream once, then each when it is due: a down one after its backoff, an up
        one every UPSTREAM_REFRESH_S."""
        while True:
            self.wake.clear()
            for upstream in [u for u in self.upstreams if u.next_probe <= time.monotonic()]:
                self.probe(upstream)
            if self.state == "loading":
                self.state = "ready"
                log.info("upstreams: %s", ", ".join(f"{u.name} {u.state}" for u in self.upstreams))
            self.wake.wait(max(0.05, min(u.next_probe for u in self.upstreams) - time.monotonic()))

    def probe(self, upstream: Upstream) -> bool:
        """GET {url}/models: up when it lists models (and UPSTREAM_MODEL among them, when set); learns the
        model id and the context window (vLLM's max_model_len) from it."""
        import httpx

        try:
            answer = self.http.get(f"{upstream.url}/models", timeout=min(self.cfg.upstream_timeout, 5.0))
            if answer.status_code != 200:
                raise ValueError(f"GET /models answered HTTP {answer.status_code}")
            cards = [c for c in answer.json().get("data") or [] if isinstance(c, dict) and isinstance(c.get("id"), str)]
            wanted = self.cfg.upstream_model
            card = next((c for c in cards if c["id"] == wanted), None) if wanted else (cards or [None])[0]
            if card is None:
                raise ValueError(f"it does not serve {wanted!r}" if wanted else "GET /models lists no model")
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            problem = transport_problem(exc) if isinstance(exc, httpx.HTTPError) else str(exc)
            if upstream.state == "up":
                self.mark_down(upstream, f"probe failed: {problem}")
                return False
            with self.lock:
                first = upstream.state == "probing"
                upstream.error = problem
                if first:
                    upstream.state, upstream.since = "down", time.time()
                upstream.next_probe = time.monotonic() + upstream.probe_wait
                upstream.probe_wait = min(upstream.probe_wait * 2, UPSTREAM_PROBE_S[1])
            if first:
                log.warning("upstream %s does not answer: %s", upstream.name, problem)
            return False
        window = card.get("max_model_len")
        window = window if isinstance(window, int) and window > 0 else None
        with self.lock:
            was, known = upstream.state, (upstream.model, upstream.context_length)
            if was != "up":
                upstream.state, upstream.error, upstream.since = "up", None, time.time()
            upstream.model, upstream.context_length = card["id"], window
            upstream.next_probe = time.monotonic() + UPSTREAM_REFRESH_S
            upstream.probe_wait = UPSTREAM_PROBE_S[0]
        if was != "up" or known != (upstream.model, window):
            log.info("upstream %s is %s: model %s, context %s", upstream.name, "back up" if was == "down" else "up",
                     upstream.model, window or "not reported")
        return True

    def mark_down(self, upstream: Upstream, reason: str) -> None:
        with self.lock:
            if upstream.state == "up":
                upstream.marked_down += 1
                upstream.since = time.time()
                log.warning("upstream %s marked down: %s", upstream.name, reason)
            upstream.state, upstream.error = "down", reason
            upstream.next_probe = time.monotonic() + UPSTREAM_PROBE_S[0]
            upstream.probe_wait = UPSTREAM_PROBE_S[0] * 2
        self.wake.set()

    def wait_ready(self, timeout: float | None = None) -> UpstreamModel:
        """Block until every upstream was probed once; none answering is a ModelLoadError (the CLI and
        stdio MCP print it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state == "loading" and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.05)
        if self.state == "ready" and not any(u.state == "up" for u in self.upstreams):
            raise ModelLoadError("no upstream answers: " + "; ".join(f"{u.name}: {u.error}" for u in self.upstreams))
        return self.require_model()

    def require_model(self) -> UpstreamModel:
        if self.state == "loading":
            raise ModelNotReady("the upstreams are being probed; retry when /health says ok")
        digest = hashlib.sha256(" ".join((self.cfg.served_model_name, *self.cfg.upstream_urls)).encode()).hexdigest()
        facts = {"family": "unknown", "size": 0, "params": 0, "mtime": self.started, "digest": digest}
        return UpstreamModel(self.cfg.served_model_name, self.context_length, facts)

    @property
    def context_length(self) -> int:
        """The smallest window the upstreams report, within MAX_MODEL_LEN when it is set."""
        known = [u.context_length for u in self.upstreams if u.context_length]
        limits = ([min(known)] if known else []) + ([self.cfg.max_model_len] if self.cfg.max_model_len else [])
        return min(limits) if limits else UPSTREAM_FALLBACK_CONTEXT

    @property
    def queue_depth(self) -> int:
        """Requests in flight at the upstreams (the front queues nothing itself)."""
        return sum(u.in_flight for u in self.upstreams)

    in_flight = queue_depth

    @property
    def running(self) -> bool | None:
        """Engine's "a job is generating", for /metrics."""
        return True if self.queue_depth else None

    def retry_after(self) -> int:
        """Seconds until the next probe of a down upstream may bring one back."""
        now = time.monotonic()
        return max(1, math.ceil(min((u.next_probe for u in self.upstreams if u.state != "up"), default=now + 1) - now))

    # -- requests --
    def reserve(self) -> Slot:
        """A place for one more request being read and decoded; the route frees it once the request
        is sent (the upstreams' own MAX_QUEUE each bounds what is in flight there)."""
        return admit(self, self.cfg.capacity, f"{self.cfg.capacity} requests already being read")

    @property
    def idle(self) -> bool:
        return self.admitted == 0 and self.in_flight == 0

    def stream(self, req: GenerationRequest, client_gone: Callable[[], bool] | None = None,
               whole: bool = False, slot: Slot | None = None) -> UpstreamStream:
        """Check what the front can, then send the request upstream: its answer status (and any refusal)
        is known before this returns, like Engine.submit's."""
        self.require_model()
        check_image_count(req, self.cfg)
        pieces = UpstreamStream(self, req, self.fit(req), client_gone, whole)
        pieces.connect()
        return pieces

    def fit(self, req: GenerationRequest) -> int:
        """The front has no tokenizer to count the prompt: an explicit ask that alone fills the window is
        refused here, the upstream checks the rest (its 400 comes back as it is)."""
        window = self.context_length
        asked = max(req.max_new_tokens if req.max_tokens_explicit else 1, req.min_new_tokens)
        if asked >= window:
            raise InputError(f"this model's context is {window} tokens and {asked} were asked for, which leaves no "
                             "room for the prompt", code="context_length_exceeded", param="messages")
        return req.max_new_tokens if req.max_tokens_explicit else min(req.max_new_tokens, window - 1)

    def acquire(self, exclude: list[Upstream]) -> Upstream:
        """The up upstream with the fewest requests in flight (ties: the least recently picked)."""
        with self.lock:
            live = [u for u in self.upstreams if u.state == "up" and u not in exclude]
            if not live:
                raise UpstreamFailure("no upstream is available: " + "; ".join(
                    f"{u.name} {u.state}" + (f" ({u.error})" if u.error else "") for u in self.upstreams),
                    503, "no_upstream", outcome="none", retry_after=self.retry_after())
            free = [u for u in live if u.in_flight < self.limit]
            if not free:
                raise Busy(f"server busy: every upstream has MAX_QUEUE={self.limit} requests in flight; retry shortly")
            best = min(free, key=lambda u: (u.in_flight, u.last_pick))
            self.picks += 1
            best.in_flight, best.last_pick = best.in_flight + 1, self.picks
            return best

    def release(self, upstream: Upstream, outcome: str, tokens: int = 0) -> None:
        with self.lock:
            upstream.in_flight -= 1
            upstream.outcomes[outcome] = upstream.outcomes.get(outcome, 0) + 1
            upstream.tokens += tokens

    def open(self, upstream: Upstream, payload: dict):
        """POST the chat completion and read its status: 200 gives the streaming response; a refusal is
        the client's (InputError, the upstream's own message) or an UpstreamFailure."""
        import httpx

        try:
            response = self.http.send(self.http.build_request("POST", f"{upstream.url}/chat/completions",
                                                              json={"model": upstream.model, **payload}), stream=True)
        except httpx.TimeoutException:
            raise self.timed_out(upstream, "to answer") from None
        except httpx.HTTPError as exc:
            raise UpstreamFailure(f"upstream {upstream.name} cannot be reached ({transport_problem(exc)})", 503,
                                  "upstream_unreachable", outcome="connect", retry_after=self.retry_after()) from None
        if response.status_code == 200:
            return response
        try:
            body = json.loads(response.read()[:65536])
        except (httpx.HTTPError, ValueError, UnicodeDecodeError, RecursionError):
            body = None
        finally:
            response.close()
        raise self.refusal(upstream, response, upstream_error(body) or {})

    def refusal(self, upstream: Upstream, response, error: dict) -> Exception:
        """A non-200 answer: 400/413/422 are the client's (its message, in the client's API shape);
        429/503 mean busy (another upstream is tried, nothing is marked down); 401/403 a wrong
        UPSTREAM_API_KEY and 5xx a failure (marked down); any other status a bad gateway."""
        status = response.status_code
        message = str(error.get("message") or f"HTTP {status}")
        if status in (400, 413, 422) or (400 <= status < 500 and status not in (401, 403, 404, 408, 429)):
            code, param = error.get("code"), error.get("param")
            return InputError(message, status=413 if status == 413 else 400,
                              param=param if isinstance(param, str) else None,
                              code=code if isinstance(code, str) else "invalid_request")
        where = f"upstream {upstream.name} answered HTTP {status}: {message}"
        if status in (429, 503):
            wait = response.headers.get("Retry-After", "")
            return UpstreamFailure(where, 503, "upstream_busy", outcome="busy", down=False,
                                   retry_after=int(wait) if wait.isdigit() else 1)
        if status in (401, 403):
            return UpstreamFailure(f"{where} (check UPSTREAM_API_KEY)", 502, "upstream_auth", outcome="rejected")
        return UpstreamFailure(where, 502, outcome="http_error", down=status >= 500)

    def timed_out(self, upstream: Upstream, what: str) -> UpstreamFailure:
        return UpstreamFailure(f"upstream {upstream.name} sent nothing for UPSTREAM_TIMEOUT="
                               f"{self.cfg.upstream_timeout:g} s (waiting {what})", 504, "upstream_timeout",
                               outcome="timeout")

    def finished(self, c: Completion) -> None:
        with self.lock:
            outcome = {"error": "failed", "cancelled": "cancelled"}.get(c.finish_reason, "done")
            self.stats[f"jobs_{outcome}"] += 1
            self.stats["tokens_generated"] += c.completion_tokens

    def note_retry(self) -> None:
        with self.lock:
            self.retries += 1


class UpstreamStream:
    """TextStream's interface over one request sent upstream: iterate text pieces as they arrive;
    `.completion` (the upstream's usage) when it ends; `.tokens` (content chunks so far, MCP progress);
    `.job.max_new_tokens`; `.cancel()`, from any thread, ends the upstream stream at once."""

    POLL_S = TextStream.POLL_S

    def __init__(self, pool: UpstreamPool, req: GenerationRequest, max_new_tokens: int,
                 client_gone: Callable[[], bool] | None, whole: bool):
        self.pool, self.whole = pool, whole
        self.job = UpstreamJob(req, max_new_tokens)
        self.payload = upstream_payload(req, max_new_tokens)
        self.client_gone = client_gone or (lambda: False)
        self.completion: Completion | None = None
        self.tokens = 0
        self.tried: list[Upstream] = []
        self.upstream: Upstream | None = None  # the one this request holds a place at
        self.response = None
        self.usage: dict = {}
        self.finish: str | None = None
        self.iterating = False
        self.lock = threading.Lock()

    def connect(self, failure: UpstreamFailure | None = None) -> None:
        """Send to the best upstream not tried yet; a failure the client cannot have seen (refused, 5xx,
        busy, timeout) is tried once more elsewhere. Raises the (last) failure when none is left."""
        while True:
            try:
                upstream = self.pool.acquire(self.tried)
            except (UpstreamFailure, Busy):
                if failure is None:
                    raise
                raise failure from None
            self.tried.append(upstream)
            try:
                self.response, self.upstream = self.pool.open(upstream, self.payload), upstream
                return
            except InputError:
                self.pool.release(upstream, "rejected")
                raise
            except UpstreamFailure as exc:
                self.pool.release(upstream, exc.outcome)
                if exc.down:
                    self.pool.mark_down(upstream, str(exc))
                if failure is not None or not exc.retriable:
                    raise
                failure = exc
                log.info("retrying on another upstream: %s", exc)
                self.pool.note_retry()

    def cancel(self) -> None:
        self.job.cancel()
        self._shutdown()
        if not self.iterating and self.completion is None:  # never read (the client left first): free its place
            self._end_attempt("cancelled")
            self.completion = Completion("", "cancelled", 0, 0, 0.0, time.perf_counter() - self.job.submitted)
            self.pool.finished(self.completion)

    def _shutdown(self) -> None:
        """Wake a read blocked on the upstream's socket: shutdown (safe from any thread), not close."""
        import socket

        response = self.response
        network = response.extensions.get("network_stream") if response is not None else None
        sock = network.get_extra_info("socket") if network is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _end_attempt(self, outcome: str, failure: UpstreamFailure | None = None) -> None:
        """Close the upstream response and give its place back (once)."""
        with self.lock:
            upstream, response, self.upstream = self.upstream, self.response, None
        if upstream is None:
            return
        response.close()
        self.pool.release(upstream, outcome, int(self.usage.get("completion_tokens") or 0))
        if failure is not None and failure.down:
            self.pool.mark_down(upstream, str(failure))

    def _read(self) -> Iterator[str]:
        """The content pieces of the upstream's SSE; usage and finish_reason kept; transport problems,
        a timeout, an error event or a stream that ends early raise UpstreamFailure."""
        import httpx

        upstream, ended = self.upstream, False
        next_poll = time.monotonic() + self.POLL_S
        try:
            for line in self.response.iter_lines():
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self.POLL_S
                    if not self.job.cancelled.is_set() and self.client_gone():
                        log.info("client disconnected: closing the upstream stream")
                        self.job.cancel()
                if self.job.cancelled.is_set():
                    return
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    ended = True
                    break
                event = json.loads(data)
                error = upstream_error(event)
                if error is not None:
                    raise UpstreamFailure(f"upstream {upstream.name} failed: {error.get('message') or error}",
                                          outcome="failed", down=False, retriable=False)
                if isinstance(event.get("usage"), dict):
                    self.usage = event["usage"]
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    piece = delta.get("content") or self.tool_call_text(delta.get("tool_calls"))
                    if piece:
                        yield piece
                    if choice.get("finish_reason"):
                        if self.in_call:
                            yield '}' + TOOL_CALL_CLOSE
                            self.in_call = False
                        self.finish = UPSTREAM_FINISH.get(choice["finish_reason"], "stop")
        except httpx.TimeoutException:
            raise self.pool.timed_out(upstream, "for the next piece of the answer" if self.tokens
                                      else "for the first token") from None
        except (httpx.HTTPError, httpx.StreamError) as exc:
            if self.job.cancelled.is_set():
                return
            raise UpstreamFailure(f"upstream {upstream.name} broke off the answer after {self.tokens} pieces "
                                  f"({transport_problem(exc)})", 502, "upstream_broken", outcome="broken") from None
        except (ValueError, AttributeError, TypeError, RecursionError):
            raise UpstreamFailure(f"upstream {upstream.name} sent something that is not an OpenAI chat completion "
                                  "stream", 502, outcome="http_error", down=False, retriable=False) from None
        if not ended and self.finish is None and not self.job.cancelled.is_set():
            raise UpstreamFailure(f"upstream {upstream.name} ended the stream before the answer was complete",
                                  502, "upstream_broken", outcome="broken")

    in_call = False  # inside the upstream's (first) tool call, as <tool_call> text

    def tool_call_text(self, calls) -> str:
        """An upstream tool_calls delta as the text our grammar would have written."""
        if not isinstance(calls, list) or not calls or calls[0].get("index", 0) != 0:
            return ""
        function = calls[0].get("function") or {}
        head = ""
        if not self.in_call and function.get("name"):
            self.in_call = True
            head = f'{TOOL_CALL_OPEN}{{"name": "{function["name"]}", "arguments": '
        return head + (function.get("arguments") or "") if self.in_call else ""

    def __iter__(self) -> Iterator[str]:
        self.iterating = True
        first_at, finish, held = None, "error", []
        try:
            while True:
                try:
                    for piece in self._read():
                        first_at = first_at or time.perf_counter()
                        self.tokens += 1
                        if self.whole:
                            held.append(piece)
                        else:
                            yield piece
                    break
                except UpstreamFailure as exc:
                    if self.job.cancelled.is_set():
                        break
                    self._end_attempt(exc.outcome, exc)
                    if (self.tokens and not self.whole) or len(self.tried) > 1 or not exc.retriable:
                        raise
                    log.info("retrying on another upstream: %s", exc)
                    self.pool.note_retry()
                    first_at, held, self.tokens, self.usage, self.finish = None, [], 0, {}, None
                    try:
                        self.connect(failure=exc)
                    except InputError as refusal:  # a stream's status is sent: it can only end with a marker
                        if self.whole:
                            raise
                        raise UpstreamFailure(refusal.message, retriable=False) from None
            if held:
                yield "".join(held)
            finish = "cancelled" if self.job.cancelled.is_set() else (self.finish or "stop")
        except GeneratorExit:  # the consumer (a client that hung up) stopped reading
            finish = "cancelled"
            raise
        finally:
            self._end_attempt({"error": "failed", "cancelled": "cancelled"}.get(finish, "ok"))
            now = time.perf_counter()
            job = self.job
            self.completion = Completion("", finish, int(self.usage.get("prompt_tokens") or 0),
                                         int(self.usage.get("completion_tokens") or self.tokens),
                                         (first_at or now) - job.submitted, now - job.submitted)
            self.pool.finished(self.completion)


def make_engine(cfg: Config) -> Engine | UpstreamPool:
    """The local model's engine, or with BACKEND=openai the pool of upstreams (the same interface)."""
    return UpstreamPool(cfg) if cfg.backend == "openai" else Engine(cfg)


# ======================================================================================
# 5. HTTP routes (seed REST, OpenAI, Ollama, MCP) -- no torch below this line
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
    """The error in the shape the caller's API speaks: seed {error, detail}, OpenAI, Ollama
    {error}, or JSON-RPC."""
    if request.path.startswith("/v1/"):
        body = openai_error(status, message, param, code)
    elif request.path.startswith("/api/"):
        body = {"error": message}
    elif request.path.rstrip("/") == "/mcp":
        body = jsonrpc_error(posted_request_id(), -32000 if status != 404 else -32001, message)
    else:
        body = {"error": message, "detail": detail or message}
    response = jsonify(body)
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="hcx-server"'
    return response


def posted_request_id() -> str | int | None:
    """The JSON-RPC id of a POSTed MCP body that fits the size limit (errors echo it), else None."""
    if request.method != "POST" or (request.content_length or 0) > (request.max_content_length or 0):
        return None
    try:
        return readable_id(parse_json(request.get_data(cache=True)))
    except (ValueError, UnicodeDecodeError, RecursionError, HTTPException):
        return None


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

    @app.errorhandler(UpstreamFailure)
    def upstream_failure(exc: UpstreamFailure):
        return error_response(exc.status, str(exc), code=exc.code, retry_after=exc.retry_after)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        message = exc.name
        family = next((f for f in ("/v1/", "/api/") if request.path.startswith(f)), None)
        if exc.code == 404 and family:
            message = (f"{request.method} {request.path} is not an endpoint of this server; it serves "
                       f"{', '.join(endpoints_under(app, family))}")
        return error_response(exc.code or 500, message, exc.description, code=exc.name.lower().replace(" ", "_"))

    @app.errorhandler(Exception)
    def server_fault(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal server error", f"{type(exc).__name__}: {exc}", code="internal_error")


def endpoints_under(app: Flask, prefix: str) -> list[str]:
    """'METHOD /path' for every route under `prefix`, read from the app itself (never stale)."""
    found = []
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.rule.startswith(prefix):
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
            found += [f"{method} {path}" for method in sorted(rule.methods - {"HEAD", "OPTIONS"})]
    return found


# -- OpenAI chat completions: the answer and its chunk stream -------------------------------------

FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop", "error": "stop"}


def usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


INCOMPLETE_JSON = "max_tokens was reached before the structured answer (JSON) was complete"
TOOL_CALL_TEXT = re.compile(re.escape(TOOL_CALL_OPEN) + r'\{"name": "(?P<name>[A-Za-z0-9_.-]+)", "arguments": '
                            r"(?P<arguments>.*)\}" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


def tool_call_of(text: str) -> dict | None:
    """An answer that is a <tool_call> (the grammar's fixed layout) as an OpenAI tool call, else None."""
    match = TOOL_CALL_TEXT.fullmatch(text)
    if match is None:
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": match["name"], "arguments": match["arguments"]}}


def chat_completion(c: Completion, completion_id: str, created: int, model: str,
                    constraint: Constraint | None = None) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": c.text}
    choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None,
                              "finish_reason": FINISH_REASONS[c.finish_reason]}
    call = tool_call_of(c.text) if constraint is not None and constraint.kind == "tool" else None
    if call is not None:
        message.update(content=None, tool_calls=[call])
        choice["finish_reason"] = "tool_calls"
    elif constraint is not None and c.finish_reason == "length":
        choice["incomplete"] = INCOMPLETE_JSON  # beside finish_reason "length": the JSON does not parse
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [choice], "usage": usage(c), "system_fingerprint": None}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def chat_deltas(pieces: Iterator[str], tools: bool) -> Iterator[dict]:
    """Content deltas; for a tool request, an answer that is a <tool_call> becomes tool_calls deltas
    instead: the call's id and name once its prefix is out, then its arguments as they come."""
    if not tools:
        for piece in pieces:
            yield {"content": piece}
        return
    held, head, emitted = "", None, 0
    tail = len("}" + TOOL_CALL_CLOSE)
    for piece in pieces:
        held += piece
        if head is None:
            if not TOOL_CALL_OPEN.startswith(held[:len(TOOL_CALL_OPEN)]):
                yield {"content": held}  # a text answer (auto): passed through as it comes
                held, head = "", False
                continue
            match = re.match(re.escape(TOOL_CALL_OPEN) + r'\{"name": "([A-Za-z0-9_.-]+)", "arguments": ', held)
            if match is None:
                continue
            head = match.end()
            yield {"tool_calls": [{"index": 0, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                   "function": {"name": match[1], "arguments": ""}}]}
            emitted = head
        elif head is False:
            yield {"content": held}
            held = ""
            continue
        if head and len(held) - tail > emitted:  # arguments so far, holding back what may be the closing
            yield {"tool_calls": [{"index": 0, "function": {"arguments": held[emitted:len(held) - tail]}}]}
            emitted = len(held) - tail
    if head is None and held:
        yield {"content": held}
    elif head:
        rest = held[emitted:]
        rest = rest[:-tail] if rest.endswith("}" + TOOL_CALL_CLOSE) else rest
        if rest:
            yield {"tool_calls": [{"index": 0, "function": {"arguments": rest}}]}


def chat_completion_chunks(pieces: TextStream, completion_id: str, created: int, model: str, include_usage: bool,
                           access: dict | None, constraint: Constraint | None = None) -> Iterator[str]:
    """SSE: role first, content (or tool_calls) deltas as tokens arrive, finish_reason, usage if asked, [DONE]."""

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **extra}]
        return sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": choices, **({"usage": None} if include_usage else {})})

    called = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        for delta in chat_deltas(pieces, constraint is not None and constraint.kind == "tool"):
            called = called or "tool_calls" in delta
            yield chunk(delta)
    except GenerationError as exc:
        yield sse(openai_error(500, str(exc), code="generation_failed"))
        return
    finally:
        record_completion(access, pieces.completion)
    c = pieces.completion
    finish = FINISH_REASONS[c.finish_reason]
    incomplete = constraint is not None and finish == "length"
    yield chunk({}, "tool_calls" if called and not incomplete else finish,
                **({"incomplete": INCOMPLETE_JSON} if incomplete else {}))
    if include_usage:
        yield sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [], "usage": usage(c)})
    yield sse("[DONE]")


# -- OpenAI Responses API: the response object and its event stream ------------------------------

RESPONSE_STATUS = {"stop": "completed", "cancelled": "completed", "length": "incomplete", "error": "failed"}


def response_usage(c: Completion) -> dict:
    return {"input_tokens": c.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": c.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def response_echo(body: Mapping, req: GenerationRequest, model: str) -> dict:
    """The request's fields a response object repeats, fixed when the request is read."""
    metadata = body.get("metadata")
    return {"id": f"resp_{uuid.uuid4().hex}", "created_at": int(time.time()), "model": model,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "temperature": req.temperature, "top_p": req.top_p,
            "metadata": metadata if isinstance(metadata, dict) else {}}


def response_body(echo: dict, status: str, output: list, c: Completion | None = None,
                  error: dict | None = None) -> dict:
    return {"id": echo["id"], "object": "response", "created_at": echo["created_at"], "status": status,
            "error": error, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": echo["instructions"], "max_output_tokens": echo["max_output_tokens"],
            "model": echo["model"], "output": output, "parallel_tool_calls": False, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False, "temperature": echo["temperature"],
            "text": {"format": {"type": "text"}}, "tool_choice": "none", "tools": [], "top_p": echo["top_p"],
            "truncation": "disabled", "usage": response_usage(c) if c is not None else None, "user": None,
            "metadata": echo["metadata"]}


def output_text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def output_message(item_id: str, status: str, text: str | None = None) -> dict:
    """The assistant message item; no content part yet while it is being announced."""
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [] if text is None else [output_text_part(text)]}


class AnswerTexts:
    """The text of the last answers /v1/responses gave, by output item id: clients refer back to
    an earlier assistant turn with an item_reference (the Vercel AI SDK does by default). Bounded,
    in memory; nothing else of a response is kept."""

    MAX_ITEMS = 4096

    def __init__(self):
        self.texts: dict[str, str] = {}
        self.lock = threading.Lock()

    def remember(self, item_id: str, text: str) -> None:
        with self.lock:
            while len(self.texts) >= self.MAX_ITEMS:
                self.texts.pop(next(iter(self.texts)))
            self.texts[item_id] = text

    def recall(self, item_id) -> str | None:
        with self.lock:
            return self.texts.get(item_id) if isinstance(item_id, str) else None


def response_events(pieces: TextStream, echo: dict, access: dict | None,
                    remember: Callable[[str, str], None]) -> Iterator[str]:
    """SSE as OpenAI sends it: created, in_progress, the item and its text part announced, text
    deltas as tokens arrive, the done events, then response.completed (or .incomplete at the token
    limit); a failure mid-answer is response.failed."""
    sequence = iter(range(1 << 62))
    item_id = f"msg_{uuid.uuid4().hex}"
    at = {"item_id": item_id, "output_index": 0, "content_index": 0}

    def event(kind: str, **fields) -> str:
        payload = json.dumps({"type": kind, "sequence_number": next(sequence), **fields}, ensure_ascii=False)
        return f"event: {kind}\ndata: {payload}\n\n"

    yield event("response.created", response=response_body(echo, "in_progress", []))
    yield event("response.in_progress", response=response_body(echo, "in_progress", []))
    yield event("response.output_item.added", output_index=0, item=output_message(item_id, "in_progress"))
    yield event("response.content_part.added", **at, part=output_text_part(""))
    text = []
    try:
        for piece in pieces:
            text.append(piece)
            yield event("response.output_text.delta", **at, delta=piece, logprobs=[])
    except GenerationError as exc:
        failure = {"code": "server_error", "message": str(exc)}
        yield event("response.failed", response=response_body(echo, "failed", [], pieces.completion, failure))
        return
    finally:
        record_completion(access, pieces.completion)
    c, full = pieces.completion, "".join(text)
    status = RESPONSE_STATUS[c.finish_reason]
    item = output_message(item_id, "completed" if status == "completed" else "incomplete", full)
    remember(item_id, full)
    yield event("response.output_text.done", **at, text=full, logprobs=[])
    yield event("response.content_part.done", **at, part=output_text_part(full))
    yield event("response.output_item.done", output_index=0, item=item)
    yield event(f"response.{status}", response=response_body(echo, status, [item], c))


# -- Ollama API: model listing, answers and the NDJSON stream --------------------------------------

OLLAMA_API_VERSION = "0.12.6"  # the Ollama release whose API this subset follows (tools gate features on it)
OLLAMA_DONE_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop", "error": "stop"}


def ollama_time(seconds: float | None = None) -> str:
    from datetime import datetime, timezone

    stamp = datetime.fromtimestamp(time.time() if seconds is None else seconds, timezone.utc)
    return stamp.isoformat(timespec="microseconds").replace("+00:00", "Z")


@functools.lru_cache(maxsize=4)
def weights_facts(folder: str) -> dict:
    """What Ollama lists about a model, read from its files (never from torch): config.json's
    model type, the weights' bytes and (from safetensors headers) parameter count, the mtime."""
    path = Path(folder)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")] if path.is_dir() else []
    params = 0
    for file in (p for p in weights if p.suffix == ".safetensors"):
        try:
            with open(file, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            params += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
        except (OSError, ValueError, KeyError, TypeError):
            params = 0
            break
    size = sum(p.stat().st_size for p in weights)
    mtime = (path / "config.json").stat().st_mtime if (path / "config.json").exists() else time.time()
    return {"family": str(config.get("model_type") or "unknown"), "size": size, "params": params, "mtime": mtime,
            "digest": hashlib.sha256(f"{path.resolve()}:{size}:{mtime}".encode()).hexdigest()}


def ollama_name(cfg: Config) -> str:
    return f"{cfg.served_model_name}:latest"


def model_facts(m: LoadedModel | UpstreamModel) -> dict:
    """weights_facts of the local folder; upstreams' models carry what the front knows of them."""
    return m.facts if isinstance(m, UpstreamModel) else weights_facts(m.path)


def ollama_details(m: LoadedModel | UpstreamModel) -> dict:
    facts = model_facts(m)
    params = facts["params"]
    size = f"{params / 1e9:.1f}B" if params >= 1e8 else f"{params / 1e6:.1f}M" if params else ""
    dtype = str(m.dtype).replace("torch.", "")
    level = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(dtype, "unknown")
    return {"parent_model": "", "format": "safetensors", "family": facts["family"], "families": [facts["family"]],
            "parameter_size": size, "quantization_level": level}


def ollama_model_entry(cfg: Config, m: LoadedModel | UpstreamModel) -> dict:
    facts = model_facts(m)
    return {"name": ollama_name(cfg), "model": ollama_name(cfg), "modified_at": ollama_time(facts["mtime"]),
            "size": facts["size"], "digest": facts["digest"], "details": ollama_details(m)}


def ollama_show(cfg: Config, m: LoadedModel | UpstreamModel) -> dict:
    facts = model_facts(m)
    family = facts["family"]
    return {"license": "", "modelfile": "", "parameters": "", "template": "", "details": ollama_details(m),
            "model_info": {"general.architecture": family, "general.parameter_count": facts["params"],
                           f"{family}.context_length": m.context_length},
            "capabilities": ["completion", "vision"], "modified_at": ollama_time(facts["mtime"])}


def ollama_stats(c: Completion) -> dict:
    """Ollama's counters and durations (nanoseconds); the model is already loaded, so no load time."""
    def ns(seconds: float) -> int:
        return int(seconds * 1e9)

    return {"done_reason": OLLAMA_DONE_REASONS[c.finish_reason], "total_duration": ns(c.total_s), "load_duration": 0,
            "prompt_eval_count": c.prompt_tokens, "prompt_eval_duration": ns(c.ttft_s),
            "eval_count": c.completion_tokens, "eval_duration": ns(max(c.total_s - c.ttft_s, 0.0))}


def ollama_text(chat: bool, text: str) -> dict:
    """/api/chat answers carry a message, /api/generate a response string."""
    return {"message": {"role": "assistant", "content": text}} if chat else {"response": text}


def ollama_answer(model: str, chat: bool, c: Completion) -> dict:
    return {"model": model, "created_at": ollama_time(), **ollama_text(chat, c.text), "done": True, **ollama_stats(c)}


def ollama_loaded(model: str, chat: bool) -> dict:
    """Ollama's answer to a call with nothing to generate: the model is (already) loaded."""
    return {"model": model, "created_at": ollama_time(), **ollama_text(chat, ""), "done": True, "done_reason": "load"}


def ollama_chunks(pieces: TextStream, model: str, chat: bool, access: dict | None) -> Iterator[str]:
    """NDJSON: one object per text piece (done: false), then the counters (done: true); a failure
    mid-answer is a last {"error": ...} line, as Ollama sends it."""
    def line(obj: dict) -> str:
        return json.dumps(obj, ensure_ascii=False) + "\n"

    try:
        for piece in pieces:
            yield line({"model": model, "created_at": ollama_time(), **ollama_text(chat, piece), "done": False})
    except GenerationError as exc:
        yield line({"error": str(exc)})
        return
    finally:
        record_completion(access, pieces.completion)
    yield line({"model": model, "created_at": ollama_time(), **ollama_text(chat, ""), "done": True,
                **ollama_stats(pieces.completion)})


# -- MCP: JSON-RPC 2.0 handler shared by POST /mcp and stdio (hcx-cli mcp) --------------------
# Two eras. Handshake era (2024-11-05 .. 2025-11-25): `initialize` agrees a version, HTTP keeps it
# in a session (Mcp-Session-Id). Modern era (2026-07-28): no handshake and no sessions; every
# request carries its version and the client's capabilities in params._meta (and, over HTTP, in
# headers that must match the body); `server/discover` advertises what the server speaks. A
# request carrying that _meta is served in the modern era, anything else in the handshake era.

MCP_HANDSHAKE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
MCP_MODERN_VERSIONS = ("2026-07-28",)
MCP_PROTOCOL_VERSIONS = MCP_HANDSHAKE_VERSIONS + MCP_MODERN_VERSIONS
MCP_ASSUMED_VERSION = "2025-03-26"  # a request without MCP-Protocol-Version (Caret sends none)
META_VERSION = "io.modelcontextprotocol/protocolVersion"
META_CAPABILITIES = "io.modelcontextprotocol/clientCapabilities"
META_SERVER_INFO = "io.modelcontextprotocol/serverInfo"
HEADER_MISMATCH, UNSUPPORTED_VERSION = -32020, -32022  # the spec's codes (2026-07-28)
# HTTP status of a modern-era JSON-RPC error (the spec's table); other errors, and every error of
# the handshake era (Caret throws on any non-2xx), are HTTP 200.
MODERN_ERROR_STATUS = {-32700: 400, -32600: 400, -32602: 400, HEADER_MISMATCH: 400, -32021: 400,
                       UNSUPPORTED_VERSION: 400, -32601: 404}
MCP_CACHE = {"cacheScope": "public", "ttlMs": 300_000}  # the tool list never changes while the server runs
TOOL_NAME = "generate_hyperclovax_vision"
SERVER_INFO = {"name": "hcx-server", "title": "HyperCLOVA X SEED Vision (local)", "version": __version__}
MCP_INSTRUCTIONS = f"Call {TOOL_NAME} to ask the local vision-language model about an image."


class McpError(Exception):
    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(message)
        self.code, self.message, self.data = code, message, data


def unsupported_version(requested: str) -> McpError:
    """-32022 with the versions to pick from (clients retry with one of them)."""
    return McpError(UNSUPPORTED_VERSION, f"unsupported protocol version {requested!r}; this server speaks "
                    f"{', '.join(MCP_PROTOCOL_VERSIONS)} ({', '.join(MCP_HANDSHAKE_VERSIONS)} through initialize)",
                    {"supported": list(MCP_PROTOCOL_VERSIONS), "requested": requested})


def modern_version(msg) -> Any:
    """The protocol version a modern-era message carries in params._meta, or None (handshake era)."""
    params = msg.get("params") if isinstance(msg, dict) else None
    meta = params.get("_meta") if isinstance(params, dict) else None
    return meta.get(META_VERSION) if isinstance(meta, dict) else None


def readable_id(msg) -> str | int | None:
    """The request id, when the message has a valid one (errors echo it)."""
    msg_id = msg.get("id") if isinstance(msg, dict) else None
    return msg_id if isinstance(msg_id, (str, int)) and not isinstance(msg_id, bool) else None


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
        "json_schema": {"type": "object", "description": "Optional JSON schema: the answer is then JSON valid "
                                                         "against it (constrained decoding)."},
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


class TooManySessions(Exception):
    """Every session slot is held by a session used within MCP_SESSION_IDLE_S."""


class McpServer:
    """The MCP protocol (tools only) over any transport: messages in, messages out.

    handle() yields progress notifications while a tool runs (when asked for) and then the
    response; it yields nothing for notifications. Handshake-era sessions are just ids with a
    protocol version; in-flight tool calls are kept so notifications/cancelled can stop them.

    Sessions: at most MAX_SESSIONS. When they are all taken, a new initialize evicts the sessions
    idle longest, but only those idle for SESSION_IDLE_S or more; if none is, the initialize is
    refused (503) instead, so a flood of initialize calls cannot evict sessions in use. (Bounding
    sessions per client would not help: on loopback every client has the same address.) An
    evicted client gets 404 and initializes again, as the spec says.
    """

    MAX_SESSIONS = 1024
    SESSION_IDLE_S = 300.0

    def __init__(self, engine: Engine | UpstreamPool, stdio: bool = False):
        self.engine, self.stdio = engine, stdio
        self.sessions: dict[str, str] = {}  # id -> negotiated protocol version
        self.last_used: dict[str, float] = {}  # id -> monotonic time, least recently used first
        self.inflight: dict[tuple[str, str], TextStream] = {}
        self.lock = threading.Lock()

    # -- sessions (handshake era) --
    def open_session(self, version: str) -> str:
        """A new session id; TooManySessions when every slot is held by a session in use."""
        with self.lock:
            now = time.monotonic()
            while len(self.sessions) >= self.MAX_SESSIONS:
                oldest = next(iter(self.last_used))
                if now - self.last_used[oldest] < self.SESSION_IDLE_S:
                    raise TooManySessions(f"{len(self.sessions)} MCP sessions are open and in use; retry later or "
                                          "end unused sessions (DELETE /mcp)")
                self.sessions.pop(oldest)
                self.last_used.pop(oldest)
            session = uuid.uuid4().hex
            self.sessions[session] = version
            self.last_used[session] = now
            return session

    def has_session(self, session: str) -> bool:
        """Whether the session exists; using it marks it recently used."""
        with self.lock:
            if session not in self.sessions:
                return False
            self.last_used.pop(session)
            self.last_used[session] = time.monotonic()
            return True

    def close_session(self, session: str) -> bool:
        with self.lock:
            self.last_used.pop(session, None)
            return self.sessions.pop(session, None) is not None

    # -- messages --
    def handle(self, msg, session: str = "", client_gone: Callable[[], bool] | None = None,
               progress: bool = False, access: dict | None = None, slot: Slot | Busy | None = None) -> Iterator[dict]:
        """`slot`: the queue place a tools/call runs in (a batch reserves them up front; Busy when
        it got none); None: taken when the call is submitted."""
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
            yield jsonrpc_error(readable_id(msg), -32600, "invalid request: expected a JSON-RPC 2.0 object")
            return
        method, msg_id = msg.get("method"), msg.get("id")
        if method is None and ("result" in msg or "error" in msg):
            return  # a response to a server request; we send none, so nothing to do
        if not isinstance(method, str) or ("id" in msg and readable_id(msg) is None):
            yield jsonrpc_error(readable_id(msg), -32600,
                                "invalid request: 'method' must be a string and 'id' a string or integer")
            return
        params = msg.get("params", {})
        if "id" not in msg:
            self.notification(method, params if isinstance(params, dict) else {}, session)
            return
        try:
            if not isinstance(params, dict):
                raise McpError(-32602, "'params' must be an object")
            version = self.request_version(params)
            if method == "tools/call":
                for reply in self.call_tool(msg_id, params, session, client_gone, progress, access, slot):
                    yield self.stamped(reply, version)
                return
            yield self.stamped({"jsonrpc": "2.0", "id": msg_id, "result": self.dispatch(method, params, version)},
                               version)
        except McpError as exc:
            yield jsonrpc_error(msg_id, exc.code, exc.message, exc.data)

    @staticmethod
    def request_version(params: dict) -> str | None:
        """The modern version this request speaks (its _meta checked as the spec requires), or None
        for a handshake-era request."""
        meta = params.get("_meta")
        if not isinstance(meta, dict) or META_VERSION not in meta:
            return None
        version = meta[META_VERSION]
        if not isinstance(version, str):
            raise McpError(-32602, f"params._meta['{META_VERSION}'] must be a string")
        if not isinstance(meta.get(META_CAPABILITIES), dict):
            raise McpError(-32602, f"params._meta['{META_CAPABILITIES}'] (an object) is required on every "
                                   f"{version} request")
        if version not in MCP_MODERN_VERSIONS:
            raise unsupported_version(version)
        return version

    @staticmethod
    def stamped(reply: dict, version: str | None) -> dict:
        """Modern-era results say their type and who answered (the server has no session to say it once)."""
        if version is None or "result" not in reply:
            return reply
        result = reply["result"]
        meta = {**result.get("_meta", {}), META_SERVER_INFO: SERVER_INFO}
        return {**reply, "result": {**result, "resultType": "complete", "_meta": meta}}

    def dispatch(self, method: str, params: dict, version: str | None) -> dict:
        tools = {"tools": [tool_definition(self.engine.cfg, self.stdio)]}
        if version is None:
            if method == "initialize":
                asked = params.get("protocolVersion")
                return {"protocolVersion": asked if asked in MCP_HANDSHAKE_VERSIONS else MCP_HANDSHAKE_VERSIONS[-1],
                        "capabilities": {"tools": {"listChanged": False}}, "serverInfo": SERVER_INFO,
                        "instructions": MCP_INSTRUCTIONS}
            if method == "ping":
                return {}
            if method == "tools/list":
                return tools
            raise McpError(-32601, f"method not found: {method}")
        if method == "server/discover":
            return {"supportedVersions": list(MCP_PROTOCOL_VERSIONS), "capabilities": {"tools": {"listChanged": False}},
                    "instructions": MCP_INSTRUCTIONS, **MCP_CACHE}
        if method == "tools/list":
            return {**tools, **MCP_CACHE}
        raise McpError(-32601, f"method not found: {method} (protocol {version} here: server/discover, "
                               "tools/list, tools/call)")

    def notification(self, method: str, params: dict, session: str) -> None:
        if method == "notifications/cancelled":
            with self.lock:
                pieces = self.inflight.get((session, json.dumps(params.get("requestId"))))
            if pieces is not None:
                log.info("MCP request %s cancelled by the client", params.get("requestId"))
                pieces.cancel()

    def call_tool(self, msg_id, params: dict, session: str, client_gone, progress: bool,
                  access: dict | None = None, slot: Slot | Busy | None = None) -> Iterator[dict]:
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
            if isinstance(slot, Busy):
                raise slot
            with slot or self.engine.reserve() as held:  # taken before the image is decoded
                pieces = stream(self.engine, prompt_request(arguments, self.engine.cfg, self.stdio), client_gone,
                                held)
        except InputError as exc:
            yield {"jsonrpc": "2.0", "id": msg_id, "result": tool_result(f"invalid input: {exc.message}", True)}
            return
        except (Busy, ModelNotReady, ModelLoadError, GenerationError) as exc:  # an upstream's failure too
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
        answer = "".join(text)
        if pieces.job.request.constraint is None:
            yield {"jsonrpc": "2.0", "id": msg_id, "result": tool_result(answer)}
        elif pieces.completion.finish_reason == "length":
            yield {"jsonrpc": "2.0", "id": msg_id, "result": tool_result(f"{INCOMPLETE_JSON}: {answer}", True)}
        else:  # the JSON the schema asked for; an object is also the result's structured content
            value = json.loads(answer)
            structured = {"structuredContent": value} if isinstance(value, dict) else {}
            yield {"jsonrpc": "2.0", "id": msg_id, "result": {**tool_result(answer), **structured}}


def mcp_http(mcp: McpServer) -> Response:
    """Streamable HTTP, both eras on one endpoint. A known Mcp-Session-Id fixes the handshake era
    (its requests must not claim another era's version); MCP-Protocol-Version 2026-07-28 or a body
    with modern _meta selects the modern era; anything else is the handshake era, a missing header
    meaning 2025-03-26 (Caret sends none)."""
    version = request.headers.get("MCP-Protocol-Version")
    session = request.headers.get("Mcp-Session-Id")
    try:
        message = parse_json(request.get_data(cache=True))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return mcp_json(jsonrpc_error(None, -32700, f"parse error: {exc}"), 400)
    msg_id = readable_id(message)
    if session is not None and mcp.has_session(session):
        if version is not None and version not in MCP_HANDSHAKE_VERSIONS:
            return mcp_json(jsonrpc_error(msg_id, -32600, (
                f"unsupported MCP-Protocol-Version {version!r} in a session (negotiated "
                f"{mcp.sessions.get(session, MCP_ASSUMED_VERSION)} by initialize); sessions speak "
                f"{', '.join(MCP_HANDSHAKE_VERSIONS)}, and {', '.join(MCP_MODERN_VERSIONS)} requests carry no "
                "Mcp-Session-Id")), 400)
        return mcp_handshake_http(mcp, message, session)
    if version in MCP_MODERN_VERSIONS or modern_version(message) is not None:
        return mcp_modern_http(mcp, message, version)
    if version is not None and version not in MCP_HANDSHAKE_VERSIONS:
        error = unsupported_version(version)
        return mcp_json(jsonrpc_error(msg_id, error.code, error.message, error.data), 400)
    if session is not None:
        return mcp_json(jsonrpc_error(msg_id, -32001, "unknown or expired session; initialize again"), 404)
    return mcp_handshake_http(mcp, message, "")


MCP_MAX_BATCH = 16  # messages in one 2025-03-26 batch (clients send a few; later versions dropped batches)


def is_tool_call(msg) -> bool:
    return isinstance(msg, dict) and msg.get("method") == "tools/call" and "id" in msg


def mcp_batch(mcp: McpServer, batch: list, session: str, gone: Callable[[], bool], access: dict | None) -> Response:
    """A 2025-03-26 batch: at most MCP_MAX_BATCH messages; its tool calls take their places in the
    queue up front (those beyond the free places answer 'server busy'), run one after another,
    and once the client has gone the rest is not started."""
    if not batch:
        return mcp_json(jsonrpc_error(None, -32600, "invalid request: empty batch"), 400)
    if len(batch) > MCP_MAX_BATCH:
        return mcp_json(jsonrpc_error(None, -32600, f"invalid request: a batch of {len(batch)} messages; at most "
                                                    f"{MCP_MAX_BATCH} per batch"), 400)
    slots: list[Slot | Busy] = []
    for _ in range(sum(map(is_tool_call, batch))):
        try:
            slots.append(mcp.engine.reserve())
        except Busy as exc:
            slots.append(exc)
    replies = []
    try:
        for msg in batch:
            if gone():
                log.info("MCP client gone: %d message(s) of its batch not started", len(batch) - len(replies))
                break
            slot = slots.pop(0) if is_tool_call(msg) else None
            try:
                replies += mcp.handle(msg, session, gone, access=access, slot=slot)
            finally:
                if isinstance(slot, Slot) and not slot.taken:  # refused before it was submitted
                    slot.release()
    finally:
        for slot in slots:
            if isinstance(slot, Slot):
                slot.release()
    return mcp_json(replies, 200) if replies else Response(status=202)


def mcp_handshake_http(mcp: McpServer, message, session: str) -> Response:
    """Handshake era: one message (or a 2025-03-26 batch) -> JSON, SSE, or 202; initialize opens
    a session; errors to well-formed requests are HTTP 200."""
    gone, access = client_gone_check(), g.get("access")
    if isinstance(message, list):
        return mcp_batch(mcp, message, session, gone, access)
    if isinstance(message, dict) and message.get("method") == "initialize" and "id" in message:
        reply = next(mcp.handle(message, "", gone))
        if "result" not in reply:
            return mcp_json(reply, 200)
        try:
            session_id = mcp.open_session(reply["result"]["protocolVersion"])
        except TooManySessions as exc:
            response = mcp_json(jsonrpc_error(readable_id(message), -32000, str(exc)), 503)
            response.headers["Retry-After"] = "60"
            return response
        response = mcp_json(reply, 200)
        response.headers["Mcp-Session-Id"] = session_id
        return response
    return mcp_answer(mcp, message, session,
                      lambda reply: 400 if "error" in reply and reply["error"]["code"] in (-32600, -32700) else 200)


def mcp_modern_http(mcp: McpServer, message, header_version: str | None) -> Response:
    """Modern era (2026-07-28): one request per POST, no session, headers checked against the body,
    errors with the spec's HTTP status. Client notifications are accepted and dropped: on HTTP a
    client cancels by closing the response stream."""
    msg_id = readable_id(message)
    if not isinstance(message, dict):
        return mcp_json(jsonrpc_error(None, -32600, f"a {MCP_MODERN_VERSIONS[-1]} POST carries one JSON-RPC "
                                                    "message, not a batch"), 400)
    if "id" not in message:
        if isinstance(message.get("method"), str):
            return Response(status=202)
        return mcp_json(jsonrpc_error(None, -32600, "invalid request: clients send requests and notifications"), 400)
    if modern_version(message) is None:
        return mcp_json(jsonrpc_error(msg_id, -32602, f"params._meta must carry '{META_VERSION}' and "
                                                      f"'{META_CAPABILITIES}' on {header_version} requests"), 400)
    mismatch = header_mismatch(message, header_version)
    if mismatch:
        return mcp_json(jsonrpc_error(msg_id, HEADER_MISMATCH, f"header mismatch: {mismatch}"), 400)
    return mcp_answer(mcp, message, "",
                      lambda reply: MODERN_ERROR_STATUS.get(reply["error"]["code"], 200) if "error" in reply else 200)


def mcp_answer(mcp: McpServer, message, session: str, status_of: Callable[[dict], int]) -> Response:
    """One request's answer: SSE with progress when the client asked for it and accepts SSE,
    else the response as JSON (202 for a notification)."""
    params = message.get("params") if isinstance(message, dict) else None
    meta = params.get("_meta") if isinstance(params, dict) else None
    wants_progress = ("text/event-stream" in request.headers.get("Accept", "") and isinstance(meta, dict)
                      and message.get("method") == "tools/call" and "progressToken" in meta)
    replies = mcp.handle(message, session, client_gone_check(), progress=wants_progress, access=g.get("access"))
    if wants_progress:
        events = (f"event: message\ndata: {json.dumps(r, ensure_ascii=False)}\n\n" for r in replies)
        return streaming_response(events, "text/event-stream")  # closing it closes call_tool: cancels
    replies = list(replies)
    if not replies:
        return Response(status=202)
    return mcp_json(replies[-1], status_of(replies[-1]))


def header_value(raw: str | None) -> str | None:
    """A mirrored header value, decoding the spec's =?base64?...?= form (None if malformed)."""
    if raw is None or not (raw.startswith("=?base64?") and raw.endswith("?=")):
        return raw
    try:
        return base64.b64decode(raw[9:-2], validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None


def header_mismatch(message: dict, header_version: str | None) -> str | None:
    """Why the modern-era request headers disagree with the body, or None (the spec's Server Validation)."""
    for name in ("MCP-Protocol-Version", "Mcp-Method", "Mcp-Name"):
        if len(request.headers.getlist(name)) > 1:
            return f"{name} appears more than once"
    body_version, method = modern_version(message), message.get("method")
    if header_version is None:
        return f"the MCP-Protocol-Version header is required (the body says {body_version!r})"
    if header_version != body_version:
        return f"MCP-Protocol-Version header {header_version!r} does not match params._meta version {body_version!r}"
    if request.headers.get("Mcp-Method") != method:
        return f"Mcp-Method header {request.headers.get('Mcp-Method')!r} does not match the method {method!r}"
    name_field = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}.get(method)
    expected = message["params"].get(name_field) if name_field else None
    if isinstance(expected, str) and header_value(request.headers.get("Mcp-Name")) != expected:
        return f"Mcp-Name header does not match params.{name_field} {expected!r}"
    return None


def mcp_json(body, status: int) -> Response:
    response = Response(json.dumps(body, ensure_ascii=False), status=status, mimetype="application/json")
    return response


# -- security: Origin / CORS and the API key, for every route --------------------------------

CORS_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Accept, Mcp-Session-Id, MCP-Protocol-Version, "
                                    "Mcp-Method, Mcp-Name, Last-Event-ID, X-Request-Id",
    "Access-Control-Expose-Headers": "Mcp-Session-Id, MCP-Protocol-Version, Retry-After, X-Request-Id, "
                                     "WWW-Authenticate",
    "Access-Control-Max-Age": "600",
}
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token


def preflight_allowed_headers(requested: str) -> str:
    """Our own headers plus whatever an allowed page asks for (the openai JS SDK sends X-Stainless-*):
    the Origin check, not a header list, is what keeps foreign pages out."""
    names = CORS_HEADERS["Access-Control-Allow-Headers"].split(", ")
    names += [h.strip() for h in requested.split(",") if HEADER_NAME.fullmatch(h.strip())]
    unique: dict[str, str] = {}
    for name in names:
        unique.setdefault(name.lower(), name)
    return ", ".join(unique.values())


def origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    """`*`, an exact origin, `scheme://host:*` (any port) or `scheme://*` (any host of a scheme, as
    VS Code webviews' vscode-webview://<random id>)."""
    origin = origin.rstrip("/").lower()
    for entry in allowed:
        entry = entry.lower()
        if entry == "*" or entry == origin:
            return True
        if entry.endswith("://*"):
            host = origin[len(entry) - 1:]
            if origin.startswith(entry[:-1]) and host and "/" not in host:
                return True
        elif entry.endswith(":*"):
            base = entry[:-2]
            if origin == base or (origin.startswith(base + ":") and PORT.fullmatch(origin[len(base) + 1:])):
                return True
    return False


PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits only: str.isdigit() also takes "٨٠٠٠"
HOST_PORT = re.compile(r":[0-9]{0,5}")


def host_allowed(host: str | None, allowed: tuple[str, ...]) -> bool:
    """The Host header's name (its port dropped, IPv6 kept in brackets) is in `allowed`, or `*` is.
    No Host header at all (HTTP/1.0) passes: every browser sends one, so no rebinding page lacks it."""
    if host is None or "*" in allowed:
        return True
    host = host.strip().lower()
    if host.startswith("["):  # [IPv6]:port
        end = host.find("]") + 1
        name, port = host[:end], host[end:]
    else:
        name, colon, number = host.partition(":")
        port = colon + number
    return (not port or HOST_PORT.fullmatch(port) is not None) and name.rstrip(".") in allowed


def body_over_limit(limit: int) -> bool:
    """A body without Content-Length (chunked) is cut at MAX_BODY_BYTES by werkzeug without a word
    (then parsed, truncated); read up to the limit, then look for one byte more."""
    return len(request.get_data(cache=True)) >= limit and bool(request.environ["wsgi.input"].read(1))


def is_public_path(path: str) -> bool:
    """Served without the API key: /health, and the playground's page and assets (not secret; the
    page asks for the key when the API answers 401). The Origin check still applies."""
    return path in ("/health", "/") or path.startswith("/static/")


def register_security(app: Flask, engine: Engine | UpstreamPool) -> None:
    """403 for a foreign Host or Origin (DNS-rebinding guards, as MCP requires: a page that rebinds
    its own name to 127.0.0.1 sends that name as Host, and no Origin on plain GETs), CORS for allowed
    origins, Bearer auth, 503 for new work once SIGTERM asked the worker to drain, 413 for a chunked
    body over MAX_BODY_BYTES (Content-Length is checked by Flask)."""
    import hmac

    from werkzeug.exceptions import RequestEntityTooLarge

    cfg = engine.cfg

    @app.before_request
    def check_origin_and_key():
        if not host_allowed(request.headers.get("Host"), cfg.host_allowlist):
            return error_response(403, f"host {request.headers.get('Host')!r} is not allowed",
                                  "a loopback server answers to localhost, 127.0.0.1 and [::1]; set ALLOWED_HOSTS "
                                  "to add names", code="host_not_allowed")
        origin = request.headers.get("Origin")
        if origin is not None and not origin_allowed(origin, cfg.allowed_origins):
            return error_response(403, f"origin {origin!r} is not allowed", "set ALLOWED_ORIGINS to allow it",
                                  code="origin_not_allowed")
        if request.method == "OPTIONS":
            return Response(status=204)
        if cfg.api_key and not is_public_path(request.path):
            header = request.headers.get("Authorization", "")
            scheme, _, key = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), cfg.api_key.encode()):
                return error_response(401, "missing or wrong API key",
                                      "send the header 'Authorization: Bearer <API_KEY>'", code="invalid_api_key")
        if engine.draining and request.path != "/health":
            return error_response(503, "server is shutting down", code="shutting_down", retry_after=5)
        if request.content_length is None and "Transfer-Encoding" in request.headers \
                and body_over_limit(cfg.max_body_bytes):
            raise RequestEntityTooLarge()
        return None

    @app.after_request
    def add_cors(response: Response):
        origin = request.headers.get("Origin")
        if origin is not None and origin_allowed(origin, cfg.allowed_origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.add("Vary", "Origin")
            if request.method == "OPTIONS":
                response.headers.update(CORS_HEADERS)
                response.headers["Access-Control-Allow-Headers"] = preflight_allowed_headers(
                    request.headers.get("Access-Control-Request-Headers", ""))
                response.headers.add("Vary", "Access-Control-Request-Headers")
            else:
                response.headers["Access-Control-Expose-Headers"] = CORS_HEADERS["Access-Control-Expose-Headers"]
        return response


# -- playground: the browser page at / (HTML, JS and CSS live in static/) ----------------------

# The kinds of file in static/ (pyproject.toml's package-data installs the same).
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}
# Only the server's own scripts, styles and API; images the user attached (data:/blob:); no framing.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@functools.lru_cache(maxsize=1)
def static_folder() -> Path:
    return project_folder("static", "index.html")


def static_response(name: str) -> Response:
    """One file straight from the static folder (a plain name of a known type: no paths, no
    dot files), with the page's CSP; anything else is a 404."""
    suffix = Path(name).suffix
    entry = None
    if suffix in STATIC_TYPES and not name.startswith(".") and "/" not in name and "\\" not in name:
        entry = static_folder() / name
    if entry is None or not entry.is_file():
        raise InputError(f"no such file: /static/{name}", status=404, code="not_found")
    response = Response(entry.read_bytes(), content_type=STATIC_TYPES[suffix])
    response.headers.update({"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                             "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})
    return response


# -- routes -----------------------------------------------------------------------------------


def register_routes(app: Flask, engine: Engine | UpstreamPool) -> None:
    cfg = engine.cfg
    mcp = McpServer(engine)
    app.extensions["hcx_mcp"] = mcp
    answers = AnswerTexts()

    # Every generation takes its place in the queue (engine.reserve, a 503 when full) before its
    # body's images are decoded: at most MAX_QUEUE + 1 requests hold decoded pixels at a time.
    @app.post("/tool/generate_hyperclovax_vision")
    def seed_generate():
        body = read_json_body()
        streaming = wants_stream(body)
        with engine.reserve() as slot:
            req = prompt_request(body, cfg)
            note_prompt(cfg, req)
            if streaming:
                return text_stream_response(stream(engine, req, client_gone_check(), slot))
            completion = generate(engine, req, client_gone_check(), slot)
        record_completion(g.get("access"), completion)
        if req.constraint is not None and completion.finish_reason == "length":
            return jsonify(result=completion.text, incomplete=INCOMPLETE_JSON)
        return jsonify(result=completion.text)

    @app.post("/tool/generate_hyperclovax_vision_stream")
    def seed_generate_stream():
        body = read_json_body()
        with engine.reserve() as slot:
            req = prompt_request(body, cfg)
            note_prompt(cfg, req)
            return text_stream_response(stream(engine, req, client_gone_check(), slot))

    @app.post("/v1/chat/completions")
    def chat_completions():
        body = read_json_body()
        streaming = wants_stream(body, allow_query=False)
        include_usage = stream_options(body, streaming)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        with engine.reserve() as slot:
            req = openai_request(body, cfg)
            note_prompt(cfg, req)
            if streaming:
                pieces = stream(engine, req, client_gone_check(), slot)
                events = chat_completion_chunks(pieces, completion_id, created, cfg.served_model_name,
                                                include_usage, g.get("access"), req.constraint)
                return streaming_response(events, "text/event-stream", pieces)
            completion = generate(engine, req, client_gone_check(), slot)
        record_completion(g.get("access"), completion)
        return jsonify(chat_completion(completion, completion_id, created, cfg.served_model_name, req.constraint))

    @app.post("/v1/responses")
    def responses():
        body = read_json_body()
        streaming = wants_stream(body, allow_query=False)
        with engine.reserve() as slot:
            req = responses_request(body, cfg, answers.recall)
            note_prompt(cfg, req)
            echo = response_echo(body, req, cfg.served_model_name)
            if streaming:
                pieces = stream(engine, req, client_gone_check(), slot)
                events = response_events(pieces, echo, g.get("access"), answers.remember)
                return streaming_response(events, "text/event-stream", pieces)
            completion = generate(engine, req, client_gone_check(), slot)
        record_completion(g.get("access"), completion)
        status, item_id = RESPONSE_STATUS[completion.finish_reason], f"msg_{uuid.uuid4().hex}"
        answers.remember(item_id, completion.text)
        item = output_message(item_id, "completed" if status == "completed" else "incomplete", completion.text)
        return jsonify(response_body(echo, status, [item], completion))

    @app.get("/v1/models")
    def list_models():
        return jsonify(object="list", data=[model_card(cfg, engine)])

    @app.get("/v1/models/<path:model_id>")
    def get_model(model_id: str):
        if model_id != cfg.served_model_name:
            raise InputError(f"model {model_id!r} is not served here (this server has {cfg.served_model_name!r})",
                             status=404, param="model", code="model_not_found")
        return jsonify(model_card(cfg, engine))

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

    @app.get("/")
    def playground():
        return static_response("index.html")

    @app.get("/static/<name>")
    def playground_asset(name: str):
        return static_response(name)

    @app.get("/health")
    def health():
        if engine.draining:
            return jsonify(status="draining"), 503
        if isinstance(engine, UpstreamPool):
            return upstream_health(engine)
        if engine.state == "loading":
            return jsonify(status="loading"), 503
        if engine.state == "error":
            return jsonify(status="error", error=engine.error), 503
        m = engine.model
        return jsonify(status="ok", model=m.name, device=str(m.device), dtype=str(m.dtype).replace("torch.", ""),
                       kind=m.kind, interface=m.interface, revision=m.revision, backend=m.generation_backend,
                       weights=m.weights, kernel=m.kernel, demo=m.demo, context_length=m.context_length,
                       queue_depth=engine.queue_depth, max_queue=cfg.max_queue, max_image_bytes=cfg.max_image_bytes,
                       max_images=cfg.max_images, **({"note": m.note} if m.note else {}))


def upstream_health(pool: UpstreamPool) -> tuple[Response, int]:
    """BACKEND=openai: 200 while at least one upstream is up, each listed with its state, model, context
    window, requests in flight and last error; 503 while the first probes run or when none is up."""
    cfg = pool.cfg
    upstreams = [u.describe() for u in pool.upstreams]
    up = sum(u["state"] == "up" for u in upstreams)
    if pool.state == "loading":
        return jsonify(status="loading", backend="openai", upstreams=upstreams), 503
    return jsonify(status="ok" if up else "unavailable", backend="openai", model=cfg.served_model_name,
                   device=f"{up} of {len(upstreams)} upstreams up", context_length=pool.context_length,
                   queue_depth=pool.queue_depth, max_queue=cfg.max_queue, max_image_bytes=cfg.max_image_bytes,
                   max_images=cfg.max_images, upstream_timeout=cfg.upstream_timeout, upstreams=upstreams,
                   demo=False), 200 if up else 503


def model_card(cfg: Config, engine: Engine | UpstreamPool) -> dict:
    """The model as OpenAI lists it, with vLLM's max_model_len once known (a front reads it)."""
    window = engine.context_length
    return {"id": cfg.served_model_name, "object": "model", "created": 0, "owned_by": "hcx-server",
            **({"max_model_len": window} if window else {})}


def register_ollama_routes(app: Flask, engine: Engine | UpstreamPool) -> None:
    """The Ollama API subset Ollama-speaking tools call, so a base-URL change points them here.
    Generation ignores the model name (one model is served); /api/show answers for that one."""
    cfg = engine.cfg

    @app.get("/api/version")
    def ollama_version():
        return jsonify(version=OLLAMA_API_VERSION)

    @app.get("/api/tags")
    def ollama_tags():
        return jsonify(models=[ollama_model_entry(cfg, engine.require_model())])

    @app.get("/api/ps")
    def ollama_ps():
        m = engine.require_model()
        entry = ollama_model_entry(cfg, m)
        return jsonify(models=[{**entry, "expires_at": ollama_time(time.time() + 10 * 365 * 86400),
                                "size_vram": entry["size"] if str(m.device) != "cpu" else 0,
                                "context_length": m.context_length}])

    @app.post("/api/show")
    def ollama_show_model():
        body = read_json_body()
        name = field_str(body, "model") or field_str(body, "name")
        if not name:
            raise InputError("'model' is required", param="model", code="missing_field")
        if name not in (cfg.served_model_name, ollama_name(cfg)):
            raise InputError(f"model '{name}' not found (this server has '{ollama_name(cfg)}')", status=404,
                             param="model", code="model_not_found")
        return jsonify(ollama_show(cfg, engine.require_model()))

    def answer(body: dict, build: Callable[[dict, Config], GenerationRequest | None], chat: bool) -> Response:
        """Ollama's load-only call (nothing to generate) takes no place in the queue; others do,
        before their images are decoded."""
        if ollama_loads_only(body, chat):
            build(body, cfg)  # still validated
            engine.require_model()
            return jsonify(ollama_loaded(body["model"], chat))
        model = body.get("model")
        with engine.reserve() as slot:
            req = build(body, cfg)
            note_prompt(cfg, req)
            if body.get("stream") is not False:  # Ollama streams unless told not to
                pieces = stream(engine, req, client_gone_check(), slot)
                return streaming_response(ollama_chunks(pieces, model, chat, g.get("access")),
                                          "application/x-ndjson", pieces)
            completion = generate(engine, req, client_gone_check(), slot)
        record_completion(g.get("access"), completion)
        return jsonify(ollama_answer(model, chat, completion))

    @app.post("/api/chat")
    def ollama_chat():
        body = read_json_body()
        wants_stream(body, allow_query=False)  # a non-boolean "stream" is a 400
        return answer(body, ollama_chat_request, chat=True)

    @app.post("/api/generate")
    def ollama_generate():
        body = read_json_body()
        wants_stream(body, allow_query=False)
        return answer(body, ollama_generate_request, chat=False)


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

    def render(self, engine: Engine | UpstreamPool) -> str:
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
        if isinstance(engine, UpstreamPool):
            lines += upstream_metrics(engine)
        return "\n".join(lines) + "\n"


def upstream_metrics(pool: UpstreamPool) -> list[str]:
    """Per-upstream gauges and counters (BACKEND=openai); outcomes: ok, cancelled, rejected (a 4xx the
    client gets), busy, connect, timeout, broken (mid-stream), http_error, failed."""
    with pool.lock:
        rows = [(u.name, u.state == "up", u.in_flight, dict(u.outcomes), u.tokens, u.marked_down)
                for u in pool.upstreams]
        retries = pool.retries
    lines = ["# HELP hcx_upstream_up 1 while the upstream answers.", "# TYPE hcx_upstream_up gauge"]
    lines += [f'hcx_upstream_up{{upstream="{name}"}} {int(up)}' for name, up, *_ in rows]
    lines += ["# HELP hcx_upstream_in_flight Requests in flight at the upstream.",
              "# TYPE hcx_upstream_in_flight gauge"]
    lines += [f'hcx_upstream_in_flight{{upstream="{name}"}} {n}' for name, _, n, *_ in rows]
    lines += ["# HELP hcx_upstream_requests_total Requests sent to the upstream, by outcome.",
              "# TYPE hcx_upstream_requests_total counter"]
    lines += [f'hcx_upstream_requests_total{{upstream="{name}",outcome="{outcome}"}} {count}'
              for name, _, _, outcomes, *_ in rows for outcome, count in sorted(outcomes.items())]
    lines += ["# HELP hcx_upstream_tokens_total Completion tokens the upstream reported.",
              "# TYPE hcx_upstream_tokens_total counter"]
    lines += [f'hcx_upstream_tokens_total{{upstream="{name}"}} {tokens}' for name, _, _, _, tokens, _ in rows]
    lines += ["# HELP hcx_upstream_marked_down_total Times the upstream was marked down after a failure.",
              "# TYPE hcx_upstream_marked_down_total counter"]
    lines += [f'hcx_upstream_marked_down_total{{upstream="{name}"}} {n}' for name, *_, n in rows]
    lines += ["# HELP hcx_upstream_retries_total Requests sent once more, to another upstream.",
              "# TYPE hcx_upstream_retries_total counter", f"hcx_upstream_retries_total {retries}"]
    return lines


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


def create_app(cfg: Config | None = None, engine: Engine | UpstreamPool | None = None) -> Flask:
    """The WSGI app; starts loading the model (or probing the upstreams) in this process (call it in
    the worker)."""
    setup_logging()
    cfg = cfg or load_config()
    engine = engine or make_engine(cfg).start()
    app = Flask("hcx-server", static_folder=None)  # static/ is served by the playground routes
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_bytes
    app.json.ensure_ascii = False
    app.extensions["hcx_engine"] = engine
    app.extensions["hcx_metrics"] = Metrics()
    register_observability(app, app.extensions["hcx_metrics"])
    register_security(app, engine)
    register_errors(app)
    register_routes(app, engine)
    register_ollama_routes(app, engine)
    return app


def drain_on_sigterm(worker) -> None:
    """gunicorn post_worker_init hook. On SIGTERM the worker keeps accepting and answers new work
    503 (shutting_down; /health says draining) until the requests in flight are done, and only
    then lets gunicorn stop it (gunicorn's own stop closes the listener at once, so new clients got
    a connection reset). The master kills the worker after graceful_timeout whatever happens."""
    import signal

    engine = worker.wsgi.extensions["hcx_engine"]
    stop_worker = worker.handle_exit

    def stop_when_idle(sig, frame):
        deadline = time.monotonic() + max(1.0, worker.cfg.graceful_timeout - 5)
        while not engine.idle and time.monotonic() < deadline:
            time.sleep(0.05)
        stop_worker(sig, frame)

    def handle_exit(sig, frame):
        if engine.draining:
            return
        engine.draining = True
        log.info("SIGTERM: finishing %s in-flight request(s), refusing new ones", engine.in_flight)
        threading.Thread(target=stop_when_idle, args=(sig, frame), name="hcx-drain", daemon=True).start()

    signal.signal(signal.SIGTERM, handle_exit)


# -- the gunicorn worker: a thread only for a request that has fully arrived ------------------
# gunicorn's gthread worker gives a connection to a thread as soon as it is accepted; the thread
# then reads the request with blocking reads, so twelve clients sending a byte a second held twelve
# threads for as long as they liked, /health included. This worker reads every request (head and
# body) in its event loop, without a thread, under a deadline (READ_TIMEOUT), as a buffering proxy
# would, and hands the connection to a thread only once the whole request is there (or is certain
# to be refused: Content-Length over MAX_BODY_BYTES, a malformed head); the thread's parser then
# reads those bytes from memory. Bodies held by the loop are bounded (READ_BUFFER_BODIES x
# MAX_BODY_BYTES): beyond that, connections with more than a head wait for room.

REQUEST_HEAD_LIMIT = 64 * 1024  # request line + headers (a bigger head is a 431)
READ_BUFFER_BODIES = 4


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to call
        return None


def release_memory() -> None:
    """Give freed heap memory back to the OS (the worker calls it once a POST or a large request
    is over, its body, decoded images and tensors freed): glibc keeps it otherwise, and the worker
    stayed at 1.6-4.4 GB after large requests. ~0.03 ms when there is nothing to give back, ~40 ms
    for a few hundred MB (ctypes lets the other threads run meanwhile)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class RequestBuffer:
    """One HTTP/1.1 request as its bytes arrive: `feed()` says when it can go to a thread, either
    complete (head, then a Content-Length or chunked body up to `max_body` bytes) or `partial`
    (over the body limit, or malformed: the app or gunicorn's parser refuses it from what is here,
    and the connection closes after). Bytes after the request (a pipelined next one) stay in
    `data` for the parser."""

    def __init__(self, max_body: int, data: bytes = b""):
        self.max_body, self.data = max_body, bytearray(data)
        self.state, self.pos = "head", 0  # head | length | chunk-size | chunk-data | trailers | done
        self.left = 0  # body (or chunk) bytes still to come
        self.body = 0  # chunked body bytes seen
        self.method = b""
        self.partial = self.expect_continue = self.head_too_large = False

    def feed(self, chunk: bytes = b"") -> bool:
        self.data += chunk
        try:
            return self._scan()
        except ValueError:  # malformed: gunicorn's parser answers 400 from the bytes buffered
            self.partial = True
            return True

    def _scan(self) -> bool:
        data = self.data
        if self.state == "head":
            start = 0
            while data.startswith(b"\r\n", start):  # empty lines before a request are allowed
                start += 2
            end = data.find(b"\r\n\r\n", max(start, self.pos - 3))
            if end < 0:
                self.pos = len(data)
                self.head_too_large = len(data) > REQUEST_HEAD_LIMIT
                return False
            self.pos = end + 4
            self._read_head(bytes(data[start:end]))
        if self.state == "length":
            return len(data) - self.pos >= self.left
        while self.state in ("chunk-size", "chunk-data", "trailers"):
            if self.state == "chunk-data":
                taken = min(len(data) - self.pos, self.left)
                self.pos, self.left, self.body = self.pos + taken, self.left - taken, self.body + taken
                if self.body > self.max_body:  # the app reads MAX_BODY_BYTES + 1 from here: a 413
                    self.partial = True
                    return True
                if self.left or len(data) - self.pos < 2:
                    return False
                if data[self.pos:self.pos + 2] != b"\r\n":
                    raise ValueError("chunk without CRLF")
                self.pos, self.state = self.pos + 2, "chunk-size"
                continue
            end = data.find(b"\r\n", self.pos)
            if end < 0:
                if len(data) - self.pos > 8192:
                    raise ValueError("chunk-size or trailer line too long")
                return False
            line, self.pos = bytes(data[self.pos:end]), end + 2
            if self.state == "trailers":
                if not line:
                    self.state = "done"
                continue
            size = line.split(b";", 1)[0].strip()
            if not re.fullmatch(rb"[0-9a-fA-F]{1,16}", size):
                raise ValueError("bad chunk size")
            self.left = int(size, 16)
            self.state = "chunk-data" if self.left else "trailers"
        return True

    def _read_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.method = lines[0].split(b" ", 1)[0]
        length, codings, expect = None, None, False
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise ValueError("header line without a colon")
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length":
                if length is not None or not value.isdigit():
                    raise ValueError("bad or repeated Content-Length")
                length = int(value)
            elif name == b"transfer-encoding":
                codings = value.lower()
            elif name == b"expect":
                expect = value.lower() == b"100-continue"
        if codings is not None:
            if length is not None or codings.rsplit(b",", 1)[-1].strip() != b"chunked":
                raise ValueError("Transfer-Encoding other than chunked, or with Content-Length")
            self.state = "chunk-size"
        elif length:
            self.state, self.left = "length", length
            if length > self.max_body:  # refused from its Content-Length (413) before any body byte
                self.partial = True
                self.state = "done"
        else:
            self.state = "done"
        self.expect_continue = expect and lines[0].endswith(b"HTTP/1.1") and self.state != "done"


def plain_response(status: str, message: str) -> bytes:
    """A whole HTTP response for the loop to send itself (before any request reached the app)."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


@functools.lru_cache(maxsize=None)
def thread_worker_class(max_body: int, read_timeout: float) -> type:
    """gunicorn's gthread worker reading whole requests in its event loop (see above). It relies
    on gthread's internals of gunicorn 27 (pinned <28): enqueue_req is the one way a connection
    reaches a thread, murder_pending runs every loop turn, finish_request re-queues read-ahead."""
    from functools import partial
    from selectors import EVENT_READ

    from gunicorn.http.unreader import SocketUnreader
    from gunicorn.workers.gthread import ThreadWorker

    class BufferedUnreader(SocketUnreader):
        """The parser's byte source: the request the loop read, then the socket."""

        def __init__(self, sock, data: bytearray):
            super().__init__(sock)
            self.pending, self.at = memoryview(data), 0

        def chunk(self, size_hint=None):
            if self.at < len(self.pending):
                size = max(self.mxchunk, min(size_hint or 0, self.max_body_chunk))
                piece = bytes(self.pending[self.at:self.at + size])
                self.at += len(piece)
                if self.at == len(self.pending):  # all served: let the request's bytes go
                    self.pending, self.at = memoryview(b""), 0
                return piece
            return super().chunk(size_hint)

        def settle(self) -> None:
            """Bytes not parsed yet (a pipelined request) go where gunicorn looks for read-ahead;
            the request's own bytes are let go (a kept-alive connection would hold them)."""
            if self.at < len(self.pending):
                self.buf.seek(0, os.SEEK_END)
                self.buf.write(self.pending[self.at:])
            self.pending, self.at = memoryview(b""), 0

    class HcxThreadWorker(ThreadWorker):
        def init_process(self):
            import resource

            self.reading: dict = {}  # conn -> RequestBuffer, while its request arrives
            self.paused: list = []  # reading connections waiting for room in the buffer budget
            self.buffered, self.budget = 0, READ_BUFFER_BODIES * max_body
            descriptors = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 64
            self.max_conns = min(self.worker_connections, max(16, descriptors - in_use - 64))
            super().init_process()

        # -- in the event loop --
        def accept(self, listener):
            """gthread stops accepting at worker_connections, and its worker dies when out of file
            descriptors: silent or slow clients must bring it to neither, so they make room."""
            if self.nr_conns + 1 >= self.max_conns:
                self.make_room()
            try:
                super().accept(listener)
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                if not self.make_room():  # every descriptor serves a request: wait for one to end
                    time.sleep(0.01)

        def make_room(self) -> bool:
            """Close one connection that is not being served: silent first, then the oldest kept
            alive, then the one reading longest (408)."""
            silent = next((c for c, b in self.reading.items() if not b.data), None)
            if silent is not None:
                self.drop(silent)
            elif self.keepalived_conns:
                conn = self.keepalived_conns.popleft()
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self.poller.unregister(conn.sock)
                self.nr_conns -= 1
                conn.close()
            elif self.reading:
                self.drop(next(iter(self.reading)), plain_response(
                    "408 Request Timeout", "too many connections are sending requests slowly"))
            else:
                return False
            return True

        def enqueue_req(self, conn):
            """Read the connection's next request before a thread gets it."""
            if self.cfg.is_ssl:  # TLS is not served by hcx-server; gthread's own way then
                return super().enqueue_req(conn)
            leftover = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
            buffer = self.reading[conn] = RequestBuffer(max_body, leftover)
            self.buffered += len(leftover)
            conn.hcx_deadline, conn.hcx_continued = time.monotonic() + read_timeout, False
            if buffer.feed():
                self.hand_over(conn)
            else:
                self.poller.register(conn.sock, EVENT_READ, partial(self.on_request_bytes, conn))

        def on_request_bytes(self, conn, _sock) -> None:
            buffer = self.reading[conn]
            if self.buffered > self.budget and len(buffer.data) >= REQUEST_HEAD_LIMIT:
                self.poller.unregister(conn.sock)  # until other bodies leave the loop
                self.paused.append(conn)
                return
            try:
                data = conn.sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # the client closed or reset the connection
                return self.drop(conn)
            self.buffered += len(data)
            if buffer.feed(data):
                self.poller.unregister(conn.sock)
                self.hand_over(conn)
            elif buffer.head_too_large:
                self.drop(conn, plain_response("431 Request Header Fields Too Large",
                                               f"request head over {REQUEST_HEAD_LIMIT} bytes"))
            elif buffer.expect_continue and not conn.hcx_continued:
                conn.hcx_continued = self.send(conn, b"HTTP/1.1 100 Continue\r\n\r\n")

        def hand_over(self, conn) -> None:
            buffer = self.reading.pop(conn)
            self.buffered -= len(buffer.data)
            conn.hcx_request, conn.hcx_partial = buffer.data, buffer.partial
            conn.hcx_trim = buffer.method == b"POST" or len(buffer.data) >= REQUEST_HEAD_LIMIT
            conn.data_ready = True  # gthread's wait for a first byte is over
            self.resume_paused()
            super().enqueue_req(conn)

        def drop(self, conn, answer: bytes = b"") -> None:
            """Close a connection whose request did not arrive (in time)."""
            buffer = self.reading.pop(conn)
            self.buffered -= len(buffer.data)
            if conn in self.paused:
                self.paused.remove(conn)
            else:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self.poller.unregister(conn.sock)
            if answer:
                self.send(conn, answer)
            self.nr_conns -= 1
            conn.close()
            self.resume_paused()

        @staticmethod
        def send(conn, data: bytes) -> bool:
            try:
                return conn.sock.send(data) == len(data)
            except OSError:
                return False

        def resume_paused(self) -> None:
            while self.paused and self.buffered <= self.budget:
                conn = self.paused.pop(0)
                self.poller.register(conn.sock, EVENT_READ, partial(self.on_request_bytes, conn))

        def murder_pending(self):
            """Also every loop turn: drop requests past their deadline (408) and, once stopping,
            connections that have sent nothing."""
            super().murder_pending()
            now = time.monotonic()
            for conn, buffer in list(self.reading.items()):
                if now >= conn.hcx_deadline:
                    self.drop(conn, plain_response("408 Request Timeout", f"the request did not arrive within "
                                                   f"READ_TIMEOUT={read_timeout:g} s") if buffer.data else b"")
                elif not self.alive and not buffer.data:
                    self.drop(conn)

        # -- in a thread --
        def handle(self, conn):
            request_bytes, conn.hcx_request = getattr(conn, "hcx_request", None), None
            if request_bytes is not None:
                if not conn.initialized:
                    conn.sock.setblocking(True)
                    conn.init()
                conn.parser.unreader = BufferedUnreader(conn.sock, request_bytes)
            return super().handle(conn)

        def handle_request(self, req, conn):
            if getattr(conn, "hcx_continued", False):  # the loop already sent 100 Continue
                req._expected_100_continue = False
            return super().handle_request(req, conn)

        def _keepalive_after(self, conn, keepalive):
            if getattr(conn, "hcx_partial", False):  # the rest of its body never came in: close
                return False
            return super()._keepalive_after(conn, keepalive)

        # -- back in the event loop --
        def finish_request(self, conn, fs):
            unreader = getattr(conn.parser, "unreader", None)
            if isinstance(unreader, BufferedUnreader):
                unreader.settle()
            super().finish_request(conn, fs)
            if getattr(conn, "hcx_trim", False):  # its body, images and tensors are freed by now
                conn.hcx_trim = False
                release_memory()

    return HcxThreadWorker


def raise_descriptor_limit(wanted: int = 4096) -> None:
    """Many distributions start processes with 1024 file descriptors (soft limit): lift it towards
    the hard limit, so that 1000 connections (gunicorn's worker_connections) fit beside the model's
    files."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def serve(cfg: Config) -> None:
    """gunicorn, ONE worker (the model lives once; gthread reading whole requests first, see
    thread_worker_class), app built after the fork."""
    from gunicorn.app.base import BaseApplication

    class Server(BaseApplication):
        def load_config(self):
            options = {"bind": f"{cfg.host}:{cfg.port}", "workers": 1,
                       "worker_class": thread_worker_class(cfg.max_body_bytes, cfg.read_timeout),
                       "threads": cfg.worker_threads, "timeout": 120, "graceful_timeout": 30,
                       "keepalive": 5, "control_socket_disable": True, "accesslog": None,
                       "post_worker_init": drain_on_sigterm}
            for key, value in options.items():
                if key in self.cfg.settings:
                    self.cfg.set(key, value)

        def load(self):
            return create_app(cfg)

    setup_logging()
    raise_descriptor_limit()
    if cfg.host not in LOOPBACK_HOSTS and not cfg.api_key and os.path.exists("/.dockerenv"):
        log.warning("binding %s inside a container without API_KEY: publish the port on 127.0.0.1 only "
                    "(the build_and_run scripts do) or set API_KEY", cfg.host)
    elif cfg.host not in LOOPBACK_HOSTS and not cfg.api_key:
        log.warning("!" * 78)
        log.warning("! binding %s WITHOUT an API key: anyone who can reach this port can use the model.", cfg.host)
        log.warning("! Set API_KEY (clients send 'Authorization: Bearer <key>') or bind HOST=127.0.0.1.")
        log.warning("!" * 78)
    if cfg.worker_threads < cfg.capacity + 1:
        log.warning("THREADS=%d < %d (the requests taken at once, +1): requests beyond the threads wait unbounded "
                    "in gunicorn's backlog", cfg.worker_threads, cfg.capacity + 1)
    Server().run()


if __name__ == "__main__":
    setup_logging()
    try:
        serve(load_config())
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
