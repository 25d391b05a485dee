"""Tests for nearid_core.scorer: embedding, similarity, scoring, ranking, attention maps and dtype defaults."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_PREPROCESS, TINY_VISION, tiny_nearid_model
from PIL import Image
from transformers import SiglipVisionConfig, SiglipVisionModel

from nearid_core import ImageInputError, NearIDConfig, NearIDModel, NearIDScorer, PreprocessConfig, to_percent
from nearid_core.preprocessing import iter_images, preprocess_images

D = TINY_VISION["hidden_size"]


def make_images(n: int, seed: int = 0, sizes=((70, 90), (56, 56), (120, 64), (33, 47))) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w]
        phase = rng.uniform(0, 6, 3)
        base = np.stack([np.sin(xx / (3 + c) + phase[c]) * np.cos(yy / (4 + c)) for c in range(3)], -1)
        out.append(Image.fromarray(((base * 0.4 + 0.5 + rng.normal(0, 0.15, (h, w, 3))).clip(0, 1) * 255).astype(np.uint8)))
    return out


@pytest.fixture(scope="module")
def scorer(release_dir) -> NearIDScorer:
    return NearIDScorer.from_pretrained(release_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return make_images(8, seed=11)


def by_hand(scorer: NearIDScorer, images) -> torch.Tensor:
    """Embeddings via a plain transformers SiglipVisionModel holding the scorer's weights."""
    plain = SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)).eval()
    plain.load_state_dict({k: v.float() for k, v in scorer.model.backbone.state_dict().items()})
    rows = []
    with torch.no_grad():
        for x in iter_images(images):
            rows.append(plain(preprocess_images([x], TINY_PREPROCESS)).pooler_output[0])
    return F.normalize(torch.stack(rows), dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("layout", ["release_dir", "siglip_vision_dir", "siglip_full_dir", "head_only_file"])
def test_from_pretrained_layouts(layout, request, images):
    s = NearIDScorer.from_pretrained(request.getfixturevalue(layout), device="cpu", dtype=torch.float32)
    assert s.embed_dim == D
    assert s.device == torch.device("cpu") and s.dtype == torch.float32
    assert s.preprocess_config == TINY_PREPROCESS
    assert isinstance(s.model, NearIDModel) and not s.model.training
    assert all(not p.requires_grad for p in s.model.parameters())
    emb = s.embed(images[:3])
    torch.testing.assert_close(emb, by_hand(s, images[:3]), atol=1e-5, rtol=1e-4)
    assert "NearIDScorer" in repr(s) and "56" in repr(s)


def test_layouts_give_expected_models(release_dir, siglip_vision_dir, head_only_file, images):
    """release and head-only hold the same NearID head (release in fp16); plain SigLIP is the baseline head."""
    e = {
        name: NearIDScorer.from_pretrained(path, device="cpu", dtype=torch.float32).embed(images[:4])
        for name, path in [("release", release_dir), ("siglip", siglip_vision_dir), ("head", head_only_file)]
    }
    assert (e["release"] * e["head"]).sum(-1).min() > 0.9999
    assert (e["release"] * e["siglip"]).sum(-1).max() < 0.99


# ----------------------------------------------------------------------------------------------------------------------
# embed


def test_embed_shape_dtype_norm(scorer, images):
    emb = scorer.embed(images)
    assert emb.shape == (8, D)
    assert emb.dtype == torch.float32
    assert emb.device == torch.device("cpu")
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(8))
    assert not emb.requires_grad
    # different images give different embeddings
    sims = emb @ emb.T
    assert (sims - torch.eye(8)).abs().max() < 1 and sims.fill_diagonal_(0).max() < 0.9999


def test_embed_single_image_and_no_list(scorer, images):
    one = scorer.embed(images[0])
    assert one.shape == (1, D)
    torch.testing.assert_close(one, scorer.embed([images[0]]))


def test_mixed_inputs_equal_separate(scorer, image_files, rgb_images):
    arr = np.asarray(rgb_images[2]).copy()
    comfy = torch.from_numpy(np.asarray(rgb_images[3]).copy())[None].float() / 255
    items = [str(image_files[0]), rgb_images[1], arr, comfy]
    mixed = scorer.embed(items)
    assert mixed.shape == (4, D)
    separate = torch.cat([scorer.embed(item) for item in items])
    torch.testing.assert_close(mixed, separate, atol=1e-5, rtol=1e-4)
    # and the file / PIL / numpy / tensor forms of one image agree with each other
    forms = [str(image_files[2]), rgb_images[2], arr, torch.from_numpy(arr)[None].float() / 255]
    e = scorer.embed(forms)
    assert (e @ e.T).min() > 0.99999


