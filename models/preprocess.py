"""Image preparation shared by training and the runtime: any uint8 image -> RGB uint8 at the model size.

One function so the worker, training and evaluation resize identically (cv2.INTER_AREA, as the
architecture contract states).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import cv2
import numpy as np
import torch


def prepare_image(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Convert gray (HxW, HxWx1), RGB (HxWx3) or RGBA (HxWx4) uint8 of any size to ``size_hw`` RGB uint8.

    Raises:
        ValueError: wrong dtype, rank or channel count, or an empty image.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 numpy image, got {type(image).__name__} {getattr(image, 'dtype', '')}")
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


def _axis_weights(src: int, dst: int, *, area: bool) -> np.ndarray:
    """(dst, src) float64 weights resizing one axis the way ``cv2.INTER_AREA`` does.

    ``area``: exact pixel-overlap averages (OpenCV uses them when neither axis grows). Otherwise
    OpenCV's two-tap "area upscale" filter: left source pixel floor(i * src/dst), weight of the
    right neighbour = the fraction of destination pixel i that lies past that pixel's boundary.
    """
    weights = np.zeros((dst, src), np.float64)
    scale = src / dst
    if area:
        for i in range(dst):
            lo, hi = i * scale, (i + 1) * scale
            for j in range(int(np.floor(lo)), min(int(np.ceil(hi)), src)):
                weights[i, j] = (min(hi, j + 1) - max(lo, j)) / scale
        return weights
    for i in range(dst):
        left = int(np.floor(i * scale))
        frac = (i + 1) - (left + 1) / scale
        frac = 0.0 if frac <= 0 else frac - np.floor(frac)
        if left < 0:
            left, frac = 0, 0.0
        if left >= src - 1:
            left, frac = src - 1, 0.0
        weights[i, left] += 1 - frac
        if frac:
            weights[i, left + 1] += frac
    return weights


#: Device memory the resize matrices of recently seen image sizes may keep. One size costs
#: 4 x 256 x (H + W) bytes at 256 px (4.6 MB for a 2448x2048 camera); a plant has a few sizes, but
#: 64 distinct 65500x610 images (within the pixel limit) would have kept 4 GiB with a count bound.
RESIZE_CACHE_BYTES = 256 * 1024 * 1024

_MatrixKey = tuple[tuple[int, int], tuple[int, int], str]
_resize_cache: OrderedDict[_MatrixKey, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_resize_cache_lock = threading.Lock()


def _matrix_bytes(matrices: tuple[torch.Tensor, torch.Tensor]) -> int:
    return sum(m.numel() * m.element_size() for m in matrices)


def _resize_matrices(
    src_hw: tuple[int, int], dst_hw: tuple[int, int], device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (rows, cols) weights for a size, from a least-recently-used cache bounded by :data:`RESIZE_CACHE_BYTES`."""
    key = (src_hw, dst_hw, device)
    with _resize_cache_lock:
        found = _resize_cache.get(key)
        if found is not None:
            _resize_cache.move_to_end(key)
            return found
    area = dst_hw[0] <= src_hw[0] and dst_hw[1] <= src_hw[1]
    rows = torch.from_numpy(_axis_weights(src_hw[0], dst_hw[0], area=area)).float().to(device)
    cols = torch.from_numpy(_axis_weights(src_hw[1], dst_hw[1], area=area)).float().T.contiguous().to(device)
    made = (rows, cols)
    with _resize_cache_lock:
        _resize_cache[key] = made
        total = sum(_matrix_bytes(m) for m in _resize_cache.values())
        while total > RESIZE_CACHE_BYTES and len(_resize_cache) > 1:
            _, dropped = _resize_cache.popitem(last=False)
            total -= _matrix_bytes(dropped)
    return made


def resize_on_device(image_chw: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """The tensor twin of :func:`prepare_image`'s resize, for a (3, H, W) uint8 image on any device.

    Both axes use ``cv2.INTER_AREA``'s weights (exact overlap averages when shrinking, its two-tap
    filter when enlarging) as two matrix products, so a GPU resizes in one pass. Results match
    :func:`prepare_image` to within one grey level (float rounding).
    Returns (h, w, 3) uint8, contiguous, on the input's device.
    """
    if image_chw.dtype != torch.uint8 or image_chw.ndim != 3 or image_chw.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) uint8 tensor, got {tuple(image_chw.shape)} {image_chw.dtype}")
    src_hw = (int(image_chw.shape[1]), int(image_chw.shape[2]))
    if src_hw == tuple(size_hw):
        return image_chw.permute(1, 2, 0).contiguous()
    rows, cols = _resize_matrices(src_hw, (size_hw[0], size_hw[1]), str(image_chw.device))
    if image_chw.is_cuda:
        # The cached matrices were made on the stream of whichever thread first missed the cache; read
        # on this thread's stream, they must not be reused by the allocator before this read is done
        # when the cache drops them (other sizes filled it) while this stream still runs.
        stream = torch.cuda.current_stream(image_chw.device)
        rows.record_stream(stream)
        cols.record_stream(stream)
    out = rows @ image_chw.float() @ cols  # (h, H) @ (3, H, W) @ (W, w) -> (3, h, w)
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
