"""Procedural near-identity data: a tiny, deterministic stand-in for NearID and MTG.

Everything is drawn with numpy + PIL (no torch, no downloads) so that loaders,
training loops, metrics and tests can run on CPU in seconds.

* An **identity** is a parametric object (:class:`ObjectSpec`): body shape
  (ellipse / rectangle / triangle / polygon / star), aspect, body colour,
  texture (plain / stripes / dots / checker with frequency, angle and a
  secondary colour) and one attached **part** (handle / cap / spot, with its
  own shape, colour, size and position).
* A **view** renders the object with a random :class:`Pose` (position, scale,
  small rotation) onto a random :class:`Background` (gradients, radial
  gradients, smooth noise, rectangles, stripes, wall/floor "horizon"); views of
  one identity always use different background kinds and hues, the object's
  identity attributes never change.
* A **near-identity distractor** for view ``j`` is a moderately perturbed copy
  of the object (one to three attributes changed, strength set by a *source*)
  rendered with view ``j``'s exact pose into view ``j``'s exact background, so
  outside the union of the two objects' masks it is pixel-identical to view
  ``j``. Several sources (``src_a`` colour drift, ``src_b`` geometry/texture
  changes, ``src_c`` larger multi-attribute changes, ``hard``/``soft``, or any
  name -> generic preset) mimic the several inpainting generators of the real
  dataset.
* An **MTG sample** (Mind-the-Glitch style) has two views of one object and,
  for each view, the same image with one part edited in place (recoloured /
  reshaped / resized), plus object and part masks.

LOCAL FOLDER LAYOUT (written by :func:`write_dataset` and :func:`write_mtg`)::

    <root>/
      identities/<identity_id>/view1.png view2.png [view3.png]   RGB, each view in a different background
      identities/<identity_id>/mask1.png ...                      optional foreground masks (L, 255 = object)
      distractors/<source>/<identity_id>/view1.png ...            look-alike object in EXACTLY view j's background
                                                                   (a view may lack a distractor for some source)
      splits/train.json val.json test.json                        optional JSON lists of identity ids (strings)
      metadata.json                                               optional {identity_id: {"category": ...}}
    <mtg_root>/<sample_id>/image_1_original.png image_2_original.png image_1_inpainted.png image_2_inpainted.png
                           image_1_object_mask.png image_2_object_mask.png image_1_part_mask.png image_2_part_mask.png

Identity ids are zero-padded strings (``id0000``), MTG sample ids ``mtg0000``.
Unlike the real NearID splits (row positions), the local splits list identity
ids; they are disjoint and cover all identities. ``metadata.json`` entries hold
``category`` (the body shape), ``category_description`` and ``n_views``.

Determinism: every identity / distractor / MTG sample draws from its own
``numpy.random.default_rng`` seeded by ``(seed, index, ...)``, so identity
``k`` is the same whatever ``n_identities`` is, and the same arguments always
give byte-identical PNG files.
"""

from __future__ import annotations

import colorsys
import json
import math
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES",
    "TEXTURES",
    "PARTS",
    "PART_SHAPES",
    "BACKGROUND_KINDS",
    "PERTURBATION_KINDS",
    "COLOR_KINDS",
    "GEOMETRY_KINDS",
    "SOURCE_PRESETS",
    "ObjectSpec",
    "Pose",
    "Background",
    "SourceConfig",
    "SyntheticIdentity",
    "MTGSample",
    "random_object",
    "random_pose",
    "random_background",
    "render_background",
    "render_view",
    "perturb_object",
    "edit_part",
    "source_config",
    "make_identity",
    "make_mtg_sample",
    "write_dataset",
    "write_examples",
    "write_mtg",
    "spec_to_dict",
]

SHAPES: tuple[str, ...] = ("ellipse", "rectangle", "triangle", "polygon", "star")
TEXTURES: tuple[str, ...] = ("plain", "stripes", "dots", "checker")
PARTS: tuple[str, ...] = ("none", "handle", "cap", "spot")
PART_SHAPES: tuple[str, ...] = ("ellipse", "rectangle", "triangle")
BACKGROUND_KINDS: tuple[str, ...] = ("linear", "radial", "noise", "rectangles", "stripes", "horizon")

COLOR_KINDS: tuple[str, ...] = ("hue", "texture_color", "part_color", "texture_freq")
GEOMETRY_KINDS: tuple[str, ...] = (
    "aspect",
    "sides",
    "part_position",
    "part_size",
    "part_shape",
    "texture_type",
    "texture_angle",
)
PERTURBATION_KINDS: tuple[str, ...] = COLOR_KINDS + GEOMETRY_KINDS + ("part_kind",)

RGB = tuple[int, int, int]
_SS = 2  # supersampling factor of the object layer (anti-aliased edges)


# ---------------------------------------------------------------------------
# Parameter dataclasses
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """Identity-defining parameters of a synthetic object.

    Lengths are in units of the body radius; angles in degrees in the object
    frame (so they rotate with the pose).
    """

    shape: str = "ellipse"
    n_sides: int = 5  # polygon sides / star points (triangle: 3)
    inner_ratio: float = 0.5  # star inner radius / outer radius
    aspect: float = 1.0  # width / height of the body (area preserving)
    body_color: RGB = (200, 60, 60)
    texture: str = "plain"
    texture_freq: float = 3.0  # cycles across the body diameter
    texture_angle: float = 0.0
    texture_color: RGB = (240, 240, 240)
    part: str = "cap"
    part_shape: str = "ellipse"
    part_color: RGB = (40, 40, 200)
    part_angle: float = -90.0  # direction from the body centre (-90 = up)
    part_size: float = 0.3
    part_aspect: float = 1.0

    @property
    def category(self) -> str:
        """Coarse category (the body shape), as stored in ``metadata.json``."""
        return self.shape

    def describe(self) -> str:
        """Short human-readable description, e.g. ``"striped red star with a blue cap"``."""
        tex = {"plain": "plain", "stripes": "striped", "dots": "dotted", "checker": "checkered"}[self.texture]
        shape = f"{self.n_sides}-gon" if self.shape == "polygon" else self.shape
        text = f"{tex} {_color_name(self.body_color)} {shape}"
        if self.part != "none":
            text += f" with a {_color_name(self.part_color)} {self.part}"
        return text


