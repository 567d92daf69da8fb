"""Teacher sources: nelson1425-layout import, offline teachers, distillation from a stand-in backbone."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from models import teacher as teacher_module
from models.networks import PDN, pdn_out_size
from models.teacher import (
    DISTILL_STD_FLOOR,
    FilterBankTeacher,
    TeacherError,
    build_offline_teacher,
    distill_target_statistics,
    distill_teacher,
    load_backbone,
    load_published_teacher,
    map_teacher_keys,
    random_pdn_teacher,
)


def _nelson_sequential(size: str) -> nn.Sequential:
    """nelson1425's get_pdn_small / get_pdn_medium layer order (padding off)."""
    if size == "s":
        return nn.Sequential(
            nn.Conv2d(3, 128, 4), nn.ReLU(), nn.AvgPool2d(2, 2),
            nn.Conv2d(128, 256, 4), nn.ReLU(), nn.AvgPool2d(2, 2),
            nn.Conv2d(256, 256, 3), nn.ReLU(), nn.Conv2d(256, 384, 4),
        )
    return nn.Sequential(
        nn.Conv2d(3, 256, 4), nn.ReLU(), nn.AvgPool2d(2, 2),
        nn.Conv2d(256, 512, 4), nn.ReLU(), nn.AvgPool2d(2, 2),
        nn.Conv2d(512, 512, 1), nn.ReLU(), nn.Conv2d(512, 512, 3), nn.ReLU(),
        nn.Conv2d(512, 384, 4), nn.ReLU(), nn.Conv2d(384, 384, 1),
    )


@pytest.mark.parametrize("size", ["s", "m"])
def test_import_nelson_layout_reproduces_the_reference_network(size: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = _nelson_sequential(size).eval()
    path = tmp_path / f"teacher_{size}.pth"
    torch.save(ref.state_dict(), path)
    teacher = load_published_teacher(path, size)  # type: ignore[arg-type]
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), ref(x))
    assert not any(p.requires_grad for p in teacher.parameters())


def test_import_anomalib_prefixed_keys(tmp_path: Path) -> None:
    pdn = PDN("s")
    path = tmp_path / "full.pth"
    torch.save({f"teacher.{k}": v for k, v in pdn.state_dict().items()} | {"student.conv1.weight": torch.zeros(1)}, path)
    teacher = load_published_teacher(path, "s")
    assert torch.equal(teacher.conv4.weight, pdn.conv4.weight)


def test_import_rejects_wrong_size_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "small.pth"
    torch.save(_nelson_sequential("s").state_dict(), path)
    with pytest.raises(TeacherError, match="PDN-M"):
        load_published_teacher(path, "m")
    with pytest.raises(TeacherError, match="not found"):
        load_published_teacher(tmp_path / "nope.pth", "s")
    bad = _nelson_sequential("s").state_dict()
    bad["8.weight"] = torch.zeros(384, 256, 3, 3)
    torch.save(bad, path)
    with pytest.raises(TeacherError, match="shape"):
        load_published_teacher(path, "s")


def test_import_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    torch.save(_nelson_sequential("s"), path)  # a whole module, which needs unpickling code
    with pytest.raises(TeacherError, match="cannot read"):
        load_published_teacher(path, "s")


def test_map_teacher_keys_rejects_non_conv_index() -> None:
    with pytest.raises(TeacherError, match="not a conv"):
        map_teacher_keys({"1.weight": torch.zeros(1)}, "s")


def test_filter_bank_is_deterministic_and_on_the_pdn_grid() -> None:
    a, b = FilterBankTeacher(), FilterBankTeacher()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        trunk, out = a.forward_with_trunk(x)
        assert torch.equal(out, b(x))
    assert out.shape == (2, 384, pdn_out_size(128), pdn_out_size(128))
    assert trunk.shape[1] == a.trunk_channels
    assert not torch.equal(FilterBankTeacher(seed=1).projection, a.projection)


def test_filter_bank_responds_locally() -> None:
    teacher = FilterBankTeacher()
    x = torch.zeros(1, 3, 128, 128)
    y = x.clone()
    y[..., 60:68, 60:68] = 2.0  # a spot near the centre
    with torch.no_grad():
        diff = (teacher(x) - teacher(y)).abs().sum(1)[0]
    g = pdn_out_size(128)
    assert diff.argmax() // g in range(g // 2 - 3, g // 2 + 3)
    assert diff[0, 0] == 0


