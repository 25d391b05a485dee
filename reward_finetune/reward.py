"""`NearIDReward`: a differentiable identity loss from decoded images to a subject's reference embeddings.

The loss is `1 - cosine` between the NearID embedding of each generated image and the reference embeddings
(`nearid_core.losses.identity_loss`), in [0, 2]; lower means closer in identity. The images go through
`NearIDScorer.embed_pixels` (the checkpoint's own differentiable preprocessing and model), so the reward sees exactly
what `NearIDScorer.embed` sees; only the frozen NearID weights never get gradients.
"""

from __future__ import annotations

import logging
import os

import torch

from nearid_core.losses import identity_loss
from nearid_core.preprocessing import Images
from nearid_core.scorer import REDUCTIONS, NearIDScorer

logger = logging.getLogger(__name__)


class NearIDReward:
    """Identity loss of generated images against fixed reference images of one subject.

    Example:
        >>> reward = NearIDReward("Aleksandar/nearid-siglip2", ["sks_1.png", "sks_2.png"], gradient_checkpointing=True)
        >>> images = vae.decode(latents / vae.config.scaling_factor).sample      # [N, 3, H, W] in [-1, 1]
        >>> loss = reward(images).mean()                                          # per-image [N] -> scalar
        >>> loss.backward()                                                       # reaches the latents / LoRA

    Args:
        scorer_or_id: a loaded `NearIDScorer`, or a hub id / local checkpoint for `NearIDScorer.from_pretrained`.
        reference_images: the subject's images (paths, PIL, arrays, tensors in 0..1: anything `NearIDScorer.embed`
            takes), or precomputed embeddings as a 2-D tensor [R, D] (`NearIDScorer.as_embeddings`). Embedded once,
            without gradients.
        reduce: how the R references combine: "mean" / "min" / "max" of the cosines, or "centroid".
        gradient_checkpointing: recompute the frozen backbone's activations in the backward pass instead of storing
            them (much less memory for the reward step, about one extra backbone forward of time).
        device, dtype: only used when `scorer_or_id` is an id (defaults of `NearIDScorer.from_pretrained`: fp16 on
            CUDA, bf16 on CPUs with bf16 matrix units, fp32 otherwise).
    """

    def __init__(
        self,
        scorer_or_id: NearIDScorer | str | os.PathLike,
        reference_images: Images | torch.Tensor,
        reduce: str = "mean",
        gradient_checkpointing: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}; got {reduce!r}.")
        if isinstance(scorer_or_id, NearIDScorer):
            self.scorer = scorer_or_id
        else:
            self.scorer = NearIDScorer.from_pretrained(scorer_or_id, device=device, dtype=dtype)
        self.scorer.model.requires_grad_(False)
        self.reduce = reduce
        with torch.no_grad():
            refs = self.scorer.as_embeddings(reference_images)
        if refs.shape[0] == 0:
            raise ValueError("reference_images is empty: pass at least one image of the subject.")
        self.reference_embeddings = refs  # [R, D] float32, on the scorer's device
        self.gradient_checkpointing = False
        if gradient_checkpointing:
            self.enable_gradient_checkpointing()

    @property
    def device(self) -> torch.device:
        return self.scorer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.scorer.dtype

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint every encoder layer of the frozen backbone (transformers' activation checkpointing).

        transformers only checkpoints layers in training mode; SigLIP has no dropout or batch statistics, so the
        checkpointed layers are switched to `train()` and compute exactly what they compute in `eval()`.
        """
        model = self.scorer.model
        kwargs = {"use_reentrant": False}  # non-reentrant: works although no backbone weight requires grad
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers < 5
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        for module in model.modules():
            if getattr(module, "gradient_checkpointing", False):
                module.train()
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        model = self.scorer.model
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        model.eval()
        self.gradient_checkpointing = False

    def embed(self, images: torch.Tensor, input_range: str = "-1,1") -> torch.Tensor:
        """Raw (unnormalised) NearID embeddings [N, D] of decoded images, graph intact.

        Args:
            images: [N, 3, H, W] float (any float dtype, any size, any device); values in `input_range`. Values
                outside the range are clamped, as when the images are saved.
            input_range: "-1,1" (VAE decoder output) or "0,1".
        """
        return self.scorer.embed_pixels(images, input_range=input_range, normalize=False)

    def __call__(self, images: torch.Tensor, input_range: str = "-1,1") -> torch.Tensor:
        """Identity loss per image: [N] float32 in [0, 2] (`1 - cosine`, reduced over references), graph intact."""
        return identity_loss(self.embed(images, input_range), self.reference_embeddings, reduce=self.reduce)

    @torch.no_grad()
    def similarity(self, images: torch.Tensor, input_range: str = "-1,1") -> torch.Tensor:
        """Identity score per image without gradients: [N] cosine in [-1, 1] (= 1 - loss); higher = same subject."""
        return 1.0 - self(images, input_range)
