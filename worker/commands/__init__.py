"""The ``space`` subcommands, one module each (``NAME``, ``HELP``, ``configure``, ``run``)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def local_folder(text: str) -> Path:
    """An argparse type for folders that must be local: a URL (``s3://``) is refused, not read as ``./s3:/...``."""
    if _URL.match(text):
        raise argparse.ArgumentTypeError(
            f"{text} is a URL; this command reads and writes local folders (with an s3:// model root: "
            "train into a local folder, upload <line>/<version>/ under the root, then promote)"
        )
    return Path(text)
