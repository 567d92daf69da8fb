"""Tests for models.data: image/mask loading in every supported form, dataset scanning, fingerprints."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from structlog.testing import capture_logs

from models.data import (
    DatasetError,
    TestSample,
    dataset_fingerprint,
    load_image,
    load_mask,
    scan_dataset,
)


def _write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(path.suffix, image)
    assert ok
    path.write_bytes(data.tobytes())
    return path


def _rgb_pattern(h: int = 6, w: int = 8) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_load_image_color_png_is_rgb(tmp_path: Path) -> None:
    rgb = _rgb_pattern()
    path = _write(tmp_path / "a.png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = load_image(path)
    assert out.dtype == np.uint8
    assert out.shape == (6, 8, 3)
    np.testing.assert_array_equal(out, rgb)


def test_load_image_gray_replicated(tmp_path: Path) -> None:
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8)
    out = load_image(_write(tmp_path / "g.png", gray))
    assert out.shape == (6, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_load_image_16bit_scaled(tmp_path: Path) -> None:
    values = np.array([[0, 257, 257 * 100, 65535]], dtype=np.uint16)
    out = load_image(_write(tmp_path / "d.png", values))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 100, 255])


def test_load_image_rgba_drops_alpha(tmp_path: Path) -> None:
    rgb = _rgb_pattern()
    bgra = np.dstack([cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), np.full((6, 8), 7, np.uint8)])
    out = load_image(_write(tmp_path / "rgba.png", bgra))
    np.testing.assert_array_equal(out, rgb)


def test_load_image_keeps_sensor_orientation_like_the_worker(tmp_path: Path) -> None:
    # worker/decode.py ignores EXIF orientation; training must see the same pixels as serving.
    bgr = np.zeros((20, 40, 3), np.uint8)
    bgr[:, :10] = (0, 0, 255)  # red band on the left
    jpeg = cv2.imencode(".jpg", bgr)[1].tobytes()
    # Minimal big-endian EXIF block: one IFD entry, Orientation (0x0112) = 6, "rotate 90° clockwise".
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">HHHIHHI", 1, 0x0112, 3, 1, 6, 0, 0)
    app1 = b"Exif\x00\x00" + tiff
    path = tmp_path / "camera.jpg"
    path.write_bytes(jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:])
    out = load_image(path)
    assert out.shape == (20, 40, 3)
    assert out[:, :10, 0].mean() > 200  # the red band is still on the left
    assert out[:, -10:, 0].mean() < 50


@pytest.mark.parametrize("suffix", [".bmp", ".tif", ".tiff", ".webp", ".jpg", ".jpeg", ".PNG"])
def test_load_image_formats(tmp_path: Path, suffix: str) -> None:
    rgb = np.full((16, 16, 3), (200, 40, 90), np.uint8)
    encode_suffix = suffix.lower()
    ok, data = cv2.imencode(encode_suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    path = tmp_path / f"img{suffix}"
    path.write_bytes(data.tobytes())
    out = load_image(path)
    assert out.shape == (16, 16, 3)
    # Lossy formats may move a few levels; the channel order must still be right.
    assert np.abs(out.astype(int) - rgb.astype(int)).max() <= 12


def test_load_image_errors_name_the_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError, match=r"bad\.png"):
        load_image(corrupt)
    with pytest.raises(DatasetError, match=r"missing\.png"):
        load_image(tmp_path / "missing.png")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DatasetError, match="not an image"):
        load_image(text)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"empty\.jpg"):
        load_image(empty)


def test_load_mask_binarises_and_resizes_nearest(tmp_path: Path) -> None:
    small = np.zeros((4, 4), np.uint8)
    small[1, 2] = 255
    small[3, 0] = 1  # any non-zero value is a defect
    path = _write(tmp_path / "m.png", small)
    same = load_mask(path, (4, 4))
    assert same.dtype == bool
    np.testing.assert_array_equal(same, small > 0)
    big = load_mask(path, (8, 8))
    expected = np.kron(small > 0, np.ones((2, 2), bool))
    np.testing.assert_array_equal(big, expected)


def test_load_mask_loco_folder_is_union(tmp_path: Path) -> None:
    a = np.zeros((5, 5), np.uint8)
    a[0, 0] = 255
    b = np.zeros((5, 5), np.uint8)
    b[4, 4] = 255
    _write(tmp_path / "000" / "000.png", a)
    _write(tmp_path / "000" / "001.png", b)
    mask = load_mask(tmp_path / "000", (5, 5))
    assert mask.sum() == 2
    assert mask[0, 0]
    assert mask[4, 4]


def _make_dataset(root: Path) -> None:
    img = np.full((8, 8, 3), 128, np.uint8)
    for name in ("10.png", "2.png", "1.jpg"):
        _write(root / "train" / "good" / name, img)
    (root / "train" / "good" / "broken.png").write_bytes(b"garbage")
    (root / "train" / "good" / "readme.txt").write_text("x")
    (root / "train" / "good" / ".hidden.png").write_bytes(b"ignored")
    _write(root / "validation" / "good" / "000.png", img)
    _write(root / "test" / "good" / "000.png", img)
    _write(root / "test" / "scratch" / "000.png", img)
    _write(root / "test" / "scratch" / "001.bmp", img)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:4] = 255
    _write(root / "ground_truth" / "scratch" / "000_mask.png", mask)
    _write(root / "test" / "logical" / "000.png", img)
    _write(root / "ground_truth" / "logical" / "000" / "000.png", mask)


def test_scan_dataset_layout(tmp_path: Path) -> None:
    _make_dataset(tmp_path)
    with capture_logs() as logs:
        index = scan_dataset(tmp_path)
    assert [p.name for p in index.train_good] == ["1.jpg", "2.png", "10.png"]
    assert [p.name for p in index.validation_good] == ["000.png"]
    assert index.test == [
        TestSample(tmp_path / "test" / "good" / "000.png", "good", None),
        TestSample(
            tmp_path / "test" / "logical" / "000.png",
            "logical",
            tmp_path / "ground_truth" / "logical" / "000",
        ),
        TestSample(
            tmp_path / "test" / "scratch" / "000.png",
            "scratch",
            tmp_path / "ground_truth" / "scratch" / "000_mask.png",
        ),
        TestSample(tmp_path / "test" / "scratch" / "001.bmp", "scratch", None),
    ]
    assert [s.is_anomalous for s in index.test] == [False, True, True, True]
    assert index.defect_types == ["logical", "scratch"]
    skipped = {p.name: reason for p, reason in index.skipped}
    assert set(skipped) == {"broken.png", "readme.txt"}
    assert "cannot decode" in skipped["broken.png"]
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert {Path(e["path"]).name for e in warnings} == {"broken.png", "readme.txt"}
    assert all(e["event"] == "dataset_file_skipped" for e in warnings)


def test_scan_dataset_without_readability_check_keeps_corrupt(tmp_path: Path) -> None:
    _make_dataset(tmp_path)
    index = scan_dataset(tmp_path, check_readable=False)
    assert "broken.png" in [p.name for p in index.train_good]


def test_scan_dataset_unreadable_mask_is_skipped_and_sample_kept(tmp_path: Path) -> None:
    _make_dataset(tmp_path)
    (tmp_path / "ground_truth" / "scratch" / "000_mask.png").write_bytes(b"junk")
    index = scan_dataset(tmp_path)
    sample = next(s for s in index.test if s.path.name == "000.png" and s.defect_type == "scratch")
    assert sample.mask_path is None
    assert any(p.name == "000_mask.png" for p, _ in index.skipped)


def test_scan_dataset_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match=r"train/good"):
        scan_dataset(tmp_path)
    assert scan_dataset(tmp_path, require_train=False).train_good == []
    (tmp_path / "train" / "good").mkdir(parents=True)
    (tmp_path / "train" / "good" / "x.png").write_bytes(b"corrupt")
    with pytest.raises(DatasetError, match="no readable image"):
        scan_dataset(tmp_path)


def test_dataset_fingerprint(tmp_path: Path) -> None:
    _make_dataset(tmp_path / "a")
    files = scan_dataset(tmp_path / "a").train_good
    first = dataset_fingerprint(files)
    assert first == dataset_fingerprint(list(reversed(files)))
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    moved = scan_dataset(tmp_path / "moved").train_good
    assert dataset_fingerprint(moved) == first
    assert dataset_fingerprint(moved, root=tmp_path / "moved") == dataset_fingerprint(
        files, root=tmp_path / "a"
    )
    # One changed byte, or a renamed file, changes the fingerprint.
    target = moved[0]
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    assert dataset_fingerprint(moved) != first
    shutil.copytree(tmp_path / "a", tmp_path / "renamed")
    (tmp_path / "renamed" / "train" / "good" / "2.png").rename(
        tmp_path / "renamed" / "train" / "good" / "3.png"
    )
    renamed = scan_dataset(tmp_path / "renamed").train_good
    assert dataset_fingerprint(renamed) != first
    with pytest.raises(DatasetError):
        dataset_fingerprint([tmp_path / "gone.png"])


@pytest.mark.parametrize(
    ("suffix", "shape", "dtype"),
    [
        (".png", (9, 7, 3), np.uint8),
        (".png", (9, 7), np.uint8),
        (".png", (9, 7), np.uint16),
        (".png", (9, 7, 3), np.uint16),
        (".png", (9, 7, 4), np.uint8),
        (".jpg", (16, 16, 3), np.uint8),
        (".bmp", (9, 7, 3), np.uint8),
        (".tiff", (9, 7), np.uint16),
    ],
)
def test_training_and_serving_decode_the_same_pixels(
    tmp_path: Path, suffix: str, shape: tuple[int, ...], dtype: type
) -> None:
    from worker.decode import decode_image

    info = np.iinfo(dtype)
    image = np.random.default_rng(3).integers(0, int(info.max) + 1, size=shape).astype(dtype)
    data = cv2.imencode(suffix, image)[1].tobytes()
    path = tmp_path / f"x{suffix}"
    path.write_bytes(data)
    served = decode_image(data, None, max_pixels=1 << 20, max_value_bytes=1 << 20)
    np.testing.assert_array_equal(load_image(path), served)
