"""The SPACE / EfficientAD model package: networks, losses, teachers, training, artifacts, runtime.

``models`` depends on torch (and numpy/OpenCV/pydantic), never on ``worker``. The worker needs only
:class:`models.detector.Detector` and :class:`models.artifact.ModelCard`; they are exported lazily here so
``import models`` stays cheap (torch loads on first use).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ArtifactError", "Detector", "DetectorError", "ModelCard", "Prediction"]

_EXPORTS = {
    "ArtifactError": "models.artifact",
    "ModelCard": "models.artifact",
    "Detector": "models.detector",
    "DetectorError": "models.detector",
    "Prediction": "models.detector",
}


def __getattr__(name: str) -> Any:
    """Import the exported names on first access."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
