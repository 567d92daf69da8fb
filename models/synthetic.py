"""Synthetic product lines: scikit-image's bundled CC0 images as "good" parts, with drawn defects.

No industrial image set ships with any wheel and nothing may be downloaded, so tests and the demo
build MVTec-layout datasets from ``skimage.data`` textures (brick, grass, gravel) and objects (coins,
retina). Good images vary like real captures (crop position or a small pose change, brightness and
contrast jitter, sensor noise). Defects are scratches, cracks, holes, stains and missing pieces,
each composited as ``out = image * (1 - alpha) + target * alpha`` from an anti-aliased alpha map.

Ground truth is pixel-exact by construction: alpha below :data:`ALPHA_MIN` is set to zero, the mask
is ``alpha > 0``, and pixels outside the mask are copied bit for bit from the input. A drawn defect
is kept only if most of its mask pixels visibly changed, so no label hides an invisible defect.

scikit-image is a ``demo``/``dev`` extra: it is imported inside the functions that need it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

__all__ = [
    "ALPHA_MIN",
    "DEFECT_KINDS",
    "PRODUCT_LINES",
    "LineSpec",
    "build_product_line",
    "draw_defect",
    "render_defect_image",
    "render_good_image",
]

DEFECT_KINDS: tuple[str, ...] = ("scratch", "crack", "hole", "stain", "missing")
ALPHA_MIN = 0.1  # alpha below this is dropped, so the mask is exactly the pixels the defect touched
_SUPERSAMPLE = 4  # shapes are drawn at 4x and area-averaged: anti-aliased edges, sub-pixel geometry
_VISIBLE_DELTA = 8  # a pixel "visibly changed" when a channel moved by at least this many levels
_MIN_VISIBLE_FRACTION = 0.5
_MAX_ATTEMPTS = 25
_MARKER = ".space-synthetic.json"

Layer = tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]  # (alpha (H, W), target(image) -> image)


@dataclass(frozen=True)
class LineSpec:
    """One synthetic product line.

    Attributes:
        name: Line name, also the dataset folder name.
        source: ``skimage.data`` function giving the base image.
        kind: ``texture`` (random crops of a large surface) or ``object`` (whole image, small pose change).
        tint: RGB gains applied to gray sources so lines do not all look alike.
        foreground_min: Gray level above which a pixel belongs to the product (defects land there);
            ``None`` means the whole image is product.
        background: Fill colour of missing pieces; ``None`` derives a contrasting flat colour.
        defects: Defect kinds drawn for this line by default.
        description: One line for humans.
    """

    name: str
    source: str
    kind: Literal["texture", "object"]
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    foreground_min: int | None = None
    background: tuple[int, int, int] | None = None
    defects: tuple[str, ...] = DEFECT_KINDS
    description: str = ""


PRODUCT_LINES: dict[str, LineSpec] = {
    spec.name: spec
    for spec in (
        LineSpec("brick", "brick", "texture", tint=(1.0, 0.82, 0.7), description="brick wall texture"),
        LineSpec("grass", "grass", "texture", tint=(0.8, 1.0, 0.72), description="woven-like grass texture"),
        LineSpec("gravel", "gravel", "texture", description="granular gravel surface"),
        LineSpec("coins", "coins", "object", description="coins on a tray, fixtured"),
        LineSpec(
            "retina",
            "retina",
            "object",
            foreground_min=30,
            background=(0, 0, 0),
            description="round colour object on black (fundus photo)",
        ),
    )
}


# ---------------------------------------------------------------------------------------------
# Source images and good-image rendering


def _skimage_data() -> object:
    try:
        import skimage.data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("synthetic product lines need scikit-image (pip install 'space-worker[demo]')") from exc
    return skimage.data


@functools.lru_cache(maxsize=16)
def _source_rgb(source: str) -> np.ndarray:
    image = np.asarray(getattr(_skimage_data(), source)())
    if image.dtype != np.uint8:
        image = (image > 0).astype(np.uint8) * 255 if image.dtype == bool else image.astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = image[:, :, :3]
    image.setflags(write=False)
    return image


@functools.lru_cache(maxsize=16)
def _object_base(source: str, size: int) -> np.ndarray:
    """Centre square crop of an object source, resized once to ``size``."""
    image = _source_rgb(source)
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top : top + side, left : left + side]
    base = cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
    base.setflags(write=False)
    return base


def _spec(name: str) -> LineSpec:
    try:
        return PRODUCT_LINES[name]
    except KeyError:
        raise ValueError(f"unknown product line {name!r}; known: {', '.join(sorted(PRODUCT_LINES))}") from None


def _pose(spec: LineSpec, size: int, rng: np.random.Generator) -> np.ndarray:
    if spec.kind == "texture":
        source = _source_rgb(spec.source)
        h, w = source.shape[:2]
        side = int(min(h, w) * rng.uniform(0.5, 0.6))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        crop = source[top : top + side, left : left + side]
        return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    base = _object_base(spec.source, size)
    angle = rng.uniform(-2.0, 2.0)
    scale = rng.uniform(0.97, 1.03)
    matrix = np.asarray(cv2.getRotationMatrix2D((size / 2 - 0.5, size / 2 - 0.5), angle, scale), np.float64)
    matrix[:, 2] += rng.uniform(-0.02, 0.02, size=2) * size
    border = cv2.BORDER_REFLECT_101 if spec.background is None else cv2.BORDER_CONSTANT
    value = spec.background or (0, 0, 0)
    return cv2.warpAffine(base, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=border, borderValue=value)


def render_good_image(name: str, rng: np.random.Generator, *, size: int = 256) -> np.ndarray:
    """Render one defect-free image of a product line.

    Args:
        name: Key of :data:`PRODUCT_LINES`.
        rng: Randomness for pose, photometric jitter and noise.
        size: Output side in pixels.

    Returns:
        ``(size, size, 3)`` uint8 RGB.
    """
    spec = _spec(name)
    image = _pose(spec, size, rng).astype(np.float32) * np.asarray(spec.tint, dtype=np.float32)
    mean = float(image.mean())
    contrast = rng.uniform(0.93, 1.07)
    brightness = rng.uniform(-8.0, 8.0)
    image = (image - mean) * contrast + mean + brightness
    image += rng.normal(0.0, rng.uniform(1.0, 2.5), size=image.shape).astype(np.float32)
    if spec.foreground_min is not None and spec.background is not None:
        # Keep the true background flat: noise there would be drawn as product texture.
        image[image.mean(axis=2) < spec.foreground_min / 2] = spec.background
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _product_region(spec: LineSpec, image: np.ndarray) -> np.ndarray | None:
    """Pixels where defects may be drawn (the product, eroded a little), or ``None`` for all."""
    if spec.foreground_min is None:
        return None
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    region = cv2.erode((gray >= spec.foreground_min).astype(np.uint8), np.ones((7, 7), np.uint8))
    return np.asarray(region > 0)


def render_defect_image(
    name: str, kind: str, rng: np.random.Generator, *, size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Render one defective image of a product line and its pixel-exact mask.

    Args:
        name: Key of :data:`PRODUCT_LINES`.
        kind: One of :data:`DEFECT_KINDS`.
        rng: Randomness for the good image and the defect.
        size: Output side in pixels.

    Returns:
        ``(image, mask)``: ``(size, size, 3)`` uint8 RGB and ``(size, size)`` bool.
    """
    spec = _spec(name)
    good = render_good_image(name, rng, size=size)
    return draw_defect(good, kind, rng, region=_product_region(spec, good), background=spec.background)


