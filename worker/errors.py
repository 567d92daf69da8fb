"""Errors that end a CLI command with one clear line instead of a traceback."""

from __future__ import annotations


class SpaceError(Exception):
    """An expected failure with a message meant for the operator (printed as one line)."""

    exit_code = 1


class ConfigError(SpaceError):
    """A setting is missing or invalid; the message names the environment variable."""

    exit_code = 2