def test_random_pdn_is_seeded_and_frozen() -> None:
    a, b = random_pdn_teacher("s", 3), random_pdn_teacher("s", 3)
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, random_pdn_teacher("s", 4).conv1.weight)
    with pytest.raises(TeacherError):
        build_offline_teacher("imagenet", "s")


class TinyBackbone(nn.Module):
    """Stand-in for a pretrained backbone: stride-4 local colour means and their squares (6 channels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = torch.nn.functional.avg_pool2d(x, 4)
        return torch.cat([m, m * m], dim=1)


def tiny_backbone() -> nn.Module:
    return TinyBackbone()


def test_distillation_from_a_user_backbone_lowers_the_loss() -> None:
    backbone = load_backbone("tests.test_models.test_teacher:tiny_backbone")
    gen = torch.Generator().manual_seed(0)

    def smooth(n: int, g: torch.Generator) -> torch.Tensor:
        return torch.nn.functional.interpolate(torch.randn(n, 3, 16, 16, generator=g), size=(64, 64), mode="bilinear")

    def batches():
        while True:
            yield smooth(2, gen)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the initialisation distill_teacher(seed=0) starts from
        untrained = PDN("s", padding=True)
    trained = distill_teacher(backbone, batches(), "s", steps=40, lr=2e-3)
    assert not trained.padding and trained(torch.zeros(1, 3, 128, 128)).shape == (1, 384, 24, 24)
    padded = PDN("s", padding=True)
    padded.load_state_dict(trained.state_dict())
    x = smooth(4, torch.Generator().manual_seed(9))
    with torch.no_grad():
        target = backbone(x)
        target = torch.nn.functional.interpolate(target, size=(16, 16), mode="bilinear")
        target = torch.nn.functional.adaptive_avg_pool1d(target.permute(0, 2, 3, 1).reshape(-1, 1, 6), 384)
        target = target.reshape(4, 16, 16, 384).permute(0, 3, 1, 2)
        target = (target - target.mean((0, 2, 3), keepdim=True)) / (target.std((0, 2, 3), keepdim=True) + 1e-6)
        before = torch.nn.functional.mse_loss(untrained(x), target)
        after = torch.nn.functional.mse_loss(padded(x), target)
    assert after < 0.7 * before


def test_load_backbone_errors() -> None:
    with pytest.raises(TeacherError, match="module:factory"):
        load_backbone("no_colon")
    with pytest.raises(TeacherError, match="cannot import"):
        load_backbone("tests.test_models.test_teacher:missing")


def _late_channel_backbone(x: torch.Tensor) -> torch.Tensor:
    """384 channels; channel 0 fires only on bright images, channel 1 never."""
    f = torch.nn.functional.avg_pool2d(x, 8).mean(1, keepdim=True).repeat(1, 384, 1, 1)
    f[:, 0] = torch.relu(f[:, 0] - 1.5)
    f[:, 1] = 0.0
    return f


def _dark_then_bright() -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    for i in itertools.count():
        x = torch.randn(4, 3, 64, 64, generator=gen) * 0.2
        if i > 0:
            x[0] += 3.0  # a bright image in every batch after the first
        yield x


def test_target_statistics_floor_a_silent_channel_at_a_tenth_of_the_median_std() -> None:
    mean, std = distill_target_statistics(_late_channel_backbone, _dark_then_bright(), 4)
    assert mean.shape == std.shape == (1, 384, 1, 1)
    median = float(std.flatten()[2:].median())
    assert float(std[0, 1]) == pytest.approx(DISTILL_STD_FLOOR * median, rel=1e-5)  # never fires
    assert float(std[0, 0]) > 0.1 * median  # fires in batches 2-4: its own spread, not the first batch's ~0


def test_distillation_loss_stays_bounded_when_a_channel_is_silent_in_the_first_batch(monkeypatch) -> None:
    # Normalised with the first batch's std (+1e-6), the channel's later targets were ~1e6 sigma: loss 1e9.
    losses: list[float] = []
    mse = torch.nn.functional.mse_loss

    def spy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        loss = mse(a, b)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(teacher_module.F, "mse_loss", spy)
    distill_teacher(_late_channel_backbone, _dark_then_bright(), "s", steps=3, stat_batches=4)
    assert len(losses) == 3 and max(losses) < 100, losses
