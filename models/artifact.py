"""Model artifacts: a folder with ``model.safetensors`` (weights) and ``model.json`` (the model card).

Owns the :class:`ModelCard` schema, :func:`save_artifact` and :func:`load_artifact`. The card records the
sha256 of the weights file; loading checks it before reading a tensor, and nothing is ever unpickled.
Every failure is an :class:`ArtifactError` naming the path and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from models.model import ModelConfig, migrate_stored_config

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
CARD_SCHEMA_VERSION = 1


class ArtifactError(ValueError):
    """An artifact is missing, incomplete, tampered with or unreadable."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Quantiles(_Frozen):
    """Map quantiles per branch from validation normals (q_a = 0.9, q_b = 0.995 of all pixels)."""

    qa_st: float
    qb_st: float
    qa_ae: float
    qb_ae: float


class ScoreStats(_Frozen):
    """Image-score statistics of the validation normal images."""

    n: int
    mean: float
    std: float
    min: float
    q50: float
    q90: float
    q99: float
    max: float


class TeacherInfo(_Frozen):
    """Where the teacher came from; its channel mean/std live in the safetensors file."""

    source: str  # "offline:filterbank", "offline:random-pdn", "imported", "distilled"
    detail: str = ""  # file name + sha256 for imported weights, backbone spec for distillation
    seed: int = 0


class TrainingSummary(_Frozen):
    """How the weights were produced."""

    data_root: str
    data_sha256: str  # over sorted relative paths and bytes of the train/good files
    n_train: int
    n_validation: int
    validation_source: Literal["validation_good", "train_holdout"]
    steps: int
    batch_size: int
    seed: int
    duration_s: float
    device: str
    precision: str
    penalty_source: str
    final_losses: dict[str, float] = Field(default_factory=dict)


class ModelCard(_Frozen):
    """Everything about one trained model except the tensors (``model.json``)."""

    schema_version: Literal[1] = 1
    name: str
    product_line: str
    version: str
    variant: Literal["space", "efficientad"]
    size: Literal["s", "m"]
    input_size: tuple[int, int]
    config: ModelConfig
    teacher: TeacherInfo
    quantiles: Quantiles
    default_threshold: float
    threshold_method: str
    validation_scores: ScoreStats
    training: TrainingSummary
    metrics: dict[str, float] | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    weights_file: str = WEIGHTS_FILE
    weights_sha256: str = ""

    @field_validator("config", mode="before")
    @classmethod
    def _migrate_config(cls, value: Any) -> Any:
        """A stored config without ``map_align`` / ``fe_align`` predates that switch: it loads as "padded" /
        "align_corners" (its calibration, its student's training); see ``migrate_stored_config``."""
        return migrate_stored_config(value) if isinstance(value, dict) else value

    @field_validator("weights_file")
    @classmethod
    def _weights_in_the_folder(cls, value: str) -> str:
        """The weights are a file of the artifact folder itself: a bare name, never a path elsewhere."""
        if value in ("", ".", "..") or "/" in value or "\\" in value or "\x00" in value:
            raise ValueError(f"weights_file must be a file name inside the artifact folder, not {value!r}")
        return value


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_artifact(out_dir: Path, card: ModelCard, state: dict[str, torch.Tensor]) -> Path:
    """Write ``model.safetensors`` and ``model.json`` (with the weights' sha256) as the folder ``out_dir``.

    Everything is written into a temporary folder beside it, which then takes ``out_dir``'s place: a
    reader never sees half an artifact, a failed write (a full disk) leaves no folder behind, and an
    existing ``out_dir`` (an overwrite) is replaced whole only once the new one is complete. Files are
    0644: workers may run as another user than the trainer.

    Returns:
        The artifact folder.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        tmp.chmod(0o755)  # mkdtemp creates 0700
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
        # One metadata key: safetensors orders several differently from run to run, so identical weights
        # hashed differently.
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / WEIGHTS_FILE).chmod(0o644)  # safetensors creates 0600
        digest = sha256_file(tmp / WEIGHTS_FILE)
        card = card.model_copy(update={"weights_file": WEIGHTS_FILE, "weights_sha256": digest})
        (tmp / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n")
        (tmp / CARD_FILE).chmod(0o644)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _publish(new: Path, out_dir: Path) -> None:
    """Put the complete folder ``new`` at ``out_dir``; an existing one is removed only after the swap."""
    if not out_dir.exists():
        os.replace(new, out_dir)
        return
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    os.replace(out_dir, old / out_dir.name)
    os.replace(new, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_card(path: Path) -> ModelCard:
    """Read and validate ``model.json`` of the artifact folder ``path``."""
    card_path = Path(path) / CARD_FILE
    if not card_path.is_file():
        raise ArtifactError(f"{card_path}: model card missing")
    try:
        return ModelCard.model_validate(json.loads(card_path.read_text()))
    except (ValueError, ValidationError) as exc:
        first = str(exc).splitlines()[0:3]
        raise ArtifactError(f"{card_path}: invalid model card ({' '.join(first)})") from exc


def verify_artifact(path: Path) -> ModelCard:
    """Read the card and check that the weights file exists and matches its sha256 (no unpickling).

    Raises:
        ArtifactError: invalid card, missing weights, or a hash mismatch.
    """
    card = load_card(path)
    weights = path / card.weights_file
    if not weights.is_file():
        raise ArtifactError(f"{weights}: weights file missing")
    _check_digest(weights, sha256_file(weights), card)
    return card


def _check_digest(weights: Path, digest: str, card: ModelCard) -> None:
    if digest != card.weights_sha256:
        raise ArtifactError(
            f"{weights}: sha256 {digest[:12]}… does not match the card's "
            f"{card.weights_sha256[:12]}… (tampered or mixed files)"
        )


def load_artifact(path: Path) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    """Load an artifact folder after checking the weights' sha256 against the card.

    Returns:
        (card, flat state dict of :class:`models.model.SpaceModel`).

    Raises:
        ArtifactError: missing folder/file, invalid card, hash mismatch, unreadable weights.
    """
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: artifact folder not found")
    card = load_card(path)
    weights = path / card.weights_file
    try:
        # One read: the bytes hashed are the bytes loaded, even if the folder is rewritten meanwhile.
        data = weights.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{weights}: weights file missing") from None
    except OSError as exc:
        raise ArtifactError(f"{weights}: unreadable ({exc})") from exc
    _check_digest(weights, hashlib.sha256(data).hexdigest(), card)
    try:
        state = load_safetensors(data)
    except SafetensorError as exc:
        raise ArtifactError(f"{weights}: unreadable safetensors ({exc})") from exc
    return card, state
