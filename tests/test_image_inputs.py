"""The image-input contract: every accepted form of the same picture gives the same embedding, and inputs that
cannot be read unambiguously raise `ImageInputError` naming the input and the fix (never a silent guess)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import nearid_core.preprocessing as prep
from nearid_core import NearIDScorer
from nearid_core.preprocessing import ImageInputError, iter_images, load_image, open_image, pil_to_tensor

PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def scorer(release_dir) -> NearIDScorer:
    return NearIDScorer.from_pretrained(release_dir, device="cpu", dtype=torch.float32)


def smooth(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    """A smooth uint8 picture [H, W, C] (smooth, so 8-bit rounding of other forms moves embeddings very little)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    phase = rng.uniform(0, 6, channels)
    base = np.stack([np.sin(xx / (5 + c) + phase[c]) * np.cos(yy / (6 + c)) for c in range(channels)], -1)
    return ((base * 0.45 + 0.5) * 255).round().astype(np.uint8)


def cosines(scorer: NearIDScorer, items: list, layout: str | None = None) -> torch.Tensor:
    """Cosine of every item's embedding to the first item's."""
    with torch.no_grad():
        emb = torch.cat([scorer.embed([item], layout=layout) for item in items])
    return emb @ emb[0]


# ----------------------------------------------------------------------------------------------------------------------
# Files: 16-bit, EXIF orientation, huge images, unreadable paths


def test_16_bit_png_file_scores_like_the_same_image_in_memory(scorer, tmp_path):
    """Regression: load_image converted to RGB before the I;16 scaling, so a 16-bit PNG came out nearly white and
    scored cosine 0.05 against itself held in memory."""
    gray = smooth(64, 80, seed=3)[..., 0]
    img16 = Image.fromarray(gray.astype(np.uint16) * 257)
    path = tmp_path / "gray16.png"
    img16.save(path)
    assert Image.open(path).mode == "I;16"
    torch.testing.assert_close(pil_to_tensor(open_image(path)), pil_to_tensor(img16), atol=0, rtol=0)
    assert np.asarray(load_image(path)).min() < 200  # 8-bit RGB view is scaled, not clipped to white
    sims = cosines(scorer, [str(path), img16, Image.fromarray(gray), gray.astype(np.uint16) * 257])
    assert sims.min() > 0.9999


def _with_orientation(upright: Image.Image, orientation: int) -> Image.Image:
    """The stored pixels of a file whose EXIF `orientation` makes viewers show `upright`."""
    stored = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270,
              2: Image.Transpose.FLIP_LEFT_RIGHT}[orientation]
    return upright.transpose(stored)


@pytest.mark.parametrize("orientation", [2, 3, 6, 8])
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_is_applied_like_every_viewer(scorer, tmp_path, orientation, suffix):
    """Regression: a phone photo (orientation 6) was embedded sideways."""
    upright = Image.fromarray(smooth(48, 72, seed=orientation))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo{suffix}"
    _with_orientation(upright, orientation).save(path, exif=exif.tobytes(), quality=95)
    got = pil_to_tensor(open_image(path))
    assert got.shape == (3, 48, 72)
    assert (got - pil_to_tensor(upright)).abs().mean() < (0.001 if suffix == ".png" else 0.02)
    with Image.open(path) as opened:  # the same file opened by the caller
        sims = cosines(scorer, [upright, str(path), opened, load_image(path)])
    assert sims.min() > (0.99999 if suffix == ".png" else 0.999)


