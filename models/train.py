"""The training loop behind ``space train``: data -> teacher -> student/AE -> calibration -> artifact.

Owns :class:`TrainConfig` and :func:`train`. Steps (SPACE_SPEC §1.5-1.8, §2.4): scan the MVTec-layout folder
(:mod:`models.data`), resolve the teacher (:func:`resolve_teacher`), compute teacher channel statistics,
run Adam (lr 1e-4, wd 1e-5, x0.1 at 95 % of the steps) on the EfficientAD losses plus SCL for ``space``,
with resumable safetensors+json checkpoints, then compute map quantiles and the default threshold on the
validation normals and write the artifact (:mod:`models.artifact`). Everything random draws from the seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from models import data as dataset
from models.artifact import ModelCard, Quantiles, ScoreStats, TeacherInfo, TrainingSummary, save_artifact
from models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from models.detector import native_precision
from models.losses import (
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
from models.model import ModelConfig, SpaceModel, efficientad_config, imagenet_normalize
from models.networks import TEACHER_CHANNELS
from models.normalization import (
    THRESHOLD_METHOD,
    calibrate,
    default_threshold,
    score_stats,
    teacher_statistics,
    to_tensor,
)
from models.penalty import PenaltySource
from models.preprocess import prepare_image
from models.progress import ProgressLine
from models.teacher import (
    DEFAULT_OFFLINE,
    OFFLINE_KINDS,
    build_offline_teacher,
    distill_teacher,
    load_backbone,
    load_published_teacher,
)

log = structlog.get_logger(__name__)


class TrainConfig(BaseModel):
    """All inputs of one training run (the CLI flags of ``space train``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: Path
    product_line: str
    out: Path
    variant: Literal["space", "efficientad"] = "space"
    size: Literal["s", "m"] = "s"
    steps: int = Field(70_000, ge=1)
    teacher: str = "offline"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    input_size: int = Field(256, ge=64, multiple_of=32)
    batch_size: int = Field(1, ge=1)
    lr: float = 1e-4
    weight_decay: float = 1e-5
    use_fe: bool = True
    use_fm: bool = True
    use_scl: bool = True
    scl_mask: bool = True
    scl_weight: float = 1.0
    scl_augment: Literal["geometric", "label_preserving"] = "geometric"
    penalty: str = "auto"
    distill_steps: int = Field(2000, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    name: str | None = None
    model_version: str | None = None
    overwrite: bool = False  # replace an existing version folder (``space train`` refuses the active one)
    progress: bool = False

    @field_validator("product_line", "model_version")
    @classmethod
    def _one_folder_name(cls, value: str | None) -> str | None:
        """Names become folders under ``out`` (``space train`` also applies the registry's name rule)."""
        if value is not None and (value in {"", ".", ".."} or value.startswith(".") or "/" in value or "\\" in value):
            raise ValueError(f"{value!r} must be one folder name (no path separator, not hidden)")
        return value

    def model_config_for_run(self, teacher_kind: Literal["pdn", "filterbank"]) -> ModelConfig:
        """The :class:`ModelConfig` this run trains."""
        side = (self.input_size, self.input_size)
        if self.variant == "efficientad":
            return efficientad_config(size=self.size, input_size=side, teacher_kind=teacher_kind)
        return ModelConfig.model_validate(
            {
                "size": self.size,
                "input_size": side,
                "teacher_kind": teacher_kind,
                "variant": "space",
                "use_fe": self.use_fe,
                "use_fm": self.use_fm,
                "use_scl": self.use_scl,
                "scl_mask": self.scl_mask,
                "scl_weight": self.scl_weight,
                "scl_augment": self.scl_augment,
            }
        )


class OutputExistsError(ValueError):
    """The version folder a run would write already exists (versions are immutable)."""


def _version_dir(cfg: TrainConfig, version: str) -> Path:
    """``<out>/<line>/<version>``; an existing folder is refused unless ``cfg.overwrite``."""
    folder = Path(cfg.out) / cfg.product_line / version
    if folder.exists() and not cfg.overwrite:
        raise OutputExistsError(
            f"{folder} already exists: versions are immutable (results, thresholds and S3 caches key on them); "
            "train into a new --model-version"
        )
    return folder


def pick_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is available")
    return torch.device(device)


def pick_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for training: bf16 when the device supports it (``auto``), None for fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":  # asked for: emulated bf16 is slow but right
        supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else torch.backends.mkldnn.is_available()
        if not supported:
            raise ValueError(f"bf16 is not supported on {device}")
        return torch.bfloat16
    return torch.bfloat16 if native_precision("bf16", device) else None  # the rule serving uses


def _load_images(paths: list[Path], size: tuple[int, int]) -> np.ndarray:
    return np.stack([prepare_image(dataset.load_image(p), size) for p in paths])


def resolve_teacher(
    cfg: TrainConfig, train_images: np.ndarray, penalty: PenaltySource
) -> tuple[torch.nn.Module, Literal["pdn", "filterbank"], TeacherInfo]:
    """Build the frozen teacher named by ``cfg.teacher`` (offline kind, weights file or ``distill:``)."""
    spec = DEFAULT_OFFLINE if cfg.teacher == "offline" else cfg.teacher
    if spec in OFFLINE_KINDS:
        kind: Literal["pdn", "filterbank"] = "filterbank" if spec == "filterbank" else "pdn"
        return (
            build_offline_teacher(spec, cfg.size, cfg.seed),
            kind,
            TeacherInfo(source=f"offline:{spec}", seed=cfg.seed),
        )
    if spec.startswith("distill:"):
        backbone = load_backbone(spec.removeprefix("distill:"))
        rng = np.random.default_rng(cfg.seed + 1)

        def batches():
            while True:
                idx = rng.integers(len(train_images), size=8)
                imgs = train_images[idx]
                if penalty.enabled:
                    imgs = np.concatenate([imgs, penalty.sample(rng, 8)])
                yield imagenet_normalize(to_tensor(imgs, torch.device("cpu")))

        teacher = distill_teacher(backbone, batches(), cfg.size, cfg.distill_steps, seed=cfg.seed)
        return teacher, "pdn", TeacherInfo(source="distilled", detail=spec, seed=cfg.seed)
    path = Path(spec)
    teacher = load_published_teacher(path, cfg.size)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return teacher, "pdn", TeacherInfo(source="imported", detail=f"{path.name} sha256={digest}")


def training_losses(
    model: SpaceModel, x: torch.Tensor, pen: torch.Tensor | None, rng: np.random.Generator, lam_scl: float
) -> dict[str, torch.Tensor]:
    """One iteration's losses (§1.6, plus SCL §2.4c when ``lam_scl > 0``) for an RGB batch in [0, 1].

    All student inputs (clean, penalty, colour-augmented, spatially augmented) run as one batch.
    """
    cfg = model.config
    b = x.shape[0]
    x_aug = color_augment(x, rng)
    views = [x, x_aug]
    aug = None
    if lam_scl > 0:
        aug = sample_spatial_aug(rng, cfg.scl_augment, square=x.shape[-1] == x.shape[-2])
        views.append(aug.apply_image(x))
    tviews = torch.cat(views)
    xn_all = model.normalize(torch.cat([*views, pen]) if pen is not None else tviews)
    t_in = xn_all if model.student.uses_fe else xn_all[: tviews.shape[0]]
    trunk, t_all = model.teacher_features(t_in)
    s_all = model.student_features(xn_all, trunk)
    t_clean, t_aug = t_all[:b], t_all[b : 2 * b]
    s_clean, s_aug = s_all[:b], s_all[b : 2 * b]
    a_aug = model.ae(xn_all[b : 2 * b])
    losses = {
        "hard": hard_loss(t_clean, s_clean[:, :TEACHER_CHANNELS]),
        "ae": ae_loss(t_aug, a_aug),
        "stae": student_ae_loss(a_aug, s_aug),
    }
    if pen is not None:
        losses["pen"] = penalty_loss(s_all[tviews.shape[0] :])
    if aug is not None:
        t_g, s_g = t_all[2 * b : 3 * b], s_all[2 * b : 3 * b]
        mask = scl_mask(aug, t_g, t_clean, use_consistency=cfg.scl_mask)
        losses["scl"] = lam_scl * (
            scl_loss(aug, s_g, s_clean, mask) + hard_loss(t_g, s_g[:, :TEACHER_CHANNELS], mask=mask)
        )
    losses["total"] = sum(losses.values())  # type: ignore[assignment]
    return losses


MIN_HOLDOUT = 5  # held-out normals wanted at least (the default threshold and map quantiles need several)
FEW_VALIDATION = 10  # below this many validation images training warns


def holdout_size(n_images: int) -> int:
    """Images held out of ``n_images`` train/good ones.

    10 % (SPACE_SPEC §1.7), but at least :data:`MIN_HOLDOUT` while that keeps three quarters for training,
    and at least one: 12 images -> 3, 20-49 -> 5, 100 -> 10.
    """
    return max(1, round(0.1 * n_images), min(MIN_HOLDOUT, n_images // 4))


def split_validation(
    index: dataset.DatasetIndex, seed: int, n_holdout: int | None = None
) -> tuple[list[Path], list[Path], str]:
    """(train, validation, source): ``validation/good`` if present, else a seeded hold-out of ``train/good``.

    The hold-out is the first ``n_holdout`` (default :func:`holdout_size`) of a permutation drawn from
    ``seed``, so ``space calibrate`` rebuilds a model's hold-out from its card (seed, ``n_validation``).
    """
    if index.validation_good:
        return list(index.train_good), list(index.validation_good), "validation_good"
    n_val = holdout_size(len(index.train_good)) if n_holdout is None else n_holdout
    if len(index.train_good) < 2:
        raise dataset.DatasetError(f"{index.root}: need at least 2 train/good images to hold out validation")
    if not 1 <= n_val < len(index.train_good):
        raise ValueError(f"cannot hold out {n_val} of {len(index.train_good)} train/good images")
    order = np.random.default_rng(seed).permutation(len(index.train_good))
    val = sorted(order[:n_val].tolist())
    train_idx = sorted(order[n_val:].tolist())
    return [index.train_good[i] for i in train_idx], [index.train_good[i] for i in val], "train_holdout"


def _run_fingerprint(cfg: TrainConfig, data_hash: str) -> str:
    keep = cfg.model_dump(
        mode="json", exclude={"out", "progress", "checkpoint_every", "name", "model_version", "overwrite"}
    )
    return hashlib.sha256(json.dumps({"cfg": keep, "data": data_hash}, sort_keys=True).encode()).hexdigest()


def _match_state_layout(opt: torch.optim.Optimizer) -> None:
    """Give loaded Adam moments their parameter's memory format (safetensors stores them contiguous).

    The fused CPU Adam kernel walks raw memory, so channels_last weights with contiguous moments would
    silently mix elements; with matching layouts a resumed run is bit-identical to an uninterrupted one.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape:
                    state[key] = torch.empty_like(p).copy_(value)


@dataclass
class _Data:
    train_images: np.ndarray  # (N, H, W, 3) uint8 at the input size
    val_images: np.ndarray
    val_source: Literal["validation_good", "train_holdout"]
    data_hash: str


def _load_data(cfg: TrainConfig) -> _Data:
    index = dataset.scan_dataset(cfg.data)
    train_paths, val_paths, val_source = split_validation(index, cfg.seed)
    size = (cfg.input_size, cfg.input_size)
    # The run's data: train/good and, when the split uses it, validation/good (images added there changed
    # the calibration set of a resumed run without a word).
    used = index.train_good + (index.validation_good if val_source == "validation_good" else [])
    return _Data(
        _load_images(train_paths, size),
        _load_images(val_paths, size),
        val_source,  # type: ignore[arg-type]
        dataset.dataset_fingerprint(used, root=cfg.data),
    )


def _build_model(
    cfg: TrainConfig, data: _Data, penalty: PenaltySource, device: torch.device, resumed: Checkpoint | None
) -> tuple[SpaceModel, TeacherInfo]:
    """A fresh model with a resolved, normalised teacher, or the model of the checkpoint being resumed."""
    if resumed is not None:
        model = SpaceModel(ModelConfig.from_stored(resumed.meta["model_config"]))  # pre-switch runs stay "padded"
        model.load_state_dict(resumed.model_state)
        teacher_info = TeacherInfo.model_validate(resumed.meta["teacher"])
        model = model.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return model, teacher_info
    teacher, kind, teacher_info = resolve_teacher(cfg, data.train_images, penalty)
    model = SpaceModel(cfg.model_config_for_run(kind))
    model.teacher.load_state_dict(teacher.state_dict())
    model = model.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    teacher_statistics(model, data.train_images, device)
    return model, teacher_info


def _cuda_rng_states(device: torch.device) -> list[torch.Tensor]:
    """The CUDA generators' states when training on CUDA (dropout there draws from them), else none."""
    return list(torch.cuda.get_rng_state_all()) if device.type == "cuda" else []


def _restore_rng(resumed: Checkpoint, device: torch.device) -> None:
    """Set the torch CPU generator and, on CUDA, the CUDA generators to the checkpoint's states."""
    torch.set_rng_state(resumed.torch_rng)
    if device.type != "cuda":
        return
    if not resumed.cuda_rng:
        log.warning(
            "checkpoint_without_cuda_rng",
            detail="resumed on CUDA from a checkpoint without CUDA RNG states: "
            "the run continues but is not bit-identical to an uninterrupted one",
        )
        return
    for i, state in enumerate(resumed.cuda_rng[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(state, i)


def _same_split(resumed: Checkpoint | None, data: _Data, folder: Path) -> Checkpoint | None:
    """The checkpoint, unless it was written with another validation split (the hold-out rule changed).

    Checkpoints before ``n_validation`` was stored used a 10 % hold-out (at least one image).
    """
    if resumed is None:
        return None
    n_val, n_all = len(data.val_images), len(data.train_images) + len(data.val_images)
    legacy = max(1, round(0.1 * n_all)) if data.val_source == "train_holdout" else n_val
    if int(resumed.meta.get("n_validation", legacy)) == n_val:
        return resumed
    log.warning("checkpoint_ignored", folder=str(folder), reason="written with another validation hold-out")
    return None


def _restore(
    opt: torch.optim.Optimizer, rng: np.random.Generator, resumed: Checkpoint | None, device: torch.device
) -> tuple[int, float]:
    """Load optimizer and RNG states; returns (first step, seconds already trained)."""
    if resumed is None:
        return 0, 0.0
    opt.load_state_dict(resumed.optimizer_state)
    _match_state_layout(opt)
    rng.bit_generator.state = resumed.meta["np_rng"]
    _restore_rng(resumed, device)
    return int(resumed.meta["step"]), float(resumed.meta["elapsed_s"])


def _make_card(
    cfg: TrainConfig,
    model: SpaceModel,
    teacher_info: TeacherInfo,
    data: _Data,
    penalty: PenaltySource,
    stats: ScoreStats,
    extra: dict[str, Any],
) -> ModelCard:
    q = model.quantiles.tolist()
    return ModelCard(
        name=cfg.name or f"{cfg.product_line}-{cfg.variant}-{cfg.size}",
        product_line=cfg.product_line,
        version=cfg.model_version or datetime.now(UTC).strftime("%Y%m%d-%H%M%S"),
        variant=cfg.variant,
        size=cfg.size,
        input_size=(cfg.input_size, cfg.input_size),
        config=model.config,
        teacher=teacher_info,
        quantiles=Quantiles(qa_st=q[0], qb_st=q[1], qa_ae=q[2], qb_ae=q[3]),
        default_threshold=default_threshold(stats),
        threshold_method=THRESHOLD_METHOD,
        validation_scores=stats,
        training=TrainingSummary(
            data_root=str(cfg.data),
            data_sha256=data.data_hash,
            n_train=len(data.train_images),
            n_validation=len(data.val_images),
            validation_source=data.val_source,
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            penalty_source=penalty.description,
            **extra,
        ),
    )


def train(cfg: TrainConfig) -> Path:
    """Train one model and write its artifact to ``<out>/<product_line>/<version>``; returns that folder."""
    t_start = time.monotonic()
    if cfg.model_version is not None:
        _version_dir(cfg, cfg.model_version)  # refuse before hours of training, not after
    device = pick_device(cfg.device)
    autocast = pick_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    data = _load_data(cfg)
    if len(data.val_images) < FEW_VALIDATION:
        log.warning(
            "few_validation_images",
            n_validation=len(data.val_images),
            validation_source=data.val_source,
            detail=f"with fewer than {FEW_VALIDATION} validation normals the map quantiles and the default "
            "threshold are rough (the threshold gets a wider small-sample margin); add validation/good "
            "images, or calibrate with `space calibrate` before production",
        )
    penalty = PenaltySource((cfg.input_size, cfg.input_size), cfg.penalty)
    fingerprint = _run_fingerprint(cfg, data.data_hash)
    # One folder per run: another run of the line (other steps, seed or data) neither takes nor deletes it.
    ckpt_dir = Path(cfg.out) / cfg.product_line / ".checkpoint" / fingerprint[:16]
    resumed = _same_split(load_checkpoint(ckpt_dir, fingerprint), data, ckpt_dir)
    model, teacher_info = _build_model(cfg, data, penalty, device, resumed)
    params = list(model.student.parameters()) + list(model.ae.parameters())
    # fused Adam: one kernel over all parameters (the per-tensor loop cost ~1 s/step on 2 shared CPU cores)
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    start_step, elapsed_before = _restore(opt, rng, resumed, device)
    log.info(
        "train_started",
        product_line=cfg.product_line,
        variant=cfg.variant,
        steps=cfg.steps,
        start_step=start_step,
        device=str(device),
        precision=str(autocast or "fp32"),
        n_train=len(data.train_images),
        n_val=len(data.val_images),
        teacher=teacher_info.source,
        map_align=model.config.map_align,  # a run resumed from before the geometry switches keeps the old ones
        fe_align=model.config.fe_align,
    )
    t_loop = time.monotonic()

    def checkpoint(step: int) -> None:
        meta = {
            "step": step,
            "np_rng": rng.bit_generator.state,
            "model_config": model.config.model_dump(mode="json"),
            "teacher": teacher_info.model_dump(mode="json"),
            "elapsed_s": elapsed_before + time.monotonic() - t_loop,
            "n_validation": len(data.val_images),
        }
        save_checkpoint(
            ckpt_dir,
            fingerprint,
            model.state_dict(),
            opt.state_dict(),
            torch.get_rng_state(),
            meta,
            cuda_rng=_cuda_rng_states(device),
        )

    losses = _run_steps(cfg, model, opt, data.train_images, penalty, rng, autocast, start_step, checkpoint)
    train_s = elapsed_before + time.monotonic() - t_loop
    stats = score_stats(calibrate(model, data.val_images, device, autocast))
    extra = {
        "duration_s": round(time.monotonic() - t_start, 2),
        "device": str(device),
        "precision": str(autocast or "fp32"),
        "final_losses": losses,
    }
    card = _make_card(cfg, model, teacher_info, data, penalty, stats, extra)
    folder = _version_dir(cfg, card.version)
    out = save_artifact(folder, card, model.state_dict())  # an overwrite replaces the folder whole, once complete
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        ckpt_dir.parent.rmdir()  # .checkpoint/ once no other run of the line has one
    log.info(
        "train_finished",
        artifact=str(out),
        train_s=round(train_s, 1),
        steps_per_s=round((cfg.steps - start_step) / max(train_s - elapsed_before, 1e-9), 2),
        threshold=card.default_threshold,
    )
    return out


def _run_steps(
    cfg: TrainConfig,
    model: SpaceModel,
    opt: torch.optim.Optimizer,
    images: np.ndarray,
    penalty: PenaltySource,
    rng: np.random.Generator,
    autocast: torch.dtype | None,
    start_step: int,
    checkpoint: Callable[[int], None],
) -> dict[str, float]:
    """The optimisation loop (lr x0.1 at 95 % of the steps); returns the last step's losses."""
    device = next(model.parameters()).device
    progress = ProgressLine(cfg.steps, enabled=cfg.progress, start=start_step)
    losses: dict[str, float] = {}
    model.train()
    for step in range(start_step, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * (0.1 if step >= int(0.95 * cfg.steps) else 1.0)
        x = to_tensor(images[rng.integers(len(images), size=cfg.batch_size)], device)
        pen = to_tensor(penalty.sample(rng, cfg.batch_size), device) if penalty.enabled else None
        lam = scl_weight(step, cfg.steps, cfg.scl_weight) if model.config.use_scl else 0.0
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            step_losses = training_losses(model, x, pen, rng, lam)
        opt.zero_grad(set_to_none=True)
        step_losses["total"].backward()
        opt.step()
        losses = {k: v.item() for k, v in step_losses.items()}
        progress.update(step + 1, losses["total"])
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            checkpoint(step + 1)
    progress.close()
    return losses
