"""Integrator docs stay true: AsyncAPI channels and references, the reasons table, the examples."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from schemas import InspectionResult, build_claim_check_value, parse_request
from schemas.request import ClaimCheck
from tests.test_schemas.samples import PNG_BYTES
from worker.commands.schemas import render_reason_table
from worker.settings import KafkaSettings

yaml = pytest.importorskip("yaml")

DOCS = Path(__file__).parents[2] / "docs"
FIXTURES = Path(__file__).parent / "fixtures"
TOPIC_SETTINGS = ("requests_topic", "results_topic", "alerts_topic", "dlq_topic")


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DOCS / "asyncapi.yaml").read_text(encoding="utf-8"))
    return document


def resolve(document: dict[str, Any], ref: str) -> Any:
    """Follow an internal ``#/a/b`` reference."""
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def deref(document: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and set(node) == {"$ref"} and node["$ref"].startswith("#/"):
        node = resolve(document, node["$ref"])
    return node


def all_refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [ref for value in node.values() for ref in all_refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in all_refs(item)]
    return []


def block(markdown: str, name: str) -> str:
    match = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", markdown, re.DOTALL)
    assert match, f"marker {name} missing"
    return match.group(1)


def fenced(text: str) -> str:
    match = re.search(r"```\w*\n(.*?)```", text, re.DOTALL)
    assert match
    return match.group(1)


def test_asyncapi_is_version_3(asyncapi: dict[str, Any]) -> None:
    assert asyncapi["asyncapi"] == "3.0.0"
    assert asyncapi["info"]["title"]
    assert asyncapi["info"]["version"]


def test_every_topic_has_a_channel_matching_the_worker_defaults(asyncapi: dict[str, Any]) -> None:
    addresses = {channel["address"] for channel in asyncapi["channels"].values()}
    defaults = {KafkaSettings.model_fields[name].default for name in TOPIC_SETTINGS}
    assert (
        addresses
        == defaults
        == {"inspection.requests", "inspection.results", "inspection.alerts", "inspection.dlq"}
    )
    for channel in asyncapi["channels"].values():
        assert channel["bindings"]["kafka"]["topic"] == channel["address"]


def test_every_message_has_headers_payload_and_a_camera_key(asyncapi: dict[str, Any]) -> None:
    for name, channel in asyncapi["channels"].items():
        assert channel["messages"], name
        for message_ref in channel["messages"].values():
            message = deref(asyncapi, message_ref)
            assert {"headers", "payload", "contentType"} <= set(message), message.get("name")
            key = deref(asyncapi, message["bindings"])["kafka"]["key"]
            assert key["type"] == "string"


def test_every_reference_resolves(asyncapi: dict[str, Any]) -> None:
    refs = all_refs(asyncapi)
    files = {ref for ref in refs if not ref.startswith("#")}
    for ref in refs:
        if ref.startswith("#"):
            resolve(asyncapi, ref)
    for ref in files:
        assert (DOCS / ref).is_file(), ref
        json.loads((DOCS / ref).read_text(encoding="utf-8"))
    assert {Path(ref).name for ref in files} == {
        "inspection-request-headers.json",
        "claim-check.json",
        "inspection-result.json",
        "inspection-alert.json",
        "inspection-result-headers.json",
        "dead-letter-headers.json",
    }


def test_operations_point_at_their_channel_messages(asyncapi: dict[str, Any]) -> None:
    actions = {}
    for name, operation in asyncapi["operations"].items():
        channel_ref = operation["channel"]["$ref"]
        channel = resolve(asyncapi, channel_ref)
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), name
            resolve(asyncapi, message["$ref"])
        actions[channel["address"]] = operation["action"]
    group = asyncapi["operations"]["consumeRequests"]["bindings"]["kafka"]["groupId"]["const"]
    assert group == KafkaSettings.model_fields["group_id"].default
    assert actions == {
        "inspection.requests": "receive",
        "inspection.results": "send",
        "inspection.alerts": "send",
        "inspection.dlq": "send",
    }


def test_asyncapi_request_examples_are_valid_requests(asyncapi: dict[str, Any]) -> None:
    messages = asyncapi["components"]["messages"]
    for example in messages["InspectionRequestImage"]["examples"]:
        headers = [(k, str(v).encode()) for k, v in example["headers"].items()]
        assert parse_request(headers, PNG_BYTES).content_type == "image/png"
    for example in messages["InspectionRequestClaimCheck"]["examples"]:
        headers = [(k, str(v).encode()) for k, v in example["headers"].items()]
        value = build_claim_check_value(ClaimCheck(**example["payload"]))
        assert parse_request(headers, value).claim_check == ClaimCheck(**example["payload"])


def test_integration_reasons_table_matches_the_enum() -> None:
    markdown = (DOCS / "integration.md").read_text(encoding="utf-8")
    assert block(markdown, "reasons") == render_reason_table(), "run: space schemas reasons"


def test_reason_table_has_one_row_per_reason() -> None:
    from schemas import DeadLetterReason

    rows = [line for line in render_reason_table().splitlines()[2:] if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [reason.value for reason in DeadLetterReason]


def test_integration_example_request_parses() -> None:
    text = fenced(block((DOCS / "integration.md").read_text(encoding="utf-8"), "example-request"))
    headers = [(name, value.encode()) for name, value in (line.split(": ", 1) for line in text.splitlines())]
    request = parse_request(headers, PNG_BYTES)
    assert (request.message_id, request.camera_id, request.product_line) == ("msg-0001", "cam-3", "bottle")


def test_integration_example_result_is_the_v1_fixture() -> None:
    text = fenced(block((DOCS / "integration.md").read_text(encoding="utf-8"), "example-result"))
    assert json.loads(text) == json.loads((FIXTURES / "inspection-result.v1.json").read_text())
    InspectionResult.model_validate_json(text)
