"""``space calibrate --model DIR --data DIR``: choose a product line's threshold from data, optionally write it.

Scores the dataset with the artifact (:mod:`models.calibration`: ``quantile`` on validation normals
(without ``validation/good``, the ``train/good`` images the model held out, rebuilt from its card) at a
target false-positive rate, or ``f1`` on the labelled ``test/`` set), prints the threshold with the
false-positive rate and recall it gives on that data, and with ``--write`` stores it in Redis through
:class:`worker.thresholds.ThresholdStore` for the card's product line and version, so workers apply
it only to scores of that model version.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from worker.commands import local_folder

NAME = "calibrate"
HELP = "Choose a product line's decision threshold from data (quantile or F1); --write stores it in Redis."


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the calibrate options."""
    parser.add_argument("--model", required=True, type=local_folder, metavar="DIR", help="Model artifact folder.")
    parser.add_argument(
        "--data", required=True, type=local_folder, metavar="DIR", help="Dataset folder (MVTec layout)."
    )
    parser.add_argument(
        "--method",
        choices=("quantile", "f1"),
        default="quantile",
        help="quantile: normals at --target-fpr (default); f1: F1-optimal on labelled test/.",
    )
    parser.add_argument(
        "--target-fpr", type=_fraction, default=0.01, metavar="X", help="Quantile method's false-positive rate (0.01)."
    )
    parser.add_argument("--write", action="store_true", help="Store the threshold in Redis (versioned, audited).")
    parser.add_argument("--by", default=None, help="Who writes it (default: the current user).")
    parser.add_argument("--note", default=None, help="Why (kept in the history; default: a calibration summary).")
    parser.add_argument("--force", action="store_true", help="Write a value outside the configured bounds.")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of text.")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="Default: cpu.")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="Score at the precision the workers serve (SPACE_MODELS__PRECISION): bf16 moves scores by up "
        "to a few %% of the threshold (docs/performance.md). Default: auto, resolved as a worker on this "
        "machine resolves it (the card's training precision where it runs natively, else fp32); the "
        "output says which one scored.",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="Images per batch (8).")


def run(args: argparse.Namespace) -> int:
    """Score the data, print the threshold, and write it with ``--write``."""
    from models.artifact import ArtifactError
    from models.calibration import CalibrationError, calibrate
    from models.data import DatasetError, scan_dataset
    from models.detector import Detector, DetectorError
    from worker.errors import SpaceError
    from worker.logging import configure_logging

    configure_logging("WARNING")  # stdout is the result; only warnings and errors go to stderr
    if not args.model.is_dir():
        raise SpaceError(f"--model {args.model} is not a folder")
    try:
        index = scan_dataset(args.data, require_train=False)  # corrupt images skipped with a warning, as train does
        detector = Detector.load(args.model, device=args.device, precision=args.precision)
        result = calibrate(
            detector,
            index,
            args.method,
            target_fpr=args.target_fpr,
            batch_size=args.batch_size,
            training=detector.card.training,  # without validation/good: the images training held out
        )
    except (DatasetError, ArtifactError, DetectorError, CalibrationError) as exc:
        raise SpaceError(str(exc)) from exc
    card = detector.card
    record = _write(args, card, result, detector.precision) if args.write else None
    _print(args, card, result, record, detector.precision)
    return 0


def _write(args: argparse.Namespace, card: Any, result: Any, precision: str) -> Any:
    """Store the threshold for the card's line and version; returns the written record."""
    import redis

    from worker.commands.thresholds import _default_user
    from worker.errors import SpaceError
    from worker.redis_client import make_redis
    from worker.settings import load_settings, redact_url
    from worker.thresholds import ThresholdStore

    settings = load_settings()
    client = make_redis(settings.redis)
    store = ThresholdStore.from_settings(client, settings)
    note = args.note if args.note is not None else f"space calibrate{_scored_in(precision)}: {result.summary()}"
    try:
        return store.set(
            card.product_line,
            result.threshold,
            model_version=card.version,
            method=result.method,
            updated_by=args.by or _default_user(),
            note=note[:1000],
            force=args.force,
        )
    except redis.exceptions.RedisError as exc:
        raise SpaceError(f"Redis at {redact_url(settings.redis.url)} failed: {exc}") from exc
    finally:
        client.close()


def _scored_in(precision: str) -> str:
    """`` (scored in bf16)`` when the scores were not fp32, for the printed line and the history note."""
    return "" if precision == "fp32" else f" (scored in {precision})"


def _print(args: argparse.Namespace, card: Any, result: Any, record: Any, precision: str) -> None:
    if args.json:
        doc = {
            "product_line": card.product_line,
            "model_version": card.version,
            "threshold": result.threshold,
            "method": result.method,
            "target_fpr": result.target_fpr,
            "normal_source": result.normal_source,
            "n_normal": result.n_normal,
            "n_defect": result.n_defect,
            "expected_fpr": result.fpr,
            "recall": result.recall,
            "precision": result.precision,
            "model_default_threshold": card.default_threshold,
            "inference_precision": precision,
            "warnings": list(result.warnings),
            "written_version": record.version if record is not None else None,
        }
        print(json.dumps(doc, indent=2))
        return
    print(f"line {card.product_line}, model {card.version}{_scored_in(precision)}: {result.summary()}")
    print(f"(model card default: {card.default_threshold:.6g})")
    for warning in result.warnings:
        print(f"warning: {warning}")
    if record is not None:
        print(f"wrote threshold version {record.version} for line {card.product_line} (model {card.version})")
    else:
        print("not written: add --write to store it in Redis")
