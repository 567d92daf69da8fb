"""``space send`` with a fake producer: everyday mistakes are one-line errors, acks print as they come."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kafka.errors import KafkaConnectionError, KafkaTimeoutError, MessageSizeTooLargeError

import worker.kafka_clients
import worker.sender as sender
from worker.cli import main
from worker.errors import SpaceError


@dataclass
class _Meta:
    partition: int
    offset: int


class _Future:
    def __init__(self, offset: int, error: Exception | None = None) -> None:
        self.offset = offset
        self.error = error
        self.is_done = True

    def get(self, timeout: float | None = None) -> _Meta:
        if self.error is not None:
            raise self.error
        return _Meta(0, self.offset)


class FakeProducer:
    """Acknowledges every send at once; ``fail_at`` makes that send's ack (or the send itself) fail."""

    def __init__(self, fail_at: int | None = None, error: Exception | None = None, raise_on_send: bool = False):
        self.sent: list[tuple[str, bytes | None]] = []
        self.fail_at = fail_at
        self.error = error or KafkaTimeoutError("Failed to update metadata after 10.0 secs.")
        self.raise_on_send = raise_on_send
        self.closed = False

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None, headers: Any = None) -> _Future:
        index = len(self.sent)
        if index == self.fail_at and self.raise_on_send:
            raise self.error
        self.sent.append((topic, key))
        return _Future(index, self.error if index == self.fail_at else None)

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"\x89PNG" + bytes(100))
    return folder


