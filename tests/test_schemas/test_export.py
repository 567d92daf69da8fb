"""Exported JSON Schemas: the checked-in docs/schemas files equal what `space schemas export` writes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from schemas import (
    InspectionRequest,
    InspectionResult,
    build_request_headers,
    build_result_headers,
    render_json_schemas,
)
from worker.cli import main

DOCS_SCHEMAS = Path(__file__).parents[2] / "docs" / "schemas"
FIXTURES = Path(__file__).parent / "fixtures"


def test_checked_in_schemas_are_current() -> None:
    rendered = render_json_schemas()
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in DOCS_SCHEMAS.glob("*.json")}
    assert sorted(on_disk) == sorted(rendered), "run: space schemas export docs/schemas"
    stale = [name for name, text in rendered.items() if on_disk[name] != text]
    assert stale == [], "run: space schemas export docs/schemas"


def test_export_command_writes_every_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schemas", "export", str(tmp_path / "out")]) == 0
    written = {p.name: p.read_text(encoding="utf-8") for p in (tmp_path / "out").iterdir()}
    assert written == render_json_schemas()
    assert "wrote 9 schemas" in capsys.readouterr().out


def test_export_check_detects_stale_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schemas", "export", str(tmp_path)]) == 0
    assert main(["schemas", "export", "--check", str(tmp_path)]) == 0
    (tmp_path / "claim-check.json").write_text("{}\n", encoding="utf-8")
    assert main(["schemas", "export", "--check", str(tmp_path)]) == 1
    assert "claim-check.json" in capsys.readouterr().out


def test_one_schema_per_contract() -> None:
    titles = {json.loads(text)["title"] for text in render_json_schemas().values()}
    assert titles == {
        "InspectionRequestHeaders",
        "InspectionRequest",
        "ClaimCheck",
        "InspectionResult",
        "InspectionAlert",
        "InspectionResultHeaders",
        "DeadLetterInfo",
        "DeadLetterHeaders",
        "ThresholdRecord",
    }


def test_exported_result_schema_accepts_the_wire_fixture_and_rejects_drift() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(render_json_schemas()["inspection-result.json"])
    document = json.loads((FIXTURES / "inspection-result.v1.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(document)
    for broken in (
        {**document, "verdict": "maybe"},
        {**document, "extra": 1},
        {**document, "product_line": "a b"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft202012Validator(schema).validate(broken)


def test_exported_header_schemas_accept_what_we_build(
    make_request: Callable[..., InspectionRequest], make_result: Callable[..., InspectionResult]
) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    rendered = render_json_schemas()
    cases = [
        ("inspection-request-headers.json", build_request_headers(make_request())),
        ("inspection-result-headers.json", build_result_headers(make_result())),
    ]
    for name, headers in cases:
        validator = jsonschema.Draft202012Validator(json.loads(rendered[name]))
        validator.validate({key: value.decode() for key, value in headers})
        with pytest.raises(jsonschema.ValidationError):
            validator.validate({key: value.decode() for key, value in headers if key != "ce_id"})
