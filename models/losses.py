"""Training losses of EfficientAD (SPACE_SPEC §1.6) and SPACE's spatial consistency loss (§2.4c).

Owns the hard feature loss, the penalty, the autoencoder and student-AE losses, the AE colour
augmentation, the invertible spatial augmentations of SCL with their validity and
augmentation-induced-anomaly masks, and SCL itself. All functions are pure tensor code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from models.networks import TEACHER_CHANNELS, pdn_out_size

QUANTILE_MAX_ELEMENTS = 2**24  # torch.quantile's input limit (anomalib subsamples the same way)
RF_SIZE = 33  # receptive field of one PDN output position
RF_STRIDE = 4


def hard_loss(
    t: torch.Tensor,
    s: torch.Tensor,
    q: float = 0.999,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Hard feature loss: mean of the squared differences at or above their ``q`` quantile (§1.6.1).

    Args:
        t: normalised teacher features (N, 384, g, g).
        s: the student's teacher head (N, 384, g, g).
        q: p_hard (0.999 in the paper; 0 gives plain MSE).
        mask: optional (N, 1, g, g) bool; only these positions count (SCL's masked hard loss).
        generator: RNG for the subsample when D has more than 2^24 elements.
    """
    d = (t.float() - s.float()).pow(2)
    if mask is not None:
        d = d[mask.expand_as(d)]
        if d.numel() == 0:
            return s.sum() * 0.0
    d = d.flatten()
    sample = d
    if d.numel() > QUANTILE_MAX_ELEMENTS:
        idx = torch.randint(d.numel(), (QUANTILE_MAX_ELEMENTS,), generator=generator, device=d.device)
        sample = d[idx]
    d_hard = torch.quantile(sample.detach(), q)
    return d[d >= d_hard].mean()


def penalty_loss(s_pen: torch.Tensor) -> torch.Tensor:
    """Penalty on out-of-distribution images: mean of the student's teacher head squared (§1.6.2)."""
    return s_pen[:, :TEACHER_CHANNELS].float().pow(2).mean()


def ae_loss(t_aug: torch.Tensor, a_aug: torch.Tensor) -> torch.Tensor:
    """Autoencoder loss: MSE between normalised teacher and AE output on the augmented image (§1.6.4)."""
    return (t_aug.float() - a_aug.float()).pow(2).mean()


def student_ae_loss(a_aug: torch.Tensor, s_aug: torch.Tensor) -> torch.Tensor:
    """Student-AE loss: MSE between AE output and the student's second head, no stop-gradient (§1.6.5)."""
    return (a_aug.float() - s_aug[:, TEACHER_CHANNELS:].float()).pow(2).mean()