# ---------------------------------------------------------------------------------------------
# Shape rasterisation


def _raster(
    shape_hw: tuple[int, int], draw: Callable[[np.ndarray, Callable[[np.ndarray], np.ndarray]], None]
) -> np.ndarray:
    """Draw at ``_SUPERSAMPLE`` x resolution and area-average: an anti-aliased alpha in [0, 1].

    ``draw(canvas, to_canvas)`` gets a uint8 canvas and a function mapping (N, 2) pixel coordinates
    (x, y; pixel centres at integers) to int32 canvas coordinates.
    """
    h, w = shape_hw
    s = _SUPERSAMPLE
    canvas = np.zeros((h * s, w * s), np.uint8)

    def to_canvas(points: np.ndarray) -> np.ndarray:
        return np.rint((np.asarray(points, dtype=np.float64) + 0.5) * s - 0.5).astype(np.int32)

    draw(canvas, to_canvas)
    return canvas.reshape(h, s, w, s).mean(axis=(1, 3), dtype=np.float32) / 255.0


def _polyline_alpha(shape_hw: tuple[int, int], lines: Sequence[np.ndarray], width_px: float) -> np.ndarray:
    thickness = max(1, round(width_px * _SUPERSAMPLE))

    def draw(canvas: np.ndarray, to_canvas: Callable[[np.ndarray], np.ndarray]) -> None:
        pts = [to_canvas(line).reshape(-1, 1, 2) for line in lines]
        cv2.polylines(canvas, pts, isClosed=False, color=255, thickness=thickness, lineType=cv2.LINE_8)

    return _raster(shape_hw, draw)


