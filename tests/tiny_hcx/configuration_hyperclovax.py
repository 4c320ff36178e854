"""Tiny stand-in for the first-revision HyperCLOVAX-SEED-Vision-Instruct-3B config.

Shape follows the real first revision (see REAL_INTERFACE.md): the decoder settings
live in a plain dict ``language_config`` (not ``text_config``, which only the later
revision uses), the vision tower settings in a dict ``vision_config``, and the image
placeholder token id in ``img_start_id``. The context length is
``language_config["max_position_embeddings"]``.

Written for the hcx-server test suite; no code of the real model is copied here.
"""

from transformers.configuration_utils import PretrainedConfig


class HCXVisionConfig(PretrainedConfig):
    model_type = "hyperclovax_vlm"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        language_config=None,
        vision_config=None,
        use_nth_layer=-2,
        img_start_id=None,
        decoder_max_length=1024,
        anyres=True,
        unpad=False,
        max_num_grids=4,
        num_queries_vis_abstractor=4,
        use_1x1_grid=False,
        ignore_index=-100,
        proj_pos_emb=True,
        **kwargs,
    ):
        # The wrapper itself never ties weights; the language model decides that.
        kwargs.setdefault("tie_word_embeddings", False)
        self.language_config = dict(language_config) if language_config else None
        self.vision_config = dict(vision_config) if vision_config else None
        if self.language_config is not None:
            self.hidden_size = self.language_config["hidden_size"]
        self.use_nth_layer = use_nth_layer
        self.img_start_id = img_start_id
        self.decoder_max_length = decoder_max_length
        self.anyres = anyres
        self.unpad = unpad
        self.max_num_grids = max_num_grids
        self.num_queries_vis_abstractor = num_queries_vis_abstractor
        self.use_1x1_grid = use_1x1_grid
        self.ignore_index = ignore_index
        self.proj_pos_emb = proj_pos_emb
        super().__init__(**kwargs)