@dataclass(frozen=True)
class Pose:
    """Placement of the object in an image, independent of the image size.

    Attributes:
        cx: Centre x as a fraction of the image width.
        cy: Centre y as a fraction of the image height.
        scale: Body radius as a fraction of the image size.
        rotation: In-plane rotation in degrees.
    """

    cx: float = 0.5
    cy: float = 0.5
    scale: float = 0.22
    rotation: float = 0.0


@dataclass(frozen=True)
class Background:
    """A procedural background; ``seed`` drives its random layout (size independent)."""

    kind: str = "linear"
    colors: tuple[RGB, ...] = ((200, 200, 200), (90, 90, 90), (150, 120, 100))
    angle: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class SourceConfig:
    """A distractor "generator": how strongly and in which way objects are perturbed.

    Attributes:
        name: Source name (folder name under ``distractors/``).
        strength: Perturbation strength in [0, 1] (higher = less similar).
        kinds: Allowed perturbation kinds (``None`` = all of PERTURBATION_KINDS).
        n_changes: Inclusive (min, max) number of attributes changed.
    """

    name: str
    strength: float = 0.5
    kinds: tuple[str, ...] | None = None
    n_changes: tuple[int, int] = (1, 2)


SOURCE_PRESETS: dict[str, SourceConfig] = {
    "src_a": SourceConfig("src_a", 0.35, COLOR_KINDS, (1, 2)),  # colour drift
    "src_b": SourceConfig("src_b", 0.6, GEOMETRY_KINDS, (1, 2)),  # shape / texture / part layout
    "src_c": SourceConfig("src_c", 0.8, None, (2, 3)),  # larger multi-attribute change
    "hard": SourceConfig("hard", 0.2, None, (1, 1)),  # subtle single change
    "soft": SourceConfig("soft", 0.75, None, (2, 3)),  # easy distractor
}


def source_config(source: str | SourceConfig) -> SourceConfig:
    """Resolve a source name to its :class:`SourceConfig`.

    Args:
        source: A preset name (see ``SOURCE_PRESETS``), any other name (generic
            preset: strength 0.5, all kinds, 1-2 changes) or a ``SourceConfig``.

    Returns:
        The source configuration.
    """
    if isinstance(source, SourceConfig):
        return source
    if source in SOURCE_PRESETS:
        return SOURCE_PRESETS[source]
    return SourceConfig(str(source), 0.5, None, (1, 2))


# ---------------------------------------------------------------------------
# Colour helpers
# ---------------------------------------------------------------------------


def _hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (int(round(r * 255)), int(round(g * 255)), int(round(b * 255)))


def _to_hsv(c: RGB) -> tuple[float, float, float]:
    return colorsys.rgb_to_hsv(c[0] / 255.0, c[1] / 255.0, c[2] / 255.0)


def _shift_hue(c: RGB, dh: float, ds: float = 0.0, dv: float = 0.0) -> RGB:
    h, s, v = _to_hsv(c)
    return _hsv(h + dh, s + ds, v + dv)


def _color_name(c: RGB) -> str:
    h, s, v = _to_hsv(c)
    if v < 0.2:
        return "black"
    if s < 0.15:
        return "white" if v > 0.8 else "grey"
    names = ("red", "orange", "yellow", "green", "teal", "blue", "purple", "pink", "red")
    bounds = (0.04, 0.11, 0.18, 0.42, 0.53, 0.72, 0.82, 0.96, 1.01)
    for b, n in zip(bounds, names):
        if h < b:
            return n
    return "red"


def _sign(rng: np.random.Generator) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------


def random_object(rng: np.random.Generator) -> ObjectSpec:
    """Sample a random identity.

    Args:
        rng: Source of randomness.

    Returns:
        A new :class:`ObjectSpec`.
    """
    shape = str(rng.choice(SHAPES))
    if shape == "triangle":
        n_sides = 3
    elif shape == "star":
        n_sides = int(rng.integers(5, 8))
    else:
        n_sides = int(rng.integers(5, 9))
    h = float(rng.random())
    body = _hsv(h, rng.uniform(0.45, 0.95), rng.uniform(0.5, 0.95))
    texture = str(rng.choice(TEXTURES, p=[0.25, 0.3, 0.25, 0.2]))
    if rng.random() < 0.5:  # tonal variant of the body colour
        hb, sb, vb = _to_hsv(body)
        tex_col = _hsv(hb + rng.uniform(-0.03, 0.03), sb * rng.uniform(0.5, 1.0), vb - 0.4 if vb > 0.6 else vb + 0.35)
    else:
        tex_col = _hsv(h + rng.uniform(0.25, 0.75), rng.uniform(0.3, 0.9), rng.uniform(0.55, 1.0))
    part = str(rng.choice(PARTS, p=[0.1, 0.3, 0.35, 0.25]))
    return ObjectSpec(
        shape=shape,
        n_sides=n_sides,
        inner_ratio=float(rng.uniform(0.45, 0.62)),
        aspect=float(np.exp(rng.uniform(-0.4, 0.4))),
        body_color=body,
        texture=texture,
        texture_freq=float(rng.uniform(2.0, 6.0)),
        texture_angle=float(rng.uniform(0.0, 180.0)),
        texture_color=tex_col,
        part=part,
        part_shape=str(rng.choice(PART_SHAPES)),
        part_color=_hsv(rng.random(), rng.uniform(0.4, 0.95), rng.uniform(0.35, 0.95)),
        part_angle=float(rng.uniform(-180.0, 180.0)),
        part_size=float(rng.uniform(0.22, 0.42)),
        part_aspect=float(np.exp(rng.uniform(-0.35, 0.35))),
    )


