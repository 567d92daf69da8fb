"""Soak (slow): 10 minutes at 80 % of measured capacity; RSS, open files and threads stay flat.

Runs bench/soak.py against the session's embedded stack and the trained test model. The figures are
printed (``-s``) and recorded in docs/reliability.md.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from tests.reliability.helpers import REPO


def _soak_module():
    spec = importlib.util.spec_from_file_location("bench_soak", REPO / "bench" / "soak.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.kafka
@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_soak_ten_minutes_at_80_percent_is_flat(stack, trained_model, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SPACE_KAFKA__BOOTSTRAP_SERVERS", stack.bootstrap_servers)
    monkeypatch.setenv("SPACE_REDIS__URL", stack.redis_url)
    duration = float(os.environ.get("SPACE_SOAK_DURATION_S", "600"))
    report = _soak_module().run_soak(duration_s=duration, load=0.8, model_root=trained_model.root, workdir=tmp_path)
    assert report.sent - report.answered == 0
    assert report.flat, report.verdict


def test_the_flatness_judge_can_fail() -> None:
    soak = _soak_module()
    growing = [soak.Sample(i * 10.0, 300.0 + 5 * i, 40 + i, 30, i, i) for i in range(40)]
    flat = [soak.Sample(i * 10.0, 300.0 + (i % 3), 40, 30, i, i) for i in range(40)]
    assert soak._judge(growing)[0] is False
    assert soak._judge(flat)[0] is True