def color_augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One of brightness / contrast / saturation with factor ~U(0.8, 1.2), per image (§1.6.3).

    Args:
        x: RGB batch in [0, 1] (N, 3, H, W).
        rng: the training RNG (keeps runs deterministic and resumable).
    """
    out = []
    for img in x:
        kind = int(rng.integers(3))
        f = float(rng.uniform(0.8, 1.2))
        gray = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).unsqueeze(0)
        if kind == 0:
            img = img * f
        elif kind == 1:
            img = (img - gray.mean()) * f + gray.mean()
        else:
            img = (img - gray) * f + gray
        out.append(img.clamp(0, 1))
    return torch.stack(out)


_OPS: dict[str, tuple[str, ...]] = {
    "hflip": ("flipw",),
    "vflip": ("fliph",),
    "rot1": ("transpose", "fliph"),  # == torch.rot90(k=1)
    "rot2": ("fliph", "flipw"),
    "rot3": ("transpose", "flipw"),
}


def flip_offset(side: int) -> int:
    """Pixels between the image's mirror axis and the unpadded PDN grid's (3 for 128 and 256 inputs).

    Output cell q sees pixels 4q .. 4q+32, so the grid is symmetric about (4(g-1)+32)/2, not (side-1)/2.
    Mirroring about the grid's axis instead makes flips and turns exact permutations of the grid.
    """
    return side - 1 - (RF_STRIDE * (pdn_out_size(side) - 1) + RF_SIZE - 1)


def _flip_image(x: torch.Tensor, dim: int) -> torch.Tensor:
    d = flip_offset(x.shape[dim])
    y = x.flip(dim)
    if d <= 0:
        return y
    # y[p] = x[side-1-p]; we want x[side-1-d-p] = y[p+d]; the last d pixels are outside every receptive field.
    kept = y.narrow(dim, d, y.shape[dim] - d)
    return torch.cat([kept, y.narrow(dim, y.shape[dim] - d, d)], dim=dim)


@dataclass(frozen=True)
class SpatialAug:
    """An exactly invertible spatial augmentation of the image and its warp on the feature grid.

    ``kind`` is ``hflip``, ``vflip``, ``rot`` (``k`` quarter turns, square inputs) or ``shift`` (``dy, dx``
    whole feature cells, i.e. 4 px each, with reflected fill). Flips and turns mirror the image about the
    PDN grid's axis (:func:`flip_offset`), so they permute the feature grid exactly; shifts are exact on
    the valid part given by :meth:`valid_mask`.
    """

    kind: Literal["hflip", "vflip", "rot", "shift"]
    k: int = 0
    dy: int = 0
    dx: int = 0

    def _ops(self) -> tuple[str, ...]:
        return _OPS[f"rot{self.k % 4}"] if self.kind == "rot" else _OPS[self.kind]

    def _grid_op(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        if self.kind == "shift":
            sign = -1 if inverse else 1
            return torch.roll(x, (sign * self.dy, sign * self.dx), dims=(-2, -1))
        if self.kind == "rot" and self.k % 4 == 0:
            return x
        for op in reversed(self._ops()) if inverse else self._ops():
            x = x.transpose(-2, -1) if op == "transpose" else x.flip(-1 if op == "flipw" else -2)
        return x

    def apply_image(self, x: torch.Tensor) -> torch.Tensor:
        """g(x) for an image batch (N, C, H, W)."""
        if self.kind != "shift":
            if self.kind == "rot" and self.k % 4 == 0:
                return x
            for op in self._ops():
                x = x.transpose(-2, -1) if op == "transpose" else _flip_image(x, -1 if op == "flipw" else -2)
            return x
        py, px = RF_STRIDE * self.dy, RF_STRIDE * self.dx
        # Shift with reflected fill: the fill region is excluded from SCL by valid_mask.
        padded = torch.nn.functional.pad(x, (max(px, 0), max(-px, 0), max(py, 0), max(-py, 0)), mode="reflect")
        h, w = x.shape[-2:]
        y0, x0 = max(-py, 0), max(-px, 0)
        return padded[..., y0 : y0 + h, x0 : x0 + w]

    def warp(self, f: torch.Tensor) -> torch.Tensor:
        """W_g: map features of x onto the grid of g(x)."""
        return self._grid_op(f, inverse=False)

    def unwarp(self, f: torch.Tensor) -> torch.Tensor:
        """W_g⁻¹: map features of g(x) back onto the grid of x."""
        return self._grid_op(f, inverse=True)

    def valid_mask(self, grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
        """V_g on the augmented grid (g, g) bool: receptive field inside real image content."""
        mask = torch.ones(grid, dtype=torch.bool, device=device)
        if self.kind != "shift":
            return mask
        gy, gx = grid
        qy = torch.arange(gy, device=device)
        qx = torch.arange(gx, device=device)
        # Position q of g(x) reads original cell q - d; it is valid if that cell exists on the grid.
        vy = (qy - self.dy >= 0) & (qy - self.dy < gy)
        vx = (qx - self.dx >= 0) & (qx - self.dx < gx)
        return mask & vy[:, None] & vx[None, :]


def sample_spatial_aug(
    rng: np.random.Generator, mode: Literal["geometric", "label_preserving"], square: bool, max_shift: int = 2
) -> SpatialAug:
    """Draw one SCL augmentation: flips/turns for textures, small shifts only for label-preserving mode."""
    if mode == "label_preserving":
        while True:
            dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
            if dy or dx:
                return SpatialAug("shift", dy=dy, dx=dx)
    choices = ["hflip", "vflip", "rot2", "shift"] + (["rot1", "rot3"] if square else [])
    pick = choices[int(rng.integers(len(choices)))]
    if pick.startswith("rot"):
        return SpatialAug("rot", k=int(pick[-1]))
    if pick == "shift":
        return sample_spatial_aug(rng, "label_preserving", square, max_shift)
    return SpatialAug(pick)  # type: ignore[arg-type]


def scl_mask(
    aug: SpatialAug, t_aug: torch.Tensor, t_clean: torch.Tensor, use_consistency: bool = True, q: float = 0.9
) -> torch.Tensor:
    """M = V_g ∧ (r ≤ quantile_q(r)) on the augmented grid, (N, 1, g, g) bool (§2.4c).

    r(p) = ‖T̂(g(x))_p − W_g(T̂(x))_p‖² / C: where the frozen teacher is not equivariant the augmentation
    made unnatural content, and SCL stays away from it. Ties at the quantile are kept: a PDN teacher is
    exactly equivariant to shifts by whole cells, so there r is 0 at every valid cell, and the spec's
    strict ``r < quantile`` kept none (SCL and the masked hard loss were 0 on every shift step).
    """
    n, _, gh, gw = t_aug.shape
    valid = aug.valid_mask((gh, gw), t_aug.device).expand(n, 1, gh, gw)
    if not use_consistency:
        return valid.clone()
    with torch.no_grad():
        r = (t_aug.float() - aug.warp(t_clean.float())).pow(2).mean(dim=1, keepdim=True)
        out = torch.zeros_like(valid)
        for i in range(n):
            vals = r[i][valid[i]]
            if vals.numel():
                out[i] = valid[i] & (r[i] <= torch.quantile(vals, q))
    return out


def scl_loss(aug: SpatialAug, s_aug: torch.Tensor, s_clean: torch.Tensor, mask_aug: torch.Tensor) -> torch.Tensor:
    """L_SCL = Σ_p M(p)·‖W_g⁻¹(S(g(x)))_p − sg[S(x)]_p‖² / (C·Σ_p M(p)) over both student heads.

    Args:
        aug: the augmentation g.
        s_aug: student output on g(x) (N, 768, g, g).
        s_clean: student output on x (detached here: the target is the student's own clean output).
        mask_aug: M on the augmented grid (N, 1, g, g) bool, from :func:`scl_mask`.
    """
    back = aug.unwarp(s_aug.float())
    m = aug.unwarp(mask_aug).float()
    per_pos = (back - s_clean.detach().float()).pow(2).mean(dim=1, keepdim=True)
    return (per_pos * m).sum() / m.sum().clamp_min(1.0)


def scl_weight(step: int, total_steps: int, weight: float, warmup_frac: float = 0.05) -> float:
    """λ_SCL for ``step``: 0 during the first 5 % of training, then ``weight`` (§2.4d)."""
    return 0.0 if step < math.ceil(warmup_frac * total_steps) else weight
