"""MVTec-layout dataset scanning and image loading.

Owns how images and ground-truth masks are read from disk (any format OpenCV decodes, gray, 16-bit
and RGBA included, always returned as ``H x W x 3`` uint8 RGB) and how a dataset folder maps to train,
validation and test samples::

    <root>/train/good/*                         normal training images (required)
    <root>/validation/good/*                    held-out normal images (optional)
    <root>/test/<defect_type>/*                 test images; ``good`` is the normal type
    <root>/ground_truth/<defect_type>/<stem>_mask.png     MVTec AD masks
    <root>/ground_truth/<defect_type>/<stem>/000.png ...  MVTec LOCO masks (one file per region)

Unreadable images are skipped, recorded in :attr:`DatasetIndex.skipped` and logged as warnings;
a missing or empty ``train/good`` is an error. Listings are sorted deterministically (natural order).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import structlog

__all__ = [
    "IMAGE_SUFFIXES",
    "DatasetError",
    "DatasetIndex",
    "TestSample",
    "dataset_fingerprint",
    "list_images",
    "load_image",
    "load_mask",
    "scan_dataset",
]

log = structlog.get_logger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
GOOD = "good"
_CHUNK_BYTES = 1 << 20


class DatasetError(Exception):
    """A dataset folder or file cannot be used; the message names the path."""


@dataclass
class TestSample:
    """One test image, its defect type (``"good"`` for normal) and its ground-truth mask, if any.

    ``mask_path`` is a file (MVTec AD) or a folder of per-region masks (MVTec LOCO); it is ``None``
    for good images and for anomalous images that have no annotation.
    """

    __test__ = False  # not a pytest test class despite the name

    path: Path
    defect_type: str
    mask_path: Path | None = None

    @property
    def is_anomalous(self) -> bool:
        """True for every defect type other than ``good``."""
        return self.defect_type != GOOD


@dataclass
class DatasetIndex:
    """What :func:`scan_dataset` found under ``root``."""

    root: Path
    train_good: list[Path]
    validation_good: list[Path] = field(default_factory=list)
    test: list[TestSample] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def defect_types(self) -> list[str]:
        """Sorted anomalous test types (``good`` excluded)."""
        return sorted({s.defect_type for s in self.test if s.is_anomalous})


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ``2.png`` before ``10.png`` and is total (ties broken by the text)."""
    parts = re.split(r"(\d+)", name)
    return (*((0, int(p)) if p.isdigit() else (1, p) for p in parts if p), (1, name))


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _to_uint8(image: np.ndarray, path: Path) -> np.ndarray:
    """Scale any decoded depth to uint8: 16-bit by 1/257, float in [0, 1] by 255, else clipped."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if image.dtype == np.int8:
        return (image.astype(np.int16) + 128).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        data = np.nan_to_num(image.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if data.size and data.max() <= 1.0:
            data = data * 255.0
        return np.clip(np.rint(data), 0, 255).astype(np.uint8)
    if np.issubdtype(image.dtype, np.integer):
        return np.clip(image, 0, 255).astype(np.uint8)
    raise DatasetError(f"unsupported pixel type {image.dtype} in {path}")


def _decode(path: Path) -> np.ndarray:
    """Decode a file with OpenCV at its own bit depth and channel count (bytes, so any path works).

    ``IMREAD_UNCHANGED`` like ``worker/decode.py``: training and serving must see the same pixels,
    so the EXIF orientation of camera JPEGs is ignored in both (images stay in sensor orientation).
    """
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DatasetError(f"not an image file (suffix {path.suffix or 'none'!r}): {path}")
    data = np.frombuffer(_read_bytes(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None or image.size == 0:
        raise DatasetError(f"cannot decode image {path} (corrupt, truncated or unsupported)")
    return image


def load_image(path: Path) -> np.ndarray:
    """Read an image as ``H x W x 3`` uint8 RGB.

    Gray images are replicated to three channels, 16-bit images scaled to 8 bits, alpha dropped.

    Args:
        path: Image file in any format OpenCV reads.

    Returns:
        Contiguous ``(H, W, 3)`` uint8 array in RGB order.

    Raises:
        DatasetError: The file is missing, unreadable or not a decodable image.
    """
    path = Path(path)
    image = _to_uint8(_decode(path), path)
    if image.ndim == 2:
        return np.ascontiguousarray(np.repeat(image[:, :, None], 3, axis=2))
    channels = image.shape[2]
    if channels == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=2))
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise DatasetError(f"unsupported channel count {channels} in {path}")


def _read_mask_file(path: Path) -> np.ndarray:
    image = _decode(path)
    if image.ndim == 3:
        # Colour masks: any non-zero colour channel marks the defect; alpha is not a label.
        image = image[:, :, :3].max(axis=2) if image.shape[2] >= 3 else image.max(axis=2)
    return image > 0


def load_mask(path: Path, size_hw: tuple[int, int]) -> np.ndarray:
    """Read a ground-truth mask as a bool array of shape ``size_hw``.

    Any non-zero pixel is a defect. A folder (MVTec LOCO form) is the union of the masks it holds.
    Masks of another size are resized with nearest-neighbour interpolation.

    Args:
        path: Mask file, or folder of mask files.
        size_hw: Wanted ``(height, width)``, normally the size of the image the mask belongs to.

    Returns:
        ``(H, W)`` bool array.

    Raises:
        DatasetError: The mask is missing, unreadable, or the folder holds no mask image.
    """
    path = Path(path)
    height, width = int(size_hw[0]), int(size_hw[1])
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise DatasetError(f"mask folder {path} holds no image")
        parts = [load_mask(f, (height, width)) for f in files]
        return np.logical_or.reduce(parts)
    mask = _read_mask_file(path)
    if mask.shape != (height, width):
        resized = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
        mask = resized > 0
    return mask


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (known suffixes, hidden files ignored), naturally sorted."""
    if not folder.is_dir():
        return []
    files = [
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    return sorted(files, key=lambda p: _natural_key(p.name))


def _unsupported_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in IMAGE_SUFFIXES
    ]
    return sorted(files, key=lambda p: _natural_key(p.name))


