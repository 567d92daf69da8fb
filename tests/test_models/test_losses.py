"""Each loss against a hand computation on tiny tensors (SPACE_SPEC §1.6, §2.4c)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.losses import (
    SpatialAug,
    ae_loss,
    color_augment,
    hard_loss,
    penalty_loss,
    sample_spatial_aug,
    scl_loss,
    scl_mask,
    scl_weight,
    student_ae_loss,
)


def test_hard_loss_is_mean_above_the_quantile() -> None:
    torch.manual_seed(0)
    t, s = torch.randn(1, 384, 4, 4), torch.randn(1, 384, 4, 4)
    d = ((t - s) ** 2).flatten().numpy().astype(np.float64)
    q = np.quantile(d, 0.999)  # linear interpolation, as torch.quantile
    expected = d[d >= q].mean()
    assert hard_loss(t, s).item() == pytest.approx(expected, rel=1e-5)
    assert (d >= q).sum() == 7  # 6144 elements: the top 0.1 % plus the interpolated edge


def test_hard_loss_with_q0_is_mse_and_mask_restricts_positions() -> None:
    t = torch.zeros(1, 2, 2, 2)
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 2.0]]]])
    assert hard_loss(t, s, q=0.0).item() == pytest.approx((1 + 4 + 9 + 16 + 4) / 8)
    mask = torch.tensor([[[[True, False], [False, False]]]])
    assert hard_loss(t, s, q=0.0, mask=mask).item() == pytest.approx(0.5)  # (1 + 0) / 2
    assert hard_loss(t, s, q=0.5, mask=torch.zeros_like(mask)).item() == 0.0


def test_penalty_uses_only_the_teacher_head() -> None:
    s = torch.zeros(1, 768, 1, 1)
    s[0, :384] = 2.0
    s[0, 384:] = 100.0
    assert penalty_loss(s).item() == pytest.approx(4.0)


def test_ae_and_student_ae_losses() -> None:
    t = torch.ones(1, 384, 2, 2)
    a = torch.zeros(1, 384, 2, 2)
    assert ae_loss(t, a).item() == pytest.approx(1.0)
    s = torch.zeros(1, 768, 2, 2)
    s[0, 384:] = 3.0
    s[0, :384] = 50.0
    assert student_ae_loss(a, s).item() == pytest.approx(9.0)


def test_student_ae_loss_sends_gradient_to_both() -> None:
    a = torch.randn(1, 384, 2, 2, requires_grad=True)
    s = torch.randn(1, 768, 2, 2, requires_grad=True)
    student_ae_loss(a, s).backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert s.grad is not None and s.grad[:, 384:].abs().sum() > 0 and s.grad[:, :384].abs().sum() == 0


@pytest.mark.parametrize(
    "aug",
    [SpatialAug("hflip"), SpatialAug("vflip"), SpatialAug("rot", k=1), SpatialAug("rot", k=3),
     SpatialAug("shift", dy=1, dx=-2)],
)
def test_spatial_aug_unwarp_inverts_warp(aug: SpatialAug) -> None:
    f = torch.randn(1, 3, 6, 6)
    assert torch.equal(aug.unwarp(aug.warp(f)), f)


def test_shift_moves_features_by_whole_cells_and_masks_the_fill() -> None:
    aug = SpatialAug("shift", dy=1, dx=0)
    x = torch.arange(16 * 16, dtype=torch.float32).view(1, 1, 16, 16)
    y = aug.apply_image(x)
    assert torch.equal(y[..., 4:, :], x[..., :12, :])  # content moved down by 4 px = one cell
    valid = aug.valid_mask((5, 5))
    assert not valid[0].any() and valid[1:].all()


def test_scl_loss_hand_computed_for_a_flip() -> None:
    aug = SpatialAug("hflip")
    s_clean = torch.zeros(1, 2, 1, 2)
    s_aug = torch.tensor([[[[1.0, 3.0]], [[1.0, 3.0]]]])  # on the flipped grid
    mask = torch.tensor([[[[True, False]]]])  # augmented-grid position 0 <-> original position 1
    # unwarp: back = [[3, 1]], mask -> [False, True]: only original position 1 counts, value 1.
    assert scl_loss(aug, s_aug, s_clean, mask).item() == pytest.approx(1.0)
    full = torch.ones_like(mask)
    assert scl_loss(aug, s_aug, s_clean, full).item() == pytest.approx((9 + 1) / 2)


def test_scl_loss_stops_gradient_into_the_clean_target() -> None:
    aug = SpatialAug("vflip")
    s_clean = torch.randn(1, 4, 3, 3, requires_grad=True)
    s_aug = torch.randn(1, 4, 3, 3, requires_grad=True)
    scl_loss(aug, s_aug, s_clean, torch.ones(1, 1, 3, 3, dtype=torch.bool)).backward()
    assert s_clean.grad is None
    assert s_aug.grad is not None


def test_scl_mask_drops_positions_where_teacher_is_not_equivariant() -> None:
    aug = SpatialAug("hflip")
    t_clean = torch.zeros(1, 4, 4, 4)
    t_aug = torch.zeros(1, 4, 4, 4)
    t_aug[0, :, 0, 0] = 5.0  # one inconsistent position
    t_aug[0, :, 1, :] = torch.arange(4.0).view(1, 4)  # graded inconsistency
    mask = scl_mask(aug, t_aug, t_clean)
    assert mask.shape == (1, 1, 4, 4)
    assert not mask[0, 0, 0, 0]
    assert mask.sum() < 16
    assert scl_mask(aug, t_aug, t_clean, use_consistency=False).all()


def test_scl_mask_keeps_every_valid_cell_where_the_teacher_is_exactly_equivariant() -> None:
    # A PDN teacher shifted by whole cells: r = 0 at every valid cell. r < quantile(r) kept none, so
    # SCL did nothing on shift steps (every step with --scl-augment label_preserving).
    aug = SpatialAug("shift", dy=1, dx=0)
    t = torch.randn(2, 4, 6, 6)
    t_aug = aug.warp(t)
    mask = scl_mask(aug, t_aug, t)
    valid = aug.valid_mask((6, 6), t.device).expand(2, 1, 6, 6)
    assert valid.any() and torch.equal(mask, valid)


def test_scl_weight_has_a_five_percent_warmup() -> None:
    assert scl_weight(0, 100, 1.0) == 0.0
    assert scl_weight(4, 100, 1.0) == 0.0
    assert scl_weight(5, 100, 2.0) == 2.0


def test_label_preserving_mode_only_shifts() -> None:
    rng = np.random.default_rng(0)
    kinds = {sample_spatial_aug(rng, "label_preserving", square=True).kind for _ in range(50)}
    assert kinds == {"shift"}
    geometric = {sample_spatial_aug(rng, "geometric", square=True).kind for _ in range(200)}
    assert geometric == {"hflip", "vflip", "rot", "shift"}


def test_color_augment_is_seeded_and_bounded() -> None:
    x = torch.rand(3, 3, 8, 8)
    a = color_augment(x, np.random.default_rng(1))
    b = color_augment(x, np.random.default_rng(1))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, x)


@pytest.mark.parametrize(
    "aug", [SpatialAug("hflip"), SpatialAug("vflip"), SpatialAug("rot", k=1), SpatialAug("rot", k=2),
            SpatialAug("rot", k=3), SpatialAug("shift", dy=-1, dx=2)],
)
def test_augmentations_permute_the_receptive_field_grid_exactly(aug: SpatialAug) -> None:
    """Which grid cells see a pixel (33x33 fields, stride 4) must move exactly as W_g says."""
    probe = torch.zeros(1, 1, 128, 128)
    probe[..., 20, 36] = 1.0
    probe[..., 90, 7] = 1.0
    cells = torch.nn.functional.max_pool2d(probe, 33, stride=4)  # (1, 1, 24, 24), like the PDN grid
    cells_aug = torch.nn.functional.max_pool2d(aug.apply_image(probe), 33, stride=4)
    valid = aug.valid_mask(cells.shape[-2:])[None, None]
    assert cells.sum() > 0
    assert torch.equal(aug.warp(cells)[valid], cells_aug[valid])


def test_shift_is_exact_for_a_real_pdn() -> None:
    from models.networks import PDN

    torch.manual_seed(0)
    pdn = PDN("s").eval()
    aug = SpatialAug("shift", dy=-1, dx=2)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        expected, got = aug.warp(pdn(x)), pdn(aug.apply_image(x))
    valid = aug.valid_mask(got.shape[-2:]).expand_as(got)
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-4, atol=1e-4)
