"""space-worker: the streaming runtime (Kafka in, batched SPACE inference, verdicts out) and the CLI.

Dependencies point one way: ``worker -> models, schemas``. Pure logic (batcher, offset tracker,
threshold cache) lives in small modules that take injected clocks and need no broker.

Importing the package sets ``OPENCV_IO_MAX_IMAGE_PIXELS`` (unless already set), OpenCV's own pixel
limit, which the cv2 library reads once, when it loads. It is set here, before any module of the
package can import cv2 (the CLI imports command modules that reach cv2 through ``models``), so the
limit holds whatever the import order; :mod:`worker.decode`'s header probe is the first guard.
"""

import os as _os

__version__ = "0.1.0"

#: Default of ``SPACE_DECODE__MAX_PIXELS``, and OpenCV's limit when that variable is unset or invalid.
DEFAULT_MAX_PIXELS = 40_000_000
_OPENCV_LIMIT_VARIABLE = "OPENCV_IO_MAX_IMAGE_PIXELS"
_OPENCV_LIMIT_CEILING = 1 << 62  # OpenCV parses the value with stoull and aborts the process on overflow


def _opencv_max_pixels(setting: str | None) -> str:
    """``SPACE_DECODE__MAX_PIXELS`` when it is a positive integer, else the default.

    OpenCV aborts (``std::invalid_argument`` from ``stoull``) when cv2 loads with a non-numeric limit;
    a bad setting must instead reach ``load_settings``, which refuses it with the variable's name.
    """
    text = (setting or "").strip()
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        return str(DEFAULT_MAX_PIXELS)
    return str(min(int(text), _OPENCV_LIMIT_CEILING))


_os.environ.setdefault(_OPENCV_LIMIT_VARIABLE, _opencv_max_pixels(_os.environ.get("SPACE_DECODE__MAX_PIXELS")))
