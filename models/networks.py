"""Networks of EfficientAD and SPACE: PDN-S/M, the autoencoder, the Feature converter Module, the student.

Layer tables follow SPACE_SPEC.md §1.2-1.3 (EfficientAD) and §2.4 (our SPACE reconstruction). Nothing here
loads files or knows about foreign checkpoint layouts: key mapping lives in :mod:`models.teacher`.
Every network takes an ImageNet-normalised float tensor (N, 3, H, W); the normalisation itself is done
once by :class:`models.model.SpaceModel`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

PdnSize = Literal["s", "m"]
#: How :class:`Student` brings the FE and its own trunk (the FM gate input) from the trunk grid to the output
#: grid: ``"align_corners"`` is the original bilinear ``align_corners=True`` resize (1.5 cells off at the
#: borders), ``"receptive_field"`` the 2x2 mean centred on the output cell; see :func:`to_output_grid`.
FeAlign = Literal["align_corners", "receptive_field"]
#: ``fe_align`` of new models (``ModelConfig()``, :class:`Student`); stored configs without the key load as
#: ``models.model.LEGACY_FE_ALIGN``.
DEFAULT_FE_ALIGN: FeAlign = "receptive_field"

TEACHER_CHANNELS = 384
STUDENT_CHANNELS = 2 * TEACHER_CHANNELS
AE_LATENT = 64
MIN_INPUT_SIZE = 64  # below 128 the first decoder stage is clamped to 1 (H/64 - 1 would be 0)


PDN_STRIDE = 4  # pixels between neighbouring PDN grid cells (two stride-2 poolings)


def pdn_rf_centre(padding: bool = False) -> int:
    """Pixel (pixel-centre coordinates) of the receptive-field centre of grid cell 0; cell q's is ``4q + centre``.

    Unpadded: each conv of kernel k moves the centre by (k-1)/2 and each 2x2 pooling maps cell p to
    2p + 0.5, so PDN-S/M cell q sees pixels 4q..4q+32, centred on 4q + 16. Padded ("paper layout"): the
    k4 convs pad 3 (centre moves by -1.5), the k3 conv pads 1 (0) and the poolings pad 1 (2p - 0.5),
    which gives 4q + 0. The filter-bank teacher samples at the same points (:class:`models.teacher.
    FilterBankTeacher`); ``bench/geometry.py --probe map`` measures all four.
    """
    return 0 if padding else 16


def pdn_out_size(size: int, padding: bool = False) -> int:
    """Side of the PDN feature grid for an input side ``size`` (256 -> 56 unpadded, 64 padded)."""
    if padding:
        return math.ceil(size / 4)
    s = size - 3  # conv k4
    s = s // 2  # avgpool k2 s2
    s = s - 3  # conv k4
    s = s // 2
    s = s - 2  # conv k3
    return s - 3  # conv k4


def to_output_grid(x: torch.Tensor, grid: tuple[int, int], fe_align: FeAlign) -> torch.Tensor:
    """Bring a trunk-grid activation (N, C, g+3, g+3) to the PDN output grid (N, C, g, g), per ``fe_align``.

    The PDN's output conv (k4, no padding) makes output cell j from trunk cells j..j+3, so output cell j sits
    on trunk position j + 1.5, padded or not, PDN-S or PDN-M (every layer before it only moves both grids
    together). ``"receptive_field"``: the mean of trunk cells j+1 and j+2 (rows and columns), centred
    exactly there: ``avg_pool2d(x[..., 1:-1, 1:-1], 2, stride=1)``, which equals
    ``avg_pool2d(x, 2, stride=1)[..., 1:-1, 1:-1]``; an input already on the output grid (the filter-bank
    teacher's FE, sampled at the cells' receptive-field centres) is returned as it is; any other size is
    refused. Keeps the input's dtype (bf16 stays bf16) and branches only on static shapes, so it traces as
    one graph (CUDA graphs, ``torch.compile``). ``"align_corners"``: the original
    ``F.interpolate(..., align_corners=True)`` to ``grid`` (any input size), bit for bit; it samples
    position j·(g+2)/(g−1), exact at the centre but 1.5 cells towards the image border at the edge cells.
    """
    if fe_align == "align_corners":
        return F.interpolate(x, size=grid, mode="bilinear", align_corners=True)
    h, w = x.shape[-2:]
    if (h, w) == tuple(grid):
        return x
    if (h - 3, w - 3) != tuple(grid):
        raise ValueError(
            f"fe_align 'receptive_field' needs the output grid {tuple(grid)} or the trunk grid (+3), got {(h, w)}"
        )
    return F.avg_pool2d(x[..., 1:-1, 1:-1], 2, stride=1)


def pdn_trunk_channels(size: PdnSize) -> int:
    """Channels of the activation that feeds the PDN's output conv(s) (the FE in SPACE)."""
    return 256 if size == "s" else 512


