"""Helpers for the model tests: tiny calibrated models and cards without training."""

from __future__ import annotations

import torch

from models.artifact import ModelCard, Quantiles, ScoreStats, TeacherInfo, TrainingSummary
from models.model import ModelConfig, SpaceModel, efficientad_config

SIZE = 64  # smallest supported input: keeps the unit tests cheap on 2 shared cores


def make_config(variant: str = "space", **kw: object) -> ModelConfig:
    """A 128 px config of ``variant``."""
    if variant == "efficientad":
        return efficientad_config(input_size=(SIZE, SIZE), **kw)
    return ModelConfig(input_size=(SIZE, SIZE), **kw)


def make_model(variant: str = "space", seed: int = 0, **kw: object) -> SpaceModel:
    """A randomly initialised, calibrated model (quantiles chosen by hand, not measured)."""
    torch.manual_seed(seed)
    model = SpaceModel(make_config(variant, **kw))
    model.quantiles.copy_(torch.tensor([0.5, 2.0, 0.1, 0.6]))
    model.calibrated.fill_(True)
    return model.eval()


def make_card(model: SpaceModel, product_line: str = "brick") -> ModelCard:
    """A model card for ``model`` with placeholder training facts."""
    q = model.quantiles.tolist()
    cfg = model.config
    return ModelCard(
        name=f"{product_line}-test", product_line=product_line, version="v1", variant=cfg.variant, size=cfg.size,
        input_size=cfg.input_size, config=cfg, teacher=TeacherInfo(source="offline:filterbank"),
        quantiles=Quantiles(qa_st=q[0], qb_st=q[1], qa_ae=q[2], qb_ae=q[3]), default_threshold=0.3,
        threshold_method="test", validation_scores=ScoreStats(n=1, mean=0, std=0, min=0, q50=0, q90=0, q99=0, max=0),
        training=TrainingSummary(
            data_root="/data", data_sha256="0" * 64, n_train=1, n_validation=1, validation_source="validation_good",
            steps=0, batch_size=1, seed=0, duration_s=0.0, device="cpu", precision="fp32", penalty_source="none",
        ),
    )