@pytest.fixture
def producer(monkeypatch: pytest.MonkeyPatch) -> list[FakeProducer]:
    made: list[FakeProducer] = []

    def make(settings: Any, **kwargs: Any) -> FakeProducer:
        p = FakeProducer()
        made.append(p)
        return p

    monkeypatch.setattr(worker.kafka_clients, "make_producer", make)
    return made


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--product-line", "bad line!"], "--product-line must match"),
        (["--product-line", ""], "--product-line must match"),
        (["--camera", ""], "--camera must be"),
        (["--camera", "cam\n1"], "--camera must be"),
        (["--limit", "-1"], "--limit must be >= 0"),
        (["--topic", "bad topic!"], "the topic must be"),
        (["--topic", ""], "the topic must be"),
        (["--topic", ".."], "the topic must be"),
        (["--rate", "0"], "--rate must be"),
        (["--rate", "nan"], "--rate must be"),
        (["--deadline-ms", "-5"], "--deadline-ms must be"),
        (["--deadline-ms", "1e300"], "--deadline-ms must be"),
        (["--repeat", "0"], "--repeat must be"),
    ],
)
def test_bad_options_are_one_line_errors_before_connecting(
    images: Path, producer: list[FakeProducer], capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = ["send", "--dir", str(images), "--product-line", "line-a", *extra]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("space: error: ") and message in err and "Traceback" not in err
    assert err.count("\n") == 1
    assert producer == []  # nothing was connected to


def test_a_file_too_large_for_inline_is_named_before_anything_is_sent(
    images: Path, producer: list[FakeProducer], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPACE_KAFKA__MAX_REQUEST_SIZE", str(200_000))
    monkeypatch.setenv("SPACE_KAFKA__DLQ_MAX_VALUE_BYTES", str(100_000))
    big = images / "9-big.png"
    big.write_bytes(bytes(200_000))
    assert main(["send", "--dir", str(images), "--product-line", "line-a"]) == 1
    err = capsys.readouterr().err
    assert str(big) in err and "--claim-check" in err and err.count("\n") == 1
    assert producer == []


def test_check_inline_sizes_leaves_room_for_headers(tmp_path: Path) -> None:
    ok = tmp_path / "ok.png"
    ok.write_bytes(bytes(1000))
    sender.check_inline_sizes([ok, ok], 64 * 1024)
    edge = tmp_path / "edge.png"
    edge.write_bytes(bytes(64 * 1024 - 100))  # fits the cap, not the cap plus headers
    with pytest.raises(SpaceError, match=r"edge\.png"):
        sender.check_inline_sizes([ok, edge], 64 * 1024)


@pytest.mark.parametrize("raise_on_send", [True, False])
def test_kafka_errors_are_one_line_and_redact_the_servers(
    images: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, raise_on_send: bool
) -> None:
    monkeypatch.setenv("SPACE_KAFKA__BOOTSTRAP_SERVERS", "user:s3cret@broker.example:9092")
    made: list[FakeProducer] = []

    def make(settings: Any, **kwargs: Any) -> FakeProducer:
        made.append(FakeProducer(fail_at=2, raise_on_send=raise_on_send))
        return made[-1]

    monkeypatch.setattr(worker.kafka_clients, "make_producer", make)
    assert main(["send", "--dir", str(images), "--product-line", "line-a"]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("space: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "KafkaTimeoutError: Failed to update metadata" in err and "KafkaTimeoutError: KafkaTimeoutError" not in err
    assert "***@broker.example:9092" in err and "s3cret" not in err
    # The two images acknowledged before the failure are still reported, in the usual format.
    lines = out.splitlines()
    assert len(lines) == 2
    assert [line.split("\t")[2] for line in lines] == ["0", "1"]
    assert lines[0].endswith("0.png") and len(lines[0].split("\t")) == 4
    assert made[0].closed


def test_unreachable_broker_at_connect_is_a_one_line_error(
    images: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def make(settings: Any, **kwargs: Any) -> FakeProducer:
        raise KafkaConnectionError("no brokers")

    monkeypatch.setattr(worker.kafka_clients, "make_producer", make)
    assert main(["send", "--dir", str(images), "--product-line", "line-a"]) == 1
    err = capsys.readouterr().err
    assert "KafkaConnectionError" in err and "127.0.0.1:9092" in err and err.count("\n") == 1


def test_message_too_large_from_the_client_is_a_one_line_error(
    images: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        worker.kafka_clients,
        "make_producer",
        lambda settings, **kw: FakeProducer(fail_at=0, error=MessageSizeTooLargeError("too big"), raise_on_send=True),
    )
    assert main(["send", "--dir", str(images), "--product-line", "line-a"]) == 1
    assert "MessageSizeTooLargeError" in capsys.readouterr().err


def test_send_prints_every_image_with_limit_and_repeat(
    images: Path, producer: list[FakeProducer], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["send", "--dir", str(images), "--product-line", "line-a", "--repeat", "2", "--limit", "4"]
    assert main([*argv, "--topic", "my.topic_1-x"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and len(producer[0].sent) == 4
    assert {topic for topic, _ in producer[0].sent} == {"my.topic_1-x"}
    assert main([*argv[:-2], "--limit", "0"]) == 0
    assert capsys.readouterr().out == ""


def test_send_images_reports_each_ack_in_order_as_it_arrives(images: Path) -> None:
    producer = FakeProducer()
    seen: list[int] = []

    def on_sent(item: Any) -> None:
        seen.append(item.offset)
        assert len(producer.sent) == item.offset + 1  # reported before the next image is sent

    files = sorted(images.iterdir())
    sent = sender.send_images(producer, "t", files, product_line="a", camera_id="c", on_sent=on_sent)
    assert seen == [0, 1, 2] and [s.offset for s in sent] == [0, 1, 2]


def test_check_send_options_accepts_the_defaults() -> None:
    sender.check_send_options(product_line="line-a", camera_id="camera-1", topic="inspection.requests")
    sender.check_send_options(
        product_line="A.b_c-1", camera_id="cam 1/x", topic="t", limit=0, rate_hz=0.5, deadline_ms=0
    )


def test_a_file_claim_check_stores_the_bytes_it_hashed_under_a_uri_that_reads_back(tmp_path: Path) -> None:
    # The file was copied again after hashing (a camera rewriting it meanwhile broke the checksum), and the
    # URI was not percent-encoded: a root holding '#' made the worker read another path.
    from urllib.parse import unquote, urlsplit

    image = tmp_path / "part.png"
    image.write_bytes(b"rewritten since")
    root = tmp_path / "claims #1 100%"
    uploader = sender.ClaimCheckUploader(root.as_uri())
    uri = uploader.upload(image, b"the bytes hashed", "m-1.png")
    assert Path(unquote(urlsplit(uri).path)).read_bytes() == b"the bytes hashed"
    assert Path(unquote(urlsplit(uri).path)).parent == root.resolve()
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]


def test_a_failing_claim_check_store_stops_sending_and_reports_what_went_out(images: Path) -> None:
    # S3 errors and OS errors escaped as tracebacks, and the requests already acknowledged were not printed.
    class Store:
        def put_object(self, **kwargs: Any) -> None:
            if kwargs["Key"].startswith("p/") and len(puts) == 2:
                raise PermissionError("AccessDenied")
            puts.append(kwargs["Key"])

    puts: list[str] = []
    uploader = sender.ClaimCheckUploader("s3://bucket/p", lambda: Store())
    producer = FakeProducer()
    reported: list[int] = []
    with pytest.raises(SpaceError, match=r"cannot store .*2\.png at s3://bucket/p: PermissionError: AccessDenied"):
        sender.send_images(producer, "t", sorted(images.iterdir()), product_line="a", camera_id="c",
                           uploader=uploader, on_sent=lambda s: reported.append(s.offset))  # fmt: skip
    assert reported == [0, 1] and len(producer.sent) == 2


def test_after_a_refused_ack_the_later_acknowledged_requests_are_still_reported(images: Path) -> None:
    class SlowAcks(FakeProducer):
        def send(self, *args: Any, **kwargs: Any) -> _Future:
            future = super().send(*args, **kwargs)
            future.is_done = False  # acknowledged only at the final flush
            return future

    producer = SlowAcks(fail_at=0)
    reported: list[int] = []
    with pytest.raises(KafkaTimeoutError):
        sender.send_images(producer, "t", sorted(images.iterdir()), product_line="a", camera_id="c",
                           on_sent=lambda s: reported.append(s.offset))  # fmt: skip
    assert reported == [1, 2]
