"""Tests for nearid_core.configuration_nearid / modeling_nearid: the config, the model's outputs and its head."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VISION, tiny_nearid_model, tiny_vision_model
from transformers import AutoConfig, AutoModel, SiglipVisionConfig, SiglipVisionModel
from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

import nearid_core
from nearid_core import NearIDConfig, NearIDModel, NearIDModelOutput
from nearid_core.modeling_nearid import HEAD_PARAMETER_NAMES

HEAD_KEYS = {
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
}


@pytest.fixture(scope="module")
def model() -> NearIDModel:
    return tiny_nearid_model(1)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.rand(3, 3, 56, 56, generator=g) * 2 - 1


def _plain_siglip_with(model: NearIDModel) -> SiglipVisionModel:
    plain = SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)).eval()
    plain.load_state_dict(model.backbone.state_dict())
    return plain


# ----------------------------------------------------------------------------------------------------------------------
# Config


def test_config_defaults_reproduce_release_vision_config():
    config = NearIDConfig()
    v = config.vision_config
    assert isinstance(v, SiglipVisionConfig)
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (1152, 4304, 27, 16)
    assert (v.image_size, v.patch_size, v.num_channels) == (384, 14, 3)
    assert v.hidden_act == "gelu_pytorch_tanh"
    assert v.layer_norm_eps == 1e-6
    assert v.attention_dropout == 0.0
    assert v.vision_use_head is True
    assert config.embed_dim == 1152
    assert config.normalize_embeddings is True
    assert config.backbone_name_or_path == "google/siglip2-so400m-patch14-384"
    assert config.model_type == "nearid" == NearIDConfig.model_type


def test_registered_with_auto_classes(tmp_path):
    assert nearid_core.NearIDConfig is NearIDConfig
    config = AutoConfig.for_model("nearid", vision_config=TINY_VISION)
    assert isinstance(config, NearIDConfig)
    assert config.vision_config.hidden_size == 32
    model = AutoModel.from_config(config)
    assert isinstance(model, NearIDModel)


def test_bad_embed_dim_raises_naming_field():
    with pytest.raises(ValueError, match="embed_dim"):
        NearIDConfig(vision_config=TINY_VISION, embed_dim=64)
    # a matching embed_dim is accepted
    assert NearIDConfig(vision_config=TINY_VISION, embed_dim=32).embed_dim == 32


def test_no_head_raises_naming_field():
    with pytest.raises(ValueError, match="vision_use_head"):
        NearIDConfig(vision_config=dict(TINY_VISION, vision_use_head=False))


def test_bad_vision_config_type_raises():
    with pytest.raises(ValueError, match="vision_config"):
        NearIDConfig(vision_config=42)


def test_config_dict_ignores_model_type_and_accepts_config_object():
    a = NearIDConfig(vision_config=dict(TINY_VISION, model_type="siglip_vision_model"))
    b = NearIDConfig(vision_config=SiglipVisionConfig(**TINY_VISION))
    assert a.vision_config.to_dict() == b.vision_config.to_dict()
    assert a.embed_dim == b.embed_dim == 32


def test_config_save_load_round_trip(tmp_path):
    config = NearIDConfig(vision_config=TINY_VISION, normalize_embeddings=False, backbone_name_or_path="some/trunk")
    config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "nearid"
    assert raw["vision_config"]["hidden_size"] == 32
    for loader in (NearIDConfig.from_pretrained, AutoConfig.from_pretrained):
        loaded = loader(tmp_path)
        assert isinstance(loaded, NearIDConfig)
        assert loaded.normalize_embeddings is False
        assert loaded.backbone_name_or_path == "some/trunk"
        assert loaded.embed_dim == 32
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                    "patch_size", "hidden_act", "layer_norm_eps"):
            assert getattr(loaded.vision_config, key) == getattr(config.vision_config, key), key


# ----------------------------------------------------------------------------------------------------------------------
# Forward / features


def test_forward_output_fields(model, pixels):
    with torch.no_grad():
        out = model(pixels)
        plain = _plain_siglip_with(model)(pixels)
    assert isinstance(out, NearIDModelOutput)
    assert out.image_embeds.shape == (3, 32)
    assert out.pooler_output.shape == (3, 32)
    assert out.last_hidden_state.shape == (3, 16, 32)  # 56/14 = 4 -> 4x4 patches, no CLS token
    assert out.hidden_states is None and out.attentions is None
    torch.testing.assert_close(out.pooler_output, plain.pooler_output, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.last_hidden_state, plain.last_hidden_state, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.image_embeds, F.normalize(out.pooler_output, dim=-1))
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    # the head changes the embedding: the pooler is not a trivial function of the tokens' mean
    assert not torch.allclose(out.pooler_output, out.last_hidden_state.mean(1), atol=1e-3)


def test_forward_hidden_states_and_attentions(pixels):
    # transformers 5 SDPA attention returns no weights (attentions == ()); per-layer maps need eager attention.
    model = tiny_nearid_model(1)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == TINY_VISION["num_hidden_layers"] + 1
    assert out.hidden_states[0].shape == (3, 16, 32)
    assert len(out.attentions) == TINY_VISION["num_hidden_layers"]
    assert out.attentions[0].shape == (3, 4, 16, 16)


def test_forward_tuple_form(model, pixels):
    with torch.no_grad():
        out = model(pixels)
        tup = model(pixels, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 3
    torch.testing.assert_close(tup[0], out.image_embeds)
    torch.testing.assert_close(tup[1], out.last_hidden_state)
    torch.testing.assert_close(tup[2], out.pooler_output)


def test_normalize_embeddings_false_returns_raw_pooler(pixels):
    model = tiny_nearid_model(1)
    model.config.normalize_embeddings = False
    with torch.no_grad():
        out = model(pixels)
    torch.testing.assert_close(out.image_embeds, out.pooler_output)
    assert not torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(3), atol=1e-3)


def test_get_image_features(model, pixels):
    with torch.no_grad():
        pooled = model(pixels).pooler_output
        feats = model.get_image_features(pixels)
        raw = model.get_image_features(pixels, normalize=False)
    assert feats.shape == (3, 32)
    torch.testing.assert_close(feats, F.normalize(pooled, dim=-1))
    torch.testing.assert_close(raw, pooled)


def test_encode_tokens_and_pool_equal_forward(model, pixels):
    with torch.no_grad():
        out = model(pixels)
        tokens = model.encode_tokens(pixels)
        pooled, attn = model.pool(tokens)
        pooled2, attn2 = model.pool(tokens, output_attentions=True)
    assert attn is None
    torch.testing.assert_close(tokens, out.last_hidden_state, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pooled, out.pooler_output, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pooled2, out.pooler_output, atol=1e-6, rtol=1e-5)
    assert attn2.shape == (3, 16)
    assert (attn2 >= 0).all()
    torch.testing.assert_close(attn2.sum(-1), torch.ones(3))
    # the weights are the probe's softmax over patches: not uniform for a random head
    assert attn2.std(-1).min() > 1e-4


def test_pool_attention_matches_manual_softmax(model, pixels):
    """The [B, N] map is the probe's attention (softmax(q k^T / sqrt(d))) averaged over the heads."""
    head = model.head
    with torch.no_grad():
        tokens = model.encode_tokens(pixels)
        _, attn = model.pool(tokens, output_attentions=True)
        d, h = 32, 4
        w, b = head.attention.in_proj_weight, head.attention.in_proj_bias
        q = head.probe @ w[:d].T + b[:d]  # [1, 1, d]
        k = tokens @ w[d : 2 * d].T + b[d : 2 * d]  # [B, N, d]
        q = q.view(1, 1, h, d // h).transpose(1, 2)  # [1, h, 1, dh]
        k = k.view(3, 16, h, d // h).transpose(1, 2)  # [B, h, N, dh]
        manual = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, dim=-1)[:, :, 0].mean(1)
    torch.testing.assert_close(attn, manual, atol=1e-6, rtol=1e-5)


def test_batch_of_one_equals_row_of_batch(model, pixels):
    with torch.no_grad():
        batch = model.get_image_features(pixels)
        for i in range(3):
            single = model.get_image_features(pixels[i : i + 1])
            torch.testing.assert_close(single[0], batch[i], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Head


def test_head_state_dict_keys(model):
    head = model.head_state_dict()
    assert set(head) == HEAD_KEYS
    assert set(HEAD_PARAMETER_NAMES) == HEAD_KEYS
    assert head["probe"].shape == (1, 1, 32)
    assert head["attention.in_proj_weight"].shape == (96, 32)
    assert head["mlp.fc1.weight"].shape == (64, 32)
    tower = getattr(model.backbone, "vision_model", model.backbone)
    assert model.head is tower.head


def test_freeze_backbone_trainable_set_and_gradients(pixels):
    """Contract: after freeze_backbone exactly the 11 head tensors train, and backward reaches exactly those."""
    model = tiny_nearid_model(1)
    model.freeze_backbone()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 11
    head_ids = {id(p) for p in model.head.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == head_ids
    assert {n.split("head.", 1)[1] for n in trainable} == HEAD_KEYS

    model.zero_grad(set_to_none=True)
    loss = model(pixels).image_embeds.sum() + model(pixels).pooler_output.pow(2).sum()
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def test_head_parameter_count_real_size():
    """15,238,352 trainable parameters for the so400m head (reference §1.2), counted without the 400M trunk."""
    vision = NearIDConfig().vision_config
    with torch.device("meta"):
        head = SiglipMultiheadAttentionPoolingHead(vision)
    counts = {n: p.numel() for n, p in head.named_parameters()}
    assert set(counts) == HEAD_KEYS
    assert sum(counts.values()) == 15_238_352
    assert counts["probe"] == 1_152
    assert counts["attention.in_proj_weight"] + counts["attention.in_proj_bias"] == 3_984_768
    assert counts["attention.out_proj.weight"] + counts["attention.out_proj.bias"] == 1_328_256
    assert counts["layernorm.weight"] + counts["layernorm.bias"] == 2_304
    assert counts["mlp.fc1.weight"] + counts["mlp.fc1.bias"] == 4_962_512
    assert counts["mlp.fc2.weight"] + counts["mlp.fc2.bias"] == 4_959_360
    # the same formula from the config alone
    d, m = vision.hidden_size, vision.intermediate_size
    assert d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * m + m) + (m * d + d) == 15_238_352


def test_tiny_head_parameter_count(model):
    d, m = 32, 64
    expected = d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * m + m) + (m * d + d)
    assert sum(p.numel() for p in model.head.parameters()) == expected


# ----------------------------------------------------------------------------------------------------------------------
# Loading the release layout through transformers' AutoModel


def test_automodel_loads_release_layout(release_dir, pixels):
    """The fp16 release directory (4.x keys backbone.vision_model.*) loads with AutoModel, no trust_remote_code."""
    loaded = AutoModel.from_pretrained(release_dir, dtype=torch.float32).eval()
    assert isinstance(loaded, NearIDModel)
    assert next(loaded.parameters()).dtype == torch.float32
    reference = tiny_nearid_model(1)
    # every tensor came from the file (fp16-rounded copies of the reference weights, nothing re-initialised)
    ref_sd = reference.state_dict()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, ref_sd[name].half().float(), atol=0, rtol=0, msg=name)
    plain = _plain_siglip_with(reference)
    with torch.no_grad():
        got = loaded(pixels)
        want = plain(pixels)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(got.image_embeds, F.normalize(want.pooler_output, dim=-1), atol=2e-3, rtol=2e-3)
    assert F.cosine_similarity(got.pooler_output, want.pooler_output).min() > 0.9999


def test_automodel_release_default_dtype_is_loadable(release_dir, pixels):
    loaded = AutoModel.from_pretrained(release_dir).eval()
    assert isinstance(loaded, NearIDModel)
    assert loaded.config.model_type == "nearid"
    plain = _plain_siglip_with(tiny_nearid_model(1))
    with torch.no_grad():
        got = loaded.float().get_image_features(pixels)
        want = F.normalize(plain(pixels).pooler_output, dim=-1)
    assert F.cosine_similarity(got, want).min() > 0.9999


def test_save_pretrained_round_trip(tmp_path, model, pixels):
    model.save_pretrained(tmp_path)
    loaded = NearIDModel.from_pretrained(tmp_path).eval()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded.get_image_features(pixels), model.get_image_features(pixels))


def test_trunk_equals_seed_zero_siglip(model):
    """Sanity for the fixtures used everywhere: the trunk is tiny_vision_model(0), the head differs from it."""
    base = tiny_vision_model(0).state_dict()
    own = model.backbone.state_dict()
    for k, v in base.items():
        if k.startswith("head.") or ".head." in k:
            assert not torch.equal(own[k], v), k
        else:
            assert torch.equal(own[k], v), k
