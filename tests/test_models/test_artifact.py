"""Artifact round trip and integrity: bit-exact tensors, sha256 checked, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.artifact import CARD_FILE, WEIGHTS_FILE, ArtifactError, ModelCard, load_artifact, save_artifact
from tests.test_models.model_fixtures import SIZE, make_card, make_model


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor], ModelCard]:
    model = make_model("space")
    card = make_card(model)
    state = model.state_dict()
    return save_artifact(tmp_path / "brick" / "v1", card, state), state, card


def test_round_trip_is_bit_exact(saved: tuple[Path, dict[str, torch.Tensor], ModelCard]) -> None:
    path, state, card = saved
    loaded_card, loaded = load_artifact(path)
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype
        assert torch.equal(loaded[key], value), key
    assert loaded_card.weights_sha256 and len(loaded_card.weights_sha256) == 64
    assert loaded_card.model_dump(exclude={"weights_sha256"}) == card.model_dump(exclude={"weights_sha256"})
    assert not list(path.glob(".*tmp"))


def test_card_json_is_plain_and_records_the_hash(saved: tuple[Path, dict[str, torch.Tensor], ModelCard]) -> None:
    path, _, _ = saved
    doc = json.loads((path / CARD_FILE).read_text())
    assert doc["variant"] == "space" and doc["input_size"] == [SIZE, SIZE]
    assert doc["config"]["use_scl"] is True
    assert set(doc["quantiles"]) == {"qa_st", "qb_st", "qa_ae", "qb_ae"}


def test_tampered_weights_are_rejected(saved: tuple[Path, dict[str, torch.Tensor], ModelCard]) -> None:
    path, _, _ = saved
    weights = path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.safetensors: sha256 .* does not match"):
        load_artifact(path)


def test_missing_files_and_bad_card_are_clear_errors(
    saved: tuple[Path, dict[str, torch.Tensor], ModelCard], tmp_path: Path
) -> None:
    path, _, _ = saved
    with pytest.raises(ArtifactError, match="folder not found"):
        load_artifact(tmp_path / "nowhere")
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError, match="weights file missing"):
        load_artifact(path)
    (path / CARD_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="invalid model card"):
        load_artifact(path)
    (path / CARD_FILE).unlink()
    with pytest.raises(ArtifactError, match="model card missing"):
        load_artifact(path)


@pytest.mark.parametrize("elsewhere", ["absolute", "../../outside.safetensors", "sub/model.safetensors", "..", ""])
def test_a_card_naming_weights_outside_its_folder_is_refused(
    saved: tuple[Path, dict[str, torch.Tensor], ModelCard], tmp_path: Path, elsewhere: str
) -> None:
    # The hash would match (the file is a copy of the real weights): only the name check can refuse it.
    path, _, _ = saved
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((path / WEIGHTS_FILE).read_bytes())
    (path / WEIGHTS_FILE).unlink()
    doc = json.loads((path / CARD_FILE).read_text())
    doc["weights_file"] = str(outside) if elsewhere == "absolute" else elsewhere
    (path / CARD_FILE).write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="weights_file must be a file name inside the artifact folder"):
        load_artifact(path)


def test_the_weights_loaded_are_the_weights_hashed(
    saved: tuple[Path, dict[str, torch.Tensor], ModelCard], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file was hashed, then opened again to load: a version folder rewritten in between (train.py
    # rewrites a reused --model-version in place) served weights that do not match the card.
    import models.artifact as artifact_module

    path, state, _ = saved
    other = {k: torch.zeros_like(v) for k, v in state.items()}
    hash_file = artifact_module.sha256_file

    def hash_then_rewrite(p: Path) -> str:
        digest = hash_file(p)
        from safetensors.torch import save_file

        save_file(other, str(path / WEIGHTS_FILE))
        return digest

    monkeypatch.setattr(artifact_module, "sha256_file", hash_then_rewrite)
    try:
        _, loaded = load_artifact(path)
    except ArtifactError:
        return  # refused: fine too
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_files_are_readable_by_other_users_and_identical_weights_hash_identically(
    saved: tuple[Path, dict[str, torch.Tensor], ModelCard], tmp_path: Path
) -> None:
    # safetensors created the weights 0600 (workers running as another user could not read them), and its
    # two metadata keys came out in either order, so the same weights hashed differently.
    path, state, card = saved
    assert (path / WEIGHTS_FILE).stat().st_mode & 0o777 == 0o644
    assert (path / CARD_FILE).stat().st_mode & 0o777 == 0o644
    assert path.stat().st_mode & 0o777 == 0o755
    digests = {
        json.loads((save_artifact(tmp_path / f"again{i}" / "v1", card, state) / CARD_FILE).read_text())[
            "weights_sha256"
        ]
        for i in range(4)
    }
    assert len(digests) == 1


def test_a_failed_save_leaves_no_folder_and_an_overwrite_keeps_the_old_version(
    saved: tuple[Path, dict[str, torch.Tensor], ModelCard], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk while saving left an empty version folder (re-running was refused: "already exists"), and
    # --overwrite deleted the old version before the new one was written.
    import models.artifact as artifact_module

    path, state, card = saved
    before = (path / WEIGHTS_FILE).read_bytes()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifact_module, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_artifact(tmp_path / "brick" / "v2", card, state)
    with pytest.raises(OSError, match="No space left"):
        save_artifact(path, card, state)  # an overwrite of v1
    assert sorted(p.name for p in (tmp_path / "brick").iterdir()) == ["v1"]  # no v2, no temporary folder
    assert (path / WEIGHTS_FILE).read_bytes() == before
    load_artifact(path)
