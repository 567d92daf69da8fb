"""Model registry on a file root: versions, promote/rollback, bounded history, names, corrupt pointers,
artifact verification, and the ``space models`` command over it."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.test_models.model_fixtures import SIZE
from worker.cli import main
from worker.registry import HISTORY_MAX, POINTER, ModelRegistry, RegistryError, check_name

WHEN = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _version(root: Path, line: str, version: str) -> Path:
    """A version folder holding only a card placeholder (enough for pointer logic)."""
    folder = root / line / version
    folder.mkdir(parents=True)
    (folder / "model.json").write_text("{}")
    return folder


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    for version in ("v1", "v2", "v3"):
        _version(tmp_path, "brick", version)
    return ModelRegistry(str(tmp_path), clock=lambda: WHEN)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real artifact (valid card + weights with their sha256) of line brick, version v1."""
    from models.artifact import save_artifact
    from tests.test_models.model_fixtures import make_card, make_model

    model = make_model()
    return save_artifact(tmp_path_factory.mktemp("artifact") / "v1", make_card(model), model.state_dict())


def test_lines_and_versions_list_only_folders_with_a_card(registry: ModelRegistry, tmp_path: Path) -> None:
    (tmp_path / "brick" / "half-uploaded").mkdir()
    (tmp_path / "empty-line").mkdir()
    (tmp_path / ".hidden").mkdir()
    assert registry.lines() == ["brick"]
    assert registry.versions("brick") == ["v1", "v2", "v3"]


def test_promote_then_rollback_walks_the_history(registry: ModelRegistry, tmp_path: Path) -> None:
    assert registry.pointer("brick") is None
    with pytest.raises(RegistryError, match="no active model"):
        registry.active_version("brick")
    registry.promote("brick", "v1", by="alice")
    registry.promote("brick", "v2", by="bob")
    pointer = registry.promote("brick", "v3", by="carol")
    assert (pointer.version, pointer.history, pointer.updated_by) == ("v3", ("v2", "v1"), "carol")
    stored = json.loads((tmp_path / "brick" / POINTER).read_text())
    assert stored == {"version": "v3", "history": ["v2", "v1"], "updated_at": WHEN.isoformat(), "updated_by": "carol"}

    assert registry.rollback("brick", by="dave").version == "v2"
    assert registry.rollback("brick").version == "v1"
    assert registry.active_version("brick") == "v1"
    with pytest.raises(RegistryError, match="no previous version"):
        registry.rollback("brick")


def test_promoting_the_active_version_again_keeps_the_history(registry: ModelRegistry) -> None:
    registry.promote("brick", "v1")
    registry.promote("brick", "v2")
    assert registry.promote("brick", "v2").history == ("v1",)


def test_history_is_bounded(tmp_path: Path) -> None:
    registry = ModelRegistry(str(tmp_path))
    for i in range(HISTORY_MAX + 5):
        _version(tmp_path, "tile", f"v{i}")
        registry.promote("tile", f"v{i}")
    pointer = registry.pointer("tile")
    assert pointer is not None and len(pointer.history) == HISTORY_MAX
    assert pointer.history[0] == f"v{HISTORY_MAX + 3}"


def test_promote_refuses_unknown_versions_and_rollback_a_deleted_one(registry: ModelRegistry, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no version 'v9'"):
        registry.promote("brick", "v9")
    registry.promote("brick", "v1")
    registry.promote("brick", "v2")
    shutil.rmtree(tmp_path / "brick" / "v1")
    with pytest.raises(RegistryError, match="no longer exists"):
        registry.rollback("brick")
    assert registry.active_version("brick") == "v2"


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden", "-x", "x" * 65, "v 1", "..", "ü"])
def test_invalid_names_are_refused_before_touching_paths(registry: ModelRegistry, name: str) -> None:
    with pytest.raises(RegistryError, match="invalid"):
        check_name("version", name)
    with pytest.raises(RegistryError, match="invalid"):
        registry.promote("brick", name)
    with pytest.raises(RegistryError, match="invalid"):
        registry.pointer(name)


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"history": []}',
        '{"version": "../../etc"}',
        '{"version": 3}',
        '{"version": "v1", "history": "v2"}',
        '{"version": "v1", "history": ["../x"]}',
    ],
)
def test_corrupt_pointer_is_a_clear_error_and_promote_repairs_it(
    registry: ModelRegistry, tmp_path: Path, text: str
) -> None:
    (tmp_path / "brick" / POINTER).write_text(text)
    with pytest.raises(RegistryError, match="pointer of line 'brick' is corrupt"):
        registry.active_version("brick")
    with pytest.raises(RegistryError, match="corrupt"):
        registry.rollback("brick")
    pointer = registry.promote("brick", "v2", by="ops")
    assert (pointer.version, pointer.history) == ("v2", ())
    assert registry.active_version("brick") == "v2"


def test_pointer_write_is_atomic_and_leaves_no_temporary_file(registry: ModelRegistry, tmp_path: Path) -> None:
    registry.promote("brick", "v1")
    registry.promote("brick", "v2")
    # The lock file of the pointer's compare-and-set stays (hidden: listings skip dot names).
    assert sorted(p.name for p in (tmp_path / "brick").iterdir()) == [f".{POINTER}.lock", POINTER, "v1", "v2", "v3"]


