"""Tiny stand-in for the LATER HCX processor, ``processing_hyperclovax.HCXProcessor``.

Written for the hcx-server test suite (no code of the real model is copied). It follows what is
known of the second revision (see /work/shared/hcx-model.md):

``HCXProcessor(text=..., images=[[img, ...]], videos=None)``
    ``images`` is batched as a list per sample. The result holds ``input_ids`` (and
    ``attention_mask``) for ``text`` plus, per sample, ``pixel_values_images`` (a list of
    ``(grids, 3, G, G)`` float tensors), ``image_sizes_images``, ``vision_query_lengths_images``,
    ``num_queries_vis_abstractors_images``, ``num_queries_vis_abstractors_slow_images``,
    ``first_last_frames_slows_images`` and the empty ``*_videos`` twins.

What the notes leave unconfirmed is a setting here, so the server is tested both ways:
``expand_image_placeholders`` -- whether the processor expands each ``<|dummy3|>`` in the text
into ``vision_query_lengths_images[i]`` copies itself (False: it leaves one per image, as vLLM
sees it); the chat template lives on the processor or on the tokenizer only (the test builder
decides). ``query_length_offset`` deliberately misreports the lengths (a broken folder: the model
then raises on the placeholder count).

Stricter than (possibly) real, on purpose: images must be PIL images (a server must never hand
client strings to a processor that would open them as paths or URLs).
"""

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ProcessorMixin


def possible_layouts(max_num_grids: int, use_1x1_grid: bool):
    return [(rows, cols) for rows in range(1, max_num_grids + 1) for cols in range(1, max_num_grids + 1)
            if rows * cols <= max_num_grids and (use_1x1_grid or (rows, cols) != (1, 1))]


def best_layout(width: int, height: int, grid: int, layouts):
    """The layout that keeps most of the image's pixels, then wastes the least canvas."""
    def score(layout):
        rows, cols = layout
        scale = min(cols * grid / width, rows * grid / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        return kept, -(rows * cols * grid * grid - kept)

    return max(layouts, key=score)


def vision_tokens(width: int, height: int, grid: int, queries: int, anyres: bool, max_num_grids: int,
                  use_1x1_grid: bool) -> int:
    """Tokens one image costs: the global grid, the local grids and one newline per local row
    (a single grid: its queries plus one newline). Depends on the aspect ratio."""
    if not anyres:
        return queries + 1
    rows, cols = best_layout(width, height, grid, possible_layouts(max_num_grids, use_1x1_grid))
    return queries * (1 + rows * cols) + rows


class HCXImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values_images"]

    def __init__(self, grid_size=32, max_num_grids=4, num_queries_vis_abstractor_image=4, anyres=True,
                 use_1x1_grid=False, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), **kwargs):
        super().__init__(**kwargs)
        self.grid_size = grid_size
        self.max_num_grids = max_num_grids
        self.num_queries_vis_abstractor_image = num_queries_vis_abstractor_image
        self.anyres = anyres
        self.use_1x1_grid = use_1x1_grid
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)

    def _tensor(self, img: Image.Image) -> torch.Tensor:
        arr = (np.asarray(img, dtype=np.float32) / 255.0 - np.asarray(self.image_mean, np.float32)) / np.asarray(
            self.image_std, np.float32)
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())

    def _canvas(self, img: Image.Image, width: int, height: int) -> Image.Image:
        scale = min(width / img.width, height / img.height)
        resized = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
        canvas = Image.new("RGB", (width, height), tuple(int(m * 255) for m in self.image_mean))
        canvas.paste(resized, ((width - resized.width) // 2, (height - resized.height) // 2))
        return canvas

    def grids(self, img: Image.Image) -> torch.Tensor:
        g = self.grid_size
        tiles = [self._canvas(img, g, g)]
        if self.anyres:
            rows, cols = best_layout(img.width, img.height, g, possible_layouts(self.max_num_grids,
                                                                                 self.use_1x1_grid))
            canvas = self._canvas(img, cols * g, rows * g)
            tiles += [canvas.crop((c * g, r * g, (c + 1) * g, (r + 1) * g)) for r in range(rows) for c in range(cols)]
        return torch.stack([self._tensor(t) for t in tiles])

    def tokens(self, img: Image.Image) -> int:
        return vision_tokens(img.width, img.height, self.grid_size, self.num_queries_vis_abstractor_image,
                             self.anyres, self.max_num_grids, self.use_1x1_grid)


class HCXProcessor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, expand_image_placeholders=False,
                 query_length_offset=0, **kwargs):
        self.expand_image_placeholders = bool(expand_image_placeholders)
        self.query_length_offset = int(query_length_offset)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids("<|dummy3|>")

    def _images(self, images):
        data = {key: [] for key in ("pixel_values_images", "image_sizes_images", "vision_query_lengths_images",
                                    "num_queries_vis_abstractors_images", "num_queries_vis_abstractors_slow_images",
                                    "first_last_frames_slows_images", "pixel_values_videos",
                                    "vision_query_lengths_videos")}
        for sample in images:
            if not isinstance(sample, (list, tuple)):
                raise TypeError("images must be batched as a list (samples) of lists (images)")
            for img in sample:
                if not isinstance(img, Image.Image):
                    raise TypeError(f"images must be PIL images, got {type(img).__name__}")
            sample = [img.convert("RGB") for img in sample]
            ip = self.image_processor
            data["pixel_values_images"].append([ip.grids(img) for img in sample])
            data["image_sizes_images"].append([[img.height, img.width] for img in sample])
            data["vision_query_lengths_images"].append([ip.tokens(img) + self.query_length_offset for img in sample])
            data["num_queries_vis_abstractors_images"].append([ip.num_queries_vis_abstractor_image] * len(sample))
            data["num_queries_vis_abstractors_slow_images"].append([0] * len(sample))
            data["first_last_frames_slows_images"].append([False] * len(sample))
            data["pixel_values_videos"].append([])
            data["vision_query_lengths_videos"].append([])
        return data

    def _expand(self, ids: list[int], lengths: list[int]) -> list[int]:
        out, i = [], 0
        for token in ids:
            if token == self.image_token_id and i < len(lengths):
                out += [token] * lengths[i]
                i += 1
            else:
                out.append(token)
        return out

    def __call__(self, text=None, images=None, videos=None, return_tensors=None, **kwargs):
        if videos:
            raise NotImplementedError("the tiny HCX processor does not support video")
        data = self._images(images) if images is not None else {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
            if self.expand_image_placeholders and data:
                rows = [self._expand(r, lengths) for r, lengths in zip(rows, data["vision_query_lengths_images"])]
            if return_tensors == "pt":
                if len({len(r) for r in rows}) != 1:
                    raise ValueError("the tiny HCX processor batches only equal-length texts")
                data["input_ids"] = torch.tensor(rows, dtype=torch.long)
                data["attention_mask"] = torch.ones_like(data["input_ids"])
            else:
                data["input_ids"] = rows
                data["attention_mask"] = [[1] * len(r) for r in rows]
        return BatchFeature(data=data)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values_images", "image_sizes_images",
                "vision_query_lengths_images"]


__all__ = ["HCXImageProcessor", "HCXProcessor", "vision_tokens"]
