"""`save_release` exports: a config the reference `NearIDConfig` / `NearIDModel` read, `auto_map` + our own two model
modules for `AutoModel.from_pretrained(dir, trust_remote_code=True)`, and our loader that never runs them."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_PREPROCESS, TINY_VISION, tiny_nearid_model
from safetensors.torch import load_file, save_file
from transformers import AutoModel, SiglipVisionConfig

import nearid_core
from nearid_core import NearIDModel, NearIDScorer, load_model, save_release

# What the reference reads (spec §1.4; Gorluxor/NearID nearid/configuration_nearid.py and modeling_nearid.py):
# `NearIDConfig(vision_config, embed_dim, normalize_embeddings)`, then `NearIDModel` builds
# `SiglipVisionModel(SiglipVisionConfig(**config.vision_config))` and reads `config.normalize_embeddings` in forward.
# A vision field missing from the dict would silently take SiglipVisionConfig's default there (hidden_size 768, ...).
REFERENCE_CONFIG_FIELDS = ("model_type", "architectures", "auto_map", "embed_dim", "normalize_embeddings",
                           "vision_config")
REFERENCE_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "image_size", "patch_size", "num_channels", "hidden_act", "layer_norm_eps",
                           "attention_dropout")
REFERENCE_AUTO_MAP = {"AutoConfig": "configuration_nearid.NearIDConfig", "AutoModel": "modeling_nearid.NearIDModel"}
CODE_FILES = ("configuration_nearid.py", "modeling_nearid.py")
# What the shipped modules may import: transformers' remote-code loader copies only files of the export itself.
ALLOWED_IMPORTS = {"__future__", "dataclasses", "typing", "torch", "transformers"}


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.rand(2, 3, 56, 56, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("export")
    return save_release(tiny_nearid_model(2, backbone="google/siglip2-so400m-patch14-384"), d,
                        preprocessor_config=TINY_PREPROCESS.to_dict())


def _embed(model: NearIDModel, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.float().get_image_features(pixels)


@pytest.mark.parametrize("normalize", [True, False])
def test_export_config_carries_every_field_the_reference_config_reads(tmp_path, normalize):
    model = tiny_nearid_model(2)
    model.config.normalize_embeddings = normalize
    config = json.loads((save_release(model, tmp_path) / "config.json").read_text())
    missing = [k for k in REFERENCE_CONFIG_FIELDS if k not in config]
    assert not missing, f"config.json lacks reference fields {missing}"
    assert config["model_type"] == "nearid"
    assert config["architectures"] == ["NearIDModel"]
    assert config["auto_map"] == REFERENCE_AUTO_MAP
    assert config["embed_dim"] == TINY_VISION["hidden_size"]
    assert config["normalize_embeddings"] is normalize
    assert config["torch_dtype"] == "float16"
    vision = config["vision_config"]
    assert isinstance(vision, dict)  # the reference unpacks it with ** (no sub-config class of its own)
    missing = [k for k in REFERENCE_VISION_FIELDS if k not in vision]
    assert not missing, f"vision_config lacks reference fields {missing}"
    for field in REFERENCE_VISION_FIELDS:
        assert vision[field] == getattr(model.config.vision_config, field), field
    rebuilt = SiglipVisionConfig(**vision)  # the reference NearIDModel's own construction
    for field in REFERENCE_VISION_FIELDS:
        assert getattr(rebuilt, field) == getattr(model.config.vision_config, field), field


def test_export_ships_our_own_self_contained_modules(export_dir):
    package = Path(nearid_core.__file__).parent
    for name in CODE_FILES:
        assert (export_dir / name).read_bytes() == (package / name).read_bytes(), name
        tree = ast.parse((export_dir / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.module == "configuration_nearid", f"{name}: relative import of {node.module!r}"
            elif isinstance(node, ast.ImportFrom):
                assert node.module.split(".")[0] in ALLOWED_IMPORTS, f"{name}: imports {node.module!r}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] in ALLOWED_IMPORTS, f"{name}: imports {alias.name!r}"


_REMOTE_LOAD = """
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert "nearid_core" not in sys.modules, "the remote-code path imported nearid_core"
with torch.no_grad():
    out = model(load_file(sys.argv[2])["pixels"])