def _polygon_alpha(shape_hw: tuple[int, int], polygon: np.ndarray) -> np.ndarray:
    def draw(canvas: np.ndarray, to_canvas: Callable[[np.ndarray], np.ndarray]) -> None:
        cv2.fillPoly(canvas, [to_canvas(polygon).reshape(-1, 1, 2)], color=255, lineType=cv2.LINE_8)

    return _raster(shape_hw, draw)


def _ellipse_polygon(center: np.ndarray, axes: tuple[float, float], angle: float, n: int = 96) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    x, y = axes[0] * np.cos(t), axes[1] * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([center[0] + c * x - s * y, center[1] + s * x + c * y], axis=1)


def _bezier(points: np.ndarray, n: int = 64) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    p0, p1, p2, p3 = points
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3


def _sample_point(shape_hw: tuple[int, int], region: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    h, w = shape_hw
    if region is not None and region.any():
        ys, xs = np.nonzero(region)
        i = int(rng.integers(0, len(xs)))
        return np.array([xs[i], ys[i]], dtype=np.float64) + rng.uniform(-0.5, 0.5, size=2)
    margin = 0.12 * min(h, w)
    return np.array([rng.uniform(margin, w - 1 - margin), rng.uniform(margin, h - 1 - margin)])


# ---------------------------------------------------------------------------------------------
# Defect kinds: each returns the layers to composite, bottom first


def _darker(low: float, high: float, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    gain = rng.uniform(low, high)
    return lambda image: image * gain


def _brighter(low: float, high: float, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    mix = rng.uniform(low, high)
    return lambda image: image + (255.0 - image) * mix


def _scratch(shape_hw: tuple[int, int], rng: np.random.Generator, center: np.ndarray) -> list[Layer]:
    size = min(shape_hw)
    length = rng.uniform(0.15, 0.45) * size
    angle = rng.uniform(0.0, np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    p0, p3 = center - direction * length / 2, center + direction * length / 2
    bends = rng.normal(0.0, 0.12 * length, size=2)
    p1 = p0 + (p3 - p0) / 3 + normal * bends[0]
    p2 = p0 + 2 * (p3 - p0) / 3 + normal * bends[1]
    curve = _bezier(np.stack([p0, p1, p2, p3]))
    alpha = _polyline_alpha(shape_hw, [curve], rng.uniform(1.0, 2.5)) * rng.uniform(0.85, 1.0)
    target = _darker(0.25, 0.45, rng) if rng.random() < 0.5 else _brighter(0.6, 0.85, rng)
    return [(alpha, target)]


def _crack(shape_hw: tuple[int, int], rng: np.random.Generator, center: np.ndarray) -> list[Layer]:
    size = min(shape_hw)
    step = size / 45.0

    def walk(start: np.ndarray, heading: float, steps: int) -> np.ndarray:
        points = [start]
        for _ in range(steps):
            heading += rng.normal(0.0, 0.35)
            points.append(points[-1] + step * rng.uniform(0.6, 1.4) * np.array([np.cos(heading), np.sin(heading)]))
        return np.stack(points)

    heading = rng.uniform(0.0, 2 * np.pi)
    trunk = np.concatenate([walk(center, heading, int(rng.integers(6, 12)))[::-1], walk(center, heading + np.pi, 6)])
    lines = [trunk]
    for _ in range(int(rng.integers(1, 3))):
        fork = trunk[int(rng.integers(1, len(trunk) - 1))]
        lines.append(walk(fork, rng.uniform(0.0, 2 * np.pi), int(rng.integers(3, 7))))
    alpha = _polyline_alpha(shape_hw, lines, rng.uniform(1.0, 2.0))
    return [(alpha, _darker(0.15, 0.35, rng))]


def _hole(shape_hw: tuple[int, int], rng: np.random.Generator, center: np.ndarray) -> list[Layer]:
    size = min(shape_hw)
    a = rng.uniform(0.03, 0.07) * size
    axes = (a, a * rng.uniform(0.7, 1.0))
    angle = rng.uniform(0.0, np.pi)
    rim = rng.uniform(2.0, 4.0)
    core = _polygon_alpha(shape_hw, _ellipse_polygon(center, axes, angle))
    offset = center + rng.uniform(-1.5, 1.5, size=2)
    shadow = _polygon_alpha(shape_hw, _ellipse_polygon(offset, (axes[0] + rim, axes[1] + rim), angle))
    shadow = cv2.GaussianBlur(shadow, (0, 0), rim / 2) * 0.75
    depth = rng.uniform(12.0, 40.0)
    noise = rng.normal(0.0, 3.0, size=(*shape_hw, 1)).astype(np.float32)
    return [(shadow, _darker(0.45, 0.6, rng)), (core, lambda image: np.full_like(image, depth) + noise)]


_STAIN_TINTS = ((0.72, 0.5, 0.3), (0.85, 0.45, 0.25), (0.45, 0.45, 0.5), (0.45, 0.55, 0.95), (0.6, 0.8, 0.4))


def _stain(shape_hw: tuple[int, int], rng: np.random.Generator, center: np.ndarray) -> list[Layer]:
    h, w = shape_hw
    size = min(shape_hw)
    radius = rng.uniform(0.04, 0.09) * size
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    field = np.zeros(shape_hw, np.float32)
    for _ in range(int(rng.integers(3, 7))):
        cx, cy = center + rng.normal(0.0, 0.6 * radius, size=2)
        sigma = rng.uniform(0.4, 0.9) * radius
        field += np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))
    blob = (field > 0.6).astype(np.float32)
    alpha = cv2.GaussianBlur(blob, (0, 0), rng.uniform(1.5, 3.0)) * rng.uniform(0.5, 0.85)
    if rng.random() < 0.25:
        return [(alpha, _brighter(0.5, 0.7, rng))]
    tint = np.asarray(_STAIN_TINTS[int(rng.integers(0, len(_STAIN_TINTS)))], dtype=np.float32)
    return [(alpha, lambda image: image * tint)]


def _missing(
    shape_hw: tuple[int, int],
    rng: np.random.Generator,
    center: np.ndarray,
    background: tuple[int, int, int] | None,
) -> list[Layer]:
    size = min(shape_hw)
    n = int(rng.integers(6, 11))
    angles = np.sort(rng.uniform(0.0, 2 * np.pi, size=n))
    radii = rng.uniform(0.05, 0.11) * size * rng.uniform(0.6, 1.0, size=n)
    polygon = center + np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)
    alpha = _polygon_alpha(shape_hw, polygon)
    noise = rng.normal(0.0, 2.0, size=(*shape_hw, 1)).astype(np.float32)

    def fill(image: np.ndarray) -> np.ndarray:
        if background is not None:
            return np.broadcast_to(np.asarray(background, np.float32), image.shape) + noise
        inside = image[alpha > 0]
        mean = inside.mean(axis=0) if inside.size else image.reshape(-1, 3).mean(axis=0)
        level = float(mean.mean())
        flat = level - 90.0 if level > 110.0 else level + 90.0  # a blank with clear contrast
        return np.full_like(image, flat) + noise

    return [(alpha, fill)]


def _layers(
    kind: str,
    shape_hw: tuple[int, int],
    rng: np.random.Generator,
    region: np.ndarray | None,
    background: tuple[int, int, int] | None,
) -> list[Layer]:
    center = _sample_point(shape_hw, region, rng)
    if kind == "scratch":
        return _scratch(shape_hw, rng, center)
    if kind == "crack":
        return _crack(shape_hw, rng, center)
    if kind == "hole":
        return _hole(shape_hw, rng, center)
    if kind == "stain":
        return _stain(shape_hw, rng, center)
    return _missing(shape_hw, rng, center, background)


def _composite(image: np.ndarray, layers: Sequence[Layer], region: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Blend layers over ``image``; exact outside the mask, where the input is copied unchanged."""
    work = image.astype(np.float32)
    mask = np.zeros(image.shape[:2], bool)
    for alpha, target in layers:
        a = alpha if region is None else alpha * region
        a = np.where(a >= ALPHA_MIN, np.minimum(a, 1.0), 0.0).astype(np.float32)
        layer_mask = a > 0
        if not layer_mask.any():
            continue
        goal = np.clip(target(work), 0.0, 255.0)
        work = np.where(layer_mask[:, :, None], work * (1.0 - a[:, :, None]) + goal * a[:, :, None], work)
        mask |= layer_mask
    out = np.clip(np.rint(work), 0, 255).astype(np.uint8)
    out[~mask] = image[~mask]
    return out, mask


def draw_defect(
    image: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    *,
    region: np.ndarray | None = None,
    background: tuple[int, int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect on a copy of ``image`` and return it with its pixel-exact mask.

    Args:
        image: ``(H, W, 3)`` RGB or ``(H, W)`` gray uint8.
        kind: One of :data:`DEFECT_KINDS`.
        rng: Randomness for placement and appearance.
        region: Optional ``(H, W)`` bool map of where the defect may be (the product); the defect
            is clipped to it.
        background: Fill colour for ``missing``; by default a flat colour contrasting with the part.

    Returns:
        ``(defective, mask)``: same shape and dtype as ``image``, and an ``(H, W)`` bool mask that is
        exactly the set of pixels the defect may have altered; every pixel outside it is unchanged.

    Raises:
        ValueError: Unknown kind, bad image, or no visible defect could be drawn (e.g. a dark crack
            on a black image).
    """
    if kind not in DEFECT_KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; known: {', '.join(DEFECT_KINDS)}")
    source = np.asarray(image)
    if source.dtype != np.uint8 or source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] != 3):
        raise ValueError(f"image must be (H, W) or (H, W, 3) uint8, got {source.shape} {source.dtype}")
    rgb = source if source.ndim == 3 else np.repeat(source[:, :, None], 3, axis=2)
    shape_hw = rgb.shape[:2]
    region_f = None if region is None else np.asarray(region, bool).astype(np.float32)
    for _ in range(_MAX_ATTEMPTS):
        out, mask = _composite(rgb, _layers(kind, shape_hw, rng, region, background), region_f)
        if source.ndim == 2:
            out = cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)
            out[~mask] = source[~mask]
        if _is_visible(source, out, mask):
            return out, mask
    raise ValueError(f"could not draw a visible {kind!r} defect on this image in {_MAX_ATTEMPTS} attempts")


