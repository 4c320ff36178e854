"""Tiny stand-in for the first-revision HyperCLOVAX-SEED-Vision-Instruct-3B model.

Written for the hcx-server test suite (no code of the real model is copied). It
follows the interface documented in REAL_INTERFACE.md:

* class ``HCXVisionForCausalLM`` (model_type ``hyperclovax_vlm``) with submodules
  ``vision_model`` (a SigLIP vision tower), ``mm_projector`` (a small C-Abstractor
  look-alike: conv + adaptive pooling + MLP, no timm), ``image_newline`` and
  ``language_model`` (a ``LlamaForCausalLM``);
* one ``<|dummy3|>`` (``config.img_start_id``) per image in ``input_ids``; the model
  expands it into ``vision_query_lengths[b][i]`` image feature vectors;
* ``pixel_values`` is a list (batch) of lists (images) of 4-D float tensors
  ``(num_grids, 3, H, W)``; the model casts them to the vision tower's dtype itself;
* ``generate`` is overridden: without images it forwards ``input_ids`` to
  ``language_model.generate`` (the output then starts with the prompt); with images it
  builds ``inputs_embeds`` once and calls ``language_model.generate(inputs_embeds=...)``
  (the output then holds ONLY the new tokens, and stopping criteria see only new
  tokens). All other generate kwargs (streamer, stopping_criteria, logits_processor,
  min_new_tokens, max_new_tokens, eos_token_id, pad_token_id, do_sample, ...) are
  forwarded unchanged.
* Strict dtype check: projected image features must have the language model's
  embedding dtype. A server that keeps the vision part in fp32 under a bf16/fp16
  language model must cast the projector output itself (e.g. a forward hook on
  ``mm_projector``); whether the real first revision casts is unverified.
"""

import math
from typing import List, Optional

import torch
import torch.nn as nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from .configuration_hyperclovax import HCXVisionConfig


def _has_images(pixel_values) -> bool:
    if pixel_values is None:
        return False
    if isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            "pixel_values must be a list (batch) of lists (images) of 4-D tensors "
            "(num_grids, 3, H, W), as the preprocessor returns it; got a tensor"
        )
    if not isinstance(pixel_values, (list, tuple)):
        raise TypeError(f"pixel_values must be a nested list, got {type(pixel_values)!r}")
    for sample in pixel_values:
        if not isinstance(sample, (list, tuple)):
            raise TypeError(
                "pixel_values must be a list (batch) of lists (images) of 4-D tensors"
            )
        if len(sample) > 0:
            return True
    return False


