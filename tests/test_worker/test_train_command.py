"""``space train`` output safety: versions are immutable and names stay inside ``<out>/<line>/``.

Every refusal happens before training: the data folders here are empty, so a run that got past the
checks would fail on the dataset instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from models.train import OutputExistsError, TrainConfig, train
from worker.cli import main
from worker.registry import ModelRegistry


@pytest.fixture
def empty_data(tmp_path: Path) -> Path:
    (tmp_path / "data" / "train" / "good").mkdir(parents=True)
    return tmp_path / "data"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A model root where brick/v1 is active and brick/v2 exists (with a stale metrics file)."""
    root = tmp_path / "models"
    for version in ("v1", "v2"):
        (root / "brick" / version).mkdir(parents=True)
        (root / "brick" / version / "model.json").write_text(f'{{"version": "{version}"}}')
    (root / "brick" / "v2" / "metrics.json").write_text("{}")
    ModelRegistry(str(root)).promote("brick", "v1")
    return root


def _train(data: Path, root: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), "--product-line", "brick", "--out", str(root), "--no-progress", *extra])


def test_an_existing_version_is_refused_before_training(
    empty_data: Path, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for version in ("v1", "v2"):
        assert _train(empty_data, root, "--model-version", version) == 1
        err = capsys.readouterr().err
        assert err.startswith("space: error: ") and err.count("\n") == 1
        assert f"brick/{version} already exists: versions are immutable" in err and "--overwrite" in err
    assert (root / "brick" / "v1" / "model.json").read_text() == '{"version": "v1"}'


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model-version", "../x"], "invalid version '../x'"),
        (["--model-version", "v1/../../x"], "invalid version 'v1/../../x'"),
        (["--model-version", ".hidden"], "invalid version '.hidden'"),
        (["--product-line", "../evil"], "invalid product line '../evil'"),
    ],
)
def test_names_the_registry_refuses_are_refused(
    empty_data: Path, root: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert _train(empty_data, root, *args) == 1
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in root.parent.iterdir()) == ["data", "models"]


def test_overwrite_never_replaces_the_active_version(
    empty_data: Path, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _train(empty_data, root, "--model-version", "v1", "--overwrite") == 1
    assert "is the active version of line 'brick'" in capsys.readouterr().err
    assert _train(empty_data, root, "--overwrite") == 1
    assert "--overwrite needs --model-version" in capsys.readouterr().err
    assert _train(empty_data, root, "--model-version", "v2", "--overwrite") == 1
    err = capsys.readouterr().err
    assert "already exists" not in err and "active" not in err  # past the checks: the empty dataset stops it


def test_train_api_refuses_an_existing_folder_and_names_that_leave_out(empty_data: Path, root: Path) -> None:
    with pytest.raises(OutputExistsError, match="brick/v2 already exists"):
        train(TrainConfig(data=empty_data, product_line="brick", out=root, model_version="v2", steps=1))
    for field, value in (("model_version", "../x"), ("product_line", "a/b"), ("model_version", "..")):
        with pytest.raises(ValidationError, match="must be one folder name"):
            TrainConfig.model_validate({"data": empty_data, "product_line": "brick", "out": root, field: value})


def test_overwrite_replaces_the_whole_folder(root: Path, tmp_path: Path) -> None:
    from models.artifact import load_artifact
    from models.synthetic import build_product_line

    data = build_product_line("brick", tmp_path / "synth", n_train=4, n_val=2, n_test_good=1, n_test_defect=1, size=64)
    cfg = {"data": data, "product_line": "brick", "out": root, "model_version": "v2", "steps": 1, "input_size": 64}
    out = train(TrainConfig.model_validate({**cfg, "penalty": "none", "device": "cpu", "overwrite": True}))
    card, _ = load_artifact(out)
    assert card.version == "v2" and not (out / "metrics.json").exists()  # nothing of the old v2 survives


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--data", "DATA", "--product-line", "brick", "--out", "s3://space-models/prod"],
        ["calibrate", "--model", "s3://space-models/prod/brick/v1", "--data", "DATA"],
        ["evaluate", "--model", "MODEL", "--data", "DATA", "--out", "s3://bucket/eval"],
    ],
)
def test_a_url_where_a_local_folder_belongs_is_refused(argv: list[str], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    # "--out s3://bucket/prod" became the local folder ./s3:/bucket/prod: the model was trained there and
    # `space models promote` on the real root found no such version.
    argv = [str(tmp_path) if a in ("DATA", "MODEL") else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "is a URL; this command reads and writes local folders" in capsys.readouterr().err
    assert not (Path.cwd() / "s3:").exists()


@pytest.mark.parametrize(
    ("extra", "message"), [(["--threads", "-1"], "--threads must be 0"), (["OUT_IS_A_FILE"], "is a file, not a folder")]
)
def test_train_refuses_bad_threads_and_a_file_as_out_before_training(
    empty_data: Path, tmp_path: Path, capsys, extra, message
) -> None:  # type: ignore[no-untyped-def]
    # Both were tracebacks, the second only once the whole training was done.
    out = tmp_path / "models"
    if extra == ["OUT_IS_A_FILE"]:
        out, extra = tmp_path / "afile", []
        out.write_text("not a folder")
    assert main(["train", "--data", str(empty_data), "--product-line", "brick", "--out", str(out), *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
