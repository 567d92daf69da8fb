"""Teacher sources: published EfficientAD weights, distillation from a user backbone, offline teachers.

Owns everything that produces the frozen 384-channel teacher (SPACE_SPEC §1.4, §6):

- :func:`load_published_teacher` imports nelson1425 / anomalib ``teacher_small.pth`` / ``teacher_medium.pth``
  state dicts (``torch.load(weights_only=True)``, never a pickle of code), with the key mapping kept here.
- :func:`distill_teacher` trains a padded PDN to mimic a backbone the user provides as a Python callable.
- :class:`FilterBankTeacher` is the default offline teacher: a deterministic bank of Gabor, DoG and colour
  filters at three scales, pooled on the PDN grid and randomly (but with a fixed seed) projected to 384
  channels. :func:`random_pdn_teacher` is the other fixed teacher of the §6 study.

No code path here downloads anything.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from torch import nn

from models.networks import PDN, PDN_STRIDE, TEACHER_CHANNELS, PdnSize, pdn_out_size, pdn_rf_centre

log = structlog.get_logger(__name__)

OFFLINE_KINDS = ("filterbank", "random-pdn")
DEFAULT_OFFLINE = "filterbank"

# nelson1425's PDN is an nn.Sequential; these are the indices of its convs (see SPACE_SPEC §1.2 tables).
_NELSON_CONV_INDEX: dict[str, dict[int, str]] = {
    "s": {0: "conv1", 3: "conv2", 6: "conv3", 8: "conv4"},
    "m": {0: "conv1", 3: "conv2", 6: "conv3", 8: "conv4", 10: "conv5", 12: "conv6"},
}


class TeacherError(ValueError):
    """A teacher file or specification cannot be used (the message says which and why)."""


def map_teacher_keys(state: dict[str, torch.Tensor], size: PdnSize) -> dict[str, torch.Tensor]:
    """Translate a foreign teacher state dict to :class:`~models.networks.PDN` names.

    Accepts nelson1425's Sequential layout (``'0.weight'``, ``'3.bias'``...), anomalib's names
    (``conv1.weight``), each optionally prefixed by ``teacher.`` or ``model.teacher.``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = re.sub(r"^(model\.)?(teacher\.)?", "", key)
        m = re.fullmatch(r"(\d+)\.(weight|bias)", name)
        if m:
            idx = int(m.group(1))
            if idx not in _NELSON_CONV_INDEX[size]:
                raise TeacherError(f"key {key!r} is not a conv of a PDN-{size.upper()} (nelson layout)")
            name = f"{_NELSON_CONV_INDEX[size][idx]}.{m.group(2)}"
        elif not re.fullmatch(r"conv[1-6]\.(weight|bias)", name):
            continue  # other parts of a full-model checkpoint (student, ae, quantiles)
        out[name] = value
    return out


def load_published_teacher(path: Path, size: PdnSize) -> PDN:
    """Load a published EfficientAD teacher (``.pth`` state dict, or ``.safetensors``) into a PDN.

    Raises:
        TeacherError: the file is missing, not a plain state dict, or its shapes do not fit PDN-``size``.
    """
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"teacher weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TeacherError(f"cannot read teacher weights {path}: {exc}") from exc
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise TeacherError(f"{path} is not a state dict of tensors")
    state = map_teacher_keys(raw, size)
    pdn = PDN(size, TEACHER_CHANNELS)
    expected = pdn.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise TeacherError(f"{path}: missing {missing} for a PDN-{size.upper()} teacher")
    for name, ref in expected.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise TeacherError(
                f"{path}: {name} has shape {tuple(state[name].shape)}, PDN-{size.upper()} needs {tuple(ref.shape)}"
            )
    pdn.load_state_dict({k: v.float() for k, v in state.items() if k in expected})
    log.info("teacher_imported", path=str(path), size=size)
    return pdn.eval().requires_grad_(False)


