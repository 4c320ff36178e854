"""Tiny stand-in for the LATER HyperCLOVAX-SEED-Vision-Instruct-3B config ("New Processor, Model
for vLLM", commit 82f2e21 and after; see /work/shared/hcx-model.md, "Two revisions").

Unlike the first revision, the decoder settings live in ``text_config`` (a real sub-config, not
a plain dict), the image placeholder id is ``image_token_id`` (``<|dummy3|>``) and the video
one ``video_token_id``; the number of vision queries per 378-px grid is
``num_queries_vis_abstractor_image``.

Written for the hcx-server test suite; no code of the real model is copied here.
"""

from transformers import AutoConfig
from transformers.configuration_utils import PretrainedConfig


class HCXVisionConfig(PretrainedConfig):
    model_type = "hyperclovax_vlm"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        text_config=None,
        vision_config=None,
        image_token_id=None,
        video_token_id=None,
        use_nth_layer=-2,
        anyres=True,
        unpad=False,
        max_num_grids=4,
        num_queries_vis_abstractor_image=4,
        use_1x1_grid=False,
        proj_pos_emb=True,
        **kwargs,
    ):
        kwargs.setdefault("tie_word_embeddings", False)
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config = AutoConfig.for_model(text_config.pop("model_type", "llama"), **text_config)
        self.text_config = text_config
        self.vision_config = dict(vision_config) if vision_config else None
        if text_config is not None:
            self.hidden_size = text_config.hidden_size
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.use_nth_layer = use_nth_layer
        self.anyres = anyres
        self.unpad = unpad
        self.max_num_grids = max_num_grids
        self.num_queries_vis_abstractor_image = num_queries_vis_abstractor_image
        self.use_1x1_grid = use_1x1_grid
        self.proj_pos_emb = proj_pos_emb
        super().__init__(**kwargs)

    def get_text_config(self, *args, **kwargs):
        return self.text_config

    def to_dict(self):
        out = super().to_dict()
        if isinstance(self.text_config, PretrainedConfig):
            out["text_config"] = self.text_config.to_dict()
        return out
