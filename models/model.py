"""The composed detector network (teacher + student + autoencoder + calibration) and its config.

:class:`ModelConfig` is the architecture and switch set saved in the model card; :class:`SpaceModel`
holds the three networks plus every calibration number as buffers (ImageNet mean/std, teacher channel
mean/std, map quantiles, a ``calibrated`` flag), so one state dict fully determines inference
(SPACE_SPEC §1.5, §1.8). Training and inference both go through the named steps here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple, Protocol, TypeVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from models.networks import (
    DEFAULT_FE_ALIGN,
    PDN,
    PDN_STRIDE,
    TEACHER_CHANNELS,
    AutoEncoder,
    FeAlign,
    Student,
    pdn_out_size,
    pdn_rf_centre,
)
from models.teacher import FilterBankTeacher

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TeacherKind = Literal["pdn", "filterbank"]
MapAlign = Literal["padded", "receptive_field"]
#: ``map_align`` of a stored config written before the switch existed (its quantiles and threshold were
#: calibrated on those maps); see :meth:`ModelConfig.from_stored`.
LEGACY_MAP_ALIGN: MapAlign = "padded"
#: ``fe_align`` of a stored config written before that switch existed (its student learnt with that resize).
LEGACY_FE_ALIGN: FeAlign = "align_corners"
_T = TypeVar("_T")


class ModelConfig(BaseModel):
    """Architecture and SPACE switches; stored in the model card and used to rebuild the network."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    variant: Literal["space", "efficientad"] = "space"
    size: Literal["s", "m"] = "s"
    input_size: tuple[int, int] = (256, 256)
    padding: bool = False
    teacher_kind: TeacherKind = "filterbank"
    use_fe: bool = True  # FE = the frozen teacher's trunk activations (§2.4a alternative)
    use_fm: bool = True  # gated Feature converter Module (§2.4b); without it FE enters through a 1x1 conv
    use_scl: bool = True  # spatial consistency loss (§2.4c)
    scl_mask: bool = True  # the teacher-consistency mask r < quantile_0.9(r)
    scl_weight: float = Field(1.0, ge=0)
    scl_augment: Literal["geometric", "label_preserving"] = "geometric"
    fm_dropout: float = Field(0.1, ge=0, lt=1)
    # How SpaceModel.upsample places the feature grid on the image (§1.8 step 6): "receptive_field" puts
    # cell q on its receptive-field centre (pixel 4q + 16 unpadded, 4q padded); "padded" is the original
    # pad-by-4 + align_corners=False resize, ~1.5 px down-right. Configs stored without it load as "padded".
    map_align: MapAlign = "receptive_field"
    # How the student brings the FE and its own trunk (the FM gate input) from the trunk grid (g+3)² to the
    # output grid g² (models.networks.to_output_grid): "receptive_field" (new models, chosen by the experiment
    # in docs/model.md) is the 2x2 mean centred on each output cell, "align_corners" the original bilinear
    # resize (1.5 cells off at the borders). Only the space variant with FE reads it. Configs stored without
    # it load as "align_corners".
    fe_align: FeAlign = DEFAULT_FE_ALIGN

    @model_validator(mode="after")
    def _efficientad_has_no_space_parts(self) -> ModelConfig:
        if self.variant == "efficientad" and (self.use_fe or self.use_scl):
            raise ValueError("variant 'efficientad' cannot use FE/FM/SCL; build it with efficientad_config()")
        return self

    @classmethod
    def from_stored(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Validate a config read from a model card or a training checkpoint (see :func:`migrate_stored_config`)."""
        return cls.model_validate(migrate_stored_config(data))

    @property
    def student_uses_fe(self) -> bool:
        """Whether the student receives the teacher's trunk features."""
        return self.variant == "space" and self.use_fe


def migrate_stored_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """Bring a stored ``ModelConfig`` dict (``model.json`` → ``config``, checkpoint meta) up to the current fields.

    The one place where configs written by older code are migrated: one without ``map_align`` predates
    the switch, so its quantiles and default threshold were computed on padded maps and it keeps
    ``"padded"``; one without ``fe_align`` predates that switch, so its student learnt with the
    ``align_corners=True`` resize and keeps ``"align_corners"``. Unknown keys are left for validation to
    reject (``extra="forbid"``).
    """
    out = dict(data)
    out.setdefault("map_align", LEGACY_MAP_ALIGN)
    out.setdefault("fe_align", LEGACY_FE_ALIGN)
    return out


def efficientad_config(**kw: object) -> ModelConfig:
    """A plain EfficientAD config (all SPACE parts off)."""
    base: dict[str, object] = {"variant": "efficientad", "use_fe": False, "use_fm": False, "use_scl": False}
    return ModelConfig.model_validate({**base, **kw})


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of an RGB batch in [0, 1] (N, 3, H, W)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class Branches(Protocol):
    """Runs parts of a forward beside the current one (fork/join); :class:`models.gpu.BranchStreams` on CUDA."""

    def start(self, index: int, fn: Callable[[], _T]) -> _T:
        """Queue ``fn`` on side lane ``index`` after the work queued so far; its result is ready after :meth:`join`."""
        ...

    def join(self) -> None:
        """Make the current lane wait for every lane started since the last join."""
        ...


class _Inline:
    """:class:`Branches` that runs every part where it is called, one after another (CPU, training)."""

    def start(self, index: int, fn: Callable[[], _T]) -> _T:
        return fn()

    def join(self) -> None:
        pass


_INLINE = _Inline()


class Maps(NamedTuple):
    """Raw per-branch maps on the feature grid: local (student-teacher) and global (student-AE)."""

    st: torch.Tensor  # (N, 1, g, g)
    ae: torch.Tensor  # (N, 1, g, g)


class SpaceModel(nn.Module):
    """Teacher, student and autoencoder with calibration buffers; input is RGB in [0, 1]."""

    teacher: PDN | FilterBankTeacher
    image_mean: torch.Tensor
    image_std: torch.Tensor
    teacher_mean: torch.Tensor
    teacher_std: torch.Tensor
    quantiles: torch.Tensor
    calibrated: torch.Tensor
    map_rows: torch.Tensor  # map_align="receptive_field" only, non-persistent: see map_resampling()
    map_row_weight: torch.Tensor
    map_cols: torch.Tensor
    map_col_weight: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        """Build the networks for ``config`` (teacher weights are loaded separately)."""
        super().__init__()
        self.config = config
        h, w = config.input_size
        if config.teacher_kind == "filterbank":
            self.teacher = FilterBankTeacher(padding=config.padding)
        else:
            self.teacher = PDN(config.size, TEACHER_CHANNELS, config.padding)
        self.teacher.eval().requires_grad_(False)
        fe_channels = int(self.teacher.trunk_channels) if config.student_uses_fe else 0
        self.student = Student(
            config.size, config.padding, fe_channels, config.use_fm, config.fm_dropout, fe_align=config.fe_align
        )
        self.ae = AutoEncoder((h, w), config.padding)
        self.grid = (pdn_out_size(h, config.padding), pdn_out_size(w, config.padding))
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.register_buffer("teacher_mean", torch.zeros(1, TEACHER_CHANNELS, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, TEACHER_CHANNELS, 1, 1))
        self.register_buffer("quantiles", torch.tensor([0.0, 1.0, 0.0, 1.0]))  # qa_st, qb_st, qa_ae, qb_ae
        self.register_buffer("calibrated", torch.tensor(False))
        if config.map_align == "receptive_field":
            # Derived from the config alone: non-persistent, so they never enter the state dict / artifact;
            # .to(device) moves them, so CUDA graphs and torch.compile see plain module tensors.
            centre = pdn_rf_centre(config.padding)
            rows, row_weight = map_resampling(h, self.grid[0], PDN_STRIDE, centre)
            cols, col_weight = map_resampling(w, self.grid[1], PDN_STRIDE, centre)
            self.register_buffer("map_rows", rows, persistent=False)
            self.register_buffer("map_row_weight", row_weight.view(h, 1), persistent=False)
            self.register_buffer("map_cols", cols, persistent=False)
            self.register_buffer("map_col_weight", col_weight, persistent=False)

    def train(self, mode: bool = True) -> SpaceModel:
        """Set train mode on student/AE; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet normalisation of an RGB batch in [0, 1]."""
        return (x - self.image_mean) / self.image_std

    def teacher_features(self, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (FE trunk, normalised teacher T̂) for a normalised batch, without gradients."""
        with torch.no_grad():
            trunk, t = self.teacher.forward_with_trunk(xn)
            t = (t.float() - self.teacher_mean) / self.teacher_std
        return trunk, t

    def student_features(self, xn: torch.Tensor, trunk: torch.Tensor | None) -> torch.Tensor:
        """Student output (N, 768, g, g); ``trunk`` is the FE input when the variant uses it."""
        return self.student(xn, trunk if self.student.uses_fe else None)

    def raw_maps(self, x: torch.Tensor, branches: Branches | None = None) -> Maps:
        """Per-branch squared-distance maps on the feature grid for RGB input in [0, 1] (§1.8 steps 1-3).

        With ``branches`` (inference on CUDA, :class:`models.gpu.BranchStreams`) the networks that do
        not wait for each other run side by side: the autoencoder needs only the image, and so does
        the teacher unless the student reads its trunk (the FE of ``space``). Same maps either way.
        """
        xn = self.normalize(x)
        lanes = branches or _INLINE
        a = lanes.start(0, lambda: self.ae(xn).float())
        if self.student.uses_fe:
            trunk, t = self.teacher_features(xn)
            s = self.student_features(xn, trunk).float()
        else:
            trunk, t = lanes.start(1, lambda: self.teacher_features(xn))
            s = self.student_features(xn, None).float()
        lanes.join()  # a and t may have been computed beside the student: wait before reading them
        st = (t - s[:, :TEACHER_CHANNELS]).pow(2).mean(dim=1, keepdim=True)
        ae = (a - s[:, TEACHER_CHANNELS:]).pow(2).mean(dim=1, keepdim=True)
        return Maps(st, ae)

    def upsample(self, m: torch.Tensor) -> torch.Tensor:
        """Resize a grid map (N, 1, g_h, g_w) bilinearly to the input size (§1.8 step 6), per ``map_align``.

        ``"receptive_field"``: output pixel i (rows and columns separately) is the bilinear value of the grid
        at cell coordinate (i - c) / 4, c the receptive-field centre of cell 0 (16 unpadded, 0 padded), so
        cell q lands on pixel 4q + c; outside the grid the edge cells are replicated (the coordinate is
        clamped), so a defect at the image border still shows. Two index gathers and two lerps in the
        map's dtype. ``"padded"``: the original pad by 4 (unpadded grid) and resize with
        ``align_corners=False``, which puts cell q on 4q + 17.5 (+1.5 px; kept bit-identical for
        artifacts calibrated on it).
        """
        if self.config.map_align == "padded":
            if not self.config.padding:
                m = F.pad(m, (4, 4, 4, 4))
            return F.interpolate(m, size=self.config.input_size, mode="bilinear", align_corners=False)
        h, w = self.config.input_size
        r = m.index_select(-2, self.map_rows)  # rows lo (first h) then hi (last h)
        m = torch.lerp(r[..., :h, :], r[..., h:, :], self.map_row_weight.to(m.dtype))
        c = m.index_select(-1, self.map_cols)
        return torch.lerp(c[..., :w], c[..., w:], self.map_col_weight.to(m.dtype))

    def branch_maps(self, x: torch.Tensor, branches: Branches | None = None) -> Maps:
        """Per-branch maps at input size, before quantile normalisation (used for calibration)."""
        st, ae = self.raw_maps(x, branches)
        return Maps(self.upsample(st), self.upsample(ae))

    def anomaly_map(self, x: torch.Tensor, branches: Branches | None = None) -> torch.Tensor:
        """Combined quantile-normalised map (N, H, W) at input size: 0.5·M'_ST + 0.5·M'_AE (§1.8).

        ``branches`` runs independent networks side by side (see :meth:`raw_maps`).
        """
        st, ae = self.branch_maps(x, branches)
        q = self.quantiles
        combined = 0.5 * normalize_map(st, q[0], q[1]) + 0.5 * normalize_map(ae, q[2], q[3])
        return combined.squeeze(1)


def map_resampling(size: int, cells: int, stride: int, centre: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear sampling of a ``cells``-long grid axis at the ``size`` output pixels, cell q at ``stride·q + centre``.

    Pixel i samples grid coordinate u = (i - centre) / stride, clamped to [0, cells - 1] (edge cells
    replicated). Returns (the lower cells then the upper cells, one after the other: int64 (2·size,),
    the weight of the upper cell: float32 (size,)); exact for the 4 px stride (weights 0, ¼, ½, ¾, 1).
    """
    u = ((torch.arange(size, dtype=torch.float64) - centre) / stride).clamp(0, cells - 1)
    lo = u.floor().long().clamp(max=max(cells - 2, 0))
    hi = (lo + 1).clamp(max=cells - 1)
    return torch.cat([lo, hi]), (u - lo).float()


def normalize_map(m: torch.Tensor, qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
    """Quantile normalisation M' = 0.1 · (M − q_a) / (q_b − q_a): q_a -> 0, q_b -> 0.1 (§1.8 step 4)."""
    return 0.1 * (m - qa) / (qb - qa).clamp_min(1e-12)