save_file({"embeds": out.image_embeds.contiguous(), "pooler": out.pooler_output.contiguous()}, sys.argv[3])
"""


def test_paper_call_trust_remote_code_loads_the_export(export_dir, tmp_path, pixels):
    """`AutoModel.from_pretrained(dir, trust_remote_code=True)`, the paper README's call, in a fresh interpreter that
    never imports nearid_core (remote code registers `nearid` globally, so it stays out of this test process)."""
    save_file({"pixels": pixels.contiguous()}, str(tmp_path / "in.safetensors"))
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.run([sys.executable, "-c", _REMOTE_LOAD, str(export_dir), str(tmp_path / "in.safetensors"),
                          str(tmp_path / "out.safetensors")], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = load_file(str(tmp_path / "out.safetensors"))
    ours, _ = load_model(export_dir, dtype=torch.float32)
    want = _embed(ours, pixels)
    torch.testing.assert_close(got["embeds"], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["embeds"], F.normalize(got["pooler"], dim=-1), atol=1e-6, rtol=1e-6)


def test_our_loader_ignores_auto_map_and_never_runs_shipped_code(export_dir, tmp_path, pixels):
    reference = _embed(load_model(export_dir, dtype=torch.float32)[0], pixels)
    d = tmp_path / "tampered"
    d.mkdir()
    for f in export_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    for name in CODE_FILES:  # any execution of these files would raise
        (d / name).write_text("raise RuntimeError('nearid_core must not run code shipped with a checkpoint')\n")
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "nowhere.Missing", "AutoModel": "nowhere.Missing"}
    (d / "config.json").write_text(json.dumps(config))

    model, _ = load_model(d, dtype=torch.float32)
    torch.testing.assert_close(_embed(model, pixels), reference, atol=0, rtol=0)
    scorer = NearIDScorer.from_pretrained(d, device="cpu", dtype=torch.float32)
    assert scorer.model.config.normalize_embeddings is True
    # transformers without trust_remote_code: nearid_core's registered classes, auto_map left alone
    auto = AutoModel.from_pretrained(d, dtype=torch.float32).eval()
    assert type(auto) is NearIDModel
    torch.testing.assert_close(_embed(auto, pixels), reference, atol=1e-6, rtol=1e-5)  # attention kernel may differ


def test_remote_code_false_writes_no_code_and_no_auto_map(export_dir, tmp_path, pixels):
    d = tmp_path / "plain"
    d.mkdir()
    for f in export_dir.iterdir():  # a previous export's modules are removed, not left next to an auto_map-less config
        (d / f.name).write_bytes(f.read_bytes())
    model, _ = load_model(export_dir)
    save_release(model, d, remote_code=False)
    assert not any((d / name).exists() for name in CODE_FILES)
    config = json.loads((d / "config.json").read_text())
    assert "auto_map" not in config
    assert all(k in config["vision_config"] for k in REFERENCE_VISION_FIELDS)
    reloaded, _ = load_model(d, dtype=torch.float32)
    torch.testing.assert_close(_embed(reloaded, pixels), _embed(load_model(export_dir, dtype=torch.float32)[0], pixels))


def test_export_round_trips_with_exactly_the_model_config(export_dir):
    """Re-exporting a loaded export writes the same config (nothing accumulates, no local paths leak)."""
    model, _ = load_model(export_dir)
    first = json.loads((export_dir / "config.json").read_text())
    assert "_name_or_path" not in first
    assert first["backbone_name_or_path"] == "google/siglip2-so400m-patch14-384"
    again = nearid_core.checkpoint.release_config(model.config, torch.float16)
    assert json.loads(json.dumps(again)) == first