def random_pose(rng: np.random.Generator) -> Pose:
    """Sample a placement that keeps the whole object (parts included) inside the frame.

    Args:
        rng: Source of randomness.

    Returns:
        A :class:`Pose`.
    """
    scale = float(rng.uniform(0.18, 0.26))
    margin = min(1.75 * scale, 0.5)
    return Pose(
        cx=float(rng.uniform(margin, 1.0 - margin)),
        cy=float(rng.uniform(margin, 1.0 - margin)),
        scale=scale,
        rotation=float(rng.uniform(-25.0, 25.0)),
    )


def random_background(
    rng: np.random.Generator, kind: str | None = None, hue: float | None = None
) -> Background:
    """Sample a background.

    Args:
        rng: Source of randomness.
        kind: One of ``BACKGROUND_KINDS``; random if ``None``.
        hue: Base hue in [0, 1); random if ``None``.

    Returns:
        A :class:`Background`.
    """
    kind = str(rng.choice(BACKGROUND_KINDS)) if kind is None else kind
    h = float(rng.random()) if hue is None else hue
    colors = (
        _hsv(h, rng.uniform(0.1, 0.6), rng.uniform(0.55, 0.95)),
        _hsv(h + rng.uniform(-0.12, 0.12), rng.uniform(0.15, 0.7), rng.uniform(0.25, 0.7)),
        _hsv(h + rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.6), rng.uniform(0.4, 0.95)),
    )
    return Background(kind=kind, colors=colors, angle=float(rng.uniform(0, 360)), seed=int(rng.integers(2**31)))


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def _grid(size: int, ss: int = 1) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size * ss, dtype=np.float32) + 0.5) / (ss * size)
    return c[None, :], c[:, None]  # x (1, n), y (n, 1) in [0, 1]


def _lerp(c0: RGB, c1: RGB, t: np.ndarray) -> np.ndarray:
    a = np.asarray(c0, np.float32)
    b = np.asarray(c1, np.float32)
    return a + (b - a) * t[..., None]


def render_background(bg: Background, size: int) -> np.ndarray:
    """Render a background.

    Args:
        bg: Background parameters.
        size: Output side length in pixels.

    Returns:
        ``uint8`` array of shape (size, size, 3).
    """
    rng = np.random.default_rng(bg.seed)
    x, y = _grid(size)
    c0, c1, c2 = bg.colors[:3]
    a = math.radians(bg.angle)
    ca, sa = math.cos(a), math.sin(a)
    if bg.kind == "linear":
        t = (x - 0.5) * ca + (y - 0.5) * sa
        t = np.clip(t / (abs(ca) + abs(sa)) + 0.5, 0, 1)
        out = _lerp(c0, c1, t)
    elif bg.kind == "radial":
        px, py = rng.uniform(0.1, 0.9, size=2)
        t = np.clip(np.hypot(x - px, y - py) / rng.uniform(0.7, 1.1), 0, 1)
        out = _lerp(c0, c1, t)
    elif bg.kind == "noise":
        g = int(rng.integers(3, 6))
        mix = rng.random((g, g, 3)).astype(np.float32)
        pal = np.asarray(bg.colors[:3], np.float32)
        small = (mix / mix.sum(-1, keepdims=True)) @ pal
        small = np.clip(small + rng.normal(0, 12, small.shape), 0, 255).astype(np.uint8)
        out = np.asarray(Image.fromarray(small, "RGB").resize((size, size), Image.BICUBIC), np.float32)
    elif bg.kind == "rectangles":
        img = Image.new("RGB", (size, size), c0)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(4, 10))):
            x0, y0 = rng.uniform(-0.2, 0.9, size=2)
            w, h = rng.uniform(0.15, 0.6, size=2)
            base = bg.colors[int(rng.integers(0, 3))]
            col = _shift_hue(base, rng.uniform(-0.05, 0.05), dv=rng.uniform(-0.15, 0.15))
            draw.rectangle(
                [int(x0 * size), int(y0 * size), int((x0 + w) * size), int((y0 + h) * size)], fill=col
            )
        out = np.asarray(img, np.float32)
    elif bg.kind == "stripes":
        nb = int(rng.integers(3, 8))
        t = (x * ca + y * sa) * nb
        idx = np.floor(t).astype(np.int64) % 2
        pal = np.asarray([c0, c2], np.float32)
        out = pal[idx]
    elif bg.kind == "horizon":
        hz = float(rng.uniform(0.5, 0.75))
        wall = _lerp(c0, _shift_hue(c0, 0.0, dv=-0.12), np.broadcast_to(y / hz, (size, size)))
        floor = _lerp(c1, _shift_hue(c1, 0.0, dv=0.15), np.broadcast_to((y - hz) / (1 - hz), (size, size)))
        out = np.where((y < hz)[..., None], wall, floor)
    else:
        raise ValueError(f"unknown background kind {bg.kind!r}")
    out = np.broadcast_to(out, (size, size, 3))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _wedge_inside(p: np.ndarray, q: np.ndarray, n: int, k: float, phi0: float) -> np.ndarray:
    """Inside test for a regular star/polygon with circumradius 1 and inner radius ``k``."""
    rho = np.hypot(p, q)
    w = 2.0 * math.pi / n
    psi = np.mod(np.arctan2(q, p) - phi0, w)
    psi = np.minimum(psi, w - psi)
    xx = rho * np.cos(psi)
    yy = rho * np.sin(psi)
    dx = k * math.cos(math.pi / n) - 1.0
    dy = k * math.sin(math.pi / n)
    return dx * yy - dy * (xx - 1.0) >= 0.0


