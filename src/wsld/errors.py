"""User-facing errors: one clear line, exit code 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (config, data, file). The CLI prints it as one line and exits 2."""

    exit_code = 2


class DataError(UserError):
    """Bad or missing data: a path, a list, an LMDB, an image."""


class CheckpointError(UserError):
    """A checkpoint or weight file that cannot be used."""
