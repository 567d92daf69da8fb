"""JPEG decode on the GPU (nvJPEG through ``torchvision.io.decode_jpeg``), the CPU path as fallback.

A 5-megapixel camera frame costs a CPU core 30-50 ms to decode; nvJPEG decodes it on the card
in a few, and the resize to the model size runs there too (:func:`models.preprocess.resize_on_device`,
``cv2.INTER_AREA``'s arithmetic to within one grey level), so only the small model-size image comes
back to the host. Selected by ``SPACE_DECODE__DEVICE``:

* ``cpu`` (default): OpenCV on the decode threads, as always.
* ``auto``: nvJPEG when torchvision with CUDA JPEG support and a CUDA device are present, else CPU.
* ``cuda``: nvJPEG or the worker refuses to start (:class:`worker.errors.ConfigError`).

Only what the guards of :mod:`worker.decode` already accepted reaches the device (size, type,
declared pixels: bombs are refused from the header first), and only 8-bit gray or YCbCr JPEGs;
PNG, BMP, TIFF and CMYK JPEGs take the CPU path. A JPEG nvJPEG refuses is decoded again on the
CPU, which gives the precise dead-letter reason when it is corrupt; the fallbacks are counted.

Each decode thread has a CUDA stream of its own: the caching allocator then never hands the decoder
a block that kernels on the model's stream are still reading (torchvision's decoder writes on a
private stream, pytorch/vision#9606), and the thread waits for its image before decoding the next
one. Streams come from torch's pool of 32, so past 32 a thread's stream may be one that others use
too: its work then queues behind theirs, and the model's side streams mark their outputs as read
elsewhere (:class:`models.gpu.BranchStreams`), so no block is handed over early. The decode holds
:func:`models.gpu.device_work`: it never runs while a CUDA graph is captured.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import structlog
import torch

from models.gpu import device_work
from models.preprocess import resize_on_device
from worker.decode import DecodeError, ImageInfo, probe_image
from worker.errors import ConfigError

log = structlog.get_logger(__name__)

DecodeDevice = Literal["cpu", "auto", "cuda"]


class DeviceDecodeError(Exception):
    """The device decoder refused an image; the caller decodes it on the CPU instead."""


def find_nvjpeg() -> tuple[Callable[..., Any] | None, str]:
    """torchvision's ``decode_jpeg`` and an empty string, or None and why it cannot run here."""
    if not torch.cuda.is_available():
        return None, "no CUDA device is available"
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as exc:
        return None, f"torchvision is not installed ({exc})"
    import cv2  # here, not at the top: worker.decode configures OpenCV before it is first imported

    _, encoded = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))
    probe = torch.from_numpy(encoded.reshape(-1).copy())
    try:
        decode_jpeg(probe, mode=ImageReadMode.RGB, device="cuda")
    except (RuntimeError, TypeError) as exc:
        return None, f"torchvision cannot decode JPEGs on CUDA ({str(exc).splitlines()[0]})"

    def decode(data: torch.Tensor) -> torch.Tensor:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")

    return decode, ""


class DeviceJpegDecoder:
    """Decodes guarded JPEG bytes on a CUDA device and resizes them there to the model size.

    Args:
        decode: ``uint8 CPU tensor of the file -> (3, H, W) uint8 tensor on device`` (nvJPEG).
        device: The CUDA device the decoder writes to (a CPU device runs without streams).
    """

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> None:
        """Keep the decode function; streams are made per thread on first use."""
        self._decode = decode
        self.device = device
        self._local = threading.local()

    @classmethod
    def create(cls, mode: DecodeDevice) -> DeviceJpegDecoder | None:
        """The decoder ``SPACE_DECODE__DEVICE`` asks for: None for cpu (or auto without nvJPEG).

        Raises:
            ConfigError: ``cuda`` was asked for and nvJPEG cannot run here.
        """
        if mode == "cpu":
            return None
        decode, why_not = find_nvjpeg()
        if decode is None:
            if mode == "cuda":
                raise ConfigError(f"SPACE_DECODE__DEVICE=cuda, but {why_not}; use auto or cpu")
            log.info("device_decode_unavailable", reason=why_not)
            return None
        log.info("device_decode_enabled", device="cuda")
        return cls(decode, torch.device("cuda", torch.cuda.current_device()))

    @staticmethod
    def accepts(info: ImageInfo) -> bool:
        """Whether an image the guards accepted goes to the device: 8-bit gray or 3-channel JPEG."""
        return info.format == "jpeg" and info.bit_depth == 8 and info.channels in (1, 3)

    def _on_own_stream(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type != "cuda":
            return contextlib.nullcontext()  # a CPU decode function (tests of the wiring)
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = torch.cuda.Stream(device=self.device)
            self._local.stream = stream
        return torch.cuda.stream(stream)

    def decode_prepared(
        self, data: bytes, size_hw: tuple[int, int], probed_hw: tuple[int, int] | None = None
    ) -> np.ndarray:
        """JPEG bytes -> (h, w, 3) uint8 RGB at ``size_hw`` (what ``decode_image`` + ``prepare`` give).

        Args:
            data: a JPEG the guards of :mod:`worker.decode` accepted.
            size_hw: the model's input size.
            probed_hw: the ``(height, width)`` its header declares (:func:`worker.decode.check_image`);
                None probes the header here.

        Raises:
            DeviceDecodeError: nvJPEG refused the data, or decoded another size than the header declares
                (a decoder that read another frame than the probe; the CPU path has the pixel checks).
        """
        if probed_hw is None:
            try:
                info = probe_image(data)
            except DecodeError as exc:
                raise DeviceDecodeError(f"the header probe refused it ({exc})") from exc
            probed_hw = (info.height, info.width)
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            with device_work(), self._on_own_stream():  # no decode while a CUDA graph is captured
                image = self._decode(encoded)
                if image.ndim != 3 or image.shape[0] != 3:
                    raise DeviceDecodeError(f"nvJPEG returned shape {tuple(image.shape)}")
                if tuple(image.shape[1:]) != tuple(probed_hw):
                    decoded = f"{image.shape[2]}x{image.shape[1]}"
                    raise DeviceDecodeError(
                        f"nvJPEG decoded {decoded} pixels, the header declares {probed_hw[1]}x{probed_hw[0]}"
                    )
                out = resize_on_device(image, size_hw).cpu()  # waits for this thread's stream only
        except RuntimeError as exc:
            raise DeviceDecodeError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
        return out.numpy()