def _body_inside(spec: ObjectSpec, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    sx = math.sqrt(spec.aspect)
    p, q = u / sx, v * sx
    up = -math.pi / 2.0
    if spec.shape == "ellipse":
        return p * p + q * q <= 1.0
    if spec.shape == "rectangle":
        p2, q2 = (p / 0.88) ** 2, (q / 0.88) ** 2
        return p2 * p2 * p2 + q2 * q2 * q2 <= 1.0
    if spec.shape == "triangle":
        return _wedge_inside(p / 1.25, (q - 0.2) / 1.25, 3, 0.5, up)
    if spec.shape == "polygon":
        n = max(3, spec.n_sides)
        return _wedge_inside(p / 1.05, q / 1.05, n, math.cos(math.pi / n), up)
    if spec.shape == "star":
        return _wedge_inside(p / 1.2, q / 1.2, max(3, spec.n_sides), spec.inner_ratio, up)
    raise ValueError(f"unknown shape {spec.shape!r}")


def _part_shape_inside(kind: str, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    if kind == "ellipse":
        return s * s + t * t <= 1.0
    if kind == "rectangle":
        s2, t2 = s * s, t * t
        return s2 * s2 * s2 + t2 * t2 * t2 <= 0.8
    if kind == "triangle":
        return _wedge_inside(s / 1.25, t / 1.25, 3, 0.5, 0.0)
    raise ValueError(f"unknown part shape {kind!r}")


def _boundary_radius(spec: ObjectSpec, angle: float) -> float:
    r = np.linspace(0.0, 2.0, 201, dtype=np.float32)
    inside = _body_inside(spec, r * math.cos(angle), r * math.sin(angle))
    idx = np.nonzero(inside)[0]
    return float(r[idx[-1]]) if idx.size else 0.5


def _part_inside(spec: ObjectSpec, u: np.ndarray, v: np.ndarray, body: np.ndarray) -> np.ndarray:
    if spec.part == "none":
        return np.zeros(np.broadcast_shapes(u.shape, v.shape), bool)
    ang = math.radians(spec.part_angle)
    rb = _boundary_radius(spec, ang)
    ps = spec.part_size
    if spec.part == "cap":
        dist = rb + 0.35 * ps
    elif spec.part == "handle":
        dist = rb + 0.45 * ps
    else:  # spot
        dist = 0.45 * rb
    cx, cy = dist * math.cos(ang), dist * math.sin(ang)
    du, dv = u - cx, v - cy
    # part frame: t along the outward radial direction, s tangential
    t = du * math.cos(ang) + dv * math.sin(ang)
    s = -du * math.sin(ang) + dv * math.cos(ang)
    pa = math.sqrt(spec.part_aspect)
    scale = ps * (1.6 if spec.part == "handle" else 1.0)
    sn, tn = s / (scale * pa), t * pa / scale
    inside = _part_shape_inside(spec.part_shape, sn, tn)
    if spec.part == "handle":
        ring = inside & ~_part_shape_inside(spec.part_shape, sn / 0.6, tn / 0.6)
        return ring & ~body
    if spec.part == "spot":
        return inside & body
    return inside


def _texture_mask(spec: ObjectSpec, u: np.ndarray, v: np.ndarray) -> np.ndarray | None:
    if spec.texture == "plain":
        return None
    a = math.radians(spec.texture_angle)
    aa = u * math.cos(a) + v * math.sin(a)
    bb = -u * math.sin(a) + v * math.cos(a)
    period = 2.0 / max(spec.texture_freq, 0.5)
    fa, fb = aa / period, bb / period
    if spec.texture == "stripes":
        return np.mod(fa, 1.0) < 0.5
    if spec.texture == "dots":
        da, db = np.mod(fa, 1.0) - 0.5, np.mod(fb, 1.0) - 0.5
        return da * da + db * db < 0.09
    if spec.texture == "checker":
        return (np.floor(fa) + np.floor(fb)) % 2 == 0
    raise ValueError(f"unknown texture {spec.texture!r}")


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Shift with edge replication (no wrap-around)."""
    n, m = a.shape
    pad = max(abs(dy), abs(dx))
    p = np.pad(a, pad, mode="edge")
    return p[pad + dy : pad + dy + n, pad + dx : pad + dx + m]


def _reach(spec: ObjectSpec) -> float:
    """Conservative radius (in body radii) containing the whole object."""
    stretch = math.sqrt(max(spec.aspect, 1.0 / spec.aspect))
    reach = 1.3 * stretch + 0.3
    if spec.part != "none":
        rb = _boundary_radius(spec, math.radians(spec.part_angle))
        pa = math.sqrt(max(spec.part_aspect, 1.0 / spec.part_aspect))
        reach = max(reach, rb + spec.part_size * (0.5 + 1.6 * 1.3 * pa))
    return reach + 0.1


def _downsample(a: np.ndarray, ss: int) -> np.ndarray:
    """Box-average an (H*ss, W*ss[, C]) array to (H, W[, C])."""
    if ss == 1:
        return a
    acc = a[0::ss, 0::ss].copy()
    for i in range(ss):
        for j in range(ss):
            if i or j:
                acc += a[i::ss, j::ss]
    return acc / float(ss * ss)


def _render_object(
    spec: ObjectSpec, pose: Pose, size: int, crop: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render the object layer.

    Only a bounding box around the object is evaluated when ``crop`` is set
    (identical output, faster).

    Returns:
        (premultiplied colour float32 (S, S, 3), object coverage (S, S) in [0, 1],
        part coverage (S, S) in [0, 1]).
    """
    ss = _SS
    if crop:
        rad = _reach(spec) * pose.scale * size
        x0 = max(0, int(math.floor(pose.cx * size - rad)) - 1)
        x1 = min(size, int(math.ceil(pose.cx * size + rad)) + 1)
        y0 = max(0, int(math.floor(pose.cy * size - rad)) - 1)
        y1 = min(size, int(math.ceil(pose.cy * size + rad)) + 1)
    else:
        x0, x1, y0, y1 = 0, size, 0, size
    prem = np.zeros((size, size, 3), np.float32)
    alpha = np.zeros((size, size), np.float32)
    part_cov = np.zeros((size, size), np.float32)
    if x1 <= x0 or y1 <= y0:
        return prem, alpha, part_cov
    x = ((np.arange(x0 * ss, x1 * ss, dtype=np.float32) + 0.5) / (ss * size))[None, :]
    y = ((np.arange(y0 * ss, y1 * ss, dtype=np.float32) + 0.5) / (ss * size))[:, None]
    r = pose.scale
    th = math.radians(pose.rotation)
    dx, dy = (x - pose.cx) / r, (y - pose.cy) / r
    u = math.cos(th) * dx + math.sin(th) * dy
    v = -math.sin(th) * dx + math.cos(th) * dy
    body = _body_inside(spec, u, v)
    part = _part_inside(spec, u, v, body)
    label = body.astype(np.int8)
    label[part] = 2
    h, w = label.shape
    col = np.empty((h, w, 3), np.float32)
    col[...] = np.asarray(spec.body_color, np.float32)
    tex = _texture_mask(spec, u, v)
    if tex is not None:
        col[np.broadcast_to(tex, (h, w))] = np.asarray(spec.texture_color, np.float32)
    col[label == 2] = np.asarray(spec.part_color, np.float32)
    shade = np.clip(1.0 - 0.12 * (0.6 * u + 0.8 * v), 0.75, 1.2)
    col *= shade[..., None]
    # dark outline along label changes (silhouette and part boundary)
    width = max(1, int(round(ss * size / 160)))
    edge = np.zeros((h, w), bool)
    for k in range(1, width + 1):
        for sy, sx in ((k, 0), (-k, 0), (0, k), (0, -k)):
            edge |= _shift(label, sy, sx) != label
    edge &= label > 0
    col[edge] *= 0.55
    inside = (label > 0).astype(np.float32)
    alpha[y0:y1, x0:x1] = _downsample(inside, ss)
    prem[y0:y1, x0:x1] = _downsample(col * inside[..., None], ss)
    part_cov[y0:y1, x0:x1] = _downsample((label == 2).astype(np.float32), ss)
    return prem, alpha, part_cov


def _composite(bg: np.ndarray, prem: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    out = bg.astype(np.float32) * (1.0 - alpha[..., None]) + prem
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def render_view(
    spec: ObjectSpec, pose: Pose, background: Background | np.ndarray, size: int
) -> tuple[Image.Image, Image.Image]:
    """Render an object onto a background.

    Args:
        spec: The object.
        pose: Its placement.
        background: Background parameters, or an already rendered ``uint8``
            (size, size, 3) array (reuse it to render several objects into one
            background).
        size: Image side length in pixels.

    Returns:
        (RGB image, L mask with 255 on every pixel the object touches, else 0).
    """
    bg = render_background(background, size) if isinstance(background, Background) else background
    prem, alpha, _ = _render_object(spec, pose, size)
    mask = np.where(alpha > 0, 255, 0).astype(np.uint8)
    return Image.fromarray(_composite(bg, prem, alpha), "RGB"), Image.fromarray(mask, "L")


# ---------------------------------------------------------------------------
# Near-identity perturbations
# ---------------------------------------------------------------------------


def _applicable(spec: ObjectSpec, kind: str) -> bool:
    if kind in ("texture_color", "texture_freq"):
        return spec.texture != "plain"
    if kind == "texture_angle":
        return spec.texture in ("stripes", "checker", "dots")
    if kind in ("part_color", "part_position", "part_size", "part_shape"):
        return spec.part != "none"
    if kind == "sides":
        return spec.shape in ("polygon", "star")
    return kind in PERTURBATION_KINDS


def _apply(spec: ObjectSpec, kind: str, s: float, rng: np.random.Generator) -> ObjectSpec:
    if kind == "hue":
        return replace(
            spec,
            body_color=_shift_hue(
                spec.body_color, _sign(rng) * (0.035 + 0.11 * s), dv=rng.uniform(-0.08, 0.08) * (0.5 + s)
            ),
        )
    if kind == "texture_color":
        return replace(spec, texture_color=_shift_hue(spec.texture_color, _sign(rng) * (0.08 + 0.25 * s), dv=-0.1 * s))
    if kind == "part_color":
        return replace(spec, part_color=_shift_hue(spec.part_color, _sign(rng) * (0.1 + 0.3 * s), dv=_sign(rng) * 0.1 * s))
    if kind == "texture_freq":
        f = (1.25 + 0.5 * s) ** _sign(rng)
        return replace(spec, texture_freq=float(np.clip(spec.texture_freq * f, 1.2, 9.0)))
    if kind == "texture_angle":
        return replace(spec, texture_angle=spec.texture_angle + _sign(rng) * (20 + 50 * s))
    if kind == "texture_type":
        others = [t for t in TEXTURES if t != spec.texture]
        return replace(spec, texture=str(rng.choice(others)))
    if kind == "aspect":
        f = (1.15 + 0.3 * s) ** _sign(rng)
        return replace(spec, aspect=float(np.clip(spec.aspect * f, 0.5, 2.0)))
    if kind == "sides":
        lo = 5 if spec.shape == "star" else 4
        n = spec.n_sides + (1 if spec.n_sides <= lo or (spec.n_sides < 9 and rng.random() < 0.5) else -1)
        return replace(spec, n_sides=n)
    if kind == "part_position":
        return replace(spec, part_angle=spec.part_angle + _sign(rng) * (35 + 60 * s))
    if kind == "part_size":
        f = (1.3 + 0.35 * s) ** _sign(rng)
        return replace(spec, part_size=float(np.clip(spec.part_size * f, 0.14, 0.6)))
    if kind == "part_shape":
        others = [t for t in PART_SHAPES if t != spec.part_shape]
        return replace(spec, part_shape=str(rng.choice(others)))
    if kind == "part_kind":
        others = [p for p in PARTS if p not in (spec.part, "none")]
        return replace(spec, part=str(rng.choice(others)))
    raise ValueError(f"unknown perturbation kind {kind!r}")


def perturb_object(
    spec: ObjectSpec,
    rng: np.random.Generator,
    strength: float = 0.5,
    kinds: Sequence[str] | None = None,
    n_changes: int = 1,
) -> tuple[ObjectSpec, list[str]]:
    """Make a near-identity look-alike by changing one or a few attributes.

    Args:
        spec: The original object.
        rng: Source of randomness.
        strength: Magnitude of each change in [0, 1] (0 = subtle, 1 = obvious).
        kinds: Allowed kinds (subset of ``PERTURBATION_KINDS``); ``None`` = all.
            Kinds that do not apply to ``spec`` (e.g. texture changes on a plain
            object) are skipped; ``"hue"`` is the fallback.
        n_changes: Number of distinct attributes to change.

    Returns:
        (perturbed spec, list of applied kinds).
    """
    pool = [k for k in (kinds if kinds is not None else PERTURBATION_KINDS) if _applicable(spec, k)]
    if not pool:
        pool = ["hue"]
    chosen = [str(k) for k in rng.choice(pool, size=min(max(1, n_changes), len(pool)), replace=False)]
    out = spec
    for k in chosen:
        out = _apply(out, k, float(np.clip(strength, 0.0, 1.0)), rng)
    return out, chosen


def edit_part(spec: ObjectSpec, rng: np.random.Generator) -> tuple[ObjectSpec, str]:
    """MTG-style in-place part edit: recolour, reshape or resize the part.

    Args:
        spec: Object with a part (``spec.part != "none"``).
        rng: Source of randomness.

    Returns:
        (edited spec, edit kind in {"recolor", "reshape", "resize"}).
    """
    if spec.part == "none":
        raise ValueError("edit_part needs an object with a part")
    kind = str(rng.choice(["recolor", "reshape", "resize"]))
    if kind == "recolor":
        return replace(spec, part_color=_shift_hue(spec.part_color, rng.uniform(0.2, 0.8), dv=rng.uniform(-0.2, 0.2))), kind
    if kind == "reshape":
        others = [t for t in PART_SHAPES if t != spec.part_shape]
        return replace(spec, part_shape=str(rng.choice(others)), part_aspect=float(1.0 / spec.part_aspect)), kind
    f = rng.uniform(1.3, 1.6) ** _sign(rng)
    return replace(spec, part_size=float(np.clip(spec.part_size * f, 0.15, 0.6))), kind


# ---------------------------------------------------------------------------
# In-memory samples
# ---------------------------------------------------------------------------


@dataclass
class SyntheticIdentity:
    """One rendered identity with its views and per-source distractors.

    ``distractors[source][j]`` is ``(image, mask)`` rendered in view ``j``'s
    background with view ``j``'s pose, or ``None`` when missing.
    """

    identity_id: str
    spec: ObjectSpec
    poses: list[Pose]
    backgrounds: list[Background]
    views: list[Image.Image]
    masks: list[Image.Image]
    distractors: dict[str, list[tuple[Image.Image, Image.Image] | None]] = field(default_factory=dict)
    distractor_specs: dict[str, list[ObjectSpec | None]] = field(default_factory=dict)

    @property
    def category(self) -> str:
        """The identity's category (body shape)."""
        return self.spec.category


def _view_backgrounds(
    rng: np.random.Generator, n: int, kinds: Sequence[str] = BACKGROUND_KINDS
) -> list[Background]:
    """``n`` backgrounds with distinct kinds and well separated hues."""
    ks = [str(k) for k in rng.choice(list(kinds), size=n, replace=len(kinds) < n)]
    h0 = float(rng.random())
    return [random_background(rng, k, h0 + j / n + rng.uniform(-0.08, 0.08)) for j, k in enumerate(ks)]


def _resolve_n_views(n_views: int | tuple[int, int], rng: np.random.Generator) -> int:
    if isinstance(n_views, (tuple, list)):
        lo, hi = int(n_views[0]), int(n_views[1])
        return int(rng.integers(lo, hi + 1))
    return int(n_views)


def make_identity(
    index: int,
    seed: int = 0,
    n_views: int | tuple[int, int] = 3,
    image_size: int = 64,
    sources: Sequence[str | SourceConfig] = ("src_a", "src_b"),
    missing_rate: float = 0.0,
    background_kinds: Sequence[str] = BACKGROUND_KINDS,
) -> SyntheticIdentity:
    """Render identity number ``index`` (deterministic in ``(seed, index)``).

    Args:
        index: Identity index (id ``f"id{index:04d}"``).
        seed: Global seed.
        n_views: Number of views, or an inclusive (min, max) range.
        image_size: Side length in pixels.
        sources: Distractor sources (names or ``SourceConfig``).
        missing_rate: Probability that a given (source, view) distractor is missing.
        background_kinds: Background kinds to draw from.

    Returns:
        The rendered :class:`SyntheticIdentity`.
    """
    rng = np.random.default_rng([seed, index, 0])
    k = _resolve_n_views(n_views, rng)
    spec = random_object(rng)
    poses = [random_pose(rng) for _ in range(k)]
    bgs = _view_backgrounds(rng, k, background_kinds)
    bg_arrays = [render_background(b, image_size) for b in bgs]
    views, masks = zip(*(render_view(spec, p, a, image_size) for p, a in zip(poses, bg_arrays)))
    ident = SyntheticIdentity(f"id{index:04d}", spec, poses, bgs, list(views), list(masks))
    for src in sources:
        cfg = source_config(src)
        drng = np.random.default_rng([seed, index, 1, zlib.crc32(cfg.name.encode())])
        imgs: list[tuple[Image.Image, Image.Image] | None] = []
        dspecs: list[ObjectSpec | None] = []
        for j in range(k):
            missing = drng.random() < missing_rate
            nc = int(drng.integers(cfg.n_changes[0], cfg.n_changes[1] + 1))
            dspec, _ = perturb_object(spec, drng, cfg.strength, cfg.kinds, nc)
            if missing:
                imgs.append(None)
                dspecs.append(None)
            else:
                imgs.append(render_view(dspec, poses[j], bg_arrays[j], image_size))
                dspecs.append(dspec)
        ident.distractors[cfg.name] = imgs
        ident.distractor_specs[cfg.name] = dspecs
    return ident


@dataclass
class MTGSample:
    """A Mind-the-Glitch style sample: two views and their part-edited versions."""

    sample_id: str
    spec: ObjectSpec
    edited_spec: ObjectSpec
    edit_kind: str
    originals: list[Image.Image]
    inpainted: list[Image.Image]
    object_masks: list[Image.Image]
    part_masks: list[Image.Image]


def _dilate(mask: np.ndarray, r: int = 1) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= _shift(mask, dy, dx)
    return out


def make_mtg_sample(index: int, seed: int = 0, image_size: int = 64) -> MTGSample:
    """Render MTG sample number ``index`` (deterministic in ``(seed, index)``).

    The part mask of a view is the (1-px dilated) union of the original and
    edited part regions, i.e. the "inpainted" area: the edited image equals the
    original everywhere outside it.

    Args:
        index: Sample index (id ``f"mtg{index:04d}"``).
        seed: Global seed.
        image_size: Side length in pixels.

    Returns:
        The rendered :class:`MTGSample`.
    """
    rng = np.random.default_rng([seed, index, 7])
    spec = random_object(rng)
    if spec.part == "none":
        spec = replace(spec, part=str(rng.choice(PARTS[1:])))
    spec = replace(spec, part_size=float(rng.uniform(0.25, 0.5)))
    edited, kind = edit_part(spec, rng)
    poses = [random_pose(rng) for _ in range(2)]
    bgs = _view_backgrounds(rng, 2)
    out = MTGSample(f"mtg{index:04d}", spec, edited, kind, [], [], [], [])
    for pose, bgp in zip(poses, bgs):
        bg = render_background(bgp, image_size)
        prem, alpha, part0 = _render_object(spec, pose, image_size)
        prem1, alpha1, part1 = _render_object(edited, pose, image_size)
        out.originals.append(Image.fromarray(_composite(bg, prem, alpha), "RGB"))
        out.inpainted.append(Image.fromarray(_composite(bg, prem1, alpha1), "RGB"))
        out.object_masks.append(Image.fromarray(np.where(alpha > 0, 255, 0).astype(np.uint8), "L"))
        pm = _dilate((part0 > 0) | (part1 > 0), 1)
        out.part_masks.append(Image.fromarray(np.where(pm, 255, 0).astype(np.uint8), "L"))
    return out


# ---------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------


def _split_counts(n: int, splits: Mapping[str, float | int]) -> dict[str, int]:
    names = list(splits)
    vals = [splits[k] for k in names]
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals):
        counts = {k: int(v) for k, v in zip(names, vals)}
        if sum(counts.values()) != n:
            raise ValueError(f"split counts {counts} do not sum to n_identities={n}")
        return counts
    total = float(sum(float(v) for v in vals))
    if total <= 0:
        raise ValueError("split fractions must be positive")
    counts = {k: int(math.floor(float(v) / total * n)) for k, v in zip(names, vals)}
    main = "train" if "train" in counts else names[0]
    counts[main] += n - sum(counts.values())
    return counts


def write_dataset(
    root: str | Path,
    n_identities: int,
    n_views: int | tuple[int, int] = 3,
    image_size: int = 64,
    sources: Sequence[str | SourceConfig] = ("src_a", "src_b"),
    seed: int = 0,
    splits: Mapping[str, float | int] | None = None,
    missing_rate: float = 0.0,
    write_masks: bool = True,
    write_metadata: bool = True,
) -> dict:
    """Write a synthetic NearID-style dataset in the LOCAL FOLDER LAYOUT.

    Args:
        root: Output folder (created; existing files are overwritten).
        n_identities: Number of identities.
        n_views: Views per identity, or an inclusive (min, max) range such as
            ``(2, 3)`` to get a mix of 2- and 3-view identities.
        image_size: Side length of every image.
        sources: Distractor sources; each becomes ``distractors/<name>/``.
        seed: Global seed; same arguments give byte-identical files.
        splits: ``{name: fraction}`` (remainder goes to ``train``) or
            ``{name: count}`` (must sum to ``n_identities``). ``None`` uses
            ``{"train": 0.8, "val": 0.1, "test": 0.1}``; pass ``{}`` to write no
            ``splits/`` folder.
        missing_rate: Probability that a (source, view) distractor is not written.
        write_masks: Write ``mask{j}.png`` next to the views.
        write_metadata: Write ``metadata.json``.

    Returns:
        Summary dict: ``root``, ``n_identities``, ``image_size``, ``seed``,
        ``sources``, ``views_histogram`` ({n_views: count}), ``n_views_total``,
        ``n_distractors`` ({source: count}), ``splits`` ({name: size}).
    """
    root = Path(root)
    names = [source_config(s).name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate source names: {names}")
    ids: list[str] = []
    hist: dict[int, int] = {}
    n_dist = {n: 0 for n in names}
    meta: dict[str, dict] = {}
    for i in range(n_identities):
        ident = make_identity(i, seed, n_views, image_size, sources, missing_rate)
        iid = ident.identity_id
        ids.append(iid)
        d = root / "identities" / iid
        d.mkdir(parents=True, exist_ok=True)
        for j, (img, m) in enumerate(zip(ident.views, ident.masks), start=1):
            img.save(d / f"view{j}.png")
            if write_masks:
                m.save(d / f"mask{j}.png")
        hist[len(ident.views)] = hist.get(len(ident.views), 0) + 1
        for name, items in ident.distractors.items():
            dd = root / "distractors" / name / iid
            dd.mkdir(parents=True, exist_ok=True)
            for j, item in enumerate(items, start=1):
                if item is not None:
                    item[0].save(dd / f"view{j}.png")
                    n_dist[name] += 1
        meta[iid] = {
            "category": ident.category,
            "category_description": ident.spec.describe(),
            "n_views": len(ident.views),
        }
    split_sizes: dict[str, int] = {}
    splits = {"train": 0.8, "val": 0.1, "test": 0.1} if splits is None else splits
    if splits:
        counts = _split_counts(n_identities, splits)
        order = np.random.default_rng([seed, 999_983]).permutation(n_identities)
        (root / "splits").mkdir(parents=True, exist_ok=True)
        start = 0
        for name, c in counts.items():
            members = sorted(ids[int(k)] for k in order[start : start + c])
            start += c
            (root / "splits" / f"{name}.json").write_text(json.dumps(members, indent=0) + "\n")
            split_sizes[name] = c
    if write_metadata:
        root.mkdir(parents=True, exist_ok=True)
        (root / "metadata.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return {
        "root": str(root),
        "n_identities": n_identities,
        "image_size": image_size,
        "seed": seed,
        "sources": names,
        "views_histogram": dict(sorted(hist.items())),
        "n_views_total": int(sum(k * v for k, v in hist.items())),
        "n_distractors": n_dist,
        "splits": split_sizes,
    }


def write_mtg(root: str | Path, n: int, image_size: int = 64, seed: int = 0) -> dict:
    """Write ``n`` MTG-style part-edit samples (layout in the module docstring).

    Args:
        root: Output folder; one sub-folder per sample id.
        n: Number of samples.
        image_size: Side length of every image.
        seed: Global seed.

    Returns:
        Summary dict: ``root``, ``n``, ``image_size``, ``seed``, ``sample_ids``,
        ``edit_kinds`` ({kind: count}).
    """
    root = Path(root)
    kinds: dict[str, int] = {}
    sids: list[str] = []
    for i in range(n):
        s = make_mtg_sample(i, seed, image_size)
        d = root / s.sample_id
        d.mkdir(parents=True, exist_ok=True)
        for v in range(2):
            s.originals[v].save(d / f"image_{v + 1}_original.png")
            s.inpainted[v].save(d / f"image_{v + 1}_inpainted.png")
            s.object_masks[v].save(d / f"image_{v + 1}_object_mask.png")
            s.part_masks[v].save(d / f"image_{v + 1}_part_mask.png")
        kinds[s.edit_kind] = kinds.get(s.edit_kind, 0) + 1
        sids.append(s.sample_id)
    return {"root": str(root), "n": n, "image_size": image_size, "seed": seed, "sample_ids": sids, "edit_kinds": kinds}


def write_examples(out_dir: str | Path, image_size: int = 384, seed: int = 0) -> dict[str, Path]:
    """Write a small human-facing example set.

    Files: ``reference.png`` (view 1 of an identity), ``candidates/same_identity.png``
    (view 2, other background and pose), ``candidates/near_identity.png`` (a
    look-alike in exactly the background and pose of ``same_identity.png``) and
    ``candidates/different_object.png`` (an unrelated object on its own
    background). Backgrounds are restricted to smooth/flat kinds so each PNG
    stays small.

    Args:
        out_dir: Output folder.
        image_size: Side length of every image.
        seed: Seed selecting the identity.

    Returns:
        ``{"reference", "same_identity", "near_identity", "different_object"}`` -> path.
    """
    out_dir = Path(out_dir)
    kinds = ("linear", "radial", "rectangles", "stripes", "horizon")
    src = SourceConfig("example", 0.5, ("hue", "texture_color", "part_color", "texture_freq", "part_shape"), (1, 2))
    ident = make_identity(0, seed, 2, image_size, [src], 0.0, kinds)
    rng = np.random.default_rng([seed, 0, 3])
    other = random_object(rng)
    while other.shape == ident.spec.shape:
        other = random_object(rng)
    other_img, _ = render_view(other, random_pose(rng), random_background(rng, str(rng.choice(kinds))), image_size)
    near = ident.distractors["example"][1]
    assert near is not None
    paths = {
        "reference": out_dir / "reference.png",
        "same_identity": out_dir / "candidates" / "same_identity.png",
        "near_identity": out_dir / "candidates" / "near_identity.png",
        "different_object": out_dir / "candidates" / "different_object.png",
    }
    images = {
        "reference": ident.views[0],
        "same_identity": ident.views[1],
        "near_identity": near[0],
        "different_object": other_img,
    }
    (out_dir / "candidates").mkdir(parents=True, exist_ok=True)
    for k, p in paths.items():
        images[k].save(p, optimize=True)
    return paths


def spec_to_dict(spec: ObjectSpec) -> dict:
    """JSON-friendly dict of an :class:`ObjectSpec` (tuples become lists)."""
    return json.loads(json.dumps(asdict(spec)))
