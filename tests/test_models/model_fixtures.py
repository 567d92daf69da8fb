"""Helpers for the model tests: tiny calibrated models and cards without training."""

from __future__ import annotations

from pathlib import Path

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
        name=f"{product_line}-test",
        product_line=product_line,
        version="v1",
        variant=cfg.variant,
        size=cfg.size,
        input_size=cfg.input_size,
        config=cfg,
        teacher=TeacherInfo(source="offline:filterbank"),
        quantiles=Quantiles(qa_st=q[0], qb_st=q[1], qa_ae=q[2], qb_ae=q[3]),
        default_threshold=0.3,
        threshold_method="test",
        validation_scores=ScoreStats(n=1, mean=0, std=0, min=0, q50=0, q90=0, q99=0, max=0),
        training=TrainingSummary(
            data_root="/data",
            data_sha256="0" * 64,
            n_train=1,
            n_validation=1,
            validation_source="validation_good",
            steps=0,
            batch_size=1,
            seed=0,
            duration_s=0.0,
            device="cpu",
            precision="fp32",
            penalty_source="none",
        ),
    )


def save_card_with_config(model: SpaceModel, out: Path, key: str, *, drop: bool = False,
                          edit: dict[str, object] | None = None) -> Path:  # fmt: skip
    """Save ``model`` as an artifact in ``out``, check its card stores config ``key``, then edit the card.

    ``drop`` removes ``key`` (a card written before that switch existed); ``edit`` updates the config.
    """
    import json

    from models.artifact import CARD_FILE, save_artifact

    path = save_artifact(out, make_card(model), model.state_dict())
    doc = json.loads((path / CARD_FILE).read_text())
    assert doc["config"][key] == getattr(model.config, key)  # the switch is stored with every new card
    if drop:
        del doc["config"][key]
    doc["config"].update(edit or {})
    (path / CARD_FILE).write_text(json.dumps(doc))
    return path


def resume_with_config(model: SpaceModel, key: str, stored: str | None) -> SpaceModel:
    """The model ``space train`` rebuilds from a checkpoint of ``model`` whose config has ``key`` = ``stored``.

    ``stored=None`` drops the key (a run checkpointed before that switch existed).
    """
    from models.artifact import TeacherInfo
    from models.checkpoint import Checkpoint
    from models.train import _build_model

    config = model.config.model_dump(mode="json")
    if stored is None:
        del config[key]
    else:
        config[key] = stored
    meta = {"model_config": config, "teacher": TeacherInfo(source="offline:filterbank").model_dump(mode="json")}
    resumed = Checkpoint(model.state_dict(), {}, torch.get_rng_state(), meta)
    rebuilt, _ = _build_model(None, None, None, torch.device("cpu"), resumed)  # type: ignore[arg-type]
    return rebuilt
