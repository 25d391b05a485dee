"""Tests for nearid_core.checkpoint: every weight layout loads to the expected model; errors are specific."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_PREPROCESS, TINY_VISION, tiny_nearid_model, tiny_vision_model, write_preprocessor
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import SiglipVisionConfig, SiglipVisionModel

import nearid_core
from nearid_core import (
    CheckpointError,
    CheckpointNotFoundError,
    NearIDConfig,
    NearIDModel,
    NearIDScorer,
    load_model,
    save_head_only,
    save_release,
)
from nearid_core.checkpoint import HEAD_WEIGHTS_NAME, _nearid_config_from, vision_key

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
N_TINY_TENSORS = 3 + 2 * 16 + 2 + 11  # embeddings, 2 layers x 16, post_layernorm, head


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.rand(2, 3, 56, 56, generator=g) * 2 - 1


def plain_pooler(state_dict: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """Plain transformers computation: a SiglipVisionModel with these (5.x-named) weights -> L2-normalised pooler."""
    plain = SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)).eval()
    plain.load_state_dict({k: v.float() for k, v in state_dict.items()})
    with torch.no_grad():
        return F.normalize(plain(pixels).pooler_output, dim=-1)


def embeddings(model: NearIDModel, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.get_image_features(pixels.to(next(model.parameters()).dtype)).float()


def nearid_state() -> dict[str, torch.Tensor]:
    return tiny_nearid_model(1).backbone.state_dict()


def assert_frozen_eval(model: NearIDModel) -> None:
    assert isinstance(model, NearIDModel)
    assert not model.training
    assert all(not m.training for m in model.modules())
    assert all(not p.requires_grad for p in model.parameters())


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------------------------------
# Layouts


def test_load_release_dir(release_dir, pixels):
    model, config_dir = load_model(release_dir)
    assert_frozen_eval(model)
    assert config_dir == release_dir
    assert model.config.model_type == "nearid"
    assert next(model.parameters()).dtype == torch.float32  # fp16 file, default dtype: fp32 parameters
    fp16_state = {k: v.half() for k, v in nearid_state().items()}
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, fp16_state[k].float()), k
    torch.testing.assert_close(embeddings(model, pixels), plain_pooler(fp16_state, pixels), atol=1e-6, rtol=1e-5)
    # and it is the NearID head, not the trunk's own head
    assert not torch.allclose(embeddings(model, pixels), plain_pooler(tiny_vision_model(0).state_dict(), pixels),
                              atol=1e-2)


def test_release_file_uses_4x_keys(release_dir):
    with safe_open(str(release_dir / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("backbone.vision_model.") for k in keys)


def test_load_5x_key_nearid_dir(tmp_path, pixels):
    reference = tiny_nearid_model(1)
    reference.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("backbone.") and not k.startswith("backbone.vision_model.") for k in keys)
    model, config_dir = load_model(tmp_path)
    assert_frozen_eval(model)
    assert config_dir == tmp_path
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    torch.testing.assert_close(embeddings(model, pixels), plain_pooler(reference.backbone.state_dict(), pixels))


def test_load_sharded_nearid_dir(tmp_path, pixels):
    reference = tiny_nearid_model(1)
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model, _ = load_model(tmp_path)
    torch.testing.assert_close(embeddings(model, pixels), plain_pooler(reference.backbone.state_dict(), pixels))


@pytest.mark.parametrize("layout", ["siglip_vision_dir", "siglip_full_dir"])
def test_load_plain_siglip(layout, request, pixels):
    directory = request.getfixturevalue(layout)
    model, config_dir = load_model(directory)
    assert_frozen_eval(model)
    assert config_dir == directory
    assert model.config.model_type == "nearid"
    assert model.config.backbone_name_or_path == str(directory)
    assert model.config.vision_config.hidden_size == 32 and model.config.vision_config.image_size == 56
    base = tiny_vision_model(0).state_dict()
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, base[k]), k  # head = the checkpoint's own MAP head; text tower ignored
    torch.testing.assert_close(embeddings(model, pixels), plain_pooler(base, pixels))


def test_full_siglip_text_tower_ignored(siglip_full_dir):
    with safe_open(str(siglip_full_dir / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("text_model.") for k in keys)
    assert "logit_scale" in keys
    model, _ = load_model(siglip_full_dir)
    assert len(model.state_dict()) == N_TINY_TENSORS


def test_load_head_only_file(head_only_file, siglip_vision_dir, pixels):
    model, config_dir = load_model(head_only_file)
    assert_frozen_eval(model)
    assert config_dir == siglip_vision_dir  # preprocessing comes from the trunk's directory
    reference = tiny_nearid_model(1)
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    torch.testing.assert_close(embeddings(model, pixels), plain_pooler(reference.backbone.state_dict(), pixels))


def test_load_dir_with_head_file_only(tmp_path, head_only_file, siglip_vision_dir, pixels):
    shutil.copy(head_only_file, tmp_path / HEAD_WEIGHTS_NAME)
    model, config_dir = load_model(tmp_path)
    assert_frozen_eval(model)
    assert config_dir == siglip_vision_dir
    torch.testing.assert_close(embeddings(model, pixels), plain_pooler(nearid_state(), pixels))


def _write_training_checkpoint(directory: Path, *, vision_config: dict | None = TINY_VISION) -> None:
    """The reference training layout: trunk (with its original head), an extra post_ln and the trained head."""
    directory.mkdir(parents=True, exist_ok=True)
    trunk = tiny_vision_model(0).state_dict()  # 5.x names: embeddings./encoder./post_layernorm./head.
    trained_head = tiny_nearid_model(1).head_state_dict()
    tensors = {f"encoder_wrapper.model.vision_model.{k}": v.half() for k, v in trunk.items()}
    tensors["encoder_wrapper.post_ln.weight"] = torch.full((32,), 3.0)
    tensors["encoder_wrapper.post_ln.bias"] = torch.full((32,), -1.0)
    tensors.update({f"head.map_pooler.{k}": v.clone() for k, v in trained_head.items()})
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "model_type": "nearid",
        "backbone": "siglip2",
        "pretrained_backbone": "google/siglip2-so400m-patch14-384",
        "pooling": "none",
        "head_type": "map",
        "layer_idx": -1,
        "head_hidden_dim": 1024,
        "head_out_dim": 1152,
        "head_layers": 2,
        "head_dropout": 0.0,
        "use_batchnorm": True,
        "use_layernorm": False,
    }
    if vision_config is not None:
        config["vision_config"] = dict(vision_config)
    (directory / "config.json").write_text(json.dumps(config))
    write_preprocessor(directory)


def test_load_reference_training_layout(tmp_path, pixels):
    _write_training_checkpoint(tmp_path)
    model, _ = load_model(tmp_path)
    assert_frozen_eval(model)
    trunk = tiny_vision_model(0).state_dict()
    trained_head = tiny_nearid_model(1).head_state_dict()
    own = model.backbone.state_dict()
    for k, v in own.items():
        if k.startswith("head."):
            assert torch.equal(v, trained_head[k[len("head."):]]), k  # head.map_pooler.* used, fp32 kept
        else:
            assert torch.equal(v, trunk[k].half().float()), k
    expected = {k: (trunk[k].half() if not k.startswith("head.") else trained_head[k[5:]]) for k in own}
    torch.testing.assert_close(embeddings(model, pixels), plain_pooler(expected, pixels))
    # the original (untrained) head was dropped: the result differs from the plain SigLIP embedding
    assert not torch.allclose(embeddings(model, pixels), plain_pooler(trunk, pixels), atol=1e-2)


def test_training_config_without_vision_config_means_so400m(tmp_path):
    """The reference training config.json carries no vision_config: it is the so400m tower (checked, not built)."""
    _write_training_checkpoint(tmp_path, vision_config=None)
    config = _nearid_config_from(json.loads((tmp_path / "config.json").read_text()), str(tmp_path))
    v = config.vision_config
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (1152, 4304, 27, 16)
    assert (v.image_size, v.patch_size) == (384, 14)


# ----------------------------------------------------------------------------------------------------------------------
# Key mapping


@pytest.mark.parametrize(
    "key, expected",
    [
        ("encoder_wrapper.model.vision_model.head.probe", None),
        ("encoder_wrapper.model.vision_model.head.mlp.fc1.weight", None),
        ("encoder_wrapper.model.vision_model.encoder.layers.3.mlp.fc1.weight", "encoder.layers.3.mlp.fc1.weight"),
        ("encoder_wrapper.model.vision_model.embeddings.patch_embedding.weight", "embeddings.patch_embedding.weight"),
        ("encoder_wrapper.post_ln.weight", None),
        ("encoder_wrapper.post_ln.bias", None),
        ("head.map_pooler.probe", "head.probe"),
        ("head.map_pooler.attention.in_proj_weight", "head.attention.in_proj_weight"),
        ("backbone.vision_model.post_layernorm.bias", "post_layernorm.bias"),
        ("backbone.vision_model.head.layernorm.weight", "head.layernorm.weight"),
        ("backbone.encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.0.self_attn.q_proj.weight"),
        ("backbone.head.probe", "head.probe"),
        ("vision_model.embeddings.position_embedding.weight", "embeddings.position_embedding.weight"),
        ("vision_model.head.mlp.fc2.bias", "head.mlp.fc2.bias"),
        ("text_model.embeddings.token_embedding.weight", None),
        ("text_model.head.weight", None),
        ("logit_scale", None),
        ("logit_bias", None),
        ("embeddings.patch_embedding.bias", "embeddings.patch_embedding.bias"),
        ("encoder.layers.1.layer_norm2.weight", "encoder.layers.1.layer_norm2.weight"),
        ("post_layernorm.weight", "post_layernorm.weight"),
        ("head.attention.out_proj.bias", "head.attention.out_proj.bias"),
        ("probe", "head.probe"),
        ("attention.in_proj_bias", "head.attention.in_proj_bias"),
        ("layernorm.bias", "head.layernorm.bias"),
        ("mlp.fc1.weight", "head.mlp.fc1.weight"),
        ("something.else", "something.else"),  # unknown: kept, then reported as unexpected
    ],
)
def test_vision_key(key, expected):
    assert vision_key(key) == expected


def test_unknown_tensor_is_reported(tmp_path, siglip_vision_dir):
    d = copy_dir(siglip_vision_dir, tmp_path / "ckpt")
    tensors = load_file(str(d / "model.safetensors"))
    tensors["something.else"] = torch.zeros(3)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected.*something\.else"):
        load_model(d)


# ----------------------------------------------------------------------------------------------------------------------
# Saving


def test_head_only_round_trip(tmp_path, siglip_vision_dir, pixels):
    reference = tiny_nearid_model(5, backbone=str(siglip_vision_dir))
    path = save_head_only(reference, tmp_path / "mine.safetensors")
    assert path == tmp_path / "mine.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        assert all(f.get_tensor(k).dtype == torch.float32 for k in keys)
    assert keys == HEAD_KEYS
    assert meta["format"] == "nearid-head"
    assert json.loads(meta["config"])["backbone_name_or_path"] == str(siglip_vision_dir)
    assert path.stat().st_size < 40_000  # 11 small tensors, no trunk

    model, config_dir = load_model(path)
    assert config_dir == siglip_vision_dir
    for k, v in reference.head_state_dict().items():
        assert torch.equal(model.head_state_dict()[k], v), k
    trunk = tiny_vision_model(0).state_dict()
    for k, v in model.backbone.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, trunk[k]), k
    torch.testing.assert_close(embeddings(model, pixels), plain_pooler(reference.backbone.state_dict(), pixels))


def test_head_only_to_directory_and_normalize_flag(tmp_path, siglip_vision_dir, pixels):
    reference = tiny_nearid_model(5, backbone=str(siglip_vision_dir))
    reference.config.normalize_embeddings = False
    path = save_head_only(reference, tmp_path / "out")
    assert path == tmp_path / "out" / HEAD_WEIGHTS_NAME
    model, _ = load_model(tmp_path / "out")
    assert model.config.normalize_embeddings is False
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).image_embeds, reference(pixels).pooler_output)


def test_head_only_fp16_storage(tmp_path, siglip_vision_dir):
    reference = tiny_nearid_model(5, backbone=str(siglip_vision_dir))
    path = save_head_only(reference, tmp_path / "h.safetensors", dtype=torch.float16)
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == HEAD_KEYS
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    model, _ = load_model(path)
    assert next(model.parameters()).dtype == torch.float32
    for k, v in reference.head_state_dict().items():
        assert torch.equal(model.head_state_dict()[k], v.half().float()), k


def test_head_only_requires_backbone_name(tmp_path):
    with pytest.raises(ValueError, match="backbone_name_or_path"):
        save_head_only(tiny_nearid_model(1, backbone=None), tmp_path / "h.safetensors")


def test_save_release_layout(tmp_path, siglip_vision_dir, pixels):
    reference = tiny_nearid_model(3, backbone=str(siglip_vision_dir))
    out = save_release(reference, tmp_path / "rel", preprocessor_config=TINY_PREPROCESS.to_dict())
    assert out == tmp_path / "rel"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys}
    assert dtypes == {torch.float16}
    assert len(keys) == N_TINY_TENSORS
    assert all(k.startswith("backbone.vision_model.") for k in keys)
    assert {k[len("backbone.vision_model.head."):] for k in keys if ".head." in k} == HEAD_KEYS
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nearid"
    assert config["architectures"] == ["NearIDModel"]
    assert config["embed_dim"] == 32
    assert config["normalize_embeddings"] is True
    assert config["vision_config"]["hidden_size"] == 32
    assert json.loads((out / "preprocessor_config.json").read_text()) == TINY_PREPROCESS.to_dict()
    model, _ = load_model(out)
    fp16_state = {k: v.half() for k, v in reference.backbone.state_dict().items()}
    torch.testing.assert_close(embeddings(model, pixels), plain_pooler(fp16_state, pixels))


def test_save_release_fp32_option(tmp_path):
    save_release(tiny_nearid_model(1, backbone="x/y"), tmp_path, dtype=torch.float32)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert {v.dtype for v in tensors.values()} == {torch.float32}
    assert not (tmp_path / "preprocessor_config.json").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Errors


def test_nonexistent_local_path(tmp_path):
    missing = tmp_path / "does" / "not" / "exist"
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_model(missing)
    with pytest.raises(FileNotFoundError):  # CheckpointNotFoundError is a FileNotFoundError
        load_model("./no_such_dir_here")


def test_hub_id_offline_names_id_cache_and_local_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable at import time; patch the constant too so the test never touches the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hf-cache"
    with pytest.raises(CheckpointNotFoundError) as info:
        load_model("nobody-here/no-such-model", cache_dir=cache)
    message = str(info.value)
    assert "nobody-here/no-such-model" in message
    assert str(cache) in message
    assert "local" in message.lower() and "directory" in message.lower()


def test_hub_id_default_cache_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "default-cache"))
    with pytest.raises(CheckpointNotFoundError) as info:
        load_model("nobody-here/no-such-model", local_files_only=True)
    assert str(tmp_path / "default-cache") in str(info.value)


def test_truncated_weights(tmp_path, siglip_vision_dir):
    d = copy_dir(siglip_vision_dir, tmp_path / "ckpt")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_model(d)
    message = str(info.value)
    assert "truncated" in message or "corrupt" in message
    assert str(f) in message


def test_missing_tensor_is_named(tmp_path, siglip_vision_dir):
    d = copy_dir(siglip_vision_dir, tmp_path / "ckpt")
    tensors = load_file(str(d / "model.safetensors"))
    removed = "encoder.layers.1.mlp.fc2.weight"
    del tensors[removed]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing") as info:
        load_model(d)
    assert removed in str(info.value)


def test_missing_head_tensor_in_release_is_named(tmp_path, release_dir):
    d = copy_dir(release_dir, tmp_path / "rel")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["backbone.vision_model.head.probe"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"head\.probe"):
        load_model(d)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path, siglip_vision_dir):
    d = copy_dir(siglip_vision_dir, tmp_path / "ckpt")
    tensors = load_file(str(d / "model.safetensors"))
    tensors["encoder.layers.0.mlp.fc1.weight"] = torch.zeros(65, 32)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_model(d)
    message = str(info.value)
    assert "encoder.layers.0.mlp.fc1.weight" in message
    assert "(65, 32)" in message and "(64, 32)" in message


def test_head_only_shape_mismatch(tmp_path, siglip_vision_dir):
    head = tiny_nearid_model(1, backbone=str(siglip_vision_dir))
    path = save_head_only(head, tmp_path / "h.safetensors")
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors["mlp.fc1.weight"] = torch.zeros(48, 32)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=r"head\.mlp\.fc1\.weight.*\(48, 32\).*\(64, 32\)"):
        load_model(path)


def test_head_only_width_mismatch(tmp_path, siglip_vision_dir):
    wide = NearIDModel(NearIDConfig(vision_config=dict(TINY_VISION, hidden_size=64, intermediate_size=64),
                                    backbone_name_or_path=str(siglip_vision_dir)))
    path = save_head_only(wide, tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError, match=r"head width 64.*hidden_size 32"):
        load_model(path)


def test_head_only_file_without_metadata(tmp_path):
    f = tmp_path / "bare.safetensors"
    save_file(dict(tiny_nearid_model(1).head_state_dict()), str(f))
    with pytest.raises(CheckpointError, match="not a NearID head-only checkpoint"):
        load_model(f)


def test_pickle_only_directory_is_refused(tmp_path, siglip_vision_dir):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(siglip_vision_dir / "config.json", d / "config.json")
    # not a valid pickle: if the loader tried to unpickle it the error would differ
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    with pytest.raises(CheckpointError) as info:
        load_model(d)
    message = str(info.value)
    assert "pickle" in message
    assert "pytorch_model.bin" in message
    assert "safetensors" in message


@pytest.mark.parametrize("model_type", ["clip_vision_model", "siglip2"])
def test_unknown_model_type_is_named(tmp_path, siglip_vision_dir, model_type):
    d = copy_dir(siglip_vision_dir, tmp_path / "ckpt")
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = model_type
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=repr(model_type)):
        load_model(d)


def test_missing_config(tmp_path, siglip_vision_dir):
    d = copy_dir(siglip_vision_dir, tmp_path / "ckpt")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(d)


def test_siglip_without_head_is_refused(tmp_path, siglip_vision_dir):
    d = copy_dir(siglip_vision_dir, tmp_path / "ckpt")
    config = json.loads((d / "config.json").read_text())
    config["vision_use_head"] = False
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="vision_use_head"):
        load_model(d)


def test_plain_safetensors_file_is_not_a_head_checkpoint(tmp_path, siglip_vision_dir):
    with pytest.raises(CheckpointError, match="head-only"):
        load_model(siglip_vision_dir / "model.safetensors")


def test_non_safetensors_single_file_refused(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(f)


# ----------------------------------------------------------------------------------------------------------------------
# dtype / state


@pytest.mark.parametrize("layout", ["release_dir", "siglip_full_dir", "head_only_file"])
def test_bf16_loading(layout, request, pixels):
    model, _ = load_model(request.getfixturevalue(layout), dtype=torch.bfloat16)
    assert_frozen_eval(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref, _ = load_model(request.getfixturevalue(layout))
    cos = F.cosine_similarity(embeddings(model, pixels), embeddings(ref, pixels))
    assert cos.min() > 0.98
    assert torch.get_default_dtype() == torch.float32  # the build does not leak its default dtype


def test_fp16_loading(release_dir):
    model, _ = load_model(release_dir, dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_public_api_exports():
    for name in ("load_model", "save_head_only", "save_release", "CheckpointError", "CheckpointNotFoundError"):
        assert hasattr(nearid_core, name)
    assert issubclass(CheckpointError, ValueError)
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)


def test_save_head_only_creates_missing_parent_directory(tmp_path, siglip_vision_dir):
    target = tmp_path / "new" / "dir" / "head.safetensors"
    written = nearid_core.save_head_only(tiny_nearid_model(1, backbone=str(siglip_vision_dir)), target)
    assert written == target and target.exists()


# ----------------------------------------------------------------------------------------------------------------------
# Broken checkpoints: CheckpointError naming the file, never a raw exception


def _copy_release(release_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "release"
    shutil.copytree(release_dir, target)
    return target


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"size": {"height": "big", "width": 56}}', "preprocessor"),
    ('{"size": {"shortest_edge": 56}}', "preprocessor"),
    ('{"image_std": [0.5, 0.0, 0.5]}', "std"),
    ('{"resample": 7}', "resample"),
])
def test_bad_preprocessor_config_names_the_file(release_dir, tmp_path, content, match):
    d = _copy_release(release_dir, tmp_path)
    (d / "preprocessor_config.json").write_text(content)
    with pytest.raises(CheckpointError, match=rf"preprocessor_config\.json.*{match}|{match}.*preprocessor_config\.json"):
        NearIDScorer.from_pretrained(d, device="cpu")


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(embed_dim=c["vision_config"]["hidden_size"] + 1), "embed_dim"),
    (lambda c: c["vision_config"].update(hidden_size="wide"), "config"),
    (lambda c: c.update(vision_config=[1]), "config"),
])
def test_inconsistent_config_fields_name_config_json(release_dir, tmp_path, edit, match):
    d = _copy_release(release_dir, tmp_path)
    config = json.loads((d / "config.json").read_text())
    edit(config)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"config\.json.*{match}"):
        load_model(d)


def _head_naming(head_only_file: Path, path: Path, trunk: str) -> Path:
    with safe_open(str(head_only_file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    config = json.loads(metadata["config"])
    config["backbone_name_or_path"] = trunk
    save_file(tensors, str(path), metadata={**metadata, "config": json.dumps(config)})
    return path


def test_head_only_file_naming_itself_is_an_error_naming_the_chain(head_only_file, tmp_path):
    """Regression: a head-only file naming itself as its trunk recursed until RecursionError (2983 lines)."""
    me = tmp_path / "self.safetensors"
    _head_naming(head_only_file, me, str(me))
    with pytest.raises(CheckpointError, match=r"loops back on itself: .*self\.safetensors -> .*self\.safetensors"):
        load_model(me)


def test_head_only_cycle_of_two_is_an_error_naming_the_chain(head_only_file, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _head_naming(head_only_file, a, str(b))
    _head_naming(head_only_file, b, str(a))
    with pytest.raises(CheckpointError, match=r"a\.safetensors -> .*b\.safetensors -> .*a\.safetensors"):
        load_model(a)


def test_missing_relative_path_says_it_was_read_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError, match=r"No local path .*models/nearid exists either.*hub id"):
        load_model("models/nearid", local_files_only=True)
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_model("../models/nearid")


# ----------------------------------------------------------------------------------------------------------------------
# allowed_roots: every local path followed stays in the allowed folders


def test_allowed_roots_refuse_a_trunk_outside_without_telling_the_path(head_only_file, siglip_vision_dir, tmp_path):
    root = tmp_path / "models"
    (root / "heads").mkdir(parents=True)
    head = _head_naming(head_only_file, root / "heads" / "h.safetensors", str(siglip_vision_dir))
    missing = _head_naming(head_only_file, root / "gone.safetensors", "/etc/passwd_dir")
    for file, shown in ((head, "heads/h.safetensors"), (missing, "gone.safetensors")):
        with pytest.raises(CheckpointError, match=rf"trunk named by {shown} .*outside the allowed") as err:
            load_model(file, allowed_roots=[root])
        assert str(siglip_vision_dir) not in str(err.value) and "passwd" not in str(err.value)
    model, config_dir = load_model(head)  # no roots: loads from anywhere, as before
    assert config_dir == siglip_vision_dir
    shutil.copytree(siglip_vision_dir, root / "trunk")
    _head_naming(head_only_file, head, str(root / "trunk"))
    assert load_model(head, allowed_roots=[root])[1] == root / "trunk"


def test_allowed_roots_refuse_the_checkpoint_itself_and_symlinks_out(siglip_vision_dir, tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    (root / "link").symlink_to(siglip_vision_dir, target_is_directory=True)
    for path in (siglip_vision_dir, root / "link", tmp_path / "nowhere"):
        with pytest.raises(CheckpointError, match="outside the allowed model folders"):
            load_model(path, allowed_roots=[root])


def test_allowed_roots_still_allow_hub_ids(head_only_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path / "models"
    root.mkdir()
    head = _head_naming(head_only_file, root / "h.safetensors", "someone/some-trunk")
    with pytest.raises(CheckpointNotFoundError, match="someone/some-trunk"):  # tried on the hub, not refused
        load_model(head, allowed_roots=[root], local_files_only=True, cache_dir=tmp_path / "cache")


def test_scorer_from_pretrained_forwards_allowed_roots(siglip_vision_dir, tmp_path):
    with pytest.raises(CheckpointError, match="outside the allowed"):
        NearIDScorer.from_pretrained(siglip_vision_dir, device="cpu", allowed_roots=[tmp_path])


# ----------------------------------------------------------------------------------------------------------------------
# Broken checkpoints found at load time, not later


@pytest.mark.parametrize("field, value", [("num_attention_heads", 3), ("hidden_size", -32)])
def test_config_the_model_cannot_be_built_from_names_config_json(release_dir, tmp_path, field, value):
    d = _copy_release(release_dir, tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["vision_config"][field] = value
    if field == "hidden_size":
        config["embed_dim"] = value  # consistent, so the failure comes from building the model
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(d)


@pytest.mark.parametrize("content, match", [
    ('{"image_mean": "abc"}', "image_mean"),
    ('{"image_std": [0.5, 0.5]}', "image_std"),
    ('{"image_mean": [0.5, NaN, 0.5]}', "mean"),
    ('{"size": {"height": 56.7, "width": 56}}', "whole numbers"),
    ('{"size": 56.5}', "size"),
])
def test_bad_preprocessor_values_are_refused_at_load(release_dir, tmp_path, content, match):
    d = _copy_release(release_dir, tmp_path)
    (d / "preprocessor_config.json").write_text(content)
    with pytest.raises(CheckpointError, match=rf"preprocessor_config\.json.*{match}"):
        NearIDScorer.from_pretrained(d, device="cpu")


def test_preprocessor_without_size_uses_the_models_image_size(release_dir, tmp_path):
    d = _copy_release(release_dir, tmp_path)
    (d / "preprocessor_config.json").write_text('{"resample": 2}')
    assert NearIDScorer.from_pretrained(d, device="cpu").preprocess_config.size == (56, 56)  # not 384


def test_preprocessor_config_that_is_a_directory(release_dir, tmp_path):
    d = _copy_release(release_dir, tmp_path)
    (d / "preprocessor_config.json").unlink()
    (d / "preprocessor_config.json").mkdir()
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json cannot be read"):
        NearIDScorer.from_pretrained(d, device="cpu")


def test_non_finite_weights_are_refused_naming_file_and_tensors(head_only_file, tmp_path):
    with safe_open(str(head_only_file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    tensors["probe"][0, 0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"nan\.safetensors holds NaN or infinite weights in 1 tensor\(s\): probe"):
        load_model(tmp_path / "nan.safetensors")


def test_relative_trunk_is_read_from_the_head_files_folder(head_only_file, siglip_vision_dir, tmp_path, monkeypatch):
    shutil.copytree(siglip_vision_dir, tmp_path / "ckpt" / "trunk")
    head = _head_naming(head_only_file, tmp_path / "ckpt" / "h.safetensors", "trunk")
    monkeypatch.chdir(siglip_vision_dir.parent)  # the current directory plays no part
    assert load_model(head)[1] == tmp_path / "ckpt" / "trunk"
    missing = _head_naming(head_only_file, tmp_path / "ckpt" / "m.safetensors", "../no-trunk")
    with pytest.raises(CheckpointError, match=r"m\.safetensors: its trunk '\.\./no-trunk'.*does not exist"):
        load_model(missing)