class PDN(nn.Module):
    """Patch Description Network, small (4 convs) or medium (6 convs), SPACE_SPEC §1.2.

    Attribute names follow anomalib (``conv1``...``conv6``); :func:`models.teacher.map_teacher_keys`
    translates nelson1425's ``Sequential`` indices to these names.
    """

    def __init__(self, size: PdnSize = "s", out_channels: int = TEACHER_CHANNELS, padding: bool = False) -> None:
        """Build the layers.

        Args:
            size: ``"s"`` (EfficientAD-S) or ``"m"`` (EfficientAD-M).
            out_channels: 384 for a teacher, 768 for a student.
            padding: the "paper layout" with padded convs (64x64 grid for 256 input); off by default.
        """
        super().__init__()
        if size not in ("s", "m"):
            raise ValueError(f"PDN size must be 's' or 'm', got {size!r}")
        self.size: PdnSize = size
        self.out_channels = out_channels
        self.padding = padding
        p3, p1 = (3, 1) if padding else (0, 0)
        self.avgpool1 = nn.AvgPool2d(2, 2, padding=p1)
        self.avgpool2 = nn.AvgPool2d(2, 2, padding=p1)
        if size == "s":
            self.conv1 = nn.Conv2d(3, 128, 4, padding=p3)
            self.conv2 = nn.Conv2d(128, 256, 4, padding=p3)
            self.conv3 = nn.Conv2d(256, 256, 3, padding=p1)
            self.conv4 = nn.Conv2d(256, out_channels, 4)
        else:
            self.conv1 = nn.Conv2d(3, 256, 4, padding=p3)
            self.conv2 = nn.Conv2d(256, 512, 4, padding=p3)
            self.conv3 = nn.Conv2d(512, 512, 1)
            self.conv4 = nn.Conv2d(512, 512, 3, padding=p1)
            self.conv5 = nn.Conv2d(512, out_channels, 4)
            self.conv6 = nn.Conv2d(out_channels, out_channels, 1)

    @property
    def trunk_channels(self) -> int:
        """Channels of :meth:`forward_with_trunk`'s first output."""
        return pdn_trunk_channels(self.size)

    def forward_with_trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (trunk activation before the output conv, output features)."""
        x = self.avgpool1(F.relu(self.conv1(x), inplace=True))
        x = self.avgpool2(F.relu(self.conv2(x), inplace=True))
        if self.size == "s":
            trunk = F.relu(self.conv3(x), inplace=True)  # (N, 256, g+3, g+3)
            return trunk, self.conv4(trunk)
        x = F.relu(self.conv3(x), inplace=True)
        trunk = F.relu(self.conv4(x), inplace=True)  # (N, 512, g+3, g+3)
        return trunk, self.conv6(F.relu(self.conv5(trunk), inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the output features (N, out_channels, g, g)."""
        return self.forward_with_trunk(x)[1]


