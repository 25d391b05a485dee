"""Training and reward losses for NearID embeddings.

Two pure functions over embeddings (no model code here):

* :func:`infonce_ext` -- the paper's two-tier contrastive loss ("ExtendedInfoNCELoss", config name
  ``infonce_ext``) used to train the NearID head. It encodes the similarity hierarchy
  *same identity > near-identity distractor > random other identity*.
* :func:`identity_loss` -- ``1 - cosine`` between generated-image embeddings and reference embeddings, the
  differentiable identity reward used for LoRA fine-tuning.

Both take raw (unnormalised) embeddings and L2-normalise them internally in float32, so the result does not
depend on the scale of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["InfoNCEExtOutput", "identity_loss", "infonce_ext"]

_NORM_EPS = 1e-7
_IDENTITY_REDUCTIONS = ("mean", "max", "min", "centroid")


@dataclass
class InfoNCEExtOutput:
    """Result of :func:`infonce_ext`.

    Attributes:
        loss: Scalar float32 total ``tier1 + alpha * tier2``; carries the autograd graph.
        tier1: Scalar float32 multi-positive InfoNCE term (discrimination); carries the graph.
        tier2: Scalar float32 ranking term (near-identity distractor above the random pool); carries the graph.
        metrics: Monitoring values computed without gradients (Python floats): ``loss``, ``tier1``, ``tier2``,
            ``top1_acc`` (top-1 accuracy of the tier-1 logits, averaged over positive indices like tier 1),
            ``tier_acc`` (fraction of valid hard negatives with ``h > l``; 0.0 when there are none),
            ``global_pos_count`` (M, size of the gathered positive pool) and ``hard_neg_count`` (K).
    """

    loss: torch.Tensor
    tier1: torch.Tensor
    tier2: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        # The loss of every rank may depend on this rank's rows: d(sum_r L_r)/dx = sum over ranks of the grads.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows]


def _dist_world_and_rank() -> tuple[int, int]:
    """Returns ``(world_size, rank)`` of the default process group, ``(1, 0)`` when not distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenates ``x`` from all ranks along dim 0, keeping gradients to every rank's rows.

    Args:
        x: ``[N, ...]`` tensor; every rank must pass the same shape.

    Returns:
        ``[world_size * N, ...]`` tensor ordered by rank (rank r's rows start at ``r * N``). Without an initialised
        process group, or with world size 1, ``x`` itself is returned (no communication). The backward pass is a
        collective (an all-reduce), so every rank must run it.
    """
    world, _ = _dist_world_and_rank()
    if world <= 1:
        return x
    return _AllGatherWithGrad.apply(x)


def _check_infonce_inputs(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None,
    pos_mask: torch.Tensor | None,
    neg_mask: torch.Tensor | None,
) -> None:
    if anchor.ndim != 2:
        raise ValueError(f"`anchor` must have shape [B, D], got {tuple(anchor.shape)}.")
    batch, dim = anchor.shape
    if positive.ndim != 3 or positive.shape[0] != batch or positive.shape[2] != dim:
        raise ValueError(f"`positive` must have shape [B={batch}, P, D={dim}], got {tuple(positive.shape)}.")
    if negative is not None and (negative.ndim != 3 or negative.shape[0] != batch or negative.shape[2] != dim):
        raise ValueError(f"`negative` must have shape [B={batch}, K, D={dim}] or be None, got {tuple(negative.shape)}.")
    if pos_mask is not None and tuple(pos_mask.shape) != tuple(positive.shape[:2]):
        raise ValueError(f"`pos_mask` must have shape {tuple(positive.shape[:2])}, got {tuple(pos_mask.shape)}.")
    if neg_mask is not None:
        expected = (batch, 0 if negative is None else negative.shape[1])
        if tuple(neg_mask.shape) != expected:
            raise ValueError(f"`neg_mask` must have shape {expected}, got {tuple(neg_mask.shape)}.")


def infonce_ext(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None = None,
    pos_mask: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
    temperature: float = 0.07,
    alpha: float = 0.5,
) -> InfoNCEExtOutput:
    """Two-tier extended InfoNCE loss of the NearID paper (``infonce_ext``).

    All embeddings are L2-normalised here (float32, eps 1e-7). Notation per sample b: anchor ``a_b``, positives
    ``p_{b,j}`` (other views of the same identity), hard negatives ``n_{b,k}`` (near-identity distractors: the same
    scene with a slightly different identity). The candidate pool ``G`` holds the positives of *all* samples of
    *all* ranks, flattened in order (rank, b, j), ``M = world * B * P`` vectors; sample b's own positive j sits at
    ``(rank * B + b) * P + j``. Logits ``s_b(g) = a_b . g / T`` and ``h_{b,k} = a_b . n_{b,k} / T``.

    * Tier 1 (discrimination: same identity above everything else). For each positive index j and each sample
      whose positive j is valid, ``CE_{b,j} = -s_b(p_{b,j}) + logsumexp([s_b(g) for g in G] + [h_{b,k} for all
      k])``. The denominator holds every gathered positive -- including the anchor's own other positive and
      padded/invalid slots of any sample -- plus the anchor's own K hard negatives *without* ``neg_mask``; other
      anchors and other samples' hard negatives are not in it. ``tier1`` averages ``CE_{b,j}`` over valid samples
      for each j, then over the j that have at least one valid sample (0 if none).
    * Tier 2 (ranking: near-identity distractor above random other identities). ``l_b`` = logsumexp of
      ``s_b(g)`` over ``G`` minus the anchor's own P positions (valid or not). Each valid hard negative gets
      ``softplus(l_b - h_{b,k})``; ``tier2`` is their mean over valid hard negatives (0 if none).

    Total ``loss = tier1 + alpha * tier2``. With an initialised ``torch.distributed`` process group of world size
    > 1, only the positives are all-gathered (with gradients); anchors and negatives stay local, every rank must
    use the same B, P and D, and every rank must call ``backward`` (the gather's backward is a collective).

    Args:
        anchor: ``[B, D]`` raw anchor embeddings.
        positive: ``[B, P, D]`` raw positive embeddings.
        negative: ``[B, K, D]`` raw hard-negative embeddings, or None (K = 0 is allowed too).
        pos_mask: ``[B, P]`` bool, True where the positive is real. None means all valid.
        neg_mask: ``[B, K]`` bool, True where the hard negative is real. None means all valid. Used by tier 2
            only, as in the reference implementation.
        temperature: Softmax temperature T.
        alpha: Weight of tier 2.

    Returns:
        :class:`InfoNCEExtOutput` with float32 scalars ``loss``, ``tier1``, ``tier2`` and a ``metrics`` dict.
    """
    _check_infonce_inputs(anchor, positive, negative, pos_mask, neg_mask)
    batch, num_pos, dim = positive.shape
    device = anchor.device

    a = F.normalize(anchor.float(), dim=-1, eps=_NORM_EPS)  # [B, D]
    p = F.normalize(positive.float(), dim=-1, eps=_NORM_EPS)  # [B, P, D]
    if negative is None:
        n = a.new_zeros(batch, 0, dim)
    else:
        n = F.normalize(negative.float(), dim=-1, eps=_NORM_EPS)  # [B, K, D]
    num_neg = n.shape[1]

    pmask = torch.ones(batch, num_pos, dtype=torch.bool, device=device) if pos_mask is None else pos_mask.bool()
    nmask = torch.ones(batch, num_neg, dtype=torch.bool, device=device) if neg_mask is None else neg_mask.bool()

    _, rank = _dist_world_and_rank()
    pool = _gather_with_grad(p.reshape(batch * num_pos, dim))  # [M, D]
    offset = rank * batch * num_pos
    own_idx = offset + torch.arange(batch * num_pos, device=device).view(batch, num_pos)  # [B, P]

    s = a @ pool.T / temperature  # [B, M]
    h = torch.einsum("bd,bkd->bk", a, n) / temperature  # [B, K]

    # Tier 1: the denominator does not depend on j, so one logsumexp per anchor serves every positive index.
    log_denominator = torch.logsumexp(torch.cat([s, h], dim=1), dim=1)  # [B]
    pos_logit = s.gather(1, own_idx)  # [B, P]
    ce = log_denominator[:, None] - pos_logit  # [B, P]
    valid_per_j = pmask.sum(dim=0)  # [P]
    ce_per_j = torch.where(pmask, ce, torch.zeros_like(ce)).sum(dim=0) / valid_per_j.clamp_min(1)
    j_used = valid_per_j > 0
    tier1 = torch.where(j_used, ce_per_j, torch.zeros_like(ce_per_j)).sum() / j_used.sum().clamp_min(1)

    # Tier 2: batch pool = all gathered positives except the anchor's own P slots (masked with the most negative
    # finite float, so an empty pool gives l_b ~ -3e38 and softplus(l_b - h) = 0 with finite gradients).
    own = torch.zeros_like(s, dtype=torch.bool).scatter_(1, own_idx, True)  # [B, M]
    lse_batch = torch.logsumexp(s.masked_fill(own, torch.finfo(s.dtype).min), dim=1)  # [B]
    t = F.softplus(lse_batch[:, None] - h)  # [B, K]
    tier2 = torch.where(nmask, t, torch.zeros_like(t)).sum() / nmask.sum().clamp_min(1)

    loss = tier1 + alpha * tier2

    with torch.no_grad():
        logits = torch.cat([s, h], dim=1)  # [B, M + K]
        hit = logits.argmax(dim=1, keepdim=True) == own_idx  # [B, P]
        acc_per_j = (hit & pmask).sum(dim=0).float() / valid_per_j.clamp_min(1)
        top1 = (acc_per_j * j_used).sum() / j_used.sum().clamp_min(1)
        tier_hits = ((h > lse_batch[:, None]) & nmask).sum().float() / nmask.sum().clamp_min(1)
        metrics = {
            "loss": float(loss),
            "tier1": float(tier1),
            "tier2": float(tier2),
            "top1_acc": float(top1),
            "tier_acc": float(tier_hits),
            "global_pos_count": float(pool.shape[0]),
            "hard_neg_count": float(num_neg),
        }
    return InfoNCEExtOutput(loss=loss, tier1=tier1, tier2=tier2, metrics=metrics)


def identity_loss(
    embeddings: torch.Tensor, reference_embeddings: torch.Tensor, reduce: str = "mean"
) -> torch.Tensor:
    """Identity loss ``1 - cosine`` of each embedding against a set of reference embeddings.

    Both inputs are L2-normalised here (float32, eps 1e-7). The loss lies in ``[0, 2]``: 0 means the same direction
    as the reference(s), lower is more similar in identity. Differentiable in both inputs.

    Args:
        embeddings: ``[N, D]`` raw embeddings (e.g. of generated images).
        reference_embeddings: ``[R, D]`` raw embeddings of the reference images of the identity.
        reduce: How the R references are combined: ``"mean"`` = 1 - mean of the R cosines, ``"max"`` = 1 - the
            largest cosine (closest reference), ``"min"`` = 1 - the smallest cosine (farthest reference),
            ``"centroid"`` = 1 - cosine to the normalised mean of the normalised references.

    Returns:
        ``[N]`` float32 losses.

    Raises:
        ValueError: If ``reduce`` is not one of the allowed values or the shapes do not match.
    """
    if reduce not in _IDENTITY_REDUCTIONS:
        raise ValueError(f"`reduce` must be one of {', '.join(map(repr, _IDENTITY_REDUCTIONS))}; got {reduce!r}.")
    if embeddings.ndim != 2 or reference_embeddings.ndim != 2:
        raise ValueError(
            "`embeddings` must be [N, D] and `reference_embeddings` [R, D]; got "
            f"{tuple(embeddings.shape)} and {tuple(reference_embeddings.shape)}."
        )
    if embeddings.shape[1] != reference_embeddings.shape[1] or reference_embeddings.shape[0] == 0:
        raise ValueError(
            "`reference_embeddings` must be a non-empty [R, D] with the same D as `embeddings`; got "
            f"{tuple(reference_embeddings.shape)} for embeddings {tuple(embeddings.shape)}."
        )
    e = F.normalize(embeddings.float(), dim=-1, eps=_NORM_EPS)
    r = F.normalize(reference_embeddings.float(), dim=-1, eps=_NORM_EPS)
    if reduce == "centroid":
        centroid = F.normalize(r.mean(dim=0), dim=-1, eps=_NORM_EPS)
        return 1.0 - e @ centroid
    cos = e @ r.T  # [N, R]
    if reduce == "mean":
        sim = cos.mean(dim=1)
    elif reduce == "max":
        sim = cos.amax(dim=1)
    else:
        sim = cos.amin(dim=1)
    return 1.0 - sim