def random_pdn_teacher(size: PdnSize, seed: int = 0) -> PDN:
    """A frozen PDN with PyTorch's default init drawn from ``seed`` (the §6 "random PDN" teacher)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pdn = PDN(size, TEACHER_CHANNELS)
    return pdn.eval().requires_grad_(False)


def _gabor(size: int, theta: float, wavelength: float, phase: float) -> np.ndarray:
    sigma = 0.5 * wavelength
    r = np.arange(size) - (size - 1) / 2
    y, x = np.meshgrid(r, r, indexing="ij")
    xr = x * math.cos(theta) + y * math.sin(theta)
    yr = -x * math.sin(theta) + y * math.cos(theta)
    g = np.exp(-(xr**2 + yr**2) / (2 * sigma**2)) * np.cos(2 * math.pi * xr / wavelength + phase)
    g -= g.mean()
    return g / np.abs(g).sum()


def _gauss(size: int, sigma: float) -> np.ndarray:
    r = np.arange(size) - (size - 1) / 2
    y, x = np.meshgrid(r, r, indexing="ij")
    g = np.exp(-(x**2 + y**2) / (2 * sigma**2))
    return g / g.sum()


def filter_bank_kernels(ksize: int = 9) -> torch.Tensor:
    """The fixed bank applied at every scale: (22, 3, k, k) over [luminance, red-green, blue-yellow].

    16 Gabor filters on luminance (4 orientations x 2 wavelengths x even/odd phase), 3 DoG
    (centre-surround) filters, one per opponent channel, and 3 Gaussian colour means.
    """
    kernels: list[np.ndarray] = []
    for wavelength in (4.0, 8.0):
        for k in range(4):
            for phase in (0.0, math.pi / 2):
                kern = np.zeros((3, ksize, ksize))
                kern[0] = _gabor(ksize, k * math.pi / 4, wavelength, phase)
                kernels.append(kern)
    for c in range(3):
        kern = np.zeros((3, ksize, ksize))
        kern[c] = _gauss(ksize, 1.0) - _gauss(ksize, 2.5)
        kernels.append(kern)
    for c in range(3):
        kern = np.zeros((3, ksize, ksize))
        kern[c] = _gauss(ksize, 2.0)
        kernels.append(kern)
    return torch.tensor(np.stack(kernels), dtype=torch.float32)


class FilterBankTeacher(nn.Module):
    """Deterministic hand-crafted teacher (SPACE_SPEC §6): filter energies -> fixed random projection.

    The input (ImageNet-normalised RGB) goes to an opponent colour space, the bank of
    :func:`filter_bank_kernels` runs at scales 1, 1/2 and 1/4, rectified responses are smoothed and
    sampled at the receptive-field centres of the PDN grid (pixel ``4q + 16``, ``4q`` with ``padding``:
    :func:`models.networks.pdn_rf_centre`), so its maps align with the PDN student's exactly. A 1x1
    projection with weights from a fixed seed gives 384 channels.
    All constants are buffers, so an artifact carries them and loading never depends on this code's RNG.
    """

    opponent: torch.Tensor
    kernels: torch.Tensor
    projection: torch.Tensor
    smooth: torch.Tensor

    def __init__(self, seed: int = 0, padding: bool = False) -> None:
        """Build the fixed buffers; ``seed`` only picks the projection."""
        super().__init__()
        self.padding = padding
        opp = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, -1.0, 0.0], [0.5, 0.5, -1.0]])
        self.register_buffer("opponent", opp.view(3, 3, 1, 1))
        self.register_buffer("kernels", filter_bank_kernels())
        n_feat = 3 * 2 * self.kernels.shape[0]  # scales x (pos, neg) x filters
        gen = torch.Generator().manual_seed(seed)
        proj = torch.randn(TEACHER_CHANNELS, n_feat, 1, 1, generator=gen) / math.sqrt(n_feat)
        self.register_buffer("projection", proj)
        self.register_buffer("smooth", torch.tensor(_gauss(7, 1.5), dtype=torch.float32).view(1, 1, 7, 7))

    @property
    def trunk_channels(self) -> int:
        """Channels of the pooled filter energies (the FE when SPACE uses this teacher)."""
        return int(self.projection.shape[1])

    def _grid(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        gh, gw = pdn_out_size(h, self.padding), pdn_out_size(w, self.padding)
        off = float(pdn_rf_centre(self.padding))  # pixel 4q + 16 (unpadded) or 4q (padded)
        ys = (PDN_STRIDE * torch.arange(gh, device=device) + off + 0.5) * 2 / h - 1
        xs = (PDN_STRIDE * torch.arange(gw, device=device) + off + 0.5) * 2 / w - 1
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([gx, gy], dim=-1)  # (gh, gw, 2) for grid_sample

    def forward_with_trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (pooled filter energies, projected 384-channel features) on the PDN grid."""
        n, _, h, w = x.shape
        z = F.conv2d(x.float(), self.opponent)
        k = self.kernels.shape[-1]
        smooth = self.smooth.expand(2 * self.kernels.shape[0], 1, -1, -1)
        grid = self._grid(h, w, x.device).unsqueeze(0).expand(n, -1, -1, -1)
        feats = []
        for scale in range(3):
            zs = F.avg_pool2d(z, 2**scale) if scale else z
            r = F.conv2d(F.pad(zs, (k // 2,) * 4, mode="reflect"), self.kernels)
            r = torch.cat([F.relu(r), F.relu(-r)], dim=1)
            r = F.conv2d(F.pad(r, (3, 3, 3, 3), mode="replicate"), smooth, groups=r.shape[1])
            feats.append(F.grid_sample(r, grid, mode="bilinear", align_corners=False))
        trunk = torch.cat(feats, dim=1)  # (N, 132, g, g)
        return trunk, F.conv2d(trunk, self.projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the 384-channel teacher features."""
        return self.forward_with_trunk(x)[1]


def build_offline_teacher(kind: str, size: PdnSize, seed: int = 0) -> nn.Module:
    """Build an offline teacher: ``"filterbank"`` (default) or ``"random-pdn"``."""
    if kind == "filterbank":
        return FilterBankTeacher(seed=seed).eval().requires_grad_(False)
    if kind == "random-pdn":
        return random_pdn_teacher(size, seed)
    raise TeacherError(f"unknown offline teacher {kind!r}; choose one of {OFFLINE_KINDS}")


def load_backbone(spec: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Resolve ``"package.module:factory"`` to a backbone callable (factory() is called once).

    The callable maps an ImageNet-normalised batch (N, 3, H, W) to features (N, C, h, w).
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise TeacherError(f"backbone must be 'module:factory', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise TeacherError(f"cannot import backbone {spec!r}: {exc}") from exc
    backbone = factory()
    if isinstance(backbone, nn.Module):
        backbone.eval().requires_grad_(False)
    return backbone


def _distill_target(backbone: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grid: int) -> torch.Tensor:
    with torch.no_grad():
        f = backbone(x).float()
        f = F.interpolate(f, size=(grid, grid), mode="bilinear", align_corners=False)
        if f.shape[1] != TEACHER_CHANNELS:  # channel pooling as in §1.4
            n, c, h, w = f.shape
            f = F.adaptive_avg_pool1d(f.permute(0, 2, 3, 1).reshape(-1, 1, c), TEACHER_CHANNELS)
            f = f.reshape(n, h, w, TEACHER_CHANNELS).permute(0, 3, 1, 2)
    return f


#: Batches the distillation target's per-channel mean and std are taken over before training.
DISTILL_STAT_BATCHES: Final = 32
#: A channel's std is at least this fraction of the median channel's: a channel that is (nearly) silent
#: in the statistics batches would otherwise blow its later activations up to ~1e6 sigma.
DISTILL_STD_FLOOR: Final = 0.1


def distill_target_statistics(
    backbone: Callable[[torch.Tensor], torch.Tensor], batches: Iterator[torch.Tensor], n_batches: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (1, 384, 1, 1) of the distillation target over ``n_batches`` batches.

    Accumulated in float64 over every position (§1.4 takes them over ~10,000 images; one batch of 16
    is too few: a channel silent in it gets std ~0). The std is floored at :data:`DISTILL_STD_FLOOR`
    times the median channel's.
    """
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    total = torch.zeros(TEACHER_CHANNELS, dtype=torch.float64)
    total_sq = torch.zeros(TEACHER_CHANNELS, dtype=torch.float64)
    count = 0
    for _ in range(n_batches):
        x = next(batches)
        f = _distill_target(backbone, x, pdn_out_size(x.shape[-1], padding=True)).double()
        total += f.sum(dim=(0, 2, 3))
        total_sq += f.pow(2).sum(dim=(0, 2, 3))
        count += f.numel() // f.shape[1]
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(0.0).sqrt()
    std = std.clamp_min(max(DISTILL_STD_FLOOR * float(std.median()), 1e-6))
    return mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)


def distill_teacher(
    backbone: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterator[torch.Tensor],
    size: PdnSize,
    steps: int,
    lr: float = 1e-4,
    seed: int = 0,
    stat_batches: int = DISTILL_STAT_BATCHES,
) -> PDN:
    """Distil a backbone into a PDN teacher (§1.4 with the user's backbone instead of WRN-101).

    Args:
        backbone: maps an ImageNet-normalised batch to a feature map (any channels, any grid).
        batches: endless iterator of ImageNet-normalised batches (N, 3, H, W).
        size: PDN size of the teacher.
        steps: optimiser steps (the paper uses 60 000 at batch 16).
        lr: Adam learning rate (weight decay 1e-5 as in §1.4).
        seed: initialisation seed.
        stat_batches: batches drawn first for the target's normalisation
            (:func:`distill_target_statistics`).

    Returns:
        A frozen unpadded PDN (the padded training layout shares all weights, §1.4).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pdn = PDN(size, TEACHER_CHANNELS, padding=True)
    opt = torch.optim.Adam(pdn.parameters(), lr=lr, weight_decay=1e-5, fused=True)
    mean, std = distill_target_statistics(backbone, batches, stat_batches)
    for step in range(steps):
        x = next(batches)
        target = _distill_target(backbone, x, pdn_out_size(x.shape[-1], padding=True))
        loss = F.mse_loss(pdn(x), (target - mean) / std)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("distill_step", step=step, loss=loss.item())
    teacher = PDN(size, TEACHER_CHANNELS, padding=False)
    teacher.load_state_dict(pdn.state_dict())
    return teacher.eval().requires_grad_(False)