def decoder_sizes(input_size: int) -> list[int]:
    """Sizes of the six decoder upsampling stages (anomalib's generic formulas, §1.3, each at least 1)."""
    h = input_size
    return [max(1, s) for s in (h // 64 - 1, h // 32, h // 16 - 1, h // 8, h // 4 - 1, h // 2 - 1)]


class AutoEncoder(nn.Module):
    """EfficientAD autoencoder (global/logical branch), §1.3, adapted to the input size.

    The encoder's last conv has kernel ``input/32`` so the bottleneck is 1x1 for any input that is a
    multiple of 32 (8 for 256, 4 for 128).
    """

    def __init__(
        self,
        input_size: tuple[int, int] = (256, 256),
        padding: bool = False,
        out_channels: int = TEACHER_CHANNELS,
    ) -> None:
        """Build encoder and decoder for ``input_size`` (h, w), both multiples of 32 and >= 64."""
        super().__init__()
        h, w = input_size
        if h % 32 or w % 32 or min(h, w) < MIN_INPUT_SIZE:
            raise ValueError(f"input size must be multiples of 32 and >= {MIN_INPUT_SIZE}, got {input_size}")
        self.input_size = (h, w)
        self.out_size = (pdn_out_size(h, padding), pdn_out_size(w, padding))
        self.sizes = list(zip(decoder_sizes(h), decoder_sizes(w), strict=True))
        enc: list[nn.Module] = []
        for cin, cout in ((3, 32), (32, 32), (32, 64), (64, 64), (64, 64)):
            enc += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
        enc.append(nn.Conv2d(64, AE_LATENT, (h // 32, w // 32)))
        self.encoder = nn.Sequential(*enc)
        self.dec_convs = nn.ModuleList([nn.Conv2d(AE_LATENT if i == 0 else 64, 64, 4, padding=2) for i in range(6)])
        self.dropout = nn.Dropout(0.2)
        self.dec_conv7 = nn.Conv2d(64, 64, 3, padding=1)
        self.dec_conv8 = nn.Conv2d(64, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the reconstruction of the teacher features (N, 384, g, g)."""
        z = self.encoder(x)  # (N, 64, 1, 1)
        for size, conv in zip(self.sizes, self.dec_convs, strict=True):
            z = F.interpolate(z, size=size, mode="bilinear")
            z = self.dropout(F.relu(conv(z), inplace=True))
        z = F.interpolate(z, size=self.out_size, mode="bilinear")
        return self.dec_conv8(F.relu(self.dec_conv7(z), inplace=True))


class FeatureConverter(nn.Module):
    """SPACE Feature converter Module (FM), §2.4b [I]: converted FE features behind a sigmoid gate.

    ``forward`` returns ``g * FM(FE)``; the last FM conv starts at zero so a fresh model is EfficientAD.
    """

    def __init__(
        self,
        fe_channels: int,
        trunk_channels: int,
        out_channels: int = STUDENT_CHANNELS,
        hidden: int = 256,
        dropout: float = 0.1,
    ) -> None:
        """Build the converter (1x1 -> 3x3 -> 1x1) and the gate (1x1 over [trunk | hidden])."""
        super().__init__()
        self.conv1 = nn.Conv2d(fe_channels, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv3 = nn.Conv2d(hidden, out_channels, 1)
        self.dropout = nn.Dropout(dropout)
        self.gate = nn.Conv2d(trunk_channels + hidden, out_channels, 1)
        nn.init.zeros_(self.conv3.weight)
        assert self.conv3.bias is not None
        nn.init.zeros_(self.conv3.bias)

    def forward(self, fe: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        """Return the gated residual to add to the student PDN output; inputs share the output grid."""
        h = self.dropout(F.relu(self.conv2(F.relu(self.conv1(fe), inplace=True)), inplace=True))
        g = torch.sigmoid(self.gate(torch.cat([trunk, h], dim=1)))
        return g * self.conv3(h)


class Student(nn.Module):
    """The 768-channel student: a PDN, optionally plus FE information (through the FM or a plain 1x1).

    Channels 0-383 predict the normalised teacher, 384-767 the autoencoder (§1.2).
    """

    def __init__(
        self,
        size: PdnSize = "s",
        padding: bool = False,
        fe_channels: int = 0,
        use_fm: bool = True,
        fm_dropout: float = 0.1,
        fe_align: FeAlign = DEFAULT_FE_ALIGN,
    ) -> None:
        """Build the student; ``fe_channels=0`` means no FE (plain EfficientAD student).

        ``fe_align`` says how the FE and the gate input reach the output grid (:func:`to_output_grid`).
        """
        super().__init__()
        if fe_align not in ("align_corners", "receptive_field"):
            raise ValueError(f"fe_align must be 'align_corners' or 'receptive_field', got {fe_align!r}")
        self.fe_align: FeAlign = fe_align
        self.pdn = PDN(size, STUDENT_CHANNELS, padding)
        self.fm: FeatureConverter | None = None
        self.fe_proj: nn.Conv2d | None = None
        if fe_channels and use_fm:
            self.fm = FeatureConverter(fe_channels, self.pdn.trunk_channels, dropout=fm_dropout)
        elif fe_channels:
            self.fe_proj = nn.Conv2d(fe_channels, STUDENT_CHANNELS, 1)  # ablation "+FE without FM"

    @property
    def uses_fe(self) -> bool:
        """Whether :meth:`forward` needs FE features."""
        return self.fm is not None or self.fe_proj is not None

    def forward(self, x: torch.Tensor, fe: torch.Tensor | None = None) -> torch.Tensor:
        """Return student features (N, 768, g, g); ``fe`` is required when :attr:`uses_fe`."""
        trunk, out = self.pdn.forward_with_trunk(x)
        if not self.uses_fe:
            return out
        if fe is None:
            raise ValueError("this student uses FE features; pass fe=")
        grid = (out.shape[-2], out.shape[-1])
        fe = to_output_grid(fe, grid, self.fe_align)
        if self.fm is not None:
            trunk = to_output_grid(trunk, grid, self.fe_align)
            return out + self.fm(fe, trunk)
        assert self.fe_proj is not None
        return out + self.fe_proj(fe)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) in ``module``."""
    return sum(p.numel() for p in module.parameters())
