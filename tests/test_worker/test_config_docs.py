"""docs/configuration.md is generated from the settings classes and must be current."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import SecretStr

from worker.config_docs import DEFAULT_PATH, env_variable, main, render, type_name
from worker.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def test_checked_in_page_is_current() -> None:
    page = (REPO / DEFAULT_PATH).read_text(encoding="utf-8")
    assert page == render(), (
        "docs/configuration.md is stale: python -m worker.config_docs --write docs/configuration.md"
    )


def test_every_setting_has_a_row() -> None:
    page = render()
    for section, field in Settings.model_fields.items():
        assert f"## `{section}`" in page
        for name in field.annotation.model_fields:  # type: ignore[union-attr]
            assert f"| `{env_variable(section, name)}` |" in page


def test_env_variable_matches_the_settings_convention() -> None:
    assert env_variable("kafka", "bootstrap_servers") == "SPACE_KAFKA__BOOTSTRAP_SERVERS"


def test_type_names_are_readable() -> None:
    assert type_name(int) == "int"
    assert type_name(Literal["a", "b"]) == "one of `a`, `b`"
    assert type_name(SecretStr | None) == "secret (optional)"
    assert type_name(Path) == "path"
    assert type_name(tuple[int, ...]) == "list of int"


def test_check_mode_reports_a_stale_page(tmp_path: Path, capsys) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text("# old\n", encoding="utf-8")
    assert main(["--check", str(stale)]) == 1
    assert "stale" in capsys.readouterr().err
    assert main(["--write", str(stale)]) == 0
    assert main(["--check", str(stale)]) == 0


def test_runbook_covers_every_metric_and_dead_letter_reason() -> None:
    from schemas.deadletter import DEAD_LETTER_REASONS
    from worker.metrics import WorkerMetrics

    runbook = (REPO / "docs" / "runbook.md").read_text(encoding="utf-8")
    for family in WorkerMetrics().registry.collect():
        assert f"`{family.name}" in runbook, f"docs/runbook.md does not explain {family.name}"
    for reason in DEAD_LETTER_REASONS:
        assert f"| `{reason.value}` |" in runbook, f"docs/runbook.md has no row for dead-letter reason {reason.value}"
