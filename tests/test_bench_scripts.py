"""The prepared GPU run and the layer breakdown, checked where no GPU is: budget, sections, arithmetic."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.breakdown import NETWORKS, conv_gflop, layer_times

REPO = Path(__file__).resolve().parents[1]
GPU_SH = (REPO / "bench" / "gpu.sh").read_text(encoding="utf-8")
DEVICE_COMMAND_S = 600  # one device command's limit; the default sections must leave room to start
FIXED_OVERHEAD_S = 60  # install from .whl/, env.txt's torch imports, archive refreshes
KILL_AFTER_S = 10  # `timeout --kill-after` per section: a section may run this long past its limit
DEVICE_FILES = 8  # the device returns at most 8 files from $OUT


def section_limits() -> dict[str, int]:
    """``section KEY NAME "${VAR:-SECONDS}"`` lines of bench/gpu.sh -> {key: seconds}."""
    found = re.findall(r'^section (\S+) \S+ "\$\{GPU_\w+_S:-(\d+)\}"', GPU_SH, flags=re.MULTILINE)
    return {key: int(seconds) for key, seconds in found}


def test_default_gpu_sections_exist_and_fit_one_device_command() -> None:
    limits = section_limits()
    default = re.search(r'SECTIONS=" \$\{GPU_SECTIONS:-([\w -]+)\} "', GPU_SH)
    assert default is not None
    keys = default.group(1).split()
    assert set(keys) <= set(limits), set(keys) - set(limits)
    assert {"tests", "breakdown", "branches", "processes", "compile"} <= set(keys)
    total = re.search(r'TOTAL_S="\$\{GPU_TOTAL_S:-(\d+)\}"', GPU_SH)
    assert total is not None
    # The script stops itself at GPU_TOTAL_S (sections cut to the time left), after the install.
    assert int(total.group(1)) + FIXED_OVERHEAD_S <= DEVICE_COMMAND_S - 60  # a minute left for a second command
    # Only the last default section may be cut: the ones before it fit whole.
    assert sum(limits[k] for k in keys[:-1]) + 20 * len(keys) <= int(total.group(1)), {k: limits[k] for k in keys}
    assert re.search(rf"timeout --kill-after={KILL_AFTER_S} ", GPU_SH)


def test_sections_are_cut_to_the_time_left_and_skipped_when_none_is(tmp_path: Path) -> None:
    # A run cut off by the device tool returned no final archive: the script must end by itself.
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "GPU_DRY_RUN": "1", "GPU_SECTIONS": "all", "GPU_BENCH_WORK": str(work), "GPU_TOTAL_S": "100"}
    done = subprocess.run(
        ["bash", "bench/gpu.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = (out / "gpu.log").read_text()
    assert "== gpu-tests (limit 75s)" in log  # fits whole
    assert re.search(r"== gpu-model: limit cut from 220s to the \d+s left", log)
    assert (out / "results.tgz").is_file()


def test_all_names_every_section() -> None:
    everything = re.search(r'\[ "\$SECTIONS" = " all " \] && SECTIONS=" ([\w -]+) "', GPU_SH)
    assert everything is not None
    assert set(everything.group(1).split()) == set(section_limits())


def section_names() -> dict[str, str]:
    """``section KEY NAME ...`` lines of bench/gpu.sh -> {key: name of its log file}."""
    return dict(re.findall(r"^section (\S+) (\S+) ", GPU_SH, flags=re.MULTILINE))


def test_gpu_sh_writes_few_files_under_out_and_archives_every_section(tmp_path: Path) -> None:
    """A dry run of every section (commands echoed, no install, no GPU): $OUT gets the archive and the
    console log only, and the archive holds env.txt and every section's log."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "GPU_DRY_RUN": "1", "GPU_SECTIONS": "all", "GPU_BENCH_WORK": str(work)}
    done = subprocess.run(
        ["bash", "bench/gpu.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["gpu.log", "results.tgz"]
    assert len(files) + 1 <= DEVICE_FILES  # + results.tgz.part, should a command be cut off mid-refresh
    names = section_names()
    assert len(names) == len(section_limits())
    with tarfile.open(out / "results.tgz") as tar:
        archived = {Path(n).name for n in tar.getnames()}
    assert {"env.txt"} | {f"{name}.txt" for name in names.values()} <= archived
    log = (out / "gpu.log").read_text()
    for name in names.values():
        assert f"== {name} rc=0 in" in log
        # every result file goes to the scratch folder, none straight to $OUT
        echoed = (work / f"{name}.txt").read_text()
        assert echoed.startswith("DRY:") and str(out) not in echoed


def test_gpu_sh_writes_only_the_archive_and_the_log_to_out() -> None:
    code = [line for line in GPU_SH.splitlines() if not line.lstrip().startswith("#")]
    targets = {m for line in code for m in re.findall(r"\$OUT/([\w.-]+)", line)}
    assert targets == {"results.tgz", "results.tgz.part", "gpu.log"}
    assert not re.search(r"--out[ =]\"?\$OUT", GPU_SH)


def test_gpu_sh_installs_offline_and_checks_the_imports() -> None:
    installs = [line for line in GPU_SH.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    assert installs and all("--no-index" in line and "--find-links .whl" in line for line in installs)
    # /tmp/site is on PYTHONPATH before the "already installed?" check, so a second command skips the install
    assert GPU_SH.index('PYTHONPATH="$PWD:$SITE') < GPU_SH.index('python3 -c "$IMPORTS" 2>/dev/null')
    assert "/.whl/" in (REPO / ".gitignore").read_text().splitlines()
    assert "-o timeout=" in GPU_SH


def test_conv_gflop_counts_multiply_adds_twice() -> None:
    conv = nn.Conv2d(128, 256, 4)
    # EfficientAD-S conv2 at 256 px: 123x123 outputs, 256 channels, 128x4x4 inputs each.
    assert abs(conv_gflop(conv, torch.Size([1, 256, 123, 123])) - 2 * 123 * 123 * 256 * 128 * 16 / 1e9) < 1e-9
    grouped = nn.Conv2d(8, 8, 3, groups=8)
    assert conv_gflop(grouped, torch.Size([2, 8, 10, 10])) == 2 * 2 * 8 * 10 * 10 * 1 * 9 / 1e9


class TinyTeacher(nn.Module):
    """Entered through ``forward_with_trunk``, as SpaceModel calls its teacher (module hooks miss it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward_with_trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.relu(self.conv(x))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.teacher = TinyTeacher()
        self.student = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher.forward_with_trunk(x)[1] - self.student(x)


def test_layer_times_cover_every_leaf_and_network_and_unhook_afterwards() -> None:
    model = Tiny().eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.inference_mode():
        total_ms, layers = layer_times(model, lambda: model(x), torch.device("cpu"), reps=3)
    by_name = {lt.name: lt for lt in layers}
    assert {"teacher", "teacher.conv", "student", "student.0", "student.1", "student.2"} <= set(by_name)
    assert set(by_name) & set(NETWORKS) == {"teacher", "student"}
    assert total_ms > 0 and all(lt.ms >= 0 for lt in layers)
    assert by_name["student"].ms <= total_ms
    assert by_name["student.0"].out_shape == [2, 8, 14, 14]
    assert by_name["student.0"].gflop == conv_gflop(model.student[0], torch.Size([2, 8, 14, 14]))
    assert by_name["student.0"].mbytes == (2 * 3 * 16 * 16 + 2 * 8 * 14 * 14) * 4 / 1e6
    # hooks and wrappers are gone: the model runs plain again
    assert not model.student[0]._forward_hooks and not model.student[0]._forward_pre_hooks
    assert "forward" not in vars(model.student) and "forward_with_trunk" not in vars(model.teacher)


def test_branches_bench_refuses_a_machine_without_cuda_with_a_clear_message() -> None:
    import pytest

    if torch.cuda.is_available():
        pytest.skip("a CUDA host runs the bench itself (bench/gpu.sh section branches)")
    done = subprocess.run(
        [sys.executable, "bench/branches.py", "--batch", "1"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "bench/branches.py needs a CUDA device" in done.stderr


def test_geometry_probes_reproduce_the_documented_misalignments(tmp_path: Path) -> None:
    """docs/model.md, "FE alignment" and "Map alignment": FE resize 3.5 -> 4.40, 12.0 -> 11.92,
    20.5 -> 19.45 at 128 px (PDN teacher), the avg-pool fix on the true cells; the map's +1.5 px down-right
    offset with map_align="padded" and none with "receptive_field", on the measured receptive-field centres."""
    out = tmp_path / "geometry.json"
    done = subprocess.run(
        [sys.executable, "bench/geometry.py", "--teacher", "pdn", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.search(r"pdn +30 +3\.50 +3\.49 +4\.40 ", done.stdout), done.stdout
    assert re.search(r"^  padded +\+1\.50,\+1\.50 +\+1\.50,\+1\.50$", done.stdout, flags=re.MULTILINE), done.stdout
    assert re.search(r"^  receptive_field +\+0\.00,\+0\.00 +\+0\.00,\+0\.00$", done.stdout, flags=re.MULTILINE)
    result = json.loads(out.read_text())
    fe = result["fe"]["pdn"]
    assert [row["pixel"] for row in fe] == [30, 64, 98]
    assert [round(row["fe"], 2) for row in fe] == [4.40, 11.92, 19.45]
    for row in fe:
        assert abs(row["aligned"] - row["true_cell"]) < 0.05 and abs(row["trunk"] - row["true_cell"]) < 0.05
    maps = result["map"]
    expected_centre = {"pdn": 16, "pdn_padded": 0, "filterbank": 16, "filterbank_padded": 0}
    assert maps["rf_centre"] == {k: pytest.approx([c, c], abs=1e-4) for k, c in expected_centre.items()}
    for padding in ("unpadded", "padded"):
        assert maps["impulse_offset_px"]["padded"][padding] == pytest.approx([1.5, 1.5], abs=1e-4)
        assert maps["impulse_offset_px"]["receptive_field"][padding] == pytest.approx([0.0, 0.0], abs=1e-4)

    def interior(align: str) -> list[float]:
        return [v for r in maps["one_pixel"][align]["pdn"] if not r["border"] for v in (r["dy"], r["dx"])]

    legacy, aligned = interior("padded"), interior("receptive_field")
    assert legacy and all(1.0 < v < 2.5 for v in legacy), legacy
    assert all(-0.5 < v < 0.5 for v in aligned), aligned  # the untrained PDN's own asymmetry only
    assert all(1.3 < a - b < 1.6 for a, b in zip(legacy, aligned, strict=True))  # same networks, moved by the resize


def test_threshold_bench_synthetic_new_rule_beats_the_old_one_at_few_images(tmp_path: Path) -> None:
    out = tmp_path / "threshold.json"
    done = subprocess.run(
        [sys.executable, "bench/threshold.py", "--draws", "50", "--n", "1,10", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.search(r"^  1 \| 0\.\d{3} -> 0\.\d{3} \(\+0\.196\)", done.stdout, flags=re.MULTILINE), done.stdout
    fpr = json.loads(out.read_text())["synthetic"]["fpr"]
    assert fpr["1"]["old"] > 0.3 and fpr["1"]["new"] < 0.05 < fpr["1"]["old"]
    assert fpr["10"]["new"] <= fpr["10"]["old"]


def test_threshold_bench_recomputes_quantiles_and_scores_from_each_draw() -> None:
    """The trained-population protocol on a made-up pool of maps (no training): rates are fractions of the
    other images, the new rule never flags more than the old one, and the margin shrinks with n."""
    import numpy as np

    from bench.threshold import maps_fpr

    rng = np.random.default_rng(0)
    st, ae = rng.exponential(1.0, (12, 8, 8)), rng.exponential(2.0, (12, 8, 8))
    res = maps_fpr(st, ae, [1, 4], draws=20, seed=0)
    for r in res.values():
        assert 0.0 <= r["new"] <= r["old"] <= 1.0
    assert res[1]["margin"] == pytest.approx(0.05 * np.log(50))
    assert res[4]["margin"] < res[1]["margin"]
