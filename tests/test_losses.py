"""Tests for nearid_core.losses: the two-tier infonce_ext loss and the identity reward loss."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

from nearid_core.losses import InfoNCEExtOutput, identity_loss, infonce_ext

# ----------------------------------------------------------------------------------------------------------------------
# Spec test vectors (nearid-reference.md section 4)

SPEC_ANCHOR = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]
SPEC_POSITIVE = [
    [[0.6, 0.2, 0.2, 0.1], [0.5, 0.5, 0.0, 0.2]],
    [[0.3, 0.6, 0.3, 0.0], [0.0, 0.5, 0.5, 0.4]],
    [[0.4, 0.1, 0.7, 0.0], [0.2, 0.3, 0.5, 0.5]],
]
SPEC_NEGATIVE = [
    [[0.3, 0.3, 0.3, 0.3], [0.1, 0.1, 0.6, 0.4]],
    [[0.2, 0.2, 0.2, 0.8], [0.5, 0.3, 0.1, 0.1]],
    [[0.3, 0.3, 0.3, 0.3], [0.6, 0.1, 0.2, 0.1]],
]
SPEC_POS_MASK = [[1, 1], [1, 1], [1, 0]]
SPEC_NEG_MASK = [[1, 1], [1, 0], [1, 1]]


def _spec_inputs():
    return (
        torch.tensor(SPEC_ANCHOR, dtype=torch.float32),
        torch.tensor(SPEC_POSITIVE, dtype=torch.float32),
        torch.tensor(SPEC_NEGATIVE, dtype=torch.float32),
        torch.tensor(SPEC_POS_MASK, dtype=torch.bool),
        torch.tensor(SPEC_NEG_MASK, dtype=torch.bool),
    )


@pytest.mark.parametrize(
    ("temperature", "tier1", "tier2", "total"),
    [(0.07, 1.597097, 3.792738, 3.493466), (1.0, 1.797848, 1.617034, 2.606364)],
)
def test_spec_vectors(temperature, tier1, tier2, total):
    a, p, n, pm, nm = _spec_inputs()
    out = infonce_ext(a, p, n, pm, nm, temperature=temperature, alpha=0.5)
    assert isinstance(out, InfoNCEExtOutput)
    assert out.tier1.item() == pytest.approx(tier1, abs=1e-5)
    assert out.tier2.item() == pytest.approx(tier2, abs=1e-5)
    assert out.loss.item() == pytest.approx(total, abs=1e-5)
    assert out.loss.dtype == torch.float32 and out.loss.ndim == 0


def test_spec_vector_metrics():
    out = infonce_ext(*_spec_inputs(), temperature=0.07, alpha=0.5)
    m = out.metrics
    assert m["top1_acc"] == pytest.approx(0.5)
    assert m["tier_acc"] == pytest.approx(0.0)
    assert m["global_pos_count"] == 6
    assert m["hard_neg_count"] == 2
    assert m["loss"] == pytest.approx(3.493466, abs=1e-5)
    assert all(isinstance(v, float) for v in m.values())


# ----------------------------------------------------------------------------------------------------------------------
# Independent loop-based re-derivation, following the spec text literally (float64, Python loops over b, j, k).


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-7)


def _reference_infonce_ext(anchor, pool, negative, pos_mask, neg_mask, offset, temperature, alpha):
    """anchor [B, D], pool [M, D] (all gathered positives), negative [B, K, D]; sample b's positive j is
    pool[offset + b * P + j]. Returns (total, tier1, tier2) as float64 scalars that keep the autograd graph."""
    num_b, num_p = pos_mask.shape
    num_k = negative.shape[1]
    pool_u = [_unit(g) for g in pool]

    def s(b, g_index):
        return torch.dot(_unit(anchor[b]), pool_u[g_index]) / temperature

    def h(b, k):
        return torch.dot(_unit(anchor[b]), _unit(negative[b, k])) / temperature

    # Tier 1: per positive index j, mean over valid b of CE_{b,j}; then mean over the j with a valid sample.
    per_j = []
    for j in range(num_p):
        ces = []
        for b in range(num_b):
            if not pos_mask[b, j]:
                continue
            denominator = sum(torch.exp(s(b, g)) for g in range(len(pool_u)))
            for k in range(num_k):  # own hard negatives, neg_mask NOT applied
                denominator = denominator + torch.exp(h(b, k))
            ces.append(-s(b, offset + b * num_p + j) + torch.log(denominator))
        if ces:
            per_j.append(sum(ces) / len(ces))
    tier1 = sum(per_j) / len(per_j) if per_j else torch.zeros((), dtype=torch.float64)

    # Tier 2: l_b = logsumexp over the pool minus the anchor's own P slots; softplus(l_b - h) over valid negatives.
    terms = []
    for b in range(num_b):
        own = {offset + b * num_p + j for j in range(num_p)}
        others = [s(b, g) for g in range(len(pool_u)) if g not in own]
        for k in range(num_k):
            if not neg_mask[b, k]:
                continue
            if not others:
                terms.append(torch.zeros((), dtype=torch.float64))
                continue
            lse = torch.log(sum(torch.exp(x) for x in others))
            terms.append(-h(b, k) + torch.log(torch.exp(h(b, k)) + torch.exp(lse)))
    tier2 = sum(terms) / len(terms) if terms else torch.zeros((), dtype=torch.float64)
    return tier1 + alpha * tier2, tier1, tier2


def _random_batch(seed, batch=5, num_p=2, num_k=3, dim=8):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, dim, generator=gen)
    p = torch.randn(batch, num_p, dim, generator=gen)
    n = torch.randn(batch, num_k, dim, generator=gen)
    pm = torch.rand(batch, num_p, generator=gen) < 0.7
    nm = torch.rand(batch, num_k, generator=gen) < 0.6
    return a, p, n, pm, nm


def test_reference_matches_spec_vectors():
    a, p, n, pm, nm = (t.double() if t.is_floating_point() else t for t in _spec_inputs())
    total, t1, t2 = _reference_infonce_ext(a, p.reshape(-1, 4), n, pm, nm, 0, 0.07, 0.5)
    assert (t1.item(), t2.item(), total.item()) == pytest.approx((1.597097, 3.792738, 3.493466), abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_vectorised_matches_loop_reference(seed, temperature):
    a, p, n, pm, nm = _random_batch(seed)
    if seed == 5:  # a positive index with no valid sample and no valid hard negative at all
        pm[:, 1] = False
        nm[:] = False
    out = infonce_ext(a, p, n, pm, nm, temperature=temperature, alpha=0.5)
    total, t1, t2 = _reference_infonce_ext(a.double(), p.double().reshape(-1, 8), n.double(), pm, nm, 0,
                                           temperature, 0.5)
    assert out.tier1.item() == pytest.approx(t1.item(), abs=1e-5, rel=1e-5)
    assert out.tier2.item() == pytest.approx(t2.item(), abs=1e-5, rel=1e-5)
    assert out.loss.item() == pytest.approx(total.item(), abs=1e-5, rel=1e-5)


def test_gradients_match_loop_reference():
    a, p, n, pm, nm = _random_batch(11)
    leaves = [t.clone().requires_grad_(True) for t in (a, p, n)]
    infonce_ext(*leaves, pm, nm).loss.backward()
    ref_leaves = [t.double().requires_grad_(True) for t in (a, p, n)]
    total, _, _ = _reference_infonce_ext(ref_leaves[0], ref_leaves[1].reshape(-1, 8), ref_leaves[2], pm, nm, 0,
                                         0.07, 0.5)
    total.backward()
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Contract tests


def test_gradients_flow_and_are_finite():
    a, p, n, pm, nm = _random_batch(3)
    a, p, n = (t.requires_grad_(True) for t in (a, p, n))
    infonce_ext(a, p, n, pm, nm).loss.backward()
    for t in (a, p, n):
        assert t.grad is not None and torch.isfinite(t.grad).all()
        assert t.grad.abs().sum() > 0


def test_scale_invariance():
    a, p, n, pm, nm = _random_batch(7)
    gen = torch.Generator().manual_seed(0)
    scale = lambda t: t * (0.1 + 10 * torch.rand(*t.shape[:-1], 1, generator=gen))  # noqa: E731
    base = infonce_ext(a, p, n, pm, nm)
    scaled = infonce_ext(scale(a), scale(p), scale(n), pm, nm)
    torch.testing.assert_close(scaled.loss, base.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scaled.tier2, base.tier2, atol=1e-5, rtol=1e-5)


def test_no_negatives_gives_zero_tier2():
    a, p, _, pm, _ = _random_batch(4)
    out = infonce_ext(a, p, None, pm)
    assert out.tier2.item() == 0.0
    assert out.loss.item() == pytest.approx(out.tier1.item())
    assert out.metrics["hard_neg_count"] == 0
    empty = infonce_ext(a, p, torch.empty(5, 0, 8), pm)
    assert empty.loss.item() == pytest.approx(out.loss.item()) and empty.tier2.item() == 0.0


def test_all_invalid_negatives_gives_zero_tier2_and_same_tier1():
    a, p, n, pm, nm = _random_batch(5)
    a.requires_grad_(True)
    out = infonce_ext(a, p, n, pm, torch.zeros_like(nm))
    assert out.tier2.item() == 0.0
    assert out.metrics["tier_acc"] == 0.0
    # Tier 1 ignores neg_mask (reference quirk): its denominator always has all K hard negatives.
    torch.testing.assert_close(out.tier1, infonce_ext(a, p, n, pm, nm).tier1)
    out.loss.backward()
    assert torch.isfinite(a.grad).all()


def test_tier1_denominator_includes_invalid_positives():
    a, p, n, pm, nm = _spec_inputs()
    moved = p.clone()
    moved[2, 1] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # invalid slot (pos_mask[2, 1] is False) now matches anchor 1
    assert infonce_ext(a, moved, n, pm, nm).tier1.item() != pytest.approx(infonce_ext(a, p, n, pm, nm).tier1.item())


def test_single_sample_has_empty_tier2_pool():
    a, p, n, _, _ = _random_batch(6, batch=1)
    a.requires_grad_(True)
    out = infonce_ext(a, p, n)
    assert out.tier2.item() == 0.0
    out.loss.backward()
    assert torch.isfinite(a.grad).all()


def test_half_precision_inputs_compute_in_float32():
    a, p, n, pm, nm = _random_batch(8)
    out = infonce_ext(a.bfloat16(), p.bfloat16(), n.bfloat16(), pm, nm)
    assert out.loss.dtype == torch.float32
    ref = infonce_ext(a.bfloat16().float(), p.bfloat16().float(), n.bfloat16().float(), pm, nm)
    torch.testing.assert_close(out.loss, ref.loss)


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        (((5, 8), (5, 2, 7), (5, 3, 8)), "positive"),
        (((5, 8), (5, 2, 8), (4, 3, 8)), "negative"),
        (((5, 1, 8), (5, 2, 8), (5, 3, 8)), "anchor"),
    ],
)
def test_bad_shapes_raise(shapes, match):
    tensors = [torch.randn(*s) for s in shapes]
    with pytest.raises(ValueError, match=match):
        infonce_ext(*tensors)


def test_bad_mask_shape_raises():
    a, p, n, pm, nm = _random_batch(0)
    with pytest.raises(ValueError, match="pos_mask"):
        infonce_ext(a, p, n, pm[:, :1], nm)
    with pytest.raises(ValueError, match="neg_mask"):
        infonce_ext(a, p, n, pm, nm[:, :2])


# ----------------------------------------------------------------------------------------------------------------------
# Distributed: 2 gloo processes, each with half of the batch; positives are gathered with gradients.

_DIST_B, _DIST_P, _DIST_K, _DIST_D = 3, 2, 3, 8


def _dist_worker(rank, world, init_file, data, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        rows = slice(rank * _DIST_B, (rank + 1) * _DIST_B)
        a, p, n = (data[key][rows].clone().requires_grad_(True) for key in ("a", "p", "n"))
        out = infonce_ext(a, p, n, data["pm"][rows], data["nm"][rows], temperature=0.1, alpha=0.5)
        out.loss.backward()
        torch.save(
            {"loss": out.loss.detach(), "tier1": out.tier1.detach(), "tier2": out.tier2.detach(),
             "metrics": out.metrics, "ga": a.grad, "gp": p.grad, "gn": n.grad},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_distributed_gather_matches_full_pool(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    world = 2
    a, p, n, pm, nm = _random_batch(21, batch=world * _DIST_B, num_p=_DIST_P, num_k=_DIST_K, dim=_DIST_D)
    pm[0, 1] = False  # some padding on rank 0
    data = {"a": a, "p": p, "n": n, "pm": pm, "nm": nm}
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "store"), data, str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    # Single-process reference: rank r's anchors/negatives against the FULL positive pool of both ranks.
    ra, rp, rn = (t.double().requires_grad_(True) for t in (a, p, n))
    pool = rp.reshape(-1, _DIST_D)
    per_rank = []
    for r in range(world):
        rows = slice(r * _DIST_B, (r + 1) * _DIST_B)
        per_rank.append(_reference_infonce_ext(ra[rows], pool, rn[rows], pm[rows], nm[rows], r * _DIST_B * _DIST_P,
                                               0.1, 0.5))
    for r, (res, (total, t1, t2)) in enumerate(zip(results, per_rank)):
        assert res["loss"].item() == pytest.approx(total.item(), abs=1e-5), f"rank {r}"
        assert res["tier1"].item() == pytest.approx(t1.item(), abs=1e-5), f"rank {r}"
        assert res["tier2"].item() == pytest.approx(t2.item(), abs=1e-5), f"rank {r}"
        assert res["metrics"]["global_pos_count"] == world * _DIST_B * _DIST_P

    # The gathered pool makes rank 0's loss depend on rank 1's positives ...
    cross = torch.autograd.grad(per_rank[0][0], rp, retain_graph=True)[0][_DIST_B:]
    assert cross.abs().sum() > 1e-3
    # ... and each rank's positive gradient is the sum over both ranks' losses (what DDP then averages).
    sum(total for total, _, _ in per_rank).backward()
    for r, res in enumerate(results):
        rows = slice(r * _DIST_B, (r + 1) * _DIST_B)
        torch.testing.assert_close(res["gp"].double(), rp.grad[rows], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(res["ga"].double(), ra.grad[rows], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(res["gn"].double(), rn.grad[rows], atol=1e-5, rtol=1e-4)


def test_gather_is_identity_without_process_group():
    from nearid_core.losses import _gather_with_grad

    x = torch.randn(4, 3)
    assert _gather_with_grad(x) is x


# ----------------------------------------------------------------------------------------------------------------------
# identity_loss

_EMB = [[1.0, 0.0], [0.0, 1.0]]
_REF = [[1.0, 0.0], [1.0, 1.0]]
_H = math.sqrt(0.5)


@pytest.mark.parametrize(
    ("reduce", "expected"),
    [
        ("mean", [1 - (1 + _H) / 2, 1 - _H / 2]),
        ("max", [0.0, 1 - _H]),
        ("min", [1 - _H, 1.0]),
        ("centroid", [1 - (1 + _H) / math.sqrt((1 + _H) ** 2 + _H**2), 1 - _H / math.sqrt((1 + _H) ** 2 + _H**2)]),
    ],
)
def test_identity_loss_values(reduce, expected):
    emb = torch.tensor(_EMB) * torch.tensor([[3.0], [0.5]])  # scale must not matter
    ref = torch.tensor(_REF) * 2.0
    got = identity_loss(emb, ref, reduce=reduce)
    assert got.shape == (2,)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=1e-6)


def test_identity_loss_default_is_mean_and_matches_cosine():
    gen = torch.Generator().manual_seed(0)
    emb, ref = torch.randn(4, 16, generator=gen), torch.randn(3, 16, generator=gen)
    want = 1 - F.cosine_similarity(emb[:, None], ref[None], dim=-1).mean(dim=1)
    torch.testing.assert_close(identity_loss(emb, ref), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("reduce", ["mean", "max", "min", "centroid"])
def test_identity_loss_is_differentiable(reduce):
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(3, 8, generator=gen, requires_grad=True)
    ref = torch.randn(2, 8, generator=gen, requires_grad=True)
    identity_loss(emb, ref, reduce=reduce).sum().backward()
    for t in (emb, ref):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_identity_loss_bad_reduce_raises():
    with pytest.raises(ValueError, match=r"reduce.*'mean'.*'max'.*'min'.*'centroid'.*'median'"):
        identity_loss(torch.randn(2, 4), torch.randn(3, 4), reduce="median")


def test_identity_loss_bad_shapes_raise():
    with pytest.raises(ValueError, match="reference_embeddings"):
        identity_loss(torch.randn(2, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="embeddings"):
        identity_loss(torch.randn(4), torch.randn(3, 4))
