"""The trunk's CPU attention (nearid_core.attention): same result as SDPA, used only where it is the faster one."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_PREPROCESS, tiny_nearid_model
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import nearid_core
import nearid_core.attention as attention
from nearid_core import NearIDScorer
from nearid_core.attention import CPU_BMM_ATTENTION, cpu_bmm_attention


def _qkv(batch: int, heads: int, length: int, head_dim: int, dtype: torch.dtype, seed: int = 0):
    """[B, H, L, D] views of [B, L, H, D] projections, as SiglipAttention passes them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, length, heads, head_dim, generator=g).to(dtype).transpose(1, 2) for _ in range(3)]


@pytest.mark.parametrize("batch, heads, length, head_dim", [(1, 1, 5, 8), (3, 3, 17, 12), (2, 16, 49, 72)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_sdpa_in_reduced_precision(batch, heads, length, head_dim, dtype):
    q, k, v = _qkv(batch, heads, length, head_dim, dtype)  # odd B*H: the last chunk holds one head
    out, weights = cpu_bmm_attention(None, q, k, v, None, scaling=head_dim ** -0.5, is_causal=False)
    ref, _ = sdpa_attention_forward(torch.nn.Module(), q.float(), k.float(), v.float(), None,
                                    scaling=head_dim ** -0.5, is_causal=False)
    assert weights is None and out.shape == (batch, length, heads, head_dim) and out.dtype == dtype
    assert F.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0) > 0.9999
    assert (out.float() - ref).abs().max() < 0.05


def _count_bmm(monkeypatch) -> list[int]:
    calls = []
    real = torch.bmm

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.torch, "bmm", counting)
    return calls


@pytest.mark.parametrize("case", ["fp32", "mask", "grad", "causal"])
def test_other_cases_go_to_sdpa(monkeypatch, case):
    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    q, k, v = _qkv(2, 4, 9, 8, dtype)
    mask = torch.zeros(2, 1, 9, 9, dtype=dtype) if case == "mask" else None
    if case == "grad":
        q.requires_grad_(True)
    calls = _count_bmm(monkeypatch)
    module = torch.nn.Module()
    causal = case == "causal"
    out, _ = cpu_bmm_attention(module, q, k, v, mask, scaling=8 ** -0.5, is_causal=causal)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=8 ** -0.5, is_causal=causal)
    assert calls == [] and torch.equal(out, ref)
    if case == "grad":
        out.float().sum().backward()
        assert q.grad is not None and q.grad.abs().sum() > 0


def test_scorer_selects_it_through_the_models_switch_and_matches_fp32(monkeypatch, rgb_images):
    fp32 = NearIDScorer(tiny_nearid_model(1), TINY_PREPROCESS, device="cpu", dtype=torch.float32)
    bf16 = NearIDScorer(tiny_nearid_model(1), TINY_PREPROCESS, device="cpu", dtype=torch.bfloat16)
    assert bf16.model.backbone.config._attn_implementation == CPU_BMM_ATTENTION
    calls = _count_bmm(monkeypatch)
    with torch.no_grad():
        got, want = bf16.embed(rgb_images), fp32.embed(rgb_images)
    assert len(calls) > 0  # the bf16 trunk went through the batched-matmul path
    assert F.cosine_similarity(got, want).min() > 0.999


def test_an_explicit_attention_choice_is_kept():
    model = tiny_nearid_model(1)
    model.set_attn_implementation("eager")
    scorer = NearIDScorer(model, TINY_PREPROCESS, device="cpu", dtype=torch.bfloat16)
    assert scorer.model.config._attn_implementation == "eager"


def test_exports_do_not_name_the_implementation(tmp_path):
    scorer = NearIDScorer(tiny_nearid_model(1), TINY_PREPROCESS, device="cpu", dtype=torch.bfloat16)
    nearid_core.save_release(scorer.model, tmp_path, preprocessor_config=TINY_PREPROCESS.to_dict())
    assert CPU_BMM_ATTENTION not in (tmp_path / "config.json").read_text()
    json.loads((tmp_path / "config.json").read_text())  # still plain JSON the paper's loader reads
