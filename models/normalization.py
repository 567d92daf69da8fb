"""Model normalisation after training: teacher channel statistics, map quantiles, validation scores, threshold.

Owns the numbers that turn raw distances into the quantile-normalised scale of SPACE_SPEC §1.5 and §1.8
(teacher mean/std over the training images; q_a = 0.9 and q_b = 0.995 of validation-normal pixels per
branch) and the default decision threshold stored in the model card.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from models.artifact import ScoreStats
from models.model import SpaceModel
from models.networks import TEACHER_CHANNELS

THRESHOLD_METHOD = "max(q99 + 0.25*(q99 - q50), max + 0.05*ln(50/n)) of the n validation normal image scores"
# Small-sample floor of the default threshold: with n < 50 validation images, the threshold is at least the
# expected maximum of 50 normal scores, extrapolated from the n seen: max + scale*ln(50/n) (Gumbel law of
# a maximum). The scale is in the normalised map unit (q_a -> 0, q_b -> 0.1 per branch, SPACE_SPEC §1.8):
# 0.1/ln 20 = 0.033 for a pixel tail exponential through q_a and q_b; measured 0.038-0.052 on trained
# synthetic lines, so 0.05 (docs/model.md, "Calibration and the default threshold").
FLOOR_SCALE = 0.05
FLOOR_N = 50


def to_tensor(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float in [0, 1], channels_last, on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def teacher_statistics(model: SpaceModel, images: np.ndarray, device: torch.device, batch: int = 8) -> None:
    """Set the teacher's per-channel mean/std over all positions of the training images (§1.5)."""
    total = torch.zeros(TEACHER_CHANNELS, dtype=torch.float64, device=device)
    total_sq = torch.zeros_like(total)
    count = 0
    for i in range(0, len(images), batch):
        t = model.teacher(model.normalize(to_tensor(images[i : i + batch], device))).double()
        total += t.sum(dim=(0, 2, 3))
        total_sq += t.pow(2).sum(dim=(0, 2, 3))
        count += t.shape[0] * t.shape[2] * t.shape[3]
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    model.teacher_mean.copy_(mean.float().view(1, -1, 1, 1))
    model.teacher_std.copy_(std.float().view(1, -1, 1, 1))


@torch.no_grad()
def calibrate(model: SpaceModel, images: np.ndarray, device: torch.device, autocast: torch.dtype | None) -> np.ndarray:
    """Set map quantiles (q_a=0.9, q_b=0.995 of validation pixels, per branch) and return image scores."""
    model.eval()
    st_maps, ae_maps = [], []
    for i in range(0, len(images), 8):
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            st, ae = model.branch_maps(to_tensor(images[i : i + 8], device))
        st_maps.append(st.float().flatten())
        ae_maps.append(ae.float().flatten())
    q = []
    for maps in (torch.cat(st_maps), torch.cat(ae_maps)):
        sample = maps[torch.randperm(maps.numel(), generator=torch.Generator().manual_seed(0))[: 2**24]]
        q += [float(torch.quantile(sample, 0.9)), float(torch.quantile(sample, 0.995))]
    model.quantiles.copy_(torch.tensor(q))
    model.calibrated.fill_(True)
    scores = []
    for i in range(0, len(images), 8):
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            m = model.anomaly_map(to_tensor(images[i : i + 8], device))
        scores.append(m.float().flatten(1).amax(dim=1).cpu())
    return torch.cat(scores).numpy()


def score_stats(scores: np.ndarray) -> ScoreStats:
    """Summary of validation image scores."""
    s = scores.astype(np.float64)
    qs = np.quantile(s, [0.5, 0.9, 0.99])
    return ScoreStats(
        n=len(s),
        mean=float(s.mean()),
        std=float(s.std()),
        min=float(s.min()),
        q50=float(qs[0]),
        q90=float(qs[1]),
        q99=float(qs[2]),
        max=float(s.max()),
    )


def small_sample_margin(n: int) -> float:
    """Margin above the highest of ``n`` validation scores: ``FLOOR_SCALE * ln(FLOOR_N / n)``, 0 from n = 50.

    If normal image scores follow a Gumbel law of scale ``FLOOR_SCALE``, the maximum of ``n`` lies
    ``FLOOR_SCALE * ln(FLOOR_N / n)`` below the maximum of ``FLOOR_N`` on average, and a new normal image
    exceeds ``max + margin`` with probability ``1 / (FLOOR_N + 1)`` (2 %) in expectation.
    (n = 1: 0.196, 2: 0.161, 5: 0.115, 10: 0.080, 20: 0.046.)
    """
    return FLOOR_SCALE * max(math.log(FLOOR_N / max(n, 1)), 0.0)


def default_threshold(stats: ScoreStats) -> float:
    """Default threshold: q99 of the validation normal scores plus a quarter of the q50-q99 spread.

    With few validation images q99 is about their maximum and the spread is unknown (one image: zero), so
    that rule alone flags up to half of new normal parts; the threshold is at least
    ``max + small_sample_margin(n)``, a margin in the map's own normalised scale.
    """
    rule = stats.q99 + 0.25 * max(stats.q99 - stats.q50, 0.0)
    return max(rule, stats.max + small_sample_margin(stats.n))