def test_huge_image_is_refused_with_the_flag_to_allow_it(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(smooth(200, 200, seed=1)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 40 000 px > 2x the limit: PIL's bomb error
    with pytest.raises(ImageInputError, match=r"big\.png.*decompression-bomb.*--allow-large-images"):
        open_image(path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_allowed_huge_image_is_decoded_at_reduced_size(scorer, tmp_path, monkeypatch, suffix):
    picture = Image.fromarray(smooth(400, 480, seed=2))
    path = tmp_path / f"big{suffix}"
    picture.save(path, quality=95)
    full = pil_to_tensor(open_image(path))
    assert full.shape == (3, 400, 480)  # under the threshold: decoded exactly
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setattr(prep, "HUGE_IMAGE_PIXELS", 40_000)  # 192 000 px: "huge" at this scale
    reduced = open_image(path)
    assert reduced.width * reduced.height <= 40_000 and reduced.width >= 56
    assert reduced.width / reduced.height == pytest.approx(480 / 400, rel=0.05)
    assert cosines(scorer, [picture, str(path)]).min() > 0.995


def test_unreadable_paths_say_what_is_wrong(tmp_path):
    loop = tmp_path / "loop.png"
    os.symlink(loop, loop)
    with pytest.raises(ImageInputError, match="symlink loop"):
        open_image(loop)
    broken = tmp_path / "broken.png"
    os.symlink(tmp_path / "gone.png", broken)
    with pytest.raises(ImageInputError, match="broken symlink"):
        open_image(broken)
    with pytest.raises(ImageInputError, match="is a directory"):
        open_image(tmp_path)
    with pytest.raises(ImageInputError, match="not found"):
        open_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageInputError, match=r"Cannot read image file .*text\.png"):
        open_image(tmp_path / "text.png")


# ----------------------------------------------------------------------------------------------------------------------
# PIL modes without a defined 8-bit scale


def test_pil_mode_i_follows_pils_scale_and_refuses_values_it_would_clip():
    gray = smooth(20, 30, seed=4)[..., 0]
    as_i = Image.fromarray(gray.astype(np.int32))
    assert as_i.mode == "I"
    torch.testing.assert_close(pil_to_tensor(as_i), pil_to_tensor(Image.fromarray(gray)), atol=1e-7, rtol=0)
    with pytest.raises(ImageInputError, match="mode 'I'.*uint16"):
        pil_to_tensor(Image.fromarray(gray.astype(np.int32) * 257))


def test_pil_mode_f_is_refused():
    with pytest.raises(ImageInputError, match="mode 'F'"):
        pil_to_tensor(Image.fromarray(np.zeros((8, 8), np.float32)))


# ----------------------------------------------------------------------------------------------------------------------
# Layout: stated, or unambiguous, never guessed


@pytest.mark.parametrize("shape", [(1, 3, 64, 3), (2, 4, 40, 3), (1, 1, 30, 1), (1, 3, 9, 4), (3, 30, 3)])
def test_ambiguous_tensor_shape_is_an_error_naming_both_readings(shape):
    """Regression: a ComfyUI [B, H, W, C] batch with H of 1, 3 or 4 was read as [B, C, H, W]."""
    with pytest.raises(ImageInputError, match=r"ambiguous.*channels_last reads.*channels_first reads.*layout="):
        list(iter_images(torch.rand(shape)))


def test_stated_layout_reads_comfyui_batches_with_3_pixel_rows(scorer):
    comfy = torch.from_numpy(smooth(3, 64, seed=5)).float()[None] / 255  # [1, 3, 64, 3]: 3 rows, 64 columns, RGB
    (x,) = iter_images(comfy, layout="channels_last")
    assert x.shape == (3, 3, 64)
    torch.testing.assert_close(x, comfy[0].permute(2, 0, 1))
    (y,) = iter_images(comfy.permute(0, 3, 1, 2), layout="channels_first")
    torch.testing.assert_close(x, y)
    pil = Image.fromarray(smooth(3, 64, seed=5))
    assert cosines(scorer, [pil, comfy], layout="channels_last").min() > 0.99999
    with pytest.raises(ImageInputError, match="3 channels|channels; expected"):
        list(iter_images(torch.rand(1, 3, 64, 64), layout="channels_last"))  # a [B, 3, H, W] batch stated wrongly


def test_unknown_layout_is_refused(scorer):
    with pytest.raises(ImageInputError, match="layout must be one of"):
        scorer.embed(torch.rand(1, 32, 32, 3), layout="NHWC")


def test_comfyui_nodes_state_the_layout(release_dir):
    """The nodes pass layout='channels_last', so a 3-pixel-high IMAGE batch scores like the same picture as PIL."""
    from nearid_nodes.loader import NearIDModelHandle
    from nearid_nodes.scoring import _embed

    scorer = NearIDScorer.from_pretrained(release_dir, device="cpu", dtype=torch.float32)
    handle = NearIDModelHandle(scorer=scorer, name="test", batch_size=4)

    class Bar:
        def update(self, n: int) -> None:
            pass

    comfy = torch.from_numpy(smooth(3, 64, seed=6)).float()[None] / 255
    with torch.no_grad():
        got = _embed(handle, comfy, Bar())
        want = scorer.embed(Image.fromarray(smooth(3, 64, seed=6)))
    assert float(got[0] @ want[0]) > 0.99999


# ----------------------------------------------------------------------------------------------------------------------
# Property: the same picture in every accepted form gives the same embedding

SIZES = st.tuples(st.integers(20, 90), st.integers(20, 90))


def color_forms(arr: np.ndarray, tmp_path) -> list[tuple[object, str | None]]:
    """The RGB picture `arr` [H, W, 3] uint8 in every accepted form (with its stated layout, if any)."""
    rgb = Image.fromarray(arr)
    path = tmp_path / "rgb.png"
    rgb.save(path)
    hwc = torch.from_numpy(arr.copy())
    plain = [str(path), path, rgb, rgb.convert("RGBA"), rgb.convert("CMYK"), arr, arr.astype(np.uint16) * 257,
             arr.astype(np.float32) / 255, arr.astype(np.float64) / 255, np.concatenate([arr, arr[..., :1]], -1)]
    last = [hwc[None], hwc[None].float() / 255, hwc.float() / 255, arr[None]]
    first = [hwc.permute(2, 0, 1)[None], hwc.permute(2, 0, 1).float() / 255, arr.transpose(2, 0, 1)]
    return [(f, None) for f in plain] + [(f, "channels_last") for f in last] + [(f, "channels_first") for f in first]


def gray_forms(gray: np.ndarray, tmp_path) -> list:
    """The gray picture `gray` [H, W] uint8 in every accepted gray form."""
    g = Image.fromarray(gray)
    path16 = tmp_path / "gray16.png"
    Image.fromarray(gray.astype(np.uint16) * 257).save(path16)
    return [g, g.convert("LA"), g.convert("RGB"), g.convert("P"),
            Image.fromarray(gray.astype(np.uint16) * 257), Image.fromarray(gray.astype(np.int32)), str(path16),
            gray, gray[..., None], gray.astype(np.float32) / 255, torch.from_numpy(gray.copy())[None, :, :, None]]


@settings(PROPERTY, max_examples=10)
@given(size=SIZES, seed=st.integers(0, 10_000))
def test_every_form_of_a_color_image_embeds_the_same(scorer, tmp_path, size, seed):
    arr = smooth(*size, seed=seed)
    with torch.no_grad():
        ref = scorer.embed(Image.fromarray(arr))
        sims = [float(scorer.embed([f], layout=layout) @ ref[0]) for f, layout in color_forms(arr, tmp_path)]
    assert min(sims) > 0.9999, sims


@PROPERTY
@given(size=SIZES, seed=st.integers(0, 10_000))
def test_every_form_of_a_gray_image_embeds_the_same(scorer, tmp_path, size, seed):
    gray = smooth(*size, seed=seed, channels=1)[..., 0]
    forms = gray_forms(gray, tmp_path)
    with torch.no_grad():
        ref = scorer.embed(Image.fromarray(gray))
        sims = [float(scorer.embed([f], layout="channels_last") @ ref[0]) for f in forms]
    assert min(sims) > 0.9999, sims


@PROPERTY
@given(size=SIZES, seed=st.integers(0, 10_000), batch=st.integers(1, 3))
def test_both_stated_layouts_of_a_tensor_give_the_same_pixels(size, seed, batch):
    t = torch.from_numpy(np.stack([smooth(*size, seed=seed + i) for i in range(batch)])).float() / 255
    last = torch.stack(list(iter_images(t, layout="channels_last")))
    first = torch.stack(list(iter_images(t.permute(0, 3, 1, 2), layout="channels_first")))
    torch.testing.assert_close(last, first, atol=0, rtol=0)
    torch.testing.assert_close(last, t.permute(0, 3, 1, 2), atol=0, rtol=0)


@PROPERTY
@given(batch=st.integers(1, 3), a=st.sampled_from([1, 3, 4]), b=st.integers(1, 40), c=st.sampled_from([1, 3, 4]))
def test_every_shape_that_fits_both_layouts_raises_unless_stated(batch, a, b, c):
    t = torch.rand(batch, a, b, c)
    with pytest.raises(ImageInputError, match="ambiguous"):
        list(iter_images(t))
    assert len(list(iter_images(t, layout="channels_last"))) == batch
    assert all(x.shape == (3, a, b) for x in iter_images(t, layout="channels_last"))
    assert all(x.shape == (3, b, c) for x in iter_images(t, layout="channels_first"))


@PROPERTY
@given(size=SIZES, seed=st.integers(0, 10_000))
def test_unambiguous_shapes_need_no_layout(size, seed):
    h, w = size
    if h in (1, 3, 4) or w in (1, 3, 4):
        return
    t = torch.rand(2, h, w, 3, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(torch.stack(list(iter_images(t))), torch.stack(list(iter_images(t, "channels_last"))))
    assert F.cosine_similarity(torch.stack(list(iter_images(t.permute(0, 3, 1, 2)))).flatten(1),
                               t.permute(0, 3, 1, 2).flatten(1)).min() > 0.9999


# ----------------------------------------------------------------------------------------------------------------------
# Found by a new-user trial


def test_huge_16_bit_images_are_reduced_not_refused(scorer, tmp_path, monkeypatch):
    gray = smooth(300, 400, seed=8)[..., 0].astype(np.uint16) * 257
    path = tmp_path / "big16.png"
    Image.fromarray(gray).save(path)
    monkeypatch.setattr(prep, "HUGE_IMAGE_PIXELS", 40_000)
    reduced = open_image(path)
    assert reduced.mode.startswith("I;16") and reduced.width * reduced.height <= 40_000
    assert cosines(scorer, [Image.fromarray((gray // 257).astype(np.uint8)), str(path)]).min() > 0.995


def test_rotated_16_bit_tiff_is_refused_not_scrambled(tmp_path):
    """Pillow 13 decodes TIFFs with orientation 5-8 with scrambled pixels; refuse them rather than score garbage."""
    path = tmp_path / "rot.tif"
    Image.fromarray(smooth(30, 40, seed=9)[..., 0].astype(np.uint16) * 257).save(path, tiffinfo={274: 6})
    with pytest.raises(ImageInputError, match=r"rot\.tif.*orientation.*re-save"):
        open_image(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_pixel_tensors_work_on_cpu(scorer, dtype):
    t = torch.from_numpy(smooth(40, 50, seed=10)).float()[None] / 255
    assert cosines(scorer, [t, t.to(dtype)], layout="channels_last").min() > 0.999


def test_odd_arrays_and_closed_images(scorer, tmp_path):
    arr = smooth(40, 50, seed=11).astype(np.uint16) * 257
    assert cosines(scorer, [arr, arr.astype(">u2")]).min() > 0.99999  # big-endian uint16 from a file
    with pytest.raises(ImageInputError, match="no pixels"):
        list(iter_images(np.zeros((0, 5, 3), np.uint8)))
    with pytest.raises(ImageInputError, match="no pixels"):
        list(iter_images(torch.zeros(1, 0, 0, 3), layout="channels_last"))
    path = tmp_path / "a.png"
    Image.fromarray(smooth(20, 20, seed=12)).save(path)
    with Image.open(path) as im:
        pass
    with pytest.raises(ImageInputError, match="could not be read"):
        list(iter_images(im))


def test_mode_f_file_error_names_the_file(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.zeros((8, 8), np.float32)).save(path)
    with pytest.raises(ImageInputError, match=r"float\.tif.*mode 'F'"):
        list(iter_images(str(path)))
