"""The worker's GPU-decode routing on the real broker: JPEGs through the device decoder, refusals
decoded again on the CPU, other formats untouched. A CPU stand-in with nvJPEG's contract replaces
nvJPEG here; tests/test_worker/test_device_decode.py runs the real one on CUDA hosts."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from models.data import load_image
from models.detector import Detector
from tests.kafka_helpers import collect, header, produce
from tests.worker_harness import request_record, running_worker
from worker.app import App
from worker.device_decode import DeviceJpegDecoder

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

REFUSE = b"refuse-on-device"


def _with_comment(jpeg: bytes, text: bytes) -> bytes:
    """The same JPEG with a COM segment after SOI (every decoder skips it)."""
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


class StandInDecoder:
    """nvJPEG's contract on the CPU (file bytes -> (3, H, W) uint8, RuntimeError if refused); counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, encoded: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        data = encoded.numpy()
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
        if image is None or REFUSE in data.tobytes():
            raise RuntimeError("nvjpegDecode failed: 6")
        return torch.from_numpy(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).contiguous()


def test_jpegs_take_the_device_path_and_refusals_fall_back_to_the_cpu(make_settings, topics, trained_model) -> None:
    settings = make_settings(topics, models={"root": str(trained_model.root), "preload": (trained_model.line,)},
                             batching={"max_batch_size": 4, "max_wait_ms": 20})  # fmt: skip
    paths = sorted((trained_model.data / "test").glob("*/*.png"))[:4]
    jpegs = {f"{p.parent.name}-{p.stem}": cv2.imencode(".jpg", cv2.imread(str(p)), [cv2.IMWRITE_JPEG_QUALITY, 98])[1].tobytes() for p in paths}
    refused_ok = _with_comment(jpegs[f"{paths[0].parent.name}-{paths[0].stem}"], REFUSE)  # OpenCV decodes it; the stand-in refuses
    corrupt = jpegs[f"{paths[1].parent.name}-{paths[1].stem}"][:400]
    records = [request_record(None, line=trained_model.line, camera="c", message_id=f"jpg-{k}", data=v,
                              content_type="image/jpeg") for k, v in jpegs.items()]  # fmt: skip
    records += [
        request_record(paths[2], line=trained_model.line, camera="c", message_id="png"),
        request_record(None, line=trained_model.line, camera="c", message_id="fallback", data=refused_ok,
                       content_type="image/jpeg"),
        request_record(None, line=trained_model.line, camera="c", message_id="corrupt", data=corrupt,
                       content_type="image/jpeg"),
    ]
    stand_in = StandInDecoder()

    def use_stand_in(app: App) -> None:
        app.worker.device_decoder = DeviceJpegDecoder(stand_in, torch.device("cpu"))

    with running_worker(settings, customize=use_stand_in) as app:
        produce(settings, topics.requests, records)
        results = collect(settings, topics.results, expected=len(records) - 1, timeout_s=120, idle_s=1.0)
        letters = collect(settings, topics.dlq, expected=1, timeout_s=30)
        metrics = app.worker.metrics
        device_decodes = metrics.device_decodes._value.get()
        fallbacks = metrics.decode_fallbacks._value.get()
    assert app.exit_code == 0

    bodies = {json.loads(r.value)["message_id"]: json.loads(r.value) for r in results}
    assert sorted(bodies) == sorted([f"jpg-{k}" for k in jpegs] + ["png", "fallback"])
    assert [header(d, "error-reason") for d in letters] == ["corrupt-image"]
    # 4 good JPEGs decoded on the "device"; the refused and the corrupt one retried on the CPU.
    assert (device_decodes, fallbacks) == (4, 2)
    assert stand_in.calls == 6  # the PNG never went to the device decoder

    # Scores equal the CPU path's (decode + INTER_AREA resize) on the same JPEG bytes.
    detector = Detector.load(trained_model.root / trained_model.line / trained_model.version, device="cpu")
    for stem, data in jpegs.items():
        image = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        expected = float(detector.predict([image]).scores[0])
        assert bodies[f"jpg-{stem}"]["score"] == pytest.approx(expected, rel=0.02, abs=1e-3)
    assert bodies["png"]["score"] == pytest.approx(float(detector.predict([load_image(paths[2])]).scores[0]), rel=1e-4)
