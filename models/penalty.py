"""Offline out-of-distribution images for the penalty loss (SPACE_SPEC §1.6.2) without ImageNet.

Owns :class:`PenaltySource`. Sources, mixed uniformly: procedural images (multi-scale colour noise,
random shapes and stripes), scikit-image's bundled photos that no synthetic product line uses
(astronaut, rocket, Hubble deep field, immunohistochemistry, colour wheel, clock, page, text, moon,
cell; only when scikit-image is installed), and optionally a user folder of images. Each draw gets a
random crop, flip and grayscale (p = 0.3), as in the paper's pretraining-image transform.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import structlog

from models.preprocess import prepare_image

log = structlog.get_logger(__name__)

SKIMAGE_PHOTOS = (
    "astronaut",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "colorwheel",
    "clock",
    "page",
    "text",
    "moon",
    "cell",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _bundled_photos() -> list[np.ndarray]:
    try:
        import skimage.data as skdata
    except ImportError:
        return []
    photos = []
    for name in SKIMAGE_PHOTOS:
        try:
            img = np.asarray(getattr(skdata, name)())
        except Exception as exc:  # noqa: BLE001 - a missing bundled file just shrinks the pool
            log.debug("penalty_photo_unavailable", name=name, error=str(exc))
            continue
        photos.append(prepare_image(img.astype(np.uint8), img.shape[:2]))
    return photos


class PenaltySource:
    """Draws penalty images (N, H, W, 3) uint8 at the model input size."""

    def __init__(self, size_hw: tuple[int, int], mode: str = "auto") -> None:
        """Set up the pool.

        Args:
            size_hw: model input size.
            mode: ``"auto"`` (procedural + bundled photos), ``"procedural"``, ``"none"`` (penalty off)
                or a folder of images (used together with the procedural images).
        """
        self.size_hw = size_hw
        self.mode = mode
        self.photos: list[np.ndarray] = []
        if mode == "auto":
            self.photos = _bundled_photos()
        elif mode not in ("procedural", "none"):
            folder = Path(mode)
            files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            for f in files:
                img = cv2.imread(str(f), cv2.IMREAD_COLOR)
                if img is not None:
                    self.photos.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
            if not self.photos:
                raise ValueError(f"penalty folder {folder} holds no readable image")
        log.debug("penalty_source", mode=mode, photos=len(self.photos))

    @property
    def enabled(self) -> bool:
        """False when the penalty is switched off."""
        return self.mode != "none"

    @property
    def description(self) -> str:
        """Short text for the model card."""
        if self.mode == "none":
            return "none"
        return f"procedural+{len(self.photos)} photos ({self.mode})"

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` images."""
        return np.stack([self._one(rng) for _ in range(n)])

    def _one(self, rng: np.random.Generator) -> np.ndarray:
        h, w = self.size_hw
        use_photo = self.photos and rng.random() < 0.5
        img = self._photo(rng) if use_photo else self._procedural(rng)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        if rng.random() < 0.3:
            g = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
            img = np.repeat(g[:, :, None], 3, axis=2)
        return np.ascontiguousarray(img).reshape(h, w, 3)

    def _photo(self, rng: np.random.Generator) -> np.ndarray:
        src = self.photos[int(rng.integers(len(self.photos)))]
        sh, sw = src.shape[:2]
        frac = rng.uniform(0.3, 1.0)
        ch, cw = max(8, int(sh * frac)), max(8, int(sw * frac))
        y, x = int(rng.integers(sh - ch + 1)), int(rng.integers(sw - cw + 1))
        return prepare_image(src[y : y + ch, x : x + cw], self.size_hw)

    def _procedural(self, rng: np.random.Generator) -> np.ndarray:
        h, w = self.size_hw
        kind = int(rng.integers(3))
        if kind == 0:  # multi-scale colour noise
            img = np.zeros((h, w, 3), np.float32)
            for scale in (4, 16, 64):
                small = rng.random((max(1, h // scale), max(1, w // scale), 3)).astype(np.float32)
                img += cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) * rng.uniform(0.2, 1.0)
            img = (img - img.min()) / max(float(np.ptp(img)), 1e-6) * 255
            return img.astype(np.uint8)
        img = np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8)
        if kind == 1:  # random shapes
            for _ in range(int(rng.integers(5, 30))):
                color = tuple(int(c) for c in rng.integers(0, 256, 3))
                p1 = (int(rng.integers(w)), int(rng.integers(h)))
                p2 = (int(rng.integers(w)), int(rng.integers(h)))
                if rng.random() < 0.5:
                    cv2.rectangle(img, p1, p2, color, -1 if rng.random() < 0.5 else int(rng.integers(1, 5)))
                else:
                    cv2.circle(img, p1, int(rng.integers(2, max(3, h // 3))), color, -1)
            return img
        period = rng.uniform(3, h / 4)  # stripes at a random angle
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ang = rng.uniform(0, np.pi)
        wave = 0.5 + 0.5 * np.sin((xx * np.cos(ang) + yy * np.sin(ang)) * 2 * np.pi / period)
        colors = rng.integers(0, 256, (2, 3)).astype(np.float32)
        return (wave[..., None] * colors[0] + (1 - wave[..., None]) * colors[1]).astype(np.uint8)
