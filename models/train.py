"""The training loop behind ``space train``: data -> teacher -> student/AE -> calibration -> artifact.

Owns :class:`TrainConfig` and :func:`train`. Steps (SPACE_SPEC §1.5-1.8, §2.4): scan the MVTec-layout folder
(:mod:`models.data`), resolve the teacher (:func:`resolve_teacher`), compute teacher channel statistics,
run Adam (lr 1e-4, wd 1e-5, x0.1 at 95 % of the steps) on the EfficientAD losses plus SCL for ``space``,
with resumable safetensors+json checkpoints, then compute map quantiles and the default threshold on the
validation normals and write the artifact (:mod:`models.artifact`). Everything random draws from the seed.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import structlog
import torch
from pydantic import BaseModel, ConfigDict, Field

from models import data as dataset
from models.artifact import ModelCard, Quantiles, ScoreStats, TeacherInfo, TrainingSummary, save_artifact
from models.checkpoint import load_checkpoint, save_checkpoint
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
from models.model import ModelConfig, SpaceModel, efficientad_config
from models.networks import TEACHER_CHANNELS
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

THRESHOLD_METHOD = "q99 + 0.25*(q99 - q50) of validation normal image scores"


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
    progress: bool = False

    def model_config_for_run(self, teacher_kind: Literal["pdn", "filterbank"]) -> ModelConfig:
        """The :class:`ModelConfig` this run trains."""
        common = {
            "size": self.size,
            "input_size": (self.input_size, self.input_size),
            "teacher_kind": teacher_kind,
        }
        if self.variant == "efficientad":
            return efficientad_config(**common)
        return ModelConfig(
            variant="space",
            use_fe=self.use_fe,
            use_fm=self.use_fm,
            use_scl=self.use_scl,
            scl_mask=self.scl_mask,
            scl_weight=self.scl_weight,
            scl_augment=self.scl_augment,
            **common,
        )


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
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    else:
        ok = bool(torch.backends.mkldnn.is_available()) and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if precision == "bf16" and not ok:
        raise ValueError(f"bf16 is not supported on {device}")
    return torch.bfloat16 if ok else None


def _load_images(paths: list[Path], size: tuple[int, int]) -> np.ndarray:
    return np.stack([prepare_image(dataset.load_image(p), size) for p in paths])


def _to_tensor(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last)


def resolve_teacher(
    cfg: TrainConfig, train_images: np.ndarray, penalty: PenaltySource, device: torch.device
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
        model = SpaceModel(
            efficientad_config(size=cfg.size, input_size=(cfg.input_size,) * 2, teacher_kind="pdn")
        )

        def batches():
            while True:
                idx = rng.integers(len(train_images), size=8)
                imgs = train_images[idx]
                if penalty.enabled:
                    imgs = np.concatenate([imgs, penalty.sample(rng, 8)])
                yield model.normalize(_to_tensor(imgs, torch.device("cpu")))

        teacher = distill_teacher(backbone, batches(), cfg.size, cfg.distill_steps, seed=cfg.seed)
        return teacher, "pdn", TeacherInfo(source="distilled", detail=spec, seed=cfg.seed)
    path = Path(spec)
    teacher = load_published_teacher(path, cfg.size)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return teacher, "pdn", TeacherInfo(source="imported", detail=f"{path.name} sha256={digest}")


@torch.no_grad()
def teacher_statistics(model: SpaceModel, images: np.ndarray, device: torch.device, batch: int = 8) -> None:
    """Set the teacher's per-channel mean/std over all positions of the training images (§1.5)."""
    total = torch.zeros(TEACHER_CHANNELS, dtype=torch.float64, device=device)
    total_sq = torch.zeros_like(total)
    count = 0
    for i in range(0, len(images), batch):
        t = model.teacher(model.normalize(_to_tensor(images[i : i + batch], device))).double()
        total += t.sum(dim=(0, 2, 3))
        total_sq += t.pow(2).sum(dim=(0, 2, 3))
        count += t.shape[0] * t.shape[2] * t.shape[3]
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    model.teacher_mean.copy_(mean.float().view(1, -1, 1, 1))
    model.teacher_std.copy_(std.float().view(1, -1, 1, 1))


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


@torch.no_grad()
def calibrate(
    model: SpaceModel, images: np.ndarray, device: torch.device, autocast: torch.dtype | None
) -> np.ndarray:
    """Set map quantiles (q_a=0.9, q_b=0.995 of validation pixels, per branch) and return image scores."""
    model.eval()
    st_maps, ae_maps = [], []
    for i in range(0, len(images), 8):
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            st, ae = model.branch_maps(_to_tensor(images[i : i + 8], device))
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
            m = model.anomaly_map(_to_tensor(images[i : i + 8], device))
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


def default_threshold(stats: ScoreStats) -> float:
    """Default threshold: q99 of normal validation scores plus a quarter of the q50-q99 spread (margin)."""
    return stats.q99 + 0.25 * max(stats.q99 - stats.q50, 0.0)


def _split_validation(index: dataset.DatasetIndex, seed: int) -> tuple[list[Path], list[Path], str]:
    if index.validation_good:
        return list(index.train_good), list(index.validation_good), "validation_good"
    n_val = max(1, round(0.1 * len(index.train_good)))
    if len(index.train_good) < 2:
        raise dataset.DatasetError(f"{index.root}: need at least 2 train/good images to hold out validation")
    order = np.random.default_rng(seed).permutation(len(index.train_good))
    val = sorted(order[:n_val].tolist())
    train_idx = sorted(order[n_val:].tolist())
    return [index.train_good[i] for i in train_idx], [index.train_good[i] for i in val], "train_holdout"


