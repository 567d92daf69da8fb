"""Resumable training checkpoints: one ``checkpoint.safetensors`` (tensors, and the rest as JSON metadata).

Owns :func:`save_checkpoint` / :func:`load_checkpoint`. Model weights, Adam moments and the torch RNG
states (CPU, and one per CUDA device for a CUDA run) are tensors; step, numpy RNG state and run metadata
are JSON in the file's header, so one atomic rename publishes a checkpoint whole. Nothing is pickled. A
checkpoint is only resumed when its run fingerprint (config + data hash) matches, so a changed run
starts afresh.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

log = structlog.get_logger(__name__)

TENSORS = "checkpoint.safetensors"
_META_KEY = "space.checkpoint"  # header metadata: the run fingerprint, step, RNG and optimizer groups
_CUDA_RNG = "rng.cuda."


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns."""

    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    torch_rng: torch.Tensor
    meta: dict[str, Any]
    cuda_rng: list[torch.Tensor] = field(default_factory=list)  # per CUDA device; empty for a CPU run


def save_checkpoint(
    folder: Path,
    fingerprint: str,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    torch_rng: torch.Tensor,
    meta: dict[str, Any],
    *,
    cuda_rng: Sequence[torch.Tensor] = (),
) -> None:
    """Write a checkpoint atomically (one file: tensors and, in its header, the JSON of the rest).

    ``cuda_rng`` is ``torch.cuda.get_rng_state_all()`` of a CUDA run (dropout on CUDA draws from those
    generators), stored as ``rng.cuda.<device>``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model_state.items()}
    for pid, state in optimizer_state["state"].items():
        for key, value in state.items():
            tensors[f"opt.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = torch_rng.contiguous()
    for i, state in enumerate(cuda_rng):
        tensors[f"{_CUDA_RNG}{i}"] = state.detach().cpu().contiguous()
    doc = {"fingerprint": fingerprint, "param_groups": optimizer_state["param_groups"], **meta}
    # The metadata travels in the tensors' file: one rename publishes both (with two files, a save cut off
    # between them resumed step-10 weights as step 5).
    tmp = folder / f".{TENSORS}.tmp"
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(doc)})
    os.replace(tmp, folder / TENSORS)
    log.info("checkpoint_saved", folder=str(folder), step=meta.get("step"))


def load_checkpoint(folder: Path, fingerprint: str) -> Checkpoint | None:
    """Return the checkpoint in ``folder`` if it belongs to the run ``fingerprint``, else None."""
    tensor_path = folder / TENSORS
    if not tensor_path.is_file():
        return None
    with safe_open(str(tensor_path), framework="pt") as file:
        stored = (file.metadata() or {}).get(_META_KEY)
    if stored is None:  # a checkpoint of the two-file layout, or not one of ours
        log.warning("checkpoint_ignored", folder=str(folder), reason="no run metadata in the checkpoint")
        return None
    meta = json.loads(stored)
    if meta.get("fingerprint") != fingerprint:
        log.warning("checkpoint_ignored", folder=str(folder), reason="different run configuration or data")
        return None
    tensors = load_file(str(tensor_path))
    model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = value
    optimizer_state = {"state": opt_state, "param_groups": meta.pop("param_groups")}
    cuda = {int(k.removeprefix(_CUDA_RNG)): v for k, v in tensors.items() if k.startswith(_CUDA_RNG)}
    cuda_rng = [cuda[i] for i in sorted(cuda)]
    return Checkpoint(model_state, optimizer_state, tensors["rng.torch"], meta, cuda_rng)