def _is_visible(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> bool:
    count = int(mask.sum())
    if count < 6 or count > 0.25 * mask.size:
        return False
    delta = np.abs(after.astype(np.int16) - before.astype(np.int16))
    if delta.ndim == 3:
        delta = delta.max(axis=2)
    return float((delta[mask] >= _VISIBLE_DELTA).mean()) >= _MIN_VISIBLE_FRACTION


# ---------------------------------------------------------------------------------------------
# Dataset writer


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    words = [seed] + [zlib.crc32(k.encode()) if isinstance(k, str) else k for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


def _write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    ok, encoded = cv2.imencode(".png", data)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 array
        raise OSError(f"cannot encode {path}")
    path.write_bytes(encoded.tobytes())


def _split_counts(total: int, kinds: Sequence[str]) -> dict[str, int]:
    base, extra = divmod(total, len(kinds))
    return {kind: base + (1 if i < extra else 0) for i, kind in enumerate(kinds)}


def _check_args(name: str, counts: Sequence[int], size: int, defect_types: Sequence[str] | None) -> list[str]:
    spec = _spec(name)
    if any(n < 0 for n in counts):
        raise ValueError("image counts must be >= 0")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    kinds = list(spec.defects if defect_types is None else defect_types)
    unknown = [k for k in kinds if k not in DEFECT_KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"defect_types must be distinct kinds from {DEFECT_KINDS}, got {kinds}")
    return kinds


def build_product_line(
    name: str,
    out_dir: Path,
    *,
    n_train: int = 40,
    n_val: int = 10,
    n_test_good: int = 10,
    n_test_defect: int = 20,
    size: int = 256,
    seed: int = 0,
    defect_types: Sequence[str] | None = None,
) -> Path:
    """Write an MVTec-layout dataset for one product line.

    Layout under ``out_dir/<name>/``: ``train/good``, ``validation/good``, ``test/good``,
    ``test/<defect>`` and ``ground_truth/<defect>/<stem>_mask.png`` (0/255 PNG), images ``000.png``...
    ``n_test_defect`` is the total number of defective test images, spread evenly over the defect
    types. Output is byte-identical for the same arguments; each image has its own random stream,
    so changing one count does not change the other splits. A folder previously written by this
    function is replaced; any other non-empty folder at that place is left alone and is an error.

    Args:
        name: Key of :data:`PRODUCT_LINES`.
        out_dir: Parent folder.
        n_train: Good training images.
        n_val: Good validation images.
        n_test_good: Good test images.
        n_test_defect: Defective test images in total.
        size: Image side in pixels.
        seed: Base seed.
        defect_types: Defect kinds to draw; defaults to the line's kinds.

    Returns:
        The dataset folder ``out_dir/<name>``.

    Raises:
        ValueError: Unknown line or defect kind, negative counts, or a size below 32.
        FileExistsError: ``out_dir/<name>`` exists, is not empty and was not written by this function.
    """
    kinds = _check_args(name, (n_train, n_val, n_test_good, n_test_defect), size, defect_types)
    target = Path(out_dir) / name
    if target.exists() and any(target.iterdir()) and not (target / _MARKER).is_file():
        raise FileExistsError(f"{target} exists and was not written by build_product_line; not replacing it")
    staging = Path(out_dir) / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    for split, folder, count in (
        ("train", "train/good", n_train),
        ("validation", "validation/good", n_val),
        ("test-good", "test/good", n_test_good),
    ):
        for i in range(count):
            _write_png(
                staging / folder / f"{i:03d}.png",
                render_good_image(name, _rng(seed, name, split, i), size=size),
            )
    for kind, count in _split_counts(n_test_defect, kinds).items():
        for i in range(count):
            image, mask = render_defect_image(name, kind, _rng(seed, name, "test", kind, i), size=size)
            _write_png(staging / "test" / kind / f"{i:03d}.png", image)
            _write_png(staging / "ground_truth" / kind / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
    record = {
        "spec": asdict(PRODUCT_LINES[name]),
        "counts": {
            "train": n_train,
            "validation": n_val,
            "test_good": n_test_good,
            "test_defect": n_test_defect,
        },
        "size": size,
        "seed": seed,
        "defect_types": kinds,
    }
    staging.mkdir(parents=True, exist_ok=True)
    (staging / _MARKER).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target