def test_comfy_batch_counts_as_several_images(scorer, images):
    same = [np.asarray(im) for im in make_images(3, seed=5, sizes=((64, 48),))]
    comfy = torch.from_numpy(np.stack(same)).float() / 255  # [3, 64, 48, 3]
    emb = scorer.embed([comfy, images[0]])
    assert emb.shape == (4, D)
    torch.testing.assert_close(emb[:3], scorer.embed(same), atol=1e-5, rtol=1e-4)


def test_batch_size_invariance(scorer, images):
    a = scorer.embed(images, batch_size=1)
    b = scorer.embed(images, batch_size=3)
    c = scorer.embed(images, batch_size=64)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="batch_size"):
        scorer.embed(images, batch_size=0)


def test_empty_list(scorer):
    emb = scorer.embed([])
    assert emb.shape == (0, D)
    assert emb.dtype == torch.float32


def test_embed_matches_by_hand(scorer, images):
    torch.testing.assert_close(scorer.embed(images), by_hand(scorer, images), atol=1e-5, rtol=1e-4)


def test_pixel_values(scorer, images):
    px = scorer.pixel_values(images[:3])
    assert px.shape == (3, 3, 56, 56) and px.dtype == torch.float32
    with torch.no_grad():
        emb = F.normalize(scorer.model.get_image_features(px), dim=-1)
    torch.testing.assert_close(emb, scorer.embed(images[:3]), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# similarity / score / rank


def test_similarity_shape_and_symmetry(scorer, images):
    a, b = images[:3], images[3:8]
    s = scorer.similarity(a, b)
    assert s.shape == (3, 5)
    torch.testing.assert_close(scorer.similarity(b, a), s.T, atol=1e-6, rtol=0)
    sq = scorer.similarity(images, images)
    torch.testing.assert_close(sq, sq.T, atol=1e-6, rtol=0)
    torch.testing.assert_close(sq.diagonal(), torch.ones(8), atol=1e-5, rtol=0)
    assert sq.min() >= -1 - 1e-5 and sq.max() <= 1 + 1e-5
    ea, eb = by_hand(scorer, a), by_hand(scorer, b)
    torch.testing.assert_close(s, ea @ eb.T, atol=1e-5, rtol=1e-4)


def test_score_reductions(scorer, images):
    refs, cands = images[:3], images[3:8]
    er, ec = by_hand(scorer, refs).double(), by_hand(scorer, cands).double()
    cos = np.array([[float(ec[i] @ er[j]) for j in range(3)] for i in range(5)])
    centroid = er.mean(0) / er.mean(0).norm()
    expected = {
        "mean": cos.mean(1),
        "min": cos.min(1),
        "max": cos.max(1),
        "centroid": np.array([float(ec[i] @ centroid) for i in range(5)]),
    }
    for reduce, want in expected.items():
        got = scorer.score(refs, cands, reduce=reduce)
        assert got.shape == (5,), reduce
        np.testing.assert_allclose(got.numpy(), want, atol=1e-5, err_msg=reduce)
    # the reductions are genuinely different numbers here
    assert np.abs(expected["min"] - expected["max"]).min() > 1e-3
    assert np.abs(expected["mean"] - expected["centroid"]).max() > 1e-4
    # default is mean
    torch.testing.assert_close(scorer.score(refs, cands), scorer.score(refs, cands, reduce="mean"))


def test_score_single_reference(scorer, images):
    got = scorer.score(images[0], images[1:4])
    want = by_hand(scorer, images[1:4]) @ by_hand(scorer, [images[0]])[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for reduce in ("min", "max", "centroid"):
        torch.testing.assert_close(scorer.score(images[0], images[1:4], reduce=reduce), got, atol=1e-5, rtol=1e-4)


def test_score_with_precomputed_embeddings(scorer, images):
    refs, cands = images[:3], images[3:6]
    ref_emb = scorer.embed(refs)
    cand_emb = scorer.embed(cands)
    for reduce in ("mean", "min", "max", "centroid"):
        want = scorer.score(refs, cands, reduce=reduce)
        torch.testing.assert_close(scorer.score(ref_emb, cands, reduce=reduce), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(scorer.score(ref_emb, cand_emb, reduce=reduce), want, atol=1e-6, rtol=0)
        # unnormalised embeddings are re-normalised
        torch.testing.assert_close(scorer.score(ref_emb * 7.5, cand_emb * 0.1, reduce=reduce), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(scorer.similarity(ref_emb, cands), scorer.similarity(refs, cands), atol=1e-6, rtol=0)


def test_wrong_dimension_embeddings(scorer, images):
    with pytest.raises(ValueError, match=f"{D + 1}.*{D}"):
        scorer.score(torch.randn(2, D + 1), images[:2])
    with pytest.raises(ValueError, match="dimension"):
        scorer.similarity(images[:2], torch.randn(3, 1152))


def test_bad_reduce(scorer, images):
    with pytest.raises(ValueError, match="reduce"):
        scorer.score(images[:1], images[1:2], reduce="median")
    with pytest.raises(ValueError, match="reduce"):
        scorer.rank(images[:1], images[1:2], reduce="sum")


def test_empty_references(scorer, images):
    with pytest.raises(ValueError, match="references"):
        scorer.score([], images[:2])
    with pytest.raises(ValueError, match="references"):
        scorer.score(torch.empty(0, D), images[:2])


def test_empty_candidates(scorer, images):
    for reduce in ("mean", "min", "max", "centroid"):
        assert scorer.score(images[:2], [], reduce=reduce).shape == (0,)


def test_rank(scorer, images):
    refs, cands = images[:2], images[2:8]
    scores = scorer.score(refs, cands)
    order, ranked = scorer.rank(refs, cands)
    assert order.tolist() == sorted(range(6), key=lambda i: -float(scores[i]))
    torch.testing.assert_close(ranked, scores[order])
    assert (ranked[:-1] >= ranked[1:]).all()
    top, top_scores = scorer.rank(refs, cands, top_k=2)
    assert top.tolist() == order[:2].tolist() and top_scores.shape == (2,)
    assert scorer.rank(refs, cands, top_k=0)[0].numel() == 0
    assert scorer.rank(refs, cands, top_k=100)[0].tolist() == order.tolist()
    order_min, _ = scorer.rank(refs, cands, reduce="min")
    assert order_min.tolist() == torch.sort(scorer.score(refs, cands, reduce="min"), descending=True).indices.tolist()


def test_rank_stable_ties():
    model = tiny_nearid_model(1)
    s = NearIDScorer(model, TINY_PREPROCESS, device="cpu", dtype=torch.float32)
    ref = torch.zeros(1, D)
    ref[0, 0] = 1
    cands = torch.zeros(6, D)
    # scores: 0.5, 1.0, 0.5, 1.0, 0.0, 0.5 (exact in float32)
    for i, c in enumerate([0.5, 1.0, 0.5, 1.0, 0.0, 0.5]):
        cands[i, 0] = c
        cands[i, 1] = (1 - c * c) ** 0.5
    order, scores = s.rank(ref, cands)
    assert order.tolist() == [1, 3, 0, 2, 5, 4]
    torch.testing.assert_close(scores, torch.tensor([1.0, 1.0, 0.5, 0.5, 0.5, 0.0]), atol=1e-6, rtol=0)
    assert s.rank(ref, cands, top_k=3)[0].tolist() == [1, 3, 0]


def test_to_percent():
    x = torch.tensor([-1.0, -0.25, 0.0, 0.5, 0.873, 1.0])
    torch.testing.assert_close(to_percent(x), torch.tensor([-100.0, -25.0, 0.0, 50.0, 87.3, 100.0]))


# ----------------------------------------------------------------------------------------------------------------------
# attention maps


def test_attention_maps_mixed_sizes(scorer, images):
    maps = scorer.attention_maps(images[:4])
    assert isinstance(maps, list) and len(maps) == 4
    assert [tuple(m.shape) for m in maps] == [(70, 90), (56, 56), (120, 64), (33, 47)]
    for m in maps:
        assert m.dtype == torch.float32 and m.device == torch.device("cpu")
        assert m.min() >= 0 and m.max() <= 1
        assert float(m.min()) == 0.0 and float(m.max()) == pytest.approx(1.0)


def test_attention_maps_uniform_and_size(scorer, images):
    same = make_images(3, seed=2, sizes=((64, 48),))
    maps = scorer.attention_maps(same)
    assert isinstance(maps, torch.Tensor) and maps.shape == (3, 64, 48)
    sized = scorer.attention_maps(images[:4], size=(20, 30))
    assert isinstance(sized, torch.Tensor) and sized.shape == (4, 20, 30)
    assert sized.min() >= 0 and sized.max() <= 1
    assert scorer.attention_maps([]) == []


def test_attention_maps_follow_probe_attention(scorer, images):
    """At the model's own size the map is the [4, 4] head attention upsampled and scaled to 0..1."""
    img = images[1]  # 56 x 56
    m = scorer.attention_maps(img)
    assert m.shape == (1, 56, 56)
    with torch.no_grad():
        px = scorer.pixel_values(img)
        _, attn = scorer.model.pool(scorer.model.encode_tokens(px), output_attentions=True)
    grid = attn.reshape(1, 1, 4, 4)
    up = F.interpolate(grid, size=(56, 56), mode="bilinear", align_corners=False)[0, 0]
    want = (up - up.min()) / (up.max() - up.min())
    torch.testing.assert_close(m[0], want, atol=1e-5, rtol=0)
    # block means order like the attention weights
    blocks = m[0].reshape(4, 14, 4, 14).mean(dim=(1, 3)).flatten()
    assert int(blocks.argmax()) == int(attn[0].argmax())
    assert np.corrcoef(blocks.numpy(), attn[0].numpy())[0, 1] > 0.9


def test_attention_maps_pad_unseen_border():
    """image 60 / patch 14: the conv covers 56 px; the last 4 rows/cols repeat the covered edge."""
    vision = dict(TINY_VISION, image_size=60)
    model = NearIDModel(NearIDConfig(vision_config=vision)).eval()
    model.backbone.load_state_dict(tiny_nearid_model(1).backbone.state_dict())
    s = NearIDScorer(model, PreprocessConfig(size=(60, 60)), device="cpu", dtype=torch.float32)
    img = make_images(1, seed=4, sizes=((60, 60),))
    m = s.attention_maps(img)[0]
    assert m.shape == (60, 60)
    for r in range(56, 60):
        torch.testing.assert_close(m[r], m[55])
        torch.testing.assert_close(m[:, r], m[:, 55])
    assert not torch.allclose(m[55], m[0])


# ----------------------------------------------------------------------------------------------------------------------
# dtype / device defaults


def test_bf16_close_to_fp32(release_dir, siglip_vision_dir):
    imgs = make_images(16, seed=21)
    worst = 1.0
    for path in (release_dir, siglip_vision_dir):
        e32 = NearIDScorer.from_pretrained(path, device="cpu", dtype=torch.float32).embed(imgs)
        s16 = NearIDScorer.from_pretrained(path, device="cpu", dtype=torch.bfloat16)
        assert {p.dtype for p in s16.model.backbone.encoder.parameters()} == {torch.bfloat16}
        assert {p.dtype for p in s16.model.head.parameters()} == {torch.float32}  # the head runs in fp32 on CPUs
        e16 = s16.embed(imgs)
        assert e16.dtype == torch.float32  # embeddings always come back in fp32
        torch.testing.assert_close(e16.norm(dim=-1), torch.ones(16))
        worst = min(worst, float((e16 * e32).sum(-1).min()))
    print(f"bf16 vs fp32 min cosine: {worst:.6f}")
    assert worst >= 0.99


def test_to_changes_dtype(release_dir, images):
    s = NearIDScorer.from_pretrained(release_dir, device="cpu", dtype=torch.float32)
    e32 = s.embed(images[:2])
    assert s.to(dtype=torch.bfloat16) is s
    assert s.dtype == torch.bfloat16 and {p.dtype for p in s.model.backbone.encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in s.model.head.parameters()} == {torch.float32}
    e16 = s.embed(images[:2])
    assert (e16 * e32).sum(-1).min() > 0.99


# ----------------------------------------------------------------------------------------------------------------------
# embed_files: decoding in worker processes


@pytest.mark.parametrize("workers", [0, 2])
def test_embed_files_equals_embed_in_order(scorer, tmp_path, workers):
    paths = []
    for i, img in enumerate(make_images(7, seed=31)):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    with torch.no_grad():
        want = scorer.embed([str(p) for p in paths])
    got, kept, skipped = scorer.embed_files([*paths[:3], broken, *paths[3:]], batch_size=3, num_workers=workers,
                                            skip_unreadable=True)
    assert kept == paths and [p for p, _ in skipped] == [broken] and "broken.png" in skipped[0][1]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    with pytest.raises(ImageInputError, match="broken.png"):
        scorer.embed_files([paths[0], broken], num_workers=workers)
