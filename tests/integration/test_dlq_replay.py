"""``space dlq`` on the real broker: a line whose model file is broken dead-letters its images as
``model-unavailable``; once the file is fixed, a replay of that reason turns every one into a result,
and the other dead letters stay where they are."""

from __future__ import annotations

import json
import shutil

import pytest

from models.artifact import WEIGHTS_FILE
from tests.kafka_helpers import collect, header, produce
from tests.worker_harness import request_record, running_worker
from worker.cli import main as cli_main
from worker.dlq import REPLAY_HEADER

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def _rows(table: str) -> dict[tuple[str, str], tuple[int, int]]:
    rows = {}
    for line in table.splitlines()[1:]:
        cells = line.split()
        if len(cells) == 4 and cells[2].isdigit():
            rows[(cells[0], cells[1])] = (int(cells[2]), int(cells[3]))
    return rows


def test_replay_of_model_unavailable_letters_once_the_model_is_fixed(
    make_settings, topics, trained_model, tmp_path, monkeypatch, capsys
) -> None:
    line = trained_model.line
    root = tmp_path / "registry"
    shutil.copytree(trained_model.root, root)
    weights = root / line / trained_model.version / WEIGHTS_FILE
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # a half-written model file: the line cannot load
    settings = make_settings(topics, models={"root": str(root), "negative_ttl_s": 0.2},
                             batching={"max_batch_size": 4, "max_wait_ms": 20})  # fmt: skip
    images = sorted((trained_model.data / "test").glob("*/*.png"))[:3]
    records = [request_record(p, line=line, camera=f"cam-{i}", message_id=f"img-{i}") for i, p in enumerate(images)]
    records.append(request_record(images[0], line="no-such-line", camera="cam-x", message_id="stray"))
    monkeypatch.setenv("SPACE_KAFKA__BOOTSTRAP_SERVERS", settings.kafka.bootstrap_servers)
    monkeypatch.setenv("SPACE_KAFKA__DLQ_TOPIC", topics.dlq)
    monkeypatch.setenv("SPACE_KAFKA__REQUESTS_TOPIC", topics.requests)

    with running_worker(settings):
        produce(settings, topics.requests, records)
        letters = collect(settings, topics.dlq, expected=4, timeout_s=60)
        reasons = sorted((header(d, "ce_id"), header(d, "error-reason")) for d in letters)
        assert reasons == [("img-0", "model-unavailable"), ("img-1", "model-unavailable"),
                           ("img-2", "model-unavailable"), ("stray", "unknown-product-line")]  # fmt: skip
        assert all(header(d, "error-class") == "ModelUnavailable" for d in letters if header(d, "ce_id") != "stray")

        weights.write_bytes(good)  # the fix
        capsys.readouterr()
        assert cli_main(["dlq", "summary", "--idle-s", "1"]) == 0
        table = capsys.readouterr().out
        assert _rows(table) == {("model-unavailable", line): (3, 3), ("unknown-product-line", "no-such-line"): (1, 1)}
        assert "total 4 dead letters, 4 replayable" in table

        assert cli_main(["dlq", "replay", "--reason", "model-unavailable", "--dry-run", "--idle-s", "1"]) == 0
        dry = capsys.readouterr().out.splitlines()
        assert len(dry) == 4 and dry[-1].startswith("would replay 3 dead letters")
        assert all(row.endswith(f"{topics.requests} (dry run)") for row in dry[:3])

        assert cli_main(["dlq", "replay", "--reason", "model-unavailable", "--idle-s", "1"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[-1] == "replayed 3 dead letters; skipped: none"
        results = collect(settings, topics.results, expected=3, timeout_s=60)

    assert sorted(json.loads(r.value)["message_id"] for r in results) == ["img-0", "img-1", "img-2"]
    requests = collect(settings, topics.requests, expected=7, timeout_s=30, idle_s=1.0)
    replays = [r for r in requests if header(r, REPLAY_HEADER)]
    assert len(requests) == 7 and len(replays) == 3  # the dry run produced nothing
    by_id = {header(d, "ce_id"): d for d in letters}
    for replay in replays:
        letter = by_id[header(replay, "ce_id")]
        assert header(replay, REPLAY_HEADER) == f"{topics.dlq}/{letter.partition}/{letter.offset}"
        assert not any(k.startswith("error-") for k, _ in replay.headers)
        assert replay.value == letter.value and replay.key == letter.key
        kept = [(k, v) for k, v in letter.headers if not k.startswith("error-")]
        assert [(k, v) for k, v in replay.headers if k != REPLAY_HEADER] == kept
    assert len(collect(settings, topics.dlq, expected=4, timeout_s=10, idle_s=1.0)) == 4  # none failed again


def test_replay_window_stops_at_the_cutoff_and_skips_truncated_letters(
    make_settings, topics, monkeypatch, capsys
) -> None:
    """Dead letters written after --until are not read; a truncated one is counted but never produced."""
    from datetime import UTC, datetime, timedelta

    from schemas.deadletter import DeadLetterInfo, DeadLetterReason, build_dead_letter

    settings = make_settings(topics)
    monkeypatch.setenv("SPACE_KAFKA__BOOTSTRAP_SERVERS", settings.kafka.bootstrap_servers)
    monkeypatch.setenv("SPACE_KAFKA__DLQ_TOPIC", topics.dlq)
    monkeypatch.setenv("SPACE_KAFKA__REQUESTS_TOPIC", topics.requests)
    now = datetime.now(UTC)

    def letter(mid: str, value: bytes, max_value_bytes: int) -> tuple[bytes, bytes | None, list[tuple[str, bytes]]]:
        _, _, headers = request_record(None, line="brick", camera="c", message_id=mid, data=value)
        info = DeadLetterInfo(error_class="ModelUnavailable", reason=DeadLetterReason.MODEL_UNAVAILABLE, detail="x",
                              worker_id="w", time=now, source_topic=topics.requests, source_partition=0,
                              source_offset=0)  # fmt: skip
        dead = build_dead_letter(headers, value, info, max_value_bytes=max_value_bytes)
        return b"c", dead.value, dead.headers

    produce(settings, topics.dlq, [letter("whole", b"\x89PNG-1", 1024), letter("cut", b"\x89PNG-22222", 4)])
    until = (datetime.now(UTC) + timedelta(milliseconds=1)).isoformat()
    produce(settings, topics.dlq, [letter("later", b"\x89PNG-3", 1024)])  # after --until: left alone

    capsys.readouterr()
    args = ["dlq", "replay", "--reason", "model-unavailable", "--until", until, "--idle-s", "1"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "replayed 1 dead letters; skipped: 1 value-truncated"
    replayed = collect(settings, topics.requests, expected=1, timeout_s=20, idle_s=1.0)
    assert [header(r, "ce_id") for r in replayed] == ["whole"]
