"""Tests for models.synthetic: pixel-exact defect masks, realistic variation, the MVTec-layout writer."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from models.data import load_image, load_mask, scan_dataset
from models.synthetic import (
    DEFECT_KINDS,
    PRODUCT_LINES,
    build_product_line,
    draw_defect,
    render_defect_image,
    render_good_image,
)


def _mid_gray(seed: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(128, 6, size=(size, size, 3)), 100, 156).astype(np.uint8)


def _changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    diff = before != after
    return diff.any(axis=2) if diff.ndim == 3 else diff


@pytest.mark.parametrize("kind", DEFECT_KINDS)
@pytest.mark.parametrize("seed", range(4))
def test_mask_is_exactly_the_changed_pixels(kind: str, seed: int) -> None:
    # On a mid-gray part every kind has enough contrast that each touched pixel moves by >= 1 level,
    # so the mask must equal the changed pixels: a one-pixel shift or a dilated mask fails here.
    image = _mid_gray(seed)
    out, mask = draw_defect(image, kind, np.random.default_rng(100 + seed))
    assert out.shape == image.shape
    assert out.dtype == np.uint8
    assert mask.shape == image.shape[:2]
    assert mask.dtype == bool
    assert mask.sum() >= 6
    np.testing.assert_array_equal(_changed(image, out), mask)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_respects_region_and_leaves_outside_untouched(kind: str) -> None:
    image = _mid_gray(7)
    region = np.zeros(image.shape[:2], bool)
    region[20:76, 30:80] = True
    out, mask = draw_defect(image, kind, np.random.default_rng(3), region=region)
    assert not mask[~region].any()
    np.testing.assert_array_equal(out[~mask], image[~mask])
    np.testing.assert_array_equal(_changed(image, out), mask)


def test_draw_defect_gray_input_keeps_shape() -> None:
    gray = _mid_gray(1)[:, :, 0].copy()
    out, mask = draw_defect(gray, "scratch", np.random.default_rng(0))
    assert out.shape == gray.shape
    np.testing.assert_array_equal(out[~mask], gray[~mask])
    assert (out[mask] != gray[mask]).mean() > 0.5


def test_draw_defect_rejects_bad_input() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown defect kind"):
        draw_defect(_mid_gray(0), "dent", rng)
    with pytest.raises(ValueError, match="uint8"):
        draw_defect(np.zeros((8, 8, 3), np.float32), "hole", rng)
    # A dark crack cannot be seen on a black part: refuse rather than label an invisible defect.
    with pytest.raises(ValueError, match="visible"):
        draw_defect(np.zeros((64, 64, 3), np.uint8), "crack", rng)


@pytest.mark.parametrize("name", sorted(PRODUCT_LINES))
def test_product_line_defects_are_visible_and_exact(name: str) -> None:
    rng = np.random.default_rng(5)
    for kind in PRODUCT_LINES[name].defects:
        # Re-render the same good image to compare before/after without reaching into internals.
        state = rng.bit_generator.state
        good = render_good_image(name, rng, size=128)
        rng.bit_generator.state = state
        image, mask = render_defect_image(name, kind, rng, size=128)
        assert image.shape == (128, 128, 3)
        assert 6 <= mask.sum() < 0.25 * mask.size
        np.testing.assert_array_equal(image[~mask], good[~mask])
        visible = np.abs(image.astype(int) - good.astype(int)).max(axis=2) >= 8
        assert visible[mask].mean() >= 0.5


def test_good_images_vary_but_stay_alike() -> None:
    a = render_good_image("coins", np.random.default_rng(1), size=128).astype(float)
    b = render_good_image("coins", np.random.default_rng(2), size=128).astype(float)
    assert np.abs(a - b).mean() > 1.0  # not identical copies
    blur_a, blur_b = cv2.GaussianBlur(a, (0, 0), 8), cv2.GaussianBlur(b, (0, 0), 8)
    assert np.corrcoef(blur_a.ravel(), blur_b.ravel())[0, 1] > 0.7  # same fixtured part, small pose change
    with pytest.raises(ValueError, match="unknown product line"):
        render_good_image("teapot", np.random.default_rng(0))


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_product_line_layout_and_determinism(tmp_path: Path) -> None:
    kwargs = {"n_train": 3, "n_val": 2, "n_test_good": 2, "n_test_defect": 3, "size": 64, "seed": 4}
    root = build_product_line("gravel", tmp_path / "a", defect_types=["hole", "stain"], **kwargs)
    assert root == tmp_path / "a" / "gravel"
    index = scan_dataset(root)
    assert len(index.train_good) == 3
    assert len(index.validation_good) == 2
    assert not index.skipped
    assert [s.defect_type for s in index.test] == ["good", "good", "hole", "hole", "stain"]
    for sample in index.test:
        image = load_image(sample.path)
        assert image.shape == (64, 64, 3)
        if sample.is_anomalous:
            assert (
                sample.mask_path
                == root / "ground_truth" / sample.defect_type / f"{sample.path.stem}_mask.png"
            )
            raw = cv2.imread(str(sample.mask_path), cv2.IMREAD_UNCHANGED)
            assert raw.dtype == np.uint8
            assert set(np.unique(raw)) == {0, 255}
            assert load_mask(sample.mask_path, (64, 64)).sum() >= 6
    train = [load_image(p) for p in index.train_good]
    assert not np.array_equal(train[0], train[1])

    again = build_product_line("gravel", tmp_path / "b", defect_types=["hole", "stain"], **kwargs)
    assert _tree(root) == _tree(again)
    # Rebuilding in place replaces the earlier output (no stale files) ...
    (root / "train" / "good" / "stale.png").write_bytes(b"x")
    build_product_line("gravel", tmp_path / "a", defect_types=["hole", "stain"], **kwargs)
    assert _tree(root) == _tree(again)
    # ... while another seed gives other images.
    other = build_product_line(
        "gravel", tmp_path / "c", defect_types=["hole", "stain"], **{**kwargs, "seed": 5}
    )
    assert _tree(other)["train/good/000.png"] != _tree(root)["train/good/000.png"]


def test_build_product_line_refuses_foreign_folder_and_bad_args(tmp_path: Path) -> None:
    (tmp_path / "brick").mkdir()
    (tmp_path / "brick" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_product_line("brick", tmp_path, n_train=1, n_val=0, n_test_good=0, n_test_defect=0, size=64)
    assert (tmp_path / "brick" / "mine.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="defect_types"):
        build_product_line("brick", tmp_path / "x", defect_types=["dent"])
    with pytest.raises(ValueError, match="size"):
        build_product_line("brick", tmp_path / "x", size=16)
    with pytest.raises(ValueError, match=">= 0"):
        build_product_line("brick", tmp_path / "x", n_train=-1)
