"""The DreamBench++ scorers behind Table 1's DB++ CLIP / DINO cells: DINO v1 ViT-S/8 (resize 256 bicubic, centre crop
224, ImageNet mean/std, CLS token) and CLIP ViT-B/32 (`get_image_features`), tested on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, ViTConfig, ViTModel

from nearid_core.eval.__main__ import main
from nearid_core.eval.baselines import (
    BASELINES,
    HFImageEmbedder,
    ResizeCenterCrop,
    dreambench_rgb,
    load_embedder,
    slow_image_processor,
)
from nearid_core.eval.names import BASELINE_NAMES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    """A tiny random DINO-v1-like ViT at 224 px, saved with a (random) pooler that the scorer must not use."""
    d = tmp_path_factory.mktemp("dino_v1")
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=224, patch_size=32)
    ViTModel(config, add_pooling_layer=True).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in
            ((301, 200), (200, 301), (256, 256), (333, 257))]


def test_registry_defaults_are_dreambench_scorers():
    assert BASELINES["dino-vits8"].default_model == "facebook/dino-vits8"
    assert BASELINES["clip-vit-b32"].default_model == "openai/clip-vit-base-patch32"
    assert tuple(BASELINES) == BASELINE_NAMES


@pytest.mark.parametrize("size, resized, box", [
    ((301, 200), (385, 256), (80, 16, 304, 240)),  # int(256 * 301 / 200) = 385; round(80.5) = 80 (half to even)
    ((200, 301), (256, 385), (16, 80, 240, 304)),
    ((333, 257), (331, 256), (54, 16, 278, 240)),  # int(331.7) = 331; round(53.5) = 54
    ((1024, 768), (341, 256), (58, 16, 282, 240)),
    ((512, 512), (256, 256), (16, 16, 240, 240)),
    ((100, 80), (320, 256), (48, 16, 272, 240)),  # upsampled: the short side always becomes 256
])
def test_dino_transform_geometry_is_torchvision_resize_256_center_crop_224(size, resized, box):
    t = ResizeCenterCrop()
    assert (t.resize, t.crop) == (256, 224)
    assert t.resized_size(*size) == resized
    assert t.crop_box(*resized) == box


def test_dino_transform_pixels(images):
    out = ResizeCenterCrop()(images)["pixel_values"]
    assert out.shape == (4, 3, 224, 224) and out.dtype == torch.float32
    # first image, spelled out: bicubic resize to 385x256, crop (80, 16), /255, ImageNet mean/std
    crop = images[0].resize((385, 256), Image.Resampling.BICUBIC).crop((80, 16, 304, 240))
    x = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255).permute(2, 0, 1)
    want = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(out[0], want, atol=1e-6, rtol=0)
    flat = ResizeCenterCrop()([Image.new("RGB", (300, 260), (255, 128, 0))])["pixel_values"][0]
    for c, value in enumerate((255, 128, 0)):
        expected = (value / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(flat[c], torch.full_like(flat[c], expected), atol=1e-5)


def test_dreambench_reading_puts_transparency_over_white():
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 128))
    out = dreambench_rgb(rgba)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((2, 1)) == (255, 0, 0)
    r, g, b = out.getpixel((1, 0))
    assert 125 <= r <= 129 and 125 <= g <= 129 and b == 255
    assert dreambench_rgb(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_dino_vits8_embeds_the_cls_token_of_the_dreambench_transform(vit_dir, images, tmp_path):
    emb = load_embedder("dino-vits8", vit_dir, device="cpu")
    assert isinstance(emb, HFImageEmbedder) and emb.readout == "cls"
    assert emb.dtype == torch.float32  # DreamBench++ scores in fp32; no --dtype means fp32 here
    assert emb.model.pooler is None
    out = emb.embed(images, batch_size=3)
    assert out.shape == (4, 32)
    ref = ViTModel.from_pretrained(vit_dir).eval()
    with torch.no_grad():
        hidden = ref(pixel_values=ResizeCenterCrop()(images)["pixel_values"])
    torch.testing.assert_close(out, F.normalize(hidden.last_hidden_state[:, 0], dim=-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, F.normalize(hidden.pooler_output, dim=-1), atol=1e-2)
    # files read like PIL images; transparency over white
    path = tmp_path / "a.png"
    images[0].save(path)
    rgba = images[1].convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 100))
    torch.testing.assert_close(emb.embed([path])[0], out[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(emb.embed([rgba]), emb.embed([dreambench_rgb(rgba)]), atol=0, rtol=0)


def test_clip_vit_b32_is_get_image_features_of_its_own_processor(tiny_clip_dir, images):
    emb = load_embedder("clip-vit-b32", tiny_clip_dir, device="cpu")
    assert emb.readout == "image_features" and emb.dtype == torch.float32
    out = emb.embed(images)
    pixels = slow_image_processor(str(tiny_clip_dir))(images=images, return_tensors="pt")["pixel_values"]
    assert pixels.shape[-2:] == (32, 32)
    with torch.no_grad():
        raw = CLIPModel.from_pretrained(tiny_clip_dir).eval().get_image_features(pixel_values=pixels)
    raw = raw if isinstance(raw, torch.Tensor) else raw.pooler_output
    assert out.shape == (4, 16)
    torch.testing.assert_close(out, F.normalize(raw, dim=-1), atol=1e-5, rtol=1e-5)


def test_dreambench_score_with_dino_vits8(vit_dir, images, tmp_path):
    """`dreambench-score --baseline dino-vits8` writes data_dino_vits8_rating/<method>.json = 100 * cosine."""
    run = tmp_path / "samples" / "emu2_seed0"
    for sub, ims in (("src_image", images[:2]), ("tgt_image", images[2:])):
        for k, im in enumerate(ims):
            path = run / sub / "object_00_cup" / f"{k}_0.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            im.save(path)
    ratings = tmp_path / "ratings"
    ratings.mkdir()
    assert main(["dreambench-score", "--samples", str(tmp_path / "samples"), "--ratings", str(ratings), "-q",
                 "--baseline", "dino-vits8", "--model", str(vit_dir), "--device", "cpu"]) == 0
    written = json.loads((ratings / "data_dino_vits8_rating" / "emu2.json").read_text())
    emb = load_embedder("dino-vits8", vit_dir, device="cpu").embed(images)
    for k in range(2):
        expected = 100 * float(emb[k] @ emb[2 + k])
        assert written[f"object_00_cup-{k}_0"] == pytest.approx(expected, abs=1e-3)