class _Scanner:
    """Collects readable images and the reasons for skipped ones while scanning one dataset."""

    def __init__(self, check_readable: bool) -> None:
        self.check_readable = check_readable
        self.skipped: list[tuple[Path, str]] = []

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.append((path, reason))
        log.warning("dataset_file_skipped", path=str(path), reason=reason)

    def readable(self, path: Path) -> bool:
        if not self.check_readable:
            return True
        try:
            _decode(path)
        except DatasetError as exc:
            self.skip(path, str(exc))
            return False
        return True

    def images(self, folder: Path) -> list[Path]:
        for other in _unsupported_files(folder):
            self.skip(other, f"unsupported file type {other.suffix or '(none)'!r}")
        return [p for p in list_images(folder) if self.readable(p)]

    def mask_for(self, ground_truth: Path, image: Path) -> Path | None:
        """Find the mask of ``image``: ``<stem>_mask.<ext>`` (MVTec AD) or ``<stem>/`` (LOCO)."""
        folder = ground_truth / image.parent.name
        for suffix in (image.suffix, *IMAGE_SUFFIXES):
            candidate = folder / f"{image.stem}_mask{suffix}"
            if candidate.is_file():
                return candidate if self.readable(candidate) else None
        loco = folder / image.stem
        if loco.is_dir() and list_images(loco):
            return loco if all(self.readable(p) for p in list_images(loco)) else None
        return None


def scan_dataset(root: Path, *, check_readable: bool = True, require_train: bool = True) -> DatasetIndex:
    """Index an MVTec-layout dataset folder.

    Args:
        root: Dataset folder holding ``train/good`` and optionally ``validation/good``, ``test``
            and ``ground_truth``.
        check_readable: Decode every image (and mask) once so that corrupt files are skipped now
            rather than failing later. Costs one full decode per file.
        require_train: Fail without training images; evaluation passes False (it only needs ``test``).

    Returns:
        The index; anomalous test images without an annotation have ``mask_path=None``.

    Raises:
        DatasetError: ``root`` is not a folder, or ``train/good`` is missing or has no readable image
            (only with ``require_train``).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    scanner = _Scanner(check_readable)
    train_dir = root / "train" / GOOD
    if require_train and not train_dir.is_dir():
        raise DatasetError(f"no training folder {train_dir} (expected MVTec layout <root>/train/good/)")
    train = scanner.images(train_dir)
    if require_train and not train:
        raise DatasetError(
            f"training folder {train_dir} holds no readable image "
            f"(formats: {', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)})"
        )
    validation = scanner.images(root / "validation" / GOOD)
    test: list[TestSample] = []
    test_root = root / "test"
    type_dirs: list[Path] = []
    if test_root.is_dir():
        type_dirs = sorted((d for d in test_root.iterdir() if d.is_dir()), key=lambda d: _natural_key(d.name))
    for type_dir in type_dirs:
        for image in scanner.images(type_dir):
            mask = None
            if type_dir.name != GOOD:
                mask = scanner.mask_for(root / "ground_truth", image)
            test.append(TestSample(path=image, defect_type=type_dir.name, mask_path=mask))
    log.info(
        "dataset_scanned",
        root=str(root),
        train=len(train),
        validation=len(validation),
        test=len(test),
        skipped=len(scanner.skipped),
    )
    return DatasetIndex(root=root, train_good=train, validation_good=validation, test=test, skipped=scanner.skipped)


def _relative_name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return Path(os.path.relpath(path, root)).as_posix()


def dataset_fingerprint(paths: Iterable[Path], *, root: Path | None = None) -> str:
    """SHA-256 over the relative names and bytes of ``paths``, independent of their order.

    Args:
        paths: Files to fingerprint (e.g. ``index.train_good + index.validation_good``).
        root: Names are taken relative to this folder; defaults to the common parent of the files,
            so the fingerprint does not change when the dataset folder is moved.

    Returns:
        Hex digest.

    Raises:
        DatasetError: A file cannot be read.
    """
    files = [Path(p) for p in paths]
    if root is None:
        root = Path(os.path.commonpath([str(p.parent) for p in files])) if files else Path()
    digest = hashlib.sha256()
    for name, path in sorted((_relative_name(p, root), p) for p in files):
        encoded = name.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
        try:
            size = path.stat().st_size
            digest.update(size.to_bytes(8, "little"))
            with path.open("rb") as handle:
                while chunk := handle.read(_CHUNK_BYTES):
                    digest.update(chunk)
        except OSError as exc:
            raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()
