"""Shapes and parameter counts of the networks against SPACE_SPEC §1.2-1.3."""

from __future__ import annotations

import pytest
import torch

from models.networks import (
    PDN,
    AutoEncoder,
    FeatureConverter,
    Student,
    count_parameters,
    decoder_sizes,
    pdn_out_size,
)


@pytest.mark.parametrize(
    ("size", "teacher_m", "student_m"), [("s", 2.69, 4.27), ("m", 8.03, 11.62)]
)
def test_pdn_parameter_counts_match_spec(size: str, teacher_m: float, student_m: float) -> None:
    assert round(count_parameters(PDN(size, 384)) / 1e6, 2) == teacher_m
    assert round(count_parameters(PDN(size, 768)) / 1e6, 2) == student_m


def test_autoencoder_parameter_count_matches_spec() -> None:
    assert round(count_parameters(AutoEncoder((256, 256))) / 1e6, 2) == 1.10


def test_pdn_grid_sizes() -> None:
    assert pdn_out_size(256) == 56
    assert pdn_out_size(256, padding=True) == 64
    assert pdn_out_size(128) == 24
    x = torch.zeros(1, 3, 128, 128)
    with torch.no_grad():
        assert PDN("s")(x).shape == (1, 384, 24, 24)
        assert PDN("m", 768)(x).shape == (1, 768, 24, 24)
        assert PDN("s", padding=True)(x).shape == (1, 384, 32, 32)
        trunk, _ = PDN("s").forward_with_trunk(x)
        assert trunk.shape == (1, 256, 27, 27)


def test_decoder_sizes_follow_generic_formula() -> None:
    assert decoder_sizes(256) == [3, 8, 15, 32, 63, 127]
    assert decoder_sizes(128) == [1, 4, 7, 16, 31, 63]
    assert decoder_sizes(64) == [1, 2, 3, 8, 15, 31]  # first stage clamped from 0


@pytest.mark.parametrize("side", [64, 128, 160, 256])
def test_autoencoder_adapts_to_input_size(side: int) -> None:
    ae = AutoEncoder((side, side))
    assert ae.encoder[-1].kernel_size == (side // 32, side // 32)
    with torch.no_grad():
        out = ae(torch.zeros(1, 3, side, side))
    assert out.shape == (1, 384, pdn_out_size(side), pdn_out_size(side))


@pytest.mark.parametrize("side", [100, 32, 48])
def test_autoencoder_rejects_bad_sizes(side: int) -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        AutoEncoder((side, side))


def test_fm_starts_at_zero_so_space_starts_as_efficientad() -> None:
    torch.manual_seed(0)
    student = Student("s", fe_channels=132, use_fm=True).eval()
    x = torch.randn(2, 3, 128, 128)
    fe = torch.randn(2, 132, 24, 24)
    with torch.no_grad():
        assert torch.equal(student(x, fe), student.pdn(x))


def test_fm_gate_is_a_sigmoid_of_trunk_and_converted_features() -> None:
    fm = FeatureConverter(8, 4, out_channels=6, hidden=5, dropout=0.0).eval()
    torch.nn.init.ones_(fm.conv3.weight)
    fe, trunk = torch.randn(1, 8, 3, 3), torch.randn(1, 4, 3, 3)
    with torch.no_grad():
        h = torch.relu(fm.conv2(torch.relu(fm.conv1(fe))))
        gate = torch.sigmoid(fm.gate(torch.cat([trunk, h], 1)))
        torch.testing.assert_close(fm(fe, trunk), gate * fm.conv3(h))
    assert ((gate > 0) & (gate < 1)).all()


def test_student_without_fm_uses_plain_projection_and_needs_fe() -> None:
    student = Student("s", fe_channels=16, use_fm=False)
    assert student.fm is None and student.fe_proj is not None
    with pytest.raises(ValueError, match="fe="):
        student(torch.zeros(1, 3, 128, 128))


def test_inplace_relus_give_the_out_of_place_outputs_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """The networks rectify conv outputs in place (no fresh buffer per activation: 1.05-1.13x on CPU);
    forward values and every parameter's gradient must equal the out-of-place reference."""
    import types

    import torch.nn.functional as F

    import models.networks as networks

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        student = Student("s", fe_channels=256, use_fm=True, fm_dropout=0.0)
        ae = AutoEncoder((64, 64))
        with torch.no_grad():  # a non-zero FM output, so its relus reach the loss
            student.fm.conv3.weight.normal_(0, 0.1)  # type: ignore[union-attr]
        x = torch.randn(2, 3, 64, 64)
        fe = torch.randn(2, 256, 11, 11)  # the trunk grid at 64 px (g = 8, g + 3 = 11)
        out = torch.cat([student(x, fe), ae(x)], dim=1)
        out.pow(2).mean().backward()
        params = {f"s.{n}": p for n, p in student.named_parameters()} | {f"a.{n}": p for n, p in ae.named_parameters()}
        return out.detach(), {n: p.grad.clone() for n, p in params.items() if p.grad is not None}

    out_inplace, grads_inplace = run()
    functional = types.SimpleNamespace(**{k: getattr(F, k) for k in dir(F) if not k.startswith("__")})
    functional.relu = lambda t, inplace=False: F.relu(t)  # the reference ignores inplace=True
    monkeypatch.setattr(networks, "F", functional)
    relu_module = torch.nn.ReLU
    monkeypatch.setattr(torch.nn, "ReLU", lambda inplace=False: relu_module())
    out_ref, grads_ref = run()
    assert torch.equal(out_inplace, out_ref)
    assert grads_inplace.keys() == grads_ref.keys() and len(grads_ref) > 20
    for name, grad in grads_ref.items():
        assert torch.equal(grads_inplace[name], grad), name
