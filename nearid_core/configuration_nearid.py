"""NearID model configuration."""

from __future__ import annotations

from typing import Any

from transformers import SiglipVisionConfig

try:  # transformers >= 5
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig

# The released model's vision tower: SigLIP2 so400m/14 at 384 px (SigLIP-v1 architecture, see the reference §1.1).
SO400M_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "num_channels": 3,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
}
DEFAULT_BACKBONE = "google/siglip2-so400m-patch14-384"


class NearIDConfig(PreTrainedConfig):
    """Configuration of a [`NearIDModel`]: a SigLIP vision tower whose MAP head holds the NearID identity head.

    The defaults reproduce the released `Aleksandar/nearid-siglip2` checkpoint.

    Args:
        vision_config: A `SiglipVisionConfig` (or its dict) of the vision tower, head included.
        embed_dim: Size of the identity embedding; equals `vision_config.hidden_size` (the MAP head has no projection).
        normalize_embeddings: Whether `forward` / `get_image_features` L2-normalise the embedding.
        backbone_name_or_path: Hub id or directory of the SigLIP checkpoint the trunk comes from. Head-only
            checkpoints need it to rebuild the trunk; full checkpoints record it for provenance.
    """

    model_type = "nearid"
    sub_configs = {"vision_config": SiglipVisionConfig}

    def __init__(
        self,
        vision_config: dict | SiglipVisionConfig | None = None,
        embed_dim: int | None = None,
        normalize_embeddings: bool = True,
        backbone_name_or_path: str | None = DEFAULT_BACKBONE,
        **kwargs: Any,
    ) -> None:
        if vision_config is None:
            vision_config = dict(SO400M_VISION_CONFIG)
        if isinstance(vision_config, dict):
            vision_config = {k: v for k, v in vision_config.items() if k != "model_type"}
            vision_config = SiglipVisionConfig(**vision_config)
        if not isinstance(vision_config, SiglipVisionConfig):
            raise ValueError(
                f"NearIDConfig.vision_config must be a SiglipVisionConfig or a dict, got {type(vision_config).__name__}."
            )
        if not getattr(vision_config, "vision_use_head", True):
            raise ValueError("NearIDConfig.vision_config.vision_use_head must be True: the NearID head is the MAP head.")
        if embed_dim is not None and embed_dim != vision_config.hidden_size:
            raise ValueError(
                f"NearIDConfig.embed_dim ({embed_dim}) must equal vision_config.hidden_size "
                f"({vision_config.hidden_size}): the MAP head has no output projection."
            )
        self.vision_config = vision_config
        self.embed_dim = vision_config.hidden_size
        self.normalize_embeddings = bool(normalize_embeddings)
        self.backbone_name_or_path = backbone_name_or_path
        super().__init__(**kwargs)
