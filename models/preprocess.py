"""Image preparation shared by training and the runtime: any uint8 image -> RGB uint8 at the model size.

One function so the worker, training and evaluation resize identically (cv2.INTER_AREA, as the
architecture contract states).
"""

from __future__ import annotations

import cv2
import numpy as np


def prepare_image(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Convert gray (HxW, HxWx1), RGB (HxWx3) or RGBA (HxWx4) uint8 of any size to ``size_hw`` RGB uint8.

    Raises:
        ValueError: wrong dtype, rank or channel count, or an empty image.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 numpy image, got {type(image).__name__} {getattr(image, 'dtype', '')}"
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected HxW, HxWx1, HxWx3 or HxWx4, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image of shape {image.shape}")
    image = image[:, :, :3]
    h, w = size_hw
    if image.shape[:2] != (h, w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image)
