"""Run the real worker (``build_app``) in a background thread of the test process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from schemas.request import InspectionRequest, build_request_headers
from worker.app import App, build_app
from worker.settings import Settings


@contextmanager
def running_worker(
    settings: Settings, *, ready_timeout_s: float = 60.0, customize: Callable[[App], None] | None = None
) -> Iterator[App]:
    """Start a worker, wait until it joined the group, stop and join it on exit.

    ``customize`` sees the wired app before it starts (to swap a part in a test).
    """
    app = build_app(settings)
    if customize is not None:
        customize(app)
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", app.run()), name="worker-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        ready, _ = app.worker.readiness()
        if ready:
            break
        if not thread.is_alive():
            raise RuntimeError(f"worker exited early with {result.get('rc')}")
        time.sleep(0.05)
    else:
        app.stop()
        raise TimeoutError(f"worker not ready after {ready_timeout_s} s: {app.worker.readiness()[1]}")
    try:
        yield app
    finally:
        app.stop()
        thread.join(60)
        assert not thread.is_alive(), "worker did not stop within 60 s"
        app.exit_code = result.get("rc")  # type: ignore[attr-defined]


def request_record(
    path: Path | None, *, line: str, camera: str, message_id: str, data: bytes | None = None,
    content_type: str = "image/png", claim_check: dict[str, str] | None = None,
) -> tuple[bytes, bytes | None, list[tuple[str, bytes]]]:  # fmt: skip
    """A (key, value, headers) request record for an image file or raw bytes."""
    import json
    from datetime import UTC, datetime

    from schemas.request import ClaimCheck

    value = data if data is not None else (path.read_bytes() if path else None)
    claim = None
    if claim_check is not None:
        claim = ClaimCheck(**claim_check)
        value, content_type = json.dumps(claim_check).encode(), "application/json"
    request = InspectionRequest(
        message_id=message_id, source=f"test/{camera}", time=datetime.now(UTC), product_line=line,
        camera_id=camera, content_type=content_type, claim_check=claim,
    )  # fmt: skip
    return camera.encode(), value, build_request_headers(request)