class HCXVisionTinyAbstractor(nn.Module):
    """Conv + adaptive pooling + MLP: (B, L, C_vis) -> (B, num_queries, C_llm)."""

    def __init__(
        self,
        num_queries: int,
        num_input_tokens: int,
        encoder_hidden_size: int,
        hidden_size: int,
        output_hidden_size: int,
        pos_emb: bool = True,
    ):
        super().__init__()
        side = int(math.isqrt(num_queries))
        if side * side != num_queries:
            raise ValueError("num_queries must be a square number")
        if int(math.isqrt(num_input_tokens)) ** 2 != num_input_tokens:
            raise ValueError("num_input_tokens must be a square number")
        self.num_queries = num_queries
        self.pos_emb = (
            nn.Parameter(torch.zeros(1, num_input_tokens, encoder_hidden_size))
            if pos_emb
            else None
        )
        self.net = nn.Sequential(
            nn.Conv2d(encoder_hidden_size, hidden_size, kernel_size=3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d((side, side)),
        )
        self.readout = nn.Sequential(
            nn.Linear(hidden_size, output_hidden_size),
            nn.SiLU(),
            nn.Linear(output_hidden_size, output_hidden_size),
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.readout[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.readout[0].weight.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_emb is not None:
            x = x + self.pos_emb
        b, length, c = x.shape
        side = int(math.isqrt(length))
        x = x.transpose(1, 2).reshape(b, c, side, side)
        x = self.net(x)
        x = x.flatten(2).transpose(1, 2)
        return self.readout(x)


class HCXVisionPreTrainedModel(PreTrainedModel):
    config_class = HCXVisionConfig
    main_input_name = "input_ids"
    _no_split_modules = ["SiglipVisionModel", "LlamaDecoderLayer"]
    _skip_keys_device_placement = "past_key_values"
    _supports_sdpa = True
    _supports_cache_class = True

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()


class HCXVisionForCausalLM(HCXVisionPreTrainedModel, GenerationMixin):
    def __init__(self, config: HCXVisionConfig, **kwargs):
        super().__init__(config)
        vision_config = SiglipVisionConfig(**config.vision_config)
        self.vision_model = SiglipVisionModel(vision_config)

        language_config = dict(config.language_config)
        language_config = AutoConfig.for_model(language_config.pop("model_type"), **language_config)
        hidden = language_config.hidden_size
        num_patches = (vision_config.image_size // vision_config.patch_size) ** 2

        self.mm_projector = HCXVisionTinyAbstractor(
            num_queries=config.num_queries_vis_abstractor,
            num_input_tokens=num_patches,
            encoder_hidden_size=vision_config.hidden_size,
            hidden_size=vision_config.hidden_size,
            output_hidden_size=hidden,
            pos_emb=config.proj_pos_emb,
        )
        # Present for attribute parity with the real model (used there with unpad=True).
        self.image_newline = nn.Parameter(torch.zeros(hidden))
        self.language_model = AutoModelForCausalLM.from_config(language_config)
        self.post_init()

    # --- embeddings plumbing (delegated to the language model) -------------------
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.language_model.set_output_embeddings(new_embeddings)

    def get_decoder(self):
        return self.language_model.get_decoder()

    def tie_weights(self, *args, **kwargs):
        return self.language_model.tie_weights()

    # --- vision --------------------------------------------------------------------
    def _encode_images(self, grids: torch.Tensor) -> torch.Tensor:
        """(num_grids, 3, H, W) -> (num_grids * num_queries, hidden) in projector dtype."""
        vision_param = next(self.vision_model.parameters())
        grids = grids.to(device=vision_param.device, dtype=vision_param.dtype)
        out = self.vision_model(pixel_values=grids, output_hidden_states=True)
        feats = out.hidden_states[self.config.use_nth_layer]
        feats = feats.to(device=self.mm_projector.device, dtype=self.mm_projector.dtype)
        feats = self.mm_projector(feats)
        return feats.reshape(-1, feats.shape[-1])

    def extract_inputs_embeds(
        self,
        input_ids: torch.LongTensor,
        pixel_values: List[List[torch.Tensor]],
        vision_query_lengths: Optional[List[List[int]]] = None,
        **unused,
    ) -> torch.Tensor:
        """Embed ``input_ids`` and replace each ``img_start_id`` token by its image features."""
        if input_ids is None:
            raise ValueError("input_ids are required together with pixel_values")
        if len(pixel_values) != input_ids.shape[0]:
            raise ValueError(
                f"pixel_values has {len(pixel_values)} samples but input_ids has "
                f"{input_ids.shape[0]} rows"
            )
        embed = self.get_input_embeddings()
        text_embeds = embed(input_ids)
        rows = []
        for b, sample in enumerate(pixel_values):
            positions = (input_ids[b] == self.config.img_start_id).nonzero().flatten().tolist()
            if len(positions) != len(sample):
                raise ValueError(
                    f"sample {b}: {len(positions)} image placeholder token(s) "
                    f"(id {self.config.img_start_id}) in input_ids but {len(sample)} image(s) "
                    "in pixel_values"
                )
            pieces, start = [], 0
            for i, (pos, grids) in enumerate(zip(positions, sample)):
                feats = self._encode_images(grids)
                if vision_query_lengths is not None and feats.shape[0] != int(
                    vision_query_lengths[b][i]
                ):
                    raise ValueError(
                        f"sample {b} image {i}: {feats.shape[0]} features but "
                        f"vision_query_lengths says {vision_query_lengths[b][i]}"
                    )
                if feats.dtype != text_embeds.dtype:
                    raise TypeError(
                        f"image features are {feats.dtype} but the language model embeds are "
                        f"{text_embeds.dtype}: cast the mm_projector output to the language "
                        "model dtype before merging (e.g. a forward hook on mm_projector)"
                    )
                pieces.append(text_embeds[b, start:pos])
                pieces.append(feats.to(text_embeds.device))
                start = pos + 1
            pieces.append(text_embeds[b, start:])
            rows.append(torch.cat(pieces, dim=0))
        if len({r.shape[0] for r in rows}) != 1:
            raise ValueError("tiny HCX supports only batches whose expanded lengths are equal")
        return torch.stack(rows, dim=0)

    # --- forward -------------------------------------------------------------------
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[List[List[torch.FloatTensor]]] = None,
        past_key_values=None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = True,
        image_sizes=None,
        vision_query_lengths=None,
        non_vision_query_lengths=None,
        img_start_ids_list=None,
        num_queries_vis_abstractors=None,
        num_queries_vis_abstractors_slow=None,
        first_last_frames_slows=None,
        is_videos=None,
        cache_position: Optional[torch.LongTensor] = None,
        logits_to_keep=0,
        **kwargs,
    ):
        cached = past_key_values.get_seq_length() if past_key_values is not None else 0
        if inputs_embeds is None and cached == 0 and _has_images(pixel_values):
            # Prefill: vision runs once; later steps (cache filled) ignore pixel_values.
            inputs_embeds = self.extract_inputs_embeds(
                input_ids, pixel_values, vision_query_lengths=vision_query_lengths
            )
            input_ids = None
            if attention_mask is not None and attention_mask.shape[1] != inputs_embeds.shape[1]:
                attention_mask = torch.ones(
                    inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device
                )
            labels = None
        if inputs_embeds is not None:
            input_ids = None
        return self.language_model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache_position=cache_position,
            logits_to_keep=logits_to_keep,
        )

    # --- generate ------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[List[List[torch.FloatTensor]]] = None,
        image_sizes=None,
        vision_query_lengths: Optional[List[List[int]]] = None,
        non_vision_query_lengths=None,
        num_queries_vis_abstractors=None,
        num_queries_vis_abstractors_slow=None,
        first_last_frames_slows=None,
        is_videos=None,
        img_start_ids_list=None,
        attention_mask: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        if not _has_images(pixel_values):
            if input_ids is not None and bool((input_ids == self.config.img_start_id).any()):
                raise ValueError(
                    "input_ids contain the image placeholder token but no pixel_values were given"
                )
            # Text only: plain language-model generation; the output includes the prompt.
            return self.language_model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **kwargs
            )
        inputs_embeds = self.extract_inputs_embeds(
            input_ids, pixel_values, vision_query_lengths=vision_query_lengths
        )
        # The caller's attention mask (if any) matches the unexpanded input_ids: rebuild it.
        mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        # With inputs_embeds only, the output holds only the newly generated tokens.
        return self.language_model.generate(
            inputs_embeds=inputs_embeds, attention_mask=mask, **kwargs
        )
