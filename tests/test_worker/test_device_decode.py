"""GPU JPEG decode: selection, routing and the resize twin on CPU; nvJPEG itself where CUDA is present."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch
from skimage import data as skdata

from models.preprocess import prepare_image, resize_on_device
from worker.decode import check_image, decode_image
from worker.device_decode import DeviceDecodeError, DeviceJpegDecoder, find_nvjpeg
from worker.errors import ConfigError

LIMITS = {"max_pixels": 40_000_000, "max_value_bytes": 32 * 1024 * 1024}
HAS_NVJPEG = find_nvjpeg()[0] is not None


def _jpeg(image_rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("src_shape", [(512, 512), (300, 451), (37, 53), (2048, 1224)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("size", [(128, 128), (256, 256), (100, 150), (600, 500), (37, 53)])
def test_resize_on_device_is_inter_area_within_one_grey_level(
    src_shape: tuple[int, int], size: tuple[int, int]
) -> None:
    rng = np.random.default_rng(sum(src_shape))
    image = rng.integers(0, 256, (*src_shape, 3), dtype=np.uint8)
    expected = prepare_image(image, size)
    got = resize_on_device(torch.from_numpy(image).permute(2, 0, 1).contiguous(), size).numpy()
    assert got.shape == (*size, 3) and got.dtype == np.uint8 and got.flags.c_contiguous
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1, f"max diff {diff.max()}"
    assert diff.mean() < 0.2


def test_resize_on_device_keeps_a_one_pixel_defect_where_inter_area_puts_it() -> None:
    image = np.zeros((512, 512, 3), np.uint8)
    image[300:304, 100:104] = 255  # a 4x4 defect -> one pixel at 128 px
    got = resize_on_device(torch.from_numpy(image).permute(2, 0, 1).contiguous(), (128, 128)).numpy()
    assert np.argwhere(got[:, :, 0] == 255).tolist() == [[75, 25]]


def test_resize_on_device_rejects_other_layouts() -> None:
    with pytest.raises(ValueError, match=r"\(3, H, W\) uint8"):
        resize_on_device(torch.zeros(8, 8, 3, dtype=torch.uint8), (4, 4))
    with pytest.raises(ValueError, match=r"\(3, H, W\) uint8"):
        resize_on_device(torch.zeros(3, 8, 8), (4, 4))


def test_cpu_mode_has_no_device_decoder() -> None:
    assert DeviceJpegDecoder.create("cpu") is None


@pytest.mark.skipif(HAS_NVJPEG, reason="nvJPEG is available here")
def test_cuda_mode_without_nvjpeg_stops_startup_naming_the_variable() -> None:
    assert DeviceJpegDecoder.create("auto") is None  # auto falls back to the CPU
    with pytest.raises(ConfigError, match="SPACE_DECODE__DEVICE=cuda"):
        DeviceJpegDecoder.create("cuda")


def test_only_8_bit_gray_or_colour_jpegs_go_to_the_device() -> None:
    rgb = skdata.astronaut()
    gray = cv2.imencode(".jpg", rgb[:, :, 0])[1].tobytes()
    png = cv2.imencode(".png", rgb)[1].tobytes()
    color = check_image(_jpeg(rgb), "image/jpeg", **LIMITS)
    assert DeviceJpegDecoder.accepts(color)
    assert DeviceJpegDecoder.accepts(check_image(gray, "image/jpeg", **LIMITS))
    assert not DeviceJpegDecoder.accepts(check_image(png, "image/png", **LIMITS))
    assert not DeviceJpegDecoder.accepts(dataclasses.replace(color, channels=4))  # CMYK


def _cv2_decode(encoded: torch.Tensor) -> torch.Tensor:
    """A CPU stand-in for nvJPEG with its contract: file bytes -> (3, H, W) uint8, RuntimeError if refused."""
    image = cv2.imdecode(encoded.numpy(), cv2.IMREAD_COLOR)
    if image is None:
        raise RuntimeError("nvjpegDecode failed: 6")
    return torch.from_numpy(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).contiguous()


def test_decode_prepared_gives_what_the_cpu_path_gives() -> None:
    decoder = DeviceJpegDecoder(_cv2_decode, torch.device("cpu"))
    jpeg = _jpeg(skdata.chelsea())
    expected = prepare_image(decode_image(jpeg, "image/jpeg", **LIMITS), (128, 128))
    got = decoder.decode_prepared(jpeg, (128, 128))
    assert got.shape == (128, 128, 3)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_a_refused_jpeg_is_a_device_decode_error_for_the_cpu_to_retry() -> None:
    decoder = DeviceJpegDecoder(_cv2_decode, torch.device("cpu"))
    jpeg = _jpeg(skdata.chelsea())
    with pytest.raises(DeviceDecodeError, match="nvjpegDecode failed"):
        decoder.decode_prepared(jpeg[:200], (64, 64))


def test_a_decode_of_another_size_than_the_header_declares_goes_back_to_the_cpu() -> None:
    # A decoder that read another frame than the probe (the CPU path has the pixel checks).
    def bigger(encoded: torch.Tensor) -> torch.Tensor:
        return torch.zeros(3, 2000, 3000, dtype=torch.uint8)

    decoder = DeviceJpegDecoder(bigger, torch.device("cpu"))
    jpeg = _jpeg(skdata.chelsea())  # 451x300
    with pytest.raises(DeviceDecodeError, match="nvJPEG decoded 3000x2000 pixels, the header declares 451x300"):
        decoder.decode_prepared(jpeg, (64, 64))
    info = check_image(jpeg, "image/jpeg", **LIMITS)
    with pytest.raises(DeviceDecodeError, match="the header declares 451x300"):
        decoder.decode_prepared(jpeg, (64, 64), (info.height, info.width))
    matching = DeviceJpegDecoder(_cv2_decode, torch.device("cpu"))
    assert matching.decode_prepared(jpeg, (64, 64), (info.height, info.width)).shape == (64, 64, 3)
    with pytest.raises(DeviceDecodeError, match="the header declares 16x16"):
        matching.decode_prepared(jpeg, (64, 64), (16, 16))


def test_a_jpeg_the_probe_refuses_is_left_to_the_cpu_path() -> None:
    decoder = DeviceJpegDecoder(_cv2_decode, torch.device("cpu"))
    jpeg = _jpeg(skdata.chelsea())
    sof = jpeg.index(b"\xff\xc0")
    with pytest.raises(DeviceDecodeError, match="the header probe refused it"):
        decoder.decode_prepared(jpeg[:sof] + b"\xff\x00" + jpeg[sof:], (64, 64))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_NVJPEG, reason="needs torchvision with CUDA JPEG decoding")
def test_nvjpeg_matches_opencv_and_refuses_corrupt_data() -> None:  # pragma: no cover - GPU hosts only
    decoder = DeviceJpegDecoder.create("cuda")
    assert decoder is not None
    for image in (skdata.astronaut(), skdata.chelsea(), np.repeat(skdata.camera()[:, :, None], 3, axis=2)):
        jpeg = _jpeg(image)
        expected = prepare_image(decode_image(jpeg, "image/jpeg", **LIMITS), (256, 256))
        got = decoder.decode_prepared(jpeg, (256, 256))
        diff = np.abs(got.astype(int) - expected.astype(int))
        # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's: on an H100 the mean
        # difference was 0.58 grey levels, the largest 24 (at sharp colour edges).
        assert diff.mean() < 1.0 and diff.max() <= 48
    with pytest.raises(DeviceDecodeError):
        decoder.decode_prepared(_jpeg(skdata.chelsea())[:300], (64, 64))


def test_resize_matrices_are_cached_within_a_byte_budget(monkeypatch) -> None:
    # A count bound let 64 extreme sizes (65500x610 is within the pixel limit) keep 4 GiB of device memory.
    from models import preprocess

    monkeypatch.setattr(preprocess, "RESIZE_CACHE_BYTES", 600_000)
    monkeypatch.setattr(preprocess, "_resize_cache", type(preprocess._resize_cache)())
    first = preprocess._resize_matrices((400, 300), (64, 64), "cpu")
    assert preprocess._resize_matrices((400, 300), (64, 64), "cpu") is first  # a hit: the same tensors
    for height in range(500, 1500, 100):  # 256 to 486 kB each
        preprocess._resize_matrices((height, 500), (64, 64), "cpu")
        sizes = [preprocess._matrix_bytes(m) for m in preprocess._resize_cache.values()]
        assert sum(sizes) <= 600_000
    assert ((400, 300), (64, 64), "cpu") not in preprocess._resize_cache  # the least recently used went first
    assert ((1400, 500), (64, 64), "cpu") in preprocess._resize_cache
