"""``space train``: train a SPACE or EfficientAD model on an MVTec-layout folder and write its artifact.

The artifact lands in ``<out>/<product-line>/<version>`` (the worker's model-root layout). Re-running the
same command after an interruption resumes from ``<out>/<product-line>/.checkpoint/<run>``. Names follow the
registry's rule, and an existing version is refused before training: versions are immutable, and
``--overwrite`` (for a version nobody serves yet) never replaces the line's active version.
"""

from __future__ import annotations

import argparse

from worker.commands import local_folder
from worker.errors import SpaceError

NAME = "train"
HELP = "Train a SPACE/EfficientAD model on an MVTec-layout folder and write a model artifact."


def _flag(parser: argparse.ArgumentParser, name: str, help_text: str) -> None:
    parser.add_argument(
        f"--{name}",
        dest=name.replace("-", "_"),
        action=argparse.BooleanOptionalAction,
        default=True,
        help=help_text,
    )


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``space train`` options."""
    parser.add_argument("--data", type=local_folder, required=True, help="MVTec-layout folder (train/good required).")
    parser.add_argument("--product-line", required=True, help="Product line name (artifact sub-folder).")
    parser.add_argument("--out", type=local_folder, required=True, help="Model root; writes <out>/<line>/<version>.")
    parser.add_argument("--variant", choices=("space", "efficientad"), default="space")
    parser.add_argument("--size", choices=("s", "m"), default="s", help="PDN size (EfficientAD-S or -M).")
    parser.add_argument("--steps", type=int, default=70_000, help="Optimiser steps (paper: 70000).")
    parser.add_argument(
        "--teacher",
        default="offline",
        help="offline (= filterbank), filterbank, random-pdn, a teacher_small/medium.pth "
        "file, or distill:module:factory for a backbone you provide.",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="Training autocast; auto = bf16 where supported.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--input-size", type=int, default=256, help="Square input side, multiple of 32, >= 64 (256 = paper)."
    )
    parser.add_argument("--batch-size", type=int, default=1, help="Images per step (paper: 1).")
    parser.add_argument(
        "--penalty",
        default="auto",
        help="Penalty images: auto (procedural + bundled photos), procedural, none, or a folder.",
    )
    _flag(parser, "fe", "SPACE: feed the teacher's trunk features (FE) to the student.")
    _flag(parser, "fm", "SPACE: pass FE through the gated Feature converter Module (else a plain 1x1 conv).")
    _flag(parser, "scl", "SPACE: spatial consistency loss.")
    _flag(parser, "scl-mask", "SPACE: mask SCL where the teacher is not equivariant.")
    parser.add_argument("--scl-weight", type=float, default=1.0)
    parser.add_argument(
        "--scl-augment",
        choices=("geometric", "label_preserving"),
        default="geometric",
        help="geometric (flips, turns, shifts) for textures; label_preserving (shifts) for LOCO.",
    )
    parser.add_argument("--distill-steps", type=int, default=2000, help="Steps for --teacher distill:...")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--name", default=None, help="Model name for the card.")
    parser.add_argument("--model-version", default=None, help="Version folder (default: UTC timestamp).")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an existing --model-version folder (refused for the line's active version).",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default).")
    parser.add_argument(
        "--malloc",
        choices=("retain", "system"),
        default="retain",
        help="glibc malloc: retain keeps freed memory for the next step (1.1-1.2x on CPU), as SPACE_MODELS__MALLOC.",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="No progress line.")


def run(args: argparse.Namespace) -> int:
    """Train and print the artifact folder."""
    import torch
    from pydantic import ValidationError
    from safetensors import SafetensorError

    from models.data import DatasetError
    from models.teacher import TeacherError
    from models.train import TrainConfig, train
    from worker.malloc import configure_malloc

    _check_output(args)
    configure_malloc(args.malloc)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data.is_dir():
        raise SpaceError(f"--data {args.data} is not a folder")
    space_parts = {"use_fe": args.fe, "use_fm": args.fm, "use_scl": args.scl, "scl_mask": args.scl_mask}
    if args.variant == "efficientad":
        space_parts = dict.fromkeys(space_parts, False)
    try:
        cfg = TrainConfig(
            data=args.data,
            product_line=args.product_line,
            out=args.out,
            variant=args.variant,
            size=args.size,
            steps=args.steps,
            teacher=args.teacher,
            device=args.device,
            precision=args.precision,
            seed=args.seed,
            input_size=args.input_size,
            batch_size=args.batch_size,
            penalty=args.penalty,
            scl_weight=args.scl_weight,
            scl_augment=args.scl_augment,
            distill_steps=args.distill_steps,
            checkpoint_every=args.checkpoint_every,
            name=args.name,
            model_version=args.model_version,
            overwrite=args.overwrite,
            progress=args.progress,
            **space_parts,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        raise SpaceError(f"invalid option {'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from exc
    try:
        out = train(cfg)
    except (DatasetError, TeacherError) as exc:
        raise SpaceError(str(exc)) from exc
    except ValueError as exc:  # device/precision/penalty-folder problems
        raise SpaceError(str(exc)) from exc
    except (OSError, SafetensorError) as exc:  # a full disk while saving: the version folder is not left behind
        raise SpaceError(f"cannot write under {args.out}: {exc}") from exc
    print(out)
    return 0


def _check_output(args: argparse.Namespace) -> None:
    """Refuse names the registry refuses, an existing version unless ``--overwrite``, and the active one always."""
    from worker.registry import ModelRegistry, check_name

    check_name("product line", args.product_line)
    if args.threads < 0:
        raise SpaceError(f"--threads must be 0 (torch's default) or more, not {args.threads}")
    if args.out.exists() and not args.out.is_dir():  # found only when saving, after the whole training
        raise SpaceError(f"--out {args.out} is a file, not a folder")
    if args.model_version is None:
        if args.overwrite:
            raise SpaceError("--overwrite needs --model-version (the default version is a new timestamp)")
        return
    check_name("version", args.model_version)
    folder = args.out / args.product_line / args.model_version
    if not folder.exists():
        return
    if not args.overwrite:
        raise SpaceError(
            f"{folder} already exists: versions are immutable (results, thresholds and S3 caches key on them); "
            "train into a new --model-version, or pass --overwrite to replace a version nobody serves"
        )
    pointer = ModelRegistry(str(args.out)).pointer(args.product_line)
    if pointer is not None and pointer.version == args.model_version:
        raise SpaceError(
            f"{folder} is the active version of line {args.product_line!r}: --overwrite never replaces the serving "
            "model; train into a new --model-version and promote it"
        )