def _run_fingerprint(cfg: TrainConfig, data_hash: str) -> str:
    keep = cfg.model_dump(
        mode="json", exclude={"out", "progress", "checkpoint_every", "name", "model_version"}
    )
    return hashlib.sha256(json.dumps({"cfg": keep, "data": data_hash}, sort_keys=True).encode()).hexdigest()


def train(cfg: TrainConfig) -> Path:
    """Train one model and write its artifact to ``<out>/<product_line>/<version>``; returns that folder."""
    t_start = time.monotonic()
    device = pick_device(cfg.device)
    autocast = pick_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    index = dataset.scan_dataset(cfg.data)
    train_paths, val_paths, val_source = _split_validation(index, cfg.seed)
    data_hash = dataset.dataset_fingerprint(index.train_good, root=cfg.data)
    size = (cfg.input_size, cfg.input_size)
    train_images, val_images = _load_images(train_paths, size), _load_images(val_paths, size)
    penalty = PenaltySource(size, cfg.penalty)
    fingerprint = _run_fingerprint(cfg, data_hash)
    ckpt_dir = Path(cfg.out) / cfg.product_line / ".checkpoint"
    resumed = load_checkpoint(ckpt_dir, fingerprint)
    if resumed is not None:
        model = SpaceModel(ModelConfig.model_validate(resumed.meta["model_config"]))
        teacher_info = TeacherInfo.model_validate(resumed.meta["teacher"])
        model.load_state_dict(resumed.model_state)
    else:
        teacher, kind, teacher_info = resolve_teacher(cfg, train_images, penalty, device)
        model = SpaceModel(cfg.model_config_for_run(kind))
        model.teacher.load_state_dict(teacher.state_dict())
    model = model.to(device).to(memory_format=torch.channels_last)
    if resumed is None:
        teacher_statistics(model, train_images, device)
    params = list(model.student.parameters()) + list(model.ae.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_step, elapsed_before = 0, 0.0
    if resumed is not None:
        opt.load_state_dict(resumed.optimizer_state)
        rng.bit_generator.state = resumed.meta["np_rng"]
        torch.set_rng_state(resumed.torch_rng)
        start_step, elapsed_before = int(resumed.meta["step"]), float(resumed.meta["elapsed_s"])
        log.info("train_resumed", step=start_step, checkpoint=str(ckpt_dir))
    log.info(
        "train_started",
        product_line=cfg.product_line,
        variant=cfg.variant,
        steps=cfg.steps,
        device=str(device),
        precision=str(autocast or "fp32"),
        n_train=len(train_images),
        n_val=len(val_images),
        teacher=teacher_info.source,
    )
    progress = ProgressLine(cfg.steps, enabled=cfg.progress, start=start_step)
    losses: dict[str, float] = {}
    t_loop = time.monotonic()
    model.train()
    for step in range(start_step, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * (0.1 if step >= int(0.95 * cfg.steps) else 1.0)
        idx = rng.integers(len(train_images), size=cfg.batch_size)
        x = _to_tensor(train_images[idx], device)
        pen = _to_tensor(penalty.sample(rng, cfg.batch_size), device) if penalty.enabled else None
        lam = scl_weight(step, cfg.steps, cfg.scl_weight) if model.config.use_scl else 0.0
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            step_losses = training_losses(model, x, pen, rng, lam)
        opt.zero_grad(set_to_none=True)
        step_losses["total"].backward()
        opt.step()
        losses = {k: v.item() for k, v in step_losses.items()}
        progress.update(step + 1, losses["total"])
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            meta = {
                "step": step + 1,
                "np_rng": rng.bit_generator.state,
                "model_config": model.config.model_dump(mode="json"),
                "teacher": teacher_info.model_dump(mode="json"),
                "elapsed_s": elapsed_before + time.monotonic() - t_loop,
            }
            save_checkpoint(
                ckpt_dir, fingerprint, model.state_dict(), opt.state_dict(), torch.get_rng_state(), meta
            )
    progress.close()
    train_s = elapsed_before + time.monotonic() - t_loop
    val_scores = calibrate(model, val_images, device, autocast)
    stats = score_stats(val_scores)
    version = cfg.model_version or datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    q = model.quantiles.tolist()
    card = ModelCard(
        name=cfg.name or f"{cfg.product_line}-{cfg.variant}-{cfg.size}",
        product_line=cfg.product_line,
        version=version,
        variant=cfg.variant,
        size=cfg.size,
        input_size=size,
        config=model.config,
        teacher=teacher_info,
        quantiles=Quantiles(qa_st=q[0], qb_st=q[1], qa_ae=q[2], qb_ae=q[3]),
        default_threshold=default_threshold(stats),
        threshold_method=THRESHOLD_METHOD,
        validation_scores=stats,
        training=TrainingSummary(
            data_root=str(cfg.data),
            data_sha256=data_hash,
            n_train=len(train_images),
            n_validation=len(val_images),
            validation_source=val_source,
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            duration_s=round(time.monotonic() - t_start, 2),
            device=str(device),
            precision=str(autocast or "fp32"),
            penalty_source=penalty.description,
            final_losses=losses,
        ),
    )
    out = save_artifact(Path(cfg.out) / cfg.product_line / version, card, model.state_dict())
    for f in ckpt_dir.glob("*"):
        f.unlink()
    if ckpt_dir.exists():
        ckpt_dir.rmdir()
    log.info(
        "train_finished",
        artifact=str(out),
        train_s=round(train_s, 1),
        steps_per_s=round((cfg.steps - start_step) / max(train_s - elapsed_before, 1e-9), 2),
        threshold=card.default_threshold,
    )
    return out
