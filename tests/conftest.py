"""Shared fixtures: tiny random SigLIP / NearID checkpoints in every supported layout, and test images."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

import nearid_core
from nearid_core import NearIDConfig, NearIDModel, PreprocessConfig

# The CPU dtype probe caches its result per machine; tests keep theirs out of the user's cache.
os.environ.setdefault("NEARID_CACHE_DIR", tempfile.mkdtemp(prefix="nearid-test-cache-"))

TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14
)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=128,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY_PREPROCESS = PreprocessConfig(size=(56, 56), resample="bilinear")


def tiny_vision_model(seed: int = 0) -> SiglipVisionModel:
    torch.manual_seed(seed)
    return SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)).eval()


def write_preprocessor(directory: Path, config: PreprocessConfig = TINY_PREPROCESS) -> None:
    (directory / "preprocessor_config.json").write_text(json.dumps(config.to_dict()))


def tiny_nearid_model(seed: int = 1, backbone: str | None = None) -> NearIDModel:
    """A NearID model whose trunk is `tiny_vision_model(0)` and whose head is re-randomised with `seed`."""
    model = NearIDModel(NearIDConfig(vision_config=TINY_VISION, backbone_name_or_path=backbone))
    model.backbone.load_state_dict(tiny_vision_model(0).state_dict())
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.fixture(scope="session")
def siglip_vision_dir(tmp_path_factory) -> Path:
    """A vision-only SiglipVisionModel checkpoint (as saved by the installed transformers) + preprocessor."""
    d = tmp_path_factory.mktemp("siglip_vision")
    tiny_vision_model(0).save_pretrained(d)
    write_preprocessor(d)
    return d


@pytest.fixture(scope="session")
def siglip_full_dir(tmp_path_factory) -> Path:
    """A full SiglipModel checkpoint (text tower included) whose vision tower equals `tiny_vision_model(0)`."""
    d = tmp_path_factory.mktemp("siglip_full")
    model = SiglipModel(SiglipConfig(vision_config=TINY_VISION, text_config=TINY_TEXT)).eval()
    model.vision_model.load_state_dict(tiny_vision_model(0).state_dict())
    model.save_pretrained(d)
    write_preprocessor(d)
    return d


@pytest.fixture(scope="session")
def release_dir(tmp_path_factory, siglip_vision_dir) -> Path:
    """The published release layout: fp16, transformers-4.x keys `backbone.vision_model.*`."""
    d = tmp_path_factory.mktemp("release")
    nearid_core.save_release(tiny_nearid_model(1, backbone=str(siglip_vision_dir)), d,
                             preprocessor_config=TINY_PREPROCESS.to_dict())
    return d


@pytest.fixture(scope="session")
def head_only_file(tmp_path_factory, siglip_vision_dir) -> Path:
    d = tmp_path_factory.mktemp("head_only")
    return nearid_core.save_head_only(tiny_nearid_model(1, backbone=str(siglip_vision_dir)), d / "head.safetensors")


@pytest.fixture(scope="session")
def rgb_images() -> list[Image.Image]:
    """Four RGB images of different sizes with smooth structure (so resampling differences stay small)."""
    rng = np.random.default_rng(0)
    images = []
    for h, w in [(70, 90), (56, 56), (120, 64), (33, 47)]:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(xx / (3 + c) + c) * np.cos(yy / (4 + c)) for c in range(3)], -1)
        noise = rng.normal(0, 0.15, size=(h, w, 3))
        images.append(Image.fromarray(((base * 0.4 + 0.5 + noise).clip(0, 1) * 255).astype(np.uint8)))
    return images


@pytest.fixture(scope="session")
def image_files(tmp_path_factory, rgb_images) -> list[Path]:
    d = tmp_path_factory.mktemp("images")
    paths = []
    for i, img in enumerate(rgb_images):
        paths.append(d / f"img{i}.png")
        img.save(paths[-1])
    return paths


CLIP_PREPROCESSOR = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
                     "resample": 3, "do_center_crop": True, "crop_size": {"height": 32, "width": 32},
                     "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                     "image_mean": [0.48145466, 0.4578275, 0.40821073],
                     "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True}


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIPModel (32 px vision tower) with CLIP's slow processor config, for the CLIP baselines."""
    from transformers import CLIPConfig, CLIPModel

    d = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    config = CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=64, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        projection_dim=16)
    CLIPModel(config).save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR))
    return d


def eval_usage_error(argv, capsys) -> str:
    """Run the eval CLI on a user mistake: exit status 2 and one error line on stderr, no traceback; returns it."""
    from nearid_core.eval.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]
