"""``space evaluate --model DIR --data DIR --out DIR``: accuracy of a trained model on a test set.

Loads the artifact with :class:`models.detector.Detector`, scans the MVTec-layout ``--data`` folder
(only ``test/`` and ``ground_truth/`` are needed) and writes ``metrics.json`` (image AUROC, pixel
AUROC, AU-PRO, overall and per defect type), ``scores.csv`` and a heatmap gallery, misses first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.commands import local_folder

NAME = "evaluate"
HELP = "Evaluate a trained model on an MVTec-layout test set: metrics.json, scores.csv, heatmap gallery."


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _fpr_limit(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the evaluate options."""
    parser.add_argument("--model", required=True, type=local_folder, metavar="DIR", help="Model artifact folder.")
    parser.add_argument(
        "--data", required=True, type=local_folder, metavar="DIR", help="Dataset folder with test/ (MVTec layout)."
    )
    parser.add_argument("--out", required=True, type=local_folder, metavar="DIR", help="Output folder (created).")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="Default: auto.")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="Inference precision; auto (default) resolves as a worker on this machine does.",
    )
    parser.add_argument(
        "--gallery", default=24, type=_non_negative_int, metavar="N", help="Gallery images (default 24)."
    )
    parser.add_argument(
        "--batch-size", default=8, type=_positive_int, metavar="N", help="Images per batch (default 8)."
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="Decision threshold for the confusion counts and gallery (default: the model card's).",
    )
    parser.add_argument("--fpr-limit", default=0.3, type=_fpr_limit, help="AU-PRO integration limit (default 0.3).")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _print_summary(result: dict, out_dir: Path) -> None:
    overall = result["overall"]
    limit = result["fpr_limit"]
    print(
        f"{overall['n_images']} test images ({overall['n_anomalous']} anomalous): "
        f"image AUROC {_fmt(overall['image_auroc'])}, pixel AUROC {_fmt(overall['pixel_auroc'])}, "
        f"AU-PRO@{limit:g} {_fmt(overall['au_pro'])}"
    )
    for kind, block in result["per_defect_type"].items():
        print(
            f"  {kind}: image AUROC {_fmt(block['image_auroc'])}, pixel AUROC {_fmt(block['pixel_auroc'])}, "
            f"AU-PRO {_fmt(block['au_pro'])}"
        )
    counts = overall["at_threshold"]
    print(
        f"at threshold {result['threshold']['value']:.4g}: {counts['fn']} missed, "
        f"{counts['fp']} false alarms of {overall['n_images']}"
    )
    print(f"wrote {out_dir / 'metrics.json'}")


def run(args: argparse.Namespace) -> int:
    """Evaluate the model and print a short summary."""
    from models.artifact import ArtifactError
    from models.data import DatasetError, scan_dataset
    from models.detector import Detector, DetectorError
    from models.evaluate import EvaluationError, evaluate
    from worker.errors import SpaceError

    if not args.model.is_dir():
        raise SpaceError(f"--model {args.model} is not a folder")
    if not (args.data / "test").is_dir():
        raise SpaceError(f"--data {args.data} has no test/ folder (expected MVTec layout)")
    try:
        index = scan_dataset(args.data, check_readable=False, require_train=False)
        detector = Detector.load(args.model, device=args.device, precision=args.precision)
        result = evaluate(
            detector,
            index,
            args.out,
            gallery=args.gallery,
            batch_size=args.batch_size,
            threshold=args.threshold,
            fpr_limit=args.fpr_limit,
        )
    except (DatasetError, EvaluationError, ArtifactError, DetectorError) as exc:
        raise SpaceError(str(exc)) from exc
    except OSError as exc:
        raise SpaceError(f"cannot write evaluation output to {args.out}: {exc}") from exc
    _print_summary(result, args.out)
    return 0