def test_verify_accepts_a_good_artifact_and_refuses_corrupt_or_mismatched_ones(artifact: Path, tmp_path: Path) -> None:
    root = tmp_path / "reg"
    shutil.copytree(artifact, root / "brick" / "v1")
    registry = ModelRegistry(str(root))
    card = registry.verify("brick", "v1")
    assert (card.product_line, card.version) == ("brick", "v1")

    shutil.copytree(artifact, root / "brick" / "v2")  # card still says v1
    with pytest.raises(RegistryError, match="says product line 'brick' version 'v1'"):
        registry.verify("brick", "v2")

    broken = shutil.copytree(artifact, root / "brick" / "v3")
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match=r"not a valid artifact.*sha256"):
        registry.verify("brick", "v3")

    (root / "brick" / "v4").mkdir()
    (root / "brick" / "v4" / "model.json").write_text('{"name": "x"}')
    with pytest.raises(RegistryError, match="invalid model card"):
        registry.verify("brick", "v4")


# ------------------------------------------------------------------------------------------------
# space models (the CLI over a file root)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def cli_root(artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from models.artifact import load_artifact, save_artifact

    root = tmp_path / "models"
    shutil.copytree(artifact, root / "brick" / "v1")
    card, state = load_artifact(artifact)
    save_artifact(
        root / "brick" / "v2", card.model_copy(update={"version": "v2", "metrics": {"image_auroc": 0.97}}), state
    )
    # The command configures process-wide logging (cached loggers); keep tests' structlog untouched.
    monkeypatch.setattr("worker.logging.configure_logging", lambda *args, **kwargs: None)
    monkeypatch.setenv("SPACE_MODELS__ROOT", str(root))
    monkeypatch.setenv("SPACE_WORKER__STATE_DIR", str(tmp_path / "state"))
    return root


def test_models_cli_promote_list_show_rollback(cli_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "promote", "brick", "v1", "--by", "alice"]) == 0
    assert main(["models", "promote", "brick", "v2", "--by", "bob"]) == 0
    assert "v2 is active (previous: v1)" in capsys.readouterr().out

    assert main(["models", "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == [
        "LINE", "VERSION", "ACTIVE", "VARIANT", "INPUT", "DEFAULT_THRESHOLD", "PRECISION", "CREATED_AT", "METRICS"
    ]  # fmt: skip
    v2_row = next(r for r in table if r.split()[1] == "v2")
    assert (
        v2_row.split()[2] == "*" and "space-s" in v2_row and f"{SIZE}x{SIZE}" in v2_row and "image_auroc=0.97" in v2_row
    )

    assert main(["models", "list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    (line,) = listing["lines"]
    assert line["line"] == "brick" and line["active"] == "v2"
    assert [(v["version"], v["active"]) for v in line["versions"]] == [("v1", False), ("v2", True)]
    assert line["versions"][0]["default_threshold"] == pytest.approx(0.3)
    assert line["versions"][0]["precision"] == "fp32"  # the card's training precision, as a setting value

    assert main(["models", "show", "brick"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (
        shown["version"] == "v2" and shown["pointer"]["history"] == ["v1"] and shown["pointer"]["updated_by"] == "bob"
    )
    assert shown["card"]["version"] == "v2"

    assert main(["models", "rollback", "brick", "--by", "carol"]) == 0
    assert "rolled back to v1" in capsys.readouterr().out
    assert ModelRegistry(str(cli_root)).active_version("brick") == "v1"


def test_models_cli_refuses_a_corrupt_artifact_unless_forced(
    cli_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = cli_root / "brick" / "v2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    assert main(["models", "promote", "brick", "v1"]) == 0
    capsys.readouterr()
    assert main(["models", "promote", "brick", "v2"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("space: error: line 'brick' version 'v2' is not a valid artifact") and "sha256" in err
    assert ModelRegistry(str(cli_root)).active_version("brick") == "v1"
    assert main(["models", "promote", "brick", "v2", "--force"]) == 0
    assert ModelRegistry(str(cli_root)).active_version("brick") == "v2"


def test_models_cli_errors_are_one_line(cli_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "rollback", "brick"]) == 1
    assert main(["models", "promote", "brick", "v7"]) == 1
    assert main(["models", "show", "nope"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("space: error: ") for e in errors)
    assert "no version 'v7' (have: v1, v2)" in errors[1]


def test_models_cli_show_of_a_card_that_is_not_json_is_one_line(
    cli_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (cli_root / "brick" / "v2" / "model.json").write_text("{not json")
    assert main(["models", "show", "brick", "v2"]) == 1  # was a JSONDecodeError traceback
    captured = capsys.readouterr()
    (err,) = captured.err.strip().splitlines()
    assert err.startswith("space: error: line 'brick' version 'v2': invalid model card: Expecting property name")
    assert captured.out == ""
    assert main(["models", "list"]) == 0  # list already reported it in its row
    assert "invalid model card" in capsys.readouterr().out


def test_a_promote_racing_another_writer_fails_and_keeps_the_other_write(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    # promote and rollback read the pointer, then wrote it whole: two operators at once lost one's change
    # (or, both rolling back, stepped back twice). Now the write is a compare-and-set.
    from worker.registry import PointerConflict

    registry.promote("brick", "v1", by="alice")
    other = ModelRegistry(str(tmp_path))
    read = registry._backend.read_versioned

    def read_then_someone_writes(key: str) -> tuple[str | None, str | None]:
        found = read(key)
        other.promote("brick", "v3", by="bob")  # lands between this command's read and its write
        return found

    registry._backend.read_versioned = read_then_someone_writes  # type: ignore[method-assign]
    with pytest.raises(PointerConflict, match=r"changed while this command ran \(now version 'v3' by bob\)"):
        registry.promote("brick", "v2", by="carol")
    with pytest.raises(PointerConflict):
        registry.rollback("brick", by="carol")
    registry._backend.read_versioned = read  # type: ignore[method-assign]
    pointer = registry.pointer("brick")
    assert pointer is not None and (pointer.version, pointer.history, pointer.updated_by) == ("v3", ("v1",), "bob")
    assert registry.promote("brick", "v2", by="carol").history == ("v3", "v1")  # no race: it goes through
