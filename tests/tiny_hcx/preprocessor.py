"""Tiny stand-in for the first-revision HCX preprocessor (``AutoProcessor`` target).

Written for the hcx-server test suite (no code of the real model is copied). It offers
the first-revision methods:

``load_images_videos(chat) -> (new_chat, images, is_video_list)``
    ``chat`` is a list of messages with ONE content dict (or a plain string) per
    message. For ``{"type": "image", "image": ...}`` content the ``image`` field may be
    what the model card lists: an http(s) url, a local file path, a base64 string or
    raw bytes. Anything else (a PIL image, a ``data:`` url) is rejected. ``new_chat``
    is a copy of ``chat`` without the raw ``image`` payloads (the chat template only
    needs ``filename`` and the optional ``ocr`` / ``lens_keywords`` /
    ``lens_local_keywords`` strings). ``images`` are RGB PIL images, ``is_video_list``
    one bool per image. Videos are not supported by this tiny version.

``__call__(images, is_video_list=...)``  (same as ``preprocess``)
    Returns a ``BatchFeature`` holding nested Python lists (batch of one sample):
    ``pixel_values`` [[FloatTensor(num_grids, 3, G, G)]], ``image_sizes``
    [[{"width": w, "height": h}]], ``vision_query_lengths`` [[int]], ``is_videos``
    [[bool]], ``num_queries_vis_abstractors`` [[int]], ``num_queries_vis_abstractors_slow``
    [[int]], ``first_last_frames_slows`` [[bool]]. AnyRes: one global grid plus the
    local grids of the best-fitting layout of at most ``max_num_grids`` grids; each
    grid costs ``num_queries_vis_abstractor`` tokens in the language model.
"""

import base64
import copy
import io
import os
import urllib.request
from typing import List, Optional

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

_CONTENT_META_KEYS = ("type", "filename", "ocr", "lens_keywords", "lens_local_keywords")


def _possible_layouts(max_num_grids: int, use_1x1_grid: bool):
    layouts = []
    for rows in range(1, max_num_grids + 1):
        for cols in range(1, max_num_grids + 1):
            if rows * cols > max_num_grids:
                continue
            if rows == 1 and cols == 1 and not use_1x1_grid:
                continue
            layouts.append((rows, cols))
    return layouts


def _best_layout(width: int, height: int, grid: int, layouts):
    """Pick the layout that keeps most of the image's pixels, then wastes the least."""
    best, best_key = None, None
    for rows, cols in layouts:
        tw, th = cols * grid, rows * grid
        scale = min(tw / width, th / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = tw * th - kept
        key = (kept, -wasted)
        if best_key is None or key > best_key:
            best, best_key = (rows, cols), key
    return best


def _fit_on_canvas(img: Image.Image, tw: int, th: int, fill) -> Image.Image:
    w, h = img.size
    scale = min(tw / w, th / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = img.resize((nw, nh), Image.BICUBIC)
    canvas = Image.new("RGB", (tw, th), fill)
    canvas.paste(resized, ((tw - nw) // 2, (th - nh) // 2))
    return canvas


class HCXProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values"]

    def __init__(
        self,
        grid_size: int = 32,
        max_num_grids: int = 4,
        num_queries_vis_abstractor: int = 4,
        anyres: bool = True,
        use_1x1_grid: bool = False,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.grid_size = grid_size
        self.max_num_grids = max_num_grids
        self.num_queries_vis_abstractor = num_queries_vis_abstractor
        self.anyres = anyres
        self.use_1x1_grid = use_1x1_grid
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)

    # --- chat handling -----------------------------------------------------------
    @staticmethod
    def _load_image(value) -> Image.Image:
        if isinstance(value, (bytes, bytearray)):
            data = bytes(value)
        elif isinstance(value, str):
            if value.startswith(("http://", "https://")):
                with urllib.request.urlopen(value, timeout=10) as resp:  # noqa: S310
                    data = resp.read()
            elif os.path.isfile(value):
                with open(value, "rb") as fh:
                    data = fh.read()
            else:
                data = base64.b64decode(value)
        else:
            raise TypeError(
                "image must be an url, a local path, a base64 string or bytes; "
                f"got {type(value).__name__}"
            )
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")

    def load_images_videos(self, vlm_chat):
        new_chat, images, is_video_list = [], [], []
        for message in vlm_chat:
            message = dict(message)
            content = message.get("content")
            if isinstance(content, dict):
                kind = content.get("type")
                if kind == "image":
                    if "image" not in content:
                        raise ValueError("image content needs an 'image' field")
                    images.append(self._load_image(content["image"]))
                    is_video_list.append(False)
                    message["content"] = {
                        k: copy.deepcopy(content[k]) for k in _CONTENT_META_KEYS if k in content
                    }
                elif kind == "video":
                    raise NotImplementedError("the tiny HCX preprocessor does not support video")
                else:
                    message["content"] = copy.deepcopy(content)
            new_chat.append(message)
        return new_chat, images, is_video_list

    # --- pixels --------------------------------------------------------------------
    def _to_tensor(self, img: Image.Image) -> torch.Tensor:
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())

    def _grids(self, img: Image.Image) -> torch.Tensor:
        g = self.grid_size
        fill = tuple(int(m * 255) for m in self.image_mean)
        grids = [_fit_on_canvas(img, g, g, fill)]
        if self.anyres:
            layouts = _possible_layouts(self.max_num_grids, self.use_1x1_grid)
            rows, cols = _best_layout(img.width, img.height, g, layouts)
            canvas = _fit_on_canvas(img, cols * g, rows * g, fill)
            for r in range(rows):
                for c in range(cols):
                    grids.append(canvas.crop((c * g, r * g, (c + 1) * g, (r + 1) * g)))
        return torch.stack([self._to_tensor(x) for x in grids], dim=0)

    def preprocess(self, images, is_video_list: Optional[List[bool]] = None, **kwargs):
        if images is None:
            images = []
        if isinstance(images, Image.Image):
            images = [images]
        images = list(images)
        if is_video_list is None:
            is_video_list = [False] * len(images)
        if len(is_video_list) != len(images):
            raise ValueError("is_video_list must have one entry per image")
        if any(is_video_list):
            raise NotImplementedError("the tiny HCX preprocessor does not support video")
        pixel_values, sizes, lengths = [], [], []
        for img in images:
            if not isinstance(img, Image.Image):
                raise TypeError("images must be PIL images (use load_images_videos first)")
            img = img.convert("RGB")
            grids = self._grids(img)
            pixel_values.append(grids)
            sizes.append({"width": img.width, "height": img.height})
            lengths.append(int(grids.shape[0]) * self.num_queries_vis_abstractor)
        data = {
            "pixel_values": [pixel_values],
            "image_sizes": [sizes],
            "vision_query_lengths": [lengths],
            "is_videos": [list(map(bool, is_video_list))],
            "num_queries_vis_abstractors": [[self.num_queries_vis_abstractor] * len(images)],
            "num_queries_vis_abstractors_slow": [[0] * len(images)],
            "first_last_frames_slows": [[False] * len(images)],
        }
        return BatchFeature(data=data)

    def __call__(self, images=None, is_video_list=None, **kwargs):
        return self.preprocess(images, is_video_list=is_video_list, **kwargs)
