"""Tiny stand-in for the LATER HyperCLOVAX-SEED-Vision-Instruct-3B model (second code revision).

Written for the hcx-server test suite (no code of the real model is copied). It follows what is
known of the second revision (see /work/shared/hcx-model.md):

* class ``HCXVisionForCausalLM`` (model_type ``hyperclovax_vlm``) with ``vision_model`` (SigLIP),
  ``mm_projector`` (a small C-Abstractor look-alike: conv + adaptive pooling + MLP, no timm),
  ``image_newline`` and ``language_model`` (a causal LM built from ``config.text_config``);
* the prompt holds ONE ``image_token_id`` per vision token: the model embeds ``input_ids`` and
  fills the positions where ``input_ids == image_token_id`` with the image features, and RAISES
  when their count differs from the number of features (so a server that expands placeholders
  wrongly fails loudly, never silently);
* an image costs the global grid's queries, every local grid's queries and one ``image_newline``
  per row of local grids (a single grid: its queries plus one newline) -- aspect-ratio dependent;
* ``pixel_values_images`` is a list (batch) of lists (images) of ``(grids, 3, G, G)`` tensors; the
  model casts them to the vision tower's dtype itself and merges by index assignment;
* no ``generate`` override: ``GenerationMixin`` calls ``forward`` every step with the image
  kwargs; the images are only used while the cache is empty (prefill).
"""

import math
from typing import Optional

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel, SiglipVisionConfig, SiglipVisionModel

from .configuration_hyperclovax import HCXVisionConfig
from .processing_hyperclovax import best_layout, possible_layouts


class TinyAbstractor(nn.Module):
    """(grids, patches, C_vis) -> (grids, queries, C_llm)."""

    def __init__(self, queries: int, patches: int, vision_hidden: int, hidden: int, pos_emb: bool = True):
        super().__init__()
        self.side = math.isqrt(queries)
        self.pos_emb = nn.Parameter(torch.zeros(1, patches, vision_hidden)) if pos_emb else None
        self.net = nn.Sequential(nn.Conv2d(vision_hidden, vision_hidden, 3, padding=1), nn.SiLU(),
                                 nn.AdaptiveAvgPool2d((self.side, self.side)))
        self.readout = nn.Sequential(nn.Linear(vision_hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @property
    def dtype(self) -> torch.dtype:
        return self.readout[0].weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_emb is not None:
            x = x + self.pos_emb
        b, length, c = x.shape
        side = math.isqrt(length)
        x = self.net(x.transpose(1, 2).reshape(b, c, side, side))
        return self.readout(x.flatten(2).transpose(1, 2))


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
        hidden = config.text_config.hidden_size
        self.mm_projector = TinyAbstractor(config.num_queries_vis_abstractor_image,
                                           (vision_config.image_size // vision_config.patch_size) ** 2,
                                           vision_config.hidden_size, hidden, config.proj_pos_emb)
        self.image_newline = nn.Parameter(torch.zeros(hidden))
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.grid_size = vision_config.image_size
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    def get_decoder(self):
        return self.language_model.get_decoder()

    def tie_weights(self, *args, **kwargs):
        return self.language_model.tie_weights()

    # --- vision --------------------------------------------------------------------------
    def forward_images(self, pixel_values_images, image_sizes_images) -> list:
        """One (tokens, hidden) tensor per image, in the projector's dtype (the caller casts)."""
        vision_param = next(self.vision_model.parameters())
        features = []
        for sample_grids, sample_sizes in zip(pixel_values_images, image_sizes_images):
            for grids, (height, width) in zip(sample_grids, sample_sizes):
                grids = grids.to(device=vision_param.device, dtype=vision_param.dtype)
                out = self.vision_model(pixel_values=grids, output_hidden_states=True)
                feats = out.hidden_states[self.config.use_nth_layer].to(self.mm_projector.dtype)
                feats = self.mm_projector(feats)  # (grids, queries, hidden)
                newline = self.image_newline.to(device=feats.device, dtype=feats.dtype)[None]
                if not self.config.anyres:
                    features.append(torch.cat([feats[0], newline]))
                    continue
                rows, cols = best_layout(int(width), int(height), self.grid_size,
                                         possible_layouts(self.config.max_num_grids, self.config.use_1x1_grid))
                local = feats[1:].reshape(rows, cols * feats.shape[1], -1)
                pieces = [feats[0]] + [p for r in range(rows) for p in (local[r], newline)]
                features.append(torch.cat(pieces))
        return features

    def extract_inputs_embeds(self, input_ids, pixel_values_images=None, image_sizes_images=None, **unused):
        """Embed input_ids and fill every image placeholder position with the image features."""
        embeds = self.get_input_embeddings()(input_ids)
        mask = input_ids == self.config.image_token_id
        if pixel_values_images is None or not any(len(s) for s in pixel_values_images):
            if bool(mask.any()):
                raise ValueError("input_ids contain image placeholder tokens but no pixel_values_images were given")
            return embeds
        features = torch.cat(self.forward_images(pixel_values_images, image_sizes_images))
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(f"the prompt holds {int(mask.sum())} image placeholder tokens (id "
                             f"{self.config.image_token_id}) but the images make {features.shape[0]} features: "
                             "expand each placeholder to vision_query_lengths_images copies")
        embeds = embeds.clone()
        embeds[mask] = features.to(device=embeds.device, dtype=embeds.dtype)
        return embeds

    # --- forward ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        pixel_values_images=None,
        image_sizes_images=None,
        vision_query_lengths_images=None,
        num_queries_vis_abstractors_images=None,
        num_queries_vis_abstractors_slow_images=None,
        first_last_frames_slows_images=None,
        pixel_values_videos=None,
        vision_query_lengths_videos=None,
        past_key_values=None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        cache_position: Optional[torch.LongTensor] = None,
        logits_to_keep=0,
        **kwargs,
    ):
        cached = past_key_values.get_seq_length() if past_key_values is not None else 0
        if inputs_embeds is None and cached == 0:
            inputs_embeds = self.extract_inputs_embeds(input_ids, pixel_values_images, image_sizes_images)
            input_ids = None
        return self.language_model(
            input_ids=input_ids if inputs_embeds is None else None,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
            cache_position=cache_position,
            logits_to_keep=logits_to_keep,
            return_dict=True,
        )
