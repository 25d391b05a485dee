"""NearID model: a frozen SigLIP vision tower whose multihead-attention-pooling (MAP) head is the identity head.

The released checkpoint keeps the trained head in the tower's own head slot, so `backbone(pixel_values).pooler_output`
is the NearID embedding before normalisation. Training only ever updates `model.head`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel, SiglipVisionModel
from transformers.utils import ModelOutput

from .configuration_nearid import NearIDConfig

HEAD_PARAMETER_NAMES = (
    "probe",
    "attention.in_proj_weight",
    "attention.in_proj_bias",
    "attention.out_proj.weight",
    "attention.out_proj.bias",
    "layernorm.weight",
    "layernorm.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)


@dataclass
class NearIDModelOutput(ModelOutput):
    """Output of [`NearIDModel.forward`].

    Args:
        image_embeds: [B, D] identity embedding (L2-normalised if `config.normalize_embeddings`).
        last_hidden_state: [B, N, C] post-LayerNorm patch tokens of the vision tower.
        pooler_output: [B, D] raw MAP-head output.
        hidden_states: per-layer hidden states when requested.
        attentions: per-layer attention maps when requested.
    """

    image_embeds: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class NearIDPreTrainedModel(PreTrainedModel):
    config_class = NearIDConfig
    base_model_prefix = "nearid"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["SiglipVisionEmbeddings", "SiglipEncoderLayer", "SiglipMultiheadAttentionPoolingHead"]

    def _init_weights(self, module: nn.Module) -> None:
        """Weights always come from a checkpoint (a SigLIP trunk and head); nothing is initialised here."""


class NearIDModel(NearIDPreTrainedModel):
    """SigLIP vision tower + NearID MAP head.

    Example:
        >>> import nearid_core  # registers model_type "nearid" with AutoConfig/AutoModel
        >>> from transformers import AutoModel
        >>> model = AutoModel.from_pretrained("Aleksandar/nearid-siglip2")
        >>> emb = model.get_image_features(pixel_values)  # [B, 1152], L2-normalised
    """

    def __init__(self, config: NearIDConfig) -> None:
        super().__init__(config)
        self.backbone = SiglipVisionModel(config.vision_config)
        self.post_init()
        self.head.register_forward_pre_hook(_tokens_to_head_dtype)

    @property
    def _tower(self) -> nn.Module:
        # transformers 4.x nests the tower one level deeper (`vision_model`); 5.x does not.
        return getattr(self.backbone, "vision_model", self.backbone)

    @property
    def head(self) -> nn.Module:
        """The MAP head (`SiglipMultiheadAttentionPoolingHead`), the only part NearID trains."""
        return self._tower.head

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> NearIDModelOutput | tuple:
        """Embed normalised pixels [B, 3, H, W] (see `nearid_core.preprocessing`)."""
        out = self.backbone(
            pixel_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            **kwargs,
        )
        pooled = out.pooler_output
        embeds = F.normalize(pooled, dim=-1) if self.config.normalize_embeddings else pooled
        output = NearIDModelOutput(
            image_embeds=embeds,
            last_hidden_state=out.last_hidden_state,
            pooler_output=pooled,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
        return_dict = True if return_dict is None else return_dict
        return output if return_dict else (embeds, out.last_hidden_state, pooled)

    def get_image_features(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B, 3, H, W] normalised pixels -> [B, D] embeddings (the paper code's entry point)."""
        pooled = self.backbone(pixel_values, return_dict=True).pooler_output
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def encode_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Run the frozen trunk only: [B, 3, H, W] -> post-LayerNorm patch tokens [B, N, C] (no head)."""
        tower = self._tower
        hidden = tower.embeddings(pixel_values)
        hidden = tower.encoder(inputs_embeds=hidden).last_hidden_state
        return tower.post_layernorm(hidden)

    def pool(self, tokens: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Apply the MAP head to patch tokens.

        Args:
            tokens: [B, N, C] output of `encode_tokens`.
            output_attentions: also return the probe's attention over the N patches, averaged over heads.

        Returns:
            (pooled [B, D] unnormalised, in the head's dtype; attention [B, N] or None). Equals `pooler_output` of
            `forward`.
        """
        head = self.head
        tokens = tokens.to(head.probe.dtype)
        probe = head.probe.expand(tokens.shape[0], -1, -1)
        hidden, weights = head.attention(
            probe, tokens, tokens, need_weights=output_attentions, average_attn_weights=True
        )
        hidden = hidden + head.mlp(head.layernorm(hidden))
        return hidden[:, 0], (weights[:, 0] if weights is not None else None)

    def to_precision(self, dtype: torch.dtype, head_dtype: torch.dtype | None = None,
                     device: str | torch.device | None = None) -> "NearIDModel":
        """Cast the trunk to `dtype` and the MAP head to `head_dtype` (default `dtype`), optionally moving to `device`.

        The head is cast from its current weights directly, so an fp32 head next to a bf16 trunk keeps full precision.
        """
        head = self.head
        for part in self._tower.children():
            part.to(device=device, dtype=(head_dtype or dtype) if part is head else dtype)
        return self

    def freeze_backbone(self) -> None:
        """Make only the MAP head trainable, as in the paper's recipe."""
        self.requires_grad_(False)
        self.head.requires_grad_(True)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """The 11 MAP-head tensors, keyed as in a head-only checkpoint (`probe`, `attention.in_proj_weight`, ...)."""
        return {k: v for k, v in self.head.state_dict().items()}


def _tokens_to_head_dtype(head: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: the head may run in another dtype than the trunk (fp32 on CPUs, see
    `nearid_core.precision.head_dtype`); its input tokens follow it. A no-op when the dtypes agree."""
    tokens, *rest = args
    dtype = head.probe.dtype
    return None if tokens.dtype == dtype else (tokens.to(dtype), *rest)


AutoConfig.register("nearid", NearIDConfig, exist_ok=True)
AutoModel.register(NearIDConfig, NearIDModel, exist_ok=True)
